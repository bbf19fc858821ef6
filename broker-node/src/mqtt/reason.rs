//! Reason codes of MQTT 5.0 and their mapping to the return codes of 3.1/3.1.1.

/// Every MQTT 5.0 reason code. `0x00` has three names in the specification (Success,
/// Normal disconnection, Granted QoS 0); decoding yields [`ReasonCode::Success`]
/// except in SUBACK, where it yields [`ReasonCode::GrantedQoS0`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum ReasonCode {
    Success,
    GrantedQoS0,
    GrantedQoS1,
    GrantedQoS2,
    DisconnectWithWillMessage,
    NoMatchingSubscribers,
    NoSubscriptionExisted,
    ContinueAuthentication,
    ReAuthenticate,
    UnspecifiedError,
    MalformedPacket,
    ProtocolError,
    ImplementationSpecificError,
    UnsupportedProtocolVersion,
    ClientIdentifierNotValid,
    BadUserNameOrPassword,
    NotAuthorized,
    ServerUnavailable,
    ServerBusy,
    Banned,
    ServerShuttingDown,
    BadAuthenticationMethod,
    KeepAliveTimeout,
    SessionTakenOver,
    TopicFilterInvalid,
    TopicNameInvalid,
    PacketIdentifierInUse,
    PacketIdentifierNotFound,
    ReceiveMaximumExceeded,
    TopicAliasInvalid,
    PacketTooLarge,
    MessageRateTooHigh,
    QuotaExceeded,
    AdministrativeAction,
    PayloadFormatInvalid,
    RetainNotSupported,
    QoSNotSupported,
    UseAnotherServer,
    ServerMoved,
    SharedSubscriptionsNotSupported,
    ConnectionRateExceeded,
    MaximumConnectTime,
    SubscriptionIdentifiersNotSupported,
    WildcardSubscriptionsNotSupported,
}

/// A byte that is no MQTT 5.0 reason code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("0x{0:02x} is not a reason code")]
pub struct UnknownReasonCode(pub u8);

const TABLE: &[(u8, ReasonCode)] = {
    use ReasonCode::*;
    &[
        (0x00, Success),
        (0x01, GrantedQoS1),
        (0x02, GrantedQoS2),
        (0x04, DisconnectWithWillMessage),
        (0x10, NoMatchingSubscribers),
        (0x11, NoSubscriptionExisted),
        (0x18, ContinueAuthentication),
        (0x19, ReAuthenticate),
        (0x80, UnspecifiedError),
        (0x81, MalformedPacket),
        (0x82, ProtocolError),
        (0x83, ImplementationSpecificError),
        (0x84, UnsupportedProtocolVersion),
        (0x85, ClientIdentifierNotValid),
        (0x86, BadUserNameOrPassword),
        (0x87, NotAuthorized),
        (0x88, ServerUnavailable),
        (0x89, ServerBusy),
        (0x8A, Banned),
        (0x8B, ServerShuttingDown),
        (0x8C, BadAuthenticationMethod),
        (0x8D, KeepAliveTimeout),
        (0x8E, SessionTakenOver),
        (0x8F, TopicFilterInvalid),
        (0x90, TopicNameInvalid),
        (0x91, PacketIdentifierInUse),
        (0x92, PacketIdentifierNotFound),
        (0x93, ReceiveMaximumExceeded),
        (0x94, TopicAliasInvalid),
        (0x95, PacketTooLarge),
        (0x96, MessageRateTooHigh),
        (0x97, QuotaExceeded),
        (0x98, AdministrativeAction),
        (0x99, PayloadFormatInvalid),
        (0x9A, RetainNotSupported),
        (0x9B, QoSNotSupported),
        (0x9C, UseAnotherServer),
        (0x9D, ServerMoved),
        (0x9E, SharedSubscriptionsNotSupported),
        (0x9F, ConnectionRateExceeded),
        (0xA0, MaximumConnectTime),
        (0xA1, SubscriptionIdentifiersNotSupported),
        (0xA2, WildcardSubscriptionsNotSupported),
    ]
};

impl From<ReasonCode> for u8 {
    fn from(code: ReasonCode) -> u8 {
        if code == ReasonCode::GrantedQoS0 {
            return 0;
        }
        TABLE
            .iter()
            .find(|(_, c)| *c == code)
            .map_or(0x80, |(b, _)| *b)
    }
}

impl TryFrom<u8> for ReasonCode {
    type Error = UnknownReasonCode;

    fn try_from(b: u8) -> Result<Self, Self::Error> {
        TABLE
            .iter()
            .find(|(v, _)| *v == b)
            .map(|(_, c)| *c)
            .ok_or(UnknownReasonCode(b))
    }
}

impl ReasonCode {
    /// Whether the code reports a failure (0x80 and above).
    pub fn is_error(self) -> bool {
        u8::from(self) >= 0x80
    }

    /// The MQTT 3.1/3.1.1 CONNACK return code standing for this reason code.
    pub fn to_v3_connack(self) -> u8 {
        use ReasonCode::*;
        match self {
            Success => 0,
            UnsupportedProtocolVersion => 1,
            ClientIdentifierNotValid => 2,
            BadUserNameOrPassword => 4,
            NotAuthorized | Banned | BadAuthenticationMethod => 5,
            _ => 3,
        }
    }

    /// The reason code a 3.1/3.1.1 CONNACK return code stands for.
    pub fn from_v3_connack(rc: u8) -> Option<ReasonCode> {
        use ReasonCode::*;
        Some(match rc {
            0 => Success,
            1 => UnsupportedProtocolVersion,
            2 => ClientIdentifierNotValid,
            3 => ServerUnavailable,
            4 => BadUserNameOrPassword,
            5 => NotAuthorized,
            _ => return None,
        })
    }

    /// The 3.1.1 SUBACK return code for this reason code (granted QoS or 0x80).
    pub fn to_v3_suback(self) -> u8 {
        match self {
            ReasonCode::GrantedQoS0 | ReasonCode::Success => 0,
            ReasonCode::GrantedQoS1 => 1,
            ReasonCode::GrantedQoS2 => 2,
            _ => 0x80,
        }
    }

    /// The reason code a SUBACK byte stands for (0 is Granted QoS 0 there).
    pub fn from_suback(b: u8) -> Result<ReasonCode, UnknownReasonCode> {
        match b {
            0 => Ok(ReasonCode::GrantedQoS0),
            other => ReasonCode::try_from(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_byte() {
        for (b, code) in TABLE {
            assert_eq!(u8::from(*code), *b);
            assert_eq!(ReasonCode::try_from(*b), Ok(*code));
        }
        assert_eq!(
            TABLE.len(),
            43,
            "all of MQTT 5.0's codes but the 0x00 aliases"
        );
        assert_eq!(ReasonCode::try_from(0x03), Err(UnknownReasonCode(0x03)));
        assert_eq!(u8::from(ReasonCode::GrantedQoS0), 0);
    }

    #[test]
    fn v3_return_codes_map_both_ways() {
        for rc in 0..=5u8 {
            let code = ReasonCode::from_v3_connack(rc).unwrap();
            assert_eq!(code.to_v3_connack(), rc);
        }
        assert_eq!(ReasonCode::from_v3_connack(6), None);
        assert_eq!(ReasonCode::TopicFilterInvalid.to_v3_suback(), 0x80);
    }
}
