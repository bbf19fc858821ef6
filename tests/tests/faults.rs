//! Faults on real processes, checked against the history of what clients saw:
//! DESIGN.md's invariant 1 (an acknowledged QoS ≥ 1 publish is not lost while a
//! majority is up) and exactly-once for QoS 2, with persistent sessions, while nodes
//! are killed (kill -9), paused (SIGSTOP/SIGCONT), restarted and cut off from their
//! peers by the kernel mid-stream.
//!
//! Three nodes, each in a network namespace of its own (`flockmq_tests::netns`: a cut
//! is iptables dropping the node's packets to and from its peers, both ways, while
//! its clients still reach it). Four subscribers with persistent sessions (two MQTT 5 with a session
//! expiry of 600 s, two MQTT 3.1.1 with Clean Session 0), subscribed at QoS 2 to
//! `faults/#`, spread over the nodes. Four publishers (persistent sessions too) send
//! numbered messages (`<publisher>:<seq>:<qos>`, three in four at QoS 2, the rest at
//! QoS 1) at a bounded total rate. Every client implements its side of the QoS flows
//! as the specification asks: a publisher keeps each message until PUBACK / PUBCOMP,
//! answers PUBREC with PUBREL, and after a broken connection reconnects to another
//! node with Clean Start 0 and resends, in order, every unacknowledged PUBLISH (DUP,
//! same packet id) and every PUBREL due; a subscriber answers PUBLISH with PUBACK /
//! PUBREC, hands a QoS 2 message over once (a resend of a packet id still awaiting
//! PUBREL is suppressed, as a real client does), and answers PUBREL with PUBCOMP. A
//! client that hears nothing from its node for a few seconds (a paused node) gives the
//! connection up and reconnects elsewhere.
//!
//! The fault schedule is derived from a seed printed at the start; at most one node
//! is down (killed, paused or cut off) at a time, and the next fault waits until the
//! previous node has caught up. After the faults stop, the publishers finish their flows, the
//! subscribers drain their queues and the cluster converges; then the checker asserts,
//! for every subscriber: every acknowledged message of every publisher was received
//! (no loss), no QoS 2 message was handed over twice (by publisher and sequence
//! number), and within one connection each publisher's messages of one QoS arrived in
//! increasing order. A summary line gives the figures.
//!
//! The CI version publishes for 20 s at 120 msg/s with one kill -9 (of a node that
//! has a subscriber) and one pause (5 to 7 s, longer than the 4 s of silence after
//! which a client gives its node up, so sessions are taken over from a live but
//! frozen node). Cuts run in the long version only, until the bug the first CI run
//! with one found is fixed: a publish refused while its node was cut off (v5 0x80
//! after `cluster.write_timeout`) is still committed once the cut heals, its batch
//! being sent again, and delivered after its publisher's later messages (seed
//! 1796499479040952253; docs/reliability.md). The long version:
//!
//! ```text
//! FAULTS_SECONDS=300 FAULTS_RATE=200 FAULTS_SEED=12345 \
//!   cargo test -p flockmq-tests --test faults -- --nocapture
//! ```
//!
//! `FAULTS_SECONDS` (publishing time; above the CI default the schedule injects a
//! fault every 4 to 10 s, kills, pauses and cuts chosen by the seed), `FAULTS_RATE` (messages
//! per second, all publishers together), `FAULTS_SEED` (the schedule; random when
//! unset, and printed either way so that a failing run can be replayed).
//! `long_run_of_kills_pauses_and_cuts` (ignored for its length; see its comment)
//! is the same with 180 s at 200 msg/s by default:
//! `cargo test -p flockmq-tests --test faults -- --ignored --nocapture`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use broker_node::mqtt::{
    ConnAck, Connect, ConnectProperties, Packet, ProtocolVersion, PubAck, PubComp, PubRec, PubRel,
    Publish, PublishProperties, QoS, ReasonCode, RetainHandling, Subscribe, SubscribeProperties,
    SubscriptionOptions,
};
use bytes::{Bytes, BytesMut};
use flockmq_tests::netns::Network;
use flockmq_tests::{converged, running, Node, Rng};

const NODES: usize = 3;
const PUBLISHERS: usize = 4;
const SUBSCRIBERS: usize = 4;
/// Unacknowledged messages a publisher keeps in flight at most.
const WINDOW: usize = 32;
/// Silence after which a client sends PINGREQ.
const PING_AFTER: Duration = Duration::from_secs(1);
/// Silence after which a client gives its connection up (a paused node).
const DEAD_AFTER: Duration = Duration::from_secs(4);
/// How long a client waits for CONNACK before trying the next node.
const CONNACK_WAIT: Duration = Duration::from_secs(6);

// ---------------------------------------------------------------------------------
// A connection that reports a broken socket instead of panicking.

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    version: ProtocolVersion,
    last_rx: Instant,
    ping_sent: bool,
}

impl Conn {
    /// Connect to `addr` and CONNECT with Clean Start 0 and a persistent session.
    fn connect(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
    ) -> Result<(Conn, ConnAck), String> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        // A paused node's socket buffers fill up: a write must not block for ever.
        stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut c = Conn {
            stream,
            buf: BytesMut::new(),
            version,
            last_rx: Instant::now(),
            ping_sent: false,
        };
        let properties = ConnectProperties {
            session_expiry_interval: version.is_v5().then_some(600),
            ..Default::default()
        };
        c.send(&Packet::Connect(Box::new(Connect {
            protocol: version,
            clean_start: false,
            keep_alive: 30,
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
            properties,
        })))?;
        let deadline = Instant::now() + CONNACK_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no CONNACK from {addr}"));
            }
            match c.recv(left)? {
                Some(Packet::ConnAck(ack)) => return Ok((c, ack)),
                Some(other) => return Err(format!("expected CONNACK, got {other:?}")),
                None => {}
            }
        }
    }

    fn send(&mut self, packet: &Packet) -> Result<(), String> {
        let mut out = BytesMut::new();
        broker_node::mqtt::encode(packet, self.version, &mut out).expect("encode");
        self.stream
            .write_all(&out)
            .map_err(|e| format!("write: {e}"))
    }

    /// The next packet within `timeout` (`Ok(None)`: nothing yet), or why the
    /// connection is over.
    fn recv(&mut self, timeout: Duration) -> Result<Option<Packet>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match broker_node::mqtt::decode(&mut self.buf, Some(self.version), 268_435_455) {
                Ok(Some(p)) => {
                    self.last_rx = Instant::now();
                    self.ping_sent = false;
                    if let Packet::Disconnect(d) = &p {
                        return Err(format!("DISCONNECT {:?}", d.reason_code));
                    }
                    return Ok(Some(p));
                }
                Ok(None) => {}
                Err(e) => return Err(format!("malformed packet from the broker: {e:?}")),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("closed by the broker".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Keep the connection honest: PINGREQ after a silence, and give up after a long
    /// one (the node is paused or gone without a FIN).
    fn check_alive(&mut self) -> Result<(), String> {
        let quiet = self.last_rx.elapsed();
        if quiet >= DEAD_AFTER {
            return Err(format!("nothing heard for {quiet:?}"));
        }
        if quiet >= PING_AFTER && !self.ping_sent {
            self.ping_sent = true;
            self.send(&Packet::PingReq)?;
        }
        Ok(())
    }
}

/// Connect `client_id` to the first node after `*node` (round robin) that answers
/// with a successful CONNACK; `*node` becomes that node. `None` once `stop` is set.
fn reconnect(
    addrs: &[SocketAddr],
    node: &mut usize,
    version: ProtocolVersion,
    client_id: &str,
    stop: &AtomicBool,
) -> Option<(Conn, bool)> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        *node = (*node + 1) % addrs.len();
        match Conn::connect(addrs[*node], version, client_id) {
            Ok((c, ack)) if !ack.reason_code.is_error() => return Some((c, ack.session_present)),
            Ok((_, ack)) => eprintln!("{client_id}: node {} refused: {ack:?}", *node + 1),
            Err(e) => eprintln!("{client_id}: node {}: {e}", *node + 1),
        }
        // Pacing the retries, not synchronizing: the next node is tried right after.
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn version_of(i: usize) -> ProtocolVersion {
    if i % 2 == 0 {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V3_1_1
    }
}

/// Three in four messages at QoS 2, the rest at QoS 1.
fn qos_of(seq: u64) -> QoS {
    if seq % 4 == 3 {
        QoS::AtLeastOnce
    } else {
        QoS::ExactlyOnce
    }
}

// ---------------------------------------------------------------------------------
// Publishers.

#[derive(Default)]
struct PubRecord {
    sent: u64,
    /// Sequence numbers acknowledged (PUBACK / PUBCOMP): only these are promised.
    acked: HashSet<u64>,
    /// Refused by an error reason code (not promised), by reason code.
    refused: BTreeMap<String, u64>,
    /// Still unacknowledged when the publisher gave up at the end.
    unfinished: u64,
    reconnects: u64,
    /// Sequence numbers resent as PUBLISH with DUP after a reconnect.
    resent: HashSet<u64>,
    /// PUBCOMP 0x92 (Packet Identifier not found) answering a resent PUBREL: the
    /// release had committed but its PUBCOMP was lost with the connection. The
    /// message was accepted at PUBREC, so it counts as acknowledged.
    pubcomp_not_found: u64,
    /// Protocol surprises: acknowledgements of unknown packet ids, sessions lost.
    anomalies: Vec<String>,
}

struct InFlight {
    packet_id: u16,
    seq: u64,
    qos: QoS,
    /// PUBREC received and PUBREL sent: the resend is a PUBREL.
    released: bool,
}

struct Publisher {
    id: usize,
    client_id: String,
    version: ProtocolVersion,
    addrs: Vec<SocketAddr>,
    node: usize,
    conn: Option<Conn>,
    inflight: Vec<InFlight>,
    next_packet_id: u16,
    next_seq: u64,
    record: Arc<Mutex<PubRecord>>,
}

impl Publisher {
    fn publish_packet(&self, m: &InFlight, dup: bool) -> Packet {
        let topic = format!("faults/p{}/q{}", self.id, m.qos as u8);
        Packet::Publish(Publish {
            dup,
            qos: m.qos,
            retain: false,
            topic,
            packet_id: Some(m.packet_id),
            properties: PublishProperties::default(),
            payload: Bytes::from(format!("{}:{}:{}", self.id, m.seq, m.qos as u8)),
        })
    }

    fn allocate_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.iter().any(|m| m.packet_id == id) {
                return id;
            }
        }
    }

    /// Send through the current connection; a failure drops it (the message stays in
    /// flight and is resent after the reconnect).
    fn send(&mut self, packet: &Packet) {
        if let Some(c) = self.conn.as_mut() {
            if let Err(e) = c.send(packet) {
                eprintln!("{}: {e}", self.client_id);
                self.conn = None;
            }
        }
    }

    /// Reconnect and resend what is unacknowledged, in the original order [MQTT-4.4.0-1].
    fn ensure_connected(&mut self, stop: &AtomicBool, first: &mut bool) -> bool {
        if self.conn.is_some() {
            return true;
        }
        let Some((conn, present)) = reconnect(
            &self.addrs,
            &mut self.node,
            self.version,
            &self.client_id,
            stop,
        ) else {
            return false;
        };
        {
            let mut r = self.record.lock().unwrap();
            if !*first {
                r.reconnects += 1;
                if !present {
                    r.anomalies.push(format!(
                        "session not present on reconnect to node {}",
                        self.node + 1
                    ));
                }
            }
        }
        *first = false;
        self.conn = Some(conn);
        self.record
            .lock()
            .unwrap()
            .resent
            .extend(self.inflight.iter().filter(|m| !m.released).map(|m| m.seq));
        let resends: Vec<Packet> = self
            .inflight
            .iter()
            .map(|m| {
                if m.released {
                    Packet::PubRel(PubRel::new(m.packet_id, ReasonCode::Success))
                } else {
                    self.publish_packet(m, true)
                }
            })
            .collect();
        for p in &resends {
            self.send(p);
        }
        self.conn.is_some()
    }

    fn on_packet(&mut self, p: Packet) {
        let position =
            |inflight: &[InFlight], id: u16| inflight.iter().position(|m| m.packet_id == id);
        match p {
            Packet::PubAck(a) => match position(&self.inflight, a.packet_id) {
                Some(i) if self.inflight[i].qos == QoS::AtLeastOnce => {
                    let m = self.inflight.remove(i);
                    let mut r = self.record.lock().unwrap();
                    if a.reason_code.is_error() {
                        *r.refused
                            .entry(format!("PUBACK {:?}", a.reason_code))
                            .or_default() += 1;
                    } else {
                        r.acked.insert(m.seq);
                    }
                }
                _ => self.anomaly(format!("PUBACK of unknown packet id: {a:?}")),
            },
            Packet::PubRec(a) => match position(&self.inflight, a.packet_id) {
                Some(i) if self.inflight[i].qos == QoS::ExactlyOnce => {
                    if a.reason_code.is_error() {
                        self.inflight.remove(i);
                        *self
                            .record
                            .lock()
                            .unwrap()
                            .refused
                            .entry(format!("PUBREC {:?}", a.reason_code))
                            .or_default() += 1;
                    } else {
                        self.inflight[i].released = true;
                        self.send(&Packet::PubRel(PubRel::new(
                            a.packet_id,
                            ReasonCode::Success,
                        )));
                    }
                }
                _ => {
                    self.anomaly(format!("PUBREC of unknown packet id: {a:?}"));
                    self.send(&Packet::PubRel(PubRel::new(
                        a.packet_id,
                        ReasonCode::PacketIdentifierNotFound,
                    )));
                }
            },
            Packet::PubComp(a) => match position(&self.inflight, a.packet_id) {
                Some(i) if self.inflight[i].released => {
                    let m = self.inflight.remove(i);
                    let mut r = self.record.lock().unwrap();
                    if a.reason_code == ReasonCode::PacketIdentifierNotFound {
                        r.pubcomp_not_found += 1;
                        r.acked.insert(m.seq);
                    } else if a.reason_code.is_error() {
                        r.anomalies
                            .push(format!("PUBCOMP with an error after PUBREC: {a:?}"));
                    } else {
                        r.acked.insert(m.seq);
                    }
                }
                _ => self.anomaly(format!("PUBCOMP of unknown packet id: {a:?}")),
            },
            Packet::PingResp => {}
            other => self.anomaly(format!("publisher got {other:?}")),
        }
    }

    fn anomaly(&self, what: String) {
        eprintln!("{}: ANOMALY {what}", self.client_id);
        self.record.lock().unwrap().anomalies.push(what);
    }

    fn run(mut self, rate_per_s: f64, stop_publishing: Arc<AtomicBool>, give_up: Arc<AtomicBool>) {
        let interval = Duration::from_secs_f64(1.0 / rate_per_s);
        let mut next_at = Instant::now();
        let mut first = true;
        loop {
            let stopping = stop_publishing.load(Ordering::SeqCst);
            if stopping && self.inflight.is_empty() {
                return;
            }
            if give_up.load(Ordering::SeqCst) {
                self.record.lock().unwrap().unfinished = self.inflight.len() as u64;
                return;
            }
            if !self.ensure_connected(&give_up, &mut first) {
                continue;
            }
            let now = Instant::now();
            if !stopping && self.inflight.len() < WINDOW && now >= next_at {
                let seq = self.next_seq;
                self.next_seq += 1;
                let m = InFlight {
                    packet_id: self.allocate_packet_id(),
                    seq,
                    qos: qos_of(seq),
                    released: false,
                };
                let packet = self.publish_packet(&m, false);
                self.inflight.push(m);
                self.record.lock().unwrap().sent += 1;
                self.send(&packet);
                // Behind by more than a second (a failover): do not burst to catch up.
                next_at = (next_at + interval).max(now - Duration::from_secs(1));
                continue;
            }
            let wait = if stopping || self.inflight.len() >= WINDOW {
                Duration::from_millis(50)
            } else {
                next_at
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(50))
            };
            let Some(c) = self.conn.as_mut() else {
                continue;
            };
            let got = c.recv(wait).and_then(|p| {
                if p.is_none() {
                    c.check_alive()?;
                }
                Ok(p)
            });
            match got {
                Ok(Some(p)) => self.on_packet(p),
                Ok(None) => {}
                Err(e) => {
                    eprintln!(
                        "{}: connection to node {} lost: {e}",
                        self.client_id,
                        self.node + 1
                    );
                    self.conn = None;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Subscribers.

struct Delivery {
    publisher: usize,
    seq: u64,
    qos: QoS,
    /// Which connection (0, 1, ...) of this subscriber it arrived on.
    connection: u64,
    dup: bool,
    packet_id: u16,
    /// Since the subscriber started.
    at: Duration,
}

#[derive(Default)]
struct SubRecord {
    /// Messages handed over to the application, in arrival order.
    delivered: Vec<Delivery>,
    /// QoS 2 resends of a packet id still awaiting PUBREL (not handed over).
    suppressed: u64,
    /// QoS 1 resends flagged DUP (allowed: at least once).
    qos1_redelivered: u64,
    /// Packet ids awaiting PUBREL right now.
    awaiting_release: usize,
    connected: bool,
    reconnects: u64,
    anomalies: Vec<String>,
}

struct Subscriber {
    client_id: String,
    version: ProtocolVersion,
    addrs: Vec<SocketAddr>,
    node: usize,
    awaiting_release: HashSet<u16>,
    connection: u64,
    started: Instant,
    record: Arc<Mutex<SubRecord>>,
}

impl Subscriber {
    /// Connect to its first node and subscribe to `faults/#` at QoS 2.
    fn start(&mut self) -> Conn {
        let (mut c, ack) = Conn::connect(self.addrs[self.node], self.version, &self.client_id)
            .unwrap_or_else(|e| panic!("{}: {e}", self.client_id));
        assert!(!ack.reason_code.is_error(), "{}: {ack:?}", self.client_id);
        self.subscribe(&mut c);
        c
    }

    fn subscribe(&self, c: &mut Conn) {
        c.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                "faults/#".into(),
                SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: RetainHandling::SendAtSubscribe,
                },
            )],
            properties: SubscribeProperties::default(),
        }))
        .expect("SUBSCRIBE");
        match c.recv(Duration::from_secs(10)) {
            Ok(Some(Packet::SubAck(a))) => {
                assert!(!a.reason_codes[0].is_error(), "{}: {a:?}", self.client_id)
            }
            other => panic!("{}: expected SUBACK, got {other:?}", self.client_id),
        }
    }

    fn on_packet(&mut self, c: &mut Conn, p: Packet) -> Result<(), String> {
        match p {
            Packet::Publish(p) => {
                let id = p
                    .packet_id
                    .ok_or("QoS 0 delivery on a QoS 2 subscription")?;
                let text = String::from_utf8_lossy(&p.payload).into_owned();
                let mut parts = text.split(':').map(|s| s.parse::<u64>());
                let (Some(Ok(publisher)), Some(Ok(seq))) = (parts.next(), parts.next()) else {
                    return Err(format!("unexpected payload {text:?}"));
                };
                let mut r = self.record.lock().unwrap();
                match p.qos {
                    QoS::AtLeastOnce => {
                        if p.dup {
                            r.qos1_redelivered += 1;
                        }
                        r.delivered.push(Delivery {
                            publisher: publisher as usize,
                            seq,
                            qos: p.qos,
                            connection: self.connection,
                            dup: p.dup,
                            packet_id: id,
                            at: self.started.elapsed(),
                        });
                        drop(r);
                        c.send(&Packet::PubAck(PubAck::new(id, ReasonCode::Success)))?;
                    }
                    QoS::ExactlyOnce => {
                        if self.awaiting_release.insert(id) {
                            r.delivered.push(Delivery {
                                publisher: publisher as usize,
                                seq,
                                qos: p.qos,
                                connection: self.connection,
                                dup: p.dup,
                                packet_id: id,
                                at: self.started.elapsed(),
                            });
                        } else {
                            r.suppressed += 1;
                        }
                        r.awaiting_release = self.awaiting_release.len();
                        drop(r);
                        c.send(&Packet::PubRec(PubRec::new(id, ReasonCode::Success)))?;
                    }
                    QoS::AtMostOnce => unreachable!(),
                }
            }
            Packet::PubRel(rel) => {
                self.awaiting_release.remove(&rel.packet_id);
                self.record.lock().unwrap().awaiting_release = self.awaiting_release.len();
                c.send(&Packet::PubComp(PubComp::new(
                    rel.packet_id,
                    ReasonCode::Success,
                )))?;
            }
            Packet::PingResp => {}
            other => {
                let what = format!("subscriber got {other:?}");
                eprintln!("{}: ANOMALY {what}", self.client_id);
                self.record.lock().unwrap().anomalies.push(what);
            }
        }
        Ok(())
    }

    fn run(mut self, mut conn: Conn, stop: Arc<AtomicBool>) {
        self.record.lock().unwrap().connected = true;
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let result = conn.recv(Duration::from_millis(100)).and_then(|p| match p {
                Some(p) => self.on_packet(&mut conn, p),
                None => conn.check_alive(),
            });
            if let Err(e) = result {
                eprintln!(
                    "{}: connection to node {} lost: {e}",
                    self.client_id,
                    self.node + 1
                );
                self.record.lock().unwrap().connected = false;
                let Some((c, present)) = reconnect(
                    &self.addrs,
                    &mut self.node,
                    self.version,
                    &self.client_id,
                    &stop,
                ) else {
                    return;
                };
                conn = c;
                self.connection += 1;
                let mut r = self.record.lock().unwrap();
                r.reconnects += 1;
                r.connected = true;
                if !present {
                    r.anomalies.push(format!(
                        "session not present on reconnect to node {}",
                        self.node + 1
                    ));
                    drop(r);
                    // What a client does with a lost session: start over.
                    self.awaiting_release.clear();
                    self.subscribe(&mut conn);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Faults.

#[derive(Clone, Copy, Debug)]
enum FaultKind {
    Kill,
    Pause,
    /// Cut off from the other nodes (both ways); its clients still reach it.
    Cut,
}

#[derive(Debug)]
struct Fault {
    /// Since the start of publishing.
    at: Duration,
    kind: FaultKind,
    node: usize,
    down_for: Duration,
}

fn schedule(rng: &mut Rng, run: Duration, long: bool) -> Vec<Fault> {
    if !long {
        // One kill -9 and one pause; every node has a subscriber, so the kill takes a
        // subscriber's node. (No cut: see the module's comment.)
        let first = rng.range(0, NODES as u64) as usize;
        let second = (first + 1 + rng.range(0, NODES as u64 - 1) as usize) % NODES;
        let frac = |f: f64| Duration::from_secs_f64(run.as_secs_f64() * f);
        return vec![
            Fault {
                at: frac(0.15),
                kind: FaultKind::Kill,
                node: first,
                down_for: Duration::from_millis(rng.range(2000, 4000)),
            },
            Fault {
                at: frac(0.6),
                kind: FaultKind::Pause,
                node: second,
                // Longer than DEAD_AFTER: its clients give up and take their sessions
                // over elsewhere while it sleeps.
                down_for: Duration::from_millis(rng.range(5000, 7000)),
            },
        ];
    }
    let mut faults = Vec::new();
    let mut at = Duration::from_secs(rng.range(3, 6));
    while at + Duration::from_secs(8) < run {
        let kind = match rng.next() % 3 {
            0 => FaultKind::Kill,
            1 => FaultKind::Pause,
            _ => FaultKind::Cut,
        };
        let down_for = Duration::from_millis(rng.range(1500, 8000));
        faults.push(Fault {
            at,
            kind,
            node: rng.range(0, NODES as u64) as usize,
            down_for,
        });
        at += down_for + Duration::from_millis(rng.range(4000, 10_000));
    }
    faults
}

fn signal(node: &Node, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &node.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig}");
}

/// Wait until `nodes[i]` has applied as far as the others had committed when asked.
fn wait_caught_up(nodes: &[Node], i: usize) {
    let applied = |n: &Node| {
        n.api("GET", "/cluster", None)
            .ok()
            .and_then(|s| s["last_applied_index"].as_u64())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let target = loop {
        let others: Vec<u64> = (0..NODES)
            .filter(|&j| j != i)
            .filter_map(|j| applied(&nodes[j]))
            .collect();
        if let Some(max) = others.into_iter().max() {
            break max;
        }
        assert!(Instant::now() < deadline, "no other node answers");
        std::thread::sleep(Duration::from_millis(100));
    };
    while applied(&nodes[i]).is_none_or(|a| a < target) {
        assert!(
            Instant::now() < deadline,
            "node {} did not catch up with index {target}",
            i + 1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------
// The test.

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

#[test]
fn acknowledged_messages_arrive_exactly_once_through_kills_pauses_and_cuts() {
    run_faults(20, 120);
}

/// The long version by default (3 minutes, a fault every 4 to 10 s); out of CI for its
/// length. It found a reordering, since fixed: a follower's batch forwarded to a
/// leader that was killed failed, while later batches already submitted committed on
/// the next leader, so publishes resent by their clients were queued after later ones
/// (seed 1796433136382172861 with FAULTS_SECONDS=240 FAULTS_RATE=200: 3:1956 after
/// 3:1958). Uncertain batches are now sent again with their sequence numbers
/// (`cluster/proposer.rs`, `forward`), and the same seed runs clean.
#[test]
#[ignore = "3 minutes: run by hand (see docs/reliability.md)"]
fn long_run_of_kills_pauses_and_cuts() {
    run_faults(180, 200);
}

/// Publish for `FAULTS_SECONDS` (default `default_seconds`) at `FAULTS_RATE` (default
/// `default_rate`) msg/s under the fault schedule of `FAULTS_SEED`, then check.
fn run_faults(default_seconds: u64, default_rate: u64) {
    const CI_SECONDS: u64 = 20;
    let seconds = env_u64("FAULTS_SECONDS").unwrap_or(default_seconds);
    let rate = env_u64("FAULTS_RATE").unwrap_or(default_rate) as f64;
    let seed = env_u64("FAULTS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64
    });
    let run = Duration::from_secs(seconds);
    let mut rng = Rng(seed);
    let plan = schedule(&mut rng, run, seconds > CI_SECONDS);
    println!("faults: seed {seed} (FAULTS_SEED={seed} replays the schedule), {seconds} s at {rate} msg/s");
    for f in &plan {
        println!("faults: plan {f:?}");
    }

    // Queues must hold what piles up for a subscriber while its node is away.
    let net = Network::new(NODES);
    let mut nodes = Node::cluster_in(
        &net,
        NODES,
        &[
            ("FLOCKMQ_MQTT__MAX_QUEUED_MESSAGES", "1000000"),
            ("FLOCKMQ_MQTT__MAX_QUEUED_BYTES", "1000000000"),
            // Off loopback, anonymous clients are refused unless allowed.
            ("FLOCKMQ_MQTT__ALLOW_ANONYMOUS", "true"),
        ],
    );
    let addrs: Vec<SocketAddr> = nodes.iter().map(Node::mqtt_addr).collect();
    let stop_subscribers = Arc::new(AtomicBool::new(false));
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let give_up = Arc::new(AtomicBool::new(false));

    let mut sub_records = Vec::new();
    let mut sub_threads: Vec<JoinHandle<()>> = Vec::new();
    for i in 0..SUBSCRIBERS {
        let record = Arc::new(Mutex::new(SubRecord::default()));
        let mut s = Subscriber {
            client_id: format!("sub-{i}"),
            version: version_of(i),
            addrs: addrs.clone(),
            node: i % NODES,
            awaiting_release: HashSet::new(),
            connection: 0,
            started: Instant::now(),
            record: record.clone(),
        };
        let conn = s.start();
        let stop = stop_subscribers.clone();
        sub_records.push(record);
        sub_threads.push(std::thread::spawn(move || s.run(conn, stop)));
    }
    // Every node routes to every subscriber before the first publish.
    converged(&running(&nodes));

    let mut pub_records = Vec::new();
    let mut pub_threads: Vec<JoinHandle<()>> = Vec::new();
    for i in 0..PUBLISHERS {
        let record = Arc::new(Mutex::new(PubRecord::default()));
        let p = Publisher {
            id: i,
            client_id: format!("pub-{i}"),
            version: version_of(i + 1),
            addrs: addrs.clone(),
            // reconnect() moves to the next node first: publisher i starts on i+1.
            node: i % NODES,
            conn: None,
            inflight: Vec::new(),
            next_packet_id: 1,
            next_seq: 0,
            record: record.clone(),
        };
        let (stop, quit) = (stop_publishing.clone(), give_up.clone());
        pub_records.push(record);
        let per_publisher = rate / PUBLISHERS as f64;
        pub_threads.push(std::thread::spawn(move || p.run(per_publisher, stop, quit)));
    }

    // The fault schedule, one node down at a time.
    let start = Instant::now();
    let mut injected = Vec::new();
    for f in &plan {
        let at = start + f.at;
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait); // pacing the schedule
        }
        let t = start.elapsed().as_secs_f64();
        println!(
            "faults: t={t:.1}s {:?} node {} for {:?}",
            f.kind,
            f.node + 1,
            f.down_for
        );
        match f.kind {
            FaultKind::Kill => {
                nodes[f.node].kill();
                std::thread::sleep(f.down_for); // pacing the schedule
                nodes[f.node].restart();
            }
            FaultKind::Pause => {
                signal(&nodes[f.node], "-STOP");
                std::thread::sleep(f.down_for); // pacing the schedule
                signal(&nodes[f.node], "-CONT");
            }
            FaultKind::Cut => {
                net.cut(f.node + 1);
                std::thread::sleep(f.down_for); // pacing the schedule
                net.heal(f.node + 1);
            }
        }
        injected.push(format!("{:?} node {}", f.kind, f.node + 1));
        wait_caught_up(&nodes, f.node);
        println!(
            "faults: t={:.1}s node {} caught up",
            start.elapsed().as_secs_f64(),
            f.node + 1
        );
    }
    if let Some(wait) = (start + run).checked_duration_since(Instant::now()) {
        std::thread::sleep(wait); // the rest of the publishing time
    }

    // Publishers finish their flows (bounded), then subscribers drain.
    stop_publishing.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pub_threads.iter().all(JoinHandle::is_finished) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    give_up.store(true, Ordering::SeqCst);
    for t in pub_threads {
        t.join().expect("publisher thread");
    }
    let drained = |node: &Node| {
        (0..SUBSCRIBERS).all(|i| {
            let local = {
                let r = sub_records[i].lock().unwrap();
                r.connected && r.awaiting_release == 0
            };
            local
                && node
                    .api("GET", &format!("/sessions/sub-{i}"), None)
                    .is_ok_and(|s| s["connected"] == true && s["mqueue_len"] == 0)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if drained(&nodes[0]) {
            converged(&running(&nodes));
            if nodes.iter().all(&drained) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "subscribers did not drain their queues in 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop_subscribers.store(true, Ordering::SeqCst);
    for t in sub_threads {
        t.join().expect("subscriber thread");
    }

    // The checker.
    let pubs: Vec<_> = pub_records.iter().map(|r| r.lock().unwrap()).collect();
    let subs: Vec<_> = sub_records.iter().map(|r| r.lock().unwrap()).collect();
    let published: u64 = pubs.iter().map(|p| p.sent).sum();
    let acknowledged: usize = pubs.iter().map(|p| p.acked.len()).sum();
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    for p in &pubs {
        for (code, n) in &p.refused {
            *refused.entry(code.clone()).or_default() += n;
        }
    }
    let unfinished: u64 = pubs.iter().map(|p| p.unfinished).sum();
    let mut received = 0usize;
    let mut duplicates = 0usize;
    let mut qos1_duplicates = 0usize;
    let mut losses = 0usize;
    let mut disorders = 0usize;
    let mut problems: Vec<String> = Vec::new();
    for (s, sub) in subs.iter().enumerate() {
        received += sub.delivered.len();
        let mut copies: HashMap<(usize, u64), Vec<&Delivery>> = HashMap::new();
        for d in &sub.delivered {
            copies.entry((d.publisher, d.seq)).or_default().push(d);
        }
        let describe = |ds: &[&Delivery]| {
            ds.iter()
                .map(|d| {
                    format!(
                        "[connection {}, packet id {}, dup {}, t={:.2}s]",
                        d.connection,
                        d.packet_id,
                        d.dup,
                        d.at.as_secs_f64()
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        for (&(p, seq), ds) in &copies {
            if ds.len() < 2 {
                continue;
            }
            let resent = pubs.get(p).is_some_and(|r| r.resent.contains(&seq));
            if qos_of(seq) == QoS::ExactlyOnce {
                duplicates += ds.len() - 1;
                problems.push(format!(
                    "sub-{s}: QoS 2 message {p}:{seq} handed over {} times (publisher resent it: \
                     {resent}): {}",
                    ds.len(),
                    describe(ds)
                ));
            } else {
                // At least once allows these; a copy in the same connection that the
                // publisher did not resend is still worth a line.
                qos1_duplicates += ds.len() - 1;
                if !resent && ds.windows(2).any(|w| w[0].connection == w[1].connection) {
                    println!(
                        "faults: note: sub-{s}: QoS 1 message {p}:{seq} twice in one connection \
                         without a resend by its publisher: {}",
                        describe(ds)
                    );
                }
            }
        }
        for (p, publisher) in pubs.iter().enumerate() {
            let mut lost: Vec<u64> = publisher
                .acked
                .iter()
                .filter(|seq| !copies.contains_key(&(p, **seq)))
                .copied()
                .collect();
            lost.sort_unstable();
            losses += lost.len();
            if !lost.is_empty() {
                problems.push(format!(
                    "sub-{s}: {} acknowledged messages of pub-{p} lost: {:?}",
                    lost.len(),
                    &lost[..lost.len().min(20)]
                ));
            }
        }
        // Order: each message's first arrival (a later copy is a duplicate, counted
        // above for QoS 2 and allowed for QoS 1, where a publisher's resend arrives
        // after what it sent since).
        let mut seen: HashSet<(usize, u64)> = HashSet::new();
        let mut last: BTreeMap<(u64, usize, u8), u64> = BTreeMap::new();
        for d in &sub.delivered {
            if !seen.insert((d.publisher, d.seq)) {
                continue;
            }
            let key = (d.connection, d.publisher, d.qos as u8);
            if let Some(&prev) = last.get(&key) {
                if d.seq <= prev {
                    disorders += 1;
                    problems.push(format!(
                        "sub-{s}: connection {} got {}:{} (QoS {}) after {}:{prev}",
                        d.connection, d.publisher, d.seq, d.qos as u8, d.publisher
                    ));
                }
            }
            last.insert(key, d.seq);
        }
        for a in &sub.anomalies {
            problems.push(format!("sub-{s}: {a}"));
        }
    }
    for (p, publisher) in pubs.iter().enumerate() {
        for a in &publisher.anomalies {
            problems.push(format!("pub-{p}: {a}"));
        }
    }
    let reconnects: u64 = pubs.iter().map(|p| p.reconnects).sum::<u64>()
        + subs.iter().map(|s| s.reconnects).sum::<u64>();
    let suppressed: u64 = subs.iter().map(|s| s.suppressed).sum();
    let pubcomp_not_found: u64 = pubs.iter().map(|p| p.pubcomp_not_found).sum();
    println!(
        "faults: SUMMARY seed {seed}: published {published}, acknowledged {acknowledged} \
         (refused {refused:?}, unfinished {unfinished}, PUBCOMP 0x92 after a resent PUBREL \
         {pubcomp_not_found}), received {received} by {SUBSCRIBERS} \
         subscribers, QoS 2 duplicates {duplicates}, QoS 1 redeliveries {qos1_duplicates}, \
         suppressed QoS 2 resends {suppressed}, losses {losses}, out of order {disorders}, \
         reconnects {reconnects}, faults injected {} ({})",
        injected.len(),
        injected.join(", ")
    );
    assert!(acknowledged > 0, "nothing was acknowledged");
    assert!(
        problems.is_empty(),
        "seed {seed}: {} problems:\n{}",
        problems.len(),
        problems[..problems.len().min(60)].join("\n")
    );
}
