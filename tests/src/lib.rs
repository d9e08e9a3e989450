//! Test support shared by the integration tests and `cargo xtask run`: network namespaces, test
//! frames, and the rig (client, director, backends on one bridge).

pub mod failover;
pub mod health;
pub mod netns;
pub mod packets;
pub mod rig;
pub mod seccomp;
pub mod vrrp;
pub mod vm;
