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
            "-t",
            "dashboard/#",
            "-C",
            "1",
            "-v",
            "-W",
            "15",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
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
