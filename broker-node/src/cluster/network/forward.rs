//! The forward stream over gRPC: the tonic client that opens one `Forward` stream to
//! a peer, and the tonic service that receives peers' streams. Frames cross this
//! boundary as plain values (sequence number, origin node, encoded entries) both
//! ways; the protobuf types stay here.
//!
//! It only carries frames: it never reads their entries, counts or delivers
//! anything, nor decides what a broken stream means. That is `cluster::forward`'s,
//! which hands the service a [`FrameHandler`] and drives the client.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use cluster_proto::v1::forward_client::ForwardClient;
use cluster_proto::v1::forward_server::{Forward as ForwardRpc, ForwardServer};
use cluster_proto::v1::{ForwardAck, ForwardFrame};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster::command::NodeId;

/// HTTP/2 flow-control window of one forward stream, in bytes: room for many frames in
/// flight.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 flow-control window of a whole peer connection.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// How long opening a stream may take: dialing, then the peer's answer to the call.
/// A paused peer's kernel still accepts the connection; without this bound an attempt
/// (and the messages that wait for it) would last until HTTP/2 keep-alive gave up.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest frame either side decodes.
const MAX_MESSAGE_BYTES: usize = super::RPC_MESSAGE_LIMIT;

/// What takes the frames of peers' forward streams.
pub trait FrameHandler: Clone + Send + Sync + 'static {
    /// Why a frame's entries could not be read; it ends the stream.
    type Error: std::fmt::Display + Send;

    /// Take the frame of encoded `entries` from node `origin`; the frame is
    /// acknowledged once this resolves with `Ok`.
    fn frame(
        &self,
        origin: NodeId,
        entries: Bytes,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The gRPC service receiving peers' forward streams.
pub struct ForwardService<H> {
    handler: H,
    /// Acknowledgements queued for one stream.
    window: usize,
}

impl<H: FrameHandler> ForwardService<H> {
    /// A tonic server handing frames to `handler`, with room for `window`
    /// acknowledgements per stream.
    pub fn server(handler: H, window: usize) -> ForwardServer<ForwardService<H>> {
        ForwardServer::new(ForwardService { handler, window })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<ForwardAck, Status>> + Send>>;

#[tonic::async_trait]
impl<H: FrameHandler> ForwardRpc for ForwardService<H> {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<ForwardFrame>>,
    ) -> Result<Response<AckStream>, Status> {
        let mut inbound = request.into_inner();
        let handler = self.handler.clone();
        let (tx, rx) = mpsc::channel(self.window);
        tokio::spawn(async move {
            loop {
                let frame = match inbound.message().await {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "forward stream from a peer ended");
                        break;
                    }
                };
                let seq = frame.seq;
                if let Err(e) = handler.frame(frame.origin_node, frame.entries).await {
                    let _ = tx
                        .send(Err(Status::invalid_argument(format!(
                            "cannot decode forward frame {seq}: {e}"
                        ))))
                        .await;
                    break;
                }
                if tx.send(Ok(ForwardAck { seq })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The stream to the peer is gone.
#[derive(Debug)]
pub struct Closed;

/// The sending half of an open forward stream.
pub struct FrameSender(mpsc::Sender<ForwardFrame>);

impl FrameSender {
    /// Send frame `seq` of encoded `entries` from node `origin`, waiting while
    /// `window` frames are queued for the stream.
    pub async fn send(&self, seq: u64, origin: NodeId, entries: Bytes) -> Result<(), Closed> {
        let frame = ForwardFrame {
            seq,
            origin_node: origin,
            entries,
        };
        self.0.send(frame).await.map_err(|_| Closed)
    }
}

/// The acknowledgements coming back on an open forward stream.
pub struct Acks(Streaming<ForwardAck>);

impl Acks {
    /// The sequence number the peer acknowledges next (every frame up to it is
    /// delivered); `None` once the stream has ended or broken. Cancel safe.
    pub async fn next(&mut self) -> Option<u64> {
        match self.0.message().await {
            Ok(Some(ack)) => Some(ack.seq),
            Ok(None) | Err(_) => None,
        }
    }
}

/// Open a forward stream to the node at `addr`, with room for `window` frames
/// queued on the way out; fails after [`OPEN_TIMEOUT`].
pub async fn open(addr: &str, window: usize) -> Result<(FrameSender, Acks), String> {
    tokio::time::timeout(OPEN_TIMEOUT, open_now(addr, window))
        .await
        .map_err(|_| format!("peer {addr} did not open the forward stream in {OPEN_TIMEOUT:?}"))?
}

async fn open_now(addr: &str, window: usize) -> Result<(FrameSender, Acks), String> {
    let endpoint = crate::cluster::tls::endpoint(addr)?
        .connect_timeout(Duration::from_secs(2))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = crate::cluster::tls::dial(endpoint)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let (frames, frames_rx) = mpsc::channel(window);
    let mut client = ForwardClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let acks = client
        .stream(ReceiverStream::new(frames_rx))
        .await
        .map_err(|s| format!("peer {addr} refused the forward stream: {}", s.message()))?
        .into_inner();
    Ok((FrameSender(frames), Acks(acks)))
}
