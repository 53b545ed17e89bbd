//! Serving the API's router: plain HTTP (the loopback default) or HTTPS
//! with rustls (`--api-tls-cert/--api-tls-key`). Either way every request
//! carries its TCP peer's address (`ConnectInfo`), which login throttling
//! keys on.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// Longest a client may take for its TLS handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Serve `router` on `listener` until the listener fails.
pub async fn serve(listener: TcpListener, router: Router, tls: Option<TlsAcceptor>) -> std::io::Result<()> {
    let Some(tls) = tls else {
        return axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).await;
    };
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait, go on.
                tracing::warn!(target: "keel::http", "accepting an API connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let (tls, router) = (tls.clone(), router.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_LIMIT, tls.accept(sock)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(target: "keel::http", %peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(target: "keel::http", %peer, "TLS handshake timed out");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(req.map(axum::body::Body::new))
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await
            {
                tracing::debug!(target: "keel::http", %peer, "API connection: {e}");
            }
        });
    }
}
