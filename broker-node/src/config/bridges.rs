//! The `[[bridges]]` tables of the configuration: each a connection to a remote broker
//! and the topics carried across it. Pure data and validation; the bridge itself
//! (`crate::bridge`) reads it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{dur, invalid, opt_string, ConfigError};

/// The MQTT version a bridge speaks to its remote broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BridgeProtocol {
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.0.
    #[serde(rename = "5")]
    V5,
}

/// Which way a topic mapping carries messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Local → remote.
    Out,
    /// Remote → local.
    In,
    /// Both ways.
    Both,
}

impl Direction {
    /// Whether local messages go to the remote.
    pub fn outgoing(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }

    /// Whether remote messages come in.
    pub fn incoming(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }
}

/// One topic mapping of a bridge, as Mosquitto's `topic PATTERN DIRECTION QOS
/// LOCAL_PREFIX REMOTE_PREFIX`: the local topic is `local_prefix + T` and the remote
/// one `remote_prefix + T` for every `T` matching `filter`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeTopic {
    /// The topic filter, without the prefixes.
    pub filter: String,
    /// out, in or both.
    pub direction: Direction,
    /// The QoS of the subscriptions on either side (the most a message keeps).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Prepended to the topic on this cluster's side.
    #[serde(default)]
    pub local_prefix: String,
    /// Prepended to the topic on the remote side.
    #[serde(default)]
    pub remote_prefix: String,
}

fn default_qos() -> u8 {
    1
}

/// One bridge to a remote broker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Its name (the `bridge` label of its metrics, `ctl bridges`); unique.
    pub name: String,
    /// The remote broker, `host:port`.
    pub address: String,
    /// "3.1.1" or "5".
    #[serde(default = "default_protocol")]
    pub protocol: BridgeProtocol,
    /// The client identifier on the remote broker; empty: `flockmq-bridge-NAME`.
    #[serde(default, with = "opt_string")]
    pub client_id: Option<String>,
    /// The username on the remote broker; empty for none.
    #[serde(default, with = "opt_string")]
    pub username: Option<String>,
    /// The password on the remote broker; empty for none.
    #[serde(default, with = "opt_string")]
    pub password: Option<String>,
    /// The username the ACL (mqtt.acl_file) sees the bridge's local session as; empty:
    /// anonymous. No password is asked: the session is inside the node.
    #[serde(default, with = "opt_string")]
    pub local_username: Option<String>,
    /// The keep alive towards the remote broker (at least 5s are used).
    #[serde(default = "default_keep_alive", with = "dur")]
    pub keep_alive: Duration,
    /// Clean start (v5) / clean session (3.1.1) on the remote broker: false keeps the
    /// remote session, so messages for `in` topics wait there while the bridge is
    /// away.
    #[serde(default)]
    pub clean_start: bool,
    /// Session expiry asked of a v5 remote broker (3.1.1: the remote's own rule).
    #[serde(default = "default_session_expiry", with = "dur")]
    pub session_expiry: Duration,
    /// Speak TLS to the remote broker.
    #[serde(default)]
    pub tls: bool,
    /// CA certificates (PEM) the remote's certificate is verified against; empty:
    /// the system's roots.
    #[serde(default, with = "opt_string")]
    pub tls_ca_file: Option<String>,
    /// A client certificate chain (PEM) to present; empty for none.
    #[serde(default, with = "opt_string")]
    pub tls_cert_file: Option<String>,
    /// The client certificate's private key (PEM).
    #[serde(default, with = "opt_string")]
    pub tls_key_file: Option<String>,
    /// The name the remote's certificate must carry (and SNI); empty: the host of
    /// `address`.
    #[serde(default, with = "opt_string")]
    pub tls_server_name: Option<String>,
    /// Publish the bridge's state, retained: "1" once connected, "0" when the
    /// connection is lost (locally; on the remote as a will), on notification_topic.
    #[serde(default)]
    pub notifications: bool,
    /// The topic of the notifications; empty: `$SYS/broker/connection/CLIENT_ID/state`
    /// (CLIENT_ID: the remote client id), as Mosquitto does.
    #[serde(default, with = "opt_string")]
    pub notification_topic: Option<String>,
    /// The first wait before reconnecting; it doubles on each failure (with jitter).
    #[serde(default = "default_reconnect_min", with = "dur")]
    pub reconnect_min: Duration,
    /// The longest wait between reconnection attempts.
    #[serde(default = "default_reconnect_max", with = "dur")]
    pub reconnect_max: Duration,
    /// The topics carried.
    #[serde(default)]
    pub topics: Vec<BridgeTopic>,
}

fn default_protocol() -> BridgeProtocol {
    BridgeProtocol::V5
}

fn default_keep_alive() -> Duration {
    Duration::from_secs(60)
}

fn default_session_expiry() -> Duration {
    Duration::from_secs(3600)
}

fn default_reconnect_min() -> Duration {
    Duration::from_secs(1)
}

fn default_reconnect_max() -> Duration {
    Duration::from_secs(60)
}

impl BridgeConfig {
    /// The client identifier on the remote broker.
    pub fn remote_client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("flockmq-bridge-{}", self.name))
    }

    /// The topic of its connection-state notifications.
    pub fn notification_topic(&self) -> String {
        self.notification_topic
            .clone()
            .unwrap_or_else(|| format!("$SYS/broker/connection/{}/state", self.remote_client_id()))
    }

    /// The client identifier of the bridge's session in this cluster.
    pub fn local_client_id(&self) -> String {
        format!("$bridge/{}", self.name)
    }
}

/// Check the bridges beyond their types.
pub fn validate(bridges: &[BridgeConfig]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for b in bridges {
        let key = |k: &str| format!("bridges.{}.{k}", b.name);
        if b.name.is_empty()
            || !b
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "bridges.name",
                format!("'{}' must be letters, digits, '-' or '_'", b.name),
            ));
        }
        if !names.insert(b.name.as_str()) {
            return Err(invalid("bridges.name", format!("'{}' twice", b.name)));
        }
        super::check_host_port(&key("address"), &b.address)?;
        if b.topics.is_empty() {
            return Err(invalid(&key("topics"), "a bridge needs at least one topic"));
        }
        if b.tls_cert_file.is_some() != b.tls_key_file.is_some() {
            return Err(invalid(
                &key("tls_cert_file"),
                "tls_cert_file and tls_key_file go together",
            ));
        }
        if b.client_id.as_ref().is_some_and(|id| id.starts_with(' ')) {
            return Err(invalid(&key("client_id"), "may not start with a space"));
        }
        if b.keep_alive.as_secs() > u64::from(u16::MAX) {
            return Err(invalid(&key("keep_alive"), "at most 65535s"));
        }
        if b.reconnect_min.is_zero() || b.reconnect_min > b.reconnect_max {
            return Err(invalid(
                &key("reconnect_min"),
                "must be above zero and at most reconnect_max",
            ));
        }
        for t in &b.topics {
            if t.qos > 2 {
                return Err(invalid(&key("topics.qos"), "must be 0, 1 or 2"));
            }
            for (what, filter) in [
                ("local", format!("{}{}", t.local_prefix, t.filter)),
                ("remote", format!("{}{}", t.remote_prefix, t.filter)),
            ] {
                if crate::mqtt::topic::validate_topic_filter(&filter).is_err() {
                    return Err(invalid(
                        &key("topics.filter"),
                        format!("'{filter}' is not a valid {what} topic filter"),
                    ));
                }
            }
            for prefix in [&t.local_prefix, &t.remote_prefix] {
                if prefix.contains(['+', '#']) {
                    return Err(invalid(
                        &key("topics"),
                        format!("prefix '{prefix}' may not contain wildcards"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A commented example, appended to the printed default configuration.
pub const EXAMPLE: &str = "
# Bridges to remote brokers (none by default). Each carries the listed topics between
# this cluster and the remote broker; the cluster's leader runs them. Example:
#
# [[bridges]]
# name = \"cloud\"                 # letters, digits, '-' or '_'; the metrics' label
# address = \"mqtt.example.com:8883\"
# protocol = \"5\"                 # or \"3.1.1\"
# client_id = \"\"                 # empty: flockmq-bridge-NAME
# username = \"\"
# password = \"\"
# local_username = \"\"           # whom the ACL sees the bridge's local session as
# keep_alive = \"60s\"
# clean_start = false            # false: the remote keeps the bridge's session
# session_expiry = \"1h\"          # asked of a v5 remote
# tls = true
# tls_ca_file = \"\"               # empty: the system's roots
# tls_cert_file = \"\"             # a client certificate, with tls_key_file
# tls_key_file = \"\"
# tls_server_name = \"\"           # empty: the host of address
# notifications = false          # retained 1/0 on notification_topic, both sides
# notification_topic = \"\"       # empty: $SYS/broker/connection/CLIENT_ID/state
# reconnect_min = \"1s\"           # backoff doubles from here, with jitter
# reconnect_max = \"60s\"
#
# [[bridges.topics]]
# filter = \"fleet/#\"
# direction = \"out\"              # out (local -> remote), in, or both
# qos = 1
# local_prefix = \"\"
# remote_prefix = \"site-3/\"      # local fleet/x is published remotely as site-3/fleet/x
";

#[cfg(test)]
mod tests {
    use super::super::{default_config_toml, Config, ConfigError};
    use super::*;

    const BRIDGE: &str = r#"
[[bridges]]
name = "cloud"
address = "mqtt.example.com:8883"
protocol = "3.1.1"
tls = true
username = "edge"
password = "secret"

[[bridges.topics]]
filter = "fleet/#"
direction = "out"
remote_prefix = "site-3/"

[[bridges.topics]]
filter = "cmd/#"
direction = "in"
qos = 2
"#;

    #[test]
    fn a_bridge_table_reads_with_its_defaults() {
        let c = Config::from_toml(BRIDGE).expect("valid");
        let b = &c.bridges[0];
        assert_eq!(b.protocol, BridgeProtocol::V311);
        assert_eq!(b.remote_client_id(), "flockmq-bridge-cloud");
        assert_eq!(b.local_client_id(), "$bridge/cloud");
        assert_eq!(b.keep_alive, Duration::from_secs(60));
        assert!(!b.clean_start);
        assert_eq!(b.topics[0].qos, 1);
        assert_eq!(b.topics[0].remote_prefix, "site-3/");
        assert_eq!(b.topics[1].direction, Direction::In);
        assert_eq!(b.topics[1].qos, 2);
    }

    #[test]
    fn the_printed_defaults_hold_no_bridge_and_read_back() {
        let c = Config::from_toml(&default_config_toml()).expect("defaults read back");
        assert!(c.bridges.is_empty());
    }

    #[test]
    fn bad_bridges_are_refused_naming_the_key() {
        let cases = [
            (
                BRIDGE.replace("fleet/#", "fleet/#/x"),
                "bridges.cloud.topics.filter",
            ),
            (
                BRIDGE.replace("remote_prefix = \"site-3/\"", "remote_prefix = \"+/\""),
                "bridges.cloud.topics",
            ),
            (
                BRIDGE.replace("mqtt.example.com:8883", "nowhere"),
                "bridges.cloud.address",
            ),
            (
                BRIDGE.replace("qos = 2", "qos = 3"),
                "bridges.cloud.topics.qos",
            ),
            (
                BRIDGE.replace("name = \"cloud\"", "name = \"a b\""),
                "bridges.name",
            ),
            (format!("{BRIDGE}{BRIDGE}"), "bridges.name"),
        ];
        for (text, key) in cases {
            match Config::from_toml(&text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("expected an invalid {key}, got {other:?}"),
            }
        }
        assert!(
            Config::from_toml(&BRIDGE.replace("tls = true", "tls = true\nsni = \"x\"")).is_err(),
            "unknown keys are refused"
        );
    }
}
