//! The async Hypha RPC client: connect to a Hypha server, register services built from Rust
//! closures, and call remote services with serde-typed arguments — callbacks, generators
//! (as [`Stream`](futures::Stream)s) and `_rintf` interfaces included.
//!
//! This crate holds everything that does not depend on the async runtime: the driver that
//! runs the sans-IO [`hypha_rpc_core::Engine`], the websocket transport (async-tungstenite
//! with rustls), reconnection, and the user API. Use it through `hypha-rpc-tokio` or
//! `hypha-rpc-smol`, which supply a [`runtime::Runtime`] and `connect_to_server`:
//!
//! ```no_run
//! # async fn demo(server: hypha_rpc::Server) -> hypha_rpc::Result<()> {
//! use hypha_rpc::Service;
//! // let server = hypha_rpc_tokio::connect_to_server(ServerConfig::new("http://127.0.0.1:9527")).await?;
//! let id = server
//!     .register_service(Service::new("hello").function("greet", |name: String| async move {
//!         Ok::<_, hypha_rpc::Error>(format!("Hello, {name}!"))
//!     }))
//!     .await?;
//! let svc = server.get_service(&id).await?;
//! let s: String = svc.call("greet", ("Ada",)).await?;
//! assert_eq!(s, "Hello, Ada!");
//! # Ok(()) }
//! ```
//!
//! # Data
//! Arguments and results go through serde with msgpack semantics: structs become maps with
//! named fields, tuples and `Vec`s lists, `Option::None` is `None`. Use
//! [`serde_bytes::ByteBuf`] for `bytes`. Positional arguments are a tuple (`("Ada",)`, `(1, 2)`,
//! `()`); keyword arguments any map or struct. [`Value`] is the untyped form.
//!
//! Logging goes through `tracing`; errors are one [`Error`] enum.
#![deny(unsafe_code)] // one audited exception: `ndarray::cast_slice` (feature `ndarray`)
#![warn(missing_docs)]

pub mod codec;
pub mod config;
mod de;
mod driver;
mod error;
pub mod login;
#[cfg(feature = "ndarray")]
pub mod ndarray;
#[cfg(feature = "webrtc")]
pub mod rtc;
pub mod runtime;
pub mod schema;
mod server;
mod service;
mod values;
mod ws;

pub use config::ServerConfig;
pub use driver::ConnectionState;
pub use error::{Error, Result};
pub use hypha_rpc_core::service::Visibility;
pub use hypha_rpc_core::{CallError, ConnectError, ConnectionInfo, Context, EngineError, Limits, Map, Value};
pub use login::{LoginConfig, LoginInfo, LoginProfile, login_profile_with_runtime, login_with_runtime};
pub use serde_bytes;
pub use server::{Server, ServiceProxy, connect_with_runtime};
pub use service::{Call, ContextHandler, Handler, Service};
pub use values::{
    Callback, Generator, Interface, RemoteFunction, RemoteGenerator, RemoteInterface, check_sendable,
    from_value, to_value,
};
