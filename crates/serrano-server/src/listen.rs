//! Serving HTTP with every connection-level bound explicit. `axum::serve` runs hyper without a
//! timer, so hyper's header-read timeout is never armed (a client that sends half a request line
//! keeps its connection forever), and it takes every connection the kernel hands it. This loop,
//! built from hyper and hyper-util as axum's own examples do, arms the timeout, caps open
//! connections, sets TCP_NODELAY on each, and drains in-flight requests on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::shield::HttpMetrics;

/// The application and what its listener needs.
pub struct App {
    pub router: axum::Router,
    pub http: Arc<HttpMetrics>,
    pub conn: ConnLimits,
}

/// Largest request head (request line and headers): past it hyper answers 431 and closes. A
/// path or header longer than this is not a request serrano serves.
pub const MAX_HEADER_BYTES: usize = 32 << 10;
/// How long in-flight requests may take to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// What one listener lets in.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Most connections open at once; past it a new one is accepted and closed at once, so it
    /// never waits in the kernel's backlog.
    pub max_connections: usize,
    /// A connection must send a request's headers within this time of starting to wait for
    /// them, as a new connection or idle between keep-alive requests; else it is closed.
    pub header_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(15),
        }
    }
}

/// Binds `addr` and serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    app: App,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    serve_listener(listener, app, shutdown).await
}

/// Serves `listener` until `shutdown` resolves; requests in flight then get
/// [`SHUTDOWN_GRACE`] to finish.
pub async fn serve_listener(
    listener: TcpListener,
    app: App,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let App {
        router: app,
        http: metrics,
        conn: limits,
    } = app;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(MAX_HEADER_BYTES);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // keep serving the connections already open.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.connection_refused();
            drop(tcp);
            continue;
        };
        // Without TCP_NODELAY, small SSE chunks and keep-alive responses wait on Nagle +
        // delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _open = metrics.connection_opened();
            if let Err(e) = conn.await {
                tracing::debug!("connection from {peer} ended: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still in flight after {} s of shutdown were cut off",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    Ok(())
}
