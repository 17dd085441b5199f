//! Protocol upgrades (WebSocket, RFC 6455; RFC 9110 §7.8): tunnelled to the upstream,
//! never cached.
//!
//! The request goes to the upstream with its `Upgrade` and `Connection: upgrade`. When the
//! upstream answers `101 Switching Protocols`, the client gets that answer and both
//! connections are joined byte for byte until either side closes. Any other answer is
//! passed back as it is.

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// The `Upgrade` header of a request and the client side of the connection to take over.
pub struct UpgradeRequest {
    protocol: HeaderValue,
    client: OnUpgrade,
}

impl UpgradeRequest {
    /// Takes what an upgrade needs from a request's headers and extensions. `None` when the
    /// connection cannot be taken over (the server was not built with upgrades).
    pub fn take(headers: &HeaderMap, extensions: &mut http::Extensions) -> Option<Self> {
        Some(UpgradeRequest {
            protocol: headers.get(header::UPGRADE)?.clone(),
            client: extensions.remove::<OnUpgrade>()?,
        })
    }

    /// Puts the upgrade back on a request whose hop-by-hop headers were removed.
    pub fn restore_headers(&self, headers: &mut HeaderMap) {
        headers.insert(header::UPGRADE, self.protocol.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }

    /// When `upstream` is a `101`, joins the two connections in a background task and
    /// returns the `101` head for the client (with its `Upgrade` and `Connection`);
    /// otherwise returns `upstream` untouched as `Err`, to be passed back.
    pub fn tunnel<B>(self, mut upstream: Response<B>) -> Result<Response<()>, Response<B>> {
        if upstream.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(upstream);
        }
        let Some(server) = upstream.extensions_mut().remove::<OnUpgrade>() else {
            return Err(upstream);
        };
        let (head, _) = upstream.into_parts();
        let mut headers = head.headers;
        let protocol = headers
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or(self.protocol);
        super::headers::remove_hop_by_hop(&mut headers);
        headers.insert(header::UPGRADE, protocol);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let client = self.client;
        tokio::spawn(async move {
            let (client, server) = match tokio::join!(client, server) {
                (Ok(c), Ok(s)) => (c, s),
                _ => {
                    tracing::debug!("upgrade failed on one side");
                    return;
                }
            };
            let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        });
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *resp.headers_mut() = headers;
        Ok(resp)
    }
}
