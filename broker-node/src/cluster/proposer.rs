//! The batching writer in front of Raft.
//!
//! Connection tasks submit single [`Command`]s; one proposer task gathers them for at
//! most `max_delay` or `max_commands` and appends them as one Raft entry, so a
//! connection storm or a burst of queue appends costs a few Raft round trips rather
//! than thousands. Several batches may be in flight at once (openraft pipelines them);
//! each submitter gets its own [`CommandResult`] back, or a [`ProposeError`] that says
//! whether to retry elsewhere.
//!
//! State: the proposer owns its pending batch in its own task; submitters hold only a
//! channel sender ([`Proposer`] is a cheap clone). On a follower, batches the leader
//! applied wait for this node's own apply in a second task, in forwarding order.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use super::command::{Command, CommandResult, NodeId, Origin, Request, Response};
use super::network::{ForwardError, LeaderForwarder};
use super::raft::Raft;

/// The byte budget of one batch ([`BatchSettings::max_bytes`]). An append must reach a
/// follower and be synced there within openraft's append timeout (the heartbeat
/// interval, 200 ms by default), or it is sent again, whole, for ever: 1 MiB crosses a
/// 1 Gbit/s link in 8 ms.
pub const MAX_BATCH_BYTES: u64 = 1 << 20;

/// Why a command was not applied.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProposeError {
    /// No leader could commit it in time (no majority): the client may retry elsewhere.
    #[error("control plane unavailable: {0}")]
    Unavailable(String),
    /// The node is shutting down.
    #[error("node is shutting down")]
    ShuttingDown,
}

/// A submitted command waiting for its batch.
struct Pending {
    cmd: Command,
    /// Its sequence number in this proposer's incarnation, given as the proposer takes
    /// it in (submission order).
    seq: u64,
    reply: Reply,
    /// The submitter reports a failure to its client when it stops waiting (a refused
    /// CONNECT or SUBSCRIBE), so once it has, the command must not be applied after all.
    refusable: bool,
    /// Its encoded size, for the batch's byte budget.
    bytes: u64,
}

impl Pending {
    /// A refusable command whose submitter stopped waiting.
    fn abandoned(&self) -> bool {
        self.refusable && self.reply.is_closed()
    }
}

/// A handle for submitting commands to the batching writer.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
    timeout: Duration,
}

/// How the proposer batches.
#[derive(Clone, Copy, Debug)]
pub struct BatchSettings {
    /// Most commands in one entry.
    pub max_commands: usize,
    /// Most encoded bytes of commands in one entry: a batch stops before the command
    /// that would go beyond (a command larger than this goes alone). Raft ships whole
    /// entries, and an append larger than the peers' gRPC message limit would be
    /// refused every time it is sent, stalling replication for good.
    pub max_bytes: u64,
    /// Longest a command waits for companions.
    pub max_delay: Duration,
    /// Longest a command waits to be committed before the submitter gets `Unavailable`.
    pub write_timeout: Duration,
    /// Batches in flight at once.
    pub max_in_flight: usize,
    /// This node, to tell whether it leads.
    pub node_id: NodeId,
    /// This run of the proposer, named in every entry it proposes with the commands'
    /// sequence numbers, so that a resend is applied once (DESIGN invariant 7).
    pub incarnation: u64,
}

/// The outcome of a submitted command, to be awaited later.
pub struct Submitted {
    rx: oneshot::Receiver<Result<CommandResult, ProposeError>>,
    timeout: Duration,
}

impl Submitted {
    /// Wait for the command to be committed and applied.
    pub async fn wait(self) -> Result<CommandResult, ProposeError> {
        match tokio::time::timeout(self.timeout, self.rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProposeError::ShuttingDown),
            Err(_) => Err(ProposeError::Unavailable(format!(
                "not committed within {:?}",
                self.timeout
            ))),
        }
    }
}

impl Proposer {
    /// Start the proposer task for `raft`; it stops when `shutdown` is cancelled.
    pub fn spawn(raft: Raft, settings: BatchSettings, shutdown: CancellationToken) -> Proposer {
        let (tx, rx) = mpsc::channel(settings.max_commands.max(1) * 8);
        tokio::spawn(run(raft, settings, rx, shutdown));
        Proposer {
            tx,
            timeout: settings.write_timeout,
        }
    }

    /// Queue `cmd` behind every command submitted before it; the returned handle
    /// yields its result. Commands from one submitter are applied in submission order.
    pub async fn submit(&self, cmd: Command) -> Result<Submitted, ProposeError> {
        self.enqueue(cmd, false).await
    }

    async fn enqueue(&self, cmd: Command, refusable: bool) -> Result<Submitted, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let bytes = bincode::serialized_size(&cmd).unwrap_or(u64::MAX);
        self.tx
            .send(Pending {
                cmd,
                seq: 0,
                reply,
                refusable,
                bytes,
            })
            .await
            .map_err(|_| ProposeError::ShuttingDown)?;
        Ok(Submitted {
            rx,
            timeout: self.timeout,
        })
    }

    /// Submit `cmd` and wait for its result.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, ProposeError> {
        self.submit(cmd).await?.wait().await
    }

    /// Like [`Proposer::propose`], for a command whose failure the caller reports to
    /// its client (a CONNECT or SUBSCRIBE refused): should the wait time out, the
    /// command is dropped if it has not been sent to the leader yet, so that what the
    /// client was told stays true. (One already sent may still be applied; see
    /// `LeaderForwarder` for how long that window stays open.)
    pub async fn propose_refusable(&self, cmd: Command) -> Result<CommandResult, ProposeError> {
        self.submit_refusable(cmd).await?.wait().await
    }

    /// [`Proposer::submit`] for a refusable command (see [`Proposer::propose_refusable`]):
    /// should the returned handle be dropped or time out before the command was sent
    /// to the leader, the command is dropped.
    pub async fn submit_refusable(&self, cmd: Command) -> Result<Submitted, ProposeError> {
        self.enqueue(cmd, true).await
    }

    /// Submit `cmd` without waiting for the outcome (acknowledgement trimming, sweeps).
    pub fn propose_detached(&self, cmd: Command) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.propose(cmd).await {
                tracing::debug!(error = %e, "detached command not applied");
            }
        });
    }
}

async fn run(
    raft: Raft,
    settings: BatchSettings,
    mut rx: mpsc::Receiver<Pending>,
    shutdown: CancellationToken,
) {
    let in_flight = Arc::new(Semaphore::new(settings.max_in_flight.max(1)));
    let own_id = settings.node_id;
    let origin = Origin {
        node: own_id,
        incarnation: settings.incarnation,
    };
    let mut next_seq = 0u64;
    let mut forwarder = LeaderForwarder::default();
    let (applied_tx, applied_rx) = mpsc::unbounded_channel();
    tokio::spawn(answer_once_applied(raft.clone(), applied_rx));
    // A command that did not fit in the last batch's byte budget: the next batch's first.
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                first = rx.recv() => match first {
                    Some(p) => p,
                    None => break,
                },
            },
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + settings.max_delay;
        while batch.len() < settings.max_commands {
            // Take what is already waiting without a timer, then wait out the delay.
            let next = match rx.try_recv() {
                Ok(p) => p,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(p)) => p,
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            if bytes.saturating_add(next.bytes) > settings.max_bytes {
                carried = Some(next);
                break;
            }
            bytes += next.bytes;
            batch.push(next);
        }
        for p in &mut batch {
            next_seq += 1;
            p.seq = next_seq;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        drop_abandoned(&mut batch);
        if batch.is_empty() {
            continue;
        }
        metrics::histogram!("flockmq_raft_batch_commands").record(batch.len() as f64);
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + settings.write_timeout;
        let Some(leader) = await_leader(&raft, None, deadline).await else {
            drop(permit);
            answer(batch, Err("no leader elected in time".to_owned()));
            continue;
        };
        if leader.0 != own_id {
            // A follower: the leader applies the batch. Forwarded one at a time, so
            // batches stay in submission order.
            match forward(&raft, &mut forwarder, leader, origin, &mut batch, deadline).await {
                Forwarded::Done(outcome) => {
                    metrics::histogram!("flockmq_raft_proposal_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    drop(permit);
                    match outcome {
                        // Read your writes: a submitter reads this node's state next (the
                        // retained messages at SUBSCRIBE, its session), so the answer
                        // waits until this node has applied the entry, not only the leader.
                        Ok(response) if response.log_index > 0 => {
                            let until = deadline.max(tokio::time::Instant::now() + MIN_APPLY_WAIT);
                            let _ = applied_tx.send(Applying {
                                index: response.log_index,
                                until,
                                batch,
                                response,
                            });
                        }
                        other => answer(batch, other),
                    }
                    continue;
                }
                // Nothing later was appended meanwhile: appending it here keeps order.
                Forwarded::NowLeader => {}
            }
            drop_abandoned(&mut batch);
            if batch.is_empty() {
                continue;
            }
        }
        let mut commands = Vec::with_capacity(batch.len());
        let mut seqs = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for p in batch {
            commands.push(p.cmd);
            seqs.push(p.seq);
            replies.push(p.reply);
        }
        let request = Request {
            origin: Some(origin),
            commands,
            seqs,
            sent_at_ms: crate::clock::unix_ms(),
        };
        // Appending here, in the loop, keeps batches in submission order; only the
        // wait for commit runs concurrently.
        let receiver = raft.client_write_ff(request).await;
        tokio::spawn(async move {
            let outcome = match receiver {
                Ok(rx) => match rx.await {
                    Ok(Ok(response)) => Ok(response),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("raft dropped the proposal".to_owned()),
                },
                Err(e) => Err(e.to_string()),
            };
            metrics::histogram!("flockmq_raft_proposal_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            drop(permit);
            answer_replies(replies, outcome.map(|r| r.data));
        });
    }
}

type Reply = oneshot::Sender<Result<CommandResult, ProposeError>>;

/// Take out of `batch` the refusable commands whose submitters stopped waiting.
fn drop_abandoned(batch: &mut Vec<Pending>) {
    let before = batch.len();
    batch.retain(|p| !p.abandoned());
    if batch.len() < before {
        tracing::debug!(
            dropped = before - batch.len(),
            "commands whose clients were refused meanwhile not sent"
        );
    }
}

/// The commands of `batch` as one Raft request of `origin`.
fn request_of(origin: Origin, batch: &[Pending]) -> Request {
    Request {
        origin: Some(origin),
        commands: batch.iter().map(|p| p.cmd.clone()).collect(),
        seqs: batch.iter().map(|p| p.seq).collect(),
        sent_at_ms: crate::clock::unix_ms(),
    }
}

/// Hand every submitter in `batch` its own result, or the batch's error.
fn answer(batch: Vec<Pending>, outcome: Result<Response, String>) {
    answer_replies(batch.into_iter().map(|p| p.reply).collect(), outcome);
}

/// Hand every submitter its own result, or the batch's error.
fn answer_replies(replies: Vec<Reply>, outcome: Result<Response, String>) {
    match outcome {
        Ok(response) => {
            let mut results = response.results.into_iter();
            for reply in replies {
                let _ = reply.send(Ok(results.next().unwrap_or_default()));
            }
        }
        Err(e) => {
            let err = ProposeError::Unavailable(e);
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// What became of a batch sent to the leader.
enum Forwarded {
    /// The leader's answer, or why there is none.
    Done(Result<Response, String>),
    /// This node was elected while the batch waited: append it locally.
    NowLeader,
}

/// Forward `batch` to `leader`; while the leader cannot be reached, says it no longer
/// leads (an election is under way) or gives no answer, wait for the next leader and
/// try it, until `deadline`. A batch whose delivery is uncertain (no answer after it
/// was sent) is sent again all the same, with its origin and sequence numbers: if it
/// was applied, the state machine answers the resend with the first results and
/// applies nothing twice (invariant 7). Giving up on it instead would let the batches
/// behind it commit first, and a client resending its refused messages would see
/// them delivered after later ones. Before every attempt, refusable commands whose
/// submitters gave up are taken out.
async fn forward(
    raft: &Raft,
    forwarder: &mut LeaderForwarder,
    mut leader: (NodeId, String),
    origin: Origin,
    batch: &mut Vec<Pending>,
    deadline: tokio::time::Instant,
) -> Forwarded {
    let own_id = raft.metrics().borrow().id;
    loop {
        drop_abandoned(batch);
        if batch.is_empty() {
            return Forwarded::Done(Ok(Response::default()));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match forwarder
            .forward(&leader.1, &request_of(origin, batch), left)
            .await
        {
            Ok(response) => return Forwarded::Done(Ok(response)),
            Err(ForwardError::Uncertain(e) | ForwardError::NotSent(e)) => {
                tracing::debug!(leader = leader.0, error = %e, "leader unreachable, waiting for the next");
                // Give the same leader another chance after a pause if no other emerges.
                let pause = (tokio::time::Instant::now() + RETRY_PAUSE).min(deadline);
                let next = match await_leader(raft, Some(leader.0), pause).await {
                    Some(next) => Some(next),
                    None => await_leader(raft, None, deadline).await,
                };
                if tokio::time::Instant::now() >= deadline {
                    return Forwarded::Done(Err(format!("no reachable leader in time: {e}")));
                }
                match next {
                    Some(next) if next.0 == own_id => return Forwarded::NowLeader,
                    Some(next) => leader = next,
                    None => return Forwarded::Done(Err("no leader elected in time".to_owned())),
                }
            }
        }
    }
}

/// The least a follower waits for its own state to apply a forwarded write.
const MIN_APPLY_WAIT: Duration = Duration::from_millis(500);

/// A forwarded batch the leader applied, waiting for this node to apply it too.
struct Applying {
    /// Its log entry's index.
    index: u64,
    /// When to give up waiting.
    until: tokio::time::Instant,
    batch: Vec<Pending>,
    /// The leader's answer, handed over once this node has applied the entry.
    response: Response,
}

/// Answer forwarded batches once this node has applied their entries (read your
/// writes), or with an error at their deadline. One task for all of them, answering in
/// the order they were forwarded, rather than a task each waiting on Raft's metrics:
/// the waiters of one `watch` channel are woken in an order tokio draws at random
/// (from a generator only `--cfg tokio_unstable` builds can seed), and two runs of one
/// simulated seed answered two clients in either order.
async fn answer_once_applied(raft: Raft, mut rx: mpsc::UnboundedReceiver<Applying>) {
    let mut metrics = raft.metrics();
    let mut waiting: Vec<Applying> = Vec::new();
    let (mut open, mut raft_running) = (true, true);
    while open || !waiting.is_empty() {
        let applied = metrics.borrow().last_applied.map_or(0, |l| l.index);
        let now = tokio::time::Instant::now();
        for a in std::mem::take(&mut waiting) {
            if a.index <= applied {
                answer(a.batch, Ok(a.response));
            } else if now >= a.until || !raft_running {
                // Committed, but this node cannot show it yet: its submitters would
                // read state without their own write (a resumed session's queue and
                // QoS 2 ids). They are told it is unavailable here instead.
                tracing::info!(index = a.index, "forwarded write not applied here in time");
                answer(
                    a.batch,
                    Err("committed, but not applied on this node in time".to_owned()),
                );
            } else {
                waiting.push(a);
            }
        }
        let next_deadline = waiting.iter().map(|a| a.until).min();
        tokio::select! {
            biased;
            item = rx.recv(), if open => match item {
                Some(a) => waiting.push(a),
                None => open = false,
            },
            changed = metrics.changed(), if raft_running => {
                raft_running = changed.is_ok();
            }
            _ = tokio::time::sleep_until(next_deadline.unwrap_or(now)), if next_deadline.is_some() => {}
        }
    }
}

/// How long a follower waits for a new leader before retrying an unreachable one.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The first leader other than `not` this node learns of before `deadline`.
async fn await_leader(
    raft: &Raft,
    not: Option<NodeId>,
    deadline: tokio::time::Instant,
) -> Option<(NodeId, String)> {
    let mut metrics = raft.metrics();
    loop {
        if let Some(leader) = leader_of(raft).filter(|(id, _)| Some(*id) != not) {
            return Some(leader);
        }
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

/// The leader this node knows of, with its cluster address.
fn leader_of(raft: &Raft) -> Option<(NodeId, String)> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let leader = m.current_leader?;
    let node = m.membership_config.membership().get_node(&leader)?;
    Some((leader, node.addr.clone()))
}
