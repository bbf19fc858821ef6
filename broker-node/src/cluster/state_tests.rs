//! Tests of the replicated state machine ([`BrokerState`]) on its own, without Raft.
//!
//! What they pin:
//! - example by example, what each [`Command`] does to sessions, wills, takeovers,
//!   subscriptions and the route table, retained messages, queues and their limits,
//!   acknowledgements, inbound QoS 2 identifiers, node loss and expiry, and which
//!   [`Event`]s it reports;
//! - a model-based property: random command sequences over a small universe applied
//!   both to [`BrokerState`] and to a plain reference model written here give the same
//!   results, events and observable state after every command;
//! - determinism and snapshots: the same log gives the same digest, a snapshot restores
//!   to the same digest and observable state (route table included), and restoring a
//!   snapshot taken mid-log then applying the rest gives the digest of the whole log;
//! - `expiry_due` says true exactly when an `Expire` at that time changes the digest;
//! - exactly-once apply (DESIGN invariant 7): `apply_request` answers a resend of a
//!   proposer's last entry with its first results and changes nothing, per node and
//!   incarnation, and the proposers' table goes through snapshots (also in the model
//!   property, whose logs are cut into entries with and without origin, with resends);
//! - connection scoping (invariant 8): commands of a connection superseded by a
//!   takeover change nothing (also in the model, with latest, stale and any ids);
//! - a publish's `Enqueue` records its inbound QoS 2 id and retained message in the
//!   same step, and queues nothing while the id is held;
//! - snapshot formats: format 2 starts with its marker, format 1 is read, a newer
//!   format is refused and the state kept.

use super::command::ANY_CONNECTION;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use serde::Serialize;

use super::command::{
    Appends, Command, CommandResult, EnqueueEntry, InboundRecord, Message, MessageProperties,
    NodeId, Origin, QueueFullPolicy, QueueLimits, QueuedMessage, Request, SubscriptionOptions,
    Will,
};
use super::format;
use super::state::{BrokerState, DigestWalk, Event, ProposerRecord, RestoreError, SessionRecord};

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

/// A start time far from zero, so that "disconnected at 0" cannot pass for a time.
const T0: u64 = 1_700_000_000_000;

fn message(topic: &str, payload: &[u8], expiry_secs: Option<u32>, at_ms: u64) -> Arc<Message> {
    Arc::new(Message {
        topic: Arc::from(topic),
        payload: Bytes::copy_from_slice(payload),
        qos: 1,
        retain: false,
        properties: MessageProperties {
            message_expiry_interval: expiry_secs,
            ..Default::default()
        },
        received_at_ms: at_ms,
        origin_client: None,
    })
}

fn will(topic: &str, delay_secs: u32) -> Will {
    Will {
        message: (*message(topic, b"gone", None, T0)).clone(),
        delay_secs,
    }
}

fn open(
    client: &str,
    node: NodeId,
    connection_id: u64,
    clean_start: bool,
    expiry_secs: u32,
    will: Option<Will>,
    now_ms: u64,
) -> Command {
    Command::OpenSession {
        client_id: Arc::from(client),
        node,
        connection_id,
        protocol: 5,
        clean_start,
        expiry_secs,
        will,
        now_ms,
    }
}

fn close(
    client: &str,
    connection_id: u64,
    graceful: bool,
    expiry_secs: Option<u32>,
    now_ms: u64,
) -> Command {
    Command::CloseSession {
        client_id: Arc::from(client),
        connection_id,
        graceful,
        expiry_secs,
        now_ms,
    }
}

fn options(qos: u8) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
        subscription_id: None,
    }
}

fn subscribe(client: &str, filters: &[&str]) -> Command {
    Command::Subscribe {
        client_id: Arc::from(client),
        connection_id: ANY_CONNECTION,
        entries: filters
            .iter()
            .map(|f| (f.to_string(), options(1)))
            .collect(),
    }
}

fn unsubscribe(client: &str, filters: &[&str]) -> Command {
    Command::Unsubscribe {
        client_id: Arc::from(client),
        connection_id: ANY_CONNECTION,
        filters: filters.iter().map(|f| f.to_string()).collect(),
    }
}

fn entry(client: &str, message: &Arc<Message>) -> EnqueueEntry {
    EnqueueEntry {
        client_id: Arc::from(client),
        message: message.clone(),
        qos: 1,
        retain: false,
        subscription_ids: Vec::new(),
    }
}

fn enqueue(entries: Vec<EnqueueEntry>, limits: QueueLimits) -> Command {
    Command::Enqueue {
        appends: entries.into_iter().collect(),
        limits,
        inbound: None,
        retained: None,
    }
}

fn limits(max_messages: u64, max_bytes: u64, policy: QueueFullPolicy) -> QueueLimits {
    QueueLimits {
        max_messages,
        max_bytes,
        policy,
    }
}

const ROOMY: QueueLimits = QueueLimits {
    max_messages: 1000,
    max_bytes: 1 << 20,
    policy: QueueFullPolicy::DropNewest,
};

fn ack(client: &str, completed: &[u64], received: &[u64]) -> Command {
    Command::Ack {
        client_id: Arc::from(client),
        connection_id: ANY_CONNECTION,
        completed: completed.to_vec(),
        received: received.to_vec(),
    }
}

fn expire(node: NodeId, now_ms: u64) -> Command {
    Command::Expire { node, now_ms }
}

fn set_retained(topic: &str, message: Option<Arc<Message>>) -> Command {
    Command::SetRetained {
        topic: Arc::from(topic),
        message,
    }
}

/// A state with its event channel.
struct Harness {
    state: BrokerState,
    events: UnboundedReceiver<Event>,
}

impl Harness {
    fn new() -> Self {
        let (tx, events) = unbounded_channel();
        Harness {
            state: BrokerState::new(Some(tx)),
            events,
        }
    }

    fn apply(&mut self, cmd: &Command) -> CommandResult {
        self.state.apply_command(cmd)
    }

    /// Apply commands that must each be accepted, then forget their events.
    fn setup(&mut self, cmds: &[Command]) {
        for cmd in cmds {
            let result = self.apply(cmd);
            assert_ne!(result, CommandResult::NoSession, "setup command {cmd:?}");
        }
        self.events();
    }

    fn events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            out.push(e);
        }
        out
    }

    /// The wills published since the last drain, as (publisher, topic).
    fn wills(&mut self) -> Vec<(NodeId, String)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::PublishWill { publisher, message } => {
                    Some((publisher, message.topic.to_string()))
                }
                _ => None,
            })
            .collect()
    }

    fn session(&self, client: &str) -> &SessionRecord {
        match self.state.session(client) {
            Some(s) => s,
            None => panic!("no session {client}"),
        }
    }

    fn seqs(&self, client: &str) -> Vec<u64> {
        self.session(client).queue.iter().map(|m| m.seq).collect()
    }
}

/// Normal subscriptions of the route table matching `topic`, as (filter, client).
fn normal_matches(state: &BrokerState, topic: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    state.routes().for_each_match(topic, |filter, client, _| {
        out.insert((filter.to_string(), client.to_string()));
    });
    out
}

/// Shared-group memberships of the route table matching `topic`, as (group, client).
fn shared_matches(state: &BrokerState, topic: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    state
        .routes()
        .for_each_shared_match(topic, |group, members| {
            for (client, _) in members {
                out.insert((group.to_string(), client.to_string()));
            }
        });
    out
}

/// The clients any route (normal or shared) sends `topic` to.
fn routed_clients(state: &BrokerState, topic: &str) -> Vec<String> {
    let clients: BTreeSet<String> = normal_matches(state, topic)
        .into_iter()
        .chain(shared_matches(state, topic))
        .map(|(_, c)| c)
        .collect();
    clients.into_iter().collect()
}

fn retained_topics(state: &BrokerState) -> BTreeMap<String, Bytes> {
    state
        .retained()
        .iter()
        .map(|(t, m)| (t, m.payload.clone()))
        .collect()
}

/// An independent copy of `state` (without an event channel), through a snapshot.
fn copy_of(state: &BrokerState) -> BrokerState {
    let mut copy = BrokerState::new(None);
    if let Err(e) = copy.restore(&state.to_snapshot()) {
        panic!("own snapshot does not restore: {e}");
    }
    copy
}

/// Whether an `Expire` at `now_ms` would change the digest of `state`.
fn expire_changes_digest(state: &BrokerState, now_ms: u64) -> bool {
    let mut copy = copy_of(state);
    let before = copy.digest();
    copy.apply_command(&expire(1, now_ms));
    copy.digest() != before
}

// ---------------------------------------------------------------------------------
// Sessions, wills, takeover
// ---------------------------------------------------------------------------------

#[test]
fn a_new_session_is_created_connected_without_session_present() {
    let mut h = Harness::new();
    let result = h.apply(&open("a", 1, 10, false, 60, None, T0));
    assert_eq!(
        result,
        CommandResult::SessionOpened {
            session_present: false
        }
    );
    let s = h.session("a");
    assert!(s.connected);
    assert_eq!((s.node, s.connection_id, s.expiry_secs), (1, 10, 60));
    assert_eq!(s.disconnected_at_ms, None);
    assert_eq!(
        h.events(),
        vec![Event::SessionOpened {
            client_id: Arc::from("a"),
            node: 1,
            connection_id: 10,
            created: true,
        }]
    );
}

#[test]
fn resuming_without_clean_start_keeps_subscriptions_and_queue() {
    let mut h = Harness::new();
    let m = message("t/a", b"x", None, T0);
    h.setup(&[
        open("a", 1, 10, false, 60, None, T0),
        subscribe("a", &["t/+"]),
        close("a", 10, true, None, T0 + 1),
        enqueue(vec![entry("a", &m)], ROOMY),
    ]);
    assert!(!h.session("a").connected);
    let result = h.apply(&open("a", 2, 11, false, 60, None, T0 + 2));
    assert_eq!(
        result,
        CommandResult::SessionOpened {
            session_present: true
        }
    );
    let s = h.session("a");
    assert!(s.connected);
    assert_eq!((s.node, s.connection_id), (2, 11));
    assert_eq!(s.disconnected_at_ms, None);
    assert!(s.subscriptions.contains_key("t/+"));
    assert_eq!(h.seqs("a"), vec![0]);
    assert_eq!(routed_clients(&h.state, "t/a"), vec!["a".to_string()]);
    let events = h.events();
    assert!(events.contains(&Event::QueueGrew {
        client_id: Arc::from("a"),
        node: 2
    }));
    assert!(events.contains(&Event::SessionOpened {
        client_id: Arc::from("a"),
        node: 2,
        connection_id: 11,
        created: false,
    }));
}

#[test]
fn a_clean_start_ends_the_old_session_and_its_subscriptions() {
    let mut h = Harness::new();
    let m = message("t/a", b"x", None, T0);
    h.setup(&[
        open("a", 1, 10, false, 60, None, T0),
        subscribe("a", &["t/+", "$share/g/t/a"]),
        close("a", 10, true, None, T0 + 1),
        enqueue(vec![entry("a", &m)], ROOMY),
    ]);
    assert_eq!(routed_clients(&h.state, "t/a"), vec!["a".to_string()]);
    let result = h.apply(&open("a", 1, 11, true, 60, None, T0 + 2));
    assert_eq!(
        result,
        CommandResult::SessionOpened {
            session_present: false
        }
    );
    let s = h.session("a");
    assert!(s.subscriptions.is_empty());
    assert!(s.queue.is_empty());
    assert_eq!(s.queued_bytes, 0);
    assert_eq!(s.next_seq, 0);
    assert!(routed_clients(&h.state, "t/a").is_empty());
    assert!(h.state.routes().is_empty());
    let events = h.events();
    assert!(events.contains(&Event::SessionEnded {
        client_id: Arc::from("a")
    }));
}

#[test]
fn resuming_with_expiry_zero_keeps_the_queue_until_the_close_ends_the_session() {
    // The state machine's side of a known item: the connection code is to decide
    // what a resume with expiry 0 should present; here the session simply lives on
    // until its connection closes.
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 60, None, T0),
        close("a", 10, true, None, T0),
        enqueue(vec![entry("a", &message("t/a", b"x", None, T0))], ROOMY),
    ]);
    let result = h.apply(&open("a", 1, 11, false, 0, None, T0 + 1));
    assert_eq!(
        result,
        CommandResult::SessionOpened {
            session_present: true
        }
    );
    assert_eq!(h.seqs("a"), vec![0]);
    assert_eq!(h.session("a").expiry_secs, 0);
    h.apply(&close("a", 11, true, None, T0 + 2));
    assert!(h.state.session("a").is_none());
}

#[test]
fn a_second_connection_takes_the_session_over_and_the_old_one_is_told() {
    let mut h = Harness::new();
    h.setup(&[open("a", 1, 10, false, 60, None, T0)]);
    let result = h.apply(&open("a", 2, 20, false, 60, None, T0 + 5));
    assert_eq!(
        result,
        CommandResult::SessionOpened {
            session_present: true
        }
    );
    let events = h.events();
    assert_eq!(
        events.first(),
        Some(&Event::SessionTakenOver {
            client_id: Arc::from("a"),
            node: 1,
            connection_id: 10,
        })
    );
    let s = h.session("a");
    assert_eq!((s.node, s.connection_id, s.connected), (2, 20, true));
    // The old connection's late close changes nothing.
    assert_eq!(
        h.apply(&close("a", 10, false, None, T0 + 6)),
        CommandResult::NoSession
    );
    assert!(h.session("a").connected);
}

#[test]
fn reopening_a_disconnected_session_reports_no_takeover() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 60, None, T0),
        close("a", 10, true, None, T0 + 1),
    ]);
    h.apply(&open("a", 1, 11, false, 60, None, T0 + 2));
    assert!(!h
        .events()
        .iter()
        .any(|e| matches!(e, Event::SessionTakenOver { .. })));
}

#[test]
fn a_takeover_publishes_a_will_without_delay_but_cancels_a_delayed_one() {
    let mut h = Harness::new();
    h.setup(&[open("a", 1, 10, false, 60, Some(will("w/a", 0)), T0)]);
    h.apply(&open("a", 2, 11, false, 60, None, T0 + 1));
    assert_eq!(h.wills(), vec![(2, "w/a".to_string())]);

    h.setup(&[open("b", 1, 20, false, 60, Some(will("w/b", 5)), T0)]);
    h.apply(&open("b", 2, 21, false, 60, None, T0 + 1));
    assert!(
        h.wills().is_empty(),
        "a resumed session cancels a delayed will"
    );
    assert!(h.session("b").will.is_none());
}

#[test]
fn a_clean_start_publishes_the_old_will_even_with_a_delay() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 60, Some(will("w/a", 30)), T0),
        close("a", 10, false, None, T0 + 1),
    ]);
    assert!(h.session("a").will_due_at_ms.is_some());
    h.apply(&open("a", 2, 11, true, 60, None, T0 + 2));
    assert_eq!(h.wills(), vec![(2, "w/a".to_string())]);
    assert_eq!(h.session("a").will_due_at_ms, None);
}

#[test]
fn a_due_will_is_queued_for_persistent_subscribers_and_retained_by_the_state_machine() {
    // What follows from a will in the replicated state happens in apply, on every
    // node, so it does not depend on the node that publishes it living on.
    let mut h = Harness::new();
    h.setup(&[
        open("hist", 2, 20, false, 600, None, T0),
        subscribe("hist", &["w/#"]),
        close("hist", 20, true, None, T0),
        open("clean", 2, 30, true, 0, None, T0),
        subscribe("clean", &["w/#"]),
    ]);
    let mut retained_will = will("w/a", 0);
    retained_will.message.retain = true;
    h.setup(&[open("a", 1, 10, false, 60, Some(retained_will), T0)]);
    h.apply(&close("a", 10, false, None, T0 + 7));
    assert_eq!(h.wills(), vec![(1, "w/a".to_string())]);
    let queued = &h.session("hist").queue;
    assert_eq!(queued.len(), 1, "queued for the offline persistent session");
    assert_eq!(queued[0].message.topic.as_ref(), "w/a");
    assert_eq!(
        queued[0].message.received_at_ms,
        T0 + 7,
        "dated when it became due"
    );
    assert!(
        h.session("clean").queue.is_empty(),
        "a clean session gets it live"
    );
    let mut retained = Vec::new();
    h.state.retained().for_each_matching("w/#", |t, m| {
        retained.push((t.to_string(), m.payload.clone()))
    });
    assert_eq!(
        retained,
        vec![("w/a".to_string(), Bytes::from_static(b"gone"))]
    );
}

#[test]
fn a_due_will_goes_to_one_shared_group_member_chosen_from_the_state_alone() {
    // Two members of one group: a persistent one, offline, and a clean one connected
    // on node 2. Exactly one gets the will, and two nodes applying the same log choose
    // the same one.
    let log = [
        open("persistent-member", 2, 20, false, 600, None, T0),
        subscribe("persistent-member", &["$share/g/w/#"]),
        close("persistent-member", 20, true, None, T0),
        open("clean-member", 2, 30, true, 0, None, T0),
        subscribe("clean-member", &["$share/g/w/#"]),
        open("a", 1, 10, false, 60, Some(will("w/a", 0)), T0),
        close("a", 10, false, None, T0 + 1),
    ];
    let run = || {
        let mut h = Harness::new();
        h.setup(&log[..log.len() - 1]);
        h.apply(&log[log.len() - 1]);
        let queued = h.session("persistent-member").queue.len();
        let live: Vec<(String, NodeId)> = h
            .events()
            .into_iter()
            .filter_map(|e| match e {
                Event::SharedDelivery {
                    client_id, node, ..
                } => Some((client_id.to_string(), node)),
                _ => None,
            })
            .collect();
        (queued, live)
    };
    let (queued, live) = run();
    assert_eq!(
        queued + live.len(),
        1,
        "one member gets it: queued {queued}, live {live:?}"
    );
    if let Some((client, node)) = live.first() {
        assert_eq!((client.as_str(), *node), ("clean-member", 2));
    }
    assert_eq!(run(), (queued, live), "the same choice every time");
}

/// A queue entry for `client` at `qos`.
fn entry_at(client: &str, message: &Arc<Message>, qos: u8) -> EnqueueEntry {
    EnqueueEntry {
        qos,
        ..entry(client, message)
    }
}

fn redistribute(after_ms: u64, now_ms: u64) -> Command {
    Command::Redistribute { after_ms, now_ms }
}

fn queued_topics(h: &Harness, client: &str) -> Vec<String> {
    h.session(client)
        .queue
        .iter()
        .map(|q| q.message.topic.to_string())
        .collect()
}

#[test]
fn an_offline_shared_member_s_queue_goes_to_a_connected_member_once_it_has_been_away_long_enough() {
    // "away" has been offline since T0; "here" is a connected persistent member.
    let jobs_1 = message("jobs/1", b"1", None, T0 - 10);
    let alert = message("alerts/x", b"a", None, T0 - 10);
    let sent_qos2 = message("jobs/2", b"2", None, T0 - 5);
    let new_qos2 = message("jobs/3", b"3", None, T0 + 5);
    let mut h = Harness::new();
    h.setup(&[
        open("away", 1, 10, false, 3600, None, T0 - 100),
        Command::Subscribe {
            client_id: Arc::from("away"),
            connection_id: ANY_CONNECTION,
            entries: vec![
                ("$share/g/jobs/#".into(), options(2)),
                ("alerts/#".into(), options(1)),
            ],
        },
        close("away", 10, false, None, T0),
        open("here", 2, 20, false, 3600, None, T0),
        Command::Subscribe {
            client_id: Arc::from("here"),
            connection_id: ANY_CONNECTION,
            entries: vec![("$share/g/jobs/#".into(), options(2))],
        },
        enqueue(
            vec![
                entry_at("away", &jobs_1, 1),
                entry_at("away", &alert, 1),
                entry_at("away", &sent_qos2, 2),
                entry_at("away", &new_qos2, 2),
            ],
            ROOMY,
        ),
    ]);
    assert!(!h.state.redistribution_due(60_000, T0 + 59_999), "not yet");
    h.apply(&redistribute(60_000, T0 + 59_999));
    assert_eq!(queued_topics(&h, "away").len(), 4, "nothing moves early");

    assert!(h.state.redistribution_due(60_000, T0 + 60_000));
    h.apply(&redistribute(60_000, T0 + 60_000));
    assert_eq!(
        queued_topics(&h, "away"),
        vec!["alerts/x", "jobs/2"],
        "its own subscription's message stays, and a QoS 2 message it may have been sent"
    );
    assert_eq!(queued_topics(&h, "here"), vec!["jobs/1", "jobs/3"]);
    assert!(
        h.events()
            .iter()
            .any(|e| matches!(e, Event::QueueGrew { client_id, .. } if &**client_id == "here")),
        "the connected member's connection is told"
    );
    assert!(!h.state.redistribution_due(60_000, T0 + 120_000), "done");
}

#[test]
fn without_a_connected_member_an_offline_member_keeps_its_shared_messages() {
    let job = message("jobs/1", b"1", None, T0);
    let mut h = Harness::new();
    h.setup(&[
        open("away", 1, 10, false, 3600, None, T0),
        subscribe("away", &["$share/g/jobs/#"]),
        close("away", 10, false, None, T0),
        open("also-away", 2, 20, false, 3600, None, T0),
        subscribe("also-away", &["$share/g/jobs/#"]),
        close("also-away", 20, false, None, T0),
        enqueue(vec![entry("away", &job)], ROOMY),
    ]);
    assert!(!h.state.redistribution_due(1, T0 + 10_000));
    h.apply(&redistribute(1, T0 + 10_000));
    assert_eq!(queued_topics(&h, "away"), vec!["jobs/1"]);
}

#[test]
fn a_redistributed_message_goes_live_to_a_clean_member_the_same_on_a_node_restored_from_a_snapshot()
{
    // Members subscribe in an order unlike their client ids': a node restored from a
    // snapshot rebuilds its route table in client-id order, and must choose alike.
    let mut log = vec![
        open("away", 1, 10, false, 3600, None, T0),
        subscribe("away", &["$share/g/jobs/#"]),
        close("away", 10, false, None, T0),
    ];
    for (i, member) in ["m-c", "m-a", "m-d", "m-b"].iter().enumerate() {
        log.push(open(member, 2 + i as u64, 20 + i as u64, true, 0, None, T0));
        log.push(subscribe(member, &["$share/g/jobs/#"]));
    }
    let jobs: Vec<Arc<Message>> = (0..8)
        .map(|i| message(&format!("jobs/{i}"), b"j", None, T0))
        .collect();
    log.push(enqueue(
        jobs.iter().map(|m| entry("away", m)).collect(),
        ROOMY,
    ));
    let mut h = Harness::new();
    h.setup(&log);
    let mut restored = copy_of(&h.state);
    h.apply(&redistribute(1_000, T0 + 1_000));
    restored.apply_command(&redistribute(1_000, T0 + 1_000));
    assert_eq!(restored.digest(), h.state.digest());
    let live: Vec<(String, String)> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::SharedDelivery {
                client_id, message, ..
            } => Some((message.topic.to_string(), client_id.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(
        live.len(),
        8,
        "each message to one connected member: {live:?}"
    );
    assert!(h.session("away").queue.is_empty());
    let chosen: BTreeSet<&str> = live.iter().map(|(_, c)| c.as_str()).collect();
    assert!(chosen.len() > 1, "spread over the members: {live:?}");
}

#[test]
fn a_graceful_close_discards_the_will() {
    let mut h = Harness::new();
    h.setup(&[open("a", 1, 10, false, 60, Some(will("w/a", 0)), T0)]);
    assert_eq!(
        h.apply(&close("a", 10, true, None, T0 + 1)),
        CommandResult::Done
    );
    assert!(h.wills().is_empty());
    let s = h.session("a");
    assert!(!s.connected);
    assert_eq!(s.disconnected_at_ms, Some(T0 + 1));
    assert!(s.will.is_none());
    h.apply(&expire(1, T0 + 30_000));
    assert!(h.wills().is_empty());
}

#[test]
fn an_abrupt_close_publishes_a_will_without_delay_at_once() {
    let mut h = Harness::new();
    h.setup(&[open("a", 3, 10, false, 60, Some(will("w/a", 0)), T0)]);
    h.apply(&close("a", 10, false, None, T0 + 1));
    assert_eq!(h.wills(), vec![(3, "w/a".to_string())]);
    assert!(h.session("a").will.is_none());
}

#[test]
fn a_delayed_will_is_published_by_the_first_expire_at_or_after_its_due_time() {
    let mut h = Harness::new();
    h.setup(&[open("a", 1, 10, false, 60, Some(will("w/a", 5)), T0)]);
    h.apply(&close("a", 10, false, None, T0 + 1_000));
    assert!(h.wills().is_empty());
    assert_eq!(h.session("a").will_due_at_ms, Some(T0 + 6_000));
    assert!(!h.state.expiry_due(T0 + 5_999));
    h.apply(&expire(2, T0 + 5_999));
    assert!(h.wills().is_empty(), "not due yet");
    assert!(h.state.expiry_due(T0 + 6_000));
    h.apply(&expire(2, T0 + 6_000));
    assert_eq!(h.wills(), vec![(2, "w/a".to_string())]);
    let s = h.session("a");
    assert!(s.will.is_none());
    assert_eq!(s.will_due_at_ms, None);
    h.apply(&expire(2, T0 + 7_000));
    assert!(h.wills().is_empty(), "published once");
}

#[test]
fn a_reconnect_within_the_will_delay_cancels_the_will() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 60, Some(will("w/a", 5)), T0),
        close("a", 10, false, None, T0),
        open("a", 1, 11, false, 60, None, T0 + 2_000),
    ]);
    h.apply(&expire(1, T0 + 10_000));
    assert!(h.wills().is_empty());
    assert_eq!(h.session("a").will_due_at_ms, None);
}

#[test]
fn a_session_that_ends_before_its_will_delay_publishes_the_will_then() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 2, Some(will("w/a", 30)), T0),
        close("a", 10, false, None, T0),
    ]);
    h.apply(&expire(1, T0 + 1_999));
    assert!(h.wills().is_empty());
    assert!(h.state.session("a").is_some());
    h.apply(&expire(1, T0 + 2_000));
    let events = h.events();
    assert!(h.state.session("a").is_none());
    assert!(events.contains(&Event::SessionEnded {
        client_id: Arc::from("a")
    }));
    assert!(events.iter().any(|e| matches!(
        e,
        Event::PublishWill { publisher: 1, message } if &*message.topic == "w/a"
    )));
}

#[test]
fn a_delayed_will_of_a_session_without_expiry_is_published_at_the_close() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 0, Some(will("w/a", 30)), T0),
        subscribe("a", &["t/a"]),
    ]);
    h.apply(&close("a", 10, false, None, T0));
    assert_eq!(h.wills(), vec![(1, "w/a".to_string())]);
    assert!(h.state.session("a").is_none());
}

#[test]
fn a_session_without_expiry_ends_with_its_connection_and_leaves_no_route() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, true, 0, None, T0),
        subscribe("a", &["t/+", "$share/g/#"]),
    ]);
    h.apply(&close("a", 10, true, None, T0 + 1));
    assert!(h.state.session("a").is_none());
    assert_eq!(h.state.sessions().count(), 0);
    assert!(h.state.routes().is_empty());
    assert_eq!(
        h.events(),
        vec![Event::SessionEnded {
            client_id: Arc::from("a")
        }]
    );
}

#[test]
fn a_disconnect_can_change_the_session_expiry() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 60, None, T0),
        open("b", 1, 20, false, 60, None, T0),
    ]);
    h.apply(&close("a", 10, true, Some(0), T0 + 1));
    assert!(
        h.state.session("a").is_none(),
        "expiry 0 at DISCONNECT ends it"
    );
    h.apply(&close("b", 20, true, Some(5), T0 + 1));
    assert_eq!(h.session("b").expiry_secs, 5);
    h.apply(&expire(1, T0 + 5_001));
    assert!(h.state.session("b").is_none());
}

#[test]
fn a_close_from_another_connection_is_ignored() {
    let mut h = Harness::new();
    h.setup(&[open("a", 1, 10, false, 60, Some(will("w/a", 0)), T0)]);
    assert_eq!(
        h.apply(&close("a", 9, false, None, T0 + 1)),
        CommandResult::NoSession
    );
    assert!(h.session("a").connected);
    assert!(h.wills().is_empty());
    h.setup(&[close("a", 10, true, None, T0 + 2)]);
    assert_eq!(
        h.apply(&close("a", 10, false, None, T0 + 3)),
        CommandResult::NoSession,
        "a second close of the same connection"
    );
    assert_eq!(h.session("a").disconnected_at_ms, Some(T0 + 2));
}

#[test]
fn a_persistent_session_expires_after_its_interval_and_not_before() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 10, None, T0),
        subscribe("a", &["t/a"]),
        close("a", 10, true, None, T0 + 1_000),
        open("forever", 1, 20, false, u32::MAX, None, T0),
        close("forever", 20, true, None, T0 + 1_000),
    ]);
    assert!(!h.state.expiry_due(T0 + 10_999));
    h.apply(&expire(1, T0 + 10_999));
    assert!(h.state.session("a").is_some());
    assert!(h.state.expiry_due(T0 + 11_000));
    h.apply(&expire(1, T0 + 11_000));
    assert!(h.state.session("a").is_none());
    assert!(h.state.routes().is_empty());
    assert_eq!(
        h.events(),
        vec![Event::SessionEnded {
            client_id: Arc::from("a")
        }]
    );
    h.apply(&expire(1, u64::MAX));
    assert!(
        h.state.session("forever").is_some(),
        "u32::MAX never expires"
    );
}

#[test]
fn a_connected_session_never_expires() {
    let mut h = Harness::new();
    h.setup(&[open("a", 1, 10, false, 1, None, T0)]);
    assert!(!h.state.expiry_due(T0 + 100_000));
    h.apply(&expire(1, T0 + 100_000));
    assert!(h.session("a").connected);
}

#[test]
fn node_lost_ends_the_connected_sessions_of_that_node_only() {
    let mut h = Harness::new();
    h.setup(&[
        open("p", 1, 10, false, 60, Some(will("w/p", 0)), T0),
        open("q", 1, 11, true, 0, Some(will("w/q", 5)), T0),
        open("r", 2, 12, false, 60, Some(will("w/r", 0)), T0),
        open("s", 1, 13, false, 60, None, T0),
        close("s", 13, true, None, T0 + 1),
        open("d", 1, 14, false, 60, Some(will("w/d", 5)), T0),
    ]);
    h.apply(&Command::NodeLost {
        node: 1,
        publisher: 3,
        now_ms: T0 + 100,
    });
    let events = h.events();
    let kicked: Vec<(String, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Kick {
                client_id,
                node: 1,
                connection_id,
            } => Some((client_id.to_string(), *connection_id)),
            _ => None,
        })
        .collect();
    assert_eq!(
        kicked,
        vec![("d".into(), 14), ("p".into(), 10), ("q".into(), 11)]
    );
    let mut wills: Vec<(NodeId, String)> = events
        .iter()
        .filter_map(|e| match e {
            Event::PublishWill { publisher, message } => {
                Some((*publisher, message.topic.to_string()))
            }
            _ => None,
        })
        .collect();
    wills.sort();
    assert_eq!(wills, vec![(3, "w/p".into()), (3, "w/q".into())]);
    let p = h.session("p");
    assert!(!p.connected);
    assert_eq!(p.disconnected_at_ms, Some(T0 + 100));
    assert!(h.state.session("q").is_none(), "no expiry: ended");
    assert!(h.session("r").connected, "another node's session stays");
    assert_eq!(h.session("s").disconnected_at_ms, Some(T0 + 1));
    assert_eq!(h.session("d").will_due_at_ms, Some(T0 + 5_100));
    h.apply(&expire(2, T0 + 5_100));
    assert_eq!(h.wills(), vec![(2, "w/d".to_string())]);
}

#[test]
fn kick_reports_the_connection_and_keeps_the_session() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 2, 10, false, 60, None, T0),
        open("b", 1, 11, false, 60, None, T0),
        close("b", 11, true, None, T0),
    ]);
    let before = h.state.digest();
    assert_eq!(
        h.apply(&Command::Kick {
            client_id: Arc::from("a")
        }),
        CommandResult::Done
    );
    assert_eq!(
        h.events(),
        vec![Event::Kick {
            client_id: Arc::from("a"),
            node: 2,
            connection_id: 10
        }]
    );
    assert_eq!(
        h.apply(&Command::Kick {
            client_id: Arc::from("b")
        }),
        CommandResult::NoSession
    );
    assert_eq!(h.state.digest(), before);
}

#[test]
fn commands_for_an_unknown_session_report_no_session_and_change_nothing() {
    let mut h = Harness::new();
    let before = h.state.digest();
    for cmd in [
        close("x", 1, false, None, T0),
        subscribe("x", &["t/a"]),
        unsubscribe("x", &["t/a"]),
        ack("x", &[0], &[1]),
        Command::InboundQos2 {
            client_id: Arc::from("x"),
            connection_id: ANY_CONNECTION,
            received: vec![1],
            released: vec![],
        },
        Command::Kick {
            client_id: Arc::from("x"),
        },
    ] {
        assert_eq!(h.apply(&cmd), CommandResult::NoSession, "{cmd:?}");
    }
    assert_eq!(h.state.digest(), before);
    assert!(h.events().is_empty());
}

#[test]
fn a_muted_state_applies_but_reports_no_events() {
    let mut h = Harness::new();
    h.state.set_muted(true);
    h.apply(&open("a", 1, 10, false, 60, Some(will("w/a", 0)), T0));
    h.apply(&open("a", 1, 11, true, 60, None, T0));
    assert!(h.events().is_empty());
    assert_eq!(h.session("a").connection_id, 11);
    h.state.set_muted(false);
    h.apply(&close("a", 11, true, Some(0), T0));
    assert_eq!(h.events().len(), 1);
}

// ---------------------------------------------------------------------------------
// Subscriptions and the route table
// ---------------------------------------------------------------------------------

#[test]
fn subscribe_and_unsubscribe_are_reflected_in_the_route_table() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 60, None, T0),
        open("b", 2, 20, false, 60, None, T0),
    ]);
    assert_eq!(
        h.apply(&subscribe("a", &["t/+", "#", "$share/g/t/a"])),
        CommandResult::Subscribed(vec![false, false, false])
    );
    assert_eq!(
        h.apply(&subscribe("b", &["t/a", "$share/g/t/a"])),
        CommandResult::Subscribed(vec![false, false])
    );
    assert_eq!(
        h.apply(&subscribe("a", &["t/+"])),
        CommandResult::Subscribed(vec![true])
    );
    let pairs = |v: &[(&str, &str)]| -> BTreeSet<(String, String)> {
        v.iter()
            .map(|(f, c)| (f.to_string(), c.to_string()))
            .collect()
    };
    assert_eq!(
        normal_matches(&h.state, "t/a"),
        pairs(&[("t/+", "a"), ("#", "a"), ("t/a", "b")])
    );
    assert_eq!(
        shared_matches(&h.state, "t/a"),
        pairs(&[("$share/g/t/a", "a"), ("$share/g/t/a", "b")])
    );
    assert_eq!(normal_matches(&h.state, "x/y"), pairs(&[("#", "a")]));
    assert!(
        normal_matches(&h.state, "$SYS/x").is_empty(),
        "wildcards skip $ topics"
    );
    assert_eq!(h.state.routes().len(), 5);

    assert_eq!(
        h.apply(&unsubscribe("a", &["#", "nope", "$share/g/t/a"])),
        CommandResult::Unsubscribed(vec![true, false, true])
    );
    assert_eq!(
        normal_matches(&h.state, "t/a"),
        pairs(&[("t/+", "a"), ("t/a", "b")])
    );
    assert_eq!(
        shared_matches(&h.state, "t/a"),
        pairs(&[("$share/g/t/a", "b")])
    );
    assert!(normal_matches(&h.state, "x/y").is_empty());
    let a = h.session("a");
    assert_eq!(a.subscriptions.keys().collect::<Vec<_>>(), vec!["t/+"]);
    assert_eq!(
        h.apply(&unsubscribe("a", &["t/+"])),
        CommandResult::Unsubscribed(vec![true])
    );
    assert!(h.session("a").subscriptions.is_empty());
    assert_eq!(h.state.routes().len(), 2);
}

#[test]
fn subscribing_again_replaces_the_options_in_session_and_routes() {
    let mut h = Harness::new();
    h.setup(&[open("a", 1, 10, false, 60, None, T0)]);
    h.apply(&subscribe("a", &["t/a"]));
    h.apply(&Command::Subscribe {
        client_id: Arc::from("a"),
        connection_id: ANY_CONNECTION,
        entries: vec![("t/a".into(), options(2))],
    });
    assert_eq!(h.session("a").subscriptions["t/a"].qos, 2);
    let mut granted = Vec::new();
    h.state
        .routes()
        .for_each_match("t/a", |_, _, o| granted.push(o.qos));
    assert_eq!(granted, vec![2]);
    assert_eq!(h.state.routes().len(), 1);
}

// ---------------------------------------------------------------------------------
// Retained messages
// ---------------------------------------------------------------------------------

#[test]
fn a_retained_message_is_set_replaced_and_cleared_by_an_empty_payload() {
    let mut h = Harness::new();
    h.apply(&set_retained("t/a", Some(message("t/a", b"1", None, T0))));
    h.apply(&set_retained("t/b", Some(message("t/b", b"2", None, T0))));
    h.apply(&set_retained("t/a", Some(message("t/a", b"3", None, T0))));
    assert_eq!(
        retained_topics(&h.state),
        BTreeMap::from([
            ("t/a".to_string(), Bytes::from_static(b"3")),
            ("t/b".to_string(), Bytes::from_static(b"2")),
        ])
    );
    assert_eq!(h.state.retained().len(), 2);
    h.apply(&set_retained("t/a", Some(message("t/a", b"", None, T0))));
    assert!(h.state.retained().get("t/a").is_none());
    h.apply(&set_retained("t/b", None));
    assert!(h.state.retained().is_empty());
    assert_eq!(
        h.apply(&set_retained("t/c", None)),
        CommandResult::Done,
        "clearing nothing is fine"
    );
}

#[test]
fn expired_retained_messages_are_cleared_by_expire() {
    let mut h = Harness::new();
    h.apply(&set_retained(
        "t/a",
        Some(message("t/a", b"1", Some(5), T0)),
    ));
    h.apply(&set_retained("t/b", Some(message("t/b", b"2", None, T0))));
    assert!(!h.state.expiry_due(T0 + 4_999));
    h.apply(&expire(1, T0 + 4_999));
    assert_eq!(h.state.retained().len(), 2);
    assert!(h.state.expiry_due(T0 + 5_000));
    h.apply(&expire(1, T0 + 5_000));
    assert_eq!(
        retained_topics(&h.state).into_keys().collect::<Vec<_>>(),
        vec!["t/b".to_string()]
    );
}

// ---------------------------------------------------------------------------------
// Queues and their limits
// ---------------------------------------------------------------------------------

/// A disconnected persistent session `a` with an empty queue.
fn offline_session() -> Harness {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 600, None, T0),
        close("a", 10, true, None, T0),
    ]);
    h
}

/// Messages of weight 4 (topic "t/n" plus a one-byte payload), numbered by payload.
fn small(n: u8) -> Arc<Message> {
    message("t/n", &[n], None, T0)
}

fn payloads(h: &Harness, client: &str) -> Vec<u8> {
    h.session(client)
        .queue
        .iter()
        .map(|m| m.message.payload[0])
        .collect()
}

#[test]
fn drop_newest_refuses_messages_beyond_the_message_count() {
    let mut h = offline_session();
    let l = limits(2, 1_000, QueueFullPolicy::DropNewest);
    let r = h.apply(&enqueue(
        vec![
            entry("a", &small(1)),
            entry("a", &small(2)),
            entry("a", &small(3)),
        ],
        l,
    ));
    assert_eq!(
        r,
        CommandResult::Enqueued {
            accepted: 2,
            dropped: 1
        }
    );
    assert_eq!(payloads(&h, "a"), vec![1, 2]);
    assert_eq!(h.seqs("a"), vec![0, 1]);
    assert_eq!(h.session("a").queued_bytes, 8);
    let r = h.apply(&enqueue(vec![entry("a", &small(4))], l));
    assert_eq!(
        r,
        CommandResult::Enqueued {
            accepted: 0,
            dropped: 1
        }
    );
    assert_eq!(h.session("a").next_seq, 2, "a refused message takes no seq");
}

#[test]
fn drop_oldest_evicts_the_oldest_beyond_the_message_count() {
    let mut h = offline_session();
    let l = limits(2, 1_000, QueueFullPolicy::DropOldest);
    let r = h.apply(&enqueue(
        vec![
            entry("a", &small(1)),
            entry("a", &small(2)),
            entry("a", &small(3)),
            entry("a", &small(4)),
        ],
        l,
    ));
    assert_eq!(
        r,
        CommandResult::Enqueued {
            accepted: 4,
            dropped: 2
        }
    );
    assert_eq!(payloads(&h, "a"), vec![3, 4]);
    assert_eq!(h.seqs("a"), vec![2, 3]);
    assert_eq!(h.session("a").queued_bytes, 8);
}

#[test]
fn drop_newest_refuses_messages_beyond_the_byte_limit() {
    let mut h = offline_session();
    // Weights 4, 4, 4 against 10 bytes: the third does not fit.
    let l = limits(100, 10, QueueFullPolicy::DropNewest);
    let r = h.apply(&enqueue(
        vec![
            entry("a", &small(1)),
            entry("a", &small(2)),
            entry("a", &small(3)),
        ],
        l,
    ));
    assert_eq!(
        r,
        CommandResult::Enqueued {
            accepted: 2,
            dropped: 1
        }
    );
    assert_eq!(h.session("a").queued_bytes, 8);
    // A lighter message still fits in the 2 bytes left.
    let r = h.apply(&enqueue(vec![entry("a", &message("t", b"x", None, T0))], l));
    assert_eq!(
        r,
        CommandResult::Enqueued {
            accepted: 1,
            dropped: 0
        }
    );
    assert_eq!(h.session("a").queued_bytes, 10);
}

#[test]
fn drop_oldest_evicts_until_the_new_message_fits_the_byte_limit() {
    let mut h = offline_session();
    let l = limits(100, 12, QueueFullPolicy::DropOldest);
    h.apply(&enqueue(
        vec![
            entry("a", &small(1)),
            entry("a", &small(2)),
            entry("a", &small(3)),
        ],
        l,
    ));
    assert_eq!(h.session("a").queued_bytes, 12);
    // Weight 7 ("t/n" + 4 bytes): two of the three must go.
    let big = message("t/n", &[9, 9, 9, 9], None, T0);
    let r = h.apply(&enqueue(vec![entry("a", &big)], l));
    assert_eq!(
        r,
        CommandResult::Enqueued {
            accepted: 1,
            dropped: 2
        }
    );
    assert_eq!(payloads(&h, "a"), vec![3, 9]);
    assert_eq!(h.session("a").queued_bytes, 11);
}

#[test]
fn a_message_larger_than_the_byte_limit_is_dropped_without_evicting_the_queue() {
    // mqtt.max_queued_bytes may be set below mqtt.max_packet_size: one large publish
    // must not wipe a session's queue to end up dropped anyway.
    for policy in [QueueFullPolicy::DropOldest, QueueFullPolicy::DropNewest] {
        let mut h = offline_session();
        let l = limits(100, 10, policy);
        h.apply(&enqueue(
            vec![entry("a", &small(1)), entry("a", &small(2))],
            l,
        ));
        let huge = message("t/n", &[0; 32], None, T0);
        let r = h.apply(&enqueue(vec![entry("a", &huge)], l));
        assert_eq!(
            r,
            CommandResult::Enqueued {
                accepted: 0,
                dropped: 1
            },
            "{policy:?}"
        );
        assert_eq!(payloads(&h, "a"), vec![1, 2], "{policy:?}");
        assert_eq!(h.session("a").queued_bytes, 8, "{policy:?}");
    }
}

#[test]
fn a_message_for_a_missing_session_counts_as_dropped() {
    let mut h = offline_session();
    let r = h.apply(&enqueue(
        vec![entry("nobody", &small(1)), entry("a", &small(2))],
        ROOMY,
    ));
    assert_eq!(
        r,
        CommandResult::Enqueued {
            accepted: 1,
            dropped: 1
        }
    );
}

#[test]
fn queue_grew_is_reported_once_per_connected_session() {
    let mut h = offline_session();
    h.setup(&[open("b", 2, 20, false, 600, None, T0)]);
    h.apply(&enqueue(
        vec![
            entry("a", &small(1)),
            entry("b", &small(2)),
            entry("b", &small(3)),
        ],
        ROOMY,
    ));
    assert_eq!(
        h.events(),
        vec![Event::QueueGrew {
            client_id: Arc::from("b"),
            node: 2
        }]
    );
}

#[test]
fn a_qos1_ack_removes_the_message_and_its_bytes_and_seqs_keep_growing() {
    let mut h = offline_session();
    h.apply(&enqueue(
        vec![
            entry("a", &small(1)),
            entry("a", &small(2)),
            entry("a", &small(3)),
        ],
        ROOMY,
    ));
    h.apply(&ack("a", &[1], &[]));
    assert_eq!(h.seqs("a"), vec![0, 2]);
    assert_eq!(h.session("a").queued_bytes, 8);
    h.apply(&ack("a", &[0, 2, 7], &[]));
    assert!(h.session("a").queue.is_empty());
    assert_eq!(h.session("a").queued_bytes, 0);
    h.apply(&enqueue(vec![entry("a", &small(4))], ROOMY));
    assert_eq!(h.seqs("a"), vec![3], "seqs are never reused");
}

#[test]
fn a_qos2_pubrec_moves_the_message_to_awaiting_pubcomp_and_pubcomp_ends_it() {
    let mut h = offline_session();
    h.apply(&enqueue(
        vec![entry("a", &small(1)), entry("a", &small(2))],
        ROOMY,
    ));
    h.apply(&ack("a", &[], &[0]));
    let s = h.session("a");
    assert_eq!(h.seqs("a"), vec![1]);
    assert_eq!(
        s.awaiting_pubcomp.iter().copied().collect::<Vec<_>>(),
        vec![0]
    );
    assert_eq!(s.queued_bytes, 4);
    // A PUBREC for a seq not queued (a duplicate) adds nothing.
    h.apply(&ack("a", &[], &[0, 5]));
    assert_eq!(h.session("a").awaiting_pubcomp.len(), 1);
    h.apply(&ack("a", &[0], &[]));
    let s = h.session("a");
    assert!(s.awaiting_pubcomp.is_empty());
    assert_eq!(h.seqs("a"), vec![1], "PUBCOMP of 0 leaves 1 queued");
    // PUBREC and PUBCOMP in one command.
    h.apply(&ack("a", &[1], &[1]));
    let s = h.session("a");
    assert!(s.queue.is_empty() && s.awaiting_pubcomp.is_empty());
    assert_eq!(s.queued_bytes, 0);
}

#[test]
fn inbound_qos2_ids_are_held_until_released() {
    let mut h = offline_session();
    let inbound = |received: Vec<u16>, released: Vec<u16>| Command::InboundQos2 {
        client_id: Arc::from("a"),
        connection_id: ANY_CONNECTION,
        received,
        released,
    };
    assert_eq!(
        h.apply(&inbound(vec![1, 2, 3], vec![])),
        CommandResult::Done
    );
    h.apply(&inbound(vec![2], vec![1]));
    assert_eq!(
        h.session("a")
            .inbound_qos2
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![2, 3]
    );
    h.apply(&inbound(vec![], vec![2, 3, 9]));
    assert!(h.session("a").inbound_qos2.is_empty());
}

#[test]
fn expired_queued_messages_are_dropped_by_expire_with_their_bytes() {
    let mut h = offline_session();
    h.apply(&enqueue(
        vec![
            entry("a", &message("t/n", &[1], Some(2), T0)),
            entry("a", &message("t/n", &[2], None, T0)),
            entry("a", &message("t/n", &[3], Some(4), T0)),
        ],
        ROOMY,
    ));
    assert!(!h.state.expiry_due(T0 + 1_999));
    assert!(h.state.expiry_due(T0 + 2_000));
    h.apply(&expire(1, T0 + 2_000));
    assert_eq!(payloads(&h, "a"), vec![2, 3]);
    assert_eq!(h.session("a").queued_bytes, 8);
    h.apply(&expire(1, T0 + 4_000));
    assert_eq!(payloads(&h, "a"), vec![2]);
    assert_eq!(h.seqs("a"), vec![1]);
    assert_eq!(h.session("a").queued_bytes, 4);
}

#[test]
fn expired_messages_leave_the_queue_of_a_connected_session_too() {
    let mut h = Harness::new();
    h.setup(&[open("a", 1, 10, false, 600, None, T0)]);
    h.apply(&enqueue(
        vec![entry("a", &message("t/n", &[1], Some(1), T0))],
        ROOMY,
    ));
    assert!(h.state.expiry_due(T0 + 1_000));
    h.apply(&expire(1, T0 + 1_000));
    assert!(h.session("a").queue.is_empty());
    assert_eq!(h.session("a").queued_bytes, 0);
}

#[test]
fn expiry_due_agrees_with_whether_expire_changes_the_digest() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 20, Some(will("w/a", 5)), T0),
        close("a", 10, false, None, T0),
        open("b", 1, 11, false, 600, None, T0),
        enqueue(
            vec![
                entry("b", &message("t/n", &[1], Some(3), T0)),
                entry("a", &message("t/n", &[1], Some(8), T0)),
            ],
            ROOMY,
        ),
        set_retained("t/r", Some(message("t/r", b"r", Some(12), T0))),
    ]);
    let mut now = T0;
    // Events at 3 s (b's message), 5 s (a's will), 8 s (a's message), 12 s
    // (retained) and 20 s (a's session); step through them one second at a time.
    while now <= T0 + 22_000 {
        let due = h.state.expiry_due(now);
        assert_eq!(
            due,
            expire_changes_digest(&h.state, now),
            "at +{} ms",
            now - T0
        );
        if due {
            h.apply(&expire(1, now));
        }
        now += 1_000;
    }
    assert!(h.state.session("a").is_none());
    assert!(h.state.retained().is_empty());
    assert!(h.session("b").queue.is_empty());
}

// ---------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------

#[test]
fn a_restored_snapshot_has_the_same_digest_sessions_retained_and_routes() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 60, Some(will("w/a", 3)), T0),
        subscribe("a", &["t/+", "$share/g/t/a"]),
        open("b", 2, 20, false, 60, None, T0),
        subscribe("b", &["#"]),
        close("a", 10, false, None, T0 + 1),
        enqueue(vec![entry("a", &small(1))], ROOMY),
        set_retained("t/r", Some(message("t/r", b"r", Some(12), T0))),
    ]);
    let snapshot = h.state.to_snapshot();
    let mut restored = BrokerState::new(None);
    // Restoring replaces whatever was there.
    restored.apply_command(&open("zzz", 1, 1, false, 60, None, T0));
    restored
        .restore(&snapshot)
        .expect("a snapshot of the state restores");
    assert_eq!(restored.digest(), h.state.digest());
    assert_eq!(restored.to_snapshot(), snapshot);
    let original: Vec<_> = h.state.sessions().collect();
    let copy: Vec<_> = restored.sessions().collect();
    assert_eq!(original, copy);
    assert_eq!(retained_topics(&restored), retained_topics(&h.state));
    for topic in ["t/a", "t/b", "x", "$SYS/x"] {
        assert_eq!(
            normal_matches(&restored, topic),
            normal_matches(&h.state, topic)
        );
        assert_eq!(
            shared_matches(&restored, topic),
            shared_matches(&h.state, topic)
        );
    }
}

#[test]
fn a_garbled_snapshot_is_refused() {
    let mut state = BrokerState::new(None);
    assert!(state.restore(&[0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
}

/// A snapshot is read from its file as a stream, so a length inside it is not checked
/// against bytes in memory: the input's length bounds it, and a lie is refused before
/// anything that large is allocated (the test would abort, out of memory, otherwise).
#[test]
fn a_snapshot_whose_lengths_lie_is_refused_without_allocating_them() {
    let mut h = varied_state();
    let digest = h.state.digest();
    // Format 3: the marker, one message, whose topic claims 2^50 bytes.
    let mut lie = format::marker(format::SNAPSHOT_FORMAT)
        .to_le_bytes()
        .to_vec();
    lie.extend_from_slice(&1u64.to_le_bytes());
    lie.extend_from_slice(&(1u64 << 50).to_le_bytes());
    lie.extend_from_slice(b"topic");
    let mut input = &lie[..];
    match h.state.restore_from(&mut input, lie.len() as u64) {
        Err(RestoreError::Decode(e)) => {
            assert!(matches!(*e, bincode::ErrorKind::SizeLimit), "{e}")
        }
        other => panic!("a lying snapshot restored: {other:?}"),
    }
    assert_eq!(h.state.digest(), digest);
}

#[test]
fn the_digest_depends_on_the_state_not_on_how_it_was_reached() {
    let mut a = BrokerState::new(None);
    let mut b = BrokerState::new(None);
    a.apply_command(&open("x", 1, 1, false, 60, None, T0));
    a.apply_command(&open("y", 1, 2, false, 60, None, T0));
    a.apply_command(&set_retained("t/1", Some(small(1))));
    a.apply_command(&set_retained("t/2", Some(small(2))));
    b.apply_command(&set_retained("t/2", Some(small(2))));
    b.apply_command(&open("y", 1, 2, false, 60, None, T0));
    b.apply_command(&set_retained("t/1", Some(small(1))));
    b.apply_command(&open("x", 1, 1, false, 60, None, T0));
    assert_eq!(a.digest(), b.digest());
    b.apply_command(&subscribe("x", &["t/+"]));
    assert_ne!(a.digest(), b.digest());
}

// ---------------------------------------------------------------------------------
// Exactly-once apply (DESIGN invariant 7)
// ---------------------------------------------------------------------------------

fn request(node: NodeId, incarnation: u64, seqs: &[u64], commands: Vec<Command>) -> Request {
    assert_eq!(seqs.len(), commands.len(), "one seq per command");
    Request {
        origin: Some(Origin { node, incarnation }),
        commands,
        seqs: seqs.to_vec(),
        sent_at_ms: 0,
    }
}

fn no_origin(commands: Vec<Command>) -> Request {
    Request {
        origin: None,
        commands,
        seqs: Vec::new(),
        sent_at_ms: 0,
    }
}

/// A state with "s", a persistent session offline (its queue collects messages), and
/// "p", a connected publisher on connection 10.
fn subscriber_and_publisher() -> Harness {
    let mut h = Harness::new();
    h.setup(&[
        open("s", 1, 1, false, 600, None, T0),
        close("s", 1, true, None, T0 + 1),
        open("p", 1, 10, false, 600, None, T0 + 2),
    ]);
    h
}

#[test]
fn a_resend_of_the_last_batch_changes_nothing_and_returns_the_first_results() {
    let mut h = subscriber_and_publisher();
    let first = request(
        1,
        7,
        &[1, 2, 3],
        vec![
            open("q", 1, 20, false, 60, None, T0 + 3),
            subscribe("q", &["t/+"]),
            enqueue(vec![entry("s", &small(1)), entry("zz", &small(2))], ROOMY),
        ],
    );
    let results = h.state.apply_request(&first);
    assert_eq!(
        results,
        vec![
            CommandResult::SessionOpened {
                session_present: false
            },
            CommandResult::Subscribed(vec![false]),
            CommandResult::Enqueued {
                accepted: 1,
                dropped: 1
            },
        ]
    );
    h.events();
    let digest = h.state.digest();
    let snapshot = h.state.to_snapshot();
    // The answer was lost: the proposer sends the same entry again.
    assert_eq!(h.state.apply_request(&first), results);
    assert_eq!(h.state.digest(), digest);
    assert_eq!(h.state.to_snapshot(), snapshot);
    assert_eq!(h.events(), vec![], "a resend reports no events");
    assert_eq!(h.seqs("s"), vec![0]);
    let record = &h.state.proposers()[&1];
    assert_eq!((record.incarnation, record.applied), (7, 3));
}

#[test]
fn a_resend_of_an_earlier_batch_is_a_duplicate_and_changes_nothing() {
    let mut h = subscriber_and_publisher();
    let first = request(
        2,
        7,
        &[1],
        vec![enqueue(vec![entry("s", &small(1))], ROOMY)],
    );
    let second = request(
        2,
        7,
        &[2],
        vec![enqueue(vec![entry("s", &small(2))], ROOMY)],
    );
    h.state.apply_request(&first);
    h.state.apply_request(&second);
    let sessions: Vec<_> = h
        .state
        .sessions()
        .map(|(c, s)| (c.clone(), s.clone()))
        .collect();
    h.events();
    assert_eq!(
        h.state.apply_request(&first),
        vec![CommandResult::Duplicate]
    );
    let after: Vec<_> = h
        .state
        .sessions()
        .map(|(c, s)| (c.clone(), s.clone()))
        .collect();
    assert_eq!(after, sessions);
    assert_eq!(h.seqs("s"), vec![0, 1]);
    assert_eq!(h.events(), vec![]);
    assert_eq!(h.state.proposers()[&2].applied, 2);
}

#[test]
fn a_resend_with_commands_dropped_still_gets_each_command_its_own_result() {
    let mut h = subscriber_and_publisher();
    let full = request(
        1,
        7,
        &[4, 5, 6],
        vec![
            subscribe("p", &["a/1"]),
            enqueue(vec![entry("s", &small(1))], ROOMY),
            unsubscribe("p", &["a/1", "a/2"]),
        ],
    );
    let results = h.state.apply_request(&full);
    assert_eq!(
        results,
        vec![
            CommandResult::Subscribed(vec![false]),
            CommandResult::Enqueued {
                accepted: 1,
                dropped: 0
            },
            CommandResult::Unsubscribed(vec![true, false]),
        ]
    );
    let digest_before = h.state.digest();
    // The submitter of seq 5 gave up: the resend leaves it out.
    let subset = request(
        1,
        7,
        &[4, 6],
        vec![subscribe("p", &["a/1"]), unsubscribe("p", &["a/1", "a/2"])],
    );
    assert_eq!(
        h.state.apply_request(&subset),
        vec![results[0].clone(), results[2].clone()]
    );
    assert!(h.session("p").subscriptions.is_empty());
    assert_eq!(h.seqs("s"), vec![0]);
    // Only the proposers' record of the last batch may differ.
    let mut plain = copy_of(&h.state);
    let mut before = subscriber_and_publisher();
    before.state.apply_request(&full);
    assert_eq!(
        SessionView::from(plain.session("p").unwrap()),
        SessionView::from(before.session("p"))
    );
    assert_eq!(h.state.proposers()[&1].applied, 6);
    // A batch after the resend applies as usual.
    let next = request(1, 7, &[7], vec![subscribe("p", &["a/1"])]);
    assert_eq!(
        plain.apply_request(&next),
        vec![CommandResult::Subscribed(vec![false])]
    );
    assert_ne!(plain.digest(), digest_before);
}

#[test]
fn a_new_incarnation_of_a_proposer_starts_its_sequence_afresh() {
    let mut h = subscriber_and_publisher();
    let cmd = || vec![enqueue(vec![entry("s", &small(1))], ROOMY)];
    let accepted = vec![CommandResult::Enqueued {
        accepted: 1,
        dropped: 0,
    }];
    assert_eq!(
        h.state.apply_request(&request(1, 100, &[1], cmd())),
        accepted
    );
    assert_eq!(
        h.state.apply_request(&request(1, 100, &[1], cmd())),
        accepted
    );
    assert_eq!(h.seqs("s"), vec![0]);
    // The node restarted: its proposer counts from 1 again, and is not a resend.
    assert_eq!(
        h.state.apply_request(&request(1, 200, &[1], cmd())),
        accepted
    );
    assert_eq!(h.seqs("s"), vec![0, 1]);
    let record = &h.state.proposers()[&1];
    assert_eq!((record.incarnation, record.applied), (200, 1));
    // And the new incarnation is deduplicated in turn.
    assert_eq!(
        h.state.apply_request(&request(1, 200, &[1], cmd())),
        accepted
    );
    assert_eq!(h.seqs("s"), vec![0, 1]);
}

#[test]
fn requests_without_an_origin_always_apply() {
    let mut h = subscriber_and_publisher();
    let entry_of_format_1 = no_origin(vec![enqueue(vec![entry("s", &small(1))], ROOMY)]);
    for _ in 0..3 {
        assert_eq!(
            h.state.apply_request(&entry_of_format_1),
            vec![CommandResult::Enqueued {
                accepted: 1,
                dropped: 0
            }]
        );
    }
    assert_eq!(h.seqs("s"), vec![0, 1, 2]);
    assert!(h.state.proposers().is_empty());
}

#[test]
fn proposers_of_different_nodes_are_deduplicated_independently() {
    let mut h = subscriber_and_publisher();
    let cmd = |n| vec![enqueue(vec![entry("s", &small(n))], ROOMY)];
    let accepted = vec![CommandResult::Enqueued {
        accepted: 1,
        dropped: 0,
    }];
    // The same incarnation and seq on two nodes are two different commands.
    assert_eq!(
        h.state.apply_request(&request(1, 5, &[1], cmd(1))),
        accepted
    );
    assert_eq!(
        h.state.apply_request(&request(2, 5, &[1], cmd(2))),
        accepted
    );
    assert_eq!(h.seqs("s"), vec![0, 1]);
    // Node 1's resend after node 2's batch still gets its first result.
    assert_eq!(
        h.state.apply_request(&request(1, 5, &[1], cmd(1))),
        accepted
    );
    assert_eq!(
        h.state.apply_request(&request(2, 5, &[2], cmd(3))),
        accepted
    );
    assert_eq!(
        h.state.apply_request(&request(1, 5, &[2], cmd(4))),
        accepted
    );
    assert_eq!(payloads(&h, "s"), vec![1, 2, 3, 4]);
    let proposers: Vec<(NodeId, u64, u64)> = h
        .state
        .proposers()
        .iter()
        .map(|(n, r)| (*n, r.incarnation, r.applied))
        .collect();
    assert_eq!(proposers, vec![(1, 5, 2), (2, 5, 2)]);
}

#[test]
fn the_proposers_table_survives_snapshot_and_restore() {
    let mut h = subscriber_and_publisher();
    let batch = request(
        3,
        9,
        &[11, 12],
        vec![
            enqueue(vec![entry("s", &small(1))], ROOMY),
            subscribe("p", &["t/#"]),
        ],
    );
    let results = h.state.apply_request(&batch);
    h.state
        .apply_request(&request(1, 4, &[1], vec![subscribe("p", &["u/#"])]));
    let mut restored = BrokerState::new(None);
    restored.restore(&h.state.to_snapshot()).expect("restores");
    assert_eq!(restored.digest(), h.state.digest());
    assert_eq!(restored.proposers(), h.state.proposers());
    // The digest covers the table: nodes must agree on it too.
    let mut without = subscriber_and_publisher();
    without
        .state
        .apply_request(&no_origin(batch.commands.clone()));
    without
        .state
        .apply_request(&no_origin(vec![subscribe("p", &["u/#"])]));
    assert_ne!(without.state.digest(), h.state.digest());
    // A resend to the restored state is still recognised.
    let digest = restored.digest();
    assert_eq!(restored.apply_request(&batch), results);
    assert_eq!(restored.digest(), digest);
    assert_eq!(
        restored.session("s").map(|s| s.queue.len()),
        Some(1),
        "queued once"
    );
}

// ---------------------------------------------------------------------------------
// Connection scoping (DESIGN invariant 8)
// ---------------------------------------------------------------------------------

fn subscribe_on(client: &str, connection_id: u64, filters: &[&str]) -> Command {
    match subscribe(client, filters) {
        Command::Subscribe {
            client_id, entries, ..
        } => Command::Subscribe {
            client_id,
            connection_id,
            entries,
        },
        _ => unreachable!(),
    }
}

fn unsubscribe_on(client: &str, connection_id: u64, filters: &[&str]) -> Command {
    Command::Unsubscribe {
        client_id: Arc::from(client),
        connection_id,
        filters: filters.iter().map(|f| f.to_string()).collect(),
    }
}

fn ack_on(client: &str, connection_id: u64, completed: &[u64], received: &[u64]) -> Command {
    Command::Ack {
        client_id: Arc::from(client),
        connection_id,
        completed: completed.to_vec(),
        received: received.to_vec(),
    }
}

fn inbound_on(client: &str, connection_id: u64, received: &[u16], released: &[u16]) -> Command {
    Command::InboundQos2 {
        client_id: Arc::from(client),
        connection_id,
        received: received.to_vec(),
        released: released.to_vec(),
    }
}

#[test]
fn commands_of_a_connection_superseded_by_a_takeover_change_nothing() {
    for clean_start in [false, true] {
        let mut h = Harness::new();
        h.setup(&[
            open("a", 1, 10, false, 600, None, T0),
            subscribe_on("a", 10, &["t/a"]),
            inbound_on("a", 10, &[3], &[]),
            enqueue(vec![entry("a", &small(1)), entry("a", &small(2))], ROOMY),
            // Another connection of the same client takes the session over.
            open("a", 2, 11, clean_start, 600, None, T0 + 1),
        ]);
        let digest = h.state.digest();
        let before = SessionView::from(h.session("a"));
        let late = [
            subscribe_on("a", 10, &["late/#"]),
            unsubscribe_on("a", 10, &["t/a"]),
            ack_on("a", 10, &[0], &[1]),
            inbound_on("a", 10, &[4], &[3]),
        ];
        for cmd in &late {
            assert_eq!(
                h.apply(cmd),
                CommandResult::NoSession,
                "clean_start {clean_start}: {cmd:?}"
            );
        }
        assert_eq!(h.state.digest(), digest, "clean_start {clean_start}");
        assert_eq!(SessionView::from(h.session("a")), before);
        assert!(normal_matches(&h.state, "late/x").is_empty());
        assert_eq!(h.events(), vec![]);
        // The new connection's own commands act.
        assert_eq!(
            h.apply(&subscribe_on("a", 11, &["new/#"])),
            CommandResult::Subscribed(vec![false])
        );
        assert_eq!(routed_clients(&h.state, "new/x"), vec!["a".to_string()]);
    }
}

#[test]
fn commands_of_the_owning_connection_or_any_connection_act() {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 600, None, T0),
        enqueue(
            vec![
                entry("a", &small(1)),
                entry("a", &small(2)),
                entry("a", &small(3)),
            ],
            ROOMY,
        ),
    ]);
    assert_eq!(
        h.apply(&subscribe_on("a", 10, &["x/1", "x/2"])),
        CommandResult::Subscribed(vec![false, false])
    );
    assert_eq!(
        h.apply(&subscribe_on("a", ANY_CONNECTION, &["x/2"])),
        CommandResult::Subscribed(vec![true])
    );
    assert_eq!(
        h.apply(&unsubscribe_on("a", ANY_CONNECTION, &["x/1"])),
        CommandResult::Unsubscribed(vec![true])
    );
    assert_eq!(
        h.apply(&unsubscribe_on("a", 10, &["x/2"])),
        CommandResult::Unsubscribed(vec![true])
    );
    assert_eq!(h.apply(&ack_on("a", 10, &[0], &[])), CommandResult::Done);
    assert_eq!(
        h.apply(&ack_on("a", ANY_CONNECTION, &[1], &[])),
        CommandResult::Done
    );
    assert_eq!(h.seqs("a"), vec![2]);
    assert_eq!(
        h.apply(&inbound_on("a", 10, &[5], &[])),
        CommandResult::Done
    );
    assert_eq!(
        h.apply(&inbound_on("a", ANY_CONNECTION, &[6], &[5])),
        CommandResult::Done
    );
    assert_eq!(
        h.session("a")
            .inbound_qos2
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![6]
    );
    // A connection that never owned it does nothing.
    assert_eq!(
        h.apply(&ack_on("a", 99, &[2], &[])),
        CommandResult::NoSession
    );
    assert_eq!(h.seqs("a"), vec![2]);
}

// ---------------------------------------------------------------------------------
// A publish as one command: queue appends, retained message, inbound QoS 2 id
// ---------------------------------------------------------------------------------

fn publish(
    entries: Vec<EnqueueEntry>,
    inbound: Option<(&str, u64, u16)>,
    retained: Option<Arc<Message>>,
) -> Command {
    let mut appends: Appends = entries.into_iter().collect();
    let retained = retained.map(|m| appends.add_message(&m));
    Command::Enqueue {
        appends,
        limits: ROOMY,
        inbound: inbound.map(|(client, connection_id, packet_id)| InboundRecord {
            client_id: Arc::from(client),
            connection_id,
            packet_id,
        }),
        retained,
    }
}

fn inbound_ids(h: &Harness, client: &str) -> Vec<u16> {
    h.session(client).inbound_qos2.iter().copied().collect()
}

#[test]
fn a_qos2_publish_queues_once_while_its_packet_id_is_held() {
    let mut h = subscriber_and_publisher();
    let m = message("t/r", b"first", None, T0);
    let cmd = publish(vec![entry("s", &m)], Some(("p", 10, 7)), Some(m.clone()));
    assert_eq!(
        h.apply(&cmd),
        CommandResult::Enqueued {
            accepted: 1,
            dropped: 0
        }
    );
    assert_eq!(inbound_ids(&h, "p"), vec![7]);
    assert_eq!(h.seqs("s"), vec![0]);
    assert_eq!(
        retained_topics(&h.state),
        BTreeMap::from([("t/r".to_string(), Bytes::from_static(b"first"))])
    );
    // The retained message changes meanwhile; the publisher's resend (DUP) of packet 7
    // queues nothing and does not set its retained message again.
    h.apply(&set_retained(
        "t/r",
        Some(message("t/r", b"later", None, T0)),
    ));
    let digest = h.state.digest();
    assert_eq!(
        h.apply(&cmd),
        CommandResult::Enqueued {
            accepted: 0,
            dropped: 0
        }
    );
    assert_eq!(h.state.digest(), digest);
    assert_eq!(h.seqs("s"), vec![0]);
    assert_eq!(
        retained_topics(&h.state)["t/r"],
        Bytes::from_static(b"later")
    );
    // Another packet id of the same publisher is another publish.
    assert_eq!(
        h.apply(&publish(vec![entry("s", &m)], Some(("p", 10, 8)), None)),
        CommandResult::Enqueued {
            accepted: 1,
            dropped: 0
        }
    );
    assert_eq!(inbound_ids(&h, "p"), vec![7, 8]);
    // PUBREL releases 7: the id may be used again for a new message.
    assert_eq!(
        h.apply(&inbound_on("p", 10, &[], &[7])),
        CommandResult::Done
    );
    assert_eq!(inbound_ids(&h, "p"), vec![8]);
    assert_eq!(
        h.apply(&cmd),
        CommandResult::Enqueued {
            accepted: 1,
            dropped: 0
        }
    );
    assert_eq!(h.seqs("s"), vec![0, 1, 2]);
    assert_eq!(
        retained_topics(&h.state)["t/r"],
        Bytes::from_static(b"first")
    );
}

#[test]
fn a_qos2_publish_of_a_superseded_connection_queues_nothing() {
    let mut h = subscriber_and_publisher();
    h.setup(&[
        inbound_on("p", 10, &[1], &[]),
        open("p", 2, 11, false, 600, None, T0 + 5),
    ]);
    let digest = h.state.digest();
    let m = message("t/r", b"late", None, T0);
    for publisher in [("p", 10, 7), ("p", 10, 1), ("nobody", 10, 7)] {
        assert_eq!(
            h.apply(&publish(
                vec![entry("s", &m)],
                Some(publisher),
                Some(m.clone())
            )),
            CommandResult::NoSession,
            "{publisher:?}"
        );
    }
    assert_eq!(h.state.digest(), digest);
    assert!(h.seqs("s").is_empty());
    assert!(retained_topics(&h.state).is_empty());
    assert_eq!(inbound_ids(&h, "p"), vec![1]);
    assert_eq!(h.events(), vec![]);
    // The new connection's publish with the same id is recorded and queued.
    assert_eq!(
        h.apply(&publish(vec![entry("s", &m)], Some(("p", 11, 7)), None)),
        CommandResult::Enqueued {
            accepted: 1,
            dropped: 0
        }
    );
    assert_eq!(inbound_ids(&h, "p"), vec![1, 7]);
}

#[test]
fn an_enqueue_sets_or_clears_the_retained_message_like_set_retained() {
    let mut h = subscriber_and_publisher();
    let m = message("t/r", b"kept", None, T0);
    // No queue takes it, the retained message is set anyway.
    assert_eq!(
        h.apply(&publish(vec![], None, Some(m.clone()))),
        CommandResult::Enqueued {
            accepted: 0,
            dropped: 0
        }
    );
    let mut reference = Harness::new();
    reference.apply(&set_retained("t/r", Some(m)));
    assert_eq!(retained_topics(&h.state), retained_topics(&reference.state));
    // Without a retained message, the one there stays.
    h.apply(&publish(vec![entry("s", &small(1))], None, None));
    assert_eq!(retained_topics(&h.state).len(), 1);
    // An empty payload clears it, and is queued like any message.
    let empty = message("t/r", b"", None, T0);
    assert_eq!(
        h.apply(&publish(
            vec![entry("s", &empty)],
            None,
            Some(empty.clone())
        )),
        CommandResult::Enqueued {
            accepted: 1,
            dropped: 0
        }
    );
    assert!(retained_topics(&h.state).is_empty());
    assert_eq!(h.seqs("s"), vec![0, 1]);
}

// ---------------------------------------------------------------------------------
// Snapshot formats
// ---------------------------------------------------------------------------------

#[test]
fn a_snapshot_starts_with_the_marker_of_format_3() {
    let mut h = subscriber_and_publisher();
    h.state
        .apply_request(&request(1, 1, &[1], vec![subscribe("p", &["t/#"])]));
    let snapshot = h.state.to_snapshot();
    assert_eq!(&snapshot[..8], &format::marker(3).to_le_bytes());
    assert_eq!(format::SNAPSHOT_FORMAT, 3);
    let empty = BrokerState::new(None).to_snapshot();
    assert_eq!(&empty[..8], &format::marker(3).to_le_bytes());
}

/// `n` persistent sessions `s000`.. subscribed to `fleet/all/#`, offline, and one 1 KB
/// message published to `fleet/all/cmd` with the RETAIN flag, queued for all of them
/// (one `Arc`) and retained.
fn fleet_with_one_queued_message(n: usize) -> (Harness, Arc<Message>) {
    let mut h = Harness::new();
    let clients: Vec<String> = (0..n).map(|i| format!("s{i:03}")).collect();
    for (i, c) in clients.iter().enumerate() {
        h.setup(&[
            open(c, 1, i as u64 + 1, false, 3_600, None, T0),
            subscribe(c, &["fleet/all/#"]),
            close(c, i as u64 + 1, true, None, T0 + 1),
        ]);
    }
    let mut m = (*message("fleet/all/cmd", &[b'x'; 1024], None, T0 + 2)).clone();
    m.retain = true;
    let m = Arc::new(m);
    let entries = clients.iter().map(|c| entry(c, &m)).collect();
    h.apply(&publish(entries, None, Some(m.clone())));
    (h, m)
}

/// Whether every queued message of `state` and its retained message of `topic` are
/// one and the same `Arc`.
fn one_arc_everywhere(state: &BrokerState, topic: &str) -> bool {
    let retained = state.retained().get(topic).expect("retained");
    state
        .sessions()
        .flat_map(|(_, s)| s.queue.iter())
        .all(|q| Arc::ptr_eq(&q.message, retained))
}

#[test]
fn a_snapshot_holds_a_message_queued_for_many_sessions_once_and_restores_it_shared() {
    let (h, m) = fleet_with_one_queued_message(100);
    assert!(one_arc_everywhere(&h.state, "fleet/all/cmd"));
    let snapshot = h.state.to_snapshot();
    // One copy of the message, and per session its record (under 200 bytes here);
    // format 2 wrote 101 copies, over 100 KB.
    assert!(
        snapshot.len() < m.payload.len() + 100 * 200,
        "{} bytes",
        snapshot.len()
    );
    let mut restored = BrokerState::new(None);
    restored.restore(&snapshot).expect("restores");
    assert!(one_arc_everywhere(&restored, "fleet/all/cmd"));
    assert_eq!(restored.digest(), h.state.digest());
    assert_eq!(restored.to_snapshot(), snapshot);
    assert_same_observable(&restored, &h.state);
}

#[test]
fn a_snapshot_naming_a_message_it_does_not_hold_is_refused_and_the_state_kept() {
    let (h, m) = fleet_with_one_queued_message(3);
    let snapshot = h.state.to_snapshot();
    // The marker, then the message table: its length and the one message. Without
    // the message, the queues and the retained topic name message 0 of 0.
    let size = bincode::serialized_size(&*m).expect("size") as usize;
    assert_eq!(&snapshot[8..16], &1u64.to_le_bytes());
    let mut bad = snapshot[..8].to_vec();
    bad.extend_from_slice(&0u64.to_le_bytes());
    bad.extend_from_slice(&snapshot[16 + size..]);
    let (mut state, _) = fleet_with_one_queued_message(3);
    let digest = state.state.digest();
    match state.state.restore(&bad) {
        Err(e @ RestoreError::MessageIndex { index: 0, count: 0 }) => {
            assert!(e.to_string().contains("message 0 of 0"), "{e}")
        }
        other => panic!("restored: {other:?}"),
    }
    assert_eq!(state.state.digest(), digest);
}

#[test]
fn the_digest_is_the_same_whichever_queues_share_a_message() {
    // One node queued one `Arc` for both sessions; another decoded two equal copies
    // (as from entries of format 3, one per command here).
    let (shared, m) = fleet_with_one_queued_message(2);
    let mut copies = Harness::new();
    for (i, c) in ["s000", "s001"].iter().enumerate() {
        copies.setup(&[
            open(c, 1, i as u64 + 1, false, 3_600, None, T0),
            subscribe(c, &["fleet/all/#"]),
            close(c, i as u64 + 1, true, None, T0 + 1),
        ]);
    }
    for c in ["s000", "s001"] {
        let copy = Arc::new((*m).clone());
        copies.apply(&publish(vec![entry(c, &copy)], None, Some(copy.clone())));
    }
    assert!(!one_arc_everywhere(&copies.state, "fleet/all/cmd"));
    assert_eq!(copies.state.digest(), shared.state.digest());
    // Their snapshots differ (two messages in the table, one), and each restores to
    // the digest.
    assert_ne!(copies.state.to_snapshot(), shared.state.to_snapshot());
    for h in [&copies, &shared] {
        let mut restored = BrokerState::new(None);
        restored.restore(&h.state.to_snapshot()).expect("restores");
        assert_eq!(restored.digest(), shared.state.digest());
    }
}

#[test]
fn a_snapshot_of_format_2_is_restored_with_equal_messages_shared() {
    // Format 2, as the previous release wrote it: the marker, then every session with
    // a copy of each queued message in its queue.
    #[derive(Serialize)]
    struct SnapshotFormV2 {
        sessions: Vec<(Arc<str>, Box<SessionRecord>)>,
        retained: Vec<(Arc<str>, Arc<Message>)>,
        proposers: Vec<(NodeId, ProposerRecord)>,
        queue_limits: QueueLimits,
    }
    let (mut h, _) = fleet_with_one_queued_message(20);
    h.state
        .apply_request(&request(2, 7, &[1], vec![subscribe("s000", &["z"])]));
    let mut retained: Vec<(Arc<str>, Arc<Message>)> = h
        .state
        .retained()
        .iter()
        .map(|(t, m)| (Arc::from(t), m.clone()))
        .collect();
    retained.sort_by(|a, b| a.0.cmp(&b.0));
    let old = bincode::serialize(&(
        format::marker(2),
        SnapshotFormV2 {
            sessions: h
                .state
                .sessions()
                .map(|(c, s)| (c.clone(), Box::new(s.clone())))
                .collect(),
            retained,
            proposers: h
                .state
                .proposers()
                .iter()
                .map(|(n, p)| (*n, p.clone()))
                .collect(),
            queue_limits: ROOMY,
        },
    ))
    .expect("encode");
    assert!(old.len() > 21 * 1024, "format 2 holds a copy per queue");
    let mut restored = BrokerState::new(None);
    restored.restore(&old).expect("format 2 is read");
    assert_eq!(restored.digest(), h.state.digest());
    assert_eq!(restored.proposers(), h.state.proposers());
    assert_same_observable(&restored, &h.state);
    assert!(one_arc_everywhere(&restored, "fleet/all/cmd"));
    assert!(restored.to_snapshot().len() < 4 * 1024);
}

/// The state of [`a_snapshot_of_format_1_is_restored`]: sessions with subscriptions,
/// queues, QoS 2 sets and a will, and retained messages.
fn varied_state() -> Harness {
    let mut h = Harness::new();
    h.setup(&[
        open("a", 1, 10, false, 60, Some(will("w/a", 3)), T0),
        subscribe("a", &["t/+", "$share/g/t/a"]),
        open("b", 2, 20, false, 600, None, T0),
        subscribe("b", &["#"]),
        close("a", 10, false, None, T0 + 1),
        enqueue(
            vec![
                entry("a", &small(1)),
                entry("a", &small(2)),
                entry("b", &small(3)),
            ],
            ROOMY,
        ),
        ack("a", &[], &[0]),
        inbound_on("b", 20, &[4, 9], &[]),
        set_retained("t/r", Some(message("t/r", b"r", Some(12), T0))),
        set_retained("s/x", Some(message("s/x", b"x", None, T0))),
    ]);
    h
}

#[test]
fn a_snapshot_of_format_1_is_restored() {
    // Format 1, as releases before format markers wrote it: no marker, no proposers.
    #[derive(Serialize)]
    struct SnapshotFormV1 {
        sessions: Vec<(Arc<str>, Box<SessionRecord>)>,
        retained: Vec<(Arc<str>, Arc<Message>)>,
    }
    let h = varied_state();
    let mut retained: Vec<(Arc<str>, Arc<Message>)> = h
        .state
        .retained()
        .iter()
        .map(|(t, m)| (Arc::from(t), m.clone()))
        .collect();
    retained.sort_by(|a, b| a.0.cmp(&b.0));
    let old = bincode::serialize(&SnapshotFormV1 {
        sessions: h
            .state
            .sessions()
            .map(|(c, s)| (c.clone(), Box::new(s.clone())))
            .collect(),
        retained,
    })
    .expect("encode");
    assert_eq!(
        format::version_of(u64::from_le_bytes(old[..8].try_into().unwrap())),
        None
    );
    let mut restored = BrokerState::new(None);
    restored.apply_request(&request(
        1,
        1,
        &[1],
        vec![open("zzz", 1, 1, false, 60, None, T0)],
    ));
    restored.restore(&old).expect("format 1 is read");
    assert!(restored.proposers().is_empty());
    assert!(restored.session("zzz").is_none());
    // Format 1 knew no queue limits for wills: the defaults stand in for them, so
    // only the digests of states that differ in nothing else are compared.
    assert_same_observable(&restored, &h.state);
    let original: Vec<_> = h.state.sessions().collect();
    let copy: Vec<_> = restored.sessions().collect();
    assert_eq!(original, copy);
}

#[test]
fn a_snapshot_of_a_newer_format_is_refused_and_the_state_kept() {
    let mut h = varied_state();
    h.state
        .apply_request(&request(1, 1, &[1], vec![subscribe("b", &["z"])]));
    let digest = h.state.digest();
    let snapshot = h.state.to_snapshot();
    // A newer release's snapshot: the marker, then a body this one cannot know.
    let mut newer = format::marker(4).to_le_bytes().to_vec();
    newer.extend_from_slice(&snapshot[8..]);
    for (bytes, version) in [
        (newer, 4u16),
        (
            bincode::serialize(&(format::marker(u16::MAX), 0u8)).unwrap(),
            u16::MAX,
        ),
    ] {
        match h.state.restore(&bytes) {
            Err(e @ RestoreError::Format(v)) => {
                assert_eq!(v, version);
                assert!(e.to_string().contains(&format!("format {version}")), "{e}");
            }
            other => panic!("format {version} restored: {other:?}"),
        }
        assert_eq!(h.state.digest(), digest);
        assert_eq!(h.state.to_snapshot(), snapshot);
    }
    // A truncated snapshot of format 3 is refused too, and changes nothing.
    for cut in [0, 4, 8, snapshot.len() / 2, snapshot.len() - 1] {
        assert!(h.state.restore(&snapshot[..cut]).is_err(), "cut at {cut}");
        assert_eq!(h.state.digest(), digest);
    }
}

// ---------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------

/// A queued message as the model sees it.
#[derive(Clone, Debug, PartialEq)]
struct MQueued {
    seq: u64,
    topic: String,
    weight: u64,
    qos: u8,
    expires_at: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
struct MWill {
    topic: String,
    payload: Bytes,
    delay: u32,
}

#[derive(Clone, Debug)]
struct MSession {
    node: NodeId,
    conn: u64,
    protocol: u8,
    expiry: u32,
    connected: bool,
    disconnected_at: Option<u64>,
    will: Option<MWill>,
    will_due: Option<u64>,
    subs: BTreeMap<String, SubscriptionOptions>,
    queue: Vec<MQueued>,
    awaiting: BTreeSet<u64>,
    inbound: BTreeSet<u16>,
    next_seq: u64,
}

/// The events, in a comparable form.
#[derive(Clone, Debug, PartialEq)]
enum MEvent {
    TakenOver(String, NodeId, u64),
    Will(NodeId, String, Bytes),
    QueueGrew(String, NodeId),
    Kick(String, NodeId, u64),
    Opened(String, NodeId, u64, bool),
    Ended(String),
    Restored,
    SharedDelivery(String, NodeId),
}

impl From<Event> for MEvent {
    fn from(e: Event) -> Self {
        match e {
            Event::SessionTakenOver {
                client_id,
                node,
                connection_id,
            } => MEvent::TakenOver(client_id.to_string(), node, connection_id),
            Event::PublishWill { publisher, message } => MEvent::Will(
                publisher,
                message.topic.to_string(),
                message.payload.clone(),
            ),
            Event::QueueGrew { client_id, node } => MEvent::QueueGrew(client_id.to_string(), node),
            Event::Kick {
                client_id,
                node,
                connection_id,
            } => MEvent::Kick(client_id.to_string(), node, connection_id),
            Event::SessionOpened {
                client_id,
                node,
                connection_id,
                created,
            } => MEvent::Opened(client_id.to_string(), node, connection_id, created),
            Event::SessionEnded { client_id } => MEvent::Ended(client_id.to_string()),
            Event::Restored => MEvent::Restored,
            Event::SharedDelivery {
                client_id, node, ..
            } => MEvent::SharedDelivery(client_id.to_string(), node),
        }
    }
}

/// The replicated state as plain maps and vectors, written from the commands'
/// documentation: no indexes, no sparse collections, every limit checked by counting.
#[derive(Default)]
struct Model {
    sessions: BTreeMap<String, MSession>,
    /// Topic → (payload, expiry time).
    retained: BTreeMap<String, (Bytes, Option<u64>)>,
    events: Vec<MEvent>,
    /// The limits of the last Enqueue: a will that becomes due is queued under them.
    limits: QueueLimits,
}

fn expired(expires_at: Option<u64>, now: u64) -> bool {
    expires_at.is_some_and(|at| now >= at)
}

/// Filter matching, level by level (MQTT 4.7), for the model's route table.
fn model_matches(filter: &str, topic: &str) -> bool {
    fn levels(f: &[&str], t: &[&str]) -> bool {
        match (f.first(), t.first()) {
            (Some(&"#"), _) => true,
            (Some(&"+"), Some(_)) => levels(&f[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => levels(&f[1..], &t[1..]),
            (None, None) => true,
            _ => false,
        }
    }
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    levels(&f, &t)
}

impl Model {
    /// A will becomes due: reported, then queued (at QoS 1, as every generated will)
    /// for every persistent session with a matching subscription outside shared
    /// groups, in client id order. (Generated wills are not retained.)
    fn publish_will(&mut self, publisher: NodeId, w: MWill) {
        let weight = (w.topic.len() + w.payload.len()) as u64;
        let entries: Vec<(String, u8)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.expiry > 0)
            .filter_map(|(client, s)| {
                let qos = s
                    .subs
                    .iter()
                    .filter(|(f, _)| !f.starts_with("$share/") && model_matches(f, &w.topic))
                    .map(|(_, o)| o.qos.min(1))
                    .max()?;
                (qos > 0).then(|| (client.clone(), qos))
            })
            .collect();
        let topic = w.topic.clone();
        self.events
            .push(MEvent::Will(publisher, w.topic, w.payload));
        let limits = self.limits;
        let queued: Vec<(String, String, u64, u8, Option<u64>)> = entries
            .into_iter()
            .map(|(client, qos)| (client, topic.clone(), weight, qos, None))
            .collect();
        self.enqueue(&queued, &limits);
    }

    /// `Enqueue` (without `matching`) and `EnqueueMatching`.
    fn publish(
        &mut self,
        appends: &Appends,
        limits: &QueueLimits,
        inbound: Option<&InboundRecord>,
        retained: Option<u32>,
        matching: Option<(u32, &[Arc<str>])>,
    ) -> CommandResult {
        // The publisher's QoS 2 id: only while its connection owns the session, and
        // a publish whose id is still held is a resend.
        if let Some(r) = inbound {
            let Some(s) = self.owned(&r.client_id, r.connection_id) else {
                return CommandResult::NoSession;
            };
            if !s.inbound.insert(r.packet_id) {
                return CommandResult::Enqueued {
                    accepted: 0,
                    dropped: 0,
                };
            }
        }
        if let Some(m) = retained.and_then(|i| appends.message(i)) {
            self.set_retained(&m.topic, Some(m));
        }
        self.limits = *limits;
        let entry = |client: &str, m: &Message, qos: u8| {
            (
                client.to_string(),
                m.topic.to_string(),
                (m.topic.len() + m.payload.len()) as u64,
                qos,
                m.expires_at_ms(),
            )
        };
        let mut queued: Vec<(String, String, u64, u8, Option<u64>)> = appends
            .iter()
            .map(|(e, m)| entry(&e.client_id, m, e.qos))
            .collect();
        if let Some((index, except)) = matching {
            // Every persistent session subscribed outside shared groups, in client id
            // order, at its best matching QoS, but those excepted or named.
            let m = appends
                .message(index)
                .expect("decoded entries name their messages");
            let named: Vec<&str> = appends
                .iter()
                .filter(|(_, n)| Arc::ptr_eq(n, m))
                .map(|(e, _)| &*e.client_id)
                .chain(except.iter().map(|c| &**c))
                .collect();
            for (client, s) in &self.sessions {
                if s.expiry == 0 || named.contains(&client.as_str()) {
                    continue;
                }
                let qos = s
                    .subs
                    .iter()
                    .filter(|(f, _)| !f.starts_with("$share/") && model_matches(f, &m.topic))
                    .map(|(_, o)| o.qos.min(m.qos))
                    .max();
                if let Some(qos @ 1..) = qos {
                    queued.push(entry(client, m, qos));
                }
            }
        }
        let (accepted, dropped) = self.enqueue(&queued, limits);
        CommandResult::Enqueued { accepted, dropped }
    }

    /// Append (client, topic, weight, qos, expiry) entries under `limits`, as
    /// `Enqueue` does; the numbers accepted and dropped.
    fn enqueue(
        &mut self,
        entries: &[(String, String, u64, u8, Option<u64>)],
        limits: &QueueLimits,
    ) -> (u32, u32) {
        let mut accepted = 0;
        let mut dropped = 0;
        let mut grew: Vec<(String, NodeId)> = Vec::new();
        for (client, topic, weight, qos, expires_at) in entries {
            let weight = *weight;
            let Some(s) = self.sessions.get_mut(client) else {
                dropped += 1;
                continue;
            };
            let bytes = |q: &[MQueued]| q.iter().map(|m| m.weight).sum::<u64>();
            let full = |q: &[MQueued]| {
                q.len() as u64 >= limits.max_messages || bytes(q) + weight > limits.max_bytes
            };
            // A message that could not fit even in an empty queue is dropped and
            // evicts nothing.
            if limits.max_messages == 0 || weight > limits.max_bytes {
                dropped += 1;
                continue;
            }
            if full(&s.queue) {
                match limits.policy {
                    QueueFullPolicy::DropNewest => {
                        dropped += 1;
                        continue;
                    }
                    QueueFullPolicy::DropOldest => {
                        while full(&s.queue) {
                            s.queue.remove(0);
                            dropped += 1;
                        }
                    }
                }
            }
            s.queue.push(MQueued {
                seq: s.next_seq,
                topic: topic.clone(),
                weight,
                qos: *qos,
                expires_at: *expires_at,
            });
            s.next_seq += 1;
            accepted += 1;
            if s.connected && !grew.iter().any(|(c, _)| c == client) {
                grew.push((client.clone(), s.node));
            }
        }
        for (c, n) in grew {
            self.events.push(MEvent::QueueGrew(c, n));
        }
        (accepted, dropped)
    }

    /// The session of `client` if connection `conn` owns it (or `conn` is
    /// [`ANY_CONNECTION`]): commands of a superseded connection act on nothing.
    fn owned(&mut self, client: &str, conn: u64) -> Option<&mut MSession> {
        self.sessions
            .get_mut(client)
            .filter(|s| conn == ANY_CONNECTION || s.conn == conn)
    }

    fn set_retained(&mut self, topic: &str, message: Option<&Arc<Message>>) {
        match message {
            Some(m) if !m.payload.is_empty() => {
                self.retained
                    .insert(topic.to_string(), (m.payload.clone(), m.expires_at_ms()));
            }
            _ => {
                self.retained.remove(topic);
            }
        }
    }

    fn end_session(&mut self, client: &str) {
        if self.sessions.remove(client).is_some() {
            self.events.push(MEvent::Ended(client.to_string()));
        }
    }

    fn apply(&mut self, cmd: &Command) -> CommandResult {
        match cmd {
            Command::OpenSession {
                client_id,
                node,
                connection_id,
                protocol,
                clean_start,
                expiry_secs,
                will,
                now_ms: _,
            } => {
                let client = client_id.to_string();
                let mut present = false;
                if let Some(old) = self.sessions.get_mut(&client) {
                    if old.connected {
                        self.events
                            .push(MEvent::TakenOver(client.clone(), old.node, old.conn));
                    }
                    old.will_due = None;
                    // The old will: its connection ended badly only if it was still
                    // connected, and a resumed session cancels a delayed will; a
                    // clean start ends the session, which publishes it.
                    if let Some(w) = old.will.take() {
                        if *clean_start || (old.connected && w.delay == 0) {
                            self.publish_will(*node, w);
                        }
                    }
                    if *clean_start {
                        self.end_session(&client);
                    } else {
                        present = true;
                    }
                }
                let s = self.sessions.entry(client.clone()).or_insert(MSession {
                    node: *node,
                    conn: *connection_id,
                    protocol: *protocol,
                    expiry: *expiry_secs,
                    connected: true,
                    disconnected_at: None,
                    will: None,
                    will_due: None,
                    subs: BTreeMap::new(),
                    queue: Vec::new(),
                    awaiting: BTreeSet::new(),
                    inbound: BTreeSet::new(),
                    next_seq: 0,
                });
                s.node = *node;
                s.conn = *connection_id;
                s.protocol = *protocol;
                s.expiry = *expiry_secs;
                s.connected = true;
                s.disconnected_at = None;
                s.will = will.as_ref().map(|w| MWill {
                    topic: w.message.topic.to_string(),
                    payload: w.message.payload.clone(),
                    delay: w.delay_secs,
                });
                s.will_due = None;
                if present && !s.queue.is_empty() {
                    self.events.push(MEvent::QueueGrew(client.clone(), *node));
                }
                self.events
                    .push(MEvent::Opened(client, *node, *connection_id, !present));
                CommandResult::SessionOpened {
                    session_present: present,
                }
            }
            Command::CloseSession {
                client_id,
                connection_id,
                graceful,
                expiry_secs,
                now_ms,
            } => self.close(
                client_id,
                *connection_id,
                *graceful,
                *expiry_secs,
                *now_ms,
                None,
            ),
            Command::Subscribe {
                client_id,
                connection_id,
                entries,
            } => {
                let Some(s) = self.owned(client_id, *connection_id) else {
                    return CommandResult::NoSession;
                };
                CommandResult::Subscribed(
                    entries
                        .iter()
                        .map(|(f, o)| s.subs.insert(f.clone(), o.clone()).is_some())
                        .collect(),
                )
            }
            Command::Unsubscribe {
                client_id,
                connection_id,
                filters,
            } => {
                let Some(s) = self.owned(client_id, *connection_id) else {
                    return CommandResult::NoSession;
                };
                CommandResult::Unsubscribed(
                    filters.iter().map(|f| s.subs.remove(f).is_some()).collect(),
                )
            }
            Command::SetRetained { topic, message } => {
                self.set_retained(topic, message.as_ref());
                CommandResult::Done
            }
            Command::Enqueue {
                appends,
                limits,
                inbound,
                retained,
            } => self.publish(appends, limits, inbound.as_ref(), *retained, None),
            Command::EnqueueMatching {
                appends,
                limits,
                inbound,
                retained,
                matching,
                except,
            } => self.publish(
                appends,
                limits,
                inbound.as_ref(),
                *retained,
                Some((*matching, except)),
            ),
            Command::Ack {
                client_id,
                connection_id,
                completed,
                received,
            } => {
                let Some(s) = self.owned(client_id, *connection_id) else {
                    return CommandResult::NoSession;
                };
                for seq in received {
                    if let Some(i) = s.queue.iter().position(|m| m.seq == *seq) {
                        s.queue.remove(i);
                        s.awaiting.insert(*seq);
                    }
                }
                for seq in completed {
                    if !s.awaiting.remove(seq) {
                        s.queue.retain(|m| m.seq != *seq);
                    }
                }
                CommandResult::Done
            }
            Command::InboundQos2 {
                client_id,
                connection_id,
                received,
                released,
            } => {
                let Some(s) = self.owned(client_id, *connection_id) else {
                    return CommandResult::NoSession;
                };
                s.inbound.extend(received.iter().copied());
                for id in released {
                    s.inbound.remove(id);
                }
                CommandResult::Done
            }
            Command::Expire { node, now_ms } => {
                let now = *now_ms;
                let mut ended = Vec::new();
                let mut wills = Vec::new();
                for (client, s) in self.sessions.iter_mut() {
                    if !s.connected {
                        if s.will_due.is_some_and(|due| due <= now) {
                            wills.extend(s.will.take());
                            s.will_due = None;
                        }
                        let gone_at = s.disconnected_at.map(|at| at + u64::from(s.expiry) * 1000);
                        if s.expiry != u32::MAX && gone_at.is_some_and(|at| at <= now) {
                            wills.extend(s.will.take());
                            ended.push(client.clone());
                            continue;
                        }
                    }
                    s.queue.retain(|m| !expired(m.expires_at, now));
                }
                for client in ended {
                    self.end_session(&client);
                }
                for w in wills {
                    self.publish_will(*node, w);
                }
                self.retained.retain(|_, (_, at)| !expired(*at, now));
                CommandResult::Done
            }
            Command::Barrier => CommandResult::Done,
            // The model's workload makes no shared subscriptions: nothing to move.
            Command::Redistribute { .. } => CommandResult::Done,
            Command::Kick { client_id } => match self.sessions.get(&**client_id) {
                Some(s) if s.connected => {
                    self.events
                        .push(MEvent::Kick(client_id.to_string(), s.node, s.conn));
                    CommandResult::Done
                }
                _ => CommandResult::NoSession,
            },
            Command::NodeLost {
                node,
                publisher,
                now_ms,
            } => {
                let lost: Vec<(String, u64)> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.connected && s.node == *node)
                    .map(|(c, s)| (c.clone(), s.conn))
                    .collect();
                for (client, conn) in lost {
                    self.events.push(MEvent::Kick(client.clone(), *node, conn));
                    self.close(&client, conn, false, None, *now_ms, Some(*publisher));
                }
                CommandResult::Done
            }
        }
    }

    fn close(
        &mut self,
        client: &str,
        conn: u64,
        graceful: bool,
        expiry: Option<u32>,
        now: u64,
        publisher: Option<NodeId>,
    ) -> CommandResult {
        let Some(s) = self.sessions.get_mut(client) else {
            return CommandResult::NoSession;
        };
        if !s.connected || s.conn != conn {
            return CommandResult::NoSession;
        }
        s.connected = false;
        s.disconnected_at = Some(now);
        if let Some(e) = expiry {
            s.expiry = e;
        }
        let publisher = publisher.unwrap_or(s.node);
        let mut publish = None;
        if graceful {
            s.will = None;
        } else if let Some(w) = s.will.take() {
            // Without a delay, or with a session that ends now, the will goes at once.
            if w.delay == 0 || s.expiry == 0 {
                publish = Some(w);
            } else {
                s.will_due = Some(now + u64::from(w.delay) * 1000);
                s.will = Some(w);
            }
        }
        let ends = s.expiry == 0;
        if let Some(w) = publish {
            self.publish_will(publisher, w);
        }
        if ends {
            self.end_session(client);
        }
        CommandResult::Done
    }
}

/// A session record in a form both the state and the model can produce.
#[derive(Debug, PartialEq)]
struct SessionView {
    node: NodeId,
    conn: u64,
    protocol: u8,
    expiry: u32,
    connected: bool,
    disconnected_at: Option<u64>,
    will: Option<MWill>,
    will_due: Option<u64>,
    subs: BTreeMap<String, SubscriptionOptions>,
    /// (seq, topic, delivery QoS).
    queue: Vec<(u64, String, u8)>,
    queued_bytes: u64,
    awaiting: BTreeSet<u64>,
    inbound: BTreeSet<u16>,
    next_seq: u64,
}

impl From<&SessionRecord> for SessionView {
    fn from(s: &SessionRecord) -> Self {
        SessionView {
            node: s.node,
            conn: s.connection_id,
            protocol: s.protocol,
            expiry: s.expiry_secs,
            connected: s.connected,
            disconnected_at: s.disconnected_at_ms,
            will: s.will.as_ref().map(|w| MWill {
                topic: w.message.topic.to_string(),
                payload: w.message.payload.clone(),
                delay: w.delay_secs,
            }),
            will_due: s.will_due_at_ms,
            subs: s
                .subscriptions
                .iter()
                .map(|(f, o)| (f.clone(), o.clone()))
                .collect(),
            queue: s
                .queue
                .iter()
                .map(|m| (m.seq, m.message.topic.to_string(), m.qos))
                .collect(),
            queued_bytes: s.queued_bytes,
            awaiting: s.awaiting_pubcomp.iter().copied().collect(),
            inbound: s.inbound_qos2.iter().copied().collect(),
            next_seq: s.next_seq,
        }
    }
}

impl From<&MSession> for SessionView {
    fn from(s: &MSession) -> Self {
        SessionView {
            node: s.node,
            conn: s.conn,
            protocol: s.protocol,
            expiry: s.expiry,
            connected: s.connected,
            disconnected_at: s.disconnected_at,
            will: s.will.clone(),
            will_due: s.will_due,
            subs: s.subs.clone(),
            queue: s
                .queue
                .iter()
                .map(|m| (m.seq, m.topic.clone(), m.qos))
                .collect(),
            queued_bytes: s.queue.iter().map(|m| m.weight).sum(),
            awaiting: s.awaiting.clone(),
            inbound: s.inbound.clone(),
            next_seq: s.next_seq,
        }
    }
}

// ---------------------------------------------------------------------------------
// Random command logs over a small universe
// ---------------------------------------------------------------------------------

const CLIENTS: [&str; 3] = ["a", "b", "c"];
const TOPICS: [&str; 4] = ["t/a", "t/b", "s/x", "$sys/x"];
const FILTERS: [&str; 5] = ["t/a", "t/+", "#", "$share/g/t/+", "+/x"];
/// Topics the route tables are compared on (the publish topics and a few others).
const PROBES: [&str; 7] = ["t/a", "t/b", "s/x", "$sys/x", "t", "t/a/b", "q/x"];

/// The connection a connection's command names, relative to the client's latest
/// `OpenSession` in the log ([`build_log`] resolves it).
#[derive(Clone, Copy, Debug)]
enum Conn {
    /// The connection of the client's latest open (connections 1 and 2 only).
    Latest,
    /// The other one: superseded, or never opened.
    Stale,
    /// [`ANY_CONNECTION`], as in entries of format 1.
    Any,
}

fn conn() -> impl Strategy<Value = Conn> {
    prop_oneof![6 => Just(Conn::Latest), 2 => Just(Conn::Stale), 2 => Just(Conn::Any)]
}

/// A command with its time left out: [`build_log`] gives times in increasing order.
#[derive(Clone, Debug)]
enum Op {
    Open {
        client: usize,
        node: NodeId,
        conn: u64,
        protocol: u8,
        clean: bool,
        expiry: u32,
        will_delay: Option<u32>,
    },
    Close {
        client: usize,
        conn: u64,
        graceful: bool,
        expiry: Option<u32>,
    },
    Subscribe {
        client: usize,
        conn: Conn,
        filters: Vec<(usize, u8)>,
    },
    Unsubscribe {
        client: usize,
        conn: Conn,
        filters: Vec<usize>,
    },
    Retain {
        topic: usize,
        payload_len: usize,
        expiry: Option<u32>,
    },
    Enqueue {
        /// (client, topic, payload length, QoS, message expiry).
        entries: Vec<(usize, usize, usize, u8, Option<u32>)>,
        max_messages: u64,
        max_bytes: u64,
        drop_oldest: bool,
        /// The publisher's QoS 2 id: (client, its connection, packet id).
        inbound: Option<(usize, Conn, u16)>,
        /// The publish's retained message: (topic, payload length; 0 clears).
        retained: Option<(usize, usize)>,
        /// `EnqueueMatching`: (topic, QoS, clients excepted, clients the appends also
        /// name for its message).
        matching: Option<(usize, u8, Vec<usize>, Vec<usize>)>,
    },
    Ack {
        client: usize,
        conn: Conn,
        completed: Vec<u64>,
        received: Vec<u64>,
    },
    Inbound {
        client: usize,
        conn: Conn,
        received: Vec<u16>,
        released: Vec<u16>,
    },
    Expire {
        node: NodeId,
    },
    Kick {
        client: usize,
    },
    NodeLost {
        node: NodeId,
        publisher: NodeId,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let client = || 0..CLIENTS.len();
    let expiry = || prop::sample::select(vec![0u32, 2, 30, u32::MAX]);
    let msg_expiry = || prop::option::of(prop::sample::select(vec![0u32, 1, 3]));
    prop_oneof![
        7 => (
            client(),
            1u64..=2,
            1u64..=2,
            4u8..=5,
            prop::bool::weighted(0.3),
            expiry(),
            prop::option::of(prop::sample::select(vec![0u32, 1, 3])),
        )
            .prop_map(|(client, node, conn, protocol, clean, expiry, will_delay)| Op::Open {
                client,
                node,
                conn,
                protocol,
                clean,
                expiry,
                will_delay,
            }),
        4 => (client(), 1u64..=2, any::<bool>(), prop::option::of(expiry()))
            .prop_map(|(client, conn, graceful, expiry)| Op::Close {
                client,
                conn,
                graceful,
                expiry,
            }),
        3 => (client(), conn(), prop::collection::vec((0..FILTERS.len(), 0u8..=2), 1..3))
            .prop_map(|(client, conn, filters)| Op::Subscribe { client, conn, filters }),
        2 => (client(), conn(), prop::collection::vec(0..FILTERS.len(), 1..3))
            .prop_map(|(client, conn, filters)| Op::Unsubscribe { client, conn, filters }),
        2 => (0..TOPICS.len(), 0usize..3, msg_expiry())
            .prop_map(|(topic, payload_len, expiry)| Op::Retain {
                topic,
                payload_len,
                expiry,
            }),
        5 => (
            prop::collection::vec(
                (client(), 0..TOPICS.len(), 0usize..8, 1u8..=2, msg_expiry()),
                1..5,
            ),
            // mqtt.max_queued_messages is at least 1 (config.rs).
            1u64..=4,
            prop::sample::select(vec![0u64, 6, 12, 20, 1_000]),
            any::<bool>(),
            prop::option::weighted(0.4, (client(), conn(), 1u16..4)),
            prop::option::weighted(0.3, (0..TOPICS.len(), 0usize..3)),
            prop::option::weighted(
                0.5,
                (
                    0..TOPICS.len(),
                    1u8..=2,
                    prop::collection::vec(client(), 0..3),
                    prop::collection::vec(client(), 0..3),
                )
            ),
        )
            .prop_map(
                |(entries, max_messages, max_bytes, drop_oldest, inbound, retained, matching)| {
                    Op::Enqueue {
                        entries,
                        max_messages,
                        max_bytes,
                        drop_oldest,
                        inbound,
                        retained,
                        matching,
                    }
                }
            ),
        3 => (
            client(),
            conn(),
            prop::collection::vec(0u64..6, 0..3),
            prop::collection::vec(0u64..6, 0..3),
        )
            .prop_map(|(client, conn, completed, received)| Op::Ack {
                client,
                conn,
                completed,
                received,
            }),
        1 => (
            client(),
            conn(),
            prop::collection::vec(1u16..4, 0..3),
            prop::collection::vec(1u16..4, 0..3),
        )
            .prop_map(|(client, conn, received, released)| Op::Inbound {
                client,
                conn,
                received,
                released,
            }),
        3 => (1u64..=2).prop_map(|node| Op::Expire { node }),
        1 => client().prop_map(|client| Op::Kick { client }),
        1 => (1u64..=2, 1u64..=2).prop_map(|(node, publisher)| Op::NodeLost { node, publisher }),
    ]
}

/// Up to 40 steps, each some milliseconds after the previous one (0 included: several
/// commands may share a time).
fn steps() -> impl Strategy<Value = Vec<(u64, Op)>> {
    prop::collection::vec(
        (prop::sample::select(vec![0u64, 300, 1_000, 2_500]), op()),
        1..=40,
    )
}

fn build_log(steps: &[(u64, Op)]) -> Vec<Command> {
    let mut now = T0;
    let mut log = Vec::with_capacity(steps.len());
    // Each client's latest connection (1 before any open).
    let mut latest = [1u64; CLIENTS.len()];
    for (delta, op) in steps {
        now += delta;
        let client_id = |i: &usize| -> Arc<str> { Arc::from(CLIENTS[*i]) };
        let connection = |client: &usize, conn: &Conn| match conn {
            Conn::Latest => latest[*client],
            Conn::Stale => 3 - latest[*client],
            Conn::Any => ANY_CONNECTION,
        };
        let cmd = match op {
            Op::Open {
                client,
                node,
                conn,
                protocol,
                clean,
                expiry,
                will_delay,
            } => Command::OpenSession {
                client_id: client_id(client),
                node: *node,
                connection_id: *conn,
                protocol: *protocol,
                clean_start: *clean,
                expiry_secs: *expiry,
                will: will_delay.map(|delay_secs| Will {
                    message: (*message(
                        &format!("w/{}", CLIENTS[*client]),
                        format!("{}{}@{}", CLIENTS[*client], conn, now).as_bytes(),
                        None,
                        now,
                    ))
                    .clone(),
                    delay_secs,
                }),
                now_ms: now,
            },
            Op::Close {
                client,
                conn,
                graceful,
                expiry,
            } => close(CLIENTS[*client], *conn, *graceful, *expiry, now),
            Op::Subscribe {
                client,
                conn,
                filters,
            } => Command::Subscribe {
                client_id: client_id(client),
                connection_id: connection(client, conn),
                entries: filters
                    .iter()
                    .map(|(f, qos)| (FILTERS[*f].to_string(), options(*qos)))
                    .collect(),
            },
            Op::Unsubscribe {
                client,
                conn,
                filters,
            } => Command::Unsubscribe {
                client_id: client_id(client),
                connection_id: connection(client, conn),
                filters: filters.iter().map(|f| FILTERS[*f].to_string()).collect(),
            },
            Op::Retain {
                topic,
                payload_len,
                expiry,
            } => set_retained(
                TOPICS[*topic],
                Some(message(
                    TOPICS[*topic],
                    &vec![b'r'; *payload_len],
                    *expiry,
                    now,
                )),
            ),
            Op::Enqueue {
                entries,
                max_messages,
                max_bytes,
                drop_oldest,
                inbound,
                retained,
                matching,
            } => {
                // Entries of one topic, size and expiry share one message, as a
                // publish's queues do.
                let mut made = std::collections::HashMap::new();
                let mut appends = Appends::default();
                for (c, t, len, qos, expiry) in entries {
                    let shared = made
                        .entry((*t, *len, *expiry))
                        .or_insert_with(|| message(TOPICS[*t], &vec![b'm'; *len], *expiry, now))
                        .clone();
                    appends.push(EnqueueEntry {
                        client_id: client_id(c),
                        message: shared,
                        qos: *qos,
                        retain: false,
                        subscription_ids: Vec::new(),
                    });
                }
                let retained = retained.map(|(t, len)| {
                    let mut m = (*message(TOPICS[t], &vec![b'p'; len], None, now)).clone();
                    m.retain = true;
                    appends.add_message(&Arc::new(m))
                });
                let limits = QueueLimits {
                    max_messages: *max_messages,
                    max_bytes: *max_bytes,
                    policy: if *drop_oldest {
                        QueueFullPolicy::DropOldest
                    } else {
                        QueueFullPolicy::DropNewest
                    },
                };
                let inbound = inbound.map(|(c, conn, packet_id)| InboundRecord {
                    client_id: client_id(&c),
                    connection_id: connection(&c, &conn),
                    packet_id,
                });
                match matching {
                    None => Command::Enqueue {
                        appends,
                        limits,
                        inbound,
                        retained,
                    },
                    Some((t, qos, except, named)) => {
                        let mut m = (*message(TOPICS[*t], b"fan", None, now)).clone();
                        m.qos = *qos;
                        let m = Arc::new(m);
                        for c in named {
                            appends.push(EnqueueEntry {
                                client_id: client_id(c),
                                message: m.clone(),
                                qos: *qos,
                                retain: false,
                                subscription_ids: Vec::new(),
                            });
                        }
                        Command::EnqueueMatching {
                            matching: appends.add_message(&m),
                            appends,
                            limits,
                            inbound,
                            retained,
                            except: except.iter().map(client_id).collect(),
                        }
                    }
                }
            }
            Op::Ack {
                client,
                conn,
                completed,
                received,
            } => Command::Ack {
                client_id: client_id(client),
                connection_id: connection(client, conn),
                completed: completed.clone(),
                received: received.clone(),
            },
            Op::Inbound {
                client,
                conn,
                received,
                released,
            } => Command::InboundQos2 {
                client_id: client_id(client),
                connection_id: connection(client, conn),
                received: received.clone(),
                released: released.clone(),
            },
            Op::Expire { node } => expire(*node, now),
            Op::Kick { client } => Command::Kick {
                client_id: client_id(client),
            },
            Op::NodeLost { node, publisher } => Command::NodeLost {
                node: *node,
                publisher: *publisher,
                now_ms: now,
            },
        };
        if let Op::Open { client, conn, .. } = op {
            latest[*client] = *conn;
        }
        log.push(cmd);
    }
    log
}

/// The time of the last timed command in `log` (or the start).
fn last_time(log: &[Command]) -> u64 {
    log.iter()
        .rev()
        .find_map(|c| match c {
            Command::OpenSession { now_ms, .. }
            | Command::CloseSession { now_ms, .. }
            | Command::Expire { now_ms, .. }
            | Command::NodeLost { now_ms, .. } => Some(*now_ms),
            _ => None,
        })
        .unwrap_or(T0)
}

/// Compare everything observable of `state` with `model`.
fn assert_agrees(state: &BrokerState, model: &Model, context: &str) {
    let ids: Vec<String> = state.sessions().map(|(c, _)| c.to_string()).collect();
    let model_ids: Vec<String> = model.sessions.keys().cloned().collect();
    assert_eq!(ids, model_ids, "session ids {context}");
    for client in CLIENTS {
        let real = state.session(client).map(SessionView::from);
        let expected = model.sessions.get(client).map(SessionView::from);
        assert_eq!(real, expected, "session {client} {context}");
    }
    for (client, s) in state.sessions() {
        // Emptied collections give their allocation back (cluster::sparse).
        let tidy = (s.subscriptions.is_empty() == (s.subscriptions == Default::default()))
            && (s.queue.is_empty() == (s.queue == Default::default()))
            && (s.awaiting_pubcomp.is_empty() == (s.awaiting_pubcomp == Default::default()))
            && (s.inbound_qos2.is_empty() == (s.inbound_qos2 == Default::default()));
        assert!(
            tidy,
            "session {client} holds an empty allocated collection {context}"
        );
    }
    let retained: BTreeMap<String, Bytes> = model
        .retained
        .iter()
        .map(|(t, (p, _))| (t.clone(), p.clone()))
        .collect();
    assert_eq!(retained_topics(state), retained, "retained {context}");
    assert_eq!(
        state.retained().len(),
        retained.len(),
        "retained count {context}"
    );
    let subscriptions: usize = model.sessions.values().map(|s| s.subs.len()).sum();
    assert_eq!(state.routes().len(), subscriptions, "route count {context}");
    for topic in PROBES {
        let mut normal = BTreeSet::new();
        let mut shared = BTreeSet::new();
        for (client, s) in &model.sessions {
            for filter in s.subs.keys() {
                match filter
                    .strip_prefix("$share/")
                    .and_then(|rest| rest.split_once('/'))
                {
                    Some((_, inner)) => {
                        if model_matches(inner, topic) {
                            shared.insert((filter.clone(), client.clone()));
                        }
                    }
                    None => {
                        if model_matches(filter, topic) {
                            normal.insert((filter.clone(), client.clone()));
                        }
                    }
                }
            }
        }
        assert_eq!(
            normal_matches(state, topic),
            normal,
            "routes for {topic} {context}"
        );
        assert_eq!(
            shared_matches(state, topic),
            shared,
            "groups for {topic} {context}"
        );
    }
}

/// Both states' observable contents are the same (sessions, retained, routes).
/// Sessions are compared by content: whether an empty collection is still allocated
/// is not observable.
fn assert_same_observable(a: &BrokerState, b: &BrokerState) {
    let view = |s: &BrokerState| -> Vec<(String, SessionView)> {
        s.sessions()
            .map(|(c, r)| (c.to_string(), SessionView::from(r)))
            .collect()
    };
    assert_eq!(view(a), view(b));
    let messages = |s: &BrokerState| -> Vec<(String, Vec<QueuedMessage>)> {
        s.sessions()
            .map(|(c, r)| (c.to_string(), r.queue.iter().cloned().collect()))
            .collect()
    };
    assert_eq!(messages(a), messages(b));
    assert_eq!(retained_topics(a), retained_topics(b));
    assert_eq!(a.routes().len(), b.routes().len());
    for topic in PROBES {
        assert_eq!(
            normal_matches(a, topic),
            normal_matches(b, topic),
            "{topic}"
        );
        assert_eq!(
            shared_matches(a, topic),
            shared_matches(b, topic),
            "{topic}"
        );
    }
}

/// How [`batches`] cuts a log into Raft entries.
#[derive(Clone, Copy, Debug)]
enum Batch {
    /// Up to `len` commands in an entry without origin (format 1).
    NoOrigin { len: usize },
    /// Up to `len` commands from `node`'s proposer; `restart`: in a new incarnation.
    Proposed {
        node: NodeId,
        len: usize,
        restart: bool,
    },
    /// `node`'s last entry again (its answer was lost), when it has one.
    Resend { node: NodeId },
}

fn batch() -> impl Strategy<Value = Batch> {
    prop_oneof![
        3 => (1usize..=3).prop_map(|len| Batch::NoOrigin { len }),
        6 => (1u64..=2, 1usize..=3).prop_map(|(node, len)| Batch::Proposed {
            node,
            len,
            restart: false
        }),
        1 => (1u64..=2, 1usize..=3).prop_map(|(node, len)| Batch::Proposed {
            node,
            len,
            restart: true
        }),
        2 => (1u64..=2).prop_map(|node| Batch::Resend { node }),
    ]
}

/// The log as Raft entries cut by `plan` (commands left over go one per entry without
/// origin), with each proposer's resends. Sequence numbers count from 1 in each
/// incarnation, as the proposer gives them.
fn batches(log: &[Command], plan: &[Batch]) -> Vec<Request> {
    let mut out = Vec::new();
    let mut rest = log;
    // Per node: (incarnation, last seq given, last request).
    let mut proposers: BTreeMap<NodeId, (u64, u64, Option<Request>)> = BTreeMap::new();
    for b in plan {
        if rest.is_empty() {
            break;
        }
        match *b {
            Batch::NoOrigin { len } => {
                let (now, later) = rest.split_at(len.min(rest.len()));
                out.push(no_origin(now.to_vec()));
                rest = later;
            }
            Batch::Proposed { node, len, restart } => {
                let p = proposers.entry(node).or_insert((1, 0, None));
                if restart {
                    *p = (p.0 + 1, 0, None);
                }
                let (now, later) = rest.split_at(len.min(rest.len()));
                let seqs: Vec<u64> = (p.1 + 1..=p.1 + now.len() as u64).collect();
                p.1 += now.len() as u64;
                let r = request(node, p.0, &seqs, now.to_vec());
                p.2 = Some(r.clone());
                out.push(r);
                rest = later;
            }
            Batch::Resend { node } => {
                if let Some((_, _, Some(r))) = proposers.get(&node) {
                    out.push(r.clone());
                }
            }
        }
    }
    out.extend(rest.iter().map(|c| no_origin(vec![c.clone()])));
    out
}

fn apply_all(state: &mut BrokerState, log: &[Command]) {
    for cmd in log {
        state.apply_command(cmd);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn the_state_machine_agrees_with_a_reference_model(
        steps in steps(),
        plan in prop::collection::vec(batch(), 0..40),
    ) {
        let log = build_log(&steps);
        let mut h = Harness::new();
        let mut model = Model::default();
        // The model of exactly-once apply: per node, its last entry and the results it
        // got; a resend of it changes nothing and gets those results again.
        let mut last: BTreeMap<NodeId, (Request, Vec<CommandResult>)> = BTreeMap::new();
        for (i, request) in batches(&log, &plan).iter().enumerate() {
            let context = format!("after entry {i}: {request:?}");
            let results = h.state.apply_request(request);
            let resend = request
                .origin
                .and_then(|o| last.get(&o.node))
                .filter(|(r, _)| r == request);
            let expected = match resend {
                Some((_, first)) => first.clone(),
                None => request.commands.iter().map(|c| model.apply(c)).collect(),
            };
            prop_assert_eq!(&results, &expected, "results {}", context);
            if let Some(o) = request.origin {
                last.insert(o.node, (request.clone(), expected));
            }
            let events: Vec<MEvent> = h.events().into_iter().map(MEvent::from).collect();
            let expected_events = std::mem::take(&mut model.events);
            prop_assert_eq!(events, expected_events, "events {}", context);
            assert_agrees(&h.state, &model, &context);
            let summed: u64 = h.state.sessions().map(|(_, s)| s.queued_bytes).sum();
            prop_assert_eq!(h.state.queued_bytes_total(), summed, "queued total {}", context);
        }
        let applied: BTreeMap<NodeId, (u64, u64)> = last
            .iter()
            .map(|(n, (r, _))| {
                (*n, (r.origin.map_or(0, |o| o.incarnation), r.seqs.iter().copied().max().unwrap_or(0)))
            })
            .collect();
        let real: BTreeMap<NodeId, (u64, u64)> = h
            .state
            .proposers()
            .iter()
            .map(|(n, p)| (*n, (p.incarnation, p.applied)))
            .collect();
        prop_assert_eq!(real, applied, "proposers table");
    }

    #[test]
    fn snapshot_then_restore_preserves_digest_and_observable_state(steps in steps()) {
        let log = build_log(&steps);
        let mut state = BrokerState::new(None);
        apply_all(&mut state, &log);
        let mut restored = BrokerState::new(None);
        prop_assert!(restored.restore(&state.to_snapshot()).is_ok());
        prop_assert_eq!(restored.digest(), state.digest());
        assert_same_observable(&state, &restored);
        prop_assert_eq!(restored.queued_bytes_total(), state.queued_bytes_total());
        // And the copy goes on exactly like the original.
        let more = expire(1, last_time(&log) + 10_000);
        state.apply_command(&more);
        restored.apply_command(&more);
        prop_assert_eq!(restored.digest(), state.digest());
    }

    #[test]
    fn a_digest_taken_in_steps_is_the_digest(steps in steps(), budget in 1usize..5) {
        // The status endpoint takes the digest a few records at a time, releasing the
        // state's lock in between (issue: a status request stalls the node).
        let log = build_log(&steps);
        let mut state = BrokerState::new(None);
        apply_all(&mut state, &log);
        let mut walk = DigestWalk::default();
        let mut steps_taken = 0;
        let digest = loop {
            steps_taken += 1;
            if let Some(d) = state.digest_step(&mut walk, budget) {
                break d;
            }
        };
        prop_assert_eq!(digest, state.digest());
        // No step hashed more than `budget` sessions, nor more than `budget` retained
        // messages.
        let most = state.sessions().count().max(state.retained().iter().count());
        prop_assert!(steps_taken >= most.div_ceil(budget), "{} steps for {} records", steps_taken, most);
    }

    #[test]
    fn the_same_log_gives_the_same_digest(steps in steps()) {
        let log = build_log(&steps);
        let mut a = BrokerState::new(None);
        let mut b = Harness::new();
        apply_all(&mut a, &log);
        for cmd in &log {
            b.apply(cmd);
        }
        prop_assert_eq!(a.digest(), b.state.digest());
        assert_same_observable(&a, &b.state);
    }

    #[test]
    fn restoring_a_snapshot_mid_log_then_applying_the_rest_of_the_entries_gives_the_same_digest(
        steps in steps(),
        plan in prop::collection::vec(batch(), 0..40),
        cut in any::<prop::sample::Index>(),
    ) {
        // As Raft entries with resends, so that the proposers' table goes through the
        // snapshot too (a resend after the cut must still be recognised).
        let entries = batches(&build_log(&steps), &plan);
        let k = cut.index(entries.len() + 1);
        let apply = |state: &mut BrokerState, entries: &[Request]| {
            for r in entries {
                state.apply_request(r);
            }
        };
        let mut whole = BrokerState::new(None);
        apply(&mut whole, &entries);
        let mut prefix = BrokerState::new(None);
        apply(&mut prefix, &entries[..k]);
        let mut resumed = BrokerState::new(None);
        prop_assert!(resumed.restore(&prefix.to_snapshot()).is_ok());
        apply(&mut resumed, &entries[k..]);
        prop_assert_eq!(resumed.digest(), whole.digest(), "cut at {}", k);
        prop_assert_eq!(resumed.proposers(), whole.proposers(), "cut at {}", k);
        assert_same_observable(&whole, &resumed);
    }

    #[test]
    fn expiry_due_says_whether_an_expire_would_change_the_digest(steps in steps()) {
        let log = build_log(&steps);
        let mut state = BrokerState::new(None);
        for (i, cmd) in log.iter().enumerate() {
            state.apply_command(cmd);
            let now = last_time(&log[..=i]);
            for later in [0, 999, 1_000, 3_000, 6_000] {
                prop_assert_eq!(
                    state.expiry_due(now + later),
                    expire_changes_digest(&state, now + later),
                    "at +{} ms after step {}: {:?}", later, i, cmd
                );
            }
        }
    }
}
