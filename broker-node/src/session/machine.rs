//! The MQTT protocol of one connection, without I/O.
//!
//! A [`Machine`] is fed decoded packets, deliveries, the outcomes of what it asked for
//! and the time (`now` is always an argument), and answers through a [`World`]: the
//! packets to send, the [`Action`]s to run (propose a command, dispatch a publish,
//! look up retained messages), and synchronous reads of the node it runs on (the ACL
//! in force, the committed record of its session). It never awaits, reads a clock,
//! touches a socket or a channel: the connection task (`broker::connection`) does the
//! I/O and runs the actions, and the tests below drive it with a recording world and
//! injected time.
//!
//! Acknowledgements to the client leave in the order their packets arrived
//! [MQTT-4.6.0-2, -3]: each one waits in the machine's acknowledgement queue until
//! everything before it has gone, whether it waits for a commit (a PUBACK after its
//! message is queued, a PUBCOMP after its release) or is ready at once (a duplicate's
//! PUBREC).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::{
    AliasError, AliasUse, Delivery, InboundAliases, InboundQos2, KeepAlive, OutboundAliases,
    OutboundState, OutboundWindow,
};
use crate::auth::acl::SubscribeAccess;
use crate::cluster::command::{
    Command, CommandResult, InboundRecord, Message, MessageProperties, QueuedMessage,
    SubscriptionOptions, Will,
};
use crate::cluster::state::SessionRecord;
use crate::config::MqttConfig;
use crate::mqtt::{
    self, ConnAck, ConnAckProperties, Connect, Disconnect, DisconnectProperties, Packet,
    ProtocolVersion, PubAck, PubComp, PubRec, PubRel, Publish, PublishProperties, QoS, ReasonCode,
    SubAck, Subscribe, UnsubAck, Unsubscribe,
};

/// How a connection ended, deciding whether the will is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A normal DISCONNECT (reason 0x00): the will is discarded.
    Graceful,
    /// DISCONNECT with 0x04, a network error, a protocol error, a keep-alive timeout.
    Abrupt,
    /// Another connection took the session over; it owns the session now.
    TakenOver,
    /// The node is shutting down; sessions stay as they are.
    Shutdown,
    /// Not an end: the connection has been idle for `mqtt.park_after` with nothing in
    /// flight, and may be parked.
    Idle,
}

/// An outbound QoS 1/2 message in the inflight window.
#[derive(Debug)]
pub enum Outgoing {
    /// Delivered from the node directly (clean sessions): kept for a resend.
    Transient(Delivery),
    /// Delivered from the session's replicated queue at this position.
    Queued(u64),
}

/// What the machine needs of the node it runs on: where its packets and actions go,
/// and synchronous reads of the rules in force and of its committed session.
pub trait World {
    /// The broker's MQTT settings.
    fn config(&self) -> &MqttConfig;
    /// Send `packet` to the client (after whatever was sent before).
    fn send(&mut self, packet: &Packet);
    /// Run `action` (after the actions asked for before it).
    fn act(&mut self, action: Action);
    /// `message` went to the client at `qos` (counted, and its latency since it was
    /// published measured).
    fn sent(&mut self, message: &Message, qos: u8);
    /// A message meant for the client was dropped for `reason` (counted).
    fn dropped(&mut self, reason: &'static str);
    /// Whether the ACL lets the client publish to `topic`.
    fn may_publish(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool;
    /// Whether retaining a message on `topic` would add one retained message beyond
    /// `mqtt.max_retained_messages` (a topic that holds one already replaces it).
    fn retained_full(&self, topic: &str) -> bool;
    /// How the ACL treats a subscription to `filter`.
    fn subscribe_access(
        &self,
        username: Option<&str>,
        client_id: &str,
        filter: &str,
    ) -> SubscribeAccess;
    /// Whether the ACL lets the client receive a message on `topic`.
    fn may_read(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool;
    /// The generation of the rules in force, and whether there is an ACL at all.
    fn acl_generation(&self) -> (u32, bool);
    /// The filters of the session's committed subscriptions.
    fn subscriptions(&self, client_id: &str) -> Vec<String>;
    /// At most `max` messages of the session's replicated queue from position `from`.
    fn queued(&self, client_id: &str, from: u64, max: usize) -> Vec<QueuedMessage>;
    /// The queue positions of the session's messages awaiting PUBCOMP.
    fn awaiting_pubcomp(&self, client_id: &str) -> Vec<u64>;
}

/// Something the machine asks the connection task to do (and to report back on
/// through [`Machine::resolve`] when it names a [`Slot`]).
#[derive(Debug)]
pub enum Action {
    /// Dispatch `message` to its subscribers, forward it, replicate what it changes
    /// (queue appends, the retained message, `inbound`) in one command, and report
    /// [`Resolution::Published`] to `slot` (QoS 1/2) once done.
    Publish {
        /// The message, stamped with its arrival time.
        message: Arc<Message>,
        /// A persistent publisher's QoS 2 identifier, recorded with the message.
        inbound: Option<InboundRecord>,
        /// Where the outcome goes; `None` for QoS 0.
        slot: Option<Slot>,
    },
    /// Put the subscriptions of `command` (a `Command::Subscribe`) in effect on this
    /// node until it commits, submit it (refusable), and report its result to `slot`.
    Subscribe {
        /// The `Command::Subscribe`.
        command: Command,
        /// Where its result goes.
        slot: Slot,
    },
    /// Submit `command`, refusable or not, before any later action's command; report
    /// its result to `slot` if there is one.
    Propose {
        /// The command.
        command: Command,
        /// Whether a leader may refuse it rather than keep it on its way.
        refusable: bool,
        /// Where its result goes, if anything waits for it.
        slot: Option<Slot>,
    },
    /// Submit `command` and forget it (the acknowledgements of outbound messages).
    Detached(Command),
    /// Send the retained messages for these new subscriptions [MQTT-3.3.1-9], through
    /// [`Machine::deliver`]; `existed` says which of them replaced one.
    Retained {
        /// The committed subscriptions.
        entries: Vec<(String, SubscriptionOptions)>,
        /// For each, whether it replaced an existing one (Retain Handling 1).
        existed: Vec<bool>,
    },
}

/// A place in the machine's acknowledgement queue, waiting for a [`Resolution`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(u32);

/// How something the machine asked for turned out.
#[derive(Debug)]
pub enum Resolution {
    /// A publish was dispatched: `matched` subscriptions, `delivered` straight to
    /// connected clients, `queued` appends to persistent queues; `committed` is the
    /// replicated command's result (`None`: nothing to replicate), after every
    /// forwarded copy was answered.
    Published {
        /// Subscriptions that matched.
        matched: usize,
        /// Deliveries straight to connected clients.
        delivered: usize,
        /// Appends to persistent queues in the command.
        queued: usize,
        /// Appends left out because the node's queues were at
        /// `mqtt.max_node_queued_bytes`.
        refused: usize,
        /// The command's result (`Some(None)`: not committed), `None` if there was
        /// nothing to replicate.
        committed: Option<Option<CommandResult>>,
    },
    /// A proposed command committed with this result, or (`None`) did not.
    Committed(Option<CommandResult>),
}

/// What an acknowledgement waits for.
#[derive(Debug)]
enum Awaited {
    /// PUBACK or PUBREC of a publish.
    Publish { packet_id: u16, qos: QoS },
    /// SUBACK: each filter's refusal, or `None` for those in `entries`.
    Subscribe {
        packet_id: u16,
        codes: Vec<Option<ReasonCode>>,
        entries: Vec<(String, SubscriptionOptions)>,
    },
    /// UNSUBACK for `filters` filters.
    Unsubscribe { packet_id: u16, filters: usize },
    /// PUBCOMP once the release of the identifier is committed.
    PubComp { packet_id: u16 },
    /// PUBRELs once the PUBRECs of queued messages are committed.
    PubRels(Vec<u16>),
}

/// One acknowledgement in the queue.
#[derive(Debug)]
enum AckSlot {
    Waiting(Awaited),
    /// Send this, then (after a SUBACK) the retained messages of the new subscriptions.
    Ready(Packet, Option<Box<Action>>),
    /// Send a PUBREL for each of these packet identifiers.
    PubRels(Vec<u16>),
    /// What it waited for failed and the client cannot be told: close.
    Fail,
}

/// [`Machine::acl_generation`] before anything was derived.
const ACL_UNKNOWN: u32 = u32::MAX;

/// Most queued messages read from the replicated queue at once.
const QUEUE_BATCH: usize = 256;

/// One connection's protocol state.
pub struct Machine {
    client_id: Arc<str>,
    /// This connection, named in its commands: the state machine ignores them once
    /// another connection owns the session (DESIGN invariant 8).
    connection_id: u64,
    /// The authenticated username, for ACL checks.
    username: Option<Arc<str>>,
    version: ProtocolVersion,
    persistent: bool,
    /// Session expiry as granted at CONNECT, to validate a DISCONNECT update.
    connect_expiry: u32,
    expiry_update: Option<u32>,
    keep_alive: KeepAlive,
    aliases: InboundAliases,
    /// Topic aliases this broker assigned towards the client.
    out_aliases: OutboundAliases,
    /// Whether a subscription may match topics the ACL keeps from this client, so that
    /// every delivery is checked ([`SubscribeAccess::Filtered`]).
    acl_filtered: bool,
    /// The ACL generation `acl_filtered` was derived under ([`ACL_UNKNOWN`]: not yet).
    acl_generation: u32,
    inbound_qos2: InboundQos2,
    /// QoS 1 publishes whose PUBACK is not yet sent.
    inbound_qos1_pending: u32,
    /// The client's Maximum Packet Size (v5), 0 if unlimited.
    client_max_packet: u32,
    window: OutboundWindow<Outgoing>,
    /// Transient QoS 1/2 deliveries waiting for room in the window.
    pending: VecDeque<Delivery>,
    /// Next replicated-queue position to consider sending.
    queue_cursor: u64,
    /// Queue positions below this were possibly sent before: resend them with DUP.
    resend_below: u64,
    /// Acknowledgements to the client, in the order their packets arrived; the
    /// first one's slot number is `acks_head`.
    acks: VecDeque<AckSlot>,
    acks_head: u32,
    /// What the client acknowledged of queued messages, to commit: queue positions it
    /// completed (`None`), and PUBRECs (with their packet identifiers: the PUBRELs
    /// wait for the commit).
    outbound_acks: Vec<(u64, Option<u16>)>,
}

/// What CONNECT negotiation settled, before the session is opened.
#[derive(Debug)]
pub struct Negotiated {
    /// The session's client identifier.
    pub client_id: Arc<str>,
    /// The identifier the broker assigned (v5 says so in CONNACK).
    pub assigned: Option<String>,
    /// The will, validated.
    pub will: Option<Will>,
    /// Session expiry as the client asked for it.
    pub requested_expiry: u32,
    /// Session expiry as granted.
    pub expiry_secs: u32,
    /// Keep alive as granted.
    pub keep_alive_secs: u16,
}

/// The client identifier of `connect` [MQTT-3.1.3-6..9]: its own, or one made by
/// `fresh` when it sent none and may have one assigned; and whether it was assigned.
pub fn client_identifier(
    connect: &Connect,
    fresh: impl FnOnce() -> String,
) -> Result<(Arc<str>, Option<String>), ReasonCode> {
    if connect.properties.authentication_method.is_some() {
        // Enhanced authentication is not offered.
        return Err(ReasonCode::BadAuthenticationMethod);
    }
    if !connect.client_id.is_empty() {
        return Ok((Arc::from(connect.client_id.as_str()), None));
    }
    let version = connect.protocol;
    if version == ProtocolVersion::V5 || (version == ProtocolVersion::V3_1_1 && connect.clean_start)
    {
        let id = fresh();
        Ok((Arc::from(id.as_str()), Some(id)))
    } else {
        Err(ReasonCode::ClientIdentifierNotValid)
    }
}

/// Negotiate an authenticated CONNECT: validate its will like a publish (`may_publish`
/// is the ACL's verdict on a topic) and settle the session's expiry and keep alive.
pub fn negotiate(
    connect: &Connect,
    cfg: &MqttConfig,
    client_id: Arc<str>,
    assigned: Option<String>,
    may_publish: impl FnOnce(&str) -> bool,
) -> Result<Negotiated, ReasonCode> {
    let v5 = connect.protocol == ProtocolVersion::V5;
    let will = match &connect.will {
        None => None,
        Some(w) => {
            check_topic_limits(cfg, &w.topic)?;
            if !may_publish(&w.topic) {
                tracing::info!(client_id = %client_id, topic = %w.topic, "will refused by the ACL");
                return Err(ReasonCode::NotAuthorized);
            }
            if u8::from(w.qos) > cfg.max_qos {
                return Err(ReasonCode::QoSNotSupported);
            }
            if w.retain && !cfg.retain_available {
                return Err(ReasonCode::RetainNotSupported);
            }
            Some(Will {
                delay_secs: w.properties.will_delay_interval.unwrap_or(0),
                message: Message {
                    topic: Arc::from(w.topic.as_str()),
                    payload: w.payload.clone(),
                    qos: u8::from(w.qos),
                    retain: w.retain,
                    properties: MessageProperties {
                        payload_format_indicator: w.properties.payload_format_indicator,
                        message_expiry_interval: w.properties.message_expiry_interval,
                        content_type: w.properties.content_type.clone(),
                        response_topic: w.properties.response_topic.clone(),
                        correlation_data: w.properties.correlation_data.clone(),
                        user_properties: w.properties.user_properties.clone(),
                    },
                    received_at_ms: 0,
                    origin_client: Some(client_id.clone()),
                },
            })
        }
    };
    // Session lifetime: v3 clean session 0 never expires; v5 says how long.
    let requested_expiry = if v5 {
        connect.properties.session_expiry_interval.unwrap_or(0)
    } else if connect.clean_start {
        0
    } else {
        u32::MAX
    };
    let expiry_secs = match cfg.max_session_expiry {
        Some(max) if requested_expiry != 0 => {
            requested_expiry.min(u32::try_from(max.as_secs()).unwrap_or(u32::MAX))
        }
        _ => requested_expiry,
    };
    let keep_alive_secs = match cfg.server_keep_alive {
        Some(server) if v5 => server,
        _ => connect.keep_alive.min(cfg.max_keep_alive),
    };
    Ok(Negotiated {
        client_id,
        assigned,
        will,
        requested_expiry,
        expiry_secs,
        keep_alive_secs,
    })
}

/// The CONNACK accepting `connect` as `n` settled it.
pub fn connack(
    connect: &Connect,
    n: &Negotiated,
    cfg: &MqttConfig,
    session_present: bool,
) -> Packet {
    let mut props = ConnAckProperties::default();
    if connect.protocol == ProtocolVersion::V5 {
        props.receive_maximum = Some(cfg.receive_maximum);
        props.maximum_packet_size = Some(cfg.max_packet_size);
        props.topic_alias_maximum = Some(cfg.topic_alias_maximum);
        props.retain_available = Some(cfg.retain_available);
        props.wildcard_subscription_available = Some(cfg.wildcard_subscription_available);
        props.subscription_identifiers_available = Some(cfg.subscription_identifier_available);
        props.shared_subscription_available = Some(cfg.shared_subscription_available);
        if cfg.max_qos < 2 {
            props.maximum_qos = Some(cfg.max_qos);
        }
        if n.keep_alive_secs != connect.keep_alive {
            props.server_keep_alive = Some(n.keep_alive_secs);
        }
        if n.expiry_secs != n.requested_expiry {
            props.session_expiry_interval = Some(n.expiry_secs);
        }
        props.assigned_client_identifier = n.assigned.clone();
    }
    Packet::ConnAck(ConnAck {
        session_present,
        reason_code: ReasonCode::Success,
        properties: props,
    })
}

/// The CONNACK refusing a connection with `code` (and, say, a v5 Server Reference in
/// `properties`).
pub fn refusal(code: ReasonCode, properties: ConnAckProperties) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        reason_code: code,
        properties,
    })
}

/// Check a topic name against the configured length and depth limits.
pub fn check_topic_limits(cfg: &MqttConfig, topic: &str) -> Result<(), ReasonCode> {
    if topic.len() > cfg.max_topic_length || topic.split('/').count() > cfg.max_topic_levels {
        return Err(ReasonCode::TopicNameInvalid);
    }
    Ok(())
}

/// Check a topic filter against the configured length and depth limits.
pub fn check_filter_limits(cfg: &MqttConfig, filter: &str) -> Result<(), ReasonCode> {
    check_topic_limits(cfg, filter).map_err(|_| ReasonCode::TopicFilterInvalid)
}

/// What a machine [at rest](Machine::at_rest) keeps, flat, while its connection is
/// parked (no inflight window, acknowledgements or waiting deliveries).
pub struct AtRest {
    /// The session's client identifier.
    pub client_id: Arc<str>,
    /// The authenticated username.
    pub username: Option<Arc<str>>,
    /// The connection's identifier.
    pub connection_id: u64,
    /// When the client was last heard from, in [`KeepAlive::compact`]'s form.
    pub last_seen_ms: u64,
    /// Next replicated-queue position to consider sending.
    pub queue_cursor: u64,
    /// Queue positions below this were possibly sent before.
    pub resend_below: u64,
    /// Topic aliases and inbound QoS 2 identifiers, when there are any.
    pub kept: Option<Box<(InboundAliases, InboundQos2)>>,
    /// The keep-alive interval in seconds (the limit is one and a half of it).
    pub keep_alive_secs: u16,
    /// Session expiry as granted at CONNECT.
    pub connect_expiry: u32,
    /// The client's Maximum Packet Size, 0 if unlimited.
    pub client_max_packet: u32,
    /// The outbound window's capacity (at most 65,535).
    pub window_size: u16,
    /// The outbound topic aliases' maximum (the table itself is forgotten).
    pub out_alias_max: u16,
    /// The protocol version.
    pub version: ProtocolVersion,
}

impl AtRest {
    /// The keep alive, as it was when parked or last [set](AtRest::set_keep_alive).
    pub fn keep_alive(&self) -> KeepAlive {
        KeepAlive::from_compact(self.last_seen_ms, u32::from(self.keep_alive_secs) * 1500)
    }

    /// Update the keep alive (a packet arrived while parked).
    pub fn set_keep_alive(&mut self, keep_alive: KeepAlive) {
        self.last_seen_ms = keep_alive.compact().0;
    }
}

/// What opening a session in the cluster settled, for [`Machine::new`].
#[derive(Debug, Default)]
pub struct Opened {
    /// The connection's identifier, named in its commands.
    pub connection_id: u64,
    /// The authenticated username.
    pub username: Option<Arc<str>>,
    /// The identifiers of the session's unreleased inbound QoS 2 publishes.
    pub inbound_qos2: InboundQos2,
    /// The queue position from which messages were never sent.
    pub resend_below: u64,
}

impl Machine {
    /// The protocol state of a session `n` settled and `opened` opened for `connect`,
    /// at `now`. [`Machine::start`] sends what a resumed session owes.
    pub fn new(
        connect: &Connect,
        n: &Negotiated,
        cfg: &MqttConfig,
        opened: Opened,
        now: Instant,
    ) -> Machine {
        let Opened {
            connection_id,
            username,
            inbound_qos2,
            resend_below,
        } = opened;
        let v5 = connect.protocol == ProtocolVersion::V5;
        let client_receive_max = if v5 {
            connect.properties.receive_maximum.unwrap_or(65_535)
        } else {
            65_535
        };
        Machine {
            client_id: n.client_id.clone(),
            connection_id,
            username,
            version: connect.protocol,
            persistent: n.expiry_secs > 0,
            connect_expiry: n.expiry_secs,
            expiry_update: None,
            keep_alive: KeepAlive::new(n.keep_alive_secs, now),
            aliases: InboundAliases::new(if v5 { cfg.topic_alias_maximum } else { 0 }),
            out_aliases: OutboundAliases::new(
                connect.properties.topic_alias_maximum.unwrap_or(0),
                if v5 {
                    cfg.outbound_topic_alias_maximum
                } else {
                    0
                },
            ),
            acl_filtered: false,
            acl_generation: ACL_UNKNOWN,
            inbound_qos2,
            inbound_qos1_pending: 0,
            client_max_packet: connect.properties.maximum_packet_size.unwrap_or(0),
            window: OutboundWindow::new(usize::from(client_receive_max).min(cfg.max_inflight)),
            pending: VecDeque::new(),
            queue_cursor: 0,
            resend_below,
            acks: VecDeque::new(),
            acks_head: 0,
            outbound_acks: Vec::new(),
        }
    }

    /// Send what the session owes once established: PUBRELs of every QoS 2 message
    /// whose PUBREC had arrived (a resumed session), then its queue.
    pub fn start(&mut self, session_present: bool, now_ms: u64, world: &mut impl World) {
        if session_present {
            for seq in world.awaiting_pubcomp(&self.client_id) {
                let id = SessionRecord::packet_id_for(seq);
                if self
                    .window
                    .insert(id, OutboundState::AwaitingComp, Outgoing::Queued(seq))
                {
                    world.send(&Packet::PubRel(PubRel::new(id, ReasonCode::Success)));
                }
            }
        }
        self.pump_queue(now_ms, world);
    }

    /// The session's client identifier.
    pub fn client_id(&self) -> &Arc<str> {
        &self.client_id
    }

    /// The connection's identifier, named in its commands.
    pub fn connection_id(&self) -> u64 {
        self.connection_id
    }

    /// The protocol version the client speaks.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Whether the session outlives the connection.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// The session expiry a DISCONNECT set, if it did.
    pub fn expiry_update(&self) -> Option<u32> {
        self.expiry_update
    }

    /// Messages in the outbound inflight window.
    pub fn inflight(&self) -> usize {
        self.window.len()
    }

    /// Whether acknowledgements wait for something.
    pub fn acks_waiting(&self) -> bool {
        !self.acks.is_empty()
    }

    /// Whether nothing is in flight, buffered or waiting, so that the connection can
    /// be parked.
    pub fn at_rest(&self) -> bool {
        self.inbound_qos1_pending == 0
            && self.window.is_empty()
            && self.pending.is_empty()
            && self.acks.is_empty()
            && self.outbound_acks.is_empty()
            && self.expiry_update.is_none()
    }

    /// The parked form of a machine [at rest](Machine::at_rest).
    pub fn park(self) -> AtRest {
        debug_assert!(self.at_rest());
        let kept = (!self.aliases.is_empty() || !self.inbound_qos2.is_empty())
            .then(|| Box::new((self.aliases, self.inbound_qos2)));
        let (last_seen_ms, limit_ms) = self.keep_alive.compact();
        AtRest {
            client_id: self.client_id,
            username: self.username,
            connection_id: self.connection_id,
            last_seen_ms,
            queue_cursor: self.queue_cursor,
            resend_below: self.resend_below,
            kept,
            keep_alive_secs: u16::try_from(limit_ms / 1500).unwrap_or(u16::MAX),
            connect_expiry: self.connect_expiry,
            client_max_packet: self.client_max_packet,
            window_size: u16::try_from(self.window.capacity()).unwrap_or(u16::MAX),
            out_alias_max: self.out_aliases.maximum(),
            version: self.version,
        }
    }

    /// The machine of a parked connection, back.
    pub fn unpark(rest: AtRest, cfg: &MqttConfig) -> Machine {
        let keep_alive = rest.keep_alive();
        let (aliases, inbound_qos2) = match rest.kept {
            Some(kept) => *kept,
            None => (
                InboundAliases::new(if rest.version == ProtocolVersion::V5 {
                    cfg.topic_alias_maximum
                } else {
                    0
                }),
                InboundQos2::default(),
            ),
        };
        Machine {
            client_id: rest.client_id,
            connection_id: rest.connection_id,
            username: rest.username,
            version: rest.version,
            persistent: rest.connect_expiry > 0,
            connect_expiry: rest.connect_expiry,
            expiry_update: None,
            keep_alive,
            aliases,
            out_aliases: OutboundAliases::new(rest.out_alias_max, rest.out_alias_max),
            acl_filtered: false,
            acl_generation: ACL_UNKNOWN,
            inbound_qos2,
            inbound_qos1_pending: 0,
            client_max_packet: rest.client_max_packet,
            window: OutboundWindow::new(rest.window_size.into()),
            pending: VecDeque::new(),
            queue_cursor: rest.queue_cursor,
            resend_below: rest.resend_below,
            acks: VecDeque::new(),
            acks_head: 0,
            outbound_acks: Vec::new(),
        }
    }

    // ----- time -----

    /// A packet arrived from the client at `now`.
    pub fn seen(&mut self, now: Instant) {
        self.keep_alive.seen(now);
    }

    /// When [`Machine::timeout`] must be called if nothing arrives before.
    pub fn deadline(&self) -> Option<Instant> {
        self.keep_alive.deadline()
    }

    /// The deadline passed at `now`: the connection ends if the client has been silent
    /// for one and a half keep-alive intervals [MQTT-3.1.2-24].
    pub fn timeout(&mut self, now: Instant, world: &mut impl World) -> Option<End> {
        if !self.keep_alive.expired(now) {
            return None;
        }
        tracing::info!(client_id = %self.client_id, "keep alive timeout");
        metrics::counter!("flockmq_keepalive_timeouts_total").increment(1);
        self.disconnect(ReasonCode::KeepAliveTimeout, world);
        Some(End::Abrupt)
    }

    // ----- from the client -----

    /// Handle one packet from the client; `Some` when it ends the connection.
    pub fn handle(&mut self, packet: Packet, now_ms: u64, world: &mut impl World) -> Option<End> {
        match packet {
            Packet::Publish(p) => self.on_publish(p, now_ms, world),
            Packet::PubAck(a) => {
                if let Some(item) = self.window.puback(a.packet_id) {
                    self.outbound_done(item, now_ms, world);
                }
                None
            }
            Packet::PubRec(r) => {
                self.on_pubrec(r, now_ms, world);
                None
            }
            Packet::PubComp(c) => {
                if let Some(item) = self.window.pubcomp(c.packet_id) {
                    self.outbound_done(item, now_ms, world);
                } else if let Some(seq) = world
                    .awaiting_pubcomp(&self.client_id)
                    .into_iter()
                    .find(|seq| SessionRecord::packet_id_for(*seq) == c.packet_id)
                {
                    // PUBREL sent by an earlier connection of the session.
                    self.outbound_acks.push((seq, None));
                }
                None
            }
            Packet::PubRel(r) => {
                self.on_pubrel(r, world);
                None
            }
            Packet::Subscribe(sub) => self.on_subscribe(sub, world),
            Packet::Unsubscribe(unsub) => {
                self.on_unsubscribe(unsub, world);
                None
            }
            Packet::PingReq => {
                world.send(&Packet::PingResp);
                None
            }
            Packet::Disconnect(d) => {
                if let Some(expiry) = d.properties.session_expiry_interval {
                    if self.connect_expiry == 0 && expiry != 0 {
                        return self.violation(
                            ReasonCode::ProtocolError,
                            "session expiry set at DISCONNECT after 0 at CONNECT",
                            world,
                        );
                    }
                    self.expiry_update = Some(expiry);
                }
                Some(if d.reason_code == ReasonCode::Success {
                    End::Graceful
                } else {
                    End::Abrupt
                })
            }
            Packet::Auth(_) => self.violation(
                ReasonCode::ProtocolError,
                "AUTH without an authentication method",
                world,
            ),
            other => self.violation(
                ReasonCode::ProtocolError,
                &format!("{} is not a client packet", packet_kind(&other)),
                world,
            ),
        }
    }

    /// A packet could not be decoded: a protocol violation.
    pub fn malformed(&mut self, error: &mqtt::DecodeError, world: &mut impl World) -> End {
        self.violation(error.reason_code(), &format!("bad packet: {error}"), world)
            .unwrap_or(End::Abrupt)
    }

    fn on_pubrec(&mut self, r: PubRec, now_ms: u64, world: &mut impl World) {
        let failed = r.reason_code.is_error();
        if let Some(Outgoing::Queued(seq)) = self.window.pubrec(r.packet_id) {
            if !failed {
                // PUBREL once this is committed (see `commit_acks`).
                self.outbound_acks.push((*seq, Some(r.packet_id)));
                return;
            }
        }
        if failed {
            // A PUBREC with an error ends the QoS 2 flow [MQTT-4.3.3].
            if self.window.pubrec(r.packet_id).is_some() {
                if let Some(item) = self.window.pubcomp(r.packet_id) {
                    self.outbound_done(item, now_ms, world);
                }
            }
            return;
        }
        world.send(&Packet::PubRel(PubRel::new(
            r.packet_id,
            ReasonCode::Success,
        )));
    }

    fn on_pubrel(&mut self, r: PubRel, world: &mut impl World) {
        let known = self.inbound_qos2.release(r.packet_id);
        let code = if known || self.version != ProtocolVersion::V5 {
            ReasonCode::Success
        } else {
            ReasonCode::PacketIdentifierNotFound
        };
        if known && self.persistent {
            // PUBCOMP once the release is committed: until then a resend of the
            // PUBLISH must still be taken for a duplicate, on any node.
            let slot = self.wait_for(Awaited::PubComp {
                packet_id: r.packet_id,
            });
            world.act(Action::Propose {
                command: self.release_command(r.packet_id),
                refusable: false,
                slot: Some(slot),
            });
            return;
        }
        // PUBCOMP must not overtake a PUBREC still waiting in the queue.
        self.ready(Packet::PubComp(PubComp::new(r.packet_id, code)), world);
    }

    fn on_publish(&mut self, p: Publish, now_ms: u64, world: &mut impl World) -> Option<End> {
        let cfg = world.config();
        if u8::from(p.qos) > cfg.max_qos {
            return self.violation(ReasonCode::QoSNotSupported, "QoS above maximum", world);
        }
        if p.retain && !cfg.retain_available {
            return self.violation(
                ReasonCode::RetainNotSupported,
                "retain not available",
                world,
            );
        }
        let receive_maximum = usize::from(cfg.receive_maximum);
        let topic = match p.properties.topic_alias {
            Some(alias) => match self.aliases.resolve(&p.topic, alias) {
                Ok(t) => t,
                Err(AliasError::OutOfRange(_)) => {
                    return self.violation(ReasonCode::TopicAliasInvalid, "bad topic alias", world)
                }
                Err(AliasError::Unknown(_)) => {
                    return self.violation(ReasonCode::ProtocolError, "unknown topic alias", world)
                }
            },
            None if p.topic.is_empty() => {
                return self.violation(
                    ReasonCode::ProtocolError,
                    "empty topic without alias",
                    world,
                )
            }
            None => p.topic,
        };
        let packet_id = p.packet_id.unwrap_or(0);
        let v5 = self.version == ProtocolVersion::V5;
        if p.qos != QoS::AtMostOnce {
            let unacked = self.inbound_qos1_pending as usize + self.inbound_qos2.len();
            if unacked >= receive_maximum {
                return self.violation(
                    ReasonCode::ReceiveMaximumExceeded,
                    "receive maximum exceeded",
                    world,
                );
            }
        }
        // A QoS 2 publish resent before PUBREL is acknowledged, not delivered again.
        if p.qos == QoS::ExactlyOnce && !self.inbound_qos2.receive(packet_id) {
            self.ready(
                Packet::PubRec(PubRec::new(packet_id, ReasonCode::Success)),
                world,
            );
            return None;
        }
        let refuse = |code: ReasonCode| -> Option<Packet> {
            match p.qos {
                QoS::AtMostOnce => None,
                QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(packet_id, code))),
                QoS::ExactlyOnce => Some(Packet::PubRec(PubRec::new(packet_id, code))),
            }
        };
        if !world.may_publish(self.username.as_deref(), &self.client_id, &topic) {
            tracing::debug!(client_id = %self.client_id, %topic, "publish denied by the ACL");
            world.dropped("acl");
            return self.acknowledge_dropped(p.qos, packet_id, ReasonCode::NotAuthorized, world);
        }
        if let Err(code) = check_topic_limits(world.config(), &topic) {
            tracing::info!(client_id = %self.client_id, %topic, "publish topic over limits");
            if p.qos == QoS::ExactlyOnce {
                self.inbound_qos2.release(packet_id);
            }
            if v5 {
                if let Some(packet) = refuse(code) {
                    self.ready(packet, world);
                }
                return None;
            }
            return self.violation(code, "topic over limits", world);
        }

        if p.retain && !p.payload.is_empty() && world.retained_full(&topic) {
            // Retaining it would pass mqtt.max_retained_messages: refused whole (not
            // delivered either).
            tracing::info!(client_id = %self.client_id, %topic, "retained publish refused: mqtt.max_retained_messages reached");
            world.dropped("retained_quota");
            return self.acknowledge_dropped(p.qos, packet_id, ReasonCode::QuotaExceeded, world);
        }
        let message = Arc::new(Message {
            topic: Arc::from(topic),
            payload: p.payload,
            qos: u8::from(p.qos),
            retain: p.retain,
            properties: MessageProperties {
                payload_format_indicator: p.properties.payload_format_indicator,
                message_expiry_interval: p.properties.message_expiry_interval,
                content_type: p.properties.content_type,
                response_topic: p.properties.response_topic,
                correlation_data: p.properties.correlation_data,
                user_properties: p.properties.user_properties,
            },
            received_at_ms: now_ms,
            origin_client: Some(self.client_id.clone()),
        });
        // A persistent publisher's QoS 2 identifier travels in the same command as the
        // messages it queues, so that a resend after a crash or a move to another node
        // is still recognised as a duplicate, and the identifier is taken exactly when
        // the messages are queued.
        let inbound = (p.qos == QoS::ExactlyOnce && self.persistent).then(|| InboundRecord {
            client_id: self.client_id.clone(),
            connection_id: self.connection_id,
            packet_id,
        });
        let slot = match p.qos {
            QoS::AtMostOnce => None,
            qos => {
                if qos == QoS::AtLeastOnce {
                    self.inbound_qos1_pending += 1;
                }
                Some(self.wait_for(Awaited::Publish { packet_id, qos }))
            }
        };
        world.act(Action::Publish {
            message,
            inbound,
            slot,
        });
        None
    }

    /// Answer a publish that is dropped, not delivered: v5 says why with `code` in
    /// its acknowledgement; 3.x has no way to, and (like Mosquitto) acknowledges it.
    /// A v5 PUBREC with an error ends a QoS 2 flow; in 3.x the PUBREL that follows
    /// completes it as usual.
    fn acknowledge_dropped(
        &mut self,
        qos: QoS,
        packet_id: u16,
        code: ReasonCode,
        world: &mut impl World,
    ) -> Option<End> {
        let v5 = self.version == ProtocolVersion::V5;
        if qos == QoS::ExactlyOnce && v5 {
            self.inbound_qos2.release(packet_id);
        }
        let code = if v5 { code } else { ReasonCode::Success };
        let packet = match qos {
            QoS::AtMostOnce => return None,
            QoS::AtLeastOnce => Packet::PubAck(PubAck::new(packet_id, code)),
            QoS::ExactlyOnce => Packet::PubRec(PubRec::new(packet_id, code)),
        };
        self.ready(packet, world);
        None
    }

    fn on_subscribe(&mut self, sub: Subscribe, world: &mut impl World) -> Option<End> {
        let v5 = self.version == ProtocolVersion::V5;
        let cfg = world.config();
        if sub.properties.subscription_identifier.is_some()
            && !cfg.subscription_identifier_available
        {
            return self.violation(
                ReasonCode::SubscriptionIdentifiersNotSupported,
                "subscription identifiers not available",
                world,
            );
        }
        let max_qos = cfg.max_qos;
        let max_subscriptions = cfg.max_subscriptions_per_client;
        // A filter the client holds already is replaced, not added: only new ones
        // count against the maximum.
        let existing: std::collections::HashSet<String> = if max_subscriptions > 0 {
            world.subscriptions(&self.client_id).into_iter().collect()
        } else {
            Default::default()
        };
        let mut added = 0usize;
        let mut codes: Vec<Option<ReasonCode>> = Vec::with_capacity(sub.filters.len());
        let mut entries = Vec::new();
        for (filter, opts) in &sub.filters {
            let cfg = world.config();
            let shared = mqtt::topic::parse_shared(filter);
            let code = if mqtt::topic::validate_topic_filter(filter).is_err() {
                Some(ReasonCode::TopicFilterInvalid)
            } else if shared.is_some() && !cfg.shared_subscription_available {
                Some(ReasonCode::SharedSubscriptionsNotSupported)
            } else if shared.is_some() && opts.no_local {
                // [MQTT-3.8.3-4]: a protocol error.
                return self.violation(ReasonCode::ProtocolError, "no local on shared", world);
            } else if !cfg.wildcard_subscription_available
                && (filter.contains('+') || filter.contains('#'))
            {
                Some(ReasonCode::WildcardSubscriptionsNotSupported)
            } else if check_filter_limits(cfg, filter).is_err() {
                Some(ReasonCode::TopicFilterInvalid)
            } else if !self.acl_allows_subscription(shared.map(|(_, f)| f).unwrap_or(filter), world)
            {
                tracing::debug!(client_id = %self.client_id, %filter, "subscription denied by the ACL");
                Some(ReasonCode::NotAuthorized)
            } else if max_subscriptions > 0
                && !existing.contains(filter)
                && !entries.iter().any(|(f, _)| f == filter)
            {
                if existing.len() + added >= max_subscriptions {
                    Some(ReasonCode::QuotaExceeded)
                } else {
                    added += 1;
                    None
                }
            } else {
                None
            };
            if code.is_none() {
                entries.push((
                    filter.clone(),
                    SubscriptionOptions {
                        qos: u8::from(opts.qos).min(max_qos),
                        no_local: opts.no_local,
                        retain_as_published: opts.retain_as_published,
                        retain_handling: opts.retain_handling as u8,
                        subscription_id: sub.properties.subscription_identifier,
                    },
                ));
            }
            codes.push(code);
        }
        if entries.is_empty() {
            let reason_codes = subscribe_reason_codes(&codes, v5, &entries, None);
            world.send(&Packet::SubAck(SubAck {
                packet_id: sub.packet_id,
                reason_codes,
                properties: Default::default(),
            }));
            return None;
        }
        let command = Command::Subscribe {
            client_id: self.client_id.clone(),
            connection_id: self.connection_id,
            entries: entries.clone(),
        };
        let slot = self.wait_for(Awaited::Subscribe {
            packet_id: sub.packet_id,
            codes,
            entries,
        });
        world.act(Action::Subscribe { command, slot });
        None
    }

    fn on_unsubscribe(&mut self, unsub: Unsubscribe, world: &mut impl World) {
        let slot = self.wait_for(Awaited::Unsubscribe {
            packet_id: unsub.packet_id,
            filters: unsub.filters.len(),
        });
        // A v3 UNSUBACK cannot say it failed: the client takes it as done, so the
        // command stays on its way however late. v5 reports the failure.
        world.act(Action::Propose {
            command: Command::Unsubscribe {
                client_id: self.client_id.clone(),
                connection_id: self.connection_id,
                filters: unsub.filters,
            },
            refusable: self.version.is_v5(),
            slot: Some(slot),
        });
    }

    // ----- outcomes -----

    /// What `slot` waited for turned out as `resolution`; sends every acknowledgement
    /// that is now due, in order. `Some` when the connection must end.
    pub fn resolve(
        &mut self,
        slot: Slot,
        resolution: Resolution,
        world: &mut impl World,
    ) -> Option<End> {
        let Some(index) = slot
            .0
            .wrapping_sub(self.acks_head)
            .try_into()
            .ok()
            .filter(|i| *i < self.acks.len())
        else {
            debug_assert!(false, "unknown slot {slot:?}");
            return None;
        };
        let AckSlot::Waiting(awaited) = std::mem::replace(&mut self.acks[index], AckSlot::Fail)
        else {
            debug_assert!(false, "slot {slot:?} resolved twice");
            return None;
        };
        let v5 = self.version == ProtocolVersion::V5;
        self.acks[index] = match (awaited, resolution) {
            (
                Awaited::Publish { packet_id, qos },
                Resolution::Published {
                    matched,
                    delivered,
                    queued,
                    refused,
                    committed,
                },
            ) => {
                let (ok, none_accepted) = match committed {
                    None => (true, false),
                    Some(Some(CommandResult::Enqueued { accepted, dropped })) => {
                        (true, queued > 0 && accepted == 0 && dropped > 0)
                    }
                    Some(_) => (false, false),
                };
                let code = if !ok {
                    ReasonCode::UnspecifiedError
                } else if matched == 0 && v5 {
                    ReasonCode::NoMatchingSubscribers
                } else if (none_accepted || refused > 0) && delivered == 0 && v5 {
                    // Every subscriber's queue refused it (full, drop newest), or the
                    // node's queues were full.
                    ReasonCode::QuotaExceeded
                } else {
                    ReasonCode::Success
                };
                if qos == QoS::AtLeastOnce {
                    // Answered: no longer counted against Receive Maximum (a PUBACK
                    // still waiting behind an earlier one only makes the count lenient).
                    self.inbound_qos1_pending -= 1;
                }
                if !ok && !v5 {
                    AckSlot::Fail
                } else if qos == QoS::AtLeastOnce {
                    AckSlot::Ready(Packet::PubAck(PubAck::new(packet_id, code)), None)
                } else {
                    if code.is_error() {
                        // A PUBREC with an error ends the flow [MQTT-4.3.3]: the
                        // identifier is free again for the client, so it must be here
                        // too (not committed, or committed with every queue refusing
                        // the message), and in the replicated session before any later
                        // command of this connection (a PUBLISH reusing it).
                        self.free_inbound_qos2(packet_id, world);
                    }
                    AckSlot::Ready(Packet::PubRec(PubRec::new(packet_id, code)), None)
                }
            }
            (
                Awaited::Subscribe {
                    packet_id,
                    codes,
                    entries,
                },
                Resolution::Committed(result),
            ) => {
                let existed = match result {
                    Some(CommandResult::Subscribed(existed)) if existed.len() == entries.len() => {
                        Some(existed)
                    }
                    _ => {
                        tracing::warn!(client_id = %self.client_id, "subscribe not committed");
                        None
                    }
                };
                let reason_codes = subscribe_reason_codes(&codes, v5, &entries, existed.as_deref());
                let suback = Packet::SubAck(SubAck {
                    packet_id,
                    reason_codes,
                    properties: Default::default(),
                });
                let retained =
                    existed.map(|existed| Box::new(Action::Retained { entries, existed }));
                AckSlot::Ready(suback, retained)
            }
            (Awaited::Unsubscribe { packet_id, filters }, Resolution::Committed(result)) => {
                let reason_codes: Vec<ReasonCode> = match result {
                    Some(CommandResult::Unsubscribed(removed)) => removed
                        .into_iter()
                        .map(|r| {
                            if r {
                                ReasonCode::Success
                            } else {
                                ReasonCode::NoSubscriptionExisted
                            }
                        })
                        .collect(),
                    _ => vec![ReasonCode::UnspecifiedError; filters],
                };
                for code in &reason_codes {
                    let result = match code {
                        ReasonCode::Success => "removed",
                        ReasonCode::NoSubscriptionExisted => "not_found",
                        _ => "failed",
                    };
                    metrics::counter!("flockmq_unsubscribe_filters_total", "result" => result)
                        .increment(1);
                }
                AckSlot::Ready(
                    Packet::UnsubAck(UnsubAck {
                        packet_id,
                        reason_codes,
                        properties: Default::default(),
                    }),
                    None,
                )
            }
            (Awaited::PubComp { packet_id }, Resolution::Committed(result)) => match result {
                Some(CommandResult::Done) => AckSlot::Ready(
                    Packet::PubComp(PubComp::new(packet_id, ReasonCode::Success)),
                    None,
                ),
                _ => AckSlot::Fail,
            },
            (Awaited::PubRels(ids), Resolution::Committed(result)) => match result {
                Some(CommandResult::Done) => AckSlot::PubRels(ids),
                other => {
                    tracing::debug!(?other, "PUBREC not committed, closing");
                    AckSlot::Fail
                }
            },
            (awaited, resolution) => {
                tracing::error!(?awaited, ?resolution, "resolution does not fit its slot");
                AckSlot::Fail
            }
        };
        self.flush_acks(world)
    }

    /// Commit the acknowledgements the client sent since the last time (called once
    /// per batch of input): in the background, or, when PUBRECs of queued messages are
    /// among them, with their PUBRELs waiting for the commit, so that a new owner
    /// after a crash knows not to send the PUBLISH again.
    pub fn commit_acks(&mut self, world: &mut impl World) {
        if self.outbound_acks.is_empty() {
            return;
        }
        let (command, pubrecs) = self.take_acks();
        if pubrecs.is_empty() {
            world.act(Action::Detached(command));
        } else {
            let slot = self.wait_for(Awaited::PubRels(pubrecs));
            world.act(Action::Propose {
                command,
                refusable: false,
                slot: Some(slot),
            });
        }
    }

    /// At the connection's end: the acknowledgements not yet committed, as one
    /// command. (PUBRECs among them get their PUBRELs from the next connection, which
    /// resends every message awaiting PUBCOMP.)
    pub fn final_acks(&mut self) -> Option<Command> {
        if self.outbound_acks.is_empty() {
            return None;
        }
        Some(self.take_acks().0)
    }

    /// Deliveries that live only in this connection's memory (unacknowledged
    /// transient messages in flight and those waiting for room), for the session's
    /// queue or another member of their shared group once the connection ends.
    pub fn take_unsent(&mut self) -> Vec<Delivery> {
        self.window
            .drain()
            .into_iter()
            .filter_map(|(_, _, item)| match item {
                Outgoing::Transient(d) => Some(d),
                Outgoing::Queued(_) => None,
            })
            .chain(self.pending.drain(..))
            .collect()
    }

    // ----- from the node -----

    /// Send a delivery now (at `now_ms`, Unix milliseconds), or keep it until the
    /// inflight window has room.
    pub fn deliver(&mut self, d: Delivery, now_ms: u64, world: &mut impl World) {
        if d.message.is_expired(now_ms) {
            world.dropped("expired");
            return;
        }
        if !self.acl_allows_delivery(&d.message.topic, world) {
            return;
        }
        if d.qos == 0 {
            self.send_publish(&d, None, false, now_ms, world);
            return;
        }
        if !self.pending.is_empty() || !self.window.has_room() {
            if self.pending.len() >= world.config().max_queued_messages {
                world.dropped("queue_full");
                return;
            }
            self.pending.push_back(d);
            return;
        }
        self.send_transient(d, now_ms, world);
    }

    /// The session's replicated queue has new messages.
    pub fn queue_grew(&mut self, now_ms: u64, world: &mut impl World) {
        self.pump_queue(now_ms, world);
    }

    /// Another connection took the session over.
    pub fn taken_over(&mut self, world: &mut impl World) -> End {
        self.disconnect(ReasonCode::SessionTakenOver, world);
        End::TakenOver
    }

    /// The node closes the connection with `code` (an administrator's kick).
    pub fn kicked(&mut self, code: ReasonCode, world: &mut impl World) -> End {
        self.disconnect(code, world);
        End::Abrupt
    }

    /// The node is shutting down.
    pub fn shutting_down(&mut self, world: &mut impl World) -> End {
        self.disconnect(ReasonCode::ServerShuttingDown, world);
        End::Shutdown
    }

    // ----- inside -----

    /// A v5 client is told why the server closes the connection.
    fn disconnect(&mut self, code: ReasonCode, world: &mut impl World) {
        if self.version == ProtocolVersion::V5 {
            world.send(&Packet::Disconnect(Disconnect {
                reason_code: code,
                properties: DisconnectProperties::default(),
            }));
        }
    }

    /// A protocol violation: v5 clients are told why, then the connection closes.
    fn violation(&mut self, code: ReasonCode, what: &str, world: &mut impl World) -> Option<End> {
        tracing::info!(client_id = %self.client_id, reason = ?code, "{what}");
        metrics::counter!("flockmq_protocol_errors_total").increment(1);
        self.disconnect(code, world);
        Some(End::Abrupt)
    }

    /// A place at the end of the acknowledgement queue.
    fn wait_for(&mut self, awaited: Awaited) -> Slot {
        let slot = Slot(self.acks_head.wrapping_add(self.acks.len() as u32));
        self.acks.push_back(AckSlot::Waiting(awaited));
        slot
    }

    /// An acknowledgement ready now, sent once everything before it has gone.
    fn ready(&mut self, packet: Packet, world: &mut impl World) {
        if self.acks.is_empty() {
            world.send(&packet);
        } else {
            self.acks.push_back(AckSlot::Ready(packet, None));
        }
    }

    /// Send the acknowledgements at the head of the queue that are ready.
    fn flush_acks(&mut self, world: &mut impl World) -> Option<End> {
        loop {
            match self.acks.front() {
                Some(AckSlot::Ready(..) | AckSlot::PubRels(_)) => {}
                Some(AckSlot::Fail) => {
                    if self.version == ProtocolVersion::V5 {
                        self.disconnect(ReasonCode::UnspecifiedError, world);
                    }
                    return Some(End::Abrupt);
                }
                Some(AckSlot::Waiting(_)) | None => return None,
            }
            self.acks_head = self.acks_head.wrapping_add(1);
            match self.acks.pop_front() {
                Some(AckSlot::Ready(packet, then)) => {
                    world.send(&packet);
                    if let Some(action) = then {
                        world.act(*action);
                    }
                }
                Some(AckSlot::PubRels(ids)) => {
                    for id in ids {
                        world.send(&Packet::PubRel(PubRel::new(id, ReasonCode::Success)));
                    }
                }
                _ => unreachable!("checked above"),
            }
        }
    }

    /// Free inbound QoS 2 identifier `packet_id` here and in the replicated session.
    fn free_inbound_qos2(&mut self, packet_id: u16, world: &mut impl World) {
        if self.inbound_qos2.release(packet_id) && self.persistent {
            world.act(Action::Propose {
                command: self.release_command(packet_id),
                refusable: false,
                slot: None,
            });
        }
    }

    /// The acknowledgements received since the last time as one `Ack` command, and
    /// the packet identifiers of its PUBRECs (their PUBRELs wait for it).
    fn take_acks(&mut self) -> (Command, Vec<u16>) {
        let (mut completed, mut received, mut pubrecs) = (Vec::new(), Vec::new(), Vec::new());
        for (seq, pubrec) in std::mem::take(&mut self.outbound_acks) {
            match pubrec {
                None => completed.push(seq),
                Some(packet_id) => {
                    received.push(seq);
                    pubrecs.push(packet_id);
                }
            }
        }
        let cmd = Command::Ack {
            client_id: self.client_id.clone(),
            connection_id: self.connection_id,
            completed,
            received,
        };
        (cmd, pubrecs)
    }

    /// The command that frees inbound QoS 2 identifier `packet_id` in the replicated
    /// session.
    fn release_command(&self, packet_id: u16) -> Command {
        Command::InboundQos2 {
            client_id: self.client_id.clone(),
            connection_id: self.connection_id,
            received: vec![],
            released: vec![packet_id],
        }
    }

    fn send_transient(&mut self, d: Delivery, now_ms: u64, world: &mut impl World) {
        let Some(id) = self.window.allocate(Outgoing::Transient(d.clone())) else {
            self.pending.push_front(d);
            return;
        };
        if !self.send_publish(&d, Some(id), false, now_ms, world) {
            // Too large for the client: behave as if it was acknowledged.
            self.window.puback(id);
            self.window.pubrec(id);
            self.window.pubcomp(id);
        }
    }

    /// Send a PUBLISH; `false` if the client's Maximum Packet Size forbids it (the
    /// message is then dropped, as the spec requires [MQTT-3.1.2-25]).
    fn send_publish(
        &mut self,
        d: &Delivery,
        packet_id: Option<u16>,
        dup: bool,
        now_ms: u64,
        world: &mut impl World,
    ) -> bool {
        let m = &d.message;
        let v5 = self.version == ProtocolVersion::V5;
        let alias = self.out_aliases.plan(&m.topic);
        let (topic, topic_alias) = match alias {
            AliasUse::Topic => (m.topic.to_string(), None),
            AliasUse::Define(a) => (m.topic.to_string(), Some(a)),
            AliasUse::Reuse(a) => (String::new(), Some(a)),
        };
        let properties = if v5 {
            PublishProperties {
                payload_format_indicator: m.properties.payload_format_indicator,
                message_expiry_interval: m.remaining_expiry_secs(now_ms),
                topic_alias,
                response_topic: m.properties.response_topic.clone(),
                correlation_data: m.properties.correlation_data.clone(),
                user_properties: m.properties.user_properties.clone(),
                subscription_identifiers: d.subscription_ids.clone(),
                content_type: m.properties.content_type.clone(),
            }
        } else {
            PublishProperties::default()
        };
        let packet = Packet::Publish(Publish {
            dup,
            qos: QoS::try_from(d.qos).unwrap_or(QoS::AtMostOnce),
            retain: d.retain,
            topic,
            packet_id,
            properties,
            payload: m.payload.clone(),
        });
        if self.client_max_packet > 0
            && packet.encoded_len(self.version) > self.client_max_packet as usize
        {
            world.dropped("too_large");
            return false;
        }
        self.out_aliases.commit(&m.topic, alias);
        world.sent(m, d.qos);
        world.send(&packet);
        true
    }

    /// An outbound QoS 1/2 flow ended: trim the replicated queue or send what waits.
    fn outbound_done(&mut self, item: Outgoing, now_ms: u64, world: &mut impl World) {
        match item {
            Outgoing::Queued(seq) => {
                self.outbound_acks.push((seq, None));
                self.pump_queue(now_ms, world);
            }
            Outgoing::Transient(_) => {
                while self.window.has_room() {
                    let Some(d) = self.pending.pop_front() else {
                        break;
                    };
                    self.send_transient(d, now_ms, world);
                }
            }
        }
    }

    /// Send messages from the session's replicated queue while the window has room.
    ///
    /// A session resumed with an expiry of 0 is not persistent from now on, but it
    /// keeps the queue it had [MQTT-3.1.2-4]: it drains what was queued before it
    /// resumed (positions below `resend_below`); nothing is queued for it afterwards.
    fn pump_queue(&mut self, now_ms: u64, world: &mut impl World) {
        if !self.window.has_room() || (!self.persistent && self.queue_cursor >= self.resend_below) {
            return;
        }
        let batch = world.queued(&self.client_id, self.queue_cursor, QUEUE_BATCH);
        for q in batch {
            if !self.persistent && q.seq >= self.resend_below {
                break;
            }
            let id = SessionRecord::packet_id_for(q.seq);
            if self.window.contains(id) {
                // The id is still held by an older flow; wait for it to end.
                break;
            }
            self.queue_cursor = q.seq + 1;
            if q.message.is_expired(now_ms) || !self.acl_allows_delivery(&q.message.topic, world) {
                self.outbound_acks.push((q.seq, None));
                continue;
            }
            self.window
                .insert(id, OutboundState::AwaitingAck, Outgoing::Queued(q.seq));
            let d = Delivery {
                shared_group: None,
                message: q.message,
                qos: q.qos,
                retain: q.retain,
                subscription_ids: q.subscription_ids.into_inner(),
            };
            let dup = q.seq < self.resend_below;
            if !self.send_publish(&d, Some(id), dup, now_ms, world) {
                if let Some(item) = self.window.puback(id) {
                    self.outbound_done(item, now_ms, world);
                }
            }
            if !self.window.has_room() {
                break;
            }
        }
    }

    /// Whether the ACL lets the client subscribe to `filter`; a subscription that may
    /// match unreadable topics turns the per-delivery check on.
    fn acl_allows_subscription(&mut self, filter: &str, world: &mut impl World) -> bool {
        // Derived first from what is committed, so that the new subscription's flag is
        // not lost to a later derivation that does not see it yet.
        self.derive_acl(world);
        match world.subscribe_access(self.username.as_deref(), &self.client_id, filter) {
            SubscribeAccess::Denied => false,
            SubscribeAccess::Granted => true,
            SubscribeAccess::Filtered => {
                self.acl_filtered = true;
                true
            }
        }
    }

    /// Whether the ACL lets the client receive a message on `topic`: checked only for
    /// sessions with a subscription that may match unreadable topics (a delivered
    /// topic that is denied matches some subscription, which then overlaps the deny).
    fn acl_allows_delivery(&mut self, topic: &str, world: &mut impl World) -> bool {
        self.derive_acl(world);
        if !self.acl_filtered || world.may_read(self.username.as_deref(), &self.client_id, topic) {
            return true;
        }
        tracing::debug!(client_id = %self.client_id, %topic, "delivery withheld by the ACL");
        world.dropped("acl");
        false
    }

    /// Bring `acl_filtered` up to date with the rules in force (after a connect, a
    /// resume from the parking lot or a reload) from the session's subscriptions.
    fn derive_acl(&mut self, world: &mut impl World) {
        let (generation, has_acl) = world.acl_generation();
        if self.acl_generation == generation {
            return;
        }
        self.acl_generation = generation;
        self.acl_filtered = false;
        if !has_acl {
            return;
        }
        let filters = world.subscriptions(&self.client_id);
        self.acl_filtered = filters.iter().any(|filter| {
            let filter = mqtt::topic::parse_shared(filter).map_or(filter.as_str(), |(_, f)| f);
            // A subscription the rules in force would refuse: every message is checked.
            world.subscribe_access(self.username.as_deref(), &self.client_id, filter)
                != SubscribeAccess::Granted
        });
    }
}

/// The SUBACK's reason codes: `codes` holds each filter's refusal (or `None` for the
/// filters in `entries`, granted once committed); `existed` is the commit's answer.
fn subscribe_reason_codes(
    codes: &[Option<ReasonCode>],
    v5: bool,
    entries: &[(String, SubscriptionOptions)],
    existed: Option<&[bool]>,
) -> Vec<ReasonCode> {
    let mut granted = entries.iter();
    // Called once per SUBSCRIBE, with its final outcome: counted here, per filter.
    for c in codes {
        let result = match c {
            None if existed.is_some() => "granted",
            None => "failed",
            Some(ReasonCode::NotAuthorized) => "denied",
            Some(ReasonCode::QuotaExceeded) => "quota_exceeded",
            Some(_) => "invalid",
        };
        metrics::counter!("flockmq_subscribe_filters_total", "result" => result).increment(1);
    }
    codes
        .iter()
        .map(|c| match c {
            Some(code) if v5 => *code,
            Some(_) => ReasonCode::UnspecifiedError,
            None if existed.is_none() => ReasonCode::UnspecifiedError,
            None => match granted.next().map(|(_, o)| o.qos) {
                Some(0) => ReasonCode::GrantedQoS0,
                Some(1) => ReasonCode::GrantedQoS1,
                _ => ReasonCode::GrantedQoS2,
            },
        })
        .collect()
}

/// The packet's name, for logs.
pub fn packet_kind(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}

#[cfg(test)]
mod tests;
