//! A blocking wrapper for programs without async code (Python: `hypha_rpc.sync`): it owns a
//! small tokio runtime on a background thread and blocks the caller on each operation.
//! Service functions are still `async` closures; they run on that runtime.
//!
//! ```no_run
//! use hypha_rpc_tokio::blocking;
//! use hypha_rpc_tokio::{Service, ServerConfig};
//!
//! let server = blocking::connect_to_server(ServerConfig::new("http://127.0.0.1:9527")).unwrap();
//! let id = server
//!     .register_service(Service::new("hello").function("greet", |name: String| async move {
//!         Ok::<_, hypha_rpc_tokio::Error>(format!("Hello, {name}!"))
//!     }))
//!     .unwrap();
//! let svc = server.get_service(&id).unwrap();
//! let s: String = svc.call("greet", ("Ada",)).unwrap();
//! assert_eq!(s, "Hello, Ada!");
//! server.disconnect();
//! ```

use std::sync::Arc;

use hypha_rpc::{Map, Result, ServerConfig, Service, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A blocking [`Server`](hypha_rpc::Server).
#[derive(Clone, Debug)]
pub struct Server {
    rt: Arc<tokio::runtime::Runtime>,
    inner: hypha_rpc::Server,
}

/// A blocking [`ServiceProxy`](hypha_rpc::ServiceProxy).
#[derive(Clone, Debug)]
pub struct ServiceProxy {
    rt: Arc<tokio::runtime::Runtime>,
    inner: hypha_rpc::ServiceProxy,
}

/// Connects (blocking). Must not be called from inside an async runtime.
pub fn connect_to_server(config: ServerConfig) -> Result<Server> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("hypha-rpc")
        .enable_all()
        .build()
        .map_err(|e| hypha_rpc::Error::Transport(format!("cannot start the runtime: {e}")))?;
    let rt = Arc::new(rt);
    let inner = rt.block_on(crate::connect_to_server(config))?;
    Ok(Server { rt, inner })
}

impl Server {
    /// The async handle, for code that mixes both.
    pub fn as_async(&self) -> &hypha_rpc::Server {
        &self.inner
    }
    /// See [`hypha_rpc::Server::register_service`].
    pub fn register_service(&self, service: Service) -> Result<String> {
        self.rt.block_on(self.inner.register_service(service))
    }
    /// See [`hypha_rpc::Server::unregister_service`].
    pub fn unregister_service(&self, id: &str) -> Result<()> {
        self.rt.block_on(self.inner.unregister_service(id))
    }
    /// See [`hypha_rpc::Server::get_service`].
    pub fn get_service(&self, id: &str) -> Result<ServiceProxy> {
        let inner = self.rt.block_on(self.inner.get_service(id))?;
        Ok(ServiceProxy { rt: self.rt.clone(), inner })
    }
    /// See [`hypha_rpc::Server::list_services`].
    pub fn list_services(&self) -> Result<Vec<Map>> {
        self.rt.block_on(self.inner.list_services())
    }
    /// See [`hypha_rpc::Server::generate_token`].
    pub fn generate_token(&self, config: Option<Map>) -> Result<String> {
        self.rt.block_on(self.inner.generate_token(config))
    }
    /// See [`hypha_rpc::Server::echo`].
    pub fn echo<T: Serialize + DeserializeOwned>(&self, value: &T) -> Result<T> {
        self.rt.block_on(self.inner.echo(value))
    }
    /// See [`hypha_rpc::Server::disconnect`].
    pub fn disconnect(&self) {
        self.rt.block_on(self.inner.disconnect())
    }
}

impl ServiceProxy {
    /// See [`hypha_rpc::ServiceProxy::call`].
    pub fn call<T: DeserializeOwned>(&self, path: &str, args: impl Serialize) -> Result<T> {
        self.rt.block_on(self.inner.call(path, args))
    }
    /// See [`hypha_rpc::ServiceProxy::call_with_kwargs`].
    pub fn call_with_kwargs<T: DeserializeOwned>(
        &self,
        path: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
    ) -> Result<T> {
        self.rt.block_on(self.inner.call_with_kwargs(path, args, kwargs))
    }
    /// See [`hypha_rpc::ServiceProxy::call_value`].
    pub fn call_value(&self, path: &str, args: Vec<Value>, kwargs: Option<Map>) -> Result<Value> {
        self.rt.block_on(self.inner.call_value(path, args, kwargs))
    }
}
