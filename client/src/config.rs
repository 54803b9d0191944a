//! How to reach the server and who we are: [`ServerConfig`], and the server URL forms the
//! Python client accepts.

use std::time::Duration;

use hypha_rpc_core::Limits;

use crate::error::{Error, Result};

/// The connection settings of [`connect_to_server`](crate::Server). Field names mirror the
/// Python client's `connect_to_server` config.
///
/// ```
/// use std::time::Duration;
/// use hypha_rpc::ServerConfig;
/// let config = ServerConfig::new("http://127.0.0.1:9527")
///     .workspace("my-ws")
///     .client_id("my-client")
///     .method_timeout(Duration::from_secs(60));
/// assert_eq!(config.server_url, "http://127.0.0.1:9527");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// `http(s)://host[:port]` or `ws(s)://host[:port]/ws`.
    pub server_url: String,
    /// An access token (JWT).
    pub token: Option<String>,
    /// The workspace to join (default: the token's, or a new anonymous one).
    pub workspace: Option<String>,
    /// Our client id (default: a random one).
    pub client_id: Option<String>,
    /// How long a call may go without a reply or heartbeat. Default 30 s.
    pub method_timeout: Duration,
    /// Caps on what peers can make us hold; also bounds websocket message sizes.
    pub limits: Limits,
    /// Reconnect after a dropped connection (default `true`).
    pub reconnect: bool,
    /// Extra trusted root certificates (DER) for `wss://`, on top of the webpki roots;
    /// verification is always on.
    pub extra_root_certificates: Vec<Vec<u8>>,
    /// Seeds session ids (default: random).
    pub seed: Option<u64>,
    /// End-to-end encryption (Python `encryption: True`): calls to services fetched with a
    /// public key are sealed so the server cannot read or alter them, and encrypted calls to
    /// us are opened and answered sealed. Default off.
    pub encryption: bool,
    /// Our encryption secret key (32 bytes); a new key pair is generated when `None`.
    pub encryption_secret_key: Option<[u8; 32]>,
    /// Serve our services over WebRTC too (Python `webrtc`): `On` or `Auto` registers
    /// `<client_id>-rtc` at connection (`On` fails the connection if that fails), so peers can
    /// reach us with [`Server::get_service_with`](crate::Server::get_service_with). Default off.
    #[cfg(feature = "webrtc")]
    pub webrtc: crate::rtc::WebRtc,
    /// How our peer connections are made (Python `webrtc_config`).
    #[cfg(feature = "webrtc")]
    pub webrtc_config: crate::rtc::WebRtcConfig,
}

impl ServerConfig {
    /// Defaults for `server_url`.
    pub fn new(server_url: impl Into<String>) -> Self {
        ServerConfig {
            server_url: server_url.into(),
            token: None,
            workspace: None,
            client_id: None,
            method_timeout: Duration::from_secs(30),
            limits: Limits::default(),
            reconnect: true,
            extra_root_certificates: Vec::new(),
            seed: None,
            encryption: false,
            encryption_secret_key: None,
            #[cfg(feature = "webrtc")]
            webrtc: crate::rtc::WebRtc::Off,
            #[cfg(feature = "webrtc")]
            webrtc_config: crate::rtc::WebRtcConfig::default(),
        }
    }
    /// Sets [`ServerConfig::webrtc`] and [`ServerConfig::webrtc_config`].
    #[cfg(feature = "webrtc")]
    pub fn webrtc(mut self, mode: crate::rtc::WebRtc, config: crate::rtc::WebRtcConfig) -> Self {
        self.webrtc = mode;
        self.webrtc_config = config;
        self
    }
    /// Sets [`ServerConfig::token`].
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }
    /// Sets [`ServerConfig::workspace`].
    pub fn workspace(mut self, workspace: impl Into<String>) -> Self {
        self.workspace = Some(workspace.into());
        self
    }
    /// Sets [`ServerConfig::client_id`].
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }
    /// Sets [`ServerConfig::method_timeout`].
    pub fn method_timeout(mut self, t: Duration) -> Self {
        self.method_timeout = t;
        self
    }
    /// Sets [`ServerConfig::reconnect`].
    pub fn reconnect(mut self, on: bool) -> Self {
        self.reconnect = on;
        self
    }
    /// Turns end-to-end encryption on, with a fresh key pair (see [`ServerConfig::encryption`]).
    pub fn encryption(mut self, on: bool) -> Self {
        self.encryption = on;
        self
    }
    /// Turns encryption on with our own secret key (to keep a stable public key).
    pub fn encryption_secret_key(mut self, secret: [u8; 32]) -> Self {
        self.encryption = true;
        self.encryption_secret_key = Some(secret);
        self
    }
    /// Adds a trusted root certificate (DER bytes), for servers with a private CA.
    pub fn add_root_certificate(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.extra_root_certificates.push(der.into());
        self
    }
}

/// A parsed websocket endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `wss://` (TLS) or `ws://`.
    pub secure: bool,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Endpoint {
    /// The websocket URL, `ws(s)://host:port/path`.
    pub fn url(&self) -> String {
        let scheme = if self.secure { "wss" } else { "ws" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            format!("{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// Turns a server URL into the websocket endpoint, as the Python client does: `http` becomes
/// `ws`, `https` becomes `wss`, and `/ws` is appended to http(s) URLs.
///
/// ```
/// use hypha_rpc::config::parse_server_url;
/// let e = parse_server_url("http://127.0.0.1:9527").unwrap();
/// assert_eq!(e.url(), "ws://127.0.0.1:9527/ws");
/// let e = parse_server_url("https://hypha.example.org").unwrap();
/// assert_eq!(e.url(), "wss://hypha.example.org:443/ws");
/// let e = parse_server_url("ws://[::1]:8000/ws").unwrap();
/// assert_eq!((e.host.as_str(), e.port), ("::1", 8000));
/// assert!(parse_server_url("ftp://x").is_err());
/// ```
pub fn parse_server_url(url: &str) -> Result<Endpoint> {
    let bad = |reason| Error::InvalidUrl { url: url.to_string(), reason };
    let trimmed = url.trim();
    let (scheme, rest) =
        trimmed.split_once("://").ok_or_else(|| bad("no scheme (use http://, https://, ws:// or wss://)"))?;
    let (secure, http) = match scheme.to_ascii_lowercase().as_str() {
        "http" => (false, true),
        "https" => (true, true),
        "ws" => (false, false),
        "wss" => (true, false),
        _ => return Err(bad("unsupported scheme (use http://, https://, ws:// or wss://)")),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(bad("credentials in the URL are not supported; use the token"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed [ in host"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
        None if secure => 443,
        None => 80,
    };
    let mut path = if path.is_empty() { "/".to_string() } else { path.to_string() };
    if path.starts_with('?') {
        path.insert(0, '/');
    }
    if http {
        let (p, q) = match path.split_once('?') {
            Some((p, q)) => (p.to_string(), format!("?{q}")),
            None => (path.clone(), String::new()),
        };
        let p = p.trim_end_matches('/');
        path = if p.ends_with("/ws") { format!("{p}{q}") } else { format!("{p}/ws{q}") };
    }
    Ok(Endpoint { secure, host: host.to_string(), port, path })
}
