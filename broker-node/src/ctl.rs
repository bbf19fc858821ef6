//! `broker-node ctl`: the admin API from the command line, one subcommand per
//! endpoint (like `emqx ctl` or `vmq-admin`). Output is a table by default and the
//! API's JSON with `--json`.
//!
//! The node is found at `--url` (default: `http://` + `FLOCKMQ_HTTP_ADDR`, else
//! `http://127.0.0.1:8080`); the token comes from `--token` or `FLOCKMQ_API_TOKEN`,
//! the same variable the node reads, and basic-auth credentials (a user of the node's
//! `api_password_file`) from `--user USER:PASSWORD` or `FLOCKMQ_CTL_USER`. An
//! `https://` URL is verified against the system's roots, or the CA certificates of
//! `--cacert FILE` (`FLOCKMQ_CTL_CACERT`) for a node with its own CA.

use base64::Engine;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// `broker-node ctl ...`
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The node's HTTP address.
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// The admin API's bearer token.
    #[arg(long, global = true, env = "FLOCKMQ_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Basic-auth credentials, USER:PASSWORD (a user of the node's api_password_file).
    #[arg(long, global = true, env = "FLOCKMQ_CTL_USER", hide_env_values = true)]
    pub user: Option<String>,
    /// PEM CA certificates to verify an https:// node with (else the system's roots).
    #[arg(long, global = true, env = "FLOCKMQ_CTL_CACERT")]
    pub cacert: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// What to ask the node.
#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Cluster status and membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Connected clients.
    #[command(subcommand)]
    Clients(ClientsCmd),
    /// Sessions, connected or not.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Subscriptions.
    #[command(subcommand)]
    Subscriptions(SubscriptionsCmd),
    /// Retained messages.
    #[command(subcommand)]
    Retained(RetainedCmd),
    /// The configured bridges: running here (bridges run on the leader), connected,
    /// messages and bytes each way, queue depth, reconnects.
    Bridges,
    /// This node's log filter.
    #[command(subcommand)]
    Log(LogCmd),
    /// Exit 0 when the node is ready (`GET /readyz` answers 200), else print why
    /// and exit 1: for container health checks.
    Health,
    /// Publish a message as the broker.
    Publish {
        /// Topic name.
        topic: String,
        /// Payload (text).
        payload: String,
        /// QoS 0, 1 or 2.
        #[arg(long, default_value_t = 0)]
        qos: u8,
        /// Set the RETAIN flag.
        #[arg(long)]
        retain: bool,
    },
}

/// `ctl cluster ...`
#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Leader, term, applied index, digest and members.
    Status {
        /// Exit 1 unless a leader is known and the members are exactly N voters (the
        /// leader among them): for `helm test` and scripts.
        #[arg(long, value_name = "N")]
        expect_voters: Option<usize>,
    },
    /// Add node ID at cluster address ADDR (HOST:PORT).
    Join {
        /// The new node's id.
        id: u64,
        /// Its cluster address.
        addr: String,
    },
    /// Take the node answering at --url out of the cluster.
    Leave,
    /// Take node ID out of the cluster (e.g. a dead one).
    Remove {
        /// The node to remove.
        id: u64,
    },
    /// Have the node answering at --url build a Raft snapshot of its state now (before
    /// a node joins, or to shorten the log on disk); waits until it is built.
    Snapshot,
}

/// `ctl log ...`
#[derive(Subcommand, Debug)]
pub enum LogCmd {
    /// Print the node's log filter, or set it (e.g. `debug`, or
    /// `info,broker_node::cluster=debug`) without a restart.
    Level {
        /// The new filter; without it, the one in force is printed.
        filter: Option<String>,
    },
}

/// `ctl clients ...`
#[derive(Subcommand, Debug)]
pub enum ClientsCmd {
    /// List connected clients.
    List {
        /// Only clients on this node.
        #[arg(long)]
        node: Option<u64>,
    },
    /// One client with its subscriptions.
    Show {
        /// Client id.
        id: String,
    },
    /// Close a client's connection (v5 0x98), wherever it is connected.
    Kick {
        /// Client id.
        id: String,
    },
}

/// `ctl sessions ...`
#[derive(Subcommand, Debug)]
pub enum SessionsCmd {
    /// List every session.
    List,
    /// One session.
    Show {
        /// Client id.
        id: String,
    },
}

/// `ctl subscriptions ...`
#[derive(Subcommand, Debug)]
pub enum SubscriptionsCmd {
    /// List subscriptions.
    List {
        /// Only this client's.
        #[arg(long)]
        client: Option<String>,
    },
}

/// `ctl retained ...`
#[derive(Subcommand, Debug)]
pub enum RetainedCmd {
    /// List retained messages.
    List,
    /// One retained message with its payload.
    Show {
        /// Topic.
        topic: String,
    },
    /// Clear a retained message.
    Delete {
        /// Topic.
        topic: String,
    },
}

/// Everything that can go wrong, as the message to print.
pub type CtlError = String;

/// Run one ctl command; returns what to print.
pub fn run(args: &CtlArgs) -> Result<String, CtlError> {
    let base = base_url(args.url.as_deref());
    let client = Client {
        agent: agent(args.cacert.as_deref())?,
        base,
        token: args.token.clone().filter(|t| !t.is_empty()),
        user: args.user.clone().filter(|u| !u.is_empty()),
    };
    let (value, columns): (Value, &[&str]) = match &args.command {
        CtlCommand::Cluster(ClusterCmd::Status { expect_voters }) => {
            let v = client.call("GET", "/cluster", None)?;
            let out = if args.json {
                pretty(&v)
            } else {
                cluster_table(&v)
            };
            if let Some(n) = expect_voters {
                check_voters(&v, *n).map_err(|why| format!("{why}\n{out}"))?;
            }
            return Ok(out);
        }
        CtlCommand::Cluster(ClusterCmd::Join { id, addr }) => (
            client.call(
                "POST",
                "/cluster/join",
                Some(json!({ "id": id, "addr": addr })),
            )?,
            &[],
        ),
        CtlCommand::Cluster(ClusterCmd::Leave) => {
            (client.call("POST", "/cluster/leave", Some(json!({})))?, &[])
        }
        CtlCommand::Cluster(ClusterCmd::Snapshot) => (
            client.call("POST", "/cluster/snapshot", Some(json!({})))?,
            &[],
        ),
        CtlCommand::Cluster(ClusterCmd::Remove { id }) => (
            client.call("DELETE", &format!("/cluster/members/{id}"), None)?,
            &[],
        ),
        CtlCommand::Log(LogCmd::Level { filter }) => {
            let v = match filter {
                Some(f) => client.call("PUT", "/log/level", Some(json!({ "level": f })))?,
                None => client.call("GET", "/log/level", None)?,
            };
            if args.json {
                return Ok(pretty(&v));
            }
            return Ok(format!("{}\n", cell(&v["level"])));
        }
        CtlCommand::Clients(ClientsCmd::List { node }) => {
            let path = match node {
                Some(n) => format!("/clients?limit=10000&node={n}"),
                None => "/clients?limit=10000".to_owned(),
            };
            (client.call("GET", &path, None)?, SESSION_COLUMNS)
        }
        CtlCommand::Clients(ClientsCmd::Show { id })
        | CtlCommand::Sessions(SessionsCmd::Show { id }) => (
            client.call("GET", &format!("/sessions/{}", encode(id)), None)?,
            &[],
        ),
        CtlCommand::Clients(ClientsCmd::Kick { id }) => {
            client.call("DELETE", &format!("/clients/{}", encode(id)), None)?;
            (json!({ "message": format!("client {id} kicked") }), &[])
        }
        CtlCommand::Sessions(SessionsCmd::List) => (
            client.call("GET", "/sessions?limit=10000", None)?,
            SESSION_COLUMNS,
        ),
        CtlCommand::Subscriptions(SubscriptionsCmd::List { client: who }) => {
            let path = match who {
                Some(c) => format!("/subscriptions?limit=10000&clientid={}", encode(c)),
                None => "/subscriptions?limit=10000".to_owned(),
            };
            (
                client.call("GET", &path, None)?,
                &["clientid", "topic", "qos", "nl", "rap", "rh", "subid"],
            )
        }
        CtlCommand::Retained(RetainedCmd::List) => (
            client.call("GET", "/retained?limit=10000", None)?,
            &[
                "topic",
                "qos",
                "payload_size",
                "from_clientid",
                "publish_at",
            ],
        ),
        CtlCommand::Retained(RetainedCmd::Show { topic }) => (
            client.call("GET", &format!("/retained/{}", encode_topic(topic)), None)?,
            &[],
        ),
        CtlCommand::Retained(RetainedCmd::Delete { topic }) => {
            client.call(
                "DELETE",
                &format!("/retained/{}", encode_topic(topic)),
                None,
            )?;
            (
                json!({ "message": format!("retained message on {topic} cleared") }),
                &[],
            )
        }
        CtlCommand::Bridges => (
            client.call("GET", "/bridges", None)?,
            &[
                "name",
                "address",
                "running",
                "connected",
                "messages_out",
                "messages_in",
                "bytes_out",
                "bytes_in",
                "queued",
                "reconnects",
                "last_error",
            ],
        ),
        CtlCommand::Health => {
            return health(&client.agent, client.base.trim_end_matches("/api/v1"))
        }
        CtlCommand::Publish {
            topic,
            payload,
            qos,
            retain,
        } => (
            client.call(
                "POST",
                "/publish",
                Some(json!({ "topic": topic, "payload": payload, "qos": qos, "retain": retain })),
            )?,
            &[],
        ),
    };
    if args.json {
        return Ok(pretty(&value));
    }
    if !columns.is_empty() {
        let rows = value["data"].as_array().cloned().unwrap_or_default();
        return Ok(table(columns, &rows));
    }
    Ok(match value.get("message").and_then(Value::as_str) {
        Some(m) => format!("{m}\n"),
        None => pretty(&value),
    })
}

/// `GET /readyz`: Ok when the node is ready.
fn health(agent: &ureq::Agent, root: &str) -> Result<String, CtlError> {
    let url = format!("{root}/readyz");
    match agent
        .get(&url)
        .timeout(std::time::Duration::from_secs(3))
        .call()
    {
        Ok(r) => Ok(r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(_, r)) => {
            Err(r.into_string().unwrap_or_default().trim().to_owned())
        }
        Err(e) => Err(format!("cannot reach {url}: {e}")),
    }
}

const SESSION_COLUMNS: &[&str] = &[
    "clientid",
    "node",
    "connected",
    "proto_ver",
    "subscriptions_cnt",
    "mqueue_len",
    "expiry_interval",
];

fn base_url(url: Option<&str>) -> String {
    let raw = match url {
        Some(u) => u.to_owned(),
        None => std::env::var("FLOCKMQ_HTTP_ADDR")
            .ok()
            .map(|a| a.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]"))
            .unwrap_or_else(|| "127.0.0.1:8080".to_owned()),
    };
    let with_scheme = if raw.contains("://") {
        raw
    } else {
        format!("http://{raw}")
    };
    format!("{}/api/v1", with_scheme.trim_end_matches('/'))
}

/// Percent-encode one path segment.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Percent-encode a topic, keeping its `/` separators as path separators.
fn encode_topic(topic: &str) -> String {
    topic.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// An HTTP agent that verifies https:// nodes against `cacert`'s certificates, or the
/// system's roots without it.
fn agent(cacert: Option<&str>) -> Result<ureq::Agent, CtlError> {
    let mut roots = rustls::RootCertStore::empty();
    match cacert {
        Some(path) => {
            for cert in crate::transport::tls::certs(path).map_err(|e| format!("{e:#}"))? {
                roots
                    .add(cert)
                    .map_err(|e| format!("bad CA certificate in {path}: {e}"))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(ureq::AgentBuilder::new()
        .tls_config(std::sync::Arc::new(tls))
        .build())
}

struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    user: Option<String>,
}

impl Client {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, CtlError> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .agent
            .request(method, &url)
            .timeout(std::time::Duration::from_secs(130));
        if let Some(t) = &self.token {
            request = request.set("Authorization", &format!("Bearer {t}"));
        } else if let Some(user) = &self.user {
            let credentials = base64::engine::general_purpose::STANDARD.encode(user);
            request = request.set("Authorization", &format!("Basic {credentials}"));
        }
        let response = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        match response {
            Ok(r) if r.status() == 204 => Ok(Value::Null),
            Ok(r) => r
                .into_json::<Value>()
                .map_err(|e| format!("{url}: unreadable answer: {e}")),
            Err(ureq::Error::Status(code, r)) => {
                let body: Value = r.into_json().unwrap_or(Value::Null);
                let message = body
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("no details");
                Err(format!("{method} {url}: {code}: {message}"))
            }
            Err(e) => Err(format!("cannot reach {url}: {e}")),
        }
    }
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Rows as aligned columns.
fn table(columns: &[&str], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |values: Vec<&str>| -> String {
        let mut l = values
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(columns.to_vec());
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Whether the status `v` shows a leader and exactly `n` members, every one a voter.
fn check_voters(v: &Value, n: usize) -> Result<(), String> {
    if v["leader"].is_null() {
        return Err("no leader is known".to_owned());
    }
    let members = v["members"].as_array().cloned().unwrap_or_default();
    let voters = members
        .iter()
        .filter(|m| matches!(m["role"].as_str(), Some("voter" | "leader")))
        .count();
    if members.len() != n || voters != n {
        return Err(format!(
            "{voters} voters among {} members, expected {n} voters",
            members.len()
        ));
    }
    Ok(())
}

fn cluster_table(v: &Value) -> String {
    let mut out = format!(
        "node {}  state {}  leader {}  term {}  applied {}  digest {} (at index {})  \
         entry format {}\n\n",
        cell(&v["node_id"]),
        cell(&v["state"]),
        cell(&v["leader"]),
        cell(&v["term"]),
        cell(&v["last_applied_index"]),
        cell(&v["digest"]),
        cell(&v["digest_index"]),
        cell(&v["entry_format"]),
    );
    let members = v["members"].as_array().cloned().unwrap_or_default();
    out.push_str(&table(&["id", "addr", "role"], &members));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_show_missing_values_as_dashes() {
        let rows = vec![
            json!({"clientid": "robot-7", "node": 1}),
            json!({"clientid": "a", "node": null}),
        ];
        assert_eq!(
            table(&["clientid", "node"], &rows),
            "clientid  node\nrobot-7   1\na         -\n"
        );
    }

    #[test]
    fn expect_voters_wants_a_leader_and_exactly_that_many_voters() {
        let status = |leader: Value, roles: &[&str]| {
            let members: Vec<Value> = roles
                .iter()
                .enumerate()
                .map(|(i, r)| json!({"id": i + 1, "role": r}))
                .collect();
            json!({"leader": leader, "members": members})
        };
        assert_eq!(
            check_voters(&status(json!(1), &["leader", "voter", "voter"]), 3),
            Ok(())
        );
        assert!(check_voters(&status(json!(1), &["leader", "voter", "learner"]), 3).is_err());
        assert!(check_voters(&status(json!(1), &["leader", "voter"]), 3).is_err());
        assert!(
            check_voters(&status(json!(1), &["leader", "voter", "voter", "voter"]), 3).is_err()
        );
        let no_leader = check_voters(&status(Value::Null, &["voter", "voter", "voter"]), 3);
        assert_eq!(no_leader, Err("no leader is known".to_owned()));
    }

    #[test]
    fn urls_get_a_scheme_and_the_api_prefix() {
        assert_eq!(
            base_url(Some("10.0.0.5:8080")),
            "http://10.0.0.5:8080/api/v1"
        );
        assert_eq!(
            base_url(Some("https://broker.example/")),
            "https://broker.example/api/v1"
        );
        assert_eq!(encode_topic("a b/c#"), "a%20b/c%23");
    }
}
