//! `/metrics` of a live node after real traffic: the naming rules of CONVENTIONS.md
//! (prefix `flockmq_`, base units, counters ending in `_total`, no per-client or
//! per-topic labels) and the presence of the state gauges.

use std::collections::BTreeMap;
use std::time::Duration;

use broker_node::mqtt::{Packet, ProtocolVersion, PubAck, QoS, ReasonCode};
use flockmq_tests::mqtt::{next_publish, subscribe};
use flockmq_tests::{free_port, run, wait_until, Node, RawClient};

const T: Duration = Duration::from_secs(10);

/// Metric name → its TYPE, and every label key seen.
fn scrape(node: &Node) -> (BTreeMap<String, String>, Vec<(String, String)>, String) {
    let url = format!("http://127.0.0.1:{}/metrics", node.http_port);
    let body = ureq::get(&url)
        .call()
        .expect("GET /metrics")
        .into_string()
        .expect("text");
    let mut types = BTreeMap::new();
    let mut labels = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                panic!("bad TYPE line {line:?}");
            };
            types.insert(name.to_owned(), kind.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default().to_owned();
            if let Some(inner) = line.split_once('{').and_then(|(_, r)| r.split_once('}')) {
                for pair in inner.0.split(',').filter(|p| !p.is_empty()) {
                    let key = pair.split('=').next().unwrap_or_default().to_owned();
                    labels.push((name.clone(), key));
                }
            }
        }
    }
    (types, labels, body)
}

#[test]
fn metrics_follow_the_naming_rules_and_describe_the_node() {
    let node = Node::start();
    let port = node.mqtt_port.to_string();
    for qos in ["0", "1"] {
        let r = run(
            "mosquitto_pub",
            &[
                "-p",
                &port,
                "-t",
                "fleet/r7/battery",
                "-m",
                "87",
                "-q",
                qos,
                "-r",
            ],
            T,
        );
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    // The state gauges refresh every second, the close counter once the node has
    // seen both clients go: wait for a scrape that has them.
    let mut scraped = None;
    wait_until("the gauges and counters to reflect the traffic", T, || {
        let (types, labels, body) = scrape(&node);
        let settled = [
            "flockmq_connections_closed_total{reason=\"disconnect\"} 2",
            "flockmq_raft_is_leader 1",
            "flockmq_retained_messages 1",
            "flockmq_raft_members{role=\"voter\"} 1",
        ]
        .iter()
        .all(|line| body.lines().any(|l| l == *line));
        scraped = Some((types, labels, body));
        settled
    });
    let (types, labels, body) = scraped.expect("scraped");

    for (name, kind) in &types {
        assert!(
            name.starts_with("flockmq_"),
            "{name} lacks the flockmq_ prefix"
        );
        if kind == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            );
        } else {
            assert!(
                !name.ends_with("_total"),
                "{kind} {name} must not end in _total"
            );
        }
        for unit in ["_ms", "_milliseconds", "_kb", "_kilobytes", "_mb"] {
            assert!(
                !name.contains(unit),
                "{name}: base units only (seconds, bytes)"
            );
        }
    }
    for (name, key) in &labels {
        assert!(
            !["client_id", "clientid", "username", "topic"].contains(&key.as_str()),
            "{name} has an unbounded label {key}"
        );
    }
    for expected in [
        "flockmq_build_info",
        "flockmq_connections",
        "flockmq_connections_closed_total",
        "flockmq_process_resident_memory_bytes",
        "flockmq_process_open_fds",
        "flockmq_process_cpu_seconds_total",
        "flockmq_raft_log_entries",
        "flockmq_connections_opened_total",
        "flockmq_messages_received_total",
        "flockmq_raft_term",
        "flockmq_raft_is_leader",
        "flockmq_raft_applied_index",
        "flockmq_raft_members",
        "flockmq_sessions",
        "flockmq_retained_messages",
        "flockmq_raft_proposal_duration_seconds",
    ] {
        assert!(
            types.contains_key(expected),
            "{expected} missing from:\n{body}"
        );
    }
    assert_eq!(
        types
            .get("flockmq_raft_proposal_duration_seconds")
            .map(String::as_str),
        Some("histogram"),
        "latencies are histograms, so that nodes can be aggregated"
    );
    assert!(
        body.contains("flockmq_connections_closed_total{reason=\"disconnect\"} 2"),
        "{body}"
    );
    assert!(body.contains("flockmq_raft_is_leader 1"), "{body}");
    assert!(body.contains("flockmq_retained_messages 1"), "{body}");
    assert!(
        body.contains("flockmq_raft_members{role=\"voter\"} 1"),
        "{body}"
    );
}

/// A Prometheus server (Debian's package) the test starts and stops.
struct Prometheus {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrape `targets` (host:port of /metrics) every second.
    fn scraping(targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = dir.path().join("prometheus.yml");
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: flockmq\n    static_configs:\n      - targets: [{list}]\n"
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run prometheus (scripts/install-test-deps.sh installs it)");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// GET an API path; `None` while Prometheus is not answering yet.
    fn get(&self, path: &str, query: &[(&str, &str)]) -> Option<serde_json::Value> {
        let mut request = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port));
        for (k, v) in query {
            request = request.query(k, v);
        }
        request.call().ok()?.into_json().ok()
    }

    /// The value of an instant query returning one sample.
    fn scalar(&self, promql: &str) -> Option<f64> {
        let answer = self.get("/api/v1/query", &[("query", promql)])?;
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    }

    /// Poll `what` every 500 ms until it is `Some` and passes `done`, or panic after
    /// `within`.
    fn wait<T: std::fmt::Debug>(
        &self,
        within: Duration,
        what: impl Fn(&Prometheus) -> Option<T>,
        done: impl Fn(&T) -> bool,
        describe: &str,
    ) -> T {
        let deadline = std::time::Instant::now() + within;
        let mut last = None;
        while std::time::Instant::now() < deadline {
            last = what(self);
            if last.as_ref().is_some_and(&done) {
                return last.expect("checked above");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("Prometheus: {describe}; last seen {last:?}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_the_node_and_sees_the_message_counter_rise() {
    let node = Node::start();
    let target = format!("127.0.0.1:{}", node.http_port);
    let prometheus = Prometheus::scraping(std::slice::from_ref(&target));
    let health = prometheus.wait(
        Duration::from_secs(60),
        |p| {
            let targets = p.get("/api/v1/targets", &[])?;
            let active = targets["data"]["activeTargets"].as_array()?.clone();
            active
                .iter()
                .find(|t| t["labels"]["instance"] == target.as_str())
                .and_then(|t| t["health"].as_str().map(str::to_owned))
        },
        |h| h == "up",
        "the node's target is up",
    );
    assert_eq!(health, "up");
    let query = "sum(flockmq_messages_received_total{job=\"flockmq\"}) or vector(0)";
    let before = prometheus.wait(
        Duration::from_secs(30),
        |p| p.scalar(query),
        |_| true,
        "the message counter is queryable",
    );

    let port = node.mqtt_port.to_string();
    for i in 0..20 {
        let r = run(
            "mosquitto_pub",
            &[
                "-p",
                &port,
                "-t",
                "warehouse/a1/temp",
                "-m",
                &i.to_string(),
                "-q",
                "1",
            ],
            T,
        );
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    let after = prometheus.wait(
        Duration::from_secs(30),
        |p| p.scalar(query),
        |v| *v >= before + 20.0,
        "flockmq_messages_received_total rose by the 20 messages published",
    );
    assert!(after >= before + 20.0, "{before} -> {after}");
    // A gauge and a histogram arrive intact too.
    let up = prometheus.scalar("up{job=\"flockmq\"}");
    assert_eq!(up, Some(1.0));
    let buckets = prometheus.wait(
        Duration::from_secs(10),
        |p| p.scalar("count(flockmq_raft_proposal_duration_seconds_bucket)"),
        |n| *n > 1.0,
        "the proposal latency histogram has buckets",
    );
    assert!(buckets > 1.0);

    // Every query of the Grafana dashboard is valid PromQL for this Prometheus, and
    // names only metrics a node exports (those of forwarding and snapshots appear once
    // there are peers or snapshots; the cluster tests see those).
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            flockmq_tests::repo_root().join("helm/grafana/flockmq-dashboard.json"),
        )
        .expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    let exported: Vec<String> = prometheus
        .get("/api/v1/label/__name__/values", &[])
        .and_then(|v| serde_json::from_value(v["data"].clone()).ok())
        .expect("metric names");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let concrete = expr
                .replace("$job", "flockmq")
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m");
            let answer = prometheus
                .get("/api/v1/query", &[("query", &concrete)])
                .unwrap_or_else(|| panic!("Prometheus rejected {concrete}"));
            assert_eq!(answer["status"], "success", "{concrete}: {answer}");
            queries += 1;
            for name in metric_names(expr) {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                let later = base.starts_with("flockmq_forward_") || base.contains("snapshot");
                assert!(
                    later
                        || exported
                            .iter()
                            .any(|e| e == base || e.starts_with(&format!("{base}_"))),
                    "the dashboard's {name} is not exported (panel {})",
                    panel["title"]
                );
            }
        }
    }
    assert!(queries > 30, "{queries} queries");
}

/// The `flockmq_...` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("flockmq_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn sys_topics_carry_the_same_counts_as_the_metrics() {
    let node = Node::start_with_config("[mqtt]\nsys_interval = \"200ms\"\n");
    let port = node.mqtt_port.to_string();
    for (i, topic) in ["warehouse/a1/temp", "warehouse/a2/temp", "fleet/r1/battery"]
        .iter()
        .enumerate()
    {
        let payload = i.to_string();
        let r = run(
            "mosquitto_pub",
            &["-p", &port, "-t", topic, "-m", &payload, "-q", "1", "-r"],
            T,
        );
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    // The state gauges refresh every second: wait for one that saw all three. (The
    // $SYS topics are computed afresh on each publication.)
    wait_until("the retained gauge to count 3", T, || {
        node.metrics()
            .lines()
            .any(|l| l == "flockmq_retained_messages 3")
    });
    let sys = |topic: &str| -> f64 {
        let r = run(
            "mosquitto_sub",
            &[
                "-p",
                &port,
                "-t",
                &format!("$SYS/broker/{topic}"),
                "-C",
                "1",
                "-W",
                "5",
            ],
            T,
        );
        r.stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("$SYS/broker/{topic}: {r:?}"))
    };
    let (_, _, body) = scrape(&node);
    let metric = |name: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        sys("messages/received"),
        metric("flockmq_messages_received_total")
    );
    assert_eq!(sys("messages/received"), 3.0);
    assert_eq!(
        sys("retained messages/count"),
        metric("flockmq_retained_messages")
    );
    assert_eq!(sys("retained messages/count"), 3.0);
    // The reader of $SYS is itself a subscription, absent when the metrics were read.
    assert_eq!(
        sys("subscriptions/count"),
        metric("flockmq_subscriptions") + 1.0
    );
    assert_eq!(
        sys("store/messages/count"),
        metric("flockmq_queued_messages")
    );
}

#[test]
fn the_inflight_gauge_counts_unacknowledged_deliveries() {
    let node = Node::start();
    let (mut slow, _) = RawClient::connect(node.mqtt_addr(), ProtocolVersion::V5, "slow", true, 60);
    subscribe(&mut slow, "belt/+/jam", QoS::AtLeastOnce);
    let port = node.mqtt_port.to_string();
    for belt in ["b1", "b2", "b3"] {
        let topic = format!("belt/{belt}/jam");
        let r = run(
            "mosquitto_pub",
            &["-p", &port, "-t", &topic, "-m", "1", "-q", "1"],
            T,
        );
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    let ids: Vec<u16> = (0..3)
        .map(|_| {
            next_publish(&mut slow, T)
                .and_then(|p| p.packet_id)
                .expect("a QoS 1 delivery")
        })
        .collect();
    let gauge = || -> f64 {
        let (_, _, body) = scrape(&node);
        body.lines()
            .find_map(|l| l.strip_prefix("flockmq_inflight_messages "))
            .and_then(|v| v.trim().parse().ok())
            .expect("flockmq_inflight_messages in /metrics")
    };
    // The state gauges refresh every second.
    let settled = |want: f64| {
        let deadline = std::time::Instant::now() + T;
        while gauge() != want {
            assert!(
                std::time::Instant::now() < deadline,
                "inflight {} != {want}",
                gauge()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    settled(3.0);
    for id in ids {
        slow.send(&Packet::PubAck(PubAck::new(id, ReasonCode::Success)));
    }
    settled(0.0);
}
