//! The node's metrics: the process-wide Prometheus recorder, the catalog of every
//! metric with its help text ([`catalog`]), the handles of the counters the publish
//! path bumps for every packet and message, and the figures refreshed on each scrape
//! (process, allocator).
//!
//! It is a leaf: it depends on nothing else in the crate, so every layer may record
//! into it and `http` serves `/metrics` from it. It never serves anything itself and
//! never imports another module of the crate.
//!
//! `metrics::counter!` looks its key up in the recorder's registry on every call (a
//! hash of the name and labels): fine for a connection or an error, too much for each
//! of a million messages a second. The handles of [`hot`] and [`connections`] are
//! registered once and shared.

pub mod catalog;

use std::sync::OnceLock;

use metrics::Counter;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The per-packet and per-message counters.
pub struct Hot {
    /// `flockmq_bytes_received_total`.
    pub bytes_received: Counter,
    /// `flockmq_bytes_sent_total`.
    pub bytes_sent: Counter,
    /// `flockmq_packets_received_total`.
    pub packets_received: Counter,
    /// `flockmq_messages_received_total{qos}`, by QoS.
    pub messages_received: [Counter; 3],
    /// `flockmq_messages_sent_total{qos}`, by QoS.
    pub messages_sent: [Counter; 3],
}

/// The handles, registered with the node's Prometheus recorder on first use.
pub fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| {
        // Installs the recorder if nothing has yet: handles registered before it
        // would count into nothing.
        let _ = metrics_handle();
        let by_qos =
            |name: &'static str| ["0", "1", "2"].map(|qos| metrics::counter!(name, "qos" => qos));
        Hot {
            bytes_received: metrics::counter!("flockmq_bytes_received_total"),
            bytes_sent: metrics::counter!("flockmq_bytes_sent_total"),
            packets_received: metrics::counter!("flockmq_packets_received_total"),
            messages_received: by_qos("flockmq_messages_received_total"),
            messages_sent: by_qos("flockmq_messages_sent_total"),
        }
    })
}

/// The listeners a connection can come in on, in the order of [`connections`]' rows.
pub const LISTENERS: [&str; 4] = ["tcp", "tls", "ws", "wss"];

/// The protocol labels, in the order of [`connections`]' columns.
pub const PROTOCOLS: [&str; 3] = ["3.1", "3.1.1", "5.0"];

/// `flockmq_connections{listener, protocol}`, registered once: a connection keeps only
/// the two indexes, not a handle of its own.
pub fn connections(listener: usize, protocol: usize) -> &'static metrics::Gauge {
    static GAUGES: OnceLock<[[metrics::Gauge; 3]; 4]> = OnceLock::new();
    let gauges = GAUGES.get_or_init(|| {
        let _ = metrics_handle();
        LISTENERS.map(|listener| {
            PROTOCOLS.map(|protocol| {
                metrics::gauge!("flockmq_connections", "listener" => listener, "protocol" => protocol)
            })
        })
    });
    &gauges[listener.min(3)][protocol.min(2)]
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
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

/// Refresh the figures read at scrape time (process, allocator): call it before
/// rendering the recorder's handle.
pub fn refresh() {
    process_collector().collect();
    collect_allocator();
}

/// Process figures under the names every Prometheus client library exports
/// (`process_resident_memory_bytes`, `process_cpu_seconds_total`, `process_open_fds`,
/// `process_max_fds`, `process_start_time_seconds`, `process_threads`, ...), so that
/// existing process dashboards and alerts work; refreshed on every scrape.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(|| {
        let collector = metrics_process::Collector::default();
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

static ALLOCATOR_STATS: OnceLock<fn() -> Option<AllocatorStats>> = OnceLock::new();

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
