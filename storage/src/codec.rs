//! How records are laid out in sled: tree names, keys and the value encoding.
//!
//! Owns the on-disk format, so that changing it is a change to this file alone. Values are
//! bincode 1 (compact, and it round-trips every openraft 0.9 type we store); log keys are
//! the entry index as a big-endian `u64`, so sled's byte order is log order. It must never
//! perform I/O itself.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Error;

/// Tree holding one entry per log index.
pub(crate) const LOGS_TREE: &str = "logs";
/// Tree holding the log store's small records (vote, committed, last purged).
pub(crate) const META_TREE: &str = "meta";
/// Tree holding the single latest snapshot (metadata and data, written in one batch).
pub(crate) const SNAPSHOT_TREE: &str = "snapshot";

/// `meta` key: the last vote saved by `save_vote`.
pub(crate) const KEY_VOTE: &[u8] = b"vote";
/// `meta` key: the last committed log id saved by `save_committed`.
pub(crate) const KEY_COMMITTED: &[u8] = b"committed";
/// `meta` key: the id of the last purged log entry.
pub(crate) const KEY_LAST_PURGED: &[u8] = b"last_purged";
/// `meta` key prefix of the records the node keeps for itself beside Raft's
/// ([`crate::LogStore::node_record`]).
pub(crate) const NODE_RECORD_PREFIX: &str = "node/";
/// `snapshot` key: the latest snapshot's `SnapshotMeta`.
pub(crate) const KEY_SNAPSHOT_META: &[u8] = b"meta";
/// `snapshot` key: the latest snapshot's bytes (the machine's own serialization).
pub(crate) const KEY_SNAPSHOT_DATA: &[u8] = b"data";

/// The sled key of log index `index`.
pub(crate) fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The log index a sled key in the `logs` tree stands for.
pub(crate) fn log_index(key: &[u8]) -> Result<u64, Error> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| Error::MalformedLogKey(key.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Encodes a record; `what` names it in the error.
pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, Error> {
    bincode::serialize(value).map_err(|source| Error::Encode { what, source })
}

/// Decodes a record; `what` names it in the error.
pub(crate) fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, Error> {
    bincode::deserialize(bytes).map_err(|source| Error::Decode { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_in_index_order() {
        let mut keys: Vec<[u8; 8]> = [300u64, 2, u64::MAX, 0, 256]
            .iter()
            .map(|i| log_key(*i))
            .collect();
        keys.sort();
        let indexes: Vec<u64> = keys.iter().map(|k| log_index(k).unwrap()).collect();
        assert_eq!(indexes, vec![0, 2, 256, 300, u64::MAX]);
    }

    #[test]
    fn log_index_rejects_keys_that_are_not_eight_bytes() {
        assert!(matches!(log_index(b"vote"), Err(Error::MalformedLogKey(4))));
    }
}
