//! The home runtime of a component's background work.
//!
//! A process may poll one component from several Tokio runtimes: cachegate serves client
//! connections on connection threads, each with its own single-threaded runtime, and they
//! all share one Redis tier and one upstream connection pool. What such a component
//! starts in the background (a connection's driver task, a reconnect, a write left to
//! finish after its caller moved on) belongs on the runtime the component was made on, not
//! on whichever thread happened to poll it first: there it is not held up by one busy
//! connection thread, and it outlives the connection threads at shutdown.
//!
//! The other way round, a thread that drives a runtime of its own for as long as the
//! components it uses live (a connection thread) can say so ([`mark_thread_lasting`]):
//! a component may then keep per-thread state whose tasks run there, such as the Redis
//! tier's per-thread read connections.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// A component's home runtime (see the module docs), or none ([`Home::none`], the
/// default): then its work runs on whichever runtime polls it.
///
/// A home must outlive the component and keep running (a multi-threaded runtime, or one
/// that some thread drives): work sent there from a runtime that is gone or idle would
/// never run.
#[derive(Clone, Debug, Default)]
pub struct Home(Option<Handle>);

impl Home {
    /// The runtime this is called from, if any.
    pub fn current() -> Home {
        Home(Handle::try_current().ok())
    }

    /// No home: work runs where it is polled or spawned from.
    pub fn none() -> Home {
        Home(None)
    }

    /// Spawns `task` on the home runtime (on the current one without a home).
    ///
    /// Panics without a home when called outside a runtime, as `tokio::spawn` does.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            Some(home) => home.spawn(task),
            None => tokio::spawn(task),
        }
    }

    /// Polls `fut` where it is awaited (its own work is done on the caller's thread), inside
    /// the home runtime's context: the tasks it spawns, the sockets it opens and the timers
    /// it sets belong to the home runtime.
    pub fn run<F: Future>(&self, fut: F) -> AtHome<'_, F> {
        AtHome {
            home: self.0.as_ref(),
            fut,
        }
    }
}

thread_local! {
    static LASTING: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as *lasting*: it drives one current-thread Tokio runtime, the
/// one it is on now, until the components it uses are dropped or no longer used from it
/// (cachegate's connection threads). Tasks spawned from it then run on this thread, for as
/// long as what spawned them is used from it; components may keep per-thread connections
/// whose driver tasks run here (`RedisTier::get`). Never call it on a thread whose runtime
/// may end before its components (a test's runtime, a library user's thread): their
/// per-thread connections would end with it.
pub fn mark_thread_lasting() {
    LASTING.set(true);
}

/// Whether [`mark_thread_lasting`] was called on this thread.
pub fn thread_is_lasting() -> bool {
    LASTING.get()
}

pin_project_lite::pin_project! {
    /// A future polled inside its home runtime's context: [`Home::run`].
    pub struct AtHome<'a, F> {
        home: Option<&'a Handle>,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for AtHome<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _entered = this.home.map(Handle::enter);
        this.fut.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime_id() -> tokio::runtime::Id {
        Handle::current().id()
    }

    #[test]
    fn work_started_from_another_runtime_runs_on_the_home_runtime() {
        let home_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (home, home_id) = home_rt.block_on(async { (Home::current(), runtime_id()) });
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        other.block_on(async {
            let here = runtime_id();
            assert_ne!(here, home_id);
            // Spawned: on the home runtime.
            assert_eq!(home.spawn(async { runtime_id() }).await.unwrap(), home_id);
            // Run: polled here, but what it spawns goes home, and its timers fire.
            let spawned = home
                .run(async {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    tokio::spawn(async { runtime_id() }).await.unwrap()
                })
                .await;
            assert_eq!(spawned, home_id);
            // Without a home: the current runtime.
            let nowhere = std::thread::spawn(Home::current).join().unwrap();
            assert_eq!(nowhere.spawn(async { runtime_id() }).await.unwrap(), here);
            let spawned = nowhere
                .run(async { tokio::spawn(async { runtime_id() }).await.unwrap() })
                .await;
            assert_eq!(spawned, here);
        });
    }
}
