//! The cluster's gRPC boundary. Here: Raft over gRPC (the openraft network client, one
//! lazily connected tonic channel per peer, and the tonic service that hands incoming
//! RPCs to the local Raft) and the Admin service (follower writes passed to the
//! leader, membership changes, a node's live figures for another node's admin API);
//! in [`forward`], the forward stream's client and
//! service.
//!
//! This module and `cluster-proto` are the only places that see the generated
//! protobuf types: nothing else in the crate names `cluster_proto`. openraft's
//! messages cross the wire as bincode inside `RaftPayload`. The services only
//! decode, call Raft and encode; failures to decode are `InvalidArgument`.

pub mod forward;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_proto::v1::admin_client::AdminClient;
use cluster_proto::v1::admin_server::{Admin as AdminRpc, AdminServer};
use cluster_proto::v1::raft_client::RaftClient;
use cluster_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
use cluster_proto::v1::RaftPayload;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::command::NodeId;
use super::membership::{self, MembershipChange};
use super::raft::{Raft, TypeConfig};
use super::stats::{NodeStats, StatsSlot};

/// The largest gRPC message a node takes from a peer (Raft, administration,
/// forwarding). Every Raft entry fits: a batch of commands stays within
/// `proposer::MAX_BATCH_BYTES` unless one command is larger, and one command holds at
/// most one message of `mqtt.max_packet_size` (at most 32 MiB).
pub const RPC_MESSAGE_LIMIT: usize = 64 << 20;

/// The most bytes of entries this node sends in one append (a single larger entry goes
/// alone): openraft waits one heartbeat interval for the answer and sends a timed-out
/// append again whole, so appends stay small enough to be answered in time.
const APPEND_LIMIT: usize = 2 << 20;

fn encode<T: Serialize>(value: &T) -> Result<RaftPayload, bincode::Error> {
    Ok(RaftPayload {
        data: bincode::serialize(value)?,
    })
}

fn decode<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, bincode::Error> {
    bincode::deserialize(&payload.data)
}

/// When each peer last answered one of this node's Raft appends (heartbeats
/// included): what the leader knows of its followers' liveness. A process that is
/// paused (SIGSTOP) still has its kernel accept connections, but its Raft answers
/// nothing, so this, not a TCP probe, says whether a node is alive.
#[derive(Clone, Default)]
pub struct PeerContacts(Arc<Mutex<HashMap<NodeId, Instant>>>);

impl PeerContacts {
    fn answered(&self, node: NodeId, at: Instant) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node, at);
    }

    /// When `node` last answered an append from this node, if it ever did.
    pub fn last_answer(&self, node: NodeId) -> Option<Instant> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .copied()
    }
}

/// Creates a [`PeerClient`] per target node.
#[derive(Clone, Default)]
pub struct Network {
    /// Shared with every client it makes.
    pub contacts: PeerContacts,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let channel = super::tls::endpoint(&node.addr).map(|e| super::tls::dial_lazy(alive(e)));
        PeerClient {
            target,
            contacts: self.contacts.clone(),
            client: channel.map(RaftClient::new),
        }
    }
}

/// A peer's endpoint that notices a dead connection: a partition can swallow a
/// connection without a reset (a black-holed route, a peer whose address moved), and
/// requests that time out do not close it. HTTP/2 pings every 5 s, answered within
/// 5 s, or the connection is dropped and the next request dials afresh; without them
/// Raft's appends to a peer behind such a connection failed long after the network
/// healed (found by the simulation, seed 2).
fn alive(endpoint: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
    endpoint
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
}

/// The Raft RPC client of one peer.
pub struct PeerClient {
    target: NodeId,
    contacts: PeerContacts,
    /// `Err` when the peer's address cannot even be parsed; every RPC then fails.
    client: Result<RaftClient<Channel>, String>,
}

type RpcErr<E> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        which: Rpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.send(which, payload, timeout).await
    }

    async fn send<Resp, E>(
        &mut self,
        which: Rpc,
        payload: RaftPayload,
        timeout: Duration,
    ) -> Result<Resp, RpcErr<E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other(format!("bad address of node {}: {e}", self.target)),
                )))
            }
        };
        let mut request = Request::new(payload);
        request.set_timeout(timeout);
        let reply = match which {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| {
            if status.code() == tonic::Code::Unavailable {
                RPCError::Unreachable(Unreachable::new(&status))
            } else {
                RPCError::Network(NetworkError::new(&status))
            }
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(reply.get_ref()).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        let payload = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let size = payload.data.len();
        if size > APPEND_LIMIT && rpc.entries.len() > 1 {
            // Raft sends again, whole, an append that failed or timed out: ask openraft
            // for fewer entries instead.
            let fit = (rpc.entries.len() as u64 * APPEND_LIMIT as u64 / size as u64).max(1);
            return Err(RPCError::PayloadTooLarge(
                openraft::error::PayloadTooLarge::new_entries_hint(fit),
            ));
        }
        let answer = self.send(Rpc::Append, payload, option.hard_ttl()).await;
        if answer.is_ok() {
            // Any answer (success or conflict) is the peer's Raft at work.
            self.contacts.answered(self.target, crate::clock::now());
        }
        answer
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call(Rpc::Snapshot, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }
}

/// The gRPC service receiving Raft RPCs for the local node.
pub struct RaftService {
    raft: Raft,
    votes: Votes,
}

/// Whether this node answers vote requests. A node that started with an empty disk
/// while the cluster already holds committed entries withholds its vote until it has
/// caught up: its empty log would let a candidate without those entries win.
#[derive(Clone, Default)]
pub struct Votes(Arc<std::sync::atomic::AtomicBool>);

impl Votes {
    /// Refuse vote requests (`true`) or answer them.
    pub fn withhold(&self, withheld: bool) {
        self.0.store(withheld, std::sync::atomic::Ordering::Release);
    }

    fn withheld(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl RaftService {
    /// A tonic server for `raft`, voting as `votes` says.
    pub fn server(raft: Raft, votes: Votes) -> RaftServer<RaftService> {
        RaftServer::new(RaftService { raft, votes }).max_decoding_message_size(RPC_MESSAGE_LIMIT)
    }
}

fn bad_request(e: bincode::Error) -> Status {
    Status::invalid_argument(format!("cannot decode raft payload: {e}"))
}

fn reply<T: Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    encode(value)
        .map(Response::new)
        .map_err(|e| Status::internal(format!("cannot encode raft payload: {e}")))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: AppendEntriesRequest<TypeConfig> =
            decode(request.get_ref()).map_err(bad_request)?;
        reply(&self.raft.append_entries(req).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        if self.votes.withheld() {
            // The candidate counts it as a node it could not reach.
            return Err(Status::unavailable(
                "started with an empty disk and still catching up: not voting yet",
            ));
        }
        let req: VoteRequest<NodeId> = decode(request.get_ref()).map_err(bad_request)?;
        reply(&self.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> =
            decode(request.get_ref()).map_err(bad_request)?;
        reply(&self.raft.install_snapshot(req).await)
    }
}

/// The gRPC service through which followers have the leader apply their batches,
/// members change the membership and other nodes read this one's figures.
pub struct AdminService {
    raft: Raft,
    stats: StatsSlot,
}

impl AdminService {
    /// A tonic server for `raft`, answering figures from `stats` once it is set.
    pub fn server(raft: Raft, stats: StatsSlot) -> AdminServer<AdminService> {
        AdminServer::new(AdminService { raft, stats }).max_decoding_message_size(RPC_MESSAGE_LIMIT)
    }
}

#[tonic::async_trait]
impl AdminRpc for AdminService {
    async fn client_write(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let mut req: super::command::Request = decode(request.get_ref()).map_err(bad_request)?;
        // One clock for every time in the log: the leader's.
        req.restamp(crate::clock::unix_ms());
        match self.raft.client_write(req).await {
            Ok(written) => {
                let mut response = written.data;
                response.log_index = written.log_id.index;
                reply(&response)
            }
            Err(e) => match e.forward_to_leader::<BasicNode>() {
                Some(fwd) => Err(Status::failed_precondition(format!(
                    "not the leader; leader is {:?}",
                    fwd.leader_id
                ))),
                None => Err(Status::internal(e.to_string())),
            },
        }
    }

    async fn change_membership(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let change: MembershipChange = decode(request.get_ref()).map_err(bad_request)?;
        let outcome: Result<String, String> = membership::change(&self.raft, change).await;
        reply(&outcome)
    }

    async fn node_stats(
        &self,
        _request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        match self.stats.get() {
            Some(source) => reply(&source.node_stats()),
            None => Err(Status::unavailable("the node is starting")),
        }
    }

    async fn capabilities(
        &self,
        _request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        match super::compat::own_capabilities() {
            Some(c) => reply(&c),
            // As a node of the release it plays answers (a test hook).
            None => Err(Status::unimplemented("Capabilities")),
        }
    }
}

/// A client of the Admin service of the node at `addr`, connected within `connect`.
async fn admin_client(addr: &str, connect: Duration) -> Result<AdminClient<Channel>, String> {
    let endpoint = super::tls::endpoint(addr)?.connect_timeout(connect);
    let channel = super::tls::dial(endpoint)
        .await
        .map_err(|e| format!("cannot reach {addr}: {e}"))?;
    Ok(AdminClient::new(channel))
}

/// What the node at `addr` reads: `None` if its release predates the question (it
/// answered UNIMPLEMENTED).
pub async fn capabilities(
    addr: &str,
    timeout: Duration,
) -> Result<Option<super::compat::Capabilities>, String> {
    let mut request = Request::new(RaftPayload::default());
    request.set_timeout(timeout);
    match admin_client(addr, timeout)
        .await?
        .capabilities(request)
        .await
    {
        Ok(reply) => decode(reply.get_ref()).map(Some).map_err(|e| e.to_string()),
        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
        Err(s) => Err(format!("{addr}: {}", s.message())),
    }
}

/// Read the figures of the node at `addr`.
pub async fn node_stats(addr: &str, timeout: Duration) -> Result<NodeStats, String> {
    let mut request = Request::new(RaftPayload::default());
    request.set_timeout(timeout);
    let reply = admin_client(addr, timeout)
        .await?
        .node_stats(request)
        .await
        .map_err(|s| format!("{addr}: {}", s.message()))?;
    decode(reply.get_ref()).map_err(|e| e.to_string())
}

/// Ask the node at `addr` to apply a membership change (it passes it to the leader).
pub async fn change_membership(
    addr: &str,
    change: &MembershipChange,
    timeout: Duration,
) -> Result<String, String> {
    let payload = encode(change).map_err(|e| e.to_string())?;
    let mut request = Request::new(payload);
    request.set_timeout(timeout);
    let reply = admin_client(addr, Duration::from_secs(2))
        .await?
        .change_membership(request)
        .await
        .map_err(|s| format!("{addr}: {}", s.message()))?;
    let outcome: Result<String, String> = decode(reply.get_ref()).map_err(|e| e.to_string())?;
    outcome
}

/// Sends batches to the leader when this node is a follower. One client per leader
/// address, reconnected lazily, and dropped after a batch went unanswered.
#[derive(Default)]
pub struct LeaderForwarder {
    client: Option<(String, AdminClient<Channel>)>,
}

/// Why a forwarded batch got no answer.
#[derive(Debug)]
pub enum ForwardError {
    /// The batch certainly was not applied: the leader could not be reached, or said
    /// it no longer leads. It may be sent to the next leader.
    NotSent(String),
    /// The batch may or may not have been applied (a timeout after sending, a failure
    /// inside the leader). Sent again with the same origin and sequence numbers, it is
    /// applied at most once.
    Uncertain(String),
}

impl LeaderForwarder {
    /// Have the node at `addr` (the leader) apply `req`.
    pub async fn forward(
        &mut self,
        addr: &str,
        req: &super::command::Request,
        timeout: Duration,
    ) -> Result<super::command::Response, ForwardError> {
        if self.client.as_ref().map(|(a, _)| a.as_str()) != Some(addr) {
            let endpoint = alive(super::tls::endpoint(addr).map_err(ForwardError::NotSent)?);
            // Closed with SO_LINGER 0: see the timeout below.
            let connector = super::tls::PeerConnector::installed().discarding_unsent();
            let channel = endpoint.connect_with_connector_lazy(connector);
            self.client = Some((addr.to_owned(), AdminClient::new(channel)));
        }
        let Some((_, client)) = self.client.as_mut() else {
            return Err(ForwardError::NotSent("no leader client".to_owned()));
        };
        let payload = encode(req).map_err(|e| ForwardError::NotSent(e.to_string()))?;
        let mut request = Request::new(payload);
        request.set_timeout(timeout);
        let reply = client.client_write(request).await;
        if let Err(status) = &reply {
            if !matches!(
                status.code(),
                tonic::Code::FailedPrecondition | tonic::Code::Unavailable
            ) {
                // No answer in time: the batch may still sit in the connection's send
                // queue, behind a network cut. Dropping the connection (closed with
                // SO_LINGER 0) throws it away, so that a write its submitter was told
                // had failed cannot reach the leader minutes later, once the network
                // heals. The next batch dials afresh.
                self.client = None;
            }
        }
        let reply = reply.map_err(|s| {
            let msg = format!("leader {addr}: {}", s.message());
            match s.code() {
                // Refused before the leader's log was touched.
                tonic::Code::FailedPrecondition => ForwardError::NotSent(msg),
                // A transport failure (the service itself never answers Unavailable):
                // mostly a refused connection to a dead leader. A connection lost after
                // the batch was sent also lands here: a resend is then recognised by
                // its origin and sequence numbers and applied once (invariant 7).
                tonic::Code::Unavailable => ForwardError::NotSent(msg),
                _ => ForwardError::Uncertain(msg),
            }
        })?;
        decode(reply.get_ref()).map_err(|e| ForwardError::Uncertain(e.to_string()))
    }
}
