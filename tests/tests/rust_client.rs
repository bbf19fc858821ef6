//! A real Rust MQTT client (rumqttc, v3.1.1 and v5) against a real `broker-node`.

use std::time::Duration;

use flockmq_tests::Node;
use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties, SubscribeProperties};
use rumqttc::v5::{
    AsyncClient as Client5, Event as Event5, EventLoop as EventLoop5, MqttOptions as Options5,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

fn v4(node: &Node, id: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", node.mqtt_port);
    o.set_keep_alive(Duration::from_secs(30));
    AsyncClient::new(o, 1000)
}

fn v5(node: &Node, id: &str) -> Options5 {
    let mut o = Options5::new(id, "127.0.0.1", node.mqtt_port);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Poll until SUBACK (or panic after the timeout).
async fn until_suback(ev: &mut EventLoop) {
    timeout(T, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = ev.poll().await.expect("poll") {
                return;
            }
        }
    })
    .await
    .expect("SUBACK in time");
}

async fn until_suback5(ev: &mut EventLoop5) {
    timeout(T, async {
        loop {
            if let Event5::Incoming(P5::SubAck(_)) = ev.poll().await.expect("poll") {
                return;
            }
        }
    })
    .await
    .expect("SUBACK in time");
}

#[tokio::test]
async fn mqtt_4_3_3_qos2_messages_arrive_exactly_once_and_in_order() {
    let node = Node::start();
    let (sub, mut sub_ev) = v4(&node, "qos2-sub");
    sub.subscribe("cmd/#", QoS::ExactlyOnce).await.unwrap();
    until_suback(&mut sub_ev).await;
    let (publ, mut pub_ev) = v4(&node, "qos2-pub");
    tokio::spawn(async move { while pub_ev.poll().await.is_ok() {} });
    for i in 0..200u32 {
        publ.publish("cmd/robot/r7", QoS::ExactlyOnce, false, i.to_string())
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    let collect = async {
        while got.len() < 200 {
            if let Event::Incoming(Packet::Publish(p)) = sub_ev.poll().await.unwrap() {
                assert_eq!(p.qos, QoS::ExactlyOnce);
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
        }
    };
    timeout(Duration::from_secs(30), collect)
        .await
        .expect("200 messages");
    // Nothing more arrives: no duplicates.
    let extra = timeout(Duration::from_millis(500), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = sub_ev.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "duplicate delivery: {extra:?}");
    let expected: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert_eq!(got, expected, "order per publisher and topic");
}

#[tokio::test]
async fn mqtt_4_9_0_server_never_exceeds_the_clients_receive_maximum() {
    let node = Node::start();
    let mut o = v5(&node, "slow-sub");
    o.set_receive_maximum(Some(5));
    o.set_manual_acks(true);
    let (sub, mut sub_ev) = Client5::new(o, 100);
    sub.subscribe("load/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    until_suback5(&mut sub_ev).await;
    let (publ, mut pub_ev) = Client5::new(v5(&node, "fast-pub"), 100);
    tokio::spawn(async move { while pub_ev.poll().await.is_ok() {} });
    for i in 0..20u32 {
        publ.publish(
            "load/x",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            i.to_string(),
        )
        .await
        .unwrap();
    }
    // Without acknowledging, exactly 5 arrive.
    let mut held = Vec::new();
    let _ = timeout(Duration::from_secs(2), async {
        loop {
            if let Event5::Incoming(P5::Publish(p)) = sub_ev.poll().await.unwrap() {
                held.push(p);
            }
        }
    })
    .await;
    assert_eq!(held.len(), 5, "unacknowledged messages in flight");
    // Acknowledge and the rest follow.
    let mut total = held.len();
    for p in &held {
        sub.ack(p).await.unwrap();
    }
    timeout(T, async {
        while total < 20 {
            if let Event5::Incoming(P5::Publish(p)) = sub_ev.poll().await.unwrap() {
                total += 1;
                sub.ack(&p).await.unwrap();
            }
        }
    })
    .await
    .expect("all 20 after acknowledging");
}

#[tokio::test]
async fn mqtt_3_3_4_subscription_identifier_and_user_properties_reach_the_subscriber() {
    let node = Node::start();
    let (sub, mut sub_ev) = Client5::new(v5(&node, "props-sub"), 100);
    let props = SubscribeProperties {
        id: Some(42),
        user_properties: vec![],
    };
    sub.subscribe_with_properties("status/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, props)
        .await
        .unwrap();
    until_suback5(&mut sub_ev).await;
    let (publ, mut pub_ev) = Client5::new(v5(&node, "props-pub"), 100);
    tokio::spawn(async move { while pub_ev.poll().await.is_ok() {} });
    let props = PublishProperties {
        user_properties: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
        content_type: Some("text/plain".into()),
        message_expiry_interval: Some(300),
        ..Default::default()
    };
    publ.publish_with_properties(
        "status/r7",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        "online",
        props,
    )
    .await
    .unwrap();
    let got = timeout(T, async {
        loop {
            if let Event5::Incoming(P5::Publish(p)) = sub_ev.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .expect("publish");
    let props = got.properties.expect("properties");
    assert_eq!(props.subscription_identifiers, vec![42]);
    assert_eq!(
        props.user_properties,
        vec![("a".into(), "1".into()), ("b".into(), "2".into())]
    );
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    let left = props.message_expiry_interval.expect("expiry sent on");
    assert!((299..=300).contains(&left), "remaining expiry {left}");
}
