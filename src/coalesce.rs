//! Request coalescing: concurrent misses for one key send one request to the upstream.
//!
//! The first request for a key becomes the leader; later ones become followers and wait
//! (up to a limit) for what the leader publishes. If the leader publishes nothing — its
//! response was private, it failed, or its task was dropped — followers are told to go to
//! the upstream themselves. Generic over the shared value so that the library API can use
//! the same engine.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

type Slot<V> = watch::Receiver<Option<V>>;

/// The table of keys with a request in flight.
pub struct Coalescer<K, V> {
    inflight: Arc<Mutex<HashMap<K, Slot<V>>>>,
}

impl<K, V> Default for Coalescer<K, V> {
    fn default() -> Self {
        Coalescer {
            inflight: Arc::default(),
        }
    }
}

/// What a request is for its key.
pub enum Role<K: Hash + Eq + Clone, V: Clone> {
    /// The one request that goes to the upstream; it must call [`Leader::publish`] or be
    /// dropped.
    Leader(Leader<K, V>),
    /// A request that waits for the leader.
    Follower(Follower<V>),
}

/// Held by the leader. Dropping it without publishing releases the followers.
pub struct Leader<K: Hash + Eq + Clone, V> {
    key: K,
    tx: watch::Sender<Option<V>>,
    inflight: Arc<Mutex<HashMap<K, Slot<V>>>>,
}

/// Held by a follower.
pub struct Follower<V> {
    rx: Slot<V>,
}

/// How a follower's wait ended.
pub enum WaitOutcome<V> {
    /// The leader shared its result.
    Shared(V),
    /// The leader finished without sharing (or went away).
    Abandoned,
    /// The wait limit passed first.
    TimedOut,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<K: Hash + Eq + Clone, V: Clone> Coalescer<K, V> {
    /// Joins the flight for `key`: leader if none is in flight, follower otherwise.
    pub fn join(&self, key: &K) -> Role<K, V> {
        let mut map = lock(&self.inflight);
        if let Some(rx) = map.get(key) {
            return Role::Follower(Follower { rx: rx.clone() });
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx);
        Role::Leader(Leader {
            key: key.clone(),
            tx,
            inflight: self.inflight.clone(),
        })
    }

    /// Keys with a request in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.inflight).len()
    }
}

impl<K: Hash + Eq + Clone, V> Leader<K, V> {
    /// Ends the flight and hands `value` to every follower (`None`: they go themselves).
    /// Store the result in the cache before calling this, so that requests arriving after
    /// the flight ends find it there.
    pub fn publish(self, value: Option<V>) {
        lock(&self.inflight).remove(&self.key);
        if let Some(v) = value {
            let _ = self.tx.send(Some(v));
        }
        // Dropping `self` now closes the channel for followers that got nothing.
    }
}

impl<K: Hash + Eq + Clone, V> Drop for Leader<K, V> {
    fn drop(&mut self) {
        let mut map = lock(&self.inflight);
        if map
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            map.remove(&self.key);
        }
    }
}

impl<V: Clone> Follower<V> {
    /// Waits up to `limit` for the leader's value.
    pub async fn wait(mut self, limit: Duration) -> WaitOutcome<V> {
        match tokio::time::timeout(limit, self.rx.wait_for(Option::is_some)).await {
            Ok(Ok(v)) => match v.clone() {
                Some(v) => WaitOutcome::Shared(v),
                None => WaitOutcome::Abandoned,
            },
            Ok(Err(_closed)) => WaitOutcome::Abandoned,
            Err(_elapsed) => WaitOutcome::TimedOut,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_value() {
        let c: Coalescer<u32, u32> = Coalescer::default();
        let Role::Leader(leader) = c.join(&1) else {
            panic!("first is leader")
        };
        let Role::Follower(f) = c.join(&1) else {
            panic!("second follows")
        };
        let waiter = tokio::spawn(f.wait(Duration::from_secs(5)));
        leader.publish(Some(7));
        assert!(matches!(waiter.await.unwrap(), WaitOutcome::Shared(7)));
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn dropped_leader_releases_followers() {
        let c: Coalescer<u32, u32> = Coalescer::default();
        let leader = c.join(&1);
        let Role::Follower(f) = c.join(&1) else {
            panic!()
        };
        drop(leader);
        assert!(matches!(
            f.wait(Duration::from_secs(5)).await,
            WaitOutcome::Abandoned
        ));
        assert!(matches!(c.join(&1), Role::Leader(_)));
    }

    #[tokio::test]
    async fn wait_is_bounded() {
        let c: Coalescer<u32, u32> = Coalescer::default();
        let _leader = c.join(&1);
        let Role::Follower(f) = c.join(&1) else {
            panic!()
        };
        assert!(matches!(
            f.wait(Duration::from_millis(10)).await,
            WaitOutcome::TimedOut
        ));
    }
}
