//! Everything FlockMQ keeps on disk: the sled-backed openraft log store and the
//! state machine's snapshots. It knows neither MQTT nor gRPC, and no sled type
//! appears in its public API.
//!
//! [`open`] opens one sled database in a directory and returns the two halves openraft
//! 0.9's storage v2 asks for: a [`LogStore`] (`RaftLogStorage` + `RaftLogReader`) and a
//! [`StateMachineStore`] (`RaftStateMachine`) that runs the broker's [`Machine`]. Both
//! are generic over any `RaftTypeConfig` whose entries are `openraft::Entry<C>` and whose
//! snapshot data is `Cursor<Vec<u8>>`; records are bincode. That both meet openraft's
//! contract is proven by running `openraft::testing::Suite` (see `tests/suite.rs`).
//!
//! On disk, one sled database with three trees: `logs` (entries by big-endian index),
//! `meta` (vote, committed log id, last purged log id) and `snapshot` (the latest
//! snapshot's metadata and bytes).
//!
//! Architecture invariant: this crate never interprets a command or a snapshot's bytes;
//! what a command does is the [`Machine`]'s business.

#![warn(missing_docs)]
#![forbid(unsafe_code)]
// openraft's `StorageError` is large, and every trait method must return it; boxing it only
// in our own helpers would buy nothing.
#![allow(clippy::result_large_err)]

mod codec;
mod commit_clock;
mod error;
pub mod io;
mod log_store;
mod snapshot_file;
mod state_machine;

use std::path::Path;

use openraft::{Entry, ErrorSubject, ErrorVerb, RaftTypeConfig, StorageError};

pub use log_store::LogStore;
pub use snapshot_file::SnapshotFile;
pub use state_machine::{Machine, MachineHandle, SnapshotBuilder, StateMachineStore};

use crate::error::ResultExt;

/// Opens (creating if needed) the database in directory `path` and returns the log store
/// and the state-machine store sharing it.
///
/// `machine` is the broker's empty state; if a snapshot was persisted it is restored into
/// it before this returns, so the machine starts at that snapshot and openraft re-applies
/// the committed log after it when `Raft::new` starts.
///
/// Blocking (sled recovers its files here): call it at start-up, or through
/// [`io::blocking`]. Only one process may have a directory open at a time.
#[allow(clippy::type_complexity)]
pub fn open<C, M>(
    path: impl AsRef<Path>,
    machine: M,
) -> Result<(LogStore<C>, StateMachineStore<C, M>), StorageError<C::NodeId>>
where
    C: RaftTypeConfig<Entry = Entry<C>, SnapshotData = SnapshotFile>,
    C::R: Default,
    M: Machine<C>,
{
    let path = path.as_ref();
    let db = sled::Config::new()
        .path(path)
        .open()
        .sto(ErrorSubject::Store, ErrorVerb::Read)?;
    let logs = db
        .open_tree(codec::LOGS_TREE)
        .sto(ErrorSubject::Logs, ErrorVerb::Read)?;
    let meta = db
        .open_tree(codec::META_TREE)
        .sto(ErrorSubject::Store, ErrorVerb::Read)?;
    let snapshots = db
        .open_tree(codec::SNAPSHOT_TREE)
        .sto(ErrorSubject::Snapshot(None), ErrorVerb::Read)?;
    tracing::info!(path = %path.display(), entries = logs.len(), "storage opened");
    let clock = commit_clock::CommitClock::default();
    let log_store = LogStore::new(logs, meta, clock.clone());
    let committed = log_store
        .committed_at_open()
        .sto(ErrorSubject::Store, ErrorVerb::Read)?;
    let state_machine = StateMachineStore::open(db, snapshots, path, machine, committed, clock)?;
    Ok((log_store, state_machine))
}
