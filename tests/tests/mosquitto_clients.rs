//! Debian's `mosquitto_pub` / `mosquitto_sub` against a real `broker-node` process.

use std::time::Duration;

use flockmq_tests::{run, wait_until, Background, Node};

const T: Duration = Duration::from_secs(15);

fn port(node: &Node) -> String {
    node.mqtt_port.to_string()
}

#[test]
fn v311_publisher_and_v5_subscriber_see_each_other() {
    let node = Node::start();
    let p = port(&node);
    let sub = Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &p,
            "-V",
            "5",
            "-i",
            "dashboard-v5",
            "-t",
            "fleet/+/robot/+/telemetry/#",
            "-C",
            "2",
            "-v",
            "-q",
            "1",
        ],
    );
    node.wait_subscribed("dashboard-v5", "fleet/+/robot/+/telemetry/#");
    for payload in ["87", "86"] {
        let r = run(
            "mosquitto_pub",
            &[
                "-p",
                &p,
                "-V",
                "311",
                "-t",
                "fleet/1/robot/r7/telemetry/battery",
                "-m",
                payload,
                "-q",
                "1",
            ],
            T,
        );
        assert_eq!(r.code, Some(0), "{r:?}");
    }
    let out = sub.finish(T);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        [
            "fleet/1/robot/r7/telemetry/battery 87",
            "fleet/1/robot/r7/telemetry/battery 86"
        ],
        "{out:?}"
    );
}

#[test]
fn v5_publisher_and_v31_subscriber_see_each_other() {
    let node = Node::start();
    let p = port(&node);
    let sub = Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &p,
            "-V",
            "31",
            "-i",
            "aggregator-v31",
            "-t",
            "warehouse/#",
            "-C",
            "1",
            "-v",
        ],
    );
    node.wait_subscribed("aggregator-v31", "warehouse/#");
    let r = run(
        "mosquitto_pub",
        &[
            "-p",
            &p,
            "-V",
            "5",
            "-t",
            "warehouse/zone1/temp",
            "-m",
            "25.5",
            "-q",
            "2",
        ],
        T,
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let out = sub.finish(T);
    assert_eq!(out.stdout.trim(), "warehouse/zone1/temp 25.5", "{out:?}");
}

#[test]
fn mqtt_3_3_1_5_retained_message_reaches_later_subscriber() {
    let node = Node::start();
    let p = port(&node);
    let r = run(
        "mosquitto_pub",
        &[
            "-p",
            &p,
            "-t",
            "device/thermostat/setpoint",
            "-m",
            "21.5",
            "-r",
            "-q",
            "1",
        ],
        T,
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let out = run(
        "mosquitto_sub",
        &[
            "-p",
            &p,
            "-t",
            "device/+/setpoint",
            "-C",
            "1",
            "-v",
            "-W",
            "10",
        ],
        T,
    );
    assert_eq!(
        out.stdout.trim(),
        "device/thermostat/setpoint 21.5",
        "{out:?}"
    );
}

#[test]
fn persistent_session_queue_survives_kill_9_of_the_broker() {
    let mut node = Node::start();
    let p = port(&node);
    // A persistent subscriber (clean session 0) subscribes, then goes away.
    let sub = Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &p,
            "-i",
            "actuator-fan",
            "-c",
            "-q",
            "1",
            "-t",
            "warehouse/zone1/fan/command",
        ],
    );
    node.wait_subscribed("actuator-fan", "warehouse/zone1/fan/command");
    sub.kill();
    // The broker has seen the connection end: the command is queued, not sent.
    node.wait_connected("actuator-fan", false);
    let r = run(
        "mosquitto_pub",
        &[
            "-p",
            &p,
            "-t",
            "warehouse/zone1/fan/command",
            "-m",
            "ON",
            "-q",
            "1",
        ],
        T,
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    // The broker dies without any chance to save anything more.
    node.restart();
    let out = run(
        "mosquitto_sub",
        &[
            "-p",
            &p,
            "-i",
            "actuator-fan",
            "-c",
            "-q",
            "1",
            "-t",
            "warehouse/zone1/fan/command",
            "-C",
            "1",
            "-W",
            "10",
        ],
        T,
    );
    assert_eq!(
        out.stdout.trim(),
        "ON",
        "{out:?}\nbroker log:\n{}",
        node.log()
    );
}

#[test]
fn retained_messages_and_subscriptions_survive_kill_9_of_the_broker() {
    let mut node = Node::start();
    let p = port(&node);
    let r = run(
        "mosquitto_pub",
        &[
            "-p",
            &p,
            "-t",
            "devices/device-001/status",
            "-m",
            "online",
            "-r",
            "-q",
            "1",
        ],
        T,
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    node.restart();
    let out = run(
        "mosquitto_sub",
        &[
            "-p",
            &p,
            "-t",
            "devices/+/status",
            "-C",
            "1",
            "-v",
            "-W",
            "10",
        ],
        T,
    );
    assert_eq!(
        out.stdout.trim(),
        "devices/device-001/status online",
        "{out:?}"
    );
}

#[test]
fn a_will_is_not_published_again_when_the_broker_restarts() {
    let mut node = Node::start();
    let p = port(&node);
    let dashboard = |wait: &str| {
        Background::spawn(
            "mosquitto_sub",
            &[
                "-p",
                &p,
                "-i",
                "dashboard",
                "-c",
                "-q",
                "1",
                "-t",
                "robots/+/status",
                "-C",
                "1",
                "-v",
                "-W",
                wait,
            ],
        )
    };
    let watching = dashboard("10");
    node.wait_subscribed("dashboard", "robots/+/status");
    let robot = Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &p,
            "-i",
            "robot-7",
            "-t",
            "robots/robot-7/cmd",
            "--will-topic",
            "robots/robot-7/status",
            "--will-payload",
            "offline",
            "--will-qos",
            "1",
        ],
    );
    // Subscribed means connected, will registered.
    node.wait_subscribed("robot-7", "robots/robot-7/cmd");
    robot.kill();
    let out = watching.finish(T);
    assert_eq!(
        out.stdout.trim(),
        "robots/robot-7/status offline",
        "{out:?}"
    );
    // Once the store has settled (robot-7's session ended with its will, the
    // dashboard acknowledged the will and left), crash: the restarted node re-applies
    // its log, will included, and must not hand the will out a second time.
    node.wait_no_session("robot-7");
    wait_until(
        "the dashboard to acknowledge the will and disconnect",
        T,
        || {
            node.session("dashboard")
                .is_some_and(|s| s["connected"] == false && s["mqueue_len"] == 0)
        },
    );
    node.restart();
    let again = dashboard("4").finish(T);
    assert_eq!(
        again.stdout.trim(),
        "",
        "the will came twice: {again:?}\nbroker log:\n{}",
        node.log()
    );
}
