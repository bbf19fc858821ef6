//! The node's HTTP server (default 127.0.0.1:8080). Routes:
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text format of every `flockmq_` metric |
//! | `GET /healthz` | 200 `ok` while the process serves requests (liveness) |
//! | `GET /readyz` | 200 `ready`, or 503 with the reasons: MQTT listener not bound, storage not open, no Raft leader, this node not caught up with the committed log |
//! | `/api/v1/...` | the admin API ([`api`], which lists its routes), this node's log filter at `/api/v1/log/level` included |
//! | `GET /`, `/dashboard/...`, `POST /login`, `POST /logout` | the web dashboard ([`dashboard`]), behind the admin API's access rules |
//!
//! Readiness is computed from real facts on every request; nothing here caches it.
//! The metrics are recorded into [`crate::telemetry`]; this server only renders them.
//! The server never touches MQTT connections.

pub mod api;
pub mod dashboard;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::cluster::StateHandle;
use crate::telemetry;
use crate::transport::tls::TlsSlot;

/// Facts readiness is computed from.
#[derive(Clone)]
pub struct Readiness {
    /// Set once the MQTT listener is bound.
    pub listeners_bound: Arc<AtomicBool>,
    /// Set once storage is open and Raft started.
    pub storage_open: Arc<AtomicBool>,
    /// The cluster view, once started.
    pub state: Arc<std::sync::OnceLock<StateHandle>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            listeners_bound: Arc::new(AtomicBool::new(false)),
            storage_open: Arc::new(AtomicBool::new(false)),
            state: Arc::new(std::sync::OnceLock::new()),
        }
    }
}

impl Readiness {
    /// The reasons this node is not ready; empty when it is.
    pub fn reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.storage_open.load(Ordering::Acquire) {
            reasons.push("storage not open".to_owned());
        }
        if !self.listeners_bound.load(Ordering::Acquire) {
            reasons.push("MQTT listener not bound".to_owned());
        }
        match self.state.get() {
            None => reasons.push("cluster not started".to_owned()),
            Some(state) => {
                if let Some(fatal) = state.fatal() {
                    reasons.push(format!("raft stopped: {fatal}"));
                }
                if !state.has_leader() {
                    reasons.push("no raft leader".to_owned());
                }
                if let Some(lag) = state.apply_lag() {
                    // A few entries are always in flight under load; far behind is not.
                    if lag > CAUGHT_UP_LAG {
                        reasons.push(format!("{lag} committed entries not applied yet"));
                    }
                }
            }
        }
        reasons
    }
}

/// Log entries a node may trail its own log by and still count as caught up.
pub const CAUGHT_UP_LAG: u64 = 1000;

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// Serve the HTTP routes on `listener` (HTTPS with `tls`) until `shutdown`; the admin
/// API answers once `api` is set.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<TlsSlot>>,
    metrics: PrometheusHandle,
    readiness: Readiness,
    api: api::ApiSlot,
    access: api::ApiAccess,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(alive))
        .route("/readyz", get(ready))
        .with_state(AppState { metrics, readiness })
        .merge(dashboard::router(access.clone()))
        .nest("/api/v1", api::router(api, access));
    if let Some(tls) = tls {
        serve_tls(listener, tls, app, shutdown).await;
        return;
    }
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// [`serve`] over TLS: each connection's handshake and requests in a task of their
/// own (a slow handshake holds up no one else), with the certificate in force when it
/// connected; the peer's address reaches the handlers as `ConnectInfo`, as over plain
/// HTTP. In-flight requests are not waited for at shutdown.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<TlsSlot>,
    app: Router,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTPS accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = tls.acceptor();
        let app = app.clone().layer(axum::Extension(ConnectInfo(peer)));
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "HTTPS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "HTTPS handshake timed out");
                        return;
                    }
                };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let connection = builder
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                served = connection => {
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "HTTPS connection ended");
                    }
                }
            }
        });
    }
}

async fn render_metrics(State(app): State<AppState>) -> String {
    telemetry::refresh();
    app.metrics.render()
}

/// Alive unless Raft has stopped on this node: then only a restart helps, and a
/// liveness probe should trigger one.
async fn alive(State(app): State<AppState>) -> (StatusCode, String) {
    match app.readiness.state.get().and_then(|s| s.fatal()) {
        Some(fatal) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("raft stopped: {fatal}\n"),
        ),
        None => (StatusCode::OK, "ok\n".to_owned()),
    }
}

async fn ready(State(app): State<AppState>) -> (StatusCode, String) {
    let reasons = app.readiness.reasons();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        )
    }
}

/// Bind the HTTP listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} (http): {e}")))
}
