//! Mutual TLS between nodes: with `cluster.tls_cert_file`, `cluster.tls_key_file` and
//! `cluster.tls_ca_file` set, the cluster's gRPC server (Raft, administration,
//! forwarding) asks every peer for a certificate signed by that CA, and every
//! connection this node opens to a peer presents its own certificate and checks the
//! peer's against the same CA.
//!
//! The client side is installed once per process when the node starts (one node runs
//! per process), so that every place that dials a peer (Raft, membership changes,
//! writes forwarded to the leader, publish forwarding) gets it through [`endpoint`].
//! The files are read at start only.

use std::sync::OnceLock;

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::ClusterConfig;

/// How this node dials its peers: `None` in plain text.
static CLIENT: OnceLock<Option<ClientTlsConfig>> = OnceLock::new();

/// Read the cluster TLS files, if configured: the server side to serve with. The
/// client side is installed for [`endpoint`].
pub fn install(config: &ClusterConfig) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key), Some(ca)) = (
        config.tls_cert_file.as_deref(),
        config.tls_key_file.as_deref(),
        config.tls_ca_file.as_deref(),
    ) else {
        let _ = CLIENT.set(None);
        return Ok(None);
    };
    let read = |path: &str| std::fs::read(path).with_context(|| format!("cannot read {path}"));
    let identity = Identity::from_pem(read(cert)?, read(key)?);
    let ca = Certificate::from_pem(read(ca)?);
    let mut client = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .identity(identity.clone());
    if let Some(name) = config.tls_server_name.as_deref() {
        client = client.domain_name(name);
    }
    let _ = CLIENT.set(Some(client));
    Ok(Some(
        ServerTlsConfig::new().identity(identity).client_ca_root(ca),
    ))
}

/// An endpoint for the peer at `addr` (`host:port`), over TLS when the cluster uses it.
pub fn endpoint(addr: &str) -> Result<Endpoint, String> {
    let bad = |e: tonic::transport::Error| format!("bad peer address {addr}: {e}");
    match CLIENT.get().and_then(Option::as_ref) {
        None => Endpoint::from_shared(format!("http://{addr}")).map_err(bad),
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
            .and_then(|e| e.tls_config(tls.clone()))
            .map_err(bad),
    }
}
