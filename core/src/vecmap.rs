//! Ordered maps and sets kept in one sorted vector: the engine's tables are bounded by
//! [`Limits`](crate::Limits) and usually hold a handful of entries, and a vector costs a
//! fraction of the code of a B-tree per key and value type (see `ci/nostd-check/footprint.sh`).
//!
//! Lookups are binary searches; inserting or removing moves the entries after the slot, which
//! for the bounded sizes here is a short `memmove`. Iteration is in key order, as with
//! `BTreeMap`, so the engine stays deterministic under a seed.

use alloc::vec::Vec;
use core::borrow::Borrow;
use core::fmt;

/// A map ordered by key over a sorted `Vec<(K, V)>`.
#[derive(Clone, PartialEq)]
pub(crate) struct VecMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap(Vec::new())
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for VecMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter().map(|(k, v)| (k, v))).finish()
    }
}

impl<K: Ord, V> VecMap<K, V> {
    pub(crate) const fn new() -> Self {
        VecMap(Vec::new())
    }

    fn find<Q: Ord + ?Sized>(&self, key: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.0.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub(crate) fn get_key_value<Q: Ord + ?Sized>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| (&self.0[i].0, &self.0[i].1))
    }

    pub(crate) fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &mut self.0[i].1)
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
            Ok(i) => Some(core::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    pub(crate) fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    /// The entry with the smallest key.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn first(&self) -> Option<(&K, &V)> {
        self.0.first().map(|(k, v)| (k, v))
    }

    /// Removes the leading entries for which `take` holds, in key order.
    pub(crate) fn drain_first_while(
        &mut self,
        mut take: impl FnMut(&K) -> bool,
    ) -> alloc::vec::Drain<'_, (K, V)> {
        let n = self.0.iter().take_while(|(k, _)| take(k)).count();
        self.0.drain(..n)
    }

    /// The largest key.
    pub(crate) fn last_key(&self) -> Option<&K> {
        self.0.last().map(|(k, _)| k)
    }

    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub(crate) fn iter_mut(&mut self) -> impl DoubleEndedIterator<Item = (&K, &mut V)> {
        self.0.iter_mut().map(|(k, v)| (&*k, v))
    }

    pub(crate) fn keys(&self) -> impl DoubleEndedIterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    pub(crate) fn values(&self) -> impl DoubleEndedIterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    pub(crate) fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> {
        self.0.iter_mut().map(|(_, v)| v)
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.0.retain_mut(|(k, v)| keep(k, v));
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

/// A set ordered by value over a sorted `Vec<K>`.
#[derive(Clone, PartialEq)]
pub(crate) struct VecSet<K>(Vec<K>);

impl<K> Default for VecSet<K> {
    fn default() -> Self {
        VecSet(Vec::new())
    }
}

impl<K: fmt::Debug> fmt::Debug for VecSet<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

impl<K: Ord> VecSet<K> {
    pub(crate) const fn new() -> Self {
        VecSet(Vec::new())
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds `key`; `false` if it was there already.
    pub(crate) fn insert(&mut self, key: K) -> bool {
        match self.0.binary_search(&key) {
            Ok(_) => false,
            Err(i) => {
                self.0.insert(i, key);
                true
            }
        }
    }

    /// Removes `key`; `false` if it was not there.
    pub(crate) fn remove(&mut self, key: &K) -> bool {
        match self.0.binary_search(key) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// The smallest element.
    pub(crate) fn first(&self) -> Option<&K> {
        self.0.first()
    }

    /// Removes and returns the smallest element.
    pub(crate) fn pop_first(&mut self) -> Option<K> {
        (!self.0.is_empty()).then(|| self.0.remove(0))
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
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
        let mut state = 0x9e37_79b9_7f4a_7c15;
        let mut ours: VecMap<u64, u64> = VecMap::new();
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

    #[test]
    fn set_matches_btreeset() {
        let mut state = 0x2545_f491_4f6c_dd1d;
        let mut ours: VecSet<(u64, u64)> = VecSet::new();
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
        assert_eq!(ours.0, model.into_iter().collect::<Vec<_>>());
    }
}
