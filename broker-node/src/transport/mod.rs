//! Listeners that accept client connections and hand each byte stream to a connection
//! task: plain TCP today; TLS and WebSocket yield streams for the same task.
//!
//! A listener survives every per-connection failure (accept errors such as running out
//! of file descriptors are logged and retried after a pause) and enforces the
//! configured maximum number of connections. It never parses MQTT itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::broker::{connection, Broker};

/// Accept MQTT over TCP on `listener` until the broker shuts down; connection tasks
/// are spawned on `tracker` so that shutdown can wait for them.
pub async fn serve_tcp(listener: TcpListener, broker: Arc<Broker>, tracker: TaskTracker) {
    let open = Arc::new(AtomicUsize::new(0));
    let max = broker.config.mqtt.max_connections;
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
        tracker.spawn(async move {
            metrics::counter!("flockmq_connections_opened_total", "listener" => "tcp").increment(1);
            connection::serve(broker, stream, peer).await;
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
