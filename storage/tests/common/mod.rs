//! A tiny key-value type config and machine, used to drive the storage crate the way the
//! broker will: through `storage::open` and openraft's traits only.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};

use openraft::{Entry, EntryPayload, LogId};
use serde::{Deserialize, Serialize};
use storage::Machine;

/// The test command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`.
    Set { key: String, value: String },
}

/// The test response: the value the key held before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvResponse {
    pub previous: Option<String>,
}

openraft::declare_raft_types!(
    /// Type config of the storage tests.
    pub KvConfig:
        D = KvCommand,
        R = KvResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<KvConfig>,
        SnapshotData = storage::SnapshotFile,
);

/// A BTreeMap key-value machine; also records the last index it applied itself.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvMachine {
    pub data: BTreeMap<String, String>,
}

impl Machine<KvConfig> for KvMachine {
    type Error = serde_json::Error;

    fn apply(&mut self, _log_id: &LogId<u64>, cmd: &KvCommand) -> KvResponse {
        match cmd {
            KvCommand::Set { key, value } => KvResponse {
                previous: self.data.insert(key.clone(), value.clone()),
            },
        }
    }

    fn snapshot(&self, out: &mut dyn Write) -> Result<(), Self::Error> {
        serde_json::to_writer(out, &self.data)
    }

    fn restore(&mut self, input: &mut dyn Read, _len: u64) -> Result<(), Self::Error> {
        self.data = serde_json::from_reader(input)?;
        Ok(())
    }
}

/// A log id of leader term `term` (node 0) at `index`.
pub fn log_id(term: u64, index: u64) -> LogId<u64> {
    openraft::testing::log_id(term, 0, index)
}

/// A blank entry.
pub fn blank(term: u64, index: u64) -> Entry<KvConfig> {
    openraft::testing::blank_ent::<KvConfig>(term, 0, index)
}

/// A normal entry setting `key` to `value`.
pub fn set(term: u64, index: u64, key: &str, value: &str) -> Entry<KvConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(KvCommand::Set {
            key: key.to_owned(),
            value: value.to_owned(),
        }),
    }
}

/// A membership entry with voters `voters`.
pub fn membership(term: u64, index: u64, voters: &[u64]) -> Entry<KvConfig> {
    openraft::testing::membership_ent::<KvConfig>(
        term,
        0,
        index,
        vec![voters.iter().copied().collect()],
    )
}

/// Environment variable telling a re-executed test binary that it is the crashing child
/// and which directory to write into.
pub const CRASH_CHILD_DIR: &str = "FLOCKMQ_STORAGE_CRASH_CHILD_DIR";

/// File the child creates right before aborting, proving it reached the crash point.
const REACHED_CRASH_POINT: &str = "reached-crash-point";

/// In the crashing child: the directory it must write into. `None` in the parent.
pub fn crash_child_dir() -> Option<std::path::PathBuf> {
    std::env::var_os(CRASH_CHILD_DIR).map(std::path::PathBuf::from)
}

/// In the crashing child: marks the crash point reached and dies like `kill -9` would
/// leave it: no destructor, no flush, no sled shutdown.
pub fn crash_now(dir: &std::path::Path) -> ! {
    std::fs::write(dir.join(REACHED_CRASH_POINT), b"").expect("write the crash marker");
    std::process::abort()
}

/// In the parent: re-runs test `test_name` of this binary as a child process writing
/// into `data_dir` (its database lives in `data_dir/db`), waits for it to abort, and
/// checks that it aborted at its crash point rather than failing earlier.
pub fn run_crashing_child(test_name: &str, data_dir: &std::path::Path) {
    let exe = std::env::current_exe().expect("locate the test binary");
    let output = std::process::Command::new(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD_DIR, data_dir)
        .output()
        .expect("spawn the crashing child");
    assert!(
        data_dir.join(REACHED_CRASH_POINT).exists(),
        "child did not reach its crash point: status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        !output.status.success(),
        "child exited cleanly instead of crashing"
    );
}

/// Open the stores at `path`, as a restarted node does. A store just dropped in this
/// process may still hold sled's file lock for a moment (its flusher thread lets go
/// of the database after the last handle): retry that, and only that, for a while.
#[allow(dead_code)] // not every test binary reopens
pub fn reopen(
    path: &std::path::Path,
) -> (
    storage::LogStore<KvConfig>,
    storage::StateMachineStore<KvConfig, KvMachine>,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match storage::open(path, KvMachine::default()) {
            Ok(stores) => return stores,
            Err(e)
                if format!("{e:?}").contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open storage: {e:?}"),
        }
    }
}

/// The whole of a snapshot's file, from where it stands.
pub async fn snapshot_bytes(file: &mut storage::SnapshotFile) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).await.unwrap();
    bytes
}
