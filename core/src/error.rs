//! Typed errors of the engine, each saying whose fault it is: the peer's, the remote
//! function's, the network's, or the caller's own misuse.

use alloc::string::String;

use crate::codec::DecodeError;
use crate::time::Duration;

/// Why a call we made did not resolve. Arrives in [`Event::CallSettled`](crate::Event).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The remote function raised, or the callee refused the call (not found, permission, ...).
    /// `message` is the error text, `trace` the remote traceback when there is one.
    #[error("remote error: {message}")]
    Remote {
        /// The error message (`_rvalue`).
        message: String,
        /// The remote traceback (`_rtrace`), possibly empty.
        trace: Option<String>,
    },
    /// No reply and no heartbeat for `after`.
    #[error("Method call timed out: {target}:{method} (no reply or heartbeat for {after:?})")]
    Timeout {
        /// The callee.
        target: String,
        /// The method path.
        method: String,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The server told us the callee left (`client_disconnected`, `peer_not_found`).
    #[error("Client disconnected: {peer}")]
    PeerDisconnected {
        /// The callee, `ws/client`.
        peer: String,
    },
    /// The server restarted (its manager id changed), so a call to the old manager can never
    /// be answered.
    #[error("the server restarted while calling {target}:{method}")]
    ServerRestarted {
        /// The callee.
        target: String,
        /// The method path.
        method: String,
    },
    /// The connection dropped while the call could not survive it (for example while its
    /// large request was still being uploaded).
    #[error("connection lost: {reason}")]
    ConnectionLost {
        /// What happened.
        reason: String,
    },
    /// An encrypted call got no reply and no heartbeat at all: most likely the callee could
    /// not decrypt it (a wrong public key, or encryption off on its side). Such a request cannot
    /// be answered, so this is the only sign of the mismatch.
    #[error(
        "no reply from {target}:{method} within {after:?}, possibly an encryption key mismatch \
         (the callee could not decrypt the request, or has encryption off)"
    )]
    NoReplyEncrypted {
        /// The callee.
        target: String,
        /// The method path.
        method: String,
        /// The timeout that ran out.
        after: Duration,
    },
    /// The engine could not send the call (a limit in force, or it was closed meanwhile).
    #[error("the call could not be sent: {reason}")]
    Refused {
        /// Why.
        reason: String,
    },
    /// We closed the connection ourselves ([`Engine::close`](crate::Engine::close)).
    #[error("connection closed by the client")]
    Closed,
    /// The peer's reply could not be understood.
    #[error("malformed reply: {0}")]
    BadReply(String),
}

/// Why a connection attempt failed. Arrives in [`Event::ConnectionFailed`](crate::Event).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The server refused us with `{"type": "error"}` (bad token, duplicate client, ...).
    /// Retrying with the same credentials will not help.
    #[error("server refused the connection: {message}")]
    Refused {
        /// The server's message.
        message: String,
    },
    /// The transport closed before `connection_info` arrived.
    #[error("connection closed during the handshake ({code:?}): {reason}")]
    Closed {
        /// The websocket close code, if any.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
    /// No `connection_info` within the handshake timeout.
    #[error("no connection_info within {0:?}")]
    Timeout(Duration),
    /// `connection_info` lacked a field we need, or the workspace differs from the one asked for.
    #[error("invalid connection_info: {0}")]
    BadConnectionInfo(String),
    /// The server accepted us but refused to register our `built-in` service.
    #[error("the server refused our built-in service: {0}")]
    BuiltinRejected(String),
}

/// A command the caller gave the engine could not be carried out. The caller's fault (or a
/// limit it configured).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The engine has never been connected, so it does not know its workspace yet.
    #[error("not connected yet")]
    NotConnected,
    /// The engine was closed with [`Engine::close`](crate::Engine::close).
    #[error("the engine is closed")]
    Closed,
    /// [`Limits`](crate::Limits) caps this resource.
    #[error("too many {what} (limit {max})")]
    LimitReached {
        /// What ran out: `"pending calls"`, `"queued frames"`, ...
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// The invocation id is unknown or was already answered.
    #[error("unknown or already answered invocation")]
    UnknownInvocation,
    /// A service id or function name that the protocol cannot carry (`.`, `/`, `:` or empty).
    #[error("invalid {what}: {value:?}")]
    InvalidName {
        /// What was being named.
        what: &'static str,
        /// The offending name.
        value: String,
    },
    /// A local function was passed in a call that expects no reply: there would be no
    /// session to keep it in.
    #[error("local functions cannot be passed in fire-and-forget calls")]
    CallbackWithoutReply,
    /// Local functions may be passed as call arguments only (not yet in return values).
    #[error("local functions in return values are not supported yet")]
    CallbackInReply,
    /// No registered service has this id.
    #[error("no local service {0:?}")]
    UnknownService(String),
    /// Encryption misuse: a bad public key, keys configured without encryption, an empty
    /// `trusted_keys` list, ...
    #[error("encryption: {0}")]
    Encryption(String),
}

/// A frame the engine received could not be used. It was dropped on its own: nothing else is
/// affected. Always the sender's (or the server's) fault; returned for logging.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A text frame that is not the JSON control message expected here.
    #[error("bad text frame: {0}")]
    BadText(String),
    /// A well-formed frame that breaks the protocol (missing keys, wrong types, wrong target).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A frame arrived while the engine cannot use it (for example binary before the handshake).
    #[error("unexpected frame: {0}")]
    Unexpected(&'static str),
    /// An encrypted frame we cannot open (wrong key, tampered data, encryption off here). Its
    /// promise is inside the ciphertext, so it cannot be answered: the caller times out.
    #[error("{0}")]
    Encryption(String),
}
