//! Operating a three-node cluster through the admin API and `broker-node ctl`:
//! status, membership changes (a fourth node joins, one leaves; with
//! `cluster.autoclean_after` a node away too long is removed and rejoins when it
//! returns), kicking a client
//! connected to another node, retained messages and publishing.

use std::time::Duration;

use broker_node::mqtt::{ProtocolVersion, QoS, ReasonCode};
use flockmq_tests::mqtt::{disconnect_reason, next_publish, subscribe};
use flockmq_tests::{broker_binary, converged, run, running, Node, Ran, RawClient};
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

fn ctl(node: &Node, args: &[&str]) -> Ran {
    let url = format!("http://127.0.0.1:{}", node.http_port);
    let bin = broker_binary();
    let mut all = vec!["ctl", "--url", &url];
    all.extend_from_slice(args);
    run(
        bin.to_str().expect("utf-8 path"),
        &all,
        Duration::from_secs(150),
    )
}

fn ctl_json(node: &Node, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = ctl(node, &all);
    assert_eq!(out.code, Some(0), "ctl {args:?}: {out:?}");
    serde_json::from_str(&out.stdout).expect("ctl --json prints JSON")
}

fn member_ids(status: &Value) -> Vec<u64> {
    status["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["id"].as_u64().expect("id"))
        .collect()
}

#[test]
fn status_shows_the_leader_and_every_member_on_every_node() {
    let nodes = Node::cluster(3);
    converged(&running(&nodes));
    for node in &nodes {
        let status = ctl_json(node, &["cluster", "status"]);
        assert_eq!(member_ids(&status), vec![1, 2, 3]);
        let leader = status["leader"].as_u64().expect("a leader");
        let roles: Vec<&str> = status["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| m["role"].as_str().expect("role"))
            .collect();
        assert_eq!(roles.iter().filter(|r| **r == "leader").count(), 1);
        assert_eq!(status["members"][(leader - 1) as usize]["role"], "leader");
    }
    let table = ctl(&nodes[1], &["cluster", "status"]);
    assert_eq!(table.code, Some(0), "{table:?}");
    assert!(table.stdout.contains("leader"), "{}", table.stdout);
}

#[test]
fn a_client_on_node_3_is_kicked_through_node_1_with_0x98() {
    let nodes = Node::cluster(3);
    let (mut robot, _) = RawClient::connect(
        nodes[2].mqtt_addr(),
        ProtocolVersion::V5,
        "robot-9",
        true,
        60,
    );
    converged(&running(&nodes));
    let listed = ctl(&nodes[0], &["clients", "list"]);
    assert!(listed.stdout.contains("robot-9"), "{listed:?}");
    let kicked = ctl(&nodes[0], &["clients", "kick", "robot-9"]);
    assert_eq!(kicked.code, Some(0), "{kicked:?}");
    assert_eq!(
        disconnect_reason(&mut robot, T),
        Some(ReasonCode::AdministrativeAction)
    );
    let missing = ctl(&nodes[0], &["clients", "kick", "nobody"]);
    assert_ne!(missing.code, Some(0), "kicking an unknown client fails");
    assert!(missing.stderr.contains("404"), "{missing:?}");
}

#[test]
fn a_fourth_node_joins_catches_up_and_a_node_leaves_cleanly() {
    let mut nodes = Node::cluster(3);
    // State made before the join: the new node must catch up with it.
    let r = ctl(
        &nodes[1],
        &["publish", "site/name", "north", "--retain", "--qos", "1"],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let seed = format!("127.0.0.1:{}", nodes[0].cluster_port);
    nodes.push(Node::start_with(&["--node-id", "4", "--join", &seed]));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = nodes[0].status();
        let voter4 = status["members"]
            .as_array()
            .expect("members")
            .iter()
            .any(|m| m["id"] == 4 && m["role"] != "learner");
        if voter4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 4 not a voter after 60 s: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    converged(&running(&nodes));
    // The joined node serves the replicated state.
    let (mut c, _) = RawClient::connect(
        nodes[3].mqtt_addr(),
        ProtocolVersion::V5,
        "viewer",
        true,
        60,
    );
    subscribe(&mut c, "site/#", QoS::AtMostOnce);
    let p = next_publish(&mut c, T).expect("the retained message on node 4");
    assert_eq!(p.payload, "north");

    // Node 2 leaves; the remaining three go on and agree.
    let left = ctl(&nodes[1], &["cluster", "leave"]);
    assert_eq!(left.code, Some(0), "{left:?}");
    nodes[1].terminate();
    let status = nodes[0].status();
    assert_eq!(member_ids(&status), vec![1, 3, 4]);
    let r = ctl(
        &nodes[3],
        &["publish", "site/name", "south", "--retain", "--qos", "1"],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    converged(&running(&nodes));
    let shown = ctl_json(&nodes[2], &["retained", "show", "site/name"]);
    assert_eq!(shown["payload"], "south");
}

#[test]
fn two_nodes_joining_at_once_both_end_as_voters() {
    // Each join adds only its own id to whatever the voters are when it applies; a
    // join that wrote the whole voter set it had read could undo the other.
    let mut nodes = Node::cluster(3);
    let seed1 = format!("127.0.0.1:{}", nodes[0].cluster_port);
    let seed2 = format!("127.0.0.1:{}", nodes[1].cluster_port);
    nodes.extend(Node::start_together(&[
        &["--node-id", "4", "--join", &seed1],
        &["--node-id", "5", "--join", &seed2],
    ]));
    flockmq_tests::wait_for("all five to be voters", Duration::from_secs(60), || {
        let status = nodes[0].status();
        let voters: Vec<u64> = status["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter(|m| m["role"] != "learner")
            .filter_map(|m| m["id"].as_u64())
            .collect();
        match voters == [1, 2, 3, 4, 5] {
            true => Ok(()),
            false => Err(status.to_string()),
        }
    });
    converged(&running(&nodes));
}

#[test]
fn a_dead_node_is_removed_and_the_rest_keep_a_majority() {
    let mut nodes = Node::cluster(3);
    nodes[2].kill();
    let removed = ctl(&nodes[0], &["cluster", "remove", "3"]);
    assert_eq!(removed.code, Some(0), "{removed:?}");
    assert_eq!(member_ids(&nodes[1].status()), vec![1, 2]);
    // Two voters left: both are needed, and both are up, so writes go on.
    let r = ctl(
        &nodes[1],
        &["publish", "x/y", "z", "--retain", "--qos", "1"],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    converged(&running(&nodes));
}

/// The voters in `node`'s view (every member that is not a learner), sorted.
fn voter_ids(node: &Node) -> Vec<u64> {
    node.status()["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter(|m| m["role"] != "learner")
        .filter_map(|m| m["id"].as_u64())
        .collect()
}

#[test]
fn with_autoclean_a_node_away_too_long_is_removed_and_rejoins_when_it_returns() {
    // The membership follows what runs: no `ctl cluster remove`, no `join`.
    let mut nodes = Node::cluster_with_env(3, &[("FLOCKMQ_CLUSTER__AUTOCLEAN_AFTER", "3s")]);
    nodes[1].publish_retained("site/name", "north");
    nodes[2].kill();
    flockmq_tests::wait_for("node 3 to be removed", Duration::from_secs(30), || {
        match member_ids(&nodes[0].status()) == [1, 2] && member_ids(&nodes[1].status()) == [1, 2] {
            true => Ok(()),
            false => Err(nodes[0].status().to_string()),
        }
    });
    // Two voters, both up: writes go on, and a later failure of either would stop
    // them (as it would with 3 voters and one gone).
    nodes[0].publish_retained("site/name", "south");
    // Node 3 comes back with its data and the flags it had: it finds itself left out
    // and asks to be added back.
    nodes[2].restart();
    flockmq_tests::wait_for(
        "node 3 to be a voter again",
        Duration::from_secs(60),
        || match voter_ids(&nodes[0]) == [1, 2, 3] {
            true => Ok(()),
            false => Err(nodes[0].status().to_string()),
        },
    );
    converged(&running(&nodes));
    let shown = ctl_json(&nodes[2], &["retained", "show", "site/name"]);
    assert_eq!(
        shown["payload"], "south",
        "node 3 caught up with what it missed"
    );
    let removed: f64 = nodes
        .iter()
        .map(|n| {
            n.metrics()
                .lines()
                .find_map(|l| l.strip_prefix("flockmq_nodes_removed_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(removed, 1.0, "one removal, by the leader");
}

#[test]
fn retained_messages_are_listed_shown_and_deleted_through_the_api() {
    let nodes = Node::cluster(3);
    for (topic, payload) in [
        ("fleet/r1/status", "online"),
        ("fleet/r2/status", "offline"),
    ] {
        let r = ctl(
            &nodes[0],
            &["publish", topic, payload, "--retain", "--qos", "1"],
        );
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    converged(&running(&nodes));
    let listed = ctl_json(&nodes[2], &["retained", "list"]);
    assert_eq!(listed["meta"]["count"], 2);
    assert_eq!(listed["data"][0]["topic"], "fleet/r1/status");
    let deleted = ctl(&nodes[2], &["retained", "delete", "fleet/r1/status"]);
    assert_eq!(deleted.code, Some(0), "{deleted:?}");
    converged(&running(&nodes));
    let listed = ctl_json(&nodes[1], &["retained", "list"]);
    assert_eq!(listed["meta"]["count"], 1);
    // The API refuses bad input with a clear error.
    let bad = nodes[0].api(
        "POST",
        "/publish",
        Some(serde_json::json!({"topic": "a/+/b", "payload": "x"})),
    );
    assert!(bad.as_ref().is_err_and(|e| e.starts_with("400")), "{bad:?}");
}

#[test]
fn the_api_needs_the_token_when_one_is_set() {
    let node = Node::start_with(&["--api-token", "s3cret"]);
    let denied = node.api("GET", "/cluster", None);
    assert!(
        denied.as_ref().is_err_and(|e| e.starts_with("401")),
        "{denied:?}"
    );
    let url = format!("http://127.0.0.1:{}", node.http_port);
    let bin = broker_binary();
    let ok = run(
        bin.to_str().expect("utf-8 path"),
        &[
            "ctl", "--url", &url, "--token", "s3cret", "cluster", "status",
        ],
        T,
    );
    assert_eq!(ok.code, Some(0), "{ok:?}");
}

#[test]
fn the_api_takes_basic_auth_users_from_a_password_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("api-users");
    let bin = broker_binary();
    let bin = bin.to_str().expect("utf-8 path");
    let file_arg = file.to_str().expect("utf-8 path");
    let made = run(
        bin,
        &["passwd", file_arg, "ops", "--password", "op-s3cret"],
        T,
    );
    assert_eq!(made.code, Some(0), "{made:?}");
    let node = Node::start_with(&["--api-password-file", file_arg, "--api-token", "tok"]);
    let url = format!("http://127.0.0.1:{}", node.http_port);

    // Without credentials, or with a wrong password: 401 with a basic-auth challenge.
    let cluster = format!("{url}/api/v1/cluster");
    for request in [
        ureq::get(&cluster),
        ureq::get(&cluster).set("Authorization", "Basic b3BzOndyb25n"), // ops:wrong
        ureq::get(&cluster).set("Authorization", "Basic bm9ib2R5Om9wLXMzY3JldA=="), // nobody:op-s3cret
        ureq::get(&cluster).set("Authorization", "Bearer wrong"),
    ] {
        match request.call() {
            Err(ureq::Error::Status(401, r)) => {
                assert_eq!(
                    r.header("WWW-Authenticate"),
                    Some("Basic realm=\"flockmq\"")
                );
            }
            other => panic!("expected 401, got {other:?}"),
        }
    }
    // The right user through ctl, by flag and by environment; the token still works.
    let by_flag = run(
        bin,
        &[
            "ctl",
            "--url",
            &url,
            "--user",
            "ops:op-s3cret",
            "cluster",
            "status",
        ],
        T,
    );
    assert_eq!(by_flag.code, Some(0), "{by_flag:?}");
    let by_env = std::process::Command::new(bin)
        .args(["ctl", "--url", &url, "cluster", "status", "--json"])
        .env("FLOCKMQ_CTL_USER", "ops:op-s3cret")
        .output()
        .expect("run ctl");
    assert!(by_env.status.success(), "{by_env:?}");
    let status: Value = serde_json::from_slice(&by_env.stdout).expect("JSON");
    assert_eq!(status["node_id"], 1);
    let by_token = run(
        bin,
        &["ctl", "--url", &url, "--token", "tok", "cluster", "status"],
        T,
    );
    assert_eq!(by_token.code, Some(0), "{by_token:?}");
    let wrong = run(
        bin,
        &[
            "ctl", "--url", &url, "--user", "ops:nope", "cluster", "status",
        ],
        T,
    );
    assert_ne!(wrong.code, Some(0), "{wrong:?}");
    assert!(wrong.stderr.contains("401"), "{wrong:?}");

    // Users added or removed in the file count after SIGHUP.
    std::fs::write(&file, "").expect("empty the file");
    let made = run(
        bin,
        &["passwd", file_arg, "oncall", "--password", "pager"],
        T,
    );
    assert_eq!(made.code, Some(0), "{made:?}");
    let r = run("kill", &["-HUP", &node.pid().to_string()], T);
    assert_eq!(r.code, Some(0), "{r:?}");
    let status_as = |user: &str| {
        run(
            bin,
            &["ctl", "--url", &url, "--user", user, "cluster", "status"],
            T,
        )
        .code
    };
    let deadline = std::time::Instant::now() + T;
    while status_as("oncall:pager") != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the new user was not admitted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(
        status_as("ops:op-s3cret"),
        Some(0),
        "the removed user still gets in"
    );
}

#[test]
fn a_snapshot_asked_for_covers_what_was_applied_and_a_restart_starts_from_it() {
    let mut node = Node::start();
    node.publish_retained("site/motd", "snapshotted");
    let applied = node.applied_index();
    let built = ctl_json(&node, &["cluster", "snapshot"]);
    let at = built["snapshot_index"].as_u64().expect("snapshot_index");
    assert!(at >= applied, "snapshot at {at}, applied {applied} before");
    assert_eq!(node.status()["snapshot_index"].as_u64(), Some(at));
    let files: Vec<String> = std::fs::read_dir(node.data_dir.join("raft/raft-snapshots"))
        .expect("snapshot directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.len() == 1 && files[0].ends_with(&format!("-{at}-0.snap")),
        "{files:?}"
    );
    // Started again, the node restores the snapshot: the retained message is there.
    node.restart();
    let retained = node
        .api("GET", "/retained/site/motd", None)
        .expect("retained message");
    assert_eq!(retained["payload"], "snapshotted", "{retained}");
}
