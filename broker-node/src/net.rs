//! Where the node's MQTT and cluster connections come from: the operating system's TCP,
//! unless another [`Network`] was installed before the node started.
//!
//! The deterministic simulation (`tests/tests/simulation.rs`) installs one that
//! carries every byte over turmoil's simulated network, so that the whole cluster
//! (Raft, forwarding, the MQTT listeners and their clients) runs in one process under
//! a simulated clock. The node's code is the same either way: it binds through
//! [`bind`] and dials peers through [`dial`] / [`dial_lazy`], and only the byte
//! streams differ. The admin HTTP listener always uses the operating system's TCP.
//!
//! One network per process, like the cluster's TLS client side (`cluster::tls`): a
//! process runs one node, or a simulation of several nodes on one network.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint, Uri};

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

    /// Its connections as a stream for the cluster's gRPC server. Accept errors (out
    /// of file descriptors, say) are logged and retried after a pause instead of
    /// ending the server.
    pub fn incoming(self) -> impl futures::Stream<Item = io::Result<Conn>> + Send + 'static {
        futures::stream::unfold(self, |listener| async move {
            loop {
                match listener.accept().await {
                    Ok((Accepted::Os(stream), _)) => {
                        return Some((Ok(Conn::new(stream)), listener))
                    }
                    Ok((Accepted::Other(conn), _)) => return Some((Ok(conn), listener)),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
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

/// Dials a peer through the installed network: a connector for tonic's channels.
#[derive(Clone)]
pub struct Dialer(Arc<dyn Network>);

impl tower::Service<Uri> for Dialer {
    type Response = hyper_util::rt::TokioIo<Conn>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let network = self.0.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .ok_or_else(|| io::Error::other(format!("no host in {uri}")))?;
            let conn = network.connect(authority).await?;
            Ok(hyper_util::rt::TokioIo::new(conn))
        })
    }
}

/// The installed network's dialer, if another network is installed.
pub fn dialer() -> Option<Dialer> {
    installed().map(|n| Dialer(n.clone()))
}

/// A channel to `endpoint` that connects on first use.
pub fn dial_lazy(endpoint: Endpoint) -> Channel {
    match dialer() {
        None => endpoint.connect_lazy(),
        Some(d) => endpoint.connect_with_connector_lazy(d),
    }
}

/// A channel to `endpoint`, connected now.
pub async fn dial(endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
    match dialer() {
        None => endpoint.connect().await,
        Some(d) => endpoint.connect_with_connector(d).await,
    }
}
