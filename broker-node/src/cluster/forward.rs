//! The data plane between nodes: publish forwarding without consensus.
//!
//! The node that receives a PUBLISH matches it against its applied route table and,
//! for clients connected to another node, sends the message once to that node over
//! one long-lived gRPC stream per peer, addressed to the clients there. Many messages
//! travel in one frame; the peer acknowledges frames in order once it has handed every
//! delivery to its clients, and a publisher's PUBACK waits for those acknowledgements.
//!
//! Bounds: each peer has a channel of `cluster.forward_buffer_messages` messages and at most
//! [`WINDOW`] unacknowledged frames. A full channel slows the publisher (up to
//! [`SLOW_PEER_WAIT`], then the message is dropped and counted); a peer that cannot be
//! reached is marked down, and a message for it never makes its publisher wait: it is
//! queued only if the channel has room, and it starts an attempt to reach the peer at
//! once (at most one per [`MIN_RETRY`]), travelling if that attempt opens the stream
//! and dropped (counted) if it fails, so a dead peer never makes anything grow. Without
//! that attempt, a peer that came back while the stream to it backed off lost every
//! message sent before the next scheduled attempt (up to [`MAX_BACKOFF`]), though its
//! clients had connected and subscribed through Raft meanwhile. Messages for
//! persistent sessions do not take this path: they go through the replicated queues
//! and survive the peer.
//!
//! This module owns the forwarding logic over plain values (queues, windows, frames of
//! encoded entries, acknowledged sequence numbers); the gRPC stream that carries them
//! is [`network::forward`](super::network::forward)'s. It never sees a protobuf type.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use openraft::BasicNode;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::command::{Message, NodeId};
use super::frame::{FrameError, FrameReader};
use super::network::forward::{self as wire, Acks, FrameHandler, FrameSender};
use super::stats::PeerForwarding;

/// Frames sent to a peer and not yet acknowledged.
pub const WINDOW: usize = 64;
/// Most messages in one frame. Frames are cut from whatever waits in the channel, so
/// under light load they are small and leave at once; under heavy load large frames
/// let the peer hand each subscriber its messages in long runs (with 256 the cross-node
/// QoS 0 throughput was a third lower).
const FRAME_MESSAGES: usize = 4096;
/// A frame stops growing once its payloads reach this many bytes.
const FRAME_BYTES: usize = 1024 * 1024;
/// How long a publisher waits for room in a slow peer's channel.
pub const SLOW_PEER_WAIT: Duration = Duration::from_secs(1);
/// Longest pause between attempts to reach a peer that is down while nothing is sent
/// to it.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Shortest pause between attempts to reach a peer that is down when messages wait
/// for it.
const MIN_RETRY: Duration = Duration::from_millis(100);

/// One client on the peer a message is addressed to, with what its subscriptions
/// decided on the receiving node (QoS already downgraded, RETAIN as it is to be sent,
/// no-local already judged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardTarget {
    /// The client.
    pub client_id: Arc<str>,
    /// Delivery QoS.
    pub qos: u8,
    /// RETAIN flag to send.
    pub retain: bool,
    /// Identifiers of the matching subscriptions.
    pub subscription_ids: Vec<u32>,
    /// The shared group the client was chosen for, if that is why it gets it.
    pub shared_group: Option<Arc<str>>,
}

/// A message on its way to one peer, with the clients there it is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forwarded {
    /// The message, properties and reception time unchanged.
    pub message: Arc<Message>,
    /// The clients on the peer.
    pub targets: Vec<ForwardTarget>,
}

/// The local side that delivers what peers forward (the broker runtime).
pub trait ForwardSink: Send + Sync + 'static {
    /// Hand every target of the encoded `frame` (see [`super::frame`]) to its
    /// connection; resolves when each one has been accepted (or dropped and counted).
    /// An undecodable frame is delivered up to the fault and reported.
    fn deliver(&self, origin: NodeId, frame: bytes::Bytes)
        -> BoxFuture<'_, Result<(), FrameError>>;
}

/// Where the receiving side finds the sink, which exists only once the broker runtime
/// has started (after Raft and the gRPC server).
pub type SinkSlot = Arc<OnceLock<Arc<dyn ForwardSink>>>;

/// Lock a std mutex, recovering the data if a holder panicked (every critical section
/// here is a single map operation).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The receiving side: hands the frames of peers' forward streams to the sink, for
/// [`ForwardService`](super::network::forward::ForwardService).
#[derive(Clone)]
pub struct Inbound {
    sink: SinkSlot,
}

impl Inbound {
    /// Frames delivered into `sink`.
    pub fn new(sink: SinkSlot) -> Inbound {
        Inbound { sink }
    }
}

impl FrameHandler for Inbound {
    type Error = FrameError;

    async fn frame(&self, origin_node: NodeId, entries: bytes::Bytes) -> Result<(), FrameError> {
        let origin = origin_node.to_string();
        metrics::counter!("flockmq_forward_bytes_received_total", "peer" => origin.clone())
            .increment(entries.len() as u64);
        let messages = FrameReader::new(&entries, 0).map_or(0, |r| r.remaining());
        metrics::counter!("flockmq_forward_received_total", "peer" => origin.clone())
            .increment(u64::from(messages));
        let delivered = match self.sink.get() {
            Some(sink) => sink.deliver(origin_node, entries).await,
            // The runtime is not up yet, so no client is connected here.
            None => {
                metrics::counter!("flockmq_messages_dropped_total", "reason" => "no_subscribers")
                    .increment(u64::from(messages));
                Ok(())
            }
        };
        if let Err(e) = &delivered {
            metrics::counter!("flockmq_forward_errors_total", "peer" => origin, "kind" => "decode")
                .increment(1);
            tracing::warn!(origin = origin_node, error = %e, "undecodable forward frame");
        }
        delivered
    }
}

/// A message queued for a peer, with the publisher's acknowledgement to fire.
struct Outgoing {
    item: Forwarded,
    ack: Option<oneshot::Sender<()>>,
}

struct Peer {
    tx: mpsc::Sender<Outgoing>,
    link: Arc<Link>,
}

/// The state of one peer's stream that the senders and its task share.
#[derive(Debug)]
struct Link {
    /// False while the peer cannot be reached: messages for it are dropped at once.
    up: AtomicBool,
    /// Messages handed to the stream (for the admin API; the metrics count them too).
    sent: AtomicU64,
    /// Messages for the peer dropped, whatever the reason.
    dropped: AtomicU64,
}

impl Link {
    fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a message was not queued for its peer.
#[derive(Debug, PartialEq, Eq)]
pub enum NotForwarded {
    /// The peer is down.
    PeerDown,
    /// The peer's channel stayed full for [`SLOW_PEER_WAIT`].
    PeerSlow,
}

/// The sending side: one stream task per peer, started on first use.
pub struct Forwarder {
    node_id: NodeId,
    /// Messages waiting for one peer's stream.
    peer_queue: usize,
    metrics: watch::Receiver<openraft::RaftMetrics<NodeId, BasicNode>>,
    peers: Mutex<HashMap<NodeId, Peer>>,
    shutdown: CancellationToken,
}

impl Forwarder {
    /// A forwarder for node `node_id`, finding peers' addresses in Raft's membership.
    pub fn new(
        node_id: NodeId,
        peer_queue: usize,
        metrics: watch::Receiver<openraft::RaftMetrics<NodeId, BasicNode>>,
        shutdown: CancellationToken,
    ) -> Forwarder {
        Forwarder {
            node_id,
            peer_queue: peer_queue.max(1),
            metrics,
            peers: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// Whether `node` is known to be unreachable right now (its stream broke and has
    /// not reopened). A peer never tried counts as reachable.
    pub fn is_down(&self, node: NodeId) -> bool {
        lock(&self.peers)
            .get(&node)
            .is_some_and(|p| !p.link.up.load(Ordering::Acquire))
    }

    /// The forwarding to every peer this node has sent to, by node id.
    pub fn peer_stats(&self) -> Vec<PeerForwarding> {
        let mut peers: Vec<PeerForwarding> = lock(&self.peers)
            .iter()
            .map(|(node, p)| PeerForwarding {
                node_id: *node,
                up: p.link.up.load(Ordering::Acquire),
                sent: p.link.sent.load(Ordering::Relaxed),
                dropped: p.link.dropped.load(Ordering::Relaxed),
                queued: (p.tx.max_capacity() - p.tx.capacity()) as u64,
            })
            .collect();
        peers.sort_by_key(|p| p.node_id);
        peers
    }

    /// Queue `item` for `node`. With `want_ack`, the returned receiver fires once the
    /// peer has delivered it (it is dropped unfired if the peer fails first). For a
    /// peer that is down, the message waits for one attempt to reach it, or is dropped
    /// at once when the channel is full.
    pub async fn send(
        &self,
        node: NodeId,
        item: Forwarded,
        want_ack: bool,
    ) -> Result<Option<oneshot::Receiver<()>>, NotForwarded> {
        let (tx, link) = self.peer(node);
        let (ack, rx) = if want_ack {
            let (ack, rx) = oneshot::channel();
            (Some(ack), Some(rx))
        } else {
            (None, None)
        };
        let outgoing = Outgoing { item, ack };
        let sent = match tx.try_send(outgoing) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) if !link.up.load(Ordering::Acquire) => {
                Err(NotForwarded::PeerDown)
            }
            Err(mpsc::error::TrySendError::Full(outgoing)) => tx
                .send_timeout(outgoing, SLOW_PEER_WAIT)
                .await
                .map_err(|_| NotForwarded::PeerSlow),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(NotForwarded::PeerDown),
        };
        let outcome = sent.map(|()| rx);
        if let Err(why) = &outcome {
            let reason = match why {
                NotForwarded::PeerDown => "peer_down",
                NotForwarded::PeerSlow => "peer_slow",
            };
            metrics::counter!("flockmq_messages_dropped_total", "reason" => reason).increment(1);
            metrics::counter!("flockmq_forward_dropped_total", "peer" => node.to_string(), "reason" => reason)
                .increment(1);
            link.drop_one();
            tracing::debug!(peer = node, reason, "message not forwarded");
        }
        outcome
    }

    /// The channel to `node`, starting its stream task on first use.
    fn peer(&self, node: NodeId) -> (mpsc::Sender<Outgoing>, Arc<Link>) {
        let mut peers = lock(&self.peers);
        if let Some(p) = peers.get(&node).filter(|p| !p.tx.is_closed()) {
            return (p.tx.clone(), p.link.clone());
        }
        let (tx, rx) = mpsc::channel(self.peer_queue);
        // Optimistic: the first messages wait for the first connection attempt. A
        // stream task that ended (shutdown) leaves its counts to its successor.
        let (sent, dropped) = peers.get(&node).map_or((0, 0), |p| {
            (
                p.link.sent.load(Ordering::Relaxed),
                p.link.dropped.load(Ordering::Relaxed),
            )
        });
        let link = Arc::new(Link {
            up: AtomicBool::new(true),
            sent: AtomicU64::new(sent),
            dropped: AtomicU64::new(dropped),
        });
        tokio::spawn(run_peer(
            self.node_id,
            node,
            self.metrics.clone(),
            rx,
            link.clone(),
            self.shutdown.clone(),
        ));
        peers.insert(
            node,
            Peer {
                tx: tx.clone(),
                link: link.clone(),
            },
        );
        (tx, link)
    }
}

/// How a connected stream ended.
enum Ended {
    /// The node is stopping, or the forwarder is gone.
    Stop,
    /// The stream broke: reconnect.
    Broken,
}

async fn run_peer(
    own: NodeId,
    node: NodeId,
    metrics: watch::Receiver<openraft::RaftMetrics<NodeId, BasicNode>>,
    mut rx: mpsc::Receiver<Outgoing>,
    link: Arc<Link>,
    shutdown: CancellationToken,
) {
    let up = &link.up;
    let mut backoff = Duration::from_millis(100);
    let label = node.to_string();
    let peer_up = metrics::gauge!("flockmq_forward_peer_up", "peer" => label.clone());
    let errors = |kind: &'static str| metrics::counter!("flockmq_forward_errors_total", "peer" => label.clone(), "kind" => kind);
    let dropped = metrics::counter!("flockmq_forward_dropped_total", "peer" => label.clone(), "reason" => "peer_down");
    let lost = |n: u64| {
        metrics::counter!("flockmq_messages_dropped_total", "reason" => "peer_down").increment(n);
        dropped.increment(n);
        link.dropped.fetch_add(n, Ordering::Relaxed);
    };
    // A message that came while the peer was down and waits for the next attempt.
    let mut held: Option<Outgoing> = None;
    loop {
        let addr = metrics
            .borrow()
            .membership_config
            .membership()
            .get_node(&node)
            .map(|n| n.addr.clone());
        let opened = match addr {
            Some(addr) => wire::open(&addr, WINDOW).await,
            None => Err(format!("node {node} is not a member")),
        };
        match opened {
            Ok(stream) => {
                tracing::info!(peer = node, "forward stream open");
                up.store(true, Ordering::Release);
                peer_up.set(1.0);
                backoff = Duration::from_millis(100);
                let ended = pump(own, node, &mut rx, held.take(), stream, &link, &shutdown).await;
                up.store(false, Ordering::Release);
                peer_up.set(0.0);
                match ended {
                    Ended::Stop => return,
                    Ended::Broken => {
                        errors("stream").increment(1);
                        tracing::info!(peer = node, "forward stream broken");
                    }
                }
            }
            Err(e) => {
                up.store(false, Ordering::Release);
                peer_up.set(0.0);
                errors("connect").increment(1);
                tracing::debug!(peer = node, error = %e, "peer unreachable");
                // What waited for this attempt is lost with it, not kept for the next.
                let mut n = u64::from(held.take().is_some());
                while rx.try_recv().is_ok() {
                    n += 1;
                }
                if n > 0 {
                    lost(n);
                }
            }
        }
        // While nothing is sent to the peer, attempts back off; a message starts the
        // next one at once, but not within MIN_RETRY of the last.
        let now = tokio::time::Instant::now();
        let until = now + backoff;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(until) => {}
            item = rx.recv() => match item {
                Some(o) => held = Some(o),
                None => return,
            },
        }
        if held.is_some() {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(now + MIN_RETRY) => {}
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Move messages (`held` first) from the channel to the open `stream` in frames and
/// fire acknowledgements as the peer confirms frames.
async fn pump(
    own: NodeId,
    node: NodeId,
    rx: &mut mpsc::Receiver<Outgoing>,
    mut held: Option<Outgoing>,
    (frames, mut acks): (FrameSender, Acks),
    link: &Link,
    shutdown: &CancellationToken,
) -> Ended {
    let label = node.to_string();
    let sent = metrics::counter!("flockmq_forward_sent_total", "peer" => label.clone());
    let bytes_sent = metrics::counter!("flockmq_forward_bytes_sent_total", "peer" => label.clone());
    let frames_sent = metrics::counter!("flockmq_forward_frames_total", "peer" => label.clone());
    let frame_messages =
        metrics::histogram!("flockmq_forward_frame_messages", "peer" => label.clone());
    let ack_latency = metrics::histogram!("flockmq_forward_ack_duration_seconds", "peer" => label);
    // Frames in flight: sequence number, when sent, the publishers waiting on it.
    let mut pending: VecDeque<(u64, Instant, Vec<oneshot::Sender<()>>)> = VecDeque::new();
    let mut seq = 0u64;
    loop {
        let first = match held.take() {
            Some(first) => first,
            None => tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ended::Stop,
                ack = acks.next() => match ack {
                    Some(acked) => {
                        while pending.front().is_some_and(|(s, _, _)| *s <= acked) {
                            if let Some((_, sent_at, waiters)) = pending.pop_front() {
                                ack_latency.record(crate::clock::now().saturating_duration_since(sent_at).as_secs_f64());
                                for w in waiters {
                                    let _ = w.send(());
                                }
                            }
                        }
                        continue;
                    }
                    None => return Ended::Broken,
                },
                first = rx.recv(), if pending.len() < WINDOW => match first {
                    Some(first) => first,
                    None => return Ended::Stop,
                },
            },
        };
        let mut items = Vec::with_capacity(16);
        let mut waiters = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(o) = next.take() {
            bytes += o.item.message.payload.len() + o.item.message.topic.len();
            items.push(o.item);
            waiters.extend(o.ack);
            if items.len() < FRAME_MESSAGES && bytes < FRAME_BYTES {
                next = rx.try_recv().ok();
            }
        }
        let items_len = items.len() as u64;
        let mut entries = Vec::with_capacity(super::frame::encoded_len(&items));
        if let Err(e) = super::frame::encode(&items, crate::clock::unix_ms(), &mut entries) {
            // Limits are checked on the way in, so this is a bug: the frame is
            // lost, its publishers' acknowledgements are dropped unfired.
            tracing::error!(error = %e, "cannot encode forward frame");
            continue;
        }
        seq += 1;
        frames_sent.increment(1);
        sent.increment(items_len);
        link.sent.fetch_add(items_len, Ordering::Relaxed);
        frame_messages.record(items_len as f64);
        bytes_sent.increment(entries.len() as u64);
        if frames.send(seq, own, entries.into()).await.is_err() {
            return Ended::Broken;
        }
        pending.push_back((seq, crate::clock::now(), waiters));
    }
}
