//! MQTT over TLS with real clients: certificates made by `openssl`, `mosquitto_pub`
//! and `mosquitto_sub` verifying the server, client certificates required, and bytes
//! that are not TLS.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use flockmq_tests::pki::{issue, make_pki};
use flockmq_tests::{free_port, run, Background, Node};

const T: Duration = Duration::from_secs(15);

fn tls_node(dir: &Path, tls_port: u16, require_client_cert: bool) -> Node {
    let p = |name: &str| dir.join(name).display().to_string();
    let mut config = format!(
        "tls_addr = \"127.0.0.1:{tls_port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        p("server.pem"),
        p("server.key")
    );
    if require_client_cert {
        config.push_str(&format!(
            "tls_ca_file = \"{}\"\ntls_require_client_cert = true\n",
            p("ca.pem")
        ));
    }
    Node::start_with_config(&config)
}

#[test]
fn clients_verifying_the_server_talk_over_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    make_pki(dir.path());
    let port = free_port();
    let node = tls_node(dir.path(), port, false);
    let ca = dir.path().join("ca.pem");
    let ca = ca.to_str().expect("utf-8");
    let port = port.to_string();
    let sub = Background::spawn(
        "mosquitto_sub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            ca,
            "-i",
            "tls-dashboard",
            "-t",
            "fleet/#",
            "-C",
            "1",
            "-v",
            "-W",
            "10",
        ],
    );
    node.wait_subscribed("tls-dashboard", "fleet/#");
    let publish = run(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            ca,
            "-t",
            "fleet/r7/battery",
            "-m",
            "87",
            "-q",
            "1",
        ],
        T,
    );
    assert_eq!(publish.code, Some(0), "{publish:?}");
    let got = sub.finish(T);
    assert_eq!(got.stdout.trim(), "fleet/r7/battery 87", "{got:?}");

    // Plain MQTT and garbage on the TLS port fail alone; the node goes on.
    let plain = run(
        "mosquitto_pub",
        &["-h", "127.0.0.1", "-p", &port, "-t", "x", "-m", "y"],
        T,
    );
    assert_ne!(plain.code, Some(0), "{plain:?}");
    let mut junk = std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().expect("port")))
        .expect("connect");
    junk.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0])
        .expect("write");
    drop(junk);
    let again = run(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            ca,
            "-t",
            "x",
            "-m",
            "y",
        ],
        T,
    );
    assert_eq!(again.code, Some(0), "{again:?}");
    // Plain TCP still works beside it.
    let tcp = run(
        "mosquitto_pub",
        &["-p", &node.mqtt_port.to_string(), "-t", "x", "-m", "y"],
        T,
    );
    assert_eq!(tcp.code, Some(0), "{tcp:?}");
}

#[test]
fn a_required_client_certificate_is_checked() {
    let dir = tempfile::tempdir().expect("temp dir");
    make_pki(dir.path());
    let port = free_port();
    let _node = tls_node(dir.path(), port, true);
    let p = |name: &str| dir.path().join(name).display().to_string();
    let port = port.to_string();
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));
    let with_cert = run(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "-t",
            "x",
            "-m",
            "y",
            "-q",
            "1",
        ],
        T,
    );
    assert_eq!(with_cert.code, Some(0), "{with_cert:?}");
    let without = run(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            &ca,
            "-t",
            "x",
            "-m",
            "y",
            "-q",
            "1",
        ],
        T,
    );
    assert_ne!(without.code, Some(0), "{without:?}");
}

/// `mosquitto_pub` over TLS to `port`, trusting `ca`, with `extra` arguments.
/// A new CA and server certificate (the returned directory holds the CA) copied over
/// the server's files in `dir`, then SIGHUP to `node`.
fn replace_server_certificate(dir: &Path, node: &Node) -> tempfile::TempDir {
    let fresh = tempfile::tempdir().expect("temp dir");
    make_pki(fresh.path());
    for file in ["server.pem", "server.key"] {
        std::fs::copy(fresh.path().join(file), dir.join(file)).expect("copy");
    }
    let r = run("kill", &["-HUP", &node.pid().to_string()], T);
    assert_eq!(r.code, Some(0), "{r:?}");
    fresh
}

fn tls_pub(port: u16, ca: &str, extra: &[&str]) -> flockmq_tests::Ran {
    let port = port.to_string();
    let mut args = vec!["-h", "127.0.0.1", "-p", &port, "--cafile", ca, "-q", "1"];
    args.extend_from_slice(extra);
    run("mosquitto_pub", &args, T)
}

#[test]
fn a_client_certificate_stands_for_the_username() {
    let dir = tempfile::tempdir().expect("temp dir");
    make_pki(dir.path());
    issue(
        dir.path(),
        "arm",
        "ignored",
        "extendedKeyUsage=clientAuth\nsubjectAltName=DNS:arm-3.fleet.example\n",
    );
    let p = |name: &str| dir.path().join(name).display().to_string();
    // Anonymous access off and no password file: the certificate is the only way in,
    // and the ACL names the robot by its certificate's common name.
    std::fs::write(
        dir.path().join("acl"),
        "user robot-7\ntopic readwrite fleet/+/robot/robot-7/#\n\n\
         user arm-3.fleet.example\ntopic readwrite fleet/+/arm/#\n",
    )
    .expect("acl");
    let start = |mode: &str| {
        let port = free_port();
        let node = Node::start_with_config(&format!(
            "tls_addr = \"127.0.0.1:{port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
             tls_ca_file = \"{}\"\ntls_identity_as_username = \"{mode}\"\n\
             [mqtt]\nallow_anonymous = false\nacl_file = \"{}\"\n",
            p("server.pem"),
            p("server.key"),
            p("ca.pem"),
            p("acl")
        ));
        (node, port)
    };
    let ca = p("ca.pem");
    let (cert, key) = (p("client.pem"), p("client.key"));
    let (node, port) = start("cn");
    let robot = |topic: &str| {
        tls_pub(
            port,
            &ca,
            &[
                "--cert", &cert, "--key", &key, "-V", "mqttv5", "-t", topic, "-m", "x",
            ],
        )
    };
    let sub = Background::spawn(
        "mosquitto_sub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--cafile",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "-i",
            "tls-watcher",
            "-t",
            "fleet/+/robot/robot-7/#",
            "-C",
            "1",
            "-v",
            "-W",
            "10",
        ],
    );
    node.wait_subscribed("tls-watcher", "fleet/+/robot/robot-7/#");
    let own = robot("fleet/w1/robot/robot-7/pose");
    assert_eq!(own.code, Some(0), "{own:?}");
    let got = sub.finish(T);
    assert_eq!(
        got.stdout.trim(),
        "fleet/w1/robot/robot-7/pose x",
        "{got:?}"
    );
    // Another robot's topic is refused for this certificate (v5 PUBACK 0x87).
    let other = robot("fleet/w1/robot/robot-8/pose");
    assert!(other.stderr.contains("Not authorized"), "{other:?}");
    // No certificate, no entry, even with a username.
    let anonymous = tls_pub(
        port,
        &ca,
        &[
            "-u",
            "robot-7",
            "-t",
            "fleet/w1/robot/robot-7/pose",
            "-m",
            "x",
        ],
    );
    assert_ne!(anonymous.code, Some(0), "{anonymous:?}");

    // "san": the subject alternative name is the username.
    let (_node, port) = start("san");
    let (arm_cert, arm_key) = (p("arm.pem"), p("arm.key"));
    let arm = tls_pub(
        port,
        &ca,
        &[
            "--cert",
            &arm_cert,
            "--key",
            &arm_key,
            "-t",
            "fleet/w1/arm/pose",
            "-m",
            "x",
        ],
    );
    assert_eq!(arm.code, Some(0), "{arm:?}");
    // robot-7's certificate has no SAN: refused.
    let robot7 = tls_pub(
        port,
        &ca,
        &[
            "--cert",
            &cert,
            "--key",
            &key,
            "-t",
            "fleet/w1/robot/robot-7/pose",
            "-m",
            "x",
        ],
    );
    assert_ne!(robot7.code, Some(0), "{robot7:?}");
}

#[test]
fn sighup_reloads_the_certificates_and_keeps_connections() {
    let dir = tempfile::tempdir().expect("temp dir");
    make_pki(dir.path());
    let port = free_port();
    let node = tls_node(dir.path(), port, false);
    let old_ca = dir.path().join("old-ca.pem");
    std::fs::copy(dir.path().join("ca.pem"), &old_ca).expect("copy");
    let old_ca = old_ca.to_str().expect("utf-8").to_owned();
    let sub = Background::spawn(
        "mosquitto_sub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--cafile",
            &old_ca,
            "-i",
            "tls-site",
            "-t",
            "site/#",
            "-C",
            "2",
            "-v",
            "-W",
            "20",
        ],
    );
    node.wait_subscribed("tls-site", "site/#");
    let before = tls_pub(port, &old_ca, &["-t", "site/a", "-m", "before"]);
    assert_eq!(before.code, Some(0), "{before:?}");

    // A new CA and server certificate over the same files, then SIGHUP.
    let fresh = replace_server_certificate(dir.path(), &node);
    let deadline = std::time::Instant::now() + T;
    while !node
        .log()
        .contains("TLS certificate, key and CA files reloaded")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload: {}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let new_ca = fresh.path().join("ca.pem");
    let new_ca = new_ca.to_str().expect("utf-8");
    let refused = tls_pub(port, &old_ca, &["-t", "site/b", "-m", "old CA"]);
    assert_ne!(
        refused.code,
        Some(0),
        "the old certificate is gone: {refused:?}"
    );
    let after = tls_pub(port, new_ca, &["-t", "site/b", "-m", "after"]);
    assert_eq!(after.code, Some(0), "{after:?}");
    // The connection made before the reload is still up and got both.
    let got = sub.finish(T);
    assert_eq!(got.stdout, "site/a before\nsite/b after\n", "{got:?}");

    // A broken file keeps the certificate in force.
    std::fs::write(dir.path().join("server.pem"), "not a certificate").expect("write");
    let r = run("kill", &["-HUP", &node.pid().to_string()], T);
    assert_eq!(r.code, Some(0), "{r:?}");
    let deadline = std::time::Instant::now() + T;
    while !node.log().contains("TLS reload failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed reload: {}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let still = tls_pub(port, new_ca, &["-t", "site/c", "-m", "still"]);
    assert_eq!(still.code, Some(0), "{still:?}");
}

#[test]
fn a_client_that_stalls_in_the_tls_handshake_is_closed_on_time() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("temp dir");
    make_pki(dir.path());
    let port = free_port();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let _node = Node::start_with_config(&format!(
        "tls_addr = \"127.0.0.1:{port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
         [mqtt]\nconnect_timeout = \"1s\"\n",
        p("server.pem"),
        p("server.key")
    ));
    // The start of a ClientHello record that announces 512 bytes, then nothing.
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .expect("write");
    stalled
        .set_read_timeout(Some(Duration::from_secs(8)))
        .expect("timeout");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let closed = loop {
        match stalled.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue, // an alert, then the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    assert!(closed, "still open after {:?}", started.elapsed());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the timeout: {:?}",
        started.elapsed()
    );
}

#[test]
fn the_admin_api_serves_https_with_the_listener_certificate_reloaded_on_sighup_and_ctl_verifies_it()
{
    let dir = tempfile::tempdir().expect("temp dir");
    make_pki(dir.path());
    let p = |name: &str| dir.path().join(name).display().to_string();
    let node = Node::start_with_config(&format!(
        "http_tls = true\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\napi_token = \"t0k\"\n",
        p("server.pem"),
        p("server.key")
    ));
    let url = format!("https://127.0.0.1:{}", node.http_port);
    let old_ca = dir.path().join("old-ca.pem");
    std::fs::copy(dir.path().join("ca.pem"), &old_ca).expect("copy");
    let old_ca = old_ca.display().to_string();
    let curl = |ca: &str, path: &str| {
        run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                ca,
                &format!("{url}{path}"),
            ],
            T,
        )
    };
    let ready = curl(&old_ca, "/readyz");
    assert_eq!(ready.code, Some(0), "{ready:?}");
    assert!(ready.stdout.contains("ready"), "{ready:?}");
    let plain = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            &format!("http://127.0.0.1:{}/readyz", node.http_port),
        ],
        T,
    );
    assert!(
        plain.code != Some(0) || !plain.stdout.contains("ready"),
        "plain HTTP is not served: {plain:?}"
    );
    let broker = flockmq_tests::broker_binary();
    let broker = broker.to_str().expect("utf-8");
    let ctl = |extra: &[&str]| {
        let mut args = vec!["ctl", "--url", &url, "--token", "t0k"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["cluster", "status"]);
        run(broker, &args, T)
    };
    let status = ctl(&["--cacert", &old_ca]);
    assert_eq!(status.code, Some(0), "{status:?}");
    assert!(status.stdout.contains("leader"), "{status:?}");
    let unverified = ctl(&[]);
    assert_ne!(
        unverified.code,
        Some(0),
        "a certificate of an unknown CA is refused: {unverified:?}"
    );

    // A new CA and server certificate over the same files, then SIGHUP: new
    // handshakes get the new certificate.
    let fresh = replace_server_certificate(dir.path(), &node);
    let new_ca = fresh.path().join("ca.pem").display().to_string();
    flockmq_tests::wait_for("the new certificate served", T, || {
        let r = curl(&new_ca, "/readyz");
        if r.code == Some(0) {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_ne!(
        curl(&old_ca, "/readyz").code,
        Some(0),
        "the old certificate is gone"
    );
}
