//! MQTT over TLS with real clients: certificates made by `openssl`, `mosquitto_pub`
//! and `mosquitto_sub` verifying the server, client certificates required, and bytes
//! that are not TLS.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use flockmq_tests::{free_port, run, Background, Node};

const T: Duration = Duration::from_secs(15);

fn openssl(dir: &Path, args: &[&str]) {
    let r = run("openssl", args, T);
    assert_eq!(
        r.code,
        Some(0),
        "openssl {args:?} in {}: {r:?}",
        dir.display()
    );
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and a client certificate.
fn make_pki(dir: &Path) {
    let p = |name: &str| dir.join(name).to_str().expect("utf-8").to_owned();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=FlockMQ test CA",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.pem"),
        ],
    );
    for (name, cn) in [("server", "127.0.0.1"), ("client", "robot-7")] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &p(&format!("{name}.key")),
                "-out",
                &p(&format!("{name}.csr")),
            ],
        );
        let ext = dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            if name == "server" {
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
            } else {
                "extendedKeyUsage=clientAuth\n"
            },
        )
        .expect("ext file");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &p(&format!("{name}.csr")),
                "-CA",
                &p("ca.pem"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext.to_str().expect("utf-8"),
                "-out",
                &p(&format!("{name}.pem")),
            ],
        );
    }
}

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
            "-t",
            "fleet/#",
            "-C",
            "1",
            "-v",
            "-W",
            "10",
        ],
    );
    std::thread::sleep(Duration::from_millis(700));
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
