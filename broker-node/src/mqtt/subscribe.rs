//! SUBSCRIBE (section 3.8). Topic filters are not validated here: the broker answers
//! an invalid filter with its own SUBACK reason code (0x8F) instead of closing.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{field_len, read_string, read_u8, write_string};
use super::properties::{Properties, SubscribeProperties};
use super::{read_packet_id, DecodeError, EncodeError, ProtocolVersion, QoS};

/// When retained messages are sent for a new subscription (v5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RetainHandling {
    /// At subscribe time.
    SendAtSubscribe = 0,
    /// At subscribe time, if the subscription did not exist.
    SendIfNew = 1,
    /// Never.
    DoNotSend = 2,
}

/// The options of one subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Maximum QoS requested.
    pub qos: QoS,
    /// v5 No Local.
    pub no_local: bool,
    /// v5 Retain As Published.
    pub retain_as_published: bool,
    /// v5 Retain Handling.
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    fn decode(byte: u8, v: ProtocolVersion) -> Result<Self, DecodeError> {
        let reserved = if v.is_v5() { 0xC0 } else { 0xFC };
        if byte & reserved != 0 {
            return Err(DecodeError::Malformed(
                "subscription options reserved bits set",
            ));
        }
        let retain_handling = match (byte >> 4) & 0x03 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::Malformed("retain handling 3")),
        };
        Ok(SubscriptionOptions {
            qos: QoS::try_from(byte & 0x03)?,
            no_local: byte & 0x04 != 0,
            retain_as_published: byte & 0x08 != 0,
            retain_handling,
        })
    }

    fn encode(&self, v: ProtocolVersion) -> u8 {
        let mut b = u8::from(self.qos);
        if v.is_v5() {
            b |= u8::from(self.no_local) << 2
                | u8::from(self.retain_as_published) << 3
                | (self.retain_handling as u8) << 4;
        }
        b
    }
}

/// SUBSCRIBE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    /// The packet identifier.
    pub packet_id: u16,
    /// The filters with their options, in order.
    pub filters: Vec<(String, SubscriptionOptions)>,
    /// v5 properties.
    pub properties: SubscribeProperties,
}

impl Subscribe {
    pub(crate) fn decode(mut body: Bytes, v: ProtocolVersion) -> Result<Subscribe, DecodeError> {
        let packet_id = read_packet_id(&mut body)?;
        let properties = if v.is_v5() {
            SubscribeProperties::decode(&mut body)?
        } else {
            SubscribeProperties::default()
        };
        let mut filters = Vec::new();
        while !body.is_empty() {
            let filter = read_string(&mut body)?;
            let options = SubscriptionOptions::decode(read_u8(&mut body)?, v)?;
            filters.push((filter, options));
        }
        if filters.is_empty() {
            return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
        }
        Ok(Subscribe {
            packet_id,
            filters,
            properties,
        })
    }

    pub(crate) fn body_len(&self, v: ProtocolVersion) -> usize {
        2 + if v.is_v5() {
            self.properties.block_len()
        } else {
            0
        } + self
            .filters
            .iter()
            .map(|(f, _)| field_len(f.len()) + 1)
            .sum::<usize>()
    }

    pub(crate) fn write(&self, out: &mut BytesMut, v: ProtocolVersion) -> Result<(), EncodeError> {
        out.put_u16(self.packet_id);
        if v.is_v5() {
            self.properties.write(out)?;
        }
        for (filter, options) in &self.filters {
            write_string(out, filter)?;
            out.put_u8(options.encode(v));
        }
        Ok(())
    }
}
