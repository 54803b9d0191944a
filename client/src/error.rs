//! The one error type of the async client: what went wrong, and whose fault it was.

use hypha_rpc_core::{CallError, ConnectError, EngineError};

/// Everything the async client can fail with.
///
/// ```
/// use hypha_rpc::Error;
/// let e = Error::Decode("expected a string".into());
/// assert!(e.to_string().contains("expected a string"));
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A call did not resolve: the remote function raised, a timeout, the peer left, ...
    #[error(transparent)]
    Call(#[from] CallError),
    /// The server refused us or the handshake failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Local misuse caught by the engine (bad name, a limit, closed, ...).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The network: TCP, TLS or websocket.
    #[error("transport: {0}")]
    Transport(String),
    /// A server URL we cannot use.
    #[error("invalid server url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value could not be turned into msgpack (for example a callback outside a call).
    #[error("cannot encode: {0}")]
    Encode(String),
    /// A value did not have the shape the requested Rust type needs.
    #[error("cannot decode: {0}")]
    Decode(String),
    /// The service has no function at that path.
    #[error("no function {method:?} in service {service:?}")]
    NoSuchMethod {
        /// The service id.
        service: String,
        /// The path asked for.
        method: String,
    },
    /// Nobody completed the login at `login_url` within `after` ([`login`](crate::login)).
    #[error("login timed out after {after:?}: nobody logged in at {login_url}")]
    LoginTimeout {
        /// The login timeout.
        after: core::time::Duration,
        /// The page the user was asked to open.
        login_url: String,
    },
    /// The client was disconnected by [`Server::disconnect`](crate::Server::disconnect).
    #[error("the client is disconnected")]
    Closed,
    /// An argument we were given (or a peer sent us) cannot be used; the message says why.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// `true` for a timeout of a call.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Error::Call(CallError::Timeout { .. } | CallError::NoReplyEncrypted { .. })
                | Error::LoginTimeout { .. }
        )
    }
    /// The remote error message when the remote function raised.
    pub fn remote_message(&self) -> Option<&str> {
        match self {
            Error::Call(CallError::Remote { message, .. }) => Some(message),
            _ => None,
        }
    }
}

/// Shorthand for `Result<T, hypha_rpc::Error>`.
pub type Result<T, E = Error> = core::result::Result<T, E>;
