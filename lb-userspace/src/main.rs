//! `lbd`: the director daemon and its command-line client.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_userspace::{
    config::Config,
    control::{self, Request},
    daemon,
    status::{self, count},
};

#[derive(Parser)]
#[command(name = "lbd", version, about = "Layer-4 DSR load balancer (XDP fast path, Maglev hashing)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the config, attach the fast path and run until SIGINT/SIGTERM (SIGHUP reloads).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file: prints FILE:LINE:COL: message and exits 2 when it is invalid.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show virtual servers, real servers and counters of the running daemon (like ipvsadm -Ln --stats).
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Ask the running daemon to reload its config (same as SIGHUP, but reports errors).
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Drain or re-enable a real server (like `ipvsadm -e ... -w 0`): a drained real server keeps
    /// its connections and gets no new ones, until enabled or a config change to it (a restart keeps it).
    Backend {
        #[command(subcommand)]
        action: BackendAction,
    },
    /// Remove the XDP fast path a stopped lbd left serving (kept, with its connection tables, for
    /// the next start to take over without dropping connections) and its state file.
    Detach {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum BackendAction {
    /// Weight 0: keep established flows, take no new ones.
    Drain(BackendArgs),
    /// Undo a drain: the configured weight applies again.
    Enable(BackendArgs),
}

#[derive(clap::Args)]
struct BackendArgs {
    /// The virtual server, ADDR:PORT (IPv6: [ADDR]:PORT), or fwmark:N for a firewall-mark one.
    vip: String,
    /// The real server, ADDR or ADDR:PORT.
    backend: String,
    /// Only the virtual server with this protocol (tcp or udp); default both.
    #[arg(long)]
    protocol: Option<String>,
    #[command(flatten)]
    target: Target,
}

#[derive(clap::Args)]
struct Target {
    /// Control socket of the daemon (default: from --config, else /run/lbd/lbd.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Take the control socket path from this config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> Result<PathBuf, String> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        match &self.config {
            // Only the socket matters here: a config with mistakes elsewhere still names it.
            Some(path) => match Config::load(path) {
                Ok(c) => Ok(c.director.control_socket),
                Err(e) => lb_userspace::config::control_socket_of(path).ok_or_else(|| e.to_string()),
            },
            None => Ok(PathBuf::from("/run/lbd/lbd.sock")),
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

/// Exit codes of the commands that talk to a running lbd (`status`, `reload`, `backend`), for
/// scripts: 1 lbd refused the request or did not answer, 2 a mistake in the config file (`lbd
/// reload`, as `lbd check`), 3 no lbd runs there (LSB's "program is not running"), 64 a
/// mistake on the command line (sysexits' EX_USAGE, for every command; clap's own 2 would read
/// as a mistake in the config).
const EXIT_FAILED: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_NOT_RUNNING: u8 = 3;
const EXIT_USAGE: u8 = 64;

/// A failed request: what to print and the exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn exit(self, command: &str) -> ExitCode {
        eprintln!("lbd {command}: {}", self.message);
        ExitCode::from(self.code)
    }
}

/// Sends `req`; lbd's reply, also as it sent it (for `status --json`).
fn client(target: &Target, req: Request) -> Result<(control::Response, serde_json::Value), Failure> {
    let socket = target.socket().map_err(|message| Failure { code: EXIT_CONFIG, message })?;
    let (resp, raw) = control::request_raw(&socket, &req).map_err(|e| Failure {
        code: if e.not_running() { EXIT_NOT_RUNNING } else { EXIT_FAILED },
        message: e.to_string(),
    })?;
    match resp.ok {
        true => Ok((resp, raw)),
        false => Err(Failure {
            code: if resp.config_error { EXIT_CONFIG } else { EXIT_FAILED },
            message: resp.error.unwrap_or_else(|| "request failed".into()),
        }),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version print to stdout and succeed.
            return if e.use_stderr() { ExitCode::from(EXIT_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    if !matches!(cli.command, Command::Run { .. }) {
        // The client commands end as other Unix tools do when their reader goes (`lbd status |
        // head`): Rust ignores SIGPIPE, and `print!` then panics (exit 101). The daemon keeps it
        // ignored: a client that hangs up is an error on its socket, not the end of lbd.
        // SAFETY: no other thread runs yet; SIG_DFL is a valid disposition for SIGPIPE.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                let rs: usize = c.virtual_servers.iter().map(|v| v.real_servers.len()).sum();
                let vrrp = match c.vrrp.instances.len() {
                    0 => String::new(),
                    n => format!(", {}", count(n, "VRRP instance")),
                };
                let (vs, rs) = (count(c.virtual_servers.len(), "virtual server"), count(rs, "real server"));
                for w in &c.warnings {
                    eprintln!("{w}");
                }
                let warnings = match c.warnings.len() {
                    0 => String::new(),
                    n => format!("; {}", count(n, "warning")),
                };
                println!("{}: OK ({vs}, {rs}{vrrp}){warnings}", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let level = match Config::load(&config) {
                Ok(c) => format!("{:?}", c.director.log_level).to_lowercase(),
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            init_logging(&level);
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(daemon::run(&config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    // A mistake in the config (an interface it names is missing): exit 2, as
                    // `lbd check` does, which systemd does not restart.
                    if e.chain().any(|c| c.is::<daemon::ConfigMistake>()) {
                        ExitCode::from(2)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            }
        }
        Command::Status { json, target } => match client(&target, Request::Status) {
            Ok((control::Response { status: Some(st), .. }, raw)) => {
                if json {
                    // lbd's own object: fields this client does not know are kept as sent.
                    println!("{}", serde_json::to_string_pretty(&raw["status"]).expect("status serializes"));
                } else {
                    print!("{}", status::render(&st));
                }
                ExitCode::SUCCESS
            }
            Ok(_) => Failure { code: EXIT_FAILED, message: "lbd answered without a status".into() }.exit("status"),
            Err(e) => e.exit("status"),
        },
        Command::Backend { action } => {
            let (args, drain) = match action {
                BackendAction::Drain(a) => (a, true),
                BackendAction::Enable(a) => (a, false),
            };
            let sel = control::BackendSelector { vip: args.vip, backend: args.backend, protocol: args.protocol };
            if let Err(message) = sel.parse() {
                return Failure { code: EXIT_USAGE, message }.exit("backend");
            }
            let req = if drain { Request::Drain(sel) } else { Request::Enable(sel) };
            match client(&args.target, req) {
                Ok((resp, _)) => {
                    println!("{}", resp.message.unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => e.exit("backend"),
            }
        }
        Command::Detach { target } => detach(&target),
        Command::Reload { target } => match client(&target, Request::Reload) {
            Ok((resp, _)) => {
                println!("{}", resp.message.as_deref().unwrap_or("reloaded"));
                ExitCode::SUCCESS
            }
            Err(e) => e.exit("reload"),
        },
    }
}

/// `lbd detach`: refused while an lbd answers on the socket (it would go on using what is
/// removed, and keeps it again when it stops). Exits 0 when nothing is kept (any more), 1 when
/// refused or removing failed, 2 for a config it cannot read the socket's path from.
fn detach(target: &Target) -> ExitCode {
    let socket = match target.socket() {
        Ok(s) => s,
        Err(message) => return Failure { code: EXIT_CONFIG, message }.exit("detach"),
    };
    // Held while removing: no lbd starts on the socket meanwhile, and one running (or stopping)
    // holds it already.
    let dir_exists = socket.parent().is_none_or(|d| d.as_os_str().is_empty() || d.is_dir());
    let _claim = match dir_exists.then(|| control::Claim::take(&socket)).transpose() {
        Ok(claim) => claim,
        Err(control::ControlError::Locked { path, lock }) => {
            eprintln!("lbd detach: an lbd is running on {path}; stop it first (what it keeps is removed after it stopped; it holds {lock})");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("lbd detach: {e}");
            return ExitCode::FAILURE;
        }
    };
    match control::request(&socket, &Request::Status) {
        // Nothing listens there.
        Err(e) if e.not_running() => {}
        // Not ours to look at (no permission, ...).
        Err(e @ (control::ControlError::Connect { .. } | control::ControlError::Denied { .. })) => {
            eprintln!("lbd detach: {e}");
            return ExitCode::FAILURE;
        }
        Ok(_) => {
            eprintln!("lbd detach: an lbd is running on {}; stop it first (what it keeps is removed after it stopped)", socket.display());
            return ExitCode::FAILURE;
        }
        // Something listens but did not answer: an lbd busy starting or reloading, whose fast
        // path must not be taken from under it.
        Err(e) => {
            eprintln!("lbd detach: {e}; something listens on {}: if it is an lbd, stop it first", socket.display());
            return ExitCode::FAILURE;
        }
    }
    let keep = lb_userspace::keep::Keep::for_socket(&socket);
    match keep.remove() {
        Ok(removed) if removed.is_empty() => {
            println!(
                "no XDP fast path kept for {} (lbd detach removes only that; IPVS services stay until ipvsadm removes them)",
                socket.display()
            );
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            println!("detached: the fast path kept for {} is gone", socket.display());
            for path in removed {
                println!("  removed {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lbd detach: removing what is kept in {}: {e}", keep.pin_dir.display());
            ExitCode::FAILURE
        }
    }
}
