//! Bounded msgpack decoding and Python-identical msgpack encoding of [`Value`]s.
//!
//! The decoder checks every declared length against the bytes actually left *before* it
//! allocates, so a 6-byte header claiming a 4 GiB string costs nothing. It never panics.

use alloc::vec::Vec;
use bytes::Bytes;

use super::DecodeError;
use crate::{Integer, Limits, Map, Str, Value};

/// Decodes one msgpack object from the start of `input`; returns it and the bytes consumed.
///
/// Binaries in the result share `input`'s buffer (no copy).
///
/// ```
/// use bytes::Bytes;
/// use hypha_rpc_core::{codec::decode_value, Limits, Value};
/// let (v, used) = decode_value(&Bytes::from_static(&[0x92, 0x01, 0xa1, b'x']), &Limits::default()).unwrap();
/// assert_eq!(v, Value::Array(vec![1.into(), "x".into()]));
/// assert_eq!(used, 4);
/// ```
pub fn decode_value(input: &Bytes, limits: &Limits) -> Result<(Value, usize), DecodeError> {
    let mut r = Reader::new(input, Some(input), limits);
    let v = r.value(0)?;
    Ok((v, r.pos))
}

/// Like [`decode_value`], from a plain slice (binaries are copied).
pub fn decode_value_slice(input: &[u8], limits: &Limits) -> Result<(Value, usize), DecodeError> {
    let mut r = Reader::new(input, None, limits);
    let v = r.value(0)?;
    Ok((v, r.pos))
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pub(crate) pos: usize,
    owner: Option<&'a Bytes>,
    limits: &'a Limits,
    max_depth: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], owner: Option<&'a Bytes>, limits: &'a Limits) -> Self {
        Reader { buf, pos: 0, owner, limits, max_depth: limits.effective_depth() }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let left = self.remaining();
        if n > left {
            return Err(DecodeError::Truncated { offset: self.pos, needed: n - left });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    fn byte(&mut self) -> Result<u8, DecodeError> {
        match self.buf.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => Err(DecodeError::Truncated { offset: self.pos, needed: 1 }),
        }
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn be_len(&mut self, width: usize) -> Result<usize, DecodeError> {
        Ok(match width {
            1 => self.byte()? as usize,
            2 => u16::from_be_bytes(self.array()?) as usize,
            _ => u32::from_be_bytes(self.array()?) as usize,
        })
    }

    fn check_len(&self, kind: &'static str, len: usize, max: usize, at: usize) -> Result<(), DecodeError> {
        if len > max {
            return Err(DecodeError::TooLong { kind, len, max, offset: at });
        }
        Ok(())
    }

    fn str(&mut self, len: usize, at: usize) -> Result<Value, DecodeError> {
        self.check_len("str", len, self.limits.max_str_len, at)?;
        let start = self.pos;
        let s = self.take(len)?;
        // Most protocol strings are short ASCII; a plain byte scan beats the general validator.
        let ascii = s.len() <= 64 && s.iter().all(|b| *b < 0x80);
        if !ascii && core::str::from_utf8(s).is_err() {
            return Err(DecodeError::InvalidUtf8 { offset: start });
        }
        if let Some(short) = Str::inline(s) {
            return Ok(Value::Str(short));
        }
        let bytes = match self.owner {
            Some(owner) => owner.slice(start..start + len),
            None => Bytes::copy_from_slice(s),
        };
        Ok(Value::Str(Str::from_validated(bytes)))
    }

    fn bin_bytes(&mut self, kind: &'static str, len: usize, at: usize) -> Result<Bytes, DecodeError> {
        self.check_len(kind, len, self.limits.max_bin_len, at)?;
        let start = self.pos;
        let s = self.take(len)?;
        Ok(match self.owner {
            Some(owner) => owner.slice(start..start + len),
            None => Bytes::copy_from_slice(s),
        })
    }

    fn ext(&mut self, len: usize, at: usize) -> Result<Value, DecodeError> {
        let tag = self.byte()? as i8;
        Ok(Value::Ext(tag, self.bin_bytes("ext", len, at)?))
    }

    fn collection_header(
        &mut self,
        kind: &'static str,
        len: usize,
        per_item: usize,
        at: usize,
        depth: usize,
    ) -> Result<(), DecodeError> {
        if depth >= self.max_depth {
            return Err(DecodeError::TooDeep { offset: at, max: self.max_depth });
        }
        self.check_len(kind, len, self.limits.max_collection_len, at)?;
        // Every element takes at least one byte: refuse claims the input cannot back.
        let min = len.saturating_mul(per_item);
        let left = self.remaining();
        if min > left {
            return Err(DecodeError::Truncated { offset: self.pos, needed: min - left });
        }
        Ok(())
    }

    fn seq(&mut self, len: usize, at: usize, depth: usize) -> Result<Value, DecodeError> {
        self.collection_header("array", len, 1, at, depth)?;
        let mut v = Vec::with_capacity(len);
        for _ in 0..len {
            v.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(v))
    }

    fn map(&mut self, len: usize, at: usize, depth: usize) -> Result<Value, DecodeError> {
        self.collection_header("map", len, 2, at, depth)?;
        let mut m = Map::with_capacity(len);
        for _ in 0..len {
            let k = self.value(depth + 1)?;
            let v = self.value(depth + 1)?;
            m.push(k, v);
        }
        Ok(Value::Map(m))
    }

    pub(crate) fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        let at = self.pos;
        let m = self.byte()?;
        Ok(match m {
            0x00..=0x7f => Value::Integer(Integer::from(m as u64)),
            0x80..=0x8f => return self.map((m & 0x0f) as usize, at, depth),
            0x90..=0x9f => return self.seq((m & 0x0f) as usize, at, depth),
            0xa0..=0xbf => return self.str((m & 0x1f) as usize, at),
            0xc0 => Value::Nil,
            0xc1 => return Err(DecodeError::ReservedMarker { offset: at }),
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let len = self.be_len(1 << (m - 0xc4))?;
                Value::Bin(self.bin_bytes("bin", len, at)?)
            }
            0xc7..=0xc9 => {
                let len = self.be_len(1 << (m - 0xc7))?;
                return self.ext(len, at);
            }
            0xca => Value::F32(f32::from_be_bytes(self.array()?)),
            0xcb => Value::F64(f64::from_be_bytes(self.array()?)),
            0xcc => Value::from(self.byte()?),
            0xcd => Value::from(u16::from_be_bytes(self.array()?)),
            0xce => Value::from(u32::from_be_bytes(self.array()?)),
            0xcf => Value::from(u64::from_be_bytes(self.array()?)),
            0xd0 => Value::from(self.byte()? as i8),
            0xd1 => Value::from(i16::from_be_bytes(self.array()?)),
            0xd2 => Value::from(i32::from_be_bytes(self.array()?)),
            0xd3 => Value::from(i64::from_be_bytes(self.array()?)),
            0xd4..=0xd8 => return self.ext(1 << (m - 0xd4), at),
            0xd9..=0xdb => {
                let len = self.be_len(1 << (m - 0xd9))?;
                return self.str(len, at);
            }
            0xdc | 0xdd => {
                let len = self.be_len(if m == 0xdc { 2 } else { 4 })?;
                return self.seq(len, at, depth);
            }
            0xde | 0xdf => {
                let len = self.be_len(if m == 0xde { 2 } else { 4 })?;
                return self.map(len, at, depth);
            }
            0xe0..=0xff => Value::from(m as i8),
        })
    }
}

/// Appends the msgpack encoding of `v` to `out`, byte for byte as Python's `msgpack.packb`
/// (with `use_bin_type=True`) writes the same data.
pub fn encode_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Nil => out.push(0xc0),
        Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Value::Integer(i) => write_int(*i, out),
        Value::F32(f) => {
            out.push(0xca);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::F64(f) => {
            out.push(0xcb);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => {
            write_len(out, s.len(), 0xa0, 31, [0xd9, 0xda, 0xdb]);
            out.extend_from_slice(s.as_bytes());
        }
        Value::Bin(b) => {
            write_len(out, b.len(), 0, 0, [0xc4, 0xc5, 0xc6]);
            out.extend_from_slice(b);
        }
        Value::Array(a) => {
            write_len(out, a.len(), 0x90, 15, [0, 0xdc, 0xdd]);
            for x in a {
                encode_value(x, out);
            }
        }
        Value::Map(m) => encode_map(m, out),
        Value::Ext(tag, data) => {
            match data.len() {
                1 => out.push(0xd4),
                2 => out.push(0xd5),
                4 => out.push(0xd6),
                8 => out.push(0xd7),
                16 => out.push(0xd8),
                n => write_len(out, n, 0, 0, [0xc7, 0xc8, 0xc9]),
            }
            out.push(*tag as u8);
            out.extend_from_slice(data);
        }
    }
}

/// Appends the msgpack encoding of map `m` (what [`encode_value`] does for `Value::Map`).
pub(crate) fn encode_map(m: &Map, out: &mut Vec<u8>) {
    write_len(out, m.len(), 0x80, 15, [0, 0xde, 0xdf]);
    for (k, x) in m {
        encode_value(k, out);
        encode_value(x, out);
    }
}

/// The msgpack encoding of `v` as a new vector.
pub fn to_vec(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode_value(v, &mut out);
    out
}

/// Writes a length header: `fix | len` when `len <= fix_max` (and `fix_max > 0`), otherwise
/// the 8/16/32-bit form (`wide[0] == 0` means there is no 8-bit form).
#[inline]
fn write_len(out: &mut Vec<u8>, len: usize, fix: u8, fix_max: usize, wide: [u8; 3]) {
    if fix_max > 0 && len <= fix_max {
        out.push(fix | len as u8);
    } else if wide[0] != 0 && len <= u8::MAX as usize {
        out.extend_from_slice(&[wide[0], len as u8]);
    } else if len <= u16::MAX as usize {
        out.push(wide[1]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        // Lengths above u32::MAX cannot be represented; no Limits allow such values.
        out.push(wide[2]);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

#[inline]
fn write_int(i: Integer, out: &mut Vec<u8>) {
    if let Some(u) = i.as_u64() {
        if u <= 0x7f {
            out.push(u as u8);
        } else if u <= u8::MAX as u64 {
            out.extend_from_slice(&[0xcc, u as u8]);
        } else if u <= u16::MAX as u64 {
            out.push(0xcd);
            out.extend_from_slice(&(u as u16).to_be_bytes());
        } else if u <= u32::MAX as u64 {
            out.push(0xce);
            out.extend_from_slice(&(u as u32).to_be_bytes());
        } else {
            out.push(0xcf);
            out.extend_from_slice(&u.to_be_bytes());
        }
    } else {
        let n = i.as_i64().unwrap_or_default();
        if n >= -32 {
            out.push(n as i8 as u8);
        } else if n >= i8::MIN as i64 {
            out.extend_from_slice(&[0xd0, n as i8 as u8]);
        } else if n >= i16::MIN as i64 {
            out.push(0xd1);
            out.extend_from_slice(&(n as i16).to_be_bytes());
        } else if n >= i32::MIN as i64 {
            out.push(0xd2);
            out.extend_from_slice(&(n as i32).to_be_bytes());
        } else {
            out.push(0xd3);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn rt(bytes: &[u8]) -> Value {
        let (v, n) = decode_value_slice(bytes, &Limits::default()).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(to_vec(&v), bytes, "re-encoding {v:?}");
        v
    }

    #[test]
    fn canonical_forms_round_trip() {
        assert_eq!(rt(&[0x7f]), Value::from(127));
        assert_eq!(rt(&[0xcc, 0x80]), Value::from(128));
        assert_eq!(rt(&[0xcd, 0x01, 0x00]), Value::from(256));
        assert_eq!(rt(&[0xe0]), Value::from(-32));
        assert_eq!(rt(&[0xd0, 0xdf]), Value::from(-33));
        assert_eq!(rt(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]), Value::from(u64::MAX));
        assert_eq!(rt(&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]), Value::from(i64::MIN));
        let mut s = vec![0xd9, 32];
        s.extend_from_slice(&[b'a'; 32]);
        rt(&s);
        rt(&[0xd4, 0x01, 0x02]);
        rt(&[0xc7, 0x03, 0xff, 1, 2, 3]);
    }

    #[test]
    fn non_canonical_signed_positive_normalises() {
        // int8 holding 5: decodes to 5, re-encodes as a positive fixint (as Python would).
        let (v, _) = decode_value_slice(&[0xd0, 0x05], &Limits::default()).unwrap();
        assert_eq!(to_vec(&v), [0x05]);
    }

    #[test]
    fn huge_claims_fail_before_allocating() {
        let l = Limits::default();
        assert!(matches!(
            decode_value_slice(&[0xdb, 0xff, 0xff, 0xff, 0xff], &l),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(matches!(
            decode_value_slice(&[0xdd, 0x00, 0x0f, 0xff, 0xff], &l),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(decode_value_slice(&[0xc1], &l), Err(DecodeError::ReservedMarker { offset: 0 })));
        assert!(matches!(
            decode_value_slice(&[0xa2, 0xff, 0xfe], &l),
            Err(DecodeError::InvalidUtf8 { offset: 1 })
        ));
    }

    #[test]
    fn depth_is_capped() {
        let l = Limits { max_depth: 3, ..Limits::default() };
        assert!(decode_value_slice(&[0x91, 0x91, 0x91, 0x01], &l).is_ok());
        assert!(matches!(
            decode_value_slice(&[0x91, 0x91, 0x91, 0x91, 0x01], &l),
            Err(DecodeError::TooDeep { offset: 3, max: 3 })
        ));
    }
}
