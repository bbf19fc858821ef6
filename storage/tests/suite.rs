//! Runs openraft's own storage test suite against `storage::open`, a fresh directory per
//! test: the proof that `LogStore` and `StateMachineStore` meet openraft 0.9's contract.

mod common;

use common::{KvConfig, KvMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use storage::{LogStore, StateMachineStore};
use tempfile::TempDir;

/// Opens the store in a new temporary directory, removed when the guard drops.
struct TempDirBuilder;

impl StoreBuilder<KvConfig, LogStore<KvConfig>, StateMachineStore<KvConfig, KvMachine>, TempDir>
    for TempDirBuilder
{
    async fn build(
        &self,
    ) -> Result<
        (
            TempDir,
            LogStore<KvConfig>,
            StateMachineStore<KvConfig, KvMachine>,
        ),
        StorageError<u64>,
    > {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let (log, sm) = storage::open(dir.path(), KvMachine::default())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn stores_pass_openraft_storage_suite() {
    if let Err(e) = Suite::test_all(TempDirBuilder) {
        panic!("openraft storage suite failed: {e}");
    }
}
