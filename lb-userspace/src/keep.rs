//! What the XDP dataplane keeps when lbd stops, so that a restart (an upgrade, a changed
//! restart-only key) drops no connection, as IPVS mode's services stay in place:
//!
//! - the program's attachment, a BPF link pinned in bpffs: while no lbd runs, the program goes on
//!   forwarding with the last state. The next lbd loads its own program and maps, programs the
//!   whole config into them, and only then replaces the program in the link (`BPF_LINK_UPDATE`,
//!   atomic): no packet meets a half set-up program, or none;
//! - the connection tables, pinned: the next lbd's program uses the same ones;
//! - the counters (`GLOBAL_STATS`, `BACKEND_STATS`), pinned, so that `lbd status` and the
//!   metrics go on counting from where they were;
//! - in a state file beside the control socket: the tables' hash keys, and which (virtual server,
//!   real server) each backend id stood for with its generation, so that the next lbd gives each
//!   real server its old id and the entries stay valid;
//! - `xdp_pass` on the interfaces real servers sit behind (see `XdpDataplane::prepare_egress`),
//!   pinned the same way.
//!
//! `lbd detach` removes all of it.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::dataplane::VipAddr;

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` type of bpffs.
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;
/// Version of the state file's layout.
pub const STATE_FORMAT: u32 = 1;

/// The pins and the state file of one lbd, named by its control socket (as the IPVS state file
/// is): `/run/lbd/lbd.sock` keeps `/sys/fs/bpf/lbd/run-lbd-lbd_sock/` and
/// `/run/lbd/lbd.xdp-state.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keep {
    pub pin_dir: PathBuf,
    pub state_file: PathBuf,
}

/// What the state file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// `lb_common::CT_FORMAT` of the program that wrote the tables.
    pub ct_format: u32,
    /// Sets of each table (`lb_common::ct_sets` of `conntrack_size`).
    pub ct_sets: u32,
    /// The tables' set-hash keys (`CT_KEY4`, `CT_KEY6`).
    pub ct_key4: Vec<u64>,
    pub ct_key6: Vec<u64>,
    /// The interface the pinned link serves, and whether in native mode.
    pub interface: Option<String>,
    pub native: bool,
    /// The generation last given to each backend id (index: id), for every id handed out.
    pub generations: Vec<u32>,
    /// The ids in use.
    pub backends: Vec<KeptBackend>,
    /// What the pinned counters (`GLOBAL_STATS`, `BACKEND_STATS`) no longer hold: see
    /// [`KeptCounters`]. Absent in files of an lbd that did not keep its counters.
    #[serde(default)]
    pub counters: KeptCounters,
}

/// The part of lbd's figures kept outside the counter maps, as of the last `apply`: what reused
/// backend ids had counted before they were zeroed, and each virtual server's removed real
/// servers. Each as `[packets, bytes, new flows, new-flow bytes]` (`lb_common::Counters`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptCounters {
    pub zeroed: [u64; 4],
    pub retired: Vec<(VipAddr, [u64; 4])>,
}

/// A backend id in use: the real server `backend` (`BackendSpec::key`) of `vip`. Its generation
/// is `State::generations[id]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptBackend {
    pub vip: VipAddr,
    pub backend: String,
    pub id: u32,
}

impl Keep {
    /// What is kept for the lbd on `control_socket`. A relative path is taken from the current
    /// directory (`lbd detach --socket run/lbd.sock` finds what `lbd run` kept for
    /// `/srv/run/lbd.sock` from `/srv`), and `//` and `./` are dropped, so that one socket has one
    /// pin directory however it is written.
    pub fn for_socket(control_socket: &Path) -> Self {
        let control_socket = &std::path::absolute(control_socket).unwrap_or_else(|_| control_socket.to_path_buf());
        // bpffs refuses names with a '.'.
        let name = control_socket.to_string_lossy().trim_start_matches('/').replace('/', "-").replace('.', "_");
        Keep { pin_dir: Path::new(BPFFS).join("lbd").join(name), state_file: control_socket.with_extension("xdp-state.json") }
    }

    /// The pinned XDP link.
    pub fn link(&self) -> PathBuf {
        self.pin_dir.join("link")
    }

    /// A pinned map (`lb_common::map_names`).
    pub fn map(&self, name: &str) -> PathBuf {
        self.pin_dir.join(name)
    }

    /// The pinned link of `xdp_pass` on interface `ifindex`.
    pub fn pass(&self, ifindex: u32) -> PathBuf {
        self.pin_dir.join(format!("pass-{ifindex}"))
    }

    /// Checks that bpffs is mounted at [`BPFFS`] and creates the pin directory.
    pub fn prepare(&self) -> Result<(), String> {
        let fs = nix::sys::statfs::statfs(BPFFS).map_err(|e| format!("{BPFFS}: {e}"))?;
        if fs.filesystem_type().0 as u32 != BPF_FS_MAGIC {
            return Err(format!(
                "{BPFFS} is not a BPF file system (mount one: mount -t bpf bpf {BPFFS}; `ip netns exec` mounts a /sys of \
                 its own without one: enter the namespace with `nsenter --net=/var/run/netns/NAME` instead)"
            ));
        }
        std::fs::create_dir_all(&self.pin_dir).map_err(|e| format!("creating {}: {e}", self.pin_dir.display()))
    }

    /// Whether anything is kept: pins or the state file.
    pub fn exists(&self) -> bool {
        self.state_file.exists() || std::fs::read_dir(&self.pin_dir).is_ok_and(|mut d| d.next().is_some())
    }

    /// The state file: `None` if there is none.
    pub fn read(&self) -> Result<Option<State>, String> {
        let text = match std::fs::read_to_string(&self.state_file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", self.state_file.display())),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| format!("{}: {e}", self.state_file.display()))
    }

    /// The interface and mode (`true`: native) of the fast path kept here, if a link is pinned
    /// and the state file names them.
    pub fn attachment(&self) -> Option<(String, bool)> {
        if !self.link().exists() {
            return None;
        }
        let state = self.read().ok()??;
        Some((state.interface?, state.native))
    }

    /// Writes the state file (see [`replace_file`]).
    pub fn write(&self, state: &State) -> io::Result<()> {
        replace_file(&self.state_file, &serde_json::to_vec(state).map_err(io::Error::other)?)
    }

    /// Removes the pins (which detaches what their links kept attached and frees the tables) and
    /// the state file. Returns what was removed.
    pub fn remove(&self) -> io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        match std::fs::read_dir(&self.pin_dir) {
            Ok(dir) => {
                for entry in dir {
                    let path = entry?.path();
                    std::fs::remove_file(&path)?;
                    removed.push(path);
                }
                std::fs::remove_dir(&self.pin_dir)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match std::fs::remove_file(&self.state_file) {
            Ok(()) => removed.push(self.state_file.clone()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(removed)
    }
}

/// Writes `bytes` to `path` whole or not at all (a new file renamed over the old one, its
/// directory created if missing): lbd's state files, which a crash must not leave half written.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_control_socket() {
        let k = Keep::for_socket(Path::new("/run/lbd/lbd.sock"));
        assert_eq!(k.pin_dir, Path::new("/sys/fs/bpf/lbd/run-lbd-lbd_sock"));
        assert_eq!(k.state_file, Path::new("/run/lbd/lbd.xdp-state.json"));
        assert_eq!(k.link(), Path::new("/sys/fs/bpf/lbd/run-lbd-lbd_sock/link"));
        assert_eq!(k.pass(7), Path::new("/sys/fs/bpf/lbd/run-lbd-lbd_sock/pass-7"));
        // However the path is written, the same socket keeps in the same place.
        assert_eq!(Keep::for_socket(Path::new("/run/lbd//./lbd.sock")).pin_dir, k.pin_dir);
        let cwd = std::env::current_dir().unwrap();
        let relative = Keep::for_socket(Path::new("run/lbd.sock"));
        assert_eq!(relative.pin_dir, Keep::for_socket(&cwd.join("run/lbd.sock")).pin_dir);
        assert_eq!(relative.state_file, cwd.join("run/lbd.xdp-state.json"));
    }

    #[test]
    fn state_round_trips_and_remove_takes_everything() {
        let dir = std::env::temp_dir().join(format!("lbd-keep-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("pins")).unwrap();
        std::fs::write(dir.join("pins/link"), b"").unwrap();
        let k = Keep { pin_dir: dir.join("pins"), state_file: dir.join("lbd.xdp-state.json") };
        assert_eq!(k.read(), Ok(None));
        let state = State {
            format: STATE_FORMAT,
            ct_format: lb_common::CT_FORMAT,
            ct_sets: 1024,
            ct_key4: vec![1, 2, 3, 4, 5],
            ct_key6: vec![6; 11],
            interface: Some("eth0".into()),
            native: true,
            generations: vec![1, 2],
            backends: vec![KeptBackend {
                vip: VipAddr::new("10.0.0.100".parse().unwrap(), 80, crate::config::Protocol::Tcp),
                backend: "10.0.0.11:80".into(),
                id: 1,
            }],
            counters: KeptCounters {
                zeroed: [1, 2, 3, 4],
                retired: vec![(VipAddr::new("10.0.0.100".parse().unwrap(), 80, crate::config::Protocol::Tcp), [5, 6, 7, 8])],
            },
        };
        k.write(&state).unwrap();
        assert_eq!(k.read(), Ok(Some(state.clone())));
        assert!(k.exists());
        let removed = k.remove().unwrap();
        assert_eq!(removed, vec![dir.join("pins/link"), dir.join("lbd.xdp-state.json")]);
        assert!(!k.exists() && !k.pin_dir.exists());
        std::fs::write(&k.state_file, b"{not json").unwrap();
        assert!(k.read().unwrap_err().contains("lbd.xdp-state.json"));
        // A file of an lbd that did not keep counters reads with none.
        let mut old = serde_json::to_value(&state).unwrap();
        old.as_object_mut().unwrap().remove("counters");
        std::fs::write(&k.state_file, old.to_string()).unwrap();
        assert_eq!(k.read().unwrap().unwrap().counters, KeptCounters::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
