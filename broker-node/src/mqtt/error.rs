//! Codec errors and their one mapping to MQTT 5.0 reason codes.

use super::{ProtocolVersion, ReasonCode};

/// Why bytes could not be decoded into a packet. Every variant maps to exactly one
/// reason code in [`DecodeError::reason_code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes break the packet format (0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet is well formed but not allowed here (0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The packet is larger than the maximum packet size (0x95).
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Its size on the wire.
        size: usize,
        /// The limit.
        max: u32,
    },
    /// CONNECT with a protocol level this broker does not speak (0x84).
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolVersion(u8),
    /// A PUBLISH or will topic that is not a valid topic name (0x90).
    #[error("invalid topic name: {0}")]
    TopicName(&'static str),
    /// An error inside a CONNECT whose protocol level was read: the broker may answer
    /// it with a CONNACK in that version.
    #[error("{source} (in CONNECT)")]
    InConnect {
        /// The version the CONNECT announced.
        version: ProtocolVersion,
        /// What was wrong.
        source: Box<DecodeError>,
    },
}

impl DecodeError {
    /// The MQTT 5.0 reason code for this error (for DISCONNECT or CONNACK).
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::Malformed(_) => ReasonCode::MalformedPacket,
            DecodeError::Protocol(_) => ReasonCode::ProtocolError,
            DecodeError::TooLarge { .. } => ReasonCode::PacketTooLarge,
            DecodeError::UnsupportedProtocolVersion(_) => ReasonCode::UnsupportedProtocolVersion,
            DecodeError::TopicName(_) => ReasonCode::TopicNameInvalid,
            DecodeError::InConnect { source, .. } => source.reason_code(),
        }
    }

    /// For an error in a CONNECT that deserves a CONNACK before the connection
    /// closes: the version to answer in and the reason code. A 3.x client gets a
    /// CONNACK only for an unsupported protocol level (return code 1).
    pub fn connack_refusal(&self) -> Option<(ProtocolVersion, ReasonCode)> {
        match self {
            DecodeError::UnsupportedProtocolVersion(_) => Some((
                ProtocolVersion::V3_1_1,
                ReasonCode::UnsupportedProtocolVersion,
            )),
            DecodeError::InConnect {
                version: ProtocolVersion::V5,
                source,
            } => Some((ProtocolVersion::V5, source.reason_code())),
            _ => None,
        }
    }
}

/// Why a packet could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string or binary field longer than 65,535 bytes.
    #[error("field of {0} bytes exceeds 65535")]
    FieldTooLong(usize),
    /// The packet would exceed the largest remaining length (268,435,455).
    #[error("packet too large to encode")]
    PacketTooLarge,
    /// The packet does not exist in this protocol version (AUTH before 5.0).
    #[error("{0} cannot be sent in this protocol version")]
    NotInVersion(&'static str),
    /// A QoS > 0 PUBLISH without packet identifier, or the reverse.
    #[error("invalid packet: {0}")]
    Invalid(&'static str),
}
