//! Bridges (issue 24): a FlockMQ node bridged to a real Mosquitto and to another
//! FlockMQ, real processes over loopback: messages both ways with prefixes rewritten,
//! no loop with `both`, QoS 1 messages queued while the remote is down and across a
//! restart of the bridging node, and the bridge moving with the leader of a cluster.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker_node::mqtt::{Packet, ProtocolVersion, Publish, PublishProperties, QoS, ReasonCode};
use bytes::Bytes;
use flockmq_tests::mqtt::{opts, publish, receive_acked_until, subscribe, subscribe_with};
use flockmq_tests::{free_port, wait_for, wait_until, Node, RawClient};

const T: Duration = Duration::from_secs(20);

/// A Mosquitto broker on a free loopback port, killed (by its own pid) when dropped.
struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Mosquitto keeping its sessions in a file when `persistent` (saved on SIGTERM).
    fn start(persistent: bool) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let persistence = if persistent {
            // Run as root, Mosquitto would drop to a user that cannot write here.
            format!(
                "persistence true\npersistence_location {}/\nuser root\n",
                dir.path().display()
            )
        } else {
            "persistence false\n".to_owned()
        };
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}"),
        )
        .expect("write mosquitto.conf");
        let child = Self::spawn(&conf, port);
        Mosquitto {
            child,
            port,
            _dir: dir,
        }
    }

    fn spawn(conf: &Path, port: u16) -> Child {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        wait_until("mosquitto to listen", T, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        child
    }

    /// SIGTERM (Mosquitto saves its sessions) and wait for the exit.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Start it again on the same port and files.
    fn start_again(&mut self) {
        self.child = Self::spawn(&self._dir.path().join("mosquitto.conf"), self.port);
    }

    fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `[[bridges]]` table named `name` towards `port` speaking `protocol`, with quick
/// reconnections, and `topics` (TOML of its `[[bridges.topics]]`).
fn bridge_toml(name: &str, port: u16, protocol: &str, topics: &str) -> String {
    format!(
        "[[bridges]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\nprotocol = \"{protocol}\"\n\
         keep_alive = \"5s\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n{topics}"
    )
}

fn topic_toml(filter: &str, direction: &str, local_prefix: &str, remote_prefix: &str) -> String {
    format!(
        "[[bridges.topics]]\nfilter = \"{filter}\"\ndirection = \"{direction}\"\nqos = 1\n\
         local_prefix = \"{local_prefix}\"\nremote_prefix = \"{remote_prefix}\"\n"
    )
}

/// The bridge `name` as `node`'s admin API lists it.
fn bridge(node: &Node, name: &str) -> Result<serde_json::Value, String> {
    let v = node.api("GET", "/bridges", None)?;
    v["data"]
        .as_array()
        .and_then(|d| d.iter().find(|b| b["name"] == name).cloned())
        .ok_or_else(|| format!("no bridge {name} in {v}"))
}

fn wait_bridge(node: &Node, name: &str, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    wait_for(what, T, || match bridge(node, name) {
        Ok(b) if ok(&b) => Ok(()),
        other => Err(format!("{other:?}")),
    });
}

/// Publish at QoS 1 and wait for the PUBACK.
fn publish_acked(c: &mut RawClient, topic: &str, payload: &str, id: u16) {
    c.send(&publish(topic, payload, QoS::AtLeastOnce, false, id));
    wait_for(&format!("PUBACK of {topic}"), T, || match c.recv(T) {
        Some(Packet::PubAck(a)) if a.packet_id == id => Ok(()),
        other => Err(format!("{other:?}")),
    });
}

/// Receive PUBLISHes (acknowledging them) until one on `last` arrives; all of them.
fn receive_until(c: &mut RawClient, last: &str) -> Vec<Publish> {
    receive_acked_until(c, T, &format!("a message on {last}"), |got| {
        got.last().is_some_and(|p| p.topic == last)
    })
}

/// Once the bridge drained its queue: a persistent subscriber of `remote`, subscribed
/// before, finds every one of the 20 messages m0..m19 under `site-3/fleet/`.
fn assert_the_twenty_arrived(remote: std::net::SocketAddr) {
    let (mut sub, ack) =
        RawClient::connect(remote, ProtocolVersion::V3_1_1, "cloud-sub", false, 60);
    assert!(ack.session_present);
    let got = receive_until(&mut sub, "site-3/fleet/m19");
    for i in 0..20 {
        assert!(
            count(&got, &format!("site-3/fleet/m{i}"), &format!("m{i}")) >= 1,
            "m{i} lost: {:?}",
            got.iter().map(|p| &p.topic).collect::<Vec<_>>()
        );
    }
}

fn count(got: &[Publish], topic: &str, payload: &str) -> usize {
    got.iter()
        .filter(|p| p.topic == topic && p.payload == payload.as_bytes())
        .count()
}

/// Publish `probe` on `publisher` until `subscriber` receives it: the bridge's
/// subscriptions on the far side are in place.
fn probe_until_received(
    publisher: &mut RawClient,
    subscriber: &mut RawClient,
    sent: &str,
    seen: &str,
) {
    wait_for(&format!("{sent} to arrive as {seen}"), T, || {
        publisher.send(&publish(sent, "probe", QoS::AtMostOnce, false, 0));
        match flockmq_tests::mqtt::next_publish(subscriber, Duration::from_millis(300)) {
            Some(p) if p.topic == seen => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

#[test]
fn a_bridge_to_mosquitto_carries_messages_both_ways_with_prefixes_and_no_loop() {
    let mosquitto = Mosquitto::start(false);
    let topics = [
        "notifications = true\n".to_owned(),
        topic_toml("fleet/#", "out", "", "site-3/"),
        topic_toml("cmd/#", "in", "", "cloud/site-3/"),
        topic_toml("sync/#", "both", "", "site-3/"),
    ]
    .concat();
    let edge = Node::start_with_config(&bridge_toml("mosq", mosquitto.port, "3.1.1", &topics));
    wait_bridge(&edge, "mosq", "the bridge to connect", |b| {
        b["connected"] == true
    });
    edge.wait_subscribed("$bridge/mosq", "sync/#");

    let (mut local_sub, _) =
        RawClient::connect(edge.mqtt_addr(), ProtocolVersion::V5, "local-sub", true, 60);
    subscribe(&mut local_sub, "#", QoS::AtLeastOnce);
    let (mut local_pub, _) =
        RawClient::connect(edge.mqtt_addr(), ProtocolVersion::V5, "local-pub", true, 60);
    let (mut remote_sub, _) = RawClient::connect(
        mosquitto.addr(),
        ProtocolVersion::V5,
        "remote-sub",
        true,
        60,
    );
    subscribe(&mut remote_sub, "site-3/#", QoS::AtLeastOnce);
    let (mut remote_pub, _) = RawClient::connect(
        mosquitto.addr(),
        ProtocolVersion::V5,
        "remote-pub",
        true,
        60,
    );
    probe_until_received(
        &mut remote_pub,
        &mut local_sub,
        "cloud/site-3/cmd/probe",
        "cmd/probe",
    );

    // Out, and both ways from this side.
    publish_acked(&mut local_pub, "fleet/truck/1", "f1", 1);
    publish_acked(&mut local_pub, "sync/a", "s1", 2);
    // In, and both ways from the remote side.
    publish_acked(&mut remote_pub, "cloud/site-3/cmd/reboot", "c1", 1);
    publish_acked(&mut remote_pub, "site-3/sync/b", "s2", 2);
    // Sentinels behind them on each path: anything looping would arrive before.
    publish_acked(&mut local_pub, "fleet/end", "end", 3);
    publish_acked(&mut remote_pub, "cloud/site-3/cmd/end", "end", 3);

    let remote_got = receive_until(&mut remote_sub, "site-3/fleet/end");
    assert_eq!(
        count(&remote_got, "site-3/fleet/truck/1", "f1"),
        1,
        "{remote_got:?}"
    );
    assert_eq!(
        count(&remote_got, "site-3/sync/a", "s1"),
        1,
        "{remote_got:?}"
    );
    assert_eq!(
        count(&remote_got, "site-3/sync/b", "s2"),
        1,
        "sent back out: {remote_got:?}"
    );
    let local_got = receive_until(&mut local_sub, "cmd/end");
    assert_eq!(count(&local_got, "cmd/reboot", "c1"), 1, "{local_got:?}");
    assert_eq!(count(&local_got, "sync/b", "s2"), 1, "{local_got:?}");
    assert_eq!(
        count(&local_got, "sync/a", "s1"),
        1,
        "echoed back in: {local_got:?}"
    );
    assert!(
        local_got.iter().all(|p| !p.topic.starts_with("site-3/")),
        "{local_got:?}"
    );

    // Notifications: the bridge's state, retained, on both sides.
    let state = "$SYS/broker/connection/flockmq-bridge-mosq/state";
    for addr in [edge.mqtt_addr(), mosquitto.addr()] {
        let (mut c, _) = RawClient::connect(addr, ProtocolVersion::V5, "state-watch", true, 60);
        subscribe(&mut c, state, QoS::AtLeastOnce);
        let got = receive_until(&mut c, state);
        assert_eq!(got[0].payload, "1", "{got:?}");
        assert!(got[0].retain);
    }

    let b = bridge(&edge, "mosq").expect("bridge listed");
    assert!(b["messages_out"].as_u64() >= Some(3), "{b}");
    assert!(b["messages_in"].as_u64() >= Some(3), "{b}");
    let metrics = edge.metrics();
    assert!(
        metrics.contains("flockmq_bridge_connected{bridge=\"mosq\"} 1"),
        "{metrics}"
    );
    let url = format!("http://127.0.0.1:{}", edge.http_port);
    let bin = flockmq_tests::broker_binary();
    let listed = flockmq_tests::run(
        bin.to_str().expect("utf-8 path"),
        &["ctl", "--url", &url, "bridges"],
        T,
    );
    assert_eq!(listed.code, Some(0), "{listed:?}");
    let row = listed
        .stdout
        .lines()
        .find(|l| l.starts_with("mosq "))
        .unwrap_or_else(|| panic!("no row for the bridge: {listed:?}"));
    assert!(
        row.contains(&format!("127.0.0.1:{}", mosquitto.port)),
        "{row}"
    );
    assert!(row.contains("true"), "{row}");
}

#[test]
fn a_bridge_to_flockmq_v5_keeps_properties_qos2_and_no_loop_and_queues_qos1_through_an_outage_and_a_restart(
) {
    let mut cloud = Node::start();
    let topics = [
        topic_toml("fleet/#", "out", "", "site-3/").replace("qos = 1", "qos = 2"),
        topic_toml("cmd/#", "both", "", "cloud/"),
    ]
    .concat();
    let mut edge = Node::start_with_config(&bridge_toml("cloud", cloud.mqtt_port, "5", &topics));
    wait_bridge(&edge, "cloud", "the bridge to connect", |b| {
        b["connected"] == true
    });
    edge.wait_subscribed("$bridge/cloud", "fleet/#");
    cloud.wait_subscribed("flockmq-bridge-cloud", "cloud/cmd/#");

    // v5 properties and the retain flag cross over.
    let (mut live, _) = RawClient::connect(
        cloud.mqtt_addr(),
        ProtocolVersion::V5,
        "cloud-live",
        true,
        60,
    );
    let mut o = opts(QoS::ExactlyOnce);
    o.retain_as_published = true;
    subscribe_with(&mut live, "site-3/#", o, 1);
    let (mut local_pub, _) =
        RawClient::connect(edge.mqtt_addr(), ProtocolVersion::V5, "edge-pub", true, 60);
    local_pub.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: "fleet/status".into(),
        packet_id: Some(1),
        properties: PublishProperties {
            content_type: Some("text/plain".into()),
            user_properties: vec![("site".into(), "3".into())],
            ..PublishProperties::default()
        },
        payload: Bytes::from_static(b"up"),
    }));
    let got = receive_until(&mut live, "site-3/fleet/status");
    let p = got.last().expect("a message");
    assert!(p.retain, "{p:?}");
    assert_eq!(p.properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        p.properties.user_properties,
        vec![("site".to_owned(), "3".to_owned())]
    );

    // QoS 2 out: the remote's PUBCOMP releases the local PUBREC; both ways on a v5
    // remote: no-local there, so nothing comes back.
    local_pub.send(&publish("fleet/q2", "two", QoS::ExactlyOnce, false, 2));
    wait_for("PUBREC of the QoS 2 publish", T, || {
        match local_pub.recv(T) {
            Some(Packet::PubRec(r)) if r.packet_id == 2 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    local_pub.send(&Packet::PubRel(broker_node::mqtt::PubRel::new(
        2,
        ReasonCode::Success,
    )));
    let (mut local_sub, _) =
        RawClient::connect(edge.mqtt_addr(), ProtocolVersion::V5, "edge-sub", true, 60);
    subscribe(&mut local_sub, "cmd/#", QoS::AtLeastOnce);
    let (mut cloud_pub, _) = RawClient::connect(
        cloud.mqtt_addr(),
        ProtocolVersion::V5,
        "cloud-pub",
        true,
        60,
    );
    let mut o = opts(QoS::AtLeastOnce);
    o.no_local = true;
    subscribe_with(&mut cloud_pub, "cloud/cmd/#", o, 1);
    publish_acked(&mut local_pub, "fleet/end", "end", 4);
    let got = receive_until(&mut live, "site-3/fleet/end");
    let q2 = got
        .iter()
        .find(|p| p.topic == "site-3/fleet/q2")
        .expect("the QoS 2 message");
    assert_eq!(q2.qos, QoS::ExactlyOnce);
    publish_acked(&mut cloud_pub, "cloud/cmd/stop", "from-cloud", 3);
    let edge_got = receive_until(&mut local_sub, "cmd/stop");
    assert_eq!(
        count(&edge_got, "cmd/stop", "from-cloud"),
        1,
        "{edge_got:?}"
    );
    // The cloud sees the edge's cmd/start once and never its own cmd/stop back.
    publish_acked(&mut local_pub, "cmd/start", "from-edge", 5);
    publish_acked(&mut local_pub, "cmd/end", "end", 6);
    let cloud_got = receive_until(&mut cloud_pub, "cloud/cmd/end");
    assert_eq!(
        count(&cloud_got, "cloud/cmd/start", "from-edge"),
        1,
        "{cloud_got:?}"
    );
    assert_eq!(
        count(&cloud_got, "cloud/cmd/stop", "from-cloud"),
        0,
        "{cloud_got:?}"
    );
    drop(live);

    // A persistent subscriber on the cloud, away while the messages travel.
    let (mut sub, _) = RawClient::connect(
        cloud.mqtt_addr(),
        ProtocolVersion::V3_1_1,
        "cloud-sub",
        false,
        60,
    );
    subscribe(&mut sub, "site-3/fleet/+", QoS::AtLeastOnce);
    drop(sub);
    cloud.wait_connected("cloud-sub", false);

    cloud.kill();
    wait_bridge(&edge, "cloud", "the bridge to see the remote gone", |b| {
        b["connected"] == false
    });
    for i in 0..20u16 {
        publish_acked(
            &mut local_pub,
            &format!("fleet/m{i}"),
            &format!("m{i}"),
            10 + i,
        );
    }
    wait_bridge(&edge, "cloud", "20 messages queued", |b| b["queued"] == 20);
    drop(local_pub);
    // The queue is in the replicated state: a kill -9 of the bridging node keeps it.
    edge.restart();
    wait_bridge(&edge, "cloud", "20 messages still queued", |b| {
        b["queued"] == 20
    });

    cloud.restart();
    wait_bridge(&edge, "cloud", "the queue to drain", |b| {
        b["connected"] == true && b["queued"] == 0
    });
    assert_the_twenty_arrived(cloud.mqtt_addr());
}

#[test]
fn in_a_cluster_the_bridge_runs_on_the_leader_and_moves_when_it_is_killed() {
    let cloud = Node::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        bridge_toml(
            "cloud",
            cloud.mqtt_port,
            "5",
            &topic_toml("fleet/#", "out", "", "site-3/"),
        ),
    )
    .expect("write config");
    let path = config.to_str().expect("utf-8 path");
    let mut edge = Node::cluster_with_env(3, &[("FLOCKMQ_CONFIG", path)]);
    let (mut sub, _) = RawClient::connect(
        cloud.mqtt_addr(),
        ProtocolVersion::V3_1_1,
        "cloud-sub",
        false,
        60,
    );
    subscribe(&mut sub, "site-3/fleet/+", QoS::AtLeastOnce);

    let runner = |nodes: &[Node]| -> Result<usize, String> {
        let running: Vec<usize> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                bridge(n, "cloud").is_ok_and(|b| b["running"] == true && b["connected"] == true)
            })
            .map(|(i, _)| i)
            .collect();
        match running.as_slice() {
            [one] => Ok(*one),
            other => Err(format!("running on {other:?}")),
        }
    };
    let first = wait_for("the bridge to run on one node", T, || runner(&edge));
    let leader = edge[first].status()["leader"].as_u64();
    assert_eq!(
        leader,
        Some(first as u64 + 1),
        "the bridge runs on the leader"
    );

    let other = (first + 1) % 3;
    let (mut p, _) = RawClient::connect(
        edge[other].mqtt_addr(),
        ProtocolVersion::V5,
        "edge-pub",
        true,
        60,
    );
    publish_acked(&mut p, "fleet/before", "b", 1);
    receive_until(&mut sub, "site-3/fleet/before");

    edge[first].kill();
    let started = Instant::now();
    let alive: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    wait_for("the bridge to move to a surviving node", T, || {
        let up: Vec<usize> = alive
            .iter()
            .copied()
            .filter(|i| {
                bridge(&edge[*i], "cloud")
                    .is_ok_and(|b| b["running"] == true && b["connected"] == true)
            })
            .collect();
        match up.as_slice() {
            [_] => Ok(()),
            other => Err(format!("running on {other:?}")),
        }
    });
    eprintln!("bridge moved in {:?}", started.elapsed());
    let (mut p, _) = RawClient::connect(
        edge[other].mqtt_addr(),
        ProtocolVersion::V5,
        "edge-pub",
        true,
        60,
    );
    publish_acked(&mut p, "fleet/after", "a", 1);
    receive_until(&mut sub, "site-3/fleet/after");
}

#[test]
fn a_bridge_over_tls_verifies_the_remote_by_name_and_presents_a_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    flockmq_tests::pki::make_pki(dir.path());
    let p = |name: &str| dir.path().join(name).display().to_string();
    let tls_port = free_port();
    // The remote requires a client certificate and takes its name as the username.
    let cloud = Node::start_with_config(&format!(
        "tls_addr = \"127.0.0.1:{tls_port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
         tls_ca_file = \"{}\"\ntls_require_client_cert = true\ntls_identity_as_username = \"cn\"\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    ));
    let tls = format!(
        "tls = true\ntls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
         tls_server_name = \"localhost\"\n",
        p("ca.pem"),
        p("client.pem"),
        p("client.key")
    );
    // A second bridge expects another name on the remote's certificate.
    let wrong = tls.replace("\"localhost\"", "\"elsewhere.example\"");
    let edge = Node::start_with_config(&format!(
        "{}{}",
        bridge_toml(
            "secure",
            tls_port,
            "5",
            &format!("{tls}{}", topic_toml("fleet/#", "out", "", "site-3/")),
        ),
        bridge_toml(
            "wrong",
            tls_port,
            "5",
            &format!("{wrong}{}", topic_toml("other/#", "out", "", "")),
        )
    ));
    wait_bridge(&edge, "secure", "the bridge to connect over TLS", |b| {
        b["connected"] == true
    });
    cloud.wait_connected("flockmq-bridge-secure", true);
    wait_bridge(
        &edge,
        "wrong",
        "the other bridge to refuse the certificate",
        |b| b["connected"] == false && b["reconnects"].as_u64() >= Some(1),
    );
    let refused = bridge(&edge, "wrong").expect("listed");
    assert!(
        refused["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("certificate")),
        "{refused}"
    );

    let (mut sub, _) = RawClient::connect(
        cloud.mqtt_addr(),
        ProtocolVersion::V5,
        "cloud-sub",
        true,
        60,
    );
    subscribe(&mut sub, "site-3/#", QoS::AtLeastOnce);
    edge.wait_subscribed("$bridge/secure", "fleet/#");
    let (mut publisher, _) =
        RawClient::connect(edge.mqtt_addr(), ProtocolVersion::V5, "edge-pub", true, 60);
    publish_acked(&mut publisher, "fleet/x", "over tls", 1);
    let got = receive_until(&mut sub, "site-3/fleet/x");
    assert_eq!(count(&got, "site-3/fleet/x", "over tls"), 1);
}

#[test]
fn qos1_messages_for_a_stopped_mosquitto_queue_and_arrive_when_it_is_back() {
    let mut mosquitto = Mosquitto::start(true);
    let edge = Node::start_with_config(&bridge_toml(
        "mosq5",
        mosquitto.port,
        "5",
        &format!(
            "notifications = true\nnotification_topic = \"bridges/mosq5\"\n{}",
            topic_toml("fleet/#", "out", "", "site-3/")
        ),
    ));
    wait_bridge(&edge, "mosq5", "the bridge to connect", |b| {
        b["connected"] == true
    });
    edge.wait_subscribed("$bridge/mosq5", "fleet/#");
    // A persistent subscriber; Mosquitto saves its session when stopped.
    let (mut sub, _) = RawClient::connect(
        mosquitto.addr(),
        ProtocolVersion::V3_1_1,
        "cloud-sub",
        false,
        60,
    );
    subscribe(&mut sub, "site-3/fleet/+", QoS::AtLeastOnce);
    let (mut local_pub, _) =
        RawClient::connect(edge.mqtt_addr(), ProtocolVersion::V5, "edge-pub", true, 60);
    publish_acked(&mut local_pub, "fleet/first", "first", 1);
    receive_until(&mut sub, "site-3/fleet/first");

    mosquitto.stop();
    drop(sub);
    wait_bridge(&edge, "mosq5", "the bridge to see Mosquitto gone", |b| {
        b["connected"] == false
    });
    let (mut watch, _) = RawClient::connect(
        edge.mqtt_addr(),
        ProtocolVersion::V5,
        "state-watch",
        true,
        60,
    );
    subscribe(&mut watch, "bridges/mosq5", QoS::AtLeastOnce);
    let got = receive_until(&mut watch, "bridges/mosq5");
    assert_eq!(got[0].payload, "0", "{got:?}");
    for i in 0..20u16 {
        publish_acked(
            &mut local_pub,
            &format!("fleet/m{i}"),
            &format!("m{i}"),
            10 + i,
        );
    }
    wait_bridge(&edge, "mosq5", "20 messages queued", |b| b["queued"] == 20);

    mosquitto.start_again();
    wait_bridge(&edge, "mosq5", "the queue to drain", |b| {
        b["connected"] == true && b["queued"] == 0
    });
    assert_the_twenty_arrived(mosquitto.addr());
}

#[test]
fn a_topic_removed_from_the_configuration_is_unsubscribed_at_the_next_start() {
    let cloud = Node::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("edge.toml");
    let write = |topics: &[&str]| {
        let topics: String = topics
            .iter()
            .map(|t| topic_toml(t, "out", "", "site-3/"))
            .collect();
        std::fs::write(&config, bridge_toml("cloud", cloud.mqtt_port, "5", &topics))
            .expect("write config");
    };
    write(&["a/#", "b/#"]);
    let mut edge = Node::start_with(&["--config", config.to_str().expect("utf-8 path")]);
    edge.wait_subscribed("$bridge/cloud", "b/#");
    write(&["a/#"]);
    edge.restart();
    let path = format!(
        "/subscriptions?clientid={}",
        flockmq_tests::url_encode("$bridge/cloud")
    );
    wait_for("b/# to be unsubscribed", T, || {
        let v = edge.api("GET", &path, None)?;
        let topics: Vec<&str> = v["data"]
            .as_array()
            .map(|d| d.iter().filter_map(|s| s["topic"].as_str()).collect())
            .unwrap_or_default();
        if topics == ["a/#"] {
            Ok(())
        } else {
            Err(format!("{topics:?}"))
        }
    });
}

/// Receive on `c` (acknowledging as a client does) until `n` distinct messages whose
/// topic starts with `prefix` arrived, then for `settle` more to catch late copies;
/// every one of them, copies included.
fn collect(c: &mut RawClient, prefix: &str, n: usize, settle: Duration) -> Vec<Publish> {
    let distinct = |got: &[Publish]| {
        got.iter()
            .filter(|p| p.topic.starts_with(prefix))
            .map(|p| p.topic.clone())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let mut got = receive_acked_until(
        c,
        Duration::from_secs(90),
        &format!("{n} on {prefix}"),
        |got| distinct(got) >= n,
    );
    let until = Instant::now() + settle;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match c.recv(left) {
            Some(Packet::Publish(p)) => {
                if let Some(id) = p.packet_id {
                    c.send(&Packet::PubRec(broker_node::mqtt::PubRec::new(
                        id,
                        ReasonCode::Success,
                    )));
                }
                got.push(p);
            }
            Some(Packet::PubRel(r)) => c.send(&Packet::PubComp(broker_node::mqtt::PubComp::new(
                r.packet_id,
                ReasonCode::Success,
            ))),
            Some(_) => {}
            None => break,
        }
    }
    got.retain(|p| p.topic.starts_with(prefix));
    got
}

/// Publish `n` QoS 2 messages `{prefix}{i}` one after the other, each through its
/// whole flow (PUBREC, PUBREL, PUBCOMP).
fn publish_qos2(c: &mut RawClient, prefix: &str, n: u16) {
    for i in 0..n {
        let id = i + 1;
        c.send(&publish(
            &format!("{prefix}{i}"),
            &i.to_string(),
            QoS::ExactlyOnce,
            false,
            id,
        ));
        wait_for(
            &format!("PUBREC of {prefix}{i}"),
            Duration::from_secs(60),
            || match c.recv(T) {
                Some(Packet::PubRec(r)) if r.packet_id == id => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        c.send(&Packet::PubRel(broker_node::mqtt::PubRel::new(
            id,
            ReasonCode::Success,
        )));
        wait_for(&format!("PUBCOMP of {prefix}{i}"), T, || match c.recv(T) {
            Some(Packet::PubComp(r)) if r.packet_id == id => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }
}

/// QoS 2 both ways between `edge` and a remote at `remote` (protocol `protocol`),
/// through a relay that cuts the bridge's connection every 50–300 ms while the
/// messages flow: each message arrives exactly once on the far side.
fn qos2_through_a_flaky_link(
    remote: std::net::SocketAddr,
    protocol: &str,
    remote_version: ProtocolVersion,
) {
    const N: u16 = 60;
    let relay = flockmq_tests::relay::Relay::start(remote);
    let topics = [
        topic_toml("out/#", "out", "", "").replace("qos = 1", "qos = 2"),
        topic_toml("in/#", "in", "", "").replace("qos = 1", "qos = 2"),
    ]
    .concat();
    let edge = Node::start_with_config(&bridge_toml(
        "flaky",
        relay.addr().port(),
        protocol,
        &topics,
    ));
    wait_bridge(&edge, "flaky", "the bridge to connect", |b| {
        b["connected"] == true
    });
    edge.wait_subscribed("$bridge/flaky", "out/#");

    // Far ends that do not go through the relay: a subscriber and a publisher on each
    // side.
    let (mut remote_sub, _) = RawClient::connect(remote, remote_version, "far-sub", true, 60);
    subscribe(&mut remote_sub, "out/#", QoS::ExactlyOnce);
    let (mut edge_sub, _) =
        RawClient::connect(edge.mqtt_addr(), ProtocolVersion::V5, "edge-sub", true, 60);
    subscribe(&mut edge_sub, "in/#", QoS::ExactlyOnce);
    let (mut remote_pub, _) = RawClient::connect(remote, remote_version, "far-pub", true, 60);
    let (mut edge_pub, _) =
        RawClient::connect(edge.mqtt_addr(), ProtocolVersion::V5, "edge-pub", true, 60);
    probe_until_received(&mut remote_pub, &mut edge_sub, "in/probe", "in/probe");
    probe_until_received(&mut edge_pub, &mut remote_sub, "out/probe", "out/probe");

    let cutting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let cutter = {
        let cutting = cutting.clone();
        std::thread::spawn(move || {
            let mut rng = flockmq_tests::Rng(24);
            while cutting.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(rng.range(50, 300)));
                relay.cut();
            }
            relay.cuts()
        })
    };
    let ins = std::thread::spawn(move || {
        publish_qos2(&mut remote_pub, "in/m", N);
        collect(&mut edge_sub, "in/m", N.into(), Duration::from_secs(2))
    });
    publish_qos2(&mut edge_pub, "out/m", N);
    let outs = collect(&mut remote_sub, "out/m", N.into(), Duration::from_secs(2));
    let ins = ins.join().expect("the incoming side");
    cutting.store(false, std::sync::atomic::Ordering::Relaxed);
    let cuts = cutter.join().expect("the cutter");

    for (side, got, prefix) in [("remote", &outs, "out/m"), ("edge", &ins, "in/m")] {
        for i in 0..N {
            let topic = format!("{prefix}{i}");
            assert_eq!(
                count(got, &topic, &i.to_string()),
                1,
                "{topic} on the {side} side: {:?}",
                got.iter().map(|p| &p.topic).collect::<Vec<_>>()
            );
        }
        assert!(got.iter().all(|p| p.qos == QoS::ExactlyOnce), "{got:?}");
    }
    let b = bridge(&edge, "flaky").expect("listed");
    let reconnects = b["reconnects"].as_u64().unwrap_or(0);
    eprintln!("{protocol}: {cuts} cuts, {reconnects} reconnections, {N} QoS 2 messages each way");
    assert!(reconnects >= 3, "the link was hardly cut: {b}");
}

#[test]
fn qos2_crosses_a_link_cut_again_and_again_exactly_once_both_ways_with_mosquitto() {
    let mosquitto = Mosquitto::start(false);
    qos2_through_a_flaky_link(mosquitto.addr(), "3.1.1", ProtocolVersion::V3_1_1);
}

#[test]
fn qos2_crosses_a_link_cut_again_and_again_exactly_once_both_ways_with_flockmq_v5() {
    let cloud = Node::start();
    qos2_through_a_flaky_link(cloud.mqtt_addr(), "5", ProtocolVersion::V5);
}

/// An s_server from openssl that refuses (fatal unrecognized_name alert) a TLS client
/// whose SNI is not `name`. It is no MQTT broker: it sends what its standard input
/// holds, here one v5 CONNACK (success) for the first client it accepts. Stopped when
/// dropped.
struct SniServer {
    child: Child,
    port: u16,
}

impl SniServer {
    fn start(dir: &Path, name: &str) -> SniServer {
        use std::io::Write;
        let port = free_port();
        let p = |f: &str| dir.join(f).display().to_string();
        let (cert, key) = (p("server.pem"), p("server.key"));
        let mut child = Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &port.to_string(),
                "-cert",
                &cert,
                "-key",
                &key,
            ])
            .args([
                "-cert2",
                &cert,
                "-key2",
                &key,
                "-servername",
                name,
                "-servername_fatal",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        // CONNACK: type 2, remaining length 3, no session present, success, no
        // properties. s_server stops at the end of its input: the pipe stays open.
        child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(&[0x20, 0x03, 0x00, 0x00, 0x00])
            .expect("write to s_server");
        // No probe of the port: s_server would take it for its client. The bridge
        // retries until it listens.
        SniServer { child, port }
    }
}

impl Drop for SniServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_tls_bridge_sends_its_configured_server_name_as_sni() {
    let dir = tempfile::tempdir().expect("temp dir");
    flockmq_tests::pki::make_pki(dir.path());
    // Both servers answer only to SNI "localhost"; the address is an IP either way.
    let wants_localhost = SniServer::start(dir.path(), "localhost");
    let refuses = SniServer::start(dir.path(), "localhost");
    let tls = |name: &str| {
        format!(
            "tls = true\ntls_ca_file = \"{}\"\ntls_server_name = \"{name}\"\n",
            dir.path().join("ca.pem").display()
        )
    };
    let edge = Node::start_with_config(&format!(
        "{}{}",
        bridge_toml(
            "named",
            wants_localhost.port,
            "5",
            &format!("{}{}", tls("localhost"), topic_toml("a/#", "out", "", "")),
        ),
        bridge_toml(
            "misnamed",
            refuses.port,
            "5",
            &format!(
                "{}{}",
                tls("elsewhere.example"),
                topic_toml("b/#", "out", "", "")
            ),
        ),
    ));
    // The first server took the handshake under the configured name (its certificate
    // verified against that name too) and the bridge its CONNACK.
    wait_bridge(&edge, "named", "the named bridge to connect", |b| {
        b["connected"] == true
    });
    // The second refused the name before any certificate was sent.
    wait_bridge(
        &edge,
        "misnamed",
        "the misnamed bridge to be refused by name",
        |b| {
            b["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("UnrecognisedName"))
        },
    );
    assert_eq!(
        bridge(&edge, "misnamed").expect("listed")["connected"],
        false
    );
}
