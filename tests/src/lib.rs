//! Helpers shared by FlockMQ's integration tests: starting real `broker-node`
//! processes on loopback ports, killing and restarting them, and waiting for them.
//!
//! Every node gets its own free ports and data directory, so tests run in parallel.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `broker-node` binary built for this test run.
pub fn broker_binary() -> PathBuf {
    if let Ok(path) = std::env::var("TEST_BROKER_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/broker-node
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("broker-node");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "broker-node", "--bin", "broker-node"])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building broker-node failed");
    }
    bin
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One running `broker-node` process.
pub struct Node {
    child: Option<Child>,
    /// Its MQTT/TCP port.
    pub mqtt_port: u16,
    /// Its HTTP port.
    pub http_port: u16,
    /// Its cluster gRPC port.
    pub cluster_port: u16,
    /// Its data directory (kept across restarts).
    pub data_dir: PathBuf,
    extra_args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Node {
    /// Start a single-node broker with a fresh data directory.
    pub fn start() -> Node {
        Self::start_with(&[])
    }

    /// Start a single-node broker with extra command-line flags.
    pub fn start_with(args: &[&str]) -> Node {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut node = Node {
            child: None,
            mqtt_port: free_port(),
            http_port: free_port(),
            cluster_port: free_port(),
            data_dir: tmp.path().join("data"),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            _tmp: Some(tmp),
        };
        node.spawn();
        node
    }

    /// The MQTT address as `host:port`.
    pub fn mqtt_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mqtt_port))
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .expect("log file");
        let child = Command::new(broker_binary())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--mqtt-addr")
            .arg(format!("127.0.0.1:{}", self.mqtt_port))
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .arg("--cluster-addr")
            .arg(format!("127.0.0.1:{}", self.cluster_port))
            .arg("--ws-addr")
            .arg("off")
            .args(&self.extra_args)
            .env("RUST_LOG", std::env::var("TEST_BROKER_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start broker-node");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Wait until the MQTT port accepts connections.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("broker-node exited early ({status}); log:\n{}", self.log());
                }
            }
            if TcpStream::connect_timeout(&self.mqtt_addr(), Duration::from_millis(200)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("broker-node not ready in 30s; log:\n{}", self.log());
    }

    /// What the node logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// kill -9, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns whether it exited by itself in time.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Start the same node again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The output of an external client program.
#[derive(Debug)]
pub struct Ran {
    /// Exit status code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Run `program` with `args`, killing it after `timeout`.
pub fn run(program: &str, args: &[&str], timeout: Duration) -> Ran {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect output");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Start `program` in the background (a subscriber that must be running before a
/// publish); collect it later with [`Background::finish`].
pub struct Background {
    child: Child,
}

impl Background {
    /// Spawn `program` with `args`.
    pub fn spawn(program: &str, args: &[&str]) -> Background {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        Background { child }
    }

    /// Wait up to `timeout` for it to exit by itself (then kill it) and collect output.
    pub fn finish(mut self, timeout: Duration) -> Ran {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let out = self.child.wait_with_output().expect("collect output");
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Kill it now (an abrupt disconnect) and collect its output.
    pub fn kill(mut self) -> Ran {
        let _ = self.child.kill();
        let out = self.child.wait_with_output().expect("collect output");
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// The repository root (for `tests/python/...`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository root")
        .to_path_buf()
}
