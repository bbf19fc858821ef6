//! A bridge's side towards the remote broker: rumqttc's client for MQTT 3.1.1 or 5,
//! over TCP or TLS (our rustls), behind one type. rumqttc's event loop runs in a task
//! of its own that turns its events into [`RemoteEvent`]s and waits, with exponential
//! backoff and jitter, before each reconnection; the loop keeps its session state
//! across reconnections (unacknowledged publishes and PUBRELs are sent again).
//!
//! What rumqttc gives: QoS 1 at least once; QoS 2 exactly once within one network
//! connection, and the PUBREL of an outgoing QoS 2 message is sent again after a
//! reconnection. Its state of incoming QoS 2 messages is cleared on reconnection, so
//! a PUBREL the remote sends again afterwards would be refused: the bridge therefore
//! subscribes on the remote at QoS 1 at most (incoming QoS 2 messages arrive at
//! least once and are published locally at their mapping's QoS).

use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rumqttc::v5::mqttbytes::v5 as m5;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{BridgeConfig, BridgeProtocol};
use crate::mqtt::PublishProperties;

use super::topics::Needed;
use super::BridgeError;

/// Requests waiting for rumqttc's event loop.
const REQUEST_CAPACITY: usize = 64;
/// Most unacknowledged publishes towards the remote.
const INFLIGHT: u16 = 64;

/// A message from the remote broker, to be acknowledged once published locally.
pub struct Incoming {
    /// Its topic on the remote.
    pub topic: String,
    /// Its QoS.
    pub qos: u8,
    /// Its retain flag.
    pub retain: bool,
    /// Its payload.
    pub payload: Bytes,
    /// Its v5 properties (empty from a 3.1.1 remote).
    pub properties: PublishProperties,
    /// What acknowledging it needs.
    pub ack: AckToken,
}

/// The received publish rumqttc needs back to acknowledge it.
pub enum AckToken {
    /// From a 3.1.1 remote.
    V4(rumqttc::Publish),
    /// From a v5 remote.
    V5(m5::Publish),
}

/// What happened on the remote connection.
pub enum RemoteEvent {
    /// CONNACK accepted.
    Connected,
    /// A message arrived.
    Message(Box<Incoming>),
    /// A publish left with this packet identifier (again, after a reconnection).
    Sent(u16),
    /// The remote took the publish with this packet identifier (PUBACK for QoS 1,
    /// PUBCOMP for QoS 2).
    Done(u16),
    /// The connection broke or was refused; the loop waits and tries again.
    Lost(String),
}

/// The client half: publish, subscribe, acknowledge.
#[derive(Clone)]
pub enum Remote {
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
    /// MQTT 5.
    V5(rumqttc::v5::AsyncClient),
}

fn qos4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn client_error(e: impl std::fmt::Display) -> BridgeError {
    BridgeError::Remote(format!("client: {e}"))
}

impl Remote {
    /// Start the client of `config`: its event loop runs until `cancel`, reporting on
    /// `events`, backing off between `reconnect_min` and `reconnect_max`.
    pub fn start(
        config: &BridgeConfig,
        events: mpsc::UnboundedSender<RemoteEvent>,
        cancel: CancellationToken,
    ) -> Result<Remote, BridgeError> {
        let (host, port) = config
            .address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_owned(), p.parse().ok()?)))
            .ok_or_else(|| BridgeError::Config(format!("'{}' is not HOST:PORT", config.address)))?;
        let transport = if config.tls {
            let tls = super::tls::client_config(config)?;
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls))
        } else {
            rumqttc::Transport::tcp()
        };
        let backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
        let client_id = config.remote_client_id();
        let keep_alive = config.keep_alive.max(Duration::from_secs(5));
        match config.protocol {
            BridgeProtocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, host, port);
                o.set_transport(transport)
                    .set_keep_alive(keep_alive)
                    .set_clean_session(config.clean_start)
                    .set_manual_acks(true)
                    .set_inflight(INFLIGHT)
                    .set_max_packet_size(super::MAX_PACKET as usize, super::MAX_PACKET as usize);
                if let Some(user) = &config.username {
                    o.set_credentials(user, config.password.clone().unwrap_or_default());
                }
                if config.notifications {
                    o.set_last_will(rumqttc::LastWill::new(
                        config.notification_topic(),
                        "0",
                        qos4(1),
                        true,
                    ));
                }
                let (client, eventloop) = rumqttc::AsyncClient::new(o, REQUEST_CAPACITY);
                tokio::spawn(run(eventloop, events, backoff, cancel));
                Ok(Remote::V4(client))
            }
            BridgeProtocol::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(client_id, host, port);
                o.set_transport(transport)
                    .set_keep_alive(keep_alive)
                    .set_clean_start(config.clean_start)
                    .set_manual_acks(true)
                    .set_session_expiry_interval(Some(
                        u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX),
                    ))
                    .set_receive_maximum(Some(INFLIGHT))
                    .set_max_packet_size(Some(super::MAX_PACKET));
                if let Some(user) = &config.username {
                    o.set_credentials(user, config.password.clone().unwrap_or_default());
                }
                if config.notifications {
                    o.set_last_will(m5::LastWill::new(
                        config.notification_topic(),
                        "0",
                        qos5(1),
                        true,
                        None,
                    ));
                }
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, REQUEST_CAPACITY);
                tokio::spawn(run(eventloop, events, backoff, cancel));
                Ok(Remote::V5(client))
            }
        }
    }

    /// Subscribe to `filters` (v5: no-local and retain as published, so that what
    /// the bridge publishes is not sent back to it). QoS 2 is asked as QoS 1: see
    /// the module's note.
    pub async fn subscribe(&self, filters: &[Needed]) -> Result<(), BridgeError> {
        if filters.is_empty() {
            return Ok(());
        }
        match self {
            Remote::V4(c) => c
                .subscribe_many(
                    filters.iter().map(|n| {
                        rumqttc::SubscribeFilter::new(n.filter.clone(), qos4(n.qos.min(1)))
                    }),
                )
                .await
                .map_err(client_error),
            Remote::V5(c) => c
                .subscribe_many(filters.iter().map(|n| m5::Filter {
                    path: n.filter.clone(),
                    qos: qos5(n.qos.min(1)),
                    nolocal: true,
                    preserve_retain: true,
                    retain_forward_rule: m5::RetainForwardRule::OnNewSubscribe,
                }))
                .await
                .map_err(client_error),
        }
    }

    /// Publish a message on the remote.
    pub async fn publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Bytes,
        properties: &PublishProperties,
    ) -> Result<(), BridgeError> {
        match self {
            Remote::V4(c) => c
                .publish_bytes(topic, qos4(qos), retain, payload)
                .await
                .map_err(client_error),
            Remote::V5(c) => c
                .publish_bytes_with_properties(topic, qos5(qos), retain, payload, to_v5(properties))
                .await
                .map_err(client_error),
        }
    }

    /// Acknowledge a message from the remote.
    pub async fn ack(&self, token: &AckToken) -> Result<(), BridgeError> {
        match (self, token) {
            (Remote::V4(c), AckToken::V4(p)) => c.ack(p).await.map_err(client_error),
            (Remote::V5(c), AckToken::V5(p)) => c.ack(p).await.map_err(client_error),
            _ => Err(BridgeError::Remote(
                "acknowledgement of another protocol".into(),
            )),
        }
    }
}

/// Our properties as rumqttc's (topic aliases and subscription identifiers belong to
/// one connection and stay behind).
fn to_v5(p: &PublishProperties) -> m5::PublishProperties {
    m5::PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.clone(),
    }
}

fn from_v5(p: Option<m5::PublishProperties>) -> PublishProperties {
    let Some(p) = p else {
        return PublishProperties::default();
    };
    PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        content_type: p.content_type,
        ..PublishProperties::default()
    }
}

/// Exponential backoff with full jitter: the n-th wait is drawn from
/// [base/2, base] where base = min(max, min × 2ⁿ).
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// From `min` doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            failures: 0,
        }
    }

    /// The wait before the next attempt.
    pub fn next_wait(&mut self) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = base / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    /// A connection succeeded: start again from `min`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Wait `d` unless cancelled; false when cancelled.
async fn pause(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// One of rumqttc's event loops (3.1.1 or 5), its events in the bridge's terms.
trait EventLoop: Send + 'static {
    /// The next event the bridge cares about (`None` for one it does not), or the
    /// connection's failure.
    fn next(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<RemoteEvent>, String>> + Send;
}

impl EventLoop for rumqttc::EventLoop {
    async fn next(&mut self) -> Result<Option<RemoteEvent>, String> {
        use rumqttc::{Event, Outgoing, Packet};
        Ok(Some(
            match self.poll().await.map_err(|e| e.to_string())? {
                Event::Incoming(Packet::ConnAck(_)) => RemoteEvent::Connected,
                Event::Incoming(Packet::Publish(p)) => RemoteEvent::Message(Box::new(Incoming {
                    topic: p.topic.clone(),
                    qos: p.qos as u8,
                    retain: p.retain,
                    payload: p.payload.clone(),
                    properties: PublishProperties::default(),
                    ack: AckToken::V4(p),
                })),
                Event::Incoming(Packet::PubAck(a)) => RemoteEvent::Done(a.pkid),
                Event::Incoming(Packet::PubComp(a)) => RemoteEvent::Done(a.pkid),
                Event::Outgoing(Outgoing::Publish(pkid)) => RemoteEvent::Sent(pkid),
                _ => return Ok(None),
            },
        ))
    }
}

impl EventLoop for rumqttc::v5::EventLoop {
    async fn next(&mut self) -> Result<Option<RemoteEvent>, String> {
        use rumqttc::v5::{Event, Incoming as In};
        use rumqttc::Outgoing;
        Ok(Some(
            match self.poll().await.map_err(|e| e.to_string())? {
                Event::Incoming(In::ConnAck(_)) => RemoteEvent::Connected,
                Event::Incoming(In::Publish(p)) => RemoteEvent::Message(Box::new(Incoming {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    qos: p.qos as u8,
                    retain: p.retain,
                    payload: p.payload.clone(),
                    properties: from_v5(p.properties.clone()),
                    ack: AckToken::V5(p),
                })),
                Event::Incoming(In::PubAck(a)) => RemoteEvent::Done(a.pkid),
                Event::Incoming(In::PubComp(a)) => RemoteEvent::Done(a.pkid),
                Event::Outgoing(Outgoing::Publish(pkid)) => RemoteEvent::Sent(pkid),
                _ => return Ok(None),
            },
        ))
    }
}

/// Drive `eventloop` (rumqttc reconnects on the next poll after a failure), reporting
/// its events on `events` and waiting `backoff` after each failure, until `cancel` or
/// until nobody listens.
async fn run(
    mut eventloop: impl EventLoop,
    events: mpsc::UnboundedSender<RemoteEvent>,
    mut backoff: Backoff,
    cancel: CancellationToken,
) {
    loop {
        let polled = tokio::select! {
            _ = cancel.cancelled() => return,
            polled = eventloop.next() => polled,
        };
        let event = match polled {
            Ok(Some(event)) => event,
            Ok(None) => continue,
            Err(e) => {
                if events.send(RemoteEvent::Lost(e)).is_err() {
                    return;
                }
                if !pause(backoff.next_wait(), &cancel).await {
                    return;
                }
                continue;
            }
        };
        if matches!(event, RemoteEvent::Connected) {
            backoff.reset();
        }
        if events.send(event).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_maximum_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for base in [100u64, 200, 400, 800, 1000, 1000] {
            let d = b.next_wait();
            assert!(
                d >= Duration::from_millis(base / 2) && d <= Duration::from_millis(base),
                "{d:?} outside [{}ms, {base}ms]",
                base / 2
            );
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }
}
