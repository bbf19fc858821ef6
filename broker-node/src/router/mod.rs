//! Matching publishes to subscriptions: the subscription trie (filters with `+` and
//! `#`, shared-subscription groups), the selection of one member per shared group,
//! and the retained-message index.
//!
//! Pure data structures: no I/O, no clock; of the rest of the broker it uses only
//! the codec's reference topic matcher, in its tests.
//! Architecture invariant: `#` and `+` at the first level never match a topic that
//! starts with `$` [MQTT-4.7.2-1].

mod retained;
mod shared;
mod trie;

pub use retained::RetainedIndex;
pub use shared::{SelectContext, SharedSelector, SharedStrategy};
pub use trie::SubscriptionTrie;

/// The reference matcher: whether topic filter `filter` matches topic name `topic`
/// (the codec's straightforward level-by-level one); the tries are tested against it.
pub use crate::mqtt::topic::topic_matches as filter_matches;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// (filter, topic, matches) — the examples of section 4.7 and the `$` rule.
    const TABLE: &[(&str, &str, bool)] = &[
        ("sport/tennis/player1/#", "sport/tennis/player1", true),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking",
            true,
        ),
        (
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon",
            true,
        ),
        ("sport/#", "sport", true),
        ("#", "sport/tennis", true),
        ("#", "/", true),
        ("sport/tennis/+", "sport/tennis/player1", true),
        ("sport/tennis/+", "sport/tennis/player1/ranking", false),
        ("sport/+", "sport", false),
        ("sport/+", "sport/", true),
        ("+/+", "/finance", true),
        ("/+", "/finance", true),
        ("+", "/finance", false),
        ("+/tennis/#", "sport/tennis", true),
        ("#", "$SYS/broker/uptime", false),
        ("+/monitor/Clients", "$SYS/monitor/Clients", false),
        ("$SYS/#", "$SYS/monitor/Clients", true),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
        ("$SYS/+/Clients", "$SYS/monitor/Clients", true),
        ("a//b", "a//b", true),
        ("a/+/b", "a//b", true),
        (
            "fleet/+/robot/+/telemetry/#",
            "fleet/1/robot/r7/telemetry/battery",
            true,
        ),
        (
            "fleet/+/robot/+/telemetry/#",
            "fleet/1/robot/r7/command/velocity",
            false,
        ),
    ];

    fn trie_matches(filter: &str, topic: &str) -> bool {
        let mut trie = SubscriptionTrie::default();
        trie.insert(filter, 1u32, ());
        let mut hit = false;
        trie.for_each_match(topic, |f, _, _| {
            assert_eq!(f, filter);
            hit = true;
        });
        hit
    }

    fn retained_matches(filter: &str, topic: &str) -> bool {
        let mut index = RetainedIndex::default();
        index.insert(topic, ());
        let mut hit = false;
        index.for_each_matching(filter, |t, _| {
            assert_eq!(t, topic);
            hit = true;
        });
        hit
    }

    #[test]
    fn mqtt_4_7_matching_table_holds_for_oracle_trie_and_retained_index() {
        for &(filter, topic, expected) in TABLE {
            assert_eq!(
                filter_matches(filter, topic),
                expected,
                "oracle {filter} {topic}"
            );
            assert_eq!(
                trie_matches(filter, topic),
                expected,
                "trie {filter} {topic}"
            );
            assert_eq!(
                retained_matches(filter, topic),
                expected,
                "retained {filter} {topic}"
            );
        }
    }

    #[test]
    fn shared_groups_match_by_inner_filter_and_report_each_group_once() {
        let mut trie = SubscriptionTrie::default();
        trie.insert("$share/workers/sensors/#", "w1", 1);
        trie.insert("$share/workers/sensors/#", "w2", 2);
        trie.insert("$share/other/sensors/+", "o1", 3);
        trie.insert("sensors/#", "plain", 4);
        let mut groups = Vec::new();
        trie.for_each_shared_match("sensors/t1", |g, members| {
            groups.push((
                g.to_owned(),
                members.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            ))
        });
        groups.sort();
        assert_eq!(
            groups,
            vec![
                ("$share/other/sensors/+".to_owned(), vec!["o1"]),
                ("$share/workers/sensors/#".to_owned(), vec!["w1", "w2"]),
            ]
        );
        let mut plain = Vec::new();
        trie.for_each_match("sensors/t1", |_, k, _| plain.push(*k));
        assert_eq!(
            plain,
            vec!["plain"],
            "shared members are not normal subscribers"
        );
        assert_eq!(trie.len(), 4);
        assert_eq!(trie.remove("$share/workers/sensors/#", &"w1"), Some(1));
        assert_eq!(trie.remove("$share/workers/sensors/#", &"w1"), None);
        assert_eq!(trie.len(), 3);
    }

    #[test]
    fn inserting_again_replaces_the_options_of_the_same_client() {
        let mut trie = SubscriptionTrie::default();
        assert_eq!(trie.insert("a/b", "c1", 1), None);
        assert_eq!(trie.insert("a/b", "c1", 2), Some(1));
        assert_eq!(trie.len(), 1);
        let mut seen = Vec::new();
        trie.for_each_match("a/b", |_, k, v| seen.push((*k, *v)));
        assert_eq!(seen, vec![("c1", 2)]);
    }

    #[test]
    fn round_robin_cycles_fairly_over_members() {
        let mut sel = SharedSelector::new(SharedStrategy::RoundRobin);
        let members = ["a", "b", "c"];
        let ctx = SelectContext {
            publisher_client_id: "p",
            topic: "t",
            random: 0,
            is_local: &|_: &&str| false,
        };
        let picks: Vec<_> = (0..6)
            .map(|_| sel.select("g", &members, &ctx).unwrap())
            .collect();
        assert_eq!(picks, vec!["a", "b", "c", "a", "b", "c"]);
        assert_eq!(sel.select("g", &[], &ctx), None, "no member, no choice");
    }

    #[test]
    fn sticky_keeps_its_member_while_it_remains() {
        let mut sel = SharedSelector::new(SharedStrategy::Sticky);
        let ctx = |r| SelectContext {
            publisher_client_id: "p",
            topic: "t",
            random: r,
            is_local: &|_: &&str| false,
        };
        let first = sel.select("g", &["a", "b", "c"], &ctx(1)).unwrap();
        for r in 0..10 {
            assert_eq!(sel.select("g", &["a", "b", "c"], &ctx(r)), Some(first));
        }
        let others: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .filter(|m| *m != first)
            .collect();
        let next = sel.select("g", &others, &ctx(5)).unwrap();
        assert_ne!(next, first, "a member that left is not chosen");
    }

    #[test]
    fn hashes_are_stable_and_spread_over_members() {
        let members: Vec<u32> = (0..4).collect();
        let mut sel = SharedSelector::new(SharedStrategy::HashTopic);
        let mut used = std::collections::HashSet::new();
        for i in 0..64 {
            let topic = format!("sensors/{i}");
            let ctx = SelectContext {
                publisher_client_id: "p",
                topic: &topic,
                random: i,
                is_local: &|_: &u32| false,
            };
            let a = sel.select("g", &members, &ctx);
            assert_eq!(a, sel.select("g", &members, &ctx), "stable for one topic");
            used.insert(a.unwrap());
        }
        assert_eq!(used.len(), 4, "every member gets some topics");
        let mut sel = SharedSelector::new(SharedStrategy::HashClientId);
        let ctx = SelectContext {
            publisher_client_id: "robot-7",
            topic: "x",
            random: 0,
            is_local: &|_: &u32| false,
        };
        let a = sel.select("g", &members, &ctx);
        assert_eq!(a, sel.select("g", &members, &ctx));
    }

    #[test]
    fn local_first_prefers_members_on_this_node() {
        let mut sel = SharedSelector::new(SharedStrategy::LocalFirst);
        let ctx = SelectContext {
            publisher_client_id: "p",
            topic: "t",
            random: 0,
            is_local: &|m: &&str| m.starts_with("local"),
        };
        for _ in 0..5 {
            let m = sel
                .select("g", &["remote-1", "local-1", "remote-2"], &ctx)
                .unwrap();
            assert_eq!(m, "local-1");
        }
        let m = sel.select("g", &["remote-1"], &ctx).unwrap();
        assert_eq!(m, "remote-1", "falls back to any member");
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just(String::new()),
            Just("$s".to_owned()),
        ]
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..4).prop_map(|l| l.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![level(), Just("+".to_owned())], 0..4),
            any::<bool>(),
        )
            .prop_filter_map("empty filter", |(mut levels, hash)| {
                if hash {
                    levels.push("#".to_owned());
                }
                (!levels.is_empty()).then(|| levels.join("/"))
            })
    }

    proptest! {
        #[test]
        fn trie_matches_equal_the_oracle(filters in prop::collection::vec(filter(), 1..12), topics in prop::collection::vec(topic(), 1..8)) {
            let mut trie = SubscriptionTrie::default();
            for (i, f) in filters.iter().enumerate() {
                trie.insert(f, i, ());
            }
            for t in &topics {
                let mut got = Vec::new();
                trie.for_each_match(t, |_, k, _| got.push(*k));
                got.sort_unstable();
                let want: Vec<usize> = filters.iter().enumerate().filter(|(_, f)| filter_matches(f, t)).map(|(i, _)| i).collect();
                prop_assert_eq!(got, want, "topic {}", t);
            }
        }

        #[test]
        fn insert_remove_sequences_equal_a_model_and_prune_fully(ops in prop::collection::vec((filter(), 0u8..3, any::<bool>()), 1..40)) {
            let mut trie = SubscriptionTrie::default();
            let mut model = BTreeMap::new();
            for (f, key, insert) in &ops {
                if *insert {
                    prop_assert_eq!(trie.insert(f, *key, ()), model.insert((f.clone(), *key), ()));
                } else {
                    prop_assert_eq!(trie.remove(f, key), model.remove(&(f.clone(), *key)));
                }
                prop_assert_eq!(trie.len(), model.len());
            }
            for (f, key) in model.keys() {
                trie.remove(f, key);
            }
            prop_assert!(trie.is_empty());
            prop_assert!(trie.root_is_pruned());
        }

        #[test]
        fn retained_matching_equals_filtering_with_the_oracle(topics in prop::collection::btree_set(topic(), 1..12), filters in prop::collection::vec(filter(), 1..6)) {
            let mut index = RetainedIndex::default();
            for t in &topics {
                index.insert(t, ());
            }
            prop_assert_eq!(index.len(), topics.len());
            for f in &filters {
                let mut got = Vec::new();
                index.for_each_matching(f, |t, _| got.push(t.to_owned()));
                got.sort();
                let want: Vec<String> = topics.iter().filter(|t| filter_matches(f, t)).cloned().collect();
                prop_assert_eq!(got, want, "filter {}", f);
            }
            index.retain(|t, _| t.len() % 2 == 0);
            prop_assert_eq!(index.len(), topics.iter().filter(|t| t.len() % 2 == 0).count());
            prop_assert_eq!(index.iter().count(), index.len());
        }
    }
}
