//! Listeners that accept client connections and hand each byte stream to a connection
//! task: plain TCP and TLS (rustls) today; WebSocket will yield streams for the same
//! task.
//!
//! A listener survives every per-connection failure (accept errors such as running out
//! of file descriptors are logged and retried after a pause) and enforces the
//! configured maximum number of connections. It never parses MQTT itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::broker::{connection, Broker};

pub mod tls;

/// What a listener speaks above TCP.
#[derive(Clone)]
pub enum Security {
    /// Plain MQTT.
    Plain,
    /// MQTT inside TLS.
    Tls(TlsAcceptor),
}

impl Security {
    fn label(&self) -> &'static str {
        match self {
            Security::Plain => "tcp",
            Security::Tls(_) => "tls",
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
        open.fetch_add(1, Ordering::Relaxed);
        let open = open.clone();
        let broker = broker.clone();
        let security = security.clone();
        tracker.spawn(async move {
            metrics::counter!("flockmq_connections_opened_total", "listener" => label).increment(1);
            match security {
                Security::Plain => connection::serve(broker, stream, peer).await,
                Security::Tls(acceptor) => {
                    // The handshake counts against the CONNECT timeout: a client that
                    // never finishes it is closed like one that never sends CONNECT.
                    let timeout = broker.config.mqtt.connect_timeout;
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => connection::serve(broker, tls, peer).await,
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                            metrics::counter!("flockmq_tls_handshake_failures_total").increment(1);
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            metrics::counter!("flockmq_tls_handshake_failures_total").increment(1);
                        }
                    }
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Bind a TCP listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
