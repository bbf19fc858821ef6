//! Raft over gRPC: the openraft network client (one lazily connected tonic channel per
//! peer) and the tonic service that hands incoming RPCs to the local Raft.
//!
//! openraft's messages cross the wire as bincode inside `RaftPayload`; this file and
//! `cluster-proto` are the only places that see the generated types. The service only
//! decodes, calls Raft and encodes; failures to decode are `InvalidArgument`.

use std::time::Duration;

use cluster_proto::v1::raft_client::RaftClient;
use cluster_proto::v1::raft_server::{Raft as RaftRpc, RaftServer};
use cluster_proto::v1::RaftPayload;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
    InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::command::NodeId;
use super::raft::{Raft, TypeConfig};

fn encode<T: Serialize>(value: &T) -> Result<RaftPayload, bincode::Error> {
    Ok(RaftPayload {
        data: bincode::serialize(value)?,
    })
}

fn decode<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, bincode::Error> {
    bincode::deserialize(&payload.data)
}

/// Creates a [`PeerClient`] per target node.
#[derive(Clone, Default)]
pub struct Network {}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let channel = Endpoint::from_shared(format!("http://{}", node.addr))
            .map(|e| {
                e.connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .connect_lazy()
            })
            .map_err(|e| e.to_string());
        PeerClient {
            target,
            client: channel.map(RaftClient::new),
        }
    }
}

/// The Raft RPC client of one peer.
pub struct PeerClient {
    target: NodeId,
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
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other(format!("bad address of node {}: {e}", self.target)),
                )))
            }
        };
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
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
        let result: Result<Resp, RaftError<NodeId, E>> = decode(reply.get_ref())
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
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
        self.call(Rpc::Append, &rpc, option.hard_ttl()).await
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
}

impl RaftService {
    /// A tonic server for `raft`.
    pub fn server(raft: Raft) -> RaftServer<RaftService> {
        RaftServer::new(RaftService { raft }).max_decoding_message_size(64 * 1024 * 1024)
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
