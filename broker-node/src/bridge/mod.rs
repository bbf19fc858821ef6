//! Bridges: configured links that carry chosen topics between this cluster and a
//! remote broker (another FlockMQ, Mosquitto, a cloud endpoint), both ways.
//!
//! A bridge has two sides. Locally it is a client inside the node (`local.rs`): an
//! MQTT 5 session served by the broker's own connection task over an in-memory
//! stream, persistent in the replicated state, subscribed (no-local) to the `out`
//! topics, so its undelivered QoS 1/2 messages queue in the cluster under the normal
//! queue limits and survive restarts and moves. Remotely it is a client of our own
//! (`remote.rs`, TLS in `tls.rs`) whose session state (`session.rs`) outlives each
//! connection, so a remote hop is exactly once for QoS 2 across reconnections. `link` moves messages between them: a local message
//! is acknowledged locally only once the remote acknowledged it (PUBACK for QoS 1,
//! PUBCOMP for QoS 2), and a remote message only once the local broker accepted it.
//!
//! No loops: the local subscriptions are no-local (what the bridge publishes locally
//! never reaches its own `out` side), the remote ones too on a v5 remote; a 3.1.1
//! remote has no no-local, so messages sent out on a topic that also comes in are
//! remembered for a while ([`echo::Echoes`]) and their echo is dropped.
//!
//! Each bridge runs on one node at a time: the Raft leader's. [`Bridges::run`] starts
//! them when this node becomes leader and stops them when it stops being leader; the
//! new leader's bridge takes the same local session over, so a move loses nothing.
//!
//! State: each bridge's figures are atomics in a [`BridgeStatus`] shared with the
//! admin API; a running link owns its sides in one task.

mod echo;
mod link;
pub mod local;
pub mod remote;
mod session;
mod tls;
pub mod topics;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Connections};
use crate::config::BridgeConfig;

/// The largest packet a bridge sends or takes on its remote side.
const MAX_PACKET: u32 = 268_435_455;
/// How often the runner checks leadership and refreshes the queue depths.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Why a bridge's link stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Its configuration cannot be used (TLS files, address).
    #[error("configuration: {0}")]
    Config(String),
    /// Its session in this cluster failed.
    #[error("local side: {0}")]
    Local(String),
    /// Its client towards the remote failed.
    #[error("remote side: {0}")]
    Remote(String),
}

/// One bridge's configuration and live figures.
pub struct BridgeStatus {
    /// Its configuration.
    pub config: BridgeConfig,
    /// Whether this node runs it now.
    pub running: AtomicBool,
    /// Whether its remote connection is up.
    pub connected: AtomicBool,
    /// Messages sent to the remote (acknowledged there for QoS 1/2).
    pub messages_out: AtomicU64,
    /// Their payload bytes.
    pub bytes_out: AtomicU64,
    /// Messages from the remote published locally.
    pub messages_in: AtomicU64,
    /// Their payload bytes.
    pub bytes_in: AtomicU64,
    /// Remote connections lost (each followed by reconnection attempts).
    pub reconnects: AtomicU64,
    /// Messages waiting in its local session's queue (sent or not yet).
    pub queued: AtomicU64,
    /// The last failure, for `ctl bridges`.
    pub last_error: Mutex<Option<String>>,
    /// Its metric handles, registered once (bumped per message).
    meters: Meters,
}

/// One bridge's metric handles.
struct Meters {
    connected: metrics::Gauge,
    queued: metrics::Gauge,
    reconnects: metrics::Counter,
    /// Messages and bytes, out then in.
    messages: [metrics::Counter; 2],
    bytes: [metrics::Counter; 2],
}

impl Meters {
    fn new(name: &str) -> Meters {
        let counter = |metric: &'static str, direction: &'static str| metrics::counter!(metric, "bridge" => name.to_owned(), "direction" => direction);
        Meters {
            connected: metrics::gauge!("flockmq_bridge_connected", "bridge" => name.to_owned()),
            queued: metrics::gauge!("flockmq_bridge_queued_messages", "bridge" => name.to_owned()),
            reconnects: metrics::counter!("flockmq_bridge_reconnects_total", "bridge" => name.to_owned()),
            messages: [
                counter("flockmq_bridge_messages_total", "out"),
                counter("flockmq_bridge_messages_total", "in"),
            ],
            bytes: [
                counter("flockmq_bridge_bytes_total", "out"),
                counter("flockmq_bridge_bytes_total", "in"),
            ],
        }
    }
}

impl BridgeStatus {
    fn new(config: BridgeConfig) -> BridgeStatus {
        BridgeStatus {
            running: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            messages_out: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            last_error: Mutex::new(None),
            meters: Meters::new(&config.name),
            config,
        }
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        self.meters.connected.set(if up { 1.0 } else { 0.0 });
    }

    fn count(&self, outgoing: bool, bytes: usize) {
        let (i, messages, total) = if outgoing {
            (0, &self.messages_out, &self.bytes_out)
        } else {
            (1, &self.messages_in, &self.bytes_in)
        };
        messages.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(bytes as u64, Ordering::Relaxed);
        self.meters.messages[i].increment(1);
        self.meters.bytes[i].increment(bytes as u64);
    }

    fn set_queued(&self, queued: u64) {
        self.queued.store(queued, Ordering::Relaxed);
        self.meters.queued.set(queued as f64);
    }

    fn lost(&self, why: String) {
        self.set_connected(false);
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        self.meters.reconnects.increment(1);
        self.failed(why);
    }

    fn failed(&self, why: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(why);
        }
    }
}

/// Every bridge of the configuration.
pub struct Bridges {
    /// Each bridge's status, in configuration order.
    pub list: Vec<Arc<BridgeStatus>>,
}

impl Bridges {
    /// The bridges of `configs`, with their metrics registered at zero.
    pub fn new(configs: &[BridgeConfig]) -> Arc<Bridges> {
        let list: Vec<Arc<BridgeStatus>> = configs
            .iter()
            .map(|c| Arc::new(BridgeStatus::new(c.clone())))
            .collect();
        // Every series exists from the first scrape.
        for b in &list {
            b.set_connected(false);
            b.set_queued(0);
            for c in b.meters.messages.iter().chain(&b.meters.bytes) {
                c.increment(0);
            }
            b.meters.reconnects.increment(0);
        }
        Arc::new(Bridges { list })
    }

    /// Run the bridges while this node leads the cluster, until `shutdown`.
    pub async fn run(self: Arc<Self>, broker: Arc<Broker>, shutdown: CancellationToken) {
        if self.list.is_empty() {
            return;
        }
        let handler = Connections(broker.clone());
        let mut running: Option<CancellationToken> = None;
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let leader = broker.state.is_leader();
            match (&running, leader) {
                (None, true) => {
                    tracing::info!(bridges = self.list.len(), "leader: starting the bridges");
                    let token = shutdown.child_token();
                    for status in &self.list {
                        tokio::spawn(supervise(handler.clone(), status.clone(), token.clone()));
                    }
                    running = Some(token);
                }
                (Some(token), false) => {
                    tracing::info!("no longer leader: stopping the bridges");
                    token.cancel();
                    running = None;
                }
                _ => {}
            }
            for status in &self.list {
                let queued = broker.state.read(|s| {
                    s.session(&status.config.local_client_id())
                        .map_or(0, |r| r.queue.len() as u64)
                });
                status.set_queued(queued);
            }
        }
        if let Some(token) = running {
            token.cancel();
        }
    }
}

/// Run one bridge's link until `cancel`, starting it again after a failure.
async fn supervise(handler: Connections, status: Arc<BridgeStatus>, cancel: CancellationToken) {
    status.running.store(true, Ordering::Relaxed);
    let cfg = &status.config;
    let mut backoff = remote::Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    loop {
        let started = Instant::now();
        let outcome = link::run(&handler, &status, cancel.child_token()).await;
        status.set_connected(false);
        if cancel.is_cancelled() {
            break;
        }
        if let Err(e) = outcome {
            tracing::warn!(bridge = %cfg.name, error = %e, "bridge stopped; starting it again");
            status.failed(e.to_string());
        }
        if started.elapsed() > cfg.reconnect_max {
            backoff.reset();
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_wait()) => {}
        }
    }
    status.running.store(false, Ordering::Relaxed);
}
