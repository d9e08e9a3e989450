//! lbd controller library: configuration, Maglev tables, neighbour resolution, the `Dataplane`
//! trait with its XDP implementation and in-memory fake, the control socket, the metrics endpoint and the daemon.

pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod duration;
pub mod grace;
pub mod ipvs;
pub mod ipvs_dataplane;
pub mod keep;
pub mod health;
pub mod links;
pub mod maglev;
pub mod metrics;
pub mod neigh;
pub mod status;
pub mod vrrp;
pub mod xdp;
