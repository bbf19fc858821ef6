//! Every metric FlockMQ exports, with its help text, and the counters registered at
//! zero on start: a series that exists from the first scrape lets `rate()` and
//! alerts see its first increment, instead of a series that appears out of nowhere.
//!
//! Names follow CONVENTIONS.md: prefix `flockmq_`, base units, `_total` counters, and
//! labels of bounded cardinality only (reason, QoS, listener, protocol, peer node id,
//! a configured bridge's name).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Why a message is dropped, as the `reason` label of `flockmq_messages_dropped_total`.
pub const DROP_REASONS: &[&str] = &[
    "queue_full",
    "expired",
    "no_subscribers",
    "acl",
    "too_large",
    "peer_down",
    "peer_slow",
    "not_connected",
    "retained_quota",
    "node_queue_full",
];

/// Which cap refused something, as the `limit` label of
/// `flockmq_quota_refusals_total`.
pub const QUOTA_LIMITS: &[&str] = &["sessions", "retained", "node_queued_bytes"];

/// The outcome of one filter of a SUBSCRIBE, as the `result` label of
/// `flockmq_subscribe_filters_total`.
pub const SUBSCRIBE_RESULTS: &[&str] =
    &["granted", "denied", "quota_exceeded", "invalid", "failed"];

/// The outcome of one filter of an UNSUBSCRIBE, as the `result` label of
/// `flockmq_unsubscribe_filters_total`.
pub const UNSUBSCRIBE_RESULTS: &[&str] = &["removed", "not_found", "failed"];

/// How a client connection ended, as the `reason` label of
/// `flockmq_connections_closed_total`.
pub const CLOSE_REASONS: &[&str] = &["disconnect", "abrupt", "taken_over", "shutdown"];

/// Why a parked connection woke, as the `why` label of
/// `flockmq_connections_unparked_total`.
pub const UNPARK_REASONS: &[&str] = &["readable", "mailbox", "keep_alive", "shutdown"];

/// Describe every metric and register the unlabelled counters and the dropped /
/// closed reasons at zero.
pub fn register() {
    describe_gauge!(
        "flockmq_build_info",
        "Always 1; the version label tells which FlockMQ runs."
    );
    describe_gauge!(
        "flockmq_connections",
        "Client connections past CONNECT, by listener and protocol version."
    );
    describe_gauge!(
        "flockmq_allocator_bytes",
        "The memory allocator's figures: allocated (live allocations), active (pages holding them), resident (physically resident, metadata included), retained (unmapped, kept in reserve)."
    );
    describe_gauge!(
        "flockmq_bridge_connected",
        "1 while the bridge (label bridge) is connected to its remote broker from this node."
    );
    describe_gauge!(
        "flockmq_bridge_queued_messages",
        "Messages waiting in the bridge's local session for the remote (label bridge)."
    );
    describe_counter!(
        "flockmq_bridge_messages_total",
        "Messages carried by a bridge, by bridge and direction (out: acknowledged by the remote; in: published locally)."
    );
    describe_counter!(
        "flockmq_bridge_bytes_total",
        Unit::Bytes,
        "Payload bytes carried by a bridge, by bridge and direction."
    );
    describe_counter!(
        "flockmq_bridge_reconnects_total",
        "Remote connections of a bridge lost or refused (each followed by a reconnection after a backoff)."
    );
    describe_gauge!(
        "flockmq_connections_parked",
        "Idle connections waiting in the parking lot without a task (mqtt.park_after)."
    );
    for (name, help) in [
        (
            "flockmq_connections_opened_total",
            "TCP connections accepted, by listener.",
        ),
        (
            "flockmq_connections_closed_total",
            "Client sessions ended on this node, by reason (disconnect, abrupt, taken_over, shutdown).",
        ),
        (
            "flockmq_connections_unparked_total",
            "Parked connections woken, by why (readable, mailbox, keep_alive, shutdown).",
        ),
        (
            "flockmq_connections_refused_total",
            "Connections refused before CONNECT, by reason.",
        ),
        ("flockmq_accept_errors_total", "Failed accept() calls."),
        (
            "flockmq_handshake_failures_total",
            "TLS or WebSocket handshakes that failed, by transport.",
        ),
        (
            "flockmq_connect_timeouts_total",
            "Connections closed for sending no CONNECT in time.",
        ),
        ("flockmq_connack_total", "CONNACKs sent, by reason code."),
        (
            "flockmq_auth_failures_total",
            "CONNECTs refused for bad credentials.",
        ),
        (
            "flockmq_keepalive_timeouts_total",
            "Clients closed for exceeding 1.5 times their keep alive.",
        ),
        (
            "flockmq_decode_errors_total",
            "Packets that could not be decoded (malformed, too large).",
        ),
        (
            "flockmq_protocol_errors_total",
            "Connections closed for a protocol error.",
        ),
        ("flockmq_packets_received_total", "MQTT packets received."),
        (
            "flockmq_messages_received_total",
            "PUBLISH messages received from clients, by QoS.",
        ),
        (
            "flockmq_messages_sent_total",
            "PUBLISH messages sent to clients, by QoS.",
        ),
        (
            "flockmq_messages_dropped_total",
            "Messages dropped, by reason.",
        ),
        (
            "flockmq_quota_refusals_total",
            "Refusals at the node's caps, by limit: CONNECTs past mqtt.max_sessions, retained publishes past mqtt.max_retained_messages, messages not queued past mqtt.max_node_queued_bytes.",
        ),
        (
            "flockmq_forward_sent_total",
            "Messages forwarded to a peer node, by peer.",
        ),
        (
            "flockmq_forward_received_total",
            "Messages received from a peer node, by peer.",
        ),
        (
            "flockmq_forward_frames_total",
            "Forward frames sent to a peer node, by peer.",
        ),
        (
            "flockmq_forward_errors_total",
            "Forwarding failures by peer and kind (connect, stream, decode).",
        ),
        (
            "flockmq_forward_dropped_total",
            "Messages for a peer dropped because it was down or slow, by peer and reason.",
        ),
        (
            "flockmq_nodes_lost_total",
            "Nodes the leader declared lost, ending their clients' sessions.",
        ),
        (
            "flockmq_nodes_removed_total",
            "Nodes the leader removed from the cluster after cluster.autoclean_after without reaching them.",
        ),
        (
            "flockmq_raft_snapshots_total",
            "Raft snapshots built or installed, by kind.",
        ),
        (
            "flockmq_raft_leader_changes_total",
            "Changes of the leader this node knows (a leader lost or a new one elected).",
        ),
        (
            "flockmq_subscribe_filters_total",
            "Filters of SUBSCRIBE packets, by result (granted, denied by the ACL, quota_exceeded, invalid or not supported, failed: not committed).",
        ),
        (
            "flockmq_unsubscribe_filters_total",
            "Filters of UNSUBSCRIBE packets, by result (removed, not_found, failed: not committed).",
        ),
    ] {
        describe_counter!(name, help);
    }
    describe_counter!(
        "flockmq_bytes_received_total",
        Unit::Bytes,
        "Bytes read from client connections."
    );
    describe_counter!(
        "flockmq_bytes_sent_total",
        Unit::Bytes,
        "Bytes written to client connections."
    );
    describe_counter!(
        "flockmq_forward_bytes_sent_total",
        Unit::Bytes,
        "Encoded forward frame bytes sent to a peer, by peer."
    );
    describe_counter!(
        "flockmq_forward_bytes_received_total",
        Unit::Bytes,
        "Encoded forward frame bytes received from a peer, by peer."
    );
    describe_gauge!(
        "flockmq_forward_peer_up",
        "1 while the forward stream to the peer is open, 0 while it cannot be reached."
    );
    describe_histogram!(
        "flockmq_forward_frame_messages",
        "Messages per forward frame, by peer."
    );
    describe_histogram!(
        "flockmq_forward_ack_duration_seconds",
        Unit::Seconds,
        "From sending a forward frame to the peer's acknowledgement, by peer."
    );
    for (name, help) in [
        ("flockmq_raft_term", "The current Raft term."),
        (
            "flockmq_raft_leader_id",
            "The node this node believes leads (0: none known).",
        ),
        ("flockmq_raft_is_leader", "1 on the leader."),
        (
            "flockmq_raft_last_log_index",
            "Index of the last entry in this node's log.",
        ),
        (
            "flockmq_raft_applied_index",
            "Index of the last entry applied to the state machine.",
        ),
        (
            "flockmq_raft_log_entries",
            "Entries kept in the log (not yet purged behind a snapshot).",
        ),
        (
            "flockmq_raft_snapshot_index",
            "Last log index covered by the newest snapshot.",
        ),
        ("flockmq_raft_members", "Cluster members, by role."),
        (
            "flockmq_sessions",
            "Sessions in the replicated state, by state (online, offline); reported by the leader, 0 on the other nodes, so that sum() over the nodes is the cluster's figure.",
        ),
        (
            "flockmq_subscriptions",
            "Subscriptions in the replicated state; reported by the leader, 0 on the other nodes.",
        ),
        (
            "flockmq_retained_messages",
            "Retained messages; reported by the leader, 0 on the other nodes.",
        ),
        (
            "flockmq_queued_messages",
            "Messages queued for persistent sessions; reported by the leader, 0 on the other nodes.",
        ),
        (
            "flockmq_queue_fill_ratio",
            "The fullest persistent session's queue as a fraction of its limit (mqtt.max_queued_messages or max_queued_bytes, whichever is nearer; 1: full, new messages are dropped); reported by the leader, 0 on the other nodes.",
        ),
        (
            "flockmq_inflight_messages",
            "QoS 1/2 messages sent to clients of this node and not yet acknowledged.",
        ),
    ] {
        describe_gauge!(name, help);
    }
    describe_gauge!(
        "flockmq_raft_snapshot_bytes",
        Unit::Bytes,
        "Size of the newest snapshot this node built."
    );
    describe_histogram!(
        "flockmq_raft_snapshot_duration_seconds",
        Unit::Seconds,
        "Time to build or install a snapshot, by kind."
    );
    describe_histogram!(
        "flockmq_raft_proposal_duration_seconds",
        Unit::Seconds,
        "From proposing a batch of commands to its commit."
    );
    describe_histogram!("flockmq_raft_batch_commands", "Commands per Raft entry.");
    describe_histogram!(
        "flockmq_delivery_latency_seconds",
        Unit::Seconds,
        "From a message's publish (its node's clock) to its PUBLISH to a subscriber here, one delivery in 16."
    );
    describe_histogram!(
        "flockmq_storage_sync_seconds",
        Unit::Seconds,
        "Time to fsync appended Raft log entries."
    );
    describe_gauge!(
        "flockmq_storage_disk_bytes",
        Unit::Bytes,
        "Bytes of the files in this node's data directory."
    );
    describe_gauge!(
        "flockmq_raft_replication_lag_entries",
        "Log entries each follower is behind the leader, by peer (the leader reports; other nodes 0)."
    );
    describe_histogram!(
        "flockmq_raft_commit_to_apply_seconds",
        Unit::Seconds,
        "From this node learning that log entries are committed to their apply to its state machine."
    );

    for name in [
        "flockmq_accept_errors_total",
        "flockmq_connect_timeouts_total",
        "flockmq_auth_failures_total",
        "flockmq_keepalive_timeouts_total",
        "flockmq_decode_errors_total",
        "flockmq_protocol_errors_total",
        "flockmq_packets_received_total",
        "flockmq_bytes_received_total",
        "flockmq_bytes_sent_total",
        "flockmq_nodes_lost_total",
        "flockmq_raft_leader_changes_total",
        "flockmq_nodes_removed_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for &result in SUBSCRIBE_RESULTS {
        metrics::counter!("flockmq_subscribe_filters_total", "result" => result).increment(0);
    }
    for &result in UNSUBSCRIBE_RESULTS {
        metrics::counter!("flockmq_unsubscribe_filters_total", "result" => result).increment(0);
    }
    for qos in ["0", "1", "2"] {
        metrics::counter!("flockmq_messages_received_total", "qos" => qos).increment(0);
        metrics::counter!("flockmq_messages_sent_total", "qos" => qos).increment(0);
    }
    for &reason in DROP_REASONS {
        metrics::counter!("flockmq_messages_dropped_total", "reason" => reason).increment(0);
    }
    for &limit in QUOTA_LIMITS {
        metrics::counter!("flockmq_quota_refusals_total", "limit" => limit).increment(0);
    }
    for &reason in CLOSE_REASONS {
        metrics::counter!("flockmq_connections_closed_total", "reason" => reason).increment(0);
    }
    for &why in UNPARK_REASONS {
        metrics::counter!("flockmq_connections_unparked_total", "why" => why).increment(0);
    }
}
