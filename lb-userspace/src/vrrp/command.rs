//! Running notify and check commands: `/bin/sh -c`, bounded by a timeout, the whole process
//! group killed when it runs out. Nothing here ever blocks the state machine: notify commands
//! run from a queue task per instance (in order of the changes), check scripts from their own
//! task.

use std::{process::Stdio, time::Duration};

use tokio::{process::Command, sync::mpsc};
use tracing::{debug, warn};

use super::{engine::VrrpState, spec};

/// How a command ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exited with this status code.
    Exited(i32),
    /// Killed by a signal.
    Signaled,
    /// Still running at the timeout: killed.
    TimedOut,
    /// Could not be started.
    NotStarted(String),
}

impl Outcome {
    pub fn success(&self) -> bool {
        *self == Outcome::Exited(0)
    }
}

/// Runs `cmd` by `/bin/sh -c`, with `args` as its positional parameters appended (`"$@"`), stdin
/// from /dev/null and output discarded (as keepalived does).
pub async fn run_shell(cmd: &str, args: &[String], timeout: Duration) -> Outcome {
    let script = if args.is_empty() { cmd.to_owned() } else { format!("{cmd} \"$@\"") };
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(script).arg("sh").args(args);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // Its own process group, so that a timeout kills what the script started too.
    c.process_group(0).kill_on_drop(true);
    let mut child = match c.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::NotStarted(e.to_string()),
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status.code().map_or(Outcome::Signaled, Outcome::Exited),
        Ok(Err(e)) => Outcome::NotStarted(e.to_string()),
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: signalling the process group we created.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            let _ = child.wait().await;
            Outcome::TimedOut
        }
    }
}

/// The notify commands of an instance or a sync group.
#[derive(Clone, Debug, Default)]
pub struct NotifyCommands {
    /// `INSTANCE` or `GROUP` (the first argument of the generic command).
    pub kind: &'static str,
    pub name: String,
    pub master: Option<String>,
    pub backup: Option<String>,
    pub fault: Option<String>,
    pub stop: Option<String>,
    pub generic: Option<String>,
    pub timeout: Duration,
}

impl NotifyCommands {
    /// `kind` is `INSTANCE` or `GROUP`; an unset timeout is [`spec::DEFAULT_NOTIFY_TIMEOUT`].
    pub fn new(kind: &'static str, name: &str, f: spec::NotifyFields<'_>) -> Self {
        NotifyCommands {
            kind,
            name: name.to_string(),
            master: f.master.clone(),
            backup: f.backup.clone(),
            fault: f.fault.clone(),
            stop: f.stop.clone(),
            generic: f.generic.clone(),
            timeout: f.timeout.map_or(spec::DEFAULT_NOTIFY_TIMEOUT, |d| d.0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.master.is_none() && self.backup.is_none() && self.fault.is_none() && self.stop.is_none() && self.generic.is_none()
    }
}

/// A state to notify; `Init` means STOP.
pub type NotifyMsg = (VrrpState, u8);

/// Runs the notify commands for each message in order; ends when the sender is dropped and the
/// queue is empty.
pub async fn notify_queue(cmds: NotifyCommands, mut rx: mpsc::UnboundedReceiver<NotifyMsg>) {
    while let Some((state, priority)) = rx.recv().await {
        let (specific, word) = match state {
            VrrpState::Master => (&cmds.master, "MASTER"),
            VrrpState::Backup => (&cmds.backup, "BACKUP"),
            VrrpState::Fault => (&cmds.fault, "FAULT"),
            VrrpState::Init => (&cmds.stop, "STOP"),
        };
        let mut runs = Vec::new();
        if let Some(c) = specific {
            runs.push((c, Vec::new()));
        }
        if let Some(c) = &cmds.generic {
            runs.push((c, vec![cmds.kind.to_owned(), cmds.name.clone(), word.to_owned(), priority.to_string()]));
        }
        for (c, args) in runs {
            let outcome = run_shell(c, &args, cmds.timeout).await;
            if outcome.success() {
                debug!(name = %cmds.name, state = word, command = %c, "notify command done");
            } else {
                warn!(name = %cmds.name, state = word, command = %c, ?outcome, "notify command failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outcomes_and_timeout() {
        let t = Duration::from_secs(5);
        assert_eq!(run_shell("exit 3", &[], t).await, Outcome::Exited(3));
        assert!(run_shell("true", &[], t).await.success());
        let started = std::time::Instant::now();
        // The sleep in the background is in the same process group: killed with the shell.
        assert_eq!(run_shell("sleep 30 & sleep 30", &[], Duration::from_millis(200)).await, Outcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn notify_runs_specific_then_generic_with_keepalived_arguments() {
        let dir = std::env::temp_dir().join(format!("lbd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let generic = dir.join("generic.sh");
        std::fs::write(&generic, format!("#!/bin/sh\necho \"$*\" >> {}\n", log.display())).unwrap();
        let cmds = NotifyCommands {
            kind: "INSTANCE",
            name: "VI_1".into(),
            master: Some(format!("echo master >> {}", log.display())),
            stop: Some(format!("echo stop >> {}", log.display())),
            // The generic command gets keepalived's arguments appended.
            generic: Some(format!("/bin/sh {}", generic.display())),
            timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send((VrrpState::Backup, 100)).unwrap();
        tx.send((VrrpState::Master, 150)).unwrap();
        tx.send((VrrpState::Init, 150)).unwrap();
        drop(tx);
        notify_queue(cmds, rx).await;
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, "INSTANCE VI_1 BACKUP 100\nmaster\nINSTANCE VI_1 MASTER 150\nstop\nINSTANCE VI_1 STOP 150\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
