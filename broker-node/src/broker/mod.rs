//! The node's runtime: the shared [`Broker`] context every connection task holds, the
//! registry of clients connected to this node, and publish dispatch. [`Connections`]
//! is what the listeners of `transport` are handed: each stream they accept becomes
//! a connection task.
//!
//! State choices: the replicated state is read through [`StateHandle`] in short
//! synchronous sections (never across an `.await`); the local registry is a sharded
//! map (`DashMap`: each shard its own lock, so deliveries to different clients do not
//! serialize on one lock) touched once per connect, disconnect and delivery lookup;
//! shared subscription selection state is sharded by group name, each shard behind a
//! small `Mutex`. Counters for `$SYS`
//! are atomics. Nothing here blocks on the network while holding a lock.

pub mod connection;
pub mod dispatch;
pub mod events;
pub mod liveness;
pub mod mailbox;
pub mod park;
pub mod provisional;
pub mod rates;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::cluster::command::NodeId;
use crate::cluster::forward::Forwarder;
use crate::cluster::proposer::Proposer;
use crate::cluster::state::BrokerState;
use crate::cluster::StateHandle;
use crate::config::Config;
use crate::router::SharedSelector;
use crate::transport::{Admitted, ClientStream, ConnectionHandler, Vouched};

pub use crate::session::Delivery;

/// What a connection task can be told by the rest of the node.
#[derive(Debug)]
pub enum ConnMsg {
    /// Send this message. Boxed, so that a mailbox's queue slots stay small.
    Deliver(Box<Delivery>),
    /// The replicated queue of this session has new messages.
    QueueGrew,
    /// Another connection took the session over (v5 0x8E).
    TakenOver,
    /// An operator or the node asked the client to go, with a v5 reason code.
    Disconnect(u8),
}

/// How the node reaches one locally connected client.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    /// Identifies the connection (a client id may reconnect: the newest wins).
    pub connection_id: u64,
    /// Bounded: a full mailbox means a slow client, and the delivery waits or is dropped.
    pub tx: mailbox::Sender<ConnMsg>,
}

/// Counters published on `$SYS` and kept without locks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections currently open.
    pub clients_connected: AtomicU64,
    /// PUBLISH packets received from clients.
    pub messages_received: AtomicU64,
    /// PUBLISH packets sent to clients.
    pub messages_sent: AtomicU64,
    /// Bytes read from clients.
    pub bytes_received: AtomicU64,
    /// Bytes written to clients.
    pub bytes_sent: AtomicU64,
    /// Messages dropped at a limit (queue full, slow client, too large).
    pub messages_dropped: AtomicU64,
    /// QoS 1/2 messages sent to clients here and not yet acknowledged.
    pub messages_inflight: AtomicU64,
    /// The last leader this node knew (0: none yet), kept while no leader is known:
    /// where a client this node cannot serve is sent (`mqtt.server_references`).
    pub last_leader: AtomicU64,
}

impl Stats {
    /// Add `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Take `n` from `counter` (a gauge; never more than was added).
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }
}

/// How long a refused connection's OpenSession is watched for a late commit: TCP gives
/// up retransmitting a stuck request well within this (Linux: about 15 minutes).
const REFUSED_OPEN_TTL: Duration = Duration::from_secs(20 * 60);

/// At most this many refused connections are watched; the oldest is forgotten first.
const REFUSED_OPENS_KEPT: usize = 10_000;

/// Connection ids count in steps of this many, offset by the node id's residue (see
/// [`Broker::next_connection_id`]).
const CONNECTION_ID_NODES: u64 = 4096;
/// A run's first connection id is its start (Unix ms) shifted by this: later runs of a
/// node start above every id an earlier one handed out unless it made more than 1,024
/// connections a millisecond or the clock was set back ([`first_connection_id`]), and
/// ids stay below 2^64 until 2109.
const CONNECTION_ID_SHIFT: u32 = 22;

/// The node record (`storage::LogStore::node_record`) below which no later run hands
/// out connection ids.
const CONNECTION_IDS_FROM: &str = "connection_ids_from";
/// The node record of the clock at the last run's start, as a connection id (a clock
/// behind it is what the warning is about).
const LAST_START_CLOCK: &str = "last_start_clock";
/// The ids a run reserves at its start: 2^30 connections' worth (about 17.5 minutes of
/// the clock's ids, so a node restarted sooner than that goes on above its last
/// run's reservation instead of from its clock: unique all the same).
const RUN_RESERVATION: u64 = (1 << 30) * CONNECTION_ID_NODES;

/// The first connection id of this run: from the clock (its start, shifted), but
/// never below the ids an earlier run of this node reserved, which this run reserves
/// in turn before any connection. A clock set back between runs (an edge device that
/// boots before NTP, a VM restored, a manual correction) otherwise started a run below
/// the last one: sessions that run left open passed for this run's and were never
/// closed (no will, no expiry), and once as many connections were made as the clock
/// was behind (1,024 per millisecond), new ids repeated old ones. (A run that makes
/// more than its 2^30 connections before a restart with the clock set back is not
/// covered.)
pub async fn first_connection_id(
    storage: &storage::LogStore<crate::cluster::raft::TypeConfig>,
) -> std::io::Result<u64> {
    // Ids are multiples of CONNECTION_ID_NODES plus the node's residue: the highest
    // such multiple, should the record ever be near the end of the range.
    const TOP: u64 = u64::MAX - (CONNECTION_ID_NODES - 1) - RUN_RESERVATION;
    let from_clock = (unix_ms() << CONNECTION_ID_SHIFT).min(TOP);
    let reserved = storage
        .node_record(CONNECTION_IDS_FROM)?
        .unwrap_or(0)
        .min(TOP)
        .next_multiple_of(CONNECTION_ID_NODES);
    if let Some(last_start) = storage.node_record(LAST_START_CLOCK)? {
        if last_start > from_clock {
            tracing::warn!(
                behind_ms = (last_start - from_clock) >> CONNECTION_ID_SHIFT,
                "the clock is behind the last run's start: connection ids go on from that \
                 run's"
            );
        }
    }
    let first = from_clock.max(reserved);
    storage
        .set_node_record(LAST_START_CLOCK, from_clock)
        .await?;
    storage
        .set_node_record(CONNECTION_IDS_FROM, first + RUN_RESERVATION)
        .await?;
    Ok(first)
}

/// The `n`th connection id of node `node_id`'s run whose first id is `first`.
fn connection_id(first: u64, n: u64, node_id: NodeId) -> u64 {
    first + n * CONNECTION_ID_NODES + node_id % CONNECTION_ID_NODES
}

/// Everything a connection task needs from the node, shared by reference.
pub struct Broker {
    /// The effective configuration.
    pub config: Arc<Config>,
    /// This node's id.
    pub node_id: NodeId,
    /// Read access to the replicated state.
    pub state: StateHandle,
    /// Writes to the replicated state.
    pub proposer: Proposer,
    /// Publishes to clients connected to other nodes.
    pub forwarder: Forwarder,
    /// Authentication and ACLs.
    pub auth: crate::auth::Auth,
    /// Clients connected to this node.
    registry: DashMap<Arc<str>, ConnHandle, crate::hash::State>,
    /// Shared-subscription selection state (round-robin positions, sticky choices),
    /// in [`SELECTOR_SHARDS`] shards by group name: a group's state lives in one
    /// shard, and publishes to different groups do not meet on one lock.
    selectors: Box<[Mutex<SharedSelector<Arc<str>>>]>,
    next_connection_id: AtomicU64,
    /// The first connection id of this run: sessions owned by a lower one on this node
    /// are left from a previous run.
    first_connection_id: u64,
    /// Connections whose OpenSession is not answered yet: the state may not show them.
    establishing: Mutex<std::collections::HashSet<u64>>,
    /// Connections refused because their OpenSession was not committed in time, by
    /// connection id: should the command commit after all (a write stuck behind a
    /// network cut reaches the leader once it heals), the session it opened is closed
    /// again. Bounded by [`REFUSED_OPENS_KEPT`] and [`REFUSED_OPEN_TTL`].
    refused_opens: Mutex<HashMap<u64, Instant>>,
    /// `$SYS` counters.
    pub stats: Stats,
    /// The message rates of the last minutes, sampled from `stats`.
    rates: Mutex<rates::RateHistory>,
    /// When the node started, for `$SYS/broker/uptime`.
    pub started: Instant,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// Where idle plain-TCP connections wait without a task.
    pub lot: Arc<park::Lot>,
    /// Subscriptions in effect here while their commit is under way.
    pub provisional: Arc<provisional::Provisional>,
}

/// The broker's connection handler, which `node` hands to the listeners: each stream
/// becomes a connection task ([`connection::serve`]).
#[derive(Clone)]
pub struct Connections(pub Arc<Broker>);

impl ConnectionHandler for Connections {
    fn serve<S: ClientStream + 'static>(
        &self,
        stream: S,
        peer: SocketAddr,
        listener: &'static str,
        vouched: Vouched,
        admitted: Admitted,
    ) -> impl Future<Output = ()> + Send + 'static {
        connection::serve(self.0.clone(), stream, peer, listener, vouched, admitted)
    }
}

/// Shards of the shared-subscription selection state.
const SELECTOR_SHARDS: usize = 16;

impl Broker {
    /// A broker context over an opened state and proposer, handing out connection
    /// ids from `first_connection_id` ([`first_connection_id`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        first_connection_id: u64,
        state: StateHandle,
        proposer: Proposer,
        forwarder: Forwarder,
        auth: crate::auth::Auth,
        shutdown: CancellationToken,
        lot: Arc<park::Lot>,
    ) -> Arc<Broker> {
        let strategy: crate::router::SharedStrategy =
            config.mqtt.shared_subscription_strategy.into();
        Arc::new(Broker {
            node_id: config.node_id,
            config,
            state,
            proposer,
            forwarder,
            auth,
            registry: DashMap::default(),
            selectors: (0..SELECTOR_SHARDS)
                .map(|_| Mutex::new(SharedSelector::new(strategy)))
                .collect(),
            // Unique across restarts of this node: ids of connections from before a
            // restart must not match new ones in replicated session records.
            next_connection_id: AtomicU64::new(first_connection_id),
            first_connection_id,
            establishing: Mutex::default(),
            refused_opens: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            rates: Mutex::default(),
            started: Instant::now(),
            shutdown,
            lot,
            provisional: Arc::default(),
        })
    }

    /// A fresh connection identifier, unique in the cluster: the replicated session
    /// records compare them to tell whose session it is, so two nodes must never hand
    /// out the same one. The start of this run (ms, shifted) makes them unique across
    /// this node's restarts; counting in steps of [`CONNECTION_ID_NODES`] from the node
    /// id's residue makes them unique across nodes (ids distinct modulo 4096). Before,
    /// every node counted by one from its start time alone, and nodes started in the
    /// same millisecond (every simulation run) handed out the same ids: a connection
    /// on one node then passed for the session's new owner on another.
    pub fn next_connection_id(&self) -> u64 {
        let n = self.next_connection_id.fetch_add(1, Ordering::Relaxed) - self.first_connection_id;
        connection_id(self.first_connection_id, n, self.node_id)
    }

    /// Remember that connection `connection_id` was refused while its OpenSession was
    /// still uncertain.
    pub fn remember_refused_open(&self, connection_id: u64) {
        let mut refused = lock(&self.refused_opens);
        let now = crate::clock::now();
        refused.retain(|_, at| now.saturating_duration_since(*at) < REFUSED_OPEN_TTL);
        if refused.len() >= REFUSED_OPENS_KEPT {
            if let Some(oldest) = refused.iter().min_by_key(|(_, at)| **at).map(|(id, _)| *id) {
                refused.remove(&oldest);
            }
        }
        refused.insert(connection_id, now);
    }

    /// Note whether connection `connection_id` is between its CONNECT and the answer
    /// to its OpenSession.
    pub fn set_establishing(&self, connection_id: u64, establishing: bool) {
        let mut set = lock(&self.establishing);
        if establishing {
            set.insert(connection_id);
        } else {
            set.remove(&connection_id);
        }
    }

    /// Whether connection `connection_id` waits for its OpenSession's answer.
    pub fn is_establishing(&self, connection_id: u64) -> bool {
        lock(&self.establishing).contains(&connection_id)
    }

    /// Whether connection `connection_id` was refused (forgetting it).
    pub fn take_refused_open(&self, connection_id: u64) -> bool {
        lock(&self.refused_opens).remove(&connection_id).is_some()
    }

    /// The public MQTT address of another node for a client this node cannot serve
    /// (0x9C Use another server): the node it last knew leading, else the first other
    /// node of `mqtt.server_references`; `None` when they name no other node.
    pub fn server_reference(&self) -> Option<String> {
        let refs = self.config.server_references();
        let last = self.stats.last_leader.load(Ordering::Relaxed);
        let other = |m: &&crate::config::ClusterMember| m.id != self.node_id;
        refs.iter()
            .filter(other)
            .find(|m| m.id == last)
            .or_else(|| refs.iter().find(other))
            .map(|m| m.addr.clone())
    }

    /// Read the replicated state in a short synchronous section.
    pub fn read_state<R>(&self, f: impl FnOnce(&BrokerState) -> R) -> R {
        self.state.read(f)
    }

    /// The shard that holds shared group `group`'s selection state.
    fn selector_of(&self, group: &str) -> &Mutex<SharedSelector<Arc<str>>> {
        use std::hash::BuildHasher;
        let hash = foldhash::fast::FixedState::default().hash_one(group);
        &self.selectors[hash as usize % self.selectors.len()]
    }

    /// Register a connected client; returns the handle it replaced, if any.
    pub fn register(&self, client_id: Arc<str>, handle: ConnHandle) -> Option<ConnHandle> {
        self.registry.insert(client_id, handle)
    }

    /// Remove a client's registration if it still belongs to `connection_id`.
    pub fn unregister(&self, client_id: &str, connection_id: u64) {
        self.registry
            .remove_if(client_id, |_, h| h.connection_id == connection_id);
    }

    /// The handle of a locally connected client.
    pub fn local_client(&self, client_id: &str) -> Option<ConnHandle> {
        self.registry.get(client_id).map(|h| h.value().clone())
    }

    /// The local connection of `client_id` with the registry's own copy of the id.
    pub fn local_client_entry(&self, client_id: &str) -> Option<(Arc<str>, ConnHandle)> {
        self.registry
            .get(client_id)
            .map(|h| (h.key().clone(), h.value().clone()))
    }

    /// Every locally connected client, for shutdown and the admin API.
    pub fn local_clients(&self) -> Vec<(Arc<str>, ConnHandle)> {
        self.registry
            .iter()
            .map(|h| (h.key().clone(), h.value().clone()))
            .collect()
    }

    /// Number of clients connected to this node.
    pub fn local_client_count(&self) -> usize {
        self.registry.len()
    }

    /// The clock of a periodic task: ticks every `every` (a late tick delays the
    /// next rather than bunching them) until the node shuts down.
    pub fn ticks(&self, every: Duration) -> Ticks {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticks {
            interval,
            shutdown: self.shutdown.clone(),
        }
    }
}

/// See [`Broker::ticks`].
pub struct Ticks {
    interval: tokio::time::Interval,
    shutdown: CancellationToken,
}

impl Ticks {
    /// Wait for the next tick; `false` once the node shuts down.
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

/// Lock a std mutex, recovering the data if a holder panicked (the data stays
/// consistent: every critical section here is a single map operation).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub use crate::clock::unix_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_of_nodes_started_in_the_same_millisecond_differ() {
        let first = 1_765_000_000_000u64 << CONNECTION_ID_SHIFT;
        let ids = |node| (0..10_000).map(move |n| connection_id(first, n, node));
        let mut seen = std::collections::HashSet::new();
        for node in [1, 2, 3, 4_097] {
            for id in ids(node) {
                assert!(
                    seen.insert(id) || node == 4_097,
                    "node {node} repeats id {id}"
                );
            }
        }
        // A later run of a node starts above every id of an earlier one that made
        // fewer than 1,024 connections per millisecond of its life.
        let later = (1_765_000_000_001u64) << CONNECTION_ID_SHIFT;
        assert!(connection_id(first, 1_023, 3) < later);
        // A release that counted from `ms << 16` handed out lower ids: its sessions
        // are taken for the previous run's (orphans to close) after an upgrade.
        assert!(1_765_000_000_000u64 << 16 < first);
    }
}
