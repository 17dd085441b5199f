//! Request coalescing: concurrent misses for one key send one request to the upstream.
//!
//! The first request for a key becomes the leader; later ones become followers and wait
//! (up to a limit) for how the leader's flight ends:
//! - [`Leader::share`]: every follower gets the value;
//! - [`Leader::release`]: the answer was private to the leader's requester, so each
//!   follower goes to the upstream itself;
//! - [`Leader::fail`], or the leader dropped without a word (its client went away): the
//!   followers join again, so one of them becomes the new leader — one more upstream
//!   request, not one per follower.
//!
//! Generic over the shared value so that the library API can use the same engine.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// How a flight stands, as seen by its followers.
#[derive(Clone)]
enum Flight<V> {
    Pending,
    Shared(V),
    Released,
    Failed,
}

type Slot<V> = watch::Receiver<Flight<V>>;

/// The table of keys with a request in flight.
pub struct Coalescer<K, V> {
    inflight: Arc<Mutex<HashMap<K, Slot<V>>>>,
}

/// Cloning shares the table: clones coalesce with each other.
impl<K, V> Clone for Coalescer<K, V> {
    fn clone(&self) -> Self {
        Coalescer {
            inflight: self.inflight.clone(),
        }
    }
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
    /// The one request that goes to the upstream; it ends the flight with
    /// [`Leader::share`], [`Leader::release`] or [`Leader::fail`] (dropping it fails).
    Leader(Leader<K, V>),
    /// A request that waits for the leader.
    Follower(Follower<V>),
}

/// Held by the leader. Dropping it without ending the flight counts as [`Leader::fail`].
pub struct Leader<K: Hash + Eq + Clone, V> {
    key: K,
    tx: watch::Sender<Flight<V>>,
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
    /// The leader's answer may not be shared: go to the upstream yourself.
    Released,
    /// The leader failed or went away: join again (one follower becomes the new leader).
    Failed,
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
        let (tx, rx) = watch::channel(Flight::Pending);
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
    /// Ends the flight and hands `value` to every follower. Store the result in the cache
    /// before calling this, so that requests arriving after the flight ends find it there.
    pub fn share(self, value: V) {
        self.end(Flight::Shared(value));
    }

    /// Ends the flight with an answer the followers may not have (private to the
    /// leader's requester, or streamed because it is too large to hold): each goes itself.
    pub fn release(self) {
        self.end(Flight::Released);
    }

    /// Ends the flight without an answer: the followers join again.
    pub fn fail(self) {
        self.end(Flight::Failed);
    }

    fn end(&self, flight: Flight<V>) {
        self.remove_entry();
        self.tx.send_replace(flight);
    }

    fn remove_entry(&self) {
        let mut map = lock(&self.inflight);
        if map
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            map.remove(&self.key);
        }
    }
}

impl<K: Hash + Eq + Clone, V> Drop for Leader<K, V> {
    fn drop(&mut self) {
        self.remove_entry();
        if matches!(*self.tx.borrow(), Flight::Pending) {
            self.tx.send_replace(Flight::Failed);
        }
    }
}

impl<V: Clone> Follower<V> {
    /// Waits up to `limit` for the leader's value.
    pub async fn wait(mut self, limit: Duration) -> WaitOutcome<V> {
        let ended = self.rx.wait_for(|f| !matches!(f, Flight::Pending));
        match tokio::time::timeout(limit, ended).await {
            Ok(Ok(flight)) => match flight.clone() {
                Flight::Shared(v) => WaitOutcome::Shared(v),
                Flight::Released => WaitOutcome::Released,
                Flight::Pending | Flight::Failed => WaitOutcome::Failed,
            },
            Ok(Err(_closed)) => WaitOutcome::Failed,
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
        leader.share(7);
        assert!(matches!(waiter.await.unwrap(), WaitOutcome::Shared(7)));
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn dropped_or_failed_leader_sends_followers_back_to_join() {
        let c: Coalescer<u32, u32> = Coalescer::default();
        let leader = c.join(&1);
        let Role::Follower(f) = c.join(&1) else {
            panic!()
        };
        drop(leader);
        assert!(matches!(
            f.wait(Duration::from_secs(5)).await,
            WaitOutcome::Failed
        ));
        let Role::Leader(leader) = c.join(&1) else {
            panic!("the first to join again leads")
        };
        let Role::Follower(f) = c.join(&1) else {
            panic!()
        };
        leader.fail();
        assert!(matches!(
            f.wait(Duration::from_secs(5)).await,
            WaitOutcome::Failed
        ));
    }

    #[tokio::test]
    async fn private_answers_send_followers_on_their_own() {
        let c: Coalescer<u32, u32> = Coalescer::default();
        let Role::Leader(leader) = c.join(&1) else {
            panic!()
        };
        let Role::Follower(f) = c.join(&1) else {
            panic!()
        };
        leader.release();
        assert!(matches!(
            f.wait(Duration::from_secs(5)).await,
            WaitOutcome::Released
        ));
        assert_eq!(c.in_flight(), 0);
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
