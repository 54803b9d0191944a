//! Element types of `ndarray` and `typedarray` values, named as numpy and JS name them.

use alloc::format;
use alloc::string::String;
use core::fmt;

/// A numeric element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scalar {
    /// `bool`, one byte per element.
    Bool,
    /// `int8`.
    Int8,
    /// `int16`.
    Int16,
    /// `int32`.
    Int32,
    /// `int64`.
    Int64,
    /// `uint8`.
    UInt8,
    /// `uint16`.
    UInt16,
    /// `uint32`.
    UInt32,
    /// `uint64`.
    UInt64,
    /// `float16`.
    Float16,
    /// `float32`.
    Float32,
    /// `float64`.
    Float64,
    /// `complex64` (two float32).
    Complex64,
    /// `complex128` (two float64).
    Complex128,
}

impl Scalar {
    /// Every scalar type, in declaration order.
    pub const ALL: [Scalar; 14] = [
        Scalar::Bool,
        Scalar::Int8,
        Scalar::Int16,
        Scalar::Int32,
        Scalar::Int64,
        Scalar::UInt8,
        Scalar::UInt16,
        Scalar::UInt32,
        Scalar::UInt64,
        Scalar::Float16,
        Scalar::Float32,
        Scalar::Float64,
        Scalar::Complex64,
        Scalar::Complex128,
    ];

    /// numpy's name (`str(np.dtype)` for a native little-endian array).
    pub fn name(self) -> &'static str {
        match self {
            Scalar::Bool => "bool",
            Scalar::Int8 => "int8",
            Scalar::Int16 => "int16",
            Scalar::Int32 => "int32",
            Scalar::Int64 => "int64",
            Scalar::UInt8 => "uint8",
            Scalar::UInt16 => "uint16",
            Scalar::UInt32 => "uint32",
            Scalar::UInt64 => "uint64",
            Scalar::Float16 => "float16",
            Scalar::Float32 => "float32",
            Scalar::Float64 => "float64",
            Scalar::Complex64 => "complex64",
            Scalar::Complex128 => "complex128",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Scalar::Bool | Scalar::Int8 | Scalar::UInt8 => 1,
            Scalar::Int16 | Scalar::UInt16 | Scalar::Float16 => 2,
            Scalar::Int32 | Scalar::UInt32 | Scalar::Float32 => 4,
            Scalar::Int64 | Scalar::UInt64 | Scalar::Float64 | Scalar::Complex64 => 8,
            Scalar::Complex128 => 16,
        }
    }

    /// numpy's kind character (`b`, `i`, `u`, `f`, `c`).
    fn kind(self) -> char {
        match self {
            Scalar::Bool => 'b',
            Scalar::Int8 | Scalar::Int16 | Scalar::Int32 | Scalar::Int64 => 'i',
            Scalar::UInt8 | Scalar::UInt16 | Scalar::UInt32 | Scalar::UInt64 => 'u',
            Scalar::Float16 | Scalar::Float32 | Scalar::Float64 => 'f',
            Scalar::Complex64 | Scalar::Complex128 => 'c',
        }
    }

    fn from_name(s: &str) -> Option<Scalar> {
        Scalar::ALL.into_iter().find(|k| k.name() == s)
    }

    fn from_code(kind: char, size: usize) -> Option<Scalar> {
        Scalar::ALL.into_iter().find(|k| k.kind() == kind && k.size() == size)
    }
}

/// The `_rdtype` of an array: numpy's `str(dtype)`.
///
/// numpy writes native (little-endian) types by name (`"float32"`) and big-endian ones by code
/// (`">i4"`). Anything else (strings, datetimes, records, `"<f4"`) is kept verbatim in
/// [`DType::Other`], so every `_rdtype` round-trips exactly.
///
/// ```
/// use hypha_rpc_core::codec::{DType, Scalar};
/// assert_eq!(DType::parse("float32"), DType::Native(Scalar::Float32));
/// assert_eq!(DType::parse(">i4"), DType::BigEndian(Scalar::Int32));
/// assert_eq!(DType::BigEndian(Scalar::Int32).to_string(), ">i4");
/// assert_eq!(DType::parse("<U5").scalar(), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DType {
    /// A numeric type in little-endian byte order, written by name.
    Native(Scalar),
    /// A numeric type in big-endian byte order, written `>` + kind + size.
    BigEndian(Scalar),
    /// Any other dtype string, kept as sent.
    Other(String),
}

impl DType {
    /// Parses numpy's dtype string; never fails (unknown strings become [`DType::Other`]).
    pub fn parse(s: &str) -> DType {
        if let Some(k) = Scalar::from_name(s) {
            return DType::Native(k);
        }
        if let Some(rest) = s.strip_prefix('>') {
            let mut chars = rest.chars();
            if let (Some(kind), Ok(size)) = (chars.next(), chars.as_str().parse::<usize>()) {
                if let Some(k) = Scalar::from_code(kind, size) {
                    if k.size() > 1 {
                        return DType::BigEndian(k);
                    }
                }
            }
        }
        DType::Other(s.into())
    }

    /// The numeric element type, if known.
    pub fn scalar(&self) -> Option<Scalar> {
        match self {
            DType::Native(k) | DType::BigEndian(k) => Some(*k),
            DType::Other(_) => None,
        }
    }

    /// Bytes per element, if known.
    pub fn item_size(&self) -> Option<usize> {
        self.scalar().map(Scalar::size)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DType::Native(k) => f.write_str(k.name()),
            DType::BigEndian(k) => write!(f, ">{}{}", k.kind(), k.size()),
            DType::Other(s) => f.write_str(s),
        }
    }
}

impl From<DType> for String {
    fn from(d: DType) -> String {
        match d {
            DType::Other(s) => s,
            d => format!("{d}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn every_scalar_round_trips_both_ways() {
        for k in Scalar::ALL {
            assert_eq!(DType::parse(k.name()), DType::Native(k));
            if k.size() > 1 {
                let be = DType::BigEndian(k).to_string();
                assert_eq!(DType::parse(&be), DType::BigEndian(k), "{be}");
            }
        }
        assert_eq!(DType::parse(">b1"), DType::Other(">b1".into()));
        assert_eq!(DType::parse(">"), DType::Other(">".into()));
    }
}
