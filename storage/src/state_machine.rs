//! openraft's state-machine contract, with the meaning of commands left to the broker.
//!
//! Owns `last_applied`, `last_membership`, blank and membership entries, and the snapshot
//! lifecycle (build, persist, install, load at open). The broker supplies a [`Machine`]
//! that applies its own commands and (de)serializes its whole state; this module never
//! looks inside a command or a snapshot's bytes.
//!
//! Durability model ("persistent snapshot", in openraft's words): `apply` only changes
//! memory; every snapshot is written to a file of its own ([`crate::snapshot_file`]),
//! fsynced, and then named in sled's `snapshot` tree (only the latest kept), before it is
//! reported. The machine is serialized into that file and restored from it as a stream:
//! no step (build, send, receive, install, load) holds the snapshot's bytes in memory
//! whole. At open the
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
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
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
use crate::snapshot_file::{SnapshotDir, SnapshotFile};

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

    /// Serializes the whole state into `out` (a buffered snapshot file) while building a
    /// snapshot. Write it as a stream: the state may be larger than a second copy of
    /// it in memory could be.
    fn snapshot(&self, out: &mut dyn Write) -> Result<(), Self::Error>;

    /// Replaces the whole state with the one serialized in `input` (by
    /// [`Machine::snapshot`], possibly on another node), read as a stream of `len`
    /// bytes: no length read from it can be honest beyond that, so a decoder can refuse
    /// one before allocating it. On error, leave the state as it was: the store then
    /// reports a storage error and keeps its old `last_applied` (openraft stops the node).
    fn restore(&mut self, input: &mut dyn Read, len: u64) -> Result<(), Self::Error>;

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

/// A snapshot's metadata under config `C`.
type Meta<C> = SnapshotMeta<<C as RaftTypeConfig>::NodeId, <C as RaftTypeConfig>::Node>;

/// Shared pieces of a [`StateMachineStore`]; its snapshot builders and handles hold the same.
struct Shared<C: RaftTypeConfig, M> {
    /// The machine and its log pointers, under one lock so they never disagree.
    applied: RwLock<Applied<C, M>>,
    /// The `snapshot` tree: key `meta`, the latest snapshot's metadata.
    snapshots: sled::Tree,
    /// The snapshot files; the one `meta` names is the latest snapshot.
    files: SnapshotDir,
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

    /// The latest persisted snapshot's metadata, if any.
    fn current_meta(&self) -> Result<Option<Meta<C>>, Error> {
        self.snapshots
            .get(KEY_SNAPSHOT_META)?
            .map(|meta| codec::decode("snapshot meta", &meta))
            .transpose()
    }
}

impl<C: RaftTypeConfig<SnapshotData = SnapshotFile>, M> Shared<C, M> {
    /// The latest persisted snapshot, its file open at the start. Under the persist
    /// lock: a snapshot persisted meanwhile would remove the file the metadata names.
    fn current(&self) -> Result<Option<Snapshot<C>>, Error> {
        let _guard = self.persist_lock.lock().map_err(|_| Error::Poisoned)?;
        match self.current_meta()? {
            None => Ok(None),
            Some(meta) => {
                let file = self.files.read(&meta.snapshot_id)?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(file),
                }))
            }
        }
    }

    /// Makes `file` the latest snapshot, `meta`: fsynced and renamed, then named in the
    /// `snapshot` tree and flushed, then older files removed; unless a newer one is
    /// already stored, when `file` is left partial (removed on drop). Blocking.
    fn persist(
        &self,
        meta: &SnapshotMeta<C::NodeId, C::Node>,
        file: &mut SnapshotFile,
    ) -> Result<(), Error> {
        let _guard = self.persist_lock.lock().map_err(|_| Error::Poisoned)?;
        if let Some(current) = self.current_meta()? {
            if current.last_log_id > meta.last_log_id {
                tracing::debug!(kept = %current, dropped = %meta, "a newer snapshot is already stored");
                return Ok(());
            }
        }
        self.files.keep(file, &meta.snapshot_id)?;
        self.snapshots
            .insert(KEY_SNAPSHOT_META, codec::encode("snapshot meta", meta)?)?;
        self.snapshots.flush()?;
        self.files.remove_older_than(&meta.snapshot_id)?;
        Ok(())
    }
}

/// Serializes `machine` into `file`, through a buffer. Blocking.
fn write_machine<C: RaftTypeConfig, M: Machine<C>>(
    machine: &M,
    file: &mut SnapshotFile,
) -> Result<(), Error> {
    let mut out = BufWriter::with_capacity(1 << 16, file.file());
    machine
        .snapshot(&mut out)
        .map_err(|e| Error::Machine(e.to_string()))?;
    out.flush()?;
    Ok(())
}

/// Restores `machine` from `file`, from its start, through a buffer. Blocking.
fn read_machine<C: RaftTypeConfig, M: Machine<C>>(
    machine: &mut M,
    file: &mut SnapshotFile,
) -> Result<(), Error> {
    let len = file.len()?;
    file.file().seek(SeekFrom::Start(0))?;
    let mut input = BufReader::with_capacity(1 << 16, file.file());
    machine
        .restore(&mut input, len)
        .map_err(|e| Error::Machine(e.to_string()))
}

/// A store written by an earlier release kept the snapshot's bytes in the `snapshot`
/// tree itself: move them into a file of their own (then out of the tree). Blocking.
fn move_snapshot_out_of_tree<C: RaftTypeConfig>(
    tree: &sled::Tree,
    files: &SnapshotDir,
    db: &sled::Db,
) -> Result<(), Error> {
    let Some(data) = tree.get(KEY_SNAPSHOT_DATA)? else {
        return Ok(());
    };
    let meta: SnapshotMeta<C::NodeId, C::Node> = match tree.get(KEY_SNAPSHOT_META)? {
        Some(meta) => codec::decode("snapshot meta", &meta)?,
        None => return Err(Error::IncompleteSnapshot("data without metadata")),
    };
    let mut file = files.create(db.generate_id()?)?;
    file.file().write_all(&data)?;
    files.keep(&mut file, &meta.snapshot_id)?;
    tree.remove(KEY_SNAPSHOT_DATA)?;
    tree.flush()?;
    tracing::info!(snapshot = %meta, bytes = data.len(), "snapshot moved from the store's tree into its own file");
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
/// entry being applied and never observe half of one.
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
    C: RaftTypeConfig<Entry = Entry<C>, SnapshotData = SnapshotFile>,
    C::R: Default,
    M: Machine<C>,
{
    /// Builds the store over the `snapshot` tree and the snapshot files in `dir` (inside
    /// the sled directory), restoring `machine` from the persisted snapshot if there is
    /// one. Blocking.
    pub(crate) fn open(
        db: sled::Db,
        snapshots: sled::Tree,
        dir: &std::path::Path,
        machine: M,
        committed: Option<LogId<C::NodeId>>,
        clock: CommitClock,
    ) -> Result<Self, StorageError<C::NodeId>> {
        let files = SnapshotDir::open(dir).sto(ErrorSubject::Snapshot(None), ErrorVerb::Read)?;
        move_snapshot_out_of_tree::<C>(&snapshots, &files, &db)
            .sto(ErrorSubject::Snapshot(None), ErrorVerb::Write)?;
        let shared = Shared {
            applied: RwLock::new(Applied {
                machine,
                last_applied: None,
                last_membership: StoredMembership::default(),
            }),
            snapshots,
            files,
            persist_lock: Mutex::new(()),
            db,
        };
        let current = shared
            .current()
            .sto(ErrorSubject::Snapshot(None), ErrorVerb::Read)?;
        shared
            .files
            .remove_all_but(current.as_ref().map(|c| c.meta.snapshot_id.as_str()))
            .sto(ErrorSubject::Snapshot(None), ErrorVerb::Write)?;
        {
            let mut applied = shared
                .write()
                .sto(ErrorSubject::StateMachine, ErrorVerb::Write)?;
            if let Some(mut snapshot) = current {
                let signature = Some(snapshot.meta.signature());
                read_machine::<C, M>(&mut applied.machine, &mut snapshot.snapshot)
                    .sto(ErrorSubject::Snapshot(signature), ErrorVerb::Read)?;
                tracing::info!(snapshot = %snapshot.meta, "state machine restored from snapshot");
                applied.last_applied = snapshot.meta.last_log_id;
                applied.last_membership = snapshot.meta.last_membership;
            }
            applied.machine.recovering(committed.as_ref());
        }
        Ok(Self {
            shared: Arc::new(shared),
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
    C: RaftTypeConfig<Entry = Entry<C>, SnapshotData = SnapshotFile>,
    C::R: Default,
    M: Machine<C>,
{
    async fn build_snapshot(&mut self) -> Result<Snapshot<C>, StorageError<C::NodeId>> {
        let started = std::time::Instant::now();
        let shared = Arc::clone(&self.shared);
        // Serializing and fsyncing block: keep them off the async workers.
        let snapshot =
            crate::io::blocking(move || -> Result<Snapshot<C>, StorageError<C::NodeId>> {
                let id = shared
                    .db
                    .generate_id()
                    .sto(ErrorSubject::Snapshot(None), ErrorVerb::Write)?;
                let mut file = shared
                    .files
                    .create(id)
                    .sto(ErrorSubject::Snapshot(None), ErrorVerb::Write)?;
                // Under the read lock: the file pairs with exactly `last_applied`. The
                // writes land in the page cache; the fsync comes after the lock.
                let (last_log_id, last_membership) = {
                    let applied = shared
                        .read()
                        .sto(ErrorSubject::StateMachine, ErrorVerb::Read)?;
                    write_machine::<C, M>(&applied.machine, &mut file)
                        .sto(ErrorSubject::StateMachine, ErrorVerb::Read)?;
                    (
                        applied.last_applied.clone(),
                        applied.last_membership.clone(),
                    )
                };
                let snapshot_id = match &last_log_id {
                    Some(log_id) => format!("{}-{}-{id}", log_id.leader_id, log_id.index),
                    None => format!("none-{id}"),
                };
                let meta = SnapshotMeta {
                    last_log_id,
                    last_membership,
                    snapshot_id,
                };
                let signature = Some(meta.signature());
                shared
                    .persist(&meta, &mut file)
                    .sto(ErrorSubject::Snapshot(signature.clone()), ErrorVerb::Write)?;
                file.file()
                    .seek(SeekFrom::Start(0))
                    .sto(ErrorSubject::Snapshot(signature), ErrorVerb::Read)?;
                Ok(Snapshot {
                    meta,
                    snapshot: Box::new(file),
                })
            })
            .await
            .sto(ErrorSubject::Snapshot(None), ErrorVerb::Write)??;
        let bytes = snapshot.snapshot.len().unwrap_or(0);
        metrics::counter!("flockmq_raft_snapshots_total", "kind" => "built").increment(1);
        metrics::histogram!("flockmq_raft_snapshot_duration_seconds", "kind" => "built")
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("flockmq_raft_snapshot_bytes").set(bytes as f64);
        tracing::info!(snapshot = %snapshot.meta, bytes, "snapshot built");
        Ok(snapshot)
    }
}

impl<C, M> RaftStateMachine<C> for StateMachineStore<C, M>
where
    C: RaftTypeConfig<Entry = Entry<C>, SnapshotData = SnapshotFile>,
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
        // On the blocking pool, not on an async worker: an entry can be large (one
        // message queued for 100,000 sessions takes a good part of a second), and while
        // it is applied the node must go on answering Raft (appends time out after one
        // heartbeat interval) and its clients. The lock is taken per entry, not for the
        // whole batch: readers (the broker's tasks) wait at most for one entry, and
        // between entries they see the state as of a whole entry.
        let shared = Arc::clone(&self.shared);
        let (responses, last) = crate::io::blocking(move || -> Result<_, Error> {
            let mut responses = Vec::with_capacity(entries.len());
            let mut last = None;
            for entry in entries {
                let mut applied = shared.write()?;
                let response = match &entry.payload {
                    EntryPayload::Blank => C::R::default(),
                    EntryPayload::Normal(cmd) => applied.machine.apply(&entry.log_id, cmd),
                    EntryPayload::Membership(membership) => {
                        applied.last_membership =
                            StoredMembership::new(Some(entry.log_id.clone()), membership.clone());
                        C::R::default()
                    }
                };
                last = Some(entry.log_id.index);
                applied.last_applied = Some(entry.log_id);
                responses.push(response);
            }
            Ok((responses, last))
        })
        .await
        .sto(ErrorSubject::StateMachine, ErrorVerb::Write)?
        .sto(ErrorSubject::StateMachine, ErrorVerb::Write)?;
        if let Some(last) = last {
            let lag = metrics::histogram!("flockmq_raft_commit_to_apply_seconds");
            for waited in self.clock.applied(last) {
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
    ) -> Result<Box<SnapshotFile>, StorageError<C::NodeId>> {
        let shared = Arc::clone(&self.shared);
        let file = crate::io::blocking(move || -> Result<SnapshotFile, Error> {
            Ok(shared.files.create(shared.db.generate_id()?)?)
        })
        .await
        .sto(ErrorSubject::Snapshot(None), ErrorVerb::Write)?
        .sto(ErrorSubject::Snapshot(None), ErrorVerb::Write)?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<C::NodeId, C::Node>,
        mut snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError<C::NodeId>> {
        let started = std::time::Instant::now();
        let meta = meta.clone();
        let shared = Arc::clone(&self.shared);
        crate::io::blocking(move || -> Result<(), StorageError<C::NodeId>> {
            let signature = Some(meta.signature());
            {
                // Restore first: bytes the machine rejects are never persisted (the
                // partial file goes with `snapshot`).
                let mut applied = shared
                    .write()
                    .sto(ErrorSubject::StateMachine, ErrorVerb::Write)?;
                read_machine::<C, M>(&mut applied.machine, &mut snapshot)
                    .sto(ErrorSubject::Snapshot(signature.clone()), ErrorVerb::Read)?;
                applied.last_applied = meta.last_log_id.clone();
                applied.last_membership = meta.last_membership.clone();
            }
            shared
                .persist(&meta, &mut snapshot)
                .sto(ErrorSubject::Snapshot(signature), ErrorVerb::Write)?;
            metrics::counter!("flockmq_raft_snapshots_total", "kind" => "installed").increment(1);
            metrics::histogram!("flockmq_raft_snapshot_duration_seconds", "kind" => "installed")
                .record(started.elapsed().as_secs_f64());
            tracing::info!(snapshot = %meta, bytes = snapshot.len().unwrap_or(0), "snapshot installed");
            Ok(())
        })
        .await
        .sto(ErrorSubject::Snapshot(None), ErrorVerb::Write)??;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<C>>, StorageError<C::NodeId>> {
        let shared = Arc::clone(&self.shared);
        crate::io::blocking(move || shared.current())
            .await
            .sto(ErrorSubject::Snapshot(None), ErrorVerb::Read)?
            .sto(ErrorSubject::Snapshot(None), ErrorVerb::Read)
    }
}
