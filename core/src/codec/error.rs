//! Typed errors of the codec. Every one of them means the *peer* sent something invalid.

use alloc::string::String;

/// Bytes that are not a valid msgpack object or hypha-rpc frame. Always the sender's fault;
/// the frame is dropped and nothing else is affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame is larger than [`Limits::max_frame_bytes`](crate::Limits::max_frame_bytes).
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Size of the frame.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input ended (or declared more elements than bytes remain) inside an object.
    #[error("input truncated at byte {offset}: at least {needed} more bytes needed")]
    Truncated {
        /// Where the missing bytes were expected.
        offset: usize,
        /// How many more bytes the header declared, at least.
        needed: usize,
    },
    /// The marker byte `0xc1`, which msgpack reserves.
    #[error("reserved msgpack marker 0xc1 at byte {offset}")]
    ReservedMarker {
        /// Position of the marker.
        offset: usize,
    },
    /// A msgpack string that is not UTF-8 (Python drops such frames too).
    #[error("string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Position of the string's payload.
        offset: usize,
    },
    /// Arrays and maps nested deeper than [`Limits::max_depth`](crate::Limits::max_depth).
    #[error("nesting deeper than {max} levels at byte {offset}")]
    TooDeep {
        /// Position of the collection that broke the limit.
        offset: usize,
        /// The limit in force.
        max: usize,
    },
    /// A declared length above its cap in [`Limits`](crate::Limits).
    #[error("{kind} of length {len} at byte {offset} exceeds the limit of {max}")]
    TooLong {
        /// `"array"`, `"map"`, `"str"`, `"bin"` or `"ext"`.
        kind: &'static str,
        /// The declared length.
        len: usize,
        /// The limit.
        max: usize,
        /// Position of the header.
        offset: usize,
    },
    /// The frame is empty.
    #[error("empty frame")]
    Empty,
    /// The first or second object of a frame is not a map.
    #[error("the {which} object of the frame is {found}, not a map")]
    NotAMap {
        /// `"main"` or `"extra"`.
        which: &'static str,
        /// What it is instead.
        found: &'static str,
    },
    /// Bytes left over after the second object.
    #[error("{count} unexpected bytes after the second object, at byte {offset}")]
    TrailingBytes {
        /// Where they start.
        offset: usize,
        /// How many.
        count: usize,
    },
}

/// A map whose `_rtype` names a known type but whose fields do not fit it. The peer's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RTypeError {
    /// A required field is absent.
    #[error("`{rtype}` object lacks the field `{field}`")]
    MissingField {
        /// The `_rtype`.
        rtype: String,
        /// The missing key.
        field: &'static str,
    },
    /// A field has the wrong msgpack type.
    #[error("`{rtype}` field `{field}` should be {expected}, found {found}")]
    WrongType {
        /// The `_rtype`.
        rtype: String,
        /// The key.
        field: &'static str,
        /// What was expected.
        expected: &'static str,
        /// What was found.
        found: &'static str,
    },
    /// A field has the right type but an impossible value.
    #[error("`{rtype}` field `{field}` is invalid: {reason}")]
    Invalid {
        /// The `_rtype`.
        rtype: String,
        /// The key.
        field: &'static str,
        /// Why.
        reason: String,
    },
}
