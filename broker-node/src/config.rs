//! The node's configuration: one typed struct, one source of defaults
//! (`impl Default`), read from a TOML file and overridden by `FLOCKMQ_` environment
//! variables and then by command-line flags.
//!
//! Unknown keys and invalid values are errors naming the key. Durations are human
//! (`30s`, `250ms`), sizes too (`1MiB`, `64KB`, `1024`). The documented defaults are
//! printed by `broker-node print-default-config` (see [`default_config_toml`]), which is
//! also committed as `config/flockmq.toml`. This module never opens a socket.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

pub mod bridges;
pub use bridges::{BridgeConfig, BridgeProtocol, BridgeTopic, Direction};

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A key that no setting has.
    #[error("unknown key '{0}'")]
    UnknownKey(String),
    /// A value that does not fit its setting.
    #[error("invalid value for '{key}': {reason}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// Why.
        reason: String,
    },
}

pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// One voter of a fresh cluster (`--initial-cluster ID=HOST:PORT`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterMember {
    /// Its node id.
    pub id: u64,
    /// Its cluster (gRPC) address, `host:port`; host names are resolved by DNS.
    pub addr: String,
}

/// What to do when a session's queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueFullPolicyConfig {
    /// Drop the oldest queued message.
    DropOldest,
    /// Refuse the new message.
    DropNewest,
}

/// How shared-subscription members are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedStrategyConfig {
    /// Each member in turn.
    RoundRobin,
    /// A random member.
    Random,
    /// The same member while it stays.
    Sticky,
    /// Hash of the publisher's client id.
    HashClientId,
    /// Hash of the topic.
    HashTopic,
    /// A member on the receiving node when there is one.
    LocalFirst,
}

impl From<SharedStrategyConfig> for crate::router::SharedStrategy {
    fn from(s: SharedStrategyConfig) -> Self {
        use crate::router::SharedStrategy as S;
        match s {
            SharedStrategyConfig::RoundRobin => S::RoundRobin,
            SharedStrategyConfig::Random => S::Random,
            SharedStrategyConfig::Sticky => S::Sticky,
            SharedStrategyConfig::HashClientId => S::HashClientId,
            SharedStrategyConfig::HashTopic => S::HashTopic,
            SharedStrategyConfig::LocalFirst => S::LocalFirst,
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The whole configuration of a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's id in the cluster; unique per cluster.
    pub node_id: u64,
    /// Where the Raft log, snapshots and state live.
    pub data_dir: PathBuf,
    /// MQTT over TCP.
    pub mqtt_addr: SocketAddr,
    /// MQTT over WebSocket (path /mqtt), e.g. 127.0.0.1:8083; "off" disables it.
    #[serde(with = "opt_addr")]
    pub ws_addr: Option<SocketAddr>,
    /// MQTT over TLS, e.g. 127.0.0.1:8883; "off" disables it. Needs tls_cert_file and
    /// tls_key_file.
    #[serde(with = "opt_addr")]
    pub tls_addr: Option<SocketAddr>,
    /// The server certificate chain (PEM) of the TLS listener.
    #[serde(with = "opt_string")]
    pub tls_cert_file: Option<String>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of the TLS listener.
    #[serde(with = "opt_string")]
    pub tls_key_file: Option<String>,
    /// CA certificates (PEM) that client certificates are verified against; empty
    /// accepts no client certificates.
    #[serde(with = "opt_string")]
    pub tls_ca_file: Option<String>,
    /// Whether a TLS client must present a certificate signed by tls_ca_file: true,
    /// false, or the listeners that require one, ["tls"] or ["wss"].
    pub tls_require_client_cert: Listeners,
    /// What a TLS client's certificate stands for: "off" (nothing: the CONNECT's
    /// username and password count), "cn" (its subject common name is the username
    /// and no password is asked) or "san" (its first DNS, e-mail or URI subject
    /// alternative name is). With "cn" or "san", TLS clients without a certificate
    /// are refused.
    pub tls_identity_as_username: TlsIdentity,
    /// MQTT over secure WebSocket (path /mqtt), e.g. 127.0.0.1:8084; "off" disables
    /// it. Uses tls_cert_file and tls_key_file.
    #[serde(with = "opt_addr")]
    pub wss_addr: Option<SocketAddr>,
    /// HTTP: /metrics, /healthz, /readyz and the admin API.
    pub http_addr: SocketAddr,
    /// Serve http_addr as HTTPS, with tls_cert_file and tls_key_file (reloaded on
    /// SIGHUP like the MQTT listeners').
    pub http_tls: bool,
    /// Cluster gRPC (Raft and forwarding).
    pub cluster_addr: SocketAddr,
    /// The host:port other nodes reach this node's cluster address at; empty means
    /// cluster_addr.
    #[serde(with = "opt_string")]
    pub advertise_addr: Option<String>,
    /// The voters a fresh cluster starts with (ID=HOST:PORT each); empty for a single node.
    #[serde(deserialize_with = "de_members")]
    pub initial_cluster: Vec<ClusterMember>,
    /// The cluster address of a running node to join; empty for none.
    #[serde(with = "opt_string")]
    pub join: Option<String>,
    /// The bearer token the admin API (/api/v1) requires; with neither it nor
    /// api_password_file set, the API answers only requests from loopback addresses.
    #[serde(with = "opt_string")]
    pub api_token: Option<String>,
    /// A Mosquitto-format password file whose users may call the admin API with
    /// HTTP basic auth (alone or besides api_token); empty for none.
    #[serde(with = "opt_string")]
    pub api_password_file: Option<String>,
    /// MQTT protocol settings and limits.
    pub mqtt: MqttConfig,
    /// Logging.
    pub log: LogConfig,
    /// Raft and inter-node settings.
    pub cluster: ClusterConfig,
    /// Bridges to remote brokers (`[[bridges]]`).
    pub bridges: Vec<BridgeConfig>,
}

/// The MQTT listeners, by the names settings use for them.
pub const LISTENERS: [&str; 4] = ["tcp", "tls", "ws", "wss"];

/// A setting on or off for every listener, or on for the listed ones only
/// (`["tcp", "ws"]`, or `"tcp,ws"` in an environment variable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listeners {
    /// On (true) or off (false) everywhere.
    All(bool),
    /// On for these listeners.
    Only(Vec<String>),
}

impl Listeners {
    /// Whether it is on for `listener`.
    pub fn on(&self, listener: &str) -> bool {
        match self {
            Listeners::All(on) => *on,
            Listeners::Only(names) => names.iter().any(|n| n == listener),
        }
    }

    fn parse<E: serde::de::Error>(raw: RawSetting) -> Result<Self, E> {
        let names =
            |names: Vec<String>| match names.iter().find(|n| !LISTENERS.contains(&n.as_str())) {
                Some(bad) => Err(E::custom(format!(
                    "'{bad}' is not a listener (tcp, tls, ws, wss)"
                ))),
                None => Ok(Listeners::Only(names)),
            };
        match raw {
            RawSetting::Bool(on) => Ok(Listeners::All(on)),
            RawSetting::List(list) => names(list),
            RawSetting::Text(t) => match t.as_str() {
                "true" => Ok(Listeners::All(true)),
                "false" => Ok(Listeners::All(false)),
                _ => names(t.split(',').map(|n| n.trim().to_owned()).collect()),
            },
        }
    }
}

/// What a per-listener setting may be written as.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSetting {
    Bool(bool),
    Text(String),
    List(Vec<String>),
}

impl Serialize for Listeners {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Listeners::All(on) => s.serialize_bool(*on),
            Listeners::Only(names) => names.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Listeners {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Listeners::parse(RawSetting::deserialize(d)?)
    }
}

/// Anonymous access (`mqtt.allow_anonymous`): "auto", or on or off per listener.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Anonymous {
    /// Allowed while every MQTT listener is on a loopback address.
    #[default]
    Auto,
    /// As set.
    Set(Listeners),
}

impl Serialize for Anonymous {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Anonymous::Auto => s.serialize_str("auto"),
            Anonymous::Set(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Anonymous {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match RawSetting::deserialize(d)? {
            RawSetting::Text(t) if t == "auto" => Ok(Anonymous::Auto),
            raw => Listeners::parse(raw).map(Anonymous::Set),
        }
    }
}

/// What a TLS client certificate stands for (`tls_identity_as_username`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsIdentity {
    /// Nothing: the CONNECT's credentials count.
    #[default]
    Off,
    /// The subject's common name is the username.
    Cn,
    /// The first DNS, e-mail or URI subject alternative name is the username.
    San,
}

/// MQTT protocol settings and limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Largest packet accepted (and announced in CONNACK), at most 268435455 bytes.
    #[serde(with = "size32")]
    pub max_packet_size: u32,
    /// Most client connections at once on this node (0: unlimited).
    pub max_connections: usize,
    /// How long a new connection may take to send CONNECT.
    #[serde(with = "dur")]
    pub connect_timeout: Duration,
    /// How long a plain-TCP or TLS connection must be idle before it is parked: its
    /// task and buffers are given up and the socket (and TLS session) waits in the
    /// node's parking lot until the client sends something or a message arrives for
    /// it; a connection that has sent nothing since its CONNECT parks after 200 ms if
    /// that is sooner ("0s": never).
    #[serde(with = "dur")]
    pub park_after: Duration,
    /// A keep alive imposed on v5 clients (Server Keep Alive); empty honours the client's.
    #[serde(with = "opt_u16")]
    pub server_keep_alive: Option<u16>,
    /// The longest keep alive a client may ask for, in seconds.
    pub max_keep_alive: u16,
    /// Unacknowledged QoS 1/2 publishes a client may send at once (v5 Receive Maximum).
    pub receive_maximum: u16,
    /// Unacknowledged QoS 1/2 messages the broker sends a client at once (capped by
    /// the client's Receive Maximum).
    pub max_inflight: usize,
    /// Messages queued per session (offline, or waiting for room in flight).
    pub max_queued_messages: usize,
    /// Bytes queued per session.
    #[serde(with = "size64")]
    pub max_queued_bytes: u64,
    /// drop_oldest or drop_newest, when a session's queue is full.
    pub queue_full_policy: QueueFullPolicyConfig,
    /// Most sessions in the cluster's state (every node holds them all); a CONNECT
    /// that would add one more is refused with Quota exceeded (v5) or Server
    /// unavailable (3.1.1). 0: no limit.
    pub max_sessions: usize,
    /// Most retained messages; a PUBLISH that would retain one on a new topic is
    /// refused (v5 QoS 1/2: Quota exceeded; otherwise dropped). 0: no limit.
    pub max_retained_messages: usize,
    /// Most bytes all persistent queues hold together, as each counts them; past it,
    /// messages for offline sessions are not queued (dropped, counted; a v5 publisher
    /// whose message reached nobody hears Quota exceeded). 0: no limit.
    #[serde(with = "size64")]
    pub max_node_queued_bytes: u64,
    /// Longest topic name or filter, in bytes.
    pub max_topic_length: usize,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Most subscriptions per client (0: unlimited).
    pub max_subscriptions_per_client: usize,
    /// Topic aliases a v5 client may use towards the broker.
    pub topic_alias_maximum: u16,
    /// Topic aliases the broker assigns towards a v5 client (within the client's own
    /// Topic Alias Maximum; least recently used first to go; 0: none).
    pub outbound_topic_alias_maximum: u16,
    /// Highest QoS the broker grants (0, 1 or 2).
    pub max_qos: u8,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Whether wildcard subscriptions are allowed.
    pub wildcard_subscription_available: bool,
    /// Whether subscription identifiers are supported.
    pub subscription_identifier_available: bool,
    /// Whether shared subscriptions are supported.
    pub shared_subscription_available: bool,
    /// round_robin, random, sticky, hash_client_id, hash_topic or local_first.
    pub shared_subscription_strategy: SharedStrategyConfig,
    /// How long a persistent member of a shared group may be offline before the
    /// messages queued for it as the group's member go to connected members of the
    /// group ("0s": they wait for it until its session expires).
    #[serde(with = "dur")]
    pub shared_redistribute_after: Duration,
    /// The longest session expiry granted; empty for no cap.
    #[serde(with = "opt_dur")]
    pub max_session_expiry: Option<Duration>,
    /// Whether clients may connect without credentials: true, false, "auto" (as
    /// Mosquitto 2 does: allowed while every MQTT listener is on a loopback address,
    /// refused once one binds beyond it), or the listeners that allow it, e.g.
    /// ["tcp", "ws"].
    pub allow_anonymous: Anonymous,
    /// A Mosquitto-format password file (username:$7$... lines, as written by
    /// `broker-node passwd` or mosquitto_passwd); empty for none. Reloaded on SIGHUP.
    #[serde(with = "opt_string")]
    pub password_file: Option<String>,
    /// A Mosquitto-format ACL file (user / topic / pattern lines); empty lets every
    /// client publish and subscribe anywhere. Reloaded on SIGHUP.
    #[serde(with = "opt_string")]
    pub acl_file: Option<String>,
    /// How often $SYS topics are published; 0s disables them.
    #[serde(with = "dur")]
    pub sys_interval: Duration,
    /// Acknowledge QoS 1/2 publishes to persistent sessions only once they are committed
    /// to disk (true), or deliver to connected ones from memory (false: faster, a
    /// crash of their node loses messages in flight).
    pub durable_sessions: bool,
    /// Every node's public MQTT address, ID=HOST:PORT comma separated (the same list
    /// on every node): a v5 client that a node cut off from the majority cannot
    /// serve gets 0x9C Use another server with the address of the node it last knew
    /// leading (or another); empty: 0x88 Server unavailable. v3 clients get 3.
    #[serde(with = "opt_string")]
    pub server_references: Option<String>,
}

/// Logging.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// human or json.
    pub format: LogFormat,
    /// A tracing filter used when RUST_LOG is not set (e.g. "info,broker_node=debug");
    /// empty means info.
    #[serde(with = "opt_string")]
    pub level: Option<String>,
}

/// Raft and inter-node settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How often the leader sends heartbeats.
    #[serde(with = "dur")]
    pub heartbeat_interval: Duration,
    /// Shortest election timeout.
    #[serde(with = "dur")]
    pub election_timeout_min: Duration,
    /// Longest election timeout.
    #[serde(with = "dur")]
    pub election_timeout_max: Duration,
    /// Log entries between snapshots.
    pub snapshot_after_logs: u64,
    /// Most commands in one Raft entry.
    pub batch_max_commands: usize,
    /// Longest a command waits for others to share its Raft entry.
    #[serde(with = "dur")]
    pub batch_max_delay: Duration,
    /// Messages buffered per peer for forwarding.
    pub forward_buffer_messages: usize,
    /// How long a control-plane write may wait for a majority before the client is
    /// refused (v5 0x88).
    #[serde(with = "dur")]
    pub write_timeout: Duration,
    /// How long the leader tolerates not reaching a node before it ends the sessions
    /// connected there (wills published, persistent sessions expire and queue);
    /// zero disables it.
    #[serde(with = "dur")]
    pub node_lost_after: Duration,
    /// How long the leader tolerates not reaching a node before it removes it from
    /// the cluster (a scaled-down or lost node); a removed node that runs again asks
    /// to be added back. Zero disables both (membership changes only by hand).
    #[serde(with = "dur")]
    pub autoclean_after: Duration,
    /// This node's certificate (PEM) for the cluster's gRPC, server and client side;
    /// with tls_key_file and tls_ca_file set, nodes speak mutually authenticated TLS.
    /// The three files are reloaded on SIGHUP (new cluster connections use them).
    #[serde(with = "opt_string")]
    pub tls_cert_file: Option<String>,
    /// The private key (PEM) of tls_cert_file.
    #[serde(with = "opt_string")]
    pub tls_key_file: Option<String>,
    /// The CA (PEM) every node's certificate must be signed by.
    #[serde(with = "opt_string")]
    pub tls_ca_file: Option<String>,
    /// The name every node's certificate holds, checked instead of the host of the
    /// address a node is reached at (so that one certificate may serve every node);
    /// empty checks that host.
    #[serde(with = "opt_string")]
    pub tls_server_name: Option<String>,
    /// Whether the cluster address may be served beyond loopback without cluster
    /// TLS; without it such a node refuses to start. Only on a network where every
    /// process that can reach the port is trusted.
    pub allow_insecure: bool,
}

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// The largest `mqtt.max_packet_size`: half the cluster's gRPC message limit
/// (`cluster::network::RPC_MESSAGE_LIMIT`).
pub const MAX_PACKET_SIZE: u32 = 32 << 20;

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("./data"),
            mqtt_addr: addr("127.0.0.1:1883"),
            ws_addr: None,
            tls_addr: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            tls_require_client_cert: Listeners::All(false),
            tls_identity_as_username: TlsIdentity::Off,
            wss_addr: None,
            http_addr: addr("127.0.0.1:8080"),
            http_tls: false,
            cluster_addr: addr("127.0.0.1:7000"),
            advertise_addr: None,
            initial_cluster: Vec::new(),
            join: None,
            api_token: None,
            api_password_file: None,
            mqtt: MqttConfig::default(),
            log: LogConfig::default(),
            cluster: ClusterConfig::default(),
            bridges: Vec::new(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_packet_size: 1024 * 1024,
            max_connections: 100_000,
            connect_timeout: Duration::from_secs(10),
            park_after: Duration::from_secs(10),
            server_keep_alive: None,
            max_keep_alive: 65_535,
            receive_maximum: 1024,
            max_inflight: 1024,
            max_queued_messages: 1000,
            max_queued_bytes: 64 * 1024 * 1024,
            max_sessions: 0,
            max_retained_messages: 0,
            max_node_queued_bytes: 0,
            queue_full_policy: QueueFullPolicyConfig::DropNewest,
            max_topic_length: 65_535,
            max_topic_levels: 128,
            max_subscriptions_per_client: 0,
            topic_alias_maximum: 65_535,
            outbound_topic_alias_maximum: 256,
            max_qos: 2,
            retain_available: true,
            wildcard_subscription_available: true,
            subscription_identifier_available: true,
            shared_subscription_available: true,
            shared_subscription_strategy: SharedStrategyConfig::RoundRobin,
            shared_redistribute_after: Duration::from_secs(60),
            max_session_expiry: None,
            allow_anonymous: Anonymous::Auto,
            password_file: None,
            acl_file: None,
            sys_interval: Duration::from_secs(10),
            durable_sessions: true,
            server_references: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: None,
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            // Failover takes the leader lease (the longest election timeout) plus one
            // election timeout: about 1.6 to 3.2 s with these.
            heartbeat_interval: Duration::from_millis(200),
            election_timeout_min: Duration::from_millis(800),
            election_timeout_max: Duration::from_millis(1600),
            snapshot_after_logs: 10_000,
            batch_max_commands: 512,
            batch_max_delay: Duration::from_millis(1),
            forward_buffer_messages: 10_000,
            // Longer than a failover with a split vote, so that a write made while the
            // leader is lost waits for the next one instead of failing.
            write_timeout: Duration::from_secs(10),
            // Several failovers long: a node restarting (or a network blip) keeps its
            // clients' sessions; a node that stays away does not.
            node_lost_after: Duration::from_secs(15),
            autoclean_after: Duration::ZERO,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            tls_server_name: None,
            allow_insecure: false,
        }
    }
}

/// The overrides given on the command line (each `None` when not given).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RunArgs {
    /// A TOML configuration file (or the variable FLOCKMQ_CONFIG).
    #[arg(long, value_name = "FILE", env = "FLOCKMQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id.
    #[arg(long)]
    pub node_id: Option<String>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<String>,
    /// MQTT/TCP listen address.
    #[arg(long)]
    pub mqtt_addr: Option<String>,
    /// MQTT/TLS listen address ("off" disables).
    #[arg(long)]
    pub tls_addr: Option<String>,
    /// MQTT/WebSocket listen address ("off" disables).
    #[arg(long)]
    pub ws_addr: Option<String>,
    /// MQTT/secure WebSocket listen address ("off" disables).
    #[arg(long)]
    pub wss_addr: Option<String>,
    /// HTTP listen address.
    #[arg(long)]
    pub http_addr: Option<String>,
    /// Cluster gRPC listen address.
    #[arg(long)]
    pub cluster_addr: Option<String>,
    /// Address other nodes use to reach this one (HOST:PORT).
    #[arg(long)]
    pub advertise_addr: Option<String>,
    /// Voters of a fresh cluster: ID=HOST:PORT,ID=HOST:PORT,...
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// Join the cluster of the node at HOST:PORT.
    #[arg(long)]
    pub join: Option<String>,
    /// Bearer token the admin API requires (empty: loopback only).
    #[arg(long)]
    pub api_token: Option<String>,
    /// Password file of the admin API's basic-auth users.
    #[arg(long)]
    pub api_password_file: Option<String>,
    /// Log format: human or json.
    #[arg(long)]
    pub log_format: Option<String>,
}

/// Top-level keys that flags and plain `FLOCKMQ_X` variables may set.
const FLAG_KEYS: &[&str] = &[
    "node_id",
    "data_dir",
    "mqtt_addr",
    "tls_addr",
    "ws_addr",
    "wss_addr",
    "http_addr",
    "cluster_addr",
    "advertise_addr",
    "initial_cluster",
    "join",
    "api_token",
    "api_password_file",
];

impl Config {
    /// Whether clients of `listener` ("tcp", "tls", "ws" or "wss") may connect
    /// without credentials, "auto" resolved against the MQTT listeners' addresses.
    pub fn anonymous_allowed_on(&self, listener: &str) -> bool {
        match &self.mqtt.allow_anonymous {
            Anonymous::Set(listeners) => listeners.on(listener),
            Anonymous::Auto => [
                Some(self.mqtt_addr),
                self.tls_addr,
                self.ws_addr,
                self.wss_addr,
            ]
            .into_iter()
            .flatten()
            .all(|a| a.ip().is_loopback()),
        }
    }

    /// Build the configuration: defaults, then the TOML `file`, then `FLOCKMQ_`
    /// variables from `env`, then the flags in `cli`. Nested keys come from variables
    /// like `FLOCKMQ_MQTT__MAX_PACKET_SIZE` (double underscore between section and key).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        cli: &RunArgs,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| invalid("(file)", e.message().to_owned()))?
            }
            None => toml::Table::new(),
        };
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("FLOCKMQ_"))
            .collect();
        env.sort();
        for (name, value) in env {
            let key = env_key(&name["FLOCKMQ_".len()..]);
            // FLOCKMQ_CONFIG names the file; FLOCKMQ_CTL_* belong to `broker-node ctl`.
            if key == "config" || name.starts_with("FLOCKMQ_CTL_") {
                continue;
            }
            set_key(&mut table, &key, &value)?;
        }
        let flags = [
            ("node_id", &cli.node_id),
            ("data_dir", &cli.data_dir),
            ("mqtt_addr", &cli.mqtt_addr),
            ("tls_addr", &cli.tls_addr),
            ("ws_addr", &cli.ws_addr),
            ("wss_addr", &cli.wss_addr),
            ("http_addr", &cli.http_addr),
            ("cluster_addr", &cli.cluster_addr),
            ("advertise_addr", &cli.advertise_addr),
            ("initial_cluster", &cli.initial_cluster),
            ("join", &cli.join),
            ("api_token", &cli.api_token),
            ("api_password_file", &cli.api_password_file),
            ("log.format", &cli.log_format),
        ];
        for (key, value) in flags {
            if let Some(v) = value {
                set_key(&mut table, key, v)?;
            }
        }
        Self::from_table(table)
    }

    /// Parse and validate a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| invalid("(file)", e.message().to_owned()))?;
        Self::from_table(table)
    }

    fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
        check_keys(&table)?;
        let config: Config = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| locate(&table, e))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks beyond the types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls_addr.is_some() && (self.tls_cert_file.is_none() || self.tls_key_file.is_none())
        {
            return Err(invalid("tls_addr", "needs tls_cert_file and tls_key_file"));
        }
        if self.wss_addr.is_some() && (self.tls_cert_file.is_none() || self.tls_key_file.is_none())
        {
            return Err(invalid("wss_addr", "needs tls_cert_file and tls_key_file"));
        }
        if self.http_tls && (self.tls_cert_file.is_none() || self.tls_key_file.is_none()) {
            return Err(invalid("http_tls", "needs tls_cert_file and tls_key_file"));
        }
        let c = &self.cluster;
        let cluster_tls = [&c.tls_cert_file, &c.tls_key_file, &c.tls_ca_file];
        if cluster_tls.iter().any(|f| f.is_some()) && !cluster_tls.iter().all(|f| f.is_some()) {
            return Err(invalid(
                "cluster.tls_cert_file",
                "cluster TLS needs all of cluster.tls_cert_file, cluster.tls_key_file and cluster.tls_ca_file",
            ));
        }
        if !self.cluster_addr.ip().is_loopback() && cluster_tls[0].is_none() && !c.allow_insecure {
            return Err(invalid(
                "cluster_addr",
                format!(
                    "{} is reachable beyond loopback and cluster TLS is off: any process that \
                     reaches it could speak Raft to this node and write to the cluster; set \
                     cluster.tls_cert_file, cluster.tls_key_file and cluster.tls_ca_file \
                     (`broker-node cluster-certs` makes them), or cluster.allow_insecure = true \
                     if every process that can reach it is trusted",
                    self.cluster_addr
                ),
            ));
        }
        if self.tls_identity_as_username != TlsIdentity::Off && self.tls_ca_file.is_none() {
            return Err(invalid(
                "tls_identity_as_username",
                "needs tls_ca_file to verify client certificates against",
            ));
        }
        if self.tls_require_client_cert != Listeners::All(false) && self.tls_ca_file.is_none() {
            return Err(invalid(
                "tls_require_client_cert",
                "needs tls_ca_file to verify client certificates against",
            ));
        }
        let m = &self.mqtt;
        // A message crosses the cluster whole, in one gRPC message of at most 64 MiB
        // (a Raft entry, a forward frame): half of it leaves room for the rest.
        if m.max_packet_size == 0 || m.max_packet_size > MAX_PACKET_SIZE {
            return Err(invalid(
                "mqtt.max_packet_size",
                "must be 1 byte to 32 MiB (a message is replicated whole, in one gRPC message \
                 of at most 64 MiB)",
            ));
        }
        if m.receive_maximum == 0 {
            return Err(invalid("mqtt.receive_maximum", "must be at least 1"));
        }
        if m.max_inflight == 0 || m.max_inflight > 65_535 {
            return Err(invalid("mqtt.max_inflight", "must be 1 to 65535"));
        }
        if m.max_qos > 2 {
            return Err(invalid("mqtt.max_qos", "must be 0, 1 or 2"));
        }
        if m.max_topic_length == 0 || m.max_topic_length > 65_535 {
            return Err(invalid("mqtt.max_topic_length", "must be 1 to 65535"));
        }
        if m.max_topic_levels == 0 {
            return Err(invalid("mqtt.max_topic_levels", "must be at least 1"));
        }
        if m.max_queued_messages == 0 {
            return Err(invalid("mqtt.max_queued_messages", "must be at least 1"));
        }
        if let Some(refs) = &m.server_references {
            parse_members(refs).map_err(|e| invalid("mqtt.server_references", e))?;
        }
        let c = &self.cluster;
        if c.election_timeout_min >= c.election_timeout_max {
            return Err(invalid(
                "cluster.election_timeout_min",
                "must be shorter than cluster.election_timeout_max",
            ));
        }
        if c.heartbeat_interval >= c.election_timeout_min {
            return Err(invalid(
                "cluster.heartbeat_interval",
                "must be shorter than cluster.election_timeout_min",
            ));
        }
        if c.batch_max_commands == 0 {
            return Err(invalid("cluster.batch_max_commands", "must be at least 1"));
        }
        if !self.initial_cluster.is_empty() {
            let mut ids = HashSet::new();
            for m in &self.initial_cluster {
                if !ids.insert(m.id) {
                    return Err(invalid(
                        "initial_cluster",
                        format!("node id {} twice", m.id),
                    ));
                }
            }
            if !ids.contains(&self.node_id) {
                return Err(invalid(
                    "initial_cluster",
                    format!("does not name this node (node_id {})", self.node_id),
                ));
            }
            if self.join.is_some() {
                return Err(invalid("join", "cannot be combined with initial_cluster"));
            }
        }
        for (key, value) in [
            ("advertise_addr", &self.advertise_addr),
            ("join", &self.join),
        ] {
            if let Some(v) = value {
                check_host_port(key, v)?;
            }
        }
        bridges::validate(&self.bridges)
    }

    /// The nodes' public MQTT addresses of `mqtt.server_references` (empty if unset).
    pub fn server_references(&self) -> Vec<ClusterMember> {
        self.mqtt
            .server_references
            .as_deref()
            .and_then(|refs| parse_members(refs).ok())
            .unwrap_or_default()
    }

    /// The address other nodes reach this node's cluster service at.
    pub fn advertise_addr(&self) -> String {
        self.advertise_addr
            .clone()
            .unwrap_or_else(|| self.cluster_addr.to_string())
    }
}

pub(crate) fn check_host_port(key: &str, v: &str) -> Result<(), ConfigError> {
    match v.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(invalid(key, format!("'{v}' is not HOST:PORT"))),
    }
}

/// The dotted key of an environment variable's name (after `FLOCKMQ_`): `DATA_DIR` →
/// `data_dir`, `MQTT__MAX_QOS` or `MQTT_MAX_QOS` → `mqtt.max_qos`.
fn env_key(name: &str) -> String {
    let key = name.to_ascii_lowercase();
    if key.contains("__") {
        return key.replace("__", ".");
    }
    if FLAG_KEYS.contains(&key.as_str()) {
        return key;
    }
    for section in ["mqtt", "log", "cluster"] {
        if let Some(rest) = key.strip_prefix(section).and_then(|r| r.strip_prefix('_')) {
            return format!("{section}.{rest}");
        }
    }
    key
}

/// Set a dotted key from a string (flag or environment), typed by the default.
fn set_key(table: &mut toml::Table, key: &str, raw: &str) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    let (section, name) = match key.split_once('.') {
        Some((s, n)) => (Some(s), n),
        None => (None, key),
    };
    let default_section = match section {
        Some(s) => defaults
            .get(s)
            .and_then(|v| v.as_table())
            .ok_or_else(|| ConfigError::UnknownKey(key.to_owned()))?,
        None => &defaults,
    };
    let known = default_section.contains_key(name)
        || FLAG_KEYS.contains(&name) && section.is_none()
        || KNOWN_OPTIONAL.contains(&key);
    if !known {
        return Err(ConfigError::UnknownKey(key.to_owned()));
    }
    let value = if key == "initial_cluster" {
        toml::Value::String(raw.to_owned())
    } else {
        match default_section.get(name) {
            Some(toml::Value::Integer(_)) => raw
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| invalid(key, format!("'{raw}' is not a whole number")))?,
            // Per-listener settings also take a list of listeners ("tls,wss").
            Some(toml::Value::Boolean(_)) if key == "tls_require_client_cert" => raw
                .parse::<bool>()
                .map(toml::Value::Boolean)
                .unwrap_or_else(|_| toml::Value::String(raw.to_owned())),
            Some(toml::Value::Boolean(_)) => raw
                .parse::<bool>()
                .map(toml::Value::Boolean)
                .map_err(|_| invalid(key, format!("'{raw}' is not true or false")))?,
            _ => toml::Value::String(raw.to_owned()),
        }
    };
    let target = match section {
        Some(s) => table
            .entry(s.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| invalid(s, "must be a table"))?,
        None => table,
    };
    target.insert(name.to_owned(), value);
    Ok(())
}

/// Keys whose default is empty (absent from the serialized defaults).
const KNOWN_OPTIONAL: &[&str] = &[
    "tls_addr",
    "wss_addr",
    "advertise_addr",
    "join",
    "api_token",
    "api_password_file",
    "mqtt.server_keep_alive",
    "mqtt.max_session_expiry",
    "mqtt.server_references",
    "log.level",
    "cluster.tls_cert_file",
    "cluster.tls_key_file",
    "cluster.tls_ca_file",
    "cluster.tls_server_name",
];

/// Reject keys no setting has, naming the first one.
fn check_keys(table: &toml::Table) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    for (k, v) in table {
        let known_top = defaults.contains_key(k) || FLAG_KEYS.contains(&k.as_str());
        if !known_top {
            return Err(ConfigError::UnknownKey(k.clone()));
        }
        if let (Some(sub), Some(def)) = (v.as_table(), defaults.get(k).and_then(|d| d.as_table())) {
            for key in sub.keys() {
                let dotted = format!("{k}.{key}");
                if !def.contains_key(key) && !KNOWN_OPTIONAL.contains(&dotted.as_str()) {
                    return Err(ConfigError::UnknownKey(dotted));
                }
            }
        }
    }
    Ok(())
}

/// Turn a serde error into one naming the dotted key it is about.
fn locate(table: &toml::Table, e: toml::de::Error) -> ConfigError {
    let message = e.message().to_owned();
    // Find the key by trying each one alone on top of the defaults.
    for (k, v) in table {
        let candidates: Vec<(String, toml::Table)> = match v.as_table() {
            Some(sub) => sub
                .iter()
                .map(|(sk, sv)| {
                    let mut inner = toml::Table::new();
                    inner.insert(sk.clone(), sv.clone());
                    let mut t = toml::Table::new();
                    t.insert(k.clone(), toml::Value::Table(inner));
                    (format!("{k}.{sk}"), t)
                })
                .collect(),
            None => {
                let mut t = toml::Table::new();
                t.insert(k.clone(), v.clone());
                vec![(k.clone(), t)]
            }
        };
        for (dotted, t) in candidates {
            if toml::Value::Table(t).try_into::<Config>().is_err() {
                return invalid(&dotted, message);
            }
        }
    }
    invalid("(file)", message)
}

/// Parse a human size: `1MiB`, `512KiB`, `64MB`, `1GiB`, `1024`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" | "k" => 1024,
        "mb" => 1000 * 1000,
        "mib" | "m" => 1024 * 1024,
        "gb" => 1000 * 1000 * 1000,
        "gib" | "g" => 1024 * 1024 * 1024,
        other => return Err(format!("unknown size unit '{other}'")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Write a size the way a person would.
fn format_size(n: u64) -> String {
    for (unit, m) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= m && n % m == 0 {
            return format!("{}{unit}", n / m);
        }
    }
    n.to_string()
}

/// A duration as one unit ("1600ms", "10s", "2h") rather than humantime's
/// "1s 600ms", which reads well but is not what anyone would type.
fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if d.subsec_nanos() % 1_000_000 != 0 {
        humantime::format_duration(d).to_string()
    } else if ms == 0 {
        "0s".to_owned()
    } else if ms % 1000 != 0 {
        format!("{ms}ms")
    } else {
        let secs = ms / 1000;
        match secs {
            s if s % 3600 == 0 => format!("{}h", s / 3600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    }
}

pub(crate) mod dur {
    use super::*;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| de::Error::custom(format!("'{s}': {e}")))
    }
}

mod opt_dur {
    use super::*;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_str(""),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(None);
        }
        humantime::parse_duration(&s)
            .map(Some)
            .map_err(|e| de::Error::custom(format!("'{s}': {e}")))
    }
}

mod size32 {
    use super::*;
    pub fn serialize<S: serde::Serializer>(n: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(u64::from(*n)))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let v = size_value(d)?;
        u32::try_from(v).map_err(|_| de::Error::custom(format!("{v} is too large")))
    }
}

mod size64 {
    use super::*;
    pub fn serialize<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size(*n))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        size_value(d)
    }
}

/// A size given as a number of bytes or as a string with a unit.
fn size_value<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(n),
        Raw::S(s) => parse_size(&s).map_err(de::Error::custom),
    }
}

mod opt_addr {
    use super::*;
    pub fn serialize<S: serde::Serializer>(
        a: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.serialize_str(&a.to_string()),
            None => s.serialize_str("off"),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() || s == "off" {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|_| de::Error::custom(format!("'{s}' is not an IP:PORT address or off")))
    }
}

pub(crate) mod opt_string {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_deref().unwrap_or(""))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let s = String::deserialize(d)?;
        Ok((!s.is_empty()).then_some(s))
    }
}

mod opt_u16 {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &Option<u16>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u16(*n),
            None => s.serialize_str(""),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u16),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Some(n)),
            Raw::S(s) if s.is_empty() => Ok(None),
            Raw::S(s) => s
                .parse()
                .map(Some)
                .map_err(|_| de::Error::custom(format!("'{s}' is not 0 to 65535"))),
        }
    }
}

/// `initial_cluster` as a list of tables or as the flag's `ID=HOST:PORT,...` string.
fn de_members<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ClusterMember>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        S(String),
        L(Vec<ClusterMember>),
    }
    match Raw::deserialize(d)? {
        Raw::L(l) => Ok(l),
        Raw::S(s) => parse_members(&s).map_err(de::Error::custom),
    }
}

/// Parse `ID=HOST:PORT,ID=HOST:PORT`.
pub fn parse_members(s: &str) -> Result<Vec<ClusterMember>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (id, addr) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}' is not ID=HOST:PORT"))?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| format!("'{id}' is not a node id"))?;
            check_host_port("initial_cluster", addr).map_err(|e| e.to_string())?;
            Ok(ClusterMember {
                id,
                addr: addr.trim().to_owned(),
            })
        })
        .collect()
}

/// The documented defaults as TOML, with each setting's explanation above it.
pub fn default_config_toml() -> String {
    let docs = field_docs();
    let table = toml::Table::try_from(Config::default()).unwrap_or_default();
    let mut out = String::from(
        "# FlockMQ configuration: every setting with its default.\n\
         # Precedence: this file < FLOCKMQ_ environment variables < command-line flags.\n\
         # Printed by `broker-node print-default-config`.\n",
    );
    let write_entries = |out: &mut String, prefix: &str, t: &toml::Table| {
        for (k, v) in t {
            if v.is_table() || k == "bridges" {
                continue;
            }
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if let Some(doc) = docs.iter().find(|(name, _)| *name == key) {
                let _ = writeln!(out, "\n# {}", doc.1);
            }
            let value = match (key.as_str(), v) {
                ("initial_cluster", toml::Value::Array(a)) if a.is_empty() => "\"\"".to_owned(),
                _ => v.to_string(),
            };
            let _ = writeln!(out, "{k} = {value}");
        }
    };
    write_entries(&mut out, "", &table);
    for key in [
        "tls_addr",
        "wss_addr",
        "advertise_addr",
        "join",
        "api_token",
        "api_password_file",
    ] {
        if !table.contains_key(key) {
            if let Some(doc) = docs.iter().find(|(name, _)| *name == key) {
                let _ = writeln!(out, "\n# {}\n{key} = \"\"", doc.1);
            }
        }
    }
    for section in ["mqtt", "log", "cluster"] {
        if let Some(t) = table.get(section).and_then(|v| v.as_table()) {
            let _ = writeln!(out, "\n[{section}]");
            write_entries(&mut out, section, t);
        }
    }
    out.push_str(bridges::EXAMPLE);
    out
}

/// Each key's explanation (the same words as the fields' documentation).
fn field_docs() -> Vec<(&'static str, &'static str)> {
    vec![
        ("node_id", "This node's id in the cluster; unique per cluster."),
        ("data_dir", "Where the Raft log, snapshots and state live."),
        ("mqtt_addr", "MQTT over TCP."),
        ("ws_addr", "MQTT over WebSocket (path /mqtt), e.g. 127.0.0.1:8083; \"off\" disables it."),
        ("tls_addr", "MQTT over TLS, e.g. 127.0.0.1:8883; \"off\" disables it. Needs tls_cert_file and tls_key_file."),
        ("tls_cert_file", "The server certificate chain (PEM) of the TLS listener."),
        ("tls_key_file", "The private key (PEM: PKCS#8, PKCS#1 or SEC1) of the TLS listener."),
        ("tls_ca_file", "CA certificates (PEM) that client certificates are verified against; empty accepts no client certificates."),
        ("tls_require_client_cert", "Whether a TLS client must present a certificate signed by tls_ca_file: true, false, or the listeners that require one, [\"tls\"] or [\"wss\"]."),
        ("tls_identity_as_username", "What a TLS client's certificate stands for: \"off\" (nothing: the CONNECT's username and password count), \"cn\" (its subject common name is the username and no password is asked) or \"san\" (its first DNS, e-mail or URI subject alternative name is). With \"cn\" or \"san\", TLS clients without a certificate are refused."),
        ("wss_addr", "MQTT over secure WebSocket (path /mqtt), e.g. 127.0.0.1:8084; \"off\" disables it. Uses tls_cert_file and tls_key_file."),
        ("http_addr", "HTTP: /metrics, /healthz, /readyz and the admin API."),
        ("http_tls", "Serve http_addr as HTTPS, with tls_cert_file and tls_key_file (reloaded on SIGHUP like the MQTT listeners')."),
        ("cluster_addr", "Cluster gRPC (Raft and forwarding)."),
        ("advertise_addr", "The host:port other nodes reach this node's cluster address at; empty means cluster_addr."),
        ("initial_cluster", "The voters a fresh cluster starts with (ID=HOST:PORT each, comma separated); empty for a single node."),
        ("join", "The cluster address of a running node to join; empty for none."),
        ("api_token", "The bearer token the admin API (/api/v1) requires; with neither it nor api_password_file set, the API answers only requests from loopback addresses."),
        ("api_password_file", "A Mosquitto-format password file whose users may call the admin API with HTTP basic auth (alone or besides api_token); empty for none."),
        ("mqtt.max_packet_size", "Largest packet accepted (and announced in CONNACK), at most 32 MiB (a message is replicated whole in one gRPC message)."),
        ("mqtt.max_connections", "Most client connections at once on this node (0: unlimited)."),
        ("mqtt.connect_timeout", "How long a new connection may take to send CONNECT."),
        ("mqtt.park_after", "How long a plain-TCP or TLS connection must be idle before it is parked: its task and buffers are given up and the socket (and TLS session) waits in the node's parking lot until the client sends something or a message arrives for it; a connection that has sent nothing since its CONNECT parks after 200 ms if that is sooner (\"0s\": never)."),
        ("mqtt.server_keep_alive", "A keep alive imposed on v5 clients (Server Keep Alive); empty honours the client's."),
        ("mqtt.max_keep_alive", "The longest keep alive a client may ask for, in seconds."),
        ("mqtt.receive_maximum", "Unacknowledged QoS 1/2 publishes a client may send at once (v5 Receive Maximum)."),
        ("mqtt.max_inflight", "Unacknowledged QoS 1/2 messages the broker sends a client at once (capped by the client's Receive Maximum)."),
        ("mqtt.max_queued_messages", "Messages queued per session (offline, or waiting for room in flight)."),
        ("mqtt.max_queued_bytes", "Bytes queued per session."),
        ("mqtt.max_sessions", "Most sessions in the cluster (every node holds them all); a CONNECT for one more is refused with Quota exceeded / Server unavailable (0: no limit)."),
        ("mqtt.max_retained_messages", "Most retained messages; a publish retaining one on a new topic beyond it is refused with Quota exceeded / dropped (0: no limit)."),
        ("mqtt.max_node_queued_bytes", "Most bytes in all persistent queues together (each queue counting its messages); beyond it messages for offline sessions are dropped (0: no limit)."),
        ("mqtt.queue_full_policy", "drop_oldest or drop_newest, when a session's queue is full."),
        ("mqtt.max_topic_length", "Longest topic name or filter, in bytes."),
        ("mqtt.max_topic_levels", "Most levels in a topic name or filter."),
        ("mqtt.max_subscriptions_per_client", "Most subscriptions per client (0: unlimited)."),
        ("mqtt.topic_alias_maximum", "Topic aliases a v5 client may use towards the broker."),
        ("mqtt.outbound_topic_alias_maximum", "Topic aliases the broker assigns towards a v5 client that allows them (least recently used first to go; 0: none)."),
        ("mqtt.max_qos", "Highest QoS the broker grants (0, 1 or 2)."),
        ("mqtt.retain_available", "Whether retained messages are supported."),
        ("mqtt.wildcard_subscription_available", "Whether wildcard subscriptions are allowed."),
        ("mqtt.subscription_identifier_available", "Whether subscription identifiers are supported."),
        ("mqtt.shared_subscription_available", "Whether shared subscriptions are supported."),
        ("mqtt.shared_subscription_strategy", "round_robin, random, sticky, hash_client_id, hash_topic or local_first."),
        ("mqtt.shared_redistribute_after", "How long a persistent member of a shared group may be offline before the messages queued for it as the group's member go to connected members of the group (\"0s\": they wait for it until its session expires)."),
        ("mqtt.max_session_expiry", "The longest session expiry granted; empty for no cap."),
        ("mqtt.allow_anonymous", "Whether clients may connect without credentials: true, false, \"auto\" (as Mosquitto 2 does: allowed while every MQTT listener is on a loopback address, refused once one binds beyond it), or the listeners that allow it, e.g. [\"tcp\", \"ws\"] (FLOCKMQ_MQTT__ALLOW_ANONYMOUS=tcp,ws)."),
        ("mqtt.password_file", "A Mosquitto-format password file (username:$7$... lines, as written by `broker-node passwd` or mosquitto_passwd); empty for none. Reloaded on SIGHUP."),
        ("mqtt.acl_file", "A Mosquitto-format ACL file (user / topic / pattern lines); empty lets every client publish and subscribe anywhere. Reloaded on SIGHUP."),
        ("mqtt.sys_interval", "How often $SYS topics are published; 0s disables them."),
        ("mqtt.durable_sessions", "Acknowledge QoS 1/2 publishes to persistent sessions only once they are committed to disk (true), or deliver to connected ones from memory (false: faster, a crash of their node loses messages in flight)."),
        ("mqtt.server_references", "Every node's public MQTT address, ID=HOST:PORT comma separated (the same list on every node): a v5 client that a node cut off from the majority cannot serve gets 0x9C Use another server with the address of the node it last knew leading (or another); empty: 0x88 Server unavailable. v3 clients get 3."),
        ("log.format", "human or json."),
        ("log.level", "A tracing filter used when RUST_LOG is not set (e.g. \"info,broker_node=debug\"); empty means info."),
        ("cluster.heartbeat_interval", "How often the leader sends heartbeats."),
        ("cluster.election_timeout_min", "Shortest election timeout."),
        ("cluster.election_timeout_max", "Longest election timeout."),
        ("cluster.snapshot_after_logs", "Log entries between snapshots."),
        ("cluster.batch_max_commands", "Most commands in one Raft entry."),
        ("cluster.batch_max_delay", "Longest a command waits for others to share its Raft entry."),
        ("cluster.forward_buffer_messages", "Messages buffered per peer for forwarding."),
        ("cluster.write_timeout", "How long a control-plane write may wait for a majority before the client is refused (v5 0x88)."),
        ("cluster.tls_cert_file", "This node's certificate (PEM) for the cluster's gRPC, server and client side; with tls_key_file and tls_ca_file set, nodes speak mutually authenticated TLS (every node must, and each presents a certificate signed by tls_ca_file). The three files are reloaded on SIGHUP: new cluster connections, accepted and opened, use them; established ones carry on."),
        ("cluster.tls_key_file", "The private key (PEM) of cluster.tls_cert_file."),
        ("cluster.tls_ca_file", "The CA (PEM) every node's certificate must be signed by."),
        ("cluster.tls_server_name", "The name every node's certificate holds, checked instead of the host of the address a node is reached at (so that one certificate may serve every node); empty checks that host."),
        ("cluster.autoclean_after", "How long the leader tolerates not reaching a node before it removes it from the cluster (a scaled-down or lost node); a removed node that runs again asks to be added back. 0s disables both (membership changes only by hand)."),
        ("cluster.allow_insecure", "Whether the cluster address may be served beyond loopback without cluster TLS; without it such a node refuses to start. Only on a network where every process that can reach the port is trusted."),
        ("cluster.node_lost_after", "How long the leader tolerates not reaching a node before it ends the sessions connected there, as if their connections broke (wills are published, persistent sessions start to expire and queue); 0s disables it."),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn printed_defaults_parse_back_to_the_defaults() {
        let text = default_config_toml();
        assert_eq!(Config::from_toml(&text).unwrap(), Config::default());
        assert!(
            text.contains("\n# Largest packet accepted"),
            "keys are documented"
        );
    }

    #[test]
    fn sizes_and_durations_are_human() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("64MB"), Ok(64_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("12 parsecs").is_err());
        let c = Config::from_toml(
            "[mqtt]\nmax_packet_size = \"256KiB\"\nconnect_timeout = \"2s\"\n[cluster]\nbatch_max_delay = \"500us\"",
        )
        .unwrap();
        assert_eq!(c.mqtt.max_packet_size, 256 * 1024);
        assert_eq!(c.mqtt.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.cluster.batch_max_delay, Duration::from_micros(500));
    }

    #[test]
    fn file_is_overridden_by_env_which_is_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            "data_dir = \"/file\"\nnode_id = 3\n[mqtt]\nmax_qos = 1\n",
        )
        .unwrap();
        let c = Config::load(Some(&path), env(&[]), &RunArgs::default()).unwrap();
        assert_eq!(
            (c.data_dir.to_str(), c.node_id, c.mqtt.max_qos),
            (Some("/file"), 3, 1)
        );
        let e = env(&[("FLOCKMQ_DATA_DIR", "/env"), ("FLOCKMQ_MQTT__MAX_QOS", "0")]);
        let c = Config::load(Some(&path), e.clone(), &RunArgs::default()).unwrap();
        assert_eq!((c.data_dir.to_str(), c.mqtt.max_qos), (Some("/env"), 0));
        let flags = RunArgs {
            data_dir: Some("/flag".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&path), e, &flags).unwrap();
        assert_eq!(c.data_dir.to_str(), Some("/flag"));
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_eq!(
            Config::from_toml("[mqtt]\nmax_packet_sise = 10").unwrap_err(),
            ConfigError::UnknownKey("mqtt.max_packet_sise".into())
        );
        assert_eq!(
            Config::from_toml("nodeid = 1").unwrap_err(),
            ConfigError::UnknownKey("nodeid".into())
        );
        let e = Config::load(
            None,
            env(&[("FLOCKMQ_MQTT__NOPE", "1")]),
            &RunArgs::default(),
        );
        assert_eq!(e.unwrap_err(), ConfigError::UnknownKey("mqtt.nope".into()));
        // ctl's own variables live beside the node's in a container's environment.
        let c = Config::load(
            None,
            env(&[
                ("FLOCKMQ_CTL_USER", "ops:pw"),
                ("FLOCKMQ_API_PASSWORD_FILE", "/p"),
            ]),
            &RunArgs::default(),
        )
        .unwrap();
        assert_eq!(c.api_password_file.as_deref(), Some("/p"));
    }

    #[test]
    fn anonymous_access_follows_mosquitto_2_unless_set() {
        let load = |pairs: &[(&str, &str)]| {
            Config::load(None, env(pairs), &RunArgs::default())
                .unwrap()
                .anonymous_allowed_on("tcp")
        };
        assert!(load(&[]), "loopback only: allowed");
        assert!(!load(&[("FLOCKMQ_MQTT_ADDR", "0.0.0.0:1883")]));
        assert!(!load(&[("FLOCKMQ_WS_ADDR", "192.0.2.1:8083")]));
        assert!(load(&[
            ("FLOCKMQ_MQTT_ADDR", "0.0.0.0:1883"),
            ("FLOCKMQ_MQTT__ALLOW_ANONYMOUS", "true")
        ]));
        assert!(!load(&[("FLOCKMQ_MQTT__ALLOW_ANONYMOUS", "false")]));
        let c = Config::from_toml("[mqtt]\nallow_anonymous = \"auto\"").unwrap();
        assert!(c.anonymous_allowed_on("ws"));
        // Per listener, from a file or a variable.
        let c = Config::from_toml("[mqtt]\nallow_anonymous = [\"tcp\", \"ws\"]").unwrap();
        let on: Vec<bool> = LISTENERS
            .iter()
            .map(|l| c.anonymous_allowed_on(l))
            .collect();
        assert_eq!(on, [true, false, true, false]);
        let c = Config::load(
            None,
            env(&[("FLOCKMQ_MQTT__ALLOW_ANONYMOUS", "tcp,ws")]),
            &RunArgs::default(),
        )
        .unwrap();
        assert_eq!(
            c.mqtt.allow_anonymous,
            Anonymous::Set(Listeners::Only(vec!["tcp".into(), "ws".into()]))
        );
        let e = Config::from_toml("[mqtt]\nallow_anonymous = [\"tcp\", \"udp\"]").unwrap_err();
        assert!(e.to_string().contains("udp"), "{e}");
        let e = Config::from_toml("[mqtt]\nallow_anonymous = \"sometimes\"").unwrap_err();
        assert!(e.to_string().contains("mqtt.allow_anonymous"), "{e}");
    }

    #[test]
    fn a_packet_size_the_cluster_cannot_replicate_is_refused() {
        Config::from_toml("[mqtt]\nmax_packet_size = \"32MiB\"").expect("32 MiB replicates");
        let e = Config::from_toml("[mqtt]\nmax_packet_size = \"33MiB\"").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { key, .. } if key == "mqtt.max_packet_size"),
            "{e}"
        );
    }

    #[test]
    fn invalid_values_name_their_key() {
        let e = Config::from_toml("[mqtt]\nmax_packet_size = \"lots\"").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { key, .. } if key == "mqtt.max_packet_size"),
            "{e}"
        );
        let e = Config::from_toml("mqtt_addr = \"nowhere\"").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { key, .. } if key == "mqtt_addr"),
            "{e}"
        );
        let e = Config::from_toml("[mqtt]\nmax_qos = 3").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { key, .. } if key == "mqtt.max_qos"),
            "{e}"
        );
        let e = Config::from_toml("[mqtt]\nserver_references = \"mqtt1:1883\"").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { key, .. } if key == "mqtt.server_references"),
            "{e}"
        );
        let refs = Config::load(
            None,
            env(&[(
                "FLOCKMQ_MQTT__SERVER_REFERENCES",
                "1=mqtt1:1883,2=10.0.0.2:1883",
            )]),
            &RunArgs::default(),
        )
        .expect("a list of ID=HOST:PORT");
        assert_eq!(refs.server_references().len(), 2);
        assert_eq!(refs.server_references()[1].addr, "10.0.0.2:1883");
        let e =
            Config::load(None, env(&[("FLOCKMQ_NODE_ID", "x")]), &RunArgs::default()).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { key, .. } if key == "node_id"),
            "{e}"
        );
    }

    #[test]
    fn a_cluster_address_beyond_loopback_needs_tls_or_allow_insecure() {
        // `broker-node` with no arguments: a single node whose cluster port is loopback.
        let default = Config::default();
        assert!(default.cluster_addr.ip().is_loopback());
        assert_eq!(default.validate(), Ok(()));
        let open = |extra: &[(&str, &str)]| {
            let mut vars = vec![("FLOCKMQ_CLUSTER_ADDR", "0.0.0.0:7000")];
            vars.extend_from_slice(extra);
            Config::load(None, env(&vars), &RunArgs::default())
        };
        let e = open(&[]).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { key, reason } if key == "cluster_addr"
                && reason.contains("cluster.allow_insecure = true")
                && reason.contains("cluster.tls_cert_file")),
            "{e}"
        );
        assert!(open(&[("FLOCKMQ_CLUSTER__ALLOW_INSECURE", "true")]).is_ok());
        let tls = [
            ("FLOCKMQ_CLUSTER__TLS_CERT_FILE", "/etc/flockmq/node.pem"),
            ("FLOCKMQ_CLUSTER__TLS_KEY_FILE", "/etc/flockmq/node.key"),
            ("FLOCKMQ_CLUSTER__TLS_CA_FILE", "/etc/flockmq/ca.pem"),
        ];
        assert!(open(&tls).is_ok());
        let e = Config::from_toml("cluster_addr = \"10.1.2.3:7000\"").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Invalid { key, .. } if key == "cluster_addr"),
            "{e}"
        );
    }

    #[test]
    fn initial_cluster_parses_and_must_name_this_node() {
        let flags = RunArgs {
            node_id: Some("2".into()),
            initial_cluster: Some("1=node1:7000,2=node2:7000,3=10.0.0.3:7000".into()),
            ..Default::default()
        };
        let c = Config::load(None, env(&[]), &flags).unwrap();
        assert_eq!(c.initial_cluster.len(), 3);
        assert_eq!(
            c.initial_cluster[1],
            ClusterMember {
                id: 2,
                addr: "node2:7000".into()
            }
        );
        let flags = RunArgs {
            node_id: Some("4".into()),
            ..flags
        };
        assert!(Config::load(None, env(&[]), &flags).is_err());
        assert!(parse_members("1=node1").is_err());
        assert!(parse_members("x=node1:1").is_err());
    }

    #[test]
    fn listeners_can_be_turned_off() {
        let flags = RunArgs {
            ws_addr: Some("off".into()),
            ..Default::default()
        };
        assert_eq!(Config::load(None, env(&[]), &flags).unwrap().ws_addr, None);
    }
}
