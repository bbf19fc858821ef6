//! The openraft type configuration and the Raft instance of a node.

use super::command::{NodeId, Request, Response};

openraft::declare_raft_types!(
    /// FlockMQ's Raft types: entries are batches of [`super::command::Command`]s.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = storage::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime
);

/// The Raft handle of a node.
pub type Raft = openraft::Raft<TypeConfig>;
