//! The control plane: the replicated [`Command`](command::Command)s, the state
//! machine that applies them, Raft (openraft) with its gRPC transport, and the
//! batching proposer in front of it.
//!
//! A single node is a one-voter Raft cluster on this same path. Architecture
//! invariant: apply is deterministic (no clock, no randomness: both travel inside the
//! commands), so every node applying the same log holds the same state.

pub mod certs;
pub mod command;
pub mod compat;
pub mod format;
pub mod forward;
pub mod frame;
pub mod membership;
pub mod network;
pub mod proposer;
pub mod raft;
pub mod sparse;
pub mod state;
#[cfg(test)]
mod state_tests;
pub mod stats;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::{BasicNode, LogId};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use self::command::{NodeId, Request, Response};
use self::network::{AdminService, Network, RaftService};
use self::proposer::{BatchSettings, Proposer};
use self::raft::{Raft, TypeConfig};
use self::state::{BrokerState, Event};
use crate::config::Config;

/// Records hashed per step of [`StateHandle::digest`].
const DIGEST_STEP: usize = 1024;
/// Walks [`StateHandle::digest`] starts before it gives up on a changing state.
const DIGEST_ATTEMPTS: usize = 8;

/// The broker's state as `storage` sees it: apply a batch, snapshot, restore.
pub struct BrokerMachine {
    /// The state.
    pub state: BrokerState,
    /// Entries up to this index were applied by this node's previous process: their
    /// events (wills, takeovers, kicks) happened then and are not repeated.
    replayed_up_to: u64,
}

impl BrokerMachine {
    /// A machine holding `state`.
    pub fn new(state: BrokerState) -> Self {
        BrokerMachine {
            state,
            replayed_up_to: 0,
        }
    }
}

impl storage::Machine<TypeConfig> for BrokerMachine {
    type Error = state::RestoreError;

    fn apply(&mut self, log_id: &LogId<NodeId>, request: &Request) -> Response {
        let replayed = log_id.index <= self.replayed_up_to;
        self.state.set_muted(replayed);
        let response = Response {
            results: self.state.apply_request(request),
            log_index: 0,
        };
        self.state.set_muted(false);
        response
    }

    #[cfg(debug_assertions)]
    fn apply_delay(request: &Request) -> Option<Duration> {
        test_hooks::apply_delay(request)
    }

    fn recovering(&mut self, committed: Option<&LogId<NodeId>>) {
        self.replayed_up_to = committed.map_or(0, |c| c.index);
        if self.replayed_up_to > 0 {
            tracing::info!(
                up_to = self.replayed_up_to,
                "re-applying the committed log without repeating its events"
            );
        }
    }

    fn snapshot(&self, out: &mut dyn std::io::Write) -> Result<(), Self::Error> {
        self.state.write_snapshot(out)
    }

    fn restore(&mut self, input: &mut dyn std::io::Read, len: u64) -> Result<(), Self::Error> {
        self.state.restore_from(input, len)
    }
}

/// Fault hooks for tests, compiled into debug builds only (the tests run those) and
/// idle unless their environment variable is set.
#[cfg(debug_assertions)]
mod test_hooks {
    use std::sync::LazyLock;
    use std::time::Duration;

    use super::command::{Command, Request};

    /// `TEST_FLOCKMQ_DELAY_ENQUEUE_APPLY_MS`: this node holds back every batch of
    /// entries holding an `Enqueue` that long before applying it, its state readable
    /// meanwhile (a follower lagging at the worst moment).
    static DELAY_ENQUEUE: LazyLock<Option<Duration>> = LazyLock::new(|| {
        std::env::var("TEST_FLOCKMQ_DELAY_ENQUEUE_APPLY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    });

    pub(super) fn apply_delay(request: &Request) -> Option<Duration> {
        let delay = (*DELAY_ENQUEUE)?;
        request
            .commands
            .iter()
            .any(|c| matches!(c, Command::Enqueue { .. } | Command::EnqueueMatching { .. }))
            .then_some(delay)
    }
}

/// Read access to the applied replicated state and to Raft's view of the cluster.
#[derive(Clone)]
pub struct StateHandle {
    machine: storage::MachineHandle<TypeConfig, BrokerMachine>,
    metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, BasicNode>>,
    node_id: NodeId,
    /// The newest entry format every member reads.
    formats: compat::Formats,
    /// The last digest computed and the applied index it is of: asked again at the
    /// same index (status polls), it is not computed again.
    digest_cache: Arc<std::sync::Mutex<Option<(u64, u64)>>>,
}

impl StateHandle {
    /// Run `f` on the applied state in a short synchronous section.
    ///
    /// A poisoned lock (an apply that panicked) is a broken node: it panics too,
    /// rather than serve state that may be half applied.
    pub fn read<R>(&self, f: impl FnOnce(&BrokerState) -> R) -> R {
        match self.machine.read(|m| f(&m.state)) {
            Ok(r) => r,
            Err(e) => panic!("replicated state unreadable: {e}"),
        }
    }

    /// Whether this node is the Raft leader now.
    pub fn is_leader(&self) -> bool {
        self.metrics.borrow().current_leader == Some(self.node_id)
    }

    /// Whether every member of the cluster reads entries of `format` (a node writes
    /// none it has not checked this for: a rolling upgrade, see `compat`).
    pub fn all_read(&self, format: u16) -> bool {
        self.formats.all_read(format)
    }

    /// The newest entry format every member reads, as far as this node knows.
    pub fn readable_format(&self) -> u16 {
        self.formats.readable()
    }

    /// Whether any leader is known.
    pub fn has_leader(&self) -> bool {
        self.metrics.borrow().current_leader.is_some()
    }

    /// Why Raft stopped on this node, if it did (a storage failure, a bug): the
    /// node can then neither commit nor apply anything until it restarts.
    pub fn fatal(&self) -> Option<String> {
        self.metrics
            .borrow()
            .running_state
            .as_ref()
            .err()
            .map(|e| e.to_string())
    }

    /// Raft's view of the cluster, to find peers' addresses.
    pub fn raft_metrics(
        &self,
    ) -> tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, BasicNode>> {
        self.metrics.clone()
    }

    /// The state's digest and the log index it reflects, read together; `None` when
    /// the state kept changing under every attempt. The whole state streams through a
    /// hash (no copy is made) in steps of [`DIGEST_STEP`] records, each under the
    /// state's read lock and released in between, so that applying entries never
    /// waits for more than one step: call it off the async runtime
    /// (`spawn_blocking`). A step that finds the applied index moved starts the walk
    /// again. A digest of an index already digested is answered from a cache.
    pub fn digest(&self) -> Option<(u64, u64)> {
        let cached = *self.digest_cache.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..DIGEST_ATTEMPTS {
            let mut walk = state::DigestWalk::default();
            let mut at: Option<u64> = None;
            let done = loop {
                let step = self.machine.read_at(|m, applied| {
                    let index = applied.map(|l| l.index).unwrap_or(0);
                    if *at.get_or_insert(index) != index {
                        return Err(());
                    }
                    match cached {
                        Some((i, digest)) if i == index => Ok(Some(digest)),
                        _ => Ok(m.state.digest_step(&mut walk, DIGEST_STEP)),
                    }
                });
                match step {
                    Ok(Ok(Some(digest))) => break at.map(|index| (index, digest)),
                    Ok(Ok(None)) => continue,
                    Ok(Err(())) => break None,
                    Err(e) => panic!("replicated state unreadable: {e}"),
                }
            };
            if let Some(r) = done {
                *self.digest_cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                return Some(r);
            }
        }
        None
    }

    /// How many committed log entries this node has not applied yet, when known.
    pub fn apply_lag(&self) -> Option<u64> {
        let m = self.metrics.borrow();
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        m.last_log_index.map(|last| last.saturating_sub(applied))
    }
}

/// The control plane of a started node.
pub struct Cluster {
    /// The Raft handle.
    pub raft: Raft,
    /// Read access to the state.
    pub state: StateHandle,
    /// The batching writer.
    pub proposer: Proposer,
    /// The log store, kept to flush storage at shutdown.
    pub storage: storage::LogStore<TypeConfig>,
    /// Where forwarded publishes are delivered, once the broker runtime is set in it.
    pub forward_sink: forward::SinkSlot,
    /// When each peer last answered this node's Raft appends.
    pub contacts: network::PeerContacts,
    /// Where this node's figures come from, once the broker runtime is set in it.
    pub stats: stats::StatsSlot,
    /// The cluster's TLS material, to reload on SIGHUP; `None` in plain text.
    pub tls: Option<Arc<tls::ClusterTls>>,
}

/// How long the leader waits for the answer to one chunk of a snapshot it sends. The
/// last chunk is answered once the follower has restored the whole state from it:
/// openraft's 200 ms timed out on every sizeable state (45 times for one 250 MB
/// snapshot, 10 M queued deliveries), and each timeout sent the snapshot again from
/// its start. A follower that died meanwhile is noticed sooner anyway: its
/// connection's HTTP/2 pings go unanswered within 10 s (see `network::alive`).
const INSTALL_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

impl Cluster {
    /// Open storage, start Raft and its gRPC server, form or join the cluster, and
    /// wait until a leader is known.
    pub async fn start(
        config: &Config,
        events: UnboundedSender<Event>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Cluster> {
        let c = &config.cluster;
        let raft_config = openraft::Config {
            cluster_name: "flockmq".into(),
            heartbeat_interval: c.heartbeat_interval.as_millis() as u64,
            election_timeout_min: c.election_timeout_min.as_millis() as u64,
            election_timeout_max: c.election_timeout_max.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(c.snapshot_after_logs),
            // Entries kept behind a snapshot for followers that lag a little: at most
            // as many as between snapshots (a small snapshot interval, as in tests,
            // makes lagging followers catch up by snapshot sooner).
            max_in_snapshot_log_to_keep: c.snapshot_after_logs.min(1000),
            install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT.as_millis() as u64,
            ..Default::default()
        }
        .validate()
        .context("invalid raft timing settings")?;

        // Before Raft dials anyone: every peer connection must take the TLS side.
        let cluster_tls = tls::install(&config.cluster).context("cannot set up cluster TLS")?;
        let path = config.data_dir.join("raft");
        let machine = BrokerMachine::new(BrokerState::new(Some(events)));
        let (log_store, sm_store) = storage::io::blocking(move || {
            storage::open::<TypeConfig, BrokerMachine>(&path, machine).map_err(Box::new)
        })
        .await
        .context("storage open task failed")?
        .context("cannot open storage")?;
        let storage = log_store.clone();
        let machine = sm_store.machine();

        let network = Network::default();
        let contacts = network.contacts.clone();
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network,
            log_store,
            sm_store,
        )
        .await
        .context("cannot start raft")?;

        // Forward streams carry every cross-node message: HTTP/2's default 64 KiB
        // window would let only a couple of frames travel before the sender waits a
        // round trip for WINDOW_UPDATE.
        let mut server = tonic::transport::Server::builder()
            .initial_stream_window_size(Some(network::forward::STREAM_WINDOW))
            .initial_connection_window_size(Some(network::forward::CONNECTION_WINDOW));
        let listener = crate::net::bind(config.cluster_addr)
            .await
            .context("cannot open the cluster port")?;
        let incoming = tls::incoming(listener, cluster_tls.clone());
        let votes = network::Votes::default();
        let fresh_disk = !raft.is_initialized().await?;
        if fresh_disk && config.join.is_none() && config.initial_cluster.len() > 1 {
            // Until the peers say whether the cluster already holds entries.
            votes.withhold(true);
        }
        let service = RaftService::server(raft.clone(), votes.clone());
        let stats = stats::StatsSlot::default();
        let admin = AdminService::server(raft.clone(), stats.clone());
        let forward_sink = forward::SinkSlot::default();
        let forwarding = network::forward::ForwardService::server(
            forward::Inbound::new(forward_sink.clone()),
            forward::WINDOW,
        );
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let served = server
                .add_service(service)
                .add_service(admin)
                .add_service(forwarding)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "cluster gRPC server failed");
            }
        });

        let advertise = config.advertise_addr();
        if fresh_disk {
            let mut members = BTreeMap::new();
            if config.initial_cluster.is_empty() {
                members.insert(config.node_id, BasicNode::new(advertise.clone()));
            } else {
                for m in &config.initial_cluster {
                    members.insert(m.id, BasicNode::new(m.addr.clone()));
                }
            }
            // A node listed in the initial cluster that starts with an empty disk
            // asks its peers first: if the cluster already holds committed entries
            // (its disk was wiped, or it comes late), it must not initialize, and
            // must not vote until it has caught up.
            let peers: Vec<String> = config
                .initial_cluster
                .iter()
                .filter(|m| m.id != config.node_id)
                .map(|m| m.addr.clone())
                .collect();
            let start = if config.join.is_none() && !peers.is_empty() {
                membership::probe_empty_start(&peers, config.initial_cluster.len(), &shutdown).await
            } else {
                membership::EmptyStart::Fresh
            };
            if let membership::EmptyStart::Behind(index) = start {
                tracing::warn!(
                    committed = index,
                    "started with an empty disk in a cluster that holds committed entries: \
                     catching up before voting"
                );
                let raft = raft.clone();
                let votes = votes.clone();
                tokio::spawn(async move {
                    let caught_up = raft
                        .wait(None)
                        .applied_index_at_least(Some(index), "catching up after an empty start")
                        .await;
                    if caught_up.is_ok() {
                        tracing::info!(applied = index, "caught up: voting again");
                        votes.withhold(false);
                    }
                });
            } else {
                votes.withhold(false);
            }
            // Only the lowest id of a fresh cluster initializes it: no node ever
            // initializes twice, and the others learn the membership from it. A
            // joining node is added by the cluster it asks.
            if let Some(seed) = &config.join {
                tokio::spawn(membership::join_through(
                    seed.clone(),
                    membership::Myself {
                        id: config.node_id,
                        addr: advertise.clone(),
                    },
                    shutdown.clone(),
                ));
            } else if start == membership::EmptyStart::Fresh
                && members.keys().next() == Some(&config.node_id)
            {
                tracing::info!(voters = ?members.keys().collect::<Vec<_>>(), "initializing a new cluster");
                if let Err(e) = raft.initialize(members).await {
                    tracing::info!(error = %e, "cluster already initialized");
                }
            }
        }

        // Membership that follows the deployment: a node the leader removed while it
        // was away asks to be added back (the leader removes, `broker/liveness.rs`).
        if !c.autoclean_after.is_zero() {
            let seeds: Vec<String> = config
                .join
                .iter()
                .cloned()
                .chain(config.initial_cluster.iter().map(|m| m.addr.clone()))
                .collect();
            tokio::spawn(membership::stay_member(
                raft.clone(),
                seeds,
                membership::Myself {
                    id: config.node_id,
                    addr: advertise.clone(),
                },
                shutdown.clone(),
            ));
        }

        let mut metrics = raft.metrics();
        let wait = async {
            loop {
                if metrics.borrow().current_leader.is_some() {
                    break;
                }
                if metrics.changed().await.is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .is_err()
        {
            tracing::warn!(
                "no raft leader after 30s; continuing, writes will fail until one is elected"
            );
        }

        let proposer = Proposer::spawn(
            raft.clone(),
            BatchSettings {
                max_commands: c.batch_max_commands,
                max_bytes: proposer::MAX_BATCH_BYTES,
                max_delay: c.batch_max_delay,
                write_timeout: c.write_timeout,
                max_in_flight: 16,
                node_id: config.node_id,
                // A new value per run of the process: the state machine starts this
                // proposer's sequence afresh.
                incarnation: crate::clock::unix_ms(),
            },
            shutdown.clone(),
        );
        let formats = compat::Formats::default();
        tokio::spawn(compat::watch(
            raft.clone(),
            config.node_id,
            formats.clone(),
            shutdown,
        ));
        let state = StateHandle {
            formats,
            digest_cache: Arc::default(),
            machine,
            metrics: raft.metrics(),
            node_id: config.node_id,
        };
        Ok(Cluster {
            raft,
            state,
            proposer,
            storage,
            forward_sink,
            contacts,
            stats,
            tls: cluster_tls,
        })
    }
}

/// Flush and close storage at shutdown.
pub async fn close_storage(storage: storage::LogStore<TypeConfig>) {
    if let Err(e) = storage.flush().await {
        tracing::warn!(error = %e, "storage flush at shutdown failed");
    }
}
