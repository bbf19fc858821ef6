//! openraft's state-machine contract, with the meaning of commands left to the broker.
//!
//! Owns `last_applied`, `last_membership`, blank and membership entries, and the snapshot
//! lifecycle (build, persist, install, load at open). The broker supplies a [`Machine`]
//! that applies its own commands and (de)serializes its whole state; this module never
//! looks inside a command or a snapshot's bytes.
//!
//! Durability model ("persistent snapshot", in openraft's words): `apply` only changes
//! memory; every snapshot is written to sled's `snapshot` tree (metadata and data in one
//! atomic batch, only the latest kept) and fsynced before it is reported. At open the
//! machine is restored from that snapshot, and openraft re-applies the committed log
//! after it (the log store persists the committed id), so after a crash, `kill -9`
//! included, the machine converges back to the same state.
//!
//! State: the machine and its two log pointers sit together behind one
//! `std::sync::RwLock` in an `Arc`, so a snapshot always pairs the machine with the exact
//! `last_applied` it reflects. Writers are `apply`, `install_snapshot` and `open`; readers
//! are the snapshot builder and the broker, through the cloneable [`MachineHandle`].
//! Sections are short and synchronous (no `.await` while locked): the broker's reads are
//! closures, never guards it could keep, and only the store mutates the machine, because
//! anything else writing to it would break "the same log gives the same state".

use std::fmt::Debug;
use std::io::Cursor;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftTypeConfig,
    StorageError, StoredMembership,
};

use crate::codec::{self, KEY_SNAPSHOT_DATA, KEY_SNAPSHOT_META};
use crate::commit_clock::CommitClock;
use crate::error::{Error, ResultExt};

/// The broker's replicated state, as storage sees it: apply commands, serialize, restore.
///
/// Implementations must be deterministic: the same sequence of `apply` calls from the
/// same starting state (a fresh value, or one `restore`d from snapshot bytes) must give
/// the same state and the same responses on every node.
pub trait Machine<C: RaftTypeConfig>: Send + Sync + 'static {
    /// Why the state could not be serialized or restored.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Applies one normal entry's command, committed at `log_id`, and returns the
    /// response openraft hands back to the proposer. No clock, no randomness, no I/O.
    fn apply(&mut self, log_id: &LogId<C::NodeId>, cmd: &C::D) -> C::R;

    /// How long to hold back a batch holding `cmd` before applying it, without the
    /// state's lock (so that readers meanwhile see the state without it): a fault hook
    /// for tests, a follower applying late. None by default.
    fn apply_delay(_cmd: &C::D) -> Option<std::time::Duration> {
        None
    }

    /// Serializes the whole state; called while building a snapshot.
    fn snapshot(&self) -> Result<Vec<u8>, Self::Error>;

    /// Replaces the whole state with the one serialized in `data` (from [`Machine::snapshot`],
    /// possibly on another node). On error, leave the state as it was: the store then
    /// reports a storage error and keeps its old `last_applied` (openraft stops the node).
    fn restore(&mut self, data: &[u8]) -> Result<(), Self::Error>;

    /// Called once at open, after any snapshot is restored, with the committed log id the
    /// log store had saved before this process started: openraft is about to re-apply
    /// the log up to it, entries this machine (in an earlier process) has most likely
    /// applied already. A machine with side effects outside its state (messages sent,
    /// connections closed) can use it to hold them back for those entries, so a restart
    /// does not repeat them. The state itself must still be rebuilt by `apply`.
    fn recovering(&mut self, _committed: Option<&LogId<C::NodeId>>) {}
}

/// The machine together with the log pointers it reflects.
struct Applied<C: RaftTypeConfig, M> {
    /// The broker's state.
    machine: M,
    /// The last entry folded into `machine` (or the snapshot it was restored from).
    last_applied: Option<LogId<C::NodeId>>,
    /// The membership in force as of `last_applied`.
    last_membership: StoredMembership<C::NodeId, C::Node>,
}

/// Shared pieces of a [`StateMachineStore`]; its snapshot builders and handles hold the same.
struct Shared<C: RaftTypeConfig, M> {
    /// The machine and its log pointers, under one lock so they never disagree.
    applied: RwLock<Applied<C, M>>,
    /// The `snapshot` tree: keys `meta` and `data`, the latest snapshot only.
    snapshots: sled::Tree,
    /// Serializes snapshot writes so an older build never overwrites a newer install.
    persist_lock: Mutex<()>,
    /// Source of unique, restart-proof snapshot ids (`sled::Db::generate_id`).
    db: sled::Db,
}

impl<C: RaftTypeConfig, M> Shared<C, M> {
    fn read(&self) -> Result<RwLockReadGuard<'_, Applied<C, M>>, Error> {
        self.applied.read().map_err(|_| Error::Poisoned)
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, Applied<C, M>>, Error> {
        self.applied.write().map_err(|_| Error::Poisoned)
    }
}

/// A persisted snapshot: its metadata and the machine's bytes.
struct StoredSnapshot<C: RaftTypeConfig> {
    meta: SnapshotMeta<C::NodeId, C::Node>,
    data: Vec<u8>,
}

/// Reads the latest persisted snapshot, if any.
fn load_snapshot<C: RaftTypeConfig>(tree: &sled::Tree) -> Result<Option<StoredSnapshot<C>>, Error> {
    let meta = tree.get(KEY_SNAPSHOT_META)?;
    let data = tree.get(KEY_SNAPSHOT_DATA)?;
    match (meta, data) {
        (None, None) => Ok(None),
        (Some(meta), Some(data)) => Ok(Some(StoredSnapshot {
            meta: codec::decode("snapshot meta", &meta)?,
            data: data.to_vec(),
        })),
        (Some(_), None) => Err(Error::IncompleteSnapshot("metadata without data")),
        (None, Some(_)) => Err(Error::IncompleteSnapshot("data without metadata")),
    }
}

/// Writes `snapshot` as the latest one and fsyncs, unless a newer one is already stored.
/// Blocking: call it from `spawn_blocking`.
fn persist_snapshot<C: RaftTypeConfig, M>(
    shared: &Shared<C, M>,
    snapshot: &StoredSnapshot<C>,
) -> Result<(), Error> {
    let _guard = shared.persist_lock.lock().map_err(|_| Error::Poisoned)?;
    if let Some(current) = shared.snapshots.get(KEY_SNAPSHOT_META)? {
        let current: SnapshotMeta<C::NodeId, C::Node> = codec::decode("snapshot meta", &current)?;
        if current.last_log_id > snapshot.meta.last_log_id {
            tracing::debug!(kept = %current, dropped = %snapshot.meta, "a newer snapshot is already stored");
            return Ok(());
        }
    }
    let mut batch = sled::Batch::default();
    batch.insert(
        KEY_SNAPSHOT_META,
        codec::encode("snapshot meta", &snapshot.meta)?,
    );
    batch.insert(KEY_SNAPSHOT_DATA, snapshot.data.as_slice());
    shared.snapshots.apply_batch(batch)?;
    shared.snapshots.flush()?;
    Ok(())
}

/// openraft's `RaftStateMachine` over a broker [`Machine`], with snapshots kept in sled.
///
/// Built by [`crate::open`]; hand it to `openraft::Raft::new` after taking a
/// [`StateMachineStore::machine`] handle for the broker's reads.
pub struct StateMachineStore<C: RaftTypeConfig, M> {
    /// Shared with snapshot builders and [`MachineHandle`]s.
    shared: Arc<Shared<C, M>>,
    /// When the entries it applies were committed (the log store notes it).
    clock: CommitClock,
}

/// Read access to the broker's machine, cheap to clone, shared with the state-machine store.
///
/// Reads take the machine's read lock for the duration of a closure; they wait for an
/// `apply` batch in progress and never observe half of one.
pub struct MachineHandle<C: RaftTypeConfig, M> {
    /// The store's shared state.
    shared: Arc<Shared<C, M>>,
}

impl<C: RaftTypeConfig, M> Clone for MachineHandle<C, M> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C: RaftTypeConfig, M> Debug for MachineHandle<C, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineHandle").finish_non_exhaustive()
    }
}

impl<C: RaftTypeConfig, M> MachineHandle<C, M> {
    /// Runs `f` on the machine under its read lock and returns what `f` returns.
    ///
    /// Keep `f` short and synchronous: `apply` waits while it runs.
    pub fn read<T>(&self, f: impl FnOnce(&M) -> T) -> Result<T, StorageError<C::NodeId>> {
        let applied = self
            .shared
            .read()
            .sto(ErrorSubject::StateMachine, ErrorVerb::Read)?;
        Ok(f(&applied.machine))
    }

    /// Like [`MachineHandle::read`], also passing the last applied log id the machine
    /// reflects (e.g. to compare digests of nodes at the same index).
    pub fn read_at<T>(
        &self,
        f: impl FnOnce(&M, Option<&LogId<C::NodeId>>) -> T,
    ) -> Result<T, StorageError<C::NodeId>> {
        let applied = self
            .shared
            .read()
            .sto(ErrorSubject::StateMachine, ErrorVerb::Read)?;
        Ok(f(&applied.machine, applied.last_applied.as_ref()))
    }

    /// The last log id applied to the machine.
    pub fn last_applied(&self) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        let applied = self
            .shared
            .read()
            .sto(ErrorSubject::StateMachine, ErrorVerb::Read)?;
        Ok(applied.last_applied.clone())
    }
}

impl<C, M> StateMachineStore<C, M>
where
    C: RaftTypeConfig<Entry = Entry<C>, SnapshotData = Cursor<Vec<u8>>>,
    C::R: Default,
    M: Machine<C>,
{
    /// Builds the store over the `snapshot` tree, restoring `machine` from the persisted
    /// snapshot if there is one. Blocking.
    pub(crate) fn open(
        db: sled::Db,
        snapshots: sled::Tree,
        mut machine: M,
        committed: Option<LogId<C::NodeId>>,
        clock: CommitClock,
    ) -> Result<Self, StorageError<C::NodeId>> {
        let mut last_applied = None;
        let mut last_membership = StoredMembership::default();
        if let Some(snapshot) =
            load_snapshot::<C>(&snapshots).sto(ErrorSubject::Snapshot(None), ErrorVerb::Read)?
        {
            let signature = Some(snapshot.meta.signature());
            machine
                .restore(&snapshot.data)
                .map_err(|e| Error::Machine(e.to_string()))
                .sto(ErrorSubject::Snapshot(signature), ErrorVerb::Read)?;
            tracing::info!(snapshot = %snapshot.meta, "state machine restored from snapshot");
            last_applied = snapshot.meta.last_log_id;
            last_membership = snapshot.meta.last_membership;
        }
        machine.recovering(committed.as_ref());
        Ok(Self {
            shared: Arc::new(Shared {
                applied: RwLock::new(Applied {
                    machine,
                    last_applied,
                    last_membership,
                }),
                snapshots,
                persist_lock: Mutex::new(()),
                db,
            }),
            clock,
        })
    }

    /// A cloneable handle through which the broker reads the machine.
    pub fn machine(&self) -> MachineHandle<C, M> {
        MachineHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C: RaftTypeConfig, M> Debug for StateMachineStore<C, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore").finish_non_exhaustive()
    }
}

/// Builds snapshots from a point-in-time copy of the machine's serialization.
pub struct SnapshotBuilder<C: RaftTypeConfig, M> {
    /// The store's shared state.
    shared: Arc<Shared<C, M>>,
    /// Ties the builder to its type config.
    _config: PhantomData<C>,
}

impl<C, M> RaftSnapshotBuilder<C> for SnapshotBuilder<C, M>
where
    C: RaftTypeConfig<Entry = Entry<C>, SnapshotData = Cursor<Vec<u8>>>,
    C::R: Default,
    M: Machine<C>,
{
    async fn build_snapshot(&mut self) -> Result<Snapshot<C>, StorageError<C::NodeId>> {
        let started = std::time::Instant::now();
        let shared = Arc::clone(&self.shared);
        // Serializing and fsyncing block: keep them off the async workers.
        let stored = crate::io::blocking(
            move || -> Result<StoredSnapshot<C>, StorageError<C::NodeId>> {
                let (data, last_log_id, last_membership) = {
                    let applied = shared
                        .read()
                        .sto(ErrorSubject::StateMachine, ErrorVerb::Read)?;
                    let data = applied
                        .machine
                        .snapshot()
                        .map_err(|e| Error::Machine(e.to_string()))
                        .sto(ErrorSubject::StateMachine, ErrorVerb::Read)?;
                    (
                        data,
                        applied.last_applied.clone(),
                        applied.last_membership.clone(),
                    )
                };
                let id = shared
                    .db
                    .generate_id()
                    .sto(ErrorSubject::Snapshot(None), ErrorVerb::Write)?;
                let snapshot_id = match &last_log_id {
                    Some(log_id) => format!("{}-{}-{id}", log_id.leader_id, log_id.index),
                    None => format!("none-{id}"),
                };
                let stored = StoredSnapshot {
                    meta: SnapshotMeta {
                        last_log_id,
                        last_membership,
                        snapshot_id,
                    },
                    data,
                };
                let signature = Some(stored.meta.signature());
                persist_snapshot(&shared, &stored)
                    .sto(ErrorSubject::Snapshot(signature), ErrorVerb::Write)?;
                Ok(stored)
            },
        )
        .await
        .sto(ErrorSubject::Snapshot(None), ErrorVerb::Write)??;
        metrics::counter!("flockmq_raft_snapshots_total", "kind" => "built").increment(1);
        metrics::histogram!("flockmq_raft_snapshot_duration_seconds", "kind" => "built")
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("flockmq_raft_snapshot_bytes").set(stored.data.len() as f64);
        tracing::info!(snapshot = %stored.meta, bytes = stored.data.len(), "snapshot built");
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl<C, M> RaftStateMachine<C> for StateMachineStore<C, M>
where
    C: RaftTypeConfig<Entry = Entry<C>, SnapshotData = Cursor<Vec<u8>>>,
    C::R: Default,
    M: Machine<C>,
{
    type SnapshotBuilder = SnapshotBuilder<C, M>;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<C::NodeId>>,
            StoredMembership<C::NodeId, C::Node>,
        ),
        StorageError<C::NodeId>,
    > {
        let applied = self
            .shared
            .read()
            .sto(ErrorSubject::StateMachine, ErrorVerb::Read)?;
        Ok((
            applied.last_applied.clone(),
            applied.last_membership.clone(),
        ))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<C::R>, StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<C::Entry> = entries.into_iter().collect();
        let delay = entries
            .iter()
            .filter_map(|e| match &e.payload {
                EntryPayload::Normal(cmd) => M::apply_delay(cmd),
                _ => None,
            })
            .max();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut applied = self
            .shared
            .write()
            .sto(ErrorSubject::StateMachine, ErrorVerb::Write)?;
        let applied = &mut *applied;
        let mut responses = Vec::new();
        for entry in entries {
            let response = match &entry.payload {
                EntryPayload::Blank => C::R::default(),
                EntryPayload::Normal(cmd) => applied.machine.apply(&entry.log_id, cmd),
                EntryPayload::Membership(membership) => {
                    applied.last_membership =
                        StoredMembership::new(Some(entry.log_id.clone()), membership.clone());
                    C::R::default()
                }
            };
            applied.last_applied = Some(entry.log_id);
            responses.push(response);
        }
        if let Some(last) = &applied.last_applied {
            let lag = metrics::histogram!("flockmq_raft_commit_to_apply_seconds");
            for waited in self.clock.applied(last.index) {
                lag.record(waited.as_secs_f64());
            }
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: Arc::clone(&self.shared),
            _config: PhantomData,
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<C::NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<C::NodeId, C::Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        let started = std::time::Instant::now();
        let stored = StoredSnapshot::<C> {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        let shared = Arc::clone(&self.shared);
        crate::io::blocking(move || -> Result<(), StorageError<C::NodeId>> {
            let signature = Some(stored.meta.signature());
            {
                // Restore first: bytes the machine rejects are never persisted.
                let mut applied = shared
                    .write()
                    .sto(ErrorSubject::StateMachine, ErrorVerb::Write)?;
                applied
                    .machine
                    .restore(&stored.data)
                    .map_err(|e| Error::Machine(e.to_string()))
                    .sto(ErrorSubject::Snapshot(signature.clone()), ErrorVerb::Read)?;
                applied.last_applied = stored.meta.last_log_id.clone();
                applied.last_membership = stored.meta.last_membership.clone();
            }
            persist_snapshot(&shared, &stored)
                .sto(ErrorSubject::Snapshot(signature), ErrorVerb::Write)?;
            metrics::counter!("flockmq_raft_snapshots_total", "kind" => "installed").increment(1);
            metrics::histogram!("flockmq_raft_snapshot_duration_seconds", "kind" => "installed")
                .record(started.elapsed().as_secs_f64());
            tracing::info!(snapshot = %stored.meta, "snapshot installed");
            Ok(())
        })
        .await
        .sto(
            ErrorSubject::Snapshot(Some(meta.signature())),
            ErrorVerb::Write,
        )??;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<C>>, StorageError<C::NodeId>> {
        let stored = load_snapshot::<C>(&self.shared.snapshots)
            .sto(ErrorSubject::Snapshot(None), ErrorVerb::Read)?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
