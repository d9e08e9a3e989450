//! Running notify and check commands: `/bin/sh -c`, bounded by a timeout, the whole process
//! group killed when it runs out or when the future is dropped (a reload stopping a check
//! script, a stop's deadline cutting notifies short): the health checks' [`run_bounded`]. Nothing
//! here ever blocks the state machine: notify commands run from a queue task per instance (in
//! order of the changes), check scripts from their own task.

use std::{fmt, os::unix::process::ExitStatusExt, time::Duration};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{engine::VrrpState, spec};
use crate::health::{
    check::{command, run_bounded, shell_exit_words, RunError},
    config::CommandText,
};

/// How a command ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exited with this status code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
    /// Still running at the timeout: killed.
    TimedOut,
    /// Could not be started (or waited for).
    NotStarted(String),
}

impl Outcome {
    pub fn success(&self) -> bool {
        *self == Outcome::Exited(0)
    }
}

/// In the words of the log: `exit 1`, `exit 127 (not found)`, `killed by signal 9`, ...
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Every command here is a shell line: 126 and 127 are the shell's.
            Outcome::Exited(code) => match shell_exit_words(*code) {
                Some(words) => write!(f, "exit {code} ({words})"),
                None => write!(f, "exit {code}"),
            },
            Outcome::Signaled(signal) => write!(f, "killed by signal {signal}"),
            Outcome::TimedOut => f.write_str("still running at its timeout: killed"),
            Outcome::NotStarted(reason) => write!(f, "not started: {reason}"),
        }
    }
}

/// Runs `cmd` by `/bin/sh -c`, with `args` as its positional parameters appended (`"$@"`), stdin
/// from /dev/null and output discarded (as keepalived does). Trailing blanks and newlines are
/// trimmed first, so that the arguments land on the command's own line; the config refuses the
/// lines they would still not reach (see `spec::generic_notify_problem`).
pub async fn run_shell(cmd: &str, args: &[String], timeout: Duration) -> Outcome {
    let line = if args.is_empty() { cmd.to_owned() } else { format!("{} \"$@\"", cmd.trim_end()) };
    let mut c = command(&CommandText::Shell(line));
    c.arg("sh").args(args);
    match run_bounded(c, timeout).await {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => Outcome::Exited(code),
            (None, Some(signal)) => Outcome::Signaled(signal),
            (None, None) => Outcome::NotStarted(status.to_string()),
        },
        Err(RunError::Timeout(_)) => Outcome::TimedOut,
        Err(RunError::Spawn(reason) | RunError::Wait(reason)) => Outcome::NotStarted(reason),
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
                warn!(name = %cmds.name, state = word, command = %c, %outcome, "notify command failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::check::testing::sleep_becomes;

    #[tokio::test]
    async fn outcomes_and_timeout() {
        let t = Duration::from_secs(5);
        assert_eq!(run_shell("exit 3", &[], t).await, Outcome::Exited(3));
        assert!(run_shell("true", &[], t).await.success());
        // What the warn lines say: the shell's own codes in words, the signal's number.
        let missing = run_shell("/nonexistent/notify.sh", &[], t).await;
        assert_eq!((&missing, missing.to_string().as_str()), (&Outcome::Exited(127), "exit 127 (not found)"));
        let not_executable = run_shell("/etc/passwd", &[], t).await;
        assert_eq!(not_executable.to_string(), "exit 126 (not executable)");
        let killed = run_shell("kill -TERM $$", &[], t).await;
        assert_eq!((&killed, killed.to_string().as_str()), (&Outcome::Signaled(15), "killed by signal 15"));
        let started = std::time::Instant::now();
        // The sleep in the background is in the same process group: killed with the shell.
        assert_eq!(run_shell("sleep 30 & sleep 30", &[], Duration::from_millis(200)).await, Outcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// A VRRP reload aborts a running vrrp_script, a stop's deadline its notifies: what the
    /// command started must die with it, not only `/bin/sh`.
    #[tokio::test]
    async fn a_dropped_command_takes_what_it_started_with_it() {
        // `; true` keeps the shell from exec'ing sleep: sleep is the shell's child.
        let seconds = format!("100.{}1", std::process::id());
        let line = format!("sleep {seconds}; true");
        let run = tokio::spawn(async move { run_shell(&line, &[], Duration::from_secs(60)).await });
        assert!(sleep_becomes(&seconds, true, Duration::from_secs(5)).await, "the command never started");
        run.abort();
        assert!(run.await.unwrap_err().is_cancelled());
        assert!(sleep_becomes(&seconds, false, Duration::from_secs(2)).await, "sleep {seconds} survived its command");
    }

    #[tokio::test]
    async fn a_timed_out_command_leaves_nothing_behind() {
        let seconds = format!("100.{}2", std::process::id());
        let outcome = run_shell(&format!("sleep {seconds}; true"), &[], Duration::from_millis(300)).await;
        assert_eq!(outcome, Outcome::TimedOut);
        assert!(sleep_becomes(&seconds, false, Duration::from_secs(2)).await, "sleep {seconds} survived the timeout");
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
            // The generic command gets keepalived's arguments appended, after trailing blanks
            // and newlines (a TOML multi-line string) are trimmed.
            generic: Some(format!("/bin/sh {} \n", generic.display())),
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
