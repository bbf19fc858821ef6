//! Topic aliases the broker assigns towards a v5 client (MQTT 5.0 3.3.2.3.4).
//!
//! A client that announces Topic Alias Maximum > 0 lets the server replace a topic it
//! has seen before with two bytes: the first PUBLISH of a topic carries the topic and
//! a new alias, later ones an empty topic and the alias. On a fleet's metered links
//! telemetry topics such as `fleet/1/robot/r7/telemetry/position` then cost two bytes
//! per message instead of forty. The table is least-recently-used: when every alias
//! the client allows is taken, the topic used longest ago gives its number up, and the
//! next PUBLISH with that number carries its new topic (which redefines the alias on
//! the client's side).
//!
//! Choosing is split from recording ([`OutboundAliases::plan`], then
//! [`OutboundAliases::commit`]) so that a PUBLISH that is not sent after all (over the
//! client's Maximum Packet Size) defines no alias the client never saw. Forgetting the
//! whole table is always safe (every alias is then defined again before it is used
//! alone): a connection drops it while parked.

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

/// Topics shorter than this are sent as they are: an alias costs three bytes.
const MIN_ALIASED_LEN: usize = 4;

/// How a PUBLISH names its topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AliasUse {
    /// The topic, no alias.
    Topic,
    /// The topic and this alias, which it defines (or redefines).
    Define(u16),
    /// An empty topic and this alias, defined earlier.
    Reuse(u16),
}

/// The aliases assigned on one connection.
#[derive(Debug)]
pub struct OutboundAliases {
    /// The most aliases in use: the client's Topic Alias Maximum, capped by the
    /// broker's `mqtt.topic_alias_outbound_maximum`; 0 disables aliasing.
    maximum: u16,
    /// Topic → alias, least recently used first; created by the first aliased topic.
    table: Option<Box<LruCache<Arc<str>, u16>>>,
}

impl OutboundAliases {
    /// Aliases for a client that allows `client_maximum`, of which the broker uses at
    /// most `broker_maximum`.
    pub fn new(client_maximum: u16, broker_maximum: u16) -> Self {
        OutboundAliases {
            maximum: client_maximum.min(broker_maximum),
            table: None,
        }
    }

    /// The most aliases this connection uses.
    pub fn maximum(&self) -> u16 {
        self.maximum
    }

    /// How to name `topic` in the next PUBLISH; changes nothing until [`commit`].
    ///
    /// [`commit`]: OutboundAliases::commit
    pub fn plan(&self, topic: &str) -> AliasUse {
        if self.maximum == 0 || topic.len() < MIN_ALIASED_LEN {
            return AliasUse::Topic;
        }
        let Some(table) = &self.table else {
            return AliasUse::Define(1);
        };
        if let Some(alias) = table.peek(topic) {
            return AliasUse::Reuse(*alias);
        }
        if table.len() < usize::from(self.maximum) {
            // Aliases are handed out 1, 2, ... and never returned while the table
            // is not full, so the next free one is its length plus one.
            return AliasUse::Define(table.len() as u16 + 1);
        }
        match table.peek_lru() {
            Some((_, alias)) => AliasUse::Define(*alias),
            None => AliasUse::Topic,
        }
    }

    /// Record that a PUBLISH named `topic` as `used` said.
    pub fn commit(&mut self, topic: &Arc<str>, used: AliasUse) {
        let maximum = self.maximum;
        match used {
            AliasUse::Topic => {}
            AliasUse::Reuse(_) => {
                if let Some(table) = &mut self.table {
                    table.promote(topic);
                }
            }
            AliasUse::Define(alias) => {
                let table = self.table.get_or_insert_with(|| {
                    let cap = NonZeroUsize::new(usize::from(maximum)).unwrap_or(NonZeroUsize::MIN);
                    Box::new(LruCache::new(cap))
                });
                if table.len() >= usize::from(maximum) {
                    // The planned alias is the least recently used one's.
                    table.pop_lru();
                }
                table.put(topic.clone(), alias);
            }
        }
    }

    /// Forget every alias (the next use of each topic defines it again).
    pub fn forget(&mut self) {
        self.table = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(aliases: &mut OutboundAliases, topic: &str) -> AliasUse {
        let topic: Arc<str> = Arc::from(topic);
        let used = aliases.plan(&topic);
        aliases.commit(&topic, used);
        used
    }

    #[test]
    fn a_repeated_topic_is_sent_as_its_alias_alone() {
        let mut a = OutboundAliases::new(10, 64);
        assert_eq!(send(&mut a, "fleet/1/robot/r7/pose"), AliasUse::Define(1));
        assert_eq!(send(&mut a, "fleet/1/robot/r7/pose"), AliasUse::Reuse(1));
        assert_eq!(send(&mut a, "fleet/1/robot/r8/pose"), AliasUse::Define(2));
        assert_eq!(send(&mut a, "fleet/1/robot/r7/pose"), AliasUse::Reuse(1));
    }

    #[test]
    fn a_full_table_gives_the_least_recently_used_alias_to_the_new_topic() {
        let mut a = OutboundAliases::new(2, 64);
        assert_eq!(send(&mut a, "aaaa"), AliasUse::Define(1));
        assert_eq!(send(&mut a, "bbbb"), AliasUse::Define(2));
        assert_eq!(send(&mut a, "aaaa"), AliasUse::Reuse(1));
        // bbbb was used longest ago: its alias goes to cccc.
        assert_eq!(send(&mut a, "cccc"), AliasUse::Define(2));
        assert_eq!(send(&mut a, "aaaa"), AliasUse::Reuse(1));
        assert_eq!(send(&mut a, "bbbb"), AliasUse::Define(2));
        assert_eq!(send(&mut a, "cccc"), AliasUse::Define(1));
    }

    #[test]
    fn aliases_never_exceed_either_maximum() {
        for (client, broker) in [(3u16, 64u16), (64, 3), (1, 1)] {
            let mut a = OutboundAliases::new(client, broker);
            for i in 0..50 {
                match send(&mut a, &format!("topic/{}", i % 7)) {
                    AliasUse::Define(n) | AliasUse::Reuse(n) => {
                        assert!(n >= 1 && n <= client.min(broker), "alias {n}")
                    }
                    AliasUse::Topic => panic!("aliasing is on"),
                }
            }
        }
    }

    #[test]
    fn no_alias_when_the_client_allows_none_or_the_topic_is_short() {
        let mut a = OutboundAliases::new(0, 64);
        assert_eq!(send(&mut a, "fleet/1/robot/r7/pose"), AliasUse::Topic);
        let mut a = OutboundAliases::new(10, 0);
        assert_eq!(send(&mut a, "fleet/1/robot/r7/pose"), AliasUse::Topic);
        let mut a = OutboundAliases::new(10, 64);
        assert_eq!(send(&mut a, "t/1"), AliasUse::Topic);
    }

    #[test]
    fn a_plan_not_committed_defines_nothing() {
        let mut a = OutboundAliases::new(10, 64);
        let topic: Arc<str> = Arc::from("fleet/big");
        assert_eq!(a.plan(&topic), AliasUse::Define(1));
        // (not sent: too large for the client)
        assert_eq!(a.plan(&topic), AliasUse::Define(1));
        assert_eq!(send(&mut a, "fleet/big"), AliasUse::Define(1));
        assert_eq!(send(&mut a, "fleet/big"), AliasUse::Reuse(1));
        a.forget();
        assert_eq!(send(&mut a, "fleet/big"), AliasUse::Define(1));
    }
}
