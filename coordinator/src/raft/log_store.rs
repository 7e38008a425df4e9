//! The Raft log and vote in sled. sled only syncs in the background, so every append and vote is
//! made durable before it is reported so: at most one sync per appended batch, never one per entry.
//!
//! sled's own flush is not enough: sled 0.34 writes with `sync_file_range`, which waits for the
//! pages to reach the disk but neither flushes the disk's volatile write cache nor commits the
//! file's metadata, so a power cut could lose an append already counted towards a commit. Each
//! sync therefore also `fdatasync`s sled's data file. And sled writes a value too large for its
//! log (over a quarter of a 512 KiB segment: a batch of large submissions) to a file of its own
//! under `blobs/`, never synced: each sync first syncs the blob files written since the last one,
//! so the pointer in the log never outlives its blob.
//!
//! An append returns once its entries are in sled's buffers and readable; one sync task makes
//! them durable and reports them so, with every append that arrived meanwhile in the same sync.
//! openraft 0.10 replicates an entry as soon as the append returns, so the leader's own sync runs
//! alongside the followers' instead of before them, and its core goes on (heartbeats included)
//! while a slow sync is under way.
//!
//! The newest entries are also kept decoded in memory (`Recent`): replication to each follower
//! and apply read back what was just appended, and decoding it from sled every time was ~9% of
//! the leader's CPU. Their commands are reference-counted, so serving them copies nothing.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::{Entry, LogId, TypeConfig, Vote};
use crate::limits;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    durable: Durability,
    /// Appends waiting to be reported durable, for the sync task (started by the first append).
    flushes: Arc<std::sync::OnceLock<mpsc::Sender<IOFlushed<TypeConfig>>>>,
    /// Highest index openraft has told us is committed; read by readiness and cluster status.
    pub committed_index: Arc<AtomicU64>,
    /// Bytes appended since the store was opened (encoded entries), for the snapshot policy and
    /// the log write-rate metric.
    pub appended_bytes: Arc<AtomicU64>,
    recent: Arc<std::sync::Mutex<Recent>>,
    /// The lowest index still readable: one past the purge point. Entries below it may still be
    /// in sled until the background deletion reaches them.
    kept_from: Arc<AtomicU64>,
    /// Held by the background deletion of purged entries, so purges delete one at a time.
    purging: Arc<std::sync::Mutex<()>>,
}

/// The newest appended entries, contiguous by index, bounded by count and encoded bytes. Always
/// a subset of what sled holds: entries join after sled has them and leave before sled drops
/// them.
#[derive(Default)]
struct Recent {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl Recent {
    fn push(&mut self, entry: Entry, size: usize) {
        if self
            .entries
            .back()
            .is_some_and(|(last, _)| last.log_id.index + 1 != entry.log_id.index)
        {
            // Not contiguous (cannot happen after truncate; kept safe regardless).
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > limits::RAFT_RECENT_ENTRIES_MAX
            || self.bytes > limits::RAFT_RECENT_ENTRY_BYTES_MAX
        {
            let Some((_, size)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= size;
        }
    }

    /// Drops entries at `index` and after.
    fn truncate(&mut self, index: u64) {
        while self
            .entries
            .back()
            .is_some_and(|(e, _)| e.log_id.index >= index)
        {
            let (_, size) = self.entries.pop_back().expect("checked");
            self.bytes -= size;
        }
    }

    /// Drops entries up to and including `index`.
    fn purge(&mut self, index: u64) {
        while self
            .entries
            .front()
            .is_some_and(|(e, _)| e.log_id.index <= index)
        {
            let (_, size) = self.entries.pop_front().expect("checked");
            self.bytes -= size;
        }
    }

    /// Entries `start..end`, if all of them are here.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.entries.front()?.0.log_id.index;
        let last = self.entries.back()?.0.log_id.index;
        if start < first || end > last + 1 || start >= end {
            return None;
        }
        let from = (start - first) as usize;
        Some(
            self.entries
                .range(from..from + (end - start) as usize)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn read_err(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(format!("reading the Raft log: {e}"))
}

fn write_err(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(format!("writing the Raft log: {e}"))
}

/// What makes sled's writes durable: its data file and blob files, and a record of each sync.
#[derive(Clone)]
struct Durability {
    db: sled::Db,
    /// sled's data file (`<sled dir>/db`), for the fdatasync after each flush.
    data_file: Arc<std::fs::File>,
    /// sled's blob files and which of them are synced.
    blobs: Arc<std::sync::Mutex<BlobSync>>,
    /// Durations of the log's syncs (appends, votes, truncations, purges).
    sync_seconds: Histogram,
}

impl Durability {
    /// Flushes sled and syncs its data file (see the module's comment), off the runtime's threads.
    async fn sync(&self) -> std::io::Result<()> {
        let (db, file, blobs) = (self.db.clone(), self.data_file.clone(), self.blobs.clone());
        let started = std::time::Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            blobs.lock().unwrap().sync_new()?;
            db.flush().map_err(std::io::Error::other)?;
            file.sync_data()
        })
        .await
        .map_err(std::io::Error::other)?;
        let took = started.elapsed();
        self.sync_seconds.observe(took.as_secs_f64());
        if took > SLOW_LOG_WRITE {
            tracing::warn!(ms = took.as_millis() as u64, "Raft log sync was slow");
        }
        r
    }

    /// Reports appends durable until every sender is gone: takes all that are waiting, syncs once
    /// for all of them (a sync covers everything written before it began), and reports each.
    async fn report_appends(self, mut waiting: mpsc::Receiver<IOFlushed<TypeConfig>>) {
        let mut batch = Vec::new();
        while waiting
            .recv_many(&mut batch, limits::RAFT_APPENDS_AWAITING_SYNC_MAX)
            .await
            > 0
        {
            let synced = self.sync().await;
            for callback in batch.drain(..) {
                callback.io_completed(match &synced {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                });
            }
        }
    }
}

impl LogStore {
    /// Opens the log in `db`, which sled keeps in `sled_dir`; each sync's duration goes into
    /// `sync_seconds`.
    pub fn open(
        db: &sled::Db,
        sled_dir: &std::path::Path,
        sync_seconds: Histogram,
    ) -> Result<Self, sled::Error> {
        let store = Self {
            durable: Durability {
                data_file: Arc::new(
                    std::fs::File::open(sled_dir.join("db")).map_err(sled::Error::Io)?,
                ),
                blobs: Arc::new(std::sync::Mutex::new(BlobSync::new(sled_dir.join("blobs")))),
                db: db.clone(),
                sync_seconds,
            },
            flushes: Arc::default(),
            log: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
            committed_index: Arc::new(AtomicU64::new(0)),
            appended_bytes: Arc::default(),
            recent: Arc::default(),
            kept_from: Arc::default(),
            purging: Arc::default(),
        };
        let purged: Option<LogId> = store
            .get_meta(KEY_LAST_PURGED)
            .map_err(|e| sled::Error::Unsupported(e.to_string()))?;
        if let Some(p) = purged {
            store.kept_from.store(p.index + 1, Ordering::Relaxed);
        }
        Ok(store)
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> std::io::Result<Option<T>> {
        match self.meta.get(key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => super::codec::decode(&v).map(Some).map_err(read_err),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> std::io::Result<()> {
        let bytes = super::codec::encode(value).map_err(write_err)?;
        self.meta.insert(key, bytes).map_err(write_err)?;
        Ok(())
    }

    async fn sync(&self) -> std::io::Result<()> {
        self.durable.sync().await
    }

    /// Whether this store has never been part of a cluster (no vote, no log).
    pub fn is_fresh(&self) -> std::io::Result<bool> {
        Ok(self.get_meta::<Vote>(KEY_VOTE)?.is_none() && self.log.is_empty())
    }

    /// Hands `callback` to the sync task, starting it on first use; waits while
    /// `RAFT_APPENDS_AWAITING_SYNC_MAX` appends are already waiting.
    async fn report_when_durable(&self, callback: IOFlushed<TypeConfig>) -> std::io::Result<()> {
        let tx = self.flushes.get_or_init(|| {
            let (tx, rx) = mpsc::channel(limits::RAFT_APPENDS_AWAITING_SYNC_MAX);
            tokio::spawn(self.durable.clone().report_appends(rx));
            tx
        });
        tx.send(callback)
            .await
            .map_err(|_| std::io::Error::other("the Raft log's sync task has stopped"))
    }
}

/// A sync this slow delays by as much every commit that waits for this node, and is worth an
/// operator's look (like etcd's "slow fdatasync").
const SLOW_LOG_WRITE: std::time::Duration = std::time::Duration::from_millis(100);

/// sled's `blobs/` directory and the blob files in it already synced.
struct BlobSync {
    dir: std::path::PathBuf,
    synced: std::collections::HashSet<std::ffi::OsString>,
    /// When the last scan began.
    scanned_at: Option<std::time::SystemTime>,
}

/// File times come from a coarse clock (one tick, up to 10 ms, behind): a directory changed after
/// a scan began can carry a time up to a tick before it.
const FILE_TIME_SLACK: std::time::Duration = std::time::Duration::from_millis(50);

impl BlobSync {
    fn new(dir: std::path::PathBuf) -> Self {
        Self {
            dir,
            synced: Default::default(),
            scanned_at: None,
        }
    }

    /// Syncs the files not synced before, then the directory; returns the files synced. Costs
    /// one `stat` when the directory has not changed since well before the last scan.
    fn sync_new(&mut self) -> std::io::Result<Vec<std::path::PathBuf>> {
        let dir_mtime = match std::fs::metadata(&self.dir) {
            Ok(m) => m.modified()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        if self
            .scanned_at
            .is_some_and(|at| dir_mtime + FILE_TIME_SLACK < at)
        {
            return Ok(Vec::new());
        }
        let scan_began = std::time::SystemTime::now();
        let mut present = std::collections::HashSet::new();
        let mut done = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced.contains(&name) {
                match std::fs::File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // Collected by sled meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                done.push(entry.path());
            }
            present.insert(name);
        }
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.synced = present;
        self.scanned_at = Some(scan_began);
        Ok(done)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn read_vote(&mut self) -> std::io::Result<Option<Vote>> {
        self.get_meta(KEY_VOTE)
    }

    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> std::io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        }
        .max(self.kept_from.load(Ordering::Relaxed));
        let end_excl = match range.end_bound() {
            Bound::Included(i) => Some(i + 1),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        if let Some(end) = end_excl
            && let Some(hit) = self.recent.lock().unwrap().get(start, end)
        {
            return Ok(hit);
        }
        if end_excl.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.log.range((Bound::Included(index_key(start)), end)) {
            let (_, v) = item.map_err(read_err)?;
            let entry: Entry = super::codec::decode(&v).map_err(read_err)?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> std::io::Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last = match self.log.last().map_err(read_err)? {
            Some((_, v)) => {
                let entry: Entry = super::codec::decode(&v).map_err(read_err)?;
                Some(entry.log_id)
            }
            None => None,
        }
        // Purged entries still awaiting deletion sort below the purge point.
        .max(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> std::io::Result<()> {
        self.put_meta(KEY_VOTE, vote)?;
        self.sync()
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("saving the Raft vote: {e}")))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> std::io::Result<()> {
        // Not flushed: losing it only means re-learning the commit index from the leader.
        if let Some(c) = committed {
            self.committed_index.fetch_max(c.index, Ordering::Relaxed);
        }
        self.put_meta(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> std::io::Result<Option<LogId>> {
        let committed = self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten();
        if let Some(c) = committed {
            self.committed_index.fetch_max(c.index, Ordering::Relaxed);
        }
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> std::io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        let mut appended = Vec::new();
        for entry in entries {
            let bytes = super::codec::encode(&entry).map_err(write_err)?;
            batch.insert(&index_key(entry.log_id.index), bytes.as_slice());
            appended.push((entry, bytes.len()));
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        let bytes: usize = appended.iter().map(|(_, size)| size).sum();
        self.appended_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        {
            let mut recent = self.recent.lock().unwrap();
            for (entry, size) in appended {
                recent.push(entry, size);
            }
        }
        self.report_when_durable(callback).await
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> std::io::Result<()> {
        let from = last_log_id.map_or(0, |l| l.index + 1);
        self.recent.lock().unwrap().truncate(from);
        let keys: Vec<_> = self
            .log
            .range(index_key(from)..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(write_err)?;
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.sync().await
    }

    async fn purge(&mut self, log_id: LogId) -> std::io::Result<()> {
        // Record the purge point first and make it durable: from then on the entries up to it
        // are garbage, never read again (reads start after it), whenever they are deleted.
        // (The sync warns if slow; nothing else here takes time.)
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        self.sync().await?;
        self.kept_from
            .fetch_max(log_id.index + 1, Ordering::Relaxed);
        self.recent.lock().unwrap().purge(log_id.index);
        // openraft's core waits for this call, and sends nothing meanwhile, heartbeats
        // included (unlike an append, a purge is not reported through a callback): deleting the thousands of entries a snapshot covers took 200-320 ms with a
        // million tasks in state, long enough for followers to elect another leader. So they
        // are deleted in the background, one purge at a time. Entries a crash leaves behind
        // are deleted by the next purge, which starts from the first entry sled holds.
        let (log, one_at_a_time) = (self.log.clone(), self.purging.clone());
        tokio::task::spawn_blocking(move || {
            let _turn = one_at_a_time.lock().unwrap();
            if let Err(e) = delete_upto(&log, log_id.index) {
                tracing::warn!(error = %e, "deleting purged Raft log entries");
            }
        });
        Ok(())
    }
}

/// Deletes every entry at or below `index`, without reading them back (a read of a large entry is
/// a read of its blob file), in small batches with a pause between them. Deleted all at once,
/// the entries of one snapshot interval took a thousand or so blob files with them, and the
/// log syncs of all three nodes waited 400-470 ms behind that burst of filesystem work: long
/// enough for an election. Nothing waits for this, so it can take its time.
fn delete_upto(log: &sled::Tree, index: u64) -> Result<(), sled::Error> {
    const BATCH: u64 = 64;
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(10);
    let Some((first, _)) = log.first()? else {
        return Ok(());
    };
    let Ok(first) = <[u8; 8]>::try_from(first.as_ref()).map(u64::from_be_bytes) else {
        return Ok(());
    };
    let mut from = first;
    while from <= index {
        let to = index.min(from + BATCH - 1);
        let mut batch = sled::Batch::default();
        for i in from..=to {
            batch.remove(&index_key(i));
        }
        log.apply_batch(batch)?;
        from = to + 1;
        if from <= index {
            std::thread::sleep(PAUSE);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{BlobSync, Recent};
    use crate::limits;
    use crate::raft::{Entry, log_id};
    use openraft::EntryPayload;
    use prometheus_client::metrics::histogram::Histogram;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: log_id(1, 0, index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(v: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        v.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn recent_entries_serve_only_ranges_they_hold_whole() {
        // Guards: a read is answered from memory only when every entry asked for is there;
        // truncate and purge keep it a contiguous subset of the log.
        let mut r = Recent::default();
        for i in 5..10 {
            r.push(entry(i), 100);
        }
        assert_eq!(indexes(r.get(6, 9)), Some(vec![6, 7, 8]));
        assert_eq!(indexes(r.get(4, 7)), None, "4 is not held");
        assert_eq!(indexes(r.get(8, 11)), None, "10 is not held");
        assert_eq!(indexes(r.get(7, 7)), None, "empty ranges go to sled");
        r.truncate(8);
        assert_eq!(indexes(r.get(5, 8)), Some(vec![5, 6, 7]));
        assert_eq!(indexes(r.get(5, 9)), None);
        r.purge(5);
        assert_eq!(indexes(r.get(5, 7)), None);
        assert_eq!(r.bytes, 200);
        r.push(entry(12), 100);
        assert_eq!(indexes(r.get(12, 13)), Some(vec![12]), "a gap starts over");
        assert_eq!(r.entries.len(), 1);
    }

    #[test]
    fn recent_entries_stay_within_their_bounds() {
        let mut r = Recent::default();
        for i in 0..(limits::RAFT_RECENT_ENTRIES_MAX as u64 + 10) {
            r.push(entry(i), 1);
        }
        assert_eq!(r.entries.len(), limits::RAFT_RECENT_ENTRIES_MAX);
        let big = limits::RAFT_RECENT_ENTRY_BYTES_MAX / 2 + 1;
        let next = r.entries.back().unwrap().0.log_id.index + 1;
        r.push(entry(next), big);
        r.push(entry(next + 1), big);
        assert_eq!(r.entries.len(), 1, "two halves and a byte do not fit");
        assert_eq!(r.bytes, big);
    }

    #[tokio::test]
    async fn purged_entries_are_unreadable_at_once_and_deleted_after() {
        // Guards: openraft's core waits for purge, so deletion runs in the background; reads
        // and the log state must not see entries at or below the purge point meanwhile, and a
        // store reopened with leftovers below its purge point reads none of them.
        use openraft::RaftLogReader;
        use openraft::storage::RaftLogStorage;
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("sled"))
            .open()
            .unwrap();
        let mut store =
            super::LogStore::open(&db, &dir.path().join("sled"), Histogram::new([0.001])).unwrap();
        store
            .save_vote(&openraft::impls::Vote::new(1, 0))
            .await
            .unwrap();
        for i in 1..=3_000 {
            let bytes = super::super::codec::encode(&entry(i)).unwrap();
            store.log.insert(super::index_key(i), bytes).unwrap();
        }
        let at = |i| log_id(1, 0, i);
        store.purge(at(2_500)).await.unwrap();
        let read = store.try_get_log_entries(0..3_001).await.unwrap();
        assert_eq!(read.first().map(|e| e.log_id.index), Some(2_501));
        assert_eq!(read.len(), 500);
        assert!(store.try_get_log_entries(10..20).await.unwrap().is_empty());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(at(2_500)));
        assert_eq!(state.last_log_id, Some(at(3_000)));
        // The deletion finishes within a bounded time.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.log.len() != 500 {
            assert!(
                std::time::Instant::now() < deadline,
                "purged entries not deleted"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // A purge of everything: the log state still ends at the purge point, and the store
        // reopened after a "crash" that left an entry behind reads nothing below it.
        store.purge(at(3_000)).await.unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(at(3_000)));
        store
            .log
            .insert(
                super::index_key(2_999),
                super::super::codec::encode(&entry(2_999)).unwrap(),
            )
            .unwrap();
        let mut reopened =
            super::LogStore::open(&db, &dir.path().join("sled"), Histogram::new([0.001])).unwrap();
        assert!(reopened.try_get_log_entries(0..).await.unwrap().is_empty());
        assert_eq!(
            reopened.get_log_state().await.unwrap().last_log_id,
            Some(at(3_000))
        );
    }

    #[test]
    fn blob_files_are_synced_once_each_new_one_at_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        let mut sync = BlobSync::new(blobs.clone());
        assert!(
            sync.sync_new().unwrap().is_empty(),
            "no blobs directory yet: nothing to do"
        );
        std::fs::create_dir(&blobs).unwrap();
        std::fs::write(blobs.join("1"), b"one").unwrap();
        std::fs::write(blobs.join("2"), b"two").unwrap();
        assert_eq!(sync.sync_new().unwrap().len(), 2);
        assert!(sync.sync_new().unwrap().is_empty(), "a file is synced once");
        // Written within the same tick of the file clock as the scan: still found.
        std::fs::write(blobs.join("3"), b"three").unwrap();
        assert_eq!(sync.sync_new().unwrap(), [blobs.join("3")]);
        std::fs::remove_file(blobs.join("1")).unwrap();
        assert!(sync.sync_new().unwrap().is_empty());
        assert!(
            !sync.synced.contains(std::ffi::OsStr::new("1")),
            "forgotten once gone"
        );
    }
}
