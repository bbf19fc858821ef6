//! Reacting to the state machine's events, and the node's periodic duties: closing
//! taken-over connections, publishing due wills, waking connections whose replicated
//! queue grew, proposing expiry sweeps and publishing `$SYS` topics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use super::dispatch::Reach;
use super::{unix_ms, Broker, ConnMsg};
use crate::cluster::command::{Command, Message, MessageProperties};
use crate::cluster::state::Event;
use crate::session::InboundQos2;

/// v5 reason code 0x98 Administrative action.
const ADMINISTRATIVE_ACTION: u8 = 0x98;

/// How long an orphaned session's close waits before it is tried again.
const ORPHAN_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl Broker {
    /// Handle state-machine events until the node shuts down.
    pub async fn run_events(self: Arc<Self>, mut events: UnboundedReceiver<Event>) {
        loop {
            // The sender lives in the state machine, which stops only after every
            // task of the node has: stop at shutdown rather than at the channel's end.
            let event = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                event = events.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
            };
            match event {
                Event::SessionTakenOver {
                    client_id,
                    node,
                    connection_id,
                } if node == self.node_id => {
                    self.tell_connection(&client_id, connection_id, ConnMsg::TakenOver);
                }
                Event::Kick {
                    client_id,
                    node,
                    connection_id,
                } if node == self.node_id => {
                    tracing::info!(client_id = %client_id, "closing a connection the cluster ended (an operator kick or a lost node)");
                    let msg = ConnMsg::Disconnect(ADMINISTRATIVE_ACTION);
                    self.tell_connection(&client_id, connection_id, msg);
                }
                Event::PublishWill { message, .. } => {
                    // What the will changes in the replicated state (queues, the
                    // retained message, the shared groups' choice) the state machine
                    // did; each node hands it to its own connected clean sessions,
                    // whether or not the node that made it due can reach them.
                    let outcome = self.dispatch_to(&message, Reach::Local);
                    if !outcome.blocked.is_empty() {
                        let this = self.clone();
                        tokio::spawn(async move {
                            for b in outcome.blocked {
                                b.wait(&this.stats).await;
                            }
                        });
                    }
                }
                Event::SharedDelivery {
                    client_id,
                    node,
                    message,
                    qos,
                    retain,
                    subscription_ids,
                    group,
                } if node == self.node_id => {
                    let delivery = super::Delivery {
                        message,
                        qos,
                        retain,
                        subscription_ids,
                        shared_group: Some(group),
                    };
                    if let Some(blocked) = self.deliver_to_local(&client_id, delivery) {
                        let this = self.clone();
                        tokio::spawn(async move { blocked.wait(&this.stats).await });
                    }
                }
                Event::SessionOpened {
                    client_id,
                    node,
                    connection_id,
                    created,
                } if node == self.node_id && self.take_refused_open(connection_id) => {
                    // The client was told the server is unavailable and has gone, so
                    // the session must not stay "connected" here. It is closed as after
                    // a normal DISCONNECT (the client never used it, so no will), and
                    // ended at once if the refused CONNECT is what created it.
                    tracing::warn!(client_id = %client_id, "a refused connection's session was opened late; closing it");
                    self.proposer.propose_detached(Command::CloseSession {
                        client_id,
                        connection_id,
                        graceful: true,
                        expiry_secs: created.then_some(0),
                        now_ms: unix_ms(),
                    });
                }
                Event::Restored => self.reconcile_with_state(),
                Event::QueueGrew { client_id, node } if node == self.node_id => {
                    if let Some(h) = self.local_client(&client_id) {
                        // A full channel already holds work that will pump the queue.
                        let _ = h.tx.try_send(ConnMsg::QueueGrew);
                    }
                }
                _ => {}
            }
        }
    }

    /// After a snapshot replaced the state (this node caught up that way, and the
    /// entries it covers emitted no events here): close every local connection whose
    /// session another connection owns now, or that has no session any more (v5
    /// 0x8E), and wake the others so that they send what their queues hold.
    pub fn reconcile_with_state(&self) {
        // Connections still waiting for their OpenSession are not in the state yet;
        // every other one is (its OpenSession was applied here before it was answered,
        // and a snapshot never takes a node back).
        let local: Vec<_> = self
            .local_clients()
            .into_iter()
            .filter(|(_, h)| !self.is_establishing(h.connection_id))
            .collect();
        let verdicts: Vec<(Arc<str>, u64, bool)> = self.read_state(|st| {
            local
                .iter()
                .map(|(client_id, h)| {
                    let owns = st.session(client_id).is_some_and(|s| {
                        s.connected && s.node == self.node_id && s.connection_id == h.connection_id
                    });
                    (client_id.clone(), h.connection_id, owns)
                })
                .collect()
        });
        let mut closed = 0;
        for (client_id, connection_id, owns) in verdicts {
            if owns {
                self.tell_connection(&client_id, connection_id, ConnMsg::QueueGrew);
            } else {
                closed += 1;
                self.tell_connection(&client_id, connection_id, ConnMsg::TakenOver);
            }
        }
        tracing::info!(
            closed,
            "state replaced by a snapshot; live connections reconciled"
        );
    }

    /// Send `msg` to the local connection `connection_id` of `client_id`, if it is
    /// still the one connected here.
    fn tell_connection(&self, client_id: &str, connection_id: u64, msg: ConnMsg) {
        if let Some(h) = self.local_client(client_id) {
            if h.connection_id == connection_id {
                let _ = h.tx.try_send(msg);
            }
        }
    }

    /// Propose an expiry sweep every `interval` (wills with a delay, session expiry,
    /// message expiry), and the redistribution of offline shared-group members'
    /// queues, while this node leads.
    pub async fn run_expiry(self: Arc<Self>, interval: Duration) {
        let mut ticks = self.ticks(interval);
        while ticks.next().await {
            if !self.state.is_leader() {
                continue;
            }
            let now_ms = unix_ms();
            if self.read_state(|st| st.expiry_due(now_ms)) {
                let _ = self
                    .proposer
                    .propose(Command::Expire {
                        node: self.node_id,
                        now_ms,
                    })
                    .await;
            }
            let after = self.config.mqtt.shared_redistribute_after;
            let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
            if !after.is_zero() && self.read_state(|st| st.redistribution_due(after_ms, now_ms)) {
                let _ = self
                    .proposer
                    .propose(Command::Redistribute { after_ms, now_ms })
                    .await;
            }
        }
    }

    /// Sessions this node owned before a restart have no connection any more: record
    /// their end (publishing their wills) so that clients may resume them anywhere.
    ///
    /// Only once this node has caught up (a [`Command::Barrier`] applied here): read
    /// before, the state would miss sessions opened here in entries it had not applied
    /// yet, and they would stay "connected" forever. Each step is retried until it
    /// succeeds or the node shuts down.
    pub async fn close_orphaned_sessions(self: Arc<Self>) {
        let mut retry = self.ticks(ORPHAN_RETRY);
        while let Err(e) = self.proposer.propose(Command::Barrier).await {
            tracing::info!(error = %e, "not caught up yet; orphaned sessions wait");
            if !retry.next().await {
                return;
            }
        }
        let first_of_run = self.first_connection_id;
        let orphans: Vec<(Arc<str>, u64)> = self.read_state(|st| {
            st.sessions()
                .filter(|(_, s)| {
                    s.connected && s.node == self.node_id && s.connection_id < first_of_run
                })
                .map(|(c, s)| (c.clone(), s.connection_id))
                .collect()
        });
        if !orphans.is_empty() {
            tracing::info!(
                count = orphans.len(),
                "closing sessions left open by the last run"
            );
        }
        for (client_id, connection_id) in orphans {
            loop {
                let cmd = Command::CloseSession {
                    client_id: client_id.clone(),
                    connection_id,
                    graceful: false,
                    expiry_secs: None,
                    now_ms: unix_ms(),
                };
                match self.proposer.propose(cmd).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(%client_id, error = %e, "cannot close orphaned session yet");
                        if !retry.next().await {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// The inbound QoS 2 identifiers a resumed persistent session left awaiting
    /// PUBREL, from the replicated session (so they survive restarts and moves).
    pub fn inbound_qos2_of(&self, client_id: &str, session_present: bool) -> InboundQos2 {
        let mut ids = InboundQos2::default();
        if session_present {
            self.read_state(|st| {
                if let Some(s) = st.session(client_id) {
                    for id in s.inbound_qos2.iter() {
                        ids.receive(*id);
                    }
                }
            });
        }
        ids
    }

    /// Refresh the gauges that describe state rather than count events, every
    /// `interval`: Raft's view (term, leader, indexes, members) and the replicated
    /// state's sizes (sessions online and offline, subscriptions, retained messages,
    /// queued messages, the fullest queue). Every node holds the same replicated
    /// state, so only the leader reports its sizes and the others report 0: `sum()`
    /// over the nodes is the cluster's figure, not N times it.
    pub async fn run_state_gauges(
        self: Arc<Self>,
        raft: crate::cluster::raft::Raft,
        interval: Duration,
    ) {
        let mut ticks = self.ticks(interval);
        while ticks.next().await {
            {
                let metrics = raft.metrics();
                let m = metrics.borrow();
                metrics::gauge!("flockmq_raft_term").set(m.current_term as f64);
                metrics::gauge!("flockmq_raft_leader_id")
                    .set(m.current_leader.map_or(0.0, |l| l as f64));
                metrics::gauge!("flockmq_raft_is_leader")
                    .set(f64::from(u8::from(m.current_leader == Some(m.id))));
                metrics::gauge!("flockmq_raft_last_log_index")
                    .set(m.last_log_index.unwrap_or(0) as f64);
                metrics::gauge!("flockmq_raft_applied_index")
                    .set(m.last_applied.map_or(0.0, |l| l.index as f64));
                // Entries kept in the log: those since the last purge (a snapshot covers
                // the rest).
                let first_kept = m.purged.map_or(0, |l| l.index + 1);
                metrics::gauge!("flockmq_raft_log_entries").set(
                    m.last_log_index
                        .map_or(0, |last| (last + 1).saturating_sub(first_kept))
                        as f64,
                );
                metrics::gauge!("flockmq_raft_snapshot_index")
                    .set(m.snapshot.map_or(0.0, |l| l.index as f64));
                let membership = m.membership_config.membership();
                let voters = membership.voter_ids().count();
                let nodes = membership.nodes().count();
                metrics::gauge!("flockmq_raft_members", "role" => "voter").set(voters as f64);
                metrics::gauge!("flockmq_raft_members", "role" => "learner")
                    .set(nodes.saturating_sub(voters) as f64);
                // How far each follower is behind the leader's log (the leader only
                // knows; elsewhere 0, so that a former leader's figures do not linger).
                let last = m.last_log_index.unwrap_or(0);
                let replication = m.replication.as_ref();
                for id in membership
                    .nodes()
                    .map(|(id, _)| *id)
                    .filter(|id| *id != m.id)
                {
                    let lag = replication.and_then(|r| r.get(&id)).map_or(0, |matched| {
                        last.saturating_sub(matched.as_ref().map_or(0, |l| l.index))
                    });
                    metrics::gauge!("flockmq_raft_replication_lag_entries", "peer" => id.to_string())
                        .set(lag as f64);
                }
            }
            metrics::gauge!("flockmq_storage_disk_bytes")
                .set(dir_size(&self.config.data_dir) as f64);
            let sizes = if self.state.is_leader() {
                let limits = (
                    self.config.mqtt.max_queued_messages,
                    self.config.mqtt.max_queued_bytes,
                );
                self.read_state(|st| StateSizes::of(st, limits))
            } else {
                StateSizes::default()
            };
            metrics::gauge!("flockmq_sessions", "state" => "online").set(sizes.online as f64);
            metrics::gauge!("flockmq_sessions", "state" => "offline").set(sizes.offline as f64);
            metrics::gauge!("flockmq_subscriptions").set(sizes.subscriptions as f64);
            metrics::gauge!("flockmq_retained_messages").set(sizes.retained as f64);
            metrics::gauge!("flockmq_queued_messages").set(sizes.queued as f64);
            metrics::gauge!("flockmq_queue_fill_ratio").set(sizes.fullest);
            metrics::gauge!("flockmq_inflight_messages")
                .set(self.stats.messages_inflight.load(Ordering::Relaxed) as f64);
        }
    }

    /// Count the changes of leader this node sees (`flockmq_raft_leader_changes_total`):
    /// every change of the leader it knows, a leader lost included, as Raft's metrics
    /// report them, until shutdown; and remember the last leader known
    /// ([`Broker::server_reference`]).
    pub async fn run_leader_watch(self: Arc<Self>, raft: crate::cluster::raft::Raft) {
        let changes = metrics::counter!("flockmq_raft_leader_changes_total");
        let mut watch = raft.metrics();
        // From none known: the first leader this process learns of counts too.
        let mut leader = None;
        loop {
            let now = watch.borrow_and_update().current_leader;
            if now != leader {
                changes.increment(1);
                leader = now;
            }
            if let Some(l) = now {
                self.stats.last_leader.store(l, Ordering::Relaxed);
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                changed = watch.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Publish the `$SYS/broker/...` topics every `interval` (QoS 0, live to current
    /// subscribers, not retained).
    pub async fn run_sys(self: Arc<Self>, interval: Duration) {
        let mut ticks = self.ticks(interval);
        while ticks.next().await {
            let (subscriptions, retained, sessions, offline, queued) = self.read_state(|st| {
                let (mut offline, mut queued) = (0usize, 0usize);
                for (_, session) in st.sessions() {
                    offline += usize::from(!session.connected);
                    queued += session.queue.len();
                }
                (
                    st.routes().len(),
                    st.retained().len(),
                    st.sessions().count(),
                    offline,
                    queued,
                )
            });
            let s = &self.stats;
            let base = "$SYS/broker";
            let values = [
                ("version", format!("flockmq {}", env!("CARGO_PKG_VERSION"))),
                (
                    "uptime",
                    format!("{} seconds", self.started.elapsed().as_secs()),
                ),
                (
                    "clients/connected",
                    s.clients_connected.load(Ordering::Relaxed).to_string(),
                ),
                ("clients/total", sessions.to_string()),
                ("clients/disconnected", offline.to_string()),
                (
                    "messages/received",
                    s.messages_received.load(Ordering::Relaxed).to_string(),
                ),
                (
                    "messages/sent",
                    s.messages_sent.load(Ordering::Relaxed).to_string(),
                ),
                (
                    "messages/dropped",
                    s.messages_dropped.load(Ordering::Relaxed).to_string(),
                ),
                // Mosquitto's name for the same count.
                (
                    "publish/messages/dropped",
                    s.messages_dropped.load(Ordering::Relaxed).to_string(),
                ),
                ("messages/stored", queued.to_string()),
                ("store/messages/count", queued.to_string()),
                (
                    "bytes/received",
                    s.bytes_received.load(Ordering::Relaxed).to_string(),
                ),
                (
                    "bytes/sent",
                    s.bytes_sent.load(Ordering::Relaxed).to_string(),
                ),
                ("subscriptions/count", subscriptions.to_string()),
                ("retained messages/count", retained.to_string()),
            ];
            for (name, value) in values {
                let message = Arc::new(Message {
                    topic: Arc::from(format!("{base}/{name}")),
                    payload: value.into(),
                    qos: 0,
                    retain: false,
                    properties: MessageProperties::default(),
                    received_at_ms: unix_ms(),
                    origin_client: None,
                });
                // $SYS is not retained through Raft (it is per node and frequent):
                // current subscribers get it live, and a full subscriber misses it.
                let outcome = self.dispatch(&message);
                if !outcome.blocked.is_empty() {
                    let n = outcome.blocked.len() as u64;
                    super::Stats::add(&self.stats.messages_dropped, n);
                    metrics::counter!("flockmq_messages_dropped_total", "reason" => "queue_full")
                        .increment(n);
                }
            }
        }
    }
}

/// The replicated state's sizes, for the gauges (see [`Broker::run_state_gauges`]).
#[derive(Debug, Default)]
struct StateSizes {
    online: usize,
    offline: usize,
    subscriptions: usize,
    retained: usize,
    queued: usize,
    /// The fullest persistent session's queue, as a fraction of its limit (messages
    /// or bytes, whichever is nearer).
    fullest: f64,
}

impl StateSizes {
    /// Measure `st` against the queue limits (messages, bytes).
    fn of(
        st: &crate::cluster::state::BrokerState,
        (max_messages, max_bytes): (usize, u64),
    ) -> Self {
        let mut sizes = StateSizes {
            subscriptions: st.routes().len(),
            retained: st.retained().len(),
            ..StateSizes::default()
        };
        for (_, s) in st.sessions() {
            if s.connected {
                sizes.online += 1;
            } else {
                sizes.offline += 1;
            }
            sizes.queued += s.queue.len();
            let fill = (s.queue.len() as f64 / max_messages.max(1) as f64)
                .max(s.queued_bytes as f64 / max_bytes.max(1) as f64);
            sizes.fullest = sizes.fullest.max(fill);
        }
        sizes
    }
}

/// The bytes of the files under `dir` (the node's data directory: the Raft log,
/// snapshots and the parts of the state kept on disk); 0 where unreadable.
fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
