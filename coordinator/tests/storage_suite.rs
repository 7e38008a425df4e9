//! Guards: the sled log store and the state machine pass openraft's own storage test suite.

use drover_coordinator::raft::log_store::LogStore;
use drover_coordinator::raft::state_machine::StateMachineStore;
use drover_coordinator::raft::{StorageError, TypeConfig};
use openraft::testing::log::{StoreBuilder, Suite};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled_in(dir.path());
        let log = LogStore::open(
            &db,
            &dir.path().join("sled"),
            prometheus_client::metrics::histogram::Histogram::new([0.001]),
        )
        .expect("log store");
        let sm =
            StateMachineStore::open(&db, dir.path(), Default::default()).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_storage_passes_the_openraft_suite() {
    Suite::test_all(SledBuilder)
        .await
        .expect("openraft storage suite");
}

fn sled_in(dir: &std::path::Path) -> sled::Db {
    sled::Config::new()
        .path(dir.join("sled"))
        .flush_every_ms(None)
        .open()
        .expect("open sled")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_file_survives_a_restart_and_a_damaged_one_is_refused_by_name() {
    // Guards: snapshots live in a file (written whole, then renamed) that a restart loads; a
    // snapshot an older version kept in sled is still read; a damaged file is an error naming it.
    use openraft::storage::RaftStateMachine;
    use openraft::{EntryPayload, RaftSnapshotBuilder};
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sled_in(dir.path());
    let mut sm = StateMachineStore::open(&db, dir.path(), Default::default()).expect("open");
    let entry = drover_coordinator::raft::Entry {
        log_id: drover_coordinator::raft::log_id(1, 1, 1),
        payload: EntryPayload::Blank,
    };
    sm.apply(tokio_stream::iter([Ok((entry, None))]))
        .await
        .expect("apply");
    let built = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build");
    drop(sm);
    let stored = std::fs::read(dir.path().join("snapshot")).expect("snapshot file");
    assert!(stored.starts_with(b"DRVSNAP1"));

    let mut again = StateMachineStore::open(&db, dir.path(), Default::default()).expect("reopen");
    let (applied, _) = again.applied_state().await.expect("applied state");
    assert_eq!(applied.map(|l| l.index), Some(1));
    let current = again
        .get_current_snapshot()
        .await
        .expect("read")
        .expect("a snapshot");
    assert_eq!(current.meta, built.meta);
    drop(again);

    // What an older version stored: the same bytes as sled values, and no file.
    let legacy_dir = tempfile::tempdir().expect("temp dir");
    let legacy_db = sled_in(legacy_dir.path());
    let tree = legacy_db.open_tree("snapshot").expect("tree");
    tree.insert(
        b"meta",
        drover_coordinator::raft::codec::encode(&built.meta).expect("meta"),
    )
    .expect("insert");
    tree.insert(b"data", built.snapshot.into_inner())
        .expect("insert");
    let mut legacy =
        StateMachineStore::open(&legacy_db, legacy_dir.path(), Default::default()).expect("open");
    let (applied, _) = legacy.applied_state().await.expect("applied state");
    assert_eq!(applied.map(|l| l.index), Some(1));

    std::fs::write(dir.path().join("snapshot"), b"DRVSNAP1\xff\xff").expect("damage");
    let err = StateMachineStore::open(&db, dir.path(), Default::default())
        .err()
        .expect("a damaged snapshot is refused");
    assert!(err.contains("snapshot"), "{err}");
}

#[test]
fn snapshots_written_at_once_use_files_of_their_own_and_an_older_never_replaces_a_newer() {
    // Guards: building (snapshot thread) and installing (state-machine worker) wrote the same
    // `snapshot.tmp`; two at once could interleave into one damaged file, or rename an older
    // snapshot over a newer one.
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sled_in(dir.path());
    let sm = StateMachineStore::open(&db, dir.path(), Default::default()).expect("open");
    let meta = |index| openraft::SnapshotMeta {
        last_log_id: Some(drover_coordinator::raft::log_id(1, 1, index)),
        last_membership: Default::default(),
    };
    std::thread::scope(|s| {
        for i in 1..=8u64 {
            let sm = sm.clone();
            let meta = meta(i * 10);
            s.spawn(move || {
                let data = vec![i as u8; 1 << 20];
                sm.persist_snapshot(&meta, &data).expect("persist");
            });
        }
    });
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let stored = std::fs::read(dir.path().join("snapshot")).expect("snapshot file");
    assert_eq!(
        *stored.last().unwrap(),
        8,
        "the newest snapshot is the one kept"
    );
    assert!(stored.len() > 1 << 20, "whole: header and all of the state");
    assert!(
        !sm.persist_snapshot(&meta(5), &[1]).expect("persist"),
        "older: dropped"
    );
    let again = std::fs::read(dir.path().join("snapshot")).expect("snapshot file");
    assert_eq!(again, stored);
}
