//! AUTH (section 3.15, MQTT 5.0 only): enhanced authentication exchanges.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::read_u8;
use super::properties::{AuthProperties, Properties};
use super::{DecodeError, EncodeError, ReasonCode};

/// AUTH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Auth {
    /// Success, Continue authentication or Re-authenticate.
    pub reason_code: ReasonCode,
    /// Properties.
    pub properties: AuthProperties,
}

impl Auth {
    pub(crate) fn decode(mut body: Bytes) -> Result<Auth, DecodeError> {
        let mut a = Auth {
            reason_code: ReasonCode::Success,
            properties: AuthProperties::default(),
        };
        if !body.is_empty() {
            a.reason_code = match read_u8(&mut body)? {
                0x00 => ReasonCode::Success,
                0x18 => ReasonCode::ContinueAuthentication,
                0x19 => ReasonCode::ReAuthenticate,
                _ => return Err(DecodeError::Malformed("AUTH reason code")),
            };
        }
        if !body.is_empty() {
            a.properties = AuthProperties::decode(&mut body)?;
        }
        super::expect_end(&body)?;
        Ok(a)
    }

    pub(crate) fn body_len(&self) -> usize {
        if self.properties.is_empty() && self.reason_code == ReasonCode::Success {
            0
        } else {
            1 + self.properties.block_len()
        }
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        if self.body_len() > 0 {
            out.put_u8(u8::from(self.reason_code));
            self.properties.write(out)?;
        }
        Ok(())
    }
}
