//! PUBLISH (section 3.3): an application message.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{field_len, read_string, write_string};
use super::properties::{Properties, PublishProperties};
use super::{read_packet_id, topic, DecodeError, EncodeError, ProtocolVersion, QoS};

/// PUBLISH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// A possible re-delivery.
    pub dup: bool,
    /// Its QoS.
    pub qos: QoS,
    /// The RETAIN flag.
    pub retain: bool,
    /// The topic name (empty in v5 when a topic alias stands for it).
    pub topic: String,
    /// Present exactly when QoS > 0.
    pub packet_id: Option<u16>,
    /// v5 properties.
    pub properties: PublishProperties,
    /// The payload, a slice of the received frame.
    pub payload: Bytes,
}

impl Publish {
    pub(crate) fn decode(
        flags: u8,
        mut body: Bytes,
        v: ProtocolVersion,
    ) -> Result<Publish, DecodeError> {
        let dup = flags & 0x08 != 0;
        let qos = QoS::try_from((flags >> 1) & 0x03)?;
        let retain = flags & 0x01 != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
        }
        let topic = read_string(&mut body)?;
        let packet_id = if qos == QoS::AtMostOnce {
            None
        } else {
            Some(read_packet_id(&mut body)?)
        };
        let properties = if v.is_v5() {
            PublishProperties::decode(&mut body)?
        } else {
            PublishProperties::default()
        };
        if topic.is_empty() {
            if properties.topic_alias.is_none() {
                return Err(DecodeError::Protocol("empty topic without a topic alias"));
            }
        } else {
            topic::validate_topic_name(&topic)
                .map_err(|_| DecodeError::TopicName("PUBLISH topic"))?;
        }
        Ok(Publish {
            dup,
            qos,
            retain,
            topic,
            packet_id,
            properties,
            payload: body,
        })
    }

    pub(crate) fn flags(&self) -> u8 {
        (u8::from(self.dup) << 3) | (u8::from(self.qos) << 1) | u8::from(self.retain)
    }

    pub(crate) fn body_len(&self, v: ProtocolVersion) -> usize {
        field_len(self.topic.len())
            + if self.qos == QoS::AtMostOnce { 0 } else { 2 }
            + if v.is_v5() {
                self.properties.block_len()
            } else {
                0
            }
            + self.payload.len()
    }

    pub(crate) fn write(&self, out: &mut BytesMut, v: ProtocolVersion) -> Result<(), EncodeError> {
        write_string(out, &self.topic)?;
        match (self.qos, self.packet_id) {
            (QoS::AtMostOnce, None) => {}
            (QoS::AtMostOnce, Some(_)) => return Err(EncodeError::Invalid("packet id on QoS 0")),
            (_, Some(0) | None) => return Err(EncodeError::Invalid("QoS > 0 without packet id")),
            (_, Some(id)) => out.put_u16(id),
        }
        if v.is_v5() {
            self.properties.write(out)?;
        }
        out.put_slice(&self.payload);
        Ok(())
    }
}
