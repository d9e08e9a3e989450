//! What the results of a real server's checks mean, and what a virtual server does about them.
//! Pure: every method takes `now` (the caller's clock), nothing here sleeps or reads a clock.
//!
//! - [`CheckState`]: one real server. `fall` failed checks in a row take it down, `rise` passed
//!   checks in a row bring it back; results in between (flapping) change nothing. It starts up,
//!   as in keepalived, or down with `alpha` until its first pass. A `script` check with
//!   `dynamic_weight` also sets its weight.
//! - [`Quorum`]: one virtual server. While the live real servers' weights add up to at least
//!   `quorum`, they serve; below it the `sorry_server` does (keepalived semantics, with
//!   `hysteresis` around the threshold, see [`Quorum::update`]).
//! - [`table_weight`]: the weight a real server gets in the lookup table, or none.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::check::ProbeResult;

/// A real server's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
}

impl Health {
    /// `"up"` or `"down"`, as in `lbd status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// A change the controller acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The real server went down; the reason is the last failed result's.
    Down { reason: String },
    /// The real server came (back) up; `weight` is its dynamic weight if a check set one.
    Up { reason: String, weight: Option<u32> },
    /// A passing `dynamic_weight` script changed the weight of a real server that is up.
    Weight { weight: u32, reason: String },
}

/// The last result recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastResult {
    pub ok: bool,
    pub reason: String,
    pub latency: Duration,
    pub attempts: u32,
    pub at: Instant,
}

/// Health of one real server from its check results.
#[derive(Debug, Clone)]
pub struct CheckState {
    rise: u32,
    fall: u32,
    health: Health,
    /// `alpha`: down until the first pass, which alone brings it up.
    awaiting_first_pass: bool,
    passes: u32,
    fails: u32,
    since: Instant,
    last: Option<LastResult>,
    /// Why it is down (the result that took it down), kept while results go on.
    down_reason: Option<String>,
    weight: Option<u32>,
    checks: u64,
}

/// A snapshot for `lbd status`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct StateSnapshot {
    pub state: Health,
    /// Seconds since the last change of state (or since the check started).
    pub since_secs: f64,
    pub consecutive_passes: u32,
    pub consecutive_fails: u32,
    /// Last result: passed, and why.
    pub last_ok: Option<bool>,
    pub last_reason: Option<String>,
    /// Duration of the last result's last attempt, in milliseconds.
    pub last_latency_ms: Option<f64>,
    /// Seconds since the last result.
    pub last_secs_ago: Option<f64>,
    /// Why it went down, while it is down (`"alpha: not checked yet"` before the first result).
    pub down_reason: Option<String>,
    /// Weight set by a `dynamic_weight` script.
    pub weight: Option<u32>,
    /// Checks recorded so far.
    pub checks: u64,
}

impl CheckState {
    /// A real server starting to be checked at `now`: up, or down with `alpha`.
    pub fn new(rise: u32, fall: u32, alpha: bool, now: Instant) -> CheckState {
        Self::starting(rise, fall, alpha.then(|| "alpha: not checked yet".to_string()), now)
    }

    /// A real server starting to be checked at `now`: up, or down for `down_reason` until its
    /// first pass (`alpha`, or down when lbd stopped).
    pub fn starting(rise: u32, fall: u32, down_reason: Option<String>, now: Instant) -> CheckState {
        let down = down_reason.is_some();
        CheckState {
            rise: rise.max(1),
            fall: fall.max(1),
            health: if down { Health::Down } else { Health::Up },
            awaiting_first_pass: down,
            passes: 0,
            fails: 0,
            since: now,
            last: None,
            down_reason,
            weight: None,
            checks: 0,
        }
    }

    /// New thresholds (a reload); the counters and the state are kept.
    pub fn set_thresholds(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }

    /// Forgets the weight a `dynamic_weight` script set (a reload turned `dynamic_weight` off):
    /// the configured weight applies again.
    pub fn clear_weight(&mut self) {
        self.weight = None;
    }

    pub fn health(&self) -> Health {
        self.health
    }

    pub fn is_up(&self) -> bool {
        self.health == Health::Up
    }

    /// The weight a `dynamic_weight` script set last, if any.
    pub fn weight(&self) -> Option<u32> {
        self.weight
    }

    pub fn last(&self) -> Option<&LastResult> {
        self.last.as_ref()
    }

    /// Records one check's result; returns the change it causes, if any. A check that could not
    /// run ([`ProbeResult::not_run`]: lbd out of descriptors) is no result: nothing changes, the
    /// counts in a row included.
    pub fn record(&mut self, now: Instant, result: &ProbeResult) -> Option<Transition> {
        if result.not_run {
            return None;
        }
        self.checks += 1;
        self.last = Some(LastResult {
            ok: result.ok,
            reason: result.reason.clone(),
            latency: result.latency,
            attempts: result.attempts,
            at: now,
        });
        let mut weight_changed = false;
        if result.ok {
            self.passes = self.passes.saturating_add(1);
            self.fails = 0;
            if let Some(w) = result.weight {
                weight_changed = self.weight != Some(w);
                self.weight = Some(w);
            }
        } else {
            self.fails = self.fails.saturating_add(1);
            self.passes = 0;
        }
        match self.health {
            Health::Up if !result.ok && self.fails >= self.fall => {
                self.health = Health::Down;
                self.since = now;
                self.down_reason = Some(result.reason.clone());
                Some(Transition::Down {
                    reason: result.reason.clone(),
                })
            }
            Health::Up if weight_changed => Some(Transition::Weight {
                weight: self.weight.unwrap_or_default(),
                reason: result.reason.clone(),
            }),
            Health::Down if result.ok && (self.passes >= self.rise || self.awaiting_first_pass) => {
                self.health = Health::Up;
                self.awaiting_first_pass = false;
                self.since = now;
                self.down_reason = None;
                Some(Transition::Up {
                    reason: result.reason.clone(),
                    weight: self.weight,
                })
            }
            Health::Down if self.awaiting_first_pass && !result.ok => {
                self.down_reason = Some(result.reason.clone());
                None
            }
            _ => None,
        }
    }

    /// What `lbd status` shows.
    pub fn snapshot(&self, now: Instant) -> StateSnapshot {
        let secs =
            |t: Instant| (now.saturating_duration_since(t).as_secs_f64() * 10.0).round() / 10.0;
        StateSnapshot {
            state: self.health,
            since_secs: secs(self.since),
            consecutive_passes: self.passes,
            consecutive_fails: self.fails,
            last_ok: self.last.as_ref().map(|l| l.ok),
            last_reason: self.last.as_ref().map(|l| l.reason.clone()),
            last_latency_ms: self
                .last
                .as_ref()
                .map(|l| (l.latency.as_secs_f64() * 1e6).round() / 1e3),
            last_secs_ago: self.last.as_ref().map(|l| secs(l.at)),
            down_reason: if self.health == Health::Down {
                self.down_reason.clone()
            } else {
                None
            },
            weight: self.weight,
            checks: self.checks,
        }
    }
}

/// The weight a real server gets in its virtual server's table: its dynamic weight (else the
/// configured one) while up; while down `Some(0)` with `inhibit_on_failure` (kept in the table,
/// no new flows), else `None` (removed).
pub fn table_weight(
    up: bool,
    configured: u32,
    dynamic: Option<u32>,
    inhibit_on_failure: bool,
) -> Option<u32> {
    if up {
        Some(dynamic.unwrap_or(configured))
    } else if inhibit_on_failure {
        Some(0)
    } else {
        None
    }
}

/// A virtual server's quorum: minimum total weight of live real servers (`quorum`, keepalived
/// default 1) with `hysteresis` (default 0) around it.
///
/// keepalived's rule: quorum is *gained* when the live weight reaches `quorum + hysteresis`, and
/// *lost* when it drops below `quorum - hysteresis` or to 0. In between, the state stays as it
/// was, so a weight hovering at the threshold does not switch back and forth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quorum {
    quorum: u64,
    hysteresis: u64,
    /// `None` until the first evaluation.
    up: Option<bool>,
}

/// A change of a virtual server's quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuorumChange {
    /// Enough live weight again: real servers serve, the sorry server is removed, the quorum-up
    /// command runs.
    Gained,
    /// Not enough: the sorry server (if any) serves instead, the quorum-down command runs.
    Lost,
}

/// Who serves a virtual server's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Serve {
    /// Its live real servers (also when it lost quorum but has no sorry server).
    RealServers,
    /// Its `sorry_server` alone.
    SorryServer,
}

impl Quorum {
    pub fn new(quorum: u32, hysteresis: u32) -> Quorum {
        Quorum {
            quorum: u64::from(quorum),
            hysteresis: u64::from(hysteresis),
            up: None,
        }
    }

    /// New settings (a reload); the state is kept and re-evaluated at the next [`Self::update`].
    pub fn set(&mut self, quorum: u32, hysteresis: u32) {
        self.quorum = u64::from(quorum);
        self.hysteresis = u64::from(hysteresis);
    }

    /// Whether the live weight is enough (`true` before the first evaluation).
    pub fn has_quorum(&self) -> bool {
        self.up.unwrap_or(true)
    }

    /// Evaluates the live weight (sum of the table weights of the up real servers, see
    /// [`live_weight`]). The first evaluation decides without hysteresis and reports `Lost` if the
    /// virtual server starts without quorum (so the sorry server is installed and the quorum-down
    /// command runs), nothing if it starts with it.
    pub fn update(&mut self, live_weight: u64) -> Option<QuorumChange> {
        match self.up {
            None => {
                let up = live_weight > 0 && live_weight >= self.quorum;
                self.up = Some(up);
                (!up).then_some(QuorumChange::Lost)
            }
            Some(false) if live_weight > 0 && live_weight >= self.quorum + self.hysteresis => {
                self.up = Some(true);
                Some(QuorumChange::Gained)
            }
            Some(true)
                if live_weight == 0
                    || live_weight < self.quorum.saturating_sub(self.hysteresis) =>
            {
                self.up = Some(false);
                Some(QuorumChange::Lost)
            }
            _ => None,
        }
    }

    /// Who serves, given whether a sorry server is configured.
    pub fn serve(&self, has_sorry_server: bool) -> Serve {
        if !self.has_quorum() && has_sorry_server {
            Serve::SorryServer
        } else {
            Serve::RealServers
        }
    }
}

/// Sum of the weights of the up real servers: `(up, weight)` pairs, weight as in the table.
pub fn live_weight(servers: impl IntoIterator<Item = (bool, u32)>) -> u64 {
    servers
        .into_iter()
        .filter(|(up, _)| *up)
        .map(|(_, w)| u64::from(w))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake clock: seconds since an arbitrary start.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Clock {
            Clock(Instant::now())
        }
        fn at(&self, secs: u64) -> Instant {
            self.0 + Duration::from_secs(secs)
        }
    }

    fn result(ok: bool, reason: &str) -> ProbeResult {
        ProbeResult {
            ok,
            reason: reason.into(),
            weight: None,
            latency: Duration::from_millis(3),
            attempts: 1,
            not_run: false,
        }
    }

    fn pass() -> ProbeResult {
        result(true, "HTTP 200")
    }

    fn fail() -> ProbeResult {
        result(false, "HTTP 503")
    }

    /// Feeds results one a second from t = 1; returns the transitions with their times.
    fn feed(
        state: &mut CheckState,
        clock: &Clock,
        results: &[ProbeResult],
    ) -> Vec<(u64, Transition)> {
        let mut out = Vec::new();
        for (i, r) in results.iter().enumerate() {
            let t = i as u64 + 1;
            if let Some(tr) = state.record(clock.at(t), r) {
                out.push((t, tr));
            }
        }
        out
    }

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let clock = Clock::new();
        let mut s = CheckState::new(2, 3, false, clock.at(0));
        assert!(s.is_up());
        let down = Transition::Down {
            reason: "HTTP 503".into(),
        };
        let up = Transition::Up {
            reason: "HTTP 200".into(),
            weight: None,
        };
        // Two fails, a pass resets, then three fails: down at t=6, once.
        let got = feed(
            &mut s,
            &clock,
            &[fail(), fail(), pass(), fail(), fail(), fail(), fail()],
        );
        assert_eq!(got, [(6, down.clone())]);
        let snap = s.snapshot(clock.at(10));
        assert_eq!(
            (
                snap.state,
                snap.since_secs,
                snap.consecutive_fails,
                snap.consecutive_passes
            ),
            (Health::Down, 4.0, 4, 0)
        );
        assert_eq!(snap.down_reason.as_deref(), Some("HTTP 503"));
        assert_eq!(
            (
                snap.last_ok,
                snap.last_reason.as_deref(),
                snap.last_secs_ago,
                snap.checks
            ),
            (Some(false), Some("HTTP 503"), Some(3.0), 7)
        );
        // One pass is not enough to come back, two are.
        let mut s2 = s.clone();
        let got = feed(&mut s2, &clock, &[pass(), fail(), pass(), pass(), pass()]);
        assert_eq!(got, [(4, up)]);
        assert_eq!(s2.snapshot(clock.at(4)).down_reason, None);
    }

    #[test]
    fn flapping_does_not_toggle() {
        let clock = Clock::new();
        let mut s = CheckState::new(2, 2, false, clock.at(0));
        let flapping: Vec<_> = (0..20)
            .map(|i| if i % 2 == 0 { fail() } else { pass() })
            .collect();
        assert_eq!(feed(&mut s, &clock, &flapping), []);
        assert!(s.is_up());
        // Once down, flapping does not bring it back either.
        feed(&mut s, &clock, &[fail(), fail()]);
        assert!(!s.is_up());
        assert_eq!(feed(&mut s, &clock, &flapping), []);
        assert!(!s.is_up());
    }

    #[test]
    fn keepalived_defaults_switch_on_every_result() {
        let clock = Clock::new();
        let mut s = CheckState::new(1, 1, false, clock.at(0));
        let got = feed(&mut s, &clock, &[fail(), pass(), pass(), fail()]);
        let kinds: Vec<_> = got
            .iter()
            .map(|(t, tr)| (*t, matches!(tr, Transition::Up { .. })))
            .collect();
        assert_eq!(kinds, [(1, false), (2, true), (4, false)]);
    }

    #[test]
    fn alpha_starts_down_until_the_first_pass() {
        let clock = Clock::new();
        let mut s = CheckState::new(3, 1, true, clock.at(0));
        assert!(!s.is_up());
        assert_eq!(
            s.snapshot(clock.at(0)).down_reason.as_deref(),
            Some("alpha: not checked yet")
        );
        let timeout = result(false, "timeout after 500ms");
        // Failures keep it down (and say why); the first pass brings it up despite rise = 3.
        let got = feed(&mut s, &clock, &[timeout.clone(), timeout, pass()]);
        assert_eq!(
            got,
            [(
                3,
                Transition::Up {
                    reason: "HTTP 200".into(),
                    weight: None
                }
            )]
        );
        // After that, rise applies.
        feed(&mut s, &clock, &[fail()]);
        assert!(!s.is_up());
        assert_eq!(feed(&mut s, &clock, &[pass(), pass()]), []);
        assert_eq!(feed(&mut s, &clock, &[pass()]).len(), 1);
    }

    #[test]
    fn alpha_reports_the_reason_while_waiting() {
        let clock = Clock::new();
        let mut s = CheckState::new(1, 1, true, clock.at(0));
        assert_eq!(
            s.record(clock.at(1), &result(false, "connection refused")),
            None
        );
        assert_eq!(
            s.snapshot(clock.at(1)).down_reason.as_deref(),
            Some("connection refused")
        );
    }

    #[test]
    fn dynamic_weight() {
        let clock = Clock::new();
        let mut s = CheckState::new(1, 1, false, clock.at(0));
        let weighted = |w: u32| ProbeResult {
            weight: Some(w),
            ..result(true, &format!("script exit {} (weight {w})", w + 2))
        };
        assert_eq!(
            s.record(clock.at(1), &weighted(3)),
            Some(Transition::Weight {
                weight: 3,
                reason: "script exit 5 (weight 3)".into()
            })
        );
        assert_eq!(
            s.record(clock.at(2), &weighted(3)),
            None,
            "same weight: nothing to do"
        );
        // Exit 0 keeps the weight last set (keepalived's misc_dynamic).
        assert_eq!(s.record(clock.at(3), &result(true, "script exit 0")), None);
        assert_eq!(s.weight(), Some(3));
        // Down, then up with a new weight: the Up transition carries it.
        assert!(matches!(
            s.record(clock.at(4), &result(false, "script exit 1")),
            Some(Transition::Down { .. })
        ));
        assert_eq!(
            s.record(clock.at(5), &weighted(7)),
            Some(Transition::Up {
                reason: "script exit 9 (weight 7)".into(),
                weight: Some(7)
            })
        );
        assert_eq!(table_weight(s.is_up(), 1, s.weight(), false), Some(7));
    }

    /// A check that could not run (lbd out of descriptors) neither takes a real server down nor
    /// brings it up, and does not break a run of results in a row.
    #[test]
    fn a_check_that_could_not_run_changes_nothing() {
        let clock = Clock::new();
        let not_run = ProbeResult { not_run: true, ..result(false, "too many open files") };
        let mut up = CheckState::new(1, 2, false, clock.at(0));
        assert_eq!(feed(&mut up, &clock, &[not_run.clone(), not_run.clone(), not_run.clone()]), vec![]);
        assert!(up.is_up());
        assert_eq!(up.snapshot(clock.at(4)).checks, 0);
        assert!(up.last().is_none());
        // One failure, a check that did not run, another failure: two in a row, down.
        assert_eq!(feed(&mut up, &clock, &[fail(), not_run.clone()]), vec![]);
        assert_eq!(up.record(clock.at(3), &fail()), Some(Transition::Down { reason: "HTTP 503".into() }));

        // Nor does it bring up a real server down with alpha.
        let mut alpha = CheckState::new(1, 1, true, clock.at(0));
        feed(&mut alpha, &clock, &[not_run.clone(), not_run]);
        assert!(!alpha.is_up());
        assert_eq!(alpha.snapshot(clock.at(3)).down_reason.as_deref(), Some("alpha: not checked yet"));
    }

    #[test]
    fn retries_are_inside_one_result() {
        // A result that needed retries counts once; its attempts are shown.
        let clock = Clock::new();
        let mut s = CheckState::new(1, 2, false, clock.at(0));
        let retried = ProbeResult {
            attempts: 3,
            ..fail()
        };
        assert_eq!(s.record(clock.at(1), &retried), None);
        assert_eq!(s.last().unwrap().attempts, 3);
        assert!(s.record(clock.at(2), &retried).is_some());
    }

    #[test]
    fn thresholds_change_on_reload() {
        let clock = Clock::new();
        let mut s = CheckState::new(5, 5, false, clock.at(0));
        feed(&mut s, &clock, &[fail(), fail()]);
        s.set_thresholds(5, 3);
        assert!(
            s.record(clock.at(3), &fail()).is_some(),
            "third fail in a row with fall = 3"
        );
    }

    #[test]
    fn table_weights() {
        assert_eq!(table_weight(true, 5, None, false), Some(5));
        assert_eq!(table_weight(true, 5, Some(2), false), Some(2));
        assert_eq!(
            table_weight(false, 5, None, true),
            Some(0),
            "inhibit_on_failure keeps it at weight 0"
        );
        assert_eq!(table_weight(false, 5, None, false), None, "removed");
    }

    #[test]
    fn quorum_with_hysteresis() {
        // quorum 4, hysteresis 1: lost below 3, gained again at 5.
        let mut q = Quorum::new(4, 1);
        assert!(q.has_quorum());
        assert_eq!(q.update(6), None, "starts with quorum");
        let steps = [
            (4, None),
            (3, None),
            (2, Some(QuorumChange::Lost)),
            (3, None),
            (4, None),
            (5, Some(QuorumChange::Gained)),
            (3, None),
        ];
        for (weight, want) in steps {
            assert_eq!(q.update(weight), want, "live weight {weight}");
        }
        assert!(q.has_quorum());
        assert_eq!(
            q.update(0),
            Some(QuorumChange::Lost),
            "no live weight always loses quorum"
        );
    }

    #[test]
    fn quorum_defaults_and_start_without_quorum() {
        // keepalived defaults: quorum 1, hysteresis 0: any live server keeps the service up.
        let mut q = Quorum::new(1, 0);
        assert_eq!(q.update(1), None);
        assert_eq!(q.update(0), Some(QuorumChange::Lost));
        assert_eq!(q.update(1), Some(QuorumChange::Gained));

        // Starting below quorum (alpha: every real server down) reports Lost once.
        let mut q = Quorum::new(2, 0);
        assert_eq!(q.update(0), Some(QuorumChange::Lost));
        assert_eq!(q.update(1), None);
        assert_eq!(q.update(2), Some(QuorumChange::Gained));

        // Hysteresis larger than quorum: only zero weight loses it.
        let mut q = Quorum::new(1, 3);
        assert_eq!(q.update(1), None);
        assert_eq!(q.update(0), Some(QuorumChange::Lost));
        assert_eq!(q.update(3), None);
        assert_eq!(q.update(4), Some(QuorumChange::Gained));
    }

    #[test]
    fn sorry_server_serves_only_without_quorum() {
        let clock = Clock::new();
        // Three real servers of weights 1, 2, 3, quorum 4: fall = 1.
        let weights = [1u32, 2, 3];
        let mut states: Vec<_> = weights
            .iter()
            .map(|_| CheckState::new(1, 1, false, clock.at(0)))
            .collect();
        let mut q = Quorum::new(4, 0);
        let live = |states: &[CheckState]| {
            live_weight(states.iter().zip(weights).map(|(s, w)| {
                (
                    s.is_up(),
                    table_weight(s.is_up(), w, s.weight(), false).unwrap_or(0),
                )
            }))
        };
        assert_eq!(q.update(live(&states)), None);
        assert_eq!(q.serve(true), Serve::RealServers);
        states[2].record(clock.at(1), &fail()); // 1 + 2 = 3 < 4
        assert_eq!(q.update(live(&states)), Some(QuorumChange::Lost));
        assert_eq!(q.serve(true), Serve::SorryServer);
        assert_eq!(
            q.serve(false),
            Serve::RealServers,
            "without a sorry server the live ones keep serving"
        );
        states[2].record(clock.at(2), &pass());
        assert_eq!(q.update(live(&states)), Some(QuorumChange::Gained));
        assert_eq!(q.serve(true), Serve::RealServers);
    }
}
