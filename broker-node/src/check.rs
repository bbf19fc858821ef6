//! `broker-node check-pubsub`: an end-to-end check of a running broker or cluster as
//! a client sees it, for the Helm chart's `helm test` pod and for operators. One
//! connection subscribes to a topic of its own, a second one (which a Service may
//! send to another node) publishes a QoS 1 message there, and the check passes when
//! the subscriber receives it.
//!
//! It is a small blocking client on FlockMQ's own codec (MQTT 5.0, clean sessions
//! that end with the check) and owns nothing of the broker.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};

use crate::mqtt::{
    self, Connect, Disconnect, Packet, ProtocolVersion, Publish, QoS, ReasonCode, RetainHandling,
    Subscribe, SubscriptionOptions,
};

/// What the check connects with.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` of the MQTT listener (plain TCP).
    pub addr: String,
    /// The username, if clients must log in.
    pub username: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// How long each step may take.
    pub timeout: Duration,
}

/// Run the check; `Ok` with a line that says what was seen.
pub fn pubsub(target: &Target) -> anyhow::Result<String> {
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        crate::clock::unix_ms() % 1_000_000_000
    );
    let topic = format!("flockmq-check/{nonce}");
    let mut sub = Client::connect(target, &format!("check-sub-{nonce}"))?;
    sub.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            topic.clone(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: RetainHandling::DoNotSend,
            },
        )],
        properties: Default::default(),
    }))?;
    match sub.expect("SUBACK", |p| matches!(p, Packet::SubAck(_)))? {
        Packet::SubAck(ack) if ack.reason_codes.iter().all(|c| !c.is_error()) => {}
        Packet::SubAck(ack) => bail!("subscription to {topic} refused: {:?}", ack.reason_codes),
        _ => unreachable!("expect returns what it matched"),
    }
    let mut publisher = Client::connect(target, &format!("check-pub-{nonce}"))?;
    let payload = Bytes::from(format!("check {nonce}"));
    publisher.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.clone(),
        packet_id: Some(1),
        properties: Default::default(),
        payload: payload.clone(),
    }))?;
    match publisher.expect("PUBACK", |p| matches!(p, Packet::PubAck(_)))? {
        Packet::PubAck(ack) if !ack.reason_code.is_error() => {}
        Packet::PubAck(ack) => bail!("publish to {topic} refused: {:?}", ack.reason_code),
        _ => unreachable!("expect returns what it matched"),
    }
    let got = sub.expect(
        "the published message",
        |p| matches!(p, Packet::Publish(m) if m.topic == topic),
    )?;
    let Packet::Publish(message) = got else {
        unreachable!("expect returns what it matched")
    };
    if message.payload != payload {
        bail!(
            "{topic} carried {:?}, not what was published",
            message.payload
        );
    }
    if let Some(id) = message.packet_id {
        sub.send(&Packet::PubAck(mqtt::PubAck::new(id, ReasonCode::Success)))?;
    }
    for client in [&mut sub, &mut publisher] {
        let _ = client.send(&Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::Success,
            properties: Default::default(),
        }));
    }
    Ok(format!(
        "a QoS 1 message published through {} reached its subscriber through {} ({topic})",
        publisher.peer, sub.peer
    ))
}

/// One blocking MQTT 5.0 connection.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
    timeout: Duration,
    /// The address it reached.
    peer: String,
}

impl Client {
    fn connect(target: &Target, client_id: &str) -> anyhow::Result<Client> {
        let addr = target
            .addr
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {}", target.addr))?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to no address", target.addr))?;
        let stream = TcpStream::connect_timeout(&addr, target.timeout)
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut client = Client {
            stream,
            buf: BytesMut::new(),
            timeout: target.timeout,
            peer: addr.to_string(),
        };
        client.send(&Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 30,
            client_id: client_id.to_owned(),
            will: None,
            username: target.username.clone(),
            password: target.password.clone().map(Bytes::from),
            properties: Default::default(),
        })))?;
        match client.expect("CONNACK", |p| matches!(p, Packet::ConnAck(_)))? {
            Packet::ConnAck(ack) if ack.reason_code == ReasonCode::Success => Ok(client),
            Packet::ConnAck(ack) => bail!("{addr} refused the connection: {:?}", ack.reason_code),
            _ => unreachable!("expect returns what it matched"),
        }
    }

    fn send(&mut self, packet: &Packet) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        mqtt::encode(packet, ProtocolVersion::V5, &mut out)
            .map_err(|e| anyhow!("cannot encode {packet:?}: {e}"))?;
        self.stream
            .write_all(&out)
            .with_context(|| format!("cannot write to {}", self.peer))
    }

    /// The first packet `wanted` accepts, skipping others, within the timeout.
    fn expect(&mut self, what: &str, wanted: impl Fn(&Packet) -> bool) -> anyhow::Result<Packet> {
        let deadline = Instant::now() + self.timeout;
        loop {
            while let Some(p) = mqtt::decode(&mut self.buf, Some(ProtocolVersion::V5), 1 << 20)
                .map_err(|e| anyhow!("{} sent a malformed packet: {e:?}", self.peer))?
            {
                if wanted(&p) {
                    return Ok(p);
                }
                if let Packet::Disconnect(d) = p {
                    bail!("{} disconnected: {:?}", self.peer, d.reason_code);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no {what} from {} within {:?}", self.peer, self.timeout);
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("{} closed the connection before {what}", self.peer),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => bail!("reading from {}: {e}", self.peer),
            }
        }
    }
}
