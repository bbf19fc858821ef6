//! The data plane across three `broker-node` processes: a publish received by one
//! node reaches clients connected to the others, with the same semantics as a local
//! delivery, in order, and once per shared group cluster-wide.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use broker_node::mqtt::{
    Connect, ConnectProperties, Packet, ProtocolVersion, PubAck, PubComp, PubRec, PubRel, Publish,
    PublishProperties, QoS, ReasonCode, Subscribe, SubscribeProperties,
};
use bytes::Bytes;
use flockmq_tests::mqtt::{next_publish, opts, publish, subscribe};
use flockmq_tests::{converged, running, wait_until, Node, RawClient};

const V5: ProtocolVersion = ProtocolVersion::V5;
const T: Duration = Duration::from_secs(10);

/// A subscriber that acknowledges as a real client does and records each message the
/// first time its QoS flow hands it over (a QoS 2 resend awaiting PUBREL is not new).
struct Receiver {
    client: RawClient,
    awaiting_release: HashSet<u16>,
    got: Vec<Publish>,
}

impl Receiver {
    fn new(client: RawClient) -> Receiver {
        Receiver {
            client,
            awaiting_release: HashSet::new(),
            got: Vec::new(),
        }
    }

    /// Read until `count` messages have arrived or nothing comes for `quiet`.
    fn collect(&mut self, count: usize, quiet: Duration) {
        while self.got.len() < count {
            match self.client.recv(quiet) {
                Some(Packet::Publish(p)) => self.on_publish(p),
                Some(Packet::PubRel(r)) => {
                    self.awaiting_release.remove(&r.packet_id);
                    self.client.send(&Packet::PubComp(PubComp::new(
                        r.packet_id,
                        ReasonCode::Success,
                    )));
                }
                Some(_) => {}
                None => return,
            }
        }
    }

    fn on_publish(&mut self, p: Publish) {
        match p.qos {
            QoS::AtMostOnce => self.got.push(p),
            QoS::AtLeastOnce => {
                let id = p.packet_id.expect("QoS 1 has a packet id");
                self.got.push(p);
                self.client
                    .send(&Packet::PubAck(PubAck::new(id, ReasonCode::Success)));
            }
            QoS::ExactlyOnce => {
                let id = p.packet_id.expect("QoS 2 has a packet id");
                if self.awaiting_release.insert(id) {
                    self.got.push(p);
                }
                self.client
                    .send(&Packet::PubRec(PubRec::new(id, ReasonCode::Success)));
            }
        }
    }

    fn payloads(&self) -> Vec<String> {
        self.got
            .iter()
            .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
            .collect()
    }
}

/// A publisher that keeps at most `window` QoS 1/2 messages unacknowledged and
/// completes every flow.
struct Publisher {
    client: RawClient,
    next_id: u16,
    in_flight: usize,
}

impl Publisher {
    fn connect(node: &Node, client_id: &str) -> Publisher {
        let (client, ack) = RawClient::connect(node.mqtt_addr(), V5, client_id, true, 60);
        assert_eq!(ack.reason_code, ReasonCode::Success);
        Publisher {
            client,
            next_id: 1,
            in_flight: 0,
        }
    }

    fn send(&mut self, topic: &str, payload: String, qos: QoS, properties: PublishProperties) {
        let packet_id = (qos != QoS::AtMostOnce).then(|| {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            id
        });
        self.client.send(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id,
            properties,
            payload: Bytes::from(payload),
        }));
        if packet_id.is_some() {
            self.in_flight += 1;
            while self.in_flight >= 10 {
                self.settle_one();
            }
        }
    }

    /// Wait for one flow to complete (PUBACK, or PUBREC → PUBREL → PUBCOMP).
    fn settle_one(&mut self) {
        match self.client.recv(T) {
            Some(Packet::PubAck(a)) => {
                assert!(!a.reason_code.is_error(), "{a:?}");
                self.in_flight -= 1;
            }
            Some(Packet::PubRec(r)) => {
                assert!(!r.reason_code.is_error(), "{r:?}");
                self.client.send(&Packet::PubRel(PubRel::new(
                    r.packet_id,
                    ReasonCode::Success,
                )));
            }
            Some(Packet::PubComp(_)) => self.in_flight -= 1,
            other => panic!("publisher expected an acknowledgement, got {other:?}"),
        }
    }

    fn finish(&mut self) {
        while self.in_flight > 0 {
            self.settle_one();
        }
    }
}

/// Publish `count` QoS 1 alerts through `node`, over four topics under `alerts/`,
/// each acknowledged; their payloads in order.
fn publish_alerts(node: &Node, count: usize) -> Vec<String> {
    let mut publisher = Publisher::connect(node, "alerter");
    for i in 0..count {
        publisher.send(
            &format!("alerts/zone{}", i % 4),
            format!("alert-{i}"),
            QoS::AtLeastOnce,
            PublishProperties::default(),
        );
    }
    publisher.finish();
    (0..count).map(|i| format!("alert-{i}")).collect()
}

fn subscriber(node: &Node, client_id: &str, filter: &str, qos: QoS) -> Receiver {
    let (mut c, _) = RawClient::connect(node.mqtt_addr(), V5, client_id, true, 60);
    assert!(!subscribe(&mut c, filter, qos)[0].is_error());
    Receiver::new(c)
}

#[test]
fn qos_0_1_and_2_published_on_node_1_reach_subscribers_on_nodes_2_and_3_unchanged() {
    let nodes = Node::cluster(3);
    let (mut on_2, _) = RawClient::connect(nodes[1].mqtt_addr(), V5, "dashboard", true, 60);
    on_2.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![("fleet/+/pose".into(), opts(QoS::ExactlyOnce))],
        properties: SubscribeProperties {
            subscription_identifier: Some(42),
            user_properties: vec![],
        },
    }));
    assert!(matches!(on_2.recv(T), Some(Packet::SubAck(_))));
    let mut on_2 = Receiver::new(on_2);
    // Node 3 grants only QoS 1: the QoS 2 message is downgraded there.
    let mut on_3 = subscriber(&nodes[2], "recorder", "fleet/#", QoS::AtLeastOnce);

    converged(&running(&nodes));
    let mut publisher = Publisher::connect(&nodes[0], "r7");
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        let properties = PublishProperties {
            message_expiry_interval: Some(600),
            content_type: Some("application/json".into()),
            response_topic: Some("fleet/r7/reply".into()),
            correlation_data: Some(Bytes::from_static(b"c-1")),
            user_properties: vec![("site".into(), "north".into())],
            payload_format_indicator: Some(1),
            ..Default::default()
        };
        publisher.send("fleet/r7/pose", format!("pose-{i}"), qos, properties);
    }
    publisher.finish();

    on_2.collect(3, T);
    on_3.collect(3, T);
    assert_eq!(on_2.payloads(), vec!["pose-0", "pose-1", "pose-2"]);
    assert_eq!(on_3.payloads(), vec!["pose-0", "pose-1", "pose-2"]);
    let qos_of = |r: &Receiver| r.got.iter().map(|p| p.qos).collect::<Vec<_>>();
    assert_eq!(
        qos_of(&on_2),
        vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
    );
    assert_eq!(
        qos_of(&on_3),
        vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::AtLeastOnce]
    );
    for p in on_2.got.iter().chain(&on_3.got) {
        let props = &p.properties;
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        assert_eq!(props.response_topic.as_deref(), Some("fleet/r7/reply"));
        assert_eq!(props.correlation_data.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(
            props.user_properties,
            vec![("site".to_owned(), "north".to_owned())]
        );
        assert_eq!(props.payload_format_indicator, Some(1));
        let expiry = props.message_expiry_interval.expect("expiry is carried");
        assert!((590..=600).contains(&expiry), "expiry {expiry}");
        assert!(!p.retain);
    }
    for p in &on_2.got {
        assert_eq!(p.properties.subscription_identifiers, vec![42]);
    }
    for p in &on_3.got {
        assert!(p.properties.subscription_identifiers.is_empty());
    }

    // The per-peer forwarding metrics account for the three messages each way.
    let metrics = |node: &Node| {
        ureq::get(&format!("http://127.0.0.1:{}/metrics", node.http_port))
            .call()
            .expect("GET /metrics")
            .into_string()
            .expect("text")
    };
    let on_1 = metrics(&nodes[0]);
    for peer in ["2", "3"] {
        for line in [
            format!("flockmq_forward_sent_total{{peer=\"{peer}\"}} 3"),
            format!("flockmq_forward_peer_up{{peer=\"{peer}\"}} 1"),
        ] {
            assert!(
                on_1.lines().any(|l| l == line),
                "{line} missing from:\n{on_1}"
            );
        }
        assert!(on_1.contains(&format!(
            "flockmq_forward_ack_duration_seconds_bucket{{peer=\"{peer}\""
        )));
        assert!(on_1.contains(&format!(
            "flockmq_forward_bytes_sent_total{{peer=\"{peer}\"}}"
        )));
    }
    for node in &nodes[1..] {
        let text = metrics(node);
        let line = "flockmq_forward_received_total{peer=\"1\"} 3";
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from:\n{text}"
        );
    }
}

#[test]
fn messages_from_one_publisher_arrive_in_order_on_another_node() {
    let nodes = Node::cluster(3);
    let mut sub = subscriber(
        &nodes[2],
        "historian",
        "warehouse/zone1/temp",
        QoS::AtLeastOnce,
    );
    converged(&running(&nodes));
    let mut publisher = Publisher::connect(&nodes[0], "sensor-1");
    let n = 500;
    for i in 0..n {
        let qos = if i % 3 == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        publisher.send(
            "warehouse/zone1/temp",
            format!("{i}"),
            qos,
            PublishProperties::default(),
        );
    }
    publisher.finish();
    sub.collect(n, T);
    let expected: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(sub.payloads(), expected);
}

#[test]
fn fan_out_reaches_subscribers_spread_over_every_node() {
    let nodes = Node::cluster(3);
    let mut subs: Vec<Receiver> = (0..15)
        .map(|i| {
            subscriber(
                &nodes[i % 3],
                &format!("screen-{i}"),
                "alerts/#",
                QoS::AtLeastOnce,
            )
        })
        .collect();
    // Subscriptions made through one node reach the others' route tables
    // asynchronously: wait until every node applied them.
    converged(&running(&nodes));
    let expected = publish_alerts(&nodes[1], 20);
    for (i, sub) in subs.iter_mut().enumerate() {
        sub.collect(20, T);
        assert_eq!(
            sub.payloads(),
            expected,
            "subscriber {i} on node {}",
            i % 3 + 1
        );
    }
}

#[test]
fn a_shared_group_with_members_on_every_node_gets_each_message_exactly_once() {
    let nodes = Node::cluster(3);
    let mut members: Vec<Receiver> = (0..3)
        .map(|i| {
            subscriber(
                &nodes[i],
                &format!("worker-{i}"),
                "$share/workers/jobs/#",
                QoS::AtLeastOnce,
            )
        })
        .collect();
    converged(&running(&nodes));
    let mut publisher = Publisher::connect(&nodes[0], "dispatcher");
    let n = 300;
    for i in 0..n {
        publisher.send(
            "jobs/pick",
            format!("job-{i}"),
            QoS::AtLeastOnce,
            PublishProperties::default(),
        );
    }
    publisher.finish();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + T;
    while seen.values().sum::<usize>() < n && Instant::now() < deadline {
        seen.clear();
        for m in &mut members {
            m.collect(n, Duration::from_millis(300));
            for p in m.payloads() {
                *seen.entry(p).or_default() += 1;
            }
        }
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(duplicates.is_empty(), "delivered twice: {duplicates:?}");
    assert_eq!(seen.len(), n, "every job delivered once");
    for (i, m) in members.iter().enumerate() {
        assert!(
            m.got.len() >= n / 10,
            "member {i} on node {} got only {} of {n}",
            i + 1,
            m.got.len()
        );
    }
}

#[test]
fn qos_2_stays_exactly_once_when_the_subscribers_node_is_killed_mid_stream() {
    let mut nodes = Node::cluster(3);
    let connect = |node: &Node, clean: bool| {
        let mut c = RawClient::open(node.mqtt_addr(), V5);
        c.send(&Packet::Connect(Box::new(Connect {
            protocol: V5,
            clean_start: clean,
            keep_alive: 60,
            client_id: "arm-controller".into(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: Some(600),
                ..Default::default()
            },
        })));
        match c.recv(T) {
            Some(Packet::ConnAck(ack)) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    };
    let (mut c, _) = connect(&nodes[1], true);
    assert!(!subscribe(&mut c, "arm/1/command", QoS::ExactlyOnce)[0].is_error());
    let mut sub = Receiver::new(c);

    let n = 120;
    converged(&running(&nodes));
    let mut publisher = Publisher::connect(&nodes[0], "planner");
    let mut commands = |range: std::ops::Range<usize>| {
        for i in range {
            let props = PublishProperties::default();
            publisher.send("arm/1/command", i.to_string(), QoS::ExactlyOnce, props);
        }
        publisher.finish();
    };
    commands(0..n / 2);
    // The subscriber takes part of the first half, then its node dies under it.
    sub.collect(n / 4, T);
    nodes[1].kill();
    commands(n / 2..n);

    // It comes back on node 3 with its session (and its own QoS 2 state) intact.
    let (c, ack) = connect(&nodes[2], false);
    assert!(ack.session_present, "the session survived its node");
    sub.client = c;
    sub.collect(n, T);
    let expected: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let mut got = sub.payloads();
    let in_order = got.clone();
    got.sort_by_key(|p| p.parse::<usize>().unwrap_or(usize::MAX));
    got.dedup();
    assert_eq!(
        got.len(),
        sub.got.len(),
        "no message delivered twice: {in_order:?}"
    );
    assert_eq!(got, expected, "every message delivered: {in_order:?}");
}

#[test]
fn a_shared_group_skips_members_behind_a_dead_node() {
    let mut nodes = Node::cluster(3);
    let mut members: Vec<Receiver> = (0..3)
        .map(|i| {
            subscriber(
                &nodes[i],
                &format!("picker-{i}"),
                "$share/pickers/orders/#",
                QoS::AtLeastOnce,
            )
        })
        .collect();
    converged(&running(&nodes));
    let mut publisher = Publisher::connect(&nodes[0], "orders");
    let send = |publisher: &mut Publisher, range: std::ops::Range<usize>| {
        for i in range {
            let props = PublishProperties::default();
            publisher.send("orders/new", format!("order-{i}"), QoS::AtLeastOnce, props);
        }
        publisher.finish();
    };
    send(&mut publisher, 0..30);
    // Node 3 dies with its member; its sessions still look connected in the
    // replicated state, but node 1 sees its stream break.
    nodes[2].kill();
    wait_until(
        "node 1 to see its forward stream to node 3 break",
        T,
        || {
            nodes[0]
                .metrics()
                .lines()
                .any(|l| l == "flockmq_forward_peer_up{peer=\"3\"} 0")
        },
    );
    send(&mut publisher, 30..90);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in members.iter_mut().take(2) {
        m.collect(90, Duration::from_secs(2));
        for p in m.payloads() {
            *seen.entry(p).or_default() += 1;
        }
    }
    for i in 30..90 {
        assert_eq!(
            seen.get(&format!("order-{i}")),
            Some(&1),
            "order-{i} reached the live members exactly once: {seen:?}"
        );
    }
}

#[test]
fn a_leaving_shared_member_s_unacknowledged_messages_go_to_a_member_on_another_node() {
    // local_first: every job published on node 1 goes to the member there, which
    // reads them and acknowledges none; when it drops, the member on node 2 gets them.
    let nodes = Node::cluster_with_env(
        2,
        &[("FLOCKMQ_MQTT__SHARED_SUBSCRIPTION_STRATEGY", "local_first")],
    );
    let (mut greedy, _) = RawClient::connect(nodes[0].mqtt_addr(), V5, "greedy", true, 60);
    assert!(!subscribe(&mut greedy, "$share/workers/jobs/#", QoS::AtLeastOnce)[0].is_error());
    let mut steady = subscriber(
        &nodes[1],
        "steady",
        "$share/workers/jobs/#",
        QoS::AtLeastOnce,
    );
    converged(&running(&nodes));
    let mut publisher = Publisher::connect(&nodes[0], "dispatcher");
    let n = 20;
    for i in 0..n {
        publisher.send(
            "jobs/pick",
            format!("job-{i}"),
            QoS::AtLeastOnce,
            PublishProperties::default(),
        );
    }
    publisher.finish();
    let mut held = Vec::new();
    while held.len() < n {
        match greedy.recv(T) {
            Some(Packet::Publish(p)) => held.push(String::from_utf8_lossy(&p.payload).into_owned()),
            other => panic!("the local member expected every job, got {other:?} after {held:?}"),
        }
    }
    steady.collect(1, Duration::from_millis(500));
    assert!(
        steady.got.is_empty(),
        "local_first: {:?}",
        steady.payloads()
    );
    drop(greedy);
    steady.collect(n, T);
    let mut got = steady.payloads();
    got.sort();
    held.sort();
    assert_eq!(
        got, held,
        "every unacknowledged job, once, on the other node"
    );
}

/// One QoS 1 message each way between two nodes: a fresh subscriber on each node, a
/// publisher on the other, then the PUBACK and the delivery, each within `T`. Returns
/// how long each step took, or the step that did not finish in time.
fn publish_both_ways(nodes: &[Node], round: usize) -> Result<Vec<(String, Duration)>, String> {
    let mut steps = Vec::new();
    let mut timed = |what: String, started: Instant| steps.push((what, started.elapsed()));
    let mut subscribers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let started = Instant::now();
        let id = format!("watcher-{}-{round}", i + 1);
        let (mut c, ack) = RawClient::connect(node.mqtt_addr(), V5, &id, true, 60);
        assert_eq!(ack.reason_code, ReasonCode::Success);
        assert!(!subscribe(&mut c, &format!("lamp/{}", i + 1), QoS::AtLeastOnce)[0].is_error());
        timed(format!("subscriber on node {}", i + 1), started);
        subscribers.push(c);
    }
    let started = Instant::now();
    converged(&running(nodes));
    timed("converged".into(), started);
    for (to, from) in [(1, 0), (0, 1)] {
        let step = format!("node {} -> node {}", from + 1, to + 1);
        let started = Instant::now();
        let id = format!("switch-{}-{round}", from + 1);
        let (mut publisher, ack) = RawClient::connect(nodes[from].mqtt_addr(), V5, &id, true, 60);
        assert_eq!(ack.reason_code, ReasonCode::Success);
        timed(format!("{step}: publisher connected"), started);
        let topic = format!("lamp/{}", to + 1);
        let payload = format!("on-{round}");
        publisher.send(&publish(&topic, &payload, QoS::AtLeastOnce, false, 1));
        match publisher.recv(T) {
            Some(Packet::PubAck(a)) if !a.reason_code.is_error() => {
                timed(format!("{step}: PUBACK"), started)
            }
            other => return Err(format!("{step}: no PUBACK in {T:?} ({other:?}); {steps:?}")),
        }
        match next_publish(&mut subscribers[to], T) {
            Some(p) if p.payload == payload.as_bytes() => {
                if let Some(id) = p.packet_id {
                    subscribers[to].send(&Packet::PubAck(PubAck::new(id, ReasonCode::Success)));
                }
                timed(format!("{step}: delivered"), started);
            }
            other => {
                return Err(format!(
                    "{step}: not delivered in {T:?} ({other:?}); {steps:?}"
                ))
            }
        }
    }
    Ok(steps)
}

/// How many times `node` failed to open a forward stream to node `peer`.
fn connect_failures(node: &Node, peer: usize) -> u64 {
    let peer = format!("peer=\"{peer}\"");
    node.metrics()
        .lines()
        .filter(|l| l.starts_with("flockmq_forward_errors_total{"))
        .filter(|l| l.contains("kind=\"connect\"") && l.contains(&peer))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A peer that came back while the stream to it was backing off gets a QoS 1 message
/// as soon as it has converged: the message starts an attempt to reopen the stream
/// rather than being dropped until the next scheduled attempt (up to 2 s later,
/// though its subscriber had connected and subscribed through Raft meanwhile).
#[test]
fn a_qos_1_message_reaches_a_peer_that_came_back_while_the_forward_stream_to_it_backed_off() {
    let mut nodes = Node::cluster(2);
    // Both forward streams exist.
    publish_both_ways(&nodes, 0).unwrap_or_else(|e| panic!("{e}"));
    for (round, restarted) in [(1, 1), (2, 0)] {
        let survivor = 1 - restarted;
        let failed = connect_failures(&nodes[survivor], restarted + 1);
        nodes[restarted].kill();
        // The survivor's stream to it broke and its attempts to reopen it back off:
        // after 4 more failures the next one waits 1.6 s, longer than a restart.
        wait_until(
            "the survivor to fail to reach the stopped node 4 times",
            T,
            || connect_failures(&nodes[survivor], restarted + 1) >= failed + 4,
        );
        nodes[restarted].restart();
        converged(&running(&nodes));
        if let Err(e) = publish_both_ways(&nodes, round) {
            panic!("after restarting node {}: {e}", restarted + 1);
        }
    }
}

/// CONNECT of a v5 client whose session outlives its connection by an hour.
fn persistent(node: &Node, client_id: &str) -> RawClient {
    let (client, ack) = RawClient::connect_with(
        node.mqtt_addr(),
        Connect {
            protocol: V5,
            clean_start: false,
            keep_alive: 60,
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: Some(3600),
                ..Default::default()
            },
        },
    );
    assert_eq!(ack.reason_code, ReasonCode::Success);
    client
}

#[test]
fn without_durable_sessions_a_connected_persistent_subscriber_gets_each_message_once_and_an_offline_one_from_its_queue(
) {
    // With durable_sessions off, the publishing node hands messages straight to the
    // connected persistent subscribers and the publish's command names them as
    // exceptions; every node finds the offline ones in its subscriptions and queues
    // the message for them. Neither kind may get a message twice or miss one.
    // (Fewer online than offline: the command names the exceptions, not the queues.)
    let nodes = Node::cluster_with_env(3, &[("FLOCKMQ_MQTT__DURABLE_SESSIONS", "false")]);
    let mut online: Vec<Receiver> = (0..4)
        .map(|i| {
            let mut c = persistent(&nodes[i % 3], &format!("panel-{i}"));
            assert!(!subscribe(&mut c, "alerts/#", QoS::AtLeastOnce)[0].is_error());
            Receiver::new(c)
        })
        .collect();
    for i in 0..6 {
        let mut c = persistent(&nodes[i % 3], &format!("robot-{i}"));
        assert!(!subscribe(&mut c, "alerts/#", QoS::AtLeastOnce)[0].is_error());
        drop(c);
        nodes[i % 3].wait_connected(&format!("robot-{i}"), false);
    }
    converged(&running(&nodes));
    let expected = publish_alerts(&nodes[1], 20);
    for (i, sub) in online.iter_mut().enumerate() {
        // Read on a little after the twentieth: a copy from a queue would follow (the
        // publish's command is committed, and applied everywhere within moments).
        sub.collect(20, T);
        sub.collect(21, Duration::from_millis(500));
        assert_eq!(sub.payloads(), expected, "connected panel-{i}");
    }
    // Nor did their sessions queue a copy of what they were handed: back on another
    // node, they get nothing more.
    drop(online);
    for i in 0..4 {
        nodes[i % 3].wait_connected(&format!("panel-{i}"), false);
        let client = persistent(&nodes[(i + 1) % 3], &format!("panel-{i}"));
        let mut sub = Receiver::new(client);
        sub.collect(1, Duration::from_millis(500));
        assert_eq!(sub.payloads(), Vec::<String>::new(), "panel-{i} again");
    }
    for i in 0..6 {
        // Back on another node than the one it left.
        let client = persistent(&nodes[(i + 1) % 3], &format!("robot-{i}"));
        let mut sub = Receiver::new(client);
        sub.collect(20, T);
        sub.collect(21, Duration::from_secs(2));
        assert_eq!(
            sub.payloads(),
            expected,
            "robot-{i}, offline while published"
        );
    }
}
