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
//! channel sender ([`Proposer`] is a cheap clone).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use super::command::{Command, CommandResult, NodeId, Request, Response};
use super::network::{ForwardError, LeaderForwarder};
use super::raft::Raft;

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

type Pending = (
    Command,
    oneshot::Sender<Result<CommandResult, ProposeError>>,
);

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
    /// Longest a command waits for companions.
    pub max_delay: Duration,
    /// Longest a command waits to be committed before the submitter gets `Unavailable`.
    pub write_timeout: Duration,
    /// Batches in flight at once.
    pub max_in_flight: usize,
    /// This node, to tell whether it leads.
    pub node_id: NodeId,
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
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((cmd, tx))
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
    let mut forwarder = LeaderForwarder::default();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            first = rx.recv() => match first {
                Some(p) => p,
                None => break,
            },
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + settings.max_delay;
        while batch.len() < settings.max_commands {
            // Take what is already waiting without a timer, then wait out the delay.
            match rx.try_recv() {
                Ok(p) => {
                    batch.push(p);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                Ok(None) | Err(_) => break,
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (commands, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        metrics::histogram!("flockmq_raft_batch_commands").record(commands.len() as f64);
        let started = std::time::Instant::now();
        let request = Request { commands };
        let deadline = tokio::time::Instant::now() + settings.write_timeout;
        let Some(leader) = await_leader(&raft, None, deadline).await else {
            drop(permit);
            answer(replies, Err("no leader elected in time".to_owned()));
            continue;
        };
        if leader.0 != own_id {
            // A follower: the leader applies the batch. Forwarded one at a time, so
            // batches stay in submission order.
            match forward(&raft, &mut forwarder, leader, &request, deadline).await {
                Forwarded::Done(outcome) => {
                    metrics::histogram!("flockmq_raft_proposal_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    drop(permit);
                    answer(replies, outcome);
                    continue;
                }
                // Nothing later was appended meanwhile: appending it here keeps order.
                Forwarded::NowLeader => {}
            }
        }
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
            answer(replies, outcome.map(|r| r.data));
        });
    }
}

type Reply = oneshot::Sender<Result<CommandResult, ProposeError>>;

/// Hand every submitter its own result, or the batch's error.
fn answer(replies: Vec<Reply>, outcome: Result<Response, String>) {
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

/// Forward `request` to `leader`; while the leader cannot be reached or says it no
/// longer leads (an election is under way), wait for the next leader and try it,
/// until `deadline`. A batch whose delivery is uncertain (the call timed out after
/// being sent) is not sent again.
async fn forward(
    raft: &Raft,
    forwarder: &mut LeaderForwarder,
    mut leader: (NodeId, String),
    request: &Request,
    deadline: tokio::time::Instant,
) -> Forwarded {
    let own_id = raft.metrics().borrow().id;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match forwarder.forward(&leader.1, request, left).await {
            Ok(response) => return Forwarded::Done(Ok(response)),
            Err(ForwardError::Uncertain(e)) => return Forwarded::Done(Err(e)),
            Err(ForwardError::NotSent(e)) => {
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
