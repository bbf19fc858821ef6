//! Parked connections (`mqtt.park_after`): an idle plain-TCP connection gives up its
//! task and waits in the node's parking lot. Clients must not be able to tell: every
//! test here lets connections park, checks that they did (`flockmq_connections_parked`),
//! then drives them the ways a connection can be woken.

use std::time::{Duration, Instant};

use broker_node::mqtt::{
    Connect, ConnectProperties, LastWill, Packet, ProtocolVersion, PubAck, Publish,
    PublishProperties, QoS, ReasonCode, WillProperties,
};
use bytes::Bytes;
use flockmq_tests::mqtt::{disconnect_reason, next_publish, publish, subscribe};
use flockmq_tests::{Node, RawClient};

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
    let mut c = RawClient::open(node.mqtt_addr(), V5);
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
        publisher.send(&publish(
            "fleet/r1/cmd",
            &format!("go {round}"),
            QoS::AtLeastOnce,
            false,
            round,
        ));
        assert!(matches!(publisher.recv(T), Some(Packet::PubAck(_))));
        let got = next_publish(&mut v5, T).expect("the parked v5 subscriber gets it");
        assert_eq!(got.payload, format!("go {round}").as_bytes());
        assert_eq!(got.qos, QoS::AtLeastOnce);
        v5.send(&Packet::PubAck(PubAck::new(
            got.packet_id.expect("QoS 1 has an id"),
            ReasonCode::Success,
        )));
        let got = next_publish(&mut v3, T).expect("the parked v3 subscriber gets it");
        assert_eq!(got.payload, format!("go {round}").as_bytes());
        // Both park again once idle (the publisher too).
        wait_parked(&node, 3);
    }
    assert!(
        metric(
            &node,
            "flockmq_connections_unparked_total",
            "why=\"mailbox\""
        ) >= 2.0
    );
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
    assert!(
        metric(
            &node,
            "flockmq_connections_unparked_total",
            "why=\"keep_alive\""
        ) >= 1.0
    );
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
    assert!(
        metric(
            &node,
            "flockmq_connections_unparked_total",
            "why=\"readable\""
        ) >= 1.0
    );
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
