//! End-to-end encryption behind a small [`Crypto`] trait: NaCl `crypto_box` (X25519 +
//! XSalsa20-Poly1305, byte-compatible with PyNaCl and tweetnacl) with keys and nonces from an
//! RNG the adapter passes in, and a deterministic fake for fuzzing and simulation.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crypto_box::aead::Aead;
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use rand_core::CryptoRngCore;

/// Public and secret keys are 32 bytes.
pub const KEY_LEN: usize = 32;
/// Nonces are 24 random bytes per message.
pub const NONCE_LEN: usize = 24;
/// The Poly1305 tag leads every ciphertext.
pub const TAG_LEN: usize = 16;

/// Seals and opens message payloads for one key pair.
pub trait Crypto: Send {
    /// Our public key.
    fn public_key(&self) -> [u8; KEY_LEN];
    /// Encrypts `plaintext` for `their_public`: a fresh nonce and the ciphertext (tag first, no
    /// nonce prefix: PyNaCl's `Box.encrypt(...).ciphertext`). `None` for a key that must not be
    /// used (libsodium's small-order keys, which anyone could open).
    fn seal(&mut self, their_public: &[u8; KEY_LEN], plaintext: &[u8]) -> Option<([u8; NONCE_LEN], Vec<u8>)>;
    /// Decrypts and authenticates; `None` for a wrong key or tampered data.
    fn open(
        &mut self,
        their_public: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        ciphertext: &[u8],
    ) -> Option<Vec<u8>>;
}

/// The real thing: NaCl `crypto_box` with our secret key and an injected CSPRNG for nonces.
///
/// ```
/// use hypha_rpc_core::crypto::{Crypto, NaclBox};
/// # struct Counter(u8);
/// # impl rand_core::RngCore for Counter {
/// #     fn next_u32(&mut self) -> u32 { self.0 = self.0.wrapping_add(1); self.0 as u32 }
/// #     fn next_u64(&mut self) -> u64 { self.next_u32() as u64 }
/// #     fn fill_bytes(&mut self, d: &mut [u8]) { for b in d { *b = self.next_u32() as u8 } }
/// #     fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), rand_core::Error> { self.fill_bytes(d); Ok(()) }
/// # }
/// # impl rand_core::CryptoRng for Counter {}
/// // In real use the RNG is the OS's (the async client passes `OsRng`).
/// let mut alice = NaclBox::from_secret([1; 32], Counter(0));
/// let mut bob = NaclBox::from_secret([2; 32], Counter(100));
/// let (nonce, sealed) = alice.seal(&bob.public_key(), b"hello").unwrap();
/// assert_eq!(sealed.len(), 5 + 16);
/// assert_eq!(bob.open(&alice.public_key(), &nonce, &sealed).as_deref(), Some(&b"hello"[..]));
/// ```
pub struct NaclBox<R> {
    secret: SecretKey,
    /// The secret key bytes, for libsodium's X25519 (clamped, not reduced) in the key check.
    raw: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
    rng: R,
    /// Boxes of recent peers, most recent last: the X25519 exchange and the key check run once
    /// per peer instead of once per message.
    boxes: Vec<([u8; KEY_LEN], SalsaBox)>,
}

/// Peers whose precomputed box is kept.
const BOX_CACHE: usize = 16;

/// libsodium's blacklist of small-order Curve25519 points (`has_small_order`): a public key
/// among them (ignoring the top bit) makes the shared secret known to everyone.
const SMALL_ORDER: [[u8; KEY_LEN]; 7] = [
    [0; 32],
    {
        let mut k = [0u8; 32];
        k[0] = 1;
        k
    },
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a, 0xda,
        0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef, 0x5b, 0x04,
        0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f, 0x11, 0x57,
    ],
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
    ],
    [
        0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
    ],
    [
        0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
    ],
];

/// `false` for a key libsodium refuses: a small-order point, or one whose shared secret with
/// us is all zeros. Such a box could be opened (and forged) by anyone.
fn acceptable(raw_secret: &[u8; KEY_LEN], their_public: &[u8; KEY_LEN]) -> bool {
    let mut masked = *their_public;
    masked[31] &= 0x7f;
    if SMALL_ORDER.contains(&masked) {
        return false;
    }
    let shared = curve25519_dalek::montgomery::MontgomeryPoint(*their_public).mul_clamped(*raw_secret);
    shared.0 != [0u8; KEY_LEN]
}

impl<R: CryptoRngCore + Send> NaclBox<R> {
    /// A new random key pair.
    pub fn generate(mut rng: R) -> Self {
        let mut raw = [0u8; KEY_LEN];
        rng.fill_bytes(&mut raw);
        Self::from_secret(raw, rng)
    }
    /// Our own key pair, from its secret key.
    pub fn from_secret(raw: [u8; KEY_LEN], rng: R) -> Self {
        let secret = SecretKey::from_bytes(raw);
        let public = secret.public_key().to_bytes();
        NaclBox { secret, raw, public, rng, boxes: Vec::new() }
    }
    /// The secret key bytes (to store the identity).
    pub fn secret_key(&self) -> [u8; KEY_LEN] {
        self.secret.to_bytes()
    }
}

impl<R> fmt::Debug for NaclBox<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NaclBox(public {})", to_hex(&self.public))
    }
}

impl<R> NaclBox<R> {
    /// The box for `their_public`, from the cache or made (`None` for a refused key).
    fn boxed(&mut self, their_public: &[u8; KEY_LEN]) -> Option<&SalsaBox> {
        if let Some(i) = self.boxes.iter().position(|(k, _)| k == their_public) {
            let hit = self.boxes.remove(i);
            self.boxes.push(hit);
        } else {
            if !acceptable(&self.raw, their_public) {
                return None;
            }
            if self.boxes.len() >= BOX_CACHE {
                self.boxes.remove(0);
            }
            let b = SalsaBox::new(&PublicKey::from_bytes(*their_public), &self.secret);
            self.boxes.push((*their_public, b));
        }
        self.boxes.last().map(|(_, b)| b)
    }
}

impl<R: CryptoRngCore + Send> Crypto for NaclBox<R> {
    fn public_key(&self) -> [u8; KEY_LEN] {
        self.public
    }
    fn seal(&mut self, their_public: &[u8; KEY_LEN], plaintext: &[u8]) -> Option<([u8; NONCE_LEN], Vec<u8>)> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill_bytes(&mut nonce);
        let b = self.boxed(their_public)?;
        // Encryption fails only for inputs beyond the cipher's 256 GiB limit.
        let sealed = b.encrypt(&nonce.into(), plaintext).ok()?;
        Some((nonce, sealed))
    }
    fn open(
        &mut self,
        their_public: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        ciphertext: &[u8],
    ) -> Option<Vec<u8>> {
        self.boxed(their_public)?.decrypt(nonce.into(), ciphertext).ok()
    }
}

/// A deterministic stand-in with the same shapes (16-byte tag, 24-byte nonce) and the same
/// failure modes (a wrong key or a changed byte fails to open), so fuzzers and simulations
/// reach the code behind decryption cheaply. **Not encryption**: anyone can open it.
#[derive(Debug, Clone)]
pub struct FakeCrypto {
    public: [u8; KEY_LEN],
    counter: u64,
}

impl FakeCrypto {
    /// A fake identity named by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut public = [0u8; KEY_LEN];
        let mut s = seed ^ 0x5eed_cafe;
        for chunk in public.chunks_mut(8) {
            s = mix(s);
            chunk.copy_from_slice(&s.to_le_bytes());
        }
        FakeCrypto { public, counter: 0 }
    }
    fn shared(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> u64 {
        let (x, y) = if a <= b { (a, b) } else { (b, a) };
        x.iter()
            .chain(y.iter())
            .fold(0xcbf2_9ce4_8422_2325, |h, &c| (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3))
    }
    fn tag(key: u64, nonce: &[u8; NONCE_LEN], body: &[u8]) -> [u8; TAG_LEN] {
        let mut h = key;
        for &c in nonce.iter().chain(body) {
            h = mix(h ^ u64::from(c));
        }
        let mut t = [0u8; TAG_LEN];
        t[..8].copy_from_slice(&h.to_le_bytes());
        t[8..].copy_from_slice(&mix(h).to_le_bytes());
        t
    }
    fn keystream(key: u64, nonce: &[u8; NONCE_LEN], data: &mut [u8]) {
        let mut s = nonce.iter().fold(key, |h, &c| mix(h ^ u64::from(c)));
        for chunk in data.chunks_mut(8) {
            s = mix(s);
            for (d, k) in chunk.iter_mut().zip(s.to_le_bytes()) {
                *d ^= k;
            }
        }
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Crypto for FakeCrypto {
    fn public_key(&self) -> [u8; KEY_LEN] {
        self.public
    }
    fn seal(&mut self, their_public: &[u8; KEY_LEN], plaintext: &[u8]) -> Option<([u8; NONCE_LEN], Vec<u8>)> {
        self.counter += 1;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&self.counter.to_le_bytes());
        nonce[8..16].copy_from_slice(&self.public[..8]);
        let key = Self::shared(&self.public, their_public);
        let mut body = plaintext.to_vec();
        Self::keystream(key, &nonce, &mut body);
        let mut out = Vec::with_capacity(TAG_LEN + body.len());
        out.extend_from_slice(&Self::tag(key, &nonce, &body));
        out.extend_from_slice(&body);
        Some((nonce, out))
    }
    fn open(
        &mut self,
        their_public: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        ciphertext: &[u8],
    ) -> Option<Vec<u8>> {
        if ciphertext.len() < TAG_LEN {
            return None;
        }
        let key = Self::shared(&self.public, their_public);
        let (tag, body) = ciphertext.split_at(TAG_LEN);
        if tag != Self::tag(key, nonce, body) {
            return None;
        }
        let mut out = body.to_vec();
        Self::keystream(key, nonce, &mut out);
        Some(out)
    }
}

/// 64 lowercase hex characters, as `get_public_key()` shows keys.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// A 32-byte key from 64 hex characters (either case).
///
/// ```
/// use hypha_rpc_core::crypto::{key_from_hex, to_hex};
/// let k = [0xab; 32];
/// assert_eq!(key_from_hex(&to_hex(&k)), Some(k));
/// assert_eq!(key_from_hex("abc"), None);
/// ```
pub fn key_from_hex(s: &str) -> Option<[u8; KEY_LEN]> {
    let b = s.as_bytes();
    if b.len() != 2 * KEY_LEN {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; KEY_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nibble(b[2 * i])? << 4) | nibble(b[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_crypto_round_trips_and_detects_tampering_and_wrong_keys() {
        let mut a = FakeCrypto::new(1);
        let mut b = FakeCrypto::new(2);
        let mut c = FakeCrypto::new(3);
        let (nonce, sealed) = a.seal(&b.public_key(), b"payload bytes").unwrap();
        assert_eq!(sealed.len(), 13 + TAG_LEN);
        assert_ne!(&sealed[TAG_LEN..], b"payload bytes");
        assert_eq!(b.open(&a.public_key(), &nonce, &sealed).as_deref(), Some(&b"payload bytes"[..]));
        assert_eq!(c.open(&a.public_key(), &nonce, &sealed), None, "wrong key");
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 1;
            assert_eq!(b.open(&a.public_key(), &nonce, &t), None, "byte {i} flipped");
        }
        let (n2, _) = a.seal(&b.public_key(), b"x").unwrap();
        assert_ne!(nonce, n2, "a fresh nonce per message");
    }

    #[test]
    fn small_order_keys_are_refused_both_ways() {
        struct Sevens;
        impl rand_core::RngCore for Sevens {
            fn next_u32(&mut self) -> u32 {
                7
            }
            fn next_u64(&mut self) -> u64 {
                7
            }
            fn fill_bytes(&mut self, d: &mut [u8]) {
                d.fill(7)
            }
            fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), rand_core::Error> {
                d.fill(7);
                Ok(())
            }
        }
        impl rand_core::CryptoRng for Sevens {}
        let mut forger = NaclBox::from_secret([3; 32], Sevens);
        let mut bob = NaclBox::from_secret([4; 32], Sevens);
        for bad in SMALL_ORDER {
            for top in [0u8, 0x80] {
                let mut k = bad;
                k[31] |= top;
                assert!(forger.seal(&k, b"x").is_none(), "sealed for {}", to_hex(&k));
                assert!(bob.open(&k, &[0; 24], &[0; 17]).is_none());
            }
        }
        // An honest key still works.
        let (n, c) = forger.seal(&bob.public_key(), b"ok").unwrap();
        assert_eq!(bob.open(&forger.public_key(), &n, &c).as_deref(), Some(&b"ok"[..]));
    }
}
