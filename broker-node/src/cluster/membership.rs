//! Changing who is in the cluster: a node joins (added as a learner, promoted to voter
//! once it has caught up) or is removed (it leaves, or an operator takes out a dead
//! one, or with `cluster.autoclean_after` the leader takes out one it has not reached
//! for that long, `broker/liveness.rs`). Changes run on the leader; any node accepts
//! them and passes them on. With `cluster.autoclean_after` a node also asks to be
//! added back when it finds itself left out ([`stay_member`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};

use super::command::NodeId;
use super::network;
use super::raft::Raft;

/// A membership change, as carried between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add node `id`, reachable at `addr`, as a voter.
    Join {
        /// The new node's id.
        id: NodeId,
        /// Its cluster (gRPC) address.
        addr: String,
    },
    /// Take node `id` out of the cluster.
    Remove {
        /// The node to remove.
        id: NodeId,
    },
    /// Not a change: answered by the node asked, with the index it has applied if it
    /// knows a leader, `0` if not (a node that starts with an empty disk asks whether
    /// the cluster already holds committed entries).
    Probe,
}

/// How long one change may take, catching a new node up included.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// The members and roles as this node sees them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// Voter ids.
    pub voters: BTreeSet<NodeId>,
    /// Every node (voters and learners) with its cluster address.
    pub nodes: BTreeMap<NodeId, String>,
}

/// The current membership of `raft`.
pub fn members(raft: &Raft) -> Members {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let membership = m.membership_config.membership();
    Members {
        voters: membership.voter_ids().collect(),
        nodes: membership
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect(),
    }
}

/// Apply `change`: here if this node leads, otherwise through the leader. Returns a
/// sentence saying what happened.
pub async fn change(raft: &Raft, change: MembershipChange) -> Result<String, String> {
    if change == MembershipChange::Probe {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let applied = match m.current_leader {
            Some(_) => m.last_applied.map_or(0, |l| l.index),
            None => 0,
        };
        return Ok(applied.to_string());
    }
    let (own, leader) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let leader = m.current_leader.and_then(|id| {
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| (id, n.addr.clone()))
        });
        (m.id, leader)
    };
    match leader {
        Some((id, _)) if id == own => apply_on_leader(raft, change).await,
        Some((_, addr)) => network::change_membership(&addr, &change, CHANGE_TIMEOUT).await,
        None => Err("no leader: the cluster has no majority".to_owned()),
    }
}

/// Apply `change` on this node, which must lead.
async fn apply_on_leader(raft: &Raft, change: MembershipChange) -> Result<String, String> {
    let current = members(raft);
    match change {
        MembershipChange::Join { id, addr } => {
            if current.voters.contains(&id) && current.nodes.get(&id) == Some(&addr) {
                return Ok(format!("node {id} is already a voter"));
            }
            if current.voters.contains(&id) {
                return Err(format!(
                    "node id {id} is already taken by {}; remove it first",
                    current.nodes.get(&id).map(String::as_str).unwrap_or("?")
                ));
            }
            super::compat::may_join(&current.nodes, id, &addr).await?;
            tracing::info!(node = id, %addr, "adding a node: catching it up as a learner");
            raft.add_learner(id, BasicNode::new(addr.clone()), true)
                .await
                .map_err(|e| format!("cannot add node {id} as a learner: {e}"))?;
            // Only this id is added, to whatever the voters are when the change
            // applies: two joins at once both end as voters (a full voter set read
            // above would let the second change undo the first).
            raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(|e| format!("cannot promote node {id}: {e}"))?;
            tracing::info!(node = id, %addr, "node joined as a voter");
            Ok(format!("node {id} ({addr}) joined as a voter"))
        }
        // Answered by `change` on the node asked, never passed to the leader.
        MembershipChange::Probe => Ok("0".to_owned()),
        MembershipChange::Remove { id } => {
            if !current.nodes.contains_key(&id) {
                return Ok(format!("node {id} is not a member"));
            }
            if current.voters.len() == 1 && current.voters.contains(&id) {
                return Err(format!("node {id} is the last voter"));
            }
            let change = if current.voters.contains(&id) {
                ChangeMembers::RemoveVoters(BTreeSet::from([id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([id]))
            };
            // `retain = false`: a removed voter is dropped from the nodes too.
            raft.change_membership(change, false)
                .await
                .map_err(|e| format!("cannot remove node {id}: {e}"))?;
            tracing::info!(node = id, "node removed from the cluster");
            Ok(format!("node {id} removed"))
        }
    }
}

/// This node, as it asks to be added: its id and its cluster address.
#[derive(Clone, Debug)]
pub struct Myself {
    /// This node's id.
    pub id: NodeId,
    /// The cluster address other nodes reach it at.
    pub addr: String,
}

impl Myself {
    /// The change that adds this node.
    fn join(&self) -> MembershipChange {
        MembershipChange::Join {
            id: self.id,
            addr: self.addr.clone(),
        }
    }
}

/// Keep asking the node at `seed` to add this node until it has (the `--join` flag).
/// The seed may be any member: it passes the request to the leader.
pub async fn join_through(seed: String, me: Myself, shutdown: tokio_util::sync::CancellationToken) {
    let change = me.join();
    let mut pause = Duration::from_millis(500);
    loop {
        match network::change_membership(&seed, &change, CHANGE_TIMEOUT).await {
            Ok(outcome) => {
                tracing::info!(%seed, "{outcome}");
                return;
            }
            Err(e) => tracing::warn!(%seed, error = %e, "cannot join yet, retrying"),
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// What a node that starts with an empty disk learned from its peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmptyStart {
    /// No peer knows of committed entries: a fresh cluster is forming.
    Fresh,
    /// The cluster holds entries up to this index, committed without this node's
    /// disk: it must catch up before it votes (its disk was wiped, or it comes late).
    Behind(u64),
}

/// Ask the other nodes of the initial cluster (`peers`, cluster addresses) whether the
/// cluster already holds committed entries, until a peer says so or enough of them
/// (with this node, a majority of `cluster_size`) say it does not.
pub async fn probe_empty_start(
    peers: &[String],
    cluster_size: usize,
    shutdown: &tokio_util::sync::CancellationToken,
) -> EmptyStart {
    let needed = cluster_size / 2; // with this node, a majority
    loop {
        let answers = futures::future::join_all(peers.iter().map(|addr| async move {
            network::change_membership(addr, &MembershipChange::Probe, Duration::from_secs(2))
                .await
                .ok()
                .and_then(|a| a.parse::<u64>().ok())
        }))
        .await;
        if let Some(index) = answers.iter().flatten().copied().max().filter(|i| *i > 0) {
            return EmptyStart::Behind(index);
        }
        if answers.iter().flatten().count() >= needed {
            return EmptyStart::Fresh;
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return EmptyStart::Fresh,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

/// How often a node checks that it is still a member (`cluster.autoclean_after`).
const KEEP_EVERY: Duration = Duration::from_secs(2);

/// How long a node may know no leader before it asks to be added again: longer than
/// an election, so that a member never asks during an ordinary failover (a member
/// that asks is told at once that it is already a voter, so a late ask costs little).
const ASK_AFTER: Duration = Duration::from_secs(6);

/// With `cluster.autoclean_after`, the leader removes a node it has not reached for
/// that long (a scaled-down pod, a lost machine). When such a node runs again, it
/// asks to be added back: every [`KEEP_EVERY`], a node that has known no leader for
/// [`ASK_AFTER`], or whose applied membership does not count it a voter, asks `seeds` (and the
/// members it knows) to add `me`, as `--join` does. Runs until `shutdown`.
pub async fn stay_member(
    raft: Raft,
    seeds: Vec<String>,
    me: Myself,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let (id, change) = (me.id, me.join());
    let mut leaderless_since: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(KEEP_EVERY) => {}
        }
        let (leader, voter, known) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            let known: Vec<String> = membership.nodes().map(|(_, n)| n.addr.clone()).collect();
            let voter = membership.voter_ids().any(|v| v == id);
            (m.current_leader, voter, known)
        };
        let ask = match leader {
            Some(_) if voter => {
                leaderless_since = None;
                false
            }
            // Left out, or left a learner by a join that failed half way (a leader
            // change while it was caught up): ask (again) to be a voter.
            Some(_) => true,
            None => {
                let now = crate::clock::now();
                let since = *leaderless_since.get_or_insert(now);
                now.saturating_duration_since(since) >= ASK_AFTER
            }
        };
        if !ask {
            continue;
        }
        let mut asked: Vec<&String> = Vec::new();
        for seed in seeds.iter().chain(known.iter()) {
            if *seed == me.addr || asked.contains(&seed) {
                continue;
            }
            asked.push(seed);
            match network::change_membership(seed, &change, CHANGE_TIMEOUT).await {
                Ok(outcome) => {
                    tracing::info!(%seed, "{outcome}");
                    leaderless_since = None;
                    break;
                }
                Err(e) => tracing::debug!(%seed, error = %e, "cannot rejoin through it"),
            }
        }
    }
}
