//! `/metrics` of a live node after real traffic: the naming rules of CONVENTIONS.md
//! (prefix `flockmq_`, except the standard `process_` figures, base units, counters
//! ending in `_total`, no per-client or per-topic labels), the presence of the state
//! gauges, the counters of subscribes and the Raft figures; the cluster-wide gauges
//! reported once per cluster; the log filter changed at runtime.

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
            name.starts_with("flockmq_") || name.starts_with("process_"),
            "{name} lacks the flockmq_ prefix (or process_, as every client library names them)"
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
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "process_threads",
        "flockmq_raft_leader_changes_total",
        "flockmq_raft_commit_to_apply_seconds",
        "flockmq_queue_fill_ratio",
        "flockmq_subscribe_filters_total",
        "flockmq_unsubscribe_filters_total",
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
    for histogram in [
        "flockmq_raft_proposal_duration_seconds",
        "flockmq_raft_commit_to_apply_seconds",
    ] {
        assert_eq!(
            types.get(histogram).map(String::as_str),
            Some("histogram"),
            "latencies are histograms, so that nodes can be aggregated"
        );
    }
    // The node became leader once, and applied what it committed.
    assert!(
        body.contains("flockmq_raft_leader_changes_total 1"),
        "{body}"
    );
    assert!(
        body.lines().any(|l| l
            .strip_prefix("flockmq_raft_commit_to_apply_seconds_count ")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 0)),
        "{body}"
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
                // Forwarding, replication lag and snapshots appear once there are
                // peers or snapshots, the delivery latency once a sampled delivery
                // happened.
                let later = base.starts_with("flockmq_forward_")
                    || base.contains("snapshot")
                    || base == "flockmq_raft_replication_lag_entries"
                    || base == "flockmq_delivery_latency_seconds";
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

/// The `flockmq_...` and `process_...` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = ["flockmq_", "process_"]
        .iter()
        .filter_map(|prefix| rest.find(prefix))
        .min()
    {
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

/// The value of the sample `line_prefix` (name and labels) in a scrape, 0 if absent.
fn sample(body: &str, line_prefix: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn subscribes_unsubscribes_and_denials_are_counted_per_filter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic read fleet/#\n").expect("write acl");
    let node = Node::start_with_config(&format!(
        "[mqtt]\nallow_anonymous = true\nacl_file = \"{}\"\n",
        acl.display()
    ));
    let (mut c, _) = RawClient::connect(node.mqtt_addr(), ProtocolVersion::V5, "counted", true, 30);
    let mut codes = Vec::new();
    for (id, filter) in [(1, "fleet/#"), (2, "secret/#"), (3, "a/#/b")] {
        codes.extend(flockmq_tests::mqtt::subscribe_with(
            &mut c,
            filter,
            flockmq_tests::mqtt::opts(QoS::AtLeastOnce),
            id,
        ));
    }
    assert_eq!(
        codes,
        [
            ReasonCode::GrantedQoS1,
            ReasonCode::NotAuthorized,
            ReasonCode::TopicFilterInvalid
        ]
    );
    c.send(&Packet::Unsubscribe(broker_node::mqtt::Unsubscribe {
        packet_id: 4,
        filters: vec!["fleet/#".into(), "never/subscribed".into()],
        properties: Default::default(),
    }));
    assert!(
        matches!(c.recv(T), Some(Packet::UnsubAck(_))),
        "no UNSUBACK"
    );
    let (_, _, body) = scrape(&node);
    for (line, want) in [
        ("flockmq_subscribe_filters_total{result=\"granted\"}", 1.0),
        ("flockmq_subscribe_filters_total{result=\"denied\"}", 1.0),
        ("flockmq_subscribe_filters_total{result=\"invalid\"}", 1.0),
        (
            "flockmq_subscribe_filters_total{result=\"quota_exceeded\"}",
            0.0,
        ),
        ("flockmq_unsubscribe_filters_total{result=\"removed\"}", 1.0),
        (
            "flockmq_unsubscribe_filters_total{result=\"not_found\"}",
            1.0,
        ),
    ] {
        assert_eq!(sample(&body, line), want, "{line} in:\n{body}");
    }
}

#[test]
fn cluster_wide_gauges_are_reported_once_per_cluster_and_leader_changes_counted() {
    let mut nodes = Node::cluster(3);
    nodes[1].publish_retained("site/name", "north");
    // Summed over the nodes, as a dashboard does, the retained count is the cluster's:
    // the leader reports it, the others 0.
    let reported = |nodes: &[&Node]| -> Vec<(f64, f64)> {
        nodes
            .iter()
            .map(|n| {
                let (_, _, body) = scrape(n);
                (
                    sample(&body, "flockmq_retained_messages"),
                    sample(&body, "flockmq_raft_is_leader"),
                )
            })
            .collect()
    };
    let settled = |nodes: &[&Node]| {
        wait_until(
            "one node, the leader, to report the retained message",
            T,
            || {
                let r = reported(nodes);
                r.iter().map(|(retained, _)| retained).sum::<f64>() == 1.0
                    && r.iter().all(|(retained, leader)| retained == leader)
            },
        )
    };
    settled(&nodes.iter().collect::<Vec<_>>());
    let leader = nodes
        .iter()
        .position(|n| sample(&scrape(n).2, "flockmq_raft_is_leader") == 1.0)
        .expect("a leader");
    let changes = |n: &Node| sample(&scrape(n).2, "flockmq_raft_leader_changes_total");
    let before: Vec<f64> = nodes.iter().map(changes).collect();
    assert!(before.iter().all(|c| *c >= 1.0), "{before:?}");
    nodes[leader].kill();
    let survivors: Vec<usize> = (0..nodes.len()).filter(|i| *i != leader).collect();
    wait_until("the survivors to count a change of leader", T, || {
        survivors.iter().all(|&i| changes(&nodes[i]) > before[i])
    });
    let survivors: Vec<&Node> = survivors.iter().map(|&i| &nodes[i]).collect();
    settled(&survivors);
}

#[test]
fn the_log_filter_changes_at_runtime_through_ctl() {
    let node = Node::start();
    let url = format!("http://127.0.0.1:{}", node.http_port);
    let bin = flockmq_tests::broker_binary();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--url", &url, "log", "level"];
        all.extend_from_slice(args);
        run(bin.to_str().expect("utf-8"), &all, T)
    };
    let initial = ctl(&[]);
    assert_eq!(initial.code, Some(0), "{initial:?}");
    let quiet = !initial.stdout.contains("debug") && !initial.stdout.contains("trace");
    // "client connected" is a debug line.
    let connect = |id: &str| {
        let _ = RawClient::connect(node.mqtt_addr(), ProtocolVersion::V5, id, true, 30);
    };
    connect("before-the-change");
    let set = ctl(&["debug"]);
    assert_eq!(set.code, Some(0), "{set:?}");
    assert_eq!(set.stdout.trim(), "debug");
    assert_eq!(ctl(&[]).stdout.trim(), "debug");
    connect("after-the-change");
    wait_until("the debug line of the second client", T, || {
        node.log().contains("after-the-change")
    });
    if quiet {
        assert!(
            !node.log().contains("before-the-change"),
            "a debug line was logged under {initial:?}"
        );
    }
    let bad = ctl(&["info,["]);
    assert_eq!(bad.code, Some(1), "{bad:?}");
    assert!(bad.stderr.contains("not a log filter"), "{bad:?}");
    assert_eq!(
        ctl(&[]).stdout.trim(),
        "debug",
        "a bad filter changes nothing"
    );
}
