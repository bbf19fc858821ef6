//! The MQTT codec: packets of MQTT 3.1, 3.1.1 and 5.0 in and out of bytes.
//!
//! Pure: bytes in, packets out, with no I/O, no tokio and no clock. [`decode`] takes
//! one packet off the front of a `BytesMut`; an incomplete frame is `Ok(None)`, and
//! the maximum packet size is enforced from the fixed header before the body is
//! waited for. Payloads are `Bytes` slices of the frame, so a publish is fanned out
//! without copying its payload. Errors map to v5 reason codes in one place
//! ([`DecodeError::reason_code`]). One file per packet type (the four acknowledgements
//! share one shape and one file).

mod ack;
mod auth;
pub mod codec;
mod connack;
mod connect;
mod disconnect;
mod error;
pub mod properties;
mod publish;
mod reason;
mod suback;
mod subscribe;
pub mod topic;
mod unsuback;
mod unsubscribe;

use bytes::{BufMut, Bytes, BytesMut};

pub use ack::{PubAck, PubComp, PubRec, PubRel};
pub use auth::Auth;
pub use connack::ConnAck;
pub use connect::{Connect, LastWill};
pub use disconnect::Disconnect;
pub use error::{DecodeError, EncodeError};
pub use properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, SubscribeProperties, UnsubscribeProperties, WillProperties,
};
pub use publish::Publish;
pub use reason::{ReasonCode, UnknownReasonCode};
pub use suback::SubAck;
pub use subscribe::{RetainHandling, Subscribe, SubscriptionOptions};
pub use unsuback::UnsubAck;
pub use unsubscribe::Unsubscribe;

/// The protocol versions spoken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1 (protocol name "MQIsdp", level 3).
    V3_1,
    /// MQTT 3.1.1 (level 4).
    V3_1_1,
    /// MQTT 5.0 (level 5).
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V3_1 => 3,
            ProtocolVersion::V3_1_1 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// Whether this is MQTT 5.0 (properties and reason codes on the wire).
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
}

/// Quality of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

impl From<QoS> for u8 {
    fn from(q: QoS) -> u8 {
        q as u8
    }
}

impl TryFrom<u8> for QoS {
    type Error = DecodeError;

    fn try_from(v: u8) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            _ => Err(DecodeError::Malformed("QoS 3")),
        }
    }
}

/// Every MQTT control packet.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubAck),
    PubRec(PubRec),
    PubRel(PubRel),
    PubComp(PubComp),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    /// MQTT 5.0 only.
    Auth(Auth),
}

/// Decode one packet from the front of `buf`, consuming exactly its bytes.
///
/// `version` is the connection's protocol version, `None` before CONNECT (then any
/// other packet is a protocol error). `Ok(None)`: more bytes are needed.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let Some((remaining, len_bytes)) = codec::peek_varint(&buf[1..])? else {
        return Ok(None);
    };
    let total = 1 + len_bytes + remaining as usize;
    if total > max_packet_size as usize {
        return Err(DecodeError::TooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let first = buf[0];
    let mut frame = buf.split_to(total).freeze();
    let body = frame.split_off(1 + len_bytes);
    let kind = first >> 4;
    let flags = first & 0x0F;
    let v = match (kind, version) {
        (1, _) => {
            return connect::Connect::decode(flags, body)
                .map(|c| Some(Packet::Connect(Box::new(c))))
        }
        (_, None) => return Err(DecodeError::Protocol("first packet must be CONNECT")),
        (_, Some(v)) => v,
    };
    let need_flags = |want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(DecodeError::Malformed("reserved fixed-header flags"))
        }
    };
    let packet = match kind {
        2 => {
            need_flags(0)?;
            Packet::ConnAck(ConnAck::decode(body, v)?)
        }
        3 => Packet::Publish(Publish::decode(flags, body, v)?),
        4 => {
            need_flags(0)?;
            Packet::PubAck(PubAck::decode(body, v)?)
        }
        5 => {
            need_flags(0)?;
            Packet::PubRec(PubRec::decode(body, v)?)
        }
        6 => {
            need_flags(2)?;
            Packet::PubRel(PubRel::decode(body, v)?)
        }
        7 => {
            need_flags(0)?;
            Packet::PubComp(PubComp::decode(body, v)?)
        }
        8 => {
            need_flags(2)?;
            Packet::Subscribe(Subscribe::decode(body, v)?)
        }
        9 => {
            need_flags(0)?;
            Packet::SubAck(SubAck::decode(body, v)?)
        }
        10 => {
            need_flags(2)?;
            Packet::Unsubscribe(Unsubscribe::decode(body, v)?)
        }
        11 => {
            need_flags(0)?;
            Packet::UnsubAck(UnsubAck::decode(body, v)?)
        }
        12 | 13 => {
            need_flags(0)?;
            if !body.is_empty() {
                return Err(DecodeError::Malformed("PINGREQ/PINGRESP with a body"));
            }
            if kind == 12 {
                Packet::PingReq
            } else {
                Packet::PingResp
            }
        }
        14 => {
            need_flags(0)?;
            Packet::Disconnect(Disconnect::decode(body, v)?)
        }
        15 if v.is_v5() => {
            need_flags(0)?;
            Packet::Auth(Auth::decode(body)?)
        }
        15 => return Err(DecodeError::Malformed("AUTH before MQTT 5.0")),
        _ => return Err(DecodeError::Malformed("reserved packet type 0")),
    };
    Ok(Some(packet))
}

impl Packet {
    /// (packet type, fixed-header flags, remaining length) in `version`.
    fn header(&self, v: ProtocolVersion) -> (u8, u8, usize) {
        match self {
            Packet::Connect(p) => (1, 0, p.body_len()),
            Packet::ConnAck(p) => (2, 0, p.body_len(v)),
            Packet::Publish(p) => (3, p.flags(), p.body_len(v)),
            Packet::PubAck(p) => (4, 0, p.body_len(v)),
            Packet::PubRec(p) => (5, 0, p.body_len(v)),
            Packet::PubRel(p) => (6, 2, p.body_len(v)),
            Packet::PubComp(p) => (7, 0, p.body_len(v)),
            Packet::Subscribe(p) => (8, 2, p.body_len(v)),
            Packet::SubAck(p) => (9, 0, p.body_len(v)),
            Packet::Unsubscribe(p) => (10, 2, p.body_len(v)),
            Packet::UnsubAck(p) => (11, 0, p.body_len(v)),
            Packet::PingReq => (12, 0, 0),
            Packet::PingResp => (13, 0, 0),
            Packet::Disconnect(p) => (14, 0, p.body_len(v)),
            Packet::Auth(p) => (15, 0, p.body_len()),
        }
    }

    /// The number of bytes this packet takes on the wire in `version`.
    pub fn encoded_len(&self, version: ProtocolVersion) -> usize {
        let (_, _, remaining) = self.header(version);
        1 + codec::varint_len(remaining) + remaining
    }
}

/// Append the encoding of `packet` in `version` to `out`.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if matches!(packet, Packet::Auth(_)) && !version.is_v5() {
        return Err(EncodeError::NotInVersion("AUTH"));
    }
    let (kind, flags, remaining) = packet.header(version);
    let start = out.len();
    out.reserve(1 + codec::varint_len(remaining) + remaining);
    out.put_u8(kind << 4 | flags);
    codec::write_varint(out, remaining)?;
    let written = match packet {
        Packet::Connect(p) => p.write(out),
        Packet::ConnAck(p) => p.write(out, version),
        Packet::Publish(p) => p.write(out, version),
        Packet::PubAck(p) => p.write(out, version),
        Packet::PubRec(p) => p.write(out, version),
        Packet::PubRel(p) => p.write(out, version),
        Packet::PubComp(p) => p.write(out, version),
        Packet::Subscribe(p) => p.write(out, version),
        Packet::SubAck(p) => p.write(out, version),
        Packet::Unsubscribe(p) => p.write(out, version),
        Packet::UnsubAck(p) => p.write(out, version),
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(p) => p.write(out, version),
        Packet::Auth(p) => p.write(out),
    };
    if let Err(e) = written {
        out.truncate(start);
        return Err(e);
    }
    Ok(())
}

/// Read a non-zero packet identifier [MQTT-2.2.1-3].
pub(crate) fn read_packet_id(body: &mut Bytes) -> Result<u16, DecodeError> {
    match codec::read_u16(body)? {
        0 => Err(DecodeError::Malformed("packet identifier 0")),
        id => Ok(id),
    }
}

/// Refuse bytes left over after the last field.
pub(crate) fn expect_end(body: &Bytes) -> Result<(), DecodeError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Malformed(
            "unexpected bytes after the last field",
        ))
    }
}

#[cfg(test)]
mod tests;
