//! The leader's watch over the other nodes: a node it cannot reach for
//! `cluster.node_lost_after` is declared lost ([`Command::NodeLost`]), which ends the
//! sessions connected there as if their connections broke. Without it a killed node's
//! clients stay "connected" in the replicated state until that node returns: their
//! wills never fire, their persistent sessions never expire.
//!
//! Reachability is a TCP connect to the node's cluster address, once a second with a
//! one-second timeout: a dead process refuses at once, a cut network times out. Only
//! the leader watches (it holds a majority, so what it cannot reach is the minority),
//! and a node is declared lost once per outage.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{unix_ms, Broker};
use crate::cluster::command::{Command, NodeId};

/// How often, and for how long at most, each node is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);

impl Broker {
    /// Watch the other nodes while this node leads, until shutdown. `lost_after` of
    /// zero disables the watch.
    pub async fn run_node_watch(
        self: Arc<Self>,
        raft: crate::cluster::raft::Raft,
        lost_after: Duration,
    ) {
        if lost_after.is_zero() {
            return;
        }
        // Since when each node has been unreachable, and those already declared lost.
        let mut unreachable_since: HashMap<NodeId, Instant> = HashMap::new();
        let mut declared: HashSet<NodeId> = HashSet::new();
        let mut ticks = self.ticks(PROBE_EVERY);
        while ticks.next().await {
            if !self.state.is_leader() {
                // A new leader starts its own count.
                unreachable_since.clear();
                declared.clear();
                continue;
            }
            let members: HashMap<NodeId, String> = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .nodes()
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect();
            // Nodes that hold connected sessions, members or not (a removed node's
            // clients must not stay connected either).
            let holding: HashSet<NodeId> = self.read_state(|st| {
                st.sessions()
                    .filter(|(_, s)| s.connected)
                    .map(|(_, s)| s.node)
                    .collect()
            });
            let watched: HashSet<NodeId> = members
                .keys()
                .copied()
                .chain(holding.iter().copied())
                .filter(|n| *n != self.node_id)
                .collect();
            let probes = watched.iter().map(|node| {
                let addr = members.get(node).cloned();
                async move {
                    let reachable = match addr {
                        Some(addr) => matches!(
                            tokio::time::timeout(
                                PROBE_EVERY,
                                tokio::net::TcpStream::connect(addr.as_str())
                            )
                            .await,
                            Ok(Ok(_))
                        ),
                        None => false,
                    };
                    (*node, reachable)
                }
            });
            let now = Instant::now();
            for (node, reachable) in futures::future::join_all(probes).await {
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
                if now.duration_since(since) < lost_after
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
