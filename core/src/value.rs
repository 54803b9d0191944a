//! Our own msgpack value tree, because `rmpv` needs `std` and the engine must not.
//!
//! [`Value`] mirrors msgpack's data model exactly: integers keep their full signed/unsigned
//! range, `f32` and `f64` stay distinct (so re-encoding reproduces the input), strings are
//! valid UTF-8 sharing the frame's buffer ([`Str`]), binaries are cheap-to-clone [`Bytes`], and
//! [`Map`] keeps insertion order and accepts keys of any type (Python rejects non-string keys;
//! JS does not).

use alloc::string::String;
use alloc::vec::Vec;
use bytes::Bytes;
use core::fmt;

/// A UTF-8 string: short ones (up to 23 bytes: keys, method names, session ids) are stored
/// inline, longer ones share the frame's buffer ([`Bytes`]). Decoding a frame therefore
/// allocates nothing per string, and constants cost nothing ([`Str::from_static`]).
///
/// A long string decoded from a frame keeps that frame's buffer alive; copy it
/// (`String::from(s.as_str())`) to keep a small piece of a large frame.
///
/// ```
/// use hypha_rpc_core::value::Str;
/// let s = Str::from_static("method");
/// assert_eq!(s.as_str(), "method");
/// assert_eq!(s, "method");
/// assert_eq!(Str::from(String::from("x")), Str::from("x"));
/// ```
#[derive(Clone)]
pub struct Str(Repr);

const INLINE: usize = 23;

#[derive(Clone)]
enum Repr {
    Inline { len: u8, buf: [u8; INLINE] },
    Shared(Bytes),
}

impl Default for Str {
    fn default() -> Str {
        Str(Repr::Inline { len: 0, buf: [0; INLINE] })
    }
}

impl Str {
    /// A string constant, without allocating.
    pub const fn from_static(s: &'static str) -> Str {
        Str(Repr::Shared(Bytes::from_static(s.as_bytes())))
    }

    /// Wraps `bytes` if they are valid UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Result<Str, core::str::Utf8Error> {
        core::str::from_utf8(&bytes)?;
        Ok(Str::from_validated(bytes))
    }

    /// Wraps bytes the caller has just checked to be UTF-8 (the decoder validates the input
    /// slice once, then shares it).
    pub(crate) fn from_validated(bytes: Bytes) -> Str {
        debug_assert!(core::str::from_utf8(&bytes).is_ok());
        match Str::inline(&bytes) {
            Some(s) => s,
            None => Str(Repr::Shared(bytes)),
        }
    }

    /// An inline copy of `b` (valid UTF-8 checked by the caller), if it is short enough.
    pub(crate) fn inline(b: &[u8]) -> Option<Str> {
        if b.len() > INLINE {
            return None;
        }
        let mut buf = [0; INLINE];
        buf[..b.len()].copy_from_slice(b);
        Some(Str(Repr::Inline { len: b.len() as u8, buf }))
    }

    /// The string.
    #[allow(unsafe_code)]
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor (`from_static`, `from_utf8`, `from_validated` and `inline`
        // — whose callers validate first —, `From<&str>`, `From<String>`) stores bytes that are
        // valid UTF-8, and neither the inline buffer nor `Bytes` is mutated afterwards.
        unsafe { core::str::from_utf8_unchecked(self.as_bytes()) }
    }

    /// The UTF-8 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, buf } => &buf[..usize::from(*len)],
            Repr::Shared(b) => b,
        }
    }
}

impl PartialEq for Str {
    fn eq(&self, other: &Str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl Eq for Str {}
impl PartialOrd for Str {
    fn partial_cmp(&self, other: &Str) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Str {
    fn cmp(&self, other: &Str) -> core::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}
impl core::hash::Hash for Str {
    fn hash<H: core::hash::Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl core::ops::Deref for Str {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}
impl AsRef<str> for Str {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}
impl From<&str> for Str {
    fn from(s: &str) -> Str {
        Str::inline(s.as_bytes()).unwrap_or_else(|| Str(Repr::Shared(Bytes::copy_from_slice(s.as_bytes()))))
    }
}
impl From<String> for Str {
    fn from(s: String) -> Str {
        Str::inline(s.as_bytes()).unwrap_or_else(|| Str(Repr::Shared(Bytes::from(s.into_bytes()))))
    }
}
impl From<&String> for Str {
    fn from(s: &String) -> Str {
        Str::from(s.as_str())
    }
}
impl From<Str> for String {
    fn from(s: Str) -> String {
        String::from(s.as_str())
    }
}
impl PartialEq<str> for Str {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl PartialEq<&str> for Str {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl PartialEq<String> for Str {
    fn eq(&self, other: &String) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}
impl fmt::Debug for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}
impl fmt::Display for Str {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A msgpack integer in the range `-2^63 ..= 2^64 - 1`.
///
/// Non-negative values are always stored unsigned, so `Integer::from(5i64) ==
/// Integer::from(5u8)` and the encoder picks the smallest unsigned form, as Python does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Integer(IntRepr);

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum IntRepr {
    /// Always `< 0`; ordered before `Pos` by variant order.
    Neg(i64),
    Pos(u64),
}

impl Integer {
    /// The value as `i64`, if it fits.
    pub fn as_i64(self) -> Option<i64> {
        match self.0 {
            IntRepr::Neg(n) => Some(n),
            IntRepr::Pos(p) => i64::try_from(p).ok(),
        }
    }
    /// The value as `u64`, if it is non-negative.
    pub fn as_u64(self) -> Option<u64> {
        match self.0 {
            IntRepr::Neg(_) => None,
            IntRepr::Pos(p) => Some(p),
        }
    }
    /// The value as `f64` (rounded for magnitudes above 2^53).
    pub fn as_f64(self) -> f64 {
        match self.0 {
            IntRepr::Neg(n) => n as f64,
            IntRepr::Pos(p) => p as f64,
        }
    }
    /// `true` for negative values.
    pub fn is_negative(self) -> bool {
        matches!(self.0, IntRepr::Neg(_))
    }
}

impl From<u64> for Integer {
    fn from(v: u64) -> Self {
        Integer(IntRepr::Pos(v))
    }
}
impl From<i64> for Integer {
    fn from(v: i64) -> Self {
        if v < 0 { Integer(IntRepr::Neg(v)) } else { Integer(IntRepr::Pos(v as u64)) }
    }
}
macro_rules! int_from {
    ($($t:ty => $via:ty),*) => {$(
        impl From<$t> for Integer { fn from(v: $t) -> Self { Integer::from(v as $via) } }
        impl From<$t> for Value { fn from(v: $t) -> Self { Value::Integer(Integer::from(v as $via)) } }
    )*};
}
int_from!(u8 => u64, u16 => u64, u32 => u64, usize => u64, i8 => i64, i16 => i64, i32 => i64, isize => i64);
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Integer(v.into())
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Integer(v.into())
    }
}

impl fmt::Debug for Integer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IntRepr::Neg(n) => write!(f, "{n}"),
            IntRepr::Pos(p) => write!(f, "{p}"),
        }
    }
}
impl fmt::Display for Integer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One msgpack value.
///
/// Equality is structural; floats compare with `==` (so `NaN != NaN`). Map equality includes
/// key order, because order is part of what goes on the wire.
#[derive(Clone, PartialEq, Default)]
pub enum Value {
    /// msgpack nil (Python `None`, JS `null`/`undefined`).
    #[default]
    Nil,
    /// `true` / `false`.
    Bool(bool),
    /// Any integer msgpack can carry.
    Integer(Integer),
    /// A float32 (Python never emits these, JS and others may).
    F32(f32),
    /// A float64 (every Python float).
    F64(f64),
    /// A UTF-8 string.
    Str(Str),
    /// A byte string (Python `bytes`, JS `Uint8Array`).
    Bin(Bytes),
    /// An array (Python list or tuple).
    Array(Vec<Value>),
    /// A map, in wire order.
    Map(Map),
    /// An extension value: type tag and payload. Python never sends these.
    Ext(i8, Bytes),
}

impl Value {
    /// A binary value from anything that converts into [`Bytes`].
    pub fn bin(b: impl Into<Bytes>) -> Value {
        Value::Bin(b.into())
    }
    /// `true` for [`Value::Nil`].
    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Nil)
    }
    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    /// The integer as `i64`, if this is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Integer(i) => i.as_i64(),
            _ => None,
        }
    }
    /// The integer as `u64`, if this is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Integer(i) => i.as_u64(),
            _ => None,
        }
    }
    /// Any number as `f64`: floats of both widths and integers (JS sends `15.0` as `15`).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(f) => Some(*f),
            Value::F32(f) => Some(f64::from(*f)),
            Value::Integer(i) => Some(i.as_f64()),
            _ => None,
        }
    }
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s.as_str()),
            _ => None,
        }
    }
    /// A string constant, without allocating.
    pub const fn from_static(s: &'static str) -> Value {
        Value::Str(Str::from_static(s))
    }
    /// The bytes, if this is a binary.
    pub fn as_bin(&self) -> Option<&Bytes> {
        match self {
            Value::Bin(b) => Some(b),
            _ => None,
        }
    }
    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// The map, if this is one.
    pub fn as_map(&self) -> Option<&Map> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }
    /// The map, mutably, if this is one.
    pub fn as_map_mut(&mut self) -> Option<&mut Map> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }
    /// The `_rtype` of a typed map (`"method"`, `"ndarray"`, ...), if this is one.
    pub fn rtype(&self) -> Option<&str> {
        self.as_map()?.get("_rtype")?.as_str()
    }
    /// A short name of the variant, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "bool",
            Value::Integer(_) => "integer",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Str(_) => "str",
            Value::Bin(_) => "bin",
            Value::Array(_) => "array",
            Value::Map(_) => "map",
            Value::Ext(..) => "ext",
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Nil => f.write_str("nil"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Integer(i) => write!(f, "{i}"),
            Value::F32(x) => write!(f, "{x:?}f32"),
            Value::F64(x) => write!(f, "{x:?}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Bin(b) if b.len() <= 32 => write!(f, "bin{:?}", b.as_ref()),
            Value::Bin(b) => write!(f, "bin({} bytes)", b.len()),
            Value::Array(a) => f.debug_list().entries(a).finish(),
            Value::Map(m) => fmt::Debug::fmt(m, f),
            Value::Ext(t, b) => write!(f, "ext({t}, {} bytes)", b.len()),
        }
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::F32(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::F64(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.into())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v.into())
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Str(v.into())
    }
}
impl From<Str> for Value {
    fn from(v: Str) -> Self {
        Value::Str(v)
    }
}
impl From<Bytes> for Value {
    fn from(v: Bytes) -> Self {
        Value::Bin(v)
    }
}
impl From<Vec<Value>> for Value {
    fn from(v: Vec<Value>) -> Self {
        Value::Array(v)
    }
}
impl From<Map> for Value {
    fn from(v: Map) -> Self {
        Value::Map(v)
    }
}
impl From<Integer> for Value {
    fn from(v: Integer) -> Self {
        Value::Integer(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Nil, Into::into)
    }
}

/// A msgpack map that keeps wire order and allows any key type.
///
/// Lookups by string key are linear, which beats hashing for the small maps RPC messages
/// carry. When a key occurs twice (legal msgpack, never produced by Python), lookups see the
/// *last* occurrence, as a Python `dict` built from the same bytes would.
///
/// ```
/// use hypha_rpc_core::{Map, Value};
/// let mut m = Map::new();
/// m.insert("a", 1);
/// m.insert("b", "two");
/// m.insert("a", 3); // replaces in place: order stays a, b
/// assert_eq!(m.get("a"), Some(&Value::from(3)));
/// assert_eq!(m.keys().filter_map(Value::as_str).collect::<Vec<_>>(), ["a", "b"]);
/// ```
#[derive(Clone, PartialEq, Default)]
pub struct Map(Vec<(Value, Value)>);

impl Map {
    /// An empty map.
    pub const fn new() -> Map {
        Map(Vec::new())
    }
    /// An empty map with room for `n` entries.
    pub fn with_capacity(n: usize) -> Map {
        Map(Vec::with_capacity(n))
    }
    /// Number of entries (duplicates counted).
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// `true` when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn position(&self, key: &str) -> Option<usize> {
        self.0.iter().rposition(|(k, _)| matches!(k, Value::Str(s) if *s == key))
    }
    /// The value under string key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.position(key).map(|i| &self.0[i].1)
    }
    /// The value under string key `key`, mutably.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        self.position(key).map(move |i| &mut self.0[i].1)
    }
    /// The value under an arbitrary key.
    pub fn get_value(&self, key: &Value) -> Option<&Value> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// `true` if string key `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_some()
    }
    /// Sets `key` to `value`: replaces an existing entry in place, otherwise appends.
    /// Returns the previous value.
    pub fn insert(&mut self, key: impl Into<Value>, value: impl Into<Value>) -> Option<Value> {
        let key = key.into();
        let value = value.into();
        match self.0.iter().rposition(|(k, _)| *k == key) {
            Some(i) => Some(core::mem::replace(&mut self.0[i].1, value)),
            None => {
                self.0.push((key, value));
                None
            }
        }
    }
    /// Appends an entry without looking for an existing one (what a decoder does).
    pub fn push(&mut self, key: impl Into<Value>, value: impl Into<Value>) {
        self.0.push((key.into(), value.into()));
    }
    /// Removes every entry with string key `key`; returns the value lookups would have seen.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        // One pass whatever the number of duplicates (a peer controls how many there are).
        let last = self.position(key)?;
        let found = core::mem::take(&mut self.0[last].1);
        self.0.retain(|(k, _)| k.as_str() != Some(key));
        Some(found)
    }
    /// Sets every `(key, value)` of `other` as [`Map::insert`] would, in `O((n + m) log n)`
    /// rather than `O(n * m)`: a peer decides how many keys there are. Keys for which `skip`
    /// is true are left out.
    pub fn extend_replacing(&mut self, other: Map, mut skip: impl FnMut(&Value) -> bool) {
        use alloc::collections::BTreeMap;
        if other.len() <= 8 {
            for (k, v) in other {
                if !skip(&k) {
                    self.insert(k, v);
                }
            }
            return;
        }
        // Index of the last entry for each string key already present.
        let mut index: BTreeMap<Str, usize> = BTreeMap::new();
        for (i, (k, _)) in self.0.iter().enumerate() {
            if let Value::Str(s) = k {
                index.insert(s.clone(), i);
            }
        }
        for (k, v) in other {
            if skip(&k) {
                continue;
            }
            match &k {
                Value::Str(s) => match index.get(s) {
                    Some(&i) => self.0[i].1 = v,
                    None => {
                        index.insert(s.clone(), self.0.len());
                        self.0.push((k, v));
                    }
                },
                // Non-string keys (never from Python) keep the linear path.
                _ => {
                    self.insert(k, v);
                }
            }
        }
    }
    /// Entries in wire order.
    pub fn iter(&self) -> core::slice::Iter<'_, (Value, Value)> {
        self.0.iter()
    }
    /// Entries in wire order, mutably.
    pub fn iter_mut(&mut self) -> core::slice::IterMut<'_, (Value, Value)> {
        self.0.iter_mut()
    }
    /// Keys in wire order.
    pub fn keys(&self) -> impl Iterator<Item = &Value> {
        self.0.iter().map(|(k, _)| k)
    }
    /// Values in wire order.
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        self.0.iter().map(|(_, v)| v)
    }
    /// The entries as a slice.
    pub fn as_slice(&self) -> &[(Value, Value)] {
        &self.0
    }
    /// The entries as a vector.
    pub fn into_vec(self) -> Vec<(Value, Value)> {
        self.0
    }
}

impl fmt::Debug for Map {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter().map(|(k, v)| (k, v))).finish()
    }
}

impl From<Vec<(Value, Value)>> for Map {
    fn from(v: Vec<(Value, Value)>) -> Self {
        Map(v)
    }
}
impl<K: Into<Value>, V: Into<Value>> FromIterator<(K, V)> for Map {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Map(iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}
impl IntoIterator for Map {
    type Item = (Value, Value);
    type IntoIter = alloc::vec::IntoIter<(Value, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
impl<'a> IntoIterator for &'a Map {
    type Item = &'a (Value, Value);
    type IntoIter = core::slice::Iter<'a, (Value, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(feature = "std")]
mod rmpv_conv {
    //! Conversions to and from `rmpv::Value`, for tests and adapters that already use rmpv.
    use super::*;

    impl From<Value> for rmpv::Value {
        fn from(v: Value) -> rmpv::Value {
            match v {
                Value::Nil => rmpv::Value::Nil,
                Value::Bool(b) => rmpv::Value::Boolean(b),
                Value::Integer(i) => match i.0 {
                    IntRepr::Neg(n) => rmpv::Value::from(n),
                    IntRepr::Pos(p) => rmpv::Value::from(p),
                },
                Value::F32(f) => rmpv::Value::F32(f),
                Value::F64(f) => rmpv::Value::F64(f),
                Value::Str(s) => rmpv::Value::String(String::from(s).into()),
                Value::Bin(b) => rmpv::Value::Binary(b.to_vec()),
                Value::Array(a) => rmpv::Value::Array(a.into_iter().map(Into::into).collect()),
                Value::Map(m) => rmpv::Value::Map(m.into_iter().map(|(k, v)| (k.into(), v.into())).collect()),
                Value::Ext(t, b) => rmpv::Value::Ext(t, b.to_vec()),
            }
        }
    }

    /// An `rmpv::Value` held a string that is not valid UTF-8, which [`Value`] cannot carry.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("msgpack string is not valid UTF-8")]
    pub struct InvalidUtf8;

    impl TryFrom<rmpv::Value> for Value {
        type Error = InvalidUtf8;
        fn try_from(v: rmpv::Value) -> Result<Value, InvalidUtf8> {
            Ok(match v {
                rmpv::Value::Nil => Value::Nil,
                rmpv::Value::Boolean(b) => Value::Bool(b),
                // rmpv integers are always u64 or i64; the fallback is never taken.
                rmpv::Value::Integer(i) => match i.as_u64() {
                    Some(p) => Value::from(p),
                    None => Value::from(i.as_i64().unwrap_or_default()),
                },
                rmpv::Value::F32(f) => Value::F32(f),
                rmpv::Value::F64(f) => Value::F64(f),
                rmpv::Value::String(s) => Value::from(s.into_str().ok_or(InvalidUtf8)?),
                rmpv::Value::Binary(b) => Value::Bin(b.into()),
                rmpv::Value::Array(a) => {
                    Value::Array(a.into_iter().map(Value::try_from).collect::<Result<_, _>>()?)
                }
                rmpv::Value::Map(m) => Value::Map(Map(m
                    .into_iter()
                    .map(|(k, v)| Ok((Value::try_from(k)?, Value::try_from(v)?)))
                    .collect::<Result<_, InvalidUtf8>>()?)),
                rmpv::Value::Ext(t, b) => Value::Ext(t, b.into()),
            })
        }
    }
}
#[cfg(feature = "std")]
pub use rmpv_conv::InvalidUtf8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn str_is_inline_when_short_and_equal_across_representations() {
        assert_eq!(core::mem::size_of::<Str>(), 32, "the inline form must use the Bytes niche");
        assert_eq!(core::mem::size_of::<Value>(), 40);
        let long = "x".repeat(40);
        assert_eq!(Str::from(long.as_str()), Str::from_utf8(Bytes::from(long.clone())).unwrap());
        assert_eq!(Str::from("abc"), Str::from_static("abc"));
        let (a, b) = (Str::from("abc"), Str::from(long.as_str()));
        assert!(a < b, "ordering compares the text, not the representation");
    }

    #[test]
    fn integers_normalise_sign() {
        assert_eq!(Integer::from(5i64), Integer::from(5u8));
        assert_eq!(Integer::from(-1i8).as_u64(), None);
        assert_eq!(Integer::from(u64::MAX).as_i64(), None);
        assert!(Integer::from(-1i64) < Integer::from(0u64));
    }

    #[test]
    fn map_duplicate_keys_last_wins() {
        let mut m = Map::new();
        m.push("k", 1);
        m.push("x", 2);
        m.push("k", 3);
        assert_eq!(m.get("k"), Some(&Value::from(3)));
        assert_eq!(m.remove("k"), Some(Value::from(3)));
        assert_eq!(m.len(), 1);
    }
}
