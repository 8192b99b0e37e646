//! A per-backend circuit breaker: closed while the failure ratio over a sliding window stays
//! under the threshold; open (no traffic) for a cooldown once it is reached; then half-open, where
//! one probe (a real request or an active health check) decides between closed and open again.
//!
//! Time is passed in, so the state machine is tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }

    /// The gauge value exported in metrics (0 closed, 1 half-open, 2 open).
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

/// Most outcomes kept in the window, whatever its length in time.
const MAX_WINDOW: usize = 1024;

#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: config::Breaker,
    state: State,
    window: VecDeque<(Instant, bool)>,
    opened_at: Option<Instant>,
    probing: bool,
    failures_in_a_row: u32,
    /// Times it opened, for metrics and the admin view.
    pub opened_count: u64,
}

impl Breaker {
    pub fn new(cfg: config::Breaker) -> Breaker {
        Breaker {
            cfg,
            state: State::Closed,
            window: VecDeque::new(),
            opened_at: None,
            probing: false,
            failures_in_a_row: 0,
            opened_count: 0,
        }
    }

    /// A reload keeps the state and the window, with the new thresholds.
    pub fn reconfigure(&mut self, cfg: config::Breaker) {
        self.cfg = cfg;
    }

    pub fn state(&self) -> State {
        self.state
    }

    fn cooled(&self, now: Instant) -> bool {
        self.opened_at.is_none_or(|t| {
            now.saturating_duration_since(t) >= Duration::from_millis(self.cfg.cooldown_ms)
        })
    }

    /// Whether a request may be sent now (without taking the half-open probe).
    pub fn available(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open => self.cooled(now),
            State::HalfOpen => !self.probing,
        }
    }

    /// Takes permission for one request; in half-open state only one is let through at a time.
    pub fn begin(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open if self.cooled(now) => {
                self.state = State::HalfOpen;
                self.probing = true;
                true
            }
            State::HalfOpen if !self.probing => {
                self.probing = true;
                true
            }
            _ => false,
        }
    }

    /// The outcome of a request let through by `begin`.
    pub fn record(&mut self, now: Instant, ok: bool) {
        match self.state {
            State::Closed => {
                self.window.push_back((now, ok));
                self.prune(now);
                self.failures_in_a_row = if ok { 0 } else { self.failures_in_a_row + 1 };
                let total = self.window.len();
                let failed = self.window.iter().filter(|(_, ok)| !ok).count();
                let ratio_hit = total >= self.cfg.min_requests as usize
                    && failed as f64 >= self.cfg.failure_ratio * total as f64;
                if ratio_hit || self.failures_in_a_row >= self.cfg.consecutive_failures {
                    self.open(now);
                }
            }
            State::HalfOpen => {
                self.probing = false;
                if ok {
                    self.close();
                } else {
                    self.open(now);
                }
            }
            // Answers to requests sent before it opened change nothing.
            State::Open => {}
        }
    }

    /// An active health check: once cooled down, a passing check is the probe that closes it.
    pub fn health(&mut self, now: Instant, ok: bool) {
        if ok && self.state != State::Closed && self.cooled(now) {
            self.close();
        }
    }

    /// A request let through by `begin` that ended without saying anything about the backend
    /// (the client left, or the backend refused the request itself): frees the probe slot.
    pub fn abandon(&mut self) {
        self.probing = false;
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open;
        self.opened_at = Some(now);
        self.window.clear();
        self.failures_in_a_row = 0;
        self.opened_count += 1;
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.opened_at = None;
        self.window.clear();
        self.probing = false;
    }

    fn prune(&mut self, now: Instant) {
        let window = Duration::from_millis(self.cfg.window_ms);
        while let Some(&(t, _)) = self.window.front() {
            if now.saturating_duration_since(t) > window || self.window.len() > MAX_WINDOW {
                self.window.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> config::Breaker {
        config::Breaker {
            failure_ratio: 0.5,
            min_requests: 4,
            window_ms: 10_000,
            cooldown_ms: 1_000,
            consecutive_failures: 5,
        }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn opens_on_the_ratio_then_probes_after_the_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for (i, ok) in [true, false, true].into_iter().enumerate() {
            assert!(b.begin(ms(t0, i as u64)));
            b.record(ms(t0, i as u64), ok);
        }
        assert_eq!(
            b.state(),
            State::Closed,
            "3 requests are under min_requests"
        );
        b.record(ms(t0, 3), false);
        assert_eq!(b.state(), State::Open, "2 of 4 failed");
        assert!(!b.available(ms(t0, 500)) && !b.begin(ms(t0, 500)));
        assert!(b.begin(ms(t0, 1_003)), "cooled down: one probe");
        assert_eq!(b.state(), State::HalfOpen);
        assert!(!b.begin(ms(t0, 1_004)), "only one probe at a time");
        b.record(ms(t0, 1_010), false);
        assert_eq!(b.state(), State::Open, "a failed probe reopens");
        assert!(b.begin(ms(t0, 2_020)));
        b.record(ms(t0, 2_030), true);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.opened_count, 2);
    }

    #[test]
    fn a_passing_health_check_closes_it_only_after_the_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for i in 0..4 {
            b.record(ms(t0, i), false);
        }
        b.health(ms(t0, 10), true);
        assert_eq!(b.state(), State::Open);
        b.health(ms(t0, 1_010), false);
        assert_eq!(b.state(), State::Open);
        b.health(ms(t0, 1_020), true);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn failures_in_a_row_open_it_despite_a_good_past() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for i in 0..100 {
            b.record(ms(t0, i), true);
        }
        for i in 0..4 {
            b.record(ms(t0, 100 + i), false);
        }
        assert_eq!(b.state(), State::Closed);
        b.record(ms(t0, 105), false);
        assert_eq!(b.state(), State::Open, "5 in a row");
    }

    #[test]
    fn old_failures_leave_the_window() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for i in 0..3 {
            b.record(ms(t0, i), false);
        }
        b.record(ms(t0, 20_000), false);
        assert_eq!(
            b.state(),
            State::Closed,
            "the first three are out of the window"
        );
    }

    proptest! {
        /// Whatever the sequence, an open breaker lets nothing through before its cooldown, and
        /// a half-open one never has two probes out.
        #[test]
        fn never_more_than_one_probe(events in proptest::collection::vec((0u64..400, 0u8..4), 1..200)) {
            let t0 = Instant::now();
            let mut b = Breaker::new(cfg());
            let mut now = 0;
            let mut probes_out = 0;
            for (dt, what) in events {
                now += dt;
                let t = ms(t0, now);
                match what {
                    0 => {
                        let before = b.state();
                        let opened = b.opened_at;
                        if b.begin(t) {
                            if before == State::Open {
                                prop_assert!(t.duration_since(opened.unwrap()) >= Duration::from_millis(1_000));
                            }
                            if b.state() == State::HalfOpen {
                                probes_out += 1;
                                prop_assert!(probes_out <= 1);
                            }
                        }
                    }
                    1 | 2 => {
                        if b.state() == State::HalfOpen && probes_out > 0 {
                            probes_out -= 1;
                        }
                        b.record(t, what == 1);
                    }
                    _ => {
                        b.health(t, true);
                        if b.state() == State::Closed {
                            probes_out = 0;
                        }
                    }
                }
            }
        }
    }
}
