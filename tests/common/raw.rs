//! Raw sockets for attack tests: a scripted upstream that writes whatever bytes a test
//! gives it, a raw client, and a minimal HTTP/1.1 response parser that frames responses
//! the way a downstream client or cache would (Content-Length or chunked).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a scripted upstream does with one request.
pub enum Script {
    /// Writes these bytes and keeps the connection for the next request.
    Reply(Vec<u8>),
    /// Writes these bytes and closes the connection.
    ReplyAndClose(Vec<u8>),
    /// Writes these bytes, then holds the connection open without writing (until the
    /// test ends).
    Stall(Vec<u8>),
    /// Writes the first bytes, then each further chunk after `Duration`.
    Trickle(Vec<u8>, Vec<u8>, Duration),
    /// Writes these bytes (a `101` head), then echoes every byte it receives.
    Echo(Vec<u8>),
}

/// A scripted upstream on a free loopback port. `script` gets each request head (the
/// text up to the blank line) and the number of requests answered before it.
pub struct RawUpstream {
    pub addr: std::net::SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl RawUpstream {
    pub async fn start<F>(script: F) -> RawUpstream
    where
        F: Fn(&str, usize) -> Script + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let script = Arc::new(script);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (script, counter) = (script.clone(), counter.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let Some(head) = read_head(&mut stream, &mut buf).await else {
                            return;
                        };
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        match script(&head, n) {
                            Script::Reply(bytes) => {
                                if stream.write_all(&bytes).await.is_err() {
                                    return;
                                }
                            }
                            Script::ReplyAndClose(bytes) => {
                                let _ = stream.write_all(&bytes).await;
                                return;
                            }
                            Script::Stall(bytes) => {
                                let _ = stream.write_all(&bytes).await;
                                tokio::time::sleep(Duration::from_secs(60)).await;
                                return;
                            }
                            Script::Trickle(first, rest, every) => {
                                let _ = stream.write_all(&first).await;
                                for b in rest {
                                    tokio::time::sleep(every).await;
                                    if stream.write_all(&[b]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Script::Echo(head) => {
                                let _ = stream.write_all(&head).await;
                                let (mut r, mut w) = stream.split();
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawUpstream { addr, requests }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads one request head (up to and including the blank line) from `stream`, keeping any
/// bytes after it in `buf`. `None` at end of stream.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Sends `bytes` on a new connection to `addr` and reads until the peer closes (at most
/// `limit`). Returns everything read.
pub async fn exchange(addr: &str, bytes: &[u8], limit: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_to_close(&mut stream, limit).await
}

/// Reads until the peer closes the connection or `limit` passes.
pub async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    out
}

/// One parsed response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn headers_named(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }
}

/// Splits a byte stream into the responses a client would read from it, framing each by
/// its `Content-Length` or chunked encoding (no HEAD responses). Panics if the stream is
/// not well-framed HTTP/1.1.
pub fn parse_responses(mut data: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let end = find(data, b"\r\n\r\n").expect("a complete response head");
        let head = String::from_utf8_lossy(&data[..end]).into_owned();
        data = &data[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(
            status_line.starts_with("HTTP/1.1 "),
            "bad status line {status_line:?}"
        );
        let status: u16 = status_line[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("header line");
                (n.trim().to_string(), v.trim().to_string())
            })
            .collect();
        let mut resp = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        assert!(
            !(resp.header("content-length").is_some()
                && resp.header("transfer-encoding").is_some()),
            "both Content-Length and Transfer-Encoding: {resp:?}"
        );
        if status == 101 || status == 204 || status == 304 {
            out.push(resp);
            continue;
        }
        if resp.header("transfer-encoding").is_some() {
            loop {
                let line_end = find(data, b"\r\n").expect("chunk size line");
                let size =
                    usize::from_str_radix(String::from_utf8_lossy(&data[..line_end]).trim(), 16)
                        .expect("chunk size");
                data = &data[line_end + 2..];
                if size == 0 {
                    let trailer_end = find(data, b"\r\n").unwrap();
                    data = &data[trailer_end + 2..];
                    break;
                }
                resp.body.extend_from_slice(&data[..size]);
                data = &data[size + 2..];
            }
        } else {
            let len: usize = resp
                .header("content-length")
                .expect("a length")
                .parse()
                .unwrap();
            resp.body = data[..len].to_vec();
            data = &data[len..];
        }
        out.push(resp);
    }
    out
}

/// Connects to the admin API at `admin` (`http://host:port`) and sends `POST {path}` with
/// the bearer `token`, declaring `length` body bytes and sending `body` (fewer, to stall
/// it); returns the connection, still open.
pub async fn post_to_admin(
    admin: &str,
    path: &str,
    token: &str,
    length: usize,
    body: &str,
) -> TcpStream {
    let mut stream = TcpStream::connect(admin.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nContent-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    stream
}
