//! The `lbd` command line as an operator meets it (no root needed).

use std::process::Command;

fn lbd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lbd")).args(args).output().expect("run lbd");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn check_accepts_the_shipped_configs() {
    for name in ["rig.toml", "example.toml"] {
        let path = format!("{}/../config/{name}", env!("CARGO_MANIFEST_DIR"));
        let (code, out, err) = lbd(&["check", "--config", &path]);
        assert_eq!(code, 0, "{name}: {err}");
        assert!(out.starts_with(&format!("{path}: OK (")), "{out}");
    }
}

#[test]
fn check_reports_file_line_col_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("lbd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[director]\ninterface = \"eth0\"\n\n[[virtual_server]]\naddress = \"10.0.0.300\"\nport = 80\n").unwrap();
    let (code, out, err) = lbd(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert_eq!(out, "");
    assert!(err.starts_with(&format!("{}:5:11: invalid IP address", path.display())), "{err}");
    let (code, _, err) = lbd(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "run refuses a bad config before touching anything: {err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// No lbd runs there: exit 3 (LSB's "program is not running"), for every command that asks one.
#[test]
fn status_without_a_daemon_says_what_to_do() {
    let (code, _, err) = lbd(&["status", "--socket", "/nonexistent/lbd.sock"]);
    assert_eq!(code, 3);
    assert!(err.starts_with("lbd status: cannot reach lbd at /nonexistent/lbd.sock"), "{err}");
    assert!(err.contains("is `lbd run` running?"), "{err}");
    for args in [&["reload"][..], &["backend", "drain", "10.0.0.100:80", "10.0.0.11"]] {
        let (code, _, err) = lbd(&[args, &["--socket", "/nonexistent/lbd.sock"]].concat());
        assert_eq!(code, 3, "{args:?}: {err}");
        assert!(err.starts_with(&format!("lbd {}: cannot reach lbd at /nonexistent/lbd.sock", args[0])), "{err}");
    }
}

/// One lbd on `sock` that answers one request with `reply` (none when `None`: it holds the
/// connection for `hold`); gives the request it got.
fn fake_lbd(sock: &std::path::Path, reply: Option<String>, hold: std::time::Duration) -> std::thread::JoinHandle<String> {
    let _ = std::fs::remove_file(sock);
    let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = String::new();
        std::io::BufReader::new(&conn).read_line(&mut request).unwrap();
        match reply {
            Some(reply) => conn.write_all(format!("{reply}\n").as_bytes()).unwrap(),
            None => std::thread::sleep(hold),
        }
        request
    })
}

/// What lbd answers decides the exit code: a reload refused for a mistake in the config exits 2
/// (as `lbd check`), any other refusal 1; a script tells them apart without parsing messages.
#[test]
fn a_refused_request_exits_1_and_a_refused_config_2() {
    let dir = std::env::temp_dir().join(format!("lbd-cli-refused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("lbd.sock");
    let cases = [
        (&["reload"][..], r#"{"ok":false,"error":"lbd.toml:3:1: unknown key `tabel_size` in [director]","config_error":true}"#, 2, "lbd reload: lbd.toml:3:1: unknown key `tabel_size` in [director]"),
        (&["reload"][..], r#"{"ok":false,"error":"programming the dataplane: out of memory"}"#, 1, "lbd reload: programming the dataplane: out of memory"),
        (&["backend", "drain", "10.0.0.100:80", "10.0.0.11"][..], r#"{"ok":false,"error":"no real server 10.0.0.11 in 10.0.0.100:80"}"#, 1, "lbd backend: no real server 10.0.0.11 in 10.0.0.100:80"),
        (&["reload"][..], r#"{"ok":true}"#, 0, ""),
        (&["status"][..], r#"{"ok":true}"#, 1, "lbd status: lbd answered without a status"),
    ];
    for (args, reply, want, message) in cases {
        let fake = fake_lbd(&sock, Some(reply.to_string()), Default::default());
        let (code, _, err) = lbd(&[args, &["--socket", sock.to_str().unwrap()]].concat());
        let request = fake.join().unwrap();
        assert_eq!(code, want, "{args:?} answered {reply}: {err}");
        assert_eq!(err.trim_end(), message, "{args:?}: {request}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A mistake on the command line exits 64 (EX_USAGE), before anything is asked, whether or not
/// an lbd runs: never 2, which says the config file has a mistake. `--help` exits 0.
#[test]
fn a_mistake_on_the_command_line_exits_64() {
    let sock = "/nonexistent/lbd.sock";
    let cases: [(&[&str], &str); 6] = [
        (&["reload", "--sockt", sock], "unexpected argument '--sockt'"),
        (&["stat"], "unrecognized subcommand 'stat'"),
        (&["backend", "drain", "10.0.0.100", "10.0.0.11", "--socket", sock], "lbd backend: `10.0.0.100` is not ADDR:PORT ([ADDR]:PORT for IPv6) or fwmark:N of a virtual server"),
        (&["backend", "enable", "10.0.0.100:80", "10.0.0.11:x", "--socket", sock], "lbd backend: `10.0.0.11:x` is not ADDR or ADDR:PORT ([ADDR]:PORT for IPv6) of a real server"),
        (&["backend", "drain", "10.0.0.100:80", "10.0.0.11", "--protocol", "sctp", "--socket", sock], "lbd backend: unknown protocol `sctp`; expected tcp or udp"),
        (&["backend", "drain", "fwmark:5/inet6", "10.0.0.11", "--socket", sock], "lbd backend: `fwmark:5/inet6` is not fwmark:N (N from 1), fwmark:N/ipv4 or fwmark:N/ipv6"),
    ];
    for (args, message) in cases {
        let (code, out, err) = lbd(args);
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains(message), "{args:?}: {err}");
        assert_eq!(out, "", "{args:?}");
    }
    let (code, out, _) = lbd(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Usage: lbd"), "{out}");
}

/// `lbd status --json` prints lbd's object as lbd sent it: a field this client does not know (an
/// lbd of a newer version, during an upgrade) is not dropped, and none is made up. `lbd reload`
/// says which file lbd read again.
#[test]
fn status_json_is_lbds_own_object_and_reload_names_the_file() {
    let dir = std::env::temp_dir().join(format!("lbd-cli-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("lbd.sock");
    let mut status = serde_json::to_value(lb_userspace::status::Status::default()).unwrap();
    status["added_later"] = serde_json::json!({"x": 1});
    let reply = serde_json::json!({"ok": true, "status": status}).to_string();
    let fake = fake_lbd(&sock, Some(reply), Default::default());
    let (code, out, err) = lbd(&["status", "--json", "--socket", sock.to_str().unwrap()]);
    fake.join().unwrap();
    assert_eq!(code, 0, "{err}");
    let printed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(printed, status);

    let fake = fake_lbd(&sock, Some(r#"{"ok":true,"message":"reloaded /etc/lbd/lbd.toml"}"#.into()), Default::default());
    let (code, out, err) = lbd(&["reload", "--socket", sock.to_str().unwrap()]);
    fake.join().unwrap();
    assert_eq!((code, out.as_str()), (0, "reloaded /etc/lbd/lbd.toml\n"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `lbd status | head` ends quietly when the reader goes, as ipvsadm does: killed by SIGPIPE, not
/// a panic with exit 101 ("failed printing to stdout").
#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = std::env::temp_dir().join(format!("lbd-cli-pipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("lbd.sock");
    let mut status = serde_json::to_value(lb_userspace::status::Status::default()).unwrap();
    // More than a pipe holds, so the write meets the closed pipe.
    status["added_later"] = serde_json::json!("x".repeat(1 << 20));
    let reply = serde_json::json!({"ok": true, "status": status}).to_string();
    let fake = fake_lbd(&sock, Some(reply), Default::default());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lbd"))
        .args(["status", "--json", "--socket", sock.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    fake.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {err}", out.status);
    assert!(err.is_empty(), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An lbd that takes the request and does not answer within 10 s: exit 1, saying so (not "os
/// error 11"), and that the request may still be carried out.
#[test]
fn no_answer_within_10_s_says_so() {
    let dir = std::env::temp_dir().join(format!("lbd-cli-slow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("lbd.sock");
    let fake = fake_lbd(&sock, None, std::time::Duration::from_secs(12));
    let (code, _, err) = lbd(&["reload", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "lbd reload: lbd at {} did not answer within 10 s (it may still be working on the request: `lbd status` answers once it is done)",
            sock.display()
        )
    );
    fake.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--config` only needs the socket: a config with a mistake elsewhere (being edited while lbd
/// runs the one before) still gets to the daemon; one that is not TOML says why.
#[test]
fn status_with_a_config_being_edited_still_finds_the_socket() {
    let dir = std::env::temp_dir().join(format!("lbd-cli-edit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("editing.toml");
    std::fs::write(
        &path,
        "[director]\ninterface = \"eth0\"\ncontrol_socket = \"/nonexistent/lbd-edit.sock\"\n\n[[virtual_server]]\n\
         address = \"10.0.0.100\"\nport = 80\n[[virtual_server.real_server]]\naddress = \"10.0.0.11\"\nweight = -1\n",
    )
    .unwrap();
    let (code, _, err) = lbd(&["status", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 3);
    assert!(err.starts_with("lbd status: cannot reach lbd at /nonexistent/lbd-edit.sock"), "{err}");
    std::fs::write(&path, "[director\n").unwrap();
    let (code, _, err) = lbd(&["status", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.starts_with(&format!("lbd status: {}:1:", path.display())), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The shipped unit keeps `/run/lbd` when lbd stops: in IPVS mode the services lbd created stay
/// in the kernel, and the file beside the control socket that names them as lbd's must too (by
/// default systemd removes a `RuntimeDirectory` on every stop, restarts included).
#[test]
fn the_shipped_systemd_unit_keeps_the_ipvs_state_file_across_restarts() {
    let unit = std::fs::read_to_string(format!("{}/../config/lbd.service", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let setting = |key: &str| unit.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).map(str::trim);
    let state = lb_userspace::ipvs_dataplane::IpvsDataplane::state_file_for(std::path::Path::new(lb_userspace::config::DEFAULT_CONTROL_SOCKET));
    assert_eq!(state, std::path::Path::new("/run/lbd/lbd.ipvs-owned.json"));
    assert_eq!(setting("RuntimeDirectory"), Some("lbd"));
    assert_eq!(setting("RuntimeDirectoryPreserve"), Some("yes"), "systemd removes /run/lbd, and the state file, on each stop");
}

/// The shipped unit stops lbd with SIGTERM to lbd alone (`KillMode=mixed`): lbd waits for the
/// notify and quorum commands it runs at a stop, which the default, SIGTERM to the whole control
/// group at once, would cut off.
#[test]
fn the_shipped_systemd_unit_leaves_lbds_commands_to_lbd_at_a_stop() {
    let unit = std::fs::read_to_string(format!("{}/../config/lbd.service", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let setting = |key: &str| unit.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).map(str::trim);
    assert_eq!(setting("KillMode"), Some("mixed"));
    assert_eq!(setting("KillSignal"), Some("SIGTERM"));
}

/// `config/lbd.service` parses without a warning (`systemd-analyze verify`, with the unit's
/// binary path pointed at this build), and every command it runs is one lbd takes.
#[test]
fn the_shipped_systemd_unit_verifies_and_runs_real_commands() {
    let unit = std::fs::read_to_string(format!("{}/../config/lbd.service", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let bin = env!("CARGO_BIN_EXE_lbd");
    let dir = std::env::temp_dir().join(format!("lbd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lbd.service");
    std::fs::write(&path, unit.replace("/usr/local/sbin/lbd", bin)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze (Debian's systemd package; cargo xtask setup installs it)");
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    let execs: Vec<&str> = unit.lines().filter_map(|l| l.split_once('=')).filter(|(k, _)| k.starts_with("Exec")).map(|(_, v)| v).collect();
    assert_eq!(execs.len(), 2, "{execs:?}");
    for exec in execs {
        let mut words = exec.split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/sbin/lbd"));
        let args: Vec<&str> = words.chain(["--help"]).collect();
        let (code, out, err) = lbd(&args);
        assert_eq!(code, 0, "{exec}: {err}");
        assert!(out.contains("--config"), "{exec}: {out}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `lbd detach` leaves a socket's kept fast path alone while an lbd holds the socket's lock,
/// even when its socket file is gone or does not answer (an lbd starting or stopping).
#[test]
fn detach_leaves_a_claimed_socket_alone() {
    let dir = std::env::temp_dir().join(format!("lbd-cli-claimed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("lbd.sock");
    let claim = lb_userspace::control::Claim::take(&sock).unwrap();
    let (code, out, err) = lbd(&["detach", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let lock = dir.join("lbd.lock");
    assert_eq!(
        err,
        format!("lbd detach: an lbd is running on {}; stop it first (what it keeps is removed after it stopped; it holds {})\n", sock.display(), lock.display())
    );
    drop(claim);
    let (code, out, err) = lbd(&["detach", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `lbd detach` removes what a stopped lbd kept, never what a running one uses: one that does
/// not answer (busy starting or reloading) counts as running. Before, any failed status request
/// counted as "not running", and a busy lbd's pinned fast path was removed from under it.
#[test]
fn detach_leaves_a_socket_that_does_not_answer_alone() {
    let dir = std::env::temp_dir().join(format!("lbd-cli-detach-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("busy.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // Takes the request and hangs up without a reply.
    let busy = std::thread::spawn(move || drop(listener.accept().unwrap()));
    let (code, out, err) = lbd(&["detach", "--socket", sock.to_str().unwrap()]);
    busy.join().unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains(&format!("something listens on {}: if it is an lbd, stop it first", sock.display())), "{err}");
    assert_eq!(out, "");
    std::fs::remove_dir_all(&dir).unwrap();
}
