//! Sans-IO core of the Hypha RPC protocol: the value model and the wire codec that every
//! transport and executor of this project shares.
//!
//! This crate never touches a socket, a clock or a thread. It is `#![no_std]` and needs only
//! `alloc`; the `std` feature adds `std::error::Error` impls and conversions to and from
//! [`rmpv::Value`](https://docs.rs/rmpv).
//!
//! # Layers
//! - [`value`]: [`Value`], our own msgpack value tree (ordered maps, non-string keys, ext).
//! - [`codec`]: bounded msgpack decoding and Python-identical encoding of [`Value`]s,
//!   two-object binary [`Frame`](codec::Frame)s, and typed views of every `_rtype`.
//! - [`limits`]: [`Limits`], the one place where every cap on untrusted input lives.
//!
//! ```
//! use hypha_rpc_core::codec::{Frame, encode_frame, decode_frame};
//! use hypha_rpc_core::{Limits, Map, Value};
//!
//! let mut main = Map::new();
//! main.insert("type", "method");
//! main.insert("to", "ws-1/peer");
//! main.insert("method", "services.hello.greet");
//! let mut extra = Map::new();
//! extra.insert("args", Value::Array(vec!["Ada".into()]));
//! let frame = Frame { main, extra: Some(extra) };
//!
//! let bytes = encode_frame(&frame);
//! let back = decode_frame(&bytes, &Limits::default()).unwrap();
//! assert_eq!(back, frame);
//! ```
#![no_std]
#![deny(unsafe_code)] // one audited exception: `value::Str::as_str`
#![warn(missing_docs)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub(crate) mod chunk;
pub mod codec;
pub mod connection;
pub mod crypto;
pub mod engine;
pub mod error;
pub mod event;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod generator;
mod json;
pub mod limits;
mod rng;
#[cfg(feature = "serde")]
mod serde_impl;
pub mod service;
pub mod time;
pub mod value;
mod vecmap;

pub use connection::ConnectionInfo;
pub use engine::{CallOptions, Engine, EngineConfig, PeerLink};
pub use error::{CallError, ConnectError, EngineError, InputError};
pub use event::{CallId, Context, Event, FnId, GenId, Invocation, InvokeId, InvokeTarget, Transmit};
pub use generator::GeneratorReader;
pub use limits::Limits;
pub use service::{FunctionSpec, RequireContext, ServiceSpec, Visibility};
pub use value::{Integer, Map, Str, Value};
