//! A bridge's side in this cluster: an MQTT 5 client inside the node, served by the
//! broker's own connection task over an in-memory stream. It is a client like any
//! other (a persistent session in the replicated state, its subscriptions in the
//! route table, its publishes through the normal publish path and acknowledged by the
//! normal rules), so what it has not acknowledged stays queued in the cluster.
//!
//! It speaks FlockMQ's codec; it never touches the broker's state directly.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use crate::broker::Connections;
use crate::mqtt::{
    self, Connect, ConnectProperties, Packet, ProtocolVersion, QoS, RetainHandling, Subscribe,
    SubscribeProperties, SubscriptionOptions, Unsubscribe, UnsubscribeProperties,
};
use crate::transport::{Admitted, ConnectionHandler, Vouched};

use super::topics::Needed;
use super::BridgeError;

/// How many messages the broker may have in flight towards the bridge at once.
const RECEIVE_MAXIMUM: u16 = 64;
/// The in-memory stream's buffer each way.
const STREAM_BUFFER: usize = 256 * 1024;
/// The largest packet the bridge accepts from its broker.
const MAX_PACKET: u32 = 268_435_455;

/// The bridge's connection to its own broker.
pub struct Local {
    /// Where packets to the broker are written.
    writer: WriteHalf<DuplexStream>,
    /// What the broker sent, decoded by `reader` (bounded by the receive maximum the
    /// bridge announces, plus acknowledgements).
    packets: mpsc::UnboundedReceiver<Result<Packet, String>>,
    /// The task decoding what the broker sends; it holds the stream's read half, so
    /// it is stopped when the bridge lets go of the connection (the broker then sees
    /// the stream end).
    reader: tokio::task::JoinHandle<()>,
    /// The encoding buffer, reused.
    out: BytesMut,
    /// The last packet identifier the bridge used.
    next_id: u16,
}

impl Drop for Local {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Local {
    /// Connect as `client_id` with a persistent session and make the `subscriptions`
    /// (no-local, retain as published: what the bridge publishes is never sent back
    /// to it). Answers whether the session was present.
    pub async fn connect(
        handler: &Connections,
        client_id: &str,
        username: Option<&str>,
        subscriptions: &[Needed],
    ) -> Result<(Local, bool), BridgeError> {
        let (client_end, server_end) = tokio::io::duplex(STREAM_BUFFER);
        let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let serving = handler.serve(
            server_end,
            peer,
            "bridge",
            Vouched::Internal(username.map(Arc::from)),
            Admitted::new(Arc::new(AtomicUsize::new(0))),
        );
        tokio::spawn(serving);
        let (reader, writer) = tokio::io::split(client_end);
        let (tx, packets) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_packets(reader, tx));
        let mut local = Local {
            writer,
            packets,
            reader,
            out: BytesMut::new(),
            next_id: 0,
        };
        let connect = Connect {
            protocol: ProtocolVersion::V5,
            clean_start: false,
            keep_alive: 0,
            client_id: client_id.to_owned(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: Some(u32::MAX),
                receive_maximum: Some(RECEIVE_MAXIMUM),
                ..ConnectProperties::default()
            },
        };
        local.send(Packet::Connect(Box::new(connect))).await?;
        let session_present = match local.recv().await? {
            Packet::ConnAck(ack) if !ack.reason_code.is_error() => ack.session_present,
            Packet::ConnAck(ack) => {
                return Err(BridgeError::Local(format!(
                    "connection refused: {:?}",
                    ack.reason_code
                )))
            }
            other => {
                return Err(BridgeError::Local(format!(
                    "expected CONNACK, got {other:?}"
                )))
            }
        };
        if !subscriptions.is_empty() {
            let filters = subscriptions
                .iter()
                .map(|n| {
                    let options = SubscriptionOptions {
                        qos: QoS::try_from(n.qos).unwrap_or(QoS::AtLeastOnce),
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::SendIfNew,
                    };
                    (n.filter.clone(), options)
                })
                .collect();
            let packet_id = local.next_packet_id();
            local
                .send(Packet::Subscribe(Subscribe {
                    packet_id,
                    filters,
                    properties: SubscribeProperties::default(),
                }))
                .await?;
        }
        // Subscriptions of topics since removed from the configuration go.
        let wanted: Vec<&str> = subscriptions.iter().map(|n| n.filter.as_str()).collect();
        let stale: Vec<String> = handler.0.state.read(|s| {
            s.session(client_id).map_or_else(Vec::new, |r| {
                r.subscriptions
                    .keys()
                    .filter(|f| !wanted.contains(&f.as_str()))
                    .cloned()
                    .collect()
            })
        });
        if !stale.is_empty() {
            tracing::info!(client_id, filters = ?stale, "bridge: dropping subscriptions no longer configured");
            let packet_id = local.next_packet_id();
            local
                .send(Packet::Unsubscribe(Unsubscribe {
                    packet_id,
                    filters: stale,
                    properties: UnsubscribeProperties::default(),
                }))
                .await?;
        }
        Ok((local, session_present))
    }

    /// The next packet identifier of the bridge's own publishes and subscriptions.
    pub fn next_packet_id(&mut self) -> u16 {
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        self.next_id
    }

    /// Write one packet.
    pub async fn send(&mut self, packet: Packet) -> Result<(), BridgeError> {
        self.out.clear();
        mqtt::encode(&packet, ProtocolVersion::V5, &mut self.out)
            .map_err(|e| BridgeError::Local(format!("cannot encode: {e}")))?;
        self.writer
            .write_all(&self.out)
            .await
            .map_err(|e| BridgeError::Local(format!("write: {e}")))
    }

    /// The next packet from the broker; an error once the connection ended.
    pub async fn recv(&mut self) -> Result<Packet, BridgeError> {
        match self.packets.recv().await {
            Some(Ok(packet)) => Ok(packet),
            Some(Err(e)) => Err(BridgeError::Local(e)),
            None => Err(BridgeError::Local("connection closed".into())),
        }
    }
}

/// Decode packets from the broker until the stream ends.
async fn read_packets(
    mut reader: ReadHalf<DuplexStream>,
    tx: mpsc::UnboundedSender<Result<Packet, String>>,
) {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    loop {
        loop {
            match mqtt::decode(&mut buf, Some(ProtocolVersion::V5), MAX_PACKET) {
                Ok(Some(packet)) => {
                    if tx.send(Ok(packet)).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(format!("cannot decode: {e}")));
                    return;
                }
            }
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) => {
                let _ = tx.send(Err("connection closed by the broker".into()));
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Err(format!("read: {e}")));
                return;
            }
        }
    }
}
