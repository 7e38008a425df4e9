//! The state machine lives in memory and is rebuilt on start from the last snapshot plus the log.
//! Snapshots are persisted in sled, so `apply` itself does no I/O.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{LogId, StorageError, TypeConfig};
use crate::command::Response;
use crate::metrics::Metrics;
use crate::model::NodeId;
use crate::state::State;

const KEY_SNAPSHOT_META: &[u8] = b"meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"data";

/// What a snapshot holds: the state and where in the log it stands.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Applied {
    pub state: State,
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership<NodeId, BasicNode>,
}

/// The applied state, shared read-only with the API services and the leader's loops.
pub struct Shared {
    data: RwLock<Applied>,
    /// Woken after every applied batch, so the scheduler runs when there is news.
    pub applied: Notify,
}

impl Shared {
    /// Runs `f` on the current state. Keep `f` short: it holds the read lock.
    pub fn read<R>(&self, f: impl FnOnce(&Applied) -> R) -> R {
        f(&self.data.read().expect("state lock poisoned"))
    }
}

#[derive(Clone)]
pub struct StateMachineStore {
    pub shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    snapshots: sled::Tree,
    snapshot_counter: Arc<AtomicU64>,
}

fn snap_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_snapshot(None, &e).into()
}

impl StateMachineStore {
    /// Opens the snapshot tree and loads the latest snapshot, if any, as the starting state.
    pub fn open(db: &sled::Db, metrics: Arc<Metrics>) -> Result<Self, String> {
        let snapshots = db.open_tree("snapshot").map_err(|e| e.to_string())?;
        let applied = match snapshots
            .get(KEY_SNAPSHOT_DATA)
            .map_err(|e| e.to_string())?
        {
            Some(bytes) => decode_snapshot(&bytes)
                .map_err(|e| format!("stored snapshot is unreadable: {e}"))?,
            None => Applied::default(),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                data: RwLock::new(applied),
                applied: Notify::new(),
            }),
            metrics,
            snapshots,
            snapshot_counter: Arc::new(AtomicU64::new(0)),
        })
    }

    fn persist_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        data: &[u8],
    ) -> Result<(), StorageError> {
        let meta_bytes = super::codec::encode(meta)
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, &e)))?;
        let mut batch = sled::Batch::default();
        batch.insert(KEY_SNAPSHOT_META, meta_bytes);
        batch.insert(KEY_SNAPSHOT_DATA, data);
        self.snapshots
            .apply_batch(batch)
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, &e)))?;
        self.snapshots
            .flush()
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(None, &e)))?;
        Ok(())
    }
}

/// Hands memory freed inside the heap back to the OS. With a large state, encoding a snapshot
/// and the entries applied since the last one leave many freed small blocks that glibc keeps;
/// at a million queued tasks that was ~10% of the leader's RSS.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; no pointers are passed.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The snapshot's bytes: the whole applied state.
pub fn encode_snapshot(applied: &Applied) -> Result<Vec<u8>, super::codec::CodecError> {
    super::codec::encode(applied)
}

pub fn decode_snapshot(bytes: &[u8]) -> Result<Applied, super::codec::CodecError> {
    let mut applied: Applied = super::codec::decode(bytes)?;
    applied.state.rebuild_derived();
    Ok(applied)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let _span = tracing::info_span!("build_snapshot").entered();
        let started = std::time::Instant::now();
        let (data, last_applied, last_membership) = self.shared.read(|a| {
            (
                encode_snapshot(a),
                a.last_applied,
                a.last_membership.clone(),
            )
        });
        let data = data.map_err(snap_err)?;
        let n = self.snapshot_counter.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
            None => format!("none-{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        self.persist_snapshot(&meta, &data)?;
        release_free_memory();
        let secs = started.elapsed().as_secs_f64();
        self.metrics.snapshot_build_seconds.observe(secs);
        self.metrics.snapshot_bytes.set(data.len() as i64);
        tracing::info!(bytes = data.len(), secs, index = ?last_applied.map(|l| l.index), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        Ok(self
            .shared
            .read(|a| (a.last_applied, a.last_membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        {
            let mut data = self.shared.data.write().expect("state lock poisoned");
            for entry in entries {
                let span = tracing::debug_span!(
                    "raft_apply",
                    index = entry.log_id.index,
                    term = entry.log_id.leader_id.term
                );
                let _guard = span.enter();
                data.last_applied = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Blank => Response::default(),
                    EntryPayload::Normal(req) => {
                        data.state.apply(entry.log_id.leader_id.term, &req)
                    }
                    EntryPayload::Membership(m) => {
                        data.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        Response::default()
                    }
                };
                responses.push(response);
            }
        }
        self.shared.applied.notify_one();
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let _span = tracing::info_span!("install_snapshot", id = %meta.snapshot_id).entered();
        let started = std::time::Instant::now();
        let bytes = snapshot.into_inner();
        let mut applied = decode_snapshot(&bytes).map_err(snap_err)?;
        applied.last_applied = meta.last_log_id;
        applied.last_membership = meta.last_membership.clone();
        self.persist_snapshot(meta, &bytes)?;
        *self.shared.data.write().expect("state lock poisoned") = applied;
        self.shared.applied.notify_one();
        let secs = started.elapsed().as_secs_f64();
        self.metrics.snapshot_install_seconds.observe(secs);
        self.metrics.snapshot_bytes.set(bytes.len() as i64);
        tracing::info!(bytes = bytes.len(), secs, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let meta = self.snapshots.get(KEY_SNAPSHOT_META).map_err(snap_err)?;
        let data = self.snapshots.get(KEY_SNAPSHOT_DATA).map_err(snap_err)?;
        match (meta, data) {
            (Some(meta), Some(data)) => {
                let meta: SnapshotMeta<NodeId, BasicNode> =
                    super::codec::decode(&meta).map_err(snap_err)?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(Cursor::new(data.to_vec())),
                }))
            }
            _ => Ok(None),
        }
    }
}
