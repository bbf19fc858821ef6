//! Parked connections (`mqtt.park_after`): an idle plain-TCP connection gives up its
//! task and waits in the node's parking lot. Clients must not be able to tell: every
//! test here lets connections park, checks that they did (`flockmq_connections_parked`),
//! then drives them the ways a connection can be woken. TLS connections park too,
//! with their rustls session: the same wake-ups, over TLS.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use broker_node::mqtt::{
    Connect, ConnectProperties, LastWill, Packet, ProtocolVersion, PubAck, Publish,
    PublishProperties, QoS, ReasonCode, WillProperties,
};
use bytes::Bytes;
use flockmq_tests::mqtt::{disconnect_reason, next_publish, publish, subscribe};
use flockmq_tests::pki::make_pki;
use flockmq_tests::{free_port, Node, RawClient};

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;
const T: Duration = Duration::from_secs(5);

fn node() -> Node {
    Node::start_with_config("[mqtt]\npark_after = \"300ms\"\n")
}

/// The value of an unlabelled metric, or the sum over a labelled one's series whose
/// labels contain `labels`.
fn metric(node: &Node, name: &str, labels: &str) -> f64 {
    let url = format!("http://127.0.0.1:{}/metrics", node.http_port);
    let body = ureq::get(&url)
        .call()
        .expect("GET /metrics")
        .into_string()
        .expect("text");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many parked connections were woken for `why` ("mailbox", "keep_alive", ...).
fn unparked(node: &Node, why: &str) -> f64 {
    metric(
        node,
        "flockmq_connections_unparked_total",
        &format!("why=\"{why}\""),
    )
}

/// Wait until `n` connections are parked.
fn wait_parked(node: &Node, n: usize) {
    let deadline = Instant::now() + T;
    loop {
        let parked = metric(node, "flockmq_connections_parked", "");
        if parked as usize == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{parked} connections parked, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn connect_with_will(node: &Node, id: &str, keep_alive: u16) -> RawClient {
    connect_with_will_on(RawClient::open(node.mqtt_addr(), V5), id, keep_alive)
}

/// CONNECT (v5) on the opened `c` with a will on `status/{id}`.
fn connect_with_will_on(mut c: RawClient, id: &str, keep_alive: u16) -> RawClient {
    c.send(&Packet::Connect(Box::new(Connect {
        protocol: V5,
        clean_start: true,
        keep_alive,
        client_id: id.into(),
        will: Some(LastWill {
            topic: format!("status/{id}"),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties::default(),
        }),
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    })));
    assert!(matches!(c.recv(T), Some(Packet::ConnAck(_))));
    c
}

/// `publisher` sends "go {round}" at QoS 1 to `fleet/r1/cmd`; `sub` receives it at
/// QoS 1 and acknowledges it.
fn publish_round(publisher: &mut RawClient, sub: &mut RawClient, round: u16) {
    let payload = format!("go {round}");
    publisher.send(&publish(
        "fleet/r1/cmd",
        &payload,
        QoS::AtLeastOnce,
        false,
        round,
    ));
    assert!(matches!(publisher.recv(T), Some(Packet::PubAck(_))));
    let got = next_publish(sub, T).expect("the parked subscriber gets it");
    assert_eq!(got.payload, payload.as_bytes());
    assert_eq!(got.qos, QoS::AtLeastOnce);
    sub.send(&Packet::PubAck(PubAck::new(
        got.packet_id.expect("QoS 1 has an id"),
        ReasonCode::Success,
    )));
}

#[test]
fn parked_subscribers_receive_what_is_published_to_them() {
    let node = node();
    let (mut v5, _) = RawClient::connect(node.mqtt_addr(), V5, "sensor-5", true, 60);
    let (mut v3, _) = RawClient::connect(node.mqtt_addr(), V3, "sensor-3", true, 60);
    subscribe(&mut v5, "fleet/#", QoS::AtLeastOnce);
    subscribe(&mut v3, "fleet/+/cmd", QoS::AtMostOnce);
    wait_parked(&node, 2);

    let (mut publisher, _) = RawClient::connect(node.mqtt_addr(), V5, "ops", true, 60);
    for round in 1..=3u16 {
        publish_round(&mut publisher, &mut v5, round);
        let got = next_publish(&mut v3, T).expect("the parked v3 subscriber gets it");
        assert_eq!(got.payload, format!("go {round}").as_bytes());
        // Both park again once idle (the publisher too).
        wait_parked(&node, 3);
    }
    assert!(unparked(&node, "mailbox") >= 2.0);
}

#[test]
fn a_parked_connection_answers_pingreq_without_waking() {
    let node = node();
    let (mut c, _) = RawClient::connect(node.mqtt_addr(), V3, "pinger", true, 1);
    wait_parked(&node, 1);
    // Four keep-alive periods: the connection stays open on PINGREQs alone.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(700));
        c.send(&Packet::PingReq);
        assert_eq!(c.recv(T), Some(Packet::PingResp));
    }
    assert_eq!(
        metric(&node, "flockmq_connections_unparked_total", ""),
        0.0,
        "PINGREQs are answered in the parking lot"
    );
    wait_parked(&node, 1);
}

#[test]
fn a_silent_parked_client_is_closed_by_keep_alive_and_its_will_published() {
    let node = node();
    let (mut watcher, _) = RawClient::connect(node.mqtt_addr(), V5, "watcher", true, 60);
    subscribe(&mut watcher, "status/#", QoS::AtLeastOnce);
    let started = Instant::now();
    let mut silent = connect_with_will(&node, "silent", 2);
    wait_parked(&node, 2);
    assert_eq!(
        disconnect_reason(&mut silent, Duration::from_secs(6)),
        Some(ReasonCode::KeepAliveTimeout)
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2900),
        "closed too early: {waited:?}"
    );
    assert!(silent.is_closed(T));
    let will = next_publish(&mut watcher, T).expect("the will");
    assert_eq!(will.topic, "status/silent");
    assert!(unparked(&node, "keep_alive") >= 1.0);
}

#[test]
fn a_parked_client_whose_socket_drops_leaves_its_will() {
    let node = node();
    let (mut watcher, _) = RawClient::connect(node.mqtt_addr(), V5, "watcher", true, 60);
    subscribe(&mut watcher, "status/#", QoS::AtLeastOnce);
    let dropped = connect_with_will(&node, "dropped", 60);
    wait_parked(&node, 2);
    drop(dropped);
    let will = next_publish(&mut watcher, T).expect("the will of a vanished client");
    assert_eq!(will.topic, "status/dropped");
    assert_eq!(will.payload, &b"offline"[..]);
}

#[test]
fn a_parked_session_is_taken_over() {
    let node = node();
    let (mut first, _) = RawClient::connect(node.mqtt_addr(), V5, "robot-r9", true, 60);
    wait_parked(&node, 1);
    let (_second, ack) = RawClient::connect(node.mqtt_addr(), V5, "robot-r9", false, 60);
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert_eq!(
        disconnect_reason(&mut first, T),
        Some(ReasonCode::SessionTakenOver)
    );
    assert!(first.is_closed(T));
}

#[test]
fn a_parked_publisher_wakes_with_its_topic_aliases() {
    let node = node();
    let (mut sub, _) = RawClient::connect(node.mqtt_addr(), V3, "dashboard", true, 60);
    subscribe(&mut sub, "plant/#", QoS::AtMostOnce);
    let (mut p, ack) = RawClient::connect(node.mqtt_addr(), V5, "plc-1", true, 60);
    assert!(ack.properties.topic_alias_maximum.unwrap_or(0) >= 1);
    let aliased = |topic: &str, payload: &'static [u8], id: u16| {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: Some(id),
            properties: PublishProperties {
                topic_alias: Some(1),
                ..Default::default()
            },
            payload: Bytes::from_static(payload),
        })
    };
    p.send(&aliased("plant/line-1/temp", b"20.5", 1));
    assert!(matches!(p.recv(T), Some(Packet::PubAck(_))));
    assert_eq!(
        next_publish(&mut sub, T).expect("first").payload,
        &b"20.5"[..]
    );
    wait_parked(&node, 2);
    // The alias set before parking still stands after it.
    p.send(&aliased("", b"21.0", 2));
    assert!(matches!(p.recv(T), Some(Packet::PubAck(_))));
    let got = next_publish(&mut sub, T).expect("published through the alias");
    assert_eq!(got.topic, "plant/line-1/temp");
    assert_eq!(got.payload, &b"21.0"[..]);
    assert!(unparked(&node, "readable") >= 1.0);
}

#[test]
fn parked_clients_are_told_at_shutdown_and_the_node_stops_in_time() {
    let mut node = node();
    let mut clients: Vec<RawClient> = (0..20)
        .map(|i| RawClient::connect(node.mqtt_addr(), V5, &format!("idle-{i}"), true, 60).0)
        .collect();
    wait_parked(&node, 20);
    let started = Instant::now();
    assert!(node.terminate(), "the node stops by itself");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "stopping took {:?}",
        started.elapsed()
    );
    for c in &mut clients {
        assert_eq!(
            disconnect_reason(c, T),
            Some(ReasonCode::ServerShuttingDown)
        );
    }
}

/// A node that parks after 300 ms, with a TLS listener too, and the certificates it
/// was given.
struct TlsNode {
    node: Node,
    tls: SocketAddr,
    dir: tempfile::TempDir,
}

impl TlsNode {
    fn start() -> TlsNode {
        let dir = tempfile::tempdir().expect("temp dir");
        make_pki(dir.path());
        let port = free_port();
        let p = |name: &str| dir.path().join(name).display().to_string();
        let node = Node::start_with_config(&format!(
            "tls_addr = \"127.0.0.1:{port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
             [mqtt]\npark_after = \"300ms\"\n",
            p("server.pem"),
            p("server.key")
        ));
        let tls = SocketAddr::from(([127, 0, 0, 1], port));
        TlsNode { node, tls, dir }
    }

    /// A v5 client over TLS, connected with a will on `status/{id}`.
    fn connect(&self, id: &str, keep_alive: u16) -> RawClient {
        let ca = self.dir.path().join("ca.pem");
        connect_with_will_on(RawClient::open_tls(self.tls, V5, &ca), id, keep_alive)
    }
}

#[test]
fn parked_tls_subscribers_receive_publishes_and_keep_alive_with_pings() {
    let tls = TlsNode::start();
    let node = &tls.node;
    let mut sub = tls.connect("tls-sensor", 2);
    subscribe(&mut sub, "fleet/#", QoS::AtLeastOnce);
    wait_parked(node, 1);

    let (mut publisher, _) = RawClient::connect(node.mqtt_addr(), V5, "ops", true, 60);
    for round in 1..=2u16 {
        publish_round(&mut publisher, &mut sub, round);
        // It parks again once idle, with the publisher.
        wait_parked(node, 2);
    }
    assert!(unparked(node, "mailbox") >= 2.0);
    // Two keep-alive limits (3 s each) kept by PINGREQs alone: each wakes the parked
    // TLS connection, which answers and parks again.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(1500));
        sub.send(&Packet::PingReq);
        assert_eq!(sub.recv(T), Some(Packet::PingResp));
    }
    wait_parked(node, 2);
    publisher.send(&publish(
        "fleet/r1/cmd",
        "still there",
        QoS::AtMostOnce,
        false,
        0,
    ));
    let got = next_publish(&mut sub, T).expect("still subscribed after the pings");
    assert_eq!(got.payload, &b"still there"[..]);
}

/// A plain client subscribed to the wills (`status/#`) at QoS 0: it has nothing to
/// acknowledge, so it parks again after each.
fn watch_wills(node: &Node) -> RawClient {
    let (mut watcher, _) = RawClient::connect(node.mqtt_addr(), V5, "watcher", true, 60);
    subscribe(&mut watcher, "status/#", QoS::AtMostOnce);
    watcher
}

#[test]
fn a_silent_parked_tls_client_is_closed_by_keep_alive_and_its_will_published() {
    let tls = TlsNode::start();
    let node = &tls.node;
    let mut watcher = watch_wills(node);
    let mut silent = tls.connect("silent-tls", 1);
    wait_parked(node, 2);
    assert_eq!(
        disconnect_reason(&mut silent, Duration::from_secs(6)),
        Some(ReasonCode::KeepAliveTimeout)
    );
    let will = next_publish(&mut watcher, T).expect("the will");
    assert_eq!(will.topic, "status/silent-tls");
}

#[test]
fn parked_tls_clients_that_send_garbage_are_closed_with_their_wills() {
    let tls = TlsNode::start();
    let node = &tls.node;
    let mut watcher = watch_wills(node);
    let mut not_tls = tls.connect("not-tls", 60);
    let mut not_mqtt = tls.connect("not-mqtt", 60);
    wait_parked(node, 3);

    // Bytes that are no TLS record, straight on the socket.
    not_tls.send_raw_on_socket(b"GET / HTTP/1.1\r\n\r\n");
    let will = next_publish(&mut watcher, T).expect("the will of a client sending garbage");
    assert_eq!(will.topic, "status/not-tls");
    // A well-formed TLS record holding no MQTT packet (type 0 is reserved).
    not_mqtt.send_raw(&[0x00, 0x00]);
    let will = next_publish(&mut watcher, T).expect("the will of a client sending garbage");
    assert_eq!(will.topic, "status/not-mqtt");
    wait_parked(node, 1);

    // The listener goes on serving TLS clients.
    let mut fresh = RawClient::open_tls(tls.tls, V5, &tls.dir.path().join("ca.pem"));
    fresh.send(&Packet::Connect(Box::new(Connect {
        protocol: V5,
        clean_start: true,
        keep_alive: 60,
        client_id: "fresh".into(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    })));
    assert!(matches!(fresh.recv(T), Some(Packet::ConnAck(_))));
}

#[test]
fn a_connection_quiet_since_its_connect_parks_soon_and_a_talking_one_after_park_after() {
    // Default configuration: park_after is 10 s.
    let node = Node::start();
    let (_quiet, _) = RawClient::connect(node.mqtt_addr(), V5, "reconnected", false, 60);
    wait_parked(&node, 1);
    let (mut talking, _) = RawClient::connect(node.mqtt_addr(), V5, "subscriber", true, 60);
    subscribe(&mut talking, "fleet/#", QoS::AtMostOnce);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        metric(&node, "flockmq_connections_parked", ""),
        1.0,
        "a client that has sent a packet since CONNECT waits for mqtt.park_after"
    );
}
