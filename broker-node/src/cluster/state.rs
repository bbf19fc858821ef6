//! The replicated state machine: the session registry, every session's subscriptions
//! (and the route table derived from them), retained messages and the queues of
//! persistent sessions.
//!
//! [`BrokerState::apply_command`] is a pure function of (state, command): it reads no
//! clock and draws no random number, so every node applying the same log holds the same
//! state (DESIGN invariant 3); [`BrokerState::digest`] lets tests compare nodes. What
//! the local node must do about a change (close a taken-over connection, publish a will,
//! deliver from a queue) is reported as an [`Event`] on a channel, outside apply's
//! result, and acted upon by the node.
//!
//! The state is held by `storage`'s state-machine store behind a lock; the broker reads
//! it through short synchronous sections and never across an `.await`. Its snapshots
//! (each queued message once, however many queues hold it) are written and read by
//! the `snapshot` module.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use super::command::{
    Appends, Command, CommandResult, EnqueueEntry, InboundRecord, Message, NodeId, QueueFullPolicy,
    QueueLimits, QueuedMessage, Request, SubscriptionOptions, Will, ANY_CONNECTION,
};
use super::format;
use super::sparse::Sparse;
use crate::mqtt::topic::topic_matches;
use crate::router::{RetainedIndex, SubscriptionTrie};

mod snapshot;

/// Something the local node should react to, emitted while applying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The connection `connection_id` of `client_id` on `node` lost its session to a
    /// newer connection and must be closed (v5 reason 0x8E).
    SessionTakenOver {
        /// The client identifier.
        client_id: Arc<str>,
        /// The node holding the old connection.
        node: NodeId,
        /// The old connection.
        connection_id: u64,
    },
    /// A will is due: `publisher` publishes it.
    PublishWill {
        /// The node that publishes it (the proposer of the command that made it due).
        publisher: NodeId,
        /// The will message.
        message: Arc<Message>,
    },
    /// A session owned by `node` has new queued messages.
    QueueGrew {
        /// The client identifier.
        client_id: Arc<str>,
        /// The owning node.
        node: NodeId,
    },
    /// An operator asked for this connection of `client_id` on `node` to be closed.
    Kick {
        /// The client identifier.
        client_id: Arc<str>,
        /// The node holding the connection.
        node: NodeId,
        /// The connection.
        connection_id: u64,
    },
    /// The connection `connection_id` of `client_id` on `node` opened its session.
    SessionOpened {
        /// The client identifier.
        client_id: Arc<str>,
        /// The node the connection is on.
        node: NodeId,
        /// The connection.
        connection_id: u64,
        /// Whether the session is new (none to resume).
        created: bool,
    },
    /// A session ended (expired or replaced by a clean start).
    SessionEnded {
        /// The client identifier.
        client_id: Arc<str>,
    },
    /// The whole state was replaced by a snapshot: what happened in the entries it
    /// covers emitted no events here, so the node reconciles its live connections
    /// with the state (closes the superseded, feeds the queues).
    Restored,
    /// A message (a due will, or one redistributed from an offline member's queue) goes
    /// to `client_id`, connected on `node` and taking it live (a clean session, or QoS
    /// 0), as its shared group's member chosen by the state machine.
    SharedDelivery {
        /// The chosen member.
        client_id: Arc<str>,
        /// The node it is connected to, which hands the message over.
        node: NodeId,
        /// The message.
        message: Arc<Message>,
        /// Delivery QoS.
        qos: u8,
        /// Delivery RETAIN flag.
        retain: bool,
        /// The member's subscription identifier, if any.
        subscription_ids: Vec<u32>,
        /// The shared group.
        group: Arc<str>,
    },
}

/// FNV-1a, fed through `io::Write`: a hash that is the same on every node and in
/// every process (the digest streams the state through it).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::io::Write for Fnv {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// FNV-1a of `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = Fnv::new();
    let _ = std::io::Write::write_all(&mut hash, bytes);
    hash.0
}

/// One of `n` (> 0) chosen by `key`, the same on every node. From the hash's high bits:
/// FNV-1a's low bits are poor (modulo 4, keys that differ in two equal digits all fall
/// on one index).
fn pick(key: &str, n: usize) -> usize {
    ((u128::from(fnv1a(key.as_bytes())) * n as u128) >> 64) as usize
}

/// One session as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The node the client is (or was last) connected to.
    pub node: NodeId,
    /// The connection that owns the session now.
    pub connection_id: u64,
    /// Protocol level of the last connection.
    pub protocol: u8,
    /// Expiry after disconnect, in seconds (`u32::MAX`: never).
    pub expiry_secs: u32,
    /// Whether a connection currently holds the session.
    pub connected: bool,
    /// Unix ms of the disconnect, while disconnected.
    pub disconnected_at_ms: Option<u64>,
    /// The will: pending while connected, or delayed after an unclean end. Boxed: most
    /// sessions have none, and every record sits in the session map by value.
    pub will: Option<Box<Will>>,
    /// Unix ms at which a delayed will becomes due (set at an unclean disconnect).
    pub will_due_at_ms: Option<u64>,
    /// Subscriptions by filter exactly as subscribed.
    pub subscriptions: Sparse<BTreeMap<String, SubscriptionOptions>>,
    /// QoS 1/2 messages not yet acknowledged, in `seq` order. (The three collections
    /// are [`Sparse`]: empty in most records, they cost a pointer each there.)
    pub queue: Sparse<VecDeque<QueuedMessage>>,
    /// QoS 2 messages whose PUBREC arrived: PUBREL is due, then PUBCOMP ends them.
    pub awaiting_pubcomp: Sparse<BTreeSet<u64>>,
    /// Inbound QoS 2 packet identifiers awaiting the client's PUBREL.
    #[serde(default)]
    pub inbound_qos2: Sparse<BTreeSet<u16>>,
    /// The next queue position.
    pub next_seq: u64,
    /// Bytes held by `queue`, for the byte limit.
    pub queued_bytes: u64,
}

impl SessionRecord {
    /// Whether the session outlives its connection.
    pub fn is_persistent(&self) -> bool {
        self.expiry_secs > 0
    }

    /// The packet identifier a queued message is sent with: derived from its position
    /// so that a resend after reconnect, on any node, uses the same identifier.
    pub fn packet_id_for(seq: u64) -> u16 {
        // 1..=65535; the sender keeps fewer than 65535 messages in flight.
        (seq % 65_535) as u16 + 1
    }
}

/// A retained message and where it stands.
pub type RetainedMessage = Arc<Message>;

/// The key of a subscriber in the route table.
pub type ClientKey = Arc<str>;

/// The whole replicated state.
#[derive(Default)]
pub struct BrokerState {
    /// Boxed: a map node then holds 11 pointers, not 11 records, and most of it is
    /// not slack (about 70 bytes a session less).
    sessions: BTreeMap<Arc<str>, Box<SessionRecord>>,
    retained: RetainedIndex<RetainedMessage>,
    /// Derived from `sessions`: filter → subscribers, for matching publishes.
    routes: SubscriptionTrie<ClientKey, SubscriptionOptions>,
    /// What each node's proposer had applied last (DESIGN invariant 7).
    proposers: BTreeMap<NodeId, ProposerRecord>,
    /// The queue limits of the last `Enqueue` applied: a will that becomes due is
    /// queued under them.
    queue_limits: QueueLimits,
    /// Derived from `sessions`: the sum of their `queued_bytes`, for the node's cap
    /// (`mqtt.max_node_queued_bytes`) without a walk of every session.
    queued_total: u64,
    events: Option<UnboundedSender<Event>>,
    /// While set, applying emits no events (see [`BrokerState::set_muted`]).
    muted: bool,
}

/// The commands of one proposer incarnation applied last, so that a resend of them
/// changes nothing and gets the first results back (the Raft dissertation's client
/// sessions, §6.3). A proposer sends one batch at a time, so only the last batch can
/// come again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposerRecord {
    /// The incarnation the record is about; another one starts afresh.
    pub incarnation: u64,
    /// The highest sequence number applied.
    pub applied: u64,
    /// The results of the last batch, by sequence number.
    pub last: Vec<(u64, CommandResult)>,
}

/// A [`BrokerState::digest`] under way in steps ([`BrokerState::digest_step`]).
pub struct DigestWalk {
    hash: Fnv,
    stage: WalkStage,
}

impl Default for DigestWalk {
    fn default() -> Self {
        DigestWalk {
            hash: Fnv::new(),
            stage: WalkStage::Start,
        }
    }
}

/// Where a [`DigestWalk`] is: the canonical encoding's parts, in order.
enum WalkStage {
    Start,
    /// Sessions after this client id (all, from the first, with `None`).
    Sessions(Option<Arc<str>>),
    /// Retained messages: every topic, sorted, and the next one to hash.
    Retained(Vec<String>, usize),
}

/// One message a [`Command::Redistribute`] moves from an offline shared-group member's
/// queue to another member.
struct Move {
    from: Arc<str>,
    seq: u64,
    to: Arc<str>,
    group: Arc<str>,
    options: SubscriptionOptions,
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The bytes do not decode.
    #[error("cannot decode broker state snapshot: {0}")]
    Decode(#[from] bincode::Error),
    /// The snapshot could not be written out (its file refused the bytes).
    #[error("cannot write broker state snapshot: {0}")]
    Write(bincode::Error),
    /// A format this release does not know.
    #[error(
        "broker state snapshot of format {0}: this release reads formats 1 to {max}; \
         upgrade this node to the release that wrote it",
        max = format::SNAPSHOT_FORMAT
    )]
    Format(u16),
    /// A queue or a retained message names a message the snapshot does not hold.
    #[error("broker state snapshot names message {index} of {count}")]
    MessageIndex {
        /// The index named.
        index: u32,
        /// How many messages the snapshot holds.
        count: usize,
    },
}

impl BrokerState {
    /// An empty state that reports events on `events`.
    pub fn new(events: Option<UnboundedSender<Event>>) -> Self {
        BrokerState {
            events,
            ..Default::default()
        }
    }

    /// Holds back events while `muted`: used when re-applying, after a restart, entries
    /// whose events the previous process already acted on.
    pub fn set_muted(&mut self, muted: bool) {
        self.muted = muted;
    }

    fn emit(&self, event: Event) {
        if self.muted {
            return;
        }
        if let Some(tx) = &self.events {
            // The receiver only goes away at shutdown; events then no longer matter.
            let _ = tx.send(event);
        }
    }

    /// The session of `client_id`, if any.
    pub fn session(&self, client_id: &str) -> Option<&SessionRecord> {
        self.sessions.get(client_id).map(|s| &**s)
    }

    /// All sessions, in client-id order.
    pub fn sessions(&self) -> impl Iterator<Item = (&Arc<str>, &SessionRecord)> {
        self.sessions.iter().map(|(c, s)| (c, &**s))
    }

    /// How many sessions there are.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The bytes every persistent queue holds, as each queue counts them (a message
    /// queued for two sessions counts twice, though it is stored once).
    pub fn queued_bytes_total(&self) -> u64 {
        self.queued_total
    }

    /// The route table.
    pub fn routes(&self) -> &SubscriptionTrie<ClientKey, SubscriptionOptions> {
        &self.routes
    }

    /// The retained messages.
    pub fn retained(&self) -> &RetainedIndex<RetainedMessage> {
        &self.retained
    }

    /// Apply one Raft entry's batch; a command its proposer had applied before (a
    /// resend after a lost answer) changes nothing and gets its first result again.
    pub fn apply_request(&mut self, request: &Request) -> Vec<CommandResult> {
        let Some(origin) = request.origin else {
            return request
                .commands
                .iter()
                .map(|c| self.apply_command(c))
                .collect();
        };
        let mut record = self.proposers.remove(&origin.node).unwrap_or_default();
        if record.incarnation != origin.incarnation {
            record = ProposerRecord {
                incarnation: origin.incarnation,
                ..ProposerRecord::default()
            };
        }
        let mut results = Vec::with_capacity(request.commands.len());
        let mut last = Vec::with_capacity(request.commands.len());
        for (cmd, &seq) in request.commands.iter().zip(&request.seqs) {
            let result = if seq <= record.applied {
                record
                    .last
                    .iter()
                    .find(|(s, _)| *s == seq)
                    .map(|(_, r)| r.clone())
                    .unwrap_or(CommandResult::Duplicate)
            } else {
                self.apply_command(cmd)
            };
            last.push((seq, result.clone()));
            results.push(result);
        }
        let newest = request.seqs.iter().copied().max().unwrap_or(0);
        if newest > record.applied {
            // A batch with new commands becomes the last one; a resend of an older
            // batch leaves the last batch's results as they are.
            record.applied = newest;
            record.last = last;
        }
        self.proposers.insert(origin.node, record);
        results
    }

    /// The proposers' records, by node.
    pub fn proposers(&self) -> &BTreeMap<NodeId, ProposerRecord> {
        &self.proposers
    }

    /// Whether connection `connection_id` owns `client_id`'s session now (a command of
    /// format 1, with [`ANY_CONNECTION`], acts on whoever owns it).
    fn owned_by(&self, client_id: &str, connection_id: u64) -> bool {
        self.sessions
            .get(client_id)
            .is_some_and(|s| connection_id == ANY_CONNECTION || s.connection_id == connection_id)
    }

    /// Apply one command. Deterministic: the same state and command give the same
    /// state, result and events on every node.
    pub fn apply_command(&mut self, cmd: &Command) -> CommandResult {
        match cmd {
            Command::Kick { client_id } => match self.sessions.get(client_id) {
                Some(s) if s.connected => {
                    self.emit(Event::Kick {
                        client_id: client_id.clone(),
                        node: s.node,
                        connection_id: s.connection_id,
                    });
                    CommandResult::Done
                }
                _ => CommandResult::NoSession,
            },
            Command::OpenSession {
                client_id,
                node,
                connection_id,
                protocol,
                clean_start,
                expiry_secs,
                will,
                now_ms,
            } => self.open_session(
                client_id,
                *node,
                *connection_id,
                *protocol,
                *clean_start,
                *expiry_secs,
                will.clone(),
                *now_ms,
            ),
            Command::CloseSession {
                client_id,
                connection_id,
                graceful,
                expiry_secs,
                now_ms,
            } => self.close_session(
                client_id,
                *connection_id,
                *graceful,
                *expiry_secs,
                *now_ms,
                None,
            ),
            Command::Subscribe {
                client_id,
                connection_id,
                entries,
            } => match self.owned_by(client_id, *connection_id) {
                true => self.subscribe(client_id, entries),
                false => CommandResult::NoSession,
            },
            Command::Unsubscribe {
                client_id,
                connection_id,
                filters,
            } => match self.owned_by(client_id, *connection_id) {
                true => self.unsubscribe(client_id, filters),
                false => CommandResult::NoSession,
            },
            Command::SetRetained { topic, message } => {
                self.set_retained(topic, message.as_ref());
                CommandResult::Done
            }
            Command::Enqueue {
                appends,
                limits,
                inbound,
                retained,
            } => self.apply_enqueue(appends, limits, inbound.as_ref(), *retained, None),
            Command::EnqueueMatching {
                appends,
                limits,
                inbound,
                retained,
                matching,
                except,
            } => self.apply_enqueue(
                appends,
                limits,
                inbound.as_ref(),
                *retained,
                Some((*matching, except)),
            ),
            Command::Ack {
                client_id,
                connection_id,
                completed,
                received,
            } => match self.owned_by(client_id, *connection_id) {
                true => self.ack(client_id, completed, received),
                false => CommandResult::NoSession,
            },
            Command::InboundQos2 {
                client_id,
                connection_id,
                received,
                released,
            } => match self.sessions.get_mut(client_id) {
                Some(session)
                    if *connection_id == ANY_CONNECTION
                        || session.connection_id == *connection_id =>
                {
                    if !received.is_empty() {
                        session
                            .inbound_qos2
                            .make_mut()
                            .extend(received.iter().copied());
                    }
                    if let Some(ids) = session.inbound_qos2.if_any() {
                        for id in released {
                            ids.remove(id);
                        }
                    }
                    session.inbound_qos2.tidy();
                    CommandResult::Done
                }
                _ => CommandResult::NoSession,
            },
            Command::Barrier => CommandResult::Done,
            Command::Redistribute { after_ms, now_ms } => {
                self.redistribute(*after_ms, *now_ms);
                CommandResult::Done
            }
            Command::Expire { node, now_ms } => {
                self.expire(*node, *now_ms);
                CommandResult::Done
            }
            Command::NodeLost {
                node,
                publisher,
                now_ms,
            } => {
                let lost: Vec<(Arc<str>, u64)> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.connected && s.node == *node)
                    .map(|(c, s)| (c.clone(), s.connection_id))
                    .collect();
                for (client_id, connection_id) in lost {
                    // Behind a partition the connection may still be open: its node
                    // closes it, and the client reconnects to a live session.
                    self.emit(Event::Kick {
                        client_id: client_id.clone(),
                        node: *node,
                        connection_id,
                    });
                    self.close_session(
                        &client_id,
                        connection_id,
                        false,
                        None,
                        *now_ms,
                        Some(*publisher),
                    );
                }
                CommandResult::Done
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn open_session(
        &mut self,
        client_id: &Arc<str>,
        node: NodeId,
        connection_id: u64,
        protocol: u8,
        clean_start: bool,
        expiry_secs: u32,
        will: Option<Will>,
        now_ms: u64,
    ) -> CommandResult {
        let mut session_present = false;
        if let Some(old) = self.sessions.get_mut(client_id) {
            // Not `emit`: `old` borrows `sessions`, so only the other fields are at hand.
            if old.connected && !self.muted {
                if let Some(tx) = &self.events {
                    let _ = tx.send(Event::SessionTakenOver {
                        client_id: client_id.clone(),
                        node: old.node,
                        connection_id: old.connection_id,
                    });
                }
            }
            // The old connection's will: a reconnect to the same session within the
            // will delay cancels it; a clean start ends the old session, which
            // publishes it.
            let old_will = old.will.take();
            old.will_due_at_ms = None;
            if let Some(w) = old_will {
                let cancelled = !clean_start && (w.delay_secs > 0 || !old.connected);
                if !cancelled {
                    self.will_due(w.message, now_ms, node);
                }
            }
            if clean_start {
                self.remove_session(client_id);
            } else {
                session_present = true;
            }
        }
        let record = self.sessions.entry(client_id.clone()).or_insert_with(|| {
            Box::new(SessionRecord {
                node,
                connection_id,
                protocol,
                expiry_secs,
                connected: true,
                disconnected_at_ms: None,
                will: None,
                will_due_at_ms: None,
                subscriptions: Sparse::default(),
                queue: Sparse::default(),
                awaiting_pubcomp: Sparse::default(),
                inbound_qos2: Sparse::default(),
                next_seq: 0,
                queued_bytes: 0,
            })
        });
        record.node = node;
        record.connection_id = connection_id;
        record.protocol = protocol;
        record.expiry_secs = expiry_secs;
        record.connected = true;
        record.disconnected_at_ms = None;
        record.will = will.map(Box::new);
        record.will_due_at_ms = None;
        if session_present && !record.queue.is_empty() {
            self.emit(Event::QueueGrew {
                client_id: client_id.clone(),
                node,
            });
        }
        self.emit(Event::SessionOpened {
            client_id: client_id.clone(),
            node,
            connection_id,
            created: !session_present,
        });
        CommandResult::SessionOpened { session_present }
    }

    /// End the session's connection `connection_id`; an immediate will is published
    /// by `publisher`, or by the session's own node.
    fn close_session(
        &mut self,
        client_id: &Arc<str>,
        connection_id: u64,
        graceful: bool,
        expiry_secs: Option<u32>,
        now_ms: u64,
        publisher: Option<NodeId>,
    ) -> CommandResult {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return CommandResult::NoSession;
        };
        if session.connection_id != connection_id || !session.connected {
            return CommandResult::NoSession;
        }
        session.connected = false;
        session.disconnected_at_ms = Some(now_ms);
        if let Some(secs) = expiry_secs {
            session.expiry_secs = secs;
        }
        let node = publisher.unwrap_or(session.node);
        let mut due_now = None;
        if graceful {
            session.will = None;
        } else if let Some(will) = &session.will {
            if will.delay_secs == 0 || session.expiry_secs == 0 {
                due_now = session.will.take().map(|w| w.message);
            } else {
                session.will_due_at_ms = Some(now_ms + u64::from(will.delay_secs) * 1000);
            }
        }
        if let Some(message) = due_now {
            self.will_due(message, now_ms, node);
        }
        let session = &self.sessions[client_id];
        if session.expiry_secs == 0 {
            self.remove_session(client_id);
        }
        CommandResult::Done
    }

    /// A will is due at `now_ms`. What follows from it in the replicated state happens
    /// here, on every node alike, whether or not the node that publishes it lives on:
    /// it becomes its topic's retained message if it is retained, and it is queued for
    /// every persistent session that subscribed to its topic at QoS ≥ 1, under the
    /// queue limits of the last `Enqueue`; each shared group's member is chosen here
    /// too (a persistent one queues it, a connected clean one gets it from its node,
    /// [`Event::SharedDelivery`]); and every node hands it to its own connected clean
    /// sessions outside shared groups ([`Event::PublishWill`]).
    fn will_due(&mut self, mut message: Message, now_ms: u64, publisher: NodeId) {
        message.received_at_ms = now_ms;
        let message = Arc::new(message);
        if message.retain {
            self.set_retained(&message.topic, Some(&message));
        }
        let mut appends: Appends = self
            .subscriber_appends(&message, |_| false)
            .into_iter()
            .collect();
        // One member per shared group, from the committed state alone, so that every
        // node makes the same choice and none has to live on for it: among the members
        // that can take it (persistent, or connected), the one a hash of the group and
        // the topic names.
        let mut groups: Vec<String> = Vec::new();
        self.routes
            .for_each_shared_match(&message.topic, |group, _| groups.push(group.to_owned()));
        groups.sort();
        groups.dedup();
        let mut picks: Vec<(Arc<str>, Arc<str>, SubscriptionOptions)> = Vec::new();
        for group in groups {
            let able = self.shared_members(&message.topic, &group, |_, s| {
                s.connected || s.is_persistent()
            });
            if able.is_empty() {
                continue;
            }
            let key = format!("{group}\u{0}{}", message.topic);
            let (client, options) = &able[pick(&key, able.len())];
            picks.push((Arc::from(group), client.clone(), options.clone()));
        }
        let mut shared_live = Vec::new();
        for (group, client, options) in picks {
            let Some(session) = self.sessions.get(&client) else {
                continue;
            };
            let (qos, retain) = options.grant(&message);
            let subscription_ids: Vec<u32> = options.subscription_id.into_iter().collect();
            if session.is_persistent() && qos > 0 {
                appends.push(EnqueueEntry {
                    client_id: client,
                    message: message.clone(),
                    qos,
                    retain,
                    subscription_ids,
                });
            } else if session.connected {
                shared_live.push(Event::SharedDelivery {
                    node: session.node,
                    client_id: client,
                    message: message.clone(),
                    qos,
                    retain,
                    subscription_ids,
                    group,
                });
            }
        }
        self.emit(Event::PublishWill { publisher, message });
        for event in shared_live {
            self.emit(event);
        }
        if !appends.is_empty() {
            let limits = self.queue_limits;
            self.enqueue(&appends, &limits);
        }
    }

    /// One retained message per topic; an empty payload (or none) clears it.
    fn set_retained(&mut self, topic: &str, message: Option<&Arc<Message>>) {
        match message {
            Some(m) if !m.payload.is_empty() => {
                self.retained.insert(topic, m.clone());
            }
            _ => {
                self.retained.remove(topic);
            }
        }
    }

    fn remove_session(&mut self, client_id: &Arc<str>) {
        if let Some(session) = self.sessions.remove(client_id) {
            self.queued_total = self.queued_total.saturating_sub(session.queued_bytes);
            for filter in session.subscriptions.keys() {
                self.routes.remove(filter, client_id);
            }
            self.emit(Event::SessionEnded {
                client_id: client_id.clone(),
            });
        }
    }

    fn subscribe(
        &mut self,
        client_id: &Arc<str>,
        entries: &[(String, SubscriptionOptions)],
    ) -> CommandResult {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return CommandResult::NoSession;
        };
        let mut existed = Vec::with_capacity(entries.len());
        for (filter, options) in entries {
            existed.push(
                session
                    .subscriptions
                    .make_mut()
                    .insert(filter.clone(), options.clone())
                    .is_some(),
            );
            self.routes
                .insert(filter, client_id.clone(), options.clone());
        }
        CommandResult::Subscribed(existed)
    }

    fn unsubscribe(&mut self, client_id: &Arc<str>, filters: &[String]) -> CommandResult {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return CommandResult::NoSession;
        };
        let mut removed = Vec::with_capacity(filters.len());
        for filter in filters {
            let was = session
                .subscriptions
                .if_any()
                .is_some_and(|subs| subs.remove(filter).is_some());
            if was {
                self.routes.remove(filter, client_id);
            }
            removed.push(was);
        }
        session.subscriptions.tidy();
        CommandResult::Unsubscribed(removed)
    }

    /// What a publish changes: its publisher's QoS 2 identifier, its topic's retained
    /// message, and the queues of `appends` and (`matching`) of the persistent
    /// sessions subscribed to the message that index names, but those excepted.
    fn apply_enqueue(
        &mut self,
        appends: &Appends,
        limits: &QueueLimits,
        inbound: Option<&InboundRecord>,
        retained: Option<u32>,
        matching: Option<(u32, &[Arc<str>])>,
    ) -> CommandResult {
        if let Some(InboundRecord {
            client_id,
            connection_id,
            packet_id,
        }) = inbound
        {
            if !self.owned_by(client_id, *connection_id) {
                // The publisher's connection lost its session meanwhile: its PUBREC is
                // never sent, and the client resends to its successor.
                return CommandResult::NoSession;
            }
            let session = self.sessions.get_mut(client_id).expect("owned");
            if !session.inbound_qos2.make_mut().insert(*packet_id) {
                // A resend of a publish already queued: nothing again.
                return CommandResult::Enqueued {
                    accepted: 0,
                    dropped: 0,
                };
            }
        }
        if let Some(m) = retained.and_then(|i| appends.message(i)) {
            self.set_retained(&m.topic, Some(m));
        }
        self.queue_limits = *limits;
        let Some((index, except)) = matching else {
            return self.enqueue(appends, limits);
        };
        let Some(message) = appends.message(index).cloned() else {
            // Decoding refuses such an entry; nothing is queued for a message that is
            // not there.
            return self.enqueue(appends, limits);
        };
        let named: HashSet<&str> = appends
            .iter()
            .filter(|(_, m)| Arc::ptr_eq(m, &message))
            .map(|(a, _)| &*a.client_id)
            .chain(except.iter().map(|c| &**c))
            .collect();
        let found = self.subscriber_appends(&message, |client| named.contains(client));
        if found.is_empty() {
            return self.enqueue(appends, limits);
        }
        let mut all = appends.clone();
        for entry in found {
            all.push(entry);
        }
        self.enqueue(&all, limits)
    }

    /// An append of `message` for every persistent session with a subscription outside
    /// shared groups matching its topic at QoS ≥ 1 (a no-local one not for the session
    /// that published it), each session once with what all its matching
    /// subscriptions decide, in client-id order (the trie's own order depends on the
    /// order subscriptions were made in); `skip` leaves sessions out.
    fn subscriber_appends(
        &self,
        message: &Arc<Message>,
        skip: impl Fn(&str) -> bool,
    ) -> Vec<EnqueueEntry> {
        let mut targets: BTreeMap<Arc<str>, EnqueueEntry> = BTreeMap::new();
        let origin = message.origin_client.as_deref();
        self.routes
            .for_each_match(&message.topic, |_, client, options| {
                if options.no_local && origin == Some(&**client) {
                    return;
                }
                if skip(client) {
                    return;
                }
                let (qos, retain) = options.grant(message);
                let entry = targets
                    .entry(client.clone())
                    .or_insert_with(|| EnqueueEntry {
                        client_id: client.clone(),
                        message: message.clone(),
                        qos: 0,
                        retain: false,
                        subscription_ids: Vec::new(),
                    });
                entry.qos = entry.qos.max(qos);
                entry.retain |= retain;
                entry.subscription_ids.extend(options.subscription_id);
            });
        targets
            .into_values()
            .filter(|e| {
                e.qos > 0
                    && self
                        .sessions
                        .get(&e.client_id)
                        .is_some_and(|s| s.is_persistent())
            })
            .collect()
    }

    fn enqueue(&mut self, appends: &Appends, limits: &QueueLimits) -> CommandResult {
        let mut accepted = 0u32;
        let mut dropped = 0u32;
        let mut grew: Vec<(Arc<str>, NodeId)> = Vec::new();
        let mut told: HashSet<Arc<str>> = HashSet::new();
        for (entry, message) in appends.iter() {
            let Some(session) = self.sessions.get_mut(&entry.client_id) else {
                dropped += 1;
                continue;
            };
            let weight = message.weight();
            if weight > limits.max_bytes {
                // It would not fit even in an empty queue: drop it, and evict nothing
                // for it (mqtt.max_queued_bytes may be below mqtt.max_packet_size).
                dropped += 1;
                continue;
            }
            let full = |s: &SessionRecord| {
                s.queue.len() as u64 >= limits.max_messages
                    || s.queued_bytes + weight > limits.max_bytes
            };
            if full(session) {
                match limits.policy {
                    QueueFullPolicy::DropNewest => {
                        dropped += 1;
                        continue;
                    }
                    QueueFullPolicy::DropOldest => {
                        while full(session) {
                            let Some(old) = session.queue.if_any().and_then(VecDeque::pop_front)
                            else {
                                break;
                            };
                            session.queued_bytes -= old.message.weight();
                            self.queued_total =
                                self.queued_total.saturating_sub(old.message.weight());
                            dropped += 1;
                        }
                        if full(session) {
                            // max_messages 0: no queue holds anything.
                            dropped += 1;
                            continue;
                        }
                    }
                }
            }
            let seq = session.next_seq;
            session.next_seq += 1;
            session.queued_bytes += weight;
            self.queued_total += weight;
            session.queue.make_mut().push_back(QueuedMessage {
                seq,
                message: message.clone(),
                qos: entry.qos,
                retain: entry.retain,
                subscription_ids: Sparse::from(entry.subscription_ids.clone()),
            });
            accepted += 1;
            if session.connected && told.insert(entry.client_id.clone()) {
                grew.push((entry.client_id.clone(), session.node));
            }
        }
        for (client_id, node) in grew {
            self.emit(Event::QueueGrew { client_id, node });
        }
        CommandResult::Enqueued { accepted, dropped }
    }

    fn ack(&mut self, client_id: &Arc<str>, completed: &[u64], received: &[u64]) -> CommandResult {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return CommandResult::NoSession;
        };
        let before = session.queued_bytes;
        for seq in received {
            if Self::remove_queued(session, *seq) {
                session.awaiting_pubcomp.make_mut().insert(*seq);
            }
        }
        for seq in completed {
            let released = session
                .awaiting_pubcomp
                .if_any()
                .is_some_and(|set| set.remove(seq));
            if !released {
                Self::remove_queued(session, *seq);
            }
        }
        session.queue.tidy();
        session.awaiting_pubcomp.tidy();
        self.queued_total = self
            .queued_total
            .saturating_sub(before - session.queued_bytes);
        CommandResult::Done
    }

    fn remove_queued(session: &mut SessionRecord, seq: u64) -> bool {
        Self::take_queued(session, seq).is_some()
    }

    /// Take the message at queue position `seq` out of `session`'s queue.
    fn take_queued(session: &mut SessionRecord, seq: u64) -> Option<QueuedMessage> {
        let index = if session.queue.front().is_some_and(|m| m.seq == seq) {
            Some(0)
        } else {
            session.queue.binary_search_by_key(&seq, |m| m.seq).ok()
        };
        let taken = index.and_then(|i| session.queue.if_any()?.remove(i))?;
        session.queued_bytes -= taken.message.weight();
        Some(taken)
    }

    fn expire(&mut self, node: NodeId, now_ms: u64) {
        let mut ended = Vec::new();
        let mut wills = Vec::new();
        for (client_id, session) in self.sessions.iter_mut() {
            if session
                .will_due_at_ms
                .is_some_and(|due| due <= now_ms && !session.connected)
            {
                if let Some(w) = session.will.take() {
                    wills.push(w.message);
                }
                session.will_due_at_ms = None;
            }
            if !session.connected && session.expiry_secs != u32::MAX {
                let end = session
                    .disconnected_at_ms
                    .unwrap_or(0)
                    .saturating_add(u64::from(session.expiry_secs) * 1000);
                if end <= now_ms {
                    // A will still delayed is published when the session ends.
                    if let Some(w) = session.will.take() {
                        wills.push(w.message);
                    }
                    ended.push(client_id.clone());
                    continue;
                }
            }
            if let Some(queue) = session.queue.if_any() {
                let mut freed = 0;
                queue.retain(|m| {
                    let keep = !m.message.is_expired(now_ms);
                    if !keep {
                        freed += m.message.weight();
                    }
                    keep
                });
                session.queued_bytes -= freed;
                self.queued_total = self.queued_total.saturating_sub(freed);
                session.queue.tidy();
            }
        }
        for client_id in ended {
            self.remove_session(&client_id);
        }
        self.retained.retain(|_, m| !m.is_expired(now_ms));
        for message in wills {
            self.will_due(message, now_ms, node);
        }
    }

    /// The members of `group` that match `topic` and can take a message now or keep
    /// it (`able`), in client-id order (the trie's own order depends on the order
    /// subscriptions were made in, which a node restored from a snapshot does not
    /// share), each once.
    fn shared_members(
        &self,
        topic: &str,
        group: &str,
        able: impl Fn(&Arc<str>, &SessionRecord) -> bool,
    ) -> Vec<(Arc<str>, SubscriptionOptions)> {
        let mut found: Vec<(Arc<str>, SubscriptionOptions)> = Vec::new();
        self.routes.for_each_shared_match(topic, |g, members| {
            if g != group {
                return;
            }
            for (client, options) in members {
                if self.sessions.get(client).is_some_and(|s| able(client, s)) {
                    found.push((client.clone(), options.clone()));
                }
            }
        });
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found.dedup_by(|a, b| a.0 == b.0);
        found
    }

    /// The moves a [`Command::Redistribute`] at `now_ms` makes: for each persistent
    /// session offline for `after_ms` or longer, each queued message it holds only as
    /// a member of a shared group (no other subscription of its matches the topic)
    /// goes to a connected member of that group, the one a hash of the group, topic
    /// and queue position names. A QoS 2 message that arrived before the member went
    /// away may have been sent to it, and stays [MQTT-4.8.2]; so does a message whose
    /// PUBREC arrived.
    fn redistribution_plan(&self, after_ms: u64, now_ms: u64) -> Vec<Move> {
        let mut moves = Vec::new();
        for (client, session) in &self.sessions {
            if session.connected || !session.is_persistent() || session.queue.is_empty() {
                continue;
            }
            let Some(since) = session.disconnected_at_ms else {
                continue;
            };
            if since.saturating_add(after_ms) > now_ms {
                continue;
            }
            let mut shared: Vec<(&str, &str)> = Vec::new();
            let mut direct: Vec<&str> = Vec::new();
            for filter in session.subscriptions.keys() {
                // A group is named by its whole `$share/{name}/{filter}`, as the route
                // table keys it.
                match crate::mqtt::topic::parse_shared(filter) {
                    Some((_, f)) => shared.push((filter, f)),
                    None => direct.push(filter),
                }
            }
            if shared.is_empty() {
                continue;
            }
            for q in session.queue.iter() {
                let topic = &*q.message.topic;
                if session.awaiting_pubcomp.contains(&q.seq)
                    || (q.qos == 2 && q.message.received_at_ms <= since)
                    || direct.iter().any(|f| topic_matches(f, topic))
                {
                    continue;
                }
                let Some((group, _)) = shared.iter().find(|(_, f)| topic_matches(f, topic)) else {
                    continue;
                };
                let able = self.shared_members(topic, group, |c, s| c != client && s.connected);
                if able.is_empty() {
                    continue;
                }
                let key = format!("{group}\u{0}{topic}\u{0}{}", q.seq);
                let (to, options) = &able[pick(&key, able.len())];
                moves.push(Move {
                    from: client.clone(),
                    seq: q.seq,
                    to: to.clone(),
                    group: Arc::from(*group),
                    options: options.clone(),
                });
            }
        }
        moves
    }

    /// Whether a [`Command::Redistribute`] at `now_ms` would move anything (the leader
    /// proposes one only then).
    pub fn redistribution_due(&self, after_ms: u64, now_ms: u64) -> bool {
        !self.redistribution_plan(after_ms, now_ms).is_empty()
    }

    fn redistribute(&mut self, after_ms: u64, now_ms: u64) {
        let moves = self.redistribution_plan(after_ms, now_ms);
        let mut appends = Appends::default();
        let mut live = Vec::new();
        for m in moves {
            let Some(q) = self
                .sessions
                .get_mut(&m.from)
                .and_then(|s| Self::take_queued(s, m.seq))
            else {
                continue;
            };
            self.queued_total = self.queued_total.saturating_sub(q.message.weight());
            if let Some(s) = self.sessions.get_mut(&m.from) {
                s.queue.tidy();
            }
            let Some(target) = self.sessions.get(&m.to) else {
                continue;
            };
            let (qos, retain) = m.options.grant(&q.message);
            let subscription_ids: Vec<u32> = m.options.subscription_id.into_iter().collect();
            if target.is_persistent() && qos > 0 {
                appends.push(EnqueueEntry {
                    client_id: m.to,
                    message: q.message,
                    qos,
                    retain,
                    subscription_ids,
                });
            } else {
                live.push(Event::SharedDelivery {
                    node: target.node,
                    client_id: m.to,
                    message: q.message,
                    qos,
                    retain,
                    subscription_ids,
                    group: m.group,
                });
            }
        }
        for event in live {
            self.emit(event);
        }
        if !appends.is_empty() {
            let limits = self.queue_limits;
            self.enqueue(&appends, &limits);
        }
    }

    /// Whether an expiry sweep at `now_ms` would change anything: a will or session
    /// due, or a queued or retained message expired. Lets the leader skip sweeps that
    /// would only lengthen the log. A scan of the whole state, run once per sweep
    /// interval under the read lock.
    pub fn expiry_due(&self, now_ms: u64) -> bool {
        let session_due = |s: &SessionRecord| {
            if s.connected {
                return s.queue.iter().any(|m| m.message.is_expired(now_ms));
            }
            s.will_due_at_ms.is_some_and(|due| due <= now_ms)
                || (s.expiry_secs != u32::MAX
                    && s.disconnected_at_ms
                        .unwrap_or(0)
                        .saturating_add(u64::from(s.expiry_secs) * 1000)
                        <= now_ms)
                || s.queue.iter().any(|m| m.message.is_expired(now_ms))
        };
        self.sessions.values().any(|s| session_due(s))
            || self.retained.iter().any(|(_, m)| m.is_expired(now_ms))
    }

    /// The state in the layout a digest hashes ([`format::DIGEST_LAYOUT`], snapshot
    /// format 2's) written into `out`, from borrowed records (nothing is cloned: a
    /// digest of a large state streams through a hasher instead of building a copy of
    /// the state and a buffer while the state is locked).
    fn write_canonical(&self, out: &mut impl std::io::Write) {
        /// Snapshot format 2's body over borrowed parts.
        #[derive(Serialize)]
        struct FormRef<'a> {
            sessions: Vec<(&'a Arc<str>, &'a SessionRecord)>,
            retained: Vec<(String, &'a RetainedMessage)>,
            proposers: &'a BTreeMap<NodeId, ProposerRecord>,
            queue_limits: QueueLimits,
        }
        let mut retained: Vec<(String, &RetainedMessage)> = self.retained.iter().collect();
        retained.sort_by(|a, b| a.0.cmp(&b.0));
        let form = FormRef {
            sessions: self.sessions.iter().map(|(k, v)| (k, &**v)).collect(),
            retained,
            proposers: &self.proposers,
            queue_limits: self.queue_limits,
        };
        // Plain data into a Vec or a hasher cannot fail.
        let _ = bincode::serialize_into(out, &(format::marker(format::DIGEST_LAYOUT), form));
    }

    /// Go on with `walk`, a [`BrokerState::digest`] taken in steps of about `budget`
    /// records each, so that the caller can release the state's lock between steps;
    /// the digest once the walk is complete. The steps hash the bytes `digest` hashes
    /// only if the state does not change in between: the caller checks that (the
    /// applied index stays the same) and starts again otherwise.
    pub fn digest_step(&self, walk: &mut DigestWalk, budget: usize) -> Option<u64> {
        let budget = budget.max(1);
        // Serializing into a hasher cannot fail.
        let hash = &mut walk.hash;
        loop {
            match &mut walk.stage {
                WalkStage::Start => {
                    let head = (
                        format::marker(format::DIGEST_LAYOUT),
                        self.sessions.len() as u64,
                    );
                    let _ = bincode::serialize_into(&mut *hash, &head);
                    walk.stage = WalkStage::Sessions(None);
                }
                WalkStage::Sessions(after) => {
                    let range = match after.take() {
                        Some(key) => self
                            .sessions
                            .range::<Arc<str>, _>((Excluded(key), Unbounded)),
                        None => self.sessions.range::<Arc<str>, _>(..),
                    };
                    let mut last = None;
                    for (key, session) in range.take(budget) {
                        let _ = bincode::serialize_into(&mut *hash, &(key, &**session));
                        last = Some(key.clone());
                    }
                    match last {
                        Some(key) => {
                            *after = Some(key);
                            return None;
                        }
                        None => {
                            let mut topics: Vec<String> =
                                self.retained.iter().map(|(t, _)| t).collect();
                            topics.sort();
                            let _ = bincode::serialize_into(&mut *hash, &(topics.len() as u64));
                            walk.stage = WalkStage::Retained(topics, 0);
                        }
                    }
                }
                WalkStage::Retained(topics, next) => {
                    let end = (*next + budget).min(topics.len());
                    for topic in &topics[*next..end] {
                        if let Some(m) = self.retained.get(topic) {
                            let _ = bincode::serialize_into(&mut *hash, &(topic, m));
                        }
                    }
                    *next = end;
                    if end < topics.len() {
                        return None;
                    }
                    let _ =
                        bincode::serialize_into(&mut *hash, &(&self.proposers, self.queue_limits));
                    return Some(hash.0);
                }
            }
        }
    }

    /// A digest of the state, equal on nodes that applied the same log.
    pub fn digest(&self) -> u64 {
        // FNV-1a over the canonical snapshot encoding, streamed: stable across
        // processes, and no copy of the state is made.
        let mut hash = Fnv::new();
        self.write_canonical(&mut hash);
        hash.0
    }
}
