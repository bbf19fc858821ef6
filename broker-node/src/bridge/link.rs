//! One run of a bridge: its two sides connected and the messages moved between them
//! until the local side fails or the run is cancelled (the remote side reconnects by
//! itself). Acknowledgements cross over: a local message is acknowledged locally once
//! the remote took it, a remote one remotely once the local broker accepted it.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::Connections;
use crate::config::BridgeProtocol;
use crate::mqtt::{Packet, PubAck, PubComp, PubRec, PubRel, Publish, QoS, ReasonCode};

use super::echo::Echoes;
use super::local::Local;
use super::remote::{AckToken, Incoming, Remote, RemoteEvent};
use super::topics::Mappings;
use super::{BridgeError, BridgeStatus};

/// A local message handed to the remote client, awaiting the remote's acknowledgement.
#[derive(Clone, Copy)]
struct Pending {
    /// Its packet identifier on the local side.
    local_id: u16,
    /// Its QoS (1: PUBACK locally; 2: PUBREC).
    qos: QoS,
    /// Its payload's size, counted once the remote took it.
    bytes: usize,
}

/// Run the link of `status`'s bridge until `cancel` or a failure.
pub async fn run(
    handler: &Connections,
    status: &BridgeStatus,
    cancel: CancellationToken,
) -> Result<(), BridgeError> {
    let cfg = &status.config;
    let maps = Mappings::new(cfg.topics.clone());
    // The local session first: opening it commits through Raft, so a leader cut off
    // from the majority (which may not know yet that it is no longer leader) cannot
    // run the bridge beside the new leader's.
    let (mut local, session_present) = Local::connect(
        handler,
        &cfg.local_client_id(),
        cfg.local_username.as_deref(),
        &maps.local_subscriptions(),
    )
    .await?;
    tracing::info!(bridge = %cfg.name, session_present, "bridge: local session open");
    // The remote client's event loop stops with this run.
    let _stop_remote = cancel.clone().drop_guard();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let remote = Remote::start(cfg, events_tx, cancel.clone())?;

    // A publish towards an unreachable remote waits for room in rumqttc's queue:
    // cancellation must not wait for it.
    tokio::select! {
        _ = cancel.cancelled() => Ok(()),
        r = pump(status, &maps, &remote, &mut local, &mut events) => r,
    }
}

/// Move messages and acknowledgements between the sides until one fails.
async fn pump(
    status: &BridgeStatus,
    maps: &Mappings,
    remote: &Remote,
    local: &mut Local,
    events: &mut mpsc::UnboundedReceiver<RemoteEvent>,
) -> Result<(), BridgeError> {
    let cfg = &status.config;
    // Local messages given to rumqttc whose remote packet identifier is not known yet
    // (rumqttc reports them in the order they were given), then by that identifier.
    let mut unnumbered: VecDeque<Pending> = VecDeque::new();
    let mut by_remote_id: HashMap<u16, Pending> = HashMap::new();
    // Remote messages published locally and their payload sizes, by local packet
    // identifier, until the local broker answers.
    let mut inbound: HashMap<u16, (AckToken, usize)> = HashMap::new();
    let mut echoes = Echoes::default();
    let v311 = cfg.protocol == BridgeProtocol::V311;

    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else {
                    return Err(BridgeError::Remote("client stopped".into()));
                };
                match event {
                    RemoteEvent::Connected => {
                        tracing::info!(bridge = %cfg.name, address = %cfg.address, "bridge: connected to the remote");
                        status.set_connected(true);
                        remote.subscribe(&maps.remote_subscriptions()).await?;
                        if cfg.notifications {
                            notify(status, remote, local, true).await?;
                        }
                    }
                    RemoteEvent::Lost(why) => {
                        if status.connected.load(std::sync::atomic::Ordering::Relaxed) {
                            tracing::warn!(bridge = %cfg.name, error = %why, "bridge: remote connection lost");
                        } else {
                            tracing::debug!(bridge = %cfg.name, error = %why, "bridge: cannot reach the remote");
                        }
                        status.lost(why);
                        if cfg.notifications {
                            notify(status, remote, local, false).await?;
                        }
                    }
                    RemoteEvent::Sent(0) => {}
                    RemoteEvent::Sent(remote_id) => {
                        // A publish sent again after a reconnection keeps its identifier.
                        if let std::collections::hash_map::Entry::Vacant(slot) = by_remote_id.entry(remote_id) {
                            if let Some(p) = unnumbered.pop_front() {
                                slot.insert(p);
                            }
                        }
                    }
                    RemoteEvent::Done(remote_id) => {
                        if let Some(p) = by_remote_id.remove(&remote_id) {
                            status.count(true, p.bytes);
                            let ack = match p.qos {
                                QoS::ExactlyOnce => Packet::PubRec(PubRec::new(p.local_id, ReasonCode::Success)),
                                _ => Packet::PubAck(PubAck::new(p.local_id, ReasonCode::Success)),
                            };
                            local.send(ack).await?;
                        }
                    }
                    RemoteEvent::Message(m) => {
                        incoming(*m, maps, remote, local, &mut inbound, &mut echoes, v311, status).await?;
                    }
                }
            }
            packet = local.recv() => match packet? {
                Packet::Publish(p) => {
                    outgoing(p, maps, remote, local, &mut unnumbered, &mut echoes, v311, status).await?;
                }
                Packet::PubAck(a) => {
                    if let Some((token, bytes)) = inbound.remove(&a.packet_id) {
                        if accepted(status, a.reason_code)? {
                            status.count(false, bytes);
                        }
                        remote.ack(&token).await?;
                    }
                }
                Packet::PubRec(a) => {
                    if let Some((token, bytes)) = inbound.remove(&a.packet_id) {
                        if accepted(status, a.reason_code)? {
                            status.count(false, bytes);
                            local.send(Packet::PubRel(PubRel::new(a.packet_id, ReasonCode::Success))).await?;
                        }
                        remote.ack(&token).await?;
                    }
                }
                Packet::PubRel(r) => {
                    local.send(Packet::PubComp(PubComp::new(r.packet_id, ReasonCode::Success))).await?;
                }
                Packet::SubAck(s) if s.reason_codes.iter().any(|c| c.is_error()) => {
                    tracing::warn!(bridge = %cfg.name, codes = ?s.reason_codes, "bridge: a local subscription was refused");
                }
                Packet::Disconnect(d) => {
                    return Err(BridgeError::Local(format!("disconnected by the broker: {:?}", d.reason_code)));
                }
                _ => {}
            },
        }
    }
}

/// Publish the bridge's state, retained, at QoS 0 (so that no acknowledgement of it
/// is awaited or taken for a bridged message's): locally, and on the remote once
/// connected (the remote publishes the will "0" itself when the connection breaks).
async fn notify(
    status: &BridgeStatus,
    remote: &Remote,
    local: &mut Local,
    up: bool,
) -> Result<(), BridgeError> {
    let topic = status.config.notification_topic();
    let payload = bytes::Bytes::from_static(if up { b"1" } else { b"0" });
    if up {
        remote
            .publish(topic.clone(), 0, true, payload.clone(), &Default::default())
            .await?;
    }
    local
        .send(Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic,
            packet_id: None,
            properties: Default::default(),
            payload,
        }))
        .await
}

/// Whether the local broker's answer to a bridged message lets the bridge acknowledge
/// it to the remote: yes when accepted, and when refused for good (ACL, invalid: it
/// would be refused again); a refusal that may pass later (unavailable, quota) ends
/// the run unacknowledged, so that the remote sends the message again. `Ok(true)`:
/// accepted; `Ok(false)`: refused for good.
fn accepted(status: &BridgeStatus, code: ReasonCode) -> Result<bool, BridgeError> {
    if !code.is_error() {
        return Ok(true);
    }
    match code {
        ReasonCode::UnspecifiedError
        | ReasonCode::ImplementationSpecificError
        | ReasonCode::ServerUnavailable
        | ReasonCode::ServerBusy
        | ReasonCode::QuotaExceeded => Err(BridgeError::Local(format!(
            "a bridged message was refused for now: {code:?}"
        ))),
        _ => {
            tracing::warn!(bridge = %status.config.name, ?code, "bridge: a message from the remote was refused locally and is dropped");
            Ok(false)
        }
    }
}

/// A message from the remote: published locally under its local name.
#[allow(clippy::too_many_arguments)]
async fn incoming(
    m: Incoming,
    maps: &Mappings,
    remote: &Remote,
    local: &mut Local,
    inbound: &mut HashMap<u16, (AckToken, usize)>,
    echoes: &mut Echoes,
    v311: bool,
    status: &BridgeStatus,
) -> Result<(), BridgeError> {
    let local_topic = match maps.to_local(&m.topic) {
        Some(t) if !(v311 && echoes.is_echo(&m.topic, &m.payload, Instant::now())) => t,
        _ => return remote.ack(&m.ack).await,
    };
    let qos = QoS::try_from(m.qos).unwrap_or(QoS::AtLeastOnce);
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        let mut id = local.next_packet_id();
        while inbound.contains_key(&id) {
            id = local.next_packet_id();
        }
        Some(id)
    };
    let bytes = m.payload.len();
    local
        .send(Packet::Publish(Publish {
            dup: false,
            qos,
            retain: m.retain,
            topic: local_topic,
            packet_id,
            properties: m.properties,
            payload: m.payload,
        }))
        .await?;
    match packet_id {
        Some(id) => {
            inbound.insert(id, (m.ack, bytes));
            Ok(())
        }
        None => {
            status.count(false, bytes);
            remote.ack(&m.ack).await
        }
    }
}

/// A message of the local session: published on the remote under its remote name.
#[allow(clippy::too_many_arguments)]
async fn outgoing(
    p: Publish,
    maps: &Mappings,
    remote: &Remote,
    local: &mut Local,
    unnumbered: &mut VecDeque<Pending>,
    echoes: &mut Echoes,
    v311: bool,
    status: &BridgeStatus,
) -> Result<(), BridgeError> {
    let Some(remote_topic) = maps.to_remote(&p.topic) else {
        // A subscription of an earlier configuration: acknowledged and dropped.
        return match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => {
                local
                    .send(Packet::PubAck(PubAck::new(id, ReasonCode::Success)))
                    .await
            }
            (QoS::ExactlyOnce, Some(id)) => {
                local
                    .send(Packet::PubRec(PubRec::new(id, ReasonCode::Success)))
                    .await
            }
            _ => Ok(()),
        };
    };
    if v311 && maps.echoes(&remote_topic) {
        echoes.sent(&remote_topic, &p.payload, Instant::now());
    }
    if let (QoS::AtLeastOnce | QoS::ExactlyOnce, Some(local_id)) = (p.qos, p.packet_id) {
        unnumbered.push_back(Pending {
            local_id,
            qos: p.qos,
            bytes: p.payload.len(),
        });
    } else {
        status.count(true, p.payload.len());
    }
    remote
        .publish(
            remote_topic,
            p.qos as u8,
            p.retain,
            p.payload,
            &p.properties,
        )
        .await
}
