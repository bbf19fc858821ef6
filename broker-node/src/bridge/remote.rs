//! A bridge's side towards the remote broker: an MQTT 3.1.1 or 5 client on the
//! project's codec, over TCP or TLS (our rustls, SNI and verification on
//! `tls_server_name` or the address's host). One task owns the connection and the
//! remote session's state ([`Session`]), which outlives each connection: after a
//! break it waits (exponential backoff with jitter), connects again, resumes the
//! remote session and sends what is owed. The link talks to it through [`Remote`]
//! (requests) and [`RemoteEvent`]s.
//!
//! Why not a client crate: rumqttc, used before, forgets its incoming QoS 2 state on
//! reconnection (a PUBREL sent again is then refused, so QoS 2 had to be subscribed
//! at QoS 1) and derives SNI from the address; exactly once per hop needs the state
//! above, which the codec makes small.

use std::time::Duration;

use bytes::BytesMut;
use rand::Rng;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{BridgeConfig, BridgeProtocol};
use crate::mqtt::{
    self, Connect, ConnectProperties, LastWill, Packet, ProtocolVersion, Publish, QoS,
    RetainHandling, Subscribe, SubscriptionOptions,
};

use super::session::{Ack, Outgoing, Output, Session, INFLIGHT};
use super::topics::Needed;
use super::BridgeError;

/// Requests waiting for the client's task.
const REQUEST_CAPACITY: usize = 64;
/// The longest a TCP connect, TLS handshake or CONNACK may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A message from the remote broker, to be acknowledged once published locally.
pub struct Incoming {
    /// The PUBLISH (topic as named on the remote).
    pub publish: Publish,
    /// What acknowledging it needs.
    pub ack: Ack,
}

/// What happened on the remote connection.
pub enum RemoteEvent {
    /// CONNACK accepted.
    Connected {
        /// Whether the remote resumed the bridge's session.
        session_present: bool,
    },
    /// A message arrived (once: a copy the remote sends again is not reported).
    Message(Box<Incoming>),
    /// The remote took message `ticket` (PUBACK for QoS 1, PUBCOMP for QoS 2, sent
    /// for QoS 0), or refused it for good.
    Done {
        /// The link's name for it.
        ticket: u64,
        /// The remote's refusal, if it refused.
        refused: Option<mqtt::ReasonCode>,
    },
    /// The connection broke or was refused; the client waits and tries again.
    Lost(String),
}

enum Request {
    Publish(Box<Outgoing>),
    Ack(Ack),
}

/// The client's handle: publish, acknowledge.
#[derive(Clone)]
pub struct Remote {
    requests: mpsc::Sender<Request>,
}

impl Remote {
    /// Start the client of `config`, subscribing to `filters` on each new remote
    /// session: it runs until `cancel` or until `events` has no receiver.
    pub fn start(
        config: &BridgeConfig,
        filters: Vec<Needed>,
        events: mpsc::UnboundedSender<RemoteEvent>,
        cancel: CancellationToken,
    ) -> Result<Remote, BridgeError> {
        let target = Target::of(config)?;
        let (requests, rx) = mpsc::channel(REQUEST_CAPACITY);
        let client = Client {
            version: match config.protocol {
                BridgeProtocol::V311 => ProtocolVersion::V3_1_1,
                BridgeProtocol::V5 => ProtocolVersion::V5,
            },
            connect: connect_packet(config),
            keep_alive: config.keep_alive.max(Duration::from_secs(5)),
            target,
            filters,
            subscribed: false,
            session: Session::default(),
            requests: rx,
            events,
        };
        tokio::spawn(client.run(
            Backoff::new(config.reconnect_min, config.reconnect_max),
            cancel,
        ));
        Ok(Remote { requests })
    }

    /// Publish a message on the remote; `ticket` comes back in
    /// [`RemoteEvent::Done`].
    pub async fn publish(&self, message: Outgoing) -> Result<(), BridgeError> {
        self.send(Request::Publish(Box::new(message))).await
    }

    /// Acknowledge a message from the remote.
    pub async fn ack(&self, ack: Ack) -> Result<(), BridgeError> {
        self.send(Request::Ack(ack)).await
    }

    async fn send(&self, r: Request) -> Result<(), BridgeError> {
        self.requests
            .send(r)
            .await
            .map_err(|_| BridgeError::Remote("client stopped".into()))
    }
}

/// The CONNECT the bridge sends each time.
fn connect_packet(config: &BridgeConfig) -> Connect {
    let v5 = config.protocol == BridgeProtocol::V5;
    Connect {
        protocol: if v5 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V3_1_1
        },
        clean_start: config.clean_start,
        keep_alive: u16::try_from(config.keep_alive.max(Duration::from_secs(5)).as_secs())
            .unwrap_or(u16::MAX),
        client_id: config.remote_client_id(),
        // The remote publishes "0" on the notification topic when we vanish.
        will: config.notifications.then(|| LastWill {
            topic: config.notification_topic(),
            payload: bytes::Bytes::from_static(b"0"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Default::default(),
        }),
        username: config.username.clone(),
        password: config
            .username
            .as_ref()
            .map(|_| bytes::Bytes::from(config.password.clone().unwrap_or_default())),
        properties: if v5 {
            ConnectProperties {
                session_expiry_interval: Some(
                    u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX),
                ),
                receive_maximum: Some(INFLIGHT),
                maximum_packet_size: Some(super::MAX_PACKET),
                ..Default::default()
            }
        } else {
            ConnectProperties::default()
        },
    }
}

/// Where and how to connect.
struct Target {
    host: String,
    port: u16,
    /// The TLS connector and the name for SNI and verification, if TLS.
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Target {
    fn of(config: &BridgeConfig) -> Result<Target, BridgeError> {
        let (host, port) = config
            .address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_owned(), p.parse().ok()?)))
            .ok_or_else(|| BridgeError::Config(format!("'{}' is not HOST:PORT", config.address)))?;
        let tls = if config.tls {
            let name = config
                .tls_server_name
                .clone()
                .unwrap_or_else(|| host.clone());
            let name = ServerName::try_from(name)
                .map_err(|e| BridgeError::Config(format!("TLS server name: {e}")))?;
            let connector = tokio_rustls::TlsConnector::from(super::tls::client_config(config)?);
            Some((connector, name))
        } else {
            None
        };
        Ok(Target { host, port, tls })
    }

    async fn connect(&self) -> Result<Box<dyn Stream>, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some((connector, name)) => Ok(Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?,
            )),
        }
    }
}

/// A byte stream to the remote: TCP or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One connection: packets in and out over a stream.
struct Wire {
    stream: Box<dyn Stream>,
    version: ProtocolVersion,
    read: BytesMut,
    write: BytesMut,
}

impl Wire {
    /// The next packet, waiting for bytes as needed; cancel-safe.
    async fn next(&mut self) -> Result<Packet, String> {
        loop {
            if let Some(p) = mqtt::decode(&mut self.read, Some(self.version), super::MAX_PACKET)
                .map_err(|e| format!("bad packet from the remote: {e}"))?
            {
                return Ok(p);
            }
            if self
                .stream
                .read_buf(&mut self.read)
                .await
                .map_err(|e| format!("read: {e}"))?
                == 0
            {
                return Err("connection closed by the remote".into());
            }
        }
    }

    async fn send(&mut self, packets: impl IntoIterator<Item = Packet>) -> Result<(), String> {
        self.write.clear();
        for p in packets {
            mqtt::encode(&p, self.version, &mut self.write)
                .map_err(|e| format!("cannot encode: {e}"))?;
        }
        if self.write.is_empty() {
            return Ok(());
        }
        self.stream
            .write_all(&self.write)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.stream.flush().await.map_err(|e| format!("write: {e}"))
    }
}

/// The client's task state.
struct Client {
    version: ProtocolVersion,
    connect: Connect,
    keep_alive: Duration,
    target: Target,
    filters: Vec<Needed>,
    /// Whether this run subscribed once: after that, only a new remote session
    /// needs the subscriptions again (so a resumed one does not resend retained
    /// messages to a 3.1.1 bridge each time).
    subscribed: bool,
    session: Session,
    requests: mpsc::Receiver<Request>,
    events: mpsc::UnboundedSender<RemoteEvent>,
}

impl Client {
    async fn run(mut self, mut backoff: Backoff, cancel: CancellationToken) {
        loop {
            let why = tokio::select! {
                _ = cancel.cancelled() => return,
                why = self.connection(&mut backoff) => why,
            };
            self.session.disconnected();
            if self.events.send(RemoteEvent::Lost(why)).is_err() {
                return;
            }
            // Wait, still taking requests (acknowledgements are kept for the next
            // connection, publishes queue).
            let wait = tokio::time::sleep(backoff.next_wait());
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = &mut wait => break,
                    r = self.requests.recv() => match r {
                        None => return,
                        Some(r) => { self.request(r); }
                    },
                }
            }
        }
    }

    /// Take a request; what it asks to send.
    fn request(&mut self, r: Request) -> Vec<Output> {
        match r {
            Request::Publish(o) => self.session.publish(*o),
            Request::Ack(a) => self.session.ack(a),
        }
    }

    /// Connect and serve one connection; why it ended.
    async fn connection(&mut self, backoff: &mut Backoff) -> String {
        let (mut wire, connack) =
            match tokio::time::timeout(CONNECT_TIMEOUT, self.handshake()).await {
                Ok(Ok(connected)) => connected,
                Ok(Err(e)) => return e,
                Err(_) => return format!("no CONNACK within {CONNECT_TIMEOUT:?}"),
            };
        backoff.reset();
        match self.serve(&mut wire, &connack).await {
            Ok(()) => "events closed".into(),
            Err(e) => e,
        }
    }

    /// TCP, TLS, CONNECT and CONNACK.
    async fn handshake(&mut self) -> Result<(Wire, mqtt::ConnAck), String> {
        let stream = self.target.connect().await?;
        let mut wire = Wire {
            stream,
            version: self.version,
            read: BytesMut::with_capacity(4096),
            write: BytesMut::with_capacity(4096),
        };
        wire.send([Packet::Connect(Box::new(self.connect.clone()))])
            .await?;
        match wire.next().await? {
            Packet::ConnAck(c) if !c.reason_code.is_error() => Ok((wire, c)),
            Packet::ConnAck(c) => Err(format!("refused by the remote: {:?}", c.reason_code)),
            _ => Err("the remote answered CONNECT with something other than CONNACK".into()),
        }
    }

    /// Resume the session on `wire` and move packets until it breaks.
    async fn serve(&mut self, wire: &mut Wire, connack: &mqtt::ConnAck) -> Result<(), String> {
        let session_present = connack.session_present;
        let keep_alive = match connack.properties.server_keep_alive {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(u64::from(s))),
            None => Some(self.keep_alive),
        };
        let _ = self.events.send(RemoteEvent::Connected { session_present });
        let mut out = self.session.connected(connack);
        if !session_present || !self.subscribed {
            if let Some(subscribe) = self.subscribe() {
                out.push(Output::Send(subscribe));
            }
        }
        self.output(wire, out).await?;

        let mut ping =
            keep_alive.map(|d| tokio::time::interval_at(tokio::time::Instant::now() + d, d));
        let mut heard = true;
        loop {
            tokio::select! {
                packet = wire.next() => {
                    let packet = packet?;
                    heard = true;
                    if matches!(packet, Packet::SubAck(_)) {
                        self.subscribed = true;
                        log_refusals(&packet, &self.filters);
                    }
                    let out = self.session.received(packet)?;
                    self.output(wire, out).await?;
                }
                r = self.requests.recv() => {
                    let Some(r) = r else { return Ok(()) };
                    let out = self.request(r);
                    self.output(wire, out).await?;
                }
                _ = tick(&mut ping) => {
                    if !heard {
                        return Err("no answer from the remote within the keep alive".into());
                    }
                    heard = false;
                    wire.send([Packet::PingReq]).await?;
                }
            }
        }
    }

    /// The SUBSCRIBE of every filter (v5: no-local and retain as published, so what
    /// the bridge publishes is not sent back; retained messages only for a new
    /// subscription).
    fn subscribe(&mut self) -> Option<Packet> {
        if self.filters.is_empty() {
            return None;
        }
        let filters = self
            .filters
            .iter()
            .map(|n| {
                let v5 = self.version.is_v5();
                (
                    n.filter.clone(),
                    SubscriptionOptions {
                        qos: QoS::try_from(n.qos).unwrap_or(QoS::AtLeastOnce),
                        no_local: v5,
                        retain_as_published: v5,
                        retain_handling: RetainHandling::SendIfNew,
                    },
                )
            })
            .collect();
        Some(Packet::Subscribe(Subscribe {
            packet_id: self.session.subscribe_id(),
            filters,
            properties: Default::default(),
        }))
    }

    /// Send the session's packets, report its events.
    async fn output(&mut self, wire: &mut Wire, out: Vec<Output>) -> Result<(), String> {
        let mut packets = Vec::new();
        for o in out {
            match o {
                Output::Send(p) => packets.push(p),
                Output::Deliver(publish, ack) => {
                    let _ = self
                        .events
                        .send(RemoteEvent::Message(Box::new(Incoming { publish, ack })));
                }
                Output::Done { ticket, refused } => {
                    let _ = self.events.send(RemoteEvent::Done { ticket, refused });
                }
            }
        }
        wire.send(packets).await
    }
}

/// The next keep-alive tick, or never without keep alive.
async fn tick(ping: &mut Option<tokio::time::Interval>) {
    match ping {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn log_refusals(packet: &Packet, filters: &[Needed]) {
    if let Packet::SubAck(s) = packet {
        for (code, n) in s.reason_codes.iter().zip(filters) {
            if code.is_error() {
                tracing::warn!(filter = %n.filter, ?code, "bridge: the remote refused a subscription");
            }
        }
    }
}

/// Exponential backoff with full jitter: the n-th wait is drawn from
/// [base/2, base] where base = min(max, min × 2ⁿ).
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// From `min` doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            failures: 0,
        }
    }

    /// The wait before the next attempt.
    pub fn next_wait(&mut self) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = base / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    /// A connection succeeded: start again from `min`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_maximum_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for base in [100u64, 200, 400, 800, 1000, 1000] {
            let d = b.next_wait();
            assert!(
                d >= Duration::from_millis(base / 2) && d <= Duration::from_millis(base),
                "{d:?} outside [{}ms, {base}ms]",
                base / 2
            );
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }
}
