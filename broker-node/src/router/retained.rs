//! Retained messages by topic name, matched by topic filter.
//!
//! A trie over topic levels: a SUBSCRIBE's filter walks only the branches its `+` and
//! `#` open, so a new subscription does not scan every retained topic.

use std::collections::HashMap;

#[derive(Debug)]
struct Node<M> {
    children: HashMap<Box<str>, Node<M>, crate::hash::State>,
    message: Option<(Box<str>, M)>,
}

impl<M> Default for Node<M> {
    fn default() -> Self {
        Node {
            children: HashMap::default(),
            message: None,
        }
    }
}

impl<M> Node<M> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.message.is_none()
    }
}

/// One retained message per topic.
#[derive(Debug)]
pub struct RetainedIndex<M> {
    root: Node<M>,
    len: usize,
}

impl<M> Default for RetainedIndex<M> {
    fn default() -> Self {
        RetainedIndex {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<M> RetainedIndex<M> {
    /// Set the retained message of `topic`, returning the one it replaces.
    pub fn insert(&mut self, topic: &str, message: M) -> Option<M> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(Box::from(level)).or_default();
        }
        let old = node
            .message
            .replace((Box::from(topic), message))
            .map(|(_, m)| m);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Clear the retained message of `topic`.
    pub fn remove(&mut self, topic: &str) -> Option<M> {
        let levels: Vec<&str> = topic.split('/').collect();
        let old = Self::remove_at(&mut self.root, &levels);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    fn remove_at(node: &mut Node<M>, levels: &[&str]) -> Option<M> {
        let Some((first, rest)) = levels.split_first() else {
            return node.message.take().map(|(_, m)| m);
        };
        let child = node.children.get_mut(*first)?;
        let old = Self::remove_at(child, rest);
        if child.is_empty() {
            node.children.remove(*first);
        }
        old
    }

    /// The retained message of `topic`.
    pub fn get(&self, topic: &str) -> Option<&M> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref().map(|(_, m)| m)
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none is retained.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Visit every retained message whose topic `filter` matches.
    pub fn for_each_matching(&self, filter: &str, mut f: impl FnMut(&str, &M)) {
        let levels: Vec<&str> = filter.split('/').collect();
        Self::walk(&self.root, &levels, true, &mut f);
    }

    fn walk(node: &Node<M>, levels: &[&str], first: bool, f: &mut dyn FnMut(&str, &M)) {
        let Some((level, rest)) = levels.split_first() else {
            if let Some((t, m)) = &node.message {
                f(t, m);
            }
            return;
        };
        match *level {
            "#" => {
                // The parent itself (`a/#` matches `a`), unless at the first level.
                if !first {
                    if let Some((t, m)) = &node.message {
                        f(t, m);
                    }
                }
                for (name, child) in &node.children {
                    if first && name.starts_with('$') {
                        continue;
                    }
                    Self::visit_all(child, f);
                }
            }
            "+" => {
                for (name, child) in &node.children {
                    if first && name.starts_with('$') {
                        continue;
                    }
                    Self::walk(child, rest, false, f);
                }
            }
            literal => {
                if let Some(child) = node.children.get(literal) {
                    Self::walk(child, rest, false, f);
                }
            }
        }
    }

    fn visit_all(node: &Node<M>, f: &mut dyn FnMut(&str, &M)) {
        if let Some((t, m)) = &node.message {
            f(t, m);
        }
        for child in node.children.values() {
            Self::visit_all(child, f);
        }
    }

    /// Keep only the messages for which `keep` is true (expiry sweeps).
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &M) -> bool) {
        let removed = Self::retain_at(&mut self.root, &mut keep);
        self.len -= removed;
    }

    fn retain_at(node: &mut Node<M>, keep: &mut dyn FnMut(&str, &M) -> bool) -> usize {
        let mut removed = 0;
        if let Some((t, m)) = &node.message {
            if !keep(t, m) {
                node.message = None;
                removed += 1;
            }
        }
        node.children.retain(|_, child| {
            removed += Self::retain_at(child, keep);
            !child.is_empty()
        });
        removed
    }

    /// Every retained topic (`$`-topics included) with its message, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (String, &M)> {
        let mut out = Vec::with_capacity(self.len);
        Self::collect(&self.root, &mut out);
        out.into_iter()
    }

    fn collect<'a>(node: &'a Node<M>, out: &mut Vec<(String, &'a M)>) {
        if let Some((t, m)) = &node.message {
            out.push((t.to_string(), m));
        }
        for child in node.children.values() {
            Self::collect(child, out);
        }
    }
}
