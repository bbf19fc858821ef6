//! The state of a bridge's session on the remote broker, as its client keeps it: the
//! QoS 1/2 messages sent and not yet acknowledged, those waiting for room in the
//! remote's receive window, and the remote's QoS 1/2 messages handed over and not yet
//! finished. It outlives each network connection, so that a reconnection resumes the
//! remote session: unacknowledged PUBLISHes go again with DUP and the same packet
//! identifier, PUBRELs again, and a message the remote sends again is not handed
//! over twice. That makes each remote hop exactly once for QoS 2 across
//! reconnections (and QoS 1 at least once, with no copy handed over while the first
//! is in hand).
//!
//! I/O-free: every entry point returns the packets to send and the events for the
//! link; the client in `remote.rs` does the I/O. Owned by that client's task.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use crate::mqtt::{
    ConnAck, Packet, PubAck, PubComp, PubRec, PubRel, Publish, PublishProperties, QoS, ReasonCode,
};

/// The most unacknowledged publishes towards the remote (less if it asks).
pub const INFLIGHT: u16 = 64;

/// A local message for the remote.
#[derive(Debug)]
pub struct Outgoing {
    /// Its topic on the remote.
    pub topic: String,
    /// Its QoS.
    pub qos: QoS,
    /// Its retain flag.
    pub retain: bool,
    /// Its payload.
    pub payload: Bytes,
    /// Its v5 properties.
    pub properties: PublishProperties,
    /// The link's name for it, returned in [`Output::Done`]; `None` for a message
    /// nobody waits for (the bridge's notifications).
    pub ticket: Option<u64>,
}

/// What acknowledging a message from the remote needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Its packet identifier on the remote connection.
    pub packet_id: u16,
    /// Its QoS.
    pub qos: QoS,
}

/// What the session asks of its client.
#[derive(Debug)]
pub enum Output {
    /// Send this packet now.
    Send(Packet),
    /// A message arrived: hand it to the link, which acknowledges it with `ack`.
    Deliver(Publish, Ack),
    /// The remote took message `ticket` (PUBACK, PUBCOMP; or a QoS 0 send), or
    /// refused it for good with `refused`.
    Done {
        /// The link's name for it.
        ticket: u64,
        /// The remote's refusal, if it refused.
        refused: Option<ReasonCode>,
    },
}

/// How far one of our messages is on the remote.
#[derive(Debug)]
enum Stage {
    /// PUBLISH sent; PUBACK or PUBREC awaited. Kept whole to be sent again.
    Published(Box<Publish>),
    /// PUBREC received, PUBREL sent; PUBCOMP awaited.
    Released,
}

#[derive(Debug)]
struct InFlight {
    packet_id: u16,
    ticket: Option<u64>,
    stage: Stage,
}

/// How far one of the remote's QoS 1/2 messages is here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inbound {
    /// Handed to the link, not yet acknowledged by it: a copy sent again is dropped.
    Delivering,
    /// Acknowledged by the link: QoS 2, PUBREC sent (or owed, if the connection was
    /// down), PUBREL awaited; QoS 1, PUBACK owed (the connection was down), sent when
    /// the remote sends the message again.
    Acknowledged,
}

/// What the remote allows on the current connection (CONNACK's v5 properties).
#[derive(Clone, Copy, Debug)]
struct Limits {
    window: usize,
    maximum_qos: QoS,
    retain_available: bool,
    maximum_packet_size: Option<u32>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            window: usize::from(INFLIGHT),
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
            maximum_packet_size: None,
        }
    }
}

/// The session; see the module's note.
#[derive(Debug, Default)]
pub struct Session {
    /// Sent and unacknowledged, in the order first sent (the order they go again).
    inflight: VecDeque<InFlight>,
    /// Beyond the window, in the order given.
    waiting: VecDeque<Outgoing>,
    /// The remote's messages by packet identifier.
    inbound: HashMap<u16, Inbound>,
    /// The packet identifier of our SUBSCRIBE in flight, kept out of the publishes'.
    subscribe_id: Option<u16>,
    last_id: u16,
    /// Whether a connection is up (sends are possible).
    online: bool,
    limits: Limits,
}

impl Session {
    /// A connection was accepted with `connack`: resume the session (or, when the
    /// remote kept none, start a new one) and send what is owed.
    pub fn connected(&mut self, connack: &ConnAck) -> Vec<Output> {
        let p = &connack.properties;
        self.limits = Limits {
            window: usize::from(p.receive_maximum.unwrap_or(INFLIGHT).clamp(1, INFLIGHT)),
            maximum_qos: p
                .maximum_qos
                .and_then(|q| QoS::try_from(q).ok())
                .unwrap_or(QoS::ExactlyOnce),
            retain_available: p.retain_available.unwrap_or(true),
            maximum_packet_size: p.maximum_packet_size,
        };
        self.online = true;
        self.subscribe_id = None;
        let mut out = Vec::new();
        if connack.session_present {
            // Everything unacknowledged goes again, in order, with the same packet
            // identifiers, so the remote recognises what it already has [MQTT-4.4.0-1].
            for f in &mut self.inflight {
                out.push(Output::Send(match &mut f.stage {
                    Stage::Published(p) => {
                        p.dup = true;
                        Packet::Publish((**p).clone())
                    }
                    Stage::Released => {
                        Packet::PubRel(PubRel::new(f.packet_id, ReasonCode::Success))
                    }
                }));
            }
        } else {
            // A new session: the remote forgot our messages and its own. A released
            // message had reached it (PUBREC) and is done; a published one goes again
            // as new, at least once; its messages will not come again.
            self.inbound.clear();
            let mut again = Vec::new();
            for f in self.inflight.drain(..) {
                match f.stage {
                    Stage::Released => {
                        if let Some(ticket) = f.ticket {
                            out.push(Output::Done {
                                ticket,
                                refused: None,
                            });
                        }
                    }
                    Stage::Published(p) => again.push(Outgoing {
                        topic: p.topic,
                        qos: p.qos,
                        retain: p.retain,
                        payload: p.payload,
                        properties: p.properties,
                        ticket: f.ticket,
                    }),
                }
            }
            for o in again.into_iter().rev() {
                self.waiting.push_front(o);
            }
        }
        self.pump(&mut out);
        out
    }

    /// The connection broke: keep everything for the next one.
    pub fn disconnected(&mut self) {
        self.online = false;
        self.subscribe_id = None;
    }

    /// Send `o` now if the window allows, else when it does. A QoS 0 message while
    /// no connection is up is dropped (at most once): kept, such messages would pile
    /// up without bound through an outage, as nothing acknowledges them.
    pub fn publish(&mut self, o: Outgoing) -> Vec<Output> {
        if !self.online && o.qos == QoS::AtMostOnce {
            let mut out = Vec::new();
            done(o.ticket, ReasonCode::Success, &mut out);
            return out;
        }
        self.waiting.push_back(o);
        let mut out = Vec::new();
        self.pump(&mut out);
        out
    }

    /// The link acknowledged a message from the remote.
    pub fn ack(&mut self, ack: Ack) -> Vec<Output> {
        let id = ack.packet_id;
        let mut out = Vec::new();
        match ack.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                if self.online {
                    self.inbound.remove(&id);
                    out.push(Output::Send(Packet::PubAck(PubAck::new(
                        id,
                        ReasonCode::Success,
                    ))));
                } else {
                    self.inbound.insert(id, Inbound::Acknowledged);
                }
            }
            QoS::ExactlyOnce => {
                self.inbound.insert(id, Inbound::Acknowledged);
                if self.online {
                    out.push(Output::Send(Packet::PubRec(PubRec::new(
                        id,
                        ReasonCode::Success,
                    ))));
                }
            }
        }
        out
    }

    /// A SUBSCRIBE is about to go: its packet identifier.
    pub fn subscribe_id(&mut self) -> u16 {
        let id = self.next_id();
        self.subscribe_id = Some(id);
        id
    }

    /// A packet arrived from the remote. `Err`: the remote broke the protocol.
    pub fn received(&mut self, packet: Packet) -> Result<Vec<Output>, String> {
        let mut out = Vec::new();
        match packet {
            Packet::Publish(p) => self.incoming(p, &mut out)?,
            Packet::PubAck(a) => {
                if let Some(f) = self.take(a.packet_id, false) {
                    done(f.ticket, a.reason_code, &mut out);
                }
            }
            Packet::PubRec(a) => match self.find(a.packet_id) {
                Some(i) if a.reason_code.is_error() => {
                    let f = self.inflight.remove(i).expect("found");
                    done(f.ticket, a.reason_code, &mut out);
                }
                Some(i) => {
                    self.inflight[i].stage = Stage::Released;
                    out.push(Output::Send(Packet::PubRel(PubRel::new(
                        a.packet_id,
                        ReasonCode::Success,
                    ))));
                }
                // Not ours (any more): release it so the remote can forget it.
                None => out.push(Output::Send(Packet::PubRel(PubRel::new(
                    a.packet_id,
                    ReasonCode::PacketIdentifierNotFound,
                )))),
            },
            Packet::PubComp(c) => {
                if let Some(f) = self.take(c.packet_id, true) {
                    done(f.ticket, ReasonCode::Success, &mut out);
                }
            }
            Packet::PubRel(r) => {
                let code = match self.inbound.remove(&r.packet_id) {
                    Some(_) => ReasonCode::Success,
                    None => ReasonCode::PacketIdentifierNotFound,
                };
                out.push(Output::Send(Packet::PubComp(PubComp::new(
                    r.packet_id,
                    code,
                ))));
            }
            Packet::SubAck(s) if Some(s.packet_id) == self.subscribe_id => {
                self.subscribe_id = None;
            }
            Packet::SubAck(_) | Packet::PingResp => {}
            Packet::Disconnect(d) => {
                return Err(format!("disconnected by the remote: {:?}", d.reason_code))
            }
            other => return Err(format!("unexpected {}", packet_name(&other))),
        }
        self.pump(&mut out);
        Ok(out)
    }

    fn incoming(&mut self, p: Publish, out: &mut Vec<Output>) -> Result<(), String> {
        if p.topic.is_empty() {
            // We allow no topic aliases.
            return Err("PUBLISH without a topic".into());
        }
        let Some(id) = p.packet_id else {
            let ack = Ack {
                packet_id: 0,
                qos: QoS::AtMostOnce,
            };
            out.push(Output::Deliver(p, ack));
            return Ok(());
        };
        let ack = Ack {
            packet_id: id,
            qos: p.qos,
        };
        match (self.inbound.get(&id), p.qos) {
            // Sent again before the link acknowledged it: it is in hand.
            (Some(Inbound::Delivering), _) => {}
            (Some(Inbound::Acknowledged), QoS::AtLeastOnce) => {
                self.inbound.remove(&id);
                out.push(Output::Send(Packet::PubAck(PubAck::new(
                    id,
                    ReasonCode::Success,
                ))));
            }
            // Received before: acknowledge again, hand over nothing [MQTT-4.3.3-10].
            (Some(Inbound::Acknowledged), _) => out.push(Output::Send(Packet::PubRec(
                PubRec::new(id, ReasonCode::Success),
            ))),
            (None, _) => {
                self.inbound.insert(id, Inbound::Delivering);
                out.push(Output::Deliver(p, ack));
            }
        }
        Ok(())
    }

    /// Send waiting messages while the window has room.
    fn pump(&mut self, out: &mut Vec<Output>) {
        if !self.online {
            return;
        }
        while self.inflight.len() < self.limits.window {
            let Some(o) = self.waiting.pop_front() else {
                return;
            };
            let qos = o.qos.min(self.limits.maximum_qos);
            let mut publish = Publish {
                dup: false,
                qos,
                retain: o.retain && self.limits.retain_available,
                topic: o.topic,
                packet_id: None,
                properties: o.properties,
                payload: o.payload,
            };
            if let Some(max) = self.limits.maximum_packet_size {
                let size =
                    Packet::Publish(publish.clone()).encoded_len(crate::mqtt::ProtocolVersion::V5);
                if size > max as usize {
                    done(o.ticket, ReasonCode::PacketTooLarge, out);
                    continue;
                }
            }
            if qos == QoS::AtMostOnce {
                out.push(Output::Send(Packet::Publish(publish)));
                done(o.ticket, ReasonCode::Success, out);
                continue;
            }
            let packet_id = self.next_id();
            publish.packet_id = Some(packet_id);
            out.push(Output::Send(Packet::Publish(publish.clone())));
            self.inflight.push_back(InFlight {
                packet_id,
                ticket: o.ticket,
                stage: Stage::Published(Box::new(publish)),
            });
        }
    }

    fn find(&self, packet_id: u16) -> Option<usize> {
        self.inflight
            .iter()
            .position(|f| f.packet_id == packet_id && matches!(f.stage, Stage::Published(_)))
    }

    /// Remove the message `packet_id` if it is at the stage a PUBACK (`released`
    /// false) or a PUBCOMP (true) finishes.
    fn take(&mut self, packet_id: u16, released: bool) -> Option<InFlight> {
        let i = self.inflight.iter().position(|f| {
            f.packet_id == packet_id
                && match &f.stage {
                    Stage::Released => released,
                    Stage::Published(p) => !released && p.qos == QoS::AtLeastOnce,
                }
        })?;
        self.inflight.remove(i)
    }

    /// The next packet identifier not in use.
    fn next_id(&mut self) -> u16 {
        loop {
            self.last_id = self.last_id.checked_add(1).unwrap_or(1);
            let id = self.last_id;
            if Some(id) != self.subscribe_id && self.inflight.iter().all(|f| f.packet_id != id) {
                return id;
            }
        }
    }
}

fn done(ticket: Option<u64>, code: ReasonCode, out: &mut Vec<Output>) {
    if let Some(ticket) = ticket {
        out.push(Output::Done {
            ticket,
            refused: code.is_error().then_some(code),
        });
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::Auth(_) => "AUTH",
        _ => "packet",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connack(session_present: bool) -> ConnAck {
        ConnAck {
            session_present,
            reason_code: ReasonCode::Success,
            properties: Default::default(),
        }
    }

    fn message(n: u64, qos: QoS) -> Outgoing {
        Outgoing {
            topic: "t".into(),
            qos,
            retain: false,
            payload: Bytes::from(n.to_string()),
            properties: Default::default(),
            ticket: Some(n),
        }
    }

    fn sent(out: &[Output]) -> Vec<Packet> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    fn done_tickets(out: &[Output]) -> Vec<u64> {
        out.iter()
            .filter_map(|o| match o {
                Output::Done { ticket, .. } => Some(*ticket),
                _ => None,
            })
            .collect()
    }

    fn remote_publish(id: u16, qos: QoS, dup: bool) -> Packet {
        Packet::Publish(Publish {
            dup,
            qos,
            retain: false,
            topic: "in".into(),
            packet_id: Some(id),
            properties: Default::default(),
            payload: Bytes::from_static(b"x"),
        })
    }

    /// The connection breaks and comes back with the session; the remote sends
    /// message `id` again.
    fn resent_after_reconnection(s: &mut Session, id: u16, qos: QoS) -> Vec<Output> {
        s.disconnected();
        s.connected(&connack(true));
        s.received(remote_publish(id, qos, true)).unwrap()
    }

    fn delivered(out: &[Output]) -> usize {
        out.iter()
            .filter(|o| matches!(o, Output::Deliver(..)))
            .count()
    }

    #[test]
    fn unacknowledged_publishes_and_releases_go_again_with_dup_and_the_same_ids() {
        let mut s = Session::default();
        s.connected(&connack(false));
        let first = sent(&s.publish(message(1, QoS::ExactlyOnce)));
        let second = sent(&s.publish(message(2, QoS::ExactlyOnce)));
        let (Packet::Publish(p1), Packet::Publish(p2)) = (&first[0], &second[0]) else {
            panic!("publishes expected");
        };
        let (id1, id2) = (p1.packet_id.unwrap(), p2.packet_id.unwrap());
        // The first reached PUBREC; the connection breaks before PUBCOMP.
        let out = s
            .received(Packet::PubRec(PubRec::new(id1, ReasonCode::Success)))
            .unwrap();
        assert_eq!(
            sent(&out),
            vec![Packet::PubRel(PubRel::new(id1, ReasonCode::Success))]
        );
        s.disconnected();
        // Nothing goes while offline; QoS 0 is not kept for later.
        assert!(s.publish(message(3, QoS::AtLeastOnce)).is_empty());
        assert!(sent(&s.publish(message(4, QoS::AtMostOnce))).is_empty());

        let again = sent(&s.connected(&connack(true)));
        assert_eq!(again.len(), 3, "{again:?}");
        assert_eq!(
            again[0],
            Packet::PubRel(PubRel::new(id1, ReasonCode::Success))
        );
        match &again[1] {
            Packet::Publish(p) => {
                assert!(p.dup);
                assert_eq!(p.packet_id, Some(id2));
            }
            other => panic!("{other:?}"),
        }
        match &again[2] {
            Packet::Publish(p) => assert!(!p.dup && p.payload == "3"),
            other => panic!("{other:?}"),
        }
        let out = s
            .received(Packet::PubComp(PubComp::new(id1, ReasonCode::Success)))
            .unwrap();
        assert_eq!(done_tickets(&out), vec![1]);
        // A second PUBCOMP for the same identifier finishes nothing.
        let out = s
            .received(Packet::PubComp(PubComp::new(id1, ReasonCode::Success)))
            .unwrap();
        assert!(done_tickets(&out).is_empty());
    }

    #[test]
    fn a_remote_that_lost_the_session_counts_released_messages_done_and_gets_the_rest_anew() {
        let mut s = Session::default();
        s.connected(&connack(false));
        let Packet::Publish(p1) = sent(&s.publish(message(1, QoS::ExactlyOnce))).remove(0) else {
            panic!()
        };
        s.publish(message(2, QoS::AtLeastOnce));
        s.received(Packet::PubRec(PubRec::new(
            p1.packet_id.unwrap(),
            ReasonCode::Success,
        )))
        .unwrap();
        s.disconnected();
        let out = s.connected(&connack(false));
        assert_eq!(done_tickets(&out), vec![1]);
        let again = sent(&out);
        assert_eq!(again.len(), 1);
        assert!(matches!(&again[0], Packet::Publish(p) if !p.dup && p.payload == "2"));
    }

    #[test]
    fn a_qos2_message_sent_again_is_handed_over_once_across_reconnections() {
        let mut s = Session::default();
        s.connected(&connack(false));
        let out = s
            .received(remote_publish(7, QoS::ExactlyOnce, false))
            .unwrap();
        assert_eq!(delivered(&out), 1);
        // The connection breaks before the link acknowledges; the remote sends it again.
        let out = resent_after_reconnection(&mut s, 7, QoS::ExactlyOnce);
        assert_eq!(delivered(&out), 0);
        let ack = Ack {
            packet_id: 7,
            qos: QoS::ExactlyOnce,
        };
        assert_eq!(
            sent(&s.ack(ack)),
            vec![Packet::PubRec(PubRec::new(7, ReasonCode::Success))]
        );
        // PUBREC lost with the connection: the remote sends the PUBLISH again.
        let out = resent_after_reconnection(&mut s, 7, QoS::ExactlyOnce);
        assert_eq!(delivered(&out), 0);
        assert_eq!(
            sent(&out),
            vec![Packet::PubRec(PubRec::new(7, ReasonCode::Success))]
        );
        let out = s
            .received(Packet::PubRel(PubRel::new(7, ReasonCode::Success)))
            .unwrap();
        assert_eq!(
            sent(&out),
            vec![Packet::PubComp(PubComp::new(7, ReasonCode::Success))]
        );
        // The identifier is free again: a new message with it is new.
        let out = s
            .received(remote_publish(7, QoS::ExactlyOnce, false))
            .unwrap();
        assert_eq!(delivered(&out), 1);
    }

    #[test]
    fn a_qos1_acknowledgement_owed_while_offline_answers_the_copy_sent_again() {
        let mut s = Session::default();
        s.connected(&connack(false));
        assert_eq!(
            delivered(
                &s.received(remote_publish(3, QoS::AtLeastOnce, false))
                    .unwrap()
            ),
            1
        );
        s.disconnected();
        let ack = Ack {
            packet_id: 3,
            qos: QoS::AtLeastOnce,
        };
        assert!(s.ack(ack).is_empty());
        let out = resent_after_reconnection(&mut s, 3, QoS::AtLeastOnce);
        assert_eq!(delivered(&out), 0);
        assert_eq!(
            sent(&out),
            vec![Packet::PubAck(PubAck::new(3, ReasonCode::Success))]
        );
    }

    #[test]
    fn the_remote_window_maximum_qos_and_refusals_are_respected() {
        let mut s = Session::default();
        let mut c = connack(false);
        c.properties.receive_maximum = Some(1);
        c.properties.maximum_qos = Some(1);
        s.connected(&c);
        let out = s.publish(message(1, QoS::ExactlyOnce));
        assert!(matches!(&sent(&out)[0], Packet::Publish(p) if p.qos == QoS::AtLeastOnce));
        assert!(
            s.publish(message(2, QoS::AtLeastOnce)).is_empty(),
            "window of one"
        );
        let out = s
            .received(Packet::PubAck(PubAck::new(1, ReasonCode::NotAuthorized)))
            .unwrap();
        assert!(matches!(
            out[0],
            Output::Done {
                ticket: 1,
                refused: Some(ReasonCode::NotAuthorized)
            }
        ));
        assert_eq!(sent(&out).len(), 1, "the waiting message goes");
    }
}
