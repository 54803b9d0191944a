//! Services built from Rust closures: the [`Handler`] trait that turns `async` closures with
//! serde-typed arguments into callable functions, the [`Call`] a raw handler receives, and the
//! [`Service`] builder.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use hypha_rpc_core::codec::rtype::RemoteError;
use hypha_rpc_core::service::{FunctionSpec, RequireContext, ServiceSpec, Visibility};
use hypha_rpc_core::{Context, Map, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::values::{Incoming, Locals, from_value_in, to_value_with_locals};

/// What a function returns to the engine: the value and the local objects inside it.
pub(crate) type Reply = Result<(Value, Locals), RemoteError>;

/// One incoming call, as a raw handler ([`Service::function_raw`]) sees it.
pub struct Call {
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments, when the caller sent any.
    pub kwargs: Option<Map>,
    /// The trusted context (server-set caller identity), when the function asked for it.
    pub context: Option<Context>,
    pub(crate) incoming: Option<Incoming>,
}

impl Call {
    /// Positional argument `i` converted to `T` (`Nil` when missing, so `Option<T>` works).
    pub fn arg<T: DeserializeOwned>(&self, i: usize) -> Result<T> {
        self.decode(self.args.get(i).unwrap_or(&Value::Nil))
    }
    /// Keyword argument `name` converted to `T` (`Nil` when missing).
    pub fn kwarg<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        self.decode(self.kwargs.as_ref().and_then(|k| k.get(name)).unwrap_or(&Value::Nil))
    }
    fn decode<T: DeserializeOwned>(&self, v: &Value) -> Result<T> {
        match &self.incoming {
            Some(i) => from_value_in(v, i),
            None => crate::values::from_value(v),
        }
    }
    /// The positional arguments with the keyword arguments (if any) appended as one map:
    /// how typed handlers see them, and how Python puts them on the wire (`_rkwargs`).
    fn into_flat(self) -> (Vec<Value>, Option<Incoming>, Option<Context>) {
        let mut all = self.args;
        if let Some(k) = self.kwargs {
            all.push(Value::Map(k));
        }
        (all, self.incoming, self.context)
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call").field("args", &self.args).field("kwargs", &self.kwargs).finish()
    }
}

/// A function the driver can run: the type-erased form of every [`Handler`].
pub trait DynHandler: Send + Sync + 'static {
    /// Runs the function.
    #[doc(hidden)]
    fn call(&self, call: Call) -> BoxFuture<'static, Reply>;
}

/// Turns the error of a user function into what the caller sees.
fn remote_error(e: impl fmt::Display) -> RemoteError {
    RemoteError { message: e.to_string(), trace: None, other: Map::new() }
}

fn encode_reply<R: Serialize>(r: &R) -> Reply {
    to_value_with_locals(r).map_err(|e| remote_error(format!("cannot encode the result: {e}")))
}

/// Something that can serve as a function: `async` closures (or functions returning futures)
/// of up to eight serde-typed arguments returning `Result<R, E>` where `R: Serialize` and
/// `E: Display`. Keyword arguments arrive as one extra map argument after the positional ones
/// (so a one-argument function taking a struct accepts `f(a=1, b=2)` from Python); missing
/// trailing arguments are `Nil` (use `Option<T>` for optional ones).
///
/// `M` is a marker that lets one trait cover every arity; you never name it.
pub trait Handler<M>: Send + Sync + Sized + 'static {
    /// The type-erased handler.
    #[doc(hidden)]
    fn into_dyn(self) -> Arc<dyn DynHandler>;
}

/// A [`Handler`] whose first argument is the trusted [`Context`].
pub trait ContextHandler<M>: Send + Sync + Sized + 'static {
    /// The type-erased handler.
    #[doc(hidden)]
    fn into_dyn(self) -> Arc<dyn DynHandler>;
}

struct Erased<F, M> {
    f: F,
    _m: std::marker::PhantomData<fn() -> M>,
}

struct ErasedCtx<F, M> {
    f: F,
    _m: std::marker::PhantomData<fn() -> M>,
}

fn arity_error(want: usize, got: usize) -> RemoteError {
    remote_error(format!(
        "the function takes {want} argument(s) but {got} were given (keyword arguments count as one map)"
    ))
}

/// Positional arguments decoded into a tuple of serde types (one impl per arity).
trait DecodeArgs: Sized {
    fn decode(args: Vec<Value>, incoming: &Option<Incoming>) -> core::result::Result<Self, RemoteError>;
}

/// Awaits a user function's future and turns its outcome into a reply.
fn respond<Fut, R, E>(fut: Fut) -> BoxFuture<'static, Reply>
where
    Fut: Future<Output = core::result::Result<R, E>> + Send + 'static,
    R: Serialize + 'static,
    E: fmt::Display + 'static,
{
    Box::pin(async move {
        match fut.await {
            Ok(r) => encode_reply(&r),
            Err(e) => Err(remote_error(e)),
        }
    })
}

fn fail(e: RemoteError) -> BoxFuture<'static, Reply> {
    Box::pin(async move { Err(e) })
}

macro_rules! handlers {
    ($($n:literal => ($($a:ident),*);)*) => {$(
        #[allow(non_snake_case, unused_variables, unused_mut)]
        impl<$($a: DeserializeOwned,)*> DecodeArgs for ($($a,)*) {
            fn decode(args: Vec<Value>, incoming: &Option<Incoming>) -> core::result::Result<Self, RemoteError> {
                if args.len() > $n {
                    return Err(arity_error($n, args.len()));
                }
                let mut it = args.into_iter().enumerate();
                $(
                    let (i, v) = it.next().unwrap_or(($n, Value::Nil));
                    let $a: $a = decode_arg(i, &v, incoming)?;
                )*
                Ok(($($a,)*))
            }
        }

        #[allow(non_snake_case)]
        impl<F, Fut, R, E, $($a,)*> DynHandler for Erased<F, (Fut, R, E, $($a,)*)>
        where
            F: Fn($($a),*) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = core::result::Result<R, E>> + Send + 'static,
            R: Serialize + 'static,
            E: fmt::Display + 'static,
            $($a: DeserializeOwned + 'static,)*
        {
            fn call(&self, call: Call) -> BoxFuture<'static, Reply> {
                let (args, incoming, _) = call.into_flat();
                match <($($a,)*)>::decode(args, &incoming) {
                    Ok(($($a,)*)) => respond((self.f)($($a),*)),
                    Err(e) => fail(e),
                }
            }
        }

        impl<F, Fut, R, E, $($a,)*> Handler<(Fut, R, E, $($a,)*)> for F
        where
            F: Fn($($a),*) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = core::result::Result<R, E>> + Send + 'static,
            R: Serialize + 'static,
            E: fmt::Display + 'static,
            $($a: DeserializeOwned + 'static,)*
        {
            fn into_dyn(self) -> Arc<dyn DynHandler> {
                Arc::new(Erased::<F, (Fut, R, E, $($a,)*)> { f: self, _m: std::marker::PhantomData })
            }
        }

        #[allow(non_snake_case)]
        impl<F, Fut, R, E, $($a,)*> DynHandler for ErasedCtx<F, (Fut, R, E, $($a,)*)>
        where
            F: Fn(Context, $($a),*) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = core::result::Result<R, E>> + Send + 'static,
            R: Serialize + 'static,
            E: fmt::Display + 'static,
            $($a: DeserializeOwned + 'static,)*
        {
            fn call(&self, call: Call) -> BoxFuture<'static, Reply> {
                let (args, incoming, context) = call.into_flat();
                let Some(context) = context else {
                    return fail(remote_error("no trusted context was given for a function that requires it"));
                };
                match <($($a,)*)>::decode(args, &incoming) {
                    Ok(($($a,)*)) => respond((self.f)(context, $($a),*)),
                    Err(e) => fail(e),
                }
            }
        }

        impl<F, Fut, R, E, $($a,)*> ContextHandler<(Context, Fut, R, E, $($a,)*)> for F
        where
            F: Fn(Context, $($a),*) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = core::result::Result<R, E>> + Send + 'static,
            R: Serialize + 'static,
            E: fmt::Display + 'static,
            $($a: DeserializeOwned + 'static,)*
        {
            fn into_dyn(self) -> Arc<dyn DynHandler> {
                Arc::new(ErasedCtx::<F, (Fut, R, E, $($a,)*)> { f: self, _m: std::marker::PhantomData })
            }
        }
    )*};
}

handlers! {
    0 => ();
    1 => (A1);
    2 => (A1, A2);
    3 => (A1, A2, A3);
    4 => (A1, A2, A3, A4);
    5 => (A1, A2, A3, A4, A5);
    6 => (A1, A2, A3, A4, A5, A6);
    7 => (A1, A2, A3, A4, A5, A6, A7);
    8 => (A1, A2, A3, A4, A5, A6, A7, A8);
}

/// Decodes argument `index` (0-based) into `T`, with an error naming both.
fn decode_arg<T: DeserializeOwned>(
    index: usize,
    v: &Value,
    incoming: &Option<Incoming>,
) -> core::result::Result<T, RemoteError> {
    let r = match incoming {
        Some(i) => from_value_in(v, i),
        None => crate::values::from_value(v),
    };
    r.map_err(|e| {
        let want = std::any::type_name::<T>();
        remote_error(format!("argument {} should be {want}, got {}: {e}", index + 1, v.kind()))
    })
}

/// A handler whose parameters have names: keyword arguments become positional ones.
struct Named {
    names: Vec<String>,
    inner: Arc<dyn DynHandler>,
}

impl DynHandler for Named {
    fn call(&self, mut call: Call) -> BoxFuture<'static, Reply> {
        if let Some(mut kwargs) = call.kwargs.take() {
            for name in self.names.iter().skip(call.args.len()) {
                let v = kwargs.remove(name).unwrap_or(Value::Nil);
                call.args.push(v);
            }
            if let Some((k, _)) = kwargs.iter().next() {
                let k = k.as_str().unwrap_or("?");
                let e = if self.names.iter().any(|n| n == k) {
                    remote_error(format!("got multiple values for argument {k}"))
                } else {
                    remote_error(format!(
                        "unexpected keyword argument {k} (parameters: {})",
                        self.names.join(", ")
                    ))
                };
                return fail(e);
            }
        }
        self.inner.call(call)
    }
}

struct Raw<F>(F);

impl<F, Fut, R, E> DynHandler for Raw<F>
where
    F: Fn(Call) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = core::result::Result<R, E>> + Send + 'static,
    R: Serialize + 'static,
    E: fmt::Display + 'static,
{
    fn call(&self, call: Call) -> BoxFuture<'static, Reply> {
        respond((self.0)(call))
    }
}

/// A service to register: an id, some settings, and functions at dotted paths.
///
/// ```
/// use hypha_rpc::{Service, Visibility};
/// let svc = Service::new("hello")
///     .name("Hello service")
///     .visibility(Visibility::Public)
///     .function("greet", |name: String| async move { Ok::<_, hypha_rpc::Error>(format!("Hello, {name}!")) })
///     .function("math.add", |a: i64, b: i64| async move { Ok::<_, hypha_rpc::Error>(a + b) })
///     .function_with_context("whoami", |ctx: hypha_rpc::Context| async move {
///         Ok::<_, hypha_rpc::Error>(ctx.from)
///     });
/// assert_eq!(svc.id(), "hello");
/// ```
pub struct Service {
    pub(crate) spec: ServiceSpec,
    pub(crate) handlers: HashMap<String, Arc<dyn DynHandler>>,
    with_context: Vec<String>,
    last: Option<String>,
}

impl Service {
    /// A service with id `id` (no `/` or `:`).
    pub fn new(id: impl Into<String>) -> Self {
        Service { spec: ServiceSpec::new(id), handlers: HashMap::new(), with_context: Vec::new(), last: None }
    }
    /// The service id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }
    /// The display name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.spec = self.spec.name(name);
        self
    }
    /// The description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.spec = self.spec.description(d);
        self
    }
    /// Who may call it (default: protected, i.e. the workspace).
    pub fn visibility(mut self, v: Visibility) -> Self {
        self.spec = self.spec.visibility(v);
        self
    }
    /// Only encrypted calls from these public keys (64 hex characters each) get in (Python:
    /// `config.trusted_keys`); others get Python's error ("Encryption required ..." or
    /// "Caller's public key is not in the trusted keys list ..."). An empty list is refused at
    /// registration (Python would read it as "no restriction"): omit it, or list keys.
    pub fn trusted_keys<S: Into<String>>(mut self, keys: impl IntoIterator<Item = S>) -> Self {
        self.spec = self.spec.trusted_keys(keys);
        self
    }
    /// Adds a function at a dotted `path` (`"greet"`, `"math.add"`).
    pub fn function<M, F: Handler<M>>(self, path: &str, f: F) -> Self {
        self.add(path, f.into_dyn(), None)
    }
    /// Adds a function with a doc string (Python's `__doc__`).
    pub fn function_doc<M, F: Handler<M>>(self, path: &str, doc: &str, f: F) -> Self {
        self.add(path, f.into_dyn(), Some(doc))
    }
    /// Adds a function whose first argument is the trusted [`Context`] of each call (the
    /// service then asks the caller's server for it, `require_context`).
    pub fn function_with_context<M, F: ContextHandler<M>>(mut self, path: &str, f: F) -> Self {
        self.with_context.push(path.to_string());
        self.spec = self.spec.require_context(RequireContext::Functions(self.with_context.clone()));
        self.add(path, f.into_dyn(), None)
    }
    /// Adds a function that receives the raw [`Call`] (untyped arguments, kwargs, context).
    pub fn function_raw<F, Fut, R, E>(self, path: &str, f: F) -> Self
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = core::result::Result<R, E>> + Send + 'static,
        R: Serialize + 'static,
        E: fmt::Display + 'static,
    {
        self.add(path, Arc::new(Raw(f)), None)
    }
    /// Adds a function for LLM tool calling (Python's `schema_function`): its keyword
    /// arguments are the fields of `A`, and its `__schema__` is generated from `A` with
    /// `schemars` (the description from `A`'s doc comment, parameter descriptions from the
    /// fields'). Python sees it as the proxy's `__schema__`; the server's MCP/LLM views read
    /// it from the registration's `service_schema`.
    ///
    /// ```
    /// use hypha_rpc::Service;
    /// /// Add two numbers.
    /// #[derive(schemars::JsonSchema, serde::Deserialize)]
    /// struct Add {
    ///     /// The first number.
    ///     a: f64,
    ///     /// The second number.
    ///     b: f64,
    /// }
    /// let svc = Service::new("calc").schema_function("add", |x: Add| async move { Ok::<_, String>(x.a + x.b) });
    /// # let _ = svc;
    /// ```
    pub fn schema_function<A, F, Fut, R, E>(self, path: &str, f: F) -> Self
    where
        A: schemars::JsonSchema + DeserializeOwned + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = core::result::Result<R, E>> + Send + 'static,
        R: Serialize + 'static,
        E: fmt::Display + 'static,
    {
        let name = path.rsplit('.').next().unwrap_or(path).to_string();
        let schema = crate::schema::function_schema::<A>(&name, None);
        let s = self.function(path, f);
        match schema {
            Ok(schema) => s.schema(schema),
            Err(e) => {
                tracing::warn!(path, error = %e, "no schema for this function");
                s
            }
        }
    }
    /// Sets the `__schema__` (`{name, description, parameters}`) of the function added last.
    pub fn schema(mut self, schema: Value) -> Self {
        if let Some(path) = self.last.clone() {
            let name = path.rsplit('.').next().unwrap_or(&path).to_string();
            let doc =
                schema.as_map().and_then(|m| m.get("description")).and_then(Value::as_str).map(String::from);
            let mut f = FunctionSpec::new(name).schema(schema);
            if let Some(d) = doc {
                f = f.doc(d);
            }
            self.spec = self.spec.function(&path, f);
        }
        self
    }
    /// Names the parameters of the function added last, so callers may pass them by keyword
    /// (Python `svc.add(40, b=2)`): keyword arguments fill the named positions after the
    /// positional ones, and an unknown keyword is an error, as in Python. Without names,
    /// keyword arguments arrive as one trailing map.
    ///
    /// ```
    /// use hypha_rpc::Service;
    /// let svc = Service::new("math")
    ///     .function("add", |a: i64, b: i64| async move { Ok::<_, String>(a + b) })
    ///     .arg_names(&["a", "b"]);
    /// # let _ = svc;
    /// ```
    pub fn arg_names(mut self, names: &[&str]) -> Self {
        if let Some(path) = self.last.clone() {
            if let Some(h) = self.handlers.remove(&path) {
                let names = names.iter().map(|n| n.to_string()).collect();
                self.handlers.insert(path, Arc::new(Named { names, inner: h }));
            }
        }
        self
    }
    /// Adds a plain value at `path` (served as data in the service description).
    pub fn value(mut self, path: &str, v: impl Into<Value>) -> Self {
        self.spec = self.spec.value(path, v);
        self
    }
    /// Passes the trusted context to every function (each raw or context handler gets it).
    pub fn require_context(mut self, all: bool) -> Self {
        let r = if all { RequireContext::All } else { RequireContext::Functions(self.with_context.clone()) };
        self.spec = self.spec.require_context(r);
        self
    }
    fn add(mut self, path: &str, h: Arc<dyn DynHandler>, doc: Option<&str>) -> Self {
        let mut f = FunctionSpec::new(path.rsplit('.').next().unwrap_or(path));
        if let Some(d) = doc {
            f = f.doc(d);
        }
        self.spec = self.spec.function(path, f);
        self.handlers.insert(path.to_string(), h);
        self.last = Some(path.to_string());
        self
    }
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service").field("spec", &self.spec).finish()
    }
}

pub(crate) fn unknown(service: &str, method: &str) -> Error {
    Error::NoSuchMethod { service: service.into(), method: method.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(h: &Arc<dyn DynHandler>, args: Vec<Value>, kwargs: &[(&str, i64)]) -> Result<Value, String> {
        let kwargs = (!kwargs.is_empty()).then(|| {
            let mut m = Map::new();
            for (k, v) in kwargs {
                m.insert(*k, *v);
            }
            m
        });
        let call = Call { args, kwargs, context: None, incoming: None };
        futures::executor::block_on(h.call(call)).map(|(v, _)| v).map_err(|e| e.message)
    }

    #[test]
    fn named_parameters_take_keyword_arguments_like_python() {
        let svc = Service::new("m")
            .function("sub", |a: i64, b: i64| async move { Ok::<_, String>(a - b) })
            .arg_names(&["a", "b"])
            .function("opt", |a: i64, b: Option<i64>| async move { Ok::<_, String>(a + b.unwrap_or(100)) })
            .arg_names(&["a", "b"]);
        let sub = &svc.handlers["sub"];
        assert_eq!(run(sub, vec![10.into(), 3.into()], &[]), Ok(7.into()));
        assert_eq!(run(sub, vec![10.into()], &[("b", 3)]), Ok(7.into()));
        assert_eq!(run(sub, vec![], &[("b", 3), ("a", 10)]), Ok(7.into()), "order of keywords is free");
        let e = run(sub, vec![10.into()], &[("a", 1)]).unwrap_err();
        assert!(e.contains("multiple values for argument a"), "{e}");
        let e = run(sub, vec![10.into()], &[("c", 1)]).unwrap_err();
        assert!(e.contains("unexpected keyword argument c"), "{e}");
        let opt = &svc.handlers["opt"];
        assert_eq!(run(opt, vec![], &[("a", 1)]), Ok(101.into()), "a missing keyword is None");
    }

    #[test]
    fn without_names_keywords_are_one_trailing_map() {
        #[derive(serde::Deserialize)]
        struct Opts {
            x: i64,
            y: i64,
        }
        let svc = Service::new("m").function("f", |o: Opts| async move { Ok::<_, String>(o.x * o.y) });
        assert_eq!(run(&svc.handlers["f"], vec![], &[("x", 6), ("y", 7)]), Ok(42.into()));
        let e = run(&svc.handlers["f"], vec![1.into()], &[("x", 6), ("y", 7)]).unwrap_err();
        assert!(e.contains("takes 1 argument(s) but 2 were given"), "{e}");
    }
}
