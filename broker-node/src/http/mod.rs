//! The node's HTTP server (default 127.0.0.1:8080). Routes:
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /metrics` | Prometheus text format of every `flockmq_` metric |
//! | `GET /healthz` | 200 `ok` while the process serves requests (liveness) |
//! | `GET /readyz` | 200 `ready`, or 503 with the reasons: MQTT listener not bound, storage not open, no Raft leader, this node not caught up with the committed log |
//!
//! Readiness is computed from real facts on every request; nothing here caches it.
//! The server never touches MQTT connections.

pub mod api;
pub mod catalog;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::cluster::StateHandle;

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

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = with_buckets(metrics_exporter_prometheus::PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was already installed; /metrics shows only ours"
                );
            }
            catalog::register();
            handle
        })
        .clone()
}

/// Histograms as Prometheus histograms (aggregatable across nodes), not summaries.
fn with_buckets(builder: PrometheusBuilder) -> PrometheusBuilder {
    // From 100 µs to 10 s: a forward acknowledgement on loopback to a Raft write
    // waiting out an election.
    const SECONDS: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    // Batch sizes: forward frames hold up to 4096 messages, Raft entries up to
    // `cluster.batch_max_commands` (512 by default).
    const COUNTS: &[f64] = &[
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
    ];
    let with = |b: PrometheusBuilder, m: Matcher, buckets: &[f64]| {
        b.set_buckets_for_metric(m, buckets)
            .expect("bucket lists are non-empty")
    };
    let builder = with(builder, Matcher::Suffix("_seconds".into()), SECONDS);
    let builder = with(builder, Matcher::Suffix("_messages".into()), COUNTS);
    with(builder, Matcher::Suffix("_commands".into()), COUNTS)
}

/// Process figures (RSS, CPU seconds, open and maximum file descriptors, threads),
/// refreshed on every scrape.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    COLLECTOR.get_or_init(|| {
        let collector = metrics_process::Collector::new("flockmq_");
        collector.describe();
        collector
    })
}

/// What the process's allocator holds, in bytes; see [`report_allocator`].
#[derive(Debug, Clone, Copy)]
pub struct AllocatorStats {
    /// In live allocations.
    pub allocated: u64,
    /// In pages that hold live allocations (`allocated` plus fragmentation).
    pub active: u64,
    /// In physically resident pages the allocator maps, metadata included.
    pub resident: u64,
    /// Unmapped from the process but kept in reserve (virtual only).
    pub retained: u64,
}

static ALLOCATOR_STATS: std::sync::OnceLock<fn() -> Option<AllocatorStats>> =
    std::sync::OnceLock::new();

/// Have every scrape report the allocator's figures from `read` as the
/// `flockmq_allocator_*_bytes` gauges. The binary installs its allocator's reader;
/// without one (the library under test) the gauges are absent.
pub fn report_allocator(read: fn() -> Option<AllocatorStats>) {
    let _ = ALLOCATOR_STATS.set(read);
}

fn collect_allocator() {
    let Some(stats) = ALLOCATOR_STATS.get().and_then(|read| read()) else {
        return;
    };
    for (kind, bytes) in [
        ("allocated", stats.allocated),
        ("active", stats.active),
        ("resident", stats.resident),
        ("retained", stats.retained),
    ] {
        metrics::gauge!("flockmq_allocator_bytes", "kind" => kind).set(bytes as f64);
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    readiness: Readiness,
}

/// Serve the HTTP routes on `listener` until `shutdown`; the admin API answers once
/// `api` is set.
pub async fn serve(
    listener: tokio::net::TcpListener,
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
        .nest("/api/v1", api::router(api, access));
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

async fn render_metrics(State(app): State<AppState>) -> String {
    process_collector().collect();
    collect_allocator();
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
