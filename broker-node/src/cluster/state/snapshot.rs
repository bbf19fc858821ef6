//! [`BrokerState`]'s snapshots: written in format 3, read in formats 1 to 3.
//!
//! Format 3 holds each queued or retained message once, in a table ahead of the
//! sessions, and a queue names its messages by index there: a message queued for a
//! thousand sessions is one payload in the snapshot, and one `Arc` shared by the thousand
//! queues of the state restored from it. The table is built by pointer
//! (`Arc::as_ptr`), so the snapshot shares exactly what the state shares. Formats 1 and
//! 2 wrote a copy of the message into every queue that held it; reading them, equal
//! messages are folded into one `Arc`.
//!
//! Snapshots are written to and read from a stream (the snapshot's file): nothing here
//! holds the encoded state whole, and a session is made a record as soon as it is read.
//!
//! This module only encodes and decodes the state; the digest hashes a layout of its own
//! ([`super::format::DIGEST_LAYOUT`]) that does not depend on sharing.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bincode::Options;
use serde::{Deserialize, Serialize, Serializer};

use super::{format, BrokerState, ProposerRecord, RestoreError, RetainedMessage, SessionRecord};
use crate::cluster::command::{
    Message, NodeId, QueueLimits, QueuedMessage, SubscriptionOptions, Will,
};
use crate::cluster::sparse::Sparse;

/// A snapshot of format 2 (after its marker), as read; the digest hashes this layout.
#[derive(Deserialize)]
struct SnapshotForm {
    sessions: Vec<(Arc<str>, Box<SessionRecord>)>,
    retained: Vec<(Arc<str>, RetainedMessage)>,
    proposers: Vec<(NodeId, ProposerRecord)>,
    queue_limits: QueueLimits,
}

/// A snapshot of format 1 (no marker, no proposers).
#[derive(Deserialize)]
struct SnapshotFormV1 {
    sessions: Vec<(Arc<str>, Box<SessionRecord>)>,
    retained: Vec<(Arc<str>, RetainedMessage)>,
}

/// A session in a snapshot of format 3: [`SessionRecord`]'s fields in its order, the
/// queue's messages named by their index in the message table. The `Cow`s borrow from
/// the state when a snapshot is written and own what is read.
#[derive(Serialize, Deserialize)]
struct SessionForm<'a> {
    node: NodeId,
    connection_id: u64,
    protocol: u8,
    expiry_secs: u32,
    connected: bool,
    disconnected_at_ms: Option<u64>,
    will: Cow<'a, Option<Box<Will>>>,
    will_due_at_ms: Option<u64>,
    subscriptions: Cow<'a, Sparse<BTreeMap<String, SubscriptionOptions>>>,
    queue: Vec<QueuedForm<'a>>,
    awaiting_pubcomp: Cow<'a, Sparse<BTreeSet<u64>>>,
    inbound_qos2: Cow<'a, Sparse<BTreeSet<u16>>>,
    next_seq: u64,
    queued_bytes: u64,
}

/// A [`QueuedMessage`] in a snapshot of format 3.
#[derive(Serialize, Deserialize)]
struct QueuedForm<'a> {
    seq: u64,
    /// The message's index in the message table.
    message: u32,
    qos: u8,
    retain: bool,
    subscription_ids: Cow<'a, [u32]>,
}

/// The message table of a snapshot being written: each distinct `Arc` once, in the
/// order the sessions (in client-id order) and then the retained messages (in topic
/// order) first name it.
#[derive(Default)]
struct MessageTable<'a> {
    messages: Vec<&'a Message>,
    index: HashMap<*const Message, u32>,
}

impl<'a> MessageTable<'a> {
    fn add(&mut self, message: &'a Arc<Message>) {
        let messages = &mut self.messages;
        self.index.entry(Arc::as_ptr(message)).or_insert_with(|| {
            messages.push(message);
            (messages.len() - 1) as u32
        });
    }

    /// The index of a message [`MessageTable::add`] was given.
    fn of(&self, message: &Arc<Message>) -> u32 {
        self.index[&Arc::as_ptr(message)]
    }
}

/// The sessions of a snapshot of format 3, written one after another (no copy of them
/// all is made).
struct SessionsForm<'a> {
    state: &'a BrokerState,
    table: &'a MessageTable<'a>,
}

impl Serialize for SessionsForm<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.state
                .sessions
                .iter()
                .map(|(client_id, s)| (client_id, session_form(s, self.table))),
        )
    }
}

fn session_form<'a>(s: &'a SessionRecord, table: &MessageTable<'_>) -> SessionForm<'a> {
    SessionForm {
        node: s.node,
        connection_id: s.connection_id,
        protocol: s.protocol,
        expiry_secs: s.expiry_secs,
        connected: s.connected,
        disconnected_at_ms: s.disconnected_at_ms,
        will: Cow::Borrowed(&s.will),
        will_due_at_ms: s.will_due_at_ms,
        subscriptions: Cow::Borrowed(&s.subscriptions),
        queue: s
            .queue
            .iter()
            .map(|q| QueuedForm {
                seq: q.seq,
                message: table.of(&q.message),
                qos: q.qos,
                retain: q.retain,
                subscription_ids: Cow::Borrowed(q.subscription_ids.as_slice()),
            })
            .collect(),
        awaiting_pubcomp: Cow::Borrowed(&s.awaiting_pubcomp),
        inbound_qos2: Cow::Borrowed(&s.inbound_qos2),
        next_seq: s.next_seq,
        queued_bytes: s.queued_bytes,
    }
}

/// The record a session of format 3 stands for, its queue sharing `messages`.
fn session_record(
    s: SessionForm<'static>,
    messages: &[Arc<Message>],
) -> Result<SessionRecord, RestoreError> {
    let queue = s
        .queue
        .into_iter()
        .map(|q| {
            let message = messages
                .get(q.message as usize)
                .ok_or(RestoreError::MessageIndex {
                    index: q.message,
                    count: messages.len(),
                })?;
            Ok(QueuedMessage {
                seq: q.seq,
                message: message.clone(),
                qos: q.qos,
                retain: q.retain,
                subscription_ids: Sparse::from(q.subscription_ids.into_owned()),
            })
        })
        .collect::<Result<VecDeque<_>, RestoreError>>()?;
    Ok(SessionRecord {
        node: s.node,
        connection_id: s.connection_id,
        protocol: s.protocol,
        expiry_secs: s.expiry_secs,
        connected: s.connected,
        disconnected_at_ms: s.disconnected_at_ms,
        will: s.will.into_owned(),
        will_due_at_ms: s.will_due_at_ms,
        subscriptions: s.subscriptions.into_owned(),
        queue: Sparse::from(queue),
        awaiting_pubcomp: s.awaiting_pubcomp.into_owned(),
        inbound_qos2: s.inbound_qos2.into_owned(),
        next_seq: s.next_seq,
        queued_bytes: s.queued_bytes,
    })
}

/// Fold equal messages of a snapshot of format 1 or 2 (a copy in every queue) into one
/// `Arc` each.
fn share_equal_messages(form: &mut SnapshotForm) {
    let mut seen: HashSet<Arc<Message>> = HashSet::new();
    let mut share = |m: &mut Arc<Message>| match seen.get(m) {
        Some(first) => *m = first.clone(),
        None => {
            seen.insert(m.clone());
        }
    };
    for (_, session) in &mut form.sessions {
        if let Some(queue) = session.queue.if_any() {
            for q in queue {
                share(&mut q.message);
            }
        }
    }
    for (_, m) in &mut form.retained {
        share(m);
    }
}

impl BrokerState {
    /// Serialize the whole state for a snapshot (format 3), in a canonical order.
    pub fn to_snapshot(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.write_snapshot(&mut bytes)
            .expect("a Vec takes every byte");
        bytes
    }

    /// Write the whole state for a snapshot (format 3), in a canonical order, to `out`
    /// as it is encoded: only the message table's index is built beside the state.
    pub fn write_snapshot(&self, out: &mut dyn std::io::Write) -> Result<(), RestoreError> {
        let mut table = MessageTable::default();
        for session in self.sessions.values() {
            for q in session.queue.iter() {
                table.add(&q.message);
            }
        }
        let mut retained: Vec<(String, &RetainedMessage)> = self.retained.iter().collect();
        retained.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, m) in &retained {
            table.add(m);
        }
        let retained: Vec<(&str, u32)> = retained
            .iter()
            .map(|(topic, m)| (topic.as_str(), table.of(m)))
            .collect();
        let form = (
            format::marker(format::SNAPSHOT_FORMAT),
            &table.messages,
            SessionsForm {
                state: self,
                table: &table,
            },
            retained,
            &self.proposers,
            self.queue_limits,
        );
        bincode::serialize_into(out, &form).map_err(RestoreError::Write)
    }

    /// Replace the whole state from a snapshot's bytes; see [`BrokerState::restore_from`].
    pub fn restore(&mut self, mut data: &[u8]) -> Result<(), RestoreError> {
        let len = data.len() as u64;
        self.restore_from(&mut data, len)
    }

    /// Replace the whole state from a snapshot of `len` bytes read from `input` as a
    /// stream; the route table is rebuilt. Snapshots of formats 1 and 2 (earlier
    /// releases) are read too; an unknown format is refused, and on any error the state
    /// is left as it was. A length inside the bytes larger than `len` is refused before
    /// anything is allocated for it.
    pub fn restore_from(
        &mut self,
        input: &mut dyn std::io::Read,
        len: u64,
    ) -> Result<(), RestoreError> {
        // bincode 1's defaults (what `serialize_into` wrote), bounded by the input.
        let options = bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .allow_trailing_bytes()
            .with_limit(len);
        let head: u64 = options.deserialize_from(&mut *input)?;
        let form = match format::version_of(head) {
            None => {
                // Format 1 has no marker: what was read is the start of its first field.
                let head = head.to_le_bytes();
                let old: SnapshotFormV1 =
                    options.deserialize_from(std::io::Read::chain(&head[..], input))?;
                let mut form = SnapshotForm {
                    sessions: old.sessions,
                    retained: old.retained,
                    proposers: Vec::new(),
                    queue_limits: QueueLimits::default(),
                };
                share_equal_messages(&mut form);
                form
            }
            Some(2) => {
                let mut form: SnapshotForm = options.deserialize_from(input)?;
                share_equal_messages(&mut form);
                form
            }
            Some(3) => {
                // Field by field (bincode writes a tuple's fields one after another),
                // and the sessions one at a time, each made a record as it is read: no
                // second copy of every session's queue is ever held.
                let messages: Vec<Arc<Message>> = options.deserialize_from(&mut *input)?;
                let message = |index: u32| {
                    messages
                        .get(index as usize)
                        .cloned()
                        .ok_or(RestoreError::MessageIndex {
                            index,
                            count: messages.len(),
                        })
                };
                let count: u64 = options.deserialize_from(&mut *input)?;
                let mut sessions = Vec::new();
                for _ in 0..count {
                    let (client_id, session): (Arc<str>, SessionForm<'static>) =
                        options.deserialize_from(&mut *input)?;
                    sessions.push((client_id, Box::new(session_record(session, &messages)?)));
                }
                let retained: Vec<(Arc<str>, u32)> = options.deserialize_from(&mut *input)?;
                SnapshotForm {
                    sessions,
                    retained: retained
                        .into_iter()
                        .map(|(topic, index)| Ok((topic, message(index)?)))
                        .collect::<Result<_, RestoreError>>()?,
                    proposers: options.deserialize_from(&mut *input)?,
                    queue_limits: options.deserialize_from(input)?,
                }
            }
            Some(v) => return Err(RestoreError::Format(v)),
        };
        let events = self.events.take();
        *self = BrokerState::new(events);
        self.proposers = form.proposers.into_iter().collect();
        self.queue_limits = form.queue_limits;
        for (client_id, session) in form.sessions {
            for (filter, options) in session.subscriptions.iter() {
                self.routes
                    .insert(filter, client_id.clone(), options.clone());
            }
            self.sessions.insert(client_id, session);
        }
        for (topic, message) in form.retained {
            self.retained.insert(&topic, message);
        }
        self.queued_total = self.sessions.values().map(|s| s.queued_bytes).sum();
        self.emit(super::Event::Restored);
        Ok(())
    }
}
