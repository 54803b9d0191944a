//! Typed values: serde conversion between Rust types and the wire's [`Value`], and the things
//! that cannot be plain data — local callbacks, generators and `_rintf` interfaces we send,
//! and the remote functions, generators and interfaces we receive.
//!
//! Conversion goes through msgpack (rmp-serde with named struct fields), so any `Serialize`
//! type becomes exactly what Python's msgpack would make of the equivalent object. Use
//! [`serde_bytes`] (re-exported) for binary data: a plain `Vec<u8>` is a list of integers.

use std::cell::RefCell;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt};
use hypha_rpc_core::codec::decode_value;
use hypha_rpc_core::codec::rtype::{Generator as GeneratorDesc, Method, RTypeCodec};
use hypha_rpc_core::engine::{local_function, local_generator};
use hypha_rpc_core::{FnId, GenId, Limits, Map, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::driver::Inner;
use crate::error::{Error, Result};
use crate::service::{DynHandler, Handler};

/// Limits for values we build ourselves (trusted): only the depth is capped.
fn local_limits() -> Limits {
    let mut l = Limits::default();
    l.max_frame_bytes = usize::MAX;
    l.max_collection_len = usize::MAX;
    l.max_str_len = usize::MAX;
    l.max_bin_len = usize::MAX;
    l
}

/// Local functions and generators found while serializing one value.
#[derive(Default)]
pub struct Locals {
    pub(crate) functions: Vec<(FnId, Arc<dyn DynHandler>)>,
    /// Items, or the message of an error to raise in the consumer.
    pub(crate) generators: Vec<(GenId, BoxStream<'static, Result<Value, String>>)>,
}

/// Who is deserializing: remote functions found in the value call back through `client`.
#[derive(Clone)]
pub(crate) struct Incoming {
    pub client: Arc<Inner>,
    pub parent: Option<String>,
}

thread_local! {
    static OUTGOING: RefCell<Option<Locals>> = const { RefCell::new(None) };
    static INCOMING: RefCell<Option<Incoming>> = const { RefCell::new(None) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

fn encode_msgpack<T: Serialize + ?Sized>(t: &T) -> Result<Value> {
    let bytes = rmp_serde::to_vec_named(t).map_err(|e| Error::Encode(e.to_string()))?;
    let (v, _) =
        decode_value(&Bytes::from(bytes), &local_limits()).map_err(|e| Error::Encode(e.to_string()))?;
    Ok(v)
}

/// Converts a Rust value to a [`Value`]. Callbacks, generators and interfaces cannot be
/// converted here (they only exist inside a call); use them as call arguments or results.
///
/// ```
/// use hypha_rpc::{to_value, Value};
/// #[derive(serde::Serialize)]
/// struct Point { x: i32, y: i32 }
/// let v = to_value(&Point { x: 1, y: 2 }).unwrap();
/// assert_eq!(v.as_map().unwrap().get("y"), Some(&Value::from(2)));
/// ```
pub fn to_value<T: Serialize + ?Sized>(t: &T) -> Result<Value> {
    encode_msgpack(t)
}

/// Converts a Rust value to a [`Value`], collecting the local functions and generators in it.
/// Refuses what peers cannot read (see [`check_sendable`]).
pub(crate) fn to_value_with_locals<T: Serialize + ?Sized>(t: &T) -> Result<(Value, Locals)> {
    let previous = OUTGOING.with(|o| o.borrow_mut().replace(Locals::default()));
    let result = encode_msgpack(t).and_then(|v| check_sendable(&v).map(|()| v));
    let locals = OUTGOING.with(|o| core::mem::replace(&mut *o.borrow_mut(), previous)).unwrap_or_default();
    result.map(|v| (v, locals))
}

/// Map keys must be strings or bytes: the server and Python peers unpack with
/// `strict_map_key` and drop a whole frame with any other key (PROTOCOL.md §4.1), which would
/// leave the call to time out. Refusing here turns that into an immediate error.
///
/// ```
/// use hypha_rpc::{Map, Value};
/// let mut m = Map::new();
/// m.insert(1, "one");
/// let e = hypha_rpc::check_sendable(&Value::Array(vec![Value::Map(m)])).unwrap_err();
/// assert!(e.to_string().contains("map keys must be strings"));
/// ```
pub fn check_sendable(v: &Value) -> Result<()> {
    match v {
        Value::Array(a) => a.iter().try_for_each(check_sendable),
        Value::Map(m) => check_map(m),
        _ => Ok(()),
    }
}

/// [`check_sendable`] for a map (keyword arguments).
pub(crate) fn check_map(m: &Map) -> Result<()> {
    m.iter().try_for_each(|(k, x)| match k {
        Value::Str(_) | Value::Bin(_) => check_sendable(x),
        other => Err(Error::Encode(format!(
            "map keys must be strings or bytes, found a {} key ({other:?}): the server and Python \
             peers drop such messages",
            other.kind()
        ))),
    })
}

/// Converts a [`Value`] to a Rust type. Remote functions inside can only be decoded where the
/// client is known (call arguments and results); here they are an error.
///
/// ```
/// use hypha_rpc::{from_value, Map, Value};
/// let mut m = Map::new();
/// m.insert("x", 1);
/// m.insert("y", 2);
/// #[derive(serde::Deserialize, Debug, PartialEq)]
/// struct Point { x: i32, y: i32 }
/// assert_eq!(from_value::<Point>(&Value::Map(m)).unwrap(), Point { x: 1, y: 2 });
/// ```
pub fn from_value<T: DeserializeOwned>(v: &Value) -> Result<T> {
    T::deserialize(crate::de::ValueDeserializer(v)).map_err(|e| Error::Decode(e.to_string()))
}

/// [`from_value`] with remote functions bound to `incoming`.
pub(crate) fn from_value_in<T: DeserializeOwned>(v: &Value, incoming: &Incoming) -> Result<T> {
    let previous = INCOMING.with(|i| i.borrow_mut().replace(incoming.clone()));
    let result = from_value(v);
    INCOMING.with(|i| *i.borrow_mut() = previous);
    result
}

fn current_incoming<E: serde::de::Error>(what: &str) -> Result<Incoming, E> {
    INCOMING.with(|i| i.borrow().clone()).ok_or_else(|| {
        E::custom(format!("a {what} can only be decoded from the arguments or result of a call"))
    })
}

/// Any value, deserialized as our [`Value`].
fn deserialize_value<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    Value::deserialize(d)
}

/// A value and the client it arrived on (for handles that call back through it).
pub(crate) fn deserialize_bound<'de, D: Deserializer<'de>>(
    d: D,
    what: &str,
) -> Result<(Value, Arc<Inner>), D::Error> {
    let v = deserialize_value(d)?;
    let incoming = current_incoming::<D::Error>(what)?;
    Ok((v, incoming.client))
}

fn serialize_value<S: Serializer>(v: &Value, s: S) -> Result<S::Ok, S::Error> {
    v.serialize(s)
}

/// Serializes a local placeholder (an ext value the engine replaces before sending).
fn serialize_ext<S: Serializer>(placeholder: Value, s: S) -> Result<S::Ok, S::Error> {
    let Value::Ext(tag, data) = placeholder else { unreachable!("placeholders are ext values") };
    s.serialize_newtype_struct(rmp_serde::MSGPACK_EXT_STRUCT_NAME, &(tag, serde_bytes::Bytes::new(&data)))
}

fn register_outgoing<E: serde::ser::Error>(what: &str, f: impl FnOnce(&mut Locals)) -> Result<(), E> {
    OUTGOING.with(|o| match o.borrow_mut().as_mut() {
        Some(l) => {
            f(l);
            Ok(())
        }
        None => Err(E::custom(format!("a {what} can only be sent as an argument or result of a call"))),
    })
}

// ---- local objects we send ---------------------------------------------------------------------

/// A local function to pass as an argument or return as a result: the peer receives a
/// callable. Built from the same closures as service functions.
///
/// ```
/// use hypha_rpc::Callback;
/// let on_progress = Callback::new(|percent: u32| async move {
///     println!("{percent}%");
///     Ok::<_, hypha_rpc::Error>(())
/// });
/// # let _ = on_progress;
/// ```
#[derive(Clone)]
pub struct Callback {
    handler: Arc<dyn DynHandler>,
    name: String,
}

impl Callback {
    /// A callback running `f` (any closure accepted by
    /// [`Service::function`](crate::Service::function)).
    pub fn new<M, F: Handler<M>>(f: F) -> Self {
        Callback { handler: f.into_dyn(), name: String::new() }
    }
    /// Sets the name the peer sees (`_rname`).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl fmt::Debug for Callback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Callback").field("name", &self.name).finish()
    }
}

impl Serialize for Callback {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let id = FnId(next_id());
        register_outgoing("callback", |l| l.functions.push((id, self.handler.clone())))?;
        serialize_ext(local_function(id, &self.name), s)
    }
}

/// A local stream to pass or return as a generator: the peer pulls its items one by one
/// (Python receives an async generator). Serializable once.
///
/// ```
/// use hypha_rpc::Generator;
/// let counting = Generator::new(futures::stream::iter(0..3u32));
/// # let _ = counting;
/// ```
pub struct Generator {
    stream: std::sync::Mutex<Option<BoxStream<'static, Result<Value, String>>>>,
}

impl Generator {
    /// Items of `stream`, each converted with [`to_value`].
    pub fn new<T: Serialize + Send + 'static>(stream: impl Stream<Item = T> + Send + 'static) -> Self {
        Self::try_new(stream.map(Ok::<T, String>))
    }
    /// Items or errors of `stream`: an error is raised in the consumer, and the generator stays
    /// open (as in Python).
    pub fn try_new<T, E>(stream: impl Stream<Item = Result<T, E>> + Send + 'static) -> Self
    where
        T: Serialize + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let s = stream.map(|r| match r {
            Ok(t) => to_value(&t)
                .and_then(|v| check_sendable(&v).map(|()| v))
                .map_err(|e| format!("cannot send a generator item: {e}")),
            // The producer's own error travels verbatim, as Python's does.
            Err(e) => Err(e.to_string()),
        });
        Generator { stream: std::sync::Mutex::new(Some(s.boxed())) }
    }
}

impl fmt::Debug for Generator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Generator")
    }
}

impl Serialize for Generator {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let stream = self.stream.lock().unwrap_or_else(|e| e.into_inner()).take();
        let stream = stream.ok_or_else(|| serde::ser::Error::custom("a Generator can be sent only once"))?;
        let id = GenId(next_id());
        register_outgoing("generator", |l| l.generators.push((id, stream)))?;
        serialize_ext(local_generator(id), s)
    }
}

/// A `_rintf` object to send: a bag of functions the receiver may call until it disposes of
/// it (or leaves). Python receives an object with these methods.
///
/// ```
/// use hypha_rpc::Interface;
/// let counter = Interface::new()
///     .function("increment", |by: i64| async move { Ok::<_, hypha_rpc::Error>(by + 1) })
///     .value("name", "counter");
/// # let _ = counter;
/// ```
#[derive(Clone, Default)]
pub struct Interface {
    members: Vec<(String, Member)>,
}

#[derive(Clone)]
enum Member {
    Function(Callback),
    Value(Value),
}

impl Interface {
    /// An empty interface.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a function.
    pub fn function<M, F: Handler<M>>(mut self, name: &str, f: F) -> Self {
        self.members.push((name.to_string(), Member::Function(Callback::new(f).named(name))));
        self
    }
    /// Adds a plain value.
    pub fn value(mut self, name: &str, v: impl Into<Value>) -> Self {
        self.members.push((name.to_string(), Member::Value(v.into())));
        self
    }
}

impl fmt::Debug for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.members.iter().map(|(k, _)| k)).finish()
    }
}

impl Serialize for Interface {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.members.len() + 1))?;
        m.serialize_entry("_rintf", &true)?;
        for (k, member) in &self.members {
            match member {
                Member::Function(cb) => m.serialize_entry(k, cb)?,
                Member::Value(v) => m.serialize_entry(k, v)?,
            }
        }
        m.end()
    }
}

// ---- remote objects we receive -----------------------------------------------------------------

/// A function of a peer (a callback it passed us, or a function it returned): call it like a
/// service method.
#[derive(Clone)]
pub struct RemoteFunction {
    pub(crate) client: Arc<Inner>,
    pub(crate) method: Method,
    pub(crate) parent: Option<String>,
}

impl RemoteFunction {
    /// Calls it with positional arguments (a tuple) and converts the result.
    pub async fn call<T: DeserializeOwned>(&self, args: impl Serialize) -> Result<T> {
        self.client.call_typed(&self.method, &args, None::<&()>, self.parent.clone()).await
    }
    /// Calls it with positional and keyword arguments.
    pub async fn call_with_kwargs<T: DeserializeOwned>(
        &self,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T> {
        self.client.call_typed(&self.method, &args, Some(&kwargs), self.parent.clone()).await
    }
    /// Calls it with untyped arguments.
    pub async fn call_value(&self, args: Vec<Value>, kwargs: Option<Map>) -> Result<Value> {
        self.client.call_values(&self.method, args, kwargs, self.parent.clone()).await
    }
    /// The descriptor (`_rtarget`, `_rmethod`, ...).
    pub fn descriptor(&self) -> &Method {
        &self.method
    }
}

impl fmt::Debug for RemoteFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteFunction({}:{})", self.method.target, self.method.method)
    }
}

impl<'de> Deserialize<'de> for RemoteFunction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = deserialize_value(d)?;
        let incoming = current_incoming::<D::Error>("remote function")?;
        let method = Method::from_value(&v)
            .ok_or_else(|| serde::de::Error::custom("expected a remote function (`_rtype: method`)"))?
            .map_err(serde::de::Error::custom)?;
        Ok(RemoteFunction { client: incoming.client, method, parent: incoming.parent })
    }
}

impl Serialize for RemoteFunction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_value(&self.method.to_value(), s)
    }
}

/// A generator of a peer, as a [`Stream`] of its items. Dropping it before the end closes it
/// remotely so the producer frees it.
pub struct RemoteGenerator {
    pub(crate) client: Arc<Inner>,
    pub(crate) desc: GeneratorDesc,
    pub(crate) reader: Option<u64>,
    pub(crate) prefetch: usize,
}

impl RemoteGenerator {
    /// Keeps up to `n` pulls in flight (default 1). Faster over a slow link; a producer that
    /// refuses concurrent pulls (Python) makes the reader fall back to 1 on its own.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }
    /// The items converted to `T`.
    pub fn typed<T: DeserializeOwned>(self) -> impl Stream<Item = Result<T>> + Send + Unpin {
        self.map(|r| r.and_then(|v| from_value(&v)))
    }
}

impl fmt::Debug for RemoteGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteGenerator({}:{})", self.desc.target, self.desc.method)
    }
}

impl<'de> Deserialize<'de> for RemoteGenerator {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = deserialize_value(d)?;
        let incoming = current_incoming::<D::Error>("remote generator")?;
        let desc = GeneratorDesc::from_value(&v)
            .ok_or_else(|| serde::de::Error::custom("expected a generator (`_rtype: generator`)"))?
            .map_err(serde::de::Error::custom)?;
        Ok(RemoteGenerator { client: incoming.client, desc, reader: None, prefetch: 1 })
    }
}

impl Stream for RemoteGenerator {
    type Item = Result<Value>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let client = this.client.clone();
        client.poll_generator(&this.desc, &mut this.reader, this.prefetch, cx)
    }
}

impl Drop for RemoteGenerator {
    fn drop(&mut self) {
        if let Some(id) = self.reader.take() {
            self.client.close_generator(id);
        } else {
            // Never pulled: still tell the producer to free it.
            self.client.close_unread_generator(&self.desc);
        }
    }
}

/// A `_rintf` object a peer sent us: call its functions, then [`dispose`](Self::dispose) of
/// it so the peer frees it.
#[derive(Clone)]
pub struct RemoteInterface {
    client: Arc<Inner>,
    members: Map,
    parent: Option<String>,
}

impl RemoteInterface {
    /// Calls member function `name`.
    pub async fn call<T: DeserializeOwned>(&self, name: &str, args: impl Serialize) -> Result<T> {
        let m = self.method(name)?;
        self.client.call_typed(&m, &args, None::<&()>, self.parent.clone()).await
    }
    /// A plain member value.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.members.get(name)
    }
    /// The `_rintf_service_id`.
    pub fn service_id(&self) -> Option<&str> {
        self.members.get("_rintf_service_id").and_then(Value::as_str)
    }
    /// Tells the owner we are done: it frees the interface and its functions.
    pub async fn dispose(&self) -> Result<()> {
        let m = self.method("_dispose")?;
        let _: Value = self.client.call_values(&m, Vec::new(), None, self.parent.clone()).await?;
        Ok(())
    }
    fn method(&self, name: &str) -> Result<Method> {
        let v = self.members.get(name).ok_or_else(|| Error::NoSuchMethod {
            service: self.service_id().unwrap_or("_rintf").into(),
            method: name.into(),
        })?;
        Method::from_value(v)
            .ok_or_else(|| Error::Decode(format!("member {name:?} is not a function")))?
            .map_err(|e| Error::Decode(e.to_string()))
    }
}

impl fmt::Debug for RemoteInterface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemoteInterface({:?})", self.service_id())
    }
}

impl<'de> Deserialize<'de> for RemoteInterface {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = deserialize_value(d)?;
        let incoming = current_incoming::<D::Error>("remote interface")?;
        let Value::Map(members) = v else {
            return Err(serde::de::Error::custom("expected a `_rintf` object (a map)"));
        };
        Ok(RemoteInterface { client: incoming.client, members, parent: incoming.parent })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypha_rpc_core::codec::to_vec;

    fn sample() -> Value {
        let mut inner = Map::new();
        inner.insert(1, "int key");
        inner.insert("f32", Value::F32(1.5));
        let mut m = Map::new();
        m.insert("nil", Value::Nil);
        m.insert("neg", -5_000_000_000i64);
        m.insert("big", u64::MAX);
        m.insert("bin", Value::bin(vec![0u8, 255, 7]));
        m.insert("s", "héllo, a string longer than twenty-three bytes");
        m.insert("arr", Value::Array(vec![true.into(), 2.5f64.into(), Value::Map(inner)]));
        Value::Map(m)
    }

    #[test]
    fn values_pass_through_serde_unchanged_and_byte_exact() {
        let v = sample();
        assert_eq!(to_value(&v).unwrap(), v);
        assert_eq!(from_value::<Value>(&v).unwrap(), v);
        // serde's encoding of a Value is exactly our encoder's.
        assert_eq!(rmp_serde::to_vec_named(&v).unwrap(), to_vec(&v));
    }

    #[test]
    fn callbacks_outside_a_call_are_an_encode_error() {
        let cb = Callback::new(|| async { Ok::<_, String>(()) });
        let e = to_value(&(cb,)).unwrap_err();
        assert!(e.to_string().contains("only be sent as an argument or result"), "{e}");
    }

    #[test]
    fn collected_locals_become_placeholders() {
        let cb = Callback::new(|x: i64| async move { Ok::<_, String>(x) }).named("cb");
        let g = Generator::new(futures::stream::iter(0..2u8));
        let (v, locals) = to_value_with_locals(&(cb, g)).unwrap();
        assert_eq!(locals.functions.len(), 1);
        assert_eq!(locals.generators.len(), 1);
        let a = v.as_array().unwrap();
        assert!(matches!(a[0], Value::Ext(hypha_rpc_core::engine::LOCAL_FUNCTION_EXT, _)), "{a:?}");
        assert!(matches!(a[1], Value::Ext(hypha_rpc_core::engine::LOCAL_GENERATOR_EXT, _)), "{a:?}");
    }

    #[test]
    fn remote_functions_need_a_call_to_decode() {
        let m = Method { target: "ws/c".into(), method: "services.x.f".into(), ..Method::default() };
        let e = from_value::<RemoteFunction>(&m.to_value()).unwrap_err();
        assert!(e.to_string().contains("arguments or result of a call"), "{e}");
    }
}
