//! Serving a router on a listener, safely under floods and slow clients: a cap on open
//! connections (in all, and per source address), a header-read timeout (which is also the
//! idle timeout of a kept-alive connection), a TLS handshake timeout, a deadline for each
//! request (body included), and graceful shutdown. A connection over a cap is answered
//! `429` with `Retry-After` (plain HTTP) or closed (TLS, before any handshake work).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections at most from one source address.
    pub max_per_source: usize,
    /// How long a client may take to send a request's headers, and how long a kept-alive
    /// connection may stay idle.
    pub header_timeout: Duration,
    /// How long a request may take in all, its body included.
    pub request_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            max_connections: 4096,
            max_per_source: 256,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(20);

/// The open connections per source address; a slot is given back when its guard drops.
#[derive(Clone, Default)]
struct PerSource(Arc<Mutex<HashMap<IpAddr, usize>>>);

struct SourceSlot {
    sources: PerSource,
    ip: IpAddr,
}

impl PerSource {
    fn take(&self, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let mut m = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot { sources: self.clone(), ip })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.sources.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Whether a connection from `ip` may be served now: both slots, or why not.
fn admit(
    total: &Arc<Semaphore>,
    sources: &PerSource,
    ip: IpAddr,
    limits: &HttpLimits,
) -> Option<(OwnedSemaphorePermit, SourceSlot)> {
    let slot = sources.take(ip, limits.max_per_source)?;
    let permit = total.clone().try_acquire_owned().ok()?;
    Some((permit, slot))
}

/// The reply to a connection over a cap (plain HTTP only).
const SATURATED: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/json\r\nCache-Control: no-store\r\nConnection: close\r\nContent-Length: 79\r\n\r\n{\"error\":\"temporarily_unavailable\",\"error_description\":\"too many connections\"}\n";

/// Serves `router` on `listener` (over TLS when `tls` is set) until `shutdown` resolves, then
/// lets open connections finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    limits: HttpLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let router = router.layer(axum::middleware::from_fn_with_state(limits.request_timeout, deadline));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let total = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let sources = PerSource::default();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some((permit, slot)) = admit(&total, &sources, peer.ip(), &limits) else {
            if acceptor.is_none() {
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(SATURATED)).await;
                });
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _held = (permit, slot);
            let mut builder = Builder::new(TokioExecutor::new()).http1_only();
            builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            match acceptor {
                Some(acceptor) => {
                    let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
                        return;
                    };
                    let _ = watcher.watch(builder.serve_connection(TokioIo::new(tls), service).into_owned()).await;
                }
                None => {
                    let _ = watcher.watch(builder.serve_connection(TokioIo::new(tcp), service).into_owned()).await;
                }
            }
        });
    }
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}

/// Answers `408` to a request that takes longer than `limit`, its body included.
async fn deadline(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => super::oauth::invalid_request(format!("the request took longer than {limit:?}"))
            .with_status(StatusCode::REQUEST_TIMEOUT)
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_gets_its_share_and_gives_it_back() {
        let limits = HttpLimits { max_connections: 3, max_per_source: 2, ..HttpLimits::default() };
        let total = Arc::new(Semaphore::new(limits.max_connections));
        let sources = PerSource::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = admit(&total, &sources, a, &limits).unwrap();
        let _a2 = admit(&total, &sources, a, &limits).unwrap();
        assert!(admit(&total, &sources, a, &limits).is_none(), "a's share is used");
        let _b1 = admit(&total, &sources, b, &limits).unwrap();
        assert!(admit(&total, &sources, b, &limits).is_none(), "all connections are used");
        drop(a1);
        assert!(admit(&total, &sources, a, &limits).is_some(), "a closed one: it may open one");
        assert!(sources.0.lock().unwrap().get(&a).is_some_and(|n| *n <= 2));
    }

    #[test]
    fn the_saturated_reply_is_a_well_formed_429() {
        let text = std::str::from_utf8(SATURATED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 429 ") && head.contains("Retry-After: 1"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{} bytes", body.len());
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }
}
