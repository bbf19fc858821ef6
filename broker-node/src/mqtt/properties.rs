//! MQTT 5.0 properties (section 2.2.2): every property identifier with its wire type,
//! and one typed struct per packet kind holding the properties that packet may carry.
//!
//! Decoding goes through [`read_properties`], which reads each (identifier, value)
//! pair by the identifier's wire type and hands it to the packet's struct; a property
//! the packet may not carry, or a single-valued property given twice, is a protocol
//! error. Encoding goes through [`PropSink`], so one `emit` function per struct both
//! counts and writes the bytes.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{
    field_len, read_binary, read_pair, read_string, read_u16, read_u32, read_u8, read_varint,
    varint_len, write_binary, write_string, write_varint,
};
use super::error::{DecodeError, EncodeError};

/// Property identifiers.
#[allow(missing_docs)]
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// A property value as read off the wire.
#[derive(Debug)]
pub enum PropValue {
    /// Byte.
    Byte(u8),
    /// Two-byte integer.
    U16(u16),
    /// Four-byte integer.
    U32(u32),
    /// Variable byte integer.
    VarInt(u32),
    /// UTF-8 string.
    Str(String),
    /// Binary data.
    Bin(Bytes),
    /// UTF-8 string pair.
    Pair(String, String),
}

/// Read a property block (length, then properties) and pass each to `f`.
pub fn read_properties(
    buf: &mut Bytes,
    mut f: impl FnMut(u8, PropValue) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let len = read_varint(buf)? as usize;
    if len > buf.len() {
        return Err(DecodeError::Malformed("property length exceeds the packet"));
    }
    let mut props = buf.split_to(len);
    while !props.is_empty() {
        let pid = read_varint(&mut props)?;
        let pid = u8::try_from(pid).map_err(|_| DecodeError::Malformed("unknown property"))?;
        use id::*;
        let value = match pid {
            PAYLOAD_FORMAT_INDICATOR
            | REQUEST_PROBLEM_INFORMATION
            | REQUEST_RESPONSE_INFORMATION
            | MAXIMUM_QOS
            | RETAIN_AVAILABLE
            | WILDCARD_SUBSCRIPTION_AVAILABLE
            | SUBSCRIPTION_IDENTIFIER_AVAILABLE
            | SHARED_SUBSCRIPTION_AVAILABLE => PropValue::Byte(read_u8(&mut props)?),
            SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => {
                PropValue::U16(read_u16(&mut props)?)
            }
            MESSAGE_EXPIRY_INTERVAL
            | SESSION_EXPIRY_INTERVAL
            | WILL_DELAY_INTERVAL
            | MAXIMUM_PACKET_SIZE => PropValue::U32(read_u32(&mut props)?),
            SUBSCRIPTION_IDENTIFIER => PropValue::VarInt(read_varint(&mut props)?),
            CONTENT_TYPE
            | RESPONSE_TOPIC
            | ASSIGNED_CLIENT_IDENTIFIER
            | AUTHENTICATION_METHOD
            | RESPONSE_INFORMATION
            | SERVER_REFERENCE
            | REASON_STRING => PropValue::Str(read_string(&mut props)?),
            CORRELATION_DATA | AUTHENTICATION_DATA => PropValue::Bin(read_binary(&mut props)?),
            USER_PROPERTY => {
                let (k, v) = read_pair(&mut props)?;
                PropValue::Pair(k, v)
            }
            _ => return Err(DecodeError::Malformed("unknown property identifier")),
        };
        f(pid, value)?;
    }
    Ok(())
}

/// Store a single-valued property, refusing a second occurrence [MQTT-2.2.2-2].
fn once<T>(slot: &mut Option<T>, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Protocol("property given twice"));
    }
    *slot = Some(value);
    Ok(())
}

fn not_allowed() -> DecodeError {
    DecodeError::Protocol("property not allowed in this packet")
}

fn flag(v: u8) -> Result<bool, DecodeError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::Protocol("property value must be 0 or 1")),
    }
}

/// Where an encoded property goes: a counter or a buffer.
pub trait PropSink {
    /// One byte-valued property.
    fn byte(&mut self, id: u8, v: u8);
    /// A two-byte integer property.
    fn u16(&mut self, id: u8, v: u16);
    /// A four-byte integer property.
    fn u32(&mut self, id: u8, v: u32);
    /// A variable byte integer property.
    fn varint(&mut self, id: u8, v: u32);
    /// A string or binary property.
    fn bin(&mut self, id: u8, v: &[u8]);
    /// A string pair property.
    fn pair(&mut self, id: u8, k: &str, v: &str);
}

/// Counts the bytes properties take.
#[derive(Default)]
pub struct Counter(pub usize);

impl PropSink for Counter {
    fn byte(&mut self, _: u8, _: u8) {
        self.0 += 2;
    }
    fn u16(&mut self, _: u8, _: u16) {
        self.0 += 3;
    }
    fn u32(&mut self, _: u8, _: u32) {
        self.0 += 5;
    }
    fn varint(&mut self, _: u8, v: u32) {
        self.0 += 1 + varint_len(v as usize);
    }
    fn bin(&mut self, _: u8, v: &[u8]) {
        self.0 += 1 + field_len(v.len());
    }
    fn pair(&mut self, _: u8, k: &str, v: &str) {
        self.0 += 1 + field_len(k.len()) + field_len(v.len());
    }
}

/// Writes properties to a buffer, remembering the first field that was too long.
pub struct Writer<'a> {
    out: &'a mut BytesMut,
    error: Option<EncodeError>,
}

impl PropSink for Writer<'_> {
    fn byte(&mut self, id: u8, v: u8) {
        self.out.put_u8(id);
        self.out.put_u8(v);
    }
    fn u16(&mut self, id: u8, v: u16) {
        self.out.put_u8(id);
        self.out.put_u16(v);
    }
    fn u32(&mut self, id: u8, v: u32) {
        self.out.put_u8(id);
        self.out.put_u32(v);
    }
    fn varint(&mut self, id: u8, v: u32) {
        self.out.put_u8(id);
        if let Err(e) = write_varint(self.out, v as usize) {
            self.error.get_or_insert(e);
        }
    }
    fn bin(&mut self, id: u8, v: &[u8]) {
        self.out.put_u8(id);
        if let Err(e) = write_binary(self.out, v) {
            self.error.get_or_insert(e);
        }
    }
    fn pair(&mut self, id: u8, k: &str, v: &str) {
        self.out.put_u8(id);
        for s in [k, v] {
            if let Err(e) = write_string(self.out, s) {
                self.error.get_or_insert(e);
            }
        }
    }
}

/// A typed property set of one packet kind.
pub trait Properties: Default {
    /// Take one decoded property, or refuse it.
    fn take(&mut self, id: u8, value: PropValue) -> Result<(), DecodeError>;
    /// Emit every present property.
    fn emit(&self, sink: &mut dyn PropSink);

    /// Decode a property block into this set.
    fn decode(buf: &mut Bytes) -> Result<Self, DecodeError> {
        let mut props = Self::default();
        read_properties(buf, |id, value| props.take(id, value))?;
        Ok(props)
    }

    /// Bytes of the properties alone (without the length prefix).
    fn body_len(&self) -> usize {
        let mut c = Counter::default();
        self.emit(&mut c);
        c.0
    }

    /// Bytes of the property block (length prefix included).
    fn block_len(&self) -> usize {
        let n = self.body_len();
        varint_len(n) + n
    }

    /// Write the property block (length prefix included).
    fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        write_varint(out, self.body_len())?;
        let mut w = Writer { out, error: None };
        self.emit(&mut w);
        match w.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether no property is present (acks may then use their short form).
    fn is_empty(&self) -> bool {
        self.body_len() == 0
    }
}

fn emit_users(sink: &mut dyn PropSink, users: &[(String, String)]) {
    for (k, v) in users {
        sink.pair(id::USER_PROPERTY, k, v);
    }
}

type Users = Vec<(String, String)>;

macro_rules! user {
    ($self:ident, $value:ident) => {
        match $value {
            PropValue::Pair(k, v) => {
                $self.user_properties.push((k, v));
                Ok(())
            }
            _ => Err(not_allowed()),
        }
    };
}

/// Properties of CONNECT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ConnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    pub request_response_information: Option<u8>,
    pub request_problem_information: Option<u8>,
    pub user_properties: Users,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
}

impl Properties for ConnectProperties {
    fn take(&mut self, pid: u8, value: PropValue) -> Result<(), DecodeError> {
        use id::*;
        match (pid, value) {
            (SESSION_EXPIRY_INTERVAL, PropValue::U32(v)) => {
                once(&mut self.session_expiry_interval, v)
            }
            (RECEIVE_MAXIMUM, PropValue::U16(0)) => Err(DecodeError::Protocol("receive maximum 0")),
            (RECEIVE_MAXIMUM, PropValue::U16(v)) => once(&mut self.receive_maximum, v),
            (MAXIMUM_PACKET_SIZE, PropValue::U32(0)) => {
                Err(DecodeError::Protocol("maximum packet size 0"))
            }
            (MAXIMUM_PACKET_SIZE, PropValue::U32(v)) => once(&mut self.maximum_packet_size, v),
            (TOPIC_ALIAS_MAXIMUM, PropValue::U16(v)) => once(&mut self.topic_alias_maximum, v),
            (REQUEST_RESPONSE_INFORMATION, PropValue::Byte(v)) => {
                flag(v)?;
                once(&mut self.request_response_information, v)
            }
            (REQUEST_PROBLEM_INFORMATION, PropValue::Byte(v)) => {
                flag(v)?;
                once(&mut self.request_problem_information, v)
            }
            (AUTHENTICATION_METHOD, PropValue::Str(v)) => once(&mut self.authentication_method, v),
            (AUTHENTICATION_DATA, PropValue::Bin(v)) => once(&mut self.authentication_data, v),
            (USER_PROPERTY, v) => user!(self, v),
            _ => Err(not_allowed()),
        }
    }

    fn emit(&self, s: &mut dyn PropSink) {
        use id::*;
        if let Some(v) = self.session_expiry_interval {
            s.u32(SESSION_EXPIRY_INTERVAL, v);
        }
        if let Some(v) = self.receive_maximum {
            s.u16(RECEIVE_MAXIMUM, v);
        }
        if let Some(v) = self.maximum_packet_size {
            s.u32(MAXIMUM_PACKET_SIZE, v);
        }
        if let Some(v) = self.topic_alias_maximum {
            s.u16(TOPIC_ALIAS_MAXIMUM, v);
        }
        if let Some(v) = self.request_response_information {
            s.byte(REQUEST_RESPONSE_INFORMATION, v);
        }
        if let Some(v) = self.request_problem_information {
            s.byte(REQUEST_PROBLEM_INFORMATION, v);
        }
        emit_users(s, &self.user_properties);
        if let Some(v) = &self.authentication_method {
            s.bin(AUTHENTICATION_METHOD, v.as_bytes());
        }
        if let Some(v) = &self.authentication_data {
            s.bin(AUTHENTICATION_DATA, v);
        }
    }
}

/// Properties of a will (in the CONNECT payload).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct WillProperties {
    pub will_delay_interval: Option<u32>,
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Users,
}

impl Properties for WillProperties {
    fn take(&mut self, pid: u8, value: PropValue) -> Result<(), DecodeError> {
        use id::*;
        match (pid, value) {
            (WILL_DELAY_INTERVAL, PropValue::U32(v)) => once(&mut self.will_delay_interval, v),
            (PAYLOAD_FORMAT_INDICATOR, PropValue::Byte(v)) => {
                flag(v)?;
                once(&mut self.payload_format_indicator, v)
            }
            (MESSAGE_EXPIRY_INTERVAL, PropValue::U32(v)) => {
                once(&mut self.message_expiry_interval, v)
            }
            (CONTENT_TYPE, PropValue::Str(v)) => once(&mut self.content_type, v),
            (RESPONSE_TOPIC, PropValue::Str(v)) => once(&mut self.response_topic, v),
            (CORRELATION_DATA, PropValue::Bin(v)) => once(&mut self.correlation_data, v),
            (USER_PROPERTY, v) => user!(self, v),
            _ => Err(not_allowed()),
        }
    }

    fn emit(&self, s: &mut dyn PropSink) {
        use id::*;
        if let Some(v) = self.will_delay_interval {
            s.u32(WILL_DELAY_INTERVAL, v);
        }
        if let Some(v) = self.payload_format_indicator {
            s.byte(PAYLOAD_FORMAT_INDICATOR, v);
        }
        if let Some(v) = self.message_expiry_interval {
            s.u32(MESSAGE_EXPIRY_INTERVAL, v);
        }
        if let Some(v) = &self.content_type {
            s.bin(CONTENT_TYPE, v.as_bytes());
        }
        if let Some(v) = &self.response_topic {
            s.bin(RESPONSE_TOPIC, v.as_bytes());
        }
        if let Some(v) = &self.correlation_data {
            s.bin(CORRELATION_DATA, v);
        }
        emit_users(s, &self.user_properties);
    }
}

/// Properties of CONNACK.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ConnAckProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<bool>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub topic_alias_maximum: Option<u16>,
    pub reason_string: Option<String>,
    pub user_properties: Users,
    pub wildcard_subscription_available: Option<bool>,
    pub subscription_identifiers_available: Option<bool>,
    pub shared_subscription_available: Option<bool>,
    pub server_keep_alive: Option<u16>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
}

impl Properties for ConnAckProperties {
    fn take(&mut self, pid: u8, value: PropValue) -> Result<(), DecodeError> {
        use id::*;
        match (pid, value) {
            (SESSION_EXPIRY_INTERVAL, PropValue::U32(v)) => {
                once(&mut self.session_expiry_interval, v)
            }
            (RECEIVE_MAXIMUM, PropValue::U16(0)) => Err(DecodeError::Protocol("receive maximum 0")),
            (RECEIVE_MAXIMUM, PropValue::U16(v)) => once(&mut self.receive_maximum, v),
            (MAXIMUM_QOS, PropValue::Byte(v)) => {
                flag(v)?;
                once(&mut self.maximum_qos, v)
            }
            (RETAIN_AVAILABLE, PropValue::Byte(v)) => once(&mut self.retain_available, flag(v)?),
            (MAXIMUM_PACKET_SIZE, PropValue::U32(0)) => {
                Err(DecodeError::Protocol("maximum packet size 0"))
            }
            (MAXIMUM_PACKET_SIZE, PropValue::U32(v)) => once(&mut self.maximum_packet_size, v),
            (ASSIGNED_CLIENT_IDENTIFIER, PropValue::Str(v)) => {
                once(&mut self.assigned_client_identifier, v)
            }
            (TOPIC_ALIAS_MAXIMUM, PropValue::U16(v)) => once(&mut self.topic_alias_maximum, v),
            (REASON_STRING, PropValue::Str(v)) => once(&mut self.reason_string, v),
            (WILDCARD_SUBSCRIPTION_AVAILABLE, PropValue::Byte(v)) => {
                once(&mut self.wildcard_subscription_available, flag(v)?)
            }
            (SUBSCRIPTION_IDENTIFIER_AVAILABLE, PropValue::Byte(v)) => {
                once(&mut self.subscription_identifiers_available, flag(v)?)
            }
            (SHARED_SUBSCRIPTION_AVAILABLE, PropValue::Byte(v)) => {
                once(&mut self.shared_subscription_available, flag(v)?)
            }
            (SERVER_KEEP_ALIVE, PropValue::U16(v)) => once(&mut self.server_keep_alive, v),
            (RESPONSE_INFORMATION, PropValue::Str(v)) => once(&mut self.response_information, v),
            (SERVER_REFERENCE, PropValue::Str(v)) => once(&mut self.server_reference, v),
            (AUTHENTICATION_METHOD, PropValue::Str(v)) => once(&mut self.authentication_method, v),
            (AUTHENTICATION_DATA, PropValue::Bin(v)) => once(&mut self.authentication_data, v),
            (USER_PROPERTY, v) => user!(self, v),
            _ => Err(not_allowed()),
        }
    }

    fn emit(&self, s: &mut dyn PropSink) {
        use id::*;
        if let Some(v) = self.session_expiry_interval {
            s.u32(SESSION_EXPIRY_INTERVAL, v);
        }
        if let Some(v) = self.receive_maximum {
            s.u16(RECEIVE_MAXIMUM, v);
        }
        if let Some(v) = self.maximum_qos {
            s.byte(MAXIMUM_QOS, v);
        }
        if let Some(v) = self.retain_available {
            s.byte(RETAIN_AVAILABLE, u8::from(v));
        }
        if let Some(v) = self.maximum_packet_size {
            s.u32(MAXIMUM_PACKET_SIZE, v);
        }
        if let Some(v) = &self.assigned_client_identifier {
            s.bin(ASSIGNED_CLIENT_IDENTIFIER, v.as_bytes());
        }
        if let Some(v) = self.topic_alias_maximum {
            s.u16(TOPIC_ALIAS_MAXIMUM, v);
        }
        if let Some(v) = &self.reason_string {
            s.bin(REASON_STRING, v.as_bytes());
        }
        emit_users(s, &self.user_properties);
        if let Some(v) = self.wildcard_subscription_available {
            s.byte(WILDCARD_SUBSCRIPTION_AVAILABLE, u8::from(v));
        }
        if let Some(v) = self.subscription_identifiers_available {
            s.byte(SUBSCRIPTION_IDENTIFIER_AVAILABLE, u8::from(v));
        }
        if let Some(v) = self.shared_subscription_available {
            s.byte(SHARED_SUBSCRIPTION_AVAILABLE, u8::from(v));
        }
        if let Some(v) = self.server_keep_alive {
            s.u16(SERVER_KEEP_ALIVE, v);
        }
        if let Some(v) = &self.response_information {
            s.bin(RESPONSE_INFORMATION, v.as_bytes());
        }
        if let Some(v) = &self.server_reference {
            s.bin(SERVER_REFERENCE, v.as_bytes());
        }
        if let Some(v) = &self.authentication_method {
            s.bin(AUTHENTICATION_METHOD, v.as_bytes());
        }
        if let Some(v) = &self.authentication_data {
            s.bin(AUTHENTICATION_DATA, v);
        }
    }
}

/// Properties of PUBLISH.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct PublishProperties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub topic_alias: Option<u16>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Users,
    /// Several when the message matched several subscriptions of the receiver.
    pub subscription_identifiers: Vec<u32>,
    pub content_type: Option<String>,
}

impl Properties for PublishProperties {
    fn take(&mut self, pid: u8, value: PropValue) -> Result<(), DecodeError> {
        use id::*;
        match (pid, value) {
            (PAYLOAD_FORMAT_INDICATOR, PropValue::Byte(v)) => {
                flag(v)?;
                once(&mut self.payload_format_indicator, v)
            }
            (MESSAGE_EXPIRY_INTERVAL, PropValue::U32(v)) => {
                once(&mut self.message_expiry_interval, v)
            }
            (TOPIC_ALIAS, PropValue::U16(0)) => Err(DecodeError::Protocol("topic alias 0")),
            (TOPIC_ALIAS, PropValue::U16(v)) => once(&mut self.topic_alias, v),
            (RESPONSE_TOPIC, PropValue::Str(v)) => {
                if v.contains(['+', '#']) {
                    return Err(DecodeError::Protocol("response topic contains a wildcard"));
                }
                once(&mut self.response_topic, v)
            }
            (CORRELATION_DATA, PropValue::Bin(v)) => once(&mut self.correlation_data, v),
            (SUBSCRIPTION_IDENTIFIER, PropValue::VarInt(0)) => {
                Err(DecodeError::Protocol("subscription identifier 0"))
            }
            (SUBSCRIPTION_IDENTIFIER, PropValue::VarInt(v)) => {
                self.subscription_identifiers.push(v);
                Ok(())
            }
            (CONTENT_TYPE, PropValue::Str(v)) => once(&mut self.content_type, v),
            (USER_PROPERTY, v) => user!(self, v),
            _ => Err(not_allowed()),
        }
    }

    fn emit(&self, s: &mut dyn PropSink) {
        use id::*;
        if let Some(v) = self.payload_format_indicator {
            s.byte(PAYLOAD_FORMAT_INDICATOR, v);
        }
        if let Some(v) = self.message_expiry_interval {
            s.u32(MESSAGE_EXPIRY_INTERVAL, v);
        }
        if let Some(v) = self.topic_alias {
            s.u16(TOPIC_ALIAS, v);
        }
        if let Some(v) = &self.response_topic {
            s.bin(RESPONSE_TOPIC, v.as_bytes());
        }
        if let Some(v) = &self.correlation_data {
            s.bin(CORRELATION_DATA, v);
        }
        emit_users(s, &self.user_properties);
        for v in &self.subscription_identifiers {
            s.varint(SUBSCRIPTION_IDENTIFIER, *v);
        }
        if let Some(v) = &self.content_type {
            s.bin(CONTENT_TYPE, v.as_bytes());
        }
    }
}

/// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct AckProperties {
    pub reason_string: Option<String>,
    pub user_properties: Users,
}

impl Properties for AckProperties {
    fn take(&mut self, pid: u8, value: PropValue) -> Result<(), DecodeError> {
        match (pid, value) {
            (id::REASON_STRING, PropValue::Str(v)) => once(&mut self.reason_string, v),
            (id::USER_PROPERTY, v) => user!(self, v),
            _ => Err(not_allowed()),
        }
    }

    fn emit(&self, s: &mut dyn PropSink) {
        if let Some(v) = &self.reason_string {
            s.bin(id::REASON_STRING, v.as_bytes());
        }
        emit_users(s, &self.user_properties);
    }
}

/// Properties of SUBSCRIBE.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SubscribeProperties {
    pub subscription_identifier: Option<u32>,
    pub user_properties: Users,
}

impl Properties for SubscribeProperties {
    fn take(&mut self, pid: u8, value: PropValue) -> Result<(), DecodeError> {
        match (pid, value) {
            (id::SUBSCRIPTION_IDENTIFIER, PropValue::VarInt(0)) => {
                Err(DecodeError::Protocol("subscription identifier 0"))
            }
            (id::SUBSCRIPTION_IDENTIFIER, PropValue::VarInt(v)) => {
                once(&mut self.subscription_identifier, v)
            }
            (id::USER_PROPERTY, v) => user!(self, v),
            _ => Err(not_allowed()),
        }
    }

    fn emit(&self, s: &mut dyn PropSink) {
        if let Some(v) = self.subscription_identifier {
            s.varint(id::SUBSCRIPTION_IDENTIFIER, v);
        }
        emit_users(s, &self.user_properties);
    }
}

/// Properties of UNSUBSCRIBE.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct UnsubscribeProperties {
    pub user_properties: Users,
}

impl Properties for UnsubscribeProperties {
    fn take(&mut self, pid: u8, value: PropValue) -> Result<(), DecodeError> {
        match (pid, value) {
            (id::USER_PROPERTY, v) => user!(self, v),
            _ => Err(not_allowed()),
        }
    }

    fn emit(&self, s: &mut dyn PropSink) {
        emit_users(s, &self.user_properties);
    }
}

/// Properties of DISCONNECT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct DisconnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub reason_string: Option<String>,
    pub user_properties: Users,
    pub server_reference: Option<String>,
}

impl Properties for DisconnectProperties {
    fn take(&mut self, pid: u8, value: PropValue) -> Result<(), DecodeError> {
        use id::*;
        match (pid, value) {
            (SESSION_EXPIRY_INTERVAL, PropValue::U32(v)) => {
                once(&mut self.session_expiry_interval, v)
            }
            (REASON_STRING, PropValue::Str(v)) => once(&mut self.reason_string, v),
            (SERVER_REFERENCE, PropValue::Str(v)) => once(&mut self.server_reference, v),
            (USER_PROPERTY, v) => user!(self, v),
            _ => Err(not_allowed()),
        }
    }

    fn emit(&self, s: &mut dyn PropSink) {
        use id::*;
        if let Some(v) = self.session_expiry_interval {
            s.u32(SESSION_EXPIRY_INTERVAL, v);
        }
        if let Some(v) = &self.reason_string {
            s.bin(REASON_STRING, v.as_bytes());
        }
        emit_users(s, &self.user_properties);
        if let Some(v) = &self.server_reference {
            s.bin(SERVER_REFERENCE, v.as_bytes());
        }
    }
}

/// Properties of AUTH.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct AuthProperties {
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub reason_string: Option<String>,
    pub user_properties: Users,
}

impl Properties for AuthProperties {
    fn take(&mut self, pid: u8, value: PropValue) -> Result<(), DecodeError> {
        use id::*;
        match (pid, value) {
            (AUTHENTICATION_METHOD, PropValue::Str(v)) => once(&mut self.authentication_method, v),
            (AUTHENTICATION_DATA, PropValue::Bin(v)) => once(&mut self.authentication_data, v),
            (REASON_STRING, PropValue::Str(v)) => once(&mut self.reason_string, v),
            (USER_PROPERTY, v) => user!(self, v),
            _ => Err(not_allowed()),
        }
    }

    fn emit(&self, s: &mut dyn PropSink) {
        use id::*;
        if let Some(v) = &self.authentication_method {
            s.bin(AUTHENTICATION_METHOD, v.as_bytes());
        }
        if let Some(v) = &self.authentication_data {
            s.bin(AUTHENTICATION_DATA, v);
        }
        if let Some(v) = &self.reason_string {
            s.bin(REASON_STRING, v.as_bytes());
        }
        emit_users(s, &self.user_properties);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(bytes: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        write_varint(&mut b, bytes.len()).unwrap();
        b.put_slice(bytes);
        b.freeze()
    }

    #[test]
    fn mqtt_2_2_2_2_repeated_single_valued_property_is_a_protocol_error() {
        // Two Message Expiry Intervals.
        let mut b = block(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2]);
        assert_eq!(
            PublishProperties::decode(&mut b),
            Err(DecodeError::Protocol("property given twice"))
        );
    }

    #[test]
    fn mqtt_2_2_2_property_in_the_wrong_packet_is_a_protocol_error() {
        // Session Expiry Interval is not a PUBLISH property.
        let mut b = block(&[0x11, 0, 0, 0, 10]);
        assert!(matches!(
            PublishProperties::decode(&mut b),
            Err(DecodeError::Protocol(_))
        ));
        // Topic Alias is not a CONNECT property.
        let mut b = block(&[0x23, 0, 1]);
        assert!(matches!(
            ConnectProperties::decode(&mut b),
            Err(DecodeError::Protocol(_))
        ));
    }

    #[test]
    fn user_properties_and_subscription_identifiers_may_repeat_in_order() {
        let mut b = block(&[
            0x26, 0, 1, b'a', 0, 1, b'1', // user property a=1
            0x26, 0, 1, b'a', 0, 1, b'2', // user property a=2
            0x0B, 0x05, // subscription identifier 5
            0x0B, 0x80, 0x01, // subscription identifier 128
        ]);
        let p = PublishProperties::decode(&mut b).unwrap();
        assert_eq!(
            p.user_properties,
            vec![("a".into(), "1".into()), ("a".into(), "2".into())]
        );
        assert_eq!(p.subscription_identifiers, vec![5, 128]);
    }

    #[test]
    fn out_of_range_values_are_protocol_errors() {
        for bad in [&[0x21u8, 0, 0][..], &[0x27, 0, 0, 0, 0], &[0x17, 2]] {
            let mut b = block(bad);
            assert!(
                matches!(
                    ConnectProperties::decode(&mut b),
                    Err(DecodeError::Protocol(_))
                ),
                "{bad:?}"
            );
        }
        let mut b = block(&[0x01, 2]);
        assert!(
            PublishProperties::decode(&mut b).is_err(),
            "payload format indicator 2"
        );
        let mut b = block(&[0x0B, 0]);
        assert!(
            SubscribeProperties::decode(&mut b).is_err(),
            "subscription identifier 0"
        );
    }

    #[test]
    fn truncated_or_overlong_property_blocks_are_malformed() {
        let mut b = Bytes::from_static(&[5, 0x02, 0, 0]);
        assert!(matches!(
            PublishProperties::decode(&mut b),
            Err(DecodeError::Malformed(_))
        ));
        let mut b = block(&[0x02, 0, 0]);
        assert!(matches!(
            PublishProperties::decode(&mut b),
            Err(DecodeError::Malformed(_))
        ));
        let mut b = block(&[0x7F, 0]);
        assert!(matches!(
            PublishProperties::decode(&mut b),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn encoded_block_length_matches_what_is_written() {
        let p = ConnAckProperties {
            receive_maximum: Some(10),
            assigned_client_identifier: Some("abc".into()),
            user_properties: vec![("k".into(), "v".into())],
            retain_available: Some(true),
            ..Default::default()
        };
        let mut out = BytesMut::new();
        p.write(&mut out).unwrap();
        assert_eq!(out.len(), p.block_len());
        let mut b = out.freeze();
        assert_eq!(ConnAckProperties::decode(&mut b).unwrap(), p);
    }
}
