//! A real network partition: three nodes, each in a network namespace of its own, and
//! node 3 cut off from its peers by the kernel (packets dropped both ways) while its
//! clients still reach it. DESIGN.md invariant 6: the cut-off node keeps routing along
//! the routes it knows, refuses control-plane writes within a bounded time with a
//! reason code (a v5 client refused a session is sent to another node: 0x9C with a
//! Server Reference), never diverges, and rejoins cleanly once the network heals.

use std::time::{Duration, Instant};

use broker_node::mqtt::{ConnAck, Packet, ProtocolVersion, QoS, ReasonCode};
use flockmq_tests::mqtt::{next_publish, publish, subscribe};
use flockmq_tests::netns::Network;
use flockmq_tests::{converged, running, Node, RawClient};

const V5: ProtocolVersion = ProtocolVersion::V5;
const T: Duration = Duration::from_secs(10);
/// The nodes' `cluster.write_timeout`: how long a write may wait for a majority.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// The reason code of the PUBACK for `id`, skipping other packets.
fn puback(c: &mut RawClient, id: u16) -> ReasonCode {
    let deadline = Instant::now() + T + WRITE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Some(Packet::PubAck(a)) if a.packet_id == id => return a.reason_code,
            Some(_) => {}
            None => panic!("no PUBACK for packet {id}"),
        }
    }
}

/// A v3.1.1 persistent CONNECT (clean session 0) of `robot-9` to `node`.
fn robot_9_persistent(node: &Node) -> (RawClient, ConnAck) {
    RawClient::connect(
        node.mqtt_addr(),
        ProtocolVersion::V3_1_1,
        "robot-9",
        false,
        60,
    )
}

#[test]
fn a_node_cut_off_by_the_network_refuses_writes_keeps_its_routes_and_rejoins() {
    let net = Network::new(3);
    let public = |id: usize| format!("{}:1883", net.addr(id));
    let references = (1..=3)
        .map(|id| format!("{id}={}", public(id)))
        .collect::<Vec<_>>()
        .join(",");
    let nodes = Node::cluster_in(
        &net,
        3,
        &[
            ("FLOCKMQ_CLUSTER__WRITE_TIMEOUT", "3s"),
            // Off loopback, anonymous clients are refused unless allowed.
            ("FLOCKMQ_MQTT__ALLOW_ANONYMOUS", "true"),
            ("FLOCKMQ_MQTT__SERVER_REFERENCES", &references),
        ],
    );
    let [n1, n2, n3] = [&nodes[0], &nodes[1], &nodes[2]];
    let (mut watch3, _) = RawClient::connect(n3.mqtt_addr(), V5, "watch-3", true, 60);
    subscribe(&mut watch3, "fleet/#", QoS::AtLeastOnce);
    let (mut robot3, _) = RawClient::connect(n3.mqtt_addr(), V5, "robot-3", true, 60);
    let (mut admin1, _) = RawClient::connect(n1.mqtt_addr(), V5, "admin-1", true, 60);
    let before = converged(&running(&nodes));
    // Where node 3 sends the clients it cannot serve: the leader it knew, or (if it
    // led) the first other node.
    let leader = nodes[2].status()["leader"].as_u64().expect("a leader");
    let expected_reference = public(if leader == 3 { 1 } else { leader as usize });

    net.cut(3);

    // Known routes keep working on the cut-off node.
    robot3.send(&publish(
        "fleet/r3/telemetry",
        "42",
        QoS::AtMostOnce,
        false,
        0,
    ));
    let got = next_publish(&mut watch3, T).expect("a local route works while cut off");
    assert_eq!(&got.payload[..], b"42");

    // Control-plane writes there are refused, each within a bounded time.
    let bound = WRITE_TIMEOUT + Duration::from_secs(4);
    let started = Instant::now();
    let (_, ack) = robot_9_persistent(n3);
    assert_eq!(
        ack.reason_code,
        ReasonCode::ServerUnavailable,
        "persistent CONNECT"
    );
    assert!(
        started.elapsed() < bound,
        "refused after {:?}",
        started.elapsed()
    );
    // A v5 client is told where to go instead.
    let started = Instant::now();
    let (_, ack) = RawClient::connect(n3.mqtt_addr(), V5, "robot-10", false, 60);
    assert_eq!(
        (ack.reason_code, ack.properties.server_reference.as_deref()),
        (
            ReasonCode::UseAnotherServer,
            Some(expected_reference.as_str())
        ),
        "v5 CONNECT on the cut-off node"
    );
    assert!(
        started.elapsed() < bound,
        "refused after {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let codes = subscribe(&mut robot3, "fleet/r3/cmd", QoS::AtLeastOnce);
    assert_eq!(codes, vec![ReasonCode::UnspecifiedError], "SUBSCRIBE");
    assert!(
        started.elapsed() < bound,
        "refused after {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    robot3.send(&publish("site/name", "south", QoS::AtLeastOnce, true, 7));
    assert_eq!(
        puback(&mut robot3, 7),
        ReasonCode::UnspecifiedError,
        "retained set"
    );
    assert!(
        started.elapsed() < bound,
        "refused after {:?}",
        started.elapsed()
    );

    // The majority carries on (electing a new leader if node 3 led), writes included.
    admin1.send(&publish("site/name", "north", QoS::AtLeastOnce, true, 1));
    assert_eq!(puback(&mut admin1, 1), ReasonCode::NoMatchingSubscribers);
    let during = converged(&[n1, n2]);
    assert_ne!(during, before, "the majority's state moved on");

    net.heal(3);

    // Node 3 rejoins: the same state at the same index everywhere, with nothing of
    // its refused writes in it, and it takes writes again.
    converged(&running(&nodes));
    // The refused SUBSCRIBE was not applied later either.
    let subscriptions = n1
        .api("GET", "/subscriptions", None)
        .expect("subscriptions");
    assert!(
        !subscriptions.to_string().contains("fleet/r3/cmd"),
        "a refused SUBSCRIBE took effect: {subscriptions}"
    );
    // Should the refused CONNECT's command have reached the leader after all, node 3
    // ends the session it made.
    let deadline = Instant::now() + T;
    while n1.api("GET", "/sessions/robot-9", None).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the refused CONNECT left a session"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (mut reader, _) = RawClient::connect(n3.mqtt_addr(), V5, "reader-3", true, 60);
    subscribe(&mut reader, "site/name", QoS::AtLeastOnce);
    let retained = next_publish(&mut reader, T).expect("the retained message set during the cut");
    assert_eq!(&retained.payload[..], b"north");
    let (_, ack) = robot_9_persistent(n3);
    assert_eq!(
        ack.reason_code,
        ReasonCode::Success,
        "persistent CONNECT after the heal"
    );
    assert!(!ack.session_present, "the refused CONNECT made no session");
    converged(&running(&nodes));
}
