//! [`Sparse`]: a collection that is almost always empty, held behind a pointer.
//!
//! Every session record holds its subscriptions, a message queue and two sets of
//! packet identifiers, and in a fleet of idle devices nearly all of them are empty;
//! every queued message holds its subscription identifiers, nearly always none. Inline, they cost their
//! full size (32 and 24 bytes) in every record of the session map; as a `Sparse`, an
//! empty one costs 8 bytes and no allocation. It serializes exactly as the collection
//! itself, so snapshots and commands read the same on nodes with either layout.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A collection with a shared empty value, for [`Sparse`] to lend while it holds none.
pub trait Collection: Default + 'static {
    /// An empty value that lives forever.
    const EMPTY: &'static Self;
    /// Whether it holds nothing.
    fn holds_nothing(&self) -> bool;
}

impl<T: 'static> Collection for VecDeque<T> {
    const EMPTY: &'static Self = &VecDeque::new();
    fn holds_nothing(&self) -> bool {
        self.is_empty()
    }
}

impl<T: 'static> Collection for Vec<T> {
    const EMPTY: &'static Self = &Vec::new();
    fn holds_nothing(&self) -> bool {
        self.is_empty()
    }
}

impl<T: Ord + 'static> Collection for BTreeSet<T> {
    const EMPTY: &'static Self = &BTreeSet::new();
    fn holds_nothing(&self) -> bool {
        self.is_empty()
    }
}

impl<K: Ord + 'static, V: 'static> Collection for BTreeMap<K, V> {
    const EMPTY: &'static Self = &BTreeMap::new();
    fn holds_nothing(&self) -> bool {
        self.is_empty()
    }
}

/// `T`, allocated only while it holds something. Reads go through `Deref`; writes
/// through [`Sparse::make_mut`] (which allocates) or [`Sparse::if_any`] (which does
/// not), and an emptied collection is given back by [`Sparse::tidy`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sparse<T>(Option<Box<T>>);

impl<T: Collection> Sparse<T> {
    /// The collection, to add to: allocated if it was empty.
    pub fn make_mut(&mut self) -> &mut T {
        self.0.get_or_insert_with(Box::default)
    }

    /// The collection, to change or take from, if it holds anything.
    pub fn if_any(&mut self) -> Option<&mut T> {
        self.0.as_deref_mut()
    }

    /// The collection, taken out (empty if none was allocated).
    pub fn into_inner(self) -> T {
        self.0.map_or_else(T::default, |b| *b)
    }

    /// Give the allocation back if the collection is empty.
    pub fn tidy(&mut self) {
        if self.0.as_deref().is_some_and(T::holds_nothing) {
            self.0 = None;
        }
    }
}

impl<T: Collection> Deref for Sparse<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0.as_deref().unwrap_or(T::EMPTY)
    }
}

impl<T: Collection> From<T> for Sparse<T> {
    fn from(collection: T) -> Self {
        if collection.holds_nothing() {
            Sparse(None)
        } else {
            Sparse(Some(Box::new(collection)))
        }
    }
}

impl<T: Collection + Serialize> Serialize for Sparse<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(serializer)
    }
}

impl<'de, T: Collection + Deserialize<'de>> Deserialize<'de> for Sparse<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Sparse::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_costs_a_pointer_and_reads_as_empty() {
        let s: Sparse<VecDeque<u64>> = Sparse::default();
        assert_eq!(std::mem::size_of_val(&s), 8);
        assert!(s.is_empty());
        assert_eq!(s.iter().count(), 0);
    }

    #[test]
    fn writes_allocate_and_tidy_gives_back() {
        let mut s: Sparse<BTreeSet<u16>> = Sparse::default();
        assert!(s.if_any().is_none());
        s.make_mut().insert(7);
        assert!(s.contains(&7));
        s.if_any().expect("holds 7").remove(&7);
        s.tidy();
        assert_eq!(s, Sparse::default(), "no allocation left once empty");
    }

    #[test]
    fn serializes_exactly_as_the_collection() {
        let plain: VecDeque<u32> = [1, 2, 3].into_iter().collect();
        let sparse = Sparse::from(plain.clone());
        let a = bincode::serialize(&plain).unwrap();
        let b = bincode::serialize(&sparse).unwrap();
        assert_eq!(a, b);
        let back: Sparse<VecDeque<u32>> = bincode::deserialize(&a).unwrap();
        assert_eq!(back, sparse);
        let empty: Sparse<VecDeque<u32>> =
            bincode::deserialize(&bincode::serialize(&VecDeque::<u32>::new()).unwrap()).unwrap();
        assert_eq!(empty, Sparse::default());
    }

    #[test]
    fn a_session_record_stays_small() {
        // Every session of the cluster holds one in every node's session map: 112
        // bytes when this was written (184 with the collections inline).
        let record = std::mem::size_of::<crate::cluster::state::SessionRecord>();
        assert!(record <= 112, "session record: {record} bytes");
    }

    #[test]
    fn a_queued_message_stays_small() {
        // One in a queue for every delivery to an offline session: a message published
        // to a thousand of them is a thousand of these (and one message).
        let queued = std::mem::size_of::<crate::cluster::command::QueuedMessage>();
        assert!(queued <= 32, "queued message: {queued} bytes");
    }
}
