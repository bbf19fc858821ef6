//! Where the node's MQTT and cluster connections come from: the operating system's TCP,
//! unless another [`Network`] was installed before the node started.
//!
//! The deterministic simulation (`tests/tests/simulation.rs`) installs one that
//! carries every byte over turmoil's simulated network, so that the whole cluster
//! (Raft, forwarding, the MQTT listeners and their clients) runs in one process under
//! a simulated clock. The node's code is the same either way: it binds through
//! [`bind`] and dials peers through [`connect`] (the cluster's TLS, when on, is
//! layered over either by `cluster::tls`), and only the byte streams differ. The admin HTTP listener always uses the operating system's TCP.
//!
//! One network per process, like the cluster's TLS client side (`cluster::tls`): a
//! process runs one node, or a simulation of several nodes on one network.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A byte stream of another network.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A network other than the operating system's TCP.
pub trait Network: Send + Sync + 'static {
    /// Listen on `addr`.
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<Box<dyn Accept>>>;
    /// Connect to `authority` (`host:port`).
    fn connect(&self, authority: String) -> BoxFuture<'static, io::Result<Conn>>;
}

/// A listener of another network.
pub trait Accept: Send + Sync + 'static {
    /// The next connection and its peer's address.
    fn accept(&self) -> BoxFuture<'_, io::Result<(Conn, SocketAddr)>>;
    /// The address it listens on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

static NETWORK: OnceLock<Arc<dyn Network>> = OnceLock::new();

/// Use `network` instead of the operating system's TCP for every node this process
/// starts from now on. Only the first call takes effect; it says whether this one did.
pub fn install(network: Arc<dyn Network>) -> bool {
    NETWORK.set(network).is_ok()
}

fn installed() -> Option<&'static Arc<dyn Network>> {
    NETWORK.get()
}

/// A connection of another network.
pub struct Conn(Pin<Box<dyn Io>>);

impl Conn {
    /// Wrap a stream of another network.
    pub fn new(io: impl Io) -> Conn {
        Conn(Box::pin(io))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.as_mut().poll_shutdown(cx)
    }
}

/// A connection of another network is served like any stream the broker cannot park.
impl crate::transport::ClientStream for Conn {}

/// What the cluster's gRPC server learns of a connection: nothing beyond the stream.
impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// A listener: the operating system's, or another network's.
pub enum Listener {
    /// A TCP listener.
    Os(TcpListener),
    /// Another network's.
    Other(Box<dyn Accept>),
}

/// A connection a [`Listener`] accepted.
pub enum Accepted {
    /// A TCP connection (Nagle's algorithm off).
    Os(TcpStream),
    /// Another network's.
    Other(Conn),
}

impl Listener {
    /// The next connection and its peer's address.
    pub async fn accept(&self) -> io::Result<(Accepted, SocketAddr)> {
        match self {
            Listener::Os(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Accepted::Os(stream), peer))
            }
            Listener::Other(l) => {
                let (conn, peer) = l.accept().await?;
                Ok((Accepted::Other(conn), peer))
            }
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Os(l) => l.local_addr(),
            Listener::Other(l) => l.local_addr(),
        }
    }

    /// Its connections and their peers' addresses, as a stream that never ends.
    /// Accept errors (out of file descriptors, say) are logged and retried after a
    /// pause instead of ending it.
    pub fn accepted(self) -> impl futures::Stream<Item = (Conn, SocketAddr)> + Send + 'static {
        futures::stream::unfold(self, |listener| async move {
            loop {
                match listener.accept().await {
                    Ok((Accepted::Os(stream), peer)) => {
                        return Some(((Conn::new(stream), peer), listener))
                    }
                    Ok((Accepted::Other(conn), peer)) => return Some(((conn, peer), listener)),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    }

    /// Its connections as a stream for the cluster's gRPC server in plain text.
    pub fn incoming(self) -> impl futures::Stream<Item = io::Result<Conn>> + Send + 'static {
        futures::StreamExt::map(self.accepted(), |(conn, _)| Ok(conn))
    }
}

/// Listen on `addr`, on the installed network or the operating system's TCP; the
/// error names the address.
pub async fn bind(addr: SocketAddr) -> io::Result<Listener> {
    let bound = match installed() {
        None => TcpListener::bind(addr).await.map(Listener::Os),
        Some(network) => network.bind(addr).await.map(Listener::Other),
    };
    bound.map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Connect to `authority` (`host:port`), on the installed network or the operating
/// system's TCP (Nagle's algorithm off; with `discard_unsent`, SO_LINGER 0, so that
/// closing the connection discards what it has not delivered instead of the kernel
/// sending it on later).
pub async fn connect(authority: &str, discard_unsent: bool) -> io::Result<Conn> {
    if let Some(network) = installed() {
        return network.connect(authority.to_owned()).await;
    }
    let stream = TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    if discard_unsent {
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    }
    Ok(Conn::new(stream))
}
