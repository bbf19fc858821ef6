//! The MQTT rules of one connection, driven in-process: packets in, time injected,
//! a recording world answering the machine's reads and collecting what it sends and
//! asks for. No socket, no runtime, no sleep.

use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::mqtt::{
    ConnectProperties, LastWill, RetainHandling, SubscribeProperties, UnsubscribeProperties,
    WillProperties,
};

/// What the machine sees of a node, with rules a test sets and a record of what it did.
#[derive(Default)]
struct Recorder {
    cfg: MqttConfig,
    sent: Vec<Packet>,
    actions: Vec<Action>,
    dropped: Vec<&'static str>,
    /// Topics (prefixes) the ACL keeps the client from publishing to.
    deny_publish: Vec<&'static str>,
    /// Filters the ACL refuses, and filters it grants only with per-delivery checks.
    deny_subscribe: Vec<&'static str>,
    filtered_subscribe: Vec<&'static str>,
    /// Topics (prefixes) the client may not read.
    deny_read: Vec<&'static str>,
    acl: bool,
    /// Whether mqtt.max_retained_messages is reached; topics that hold one already.
    retained_full: bool,
    retained_topics: Vec<&'static str>,
    generation: u32,
    subscriptions: Vec<String>,
    queue: Vec<QueuedMessage>,
    awaiting_pubcomp: Vec<u64>,
}

impl World for Recorder {
    fn config(&self) -> &MqttConfig {
        &self.cfg
    }
    fn send(&mut self, packet: &Packet) {
        self.sent.push(packet.clone());
    }
    fn act(&mut self, action: Action) {
        self.actions.push(action);
    }
    fn sent(&mut self, _message: &Message, _qos: u8) {}
    fn dropped(&mut self, reason: &'static str) {
        self.dropped.push(reason);
    }
    fn may_publish(&self, _: Option<&str>, _: &str, topic: &str) -> bool {
        !self.deny_publish.iter().any(|p| topic.starts_with(p))
    }
    fn retained_full(&self, topic: &str) -> bool {
        self.retained_full && !self.retained_topics.contains(&topic)
    }
    fn subscribe_access(&self, _: Option<&str>, _: &str, filter: &str) -> SubscribeAccess {
        if self.deny_subscribe.contains(&filter) {
            SubscribeAccess::Denied
        } else if self.filtered_subscribe.contains(&filter) {
            SubscribeAccess::Filtered
        } else {
            SubscribeAccess::Granted
        }
    }
    fn may_read(&self, _: Option<&str>, _: &str, topic: &str) -> bool {
        !self.deny_read.iter().any(|p| topic.starts_with(p))
    }
    fn acl_generation(&self) -> (u32, bool) {
        (self.generation, self.acl)
    }
    fn subscriptions(&self, _: &str) -> Vec<String> {
        self.subscriptions.clone()
    }
    fn queued(&self, _: &str, from: u64, max: usize) -> Vec<QueuedMessage> {
        self.queue
            .iter()
            .filter(|q| q.seq >= from)
            .take(max)
            .cloned()
            .collect()
    }
    fn awaiting_pubcomp(&self, _: &str) -> Vec<u64> {
        self.awaiting_pubcomp.clone()
    }
}

impl Recorder {
    /// What was sent since the last look.
    fn take_sent(&mut self) -> Vec<Packet> {
        std::mem::take(&mut self.sent)
    }

    /// What was asked for since the last look.
    fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }
}

fn connect(version: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: client_id.to_owned(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

/// A machine for `c`, established at `now` on a node configured as `world.cfg`.
fn machine_for(c: &Connect, world: &mut Recorder, now: Instant) -> Machine {
    let (id, assigned) = client_identifier(c, || "assigned".into()).unwrap();
    let n = negotiate(c, &world.cfg, id, assigned, |_| true).unwrap();
    let opened = Opened {
        connection_id: 7,
        ..Opened::default()
    };
    let mut m = Machine::new(c, &n, &world.cfg, opened, now);
    m.start(false, 0, world);
    m
}

/// A resumed session whose queue positions from `resend_below` were never sent.
fn resumed(resend_below: u64) -> Opened {
    Opened {
        connection_id: 9,
        resend_below,
        ..Opened::default()
    }
}

fn v5_machine(world: &mut Recorder) -> Machine {
    machine_for(&connect(ProtocolVersion::V5, "c"), world, Instant::now())
}

fn v3_machine(world: &mut Recorder) -> Machine {
    machine_for(
        &connect(ProtocolVersion::V3_1_1, "c"),
        world,
        Instant::now(),
    )
}

/// A v5 machine whose session persists (Session Expiry Interval 3600).
fn persistent_machine(world: &mut Recorder) -> Machine {
    let mut c = connect(ProtocolVersion::V5, "c");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(3600);
    machine_for(&c, world, Instant::now())
}

fn publish(topic: &str, qos: QoS, packet_id: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_owned(),
        packet_id: (qos != QoS::AtMostOnce).then_some(packet_id),
        properties: PublishProperties::default(),
        payload: Bytes::from_static(b"x"),
    })
}

fn subscribe(packet_id: u16, filters: &[(&str, QoS)]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        filters: filters
            .iter()
            .map(|(f, qos)| {
                (
                    (*f).to_owned(),
                    mqtt::SubscriptionOptions {
                        qos: *qos,
                        no_local: false,
                        retain_as_published: false,
                        retain_handling: RetainHandling::SendAtSubscribe,
                    },
                )
            })
            .collect(),
        properties: SubscribeProperties::default(),
    })
}

fn delivery(topic: &str, qos: u8) -> Delivery {
    Delivery {
        message: Arc::new(message(topic)),
        qos,
        retain: false,
        subscription_ids: vec![],
        shared_group: None,
    }
}

fn message(topic: &str) -> Message {
    Message {
        topic: Arc::from(topic),
        payload: Bytes::from_static(b"m"),
        qos: 2,
        retain: false,
        properties: MessageProperties::default(),
        received_at_ms: 1_000,
        origin_client: None,
    }
}

/// The slot of the single action asked for, which must be a publish.
fn publish_slot(world: &mut Recorder) -> Slot {
    match world.take_actions().as_slice() {
        [Action::Publish {
            slot: Some(slot), ..
        }] => *slot,
        other => panic!("expected one acknowledged publish, got {other:?}"),
    }
}

/// The command and slot of the single proposal asked for.
fn proposal(world: &mut Recorder) -> (Command, Option<Slot>) {
    let mut actions = world.take_actions();
    match (actions.pop(), actions.is_empty()) {
        (Some(Action::Propose { command, slot, .. }), true) => (command, slot),
        (last, _) => panic!("expected one proposal, got {actions:?} and {last:?}"),
    }
}

/// What `slot` waited for committed.
fn done(m: &mut Machine, slot: Slot, world: &mut Recorder) {
    m.resolve(
        slot,
        Resolution::Committed(Some(CommandResult::Done)),
        world,
    );
}

fn published(matched: usize) -> Resolution {
    Resolution::Published {
        matched,
        delivered: matched,
        queued: 0,
        refused: 0,
        committed: None,
    }
}

fn reason_of(packet: &Packet) -> ReasonCode {
    match packet {
        Packet::PubAck(a) => a.reason_code,
        Packet::PubRec(a) => a.reason_code,
        Packet::PubComp(a) => a.reason_code,
        Packet::Disconnect(d) => d.reason_code,
        Packet::ConnAck(c) => c.reason_code,
        other => panic!("no single reason code in {other:?}"),
    }
}

// ----- CONNECT -----

#[test]
fn mqtt_3_1_3_7_an_empty_client_id_is_assigned_to_v5_and_clean_v3_only() {
    let fresh = || "fresh".to_owned();
    let v5 = connect(ProtocolVersion::V5, "");
    let (id, assigned) = client_identifier(&v5, fresh).unwrap();
    assert_eq!((&*id, assigned.as_deref()), ("fresh", Some("fresh")));
    let clean_v3 = connect(ProtocolVersion::V3_1_1, "");
    assert!(client_identifier(&clean_v3, fresh).is_ok());
    let mut resumed_v3 = connect(ProtocolVersion::V3_1_1, "");
    resumed_v3.clean_start = false;
    assert_eq!(
        client_identifier(&resumed_v3, fresh).unwrap_err(),
        ReasonCode::ClientIdentifierNotValid
    );
    let v31 = connect(ProtocolVersion::V3_1, "");
    assert!(client_identifier(&v31, fresh).is_err(), "3.1 needs an id");
    let named = connect(ProtocolVersion::V5, "robot-7");
    assert_eq!(
        client_identifier(&named, fresh).unwrap(),
        (Arc::from("robot-7"), None)
    );
}

#[test]
fn enhanced_authentication_is_refused_with_bad_authentication_method() {
    let mut c = connect(ProtocolVersion::V5, "c");
    c.properties.authentication_method = Some("SCRAM-SHA-1".into());
    assert_eq!(
        client_identifier(&c, String::new).unwrap_err(),
        ReasonCode::BadAuthenticationMethod
    );
}

fn with_will(topic: &str, qos: QoS, retain: bool) -> Connect {
    let mut c = connect(ProtocolVersion::V5, "c");
    c.will = Some(LastWill {
        topic: topic.into(),
        payload: Bytes::from_static(b"gone"),
        qos,
        retain,
        properties: WillProperties {
            will_delay_interval: Some(5),
            ..Default::default()
        },
    });
    c
}

#[test]
fn a_will_is_validated_like_a_publish() {
    let mut cfg = MqttConfig::default();
    let id = || Arc::from("c");
    let ok = negotiate(
        &with_will("a/b", QoS::AtLeastOnce, true),
        &cfg,
        id(),
        None,
        |_| true,
    )
    .unwrap();
    let will = ok.will.expect("the will is kept");
    assert_eq!((&*will.message.topic, will.delay_secs), ("a/b", 5));
    let denied = negotiate(
        &with_will("a/b", QoS::AtMostOnce, false),
        &cfg,
        id(),
        None,
        |_| false,
    );
    assert_eq!(denied.unwrap_err(), ReasonCode::NotAuthorized);
    cfg.max_topic_levels = 2;
    let deep = negotiate(
        &with_will("a/b/c", QoS::AtMostOnce, false),
        &cfg,
        id(),
        None,
        |_| true,
    );
    assert_eq!(deep.unwrap_err(), ReasonCode::TopicNameInvalid);
    cfg = MqttConfig {
        max_qos: 1,
        retain_available: false,
        ..MqttConfig::default()
    };
    let qos2 = negotiate(
        &with_will("a", QoS::ExactlyOnce, false),
        &cfg,
        id(),
        None,
        |_| true,
    );
    assert_eq!(qos2.unwrap_err(), ReasonCode::QoSNotSupported);
    let retained = negotiate(
        &with_will("a", QoS::AtMostOnce, true),
        &cfg,
        id(),
        None,
        |_| true,
    );
    assert_eq!(retained.unwrap_err(), ReasonCode::RetainNotSupported);
}

#[test]
fn session_expiry_is_capped_and_the_connack_says_so() {
    let cfg = MqttConfig {
        max_session_expiry: Some(Duration::from_secs(100)),
        ..MqttConfig::default()
    };
    let mut c = connect(ProtocolVersion::V5, "c");
    c.properties.session_expiry_interval = Some(1_000);
    let n = negotiate(&c, &cfg, Arc::from("c"), None, |_| true).unwrap();
    assert_eq!((n.requested_expiry, n.expiry_secs), (1_000, 100));
    let Packet::ConnAck(ack) = connack(&c, &n, &cfg, false) else {
        panic!("not a CONNACK");
    };
    assert_eq!(ack.properties.session_expiry_interval, Some(100));
    assert_eq!(ack.properties.receive_maximum, Some(cfg.receive_maximum));
    // v3: clean session 0 means a session that does not expire (capped all the same).
    let mut v3 = connect(ProtocolVersion::V3_1_1, "c");
    v3.clean_start = false;
    let n = negotiate(&v3, &cfg, Arc::from("c"), None, |_| true).unwrap();
    assert_eq!(n.expiry_secs, 100);
    let Packet::ConnAck(ack) = connack(&v3, &n, &cfg, true) else {
        panic!("not a CONNACK");
    };
    assert!(ack.session_present);
    assert_eq!(
        ack.properties,
        ConnAckProperties::default(),
        "v3 has no properties"
    );
}

#[test]
fn mqtt_3_2_2_21_server_keep_alive_overrides_the_client_s_in_v5_only() {
    let cfg = MqttConfig {
        server_keep_alive: Some(30),
        max_keep_alive: 120,
        ..MqttConfig::default()
    };
    let mut c = connect(ProtocolVersion::V5, "c");
    c.keep_alive = 500;
    let n = negotiate(&c, &cfg, Arc::from("c"), None, |_| true).unwrap();
    assert_eq!(n.keep_alive_secs, 30);
    let Packet::ConnAck(ack) = connack(&c, &n, &cfg, false) else {
        panic!("not a CONNACK");
    };
    assert_eq!(ack.properties.server_keep_alive, Some(30));
    c.protocol = ProtocolVersion::V3_1_1;
    let n = negotiate(&c, &cfg, Arc::from("c"), None, |_| true).unwrap();
    assert_eq!(n.keep_alive_secs, 120, "v3: capped at max_keep_alive");
}

// ----- keep alive -----

#[test]
fn mqtt_3_1_2_24_silence_for_one_and_a_half_keep_alives_ends_the_connection() {
    let mut world = Recorder::default();
    let t0 = Instant::now();
    let mut c = connect(ProtocolVersion::V5, "c");
    c.keep_alive = 10;
    let mut m = machine_for(&c, &mut world, t0);
    assert_eq!(m.deadline(), Some(t0 + Duration::from_secs(15)));
    assert_eq!(m.timeout(t0 + Duration::from_secs(14), &mut world), None);
    m.seen(t0 + Duration::from_secs(14));
    assert_eq!(m.timeout(t0 + Duration::from_secs(20), &mut world), None);
    assert_eq!(
        m.timeout(t0 + Duration::from_secs(29), &mut world),
        Some(End::Abrupt)
    );
    assert_eq!(reason_of(&world.sent[0]), ReasonCode::KeepAliveTimeout);
}

#[test]
fn pingreq_is_answered() {
    let mut world = Recorder::default();
    let mut m = v3_machine(&mut world);
    assert_eq!(m.handle(Packet::PingReq, 0, &mut world), None);
    assert_eq!(world.take_sent(), vec![Packet::PingResp]);
}

// ----- inbound publishes -----

#[test]
fn a_qos1_puback_waits_for_the_publish_to_be_placed() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    m.handle(publish("a", QoS::AtLeastOnce, 1), 5, &mut world);
    assert!(world.sent.is_empty(), "no PUBACK before the outcome");
    let slot = publish_slot(&mut world);
    assert!(!m.at_rest());
    m.resolve(slot, published(1), &mut world);
    assert_eq!(
        world.take_sent(),
        vec![Packet::PubAck(PubAck::new(1, ReasonCode::Success))]
    );
    assert!(m.at_rest());
}

#[test]
fn acknowledgements_leave_in_the_order_the_publishes_arrived() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    m.handle(publish("a", QoS::AtLeastOnce, 1), 0, &mut world);
    let first = publish_slot(&mut world);
    // A duplicate QoS 2 publish is acknowledged at once, but not before the PUBACK.
    m.handle(publish("b", QoS::ExactlyOnce, 2), 0, &mut world);
    let second = publish_slot(&mut world);
    m.handle(publish("b", QoS::ExactlyOnce, 2), 0, &mut world);
    assert!(
        world.actions.is_empty(),
        "a duplicate is not dispatched again"
    );
    m.resolve(second, published(1), &mut world);
    assert!(world.sent.is_empty(), "the second waits for the first");
    m.resolve(first, published(1), &mut world);
    let ids: Vec<(u16, &str)> = world
        .take_sent()
        .iter()
        .map(|p| match p {
            Packet::PubAck(a) => (a.packet_id, "PUBACK"),
            Packet::PubRec(a) => (a.packet_id, "PUBREC"),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, vec![(1, "PUBACK"), (2, "PUBREC"), (2, "PUBREC")]);
}

#[test]
fn mqtt_4_3_3_a_qos2_flow_is_delivered_once_and_released_by_pubrel() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    m.handle(publish("t", QoS::ExactlyOnce, 9), 0, &mut world);
    let slot = publish_slot(&mut world);
    m.resolve(slot, published(1), &mut world);
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::Success);
    m.handle(publish("t", QoS::ExactlyOnce, 9), 0, &mut world);
    assert!(
        world.take_actions().is_empty(),
        "resent before PUBREL: not again"
    );
    assert_eq!(world.take_sent().len(), 1, "but acknowledged again");
    m.handle(
        Packet::PubRel(PubRel::new(9, ReasonCode::Success)),
        0,
        &mut world,
    );
    assert_eq!(
        world.take_sent(),
        vec![Packet::PubComp(PubComp::new(9, ReasonCode::Success))]
    );
    m.handle(publish("t", QoS::ExactlyOnce, 9), 0, &mut world);
    assert_eq!(
        world.take_actions().len(),
        1,
        "after PUBREL the id is new again"
    );
}

#[test]
fn a_persistent_session_s_pubcomp_waits_for_the_release_to_commit() {
    let mut world = Recorder::default();
    let mut m = persistent_machine(&mut world);
    m.handle(publish("t", QoS::ExactlyOnce, 3), 0, &mut world);
    match world.take_actions().as_slice() {
        [Action::Publish {
            inbound: Some(record),
            slot: Some(slot),
            ..
        }] => {
            assert_eq!((record.packet_id, record.connection_id), (3, 7));
            m.resolve(*slot, published(1), &mut world);
        }
        other => panic!("the identifier travels with the publish: {other:?}"),
    }
    world.take_sent();
    m.handle(
        Packet::PubRel(PubRel::new(3, ReasonCode::Success)),
        0,
        &mut world,
    );
    assert!(
        world.sent.is_empty(),
        "no PUBCOMP before the release commits"
    );
    let slot = match proposal(&mut world) {
        (Command::InboundQos2 { released, .. }, Some(slot)) => {
            assert_eq!(released, vec![3]);
            slot
        }
        other => panic!("{other:?}"),
    };
    done(&mut m, slot, &mut world);
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::Success);
}

#[test]
fn a_refused_qos2_commit_answers_an_error_and_frees_the_identifier() {
    let mut world = Recorder::default();
    let mut m = persistent_machine(&mut world);
    m.handle(publish("t", QoS::ExactlyOnce, 4), 0, &mut world);
    let slot = publish_slot(&mut world);
    let failed = Resolution::Published {
        matched: 1,
        delivered: 0,
        queued: 1,
        refused: 0,
        committed: Some(None),
    };
    assert_eq!(m.resolve(slot, failed, &mut world), None);
    assert_eq!(
        reason_of(&world.take_sent()[0]),
        ReasonCode::UnspecifiedError
    );
    assert!(
        matches!(
            world.take_actions().as_slice(),
            [Action::Propose { command: Command::InboundQos2 { released, .. }, slot: None, .. }] if released == &vec![4]
        ),
        "released in the replicated session too"
    );
    m.handle(publish("t", QoS::ExactlyOnce, 4), 0, &mut world);
    assert_eq!(
        world.take_actions().len(),
        1,
        "the identifier is free again"
    );
}

#[test]
fn a_v3_publisher_whose_message_cannot_be_committed_is_disconnected() {
    let mut world = Recorder::default();
    let mut m = v3_machine(&mut world);
    m.handle(publish("t", QoS::AtLeastOnce, 1), 0, &mut world);
    let slot = publish_slot(&mut world);
    let failed = Resolution::Published {
        matched: 1,
        delivered: 0,
        queued: 1,
        refused: 0,
        committed: Some(None),
    };
    assert_eq!(m.resolve(slot, failed, &mut world), Some(End::Abrupt));
    assert!(world.sent.is_empty(), "v3 cannot say why");
}

#[test]
fn v5_publish_reason_codes_say_no_subscribers_and_quota_exceeded() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    m.handle(publish("t", QoS::AtLeastOnce, 1), 0, &mut world);
    let slot = publish_slot(&mut world);
    m.resolve(slot, published(0), &mut world);
    assert_eq!(
        reason_of(&world.take_sent()[0]),
        ReasonCode::NoMatchingSubscribers
    );
    m.handle(publish("t", QoS::AtLeastOnce, 2), 0, &mut world);
    let slot = publish_slot(&mut world);
    let refused = Resolution::Published {
        matched: 2,
        delivered: 0,
        queued: 2,
        refused: 0,
        committed: Some(Some(CommandResult::Enqueued {
            accepted: 0,
            dropped: 2,
        })),
    };
    m.resolve(slot, refused, &mut world);
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::QuotaExceeded);
    // v3 has neither code: success.
    let mut world = Recorder::default();
    let mut m = v3_machine(&mut world);
    m.handle(publish("t", QoS::AtLeastOnce, 1), 0, &mut world);
    let slot = publish_slot(&mut world);
    m.resolve(slot, published(0), &mut world);
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::Success);
}

#[test]
fn mqtt_3_3_4_9_more_unacknowledged_publishes_than_receive_maximum_is_an_error() {
    let mut world = Recorder::default();
    world.cfg.receive_maximum = 2;
    let mut m = v5_machine(&mut world);
    m.handle(publish("a", QoS::AtLeastOnce, 1), 0, &mut world);
    m.handle(publish("a", QoS::ExactlyOnce, 2), 0, &mut world);
    m.handle(publish("a", QoS::AtMostOnce, 0), 0, &mut world);
    assert_eq!(world.take_actions().len(), 3, "QoS 0 does not count");
    assert_eq!(
        m.handle(publish("a", QoS::AtLeastOnce, 3), 0, &mut world),
        Some(End::Abrupt)
    );
    assert_eq!(
        reason_of(world.sent.last().unwrap()),
        ReasonCode::ReceiveMaximumExceeded
    );
}

#[test]
fn publishes_above_the_maximum_qos_or_retained_when_unavailable_are_errors() {
    let mut world = Recorder::default();
    world.cfg.max_qos = 1;
    world.cfg.retain_available = false;
    let mut m = v5_machine(&mut world);
    assert_eq!(
        m.handle(publish("a", QoS::ExactlyOnce, 1), 0, &mut world),
        Some(End::Abrupt)
    );
    assert_eq!(
        reason_of(&world.take_sent()[0]),
        ReasonCode::QoSNotSupported
    );
    let mut m = v5_machine(&mut world);
    let Packet::Publish(mut p) = publish("a", QoS::AtMostOnce, 0) else {
        unreachable!()
    };
    p.retain = true;
    assert_eq!(
        m.handle(Packet::Publish(p), 0, &mut world),
        Some(End::Abrupt)
    );
    assert_eq!(
        reason_of(&world.take_sent()[0]),
        ReasonCode::RetainNotSupported
    );
}

#[test]
fn mqtt_3_3_2_inbound_topic_aliases_are_set_used_and_checked() {
    let mut world = Recorder::default();
    world.cfg.topic_alias_maximum = 4;
    let mut m = v5_machine(&mut world);
    let aliased = |topic: &str, alias: u16| {
        let Packet::Publish(mut p) = publish(topic, QoS::AtMostOnce, 0) else {
            unreachable!()
        };
        p.properties.topic_alias = Some(alias);
        Packet::Publish(p)
    };
    m.handle(aliased("fleet/7/pose", 2), 0, &mut world);
    m.handle(aliased("", 2), 0, &mut world);
    let topics: Vec<String> = world
        .take_actions()
        .iter()
        .map(|a| match a {
            Action::Publish { message, .. } => message.topic.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(topics, vec!["fleet/7/pose", "fleet/7/pose"]);
    assert_eq!(m.handle(aliased("", 3), 0, &mut world), Some(End::Abrupt));
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::ProtocolError);
    let mut m = v5_machine(&mut world);
    assert_eq!(m.handle(aliased("x", 5), 0, &mut world), Some(End::Abrupt));
    assert_eq!(
        reason_of(&world.take_sent()[0]),
        ReasonCode::TopicAliasInvalid
    );
    let mut m = v5_machine(&mut world);
    assert_eq!(
        m.handle(publish("", QoS::AtMostOnce, 0), 0, &mut world),
        Some(End::Abrupt),
        "an empty topic needs an alias"
    );
}

#[test]
fn the_acl_refuses_a_v5_publish_with_not_authorized_and_drops_a_v3_one_quietly() {
    let mut world = Recorder {
        deny_publish: vec!["secret/"],
        ..Recorder::default()
    };
    let mut m = v5_machine(&mut world);
    m.handle(publish("secret/x", QoS::AtLeastOnce, 1), 0, &mut world);
    assert!(world.take_actions().is_empty(), "not dispatched");
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::NotAuthorized);
    m.handle(publish("secret/x", QoS::ExactlyOnce, 2), 0, &mut world);
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::NotAuthorized);
    m.handle(publish("secret/x", QoS::ExactlyOnce, 2), 0, &mut world);
    assert_eq!(
        reason_of(&world.take_sent()[0]),
        ReasonCode::NotAuthorized,
        "the v5 error PUBREC ended the flow: the id is not taken"
    );
    let mut m = v3_machine(&mut world);
    m.handle(publish("secret/x", QoS::AtLeastOnce, 1), 0, &mut world);
    assert!(world.take_actions().is_empty());
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::Success);
}

#[test]
fn a_topic_over_the_limits_is_refused_in_v5_and_closes_a_v3_connection() {
    let mut world = Recorder::default();
    world.cfg.max_topic_length = 8;
    let mut m = v5_machine(&mut world);
    assert_eq!(
        m.handle(publish("much/too/long", QoS::AtLeastOnce, 1), 0, &mut world),
        None
    );
    assert_eq!(
        reason_of(&world.take_sent()[0]),
        ReasonCode::TopicNameInvalid
    );
    let mut m = v3_machine(&mut world);
    assert_eq!(
        m.handle(publish("much/too/long", QoS::AtLeastOnce, 1), 0, &mut world),
        Some(End::Abrupt)
    );
}

// ----- subscriptions -----

fn suback_codes(world: &mut Recorder) -> Vec<ReasonCode> {
    match world.take_sent().as_slice() {
        [Packet::SubAck(ack)] => ack.reason_codes.clone(),
        other => panic!("expected one SUBACK, got {other:?}"),
    }
}

#[test]
fn a_suback_grants_the_committed_qos_capped_by_the_maximum() {
    let mut world = Recorder::default();
    world.cfg.max_qos = 1;
    let mut m = v5_machine(&mut world);
    m.handle(
        subscribe(5, &[("a/#", QoS::ExactlyOnce), ("b", QoS::AtMostOnce)]),
        0,
        &mut world,
    );
    assert!(world.sent.is_empty(), "SUBACK after the commit");
    let slot = match world.take_actions().as_slice() {
        [Action::Subscribe {
            command: Command::Subscribe { entries, .. },
            slot,
        }] => {
            assert_eq!(entries[0].1.qos, 1, "capped at the broker's maximum");
            *slot
        }
        other => panic!("{other:?}"),
    };
    let result = CommandResult::Subscribed(vec![false, true]);
    m.resolve(slot, Resolution::Committed(Some(result)), &mut world);
    assert_eq!(
        suback_codes(&mut world),
        vec![ReasonCode::GrantedQoS1, ReasonCode::GrantedQoS0]
    );
    match world.take_actions().as_slice() {
        [Action::Retained { existed, .. }] => assert_eq!(existed, &vec![false, true]),
        other => panic!("retained messages follow the SUBACK: {other:?}"),
    }
}

#[test]
fn subscription_refusals_have_v5_reason_codes_and_v3_failure() {
    let mut world = Recorder {
        deny_subscribe: vec!["private"],
        ..Recorder::default()
    };
    world.cfg.wildcard_subscription_available = false;
    world.cfg.shared_subscription_available = false;
    let filters = [
        ("a/#/b", QoS::AtMostOnce),
        ("a/+", QoS::AtMostOnce),
        ("$share/g/a", QoS::AtMostOnce),
        ("private", QoS::AtMostOnce),
    ];
    let mut m = v5_machine(&mut world);
    m.handle(subscribe(1, &filters), 0, &mut world);
    assert!(world.take_actions().is_empty(), "nothing to commit");
    assert_eq!(
        suback_codes(&mut world),
        vec![
            ReasonCode::TopicFilterInvalid,
            ReasonCode::WildcardSubscriptionsNotSupported,
            ReasonCode::SharedSubscriptionsNotSupported,
            ReasonCode::NotAuthorized,
        ]
    );
    let mut m = v3_machine(&mut world);
    m.handle(subscribe(1, &filters), 0, &mut world);
    assert_eq!(
        suback_codes(&mut world),
        vec![ReasonCode::UnspecifiedError; 4],
        "v3 has one failure code, 0x80"
    );
}

#[test]
fn mqtt_3_8_3_4_no_local_on_a_shared_subscription_is_a_protocol_error() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    let Packet::Subscribe(mut sub) = subscribe(1, &[("$share/g/a", QoS::AtMostOnce)]) else {
        unreachable!()
    };
    sub.filters[0].1.no_local = true;
    assert_eq!(
        m.handle(Packet::Subscribe(sub), 0, &mut world),
        Some(End::Abrupt)
    );
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::ProtocolError);
}

#[test]
fn subscription_identifiers_when_unavailable_end_the_connection() {
    let mut world = Recorder::default();
    world.cfg.subscription_identifier_available = false;
    let mut m = v5_machine(&mut world);
    let Packet::Subscribe(mut sub) = subscribe(1, &[("a", QoS::AtMostOnce)]) else {
        unreachable!()
    };
    sub.properties.subscription_identifier = Some(3);
    assert_eq!(
        m.handle(Packet::Subscribe(sub), 0, &mut world),
        Some(End::Abrupt)
    );
    assert_eq!(
        reason_of(&world.take_sent()[0]),
        ReasonCode::SubscriptionIdentifiersNotSupported
    );
}

#[test]
fn subscriptions_beyond_the_per_client_maximum_get_quota_exceeded() {
    let mut world = Recorder {
        subscriptions: vec!["x".into()],
        ..Recorder::default()
    };
    world.cfg.max_subscriptions_per_client = 2;
    let mut m = v5_machine(&mut world);
    m.handle(
        subscribe(1, &[("a", QoS::AtMostOnce), ("b", QoS::AtMostOnce)]),
        0,
        &mut world,
    );
    let slot = match world.take_actions().as_slice() {
        [Action::Subscribe { slot, .. }] => *slot,
        other => panic!("{other:?}"),
    };
    let result = CommandResult::Subscribed(vec![false]);
    m.resolve(slot, Resolution::Committed(Some(result)), &mut world);
    assert_eq!(
        suback_codes(&mut world),
        vec![ReasonCode::GrantedQoS0, ReasonCode::QuotaExceeded]
    );
}

#[test]
fn subscribing_again_to_a_filter_held_already_is_not_a_new_subscription_for_the_maximum() {
    let mut world = Recorder {
        subscriptions: vec!["x".into(), "a".into()],
        ..Recorder::default()
    };
    world.cfg.max_subscriptions_per_client = 2;
    let mut m = v5_machine(&mut world);
    m.handle(
        subscribe(
            1,
            &[
                ("a", QoS::AtLeastOnce),
                ("x", QoS::AtMostOnce),
                ("b", QoS::AtMostOnce),
            ],
        ),
        0,
        &mut world,
    );
    let slot = match world.take_actions().as_slice() {
        [Action::Subscribe { slot, .. }] => *slot,
        other => panic!("{other:?}"),
    };
    let result = CommandResult::Subscribed(vec![true, true]);
    m.resolve(slot, Resolution::Committed(Some(result)), &mut world);
    assert_eq!(
        suback_codes(&mut world),
        vec![
            ReasonCode::GrantedQoS1,
            ReasonCode::GrantedQoS0,
            ReasonCode::QuotaExceeded
        ]
    );
}

#[test]
fn a_subscribe_that_does_not_commit_is_answered_with_failure() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    m.handle(subscribe(1, &[("a", QoS::AtLeastOnce)]), 0, &mut world);
    let actions = world.take_actions();
    let [Action::Subscribe { slot, .. }] = actions.as_slice() else {
        panic!("no subscribe asked for");
    };
    m.resolve(*slot, Resolution::Committed(None), &mut world);
    assert_eq!(suback_codes(&mut world), vec![ReasonCode::UnspecifiedError]);
    assert!(world.take_actions().is_empty(), "no retained messages then");
}

#[test]
fn an_unsuback_says_which_filters_existed_and_v3_unsubscribes_are_not_refusable() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    let unsub = |filters: &[&str]| {
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 4,
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
            properties: UnsubscribeProperties::default(),
        })
    };
    m.handle(unsub(&["a", "b"]), 0, &mut world);
    let slot = match world.take_actions().as_slice() {
        [Action::Propose {
            command: Command::Unsubscribe { .. },
            refusable: true,
            slot: Some(slot),
        }] => *slot,
        other => panic!("{other:?}"),
    };
    let result = CommandResult::Unsubscribed(vec![true, false]);
    m.resolve(slot, Resolution::Committed(Some(result)), &mut world);
    match world.take_sent().as_slice() {
        [Packet::UnsubAck(ack)] => assert_eq!(
            ack.reason_codes,
            vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted]
        ),
        other => panic!("{other:?}"),
    }
    let mut m = v3_machine(&mut world);
    m.handle(unsub(&["a"]), 0, &mut world);
    assert!(matches!(
        world.take_actions().as_slice(),
        [Action::Propose {
            refusable: false,
            ..
        }]
    ));
}

// ----- outbound -----

#[test]
fn the_outbound_window_holds_the_client_s_receive_maximum_and_the_rest_waits() {
    let mut world = Recorder::default();
    let mut c = connect(ProtocolVersion::V5, "c");
    c.properties.receive_maximum = Some(2);
    let mut m = machine_for(&c, &mut world, Instant::now());
    for _ in 0..4 {
        m.deliver(delivery("t", 1), 0, &mut world);
    }
    let ids: Vec<u16> = world
        .take_sent()
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => p.packet_id.unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids.len(), 2, "two in flight at most");
    m.handle(
        Packet::PubAck(PubAck::new(ids[0], ReasonCode::Success)),
        0,
        &mut world,
    );
    assert_eq!(
        world.take_sent().len(),
        1,
        "an acknowledgement lets one more out"
    );
    assert_eq!(m.inflight(), 2);
}

#[test]
fn deliveries_beyond_the_pending_bound_are_dropped() {
    let mut world = Recorder::default();
    world.cfg.max_queued_messages = 1;
    let mut c = connect(ProtocolVersion::V5, "c");
    c.properties.receive_maximum = Some(1);
    let mut m = machine_for(&c, &mut world, Instant::now());
    for _ in 0..3 {
        m.deliver(delivery("t", 1), 0, &mut world);
    }
    assert_eq!(world.take_sent().len(), 1);
    assert_eq!(world.dropped, vec!["queue_full"]);
}

#[test]
fn mqtt_4_3_3_an_outbound_qos2_flow_goes_publish_pubrec_pubrel_pubcomp() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    m.deliver(delivery("t", 2), 0, &mut world);
    let id = match world.take_sent().as_slice() {
        [Packet::Publish(p)] => p.packet_id.unwrap(),
        other => panic!("{other:?}"),
    };
    m.handle(
        Packet::PubComp(PubComp::new(id, ReasonCode::Success)),
        0,
        &mut world,
    );
    assert_eq!(m.inflight(), 1, "PUBCOMP before PUBREC is ignored");
    m.handle(
        Packet::PubRec(PubRec::new(id, ReasonCode::Success)),
        0,
        &mut world,
    );
    assert_eq!(
        world.take_sent(),
        vec![Packet::PubRel(PubRel::new(id, ReasonCode::Success))]
    );
    m.handle(
        Packet::PubComp(PubComp::new(id, ReasonCode::Success)),
        0,
        &mut world,
    );
    assert_eq!(m.inflight(), 0);
}

#[test]
fn a_pubrec_with_an_error_ends_the_outbound_flow() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    m.deliver(delivery("t", 2), 0, &mut world);
    let Packet::Publish(p) = &world.take_sent()[0] else {
        panic!("no PUBLISH")
    };
    let id = p.packet_id.unwrap();
    m.handle(
        Packet::PubRec(PubRec::new(id, ReasonCode::QuotaExceeded)),
        0,
        &mut world,
    );
    assert!(world.take_sent().is_empty(), "no PUBREL");
    assert_eq!(m.inflight(), 0);
}

fn queued(seq: u64, topic: &str) -> QueuedMessage {
    QueuedMessage {
        seq,
        message: Arc::new(message(topic)),
        qos: 2,
        retain: false,
        subscription_ids: Default::default(),
    }
}

#[test]
fn a_queued_qos2_message_s_pubrel_waits_for_its_pubrec_to_commit() {
    let mut world = Recorder {
        queue: vec![queued(0, "q")],
        ..Recorder::default()
    };
    let mut m = persistent_machine(&mut world);
    let id = match world.take_sent().as_slice() {
        [Packet::Publish(p)] => p.packet_id.unwrap(),
        other => panic!("the queue is sent at start: {other:?}"),
    };
    assert_eq!(id, SessionRecord::packet_id_for(0));
    m.handle(
        Packet::PubRec(PubRec::new(id, ReasonCode::Success)),
        0,
        &mut world,
    );
    assert!(world.sent.is_empty(), "no PUBREL yet");
    m.commit_acks(&mut world);
    let slot = match proposal(&mut world) {
        (Command::Ack { received, .. }, Some(slot)) => {
            assert_eq!(received, vec![0]);
            slot
        }
        other => panic!("{other:?}"),
    };
    done(&mut m, slot, &mut world);
    assert_eq!(
        world.take_sent(),
        vec![Packet::PubRel(PubRel::new(id, ReasonCode::Success))]
    );
}

#[test]
fn a_resumed_session_resends_with_dup_and_pubrels_what_awaited_pubcomp() {
    let mut world = Recorder {
        queue: vec![queued(5, "q"), queued(6, "q")],
        awaiting_pubcomp: vec![4],
        ..Recorder::default()
    };
    let mut c = connect(ProtocolVersion::V5, "c");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(60);
    let n = negotiate(&c, &world.cfg, Arc::from("c"), None, |_| true).unwrap();
    let mut m = Machine::new(&c, &n, &world.cfg, resumed(6), Instant::now());
    m.start(true, 0, &mut world);
    let sent = world.take_sent();
    assert_eq!(
        sent[0],
        Packet::PubRel(PubRel::new(
            SessionRecord::packet_id_for(4),
            ReasonCode::Success
        ))
    );
    let dups: Vec<bool> = sent[1..]
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => p.dup,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(dups, vec![true, false], "sent before: DUP; never sent: not");
}

#[test]
fn mqtt_3_1_2_4_a_session_resumed_without_expiry_drains_only_its_old_queue() {
    let mut world = Recorder {
        queue: vec![queued(0, "q"), queued(1, "q")],
        ..Recorder::default()
    };
    let mut c = connect(ProtocolVersion::V5, "c");
    c.clean_start = false;
    let n = negotiate(&c, &world.cfg, Arc::from("c"), None, |_| true).unwrap();
    assert_eq!(n.expiry_secs, 0);
    let mut m = Machine::new(&c, &n, &world.cfg, resumed(1), Instant::now());
    m.start(true, 0, &mut world);
    assert_eq!(
        world.take_sent().len(),
        1,
        "what was queued before it resumed"
    );
}

#[test]
fn expired_messages_are_dropped_and_the_rest_carry_their_remaining_expiry() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    let mut msg = message("t");
    msg.properties.message_expiry_interval = Some(10);
    let d = Delivery {
        message: Arc::new(msg),
        ..delivery("t", 0)
    };
    m.deliver(d.clone(), 1_000 + 4_500, &mut world);
    match world.take_sent().as_slice() {
        [Packet::Publish(p)] => assert_eq!(p.properties.message_expiry_interval, Some(6)),
        other => panic!("{other:?}"),
    }
    m.deliver(d, 1_000 + 10_000, &mut world);
    assert!(world.take_sent().is_empty());
    assert_eq!(world.dropped, vec!["expired"]);
}

#[test]
fn mqtt_3_1_2_25_a_message_larger_than_the_client_s_maximum_is_not_sent() {
    let mut world = Recorder::default();
    let mut c = connect(ProtocolVersion::V5, "c");
    c.properties.maximum_packet_size = Some(10);
    let mut m = machine_for(&c, &mut world, Instant::now());
    m.deliver(delivery("a/long/topic/name", 1), 0, &mut world);
    assert!(world.take_sent().is_empty());
    assert_eq!(world.dropped, vec!["too_large"]);
    assert_eq!(m.inflight(), 0, "as if acknowledged");
}

#[test]
fn outbound_topic_aliases_replace_a_repeated_topic() {
    let mut world = Recorder::default();
    let mut c = connect(ProtocolVersion::V5, "c");
    c.properties.topic_alias_maximum = Some(5);
    let mut m = machine_for(&c, &mut world, Instant::now());
    m.deliver(delivery("fleet/robot-7/pose", 0), 0, &mut world);
    m.deliver(delivery("fleet/robot-7/pose", 0), 0, &mut world);
    let sent: Vec<(String, Option<u16>)> = world
        .take_sent()
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => (p.topic.clone(), p.properties.topic_alias),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(sent[0], ("fleet/robot-7/pose".into(), Some(1)));
    assert_eq!(sent[1], (String::new(), Some(1)));
}

#[test]
fn a_filtered_subscription_turns_on_per_delivery_acl_checks() {
    let mut world = Recorder {
        acl: true,
        filtered_subscribe: vec!["#"],
        deny_read: vec!["secret/"],
        ..Recorder::default()
    };
    let mut m = v5_machine(&mut world);
    m.deliver(delivery("secret/a", 0), 0, &mut world);
    assert_eq!(world.take_sent().len(), 1, "no filtered subscription yet");
    m.handle(subscribe(1, &[("#", QoS::AtMostOnce)]), 0, &mut world);
    world.take_actions();
    m.deliver(delivery("secret/a", 0), 0, &mut world);
    m.deliver(delivery("public/a", 0), 0, &mut world);
    assert_eq!(world.take_sent().len(), 1, "only the readable one");
    assert_eq!(world.dropped, vec!["acl"]);
}

// ----- session end -----

#[test]
fn takeover_shutdown_and_kicks_tell_a_v5_client_why() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    assert_eq!(m.taken_over(&mut world), End::TakenOver);
    assert_eq!(m.shutting_down(&mut world), End::Shutdown);
    assert_eq!(
        m.kicked(ReasonCode::AdministrativeAction, &mut world),
        End::Abrupt
    );
    let codes: Vec<ReasonCode> = world.take_sent().iter().map(reason_of).collect();
    assert_eq!(
        codes,
        vec![
            ReasonCode::SessionTakenOver,
            ReasonCode::ServerShuttingDown,
            ReasonCode::AdministrativeAction
        ]
    );
    let mut m = v3_machine(&mut world);
    assert_eq!(m.taken_over(&mut world), End::TakenOver);
    assert!(
        world.take_sent().is_empty(),
        "v3 has no DISCONNECT from the server"
    );
}

#[test]
fn mqtt_3_14_2_session_expiry_cannot_be_set_at_disconnect_after_zero() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    let mut d = Disconnect {
        reason_code: ReasonCode::Success,
        properties: DisconnectProperties::default(),
    };
    d.properties.session_expiry_interval = Some(30);
    assert_eq!(
        m.handle(Packet::Disconnect(d.clone()), 0, &mut world),
        Some(End::Abrupt)
    );
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::ProtocolError);
    let mut m = persistent_machine(&mut world);
    assert_eq!(
        m.handle(Packet::Disconnect(d), 0, &mut world),
        Some(End::Graceful)
    );
    assert_eq!(m.expiry_update(), Some(30));
}

#[test]
fn a_disconnect_with_will_message_is_abrupt_and_server_packets_are_errors() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    let d = Disconnect {
        reason_code: ReasonCode::DisconnectWithWillMessage,
        properties: DisconnectProperties::default(),
    };
    assert_eq!(
        m.handle(Packet::Disconnect(d), 0, &mut world),
        Some(End::Abrupt)
    );
    let mut m = v5_machine(&mut world);
    assert_eq!(m.handle(Packet::PingResp, 0, &mut world), Some(End::Abrupt));
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::ProtocolError);
}

#[test]
fn unsent_transient_deliveries_are_handed_back_at_the_end() {
    let mut world = Recorder::default();
    let mut c = connect(ProtocolVersion::V5, "c");
    c.properties.receive_maximum = Some(1);
    let mut m = machine_for(&c, &mut world, Instant::now());
    m.deliver(delivery("a", 1), 0, &mut world);
    m.deliver(delivery("b", 1), 0, &mut world);
    let topics: Vec<String> = m
        .take_unsent()
        .iter()
        .map(|d| d.message.topic.to_string())
        .collect();
    assert_eq!(topics, vec!["a", "b"], "in flight, then waiting");
}

#[test]
fn a_parked_machine_comes_back_with_its_aliases_and_qos2_identifiers() {
    let mut world = Recorder::default();
    world.cfg.topic_alias_maximum = 4;
    let mut m = v5_machine(&mut world);
    let Packet::Publish(mut p) = publish("fleet/a", QoS::AtMostOnce, 0) else {
        unreachable!()
    };
    p.properties.topic_alias = Some(1);
    m.handle(Packet::Publish(p), 0, &mut world);
    world.take_actions();
    assert!(m.at_rest());
    let mut m = Machine::unpark(m.park(), &world.cfg);
    let Packet::Publish(mut p) = publish("", QoS::AtMostOnce, 0) else {
        unreachable!()
    };
    p.properties.topic_alias = Some(1);
    assert_eq!(m.handle(Packet::Publish(p), 0, &mut world), None);
    assert!(matches!(
        world.take_actions().as_slice(),
        [Action::Publish { message, .. }] if &*message.topic == "fleet/a"
    ));
}

#[test]
fn a_refusal_waiting_behind_a_puback_does_not_count_as_an_answered_qos1_publish() {
    let mut world = Recorder {
        deny_publish: vec!["secret"],
        ..Recorder::default()
    };
    world.cfg.receive_maximum = 2;
    let mut m = v5_machine(&mut world);
    m.handle(publish("a", QoS::AtLeastOnce, 1), 0, &mut world);
    let slot = publish_slot(&mut world);
    // Refused at once, but sent only after the PUBACK before it.
    m.handle(publish("secret", QoS::AtLeastOnce, 2), 0, &mut world);
    assert!(world.sent.is_empty());
    m.resolve(slot, published(1), &mut world);
    assert_eq!(world.take_sent().len(), 2);
    assert!(m.at_rest());
    // Two more may be outstanding again.
    m.handle(publish("a", QoS::AtLeastOnce, 3), 0, &mut world);
    m.handle(publish("a", QoS::AtLeastOnce, 4), 0, &mut world);
    assert_eq!(world.take_actions().len(), 2);
    assert!(world.sent.is_empty(), "no violation");
}

#[test]
fn a_retained_publish_past_the_retained_limit_is_refused_with_quota_exceeded_in_v5_only() {
    let mut world = Recorder {
        retained_full: true,
        retained_topics: vec!["kept"],
        ..Recorder::default()
    };
    let mut m = v5_machine(&mut world);
    let mut p = publish("new", QoS::AtLeastOnce, 1);
    if let Packet::Publish(p) = &mut p {
        p.retain = true;
    }
    m.handle(p, 0, &mut world);
    assert!(
        world
            .actions
            .iter()
            .all(|a| !matches!(a, Action::Publish { .. })),
        "not dispatched"
    );
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::QuotaExceeded);
    assert_eq!(world.dropped, vec!["retained_quota"]);
    // A topic that holds one already: replaced, as usual.
    let mut p = publish("kept", QoS::AtLeastOnce, 2);
    if let Packet::Publish(p) = &mut p {
        p.retain = true;
    }
    m.handle(p, 0, &mut world);
    publish_slot(&mut world);
    // Not retained: delivered as usual.
    m.handle(publish("new", QoS::AtLeastOnce, 3), 0, &mut world);
    publish_slot(&mut world);

    let mut world = Recorder {
        retained_full: true,
        ..Recorder::default()
    };
    let mut m = v3_machine(&mut world);
    let mut p = publish("new", QoS::AtLeastOnce, 1);
    if let Packet::Publish(p) = &mut p {
        p.retain = true;
    }
    m.handle(p, 0, &mut world);
    assert!(world
        .actions
        .iter()
        .all(|a| !matches!(a, Action::Publish { .. })));
    assert_eq!(
        reason_of(&world.take_sent()[0]),
        ReasonCode::Success,
        "3.1.1 has no code for it"
    );
}

#[test]
fn a_message_the_full_node_queues_kept_from_everyone_is_quota_exceeded_in_v5() {
    let mut world = Recorder::default();
    let mut m = v5_machine(&mut world);
    m.handle(publish("t", QoS::AtLeastOnce, 1), 0, &mut world);
    let slot = publish_slot(&mut world);
    let refused = Resolution::Published {
        matched: 1,
        delivered: 0,
        queued: 0,
        refused: 1,
        committed: None,
    };
    m.resolve(slot, refused, &mut world);
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::QuotaExceeded);
    // Delivered to someone online: accepted.
    m.handle(publish("t", QoS::AtLeastOnce, 2), 0, &mut world);
    let slot = publish_slot(&mut world);
    let partly = Resolution::Published {
        matched: 2,
        delivered: 1,
        queued: 0,
        refused: 1,
        committed: None,
    };
    m.resolve(slot, partly, &mut world);
    assert_eq!(reason_of(&world.take_sent()[0]), ReasonCode::Success);
}
