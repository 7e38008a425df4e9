//! Raft plumbing: the openraft type configuration, sled-backed log storage, the in-memory state
//! machine with file-persisted snapshots, and the gRPC transport between peers. Each sits behind
//! openraft's own trait, so a test can swap one without touching the others.

use std::io::Cursor;

use openraft::BasicNode;

use crate::command::{Request, Response};
use crate::model::NodeId;

// openraft's storage traits fix the error type (StorageError, ~224 bytes); our helpers return the
// same type so `?` flows through without conversion.
pub mod codec;
#[allow(clippy::result_large_err)]
pub mod log_store;
pub mod network;
pub mod service;
pub mod snapshot_policy;
#[allow(clippy::result_large_err)]
pub mod state_machine;
pub mod watchdog;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
