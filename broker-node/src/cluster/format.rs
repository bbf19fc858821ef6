//! The versioned encodings of what the cluster writes down and sends: Raft entries
//! ([`Request`]) and state snapshots.
//!
//! Both are bincode, which describes nothing of itself, so each starts with a marker
//! word: [`MARKER`] in the high bits and the format version in the low 16. Format 1
//! (every release before formats were versioned) has no marker: an entry started with
//! its command count, a snapshot with its session count, and neither comes anywhere
//! near the marker's range, so format 1 is recognised and upgraded as it is read
//! (commands of format 1 named no connection: they get [`ANY_CONNECTION`]). A version
//! above [`ENTRY_FORMAT`] / [`SNAPSHOT_FORMAT`] is refused with an error naming it: a
//! node of an older release must not guess at what a newer one wrote.
//!
//! Format 2: an entry carries its [`Origin`] and per-command sequence numbers
//! (exactly-once apply) and its proposer's clock at sending (restamped by the leader), the commands of a connection carry its id, and `Enqueue`
//! carries the inbound QoS 2 record of its publish; a snapshot carries the table of
//! proposers' applied sequences.
//!
//! Format 3 (entries only): format 2's layout, with [`Command::Redistribute`] added at
//! the end of the command enum; an entry of format 2 is read as it is. A node of the
//! previous release refuses an entry of format 3 by its version instead of failing on
//! an unknown command.
//!
//! This module only encodes and decodes: no clock, no I/O.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::command::{
    Command, EnqueueEntry, Message, NodeId, Origin, QueueLimits, Request, SubscriptionOptions,
    Will, ANY_CONNECTION,
};

/// The high bits of a format marker word ("F10C" for FlockMQ).
pub const MARKER: u64 = 0xF10C_0000_0000_0000;
const MARKER_MASK: u64 = 0xFFFF_FFFF_FFFF_0000;

/// The entry format this release writes, and the newest it reads.
pub const ENTRY_FORMAT: u16 = 3;
/// The snapshot format this release writes, and the newest it reads.
pub const SNAPSHOT_FORMAT: u16 = 2;

/// The version a leading word announces: `None` for format 1 (no marker).
pub fn version_of(word: u64) -> Option<u16> {
    (word & MARKER_MASK == MARKER).then_some((word & 0xFFFF) as u16)
}

/// The marker word of `version`.
pub fn marker(version: u16) -> u64 {
    MARKER | u64::from(version)
}

/// Format 2's body of an entry.
#[derive(Serialize)]
struct RequestBodyRef<'a> {
    origin: &'a Option<Origin>,
    commands: &'a [Command],
    seqs: &'a [u64],
    sent_at_ms: u64,
}

#[derive(Deserialize)]
struct RequestBody {
    origin: Option<Origin>,
    commands: Vec<Command>,
    seqs: Vec<u64>,
    sent_at_ms: u64,
}

impl Serialize for Request {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut t = serializer.serialize_tuple(2)?;
        t.serialize_element(&marker(ENTRY_FORMAT))?;
        t.serialize_element(&RequestBodyRef {
            origin: &self.origin,
            commands: &self.commands,
            seqs: &self.seqs,
            sent_at_ms: self.sent_at_ms,
        })?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A tuple as long as need be: format 1 is a count followed by that many
        // commands, format 2 a marker and a body.
        deserializer.deserialize_tuple(usize::MAX, RequestVisitor)
    }
}

struct RequestVisitor;

impl<'de> Visitor<'de> for RequestVisitor {
    type Value = Request;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a FlockMQ Raft entry")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Request, A::Error> {
        let head: u64 = seq
            .next_element()?
            .ok_or_else(|| de::Error::custom("empty entry"))?;
        match version_of(head) {
            None => {
                // Format 1: `head` commands of the first layout.
                let mut commands = Vec::with_capacity(head.min(4096) as usize);
                for _ in 0..head {
                    let command: v1::Command = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::custom("truncated entry of format 1"))?;
                    commands.push(command.into());
                }
                Ok(Request {
                    origin: None,
                    commands,
                    seqs: Vec::new(),
                    sent_at_ms: 0,
                })
            }
            // Format 3 is format 2's layout with one more command
            // ([`Command::Redistribute`]), which format 2 never holds.
            Some(v @ (2 | 3)) => {
                let body: RequestBody = seq.next_element()?.ok_or_else(|| {
                    de::Error::custom(format!("entry of format {v} without a body"))
                })?;
                if body.origin.is_some() && body.seqs.len() != body.commands.len() {
                    return Err(de::Error::custom(format!(
                        "entry of format {v} with a sequence number count unlike its commands'"
                    )));
                }
                Ok(Request {
                    origin: body.origin,
                    commands: body.commands,
                    seqs: body.seqs,
                    sent_at_ms: body.sent_at_ms,
                })
            }
            Some(v) => Err(de::Error::custom(format!(
                "Raft entry of format {v}: this release reads formats 1 to {ENTRY_FORMAT}; \
                 upgrade this node to the release that wrote it"
            ))),
        }
    }
}

/// The layouts of format 1, kept to read what earlier releases wrote.
pub(super) mod v1 {
    use super::*;

    /// A command as format 1 laid it out (variant order and fields matter).
    #[derive(Deserialize)]
    pub enum Command {
        OpenSession {
            client_id: Arc<str>,
            node: NodeId,
            connection_id: u64,
            protocol: u8,
            clean_start: bool,
            expiry_secs: u32,
            will: Option<Will>,
            now_ms: u64,
        },
        CloseSession {
            client_id: Arc<str>,
            connection_id: u64,
            graceful: bool,
            expiry_secs: Option<u32>,
            now_ms: u64,
        },
        Subscribe {
            client_id: Arc<str>,
            entries: Vec<(String, SubscriptionOptions)>,
        },
        Unsubscribe {
            client_id: Arc<str>,
            filters: Vec<String>,
        },
        SetRetained {
            topic: Arc<str>,
            message: Option<Arc<Message>>,
        },
        Enqueue {
            entries: Vec<EnqueueEntry>,
            limits: QueueLimits,
        },
        Ack {
            client_id: Arc<str>,
            completed: Vec<u64>,
            received: Vec<u64>,
        },
        InboundQos2 {
            client_id: Arc<str>,
            received: Vec<u16>,
            released: Vec<u16>,
        },
        Expire {
            node: NodeId,
            now_ms: u64,
        },
        Kick {
            client_id: Arc<str>,
        },
        NodeLost {
            node: NodeId,
            publisher: NodeId,
            now_ms: u64,
        },
    }

    impl From<Command> for super::Command {
        fn from(c: Command) -> Self {
            use super::Command as C;
            match c {
                Command::OpenSession {
                    client_id,
                    node,
                    connection_id,
                    protocol,
                    clean_start,
                    expiry_secs,
                    will,
                    now_ms,
                } => C::OpenSession {
                    client_id,
                    node,
                    connection_id,
                    protocol,
                    clean_start,
                    expiry_secs,
                    will,
                    now_ms,
                },
                Command::CloseSession {
                    client_id,
                    connection_id,
                    graceful,
                    expiry_secs,
                    now_ms,
                } => C::CloseSession {
                    client_id,
                    connection_id,
                    graceful,
                    expiry_secs,
                    now_ms,
                },
                Command::Subscribe { client_id, entries } => C::Subscribe {
                    client_id,
                    connection_id: ANY_CONNECTION,
                    entries,
                },
                Command::Unsubscribe { client_id, filters } => C::Unsubscribe {
                    client_id,
                    connection_id: ANY_CONNECTION,
                    filters,
                },
                Command::SetRetained { topic, message } => C::SetRetained { topic, message },
                Command::Enqueue { entries, limits } => C::Enqueue {
                    entries,
                    limits,
                    inbound: None,
                    retained: None,
                },
                Command::Ack {
                    client_id,
                    completed,
                    received,
                } => C::Ack {
                    client_id,
                    connection_id: ANY_CONNECTION,
                    completed,
                    received,
                },
                Command::InboundQos2 {
                    client_id,
                    received,
                    released,
                } => C::InboundQos2 {
                    client_id,
                    connection_id: ANY_CONNECTION,
                    received,
                    released,
                },
                Command::Expire { node, now_ms } => C::Expire { node, now_ms },
                Command::Kick { client_id } => C::Kick { client_id },
                Command::NodeLost {
                    node,
                    publisher,
                    now_ms,
                } => C::NodeLost {
                    node,
                    publisher,
                    now_ms,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::command::{QueueFullPolicy, QueueLimits};

    fn sample() -> Vec<Command> {
        vec![
            Command::Subscribe {
                client_id: Arc::from("c"),
                connection_id: 7,
                entries: vec![(
                    "a/+".to_owned(),
                    SubscriptionOptions {
                        qos: 1,
                        no_local: false,
                        retain_as_published: false,
                        retain_handling: 0,
                        subscription_id: Some(3),
                    },
                )],
            },
            Command::Enqueue {
                entries: vec![],
                limits: QueueLimits {
                    max_messages: 10,
                    max_bytes: 100,
                    policy: QueueFullPolicy::DropNewest,
                },
                inbound: None,
                retained: None,
            },
            Command::Expire { node: 2, now_ms: 9 },
        ]
    }

    #[test]
    fn an_entry_of_format_3_round_trips_with_its_origin_and_format_2_reads_alike() {
        let mut commands = sample();
        commands.push(Command::Redistribute {
            after_ms: 60_000,
            now_ms: 1_700_000_000_000,
        });
        let request = Request {
            origin: Some(Origin {
                node: 3,
                incarnation: 42,
            }),
            seqs: vec![5, 6, 7, 8],
            commands,
            sent_at_ms: 1_700_000_000_000,
        };
        let mut bytes = bincode::serialize(&request).expect("encode");
        assert_eq!(&bytes[..8], &marker(3).to_le_bytes());
        let back: Request = bincode::deserialize(&bytes).expect("decode");
        assert_eq!(back, request);
        // Format 2 is the same layout without the last command.
        let request = Request {
            commands: sample(),
            seqs: vec![5, 6, 7],
            ..request
        };
        bytes = bincode::serialize(&request).expect("encode");
        bytes[..8].copy_from_slice(&marker(2).to_le_bytes());
        let back: Request = bincode::deserialize(&bytes).expect("decode format 2");
        assert_eq!(back, request);
    }

    #[test]
    fn an_entry_of_format_1_is_read_and_upgraded() {
        // Format 1 bytes, laid out by hand as the first release wrote them: the
        // command count, then `Subscribe` (variant 2) and `Expire` (variant 8).
        #[derive(Serialize)]
        enum OldCommand {
            _OpenSession,
            _CloseSession,
            Subscribe {
                client_id: Arc<str>,
                entries: Vec<(String, SubscriptionOptions)>,
            },
            _Unsubscribe,
            _SetRetained,
            _Enqueue,
            _Ack,
            _InboundQos2,
            Expire {
                node: NodeId,
                now_ms: u64,
            },
        }
        #[derive(Serialize)]
        struct OldRequest {
            commands: Vec<OldCommand>,
        }
        let options = SubscriptionOptions {
            qos: 2,
            no_local: true,
            retain_as_published: false,
            retain_handling: 1,
            subscription_id: None,
        };
        let bytes = bincode::serialize(&OldRequest {
            commands: vec![
                OldCommand::Subscribe {
                    client_id: Arc::from("robot"),
                    entries: vec![("fleet/#".to_owned(), options.clone())],
                },
                OldCommand::Expire {
                    node: 1,
                    now_ms: 77,
                },
            ],
        })
        .expect("encode");
        let read: Request = bincode::deserialize(&bytes).expect("format 1 is read");
        assert_eq!(
            read,
            Request {
                origin: None,
                commands: vec![
                    Command::Subscribe {
                        client_id: Arc::from("robot"),
                        connection_id: ANY_CONNECTION,
                        entries: vec![("fleet/#".to_owned(), options)],
                    },
                    Command::Expire {
                        node: 1,
                        now_ms: 77
                    },
                ],
                seqs: vec![],
                sent_at_ms: 0,
            }
        );
    }

    #[test]
    fn the_leader_moves_a_forwarded_requests_times_onto_its_clock() {
        use crate::cluster::command::{EnqueueEntry, QueueFullPolicy};
        // The proposer's clock is ten minutes behind the leader's.
        let behind = 600_000;
        let message = Arc::new(Message {
            topic: Arc::from("t"),
            payload: bytes::Bytes::from_static(b"x"),
            qos: 1,
            retain: false,
            properties: Default::default(),
            received_at_ms: 1_000_000 - 5,
            origin_client: None,
        });
        let entry = |c: &str| EnqueueEntry {
            client_id: Arc::from(c),
            message: message.clone(),
            qos: 1,
            retain: false,
            subscription_ids: vec![],
        };
        let mut request = Request {
            origin: None,
            commands: vec![
                Command::CloseSession {
                    client_id: Arc::from("a"),
                    connection_id: 1,
                    graceful: false,
                    expiry_secs: None,
                    now_ms: 1_000_000 - 2,
                },
                Command::Enqueue {
                    entries: vec![entry("a"), entry("b")],
                    limits: QueueLimits {
                        max_messages: 9,
                        max_bytes: 99,
                        policy: QueueFullPolicy::DropNewest,
                    },
                    inbound: None,
                    retained: None,
                },
            ],
            seqs: vec![],
            sent_at_ms: 1_000_000,
        };
        request.restamp(1_000_000 + behind);
        let Command::CloseSession { now_ms, .. } = &request.commands[0] else {
            unreachable!()
        };
        assert_eq!(*now_ms, 1_000_000 - 2 + behind);
        let Command::Enqueue { entries, .. } = &request.commands[1] else {
            unreachable!()
        };
        assert_eq!(entries[0].message.received_at_ms, 1_000_000 - 5 + behind);
        assert!(
            Arc::ptr_eq(&entries[0].message, &entries[1].message),
            "a message shared by two queues stays one message"
        );
        assert_eq!(request.sent_at_ms, 1_000_000 + behind);
    }

    #[test]
    fn an_entry_of_a_newer_format_is_refused_with_its_version() {
        let bytes = bincode::serialize(&(marker(9), 0u64)).expect("encode");
        let err = bincode::deserialize::<Request>(&bytes).expect_err("refused");
        assert!(err.to_string().contains("format 9"), "{err}");
    }

    #[test]
    fn garbage_and_truncated_entries_are_errors_not_panics() {
        let request = Request {
            origin: Some(Origin {
                node: 1,
                incarnation: 1,
            }),
            commands: sample(),
            seqs: vec![1, 2, 3],
            sent_at_ms: 0,
        };
        let bytes = bincode::serialize(&request).expect("encode");
        for cut in 0..bytes.len() {
            assert!(bincode::deserialize::<Request>(&bytes[..cut]).is_err());
        }
        // A format-1 count far beyond the bytes there are.
        let bytes = bincode::serialize(&(u32::MAX as u64, 1u8)).expect("encode");
        assert!(bincode::deserialize::<Request>(&bytes).is_err());
    }
}
