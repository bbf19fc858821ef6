//! One client connection, from CONNECT to the end: the task that owns the client's
//! session while it is connected.
//!
//! The MQTT rules live in the I/O-free [`Machine`]; this task does what the machine
//! cannot: it reads and decodes packets and feeds them in with the time, writes what
//! the machine sends in batches, runs the [`Action`]s it asks for (proposals through
//! the proposer, dispatch and forwarding of publishes, retained look-ups) and feeds
//! their outcomes back, awaits the keep-alive deadline and the node's mailbox, and
//! parks the connection when it is idle. It is generic over the byte stream, so TCP,
//! TLS and WebSocket share it, and it never holds a lock across an `.await`.
//!
//! Acknowledgements to a publisher (PUBACK/PUBREC) wait until every local queue took
//! the message and, for persistent sessions, the replicated queue append is committed
//! (DESIGN invariant 1); the machine sends them in the order the publishes arrived.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use futures::stream::FuturesOrdered;
use futures::{Future, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dispatch::wait_forwarded;
use super::park;
use super::{unix_ms, Broker, ConnHandle, ConnMsg, Delivery, Stats};
use crate::auth::acl::SubscribeAccess;
use crate::cluster::command::{
    Command, CommandResult, InboundRecord, Message, QueuedMessage, SubscriptionOptions,
};
use crate::config::MqttConfig;
use crate::mqtt::{self, ConnAckProperties, Connect, Packet, ProtocolVersion, ReasonCode};
use crate::session::machine::{
    self, packet_kind, Action, AtRest, End, Machine, Opened, Resolution, Slot, World,
};
use crate::session::KeepAlive;
use crate::telemetry;
use crate::transport::tls::ServerStream;
use crate::transport::{Admitted, Bare, ClientStream, Vouched};
use tokio::net::TcpStream;

/// How soon a connection parks that has been quiet since its CONNECT (unless
/// `mqtt.park_after` is sooner still): devices reconnecting together (after a restart
/// or a network outage) and then sitting idle park within this, instead of all holding
/// a task for `mqtt.park_after` at once: that held the peak of a storm of 10,000
/// connections at 4.9 times Mosquitto's. A client that publishes at once pays one
/// extra park and wake; from its first packet on, `mqtt.park_after` applies.
const PARK_QUIET_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// Capacity of the channel through which the node hands deliveries to a connection.
const CHANNEL_CAPACITY: usize = 1024;

/// One delivery in this many has its publish-to-delivery latency measured.
const LATENCY_SAMPLE: u32 = 16;

type AckFuture = Pin<Box<dyn Future<Output = (Slot, Resolution)> + Send>>;

/// What the machine waits for, in the order it asked. The queue exists only while
/// something waits: an idle connection holds none (its shared parts are allocated by
/// `FuturesOrdered::new`).
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

    /// The next outcome in order, once ready.
    async fn next(&mut self) -> Option<(Slot, Resolution)> {
        let queue = self.0.as_mut()?;
        let next = queue.next().await;
        if queue.is_empty() {
            self.0 = None;
        }
        next
    }
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
    conn.live(session, connection_id, tally, true).await;
}

/// Resume a parked connection (see [`super::park`]), with its TLS session if it has
/// one, in a task of its own.
pub async fn resume(broker: Arc<Broker>, parked: Box<Parked>, tls: Option<park::Tls>) {
    let (session, socket, connection_id, tally) = parked.unpark(&broker.config.mqtt);
    let bare = Bare { socket, tls };
    if bare.tls.is_some() {
        resume_on::<ServerStream<TcpStream>>(broker, session, bare, connection_id, tally).await;
    } else {
        resume_on::<TcpStream>(broker, session, bare, connection_id, tally).await;
    }
}

/// [`resume`] on the stream `S` made again from `bare`.
async fn resume_on<S: ClientStream>(
    broker: Arc<Broker>,
    session: Box<Session>,
    bare: Bare,
    connection_id: u64,
    tally: Tally,
) {
    // Not kept while parked (32 bytes a connection): the socket knows it, unless the
    // client has gone, and then only log lines would show it.
    let peer = bare
        .socket
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    // Only plain TCP and TLS connections are parked.
    let listener = if bare.tls.is_some() { "tls" } else { "tcp" };
    match S::from_socket(bare) {
        Ok(stream) => {
            let conn = Connection {
                stream,
                rbuf: BytesMut::new(),
                wbuf: BytesMut::new(),
                broker,
                peer,
                listener,
                vouched: Vouched::Nothing,
            };
            conn.live(session, connection_id, tally, false).await;
        }
        Err(e) => {
            tracing::warn!(client_id = %session.m.client_id(), error = %e, "cannot resume a parked connection");
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

/// A parked connection: its socket and what its session needs to go on, without a
/// task, buffers or timers (see [`super::park`]). Only what a machine [at
/// rest](Machine::at_rest) holds, flat, so that the record fits jemalloc's 128-byte
/// class (a test below keeps it there).
pub struct Parked {
    socket: std::net::TcpStream,
    tally: Tally,
    rx: super::mailbox::Receiver<ConnMsg>,
    rest: AtRest,
}

impl Parked {
    /// The socket, in non-blocking mode.
    pub fn socket(&self) -> &std::net::TcpStream {
        &self.socket
    }

    fn keep_alive(&self) -> KeepAlive {
        self.rest.keep_alive()
    }

    /// A packet from the client arrived at `now` (a PINGREQ answered by the lot).
    pub fn seen(&mut self, now: Instant) {
        let mut keep_alive = self.keep_alive();
        keep_alive.seen(now);
        self.rest.set_keep_alive(keep_alive);
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
    fn unpark(self, cfg: &MqttConfig) -> (Box<Session>, std::net::TcpStream, u64, Tally) {
        let session = Box::new(Session {
            m: Machine::unpark(self.rest, cfg),
            rx: self.rx,
            acks: PendingAcks::default(),
            inflight_counted: 0,
        });
        let connection_id = session.m.connection_id();
        (session, self.socket, connection_id, self.tally)
    }
}

/// An established session on this connection: the protocol machine, the mailbox the
/// node delivers to, and what the machine waits for.
struct Session {
    m: Machine,
    rx: super::mailbox::Receiver<ConnMsg>,
    acks: PendingAcks,
    /// The window's size as last added to the node's inflight count.
    inflight_counted: usize,
}

impl Session {
    /// Whether nothing is in flight, buffered or waiting, so that the session can be
    /// parked.
    fn at_rest(&self) -> bool {
        self.m.at_rest() && self.acks.is_empty() && self.rx.is_empty()
    }

    /// The parked form of a session [at rest](Session::at_rest).
    fn park(self, socket: std::net::TcpStream, tally: Tally) -> Parked {
        debug_assert!(self.at_rest());
        Parked {
            socket,
            tally,
            rx: self.rx,
            rest: self.m.park(),
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

/// The node as the machine sees it: packets go to the write buffer, actions to a list
/// the connection runs next, reads go to the broker.
struct Node<'a> {
    broker: &'a Broker,
    wbuf: &'a mut BytesMut,
    version: ProtocolVersion,
    actions: &'a mut Vec<Action>,
}

impl World for Node<'_> {
    fn config(&self) -> &MqttConfig {
        &self.broker.config.mqtt
    }

    fn send(&mut self, packet: &Packet) {
        if let Err(e) = mqtt::encode(packet, self.version, self.wbuf) {
            tracing::warn!(error = %e, "cannot encode packet");
        }
    }

    fn act(&mut self, action: Action) {
        self.actions.push(action);
    }

    fn sent(&mut self, message: &Message, qos: u8) {
        Stats::add(&self.broker.stats.messages_sent, 1);
        telemetry::hot().messages_sent[usize::from(qos).min(2)].increment(1);
        // Publish to delivery, for one delivery in LATENCY_SAMPLE (a clock read each
        // would cost the hot path more than the figure is worth), counted per thread
        // (a shared counter would be a cache line every delivery fights over).
        thread_local! {
            static SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        }
        let seen = SEEN.with(|n| {
            let seen = n.get();
            n.set(seen.wrapping_add(1));
            seen
        });
        if seen % LATENCY_SAMPLE == 0 && message.received_at_ms > 0 {
            let ms = unix_ms().saturating_sub(message.received_at_ms);
            metrics::histogram!("flockmq_delivery_latency_seconds").record(ms as f64 / 1000.0);
        }
    }

    fn dropped(&mut self, reason: &'static str) {
        if reason == "queue_full" {
            Stats::add(&self.broker.stats.messages_dropped, 1);
        }
        metrics::counter!("flockmq_messages_dropped_total", "reason" => reason).increment(1);
    }

    fn may_publish(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.broker.auth.may_publish(username, client_id, topic)
    }

    fn retained_full(&self, topic: &str) -> bool {
        self.broker.retained_full(topic)
    }

    fn subscribe_access(
        &self,
        username: Option<&str>,
        client_id: &str,
        filter: &str,
    ) -> SubscribeAccess {
        self.broker
            .auth
            .subscribe_access(username, client_id, filter)
    }

    fn may_read(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.broker.auth.may_read(username, client_id, topic)
    }

    fn acl_generation(&self) -> (u32, bool) {
        (self.broker.auth.generation(), self.broker.auth.has_acl())
    }

    fn subscriptions(&self, client_id: &str) -> Vec<String> {
        self.broker.read_state(|st| {
            st.session(client_id)
                .map(|r| r.subscriptions.keys().cloned().collect())
                .unwrap_or_default()
        })
    }

    fn queued(&self, client_id: &str, from: u64, max: usize) -> Vec<QueuedMessage> {
        self.broker.read_state(|st| {
            st.session(client_id)
                .map(|r| {
                    r.queue
                        .iter()
                        .filter(|m| m.seq >= from)
                        .take(max)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    fn awaiting_pubcomp(&self, client_id: &str) -> Vec<u64> {
        self.broker.read_state(|st| {
            st.session(client_id)
                .map(|r| r.awaiting_pubcomp.iter().copied().collect())
                .unwrap_or_default()
        })
    }
}

impl<S> Connection<S>
where
    S: ClientStream,
{
    /// The machine's view of the node, for a session of `version`.
    fn node<'a>(&'a mut self, version: ProtocolVersion, actions: &'a mut Vec<Action>) -> Node<'a> {
        Node {
            broker: &self.broker,
            wbuf: &mut self.wbuf,
            version,
            actions,
        }
    }

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
        metrics::counter!("flockmq_connack_total", "reason" => format!("0x{:02x}", u8::from(code)))
            .increment(1);
        self.queue_packet(&machine::refusal(code, properties), version);
        self.flush().await;
        None
    }

    /// Authenticate, open the session through the cluster, answer CONNACK and build
    /// the connection's session state; `None` once a refusal has been answered.
    async fn establish(&mut self, connect: Box<Connect>) -> Option<(Box<Session>, u64)> {
        let broker = self.broker.clone();
        let cfg = &broker.config.mqtt;
        let version = connect.protocol;

        let fresh = || format!("flockmq-{:016x}", rand::random::<u64>());
        let (client_id, assigned) = match machine::client_identifier(&connect, fresh) {
            Ok(id) => id,
            Err(code) => return self.refuse(version, code).await,
        };
        // An address with recent failures waits before its credentials are checked.
        let Some(attempt) = broker
            .auth
            .failures
            .begin(self.peer.ip(), crate::clock::now())
        else {
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
            Vouched::Internal(name) => Ok(name.clone()),
            Vouched::CertificateUser(None) => {
                tracing::info!(client_id = %client_id, peer = %self.peer, "connection refused: no client certificate with a name to use as the username");
                Err(ReasonCode::NotAuthorized)
            }
        };
        let username: Option<Arc<str>> = match authenticated {
            Ok(username) => username,
            Err(code) => {
                metrics::counter!("flockmq_auth_failures_total").increment(1);
                attempt.failed(crate::clock::now());
                return self.refuse(version, code).await;
            }
        };
        drop(attempt);

        let may_publish = |topic: &str| {
            broker
                .auth
                .may_publish(username.as_deref(), &client_id, topic)
        };
        let mut negotiated =
            match machine::negotiate(&connect, cfg, client_id.clone(), assigned, may_publish) {
                Ok(n) => n,
                Err(code) => return self.refuse(version, code).await,
            };

        if !matches!(self.vouched, Vouched::Internal(_)) && broker.sessions_full(&client_id) {
            tracing::info!(client_id = %client_id, peer = %self.peer, "connection refused: mqtt.max_sessions reached");
            return self.refuse(version, ReasonCode::QuotaExceeded).await;
        }
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
            expiry_secs: negotiated.expiry_secs,
            will: negotiated.will.take(),
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
                    crate::cluster::proposer::ProposeError::Unavailable(_) if version.is_v5() => {
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

        let connack = machine::connack(&connect, &negotiated, cfg, session_present);
        self.queue_packet(&connack, version);
        metrics::counter!("flockmq_connack_total", "reason" => "success").increment(1);
        tracing::debug!(client_id = %client_id, peer = %self.peer, ?version, session_present, "client connected");

        let resend_below = broker.read_state(|s| {
            s.session(&client_id)
                .map(|r| r.next_seq)
                .unwrap_or_default()
        });
        let opened = Opened {
            connection_id,
            username,
            inbound_qos2: broker.inbound_qos2_of(&client_id, session_present),
            resend_below,
        };
        let m = Machine::new(&connect, &negotiated, cfg, opened, crate::clock::now());
        let mut session = Box::new(Session {
            m,
            rx,
            acks: PendingAcks::default(),
            inflight_counted: 0,
        });
        let mut actions = Vec::new();
        session.m.start(
            session_present,
            unix_ms(),
            &mut self.node(version, &mut actions),
        );
        if let Some(end) = self.run(&mut session, &mut actions).await {
            Box::pin(end_session(&broker, session, connection_id, end)).await;
            return None;
        }
        Some((session, connection_id))
    }

    /// Drive an established session until it ends, parking it whenever it has been
    /// idle for `mqtt.park_after` (a `fresh` one, just connected: see
    /// [`PARK_QUIET_AFTER`]).
    /// The session is boxed: passed by value, it would sit in the caller's future as
    /// well as in this one (about 400 bytes twice for every connection).
    async fn live(
        mut self,
        mut session: Box<Session>,
        connection_id: u64,
        mut tally: Tally,
        mut fresh: bool,
    ) {
        let end = loop {
            let end = self.session_loop(&mut session, &mut fresh).await;
            if end != End::Idle {
                break end;
            }
            let socket = match self.stream.into_socket() {
                Err(stream) => {
                    self.stream = stream;
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(client_id = %session.m.client_id(), error = %e, "cannot park a connection");
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
                Ok(Ok(bare)) => bare,
            };
            let parked = Box::new((*session).park(socket.socket, tally));
            match self.broker.lot.park(parked, socket.tls) {
                Ok(()) => return,
                Err((parked, tls)) => {
                    // The node is shutting down (or the socket cannot be watched): go
                    // on here.
                    let socket;
                    (session, socket, _, tally) = parked.unpark(&self.broker.config.mqtt);
                    match S::from_socket(Bare { socket, tls }) {
                        Ok(stream) => self.stream = stream,
                        Err(e) => {
                            tracing::warn!(client_id = %session.m.client_id(), error = %e, "cannot resume a connection");
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
        let now = s.m.inflight();
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

    /// Serve the session until it ends or is idle enough to park (`End::Idle`);
    /// `quiet`: the client has sent nothing since its CONNECT (cleared once it does).
    async fn session_loop(&mut self, s: &mut Session, quiet: &mut bool) -> End {
        let shutdown = self.broker.shutdown.clone();
        let version = s.m.version();
        // Parking: plain TCP and TLS over it, unless switched off.
        let park_after =
            Some(self.broker.config.mqtt.park_after).filter(|d| S::PARKABLE && !d.is_zero());
        let mut active_at = crate::clock::now();
        // Packets that arrived with the CONNECT (clients pipeline a SUBSCRIBE or a
        // PUBLISH behind it without waiting for CONNACK) are already in the buffer:
        // handle them now, not once the client happens to send more.
        if !self.rbuf.is_empty() {
            *quiet = false;
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
            let park_at = park_after.map(|after| {
                active_at
                    + if *quiet {
                        after.min(PARK_QUIET_AFTER)
                    } else {
                        after
                    }
            });
            let deadline = match (s.m.deadline(), park_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            let mut actions = Vec::new();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    let end = s.m.shutting_down(&mut self.node(version, &mut actions));
                    self.flush().await;
                    return end;
                }
                Some((slot, resolution)) = s.acks.next(), if !s.acks.is_empty() => {
                    active_at = crate::clock::now();
                    let mut node = self.node(version, &mut actions);
                    if let Some(end) = s.m.resolve(slot, resolution, &mut node) {
                        return end;
                    }
                }
                msg = s.rx.recv() => {
                    active_at = crate::clock::now();
                    *quiet = false;
                    let Some(msg) = msg else { return End::Abrupt };
                    if let Some(end) = self.on_message(s, msg, &mut actions) {
                        return end;
                    }
                    // Drain what else is ready so that it leaves in one write.
                    for _ in 0..256 {
                        let Some(msg) = s.rx.try_recv() else { break };
                        if let Some(end) = self.on_message(s, msg, &mut actions) {
                            return end;
                        }
                    }
                }
                filled = self.fill() => {
                    if !filled {
                        return End::Abrupt;
                    }
                    active_at = crate::clock::now();
                    *quiet = false;
                    s.m.seen(active_at);
                    // Boxed: handling packets (proposals, forwarding) needs KiBs of
                    // future state that an idle connection should not carry inline.
                    if let Some(end) = Box::pin(self.decode_all(s)).await {
                        return end;
                    }
                }
                _ = sleep => {
                    let now = crate::clock::now();
                    if let Some(end) = s.m.timeout(now, &mut self.node(version, &mut actions)) {
                        self.flush().await;
                        return end;
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
            s.m.commit_acks(&mut self.node(version, &mut actions));
            if !actions.is_empty() {
                // Boxed: an idle connection's future must not carry this one inline.
                if let Some(end) = Box::pin(self.run(s, &mut actions)).await {
                    return end;
                }
            }
        }
    }

    fn on_message(
        &mut self,
        s: &mut Session,
        msg: ConnMsg,
        actions: &mut Vec<Action>,
    ) -> Option<End> {
        let mut node = self.node(s.m.version(), actions);
        match msg {
            ConnMsg::Deliver(d) => {
                // The clock matters only to a message that expires; most do not.
                let now = match d.message.properties.message_expiry_interval {
                    Some(_) => unix_ms(),
                    None => 0,
                };
                s.m.deliver(*d, now, &mut node);
                None
            }
            ConnMsg::QueueGrew => {
                s.m.queue_grew(unix_ms(), &mut node);
                None
            }
            ConnMsg::TakenOver => Some(s.m.taken_over(&mut node)),
            ConnMsg::Disconnect(code) => {
                let code = ReasonCode::try_from(code).unwrap_or(ReasonCode::AdministrativeAction);
                Some(s.m.kicked(code, &mut node))
            }
        }
    }

    async fn decode_all(&mut self, s: &mut Session) -> Option<End> {
        let max = self.broker.config.mqtt.max_packet_size;
        let version = s.m.version();
        let now_ms = unix_ms();
        let mut actions = Vec::new();
        loop {
            match mqtt::decode(&mut self.rbuf, Some(version), max) {
                Ok(Some(packet)) => {
                    telemetry::hot().packets_received.increment(1);
                    if let Packet::Publish(p) = &packet {
                        Stats::add(&self.broker.stats.messages_received, 1);
                        telemetry::hot().messages_received[usize::from(u8::from(p.qos)).min(2)]
                            .increment(1);
                    }
                    let end =
                        s.m.handle(packet, now_ms, &mut self.node(version, &mut actions));
                    if let Some(end) = end {
                        return Some(end);
                    }
                    if !actions.is_empty() {
                        if let Some(end) = self.run(s, &mut actions).await {
                            return Some(end);
                        }
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    metrics::counter!("flockmq_decode_errors_total").increment(1);
                    return Some(s.m.malformed(&e, &mut self.node(version, &mut actions)));
                }
            }
        }
    }

    /// Run what the machine asked for, in order (and what that asks for in turn),
    /// leaving `actions` empty with its buffer for the next packet's (a publish asks for
    /// one action: no allocation per publish).
    async fn run(&mut self, s: &mut Session, actions: &mut Vec<Action>) -> Option<End> {
        let version = s.m.version();
        let mut queue = std::collections::VecDeque::from(std::mem::take(actions));
        while let Some(action) = queue.pop_front() {
            let mut more = Vec::new();
            match action {
                Action::Publish {
                    message,
                    inbound,
                    slot,
                } => {
                    if let Some(end) = self.publish(s, message, inbound, slot, &mut more).await {
                        return Some(end);
                    }
                }
                Action::Subscribe { command, slot } => {
                    // In effect on this node from now on (DESIGN invariant 9); the
                    // commit gates the SUBACK and the other nodes, and the tickets
                    // withdraw the overlay's entries once it is applied, refused or
                    // abandoned.
                    let tickets: Vec<_> = match &command {
                        Command::Subscribe {
                            client_id, entries, ..
                        } => entries
                            .iter()
                            .filter(|(filter, _)| mqtt::topic::parse_shared(filter).is_none())
                            .map(|(filter, options)| {
                                self.broker
                                    .provisional
                                    .insert(client_id, filter, options.clone())
                            })
                            .collect(),
                        _ => Vec::new(),
                    };
                    let Ok(submitted) = self.broker.proposer.submit_refusable(command).await else {
                        return Some(End::Shutdown);
                    };
                    s.acks.push_back(Box::pin(async move {
                        let result = submitted.wait().await.ok();
                        drop(tickets);
                        (slot, Resolution::Committed(result))
                    }));
                }
                Action::Propose {
                    command,
                    refusable,
                    slot,
                } => {
                    let submitted = if refusable {
                        self.broker.proposer.submit_refusable(command).await
                    } else {
                        self.broker.proposer.submit(command).await
                    };
                    let Ok(submitted) = submitted else {
                        return Some(End::Shutdown);
                    };
                    if let Some(slot) = slot {
                        s.acks.push_back(Box::pin(async move {
                            (slot, Resolution::Committed(submitted.wait().await.ok()))
                        }));
                    }
                }
                Action::Detached(command) => self.broker.proposer.propose_detached(command),
                Action::Retained { entries, existed } => {
                    let now = unix_ms();
                    let mut node = self.node(version, &mut more);
                    for d in retained_for(node.broker, &entries, &existed, now) {
                        s.m.deliver(d, now, &mut node);
                    }
                }
            }
            queue.extend(more);
        }
        *actions = Vec::from(queue);
        None
    }

    /// Dispatch a client's publish: to local subscribers, to other nodes' clients, and
    /// in one replicated command whatever it changes in the cluster's state (the
    /// retained message, persistent queues, a persistent publisher's QoS 2 identifier).
    async fn publish(
        &mut self,
        s: &mut Session,
        message: Arc<Message>,
        inbound: Option<InboundRecord>,
        slot: Option<Slot>,
        more: &mut Vec<Action>,
    ) -> Option<End> {
        let broker = self.broker.clone();
        let outcome = broker.dispatch(&message);
        let queued = outcome.queued();
        // Slow subscribers: wait for room (backpressure on this publisher), except for
        // this very client, whose channel only this task drains.
        let mut others = Vec::new();
        for b in outcome.blocked {
            if b.client_id == *s.m.client_id() {
                let now = unix_ms();
                s.m.deliver(*b.delivery, now, &mut self.node(s.m.version(), more));
            } else {
                others.push(b);
            }
        }
        super::dispatch::Blocked::wait_all(others, &broker.stats).await;
        let forwarded = broker.forward(outcome.forward, message.qos != 0).await;
        let (mut appends, mut fan_out) = (outcome.enqueue, outcome.fan_out);
        let refused = if queued > 0 && broker.node_queues_full() {
            broker.refuse_queueing(queued);
            appends = crate::cluster::command::Appends::default();
            fan_out = None;
            queued
        } else {
            0
        };
        let queued = queued - refused;
        let command = super::dispatch::publish_command(
            &message,
            appends,
            fan_out,
            broker.queue_limits(),
            inbound,
            message.retain,
        );
        let replicated = match command {
            None => None,
            Some(cmd) => match broker.proposer.submit(cmd).await {
                Ok(sub) => Some(sub),
                Err(_) => return Some(End::Shutdown),
            },
        };
        let (matched, delivered) = (outcome.matched, outcome.delivered);
        let Some(slot) = slot else {
            // Nobody waits; failures are logged by the proposer's callers.
            if let Some(r) = replicated {
                tokio::spawn(async move {
                    let _ = r.wait().await;
                });
            }
            return None;
        };
        s.acks.push_back(Box::pin(async move {
            let committed = match replicated {
                None => None,
                Some(r) => Some(r.wait().await.ok()),
            };
            wait_forwarded(forwarded).await;
            (
                slot,
                Resolution::Published {
                    matched,
                    delivered,
                    queued,
                    refused,
                    committed,
                },
            )
        }));
        None
    }
}

/// Retained messages for new subscriptions [MQTT-3.3.1-9], per Retain Handling.
fn retained_for(
    broker: &Broker,
    entries: &[(String, SubscriptionOptions)],
    existed: &[bool],
    now: u64,
) -> Vec<Delivery> {
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

/// Hand an ended session back to the cluster: unsent messages to its queue or to other
/// members of its shared groups, and its end recorded (unless the node shuts down).
async fn end_session(
    broker: &Arc<Broker>,
    mut session: Box<Session>,
    connection_id: u64,
    end: End,
) {
    let client_id = session.m.client_id().clone();
    broker.unregister(&client_id, connection_id);
    if let Some(acks) = session.m.final_acks() {
        broker.proposer.propose_detached(acks);
    }
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
    let unacked: Vec<Delivery> = session.m.take_unsent().into_iter().chain(unsent).collect();
    if session.m.persistent() {
        // A persistent session keeps them in its replicated queue, to be resent on
        // reconnect (they are here only with durable_sessions off).
        let appends = unacked
            .into_iter()
            .map(|d| crate::cluster::command::EnqueueEntry {
                client_id: client_id.clone(),
                message: d.message,
                qos: d.qos,
                retain: d.retain,
                subscription_ids: d.subscription_ids,
            })
            .collect();
        if let Err(e) = Box::pin(broker.commit_enqueue(appends)).await {
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
            expiry_secs: session.m.expiry_update(),
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
