//! UNSUBSCRIBE (section 3.10).

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{field_len, read_string, write_string};
use super::properties::{Properties, UnsubscribeProperties};
use super::{read_packet_id, DecodeError, EncodeError, ProtocolVersion};

/// UNSUBSCRIBE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    /// The packet identifier.
    pub packet_id: u16,
    /// The filters to remove, exactly as subscribed.
    pub filters: Vec<String>,
    /// v5 properties.
    pub properties: UnsubscribeProperties,
}

impl Unsubscribe {
    pub(crate) fn decode(mut body: Bytes, v: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
        let packet_id = read_packet_id(&mut body)?;
        let properties = if v.is_v5() {
            UnsubscribeProperties::decode(&mut body)?
        } else {
            UnsubscribeProperties::default()
        };
        let mut filters = Vec::new();
        while !body.is_empty() {
            filters.push(read_string(&mut body)?);
        }
        if filters.is_empty() {
            return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
        }
        Ok(Unsubscribe {
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
            .map(|f| field_len(f.len()))
            .sum::<usize>()
    }

    pub(crate) fn write(&self, out: &mut BytesMut, v: ProtocolVersion) -> Result<(), EncodeError> {
        out.put_u16(self.packet_id);
        if v.is_v5() {
            self.properties.write(out)?;
        }
        for f in &self.filters {
            write_string(out, f)?;
        }
        Ok(())
    }
}
