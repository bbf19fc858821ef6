//! MQTT over WebSocket and secure WebSocket with a real client (Python paho-mqtt's
//! websockets transport), mixed with plain TCP clients on the same node.

use std::time::Duration;

use flockmq_tests::{free_port, repo_root, run, Background, Node};

const T: Duration = Duration::from_secs(20);

fn paho_ws(args: &[&str]) -> flockmq_tests::Ran {
    let script = repo_root().join("tests/python/ws_roundtrip.py");
    let mut all = vec![script.to_str().expect("utf-8")];
    all.extend_from_slice(args);
    run("python3", &all, T)
}

#[test]
fn websocket_clients_and_tcp_clients_see_each_other() {
    let ws_port = free_port();
    let node = Node::start_with(&["--ws-addr", &format!("127.0.0.1:{ws_port}")]);
    // A TCP subscriber sees what the WebSocket client publishes.
    let tcp_sub = Background::spawn(
        "mosquitto_sub",
        &[
            "-p",
            &node.mqtt_port.to_string(),
            "-i",
            "tcp-dashboard",
            "-t",
            "dashboard/#",
            "-C",
            "1",
            "-v",
            "-W",
            "15",
        ],
    );
    node.wait_subscribed("tcp-dashboard", "dashboard/#");
    let ws = paho_ws(&[&ws_port.to_string()]);
    assert_eq!(ws.code, Some(0), "{ws:?}");
    assert_eq!(ws.stdout.trim(), "received dashboard/zone1/temp 21.5");
    let tcp = tcp_sub.finish(T);
    assert_eq!(tcp.stdout.trim(), "dashboard/zone1/temp 21.5", "{tcp:?}");
    // Another path is refused; the listener goes on.
    let wrong = paho_ws(&[&ws_port.to_string(), "--path", "/not-mqtt"]);
    assert_ne!(wrong.code, Some(0), "{wrong:?}");
    let again = paho_ws(&[&ws_port.to_string(), "--path", "/"]);
    assert_eq!(again.code, Some(0), "{again:?}");
}

#[test]
fn secure_websocket_clients_verify_the_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = |name: &str| dir.path().join(name).display().to_string();
    flockmq_tests::pki::make_pki(dir.path());
    let wss_port = free_port();
    let _node = Node::start_with_config(&format!(
        "wss_addr = \"127.0.0.1:{wss_port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        p("server.pem"),
        p("server.key")
    ));
    let ws = paho_ws(&[&wss_port.to_string(), "--tls", &p("ca.pem")]);
    assert_eq!(ws.code, Some(0), "{ws:?}");
    assert_eq!(ws.stdout.trim(), "received dashboard/zone1/temp 21.5");
}

#[test]
fn anonymous_access_can_be_allowed_on_the_websocket_listener_only() {
    // Browser dashboards read anonymously over WebSocket; devices on TCP must log in.
    let dir = tempfile::tempdir().expect("temp dir");
    let passwords = dir.path().join("passwd");
    let made = run(
        flockmq_tests::broker_binary().to_str().expect("utf-8"),
        &[
            "passwd",
            passwords.to_str().expect("utf-8"),
            "robot-7",
            "--password",
            "s3cret",
        ],
        T,
    );
    assert_eq!(made.code, Some(0), "{made:?}");
    let ws_port = free_port();
    let node = Node::start_with_config(&format!(
        "ws_addr = \"127.0.0.1:{ws_port}\"\n[mqtt]\nallow_anonymous = [\"ws\"]\n\
         password_file = \"{}\"\n",
        passwords.display()
    ));
    let port = node.mqtt_port.to_string();
    let tcp_anonymous = run("mosquitto_pub", &["-p", &port, "-t", "t", "-m", "x"], T);
    assert_ne!(tcp_anonymous.code, Some(0), "{tcp_anonymous:?}");
    assert!(
        tcp_anonymous.stderr.contains("not authori"),
        "{tcp_anonymous:?}"
    );
    let tcp_user = run(
        "mosquitto_pub",
        &[
            "-p", &port, "-u", "robot-7", "-P", "s3cret", "-t", "t", "-m", "x",
        ],
        T,
    );
    assert_eq!(tcp_user.code, Some(0), "{tcp_user:?}");
    let ws = paho_ws(&[&ws_port.to_string()]);
    assert_eq!(ws.code, Some(0), "{ws:?}");
}

#[test]
fn a_client_certificate_can_be_required_on_one_tls_listener_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    flockmq_tests::pki::make_pki(dir.path());
    let p = |name: &str| dir.path().join(name).display().to_string();
    let (tls_port, wss_port) = (free_port(), free_port());
    let _node = Node::start_with_config(&format!(
        "tls_addr = \"127.0.0.1:{tls_port}\"\nwss_addr = \"127.0.0.1:{wss_port}\"\n\
         tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_ca_file = \"{}\"\n\
         tls_require_client_cert = [\"tls\"]\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    ));
    let tls = |extra: &[&str]| {
        let port = tls_port.to_string();
        let ca = p("ca.pem");
        let mut args = vec![
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            &ca,
            "-t",
            "t",
            "-m",
            "x",
        ];
        args.extend_from_slice(extra);
        run("mosquitto_pub", &args, T)
    };
    let without = tls(&[]);
    assert_ne!(
        without.code,
        Some(0),
        "required on the TLS listener: {without:?}"
    );
    let (cert, key) = (p("client.pem"), p("client.key"));
    let with = tls(&["--cert", &cert, "--key", &key]);
    assert_eq!(with.code, Some(0), "{with:?}");
    // The browser on secure WebSocket has no certificate, and needs none.
    let ws = paho_ws(&[&wss_port.to_string(), "--tls", &p("ca.pem")]);
    assert_eq!(ws.code, Some(0), "{ws:?}");
}
