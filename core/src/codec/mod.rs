//! The hypha-rpc wire codec: msgpack values, two-object frames and every `_rtype`.
//!
//! - [`decode_value`] / [`encode_value`]: one msgpack object, bounded by [`Limits`] on the
//!   way in, written with Python msgpack's exact choices on the way out (smallest integer
//!   form, unsigned for non-negative values, float64 kept float64, str8 for 32..=255 bytes).
//! - [`Frame`]: a binary RPC message, `msgpack(main) [msgpack(extra)]` (PROTOCOL.md §3.1).
//! - [`rtype`]: typed views of the maps that carry `_rtype` (methods, arrays, errors, ...),
//!   and [`rtype::RTypeCodec`], the extension point for custom codecs.
//!
//! [`Limits`]: crate::Limits

mod dtype;
mod error;
mod frame;
mod msgpack;
pub mod rtype;

pub use dtype::{DType, Scalar};
pub use error::{DecodeError, RTypeError};
pub use frame::{ENVELOPE_KEYS, Frame, decode_frame, decode_frame_slice, encode_frame, encode_frame_into};
pub use msgpack::{decode_value, decode_value_slice, encode_value, to_vec};
