//! Runs every real server's check on its own schedule and reports changes.
//!
//! One tokio task per check: it waits a random part of `warmup` (so that a thousand checks do not
//! fire in one burst after a start or a reload), then probes every `interval` (a probe that takes
//! longer delays the next one; probes of one check never overlap). Probes run under a semaphore
//! (at most [`SchedulerOptions::max_probes`] at once, scripts at most
//! [`SchedulerOptions::max_scripts`]), so a burst of slow real servers cannot exhaust sockets or
//! processes. Each attempt takes its own permit: a check waiting `retry_delay` for its retry holds
//! none. Each result goes through the check's [`CheckState`]; a transition is logged once
//! (with its reason), sent as a [`HealthEvent`], and runs `notify_up`/`notify_down` detached with
//! a timeout.
//!
//! A `via = "vip"` check needs the real server's MAC, which the controller learns from the
//! neighbour table shortly after the check starts (a new [`CheckConfig`] with it then replaces the
//! check, state kept). Until then a tick gives no result: nothing is recorded, so a start does
//! not count failures against a healthy real server. A MAC still unknown [`MAC_GRACE`] after the
//! check started is a failed check: a real server that answers no ARP (or neighbour
//! solicitation) is unreachable, and keepalived takes it down too (its connect fails).
//!
//! The controller owns the [`Scheduler`]: [`Scheduler::set`] on start and on every reload (checks
//! that did not change keep running and keep their state; changed ones restart, with their state
//! kept unless their kind changed), [`Scheduler::health`] when it builds the dataplane state,
//! [`Scheduler::status`] for `lbd status`. Must be used inside a tokio runtime. Dropping it stops
//! every check.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{atomic::AtomicBool, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::check::{self, Attempt, ProbeResult, ProbeTarget};
use super::config::{format_duration, CheckKind, CommandText, HealthCheck, ProbeKind, Via};
use super::state::{CheckState, Health, StateSnapshot, Transition};

/// How long a `via = "vip"` check waits for the real server's MAC before each of its checks fails
/// (see the module docs). The kernel gives up resolving after 3 s (3 solicitations a second
/// apart); by 5 s the controller's resolver has also asked it three times.
pub const MAC_GRACE: Duration = Duration::from_secs(5);

/// Identifies a check: the virtual server's key and the real server's key, as the controller
/// names them (e.g. `VipAddr` and `BackendSpec::key()` rendered as strings).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct CheckKey {
    pub vip_key: String,
    pub real_server_key: String,
}

/// Everything needed to run one real server's check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckConfig {
    pub key: CheckKey,
    pub check: HealthCheck,
    pub target: ProbeTarget,
    /// keepalived `alpha`: start down until the first pass.
    pub alpha: bool,
    /// The real server was down when lbd stopped (the controller's state file): start down until
    /// the first pass, with or without `alpha`.
    pub was_down: bool,
    /// Run (detached) when the real server comes up / goes down.
    pub notify_up: Option<CommandText>,
    pub notify_down: Option<CommandText>,
}

/// A change of a real server's health, for the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthEvent {
    pub vip_key: String,
    pub real_server_key: String,
    /// Up (serve) or down (remove, or weight 0 with `inhibit_on_failure`).
    pub up: bool,
    /// The result that caused it: `"HTTP 503"`, `"timeout after 500ms"`, `"connected"`, ...
    pub reason: String,
    /// Weight set by a `dynamic_weight` script (also sent alone, with `up = true`, when it changes
    /// while the real server is up); `None`: the configured weight.
    pub weight: Option<u32>,
}

/// A check's status for `lbd status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckStatus {
    pub vip_key: String,
    pub real_server_key: String,
    pub kind: CheckKind,
    #[serde(flatten)]
    pub state: StateSnapshot,
}

/// Limits of a scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerOptions {
    /// Probes running at once (each holds a socket); default 512.
    pub max_probes: usize,
    /// `script` probes running at once (each is a process); default 16.
    pub max_scripts: usize,
    /// Notify commands running at once; more wait their turn (detached). Default 16.
    pub max_notifies: usize,
    /// Limit of a notify command's run; it is killed after. Default 10 s.
    pub notify_timeout: Duration,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            max_probes: 512,
            max_scripts: 16,
            max_notifies: 16,
            notify_timeout: Duration::from_secs(10),
        }
    }
}

/// Makes one attempt of a check; the real one is [`check::attempt`]. The scheduler retries
/// ([`check::retrying`]). Tests substitute scripted results.
pub trait Prober: Send + Sync + 'static {
    fn attempt<'a>(
        &'a self,
        check: &'a HealthCheck,
        target: &'a ProbeTarget,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>>;
}

/// The real attempts of [`check::attempt`].
#[derive(Debug, Default, Clone, Copy)]
pub struct NetworkProber;

impl Prober for NetworkProber {
    fn attempt<'a>(
        &'a self,
        check: &'a HealthCheck,
        target: &'a ProbeTarget,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        Box::pin(check::attempt(check, target))
    }
}

struct Shared {
    events: mpsc::Sender<HealthEvent>,
    probes: Semaphore,
    scripts: Semaphore,
    notifies: Arc<Notifies>,
    options: SchedulerOptions,
    prober: Box<dyn Prober>,
    /// Checks that could not run, for [`report`]'s warnings.
    not_run: Mutex<NotRunLog>,
}

/// How often at most checks that could not run are logged: lbd out of descriptors fails all
/// its checks at once, and a line for each at every interval would flood the log while it lasts.
const NOT_RUN_LOG_EVERY: Duration = Duration::from_secs(60);

/// Checks that could not run ([`check::Attempt::not_run`]): a warning at the first, then at most
/// one per [`NOT_RUN_LOG_EVERY`] saying how many more did not run; once checks run again, a line
/// saying so.
#[derive(Debug, Default)]
struct NotRunLog {
    /// When the last warning was logged.
    warned: Option<tokio::time::Instant>,
    /// A warning was logged and no check has run since.
    open: bool,
    /// Checks that could not run since the last warning.
    since: u64,
}

impl NotRunLog {
    /// The check of `key` could not run, for `reason`. True if that was logged as a warning.
    fn not_run(&mut self, now: tokio::time::Instant, key: &CheckKey, reason: &str) -> bool {
        self.since += 1;
        if self.warned.is_some_and(|at| now.saturating_duration_since(at) < NOT_RUN_LOG_EVERY) {
            debug!(vip = %key.vip_key, real_server = %key.real_server_key, %reason, "check could not run");
            return false;
        }
        warn!(
            vip = %key.vip_key,
            real_server = %key.real_server_key,
            %reason,
            not_run = self.since,
            "health checks cannot run (lbd's own shortage, not the real servers'): their real servers keep their \
             state; logged at most once a minute while it lasts"
        );
        (self.warned, self.open, self.since) = (Some(now), true, 0);
        true
    }

    /// A check ran: ends what a warning began.
    fn ran(&mut self) {
        if std::mem::take(&mut self.open) {
            info!(not_run = self.since, "health checks run again");
            self.since = 0;
        }
    }
}

struct Running {
    config: CheckConfig,
    state: Arc<Mutex<CheckState>>,
    /// Set (under the state's lock) when the check is replaced or removed; see [`retire`].
    retired: Arc<AtomicBool>,
    task: Option<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        retire(&self.state, &self.retired);
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Ends a check's results and returns its last state. Aborting its task is not enough: on the
/// multi-thread runtime a task running on another thread, its probe just done, goes on to its
/// next await. Its result then finds `retired` set under the state's lock and is dropped
/// ([`report`]): no log line, event or notify for a check that no longer counts, and nothing the
/// copy taken here misses.
fn retire(state: &Mutex<CheckState>, retired: &AtomicBool) -> CheckState {
    let st = state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    retired.store(true, std::sync::atomic::Ordering::Relaxed);
    st.clone()
}

/// The checks as [`Scheduler::checkpoint`] found them.
pub struct Checkpoint(HashMap<CheckKey, (CheckConfig, Arc<Mutex<CheckState>>)>);

/// The set of running checks.
pub struct Scheduler {
    shared: Arc<Shared>,
    checks: HashMap<CheckKey, Running>,
}

impl Scheduler {
    /// A scheduler sending its events to `events`, with the real probes.
    pub fn new(events: mpsc::Sender<HealthEvent>, options: SchedulerOptions) -> Scheduler {
        Self::with_prober(events, options, NetworkProber)
    }

    /// A scheduler with another prober (tests).
    pub fn with_prober(
        events: mpsc::Sender<HealthEvent>,
        options: SchedulerOptions,
        prober: impl Prober,
    ) -> Scheduler {
        Scheduler {
            shared: Arc::new(Shared {
                events,
                probes: Semaphore::new(options.max_probes.max(1)),
                scripts: Semaphore::new(options.max_scripts.max(1)),
                notifies: Arc::new(Notifies::new(options.max_notifies)),
                options,
                prober: Box::new(prober),
                not_run: Mutex::default(),
            }),
            checks: HashMap::new(),
        }
    }

    /// Makes `checks` the running set: new ones start, missing ones stop, changed ones restart.
    /// A change of `alpha` alone is no change: it only says how a new check starts.
    /// A changed check of the same kind keeps its state (health, counters; thresholds updated,
    /// and the weight a script set is dropped once `dynamic_weight` is off); one whose kind
    /// changed starts afresh, as a new check would (up, down with alpha; `none`: up). Unchanged
    /// ones go on untouched. Duplicated keys: the last wins.
    pub fn set(&mut self, checks: impl IntoIterator<Item = CheckConfig>) {
        let mut wanted: HashMap<CheckKey, CheckConfig> = HashMap::new();
        for c in checks {
            wanted.insert(c.key.clone(), c);
        }
        self.checks.retain(|key, _| wanted.contains_key(key));
        for (key, config) in wanted {
            self.add(config);
            debug_assert!(self.checks.contains_key(&key));
        }
    }

    /// Adds a check, or replaces the one with the same key (see [`Self::set`]).
    pub fn add(&mut self, config: CheckConfig) {
        let key = config.key.clone();
        let state = match self.checks.remove(&key) {
            // `alpha` only says how a check starts: a running one goes on.
            Some(mut old) if same_but_alpha(&old.config, &config) => {
                old.config = config;
                self.checks.insert(key, old);
                return;
            }
            // The same kind of probe: what it found still holds. A copy, changed for the new
            // config: the old check's own state stays as it was, for a refused reload to go back
            // to (`restore`).
            Some(old) if old.config.check.kind() == config.check.kind() => {
                let mut st = retire(&old.state, &old.retired);
                let timing = config.check.timing;
                st.set_thresholds(timing.rise, timing.fall);
                if !dynamic_weight(&config.check) {
                    st.clear_weight();
                }
                Arc::new(Mutex::new(st))
            }
            // Another kind (or a new check): the old results say nothing about the new probe.
            _ => fresh_state(&config),
        };
        let retired = Arc::new(AtomicBool::new(false));
        let task = (config.check.probe != ProbeKind::None)
            .then(|| tokio::spawn(run(self.shared.clone(), config.clone(), state.clone(), retired.clone())));
        self.checks.insert(
            key,
            Running {
                config,
                state,
                retired,
                task,
            },
        );
    }

    /// Stops a check; false if there was none.
    pub fn remove(&mut self, key: &CheckKey) -> bool {
        self.checks.remove(key).is_some()
    }

    /// Every check with its config and state, to [`Self::restore`] after a refused reload.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint(self.checks.iter().map(|(k, r)| (k.clone(), (r.config.clone(), r.state.clone()))).collect())
    }

    /// Gives the checks that were stopped or restarted since `checkpoint` (a reload that was then
    /// refused, and [`Self::set`] back to the old checks) the state they had: a real server that
    /// was down stays down. A check that ran on throughout keeps its own, newer state. Matched by
    /// key and kind, not by the whole config: the old checks set back can differ from the
    /// checkpoint's in what lbd worked out since (the probes' source, when the interface's
    /// addresses changed).
    pub fn restore(&mut self, checkpoint: Checkpoint) {
        for (key, (config, old)) in checkpoint.0 {
            let Some(running) = self.checks.get(&key) else { continue };
            if running.config.check.kind() == config.check.kind() && !Arc::ptr_eq(&running.state, &old) {
                let state = old.lock().expect("check state lock").clone();
                *running.state.lock().expect("check state lock") = state;
            }
        }
    }

    /// Number of checks.
    pub fn len(&self) -> usize {
        self.checks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// Whether a real server is up, and its dynamic weight; `None` for a key without a check
    /// (not checked: up with its configured weight).
    pub fn health(&self, key: &CheckKey) -> Option<(bool, Option<u32>)> {
        let running = self.checks.get(key)?;
        let state = running.state.lock().expect("check state lock");
        Some((state.health() == Health::Up, state.weight()))
    }

    /// One check's status.
    pub fn status_of(&self, key: &CheckKey) -> Option<CheckStatus> {
        let now = Instant::now();
        self.checks.get(key).map(|r| status(key, r, now))
    }

    /// Every check's status, ordered by key.
    pub fn status(&self) -> Vec<CheckStatus> {
        let now = Instant::now();
        let sorted: BTreeMap<_, _> = self.checks.iter().collect();
        sorted
            .into_iter()
            .map(|(key, r)| status(key, r, now))
            .collect()
    }

    /// Before lbd exits (the runtime's end kills what still runs): waits for the notify commands
    /// running or queued, at most a notify command's timeout and a second, so that a
    /// `notify_down` or `quorum_down` started just before a stop is not cut off.
    pub async fn settle_notifies(&self) {
        let notifies = &self.shared.notifies;
        let busy = notifies.busy();
        if busy == 0 {
            return;
        }
        let limit = self.shared.options.notify_timeout + Duration::from_secs(1);
        info!(commands = busy, "waiting up to {} for notify commands to finish", format_duration(limit));
        if !notifies.settle(limit).await {
            warn!(commands = notifies.busy(), "notify commands still running at exit are killed");
        }
    }

    /// Runs a command (e.g. a virtual server's quorum up/down command) detached, with the
    /// scheduler's notify limits; see [`spawn_notify`].
    pub fn notify(&self, command: &CommandText, env: Vec<(String, String)>) {
        spawn_notify(
            self.shared.notifies.clone(),
            command.clone(),
            env,
            self.shared.options.notify_timeout,
        );
    }
}

/// Whether two configs of a check differ in `alpha` at most (every other field compared).
fn same_but_alpha(a: &CheckConfig, b: &CheckConfig) -> bool {
    let CheckConfig { key, check, target, alpha: _, was_down: _, notify_up, notify_down } = a;
    *key == b.key && *check == b.check && *target == b.target && *notify_up == b.notify_up && *notify_down == b.notify_down
}

/// The state a check starts in: up, or down until its first pass with `alpha` or when it was
/// down as lbd stopped (`none` is always up: it has no pass to wait for).
fn fresh_state(config: &CheckConfig) -> Arc<Mutex<CheckState>> {
    let timing = config.check.timing;
    let down = if config.check.probe == ProbeKind::None {
        None
    } else if config.was_down {
        Some("down when lbd stopped: not checked since")
    } else if config.alpha {
        Some("alpha: not checked yet")
    } else {
        None
    };
    Arc::new(Mutex::new(CheckState::starting(timing.rise, timing.fall, down.map(str::to_string), Instant::now())))
}

/// Whether the check's results set the real server's weight (`script` with `dynamic_weight`).
fn dynamic_weight(check: &HealthCheck) -> bool {
    matches!(&check.probe, ProbeKind::Script(s) if s.dynamic_weight)
}

fn status(key: &CheckKey, running: &Running, now: Instant) -> CheckStatus {
    CheckStatus {
        vip_key: key.vip_key.clone(),
        real_server_key: key.real_server_key.clone(),
        kind: running.config.check.kind(),
        state: running
            .state
            .lock()
            .expect("check state lock")
            .snapshot(now),
    }
}

/// Notify commands waiting to start, at most: beyond, new ones are dropped (and logged).
pub const MAX_WAITING_NOTIFIES: usize = 1024;

/// The notify commands' limits: `max_notifies` run at once, [`MAX_WAITING_NOTIFIES`] wait.
pub struct Notifies {
    permits: Semaphore,
    /// The number of permits: all free = no command running.
    size: u32,
    waiting: std::sync::atomic::AtomicUsize,
    dropped: std::sync::atomic::AtomicU64,
}

impl Notifies {
    pub fn new(max_notifies: usize) -> Self {
        let size = max_notifies.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)) as u32;
        Notifies { permits: Semaphore::new(size as usize), size, waiting: Default::default(), dropped: Default::default() }
    }

    /// Commands running or waiting to start.
    fn busy(&self) -> usize {
        self.size as usize - self.permits.available_permits() + self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (at most `limit`) until the commands running or waiting now have ended: the
    /// semaphore is fair, so taking every permit waits behind those queued first. False if some
    /// had not ended by then.
    pub async fn settle(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.permits.acquire_many(self.size)).await.is_ok_and(|p| p.is_ok())
    }
}

/// Runs `command` in a task of its own, at most `timeout` (then its process group is killed),
/// once a permit of `limits` is free; never waits for it. Its exit is logged. When
/// [`MAX_WAITING_NOTIFIES`] already wait (commands that hang until their timeout, with real
/// servers flapping), it is dropped instead: the queue, and lbd's memory, would grow for as long
/// as that lasts, and the commands run ever later.
pub fn spawn_notify(limits: Arc<Notifies>, command: CommandText, env: Vec<(String, String)>, timeout: Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    let shown = match &command {
        CommandText::Shell(line) => line.clone(),
        CommandText::Argv(argv) => argv.join(" "),
    };
    if limits.waiting.fetch_update(Relaxed, Relaxed, |n| (n < MAX_WAITING_NOTIFIES).then_some(n + 1)).is_err() {
        let dropped = limits.dropped.fetch_add(1, Relaxed) + 1;
        if dropped % 100 == 1 {
            warn!(
                command = %shown,
                dropped,
                "notify commands are backing up ({MAX_WAITING_NOTIFIES} wait to start): not running this one"
            );
        }
        return;
    }
    tokio::spawn(async move {
        let permit = limits.permits.acquire().await;
        limits.waiting.fetch_sub(1, Relaxed);
        let Ok(_permit) = permit else {
            return;
        };
        let mut cmd = check::command(&command);
        cmd.envs(env);
        match check::run_bounded(cmd, timeout).await {
            Ok(status) if status.success() => debug!(command = %shown, "notify command done"),
            Ok(status) => warn!(command = %shown, %status, "notify command failed"),
            Err(reason) => warn!(command = %shown, %reason, "notify command failed"),
        }
    });
}

async fn run(shared: Arc<Shared>, config: CheckConfig, state: Arc<Mutex<CheckState>>, retired: Arc<AtomicBool>) {
    let timing = config.check.timing;
    let warmup_nanos = timing.warmup.as_nanos().min(u128::from(u64::MAX)) as u64;
    tokio::time::sleep(Duration::from_nanos(fastrand::u64(0..=warmup_nanos))).await;
    let mut ticker = tokio::time::interval(timing.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let is_script = config.check.kind() == CheckKind::Script;
    // The MAC comes with a new config (another task), so it is unknown for this task's life.
    let mac_unresolved = config.check.via == Via::Vip
        && config.target.vip.is_some_and(|path| path.dst_mac.is_none());
    let started = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        let result = if mac_unresolved {
            if started.elapsed() < MAC_GRACE {
                debug!(vip = %config.key.vip_key, real_server = %config.key.real_server_key, "check skipped: real server MAC not resolved yet");
                continue;
            }
            ProbeResult {
                ok: false,
                reason: format!(
                    "real server MAC unresolved (no ARP or neighbour answer from {} within {}): cannot send \
                     through the VIP",
                    config.target.addr,
                    format_duration(MAC_GRACE)
                ),
                weight: None,
                latency: Duration::ZERO,
                attempts: 1,
                not_run: false,
            }
        } else {
            // Permits are taken per attempt: a check that failed and waits `retry_delay` for its
            // retry holds none, so when many real servers fail at once (a rack goes down) the
            // others' checks still run on time.
            check::retrying(&config.check.timing, || async {
                let _script = if is_script { shared.scripts.acquire().await.ok() } else { None };
                let _probe = shared.probes.acquire().await;
                check::timed(shared.prober.attempt(&config.check, &config.target)).await
            })
            .await
        };
        if !report(&shared, &config, &state, &retired, result).await {
            return;
        }
    }
}

/// Records a check's result in its state, and for a change logs it, tells the controller and
/// runs the notify command. False: the check is over (retired, or the controller gone). A check
/// that could not run (lbd out of descriptors) is no result: it is logged (see [`NotRunLog`]),
/// and its real server keeps its state.
async fn report(shared: &Shared, config: &CheckConfig, state: &Mutex<CheckState>, retired: &AtomicBool, result: ProbeResult) -> bool {
    {
        let mut log = shared.not_run.lock().expect("not-run log lock");
        if result.not_run {
            log.not_run(tokio::time::Instant::now(), &config.key, &result.reason);
            return !retired.load(std::sync::atomic::Ordering::Relaxed);
        }
        log.ran();
    }
    // The event goes into the controller's channel before the state lock is released: whoever
    // reads the new state (the controller, for `lbd status` or a table) finds its event
    // already waiting, and the controller applies waiting events before answering a status.
    let (unsent, notify, up, reason) = {
        let mut st = state.lock().expect("check state lock");
        if retired.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let transition = st.record(Instant::now(), &result);
        if !result.ok {
            debug!(vip = %config.key.vip_key, real_server = %config.key.real_server_key, reason = %result.reason, "check failed");
        }
        let Some(transition) = transition else {
            return true;
        };
        let key = &config.key;
        let event = |up: bool, reason: String, weight: Option<u32>| HealthEvent {
            vip_key: key.vip_key.clone(),
            real_server_key: key.real_server_key.clone(),
            up,
            reason,
            weight,
        };
        let (event, notify) = match transition {
            Transition::Down { reason } => {
                warn!(vip = %key.vip_key, real_server = %key.real_server_key, %reason, "real server down");
                (event(false, reason, None), config.notify_down.as_ref())
            }
            Transition::Up { reason, weight } => {
                info!(vip = %key.vip_key, real_server = %key.real_server_key, %reason, "real server up");
                (event(true, reason, weight), config.notify_up.as_ref())
            }
            Transition::Weight { weight, reason } => {
                info!(vip = %key.vip_key, real_server = %key.real_server_key, weight, %reason, "real server weight changed");
                (event(true, reason, Some(weight)), None)
            }
        };
        let (up, reason) = (event.up, event.reason.clone());
        let unsent = match shared.events.try_send(event) {
            Ok(()) => None,
            // A full channel (thousands of changes at once): wait for room, outside the lock.
            Err(mpsc::error::TrySendError::Full(event)) => Some(event),
            Err(mpsc::error::TrySendError::Closed(_)) => return false, // the controller is gone
        };
        (unsent, notify, up, reason)
    };
    let key = &config.key;
    if let Some(command) = notify {
        let env = vec![
            ("LBD_VIP".to_string(), key.vip_key.clone()),
            ("LBD_RS".to_string(), key.real_server_key.clone()),
            (
                "LBD_STATE".to_string(),
                if up { "up" } else { "down" }.to_string(),
            ),
            ("LBD_REASON".to_string(), reason),
        ];
        spawn_notify(
            shared.notifies.clone(),
            command.clone(),
            env,
            shared.options.notify_timeout,
        );
    }
    if let Some(event) = unsent {
        if shared.events.send(event).await.is_err() {
            return false; // the controller is gone
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Results scripted per real server (pass when the script runs out), each taking `latency`;
    /// records when each probe started and how many ran at once.
    #[derive(Default)]
    struct Scripted {
        results: Mutex<HashMap<u16, VecDeque<Attempt>>>,
        starts: Mutex<Vec<(u16, tokio::time::Instant)>>,
        running: AtomicUsize,
        most: AtomicUsize,
        latency: Duration,
    }

    impl Prober for Arc<Scripted> {
        fn attempt<'a>(
            &'a self,
            _: &'a HealthCheck,
            target: &'a ProbeTarget,
        ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
            Box::pin(async move {
                // As the real probe does.
                if target.vip.is_some_and(|path| path.dst_mac.is_none()) {
                    return result(
                        false,
                        "real server MAC unresolved: cannot send through the VIP",
                        None,
                    );
                }
                self.starts
                    .lock()
                    .unwrap()
                    .push((target.port, tokio::time::Instant::now()));
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(self.latency).await;
                self.running.fetch_sub(1, Ordering::SeqCst);
                let next = self
                    .results
                    .lock()
                    .unwrap()
                    .get_mut(&target.port)
                    .and_then(VecDeque::pop_front);
                next.unwrap_or_else(|| result(true, "HTTP 200", None))
            })
        }
    }

    fn result(ok: bool, reason: &str, weight: Option<u32>) -> Attempt {
        Attempt { ok, reason: reason.into(), weight, not_run: false }
    }

    /// A check of real server `port` configured by `text`; without `retries` in it, with none,
    /// so that every scripted result is one check's result.
    fn config(port: u16, text: &str, alpha: bool) -> CheckConfig {
        let text = if text.contains("retries") { text.to_string() } else { format!("{text}\nretries = 0") };
        CheckConfig {
            key: key(port),
            check: HealthCheck::from_toml(&text, port).unwrap(),
            target: ProbeTarget {
                addr: "10.0.0.1".parse().unwrap(),
                port,
                source: None,
                vip: None,
            },
            alpha,
            was_down: false,
            notify_up: None,
            notify_down: None,
        }
    }

    fn key(port: u16) -> CheckKey {
        CheckKey {
            vip_key: "TCP 10.0.0.100:0".into(),
            real_server_key: format!("10.0.0.1:{port}"),
        }
    }

    fn scheduler(
        prober: &Arc<Scripted>,
        options: SchedulerOptions,
    ) -> (Scheduler, mpsc::Receiver<HealthEvent>) {
        let (tx, rx) = mpsc::channel(64);
        (Scheduler::with_prober(tx, options, prober.clone()), rx)
    }

    const TCP_1S: &str = "kind = \"tcp\"\ninterval = \"1s\"\nrise = 2\nfall = 2";

    /// A probe that finished while a reload replaced its check (the old task, on another thread,
    /// past its probe when aborted) changes nothing: no event, no log, no notify, and the new
    /// check's state does not miss it. The same result for the running check is reported.
    #[tokio::test(start_paused = true)]
    async fn a_result_of_a_replaced_check_is_dropped() {
        let prober = Arc::new(Scripted::default());
        let (mut s, mut rx) = scheduler(&prober, SchedulerOptions::default());
        let check = |timeout: &str| config(1, &format!("kind = \"tcp\"\ninterval = \"1h\"\nwarmup = \"1h\"\nfall = 1\ntimeout = \"{timeout}\""), false);
        let running = |s: &Scheduler| {
            let r = &s.checks[&key(1)];
            (r.state.clone(), r.retired.clone())
        };
        s.set([check("1s")]);
        let (old_state, old_retired) = running(&s);
        // A reload: the same kind of probe with another timeout, so the state is carried over.
        s.set([check("2s")]);
        let (new_state, new_retired) = running(&s);
        assert!(!Arc::ptr_eq(&old_state, &new_state));
        let failed = ProbeResult {
            ok: false,
            reason: "connection refused".into(),
            weight: None,
            latency: Duration::ZERO,
            attempts: 1,
            not_run: false,
        };
        assert!(!report(&s.shared, &check("1s"), &old_state, &old_retired, failed.clone()).await, "the old task ends");
        assert!(rx.try_recv().is_err(), "an event for the replaced check");
        assert!(old_state.lock().unwrap().is_up() && new_state.lock().unwrap().is_up());

        assert!(report(&s.shared, &check("2s"), &new_state, &new_retired, failed).await);
        assert_eq!(rx.try_recv().map(|e| (e.up, e.reason)), Ok((false, "connection refused".to_string())));
        // Removing a check retires it too.
        s.set([]);
        assert!(new_retired.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn events_follow_rise_and_fall() {
        let prober = Arc::new(Scripted::default());
        let fail = || result(false, "connection refused", None);
        prober.results.lock().unwrap().insert(
            1,
            [
                fail(),
                result(true, "connected", None),
                fail(),
                fail(),
                fail(),
            ]
            .into(),
        );
        let (mut s, mut rx) = scheduler(&prober, SchedulerOptions::default());
        s.set([config(1, TCP_1S, false)]);
        let down = rx.recv().await.unwrap();
        assert_eq!(
            down,
            HealthEvent {
                vip_key: key(1).vip_key,
                real_server_key: key(1).real_server_key,
                up: false,
                reason: "connection refused".into(),
                weight: None
            }
        );
        // Down after the 4th result (fail, pass, fail, fail): the flapping start changed nothing.
        assert_eq!(prober.starts.lock().unwrap().len(), 4);
        let st = s.status_of(&key(1)).unwrap();
        assert_eq!(
            (st.kind, st.state.state, st.state.consecutive_fails),
            (CheckKind::Tcp, Health::Down, 2)
        );
        let up = rx.recv().await.unwrap();
        assert_eq!((up.up, up.reason.as_str()), (true, "HTTP 200"));
        assert_eq!(
            prober.starts.lock().unwrap().len(),
            7,
            "fail, then two passes"
        );
        assert_eq!(s.health(&key(1)), Some((true, None)));
        assert_eq!(s.health(&key(9)), None);
    }

    /// Checks that could not run (lbd out of descriptors) take no real server down, and count
    /// nothing towards `fall`; the real failures around them do.
    #[tokio::test(start_paused = true)]
    async fn a_check_that_could_not_run_keeps_the_state() {
        let prober = Arc::new(Scripted::default());
        let fail = || result(false, "connection refused", None);
        let not_run = || Attempt { not_run: true, ..result(false, "too many open files", None) };
        prober.results.lock().unwrap().insert(1, [not_run(), not_run(), not_run(), fail(), not_run(), fail()].into());
        let (mut s, mut rx) = scheduler(&prober, SchedulerOptions::default());
        s.set([config(1, TCP_1S, false)]);
        let down = rx.recv().await.unwrap();
        assert_eq!((down.up, down.reason.as_str()), (false, "connection refused"));
        // Down at the 6th probe: the two failures, not the four checks that did not run.
        assert_eq!(prober.starts.lock().unwrap().len(), 6);
        let st = s.status_of(&key(1)).unwrap().state;
        assert_eq!((st.state, st.checks, st.consecutive_fails), (Health::Down, 2, 2));
    }

    /// The first check that could not run is a warning, the next ones within
    /// [`NOT_RUN_LOG_EVERY`] are not; a check that runs ends the episode.
    #[test]
    fn checks_that_could_not_run_are_logged_once_a_minute() {
        let mut log = NotRunLog::default();
        let t0 = tokio::time::Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert!(log.not_run(at(0), &key(1), "too many open files"));
        assert!(!log.not_run(at(1), &key(2), "too many open files"));
        assert!(!log.not_run(at(59), &key(1), "too many open files"));
        assert_eq!(log.since, 2);
        assert!(log.not_run(at(60), &key(1), "too many open files"));
        assert_eq!((log.since, log.open), (0, true));
        log.ran();
        assert!(!log.open);
        // Flapping: a new episode within the minute is counted, not logged.
        assert!(!log.not_run(at(61), &key(1), "too many open files"));
        assert!(log.not_run(at(120), &key(1), "too many open files"));
    }

    #[tokio::test(start_paused = true)]
    async fn warmup_spreads_the_first_probes_and_interval_holds() {
        let prober = Arc::new(Scripted::default());
        let (mut s, _rx) = scheduler(&prober, SchedulerOptions::default());
        let start = tokio::time::Instant::now();
        s.set((1..=200).map(|p| {
            config(
                p,
                "kind = \"tcp\"\ninterval = \"1s\"\nwarmup = \"1s\"",
                false,
            )
        }));
        tokio::time::sleep(Duration::from_millis(999)).await;
        let firsts: Vec<Duration> = prober
            .starts
            .lock()
            .unwrap()
            .iter()
            .map(|(_, t)| *t - start)
            .collect();
        // Within the warmup, spread over it: every tenth of the second got some, none got most.
        let mut buckets = [0usize; 10];
        for t in &firsts {
            buckets[(t.as_millis() / 100).min(9) as usize] += 1;
        }
        assert!(
            firsts.len() > 150,
            "{} of 200 started in the first second",
            firsts.len()
        );
        assert!(buckets.iter().all(|&n| n > 0 && n < 60), "{buckets:?}");
        // Then once per interval each.
        tokio::time::sleep(Duration::from_millis(5100)).await;
        let starts = prober.starts.lock().unwrap().clone();
        for p in 1..=200u16 {
            let times: Vec<_> = starts
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, t)| *t)
                .collect();
            assert!(
                (6..=7).contains(&times.len()),
                "port {p}: {} probes in 6 s",
                times.len()
            );
            for pair in times.windows(2) {
                assert_eq!(pair[1] - pair[0], Duration::from_secs(1), "port {p}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn probes_are_bounded() {
        let prober = Arc::new(Scripted {
            latency: Duration::from_millis(500),
            ..Default::default()
        });
        let options = SchedulerOptions {
            max_probes: 3,
            ..Default::default()
        };
        let (mut s, _rx) = scheduler(&prober, options);
        s.set((1..=20).map(|p| {
            config(
                p,
                "kind = \"tcp\"\ninterval = \"1s\"\nwarmup = \"0s\"",
                false,
            )
        }));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(prober.most.load(Ordering::SeqCst), 3);
        assert!(prober.starts.lock().unwrap().len() >= 15);
        // Most checks waited for a permit; the latency they report is the probe's own 500 ms.
        let latencies: Vec<f64> = (1..=20).filter_map(|p| s.status_of(&key(p))?.state.last_latency_ms).collect();
        assert!(latencies.len() >= 15, "{latencies:?}");
        assert!(latencies.iter().all(|&ms| ms == 500.0), "{latencies:?}");
    }

    /// With one probe permit, a real server that keeps failing and waits 5 s before each of
    /// its retries does not hold the permit while it waits: the other check still runs every
    /// second. (When the permit was held through the retries, it ran once in 6 s.)
    #[tokio::test(start_paused = true)]
    async fn a_check_waiting_to_retry_holds_no_probe_permit() {
        let prober = Arc::new(Scripted {
            latency: Duration::from_millis(10),
            ..Default::default()
        });
        let fails = (0..100).map(|_| result(false, "connection refused", None)).collect();
        prober.results.lock().unwrap().insert(1, fails);
        let options = SchedulerOptions {
            max_probes: 1,
            ..Default::default()
        };
        let (mut s, _rx) = scheduler(&prober, options);
        s.set([
            config(
                1,
                "kind = \"tcp\"\ninterval = \"1s\"\nwarmup = \"0s\"\nretries = 3\nretry_delay = \"5s\"",
                false,
            ),
            config(2, "kind = \"tcp\"\ninterval = \"1s\"\nwarmup = \"0s\"", false),
        ]);
        tokio::time::sleep(Duration::from_millis(6500)).await;
        let starts = prober.starts.lock().unwrap().clone();
        let of = |port| -> Vec<_> { starts.iter().filter(|(p, _)| *p == port).map(|(_, t)| *t).collect() };
        let (failing, other) = (of(1), of(2));
        assert_eq!(failing.len(), 2, "the failing check's attempts: {failing:?}");
        assert!(failing[1] - failing[0] >= Duration::from_secs(5), "{failing:?}");
        assert!((6..=7).contains(&other.len()), "the other check ran {} times in 6.5 s", other.len());
        for pair in other.windows(2) {
            assert!(pair[1] - pair[0] <= Duration::from_millis(1100), "{other:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reload_keeps_state_and_stops_removed_checks() {
        let prober = Arc::new(Scripted::default());
        prober
            .results
            .lock()
            .unwrap()
            .insert(1, (0..2).map(|_| result(false, "HTTP 503", None)).collect());
        let (mut s, mut rx) = scheduler(&prober, SchedulerOptions::default());
        s.set([
            config(1, TCP_1S, false),
            config(2, TCP_1S, false),
            config(3, "kind = \"none\"", true),
        ]);
        assert!(!rx.recv().await.unwrap().up);
        // `none` never probes and is up even with alpha.
        assert_eq!(s.health(&key(3)), Some((true, None)));
        // Same config again: nothing restarts. Changed thresholds: restarted, state kept.
        s.set([
            config(
                1,
                "kind = \"tcp\"\ninterval = \"1s\"\nrise = 5\nfall = 2",
                false,
            ),
            config(2, TCP_1S, false),
        ]);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.health(&key(1)),
            Some((false, None)),
            "still down after the reload"
        );
        assert_eq!(s.status_of(&key(3)), None);
        // Probes started so far against `port`.
        let count = |port| {
            prober
                .starts
                .lock()
                .unwrap()
                .iter()
                .filter(|(p, _)| *p == port)
                .count()
        };
        let before = count(1);
        // rise = 5 now: five passes (plus warmup) before it is up.
        let up = rx.recv().await.unwrap();
        assert!(up.up);
        assert_eq!(count(1) - before, 5);
        // Removing stops probing.
        assert!(s.remove(&key(2)));
        let n2 = count(2);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(count(2), n2);
        assert_eq!(s.status().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn another_kind_on_reload_starts_afresh() {
        let prober = Arc::new(Scripted::default());
        let fails = || {
            (0..100)
                .map(|_| result(false, "connection refused", None))
                .collect()
        };
        for port in 1..=3 {
            prober.results.lock().unwrap().insert(port, fails());
        }
        let (mut s, mut rx) = scheduler(&prober, SchedulerOptions::default());
        // 1 and 3 go down; 2 (alpha) never passes.
        s.set([
            config(1, TCP_1S, false),
            config(2, TCP_1S, true),
            config(3, TCP_1S, false),
        ]);
        for _ in 0..2 {
            assert!(!rx.recv().await.unwrap().up);
        }
        for port in 1..=3 {
            assert_eq!(s.health(&key(port)), Some((false, None)), "port {port}");
        }
        // `none` is up at once, as a new `none` check is; another probe starts as a new check
        // of that kind: up (down with alpha), no results yet.
        s.set([
            config(1, "kind = \"none\"", false),
            config(2, "kind = \"none\"", true),
            config(3, "kind = \"http\"\ninterval = \"1s\"", false),
        ]);
        for port in 1..=3 {
            assert_eq!(s.health(&key(port)), Some((true, None)), "port {port}");
        }
        let st = s.status_of(&key(3)).unwrap();
        assert_eq!(
            (st.kind, st.state.consecutive_fails, st.state.checks),
            (CheckKind::Http, 0, 0)
        );
        // And stays so: `none` never probes.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(s.health(&key(1)), Some((true, None)));
        assert_eq!(s.status_of(&key(1)).unwrap().state.checks, 0);
        // With alpha, the new kind waits for its first pass like any new check.
        s.set([config(3, TCP_1S, true)]);
        let st = s.status_of(&key(3)).unwrap();
        assert_eq!(
            (st.state.state, st.state.down_reason.as_deref()),
            (Health::Down, Some("alpha: not checked yet"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dynamic_weight_goes_with_dynamic_weight() {
        let prober = Arc::new(Scripted::default());
        let weighted = || result(true, "script exit 5 (weight 3)", Some(3));
        prober
            .results
            .lock()
            .unwrap()
            .insert(1, (0..100).map(|_| weighted()).collect());
        let (mut s, mut rx) = scheduler(&prober, SchedulerOptions::default());
        let script = |command: &str, dynamic: bool| {
            config(
                1,
                &format!(
                    "kind = \"script\"\ncommand = \"{command}\"\ndynamic_weight = {dynamic}\n\
                     interval = \"1h\"\nwarmup = \"0s\""
                ),
                false,
            )
        };
        s.set([script("x", true)]);
        assert_eq!(rx.recv().await.unwrap().weight, Some(3));
        // Another command, still dynamic: the weight stands until the script says otherwise.
        s.set([script("y", true)]);
        assert_eq!(s.health(&key(1)), Some((true, Some(3))));
        // `dynamic_weight` off: the configured weight again, at once.
        s.set([script("y", false)]);
        assert_eq!(s.health(&key(1)), Some((true, None)));
        assert_eq!(s.status_of(&key(1)).unwrap().state.weight, None);
        // Another kind: likewise.
        s.set([script("x", true)]);
        assert_eq!(rx.recv().await.unwrap().weight, Some(3));
        s.set([config(1, TCP_1S, false)]);
        assert_eq!(s.health(&key(1)), Some((true, None)));
    }

    /// A `via = "vip"` check of port 1 whose real server's MAC is `mac`.
    fn via_vip(mac: Option<[u8; 6]>, alpha: bool) -> CheckConfig {
        let mut c = config(
            1,
            "kind = \"tcp\"\nvia = \"vip\"\ninterval = \"1s\"\nwarmup = \"0s\"\nretries = 0\nrise = 1\nfall = 1",
            alpha,
        );
        c.target.vip = Some(check::VipPath {
            vip: "10.0.0.100".parse().unwrap(),
            ifindex: 2,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: mac,
        });
        c
    }

    #[tokio::test(start_paused = true)]
    async fn an_unresolved_mac_gives_no_result_for_a_while_then_fails() {
        // The real probes: an unresolved MAC fails at once, without touching the network.
        let (tx, mut rx) = mpsc::channel(64);
        let mut s = Scheduler::new(tx, SchedulerOptions::default());
        s.set([via_vip(None, false)]);
        tokio::time::sleep(MAC_GRACE - Duration::from_millis(100)).await;
        assert!(
            rx.try_recv().is_err(),
            "no result while the MAC may still come"
        );
        let st = s.status_of(&key(1)).unwrap().state;
        assert_eq!((st.state, st.checks, st.last_reason), (Health::Up, 0, None));
        // Never resolved: down, saying why.
        let down = rx.recv().await.unwrap();
        let reason =
            "real server MAC unresolved (no ARP or neighbour answer from 10.0.0.1 within 5s): \
                      cannot send through the VIP";
        assert_eq!((down.up, down.reason.as_str()), (false, reason));
        // With alpha it is down all along; the reason replaces "not checked yet".
        s.remove(&key(1));
        s.set([via_vip(None, true)]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let st = s.status_of(&key(1)).unwrap().state;
        assert_eq!(st.down_reason.as_deref(), Some("alpha: not checked yet"));
        tokio::time::sleep(MAC_GRACE).await;
        let st = s.status_of(&key(1)).unwrap().state;
        assert_eq!(
            (st.state, st.down_reason.as_deref()),
            (Health::Down, Some(reason))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_mac_resolved_in_time_costs_nothing() {
        let prober = Arc::new(Scripted::default());
        let (mut s, mut rx) = scheduler(&prober, SchedulerOptions::default());
        s.set([via_vip(None, false)]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        // What the controller does when the resolver reports the MAC.
        s.set([via_vip(Some([2, 0, 0, 0, 0, 0xb]), false)]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(rx.try_recv().is_err(), "never down");
        let st = s.status_of(&key(1)).unwrap().state;
        assert_eq!((st.state, st.last_ok), (Health::Up, Some(true)));
        assert!(st.checks >= 10);
    }

    #[tokio::test(start_paused = true)]
    async fn dynamic_weight_events() {
        let prober = Arc::new(Scripted::default());
        prober.results.lock().unwrap().insert(
            1,
            [result(true, "script exit 5 (weight 3)", Some(3))].into(),
        );
        let (mut s, mut rx) = scheduler(&prober, SchedulerOptions::default());
        s.set([config(
            1,
            "kind = \"script\"\ncommand = \"x\"\ndynamic_weight = true",
            false,
        )]);
        let ev = rx.recv().await.unwrap();
        assert_eq!(
            (ev.up, ev.weight, ev.reason.as_str()),
            (true, Some(3), "script exit 5 (weight 3)")
        );
        assert_eq!(s.health(&key(1)), Some((true, Some(3))));

        // A reload turning dynamic_weight off gives the configured weight back; refused, and
        // set back with the checkpoint restored, the script's weight is there again at once.
        let checkpoint = s.checkpoint();
        s.set([config(1, "kind = \"script\"\ncommand = \"x\"", false)]);
        assert_eq!(s.health(&key(1)), Some((true, None)));
        s.set([config(1, "kind = \"script\"\ncommand = \"x\"\ndynamic_weight = true", false)]);
        s.restore(checkpoint);
        assert_eq!(s.health(&key(1)), Some((true, Some(3))));
    }

    /// Notify commands that cannot start (every slot held, e.g. by commands hanging until their
    /// timeout) wait up to a bound; beyond it they are dropped, not queued without end.
    #[tokio::test]
    async fn waiting_notify_commands_are_bounded() {
        use std::sync::atomic::Ordering::Relaxed;
        let limits = Arc::new(Notifies::new(1));
        let held = limits.permits.acquire().await.unwrap();
        for _ in 0..MAX_WAITING_NOTIFIES + 10 {
            spawn_notify(limits.clone(), CommandText::Argv(vec!["true".into()]), vec![], Duration::from_secs(1));
        }
        assert_eq!(limits.waiting.load(Relaxed), MAX_WAITING_NOTIFIES);
        assert_eq!(limits.dropped.load(Relaxed), 10);
        drop(held);
    }

    /// At exit lbd waits for the notify commands running and queued (they would be killed), up
    /// to a bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settle_waits_for_running_and_queued_notify_commands() {
        let dir = std::env::temp_dir().join(format!("lbd-settle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let limits = Arc::new(Notifies::new(1));
        // One runs, one waits for it: both finish within the bound.
        for name in ["first", "second"] {
            let line = format!("sleep 0.2; touch {}", dir.join(name).display());
            spawn_notify(limits.clone(), CommandText::Shell(line), vec![], Duration::from_secs(5));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(limits.busy(), 2);
        assert!(limits.settle(Duration::from_secs(5)).await);
        assert!(dir.join("first").exists() && dir.join("second").exists());
        assert_eq!(limits.busy(), 0);
        // One that outlasts the bound: settle gives up.
        spawn_notify(limits.clone(), CommandText::Shell("sleep 5".into()), vec![], Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!limits.settle(Duration::from_millis(100)).await);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
