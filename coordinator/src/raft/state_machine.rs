//! The state machine lives in memory and is rebuilt on start from the last snapshot plus the log.
//! Snapshots are persisted to a file next to sled (`snapshot`), so `apply` itself does no I/O.
//! They used to be sled values: writing a 130 MiB value went through the same I/O buffers as the
//! Raft log's appends and held them up for seconds at a million tasks.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_stream::{Stream, StreamExt};

use super::{LogId, SnapshotData, TypeConfig};
use crate::command::Response;
use crate::limits;
use crate::metrics::Metrics;
use crate::state::State;

type SnapshotMetadata = SnapshotMetaOf<TypeConfig>;
type StoredMembership = StoredMembershipOf<TypeConfig>;
type Snapshot = SnapshotOf<TypeConfig, SnapshotData>;

/// Where snapshots were kept before they moved to a file; read once if no file exists yet.
const KEY_SNAPSHOT_META: &[u8] = b"meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"data";

/// The snapshot file: this tag, the meta's length (u32, little-endian), the meta, the state.
const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_TAG: &[u8; 8] = b"DRVSNAP1";

/// What a snapshot holds: the state and where in the log it stands.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Applied {
    pub state: State,
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
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
    /// The legacy sled tree of snapshots (read when no snapshot file exists).
    legacy: sled::Tree,
    dir: std::path::PathBuf,
    /// The log index of the snapshot in the file (None: none yet). Held while a new file is
    /// renamed into place, so a snapshot built from an older state never replaces a newer one
    /// installed meanwhile (building and installing run on different threads).
    persisted: Arc<std::sync::Mutex<Option<u64>>>,
}

/// Gives every snapshot being written a file of its own.
static SNAPSHOT_WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn write_err(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(format!("writing a snapshot: {e}"))
}

fn snap_err(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(format!("reading a snapshot: {e}"))
}

impl StateMachineStore {
    /// Loads the latest snapshot in `dir` (or, from older versions, in sled), if any, as the
    /// starting state.
    pub fn open(
        db: &sled::Db,
        dir: &std::path::Path,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let legacy = db.open_tree("snapshot").map_err(|e| e.to_string())?;
        let store = Self {
            shared: Arc::new(Shared {
                data: RwLock::new(Applied::default()),
                applied: Notify::new(),
            }),
            metrics,
            legacy,
            dir: dir.to_owned(),
            persisted: Arc::default(),
        };
        // Left by a crash mid-write; never read.
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&format!("{SNAPSHOT_FILE}.")) && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        if let Some((meta, bytes)) = store.read_snapshot().map_err(|e| e.to_string())? {
            *store.persisted.lock().unwrap() = meta.last_log_id.map(|l| l.index);
            // The snapshot policy sizes the next interval by this gauge.
            store.metrics.snapshot_bytes.set(bytes.len() as i64);
            let applied = decode_snapshot(&bytes)
                .map_err(|e| format!("stored snapshot is unreadable: {e}"))?;
            *store.shared.data.write().expect("state lock poisoned") = applied;
        }
        Ok(store)
    }

    /// The stored snapshot's meta and bytes: the file, else what an older version kept in sled.
    fn read_snapshot(&self) -> std::io::Result<Option<Stored>> {
        let path = self.dir.join(SNAPSHOT_FILE);
        match std::fs::read(&path) {
            Ok(mut file) => {
                let bad = |why: &str| {
                    snap_err(std::io::Error::other(format!("{}: {why}", path.display())))
                };
                let rest = file
                    .strip_prefix(SNAPSHOT_TAG.as_slice())
                    .ok_or_else(|| bad("not a Drover snapshot"))?;
                let (len, rest) = rest.split_at_checked(4).ok_or_else(|| bad("truncated"))?;
                let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
                let meta = rest.get(..len).ok_or_else(|| bad("truncated"))?;
                let meta = super::codec::decode(meta).map_err(snap_err)?;
                // The state follows the header: keep the file's buffer rather than copying
                // a snapshot of a hundred MiB or more into a second one.
                file.drain(..SNAPSHOT_TAG.len() + 4 + len);
                return Ok(Some((meta, file)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(snap_err(e)),
        }
        let meta = self.legacy.get(KEY_SNAPSHOT_META).map_err(snap_err)?;
        let data = self.legacy.get(KEY_SNAPSHOT_DATA).map_err(snap_err)?;
        match (meta, data) {
            (Some(meta), Some(data)) => Ok(Some((
                super::codec::decode(&meta).map_err(snap_err)?,
                data.to_vec(),
            ))),
            _ => Ok(None),
        }
    }

    /// Writes the snapshot to a new file of its own, syncs it and renames it over the old one
    /// unless the old one is newer, so a crash leaves either the old snapshot or the new one.
    /// Returns whether it replaced the old one.
    pub fn persist_snapshot(&self, meta: &SnapshotMetadata, data: &[u8]) -> std::io::Result<bool> {
        use std::io::Write;

        let meta_bytes = super::codec::encode(meta).map_err(write_err)?;
        let n = SNAPSHOT_WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!("{SNAPSHOT_FILE}.{}.{n}.tmp", std::process::id()));
        let written = std::fs::File::create_new(&tmp).and_then(|mut file| {
            file.write_all(SNAPSHOT_TAG)
                .and_then(|()| file.write_all(&(meta_bytes.len() as u32).to_le_bytes()))
                .and_then(|()| file.write_all(&meta_bytes))
                .and_then(|()| write_paced(&mut file, data))
                .and_then(|()| file.sync_all())
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
        let index = meta.last_log_id.map(|l| l.index);
        let mut persisted = self.persisted.lock().unwrap();
        if index < *persisted {
            let _ = std::fs::remove_file(&tmp);
            tracing::info!(?index, newer = ?*persisted, "a newer snapshot is already stored; this one is dropped");
            return Ok(false);
        }
        if let Err(e) = std::fs::rename(&tmp, self.dir.join(SNAPSHOT_FILE)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
        *persisted = index;
        drop(persisted);
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err)?;
        if self.legacy.contains_key(KEY_SNAPSHOT_DATA).unwrap_or(false) {
            let _ = self.legacy.clear();
        }
        Ok(true)
    }
}

/// Writes `data` in chunks, each sent to the disk as soon as it is written, waiting for the one
/// before. Written in one go, a snapshot of ~145 MiB sits in the page cache until `sync_all`,
/// and three nodes snapshot at the same index: one burst of ~440 MiB for the Raft log's own
/// syncs to queue behind, and every commit waits for the followers' syncs.
/// (The elections seen under load came from the log's purge, see `log_store`; this keeps the
/// snapshot from adding a burst of its own.) Paced, at most two chunks are ever waiting.
fn write_paced(file: &mut std::fs::File, data: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, Write};
    let mut offset = file.stream_position()?;
    let mut previous: Option<(u64, u64)> = None;
    for chunk in data.chunks(limits::SNAPSHOT_WRITE_CHUNK_BYTES) {
        file.write_all(chunk)?;
        let len = chunk.len() as u64;
        start_writeback(file, offset, len, false)?;
        if let Some((at, n)) = previous {
            start_writeback(file, at, n, true)?;
        }
        previous = Some((offset, len));
        offset += len;
    }
    Ok(())
}

/// Starts writing a range of the file to disk; with `wait`, until it is written. Only pacing:
/// durability still comes from the `sync_all` after it.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64, wait: bool) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let flags = if wait {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER
        } else {
            libc::SYNC_FILE_RANGE_WRITE
        };
        // SAFETY: a valid descriptor owned by `file`, and plain integers.
        let r =
            unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len, wait);
    Ok(())
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

/// A snapshot's bytes, encoded when openraft asks for a builder and persisted by the builder.
///
/// openraft asks for the builder from its state-machine worker, the only writer of the state, and
/// then runs `build_snapshot` in a task of its own while the worker goes on applying. Encoding in
/// `build_snapshot` held the read lock while apply waited for the write lock, and a waiting writer
/// holds back every new reader: RPC handlers, the leader's loop and, with both runtime threads
/// stuck there, Raft heartbeats. At a million tasks that stalled the leader long enough for the
/// followers to elect another (17 elections in a 900,000-task run). Encoded here, no writer waits:
/// readers go on and only applying pauses. Encoding and persisting run on threads of their own at
/// a lower CPU priority, so a busy host serves Raft heartbeats and RPCs first.
pub struct SnapshotBuild {
    store: StateMachineStore,
    encoded: std::io::Result<Encoded>,
    started: std::time::Instant,
}

/// A stored snapshot: its meta and its bytes.
type Stored = (SnapshotMetadata, Vec<u8>);

/// The snapshot's bytes and where in the log they stand.
type Encoded = (Vec<u8>, Option<LogId>, StoredMembership);

impl StateMachineStore {
    async fn encode_now(&self) -> SnapshotBuild {
        let started = std::time::Instant::now();
        let shared = self.shared.clone();
        let encoded = in_background("snapshot-encode", move || {
            shared.read(|a| {
                encode_snapshot(a)
                    .map(|bytes| (bytes, a.last_applied, a.last_membership.clone()))
                    .map_err(snap_err)
            })
        })
        .await
        .and_then(|r| r);
        SnapshotBuild {
            store: self.clone(),
            encoded,
            started,
        }
    }
}

/// How much lower than the rest of the process background snapshot work runs (nice steps).
const BACKGROUND_NICENESS: i32 = 10;

/// Runs `f` on a thread of its own at a lower CPU priority and waits for it without holding up
/// the runtime.
async fn in_background<R: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> std::io::Result<R> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            lower_this_threads_priority();
            let _ = tx.send(f());
        })
        .map_err(snap_err)?;
    rx.await.map_err(|_| {
        snap_err(std::io::Error::other(
            "snapshot thread ended without a result",
        ))
    })
}

fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority takes plain integers; on Linux, PRIO_PROCESS with who = 0 changes the
    // nice value of the calling thread only.
    unsafe {
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        libc::setpriority(libc::PRIO_PROCESS, 0, current + BACKGROUND_NICENESS);
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuild {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> std::io::Result<Snapshot> {
        use tracing::Instrument;
        self.persist()
            .instrument(tracing::info_span!("build_snapshot"))
            .await
    }
}

impl SnapshotBuild {
    async fn persist(&mut self) -> std::io::Result<Snapshot> {
        let started = self.started;
        let (data, last_applied, last_membership) = std::mem::replace(
            &mut self.encoded,
            Err(snap_err(std::io::Error::other("snapshot already built"))),
        )?;
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
        };
        let (store, meta_copy) = (self.store.clone(), meta.clone());
        let data = in_background("snapshot-persist", move || {
            let persisted = store.persist_snapshot(&meta_copy, &data).map(|_| data);
            // Trimming a heap of a GiB or more takes a while: off the runtime's threads too.
            crate::memory::release_free_memory();
            persisted
        })
        .await??;
        let secs = started.elapsed().as_secs_f64();
        self.store.metrics.snapshot_build_seconds.observe(secs);
        self.store.metrics.snapshot_bytes.set(data.len() as i64);
        tracing::info!(bytes = data.len(), secs, index = ?last_applied.map(|l| l.index), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuild;

    async fn applied_state(&mut self) -> std::io::Result<(Option<LogId>, StoredMembership)> {
        Ok(self
            .shared
            .read(|a| (a.last_applied, a.last_membership.clone())))
    }

    async fn apply<S>(&mut self, entries: S) -> std::io::Result<()>
    where
        S: Stream<Item = std::io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        // Gathered first: the write lock cannot be held across the stream's awaits, and taking
        // it once per batch keeps readers' waits short.
        let batch: Vec<EntryResponder<TypeConfig>> = entries.collect::<Result<_, _>>().await?;
        let mut responses = Vec::with_capacity(batch.len());
        {
            let mut data = self.shared.data.write().expect("state lock poisoned");
            for (entry, responder) in batch {
                let span = tracing::debug_span!(
                    "raft_apply",
                    index = entry.log_id.index,
                    term = entry.log_id.leader_id.term
                );
                let _guard = span.enter();
                let response = match entry.payload {
                    EntryPayload::Blank => Response::default(),
                    EntryPayload::Normal(req) => {
                        let term = entry.log_id.leader_id.term;
                        let state = &mut data.state;
                        // Every replica applies the same entry, so a panic here would be a panic
                        // on all of them, again at every restart. Caught, it becomes a storage
                        // error: openraft stops this node's Raft and the node shuts itself down
                        // (see `node::watch_raft`) instead of serving with a dead state machine.
                        let applied =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                fault::panic_if_poisoned(&req);
                                state.apply(term, &req)
                            }));
                        match applied {
                            Ok(r) => r,
                            Err(_) => {
                                tracing::error!(
                                    index = entry.log_id.index,
                                    "applying this entry panicked; stopping this node"
                                );
                                self.metrics.apply_panics.inc();
                                return Err(std::io::Error::other(format!(
                                    "applying log entry {} panicked (see the panic message above); \
                                     the state machine stopped before it",
                                    entry.log_id.index
                                )));
                            }
                        }
                    }
                    EntryPayload::Membership(m) => {
                        data.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        Response::default()
                    }
                };
                data.last_applied = Some(entry.log_id);
                responses.push((responder, response));
            }
        }
        self.shared.applied.notify_one();
        for (responder, response) in responses {
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.encode_now().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        snapshot: SnapshotData,
    ) -> std::io::Result<()> {
        let _span = tracing::info_span!(
            "install_snapshot",
            index = ?meta.last_log_id.map(|l| l.index)
        )
        .entered();
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

    async fn get_current_snapshot(&mut self) -> std::io::Result<Option<Snapshot>> {
        Ok(self.read_snapshot()?.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Cursor::new(data),
        }))
    }
}

/// Test builds only: a way to make apply panic on purpose, so a test can check that a node whose
/// state machine panics stops instead of serving half-alive. No input can do that on its own
/// (that is the point), so the fault comes from outside: with `DROVER_FAULT_PANIC_ON_RUN` set,
/// applying a submission of a run of that name panics. Release builds have no such hook.
mod fault {
    #[cfg(debug_assertions)]
    pub fn panic_if_poisoned(req: &crate::command::Request) {
        static POISON: std::sync::LazyLock<Option<String>> =
            std::sync::LazyLock::new(|| std::env::var("DROVER_FAULT_PANIC_ON_RUN").ok());
        let Some(poison) = POISON.as_deref() else {
            return;
        };
        for c in req.commands.iter() {
            if let crate::command::Command::SubmitRun { spec, .. } = c
                && spec.name == poison
            {
                panic!("DROVER_FAULT_PANIC_ON_RUN: applying run {poison:?} panics on purpose");
            }
        }
    }

    #[cfg(not(debug_assertions))]
    pub fn panic_if_poisoned(_: &crate::command::Request) {}
}
