//! Guards: the sled log store and the state machine pass openraft's own storage test suite.

use drover_coordinator::raft::log_store::LogStore;
use drover_coordinator::raft::state_machine::StateMachineStore;
use drover_coordinator::raft::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new()
            .path(dir.path().join("sled"))
            .flush_every_ms(None)
            .open()
            .expect("open sled");
        let log = LogStore::open(&db).expect("log store");
        let sm = StateMachineStore::open(&db, Default::default()).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_storage_passes_the_openraft_suite() {
    Suite::test_all(SledBuilder).expect("openraft storage suite");
}
