//! Connection threads: client connections served each on one thread for their whole life,
//! every thread with its own event loop (a single-threaded Tokio runtime), as nginx's
//! worker processes and Envoy's worker threads do.
//!
//! On a shared work-stealing runtime, a connection's task moves between threads and an
//! idle thread is woken to steal work whenever another has a queue: on a small machine
//! those hand-offs and wake-ups cost more than a cache hit's own work. A connection pinned
//! to one thread costs none of them; the price is that a request which holds its thread
//! (a large keyed body being made canonical) delays that thread's other connections, and
//! that connections are spread by count, not by load. What a request leaves to run in
//! the background (Redis writes and connections, the upstream pool's connections, queued
//! refreshes) runs on the shared runtime the server was started on
//! ([`cachegate_core::home::Home`]); a WebSocket tunnel stays with its connection.

use std::future::Future;

use prometheus_client::metrics::gauge::Gauge;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A fixed set of connection threads. Dropping it (or [`ConnThreads::stop`]) stops them:
/// each thread's runtime drops the tasks it still has (their connections close).
pub struct ConnThreads {
    threads: Vec<ConnThread>,
}

struct ConnThread {
    handle: Handle,
    /// Connections this thread serves now.
    open: Gauge,
    /// Dropped to stop the thread.
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Counts one connection on its thread until dropped: kept with the socket, so that a
/// tunnel the connection became still counts.
pub struct ThreadSlot(Gauge);

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ConnThreads {
    /// How long [`ConnThreads::stop`] waits for the threads to end.
    pub const STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

    /// Starts `n` threads (named `cachegate-conn-0`, ...), each running a single-threaded
    /// Tokio runtime with I/O and timers; thread `i` counts its connections in `gauge(i)`.
    ///
    /// Errors: `InvalidInput` when `n` is 0; the OS error when a runtime or a thread cannot
    /// be made (the threads started so far are stopped).
    pub fn start(n: u32, gauge: impl Fn(u32) -> Gauge) -> std::io::Result<ConnThreads> {
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no connection threads",
            ));
        }
        let mut threads = Vec::with_capacity(n as usize);
        for i in 0..n {
            let (stop, stopped) = oneshot::channel::<()>();
            let (made, handle) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("cachegate-conn-{i}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(runtime) => {
                            // This thread drives its runtime until the server stops: the
                            // Redis tier keeps a read connection of its own here.
                            cachegate_core::home::mark_thread_lasting();
                            let _ = made.send(Ok(runtime.handle().clone()));
                            // Ends when the sender is dropped; the runtime then drops its
                            // tasks.
                            let _ = runtime.block_on(stopped);
                        }
                        Err(e) => drop(made.send(Err(e))),
                    }
                })?;
            let handle = handle
                .recv()
                .map_err(|_| std::io::Error::other("connection thread ended at start"))??;
            threads.push(ConnThread {
                handle,
                open: gauge(i),
                stop,
                thread,
            });
        }
        Ok(ConnThreads { threads })
    }

    /// Runs `serve` on the thread that serves the fewest connections now (the first of
    /// them on a tie). `serve` gets the socket as a Tokio stream registered with that
    /// thread's event loop, and the slot that counts the connection there until dropped
    /// (keep it with the socket); when the socket cannot be registered, the connection is
    /// closed and the error logged.
    pub fn spawn<F, Fut>(&self, stream: std::net::TcpStream, serve: F)
    where
        F: FnOnce(tokio::net::TcpStream, ThreadSlot) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(thread) = self.threads.iter().min_by_key(|t| t.open.get()) else {
            return;
        };
        thread.open.inc();
        let slot = ThreadSlot(thread.open.clone());
        thread.handle.spawn(async move {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => serve(stream, slot).await,
                Err(e) => tracing::warn!(error = %e, "could not register a connection"),
            }
        });
    }

    /// Stops the threads, as dropping them does, and waits until they have ended (on a
    /// blocking task of the current Tokio runtime: call it within one), at most
    /// [`ConnThreads::STOP_LIMIT`]; threads still running then are left to end by
    /// themselves (logged).
    pub async fn stop(self) {
        let threads: Vec<_> = self
            .threads
            .into_iter()
            .map(|t| {
                drop(t.stop);
                t.thread
            })
            .collect();
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        if tokio::time::timeout(Self::STOP_LIMIT, joined)
            .await
            .is_err()
        {
            tracing::warn!("connection threads still running after the shutdown limit");
        }
    }

    /// Connections served now, per thread.
    #[cfg(test)]
    fn open(&self) -> Vec<i64> {
        self.threads.iter().map(|t| t.open.get()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A connected pair of loopback sockets: the server side, and the client side that
    /// keeps it open.
    fn socket_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (server, client)
    }

    /// Waits (up to 5 s) until `cond` holds.
    fn wait_until(cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "condition not met in 5 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn connections_go_to_the_least_busy_thread() {
        let threads = ConnThreads::start(2, |_| Gauge::default()).unwrap();
        let (names, name_rx) = mpsc::channel();
        let mut release = Vec::new();
        let mut clients = Vec::new();
        let mut connect = |release: &mut Vec<oneshot::Sender<()>>| {
            let (server, client) = socket_pair();
            clients.push(client);
            let (done, wait) = oneshot::channel::<()>();
            release.push(done);
            let names = names.clone();
            threads.spawn(server, move |_stream, slot| async move {
                let _slot = slot;
                let _ = wait.await;
                let on = std::thread::current().name().map(str::to_owned);
                names.send(on).unwrap();
            });
        };
        for _ in 0..4 {
            connect(&mut release);
        }
        assert_eq!(threads.open(), vec![2, 2]);
        // One of the first thread's connections ends: the next one goes there.
        drop(release.remove(0));
        let on = name_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(on.as_deref(), Some("cachegate-conn-0"));
        wait_until(|| threads.open() == vec![1, 2]);
        connect(&mut release);
        assert_eq!(threads.open(), vec![2, 2]);
        // Released one by one: thread 1's, thread 0's, thread 1's, then the newest (thread 0).
        for expected in ["cachegate-conn-1", "cachegate-conn-0", "cachegate-conn-1"] {
            drop(release.remove(0));
            let on = name_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(on.as_deref(), Some(expected));
        }
        drop(release);
        let newest = name_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(newest.as_deref(), Some("cachegate-conn-0"));
        wait_until(|| threads.open() == vec![0, 0]);
    }

    #[test]
    fn dropping_the_threads_ends_their_connections() {
        let threads = ConnThreads::start(1, |_| Gauge::default()).unwrap();
        let (ended, ended_rx) = mpsc::channel::<()>();
        struct Ended(mpsc::Sender<()>);
        impl Drop for Ended {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let (server, _client) = socket_pair();
        let (started, started_rx) = mpsc::channel::<()>();
        threads.spawn(server, move |_stream, _slot| async move {
            let _ended = Ended(ended);
            started.send(()).unwrap();
            std::future::pending::<()>().await;
        });
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(ended_rx.try_recv().is_err());
        drop(threads);
        ended_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn a_connection_counts_while_its_slot_lives() {
        let threads = ConnThreads::start(1, |_| Gauge::default()).unwrap();
        let (server, _client) = socket_pair();
        let (release, wait) = oneshot::channel::<()>();
        // The connection hands its slot to a task of its own (as an upgraded connection's
        // tunnel keeps its socket) and ends.
        threads.spawn(server, move |_stream, slot| async move {
            tokio::spawn(async move {
                let _slot = slot;
                let _ = wait.await;
            });
        });
        // A second connection on the same thread, polled after the first one ended; it
        // stays open.
        let (server, _client2) = socket_pair();
        let (probe, probe_rx) = mpsc::channel::<()>();
        let (hold, held) = oneshot::channel::<()>();
        threads.spawn(server, move |_stream, slot| async move {
            let _slot = slot;
            probe.send(()).unwrap();
            let _ = held.await;
        });
        probe_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            threads.open(),
            vec![2],
            "the first connection's tunnel still counts"
        );
        drop(release);
        wait_until(|| threads.open() == vec![1]);
        drop(hold);
        wait_until(|| threads.open() == vec![0]);
    }

    #[tokio::test]
    async fn stop_waits_until_the_threads_have_ended() {
        let threads = ConnThreads::start(2, |_| Gauge::default()).unwrap();
        let (ended, ended_rx) = mpsc::channel::<()>();
        struct SlowDrop(mpsc::Sender<()>);
        impl Drop for SlowDrop {
            fn drop(&mut self) {
                // A task whose drop takes a while: stop still waits for it.
                std::thread::sleep(Duration::from_millis(50));
                let _ = self.0.send(());
            }
        }
        let (started, started_rx) = mpsc::channel::<()>();
        let mut clients = Vec::new();
        for _ in 0..2 {
            let (server, client) = socket_pair();
            clients.push(client);
            let (ended, started) = (ended.clone(), started.clone());
            threads.spawn(server, move |_stream, slot| async move {
                let _slot = slot;
                let _drop = SlowDrop(ended);
                started.send(()).unwrap();
                std::future::pending::<()>().await;
            });
        }
        for _ in 0..2 {
            started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        threads.stop().await;
        assert!(ended_rx.try_recv().is_ok() && ended_rx.try_recv().is_ok());
    }

    #[test]
    fn no_threads_is_an_error() {
        let err = ConnThreads::start(0, |_| Gauge::default()).err().unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}
