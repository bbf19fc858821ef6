//! One run of a bridge: its two sides connected and the messages moved between them
//! until the local side fails or the run is cancelled (the remote side reconnects by
//! itself). Acknowledgements cross over: a local message is acknowledged locally once
//! the remote took it, a remote one remotely once the local broker accepted it.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::Connections;
use crate::config::BridgeProtocol;
use crate::mqtt::{Packet, PubAck, PubComp, PubRec, PubRel, Publish, QoS, ReasonCode};

use super::echo::Echoes;
use super::local::Local;
use super::remote::{Incoming, Remote, RemoteEvent};
use super::session::{Ack, Outgoing};
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
    let remote = Remote::start(cfg, maps.remote_subscriptions(), events_tx, cancel.clone())?;

    // A request to the remote client waits for room in its queue: cancellation must
    // not wait for it.
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
    // Local messages given to the remote client, by ticket, until the remote took them.
    let mut outbound = Outbound::default();
    // Remote messages published locally and their payload sizes, by local packet
    // identifier, until the local broker answers.
    let mut inbound: HashMap<u16, (Ack, usize)> = HashMap::new();
    let mut echoes = Echoes::default();
    let v311 = cfg.protocol == BridgeProtocol::V311;

    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else {
                    return Err(BridgeError::Remote("client stopped".into()));
                };
                match event {
                    RemoteEvent::Connected { session_present } => {
                        tracing::info!(bridge = %cfg.name, address = %cfg.address, session_present, "bridge: connected to the remote");
                        status.set_connected(true);
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
                    RemoteEvent::Done { ticket, refused } => {
                        if let Some(p) = outbound.by_ticket.remove(&ticket) {
                            match refused {
                                None => status.count(true, p.bytes),
                                Some(code) => tracing::warn!(bridge = %cfg.name, ?code, "bridge: the remote refused a message; it is dropped"),
                            }
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
                    outgoing(p, maps, remote, local, &mut outbound, &mut echoes, v311, status).await?;
                }
                Packet::PubAck(a) => {
                    if let Some((ack, bytes)) = inbound.remove(&a.packet_id) {
                        if accepted(status, a.reason_code)? {
                            status.count(false, bytes);
                        }
                        remote.ack(ack).await?;
                    }
                }
                Packet::PubRec(a) => {
                    if let Some((ack, bytes)) = inbound.remove(&a.packet_id) {
                        if accepted(status, a.reason_code)? {
                            status.count(false, bytes);
                            local.send(Packet::PubRel(PubRel::new(a.packet_id, ReasonCode::Success))).await?;
                        }
                        remote.ack(ack).await?;
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
            .publish(Outgoing {
                topic: topic.clone(),
                qos: QoS::AtMostOnce,
                retain: true,
                payload: payload.clone(),
                properties: Default::default(),
                ticket: None,
            })
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
    inbound: &mut HashMap<u16, (Ack, usize)>,
    echoes: &mut Echoes,
    v311: bool,
    status: &BridgeStatus,
) -> Result<(), BridgeError> {
    let Incoming { publish: p, ack } = m;
    let local_topic = match maps.to_local(&p.topic) {
        Some(t) if !(v311 && echoes.is_echo(&p.topic, &p.payload, Instant::now())) => t,
        _ => return remote.ack(ack).await,
    };
    let packet_id = if p.qos == QoS::AtMostOnce {
        None
    } else {
        let mut id = local.next_packet_id();
        while inbound.contains_key(&id) {
            id = local.next_packet_id();
        }
        Some(id)
    };
    let bytes = p.payload.len();
    let mut properties = p.properties;
    // Topic aliases and subscription identifiers belong to the remote connection.
    properties.topic_alias = None;
    properties.subscription_identifiers.clear();
    local
        .send(Packet::Publish(Publish {
            dup: false,
            qos: p.qos,
            retain: p.retain,
            topic: local_topic,
            packet_id,
            properties,
            payload: p.payload,
        }))
        .await?;
    match packet_id {
        Some(id) => {
            inbound.insert(id, (ack, bytes));
            Ok(())
        }
        None => {
            status.count(false, bytes);
            remote.ack(ack).await
        }
    }
}

/// The local messages handed to the remote client and not yet taken by the remote.
#[derive(Default)]
struct Outbound {
    by_ticket: HashMap<u64, Pending>,
    last_ticket: u64,
}

/// A message of the local session: published on the remote under its remote name.
#[allow(clippy::too_many_arguments)]
async fn outgoing(
    mut p: Publish,
    maps: &Mappings,
    remote: &Remote,
    local: &mut Local,
    outbound: &mut Outbound,
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
    let ticket = match (p.qos, p.packet_id) {
        (QoS::AtLeastOnce | QoS::ExactlyOnce, Some(local_id)) => {
            outbound.last_ticket += 1;
            let ticket = outbound.last_ticket;
            outbound.by_ticket.insert(
                ticket,
                Pending {
                    local_id,
                    qos: p.qos,
                    bytes: p.payload.len(),
                },
            );
            Some(ticket)
        }
        _ => {
            status.count(true, p.payload.len());
            None
        }
    };
    // Topic aliases and subscription identifiers belong to the local connection.
    p.properties.topic_alias = None;
    p.properties.subscription_identifiers.clear();
    remote
        .publish(Outgoing {
            topic: remote_topic,
            qos: p.qos,
            retain: p.retain,
            payload: p.payload,
            properties: p.properties,
            ticket,
        })
        .await
}
