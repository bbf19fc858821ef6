//! `broker-node import-mosquitto-conf FILE`: a `mosquitto.conf` read and written out
//! as the equivalent FlockMQ configuration (listeners, password and ACL files,
//! bridges), with every line it cannot carry over and why. Pure text in, text out: it
//! reads no file named inside the configuration.

use std::fmt::Write as _;

/// The FlockMQ configuration of a `mosquitto.conf` and what did not carry over.
#[derive(Debug)]
pub struct Imported {
    /// The configuration, TOML.
    pub toml: String,
    /// Each line not carried over: `line N: TEXT: why`.
    pub not_carried: Vec<String>,
}

#[derive(Default)]
struct Listener {
    port: String,
    bind: Option<String>,
    websockets: bool,
    tls: bool,
    line: usize,
}

#[derive(Default)]
struct Bridge {
    name: String,
    address: Option<String>,
    protocol: Option<&'static str>,
    client_id: Option<String>,
    username: Option<String>,
    password: Option<String>,
    local_username: Option<String>,
    keep_alive: Option<String>,
    clean_start: Option<bool>,
    notifications: Option<bool>,
    notification_topic: Option<String>,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    reconnect: Option<(String, String)>,
    topics: Vec<Topic>,
}

struct Topic {
    filter: String,
    direction: String,
    qos: u8,
    local_prefix: String,
    remote_prefix: String,
}

/// A TOML string literal.
fn s(v: &str) -> String {
    toml::Value::String(v.to_owned()).to_string()
}

/// A mosquitto token, `""` standing for the empty string.
fn token(t: &str) -> String {
    if t == "\"\"" {
        String::new()
    } else {
        t.to_owned()
    }
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Translate the text of a `mosquitto.conf`.
pub fn import(text: &str) -> Imported {
    let mut top: Vec<(String, String)> = Vec::new();
    let mut mqtt: Vec<(String, String)> = Vec::new();
    let mut listeners: Vec<Listener> = Vec::new();
    let mut bridges: Vec<Bridge> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let mut tls_files: Vec<(String, String)> = Vec::new();

    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut skip = |why: &str| skipped.push(format!("line {n}: {line}: {why}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        let (key, args) = (words[0], &words[1..]);
        let arg = args.first().copied().unwrap_or("");
        let rest = line[key.len()..].trim().to_owned();

        // Inside a bridge section, its keys belong to the bridge.
        if let Some(b) = bridges.last_mut() {
            let taken = match key {
                "address" | "addresses" => {
                    if args.len() > 1 {
                        skip("only the first address is kept: a FlockMQ bridge has one remote address");
                    }
                    let a = arg.to_owned();
                    b.address = Some(if a.contains(':') {
                        a
                    } else {
                        format!("{a}:1883")
                    });
                    true
                }
                "topic" => {
                    let filter = token(arg);
                    let direction = args.get(1).copied().unwrap_or("out").to_owned();
                    let qos = args.get(2).and_then(|q| q.parse().ok()).unwrap_or(0);
                    b.topics.push(Topic {
                        filter,
                        direction,
                        qos,
                        local_prefix: args.get(3).map_or_else(String::new, |t| token(t)),
                        remote_prefix: args.get(4).map_or_else(String::new, |t| token(t)),
                    });
                    true
                }
                "bridge_protocol_version" => {
                    b.protocol = match arg {
                        "mqttv50" => Some("5"),
                        "mqttv311" => Some("3.1.1"),
                        _ => {
                            skip("MQTT 3.1 bridges are not offered: 3.1.1 is used");
                            Some("3.1.1")
                        }
                    };
                    true
                }
                "bridge_cafile" => {
                    b.ca = Some(rest.clone());
                    true
                }
                "bridge_certfile" => {
                    b.cert = Some(rest.clone());
                    true
                }
                "bridge_keyfile" => {
                    b.key = Some(rest.clone());
                    true
                }
                "remote_username" | "username" => {
                    b.username = Some(rest.clone());
                    true
                }
                "remote_password" | "password" => {
                    b.password = Some(rest.clone());
                    true
                }
                "remote_clientid" | "clientid" => {
                    b.client_id = Some(rest.clone());
                    true
                }
                "cleansession" => {
                    b.clean_start = boolean(arg);
                    true
                }
                "keepalive_interval" => {
                    b.keep_alive = Some(format!("{arg}s"));
                    true
                }
                "restart_timeout" => {
                    let base = format!("{arg}s");
                    let cap = args
                        .get(1)
                        .map_or_else(|| base.clone(), |c| format!("{c}s"));
                    b.reconnect = Some((base, cap));
                    true
                }
                "try_private" => {
                    skip("not needed: FlockMQ bridges avoid loops by no-local subscriptions (v5) or by dropping their own echoes (3.1.1)");
                    true
                }
                "notifications" => {
                    b.notifications = boolean(arg);
                    true
                }
                "notification_topic" => {
                    b.notification_topic = Some(rest.clone());
                    true
                }
                "notifications_local_only" => {
                    skip("notifications go to both sides");
                    true
                }
                "bridge_outgoing_retain" => {
                    skip("FlockMQ bridges always carry the retain flag");
                    true
                }
                "local_username" => {
                    b.local_username = Some(rest.clone());
                    true
                }
                "local_clientid" | "local_password" => {
                    skip("a FlockMQ bridge's local session is internal ($bridge/NAME) and needs no password");
                    true
                }
                k if k.starts_with("bridge_")
                    || matches!(
                        k,
                        "start_type"
                            | "idle_timeout"
                            | "threshold"
                            | "round_robin"
                            | "remote_clientid_prefix"
                    ) =>
                {
                    skip("no FlockMQ bridge setting for it");
                    true
                }
                _ => false,
            };
            if taken {
                continue;
            }
        }

        match key {
            "connection" => bridges.push(Bridge {
                name: arg
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect(),
                ..Bridge::default()
            }),
            "listener" => listeners.push(Listener {
                port: arg.to_owned(),
                bind: args.get(1).map(|a| (*a).to_owned()),
                line: n,
                ..Listener::default()
            }),
            "port" => listeners.push(Listener {
                port: arg.to_owned(),
                line: n,
                ..Listener::default()
            }),
            "bind_address" => match listeners.last_mut() {
                Some(l) => l.bind = Some(arg.to_owned()),
                None => skip("no listener before it"),
            },
            "protocol" => match (listeners.last_mut(), arg) {
                (Some(l), "websockets") => l.websockets = true,
                (Some(_), "mqtt") => {}
                _ => skip("no FlockMQ listener for this protocol"),
            },
            "certfile" | "keyfile" => {
                if let Some(l) = listeners.last_mut() {
                    l.tls = true;
                }
                let name = if key == "certfile" {
                    "tls_cert_file"
                } else {
                    "tls_key_file"
                };
                if tls_files.iter().any(|(k, v)| k == name && *v != rest) {
                    skip("FlockMQ's TLS listeners share one certificate: the first is kept");
                } else if !tls_files.iter().any(|(k, _)| k == name) {
                    tls_files.push((name.to_owned(), rest.clone()));
                }
            }
            "cafile" => tls_files.push(("tls_ca_file".into(), rest.clone())),
            "require_certificate" => top.push(("tls_require_client_cert".into(), arg.to_owned())),
            "use_identity_as_username" if arg == "true" => {
                top.push(("tls_identity_as_username".into(), s("cn")))
            }
            "use_subject_as_username" if arg == "true" => {
                top.push(("tls_identity_as_username".into(), s("cn")));
                skip("the subject's common name is used, not the whole subject");
            }
            "allow_anonymous" => match boolean(arg) {
                Some(v) => mqtt.push(("allow_anonymous".into(), v.to_string())),
                None => skip("not true or false"),
            },
            "password_file" => mqtt.push(("password_file".into(), s(&rest))),
            "acl_file" => mqtt.push(("acl_file".into(), s(&rest))),
            "max_queued_messages" => mqtt.push(("max_queued_messages".into(), arg.to_owned())),
            "persistence" | "persistence_location" | "persistence_file" | "autosave_interval" => {
                skip("FlockMQ always keeps its state on disk, in data_dir")
            }
            _ => skip("no FlockMQ equivalent"),
        }
    }

    let mut out =
        String::from("# Imported from mosquitto.conf by `broker-node import-mosquitto-conf`.\n");
    let mut kinds: Vec<&str> = Vec::new();
    for l in &listeners {
        let key = match (l.tls, l.websockets) {
            (false, false) => "mqtt_addr",
            (true, false) => "tls_addr",
            (false, true) => "ws_addr",
            (true, true) => "wss_addr",
        };
        if kinds.contains(&key) {
            skipped.push(format!(
                "line {}: listener {}: FlockMQ has one listener of each kind; only the first is kept",
                l.line, l.port
            ));
            continue;
        }
        kinds.push(key);
        let bind = l.bind.as_deref().unwrap_or("0.0.0.0");
        let _ = writeln!(out, "{key} = {}", s(&format!("{bind}:{}", l.port)));
    }
    for (k, v) in tls_files {
        let _ = writeln!(out, "{k} = {}", s(&v));
    }
    for (k, v) in top {
        let _ = writeln!(out, "{k} = {v}");
    }
    if !mqtt.is_empty() {
        out.push_str("\n[mqtt]\n");
        for (k, v) in mqtt {
            let _ = writeln!(out, "{k} = {v}");
        }
    }
    for b in bridges {
        let _ = writeln!(out, "\n[[bridges]]\nname = {}", s(&b.name));
        let _ = writeln!(out, "address = {}", s(b.address.as_deref().unwrap_or("")));
        let _ = writeln!(out, "protocol = {}", s(b.protocol.unwrap_or("3.1.1")));
        let strings = [
            ("client_id", &b.client_id),
            ("username", &b.username),
            ("password", &b.password),
            ("local_username", &b.local_username),
            ("keep_alive", &b.keep_alive),
            ("tls_ca_file", &b.ca),
            ("tls_cert_file", &b.cert),
            ("tls_key_file", &b.key),
            ("notification_topic", &b.notification_topic),
        ];
        for (k, v) in strings {
            if let Some(v) = v {
                let _ = writeln!(out, "{k} = {}", s(v));
            }
        }
        // Mosquitto notifies by default.
        let _ = writeln!(out, "notifications = {}", b.notifications.unwrap_or(true));
        // Mosquitto's default is a persistent remote session.
        let _ = writeln!(out, "clean_start = {}", b.clean_start.unwrap_or(false));
        if b.ca.is_some() {
            out.push_str("tls = true\n");
        }
        // Mosquitto's default: from 5 s, doubling up to 30 s.
        let (min, max) = b.reconnect.unwrap_or(("5s".into(), "30s".into()));
        let _ = writeln!(
            out,
            "reconnect_min = {}\nreconnect_max = {}",
            s(&min),
            s(&max)
        );
        for t in b.topics {
            let _ = writeln!(
                out,
                "\n[[bridges.topics]]\nfilter = {}\ndirection = {}\nqos = {}\nlocal_prefix = {}\nremote_prefix = {}",
                s(&t.filter),
                s(&t.direction),
                t.qos,
                s(&t.local_prefix),
                s(&t.remote_prefix)
            );
        }
    }
    Imported {
        toml: out,
        not_carried: skipped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BridgeProtocol, Config, Direction};

    const CONF: &str = r#"
# the plant's broker
listener 1883
listener 8883 0.0.0.0
certfile /etc/mosquitto/server.crt
keyfile /etc/mosquitto/server.key
allow_anonymous false
password_file /etc/mosquitto/passwd
acl_file /etc/mosquitto/acl
persistence true

connection cloud
address cloud.example.com:8883 backup.example.com:8883
bridge_protocol_version mqttv50
bridge_cafile /etc/mosquitto/ca.crt
bridge_certfile /etc/mosquitto/edge.crt
bridge_keyfile /etc/mosquitto/edge.key
remote_username edge-3
remote_password s3cret
remote_clientid edge-3-bridge
cleansession true
notifications false
try_private true
restart_timeout 2 60
bridge_outgoing_retain false
topic fleet/# out 1 "" site-3/
topic cmd/# in 2 local/ cloud/site-3/
topic sync/# both
"#;

    #[test]
    fn a_mosquitto_bridge_becomes_a_flockmq_bridge_and_the_rest_is_listed() {
        let imported = import(CONF);
        let config =
            Config::from_toml(&imported.toml).unwrap_or_else(|e| panic!("{e}:\n{}", imported.toml));
        assert_eq!(config.mqtt_addr.to_string(), "0.0.0.0:1883");
        assert_eq!(
            config.tls_addr.map(|a| a.to_string()).as_deref(),
            Some("0.0.0.0:8883")
        );
        assert_eq!(
            config.tls_cert_file.as_deref(),
            Some("/etc/mosquitto/server.crt")
        );
        assert_eq!(
            config.mqtt.password_file.as_deref(),
            Some("/etc/mosquitto/passwd")
        );
        let b = &config.bridges[0];
        assert_eq!(b.name, "cloud");
        assert_eq!(b.address, "cloud.example.com:8883");
        assert_eq!(b.protocol, BridgeProtocol::V5);
        assert!(b.tls && b.clean_start);
        assert_eq!(b.client_id.as_deref(), Some("edge-3-bridge"));
        assert_eq!(b.username.as_deref(), Some("edge-3"));
        assert_eq!(b.tls_key_file.as_deref(), Some("/etc/mosquitto/edge.key"));
        assert_eq!(b.reconnect_min.as_secs(), 2);
        assert_eq!(b.reconnect_max.as_secs(), 60);
        let t = &b.topics;
        assert_eq!(
            (t[0].filter.as_str(), t[0].qos, t[0].remote_prefix.as_str()),
            ("fleet/#", 1, "site-3/")
        );
        assert_eq!(t[0].local_prefix, "");
        assert_eq!(
            (t[1].direction, t[1].local_prefix.as_str()),
            (Direction::In, "local/")
        );
        assert_eq!((t[2].direction, t[2].qos), (Direction::Both, 0));
        assert!(!b.notifications);
        let skipped = imported.not_carried.join("\n");
        for line in [
            "persistence true",
            "backup.example.com",
            "try_private true",
            "bridge_outgoing_retain false",
        ] {
            assert!(skipped.contains(line), "{line} not listed in:\n{skipped}");
        }
        assert!(!skipped.contains("remote_password"), "{skipped}");
    }
}
