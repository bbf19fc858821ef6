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
//! Format 4 (entries): an `Enqueue` holds its messages once ([`Appends`]) and names
//! them by index from each queue append and as the retained message; formats 2 and 3
//! gave every append a copy of its message, so a publish to a thousand queues wrote a
//! thousand payloads. They are read into the new command, equal messages of one
//! command folded into one.
//!
//! Format 5 (entries): format 4's layout with [`Command::EnqueueMatching`] added at
//! the end of the command enum (a publish names its message once and the state
//! machine finds the persistent subscribers' queues it goes to). An entry is written
//! in format 4 unless it holds one, so a node of the previous release reads
//! everything but those.
//!
//! Snapshot format 3: the queued and retained messages once, in a table ahead of the
//! sessions, whose queues name them by index (the layout is [`super::state`]'s).
//!
//! This module only encodes and decodes: no clock, no I/O.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::command::{
    Appends, Command, EnqueueEntry, InboundRecord, Message, NodeId, Origin, QueueLimits, Request,
    SubscriptionOptions, Will, ANY_CONNECTION,
};

/// The high bits of a format marker word ("F10C" for FlockMQ).
pub const MARKER: u64 = 0xF10C_0000_0000_0000;
const MARKER_MASK: u64 = 0xFFFF_FFFF_FFFF_0000;

/// The newest entry format this release writes and reads.
pub const ENTRY_FORMAT: u16 = 5;
/// The entry format that added [`Command::EnqueueMatching`]: a node writes one only
/// once every member reads it (see `compat`).
pub const MATCHING_FORMAT: u16 = 5;
/// The snapshot format this release writes, and the newest it reads.
pub const SNAPSHOT_FORMAT: u16 = 3;
/// The layout a state digest hashes: snapshot format 2's, every queued message written
/// out where it is queued. A digest so depends on what the state holds, not on which
/// queues share one `Arc` (a node that decoded entries of format 3 holds copies where
/// the leader shared one), and nodes that applied the same log agree.
pub const DIGEST_LAYOUT: u16 = 2;

/// The version a leading word announces: `None` for format 1 (no marker).
pub fn version_of(word: u64) -> Option<u16> {
    (word & MARKER_MASK == MARKER).then_some((word & 0xFFFF) as u16)
}

/// The marker word of `version`.
pub fn marker(version: u16) -> u64 {
    MARKER | u64::from(version)
}

/// The body of an entry of format 2 and later.
#[derive(Serialize)]
struct RequestBodyRef<'a> {
    origin: &'a Option<Origin>,
    commands: &'a [Command],
    seqs: &'a [u64],
    sent_at_ms: u64,
}

/// [`RequestBodyRef`] as read, its commands of format 4 (`C` = [`Command`]) or of
/// formats 2 and 3 ([`v2::Command`]).
#[derive(Deserialize)]
struct RequestBody<C> {
    origin: Option<Origin>,
    commands: Vec<C>,
    seqs: Vec<u64>,
    sent_at_ms: u64,
}

impl<C: Into<Command>> RequestBody<C> {
    /// The request the body of an entry of format `v` holds.
    fn into_request<E: de::Error>(self, v: u16) -> Result<Request, E> {
        if self.origin.is_some() && self.seqs.len() != self.commands.len() {
            return Err(E::custom(format!(
                "entry of format {v} with a sequence number count unlike its commands'"
            )));
        }
        let commands: Vec<Command> = self.commands.into_iter().map(Into::into).collect();
        for command in &commands {
            let (appends, named) = match command {
                Command::Enqueue {
                    appends, retained, ..
                } => (appends, [("retains", *retained), ("queues", None)]),
                Command::EnqueueMatching {
                    appends,
                    retained,
                    matching,
                    ..
                } => (
                    appends,
                    [("retains", *retained), ("queues", Some(*matching))],
                ),
                _ => continue,
            };
            for (what, index) in named {
                if let Some(index) = index.filter(|i| appends.message(*i).is_none()) {
                    return Err(E::custom(format!(
                        "entry of format {v} {what} message {index} of {}",
                        appends.messages().len()
                    )));
                }
            }
        }
        Ok(Request {
            origin: self.origin,
            commands,
            seqs: self.seqs,
            sent_at_ms: self.sent_at_ms,
        })
    }
}

impl Serialize for Request {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The oldest format that holds the entry, so that a node of the previous
        // release reads all but what it could not apply.
        let version = match self
            .commands
            .iter()
            .any(|c| matches!(c, Command::EnqueueMatching { .. }))
        {
            true => ENTRY_FORMAT,
            false => 4,
        };
        let mut t = serializer.serialize_tuple(2)?;
        t.serialize_element(&marker(version))?;
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
                let body: RequestBody<v2::Command> = seq.next_element()?.ok_or_else(|| {
                    de::Error::custom(format!("entry of format {v} without a body"))
                })?;
                body.into_request(v)
            }
            // Format 5 is format 4's layout with one more command
            // ([`Command::EnqueueMatching`]), which format 4 never holds.
            Some(v @ (4 | ENTRY_FORMAT)) if v <= super::compat::reads_entry_format() => {
                let body: RequestBody<Command> = seq.next_element()?.ok_or_else(|| {
                    de::Error::custom(format!("entry of format {v} without a body"))
                })?;
                body.into_request(v)
            }
            Some(v) => Err(de::Error::custom(format!(
                "Raft entry of format {v}: this release reads formats 1 to {}; \
                 upgrade this node to the release that wrote it",
                super::compat::reads_entry_format()
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
                    appends: entries.into_iter().collect(),
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

/// The layouts of formats 2 and 3, kept to read what earlier releases wrote: today's
/// commands but for `Enqueue`, whose every entry carried its message.
pub(super) mod v2 {
    use super::*;

    /// A command as formats 2 and 3 laid it out (variant order and fields matter).
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
            connection_id: u64,
            entries: Vec<(String, SubscriptionOptions)>,
        },
        Unsubscribe {
            client_id: Arc<str>,
            connection_id: u64,
            filters: Vec<String>,
        },
        SetRetained {
            topic: Arc<str>,
            message: Option<Arc<Message>>,
        },
        Enqueue {
            entries: Vec<EnqueueEntry>,
            limits: QueueLimits,
            inbound: Option<InboundRecord>,
            retained: Option<Arc<Message>>,
        },
        Ack {
            client_id: Arc<str>,
            connection_id: u64,
            completed: Vec<u64>,
            received: Vec<u64>,
        },
        InboundQos2 {
            client_id: Arc<str>,
            connection_id: u64,
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
        Barrier,
        Redistribute {
            after_ms: u64,
            now_ms: u64,
        },
    }

    impl From<Command> for super::Command {
        fn from(c: Command) -> Self {
            use super::Command as C;
            match c {
                Command::Enqueue {
                    entries,
                    limits,
                    inbound,
                    retained,
                } => {
                    let mut appends: Appends = entries.into_iter().collect();
                    let retained = retained.map(|m| appends.add_message(&m));
                    C::Enqueue {
                        appends,
                        limits,
                        inbound,
                        retained,
                    }
                }
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
                Command::Subscribe {
                    client_id,
                    connection_id,
                    entries,
                } => C::Subscribe {
                    client_id,
                    connection_id,
                    entries,
                },
                Command::Unsubscribe {
                    client_id,
                    connection_id,
                    filters,
                } => C::Unsubscribe {
                    client_id,
                    connection_id,
                    filters,
                },
                Command::SetRetained { topic, message } => C::SetRetained { topic, message },
                Command::Ack {
                    client_id,
                    connection_id,
                    completed,
                    received,
                } => C::Ack {
                    client_id,
                    connection_id,
                    completed,
                    received,
                },
                Command::InboundQos2 {
                    client_id,
                    connection_id,
                    received,
                    released,
                } => C::InboundQos2 {
                    client_id,
                    connection_id,
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
                Command::Barrier => C::Barrier,
                Command::Redistribute { after_ms, now_ms } => C::Redistribute { after_ms, now_ms },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::command::{Append, QueueFullPolicy, QueueLimits};
    use crate::cluster::state::BrokerState;

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
                appends: Appends::default(),
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

    /// A 1 KB QoS 1 message as a publish to `fleet/all/cmd` carries it.
    fn kilobyte(retain: bool) -> Arc<Message> {
        Arc::new(Message {
            topic: Arc::from("fleet/all/cmd"),
            payload: bytes::Bytes::from(vec![b'x'; 1024]),
            qos: 1,
            retain,
            properties: Default::default(),
            received_at_ms: 1_700_000_000_000,
            origin_client: Some(Arc::from("commander")),
        })
    }

    /// `message` for each of `clients`, as the publish path builds the entries.
    fn entries_for(clients: &[String], message: &Arc<Message>) -> Vec<EnqueueEntry> {
        clients
            .iter()
            .map(|c| EnqueueEntry {
                client_id: Arc::from(c.as_str()),
                message: message.clone(),
                qos: 1,
                retain: false,
                subscription_ids: vec![],
            })
            .collect()
    }

    fn limits() -> QueueLimits {
        QueueLimits {
            max_messages: 1000,
            max_bytes: 1 << 20,
            policy: QueueFullPolicy::DropNewest,
        }
    }

    /// A state with persistent, offline sessions `clients`.
    fn offline_sessions(clients: &[String]) -> BrokerState {
        let mut state = BrokerState::new(None);
        for (i, c) in clients.iter().enumerate() {
            let client_id: Arc<str> = Arc::from(c.as_str());
            state.apply_command(&Command::OpenSession {
                client_id: client_id.clone(),
                node: 1,
                connection_id: i as u64 + 1,
                protocol: 4,
                clean_start: false,
                expiry_secs: u32::MAX,
                will: None,
                now_ms: 1_000,
            });
            state.apply_command(&Command::CloseSession {
                client_id,
                connection_id: i as u64 + 1,
                graceful: true,
                expiry_secs: None,
                now_ms: 2_000,
            });
        }
        state
    }

    /// Whether every queue of `state` holds its messages (in order) in the same `Arc`s
    /// as every other queue.
    fn queues_share_one_arc_per_message(state: &BrokerState) -> bool {
        let queues: Vec<Vec<&Arc<Message>>> = state
            .sessions()
            .map(|(_, s)| s.queue.iter().map(|q| &q.message).collect())
            .collect();
        queues.iter().all(|q| {
            q.len() == queues[0].len() && q.iter().zip(&queues[0]).all(|(a, b)| Arc::ptr_eq(a, b))
        })
    }

    #[test]
    fn an_entry_of_format_4_round_trips_with_its_origin() {
        let mut commands = sample();
        commands.push(Command::Redistribute {
            after_ms: 60_000,
            now_ms: 1_700_000_000_000,
        });
        let clients: Vec<String> = (0..3).map(|i| format!("c{i}")).collect();
        let mut appends: Appends = entries_for(&clients, &kilobyte(true)).into_iter().collect();
        let retained = Some(appends.add_message(&kilobyte(true)));
        commands.push(Command::Enqueue {
            appends,
            limits: limits(),
            inbound: Some(InboundRecord {
                client_id: Arc::from("commander"),
                connection_id: 4,
                packet_id: 77,
            }),
            retained,
        });
        let request = Request {
            origin: Some(Origin {
                node: 3,
                incarnation: 42,
            }),
            seqs: vec![5, 6, 7, 8, 9],
            commands,
            sent_at_ms: 1_700_000_000_000,
        };
        let bytes = bincode::serialize(&request).expect("encode");
        assert_eq!(&bytes[..8], &marker(4).to_le_bytes());
        let back: Request = bincode::deserialize(&bytes).expect("decode");
        assert_eq!(back, request);
    }

    #[test]
    fn an_entry_of_format_4_holds_a_message_once_however_many_queues_it_goes_to() {
        let clients: Vec<String> = (0..1000).map(|i| format!("device-{i:04}")).collect();
        let message = kilobyte(false);
        let request = Request {
            origin: None,
            commands: vec![Command::Enqueue {
                appends: entries_for(&clients, &message).into_iter().collect(),
                limits: limits(),
                inbound: None,
                retained: None,
            }],
            seqs: vec![],
            sent_at_ms: 0,
        };
        let bytes = bincode::serialize(&request).expect("encode");
        // One payload, and per queue its client id and a few bytes (format 3 wrote
        // 1,000 payloads: over a megabyte).
        let per_queue = (bytes.len() - message.payload.len()) / clients.len();
        assert!(
            per_queue <= 40,
            "{} bytes, {per_queue} a queue",
            bytes.len()
        );
        // Decoded (as a follower does, or the leader reading its log), then applied:
        // every queue holds the same `Arc`.
        let decoded: Request = bincode::deserialize(&bytes).expect("decode");
        let mut state = offline_sessions(&clients);
        state.apply_request(&decoded);
        assert_eq!(state.session("device-0999").map(|s| s.queue.len()), Some(1));
        assert!(queues_share_one_arc_per_message(&state));
        let Command::Enqueue { appends, .. } = &decoded.commands[0] else {
            unreachable!()
        };
        let first = &state.session("device-0000").expect("session").queue[0].message;
        assert!(Arc::ptr_eq(first, &appends.messages()[0]));
    }

    /// `offline_sessions`, each subscribed to `filter` at QoS 1 (with No Local).
    fn offline_subscribers(clients: &[String], filter: &str) -> BrokerState {
        let mut state = BrokerState::new(None);
        for (i, c) in clients.iter().enumerate() {
            let client_id: Arc<str> = Arc::from(c.as_str());
            let connection_id = i as u64 + 1;
            state.apply_command(&Command::OpenSession {
                client_id: client_id.clone(),
                node: 1,
                connection_id,
                protocol: 5,
                clean_start: false,
                expiry_secs: u32::MAX,
                will: None,
                now_ms: 1_000,
            });
            let options = SubscriptionOptions {
                qos: 1,
                no_local: true,
                retain_as_published: false,
                retain_handling: 0,
                subscription_id: None,
            };
            state.apply_command(&Command::Subscribe {
                client_id: client_id.clone(),
                connection_id,
                entries: vec![(filter.to_string(), options)],
            });
            state.apply_command(&Command::CloseSession {
                client_id,
                connection_id,
                graceful: true,
                expiry_secs: None,
                now_ms: 2_000,
            });
        }
        state
    }

    #[test]
    fn an_entry_of_format_5_is_as_large_as_its_message_however_many_subscribers_it_reaches() {
        let mut clients: Vec<String> = (0..10_000).map(|i| format!("robot-{i:05}")).collect();
        clients.push("commander".to_string());
        let message = kilobyte(false);
        let mut appends: Appends = entries_for(&clients[7..8], &message).into_iter().collect();
        let request = Request {
            origin: None,
            commands: vec![Command::EnqueueMatching {
                matching: appends.add_message(&message),
                appends,
                limits: limits(),
                inbound: None,
                retained: None,
                except: vec![Arc::from("robot-00003")],
            }],
            seqs: vec![],
            sent_at_ms: 0,
        };
        let bytes = bincode::serialize(&request).expect("encode");
        assert_eq!(&bytes[..8], &marker(5).to_le_bytes());
        // The message, one named queue, one exception: no word per subscriber.
        assert!(
            bytes.len() < message.payload.len() + 300,
            "{} bytes",
            bytes.len()
        );
        let decoded: Request = bincode::deserialize(&bytes).expect("decode");
        assert_eq!(decoded, request);
        let mut state = offline_subscribers(&clients, "fleet/all/#");
        let results = state.apply_request(&decoded);
        assert_eq!(
            results,
            vec![crate::cluster::command::CommandResult::Enqueued {
                accepted: 9_999,
                dropped: 0
            }]
        );
        let queued = |c: &str| state.session(c).map(|s| s.queue.len());
        // Found, once even where the appends named it too; not where excepted, nor
        // for the publisher's own No Local subscription.
        assert_eq!(queued("robot-09999"), Some(1));
        assert_eq!(queued("robot-00007"), Some(1));
        assert_eq!(queued("robot-00003"), Some(0));
        assert_eq!(queued("commander"), Some(0));
        assert!(state
            .sessions()
            .filter(|(c, _)| !["robot-00003", "commander"].contains(&&***c))
            .all(|(_, s)| Arc::ptr_eq(&s.queue[0].message, &decoded_message(&decoded))));
        // A subscriber's queue holds what the named append said, and the others what
        // their subscription grants.
        assert_eq!(
            state.session("robot-00042").expect("session").queue[0].qos,
            1
        );
    }

    /// The message an `EnqueueMatching` sends to the matching sessions.
    fn decoded_message(request: &Request) -> Arc<Message> {
        let Command::EnqueueMatching {
            appends, matching, ..
        } = &request.commands[0]
        else {
            unreachable!()
        };
        appends.messages()[*matching as usize].clone()
    }

    #[test]
    fn an_entry_whose_matching_message_is_not_there_is_refused() {
        let request = Request {
            origin: None,
            commands: vec![Command::EnqueueMatching {
                appends: Appends::default(),
                limits: limits(),
                inbound: None,
                retained: None,
                matching: 0,
                except: vec![],
            }],
            seqs: vec![],
            sent_at_ms: 0,
        };
        let bytes = bincode::serialize(&request).expect("encode");
        let err = bincode::deserialize::<Request>(&bytes).expect_err("refused");
        assert!(err.to_string().contains("queues message 0 of 0"), "{err}");
    }

    #[test]
    fn an_entry_of_format_3_is_read_with_each_message_once_and_applies_alike() {
        // Format 3 bytes, laid out by hand as the previous release wrote them: the
        // marker, the body, its commands in the layout of formats 2 and 3 (`Enqueue`
        // is variant 5, a copy of the message in every entry).
        #[derive(Serialize)]
        enum OldCommand {
            _OpenSession,
            _CloseSession,
            _Subscribe,
            _Unsubscribe,
            _SetRetained,
            Enqueue {
                entries: Vec<EnqueueEntry>,
                limits: QueueLimits,
                inbound: Option<InboundRecord>,
                retained: Option<Arc<Message>>,
            },
        }
        #[derive(Serialize)]
        struct OldBody {
            origin: Option<Origin>,
            commands: Vec<OldCommand>,
            seqs: Vec<u64>,
            sent_at_ms: u64,
        }
        let clients: Vec<String> = (0..50).map(|i| format!("device-{i:02}")).collect();
        let (first, second) = (kilobyte(true), kilobyte(false));
        // An earlier message for ten of them, then the publish's (retained).
        let mut entries = entries_for(&clients[..10], &second);
        entries.extend(entries_for(&clients, &first));
        let origin = Some(Origin {
            node: 2,
            incarnation: 9,
        });
        let old = bincode::serialize(&(
            marker(3),
            OldBody {
                origin,
                commands: vec![OldCommand::Enqueue {
                    entries: entries.clone(),
                    limits: limits(),
                    inbound: None,
                    retained: Some(first.clone()),
                }],
                seqs: vec![1],
                sent_at_ms: 5,
            },
        ))
        .expect("encode");
        assert!(old.len() > 60 * 1024, "format 3 wrote a copy per entry");
        let read: Request = bincode::deserialize(&old).expect("format 3 is read");
        // The same command as this release builds: the two messages once each, the
        // retained one named by index.
        let mut appends: Appends = entries.into_iter().collect();
        let retained = Some(appends.add_message(&first));
        assert_eq!(appends.messages().len(), 2);
        let now = Request {
            origin,
            commands: vec![Command::Enqueue {
                appends,
                limits: limits(),
                inbound: None,
                retained,
            }],
            seqs: vec![1],
            sent_at_ms: 5,
        };
        assert_eq!(read, now);
        // Applied, both give the same state; the one read from format 3 shares one
        // `Arc` per message between its queues too.
        let mut from_old = offline_sessions(&clients);
        let mut from_new = offline_sessions(&clients);
        assert_eq!(from_old.apply_request(&read), from_new.apply_request(&now));
        assert_eq!(from_old.digest(), from_new.digest());
        assert_eq!(from_old.to_snapshot(), from_new.to_snapshot());
        let queued = |state: &BrokerState, client: &str| {
            state.session(client).expect("session").queue.clone()
        };
        let (a, b) = (
            queued(&from_old, "device-00"),
            queued(&from_old, "device-09"),
        );
        assert_eq!(a.len(), 2);
        assert!(a
            .iter()
            .zip(b.iter())
            .all(|(x, y)| Arc::ptr_eq(&x.message, &y.message)));
        let retained = from_old.retained().get("fleet/all/cmd").expect("retained");
        assert!(Arc::ptr_eq(retained, &a[1].message));
        let last = queued(&from_old, "device-49");
        assert!(Arc::ptr_eq(retained, &last[0].message));
    }

    #[test]
    fn an_entry_naming_a_message_it_does_not_hold_is_refused() {
        #[derive(Serialize)]
        struct Form {
            messages: Vec<Arc<Message>>,
            entries: Vec<Append>,
        }
        let append = |message| Append {
            client_id: Arc::from("c"),
            message,
            qos: 1,
            retain: false,
            subscription_ids: vec![],
        };
        let bytes = bincode::serialize(&Form {
            messages: vec![kilobyte(false)],
            entries: vec![append(0), append(1)],
        })
        .expect("encode");
        let err = bincode::deserialize::<Appends>(&bytes).expect_err("refused");
        assert!(err.to_string().contains("message 1 of 1"), "{err}");
        // A retained message out of range, in a whole entry.
        let request = Request {
            origin: None,
            commands: vec![Command::Enqueue {
                appends: Appends::default(),
                limits: limits(),
                inbound: None,
                retained: Some(0),
            }],
            seqs: vec![],
            sent_at_ms: 0,
        };
        let bytes = bincode::serialize(&request).expect("encode");
        let err = bincode::deserialize::<Request>(&bytes).expect_err("refused");
        assert!(err.to_string().contains("retains message 0 of 0"), "{err}");
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
        let mut appends: Appends = [entry("a"), entry("b")].into_iter().collect();
        let retained = Some(appends.add_message(&message));
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
                    appends,
                    limits: QueueLimits {
                        max_messages: 9,
                        max_bytes: 99,
                        policy: QueueFullPolicy::DropNewest,
                    },
                    inbound: None,
                    retained,
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
        let Command::Enqueue {
            appends, retained, ..
        } = &request.commands[1]
        else {
            unreachable!()
        };
        assert_eq!(appends.messages().len(), 1, "a shared message stays one");
        assert_eq!(appends.messages()[0].received_at_ms, 1_000_000 - 5 + behind);
        assert_eq!(*retained, Some(0));
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
