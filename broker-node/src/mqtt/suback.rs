//! SUBACK (section 3.9): one reason code per filter of the SUBSCRIBE.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::read_u8;
use super::properties::{AckProperties, Properties};
use super::{read_packet_id, DecodeError, EncodeError, ProtocolVersion, ReasonCode};

/// SUBACK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubAck {
    /// The SUBSCRIBE's packet identifier.
    pub packet_id: u16,
    /// Granted QoS or failure, per filter (3.x: 0, 1, 2 or 0x80 on the wire).
    pub reason_codes: Vec<ReasonCode>,
    /// v5 properties.
    pub properties: AckProperties,
}

impl SubAck {
    pub(crate) fn decode(mut body: Bytes, v: ProtocolVersion) -> Result<SubAck, DecodeError> {
        let packet_id = read_packet_id(&mut body)?;
        let properties = if v.is_v5() {
            AckProperties::decode(&mut body)?
        } else {
            AckProperties::default()
        };
        let mut reason_codes = Vec::with_capacity(body.len());
        while !body.is_empty() {
            let b = read_u8(&mut body)?;
            let code = if v.is_v5() {
                ReasonCode::from_suback(b)
                    .map_err(|_| DecodeError::Malformed("unknown reason code"))?
            } else {
                match b {
                    0 => ReasonCode::GrantedQoS0,
                    1 => ReasonCode::GrantedQoS1,
                    2 => ReasonCode::GrantedQoS2,
                    0x80 => ReasonCode::UnspecifiedError,
                    _ => return Err(DecodeError::Malformed("unknown SUBACK return code")),
                }
            };
            reason_codes.push(code);
        }
        Ok(SubAck {
            packet_id,
            reason_codes,
            properties,
        })
    }

    pub(crate) fn body_len(&self, v: ProtocolVersion) -> usize {
        2 + if v.is_v5() {
            self.properties.block_len()
        } else {
            0
        } + self.reason_codes.len()
    }

    pub(crate) fn write(&self, out: &mut BytesMut, v: ProtocolVersion) -> Result<(), EncodeError> {
        out.put_u16(self.packet_id);
        if v.is_v5() {
            self.properties.write(out)?;
        }
        for code in &self.reason_codes {
            out.put_u8(if v.is_v5() {
                u8::from(*code)
            } else {
                code.to_v3_suback()
            });
        }
        Ok(())
    }
}
