//! A bridge's topic mappings: which local topics go out and under which remote name,
//! which remote topics come in and under which local name, and the subscriptions each
//! side needs. Pure functions over the configuration.

use crate::config::{BridgeTopic, Direction};
use crate::mqtt::topic::topic_matches;

/// The topic mappings of one bridge.
#[derive(Clone, Debug)]
pub struct Mappings {
    topics: Vec<BridgeTopic>,
}

/// A subscription one side needs: its filter and QoS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needed {
    /// The filter, prefix included.
    pub filter: String,
    /// The QoS asked for.
    pub qos: u8,
}

impl Mappings {
    /// The mappings of a bridge's `topics`.
    pub fn new(topics: Vec<BridgeTopic>) -> Mappings {
        Mappings { topics }
    }

    fn subscriptions(
        &self,
        wanted: impl Fn(Direction) -> bool,
        prefix: impl Fn(&BridgeTopic) -> &str,
    ) -> Vec<Needed> {
        let mut out: Vec<Needed> = Vec::new();
        for t in self.topics.iter().filter(|t| wanted(t.direction)) {
            let filter = format!("{}{}", prefix(t), t.filter);
            match out.iter_mut().find(|n| n.filter == filter) {
                Some(n) => n.qos = n.qos.max(t.qos),
                None => out.push(Needed { filter, qos: t.qos }),
            }
        }
        out
    }

    /// The subscriptions of the bridge's local session (its `out` and `both` topics).
    pub fn local_subscriptions(&self) -> Vec<Needed> {
        self.subscriptions(Direction::outgoing, |t| &t.local_prefix)
    }

    /// The subscriptions on the remote broker (its `in` and `both` topics).
    pub fn remote_subscriptions(&self) -> Vec<Needed> {
        self.subscriptions(Direction::incoming, |t| &t.remote_prefix)
    }

    /// The remote topic of a local message, if an outgoing mapping takes it.
    pub fn to_remote(&self, local: &str) -> Option<String> {
        self.rename(local, Direction::outgoing, |t| {
            (&t.local_prefix, &t.remote_prefix)
        })
    }

    /// The local topic of a remote message, if an incoming mapping takes it.
    pub fn to_local(&self, remote: &str) -> Option<String> {
        self.rename(remote, Direction::incoming, |t| {
            (&t.remote_prefix, &t.local_prefix)
        })
    }

    fn rename<'a>(
        &'a self,
        topic: &str,
        wanted: impl Fn(Direction) -> bool,
        prefixes: impl Fn(&'a BridgeTopic) -> (&'a String, &'a String),
    ) -> Option<String> {
        self.topics
            .iter()
            .filter(|t| wanted(t.direction))
            .find_map(|t| {
                let (from, to) = prefixes(t);
                let rest = topic.strip_prefix(from.as_str())?;
                topic_matches(&t.filter, rest).then(|| format!("{to}{rest}"))
            })
    }

    /// Whether a message sent out on `remote` could come back in on a remote
    /// subscription (what a 3.1.1 remote, without no-local, echoes).
    pub fn echoes(&self, remote: &str) -> bool {
        self.to_local(remote).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(filter: &str, direction: Direction, local: &str, remote: &str) -> BridgeTopic {
        BridgeTopic {
            filter: filter.to_owned(),
            direction,
            qos: 1,
            local_prefix: local.to_owned(),
            remote_prefix: remote.to_owned(),
        }
    }

    #[test]
    fn a_local_topic_goes_out_under_the_remote_prefix() {
        let m = Mappings::new(vec![topic("fleet/#", Direction::Out, "", "site-3/")]);
        assert_eq!(
            m.to_remote("fleet/truck/1").as_deref(),
            Some("site-3/fleet/truck/1")
        );
        assert_eq!(m.to_remote("other/x"), None);
        assert_eq!(m.to_local("site-3/fleet/truck/1"), None, "out only");
        assert_eq!(
            m.local_subscriptions(),
            vec![Needed {
                filter: "fleet/#".into(),
                qos: 1
            }]
        );
        assert!(m.remote_subscriptions().is_empty());
    }

    #[test]
    fn a_remote_topic_comes_in_with_its_prefix_swapped() {
        let m = Mappings::new(vec![topic("cmd/+", Direction::In, "local/", "cloud/")]);
        assert_eq!(
            m.to_local("cloud/cmd/reboot").as_deref(),
            Some("local/cmd/reboot")
        );
        assert_eq!(m.to_local("cloud/cmd/a/b"), None);
        assert_eq!(m.to_local("cmd/reboot"), None, "without the remote prefix");
        assert_eq!(
            m.remote_subscriptions(),
            vec![Needed {
                filter: "cloud/cmd/+".into(),
                qos: 1
            }]
        );
    }

    #[test]
    fn both_subscribes_on_both_sides_and_the_highest_qos_wins() {
        let mut high = topic("a/#", Direction::Both, "", "r/");
        high.qos = 2;
        let m = Mappings::new(vec![topic("a/#", Direction::Both, "", "r/"), high]);
        assert_eq!(
            m.local_subscriptions(),
            vec![Needed {
                filter: "a/#".into(),
                qos: 2
            }]
        );
        assert_eq!(
            m.remote_subscriptions(),
            vec![Needed {
                filter: "r/a/#".into(),
                qos: 2
            }]
        );
        assert!(m.echoes("r/a/x"));
        assert!(!m.echoes("a/x"));
    }
}
