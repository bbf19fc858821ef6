//! The encoding of forwarded messages inside a `ForwardFrame`.
//!
//! Every message that crosses nodes goes through this code twice, so it is laid out for
//! speed: lengths and fixed-size fields in little-endian order, the v5 properties
//! (absent from most messages) as one optional bincode block, and a decoder that walks
//! the frame without building intermediate vectors. Each message decodes to one
//! `Arc<Message>` (its topic, payload and publisher copied out of the frame, so a slow
//! subscriber holding one message does not pin the whole frame) and its targets are
//! read in place, their client ids borrowed from the frame.
//!
//! ```text
//! frame   = count:u32 message*
//! message = topic:str16 payload:bytes32 flags:u8 age_ms:u64
//!           [origin:str16] [properties:bytes32] targets:u16 target*
//!           flags: qos (bits 0-1), retain (2), has origin (3), has properties (4)
//! target  = client:str16 flags:u8 ids:u16 id:u32* [group:str16]
//!           flags: qos (bits 0-1), retain (2), has group (3)
//! ```
//!
//! A message travels with its age (milliseconds since the sending node accepted it),
//! not its acceptance time: the receiving node dates it on its own clock, so a node
//! whose clock is off neither expires another node's messages early nor keeps them
//! too long.

use std::sync::Arc;

use bytes::Bytes;

use super::command::{Message, MessageProperties};
use super::forward::Forwarded;

const RETAIN: u8 = 1 << 2;
const HAS_ORIGIN: u8 = 1 << 3;
const HAS_PROPERTIES: u8 = 1 << 4;
const HAS_GROUP: u8 = 1 << 3;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The frame ends inside a field.
    #[error("frame truncated at byte {0}")]
    Truncated(usize),
    /// A topic, client id or group is not UTF-8.
    #[error("invalid UTF-8 at byte {0}")]
    Utf8(usize),
    /// A field does not fit its 16- or 32-bit length.
    #[error("a {0} is too long for a forward frame")]
    TooLong(&'static str),
    /// The properties block is not a valid encoding.
    #[error("invalid message properties: {0}")]
    Properties(String),
}

/// The size of `items` encoded (before properties blocks, which are rare), so that a
/// frame's buffer is allocated once.
pub fn encoded_len(items: &[Forwarded]) -> usize {
    4 + items
        .iter()
        .map(|item| {
            let m = &*item.message;
            2 + m.topic.len()
                + 4
                + m.payload.len()
                + 1
                + 8
                + m.origin_client.as_ref().map_or(0, |o| 2 + o.len())
                + 2
                + item
                    .targets
                    .iter()
                    .map(|t| {
                        2 + t.client_id.len()
                            + 3
                            + 4 * t.subscription_ids.len()
                            + t.shared_group.as_ref().map_or(0, |g| 2 + g.len())
                    })
                    .sum::<usize>()
        })
        .sum::<usize>()
}

/// Append `items` to `out` as one frame.
pub fn encode(items: &[Forwarded], now_ms: u64, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let count = u32::try_from(items.len()).map_err(|_| FrameError::TooLong("frame"))?;
    out.extend_from_slice(&count.to_le_bytes());
    for item in items {
        let m = &*item.message;
        put_str16(out, &m.topic, "topic")?;
        put_bytes32(out, &m.payload, "payload")?;
        let has_properties = m.properties != MessageProperties::default();
        let flags = (m.qos & 3)
            | if m.retain { RETAIN } else { 0 }
            | if m.origin_client.is_some() {
                HAS_ORIGIN
            } else {
                0
            }
            | if has_properties { HAS_PROPERTIES } else { 0 };
        out.push(flags);
        out.extend_from_slice(&now_ms.saturating_sub(m.received_at_ms).to_le_bytes());
        if let Some(origin) = &m.origin_client {
            put_str16(out, origin, "client id")?;
        }
        if has_properties {
            let block = bincode::serialize(&m.properties)
                .map_err(|e| FrameError::Properties(e.to_string()))?;
            put_bytes32(out, &block, "properties block")?;
        }
        let targets =
            u16::try_from(item.targets.len()).map_err(|_| FrameError::TooLong("target list"))?;
        out.extend_from_slice(&targets.to_le_bytes());
        for t in &item.targets {
            put_str16(out, &t.client_id, "client id")?;
            let flags = (t.qos & 3)
                | if t.retain { RETAIN } else { 0 }
                | if t.shared_group.is_some() {
                    HAS_GROUP
                } else {
                    0
                };
            out.push(flags);
            let ids = u16::try_from(t.subscription_ids.len())
                .map_err(|_| FrameError::TooLong("subscription id list"))?;
            out.extend_from_slice(&ids.to_le_bytes());
            for id in &t.subscription_ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
            if let Some(group) = &t.shared_group {
                put_str16(out, group, "shared group")?;
            }
        }
    }
    Ok(())
}

fn put_str16(out: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), FrameError> {
    let len = u16::try_from(s.len()).map_err(|_| FrameError::TooLong(what))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8], what: &'static str) -> Result<(), FrameError> {
    let len = u32::try_from(b.len()).map_err(|_| FrameError::TooLong(what))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
    Ok(())
}

/// A cursor over an encoded frame.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(FrameError::Truncated(self.buf.len()))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn str16(&mut self) -> Result<&'a str, FrameError> {
        let len = usize::from(self.u16()?);
        let at = self.pos;
        std::str::from_utf8(self.take(len)?).map_err(|_| FrameError::Utf8(at))
    }

    fn bytes32(&mut self) -> Result<&'a [u8], FrameError> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

/// Reads a frame message by message.
pub struct FrameReader<'a> {
    cursor: Cursor<'a>,
    left: u32,
    /// This node's clock, to date messages by their age.
    now_ms: u64,
}

/// One client a decoded message is for, borrowed from the frame.
#[derive(Debug, PartialEq, Eq)]
pub struct TargetRef<'a> {
    /// The client on this node.
    pub client_id: &'a str,
    /// Delivery QoS.
    pub qos: u8,
    /// RETAIN flag to send.
    pub retain: bool,
    /// Identifiers of the matching subscriptions.
    pub subscription_ids: Vec<u32>,
    /// The shared group the client was chosen for.
    pub shared_group: Option<&'a str>,
}

impl<'a> FrameReader<'a> {
    /// A reader over `frame`, dating messages on this node's clock (`now_ms`).
    pub fn new(frame: &'a [u8], now_ms: u64) -> Result<FrameReader<'a>, FrameError> {
        let mut cursor = Cursor { buf: frame, pos: 0 };
        let left = cursor.u32()?;
        Ok(FrameReader {
            cursor,
            left,
            now_ms,
        })
    }

    /// Messages not read yet.
    pub fn remaining(&self) -> u32 {
        self.left
    }

    /// The next message and the number of its targets, which the caller must read
    /// with [`FrameReader::next_target`] before asking for the next message.
    pub fn next_message(&mut self) -> Result<Option<(Arc<Message>, u16)>, FrameError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let c = &mut self.cursor;
        let topic = Arc::from(c.str16()?);
        let payload = Bytes::copy_from_slice(c.bytes32()?);
        let flags = c.u8()?;
        let received_at_ms = self.now_ms.saturating_sub(c.u64()?);
        let origin_client = if flags & HAS_ORIGIN != 0 {
            Some(Arc::from(c.str16()?))
        } else {
            None
        };
        let properties = if flags & HAS_PROPERTIES != 0 {
            bincode::deserialize(c.bytes32()?).map_err(|e| FrameError::Properties(e.to_string()))?
        } else {
            MessageProperties::default()
        };
        let targets = c.u16()?;
        let message = Message {
            topic,
            payload,
            qos: flags & 3,
            retain: flags & RETAIN != 0,
            properties,
            received_at_ms,
            origin_client,
        };
        Ok(Some((Arc::new(message), targets)))
    }

    /// The next target of the current message.
    pub fn next_target(&mut self) -> Result<TargetRef<'a>, FrameError> {
        let c = &mut self.cursor;
        let client_id = c.str16()?;
        let flags = c.u8()?;
        let ids = c.u16()?;
        let mut subscription_ids = Vec::new();
        for _ in 0..ids {
            subscription_ids.push(c.u32()?);
        }
        let shared_group = if flags & HAS_GROUP != 0 {
            Some(c.str16()?)
        } else {
            None
        };
        Ok(TargetRef {
            client_id,
            qos: flags & 3,
            retain: flags & RETAIN != 0,
            subscription_ids,
            shared_group,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::forward::ForwardTarget;
    use proptest::prelude::*;

    /// The clock of both ends in these tests.
    const NOW: u64 = 2_000_000_000_000;

    fn decode_all(frame: &[u8]) -> Result<Vec<Forwarded>, FrameError> {
        let mut reader = FrameReader::new(frame, NOW)?;
        let mut out = Vec::new();
        while let Some((message, n)) = reader.next_message()? {
            let mut targets = Vec::new();
            for _ in 0..n {
                let t = reader.next_target()?;
                targets.push(ForwardTarget {
                    client_id: Arc::from(t.client_id),
                    qos: t.qos,
                    retain: t.retain,
                    subscription_ids: t.subscription_ids,
                    shared_group: t.shared_group.map(Arc::from),
                });
            }
            out.push(Forwarded { message, targets });
        }
        Ok(out)
    }

    fn sample() -> Vec<Forwarded> {
        vec![
            Forwarded {
                message: Arc::new(Message {
                    topic: Arc::from("fleet/r7/pose"),
                    payload: Bytes::from_static(b"{\"x\":1}"),
                    qos: 1,
                    retain: true,
                    properties: MessageProperties {
                        message_expiry_interval: Some(30),
                        content_type: Some("application/json".into()),
                        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                        user_properties: vec![("k".into(), "v".into())],
                        ..Default::default()
                    },
                    received_at_ms: 1_700_000_000_000,
                    origin_client: Some(Arc::from("r7")),
                }),
                targets: vec![
                    ForwardTarget {
                        client_id: Arc::from("dashboard"),
                        qos: 1,
                        retain: false,
                        subscription_ids: vec![4, 9],
                        shared_group: Some(Arc::from("workers")),
                    },
                    ForwardTarget {
                        client_id: Arc::from("ü-logger"),
                        qos: 0,
                        retain: true,
                        subscription_ids: vec![],
                        shared_group: None,
                    },
                ],
            },
            Forwarded {
                message: Arc::new(Message {
                    topic: Arc::from("a"),
                    payload: Bytes::new(),
                    qos: 2,
                    retain: false,
                    properties: MessageProperties::default(),
                    received_at_ms: 0,
                    origin_client: None,
                }),
                targets: vec![],
            },
        ]
    }

    #[test]
    fn messages_and_targets_round_trip() {
        let items = sample();
        let mut frame = Vec::new();
        encode(&items, NOW, &mut frame).expect("encodes");
        assert_eq!(decode_all(&frame).expect("decodes"), items);
        let mut plain = items.clone();
        Arc::make_mut(&mut plain[0].message).properties = MessageProperties::default();
        let mut frame = Vec::new();
        encode(&plain, NOW, &mut frame).expect("encodes");
        assert_eq!(
            frame.len(),
            encoded_len(&plain),
            "the size hint is exact without properties"
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut frame = Vec::new();
        encode(&sample(), NOW, &mut frame).expect("encodes");
        for len in 0..frame.len() {
            assert!(
                decode_all(&frame[..len]).is_err(),
                "a frame cut at {len} of {} bytes decoded",
                frame.len()
            );
        }
    }

    #[test]
    fn a_client_id_that_is_not_utf8_is_refused() {
        let mut frame = Vec::new();
        encode(&sample(), NOW, &mut frame).expect("encodes");
        let at = frame
            .windows(9)
            .position(|w| w == b"dashboard")
            .expect("client id in frame");
        frame[at] = 0xff;
        assert!(matches!(decode_all(&frame), Err(FrameError::Utf8(_))));
    }

    #[test]
    fn an_oversized_topic_is_refused_when_encoding() {
        let mut items = sample();
        let long = "t".repeat(70_000);
        Arc::make_mut(&mut items[0].message).topic = Arc::from(long.as_str());
        assert_eq!(
            encode(&items, NOW, &mut Vec::new()),
            Err(FrameError::TooLong("topic"))
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_all(&bytes);
        }

        #[test]
        fn any_message_round_trips(
            topic in "[a-z/]{1,40}",
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            qos in 0u8..3,
            retain: bool,
            at: u64,
            origin in proptest::option::of("[a-zA-Z0-9-]{0,23}"),
            ids in proptest::collection::vec(1u32..268_435_455, 0..4),
            group in proptest::option::of("[a-z]{1,8}"),
        ) {
            let items = vec![Forwarded {
                message: Arc::new(Message {
                    topic: Arc::from(topic.as_str()),
                    payload: Bytes::from(payload),
                    qos,
                    retain,
                    properties: MessageProperties::default(),
                    received_at_ms: at % NOW,
                    origin_client: origin.map(|o| Arc::from(o.as_str())),
                }),
                targets: vec![ForwardTarget {
                    client_id: Arc::from("c"),
                    qos,
                    retain,
                    subscription_ids: ids,
                    shared_group: group.map(|g| Arc::from(g.as_str())),
                }],
            }];
            let mut frame = Vec::new();
            encode(&items, NOW, &mut frame).expect("encodes");
            prop_assert_eq!(decode_all(&frame).expect("decodes"), items);
        }
    }
}
