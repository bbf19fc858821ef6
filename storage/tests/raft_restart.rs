//! A real single-voter openraft node on these stores: after a crash, restarting it brings
//! the machine back to the last snapshot and openraft re-applies the log after it, so
//! every acknowledged write is visible again.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{crash_child_dir, crash_now, run_crashing_child, KvCommand, KvConfig, KvMachine};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};

/// A network for a cluster of one: there is never a peer to reach.
struct NoPeers;

/// The error every RPC to a (non-existent) peer returns.
fn no_peer<E: std::error::Error>() -> RPCError<u64, BasicNode, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(
        "single-node test cluster has no peers",
    )))
}

impl RaftNetwork<KvConfig> for NoPeers {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<KvConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(no_peer())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<KvConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        Err(no_peer())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(no_peer())
    }
}

impl RaftNetworkFactory<KvConfig> for NoPeers {
    type Network = NoPeers;

    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> NoPeers {
        NoPeers
    }
}

const NODE: u64 = 1;
const WAIT: Option<Duration> = Some(Duration::from_secs(10));

async fn start(dir: &Path) -> (Raft<KvConfig>, storage::MachineHandle<KvConfig, KvMachine>) {
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        // Snapshots only when the test asks, so it knows what the snapshot holds.
        snapshot_policy: SnapshotPolicy::Never,
        // Purge the log up to each snapshot, so after a restart the snapshot is the only
        // source of the writes it covers.
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    let config = Arc::new(config.validate().expect("valid raft config"));
    let (log, sm) = common::reopen(&dir.join("db"));
    let machine = sm.machine();
    let raft = Raft::new(NODE, config, NoPeers, log, sm)
        .await
        .expect("start raft");
    (raft, machine)
}

async fn write(raft: &Raft<KvConfig>, key: &str, value: &str) -> u64 {
    let reply = raft
        .client_write(KvCommand::Set {
            key: key.to_owned(),
            value: value.to_owned(),
        })
        .await
        .expect("write acknowledged");
    reply.log_id.index
}

#[test]
fn restarted_node_replays_the_log_after_its_snapshot_after_a_crash() {
    if let Some(dir) = crash_child_dir() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        // Raft and its stores stay alive through the abort, as in a killed process.
        let _alive = runtime.block_on(async {
            let (raft, _machine) = start(&dir).await;
            raft.initialize(BTreeMap::from([(NODE, BasicNode::new("127.0.0.1:0"))]))
                .await
                .expect("initialize");
            raft.wait(WAIT)
                .current_leader(NODE, "node leads itself")
                .await
                .expect("elected");
            write(&raft, "a", "1").await;
            let snapshot_at = write(&raft, "b", "2").await;
            raft.trigger().snapshot().await.expect("trigger snapshot");
            raft.wait(WAIT)
                .metrics(
                    |m| {
                        m.snapshot.map(|s| s.index) == Some(snapshot_at)
                            && m.purged.map(|p| p.index) == Some(snapshot_at)
                    },
                    "snapshot covers the first writes and the log below it is purged",
                )
                .await
                .expect("snapshot built");
            write(&raft, "b", "3").await;
            write(&raft, "c", "4").await;
            raft
        });
        crash_now(&dir);
    }

    let dir = tempfile::tempdir().unwrap();
    run_crashing_child(
        "restarted_node_replays_the_log_after_its_snapshot_after_a_crash",
        dir.path(),
    );

    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let (raft, machine) = start(dir.path()).await;
        let expected: BTreeMap<String, String> = [("a", "1"), ("b", "3"), ("c", "4")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Restored from the snapshot, then the log after it applied again (at once from the
        // persisted committed id, or once the node re-elects itself and commits).
        raft.wait(WAIT)
            .metrics(
                |_| machine.read(|m| m.data == expected).unwrap_or(false),
                "machine holds every acknowledged write",
            )
            .await
            .expect("all writes re-applied");
        let metrics = raft.metrics().borrow().clone();
        let snapshot_at = metrics.snapshot.expect("snapshot was persisted").index;
        assert_eq!(
            metrics.purged.map(|p| p.index),
            Some(snapshot_at),
            "the writes up to the snapshot came from the snapshot, not the log"
        );
        assert!(snapshot_at >= 2, "snapshot covers the first writes");
        raft.shutdown().await.expect("shutdown");
    });
}
