//! RCU grace periods for the XDP dataplane: when can memory a program run may still be reading
//! be written again?
//!
//! The program runs inside an RCU read-side section, so once a grace period has passed after a
//! change (a table flipped away from, a `VIPS` key removed, an id released), no run that saw the
//! state before it is left. Userspace gets one from `membarrier(MEMBARRIER_CMD_GLOBAL)`, which is
//! `synchronize_rcu()` in the kernel (about 8 ms on the machines lbd is tested on). Grace periods
//! run on a thread of their own, started by each change, so a later write usually finds its
//! grace period long over and does not wait.

use std::{
    sync::{atomic::AtomicBool, Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

/// What a grace period is replaced with where the kernel refuses `membarrier` (a `nohz_full`
/// kernel, a seccomp filter): a program run lasts microseconds, this is thousands of times more.
pub const FALLBACK_WAIT: Duration = Duration::from_millis(20);

/// Numbers changes and tells when a grace period has passed since one. Change 0 is "none": it
/// has always passed.
pub struct Graces {
    shared: Arc<Shared>,
    /// The last change's number.
    last: u64,
    /// The thread running grace periods; `None` if it could not be started (then `wait` runs
    /// them itself).
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Changes up to this one want a grace period.
    wanted: u64,
    /// A grace period started after each change up to this one has ended.
    passed: u64,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Graces {
    pub fn new() -> Self {
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lbd-grace".into())
            .spawn(move || run(&theirs))
            .map_err(|e| tracing::warn!("starting the grace-period thread: {e}; applies wait for grace periods themselves"))
            .ok();
        Self { shared, last: 0, thread }
    }

    /// Records a change, made already (the map written): its number. A grace period that covers
    /// it starts in the background.
    pub fn mark(&mut self) -> u64 {
        self.last += 1;
        self.shared.lock().wanted = self.last;
        self.shared.changed.notify_all();
        self.last
    }

    /// The last change recorded.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Whether a grace period has passed since change `n`.
    pub fn passed(&self, n: u64) -> bool {
        self.shared.lock().passed >= n
    }

    /// Returns once a grace period has passed since change `n`.
    pub fn wait(&self, n: u64) {
        if self.thread.is_none() {
            if !self.passed(n) {
                let wanted = self.shared.lock().wanted;
                grace_period();
                let mut st = self.shared.lock();
                st.passed = st.passed.max(wanted);
            }
            return;
        }
        let mut st = self.shared.lock();
        while st.passed < n {
            st = self.shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Default for Graces {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Graces {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The grace-period thread: one grace period at a time, each covering every change recorded
/// before it started.
fn run(shared: &Shared) {
    loop {
        let covers = {
            let mut st = shared.lock();
            while st.wanted <= st.passed && !st.stop {
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.stop {
                return;
            }
            st.wanted
        };
        grace_period();
        shared.lock().passed = covers;
        shared.changed.notify_all();
    }
}

/// Waits for an RCU grace period (see the module's comment).
pub fn grace_period() {
    /// `MEMBARRIER_CMD_GLOBAL` (uapi/linux/membarrier.h).
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    static WARNED: AtomicBool = AtomicBool::new(false);
    // SAFETY: a system call without pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0 as libc::c_long, 0 as libc::c_long) };
    if r != 0 {
        let err = std::io::Error::last_os_error();
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "membarrier(MEMBARRIER_CMD_GLOBAL) failed ({err}): lbd waits {} ms instead of an RCU grace period before it \
                 rewrites what the XDP program may still read",
                FALLBACK_WAIT.as_millis()
            );
        }
        std::thread::sleep(FALLBACK_WAIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn nothing_to_wait_for_before_the_first_change() {
        let g = Graces::new();
        assert!(g.passed(0));
        let t = Instant::now();
        g.wait(0);
        assert!(t.elapsed() < Duration::from_millis(5), "waited {:?} for change 0", t.elapsed());
    }

    #[test]
    fn a_change_has_passed_once_a_grace_period_ran_after_it() {
        let mut g = Graces::new();
        let first = g.mark();
        let second = g.mark();
        assert_eq!((first, second, g.last()), (1, 2, 2));
        g.wait(second);
        assert!(g.passed(first) && g.passed(second));
        // A later change waits for a grace period of its own.
        let third = g.mark();
        g.wait(third);
        assert!(g.passed(third));
    }

    #[test]
    fn without_the_thread_wait_runs_the_grace_period_itself() {
        let mut g = Graces::new();
        if let Some(t) = g.thread.take() {
            g.shared.lock().stop = true;
            g.shared.changed.notify_all();
            t.join().unwrap();
        }
        let n = g.mark();
        assert!(!g.passed(n));
        g.wait(n);
        assert!(g.passed(n));
    }

    #[test]
    fn the_kernel_gives_grace_periods() {
        // MEMBARRIER_CMD_QUERY: the commands this kernel has; lbd relies on GLOBAL (bit 0).
        // SAFETY: a system call without pointers.
        let cmds = unsafe { libc::syscall(libc::SYS_membarrier, 0 as libc::c_long, 0 as libc::c_long, 0 as libc::c_long) };
        assert!(cmds > 0 && cmds & 1 == 1, "membarrier(MEMBARRIER_CMD_QUERY) = {cmds}");
    }
}
