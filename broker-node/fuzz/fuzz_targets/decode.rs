//! Fuzz the MQTT decoder: arbitrary bytes, every protocol version, several maximum
//! packet sizes. Whatever decodes must re-encode and decode to the same packet.

#![no_main]

use broker_node::mqtt::{decode, encode, Packet, ProtocolVersion};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let version = match selector % 4 {
        0 => None,
        1 => Some(ProtocolVersion::V3_1),
        2 => Some(ProtocolVersion::V3_1_1),
        _ => Some(ProtocolVersion::V5),
    };
    let max = match (selector >> 2) % 3 {
        0 => 64,
        1 => 4096,
        _ => 268_435_455,
    };
    let mut buf = BytesMut::from(rest);
    // Decode packets until the input is used up, an error or a partial frame.
    while let Ok(Some(packet)) = decode(&mut buf, version, max) {
        let v = match (&packet, version) {
            (Packet::Connect(c), _) => c.protocol,
            (_, Some(v)) => v,
            (_, None) => unreachable!("only CONNECT decodes before CONNECT"),
        };
        let mut out = BytesMut::new();
        encode(&packet, v, &mut out).expect("a decoded packet encodes");
        assert_eq!(out.len(), packet.encoded_len(v));
        let again = decode(&mut out, if matches!(packet, Packet::Connect(_)) { None } else { Some(v) }, u32::MAX)
            .expect("re-encoding decodes")
            .expect("re-encoding is complete");
        assert_eq!(again, packet);
    }
});
