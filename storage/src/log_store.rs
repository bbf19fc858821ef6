//! The Raft log on disk: openraft's `RaftLogStorage` and `RaftLogReader` over sled.
//!
//! Owns the `logs` tree (one bincode `Entry` per index, keyed by the big-endian index) and
//! the `meta` tree (vote, committed log id, last purged log id). Its durability promises:
//! `append` reports entries flushed through openraft's `LogFlushed` callback only after
//! sled's `flush_async` (fsync) covering them has returned; `save_vote`, `truncate` and
//! `purge` flush before returning. `save_committed` does *not* fsync: it rides on the next
//! flush (every append and vote flushes, and sled flushes in the background every 500 ms).
//! Losing the newest committed id in a crash only means openraft re-applies a little less
//! at start-up and learns the rest from the leader; it never breaks Raft's safety, and it
//! keeps an fsync off every commit. Purge writes `last_purged` before deleting entries, so
//! a crash between the two leaves only stale entries at or below `last_purged`, which
//! `get_log_state` ignores, openraft never reads, and the next purge deletes.
//!
//! State: no lock of its own. sled trees are internally synchronised cheap clones, and
//! openraft calls the mutating methods from one task; `LogStore` is `Clone` so the same
//! type serves as the log reader for replication tasks and as the broker's shutdown
//! handle ([`LogStore::flush`]). It must never know what a command means.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftTypeConfig, StorageError, Vote,
};

use crate::codec::{self, KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE};
use crate::commit_clock::CommitClock;
use crate::error::{Error, ResultExt};

/// The sled-backed Raft log of one node.
///
/// Built by [`crate::open`]; hand it to `openraft::Raft::new` and keep a clone for
/// [`LogStore::flush`] at shutdown.
pub struct LogStore<C: RaftTypeConfig> {
    /// Log entries by index (big-endian `u64` key), bincode-encoded `Entry<C>` values.
    logs: sled::Tree,
    /// Vote, committed log id and last purged log id.
    meta: sled::Tree,
    /// When each committed index became known, for the state machine's apply lag.
    clock: CommitClock,
    /// The type config only shapes the encoded records.
    _config: PhantomData<C>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            logs: self.logs.clone(),
            meta: self.meta.clone(),
            clock: self.clock.clone(),
            _config: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig> Debug for LogStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("entries", &self.logs.len())
            .finish()
    }
}

impl<C> LogStore<C>
where
    C: RaftTypeConfig<Entry = Entry<C>>,
{
    /// Wraps the two trees of an open database.
    pub(crate) fn new(logs: sled::Tree, meta: sled::Tree, clock: CommitClock) -> Self {
        Self {
            logs,
            meta,
            clock,
            _config: PhantomData,
        }
    }

    /// Forces everything written so far (log, vote, committed id, snapshots: the whole
    /// database) to disk. Call it at graceful shutdown, after `Raft::shutdown`; the
    /// database closes when this store, its clones and the state-machine store are dropped.
    pub async fn flush(&self) -> Result<(), StorageError<C::NodeId>> {
        crate::io::flush(&self.logs)
            .await
            .sto(ErrorSubject::Store, ErrorVerb::Write)?;
        Ok(())
    }

    /// A number the node keeps for itself under `key` across restarts (not
    /// replicated): `None` if it never wrote one.
    pub fn node_record(&self, key: &str) -> std::io::Result<Option<u64>> {
        let key = format!("{}{key}", codec::NODE_RECORD_PREFIX);
        self.read_meta(key.as_bytes(), "node record")
            .map_err(std::io::Error::other)
    }

    /// Write the node's own record `key` and force it to disk.
    pub async fn set_node_record(&self, key: &str, value: u64) -> std::io::Result<()> {
        let key = format!("{}{key}", codec::NODE_RECORD_PREFIX);
        self.write_meta(key.as_bytes(), "node record", &value)
            .map_err(std::io::Error::other)?;
        crate::io::flush(&self.meta)
            .await
            .map_err(std::io::Error::other)?;
        Ok(())
    }

    /// Reads and decodes one `meta` record.
    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, Error> {
        match self.meta.get(key)? {
            Some(bytes) => Ok(Some(codec::decode(what, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Encodes and writes one `meta` record (not flushed).
    fn write_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        what: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.meta.insert(key, codec::encode(what, value)?)?;
        Ok(())
    }

    /// The committed log id saved before this process opened the store.
    pub(crate) fn committed_at_open(&self) -> Result<Option<LogId<C::NodeId>>, Error> {
        self.read_meta(KEY_COMMITTED, "committed log id")
            .map(Option::flatten)
    }

    /// The id of the last purged entry.
    fn last_purged(&self) -> Result<Option<LogId<C::NodeId>>, Error> {
        self.read_meta(KEY_LAST_PURGED, "last purged log id")
    }

    /// The id of the last entry present in the `logs` tree.
    fn last_present(&self) -> Result<Option<LogId<C::NodeId>>, Error> {
        match self.logs.last()? {
            Some((_, bytes)) => {
                let entry: Entry<C> = codec::decode("log entry", &bytes)?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }

    /// Deletes every entry whose index lies in `range` with one atomic sled batch.
    fn remove_range(&self, range: KeyRange) -> Result<(), Error> {
        let mut batch = sled::Batch::default();
        for item in self.logs.range::<[u8; 8], _>(range) {
            let (key, _) = item?;
            batch.remove(key);
        }
        self.logs.apply_batch(batch)?;
        Ok(())
    }
}

/// A range of `logs` keys.
type KeyRange = (Bound<[u8; 8]>, Bound<[u8; 8]>);

/// Turns an index range into sled key bounds, or `None` when it is empty.
fn key_range<RB: RangeBounds<u64>>(range: &RB) -> Option<KeyRange> {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) if *e < start => return None,
        Bound::Included(e) => Bound::Included(codec::log_key(*e)),
        Bound::Excluded(e) if *e <= start => return None,
        Bound::Excluded(e) => Bound::Excluded(codec::log_key(*e)),
        Bound::Unbounded => Bound::Unbounded,
    };
    Some((Bound::Included(codec::log_key(start)), end))
}

impl<C> RaftLogReader<C> for LogStore<C>
where
    C: RaftTypeConfig<Entry = Entry<C>>,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        let Some(keys) = key_range(&range) else {
            return Ok(Vec::new());
        };
        let mut entries = Vec::new();
        for item in self.logs.range::<[u8; 8], _>(keys) {
            let (key, bytes) = item.sto(ErrorSubject::Logs, ErrorVerb::Read)?;
            let index = codec::log_index(&key).sto(ErrorSubject::Logs, ErrorVerb::Read)?;
            let entry: Entry<C> = codec::decode("log entry", &bytes)
                .sto(ErrorSubject::LogIndex(index), ErrorVerb::Read)?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl<C> RaftLogStorage<C> for LogStore<C>
where
    C: RaftTypeConfig<Entry = Entry<C>>,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<C::NodeId>> {
        let last_purged_log_id = self
            .last_purged()
            .sto(ErrorSubject::Logs, ErrorVerb::Read)?;
        let last_present = self
            .last_present()
            .sto(ErrorSubject::Logs, ErrorVerb::Read)?;
        // Entries at or below `last_purged` may linger after a crash mid-purge; they never
        // count as the last log.
        let last_log_id = match (last_present, &last_purged_log_id) {
            (Some(present), Some(purged)) if present.index <= purged.index => Some(purged.clone()),
            (Some(present), _) => Some(present),
            (None, purged) => purged.clone(),
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        self.write_meta(KEY_VOTE, "vote", vote)
            .sto(ErrorSubject::Vote, ErrorVerb::Write)?;
        crate::io::flush(&self.meta)
            .await
            .sto(ErrorSubject::Vote, ErrorVerb::Write)?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        self.read_meta(KEY_VOTE, "vote")
            .sto(ErrorSubject::Vote, ErrorVerb::Read)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        if let Some(id) = &committed {
            self.clock.committed(id.index);
        }
        // Not flushed on purpose: see the module documentation.
        self.write_meta(KEY_COMMITTED, "committed log id", &committed)
            .sto(ErrorSubject::Store, ErrorVerb::Write)
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        let stored: Option<Option<LogId<C::NodeId>>> = self
            .read_meta(KEY_COMMITTED, "committed log id")
            .sto(ErrorSubject::Store, ErrorVerb::Read)?;
        Ok(stored.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        let mut last = None;
        for entry in entries {
            let value = codec::encode("log entry", &entry)
                .sto(ErrorSubject::Log(entry.log_id.clone()), ErrorVerb::Write)?;
            batch.insert(&codec::log_key(entry.log_id.index), value);
            last = Some(entry.log_id);
        }
        // One batch: after a crash either all of these entries are there or none, so the
        // log never has a hole.
        self.logs
            .apply_batch(batch)
            .sto(ErrorSubject::Logs, ErrorVerb::Write)?;
        tracing::trace!(last = ?last, "log entries written, flushing");
        let started = std::time::Instant::now();
        let flushed = crate::io::flush(&self.logs).await;
        metrics::histogram!("flockmq_storage_sync_seconds").record(started.elapsed().as_secs_f64());
        match flushed {
            Ok(_) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = Error::from(e);
                callback.log_io_completed(Err(std::io::Error::other(err.to_string())));
                Err(err.into_storage(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        tracing::debug!(since = %log_id, "truncating log");
        self.remove_range((
            Bound::Included(codec::log_key(log_id.index)),
            Bound::Unbounded,
        ))
        .sto(ErrorSubject::Log(log_id.clone()), ErrorVerb::Delete)?;
        crate::io::flush(&self.logs)
            .await
            .sto(ErrorSubject::Log(log_id), ErrorVerb::Delete)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        tracing::debug!(upto = %log_id, "purging log");
        // Record the purge point first: a crash before the deletion then leaves only stale
        // entries below it, never a hole above it.
        self.write_meta(KEY_LAST_PURGED, "last purged log id", &log_id)
            .sto(ErrorSubject::Log(log_id.clone()), ErrorVerb::Delete)?;
        self.remove_range((
            Bound::Unbounded,
            Bound::Included(codec::log_key(log_id.index)),
        ))
        .sto(ErrorSubject::Log(log_id.clone()), ErrorVerb::Delete)?;
        crate::io::flush(&self.logs)
            .await
            .sto(ErrorSubject::Log(log_id), ErrorVerb::Delete)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(range: impl RangeBounds<u64>) -> Option<(Bound<u64>, Bound<u64>)> {
        let map = |b: Bound<[u8; 8]>| match b {
            Bound::Included(k) => Bound::Included(u64::from_be_bytes(k)),
            Bound::Excluded(k) => Bound::Excluded(u64::from_be_bytes(k)),
            Bound::Unbounded => Bound::Unbounded,
        };
        key_range(&range).map(|(s, e)| (map(s), map(e)))
    }

    #[test]
    fn key_range_maps_every_bound_kind() {
        assert_eq!(bounds(3..7), Some((Bound::Included(3), Bound::Excluded(7))));
        assert_eq!(
            bounds(3..=7),
            Some((Bound::Included(3), Bound::Included(7)))
        );
        assert_eq!(bounds(..), Some((Bound::Included(0), Bound::Unbounded)));
        assert_eq!(
            bounds((Bound::Excluded(3), Bound::Unbounded)),
            Some((Bound::Included(4), Bound::Unbounded))
        );
    }

    #[test]
    #[allow(clippy::reversed_empty_ranges)]
    fn key_range_is_none_for_empty_or_inverted_ranges() {
        assert_eq!(bounds(5..5), None);
        assert_eq!(bounds(7..3), None);
        assert_eq!(bounds(7..=3), None);
        assert_eq!(bounds((Bound::Excluded(u64::MAX), Bound::Unbounded)), None);
    }
}
