//! The whole cluster inside one process under a simulated network and clock (turmoil):
//! three (or five) `broker-node`s, each the production `node::run` with its own data directory,
//! Raft, forwarding and MQTT listener, and MQTT clients, all on turmoil's network.
//! A seed picks the clients' choices and the faults (partitions, one-way cuts,
//! crashes and restarts from the node's own storage, held links, latency, slow
//! fsyncs, a node's clock jumping forward or back; in half the seeds the nodes cut off
//! leave the cluster and join it again, `cluster.autoclean_after`); every
//! client operation goes into a history that a checker reads at the end:
//!
//! - every QoS 1/2 message a publisher had acknowledged reaches every persistent
//!   subscriber (their sessions never expire);
//! - no QoS 2 message is handed to a subscriber twice;
//! - the messages one connection of a publisher sent reach a subscriber in the order
//!   they were received, per QoS [MQTT-4.6.0-6];
//! - a persistent session is found again on every reconnection (session present);
//! - the retained message of each topic is, on every node once the faults stop, the
//!   last one whose publish was acknowledged;
//! - every acknowledged QoS 1 message to the topic of a shared group (`$share/g/grp/#`,
//!   two or three persistent members that go offline and come back on any node, their
//!   queued messages redistributed after 2 s away) reaches at least one member;
//! - a client id taken over by two connections on two nodes at once (during the
//!   faults) has, once they stop, at most one of its three connections still
//!   answering, and its session survives (every takeover and a last connection find
//!   it).
//!
//! Faults start at 3 s (a leader elected, the clients subscribed) and go on for
//! `SIM_SECONDS` (default 4: short seeds, many of them); once they stop, the run ends
//! as soon as the nodes agree and every client is done (3 s at the least). turmoil
//! steps the clock 5 ms at a time (`SIM_TICK_MS`; a 1 ms step costs 1.7 times the
//! time; a seed replays only with the step it ran with).
//! `SIM_SEED=<seed>` replays one seed; `SIM_SEEDS=<n>` runs n seeds (default 500) from
//! `SIM_FIRST_SEED` (default 1) of `SIM_NODES` nodes (default 3), and the five-node
//! test `SIM_FIVE_SEEDS` (default 10); `SIM_JOBS` seeds at once (default: one per
//! core), `SIM_EACH=1` prints every seed's line. `scripts/simulate.sh` runs long
//! campaigns. Every seed runs in a process of its own (this binary running the
//! ignored test `one_seed`), so that it starts from the same process-wide state
//! however it is run; a process costs little beside a seed (see docs/reliability.md).
//! Seeds that fail on a known, unfixed bug are listed in [`KNOWN_FAILING`]: run and
//! reported, they do not fail the campaign.
//!
//! A seed fixes the run: the fault schedule, every client's choices, turmoil's network
//! (latencies, losses), each node's election timeout, the nodes' hash maps
//! (`broker_node::hash`), and the interleaving, which needs storage's blocking work to
//! take no simulated time (`storage::io` runs it inline here). Each run can record a
//! trace (every client packet, fault and reading at its simulated time; under
//! `SIM_TRACE=<filter>` also the nodes' log events), and `a_seed_replays_the_same_run`
//! runs one seed twice and names the first line where the two traces part. What still
//! escapes the seed (h2 forgets reset streams after a second of real time; tokio's
//! generator behind `select!` in dependencies and a `watch` channel's wake order is
//! seeded only under `--cfg tokio_unstable`) is listed in docs/reliability.md.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Once};
use std::time::Duration;

use broker_node::config::Config;
use broker_node::mqtt::{
    self, Connect, ConnectProperties, Packet, ProtocolVersion, PubAck, PubComp, PubRec, PubRel,
    Publish, PublishProperties, QoS, ReasonCode, RetainHandling, Subscribe, SubscribeProperties,
    SubscriptionOptions,
};
use broker_node::net::{Accept, Conn, Network};
use bytes::{Bytes, BytesMut};
use flockmq_tests::Rng;
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

thread_local! {
    /// The number of nodes of the cluster this thread simulates (a simulation runs on
    /// one thread).
    static NODES: Cell<usize> = const { Cell::new(3) };
    /// The number of members of the shared-subscription group this run has (2 or 3,
    /// as the seed says).
    static MEMBERS: Cell<usize> = const { Cell::new(2) };
}

/// The number of members of the shared-subscription group.
fn members() -> usize {
    MEMBERS.with(Cell::get)
}

/// The number of nodes of the cluster being simulated.
fn nodes() -> usize {
    NODES.with(Cell::get)
}
/// Publishers to `sim/p<i>`, each read by every subscriber; one more publisher
/// (number `PUBLISHERS`) writes QoS 1 messages to the shared group's topic.
const PUBLISHERS: usize = 3;
/// The topic the shared group `$share/g/grp/#` takes, and the group's filter.
const SHARED_TOPIC: &str = "grp/t";
const SHARED_FILTER: &str = "$share/g/grp/#";
/// When the faults may start: the cluster has elected a leader and the clients have
/// subscribed.
const FAULTS_FROM: Duration = Duration::from_secs(3);
/// The least time from the last fault's end to the first reading of the nodes.
const CALM: Duration = Duration::from_secs(3);
const SUBSCRIBERS: usize = 2;
/// Messages each publisher's window holds unacknowledged.
const WINDOW: usize = 4;
/// Topics the retained writer cycles through.
const RETAINED_TOPICS: usize = 3;

/// turmoil's network as the node's.
struct SimNetwork;

struct SimListener(turmoil::net::TcpListener);

impl Accept for SimListener {
    fn accept(&self) -> BoxFuture<'_, io::Result<(Conn, SocketAddr)>> {
        Box::pin(async move {
            let (stream, peer) = self.0.accept().await?;
            Ok((Conn::new(stream), peer))
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Network for SimNetwork {
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<Box<dyn Accept>>> {
        Box::pin(async move {
            let listener = turmoil::net::TcpListener::bind(addr).await?;
            Ok(Box::new(SimListener(listener)) as Box<dyn Accept>)
        })
    }

    fn connect(&self, authority: String) -> BoxFuture<'static, io::Result<Conn>> {
        Box::pin(async move {
            Ok(Conn::new(
                turmoil::net::TcpStream::connect(authority).await?,
            ))
        })
    }
}

/// The simulation's time of day: a fixed epoch plus the simulated time elapsed, plus
/// the offset of the node whose tasks run now ([`Fault::ClockJump`]).
fn sim_wall_clock() -> u64 {
    const EPOCH_MS: u64 = 1_790_000_000_000;
    let at = EPOCH_MS + turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64);
    let offset = HOST_NODE.with(Cell::get).map_or(0, |n| {
        CLOCK_OFFSETS.with(|o| o.borrow().get(n).copied().unwrap_or(0))
    });
    at.saturating_add_signed(offset)
}

/// Which node's tasks turmoil runs now. turmoil steps each host inside a span `node`
/// with its name; this layer keeps the node's index in the span and, while the span
/// is entered, in [`HOST_NODE`], for [`sim_wall_clock`]. Installed only for seeds
/// whose faults move a clock (or with `SIM_LOG`/`SIM_TRACE`): the span costs a little
/// at every step of every host.
struct HostLayer;

/// The node index a `node` span is of (`None` for a client host).
struct HostNode(Option<usize>);

impl<S> tracing_subscriber::Layer<S> for HostLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Name(Option<usize>);
        impl tracing::field::Visit for Name {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "name" {
                    self.0 = (0..nodes()).find(|&i| node_name(i) == value);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut name = Name(None);
        attrs.record(&mut name);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(HostNode(name.0));
        }
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let node = ctx
            .span(id)
            .and_then(|s| s.extensions().get::<HostNode>().and_then(|h| h.0));
        HOST_NODE.with(|h| h.set(node));
    }

    fn on_exit(&self, _: &tracing::span::Id, _: tracing_subscriber::layer::Context<'_, S>) {
        HOST_NODE.with(|h| h.set(None));
    }
}

/// [`HostLayer`], seeing turmoil's `node` spans only.
fn host_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    HostLayer.with_filter(tracing_subscriber::filter::filter_fn(|m| {
        m.is_span() && m.name() == "node" && m.target().starts_with("turmoil")
    }))
}

/// Whether the process-wide subscriber tracks hosts ([`HostLayer`]).
static GLOBAL_HOSTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn install_once() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        broker_node::net::install(Arc::new(SimNetwork));
        broker_node::clock::install_wall_clock(sim_wall_clock);
        let log = std::env::var("SIM_LOG").ok().map(|filter| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(EnvFilter::new(filter))
        });
        let traced = std::env::var("SIM_TRACE")
            .ok()
            .map(|filter| TraceLayer.with_filter(EnvFilter::new(filter)));
        if log.is_some() || traced.is_some() {
            let _ = tracing_subscriber::registry()
                .with(log)
                .with(traced)
                .with(host_layer())
                .try_init();
            GLOBAL_HOSTS.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
}

thread_local! {
    /// The trace of the run this thread simulates, while one is recorded: a line per
    /// client packet sent or received, fault and check reading (and, under
    /// `SIM_TRACE=<filter>`, per node log event), each with its simulated time, in
    /// the order they happened. Two runs of one seed must give the same trace.
    static TRACE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    /// The simulated time while the simulation's own loop runs (injecting a fault,
    /// dropping a crashed node's tasks), outside every host: `turmoil::sim_elapsed()`
    /// then measures from the last host's clock with the real one.
    static LOOP_AT: Cell<Option<Duration>> = const { Cell::new(None) };
    /// The node whose tasks turmoil runs now, where [`HostLayer`] tracks it.
    static HOST_NODE: Cell<Option<usize>> = const { Cell::new(None) };
    /// Each node's clock offset in milliseconds ([`Fault::ClockJump`]).
    static CLOCK_OFFSETS: RefCell<Vec<i64>> = const { RefCell::new(Vec::new()) };
}

/// Add a line to the trace being recorded, if one is, at the simulated time of the
/// host running.
fn trace(line: impl FnOnce() -> String) {
    let at = LOOP_AT.with(Cell::get).or_else(turmoil::sim_elapsed);
    trace_at(at.unwrap_or_default(), line);
}

/// Add a line to the trace being recorded, if one is, at simulated time `at`.
fn trace_at(at: Duration, line: impl FnOnce() -> String) {
    TRACE.with(|t| {
        if let Some(t) = t.borrow_mut().as_mut() {
            t.push(format!("{:>7} {}", at.as_millis(), line()));
        }
    });
}

/// The nodes' log events (those `SIM_TRACE` selects) into the trace.
struct TraceLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for TraceLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write;
                let _ = write!(self.0, " {}={value:?}", field.name());
            }
        }
        if TRACE.with(|t| t.borrow().is_none()) {
            return;
        }
        // What a log line may differ in between two runs of one seed without the runs
        // differing: real instants and times of day (openraft shows both), the temporary
        // data directory's name and the admin API's port.
        static REAL: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
            regex::Regex::new(
                r"Instant \{ tv_sec: \d+, tv_nsec: \d+ \}|\d\d:\d\d:\d\d\.\d{6}|\.tmp\w{6}|127\.0\.0\.1:\d+",
            )
            .expect("regex")
        });
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let meta = event.metadata();
        let fields = REAL.replace_all(&fields.0, "_");
        trace(|| format!("[{} {}]{fields}", meta.level(), meta.target()));
    }
}

fn node_name(i: usize) -> String {
    format!("n{}", i + 1)
}

/// Node `i`'s configuration. Its election timeout is fixed per seed (openraft draws
/// one at random between the minimum and the maximum with a generator of its own):
/// `election_ms` apart per node, so that elections still race, as the seed says.
///
/// With `autoclean`, the leader removes a node it has not reached for 2 s and a node
/// left out asks to be added back (`cluster.autoclean_after`, the Helm chart's way):
/// the faults then make nodes leave and join the cluster, as they would on Kubernetes.
fn node_config(
    i: usize,
    dir: &std::path::Path,
    election_ms: u64,
    http_port: u16,
    autoclean: bool,
) -> Config {
    let members: Vec<String> = (0..nodes())
        .map(|j| format!("{}={}:7000", j + 1, node_name(j)))
        .collect();
    let toml = format!(
        r#"
node_id = {id}
data_dir = "{dir}"
mqtt_addr = "0.0.0.0:1883"
http_addr = "127.0.0.1:{http_port}"
cluster_addr = "0.0.0.0:7000"
advertise_addr = "{name}:7000"
initial_cluster = "{members}"
[mqtt]
sys_interval = "0s"
allow_anonymous = true
shared_redistribute_after = "2s"
[cluster]
allow_insecure = true
election_timeout_min = "{election}ms"
election_timeout_max = "{election_max}ms"
autoclean_after = "{autoclean}"
"#,
        autoclean = if autoclean { "2s" } else { "0s" },
        election = election_ms,
        election_max = election_ms + 1,
        id = i + 1,
        dir = dir.join(node_name(i)).display(),
        name = node_name(i),
        members = members.join(","),
    );
    let config = Config::from_toml(&toml).expect("simulation config");
    config.validate().expect("valid simulation config");
    config
}

/// One client operation's outcome, as the clients saw it.
#[derive(Default)]
struct History {
    /// (publisher, seq) → QoS, for every publish the broker acknowledged.
    acknowledged: BTreeMap<(usize, u64), QoS>,
    /// Per subscriber: every delivery handed to the application, in order:
    /// (publisher, seq, QoS, the publisher's connection it was sent on).
    delivered: Vec<Vec<(usize, u64, QoS, u64)>>,
    /// Per retained topic: the acknowledged writes' values, in acknowledgement order.
    retained_acked: BTreeMap<usize, Vec<u64>>,
    /// Per retained topic: values whose publish was sent but never acknowledged.
    retained_unsure: BTreeMap<usize, BTreeSet<u64>>,
    /// Per node, what a late subscriber found retained: topic → value.
    retained_seen: Vec<BTreeMap<usize, u64>>,
    /// Per node, once the faults stopped: (applied index, state digest) from its admin
    /// API, the last reading of each.
    digests: Vec<(Option<u64>, Option<String>)>,
    /// The shared publisher's acknowledged messages (their sequence numbers).
    shared_acked: BTreeSet<u64>,
    /// Sequence number → the shared group's members it was handed to, each time.
    shared_got: BTreeMap<u64, Vec<usize>>,
    /// The client id taken over twice at once: (takeover CONNACKs received, of
    /// the three connections how many still answered a PINGREQ once the faults
    /// stopped), once it got there.
    twin: Option<(usize, usize)>,
    /// The retained writer has made its last write.
    writes_done: bool,
    /// The auditor's readings have ended (the nodes agreed, or it gave up): the
    /// clients that read the end state read it now.
    settled: bool,
    /// Things a client saw that the checker must report (lost sessions).
    anomalies: Vec<String>,
    /// Connections made, connections lost, by all clients.
    connects: u64,
    drops: u64,
    /// Faults injected.
    faults: Vec<String>,
    /// Clients that got to their end.
    finished: BTreeSet<String>,
    /// Per publisher: the sequence numbers still unacknowledged at the end.
    unacknowledged: BTreeMap<usize, Vec<u64>>,
}

type Shared = Rc<RefCell<History>>;

/// A minimal MQTT 3.1.1 client over a turmoil stream: enough to play every side of
/// the QoS 1 and 2 flows by hand.
struct Client {
    stream: turmoil::net::TcpStream,
    buf: BytesMut,
    /// Who it is and where it connected, for the trace.
    name: String,
}

const V4: ProtocolVersion = ProtocolVersion::V3_1_1;

impl Client {
    /// Connect to `node` as `client_id` with a persistent session (clean session 0).
    /// Returns the client and whether the broker had a session.
    async fn connect(node: &str, client_id: &str, keep_alive: u16) -> io::Result<(Client, bool)> {
        trace(|| format!("{client_id}@{node} connecting"));
        let stream = turmoil::net::TcpStream::connect(format!("{node}:1883"))
            .await
            .inspect_err(|e| trace(|| format!("{client_id}@{node} cannot connect: {e}")))?;
        let mut c = Client {
            stream,
            buf: BytesMut::new(),
            name: format!("{client_id}@{node}"),
        };
        c.send(&Packet::Connect(Box::new(Connect {
            protocol: V4,
            clean_start: false,
            keep_alive,
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        })))
        .await?;
        match c.recv().await? {
            Packet::ConnAck(ack) if ack.reason_code == ReasonCode::Success => {
                Ok((c, ack.session_present))
            }
            other => Err(io::Error::other(format!("refused: {other:?}"))),
        }
    }

    async fn send(&mut self, packet: &Packet) -> io::Result<()> {
        trace(|| format!("{} > {packet:?}", self.name));
        let mut out = BytesMut::new();
        mqtt::encode(packet, V4, &mut out).map_err(io::Error::other)?;
        self.stream
            .write_all(&out)
            .await
            .inspect_err(|e| trace(|| format!("{} send failed: {e}", self.name)))
    }

    async fn recv(&mut self) -> io::Result<Packet> {
        loop {
            if let Some(p) =
                mqtt::decode(&mut self.buf, Some(V4), 1 << 20).map_err(io::Error::other)?
            {
                trace(|| format!("{} < {p:?}", self.name));
                return Ok(p);
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .inspect_err(|e| trace(|| format!("{} recv failed: {e}", self.name)))?;
            if n == 0 {
                trace(|| format!("{} closed by the broker", self.name));
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next packet within `within`, `Ok(None)` if none came.
    async fn recv_within(&mut self, within: Duration) -> io::Result<Option<Packet>> {
        match tokio::time::timeout(within, self.recv()).await {
            Ok(p) => p.map(Some),
            Err(_) => Ok(None),
        }
    }
}

fn publish(topic: String, payload: Vec<u8>, qos: QoS, retain: bool, id: u16, dup: bool) -> Packet {
    Packet::Publish(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id: (qos != QoS::AtMostOnce).then_some(id),
        properties: PublishProperties::default(),
        payload: Bytes::from(payload),
    })
}

/// A SUBSCRIBE to `filter` at `qos`, retained messages sent.
fn subscribe(filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: 1,
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

/// A message's payload: who published it, its sequence number and the publisher's
/// connection it was (re)sent on.
fn payload_of(publisher: usize, seq: u64, connection: u64) -> Vec<u8> {
    format!("{publisher}:{seq}:{connection}").into_bytes()
}

fn parse_payload(p: &[u8]) -> Option<(usize, u64, u64)> {
    let s = std::str::from_utf8(p).ok()?;
    let mut parts = s.split(':');
    let mut next = || parts.next();
    Some((
        next()?.parse().ok()?,
        next()?.parse().ok()?,
        next()?.parse().ok()?,
    ))
}

/// Connect to some node of the cluster, trying others until one answers.
async fn connect_somewhere(rng: &mut Rng, client_id: &str, history: &Shared) -> (Client, bool) {
    loop {
        let node = node_name(rng.below(nodes()));
        let attempt = tokio::time::timeout(
            Duration::from_secs(3),
            Client::connect(&node, client_id, 30),
        )
        .await;
        if let Ok(Ok(connected)) = attempt {
            history.borrow_mut().connects += 1;
            return connected;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(100, 600))).await;
    }
}

/// Where a publisher's message is in its flow.
#[derive(Clone, Copy, PartialEq)]
enum Stage {
    /// PUBLISH sent (or to send again), no acknowledgement yet.
    Published,
    /// QoS 2: PUBREC received, PUBREL sent (or to send again).
    Released,
}

struct Outgoing {
    id: u16,
    seq: u64,
    qos: QoS,
    stage: Stage,
}

/// Publishes `count` messages to `sim/p<i>` (QoS 1 and 2 mixed), `WINDOW` at most
/// unacknowledged, resending per the specification after every reconnection; once
/// `need` subscribers are in. Publisher `PUBLISHERS` publishes QoS 1 messages to the
/// shared group's topic instead.
async fn publisher(
    i: usize,
    seed: u64,
    count: u64,
    (ready, need): (Rc<Cell<usize>>, usize),
    history: Shared,
) -> turmoil::Result {
    let mut rng = Rng(seed ^ (0x5000 + i as u64));
    while ready.get() < need {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shared = i == PUBLISHERS;
    let client_id = format!("pub-{i}");
    let topic = if shared {
        SHARED_TOPIC.to_owned()
    } else {
        format!("sim/p{i}")
    };
    let mut next_seq = 0u64;
    let mut window: VecDeque<Outgoing> = VecDeque::new();
    let mut first = true;
    let mut connection = 0u64;
    while next_seq < count || !window.is_empty() {
        let (mut c, present) = connect_somewhere(&mut rng, &client_id, &history).await;
        connection += 1;
        if !first && !present {
            history
                .borrow_mut()
                .anomalies
                .push(format!("{client_id}: session lost"));
        }
        first = false;
        // Resend what is unacknowledged, in order.
        let mut broken = false;
        for o in &window {
            let p = match o.stage {
                Stage::Published => publish(
                    topic.clone(),
                    payload_of(i, o.seq, connection),
                    o.qos,
                    false,
                    o.id,
                    true,
                ),
                Stage::Released => Packet::PubRel(PubRel::new(o.id, ReasonCode::Success)),
            };
            if c.send(&p).await.is_err() {
                broken = true;
                break;
            }
        }
        let mut silent = 0;
        while !broken && (next_seq < count || !window.is_empty()) {
            if window.len() < WINDOW && next_seq < count {
                let seq = next_seq;
                let qos = if rng.chance(50) || shared {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                let id = (seq % 60_000) as u16 + 1;
                window.push_back(Outgoing {
                    id,
                    seq,
                    qos,
                    stage: Stage::Published,
                });
                next_seq += 1;
                if c.send(&publish(
                    topic.clone(),
                    payload_of(i, seq, connection),
                    qos,
                    false,
                    id,
                    false,
                ))
                .await
                .is_err()
                {
                    break;
                }
                // Spread over the faulty part of the run.
                tokio::time::sleep(Duration::from_millis(rng.range(50, 350))).await;
            }
            let wait = if window.len() < WINDOW && next_seq < count {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(500)
            };
            let packet = match c.recv_within(wait).await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    if window.len() >= WINDOW || next_seq >= count {
                        silent += 1;
                        // No acknowledgement for 4 s: a node cut off from the
                        // majority holds them, or their forwarding failed (they are
                        // then never acknowledged); try elsewhere.
                        if silent >= 8 {
                            break;
                        }
                    }
                    continue;
                }
                Err(_) => break,
            };
            silent = 0;
            match packet {
                Packet::PubAck(ack) => {
                    if let Some(pos) = window
                        .iter()
                        .position(|o| o.id == ack.packet_id && o.qos == QoS::AtLeastOnce)
                    {
                        let o = window.remove(pos).expect("present");
                        let mut h = history.borrow_mut();
                        if shared {
                            h.shared_acked.insert(o.seq);
                        } else {
                            h.acknowledged.insert((i, o.seq), o.qos);
                        }
                    }
                }
                Packet::PubRec(rec) => {
                    if let Some(o) = window
                        .iter_mut()
                        .find(|o| o.id == rec.packet_id && o.qos == QoS::ExactlyOnce)
                    {
                        o.stage = Stage::Released;
                    }
                    if c.send(&Packet::PubRel(PubRel::new(
                        rec.packet_id,
                        ReasonCode::Success,
                    )))
                    .await
                    .is_err()
                    {
                        break;
                    }
                }
                Packet::PubComp(comp) => {
                    if let Some(pos) = window
                        .iter()
                        .position(|o| o.id == comp.packet_id && o.stage == Stage::Released)
                    {
                        let o = window.remove(pos).expect("present");
                        history.borrow_mut().acknowledged.insert((i, o.seq), o.qos);
                    }
                }
                _ => {}
            }
        }
        {
            let mut h = history.borrow_mut();
            h.drops += 1;
            h.unacknowledged
                .insert(i, window.iter().map(|o| o.seq).collect());
        }
        tokio::time::sleep(Duration::from_millis(rng.range(50, 500))).await;
    }
    history.borrow_mut().unacknowledged.remove(&i);
    Ok(())
}

/// Who a [`subscriber`] is.
#[derive(Clone, Copy)]
enum Role {
    /// Subscriber `i` to `sim/#` at QoS 2: must get every acknowledged message.
    Direct(usize),
    /// Member `k` of the shared group `$share/g/grp/#`, at QoS 1: the group must get
    /// every acknowledged message to `grp/t`, each at least once.
    Member(usize),
}

/// A persistent subscriber (see [`Role`]) that goes offline now and then and comes
/// back on any node. Ends once every acknowledged message it must see has reached it
/// (for a member: the group), or at `give_up`.
async fn subscriber(
    role: Role,
    seed: u64,
    publishers_done: Rc<Cell<usize>>,
    ready: Rc<Cell<usize>>,
    give_up: Duration,
    history: Shared,
) -> turmoil::Result {
    let (mut rng, client_id, filter, granted) = match role {
        Role::Direct(i) => (
            Rng(seed ^ (0x9000 + i as u64)),
            format!("sub-{i}"),
            "sim/#",
            QoS::ExactlyOnce,
        ),
        Role::Member(k) => (
            Rng(seed ^ (0xB000 + k as u64)),
            format!("member-{k}"),
            SHARED_FILTER,
            QoS::AtLeastOnce,
        ),
    };
    // QoS 2 packet identifiers PUBREC'd and not yet released: a PUBLISH with one of
    // them is the same message again (the session's state, kept across connections).
    let mut unreleased: BTreeSet<u16> = BTreeSet::new();
    let mut subscribed = false;
    let started = tokio::time::Instant::now();
    loop {
        let (mut c, present) = connect_somewhere(&mut rng, &client_id, &history).await;
        if subscribed && !present {
            history
                .borrow_mut()
                .anomalies
                .push(format!("{client_id}: session lost"));
        }
        if !subscribed {
            let sub = subscribe(filter, granted);
            if c.send(&sub).await.is_err() {
                continue;
            }
            let code = match granted {
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
                _ => ReasonCode::GrantedQoS1,
            };
            // Messages the new subscription matched may come before its SUBACK (a
            // session found again has its queue sent at once): left unacknowledged,
            // they come again, marked DUP, on the next connection.
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            let acked = loop {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                match c.recv_within(left).await {
                    Ok(Some(Packet::SubAck(ack))) => {
                        break ack.reason_codes.first() == Some(&code);
                    }
                    Ok(Some(_)) => continue,
                    _ => break false,
                }
            };
            if !acked {
                history.borrow_mut().drops += 1;
                continue;
            }
            subscribed = true;
            ready.set(ready.get() + 1);
        }
        // Online for a while, then offline (the connection dropped or closed).
        let online = Duration::from_millis(rng.range(1_000, 8_000));
        let until = tokio::time::Instant::now() + online;
        loop {
            let all_in = publishers_done.get() == PUBLISHERS + 1 && {
                let h = history.borrow();
                match role {
                    Role::Direct(i) => h
                        .acknowledged
                        .keys()
                        .all(|k| h.delivered[i].iter().any(|d| (d.0, d.1) == *k)),
                    Role::Member(_) => h
                        .shared_acked
                        .iter()
                        .all(|seq| h.shared_got.contains_key(seq)),
                }
            };
            if all_in || started.elapsed() > give_up {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                break;
            }
            let packet = match c.recv_within(Duration::from_millis(200)).await {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(_) => break,
            };
            let reply = match packet {
                Packet::Publish(p) => {
                    let Some((publisher, seq, connection)) = parse_payload(&p.payload) else {
                        continue;
                    };
                    let new = match p.qos {
                        QoS::ExactlyOnce => unreleased.insert(p.packet_id.unwrap_or(0)),
                        _ => true,
                    };
                    match role {
                        Role::Direct(i) if new && p.topic.starts_with("sim/p") => {
                            history.borrow_mut().delivered[i]
                                .push((publisher, seq, p.qos, connection));
                        }
                        Role::Member(k) if p.topic == SHARED_TOPIC && publisher == PUBLISHERS => {
                            history
                                .borrow_mut()
                                .shared_got
                                .entry(seq)
                                .or_default()
                                .push(k);
                        }
                        _ => {}
                    }
                    match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => {
                            Some(Packet::PubAck(PubAck::new(id, ReasonCode::Success)))
                        }
                        (QoS::ExactlyOnce, Some(id)) => {
                            Some(Packet::PubRec(PubRec::new(id, ReasonCode::Success)))
                        }
                        _ => None,
                    }
                }
                Packet::PubRel(rel) => {
                    unreleased.remove(&rel.packet_id);
                    Some(Packet::PubComp(PubComp::new(
                        rel.packet_id,
                        ReasonCode::Success,
                    )))
                }
                _ => None,
            };
            if let Some(reply) = reply {
                if c.send(&reply).await.is_err() {
                    break;
                }
            }
        }
        history.borrow_mut().drops += 1;
        drop(c);
        tokio::time::sleep(Duration::from_millis(rng.range(100, 3_000))).await;
    }
}

/// Writes retained messages to `sim/r/<k>` (QoS 1) and records which were
/// acknowledged, then, once the auditor has read the nodes settled (the faults have
/// stopped), reads the retained messages on every node.
async fn retained_writer(seed: u64, writes: u64, history: Shared) -> turmoil::Result {
    let mut rng = Rng(seed ^ 0xAAAA);
    let mut value = 0u64;
    while value < writes {
        let (mut c, _) = connect_somewhere(&mut rng, "retainer", &history).await;
        while value < writes {
            let topic = rng.below(RETAINED_TOPICS);
            let id = (value % 60_000) as u16 + 1;
            let p = publish(
                format!("sim/r/{topic}"),
                payload_of(1000 + topic, value, 0),
                QoS::AtLeastOnce,
                true,
                id,
                false,
            );
            history
                .borrow_mut()
                .retained_unsure
                .entry(topic)
                .or_default()
                .insert(value);
            if c.send(&p).await.is_err() {
                value += 1;
                break;
            }
            let acked = loop {
                match c.recv_within(Duration::from_secs(5)).await {
                    Ok(Some(Packet::PubAck(a))) if a.packet_id == id => break true,
                    Ok(Some(_)) => continue,
                    _ => break false,
                }
            };
            value += 1;
            if !acked {
                break;
            }
            {
                let mut h = history.borrow_mut();
                h.retained_unsure
                    .entry(topic)
                    .or_default()
                    .remove(&(value - 1));
                h.retained_acked.entry(topic).or_default().push(value - 1);
            }
            tokio::time::sleep(Duration::from_millis(rng.range(100, 700))).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(100, 500))).await;
    }
    // Read what every node holds, once the faults are over and the cluster settled.
    history.borrow_mut().writes_done = true;
    settled(&history).await;
    let read = |n: usize| async move {
        loop {
            let Ok(Ok((mut c, _))) = tokio::time::timeout(
                Duration::from_secs(3),
                Client::connect(&node_name(n), &format!("reader-{n}"), 30),
            )
            .await
            else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            let sub = subscribe("sim/r/#", QoS::AtMostOnce);
            if c.send(&sub).await.is_err() {
                continue;
            }
            let mut seen = BTreeMap::new();
            let mut ok = false;
            while let Ok(Some(p)) = c.recv_within(Duration::from_millis(500)).await {
                match p {
                    Packet::SubAck(_) => ok = true,
                    Packet::Publish(p) => {
                        if let Some((topic, value, _)) = parse_payload(&p.payload) {
                            seen.insert(topic - 1000, value);
                        }
                    }
                    _ => {}
                }
            }
            if ok {
                break seen;
            }
        }
    };
    // Every node at once: the reads are the run's last seconds. A write never
    // acknowledged may still land while they read (seed 267: node 3 read before it
    // did); the nodes must agree once it has, so read again, up to 10 times a second
    // apart, until they do.
    for _ in 0..10 {
        let seen = futures::future::join_all((0..nodes()).map(read)).await;
        let agree = seen.iter().all(|s| *s == seen[0]);
        history.borrow_mut().retained_seen = seen;
        if agree {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

/// Once `CALM` has passed since the faults stopped (at `faults_end`) and the
/// publishers and the retained writer are done, read each node's applied index and
/// state digest from its admin API until they agree (or 30 s pass); then let the
/// clients that read the end state read it ([`settled`]).
async fn read_digests(
    http_ports: Vec<u16>,
    faults_end: Duration,
    publishers_done: Rc<Cell<usize>>,
    history: Shared,
) -> turmoil::Result {
    let start = tokio::time::Instant::now() - turmoil::elapsed();
    tokio::time::sleep_until(start + faults_end + CALM).await;
    while publishers_done.get() <= PUBLISHERS || !history.borrow().writes_done {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut readings = Vec::new();
        for &port in &http_ports {
            readings.push(cluster_digest(port).await.unwrap_or((None, None)));
        }
        let agree = readings.windows(2).all(|w| w[0] == w[1])
            && readings[0].0.is_some()
            && readings[0].1.is_some();
        trace(|| format!("auditor reads {readings:?}"));
        history.borrow_mut().digests = readings;
        if agree || tokio::time::Instant::now() >= until {
            history.borrow_mut().settled = true;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Once the auditor's readings have ended.
async fn settled(history: &Shared) {
    while !history.borrow().settled {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connect as `client_id` to `node` (no keep alive), trying again until `within`
/// has passed.
async fn connect_to(
    node: &str,
    client_id: &str,
    within: Duration,
    history: &Shared,
) -> Option<(Client, bool)> {
    let until = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < until {
        let attempt =
            tokio::time::timeout(Duration::from_secs(3), Client::connect(node, client_id, 0)).await;
        if let Ok(Ok(connected)) = attempt {
            history.borrow_mut().connects += 1;
            return Some(connected);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Whether the connection answers a PINGREQ within 3 s.
async fn answers_ping(c: &mut Client) -> bool {
    if c.send(&Packet::PingReq).await.is_err() {
        return false;
    }
    loop {
        match c.recv_within(Duration::from_secs(3)).await {
            Ok(Some(Packet::PingResp)) => return true,
            Ok(Some(_)) => continue,
            _ => return false,
        }
    }
}

/// Client id `twin`: connects with a persistent session, then at `takeover_at` two
/// more connections with that client id on two other nodes at once take it over. Once
/// the nodes have settled, at most one of the three may still answer (the broker
/// closes a connection taken over), and the session must have survived: every
/// takeover and a last connection find it present.
async fn twin(seed: u64, takeover_at: Duration, history: Shared) -> turmoil::Result {
    let mut rng = Rng(seed ^ 0x7777);
    let start = tokio::time::Instant::now() - turmoil::elapsed();
    let home = rng.below(nodes());
    let (first, _) = loop {
        if let Some(c) =
            connect_to(&node_name(home), "twin", Duration::from_secs(3), &history).await
        {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(100, 600))).await;
    };
    tokio::time::sleep_until(start + takeover_at).await;
    let a = (home + 1 + rng.below(nodes() - 1)) % nodes();
    let b = (0..nodes())
        .map(|k| (home + k) % nodes())
        .find(|&k| k != home && k != a)
        .expect("three nodes or more");
    let within = Duration::from_secs(rng.range(5, 15));
    let (name_a, name_b) = (node_name(a), node_name(b));
    let (ta, tb) = futures::join!(
        connect_to(&name_a, "twin", within, &history),
        connect_to(&name_b, "twin", within, &history)
    );
    let mut connections = vec![first];
    for (node, taken) in [(a, ta), (b, tb)] {
        if let Some((c, present)) = taken {
            if !present {
                history.borrow_mut().anomalies.push(format!(
                    "twin: the takeover on {} found no session",
                    node_name(node)
                ));
            }
            connections.push(c);
        }
    }
    let takeovers = connections.len() - 1;
    settled(&history).await;
    let mut alive = 0;
    for c in &mut connections {
        if answers_ping(c).await {
            alive += 1;
        }
    }
    trace(|| format!("twin: {takeovers} takeovers, {alive} connections alive"));
    history.borrow_mut().twin = Some((takeovers, alive));
    drop(connections);
    let (_, present) = connect_somewhere(&mut rng, "twin", &history).await;
    if !present {
        history
            .borrow_mut()
            .anomalies
            .push("twin: session lost after the takeovers".to_owned());
    }
    Ok(())
}

/// `GET /api/v1/cluster` of the node whose admin API is on `port`: its applied index
/// and digest.
async fn cluster_digest(port: u16) -> io::Result<(Option<u64>, Option<String>)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /api/v1/cluster HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .map_err(|_| io::Error::other("no answer"))??;
    let text = String::from_utf8_lossy(&response);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| io::Error::other("no body"))?;
    let status: serde_json::Value = serde_json::from_str(body).map_err(io::Error::other)?;
    Ok((
        status["digest_index"].as_u64(),
        status["digest"].as_str().map(str::to_owned),
    ))
}

/// What the checker found wrong, one line each.
fn check(h: &History) -> Vec<String> {
    let mut problems = h.anomalies.clone();
    for (s, delivered) in h.delivered.iter().enumerate() {
        let mut got: HashMap<(usize, u64), usize> = HashMap::new();
        // Order as the specification states it [MQTT-4.6.0-6]: the messages one
        // connection of a publisher sent, per QoS, in the order they were received. A
        // message the broker never acknowledged may be overtaken by later ones of the
        // same connection, and arrive after them once re-sent on a new connection.
        let mut last: HashMap<(usize, u8, u64), u64> = HashMap::new();
        for &(p, seq, qos, connection) in delivered {
            let n = got.entry((p, seq)).or_default();
            *n += 1;
            if *n == 1 {
                if let Some(prev) = last.insert((p, qos as u8, connection), seq) {
                    if prev > seq {
                        problems.push(format!(
                            "sub-{s}: publisher {p}'s message {seq} (QoS {}, its connection \
                             {connection}) after {prev}",
                            qos as u8
                        ));
                    }
                }
            }
            if qos == QoS::ExactlyOnce && *n > 1 {
                problems.push(format!(
                    "sub-{s}: QoS 2 message {p}:{seq} delivered {n} times"
                ));
            }
        }
        for (&(p, seq), _) in h.acknowledged.iter() {
            if !got.contains_key(&(p, seq)) {
                problems.push(format!("sub-{s}: acknowledged message {p}:{seq} lost"));
            }
        }
    }
    // The shared group: each acknowledged message reached a member at least once
    // (members always come back, so one queued for an absent member, or moved on to a
    // connected one, must have been delivered by the end).
    for seq in &h.shared_acked {
        if !h.shared_got.contains_key(seq) {
            problems.push(format!(
                "shared group: acknowledged message {PUBLISHERS}:{seq} reached no member"
            ));
        }
    }
    if let Some((takeovers, alive)) = h.twin {
        if alive > 1 {
            problems.push(format!(
                "twin: {alive} connections alive after {takeovers} takeovers at once"
            ));
        }
    }
    for (n, seen) in h.retained_seen.iter().enumerate() {
        for topic in 0..RETAINED_TOPICS {
            let last_acked = h.retained_acked.get(&topic).and_then(|v| v.last()).copied();
            let unsure = h.retained_unsure.get(&topic);
            let holds = seen.get(&topic).copied();
            // A write never acknowledged is concurrent with everything after it was
            // sent (as in a linearizability check): it may take effect at any later
            // instant, even after a later acknowledged write (its PUBLISH waited on a
            // node cut off from the leader while the writer moved on: seed 4). An
            // acknowledged write older than the last acknowledged one may not.
            let allowed = |v: u64| Some(v) == last_acked || unsure.is_some_and(|u| u.contains(&v));
            let fine = match holds {
                Some(v) => allowed(v),
                None => last_acked.is_none(),
            };
            if !fine {
                problems.push(format!(
                    "{}: retained sim/r/{topic} holds {holds:?}, last acknowledged {last_acked:?}",
                    node_name(n)
                ));
            }
        }
    }
    let digests_agree = h.digests.len() == nodes()
        && h.digests.windows(2).all(|w| w[0] == w[1])
        && h.digests[0].1.is_some();
    if !digests_agree {
        problems.push(format!(
            "nodes' (applied index, digest) differ after the faults stopped: {:?}",
            h.digests
        ));
    }
    if h.retained_seen.len() == nodes() && h.retained_seen.iter().any(|s| *s != h.retained_seen[0])
    {
        problems.push(format!(
            "nodes disagree on retained messages: {:?}",
            h.retained_seen
        ));
    }
    problems
}

/// The faults a seed schedules: (start, what), each undone after its length.
#[derive(Debug, Clone)]
enum Fault {
    /// A node cut off from the other nodes (clients still reach it).
    Isolate(usize),
    /// A node cut off from the other nodes in one direction only (it cannot send).
    MuteOutbound(usize),
    /// A node's process crashes; restarted from its disk when the fault ends.
    Crash(usize),
    /// Messages on the links of a node held back, then released at once.
    Hold(usize),
    /// Links with up to this many milliseconds of latency.
    Slow(u64),
    /// Every node's disk slow: each fsync takes this many milliseconds.
    SlowDisk(u64),
    /// A node's time of day jumps by this many milliseconds (either way), and back
    /// when the fault ends (NTP corrects it); its monotonic clock is untouched.
    ClockJump(usize, i64),
    /// The majority (two nodes) cut off from each other: no quorum anywhere.
    SplitAll,
    /// A node cut off from every client, still talking to its peers.
    CutClients(usize),
    /// Everything to and from a node (peers and clients) held back, then delivered at
    /// once: a paused process as the others see it (its own timers run on, unlike a
    /// process stopped by SIGSTOP, which `tests/tests/faults.rs` covers).
    Stall(usize),
}

/// The client hosts' names.
fn clients() -> Vec<String> {
    (0..SUBSCRIBERS)
        .map(|i| format!("sub{i}"))
        .chain((0..members()).map(|k| format!("member{k}")))
        .chain((0..=PUBLISHERS).map(|i| format!("pub{i}")))
        .chain(["retainer".to_owned(), "twin".to_owned()])
        .collect()
}

/// Every host that must finish.
fn finishers() -> Vec<String> {
    clients()
        .into_iter()
        .chain(["auditor".to_owned()])
        .collect()
}

struct Scheduled {
    at: Duration,
    length: Duration,
    fault: Fault,
}

/// Faults from `FAULTS_FROM` for `faulty` (the last one may end later): at least one.
fn schedule(rng: &mut Rng, faulty: Duration) -> Vec<Scheduled> {
    let mut out = Vec::new();
    let mut t = FAULTS_FROM;
    while t < FAULTS_FROM + faulty {
        let node = rng.below(nodes());
        let fault = match rng.below(14) {
            0..=1 => Fault::Isolate(node),
            2 => {
                let ms = rng.range(1_000, 30_000) as i64;
                Fault::ClockJump(node, if rng.chance(50) { -ms } else { ms })
            }
            3 => Fault::MuteOutbound(node),
            4..=6 => Fault::Crash(node),
            7..=8 => Fault::Hold(node),
            9 => Fault::Slow(rng.range(20, 400)),
            10 => Fault::SlowDisk(rng.range(20, 400)),
            11 => Fault::CutClients(node),
            12 => Fault::Stall(node),
            _ => Fault::SplitAll,
        };
        let length = Duration::from_millis(rng.range(500, 6_000));
        out.push(Scheduled {
            at: t,
            length,
            fault,
        });
        t += length + Duration::from_millis(rng.range(500, 4_000));
    }
    out
}

fn others(n: usize) -> Vec<String> {
    (0..nodes()).filter(|&j| j != n).map(node_name).collect()
}

fn inject(sim: &mut turmoil::Sim<'_>, fault: &Fault) {
    match *fault {
        Fault::Isolate(n) => {
            for o in others(n) {
                sim.partition(node_name(n), o);
            }
        }
        Fault::MuteOutbound(n) => {
            for o in others(n) {
                sim.partition_oneway(node_name(n), o);
            }
        }
        Fault::Crash(n) => sim.crash(node_name(n)),
        Fault::Hold(n) => {
            for o in others(n) {
                sim.hold(node_name(n), o);
            }
        }
        Fault::Slow(ms) => sim.set_max_message_latency(Duration::from_millis(ms)),
        Fault::SlowDisk(ms) => {
            storage::io::set_sync_delay_on_this_thread(Duration::from_millis(ms))
        }
        Fault::ClockJump(n, ms) => CLOCK_OFFSETS.with(|o| o.borrow_mut()[n] += ms),
        Fault::SplitAll => {
            for a in 0..nodes() {
                for b in a + 1..nodes() {
                    sim.partition(node_name(a), node_name(b));
                }
            }
        }
        Fault::CutClients(n) => {
            for c in clients() {
                sim.partition(node_name(n), c);
            }
        }
        Fault::Stall(n) => {
            for o in others(n).into_iter().chain(clients()) {
                sim.hold(node_name(n), o);
            }
        }
    }
}

fn undo(sim: &mut turmoil::Sim<'_>, fault: &Fault) {
    match *fault {
        Fault::Isolate(n) | Fault::MuteOutbound(n) => {
            for o in others(n) {
                sim.repair(node_name(n), o);
            }
        }
        Fault::Crash(n) => sim.bounce(node_name(n)),
        Fault::Hold(n) => {
            for o in others(n) {
                sim.release(node_name(n), o);
            }
        }
        Fault::Slow(_) => sim.set_max_message_latency(Duration::from_millis(5)),
        Fault::SlowDisk(_) => storage::io::set_sync_delay_on_this_thread(Duration::ZERO),
        Fault::ClockJump(n, ms) => CLOCK_OFFSETS.with(|o| o.borrow_mut()[n] -= ms),
        Fault::Stall(n) => {
            for o in others(n).into_iter().chain(clients()) {
                sim.release(node_name(n), o);
            }
        }
        Fault::CutClients(n) => {
            for c in clients() {
                sim.repair(node_name(n), c);
            }
        }
        Fault::SplitAll => {
            for a in 0..nodes() {
                for b in a + 1..nodes() {
                    sim.repair(node_name(a), node_name(b));
                }
            }
        }
    }
}

/// What one seed's run produced.
struct Outcome {
    problems: Vec<String>,
    summary: String,
    /// The run's trace, if it was recorded (see [`TRACE`]).
    trace: Vec<String>,
}

/// Where a run's nodes keep their data: in memory (`/dev/shm`) where the machine has
/// it. An fsync costs nothing there, and in a simulation it buys nothing: turmoil's
/// crash drops a node's tasks, not the machine's page cache, so synced and unsynced
/// writes survive it alike (what fsync guarantees, the real-process fault tests in
/// `faults.rs` exercise). On disk, a seed waited on sled's syncs for a third of its
/// wall time (1.9 s a seed against 1.2 s in memory, same run, same digests).
/// Only with room to spare: a container's `/dev/shm` is 64 MiB unless told otherwise.
fn data_dirs() -> tempfile::TempDir {
    const ROOM_KIB: u64 = 1 << 20;
    let room = std::process::Command::new("df")
        .args(["-k", "--output=avail", "/dev/shm"])
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .nth(1)
                .and_then(|l| l.trim().parse::<u64>().ok())
        });
    room.filter(|&kib| kib >= ROOM_KIB)
        .and_then(|_| tempfile::tempdir_in("/dev/shm").ok())
        .unwrap_or_else(|| tempfile::tempdir().expect("temp dir"))
}

fn run_seed(seed: u64, faulty: Duration, nodes: usize, record: bool) -> Outcome {
    install_once();
    TRACE.with(|t| *t.borrow_mut() = record.then(Vec::new));
    NODES.with(|n| n.set(nodes));
    broker_node::hash::fix_seed(seed);
    storage::io::run_inline_on_this_thread();
    let dir = data_dirs();
    let mut rng = Rng(seed);
    let plan = schedule(&mut rng, faulty);
    CLOCK_OFFSETS.with(|o| *o.borrow_mut() = vec![0; nodes]);
    let jumps = plan.iter().any(|s| matches!(s.fault, Fault::ClockJump(..)));
    let _hosts = (jumps && !GLOBAL_HOSTS.load(std::sync::atomic::Ordering::Relaxed)).then(|| {
        use tracing_subscriber::layer::SubscriberExt;
        tracing::subscriber::set_default(tracing_subscriber::registry().with(host_layer()))
    });
    let faults_end = plan
        .iter()
        .map(|s| s.at + s.length)
        .max()
        .unwrap_or(FAULTS_FROM);
    // Drawn apart from `rng`, whose draws fix the faults and the nodes' timeouts.
    let mut extra = Rng(seed ^ 0x5A5A);
    let group = extra.range(2, 4) as usize;
    MEMBERS.with(|m| m.set(group));
    let takeover_at =
        FAULTS_FROM + Duration::from_millis(extra.range(0, faulty.as_millis() as u64 + 1));
    // Half the seeds: nodes the faults cut off leave the cluster and join it again.
    let autoclean = extra.chance(50);
    // The clients give up (and the checker reports what is missing) this long after
    // the faults stopped; a run ends as soon as every client is done.
    let total = faults_end + Duration::from_secs(90);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(total + Duration::from_secs(30))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(5))
        .enable_tokio_io()
        .tick_duration(Duration::from_millis(env_u64("SIM_TICK_MS").unwrap_or(5)))
        .build();
    // The admin API listens on the real loopback (it is not simulated).
    let http_ports: Vec<u16> = (0..nodes).map(|_| flockmq_tests::free_port()).collect();
    for (i, &http_port) in http_ports.iter().enumerate() {
        let config = node_config(i, dir.path(), rng.range(800, 1600), http_port, autoclean);
        sim.host(node_name(i), move || {
            let config = config.clone();
            async move {
                broker_node::node::run(config, std::future::pending())
                    .await
                    .map_err(|e| e.into())
            }
        });
    }
    let history: Shared = Rc::new(RefCell::new(History {
        delivered: vec![Vec::new(); SUBSCRIBERS],
        ..History::default()
    }));
    let ready = Rc::new(Cell::new(0));
    let done = Rc::new(Cell::new(0));
    let count = faulty.as_secs() * 5 + 10;
    let roles = (0..SUBSCRIBERS)
        .map(|i| (Role::Direct(i), format!("sub{i}")))
        .chain((0..group).map(|k| (Role::Member(k), format!("member{k}"))));
    for (role, host) in roles {
        let run = subscriber(
            role,
            seed,
            done.clone(),
            ready.clone(),
            total,
            history.clone(),
        );
        let history = history.clone();
        sim.client(host.clone(), async move {
            let r = run.await;
            trace(|| format!("{host} done"));
            history.borrow_mut().finished.insert(host);
            r
        });
    }
    for i in 0..=PUBLISHERS {
        let (ready, done, history) = (ready.clone(), done.clone(), history.clone());
        let need = SUBSCRIBERS + group;
        sim.client(format!("pub{i}"), async move {
            let r = publisher(i, seed, count, (ready, need), history.clone()).await;
            done.set(done.get() + 1);
            trace(|| format!("pub{i} done"));
            history.borrow_mut().finished.insert(format!("pub{i}"));
            r
        });
    }
    let run = retained_writer(seed, faulty.as_secs() + 5, history.clone());
    let h = history.clone();
    sim.client("retainer", async move {
        let r = run.await;
        h.borrow_mut().finished.insert("retainer".to_owned());
        r
    });
    let run = twin(seed, takeover_at, history.clone());
    let h = history.clone();
    sim.client("twin", async move {
        let r = run.await;
        h.borrow_mut().finished.insert("twin".to_owned());
        r
    });

    let h = history.clone();
    sim.client("auditor", async move {
        let r = read_digests(http_ports, faults_end, done, h.clone()).await;
        h.borrow_mut().finished.insert("auditor".to_owned());
        r
    });

    let mut pending: VecDeque<Scheduled> = plan.into();
    let mut active: Vec<(Duration, Fault)> = Vec::new();
    let mut error = None;
    loop {
        let now = sim.elapsed();
        LOOP_AT.with(|at| at.set(Some(now)));
        active.retain(|(until, fault)| {
            if now >= *until {
                trace_at(now, || format!("fault {fault:?} over"));
                undo(&mut sim, fault);
                false
            } else {
                true
            }
        });
        while pending.front().is_some_and(|s| s.at <= now) {
            let s = pending.pop_front().expect("present");
            trace_at(now, || format!("fault {:?} for {:?}", s.fault, s.length));
            history
                .borrow_mut()
                .faults
                .push(format!("{:?} at {:?} for {:?}", s.fault, s.at, s.length));
            inject(&mut sim, &s.fault);
            active.push((now + s.length, s.fault));
        }
        LOOP_AT.with(|at| at.set(None));
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    let h = history.borrow();
    let mut problems = check(&h);
    if let Some(e) = error {
        let unfinished: Vec<String> = finishers()
            .into_iter()
            .filter(|c| !h.finished.contains(c))
            .collect();
        problems.push(format!(
            "simulation failed: {e}; unfinished: {unfinished:?}; unacknowledged: {:?}",
            h.unacknowledged
        ));
    }
    let delivered: usize = h.delivered.iter().map(Vec::len).sum();
    let shared_delivered: usize = h.shared_got.values().map(Vec::len).sum();
    let summary = format!(
        "seed {seed}: {} faults{}, {} acknowledged, {delivered} delivered, shared {} acknowledged \
         {shared_delivered} delivered to {group} members, twin (takeovers, alive) {:?}, \
         {} connections, {} drops, digest {:?}, {:?} simulated",
        h.faults.len(),
        if autoclean { " (autoclean)" } else { "" },
        h.acknowledged.len(),
        h.shared_acked.len(),
        h.twin,
        h.connects,
        h.drops,
        h.digests.first(),
        sim.elapsed(),
    );
    trace_at(sim.elapsed(), || summary.clone());
    let trace = TRACE.with(|t| t.borrow_mut().take()).unwrap_or_default();
    Outcome {
        problems,
        summary,
        trace,
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Seeds that fail on a bug found and not yet fixed, (nodes, seconds of faults, seed,
/// what): a campaign runs them and reports them, without failing on them, so that
/// the rest of CI's seeds still guard everything else. A known seed that passes is
/// reported too (remove it).
///
/// None now. Seeds 240 and 473 were here ("QoS 2 duplicate after a PUBLISH re-sent on
/// another node"): every node counted its connection ids from its start time alone,
/// nodes started in the same millisecond handed out the same ids, and a connection on
/// one node then passed for the session's new owner on another
/// (`broker::Broker::next_connection_id`).
const KNOWN_FAILING: &[(usize, u64, u64, &str)] = &[];

/// Seconds of faults per seed unless `SIM_SECONDS` says: short seeds, so that CI runs
/// many (`scripts/simulate.sh` runs long ones).
const SHORT_SECONDS: u64 = 4;

#[test]
fn seeds_of_faults_keep_every_guarantee() {
    let nodes = env_u64("SIM_NODES").unwrap_or(3) as usize;
    campaign(nodes, env_u64("SIM_SEEDS").unwrap_or(500));
}

#[test]
fn five_nodes_keep_every_guarantee() {
    campaign(5, env_u64("SIM_FIVE_SEEDS").unwrap_or(10));
}

/// One campaign at a time: its seeds, each in a process of its own (see
/// [`run_alone`]), `SIM_JOBS` at once (default: one per core).
fn alone() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `count` seeds (from `SIM_FIRST_SEED`, or the one `SIM_SEED`) of a cluster of
/// `nodes`, `SIM_SECONDS` of faults each, `SIM_JOBS` processes at once; print one
/// line for the campaign (and, under `SIM_EACH=1`, one per seed; a failing seed's
/// always), and fail naming every failing seed.
fn campaign(nodes: usize, count: u64) {
    use std::io::Write;
    let seconds = env_u64("SIM_SECONDS").unwrap_or(SHORT_SECONDS);
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let first = env_u64("SIM_FIRST_SEED").unwrap_or(1);
            (first..first + count).collect()
        }
    };
    let jobs = env_u64("SIM_JOBS")
        .map(|j| j as usize)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, seeds.len().max(1));
    let each = std::env::var("SIM_EACH").is_ok_and(|v| v == "1");
    let _alone = alone();
    let started = std::time::Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let at = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(&seed) = seeds.get(at) else { return };
                let (passed, output) = run_alone(seed, seconds, nodes, None);
                // Past the test harness's capture: the campaign's figures belong in
                // CI's log whether it passes or not.
                if each || !passed {
                    let _ = std::io::stderr().write_all(&output);
                }
                if !passed {
                    failed.lock().expect("failed seeds").push(seed);
                }
            });
        }
    });
    let mut failed = failed.into_inner().expect("failed seeds");
    failed.sort_unstable();
    let known = |seed: u64| {
        KNOWN_FAILING
            .iter()
            .find(|k| (k.0, k.1, k.2) == (nodes, seconds, seed))
    };
    for k in KNOWN_FAILING
        .iter()
        .filter(|k| (k.0, k.1) == (nodes, seconds))
    {
        if seeds.contains(&k.2) && !failed.contains(&k.2) {
            let _ = writeln!(
                std::io::stderr(),
                "simulation: known failing seed {} passed: remove it from KNOWN_FAILING",
                k.2
            );
        }
    }
    let (known_failed, failed): (Vec<u64>, Vec<u64>) =
        failed.into_iter().partition(|&s| known(s).is_some());
    for &seed in &known_failed {
        let what = known(seed).map_or("", |k| k.3);
        let _ = writeln!(
            std::io::stderr(),
            "simulation: seed {seed} failed as known: {what}"
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "simulation: {} seeds of {nodes} nodes, {seconds} s of faults each, {jobs} at once, \
         in {:.1?}: {} failed ({} known)",
        seeds.len(),
        started.elapsed(),
        failed.len() + known_failed.len(),
        known_failed.len()
    );
    assert!(
        failed.is_empty(),
        "{nodes} nodes, failing seeds: {failed:?} (replay one: SIM_NODES={nodes} \
         SIM_SEED=<seed> SIM_SECONDS={seconds})"
    );
}

/// Run one seed in a process of its own (this test binary running [`one_seed`]), its
/// trace to `trace` if given; whether it passed.
///
/// A process of its own, so that a seed starts from the same process-wide state
/// whether it is the first or the hundredth of a campaign, or replayed alone: tokio
/// numbers tasks from one counter per process, and a runtime being dropped (a crashed
/// node) drops its tasks in an order that follows those numbers (its task list is
/// sharded by them), so the same seed run second in a process closed the crashed
/// node's connections in another order than run first (seed 5 parted 3 ms after its
/// first crash). And sled's concurrency control is one lock per process, on which two
/// simulations in one process have deadlocked.
/// Returns whether it passed, and what it wrote to its standard error (its line, and
/// its report if it failed); its standard output (the harness's, which CI's counting of
/// tests would read) is dropped.
fn run_alone(
    seed: u64,
    seconds: u64,
    nodes: usize,
    trace: Option<&std::path::Path>,
) -> (bool, Vec<u8>) {
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"));
    child
        .args(["--exact", "one_seed", "--ignored", "--nocapture", "--quiet"])
        .env("SIM_SEED", seed.to_string())
        .env("SIM_SECONDS", seconds.to_string())
        .env("SIM_NODES", nodes.to_string())
        .env("RUST_BACKTRACE", "0")
        .env_remove("SIM_TRACE_FILE");
    if let Some(path) = trace {
        child.env("SIM_TRACE_FILE", path);
    }
    // The nodes' logs (`SIM_LOG`) go to the standard output.
    let stdout = match std::env::var_os("SIM_LOG") {
        Some(_) => std::process::Stdio::inherit(),
        None => std::process::Stdio::null(),
    };
    let out = child
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run the test binary");
    (out.status.success(), out.stderr)
}

/// One run of `SIM_SEED` (`SIM_NODES` nodes, `SIM_SECONDS` of faults), its trace to the
/// file `SIM_TRACE_FILE` if set: what [`run_alone`] runs in a process of its own.
#[test]
#[ignore = "run by the campaigns, one process per seed"]
fn one_seed() {
    let seed = env_u64("SIM_SEED").expect("SIM_SEED");
    let seconds = env_u64("SIM_SECONDS").unwrap_or(SHORT_SECONDS);
    let nodes = env_u64("SIM_NODES").unwrap_or(3) as usize;
    let trace = std::env::var("SIM_TRACE_FILE").ok();
    let started = std::time::Instant::now();
    let outcome = run_seed(seed, Duration::from_secs(seconds), nodes, trace.is_some());
    eprintln!(
        "{nodes} nodes, {} in {:?}",
        outcome.summary,
        started.elapsed()
    );
    if let Some(path) = trace {
        std::fs::write(&path, outcome.trace.join("\n") + "\n").expect("write the trace");
    }
    if !outcome.problems.is_empty() {
        let mut report = format!(
            "seed {seed} FAILED (replay: SIM_NODES={nodes} SIM_SEED={seed} SIM_SECONDS={seconds}):"
        );
        for p in outcome.problems.iter().take(20) {
            report.push_str(&format!("\n  {p}"));
        }
        panic!("{report}");
    }
}

/// Run one seed twice, each time in a process of its own, as a failing seed is
/// replayed; the first place where the two runs' traces part, if they do.
/// `SIM_TRACE_OUT=<dir>` keeps both traces there (`<seed>-a.trace`, `<seed>-b.trace`)
/// for a diff; `SIM_TRACE=<filter>` adds the nodes' log events to them.
fn replay_twice(seed: u64, seconds: u64, nodes: usize) -> Option<String> {
    let _alone = alone();
    let kept = std::env::var("SIM_TRACE_OUT").ok();
    let dir = kept
        .as_ref()
        .map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    let run = |name: &str| -> Vec<String> {
        let path = dir.join(format!("{seed}-{name}-{}.trace", std::process::id()));
        // Whether the seed passes is the campaigns' business; the trace is written
        // either way.
        let (_, output) = run_alone(seed, seconds, nodes, Some(&path));
        let _ = std::io::Write::write_all(&mut std::io::stderr(), &output);
        let text = std::fs::read_to_string(&path).expect("the run wrote its trace");
        match &kept {
            Some(_) => {
                let _ = std::fs::rename(&path, dir.join(format!("{seed}-{name}.trace")));
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        text.lines().map(str::to_owned).collect()
    };
    let (a, b) = (run("a"), run("b"));
    eprintln!("seed {seed}: {} trace lines", a.len());
    let at = a
        .iter()
        .zip(&b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))?;
    let mut report = format!("seed {seed}: the runs part at trace line {at}:\n");
    for line in &a[at.saturating_sub(8)..at] {
        report.push_str(&format!("    {line}\n"));
    }
    let none = String::from("(end of trace)");
    report.push_str(&format!("  a {}\n", a.get(at).unwrap_or(&none)));
    report.push_str(&format!("  b {}", b.get(at).unwrap_or(&none)));
    Some(report)
}

/// A seed determines the run: the same seed run twice, each in a process of its own,
/// gives the same trace (every client packet, fault and reading, at the same simulated
/// instants). Seed 5 by default: a crash, a stall, an isolation and a split, and none
/// of the sources docs/reliability.md lists as left has parted its runs.
#[test]
fn a_seed_replays_the_same_run() {
    let seed = env_u64("SIM_SEED").unwrap_or(5);
    let seconds = env_u64("SIM_SECONDS").unwrap_or(20);
    let nodes = env_u64("SIM_NODES").unwrap_or(3) as usize;
    if let Some(report) = replay_twice(seed, seconds, nodes) {
        panic!("{report}");
    }
}
