//! One node's live figures as other nodes and the admin API see them: its counters,
//! its recent message rates and its forwarding to each peer ([`NodeStats`]). The
//! figures are not replicated (they are per node and change with every message); a
//! node asks each peer for its own over the Admin service's `NodeStats` call, so the
//! dashboard of any node shows the whole cluster.
//!
//! This module owns the plain values and the slot through which the cluster layer
//! finds their source, the broker runtime ([`StatsSource`]), which exists only once
//! it has started. It never reads a counter itself.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use super::command::NodeId;

/// One node's figures at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    /// The node.
    pub node_id: NodeId,
    /// Seconds since the process started.
    pub uptime_secs: u64,
    /// Its Raft role as it sees it (`Leader`, `Follower`, `Candidate`, `Learner`).
    pub raft_state: String,
    /// The Raft term it is in.
    pub term: u64,
    /// The last log index it has applied.
    pub applied_index: Option<u64>,
    /// Committed entries it has not applied yet, when known.
    pub apply_lag: Option<u64>,
    /// Client connections open on this node.
    pub connections: u64,
    /// PUBLISH packets received from clients, since start.
    pub messages_received: u64,
    /// PUBLISH packets sent to clients, since start.
    pub messages_sent: u64,
    /// Messages dropped at a limit, since start.
    pub messages_dropped: u64,
    /// Bytes read from clients, since start.
    pub bytes_received: u64,
    /// Bytes written to clients, since start.
    pub bytes_sent: u64,
    /// The MQTT over WebSocket listener's configured address, if there is one.
    pub ws_addr: Option<String>,
    /// Per-second rates, oldest first, one sample per second for the last
    /// minutes (see `broker::rates`).
    pub history: Vec<RateSample>,
    /// Forwarding to each peer this node has sent to, by node id.
    pub peers: Vec<PeerForwarding>,
}

/// Message rates over one sampling interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RateSample {
    /// The end of the interval, in Unix milliseconds.
    pub at_ms: u64,
    /// PUBLISH packets received per second.
    pub received: f64,
    /// PUBLISH packets sent per second.
    pub sent: f64,
    /// Messages dropped per second.
    pub dropped: f64,
}

/// The forward stream to one peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerForwarding {
    /// The peer.
    pub node_id: NodeId,
    /// Whether its stream is open (false while it cannot be reached).
    pub up: bool,
    /// Messages handed to its stream, since start.
    pub sent: u64,
    /// Messages for it dropped (peer down or too slow), since start.
    pub dropped: u64,
    /// Messages waiting in its channel now.
    pub queued: u64,
}

/// Where a node's figures come from: the broker runtime.
pub trait StatsSource: Send + Sync + 'static {
    /// This node's figures now.
    fn node_stats(&self) -> NodeStats;
}

/// Where the Admin service finds the [`StatsSource`], set once the broker runtime has
/// started; until then a peer asking is told the node is starting.
pub type StatsSlot = Arc<OnceLock<Arc<dyn StatsSource>>>;
