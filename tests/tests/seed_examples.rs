//! The users' seed examples (`../shared/seeds/`) run unchanged, in Python paho-mqtt 1.x,
//! against a real `broker-node` process.

use std::time::Duration;

use flockmq_tests::{repo_root, run, Node};

fn scenario(script: &str) {
    let node = Node::start();
    let path = repo_root().join("tests/python").join(script);
    let out = run(
        "python3",
        &[
            path.to_str().expect("utf-8 path"),
            &node.mqtt_port.to_string(),
            &node.http_port.to_string(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(
        out.code,
        Some(0),
        "{script} failed\nstdout:\n{}\nstderr:\n{}\nbroker log:\n{}",
        out.stdout,
        out.stderr,
        node.log()
    );
}

#[test]
fn robot_fleet_lwt_retained_status_wildcard_telemetry_qos2_commands() {
    scenario("robot_fleet.py");
}

#[test]
fn warehouse_sensors_aggregator_and_persistent_actuator() {
    scenario("warehouse.py");
}

#[test]
fn mqtt5_request_response_user_properties_shared_subscriptions_retained_clear() {
    scenario("mqtt5_features.py");
}
