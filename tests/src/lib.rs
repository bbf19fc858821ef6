//! Helpers shared by FlockMQ's integration tests: starting real `broker-node`
//! processes on loopback ports, killing and restarting them, and waiting for them.
//!
//! Every node gets its own free ports and data directory, so tests run in parallel.

pub mod browser;
pub mod mqtt;
pub mod netns;
pub mod pki;
pub mod relay;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `broker-node` binary, built (or brought up to date) once per test process:
/// cargo does not rebuild another package's binary for this crate's tests by itself.
pub fn broker_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(path) = std::env::var("TEST_BROKER_BIN") {
            return PathBuf::from(path);
        }
        // target/<profile>/deps/<test-binary> → target/<profile>/broker-node
        let exe = std::env::current_exe().expect("current test executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in target/<profile>/deps");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "broker-node", "--bin", "broker-node"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if let Some(target_dir) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target_dir);
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building broker-node failed");
        profile_dir.join("broker-node")
    })
    .clone()
}

/// A port on 127.0.0.1 that was free a moment ago. Ports come from below the
/// kernel's ephemeral range (32768 and up), so that the outgoing connections of clients
/// in parallel tests cannot take them, and from a per-process counter, so that two
/// tests of one run never get the same one.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let _ = NEXT.compare_exchange(
        0,
        12_000 + (std::process::id() % 1000) * 16,
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
    );
    loop {
        let candidate = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let port = u16::try_from(12_000 + candidate % 20_000).expect("port in range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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
    /// The address it listens on: 127.0.0.1, or its own in a [`netns::Network`].
    pub host: Ipv4Addr,
    /// The network namespace it runs in, if not the test's own.
    netns: Option<String>,
    /// The admin API's bearer token, where the API is reached off loopback.
    api_token: Option<String>,
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
    _config_dir: Option<tempfile::TempDir>,
}

impl Node {
    /// Start a single-node broker with a fresh data directory.
    pub fn start() -> Node {
        Self::start_with(&[])
    }

    /// Start a single-node broker with a configuration file holding `toml`.
    pub fn start_with_config(toml: &str) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("flockmq.toml");
        std::fs::write(&path, toml).expect("write config");
        let mut node = Self::start_with(&["--config", path.to_str().expect("utf-8 path")]);
        node._config_dir = Some(dir);
        node
    }

    /// A node on loopback with free ports, a fresh data directory and `args` as extra
    /// flags, not started yet.
    fn local(args: &[&str]) -> Node {
        let tmp = tempfile::tempdir().expect("temp dir");
        Node {
            child: None,
            mqtt_port: free_port(),
            http_port: free_port(),
            cluster_port: free_port(),
            data_dir: tmp.path().join("data"),
            host: Ipv4Addr::LOCALHOST,
            netns: None,
            api_token: None,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            extra_env: Vec::new(),
            _tmp: Some(tmp),
            _config_dir: None,
        }
    }

    /// Start one broker per entry of `args` (its extra flags), all processes first and
    /// then waiting for each: for joins that must race.
    pub fn start_together(args: &[&[&str]]) -> Vec<Node> {
        let mut nodes: Vec<Node> = args
            .iter()
            .map(|args| {
                let mut node = Node::local(args);
                node.spawn_process();
                node
            })
            .collect();
        for node in &mut nodes {
            node.wait_ready();
        }
        nodes
    }

    /// Start a single-node broker with extra command-line flags.
    pub fn start_with(args: &[&str]) -> Node {
        let mut node = Node::local(args);
        node.spawn();
        node
    }

    /// Start a broker with `args` as extra flags and the environment variables `env`.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut node = Node::local(args);
        node.extra_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        node.spawn();
        node
    }

    /// Start a single-node broker on a copy of the data directory `data` (a fixture an
    /// earlier release wrote).
    pub fn start_from(data: &Path) -> Node {
        let mut node = Node::local(&[]);
        copy_tree(data, &node.data_dir);
        node.spawn();
        node
    }

    /// Start `n` nodes forming one fresh Raft cluster (`--initial-cluster`).
    pub fn cluster(n: usize) -> Vec<Node> {
        Self::cluster_with_env(n, &[])
    }

    /// Start `n` nodes forming one fresh Raft cluster, each with the environment
    /// variables `env` (settings as `FLOCKMQ_...`).
    pub fn cluster_with_env(n: usize, env: &[(&str, &str)]) -> Vec<Node> {
        Self::form_cluster(n, env, |_| (Ipv4Addr::LOCALHOST, None), |_| Vec::new())
    }

    /// Start one node of a fresh Raft cluster in each namespace of `net`, on ports
    /// 1883 (MQTT), 8080 (HTTP) and 7000 (cluster) of its own address.
    pub fn cluster_in(net: &netns::Network, n: usize, env: &[(&str, &str)]) -> Vec<Node> {
        Self::form_cluster(
            n,
            env,
            |id| (net.addr(id), Some(net.namespace(id))),
            |_| Vec::new(),
        )
    }

    /// Start `n` nodes forming one fresh Raft cluster, node `id` (from 1) with the
    /// environment variables `env_of(id)` besides `env`.
    pub fn cluster_with_node_env(
        n: usize,
        env: &[(&str, &str)],
        env_of: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Vec<Node> {
        Self::form_cluster(n, env, |_| (Ipv4Addr::LOCALHOST, None), env_of)
    }

    fn form_cluster(
        n: usize,
        env: &[(&str, &str)],
        place: impl Fn(usize) -> (Ipv4Addr, Option<String>),
        env_of: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Vec<Node> {
        let mut nodes: Vec<Node> = (1..=n)
            .map(|id| {
                let tmp = tempfile::tempdir().expect("temp dir");
                let (host, netns) = place(id);
                let port = |fixed| if netns.is_some() { fixed } else { free_port() };
                // Off loopback the admin API wants a token.
                let api_token = netns.as_ref().map(|_| "cluster-test-token".to_owned());
                let mut extra_env: Vec<(String, String)> = env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                if let Some(token) = &api_token {
                    extra_env.push(("FLOCKMQ_API_TOKEN".into(), token.clone()));
                    // Beyond loopback, but on the test's own private network.
                    extra_env.push(("FLOCKMQ_CLUSTER__ALLOW_INSECURE".into(), "true".into()));
                }
                extra_env.extend(env_of(id));
                Node {
                    child: None,
                    mqtt_port: port(1883),
                    http_port: port(8080),
                    cluster_port: port(7000),
                    data_dir: tmp.path().join("data"),
                    host,
                    netns,
                    api_token,
                    extra_args: vec!["--node-id".into(), id.to_string()],
                    extra_env,
                    _tmp: Some(tmp),
                    _config_dir: None,
                }
            })
            .collect();
        let initial = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| format!("{}={}:{}", i + 1, node.host, node.cluster_port))
            .collect::<Vec<_>>()
            .join(",");
        for node in &mut nodes {
            node.extra_args.push("--initial-cluster".into());
            node.extra_args.push(initial.clone());
        }
        // All processes first, then wait: a node's readiness needs a majority.
        for node in &mut nodes {
            node.spawn_process();
        }
        for node in &mut nodes {
            node.wait_ready();
        }
        nodes
    }

    /// The MQTT address as `host:port`.
    pub fn mqtt_addr(&self) -> SocketAddr {
        SocketAddr::from((self.host, self.mqtt_port))
    }

    fn spawn(&mut self) {
        self.spawn_process();
        self.wait_ready();
    }

    fn spawn_process(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .expect("log file");
        let mut command = match &self.netns {
            // `ip netns exec` execs the program, so the child is the broker itself.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(broker_binary());
                c
            }
            None => Command::new(broker_binary()),
        };
        let child = command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--mqtt-addr")
            .arg(format!("{}:{}", self.host, self.mqtt_port))
            .arg("--http-addr")
            .arg(format!("{}:{}", self.host, self.http_port))
            .arg("--cluster-addr")
            .arg(format!("{}:{}", self.host, self.cluster_port))
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("TEST_BROKER_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start broker-node");
        self.child = Some(child);
    }

    /// Publish a retained QoS 1 message with `mosquitto_pub`; panics if it fails.
    pub fn publish_retained(&self, topic: &str, payload: &str) {
        let port = self.mqtt_port.to_string();
        let args = ["-p", &port, "-t", topic, "-m", payload, "-r", "-q", "1"];
        let r = run("mosquitto_pub", &args, Duration::from_secs(10));
        assert_eq!(r.code, Some(0), "{r:?}");
    }

    /// Wait until the MQTT port accepts connections (it opens once a leader is known).
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

    /// The JSON answer of the admin API at `/api/v1{path}`, or the error.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let url = format!("http://{}:{}/api/v1{path}", self.host, self.http_port);
        let mut request = ureq::request(method, &url).timeout(Duration::from_secs(30));
        if let Some(token) = &self.api_token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        let response = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        match response {
            Ok(r) if r.status() == 204 => Ok(serde_json::Value::Null),
            Ok(r) => r.into_json().map_err(|e| e.to_string()),
            Err(ureq::Error::Status(code, r)) => {
                Err(format!("{code}: {}", r.into_string().unwrap_or_default()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// This node's cluster status (`GET /api/v1/cluster`).
    pub fn status(&self) -> serde_json::Value {
        self.api("GET", "/cluster", None)
            .unwrap_or_else(|e| panic!("cluster status of node on port {}: {e}", self.mqtt_port))
    }

    /// The body of the node's Prometheus endpoint (`GET /metrics`).
    pub fn metrics(&self) -> String {
        let url = format!("http://{}:{}/metrics", self.host, self.http_port);
        let body = match ureq::get(&url).timeout(Duration::from_secs(30)).call() {
            Ok(r) => r.into_string().map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        body.unwrap_or_else(|e| panic!("/metrics of node on port {}: {e}", self.mqtt_port))
    }

    /// The session of `client_id` as the admin API shows it (`GET /sessions/<id>`), or
    /// `None` when the node holds no session for it.
    pub fn session(&self, client_id: &str) -> Option<serde_json::Value> {
        self.api("GET", &format!("/sessions/{}", url_encode(client_id)), None)
            .ok()
    }

    /// Wait until this node's applied state holds the subscription of `client_id` to
    /// `filter` exactly (`GET /subscriptions?clientid=...`): from then on a publish
    /// through this node reaches it. Give external clients an explicit client id
    /// (`mosquitto_sub -i`). Panics after 15 s.
    pub fn wait_subscribed(&self, client_id: &str, filter: &str) {
        let path = format!("/subscriptions?clientid={}", url_encode(client_id));
        wait_for(
            &format!(
                "{client_id}'s subscription to {filter} on the node with MQTT port {}",
                self.mqtt_port
            ),
            Duration::from_secs(15),
            || match self.api("GET", &path, None) {
                Ok(v)
                    if v["data"]
                        .as_array()
                        .is_some_and(|d| d.iter().any(|s| s["topic"] == filter)) =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            },
        );
    }

    /// Wait until this node's applied state shows the session of `client_id` as
    /// `"connected": connected` (false: the node has processed the end of its
    /// connection), and return the session. Panics after 15 s.
    pub fn wait_connected(&self, client_id: &str, connected: bool) -> serde_json::Value {
        wait_for(
            &format!(
                "{client_id}'s session to be connected: {connected} on the node with MQTT port {}",
                self.mqtt_port
            ),
            Duration::from_secs(15),
            || match self.session(client_id) {
                Some(s) if s["connected"] == connected => Ok(s),
                other => Err(format!("{other:?}")),
            },
        )
    }

    /// Wait until this node's applied state holds no session for `client_id` (ended
    /// with a clean start, or expired). Panics after 15 s.
    pub fn wait_no_session(&self, client_id: &str) {
        wait_for(
            &format!(
                "{client_id}'s session to end on the node with MQTT port {}",
                self.mqtt_port
            ),
            Duration::from_secs(15),
            || match self.session(client_id) {
                None => Ok(()),
                Some(s) => Err(s.to_string()),
            },
        );
    }

    /// The index of the last log entry this node's state includes (`digest_index`).
    pub fn applied_index(&self) -> u64 {
        self.status()["digest_index"].as_u64().unwrap_or(0)
    }

    /// Wait until this node has applied an entry past `index` (see
    /// [`Node::applied_index`]): something proposed after `index` was read is in its
    /// state. Panics after 15 s.
    pub fn wait_applied_past(&self, index: u64) {
        wait_for(
            &format!(
                "the node with MQTT port {} to apply past index {index}",
                self.mqtt_port
            ),
            Duration::from_secs(15),
            || match self.applied_index() {
                i if i > index => Ok(()),
                i => Err(format!("applied index {i}")),
            },
        );
    }

    /// What the node logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// The process id of the running node.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the node is running").id()
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

    /// Set the environment variable `key` to `value` for the next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.remove_env(key);
        self.extra_env.push((key.to_owned(), value.to_owned()));
    }

    /// Leave out the environment variable `key` from the next start (an upgrade, when
    /// it is a hook that plays an earlier release).
    pub fn remove_env(&mut self, key: &str) {
        self.extra_env.retain(|(k, _)| k != key);
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
        // A failing test shows what its nodes said (the last lines of each).
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last {} log lines of the node with MQTT port {} ---\n{}",
                tail.len(),
                self.mqtt_port,
                tail.join("\n")
            );
        }
    }
}

/// Wait until every running node in `nodes` reports the same state digest at the same
/// applied index (invariant 3), and return that digest. Panics after 15 s.
///
/// Also the way to wait for a change made through one node (a subscription, say) to be
/// applied on all of them before acting on it elsewhere.
pub fn converged(nodes: &[&Node]) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = Vec::new();
    while Instant::now() < deadline {
        last = nodes
            .iter()
            .map(|n| {
                let s = n.status();
                (
                    s["digest_index"].as_u64(),
                    s["digest"].as_str().map(str::to_owned),
                )
            })
            .collect::<Vec<_>>();
        // (A node whose state changed under every attempt answers no digest.)
        if last.windows(2).all(|w| w[0] == w[1]) && last[0].0.is_some() && last[0].1.is_some() {
            return last[0].1.clone().unwrap_or_default();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nodes did not converge in 15 s: (applied index, digest) per node: {last:?}");
}

/// Poll `attempt` every 20 ms until it returns `Ok`, and return that value; after
/// `within`, panic with "timed out waiting for {what}" and the last `Err` (what was
/// seen instead). The way to synchronize with a broker or a client instead of
/// sleeping for a fixed time.
pub fn wait_for<T>(
    what: &str,
    within: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match attempt() {
            Ok(v) => return v,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}; last seen: {seen}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Poll `condition` every 20 ms until it holds; panics with "timed out waiting for
/// {what}" after `within`.
pub fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    wait_for(what, within, || {
        condition()
            .then_some(())
            .ok_or_else(|| "not yet".to_owned())
    })
}

/// A seeded generator (splitmix64): small, and the same on every platform and
/// release, so that a printed seed replays a fault schedule or a fuzzer's input.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.range(0, n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// `s` percent-encoded for a URL path segment or query value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every node of `nodes` that is running.
pub fn running(nodes: &[Node]) -> Vec<&Node> {
    nodes.iter().filter(|n| n.child.is_some()).collect()
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
    collect(child)
}

/// Wait for an exited (or killed) child and gather what it printed.
fn collect(child: Child) -> Ran {
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
        collect(self.child)
    }

    /// Kill it now (an abrupt disconnect) and collect its output.
    pub fn kill(mut self) -> Ran {
        let _ = self.child.kill();
        collect(self.child)
    }
}

/// Copy the directory `from` into `to` (created), recursively.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create directory");
    for entry in std::fs::read_dir(from).expect("read fixture directory") {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy fixture file");
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

/// A bare MQTT client over a blocking socket, speaking through FlockMQ's codec: for
/// tests that must see exactly which packets the broker sends, and when.
pub struct RawClient {
    stream: Wire,
    buf: bytes::BytesMut,
    /// Bytes read from the socket.
    received: u64,
    /// The protocol version of this connection.
    pub version: broker_node::mqtt::ProtocolVersion,
}

/// A [`RawClient`]'s byte stream: plain TCP, or TLS over it.
enum Wire {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Wire {
    fn socket(&self) -> &TcpStream {
        match self {
            Wire::Plain(s) => s,
            Wire::Tls(t) => &t.sock,
        }
    }
}

impl std::io::Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Wire::Plain(s) => s.read(buf),
            Wire::Tls(t) => t.read(buf),
        }
    }
}

impl std::io::Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Wire::Plain(s) => s.write(buf),
            Wire::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Wire::Plain(s) => s.flush(),
            Wire::Tls(t) => t.flush(),
        }
    }
}

impl RawClient {
    /// Open a TCP connection (no CONNECT sent yet).
    pub fn open(addr: SocketAddr, version: broker_node::mqtt::ProtocolVersion) -> RawClient {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawClient {
            stream: Wire::Plain(stream),
            buf: bytes::BytesMut::new(),
            received: 0,
            version,
        }
    }

    /// Open a TLS connection to a server certified for `localhost` by the CA
    /// certificate in `ca_pem`, and finish the handshake (no CONNECT sent yet).
    pub fn open_tls(
        addr: SocketAddr,
        version: broker_node::mqtt::ProtocolVersion,
        ca_pem: &Path,
    ) -> RawClient {
        use std::io::Write;
        let pem = std::fs::read(ca_pem).expect("CA certificate");
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            roots.add(cert.expect("PEM")).expect("CA");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS");
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut tls = rustls::StreamOwned::new(conn, stream);
        tls.flush().expect("TLS handshake");
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
        }
        RawClient {
            stream: Wire::Tls(Box::new(tls)),
            buf: bytes::BytesMut::new(),
            received: 0,
            version,
        }
    }

    /// Send raw bytes under TLS, on the socket itself (bytes that are no TLS record);
    /// on a plain connection the same as [`RawClient::send_raw`].
    pub fn send_raw_on_socket(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let mut socket = self.stream.socket();
        socket.write_all(bytes).expect("write");
    }

    /// Open a connection and CONNECT with `client_id`; returns the client and CONNACK.
    pub fn connect(
        addr: SocketAddr,
        version: broker_node::mqtt::ProtocolVersion,
        client_id: &str,
        clean_start: bool,
        keep_alive: u16,
    ) -> (RawClient, broker_node::mqtt::ConnAck) {
        use broker_node::mqtt::{Connect, Packet};
        let mut c = RawClient::open(addr, version);
        c.send(&Packet::Connect(Box::new(Connect {
            protocol: version,
            clean_start,
            keep_alive,
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        })));
        match c.recv(Duration::from_secs(10)) {
            Some(Packet::ConnAck(ack)) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Open a connection and send `connect` as it is; returns the client and CONNACK.
    pub fn connect_with(
        addr: SocketAddr,
        connect: broker_node::mqtt::Connect,
    ) -> (RawClient, broker_node::mqtt::ConnAck) {
        use broker_node::mqtt::Packet;
        let mut c = RawClient::open(addr, connect.protocol);
        c.send(&Packet::Connect(Box::new(connect)));
        match c.recv(Duration::from_secs(10)) {
            Some(Packet::ConnAck(ack)) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Bytes received from the broker so far (decoded or not).
    pub fn bytes_received(&self) -> u64 {
        self.received
    }

    /// Send a packet.
    pub fn send(&mut self, packet: &broker_node::mqtt::Packet) {
        use std::io::Write;
        let mut out = bytes::BytesMut::new();
        broker_node::mqtt::encode(packet, self.version, &mut out).expect("encode");
        self.stream.write_all(&out).expect("write");
    }

    /// Send raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.stream.write_all(bytes).expect("write");
    }

    /// The next packet within `timeout`; `None` on timeout or when the broker closed
    /// the connection (see [`RawClient::is_closed`]).
    pub fn recv(&mut self, timeout: Duration) -> Option<broker_node::mqtt::Packet> {
        use std::io::Read;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) =
                broker_node::mqtt::decode(&mut self.buf, Some(self.version), 268_435_455)
                    .expect("broker sent a malformed packet")
            {
                return Some(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream
                .socket()
                .set_read_timeout(Some(left))
                .expect("timeout");
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => {
                    self.received += n as u64;
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(_) => return None,
            }
        }
    }

    /// Whether the broker has closed the connection (waiting up to `timeout`).
    pub fn is_closed(&mut self, timeout: Duration) -> bool {
        use std::io::Read;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream
                .socket()
                .set_read_timeout(Some(left))
                .expect("timeout");
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => {
                    self.received += n as u64;
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                // (Under TLS: closed without a close_notify.)
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    return true
                }
                Err(_) => return false,
            }
        }
    }
}
