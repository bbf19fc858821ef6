//! A node of this release starts on a data directory an earlier release wrote
//! (format 1: unversioned entries and snapshot, `tests/fixtures/format1`) and serves
//! what it holds: persistent sessions with their queues and subscriptions, retained
//! messages; then it writes format 2 on top and starts again on the mixed log.
//!
//! A rolling upgrade: while one member still runs the previous release, the others
//! write nothing it cannot read, and once it is upgraded they write the newer format.

use std::path::Path;
use std::time::Duration;

use broker_node::mqtt::{ProtocolVersion, QoS, ReasonCode};
use flockmq_tests::mqtt::{next_publish, receive_acked, subscribe};
use flockmq_tests::{converged, run, wait_until, Node, RawClient};

const T: Duration = Duration::from_secs(10);

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/format1/data")
}

/// Connect `client_id` resuming its session and read `n` messages, acknowledging them.
fn resume_and_read(
    node: &Node,
    version: ProtocolVersion,
    client_id: &str,
    n: usize,
) -> Vec<String> {
    let (mut c, ack) = RawClient::connect(node.mqtt_addr(), version, client_id, false, 60);
    assert!(ack.session_present, "{client_id}'s session is kept");
    receive_acked(&mut c, n, T)
        .into_iter()
        .map(|p| format!("{} {}", p.topic, String::from_utf8_lossy(&p.payload)))
        .collect()
}

fn retained(node: &Node, filter: &str) -> Vec<String> {
    let port = node.mqtt_port.to_string();
    let out = run(
        "mosquitto_sub",
        &[
            "-p",
            &port,
            "-t",
            filter,
            "-v",
            "--retained-only",
            "-W",
            "2",
        ],
        T,
    );
    let mut lines: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

#[test]
fn a_node_reads_the_data_directory_of_the_previous_format_and_goes_on_writing() {
    let mut node = Node::start_from(&fixture());
    assert_eq!(node.status()["sessions"], 2, "{}", node.status());
    assert_eq!(
        retained(&node, "site/#"),
        vec!["site/motd format one", "site/name north"]
    );
    // The queues the old release kept, in order, to the subscriptions it recorded.
    let fleet = resume_and_read(&node, ProtocolVersion::V3_1_1, "fixture-sub", 6);
    let expected: Vec<String> = (1..=6).map(|i| format!("fleet/r7/cmd cmd-{i}")).collect();
    assert_eq!(fleet, expected);
    let alerts = resume_and_read(&node, ProtocolVersion::V5, "fixture-sub5", 1);
    assert_eq!(alerts, vec!["alerts/fire evacuate"]);

    // New writes (format 2) on top, then a restart over the mixed log.
    let (mut c, _) = RawClient::connect(
        node.mqtt_addr(),
        ProtocolVersion::V5,
        "fixture-sub5",
        false,
        60,
    );
    assert_eq!(
        subscribe(&mut c, "site/+", QoS::AtLeastOnce)[0],
        ReasonCode::GrantedQoS1
    );
    let retained_again = next_publish(&mut c, T).expect("a retained message");
    assert!(retained_again.retain);
    // Resumed without a Session Expiry Interval, fixture-sub5's session ends with
    // this connection; fixture-sub's (v3.1.1, clean session 0) stays.
    drop(c);
    node.wait_no_session("fixture-sub5");
    node.restart();
    let after = node.status();
    assert_eq!(after["sessions"], 1, "{after}");
    assert_eq!(
        retained(&node, "site/#"),
        vec!["site/motd format one", "site/name north"]
    );
    // fixture-sub's subscription, recorded in format 1, is still there.
    let subs = node
        .api("GET", "/subscriptions?clientid=fixture-sub", None)
        .expect("subscriptions");
    assert!(subs.to_string().contains("fleet/#"), "{subs}");
}

/// The hook by which a debug build plays a node of the previous release: it refuses
/// Raft entries newer than this format and does not know the `Capabilities` call.
const PLAY_RELEASE: &str = "TEST_FLOCKMQ_READ_ENTRY_FORMAT";

/// A broadcast to `n` offline persistent sessions, QoS 1 (`tag` told apart), published
/// through `node`.
fn broadcast(node: &Node, tag: &str, n: usize) {
    let (mut control, _) =
        RawClient::connect(node.mqtt_addr(), ProtocolVersion::V5, "control", true, 60);
    for i in 1..=n {
        control.send(&flockmq_tests::mqtt::publish(
            "fleet/all/cmd",
            &format!("{tag}-{i}"),
            QoS::AtLeastOnce,
            false,
            i as u16,
        ));
        let ack = control.recv(T);
        assert!(
            matches!(&ack, Some(broker_node::mqtt::Packet::PubAck(a)) if !a.reason_code.is_error()),
            "{tag}-{i} acknowledged: {ack:?}"
        );
    }
}

#[test]
fn a_member_of_the_previous_release_is_sent_only_entries_it_reads_until_it_is_upgraded() {
    // Node 3 runs "the previous release": it reads entry formats up to 4. A broadcast
    // to a fleet of offline persistent sessions is one `EnqueueMatching` (format 5) per
    // message once every member reads it; with node 3 behind, the others name every
    // queue (format 4), and node 3 applies everything. Were format 5 written, node 3
    // would refuse each AppendEntries from then on and never converge.
    let mut nodes = Node::cluster_with_node_env(3, &[], |id| match id {
        3 => vec![(PLAY_RELEASE.into(), "4".into())],
        _ => Vec::new(),
    });
    let robots: Vec<String> = (1..=20).map(|i| format!("robot-{i:02}")).collect();
    for robot in &robots {
        let (mut c, _) = RawClient::connect(
            nodes[0].mqtt_addr(),
            ProtocolVersion::V3_1_1,
            robot,
            false,
            60,
        );
        assert_eq!(
            subscribe(&mut c, "fleet/all/#", QoS::AtLeastOnce)[0],
            ReasonCode::GrantedQoS1
        );
    }
    for robot in &robots {
        nodes[0].wait_connected(robot, false);
    }
    // Long enough for every node to have asked every member what it reads.
    std::thread::sleep(Duration::from_secs(4));
    for node in &nodes {
        assert_eq!(node.status()["entry_format"], 4, "{}", node.status());
    }
    broadcast(&nodes[0], "before", 10);
    broadcast(&nodes[1], "before-via-2", 5);
    converged(&nodes.iter().collect::<Vec<_>>());
    let expected_before: Vec<String> = (1..=10)
        .map(|i| format!("fleet/all/cmd before-{i}"))
        .chain((1..=5).map(|i| format!("fleet/all/cmd before-via-2-{i}")))
        .collect();
    assert_eq!(
        resume_and_read(&nodes[2], ProtocolVersion::V3_1_1, "robot-01", 15),
        expected_before,
        "the old member serves the queues it was sent"
    );

    // Node 3 upgraded in place: the others find out and write format 5.
    nodes[2].remove_env(PLAY_RELEASE);
    nodes[2].restart();
    wait_until(
        "every node writes entry format 5",
        Duration::from_secs(20),
        || nodes.iter().all(|n| n.status()["entry_format"] == 5),
    );
    broadcast(&nodes[0], "after", 10);
    converged(&nodes.iter().collect::<Vec<_>>());
    let expected_after: Vec<String> = expected_before
        .iter()
        .cloned()
        .chain((1..=10).map(|i| format!("fleet/all/cmd after-{i}")))
        .collect();
    assert_eq!(
        resume_and_read(&nodes[1], ProtocolVersion::V3_1_1, "robot-02", 25),
        expected_after
    );
    assert_eq!(
        resume_and_read(&nodes[2], ProtocolVersion::V3_1_1, "robot-03", 25),
        expected_after
    );
}

#[test]
fn a_node_of_the_previous_release_may_not_join_a_cluster_that_writes_the_newer_format() {
    // Every member reads format 5 and writes it; a node of the previous release asking
    // to join (here one that stands alone) is refused with a sentence saying why,
    // where it used to be added and then stop at the first entry it could not read.
    let nodes = Node::cluster(3);
    wait_until(
        "every node writes entry format 5",
        Duration::from_secs(20),
        || nodes.iter().all(|n| n.status()["entry_format"] == 5),
    );
    let old = Node::start_with_env(&["--node-id", "4"], &[(PLAY_RELEASE, "4")]);
    let addr = format!("127.0.0.1:{}", old.cluster_port);
    let body = serde_json::json!({ "id": 4, "addr": addr });
    let refused = nodes[1]
        .api("POST", "/cluster/join", Some(body))
        .expect_err("the join is refused");
    assert!(
        refused.contains("runs an earlier release") && refused.contains("up to 4"),
        "{refused}"
    );
    let members = nodes[0].status()["members"].as_array().map(Vec::len);
    assert_eq!(members, Some(3));
}
