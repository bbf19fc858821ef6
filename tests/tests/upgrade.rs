//! A node of this release starts on a data directory an earlier release wrote
//! (format 1: unversioned entries and snapshot, `tests/fixtures/format1`) and serves
//! what it holds: persistent sessions with their queues and subscriptions, retained
//! messages; then it writes format 2 on top and starts again on the mixed log.

use std::path::Path;
use std::time::Duration;

use broker_node::mqtt::{ProtocolVersion, QoS, ReasonCode};
use flockmq_tests::mqtt::{next_publish, receive_acked, subscribe};
use flockmq_tests::{run, Node, RawClient};

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
