//! One client's protocol, without I/O: the per-connection protocol [`machine`], and the
//! pieces it is built from (packet identifiers and the outbound inflight window,
//! inbound QoS 2 bookkeeping, keep alive, topic aliases both ways).
//!
//! Everything here is synchronous and takes time as an argument (`now`), so the rules
//! are testable without sleeping; the connection task (`broker::connection`) drives the
//! machine and does the I/O. Nothing here touches a socket, a channel or a clock.

pub mod machine;
mod outbound_aliases;

pub use outbound_aliases::{AliasUse, OutboundAliases};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use crate::cluster::command::Message;

/// A message on its way to one connected client.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The message, shared with every other subscriber.
    pub message: Arc<Message>,
    /// Delivery QoS (already downgraded to the granted QoS).
    pub qos: u8,
    /// The RETAIN flag to send.
    pub retain: bool,
    /// Identifiers of the subscriptions that matched.
    pub subscription_ids: Vec<u32>,
    /// The shared group (`$share/g/f`) it was chosen for, so that if the member
    /// leaves before acknowledging it, another member gets it.
    pub shared_group: Option<Arc<str>>,
}

/// How an outbound QoS 1/2 message stands with the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundState {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitingAck,
    /// PUBREL sent; waiting for PUBCOMP.
    AwaitingComp,
}

/// The outbound inflight window: packet identifiers in use and what each stands for.
///
/// `T` is what the connection remembers about a message (its payload for a resend, or
/// its position in a replicated queue).
#[derive(Debug)]
pub struct OutboundWindow<T> {
    inflight: BTreeMap<u16, (OutboundState, T)>,
    next_id: u16,
    /// The client's Receive Maximum, capped by the broker's own limit.
    capacity: usize,
}

impl<T> OutboundWindow<T> {
    /// A window holding at most `capacity` unacknowledged messages.
    pub fn new(capacity: usize) -> Self {
        OutboundWindow {
            inflight: BTreeMap::new(),
            next_id: 1,
            capacity: capacity.clamp(1, 65_535),
        }
    }

    /// Whether another QoS 1/2 message may be sent now.
    pub fn has_room(&self) -> bool {
        self.inflight.len() < self.capacity
    }

    /// Number of messages in flight.
    pub fn len(&self) -> usize {
        self.inflight.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// The most messages it holds at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether `id` is in use.
    pub fn contains(&self, id: u16) -> bool {
        self.inflight.contains_key(&id)
    }

    /// Allocate a free packet identifier and record `item` under it, or `None` when
    /// the window is full.
    pub fn allocate(&mut self, item: T) -> Option<u16> {
        if !self.has_room() {
            return None;
        }
        // At most 65535 ids exist and fewer are in use, so this finds one.
        loop {
            let id = self.next_id;
            self.next_id = if id == u16::MAX { 1 } else { id + 1 };
            if let std::collections::btree_map::Entry::Vacant(slot) = self.inflight.entry(id) {
                slot.insert((OutboundState::AwaitingAck, item));
                return Some(id);
            }
        }
    }

    /// Record `item` under a packet identifier chosen by the caller (a replicated
    /// queue position); `false` if the id is taken or the window is full.
    pub fn insert(&mut self, id: u16, state: OutboundState, item: T) -> bool {
        if id == 0 || self.inflight.contains_key(&id) || !self.has_room() {
            return false;
        }
        self.inflight.insert(id, (state, item));
        true
    }

    /// PUBACK arrived: the QoS 1 message is done.
    pub fn puback(&mut self, id: u16) -> Option<T> {
        match self.inflight.get(&id) {
            Some((OutboundState::AwaitingAck, _)) => self.inflight.remove(&id).map(|(_, t)| t),
            _ => None,
        }
    }

    /// PUBREC arrived: the QoS 2 message now waits for PUBCOMP. Returns the item for
    /// bookkeeping; `None` if the id was not awaiting a PUBREC.
    pub fn pubrec(&mut self, id: u16) -> Option<&T> {
        match self.inflight.get_mut(&id) {
            Some((state @ OutboundState::AwaitingAck, item)) => {
                *state = OutboundState::AwaitingComp;
                Some(item)
            }
            Some((OutboundState::AwaitingComp, item)) => Some(item),
            None => None,
        }
    }

    /// PUBCOMP arrived: the QoS 2 message is done.
    pub fn pubcomp(&mut self, id: u16) -> Option<T> {
        match self.inflight.get(&id) {
            Some((OutboundState::AwaitingComp, _)) => self.inflight.remove(&id).map(|(_, t)| t),
            _ => None,
        }
    }

    /// Everything in flight, in packet-id order, for a resend.
    pub fn iter(&self) -> impl Iterator<Item = (u16, OutboundState, &T)> {
        self.inflight.iter().map(|(id, (s, t))| (*id, *s, t))
    }

    /// Empty the window, returning what was in flight.
    pub fn drain(&mut self) -> Vec<(u16, OutboundState, T)> {
        std::mem::take(&mut self.inflight)
            .into_iter()
            .map(|(id, (s, t))| (id, s, t))
            .collect()
    }
}

/// Keep alive as the server enforces it: one and a half intervals without any packet
/// from the client end the connection [MQTT-3.1.2-24].
#[derive(Clone, Copy, Debug)]
pub struct KeepAlive {
    last_seen: Instant,
    /// One and a half intervals, in milliseconds; 0 when keep alive is off. (Not an
    /// `Option<Duration>`: every parked connection holds one, and this is 8 bytes
    /// smaller.)
    limit_ms: u32,
}

/// What [`KeepAlive::compact`] counts milliseconds from: set by the first
/// [`KeepAlive::new`], so every later `last_seen` comes after it. The first one's
/// `now` was read just before and counts from the epoch itself (its deadline moves
/// by those microseconds); set lazily at the first park instead, it would move the
/// deadlines of every connection that came before by seconds.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

impl KeepAlive {
    /// Keep alive of `secs` seconds (0 disables it), starting at `now`.
    pub fn new(secs: u16, now: Instant) -> Self {
        LazyLock::force(&EPOCH);
        KeepAlive {
            last_seen: now,
            limit_ms: u32::from(secs) * 1500,
        }
    }

    /// A packet arrived at `now`.
    pub fn seen(&mut self, now: Instant) {
        self.last_seen = now;
    }

    /// When the connection must be closed if nothing else arrives, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        (self.limit_ms > 0).then(|| self.last_seen + Duration::from_millis(self.limit_ms.into()))
    }

    /// Whether the client has been silent too long at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|d| now >= d)
    }

    /// When last seen (in milliseconds since an instant of the process's own) and the
    /// limit in milliseconds: 12 bytes where `KeepAlive` takes 24, for parked
    /// connections. [`KeepAlive::from_compact`] takes it back, to the millisecond.
    pub fn compact(&self) -> (u64, u32) {
        let since = self.last_seen.saturating_duration_since(*EPOCH);
        (
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX),
            self.limit_ms,
        )
    }

    /// The keep alive [`KeepAlive::compact`] described.
    pub fn from_compact(last_seen_ms: u64, limit_ms: u32) -> Self {
        KeepAlive {
            last_seen: *EPOCH + Duration::from_millis(last_seen_ms),
            limit_ms,
        }
    }
}

/// Why an inbound topic alias could not be resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AliasError {
    /// Alias 0 or above the maximum the broker announced (protocol error 0x94).
    #[error("topic alias {0} is out of range")]
    OutOfRange(u16),
    /// An empty topic with an alias that was never set (protocol error 0x82).
    #[error("topic alias {0} is not set")]
    Unknown(u16),
}

/// Inbound topic aliases of one connection (v5): alias → topic name.
#[derive(Debug, Default)]
pub struct InboundAliases {
    maximum: u16,
    map: HashMap<u16, String>,
}

impl InboundAliases {
    /// Aliases 1..=`maximum` are accepted (the CONNACK's Topic Alias Maximum).
    pub fn new(maximum: u16) -> Self {
        InboundAliases {
            maximum,
            map: HashMap::new(),
        }
    }

    /// Whether no alias is set.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Resolve the topic of a PUBLISH carrying `alias`: a non-empty topic sets the
    /// alias, an empty one uses it.
    pub fn resolve(&mut self, topic: &str, alias: u16) -> Result<String, AliasError> {
        if alias == 0 || alias > self.maximum {
            return Err(AliasError::OutOfRange(alias));
        }
        if topic.is_empty() {
            self.map
                .get(&alias)
                .cloned()
                .ok_or(AliasError::Unknown(alias))
        } else {
            self.map.insert(alias, topic.to_owned());
            Ok(topic.to_owned())
        }
    }
}

/// Inbound QoS 2 packet identifiers whose PUBREL has not arrived: a PUBLISH resent
/// under one of them is acknowledged again but not delivered twice.
#[derive(Debug, Default, Clone)]
pub struct InboundQos2 {
    ids: HashSet<u16>,
}

impl InboundQos2 {
    /// Record `id`; `false` if it was already recorded (a duplicate).
    pub fn receive(&mut self, id: u16) -> bool {
        self.ids.insert(id)
    }

    /// PUBREL for `id`; `true` if it was known.
    pub fn release(&mut self, id: u16) -> bool {
        self.ids.remove(&id)
    }

    /// Number of QoS 2 messages awaiting PUBREL (they count against Receive Maximum).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether none awaits PUBREL.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_allocates_distinct_ids_until_full() {
        let mut w = OutboundWindow::new(3);
        let a = w.allocate('a').unwrap();
        let b = w.allocate('b').unwrap();
        let c = w.allocate('c').unwrap();
        assert!(a != b && b != c && a != c);
        assert_eq!(w.allocate('d'), None, "window of 3 is full");
        assert_eq!(w.puback(b), Some('b'));
        assert!(w.allocate('d').is_some(), "an acknowledged id frees a slot");
    }

    #[test]
    fn packet_ids_wrap_and_skip_ids_in_use() {
        let mut w = OutboundWindow::new(10);
        w.next_id = u16::MAX;
        assert_eq!(w.allocate(1), Some(u16::MAX));
        assert_eq!(w.allocate(2), Some(1), "0 is never a packet id");
        w.next_id = 1;
        assert_eq!(w.allocate(3), Some(2), "id 1 is still in use");
    }

    #[test]
    fn qos2_flow_needs_pubrec_before_pubcomp() {
        let mut w = OutboundWindow::new(5);
        let id = w.allocate("m").unwrap();
        assert_eq!(w.pubcomp(id), None, "PUBCOMP before PUBREC is ignored");
        assert_eq!(w.pubrec(id), Some(&"m"));
        assert_eq!(w.puback(id), None, "PUBACK does not end a QoS 2 flow");
        assert_eq!(w.pubcomp(id), Some("m"));
        assert!(w.is_empty());
    }

    #[test]
    fn mqtt_3_1_2_24_keep_alive_is_one_and_a_half_intervals() {
        let t0 = Instant::now();
        let mut ka = KeepAlive::new(10, t0);
        assert!(!ka.expired(t0 + Duration::from_millis(14_999)));
        assert!(ka.expired(t0 + Duration::from_millis(15_000)));
        ka.seen(t0 + Duration::from_secs(10));
        assert!(!ka.expired(t0 + Duration::from_secs(20)));
        assert!(
            KeepAlive::new(0, t0).deadline().is_none(),
            "0 disables keep alive"
        );
    }

    #[test]
    fn a_compact_keep_alive_keeps_its_deadline_to_the_millisecond() {
        let mut ka = KeepAlive::new(10, Instant::now());
        ka.seen(Instant::now() + Duration::from_micros(2_500));
        let (seen_ms, limit_ms) = ka.compact();
        let back = KeepAlive::from_compact(seen_ms, limit_ms);
        let (was, is) = (ka.deadline().unwrap(), back.deadline().unwrap());
        assert!(
            is <= was && was - is < Duration::from_millis(1),
            "{was:?} {is:?}"
        );
        let off = KeepAlive::new(0, Instant::now()).compact();
        assert!(KeepAlive::from_compact(off.0, off.1).deadline().is_none());
    }

    #[test]
    fn mqtt_3_3_2_topic_alias_set_then_used() {
        let mut a = InboundAliases::new(10);
        assert_eq!(a.resolve("a/b", 3).unwrap(), "a/b");
        assert_eq!(a.resolve("", 3).unwrap(), "a/b");
        assert_eq!(a.resolve("", 4), Err(AliasError::Unknown(4)));
        assert_eq!(a.resolve("x", 0), Err(AliasError::OutOfRange(0)));
        assert_eq!(a.resolve("x", 11), Err(AliasError::OutOfRange(11)));
    }

    #[test]
    fn inbound_qos2_detects_duplicates_until_pubrel() {
        let mut q = InboundQos2::default();
        assert!(q.receive(7));
        assert!(!q.receive(7), "resent PUBLISH is a duplicate");
        assert!(q.release(7));
        assert!(q.receive(7), "after PUBREL the id is new again");
    }
}
