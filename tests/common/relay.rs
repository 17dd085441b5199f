//! A TCP relay in front of a real server, for network faults no real server shows on
//! demand: a connection dropped by a NAT or a firewall without a reset (the server side
//! gone, the client side open and silent), a server that goes silent after one command,
//! or one that answers late.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};

/// Forwards every connection to `127.0.0.1:target` until told otherwise. Dropping it
/// stops accepting; connections already relayed end with the test's runtime.
pub struct Relay {
    pub port: u16,
    sever: watch::Sender<u64>,
    /// Client sides kept open after their server side was cut: never read, never closed.
    held: Arc<Mutex<Vec<TcpStream>>>,
    swallowed: Arc<AtomicUsize>,
    refusing: Arc<AtomicBool>,
    /// Milliseconds each chunk of the server's bytes is held before it is forwarded.
    reply_delay_ms: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay that forwards everything both ways.
    pub async fn start(target: u16) -> Relay {
        Relay::start_inner(target, None).await
    }

    /// A relay that, on a connection whose client sends `needle`, forwards nothing more
    /// from that client (the bytes holding `needle` included), while still forwarding the
    /// server's bytes: the server never sees that command, and the client waits for an
    /// answer that never comes.
    pub async fn swallowing(target: u16, needle: &'static [u8]) -> Relay {
        Relay::start_inner(target, Some(needle)).await
    }

    async fn start_inner(target: u16, needle: Option<&'static [u8]>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (sever, severed) = watch::channel(0u64);
        let held = Arc::new(Mutex::new(Vec::new()));
        let swallowed = Arc::new(AtomicUsize::new(0));
        let refusing = Arc::new(AtomicBool::new(false));
        let reply_delay_ms = Arc::new(AtomicU64::new(0));
        let (held2, swallowed2, refusing2) = (held.clone(), swallowed.clone(), refusing.clone());
        let delay2 = reply_delay_ms.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refusing2.load(Ordering::SeqCst) {
                    continue; // closed at once
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let mut severed = severed.clone();
                severed.mark_unchanged();
                let (held, swallowed, delay) = (held2.clone(), swallowed2.clone(), delay2.clone());
                tokio::spawn(async move {
                    let faults = Faults {
                        needle,
                        held: &held,
                        swallowed: &swallowed,
                        reply_delay_ms: &delay,
                    };
                    relay(client, server, &mut severed, faults).await;
                });
            }
        });
        Relay {
            port,
            sever,
            held,
            swallowed,
            refusing,
            reply_delay_ms,
            accept,
        }
    }

    /// From now on, every chunk of a server's reply is held for `delay` before it is
    /// forwarded (a server answering late), on connections open now and later.
    pub fn delay_replies(&self, delay: Duration) {
        self.reply_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// `redis://` URL of the relay.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Cuts the server side of every connection open now (the server sees it closed) and
    /// keeps each client side open and silent. Later connections are relayed as before.
    pub fn sever(&self) {
        self.sever.send_modify(|generation| *generation += 1);
    }

    /// While `true`, new connections are closed as soon as they are accepted (a server
    /// that cannot be reached); connections already relayed go on.
    pub fn refuse(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Connections whose client sent the needle (see [`Relay::swallowing`]).
    pub fn swallowed(&self) -> usize {
        self.swallowed.load(Ordering::SeqCst)
    }

    /// Client sides held open after [`Relay::sever`].
    pub async fn held(&self) -> usize {
        self.held.lock().await.len()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// What a relayed connection is told to do wrong.
struct Faults<'a> {
    needle: Option<&'static [u8]>,
    held: &'a Mutex<Vec<TcpStream>>,
    swallowed: &'a AtomicUsize,
    reply_delay_ms: &'a AtomicU64,
}

async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    severed: &mut watch::Receiver<u64>,
    faults: Faults<'_>,
) {
    let Faults {
        needle,
        held,
        swallowed,
        reply_delay_ms,
    } = faults;
    let cut = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let upstream = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = client_read.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                if needle.is_some_and(|needle| buf[..n].windows(needle.len()).any(|w| w == needle))
                {
                    swallowed.fetch_add(1, Ordering::SeqCst);
                    return std::future::pending().await;
                }
                if server_write.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        let downstream = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = server_read.read(&mut buf).await.unwrap_or(0);
                let delay = reply_delay_ms.load(Ordering::SeqCst);
                if n > 0 && delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                if n == 0 || client_write.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = upstream => false,
            _ = downstream => false,
            _ = severed.changed() => true,
        }
    };
    if cut {
        drop(server);
        held.lock().await.push(client);
    }
}
