//! `/metrics` of a live node after real traffic: the naming rules of CONVENTIONS.md
//! (prefix `flockmq_`, base units, counters ending in `_total`, no per-client or
//! per-topic labels) and the presence of the state gauges.

use std::collections::BTreeMap;
use std::time::Duration;

use flockmq_tests::{run, Node};

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
    // The state gauges refresh every second.
    std::thread::sleep(Duration::from_millis(2500));
    let (types, labels, body) = scrape(&node);

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
    assert!(body.contains("flockmq_raft_is_leader 1"), "{body}");
    assert!(body.contains("flockmq_retained_messages 1"), "{body}");
    assert!(
        body.contains("flockmq_raft_members{role=\"voter\"} 1"),
        "{body}"
    );
}
