//! The time from a log entry's commit to its apply on this node, which a slow state
//! machine or a stalled apply shows as growing (`flockmq_raft_commit_to_apply_seconds`).
//!
//! openraft tells the log store that entries are committed (`save_committed`) and
//! then hands them to the state machine (`apply`); the two halves share a
//! [`CommitClock`]: the log store notes when each new committed index became known,
//! and the state machine, after applying up to an index, observes how long each noted
//! index it passed has waited. State: a short queue under a std `Mutex`, held only
//! to push or pop (never across an `.await`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Most committed indexes remembered; older ones are dropped (not observed) rather
/// than grow without bound while apply lags far behind.
const MAX_PENDING: usize = 1024;

/// Shared by the log store and the state machine of one database.
#[derive(Clone, Debug, Default)]
pub(crate) struct CommitClock {
    inner: Arc<Mutex<Pending>>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Committed indexes not yet applied, with when their commit became known.
    committed: VecDeque<(u64, Instant)>,
    /// The last index applied (commits at or below it are not waiting for anything).
    applied: u64,
}

impl CommitClock {
    /// The log store learnt that entries up to `index` are committed.
    pub(crate) fn committed(&self, index: u64) {
        let Ok(mut p) = self.inner.lock() else { return };
        let newer = p.committed.back().is_none_or(|(last, _)| index > *last);
        if newer && index > p.applied {
            if p.committed.len() == MAX_PENDING {
                p.committed.pop_front();
            }
            p.committed.push_back((index, Instant::now()));
        }
    }

    /// The state machine applied entries up to `index`: the time each commit it
    /// covers waited, oldest first.
    pub(crate) fn applied(&self, index: u64) -> Vec<std::time::Duration> {
        let Ok(mut p) = self.inner.lock() else {
            return Vec::new();
        };
        p.applied = p.applied.max(index);
        let now = Instant::now();
        let mut waited = Vec::new();
        while p.committed.front().is_some_and(|(i, _)| *i <= index) {
            if let Some((_, at)) = p.committed.pop_front() {
                waited.push(now.saturating_duration_since(at));
            }
        }
        waited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apply_observes_each_commit_it_covers_once() {
        let clock = CommitClock::default();
        clock.committed(3);
        clock.committed(5);
        clock.committed(5); // the same index again: not a new commit
        assert_eq!(clock.applied(4).len(), 1, "covers the commit of 3");
        assert_eq!(clock.applied(5).len(), 1, "covers the commit of 5");
        assert!(clock.applied(9).is_empty(), "nothing left to observe");
        clock.committed(2); // behind what is applied (a restart's re-apply)
        assert!(clock.applied(9).is_empty());
    }

    #[test]
    fn it_remembers_a_bounded_number_of_commits() {
        let clock = CommitClock::default();
        for i in 1..=(MAX_PENDING as u64 + 10) {
            clock.committed(i);
        }
        assert_eq!(clock.applied(u64::MAX).len(), MAX_PENDING);
    }
}
