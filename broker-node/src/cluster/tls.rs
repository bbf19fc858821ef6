//! Mutual TLS between nodes: with `cluster.tls_cert_file`, `cluster.tls_key_file` and
//! `cluster.tls_ca_file` set, the cluster's gRPC server (Raft, administration,
//! forwarding) asks every peer for a certificate signed by that CA, and every
//! connection this node opens to a peer presents its own certificate and checks the
//! peer's against the same CA.
//!
//! The handshakes are ours, not tonic's, so that the files can be read again on
//! SIGHUP ([`ClusterTls::reload`]): the server side ([`incoming`]) takes the rustls
//! configuration in force for each connection it accepts, and the client side
//! ([`PeerConnector`], behind every channel made by [`dial`] / [`dial_lazy`]) takes it
//! for each connection it opens, including the reconnections of long-lived channels.
//! Established connections keep the configuration they started with. A reload that
//! fails leaves the configuration in force unchanged.
//!
//! The material is installed once per process when the node starts (one node runs
//! per process), so that every place that dials a peer (Raft, membership changes,
//! writes forwarded to the leader, publish forwarding) finds it. Held in a `RwLock`
//! of `Arc`s, like the MQTT listeners' `TlsSlot`: a read is a pointer copy, and the
//! lock is never held across an `.await`. The bytes travel over [`crate::net`], so
//! the simulation's network carries them like the operating system's.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use futures::stream::{FuturesUnordered, StreamExt};
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::ClusterConfig;
use crate::net::{Conn, Listener};
use crate::transport::tls::{certs, key};

/// How long a peer may take over its TLS handshake, either way.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// gRPC speaks HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// The files the material is read from.
#[derive(Clone, PartialEq, Eq)]
struct Files {
    cert: String,
    key: String,
    ca: String,
    /// `cluster.tls_server_name`: the name checked in a peer's certificate instead
    /// of the host it is dialed at.
    server_name: Option<String>,
}

/// The cluster's TLS material in force.
pub struct ClusterTls {
    /// Read again on every reload.
    files: Files,
    /// What an accepted peer connection is served with.
    server: RwLock<Arc<ServerConfig>>,
    /// What a connection to a peer presents and trusts.
    client: RwLock<Arc<ClientConfig>>,
}

impl ClusterTls {
    fn load(files: Files) -> anyhow::Result<ClusterTls> {
        let (server, client) = configs(&files)?;
        Ok(ClusterTls {
            files,
            server: RwLock::new(server),
            client: RwLock::new(client),
        })
    }

    /// Read the certificate, key and CA files again: new connections, accepted or
    /// opened, use them. On failure the material in force stays and the error says
    /// why.
    pub fn reload(&self) -> anyhow::Result<()> {
        let (server, client) = configs(&self.files)?;
        *self.server.write().unwrap_or_else(|e| e.into_inner()) = server;
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = client;
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self.server.read().unwrap_or_else(|e| e.into_inner());
        tokio_rustls::TlsAcceptor::from(config.clone())
    }

    fn connector(&self) -> tokio_rustls::TlsConnector {
        let config = self.client.read().unwrap_or_else(|e| e.into_inner());
        tokio_rustls::TlsConnector::from(config.clone())
    }
}

/// Both sides' rustls configurations from `files`: the node's certificate and key,
/// presented either way, and the CA a peer's certificate must chain to, required
/// either way.
fn configs(files: &Files) -> anyhow::Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.ca)? {
        roots
            .add(ca)
            .with_context(|| format!("bad CA certificate in {}", files.ca))?;
    }
    let roots = Arc::new(roots);
    let chain = certs(&files.cert)?;
    let mismatch = || {
        format!(
            "{} and {} do not make a certificate and its key",
            files.cert, files.key
        )
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .context("peer certificate verifier")?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key(&files.key)?)
        .with_context(mismatch)?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key(&files.key)?)
        .with_context(mismatch)?;
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((Arc::new(server), Arc::new(client)))
}

/// The material every connection of this process takes: `None` in plain text.
static INSTALLED: OnceLock<Option<Arc<ClusterTls>>> = OnceLock::new();

/// Read the cluster TLS files, if configured, and install them for every peer
/// connection of this process: the handle to serve with and to reload. A process
/// runs one node; a second node with other files is an error, not a silent mix.
pub fn install(config: &ClusterConfig) -> anyhow::Result<Option<Arc<ClusterTls>>> {
    let files = match (
        config.tls_cert_file.as_deref(),
        config.tls_key_file.as_deref(),
        config.tls_ca_file.as_deref(),
    ) {
        (Some(cert), Some(key), Some(ca)) => Some(Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
            ca: ca.to_owned(),
            server_name: config.tls_server_name.clone(),
        }),
        _ => None,
    };
    if let Some(installed) = INSTALLED.get() {
        anyhow::ensure!(
            installed.as_ref().map(|tls| &tls.files) == files.as_ref(),
            "this process already runs a node with other cluster TLS settings"
        );
        return Ok(installed.clone());
    }
    let tls = files.map(ClusterTls::load).transpose()?.map(Arc::new);
    Ok(INSTALLED.get_or_init(|| tls).clone())
}

/// An endpoint for the peer at `addr` (`host:port`). TLS, when the cluster uses it,
/// is the connector's business: make the channel with [`dial`] or [`dial_lazy`].
pub fn endpoint(addr: &str) -> Result<Endpoint, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad peer address {addr}: {e}"))
}

/// A channel to `endpoint` that connects on first use (and again after a loss).
pub fn dial_lazy(endpoint: Endpoint) -> Channel {
    endpoint.connect_with_connector_lazy(PeerConnector::installed())
}

/// A channel to `endpoint`, connected now.
pub async fn dial(endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
    endpoint
        .connect_with_connector(PeerConnector::installed())
        .await
}

/// Opens connections to peers for tonic's channels: a byte stream from
/// [`crate::net::connect`], then, when the cluster uses TLS, a handshake with the
/// material in force at that moment.
#[derive(Clone)]
pub struct PeerConnector {
    tls: Option<Arc<ClusterTls>>,
    /// Close with SO_LINGER 0 (see [`crate::net::connect`]).
    discard_unsent: bool,
}

impl PeerConnector {
    /// The connector of the installed material.
    pub fn installed() -> PeerConnector {
        PeerConnector {
            tls: INSTALLED.get().cloned().flatten(),
            discard_unsent: false,
        }
    }

    /// This connector, its TCP connections closed with SO_LINGER 0: what they have
    /// not delivered is thrown away on close rather than sent later.
    pub fn discarding_unsent(self) -> PeerConnector {
        PeerConnector {
            discard_unsent: true,
            ..self
        }
    }
}

impl tower::Service<Uri> for PeerConnector {
    type Response = hyper_util::rt::TokioIo<Conn>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let discard_unsent = self.discard_unsent;
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::other(format!("no host in {uri}")))?;
            let conn = crate::net::connect(authority.as_str(), discard_unsent).await?;
            let Some(tls) = tls else {
                return Ok(hyper_util::rt::TokioIo::new(conn));
            };
            let name = tls.files.server_name.as_deref().unwrap_or(
                authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']'),
            );
            let name = ServerName::try_from(name.to_owned()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{name} is not a name to check a certificate against: {e}"),
                )
            })?;
            let handshake = tls.connector().connect(name, conn);
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "cluster TLS handshake timed out")
                })??;
            Ok(hyper_util::rt::TokioIo::new(Conn::new(stream)))
        })
    }
}

/// The connections `listener` accepts, for the cluster's gRPC server: as they are in
/// plain text, or after a TLS handshake with the material in force when each arrived.
/// Handshakes run side by side, each within [`HANDSHAKE_TIMEOUT`], so a slow peer
/// holds up no other; a failed one is logged with the peer's address and dropped.
pub fn incoming(
    listener: Listener,
    tls: Option<Arc<ClusterTls>>,
) -> Pin<Box<dyn futures::Stream<Item = io::Result<Conn>> + Send>> {
    let Some(tls) = tls else {
        return Box::pin(listener.incoming());
    };
    type Handshake = Pin<Box<dyn Future<Output = Option<Conn>> + Send>>;
    let handshake = move |conn: Conn, peer: SocketAddr| -> Handshake {
        let accept = tls.acceptor().accept(conn);
        Box::pin(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(stream)) => Some(Conn::new(stream)),
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "cluster TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::warn!(%peer, "cluster TLS handshake timed out");
                    None
                }
            }
        })
    };
    let state = (
        Box::pin(listener.accepted()),
        FuturesUnordered::<Handshake>::new(),
    );
    Box::pin(futures::stream::unfold(
        state,
        move |(mut accepted, mut handshakes)| {
            let handshake = handshake.clone();
            async move {
                loop {
                    tokio::select! {
                        Some((conn, peer)) = accepted.next() => {
                            handshakes.push(handshake(conn, peer));
                        }
                        Some(done) = handshakes.next(), if !handshakes.is_empty() => {
                            if let Some(conn) = done {
                                return Some((Ok(conn), (accepted, handshakes)));
                            }
                        }
                        else => return None,
                    }
                }
            }
        },
    ))
}
