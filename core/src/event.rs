//! What the engine tells its driver: the one [`Event`] enum, the ids it carries, and the
//! outgoing [`Transmit`]s.

use alloc::string::String;
use alloc::vec::Vec;
use bytes::Bytes;

use crate::connection::ConnectionInfo;
use crate::error::{CallError, ConnectError};
use crate::{Map, Value};

/// Names one call we made; settles exactly once in [`Event::CallSettled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CallId(pub u64);

/// Names one incoming call we must answer with [`Engine::reply`](crate::Engine::reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InvokeId(pub u64);

/// Names a local function the driver passed in call arguments (see
/// [`local_function`](crate::engine::local_function)). Chosen by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FnId(pub u64);

/// Names a local generator the driver passed or returned (see
/// [`local_generator`](crate::engine::local_generator)). Chosen by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GenId(pub u64);

/// One whole websocket message for the driver to send, or a request to close the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// A JSON control message (handshake, ping, refresh_token).
    Text(String),
    /// A binary RPC frame.
    Binary(Bytes),
    /// Close the transport with this code and reason.
    Close {
        /// The websocket close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
}

/// Which local code an [`Invocation`] should run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvokeTarget {
    /// A function of a service we registered.
    Service {
        /// The local service id (`"hello"`).
        service: String,
        /// The function's dotted path inside the service (`"greet"`, `"nested.f"`).
        function: String,
    },
    /// A local function we passed as an argument of call `call`.
    Callback {
        /// The driver's id for the function.
        function: FnId,
        /// The call whose arguments carried it.
        call: CallId,
    },
    /// A local function we returned in a reply.
    Returned {
        /// The driver's id for the function.
        function: FnId,
    },
    /// A function of a `_rintf` interface we sent.
    Interface {
        /// The interface's service id (`_rintf_<id>`).
        service: String,
        /// The driver's id for the function.
        function: FnId,
    },
    /// The peer asks local generator `generator` for its next item. Reply with the item, or
    /// with [`StopIteration`](crate::codec::rtype::StopIteration)`.to_value()` at the end
    /// (the engine then forgets the generator); an error reply leaves it open, as in Python.
    GeneratorNext {
        /// The driver's id for the generator.
        generator: GenId,
    },
}

/// The trusted facts about an incoming call, all taken from the routing header the server
/// wrote (never from the payload a caller controls). Passed to functions that ask for it
/// (`require_context`).
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    /// The caller, `ws/client` (server-set).
    pub from: String,
    /// Us, `ws/client`.
    pub to: String,
    /// The caller's workspace (server-set).
    pub ws: String,
    /// The caller's user info (server-set), as the server sent it.
    pub user: Value,
    /// The method path that was called.
    pub method: String,
    /// The caller's session, when it expects a reply.
    pub session: Option<String>,
    /// The parent session, for calls of callbacks.
    pub parent: Option<String>,
    /// `"websocket"` (or `"webrtc"`).
    pub connection_type: &'static str,
    /// The caller's public key (64 hex characters) when the call arrived encrypted: the
    /// caller proved it holds the matching secret key.
    pub caller_public_key: Option<String>,
}

impl Context {
    /// The context as Python's hypha-rpc passes it: `{type, from, to, method, session?,
    /// parent?, ws, user, connection_type}`.
    pub fn to_value(&self) -> Value {
        let mut m = Map::with_capacity(9);
        m.push(Value::from_static("type"), Value::from_static("method"));
        m.push(Value::from_static("from"), self.from.as_str());
        m.push(Value::from_static("to"), self.to.as_str());
        m.push(Value::from_static("method"), self.method.as_str());
        if let Some(s) = &self.session {
            m.push(Value::from_static("session"), s.as_str());
        }
        if let Some(p) = &self.parent {
            m.push(Value::from_static("parent"), p.as_str());
        }
        m.push(Value::from_static("ws"), self.ws.as_str());
        m.push(Value::from_static("user"), self.user.clone());
        m.push(Value::from_static("connection_type"), self.connection_type);
        if let Some(k) = &self.caller_public_key {
            m.push(Value::from_static("encryption"), true);
            m.push(Value::from_static("caller_public_key"), k.as_str());
        }
        Value::Map(m)
    }
}

/// An incoming call for local code. Answer it with [`Engine::reply`](crate::Engine::reply)
/// (the engine sends nothing back until then, apart from heartbeats).
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// Pass it to `reply`.
    pub id: InvokeId,
    /// What to run.
    pub target: InvokeTarget,
    /// Positional arguments. Remote functions inside are `_rtype: "method"` maps with a
    /// qualified `_rtarget`; call them with `CallOptions::parent` set to `session`.
    pub args: Vec<Value>,
    /// Keyword arguments, when the caller sent any.
    pub kwargs: Option<Map>,
    /// The trusted context, when the function asked for it (`require_context`).
    pub context: Option<Context>,
    /// The caller, `ws/client` (server-set).
    pub caller: String,
    /// The caller's session: the `parent` for calls of functions found in `args`.
    pub session: Option<String>,
    /// `false` when the caller expects no reply (`reply` is then a no-op).
    pub wants_reply: bool,
}

/// Something that happened. Drain with [`Engine::poll_event`](crate::Engine::poll_event)
/// after every input.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The handshake succeeded and our `built-in` service is registered: calls and
    /// registrations can flow. Fires once per (re)connection.
    Connected {
        /// What the server said about us.
        info: ConnectionInfo,
        /// `true` when this is a reconnection of an engine that was connected before.
        reconnected: bool,
    },
    /// A connection attempt failed. If `permanent`, retrying with the same credentials is
    /// pointless (the Python client stops reconnecting).
    ConnectionFailed {
        /// Why.
        error: ConnectError,
        /// Whether to give up.
        permanent: bool,
    },
    /// The transport closed after the connection was up. Services stay registered locally
    /// and pending calls keep running; give the engine a new transport to reconnect.
    Disconnected {
        /// The websocket close code, if known.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
    /// A call we made settled. Fires exactly once per [`CallId`].
    CallSettled {
        /// The call.
        id: CallId,
        /// Its result: the return value, or why there is none.
        result: Result<Value, CallError>,
    },
    /// Local code must run; answer with [`Engine::reply`](crate::Engine::reply).
    Invoke(Invocation),
    /// An invocation's caller left (the server said so). The driver may stop the work. If it
    /// replies anyway the reply is still sent: a caller that reconnects under the same id gets
    /// it, as with Python; otherwise the server drops it.
    InvokeCancelled {
        /// The invocation.
        id: InvokeId,
    },
    /// The consumer of local generator `generator` closed it early, left, or let it sit idle
    /// too long: drop it. Fires at most once per generator, never after it reached its end.
    GeneratorClosed {
        /// The driver's id for the generator.
        generator: GenId,
    },
    /// Local functions we returned in a reply can no longer be called (their caller left,
    /// they sat idle past [`Limits::export_idle_expiry`](crate::Limits), or we closed): drop
    /// them. Fires at most once per function.
    FunctionsReleased {
        /// The driver's ids of the functions.
        functions: Vec<FnId>,
    },
    /// A `_rintf` interface we sent is gone (its holder disposed of it or left, or we
    /// reconnected): its functions will not be called again.
    InterfaceDisposed {
        /// The interface's service id.
        service: String,
        /// The driver's ids of its functions.
        functions: Vec<FnId>,
    },
    /// The server announced that a client of our workspace left.
    PeerDisconnected {
        /// `ws/client`.
        peer: String,
    },
    /// A service could not be registered again after a reconnection.
    ServiceRestoreFailed {
        /// The local service id.
        service: String,
        /// Why.
        error: CallError,
    },
    /// Any other server event we subscribed to (`service_added`, custom events, ...).
    ServerEvent {
        /// The event `type`.
        kind: String,
        /// The whole message.
        message: Map,
    },
}
