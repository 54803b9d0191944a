//! A small seeded PRNG for ids, so the same seed and inputs give the same bytes on the wire.

use alloc::string::String;

/// xoshiro256** seeded through splitmix64. Not for secrets: keys come from the adapter's CSPRNG.
#[derive(Debug, Clone)]
pub(crate) struct Rng([u64; 4]);

/// The alphabet of Python's `shortuuid` (57 symbols, no look-alikes).
const ALPHABET: &[u8; 57] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform value in `0..n` (`n > 0`), by rejection so there is no modulo bias.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// A 22-symbol id in Python shortuuid's alphabet (about 128 bits), free of `.`, `/`, `:`.
    pub(crate) fn short_id(&mut self) -> String {
        (0..22).map(|_| ALPHABET[self.below(ALPHABET.len() as u64) as usize] as char).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_well_formed() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let id = a.short_id();
        assert_eq!(id, b.short_id());
        assert_eq!(id.len(), 22);
        assert!(id.bytes().all(|c| ALPHABET.contains(&c)));
        assert_ne!(Rng::new(8).short_id(), id);
    }
}
