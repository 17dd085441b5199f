//! A circuit breaker for the Redis tier: after a few consecutive failures it stops
//! waiting on Redis for a cool-down, then lets one probe through.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::BreakerState;

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

/// The breaker. Every call that [`Breaker::allow`]s must report [`Breaker::success`] or
/// [`Breaker::failure`]; a probe that never reports is replaced after one cool-down.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures and stays open for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a call may go to Redis now. When the cool-down has passed, the first caller
    /// becomes the probe and the others are still refused until it reports.
    pub fn allow(&self) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } | State::HalfOpen { since: until } if now < until => false,
            State::Open { .. } | State::HalfOpen { .. } => {
                *state = State::HalfOpen {
                    since: now + self.cooldown,
                };
                true
            }
        }
    }

    /// Reports a successful call: the breaker closes. Returns whether it was not closed
    /// before (Redis has come back).
    pub fn success(&self) -> bool {
        let previous = std::mem::replace(&mut *self.lock(), State::Closed { failures: 0 });
        !matches!(previous, State::Closed { .. })
    }

    /// Reports a failed call (error or timeout). Returns whether this failure opened the
    /// breaker.
    pub fn failure(&self) -> bool {
        let mut state = self.lock();
        let was_closed = matches!(*state, State::Closed { .. });
        *state = match *state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: Instant::now() + self.cooldown,
            },
        };
        was_closed && matches!(*state, State::Open { .. })
    }

    /// The current state, for metrics.
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
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
    fn refuses_while_open() {
        let b = Breaker::new(1, Duration::from_secs(60));
        b.failure();
        assert!(!b.allow());
        assert_eq!(b.state(), BreakerState::Open);
    }
}
