//! numpy arrays and JS typed arrays as [`ndarray`] arrays (feature `ndarray`).
//!
//! A numpy array travels as `{_rtype: "ndarray", _rvalue: bin, _rshape: [..], _rdtype: "float32"}`:
//! the elements in C order, in the byte order the dtype names. JS typed arrays travel as
//! `{_rtype: "typedarray", _rvalue: bin, _rdtype: "float32"}` (1-D), a JS `Uint8Array` as plain
//! bytes. [`NdArray<T>`] is such a value with its element type fixed: it implements serde, so it
//! is an argument or result like any other, and converts to and from [`ArrayD<T>`] (use the
//! `ndarray` crate, version 0.16, in your own code).
//!
//! ```
//! use hypha_rpc::ndarray::NdArray;
//! use ndarray::{ArrayD, array};
//!
//! let a: ArrayD<f32> = array![[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]].into_dyn();
//! let wire = hypha_rpc::to_value(&NdArray::from(&a)).unwrap();
//! // What Python's `np.array(..., dtype="float32")` would send:
//! let m = wire.as_map().unwrap();
//! assert_eq!(m.get("_rtype").and_then(|v| v.as_str()), Some("ndarray"));
//! assert_eq!(m.get("_rdtype").and_then(|v| v.as_str()), Some("float32"));
//!
//! let back: NdArray<f32> = hypha_rpc::from_value(&wire).unwrap();
//! assert_eq!(back.shape(), &[2, 3]);
//! assert_eq!(back.to_array(), a);
//! ```
//!
//! A service function taking and returning arrays (Python calls it with any float64 array,
//! e.g. `await svc.double(np.arange(6.0).reshape(2, 3))`, and gets a numpy array back):
//!
//! ```no_run
//! # async fn demo(server: hypha_rpc::Server) -> hypha_rpc::Result<()> {
//! use hypha_rpc::Service;
//! use hypha_rpc::ndarray::NdArray;
//!
//! let svc = Service::new("arrays").function("double", |x: NdArray<f64>| async move {
//!     Ok::<_, hypha_rpc::Error>(NdArray::from(x.to_array() * 2.0))
//! });
//! server.register_service(svc).await?;
//! # Ok(()) }
//! ```
//!
//! # Element types
//!
//! | `T` | `_rdtype` accepted | `_rdtype` sent |
//! | --- | --- | --- |
//! | `bool` | `bool`, `\|b1`, `?` | `bool` |
//! | `i8`, `u8` | `int8`, `uint8` (`\|i1`, `\|u1`); for `u8` also plain bytes and `memoryview` | `int8`, `uint8` |
//! | `i16` ... `u64` | `int16` ... `uint64`, big-endian `>i2` ... `>u8`, explicit `<i2` ... `<u8` | `int16` ... `uint64` |
//! | `f32`, `f64` | `float32`, `float64`, `>f4`, `>f8`, `<f4`, `<f8` | `float32`, `float64` |
//!
//! There is no implicit cast: an `int64` array (numpy's default integer) does not decode as
//! `NdArray<i32>` but fails with [`ArrayError::DTypeMismatch`]; take an [`AnyNdArray`] to
//! accept whatever dtype arrives. `float16`, `complex64`, `complex128`, strings, datetimes and
//! records fail with [`ArrayError::UnsupportedDType`]; a byte length that does not match the
//! shape fails too. A numpy scalar is a 0-d array (`_rshape: []`), except `np.float64`: it is a
//! Python `float`, which Python sends as a plain float (take an `f64` for it). Big-endian arrays are read correctly (swapped when converted) and sent back
//! unchanged if re-sent as they are; arrays built in Rust are always sent little-endian.
//!
//! # Copies
//!
//! - [`NdArray::from_value`] shares the [`Value`]'s bytes (no copy). Deserializing through serde
//!   (typed service arguments, call results, [`from_value`](crate::from_value)) copies them, as
//!   for any `bytes` value: the client's serde path re-encodes the received value and decodes
//!   the Rust type from that (two copies). To skip those, take the raw arguments with
//!   [`Service::function_raw`](crate::Service::function_raw) and call `NdArray::from_value` on
//!   [`Call::args`](crate::Call::args).
//! - [`NdArray::view`] borrows those bytes as an [`ArrayViewD`] **without copying** when the
//!   dtype's byte order is the machine's (little-endian on x86-64 and aarch64), the buffer is
//!   aligned for `T` and, for `bool`, every byte is 0 or 1. `u8`, `i8` and `bool` are always
//!   aligned; the buffers serde deserialization allocates are in practice aligned for every
//!   type, while a `Bytes` slicing a received message at an arbitrary offset usually is not.
//!   Otherwise `view` returns `None` and [`NdArray::as_cow`] falls back to a copy.
//! - [`NdArray::to_array`] and the `From` conversions to [`ArrayD`] always copy: an owned
//!   `ArrayD<T>` owns a `Vec<T>`, which cannot adopt a byte buffer.
//! - Sending: [`NdArray::from_array`] copies the elements once, in C order, from any layout
//!   (Fortran order, slices with steps, broadcast views); serialization then writes the bytes
//!   into the message.

use std::fmt;
use std::marker::PhantomData;

use ::ndarray::{Array, ArrayBase, ArrayD, ArrayViewD, CowArray, Data, Dimension, IxDyn};
use bytes::Bytes;
use hypha_rpc_core::codec::rtype::{MemoryView, NdArray as WireNdArray, RTypeCodec, TypedArray};
use hypha_rpc_core::codec::{DType, RTypeError, Scalar};
use hypha_rpc_core::{Map, Value};
use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

// ---- element types ----------------------------------------------------------------------------

mod sealed {
    pub trait Sealed {}
}

/// An element type [`NdArray`] supports: `bool`, `i8` ... `i64`, `u8` ... `u64`, `f32`, `f64`.
///
/// Sealed: the zero-copy [`NdArray::view`] relies on every implementor being a primitive without
/// padding whose bit patterns are all valid (or, for `bool`, checked).
pub trait Element: Copy + PartialEq + fmt::Debug + Send + Sync + 'static + sealed::Sealed {
    /// The numpy dtype of this type.
    const SCALAR: Scalar;
    /// Reads one element from exactly `size_of::<Self>()` bytes.
    #[doc(hidden)]
    fn read(bytes: &[u8], big_endian: bool) -> Self;
    /// Appends the little-endian bytes of `self`.
    #[doc(hidden)]
    fn write_le(self, out: &mut Vec<u8>);
    /// Whether every element of `bytes` is a valid `Self` as it is (only `bool` can fail).
    #[doc(hidden)]
    fn valid_bits(_bytes: &[u8]) -> bool {
        true
    }
}

macro_rules! numeric_elements {
    ($($t:ty => $scalar:ident),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const SCALAR: Scalar = Scalar::$scalar;
            fn read(bytes: &[u8], big_endian: bool) -> Self {
                let mut raw = [0u8; size_of::<$t>()];
                raw.copy_from_slice(bytes);
                if big_endian { <$t>::from_be_bytes(raw) } else { <$t>::from_le_bytes(raw) }
            }
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}

numeric_elements! {
    i8 => Int8, i16 => Int16, i32 => Int32, i64 => Int64,
    u8 => UInt8, u16 => UInt16, u32 => UInt32, u64 => UInt64,
    f32 => Float32, f64 => Float64,
}

impl sealed::Sealed for bool {}
impl Element for bool {
    const SCALAR: Scalar = Scalar::Bool;
    /// numpy stores `bool` as one byte, 0 or 1; any other byte reads as `true`.
    fn read(bytes: &[u8], _big_endian: bool) -> Self {
        bytes[0] != 0
    }
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
    fn valid_bits(bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| b <= 1)
    }
}

/// The scalars an [`Element`] exists for.
const SUPPORTED: [Scalar; 11] = [
    Scalar::Bool,
    Scalar::Int8,
    Scalar::Int16,
    Scalar::Int32,
    Scalar::Int64,
    Scalar::UInt8,
    Scalar::UInt16,
    Scalar::UInt32,
    Scalar::UInt64,
    Scalar::Float32,
    Scalar::Float64,
];

/// `bytes` as `&[T]` without copying, if they are aligned for `T`, a whole number of elements,
/// and valid values of `T`.
///
/// The one audited exception to the crate's `deny(unsafe_code)`.
#[allow(unsafe_code)]
fn cast_slice<T: Element>(bytes: &[u8]) -> Option<&[T]> {
    if !T::valid_bits(bytes) {
        return None;
    }
    // SAFETY: `Element` is sealed and implemented only for `bool` and the primitive integers and
    // floats. These have no padding, and every bit pattern is a valid value, except for `bool`,
    // whose bytes were just checked to be 0 or 1. `align_to` only puts correctly aligned,
    // whole elements in the middle slice; we use it only when nothing is left over.
    let (head, body, tail) = unsafe { bytes.align_to::<T>() };
    (head.is_empty() && tail.is_empty()).then_some(body)
}

/// The host's byte order.
const HOST_BIG_ENDIAN: bool = cfg!(target_endian = "big");

// ---- errors -----------------------------------------------------------------------------------

/// Why a value is not an array of the requested element type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ArrayError {
    /// The value is neither an `ndarray` nor a `typedarray` map, a `memoryview` or bytes.
    #[error("expected a numpy ndarray, a typed array or bytes, found {0}")]
    NotAnArray(String),
    /// An `ndarray` or `typedarray` map with missing or ill-typed fields (this includes a byte
    /// length that does not match the shape, as checked by the core codec).
    #[error(transparent)]
    Invalid(#[from] RTypeError),
    /// A dtype without a Rust element type here: `float16`, complex, strings, records, ...
    #[error(
        "unsupported dtype {0:?}: hypha_rpc::ndarray handles bool, int8..int64, uint8..uint64, \
         float32 and float64"
    )]
    UnsupportedDType(String),
    /// A supported dtype, but not the one asked for (no implicit casts).
    #[error("expected an array of {expected}, received {found}")]
    DTypeMismatch {
        /// The requested element type's dtype.
        expected: &'static str,
        /// The dtype received.
        found: String,
    },
    /// The bytes are not shape × item size long.
    #[error("{bytes} bytes do not hold shape {shape:?} of {dtype}")]
    Length {
        /// The byte length.
        bytes: usize,
        /// The shape.
        shape: Vec<u64>,
        /// The dtype.
        dtype: String,
    },
    /// The shape does not fit in memory (more than `isize::MAX` bytes).
    #[error("shape {0:?} is too large")]
    TooLarge(Vec<u64>),
}

impl From<ArrayError> for crate::Error {
    fn from(e: ArrayError) -> Self {
        crate::Error::Decode(e.to_string())
    }
}

// ---- dtype resolution -------------------------------------------------------------------------

/// `(element type, big-endian)` of a dtype, if it names one we support.
fn element_type(dtype: &DType) -> Result<(Scalar, bool), ArrayError> {
    let unsupported = || ArrayError::UnsupportedDType(dtype.to_string());
    let (scalar, big) = match dtype {
        DType::Native(s) => (*s, false),
        DType::BigEndian(s) => (*s, true),
        DType::Other(name) => parse_code(name).ok_or_else(unsupported)?,
    };
    if !SUPPORTED.contains(&scalar) {
        return Err(unsupported());
    }
    Ok((scalar, big && scalar.size() > 1))
}

/// numpy's type codes: `<f4`, `|u1`, `>i8`, `f8`, `?`, ... (`DType::parse` knows the names and
/// `>` codes; numpy itself sends those, other writers may send these).
fn parse_code(name: &str) -> Option<(Scalar, bool)> {
    if name == "?" {
        return Some((Scalar::Bool, false));
    }
    let (big, code) = match name.as_bytes().first()? {
        b'<' | b'|' => (false, &name[1..]),
        b'>' => (true, &name[1..]),
        _ => (false, name),
    };
    let mut chars = code.chars();
    let kind = chars.next()?;
    let size: usize = chars.as_str().parse().ok()?;
    let scalar = Scalar::ALL.into_iter().find(|s| {
        s.size() == size
            && matches!(
                (kind, s),
                ('b', Scalar::Bool)
                    | ('i', Scalar::Int8 | Scalar::Int16 | Scalar::Int32 | Scalar::Int64)
                    | ('u', Scalar::UInt8 | Scalar::UInt16 | Scalar::UInt32 | Scalar::UInt64)
                    | ('f', Scalar::Float16 | Scalar::Float32 | Scalar::Float64)
                    | ('c', Scalar::Complex64 | Scalar::Complex128)
            )
    })?;
    Some((scalar, big))
}

/// An array-like value before its element type is checked.
struct Raw {
    data: Bytes,
    /// `None`: 1-D, as many elements as the bytes hold.
    shape: Option<Vec<u64>>,
    dtype: DType,
}

impl Raw {
    fn from_value(v: &Value) -> Result<Raw, ArrayError> {
        let uint8 = DType::Native(Scalar::UInt8);
        if let Value::Bin(b) = v {
            return Ok(Raw { data: b.clone(), shape: None, dtype: uint8 });
        }
        if let Some(a) = WireNdArray::from_value(v) {
            let a = a?;
            return Ok(Raw { data: a.data, shape: Some(a.shape), dtype: a.dtype });
        }
        if let Some(t) = TypedArray::from_value(v) {
            let t = t?;
            return Ok(Raw { data: t.data, shape: None, dtype: t.dtype });
        }
        if let Some(m) = MemoryView::from_value(v) {
            return Ok(Raw { data: m?.0, shape: None, dtype: uint8 });
        }
        Err(ArrayError::NotAnArray(match v.as_map().and_then(|m| m.get("_rtype")) {
            Some(Value::Str(name)) => format!("a `{}` object", name.as_str()),
            _ => format!("a msgpack {}", v.kind()),
        }))
    }
}

// ---- NdArray ----------------------------------------------------------------------------------

/// A numpy array (or JS typed array) with elements of type `T`, as it travels: the raw bytes,
/// the shape and the byte order. See the [module docs](self) for the wire form and copies.
///
/// Equality compares the wire form: shape, byte order and bytes.
#[derive(Clone, PartialEq)]
pub struct NdArray<T: Element> {
    data: Bytes,
    shape: Vec<usize>,
    big_endian: bool,
    _elem: PhantomData<fn() -> T>,
}

impl<T: Element> fmt::Debug for NdArray<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NdArray")
            .field("dtype", &self.dtype().to_string())
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Number of elements of `shape`, checking that `item` bytes each fit in `isize::MAX` (so
/// `ndarray` accepts the shape too, zero-length axes included).
fn checked_len(shape: &[u64], item: usize) -> Result<(Vec<usize>, usize), ArrayError> {
    let too_large = || ArrayError::TooLarge(shape.to_vec());
    let dims = shape.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>();
    let dims = dims.map_err(|_| too_large())?;
    let nonzero = dims.iter().filter(|&&d| d != 0).try_fold(1usize, |acc, &d| acc.checked_mul(d));
    match nonzero.and_then(|n| n.checked_mul(item)) {
        Some(bytes) if bytes <= isize::MAX as usize => {}
        _ => return Err(too_large()),
    }
    let len = if dims.contains(&0) { 0 } else { nonzero.unwrap_or(0) };
    Ok((dims, len))
}

impl<T: Element> NdArray<T> {
    /// Wraps little-endian element bytes in C order, without copying.
    ///
    /// ```
    /// use hypha_rpc::ndarray::NdArray;
    /// let a = NdArray::<u16>::from_bytes(vec![1, 0, 2, 0, 3, 0, 4, 0], vec![2, 2]).unwrap();
    /// assert_eq!(a.to_vec(), [1, 2, 3, 4]);
    /// assert!(NdArray::<u16>::from_bytes(vec![1, 0, 2], vec![2]).is_err());
    /// ```
    pub fn from_bytes(data: impl Into<Bytes>, shape: Vec<usize>) -> Result<Self, ArrayError> {
        let shape = shape.into_iter().map(|d| d as u64).collect::<Vec<_>>();
        Self::checked(data.into(), &shape, false)
    }

    fn checked(data: Bytes, shape: &[u64], big_endian: bool) -> Result<Self, ArrayError> {
        let (dims, len) = checked_len(shape, size_of::<T>())?;
        if len * size_of::<T>() != data.len() {
            return Err(ArrayError::Length {
                bytes: data.len(),
                shape: shape.to_vec(),
                dtype: dtype_of::<T>(big_endian).to_string(),
            });
        }
        Ok(NdArray { data, shape: dims, big_endian, _elem: PhantomData })
    }

    /// Copies any array (any layout: C or Fortran order, sliced, broadcast) into its wire form:
    /// little-endian elements in C (logical) order.
    pub fn from_array<S: Data<Elem = T>, D: Dimension>(a: &ArrayBase<S, D>) -> Self {
        let mut out = Vec::with_capacity(a.len() * size_of::<T>());
        match a.as_slice() {
            Some(xs) => xs.iter().for_each(|x| x.write_le(&mut out)),
            None => a.iter().for_each(|x| x.write_le(&mut out)),
        }
        NdArray { data: Bytes::from(out), shape: a.shape().to_vec(), big_endian: false, _elem: PhantomData }
    }

    /// Reads an `ndarray` map (`_rvalue` as one bin or a list of bins), a `typedarray` map
    /// (1-D), or, for `NdArray<u8>`, plain bytes or a `memoryview` (1-D). Shares the bytes of `v`.
    ///
    /// ```
    /// use hypha_rpc::ndarray::{ArrayError, NdArray};
    /// use hypha_rpc::{Map, Value};
    /// let mut m = Map::new();
    /// m.insert("_rtype", "typedarray");
    /// m.insert("_rvalue", Value::Bin(1.5f32.to_le_bytes().repeat(3).into()));
    /// m.insert("_rdtype", "float32");
    /// let v = Value::Map(m);
    /// assert_eq!(NdArray::<f32>::from_value(&v).unwrap().to_vec(), [1.5, 1.5, 1.5]);
    /// let wrong = NdArray::<f64>::from_value(&v).unwrap_err();
    /// assert_eq!(wrong, ArrayError::DTypeMismatch { expected: "float64", found: "float32".into() });
    /// ```
    pub fn from_value(v: &Value) -> Result<Self, ArrayError> {
        Self::from_raw(Raw::from_value(v)?)
    }

    fn from_raw(raw: Raw) -> Result<Self, ArrayError> {
        let (scalar, big) = element_type(&raw.dtype)?;
        if scalar != T::SCALAR {
            return Err(ArrayError::DTypeMismatch {
                expected: T::SCALAR.name(),
                found: raw.dtype.to_string(),
            });
        }
        let shape = match raw.shape {
            Some(shape) => shape,
            None if raw.data.len() % size_of::<T>() == 0 => vec![(raw.data.len() / size_of::<T>()) as u64],
            None => {
                return Err(ArrayError::Length {
                    bytes: raw.data.len(),
                    shape: vec![],
                    dtype: raw.dtype.to_string(),
                });
            }
        };
        Self::checked(raw.data, &shape, big).map_err(|e| match e {
            // Name the dtype as it was sent (`<f4`), not as we resolved it.
            ArrayError::Length { bytes, shape, .. } => {
                ArrayError::Length { bytes, shape, dtype: raw.dtype.to_string() }
            }
            e => e,
        })
    }

    /// The `_rtype: "ndarray"` map (shares the bytes).
    pub fn to_value(&self) -> Value {
        WireNdArray {
            data: self.data.clone(),
            shape: self.shape.iter().map(|&d| d as u64).collect(),
            dtype: self.dtype(),
            other: Map::new(),
        }
        .to_value()
    }

    /// The dimensions; empty for a 0-d array (a numpy scalar such as `np.float32(1.5)`).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// The number of elements (1 for a 0-d array).
    pub fn len(&self) -> usize {
        self.data.len() / size_of::<T>()
    }

    /// `true` when some dimension is zero.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The dtype as sent (`float32`, or `>f4` for a big-endian array received as such).
    pub fn dtype(&self) -> DType {
        dtype_of::<T>(self.big_endian)
    }

    /// Whether the bytes are big-endian (only ever for arrays received so).
    pub fn is_big_endian(&self) -> bool {
        self.big_endian
    }

    /// The raw element bytes, C order, in the [`dtype`](Self::dtype)'s byte order.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }

    /// The array borrowed from the bytes, **without copying**, or `None` when that is not
    /// possible: byte order other than the machine's, bytes not aligned for `T`, or a `bool`
    /// byte other than 0 and 1.
    ///
    /// ```
    /// use hypha_rpc::ndarray::NdArray;
    /// let a = NdArray::<u8>::from_bytes(vec![1, 2, 3, 4, 5, 6], vec![2, 3]).unwrap();
    /// let v = a.view().unwrap(); // u8 is always aligned
    /// assert_eq!(v[[1, 0]], 4);
    /// assert_eq!(v.as_ptr(), a.bytes().as_ptr());
    /// ```
    pub fn view(&self) -> Option<ArrayViewD<'_, T>> {
        if self.big_endian != HOST_BIG_ENDIAN && size_of::<T>() > 1 {
            return None;
        }
        let elems = cast_slice::<T>(&self.data)?;
        ArrayViewD::from_shape(IxDyn(&self.shape), elems).ok()
    }

    /// [`view`](Self::view) if possible, otherwise a converted copy.
    pub fn as_cow(&self) -> CowArray<'_, T, IxDyn> {
        match self.view() {
            Some(v) => CowArray::from(v),
            None => CowArray::from(self.to_array()),
        }
    }

    /// The elements in C order (always a copy).
    pub fn to_vec(&self) -> Vec<T> {
        match self.view() {
            Some(v) => v.iter().copied().collect(),
            None => self.data.chunks_exact(size_of::<T>()).map(|c| T::read(c, self.big_endian)).collect(),
        }
    }

    /// The owned array (always a copy; see [`view`](Self::view) to borrow).
    pub fn to_array(&self) -> ArrayD<T> {
        ArrayD::from_shape_vec(IxDyn(&self.shape), self.to_vec())
            .expect("the shape and the byte length were checked on construction")
    }

    /// The owned array (a copy, as [`to_array`](Self::to_array)).
    pub fn into_array(self) -> ArrayD<T> {
        self.to_array()
    }
}

fn dtype_of<T: Element>(big_endian: bool) -> DType {
    if big_endian && size_of::<T>() > 1 { DType::BigEndian(T::SCALAR) } else { DType::Native(T::SCALAR) }
}

impl<T: Element, S: Data<Elem = T>, D: Dimension> From<&ArrayBase<S, D>> for NdArray<T> {
    fn from(a: &ArrayBase<S, D>) -> Self {
        NdArray::from_array(a)
    }
}

impl<T: Element, D: Dimension> From<Array<T, D>> for NdArray<T> {
    fn from(a: Array<T, D>) -> Self {
        NdArray::from_array(&a)
    }
}

impl<T: Element> From<NdArray<T>> for ArrayD<T> {
    fn from(a: NdArray<T>) -> Self {
        a.to_array()
    }
}

impl<T: Element> TryFrom<&Value> for NdArray<T> {
    type Error = ArrayError;
    fn try_from(v: &Value) -> Result<Self, ArrayError> {
        NdArray::from_value(v)
    }
}

impl<T: Element> Serialize for NdArray<T> {
    /// The `_rtype: "ndarray"` map, keys in Python's order.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("_rtype", "ndarray")?;
        m.serialize_entry("_rvalue", serde_bytes::Bytes::new(&self.data))?;
        m.serialize_entry("_rshape", &self.shape)?;
        m.serialize_entry("_rdtype", &self.dtype().to_string())?;
        m.end()
    }
}

impl<'de, T: Element> Deserialize<'de> for NdArray<T> {
    /// Anything [`NdArray::from_value`] accepts.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        NdArray::from_value(&Value::deserialize(d)?).map_err(D::Error::custom)
    }
}

// ---- AnyNdArray -------------------------------------------------------------------------------

macro_rules! any_nd_array {
    ($($variant:ident($t:ty)),* $(,)?) => {
        /// An array of whichever supported dtype arrived.
        ///
        /// ```
        /// use hypha_rpc::ndarray::{AnyNdArray, NdArray};
        /// let wire = hypha_rpc::to_value(&NdArray::from(ndarray::arr1(&[1i64, 2, 3]))).unwrap();
        /// let any: AnyNdArray = hypha_rpc::from_value(&wire).unwrap();
        /// assert_eq!(any.dtype().to_string(), "int64");
        /// let AnyNdArray::Int64(a) = any else { panic!("an int64 array") };
        /// assert_eq!(a.to_vec(), [1, 2, 3]);
        /// ```
        #[derive(Debug, Clone, PartialEq)]
        #[non_exhaustive]
        pub enum AnyNdArray {
            $(
                #[doc = concat!("`", stringify!($t), "` elements.")]
                $variant(NdArray<$t>),
            )*
        }

        impl AnyNdArray {
            /// Reads any value [`NdArray::from_value`] accepts, of any supported dtype.
            pub fn from_value(v: &Value) -> Result<Self, ArrayError> {
                let raw = Raw::from_value(v)?;
                let (scalar, _) = element_type(&raw.dtype)?;
                $(
                    if scalar == <$t as Element>::SCALAR {
                        return NdArray::<$t>::from_raw(raw).map(AnyNdArray::$variant);
                    }
                )*
                Err(ArrayError::UnsupportedDType(raw.dtype.to_string()))
            }

            /// The `_rtype: "ndarray"` map.
            pub fn to_value(&self) -> Value {
                match self {
                    $(AnyNdArray::$variant(a) => a.to_value(),)*
                }
            }

            /// The dtype.
            pub fn dtype(&self) -> DType {
                match self {
                    $(AnyNdArray::$variant(a) => a.dtype(),)*
                }
            }

            /// The dimensions.
            pub fn shape(&self) -> &[usize] {
                match self {
                    $(AnyNdArray::$variant(a) => a.shape(),)*
                }
            }
        }

        $(
            impl From<NdArray<$t>> for AnyNdArray {
                fn from(a: NdArray<$t>) -> Self {
                    AnyNdArray::$variant(a)
                }
            }
        )*

        impl Serialize for AnyNdArray {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    $(AnyNdArray::$variant(a) => a.serialize(s),)*
                }
            }
        }
    };
}

any_nd_array! {
    Bool(bool),
    Int8(i8), Int16(i16), Int32(i32), Int64(i64),
    UInt8(u8), UInt16(u16), UInt32(u32), UInt64(u64),
    Float32(f32), Float64(f64),
}

impl<'de> Deserialize<'de> for AnyNdArray {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        AnyNdArray::from_value(&Value::deserialize(d)?).map_err(D::Error::custom)
    }
}

impl TryFrom<&Value> for AnyNdArray {
    type Error = ArrayError;
    fn try_from(v: &Value) -> Result<Self, ArrayError> {
        AnyNdArray::from_value(v)
    }
}

// ---- serde `with` -----------------------------------------------------------------------------

/// `#[serde(with = "hypha_rpc::ndarray::serde_array")]` for a field of type `Array<T, D>`
/// (`ArrayD`, `Array2`, ...): sent and received as a numpy array.
///
/// ```
/// use ndarray::{Array2, array};
/// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
/// struct Frame {
///     label: String,
///     #[serde(with = "hypha_rpc::ndarray::serde_array")]
///     pixels: Array2<u8>,
/// }
/// let f = Frame { label: "x".into(), pixels: array![[0, 255], [255, 0]] };
/// let back: Frame = hypha_rpc::from_value(&hypha_rpc::to_value(&f).unwrap()).unwrap();
/// assert_eq!(back, f);
/// ```
pub mod serde_array {
    use super::*;

    /// Serializes any array as a numpy array (C order, little-endian).
    pub fn serialize<T, S, D, Ser>(a: &ArrayBase<S, D>, s: Ser) -> Result<Ser::Ok, Ser::Error>
    where
        T: Element,
        S: Data<Elem = T>,
        D: Dimension,
        Ser: Serializer,
    {
        NdArray::from_array(a).serialize(s)
    }

    /// Deserializes a numpy array into `Array<T, D>`; an error if the number of dimensions
    /// does not fit `D`.
    pub fn deserialize<'de, T, D, De>(d: De) -> Result<Array<T, D>, De::Error>
    where
        T: Element,
        D: Dimension,
        De: Deserializer<'de>,
    {
        let a = NdArray::<T>::deserialize(d)?;
        let ndim = a.ndim();
        a.to_array().into_dimensionality::<D>().map_err(|_| {
            De::Error::custom(format!(
                "expected an array with {} dimensions, received {ndim}",
                D::NDIM.map_or("any number of".to_string(), |n| n.to_string())
            ))
        })
    }
}

// ---- tests ------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use ::ndarray::{Array3, ArrayView1, Axis, ShapeBuilder, arr0, arr1, array, s};

    fn nd_map(data: &[u8], shape: &[u64], dtype: &str) -> Value {
        let mut m = Map::new();
        m.push("_rtype", "ndarray");
        m.push("_rvalue", Bytes::copy_from_slice(data));
        m.push("_rshape", Value::Array(shape.iter().map(|&d| Value::from(d)).collect()));
        m.push("_rdtype", dtype);
        Value::Map(m)
    }

    fn typed_map(data: &[u8], dtype: &str) -> Value {
        let mut m = Map::new();
        m.push("_rtype", "typedarray");
        m.push("_rvalue", Bytes::copy_from_slice(data));
        m.push("_rdtype", dtype);
        Value::Map(m)
    }

    fn round_trip<T: Element>(a: ArrayD<T>) {
        let nd = NdArray::from(&a);
        let v = crate::to_value(&nd).unwrap();
        assert_eq!(v, nd.to_value(), "serde and to_value agree");
        let back: NdArray<T> = crate::from_value(&v).unwrap();
        assert_eq!(back, nd);
        assert_eq!(back.to_array(), a);
        assert_eq!(back.as_cow().to_owned(), a);
        let any = AnyNdArray::from_value(&v).unwrap();
        assert_eq!(any.dtype(), DType::Native(T::SCALAR));
        assert_eq!(any.shape(), a.shape());
    }

    #[test]
    fn every_element_type_round_trips() {
        round_trip(array![[true, false], [false, true]].into_dyn());
        round_trip(arr1(&[i8::MIN, -1, 0, i8::MAX]).into_dyn());
        round_trip(arr1(&[0u8, 1, 255]).into_dyn());
        round_trip(arr1(&[i16::MIN, 0, i16::MAX]).into_dyn());
        round_trip(arr1(&[0u16, 513, u16::MAX]).into_dyn());
        round_trip(arr1(&[i32::MIN, 0, i32::MAX]).into_dyn());
        round_trip(arr1(&[0u32, u32::MAX]).into_dyn());
        round_trip(arr1(&[i64::MIN, 0, i64::MAX]).into_dyn());
        round_trip(arr1(&[0u64, u64::MAX]).into_dyn());
        round_trip(arr1(&[f32::MIN, -0.0, 1.5, f32::INFINITY]).into_dyn());
        round_trip(arr1(&[f64::MIN_POSITIVE, -1e300, f64::NEG_INFINITY]).into_dyn());
        round_trip(arr0(7.5f64).into_dyn());
        round_trip(ArrayD::<f32>::zeros(IxDyn(&[3, 0, 2])));
        round_trip(ArrayD::<u64>::zeros(IxDyn(&[0])));
    }

    #[test]
    fn wire_form_matches_python() {
        let v = NdArray::from(array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]).to_value();
        let bytes: Vec<u8> = (1..=6).flat_map(|x| (x as f32).to_le_bytes()).collect();
        assert_eq!(v, nd_map(&bytes, &[2, 3], "float32"));
        let keys: Vec<_> = v.as_map().unwrap().iter().map(|(k, _)| k.as_str().unwrap().to_string()).collect();
        assert_eq!(keys, ["_rtype", "_rvalue", "_rshape", "_rdtype"]);
        // Serde writes the same map in the same order.
        assert_eq!(crate::to_value(&NdArray::from(array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]])).unwrap(), v);
        // 0-d: shape [].
        let v0 = NdArray::from(arr0(true)).to_value();
        assert_eq!(v0, nd_map(&[1], &[], "bool"));
    }

    #[test]
    fn layouts_are_sent_in_c_order() {
        let c = Array3::from_shape_fn((2, 3, 4), |(i, j, k)| (i * 100 + j * 10 + k) as i32);
        let f = Array3::from_shape_fn((2, 3, 4).f(), |(i, j, k)| (i * 100 + j * 10 + k) as i32);
        assert_eq!(NdArray::from(&c), NdArray::from(&f));
        let t = c.view().reversed_axes();
        let nd = NdArray::from(&t);
        assert_eq!(nd.shape(), &[4, 3, 2]);
        assert_eq!(nd.to_array(), t.into_dyn());
        let stepped = c.slice(s![.., ..;2, 1..;2]);
        assert_eq!(NdArray::from(&stepped).to_array(), stepped.into_dyn());
        let col = c.index_axis(Axis(2), 1);
        assert_eq!(NdArray::from(&col).to_vec(), col.iter().copied().collect::<Vec<_>>());
        let broadcast = arr1(&[1u8, 2]).broadcast((3, 2)).unwrap().to_owned();
        assert_eq!(NdArray::from(&broadcast).to_vec(), [1, 2, 1, 2, 1, 2]);
    }

    #[test]
    fn wrong_byte_length_is_an_error() {
        // Caught by the core codec for named dtypes...
        let e = NdArray::<f32>::from_value(&nd_map(&[0; 10], &[3], "float32")).unwrap_err();
        assert!(matches!(e, ArrayError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("10 bytes"), "{e}");
        // ... and here for type codes, typed arrays and raw bytes.
        let e = NdArray::<f32>::from_value(&nd_map(&[0; 10], &[3], "<f4")).unwrap_err();
        assert_eq!(e, ArrayError::Length { bytes: 10, shape: vec![3], dtype: "<f4".into() });
        assert!(NdArray::<u16>::from_value(&nd_map(&[0; 5], &[2, 2], "|u2")).is_err());
        let e = NdArray::<i32>::from_value(&typed_map(&[0; 6], "int32")).unwrap_err();
        assert!(e.to_string().contains("6 bytes"), "{e}");
        assert!(NdArray::<f64>::from_bytes(vec![0; 16], vec![3]).is_err());
        assert!(NdArray::<f64>::from_bytes(vec![0; 8], vec![]).is_ok());
        assert!(NdArray::<f64>::from_bytes(vec![], vec![]).is_err());
        // A zero-length axis holds no bytes, however large the others are.
        assert!(NdArray::<u8>::from_value(&nd_map(&[0], &[0, 5], "uint8")).is_err());
        assert!(NdArray::<u8>::from_value(&nd_map(&[], &[0, 5], "uint8")).unwrap().is_empty());
    }

    #[test]
    fn huge_shapes_are_errors_not_panics() {
        let e = NdArray::<u8>::from_value(&nd_map(&[], &[0, u64::MAX, u64::MAX], "<u1")).unwrap_err();
        assert!(matches!(e, ArrayError::TooLarge(_)), "{e}");
        let e = NdArray::<f64>::from_value(&nd_map(&[], &[0, 1 << 61], "<f8")).unwrap_err();
        assert!(matches!(e, ArrayError::TooLarge(_)), "{e}");
        assert!(NdArray::<u8>::from_value(&nd_map(&[], &[1 << 40, 1 << 40, 0], "uint8")).is_err());
    }

    #[test]
    fn unsupported_and_unknown_dtypes_are_clear_errors() {
        // One element of each, so the core codec's length check passes where it knows the size.
        let cases = [
            ("complex64", 8),
            ("complex128", 16),
            ("float16", 2),
            (">c16", 16),
            (">f2", 2),
            ("<f2", 2),
            ("<U5", 20),
            ("datetime64[ns]", 8),
            ("object", 8),
        ];
        for (dtype, size) in cases {
            let v = nd_map(&vec![0; size], &[1], dtype);
            let e = NdArray::<f32>::from_value(&v).unwrap_err();
            assert_eq!(e, ArrayError::UnsupportedDType(dtype.into()), "{dtype}");
            assert!(e.to_string().contains("unsupported dtype"), "{e}");
            assert_eq!(AnyNdArray::from_value(&v).unwrap_err(), e);
        }
        let e = NdArray::<i32>::from_value(&nd_map(&[0; 8], &[1], "int64")).unwrap_err();
        assert_eq!(e, ArrayError::DTypeMismatch { expected: "int32", found: "int64".into() });
        let e = NdArray::<f32>::from_value(&Value::Bin(Bytes::from_static(&[0; 4]))).unwrap_err();
        assert_eq!(e, ArrayError::DTypeMismatch { expected: "float32", found: "uint8".into() });
        // Through serde, as a service argument would be decoded.
        let e = crate::from_value::<NdArray<f64>>(&nd_map(&[0; 8], &[1], "complex64")).unwrap_err();
        assert!(e.to_string().contains("unsupported dtype \"complex64\""), "{e}");
        let e = crate::from_value::<NdArray<f64>>(&Value::from("x")).unwrap_err();
        assert!(e.to_string().contains("expected a numpy ndarray"), "{e}");
        let mut m = Map::new();
        m.push("_rtype", "set");
        m.push("_rvalue", Value::Array(vec![]));
        let e = NdArray::<u8>::from_value(&Value::Map(m)).unwrap_err();
        assert_eq!(e, ArrayError::NotAnArray("a `set` object".into()));
        let mut m = Map::new();
        m.push("_rtype", "ndarray");
        m.push("_rvalue", Bytes::new());
        let e = NdArray::<u8>::from_value(&Value::Map(m)).unwrap_err();
        assert!(matches!(e, ArrayError::Invalid(RTypeError::MissingField { field: "_rshape", .. })), "{e}");
        let e: crate::Error = e.into();
        assert!(matches!(e, crate::Error::Decode(_)));
    }

    #[test]
    fn big_endian_and_type_codes() {
        let be: Vec<u8> = [1i32, -2, 300].iter().flat_map(|x| x.to_be_bytes()).collect();
        let a = NdArray::<i32>::from_value(&nd_map(&be, &[3], ">i4")).unwrap();
        assert!(a.is_big_endian());
        assert_eq!(a.dtype().to_string(), ">i4");
        assert_eq!(a.to_vec(), [1, -2, 300]);
        assert_eq!(a.view().is_some(), HOST_BIG_ENDIAN);
        assert_eq!(a.as_cow().to_owned(), arr1(&[1, -2, 300]).into_dyn());
        // Re-sent as received.
        assert_eq!(a.to_value(), nd_map(&be, &[3], ">i4"));
        // Rebuilt from the array: little-endian.
        assert_eq!(NdArray::from(a.to_array()).dtype().to_string(), "int32");

        let be: Vec<u8> = [0.5f64, -3.25].iter().flat_map(|x| x.to_be_bytes()).collect();
        assert_eq!(NdArray::<f64>::from_value(&nd_map(&be, &[2, 1], ">f8")).unwrap().to_vec(), [0.5, -3.25]);
        let le: Vec<u8> = [7u16, 9].iter().flat_map(|x| x.to_le_bytes()).collect();
        for code in ["<u2", "u2", "uint16"] {
            let a = NdArray::<u16>::from_value(&nd_map(&le, &[2], code)).unwrap();
            assert_eq!((a.to_vec(), a.is_big_endian()), (vec![7, 9], false), "{code}");
        }
        for code in ["|b1", "?", "bool", ">b1"] {
            assert_eq!(
                NdArray::<bool>::from_value(&nd_map(&[1, 0], &[2], code)).unwrap().to_vec(),
                [true, false]
            );
        }
        for code in ["|i1", ">i1", "int8"] {
            let a = NdArray::<i8>::from_value(&nd_map(&[255], &[], code)).unwrap();
            assert_eq!((a.to_vec(), a.dtype().to_string()), (vec![-1], "int8".to_string()), "{code}");
        }
        assert_eq!(parse_code(""), None);
        assert_eq!(parse_code(">"), None);
        assert_eq!(parse_code("x4"), None);
        assert_eq!(parse_code("i3"), None);
    }

    #[test]
    fn js_typed_arrays_and_bytes_are_one_dimensional() {
        let f: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let a = NdArray::<f32>::from_value(&typed_map(&f, "float32")).unwrap();
        assert_eq!(a.shape(), &[4]);
        assert_eq!(a.to_vec(), [1.0, 2.0, 3.0, 4.0]);
        assert!(NdArray::<f32>::from_value(&typed_map(&[], "float32")).unwrap().is_empty());
        let a = NdArray::<u8>::from_value(&Value::Bin(Bytes::from_static(&[0, 1, 254, 255]))).unwrap();
        assert_eq!(a.to_array(), arr1(&[0, 1, 254, 255]).into_dyn());
        let mut m = Map::new();
        m.push("_rtype", "memoryview");
        m.push("_rvalue", Bytes::from_static(&[9, 8, 7]));
        assert_eq!(NdArray::<u8>::from_value(&Value::Map(m)).unwrap().to_vec(), [9, 8, 7]);
        let any = AnyNdArray::from_value(&typed_map(&[0, 0, 1, 0], "int16")).unwrap();
        assert_eq!(any, AnyNdArray::Int16(NdArray::from(arr1(&[0i16, 1]))));
        // `_rvalue` as a list of bins (concatenated).
        let mut m = Map::new();
        m.push("_rtype", "ndarray");
        m.push(
            "_rvalue",
            Value::Array(vec![Bytes::from_static(&[1, 2]).into(), Bytes::from_static(&[3]).into()]),
        );
        m.push("_rshape", Value::Array(vec![3u64.into()]));
        m.push("_rdtype", "uint8");
        assert_eq!(NdArray::<u8>::from_value(&Value::Map(m)).unwrap().to_vec(), [1, 2, 3]);
    }

    #[repr(C, align(16))]
    struct Aligned([u8; 33]);
    static ALIGNED: Aligned = Aligned([
        0, 0, 0, 0, 0, 0, 0xf0, 0x3f, // 1.0f64 little-endian
        0, 0, 0, 0, 0, 0, 0, 0x40, // 2.0
        0, 0, 0, 0, 0, 0, 0x08, 0x40, // 3.0
        0, 0, 0, 0, 0, 0, 0x10, 0x40, // 4.0
        0,
    ]);

    #[test]
    fn views_borrow_aligned_bytes_and_copy_otherwise() {
        let bytes = Bytes::from_static(&ALIGNED.0);
        let a = NdArray::<f64>::from_bytes(bytes.slice(..32), vec![2, 2]).unwrap();
        if !HOST_BIG_ENDIAN {
            let v = a.view().expect("aligned little-endian bytes are viewed in place");
            assert_eq!(v.as_ptr().cast::<u8>(), ALIGNED.0.as_ptr());
            assert_eq!(v, array![[1.0, 2.0], [3.0, 4.0]].into_dyn());
            assert!(a.as_cow().is_view());
        }
        // Shifted by one byte: not aligned for f64, so a copy.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&ALIGNED.0[..32]);
        let shifted = Bytes::from(shifted).slice(1..);
        let b = NdArray::<f64>::from_bytes(shifted.clone(), vec![4]).unwrap();
        if (shifted.as_ptr() as usize) % align_of::<f64>() != 0 {
            assert!(b.view().is_none());
            assert!(b.as_cow().is_owned());
        }
        assert_eq!(b.to_vec(), [1.0, 2.0, 3.0, 4.0]);
        // u8 views are always possible, slices of a message included.
        let u = NdArray::<u8>::from_bytes(bytes.slice(6..9), vec![3]).unwrap();
        assert_eq!(u.view().unwrap(), ArrayView1::from(&[0xf0u8, 0x3f, 0][..]).into_dyn());
        // bool: only 0/1 bytes are viewed; others read as true in a copy.
        let t = NdArray::<bool>::from_value(&nd_map(&[0, 1, 2], &[3], "bool")).unwrap();
        assert!(t.view().is_none());
        assert_eq!(t.to_vec(), [false, true, true]);
        let t = NdArray::<bool>::from_value(&nd_map(&[0, 1, 1], &[3], "bool")).unwrap();
        assert_eq!(t.view().unwrap().iter().copied().collect::<Vec<_>>(), [false, true, true]);
        // from_value shares the value's bytes.
        let v = NdArray::from(arr1(&[5u32, 6])).to_value();
        let again = NdArray::<u32>::from_value(&v).unwrap();
        let Some(Value::Bin(b)) = v.as_map().unwrap().get("_rvalue") else { panic!() };
        assert_eq!(again.bytes().as_ptr(), b.as_ptr());
    }

    #[test]
    fn serde_array_checks_dimensions() {
        use ::ndarray::{Array1, Array2};
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Two {
            #[serde(with = "serde_array")]
            a: Array2<i16>,
        }
        #[derive(Deserialize, Debug)]
        struct One {
            #[serde(with = "serde_array")]
            #[allow(dead_code)]
            a: Array1<i16>,
        }
        let two = Two { a: array![[1, 2], [3, 4]] };
        let v = crate::to_value(&two).unwrap();
        assert_eq!(crate::from_value::<Two>(&v).unwrap(), two);
        let e = crate::from_value::<One>(&v).unwrap_err();
        assert!(e.to_string().contains("expected an array with 1 dimensions, received 2"), "{e}");
    }
}
