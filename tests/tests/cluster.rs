//! Three `broker-node` processes forming one Raft cluster over loopback: the
//! control plane seen from real clients, and the loss of the leader.

use std::time::Duration;

use broker_node::mqtt::{
    Packet, ProtocolVersion, Publish, PublishProperties, QoS, ReasonCode, RetainHandling,
    Subscribe, SubscribeProperties, SubscriptionOptions,
};
use bytes::Bytes;
use flockmq_tests::{converged, run, running, wait_for, wait_until, Node, RawClient};

const T: Duration = Duration::from_secs(10);

fn retain(node: &Node, topic: &str, payload: &str) {
    node.publish_retained(topic, payload);
}

fn read_retained(node: &Node, filter: &str, count: usize) -> Vec<String> {
    let out = run(
        "mosquitto_sub",
        &[
            "-p",
            &node.mqtt_port.to_string(),
            "-t",
            filter,
            "-C",
            &count.to_string(),
            "-v",
            "-W",
            "10",
        ],
        Duration::from_secs(15),
    );
    let mut lines: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

#[test]
fn a_retained_message_set_through_node_2_reaches_a_subscriber_on_node_3() {
    let nodes = Node::cluster(3);
    retain(&nodes[1], "status/r7", "online");
    assert_eq!(
        read_retained(&nodes[2], "status/+", 1),
        vec!["status/r7 online"]
    );
    converged(&running(&nodes));
}

#[test]
fn the_same_client_id_on_node_2_closes_its_connection_on_node_1_with_0x8e() {
    let nodes = Node::cluster(3);
    let v5 = ProtocolVersion::V5;
    let (mut first, _) = RawClient::connect(nodes[0].mqtt_addr(), v5, "robot-r7", false, 60);
    let started = std::time::Instant::now();
    let (_second, ack) = RawClient::connect(nodes[1].mqtt_addr(), v5, "robot-r7", false, 60);
    assert!(ack.session_present, "the session moved with the client");
    match first.recv(T) {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, ReasonCode::SessionTakenOver),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "within a second"
    );
    converged(&running(&nodes));
}

#[test]
fn subscriptions_made_on_one_node_survive_the_kill_of_the_leader() {
    let mut nodes = Node::cluster(3);
    // A persistent session subscribes through node 3.
    let v3 = ProtocolVersion::V3_1_1;
    let (mut sub, _) = RawClient::connect(nodes[2].mqtt_addr(), v3, "fan", false, 60);
    sub.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            "warehouse/zone1/fan/command".into(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: RetainHandling::SendAtSubscribe,
            },
        )],
        properties: SubscribeProperties::default(),
    }));
    assert!(matches!(sub.recv(T), Some(Packet::SubAck(_))));
    drop(sub);
    // Node 1 initialized the cluster and leads it: kill it.
    nodes[0].kill();
    // Writes go on through the survivors at once: a write made during the election
    // waits for the new leader rather than failing. The subscription is still known.
    retain(&nodes[1], "warehouse/zone1/temp", "25.5");
    assert_eq!(
        read_retained(&nodes[2], "warehouse/#", 1),
        vec!["warehouse/zone1/temp 25.5"]
    );
    let (mut publisher, _) = RawClient::connect(nodes[2].mqtt_addr(), v3, "dashboard", true, 60);
    publisher.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "warehouse/zone1/fan/command".into(),
        packet_id: Some(7),
        properties: PublishProperties::default(),
        payload: Bytes::from_static(b"ON"),
    }));
    assert!(matches!(publisher.recv(T), Some(Packet::PubAck(_))));
    let (mut sub, ack) = RawClient::connect(nodes[2].mqtt_addr(), v3, "fan", false, 60);
    assert!(ack.session_present);
    match sub.recv(T) {
        Some(Packet::Publish(p)) => assert_eq!(p.payload, "ON"),
        other => panic!("queued message expected, got {other:?}"),
    }
    // The survivors agree on the state; the killed leader rejoins and catches up.
    converged(&running(&nodes));
    nodes[0].restart();
    converged(&running(&nodes));
}

#[test]
fn a_killed_nodes_clients_get_their_wills_and_their_sessions_end() {
    // [MQTT-3.1.2-8]: the will is published when the network connection is closed
    // without a DISCONNECT, and a dead node closes nothing: the cluster must.
    let mut nodes = Node::cluster_with_env(3, &[("FLOCKMQ_CLUSTER__NODE_LOST_AFTER", "3s")]);
    let port = |n: &Node| n.mqtt_port.to_string();
    // A robot with a retained "offline" will and a persistent session, on node 1 (the
    // leader: its loss also moves the watch to a new leader).
    let (p1, p2, p3) = (port(&nodes[0]), port(&nodes[1]), port(&nodes[2]));
    let robot = flockmq_tests::Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &p1,
            "-i",
            "r9",
            "-c",
            "-q",
            "1",
            "-t",
            "fleet/r9/cmd",
            "--will-topic",
            "fleet/r9/status",
            "--will-payload",
            "offline",
            "--will-retain",
            "--will-qos",
            "1",
        ],
    );
    let watcher = flockmq_tests::Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &p2,
            "-t",
            "fleet/+/status",
            "-q",
            "1",
            "-C",
            "1",
            "-v",
            "-W",
            "40",
        ],
    );
    let connected = |node: &Node| {
        node.api("GET", "/sessions/r9", None)
            .map(|s| s["connected"] == true)
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + T;
    while !connected(&nodes[2]) {
        assert!(std::time::Instant::now() < deadline, "r9 never connected");
        std::thread::sleep(Duration::from_millis(100));
    }
    converged(&running(&nodes));

    nodes[0].kill();
    let got = watcher.finish(Duration::from_secs(40));
    assert_eq!(got.stdout.trim(), "fleet/r9/status offline", "{got:?}");
    // The session outlives its connection (clean session 0) and can be resumed on a
    // survivor; the retained will is there for late subscribers. The node that
    // published the will applied the session's end first: node 3 may be an entry
    // behind.
    flockmq_tests::wait_until("r9's session ended on node 3", T, || !connected(&nodes[2]));
    let late = run(
        "mosquitto_sub",
        &[
            "-p",
            &p3,
            "-t",
            "fleet/+/status",
            "-C",
            "1",
            "-v",
            "-W",
            "10",
        ],
        T,
    );
    assert_eq!(late.stdout.trim(), "fleet/r9/status offline", "{late:?}");
    let (_, ack) = RawClient::connect(
        nodes[2].mqtt_addr(),
        ProtocolVersion::V3_1_1,
        "r9",
        false,
        60,
    );
    assert!(ack.session_present);
    robot.kill();
    // The lost node comes back and agrees with the others.
    nodes[0].restart();
    converged(&running(&nodes));
}

#[test]
fn a_node_restarted_with_its_clock_set_back_still_ends_the_sessions_its_last_run_left_open() {
    const BEHIND: &str = "the clock is behind the last run's start";
    // A node killed under a connected persistent session restarts with its clock ten
    // minutes behind (a test hook of debug builds: an edge gateway that boots before
    // NTP, a VM restored from a snapshot). The session its last run left open must
    // still be ended (its will published, the session resumable): before, the new
    // run's connection ids, taken from the clock, started below the last run's, so
    // the session passed for one of this run's and stayed "connected" for good.
    let mut node = Node::start();
    let connect = broker_node::mqtt::Connect {
        protocol: ProtocolVersion::V3_1_1,
        clean_start: false,
        keep_alive: 60,
        client_id: "r9".into(),
        will: Some(broker_node::mqtt::LastWill {
            topic: "fleet/r9/status".into(),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Default::default(),
        }),
        username: None,
        password: None,
        properties: Default::default(),
    };
    // A restart with the clock right: nothing to say about it.
    node.restart();
    assert!(!node.log().contains(BEHIND), "{}", node.log());
    let (robot, ack) = RawClient::connect_with(node.mqtt_addr(), connect);
    assert_eq!(ack.reason_code, ReasonCode::Success);
    node.wait_connected("r9", true);
    node.kill();
    drop(robot);
    node.set_env("TEST_FLOCKMQ_CLOCK_OFFSET_MS", "-600000");
    node.restart();
    node.wait_connected("r9", false);
    assert_eq!(
        read_retained(&node, "fleet/+/status", 1),
        vec!["fleet/r9/status offline"]
    );
    assert!(
        node.log().contains(BEHIND),
        "the node says why its connection ids do not follow its clock"
    );
    // The session is resumed by a new connection of this run.
    let (_, ack) = RawClient::connect(node.mqtt_addr(), ProtocolVersion::V3_1_1, "r9", false, 60);
    assert!(ack.session_present);
    node.wait_connected("r9", true);
}

#[test]
fn a_node_back_on_an_empty_disk_is_caught_up_and_the_leader_survives() {
    // A lost volume: node 2 returns under its id with nothing on disk. Raft would
    // call that a follower whose log went backwards; the leader must catch it up.
    let mut nodes = Node::cluster(3);
    retain(&nodes[0], "site/name", "north");
    converged(&running(&nodes));
    nodes[1].kill();
    std::fs::remove_dir_all(&nodes[1].data_dir).expect("wipe node 2's data");
    retain(&nodes[0], "site/zone", "a1");
    nodes[1].restart();
    converged(&running(&nodes));
    assert_eq!(
        read_retained(&nodes[1], "site/#", 2),
        vec!["site/name north", "site/zone a1"]
    );
    // The leader still takes writes, and everyone is alive.
    retain(&nodes[2], "site/ok", "yes");
    converged(&running(&nodes));
    for node in &nodes {
        let health = ureq::get(&format!("http://127.0.0.1:{}/healthz", node.http_port)).call();
        assert!(health.is_ok(), "{health:?}\n{}", node.log());
    }
}

#[test]
fn a_will_reaches_every_nodes_subscribers_exactly_once() {
    // Every node hands a committed will to its own clients; the state machine queues
    // it for persistent sessions and chooses the shared group's member. Nobody may get
    // it twice.
    let nodes = Node::cluster(3);
    let port = |n: &Node| n.mqtt_port.to_string();
    let (p1, p2, p3) = (port(&nodes[0]), port(&nodes[1]), port(&nodes[2]));
    // An offline persistent session on node 3, to be given the will through its queue.
    let historian = |extra: &[&str]| {
        let mut args = vec![
            "-p",
            &p3,
            "-i",
            "historian",
            "-c",
            "-q",
            "1",
            "-t",
            "fleet/+/status",
        ];
        args.extend_from_slice(extra);
        run("mosquitto_sub", &args, T)
    };
    let subscribed = historian(&["-W", "2"]);
    assert_ne!(subscribed.code, None, "{subscribed:?}");
    let watch = |p: &str, topic: &str| {
        flockmq_tests::Background::spawn(
            "mosquitto_sub",
            &[
                "-V", "mqttv5", "-p", p, "-t", topic, "-q", "1", "-v", "-C", "2", "-W", "12",
            ],
        )
    };
    let watchers = [
        watch(&p1, "fleet/+/status"),
        watch(&p2, "fleet/+/status"),
        watch(&p3, "fleet/+/status"),
    ];
    // One shared group with a member on node 2 and one on node 3.
    let shared = [
        watch(&p2, "$share/alerts/fleet/+/status"),
        watch(&p3, "$share/alerts/fleet/+/status"),
    ];
    let robot = flockmq_tests::Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &p1,
            "-i",
            "r7",
            "-q",
            "1",
            "-t",
            "fleet/r7/cmd",
            "--will-topic",
            "fleet/r7/status",
            "--will-payload",
            "offline",
            "--will-qos",
            "1",
        ],
    );
    // Wait until every subscription and the robot are in the state everywhere.
    let deadline = std::time::Instant::now() + T;
    loop {
        let ready = nodes.iter().all(|n| {
            n.api("GET", "/sessions/r7", None)
                .is_ok_and(|s| s["connected"] == true)
                && n.api("GET", "/subscriptions?limit=100", None)
                    .is_ok_and(|s| s["data"].as_array().is_some_and(|d| d.len() >= 7))
        });
        if ready {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "subscriptions never settled"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    robot.kill();

    for (n, w) in watchers.into_iter().enumerate() {
        let got = w.finish(Duration::from_secs(20));
        assert_eq!(
            got.stdout.lines().collect::<Vec<_>>(),
            ["fleet/r7/status offline"],
            "watcher on node {}: {got:?}",
            n + 1
        );
    }
    let shared_got: Vec<String> = shared
        .into_iter()
        .flat_map(|w| {
            let got = w.finish(Duration::from_secs(20));
            got.stdout.lines().map(str::to_owned).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(shared_got, ["fleet/r7/status offline"], "shared group");
    let queued = historian(&["-v", "-C", "2", "-W", "4"]);
    assert_eq!(
        queued.stdout.lines().collect::<Vec<_>>(),
        ["fleet/r7/status offline"],
        "{queued:?}"
    );
}

#[test]
fn nodes_speak_mutual_tls_when_configured() {
    let dir = tempfile::tempdir().expect("temp dir");
    flockmq_tests::pki::make_pki(dir.path());
    // One certificate for every node, good as server and as client, named by
    // cluster.tls_server_name rather than by each node's address.
    flockmq_tests::pki::issue(
        dir.path(),
        "node",
        "flockmq-node",
        "subjectAltName=DNS:flockmq-node\nextendedKeyUsage=serverAuth,clientAuth\n",
    );
    let p = |name: &str| dir.path().join(name).display().to_string();
    let (cert, key, ca) = (p("node.pem"), p("node.key"), p("ca.pem"));
    let nodes = tls_cluster(3, dir.path(), Some("flockmq-node"));
    // Raft formed the cluster over TLS; a publish on node 3 is forwarded to node 1.
    forwarded(&nodes[0], &nodes[2]);
    converged(&running(&nodes));

    // The cluster port speaks TLS with a certificate from the CA, and wants one back.
    let addr = format!("127.0.0.1:{}", nodes[0].cluster_port);
    let with_cert = run(
        "sh",
        &[
            "-c",
            &format!(
                "echo | openssl s_client -connect {addr} -CAfile {ca} -verify_return_error \
                 -cert {cert} -key {key} -servername flockmq-node 2>&1"
            ),
        ],
        T,
    );
    assert!(
        with_cert.stdout.contains("Verification: OK"),
        "{with_cert:?}"
    );
    refused_without_a_certificate(&nodes[0], &ca, Some("flockmq-node"));
}

/// `n` nodes speaking mutual TLS with `dir`'s `node.pem`, `node.key` and `ca.pem`,
/// checking `server_name` in their peers' certificates when given.
fn tls_cluster(n: usize, dir: &std::path::Path, server_name: Option<&str>) -> Vec<Node> {
    Node::cluster_with_node_env(n, &[], |_| tls_env(dir, server_name))
}

/// The settings of cluster TLS from `dir`'s `node.pem`, `node.key` and `ca.pem`.
fn tls_env(dir: &std::path::Path, server_name: Option<&str>) -> Vec<(String, String)> {
    let p = |name: &str| dir.join(name).display().to_string();
    let mut env = vec![
        ("FLOCKMQ_CLUSTER__TLS_CERT_FILE".to_owned(), p("node.pem")),
        ("FLOCKMQ_CLUSTER__TLS_KEY_FILE".to_owned(), p("node.key")),
        ("FLOCKMQ_CLUSTER__TLS_CA_FILE".to_owned(), p("ca.pem")),
    ];
    if let Some(name) = server_name {
        env.push((
            "FLOCKMQ_CLUSTER__TLS_SERVER_NAME".to_owned(),
            name.to_owned(),
        ));
    }
    env
}

/// A QoS 1 publish on `publisher` reaches a subscriber on `subscriber`.
fn forwarded(subscriber: &Node, publisher: &Node) {
    forwarded_to(subscriber, publisher, "watcher");
}

/// A QoS 1 publish on `publisher` reaches the subscriber `client_id` on `subscriber`.
fn forwarded_to(subscriber: &Node, publisher: &Node, client_id: &str) {
    let sub = flockmq_tests::Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &subscriber.mqtt_port.to_string(),
            "-i",
            client_id,
            "-t",
            "fleet/#",
            "-q",
            "1",
            "-C",
            "1",
            "-v",
            "-W",
            "15",
        ],
    );
    publisher.wait_subscribed(client_id, "fleet/#");
    let port = publisher.mqtt_port.to_string();
    let args = ["-p", &port, "-t", "fleet/r1/pose", "-m", "x", "-q", "1"];
    let r = run("mosquitto_pub", &args, T);
    assert_eq!(r.code, Some(0), "{r:?}");
    let got = sub.finish(T);
    assert_eq!(got.stdout.trim(), "fleet/r1/pose x", "{got:?}");
}

/// A CA in `dir` and a node certificate it signs, named `flockmq-node` (every node
/// of the cluster uses it, as server and as client): `ca.pem`, `node.pem`, `node.key`.
fn cluster_pki(dir: &std::path::Path) {
    flockmq_tests::pki::make_pki(dir);
    flockmq_tests::pki::issue(
        dir,
        "node",
        "flockmq-node",
        "subjectAltName=DNS:flockmq-node\nextendedKeyUsage=serverAuth,clientAuth\n",
    );
}

/// A TLS 1.2 handshake with `node`'s cluster port presenting `dir`'s node certificate
/// and trusting `dir`'s CA (1.2, so that the server's verdict on the client's
/// certificate comes within the handshake). Whether it succeeded (the node's
/// certificate verified, a session established, no alert from the node), and what
/// openssl said. Not openssl's exit code: after a good handshake the node, finding no
/// HTTP/2 preface, may close without a close_notify, which openssl reports as an
/// error; nor its "Verify return code", which says 0 (ok) after a failed check too.
fn cluster_handshake(node: &Node, dir: &std::path::Path) -> (bool, String) {
    let p = |name: &str| dir.join(name).display().to_string();
    let r = run(
        "sh",
        &[
            "-c",
            &format!(
                "echo | openssl s_client -connect 127.0.0.1:{} -tls1_2 -CAfile {} \
                 -verify_return_error -cert {} -key {} -servername flockmq-node 2>&1",
                node.cluster_port,
                p("ca.pem"),
                p("node.pem"),
                p("node.key"),
            ),
        ],
        T,
    );
    let ok = r.stdout.contains("Verification: OK")
        && r.stdout.contains("New, TLSv1.2")
        && !r.stdout.contains("alert");
    (ok, r.stdout)
}

/// SIGHUP to `node`, then wait until its log says `what` once more than before.
fn sighup_and_wait_for(node: &Node, what: &str) {
    let before = node.log().matches(what).count();
    let r = run("kill", &["-HUP", &node.pid().to_string()], T);
    assert_eq!(r.code, Some(0), "{r:?}");
    wait_until(what, T, || node.log().matches(what).count() > before);
}

#[test]
fn sighup_reloads_the_cluster_certificates_from_a_new_ca_and_the_cluster_keeps_replicating() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (old, new, live) = (
        dir.path().join("old"),
        dir.path().join("new"),
        dir.path().join("live"),
    );
    for d in [&old, &new, &live] {
        std::fs::create_dir(d).expect("mkdir");
    }
    cluster_pki(&old);
    cluster_pki(&new);
    let install = |from: &std::path::Path| {
        for file in ["ca.pem", "node.pem", "node.key"] {
            std::fs::copy(from.join(file), live.join(file)).expect("copy");
        }
    };
    install(&old);
    let mut nodes = tls_cluster(3, &live, Some("flockmq-node"));
    forwarded_to(&nodes[0], &nodes[2], "before");
    assert!(cluster_handshake(&nodes[1], &old).0);

    // Every node's files now come from a new CA; SIGHUP every node.
    install(&new);
    let reloaded = "cluster TLS certificate, key and CA files reloaded";
    for node in &nodes {
        sighup_and_wait_for(node, reloaded);
    }
    // The connections made before the reload carry on.
    forwarded_to(&nodes[0], &nodes[2], "established");
    for node in &nodes {
        let (ok, said) = cluster_handshake(node, &new);
        assert!(ok, "the new certificate is accepted: {said}");
        let (ok, said) = cluster_handshake(node, &old);
        assert!(!ok, "the old certificate and CA are refused: {said}");
    }
    // The old certificate, even trusting the node's new one, is turned away by the
    // node: its CA is no longer trusted.
    let mixed = tempfile::tempdir().expect("temp dir");
    std::fs::copy(new.join("ca.pem"), mixed.path().join("ca.pem")).expect("copy");
    for file in ["node.pem", "node.key"] {
        std::fs::copy(old.join(file), mixed.path().join(file)).expect("copy");
    }
    let (ok, said) = cluster_handshake(&nodes[0], mixed.path());
    assert!(!ok && said.contains("alert"), "{said}");

    // A restarted node knows only the new files: its peers must open fresh
    // connections to it, and it to them, with the new material on both sides.
    nodes[1].restart();
    converged(&running(&nodes));
    forwarded_to(&nodes[1], &nodes[0], "after-1");
    forwarded_to(&nodes[2], &nodes[1], "after-2");

    // A broken key file, then a key that does not match the certificate: each reload
    // fails, and the material in force stays.
    let failed = "cluster TLS reload failed";
    std::fs::write(live.join("node.key"), "not a key").expect("write");
    sighup_and_wait_for(&nodes[0], failed);
    std::fs::copy(old.join("node.key"), live.join("node.key")).expect("copy");
    sighup_and_wait_for(&nodes[0], failed);
    assert!(
        nodes[0]
            .log()
            .contains("do not make a certificate and its key"),
        "the mismatch is named"
    );
    let (ok, said) = cluster_handshake(&nodes[0], &new);
    assert!(
        ok,
        "the material in force stays after a failed reload: {said}"
    );
    forwarded_to(&nodes[2], &nodes[0], "after-failed");
}

#[test]
fn a_ca_bundle_moves_the_cluster_to_a_new_ca_node_by_node_with_sighup_alone() {
    // What the README tells operators: both CAs first, then each node's new
    // certificate, then the new CA alone; every step a SIGHUP, and at the steps
    // where old and new certificates meet, a node that must open fresh connections
    // (restarted) rejoins.
    let dir = tempfile::tempdir().expect("temp dir");
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    let live: Vec<std::path::PathBuf> = (1..=3)
        .map(|n| dir.path().join(format!("node{n}")))
        .collect();
    for d in [&old, &new].into_iter().chain(&live) {
        std::fs::create_dir(d).expect("mkdir");
    }
    cluster_pki(&old);
    cluster_pki(&new);
    let ca = |from: &std::path::Path| std::fs::read_to_string(from.join("ca.pem")).expect("CA");
    let (old_ca, new_ca) = (ca(&old), ca(&new));
    let bundle = [old_ca.as_str(), new_ca.as_str()].concat();
    let put = |node: usize, from: &std::path::Path, ca: &str| {
        for file in ["node.pem", "node.key"] {
            std::fs::copy(from.join(file), live[node].join(file)).expect("copy");
        }
        std::fs::write(live[node].join("ca.pem"), ca).expect("write CA");
    };
    for i in 0..3 {
        put(i, &old, &old_ca);
    }
    let mut nodes =
        Node::cluster_with_node_env(3, &[], |id| tls_env(&live[id - 1], Some("flockmq-node")));
    forwarded_to(&nodes[0], &nodes[1], "start");
    let reloaded = "cluster TLS certificate, key and CA files reloaded";

    // 1. Both CAs everywhere.
    for (i, node) in nodes.iter().enumerate() {
        put(i, &old, &bundle);
        sighup_and_wait_for(node, reloaded);
    }
    // 2. Node 1 gets its certificate from the new CA: node 2, still on the old one,
    //    rejoins over fresh connections to node 1 (new) and node 3 (old).
    put(0, &new, &bundle);
    sighup_and_wait_for(&nodes[0], reloaded);
    nodes[1].restart();
    converged(&running(&nodes));
    forwarded_to(&nodes[0], &nodes[1], "mixed-1");
    forwarded_to(&nodes[1], &nodes[0], "mixed-2");
    // 3. Nodes 2 and 3 too, then the new CA alone everywhere: the old certificate is
    //    refused, and node 1 rejoins over fresh connections.
    for (i, node) in nodes.iter().enumerate().skip(1) {
        put(i, &new, &bundle);
        sighup_and_wait_for(node, reloaded);
    }
    for (i, node) in nodes.iter().enumerate() {
        put(i, &new, &new_ca);
        sighup_and_wait_for(node, reloaded);
    }
    for node in &nodes {
        let (ok, said) = cluster_handshake(node, &new);
        assert!(ok, "the new certificate is accepted: {said}");
        let (ok, said) = cluster_handshake(node, &old);
        assert!(!ok, "the old certificate is refused: {said}");
    }
    nodes[0].restart();
    converged(&running(&nodes));
    forwarded_to(&nodes[2], &nodes[0], "new-1");
    forwarded_to(&nodes[0], &nodes[2], "new-2");
}

/// A peer without a certificate is turned away from `node`'s cluster port:
/// s_client keeps the connection until the node closes it (-ign_eof), so it ends
/// on the node's alert.
fn refused_without_a_certificate(node: &Node, ca: &str, server_name: Option<&str>) {
    let addr = format!("127.0.0.1:{}", node.cluster_port);
    let name = server_name.map_or(String::new(), |n| format!("-servername {n}"));
    let without = run(
        "sh",
        &[
            "-c",
            &format!(
                "openssl s_client -connect {addr} -CAfile {ca} {name} -ign_eof </dev/null 2>&1"
            ),
        ],
        T,
    );
    assert!(
        without.stdout.contains("alert certificate required"),
        "{without:?}"
    );
}

#[test]
fn a_node_whose_cluster_port_is_beyond_loopback_without_tls_refuses_to_start() {
    let data = tempfile::tempdir().expect("temp dir");
    let start = |extra: &[&str]| {
        let mut args = vec![
            "--data-dir",
            data.path().to_str().expect("utf-8"),
            "--cluster-addr",
            "0.0.0.0:0",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(flockmq_tests::broker_binary())
            .args(&args)
            .output()
            .expect("run broker-node")
    };
    let refused = start(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cluster_addr")
            && stderr.contains("cluster TLS is off")
            && stderr.contains("cluster.allow_insecure = true"),
        "{stderr}"
    );
    assert!(
        !data.path().join("raft").exists()
            && std::fs::read_dir(data.path()).is_ok_and(|d| d.count() == 0),
        "a refused node must not touch its data directory"
    );
}

#[test]
fn certificates_from_cluster_certs_secure_a_cluster_and_check_pubsub_sees_it_work() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = dir.path().join("certs");
    let made = run(
        flockmq_tests::broker_binary().to_str().expect("utf-8"),
        &[
            "cluster-certs",
            "--dir",
            certs.to_str().expect("utf-8"),
            "--host",
            "127.0.0.1",
            "--valid-for",
            "2d",
        ],
        T,
    );
    assert_eq!(made.code, Some(0), "{made:?}");
    let ca = certs.join("ca.pem").display().to_string();
    let nodes = tls_cluster(2, &certs, None);
    wait_until("both nodes to see each other as voters", T, || {
        nodes[1].status()["members"]
            .as_array()
            .is_some_and(|m| m.len() == 2)
    });
    let check = |node: &Node| {
        run(
            flockmq_tests::broker_binary().to_str().expect("utf-8"),
            &["check-pubsub", "--addr", &node.mqtt_addr().to_string()],
            T,
        )
    };
    // check-pubsub on each node, then a subscriber on node 1 and the publisher on
    // node 2: forwarded over mutual TLS; and a peer without a certificate refused.
    for node in &nodes {
        let r = check(node);
        assert_eq!(r.code, Some(0), "{r:?}");
        assert!(r.stdout.contains("reached its subscriber"), "{r:?}");
    }
    forwarded(&nodes[0], &nodes[1]);
    refused_without_a_certificate(&nodes[0], &ca, None);
}

#[test]
fn a_five_node_cluster_keeps_serving_without_two_nodes_leader_included() {
    let mut nodes = Node::cluster(5);
    retain(&nodes[4], "site/mode", "day");
    converged(&running(&nodes));
    // Kill the leader and one follower: three of five remain, a majority.
    let leader = nodes[0].status()["leader"]
        .as_u64()
        .expect("a leader is known") as usize;
    let follower = if leader == 2 { 3 } else { 2 };
    nodes[leader - 1].kill();
    nodes[follower - 1].kill();
    let alive: Vec<usize> = (0..5)
        .filter(|i| i + 1 != leader && i + 1 != follower)
        .collect();
    // A write waits for the next leader; every survivor serves it and the old state.
    retain(&nodes[alive[0]], "site/mode", "night");
    for &i in &alive {
        assert_eq!(
            read_retained(&nodes[i], "site/mode", 1),
            vec!["site/mode night"],
            "node {}",
            i + 1
        );
    }
    converged(&running(&nodes));
    // Both come back and catch up with what they missed.
    nodes[leader - 1].restart();
    nodes[follower - 1].restart();
    converged(&running(&nodes));
    assert_eq!(
        read_retained(&nodes[leader - 1], "site/mode", 1),
        vec!["site/mode night"]
    );
}

#[test]
fn a_paused_nodes_clients_get_their_wills() {
    // A SIGSTOPped node's kernel still accepts connections, but its Raft answers
    // nothing: the leader judges liveness by the answers to its appends, so the
    // paused node is declared lost like a dead one.
    let nodes = Node::cluster_with_env(3, &[("FLOCKMQ_CLUSTER__NODE_LOST_AFTER", "3s")]);
    let (p2, p3) = (
        nodes[1].mqtt_port.to_string(),
        nodes[2].mqtt_port.to_string(),
    );
    let _robot = flockmq_tests::Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &p3,
            "-i",
            "r10",
            "-q",
            "1",
            "-t",
            "fleet/r10/cmd",
            "--will-topic",
            "fleet/r10/status",
            "--will-payload",
            "offline",
        ],
    );
    let watcher = flockmq_tests::Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &p2,
            "-t",
            "fleet/+/status",
            "-C",
            "1",
            "-v",
            "-W",
            "40",
        ],
    );
    nodes[0].wait_connected("r10", true);
    converged(&running(&nodes));
    let pid = nodes[2].pid().to_string();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill -STOP");
    assert!(stop.success());
    let got = watcher.finish(Duration::from_secs(40));
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    assert_eq!(got.stdout.trim(), "fleet/r10/status offline", "{got:?}");
    // The resumed node catches up with the others. (Its client's clean session ended
    // with the will; mosquitto_sub, closed by its node, reconnects to a new one.)
    converged(&running(&nodes));
}

#[test]
fn a_node_that_catches_up_by_snapshot_closes_connections_taken_over_meanwhile() {
    // A node that installs a snapshot applies none of the entries it covers, so none
    // of their events reach it: it must compare its live connections with the state.
    let nodes = Node::cluster_with_env(
        3,
        &[
            ("FLOCKMQ_CLUSTER__SNAPSHOT_AFTER_LOGS", "50"),
            ("FLOCKMQ_CLUSTER__NODE_LOST_AFTER", "300s"),
        ],
    );
    let (mut old, _) =
        RawClient::connect(nodes[2].mqtt_addr(), ProtocolVersion::V5, "mover", false, 0);
    converged(&running(&nodes));
    let pid = nodes[2].pid().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    signal("-STOP");
    // While node 3 sleeps the log runs far past what the leader keeps behind its
    // snapshots, the client moves to node 1 in the middle of it, and the log runs on:
    // the entry of the move is gone from the leader's log when node 3 wakes.
    let (mut p, _) = RawClient::connect(
        nodes[0].mqtt_addr(),
        ProtocolVersion::V3_1_1,
        "filler",
        true,
        60,
    );
    let mut fill = |from: u16| {
        for i in from..from + 300 {
            let id = i + 1;
            p.send(&flockmq_tests::mqtt::publish(
                &format!("fill/{i}"),
                "x",
                QoS::AtLeastOnce,
                true,
                id,
            ));
            match p.recv(T) {
                Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, id),
                other => panic!("PUBACK expected, got {other:?}"),
            }
        }
    };
    fill(0);
    let (_new, ack) =
        RawClient::connect(nodes[0].mqtt_addr(), ProtocolVersion::V5, "mover", false, 0);
    assert_eq!(ack.reason_code, ReasonCode::Success);
    fill(300);
    signal("-CONT");
    // The leader has purged the entries node 3 lacks: it can only send a snapshot.
    wait_until(
        "node 3 to install a snapshot",
        Duration::from_secs(30),
        || nodes[2].log().contains("snapshot installed"),
    );
    assert_eq!(
        flockmq_tests::mqtt::disconnect_reason(&mut old, Duration::from_secs(30)),
        Some(ReasonCode::SessionTakenOver),
        "the superseded connection on the node that caught up is closed"
    );
    converged(&running(&nodes));
}

#[test]
fn a_node_restarted_with_an_empty_disk_catches_up_before_it_votes() {
    // Node 1 (the lowest id, the one that initializes a fresh cluster) loses its disk
    // and starts again with the same flags. It must neither initialize a new cluster
    // nor vote with an empty log (a candidate lacking committed entries could then
    // win), until it holds what the cluster committed.
    let mut nodes = Node::cluster(3);
    let r = run(
        "mosquitto_pub",
        &[
            "-p",
            &nodes[1].mqtt_port.to_string(),
            "-t",
            "site/name",
            "-m",
            "north",
            "-r",
            "-q",
            "1",
        ],
        T,
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    converged(&running(&nodes));
    nodes[0].kill();
    std::fs::remove_dir_all(&nodes[0].data_dir).expect("wipe node 1's disk");
    let before = nodes[0].log().len();
    nodes[0].restart();
    let since_restart = |node: &Node| node.log()[before..].to_owned();
    wait_until(
        "node 1 to catch up and vote again",
        Duration::from_secs(30),
        || since_restart(&nodes[0]).contains("caught up: voting again"),
    );
    let log = since_restart(&nodes[0]);
    assert!(log.contains("catching up before voting"), "{log}");
    assert!(!log.contains("initializing a new cluster"), "{log}");
    converged(&running(&nodes));
    let retained = run(
        "mosquitto_sub",
        &[
            "-p",
            &nodes[0].mqtt_port.to_string(),
            "-t",
            "site/#",
            "-v",
            "--retained-only",
            "-W",
            "2",
        ],
        T,
    );
    assert_eq!(retained.stdout.trim(), "site/name north");
}

/// Where Debian's libfaketime lives (the `libfaketime` package).
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn a_node_whose_clock_is_ten_minutes_behind_expires_nothing_early() {
    // Node 3's wall clock runs ten minutes behind (libfaketime; its monotonic clock is
    // left alone). Times it writes into commands are moved onto the leader's clock,
    // and messages it forwards travel with their age: nothing it touches expires early.
    assert!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "libfaketime missing: scripts/install-test-deps.sh installs it"
    );
    let nodes = Node::cluster_with_node_env(3, &[], |id| {
        if id == 3 {
            vec![
                ("LD_PRELOAD".into(), FAKETIME_LIB.into()),
                ("FAKETIME".into(), "-10m".into()),
                ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
                ("FAKETIME_DONT_RESET".into(), "1".into()),
            ]
        } else {
            Vec::new()
        }
    });
    let leader = nodes[0].status()["leader"].as_u64().expect("a leader");
    assert_ne!(
        leader, 3,
        "the slow clock must not be the leader's for this test"
    );
    let v5 = ProtocolVersion::V5;
    let expiring = |topic: &str, payload: &str, id: u16| {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: Some(id),
            properties: PublishProperties {
                message_expiry_interval: Some(120),
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        })
    };
    // The subscriber's persistent session (expiry 120 s), on `node`.
    let persistent_sub = |node: &Node, clean_start: bool| {
        RawClient::connect_with(
            node.mqtt_addr(),
            broker_node::mqtt::Connect {
                protocol: v5,
                clean_start,
                keep_alive: 60,
                client_id: "slow-clock-sub".into(),
                will: None,
                username: None,
                password: None,
                properties: broker_node::mqtt::ConnectProperties {
                    session_expiry_interval: Some(120),
                    ..Default::default()
                },
            },
        )
    };
    // It ends on node 3: its disconnect time is node 3's.
    let (mut offline, _) = persistent_sub(&nodes[2], true);
    flockmq_tests::mqtt::subscribe(&mut offline, "clock/#", QoS::AtLeastOnce);
    offline.send(&Packet::Disconnect(broker_node::mqtt::Disconnect {
        reason_code: ReasonCode::Success,
        properties: Default::default(),
    }));
    assert!(offline.is_closed(T));
    // A live subscriber on node 1 for messages node 3 forwards.
    let (mut live, _) = RawClient::connect(nodes[0].mqtt_addr(), v5, "live-sub", true, 60);
    flockmq_tests::mqtt::subscribe(&mut live, "clock/#", QoS::AtLeastOnce);
    converged(&running(&nodes));
    // Published through node 3 with a 120 s expiry: queued for the offline session
    // with node 3's acceptance time, forwarded to node 1 with it.
    let (mut p, _) = RawClient::connect(nodes[2].mqtt_addr(), v5, "slow-clock-pub", true, 60);
    p.send(&expiring("clock/a", "queued", 1));
    match p.recv(T) {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason_code, ReasonCode::Success),
        other => panic!("PUBACK expected, got {other:?}"),
    }
    let got = flockmq_tests::mqtt::next_publish(&mut live, T).expect("forwarded from node 3");
    assert_eq!(got.payload, "queued");
    let left = got.properties.message_expiry_interval.expect("an expiry");
    assert!(left > 100, "{left} s left of 120: dated by the slow clock");
    // Make the leader sweep: a retained message that expires in a second. Once it is
    // gone, a sweep ran at the leader's time over the session and its queue too.
    let (mut ticker, _) = RawClient::connect(nodes[0].mqtt_addr(), v5, "ticker", true, 60);
    ticker.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: "tick".into(),
        packet_id: Some(1),
        properties: PublishProperties {
            message_expiry_interval: Some(1),
            ..Default::default()
        },
        payload: Bytes::from_static(b"t"),
    }));
    assert!(matches!(ticker.recv(T), Some(Packet::PubAck(_))));
    wait_for("the leader's expiry sweep", T, || {
        let retained = nodes[0].api("GET", "/retained", None)?;
        match retained.to_string().contains("\"tick\"") {
            true => Err(retained.to_string()),
            false => Ok(()),
        }
    });
    let (mut back, ack) = persistent_sub(&nodes[0], false);
    assert!(ack.session_present, "the session did not expire early");
    let queued = flockmq_tests::mqtt::next_publish(&mut back, T).expect("the queued message");
    assert_eq!(queued.payload, "queued");
}

/// Three nodes, node 3 applying every entry that holds an Enqueue `ms` late (a test
/// hook of debug builds), its state readable meanwhile.
fn lagging_node_3(ms: u64) -> Vec<Node> {
    Node::cluster_with_node_env(3, &[], |id| match id {
        3 => vec![("TEST_FLOCKMQ_DELAY_ENQUEUE_APPLY_MS".into(), ms.to_string())],
        _ => Vec::new(),
    })
}

#[test]
fn a_session_resumed_on_a_lagging_follower_knows_its_own_qos2_identifiers() {
    // Node 3 applies every entry holding an Enqueue 1.5 s late (a test hook of debug
    // builds). A persistent publisher's QoS 2 message is committed through node 1 and
    // PUBRECed; the publisher loses its connection before PUBREL, resumes its session
    // on node 3 at once and sends the PUBLISH again with DUP, as a client that never
    // saw the PUBREC would. Node 3 answers CONNACK only once it has applied the entry
    // that opened the session (and so the Enqueue before it), so it knows identifier 7
    // is held: the message is not delivered again. A clean subscriber shows it: live
    // deliveries do not pass the state machine's own deduplication.
    let nodes = lagging_node_3(1500);
    let v5 = ProtocolVersion::V5;
    let (mut watcher, _) = RawClient::connect(nodes[0].mqtt_addr(), v5, "watcher", true, 60);
    watcher.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            "orders/#".into(),
            SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: RetainHandling::SendAtSubscribe,
            },
        )],
        properties: SubscribeProperties::default(),
    }));
    assert!(matches!(watcher.recv(T), Some(Packet::SubAck(_))));
    nodes[2].wait_subscribed("watcher", "orders/#");
    let order = |dup: bool| {
        Packet::Publish(Publish {
            dup,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: "orders/1".into(),
            packet_id: Some(7),
            properties: PublishProperties::default(),
            payload: Bytes::from_static(b"one"),
        })
    };
    // A v3.1.1 publisher with Clean Session 0: a persistent session.
    let v3 = ProtocolVersion::V3_1_1;
    let (mut till, _) = RawClient::connect(nodes[0].mqtt_addr(), v3, "till", false, 60);
    till.send(&order(false));
    assert!(
        matches!(till.recv(T), Some(Packet::PubRec(r)) if r.packet_id == 7 && !r.reason_code.is_error())
    );
    drop(till);
    let (mut till, ack) = RawClient::connect(nodes[2].mqtt_addr(), v3, "till", false, 60);
    assert!(ack.session_present, "{ack:?}");
    till.send(&order(true));
    match till.recv(T) {
        Some(Packet::PubRec(r)) if r.packet_id == 7 => {
            till.send(&Packet::PubRel(broker_node::mqtt::PubRel::new(
                7,
                ReasonCode::Success,
            )));
        }
        other => panic!("PUBREC expected, got {other:?}"),
    }
    assert!(matches!(till.recv(T), Some(Packet::PubComp(_))));
    let first = flockmq_tests::mqtt::receive_acked(&mut watcher, 1, T);
    assert_eq!(first[0].payload, Bytes::from_static(b"one"));
    // Any second copy would have been forwarded by now: node 3 has acknowledged the
    // resend, and node 1 answered the forward first.
    let again = watcher.recv(Duration::from_secs(2));
    assert!(
        !matches!(again, Some(Packet::Publish(_))),
        "delivered twice: {again:?}"
    );
}

#[test]
fn a_subscription_raised_from_qos_0_while_a_message_is_dispatched_gets_it_once() {
    // Node 3 applies every entry holding an Enqueue 8 s late (a test hook of debug
    // builds): its view of the subscriptions lags behind the log. "watcher" holds a
    // persistent session on node 1 subscribed to alerts/# at QoS 0; "robot", offline,
    // at QoS 1, so that a QoS 1 alert leaves a queue for the state machine to find. A
    // first alert through node 1 starts node 3's lag (node 1 answers it at once); the
    // watcher raises its subscription to QoS 1, committed behind that alert; a second
    // alert through node 3 is dispatched on the lagging view: the watcher gets it
    // directly at QoS 0. The command applies after the raise: had the watcher not been
    // excepted as reached directly, the state machine would find its QoS 1
    // subscription and queue it a second copy. (8 s: the steps between the first alert
    // and the check below take a few commits, which a loaded machine slows.)
    let nodes = lagging_node_3(8_000);
    assert_ne!(nodes[2].status()["leader"], 3, "node 3 must be a follower");
    let v3 = ProtocolVersion::V3_1_1;
    let (mut robot, _) = RawClient::connect(nodes[0].mqtt_addr(), v3, "robot", false, 60);
    let granted = flockmq_tests::mqtt::subscribe(&mut robot, "alerts/#", QoS::AtLeastOnce);
    assert_eq!(granted, vec![ReasonCode::GrantedQoS1]);
    drop(robot);
    let (mut watcher, _) = RawClient::connect(nodes[0].mqtt_addr(), v3, "watcher", false, 60);
    let granted = flockmq_tests::mqtt::subscribe(&mut watcher, "alerts/#", QoS::AtMostOnce);
    assert_eq!(granted, vec![ReasonCode::GrantedQoS0]);
    nodes[2].wait_connected("robot", false);
    nodes[2].wait_subscribed("watcher", "alerts/#");
    let (mut first_control, _) =
        RawClient::connect(nodes[0].mqtt_addr(), v3, "control-1", true, 60);
    let (mut control, _) = RawClient::connect(nodes[2].mqtt_addr(), v3, "control", true, 60);
    let alert = |n: u16| {
        flockmq_tests::mqtt::publish(
            "alerts/fire",
            &format!("alert-{n}"),
            QoS::AtLeastOnce,
            false,
            n,
        )
    };
    first_control.send(&alert(1));
    let first = flockmq_tests::mqtt::next_publish(&mut watcher, T).expect("the first alert");
    assert_eq!(first.payload, Bytes::from_static(b"alert-1"));
    // Committed, and applied on node 1; node 3 holds it back.
    assert!(matches!(first_control.recv(T), Some(Packet::PubAck(a)) if a.packet_id == 1));
    let granted = flockmq_tests::mqtt::subscribe_with(
        &mut watcher,
        "alerts/#",
        flockmq_tests::mqtt::opts(QoS::AtLeastOnce),
        2,
    );
    assert_eq!(granted, vec![ReasonCode::GrantedQoS1]);
    control.send(&alert(2));
    // Node 3 has not applied the raise yet: the second alert went out on the old view.
    let seen = nodes[2]
        .api("GET", "/subscriptions?clientid=watcher", None)
        .expect("the watcher's subscriptions");
    assert!(
        seen.to_string().contains("\"qos\":0"),
        "node 3 no longer lags: {seen}"
    );
    // The second alert, then whatever else comes: a second copy would be queued once
    // node 3's lag ends and the raise and the alert apply everywhere.
    let mut got = vec![first];
    got.extend(flockmq_tests::mqtt::receive_acked_until(
        &mut watcher,
        T,
        "the second alert",
        |g| {
            g.iter()
                .any(|p| p.payload == Bytes::from_static(b"alert-2"))
        },
    ));
    // Node 3's lag ends (8 s for each of the entries it holds back).
    flockmq_tests::wait_until("node 3 to catch up", Duration::from_secs(60), || {
        nodes[2].applied_index() >= nodes[0].applied_index()
    });
    converged(&nodes.iter().collect::<Vec<_>>());
    while let Some(packet) = watcher.recv(Duration::from_secs(2)) {
        if let Packet::Publish(p) = packet {
            if let Some(id) = p.packet_id {
                watcher.send(&Packet::PubAck(broker_node::mqtt::PubAck::new(
                    id,
                    ReasonCode::Success,
                )));
            }
            got.push(p);
        }
    }
    let payloads: Vec<String> = got
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(payloads, vec!["alert-1", "alert-2"], "each alert once");
    // And the offline robot has both in its queue.
    let (mut robot, ack) = RawClient::connect(nodes[1].mqtt_addr(), v3, "robot", false, 60);
    assert!(ack.session_present);
    let queued: Vec<String> = flockmq_tests::mqtt::receive_acked(&mut robot, 2, T)
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(queued, vec!["alert-1", "alert-2"]);
}

#[test]
fn a_burst_of_large_messages_for_an_offline_session_replicates_and_converges() {
    // 24 QoS 1 messages of 2 MiB (48 MiB, within the default 64 MiB queue) for a
    // persistent session that is offline: each becomes an Enqueue, and a batch of them
    // used to become one Raft entry of up to 48 MiB. No follower answered such an append within openraft's append timeout
    // (the 200 ms heartbeat interval), and it went again, whole, every time: nothing
    // after it ever committed. Batches now stop at 1 MiB (a larger command goes alone)
    // and appends carry at most 2 MiB of entries (a larger entry goes alone).
    let nodes = Node::cluster_with_env(3, &[("FLOCKMQ_MQTT__MAX_PACKET_SIZE", "4MiB")]);
    let v3 = ProtocolVersion::V3_1_1;
    let (mut robot, _) = RawClient::connect(nodes[1].mqtt_addr(), v3, "robot", false, 60);
    let granted = flockmq_tests::mqtt::subscribe(&mut robot, "fleet/#", QoS::AtLeastOnce);
    assert_eq!(granted, vec![ReasonCode::GrantedQoS1]);
    drop(robot);
    nodes[0].wait_subscribed("robot", "fleet/#");
    let (mut control, _) = RawClient::connect(nodes[0].mqtt_addr(), v3, "control", true, 60);
    let count = 24u16;
    for id in 1..=count {
        let mut payload = vec![b'x'; 2 << 20];
        payload[..2].copy_from_slice(&id.to_be_bytes());
        control.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "fleet/all/firmware".into(),
            packet_id: Some(id),
            properties: PublishProperties::default(),
            payload: Bytes::from(payload),
        }));
    }
    let mut acked = 0;
    while acked < count {
        match control.recv(Duration::from_secs(30)) {
            Some(Packet::PubAck(a)) if !a.reason_code.is_error() => acked += 1,
            other => panic!("after {acked} PUBACKs: {other:?}"),
        }
    }
    converged(&running(&nodes));
    // The robot comes back on the third node and gets every message, in order.
    let (mut robot, ack) = RawClient::connect(nodes[2].mqtt_addr(), v3, "robot", false, 60);
    assert!(ack.session_present);
    let got =
        flockmq_tests::mqtt::receive_acked(&mut robot, count as usize, Duration::from_secs(60));
    let ids: Vec<u16> = got
        .iter()
        .map(|p| u16::from_be_bytes([p.payload[0], p.payload[1]]))
        .collect();
    assert_eq!(ids, (1..=count).collect::<Vec<_>>());
}
