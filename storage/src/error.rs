//! The storage layer's own failures, and their mapping onto openraft's `StorageError`.
//!
//! Every trait method openraft calls must return `openraft::StorageError`, which records
//! *what* was being touched (`ErrorSubject`) and *how* (`ErrorVerb`). This module owns the
//! one `thiserror` enum describing what actually went wrong underneath (sled, encoding,
//! a poisoned lock, the broker's machine) and the single place that wraps it with a
//! subject and a verb. It must never decide policy (retry, abort): openraft treats any
//! storage error as fatal for the node, which is the right call for a broken disk.

use openraft::{AnyError, ErrorSubject, ErrorVerb, NodeId, StorageError, StorageIOError};

/// What went wrong below the openraft storage API.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// sled refused a read, write or flush.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A record could not be encoded.
    #[error("encoding {what}: {source}")]
    Encode {
        /// The kind of record.
        what: &'static str,
        /// The encoder's complaint.
        source: bincode::Error,
    },
    /// A stored record could not be decoded: the file is corrupt or from another format.
    #[error("decoding {what}: {source}")]
    Decode {
        /// The kind of record.
        what: &'static str,
        /// The decoder's complaint.
        source: bincode::Error,
    },
    /// A snapshot file could not be created, written, read or renamed.
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
    /// A key in the `logs` tree is not an 8-byte big-endian index.
    #[error("malformed log key of {0} bytes")]
    MalformedLogKey(usize),
    /// The snapshot tree holds metadata without data, or the reverse.
    #[error("incomplete snapshot record: {0}")]
    IncompleteSnapshot(&'static str),
    /// A thread panicked while holding the state-machine lock; its state is unknown.
    #[error("state machine lock poisoned by a panic during apply or restore")]
    Poisoned,
    /// A blocking task did not complete (panicked or was cancelled at shutdown).
    #[error("blocking storage task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// The broker's machine refused to serialize or restore its state.
    #[error("state machine: {0}")]
    Machine(String),
}

impl Error {
    /// Wraps this failure as openraft's `StorageError` about `subject`, done with `verb`.
    pub(crate) fn into_storage<NID: NodeId>(
        self,
        subject: ErrorSubject<NID>,
        verb: ErrorVerb,
    ) -> StorageError<NID> {
        StorageIOError::new(subject, verb, AnyError::new(&self)).into()
    }
}

/// Shorthand to map an internal result to openraft's error with a subject and a verb.
pub(crate) trait ResultExt<T> {
    /// Maps the error side with [`Error::into_storage`].
    fn sto<NID: NodeId>(
        self,
        subject: ErrorSubject<NID>,
        verb: ErrorVerb,
    ) -> Result<T, StorageError<NID>>;
}

impl<T, E: Into<Error>> ResultExt<T> for Result<T, E> {
    fn sto<NID: NodeId>(
        self,
        subject: ErrorSubject<NID>,
        verb: ErrorVerb,
    ) -> Result<T, StorageError<NID>> {
        self.map_err(|e| e.into().into_storage(subject, verb))
    }
}
