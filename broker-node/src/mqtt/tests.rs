//! Byte-exact encode/decode tests for every packet type in 3.1.1 and 5.0, the
//! malformations the specification names, and property-based round trips.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;
const MAX: u32 = 268_435_455;

/// Decode `bytes` completely as one packet in `v`.
fn dec(bytes: &[u8], v: Option<ProtocolVersion>) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let p = decode(&mut buf, v, MAX)?;
    if p.is_some() {
        assert!(buf.is_empty(), "decode must consume exactly one frame");
    }
    Ok(p)
}

/// `packet` encodes to exactly `bytes` and `bytes` decode to `packet`.
fn exact(packet: Packet, v: ProtocolVersion, bytes: &[u8]) {
    let mut out = BytesMut::new();
    encode(&packet, v, &mut out).unwrap();
    assert_eq!(&out[..], bytes, "encoding of {packet:?}");
    assert_eq!(packet.encoded_len(v), bytes.len());
    let version = if matches!(packet, Packet::Connect(_)) {
        None
    } else {
        Some(v)
    };
    assert_eq!(dec(bytes, version).unwrap(), Some(packet));
}

fn reject(bytes: &[u8], v: Option<ProtocolVersion>) -> DecodeError {
    match dec(bytes, v) {
        Err(e) => e,
        other => panic!("{bytes:02x?} should be rejected, got {other:?}"),
    }
}

#[test]
fn connect_v311_with_will_user_and_password() {
    let p = Packet::Connect(Box::new(Connect {
        protocol: V3,
        clean_start: true,
        keep_alive: 60,
        client_id: "r7".into(),
        will: Some(LastWill {
            topic: "s".into(),
            payload: Bytes::from_static(b"off"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: WillProperties::default(),
        }),
        username: Some("u".into()),
        password: Some(Bytes::from_static(b"p")),
        properties: ConnectProperties::default(),
    }));
    #[rustfmt::skip]
    let bytes = [
        0x10, 28,                         // CONNECT, remaining length
        0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name
        0x04,                             // level 4 (3.1.1)
        0b1110_1110,                      // user, password, will retain, will QoS 1, will, clean
        0x00, 60,                         // keep alive
        0x00, 0x02, b'r', b'7',           // client id
        0x00, 0x01, b's',                 // will topic
        0x00, 0x03, b'o', b'f', b'f',     // will payload
        0x00, 0x01, b'u',                 // user name
        0x00, 0x01, b'p',                 // password
    ];
    exact(p, V3, &bytes);
}

#[test]
fn connect_v31_uses_mqisdp() {
    let p = Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V3_1,
        clean_start: true,
        keep_alive: 10,
        client_id: "a".into(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }));
    #[rustfmt::skip]
    let bytes = [
        0x10, 15,
        0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', // protocol name
        0x03,                                         // level 3
        0x02,                                         // clean session
        0x00, 10,                                     // keep alive
        0x00, 0x01, b'a',                             // client id
    ];
    exact(p, ProtocolVersion::V3_1, &bytes);
}

#[test]
fn connect_v5_with_properties_and_will_properties() {
    let p = Packet::Connect(Box::new(Connect {
        protocol: V5,
        clean_start: false,
        keep_alive: 30,
        client_id: "c".into(),
        will: Some(LastWill {
            topic: "w".into(),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: WillProperties {
                will_delay_interval: Some(5),
                ..Default::default()
            },
        }),
        username: None,
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(20),
            ..Default::default()
        },
    }));
    #[rustfmt::skip]
    let bytes = [
        0x10, 33,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, // name, level 5
        0b0000_0100,                              // will flag only
        0x00, 30,                                 // keep alive
        8,                                        // properties length
        0x11, 0x00, 0x00, 0x0E, 0x10,             // session expiry 3600
        0x21, 0x00, 20,                           // receive maximum 20
        0x00, 0x01, b'c',                         // client id
        5, 0x18, 0x00, 0x00, 0x00, 0x05,          // will properties: delay 5
        0x00, 0x01, b'w',                         // will topic
        0x00, 0x00,                               // empty will payload
    ];
    exact(p, V5, &bytes);
}

#[test]
fn connack_both_versions() {
    let ok = ConnAck {
        session_present: true,
        reason_code: ReasonCode::Success,
        properties: ConnAckProperties::default(),
    };
    exact(Packet::ConnAck(ok.clone()), V3, &[0x20, 2, 0x01, 0x00]);
    // v3 return code 5 (not authorized) stands for v5's 0x87.
    let refused = ConnAck {
        session_present: false,
        reason_code: ReasonCode::NotAuthorized,
        properties: ConnAckProperties::default(),
    };
    exact(Packet::ConnAck(refused.clone()), V3, &[0x20, 2, 0x00, 0x05]);
    exact(Packet::ConnAck(refused), V5, &[0x20, 3, 0x00, 0x87, 0x00]);
    let with_props = ConnAck {
        properties: ConnAckProperties {
            receive_maximum: Some(1024),
            topic_alias_maximum: Some(10),
            ..Default::default()
        },
        ..ok
    };
    #[rustfmt::skip]
    let bytes = [
        0x20, 9,
        0x01, 0x00,        // session present, success
        6,                 // properties length
        0x21, 0x04, 0x00,  // receive maximum 1024
        0x22, 0x00, 10,    // topic alias maximum 10
    ];
    exact(Packet::ConnAck(with_props), V5, &bytes);
}

#[test]
fn publish_qos0_and_qos1_both_versions() {
    let p0 = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: true,
        topic: "a/b".into(),
        packet_id: None,
        properties: PublishProperties::default(),
        payload: Bytes::from_static(b"hi"),
    };
    // 0x31: PUBLISH, retain. topic a/b, payload "hi".
    exact(
        Packet::Publish(p0.clone()),
        V3,
        &[0x31, 7, 0, 3, b'a', b'/', b'b', b'h', b'i'],
    );
    // v5 adds an empty property block.
    exact(
        Packet::Publish(p0),
        V5,
        &[0x31, 8, 0, 3, b'a', b'/', b'b', 0, b'h', b'i'],
    );
    let p1 = Publish {
        dup: true,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "t".into(),
        packet_id: Some(10),
        properties: PublishProperties {
            message_expiry_interval: Some(60),
            subscription_identifiers: vec![3],
            ..Default::default()
        },
        payload: Bytes::new(),
    };
    #[rustfmt::skip]
    let bytes = [
        0x3A, 13,                       // PUBLISH, DUP, QoS 1
        0x00, 0x01, b't',               // topic
        0x00, 10,                       // packet id
        7,                              // properties length
        0x02, 0x00, 0x00, 0x00, 60,     // message expiry 60
        0x0B, 3,                        // subscription identifier 3
    ];
    exact(Packet::Publish(p1), V5, &bytes);
}

#[test]
fn acks_use_short_forms_in_v5() {
    exact(
        Packet::PubAck(PubAck::new(7, ReasonCode::Success)),
        V3,
        &[0x40, 2, 0, 7],
    );
    exact(
        Packet::PubAck(PubAck::new(7, ReasonCode::Success)),
        V5,
        &[0x40, 2, 0, 7],
    );
    exact(
        Packet::PubAck(PubAck::new(7, ReasonCode::NoMatchingSubscribers)),
        V5,
        &[0x40, 3, 0, 7, 0x10],
    );
    exact(
        Packet::PubRec(PubRec::new(1, ReasonCode::Success)),
        V3,
        &[0x50, 2, 0, 1],
    );
    exact(
        Packet::PubRel(PubRel::new(1, ReasonCode::Success)),
        V3,
        &[0x62, 2, 0, 1],
    );
    exact(
        Packet::PubComp(PubComp::new(1, ReasonCode::Success)),
        V5,
        &[0x70, 2, 0, 1],
    );
    let mut with_reason = PubRec::new(2, ReasonCode::UnspecifiedError);
    with_reason.properties.reason_string = Some("x".into());
    #[rustfmt::skip]
    let bytes = [0x50, 8, 0, 2, 0x80, 4, 0x1F, 0, 1, b'x']; // id, reason, properties
    exact(Packet::PubRec(with_reason), V5, &bytes);
}

#[test]
fn subscribe_and_suback_both_versions() {
    let opts = SubscriptionOptions {
        qos: QoS::ExactlyOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::SendAtSubscribe,
    };
    let s = Subscribe {
        packet_id: 1,
        filters: vec![("a/+".into(), opts)],
        properties: SubscribeProperties::default(),
    };
    exact(
        Packet::Subscribe(s.clone()),
        V3,
        &[0x82, 8, 0, 1, 0, 3, b'a', b'/', b'+', 2],
    );
    let s5 = Subscribe {
        filters: vec![(
            "a".into(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
        )],
        properties: SubscribeProperties {
            subscription_identifier: Some(42),
            user_properties: vec![],
        },
        ..s
    };
    #[rustfmt::skip]
    let bytes = [
        0x82, 9,
        0, 1,             // packet id
        2, 0x0B, 42,      // properties: subscription identifier 42
        0, 1, b'a',       // filter
        0b0010_1101,      // retain handling 2, RAP, no local, QoS 1
    ];
    exact(Packet::Subscribe(s5), V5, &bytes);
    let ack = SubAck {
        packet_id: 1,
        reason_codes: vec![ReasonCode::GrantedQoS2, ReasonCode::TopicFilterInvalid],
        properties: AckProperties::default(),
    };
    exact(
        Packet::SubAck(ack.clone()),
        V5,
        &[0x90, 5, 0, 1, 0, 2, 0x8F],
    );
    // v3.1.1 has only 0x80 for failures.
    let mut out = BytesMut::new();
    encode(&Packet::SubAck(ack), V3, &mut out).unwrap();
    assert_eq!(&out[..], &[0x90, 4, 0, 1, 2, 0x80]);
}

#[test]
fn unsubscribe_and_unsuback_both_versions() {
    let u = Unsubscribe {
        packet_id: 2,
        filters: vec!["a".into()],
        properties: UnsubscribeProperties::default(),
    };
    exact(
        Packet::Unsubscribe(u.clone()),
        V3,
        &[0xA2, 5, 0, 2, 0, 1, b'a'],
    );
    exact(Packet::Unsubscribe(u), V5, &[0xA2, 6, 0, 2, 0, 0, 1, b'a']);
    exact(
        Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            reason_codes: vec![],
            properties: AckProperties::default(),
        }),
        V3,
        &[0xB0, 2, 0, 2],
    );
    exact(
        Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            reason_codes: vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted],
            properties: AckProperties::default(),
        }),
        V5,
        &[0xB0, 5, 0, 2, 0, 0x00, 0x11],
    );
}

#[test]
fn ping_disconnect_and_auth() {
    exact(Packet::PingReq, V3, &[0xC0, 0]);
    exact(Packet::PingResp, V5, &[0xD0, 0]);
    let normal = Disconnect {
        reason_code: ReasonCode::Success,
        properties: DisconnectProperties::default(),
    };
    exact(Packet::Disconnect(normal.clone()), V3, &[0xE0, 0]);
    exact(Packet::Disconnect(normal), V5, &[0xE0, 0]);
    exact(
        Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::SessionTakenOver,
            properties: DisconnectProperties::default(),
        }),
        V5,
        &[0xE0, 1, 0x8E],
    );
    exact(
        Packet::Auth(Auth {
            reason_code: ReasonCode::ContinueAuthentication,
            properties: AuthProperties {
                authentication_method: Some("m".into()),
                ..Default::default()
            },
        }),
        V5,
        &[0xF0, 6, 0x18, 4, 0x15, 0, 1, b'm'],
    );
    assert!(encode(
        &Packet::Auth(Auth {
            reason_code: ReasonCode::Success,
            properties: AuthProperties::default()
        }),
        V3,
        &mut BytesMut::new()
    )
    .is_err());
}

#[test]
fn partial_frames_need_more_bytes_and_too_large_is_refused_from_the_header() {
    let full = [0x30, 5, 0, 1, b't', b'h', b'i'];
    for n in 0..full.len() {
        let mut buf = BytesMut::from(&full[..n]);
        assert_eq!(decode(&mut buf, Some(V3), MAX), Ok(None), "{n} bytes");
        assert_eq!(buf.len(), n, "nothing consumed");
    }
    // Only the fixed header of a 1 MiB publish has arrived: refused at once.
    let mut buf = BytesMut::from(&[0x30, 0x80, 0x80, 0x40][..]);
    assert_eq!(
        decode(&mut buf, Some(V3), 1024).unwrap_err().reason_code(),
        ReasonCode::PacketTooLarge
    );
}

#[test]
fn two_packets_in_one_buffer_decode_one_at_a_time() {
    let mut buf = BytesMut::from(&[0xC0, 0, 0xE0, 0][..]);
    assert_eq!(decode(&mut buf, Some(V3), MAX), Ok(Some(Packet::PingReq)));
    assert!(matches!(
        decode(&mut buf, Some(V3), MAX),
        Ok(Some(Packet::Disconnect(_)))
    ));
    assert!(buf.is_empty());
}

// ---- malformations the specification names ----

#[test]
fn mqtt_2_1_3_1_reserved_fixed_header_flags_are_malformed() {
    assert!(
        matches!(
            reject(&[0x60, 2, 0, 1], Some(V3)),
            DecodeError::Malformed(_)
        ),
        "PUBREL needs 0b0010"
    );
    assert!(
        matches!(
            reject(&[0x80, 6, 0, 1, 0, 1, b'a', 0], Some(V3)),
            DecodeError::Malformed(_)
        ),
        "SUBSCRIBE needs 0b0010"
    );
    assert!(
        matches!(
            reject(&[0xA0, 5, 0, 1, 0, 1, b'a'], Some(V3)),
            DecodeError::Malformed(_)
        ),
        "UNSUBSCRIBE needs 0b0010"
    );
    assert!(
        matches!(reject(&[0xC1, 0], Some(V3)), DecodeError::Malformed(_)),
        "PINGREQ flags"
    );
}

#[test]
fn mqtt_3_3_1_4_publish_with_qos_3_is_malformed() {
    assert!(matches!(
        reject(&[0x36, 5, 0, 1, b't', 0, 1], Some(V3)),
        DecodeError::Malformed(_)
    ));
}

#[test]
fn mqtt_3_3_1_2_dup_on_qos0_is_malformed() {
    assert!(matches!(
        reject(&[0x38, 3, 0, 1, b't'], Some(V3)),
        DecodeError::Malformed(_)
    ));
}

#[test]
fn mqtt_3_3_2_2_wildcards_in_a_publish_topic_are_refused() {
    assert_eq!(
        reject(&[0x30, 3, 0, 1, b'#'], Some(V3)).reason_code(),
        ReasonCode::TopicNameInvalid
    );
    assert_eq!(
        reject(&[0x30, 5, 0, 3, b'a', b'/', b'+'], Some(V3)).reason_code(),
        ReasonCode::TopicNameInvalid
    );
}

#[test]
fn mqtt_3_3_2_empty_topic_needs_a_topic_alias_in_v5() {
    assert!(matches!(
        reject(&[0x30, 3, 0, 0, 0], Some(V5)),
        DecodeError::Protocol(_)
    ));
    assert!(matches!(
        reject(&[0x30, 2, 0, 0], Some(V3)),
        DecodeError::Protocol(_)
    ));
    // With topic alias 1: accepted, the session resolves it.
    assert!(matches!(
        dec(&[0x30, 6, 0, 0, 3, 0x23, 0, 1], Some(V5)),
        Ok(Some(Packet::Publish(_)))
    ));
}

#[test]
fn mqtt_2_2_1_3_packet_identifier_zero_is_malformed() {
    assert!(matches!(
        reject(&[0x32, 5, 0, 1, b't', 0, 0], Some(V3)),
        DecodeError::Malformed(_)
    ));
    assert!(matches!(
        reject(&[0x40, 2, 0, 0], Some(V3)),
        DecodeError::Malformed(_)
    ));
    assert!(matches!(
        reject(&[0x82, 6, 0, 0, 0, 1, b'a', 0], Some(V3)),
        DecodeError::Malformed(_)
    ));
}

#[test]
fn mqtt_3_1_2_3_connect_reserved_flag_must_be_zero() {
    let bytes = [
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 0, 0, 1, b'a',
    ];
    let e = reject(&bytes, None);
    assert_eq!(e.reason_code(), ReasonCode::MalformedPacket);
}

#[test]
fn mqtt_3_1_2_11_will_qos_and_retain_need_the_will_flag() {
    // Will QoS 1 without will flag.
    let bytes = [
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x0A, 0, 0, 0, 1, b'a',
    ];
    assert_eq!(
        reject(&bytes, None).reason_code(),
        ReasonCode::MalformedPacket
    );
    // Will retain without will flag.
    let bytes = [
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x22, 0, 0, 0, 1, b'a',
    ];
    assert_eq!(
        reject(&bytes, None).reason_code(),
        ReasonCode::MalformedPacket
    );
}

#[test]
fn mqtt_3_1_2_14_will_qos_3_is_malformed() {
    let bytes = [
        0x10, 18, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x1E, 0, 0, 0, 1, b'a', 0, 1, b't', 0, 0,
    ];
    assert_eq!(
        reject(&bytes, None).reason_code(),
        ReasonCode::MalformedPacket
    );
}

#[test]
fn mqtt_3_1_2_22_password_without_user_name_is_malformed_in_v311() {
    let bytes = [
        0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x42, 0, 0, 0, 1, b'a', 0, 1, b'p',
    ];
    assert_eq!(
        reject(&bytes, None).reason_code(),
        ReasonCode::MalformedPacket
    );
}

#[test]
fn mqtt_3_1_2_1_unknown_protocol_name_is_refused() {
    let bytes = [
        0x10, 13, 0, 4, b'M', b'Q', b'X', b'X', 4, 0x02, 0, 0, 0, 1, b'a',
    ];
    assert!(matches!(reject(&bytes, None), DecodeError::Protocol(_)));
}

#[test]
fn mqtt_3_1_2_2_unknown_protocol_level_gets_connack_0x84_or_return_code_1() {
    let bytes = [
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 0, 0, 1, b'a',
    ];
    let e = reject(&bytes, None);
    assert_eq!(e.reason_code(), ReasonCode::UnsupportedProtocolVersion);
    assert_eq!(
        e.connack_refusal(),
        Some((V3, ReasonCode::UnsupportedProtocolVersion))
    );
}

#[test]
fn mqtt_3_1_0_1_first_packet_must_be_connect() {
    assert!(matches!(reject(&[0xC0, 0], None), DecodeError::Protocol(_)));
}

#[test]
fn mqtt_3_8_3_3_subscribe_without_filters_is_a_protocol_error() {
    assert!(matches!(
        reject(&[0x82, 2, 0, 1], Some(V3)),
        DecodeError::Protocol(_)
    ));
    assert!(matches!(
        reject(&[0xA2, 2, 0, 1], Some(V3)),
        DecodeError::Protocol(_)
    ));
}

#[test]
fn mqtt_3_8_3_5_subscription_option_reserved_bits_and_retain_handling_3_are_malformed() {
    assert!(matches!(
        reject(&[0x82, 6, 0, 1, 0, 1, b'a', 0x04], Some(V3)),
        DecodeError::Malformed(_)
    ));
    assert!(matches!(
        reject(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x40], Some(V5)),
        DecodeError::Malformed(_)
    ));
    assert!(matches!(
        reject(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x30], Some(V5)),
        DecodeError::Malformed(_)
    ));
    assert!(matches!(
        reject(&[0x82, 6, 0, 1, 0, 1, b'a', 0x03], Some(V3)),
        DecodeError::Malformed(_)
    ));
}

#[test]
fn invalid_topic_filters_are_left_to_the_suback() {
    // "a/#/b" is an invalid filter, but well-formed on the wire.
    assert!(matches!(
        dec(
            &[0x82, 10, 0, 1, 0, 5, b'a', b'/', b'#', b'/', b'b', 0],
            Some(V3)
        ),
        Ok(Some(Packet::Subscribe(_)))
    ));
}

#[test]
fn mqtt_1_5_4_invalid_utf8_and_nul_in_strings_are_malformed() {
    assert!(matches!(
        reject(&[0x30, 4, 0, 2, 0xC3, 0x28], Some(V3)),
        DecodeError::Malformed(_)
    ));
    assert!(matches!(
        reject(&[0x30, 4, 0, 2, b'a', 0], Some(V3)),
        DecodeError::Malformed(_)
    ));
}

#[test]
fn trailing_bytes_in_fixed_size_packets_are_malformed() {
    assert!(matches!(
        reject(&[0xC0, 1, 0], Some(V3)),
        DecodeError::Malformed(_)
    ));
    assert!(matches!(
        reject(&[0x40, 3, 0, 1, 0], Some(V3)),
        DecodeError::Malformed(_)
    ));
    assert!(matches!(
        reject(&[0xE0, 1, 0], Some(V3)),
        DecodeError::Malformed(_)
    ));
}

#[test]
fn truncated_properties_are_malformed() {
    // PUBLISH v5 claiming 5 bytes of properties with only 2 present.
    assert!(matches!(
        reject(&[0x30, 6, 0, 1, b't', 5, 0x02, 0], Some(V5)),
        DecodeError::Malformed(_)
    ));
}

#[test]
fn auth_before_v5_and_packet_type_0_are_malformed() {
    assert!(matches!(
        reject(&[0xF0, 0], Some(V3)),
        DecodeError::Malformed(_)
    ));
    assert!(matches!(
        reject(&[0x00, 0], Some(V5)),
        DecodeError::Malformed(_)
    ));
}

#[test]
fn decoding_a_publish_does_not_copy_its_payload() {
    let mut buf = BytesMut::from(&[0x30, 7, 0, 1, b't', b'p', b'a', b'y', b'!'][..]);
    let start = buf.as_ptr() as usize;
    let Some(Packet::Publish(p)) = decode(&mut buf, Some(V3), MAX).unwrap() else {
        panic!("publish");
    };
    assert_eq!(
        p.payload.as_ptr() as usize,
        start + 5,
        "payload is a slice of the read buffer"
    );
}

// ---- property-based round trips ----

fn string() -> impl Strategy<Value = String> {
    "[a-z0-9/ ]{0,12}"
}

fn topic_name() -> impl Strategy<Value = String> {
    "[a-z0-9/]{1,12}"
}

fn bin() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..16).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn users() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((string(), string()), 0..3)
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(ProtocolVersion::V3_1), Just(V3), Just(V5)]
}

fn reason() -> impl Strategy<Value = ReasonCode> {
    prop_oneof![
        Just(ReasonCode::Success),
        Just(ReasonCode::NoMatchingSubscribers),
        Just(ReasonCode::UnspecifiedError),
        Just(ReasonCode::NotAuthorized),
        Just(ReasonCode::PacketIdentifierNotFound),
    ]
}

fn ack_props() -> impl Strategy<Value = AckProperties> {
    (prop::option::of(string()), users()).prop_map(|(reason_string, user_properties)| {
        AckProperties {
            reason_string,
            user_properties,
        }
    })
}

fn publish() -> impl Strategy<Value = Publish> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        1u16..,
        bin(),
        prop::option::of(0u32..1000),
        prop::option::of(string()),
        prop::option::of(bin()),
        users(),
        prop::collection::vec(1u32..268_435_455, 0..3),
    )
        .prop_map(
            |(qos, dup, retain, topic, id, payload, expiry, rt, cd, users, ids)| Publish {
                dup: dup && qos != QoS::AtMostOnce,
                qos,
                retain,
                topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                properties: PublishProperties {
                    payload_format_indicator: None,
                    message_expiry_interval: expiry,
                    topic_alias: None,
                    response_topic: rt.map(|s| s.replace(['+', '#'], "")),
                    correlation_data: cd,
                    user_properties: users,
                    subscription_identifiers: ids,
                    content_type: None,
                },
                payload,
            },
        )
}

/// Any valid packet (v5 fields filled only where `v` carries them).
fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = v.is_v5();
    let strip_pub = move |mut p: Publish| {
        if !v5 {
            p.properties = PublishProperties::default();
        }
        p
    };
    let connect = (
        any::<bool>(),
        any::<u16>(),
        string(),
        prop::option::of((
            topic_name(),
            bin(),
            qos(),
            any::<bool>(),
            prop::option::of(any::<u32>()),
        )),
        prop::option::of((string(), prop::option::of(bin()))),
        prop::option::of(any::<u32>()),
        users(),
    )
        .prop_map(move |(clean, ka, id, will, login, expiry, users)| {
            let (username, password) = match login {
                Some((u, p)) => (Some(u), p),
                None => (None, None),
            };
            Packet::Connect(Box::new(Connect {
                protocol: v,
                clean_start: clean,
                keep_alive: ka,
                client_id: id,
                will: will.map(|(topic, payload, qos, retain, delay)| LastWill {
                    topic,
                    payload,
                    qos,
                    retain,
                    properties: WillProperties {
                        will_delay_interval: if v5 { delay } else { None },
                        ..Default::default()
                    },
                }),
                username,
                password,
                properties: if v5 {
                    ConnectProperties {
                        session_expiry_interval: expiry,
                        user_properties: users,
                        ..Default::default()
                    }
                } else {
                    ConnectProperties::default()
                },
            }))
        });
    let connack = (
        any::<bool>(),
        prop_oneof![
            Just(ReasonCode::Success),
            Just(ReasonCode::NotAuthorized),
            Just(ReasonCode::ServerUnavailable)
        ],
        prop::option::of(1u16..),
        prop::option::of(string()),
    )
        .prop_map(move |(sp, code, rm, assigned)| {
            Packet::ConnAck(ConnAck {
                session_present: sp,
                reason_code: code,
                properties: if v5 {
                    ConnAckProperties {
                        receive_maximum: rm,
                        assigned_client_identifier: assigned,
                        ..Default::default()
                    }
                } else {
                    ConnAckProperties::default()
                },
            })
        });
    let ack = (0u8..4, 1u16.., reason(), ack_props()).prop_map(move |(kind, id, code, props)| {
        let (code, props) = if v5 {
            (code, props)
        } else {
            (ReasonCode::Success, AckProperties::default())
        };
        match kind {
            0 => Packet::PubAck(PubAck {
                packet_id: id,
                reason_code: code,
                properties: props,
            }),
            1 => Packet::PubRec(PubRec {
                packet_id: id,
                reason_code: code,
                properties: props,
            }),
            2 => Packet::PubRel(PubRel {
                packet_id: id,
                reason_code: code,
                properties: props,
            }),
            _ => Packet::PubComp(PubComp {
                packet_id: id,
                reason_code: code,
                properties: props,
            }),
        }
    });
    let subscribe = (
        1u16..,
        prop::collection::vec(
            (string(), qos(), any::<bool>(), any::<bool>(), 0u8..3),
            1..4,
        ),
        prop::option::of(1u32..1000),
    )
        .prop_map(move |(id, filters, sid)| {
            Packet::Subscribe(Subscribe {
                packet_id: id,
                filters: filters
                    .into_iter()
                    .map(|(f, qos, nl, rap, rh)| {
                        (
                            f,
                            SubscriptionOptions {
                                qos,
                                no_local: nl && v5,
                                retain_as_published: rap && v5,
                                retain_handling: match (rh, v5) {
                                    (1, true) => RetainHandling::SendIfNew,
                                    (2, true) => RetainHandling::DoNotSend,
                                    _ => RetainHandling::SendAtSubscribe,
                                },
                            },
                        )
                    })
                    .collect(),
                properties: SubscribeProperties {
                    subscription_identifier: if v5 { sid } else { None },
                    user_properties: vec![],
                },
            })
        });
    let suback = (
        1u16..,
        prop::collection::vec(
            prop_oneof![
                Just(ReasonCode::GrantedQoS0),
                Just(ReasonCode::GrantedQoS1),
                Just(ReasonCode::GrantedQoS2),
                Just(ReasonCode::UnspecifiedError)
            ],
            1..4,
        ),
    )
        .prop_map(|(id, codes)| {
            Packet::SubAck(SubAck {
                packet_id: id,
                reason_codes: codes,
                properties: AckProperties::default(),
            })
        });
    let unsub = (1u16.., prop::collection::vec(string(), 1..4)).prop_map(|(id, filters)| {
        Packet::Unsubscribe(Unsubscribe {
            packet_id: id,
            filters,
            properties: UnsubscribeProperties::default(),
        })
    });
    let unsuback = (
        1u16..,
        prop::collection::vec(
            prop_oneof![
                Just(ReasonCode::Success),
                Just(ReasonCode::NoSubscriptionExisted)
            ],
            1..4,
        ),
    )
        .prop_map(move |(id, codes)| {
            Packet::UnsubAck(UnsubAck {
                packet_id: id,
                reason_codes: if v5 { codes } else { vec![] },
                properties: AckProperties::default(),
            })
        });
    let disconnect = (reason(), prop::option::of(any::<u32>())).prop_map(move |(code, expiry)| {
        Packet::Disconnect(if v5 {
            Disconnect {
                reason_code: code,
                properties: DisconnectProperties {
                    session_expiry_interval: expiry,
                    ..Default::default()
                },
            }
        } else {
            Disconnect {
                reason_code: ReasonCode::Success,
                properties: DisconnectProperties::default(),
            }
        })
    });
    let mut options = vec![
        connect.boxed(),
        connack.boxed(),
        publish()
            .prop_map(move |p| Packet::Publish(strip_pub(p)))
            .boxed(),
        ack.boxed(),
        subscribe.boxed(),
        suback.boxed(),
        unsub.boxed(),
        unsuback.boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect.boxed(),
    ];
    if v5 {
        options.push(
            (
                prop_oneof![
                    Just(ReasonCode::Success),
                    Just(ReasonCode::ContinueAuthentication)
                ],
                prop::option::of(string()),
            )
                .prop_map(|(code, m)| {
                    Packet::Auth(Auth {
                        reason_code: code,
                        properties: AuthProperties {
                            authentication_method: m,
                            ..Default::default()
                        },
                    })
                })
                .boxed(),
        );
    }
    prop::strategy::Union::new(options).boxed()
}

fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    version().prop_flat_map(|v| packet(v).prop_map(move |p| (v, p)))
}

proptest! {
    #[test]
    fn every_packet_round_trips_in_every_version((v, p) in versioned_packet()) {
        let mut out = BytesMut::new();
        encode(&p, v, &mut out).unwrap();
        prop_assert_eq!(out.len(), p.encoded_len(v));
        let version = if matches!(p, Packet::Connect(_)) { None } else { Some(v) };
        let decoded = decode(&mut out, version, MAX).unwrap();
        prop_assert_eq!(decoded, Some(p));
        prop_assert!(out.is_empty());
    }

    #[test]
    fn byte_by_byte_arrival_yields_nothing_until_the_last_byte((v, p) in versioned_packet()) {
        let mut full = BytesMut::new();
        encode(&p, v, &mut full).unwrap();
        let version = if matches!(p, Packet::Connect(_)) { None } else { Some(v) };
        let mut buf = BytesMut::new();
        for (i, b) in full.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let r = decode(&mut buf, version, MAX).unwrap();
            if i + 1 < full.len() {
                prop_assert_eq!(r, None);
            } else {
                prop_assert_eq!(r, Some(p.clone()));
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), v in prop::option::of(version()), max in 0u32..100) {
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode(&mut buf, v, max);
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode(&mut buf, v, MAX);
    }
}
