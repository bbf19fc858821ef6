//! Which entry formats every member of the cluster reads, so that a rolling upgrade
//! never has a node write an entry that another member cannot decode.
//!
//! An entry a follower cannot decode is not a small matter: its AppendEntries fail
//! until it is upgraded, and while the majority still runs the previous release (the
//! first steps of a rolling upgrade), nothing commits at all. So a node writes a
//! format newer than the previous release's ([`PREVIOUS_RELEASE_READS`]) only once
//! every member has said it reads it. Each node asks every member over the Admin
//! service's `Capabilities` call ([`watch`]); a node of a release before the call
//! answers UNIMPLEMENTED, which says it reads formats up to
//! [`PREVIOUS_RELEASE_READS`]. A member never heard from (down since this node
//! started) counts as the previous release: this node then writes what the previous
//! release reads, which costs a larger entry, never an unreadable one.
//!
//! A member that answered keeps its answer while it cannot be reached (a node down
//! for an upgrade comes back newer, not older), and one that answered this release's
//! format is not asked again at that address. The leader asks a node that joins
//! ([`may_join`]): one of an earlier release is refused, with a sentence saying so,
//! unless a member runs that release too (an upgrade under way, so nobody writes
//! the newer format yet) — a node of the previous release that the leader removed
//! (`cluster.autoclean_after`) while the others were upgraded cannot come back and
//! stall. Going back to an earlier release in place once the newer format is written
//! is not supported: that node stops at the first entry it cannot read, with an
//! error naming the format.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::command::NodeId;
use super::format::ENTRY_FORMAT;
use super::membership;
use super::network;
use super::raft::Raft;

/// The newest entry format a node of the previous release reads (it has no
/// `Capabilities` call).
pub const PREVIOUS_RELEASE_READS: u16 = 4;

/// How often the members are asked again.
const ASK_EVERY: Duration = Duration::from_secs(3);
/// How soon a node that knows no members yet looks again.
const ASK_FIRST: Duration = Duration::from_millis(200);
/// How long one member's answer is waited for.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// What a node's release can read, as it answers `Capabilities`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The newest Raft entry format it reads.
    pub entry_format: u16,
}

/// The newest entry format this node reads: [`ENTRY_FORMAT`], or in a debug build
/// with `TEST_FLOCKMQ_READ_ENTRY_FORMAT` set, that (the node then plays a node of an
/// earlier release: it refuses newer entries as that release would, and answers
/// `Capabilities` as that release would).
pub fn reads_entry_format() -> u16 {
    #[cfg(debug_assertions)]
    {
        static PLAYED: std::sync::LazyLock<Option<u16>> = std::sync::LazyLock::new(|| {
            std::env::var("TEST_FLOCKMQ_READ_ENTRY_FORMAT")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        if let Some(v) = *PLAYED {
            return v.min(ENTRY_FORMAT);
        }
    }
    ENTRY_FORMAT
}

/// This node's answer to `Capabilities`: `None` where a node of the release it plays
/// would not know the call.
pub fn own_capabilities() -> Option<Capabilities> {
    let entry_format = reads_entry_format();
    (entry_format > PREVIOUS_RELEASE_READS).then_some(Capabilities { entry_format })
}

/// The newest entry format every member reads, as far as this node knows; shared by
/// the watcher that learns it and the writers that consult it.
#[derive(Clone, Debug)]
pub struct Formats(Arc<AtomicU16>);

impl Default for Formats {
    fn default() -> Self {
        Formats(Arc::new(AtomicU16::new(PREVIOUS_RELEASE_READS)))
    }
}

impl Formats {
    /// Whether every member reads entries of `format`.
    pub fn all_read(&self, format: u16) -> bool {
        self.readable() >= format
    }

    /// The newest entry format every member reads.
    pub fn readable(&self) -> u16 {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, format: u16) {
        self.0.store(format, Ordering::Relaxed);
    }
}

/// What the members answered, by node id, with the address each answered at.
#[derive(Debug, Default)]
struct Answers(BTreeMap<NodeId, (String, u16)>);

impl Answers {
    /// The newest format all of `members` read: the least of their answers, this
    /// node's own for itself, [`PREVIOUS_RELEASE_READS`] for one never heard from at
    /// its current address (and with no members known).
    fn readable(&self, members: &BTreeMap<NodeId, String>, me: NodeId) -> u16 {
        members
            .iter()
            .map(|(id, addr)| match self.0.get(id) {
                _ if *id == me => reads_entry_format(),
                Some((at, format)) if at == addr => *format,
                _ => PREVIOUS_RELEASE_READS,
            })
            .min()
            .unwrap_or(PREVIOUS_RELEASE_READS)
            .min(reads_entry_format())
    }
}

/// Keep `formats` at the newest entry format every member of `raft`'s cluster reads,
/// asking each member every [`ASK_EVERY`] until `shutdown`.
pub async fn watch(raft: Raft, me: NodeId, formats: Formats, shutdown: CancellationToken) {
    let mut answers = Answers::default();
    loop {
        let members = membership::members(&raft).nodes;
        if members.is_empty() {
            // Not initialized, or not added yet: nothing is known of the members, and
            // what this node writes meanwhile is the previous release's format.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(ASK_FIRST) => continue,
            }
        }
        let asks = members
            .iter()
            .filter(|(id, addr)| {
                **id != me
                    && !matches!(answers.0.get(id), Some((at, f)) if at == *addr && *f >= ENTRY_FORMAT)
            })
            .map(|(id, addr)| async move {
                (*id, addr.clone(), network::capabilities(addr, ASK_TIMEOUT).await)
            });
        for (id, addr, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(Some(c)) => {
                    answers.0.insert(id, (addr, c.entry_format));
                }
                Ok(None) => {
                    answers.0.insert(id, (addr, PREVIOUS_RELEASE_READS));
                }
                // Unreachable: what it said last stands.
                Err(_) => {}
            }
        }
        answers.0.retain(|id, _| members.contains_key(id));
        let readable = answers.readable(&members, me);
        let before = formats.readable();
        if readable != before {
            formats.set(readable);
            match readable.cmp(&before) {
                std::cmp::Ordering::Greater => tracing::info!(
                    entry_format = readable,
                    "every member reads entry format {readable}: writing it"
                ),
                _ => tracing::warn!(
                    entry_format = readable,
                    "a member reads entry formats up to {readable} only (an earlier release, \
                     or not heard from): writing what it reads until it is upgraded"
                ),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(ASK_EVERY) => {}
        }
    }
}

/// Whether node `id` at `addr` may join a cluster whose members are `members`: not
/// if it reads an older entry format than this node and no other member reads as
/// old a one (the cluster may then write what it cannot read). A node that does not
/// answer is let in: the catch-up tells soon enough.
pub async fn may_join(
    members: &BTreeMap<NodeId, String>,
    id: NodeId,
    addr: &str,
) -> Result<(), String> {
    let reads = |c: Option<Capabilities>| c.map_or(PREVIOUS_RELEASE_READS, |c| c.entry_format);
    let Ok(joiner) = network::capabilities(addr, ASK_TIMEOUT).await.map(reads) else {
        return Ok(());
    };
    if joiner >= reads_entry_format() {
        return Ok(());
    }
    for (_, member) in members.iter().filter(|(m, _)| **m != id) {
        let answer = network::capabilities(member, ASK_TIMEOUT).await;
        if answer.is_ok_and(|c| reads(c) <= joiner) {
            return Ok(());
        }
    }
    Err(format!(
        "node {id} ({addr}) runs an earlier release: it reads Raft entry formats up to \
         {joiner}, and every member reads {}; upgrade it before it joins",
        reads_entry_format()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(list: &[(NodeId, &str)]) -> BTreeMap<NodeId, String> {
        list.iter().map(|(id, a)| (*id, (*a).to_owned())).collect()
    }

    #[test]
    fn the_cluster_reads_what_its_oldest_member_reads() {
        let m = members(&[(1, "a:7000"), (2, "b:7000"), (3, "c:7000")]);
        let mut answers = Answers::default();
        // Nodes 2 and 3 not heard from yet: the previous release's format.
        assert_eq!(answers.readable(&m, 1), PREVIOUS_RELEASE_READS);
        answers.0.insert(2, ("b:7000".into(), ENTRY_FORMAT));
        assert_eq!(answers.readable(&m, 1), PREVIOUS_RELEASE_READS);
        answers
            .0
            .insert(3, ("c:7000".into(), PREVIOUS_RELEASE_READS));
        assert_eq!(answers.readable(&m, 1), PREVIOUS_RELEASE_READS);
        answers.0.insert(3, ("c:7000".into(), ENTRY_FORMAT));
        assert_eq!(answers.readable(&m, 1), ENTRY_FORMAT);
    }

    #[test]
    fn an_answer_counts_only_for_the_address_it_came_from() {
        let mut answers = Answers::default();
        answers.0.insert(2, ("b:7000".into(), ENTRY_FORMAT));
        // Node 2 replaced by a node at another address (removed, another joined
        // under its id): not heard from.
        let m = members(&[(1, "a:7000"), (2, "d:7000")]);
        assert_eq!(answers.readable(&m, 1), PREVIOUS_RELEASE_READS);
        let m = members(&[(1, "a:7000"), (2, "b:7000")]);
        assert_eq!(answers.readable(&m, 1), ENTRY_FORMAT);
    }

    #[test]
    fn a_single_node_reads_its_own_format() {
        let m = members(&[(1, "a:7000")]);
        assert_eq!(Answers::default().readable(&m, 1), ENTRY_FORMAT);
    }
}
