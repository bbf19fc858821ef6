//! `flockmq-bench`: a lean MQTT load generator built on FlockMQ's own codec, for
//! comparing brokers on the same machine (FlockMQ, Mosquitto, rumqttd, ...).
//!
//! Scenarios: `fan-in` (P publishers → 1 wildcard subscriber), `fan-out` (1 publisher →
//! S subscribers), `pairs` (N publisher/subscriber pairs on their own topics), `storm`
//! (C idle connections held for T seconds), and two for the control plane, `subscribes`
//! (SUBSCRIBEs per second through Raft) and `sessions` (fill the replicated state with
//! persistent sessions and retained messages), and `offline` (messages queued for
//! persistent sessions that are away: publish rate and the broker's memory per queued
//! delivery), `wildcards` (S subscribers with distinct `+`/`#` filters, 4 publishers
//! over S topics each routed to exactly one of them) and `retained` (N retained
//! messages set, then one `#` subscriber receives them all) — each against one or several broker addresses (cluster mode spreads clients round robin over them). Every payload
//! carries the publisher id, a sequence number and a send timestamp, so the subscribers
//! measure loss, duplicates and latency. The run is bounded by duration and message
//! count and prints one JSON line. The generator's own CPU share is reported, so a
//! saturated generator is visible instead of being blamed on the broker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use broker_node::mqtt::{
    self, Connect, ConnectProperties, Disconnect, Packet, ProtocolVersion, PubAck, PubComp, PubRel,
    Publish, PublishProperties, QoS, ReasonCode, RetainHandling, Subscribe, SubscribeProperties,
    SubscriptionOptions,
};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Scenario {
    FanIn,
    FanOut,
    Pairs,
    Storm,
    /// Control plane: every client sends SUBSCRIBEs (new filters, `inflight` at a time)
    /// for `duration`; measures SUBACKs per second and their latency.
    Subscribes,
    /// Control plane: `clients` persistent sessions, each with one subscription and one
    /// retained message of its own, then disconnected (state to replicate and catch up).
    Sessions,
    /// Queues of offline sessions: `clients` persistent sessions subscribe to
    /// `fleet/all/#` at QoS 1 and disconnect, then one publisher sends `count` QoS 1
    /// messages of `payload` bytes to `fleet/all/cmd` (`inflight` outstanding), each
    /// queued for every session. Measures the publish rate and, given `broker_pid`,
    /// the broker's resident memory before and after the publishes.
    Offline,
    /// Routing through many wildcard filters: `clients` subscribers, subscriber i on
    /// `bench/w/i/+`, `bench/w/+/i` or `bench/w/i/#` (i mod 3), and 4 publishers
    /// cycling over the topics `bench/w/i/i`, each of which matches subscriber i's
    /// filter alone.
    Wildcards,
    /// Retained messages: one publisher sets `clients` retained messages (QoS 1,
    /// `inflight` outstanding) on distinct topics under `bench/r/`, then one subscriber
    /// subscribes to `bench/r/#` and receives them all. Measures the set rate, the
    /// delivery rate after SUBSCRIBE and the latency of each from the SUBSCRIBE, and
    /// given `broker_pid` the broker's memory per retained message.
    Retained,
}

#[derive(Parser, Debug)]
#[command(about = "MQTT load generator: throughput, latency, loss, memory per connection")]
struct Args {
    /// Scenario to run.
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Broker addresses; clients are spread over them round robin (cluster mode).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:1883")]
    brokers: Vec<SocketAddr>,
    /// Publishers (fan-in), subscribers (fan-out), pairs, or connections (storm).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Payload bytes (at least 20: id, sequence, timestamp).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Offered rate in messages per second over all publishers; 0 = full speed.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How long publishers publish (storm: how long connections are held).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many messages in total (0 = no limit).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Unacknowledged QoS 1/2 messages per publisher.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// MQTT protocol version (4 = 3.1.1, 5).
    #[arg(long, default_value_t = 4)]
    protocol: u8,
    /// How long subscribers wait for stragglers after publishing ends.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// A label copied into the JSON output (e.g. the broker's name).
    #[arg(long, default_value = "")]
    label: String,
    /// Storm: connections opened at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Storm: a file created once every connection is up (for measuring the broker then).
    #[arg(long)]
    ready_file: Option<std::path::PathBuf>,
    /// Storm: connect over TLS, trusting the CA certificates in this PEM file (the
    /// broker's certificate must name `localhost`).
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Offline and retained: the broker's process id (same machine), whose VmRSS is
    /// read from /proc before and after the publishes; storm: sampled while the
    /// clients connect, for the peak.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Offline: more processes (every node of a cluster), whose VmRSS growth per queued
    /// delivery is reported each, measured when `broker_pid`'s is.
    #[arg(long, value_delimiter = ',')]
    node_pids: Vec<u32>,
    /// Offline: read the broker's VmRSS once more this long after the last
    /// acknowledgement (an allocator returns freed pages over seconds); 0: not.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    settled_after: Duration,
}

/// Counters shared by all tasks.
#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    out_of_order: AtomicU64,
    errors: AtomicU64,
    /// Nanoseconds since start of the last message any subscriber received.
    last_receive_ns: AtomicU64,
}

/// What subscribers saw of each publisher: the highest sequence and which arrived.
#[derive(Default)]
struct SeenFrom {
    seen: std::collections::HashSet<u64>,
    last: Option<u64>,
}

struct Subscriber {
    latencies_us: Vec<u32>,
    seen: HashMap<u32, SeenFrom>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.payload < 20 {
        bail!("--payload must be at least 20 bytes");
    }
    if args.qos > 2 {
        bail!("--qos must be 0, 1 or 2");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

fn version(p: u8) -> anyhow::Result<ProtocolVersion> {
    Ok(match p {
        4 => ProtocolVersion::V3_1_1,
        5 => ProtocolVersion::V5,
        3 => ProtocolVersion::V3_1,
        _ => bail!("--protocol must be 3, 4 or 5"),
    })
}

/// A CONNACK refusing the connection, with its reason.
#[derive(Debug)]
struct Refused(ReasonCode);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connection refused: {:?}", self.0)
    }
}

impl std::error::Error for Refused {}

/// A connected client: the codec over one TCP stream.
struct Conn {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    rbuf: BytesMut,
    version: ProtocolVersion,
}

impl Conn {
    async fn connect(addr: SocketAddr, id: &str, version: ProtocolVersion) -> anyhow::Result<Conn> {
        Self::connect_with(addr, id, version, true).await
    }

    /// Connect; `clean_start: false` makes a persistent session (v5: one that never
    /// expires).
    async fn connect_with(
        addr: SocketAddr,
        id: &str,
        version: ProtocolVersion,
        clean_start: bool,
    ) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let mut conn = Conn {
            read,
            write,
            rbuf: BytesMut::with_capacity(64 * 1024),
            version,
        };
        conn.send(&connect_packet(id, version, clean_start)).await?;
        match conn.recv().await? {
            Packet::ConnAck(ack) if ack.reason_code == ReasonCode::Success => Ok(conn),
            Packet::ConnAck(ack) => Err(Refused(ack.reason_code).into()),
            other => bail!("connection refused: {other:?}"),
        }
    }

    /// [`Conn::connect_with`], trying again (every 250 ms, for up to 15 s) while the
    /// broker answers "server unavailable" or "server busy": a cluster electing a
    /// leader answers so for a moment, and a load that stopped there would measure the
    /// election, not the broker.
    async fn connect_patiently(
        addr: SocketAddr,
        id: &str,
        version: ProtocolVersion,
        clean_start: bool,
    ) -> anyhow::Result<Conn> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match Conn::connect_with(addr, id, version, clean_start).await {
                Err(e)
                    if Instant::now() < deadline
                        && e.downcast_ref::<Refused>().is_some_and(|r| {
                            matches!(r.0, ReasonCode::ServerUnavailable | ReasonCode::ServerBusy)
                        }) =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }

    async fn send(&mut self, packet: &Packet) -> anyhow::Result<()> {
        let mut buf = BytesMut::new();
        mqtt::encode(packet, self.version, &mut buf).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.write.write_all(&buf).await?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<Packet> {
        loop {
            if let Some(p) = mqtt::decode(&mut self.rbuf, Some(self.version), 268_435_455)
                .map_err(|e| anyhow::anyhow!("{e}"))?
            {
                return Ok(p);
            }
            if self.read.read_buf(&mut self.rbuf).await? == 0 {
                bail!("connection closed by broker");
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        self.send(&subscribe_packet(1, filter, qos)).await?;
        loop {
            if let Packet::SubAck(ack) = self.recv().await? {
                if ack.reason_codes.iter().any(|c| c.is_error()) {
                    bail!("subscription refused: {:?}", ack.reason_codes);
                }
                return Ok(());
            }
        }
    }
}

/// A CONNECT with a keep alive of 120 s; `clean_start: false` makes a persistent
/// session (v5: one that never expires).
fn connect_packet(id: &str, version: ProtocolVersion, clean_start: bool) -> Packet {
    let mut properties = ConnectProperties::default();
    if !clean_start && version == ProtocolVersion::V5 {
        properties.session_expiry_interval = Some(u32::MAX);
    }
    Packet::Connect(Box::new(Connect {
        protocol: version,
        clean_start,
        keep_alive: 120,
        client_id: id.to_owned(),
        will: None,
        username: None,
        password: None,
        properties,
    }))
}

/// A TLS client configuration trusting the CA certificates in `ca_file`, without
/// session resumption: every storm connection is a device of its own and makes a full
/// handshake.
fn tls_connector(ca_file: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let pem =
        std::fs::read(ca_file).with_context(|| format!("cannot read {}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// An idle storm connection, held open and never read.
#[allow(dead_code)] // held for its socket alone
enum Held {
    Plain(Conn),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connect over TLS (the server named `localhost`), send CONNECT, wait for CONNACK.
async fn tls_connect(
    addr: SocketAddr,
    id: &str,
    version: ProtocolVersion,
    connector: &tokio_rustls::TlsConnector,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut tls = connector.connect(name, tcp).await?;
    let mut buf = BytesMut::new();
    mqtt::encode(&connect_packet(id, version, true), version, &mut buf)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tls.write_all(&buf).await?;
    tls.flush().await?;
    let mut rbuf = BytesMut::with_capacity(64);
    loop {
        match mqtt::decode(&mut rbuf, Some(version), 1 << 16).map_err(|e| anyhow::anyhow!("{e}"))? {
            Some(Packet::ConnAck(ack)) if ack.reason_code == ReasonCode::Success => return Ok(tls),
            Some(other) => bail!("connection refused: {other:?}"),
            None => {
                if tls.read_buf(&mut rbuf).await? == 0 {
                    bail!("connection closed by broker");
                }
            }
        }
    }
}

/// A SUBSCRIBE of one filter.
fn subscribe_packet(packet_id: u16, filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        filters: vec![(
            filter.to_owned(),
            SubscriptionOptions {
                qos,
                no_local: false,
                retain_as_published: false,
                retain_handling: RetainHandling::SendAtSubscribe,
            },
        )],
        properties: SubscribeProperties::default(),
    })
}

fn now_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

async fn run(args: Args) -> anyhow::Result<()> {
    let version = version(args.protocol)?;
    let qos = QoS::try_from(args.qos).map_err(|_| anyhow::anyhow!("bad qos"))?;
    let totals = Arc::new(Totals::default());
    let start = Instant::now();
    let cpu_start = process_cpu_seconds();
    let addr = |i: usize| args.brokers[i % args.brokers.len()];

    match args.scenario {
        Scenario::Storm => return storm(&args, version).await,
        Scenario::Subscribes => return subscribes(&args, version).await,
        Scenario::Sessions => return sessions(&args, version).await,
        Scenario::Offline => return offline(&args, version).await,
        Scenario::Retained => return retained(&args, version).await,
        _ => {}
    }

    // Topics per scenario: (subscriber filters, each publisher's topics).
    let one = |t: String| -> Arc<[String]> { Arc::from(vec![t]) };
    let (subs, pubs): (Vec<String>, Vec<Arc<[String]>>) = match args.scenario {
        Scenario::FanIn => (
            vec!["bench/in/+".to_owned()],
            (0..args.clients)
                .map(|i| one(format!("bench/in/{i}")))
                .collect(),
        ),
        Scenario::FanOut => (
            (0..args.clients).map(|_| "bench/out".to_owned()).collect(),
            vec![one("bench/out".to_owned())],
        ),
        Scenario::Pairs => (
            (0..args.clients)
                .map(|i| format!("bench/pair/{i}"))
                .collect(),
            (0..args.clients)
                .map(|i| one(format!("bench/pair/{i}")))
                .collect(),
        ),
        Scenario::Wildcards => {
            const PUBLISHERS: usize = 4;
            let filters = (0..args.clients)
                .map(|i| match i % 3 {
                    0 => format!("bench/w/{i}/+"),
                    1 => format!("bench/w/+/{i}"),
                    _ => format!("bench/w/{i}/#"),
                })
                .collect();
            let topics = (0..PUBLISHERS)
                .map(|k| {
                    (k..args.clients)
                        .step_by(PUBLISHERS)
                        .map(|i| format!("bench/w/{i}/{i}"))
                        .collect::<Vec<_>>()
                        .into()
                })
                .collect();
            (filters, topics)
        }
        Scenario::Storm
        | Scenario::Subscribes
        | Scenario::Sessions
        | Scenario::Offline
        | Scenario::Retained => {
            unreachable!("handled above")
        }
    };
    if pubs.iter().any(|t| t.is_empty()) {
        bail!("--clients is too small for this scenario");
    }
    let expected_per_msg = match args.scenario {
        Scenario::FanOut => subs.len() as u64,
        _ => 1,
    };

    let publishing = Arc::new(AtomicBool::new(true));
    let results = Arc::new(Mutex::new(Vec::<Subscriber>::new()));
    let mut sub_tasks = Vec::new();
    for (i, filter) in subs.iter().enumerate() {
        let mut conn = Conn::connect(addr(i + 1), &format!("bench-sub-{i}"), version).await?;
        conn.subscribe(filter, qos).await?;
        let totals = totals.clone();
        let results = results.clone();
        let publishing = publishing.clone();
        let drain = args.drain;
        sub_tasks.push(tokio::spawn(async move {
            let mut s = Subscriber {
                latencies_us: Vec::new(),
                seen: HashMap::new(),
            };
            let mut idle_since: Option<Instant> = None;
            loop {
                let packet =
                    match tokio::time::timeout(Duration::from_millis(200), conn.recv()).await {
                        Ok(Ok(p)) => p,
                        Ok(Err(_)) => {
                            totals.errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(_) => {
                            if !publishing.load(Ordering::Relaxed) {
                                let since = *idle_since.get_or_insert_with(Instant::now);
                                if since.elapsed() >= drain {
                                    break;
                                }
                            }
                            continue;
                        }
                    };
                idle_since = None;
                if let Packet::Publish(p) = packet {
                    on_message(&mut s, &p.payload, start, &totals);
                    let ack = match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => {
                            Some(Packet::PubAck(PubAck::new(id, ReasonCode::Success)))
                        }
                        (QoS::ExactlyOnce, Some(id)) => Some(Packet::PubRec(
                            broker_node::mqtt::PubRec::new(id, ReasonCode::Success),
                        )),
                        _ => None,
                    };
                    if let Some(ack) = ack {
                        if conn.send(&ack).await.is_err() {
                            break;
                        }
                    }
                } else if let Packet::PubRel(r) = packet {
                    let _ = conn
                        .send(&Packet::PubComp(PubComp::new(
                            r.packet_id,
                            ReasonCode::Success,
                        )))
                        .await;
                }
            }
            results.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        }));
    }

    let per_pub_rate = if args.rate == 0 {
        0.0
    } else {
        args.rate as f64 / pubs.len() as f64
    };
    let per_pub_count = if args.count == 0 {
        u64::MAX
    } else {
        args.count.div_ceil(pubs.len() as u64)
    };
    let mut pub_tasks = Vec::new();
    for (i, topics) in pubs.iter().enumerate() {
        let conn = Conn::connect(addr(i), &format!("bench-pub-{i}"), version).await?;
        let totals = totals.clone();
        let topics = topics.clone();
        let payload_len = args.payload;
        let inflight = args.inflight.max(1);
        let duration = args.duration;
        pub_tasks.push(tokio::spawn(publisher(
            conn,
            i as u32,
            topics,
            false,
            qos,
            payload_len,
            per_pub_rate,
            per_pub_count,
            inflight,
            duration,
            start,
            totals,
        )));
    }
    let pub_started = Instant::now();
    let pub_started_ns = now_ns(start);
    for t in pub_tasks {
        let _ = t.await;
    }
    let publish_secs = pub_started.elapsed().as_secs_f64();
    publishing.store(false, Ordering::Relaxed);
    for t in sub_tasks {
        let _ = t.await;
    }
    let wall = start.elapsed().as_secs_f64();
    let last_ns = totals.last_receive_ns.load(Ordering::Relaxed);
    let receive_secs = (last_ns.saturating_sub(pub_started_ns) as f64 / 1e9).max(publish_secs);
    let cpu = process_cpu_seconds() - cpu_start;

    let subs = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
    let mut lat: Vec<u32> = subs
        .iter()
        .flat_map(|s| s.latencies_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let sent = totals.sent.load(Ordering::Relaxed);
    let received = totals.received.load(Ordering::Relaxed);
    let duplicates = totals.duplicates.load(Ordering::Relaxed);
    let expected = sent * expected_per_msg;
    let unique = received - duplicates;
    let lost = expected.saturating_sub(unique);
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let idx = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        f64::from(lat[idx]) / 1000.0
    };
    let cpu_share =
        cpu / wall / std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    let out = serde_json::json!({
        "label": args.label,
        "scenario": format!("{:?}", args.scenario).to_lowercase(),
        "brokers": args.brokers.len(),
        "clients": args.clients,
        "qos": args.qos,
        "payload_bytes": args.payload,
        "offered_rate": args.rate,
        "sent": sent,
        "received": received,
        "expected": expected,
        "lost": lost,
        "duplicates": duplicates,
        "out_of_order": totals.out_of_order.load(Ordering::Relaxed),
        "errors": totals.errors.load(Ordering::Relaxed),
        "publish_seconds": publish_secs,
        "send_rate": sent as f64 / publish_secs,
        // Over the time until the last message arrived, not only while publishing:
        // a broker that buffers does not get credit for messages it delivers later.
        "receive_rate": received as f64 / receive_secs,
        "receive_seconds": receive_secs,
        "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "p999": pct(0.999), "max": pct(1.0)},
        "generator_cpu_share": cpu_share,
        "generator_saturated": cpu_share > 0.9,
    });
    println!("{out}");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    mut conn: Conn,
    id: u32,
    topics: Arc<[String]>,
    retain: bool,
    qos: QoS,
    payload_len: usize,
    rate: f64,
    count: u64,
    inflight: usize,
    duration: Duration,
    start: Instant,
    totals: Arc<Totals>,
) {
    let began = Instant::now();
    let mut seq: u64 = 0;
    let mut outstanding = 0usize;
    let mut next_id: u16 = 1;
    let mut wbuf = BytesMut::with_capacity(64 * 1024);
    let filler = vec![b'x'; payload_len - 20];
    while began.elapsed() < duration && seq < count {
        // Pace to the offered rate.
        if rate > 0.0 {
            let due = began + Duration::from_secs_f64(seq as f64 / rate);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        // Fill a batch of publishes the window allows, then write them at once.
        let batch = if rate > 0.0 { 1 } else { 64 };
        let mut n = 0;
        while n < batch && seq < count && (qos == QoS::AtMostOnce || outstanding < inflight) {
            let mut payload = BytesMut::with_capacity(payload_len);
            payload.put_u32(id);
            payload.put_u64(seq);
            payload.put_u64(now_ns(start));
            payload.put_slice(&filler);
            let packet_id = (qos != QoS::AtMostOnce).then(|| {
                let pid = next_id;
                next_id = if next_id == u16::MAX { 1 } else { next_id + 1 };
                pid
            });
            let p = Packet::Publish(Publish {
                dup: false,
                qos,
                retain,
                topic: topics[(seq % topics.len() as u64) as usize].clone(),
                packet_id,
                properties: PublishProperties::default(),
                payload: payload.freeze(),
            });
            if mqtt::encode(&p, conn.version, &mut wbuf).is_err() {
                totals.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            seq += 1;
            n += 1;
            if qos != QoS::AtMostOnce {
                outstanding += 1;
            }
        }
        if !wbuf.is_empty() {
            if conn.write.write_all(&wbuf).await.is_err() {
                totals.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            totals.sent.fetch_add(n as u64, Ordering::Relaxed);
            wbuf.clear();
        }
        // Collect acknowledgements: wait when the window is full, else take what is there.
        while qos != QoS::AtMostOnce && outstanding > 0 {
            let must_wait = outstanding >= inflight;
            let packet = if must_wait {
                match tokio::time::timeout(Duration::from_secs(10), conn.recv()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        totals.errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            } else {
                match try_recv(&mut conn) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(_) => {
                        totals.errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            };
            if !ack_progress(&mut conn, packet, &mut outstanding).await {
                totals.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    // Wait for the remaining acknowledgements, then leave cleanly.
    while qos != QoS::AtMostOnce && outstanding > 0 {
        match tokio::time::timeout(Duration::from_secs(10), conn.recv()).await {
            Ok(Ok(p)) => {
                if !ack_progress(&mut conn, p, &mut outstanding).await {
                    break;
                }
            }
            _ => break,
        }
    }
    let _ = conn
        .send(&Packet::Disconnect(broker_node::mqtt::Disconnect {
            reason_code: ReasonCode::Success,
            properties: Default::default(),
        }))
        .await;
}

/// Decode a packet already buffered or readable without waiting.
fn try_recv(conn: &mut Conn) -> anyhow::Result<Option<Packet>> {
    loop {
        if let Some(p) = mqtt::decode(&mut conn.rbuf, Some(conn.version), 268_435_455)
            .map_err(|e| anyhow::anyhow!("{e}"))?
        {
            return Ok(Some(p));
        }
        conn.rbuf.reserve(4096);
        match conn.read.try_read_buf(&mut conn.rbuf) {
            Ok(0) => bail!("closed"),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

async fn ack_progress(conn: &mut Conn, packet: Packet, outstanding: &mut usize) -> bool {
    match packet {
        Packet::PubAck(_) | Packet::PubComp(_) => {
            *outstanding = outstanding.saturating_sub(1);
            true
        }
        Packet::PubRec(r) => conn
            .send(&Packet::PubRel(PubRel::new(
                r.packet_id,
                ReasonCode::Success,
            )))
            .await
            .is_ok(),
        Packet::Disconnect(_) => false,
        _ => true,
    }
}

fn on_message(s: &mut Subscriber, payload: &Bytes, start: Instant, totals: &Totals) {
    totals.received.fetch_add(1, Ordering::Relaxed);
    totals
        .last_receive_ns
        .fetch_max(now_ns(start), Ordering::Relaxed);
    if payload.len() < 20 {
        return;
    }
    let id = u32::from_be_bytes(payload[0..4].try_into().unwrap_or_default());
    let seq = u64::from_be_bytes(payload[4..12].try_into().unwrap_or_default());
    let sent = u64::from_be_bytes(payload[12..20].try_into().unwrap_or_default());
    let lat_us = now_ns(start).saturating_sub(sent) / 1000;
    s.latencies_us
        .push(u32::try_from(lat_us).unwrap_or(u32::MAX));
    let from = s.seen.entry(id).or_default();
    if !from.seen.insert(seq) {
        totals.duplicates.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if from.last.is_some_and(|last| seq < last) {
        totals.out_of_order.fetch_add(1, Ordering::Relaxed);
    }
    from.last = Some(from.last.map_or(seq, |l| l.max(seq)));
}

/// Hold `clients` idle connections for `duration`, then report how many succeeded.
async fn storm(args: &Args, version: ProtocolVersion) -> anyhow::Result<()> {
    use futures::StreamExt;
    let start = Instant::now();
    let brokers = args.brokers.clone();
    let connector = args.tls_ca.as_deref().map(tls_connector).transpose()?;
    // The broker's resident memory, sampled while the clients connect: the peak of a
    // connection storm.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = args.broker_pid.map(|pid| {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let before = rss_bytes(pid).unwrap_or(0);
            let mut peak = before;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(5));
            }
            (before, peak)
        })
    });
    let attempts = futures::stream::iter(0..args.clients)
        .map(|i| {
            let addr = brokers[i % brokers.len()];
            let connector = connector.clone();
            async move {
                let id = format!("storm-{i}");
                if let Some(connector) = connector {
                    let tls = tls_connect(addr, &id, version, &connector).await?;
                    return anyhow::Ok(Held::Tls(Box::new(tls)));
                }
                let mut conn = Conn::connect(addr, &id, version).await?;
                // Held, never read again: its 64 KiB read buffer would make the
                // generator, not the broker, the limit at 100,000 connections.
                conn.rbuf = BytesMut::new();
                anyhow::Ok(Held::Plain(conn))
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    let results: Vec<anyhow::Result<Held>> = attempts.collect().await;
    let mut conns = Vec::with_capacity(args.clients);
    let mut failed = 0u64;
    for r in results {
        match r {
            Ok(c) => conns.push(c),
            Err(_) => failed += 1,
        }
    }
    let connect_secs = start.elapsed().as_secs_f64();
    // A last look once every connection is up (a peak reached just then).
    std::thread::sleep(Duration::from_millis(200));
    sampling.store(false, Ordering::Relaxed);
    let (rss_before, rss_peak) = match sampler.map(|s| s.join()) {
        Some(Ok((before, peak))) => (Some(before), Some(peak)),
        _ => (None, None),
    };
    if let Some(path) = &args.ready_file {
        std::fs::write(path, conns.len().to_string())?;
    }
    tokio::time::sleep(args.duration).await;
    let out = serde_json::json!({
        "label": args.label,
        "scenario": "storm",
        "clients": args.clients,
        "connected": conns.len(),
        "failed": failed,
        "connect_seconds": connect_secs,
        "connects_per_second": conns.len() as f64 / connect_secs,
        "held_seconds": args.duration.as_secs_f64(),
        "tls": connector.is_some(),
        "rss_before_bytes": rss_before,
        "rss_peak_connecting_bytes": rss_peak,
    });
    println!("{out}");
    Ok(())
}

/// The value at quantile `p` of sorted `values` (microseconds), in milliseconds.
fn quantile_ms(values: &[u32], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let idx = ((values.len() as f64 * p).ceil() as usize).clamp(1, values.len()) - 1;
    f64::from(values[idx]) / 1000.0
}

/// Every client subscribes to new filters, `inflight` SUBSCRIBEs outstanding each, for
/// `duration` (or until `count` SUBACKs in all): the control plane's write rate.
async fn subscribes(args: &Args, version: ProtocolVersion) -> anyhow::Result<()> {
    let qos = QoS::try_from(args.qos).map_err(|_| anyhow::anyhow!("bad qos"))?;
    let mut conns = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let addr = args.brokers[i % args.brokers.len()];
        conns.push(Conn::connect(addr, &format!("bench-subs-{i}"), version).await?);
    }
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let stop_at = start + args.duration;
    let inflight = args.inflight.clamp(1, 1000);
    let mut tasks = Vec::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let (acked, refused, count) = (acked.clone(), refused.clone(), args.count);
        tasks.push(tokio::spawn(async move {
            let mut sent_at: HashMap<u16, Instant> = HashMap::new();
            let mut latencies_us: Vec<u32> = Vec::new();
            let mut n: u64 = 0;
            loop {
                let more = Instant::now() < stop_at
                    && (count == 0 || acked.load(Ordering::Relaxed) < count);
                while more && sent_at.len() < inflight {
                    let id = (n % 60_000) as u16 + 1;
                    n += 1;
                    let filter = format!("bench/subs/{i}/{n}");
                    conn.send(&subscribe_packet(id, &filter, qos)).await?;
                    sent_at.insert(id, Instant::now());
                }
                if sent_at.is_empty() {
                    break;
                }
                if let Packet::SubAck(ack) = conn.recv().await? {
                    if let Some(t) = sent_at.remove(&ack.packet_id) {
                        latencies_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    if ack.reason_codes.iter().any(|c| c.is_error()) {
                        refused.fetch_add(1, Ordering::Relaxed);
                    } else {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(latencies_us)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let acked = acked.load(Ordering::Relaxed);
    let out = serde_json::json!({
        "label": args.label,
        "scenario": "subscribes",
        "brokers": args.brokers.len(),
        "clients": args.clients,
        "inflight": inflight,
        "subscribed": acked,
        "refused": refused.load(Ordering::Relaxed),
        "seconds": secs,
        "subscribes_per_second": acked as f64 / secs,
        "latency_ms": {
            "p50": quantile_ms(&latencies, 0.50),
            "p99": quantile_ms(&latencies, 0.99),
            "max": quantile_ms(&latencies, 1.0),
        },
    });
    println!("{out}");
    Ok(())
}

/// Make `clients` persistent sessions (`concurrency` at a time), each subscribed to
/// `bench/s/<i>` and owning the retained message of `bench/r/<i>`, then disconnected.
async fn sessions(args: &Args, version: ProtocolVersion) -> anyhow::Result<()> {
    use futures::StreamExt;
    let start = Instant::now();
    let payload = Bytes::from(vec![b'r'; args.payload]);
    let brokers = args.brokers.clone();
    let label = args.label.clone();
    let made = futures::stream::iter(0..args.clients)
        .map(|i| {
            let addr = brokers[i % brokers.len()];
            let (payload, label) = (payload.clone(), label.clone());
            async move {
                let id = format!("{label}sess-{i}");
                let mut conn = Conn::connect_with(addr, &id, version, false).await?;
                conn.subscribe(&format!("bench/s/{i}"), QoS::AtLeastOnce)
                    .await?;
                conn.send(&Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    topic: format!("bench/r/{label}{i}"),
                    packet_id: Some(1),
                    properties: PublishProperties::default(),
                    payload,
                }))
                .await?;
                loop {
                    if let Packet::PubAck(ack) = conn.recv().await? {
                        if ack.reason_code.is_error() {
                            bail!("retained publish refused: {:?}", ack.reason_code);
                        }
                        break;
                    }
                }
                conn.send(&Packet::Disconnect(Disconnect {
                    reason_code: ReasonCode::Success,
                    properties: Default::default(),
                }))
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    let results: Vec<anyhow::Result<()>> = made.collect().await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
        eprintln!("first failure: {e:#}");
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = args.clients - failed;
    let out = serde_json::json!({
        "label": args.label,
        "scenario": "sessions",
        "brokers": args.brokers.len(),
        "sessions": ok,
        "failed": failed,
        "seconds": secs,
        "sessions_per_second": ok as f64 / secs,
    });
    println!("{out}");
    Ok(())
}

/// Persistent sessions `{label}offline-<i>` for `i` in `0..clients` (`concurrency` at
/// a time), each subscribed to `fleet/all/#` at QoS 1, then disconnected.
async fn offline_sessions(args: &Args, version: ProtocolVersion) -> anyhow::Result<()> {
    use futures::StreamExt;
    let brokers = args.brokers.clone();
    let made = futures::stream::iter(0..args.clients)
        .map(|i| {
            let addr = brokers[i % brokers.len()];
            let id = format!("{}offline-{i}", args.label);
            async move {
                let mut conn = Conn::connect_patiently(addr, &id, version, false).await?;
                conn.subscribe("fleet/all/#", QoS::AtLeastOnce).await?;
                conn.send(&Packet::Disconnect(Disconnect {
                    reason_code: ReasonCode::Success,
                    properties: Default::default(),
                }))
                .await?;
                // The broker closes the connection: the session is offline from then.
                while conn.recv().await.is_ok() {}
                anyhow::Ok(())
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    let results: Vec<anyhow::Result<()>> = made.collect().await;
    match results.into_iter().find_map(Result::err) {
        Some(e) => Err(e.context("making the offline sessions")),
        None => Ok(()),
    }
}

/// The resident memory of process `pid` in bytes (VmRSS), if it can be read.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How long the broker is left alone before its memory is read: sessions just closed,
/// publishes just acknowledged, and what they free or apply settles.
const SETTLE: Duration = Duration::from_secs(2);

/// `count` QoS 1 messages to `fleet/all/cmd` while `clients` persistent sessions
/// subscribed to it are offline, so that each is queued for every one of them; then
/// one session comes back and reads its queue, to show what the broker kept.
async fn offline(args: &Args, version: ProtocolVersion) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must say how many messages to queue");
    }
    offline_sessions(args, version).await?;
    tokio::time::sleep(SETTLE).await;
    let rss_before = args.broker_pid.and_then(rss_bytes);
    let nodes_before: Vec<Option<u64>> = args.node_pids.iter().map(|&p| rss_bytes(p)).collect();
    let totals = Arc::new(Totals::default());
    let conn = Conn::connect(
        args.brokers[0],
        &format!("{}offline-pub", args.label),
        version,
    )
    .await?;
    let start = Instant::now();
    publisher(
        conn,
        0,
        Arc::from(vec!["fleet/all/cmd".to_owned()]),
        false,
        QoS::AtLeastOnce,
        args.payload,
        0.0,
        args.count,
        args.inflight.max(1),
        args.duration,
        start,
        totals.clone(),
    )
    .await;
    let publish_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let rss_after = args.broker_pid.and_then(rss_bytes);
    let nodes_after: Vec<Option<u64>> = args.node_pids.iter().map(|&p| rss_bytes(p)).collect();
    let rss_settled = if args.settled_after > SETTLE {
        tokio::time::sleep(args.settled_after - SETTLE).await;
        args.broker_pid.and_then(rss_bytes)
    } else {
        None
    };
    // One session back: how many of the messages its queue held.
    let mut conn = Conn::connect_with(
        args.brokers[0],
        &format!("{}offline-0", args.label),
        version,
        false,
    )
    .await?;
    let mut kept = 0u64;
    while let Ok(Ok(packet)) = tokio::time::timeout(Duration::from_secs(2), conn.recv()).await {
        if let Packet::Publish(p) = packet {
            kept += 1;
            if let Some(id) = p.packet_id {
                conn.send(&Packet::PubAck(PubAck::new(id, ReasonCode::Success)))
                    .await?;
            }
        }
    }
    let sent = totals.sent.load(Ordering::Relaxed);
    let deliveries = sent * args.clients as u64;
    let growth_to = |after: Option<u64>| {
        rss_before
            .zip(after)
            .map(|(before, after)| after as i64 - before as i64)
    };
    let (growth, settled_growth) = (growth_to(rss_after), growth_to(rss_settled));
    let per_delivery = |growth: Option<i64>| growth.map(|g| g as f64 / deliveries.max(1) as f64);
    let per_node: Vec<Option<f64>> = nodes_before
        .iter()
        .zip(&nodes_after)
        .map(|(before, after)| per_delivery(before.zip(*after).map(|(b, a)| a as i64 - b as i64)))
        .collect();
    let out = serde_json::json!({
        "label": args.label,
        "scenario": "offline",
        "bytes_per_queued_delivery_per_node": per_node,
        "brokers": args.brokers.len(),
        "sessions": args.clients,
        "payload_bytes": args.payload,
        "inflight": args.inflight,
        "sent": sent,
        "errors": totals.errors.load(Ordering::Relaxed),
        "publish_seconds": publish_secs,
        "publish_rate": sent as f64 / publish_secs,
        "queued_deliveries": deliveries,
        "kept_for_one_session": kept,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_growth_bytes": growth,
        "bytes_per_queued_delivery": per_delivery(growth),
        "settled_after_seconds": args.settled_after.as_secs_f64(),
        "rss_settled_bytes": rss_settled,
        "bytes_per_queued_delivery_settled": per_delivery(settled_growth),
    });
    println!("{out}");
    Ok(())
}

/// `clients` retained messages set on distinct topics, then every one of them
/// received by a subscriber to `bench/r/#`.
async fn retained(args: &Args, version: ProtocolVersion) -> anyhow::Result<()> {
    let n = args.clients;
    let topics: Arc<[String]> = (0..n)
        .map(|i| format!("bench/r/{}/{}", i / 1000, i % 1000))
        .collect::<Vec<_>>()
        .into();
    let rss_before = args.broker_pid.and_then(rss_bytes);
    let totals = Arc::new(Totals::default());
    let conn = Conn::connect(
        args.brokers[0],
        &format!("{}retained-pub", args.label),
        version,
    )
    .await?;
    let start = Instant::now();
    publisher(
        conn,
        0,
        topics,
        true,
        QoS::AtLeastOnce,
        args.payload,
        0.0,
        n as u64,
        args.inflight.max(1),
        // Every message is set, however long it takes: the subscriber counts them.
        Duration::MAX,
        start,
        totals.clone(),
    )
    .await;
    let set_secs = start.elapsed().as_secs_f64();
    let set = totals.sent.load(Ordering::Relaxed);
    let errors = totals.errors.load(Ordering::Relaxed);
    tokio::time::sleep(SETTLE).await;
    let rss_after = args.broker_pid.and_then(rss_bytes);

    // QoS 0: the retained messages come as fast as the broker sends them.
    let mut conn = Conn::connect(
        args.brokers[args.brokers.len() - 1],
        &format!("{}retained-sub", args.label),
        version,
    )
    .await?;
    let subscribed = Instant::now();
    conn.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            "bench/r/#".to_owned(),
            SubscriptionOptions {
                qos: QoS::AtMostOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: RetainHandling::SendAtSubscribe,
            },
        )],
        properties: SubscribeProperties::default(),
    }))
    .await?;
    let mut latencies_us: Vec<u32> = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::with_capacity(n);
    let mut duplicates = 0u64;
    while seen.len() < n {
        match tokio::time::timeout(args.drain, conn.recv()).await {
            Ok(Ok(Packet::Publish(p))) => {
                latencies_us.push(subscribed.elapsed().as_micros().min(u32::MAX as u128) as u32);
                if !seen.insert(p.topic) {
                    duplicates += 1;
                }
            }
            Ok(Ok(_)) => {}
            // Nothing more within `drain`, or the connection ended.
            _ => break,
        }
    }
    let receive_secs = subscribed.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies_us.is_empty() {
            return 0.0;
        }
        let idx =
            ((latencies_us.len() as f64 * p).ceil() as usize).clamp(1, latencies_us.len()) - 1;
        f64::from(latencies_us[idx]) / 1000.0
    };
    let received = latencies_us.len() as u64;
    let growth = rss_before
        .zip(rss_after)
        .map(|(before, after)| after as i64 - before as i64);
    let out = serde_json::json!({
        "label": args.label,
        "scenario": "retained",
        "brokers": args.brokers.len(),
        "clients": n,
        "qos": 1,
        "payload_bytes": args.payload,
        "sent": set,
        "received": received,
        "expected": n,
        "lost": (n as u64).saturating_sub(seen.len() as u64),
        "duplicates": duplicates,
        "errors": errors,
        "publish_seconds": set_secs,
        "send_rate": set as f64 / set_secs,
        // Retained messages delivered per second from the SUBSCRIBE to the last one.
        "receive_rate": received as f64 / receive_secs.max(1e-9),
        "receive_seconds": receive_secs,
        // From the SUBSCRIBE to each retained message's arrival.
        "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "p999": pct(0.999), "max": pct(1.0)},
        "rss_growth_bytes": growth,
        "bytes_per_retained": growth.map(|g| g as f64 / n.max(1) as f64),
        "generator_cpu_share": 0.0,
        "generator_saturated": false,
    });
    println!("{out}");
    Ok(())
}

/// CPU seconds (user + system) this process has used, from /proc.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the ")" that ends the command name: utime is the 12th, stime 13th.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
