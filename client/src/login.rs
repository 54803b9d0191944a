//! Interactive login through the server's login service (Python: `hypha_rpc.login`).
//!
//! The flow, as the Hypha server implements it (`hypha/core/auth.py`, service
//! `public/hypha-login`):
//!
//! 1. connect anonymously to the server;
//! 2. `start(workspace=None, expires_in=None)` returns a [`LoginInfo`]: a fresh `key` and the
//!    `login_url` (`<server>/public/apps/hypha-login/?key=<key>`) of the login page;
//! 3. the user opens `login_url` in a browser and logs in; the page then calls the service's
//!    `report(key, token, workspace=None, expires_in=None, email=None, ...)` with the user's
//!    token (the server refuses tokens it cannot verify);
//! 4. `check(key, timeout, profile)` waits (the server polls once a second) until a token was
//!    reported for `key` and returns it, or the whole [`LoginProfile`] when `profile` is true;
//! 5. disconnect.
//!
//! [`login_with_runtime`] does all of this, handing [`LoginInfo`] to
//! [`LoginConfig::callback`] (default: print the URL) and giving up after
//! [`LoginConfig::timeout`]. `hypha-rpc-tokio` and `hypha-rpc-smol` wrap it as `login`:
//!
//! ```no_run
//! # async fn demo(runtime: std::sync::Arc<dyn hypha_rpc::runtime::Runtime>) -> hypha_rpc::Result<()> {
//! use hypha_rpc::login::{LoginConfig, login_with_runtime};
//! // With tokio: hypha_rpc_tokio::login(config).await?
//! let config = LoginConfig::new("https://hypha.aicell.io")
//!     .callback(|info| eprintln!("log in at {}", info.login_url));
//! let token = login_with_runtime(runtime, config).await?;
//! // Then: connect_to_server(ServerConfig::new("https://hypha.aicell.io").token(token))
//! # let _ = token; Ok(()) }
//! ```

use std::fmt;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{Either, select};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use crate::server::{Server, ServiceProxy, connect_with_runtime};

/// The login service Python uses by default.
pub const DEFAULT_LOGIN_SERVICE_ID: &str = "public/hypha-login";
/// How long a login may take by default (Python `login_timeout`: 60 s).
pub const DEFAULT_LOGIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Added to the login timeout for the connection's `method_timeout`, so the long-running
/// `check` call is ended by our own deadline, never by the per-call timeout.
const CALL_MARGIN: Duration = Duration::from_secs(30);

/// Receives the [`LoginInfo`] of a started login; see [`LoginConfig::callback`].
pub type LoginCallback = Arc<dyn Fn(LoginInfo) + Send + Sync>;

/// What the login service's `start` returns: where the user logs in, and the session key.
///
/// ```
/// use std::collections::BTreeMap;
/// let reply = BTreeMap::from([
///     ("login_url", "http://127.0.0.1:9527/public/apps/hypha-login/?key=abc"),
///     ("key", "abc"),
/// ]);
/// let info: hypha_rpc::login::LoginInfo = hypha_rpc::from_value(&hypha_rpc::to_value(&reply)?)?;
/// assert_eq!(info.key, "abc");
/// assert!(info.report_url.is_none());
/// # Ok::<(), hypha_rpc::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LoginInfo {
    /// The page the user opens in a browser to log in.
    pub login_url: String,
    /// The login session key (the page reports the token for it).
    pub key: String,
    /// The HTTP endpoint of the service's `report` function.
    #[serde(default)]
    pub report_url: Option<String>,
    /// The HTTP endpoint of the service's `check` function.
    #[serde(default)]
    pub check_url: Option<String>,
    /// The HTTP endpoint for generating tokens, as the server announces it.
    #[serde(default)]
    pub generate_url: Option<String>,
}

/// The user profile a completed login reported (Python `login({"profile": True})`, the
/// server's `UserTokenInfo`): the token and what the login page knew about the user.
///
/// ```
/// let reply = std::collections::BTreeMap::from([("token", "t"), ("name", "Ada")]);
/// let p: hypha_rpc::login::LoginProfile = hypha_rpc::from_value(&hypha_rpc::to_value(&reply)?)?;
/// assert_eq!((p.token.as_str(), p.name.as_deref()), ("t", Some("Ada")));
/// # Ok::<(), hypha_rpc::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LoginProfile {
    /// The access token (JWT).
    pub token: String,
    /// The workspace the token was scoped to, if the login asked for one.
    #[serde(default)]
    pub workspace: Option<String>,
    /// The token lifetime in seconds, if given.
    #[serde(default)]
    pub expires_in: Option<i64>,
    /// The user's email.
    #[serde(default)]
    pub email: Option<String>,
    /// Whether the email was verified.
    #[serde(default)]
    pub email_verified: Option<bool>,
    /// The user's name.
    #[serde(default)]
    pub name: Option<String>,
    /// The user's nickname.
    #[serde(default)]
    pub nickname: Option<String>,
    /// The user id.
    #[serde(default)]
    pub user_id: Option<String>,
    /// The URL of the user's picture.
    #[serde(default)]
    pub picture: Option<String>,
}

/// The settings of a login. Field names mirror the Python client's `login` config.
///
/// ```
/// use std::time::Duration;
/// use hypha_rpc::login::LoginConfig;
/// let config = LoginConfig::new("http://127.0.0.1:9527")
///     .timeout(Duration::from_secs(120))
///     .workspace("my-ws")
///     .callback(|info| println!("open {}", info.login_url));
/// assert_eq!(config.login_service_id, "public/hypha-login");
/// assert_eq!(config.timeout, Duration::from_secs(120));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct LoginConfig {
    /// `http(s)://host[:port]` or `ws(s)://host[:port]/ws` (Python `server_url`).
    pub server_url: String,
    /// The login service (Python `login_service_id`, default [`DEFAULT_LOGIN_SERVICE_ID`]).
    pub login_service_id: String,
    /// The workspace the token should be scoped to (Python `workspace`).
    pub workspace: Option<String>,
    /// The lifetime of a workspace-scoped token (Python `expires_in`, sent in whole seconds).
    pub expires_in: Option<Duration>,
    /// How long to wait for the user after the login URL was handed out (Python
    /// `login_timeout`, default [`DEFAULT_LOGIN_TIMEOUT`]). Zero checks once without waiting.
    pub timeout: Duration,
    /// Gets the login URL (Python `login_callback`); `None` prints
    /// `Please open your browser and login at <url>` to stdout, as Python does.
    pub callback: Option<LoginCallback>,
    /// Extra trusted root certificates (DER) for a `wss://` server with a private CA.
    pub extra_root_certificates: Vec<Vec<u8>>,
}

impl fmt::Debug for LoginConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginConfig")
            .field("server_url", &self.server_url)
            .field("login_service_id", &self.login_service_id)
            .field("workspace", &self.workspace)
            .field("expires_in", &self.expires_in)
            .field("timeout", &self.timeout)
            .field("callback", &self.callback.as_ref().map(|_| "Fn(LoginInfo)"))
            .field("extra_root_certificates", &self.extra_root_certificates.len())
            .finish()
    }
}

impl LoginConfig {
    /// Defaults for `server_url`.
    ///
    /// ```
    /// let c = hypha_rpc::login::LoginConfig::new("http://127.0.0.1:9527");
    /// assert_eq!(c.timeout, hypha_rpc::login::DEFAULT_LOGIN_TIMEOUT);
    /// assert!(c.callback.is_none() && c.workspace.is_none());
    /// ```
    pub fn new(server_url: impl Into<String>) -> Self {
        LoginConfig {
            server_url: server_url.into(),
            login_service_id: DEFAULT_LOGIN_SERVICE_ID.to_string(),
            workspace: None,
            expires_in: None,
            timeout: DEFAULT_LOGIN_TIMEOUT,
            callback: None,
            extra_root_certificates: Vec::new(),
        }
    }
    /// Sets [`LoginConfig::login_service_id`].
    ///
    /// ```
    /// let c = hypha_rpc::login::LoginConfig::new("http://127.0.0.1:9527").login_service_id("my-ws/login");
    /// assert_eq!(c.login_service_id, "my-ws/login");
    /// ```
    pub fn login_service_id(mut self, id: impl Into<String>) -> Self {
        self.login_service_id = id.into();
        self
    }
    /// Sets [`LoginConfig::workspace`].
    ///
    /// ```
    /// let c = hypha_rpc::login::LoginConfig::new("http://127.0.0.1:9527").workspace("my-ws");
    /// assert_eq!(c.workspace.as_deref(), Some("my-ws"));
    /// ```
    pub fn workspace(mut self, workspace: impl Into<String>) -> Self {
        self.workspace = Some(workspace.into());
        self
    }
    /// Sets [`LoginConfig::expires_in`].
    ///
    /// ```
    /// use std::time::Duration;
    /// let c = hypha_rpc::login::LoginConfig::new("http://127.0.0.1:9527").expires_in(Duration::from_secs(3600));
    /// assert_eq!(c.expires_in, Some(Duration::from_secs(3600)));
    /// ```
    pub fn expires_in(mut self, lifetime: Duration) -> Self {
        self.expires_in = Some(lifetime);
        self
    }
    /// Sets [`LoginConfig::timeout`].
    ///
    /// ```
    /// use std::time::Duration;
    /// let c = hypha_rpc::login::LoginConfig::new("http://127.0.0.1:9527").timeout(Duration::from_secs(5));
    /// assert_eq!(c.timeout, Duration::from_secs(5));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// Sets [`LoginConfig::callback`]. It runs once, before waiting for the user; it should
    /// return quickly (spawn a task for anything slow).
    ///
    /// ```
    /// let c = hypha_rpc::login::LoginConfig::new("http://127.0.0.1:9527")
    ///     .callback(|info| eprintln!("please log in at {}", info.login_url));
    /// assert!(c.callback.is_some());
    /// ```
    pub fn callback(mut self, callback: impl Fn(LoginInfo) + Send + Sync + 'static) -> Self {
        self.callback = Some(Arc::new(callback));
        self
    }
    /// Adds a trusted root certificate (DER bytes), for servers with a private CA.
    ///
    /// ```
    /// let c = hypha_rpc::login::LoginConfig::new("wss://hypha.local/ws").add_root_certificate(vec![0x30]);
    /// assert_eq!(c.extra_root_certificates.len(), 1);
    /// ```
    pub fn add_root_certificate(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.extra_root_certificates.push(der.into());
        self
    }
}

/// Logs in through the server's login service and returns the token (Python
/// `login(config)`); the runtime crates wrap this as `login`. See the [module docs](self)
/// for the flow.
///
/// Errors: the connection and service errors as they come (a missing login service, ...), a
/// [`CallError::Remote`](crate::CallError::Remote) when the server rejects the session, and,
/// when nobody completed the login within [`LoginConfig::timeout`] (counted from the
/// callback), [`Error::LoginTimeout`] ([`Error::is_timeout`] is true). Always disconnects
/// before returning.
///
/// ```no_run
/// # async fn demo(runtime: std::sync::Arc<dyn hypha_rpc::runtime::Runtime>) -> hypha_rpc::Result<()> {
/// use std::time::Duration;
/// use hypha_rpc::login::{LoginConfig, login_with_runtime};
/// let config = LoginConfig::new("http://127.0.0.1:9527").timeout(Duration::from_secs(120));
/// match login_with_runtime(runtime, config).await {
///     Ok(token) => println!("logged in, token {} bytes", token.len()),
///     Err(e) if e.is_timeout() => eprintln!("nobody logged in: {e}"),
///     Err(e) => return Err(e),
/// }
/// # Ok(()) }
/// ```
pub async fn login_with_runtime(runtime: Arc<dyn Runtime>, config: LoginConfig) -> Result<String> {
    run(runtime, config, false).await
}

/// Like [`login_with_runtime`], but returns the whole [`LoginProfile`] the login page
/// reported (Python `login({..., "profile": True})`).
///
/// ```no_run
/// # async fn demo(runtime: std::sync::Arc<dyn hypha_rpc::runtime::Runtime>) -> hypha_rpc::Result<()> {
/// use hypha_rpc::login::{LoginConfig, login_profile_with_runtime};
/// let profile = login_profile_with_runtime(runtime, LoginConfig::new("http://127.0.0.1:9527")).await?;
/// println!("logged in as {:?} ({:?})", profile.name, profile.email);
/// # Ok(()) }
/// ```
pub async fn login_profile_with_runtime(
    runtime: Arc<dyn Runtime>,
    config: LoginConfig,
) -> Result<LoginProfile> {
    run(runtime, config, true).await
}

/// Connect, run the flow, and disconnect whatever happened.
async fn run<T: DeserializeOwned>(
    runtime: Arc<dyn Runtime>,
    config: LoginConfig,
    profile: bool,
) -> Result<T> {
    let mut server_config = ServerConfig::new(config.server_url.clone())
        .method_timeout(config.timeout.saturating_add(CALL_MARGIN));
    server_config.extra_root_certificates = config.extra_root_certificates.clone();
    let server = connect_with_runtime(runtime.clone(), server_config).await?;
    let result = flow(&runtime, &server, &config, profile).await;
    server.disconnect().await;
    result
}

async fn flow<T: DeserializeOwned>(
    runtime: &Arc<dyn Runtime>,
    server: &Server,
    config: &LoginConfig,
    profile: bool,
) -> Result<T> {
    let svc = server.get_service(&config.login_service_id).await?;
    let info: LoginInfo = if config.workspace.is_some() || config.expires_in.is_some() {
        let expires_in = config.expires_in.map(|d| d.as_secs());
        svc.call("start", (config.workspace.as_deref(), expires_in)).await?
    } else {
        svc.call("start", ()).await?
    };
    tracing::debug!(login_url = %info.login_url, "login started");
    match &config.callback {
        Some(callback) => callback(info.clone()),
        None => println!("Please open your browser and login at {}", info.login_url),
    }
    check(runtime, &svc, &info, config, profile).await
}

/// `check(key, timeout, profile)`, raced against our own deadline: the server only polls
/// once a second and gives up a second late, and a lost reply must not hang us.
async fn check<T: DeserializeOwned>(
    runtime: &Arc<dyn Runtime>,
    svc: &ServiceProxy,
    info: &LoginInfo,
    config: &LoginConfig,
    profile: bool,
) -> Result<T> {
    let timed_out = || Error::LoginTimeout { after: config.timeout, login_url: info.login_url.clone() };
    // The server counts whole seconds; 0 means "look once, do not wait".
    let secs = config.timeout.as_secs() + u64::from(config.timeout.subsec_nanos() > 0);
    let call = svc.call::<Option<T>>("check", (&info.key, secs, profile));
    let outcome = if config.timeout.is_zero() {
        call.await
    } else {
        match select(pin!(call), runtime.sleep(config.timeout)).await {
            Either::Left((outcome, _)) => outcome,
            Either::Right(((), _)) => return Err(timed_out()),
        }
    };
    match outcome {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(timed_out()),
        Err(e) if e.remote_message().is_some_and(|m| m.contains("Login timeout")) => Err(timed_out()),
        Err(e) => Err(e),
    }
}
