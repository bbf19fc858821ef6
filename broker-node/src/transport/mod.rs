//! Listeners that accept client connections and hand each byte stream to a connection
//! task: plain TCP, TLS (rustls), WebSocket and WebSocket over TLS, each yielding a
//! byte stream for the same task.
//!
//! A listener survives every per-connection failure (accept errors such as running out
//! of file descriptors are logged and retried after a pause) and enforces the
//! configured maximum number of connections. It never parses MQTT itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::broker::connection::{self, Vouched};
use crate::broker::Broker;
use crate::config::TlsIdentity;

pub mod tls;
pub mod ws;

/// A client's byte stream that can tell when a read would find data, so that an idle
/// connection waits without a read buffer (an idle connection must cost little: no
/// 4 KiB buffer per sleeping device).
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + Sized {
    /// Resolves once a read is worth a buffer. Streams that cannot tell resolve at
    /// once: TLS and WebSocket layers may already hold decoded bytes that the socket's
    /// readiness would not show.
    fn read_ready(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    /// Whether an idle connection on this stream can be parked (plain TCP only: the
    /// other layers keep state above the socket).
    const PARKABLE: bool = false;

    /// The bare socket, out of tokio's reactor, to be parked; streams that cannot be
    /// parked give themselves back.
    fn into_socket(self) -> Result<std::io::Result<std::net::TcpStream>, Self> {
        Err(self)
    }

    /// The stream again from a parked socket.
    fn from_socket(socket: std::net::TcpStream) -> std::io::Result<Self> {
        drop(socket);
        Err(std::io::Error::other("this kind of stream is never parked"))
    }
}

impl ClientStream for TcpStream {
    async fn read_ready(&self) {
        // An error shows up again on the read that follows.
        let _ = self.readable().await;
    }

    const PARKABLE: bool = true;

    fn into_socket(self) -> Result<std::io::Result<std::net::TcpStream>, Self> {
        Ok(self.into_std())
    }

    fn from_socket(socket: std::net::TcpStream) -> std::io::Result<Self> {
        TcpStream::from_std(socket)
    }
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

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for tokio_rustls::server::TlsStream<S> {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for ws::WsStream<S> {}

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

/// Accept MQTT on `listener` until the broker shuts down; connection tasks are spawned
/// on `tracker` so that shutdown can wait for them. `open` counts connections across
/// every listener, for `mqtt.max_connections`.
pub async fn serve(
    listener: TcpListener,
    security: Security,
    broker: Arc<Broker>,
    tracker: TaskTracker,
    open: Arc<AtomicUsize>,
) {
    let max = broker.config.mqtt.max_connections;
    let label = security.label();
    let shutdown = broker.shutdown.clone();
    loop {
        let accepted = tokio::select! {
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
        let _ = stream.set_nodelay(true);
        let admitted = Admitted::new(open.clone());
        let broker = broker.clone();
        let security = security.clone();
        tracker.spawn(async move {
            metrics::counter!("flockmq_connections_opened_total", "listener" => label).increment(1);
            // Handshakes count against the CONNECT timeout: a client that never
            // finishes one is closed like one that never sends CONNECT.
            let timeout = broker.config.mqtt.connect_timeout;
            let max_packet = broker.config.mqtt.max_packet_size as usize;
            // Each kind of stream's connection future is boxed on its own: inline, every
            // task would be as large as the largest (a TLS handshake inside WebSocket
            // state, KiBs), and a plain TCP connection would pay for it.
            let identity = broker.config.tls_identity_as_username;
            let conn: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match security {
                Security::Plain => Box::pin(connection::serve(
                    broker,
                    stream,
                    peer,
                    label,
                    Vouched::Nothing,
                    admitted,
                )),
                Security::Tls(slot) => Box::pin(async move {
                    let handshake = slot.acceptor().accept(stream);
                    if let Some(tls) = upgrade("TLS", peer, timeout, handshake).await {
                        let vouched = vouched(tls.get_ref().1, identity);
                        connection::serve(broker, tls, peer, label, vouched, admitted).await;
                    }
                }),
                Security::Ws => Box::pin(async move {
                    if let Some(ws) =
                        upgrade("WebSocket", peer, timeout, ws::accept(stream, max_packet)).await
                    {
                        connection::serve(broker, ws, peer, label, Vouched::Nothing, admitted)
                            .await;
                    }
                }),
                Security::Wss(slot) => Box::pin(async move {
                    let secured = async {
                        let tls = slot.acceptor().accept(stream).await?;
                        let vouched = vouched(tls.get_ref().1, identity);
                        Ok((ws::accept(tls, max_packet).await?, vouched))
                    };
                    if let Some((ws, vouched)) =
                        upgrade("TLS WebSocket", peer, timeout, secured).await
                    {
                        connection::serve(broker, ws, peer, label, vouched, admitted).await;
                    }
                }),
            };
            // A parked connection's task ends here while the connection lives on in the
            // parking lot, holding its `Admitted` place.
            conn.await;
        });
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

/// Bind a TCP listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
