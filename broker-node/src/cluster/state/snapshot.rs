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
//! This module only encodes and decodes the state; the digest hashes a layout of its own
//! ([`super::format::DIGEST_LAYOUT`]) that does not depend on sharing.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

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

/// A snapshot of format 3 (after its marker), as read.
#[derive(Deserialize)]
struct SnapshotFormV3 {
    /// Every queued or retained message once.
    messages: Vec<Arc<Message>>,
    sessions: Vec<(Arc<str>, SessionForm<'static>)>,
    /// Topic and index of the message.
    retained: Vec<(Arc<str>, u32)>,
    proposers: Vec<(NodeId, ProposerRecord)>,
    queue_limits: QueueLimits,
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
        // Plain data, every sequence of known length, into a Vec: nothing can fail.
        bincode::serialize(&form).expect("the state serializes")
    }

    /// Replace the whole state from a snapshot; the route table is rebuilt. Snapshots
    /// of formats 1 and 2 (earlier releases) are read too; an unknown format is
    /// refused, and on any error the state is left as it was.
    pub fn restore(&mut self, data: &[u8]) -> Result<(), RestoreError> {
        let head: u64 = bincode::deserialize(data)?;
        let form = match format::version_of(head) {
            None => {
                let old: SnapshotFormV1 = bincode::deserialize(data)?;
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
                let mut form = bincode::deserialize::<(u64, SnapshotForm)>(data)?.1;
                share_equal_messages(&mut form);
                form
            }
            Some(3) => {
                let form = bincode::deserialize::<(u64, SnapshotFormV3)>(data)?.1;
                let messages = form.messages;
                let message = |index: u32| {
                    messages
                        .get(index as usize)
                        .cloned()
                        .ok_or(RestoreError::MessageIndex {
                            index,
                            count: messages.len(),
                        })
                };
                SnapshotForm {
                    sessions: form
                        .sessions
                        .into_iter()
                        .map(|(c, s)| Ok((c, Box::new(session_record(s, &messages)?))))
                        .collect::<Result<_, RestoreError>>()?,
                    retained: form
                        .retained
                        .into_iter()
                        .map(|(topic, index)| Ok((topic, message(index)?)))
                        .collect::<Result<_, RestoreError>>()?,
                    proposers: form.proposers,
                    queue_limits: form.queue_limits,
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
