//! Publish dispatch on the receiving node: match a message against the applied route
//! table, pick one member per shared group, deliver to local connections and collect
//! the appends for persistent sessions' replicated queues.
//!
//! Matching runs under the state's read lock in one synchronous section; deliveries
//! happen after it is released. The payload is never copied: every delivery holds the
//! same `Arc<Message>`.

use std::collections::HashMap;
use std::sync::Arc;

use super::{lock, Broker, ConnHandle, ConnMsg, Delivery, Stats};
use crate::cluster::command::NodeId;
use crate::cluster::command::{
    Appends, Command, CommandResult, EnqueueEntry, InboundRecord, Message, QueueFullPolicy,
    QueueLimits, SubscriptionOptions,
};
use crate::cluster::forward::{ForwardSink, ForwardTarget, Forwarded};
use crate::cluster::frame::{FrameError, FrameReader};
use crate::cluster::proposer::ProposeError;
use crate::config::QueueFullPolicyConfig;
use crate::router::SelectContext;
use futures::future::BoxFuture;
use std::collections::HashSet;

/// Which of a message's subscribers this node serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// All of them: local clients directly, the others through their nodes and the
    /// replicated queues.
    All,
    /// A committed will: only this node's connected clients, outside shared groups
    /// and replicated queues (the state machine queued it, set it retained and chose
    /// the shared groups' members as it applied the command that made it due).
    Local,
}

/// The members of one shared group with their options.
type Members = Vec<(Arc<str>, SubscriptionOptions)>;

/// One client a message goes to, with everything its matching subscriptions decided.
#[derive(Debug)]
struct Target {
    /// Set when the client gets the message only as a shared-group member.
    shared_group: Option<Arc<str>>,
    qos: u8,
    retain: bool,
    subscription_ids: Vec<u32>,
}

/// What dispatching one message did.
#[derive(Debug, Default)]
pub struct DispatchOutcome {
    /// Subscriptions that matched (a v5 PUBACK says 0x10 when there were none).
    pub matched: usize,
    /// Clients it went to directly (here or through their nodes), not through a
    /// replicated queue.
    pub delivered: usize,
    /// Messages for persistent sessions that must be committed before the publisher is
    /// acknowledged (the message once, however many queues it goes to).
    pub enqueue: Appends,
    /// Local deliveries whose client's channel was full: the publisher waits for room
    /// (up to [`SLOW_CLIENT_WAIT`]) instead of the message being dropped at once.
    pub blocked: Vec<Blocked>,
    /// The message once per peer node with clients connected there that get it
    /// directly (not through a replicated queue).
    pub forward: Vec<(NodeId, Forwarded)>,
    /// The persistent subscribers whose queues the state machine finds as it applies
    /// the publish's command, when there are any ([`Command::EnqueueMatching`]).
    pub fan_out: Option<FanOut>,
}

impl DispatchOutcome {
    /// Queue appends this node's view planned: named in `enqueue` or left to the
    /// state machine.
    pub fn queued(&self) -> usize {
        self.enqueue.len() + self.fan_out.as_ref().map_or(0, |f| f.planned)
    }
}

/// The queue appends of a dispatched message that are not named one by one: its
/// command says "every persistent subscriber of the topic, but `except`", and each
/// node finds them in its replicated subscriptions as it applies the command. A
/// broadcast to a fleet is then an entry as large as its message.
#[derive(Debug, Default)]
pub struct FanOut {
    /// How many queues this node's view found (the command may reach a few more or
    /// fewer: subscriptions committed between the dispatch and the apply count).
    pub planned: usize,
    /// Persistent subscribers this node delivered the message to directly.
    pub except: Vec<Arc<str>>,
}

/// The command that replicates what a publish of `message` changes: `appends` (whose
/// last message is `message` if it has any for it), `fan_out`'s queues, `inbound`'s
/// QoS 2 record, and with `retain` the topic's retained message. `None` when it
/// changes nothing.
pub fn publish_command(
    message: &Arc<Message>,
    mut appends: Appends,
    fan_out: Option<FanOut>,
    limits: QueueLimits,
    inbound: Option<InboundRecord>,
    retain: bool,
) -> Option<Command> {
    if appends.is_empty() && fan_out.is_none() && inbound.is_none() && !retain {
        return None;
    }
    // The retained message is the one the queues get: named, not written again.
    let retained = retain.then(|| appends.add_message(message));
    Some(match fan_out {
        None => Command::Enqueue {
            appends,
            limits,
            inbound,
            retained,
        },
        Some(FanOut { except, .. }) => Command::EnqueueMatching {
            matching: appends.add_message(message),
            appends,
            limits,
            inbound,
            retained,
            except,
        },
    })
}

/// A delivery waiting for room in a slow client's channel.
#[derive(Debug)]
pub struct Blocked {
    /// The receiving client.
    pub client_id: Arc<str>,
    /// Its channel.
    pub tx: super::mailbox::Sender<ConnMsg>,
    /// The delivery.
    pub delivery: Box<Delivery>,
}

/// How long a publisher waits for room in a slow subscriber's channel before the
/// message is dropped (and counted). Waiting is the backpressure that slows a
/// publisher to what its subscribers take, instead of losing messages under load. A
/// channel that stayed full that long is stalled: later deliveries to it are dropped
/// without waiting until its client has drained half of it (see `mailbox`), so a
/// client that stops reading costs its publishers one wait, not one per message.
pub const SLOW_CLIENT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Blocked {
    /// Wait for room for each of `blocked` side by side (a message held up by several
    /// slow subscribers waits once, not once for each).
    pub async fn wait_all(blocked: Vec<Blocked>, stats: &Stats) {
        futures::future::join_all(blocked.into_iter().map(|b| b.wait(stats))).await;
    }

    /// Wait for room, or drop the delivery after [`SLOW_CLIENT_WAIT`].
    pub async fn wait(self, stats: &Stats) {
        let sent = self
            .tx
            .send_timeout(ConnMsg::Deliver(self.delivery), SLOW_CLIENT_WAIT)
            .await;
        if sent.is_err() {
            Stats::add(&stats.messages_dropped, 1);
            metrics::counter!("flockmq_messages_dropped_total", "reason" => "queue_full")
                .increment(1);
            tracing::debug!(client_id = %self.client_id, "slow client, message dropped");
        }
    }
}

impl Broker {
    /// Route `message` to every matching subscription. Local connections get it at
    /// once; appends to replicated queues are returned for the caller to commit.
    pub fn dispatch(&self, message: &Arc<Message>) -> DispatchOutcome {
        self.dispatch_to(message, Reach::All)
    }

    /// Route `message` to the subscribers `reach` leaves to this node.
    pub fn dispatch_to(&self, message: &Arc<Message>, reach: Reach) -> DispatchOutcome {
        let publisher = message.origin_client.as_deref();
        let mut targets: HashMap<Arc<str>, Target, crate::hash::State> = HashMap::default();
        let mut shared: Vec<(String, Members)> = Vec::new();
        let mut matched = 0usize;
        // Clients whose delivery a shared group or a subscription not yet committed
        // decided: their queue appends are named in the command. The state machine
        // finds the others as it applies it (only what the committed subscriptions
        // alone decide can be found there alike).
        let mut named: HashSet<Arc<str>, crate::hash::State> = HashSet::default();
        let durable = self.config.mqtt.durable_sessions;
        // Phase 1, under the read lock: match and decide each target's mode.
        let plan = self.read_state(|state| {
            // One walk of the trie finds both kinds; a node that only hands a will to
            // its own clients leaves shared groups to the publishing node.
            state.routes().for_each_match_and_group(
                &message.topic,
                |_filter, client, options| {
                    matched += 1;
                    if options.no_local && publisher == Some(&**client) {
                        return;
                    }
                    merge_target(&mut targets, client, options, message, None);
                },
                |group, members| {
                    if reach == Reach::All {
                        shared.push((group.to_owned(), members.to_vec()));
                    }
                },
            );
            // Subscriptions that arrived here and wait for their commit are in effect
            // on this node already (unless the applied table has them by now).
            self.provisional
                .for_each_match(&message.topic, |filter, client, options| {
                    let applied = state
                        .session(client)
                        .is_some_and(|s| s.subscriptions.get(filter) == Some(options));
                    if applied {
                        return;
                    }
                    matched += 1;
                    if options.no_local && publisher == Some(&**client) {
                        return;
                    }
                    named.insert(client.clone());
                    merge_target(&mut targets, client, options, message, None);
                });
            matched += shared.len();
            // Shared groups: one member each, preferring members that can take it now.
            if !shared.is_empty() {
                for (group, members) in &shared {
                    let candidates: Vec<Arc<str>> = members
                        .iter()
                        .filter(|(c, _)| {
                            // A member behind an unreachable peer would lose the
                            // message: prefer members that can take it.
                            state.session(c).is_some_and(|s| {
                                let queued = s.is_persistent() && message.qos > 0;
                                let reachable =
                                    s.node == self.node_id || !self.forwarder.is_down(s.node);
                                queued || (s.connected && reachable)
                            })
                        })
                        .map(|(c, _)| c.clone())
                        .collect();
                    let ctx = SelectContext {
                        publisher_client_id: publisher.unwrap_or(""),
                        topic: &message.topic,
                        random: rand::random(),
                        is_local: &|c: &Arc<str>| {
                            state.session(c).is_some_and(|s| s.node == self.node_id)
                        },
                    };
                    let chosen = lock(self.selector_of(group)).select(group, &candidates, &ctx);
                    if let Some(chosen) = chosen {
                        if let Some((client, options)) = members.iter().find(|(c, _)| *c == chosen)
                        {
                            named.insert(client.clone());
                            merge_target(
                                &mut targets,
                                client,
                                options,
                                message,
                                Some(Arc::from(group.as_str())),
                            );
                        }
                    }
                }
            }
            targets
                .drain()
                .filter_map(|(client, t)| {
                    let session = state.session(&client)?;
                    // A will is queued for every persistent session by the state
                    // machine, durable or not.
                    let queued = t.qos > 0
                        && session.is_persistent()
                        && (durable || !session.connected || reach != Reach::All);
                    let node = session.connected.then_some(session.node);
                    let persistent = session.is_persistent();
                    Some((client, t, queued, node, persistent))
                })
                .collect::<Vec<_>>()
        });
        // Only a publish this node dispatches in full leaves queues to be found, and
        // only once every member reads the command that says so (a rolling upgrade
        // names every queue, as the previous release did).
        let mut fan_out = (reach == Reach::All
            && self.state.all_read(crate::cluster::format::MATCHING_FORMAT))
        .then(FanOut::default);
        // Phase 2, lock released: hand over.
        let mut outcome = DispatchOutcome {
            matched,
            delivered: 0,
            enqueue: Appends::default(),
            blocked: Vec::new(),
            forward: Vec::new(),
            fan_out: None,
        };
        // The appends the state machine can find for itself: how many, and (only with
        // durable_sessions off, where they may end up named after all) the appends.
        let mut findable = 0usize;
        let mut findable_kept: Vec<EnqueueEntry> = Vec::new();
        for (client, target, queued, node, persistent) in plan {
            let left_to_others = match reach {
                Reach::All => false,
                Reach::Local => queued || node != Some(self.node_id),
            };
            if left_to_others {
                continue;
            }
            if let Some(f) = fan_out.as_mut() {
                if !queued && persistent && node.is_some() {
                    // Reached directly: the state machine must not queue it again,
                    // even at QoS 0 (its subscription may be raised to QoS 1 between
                    // this dispatch and the command's apply, which would then find it).
                    // An offline one was not reached: not excepted.
                    f.except.push(client.clone());
                }
            }
            if queued {
                let found = fan_out.is_some() && !named.contains(&client);
                if found {
                    findable += 1;
                    if durable {
                        // The command names none of them (below).
                        continue;
                    }
                }
                let entry = EnqueueEntry {
                    client_id: client,
                    message: message.clone(),
                    qos: target.qos,
                    retain: target.retain,
                    subscription_ids: target.subscription_ids,
                };
                match found {
                    true => findable_kept.push(entry),
                    false => outcome.enqueue.push(entry),
                }
            } else if node == Some(self.node_id) {
                outcome.delivered += 1;
                if let Some(b) = self.deliver_local(&client, message, target) {
                    outcome.blocked.push(b);
                }
            } else if let Some(node) = node {
                outcome.delivered += 1;
                let target = ForwardTarget {
                    client_id: client,
                    qos: target.qos,
                    retain: target.retain,
                    subscription_ids: target.subscription_ids,
                    shared_group: target.shared_group,
                };
                match outcome.forward.iter_mut().find(|(n, _)| *n == node) {
                    Some((_, f)) => f.targets.push(target),
                    None => outcome.forward.push((
                        node,
                        Forwarded {
                            message: message.clone(),
                            targets: vec![target],
                        },
                    )),
                }
            }
        }
        // The command names either the findable queues or the exceptions to "every
        // subscriber", whichever list is shorter: a fleet mostly online, with
        // durable_sessions off, is not named robot by robot either. With
        // durable_sessions on, it always names the exceptions (only persistent
        // subscribers reached directly at QoS 0, usually none): the findable appends
        // were not kept.
        match fan_out {
            Some(mut f) if findable > 0 && (durable || f.except.len() < findable) => {
                f.planned = findable;
                outcome.fan_out = Some(f);
            }
            _ => {
                for entry in findable_kept {
                    outcome.enqueue.push(entry);
                }
            }
        }
        outcome
    }

    /// Queue each of `forward` for its peer; the receivers fire when the peers have
    /// delivered (only asked for with `want_ack`). A peer that is down or too slow
    /// loses its part, counted: its clients are clean sessions (persistent ones take
    /// the replicated queues), which lose their state with their connection anyway.
    pub async fn forward(
        &self,
        forward: Vec<(NodeId, Forwarded)>,
        want_ack: bool,
    ) -> Vec<tokio::sync::oneshot::Receiver<()>> {
        let mut acks = Vec::new();
        for (node, item) in forward {
            let targets = item.targets.len() as u64;
            match self.forwarder.send(node, item, want_ack).await {
                Ok(ack) => acks.extend(ack),
                Err(_) => Stats::add(&self.stats.messages_dropped, targets),
            }
        }
        acks
    }

    /// Deliver what a peer forwarded to the clients connected here, waiting for room
    /// in slow clients' channels like a local publisher does. A client whose channel
    /// was full gets the rest of the batch's messages in order after the one that
    /// waits, never before it.
    async fn deliver_forwarded(
        &self,
        origin: NodeId,
        frame: bytes::Bytes,
    ) -> Result<(), FrameError> {
        // Per client that had a full channel, its deliveries in arrival order.
        let mut blocked: Vec<Vec<Blocked>> = Vec::new();
        let mut reader = FrameReader::new(&frame, super::unix_ms())?;
        let mut fault = None;
        'frame: loop {
            let (message, targets) = match reader.next_message() {
                Ok(Some(next)) => next,
                Ok(None) => break,
                Err(e) => {
                    fault = Some(e);
                    break;
                }
            };
            for _ in 0..targets {
                let t = match reader.next_target() {
                    Ok(t) => t,
                    Err(e) => {
                        fault = Some(e);
                        break 'frame;
                    }
                };
                let target = Target {
                    shared_group: t.shared_group.map(Arc::from),
                    qos: t.qos,
                    retain: t.retain,
                    subscription_ids: t.subscription_ids,
                };
                let Some((client_id, handle)) = self.local_client_entry(t.client_id) else {
                    // Gone since the peer matched: a shared member's message goes to
                    // another member here; anything else had only this connection.
                    match target.shared_group {
                        Some(_) => {
                            let delivery = delivery(&message, target);
                            // Only here or into a queue: a message makes one hop.
                            Box::pin(self.redeliver_shared(delivery, t.client_id, false)).await;
                        }
                        None => {
                            tracing::debug!(client_id = %t.client_id, origin, "forwarded message for a client no longer here");
                            Stats::add(&self.stats.messages_dropped, 1);
                            metrics::counter!("flockmq_messages_dropped_total", "reason" => "not_connected")
                                .increment(1);
                        }
                    }
                    continue;
                };
                let waiting = blocked.iter_mut().find(|w| w[0].client_id == client_id);
                let delivery = new_delivery(&message, target);
                match waiting {
                    Some(waiting) => waiting.push(Blocked {
                        client_id,
                        tx: handle.tx,
                        delivery,
                    }),
                    None => {
                        if let Err(b) = hand_over(client_id, handle, delivery) {
                            blocked.push(vec![b]);
                        }
                    }
                }
            }
        }
        futures::future::join_all(blocked.into_iter().map(|waiting| async move {
            for b in waiting {
                b.wait(&self.stats).await;
            }
        }))
        .await;
        fault.map_or(Ok(()), Err)
    }

    /// Hand `delivery` to `client`'s connection here, if it is connected here; a full
    /// mailbox gives the delivery back to wait for room.
    pub fn deliver_to_local(&self, client: &Arc<str>, delivery: Delivery) -> Option<Blocked> {
        let handle = self.local_client(client)?;
        hand_over(client.clone(), handle, Box::new(delivery)).err()
    }

    /// Hand a delivery to a local connection; a full channel returns it as blocked.
    fn deliver_local(
        &self,
        client: &Arc<str>,
        message: &Arc<Message>,
        target: Target,
    ) -> Option<Blocked> {
        self.deliver_to_local(client, delivery(message, target))
    }

    /// A shared-group member left without acknowledging `delivery`: give it to
    /// another member of the group, on this node or another, or to the queue of a
    /// persistent member, as dispatch would have chosen among those left. Without
    /// `may_forward`, members on other nodes are not considered (a message that was
    /// forwarded here once is not sent on again, so it cannot bounce between nodes).
    pub async fn redeliver_shared(&self, delivery: Delivery, leaving: &str, may_forward: bool) {
        let Some(group) = delivery.shared_group.clone() else {
            return;
        };
        let message = delivery.message;
        let durable = self.config.mqtt.durable_sessions;
        // Each member that can take it: (client, options, where it is connected,
        // whether it takes it through its replicated queue).
        let members: Vec<(Arc<str>, SubscriptionOptions, Option<NodeId>, bool)> =
            self.read_state(|state| {
                let mut found = Vec::new();
                state
                    .routes()
                    .for_each_shared_match(&message.topic, |g, members| {
                        if *g != *group {
                            return;
                        }
                        for (c, options) in members.iter().filter(|(c, _)| &**c != leaving) {
                            let Some(s) = state.session(c) else { continue };
                            let qos = message.qos.min(options.qos);
                            let queued = qos > 0 && s.is_persistent() && (durable || !s.connected);
                            let reachable = s.connected
                                && (s.node == self.node_id
                                    || (may_forward && !self.forwarder.is_down(s.node)));
                            if queued || reachable {
                                found.push((
                                    c.clone(),
                                    options.clone(),
                                    s.connected.then_some(s.node),
                                    queued,
                                ));
                            }
                        }
                    });
                found
            });
        // The selection context borrows non-Send closures: done before any await.
        let chosen = {
            let candidates: Vec<Arc<str>> = members.iter().map(|(c, ..)| c.clone()).collect();
            let ctx = SelectContext {
                publisher_client_id: message.origin_client.as_deref().unwrap_or(""),
                topic: &message.topic,
                random: rand::random(),
                is_local: &|c: &Arc<str>| {
                    members
                        .iter()
                        .any(|(m, _, node, _)| m == c && *node == Some(self.node_id))
                },
            };
            lock(self.selector_of(&group)).select(&group, &candidates, &ctx)
        };
        let Some((client, options, node, queued)) =
            chosen.and_then(|c| members.into_iter().find(|(m, ..)| *m == c))
        else {
            tracing::info!(group = %group, topic = %message.topic, "shared message lost with its member: no other member can take it");
            metrics::counter!("flockmq_messages_dropped_total", "reason" => "no_subscribers")
                .increment(1);
            return;
        };
        let target = Target {
            shared_group: Some(group),
            qos: message.qos.min(options.qos),
            retain: options.retain_as_published && message.retain,
            subscription_ids: options.subscription_id.into_iter().collect(),
        };
        if queued {
            let entry = EnqueueEntry {
                client_id: client.clone(),
                message,
                qos: target.qos,
                retain: target.retain,
                subscription_ids: target.subscription_ids,
            };
            if let Err(e) = self.commit_enqueue(Appends::from_iter([entry])).await {
                tracing::warn!(client_id = %client, error = %e, "shared message not queued for its new member");
            }
        } else if node == Some(self.node_id) {
            if let Some(blocked) = self.deliver_local(&client, &message, target) {
                blocked.wait(&self.stats).await;
            }
        } else if let Some(node) = node {
            let forwarded = Forwarded {
                message,
                targets: vec![ForwardTarget {
                    client_id: client,
                    qos: target.qos,
                    retain: target.retain,
                    subscription_ids: target.subscription_ids,
                    shared_group: target.shared_group,
                }],
            };
            // Nobody waits for an acknowledgement here (the publisher had its own), and
            // waiting inside a peer's delivery could stall its stream.
            self.forward(vec![(node, forwarded)], false).await;
        }
    }

    /// Commit appends to persistent sessions' queues (one batched command).
    pub async fn commit_enqueue(&self, appends: Appends) -> Result<(), ProposeError> {
        if appends.is_empty() {
            return Ok(());
        }
        let limits = self.queue_limits();
        let result = self
            .proposer
            .propose(Command::Enqueue {
                appends,
                limits,
                inbound: None,
                retained: None,
            })
            .await?;
        self.count_queue_drops(&result);
        Ok(())
    }

    /// Count the messages a committed `Enqueue` dropped at full queues.
    fn count_queue_drops(&self, result: &CommandResult) {
        if let CommandResult::Enqueued { dropped, .. } = *result {
            if dropped > 0 {
                Stats::add(&self.stats.messages_dropped, u64::from(dropped));
                metrics::counter!("flockmq_messages_dropped_total", "reason" => "queue_full")
                    .increment(u64::from(dropped));
                tracing::info!(dropped, "persistent session queue full, messages dropped");
            }
        }
    }

    /// Whether a CONNECT of `client_id` would add a session past `mqtt.max_sessions`
    /// (counted as refused when it would).
    pub fn sessions_full(&self, client_id: &str) -> bool {
        let max = self.config.mqtt.max_sessions;
        let full = max > 0
            && self.read_state(|st| st.session(client_id).is_none() && st.session_count() >= max);
        if full {
            metrics::counter!("flockmq_quota_refusals_total", "limit" => "sessions").increment(1);
        }
        full
    }

    /// Whether retaining a message on `topic` would add one past
    /// `mqtt.max_retained_messages` (counted as refused when it would).
    pub fn retained_full(&self, topic: &str) -> bool {
        let max = self.config.mqtt.max_retained_messages;
        let full = max > 0
            && self
                .read_state(|st| st.retained().len() >= max && st.retained().get(topic).is_none());
        if full {
            metrics::counter!("flockmq_quota_refusals_total", "limit" => "retained").increment(1);
        }
        full
    }

    /// Whether the persistent queues hold `mqtt.max_node_queued_bytes` or more.
    pub fn node_queues_full(&self) -> bool {
        let max = self.config.mqtt.max_node_queued_bytes;
        max > 0 && self.read_state(|st| st.queued_bytes_total() >= max)
    }

    /// `appends` queue appends left out at `mqtt.max_node_queued_bytes`: counted.
    pub fn refuse_queueing(&self, appends: usize) {
        tracing::info!(
            appends,
            "messages for offline sessions not queued: mqtt.max_node_queued_bytes reached"
        );
        Stats::add(&self.stats.messages_dropped, appends as u64);
        metrics::counter!("flockmq_quota_refusals_total", "limit" => "node_queued_bytes")
            .increment(appends as u64);
        metrics::counter!("flockmq_messages_dropped_total", "reason" => "node_queue_full")
            .increment(appends as u64);
    }

    /// The queue limits of this node's configuration, as carried by Enqueue commands.
    pub fn queue_limits(&self) -> QueueLimits {
        let mqtt = &self.config.mqtt;
        QueueLimits {
            max_messages: mqtt.max_queued_messages as u64,
            max_bytes: mqtt.max_queued_bytes,
            policy: match mqtt.queue_full_policy {
                QueueFullPolicyConfig::DropOldest => QueueFullPolicy::DropOldest,
                QueueFullPolicyConfig::DropNewest => QueueFullPolicy::DropNewest,
            },
        }
    }

    /// Publish a message as the broker itself (`$SYS`, the admin API): retained
    /// handling, dispatch and queue commit in one. (Wills are the state machine's:
    /// see `Event::PublishWill`.)
    pub async fn publish_internal(&self, message: Arc<Message>) -> Result<usize, ProposeError> {
        // Submitted, not awaited, before dispatching: the retained copy keeps its place
        // in the log ahead of anything the dispatch queues.
        let retained = if message.retain {
            let cmd = Command::SetRetained {
                topic: message.topic.clone(),
                message: Some(message.clone()),
            };
            Some(self.proposer.submit(cmd).await?)
        } else {
            None
        };
        let outcome = self.dispatch(&message);
        Stats::add(&self.stats.messages_received, 1);
        Blocked::wait_all(outcome.blocked, &self.stats).await;
        let acks = self.forward(outcome.forward, message.qos > 0).await;
        let queued = publish_command(
            &message,
            outcome.enqueue,
            outcome.fan_out,
            self.queue_limits(),
            None,
            false,
        );
        if let Some(command) = queued {
            let result = self.proposer.propose(command).await?;
            self.count_queue_drops(&result);
        }
        wait_forwarded(acks).await;
        if let Some(retained) = retained {
            retained.wait().await?;
        }
        Ok(outcome.matched)
    }
}

/// `message` as `target`'s matching subscriptions decided it is to be delivered.
fn delivery(message: &Arc<Message>, target: Target) -> Delivery {
    Delivery {
        message: message.clone(),
        qos: target.qos,
        retain: target.retain,
        subscription_ids: target.subscription_ids,
        shared_group: target.shared_group,
    }
}

/// The same, boxed for a connection's channel.
fn new_delivery(message: &Arc<Message>, target: Target) -> Box<Delivery> {
    Box::new(delivery(message, target))
}

/// Put `delivery` into `handle`'s channel; a full channel gives it back as blocked. A
/// closed one drops it: the connection is gone.
fn hand_over(
    client_id: Arc<str>,
    handle: ConnHandle,
    delivery: Box<Delivery>,
) -> Result<(), Blocked> {
    match handle.tx.try_send(ConnMsg::Deliver(delivery)) {
        Ok(()) => Ok(()),
        Err(super::mailbox::TrySendError::Full(ConnMsg::Deliver(delivery))) => Err(Blocked {
            client_id,
            tx: handle.tx,
            delivery,
        }),
        Err(_) => Ok(()),
    }
}

impl ForwardSink for Broker {
    fn deliver(
        &self,
        origin: NodeId,
        frame: bytes::Bytes,
    ) -> BoxFuture<'_, Result<(), FrameError>> {
        Box::pin(self.deliver_forwarded(origin, frame))
    }
}

/// How long a publisher's acknowledgement waits for peers to confirm forwarded
/// messages; a peer that takes longer is treated as failed (its part is lost).
pub const FORWARD_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Wait until every peer confirmed its part, each within [`FORWARD_ACK_WAIT`]
/// overall. A peer that failed meanwhile simply drops its confirmation.
pub async fn wait_forwarded(acks: Vec<tokio::sync::oneshot::Receiver<()>>) {
    if acks.is_empty() {
        return;
    }
    let all = futures::future::join_all(acks);
    if tokio::time::timeout(FORWARD_ACK_WAIT, all).await.is_err() {
        tracing::debug!("a peer did not confirm forwarded messages in time");
    }
}

/// Fold one matching subscription into the client's single delivery: the highest
/// granted QoS wins, every subscription identifier is carried, and Retain As
/// Published on any matching subscription keeps the RETAIN flag.
fn merge_target(
    targets: &mut HashMap<Arc<str>, Target, crate::hash::State>,
    client: &Arc<str>,
    options: &SubscriptionOptions,
    message: &Message,
    shared_group: Option<Arc<str>>,
) {
    let (qos, retain) = options.grant(message);
    let t = targets.entry(client.clone()).or_insert(Target {
        shared_group: shared_group.clone(),
        qos,
        retain,
        subscription_ids: Vec::new(),
    });
    if shared_group.is_none() {
        t.shared_group = None;
    }
    t.qos = t.qos.max(qos);
    t.retain |= retain;
    if let Some(id) = options.subscription_id {
        t.subscription_ids.push(id);
    }
}
