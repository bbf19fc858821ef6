//! PUBACK, PUBREC, PUBREL and PUBCOMP (sections 3.4–3.7): the acknowledgements of the
//! QoS 1 and QoS 2 flows. They share one wire shape (packet identifier, then in v5 an
//! optional reason code and optional properties), so they share this file.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::read_u8;
use super::properties::{AckProperties, Properties};
use super::{read_packet_id, DecodeError, EncodeError, ProtocolVersion, ReasonCode};

macro_rules! ack_packet {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name {
            /// The packet identifier acknowledged.
            pub packet_id: u16,
            /// The outcome (v5; 3.x carries none and means success).
            pub reason_code: ReasonCode,
            /// v5 properties.
            pub properties: AckProperties,
        }

        impl $name {
            /// An acknowledgement of `packet_id` with `reason_code` and no properties.
            pub fn new(packet_id: u16, reason_code: ReasonCode) -> Self {
                $name {
                    packet_id,
                    reason_code,
                    properties: AckProperties::default(),
                }
            }

            pub(crate) fn decode(mut body: Bytes, v: ProtocolVersion) -> Result<Self, DecodeError> {
                let packet_id = read_packet_id(&mut body)?;
                let mut ack = $name::new(packet_id, ReasonCode::Success);
                if v.is_v5() {
                    if !body.is_empty() {
                        let code = read_u8(&mut body)?;
                        ack.reason_code = ReasonCode::try_from(code)
                            .map_err(|_| DecodeError::Malformed("unknown reason code"))?;
                    }
                    if !body.is_empty() {
                        ack.properties = AckProperties::decode(&mut body)?;
                    }
                }
                super::expect_end(&body)?;
                Ok(ack)
            }

            pub(crate) fn body_len(&self, v: ProtocolVersion) -> usize {
                if !v.is_v5() {
                    return 2;
                }
                if self.properties.is_empty() {
                    // The short forms [MQTT-3.4.2.1]: no reason code when it is Success.
                    if self.reason_code == ReasonCode::Success { 2 } else { 3 }
                } else {
                    3 + self.properties.block_len()
                }
            }

            pub(crate) fn write(&self, out: &mut BytesMut, v: ProtocolVersion) -> Result<(), EncodeError> {
                out.put_u16(self.packet_id);
                let len = self.body_len(v);
                if len >= 3 {
                    out.put_u8(u8::from(self.reason_code));
                }
                if len > 3 {
                    self.properties.write(out)?;
                }
                Ok(())
            }
        }
    };
}

ack_packet!(
    /// PUBACK: the end of a QoS 1 flow.
    PubAck
);
ack_packet!(
    /// PUBREC: the first answer in a QoS 2 flow.
    PubRec
);
ack_packet!(
    /// PUBREL: the release in a QoS 2 flow.
    PubRel
);
ack_packet!(
    /// PUBCOMP: the end of a QoS 2 flow.
    PubComp
);
