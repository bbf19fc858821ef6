//! Packet-level helpers for tests that drive a [`RawClient`]: building PUBLISH and
//! SUBSCRIBE packets and waiting for the packets that matter.

use std::time::{Duration, Instant};

use broker_node::mqtt::{
    Packet, Publish, PublishProperties, QoS, ReasonCode, RetainHandling, Subscribe,
    SubscribeProperties, SubscriptionOptions,
};
use bytes::Bytes;

use crate::RawClient;

/// A PUBLISH of `payload` to `topic` (packet id `id` unless QoS 0).
pub fn publish(topic: &str, payload: &str, qos: QoS, retain: bool, id: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        packet_id: (qos != QoS::AtMostOnce).then_some(id),
        properties: PublishProperties::default(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    })
}

/// Subscribe to one filter with `options` under packet id `id`; the SUBACK reason codes.
pub fn subscribe_with(
    c: &mut RawClient,
    filter: &str,
    options: SubscriptionOptions,
    id: u16,
) -> Vec<ReasonCode> {
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: id,
        filters: vec![(filter.into(), options)],
        properties: SubscribeProperties::default(),
    }));
    loop {
        match c.recv(Duration::from_secs(10)) {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.packet_id, id);
                return a.reason_codes;
            }
            Some(_) => {}
            None => panic!("no SUBACK"),
        }
    }
}

/// Subscription options at `qos`, everything else at the defaults.
pub fn opts(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::SendAtSubscribe,
    }
}

/// Subscribe to `filter` at `qos` (packet id 1); the SUBACK reason codes.
pub fn subscribe(c: &mut RawClient, filter: &str, qos: QoS) -> Vec<ReasonCode> {
    subscribe_with(c, filter, opts(qos), 1)
}

/// The next PUBLISH, skipping acknowledgements.
pub fn next_publish(c: &mut RawClient, timeout: Duration) -> Option<Publish> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left)? {
            Packet::Publish(p) => return Some(p),
            _ => continue,
        }
    }
}

/// The reason code of the next DISCONNECT, skipping other packets.
pub fn disconnect_reason(c: &mut RawClient, timeout: Duration) -> Option<ReasonCode> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left)? {
            Packet::Disconnect(d) => return Some(d.reason_code),
            _ => continue,
        }
    }
}

/// Receive `n` PUBLISHes within `timeout`, acknowledging them as a client does
/// (PUBACK, PUBREC then PUBCOMP for PUBREL); panics with what arrived if they do not.
pub fn receive_acked(c: &mut RawClient, n: usize, timeout: Duration) -> Vec<Publish> {
    receive_acked_until(c, timeout, &format!("{n} messages"), |got| got.len() >= n)
}

/// Receive PUBLISHes within `timeout`, acknowledging them as [`receive_acked`] does,
/// until `done` says of those received so far that they are enough (`what`, in the
/// panic when they do not arrive in time).
pub fn receive_acked_until(
    c: &mut RawClient,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[Publish]) -> bool,
) -> Vec<Publish> {
    use broker_node::mqtt::{PubAck, PubComp, PubRec};
    let mut got = Vec::new();
    let deadline = Instant::now() + timeout;
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left) {
            Some(Packet::Publish(p)) => {
                match (p.qos, p.packet_id) {
                    (QoS::AtLeastOnce, Some(id)) => {
                        c.send(&Packet::PubAck(PubAck::new(id, ReasonCode::Success)))
                    }
                    (QoS::ExactlyOnce, Some(id)) => {
                        c.send(&Packet::PubRec(PubRec::new(id, ReasonCode::Success)))
                    }
                    _ => {}
                }
                got.push(p);
            }
            Some(Packet::PubRel(r)) => c.send(&Packet::PubComp(PubComp::new(
                r.packet_id,
                ReasonCode::Success,
            ))),
            Some(_) => {}
            None => panic!(
                "not {what} in {timeout:?}; got {:?}",
                got.iter().map(|p| &p.topic).collect::<Vec<_>>()
            ),
        }
    }
    got
}
