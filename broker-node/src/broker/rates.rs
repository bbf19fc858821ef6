//! This node's message rates over the last minutes, and its figures for the admin API
//! and for other nodes ([`Broker`] is the cluster layer's
//! [`StatsSource`](crate::cluster::stats::StatsSource)).
//!
//! [`RateHistory`] is plain data: it is given the counters and the time of each
//! sample and turns them into per-second rates, keeping the last
//! [`HISTORY_SAMPLES`]. [`Broker::run_rates`] samples the `$SYS` counters into it once
//! a second; the history sits behind a std `Mutex` held for one push or one copy.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{lock, unix_ms, Broker};
use crate::cluster::stats::{NodeStats, RateSample, StatsSource};

/// Samples kept: five minutes at one a second.
pub const HISTORY_SAMPLES: usize = 300;

/// How often [`Broker::run_rates`] samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The counters a rate is computed from, as read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// PUBLISH packets received.
    pub received: u64,
    /// PUBLISH packets sent.
    pub sent: u64,
    /// Messages dropped.
    pub dropped: u64,
}

/// Per-second rates between successive samples of [`Counts`].
#[derive(Debug, Default)]
pub struct RateHistory {
    last: Option<(u64, Counts)>,
    samples: VecDeque<RateSample>,
}

impl RateHistory {
    /// Record `counts` as read at `now_ms`; from the second sample on, the rates
    /// since the previous one are kept. A sample no later than the previous one is
    /// ignored.
    pub fn push(&mut self, now_ms: u64, counts: Counts) {
        if let Some((then_ms, before)) = self.last {
            if now_ms <= then_ms {
                return;
            }
            let secs = (now_ms - then_ms) as f64 / 1000.0;
            let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / secs;
            if self.samples.len() == HISTORY_SAMPLES {
                self.samples.pop_front();
            }
            self.samples.push_back(RateSample {
                at_ms: now_ms,
                received: rate(counts.received, before.received),
                sent: rate(counts.sent, before.sent),
                dropped: rate(counts.dropped, before.dropped),
            });
        }
        self.last = Some((now_ms, counts));
    }

    /// The rates kept, oldest first.
    pub fn samples(&self) -> Vec<RateSample> {
        self.samples.iter().copied().collect()
    }
}

impl Broker {
    /// The `$SYS` counters a rate is computed from, now.
    fn counts(&self) -> Counts {
        let s = &self.stats;
        Counts {
            received: s.messages_received.load(Ordering::Relaxed),
            sent: s.messages_sent.load(Ordering::Relaxed),
            dropped: s.messages_dropped.load(Ordering::Relaxed),
        }
    }

    /// Sample the message counters into the rate history every [`SAMPLE_EVERY`]
    /// until shutdown.
    pub async fn run_rates(self: Arc<Self>) {
        let mut ticks = self.ticks(SAMPLE_EVERY);
        while ticks.next().await {
            let counts = self.counts();
            lock(&self.rates).push(unix_ms(), counts);
        }
    }
}

impl StatsSource for Broker {
    fn node_stats(&self) -> NodeStats {
        let s = &self.stats;
        let counts = self.counts();
        let (raft_state, term, applied_index) = {
            let metrics = self.state.raft_metrics();
            let m = metrics.borrow();
            (
                format!("{:?}", m.state),
                m.current_term,
                m.last_applied.map(|l| l.index),
            )
        };
        NodeStats {
            node_id: self.node_id,
            uptime_secs: self.started.elapsed().as_secs(),
            raft_state,
            term,
            applied_index,
            apply_lag: self.state.apply_lag(),
            connections: s.clients_connected.load(Ordering::Relaxed),
            messages_received: counts.received,
            messages_sent: counts.sent,
            messages_dropped: counts.dropped,
            bytes_received: s.bytes_received.load(Ordering::Relaxed),
            bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
            ws_addr: self.config.ws_addr.map(|a| a.to_string()),
            history: lock(&self.rates).samples(),
            peers: self.forwarder.peer_stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(received: u64, sent: u64, dropped: u64) -> Counts {
        Counts {
            received,
            sent,
            dropped,
        }
    }

    #[test]
    fn rates_are_the_counters_growth_per_second_between_samples() {
        let mut h = RateHistory::default();
        h.push(10_000, counts(100, 50, 0));
        assert!(h.samples().is_empty(), "one sample gives no rate yet");
        h.push(12_000, counts(300, 250, 4));
        assert_eq!(
            h.samples(),
            vec![RateSample {
                at_ms: 12_000,
                received: 100.0,
                sent: 100.0,
                dropped: 2.0,
            }]
        );
    }

    #[test]
    fn a_sample_out_of_order_is_ignored_and_the_history_is_bounded() {
        let mut h = RateHistory::default();
        h.push(5_000, counts(0, 0, 0));
        h.push(5_000, counts(10, 10, 10));
        assert!(h.samples().is_empty());
        for i in 1..=(HISTORY_SAMPLES as u64 + 10) {
            h.push(5_000 + i * 1000, counts(i, 0, 0));
        }
        let samples = h.samples();
        assert_eq!(samples.len(), HISTORY_SAMPLES);
        assert_eq!(
            samples.last().map(|s| s.at_ms),
            Some(5_000 + (HISTORY_SAMPLES as u64 + 10) * 1000)
        );
        assert!(samples.iter().all(|s| s.received == 1.0));
    }
}
