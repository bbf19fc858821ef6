//! Handles of the counters the publish path bumps for every packet and message.
//!
//! `metrics::counter!` looks its key up in the recorder's registry on every call (a
//! hash of the name and labels): fine for a connection or an error, too much for each
//! of a million messages a second. These handles are registered once and shared.

use std::sync::OnceLock;

use metrics::Counter;

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
        let _ = crate::http::metrics_handle();
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
        let _ = crate::http::metrics_handle();
        LISTENERS.map(|listener| {
            PROTOCOLS.map(|protocol| {
                metrics::gauge!("flockmq_connections", "listener" => listener, "protocol" => protocol)
            })
        })
    });
    &gauges[listener.min(3)][protocol.min(2)]
}
