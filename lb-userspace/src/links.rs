//! The kernel's network interfaces, and a watcher that reports when they change, over rtnetlink.
//!
//! lbd resolves interface names to indexes when it starts and on reload. An interface that is
//! deleted and created again (`ifdown`/`ifup` of a VLAN or bond, a re-plugged VF, a veth
//! re-created by a container runtime) comes back with another index, without the XDP program
//! that was attached to it and without its entry in the program's `TX_PORTS` map. The
//! [`LinkWatcher`] listens to `RTNLGRP_LINK` and, once a burst of notifications has settled,
//! sends a fresh [`Links`] dump whenever the interfaces' names, indexes, MACs or attached XDP
//! programs differ from the last one sent: the daemon follows from there (see
//! `daemon::Controller::relink` and `Dataplane::links_changed`).
//!
//! As in [`crate::neigh`], sockets belong to the network namespace of the thread that creates
//! them: [`LinkWatcher::start`] and [`dump`] work in the caller's.

use std::{
    collections::BTreeMap,
    io,
    os::unix::net::UnixDatagram,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use neli::{
    consts::{
        nl::NlmF,
        rtnl::{Ifla, RtAddrFamily, Rtm},
        socket::NlFamily,
    },
    err::SocketError,
    nl::{NlPayload, NlmsghdrBuilder},
    rtnl::{Ifinfomsg, IfinfomsgBuilder},
    socket::synchronous::NlSocketHandle,
    utils::Groups,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::{debug, error, warn};

use crate::neigh::{pollin, set_nonblocking, Mac};

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    /// Its Ethernet address (`None` for links without a 6-byte one).
    pub mac: Option<Mac>,
    /// The ids of the XDP programs attached to it, in any mode (`IFLA_XDP_*PROG_ID`).
    pub xdp_programs: Vec<u32>,
}

/// The interfaces of a network namespace, by name.
pub type Links = BTreeMap<String, Link>;

/// Whether the interface with index `ifindex` is in `links` and runs XDP program `program`.
pub fn runs(links: &Links, ifindex: u32, program: u32) -> bool {
    links.values().any(|l| l.ifindex == ifindex && l.xdp_programs.contains(&program))
}

/// Errors of reading the interfaces.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot open rtnetlink socket: {0}")]
    Open(#[source] SocketError),
    #[error("RTM_GETLINK dump: netlink I/O failed: {0}")]
    Netlink(#[source] SocketError),
    #[error("RTM_GETLINK dump: kernel replied: {0}")]
    Kernel(#[source] io::Error),
    #[error("cannot start the interface watcher: {0}")]
    Start(#[source] io::Error),
}

/// How long notifications must have been quiet before the interfaces are read: creating an
/// interface and setting it up is several notifications (add, address, MTU, up), and one dump
/// after them is enough.
const SETTLE: Duration = Duration::from_millis(50);
/// The longest a dump waits for notifications to settle.
const MAX_SETTLE: Duration = Duration::from_millis(500);
/// How soon a failed dump is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Receive buffer of the notification socket; should it overflow anyway, the next dump still
/// tells the whole state.
const NOTIFY_RCVBUF: usize = 1 << 20;

/// Whether the driver of interface `ifindex` runs XDP programs itself (native mode), as the
/// kernel's `netdev` generic netlink family says (`NETDEV_CMD_DEV_GET`, the
/// `NETDEV_XDP_ACT_BASIC` bit of `NETDEV_A_DEV_XDP_FEATURES`; Linux 6.3 and later). `None` if
/// the kernel cannot say (no such family, or an error reading it).
pub fn native_xdp(ifindex: u32) -> Option<bool> {
    use neli::{
        genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, NlattrBuilder},
        router::synchronous::NlRouter,
        types::GenlBuffer,
    };
    // include/uapi/linux/netdev.h
    const NETDEV_CMD_DEV_GET: u8 = 1;
    const NETDEV_A_DEV_IFINDEX: u16 = 1;
    const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
    const NETDEV_XDP_ACT_BASIC: u64 = 1;
    let query = || -> Result<Option<u64>, String> {
        let (router, _) = NlRouter::connect(NlFamily::Generic, None, Groups::empty()).map_err(|e| e.to_string())?;
        let family = router.resolve_genl_family("netdev").map_err(|e| e.to_string())?;
        let attr = NlattrBuilder::default()
            .nla_type(AttrTypeBuilder::default().nla_type(NETDEV_A_DEV_IFINDEX).build().map_err(|e| e.to_string())?)
            .nla_payload(ifindex)
            .build()
            .map_err(|e| e.to_string())?;
        let request = GenlmsghdrBuilder::<u8, u16>::default()
            .cmd(NETDEV_CMD_DEV_GET)
            .version(1)
            .attrs(std::iter::once(attr).collect::<GenlBuffer<u16, _>>())
            .build()
            .map_err(|e| e.to_string())?;
        let replies = router
            .send::<_, _, u16, Genlmsghdr<u8, u16>>(family, NlmF::ACK, NlPayload::Payload(request))
            .map_err(|e| e.to_string())?;
        for reply in replies {
            if let NlPayload::Payload(p) = reply.map_err(|e| e.to_string())?.nl_payload() {
                if let Ok(features) = p.attrs().get_attr_handle().get_attr_payload_as::<u64>(NETDEV_A_DEV_XDP_FEATURES) {
                    return Ok(Some(features));
                }
            }
        }
        Ok(None)
    };
    match query() {
        Ok(features) => features.map(|f| f & NETDEV_XDP_ACT_BASIC != 0),
        Err(e) => {
            debug!("reading the XDP features of interface {ifindex}: {e}");
            None
        }
    }
}

/// Reads every interface of the caller's network namespace.
pub fn dump() -> Result<Links, LinkError> {
    let socket = NlSocketHandle::connect(NlFamily::Route, None, Groups::empty()).map_err(LinkError::Open)?;
    dump_on(&socket, 1)
}

fn dump_on(socket: &NlSocketHandle, seq: u32) -> Result<Links, LinkError> {
    let request = IfinfomsgBuilder::default()
        .ifi_family(RtAddrFamily::Unspecified)
        .build()
        .map_err(|e| LinkError::Netlink(SocketError::from(e)))?;
    let msg = NlmsghdrBuilder::default()
        .nl_type(Rtm::Getlink)
        .nl_flags(NlmF::REQUEST | NlmF::DUMP)
        .nl_seq(seq)
        .nl_payload(NlPayload::Payload(request))
        .build()
        .map_err(|e| LinkError::Netlink(SocketError::from(e)))?;
    socket.send(&msg).map_err(LinkError::Netlink)?;
    let mut links = Links::new();
    loop {
        let (msgs, _) = socket.recv::<Rtm, Ifinfomsg>().map_err(LinkError::Netlink)?;
        for msg in msgs {
            let msg = msg.map_err(LinkError::Netlink)?;
            if *msg.nl_seq() != seq {
                continue;
            }
            match msg.nl_payload() {
                NlPayload::Payload(info) => {
                    if let Some((name, link)) = parse(info) {
                        links.insert(name, link);
                    }
                }
                NlPayload::Err(err) => return Err(LinkError::Kernel(io::Error::from_raw_os_error(-*err.error()))),
                NlPayload::DumpExtAck(done) if *done.error() != 0 => {
                    return Err(LinkError::Kernel(io::Error::from_raw_os_error(-*done.error())))
                }
                NlPayload::Ack(_) | NlPayload::DumpExtAck(_) | NlPayload::Empty => return Ok(links),
            }
        }
    }
}

// `IFLA_XDP`'s nested attributes (linux/if_link.h; the libc crate has none of them).
#[cfg(test)]
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
/// Those that carry a program id (the first alone when one program is attached, the others for
/// each mode when several are).
const IFLA_XDP_PROG_IDS: [u16; 4] = [IFLA_XDP_PROG_ID, IFLA_XDP_DRV_PROG_ID, IFLA_XDP_SKB_PROG_ID, IFLA_XDP_HW_PROG_ID];

/// The name and description of one `RTM_NEWLINK`.
fn parse(info: &Ifinfomsg) -> Option<(String, Link)> {
    let attrs = info.rtattrs().get_attr_handle();
    let name = attrs.get_attribute(Ifla::Ifname)?.rta_payload().as_ref();
    let name = String::from_utf8_lossy(name.split(|b| *b == 0).next()?).into_owned();
    let mac = attrs.get_attribute(Ifla::Address).and_then(|a| Mac::try_from(a.rta_payload().as_ref()).ok());
    let mut xdp_programs = Vec::new();
    if let Some(xdp) = attrs.get_attribute(Ifla::Xdp) {
        for (kind, payload) in nested(xdp.rta_payload().as_ref()) {
            if let (true, Ok(id)) = (IFLA_XDP_PROG_IDS.contains(&kind), <[u8; 4]>::try_from(payload)) {
                let id = u32::from_ne_bytes(id);
                if id != 0 && !xdp_programs.contains(&id) {
                    xdp_programs.push(id);
                }
            }
        }
    }
    let ifindex = u32::try_from(*info.ifi_index()).ok()?;
    Some((name, Link { ifindex, mac, xdp_programs }))
}

/// The (type, payload) pairs of a nested attribute's payload (`struct rtattr`s, 4-byte aligned).
fn nested(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(buf.get(0..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(buf.get(2..4)?.try_into().ok()?) & !(libc::NLA_F_NESTED as u16);
        let payload = buf.get(4..len)?;
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, payload))
    })
}

/// Reports the interfaces whenever they change (see the module documentation). Dropping it
/// stops the worker thread and closes the channel.
pub struct LinkWatcher {
    wake: UnixDatagram,
    worker: Option<JoinHandle<()>>,
}

impl LinkWatcher {
    /// Joins `RTNLGRP_LINK` in the caller's network namespace before it returns, so no change
    /// after `start` is missed; the first [`Links`] arrives at once.
    pub fn start() -> Result<(LinkWatcher, UnboundedReceiver<Links>), LinkError> {
        let notifications =
            NlSocketHandle::connect(NlFamily::Route, None, Groups::new_groups(&[libc::RTNLGRP_LINK])).map_err(LinkError::Open)?;
        notifications.set_recv_buffer_size(NOTIFY_RCVBUF).map_err(LinkError::Open)?;
        set_nonblocking(&notifications).map_err(LinkError::Start)?;
        let requests = NlSocketHandle::connect(NlFamily::Route, None, Groups::empty()).map_err(LinkError::Open)?;
        let (wake, wake_rx) = UnixDatagram::pair().map_err(LinkError::Start)?;
        wake_rx.set_nonblocking(true).map_err(LinkError::Start)?;
        let (tx, rx) = unbounded_channel();
        let worker = Worker { notifications, requests, seq: 0, stop: wake_rx, tx, last: None };
        let worker = std::thread::Builder::new()
            .name("lbd-links".into())
            .spawn(move || worker.run())
            .map_err(LinkError::Start)?;
        Ok((LinkWatcher { wake, worker: Some(worker) }, rx))
    }
}

impl Drop for LinkWatcher {
    fn drop(&mut self) {
        let _ = self.wake.send(&[0]);
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                error!("interface watcher panicked");
            }
        }
    }
}

struct Worker {
    /// Non-blocking, subscribed to `RTNLGRP_LINK`.
    notifications: NlSocketHandle,
    /// For the dumps.
    requests: NlSocketHandle,
    seq: u32,
    /// Readable when the watcher is dropped.
    stop: UnixDatagram,
    tx: UnboundedSender<Links>,
    /// The last dump sent.
    last: Option<Links>,
}

impl Worker {
    fn run(mut self) {
        // The first dump is due at once; later ones once notifications have been quiet for
        // SETTLE, or MAX_SETTLE after the first of a burst.
        let mut due = Some(Instant::now());
        let mut burst: Option<Instant> = None;
        loop {
            let timeout = due.map_or(-1, |d| {
                let wait = d.saturating_duration_since(Instant::now());
                libc::c_int::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
            });
            let mut fds = [pollin(&self.notifications), pollin(&self.stop)];
            // SAFETY: `fds` is an array of initialised pollfd structs that outlives the call.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!(%err, "interface watcher: poll failed, stopping; interfaces created again are not followed");
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents != 0 && self.drain() {
                let now = Instant::now();
                let first = *burst.get_or_insert(now);
                due = Some((now + SETTLE).min(first + MAX_SETTLE));
            }
            if due.is_some_and(|d| d <= Instant::now()) {
                burst = None;
                due = self.read().err().map(|e| {
                    warn!("interface watcher: {e}; trying again in {RETRY:?}");
                    Instant::now() + RETRY
                });
            }
        }
    }

    /// Reads every queued notification; true if there was any (or some were lost). Their
    /// contents do not matter: the dump that follows tells the state.
    fn drain(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.notifications.recv::<Rtm, Ifinfomsg>() {
                Ok((msgs, _)) => {
                    for _ in msgs {
                        any = true;
                    }
                }
                Err(SocketError::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => return any,
                Err(err) => {
                    // Typically ENOBUFS: notifications were lost, and a dump sees what they said.
                    debug!(%err, "interface notifications lost");
                    return true;
                }
            }
        }
    }

    fn read(&mut self) -> Result<(), LinkError> {
        self.seq = self.seq.wrapping_add(1);
        let links = dump_on(&self.requests, self.seq)?;
        if self.last.as_ref() != Some(&links) {
            self.last = Some(links.clone());
            let _ = self.tx.send(links);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    #[test]
    fn nested_attributes_are_split_on_their_alignment() {
        let mut buf = attr(IFLA_XDP_ATTACHED, &[1]);
        buf.extend(attr(IFLA_XDP_PROG_ID | libc::NLA_F_NESTED as u16, &42u32.to_ne_bytes()));
        buf.extend(attr(IFLA_XDP_SKB_PROG_ID, &7u32.to_ne_bytes()));
        let got: Vec<(u16, Vec<u8>)> = nested(&buf).map(|(k, p)| (k, p.to_vec())).collect();
        assert_eq!(
            got,
            vec![
                (IFLA_XDP_ATTACHED, vec![1]),
                (IFLA_XDP_PROG_ID, 42u32.to_ne_bytes().to_vec()),
                (IFLA_XDP_SKB_PROG_ID, 7u32.to_ne_bytes().to_vec()),
            ]
        );
        // A length running past the end stops the walk instead of reading beyond it.
        let mut short = attr(IFLA_XDP_PROG_ID, &1u32.to_ne_bytes());
        short[0] = 40;
        assert_eq!(nested(&short).count(), 0);
        // A length below the header's stops it too.
        let mut tiny = attr(IFLA_XDP_PROG_ID, &1u32.to_ne_bytes());
        tiny[0] = 2;
        assert_eq!(nested(&tiny).count(), 0);
    }
}
