//! What survives a crash or a reopen: the log, the vote, the committed id, purges,
//! truncations and snapshots; and what the machine looks like when the store reopens.
//!
//! "Crash" tests re-run themselves as a child process that writes through the public API
//! and then calls `abort()` (no destructors, no flush: what `kill -9` leaves behind); the
//! parent reopens the same directory and checks that everything acknowledged is there.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{
    blank, crash_child_dir, crash_now, log_id, membership, run_crashing_child, set, snapshot_bytes,
    KvConfig, KvMachine,
};
use openraft::storage::{
    RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine,
};
use openraft::{Membership, SnapshotMeta, StoredMembership, Vote};
use storage::{LogStore, StateMachineStore};
use tokio::io::AsyncWriteExt;

type Stores = (LogStore<KvConfig>, StateMachineStore<KvConfig, KvMachine>);

fn open(dir: &Path) -> Stores {
    common::reopen(&dir.join("db"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a tokio runtime")
}

fn kv(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn acknowledged_entries_vote_and_committed_survive_a_crash() {
    if let Some(dir) = crash_child_dir() {
        // The stores stay alive through the abort, as in a killed process.
        let _alive = runtime().block_on(async {
            let (mut log, sm) = open(&dir);
            log.blocking_append([blank(0, 0), blank(1, 1), set(1, 2, "a", "1")])
                .await
                .unwrap();
            log.blocking_append([set(1, 3, "b", "2"), set(2, 4, "c", "3")])
                .await
                .unwrap();
            // `save_committed` does not fsync by design; the vote's flush right after it
            // makes it durable, as any later append or vote does in a running node.
            log.save_committed(Some(log_id(2, 4))).await.unwrap();
            log.save_vote(&Vote::new_committed(2, 0)).await.unwrap();
            (log, sm)
        });
        crash_now(&dir);
    }

    let dir = tempfile::tempdir().unwrap();
    run_crashing_child(
        "acknowledged_entries_vote_and_committed_survive_a_crash",
        dir.path(),
    );

    runtime().block_on(async {
        let (mut log, _sm) = open(dir.path());
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new_committed(2, 0))
        );
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 4)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(2, 4)));
        assert_eq!(state.last_purged_log_id, None);
        let entries = log.try_get_log_entries(..).await.unwrap();
        let expected = vec![
            blank(0, 0),
            blank(1, 1),
            set(1, 2, "a", "1"),
            set(1, 3, "b", "2"),
            set(2, 4, "c", "3"),
        ];
        assert_eq!(entries, expected);
    });
}

#[test]
fn machine_restarts_at_the_last_snapshot_after_a_crash() {
    if let Some(dir) = crash_child_dir() {
        // The stores stay alive through the abort, as in a killed process.
        let _alive = runtime().block_on(async {
            let (log, mut sm) = open(&dir);
            sm.apply([
                membership(1, 1, &[1, 2, 3]),
                set(1, 2, "a", "1"),
                set(1, 3, "b", "2"),
            ])
            .await
            .unwrap();
            let snapshot = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 3)));
            // Applied after the snapshot: memory only, gone in the crash, re-applied from
            // the log by openraft in a real restart.
            sm.apply([set(1, 4, "c", "3")]).await.unwrap();
            (log, sm)
        });
        crash_now(&dir);
    }

    let dir = tempfile::tempdir().unwrap();
    run_crashing_child(
        "machine_restarts_at_the_last_snapshot_after_a_crash",
        dir.path(),
    );

    runtime().block_on(async {
        let (_log, mut sm) = open(dir.path());
        let handle = sm.machine();
        assert_eq!(
            handle.read(|m| m.data.clone()).unwrap(),
            kv(&[("a", "1"), ("b", "2")])
        );
        let (last_applied, last_membership) = sm.applied_state().await.unwrap();
        assert_eq!(last_applied, Some(log_id(1, 3)));
        assert_eq!(
            last_membership,
            StoredMembership::new(
                Some(log_id(1, 1)),
                Membership::new(vec![[1, 2, 3].into()], None)
            )
        );
        assert_eq!(handle.last_applied().unwrap(), Some(log_id(1, 3)));
        let current = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("persisted snapshot");
        assert_eq!(current.meta.last_log_id, Some(log_id(1, 3)));
        let mut file = current.snapshot;
        assert_eq!(
            serde_json::from_slice::<BTreeMap<String, String>>(&snapshot_bytes(&mut file).await)
                .unwrap(),
            kv(&[("a", "1"), ("b", "2")])
        );
    });
}

#[test]
fn purge_removes_entries_and_reports_last_purged_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let (mut log, _sm) = open(dir.path());
        log.blocking_append((0..10).map(|i| blank(1, i)))
            .await
            .unwrap();
        log.purge(log_id(1, 4)).await.unwrap();

        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
        assert_eq!(state.last_log_id, Some(log_id(1, 9)));
        let indexes: Vec<u64> = log
            .try_get_log_entries(..)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(indexes, vec![5, 6, 7, 8, 9]);
    });

    runtime().block_on(async {
        let (mut log, _sm) = open(dir.path());
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
        assert_eq!(state.last_log_id, Some(log_id(1, 9)));
        assert!(log.try_get_log_entries(0..5).await.unwrap().is_empty());

        // Purging everything leaves the purge point as the last log id.
        log.purge(log_id(1, 9)).await.unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 9)));
        assert_eq!(state.last_log_id, Some(log_id(1, 9)));
    });
}

#[test]
fn truncate_removes_entries_from_the_index_on_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let (mut log, _sm) = open(dir.path());
        log.blocking_append((0..10).map(|i| blank(1, i)))
            .await
            .unwrap();
        log.truncate(log_id(1, 6)).await.unwrap();
        // A new leader's entries replace the truncated ones.
        log.blocking_append([blank(2, 6)]).await.unwrap();
    });
    runtime().block_on(async {
        let (mut log, _sm) = open(dir.path());
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(2, 6)));
        let ids: Vec<_> = log
            .try_get_log_entries(4..)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.log_id)
            .collect();
        assert_eq!(ids, vec![log_id(1, 4), log_id(1, 5), log_id(2, 6)]);
    });
}

#[test]
fn log_reads_honour_inclusive_exclusive_and_open_bounds() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let (mut log, _sm) = open(dir.path());
        log.blocking_append((0..6).map(|i| blank(1, i)))
            .await
            .unwrap();
        let indexes = |entries: Vec<openraft::Entry<KvConfig>>| {
            entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>()
        };
        assert_eq!(
            indexes(log.try_get_log_entries(2..4).await.unwrap()),
            vec![2, 3]
        );
        assert_eq!(
            indexes(log.try_get_log_entries(2..=4).await.unwrap()),
            vec![2, 3, 4]
        );
        assert_eq!(
            indexes(log.try_get_log_entries(..2).await.unwrap()),
            vec![0, 1]
        );
        assert_eq!(
            indexes(log.try_get_log_entries(4..).await.unwrap()),
            vec![4, 5]
        );
        assert_eq!(
            indexes(log.try_get_log_entries(4..100).await.unwrap()),
            vec![4, 5]
        );
        assert!(log.try_get_log_entries(3..3).await.unwrap().is_empty());
        assert!(log.try_get_log_entries(10..20).await.unwrap().is_empty());
    });
}

#[test]
fn installed_snapshot_replaces_the_machine_and_survives_reopen() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let (_log_l, mut leader) = open(leader_dir.path());
        leader
            .apply([membership(1, 1, &[1]), set(1, 2, "x", "leader")])
            .await
            .unwrap();
        let mut snapshot = leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();

        let (_log_f, mut follower) = open(follower_dir.path());
        follower
            .apply([set(1, 1, "stale", "follower")])
            .await
            .unwrap();
        let handle = follower.machine();
        let mut receiving = follower.begin_receiving_snapshot().await.unwrap();
        // As openraft does, in chunks of the file.
        for chunk in snapshot_bytes(&mut snapshot.snapshot).await.chunks(3) {
            receiving.write_all(chunk).await.unwrap();
        }
        follower
            .install_snapshot(&snapshot.meta, receiving)
            .await
            .unwrap();

        assert_eq!(
            handle.read(|m| m.data.clone()).unwrap(),
            kv(&[("x", "leader")])
        );
        assert_eq!(handle.last_applied().unwrap(), Some(log_id(1, 2)));
        let current = follower
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("installed snapshot");
        assert_eq!(current.meta, snapshot.meta);
    });
    runtime().block_on(async {
        let (_log, mut sm) = open(follower_dir.path());
        assert_eq!(
            sm.machine().read(|m| m.data.clone()).unwrap(),
            kv(&[("x", "leader")])
        );
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 2)));
    });
}

#[test]
fn snapshot_the_machine_cannot_restore_is_rejected_and_not_persisted() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let (_log, mut sm) = open(dir.path());
        sm.apply([set(1, 1, "kept", "yes")]).await.unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(3, 9)),
            last_membership: StoredMembership::default(),
            snapshot_id: "garbage".to_owned(),
        };
        let mut garbage = sm.begin_receiving_snapshot().await.unwrap();
        garbage.write_all(b"not json").await.unwrap();
        let result = sm.install_snapshot(&meta, garbage).await;
        assert!(result.is_err(), "garbage snapshot was accepted");
        assert!(sm.get_current_snapshot().await.unwrap().is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("db/raft-snapshots"))
                .unwrap()
                .count(),
            0,
            "the rejected snapshot's file is gone"
        );
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 1)));
    });
}

#[test]
fn apply_answers_each_entry_and_the_handle_sees_the_result() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let (_log, mut sm) = open(dir.path());
        let handle = sm.machine();
        let replies = sm
            .apply([
                blank(1, 1),
                set(1, 2, "k", "v1"),
                membership(1, 3, &[1]),
                set(1, 4, "k", "v2"),
            ])
            .await
            .unwrap();
        let previous: Vec<Option<String>> = replies.into_iter().map(|r| r.previous).collect();
        assert_eq!(previous, vec![None, None, None, Some("v1".to_owned())]);
        let (data, at) = handle
            .read_at(|m, at| (m.data.clone(), at.cloned()))
            .unwrap();
        assert_eq!(data, kv(&[("k", "v2")]));
        assert_eq!(at, Some(log_id(1, 4)));
    });
}

/// A store of an earlier release kept the snapshot's bytes in the `snapshot` tree; the
/// first open moves them into a file, restores from it, and the tree no longer holds them.
#[test]
fn a_snapshot_kept_in_the_tree_by_an_earlier_release_moves_into_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let meta = SnapshotMeta::<u64, openraft::BasicNode> {
        last_log_id: Some(log_id(2, 5)),
        last_membership: StoredMembership::new(
            Some(log_id(1, 1)),
            Membership::new(vec![[1].into()], None),
        ),
        snapshot_id: "T2-N0-5-1".to_owned(),
    };
    {
        let db = sled::open(dir.path().join("db")).unwrap();
        let tree = db.open_tree("snapshot").unwrap();
        tree.insert("meta", bincode::serialize(&meta).unwrap())
            .unwrap();
        tree.insert(
            "data",
            serde_json::to_vec(&kv(&[("old", "release")])).unwrap(),
        )
        .unwrap();
        db.flush().unwrap();
    }
    runtime().block_on(async {
        let (_log, mut sm) = open(dir.path());
        assert_eq!(
            sm.machine().read(|m| m.data.clone()).unwrap(),
            kv(&[("old", "release")])
        );
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(2, 5)));
        let mut current = sm.get_current_snapshot().await.unwrap().expect("snapshot");
        assert_eq!(current.meta, meta);
        assert_eq!(
            snapshot_bytes(&mut current.snapshot).await,
            serde_json::to_vec(&kv(&[("old", "release")])).unwrap()
        );
    });
    let db = sled::open(dir.path().join("db")).unwrap();
    let tree = db.open_tree("snapshot").unwrap();
    assert!(
        tree.get("data").unwrap().is_none(),
        "the bytes left the tree"
    );
    assert!(tree.get("meta").unwrap().is_some());
}
