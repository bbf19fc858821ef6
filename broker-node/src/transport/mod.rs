//! Listeners that accept client connections and hand each byte stream to a connection
//! task: plain TCP, TLS (rustls), WebSocket and WebSocket over TLS, each yielding a
//! byte stream for the same task.
//!
//! A listener survives every per-connection failure (accept errors such as running out
//! of file descriptors are logged and retried after a pause) and enforces the
//! configured maximum number of connections. It never parses MQTT itself, and it does
//! not know who serves the streams: it defines what a [`ConnectionHandler`] is and is
//! handed one (the broker's, by `node`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, TlsIdentity};
use crate::net::{Accepted, Listener};

pub mod tls;
pub mod ws;

/// A client's byte stream that can tell when a read would find data, so that an idle
/// connection waits without a read buffer (an idle connection must cost little: no
/// 4 KiB buffer per sleeping device).
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + Sized {
    /// Resolves once a read is worth a buffer. Streams that cannot tell resolve at
    /// once: a WebSocket layer may already hold decoded bytes that the socket's
    /// readiness would not show. (TLS can tell: [`tls::ServerStream`] asks rustls
    /// first.)
    fn read_ready(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    /// Whether an idle connection on this stream can be parked (plain TCP, and TLS
    /// over it: the other layers keep state above the socket).
    const PARKABLE: bool = false;

    /// The bare socket, out of tokio's reactor, and the TLS session above it, to be
    /// parked; streams that cannot be parked (or not now) give themselves back.
    fn into_socket(self) -> Result<std::io::Result<Bare>, Self> {
        Err(self)
    }

    /// The stream again from a parked socket (and session).
    fn from_socket(bare: Bare) -> std::io::Result<Self> {
        drop(bare);
        Err(std::io::Error::other("this kind of stream is never parked"))
    }
}

/// What a parked connection keeps of its stream.
pub struct Bare {
    /// The socket, in non-blocking mode.
    pub socket: std::net::TcpStream,
    /// The TLS session above it, for a TLS connection.
    pub tls: Option<Box<rustls::ServerConnection>>,
}

impl ClientStream for TcpStream {
    async fn read_ready(&self) {
        // An error shows up again on the read that follows.
        let _ = self.readable().await;
    }

    const PARKABLE: bool = true;

    fn into_socket(self) -> Result<std::io::Result<Bare>, Self> {
        Ok(self.into_std().map(|socket| Bare { socket, tls: None }))
    }

    fn from_socket(bare: Bare) -> std::io::Result<Self> {
        debug_assert!(bare.tls.is_none(), "a TLS session under a plain stream");
        TcpStream::from_std(bare.socket)
    }
}

/// What the transport vouches for about the client, before its CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vouched {
    /// Nothing: the CONNECT's username and password decide.
    Nothing,
    /// The listener takes usernames from client certificates
    /// (`tls_identity_as_username`): this client's, if it presented a verified
    /// certificate with such a name. The certificate is the credential.
    CertificateUser(Option<Arc<str>>),
    /// A client inside this node (a bridge's local side, over an in-memory stream):
    /// no credentials are asked; the ACL applies to the username given (anonymous
    /// without one).
    Internal(Option<Arc<str>>),
}

/// What a listener hands each byte stream to once its transport is up.
///
/// Called once per accepted connection (statically dispatched: [`serve`] is generic
/// over the handler); the future it returns is the connection's whole life, boxed
/// and spawned by the listener.
pub trait ConnectionHandler: Send + Sync + 'static {
    /// Serve the client on `stream`, from `peer`, accepted by the listener named
    /// `listener` ("tcp", "tls", "ws" or "wss"), holding its `admitted` place until
    /// the connection ends.
    fn serve<S: ClientStream + 'static>(
        &self,
        stream: S,
        peer: SocketAddr,
        listener: &'static str,
        vouched: Vouched,
        admitted: Admitted,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// What every listener enforces, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `mqtt.max_connections` (0: no limit), across every listener.
    pub max_connections: usize,
    /// `mqtt.connect_timeout`: a transport handshake counts against it.
    pub connect_timeout: Duration,
    /// `mqtt.max_packet_size`, which also bounds a WebSocket message.
    pub max_packet_size: usize,
    /// `tls_identity_as_username`.
    pub tls_identity: TlsIdentity,
}

impl Limits {
    /// The limits `config` sets.
    pub fn new(config: &Config) -> Limits {
        Limits {
            max_connections: config.mqtt.max_connections,
            connect_timeout: config.mqtt.connect_timeout,
            max_packet_size: config.mqtt.max_packet_size as usize,
            tls_identity: config.tls_identity_as_username,
        }
    }
}

/// What a listener's connection tasks share: one pointer per task.
struct Listening<H> {
    handler: H,
    limits: Limits,
}

/// A connection's place under `mqtt.max_connections`, given back when dropped.
pub struct Admitted(Arc<AtomicUsize>);

impl Admitted {
    /// Take a place in `open`.
    pub fn new(open: Arc<AtomicUsize>) -> Admitted {
        open.fetch_add(1, Ordering::Relaxed);
        Admitted(open)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for ws::WsStream<S> {}

/// The in-memory stream of a client inside the node (a bridge).
impl ClientStream for tokio::io::DuplexStream {}

/// What a listener speaks above TCP.
#[derive(Clone)]
pub enum Security {
    /// Plain MQTT.
    Plain,
    /// MQTT inside TLS.
    Tls(Arc<tls::TlsSlot>),
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss(Arc<tls::TlsSlot>),
}

impl Security {
    fn label(&self) -> &'static str {
        match self {
            Security::Plain => "tcp",
            Security::Tls(_) => "tls",
            Security::Ws => "ws",
            Security::Wss(_) => "wss",
        }
    }
}

/// Accept MQTT on `listener` until `shutdown`, handing each connection to `handler`;
/// connection tasks are spawned on `tracker` so that shutdown can wait for them.
/// `open` counts connections across every listener, for `mqtt.max_connections`.
pub async fn serve<H: ConnectionHandler>(
    listener: Listener,
    security: Security,
    handler: H,
    limits: Limits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    open: Arc<AtomicUsize>,
) {
    let max = limits.max_connections;
    let label = security.label();
    let listening = Arc::new(Listening { handler, limits });
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                metrics::counter!("flockmq_accept_errors_total").increment(1);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if max > 0 && open.load(Ordering::Relaxed) >= max {
            tracing::warn!(%peer, max, "connection refused: maximum connections reached");
            metrics::counter!("flockmq_connections_refused_total", "reason" => "max_connections")
                .increment(1);
            drop(stream);
            continue;
        }
        let admitted = Admitted::new(open.clone());
        let conn = match stream {
            Accepted::Os(tcp) => connection(tcp, peer, &security, &listening, admitted),
            Accepted::Other(conn) => connection(conn, peer, &security, &listening, admitted),
        };
        tracker.spawn(async move {
            metrics::counter!("flockmq_connections_opened_total", "listener" => label).increment(1);
            // A parked connection's task ends here while the connection lives on in the
            // parking lot, holding its `Admitted` place.
            conn.await;
        });
    }
}

/// The whole life of one accepted connection: its transport's handshake, then the
/// handler's service.
fn connection<S, H>(
    stream: S,
    peer: SocketAddr,
    security: &Security,
    listening: &Arc<Listening<H>>,
    admitted: Admitted,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
where
    S: ClientStream + 'static,
    H: ConnectionHandler,
{
    let label = security.label();
    let listening = listening.clone();
    // Handshakes count against the CONNECT timeout: a client that never finishes one
    // is closed like one that never sends CONNECT.
    let timeout = listening.limits.connect_timeout;
    let max_packet = listening.limits.max_packet_size;
    // Each kind of stream's connection future is boxed on its own: inline, every task
    // would be as large as the largest (a TLS handshake inside WebSocket state, KiBs),
    // and a plain TCP connection would pay for it.
    let identity = listening.limits.tls_identity;
    match security.clone() {
        Security::Plain => Box::pin(async move {
            listening
                .handler
                .serve(stream, peer, label, Vouched::Nothing, admitted)
                .await
        }),
        Security::Tls(slot) => Box::pin(async move {
            let handshake = slot.acceptor().accept(stream);
            if let Some(tls) = upgrade("TLS", peer, timeout, handshake).await {
                let vouched = vouched(tls.get_ref().1, identity);
                // Taken apart and boxed: see `tls::ServerStream`.
                let (io, session) = tls.into_inner();
                let tls = tls::ServerStream::new(io, session);
                listening
                    .handler
                    .serve(tls, peer, label, vouched, admitted)
                    .await;
            }
        }),
        Security::Ws => Box::pin(async move {
            if let Some(ws) =
                upgrade("WebSocket", peer, timeout, ws::accept(stream, max_packet)).await
            {
                listening
                    .handler
                    .serve(ws, peer, label, Vouched::Nothing, admitted)
                    .await;
            }
        }),
        Security::Wss(slot) => Box::pin(async move {
            let secured = async {
                let tls = slot.acceptor().accept(stream).await?;
                let vouched = vouched(tls.get_ref().1, identity);
                Ok((ws::accept(tls, max_packet).await?, vouched))
            };
            if let Some((ws, vouched)) = upgrade("TLS WebSocket", peer, timeout, secured).await {
                listening
                    .handler
                    .serve(ws, peer, label, vouched, admitted)
                    .await;
            }
        }),
    }
}

/// What a TLS connection's client certificate vouches for under `mode`.
fn vouched(tls: &rustls::ServerConnection, mode: TlsIdentity) -> Vouched {
    match mode {
        TlsIdentity::Off => Vouched::Nothing,
        _ => Vouched::CertificateUser(tls::identity(tls.peer_certificates(), mode).map(Arc::from)),
    }
}

/// Run a transport handshake within `timeout`; a failure is logged and counted and
/// closes that connection only.
async fn upgrade<T>(
    what: &'static str,
    peer: SocketAddr,
    timeout: Duration,
    handshake: impl std::future::Future<Output = std::io::Result<T>>,
) -> Option<T> {
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "{what} handshake failed");
            metrics::counter!("flockmq_handshake_failures_total", "transport" => what).increment(1);
            None
        }
        Err(_) => {
            tracing::info!(%peer, "{what} handshake timed out");
            metrics::counter!("flockmq_handshake_failures_total", "transport" => what).increment(1);
            None
        }
    }
}
