//! Binary RPC frames: `msgpack(main)` optionally followed by `msgpack(extra)`.
//!
//! The server reads and rewrites only `main` (routing: `type`, `from`, `to`, `method`,
//! `session`, `parent`, plus the trusted `ws` and `user` it adds); `extra` carries the payload
//! (`args`, `with_kwargs`, `promise`, `t`) and passes through the server byte for byte.

use alloc::vec::Vec;
use bytes::Bytes;

use super::DecodeError;
use super::msgpack::{Reader, encode_map};
use crate::{Limits, Map, Value};

/// Keys that only the delivered `main` may set. [`Frame::merged`] ignores them in `extra`, so
/// a peer cannot forge its identity or a reply's target inside the payload (PROTOCOL.md §3.3.1).
pub const ENVELOPE_KEYS: [&str; 8] = ["type", "from", "to", "method", "session", "parent", "ws", "user"];

/// One binary RPC frame, split as it travels.
///
/// ```
/// use hypha_rpc_core::codec::Frame;
/// use hypha_rpc_core::Map;
/// let mut main = Map::new();
/// main.insert("type", "method");
/// main.insert("from", "ws/trusted");
/// let mut extra = Map::new();
/// extra.insert("args", vec![1.into()]);
/// extra.insert("from", "ws/forged");
/// let merged = Frame { main, extra: Some(extra) }.merged();
/// assert_eq!(merged.get("from").and_then(|v| v.as_str()), Some("ws/trusted"));
/// assert!(merged.contains_key("args"));
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Frame {
    /// The routing header the server reads and rewrites.
    pub main: Map,
    /// The payload, omitted on the wire when `None` (heartbeats, server events).
    pub extra: Option<Map>,
}

impl Frame {
    /// One map with `extra`'s keys added to `main`'s, as the Python receiver builds it, except
    /// that [`ENVELOPE_KEYS`] always keep their value from `main`.
    pub fn merged(self) -> Map {
        let mut main = self.main;
        if let Some(extra) = self.extra {
            main.extend_replacing(extra, |k| k.as_str().is_some_and(|k| ENVELOPE_KEYS.contains(&k)));
        }
        main
    }

    /// The string under `key` in `main`.
    pub fn main_str(&self, key: &str) -> Option<&str> {
        self.main.get(key).and_then(Value::as_str)
    }
}

/// Decodes a binary frame. Binaries in the result share `input`'s buffer.
///
/// Errors when the frame is over [`Limits::max_frame_bytes`], either object is malformed or not
/// a map, or bytes follow the second object.
pub fn decode_frame(input: &Bytes, limits: &Limits) -> Result<Frame, DecodeError> {
    decode(input, Some(input), limits)
}

/// Like [`decode_frame`], from a plain slice (binaries are copied).
pub fn decode_frame_slice(input: &[u8], limits: &Limits) -> Result<Frame, DecodeError> {
    decode(input, None, limits)
}

fn decode(input: &[u8], owner: Option<&Bytes>, limits: &Limits) -> Result<Frame, DecodeError> {
    if input.len() > limits.max_frame_bytes {
        return Err(DecodeError::FrameTooLarge { len: input.len(), max: limits.max_frame_bytes });
    }
    if input.is_empty() {
        return Err(DecodeError::Empty);
    }
    let mut r = Reader::new(input, owner, limits);
    let main = as_map(r.value(0)?, "main")?;
    if r.remaining() == 0 {
        return Ok(Frame { main, extra: None });
    }
    let extra = as_map(r.value(0)?, "extra")?;
    if r.remaining() != 0 {
        return Err(DecodeError::TrailingBytes { offset: r.pos, count: r.remaining() });
    }
    Ok(Frame { main, extra: Some(extra) })
}

fn as_map(v: Value, which: &'static str) -> Result<Map, DecodeError> {
    match v {
        Value::Map(m) => Ok(m),
        other => Err(DecodeError::NotAMap { which, found: other.kind() }),
    }
}

/// Appends the frame's bytes to `out`: `main`, then `extra` when present.
pub fn encode_frame_into(frame: &Frame, out: &mut Vec<u8>) {
    encode_map(&frame.main, out);
    if let Some(extra) = &frame.extra {
        encode_map(extra, out);
    }
}

/// The frame's bytes.
pub fn encode_frame(frame: &Frame) -> Bytes {
    let mut out = Vec::with_capacity(256);
    encode_frame_into(frame, &mut out);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_object_frame() {
        let bytes = [0x81, 0xa1, b'a', 0x01];
        let f = decode_frame_slice(&bytes, &Limits::default()).unwrap();
        assert!(f.extra.is_none());
        assert_eq!(&encode_frame(&f)[..], &bytes);
    }

    #[test]
    fn errors() {
        let l = Limits::default();
        assert_eq!(decode_frame_slice(&[], &l), Err(DecodeError::Empty));
        assert_eq!(
            decode_frame_slice(&[0x01], &l),
            Err(DecodeError::NotAMap { which: "main", found: "integer" })
        );
        assert_eq!(
            decode_frame_slice(&[0x80, 0x90], &l),
            Err(DecodeError::NotAMap { which: "extra", found: "array" })
        );
        assert_eq!(
            decode_frame_slice(&[0x80, 0x80, 0x00], &l),
            Err(DecodeError::TrailingBytes { offset: 2, count: 1 })
        );
        let small = Limits { max_frame_bytes: 1, ..Limits::default() };
        assert_eq!(
            decode_frame_slice(&[0x80, 0x80], &small),
            Err(DecodeError::FrameTooLarge { len: 2, max: 1 })
        );
    }
}
