//! The switches that can change while cachegate runs: the kill switch and the rollout.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::key::CacheKey;

/// Switches that can change while running: the kill switch and the rollout share.
#[derive(Debug)]
pub struct Switches {
    enabled: AtomicBool,
    rollout_percent: AtomicU8,
}

impl Switches {
    /// Sets both switches.
    pub fn new(enabled: bool, rollout_percent: u8) -> Self {
        Switches {
            enabled: AtomicBool::new(enabled),
            rollout_percent: AtomicU8::new(rollout_percent.min(100)),
        }
    }

    /// Turns caching on or off (off: pure pass-through).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Sets the share of keys that are cached, 0-100.
    pub fn set_rollout_percent(&self, percent: u8) {
        self.rollout_percent
            .store(percent.min(100), Ordering::Relaxed);
    }

    /// Whether caching is on.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The share of keys that are cached, 0-100.
    pub fn rollout_percent(&self) -> u8 {
        self.rollout_percent.load(Ordering::Relaxed)
    }

    /// Whether `key` falls inside the rollout share.
    pub fn rolled_out(&self, key: &CacheKey) -> bool {
        key.rollout_bucket() < self.rollout_percent.load(Ordering::Relaxed)
    }
}
