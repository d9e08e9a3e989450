//! Backend MAC resolution from the kernel neighbour (ARP/NDP) table, over rtnetlink.
//!
//! The director rewrites the destination MAC of VIP packets to the backend's MAC, so for every
//! backend `(ifindex, IP)` it needs the current link-layer address. This module reads it from the
//! kernel neighbour table with `neli` (never by running `ip`):
//!
//! * [`dump`], [`lookup`] and [`trigger`] are blocking one-shot helpers; each call opens its own
//!   rtnetlink socket.
//! * [`Resolver`] keeps a set of watched keys resolved and reports changes as [`NeighEvent`]s.
//!
//! A netlink socket belongs to the network namespace of the thread that creates it. Every socket
//! here is created by the calling thread ([`Resolver::start`] creates the resolver's sockets
//! before it spawns its worker), so call these from a thread inside the namespace whose
//! neighbour table you mean.

use std::{
    collections::{hash_map, HashMap},
    fmt, io,
    net::IpAddr,
    os::{fd::AsRawFd, unix::net::UnixDatagram},
    sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use neli::{
    consts::{
        nl::NlmF,
        rtnl::{Nda, Ntf, Nud, RtAddrFamily, RtScope, RtTable, Rta, Rtm, Rtn, Rtprot},
        socket::NlFamily,
    },
    err::SocketError,
    nl::{NlPayload, Nlmsghdr, NlmsghdrBuilder},
    rtnl::{Ndmsg, NdmsgBuilder, RtattrBuilder, Rtmsg, RtmsgBuilder},
    socket::synchronous::NlSocketHandle,
    types::{Buffer, RtBuffer},
    utils::Groups,
};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::{debug, error, warn};

/// An Ethernet MAC address.
pub type Mac = [u8; 6];

/// A neighbour table key: an IP address (v4 or v6) reached through interface `ifindex`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NeighKey {
    /// Index of the interface the address is reached through.
    pub ifindex: u32,
    /// The neighbour's IP address.
    pub addr: IpAddr,
}

impl fmt::Display for NeighKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on ifindex {}", self.addr, self.ifindex)
    }
}

/// A change of a watched key's MAC, reported by [`Resolver`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NeighEvent {
    /// The key has a usable MAC that differs from the last one reported (or none was known).
    Reachable {
        /// The watched key.
        key: NeighKey,
        /// Its current MAC.
        mac: Mac,
    },
    /// The key's entry was deleted or failed resolution; the resolver is re-resolving it.
    Gone {
        /// The watched key.
        key: NeighKey,
    },
    /// The key has had no usable MAC for [`UNRESOLVED_REPORT`] since it was watched or was
    /// [`Gone`](NeighEvent::Gone). Sent once per such stretch; the resolver keeps trying.
    Unresolved {
        /// The watched key.
        key: NeighKey,
        /// How the kernel routes the key's address, read when the event was sent.
        route: RouteTo,
    },
}

impl NeighEvent {
    /// The key the event is about.
    pub fn key(&self) -> NeighKey {
        match self {
            NeighEvent::Reachable { key, .. }
            | NeighEvent::Gone { key }
            | NeighEvent::Unresolved { key, .. } => *key,
        }
    }
}

/// How the kernel routes an address (`RTM_GETROUTE`, as `ip route get ADDR` shows it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteTo {
    /// On the link of interface `ifindex`, no gateway between.
    Direct {
        /// The interface the kernel sends it out of.
        ifindex: u32,
    },
    /// Through `gateway`.
    Gateway {
        /// The next hop.
        gateway: IpAddr,
        /// The interface the kernel sends it out of, if the reply says.
        ifindex: Option<u32>,
    },
    /// It is an address of this host.
    Local,
    /// The kernel has no usable route to it (or it is a broadcast, multicast or blackhole one);
    /// the reason, e.g. "Network is unreachable" or "route type 6".
    NoRoute(String),
    /// The lookup itself failed; why.
    Unknown(String),
}

/// Errors of neighbour table access.
#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    /// Creating or configuring an rtnetlink socket failed.
    #[error("cannot open rtnetlink socket: {0}")]
    Open(#[source] SocketError),
    /// Sending, receiving or decoding a netlink message failed.
    #[error("{op} for {target}: netlink I/O failed: {source}")]
    Netlink {
        /// The request, e.g. `RTM_GETNEIGH`.
        op: &'static str,
        /// What it was about, e.g. `10.0.0.2 on ifindex 3`.
        target: String,
        /// The underlying failure.
        #[source]
        source: SocketError,
    },
    /// The kernel rejected the request.
    #[error("{op} for {target}: kernel replied: {source}")]
    Kernel {
        /// The request, e.g. `RTM_GETNEIGH`.
        op: &'static str,
        /// What it was about, e.g. `10.0.0.2 on ifindex 3`.
        target: String,
        /// The errno the kernel returned.
        #[source]
        source: io::Error,
    },
    /// The resolver's worker thread or its wake-up channel could not be set up.
    #[error("cannot start neighbour resolver: {0}")]
    Start(#[source] io::Error),
}

/// Dumps the neighbour table (IPv4 and IPv6) of interface `ifindex`, or of all interfaces.
///
/// Returns only entries with a link-layer address (the kernel reports one only for `NUD_VALID`
/// states), each with its `NUD_*` state bits.
pub fn dump(ifindex: Option<u32>) -> Result<Vec<(NeighKey, Mac, u16)>, NeighError> {
    Ok(Rtnl::open()?
        .dump(ifindex)?
        .into_iter()
        .filter_map(|n| Some((n.key, n.mac?, n.state.bits())))
        .collect())
}

/// Returns the usable MAC of `key`: one in any `NUD_VALID` state (REACHABLE, STALE, DELAY,
/// PROBE, NOARP, PERMANENT), i.e. not INCOMPLETE, FAILED or NONE. `None` if there is no such
/// entry.
pub fn lookup(key: NeighKey) -> Result<Option<Mac>, NeighError> {
    Rtnl::open()?.lookup(key)
}

/// Asks the kernel to resolve `key` (ARP or NDP), like `ip neigh replace ADDR dev IF use`.
///
/// Sends `RTM_NEWNEIGH` with `NLM_F_CREATE`, `NTF_USE` and no link-layer address: the kernel
/// creates the entry if needed and runs `neigh_event_send`, which solicits an INCOMPLETE or
/// FAILED entry, re-probes a STALE one and leaves a REACHABLE one alone, without touching its
/// MAC. PERMANENT and NOARP entries are left untouched (`NTF_USE` would strip `NUD_PERMANENT`).
/// Returns once the kernel accepted the request, not when resolution completes.
pub fn trigger(key: NeighKey) -> Result<(), NeighError> {
    Rtnl::open()?.trigger(key)
}

/// Re-trigger delay of a key right after it is found unresolved; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest re-trigger delay of an unresolved key.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// How often a resolved key is re-probed ([`Rtnl::reprobe`]), counted from when it resolved and
/// not moved by the notifications in between. XDP forwards backend traffic without the kernel, so
/// its entries go STALE and stay so; re-probing makes the kernel ask the backend again, which
/// catches unannounced MAC changes (the old MAC no longer answers: the entry fails and is
/// resolved afresh) and keeps the entries from being garbage-collected (`gc_stale_time` is 60 s).
const REFRESH: Duration = Duration::from_secs(30);
/// How long a key may stay unresolved before [`NeighEvent::Unresolved`] reports it.
pub const UNRESOLVED_REPORT: Duration = Duration::from_secs(5);
/// Receive buffer of the notification socket. Should it overflow anyway, the resolver re-reads
/// every watched key.
const NOTIFY_RCVBUF: usize = 1 << 20;

/// Keeps watched neighbour keys resolved and reports their MAC changes.
///
/// A worker thread listens to `RTNLGRP_NEIGH` notifications and sends a [`NeighEvent`] whenever
/// a watched key gains a MAC or changes it ([`NeighEvent::Reachable`]) or its entry is deleted or
/// fails ([`NeighEvent::Gone`]), and once when a key stays unresolved for [`UNRESOLVED_REPORT`]
/// ([`NeighEvent::Unresolved`]). Notifications for keys not watched are ignored. An unresolved
/// key is re-triggered after 1 s, then with doubling delays capped at 5 s, until it resolves; a
/// resolved key is re-probed every 30 s after it resolved, whatever notifications come in between
/// (see [`REFRESH`]), so that unannounced MAC changes are noticed within about 40 s (30 s, the
/// kernel's first-probe delay, then its unicast probes failing). Dropping the resolver stops the
/// worker and closes the event channel.
pub struct Resolver {
    watched: Watched,
    commands: mpsc::Sender<Command>,
    wake: UnixDatagram,
    worker: Option<JoinHandle<()>>,
}

/// Watched keys and their last known usable MAC, shared with the worker.
type Watched = Arc<Mutex<HashMap<NeighKey, Option<Mac>>>>;

/// Requests to the worker.
enum Command {
    /// Look `key` up and trigger its resolution now.
    Watch(NeighKey),
    /// Exit.
    Stop,
}

impl Resolver {
    /// Starts the resolver in the calling thread's network namespace.
    ///
    /// Its netlink sockets are created (and the notification group joined) before this returns,
    /// so no change is missed between `start` and a later [`watch`](Self::watch). The receiver
    /// yields events until the resolver is dropped.
    pub fn start() -> Result<(Resolver, UnboundedReceiver<NeighEvent>), NeighError> {
        Resolver::start_refreshing(REFRESH)
    }

    /// [`start`](Self::start), re-probing resolved keys every `refresh` rather than [`REFRESH`].
    fn start_refreshing(
        refresh: Duration,
    ) -> Result<(Resolver, UnboundedReceiver<NeighEvent>), NeighError> {
        let notifications = NlSocketHandle::connect(
            NlFamily::Route,
            None,
            Groups::new_groups(&[libc::RTNLGRP_NEIGH]),
        )
        .map_err(NeighError::Open)?;
        notifications
            .set_recv_buffer_size(NOTIFY_RCVBUF)
            .map_err(NeighError::Open)?;
        set_nonblocking(&notifications).map_err(NeighError::Start)?;
        let rtnl = Rtnl::open()?;
        let (wake, wake_rx) = UnixDatagram::pair().map_err(NeighError::Start)?;
        for socket in [&wake, &wake_rx] {
            socket.set_nonblocking(true).map_err(NeighError::Start)?;
        }
        let (commands, command_rx) = mpsc::channel();
        let (events, event_rx) = unbounded_channel();
        let watched = Watched::default();
        let worker = Worker {
            notifications,
            rtnl,
            wake: wake_rx,
            commands: command_rx,
            watched: Arc::clone(&watched),
            events,
            schedule: HashMap::new(),
            refresh,
        };
        let worker = std::thread::Builder::new()
            .name("lbd-neigh".into())
            .spawn(move || worker.run())
            .map_err(NeighError::Start)?;
        let resolver = Resolver {
            watched,
            commands,
            wake,
            worker: Some(worker),
        };
        Ok((resolver, event_rx))
    }

    /// Starts watching `key`: the worker looks it up at once, emitting
    /// [`NeighEvent::Reachable`] if it has a usable MAC, and [`trigger`]s it (which resolves a
    /// missing entry and re-probes a STALE one), then keeps it resolved. Watching an already
    /// watched key does nothing.
    pub fn watch(&self, key: NeighKey) {
        if let hash_map::Entry::Vacant(slot) = lock(&self.watched).entry(key) {
            slot.insert(None);
            self.send(Command::Watch(key));
        }
    }

    /// Stops watching `key`; no events are sent for it afterwards.
    pub fn unwatch(&self, key: NeighKey) {
        lock(&self.watched).remove(&key);
    }

    /// The last usable MAC of watched `key`, or `None` if it is not watched, not resolved yet,
    /// or [`Gone`](NeighEvent::Gone). The resolver forgets the MAC on `Gone`; the daemon may
    /// keep forwarding to the last MAC it was told while re-resolution is under way.
    pub fn current(&self, key: NeighKey) -> Option<Mac> {
        lock(&self.watched).get(&key).copied().flatten()
    }

    fn send(&self, command: Command) {
        if self.commands.send(command).is_err() {
            warn!("neighbour resolver worker has stopped");
            return;
        }
        // WouldBlock means a wake-up is already pending, which is just as good.
        let _ = self.wake.send(&[0]);
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.send(Command::Stop);
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                error!("neighbour resolver worker panicked");
            }
        }
    }
}

/// When a watched key is next looked up and triggered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Schedule {
    due: Instant,
    /// Delay after the next attempt if the key is still unresolved then.
    backoff: Duration,
    /// The key is resolved and `due` is its next re-probe: notifications do not move it.
    refresh: bool,
    /// Since when the key has been unresolved, until [`NeighEvent::Unresolved`] reported it.
    unresolved_since: Option<Instant>,
}

impl Schedule {
    /// A key found unresolved at `now` (just watched, or gone): attempted at once.
    fn unresolved(now: Instant) -> Schedule {
        Schedule {
            due: now,
            backoff: FIRST_RETRY,
            refresh: false,
            unresolved_since: Some(now),
        }
    }

    /// A key resolved at `now`: re-probed `refresh` later.
    fn resolved(now: Instant, refresh: Duration) -> Schedule {
        Schedule {
            due: now + refresh,
            backoff: FIRST_RETRY,
            refresh: true,
            unresolved_since: None,
        }
    }

    /// The schedule of a key whose usable MAC went from `old` to `new` at `now`, given its
    /// `current` one; `None`: keep the current one. A resolved key keeps its refresh deadline:
    /// the notifications of its entry going REACHABLE, STALE, DELAY and back do not postpone it.
    fn after_change(
        current: Option<&Schedule>,
        old: Option<Mac>,
        new: Option<Mac>,
        now: Instant,
        refresh: Duration,
    ) -> Option<Schedule> {
        match (old, new) {
            (_, Some(_)) if current.is_some_and(|s| s.refresh) => None,
            (_, Some(_)) => Some(Schedule::resolved(now, refresh)),
            (Some(_), None) => Some(Schedule::unresolved(now)),
            (None, None) => None,
        }
    }

    /// Moves the schedule on after an attempt at `now`: a resolved key to its next refresh, an
    /// unresolved one by its backoff (doubling), but not past the time it is to be reported. A
    /// schedule already in the future (the attempt found the key resolved) stays.
    fn after_attempt(&mut self, now: Instant, refresh: Duration) {
        if self.due > now {
            return;
        }
        if self.refresh {
            self.due = now + refresh;
            return;
        }
        self.due = now + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_RETRY);
        if let Some(since) = self.unresolved_since {
            self.due = self.due.min((since + UNRESOLVED_REPORT).max(now));
        }
    }

    /// Whether an unresolved key is to be reported at `now`; true once per unresolved stretch.
    fn take_report(&mut self, now: Instant) -> bool {
        let due = self
            .unresolved_since
            .is_some_and(|since| now >= since + UNRESOLVED_REPORT);
        if due {
            self.unresolved_since = None;
        }
        due
    }
}

/// The resolver's worker thread state.
struct Worker {
    /// Non-blocking socket subscribed to `RTNLGRP_NEIGH`.
    notifications: NlSocketHandle,
    /// Request socket for lookups and triggers.
    rtnl: Rtnl,
    /// Readable when commands are pending.
    wake: UnixDatagram,
    commands: mpsc::Receiver<Command>,
    watched: Watched,
    events: UnboundedSender<NeighEvent>,
    /// Next attempt for every watched key; entries of unwatched keys are dropped lazily.
    schedule: HashMap<NeighKey, Schedule>,
    /// How often resolved keys are re-probed ([`REFRESH`] but in tests).
    refresh: Duration,
}

impl Worker {
    fn run(mut self) {
        loop {
            let mut fds = [pollin(&self.notifications), pollin(&self.wake)];
            // SAFETY: `fds` is an array of initialised pollfd structs that outlives the call.
            let ready = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    self.poll_timeout(),
                )
            };
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!(%err, "neighbour resolver: poll failed, stopping");
                return;
            }
            if fds[1].revents != 0 && !self.handle_commands() {
                return;
            }
            if fds[0].revents != 0 {
                self.read_notifications();
            }
            self.run_due();
        }
    }

    /// Milliseconds until the earliest scheduled attempt (rounded up), or -1 (none).
    fn poll_timeout(&self) -> libc::c_int {
        self.schedule
            .values()
            .map(|s| s.due)
            .min()
            .map_or(-1, |due| {
                let wait = due.saturating_duration_since(Instant::now());
                libc::c_int::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
            })
    }

    /// Executes pending commands; returns `false` when the worker must exit.
    fn handle_commands(&mut self) -> bool {
        let mut drain = [0u8; 64];
        while self.wake.recv(&mut drain).is_ok() {}
        loop {
            match self.commands.try_recv() {
                Ok(Command::Watch(key)) => {
                    self.schedule
                        .insert(key, Schedule::unresolved(Instant::now()));
                }
                Ok(Command::Stop) | Err(mpsc::TryRecvError::Disconnected) => return false,
                Err(mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    /// Applies every queued notification.
    fn read_notifications(&mut self) {
        loop {
            let updates = self
                .notifications
                .recv::<Rtm, Ndmsg>()
                .and_then(|(msgs, _)| {
                    msgs.map(|msg| msg.map(|msg| notification(&msg)))
                        .collect::<Result<Vec<_>, _>>()
                });
            match updates {
                Ok(updates) => {
                    for (key, mac) in updates.into_iter().flatten() {
                        self.set(key, mac);
                    }
                }
                Err(SocketError::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) => {
                    // Typically ENOBUFS: the kernel dropped notifications because we fell
                    // behind. Either way the notification stream can no longer be trusted.
                    warn!(%err, "neighbour notifications lost; re-reading watched entries");
                    let now = Instant::now();
                    for key in lock(&self.watched).keys() {
                        self.schedule
                            .entry(*key)
                            .or_insert_with(|| Schedule::unresolved(now))
                            .due = now;
                    }
                    return;
                }
            }
        }
    }

    /// Records `mac` (`None`: no usable MAC) as the state of `key`, reports a change to the
    /// daemon and schedules the key's next attempt. Ignores keys that are not watched.
    fn set(&mut self, key: NeighKey, mac: Option<Mac>) {
        let mut watched = lock(&self.watched);
        let Some(slot) = watched.get_mut(&key) else {
            self.schedule.remove(&key);
            return;
        };
        let old = std::mem::replace(slot, mac);
        let now = Instant::now();
        let next = Schedule::after_change(self.schedule.get(&key), old, mac, now, self.refresh);
        if let Some(next) = next {
            self.schedule.insert(key, next);
        }
        let event = match (old, mac) {
            (_, Some(mac)) => (old != Some(mac)).then_some(NeighEvent::Reachable { key, mac }),
            (Some(_), None) => Some(NeighEvent::Gone { key }),
            (None, None) => None,
        };
        if let Some(event) = event {
            debug!(?event, "neighbour change");
            // Sent under the lock, so `current` never contradicts the events already sent. An
            // error only means the daemon no longer listens.
            let _ = self.events.send(event);
        }
    }

    /// Makes an attempt for every key whose time has come.
    fn run_due(&mut self) {
        let now = Instant::now();
        let due: Vec<NeighKey> = self
            .schedule
            .iter()
            .filter(|(_, s)| s.due <= now)
            .map(|(key, _)| *key)
            .collect();
        for key in due {
            self.attempt(key);
        }
    }

    /// Re-reads `key` from the kernel table (in case a notification was missed), triggers its
    /// resolution (re-probes it, when its refresh is due), reports it if it has been unresolved
    /// too long, and backs off if it is still unresolved.
    fn attempt(&mut self, key: NeighKey) {
        if !lock(&self.watched).contains_key(&key) {
            self.schedule.remove(&key);
            return;
        }
        let refreshing = self.schedule.get(&key).is_some_and(|s| s.refresh);
        match self.rtnl.lookup(key) {
            Ok(mac) => self.set(key, mac),
            Err(err) => warn!(%err, "neighbour lookup failed"),
        }
        // A key the lookup found gone is no longer refreshing: it is only triggered.
        let refreshing = refreshing && self.schedule.get(&key).is_some_and(|s| s.refresh);
        let poked = match refreshing {
            true => self.rtnl.reprobe(key),
            false => self.rtnl.trigger(key),
        };
        if let Err(err) = poked {
            warn!(%err, "neighbour resolution trigger failed");
        }
        let now = Instant::now();
        let report = self
            .schedule
            .get_mut(&key)
            .is_some_and(|s| s.take_report(now));
        if report {
            let route = self.rtnl.route(key.addr);
            // Under the lock, as in `set`: only for a key still watched and still unresolved.
            let watched = lock(&self.watched);
            if watched.get(&key).is_some_and(Option::is_none) {
                let event = NeighEvent::Unresolved { key, route };
                debug!(?event, "neighbour change");
                let _ = self.events.send(event);
            }
        }
        let refresh = self.refresh;
        if let Some(s) = self.schedule.get_mut(&key) {
            s.after_attempt(now, refresh);
        }
    }
}

/// The key and usable MAC (`None`: gone or unusable) carried by a neighbour notification.
fn notification(msg: &Nlmsghdr<Rtm, Ndmsg>) -> Option<(NeighKey, Option<Mac>)> {
    let neighbour = Neighbour::parse(msg.get_payload()?)?;
    match msg.nl_type() {
        Rtm::Newneigh => Some((neighbour.key, neighbour.usable_mac())),
        Rtm::Delneigh => Some((neighbour.key, None)),
        _ => None,
    }
}

/// A pollfd waiting for `fd` to become readable.
pub(crate) fn pollin(fd: &impl AsRawFd) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

pub(crate) fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The kernel's `NUD_VALID`: states in which an entry's link-layer address is usable.
const NUD_VALID: Nud = Nud::PERMANENT
    .union(Nud::NOARP)
    .union(Nud::REACHABLE)
    .union(Nud::PROBE)
    .union(Nud::STALE)
    .union(Nud::DELAY);

/// An IPv4 or IPv6 neighbour table entry as reported by the kernel.
struct Neighbour {
    key: NeighKey,
    /// `NDA_LLADDR`, if present and 6 bytes long.
    mac: Option<Mac>,
    state: Nud,
}

impl Neighbour {
    /// Decodes an `ndmsg`; `None` for proxy entries, other families or malformed entries.
    fn parse(msg: &Ndmsg) -> Option<Neighbour> {
        if msg.ndm_flags().contains(Ntf::PROXY) {
            return None;
        }
        let attrs = msg.rtattrs().get_attr_handle();
        let dst = attrs.get_attribute(Nda::Dst)?.rta_payload().as_ref();
        let addr = match msg.ndm_family() {
            RtAddrFamily::Inet => IpAddr::from(<[u8; 4]>::try_from(dst).ok()?),
            RtAddrFamily::Inet6 => IpAddr::from(<[u8; 16]>::try_from(dst).ok()?),
            _ => return None,
        };
        let mac = attrs
            .get_attribute(Nda::Lladdr)
            .and_then(|lladdr| Mac::try_from(lladdr.rta_payload().as_ref()).ok());
        Some(Neighbour {
            key: NeighKey {
                ifindex: u32::try_from(*msg.ndm_index()).ok()?,
                addr,
            },
            mac,
            state: *msg.ndm_state(),
        })
    }

    fn usable_mac(&self) -> Option<Mac> {
        self.mac.filter(|_| self.state.intersects(NUD_VALID))
    }
}

/// Why a request failed, before the caller adds what it was about.
enum Failure {
    Netlink(SocketError),
    Kernel(io::Error),
}

impl From<SocketError> for Failure {
    fn from(err: SocketError) -> Failure {
        Failure::Netlink(err)
    }
}

impl Failure {
    fn context(self, op: &'static str, target: impl fmt::Display) -> NeighError {
        let target = target.to_string();
        match self {
            Failure::Netlink(source) => NeighError::Netlink { op, target, source },
            Failure::Kernel(source) => NeighError::Kernel { op, target, source },
        }
    }
}

/// A blocking rtnetlink request socket, bound to the namespace of the thread that opened it.
struct Rtnl {
    socket: NlSocketHandle,
    seq: u32,
}

impl Rtnl {
    fn open() -> Result<Rtnl, NeighError> {
        let socket = NlSocketHandle::connect(NlFamily::Route, None, Groups::empty())
            .map_err(NeighError::Open)?;
        // Makes the kernel honour the NDA_IFINDEX dump filter and reject malformed requests.
        socket
            .enable_strict_checking(true)
            .map_err(NeighError::Open)?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends `ndmsg` (with `NLM_F_ACK` added to `flags`) and collects the neighbours the kernel
    /// replies with, up to its ACK, `NLMSG_DONE` or error.
    fn request(&mut self, kind: Rtm, flags: NlmF, ndmsg: Ndmsg) -> Result<Vec<Neighbour>, Failure> {
        self.seq = self.seq.wrapping_add(1);
        let msg = NlmsghdrBuilder::default()
            .nl_type(kind)
            .nl_flags(flags | NlmF::REQUEST | NlmF::ACK)
            .nl_seq(self.seq)
            .nl_payload(NlPayload::Payload(ndmsg))
            .build()
            .map_err(SocketError::from)?;
        self.socket.send(&msg)?;
        let mut neighbours = Vec::new();
        loop {
            let (msgs, _) = self.socket.recv::<Rtm, Ndmsg>()?;
            for msg in msgs {
                let msg = msg?;
                if *msg.nl_seq() != self.seq {
                    continue;
                }
                match msg.nl_payload() {
                    NlPayload::Payload(ndmsg) => neighbours.extend(Neighbour::parse(ndmsg)),
                    NlPayload::Err(err) => return Err(kernel_error(*err.error())),
                    NlPayload::DumpExtAck(done) if *done.error() != 0 => {
                        return Err(kernel_error(*done.error()))
                    }
                    NlPayload::Ack(_) | NlPayload::DumpExtAck(_) | NlPayload::Empty => {
                        return Ok(neighbours)
                    }
                }
            }
        }
    }

    fn dump(&mut self, ifindex: Option<u32>) -> Result<Vec<Neighbour>, NeighError> {
        let filter = ifindex
            .map(|ifindex| {
                RtattrBuilder::default()
                    .rta_type(Nda::Ifindex)
                    .rta_payload(ifindex)
                    .build()
            })
            .into_iter()
            .collect::<Result<RtBuffer<_, _>, _>>()
            .map_err(SocketError::from)
            .and_then(|attrs| {
                ndmsg(
                    RtAddrFamily::Unspecified,
                    0,
                    Nud::empty(),
                    Ntf::empty(),
                    attrs,
                )
            });
        let target =
            ifindex.map_or_else(|| "all interfaces".to_owned(), |i| format!("ifindex {i}"));
        let neighbours = filter
            .map_err(Failure::from)
            .and_then(|req| self.request(Rtm::Getneigh, NlmF::DUMP, req))
            .map_err(|f| f.context("RTM_GETNEIGH dump", &target))?;
        Ok(neighbours
            .into_iter()
            .filter(|n| ifindex.is_none_or(|i| n.key.ifindex == i))
            .collect())
    }

    /// The kernel's entry for `key`, whatever its state.
    fn get(&mut self, key: NeighKey) -> Result<Option<Neighbour>, NeighError> {
        let reply = key_ndmsg(key, Ntf::empty())
            .map_err(Failure::from)
            .and_then(|req| self.request(Rtm::Getneigh, NlmF::empty(), req));
        match reply {
            Ok(neighbours) => Ok(neighbours.into_iter().find(|n| n.key == key)),
            Err(Failure::Kernel(err)) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(f) => Err(f.context("RTM_GETNEIGH", key)),
        }
    }

    fn lookup(&mut self, key: NeighKey) -> Result<Option<Mac>, NeighError> {
        Ok(self.get(key)?.and_then(|n| n.usable_mac()))
    }

    fn trigger(&mut self, key: NeighKey) -> Result<(), NeighError> {
        self.poke(key, false)
    }

    /// [`trigger`](Self::trigger), but a REACHABLE entry is first made STALE (its MAC kept), so
    /// that the kernel probes it too (`NTF_USE` alone leaves REACHABLE entries be): like
    /// `ip neigh change ADDR dev IF nud stale` then `ip neigh replace ADDR dev IF use`. The
    /// kernel then sends its unicast probes to the MAC it has; a backend that no longer answers
    /// there (its MAC changed unannounced) has its entry fail and resolved afresh.
    fn reprobe(&mut self, key: NeighKey) -> Result<(), NeighError> {
        self.poke(key, true)
    }

    fn poke(&mut self, key: NeighKey, reprobe: bool) -> Result<(), NeighError> {
        let state = self.get(key)?.map(|n| n.state);
        // The kernel's NTF_USE path strips NUD_PERMANENT from an existing entry, which would
        // turn a configured static MAC into one that gets re-resolved. Such entries (and NOARP
        // ones) never need resolving, so leave them alone.
        if state.is_some_and(|s| s.intersects(Nud::PERMANENT | Nud::NOARP)) {
            return Ok(());
        }
        if reprobe && state.is_some_and(|s| s.contains(Nud::REACHABLE)) {
            // Without NLM_F_CREATE or NLM_F_REPLACE and without a link-layer address: the kernel
            // keeps the entry's MAC and only takes the state. An entry deleted meanwhile is no
            // error: the trigger below creates it again.
            let stale = key_ndmsg_in(key, Nud::STALE, Ntf::empty())
                .map_err(Failure::from)
                .and_then(|req| self.request(Rtm::Newneigh, NlmF::empty(), req));
            match stale {
                Ok(_) => {}
                Err(Failure::Kernel(err)) if err.raw_os_error() == Some(libc::ENOENT) => {}
                Err(f) => return Err(f.context("RTM_NEWNEIGH (NUD_STALE)", key)),
            }
        }
        key_ndmsg(key, Ntf::USE)
            .map_err(Failure::from)
            .and_then(|req| self.request(Rtm::Newneigh, NlmF::CREATE, req))
            .map(drop)
            .map_err(|f| f.context("RTM_NEWNEIGH (NTF_USE)", key))
    }

    /// How the kernel routes `addr` (`RTM_GETROUTE`, as `ip route get ADDR`). Never fails: a
    /// failed lookup is [`RouteTo::Unknown`].
    fn route(&mut self, addr: IpAddr) -> RouteTo {
        match self.get_route(addr) {
            Ok(route) => route,
            Err(Failure::Kernel(err))
                if matches!(
                    err.raw_os_error(),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL | libc::EACCES)
                ) =>
            {
                RouteTo::NoRoute(err.to_string())
            }
            Err(f) => RouteTo::Unknown(f.context("RTM_GETROUTE", addr).to_string()),
        }
    }

    fn get_route(&mut self, addr: IpAddr) -> Result<RouteTo, Failure> {
        let (family, len, dst) = match addr {
            IpAddr::V4(a) => (RtAddrFamily::Inet, 32, Buffer::from(&a.octets()[..])),
            IpAddr::V6(a) => (RtAddrFamily::Inet6, 128, Buffer::from(&a.octets()[..])),
        };
        let dst = RtattrBuilder::default()
            .rta_type(Rta::Dst)
            .rta_payload(dst)
            .build()
            .map_err(SocketError::from)?;
        // What strict checking wants of a route lookup: everything zero but the family and the
        // destination's length.
        let rtmsg = RtmsgBuilder::default()
            .rtm_family(family)
            .rtm_dst_len(len)
            .rtm_src_len(0)
            .rtm_tos(0)
            .rtm_table(RtTable::Unspec)
            .rtm_protocol(Rtprot::Unspec)
            .rtm_scope(RtScope::Universe)
            .rtm_type(Rtn::Unspec)
            .rtattrs(std::iter::once(dst).collect())
            .build()
            .map_err(SocketError::from)?;
        self.seq = self.seq.wrapping_add(1);
        let msg = NlmsghdrBuilder::default()
            .nl_type(Rtm::Getroute)
            .nl_flags(NlmF::REQUEST)
            .nl_seq(self.seq)
            .nl_payload(NlPayload::Payload(rtmsg))
            .build()
            .map_err(SocketError::from)?;
        self.socket.send(&msg)?;
        loop {
            let (msgs, _) = self.socket.recv::<Rtm, Rtmsg>()?;
            for msg in msgs {
                let msg = msg?;
                if *msg.nl_seq() != self.seq {
                    continue;
                }
                match msg.nl_payload() {
                    NlPayload::Payload(route) => return Ok(route_to(route)),
                    NlPayload::Err(err) => return Err(kernel_error(*err.error())),
                    _ => {
                        return Err(Failure::Netlink(SocketError::new(
                            "RTM_GETROUTE: no route in the reply",
                        )))
                    }
                }
            }
        }
    }
}

/// What an `RTM_NEWROUTE` answering a route lookup says.
fn route_to(route: &Rtmsg) -> RouteTo {
    let attrs = route.rtattrs().get_attr_handle();
    let ip = |bytes: &[u8]| match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    };
    let ifindex = attrs
        .get_attribute(Rta::Oif)
        .and_then(|a| <[u8; 4]>::try_from(a.rta_payload().as_ref()).ok())
        .map(u32::from_ne_bytes);
    // RTA_VIA (an IPv4 route via an IPv6 next hop): a 2-byte family, then the address. By
    // number: neli names it only where the C library is glibc (not in the static musl build).
    const RTA_VIA: u16 = 18;
    let gateway = attrs
        .get_attribute(Rta::Gateway)
        .and_then(|a| ip(a.rta_payload().as_ref()))
        .or_else(|| {
            attrs
                .get_attribute(Rta::from(RTA_VIA))
                .and_then(|a| ip(a.rta_payload().as_ref().get(2..)?))
        });
    match (*route.rtm_type(), gateway, ifindex) {
        (Rtn::Local, ..) => RouteTo::Local,
        (Rtn::Unicast, Some(gateway), ifindex) => RouteTo::Gateway { gateway, ifindex },
        (Rtn::Unicast, None, Some(ifindex)) => RouteTo::Direct { ifindex },
        (kind, ..) => RouteTo::NoRoute(format!("route type {}", u8::from(kind))),
    }
}

fn kernel_error(errno: libc::c_int) -> Failure {
    Failure::Kernel(io::Error::from_raw_os_error(-errno))
}

/// An `ndmsg` about `key` (state `NUD_NONE`, `NDA_DST` set).
fn key_ndmsg(key: NeighKey, flags: Ntf) -> Result<Ndmsg, SocketError> {
    key_ndmsg_in(key, Nud::empty(), flags)
}

/// An `ndmsg` about `key` in `state` (`NDA_DST` set).
fn key_ndmsg_in(key: NeighKey, state: Nud, flags: Ntf) -> Result<Ndmsg, SocketError> {
    let (family, dst) = match key.addr {
        IpAddr::V4(addr) => (RtAddrFamily::Inet, Buffer::from(&addr.octets()[..])),
        IpAddr::V6(addr) => (RtAddrFamily::Inet6, Buffer::from(&addr.octets()[..])),
    };
    let dst = RtattrBuilder::default()
        .rta_type(Nda::Dst)
        .rta_payload(dst)
        .build()?;
    ndmsg(
        family,
        key.ifindex,
        state,
        flags,
        std::iter::once(dst).collect(),
    )
}

/// An `ndmsg` with type `RTN_UNSPEC`; state `NUD_NONE` (`Nud::empty()`) is what both
/// `RTM_GETNEIGH` (whose strict checks demand zero there) and an `NTF_USE` trigger want.
fn ndmsg(
    family: RtAddrFamily,
    ifindex: u32,
    state: Nud,
    flags: Ntf,
    attrs: RtBuffer<Nda, Buffer>,
) -> Result<Ndmsg, SocketError> {
    let ifindex = libc::c_int::try_from(ifindex)
        .map_err(|_| SocketError::new(format!("ifindex {ifindex} is out of range")))?;
    Ok(NdmsgBuilder::default()
        .ndm_family(family)
        .ndm_index(ifindex)
        .ndm_state(state)
        .ndm_flags(flags)
        .ndm_type(Rtn::Unspec)
        .rtattrs(attrs)
        .build()?)
}

#[cfg(test)]
mod tests {
    //! These tests build network namespaces and so need root; they fail (not skip) without it.

    use std::{
        fs::File,
        net::{Ipv4Addr, Ipv6Addr},
        process::{Command, Stdio},
        thread,
    };

    use nix::{
        net::if_::if_nametoindex,
        sched::{setns, CloneFlags},
    };

    use super::*;

    const DIRECTOR_IF: &str = "lbdt0";
    const PEER_IF: &str = "lbdt1";
    const PEER_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2));
    const PEER_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2));
    /// Upper bound for anything the kernel has to resolve.
    const PATIENCE: Duration = Duration::from_secs(5);

    /// Runs `ip` with `args` and returns its stdout; panics unless it succeeds.
    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("cannot run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("ip printed non-UTF-8")
    }

    /// Runs `f` on a thread that has joined network namespace `ns`, so the sockets it opens
    /// belong there; the calling thread stays where it is.
    fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    let path = format!("/var/run/netns/{ns}");
                    let handle = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                    setns(handle, CloneFlags::CLONE_NEWNET).expect("setns");
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Writes a sysctl of the calling thread's network namespace.
    fn sysctl(name: &str, value: &str) {
        let path = format!("/proc/sys/{}", name.replace('.', "/"));
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("{path}: {e}"));
    }

    fn parse_mac(text: &str) -> Mac {
        let bytes: Vec<u8> = text
            .trim()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("hex MAC byte"))
            .collect();
        bytes.try_into().expect("6-byte MAC")
    }

    /// A director and a peer namespace joined by a veth pair (`lbdt0` 10.99.0.1/24 and
    /// fd00:99::1/64, `lbdt1` .2 and ::2). Both namespaces are deleted on drop, even when
    /// setting up fails half-way.
    struct TestNet {
        director: String,
        peer: String,
    }

    impl TestNet {
        fn new(tag: &str) -> TestNet {
            let pid = std::process::id();
            let net = TestNet {
                director: format!("lbdt-neigh-{pid}-{tag}-d"),
                peer: format!("lbdt-neigh-{pid}-{tag}-p"),
            };
            for ns in [&net.director, &net.peer] {
                ip(&["netns", "add", ns]);
                // No DAD, so that the link-local addresses neighbour solicitations come from
                // are usable at once.
                in_netns(ns, || sysctl("net.ipv6.conf.default.accept_dad", "0"));
            }
            ip(&[
                "-n",
                &net.director,
                "link",
                "add",
                DIRECTOR_IF,
                "type",
                "veth",
                "peer",
                "name",
                PEER_IF,
                "netns",
                &net.peer,
            ]);
            for (ns, dev, host) in [(&net.director, DIRECTOR_IF, 1), (&net.peer, PEER_IF, 2)] {
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("10.99.0.{host}/24"),
                    "dev",
                    dev,
                ]);
                let v6 = format!("fd00:99::{host}/64");
                ip(&["-n", ns, "addr", "add", &v6, "dev", dev, "nodad"]);
                ip(&["-n", ns, "link", "set", dev, "up"]);
            }
            net
        }

        /// The peer's MAC, as its own namespace sees it.
        fn peer_mac(&self) -> Mac {
            let path = format!("/sys/class/net/{PEER_IF}/address");
            parse_mac(&ip(&["netns", "exec", &self.peer, "cat", &path]))
        }

        /// Runs `ip -n <director> neigh <args>`.
        fn director_neigh(&self, args: &[&str]) {
            ip(&[&["-n", self.director.as_str(), "neigh"], args].concat());
        }
    }

    impl Drop for TestNet {
        fn drop(&mut self) {
            for ns in [&self.director, &self.peer] {
                // Fails harmlessly for a namespace that was never created.
                let _ = Command::new("ip")
                    .args(["netns", "del", ns])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    fn director_ifindex() -> u32 {
        if_nametoindex(DIRECTOR_IF).expect("director veth")
    }

    /// Polls `probe` until it yields a value, for at most [`PATIENCE`].
    fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(value) = probe() {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Notifications carrying a MAC (REACHABLE, STALE, DELAY...) do not postpone a resolved key's
    /// refresh: it comes `refresh` after the key resolved, then `refresh` after each refresh.
    #[test]
    fn the_refresh_deadline_is_not_moved_by_notifications() {
        let refresh = Duration::from_secs(30);
        let (a, b) = (Some([2, 0, 0, 0, 0, 1]), Some([2, 0, 0, 0, 0, 2]));
        let t0 = Instant::now();
        let mut s = Schedule::unresolved(t0);
        // Resolves: the refresh is due 30 s later.
        s = Schedule::after_change(Some(&s), None, a, t0, refresh).expect("resolved: new schedule");
        assert_eq!(
            (s.due, s.refresh, s.unresolved_since),
            (t0 + refresh, true, None)
        );
        // REACHABLE -> STALE 20 s later, a MAC change 25 s later: the deadline holds.
        for (at, old, new) in [(20, a, a), (25, a, b)] {
            let later = t0 + Duration::from_secs(at);
            assert_eq!(
                Schedule::after_change(Some(&s), old, new, later, refresh),
                None,
                "at {at} s"
            );
        }
        // The refresh attempt at 30 s sets the next one at 60 s.
        let t30 = t0 + refresh;
        s.after_attempt(t30, refresh);
        assert_eq!((s.due, s.refresh), (t30 + refresh, true));
        // Lost: re-resolved at once, and reported 5 s later unless it comes back.
        let t40 = t0 + Duration::from_secs(40);
        s = Schedule::after_change(Some(&s), b, None, t40, refresh).expect("gone: new schedule");
        assert_eq!(
            (s.due, s.refresh, s.unresolved_since),
            (t40, false, Some(t40))
        );
        // Nothing is reported or scheduled for a key that stays unresolved.
        assert_eq!(
            Schedule::after_change(Some(&s), None, None, t40, refresh),
            None
        );
    }

    /// An unresolved key is tried at 0, 1, 3 and 5 s (the doubling backoff, cut short for the
    /// report), reported once at 5 s, then tried every 5 s.
    #[test]
    fn an_unresolved_key_backs_off_and_is_reported_once_after_five_seconds() {
        let refresh = Duration::from_secs(30);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut s = Schedule::unresolved(t0);
        let mut attempts = Vec::new();
        let mut reports = Vec::new();
        while s.due <= at(20) {
            let now = s.due;
            attempts.push(now.duration_since(t0).as_secs());
            if s.take_report(now) {
                reports.push(now.duration_since(t0).as_secs());
            }
            s.after_attempt(now, refresh);
        }
        assert_eq!(attempts, [0, 1, 3, 5, 10, 15, 20]);
        assert_eq!(reports, [5]);
        // A schedule moved into the future by the attempt (the key resolved) stays.
        let mut resolved = Schedule::resolved(at(1), refresh);
        resolved.after_attempt(at(1), refresh);
        assert_eq!(resolved.due, at(1) + refresh);
        assert!(
            !resolved.take_report(at(100)),
            "a resolved key is not reported"
        );
    }

    #[test]
    fn resolver_can_be_shared_between_tasks() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Resolver>();
    }

    #[test]
    fn trigger_resolves_and_lookup_and_dump_report_the_peer_mac() {
        let net = TestNet::new("helpers");
        let peer_mac = net.peer_mac();
        in_netns(&net.director, || {
            let ifindex = director_ifindex();
            for addr in [PEER_V4, PEER_V6] {
                let key = NeighKey { ifindex, addr };
                assert_eq!(lookup(key).unwrap(), None, "{key} known before trigger");
                trigger(key).unwrap();
                let mac = wait_for(&format!("{key} to resolve"), || lookup(key).unwrap());
                assert_eq!(mac, peer_mac, "{key}");

                let (_, dumped, state) = dump(Some(ifindex))
                    .unwrap()
                    .into_iter()
                    .find(|(k, ..)| *k == key)
                    .unwrap_or_else(|| panic!("dump of ifindex {ifindex} lacks {key}"));
                assert_eq!(dumped, peer_mac);
                assert!(Nud::from(state).intersects(NUD_VALID), "state {state:#x}");
                assert!(dump(None).unwrap().contains(&(key, peer_mac, state)));
                let lo = if_nametoindex("lo").unwrap();
                assert!(!dump(Some(lo)).unwrap().iter().any(|(k, ..)| *k == key));

                // Triggering a resolved entry leaves it resolved.
                trigger(key).unwrap();
                assert_eq!(lookup(key).unwrap(), Some(peer_mac));
            }

            // Nobody answers for .77: trigger leaves an INCOMPLETE entry (resolution started),
            // which neither lookup nor dump reports.
            let silent = NeighKey {
                ifindex,
                addr: IpAddr::V4(Ipv4Addr::new(10, 99, 0, 77)),
            };
            trigger(silent).unwrap();
            let state = Rtnl::open().unwrap().get(silent).unwrap().map(|n| n.state);
            assert_eq!(state, Some(Nud::INCOMPLETE));
            assert_eq!(lookup(silent).unwrap(), None);
            assert!(!dump(None).unwrap().iter().any(|(k, ..)| *k == silent));

            let missing = NeighKey {
                ifindex: 999_999,
                addr: PEER_V4,
            };
            let err = lookup(missing).unwrap_err();
            assert!(matches!(err, NeighError::Kernel { .. }), "{err:?}");
            let text = err.to_string();
            assert!(text.contains("10.99.0.2 on ifindex 999999"), "{text}");
        });
    }

    #[test]
    fn trigger_leaves_configured_macs_alone() {
        let net = TestNet::new("static");
        let cases = [
            ("10.99.0.3", "permanent", "02:00:00:00:00:03"),
            ("fd00:99::3", "permanent", "02:00:00:00:00:13"),
            ("10.99.0.4", "noarp", "02:00:00:00:00:04"),
            ("10.99.0.5", "stale", "02:00:00:00:00:05"),
            ("fd00:99::5", "stale", "02:00:00:00:00:15"),
        ];
        for (addr, nud, mac) in cases {
            net.director_neigh(&["add", addr, "lladdr", mac, "dev", DIRECTOR_IF, "nud", nud]);
        }
        in_netns(&net.director, || {
            let ifindex = director_ifindex();
            for (addr, nud, mac) in cases {
                let key = NeighKey {
                    ifindex,
                    addr: addr.parse().unwrap(),
                };
                let before = Rtnl::open().unwrap().get(key).unwrap().unwrap().state;
                trigger(key).unwrap();
                assert_eq!(lookup(key).unwrap(), Some(parse_mac(mac)), "{nud} {key}");
                let after = Rtnl::open().unwrap().get(key).unwrap().unwrap().state;
                if nud == "stale" {
                    // NTF_USE re-probes a STALE entry, keeping its MAC meanwhile.
                    assert_eq!(after, Nud::DELAY, "{key}");
                } else {
                    assert_eq!(after, before, "{nud} {key}");
                }
            }
        });
    }

    /// Waits (at most [`PATIENCE`]) for exactly the `expected` events, in that order per key;
    /// events of different keys may interleave.
    async fn expect_events(events: &mut UnboundedReceiver<NeighEvent>, expected: &[NeighEvent]) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        while seen.len() < expected.len() {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(event)) => seen.push(event),
                Ok(None) => panic!("resolver stopped after {seen:?}"),
                Err(_) => panic!("timed out: expected {expected:?}, got {seen:?}"),
            }
        }
        let of = |list: &[NeighEvent], key| -> Vec<NeighEvent> {
            list.iter().filter(|e| e.key() == key).cloned().collect()
        };
        for key in expected.iter().map(NeighEvent::key) {
            assert_eq!(of(&seen, key), of(expected, key), "all events: {seen:?}");
        }
    }

    #[test]
    fn resolver_follows_resolution_mac_changes_and_deletions() {
        let net = TestNet::new("resolver");
        // Make the peer announce a MAC change (gratuitous ARP, unsolicited NA), as a backend
        // whose NIC is replaced would; the director's kernel then updates its entries at once.
        in_netns(&net.peer, || {
            sysctl(&format!("net.ipv4.conf.{PEER_IF}.arp_notify"), "1");
            sysctl(&format!("net.ipv6.conf.{PEER_IF}.ndisc_notify"), "1");
        });
        let first = net.peer_mac();
        let second = parse_mac("02:00:00:00:be:ef");
        in_netns(&net.director, || {
            let ifindex = director_ifindex();
            let v4 = NeighKey {
                ifindex,
                addr: PEER_V4,
            };
            let v6 = NeighKey {
                ifindex,
                addr: PEER_V6,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (resolver, mut events) = Resolver::start().unwrap();
                resolver.watch(v4);
                resolver.watch(v6);
                resolver.watch(v4);
                expect_events(
                    &mut events,
                    &[
                        NeighEvent::Reachable {
                            key: v4,
                            mac: first,
                        },
                        NeighEvent::Reachable {
                            key: v6,
                            mac: first,
                        },
                    ],
                )
                .await;
                assert_eq!(resolver.current(v4), Some(first));
                assert_eq!(resolver.current(v6), Some(first));

                let peer = net.peer.as_str();
                ip(&[
                    "-n",
                    peer,
                    "link",
                    "set",
                    "dev",
                    PEER_IF,
                    "address",
                    "02:00:00:00:be:ef",
                ]);
                expect_events(
                    &mut events,
                    &[
                        NeighEvent::Reachable {
                            key: v4,
                            mac: second,
                        },
                        NeighEvent::Reachable {
                            key: v6,
                            mac: second,
                        },
                    ],
                )
                .await;

                // A deleted entry is reported gone, then resolved again.
                for key in [v4, v6] {
                    net.director_neigh(&["del", &key.addr.to_string(), "dev", DIRECTOR_IF]);
                }
                expect_events(
                    &mut events,
                    &[
                        NeighEvent::Gone { key: v4 },
                        NeighEvent::Reachable {
                            key: v4,
                            mac: second,
                        },
                        NeighEvent::Gone { key: v6 },
                        NeighEvent::Reachable {
                            key: v6,
                            mac: second,
                        },
                    ],
                )
                .await;
                assert_eq!(resolver.current(v4), Some(second));

                // Neither unwatched nor never-watched keys produce events.
                resolver.unwatch(v4);
                net.director_neigh(&["del", "10.99.0.2", "dev", DIRECTOR_IF]);
                net.director_neigh(&[
                    "add",
                    "10.99.0.9",
                    "lladdr",
                    "02:00:00:00:00:09",
                    "dev",
                    DIRECTOR_IF,
                ]);
                let quiet = tokio::time::timeout(Duration::from_millis(1500), events.recv()).await;
                assert!(quiet.is_err(), "unexpected event {quiet:?}");
                assert_eq!(resolver.current(v4), None);
                assert_eq!(resolver.current(v6), Some(second));

                drop(resolver);
                assert_eq!(
                    events.recv().await,
                    None,
                    "channel closes with the resolver"
                );
            });
        });
    }
    #[test]
    fn reprobe_makes_a_reachable_entry_probe_again_keeping_its_mac() {
        let net = TestNet::new("reprobe");
        let peer_mac = net.peer_mac();
        net.director_neigh(&[
            "add",
            "10.99.0.3",
            "lladdr",
            "02:00:00:00:00:03",
            "dev",
            DIRECTOR_IF,
            "nud",
            "permanent",
        ]);
        in_netns(&net.director, || {
            let ifindex = director_ifindex();
            let mut rtnl = Rtnl::open().unwrap();
            for addr in [PEER_V4, PEER_V6] {
                let key = NeighKey { ifindex, addr };
                trigger(key).unwrap();
                wait_for(&format!("{key} to resolve"), || lookup(key).unwrap());
                let before = rtnl.get(key).unwrap().unwrap();
                assert_eq!(before.state, Nud::REACHABLE, "{key}");
                // A plain trigger leaves a REACHABLE entry alone; a re-probe has it probed.
                trigger(key).unwrap();
                assert_eq!(
                    rtnl.get(key).unwrap().unwrap().state,
                    Nud::REACHABLE,
                    "{key}"
                );
                rtnl.reprobe(key).unwrap();
                let after = rtnl.get(key).unwrap().unwrap();
                assert_eq!(
                    (after.state, after.mac),
                    (Nud::DELAY, Some(peer_mac)),
                    "{key}"
                );
            }
            let permanent = NeighKey {
                ifindex,
                addr: IpAddr::V4(Ipv4Addr::new(10, 99, 0, 3)),
            };
            rtnl.reprobe(permanent).unwrap();
            assert_eq!(rtnl.get(permanent).unwrap().unwrap().state, Nud::PERMANENT);
            // A key without an entry is simply triggered.
            let fresh = NeighKey {
                ifindex,
                addr: IpAddr::V4(Ipv4Addr::new(10, 99, 0, 78)),
            };
            rtnl.reprobe(fresh).unwrap();
            assert_eq!(
                rtnl.get(fresh).unwrap().map(|n| n.state),
                Some(Nud::INCOMPLETE)
            );
        });
    }

    #[test]
    fn route_tells_direct_gateway_local_and_missing_routes() {
        let net = TestNet::new("route");
        ip(&[
            "-n",
            &net.director,
            "route",
            "add",
            "10.98.0.0/24",
            "via",
            "10.99.0.254",
        ]);
        ip(&[
            "-n",
            &net.director,
            "-6",
            "route",
            "add",
            "fd00:98::/64",
            "via",
            "fd00:99::fe",
        ]);
        in_netns(&net.director, || {
            let ifindex = director_ifindex();
            let mut rtnl = Rtnl::open().unwrap();
            let addr = |a: &str| a.parse::<IpAddr>().unwrap();
            assert_eq!(rtnl.route(PEER_V4), RouteTo::Direct { ifindex });
            assert_eq!(rtnl.route(PEER_V6), RouteTo::Direct { ifindex });
            let via = |gateway: &str| RouteTo::Gateway {
                gateway: addr(gateway),
                ifindex: Some(ifindex),
            };
            assert_eq!(rtnl.route(addr("10.98.0.5")), via("10.99.0.254"));
            assert_eq!(rtnl.route(addr("fd00:98::5")), via("fd00:99::fe"));
            assert_eq!(rtnl.route(addr("10.99.0.1")), RouteTo::Local);
            assert_eq!(rtnl.route(addr("fd00:99::1")), RouteTo::Local);
            for missing in ["192.0.2.1", "2001:db8::1"] {
                let route = rtnl.route(addr(missing));
                assert!(
                    matches!(&route, RouteTo::NoRoute(why) if why.contains("unreachable")),
                    "{missing}: {route:?}"
                );
            }
        });
    }

    /// Collects events until every one of `expected` came (in any order), for at most `patience`;
    /// returns the others that came meanwhile.
    async fn collect_events(
        events: &mut UnboundedReceiver<NeighEvent>,
        expected: &[NeighEvent],
        patience: Duration,
    ) -> Vec<NeighEvent> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut missing = expected.to_vec();
        let mut others = Vec::new();
        while !missing.is_empty() {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(event)) => match missing.iter().position(|e| *e == event) {
                    Some(i) => drop(missing.remove(i)),
                    None => others.push(event),
                },
                Ok(None) => panic!("resolver stopped; still expected {missing:?}"),
                Err(_) => panic!("timed out: still expected {missing:?}; also got {others:?}"),
            }
        }
        others
    }

    #[test]
    fn resolver_reports_unresolved_keys_and_its_refresh_catches_an_unannounced_mac_change() {
        let net = TestNet::new("refresh");
        ip(&[
            "-n",
            &net.director,
            "route",
            "add",
            "10.98.0.0/24",
            "via",
            "10.99.0.254",
        ]);
        let first = net.peer_mac();
        let second = parse_mac("02:00:00:00:be:ef");
        in_netns(&net.director, || {
            // The kernel's first unicast probe 1 s after a re-probe (5 s by default).
            sysctl(
                &format!("net.ipv4.neigh.{DIRECTOR_IF}.delay_first_probe_time"),
                "1",
            );
            let ifindex = director_ifindex();
            let peer = NeighKey {
                ifindex,
                addr: PEER_V4,
            };
            let silent = NeighKey {
                ifindex,
                addr: IpAddr::V4(Ipv4Addr::new(10, 99, 0, 77)),
            };
            let routed = NeighKey {
                ifindex,
                addr: IpAddr::V4(Ipv4Addr::new(10, 98, 0, 5)),
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (resolver, mut events) =
                    Resolver::start_refreshing(Duration::from_secs(2)).unwrap();
                let started = Instant::now();
                for key in [peer, silent, routed] {
                    resolver.watch(key);
                }
                let gateway = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 254));
                let expected = [
                    NeighEvent::Reachable {
                        key: peer,
                        mac: first,
                    },
                    NeighEvent::Unresolved {
                        key: silent,
                        route: RouteTo::Direct { ifindex },
                    },
                    NeighEvent::Unresolved {
                        key: routed,
                        route: RouteTo::Gateway {
                            gateway,
                            ifindex: Some(ifindex),
                        },
                    },
                ];
                let others = collect_events(&mut events, &expected, Duration::from_secs(8)).await;
                assert!(others.is_empty(), "{others:?}");
                let waited = started.elapsed();
                assert!(
                    waited >= UNRESOLVED_REPORT
                        && waited < UNRESOLVED_REPORT + Duration::from_secs(2),
                    "{waited:?}"
                );

                // The peer changes its MAC without telling (no gratuitous ARP): its refresh has
                // the kernel probe the old MAC, which no longer answers, and the entry is resolved
                // afresh.
                ip(&[
                    "-n",
                    &net.peer,
                    "link",
                    "set",
                    "dev",
                    PEER_IF,
                    "address",
                    "02:00:00:00:be:ef",
                ]);
                let expected = [
                    NeighEvent::Gone { key: peer },
                    NeighEvent::Reachable {
                        key: peer,
                        mac: second,
                    },
                ];
                let others = collect_events(&mut events, &expected, Duration::from_secs(15)).await;
                assert!(others.is_empty(), "{others:?}");
                assert_eq!(resolver.current(peer), Some(second));
                // Reported once: nothing more about the unresolved keys.
                let quiet = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
                assert!(quiet.is_err(), "unexpected event {quiet:?}");
            });
        });
    }
}
