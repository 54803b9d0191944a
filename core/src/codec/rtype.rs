//! Typed views of the maps hypha-rpc marks with `_rtype`, and the custom-codec extension point.
//!
//! On the wire a typed value is an ordinary msgpack map with a `_rtype` key (PROTOCOL.md §4.2).
//! Each type here converts from such a map ([`RTypeCodec::from_value`]) and back
//! ([`RTypeCodec::to_value`]) with the key order the Python client writes, so a decoded
//! descriptor re-encodes to the same bytes. Keys a type does not know are kept in its `other`
//! map and written after the known ones, so nothing a peer sends is lost.
//!
//! A map whose `_rtype` is unknown stays a plain map, as in Python; [`RType::from_value`] shows
//! it as [`RType::Custom`]. Users add their own types with [`RTypeCodec`] and, for dynamic
//! dispatch by name, [`Codecs`].

use crate::vecmap::VecMap;
use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use bytes::{Bytes, BytesMut};
use core::any::Any;

use super::{DType, RTypeError};
use crate::{Map, Value};

/// Where a codec's `_rtype` key goes in the encoded map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RTypePosition {
    /// Before all fields (Python's built-in types).
    First,
    /// After all fields (Python's custom codecs, `iostream`).
    Last,
}

/// A type that travels as a `_rtype`-tagged map.
///
/// Implement it for your own types to give them a wire form other clients can register too
/// (Python `register_codec`, JS `registerCodec`):
///
/// ```
/// use hypha_rpc_core::codec::rtype::RTypeCodec;
/// use hypha_rpc_core::codec::RTypeError;
/// use hypha_rpc_core::{Map, Value};
///
/// #[derive(Debug, PartialEq)]
/// struct Point { x: f64, y: f64 }
///
/// impl RTypeCodec for Point {
///     const NAME: &'static str = "point";
///     fn encode_fields(&self, out: &mut Map) {
///         out.insert("x", self.x);
///         out.insert("y", self.y);
///     }
///     fn decode_fields(map: &Map) -> Result<Self, RTypeError> {
///         let num = |k: &'static str| map.get(k).and_then(Value::as_f64).ok_or(RTypeError::MissingField {
///             rtype: "point".into(), field: k });
///         Ok(Point { x: num("x")?, y: num("y")? })
///     }
/// }
///
/// let v = Point { x: 1.0, y: 2.0 }.to_value();
/// assert_eq!(v.rtype(), Some("point"));
/// assert_eq!(Point::from_value(&v), Some(Ok(Point { x: 1.0, y: 2.0 })));
/// ```
pub trait RTypeCodec: Sized {
    /// The `_rtype` name.
    const NAME: &'static str;
    /// Where `_rtype` goes when encoding.
    const POSITION: RTypePosition = RTypePosition::Last;
    /// Writes the fields (everything but `_rtype`) in wire order.
    fn encode_fields(&self, out: &mut Map);
    /// Reads the fields from the whole map (which still holds `_rtype`).
    fn decode_fields(map: &Map) -> Result<Self, RTypeError>;

    /// The tagged map.
    fn to_value(&self) -> Value {
        let mut m = Map::new();
        if Self::POSITION == RTypePosition::First {
            m.push("_rtype", Self::NAME);
        }
        self.encode_fields(&mut m);
        if Self::POSITION == RTypePosition::Last {
            m.push("_rtype", Self::NAME);
        }
        Value::Map(m)
    }

    /// `None` unless `v` is a map whose `_rtype` is [`Self::NAME`]; then the decoded value.
    fn from_value(v: &Value) -> Option<Result<Self, RTypeError>> {
        let m = v.as_map()?;
        (m.get("_rtype")?.as_str()? == Self::NAME).then(|| Self::decode_fields(m))
    }
}

// ---------------------------------------------------------------------------------------------
// Field access helpers shared by the built-in types.

struct Fields<'a> {
    map: &'a Map,
    rtype: &'static str,
    known: &'static [&'static str],
}

impl<'a> Fields<'a> {
    fn new(map: &'a Map, rtype: &'static str, known: &'static [&'static str]) -> Self {
        Fields { map, rtype, known }
    }
    fn wrong(&self, field: &'static str, expected: &'static str, found: &Value) -> RTypeError {
        RTypeError::WrongType { rtype: self.rtype.into(), field, expected, found: found.kind() }
    }
    fn missing(&self, field: &'static str) -> RTypeError {
        RTypeError::MissingField { rtype: self.rtype.into(), field }
    }
    fn invalid(&self, field: &'static str, reason: impl Into<String>) -> RTypeError {
        RTypeError::Invalid { rtype: self.rtype.into(), field, reason: reason.into() }
    }
    /// An optional field; `nil` counts as absent (hypha-rpc writes `_rserver: None` and
    /// `_rname: None` on connections without a server, such as WebRTC data channels).
    fn opt_str(&self, field: &'static str) -> Result<Option<String>, RTypeError> {
        match self.map.get(field) {
            None | Some(Value::Nil) => Ok(None),
            Some(Value::Str(s)) => Ok(Some(String::from(s.as_str()))),
            Some(v) => Err(self.wrong(field, "str", v)),
        }
    }
    fn str(&self, field: &'static str) -> Result<String, RTypeError> {
        self.opt_str(field)?.ok_or_else(|| self.missing(field))
    }
    fn opt_bool(&self, field: &'static str) -> Result<Option<bool>, RTypeError> {
        match self.map.get(field) {
            None | Some(Value::Nil) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(field, "bool", v)),
        }
    }
    fn opt_bin(&self, field: &'static str) -> Result<Option<Bytes>, RTypeError> {
        match self.map.get(field) {
            None => Ok(None),
            Some(Value::Bin(b)) => Ok(Some(b.clone())),
            Some(v) => Err(self.wrong(field, "bin", v)),
        }
    }
    fn bin(&self, field: &'static str) -> Result<Bytes, RTypeError> {
        self.opt_bin(field)?.ok_or_else(|| self.missing(field))
    }
    fn array(&self, field: &'static str) -> Result<&'a [Value], RTypeError> {
        match self.map.get(field) {
            None => Err(self.missing(field)),
            Some(Value::Array(a)) => Ok(a),
            Some(v) => Err(self.wrong(field, "array", v)),
        }
    }
    fn any(&self, field: &'static str) -> Option<Value> {
        self.map.get(field).cloned()
    }
    /// Entries whose key is neither `_rtype` nor a known field, in wire order.
    fn other(&self) -> Map {
        self.map
            .iter()
            .filter(|(k, _)| !k.as_str().is_some_and(|k| k == "_rtype" || self.known.contains(&k)))
            .cloned()
            .collect::<Vec<_>>()
            .into()
    }
}

fn push_opt(out: &mut Map, key: &'static str, v: &Option<impl Clone + Into<Value>>) {
    if let Some(v) = v {
        out.push(key, v.clone());
    }
}

fn push_other(out: &mut Map, other: &Map) {
    for (k, v) in other {
        out.push(k.clone(), v.clone());
    }
}

// ---------------------------------------------------------------------------------------------

/// How a caller must call a remote method (`_rpromise`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromiseMode {
    /// `"*"`: send `promise: "*"` and `t`; the callee expands it (the usual case).
    Compact,
    /// `true`: send the full promise object (`services.built-in.get_service`).
    Full,
    /// `false`: fire and forget (promise slots themselves).
    None,
}

impl PromiseMode {
    fn to_value(self) -> Value {
        match self {
            PromiseMode::Compact => "*".into(),
            PromiseMode::Full => true.into(),
            PromiseMode::None => false.into(),
        }
    }
}

/// Key order of a [`Method`] descriptor; Python writes two different ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MethodLayout {
    /// Service functions and promise slots: `_rserver, _rtarget, _rmethod, _rpromise, _rname,
    /// _rasync, _rdoc, _rschema, _renc_pub`.
    #[default]
    Service,
    /// Session callbacks: `_rserver, _rtarget, _rmethod, _rname, _rpromise, _rasync, _renc_pub,
    /// _rdoc, _rschema` (Python never sets `_rasync` on callbacks).
    Callback,
}

/// `_rtype: "method"`: a remote callable (PROTOCOL.md §4.3).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Method {
    /// `_rtarget`: the client that serves it, bare or `ws/client`.
    pub target: String,
    /// `_rmethod`: the method path at the target.
    pub method: String,
    /// `_rpromise`, absent means fire and forget.
    pub promise: Option<PromiseMode>,
    /// `_rserver`: the holder's `public_base_url`.
    pub server: Option<String>,
    /// `_rname`: the function's own name.
    pub name: Option<String>,
    /// `_rasync`: whether the Python function is a coroutine.
    pub is_async: Option<bool>,
    /// `_rdoc`: a string or nil (present-but-nil is kept as `Some(Value::Nil)`).
    pub doc: Option<Value>,
    /// `_rschema`: the function's JSON schema, if any.
    pub schema: Option<Value>,
    /// `_renc_pub`: the holder's 32-byte encryption public key.
    pub enc_pub: Option<Bytes>,
    /// Which key order to write.
    pub layout: MethodLayout,
    /// Keys not listed above, in wire order.
    pub other: Map,
}

const METHOD_FIELDS: &[&str] =
    &["_rserver", "_rtarget", "_rmethod", "_rpromise", "_rname", "_rasync", "_rdoc", "_rschema", "_renc_pub"];

impl Method {
    /// The docstring, if it is a string.
    pub fn doc_str(&self) -> Option<&str> {
        self.doc.as_ref()?.as_str()
    }
}

impl RTypeCodec for Method {
    const NAME: &'static str = "method";
    const POSITION: RTypePosition = RTypePosition::First;

    fn encode_fields(&self, out: &mut Map) {
        push_opt(out, "_rserver", &self.server);
        out.push("_rtarget", self.target.as_str());
        out.push("_rmethod", self.method.as_str());
        let promise = self.promise.map(PromiseMode::to_value);
        match self.layout {
            MethodLayout::Service => {
                push_opt(out, "_rpromise", &promise);
                push_opt(out, "_rname", &self.name);
                push_opt(out, "_rasync", &self.is_async);
                push_opt(out, "_rdoc", &self.doc);
                push_opt(out, "_rschema", &self.schema);
                push_opt(out, "_renc_pub", &self.enc_pub);
            }
            MethodLayout::Callback => {
                push_opt(out, "_rname", &self.name);
                push_opt(out, "_rpromise", &promise);
                push_opt(out, "_rasync", &self.is_async);
                push_opt(out, "_renc_pub", &self.enc_pub);
                push_opt(out, "_rdoc", &self.doc);
                push_opt(out, "_rschema", &self.schema);
            }
        }
        push_other(out, &self.other);
    }

    fn decode_fields(map: &Map) -> Result<Self, RTypeError> {
        let f = Fields::new(map, "method", METHOD_FIELDS);
        let promise = match map.get("_rpromise") {
            None => None,
            Some(Value::Str(s)) if s == "*" => Some(PromiseMode::Compact),
            Some(Value::Bool(true)) => Some(PromiseMode::Full),
            Some(Value::Bool(false)) => Some(PromiseMode::None),
            Some(Value::Str(s)) => return Err(f.invalid("_rpromise", alloc::format!("unknown mode {s:?}"))),
            Some(v) => return Err(f.wrong("_rpromise", "\"*\" or bool", v)),
        };
        let pos = |k: &str| map.iter().position(|(key, _)| key.as_str() == Some(k));
        let layout = match (pos("_rname"), pos("_rpromise")) {
            (Some(n), Some(p)) if n < p => MethodLayout::Callback,
            _ => MethodLayout::Service,
        };
        Ok(Method {
            target: f.str("_rtarget")?,
            method: f.str("_rmethod")?,
            promise,
            server: f.opt_str("_rserver")?,
            name: f.opt_str("_rname")?,
            is_async: f.opt_bool("_rasync")?,
            doc: f.any("_rdoc"),
            schema: f.any("_rschema"),
            enc_pub: f.opt_bin("_renc_pub")?,
            layout,
            other: f.other(),
        })
    }
}

/// `_rtype: "generator"`: a remote iterator (PROTOCOL.md §8).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Generator {
    /// `_rserver`.
    pub server: Option<String>,
    /// `_rtarget`: the producer.
    pub target: String,
    /// `_rmethod`: call it (no arguments) for the next item.
    pub method: String,
    /// `_rclose_method`: call it to stop early.
    pub close_method: Option<String>,
    /// `_rpromise`.
    pub promise: Option<PromiseMode>,
    /// `_rdoc` (Python: `"Remote generator"`).
    pub doc: Option<Value>,
    /// Keys not listed above, in wire order.
    pub other: Map,
}

const GENERATOR_FIELDS: &[&str] =
    &["_rserver", "_rtarget", "_rmethod", "_rclose_method", "_rpromise", "_rdoc"];

impl RTypeCodec for Generator {
    const NAME: &'static str = "generator";
    const POSITION: RTypePosition = RTypePosition::First;

    fn encode_fields(&self, out: &mut Map) {
        push_opt(out, "_rserver", &self.server);
        out.push("_rtarget", self.target.as_str());
        out.push("_rmethod", self.method.as_str());
        push_opt(out, "_rclose_method", &self.close_method);
        push_opt(out, "_rpromise", &self.promise.map(PromiseMode::to_value));
        push_opt(out, "_rdoc", &self.doc);
        push_other(out, &self.other);
    }

    fn decode_fields(map: &Map) -> Result<Self, RTypeError> {
        let f = Fields::new(map, "generator", GENERATOR_FIELDS);
        let promise = match map.get("_rpromise") {
            None => None,
            Some(Value::Str(s)) if s == "*" => Some(PromiseMode::Compact),
            Some(Value::Bool(b)) => Some(if *b { PromiseMode::Full } else { PromiseMode::None }),
            Some(v) => return Err(f.wrong("_rpromise", "\"*\" or bool", v)),
        };
        Ok(Generator {
            server: f.opt_str("_rserver")?,
            target: f.str("_rtarget")?,
            method: f.str("_rmethod")?,
            close_method: f.opt_str("_rclose_method")?,
            promise,
            doc: f.any("_rdoc"),
            other: f.other(),
        })
    }
}

/// `_rtype: "stop_iteration"`: the end of a generator, sent as a resolve value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StopIteration;

impl RTypeCodec for StopIteration {
    const NAME: &'static str = "stop_iteration";
    const POSITION: RTypePosition = RTypePosition::First;
    fn encode_fields(&self, _: &mut Map) {}
    fn decode_fields(_: &Map) -> Result<Self, RTypeError> {
        Ok(StopIteration)
    }
}

fn checked_elements(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// `_rtype: "ndarray"`: a dense C-order array (numpy).
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray {
    /// `_rvalue`: the raw element bytes in `dtype`'s byte order.
    pub data: Bytes,
    /// `_rshape`: dimensions; empty for a 0-d array or numpy scalar.
    pub shape: Vec<u64>,
    /// `_rdtype`.
    pub dtype: DType,
    /// Keys not listed above, in wire order.
    pub other: Map,
}

impl NdArray {
    /// Number of elements (`product(shape)`), `None` on overflow.
    pub fn len(&self) -> Option<u64> {
        checked_elements(&self.shape)
    }
    /// `true` when some dimension is zero.
    pub fn is_empty(&self) -> bool {
        self.shape.contains(&0)
    }
}

impl RTypeCodec for NdArray {
    const NAME: &'static str = "ndarray";
    const POSITION: RTypePosition = RTypePosition::First;

    fn encode_fields(&self, out: &mut Map) {
        out.push("_rvalue", self.data.clone());
        out.push("_rshape", Value::Array(self.shape.iter().map(|&d| Value::from(d)).collect()));
        out.push("_rdtype", String::from(self.dtype.clone()));
        push_other(out, &self.other);
    }

    /// Accepts `_rvalue` as one bin or an array of bins (concatenated, as Python does), and
    /// checks that the byte length matches shape × item size when the dtype is numeric.
    fn decode_fields(map: &Map) -> Result<Self, RTypeError> {
        let f = Fields::new(map, "ndarray", &["_rvalue", "_rshape", "_rdtype"]);
        let data = match map.get("_rvalue") {
            None => return Err(f.missing("_rvalue")),
            Some(Value::Bin(b)) => b.clone(),
            Some(Value::Array(parts)) => {
                let mut total = BytesMut::new();
                for p in parts {
                    match p {
                        Value::Bin(b) => total.extend_from_slice(b),
                        v => return Err(f.wrong("_rvalue", "bin or array of bins", v)),
                    }
                }
                total.freeze()
            }
            Some(v) => return Err(f.wrong("_rvalue", "bin or array of bins", v)),
        };
        let shape = f
            .array("_rshape")?
            .iter()
            .map(|d| d.as_u64().ok_or_else(|| f.wrong("_rshape", "array of non-negative integers", d)))
            .collect::<Result<Vec<_>, _>>()?;
        let dtype = DType::parse(&f.str("_rdtype")?);
        if let Some(size) = dtype.item_size() {
            let want = checked_elements(&shape).and_then(|n| n.checked_mul(size as u64));
            if want != Some(data.len() as u64) {
                return Err(f.invalid(
                    "_rvalue",
                    alloc::format!("{} bytes do not hold shape {:?} of {}", data.len(), shape, dtype),
                ));
            }
        }
        Ok(NdArray { data, shape, dtype, other: f.other() })
    }
}

/// `_rtype: "typedarray"`: a JS typed array (`Float32Array`, ...), decoded as 1-D.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedArray {
    /// `_rvalue`: the whole underlying buffer, little-endian.
    pub data: Bytes,
    /// `_rdtype`: `int8` ... `float64`.
    pub dtype: DType,
    /// Keys not listed above, in wire order.
    pub other: Map,
}

impl RTypeCodec for TypedArray {
    const NAME: &'static str = "typedarray";
    const POSITION: RTypePosition = RTypePosition::First;

    fn encode_fields(&self, out: &mut Map) {
        out.push("_rvalue", self.data.clone());
        out.push("_rdtype", String::from(self.dtype.clone()));
        push_other(out, &self.other);
    }

    fn decode_fields(map: &Map) -> Result<Self, RTypeError> {
        let f = Fields::new(map, "typedarray", &["_rvalue", "_rdtype"]);
        let data = f.bin("_rvalue")?;
        let dtype = DType::parse(&f.str("_rdtype")?);
        if let Some(size) = dtype.item_size() {
            if data.len() % size != 0 {
                return Err(f.invalid(
                    "_rvalue",
                    alloc::format!("{} bytes are not a whole number of {dtype}", data.len()),
                ));
            }
        }
        Ok(TypedArray { data, dtype, other: f.other() })
    }
}

/// `_rtype: "memoryview"`: raw bytes (Python `memoryview`, JS `ArrayBuffer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryView(pub Bytes);

impl RTypeCodec for MemoryView {
    const NAME: &'static str = "memoryview";
    const POSITION: RTypePosition = RTypePosition::First;
    fn encode_fields(&self, out: &mut Map) {
        out.push("_rvalue", self.0.clone());
    }
    fn decode_fields(map: &Map) -> Result<Self, RTypeError> {
        Ok(MemoryView(Fields::new(map, "memoryview", &["_rvalue"]).bin("_rvalue")?))
    }
}

/// `_rtype: "set"`: an unordered collection, items in wire order.
#[derive(Debug, Clone, PartialEq)]
pub struct Set(pub Vec<Value>);

impl RTypeCodec for Set {
    const NAME: &'static str = "set";
    const POSITION: RTypePosition = RTypePosition::First;
    fn encode_fields(&self, out: &mut Map) {
        out.push("_rvalue", Value::Array(self.0.clone()));
    }
    fn decode_fields(map: &Map) -> Result<Self, RTypeError> {
        Ok(Set(Fields::new(map, "set", &["_rvalue"]).array("_rvalue")?.to_vec()))
    }
}

/// `_rtype: "orderedmap"`: a JS `Map`, as key/value pairs (keys of any type).
#[derive(Debug, Clone, PartialEq)]
pub struct OrderedMap(pub Vec<(Value, Value)>);

impl RTypeCodec for OrderedMap {
    const NAME: &'static str = "orderedmap";
    const POSITION: RTypePosition = RTypePosition::First;
    fn encode_fields(&self, out: &mut Map) {
        let pairs = self.0.iter().map(|(k, v)| Value::Array(alloc::vec![k.clone(), v.clone()])).collect();
        out.push("_rvalue", Value::Array(pairs));
    }
    fn decode_fields(map: &Map) -> Result<Self, RTypeError> {
        let f = Fields::new(map, "orderedmap", &["_rvalue"]);
        let pairs = f
            .array("_rvalue")?
            .iter()
            .map(|p| match p.as_array() {
                Some([k, v]) => Ok((k.clone(), v.clone())),
                _ => Err(f.wrong("_rvalue", "array of [key, value] pairs", p)),
            })
            .collect::<Result<_, _>>()?;
        Ok(OrderedMap(pairs))
    }
}

/// `_rtype: "error"`: a remote exception (PROTOCOL.md §5.6).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RemoteError {
    /// `_rvalue`: the message (for Python async handlers, the formatted traceback).
    pub message: String,
    /// `_rtrace`: the traceback text, possibly empty.
    pub trace: Option<String>,
    /// Keys not listed above, in wire order.
    pub other: Map,
}

impl RTypeCodec for RemoteError {
    const NAME: &'static str = "error";
    const POSITION: RTypePosition = RTypePosition::First;
    fn encode_fields(&self, out: &mut Map) {
        out.push("_rvalue", self.message.as_str());
        push_opt(out, "_rtrace", &self.trace);
        push_other(out, &self.other);
    }
    fn decode_fields(map: &Map) -> Result<Self, RTypeError> {
        let f = Fields::new(map, "error", &["_rvalue", "_rtrace"]);
        let message = match map.get("_rvalue") {
            None => return Err(f.missing("_rvalue")),
            Some(Value::Str(s)) => String::from(s.as_str()),
            // Real peers send strings. Anything else is named rather than refused; it is not
            // printed whole, which would drag float formatting into every build (footprint).
            Some(Value::Integer(i)) => alloc::format!("{i}"),
            Some(Value::Bool(b)) => alloc::format!("{b}"),
            Some(v) => alloc::format!("(an error given as a {} value)", v.kind()),
        };
        let trace = match map.get("_rtrace") {
            Some(Value::Nil) | None => None,
            Some(Value::Str(s)) => Some(String::from(s.as_str())),
            Some(v) => return Err(f.wrong("_rtrace", "str", v)),
        };
        Ok(RemoteError { message, trace, other: f.other() })
    }
}

/// `_rtype: "iostream"`: a file-like object whose methods are remote callables.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IoStream {
    /// The object's attributes (`name`, `size`, `read`, `seek`, ...), in wire order.
    pub props: Map,
    /// `_rnative`: `"py:<class ...>"` or `"js:blob"`.
    pub native: Option<String>,
}

impl IoStream {
    /// The method descriptor stored under `name` (`"read"`, `"seek"`, ...), if any.
    pub fn method(&self, name: &str) -> Option<Result<Method, RTypeError>> {
        Method::from_value(self.props.get(name)?)
    }
}

impl RTypeCodec for IoStream {
    const NAME: &'static str = "iostream";
    fn encode_fields(&self, out: &mut Map) {
        push_other(out, &self.props);
        push_opt(out, "_rnative", &self.native);
    }
    fn decode_fields(map: &Map) -> Result<Self, RTypeError> {
        let f = Fields::new(map, "iostream", &["_rnative"]);
        Ok(IoStream { native: f.opt_str("_rnative")?, props: f.other() })
    }
}

/// Any typed map, built-in or not.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RType {
    /// `method`.
    Method(Method),
    /// `generator`.
    Generator(Generator),
    /// `stop_iteration`.
    StopIteration,
    /// `ndarray`.
    NdArray(NdArray),
    /// `typedarray`.
    TypedArray(TypedArray),
    /// `memoryview`.
    MemoryView(MemoryView),
    /// `set`.
    Set(Set),
    /// `orderedmap`.
    OrderedMap(OrderedMap),
    /// `error`.
    Error(RemoteError),
    /// `iostream`.
    IoStream(IoStream),
    /// Any other `_rtype` (custom codecs, the server's `pydantic-model`, ...): the name and the
    /// remaining fields, re-encoded with `_rtype` last.
    Custom {
        /// The `_rtype` value.
        name: String,
        /// Every other entry, in wire order.
        fields: Map,
    },
}

impl RType {
    /// `None` if `v` is not a map with a string `_rtype`; otherwise the typed view, or the
    /// reason its fields do not fit.
    ///
    /// ```
    /// use hypha_rpc_core::codec::rtype::RType;
    /// use hypha_rpc_core::{Map, Value};
    /// let mut m = Map::new();
    /// m.insert("_rtype", "error");
    /// m.insert("_rvalue", "boom");
    /// let Some(Ok(RType::Error(e))) = RType::from_value(&Value::Map(m)) else { panic!() };
    /// assert_eq!(e.message, "boom");
    /// ```
    pub fn from_value(v: &Value) -> Option<Result<RType, RTypeError>> {
        let map = v.as_map()?;
        let name = map.get("_rtype")?.as_str()?;
        Some(Self::decode_named(name, map))
    }

    fn decode_named(name: &str, map: &Map) -> Result<RType, RTypeError> {
        Ok(match name {
            Method::NAME => RType::Method(Method::decode_fields(map)?),
            Generator::NAME => RType::Generator(Generator::decode_fields(map)?),
            StopIteration::NAME => RType::StopIteration,
            NdArray::NAME => RType::NdArray(NdArray::decode_fields(map)?),
            TypedArray::NAME => RType::TypedArray(TypedArray::decode_fields(map)?),
            MemoryView::NAME => RType::MemoryView(MemoryView::decode_fields(map)?),
            Set::NAME => RType::Set(Set::decode_fields(map)?),
            OrderedMap::NAME => RType::OrderedMap(OrderedMap::decode_fields(map)?),
            RemoteError::NAME => RType::Error(RemoteError::decode_fields(map)?),
            IoStream::NAME => RType::IoStream(IoStream::decode_fields(map)?),
            other => RType::Custom {
                name: other.to_string(),
                fields: map
                    .iter()
                    .filter(|(k, _)| k.as_str() != Some("_rtype"))
                    .cloned()
                    .collect::<Vec<_>>()
                    .into(),
            },
        })
    }

    /// The `_rtype` name.
    pub fn name(&self) -> &str {
        match self {
            RType::Method(_) => Method::NAME,
            RType::Generator(_) => Generator::NAME,
            RType::StopIteration => StopIteration::NAME,
            RType::NdArray(_) => NdArray::NAME,
            RType::TypedArray(_) => TypedArray::NAME,
            RType::MemoryView(_) => MemoryView::NAME,
            RType::Set(_) => Set::NAME,
            RType::OrderedMap(_) => OrderedMap::NAME,
            RType::Error(_) => RemoteError::NAME,
            RType::IoStream(_) => IoStream::NAME,
            RType::Custom { name, .. } => name,
        }
    }

    /// The tagged map, with the key order the Python client writes.
    pub fn to_value(&self) -> Value {
        match self {
            RType::Method(x) => x.to_value(),
            RType::Generator(x) => x.to_value(),
            RType::StopIteration => StopIteration.to_value(),
            RType::NdArray(x) => x.to_value(),
            RType::TypedArray(x) => x.to_value(),
            RType::MemoryView(x) => x.to_value(),
            RType::Set(x) => x.to_value(),
            RType::OrderedMap(x) => x.to_value(),
            RType::Error(x) => x.to_value(),
            RType::IoStream(x) => x.to_value(),
            RType::Custom { name, fields } => {
                let mut m = fields.clone();
                m.push("_rtype", name.as_str());
                Value::Map(m)
            }
        }
    }
}

type DecodeFn = fn(&Map) -> Result<Box<dyn Any + Send>, RTypeError>;

/// A registry of custom codecs, looked up by `_rtype` name before the built-in table (the
/// order Python uses).
///
/// ```
/// use hypha_rpc_core::codec::rtype::{Codecs, Decoded, RTypeCodec, StopIteration};
/// let mut codecs = Codecs::new();
/// codecs.register::<StopIteration>(); // any RTypeCodec + Send + 'static
/// match codecs.decode(&StopIteration.to_value()) {
///     Some(Ok(Decoded::Custom { name, value })) => {
///         assert_eq!(name, "stop_iteration");
///         assert!(value.downcast::<StopIteration>().is_ok());
///     }
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Default, Clone)]
pub struct Codecs {
    by_name: VecMap<&'static str, DecodeFn>,
}

/// What [`Codecs::decode`] made of a typed map.
#[derive(Debug)]
pub enum Decoded {
    /// A registered codec decoded it; downcast `value` to the codec's type.
    Custom {
        /// The `_rtype`.
        name: &'static str,
        /// The decoded value.
        value: Box<dyn Any + Send>,
    },
    /// No codec is registered for it: the built-in typed view.
    Builtin(Box<RType>),
}

impl core::fmt::Debug for Codecs {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_set().entries(self.by_name.keys()).finish()
    }
}

impl Codecs {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `T` under [`RTypeCodec::NAME`], replacing an earlier codec of that name.
    pub fn register<T: RTypeCodec + Send + 'static>(&mut self) {
        fn decode<T: RTypeCodec + Send + 'static>(m: &Map) -> Result<Box<dyn Any + Send>, RTypeError> {
            Ok(Box::new(T::decode_fields(m)?))
        }
        self.by_name.insert(T::NAME, decode::<T>);
    }

    /// `true` if a codec is registered for `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// `None` if `v` is not a typed map; otherwise a registered codec's result, or the
    /// built-in view.
    pub fn decode(&self, v: &Value) -> Option<Result<Decoded, RTypeError>> {
        let map = v.as_map()?;
        let name = map.get("_rtype")?.as_str()?;
        Some(match self.by_name.get_key_value(name) {
            Some((name, decode)) => decode(map).map(|value| Decoded::Custom { name, value }),
            None => RType::decode_named(name, map).map(|t| Decoded::Builtin(Box::new(t))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(v: Value) -> String {
        let mut map = Map::new();
        map.push("_rtype", "error");
        map.push("_rvalue", v);
        RemoteError::decode_fields(&map).unwrap().message
    }

    #[test]
    fn error_values_that_are_not_strings_are_named() {
        assert_eq!(message("boom".into()), "boom");
        assert_eq!(message(Value::from(-3i64)), "-3");
        assert_eq!(message(Value::Bool(true)), "true");
        assert_eq!(message(Value::F64(1.5)), "(an error given as a float64 value)");
        assert_eq!(message(Value::Map(Map::new())), "(an error given as a map value)");
    }
}
