//! Hostile clients against a real `broker-node` process: floods of CONNECTs, sockets
//! that never send CONNECT, oversize packets and remaining-length lies, a subscriber
//! that never reads, many distinct topics, deep topic levels, `#` on a busy cluster,
//! and a network-level fuzzer sending mutated packet sequences.
//!
//! Every case checks the same three things: the node stays up; a well-behaved client
//! (a [`Bystander`], a real MQTT client) keeps completing QoS 1 round trips, during
//! the attack and after it, each within [`ROUND_TRIP_LIMIT`]; and the node's peak
//! resident memory (`VmHWM` of `/proc/<pid>/status`) stays within a bound derived
//! from the configuration and what the test did, printed with the figures
//! (`cargo test -p flockmq-tests --test hostile -- --nocapture` shows them).
//!
//! Sizes are scaled for CI (debug build, two shared cores); the full sizes run with
//! `HOSTILE_TOPICS=1000000` (distinct topics) and `HOSTILE_FUZZ_EXECS=100000`
//! (fuzzer executions, seed printed, set with `HOSTILE_FUZZ_SEED`).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use broker_node::mqtt::{
    self, Connect, ConnectProperties, Disconnect, LastWill, Packet, ProtocolVersion, PubAck,
    PubComp, PubRec, PubRel, Publish, PublishProperties, QoS, ReasonCode, Subscribe,
    SubscribeProperties, Unsubscribe, WillProperties,
};
use bytes::{Bytes, BytesMut};
use flockmq_tests::mqtt::{opts, publish, subscribe, subscribe_with};
use flockmq_tests::{wait_until, Node, RawClient, Rng};

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;
const T: Duration = Duration::from_secs(10);
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// The longest a bystander's QoS 1 round trip may take while a node is under attack.
/// Generous for a debug build on two shared cores; a stalled node blows through it.
const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(5);

/// Memory every bound allows besides what the case itself accounts for: the
/// allocator's slack, the Raft log's caches, thread stacks touched under load.
const SLACK: u64 = 48 * MIB;

// ---------------------------------------------------------------------------------
// Memory and liveness of the node process

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug)]
struct Memory {
    /// `VmRSS`: resident now.
    rss: u64,
    /// `VmHWM`: the peak so far.
    peak: u64,
}

fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("the node (pid {pid}) is gone: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .map(|kib| kib * KIB)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    Memory {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
    }
}

/// Panics unless the node's process is running (not exited, not a zombie).
fn assert_alive(node: &Node) {
    let pid = node.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let state = status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .unwrap_or("gone")
        .trim();
    assert!(
        !state.is_empty() && !state.starts_with('Z') && state != "gone",
        "the node (pid {pid}) is down: state {state}; log:\n{}",
        node.log()
    );
    // And it still takes new clients.
    let (_c, ack) = RawClient::connect(node.mqtt_addr(), V5, "liveness-probe", true, 30);
    assert_eq!(ack.reason_code, ReasonCode::Success);
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// Check the node's peak memory against `bound` (explained by `why`) and print the
/// case's figures.
fn check_memory(case: &str, node: &Node, baseline: Memory, bound: u64, why: &str) -> Memory {
    let now = memory(node.pid());
    println!(
        "hostile[{case}]: RSS baseline {}, peak {}, now {}; bound {} = {why}",
        mib(baseline.rss),
        mib(now.peak),
        mib(now.rss),
        mib(bound)
    );
    assert!(
        now.peak <= bound,
        "{case}: the node's peak RSS {} is over its bound {} ({why})",
        mib(now.peak),
        mib(bound)
    );
    now
}

/// A counter of a node's `/metrics`, summed over the lines whose labels contain
/// `labels` (`""` for all).
fn counter(node: &Node, name: &str, labels: &str) -> f64 {
    node.metrics()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------
// The well-behaved client

/// What a bystander saw.
#[derive(Debug, Default)]
struct Seen {
    round_trips: u64,
    worst: Duration,
    failures: Vec<String>,
}

/// A well-behaved client beside the attack: a real MQTT client (rumqttc) publishing
/// QoS 1 messages on one node and receiving them through its own subscription on
/// another (or the same) node, one round trip after another, each timed.
struct Bystander {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Bystander {
    /// Publish through `publish_on`, subscribe through `subscribe_on`; returns once
    /// the first round trip completed.
    fn start(name: &str, publish_on: &Node, subscribe_on: &Node) -> Bystander {
        use rumqttc::{Client, Event, MqttOptions, Packet as P, QoS as Q};
        let topic = format!("bystander/{name}");
        let options = |id: String, node: &Node| {
            let mut o = MqttOptions::new(id, "127.0.0.1", node.mqtt_port);
            o.set_keep_alive(Duration::from_secs(10));
            o
        };
        let (sub, mut sub_conn) =
            Client::new(options(format!("bystander-{name}-sub"), subscribe_on), 64);
        sub.subscribe(&topic, Q::AtLeastOnce).expect("subscribe");
        wait_for_event(
            &mut sub_conn,
            |e| matches!(e, Event::Incoming(P::SubAck(a)) if a.return_codes.iter().all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure))),
        );
        let (publ, mut pub_conn) =
            Client::new(options(format!("bystander-{name}-pub"), publish_on), 64);
        wait_for_event(&mut pub_conn, |e| {
            matches!(e, Event::Incoming(P::ConnAck(_)))
        });
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        // The publisher's event loop, driven here; a connection error is a failure.
        let driver = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(Err(e)) = pub_conn.recv_timeout(Duration::from_millis(100)) {
                        seen.lock()
                            .unwrap()
                            .failures
                            .push(format!("publisher: {e}"));
                        // rumqttc reconnects on the next poll; not a busy loop meanwhile.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
        };
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let round_trips = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let _keep_subscribed = sub;
                let mut first = Some(first_tx);
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let payload = format!("rt-{seq}");
                    let started = Instant::now();
                    publ.publish(&topic, Q::AtLeastOnce, false, payload.clone().into_bytes())
                        .expect("queue a publish");
                    let outcome =
                        receive_payload(&mut sub_conn, payload.as_bytes(), ROUND_TRIP_LIMIT * 2);
                    let took = started.elapsed();
                    let mut s = seen.lock().unwrap();
                    match outcome {
                        Ok(()) => {
                            s.round_trips += 1;
                            s.worst = s.worst.max(took);
                            if took > ROUND_TRIP_LIMIT {
                                s.failures.push(format!("round trip {seq} took {took:?}"));
                            }
                        }
                        Err(e) => s.failures.push(format!("round trip {seq}: {e}")),
                    }
                    drop(s);
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                    // Pacing, not synchronization: a steady trickle of round trips.
                    std::thread::sleep(Duration::from_millis(25));
                }
            })
        };
        first_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the bystander's first round trip");
        let b = Bystander {
            seen,
            stop,
            threads: vec![driver, round_trips],
        };
        b.assert_healthy("before the attack");
        b
    }

    /// Round trips completed so far.
    fn round_trips(&self) -> u64 {
        self.seen.lock().unwrap().round_trips
    }

    fn assert_healthy(&self, when: &str) {
        let s = self.seen.lock().unwrap();
        assert!(
            s.failures.is_empty(),
            "the bystander was affected {when}: {:?}",
            s.failures
        );
    }

    /// Wait for three more round trips (the node serves well-behaved clients after the
    /// attack too), stop, and return what it saw; panics if any round trip failed or
    /// took longer than [`ROUND_TRIP_LIMIT`].
    fn finish(mut self, case: &str) -> Seen {
        let after = self.round_trips();
        wait_until(
            "the bystander's round trips after the attack",
            Duration::from_secs(30),
            || self.round_trips() >= after + 3 || !self.seen.lock().unwrap().failures.is_empty(),
        );
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("bystander thread");
        }
        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        println!(
            "hostile[{case}]: bystander {} QoS 1 round trips, worst {:?}, failures {}",
            seen.round_trips,
            seen.worst,
            seen.failures.len()
        );
        assert!(
            seen.failures.is_empty(),
            "{case}: the bystander was affected: {:?}",
            seen.failures
        );
        seen
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Poll `conn` until an event satisfies `done`; panics after [`T`].
fn wait_for_event(conn: &mut rumqttc::Connection, done: impl Fn(&rumqttc::Event) -> bool) {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no expected MQTT event within {T:?}");
        match conn.recv_timeout(left) {
            Ok(Ok(e)) if done(&e) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("bystander connection failed: {e}"),
            Err(_) => {}
        }
    }
}

/// Poll `conn` until a PUBLISH carrying `payload` arrives, within `within`.
fn receive_payload(
    conn: &mut rumqttc::Connection,
    payload: &[u8],
    within: Duration,
) -> Result<(), String> {
    use rumqttc::{Event, Packet as P};
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("not delivered within {within:?}"));
        }
        match conn.recv_timeout(left) {
            Ok(Ok(Event::Incoming(P::Publish(p)))) if p.payload.as_ref() == payload => {
                return Ok(())
            }
            Ok(Ok(_)) => {}
            // A failure; rumqttc reconnects on the next poll.
            Ok(Err(e)) => return Err(format!("subscriber connection: {e}")),
            Err(_) => {}
        }
    }
}

/// Run `work` on `threads` threads, thread `t` getting `t` and `threads`; returns
/// their results in order.
fn on_threads<R: Send + 'static>(
    threads: usize,
    work: impl Fn(usize, usize) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let work = Arc::new(work);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let work = work.clone();
            std::thread::spawn(move || work(t, threads))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("attack thread"))
        .collect()
}

/// A raw socket to the node with read and write timeouts, for input that no client
/// library would send.
fn raw_socket(node: &Node) -> TcpStream {
    let s = TcpStream::connect(node.mqtt_addr()).expect("connect");
    s.set_read_timeout(Some(T)).expect("read timeout");
    s.set_write_timeout(Some(T)).expect("write timeout");
    s
}

/// Whether the node closed `s` within `within` (reading and discarding what it sent).
fn closed_by_node(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("read timeout");
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                return true
            }
            Err(_) => return false,
        }
    }
}

/// The bytes of `packet` as a client of `version` sends them.
fn bytes_of(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    mqtt::encode(packet, version, &mut out).expect("encode");
    out.to_vec()
}

fn connect_packet(version: ProtocolVersion, client_id: &str, keep_alive: u16) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: version,
        clean_start: true,
        keep_alive,
        client_id: client_id.to_owned(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }))
}

/// Publish `n` QoS 1 messages of `payload` bytes to `topic(i)` from `c`, `window` at a
/// time, and wait for every PUBACK; returns how long it took.
fn publish_acked(
    c: &mut RawClient,
    n: usize,
    payload: usize,
    window: usize,
    topic: impl Fn(usize) -> String,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let body = "x".repeat(payload);
    let mut sent = 0;
    let mut acked = 0;
    while acked < n {
        while sent < n && sent - acked < window {
            let id = (sent % 60_000 + 1) as u16;
            c.send(&publish(&topic(sent), &body, QoS::AtLeastOnce, false, id));
            sent += 1;
        }
        let left = (started + within).saturating_duration_since(Instant::now());
        match c.recv(left) {
            Some(Packet::PubAck(_)) => acked += 1,
            Some(_) => {}
            None => panic!(
                "{acked} of {n} publishes acknowledged in {:?}",
                started.elapsed()
            ),
        }
    }
    started.elapsed()
}

/// Receive up to `n` PUBLISHes within `within`, acknowledging QoS 1 ones; how many came.
fn receive_counting(c: &mut RawClient, n: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut got = 0;
    while got < n {
        match c.recv(deadline.saturating_duration_since(Instant::now())) {
            Some(Packet::Publish(p)) => {
                if let Some(id) = p.packet_id {
                    c.send(&Packet::PubAck(PubAck::new(id, ReasonCode::Success)));
                }
                got += 1;
            }
            Some(_) => {}
            None => break,
        }
    }
    got
}

// ---------------------------------------------------------------------------------
// The cases

/// Clients held connected in the CONNECT flood.
const FLOOD_HELD: usize = 1_000;
/// Connections opened, CONNECTed and dropped at once in the CONNECT flood.
const FLOOD_CHURN: usize = 2_000;
/// What one connected, idle client may cost the node (its task or parking record,
/// session record, registry entry, buffers) with a debug build's allocations.
const PER_CONNECTION: u64 = 16 * KIB;

#[test]
fn a_flood_of_connects_leaves_the_node_serving_within_its_memory_bound() {
    let node = Node::start();
    let bystander = Bystander::start("flood", &node, &node);
    let baseline = memory(node.pid());
    let addr = node.mqtt_addr();
    let started = Instant::now();
    // Churn: CONNECT, CONNACK, gone without DISCONNECT, as fast as four threads go;
    // half of them v5, half v3.
    let refused: usize = on_threads(4, move |t, n| {
        let mut refused = 0;
        for i in (t..FLOOD_CHURN).step_by(n) {
            let version = if i % 2 == 0 { V3 } else { V5 };
            let (_c, ack) = RawClient::connect(addr, version, &format!("churn-{i}"), true, 30);
            if ack.reason_code != ReasonCode::Success {
                refused += 1;
            }
        }
        refused
    })
    .into_iter()
    .sum();
    assert_eq!(refused, 0, "CONNECTs refused during the churn");
    // Held: connected and idle until the end of the case.
    let held: Vec<RawClient> = on_threads(4, move |t, n| {
        (t..FLOOD_HELD)
            .step_by(n)
            .map(|i| RawClient::connect(addr, V5, &format!("held-{i}"), true, 0).0)
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect();
    let took = started.elapsed();
    println!(
        "hostile[connect flood]: {FLOOD_CHURN} churned and {FLOOD_HELD} held connections in {took:?}"
    );
    bystander.assert_healthy("during the flood");
    // A CONNECT storm on the same client id: each takes the last one over.
    let storm: Vec<RawClient> = (0..200)
        .map(|_| RawClient::connect(addr, V3, "one-id", true, 30).0)
        .collect();
    assert_alive(&node);
    bystander.finish("connect flood");
    let bound = baseline.rss + FLOOD_HELD as u64 * PER_CONNECTION + SLACK;
    check_memory(
        "connect flood",
        &node,
        baseline,
        bound,
        &format!("baseline + {FLOOD_HELD} held × 16 KiB + 48 MiB slack"),
    );
    drop((held, storm));
}

/// Sockets opened by the silent-sockets case that never send a byte.
const SILENT: usize = 1_000;
/// Of them, sockets that send the first bytes of a CONNECT and stop.
const SLOWLORIS: usize = 200;

#[test]
fn sockets_that_never_send_connect_are_closed_after_the_connect_timeout() {
    let node = Node::start_with_config("[mqtt]\nconnect_timeout = \"2s\"\n");
    let bystander = Bystander::start("silent", &node, &node);
    let baseline = memory(node.pid());
    let opened = Instant::now();
    let mut sockets: Vec<TcpStream> = (0..SILENT).map(|_| raw_socket(&node)).collect();
    let partial = bytes_of(&connect_packet(V3, "never-finished", 30), V3);
    for s in sockets.iter_mut().take(SLOWLORIS) {
        s.write_all(&partial[..partial.len() / 2])
            .expect("half a CONNECT");
    }
    bystander.assert_healthy("with the silent sockets open");
    let mut still_open = 0;
    for s in &mut sockets {
        let left = Duration::from_secs(12).saturating_sub(opened.elapsed());
        if !closed_by_node(s, left) {
            still_open += 1;
        }
    }
    let closed_after = opened.elapsed();
    println!(
        "hostile[silent sockets]: {SILENT} sockets ({SLOWLORIS} with half a CONNECT) closed by the node {closed_after:?} after opening, connect_timeout 2s"
    );
    assert_eq!(still_open, 0, "sockets still open 12 s after opening");
    assert_alive(&node);
    bystander.finish("silent sockets");
    let bound = baseline.rss + SILENT as u64 * PER_CONNECTION + SLACK;
    check_memory(
        "silent sockets",
        &node,
        baseline,
        bound,
        &format!("baseline + {SILENT} sockets × 16 KiB + 48 MiB slack"),
    );
}

/// `mqtt.max_packet_size` of the oversize case.
const MAX_PACKET: u64 = 64 * KIB;
/// Connections that each hold a packet one byte short of what its length promised.
const LIARS: usize = 200;

#[test]
fn oversize_packets_and_remaining_length_lies_cost_at_most_the_maximum_packet_each() {
    let node = Node::start_with_config(&format!("[mqtt]\nmax_packet_size = {MAX_PACKET}\n"));
    let bystander = Bystander::start("oversize", &node, &node);
    let baseline = memory(node.pid());

    // Before CONNECT: a CONNECT announcing 256 MB, then a megabyte of it.
    let mut s = raw_socket(&node);
    s.write_all(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F])
        .expect("header");
    let _ = s.write_all(&[0u8; 1 << 20]);
    assert!(closed_by_node(&mut s, T), "an oversize CONNECT is refused");

    // A remaining length of five bytes (at most four are allowed).
    let mut s = raw_socket(&node);
    s.write_all(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01])
        .expect("header");
    assert!(closed_by_node(&mut s, T), "a five-byte length is malformed");

    // After CONNECT: a PUBLISH announcing 10 MB gets DISCONNECT 0x95 (v5) and is
    // closed before the node buffers it; the same on v3 closes.
    for version in [V5, V3] {
        let (mut c, _) = RawClient::connect(node.mqtt_addr(), version, "big-liar", true, 30);
        c.send_raw(&[0x30, 0x80, 0xAD, 0xE2, 0x04, 0, 1, b't']);
        if version == V5 {
            assert_eq!(
                flockmq_tests::mqtt::disconnect_reason(&mut c, T),
                Some(ReasonCode::PacketTooLarge)
            );
        }
        assert!(c.is_closed(T), "an oversize PUBLISH closes the connection");
    }

    // Lengths shorter than the content: a topic length running past the packet.
    let (mut c, _) = RawClient::connect(node.mqtt_addr(), V5, "short-liar", true, 30);
    c.send_raw(&[0x30, 3, 0, 200, b't']);
    assert_eq!(
        flockmq_tests::mqtt::disconnect_reason(&mut c, T),
        Some(ReasonCode::MalformedPacket)
    );
    assert!(c.is_closed(T));

    // A length that swallows the next packet's first byte: a PUBLISH whose length
    // covers the type of the PINGREQ after it, whose length byte then reads as the
    // reserved packet type 0.
    let (mut c, _) = RawClient::connect(node.mqtt_addr(), V3, "splice-liar", true, 30);
    let mut spliced = bytes_of(&publish("a/b", "hello", QoS::AtMostOnce, false, 0), V3);
    spliced[1] += 1;
    spliced.extend_from_slice(&[0xC0, 0x00, 0x00]);
    c.send_raw(&spliced);
    assert!(
        c.is_closed(T),
        "the spliced stream ends in a malformed packet"
    );

    // Many connections each promising a packet just under the maximum and sending
    // all of it but the last byte: the node holds them (that is the bound), no more.
    let promised = MAX_PACKET as usize - 16;
    let liars: Vec<RawClient> = (0..LIARS)
        .map(|i| {
            let (mut c, _) =
                RawClient::connect(node.mqtt_addr(), V3, &format!("liar-{i}"), true, 0);
            let body = "y".repeat(promised - 3 - 5);
            let mut p = bytes_of(&publish("lie", &body, QoS::AtMostOnce, false, 0), V3);
            p.pop();
            c.send_raw(&p);
            c
        })
        .collect();
    bystander.assert_healthy("with the liars holding their packets");
    assert_alive(&node);
    bystander.finish("oversize and lies");
    // Each liar's read buffer may have doubled while growing.
    let bound = baseline.rss + LIARS as u64 * 2 * MAX_PACKET + SLACK;
    check_memory(
        "oversize and lies",
        &node,
        baseline,
        bound,
        &format!("baseline + {LIARS} partial packets × 2 × max_packet_size 64 KiB + 48 MiB slack"),
    );
    drop(liars);
}

/// Messages published past the subscribers that never read.
const SINK_MESSAGES: usize = 10_000;
/// Their payload.
const SINK_PAYLOAD: usize = 4 * 1024;
/// `mqtt.max_queued_messages` of the case: a session's pending deliveries and its
/// replicated queue.
const SINK_QUEUED: u64 = 500;
/// What the node may hold of one message besides its payload (the `Message`, its
/// delivery boxes, the PUBLISH being written).
const PER_MESSAGE: u64 = KIB;
/// A connection's mailbox (`broker/connection.rs`, `CHANNEL_CAPACITY`), the default
/// `mqtt.max_inflight`, and the deliveries a connection writes per wake-up.
const MAILBOX: u64 = 1024;
const INFLIGHT: u64 = 1024;
const WRITE_BATCH: u64 = 256;

#[test]
fn a_subscriber_that_never_reads_loses_messages_by_policy_and_stalls_nobody() {
    let node = Node::start_with_config(&format!(
        "[mqtt]\nmax_queued_messages = {SINK_QUEUED}\nqueue_full_policy = \"drop_oldest\"\n"
    ));
    let bystander = Bystander::start("sink", &node, &node);
    let baseline = memory(node.pid());
    // Two subscribers to everything published, reading nothing: a clean v3 session
    // and a persistent v5 one (QoS 1 through its replicated queue).
    let (mut clean_sink, _) = RawClient::connect(node.mqtt_addr(), V3, "sink-clean", true, 0);
    subscribe(&mut clean_sink, "load/#", QoS::AtLeastOnce);
    let (mut persistent_sink, _) = RawClient::connect_with(
        node.mqtt_addr(),
        Connect {
            protocol: V5,
            clean_start: true,
            keep_alive: 0,
            client_id: "sink-persistent".into(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: Some(600),
                ..Default::default()
            },
        },
    );
    subscribe(&mut persistent_sink, "load/#", QoS::AtLeastOnce);
    // A subscriber that reads, beside them, gets every message.
    let (mut reader, _) = RawClient::connect(node.mqtt_addr(), V3, "reader", true, 30);
    subscribe(&mut reader, "load/#", QoS::AtLeastOnce);
    let reading = std::thread::spawn(move || {
        receive_counting(&mut reader, SINK_MESSAGES, Duration::from_secs(120))
    });
    let (mut publisher, _) = RawClient::connect(node.mqtt_addr(), V3, "loader", true, 30);
    let took = publish_acked(
        &mut publisher,
        SINK_MESSAGES,
        SINK_PAYLOAD,
        100,
        |i| format!("load/{}", i % 16),
        Duration::from_secs(90),
    );
    let received = reading.join().expect("reader");
    let dropped = counter(&node, "flockmq_messages_dropped_total", "queue_full");
    let queue = node
        .session("sink-persistent")
        .expect("the persistent sink's session");
    println!(
        "hostile[slow subscriber]: {SINK_MESSAGES} QoS 1 messages of {SINK_PAYLOAD} B acknowledged in {took:?}, the reader got {received}, {dropped} dropped for the sinks, persistent sink's queue {} messages",
        queue["mqueue_len"]
    );
    assert_eq!(received, SINK_MESSAGES);
    assert!(
        took < Duration::from_secs(60),
        "the publisher was held back by the subscribers that never read: {took:?}"
    );
    assert!(
        dropped > 0.0,
        "the sinks' messages are dropped once their queues are full"
    );
    assert!(
        queue["mqueue_len"]
            .as_u64()
            .is_some_and(|n| n <= SINK_QUEUED),
        "the persistent sink's queue is bounded by max_queued_messages: {queue}"
    );
    assert_alive(&node);
    bystander.finish("slow subscriber");
    let per_sink =
        (MAILBOX + INFLIGHT + SINK_QUEUED + WRITE_BATCH) * (SINK_PAYLOAD as u64 + PER_MESSAGE);
    let queued = SINK_QUEUED * (SINK_PAYLOAD as u64 + PER_MESSAGE);
    // Every message for the persistent sink is appended to the Raft log, which keeps
    // its entries in memory until a snapshot (`cluster.snapshot_after_logs`, 10,000
    // entries, more than this case writes).
    let log = SINK_MESSAGES as u64 * (SINK_PAYLOAD as u64 + PER_MESSAGE);
    let bound = baseline.rss + 2 * per_sink + queued + log + SLACK;
    check_memory(
        "slow subscriber",
        &node,
        baseline,
        bound,
        "baseline + 2 sinks × (mailbox 1024 + inflight 1024 + pending 500 + write batch 256) × (4 KiB + 1 KiB) + replicated queue 500 × 5 KiB + Raft log 10,000 × 5 KiB + 48 MiB slack",
    );
    drop((clean_sink, persistent_sink));
}

/// Distinct topics published to; `HOSTILE_TOPICS=1000000` for the full size.
fn distinct_topics() -> usize {
    std::env::var("HOSTILE_TOPICS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// Distinct filters one client subscribes to in the distinct-topics case, which is
/// also its `mqtt.max_subscriptions_per_client`.
const SUBSCRIPTIONS: usize = 5_000;
/// What one subscription may cost the node: its trie node and level key, the session
/// record's entry, the Raft entry that carried it (kept in the log until a snapshot).
const PER_SUBSCRIPTION: u64 = 2 * KIB;

#[test]
fn many_distinct_topics_cost_nothing_per_topic_and_subscriptions_are_capped() {
    let node = Node::start_with_config(&format!(
        "[mqtt]\nmax_subscriptions_per_client = {SUBSCRIPTIONS}\n"
    ));
    let bystander = Bystander::start("topics", &node, &node);
    let baseline = memory(node.pid());
    let topics = distinct_topics();
    // A wildcard subscriber that reads everything, so every topic is matched and
    // delivered, not only looked up.
    let (mut watcher, _) = RawClient::connect(node.mqtt_addr(), V3, "watcher", true, 30);
    subscribe(&mut watcher, "distinct/#", QoS::AtMostOnce);
    let watching = std::thread::spawn(move || {
        let mut got = 0usize;
        while got < topics {
            match watcher.recv(Duration::from_secs(30)) {
                Some(Packet::Publish(_)) => got += 1,
                Some(_) => {}
                None => break,
            }
        }
        got
    });
    let started = Instant::now();
    let (mut publisher, _) = RawClient::connect(node.mqtt_addr(), V3, "scatter", true, 30);
    let mut batch = Vec::new();
    for i in 0..topics {
        batch.extend(bytes_of(
            &publish(
                &format!("distinct/{}/{i}", i % 1000),
                "v",
                QoS::AtMostOnce,
                false,
                0,
            ),
            V3,
        ));
        if batch.len() > 64 * 1024 {
            publisher.send_raw(&batch);
            batch.clear();
        }
    }
    publisher.send_raw(&batch);
    // A QoS 1 publish after them: its PUBACK says the node processed them all.
    publisher.send(&publish("distinct/end", "end", QoS::AtLeastOnce, false, 1));
    loop {
        match publisher.recv(Duration::from_secs(60)) {
            Some(Packet::PubAck(_)) => break,
            Some(_) => {}
            None => panic!("no PUBACK after {topics} distinct topics"),
        }
    }
    let published = started.elapsed();
    let watched = watching.join().expect("watcher");
    println!(
        "hostile[distinct topics]: {topics} distinct topics published in {published:?}, the wildcard subscriber got {watched}"
    );
    assert!(
        watched >= topics * 99 / 100,
        "a subscriber that keeps up gets (nearly) every message: {watched} of {topics}"
    );
    // Publishing to distinct topics keeps nothing per topic: the bound does not grow
    // with the number of topics.
    check_memory(
        "distinct topics, publishing",
        &node,
        baseline,
        baseline.rss + SLACK,
        &format!("baseline + 48 MiB slack, whatever the number of topics ({topics})"),
    );

    // One client subscribing to distinct filters, a hundred per SUBSCRIBE, up to its
    // cap; the next is refused.
    let (mut hoarder, _) = RawClient::connect(node.mqtt_addr(), V5, "hoarder", true, 0);
    for chunk in 0..SUBSCRIPTIONS / 100 {
        let filters = (0..100)
            .map(|j| (format!("hoard/{chunk}/{j}"), opts(QoS::AtLeastOnce)))
            .collect();
        hoarder.send(&Packet::Subscribe(Subscribe {
            packet_id: chunk as u16 + 1,
            filters,
            properties: SubscribeProperties::default(),
        }));
    }
    let mut granted = 0;
    while granted < SUBSCRIPTIONS {
        match hoarder.recv(Duration::from_secs(60)) {
            Some(Packet::SubAck(a)) => {
                granted += a
                    .reason_codes
                    .iter()
                    .filter(|c| **c == ReasonCode::GrantedQoS1)
                    .count();
            }
            Some(_) => {}
            None => panic!("{granted} of {SUBSCRIPTIONS} subscriptions granted"),
        }
    }
    let refused = subscribe_with(
        &mut hoarder,
        "hoard/one/too/many",
        opts(QoS::AtLeastOnce),
        9_999,
    );
    assert_ne!(
        refused,
        vec![ReasonCode::GrantedQoS1],
        "a subscription past max_subscriptions_per_client is refused"
    );
    println!(
        "hostile[distinct topics]: {SUBSCRIPTIONS} distinct subscriptions of one client, the next refused with {refused:?}"
    );
    assert_alive(&node);
    bystander.finish("distinct topics");
    let bound = baseline.rss + SUBSCRIPTIONS as u64 * PER_SUBSCRIPTION + SLACK;
    check_memory(
        "distinct topics, with the subscriptions",
        &node,
        baseline,
        bound,
        &format!("baseline + {SUBSCRIPTIONS} subscriptions × 2 KiB + 48 MiB slack"),
    );
    drop(hoarder);
}

/// Messages published to the deepest topic allowed.
const DEEP_MESSAGES: usize = 2_000;
/// The default `mqtt.max_topic_levels`.
const MAX_LEVELS: usize = 128;

#[test]
fn deep_topic_levels_are_matched_up_to_the_limit_and_refused_past_it() {
    let node = Node::start();
    let bystander = Bystander::start("deep", &node, &node);
    let baseline = memory(node.pid());
    let deepest: Vec<String> = (0..MAX_LEVELS).map(|i| format!("d{i}")).collect();
    let deepest = deepest.join("/");
    let wildcards = format!("{}/#", vec!["+"; MAX_LEVELS - 1].join("/"));
    let (mut deep, _) = RawClient::connect(node.mqtt_addr(), V5, "deep-sub", true, 30);
    for (i, filter) in [&wildcards, &deepest].into_iter().enumerate() {
        assert_eq!(
            subscribe_with(&mut deep, filter, opts(QoS::AtMostOnce), i as u16 + 1),
            vec![ReasonCode::GrantedQoS0],
            "a filter of {MAX_LEVELS} levels is accepted"
        );
    }
    // One level more: refused, in a SUBACK or by closing the connection.
    let (mut too_deep, _) = RawClient::connect(node.mqtt_addr(), V5, "too-deep", true, 30);
    too_deep.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(format!("{deepest}/x"), opts(QoS::AtMostOnce))],
        properties: SubscribeProperties::default(),
    }));
    match too_deep.recv(T) {
        Some(Packet::SubAck(a)) => assert_ne!(a.reason_codes, vec![ReasonCode::GrantedQoS0]),
        Some(Packet::Disconnect(_)) | None => {}
        other => panic!("a filter of {} levels: {other:?}", MAX_LEVELS + 1),
    }
    let receiving = std::thread::spawn(move || {
        let mut got = 0usize;
        while got < DEEP_MESSAGES {
            match deep.recv(Duration::from_secs(30)) {
                Some(Packet::Publish(p)) => {
                    assert_eq!(p.topic.split('/').count(), MAX_LEVELS);
                    got += 1;
                }
                Some(_) => {}
                None => break,
            }
        }
        got
    });
    let (mut publisher, _) = RawClient::connect(node.mqtt_addr(), V3, "deep-pub", true, 30);
    let took = publish_acked(
        &mut publisher,
        DEEP_MESSAGES,
        16,
        100,
        |_| deepest.clone(),
        Duration::from_secs(60),
    );
    let got = receiving.join().expect("deep subscriber");
    println!(
        "hostile[deep topics]: {DEEP_MESSAGES} QoS 1 publishes to a {MAX_LEVELS}-level topic, matched by a {MAX_LEVELS}-level wildcard filter and an exact one, in {took:?}; {got} delivered once each"
    );
    assert_eq!(got, DEEP_MESSAGES);
    // Past the limit: one level more, and a topic of 65,535 empty levels.
    for (what, topic) in [
        ("one level too many", format!("{deepest}/x")),
        ("65,535 levels", "/".repeat(65_534)),
    ] {
        let (mut c, _) = RawClient::connect(node.mqtt_addr(), V5, "deep-liar", true, 30);
        c.send(&publish(&topic, "x", QoS::AtLeastOnce, false, 1));
        match c.recv(T) {
            Some(Packet::PubAck(a)) => assert_ne!(a.reason_code, ReasonCode::Success, "{what}"),
            Some(Packet::Disconnect(d)) => assert_ne!(d.reason_code, ReasonCode::Success),
            None => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_alive(&node);
    bystander.finish("deep topics");
    check_memory(
        "deep topics",
        &node,
        baseline,
        baseline.rss + SLACK,
        "baseline + 48 MiB slack",
    );
}

/// QoS 1 messages each publisher sends in the busy-cluster case, and their payload.
const BUSY_MESSAGES: usize = 3_000;
const BUSY_PAYLOAD: usize = 4 * 1024;
/// The default `cluster.forward_buffer_messages` and `mqtt.max_queued_messages`.
const FORWARD_BUFFER: u64 = 10_000;
const DEFAULT_QUEUED: u64 = 1_000;

#[test]
fn a_wildcard_subscriber_that_never_reads_slows_no_node_of_a_busy_cluster() {
    let nodes = Node::cluster(3);
    let bystander = Bystander::start("busy", &nodes[0], &nodes[2]);
    let baselines: Vec<Memory> = nodes.iter().map(|n| memory(n.pid())).collect();
    // `#` on node 3, never read; `#` on node 2, read.
    let (mut hog, _) = RawClient::connect(nodes[2].mqtt_addr(), V5, "hog", true, 0);
    subscribe(&mut hog, "#", QoS::AtLeastOnce);
    let (mut reader, _) = RawClient::connect(nodes[1].mqtt_addr(), V3, "all-reader", true, 30);
    subscribe(&mut reader, "#", QoS::AtLeastOnce);
    flockmq_tests::converged(&nodes.iter().collect::<Vec<_>>());
    let reading = std::thread::spawn(move || {
        receive_counting(&mut reader, 2 * BUSY_MESSAGES, Duration::from_secs(120))
    });
    let publishers: Vec<_> = [0usize, 1]
        .into_iter()
        .map(|n| {
            let addr = nodes[n].mqtt_addr();
            std::thread::spawn(move || {
                let (mut c, _) = RawClient::connect(addr, V3, &format!("busy-pub-{n}"), true, 30);
                publish_acked(
                    &mut c,
                    BUSY_MESSAGES,
                    BUSY_PAYLOAD,
                    100,
                    |i| format!("busy/{n}/{}", i % 50),
                    Duration::from_secs(90),
                )
            })
        })
        .collect();
    let took: Vec<Duration> = publishers
        .into_iter()
        .map(|p| p.join().expect("publisher"))
        .collect();
    let received = reading.join().expect("reader");
    let dropped = counter(&nodes[2], "flockmq_messages_dropped_total", "queue_full");
    println!(
        "hostile[busy cluster]: 2 publishers × {BUSY_MESSAGES} QoS 1 messages of {BUSY_PAYLOAD} B acknowledged in {took:?}; the reading `#` subscriber got {received}, {dropped} dropped for the one that never reads"
    );
    assert!(
        dropped > 0.0,
        "the hog's mailbox filled up and its messages were dropped"
    );
    assert_eq!(received, 2 * BUSY_MESSAGES);
    for t in &took {
        assert!(
            *t < Duration::from_secs(60),
            "a publisher was held back by the subscriber that never reads: {t:?}"
        );
    }
    for node in &nodes {
        assert_alive(node);
    }
    bystander.finish("busy cluster");
    let per_message = BUSY_PAYLOAD as u64 + PER_MESSAGE;
    let hog_bytes = (MAILBOX + INFLIGHT + DEFAULT_QUEUED + WRITE_BATCH) * per_message;
    let bound_of = |b: &Memory| b.rss + hog_bytes + FORWARD_BUFFER * per_message + SLACK;
    for (i, (node, baseline)) in nodes.iter().zip(&baselines).enumerate() {
        check_memory(
            &format!("busy cluster, node {}", i + 1),
            node,
            *baseline,
            bound_of(baseline),
            "baseline + the hog's (mailbox 1024 + inflight 1024 + pending 1000 + write batch 256) × 5 KiB + forward buffer 10,000 × 5 KiB + 48 MiB slack",
        );
    }
    drop(hog);
}

// ---------------------------------------------------------------------------------
// The network fuzzer

/// A topic name (or, with `filter`, a filter) from a small alphabet, so that fuzzed
/// clients meet each other's subscriptions, retained messages and wills.
fn fuzz_topic(rng: &mut Rng, filter: bool) -> String {
    let levels: &[&str] = if filter {
        &["fz", "a", "b", "+", "#", "", "$SYS", "$share", "g"]
    } else {
        &["fz", "a", "b", "", "c", "$SYS"]
    };
    let n = 1 + rng.below(4);
    let mut t: Vec<&str> = (0..n).map(|_| *rng.pick(levels)).collect();
    if t == [""] || rng.chance(70) {
        t[0] = "fz";
    }
    t.join("/")
}

/// A valid packet sequence of a fuzzed client: CONNECT, then a few of SUBSCRIBE,
/// UNSUBSCRIBE, PUBLISH at every QoS, the QoS acknowledgements (PUBREL among them),
/// PINGREQ, and sometimes DISCONNECT; v3.1.1 or v5, with the options of each.
fn valid_sequence(rng: &mut Rng, exec: u64) -> Vec<Vec<u8>> {
    let version = *rng.pick(&[V3, V5, V5, ProtocolVersion::V3_1]);
    let v5 = version == V5;
    let mut packets = Vec::new();
    let will = rng.chance(30).then(|| LastWill {
        topic: fuzz_topic(rng, false),
        payload: {
            let n = rng.below(32);
            Bytes::from(rng.bytes(n))
        },
        qos: *rng.pick(&[QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]),
        retain: rng.chance(30),
        properties: WillProperties {
            will_delay_interval: (v5 && rng.chance(30)).then(|| rng.below(3) as u32),
            ..Default::default()
        },
    });
    let connect = Connect {
        protocol: version,
        clean_start: rng.chance(70),
        keep_alive: *rng.pick(&[0, 1, 5, 60]),
        // Few ids, so that fuzzed clients take each other's sessions over.
        client_id: if rng.chance(10) && version != ProtocolVersion::V3_1 {
            String::new()
        } else {
            format!("fz-{}", exec % 64)
        },
        will,
        username: rng.chance(20).then(|| "fuzzer".to_owned()),
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: (v5 && rng.chance(50)).then(|| rng.below(5) as u32),
            receive_maximum: (v5 && rng.chance(30)).then(|| 1 + rng.below(4) as u16),
            topic_alias_maximum: (v5 && rng.chance(30)).then(|| rng.below(4) as u16),
            maximum_packet_size: (v5 && rng.chance(20)).then(|| 64 + rng.below(512) as u32),
            ..Default::default()
        },
    };
    packets.push(bytes_of(&Packet::Connect(Box::new(connect)), version));
    for _ in 0..1 + rng.below(8) {
        let id = 1 + rng.below(8) as u16;
        let qos = *rng.pick(&[QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]);
        let packet = match rng.below(10) {
            0 | 1 => Packet::Subscribe(Subscribe {
                packet_id: id,
                filters: (0..1 + rng.below(3))
                    .map(|_| {
                        let mut o = opts(qos);
                        o.no_local = v5 && rng.chance(20);
                        (fuzz_topic(rng, true), o)
                    })
                    .collect(),
                properties: SubscribeProperties {
                    subscription_identifier: (v5 && rng.chance(30))
                        .then(|| 1 + rng.below(9) as u32),
                    ..Default::default()
                },
            }),
            2 => Packet::Unsubscribe(Unsubscribe {
                packet_id: id,
                filters: vec![fuzz_topic(rng, true)],
                properties: Default::default(),
            }),
            3..=5 => Packet::Publish(Publish {
                dup: qos != QoS::AtMostOnce && rng.chance(10),
                qos,
                retain: rng.chance(20),
                topic: fuzz_topic(rng, false),
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                properties: PublishProperties {
                    topic_alias: (v5 && rng.chance(20)).then(|| 1 + rng.below(3) as u16),
                    message_expiry_interval: (v5 && rng.chance(20)).then(|| rng.below(3) as u32),
                    ..Default::default()
                },
                payload: {
                    let n = rng.below(64);
                    Bytes::from(rng.bytes(n))
                },
            }),
            6 => Packet::PubRel(PubRel::new(id, ReasonCode::Success)),
            7 => match rng.below(3) {
                0 => Packet::PubAck(PubAck::new(id, ReasonCode::Success)),
                1 => Packet::PubRec(PubRec::new(id, ReasonCode::Success)),
                _ => Packet::PubComp(PubComp::new(id, ReasonCode::Success)),
            },
            8 => Packet::PingReq,
            _ => Packet::Disconnect(Disconnect {
                reason_code: if v5 && rng.chance(50) {
                    ReasonCode::DisconnectWithWillMessage
                } else {
                    ReasonCode::Success
                },
                properties: Default::default(),
            }),
        };
        // A topic alias without a topic is what an alias is for; the codec encodes
        // what it is given.
        packets.push(bytes_of(&packet, version));
    }
    packets
}

/// A remaining-length field that lies about `actual`.
fn length_lie(rng: &mut Rng, actual: usize) -> Vec<u8> {
    let varint = |n: usize| {
        let mut out = BytesMut::new();
        mqtt::codec::write_varint(&mut out, n).expect("at most 268,435,455");
        out.to_vec()
    };
    match rng.below(7) {
        0 => varint(actual + 1 + rng.below(16)),
        1 => varint(actual.saturating_sub(1 + rng.below(8))),
        2 => varint(0),
        3 => varint(268_435_455),
        4 => vec![0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
        5 => vec![0x80, 0x80, 0x80, 0x80],
        _ => {
            // Non-minimal: the right value in more bytes than it needs.
            let mut v = varint(actual);
            let last = v.len() - 1;
            v[last] |= 0x80;
            v.push(0);
            v
        }
    }
}

/// `packets` (from [`valid_sequence`]) mutated one to four times, with `donor`'s
/// packets for splicing, as one byte stream.
fn mutate(rng: &mut Rng, mut packets: Vec<Vec<u8>>, donor: Vec<Vec<u8>>) -> Vec<u8> {
    let mut truncate = false;
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(packets.len());
        match rng.below(9) {
            // A flipped bit.
            0 => {
                let p = &mut packets[i];
                let at = rng.below(p.len());
                p[at] ^= 1 << rng.below(8);
            }
            // A byte set to a value parsers trip over.
            1 => {
                let p = &mut packets[i];
                let at = rng.below(p.len());
                let random = rng.next() as u8;
                p[at] = *rng.pick(&[0x00, 0xFF, 0x7F, 0x80, 0x01, 0xC0, random]);
            }
            // The fixed header's type and flags.
            2 => packets[i][0] = rng.next() as u8,
            // A lie in the remaining length.
            3 => {
                let p = &packets[i];
                let len_bytes = p[1..].iter().position(|b| b & 0x80 == 0).unwrap_or(0) + 1;
                let body = p[1 + len_bytes..].to_vec();
                let mut lied = vec![p[0]];
                lied.extend(length_lie(rng, body.len()));
                lied.extend(body);
                packets[i] = lied;
            }
            // Splice: the rest of the stream from another sequence.
            4 => {
                let j = rng.below(donor.len());
                packets.truncate(i + 1);
                packets.extend(donor[j..].iter().cloned());
            }
            5 => {
                let p = packets[i].clone();
                packets.insert(i, p);
            }
            6 if packets.len() > 1 => {
                packets.remove(i);
            }
            7 => {
                let n = 1 + rng.below(32);
                let garbage = rng.bytes(n);
                let p = &mut packets[i];
                let at = rng.below(p.len() + 1);
                p.splice(at..at, garbage);
            }
            _ => truncate = true,
        }
    }
    let mut stream: Vec<u8> = packets.concat();
    if truncate {
        stream.truncate(rng.below(stream.len()));
    }
    stream
}

/// What one worker's executions did.
#[derive(Debug, Default)]
struct FuzzTally {
    executions: u64,
    bytes_sent: u64,
    /// The node closed the connection by itself.
    closed_by_node: u64,
    /// The node answered with at least one byte.
    answered: u64,
    /// Nothing came back before we gave up waiting (2 s after our half-close).
    gave_up: u64,
    /// Connections the node refused: it is down or not accepting.
    refused: Vec<u64>,
}

/// Send execution `exec` (its sequence derived from `seed` alone) on a fresh
/// connection and wait for the node to end it.
fn execute(addr: std::net::SocketAddr, seed: u64, exec: u64, tally: &mut FuzzTally) {
    let mut rng = Rng(seed ^ exec.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let packets = valid_sequence(&mut rng, exec);
    let donor = valid_sequence(&mut rng, exec + 1);
    let stream = mutate(&mut rng, packets, donor);
    tally.executions += 1;
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(_) => {
            tally.refused.push(exec);
            return;
        }
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    // In one write or in two, the second after the node has seen the first.
    let split = if rng.chance(30) {
        rng.below(stream.len() + 1)
    } else {
        stream.len()
    };
    let _ = s.write_all(&stream[..split]);
    let _ = s.write_all(&stream[split..]);
    tally.bytes_sent += stream.len() as u64;
    // Most executions half-close, so the node processes everything and then ends the
    // connection; some leave at once (an abort, the node sees a reset).
    let mut buf = [0u8; 4096];
    if rng.chance(15) {
        return;
    }
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut got = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                tally.closed_by_node += 1;
                break;
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                tally.closed_by_node += 1;
                break;
            }
            Err(_) => {
                tally.gave_up += 1;
                break;
            }
        }
    }
    if got > 0 {
        tally.answered += 1;
    }
}

/// Fuzzer executions; `HOSTILE_FUZZ_EXECS` for a long run.
fn fuzz_executions() -> u64 {
    std::env::var("HOSTILE_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

/// The fuzzer's seed: `HOSTILE_FUZZ_SEED`, or from the clock (printed either way).
fn fuzz_seed() -> u64 {
    std::env::var("HOSTILE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

#[test]
fn mutated_packet_sequences_from_the_network_leave_the_node_up_and_bystanders_unaffected() {
    let node = Node::start_with_config(
        "[mqtt]\nmax_packet_size = \"64KiB\"\nconnect_timeout = \"2s\"\nmax_session_expiry = \"2s\"\n",
    );
    let bystander = Bystander::start("fuzz", &node, &node);
    let baseline = memory(node.pid());
    let seed = fuzz_seed();
    let execs = fuzz_executions();
    println!(
        "hostile[fuzzer]: seed {seed} (HOSTILE_FUZZ_SEED={seed} replays it), {execs} executions"
    );
    let addr = node.mqtt_addr();
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let tallies = {
        let done = done.clone();
        on_threads(4, move |t, n| {
            let mut tally = FuzzTally::default();
            for exec in (t as u64..execs).step_by(n) {
                execute(addr, seed, exec, &mut tally);
                done.fetch_add(1, Ordering::Relaxed);
                // A node that is down refuses at once: stop instead of spinning.
                if tally.refused.len() > 10 {
                    break;
                }
            }
            tally
        })
    };
    let took = started.elapsed();
    let mut total = FuzzTally::default();
    for t in tallies {
        total.executions += t.executions;
        total.bytes_sent += t.bytes_sent;
        total.closed_by_node += t.closed_by_node;
        total.answered += t.answered;
        total.gave_up += t.gave_up;
        total.refused.extend(t.refused);
    }
    println!(
        "hostile[fuzzer]: {} executions ({} bytes) in {took:?}, {:.0}/s: {} closed by the node, {} answered, {} still open after 2 s, {} refused",
        total.executions,
        total.bytes_sent,
        total.executions as f64 / took.as_secs_f64(),
        total.closed_by_node,
        total.answered,
        total.gave_up,
        total.refused.len()
    );
    assert!(
        total.refused.is_empty(),
        "the node refused connections (down?) from executions {:?} on, seed {seed}",
        total.refused
    );
    assert_eq!(total.executions, execs);
    assert_alive(&node);
    bystander.finish("fuzzer");
    check_memory(
        "fuzzer",
        &node,
        baseline,
        baseline.rss + SLACK,
        "baseline + 48 MiB slack",
    );
}

#[test]
fn the_fuzzer_replays_the_same_sequences_from_the_same_seed() {
    let stream = |seed: u64, exec: u64| {
        let mut rng = Rng(seed ^ exec.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let packets = valid_sequence(&mut rng, exec);
        let donor = valid_sequence(&mut rng, exec + 1);
        mutate(&mut rng, packets, donor)
    };
    for exec in 0..50 {
        assert_eq!(stream(7, exec), stream(7, exec));
    }
    assert_ne!(stream(7, 3), stream(8, 3));
    // The unmutated sequences decode: the mutations start from valid input.
    let mut rng = Rng(11);
    for exec in 0..200 {
        let packets = valid_sequence(&mut rng, exec);
        let mut buf = BytesMut::from(&packets.concat()[..]);
        let first = mqtt::decode(&mut buf, None, 1 << 20).expect("a valid CONNECT");
        let Some(Packet::Connect(c)) = first else {
            panic!("the sequence starts with CONNECT: {first:?}")
        };
        while !buf.is_empty() {
            mqtt::decode(&mut buf, Some(c.protocol), 1 << 20)
                .expect("valid packets")
                .expect("whole packets");
        }
    }
}
