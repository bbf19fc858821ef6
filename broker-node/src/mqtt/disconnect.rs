//! DISCONNECT (section 3.14): in 3.x an empty packet from the client; in v5 from
//! either side, with a reason code and properties.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::read_u8;
use super::properties::{DisconnectProperties, Properties};
use super::{DecodeError, EncodeError, ProtocolVersion, ReasonCode};

/// DISCONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disconnect {
    /// Why (v5; 3.x means normal disconnection).
    pub reason_code: ReasonCode,
    /// v5 properties.
    pub properties: DisconnectProperties,
}

impl Disconnect {
    pub(crate) fn decode(mut body: Bytes, v: ProtocolVersion) -> Result<Disconnect, DecodeError> {
        let mut d = Disconnect {
            reason_code: ReasonCode::Success,
            properties: DisconnectProperties::default(),
        };
        if v.is_v5() {
            if !body.is_empty() {
                d.reason_code = ReasonCode::try_from(read_u8(&mut body)?)
                    .map_err(|_| DecodeError::Malformed("unknown reason code"))?;
            }
            if !body.is_empty() {
                d.properties = DisconnectProperties::decode(&mut body)?;
            }
        }
        super::expect_end(&body)?;
        Ok(d)
    }

    pub(crate) fn body_len(&self, v: ProtocolVersion) -> usize {
        if !v.is_v5() {
            return 0;
        }
        if self.properties.is_empty() {
            if self.reason_code == ReasonCode::Success {
                0
            } else {
                1
            }
        } else {
            1 + self.properties.block_len()
        }
    }

    pub(crate) fn write(&self, out: &mut BytesMut, v: ProtocolVersion) -> Result<(), EncodeError> {
        let len = self.body_len(v);
        if len >= 1 {
            out.put_u8(u8::from(self.reason_code));
        }
        if len > 1 {
            self.properties.write(out)?;
        }
        Ok(())
    }
}
