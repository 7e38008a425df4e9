//! Raft plumbing: the openraft type configuration, sled-backed log storage, the in-memory state
//! machine with file-persisted snapshots, and the gRPC transport between peers. Each sits behind
//! openraft's own trait, so a test can swap one without touching the others.

use std::io::Cursor;

use openraft::BasicNode;

use crate::command::{Request, Response};
use crate::model::NodeId;

pub mod codec;
pub mod log_store;
pub mod network;
pub mod service;
pub mod snapshot_policy;
pub mod state_machine;
pub mod watchdog;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachineStore>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type StorageError = openraft::StorageError<TypeConfig>;
pub type LeaderId = openraft::impls::leader_id_adv::LeaderId<u64, NodeId>;

/// The id of the entry at `index` appended by `node`'s leadership in `term`.
pub fn log_id(term: u64, node: NodeId, index: u64) -> LogId {
    LogId::new(
        LeaderId {
            term,
            node_id: node,
        },
        index,
    )
}

/// A snapshot's bytes, whole: snapshots travel in one message (`RaftNetworkV2::full_snapshot`).
pub type SnapshotData = Cursor<Vec<u8>>;
