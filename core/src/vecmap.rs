//! Ordered maps and sets kept in one sorted sequence: the engine's tables are bounded by
//! [`Limits`](crate::Limits) and usually hold a handful of entries, and a sorted sequence costs
//! a fraction of the code of a B-tree per key and value type (see `ci/nostd-check/footprint.sh`).
//!
//! Lookups are binary searches. Inserting or removing shifts the entries on one side of the
//! slot: after it for a `Vec` (the least code, for the small tables), or the shorter side for a
//! `VecDeque` ([`DequeMap`], [`DequeSet`]), for the two tables that can hold thousands of
//! entries (calls waiting for a reply, and their deadlines), which fill at one end and empty at
//! the other as calls are made and settle. Iteration is in key order, as with `BTreeMap`, so
//! the engine stays deterministic under a seed.

use alloc::collections::{VecDeque, vec_deque};
use alloc::vec::{self, Vec};
use core::borrow::Borrow;
use core::cmp::Ordering;
use core::fmt;

/// The sorted sequence under a [`VecMap`] or [`VecSet`].
pub(crate) trait Store: Default {
    type Item;
    type Iter<'a>: DoubleEndedIterator<Item = &'a Self::Item>
    where
        Self: 'a;
    type IterMut<'a>: DoubleEndedIterator<Item = &'a mut Self::Item>
    where
        Self: 'a;
    type Drain<'a>: Iterator<Item = Self::Item>
    where
        Self: 'a;
    fn search(&self, f: impl FnMut(&Self::Item) -> Ordering) -> Result<usize, usize>;
    fn at(&self, i: usize) -> &Self::Item;
    fn at_mut(&mut self, i: usize) -> &mut Self::Item;
    fn put(&mut self, i: usize, item: Self::Item);
    fn take(&mut self, i: usize) -> Self::Item;
    fn front(&self) -> Option<&Self::Item>;
    fn back(&self) -> Option<&Self::Item>;
    fn count(&self) -> usize;
    fn items(&self) -> Self::Iter<'_>;
    fn items_mut(&mut self) -> Self::IterMut<'_>;
    fn drain_front(&mut self, n: usize) -> Self::Drain<'_>;
    fn keep(&mut self, f: impl FnMut(&mut Self::Item) -> bool);
    fn empty(&mut self);
}

/// `Store` for `Vec` and `VecDeque`, whose methods share names except the three passed in.
macro_rules! store {
    ($seq:ident, $iter:ty, $iter_mut:ty, $drain:ty, take: $take:expr, front: $front:ident, back: $back:ident) => {
        impl<T> Store for $seq<T> {
            type Item = T;
            type Iter<'a>
                = $iter
            where
                T: 'a;
            type IterMut<'a>
                = $iter_mut
            where
                T: 'a;
            type Drain<'a>
                = $drain
            where
                T: 'a;
            fn search(&self, f: impl FnMut(&T) -> Ordering) -> Result<usize, usize> {
                self.binary_search_by(f)
            }
            fn at(&self, i: usize) -> &T {
                &self[i]
            }
            fn at_mut(&mut self, i: usize) -> &mut T {
                &mut self[i]
            }
            fn put(&mut self, i: usize, item: T) {
                self.insert(i, item);
            }
            fn take(&mut self, i: usize) -> T {
                let take: fn(&mut Self, usize) -> T = $take;
                take(self, i)
            }
            fn front(&self) -> Option<&T> {
                self.$front()
            }
            fn back(&self) -> Option<&T> {
                self.$back()
            }
            fn count(&self) -> usize {
                self.len()
            }
            fn items(&self) -> Self::Iter<'_> {
                self.iter()
            }
            fn items_mut(&mut self) -> Self::IterMut<'_> {
                self.iter_mut()
            }
            fn drain_front(&mut self, n: usize) -> Self::Drain<'_> {
                self.drain(..n)
            }
            fn keep(&mut self, f: impl FnMut(&mut T) -> bool) {
                self.retain_mut(f);
            }
            fn empty(&mut self) {
                self.clear();
            }
        }
    };
}

store!(Vec, core::slice::Iter<'a, T>, core::slice::IterMut<'a, T>, vec::Drain<'a, T>,
    take: |v, i| v.remove(i), front: first, back: last);
store!(VecDeque, vec_deque::Iter<'a, T>, vec_deque::IterMut<'a, T>, vec_deque::Drain<'a, T>,
    take: |d, i| d.remove(i).expect("index from a search"), front: front, back: back);

/// A map ordered by key over a sorted sequence of `(K, V)` (a `Vec` unless said otherwise).
#[derive(Clone, PartialEq)]
pub(crate) struct VecMap<K, V, S = Vec<(K, V)>>(S, core::marker::PhantomData<(K, V)>);

/// A [`VecMap`] over a `VecDeque`, for a large table that fills at one end and empties at the other.
pub(crate) type DequeMap<K, V> = VecMap<K, V, VecDeque<(K, V)>>;

impl<K, V, S: Default> Default for VecMap<K, V, S> {
    fn default() -> Self {
        VecMap(S::default(), core::marker::PhantomData)
    }
}

impl<K: fmt::Debug, V: fmt::Debug, S: Store<Item = (K, V)>> fmt::Debug for VecMap<K, V, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.items().map(|(k, v)| (k, v))).finish()
    }
}

impl<K: Ord, V, S: Store<Item = (K, V)>> VecMap<K, V, S> {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn find<Q: Ord + ?Sized>(&self, key: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.0.search(|(k, _)| k.borrow().cmp(key))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.count()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.count() == 0
    }

    pub(crate) fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &self.0.at(i).1)
    }

    pub(crate) fn get_key_value<Q: Ord + ?Sized>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| {
            let (k, v) = self.0.at(i);
            (k, v)
        })
    }

    pub(crate) fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &mut self.0.at_mut(i).1)
    }

    pub(crate) fn contains_key<Q: Ord + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.find(key).is_ok()
    }

    /// Inserts or replaces; returns the value replaced.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(core::mem::replace(&mut self.0.at_mut(i).1, value)),
            Err(i) => {
                self.0.put(i, (key, value));
                None
            }
        }
    }

    pub(crate) fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| self.0.take(i).1)
    }

    /// The entry with the smallest key.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn first(&self) -> Option<(&K, &V)> {
        self.0.front().map(|(k, v)| (k, v))
    }

    /// Removes the leading entries for which `take` holds, in key order.
    pub(crate) fn drain_first_while(&mut self, mut take: impl FnMut(&K) -> bool) -> S::Drain<'_> {
        let n = self.0.items().take_while(|(k, _)| take(k)).count();
        self.0.drain_front(n)
    }

    /// The largest key.
    pub(crate) fn last_key(&self) -> Option<&K> {
        self.0.back().map(|(k, _)| k)
    }

    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> {
        self.0.items().map(|(k, v)| (k, v))
    }

    pub(crate) fn iter_mut(&mut self) -> impl DoubleEndedIterator<Item = (&K, &mut V)> {
        self.0.items_mut().map(|(k, v)| (&*k, v))
    }

    pub(crate) fn keys(&self) -> impl DoubleEndedIterator<Item = &K> {
        self.0.items().map(|(k, _)| k)
    }

    pub(crate) fn values(&self) -> impl DoubleEndedIterator<Item = &V> {
        self.0.items().map(|(_, v)| v)
    }

    pub(crate) fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> {
        self.0.items_mut().map(|(_, v)| v)
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.0.keep(|(k, v)| keep(k, v));
    }

    pub(crate) fn clear(&mut self) {
        self.0.empty();
    }
}

/// A set ordered by value over a sorted sequence (a `Vec` unless said otherwise).
#[derive(Clone, PartialEq)]
pub(crate) struct VecSet<K, S = Vec<K>>(S, core::marker::PhantomData<K>);

/// A [`VecSet`] over a `VecDeque`, for a large set that fills at one end and empties at the other.
pub(crate) type DequeSet<K> = VecSet<K, VecDeque<K>>;

impl<K, S: Default> Default for VecSet<K, S> {
    fn default() -> Self {
        VecSet(S::default(), core::marker::PhantomData)
    }
}

impl<K: fmt::Debug, S: Store<Item = K>> fmt::Debug for VecSet<K, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.items()).finish()
    }
}

impl<K: Ord, S: Store<Item = K>> VecSet<K, S> {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.0.count()
    }

    /// Adds `key`; `false` if it was there already.
    pub(crate) fn insert(&mut self, key: K) -> bool {
        match self.0.search(|k| k.cmp(&key)) {
            Ok(_) => false,
            Err(i) => {
                self.0.put(i, key);
                true
            }
        }
    }

    /// Removes `key`; `false` if it was not there.
    pub(crate) fn remove(&mut self, key: &K) -> bool {
        match self.0.search(|k| k.cmp(key)) {
            Ok(i) => {
                self.0.take(i);
                true
            }
            Err(_) => false,
        }
    }

    /// The smallest element.
    pub(crate) fn first(&self) -> Option<&K> {
        self.0.front()
    }

    /// Removes and returns the smallest element.
    pub(crate) fn pop_first(&mut self) -> Option<K> {
        (self.0.count() > 0).then(|| self.0.take(0))
    }

    pub(crate) fn clear(&mut self) {
        self.0.empty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::{BTreeMap, BTreeSet};
    use alloc::vec::Vec;

    /// A tiny deterministic generator so the model check needs no dependency.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn map_matches_btreemap() {
        map_model::<Vec<(u64, u64)>>();
        map_model::<VecDeque<(u64, u64)>>();
    }

    #[test]
    fn set_matches_btreeset() {
        set_model::<Vec<(u64, u64)>>();
        set_model::<VecDeque<(u64, u64)>>();
    }

    fn map_model<S: Store<Item = (u64, u64)>>() {
        let mut state = 0x9e37_79b9_7f4a_7c15;
        let mut ours: VecMap<u64, u64, S> = VecMap::new();
        let mut model: BTreeMap<u64, u64> = BTreeMap::new();
        for step in 0..20_000u64 {
            let key = next(&mut state) % 64;
            match next(&mut state) % 5 {
                0 | 1 => assert_eq!(ours.insert(key, step), model.insert(key, step)),
                2 => assert_eq!(ours.remove(&key), model.remove(&key)),
                3 => {
                    if let Some(v) = ours.get_mut(&key) {
                        *v += 1;
                    }
                    if let Some(v) = model.get_mut(&key) {
                        *v += 1;
                    }
                }
                _ => {
                    let odd = step % 2 == 1;
                    ours.retain(|k, _| (k % 7 == 0) != odd || k % 3 != 0);
                    model.retain(|k, _| (k % 7 == 0) != odd || k % 3 != 0);
                }
            }
            assert_eq!(ours.get(&key), model.get(&key));
            assert_eq!(ours.contains_key(&key), model.contains_key(&key));
            assert_eq!(ours.len(), model.len());
            assert_eq!(ours.first(), model.first_key_value());
            assert_eq!(ours.last_key(), model.keys().next_back());
        }
        let mut expect = ours.first().map_or(0, |(k, _)| *k);
        let run: Vec<u64> = ours
            .drain_first_while(|k| {
                let ok = *k == expect;
                expect += 1;
                ok
            })
            .map(|(k, _)| k)
            .collect();
        for k in &run {
            assert_eq!(run[0] + run.len() as u64 - 1, *run.last().unwrap());
            model.remove(k);
        }
        assert!(ours.iter().eq(model.iter()));
        assert!(ours.keys().eq(model.keys()));
        assert!(ours.values().eq(model.values()));
        ours.clear();
        assert!(ours.is_empty());
    }

    fn set_model<S: Store<Item = (u64, u64)>>() {
        let mut state = 0x2545_f491_4f6c_dd1d;
        let mut ours: VecSet<(u64, u64), S> = VecSet::new();
        let mut model: BTreeSet<(u64, u64)> = BTreeSet::new();
        for _ in 0..20_000 {
            let key = (next(&mut state) % 16, next(&mut state) % 4);
            match next(&mut state) % 4 {
                0 | 1 => assert_eq!(ours.insert(key), model.insert(key)),
                2 => assert_eq!(ours.remove(&key), model.remove(&key)),
                _ => assert_eq!(ours.pop_first(), model.pop_first()),
            }
            assert_eq!(ours.first(), model.first());
            assert_eq!(ours.len(), model.len());
        }
        assert!(ours.0.items().eq(model.iter()));
    }
}
