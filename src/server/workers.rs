//! Connection threads: client connections served each on one thread for their whole life,
//! every thread with its own event loop (a single-threaded Tokio runtime), as nginx's
//! worker processes and Envoy's worker threads do.
//!
//! On a shared work-stealing runtime, a connection's task moves between threads and an
//! idle thread is woken to steal work whenever another has a queue: on a small machine
//! those hand-offs and wake-ups cost more than a cache hit's own work. A connection pinned
//! to one thread costs none of them; the price is that a request which holds its thread
//! (a large keyed body being made canonical) delays that thread's other connections, and
//! that connections are spread by count, not by load. Background work (Redis tier, purge
//! subscription, refreshes queued by the server) stays on the shared runtime.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A fixed set of connection threads. Dropping it stops them: each thread's runtime drops
/// the tasks it still has (their connections close).
pub struct ConnThreads {
    threads: Vec<ConnThread>,
}

struct ConnThread {
    handle: Handle,
    /// Connections this thread serves now.
    open: Arc<AtomicUsize>,
    /// Dropped to stop the thread.
    _stop: oneshot::Sender<()>,
}

/// Counts one connection on its thread until dropped.
struct Served(Arc<AtomicUsize>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnThreads {
    /// Starts `n` threads (named `cachegate-conn-0`, ...), each running a single-threaded
    /// Tokio runtime with I/O and timers.
    ///
    /// Errors: the OS error when a runtime or a thread cannot be made.
    pub fn start(n: usize) -> std::io::Result<ConnThreads> {
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("cachegate-conn-{i}"))
                .spawn(move || {
                    // Ends when the sender is dropped; the runtime then drops its tasks.
                    let _ = runtime.block_on(stopped);
                })?;
            threads.push(ConnThread {
                handle,
                open: Arc::new(AtomicUsize::new(0)),
                _stop: stop,
            });
        }
        Ok(ConnThreads { threads })
    }

    /// Runs `serve` on the thread that serves the fewest connections now (the first of
    /// them on a tie), counting it there until it ends. `serve` gets the socket as a Tokio
    /// stream registered with that thread's event loop; when it cannot be registered, the
    /// connection is closed and the error logged.
    pub fn spawn<F, Fut>(&self, stream: std::net::TcpStream, serve: F)
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(thread) = self
            .threads
            .iter()
            .min_by_key(|t| t.open.load(Ordering::Relaxed))
        else {
            return;
        };
        thread.open.fetch_add(1, Ordering::Relaxed);
        let served = Served(thread.open.clone());
        thread.handle.spawn(async move {
            let _served = served;
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::warn!(error = %e, "could not register a connection"),
            }
        });
    }

    /// Connections served now, per thread.
    #[cfg(test)]
    fn open(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|t| t.open.load(Ordering::Relaxed))
            .collect()
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
    fn connections_go_to_the_least_busy_thread_and_stay_on_it() {
        let threads = ConnThreads::start(2).unwrap();
        let (names, name_rx) = mpsc::channel();
        let mut release = Vec::new();
        let mut clients = Vec::new();
        let mut connect = |release: &mut Vec<oneshot::Sender<()>>| {
            let (server, client) = socket_pair();
            clients.push(client);
            let (done, wait) = oneshot::channel::<()>();
            release.push(done);
            let names = names.clone();
            threads.spawn(server, move |_stream| async move {
                let on = || std::thread::current().name().map(str::to_owned);
                let before = on();
                let _ = wait.await;
                names.send((before, on())).unwrap();
            });
        };
        for _ in 0..4 {
            connect(&mut release);
        }
        assert_eq!(threads.open(), vec![2, 2]);
        // One of the first thread's connections ends: the next one goes there.
        drop(release.remove(0));
        let (before, after) = name_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(before.as_deref(), Some("cachegate-conn-0"));
        assert_eq!(before, after, "a connection stays on its thread");
        wait_until(|| threads.open() == vec![1, 2]);
        connect(&mut release);
        assert_eq!(threads.open(), vec![2, 2]);
        // Released one by one: thread 1's, thread 0's, thread 1's, then the newest (thread 0).
        for expected in ["cachegate-conn-1", "cachegate-conn-0", "cachegate-conn-1"] {
            drop(release.remove(0));
            let (before, after) = name_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(before.as_deref(), Some(expected));
            assert_eq!(before, after);
        }
        drop(release);
        let (newest, _) = name_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(newest.as_deref(), Some("cachegate-conn-0"));
        wait_until(|| threads.open() == vec![0, 0]);
    }

    #[test]
    fn dropping_the_threads_ends_their_connections() {
        let threads = ConnThreads::start(1).unwrap();
        let (ended, ended_rx) = mpsc::channel::<()>();
        struct Ended(mpsc::Sender<()>);
        impl Drop for Ended {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let (server, _client) = socket_pair();
        let (started, started_rx) = mpsc::channel::<()>();
        threads.spawn(server, move |_stream| async move {
            let _ended = Ended(ended);
            started.send(()).unwrap();
            std::future::pending::<()>().await;
        });
        started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(ended_rx.try_recv().is_err());
        drop(threads);
        ended_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}
