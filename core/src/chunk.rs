//! Large messages: reassembling the chunks a peer uploads through our `built-in`
//! `message_cache` (PROTOCOL.md §7.3), with every size and count capped.
//!
//! Chunks usually arrive in order over one websocket, so each is appended straight into one
//! growing buffer and its frame is released at once: a 50 MB message costs about 50 MB, not
//! the chunks plus a copy. Out-of-order chunks wait, bounded, until the gap fills.

use crate::vecmap::VecMap;
use alloc::string::String;
use alloc::vec::Vec;
use bytes::Bytes;

use crate::Limits;
use crate::time::Instant;

/// Why a `message_cache` call was refused; the text goes back to the sender as a reject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkError(pub String);

#[derive(Debug)]
struct Partial {
    /// The peer that created it (`ws/client`); only it may add to or process it.
    owner: String,
    /// Chunks 0..next, concatenated.
    data: Vec<u8>,
    /// The index the next in-order chunk must have.
    next: u64,
    /// Chunks that arrived ahead of `next`.
    waiting: VecMap<u64, Bytes>,
    waiting_bytes: usize,
    last_activity: Instant,
}

/// Every partial message being uploaded to us.
#[derive(Debug, Default)]
pub(crate) struct Reassembly {
    partials: VecMap<String, Partial>,
}

impl Reassembly {
    pub(crate) fn len(&self) -> usize {
        self.partials.len()
    }

    /// `true` while a partial message `key` exists.
    #[cfg_attr(not(feature = "fuzzing"), allow(dead_code))]
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.partials.contains_key(key)
    }

    /// Bytes held in all partial messages.
    pub(crate) fn bytes(&self) -> usize {
        self.partials.values().map(|p| p.data.len() + p.waiting_bytes).sum()
    }

    pub(crate) fn create(
        &mut self,
        now: Instant,
        key: &str,
        owner: &str,
        overwrite: bool,
        limits: &Limits,
    ) -> Result<(), ChunkError> {
        if let Some(p) = self.partials.get(key) {
            if !overwrite || p.owner != owner {
                return Err(ChunkError(alloc::format!("Message with key {key} already exists.")));
            }
        } else if self.partials.len() >= limits.max_partial_messages {
            return Err(ChunkError(alloc::format!(
                "Too many partial messages (limit {})",
                limits.max_partial_messages
            )));
        }
        let partial = Partial {
            owner: owner.into(),
            data: Vec::new(),
            next: 0,
            waiting: VecMap::new(),
            waiting_bytes: 0,
            last_activity: now,
        };
        self.partials.insert(key.into(), partial);
        Ok(())
    }

    /// Stores chunk `index` (`None`: the next one, for `append`).
    pub(crate) fn add(
        &mut self,
        now: Instant,
        key: &str,
        owner: &str,
        index: Option<u64>,
        data: Bytes,
        limits: &Limits,
    ) -> Result<(), ChunkError> {
        let total_held = self.bytes();
        let p = self.owned(key, owner)?;
        let index = index.unwrap_or_else(|| p.waiting.last_key().map_or(p.next, |k| k + 1));
        if index >= limits.max_chunks_per_message as u64 {
            return Err(ChunkError(alloc::format!(
                "chunk index {index} is over the limit of {}",
                limits.max_chunks_per_message
            )));
        }
        if index < p.next || p.waiting.contains_key(&index) {
            return Err(ChunkError(alloc::format!("chunk {index} of {key} was already received")));
        }
        let size = p.data.len() + p.waiting_bytes + data.len();
        if size > limits.max_message_bytes {
            return Err(ChunkError(alloc::format!(
                "message {key} exceeds {} bytes",
                limits.max_message_bytes
            )));
        }
        if total_held + data.len() > limits.max_reassembly_bytes {
            return Err(ChunkError(alloc::format!(
                "partial messages exceed {} bytes in total",
                limits.max_reassembly_bytes
            )));
        }
        p.last_activity = now;
        if index == p.next {
            // Grow by a quarter (not double): the buffer stays within 1.25x of the message
            // while copying stays linear overall.
            let spare = p.data.capacity() - p.data.len();
            if spare < data.len() {
                p.data.reserve_exact(data.len().max(p.data.len() / 4));
            }
            p.data.extend_from_slice(&data);
            p.next += 1;
            let mut expect = p.next;
            for (_, d) in p.waiting.drain_first_while(|&k| {
                let next = k == expect;
                expect += 1;
                next
            }) {
                p.waiting_bytes -= d.len();
                p.data.extend_from_slice(&d);
                p.next += 1;
            }
        } else {
            if p.waiting.len() >= limits.max_waiting_chunks {
                return Err(ChunkError(alloc::format!(
                    "more than {} chunks of {key} arrived ahead of chunk {}",
                    limits.max_waiting_chunks,
                    p.next
                )));
            }
            p.waiting_bytes += data.len();
            p.waiting.insert(index, data);
        }
        Ok(())
    }

    /// Removes and returns the complete message; fails (and drops it) if a chunk is missing.
    pub(crate) fn take(&mut self, key: &str, owner: &str) -> Result<Bytes, ChunkError> {
        self.owned(key, owner)?;
        let p = self.partials.remove(key).expect("checked above");
        if !p.waiting.is_empty() {
            return Err(ChunkError(alloc::format!("message {key} is missing chunk {}", p.next)));
        }
        Ok(Bytes::from(p.data))
    }

    pub(crate) fn remove(&mut self, key: &str, owner: &str) -> Result<(), ChunkError> {
        self.owned(key, owner)?;
        self.partials.remove(key);
        Ok(())
    }

    /// Drops partial messages idle for longer than `limits.partial_message_expiry`; returns
    /// how many.
    pub(crate) fn expire(&mut self, now: Instant, limits: &Limits) -> usize {
        let before = self.partials.len();
        self.partials.retain(|_, p| now < p.last_activity + limits.partial_message_expiry);
        before - self.partials.len()
    }

    /// Drops the partial message `key`, whoever owns it.
    pub(crate) fn forget_key(&mut self, key: &str) {
        self.partials.remove(key);
    }

    /// Drops every partial message of a peer that left.
    pub(crate) fn forget_owner(&mut self, owner: &str) {
        self.partials.retain(|_, p| p.owner != owner);
    }

    /// When the oldest partial message expires.
    pub(crate) fn next_expiry(&self, limits: &Limits) -> Option<Instant> {
        self.partials.values().map(|p| p.last_activity + limits.partial_message_expiry).min()
    }

    fn owned(&mut self, key: &str, owner: &str) -> Result<&mut Partial, ChunkError> {
        match self.partials.get_mut(key) {
            Some(p) if p.owner == owner => Ok(p),
            // A stranger's key looks like a missing one: do not reveal it exists.
            _ => Err(ChunkError(alloc::format!("Message with key {key} does not exists."))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Duration;

    fn limits() -> Limits {
        Limits {
            max_chunks_per_message: 8,
            max_message_bytes: 64,
            max_partial_messages: 2,
            ..Limits::default()
        }
    }

    #[test]
    fn in_and_out_of_order() {
        let (l, t) = (limits(), Instant::ZERO);
        let mut r = Reassembly::default();
        r.create(t, "k", "ws/a", false, &l).unwrap();
        r.add(t, "k", "ws/a", Some(2), Bytes::from_static(b"cc"), &l).unwrap();
        r.add(t, "k", "ws/a", Some(0), Bytes::from_static(b"aa"), &l).unwrap();
        assert!(r.add(t, "k", "ws/a", Some(0), Bytes::from_static(b"aa"), &l).is_err(), "duplicate");
        assert_eq!(r.bytes(), 4);
        r.add(t, "k", "ws/a", Some(1), Bytes::from_static(b"bb"), &l).unwrap();
        r.add(t, "k", "ws/a", None, Bytes::from_static(b"dd"), &l).unwrap(); // append: after the last
        assert_eq!(&r.take("k", "ws/a").unwrap()[..], b"aabbccdd");
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn limits_and_owners() {
        let (l, t) = (limits(), Instant::ZERO);
        let mut r = Reassembly::default();
        r.create(t, "k", "ws/a", false, &l).unwrap();
        assert!(r.add(t, "k", "ws/b", Some(0), Bytes::from_static(b"x"), &l).is_err(), "stranger");
        assert!(r.take("k", "ws/b").is_err(), "stranger");
        assert!(r.add(t, "k", "ws/a", Some(8), Bytes::from_static(b"x"), &l).is_err(), "index cap");
        assert!(r.add(t, "k", "ws/a", Some(0), Bytes::from(alloc::vec![0; 65]), &l).is_err(), "size cap");
        r.add(t, "k", "ws/a", Some(1), Bytes::from_static(b"x"), &l).unwrap();
        assert!(r.take("k", "ws/a").is_err(), "gap");
        r.create(t, "a", "ws/a", false, &l).unwrap();
        r.create(t, "b", "ws/a", false, &l).unwrap();
        assert!(r.create(t, "c", "ws/a", false, &l).is_err(), "partial cap");
        assert_eq!(r.expire(t + l.partial_message_expiry, &l), 2);
        let _ = Duration::ZERO;
    }

    #[test]
    fn chunks_ahead_of_a_gap_are_capped_and_fill_in_order() {
        let l = Limits { max_waiting_chunks: 3, max_chunks_per_message: 100, ..Limits::default() };
        let t = Instant::ZERO;
        let mut r = Reassembly::default();
        r.create(t, "k", "ws/a", false, &l).unwrap();
        for i in [4u8, 2, 3] {
            r.add(t, "k", "ws/a", Some(i.into()), Bytes::from(alloc::vec![b'0' + i]), &l).unwrap();
        }
        let err = r.add(t, "k", "ws/a", Some(6), Bytes::from_static(b"6"), &l).unwrap_err();
        assert!(err.0.contains("ahead of chunk 0"), "{}", err.0);
        r.add(t, "k", "ws/a", Some(0), Bytes::from_static(b"0"), &l).unwrap();
        // 2..=4 wait behind the gap at 1; filling it drains them all, then 5 is next.
        r.add(t, "k", "ws/a", Some(1), Bytes::from_static(b"1"), &l).unwrap();
        assert_eq!(r.bytes(), 5);
        r.add(t, "k", "ws/a", None, Bytes::from_static(b"5"), &l).unwrap();
        assert_eq!(&r.take("k", "ws/a").unwrap()[..], b"012345");
    }
}
