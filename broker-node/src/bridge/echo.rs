//! What a 3.1.1 remote echoes: it has no no-local, so a message the bridge publishes
//! there on a topic it also subscribes to comes straight back. The bridge remembers
//! each message it sent on such a topic (topic and payload hash) for a while and drops
//! the first copy that comes back. A different client publishing the very same payload
//! on the same topic within that while is taken for the echo: the cost of a remote
//! that cannot say who published.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

/// How long an echo is waited for.
const ECHO_WINDOW: Duration = Duration::from_secs(60);
/// Most messages remembered; the oldest are forgotten first.
const MAX_REMEMBERED: usize = 100_000;

/// Messages sent out whose echo may come back.
#[derive(Default)]
pub struct Echoes {
    counts: HashMap<u64, u32>,
    order: VecDeque<(Instant, u64)>,
}

fn key(topic: &str, payload: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    topic.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

impl Echoes {
    /// Remember a message sent on `topic` at `now`.
    pub fn sent(&mut self, topic: &str, payload: &[u8], now: Instant) {
        self.forget_old(now);
        if self.order.len() >= MAX_REMEMBERED {
            self.forget_first();
        }
        let k = key(topic, payload);
        *self.counts.entry(k).or_insert(0) += 1;
        self.order.push_back((now, k));
    }

    /// Whether a message arriving on `topic` is the echo of one sent (and forget it).
    pub fn is_echo(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        self.forget_old(now);
        let k = key(topic, payload);
        match self.counts.get_mut(&k) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&k);
                }
                if let Some(i) = self.order.iter().position(|(_, o)| *o == k) {
                    self.order.remove(i);
                }
                true
            }
            None => false,
        }
    }

    fn forget_old(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > ECHO_WINDOW)
        {
            self.forget_first();
        }
    }

    fn forget_first(&mut self) {
        if let Some((_, k)) = self.order.pop_front() {
            if let Some(n) = self.counts.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.counts.remove(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_copy_back_is_the_echo_and_a_second_is_not() {
        let mut e = Echoes::default();
        let t0 = Instant::now();
        e.sent("a/b", b"x", t0);
        assert!(!e.is_echo("a/b", b"y", t0));
        assert!(e.is_echo("a/b", b"x", t0));
        assert!(!e.is_echo("a/b", b"x", t0));
    }

    #[test]
    fn an_echo_is_waited_for_one_window_only() {
        let mut e = Echoes::default();
        let t0 = Instant::now();
        e.sent("a", b"x", t0);
        assert!(!e.is_echo("a", b"x", t0 + ECHO_WINDOW + Duration::from_secs(1)));
    }
}
