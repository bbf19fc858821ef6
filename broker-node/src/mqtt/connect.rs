//! CONNECT (section 3.1): the first packet of every connection.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{
    field_len, read_binary, read_string, read_u16, read_u8, write_binary, write_string,
};
use super::properties::{ConnectProperties, Properties, WillProperties};
use super::{topic, DecodeError, EncodeError, ProtocolVersion, QoS};

/// A will message set at CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastWill {
    /// Where it is published.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// Its QoS.
    pub qos: QoS,
    /// Whether it is retained.
    pub retain: bool,
    /// Its v5 properties.
    pub properties: WillProperties,
}

/// CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    /// The protocol version the client speaks.
    pub protocol: ProtocolVersion,
    /// Clean Start (v5) / Clean Session (v3).
    pub clean_start: bool,
    /// Keep alive in seconds (0: none).
    pub keep_alive: u16,
    /// The client identifier (may be empty).
    pub client_id: String,
    /// The will, if any.
    pub will: Option<LastWill>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Bytes>,
    /// v5 properties.
    pub properties: ConnectProperties,
}

impl Connect {
    pub(crate) fn decode(flags: u8, mut body: Bytes) -> Result<Connect, DecodeError> {
        if flags != 0 {
            return Err(DecodeError::Malformed("reserved fixed-header flags"));
        }
        let name = read_string(&mut body)?;
        let level = read_u8(&mut body)?;
        let protocol = match (name.as_str(), level) {
            ("MQTT", 4) => ProtocolVersion::V3_1_1,
            ("MQTT", 5) => ProtocolVersion::V5,
            ("MQIsdp", 3) => ProtocolVersion::V3_1,
            ("MQTT" | "MQIsdp", other) => {
                return Err(DecodeError::UnsupportedProtocolVersion(other))
            }
            _ => return Err(DecodeError::Protocol("unknown protocol name")),
        };
        Self::decode_rest(protocol, body).map_err(|e| DecodeError::InConnect {
            version: protocol,
            source: Box::new(e),
        })
    }

    fn decode_rest(protocol: ProtocolVersion, mut body: Bytes) -> Result<Connect, DecodeError> {
        let flags = read_u8(&mut body)?;
        if flags & 0x01 != 0 {
            return Err(DecodeError::Malformed("CONNECT reserved flag set"));
        }
        let clean_start = flags & 0x02 != 0;
        let will_flag = flags & 0x04 != 0;
        let will_qos = (flags >> 3) & 0x03;
        let will_retain = flags & 0x20 != 0;
        let has_password = flags & 0x40 != 0;
        let has_username = flags & 0x80 != 0;
        if !will_flag && (will_qos != 0 || will_retain) {
            return Err(DecodeError::Malformed(
                "will QoS or retain without will flag",
            ));
        }
        let will_qos = QoS::try_from(will_qos)?;
        if has_password && !has_username && !protocol.is_v5() {
            return Err(DecodeError::Malformed("password without user name"));
        }
        let keep_alive = read_u16(&mut body)?;
        let properties = if protocol.is_v5() {
            ConnectProperties::decode(&mut body)?
        } else {
            ConnectProperties::default()
        };
        let client_id = read_string(&mut body)?;
        let will = if will_flag {
            let properties = if protocol.is_v5() {
                WillProperties::decode(&mut body)?
            } else {
                WillProperties::default()
            };
            let topic = read_string(&mut body)?;
            topic::validate_topic_name(&topic).map_err(|_| DecodeError::TopicName("will topic"))?;
            let payload = read_binary(&mut body)?;
            Some(LastWill {
                topic,
                payload,
                qos: will_qos,
                retain: will_retain,
                properties,
            })
        } else {
            None
        };
        let username = if has_username {
            Some(read_string(&mut body)?)
        } else {
            None
        };
        let password = if has_password {
            Some(read_binary(&mut body)?)
        } else {
            None
        };
        super::expect_end(&body)?;
        Ok(Connect {
            protocol,
            clean_start,
            keep_alive,
            client_id,
            will,
            username,
            password,
            properties,
        })
    }

    pub(crate) fn body_len(&self) -> usize {
        let name = if self.protocol == ProtocolVersion::V3_1 {
            6
        } else {
            4
        };
        let v5 = self.protocol.is_v5();
        let mut n = field_len(name) + 1 + 1 + 2;
        if v5 {
            n += self.properties.block_len();
        }
        n += field_len(self.client_id.len());
        if let Some(w) = &self.will {
            if v5 {
                n += w.properties.block_len();
            }
            n += field_len(w.topic.len()) + field_len(w.payload.len());
        }
        if let Some(u) = &self.username {
            n += field_len(u.len());
        }
        if let Some(p) = &self.password {
            n += field_len(p.len());
        }
        n
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let name = if self.protocol == ProtocolVersion::V3_1 {
            "MQIsdp"
        } else {
            "MQTT"
        };
        write_string(out, name)?;
        out.put_u8(self.protocol.level());
        let mut flags = 0u8;
        if self.clean_start {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (u8::from(w.qos) << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        out.put_u8(flags);
        out.put_u16(self.keep_alive);
        let v5 = self.protocol.is_v5();
        if v5 {
            self.properties.write(out)?;
        }
        write_string(out, &self.client_id)?;
        if let Some(w) = &self.will {
            if v5 {
                w.properties.write(out)?;
            }
            write_string(out, &w.topic)?;
            write_binary(out, &w.payload)?;
        }
        if let Some(u) = &self.username {
            write_string(out, u)?;
        }
        if let Some(p) = &self.password {
            write_binary(out, p)?;
        }
        Ok(())
    }
}
