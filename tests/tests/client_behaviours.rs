//! What a client notices, against real nodes: a session resumed with Clean Start 0
//! keeps its queue whatever expiry the new CONNECT asks for; a SUBSCRIBE is in effect
//! on its node as soon as it arrives (and withdrawn if its commit is refused); a v5
//! client that allows topic aliases gets them; an ACL deny inside a wildcard grant
//! withholds only its own topics, as Mosquitto does. Each on one node and, where the
//! cluster is involved, across nodes; with the bare packet-level client where the
//! exact packets matter and with real clients (rumqttc v5, mosquitto_sub).

use std::time::Duration;

use broker_node::mqtt::{
    Connect, ConnectProperties, Disconnect, Packet, ProtocolVersion, PubRel, Publish,
    PublishProperties, QoS, ReasonCode, Subscribe, SubscribeProperties,
};
use bytes::Bytes;
use flockmq_tests::mqtt::{next_publish, opts, publish, receive_acked, subscribe};
use flockmq_tests::{converged, run, Background, Node, RawClient};
use rumqttc::v5::mqttbytes::v5::Packet as P5;
use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;
const T: Duration = Duration::from_secs(10);

fn connect_v5(
    node: &Node,
    client_id: &str,
    clean_start: bool,
    expiry: Option<u32>,
    alias_max: Option<u16>,
) -> (RawClient, broker_node::mqtt::ConnAck) {
    RawClient::connect_with(
        node.mqtt_addr(),
        Connect {
            protocol: V5,
            clean_start,
            keep_alive: 60,
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: expiry,
                topic_alias_maximum: alias_max,
                ..Default::default()
            },
        },
    )
}

/// Publish at QoS 1 or 2 and finish the flow.
fn publish_acked(c: &mut RawClient, packet: Packet) {
    let qos = match &packet {
        Packet::Publish(p) => p.qos,
        _ => unreachable!("a PUBLISH"),
    };
    c.send(&packet);
    loop {
        match c.recv(T) {
            Some(Packet::PubAck(_)) if qos == QoS::AtLeastOnce => return,
            Some(Packet::PubRec(r)) if qos == QoS::ExactlyOnce => c.send(&Packet::PubRel(
                PubRel::new(r.packet_id, ReasonCode::Success),
            )),
            Some(Packet::PubComp(_)) if qos == QoS::ExactlyOnce => return,
            Some(_) => {}
            None => panic!("no acknowledgement"),
        }
    }
}

/// Receive `n` messages, acknowledging them as a client does; their topics and payloads.
fn receive(c: &mut RawClient, n: usize) -> Vec<(String, String)> {
    receive_acked(c, n, T)
        .into_iter()
        .map(|p| (p.topic, String::from_utf8_lossy(&p.payload).into_owned()))
        .collect()
}

/// Poll a rumqttc v5 event loop until its SUBACK.
async fn until_suback5(events: &mut rumqttc::v5::EventLoop) {
    tokio::time::timeout(T, async {
        loop {
            if let Event5::Incoming(P5::SubAck(_)) = events.poll().await.expect("poll") {
                return;
            }
        }
    })
    .await
    .expect("SUBACK");
}

/// Client `a` leaves a persistent session subscribed to `t/#` at QoS 2 on `first`;
/// messages are queued for it through `publisher_node`; it comes back on `second` with
/// Clean Start 0 and no Session Expiry Interval (0 from now on) and must get them.
fn resume_without_expiry_gets_the_queue(first: &Node, publisher_node: &Node, second: &Node) {
    let (mut a, _) = connect_v5(first, "resumer", true, Some(99_999), None);
    assert_eq!(
        subscribe(&mut a, "t/#", QoS::ExactlyOnce),
        vec![ReasonCode::GrantedQoS2]
    );
    a.send(&Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::Success,
        properties: Default::default(),
    }));
    assert!(a.is_closed(T));

    let (mut p, _) = RawClient::connect(publisher_node.mqtt_addr(), V3, "resume-pub", true, 60);
    publish_acked(&mut p, publish("t/1", "one", QoS::AtLeastOnce, false, 1));
    publish_acked(&mut p, publish("t/2", "two", QoS::ExactlyOnce, false, 2));
    // A message that expires, as in the report (6 s there): still delivered.
    publish_acked(
        &mut p,
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "t/3".into(),
            packet_id: Some(3),
            properties: PublishProperties {
                message_expiry_interval: Some(60),
                ..Default::default()
            },
            payload: Bytes::from_static(b"three"),
        }),
    );

    let (mut a, ack) = connect_v5(second, "resumer", false, None, None);
    assert!(ack.session_present, "the session is resumed");
    let mut got = receive(&mut a, 3);
    got.sort();
    assert_eq!(
        got,
        vec![
            ("t/1".to_owned(), "one".to_owned()),
            ("t/2".to_owned(), "two".to_owned()),
            ("t/3".to_owned(), "three".to_owned()),
        ]
    );
    // Expiry 0 from now on: the session ends with this connection.
    a.send(&Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::Success,
        properties: Default::default(),
    }));
    assert!(a.is_closed(T));
    let (_a, ack) = connect_v5(second, "resumer", false, None, None);
    assert!(
        !ack.session_present,
        "expiry 0 ended the session at the disconnect"
    );
}

#[test]
fn mqtt_3_1_2_4_a_session_resumed_without_expiry_gets_its_queued_messages() {
    let node = Node::start();
    resume_without_expiry_gets_the_queue(&node, &node, &node);
}

#[test]
fn a_session_resumed_without_expiry_on_another_node_gets_its_queued_messages() {
    let nodes = Node::cluster(3);
    resume_without_expiry_gets_the_queue(&nodes[0], &nodes[1], &nodes[2]);
}

#[tokio::test]
async fn a_real_v5_client_resuming_without_expiry_gets_its_queue() {
    let node = Node::start();
    let options = |clean: bool, expiry: Option<u32>| {
        let mut o = Options5::new("rumqttc-resumer", "127.0.0.1", node.mqtt_port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_start(clean);
        o.set_session_expiry_interval(expiry);
        o
    };
    let (client, mut events) = Client5::new(options(true, Some(99_999)), 10);
    client
        .subscribe("t/#", rumqttc::v5::mqttbytes::QoS::ExactlyOnce)
        .await
        .expect("subscribe");
    until_suback5(&mut events).await;
    client.disconnect().await.expect("disconnect");
    while events.poll().await.is_ok() {}

    let addr = node.mqtt_addr();
    tokio::task::spawn_blocking(move || {
        let (mut p, _) = RawClient::connect(addr, V3, "rumqttc-pub", true, 60);
        publish_acked(&mut p, publish("t/a", "1", QoS::AtLeastOnce, false, 1));
        publish_acked(&mut p, publish("t/b", "2", QoS::ExactlyOnce, false, 2));
    })
    .await
    .expect("publisher");

    let (_client, mut events) = Client5::new(options(false, None), 10);
    let mut got = Vec::new();
    tokio::time::timeout(T, async {
        while got.len() < 2 {
            if let Event5::Incoming(P5::Publish(p)) = events.poll().await.expect("poll") {
                got.push(String::from_utf8_lossy(&p.topic).into_owned());
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("queued messages not delivered: {got:?}"));
    got.sort();
    assert_eq!(got, vec!["t/a", "t/b"]);
}

/// `b` sends SUBSCRIBE and then PINGREQ; the PINGRESP says the SUBSCRIBE was handled.
fn subscribe_without_waiting(b: &mut RawClient, filter: &str) {
    b.send(&Packet::Subscribe(Subscribe {
        packet_id: 7,
        filters: vec![(filter.into(), opts(QoS::AtMostOnce))],
        properties: SubscribeProperties::default(),
    }));
    b.send(&Packet::PingReq);
    loop {
        match b.recv(T) {
            Some(Packet::PingResp) => return,
            Some(Packet::SubAck(_)) => {}
            other => panic!("PINGRESP expected, got {other:?}"),
        }
    }
}

#[test]
fn a_subscription_is_in_effect_on_its_node_before_the_commit_and_withdrawn_when_refused() {
    // Three nodes; once two are gone, node 1 can commit nothing: the SUBSCRIBE it
    // receives waits for a commit that never comes, and is refused after the write
    // timeout. Until then it is in effect on node 1 (invariant 9).
    let mut nodes = Node::cluster_with_env(3, &[("FLOCKMQ_CLUSTER__WRITE_TIMEOUT", "4s")]);
    let (mut a, _) = RawClient::connect(nodes[0].mqtt_addr(), V5, "pub-a", true, 60);
    let (mut b, _) = RawClient::connect(nodes[0].mqtt_addr(), V5, "sub-b", true, 60);
    nodes[1].kill();
    nodes[2].kill();

    subscribe_without_waiting(&mut b, "req/+");
    // Before its SUBACK, b gets what a publishes through the same node.
    a.send(&publish(
        "req/1",
        "before the commit",
        QoS::AtMostOnce,
        false,
        0,
    ));
    let mut suback = None;
    let message = loop {
        match b.recv(T) {
            Some(Packet::Publish(p)) => break p,
            Some(Packet::SubAck(s)) => suback = Some(s),
            other => panic!("the message before the SUBACK expected, got {other:?}"),
        }
    };
    assert_eq!(message.topic, "req/1");
    assert!(suback.is_none(), "no commit is possible, so no SUBACK yet");

    // The commit is refused: the SUBACK says so and the subscription is withdrawn.
    let suback = loop {
        match b.recv(T) {
            Some(Packet::SubAck(s)) => break s,
            Some(Packet::Publish(_)) => {}
            other => panic!("SUBACK expected, got {other:?}"),
        }
    };
    assert!(suback.reason_codes[0].is_error(), "{suback:?}");
    a.send(&publish(
        "req/2",
        "after the refusal",
        QoS::AtMostOnce,
        false,
        0,
    ));
    a.send(&Packet::PingReq);
    assert_eq!(a.recv(T), Some(Packet::PingResp));
    match b.recv(Duration::from_millis(500)) {
        None => {}
        other => panic!("a withdrawn subscription got {other:?}"),
    }
}

#[test]
fn a_publish_right_behind_a_subscribe_on_one_node_reaches_it() {
    // On a healthy cluster too: b subscribes through node 1 and, without waiting for
    // its SUBACK, a publishes through node 1.
    let nodes = Node::cluster(3);
    let (mut a, _) = RawClient::connect(nodes[0].mqtt_addr(), V5, "rr-a", true, 60);
    let (mut b, _) = RawClient::connect(nodes[0].mqtt_addr(), V5, "rr-b", true, 60);
    for i in 0..20 {
        let topic = format!("reply/{i}");
        subscribe_without_waiting(&mut b, &topic);
        publish_acked(
            &mut a,
            publish(&topic, "answer", QoS::AtLeastOnce, false, 1),
        );
        let p = next_publish(&mut b, T).expect("the reply");
        assert_eq!(p.topic, topic);
    }
}

/// Publish `n` telemetry messages on two long topics through `publisher_node`; what the
/// subscriber on `subscriber_node` (allowing `alias_max` aliases) receives, with the
/// bytes it read.
fn telemetry_through(
    publisher_node: &Node,
    subscriber_node: &Node,
    alias_max: Option<u16>,
    n: usize,
    cluster: &[&Node],
) -> (Vec<Publish>, u64) {
    let id = format!("dash-{}", alias_max.unwrap_or(0));
    let (mut s, _) = connect_v5(subscriber_node, &id, true, None, alias_max);
    assert_eq!(
        subscribe(&mut s, "fleet/+/robot/+/telemetry/#", QoS::AtMostOnce),
        vec![ReasonCode::GrantedQoS0]
    );
    if cluster.len() > 1 {
        converged(cluster);
    }
    let before = s.bytes_received();
    let (mut p, _) = RawClient::connect(publisher_node.mqtt_addr(), V5, "robot-r7", true, 60);
    for i in 0..n {
        let topic = if i % 2 == 0 {
            "fleet/1/robot/r7/telemetry/position"
        } else {
            "fleet/1/robot/r7/telemetry/battery"
        };
        p.send(&publish(
            topic,
            &format!("{i:04}"),
            QoS::AtMostOnce,
            false,
            0,
        ));
    }
    let got: Vec<Publish> = (0..n)
        .map(|_| next_publish(&mut s, T).expect("telemetry"))
        .collect();
    (got, s.bytes_received() - before)
}

/// The topics as the client resolves them, checking each alias use is legal.
fn resolve_aliases(got: &[Publish], alias_max: u16) -> Vec<String> {
    let mut table = std::collections::HashMap::new();
    got.iter()
        .map(|p| match p.properties.topic_alias {
            Some(alias) => {
                assert!(
                    alias >= 1 && alias <= alias_max,
                    "alias {alias} out of range"
                );
                if !p.topic.is_empty() {
                    table.insert(alias, p.topic.clone());
                }
                table
                    .get(&alias)
                    .cloned()
                    .expect("alias defined before use")
            }
            None => p.topic.clone(),
        })
        .collect()
}

fn expected_topics(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                "fleet/1/robot/r7/telemetry/position".to_owned()
            } else {
                "fleet/1/robot/r7/telemetry/battery".to_owned()
            }
        })
        .collect()
}

#[test]
fn mqtt_3_3_2_3_4_a_client_that_allows_topic_aliases_gets_them() {
    let node = Node::start();
    let n = 200;
    let (plain, plain_bytes) = telemetry_through(&node, &node, None, n, &[]);
    assert!(plain.iter().all(|p| p.properties.topic_alias.is_none()));
    let (aliased, aliased_bytes) = telemetry_through(&node, &node, Some(10), n, &[]);
    assert_eq!(resolve_aliases(&aliased, 10), expected_topics(n));
    // Two topics: each defined once, then sent as two bytes.
    let alone = aliased.iter().filter(|p| p.topic.is_empty()).count();
    assert_eq!(alone, n - 2);
    // 35-byte topics: the stream shrinks by more than half.
    eprintln!("telemetry, {n} messages: {plain_bytes} bytes without aliases, {aliased_bytes} with");
    assert!(
        aliased_bytes * 2 < plain_bytes,
        "{aliased_bytes} bytes with aliases against {plain_bytes} without"
    );
}

#[test]
fn forwarded_messages_reach_a_client_on_another_node_with_topic_aliases() {
    let nodes = Node::cluster(3);
    let all: Vec<&Node> = nodes.iter().collect();
    let n = 50;
    let (got, _) = telemetry_through(&nodes[0], &nodes[1], Some(10), n, &all);
    assert_eq!(resolve_aliases(&got, 10), expected_topics(n));
    assert_eq!(got.iter().filter(|p| p.topic.is_empty()).count(), n - 2);
    // One alias for two alternating topics: redefined at every change, still right.
    let (got, _) = telemetry_through(&nodes[2], &nodes[1], Some(1), n, &all);
    assert_eq!(resolve_aliases(&got, 1), expected_topics(n));
    assert!(got.iter().all(|p| p.properties.topic_alias == Some(1)));
}

#[tokio::test]
async fn a_real_v5_client_resolves_the_aliases_it_is_given() {
    let node = Node::start();
    let mut o = Options5::new("rumqttc-dash", "127.0.0.1", node.mqtt_port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_topic_alias_max(Some(4));
    let (client, mut events) = Client5::new(o, 100);
    client
        .subscribe("fleet/#", rumqttc::v5::mqttbytes::QoS::AtMostOnce)
        .await
        .expect("subscribe");
    until_suback5(&mut events).await;
    let addr = node.mqtt_addr();
    let n = 30;
    tokio::task::spawn_blocking(move || {
        let (mut p, _) = RawClient::connect(addr, V5, "alias-pub", true, 60);
        for i in 0..n {
            let topic = format!("fleet/1/robot/r{}/telemetry/position", i % 6);
            p.send(&publish(&topic, &i.to_string(), QoS::AtMostOnce, false, 0));
        }
        p.send(&Packet::PingReq);
        assert_eq!(p.recv(T), Some(Packet::PingResp));
    })
    .await
    .expect("publisher");
    let mut got = Vec::new();
    tokio::time::timeout(T, async {
        while got.len() < n {
            if let Event5::Incoming(P5::Publish(p)) = events.poll().await.expect("poll") {
                got.push((
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                ));
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} messages: {got:?}", got.len()));
    for (i, (topic, payload)) in got.iter().enumerate() {
        assert_eq!(payload, &i.to_string());
        assert_eq!(
            topic,
            &format!("fleet/1/robot/r{}/telemetry/position", i % 6)
        );
    }
}

#[test]
fn a_deny_inside_a_wildcard_grant_withholds_only_its_topics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic deny secret/x\ntopic readwrite #\n").expect("acl");
    let node = Node::start_with_config(&format!("[mqtt]\nacl_file = \"{}\"\n", acl.display()));

    // The packet-level view: `#` and `secret/+` are granted, `secret/x` refused.
    let (mut dash, _) = RawClient::connect(node.mqtt_addr(), V5, "dash", true, 60);
    assert_eq!(
        subscribe(&mut dash, "#", QoS::AtLeastOnce),
        vec![ReasonCode::GrantedQoS1]
    );
    let (mut part, _) = RawClient::connect(node.mqtt_addr(), V5, "part", true, 60);
    assert_eq!(
        subscribe(&mut part, "secret/+", QoS::AtLeastOnce),
        vec![ReasonCode::GrantedQoS1]
    );
    let (mut exact, _) = RawClient::connect(node.mqtt_addr(), V3, "exact", true, 60);
    assert_eq!(
        subscribe(&mut exact, "secret/x", QoS::AtLeastOnce),
        vec![ReasonCode::UnspecifiedError],
        "v3 failure 0x80"
    );

    // A real client too: mosquitto_sub on `#` gets every message but secret/x's.
    let port = node.mqtt_port.to_string();
    let sub = Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &port,
            "-t",
            "#",
            "-v",
            "-C",
            "2",
            "-W",
            "15",
            "-i",
            "mosq-dash",
        ],
    );
    // Its subscription is in place once the node lists it.
    node.wait_subscribed("mosq-dash", "#");
    for (topic, payload) in [
        ("secret/x", "hidden"),
        ("secret/y", "shown"),
        ("public/z", "shown"),
    ] {
        let r = run(
            "mosquitto_pub",
            &["-p", &port, "-t", topic, "-m", payload, "-q", "1"],
            T,
        );
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    let out = sub.finish(Duration::from_secs(15));
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["secret/y shown", "public/z shown"],
        "{out:?}"
    );

    // The packet-level subscribers agree.
    let mut dash_got: Vec<String> = Vec::new();
    while let Some(p) = next_publish(&mut dash, Duration::from_millis(1000)) {
        dash_got.push(p.topic);
    }
    assert!(dash_got.contains(&"secret/y".to_owned()) && dash_got.contains(&"public/z".to_owned()));
    assert!(!dash_got.contains(&"secret/x".to_owned()), "{dash_got:?}");
    let part_got = next_publish(&mut part, T).expect("secret/y");
    assert_eq!(part_got.topic, "secret/y");
    assert!(next_publish(&mut part, Duration::from_millis(500)).is_none());
}

#[test]
fn a_message_every_queue_refused_is_answered_0x97_quota_exceeded() {
    // One persistent subscriber, offline, whose queue holds one message and refuses
    // newer ones: the second publish reached nobody, and a v5 publisher is told so.
    let node = Node::start_with_config(
        "[mqtt]\nmax_queued_messages = 1\nqueue_full_policy = \"drop_newest\"\n",
    );
    let (mut s, _) = connect_v5(&node, "full-sub", true, Some(600), None);
    assert_eq!(
        subscribe(&mut s, "q/#", QoS::AtLeastOnce),
        vec![ReasonCode::GrantedQoS1]
    );
    s.send(&Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::Success,
        properties: Default::default(),
    }));
    assert!(s.is_closed(T));
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V5, "full-pub", true, 60);
    let mut puback = |id: u16| {
        p.send(&publish("q/1", "m", QoS::AtLeastOnce, false, id));
        match p.recv(T) {
            Some(Packet::PubAck(a)) => a.reason_code,
            other => panic!("PUBACK expected, got {other:?}"),
        }
    };
    assert_eq!(puback(1), ReasonCode::Success);
    assert_eq!(puback(2), ReasonCode::QuotaExceeded);
}

#[test]
fn a_qos2_identifier_refused_with_0x97_can_be_used_again_at_once() {
    // A PUBREC with an error ends the QoS 2 flow [MQTT-4.3.3]: the client may reuse
    // the identifier for its next message, which must then be taken as new, not as a
    // resend of the refused one (here by a persistent publisher, whose identifiers
    // are also recorded in the replicated session).
    let node = Node::start_with_config(
        "[mqtt]\nmax_queued_messages = 1\nqueue_full_policy = \"drop_newest\"\n",
    );
    let (mut s, _) = connect_v5(&node, "full-sub-2", true, Some(600), None);
    assert_eq!(
        subscribe(&mut s, "q/#", QoS::ExactlyOnce),
        vec![ReasonCode::GrantedQoS2]
    );
    s.send(&Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::Success,
        properties: Default::default(),
    }));
    assert!(s.is_closed(T));
    let (mut p, _) = connect_v5(&node, "qos2-pub", true, Some(600), None);
    let mut pubrec = |payload: &str, id: u16| {
        p.send(&publish("q/1", payload, QoS::ExactlyOnce, false, id));
        let code = match p.recv(T) {
            Some(Packet::PubRec(r)) => r.reason_code,
            other => panic!("PUBREC expected, got {other:?}"),
        };
        if !code.is_error() {
            p.send(&Packet::PubRel(PubRel::new(id, ReasonCode::Success)));
            assert!(matches!(p.recv(T), Some(Packet::PubComp(_))));
        }
        code
    };
    assert_eq!(pubrec("first", 1), ReasonCode::Success);
    assert_eq!(pubrec("refused", 2), ReasonCode::QuotaExceeded);
    // The subscriber drains its queue, leaving room.
    let (mut s, ack) = connect_v5(&node, "full-sub-2", false, Some(600), None);
    assert!(ack.session_present);
    assert_eq!(
        receive(&mut s, 1),
        vec![("q/1".to_owned(), "first".to_owned())]
    );
    s.send(&Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::Success,
        properties: Default::default(),
    }));
    assert!(s.is_closed(T));
    // Identifier 2 again, for a new message: queued, and delivered.
    assert_eq!(pubrec("again", 2), ReasonCode::Success);
    let (mut s, _) = connect_v5(&node, "full-sub-2", false, Some(600), None);
    assert_eq!(
        receive(&mut s, 1),
        vec![("q/1".to_owned(), "again".to_owned())]
    );
}

#[test]
fn messages_queued_for_an_offline_shared_member_go_to_a_connected_one_after_shared_redistribute_after(
) {
    // Worker a is a persistent member of the group and offline; worker b is connected.
    // Round robin queues about half of the jobs for a; once a has been away for
    // `shared_redistribute_after`, b gets them too, and a's queue is empty.
    let node = Node::start_with_config(
        "[mqtt]\nshared_redistribute_after = \"4s\"\nshared_subscription_strategy = \"round_robin\"\n",
    );
    let (mut a, _) = connect_v5(&node, "worker-a", true, Some(600), None);
    assert_eq!(
        subscribe(&mut a, "$share/w/jobs/#", QoS::AtLeastOnce),
        vec![ReasonCode::GrantedQoS1]
    );
    a.send(&Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::Success,
        properties: Default::default(),
    }));
    assert!(a.is_closed(T));
    let (mut b, _) = connect_v5(&node, "worker-b", true, Some(600), None);
    assert_eq!(
        subscribe(&mut b, "$share/w/jobs/#", QoS::AtLeastOnce),
        vec![ReasonCode::GrantedQoS1]
    );
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V5, "dispatcher", true, 60);
    for i in 1..=10u16 {
        publish_acked(
            &mut p,
            publish(
                &format!("jobs/{i}"),
                &i.to_string(),
                QoS::AtLeastOnce,
                false,
                i,
            ),
        );
    }
    let queued_for_a = |node: &Node| {
        node.api("GET", "/sessions/worker-a", None)
            .expect("session")["mqueue_len"]
            .as_u64()
            .expect("mqueue_len")
    };
    assert!(
        queued_for_a(&node) > 0,
        "round robin queued some for worker a"
    );
    let mut got: Vec<String> = receive_acked(&mut b, 10, Duration::from_secs(30))
        .into_iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    got.sort_by_key(|n| n.parse::<u32>().unwrap_or(0));
    let all: Vec<String> = (1..=10).map(|i: u32| i.to_string()).collect();
    assert_eq!(got, all, "worker b did every job");
    assert_eq!(queued_for_a(&node), 0);
}

/// Publish `packet` (QoS 1) and return its PUBACK's reason code.
fn puback_code(c: &mut RawClient, packet: Packet) -> ReasonCode {
    c.send(&packet);
    loop {
        match c.recv(T) {
            Some(Packet::PubAck(a)) => return a.reason_code,
            Some(_) => {}
            None => panic!("no PUBACK"),
        }
    }
}

#[test]
fn the_caps_on_sessions_retained_messages_and_queued_bytes_answer_quota_exceeded_and_are_counted() {
    let node = Node::start_with_config(
        "[mqtt]\nmax_sessions = 3\nmax_retained_messages = 2\nmax_node_queued_bytes = 1024\n",
    );
    // Sessions: three fit; a fourth client is refused, in each protocol's words; a
    // client whose session exists comes back.
    let (mut a, ack) = connect_v5(&node, "a", true, None, None);
    assert_eq!(ack.reason_code, ReasonCode::Success);
    let (mut b, _) = connect_v5(&node, "b", true, Some(3600), None);
    subscribe(&mut b, "q/#", QoS::AtLeastOnce);
    drop(b);
    node.wait_connected("b", false);
    let (_c, ack) = connect_v5(&node, "c", true, None, None);
    assert_eq!(ack.reason_code, ReasonCode::Success);
    let (_, ack) = connect_v5(&node, "d", true, None, None);
    assert_eq!(ack.reason_code, ReasonCode::QuotaExceeded);
    let (_, ack) = RawClient::connect(node.mqtt_addr(), V3, "e", true, 60);
    assert_eq!(
        ack.reason_code,
        ReasonCode::ServerUnavailable,
        "3.1.1 return code 3"
    );

    // Retained messages: two topics fit; a third is refused, the first replaced.
    let retained =
        |topic: &str, payload: &str, id: u16| publish(topic, payload, QoS::AtLeastOnce, true, id);
    assert!(!puback_code(&mut a, retained("r/1", "1", 1)).is_error());
    assert!(!puback_code(&mut a, retained("r/2", "2", 2)).is_error());
    assert_eq!(
        puback_code(&mut a, retained("r/3", "3", 3)),
        ReasonCode::QuotaExceeded
    );
    assert!(!puback_code(&mut a, retained("r/1", "1b", 4)).is_error());

    // Queued bytes: 300-byte messages for b, offline, until the node's queues hold
    // 1 KiB; the next reaches nobody and is refused.
    let big = "x".repeat(300);
    for id in 10..14 {
        let code = puback_code(&mut a, publish("q/x", &big, QoS::AtLeastOnce, false, id));
        assert_eq!(code, ReasonCode::Success, "message {id}");
    }
    assert_eq!(
        puback_code(&mut a, publish("q/x", &big, QoS::AtLeastOnce, false, 14)),
        ReasonCode::QuotaExceeded
    );
    // b's session exists: it comes back, past the session cap, and gets the four.
    let (mut b, ack) = connect_v5(&node, "b", false, Some(3600), None);
    assert!(ack.session_present);
    assert_eq!(receive(&mut b, 4).len(), 4);
    assert!(next_publish(&mut b, Duration::from_millis(500)).is_none());

    let metrics = node.metrics();
    for (limit, at_least) in [("sessions", 2), ("retained", 1), ("node_queued_bytes", 1)] {
        let line = format!("flockmq_quota_refusals_total{{limit=\"{limit}\"}}");
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{line} not exported"));
        assert!(value >= at_least as f64, "{line} {value}");
    }
}
