//! Health checks of real servers (issue 3): what the configuration says, the probes, the state
//! machine that turns results into up/down, and the scheduler that runs thousands of checks.
//!
//! - [`config`]: the `health_check` table ([`HealthCheckSpec`]), a real server's over its virtual
//!   server's ([`HealthCheckSpec::merge`]), checked into a [`HealthCheck`] with defaults.
//! - [`check`]: [`probe`] one real server: `tcp`, `http`, `https`, `script`, `udp`, `dns`, `none`.
//! - [`vip`]: `via = "vip"`, a TCP handshake along the DSR path (raw frames to the real server's
//!   MAC, addressed to the VIP).
//! - [`state`]: rise/fall/alpha per real server ([`CheckState`]), quorum/hysteresis/sorry server
//!   per virtual server ([`Quorum`]). Pure, clock injected.
//! - [`scheduler`]: the tasks ([`Scheduler`]), [`HealthEvent`]s on a channel, status snapshots.
//!
//! Wiring (controller side): parse `health_check` as `Option<Spanned<HealthCheckSpec>>` in the
//! virtual and real server tables; `HealthCheckSpec::merge(vs, rs)?.validate(rs.port)` and place
//! each [`config::SpecError`] at `at` (else at the table); build a [`CheckConfig`] per checked
//! real server and [`Scheduler::set`] them on start and reload; on a [`HealthEvent`] recompute the
//! desired state with [`state::table_weight`] and [`Quorum`], and apply.

pub mod check;
pub mod config;
pub mod scheduler;
pub mod state;
pub mod vip;

pub use check::{probe, ProbeResult, ProbeTarget, VipPath};
pub use config::{CheckKind, HealthCheck, HealthCheckSpec, Via};
pub use scheduler::{CheckConfig, CheckKey, CheckStatus, HealthEvent, Scheduler, SchedulerOptions};
pub use state::{CheckState, Health, Quorum, QuorumChange, Serve};
