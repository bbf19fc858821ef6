//! CONNACK (section 3.2): the broker's answer to CONNECT.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::read_u8;
use super::properties::{ConnAckProperties, Properties};
use super::{DecodeError, EncodeError, ProtocolVersion, ReasonCode};

/// CONNACK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnAck {
    /// Whether a previous session was resumed.
    pub session_present: bool,
    /// The outcome; written as a 3.x return code for 3.x clients.
    pub reason_code: ReasonCode,
    /// v5 properties.
    pub properties: ConnAckProperties,
}

impl ConnAck {
    pub(crate) fn decode(mut body: Bytes, v: ProtocolVersion) -> Result<ConnAck, DecodeError> {
        let flags = read_u8(&mut body)?;
        if flags & 0xFE != 0 {
            return Err(DecodeError::Malformed("CONNACK reserved flags set"));
        }
        let code = read_u8(&mut body)?;
        let reason_code = if v.is_v5() {
            ReasonCode::try_from(code).map_err(|_| DecodeError::Malformed("unknown reason code"))?
        } else {
            ReasonCode::from_v3_connack(code)
                .ok_or(DecodeError::Malformed("unknown return code"))?
        };
        let properties = if v.is_v5() {
            ConnAckProperties::decode(&mut body)?
        } else {
            ConnAckProperties::default()
        };
        super::expect_end(&body)?;
        Ok(ConnAck {
            session_present: flags & 1 == 1,
            reason_code,
            properties,
        })
    }

    pub(crate) fn body_len(&self, v: ProtocolVersion) -> usize {
        2 + if v.is_v5() {
            self.properties.block_len()
        } else {
            0
        }
    }

    pub(crate) fn write(&self, out: &mut BytesMut, v: ProtocolVersion) -> Result<(), EncodeError> {
        out.put_u8(u8::from(self.session_present));
        if v.is_v5() {
            out.put_u8(u8::from(self.reason_code));
            self.properties.write(out)?;
        } else {
            out.put_u8(self.reason_code.to_v3_connack());
        }
        Ok(())
    }
}
