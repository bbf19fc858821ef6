//! The leader's watch over the other nodes: a node it cannot reach for
//! `cluster.node_lost_after` is declared lost ([`Command::NodeLost`]), which ends the
//! sessions connected there as if their connections broke. Without it a killed node's
//! clients stay "connected" in the replicated state until that node returns: their
//! wills never fire, their persistent sessions never expire.
//!
//! Liveness is what Raft already knows: when the node last answered one of the
//! leader's appends (heartbeats included, every `cluster.heartbeat_interval`), as
//! [`PeerContacts`] records it. A dead process, a cut network and a paused process
//! (SIGSTOP: its kernel still accepts TCP connections, so a connect probe would call it
//! alive) all stop answering. Only the leader watches (it holds a majority, so what it
//! cannot reach is the minority), and a node is declared lost once per outage.
//!
//! With `cluster.autoclean_after`, a member the leader has not reached for that long
//! is also removed from the cluster (one removal at a time, in a task of its own: a
//! change waits for a majority), so that a scaled-down or lost node does not stay a
//! voter that the majority must count; the node asks to be added back if it runs
//! again (`cluster::membership::stay_member`).

use std::collections::{HashMap, HashSet};

use crate::hash::State;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{unix_ms, Broker};
use crate::cluster::command::{Command, NodeId};
use crate::cluster::membership::{self, MembershipChange};
use crate::cluster::network::PeerContacts;

/// How often the contacts are looked at.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A node whose last answer to the leader is older than this is unreachable for now
/// (heartbeats go out every 200 ms by default).
const SILENT_AFTER: Duration = Duration::from_secs(2);

impl Broker {
    /// Watch the other nodes while this node leads, until shutdown: declare lost
    /// those away for `lost_after`, remove from the cluster those away for
    /// `autoclean_after` (zero disables either).
    pub async fn run_node_watch(
        self: Arc<Self>,
        raft: crate::cluster::raft::Raft,
        contacts: PeerContacts,
        lost_after: Duration,
        autoclean_after: Duration,
    ) {
        if lost_after.is_zero() && autoclean_after.is_zero() {
            return;
        }
        // The removal under way, if any.
        let mut removal: Option<tokio::task::JoinHandle<()>> = None;
        // Since when each node has been unreachable, and those already declared lost.
        let mut unreachable_since: HashMap<NodeId, Instant, State> = HashMap::default();
        let mut declared: HashSet<NodeId, State> = HashSet::default();
        let mut ticks = self.ticks(PROBE_EVERY);
        while ticks.next().await {
            if !self.state.is_leader() {
                // A new leader starts its own count.
                unreachable_since.clear();
                declared.clear();
                continue;
            }
            let members: HashSet<NodeId, State> = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect();
            // Nodes that hold connected sessions, members or not (a removed node's
            // clients must not stay connected either).
            let holding: HashSet<NodeId, State> = self.read_state(|st| {
                st.sessions()
                    .filter(|(_, s)| s.connected)
                    .map(|(_, s)| s.node)
                    .collect()
            });
            let watched: HashSet<NodeId, State> = members
                .iter()
                .copied()
                .chain(holding.iter().copied())
                .filter(|n| *n != self.node_id)
                .collect();
            let now = crate::clock::now();
            let probes: Vec<(NodeId, bool)> = watched
                .iter()
                .map(|node| {
                    // A member's answers to this leader's appends; a node that is no
                    // member gets none, and is unreachable.
                    let reachable = members.contains(node)
                        && contacts
                            .last_answer(*node)
                            .is_some_and(|at| now.saturating_duration_since(at) < SILENT_AFTER);
                    (*node, reachable)
                })
                .collect();
            for (node, reachable) in probes {
                if reachable {
                    if unreachable_since.remove(&node).is_some() {
                        tracing::info!(node, "node reachable again");
                    }
                    declared.remove(&node);
                    continue;
                }
                let since = *unreachable_since.entry(node).or_insert_with(|| {
                    tracing::warn!(node, "node unreachable");
                    now
                });
                let away = now.duration_since(since);
                if !autoclean_after.is_zero()
                    && away >= autoclean_after
                    && members.contains(&node)
                    && removal.as_ref().is_none_or(|r| r.is_finished())
                {
                    tracing::warn!(
                        node,
                        after = ?autoclean_after,
                        "node unreachable for cluster.autoclean_after: removing it from the cluster"
                    );
                    let raft = raft.clone();
                    removal = Some(tokio::spawn(async move {
                        match membership::change(&raft, MembershipChange::Remove { id: node }).await
                        {
                            Ok(outcome) => {
                                metrics::counter!("flockmq_nodes_removed_total").increment(1);
                                tracing::info!(node, "{outcome}");
                            }
                            Err(e) => tracing::warn!(node, error = %e, "cannot remove the node"),
                        }
                    }));
                }
                if lost_after.is_zero()
                    || away < lost_after
                    || declared.contains(&node)
                    || !holding.contains(&node)
                {
                    continue;
                }
                tracing::warn!(
                    node,
                    after = ?lost_after,
                    "node lost: ending the sessions connected to it"
                );
                let lost = Command::NodeLost {
                    node,
                    publisher: self.node_id,
                    now_ms: unix_ms(),
                };
                match self.proposer.propose(lost).await {
                    Ok(_) => {
                        declared.insert(node);
                        metrics::counter!("flockmq_nodes_lost_total").increment(1);
                    }
                    Err(e) => tracing::warn!(node, error = %e, "cannot record a lost node"),
                }
            }
            unreachable_since.retain(|node, _| watched.contains(node));
        }
    }
}
