//! Picking one member of a shared-subscription group for each message.
//!
//! The selector keeps per-group state (round-robin positions, sticky choices) on the
//! node that receives the publish; randomness comes in through [`SelectContext`] so
//! the choices are testable.

use std::collections::HashMap;

/// How a shared group's member is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedStrategy {
    /// Each member in turn.
    RoundRobin,
    /// A uniformly random member.
    Random,
    /// The previous choice while it remains a candidate.
    Sticky,
    /// A stable hash of the publishing client id.
    HashClientId,
    /// A stable hash of the topic name.
    HashTopic,
    /// Round robin over members on this node, or over all when none is local.
    LocalFirst,
}

/// What a choice may depend on.
pub struct SelectContext<'a, K> {
    /// The publishing client (empty for broker-originated messages).
    pub publisher_client_id: &'a str,
    /// The message's topic.
    pub topic: &'a str,
    /// A random number drawn by the caller.
    pub random: u64,
    /// Whether a member is connected to this node.
    pub is_local: &'a dyn Fn(&K) -> bool,
}

/// Per-group selection state.
#[derive(Debug)]
pub struct SharedSelector<K> {
    strategy: SharedStrategy,
    positions: HashMap<String, usize>,
    sticky: HashMap<String, K>,
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl<K: Clone + PartialEq> SharedSelector<K> {
    /// A selector using `strategy` for every group.
    pub fn new(strategy: SharedStrategy) -> Self {
        SharedSelector {
            strategy,
            positions: HashMap::new(),
            sticky: HashMap::new(),
        }
    }

    fn round_robin(&mut self, group: &str, candidates: &[K]) -> Option<K> {
        if candidates.is_empty() {
            return None;
        }
        let pos = self.positions.entry(group.to_owned()).or_insert(0);
        let chosen = candidates[*pos % candidates.len()].clone();
        *pos = (*pos + 1) % candidates.len();
        Some(chosen)
    }

    /// Choose one of `candidates` for group `group`, or `None` when there is none.
    pub fn select(
        &mut self,
        group: &str,
        candidates: &[K],
        ctx: &SelectContext<'_, K>,
    ) -> Option<K> {
        if candidates.is_empty() {
            return None;
        }
        let n = candidates.len() as u64;
        match self.strategy {
            SharedStrategy::RoundRobin => self.round_robin(group, candidates),
            SharedStrategy::Random => Some(candidates[(ctx.random % n) as usize].clone()),
            SharedStrategy::HashClientId => {
                Some(candidates[(fnv(ctx.publisher_client_id) % n) as usize].clone())
            }
            SharedStrategy::HashTopic => Some(candidates[(fnv(ctx.topic) % n) as usize].clone()),
            SharedStrategy::Sticky => {
                if let Some(k) = self.sticky.get(group) {
                    if candidates.contains(k) {
                        return Some(k.clone());
                    }
                }
                let chosen = candidates[(ctx.random % n) as usize].clone();
                self.sticky.insert(group.to_owned(), chosen.clone());
                Some(chosen)
            }
            SharedStrategy::LocalFirst => {
                let local: Vec<K> = candidates
                    .iter()
                    .filter(|k| (ctx.is_local)(k))
                    .cloned()
                    .collect();
                if local.is_empty() {
                    self.round_robin(group, candidates)
                } else {
                    self.round_robin(group, &local)
                }
            }
        }
    }

    /// Forget the state of a group that no longer exists.
    pub fn forget(&mut self, group: &str) {
        self.positions.remove(group);
        self.sticky.remove(group);
    }
}
