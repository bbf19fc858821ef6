//! UNSUBACK (section 3.11): in v5, one reason code per filter; in 3.x, none.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::read_u8;
use super::properties::{AckProperties, Properties};
use super::{read_packet_id, DecodeError, EncodeError, ProtocolVersion, ReasonCode};

/// UNSUBACK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsubAck {
    /// The UNSUBSCRIBE's packet identifier.
    pub packet_id: u16,
    /// Per filter (v5 only; not sent to 3.x clients).
    pub reason_codes: Vec<ReasonCode>,
    /// v5 properties.
    pub properties: AckProperties,
}

impl UnsubAck {
    pub(crate) fn decode(mut body: Bytes, v: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
        let packet_id = read_packet_id(&mut body)?;
        let mut ack = UnsubAck {
            packet_id,
            reason_codes: Vec::new(),
            properties: AckProperties::default(),
        };
        if v.is_v5() {
            ack.properties = AckProperties::decode(&mut body)?;
            while !body.is_empty() {
                let b = read_u8(&mut body)?;
                ack.reason_codes.push(
                    ReasonCode::try_from(b)
                        .map_err(|_| DecodeError::Malformed("unknown reason code"))?,
                );
            }
        }
        super::expect_end(&body)?;
        Ok(ack)
    }

    pub(crate) fn body_len(&self, v: ProtocolVersion) -> usize {
        if v.is_v5() {
            2 + self.properties.block_len() + self.reason_codes.len()
        } else {
            2
        }
    }

    pub(crate) fn write(&self, out: &mut BytesMut, v: ProtocolVersion) -> Result<(), EncodeError> {
        out.put_u16(self.packet_id);
        if v.is_v5() {
            self.properties.write(out)?;
            for c in &self.reason_codes {
                out.put_u8(u8::from(*c));
            }
        }
        Ok(())
    }
}
