//! Normative statements of MQTT 3.1.1 and 5.0, each pinned against a real
//! `broker-node` process through a bare client that sees every packet.

use std::time::{Duration, Instant};

use broker_node::mqtt::{
    Connect, ConnectProperties, Disconnect, LastWill, Packet, ProtocolVersion, PubAck, PubRel,
    Publish, PublishProperties, QoS, ReasonCode, RetainHandling, Subscribe, SubscribeProperties,
    SubscriptionOptions, Unsubscribe, WillProperties,
};
use bytes::Bytes;
use flockmq_tests::mqtt::{
    disconnect_reason, next_publish, opts, publish, subscribe, subscribe_with,
};
use flockmq_tests::{wait_until, Node, RawClient};

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;
const T: Duration = Duration::from_secs(5);

#[test]
fn mqtt_3_1_4_3_a_second_connection_takes_the_session_over_with_0x8e() {
    let node = Node::start();
    let (mut first, _) = RawClient::connect(node.mqtt_addr(), V5, "robot-r7", true, 60);
    let (_second, ack) = RawClient::connect(node.mqtt_addr(), V5, "robot-r7", false, 60);
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert_eq!(
        disconnect_reason(&mut first, T),
        Some(ReasonCode::SessionTakenOver)
    );
    assert!(first.is_closed(T), "the old connection is closed");
}

#[test]
fn mqtt_3_1_2_24_keep_alive_closes_after_one_and_a_half_intervals() {
    let node = Node::start();
    let started = Instant::now();
    let (mut c, _) = RawClient::connect(node.mqtt_addr(), V5, "sleepy", true, 1);
    assert_eq!(
        disconnect_reason(&mut c, Duration::from_secs(4)),
        Some(ReasonCode::KeepAliveTimeout)
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed too early: {waited:?}"
    );
    assert!(c.is_closed(T));
}

#[test]
fn mqtt_3_1_2_23_pingreq_keeps_the_connection_alive() {
    let node = Node::start();
    let (mut c, _) = RawClient::connect(node.mqtt_addr(), V3, "pinger", true, 1);
    for _ in 0..4 {
        // Pacing the PINGREQs inside the 1 s keep-alive: the rule under test.
        std::thread::sleep(Duration::from_millis(700));
        c.send(&Packet::PingReq);
        assert_eq!(c.recv(T), Some(Packet::PingResp));
    }
}

#[test]
fn a_socket_that_sends_no_connect_is_closed_after_the_connect_timeout() {
    let node = Node::start_with_config("[mqtt]\nconnect_timeout = \"1s\"\n");
    let mut c = RawClient::open(node.mqtt_addr(), V3);
    let started = Instant::now();
    assert!(c.is_closed(Duration::from_secs(5)));
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn mqtt_3_1_3_8_empty_client_id_without_clean_session_is_refused_in_v311() {
    let node = Node::start();
    let (_c, ack) = RawClient::connect(node.mqtt_addr(), V3, "", false, 60);
    assert_eq!(
        ack.reason_code,
        ReasonCode::ClientIdentifierNotValid,
        "return code 2"
    );
    let (_c, ack) = RawClient::connect(node.mqtt_addr(), V3, "", true, 60);
    assert_eq!(
        ack.reason_code,
        ReasonCode::Success,
        "clean session gets an id"
    );
}

#[test]
fn mqtt_3_2_2_assigned_client_identifier_for_an_empty_v5_id() {
    let node = Node::start();
    let (_c, ack) = RawClient::connect(node.mqtt_addr(), V5, "", false, 60);
    assert_eq!(ack.reason_code, ReasonCode::Success);
    let id = ack
        .properties
        .assigned_client_identifier
        .clone()
        .expect("assigned id");
    assert!(!id.is_empty());
    // The broker advertises what it supports.
    let p = ack.properties;
    assert!(
        p.receive_maximum.is_some()
            && p.maximum_packet_size.is_some()
            && p.topic_alias_maximum.is_some()
    );
    assert_eq!(p.retain_available, Some(true));
    assert_eq!(p.shared_subscription_available, Some(true));
}

#[test]
fn mqtt_3_1_2_2_unsupported_protocol_level_gets_return_code_1() {
    let node = Node::start();
    let mut c = RawClient::open(node.mqtt_addr(), V3);
    c.send_raw(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 9, 0x02, 0, 60, 0, 1, b'a',
    ]);
    match c.recv(T) {
        Some(Packet::ConnAck(a)) => {
            assert_eq!(a.reason_code, ReasonCode::UnsupportedProtocolVersion)
        }
        other => panic!("expected CONNACK 1, got {other:?}"),
    }
    assert!(c.is_closed(T));
}

#[test]
fn mqtt_4_13_malformed_packet_gets_disconnect_0x81_and_the_broker_survives() {
    let node = Node::start();
    let (mut c, _) = RawClient::connect(node.mqtt_addr(), V5, "bad", true, 60);
    // PUBLISH with QoS 3.
    c.send_raw(&[0x36, 5, 0, 1, b't', 0, 1]);
    assert_eq!(
        disconnect_reason(&mut c, T),
        Some(ReasonCode::MalformedPacket)
    );
    assert!(c.is_closed(T));
    // Garbage before CONNECT closes that socket only.
    let mut g = RawClient::open(node.mqtt_addr(), V3);
    g.send_raw(&[0xFF; 64]);
    assert!(g.is_closed(T));
    let (_ok, ack) = RawClient::connect(node.mqtt_addr(), V5, "good", true, 60);
    assert_eq!(ack.reason_code, ReasonCode::Success);
}

#[test]
fn mqtt_3_2_2_15_packet_larger_than_the_maximum_gets_0x95() {
    let node = Node::start_with_config("[mqtt]\nmax_packet_size = \"1KiB\"\n");
    let (mut c, ack) = RawClient::connect(node.mqtt_addr(), V5, "big", true, 60);
    assert_eq!(ack.properties.maximum_packet_size, Some(1024));
    c.send(&publish("t", &"x".repeat(2000), QoS::AtMostOnce, false, 0));
    assert_eq!(
        disconnect_reason(&mut c, T),
        Some(ReasonCode::PacketTooLarge)
    );
}

#[test]
fn mqtt_3_3_4_9_exceeding_the_receive_maximum_gets_0x93() {
    let node = Node::start_with_config("[mqtt]\nreceive_maximum = 2\n");
    let (mut c, ack) = RawClient::connect(node.mqtt_addr(), V5, "flood", true, 60);
    assert_eq!(ack.properties.receive_maximum, Some(2));
    // QoS 2 messages count until PUBCOMP; never send PUBREL.
    for id in 1..=3 {
        c.send(&publish("t", "x", QoS::ExactlyOnce, false, id));
    }
    assert_eq!(
        disconnect_reason(&mut c, T),
        Some(ReasonCode::ReceiveMaximumExceeded)
    );
}

#[test]
fn mqtt_3_8_4_invalid_filter_fails_in_suback_0x8f_and_0x80_in_v311() {
    let node = Node::start();
    let (mut c5, _) = RawClient::connect(node.mqtt_addr(), V5, "s5", true, 60);
    assert_eq!(
        subscribe(&mut c5, "a/#/b", QoS::AtLeastOnce),
        vec![ReasonCode::TopicFilterInvalid]
    );
    assert_eq!(
        subscribe(&mut c5, "a/+", QoS::ExactlyOnce),
        vec![ReasonCode::GrantedQoS2]
    );
    let (mut c3, _) = RawClient::connect(node.mqtt_addr(), V3, "s3", true, 60);
    assert_eq!(
        subscribe(&mut c3, "a+", QoS::AtLeastOnce),
        vec![ReasonCode::UnspecifiedError]
    );
}

#[test]
fn mqtt_3_3_1_9_retained_messages_on_subscribe_follow_retain_handling() {
    let node = Node::start();
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V5, "pub", true, 60);
    p.send(&publish("status/r7", "online", QoS::AtLeastOnce, true, 1));
    assert!(matches!(p.recv(T), Some(Packet::PubAck(_))));
    let (mut s, _) = RawClient::connect(node.mqtt_addr(), V5, "sub", true, 60);
    // Retain handling 2: never.
    let never = SubscriptionOptions {
        retain_handling: RetainHandling::DoNotSend,
        ..opts(QoS::AtLeastOnce)
    };
    subscribe_with(&mut s, "status/+", never, 1);
    assert!(next_publish(&mut s, Duration::from_millis(500)).is_none());
    // Retain handling 1: only for a new subscription.
    let if_new = SubscriptionOptions {
        retain_handling: RetainHandling::SendIfNew,
        ..opts(QoS::AtLeastOnce)
    };
    subscribe_with(&mut s, "status/#", if_new, 2);
    let got = next_publish(&mut s, T).expect("retained on a new subscription");
    assert!(got.retain, "sent with RETAIN set");
    s.send(&Packet::PubAck(PubAck::new(
        got.packet_id.unwrap(),
        ReasonCode::Success,
    )));
    subscribe_with(&mut s, "status/#", if_new, 3);
    assert!(
        next_publish(&mut s, Duration::from_millis(500)).is_none(),
        "not again for an existing one"
    );
    // Retain handling 0: every time.
    subscribe_with(&mut s, "status/#", opts(QoS::AtMostOnce), 4);
    assert_eq!(
        next_publish(&mut s, T).expect("retained again").payload,
        "online"
    );
}

#[test]
fn mqtt_3_3_1_10_empty_retained_payload_clears_the_retained_message() {
    let node = Node::start();
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V3, "pub", true, 60);
    p.send(&publish("cfg/setpoint", "21.5", QoS::AtLeastOnce, true, 1));
    assert!(matches!(p.recv(T), Some(Packet::PubAck(_))));
    p.send(&publish("cfg/setpoint", "", QoS::AtLeastOnce, true, 2));
    assert!(matches!(p.recv(T), Some(Packet::PubAck(_))));
    let (mut s, _) = RawClient::connect(node.mqtt_addr(), V3, "sub", true, 60);
    subscribe(&mut s, "cfg/#", QoS::AtMostOnce);
    assert!(next_publish(&mut s, Duration::from_millis(500)).is_none());
}

#[test]
fn mqtt_3_3_1_12_live_messages_carry_retain_0_unless_retain_as_published() {
    let node = Node::start();
    let (mut plain, _) = RawClient::connect(node.mqtt_addr(), V5, "plain", true, 60);
    subscribe(&mut plain, "t", QoS::AtMostOnce);
    let (mut rap, _) = RawClient::connect(node.mqtt_addr(), V5, "rap", true, 60);
    subscribe_with(
        &mut rap,
        "t",
        SubscriptionOptions {
            retain_as_published: true,
            ..opts(QoS::AtMostOnce)
        },
        1,
    );
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V5, "pub", true, 60);
    p.send(&publish("t", "x", QoS::AtMostOnce, true, 0));
    assert!(!next_publish(&mut plain, T).unwrap().retain);
    assert!(next_publish(&mut rap, T).unwrap().retain);
}

#[test]
fn mqtt_3_8_3_3_no_local_suppresses_the_clients_own_messages() {
    let node = Node::start();
    let (mut c, _) = RawClient::connect(node.mqtt_addr(), V5, "echo", true, 60);
    subscribe_with(
        &mut c,
        "chat",
        SubscriptionOptions {
            no_local: true,
            ..opts(QoS::AtMostOnce)
        },
        1,
    );
    c.send(&publish("chat", "mine", QoS::AtMostOnce, false, 0));
    assert!(next_publish(&mut c, Duration::from_millis(500)).is_none());
    let (mut other, _) = RawClient::connect(node.mqtt_addr(), V5, "other", true, 60);
    other.send(&publish("chat", "theirs", QoS::AtMostOnce, false, 0));
    assert_eq!(next_publish(&mut c, T).unwrap().payload, "theirs");
}

#[test]
fn mqtt_3_8_4_6_delivery_is_downgraded_to_the_granted_qos() {
    let node = Node::start();
    let (mut s, _) = RawClient::connect(node.mqtt_addr(), V3, "sub", true, 60);
    subscribe(&mut s, "d/#", QoS::AtLeastOnce);
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V3, "pub", true, 60);
    p.send(&publish("d/x", "q2", QoS::ExactlyOnce, false, 9));
    assert!(matches!(p.recv(T), Some(Packet::PubRec(_))));
    p.send(&Packet::PubRel(PubRel::new(9, ReasonCode::Success)));
    assert!(matches!(p.recv(T), Some(Packet::PubComp(_))));
    let got = next_publish(&mut s, T).unwrap();
    assert_eq!(got.qos, QoS::AtLeastOnce);
    p.send(&publish("d/y", "q0", QoS::AtMostOnce, false, 0));
    assert_eq!(
        next_publish(&mut s, T).unwrap().qos,
        QoS::AtMostOnce,
        "never upgraded"
    );
}

#[test]
fn mqtt_3_4_2_1_puback_says_no_matching_subscribers_in_v5() {
    let node = Node::start();
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V5, "pub", true, 60);
    p.send(&publish("nobody/listens", "x", QoS::AtLeastOnce, false, 3));
    match p.recv(T) {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason_code, ReasonCode::NoMatchingSubscribers),
        other => panic!("{other:?}"),
    }
}

#[test]
fn packets_sent_with_the_connect_in_one_segment_are_handled_at_once() {
    // Clients such as paho write SUBSCRIBE or PUBLISH right behind CONNECT; when both
    // arrive in one read, the second must not wait for the client's next bytes.
    let node = Node::start();
    for version in [V3, V5] {
        let mut c = RawClient::open(node.mqtt_addr(), version);
        let mut bytes = bytes::BytesMut::new();
        let connect = Packet::Connect(Box::new(Connect {
            protocol: version,
            clean_start: true,
            keep_alive: 60,
            client_id: format!("pipelined-{version:?}"),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        }));
        broker_node::mqtt::encode(&connect, version, &mut bytes).expect("encode");
        let publish = publish("pipelined", "x", QoS::AtLeastOnce, false, 7);
        broker_node::mqtt::encode(&publish, version, &mut bytes).expect("encode");
        c.send_raw(&bytes);
        assert!(matches!(c.recv(T), Some(Packet::ConnAck(_))), "{version:?}");
        match c.recv(T) {
            Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, 7, "{version:?}"),
            other => panic!("{version:?}: expected the PUBACK at once, got {other:?}"),
        }
    }
}

#[test]
fn mqtt_3_11_3_unsuback_reports_a_missing_subscription_with_0x11() {
    let node = Node::start();
    let (mut c, _) = RawClient::connect(node.mqtt_addr(), V5, "u", true, 60);
    subscribe(&mut c, "a", QoS::AtMostOnce);
    c.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 5,
        filters: vec!["a".into(), "b".into()],
        properties: Default::default(),
    }));
    match c.recv(T) {
        Some(Packet::UnsubAck(a)) => {
            assert_eq!(
                a.reason_codes,
                vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted]
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn mqtt_4_7_2_1_top_level_wildcards_do_not_match_sys_topics() {
    let node = Node::start_with_config("[mqtt]\nsys_interval = \"200ms\"\n");
    let (mut all, _) = RawClient::connect(node.mqtt_addr(), V3, "all", true, 60);
    subscribe(&mut all, "#", QoS::AtMostOnce);
    let (mut sys, _) = RawClient::connect(node.mqtt_addr(), V3, "sys", true, 60);
    subscribe(&mut sys, "$SYS/broker/#", QoS::AtMostOnce);
    let got = next_publish(&mut sys, T).expect("$SYS topics are published");
    assert!(got.topic.starts_with("$SYS/broker/"));
    assert!(
        next_publish(&mut all, Duration::from_millis(600)).is_none(),
        "# must not see $SYS"
    );
}

#[test]
fn mqtt_3_3_2_3_topic_alias_set_then_used() {
    let node = Node::start();
    let (mut s, _) = RawClient::connect(node.mqtt_addr(), V5, "sub", true, 60);
    subscribe(&mut s, "fleet/#", QoS::AtMostOnce);
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V5, "pub", true, 60);
    let with_alias = |topic: &str, payload: &str| {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            packet_id: None,
            properties: PublishProperties {
                topic_alias: Some(1),
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        })
    };
    p.send(&with_alias("fleet/1/robot/r7/telemetry/position", "a"));
    p.send(&with_alias("", "b"));
    let first = next_publish(&mut s, T).unwrap();
    let second = next_publish(&mut s, T).unwrap();
    assert_eq!(second.topic, "fleet/1/robot/r7/telemetry/position");
    assert_eq!(
        (first.payload, second.payload),
        (Bytes::from("a"), Bytes::from("b"))
    );
}

#[test]
fn mqtt_3_3_2_5_expired_messages_are_not_delivered() {
    let node = Node::start();
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V5, "pub", true, 60);
    p.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: "ephemeral".into(),
        packet_id: Some(1),
        properties: PublishProperties {
            message_expiry_interval: Some(1),
            ..Default::default()
        },
        payload: Bytes::from_static(b"soon gone"),
    }));
    assert!(matches!(p.recv(T), Some(Packet::PubAck(_))));
    // Not synchronization: the time-based rule under test needs its second to pass
    // (polling /retained until the sweep drops it would test the sweep instead).
    std::thread::sleep(Duration::from_millis(2100));
    let (mut s, _) = RawClient::connect(node.mqtt_addr(), V5, "late", true, 60);
    subscribe(&mut s, "ephemeral", QoS::AtLeastOnce);
    assert!(next_publish(&mut s, Duration::from_millis(500)).is_none());
}

fn connect_with_will(node: &Node, id: &str, delay: Option<u32>, keep_alive: u16) -> RawClient {
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
            retain: true,
            properties: WillProperties {
                will_delay_interval: delay,
                ..Default::default()
            },
        }),
        username: None,
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(60),
            ..Default::default()
        },
    })));
    assert!(matches!(c.recv(T), Some(Packet::ConnAck(_))));
    c
}

#[test]
fn mqtt_3_1_2_8_will_is_published_on_keep_alive_timeout_and_not_on_disconnect() {
    let node = Node::start();
    let (mut watcher, _) = RawClient::connect(node.mqtt_addr(), V5, "watcher", true, 60);
    subscribe(&mut watcher, "status/#", QoS::AtLeastOnce);
    let mut polite = connect_with_will(&node, "polite", None, 60);
    polite.send(&Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::Success,
        properties: Default::default(),
    }));
    let _silent = connect_with_will(&node, "silent", None, 1);
    let will =
        next_publish(&mut watcher, Duration::from_secs(5)).expect("will after keep-alive timeout");
    assert_eq!(will.topic, "status/silent");
    assert!(
        next_publish(&mut watcher, Duration::from_millis(500)).is_none(),
        "no will for a normal DISCONNECT"
    );
}

#[test]
fn mqtt_3_1_3_9_will_delay_is_cancelled_by_a_reconnect_in_time() {
    let node = Node::start();
    let (mut watcher, _) = RawClient::connect(node.mqtt_addr(), V5, "watcher", true, 60);
    subscribe(&mut watcher, "status/#", QoS::AtLeastOnce);
    let mut c = connect_with_will(&node, "flaky", Some(3), 60);
    c.send(&Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::DisconnectWithWillMessage,
        properties: Default::default(),
    }));
    // The disconnect is processed (the will delay runs) before the reconnect.
    node.wait_connected("flaky", false);
    let (_back, ack) = RawClient::connect(node.mqtt_addr(), V5, "flaky", false, 60);
    assert!(ack.session_present);
    assert!(
        next_publish(&mut watcher, Duration::from_secs(4)).is_none(),
        "will cancelled"
    );
    // Without a reconnect the delayed will comes.
    let mut d = connect_with_will(&node, "gone", Some(1), 60);
    d.send(&Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::DisconnectWithWillMessage,
        properties: Default::default(),
    }));
    let started = Instant::now();
    let will = next_publish(&mut watcher, Duration::from_secs(5)).expect("delayed will");
    assert_eq!(will.topic, "status/gone");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "not before the delay"
    );
}

#[test]
fn mqtt_3_1_2_11_session_expires_after_its_interval() {
    let node = Node::start();
    let mut c = RawClient::open(node.mqtt_addr(), V5);
    c.send(&Packet::Connect(Box::new(Connect {
        protocol: V5,
        clean_start: true,
        keep_alive: 60,
        client_id: "brief".into(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(1),
            ..Default::default()
        },
    })));
    assert!(matches!(c.recv(T), Some(Packet::ConnAck(_))));
    c.send(&Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::Success,
        properties: Default::default(),
    }));
    node.wait_connected("brief", false);
    let (_c, ack) = RawClient::connect(node.mqtt_addr(), V5, "brief", false, 60);
    assert!(ack.session_present, "still there within the interval");
    drop(_c);
    // Gone once its interval has run out. (This connection sent no Session Expiry
    // Interval, so that is as soon as the node sees it close.)
    node.wait_no_session("brief");
    let (_c, ack) = RawClient::connect(node.mqtt_addr(), V5, "brief", false, 60);
    assert!(!ack.session_present, "expired");
}

#[test]
fn graceful_shutdown_tells_v5_clients_0x8b() {
    let mut node = Node::start();
    let (mut c, _) = RawClient::connect(node.mqtt_addr(), V5, "stay", true, 60);
    assert!(node.terminate(), "exits by itself on SIGTERM");
    assert_eq!(
        disconnect_reason(&mut c, T),
        Some(ReasonCode::ServerShuttingDown)
    );
}

#[test]
fn mqtt_4_4_0_1_unacknowledged_messages_are_resent_with_dup_after_reconnect() {
    let node = Node::start();
    let (mut s, _) = RawClient::connect(node.mqtt_addr(), V3, "persist", false, 60);
    subscribe(&mut s, "q/#", QoS::AtLeastOnce);
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V3, "pub", true, 60);
    p.send(&publish("q/1", "one", QoS::AtLeastOnce, false, 1));
    assert!(matches!(p.recv(T), Some(Packet::PubAck(_))));
    let first = next_publish(&mut s, T).unwrap();
    drop(s); // no PUBACK
    node.wait_connected("persist", false);
    let (mut s, ack) = RawClient::connect(node.mqtt_addr(), V3, "persist", false, 60);
    assert!(ack.session_present);
    let again = next_publish(&mut s, T).expect("resent");
    assert!(again.dup, "DUP on a resend");
    assert_eq!(again.packet_id, first.packet_id, "same packet identifier");
    assert_eq!(again.payload, "one");
    s.send(&Packet::PubAck(PubAck::new(
        again.packet_id.unwrap(),
        ReasonCode::Success,
    )));
    drop(s);
    // The PUBACK is applied (the queue is empty) and the connection is over.
    wait_until("persist's PUBACK and disconnect to be applied", T, || {
        node.session("persist")
            .is_some_and(|s| s["connected"] == false && s["mqueue_len"] == 0)
    });
    let (mut s, _) = RawClient::connect(node.mqtt_addr(), V3, "persist", false, 60);
    assert!(
        next_publish(&mut s, Duration::from_millis(500)).is_none(),
        "acknowledged: gone"
    );
}

#[test]
fn mqtt_4_8_2_shared_message_unacknowledged_by_a_leaving_member_goes_to_another() {
    let node = Node::start();
    let (mut m1, _) = RawClient::connect(node.mqtt_addr(), V5, "m1", true, 60);
    subscribe(&mut m1, "$share/workers/jobs/#", QoS::AtLeastOnce);
    let (mut m2, _) = RawClient::connect(node.mqtt_addr(), V5, "m2", true, 60);
    subscribe(&mut m2, "$share/workers/jobs/#", QoS::AtLeastOnce);
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V5, "pub", true, 60);
    p.send(&publish("jobs/1", "job", QoS::AtLeastOnce, false, 1));
    let mut members = [m1, m2];
    let got: Vec<Option<Publish>> = members
        .iter_mut()
        .map(|m| next_publish(m, Duration::from_millis(700)))
        .collect();
    let chosen = match (&got[0], &got[1]) {
        (Some(_), None) => 0,
        (None, Some(_)) => 1,
        other => panic!("exactly one member must get it: {other:?}"),
    };
    let [a, b] = members;
    let (leaving, mut staying) = if chosen == 0 { (a, b) } else { (b, a) };
    // The chosen member leaves without PUBACK: the other member gets the message.
    drop(leaving);
    let again = next_publish(&mut staying, T).expect("handed to the remaining member");
    assert_eq!(again.payload, "job");
}

#[test]
fn mqtt_4_3_3_qos2_resend_after_a_broker_crash_is_not_delivered_twice() {
    use broker_node::mqtt::{PubComp, PubRec};
    let mut node = Node::start();
    let (mut sub, _) = RawClient::connect(node.mqtt_addr(), V3, "actuator", false, 60);
    subscribe(&mut sub, "cmd/stop", QoS::ExactlyOnce);
    let (mut pubr, _) = RawClient::connect(node.mqtt_addr(), V3, "console", false, 60);
    pubr.send(&publish("cmd/stop", "now", QoS::ExactlyOnce, false, 5));
    assert!(matches!(pubr.recv(T), Some(Packet::PubRec(_))));
    // The subscriber takes the message through the whole QoS 2 flow.
    let got = next_publish(&mut sub, T).expect("delivered once");
    let id = got.packet_id.unwrap();
    sub.send(&Packet::PubRec(PubRec::new(id, ReasonCode::Success)));
    assert!(matches!(sub.recv(T), Some(Packet::PubRel(_))));
    // The PUBREL goes out once the PUBREC is applied; the PUBCOMP is the next entry
    // (nothing else happens on the node meanwhile).
    let before = node.applied_index();
    sub.send(&Packet::PubComp(PubComp::new(id, ReasonCode::Success)));
    node.wait_applied_past(before);
    // The broker dies before the publisher's PUBREL.
    node.restart();
    let (mut pubr, ack) = RawClient::connect(node.mqtt_addr(), V3, "console", false, 60);
    assert!(ack.session_present);
    let Packet::Publish(mut again) = publish("cmd/stop", "now", QoS::ExactlyOnce, false, 5) else {
        unreachable!()
    };
    again.dup = true;
    pubr.send(&Packet::Publish(again));
    assert!(
        matches!(pubr.recv(T), Some(Packet::PubRec(_))),
        "acknowledged again"
    );
    pubr.send(&Packet::PubRel(PubRel::new(5, ReasonCode::Success)));
    assert!(matches!(pubr.recv(T), Some(Packet::PubComp(_))));
    let (mut sub, ack) = RawClient::connect(node.mqtt_addr(), V3, "actuator", false, 60);
    assert!(ack.session_present);
    assert!(
        next_publish(&mut sub, Duration::from_secs(1)).is_none(),
        "exactly once across the crash"
    );
}

#[test]
fn mqtt_3_3_5_1_overlapping_subscriptions_give_one_delivery_at_the_highest_qos() {
    let node = Node::start();
    let (mut s, _) = RawClient::connect(node.mqtt_addr(), V3, "overlap", true, 60);
    subscribe_with(&mut s, "fleet/#", opts(QoS::AtMostOnce), 1);
    subscribe_with(&mut s, "fleet/+/status", opts(QoS::AtLeastOnce), 2);
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V3, "pub", true, 60);
    p.send(&publish(
        "fleet/r7/status",
        "up",
        QoS::AtLeastOnce,
        false,
        1,
    ));
    let got = next_publish(&mut s, T).expect("delivered");
    assert_eq!(got.qos, QoS::AtLeastOnce, "the highest granted QoS");
    assert!(
        next_publish(&mut s, Duration::from_millis(500)).is_none(),
        "only once"
    );
}

#[test]
fn mqtt_3_3_4_3_every_matching_subscription_identifier_is_sent() {
    let node = Node::start();
    let (mut s, _) = RawClient::connect(node.mqtt_addr(), V5, "ids", true, 60);
    for (id, filter) in [(7u32, "a/#"), (9, "a/+")] {
        s.send(&Packet::Subscribe(Subscribe {
            packet_id: id as u16,
            filters: vec![(filter.into(), opts(QoS::AtMostOnce))],
            properties: SubscribeProperties {
                subscription_identifier: Some(id),
                user_properties: vec![],
            },
        }));
        assert!(matches!(s.recv(T), Some(Packet::SubAck(_))));
    }
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V5, "pub", true, 60);
    p.send(&publish("a/b", "x", QoS::AtMostOnce, false, 0));
    let mut ids = next_publish(&mut s, T)
        .unwrap()
        .properties
        .subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(ids, vec![7, 9]);
}

#[test]
fn mqtt_3_3_2_payload_format_and_content_type_travel_unchanged_to_a_v5_subscriber() {
    let node = Node::start();
    let (mut s, _) = RawClient::connect(node.mqtt_addr(), V5, "s", true, 60);
    subscribe(&mut s, "doc", QoS::AtMostOnce);
    let (mut p, _) = RawClient::connect(node.mqtt_addr(), V5, "p", true, 60);
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("replies/p".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    p.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "doc".into(),
        packet_id: None,
        properties: props.clone(),
        payload: Bytes::from_static(b"{}"),
    }));
    assert_eq!(next_publish(&mut s, T).unwrap().properties, props);
}

#[test]
fn limits_from_configuration_are_answered_with_reason_codes() {
    let node = Node::start_with_config(
        "[mqtt]\nmax_qos = 1\nmax_subscriptions_per_client = 1\nretain_available = false\nmax_topic_levels = 3\n",
    );
    let (mut c, ack) = RawClient::connect(node.mqtt_addr(), V5, "limited", true, 60);
    assert_eq!(ack.properties.maximum_qos, Some(1));
    assert_eq!(ack.properties.retain_available, Some(false));
    assert_eq!(
        subscribe(&mut c, "a", QoS::ExactlyOnce),
        vec![ReasonCode::GrantedQoS1],
        "QoS capped"
    );
    assert_eq!(
        subscribe_with(&mut c, "b", opts(QoS::AtMostOnce), 2),
        vec![ReasonCode::QuotaExceeded]
    );
    assert_eq!(
        subscribe_with(&mut c, "a/b/c/d", opts(QoS::AtMostOnce), 3),
        vec![ReasonCode::TopicFilterInvalid]
    );
    c.send(&publish("x", "y", QoS::AtMostOnce, true, 0));
    assert_eq!(
        disconnect_reason(&mut c, T),
        Some(ReasonCode::RetainNotSupported)
    );
    let (mut q, _) = RawClient::connect(node.mqtt_addr(), V5, "qos2", true, 60);
    q.send(&publish("x", "y", QoS::ExactlyOnce, false, 1));
    assert_eq!(
        disconnect_reason(&mut q, T),
        Some(ReasonCode::QoSNotSupported)
    );
}

#[test]
fn connections_beyond_the_maximum_are_refused() {
    let node = Node::start_with_config("[mqtt]\nmax_connections = 2\n");
    let (_a, _) = RawClient::connect(node.mqtt_addr(), V3, "a", true, 60);
    let (_b, _) = RawClient::connect(node.mqtt_addr(), V3, "b", true, 60);
    let mut third = RawClient::open(node.mqtt_addr(), V3);
    assert!(third.is_closed(T), "the third connection is closed at once");
}
