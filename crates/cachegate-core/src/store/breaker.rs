//! A circuit breaker for the Redis tier: after a few consecutive failures it stops
//! waiting on Redis for a cool-down, then lets one probe through.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::BreakerState;

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

/// The breaker. Every call that [`Breaker::allow`]s must report [`Breaker::success`] or
/// [`Breaker::failure`]; a probe that never reports is replaced after one cool-down.
///
/// While closed without failures (the common case) allowing, reporting a success and
/// reading the state take no lock and write nothing shared: one atomic read. A success
/// racing with a failure may then leave that failure counted.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    /// `state` is `Closed { failures: 0 }` (written under its lock).
    clean: AtomicBool,
    /// Follows the state ([`BreakerState`]), written under its lock.
    gauge: Option<Gauge>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures and stays open for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            clean: AtomicBool::new(true),
            gauge: None,
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// The same, with `gauge` kept at the state (see [`BreakerState`]) as it changes.
    pub fn with_gauge(mut self, gauge: Gauge) -> Self {
        gauge.set(BreakerState::Closed as i64);
        self.gauge = Some(gauge);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_clean(&self) -> bool {
        self.clean.load(Ordering::Acquire)
    }

    /// Sets the state (under its lock) and the lock-free flag and the gauge with it.
    fn set(&self, state: &mut State, next: State) {
        *state = next;
        self.clean.store(
            matches!(next, State::Closed { failures: 0 }),
            Ordering::Release,
        );
        if let Some(gauge) = &self.gauge {
            gauge.set(Self::kind(&next) as i64);
        }
    }

    fn kind(state: &State) -> BreakerState {
        match state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a call may go to Redis now. When the cool-down has passed, the first caller
    /// becomes the probe and the others are still refused until it reports.
    pub fn allow(&self) -> bool {
        if self.is_clean() {
            return true;
        }
        let mut state = self.lock();
        let now = Instant::now();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } | State::HalfOpen { since: until } if now < until => false,
            State::Open { .. } | State::HalfOpen { .. } => {
                let next = State::HalfOpen {
                    since: now + self.cooldown,
                };
                self.set(&mut state, next);
                true
            }
        }
    }

    /// Reports a successful call: the breaker closes. Returns whether it was not closed
    /// before (Redis has come back).
    pub fn success(&self) -> bool {
        if self.is_clean() {
            return false;
        }
        let mut state = self.lock();
        let previous = *state;
        self.set(&mut state, State::Closed { failures: 0 });
        !matches!(previous, State::Closed { .. })
    }

    /// Reports a failed call (error or timeout). Returns whether this failure opened the
    /// breaker.
    pub fn failure(&self) -> bool {
        let mut state = self.lock();
        let was_closed = matches!(*state, State::Closed { .. });
        let next = match *state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: Instant::now() + self.cooldown,
            },
        };
        self.set(&mut state, next);
        was_closed && matches!(*state, State::Open { .. })
    }

    /// The current state, for metrics.
    pub fn state(&self) -> BreakerState {
        if self.is_clean() {
            return BreakerState::Closed;
        }
        Self::kind(&self.lock())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_then_probes() {
        let b = Breaker::new(2, Duration::from_millis(0));
        assert!(b.allow());
        assert!(!b.failure());
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.failure(), "the second failure opens it");
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.allow()); // cool-down of zero: this caller is the probe
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.success(), "the probe's success closes it");
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.success());
    }

    #[test]
    fn a_success_clears_the_failures() {
        let b = Breaker::new(2, Duration::from_secs(60));
        assert!(!b.failure());
        assert!(!b.success(), "it was closed");
        assert!(!b.failure(), "the count starts again");
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.failure());
        assert!(!b.allow());
    }

    #[test]
    fn the_gauge_follows_every_change() {
        let gauge = Gauge::default();
        let b = Breaker::new(1, Duration::from_millis(0)).with_gauge(gauge.clone());
        assert_eq!(gauge.get(), BreakerState::Closed as i64);
        b.failure();
        assert_eq!(gauge.get(), BreakerState::Open as i64);
        assert!(b.allow());
        assert_eq!(gauge.get(), BreakerState::HalfOpen as i64);
        b.failure();
        assert_eq!(gauge.get(), BreakerState::Open as i64);
        assert!(b.allow());
        b.success();
        assert_eq!(gauge.get(), BreakerState::Closed as i64);
    }

    #[test]
    fn refuses_while_open() {
        let b = Breaker::new(1, Duration::from_secs(60));
        b.failure();
        assert!(!b.allow());
        assert_eq!(b.state(), BreakerState::Open);
    }
}
