//! Authentication and ACLs against a real node: password files made by Mosquitto's
//! own `mosquitto_passwd` and by `broker-node passwd`, Mosquitto-format ACL files,
//! real clients, and a SIGHUP reload.

use std::path::Path;
use std::time::Duration;

use broker_node::mqtt::{Connect, Packet, ProtocolVersion, QoS, ReasonCode};
use flockmq_tests::mqtt::{publish, subscribe};
use flockmq_tests::{broker_binary, run, Node, RawClient};

const T: Duration = Duration::from_secs(10);

fn connect_as(
    node: &Node,
    version: ProtocolVersion,
    client_id: &str,
    user: Option<(&str, &str)>,
) -> (RawClient, ReasonCode) {
    let mut c = RawClient::open(node.mqtt_addr(), version);
    c.send(&Packet::Connect(Box::new(Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: client_id.into(),
        will: None,
        username: user.map(|(u, _)| u.to_owned()),
        password: user.map(|(_, p)| bytes::Bytes::copy_from_slice(p.as_bytes())),
        properties: Default::default(),
    })));
    match c.recv(T) {
        Some(Packet::ConnAck(ack)) => (c, ack.reason_code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn node_with(dir: &Path, extra: &str) -> Node {
    let passwords = dir.join("passwd");
    Node::start_with_config(&format!(
        "[mqtt]\nallow_anonymous = false\npassword_file = \"{}\"\n{extra}",
        passwords.display()
    ))
}

fn mosquitto_passwd(file: &Path, user: &str, password: &str) {
    let r = run(
        "mosquitto_passwd",
        &["-b", file.to_str().expect("utf-8"), user, password],
        T,
    );
    assert_eq!(r.code, Some(0), "{r:?}");
}

#[test]
fn a_password_file_from_mosquitto_passwd_admits_exactly_its_users() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("passwd");
    std::fs::write(&file, "").expect("create");
    mosquitto_passwd(&file, "robot-7", "s3cret");
    let node = node_with(dir.path(), "");
    let port = node.mqtt_port.to_string();
    let ok = run(
        "mosquitto_pub",
        &[
            "-p", &port, "-u", "robot-7", "-P", "s3cret", "-t", "t", "-m", "x", "-q", "1",
        ],
        T,
    );
    assert_eq!(ok.code, Some(0), "{ok:?}");
    let (_, rc) = connect_as(&node, ProtocolVersion::V5, "a", Some(("robot-7", "wrong")));
    assert_eq!(rc, ReasonCode::BadUserNameOrPassword);
    let (_, rc) = connect_as(&node, ProtocolVersion::V5, "b", Some(("nobody", "s3cret")));
    assert_eq!(rc, ReasonCode::BadUserNameOrPassword);
    let (_, rc) = connect_as(&node, ProtocolVersion::V5, "c", None);
    assert_eq!(rc, ReasonCode::NotAuthorized);
    // v3.1.1 gets its own return codes: 4 bad credentials, 5 not authorized.
    let wrong = run(
        "mosquitto_pub",
        &[
            "-p", &port, "-V", "mqttv311", "-u", "robot-7", "-P", "no", "-t", "t", "-m", "x",
        ],
        T,
    );
    assert_ne!(wrong.code, Some(0), "{wrong:?}");
}

#[test]
fn repeated_failures_from_one_address_are_answered_ever_more_slowly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("passwd");
    std::fs::write(&file, "").expect("create");
    mosquitto_passwd(&file, "robot-7", "s3cret");
    let node = node_with(dir.path(), "");
    // Waits of 0, 250 ms, 500 ms, 1 s and 2 s: only lower bounds are checked (a
    // loaded machine may answer later, never sooner).
    let mut waited = Vec::new();
    for i in 0..5 {
        let started = std::time::Instant::now();
        let (_, rc) = connect_as(
            &node,
            ProtocolVersion::V5,
            &format!("g{i}"),
            Some(("robot-7", "guess")),
        );
        assert_eq!(rc, ReasonCode::BadUserNameOrPassword);
        waited.push(started.elapsed());
    }
    assert!(waited[3] >= Duration::from_millis(950), "{waited:?}");
    assert!(waited[4] >= Duration::from_millis(1950), "{waited:?}");
    // The right password still gets in, after the address's wait (a success clears
    // nothing: an account of one's own must not reset a guesser's count).
    let (_, rc) = connect_as(
        &node,
        ProtocolVersion::V5,
        "ok",
        Some(("robot-7", "s3cret")),
    );
    assert_eq!(rc, ReasonCode::Success);
}

#[test]
fn users_added_with_broker_node_passwd_get_in_after_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("passwd");
    let bin = broker_binary();
    let bin = bin.to_str().expect("utf-8");
    let f = file.to_str().expect("utf-8");
    let r = run(bin, &["passwd", f, "dashboard", "--password", "pw-1"], T);
    assert_eq!(r.code, Some(0), "{r:?}");
    let node = node_with(dir.path(), "");
    let (_, rc) = connect_as(&node, ProtocolVersion::V5, "d", Some(("dashboard", "pw-1")));
    assert_eq!(rc, ReasonCode::Success);
    let (_, rc) = connect_as(&node, ProtocolVersion::V5, "e", Some(("historian", "pw-2")));
    assert_eq!(rc, ReasonCode::BadUserNameOrPassword);

    let r = run(bin, &["passwd", f, "historian", "--password", "pw-2"], T);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = run("kill", &["-HUP", &node.pid().to_string()], T);
    assert_eq!(r.code, Some(0), "{r:?}");
    let deadline = std::time::Instant::now() + T;
    loop {
        let (_, rc) = connect_as(&node, ProtocolVersion::V5, "e", Some(("historian", "pw-2")));
        if rc == ReasonCode::Success {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not reloaded: {rc:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The first user is still there.
    let (_, rc) = connect_as(&node, ProtocolVersion::V5, "d", Some(("dashboard", "pw-1")));
    assert_eq!(rc, ReasonCode::Success);
}

#[test]
fn the_acl_file_decides_who_publishes_and_subscribes_where() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("passwd");
    std::fs::write(&file, "").expect("create");
    mosquitto_passwd(&file, "dashboard", "pw");
    mosquitto_passwd(&file, "r7", "pw");
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "user dashboard\ntopic read fleet/#\ntopic write fleet/+/command\n\
         pattern write fleet/%u/pose\n",
    )
    .expect("acl");
    let node = node_with(dir.path(), &format!("acl_file = \"{}\"\n", acl.display()));
    let v5 = ProtocolVersion::V5;

    let (mut dash, _) = connect_as(&node, v5, "dash-1", Some(("dashboard", "pw")));
    assert_eq!(
        subscribe(&mut dash, "fleet/+/pose", QoS::AtLeastOnce),
        vec![ReasonCode::GrantedQoS1]
    );
    assert_eq!(
        subscribe(&mut dash, "admin/#", QoS::AtLeastOnce),
        vec![ReasonCode::NotAuthorized]
    );

    let (mut robot, _) = connect_as(&node, v5, "r7", Some(("r7", "pw")));
    assert_eq!(
        subscribe(&mut robot, "fleet/#", QoS::AtMostOnce),
        vec![ReasonCode::NotAuthorized]
    );
    robot.send(&publish("fleet/r7/pose", "1,2", QoS::AtLeastOnce, false, 1));
    match robot.recv(T) {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason_code, ReasonCode::Success),
        other => panic!("PUBACK expected, got {other:?}"),
    }
    robot.send(&publish(
        "fleet/r8/pose",
        "spoofed",
        QoS::AtLeastOnce,
        false,
        2,
    ));
    match robot.recv(T) {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason_code, ReasonCode::NotAuthorized),
        other => panic!("PUBACK expected, got {other:?}"),
    }
    // Only the allowed message reached the dashboard.
    match dash.recv(T) {
        Some(Packet::Publish(p)) => assert_eq!(p.payload, "1,2"),
        other => panic!("publish expected, got {other:?}"),
    }
    assert!(dash.recv(Duration::from_millis(500)).is_none());
}

#[test]
fn a_username_nothing_verified_does_not_pick_that_users_acl_rules() {
    // Anonymous access, no password file: a name in CONNECT proves nothing.
    let dir = tempfile::tempdir().expect("temp dir");
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "topic read public/#\nuser dashboard\ntopic readwrite fleet/#\n",
    )
    .expect("acl");
    let node = Node::start_with_config(&format!(
        "[mqtt]\nallow_anonymous = true\nacl_file = \"{}\"\n",
        acl.display()
    ));
    let v5 = ProtocolVersion::V5;
    let (mut claimed, rc) = connect_as(&node, v5, "c1", Some(("dashboard", "anything")));
    assert_eq!(rc, ReasonCode::Success, "admitted as anonymous");
    assert_eq!(
        subscribe(&mut claimed, "fleet/#", QoS::AtLeastOnce),
        vec![ReasonCode::NotAuthorized],
        "the claimed user's rules do not apply"
    );
    assert_eq!(
        subscribe(&mut claimed, "public/news", QoS::AtLeastOnce),
        vec![ReasonCode::GrantedQoS1],
        "the anonymous rules do"
    );
}
