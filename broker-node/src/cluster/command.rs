//! The replicated commands and the records they carry.
//!
//! A [`Command`] is everything the state machine needs to change the replicated state:
//! times, chosen node and limits travel inside it so that applying it is a pure function
//! of (state, command). Commands are batched into one Raft entry ([`Request`]) by the
//! proposer; every command gets its own [`CommandResult`] back.
//!
//! This module must never read a clock, draw a random number or touch the network.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::sparse::Sparse;

/// A node's identity in the cluster.
pub type NodeId = u64;

/// The v5 properties of an application message that travel end to end unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MessageProperties {
    /// Payload Format Indicator (0 bytes, 1 UTF-8).
    pub payload_format_indicator: Option<u8>,
    /// Message Expiry Interval in seconds, as the publisher set it.
    pub message_expiry_interval: Option<u32>,
    /// Content Type.
    pub content_type: Option<String>,
    /// Response Topic for request/response.
    pub response_topic: Option<String>,
    /// Correlation Data for request/response.
    pub correlation_data: Option<Bytes>,
    /// User Properties, in the order the publisher sent them.
    pub user_properties: Vec<(String, String)>,
}

/// An application message as the broker keeps it: what a publisher sent, plus where and
/// when it entered the cluster. Shared by reference between every queue it lands in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// Topic name (never an alias: aliases are resolved on the way in).
    pub topic: Arc<str>,
    /// The payload; cloning it never copies the bytes.
    pub payload: Bytes,
    /// The QoS the publisher used.
    pub qos: u8,
    /// The RETAIN flag the publisher set.
    pub retain: bool,
    /// v5 properties carried end to end.
    pub properties: MessageProperties,
    /// Unix time in milliseconds when the broker accepted it, for expiry.
    pub received_at_ms: u64,
    /// The publishing client, so that no-local can be judged on any node.
    pub origin_client: Option<Arc<str>>,
}

impl Message {
    /// The absolute expiry time in Unix milliseconds, if the message expires.
    pub fn expires_at_ms(&self) -> Option<u64> {
        self.properties
            .message_expiry_interval
            .map(|secs| self.received_at_ms.saturating_add(u64::from(secs) * 1000))
    }

    /// Whether the message has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms().is_some_and(|at| now_ms >= at)
    }

    /// The remaining expiry interval in whole seconds at `now_ms` (rounded up), to be
    /// sent on to subscribers, or `None` when the message does not expire.
    pub fn remaining_expiry_secs(&self, now_ms: u64) -> Option<u32> {
        self.expires_at_ms().map(|at| {
            let left_ms = at.saturating_sub(now_ms);
            u32::try_from(left_ms.div_ceil(1000)).unwrap_or(u32::MAX)
        })
    }

    /// Bytes this message accounts for against queue limits.
    pub fn weight(&self) -> u64 {
        (self.topic.len() + self.payload.len()) as u64
    }
}

/// How one subscription wants its messages, as granted by the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionOptions {
    /// The granted maximum QoS.
    pub qos: u8,
    /// v5 No Local: never deliver this client's own publishes to it.
    pub no_local: bool,
    /// v5 Retain As Published: keep the RETAIN flag on forwarded messages.
    pub retain_as_published: bool,
    /// v5 Retain Handling (0 send retained, 1 only if new, 2 never).
    pub retain_handling: u8,
    /// v5 Subscription Identifier, sent back with every matching message.
    pub subscription_id: Option<u32>,
}

impl SubscriptionOptions {
    /// How `message` is delivered through this subscription: the QoS (the lower of
    /// the publish's and the granted one) and the RETAIN flag (kept only with Retain
    /// As Published).
    pub fn grant(&self, message: &Message) -> (u8, bool) {
        (
            message.qos.min(self.qos),
            self.retain_as_published && message.retain,
        )
    }
}

/// A will message waiting for its connection to end badly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Will {
    /// The message to publish.
    pub message: Message,
    /// v5 Will Delay Interval in seconds.
    pub delay_secs: u32,
}

/// A message waiting in a persistent session's queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMessage {
    /// Position in the session's queue; also yields the packet identifier it is sent with.
    pub seq: u64,
    /// The message, shared with every other queue that holds it.
    pub message: Arc<Message>,
    /// The QoS it is delivered at (the minimum of publish QoS and granted QoS).
    pub qos: u8,
    /// The RETAIN flag it is delivered with.
    pub retain: bool,
    /// The identifiers of every subscription of this session that matched: [`Sparse`],
    /// a pointer while there are none (a queued delivery then takes 32 bytes, not 48).
    pub subscription_ids: Sparse<Vec<u32>>,
}

/// A message to append to one session's queue (the state machine gives it its `seq`),
/// as the publish path builds it; [`Appends`] collects them with each message once.
/// (Entries of formats 1 to 3 carried this, a copy of the message in every one.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnqueueEntry {
    /// The session the message is for.
    pub client_id: Arc<str>,
    /// The message.
    pub message: Arc<Message>,
    /// Delivery QoS.
    pub qos: u8,
    /// Delivery RETAIN flag.
    pub retain: bool,
    /// Matching subscription identifiers.
    pub subscription_ids: Vec<u32>,
}

/// One append of an [`Appends`]: an [`EnqueueEntry`] naming its message by index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Append {
    /// The session the message is for.
    pub client_id: Arc<str>,
    /// The message's index in its [`Appends`]' messages.
    pub message: u32,
    /// Delivery QoS.
    pub qos: u8,
    /// Delivery RETAIN flag.
    pub retain: bool,
    /// Matching subscription identifiers.
    pub subscription_ids: Vec<u32>,
}

/// Appends to persistent sessions' queues, each message held once however many queues
/// it goes to (DESIGN, "a message is data, stored once"): a publish to a thousand
/// offline sessions carries one payload, in memory and in its Raft entry, and every
/// node that decodes the entry shares one `Arc` between the queues.
///
/// Built only by [`Appends::push`] (or collected from [`EnqueueEntry`]s) and by
/// decoding, which refuses an index beyond the messages: every [`Append`] names a
/// message that is there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AppendsForm")]
pub struct Appends {
    /// Each message once.
    messages: Vec<Arc<Message>>,
    /// The appends, in order.
    entries: Vec<Append>,
}

/// [`Appends`] as decoded, before its indexes are checked.
#[derive(Deserialize)]
struct AppendsForm {
    messages: Vec<Arc<Message>>,
    entries: Vec<Append>,
}

impl TryFrom<AppendsForm> for Appends {
    type Error = String;

    fn try_from(form: AppendsForm) -> Result<Self, String> {
        let count = form.messages.len();
        match form.entries.iter().find(|e| e.message as usize >= count) {
            Some(e) => Err(format!("an append names message {} of {count}", e.message)),
            None => Ok(Appends {
                messages: form.messages,
                entries: form.entries,
            }),
        }
    }
}

impl Appends {
    /// The index of `message` among the messages, added unless it is the last one
    /// already (the same `Arc`, or an equal message: entries of formats 1 to 3 decode
    /// into one copy per entry). The entries of one message are pushed one after
    /// another, so comparing with the last is enough to hold each once.
    pub fn add_message(&mut self, message: &Arc<Message>) -> u32 {
        // `Arc`'s `==` compares the pointers first.
        match self.messages.last() {
            Some(last) if last == message => {}
            _ => self.messages.push(message.clone()),
        }
        (self.messages.len() - 1) as u32
    }

    /// Append `entry`'s message to its session's queue.
    pub fn push(&mut self, entry: EnqueueEntry) {
        let message = self.add_message(&entry.message);
        self.entries.push(Append {
            client_id: entry.client_id,
            message,
            qos: entry.qos,
            retain: entry.retain,
            subscription_ids: entry.subscription_ids,
        });
    }

    /// The message at `index`, if there is one.
    pub fn message(&self, index: u32) -> Option<&Arc<Message>> {
        self.messages.get(index as usize)
    }

    /// The messages, each once.
    pub fn messages(&self) -> &[Arc<Message>] {
        &self.messages
    }

    /// The messages, to change in place (the leader's restamping).
    pub(crate) fn messages_mut(&mut self) -> &mut [Arc<Message>] {
        &mut self.messages
    }

    /// The appends, in order, each with its message.
    pub fn iter(&self) -> impl Iterator<Item = (&Append, &Arc<Message>)> {
        self.entries
            .iter()
            .map(|e| (e, &self.messages[e.message as usize]))
    }

    /// How many appends there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl FromIterator<EnqueueEntry> for Appends {
    fn from_iter<I: IntoIterator<Item = EnqueueEntry>>(entries: I) -> Self {
        let mut appends = Appends::default();
        for entry in entries {
            appends.push(entry);
        }
        appends
    }
}

/// An inbound QoS 2 packet identifier to record with the messages of its publish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundRecord {
    /// The publishing client.
    pub client_id: Arc<str>,
    /// Its connection; the record is ignored unless it still owns the session.
    pub connection_id: u64,
    /// The PUBLISH's packet identifier.
    pub packet_id: u16,
}

/// The connection id of commands from entries of format 1, which named none: they act
/// on whichever connection owns the session.
pub const ANY_CONNECTION: u64 = 0;

/// What to do when a session's queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueFullPolicy {
    /// Drop the oldest queued message to make room.
    DropOldest,
    /// Refuse the new message.
    DropNewest,
}

/// Queue limits, carried by the command so that every node applies the same ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueLimits {
    /// Maximum messages per session queue.
    pub max_messages: u64,
    /// Maximum payload+topic bytes per session queue.
    pub max_bytes: u64,
    /// What happens at the limit.
    pub policy: QueueFullPolicy,
}

impl Default for QueueLimits {
    /// The configuration's defaults (`mqtt.max_queued_messages`, `max_queued_bytes`,
    /// `queue_full_policy`), for a will due before any `Enqueue` said otherwise.
    fn default() -> Self {
        QueueLimits {
            max_messages: 1000,
            max_bytes: 64 << 20,
            policy: QueueFullPolicy::DropNewest,
        }
    }
}

/// One change to the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A client connected on `node`: create its session or take the existing one over.
    OpenSession {
        /// The client identifier.
        client_id: Arc<str>,
        /// The node the client is connected to.
        node: NodeId,
        /// Identifies this connection, to tell its later commands from a successor's.
        connection_id: u64,
        /// Protocol level (3, 4, 5).
        protocol: u8,
        /// Clean Start / Clean Session: discard any existing session.
        clean_start: bool,
        /// Session expiry after disconnect, in seconds (`u32::MAX`: never).
        expiry_secs: u32,
        /// The will, if the client set one.
        will: Option<Will>,
        /// Unix ms at the proposing node.
        now_ms: u64,
    },
    /// A connection ended.
    CloseSession {
        /// The client identifier.
        client_id: Arc<str>,
        /// The connection that ended; ignored if another connection owns the session now.
        connection_id: u64,
        /// A normal DISCONNECT: the will is discarded.
        graceful: bool,
        /// The session expiry as updated at DISCONNECT (v5), if it was.
        expiry_secs: Option<u32>,
        /// Unix ms at the proposing node.
        now_ms: u64,
    },
    /// Add or replace subscriptions.
    Subscribe {
        /// The client identifier.
        client_id: Arc<str>,
        /// The connection that asked ([`ANY_CONNECTION`] in entries of format 1):
        /// ignored unless it still owns the session (DESIGN invariant 8).
        connection_id: u64,
        /// Filters (shared ones as `$share/group/filter`) and their options.
        entries: Vec<(String, SubscriptionOptions)>,
    },
    /// Remove subscriptions.
    Unsubscribe {
        /// The client identifier.
        client_id: Arc<str>,
        /// The connection that asked; ignored unless it still owns the session.
        connection_id: u64,
        /// Filters exactly as subscribed.
        filters: Vec<String>,
    },
    /// Set (or with `None`, clear) the retained message of a topic.
    SetRetained {
        /// The topic.
        topic: Arc<str>,
        /// The message, or `None` to clear.
        message: Option<Arc<Message>>,
    },
    /// What a publish changes in the replicated state: appends to persistent
    /// sessions' queues, the retained message, the publisher's QoS 2 identifier.
    Enqueue {
        /// The messages, each once, and the queues they are appended to, in order.
        appends: Appends,
        /// The limits to apply.
        limits: QueueLimits,
        /// The inbound QoS 2 packet identifier of the publish these messages came from,
        /// recorded in the same step as the messages are queued (a persistent
        /// publisher's resend is then recognised, and nothing is queued twice).
        inbound: Option<InboundRecord>,
        /// The publish's message (its index in `appends`' messages) as its topic's
        /// retained message (an empty payload clears it), when it had the RETAIN flag:
        /// set in the same step.
        retained: Option<u32>,
    },
    /// A client acknowledged messages: PUBACK, or PUBCOMP for QoS 2 (`seqs` are removed),
    /// or PUBREC (`received` move to the awaiting-PUBCOMP set).
    Ack {
        /// The client identifier.
        client_id: Arc<str>,
        /// The connection the acknowledgements came on; ignored unless it still owns
        /// the session.
        connection_id: u64,
        /// Sequence numbers fully acknowledged (PUBACK / PUBCOMP).
        completed: Vec<u64>,
        /// Sequence numbers whose PUBREC arrived (QoS 2, PUBREL now due).
        received: Vec<u64>,
    },
    /// Inbound QoS 2 packet identifiers of a persistent session: received (PUBREC
    /// due, a resend must not be delivered again) or released (PUBREL arrived).
    InboundQos2 {
        /// The client identifier.
        client_id: Arc<str>,
        /// The connection the packets came on; ignored unless it still owns the session.
        connection_id: u64,
        /// Identifiers whose PUBLISH was accepted.
        received: Vec<u16>,
        /// Identifiers whose PUBREL arrived.
        released: Vec<u16>,
    },
    /// Drop expired sessions and messages; due wills become events for `node`.
    Expire {
        /// The node that proposed the sweep, and publishes the wills it yields.
        node: NodeId,
        /// Unix ms at the proposing node.
        now_ms: u64,
    },
    /// An operator asked for the client's connection to be closed (v5 DISCONNECT
    /// 0x98 Administrative action), wherever it is connected. The session stays.
    Kick {
        /// The client identifier.
        client_id: Arc<str>,
    },
    /// The leader has not reached `node` for `cluster.node_lost_after`: every session
    /// connected there ends as if its connection broke (wills published by
    /// `publisher`, persistent sessions start to expire and queue), so that a dead
    /// node's clients are not "connected" forever. Should `node` be alive behind a
    /// partition, it closes those connections when it applies this.
    NodeLost {
        /// The node that cannot be reached.
        node: NodeId,
        /// The node that proposed it (the leader), which publishes the wills.
        publisher: NodeId,
        /// Unix ms at the proposing node.
        now_ms: u64,
    },
    /// Changes nothing: once it is applied on a node, that node has applied everything
    /// committed before it was proposed (a node catching up after a restart waits for
    /// one before it trusts what it reads).
    Barrier,
    /// Messages queued for persistent shared-group members that have been offline for
    /// `after_ms` or longer, as members of their groups, go to connected members of the
    /// same groups (format 3). A QoS 2 message that may have been sent to the member
    /// before it went away stays: its delivery must be completed to that member
    /// [MQTT-4.8.2].
    Redistribute {
        /// How long a member must have been offline (the proposer's setting).
        after_ms: u64,
        /// Unix ms at the proposing node.
        now_ms: u64,
    },
    /// An [`Command::Enqueue`] whose message `matching` also goes to the queue of
    /// every persistent session that, when the command applies, has a subscription
    /// outside shared groups matching its topic at QoS ≥ 1 (a no-local one not for
    /// the session that published it), but the sessions in `except` and those the
    /// appends already name (format 5). Found from the replicated subscriptions on
    /// every node alike, so the entry is as large as its message however many
    /// sessions it reaches: a broadcast to 100,000 offline robots named each of them,
    /// 3.6 MB that a follower could not take within Raft's append timeout.
    EnqueueMatching {
        /// The messages, each once, and the queues named explicitly (shared-group
        /// members, subscriptions not yet committed).
        appends: Appends,
        /// The limits to apply.
        limits: QueueLimits,
        /// As [`Command::Enqueue`]'s.
        inbound: Option<InboundRecord>,
        /// As [`Command::Enqueue`]'s.
        retained: Option<u32>,
        /// The message (its index in `appends`' messages) that goes to the matching
        /// sessions.
        matching: u32,
        /// Sessions the publishing node delivered it to directly (connected ones, with
        /// `mqtt.durable_sessions` off), in no particular order.
        except: Vec<Arc<str>>,
    },
}

/// The result of one command, in the order of the batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Nothing to report.
    #[default]
    Done,
    /// OpenSession: whether an existing session was resumed.
    SessionOpened {
        /// The Session Present flag for CONNACK.
        session_present: bool,
    },
    /// Subscribe: for each entry, whether the subscription already existed.
    Subscribed(Vec<bool>),
    /// Unsubscribe: for each filter, whether a subscription was removed.
    Unsubscribed(Vec<bool>),
    /// Enqueue: how many entries were accepted and dropped at a limit.
    Enqueued {
        /// Entries appended.
        accepted: u32,
        /// Entries (new or old) dropped at a queue limit.
        dropped: u32,
    },
    /// The command named a session that does not exist (or another connection owns).
    NoSession,
    /// A resend of a command applied before whose result is no longer kept: it
    /// changed nothing this time.
    Duplicate,
}

/// Who proposed a [`Request`]: a node's proposer, in one incarnation (one run of the
/// process). Its commands carry sequence numbers increasing within the incarnation,
/// so that a resend of a command already applied is recognised (DESIGN invariant 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The proposing node.
    pub node: NodeId,
    /// The proposer's incarnation (its start time; any new value starts afresh).
    pub incarnation: u64,
}

/// One Raft entry: a batch of commands applied in order.
///
/// Encoded with a format version ([`super::format`]): entries written by an earlier
/// release are read (and upgraded), a version newer than this release knows is
/// refused with an error that says so.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// Who proposed it, when a proposer did (entries of format 1 name nobody).
    pub origin: Option<Origin>,
    /// The commands.
    pub commands: Vec<Command>,
    /// Each command's sequence number within its origin's incarnation (empty without
    /// an origin).
    pub seqs: Vec<u64>,
    /// The proposing node's clock when it sent the request (0: unknown). The leader
    /// moves every time in a forwarded request onto its own clock by the difference
    /// ([`Request::restamp`]), so that all times in the log come from one clock.
    pub sent_at_ms: u64,
}

impl Request {
    /// Move every time this request carries (the `now_ms` of its commands, the
    /// acceptance times of its messages) by the difference between `now_ms` (the
    /// leader's clock) and the proposer's clock at sending. A node whose clock is off
    /// then neither expires sessions and messages early nor keeps them too long.
    pub fn restamp(&mut self, now_ms: u64) {
        if self.sent_at_ms == 0 || self.sent_at_ms == now_ms {
            return;
        }
        let delta = i128::from(now_ms) - i128::from(self.sent_at_ms);
        let shift = |t: &mut u64| {
            if *t != 0 {
                *t = (i128::from(*t) + delta).clamp(0, i128::from(u64::MAX)) as u64;
            }
        };
        // Messages are shared between entries: each is restamped once and stays shared.
        let mut moved: Vec<(*const Message, Arc<Message>)> = Vec::new();
        let mut restamp_message = |m: &mut Arc<Message>| {
            let key = Arc::as_ptr(m);
            if let Some((_, done)) = moved.iter().find(|(k, _)| *k == key) {
                *m = done.clone();
                return;
            }
            let mut copy = (**m).clone();
            shift(&mut copy.received_at_ms);
            let copy = Arc::new(copy);
            moved.push((key, copy.clone()));
            *m = copy;
        };
        for cmd in &mut self.commands {
            match cmd {
                Command::OpenSession { now_ms, will, .. } => {
                    shift(now_ms);
                    if let Some(w) = will {
                        shift(&mut w.message.received_at_ms);
                    }
                }
                Command::CloseSession { now_ms, .. }
                | Command::Expire { now_ms, .. }
                | Command::Redistribute { now_ms, .. }
                | Command::NodeLost { now_ms, .. } => shift(now_ms),
                Command::Enqueue { appends, .. } | Command::EnqueueMatching { appends, .. } => {
                    for m in appends.messages_mut() {
                        restamp_message(m);
                    }
                }
                Command::SetRetained {
                    message: Some(m), ..
                } => restamp_message(m),
                Command::SetRetained { message: None, .. }
                | Command::Subscribe { .. }
                | Command::Unsubscribe { .. }
                | Command::Ack { .. }
                | Command::InboundQos2 { .. }
                | Command::Kick { .. }
                | Command::Barrier => {}
            }
        }
        self.sent_at_ms = now_ms;
    }
}

/// The results of one [`Request`], one per command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The results, index for index.
    pub results: Vec<CommandResult>,
    /// The log index the request was committed at, filled in by the leader when it
    /// answers a forwarded request (0 otherwise), so that the follower can wait until
    /// its own state has it before answering its client.
    #[serde(default)]
    pub log_index: u64,
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request of {} commands", self.commands.len())
    }
}
