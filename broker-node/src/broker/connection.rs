//! One client connection, from CONNECT to the end: the task that owns the client's
//! session while it is connected.
//!
//! It reads and decodes packets, drives the protocol state of `session` (inflight
//! window, keep alive, aliases, inbound QoS 2), submits control-plane changes through
//! the proposer, dispatches publishes and writes everything it has to send in batches.
//! It is generic over the byte stream, so TCP, TLS and WebSocket share it, and it never
//! holds a lock across an `.await`.
//!
//! Acknowledgements to a publisher (PUBACK/PUBREC) wait until every local queue took
//! the message and, for persistent sessions, the replicated queue append is committed
//! (DESIGN invariant 1); they go out in the order the publishes arrived.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use futures::stream::FuturesOrdered;
use futures::{Future, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dispatch::wait_forwarded;
use super::{unix_ms, Broker, ConnHandle, ConnMsg, Delivery, Stats};
use crate::cluster::command::{
    Command, CommandResult, InboundRecord, Message, MessageProperties, Will,
};
use crate::cluster::state::SessionRecord;
use crate::mqtt::{
    self, ConnAck, ConnAckProperties, Connect, Disconnect, DisconnectProperties, Packet,
    ProtocolVersion, PubAck, PubComp, PubRec, PubRel, Publish, PublishProperties, QoS, ReasonCode,
    SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::session::{
    AliasUse, InboundAliases, InboundQos2, KeepAlive, OutboundAliases, OutboundState,
    OutboundWindow,
};
use crate::telemetry;
use crate::transport::{Admitted, ClientStream, Vouched};
use tokio::net::TcpStream;

/// Capacity of the channel through which the node hands deliveries to a connection.
const CHANNEL_CAPACITY: usize = 1024;

/// How a connection ended, deciding whether the will is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
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
enum Outgoing {
    /// Delivered from the node directly (clean sessions): kept for a resend.
    Transient(Delivery),
    /// Delivered from the session's replicated queue at this position.
    Queued(u64),
}

type AckFuture = Pin<Box<dyn Future<Output = AckOutcome> + Send>>;

/// Acknowledgements waiting for their commands, in arrival order. The queue exists
/// only while something waits: an idle connection holds none (its shared parts are
/// allocated by `FuturesOrdered::new`).
#[derive(Default)]
struct PendingAcks(Option<FuturesOrdered<AckFuture>>);

impl PendingAcks {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(FuturesOrdered::is_empty)
    }

    fn push_back(&mut self, ack: AckFuture) {
        self.0
            .get_or_insert_with(FuturesOrdered::new)
            .push_back(ack);
    }

    /// The next acknowledgement in order, once ready.
    async fn next(&mut self) -> Option<AckOutcome> {
        let queue = self.0.as_mut()?;
        let next = queue.next().await;
        if queue.is_empty() {
            self.0 = None;
        }
        next
    }
}

/// What an awaited acknowledgement resolved to.
enum AckOutcome {
    /// Send this packet.
    Send(Box<Packet>),
    /// Send this SUBACK, then these retained messages.
    SubAck(Box<Packet>, Vec<Delivery>),
    /// Free this inbound QoS 2 packet identifier (its publish was not committed, and
    /// the PUBREC that follows says so), then send the packet.
    Release(u16, Box<Packet>),
    /// Send these packets (PUBRELs whose PUBREC is committed).
    Packets(Vec<Packet>),
    /// The message could not be committed: close (v3.1.1 has no way to say so).
    Fail,
}

/// Serve one client over `stream`, accepted on the listener named `listener`, until it
/// disconnects or the node shuts down (or until its connection is parked: see
/// [`super::park`]). `admitted` is its place under the connection limit, held for as
/// long as the connection lives.
pub async fn serve<S>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    listener: &'static str,
    vouched: Vouched,
    admitted: Admitted,
) where
    S: ClientStream,
{
    let mut conn = Connection {
        stream,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        broker: broker.clone(),
        peer,
        listener,
        vouched,
    };
    let connect_timeout = broker.config.mqtt.connect_timeout;
    let connect = match tokio::time::timeout(connect_timeout, conn.read_connect()).await {
        Ok(Some(connect)) => connect,
        Ok(None) => return,
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time, closing");
            metrics::counter!("flockmq_connect_timeouts_total").increment(1);
            return;
        }
    };
    let tally = Tally::new(&broker, listener, connect.protocol, admitted);
    // Establishing the session takes KiBs of future state (the CONNECT, its proposals)
    // that the long-lived part must not carry for hours: boxed, and freed once the
    // session runs.
    let Some((session, connection_id)) = Box::pin(conn.establish(connect)).await else {
        return;
    };
    conn.live(session, connection_id, tally).await;
}

/// Resume a parked connection (see [`super::park`]) in a task of its own.
pub async fn resume(broker: Arc<Broker>, parked: Box<Parked>) {
    let (session, socket, connection_id, tally) = parked.unpark(&broker.config.mqtt);
    // Not kept while parked (32 bytes a connection): the socket knows it, unless the
    // client has gone, and then only log lines would show it.
    let peer = socket
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    match TcpStream::from_socket(socket) {
        Ok(stream) => {
            let conn = Connection {
                stream,
                rbuf: BytesMut::new(),
                wbuf: BytesMut::new(),
                broker,
                peer,
                listener: PARKED_LISTENER,
                vouched: Vouched::Nothing,
            };
            conn.live(session, connection_id, tally).await;
        }
        Err(e) => {
            tracing::warn!(client_id = %session.client_id, error = %e, "cannot resume a parked connection");
            Box::pin(end_session(&broker, session, connection_id, End::Abrupt)).await;
            drop(tally);
        }
    }
}

/// A connected client in the node's counts (`$SYS` clients, the connections gauge, the
/// connection limit), given back when dropped by whichever task ends the connection:
/// its own, or the one that resumed it from the parking lot.
struct Tally {
    broker: Arc<Broker>,
    _admitted: Admitted,
    /// Row and column of its `flockmq_connections` gauge ([`telemetry::connections`]).
    listener: u8,
    protocol: u8,
}

impl Tally {
    fn new(
        broker: &Arc<Broker>,
        listener: &'static str,
        protocol: ProtocolVersion,
        admitted: Admitted,
    ) -> Tally {
        Stats::add(&broker.stats.clients_connected, 1);
        let listener = telemetry::LISTENERS
            .iter()
            .position(|l| *l == listener)
            .unwrap_or(0) as u8;
        let protocol = telemetry::PROTOCOLS
            .iter()
            .position(|p| *p == protocol_label(protocol))
            .unwrap_or(0) as u8;
        telemetry::connections(listener.into(), protocol.into()).increment(1.0);
        Tally {
            broker: broker.clone(),
            _admitted: admitted,
            listener,
            protocol,
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        Stats::sub(&self.broker.stats.clients_connected, 1);
        telemetry::connections(self.listener.into(), self.protocol.into()).decrement(1.0);
    }
}

/// [`Session::acl_generation`] before anything was derived.
const ACL_UNKNOWN: u32 = u32::MAX;

/// Only plain TCP connections are parked.
const PARKED_LISTENER: &str = "tcp";

/// A parked connection: its socket and what its session needs to go on, without a
/// task, buffers or timers (see [`super::park`]). Only what a session [at
/// rest](Session::at_rest) holds, flat, so that the record fits jemalloc's 128-byte
/// class (a test below keeps it there): no inflight window, no pending acknowledgements,
/// no waiting deliveries, no expiry update (that comes with a DISCONNECT, which ends
/// the connection).
pub struct Parked {
    socket: std::net::TcpStream,
    connection_id: u64,
    tally: Tally,
    client_id: Arc<str>,
    username: Option<Arc<str>>,
    rx: super::mailbox::Receiver<ConnMsg>,
    /// [`KeepAlive::compact`]'s form.
    last_seen_ms: u64,
    keep_alive_ms: u32,
    queue_cursor: u64,
    resend_below: u64,
    /// Topic aliases and inbound QoS 2 identifiers, when there are any.
    kept: Option<Box<(InboundAliases, InboundQos2)>>,
    connect_expiry: u32,
    client_max_packet: u32,
    window_size: u32,
    /// The outbound topic aliases' maximum (the table itself is forgotten).
    out_alias_max: u16,
    version: ProtocolVersion,
    persistent: bool,
}

impl Parked {
    /// The socket, in non-blocking mode.
    pub fn socket(&self) -> &std::net::TcpStream {
        &self.socket
    }

    fn keep_alive(&self) -> KeepAlive {
        KeepAlive::from_compact(self.last_seen_ms, self.keep_alive_ms)
    }

    /// A packet from the client arrived at `now` (a PINGREQ answered by the lot).
    pub fn seen(&mut self, now: Instant) {
        let mut keep_alive = self.keep_alive();
        keep_alive.seen(now);
        (self.last_seen_ms, self.keep_alive_ms) = keep_alive.compact();
    }

    /// Whether the client has been silent longer than its keep alive allows.
    pub fn keep_alive_expired(&self, now: Instant) -> bool {
        self.keep_alive().expired(now)
    }

    /// Wake `waker` when the connection's mailbox receives something.
    pub fn wake_on_mail(&self, waker: std::task::Waker) {
        self.rx.wake_on_arrival(waker);
    }

    /// The session back, with the socket, the connection id and the tally.
    fn unpark(
        self,
        cfg: &crate::config::MqttConfig,
    ) -> (Box<Session>, std::net::TcpStream, u64, Tally) {
        let keep_alive = self.keep_alive();
        let (aliases, inbound_qos2) = match self.kept {
            Some(kept) => *kept,
            None => (
                InboundAliases::new(if self.version == ProtocolVersion::V5 {
                    cfg.topic_alias_maximum
                } else {
                    0
                }),
                InboundQos2::default(),
            ),
        };
        let session = Box::new(Session {
            client_id: self.client_id,
            connection_id: self.connection_id,
            username: self.username,
            version: self.version,
            persistent: self.persistent,
            connect_expiry: self.connect_expiry,
            expiry_update: None,
            keep_alive,
            aliases,
            out_aliases: OutboundAliases::new(self.out_alias_max, self.out_alias_max),
            acl_filtered: false,
            acl_generation: ACL_UNKNOWN,
            inbound_qos2,
            inbound_qos1_pending: 0,
            window: OutboundWindow::new(self.window_size as usize),
            inflight_counted: 0,
            pending: VecDeque::new(),
            queue_cursor: self.queue_cursor,
            resend_below: self.resend_below,
            client_max_packet: self.client_max_packet,
            acks: PendingAcks::default(),
            acks_completed: Vec::new(),
            pubrecs: Vec::new(),
            rx: self.rx,
        });
        (session, self.socket, self.connection_id, self.tally)
    }
}

impl Session {
    /// Whether nothing is in flight, buffered or waiting, so that the session can be
    /// parked.
    fn at_rest(&self) -> bool {
        self.inbound_qos1_pending == 0
            && self.window.is_empty()
            && self.pending.is_empty()
            && self.acks.is_empty()
            && self.acks_completed.is_empty()
            && self.pubrecs.is_empty()
            && self.expiry_update.is_none()
            && self.rx.is_empty()
    }

    /// The parked form of a session [at rest](Session::at_rest).
    fn park(self, socket: std::net::TcpStream, connection_id: u64, tally: Tally) -> Parked {
        debug_assert!(self.at_rest());
        let kept = (!self.aliases.is_empty() || !self.inbound_qos2.is_empty())
            .then(|| Box::new((self.aliases, self.inbound_qos2)));
        let (last_seen_ms, keep_alive_ms) = self.keep_alive.compact();
        Parked {
            socket,
            connection_id,
            tally,
            client_id: self.client_id,
            username: self.username,
            rx: self.rx,
            last_seen_ms,
            keep_alive_ms,
            queue_cursor: self.queue_cursor,
            resend_below: self.resend_below,
            kept,
            connect_expiry: self.connect_expiry,
            client_max_packet: self.client_max_packet,
            window_size: u32::try_from(self.window.capacity()).unwrap_or(u32::MAX),
            out_alias_max: self.out_aliases.maximum(),
            version: self.version,
            persistent: self.persistent,
        }
    }
}

fn protocol_label(version: ProtocolVersion) -> &'static str {
    match version {
        ProtocolVersion::V3_1 => "3.1",
        ProtocolVersion::V3_1_1 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

struct Connection<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    broker: Arc<Broker>,
    peer: SocketAddr,
    /// The listener it came in on ("tcp", "tls", "ws" or "wss").
    listener: &'static str,
    vouched: Vouched,
}

/// The state of an established session on this connection.
struct Session {
    client_id: Arc<str>,
    /// This connection, named in its commands: the state machine ignores them once
    /// another connection owns the session (DESIGN invariant 8).
    connection_id: u64,
    /// The authenticated username, for ACL checks.
    username: Option<Arc<str>>,
    version: ProtocolVersion,
    persistent: bool,
    /// Session expiry as requested at CONNECT (v5), to validate a DISCONNECT update.
    connect_expiry: u32,
    expiry_update: Option<u32>,
    keep_alive: KeepAlive,
    aliases: InboundAliases,
    /// Topic aliases this broker assigned towards the client.
    out_aliases: OutboundAliases,
    /// Whether a subscription may match topics the ACL keeps from this client, so that
    /// every delivery is checked ([`crate::auth::acl::SubscribeAccess::Filtered`]).
    acl_filtered: bool,
    /// The ACL generation `acl_filtered` was derived under ([`ACL_UNKNOWN`]: not yet).
    acl_generation: u32,
    inbound_qos2: InboundQos2,
    /// QoS 1 publishes whose PUBACK is not yet sent.
    inbound_qos1_pending: usize,
    window: OutboundWindow<Outgoing>,
    /// The window's size as last added to the node's inflight count.
    inflight_counted: usize,
    /// Transient QoS 1/2 deliveries waiting for room in the window.
    pending: VecDeque<Delivery>,
    /// Next replicated-queue position to consider sending.
    queue_cursor: u64,
    /// Queue positions below this were possibly sent before: resend them with DUP.
    resend_below: u64,
    /// The client's Maximum Packet Size (v5), 0 if unlimited.
    client_max_packet: u32,
    acks: PendingAcks,
    acks_completed: Vec<u64>,
    /// PUBRECs of queued messages (queue position, packet id) to commit; their
    /// PUBRELs wait for it.
    pubrecs: Vec<(u64, u16)>,
    rx: super::mailbox::Receiver<ConnMsg>,
}

impl<S> Connection<S>
where
    S: ClientStream,
{
    /// Read bytes into the read buffer; `false` at end of stream or on error.
    async fn fill(&mut self) -> bool {
        if self.rbuf.capacity() == 0 {
            // Idle: take a buffer only once there is something to read.
            self.stream.read_ready().await;
        }
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            self.rbuf.reserve(4096);
        }
        match self.stream.read_buf(&mut self.rbuf).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                Stats::add(&self.broker.stats.bytes_received, n as u64);
                telemetry::hot().bytes_received.increment(n as u64);
                true
            }
        }
    }

    async fn flush(&mut self) -> bool {
        if self.wbuf.is_empty() {
            return true;
        }
        let n = self.wbuf.len();
        // Flushing matters for streams that buffer (a WebSocket frames each write);
        // on a TCP socket it costs nothing.
        let ok =
            self.stream.write_all(&self.wbuf).await.is_ok() && self.stream.flush().await.is_ok();
        self.wbuf.clear();
        if self.wbuf.capacity() > 64 * 1024 {
            // Do not keep a large buffer around after a burst.
            self.wbuf = BytesMut::new();
        }
        Stats::add(&self.broker.stats.bytes_sent, n as u64);
        telemetry::hot().bytes_sent.increment(n as u64);
        ok
    }

    fn queue_packet(&mut self, packet: &Packet, version: ProtocolVersion) {
        if let Err(e) = mqtt::encode(packet, version, &mut self.wbuf) {
            tracing::warn!(peer = %self.peer, error = %e, "cannot encode packet");
        }
    }

    /// Wait for the CONNECT packet; answers refusals itself and returns `None` then.
    async fn read_connect(&mut self) -> Option<Box<Connect>> {
        let max = self.broker.config.mqtt.max_packet_size;
        loop {
            match mqtt::decode(&mut self.rbuf, None, max) {
                Ok(Some(Packet::Connect(connect))) => return Some(connect),
                Ok(Some(other)) => {
                    tracing::debug!(peer = %self.peer, packet = ?packet_kind(&other), "first packet is not CONNECT");
                    metrics::counter!("flockmq_decode_errors_total").increment(1);
                    return None;
                }
                Ok(None) => {
                    if !self.fill().await {
                        return None;
                    }
                }
                Err(e) => {
                    metrics::counter!("flockmq_decode_errors_total").increment(1);
                    tracing::info!(peer = %self.peer, error = %e, "bad CONNECT");
                    if let Some((version, code)) = e.connack_refusal() {
                        self.refuse(version, code).await;
                    }
                    return None;
                }
            }
        }
    }

    /// Answer CONNACK with the refusal `code`: no session is established (`None`).
    async fn refuse(
        &mut self,
        version: ProtocolVersion,
        code: ReasonCode,
    ) -> Option<(Box<Session>, u64)> {
        self.refuse_with(version, code, ConnAckProperties::default())
            .await
    }

    /// [`Self::refuse`] with CONNACK properties (a v5 Server Reference).
    async fn refuse_with(
        &mut self,
        version: ProtocolVersion,
        code: ReasonCode,
        properties: ConnAckProperties,
    ) -> Option<(Box<Session>, u64)> {
        metrics::counter!("flockmq_connack_total", "reason" => reason_label(code)).increment(1);
        let connack = Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: code,
            properties,
        });
        self.queue_packet(&connack, version);
        self.flush().await;
        None
    }

    /// Authenticate, open the session through the cluster, answer CONNACK and build
    /// the connection's session state; `None` once a refusal has been answered.
    async fn establish(&mut self, connect: Box<Connect>) -> Option<(Box<Session>, u64)> {
        let broker = self.broker.clone();
        let cfg = &broker.config.mqtt;
        let version = connect.protocol;
        let v5 = version == ProtocolVersion::V5;

        // Client identifier rules [MQTT-3.1.3-6..9].
        let mut assigned = None;
        let client_id: Arc<str> = if connect.client_id.is_empty() {
            if v5 || (version == ProtocolVersion::V3_1_1 && connect.clean_start) {
                let id = format!("flockmq-{:016x}", rand::random::<u64>());
                assigned = Some(id.clone());
                Arc::from(id)
            } else {
                return self
                    .refuse(version, ReasonCode::ClientIdentifierNotValid)
                    .await;
            }
        } else {
            Arc::from(connect.client_id.as_str())
        };

        if connect.properties.authentication_method.is_some() {
            return self
                .refuse(version, ReasonCode::BadAuthenticationMethod)
                .await;
        }
        // An address with recent failures waits before its credentials are checked.
        let Some(attempt) = broker.auth.failures.begin(self.peer.ip(), Instant::now()) else {
            metrics::counter!("flockmq_auth_failures_total").increment(1);
            tracing::info!(client_id = %client_id, peer = %self.peer, "connection refused unchecked: too many attempts under way from a failing address");
            return self.refuse(version, ReasonCode::NotAuthorized).await;
        };
        if !attempt.wait.is_zero() {
            tokio::time::sleep(attempt.wait).await;
        }
        let authenticated = match &self.vouched {
            Vouched::Nothing => broker.auth.authenticate(&connect, self.listener),
            Vouched::CertificateUser(Some(name)) => Ok(Some(name.clone())),
            Vouched::CertificateUser(None) => {
                tracing::info!(client_id = %client_id, peer = %self.peer, "connection refused: no client certificate with a name to use as the username");
                Err(ReasonCode::NotAuthorized)
            }
        };
        let username: Option<Arc<str>> = match authenticated {
            Ok(username) => username,
            Err(code) => {
                metrics::counter!("flockmq_auth_failures_total").increment(1);
                attempt.failed(Instant::now());
                return self.refuse(version, code).await;
            }
        };
        drop(attempt);

        // The will, validated like any publish.
        let will = match &connect.will {
            None => None,
            Some(w) => {
                if let Err(code) = broker.check_topic_limits(&w.topic) {
                    return self.refuse(version, code).await;
                }
                if !broker
                    .auth
                    .may_publish(username.as_deref(), &client_id, &w.topic)
                {
                    tracing::info!(client_id = %client_id, topic = %w.topic, "will refused by the ACL");
                    return self.refuse(version, ReasonCode::NotAuthorized).await;
                }
                if u8::from(w.qos) > cfg.max_qos {
                    return self.refuse(version, ReasonCode::QoSNotSupported).await;
                }
                if w.retain && !cfg.retain_available {
                    return self.refuse(version, ReasonCode::RetainNotSupported).await;
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

        let connection_id = broker.next_connection_id();
        let (tx, rx) = super::mailbox::channel(CHANNEL_CAPACITY);
        if let Some(old) = broker.register(client_id.clone(), ConnHandle { connection_id, tx }) {
            let _ = old.tx.try_send(ConnMsg::TakenOver);
        }

        broker.set_establishing(connection_id, true);
        let opened = Box::pin(broker.proposer.propose_refusable(Command::OpenSession {
            client_id: client_id.clone(),
            node: broker.node_id,
            connection_id,
            protocol: version.level(),
            clean_start: connect.clean_start,
            expiry_secs,
            will,
            now_ms: unix_ms(),
        }))
        .await;
        broker.set_establishing(connection_id, false);
        let session_present = match opened {
            Ok(CommandResult::SessionOpened { session_present }) => session_present,
            Ok(other) => {
                tracing::error!(?other, "unexpected result of OpenSession");
                broker.unregister(&client_id, connection_id);
                return self.refuse(version, ReasonCode::UnspecifiedError).await;
            }
            Err(e) => {
                tracing::warn!(client_id = %client_id, error = %e, "cannot open session");
                broker.unregister(&client_id, connection_id);
                broker.remember_refused_open(connection_id);
                // Cut off from the majority: a v5 client may be sent to a node that can
                // serve it (DESIGN invariant 6 allows 0x9C as well as 0x88).
                let reference = match e {
                    crate::cluster::proposer::ProposeError::Unavailable(_) if v5 => {
                        broker.server_reference()
                    }
                    _ => None,
                };
                return match reference {
                    Some(addr) => {
                        let properties = ConnAckProperties {
                            server_reference: Some(addr),
                            ..ConnAckProperties::default()
                        };
                        self.refuse_with(version, ReasonCode::UseAnotherServer, properties)
                            .await
                    }
                    None => self.refuse(version, ReasonCode::ServerUnavailable).await,
                };
            }
        };

        let mut props = ConnAckProperties::default();
        if v5 {
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
            if keep_alive_secs != connect.keep_alive {
                props.server_keep_alive = Some(keep_alive_secs);
            }
            if expiry_secs != requested_expiry {
                props.session_expiry_interval = Some(expiry_secs);
            }
            props.assigned_client_identifier = assigned;
        }
        self.queue_packet(
            &Packet::ConnAck(ConnAck {
                session_present,
                reason_code: ReasonCode::Success,
                properties: props,
            }),
            version,
        );
        metrics::counter!("flockmq_connack_total", "reason" => "success").increment(1);
        tracing::debug!(client_id = %client_id, peer = %self.peer, ?version, session_present, "client connected");

        let client_receive_max = if v5 {
            connect.properties.receive_maximum.unwrap_or(65_535)
        } else {
            65_535
        };
        let window_size = usize::from(client_receive_max).min(cfg.max_inflight);
        let resend_below = broker.read_state(|s| {
            s.session(&client_id)
                .map(|r| r.next_seq)
                .unwrap_or_default()
        });
        let mut session = Session {
            client_id: client_id.clone(),
            connection_id,
            username,
            version,
            persistent: expiry_secs > 0,
            connect_expiry: expiry_secs,
            expiry_update: None,
            keep_alive: KeepAlive::new(keep_alive_secs, Instant::now()),
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
            inbound_qos2: broker.inbound_qos2_of(&client_id, session_present),
            inbound_qos1_pending: 0,
            window: OutboundWindow::new(window_size),
            inflight_counted: 0,
            pending: VecDeque::new(),
            queue_cursor: 0,
            resend_below,
            client_max_packet: connect.properties.maximum_packet_size.unwrap_or(0),
            acks: PendingAcks::default(),
            acks_completed: Vec::new(),
            pubrecs: Vec::new(),
            rx,
        };
        if session_present {
            self.resend_awaiting_pubcomp(&mut session);
        }
        self.pump_queue(&mut session);

        Some((Box::new(session), connection_id))
    }

    /// Drive an established session until it ends, parking it whenever it has been
    /// idle for `mqtt.park_after`.
    /// The session is boxed: passed by value, it would sit in the caller's future as
    /// well as in this one (about 400 bytes twice for every connection).
    async fn live(mut self, mut session: Box<Session>, connection_id: u64, mut tally: Tally) {
        let end = loop {
            let end = self.session_loop(&mut session).await;
            if end != End::Idle {
                break end;
            }
            let socket = match self.stream.into_socket() {
                Err(stream) => {
                    self.stream = stream;
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(client_id = %session.client_id, error = %e, "cannot park a connection");
                    Stats::sub(
                        &self.broker.stats.messages_inflight,
                        session.inflight_counted as u64,
                    );
                    Box::pin(end_session(
                        &self.broker,
                        session,
                        connection_id,
                        End::Abrupt,
                    ))
                    .await;
                    return;
                }
                Ok(Ok(socket)) => socket,
            };
            let parked = Box::new((*session).park(socket, connection_id, tally));
            match self.broker.lot.park(parked) {
                Ok(()) => return,
                Err(parked) => {
                    // The node is shutting down (or the socket cannot be watched): go
                    // on here.
                    let socket;
                    (session, socket, _, tally) = parked.unpark(&self.broker.config.mqtt);
                    match S::from_socket(socket) {
                        Ok(stream) => self.stream = stream,
                        Err(e) => {
                            tracing::warn!(client_id = %session.client_id, error = %e, "cannot resume a connection");
                            Box::pin(end_session(
                                &self.broker,
                                session,
                                connection_id,
                                End::Abrupt,
                            ))
                            .await;
                            return;
                        }
                    }
                }
            }
        };
        Stats::sub(
            &self.broker.stats.messages_inflight,
            session.inflight_counted as u64,
        );
        // Whatever the loop queued last (a DISCONNECT with its reason) goes out now.
        self.flush().await;
        Box::pin(end_session(&self.broker, session, connection_id, end)).await;
        drop(tally);
    }
    /// Bring the node's inflight count up to date with this session's window.
    fn count_inflight(&self, s: &mut Session) {
        let now = s.window.len();
        if now != s.inflight_counted {
            let counter = &self.broker.stats.messages_inflight;
            if now > s.inflight_counted {
                Stats::add(counter, (now - s.inflight_counted) as u64);
            } else {
                Stats::sub(counter, (s.inflight_counted - now) as u64);
            }
            s.inflight_counted = now;
        }
    }

    async fn session_loop(&mut self, s: &mut Session) -> End {
        let shutdown = self.broker.shutdown.clone();
        // Parking: plain TCP only, unless switched off.
        let park_after =
            Some(self.broker.config.mqtt.park_after).filter(|d| S::PARKABLE && !d.is_zero());
        let mut active_at = Instant::now();
        // Packets that arrived with the CONNECT (clients pipeline a SUBSCRIBE or a
        // PUBLISH behind it without waiting for CONNACK) are already in the buffer:
        // handle them now, not once the client happens to send more.
        if !self.rbuf.is_empty() {
            if let Some(end) = Box::pin(self.decode_all(s)).await {
                return end;
            }
        }
        loop {
            self.count_inflight(s);
            if !self.flush().await {
                return End::Abrupt;
            }
            if self.rbuf.is_empty() && self.rbuf.capacity() > 0 && s.acks.is_empty() {
                // An idle connection holds no read buffer, nor a write buffer (the
                // flush above emptied it). Freed at once rather than after a quiet
                // spell: freeing later lets thousands of connections hold buffers at
                // the same moment, and the allocator keeps that peak (idle RSS per
                // connection went from 5.0 to 9.0 KB with a 250 ms delay).
                self.rbuf = BytesMut::new();
                if self.wbuf.is_empty() {
                    self.wbuf = BytesMut::new();
                }
                s.rx.release();
            }
            let park_at = park_after.map(|after| active_at + after);
            let deadline = match (s.keep_alive.deadline(), park_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.disconnect(s.version, ReasonCode::ServerShuttingDown);
                    self.flush().await;
                    return End::Shutdown;
                }
                Some(outcome) = s.acks.next(), if !s.acks.is_empty() => {
                    active_at = Instant::now();
                    match outcome {
                        AckOutcome::Send(packet) => {
                            if let Packet::PubAck(_) = *packet {
                                s.inbound_qos1_pending -= 1;
                            }
                            self.queue_packet(&packet, s.version);
                        }
                        AckOutcome::Release(packet_id, packet) => {
                            if s.inbound_qos2.release(packet_id) && s.persistent {
                                // It may be recorded in the replicated session too:
                                // released there before any later command of this
                                // connection (a PUBLISH reusing the identifier) is
                                // submitted. Boxed: rare, and kept out of the idle
                                // connection's future.
                                let cmd = s.release_command(packet_id);
                                if Box::pin(self.broker.proposer.submit(cmd)).await.is_err() {
                                    return End::Shutdown;
                                }
                            }
                            self.queue_packet(&packet, s.version);
                        }
                        AckOutcome::Packets(packets) => {
                            for packet in &packets {
                                self.queue_packet(packet, s.version);
                            }
                        }
                        AckOutcome::SubAck(packet, retained) => {
                            self.queue_packet(&packet, s.version);
                            for d in retained {
                                self.deliver(s, d);
                            }
                        }
                        AckOutcome::Fail => {
                            if s.version == ProtocolVersion::V5 {
                                self.disconnect(s.version, ReasonCode::UnspecifiedError);
                            }
                            return End::Abrupt;
                        }
                    }
                }
                msg = s.rx.recv() => {
                    active_at = Instant::now();
                    let Some(msg) = msg else { return End::Abrupt };
                    if let Some(end) = self.on_message(s, msg) {
                        return end;
                    }
                    // Drain what else is ready so that it leaves in one write.
                    for _ in 0..256 {
                        let Some(msg) = s.rx.try_recv() else { break };
                        if let Some(end) = self.on_message(s, msg) {
                            return end;
                        }
                    }
                }
                filled = self.fill() => {
                    if !filled {
                        return End::Abrupt;
                    }
                    active_at = Instant::now();
                    s.keep_alive.seen(active_at);
                    // Boxed: handling packets (proposals, forwarding) needs KiBs of
                    // future state that an idle connection should not carry inline.
                    if let Some(end) = Box::pin(self.decode_all(s)).await {
                        return end;
                    }
                }
                _ = sleep => {
                    let now = Instant::now();
                    if s.keep_alive.expired(now) {
                        tracing::info!(client_id = %s.client_id, "keep alive timeout");
                        metrics::counter!("flockmq_keepalive_timeouts_total").increment(1);
                        self.disconnect(s.version, ReasonCode::KeepAliveTimeout);
                        self.flush().await;
                        return End::Abrupt;
                    }
                    if park_at.is_some_and(|at| now >= at) {
                        if self.rbuf.is_empty() && self.wbuf.is_empty() && s.at_rest() {
                            return End::Idle;
                        }
                        // Busy after all (a client that does not acknowledge): look
                        // again after another spell.
                        active_at = now;
                    }
                }
            }
            if s.pubrecs.is_empty() {
                commit_acks(&self.broker, s);
            } else {
                // Boxed: an idle connection's future must not carry this one inline.
                Box::pin(self.commit_acks_before_pubrel(s)).await;
            }
        }
    }

    fn disconnect(&mut self, version: ProtocolVersion, code: ReasonCode) {
        if version == ProtocolVersion::V5 {
            self.queue_packet(
                &Packet::Disconnect(Disconnect {
                    reason_code: code,
                    properties: DisconnectProperties::default(),
                }),
                version,
            );
        }
    }

    /// A protocol violation: v5 clients are told why, then the connection closes.
    fn violation(&mut self, s: &Session, code: ReasonCode, what: &str) -> Option<End> {
        tracing::info!(client_id = %s.client_id, reason = ?code, "{what}");
        metrics::counter!("flockmq_protocol_errors_total").increment(1);
        self.disconnect(s.version, code);
        Some(End::Abrupt)
    }

    fn on_message(&mut self, s: &mut Session, msg: ConnMsg) -> Option<End> {
        match msg {
            ConnMsg::Deliver(d) => {
                self.deliver(s, *d);
                None
            }
            ConnMsg::QueueGrew => {
                self.pump_queue(s);
                None
            }
            ConnMsg::TakenOver => {
                self.disconnect(s.version, ReasonCode::SessionTakenOver);
                Some(End::TakenOver)
            }
            ConnMsg::Disconnect(code) => {
                let code = ReasonCode::try_from(code).unwrap_or(ReasonCode::AdministrativeAction);
                self.disconnect(s.version, code);
                Some(End::Abrupt)
            }
        }
    }

    async fn decode_all(&mut self, s: &mut Session) -> Option<End> {
        let max = self.broker.config.mqtt.max_packet_size;
        loop {
            match mqtt::decode(&mut self.rbuf, Some(s.version), max) {
                Ok(Some(packet)) => {
                    telemetry::hot().packets_received.increment(1);
                    if let Some(end) = self.on_packet(s, packet).await {
                        return Some(end);
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    metrics::counter!("flockmq_decode_errors_total").increment(1);
                    let code = e.reason_code();
                    return self.violation(s, code, &format!("bad packet: {e}"));
                }
            }
        }
    }

    async fn on_packet(&mut self, s: &mut Session, packet: Packet) -> Option<End> {
        match packet {
            Packet::Publish(p) => self.on_publish(s, p).await,
            Packet::PubAck(a) => {
                if let Some(item) = s.window.puback(a.packet_id) {
                    self.outbound_done(s, item);
                }
                None
            }
            Packet::PubRec(r) => {
                let failed = r.reason_code.is_error();
                if let Some(Outgoing::Queued(seq)) = s.window.pubrec(r.packet_id) {
                    if !failed {
                        // PUBREL once this is committed (see `commit_acks`).
                        s.pubrecs.push((*seq, r.packet_id));
                        return None;
                    }
                }
                if failed {
                    // A PUBREC with an error ends the QoS 2 flow [MQTT-4.3.3].
                    if s.window.pubrec(r.packet_id).is_some() {
                        if let Some(item) = s.window.pubcomp(r.packet_id) {
                            self.outbound_done(s, item);
                        }
                    }
                    return None;
                }
                self.queue_packet(
                    &Packet::PubRel(PubRel::new(r.packet_id, ReasonCode::Success)),
                    s.version,
                );
                None
            }
            Packet::PubComp(c) => {
                if let Some(item) = s.window.pubcomp(c.packet_id) {
                    self.outbound_done(s, item);
                } else if let Some(seq) = self.awaiting_pubcomp_seq(s, c.packet_id) {
                    s.acks_completed.push(seq);
                }
                None
            }
            Packet::PubRel(r) => {
                let known = s.inbound_qos2.release(r.packet_id);
                let code = if known || s.version != ProtocolVersion::V5 {
                    ReasonCode::Success
                } else {
                    ReasonCode::PacketIdentifierNotFound
                };
                let comp = Packet::PubComp(PubComp::new(r.packet_id, code));
                if known && s.persistent {
                    // PUBCOMP once the release is committed: until then a resend of
                    // the PUBLISH must still be taken for a duplicate, on any node.
                    let cmd = s.release_command(r.packet_id);
                    let Ok(submitted) = self.broker.proposer.submit(cmd).await else {
                        return Some(End::Shutdown);
                    };
                    s.acks.push_back(Box::pin(async move {
                        match submitted.wait().await {
                            Ok(CommandResult::Done) => AckOutcome::Send(Box::new(comp)),
                            _ => AckOutcome::Fail,
                        }
                    }));
                    return None;
                }
                // PUBCOMP must not overtake the PUBREC still waiting in the queue.
                s.acks
                    .push_back(Box::pin(async move { AckOutcome::Send(Box::new(comp)) }));
                None
            }
            Packet::Subscribe(sub) => self.on_subscribe(s, sub).await,
            Packet::Unsubscribe(unsub) => self.on_unsubscribe(s, unsub).await,
            Packet::PingReq => {
                self.queue_packet(&Packet::PingResp, s.version);
                None
            }
            Packet::Disconnect(d) => {
                if let Some(expiry) = d.properties.session_expiry_interval {
                    if s.connect_expiry == 0 && expiry != 0 {
                        return self.violation(
                            s,
                            ReasonCode::ProtocolError,
                            "session expiry set at DISCONNECT after 0 at CONNECT",
                        );
                    }
                    s.expiry_update = Some(expiry);
                }
                if d.reason_code == ReasonCode::Success {
                    Some(End::Graceful)
                } else {
                    Some(End::Abrupt)
                }
            }
            Packet::Auth(_) => self.violation(
                s,
                ReasonCode::ProtocolError,
                "AUTH without an authentication method",
            ),
            other => self.violation(
                s,
                ReasonCode::ProtocolError,
                &format!("{:?} is not a client packet", packet_kind(&other)),
            ),
        }
    }

    async fn on_publish(&mut self, s: &mut Session, p: Publish) -> Option<End> {
        let broker = self.broker.clone();
        let cfg = &broker.config.mqtt;
        Stats::add(&broker.stats.messages_received, 1);
        telemetry::hot().messages_received[usize::from(u8::from(p.qos)).min(2)].increment(1);
        if u8::from(p.qos) > cfg.max_qos {
            return self.violation(s, ReasonCode::QoSNotSupported, "QoS above maximum");
        }
        if p.retain && !cfg.retain_available {
            return self.violation(s, ReasonCode::RetainNotSupported, "retain not available");
        }
        let topic = match p.properties.topic_alias {
            Some(alias) => match s.aliases.resolve(&p.topic, alias) {
                Ok(t) => t,
                Err(crate::session::AliasError::OutOfRange(_)) => {
                    return self.violation(s, ReasonCode::TopicAliasInvalid, "bad topic alias")
                }
                Err(crate::session::AliasError::Unknown(_)) => {
                    return self.violation(s, ReasonCode::ProtocolError, "unknown topic alias")
                }
            },
            None if p.topic.is_empty() => {
                return self.violation(s, ReasonCode::ProtocolError, "empty topic without alias")
            }
            None => p.topic,
        };
        let packet_id = p.packet_id.unwrap_or(0);
        let v5 = s.version == ProtocolVersion::V5;
        if p.qos != QoS::AtMostOnce {
            let unacked = s.inbound_qos1_pending + s.inbound_qos2.len();
            if unacked >= usize::from(cfg.receive_maximum) {
                return self.violation(
                    s,
                    ReasonCode::ReceiveMaximumExceeded,
                    "receive maximum exceeded",
                );
            }
        }
        // A QoS 2 publish resent before PUBREL is acknowledged, not delivered again.
        if p.qos == QoS::ExactlyOnce && !s.inbound_qos2.receive(packet_id) {
            let rec = Packet::PubRec(PubRec::new(packet_id, ReasonCode::Success));
            s.acks
                .push_back(Box::pin(async move { AckOutcome::Send(Box::new(rec)) }));
            return None;
        }
        let refuse = |code: ReasonCode| -> Option<Packet> {
            match p.qos {
                QoS::AtMostOnce => None,
                QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(packet_id, code))),
                QoS::ExactlyOnce => Some(Packet::PubRec(PubRec::new(packet_id, code))),
            }
        };
        if !broker
            .auth
            .may_publish(s.username.as_deref(), &s.client_id, &topic)
        {
            // v5 says so in the acknowledgement; v3 has no way to, and (like
            // Mosquitto) acknowledges and drops.
            tracing::debug!(client_id = %s.client_id, %topic, "publish denied by the ACL");
            metrics::counter!("flockmq_messages_dropped_total", "reason" => "acl").increment(1);
            // A v5 PUBREC with an error ends a QoS 2 flow; in v3 the PUBREL that
            // follows completes it as usual.
            if p.qos == QoS::ExactlyOnce && v5 {
                s.inbound_qos2.release(packet_id);
            }
            let code = if v5 {
                ReasonCode::NotAuthorized
            } else {
                ReasonCode::Success
            };
            if let Some(packet) = refuse(code) {
                self.queue_packet(&packet, s.version);
            }
            return None;
        }
        if let Err(code) = broker.check_topic_limits(&topic) {
            tracing::info!(client_id = %s.client_id, %topic, "publish topic over limits");
            if p.qos == QoS::ExactlyOnce {
                s.inbound_qos2.release(packet_id);
            }
            if v5 {
                if let Some(packet) = refuse(code) {
                    self.queue_packet(&packet, s.version);
                }
                return None;
            }
            return self.violation(s, code, "topic over limits");
        }

        let now = unix_ms();
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
            received_at_ms: now,
            origin_client: Some(s.client_id.clone()),
        });

        // One command carries everything this publish changes in the replicated
        // state: the retained message, the appends to persistent queues and, for a
        // persistent publisher's QoS 2, its packet identifier (so that a resend after
        // a crash or a move to another node is still recognised as a duplicate, and
        // the identifier is taken exactly when the messages are queued).
        let inbound = (p.qos == QoS::ExactlyOnce && s.persistent).then(|| InboundRecord {
            client_id: s.client_id.clone(),
            connection_id: s.connection_id,
            packet_id,
        });
        let retained = message.retain.then(|| message.clone());
        let outcome = broker.dispatch(&message);
        // Slow subscribers: wait for room (backpressure on this publisher), except for
        // this very client, whose channel only this task drains.
        for b in outcome.blocked {
            if b.client_id == s.client_id {
                self.deliver(s, *b.delivery);
            } else {
                b.wait(&broker.stats).await;
            }
        }
        let forwarded = broker
            .forward(outcome.forward, p.qos != QoS::AtMostOnce)
            .await;
        let queued = outcome.enqueue.len();
        let replicated = if queued == 0 && inbound.is_none() && retained.is_none() {
            None
        } else {
            let cmd = Command::Enqueue {
                entries: outcome.enqueue,
                limits: broker.queue_limits(),
                inbound,
                retained,
            };
            match broker.proposer.submit(cmd).await {
                Ok(sub) => Some(sub),
                Err(_) => return Some(End::Shutdown),
            }
        };
        let matched = outcome.matched;
        let delivered = outcome.delivered;
        let qos = p.qos;
        if qos == QoS::AtMostOnce {
            // Nobody waits; failures are logged by the proposer's callers.
            if let Some(r) = replicated {
                tokio::spawn(async move {
                    let _ = r.wait().await;
                });
            }
            return None;
        }
        if qos == QoS::AtLeastOnce {
            s.inbound_qos1_pending += 1;
        }
        s.acks.push_back(Box::pin(async move {
            let (ok, none_accepted) = match replicated {
                None => (true, false),
                Some(r) => match r.wait().await {
                    Ok(CommandResult::Enqueued { accepted, dropped }) => {
                        (true, queued > 0 && accepted == 0 && dropped > 0)
                    }
                    _ => (false, false),
                },
            };
            wait_forwarded(forwarded).await;
            if !ok && !v5 {
                return AckOutcome::Fail;
            }
            let code = if !ok {
                ReasonCode::UnspecifiedError
            } else if matched == 0 && v5 {
                ReasonCode::NoMatchingSubscribers
            } else if none_accepted && delivered == 0 && v5 {
                // Every subscriber's queue refused it (full, drop newest).
                ReasonCode::QuotaExceeded
            } else {
                ReasonCode::Success
            };
            let packet = Box::new(match qos {
                QoS::AtLeastOnce => Packet::PubAck(PubAck::new(packet_id, code)),
                _ => Packet::PubRec(PubRec::new(packet_id, code)),
            });
            if qos == QoS::ExactlyOnce && code.is_error() {
                // A PUBREC with an error ends the flow [MQTT-4.3.3]: the identifier is
                // free again for the client, so it must be here too (not committed,
                // or committed with every queue refusing the message).
                AckOutcome::Release(packet_id, packet)
            } else {
                AckOutcome::Send(packet)
            }
        }));
        None
    }

    async fn on_subscribe(&mut self, s: &mut Session, sub: Subscribe) -> Option<End> {
        let broker = self.broker.clone();
        let cfg = &broker.config.mqtt;
        let v5 = s.version == ProtocolVersion::V5;
        if sub.properties.subscription_identifier.is_some()
            && !cfg.subscription_identifier_available
        {
            return self.violation(
                s,
                ReasonCode::SubscriptionIdentifiersNotSupported,
                "subscription identifiers not available",
            );
        }
        let existing = broker.read_state(|st| {
            st.session(&s.client_id)
                .map(|r| r.subscriptions.len())
                .unwrap_or(0)
        });
        let mut codes: Vec<Option<ReasonCode>> = Vec::with_capacity(sub.filters.len());
        let mut entries = Vec::new();
        for (filter, opts) in &sub.filters {
            let shared = mqtt::topic::parse_shared(filter);
            let code = if mqtt::topic::validate_topic_filter(filter).is_err() {
                Some(ReasonCode::TopicFilterInvalid)
            } else if shared.is_some() && !cfg.shared_subscription_available {
                Some(ReasonCode::SharedSubscriptionsNotSupported)
            } else if shared.is_some() && opts.no_local {
                // [MQTT-3.8.3-4]: a protocol error.
                return self.violation(s, ReasonCode::ProtocolError, "no local on shared");
            } else if !cfg.wildcard_subscription_available
                && (filter.contains('+') || filter.contains('#'))
            {
                Some(ReasonCode::WildcardSubscriptionsNotSupported)
            } else if broker.check_filter_limits(filter).is_err() {
                Some(ReasonCode::TopicFilterInvalid)
            } else if !self.acl_allows_subscription(s, shared.map(|(_, f)| f).unwrap_or(filter)) {
                tracing::debug!(client_id = %s.client_id, %filter, "subscription denied by the ACL");
                Some(ReasonCode::NotAuthorized)
            } else if cfg.max_subscriptions_per_client > 0
                && existing + entries.len() >= cfg.max_subscriptions_per_client
            {
                Some(ReasonCode::QuotaExceeded)
            } else {
                None
            };
            if code.is_none() {
                entries.push((
                    filter.clone(),
                    crate::cluster::command::SubscriptionOptions {
                        qos: u8::from(opts.qos).min(cfg.max_qos),
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
            self.queue_packet(
                &Packet::SubAck(SubAck {
                    packet_id: sub.packet_id,
                    reason_codes,
                    properties: Default::default(),
                }),
                s.version,
            );
            return None;
        }
        // In effect on this node from now on (DESIGN invariant 9); the commit gates the
        // SUBACK and the other nodes, and the tickets withdraw the overlay's entries
        // once it is applied, refused or abandoned.
        let tickets: Vec<_> = entries
            .iter()
            .filter(|(filter, _)| mqtt::topic::parse_shared(filter).is_none())
            .map(|(filter, options)| {
                broker
                    .provisional
                    .insert(&s.client_id, filter, options.clone())
            })
            .collect();
        let submitted = match broker
            .proposer
            .submit_refusable(Command::Subscribe {
                client_id: s.client_id.clone(),
                connection_id: s.connection_id,
                entries: entries.clone(),
            })
            .await
        {
            Ok(submitted) => submitted,
            Err(_) => return Some(End::Shutdown),
        };
        let client_id = s.client_id.clone();
        let packet_id = sub.packet_id;
        // The SUBACK waits in the acknowledgement queue, so that the connection goes on
        // reading (and a PUBLISH right behind the SUBSCRIBE already matches it).
        s.acks.push_back(Box::pin(async move {
            let existed = match submitted.wait().await {
                Ok(CommandResult::Subscribed(existed)) if existed.len() == entries.len() => {
                    Some(existed)
                }
                _ => {
                    tracing::warn!(%client_id, "subscribe not committed");
                    None
                }
            };
            drop(tickets);
            let reason_codes = subscribe_reason_codes(&codes, v5, &entries, existed.as_deref());
            let retained = match existed {
                Some(existed) => retained_for(&broker, &entries, &existed),
                None => Vec::new(),
            };
            AckOutcome::SubAck(
                Box::new(Packet::SubAck(SubAck {
                    packet_id,
                    reason_codes,
                    properties: Default::default(),
                })),
                retained,
            )
        }));
        None
    }

    async fn on_unsubscribe(&mut self, s: &mut Session, unsub: Unsubscribe) -> Option<End> {
        let broker = self.broker.clone();
        let cmd = Command::Unsubscribe {
            client_id: s.client_id.clone(),
            connection_id: s.connection_id,
            filters: unsub.filters.clone(),
        };
        // A v3 UNSUBACK cannot say it failed: the client takes it as done, so the
        // command stays on its way however late. v5 reports the failure.
        let result = if s.version.is_v5() {
            broker.proposer.propose_refusable(cmd).await
        } else {
            broker.proposer.propose(cmd).await
        };
        let reason_codes: Vec<ReasonCode> = match result {
            Ok(CommandResult::Unsubscribed(removed)) => removed
                .into_iter()
                .map(|r| {
                    if r {
                        ReasonCode::Success
                    } else {
                        ReasonCode::NoSubscriptionExisted
                    }
                })
                .collect(),
            _ => vec![ReasonCode::UnspecifiedError; unsub.filters.len()],
        };
        for code in &reason_codes {
            let result = match code {
                ReasonCode::Success => "removed",
                ReasonCode::NoSubscriptionExisted => "not_found",
                _ => "failed",
            };
            metrics::counter!("flockmq_unsubscribe_filters_total", "result" => result).increment(1);
        }
        self.queue_packet(
            &Packet::UnsubAck(UnsubAck {
                packet_id: unsub.packet_id,
                reason_codes,
                properties: Default::default(),
            }),
            s.version,
        );
        None
    }

    /// Send a delivery now, or keep it until the inflight window has room.
    fn deliver(&mut self, s: &mut Session, d: Delivery) {
        // The clock matters only to a message that expires; most do not.
        let now = match d.message.properties.message_expiry_interval {
            Some(_) => unix_ms(),
            None => 0,
        };
        if d.message.is_expired(now) {
            metrics::counter!("flockmq_messages_dropped_total", "reason" => "expired").increment(1);
            return;
        }
        if !self.acl_allows_delivery(s, &d.message.topic) {
            return;
        }
        if d.qos == 0 {
            self.send_publish(s, &d, None, false, now);
            return;
        }
        if !s.pending.is_empty() || !s.window.has_room() {
            if s.pending.len() >= self.broker.config.mqtt.max_queued_messages {
                Stats::add(&self.broker.stats.messages_dropped, 1);
                metrics::counter!("flockmq_messages_dropped_total", "reason" => "queue_full")
                    .increment(1);
                return;
            }
            s.pending.push_back(d);
            return;
        }
        self.send_transient(s, d, now);
    }

    fn send_transient(&mut self, s: &mut Session, d: Delivery, now: u64) {
        let Some(id) = s.window.allocate(Outgoing::Transient(d.clone())) else {
            s.pending.push_front(d);
            return;
        };
        if !self.send_publish(s, &d, Some(id), false, now) {
            // Too large for the client: behave as if it was acknowledged.
            s.window.puback(id);
            s.window.pubrec(id);
            s.window.pubcomp(id);
        }
    }

    /// Encode a PUBLISH into the write buffer; `false` if the client's Maximum Packet
    /// Size forbids it (the message is then dropped, as the spec requires).
    fn send_publish(
        &mut self,
        s: &mut Session,
        d: &Delivery,
        packet_id: Option<u16>,
        dup: bool,
        now: u64,
    ) -> bool {
        let m = &d.message;
        let v5 = s.version == ProtocolVersion::V5;
        let alias = s.out_aliases.plan(&m.topic);
        let (topic, topic_alias) = match alias {
            AliasUse::Topic => (m.topic.to_string(), None),
            AliasUse::Define(a) => (m.topic.to_string(), Some(a)),
            AliasUse::Reuse(a) => (String::new(), Some(a)),
        };
        let properties = if v5 {
            PublishProperties {
                payload_format_indicator: m.properties.payload_format_indicator,
                message_expiry_interval: m.remaining_expiry_secs(now),
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
        if s.client_max_packet > 0 && packet.encoded_len(s.version) > s.client_max_packet as usize {
            metrics::counter!("flockmq_messages_dropped_total", "reason" => "too_large")
                .increment(1);
            return false;
        }
        s.out_aliases.commit(&m.topic, alias);
        Stats::add(&self.broker.stats.messages_sent, 1);
        telemetry::hot().messages_sent[usize::from(d.qos).min(2)].increment(1);
        self.queue_packet(&packet, s.version);
        true
    }

    /// An outbound QoS 1/2 flow ended: trim the replicated queue or send what waits.
    fn outbound_done(&mut self, s: &mut Session, item: Outgoing) {
        match item {
            Outgoing::Queued(seq) => {
                s.acks_completed.push(seq);
                self.pump_queue(s);
            }
            Outgoing::Transient(_) => {
                let now = unix_ms();
                while s.window.has_room() {
                    let Some(d) = s.pending.pop_front() else {
                        break;
                    };
                    self.send_transient(s, d, now);
                }
            }
        }
    }

    /// Send messages from the session's replicated queue while the window has room.
    ///
    /// A session resumed with an expiry of 0 is not persistent from now on, but it
    /// keeps the queue it had [MQTT-3.1.2-4]: it drains what was queued before it
    /// resumed (positions below `resend_below`); nothing is queued for it afterwards.
    fn pump_queue(&mut self, s: &mut Session) {
        if !s.window.has_room() || (!s.persistent && s.queue_cursor >= s.resend_below) {
            return;
        }
        let room = 65_535usize.min(s.window_room());
        let cursor = s.queue_cursor;
        let batch: Vec<_> = self.broker.read_state(|st| {
            st.session(&s.client_id)
                .map(|r| {
                    r.queue
                        .iter()
                        .filter(|m| m.seq >= cursor)
                        .take(room)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        });
        let now = unix_ms();
        for q in batch {
            let id = SessionRecord::packet_id_for(q.seq);
            if s.window.contains(id) {
                // The id is still held by an older flow; wait for it to end.
                break;
            }
            s.queue_cursor = q.seq + 1;
            if q.message.is_expired(now) || !self.acl_allows_delivery(s, &q.message.topic) {
                s.acks_completed.push(q.seq);
                continue;
            }
            s.window
                .insert(id, OutboundState::AwaitingAck, Outgoing::Queued(q.seq));
            let d = Delivery {
                shared_group: None,
                message: q.message,
                qos: q.qos,
                retain: q.retain,
                subscription_ids: q.subscription_ids,
            };
            if !self.send_publish(s, &d, Some(id), q.seq < s.resend_below, now) {
                if let Some(item) = s.window.puback(id) {
                    self.outbound_done(s, item);
                }
            }
            if !s.window.has_room() {
                break;
            }
        }
    }

    /// Whether the ACL lets the client subscribe to `filter`; a subscription that may
    /// match unreadable topics turns the per-delivery check on.
    fn acl_allows_subscription(&self, s: &mut Session, filter: &str) -> bool {
        use crate::auth::acl::SubscribeAccess;
        // Derived first from what is committed, so that the new subscription's flag is
        // not lost to a later derivation that does not see it yet.
        self.derive_acl(s);
        let auth = &self.broker.auth;
        match auth.subscribe_access(s.username.as_deref(), &s.client_id, filter) {
            SubscribeAccess::Denied => false,
            SubscribeAccess::Granted => true,
            SubscribeAccess::Filtered => {
                s.acl_filtered = true;
                true
            }
        }
    }

    /// Whether the ACL lets the client receive a message on `topic`: checked only for
    /// sessions with a subscription that may match unreadable topics (a delivered
    /// topic that is denied matches some subscription, which then overlaps the deny).
    fn acl_allows_delivery(&self, s: &mut Session, topic: &str) -> bool {
        self.derive_acl(s);
        if !s.acl_filtered
            || self
                .broker
                .auth
                .may_read(s.username.as_deref(), &s.client_id, topic)
        {
            return true;
        }
        tracing::debug!(client_id = %s.client_id, %topic, "delivery withheld by the ACL");
        metrics::counter!("flockmq_messages_dropped_total", "reason" => "acl").increment(1);
        false
    }

    /// Bring `s.acl_filtered` up to date with the rules in force (after a connect, a
    /// resume from the parking lot or a reload) from the session's subscriptions.
    fn derive_acl(&self, s: &mut Session) {
        use crate::auth::acl::SubscribeAccess;
        let auth = &self.broker.auth;
        let generation = auth.generation();
        if s.acl_generation == generation {
            return;
        }
        s.acl_generation = generation;
        s.acl_filtered = false;
        if !auth.has_acl() {
            return;
        }
        let filters: Vec<String> = self.broker.read_state(|st| {
            st.session(&s.client_id)
                .map(|r| r.subscriptions.keys().cloned().collect())
                .unwrap_or_default()
        });
        s.acl_filtered = filters.iter().any(|filter| {
            let filter = mqtt::topic::parse_shared(filter).map_or(filter.as_str(), |(_, f)| f);
            // A subscription the rules in force would refuse: every message is checked.
            auth.subscribe_access(s.username.as_deref(), &s.client_id, filter)
                != SubscribeAccess::Granted
        });
    }

    /// After a reconnect, PUBREL every QoS 2 message whose PUBREC had arrived.
    fn resend_awaiting_pubcomp(&mut self, s: &mut Session) {
        let seqs: Vec<u64> = self.broker.read_state(|st| {
            st.session(&s.client_id)
                .map(|r| r.awaiting_pubcomp.iter().copied().collect())
                .unwrap_or_default()
        });
        for seq in seqs {
            let id = SessionRecord::packet_id_for(seq);
            if s.window
                .insert(id, OutboundState::AwaitingComp, Outgoing::Queued(seq))
            {
                self.queue_packet(
                    &Packet::PubRel(PubRel::new(id, ReasonCode::Success)),
                    s.version,
                );
            }
        }
    }

    fn awaiting_pubcomp_seq(&self, s: &Session, packet_id: u16) -> Option<u64> {
        self.broker.read_state(|st| {
            st.session(&s.client_id).and_then(|r| {
                r.awaiting_pubcomp
                    .iter()
                    .copied()
                    .find(|seq| SessionRecord::packet_id_for(*seq) == packet_id)
            })
        })
    }

    /// Tell the cluster which queued messages the client acknowledged (batched), when
    /// some were PUBRECs: their PUBRELs go out once they are committed, so that a new
    /// owner after a crash knows not to send the PUBLISH again.
    async fn commit_acks_before_pubrel(&mut self, s: &mut Session) {
        let (cmd, pubrecs) = s.take_acks();
        let pubrels: Vec<Packet> = pubrecs
            .into_iter()
            .map(|id| Packet::PubRel(PubRel::new(id, ReasonCode::Success)))
            .collect();
        let submitted = match self.broker.proposer.submit(cmd).await {
            Ok(submitted) => submitted,
            Err(_) => {
                s.acks.push_back(Box::pin(async { AckOutcome::Fail }));
                return;
            }
        };
        s.acks.push_back(Box::pin(async move {
            match submitted.wait().await {
                Ok(CommandResult::Done) => AckOutcome::Packets(pubrels),
                other => {
                    tracing::debug!(?other, "PUBREC not committed, closing");
                    AckOutcome::Fail
                }
            }
        }));
    }
}

/// Record the acknowledgements `s` received since the last time, in one command.
fn commit_acks(broker: &Broker, s: &mut Session) {
    if s.acks_completed.is_empty() && s.pubrecs.is_empty() {
        return;
    }
    // (PUBRECs recorded here, at the connection's end, get their PUBRELs from the
    // next connection, which resends every message awaiting PUBCOMP.)
    broker.proposer.propose_detached(s.take_acks().0);
}

/// The SUBACK's reason codes: `codes` holds each filter's refusal (or `None` for the
/// filters in `entries`, granted once committed); `existed` is the commit's answer.
fn subscribe_reason_codes(
    codes: &[Option<ReasonCode>],
    v5: bool,
    entries: &[(String, crate::cluster::command::SubscriptionOptions)],
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

/// Retained messages for new subscriptions [MQTT-3.3.1-9], per Retain Handling.
fn retained_for(
    broker: &Broker,
    entries: &[(String, crate::cluster::command::SubscriptionOptions)],
    existed: &[bool],
) -> Vec<Delivery> {
    let now = unix_ms();
    let mut out = Vec::new();
    for ((filter, opts), existed) in entries.iter().zip(existed) {
        if mqtt::topic::parse_shared(filter).is_some()
            || opts.retain_handling == 2
            || (opts.retain_handling == 1 && *existed)
        {
            continue;
        }
        broker.read_state(|st| {
            st.retained().for_each_matching(filter, |_, m| {
                if !m.is_expired(now) {
                    out.push(Delivery {
                        shared_group: None,
                        qos: m.qos.min(opts.qos),
                        retain: true,
                        subscription_ids: opts.subscription_id.into_iter().collect(),
                        message: m.clone(),
                    });
                }
            })
        });
    }
    out
}

impl Session {
    /// The acknowledgements received since the last time as one `Ack` command, and
    /// the packet identifiers of its PUBRECs (their PUBRELs wait for it).
    fn take_acks(&mut self) -> (Command, Vec<u16>) {
        let (received, pubrecs) = std::mem::take(&mut self.pubrecs).into_iter().unzip();
        let cmd = Command::Ack {
            client_id: self.client_id.clone(),
            connection_id: self.connection_id,
            completed: std::mem::take(&mut self.acks_completed),
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

    fn window_room(&self) -> usize {
        // OutboundWindow::has_room is checked per message; this bounds the read.
        256
    }
}

impl Broker {
    /// Check a topic name against the configured length and depth limits.
    pub fn check_topic_limits(&self, topic: &str) -> Result<(), ReasonCode> {
        let cfg = &self.config.mqtt;
        if topic.len() > cfg.max_topic_length || topic.split('/').count() > cfg.max_topic_levels {
            return Err(ReasonCode::TopicNameInvalid);
        }
        Ok(())
    }

    /// Check a topic filter against the configured length and depth limits.
    pub fn check_filter_limits(&self, filter: &str) -> Result<(), ReasonCode> {
        self.check_topic_limits(filter)
            .map_err(|_| ReasonCode::TopicFilterInvalid)
    }
}

/// Hand an ended session back to the cluster: unsent messages to its queue or to other
/// members of its shared groups, and its end recorded (unless the node shuts down).
async fn end_session(
    broker: &Arc<Broker>,
    mut session: Box<Session>,
    connection_id: u64,
    end: End,
) {
    let client_id = session.client_id.clone();
    broker.unregister(&client_id, connection_id);
    commit_acks(broker, &mut session);
    // Messages that lived only in this connection's memory: unacknowledged
    // deliveries in flight, those waiting for room, and those still in the channel
    // (closed first, so that nothing more arrives).
    session.rx.close();
    let mut unsent = Vec::new();
    while let Some(msg) = session.rx.try_recv() {
        if let ConnMsg::Deliver(d) = msg {
            unsent.push(*d);
        }
    }
    let unacked: Vec<Delivery> = session
        .window
        .drain()
        .into_iter()
        .filter_map(|(_, _, item)| match item {
            Outgoing::Transient(d) => Some(d),
            Outgoing::Queued(_) => None,
        })
        .chain(session.pending.drain(..))
        .chain(unsent)
        .collect();
    if session.persistent {
        // A persistent session keeps them in its replicated queue, to be resent on
        // reconnect (they are here only with durable_sessions off).
        let entries: Vec<_> = unacked
            .into_iter()
            .map(|d| crate::cluster::command::EnqueueEntry {
                client_id: client_id.clone(),
                message: d.message,
                qos: d.qos,
                retain: d.retain,
                subscription_ids: d.subscription_ids,
            })
            .collect();
        if let Err(e) = Box::pin(broker.commit_enqueue(entries)).await {
            tracing::warn!(client_id = %client_id, error = %e, "in-flight messages not queued");
        }
    } else {
        // A clean session's shared-group messages go to another member of the
        // group: in the background, so the session's end (below) is recorded at
        // once and the cluster stops choosing this member meanwhile.
        let shared: Vec<Delivery> = unacked
            .into_iter()
            .filter(|d| d.shared_group.is_some())
            .collect();
        if !shared.is_empty() {
            let (broker, client_id) = (broker.clone(), client_id.clone());
            tokio::spawn(async move {
                for d in shared {
                    Box::pin(broker.redeliver_shared(d, &client_id, true)).await;
                }
            });
        }
    }
    if end != End::Shutdown {
        let close = Command::CloseSession {
            client_id: client_id.clone(),
            connection_id,
            graceful: end == End::Graceful,
            expiry_secs: session.expiry_update,
            now_ms: unix_ms(),
        };
        if let Err(e) = Box::pin(broker.proposer.propose(close)).await {
            tracing::warn!(client_id = %client_id, error = %e, "cannot record disconnect");
        }
    }
    let reason = match end {
        End::Graceful => "disconnect",
        // (`Idle` never ends a session: it parks it.)
        End::Abrupt | End::Idle => "abrupt",
        End::TakenOver => "taken_over",
        End::Shutdown => "shutdown",
    };
    metrics::counter!("flockmq_connections_closed_total", "reason" => reason).increment(1);
    tracing::debug!(client_id = %client_id, ?end, "client disconnected");
}

fn packet_kind(p: &Packet) -> &'static str {
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

fn reason_label(code: ReasonCode) -> String {
    format!("0x{:02x}", u8::from(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what a function of six arguments returns (here: a future).
    fn returned_size<A, B, C, D, E, F, R>(_: fn(A, B, C, D, E, F) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn an_idle_connection_s_task_stays_small() {
        // Every connected client holds one such future until it parks (1,512 bytes in
        // a debug build, 1,496 in release, when this was written): a field held across
        // an await or a large inline sub-future shows up here first.
        let serve = returned_size(serve::<tokio::net::TcpStream>);
        let session = std::mem::size_of::<Session>();
        assert!(serve <= 1_600, "connection future: {serve} bytes");
        assert!(session <= 440, "session state: {session} bytes");
    }

    #[test]
    fn a_parked_connection_stays_smaller_still() {
        // What a parked connection holds besides its mailbox, registry entry and
        // session record: jemalloc's 128-byte class (152 bytes before it was made
        // flat and its keep alive compact).
        let parked = std::mem::size_of::<Parked>();
        assert!(parked <= 128, "parked connection: {parked} bytes");
    }
}
