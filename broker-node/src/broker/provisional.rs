//! Subscriptions in effect on this node before their commit (DESIGN invariant 9).
//!
//! A single-node broker starts delivering to a subscription as soon as the SUBSCRIBE
//! arrives; the specification allows matching messages before the SUBACK (3.8.4), and
//! request/response and no-local clients written against Mosquitto or EMQX rely on it.
//! Here a subscription is replicated through Raft, so between its arrival and the
//! apply of its `Subscribe` command it lives in this overlay: dispatch on this node
//! matches publishes against the applied route table *and* the overlay. The commit
//! still gates the SUBACK and every other node; a refused commit withdraws the entry
//! (and the client gets the failure code). Shared subscriptions are not provisional:
//! their members are chosen cluster-wide, from the committed table only.
//!
//! State: one `Mutex` around a small trie, touched only by SUBSCRIBE handling and, on
//! the publish path, only while the overlay is non-empty (an atomic count says so
//! without taking the lock). Never held across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::lock;
use crate::cluster::command::SubscriptionOptions;
use crate::router::SubscriptionTrie;

/// The overlay of subscriptions waiting for their commit.
#[derive(Default)]
pub struct Provisional {
    /// Entries in `inner`: read on every publish, so that an empty overlay costs one
    /// atomic load.
    len: AtomicUsize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    trie: SubscriptionTrie<Arc<str>, SubscriptionOptions>,
    /// The ticket of each entry's newest SUBSCRIBE: an older SUBSCRIBE of the same
    /// filter that settles later must not withdraw the newer one.
    tickets: HashMap<(Arc<str>, String), u64>,
    next_ticket: u64,
}

/// One provisional subscription, withdrawn from the overlay when dropped: once its
/// command is applied (the committed route table then has it), refused, or abandoned
/// because the connection ended.
pub struct Ticket {
    overlay: Arc<Provisional>,
    client_id: Arc<str>,
    filter: String,
    ticket: u64,
}

impl Provisional {
    /// Put `client_id`'s subscription to `filter` in effect on this node until the
    /// returned ticket is dropped.
    pub fn insert(
        self: &Arc<Self>,
        client_id: &Arc<str>,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Ticket {
        let mut inner = lock(&self.inner);
        let ticket = inner.next_ticket;
        inner.next_ticket += 1;
        inner.trie.insert(filter, client_id.clone(), options);
        let key = (client_id.clone(), filter.to_owned());
        if inner.tickets.insert(key, ticket).is_none() {
            self.len.fetch_add(1, Ordering::Release);
        }
        Ticket {
            overlay: self.clone(),
            client_id: client_id.clone(),
            filter: filter.to_owned(),
            ticket,
        }
    }

    /// Whether any subscription waits for its commit.
    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    /// Call `f` with (filter, client, options) of every provisional subscription
    /// matching `topic`.
    pub fn for_each_match(
        &self,
        topic: &str,
        f: impl FnMut(&str, &Arc<str>, &SubscriptionOptions),
    ) {
        if self.is_empty() {
            return;
        }
        lock(&self.inner).trie.for_each_match(topic, f);
    }

    fn withdraw(&self, client_id: &Arc<str>, filter: &str, ticket: u64) {
        let mut inner = lock(&self.inner);
        let key = (client_id.clone(), filter.to_owned());
        if inner.tickets.get(&key) == Some(&ticket) {
            inner.tickets.remove(&key);
            inner.trie.remove(filter, client_id);
            self.len.fetch_sub(1, Ordering::Release);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.overlay
            .withdraw(&self.client_id, &self.filter, self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(qos: u8) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: None,
        }
    }

    fn matches(overlay: &Provisional, topic: &str) -> Vec<(String, u8)> {
        let mut found = Vec::new();
        overlay.for_each_match(topic, |_, client, o| {
            found.push((client.to_string(), o.qos))
        });
        found
    }

    #[test]
    fn a_provisional_subscription_matches_until_its_ticket_is_dropped() {
        let overlay = Arc::new(Provisional::default());
        assert!(overlay.is_empty());
        let b: Arc<str> = Arc::from("b");
        let ticket = overlay.insert(&b, "t/+", options(1));
        assert!(!overlay.is_empty());
        assert_eq!(matches(&overlay, "t/x"), vec![("b".to_owned(), 1)]);
        assert!(matches(&overlay, "u/x").is_empty());
        drop(ticket);
        assert!(overlay.is_empty());
        assert!(matches(&overlay, "t/x").is_empty());
    }

    #[test]
    fn an_older_subscribe_settling_late_leaves_the_newer_one_in_effect() {
        let overlay = Arc::new(Provisional::default());
        let b: Arc<str> = Arc::from("b");
        let first = overlay.insert(&b, "t", options(0));
        let second = overlay.insert(&b, "t", options(2));
        drop(first);
        assert_eq!(matches(&overlay, "t"), vec![("b".to_owned(), 2)]);
        drop(second);
        assert!(overlay.is_empty());
    }
}
