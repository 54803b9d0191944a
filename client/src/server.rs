//! The handles users hold: [`Server`] (one connection to a Hypha server) and
//! [`ServiceProxy`] (a remote service).

use std::fmt;
use std::sync::Arc;

use futures::stream::Stream;
use hypha_rpc_core::codec::rtype::{Method, RTypeCodec};
use hypha_rpc_core::{ConnectionInfo, Map, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::ServerConfig;
use crate::driver::{ConnectionState, Inner, encode_args};
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use crate::service::Service;
use crate::values::{Locals, RemoteFunction};

/// A connection to a Hypha server. Cheap to clone; every clone is the same connection. It
/// reconnects by itself after a drop (see [`Server::connection_states`]) until
/// [`Server::disconnect`]. Dropping the handles does not disconnect (the background task keeps
/// serving the registered services, which often hold a handle themselves): call
/// `disconnect()` to end it.
#[derive(Clone)]
pub struct Server {
    pub(crate) inner: Arc<Inner>,
    pub(crate) info: Arc<ConnectionInfo>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Server({}/{})", self.info.workspace, self.info.client_id)
    }
}

/// Connects with the given runtime; the runtime crates wrap this as `connect_to_server`.
pub async fn connect_with_runtime(runtime: Arc<dyn Runtime>, config: ServerConfig) -> Result<Server> {
    #[cfg(feature = "webrtc")]
    let webrtc = (config.webrtc, config.webrtc_config.clone());
    let (inner, info) = Inner::connect(runtime, config).await?;
    let server = Server { inner, info: Arc::new(info) };
    #[cfg(feature = "webrtc")]
    {
        use crate::rtc::WebRtc;
        let (mode, rtc_config) = webrtc;
        if mode != WebRtc::Off {
            // As Python: `<client_id>-rtc`, so that `get_service_with` finds it from any id.
            let id = format!("{}-rtc", server.client_id());
            match server.register_rtc_service(&id, rtc_config).await {
                Ok(_) => {}
                Err(e) if mode == WebRtc::Auto => {
                    tracing::warn!(error = %e, "webrtc: could not register {id}; serving over the websocket only")
                }
                Err(e) => {
                    server.disconnect().await;
                    return Err(e);
                }
            }
        }
    }
    Ok(server)
}

impl Server {
    /// What the server said at the first handshake (workspace, client id, server URL, ...).
    pub fn connection_info(&self) -> &ConnectionInfo {
        &self.info
    }
    /// Our workspace.
    pub fn workspace(&self) -> &str {
        &self.info.workspace
    }
    /// Our client id.
    pub fn client_id(&self) -> &str {
        &self.info.client_id
    }

    /// Registers a service and returns its full id (`workspace/client:service`). It is
    /// registered again after every reconnection. A service with the same id is replaced.
    pub async fn register_service(&self, service: Service) -> Result<String> {
        let Service { spec, handlers, .. } = service;
        let id = spec.id.clone();
        let rx = {
            let mut s = self.inner.lock();
            s.services.insert(id.clone(), Arc::new(handlers));
            drop(s);
            self.inner.start(Locals::default(), |e, now| e.register_service(now, spec))
        };
        let rx = match rx {
            Ok(rx) => rx,
            Err(e) => {
                self.inner.lock().services.remove(&id);
                return Err(e);
            }
        };
        let info = Inner::settle(rx).await?;
        let full = info.as_map().and_then(|m| m.get("id")).and_then(Value::as_str).map(String::from);
        Ok(full.unwrap_or_else(|| format!("{}/{}:{id}", self.info.workspace, self.info.client_id)))
    }

    /// Stops serving a service (by its local id, as given to [`Service::new`]).
    pub async fn unregister_service(&self, id: &str) -> Result<()> {
        let local = id.rsplit(':').next().unwrap_or(id).to_string();
        let rx = self.inner.start(Locals::default(), |e, now| e.unregister_service(now, &local))?;
        self.inner.lock().services.remove(&local);
        Inner::settle(rx).await?;
        Ok(())
    }

    /// Gets a remote service by id: `svc`, `client:svc`, `ws/client:svc`, `svc@app`.
    pub async fn get_service(&self, id: &str) -> Result<ServiceProxy> {
        let rx = self.inner.start(Locals::default(), |e, now| e.get_service(now, id, None))?;
        let v = Inner::settle(rx).await?;
        ServiceProxy::from_value(self.inner.clone(), v, id)
    }

    /// Gets a remote service whose calls are end-to-end encrypted for `public_key` (the
    /// provider's `get_public_key()`, 64 hex characters, obtained out of band; Python:
    /// `get_service(id, {"encryption_public_key": key})`). Arguments, results, errors,
    /// callbacks and large messages are sealed; the server sees only the routing header.
    /// Needs [`ServerConfig::encryption`].
    ///
    /// A Python provider sends generator items in clear even inside an encrypted session
    /// (hypha-rpc 0.21.47); between Rust peers they are sealed too.
    pub async fn get_encrypted_service(&self, id: &str, public_key: &str) -> Result<ServiceProxy> {
        let key = hypha_rpc_core::crypto::key_from_hex(public_key).ok_or_else(|| {
            Error::Engine(hypha_rpc_core::EngineError::Encryption(format!(
                "public key {public_key:?} is not 64 hex characters"
            )))
        })?;
        if self.get_public_key().is_none() {
            return Err(Error::Engine(hypha_rpc_core::EngineError::Encryption(
                "encryption is off: connect with ServerConfig::encryption(true)".into(),
            )));
        }
        let mut proxy = self.get_service(id).await?;
        attach_key(&mut proxy.info, &key);
        Ok(proxy)
    }

    /// Our encryption public key (64 hex characters) when encryption is on (Python:
    /// `get_public_key()`). Give it to callers so they can reach us encrypted, and list
    /// callers' keys in [`Service::trusted_keys`](crate::Service::trusted_keys).
    pub fn get_public_key(&self) -> Option<String> {
        self.inner.lock().engine.public_key().map(|k| hypha_rpc_core::crypto::to_hex(&k))
    }

    /// Calls a method of the workspace manager (`echo`, `list_services`, `generate_token`,
    /// `list_clients`, ...) with positional arguments (a tuple) and keyword arguments (a map
    /// or `()`).
    pub async fn call_manager<T: DeserializeOwned>(
        &self,
        name: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T> {
        let (args, kwargs, locals) = encode_args(&args, Some(&kwargs))?;
        let rx = self.inner.start(locals, |e, now| e.call_manager(now, name, args, kwargs))?;
        let v = Inner::settle(rx).await?;
        self.inner.decode(&v)
    }

    /// The services visible to us (the manager's `list_services`), as maps with `id`, `name`,
    /// `type`, `description`, ...
    pub async fn list_services(&self) -> Result<Vec<Map>> {
        let v: Value = self.call_manager_value("list_services", Vec::new()).await?;
        match v {
            Value::Array(a) => {
                Ok(a.into_iter().filter_map(|x| if let Value::Map(m) = x { Some(m) } else { None }).collect())
            }
            other => Err(Error::Decode(format!("list_services returned {}", other.kind()))),
        }
    }

    /// A token for this workspace (the manager's `generate_token`), with an optional config
    /// (`expires_in`, `permission`, ...).
    pub async fn generate_token(&self, config: Option<Map>) -> Result<String> {
        let args = config.map(Value::Map).into_iter().collect();
        let v = self.call_manager_value("generate_token", args).await?;
        v.as_str()
            .map(String::from)
            .ok_or_else(|| Error::Decode("generate_token did not return a string".into()))
    }

    /// Sends `value` through the server and back (the manager's `echo`).
    pub async fn echo<T: Serialize + DeserializeOwned>(&self, value: &T) -> Result<T> {
        self.call_manager("echo", (value,), ()).await
    }

    async fn call_manager_value(&self, name: &str, args: Vec<Value>) -> Result<Value> {
        let rx = self.inner.start(Locals::default(), |e, now| e.call_manager(now, name, args, None))?;
        Inner::settle(rx).await
    }

    /// Connection state changes from now on: disconnections, reconnection attempts with their
    /// delay, reconnections (after which our services are registered again), and the end.
    pub fn connection_states(&self) -> impl Stream<Item = ConnectionState> + Send + Unpin + use<> {
        self.inner.subscribe()
    }

    /// Calls waiting for a reply (diagnostics).
    pub fn pending_calls(&self) -> usize {
        self.inner.lock().engine.pending_calls()
    }

    /// Closes the connection for good: pending calls fail with a "closed" error, our services
    /// disappear from the server, and no reconnection happens. Waits until done.
    pub async fn disconnect(&self) {
        self.inner.shutdown().await;
    }
}

/// Puts `_renc_pub` on every function descriptor of a service map (Python attaches the key to
/// every function proxy).
pub(crate) fn attach_key(m: &mut Map, key: &[u8; 32]) {
    let is_method = m.get("_rtype").and_then(Value::as_str) == Some("method");
    if is_method {
        m.insert("_renc_pub", Value::bin(bytes::Bytes::copy_from_slice(key)));
        return;
    }
    for (_, v) in m.iter_mut() {
        if let Value::Map(inner) = v {
            attach_key(inner, key);
        }
    }
}

/// A remote service, as [`Server::get_service`] returns it: call its functions by path.
#[derive(Clone)]
pub struct ServiceProxy {
    client: Arc<Inner>,
    id: String,
    pub(crate) info: Map,
}

impl fmt::Debug for ServiceProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceProxy({})", self.id)
    }
}

impl ServiceProxy {
    pub(crate) fn from_value(client: Arc<Inner>, v: Value, asked: &str) -> Result<Self> {
        let Value::Map(info) = v else {
            return Err(Error::Decode(format!("get_service returned {}, not a service", v.kind())));
        };
        let id = info.get("id").and_then(Value::as_str).unwrap_or(asked).to_string();
        Ok(ServiceProxy { client, id, info })
    }
    /// The full service id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The whole service description (functions are `_rtype: method` maps).
    pub fn info(&self) -> &Map {
        &self.info
    }
    /// The dotted paths of its functions.
    pub fn functions(&self) -> Vec<String> {
        fn walk(prefix: &str, m: &Map, out: &mut Vec<String>) {
            for (k, v) in m.iter() {
                let Some(k) = k.as_str() else { continue };
                let path = if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
                match v {
                    Value::Map(_) if v.rtype() == Some("method") => out.push(path),
                    Value::Map(inner) if v.rtype().is_none() => walk(&path, inner, out),
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk("", &self.info, &mut out);
        out
    }
    /// The function at dotted `path`, as a callable handle.
    pub fn function(&self, path: &str) -> Result<RemoteFunction> {
        let mut cur = &self.info;
        let mut parts = path.split('.').peekable();
        while let Some(p) = parts.next() {
            let v = cur.get(p).ok_or_else(|| crate::service::unknown(&self.id, path))?;
            if parts.peek().is_none() {
                let method = Method::from_value(v)
                    .ok_or_else(|| crate::service::unknown(&self.id, path))?
                    .map_err(|e| Error::Decode(e.to_string()))?;
                return Ok(RemoteFunction { client: self.client.clone(), method, parent: None });
            }
            cur = v.as_map().ok_or_else(|| crate::service::unknown(&self.id, path))?;
        }
        Err(crate::service::unknown(&self.id, path))
    }
    /// The `__schema__` of function `path` (`{name, description, parameters}`), when the
    /// provider gave it one (Python `schema_function`, or [`Service::schema_function`]).
    pub fn schema(&self, path: &str) -> Option<Value> {
        self.function(path).ok().and_then(|f| f.method.schema)
    }
    /// Calls function `path` with positional arguments (a tuple: `("Ada",)`, `(1, 2)`, or
    /// `()`), converting the result to `T`.
    pub async fn call<T: DeserializeOwned>(&self, path: &str, args: impl Serialize) -> Result<T> {
        self.function(path)?.call(args).await
    }
    /// Calls with positional and keyword arguments (any `Serialize` map or struct).
    pub async fn call_with_kwargs<T: DeserializeOwned>(
        &self,
        path: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T> {
        self.function(path)?.call_with_kwargs(args, kwargs).await
    }
    /// Calls with untyped arguments; the result as a [`Value`].
    pub async fn call_value(&self, path: &str, args: Vec<Value>, kwargs: Option<Map>) -> Result<Value> {
        self.function(path)?.call_value(args, kwargs).await
    }
}

impl<'de> Deserialize<'de> for ServiceProxy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> core::result::Result<Self, D::Error> {
        let (v, client) = crate::values::deserialize_bound(d, "service")?;
        ServiceProxy::from_value(client, v, "").map_err(serde::de::Error::custom)
    }
}
