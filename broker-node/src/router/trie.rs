//! The subscription trie: topic filters (with `+` and `#`) → subscribers, and
//! shared-subscription groups (`$share/{group}/{filter}`) → members.
//!
//! A publish walks the trie level by level (literal child, `+` child, `#` child): no
//! scan of all filters and no allocation per match. Each filter string is stored once,
//! in the node that ends it. Empty nodes are pruned on removal so memory returns.

use std::collections::HashMap;
use std::sync::Arc;

/// Whether `filter` is a shared subscription; returns its (group, inner filter).
fn split_shared(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, inner) = rest.split_once('/')?;
    Some((group, inner))
}

/// The members of one shared group, sorted by key.
type Members<K, V> = Vec<(K, V)>;

/// A hash map keyed by topic levels, with a fast hasher seeded per process (topic
/// names come from clients, so the seed matters; SipHash's cost does not pay here).
type LevelMap<T> = HashMap<Box<str>, T, crate::hash::State>;

#[derive(Debug)]
struct Node<K, V> {
    /// Children by literal level.
    children: LevelMap<Node<K, V>>,
    /// The `+` child, kept apart so a publish does not look it up by name.
    plus: Option<Box<Node<K, V>>>,
    /// The `#` child.
    hash: Option<Box<Node<K, V>>>,
    /// The filter that ends here, stored once.
    filter: Option<Arc<str>>,
    /// Normal subscribers of the filter ending here.
    subscribers: Vec<(K, V)>,
    /// Shared groups whose inner filter ends here: full `$share/g/f` key → members.
    groups: Vec<(Arc<str>, Members<K, V>)>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            children: LevelMap::default(),
            plus: None,
            hash: None,
            filter: None,
            subscribers: Vec::new(),
            groups: Vec::new(),
        }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
            && self.subscribers.is_empty()
            && self.groups.is_empty()
    }

    /// The child for `level`, created if missing.
    fn child_or_default(&mut self, level: &str) -> &mut Node<K, V> {
        match level {
            "+" => self.plus.get_or_insert_with(Box::default),
            "#" => self.hash.get_or_insert_with(Box::default),
            literal => self.children.entry(Box::from(literal)).or_default(),
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<K, V>> {
        match level {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            literal => self.children.get_mut(literal),
        }
    }

    fn remove_child(&mut self, level: &str) {
        match level {
            "+" => self.plus = None,
            "#" => self.hash = None,
            literal => {
                self.children.remove(literal);
            }
        }
    }

    fn all_children(&self) -> impl Iterator<Item = &Node<K, V>> {
        self.children
            .values()
            .chain(self.plus.as_deref())
            .chain(self.hash.as_deref())
    }
}

/// Topic filters and their subscribers, keyed by `K` (a client id), valued `V`
/// (subscription options).
#[derive(Debug)]
pub struct SubscriptionTrie<K, V> {
    root: Node<K, V>,
    len: usize,
}

impl<K, V> Default for SubscriptionTrie<K, V> {
    fn default() -> Self {
        SubscriptionTrie {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K: Ord + Clone, V> SubscriptionTrie<K, V> {
    /// Subscribe `key` to `filter` (normal or `$share/...`); replaces and returns
    /// the key's previous value for the same filter.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let (inner, shared) = match split_shared(filter) {
            Some((_, inner)) => (inner, true),
            None => (filter, false),
        };
        let mut node = &mut self.root;
        for level in inner.split('/') {
            node = node.child_or_default(level);
        }
        let list = if shared {
            let index = match node.groups.iter().position(|(g, _)| &**g == filter) {
                Some(i) => i,
                None => {
                    node.groups.push((Arc::from(filter), Vec::new()));
                    node.groups.len() - 1
                }
            };
            &mut node.groups[index].1
        } else {
            if node.filter.is_none() {
                node.filter = Some(Arc::from(inner));
            }
            &mut node.subscribers
        };
        match list.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => Some(std::mem::replace(&mut list[i].1, value)),
            Err(i) => {
                list.insert(i, (key, value));
                self.len += 1;
                None
            }
        }
    }

    /// Unsubscribe `key` from `filter`; returns its value if it was subscribed.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let (inner, shared) = match split_shared(filter) {
            Some((_, inner)) => (inner, true),
            None => (filter, false),
        };
        let levels: Vec<&str> = inner.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, filter, shared, key);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(
        node: &mut Node<K, V>,
        levels: &[&str],
        filter: &str,
        shared: bool,
        key: &K,
    ) -> Option<V> {
        let Some((first, rest)) = levels.split_first() else {
            if shared {
                let gi = node.groups.iter().position(|(g, _)| &**g == filter)?;
                let members = &mut node.groups[gi].1;
                let i = members.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
                let (_, v) = members.remove(i);
                if members.is_empty() {
                    node.groups.remove(gi);
                }
                return Some(v);
            }
            let i = node
                .subscribers
                .binary_search_by(|(k, _)| k.cmp(key))
                .ok()?;
            let (_, v) = node.subscribers.remove(i);
            if node.subscribers.is_empty() {
                node.filter = None;
            }
            return Some(v);
        };
        let child = node.child_mut(first)?;
        let removed = Self::remove_at(child, rest, filter, shared, key);
        if child.is_empty() {
            node.remove_child(first);
        }
        removed
    }

    /// Number of subscriptions, shared memberships included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no subscription at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Visit every normal subscription whose filter matches the topic name `topic`.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&str, &K, &V)) {
        let dollar = topic.starts_with('$');
        Self::walk(&self.root, topic, true, dollar, &mut |node| {
            if let Some(filter) = &node.filter {
                for (k, v) in &node.subscribers {
                    f(filter, k, v);
                }
            }
        });
    }

    /// Visit every shared group whose inner filter matches `topic`, once per group,
    /// with all its members.
    pub fn for_each_shared_match(&self, topic: &str, mut f: impl FnMut(&str, &[(K, V)])) {
        let dollar = topic.starts_with('$');
        Self::walk(&self.root, topic, true, dollar, &mut |node| {
            for (group, members) in &node.groups {
                f(group, members);
            }
        });
    }

    /// Both of the above in one walk: `f` for each normal subscription, `g` for each
    /// shared group, in no particular order between the two.
    pub fn for_each_match_and_group(
        &self,
        topic: &str,
        mut f: impl FnMut(&str, &K, &V),
        mut g: impl FnMut(&str, &[(K, V)]),
    ) {
        let dollar = topic.starts_with('$');
        Self::walk(&self.root, topic, true, dollar, &mut |node| {
            if let Some(filter) = &node.filter {
                for (k, v) in &node.subscribers {
                    f(filter, k, v);
                }
            }
            for (group, members) in &node.groups {
                g(group, members);
            }
        });
    }

    /// Call `visit` on every node whose filter matches the rest of the topic.
    fn walk(
        node: &Node<K, V>,
        topic: &str,
        first: bool,
        dollar: bool,
        visit: &mut dyn FnMut(&Node<K, V>),
    ) {
        let (level, rest) = match topic.split_once('/') {
            Some((l, r)) => (l, Some(r)),
            None => (topic, None),
        };
        let wildcards_allowed = !(first && dollar);
        if wildcards_allowed {
            // `#` matches this level and everything below (and the parent: a/# ⊇ a).
            if let Some(hash) = &node.hash {
                visit(hash);
            }
        }
        let mut step = |child: &Node<K, V>| match rest {
            Some(r) => Self::walk(child, r, false, dollar, visit),
            None => {
                visit(child);
                // `a/#` also matches `a`.
                if let Some(hash) = &child.hash {
                    visit(hash);
                }
            }
        };
        // A topic name holds no wildcards, so a literal lookup never finds `+`/`#`.
        if let Some(child) = node.children.get(level) {
            step(child);
        }
        if wildcards_allowed {
            if let Some(child) = &node.plus {
                step(child);
            }
        }
    }

    /// Every (filter as subscribed, key, value), for listings.
    pub fn iter(&self) -> Vec<(String, &K, &V)> {
        let mut out = Vec::new();
        Self::collect(&self.root, &mut out);
        out
    }

    fn collect<'a>(node: &'a Node<K, V>, out: &mut Vec<(String, &'a K, &'a V)>) {
        if let Some(filter) = &node.filter {
            for (k, v) in &node.subscribers {
                out.push((filter.to_string(), k, v));
            }
        }
        for (group, members) in &node.groups {
            for (k, v) in members {
                out.push((group.to_string(), k, v));
            }
        }
        for child in node.all_children() {
            Self::collect(child, out);
        }
    }
}

#[cfg(test)]
impl<K, V> SubscriptionTrie<K, V> {
    /// Whether no node is left below the root (for pruning tests).
    pub(crate) fn root_is_pruned(&self) -> bool {
        self.root.children.is_empty() && self.root.plus.is_none() && self.root.hash.is_none()
    }
}
