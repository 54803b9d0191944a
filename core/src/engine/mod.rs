//! The sans-IO protocol engine: whole messages and the time in, messages, events and the next
//! deadline out. It never touches a socket, a clock or a thread, and never runs user code.
//!
//! # Driving it
//!
//! Every input (`handle_*` or a command) may produce output; drain all three queues after each:
//!
//! ```
//! use hypha_rpc_core::{Engine, EngineConfig, Event, Transmit};
//! use hypha_rpc_core::time::Instant;
//!
//! let now = Instant::from_micros(0);
//! let mut engine = Engine::new(EngineConfig::new("my-client"), now);
//! engine.handle_transport_open(now).unwrap();   // the websocket is open
//! while let Some(t) = engine.poll_transmit() {
//!     match t {
//!         Transmit::Text(json) => assert!(json.starts_with(r#"{"client_id": "my-client""#)),
//!         Transmit::Binary(_) | Transmit::Close { .. } => unreachable!(),
//!     }
//! }
//! while let Some(event) = engine.poll_event() {
//!     if let Event::Invoke(call) = event { /* run user code, then engine.reply(now, call.id, ...) */ }
//! }
//! let next_wakeup = engine.poll_timeout(); // call engine.handle_timeout(t) when it is reached
//! assert!(next_wakeup.is_some());          // the handshake has a deadline
//! ```

use alloc::boxed::Box;
use alloc::collections::VecDeque;

use crate::vecmap::{DequeMap, DequeSet, VecMap};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use bytes::Bytes;

use crate::chunk::Reassembly;
use crate::codec::rtype::{Generator, Method, MethodLayout, PromiseMode, RTypeCodec, RemoteError};
use crate::codec::{Frame, decode_frame, encode_frame};
use crate::connection::{self, ConnectionInfo, Control};
use crate::crypto::{Crypto, KEY_LEN, NONCE_LEN};
use crate::error::{CallError, ConnectError, EngineError, InputError};
use crate::event::{CallId, Context, Event, FnId, GenId, Invocation, InvokeId, InvokeTarget, Transmit};
use crate::rng::Rng;
use crate::service::{self, ServiceSpec, Visibility};
use crate::time::{Duration, Instant};
use crate::{Limits, Map, Str, Value};

mod incoming;
mod locals;
mod upload;

use incoming::*;
use locals::*;
use upload::*;

/// The ext type tag of [`local_function`] placeholders. It is in msgpack's reserved (negative)
/// range, is never sent on the wire, and is refused in anything a peer sends.
pub const LOCAL_FUNCTION_EXT: i8 = -64;

/// A placeholder for a local function inside call arguments. The engine replaces it with a
/// callable descriptor when it sends the call, and emits [`Event::Invoke`] with
/// [`InvokeTarget::Callback`] when the callee calls it (until the call settles, as in Python).
///
/// ```
/// use hypha_rpc_core::engine::local_function;
/// use hypha_rpc_core::FnId;
/// let cb = local_function(FnId(7), "on_progress");
/// assert_eq!(cb.kind(), "ext");
/// ```
pub fn local_function(id: FnId, name: &str) -> Value {
    let mut payload = Vec::with_capacity(8 + name.len());
    payload.extend_from_slice(&id.0.to_be_bytes());
    payload.extend_from_slice(name.as_bytes());
    Value::Ext(LOCAL_FUNCTION_EXT, payload.into())
}

/// The ext type tag of [`local_generator`] placeholders (reserved range, never on the wire).
pub const LOCAL_GENERATOR_EXT: i8 = -65;

/// A placeholder for a local generator inside call arguments or a reply. The engine sends it
/// as a `_rtype: "generator"` descriptor and emits [`InvokeTarget::GeneratorNext`] for every
/// item the peer asks for; [`Event::GeneratorClosed`] when the peer stops early or leaves.
///
/// ```
/// use hypha_rpc_core::engine::local_generator;
/// use hypha_rpc_core::GenId;
/// assert_eq!(local_generator(GenId(1)).kind(), "ext");
/// ```
pub fn local_generator(id: GenId) -> Value {
    Value::Ext(LOCAL_GENERATOR_EXT, Bytes::copy_from_slice(&id.0.to_be_bytes()))
}

/// `true` for the `{_rtype: "stop_iteration"}` a remote generator answers at its end.
pub fn is_stop_iteration(v: &Value) -> bool {
    v.rtype() == Some("stop_iteration")
}

/// How the engine connects and behaves. Defaults follow the Python client.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Our client id (no `/`; avoid `:`, `@`, `.`, `*`).
    pub client_id: String,
    /// The workspace to join (`None`: the token's, or our own when anonymous).
    pub workspace: Option<String>,
    /// An access token (JWT), if any.
    pub token: Option<String>,
    /// How long a call may go without reply or heartbeat. Default 30 s (`t` = 15.0).
    pub method_timeout: Duration,
    /// Timeout of calls to `_rintf` interface methods. Default 10 s (`t` = 5.0), as Python.
    pub rintf_timeout: Duration,
    /// Interval of the `{"type": "ping"}` keep-alive. Default 20 s (the server cuts idle links
    /// at 600 s).
    pub ping_interval: Duration,
    /// How long to wait for `connection_info`. Default 30 s.
    pub handshake_timeout: Duration,
    /// How often to refresh the reconnection token. Default 7200 s, lowered to
    /// `reconnection_token_life_time / 1.5` when that is shorter.
    pub token_refresh_interval: Duration,
    /// How often to check that the server still lists our `built-in` service (PROTOCOL.md
    /// §3.3.1 rule 7: hypha 0.21.137 can forget a client whose socket stays open, for example
    /// after a refused duplicate login). When it does not, the engine registers everything
    /// again. `None` disables the check. Default 60 s.
    pub registration_check_interval: Option<Duration>,
    /// Caps on everything peers can make us hold.
    pub limits: Limits,
    /// Size of the chunks a large message is cut into. Default 262 144, as Python; frames
    /// longer than this plus 1024 bytes go through the receiver's `message_cache`.
    pub chunk_size: usize,
    /// The transport's largest message (websocket frame, data-channel message); chunks stay
    /// below it. Default 16 MiB (the server's limit).
    pub transport_max_message: usize,
    /// Seeds session ids: same seed and inputs give the same bytes.
    pub seed: u64,
    /// When the first heartbeat of an incoming call that asked for them goes out, unless it
    /// was answered by then. Default zero: at the next timeout check, so a handler answered
    /// synchronously costs none. A driver that always answers asynchronously sets a short
    /// delay so fast calls send no heartbeat (one frame less per call for the server).
    pub first_heartbeat_after: Duration,
    /// `Some` for an engine on a direct link to one peer (a WebRTC data channel) instead of a
    /// server connection. See [`PeerLink`].
    pub peer: Option<PeerLink>,
}

/// A direct link to one peer, with no server in the path (PROTOCOL.md §13): no handshake, no
/// manager, no keep-alive pings. The engine is ready as soon as the transport opens, serves
/// its services and `built-in` to the peer, and calls the peer's.
///
/// Nobody rewrites the frames on such a link, so nothing the peer writes about itself is
/// believed: every frame counts as coming from `peer_workspace` (its `from` is moved there, and
/// `ws` and `user` are replaced by the values here), so visibility, `trusted_keys` and contexts
/// work exactly as through the server. Take both from a trusted party, such as the server's
/// context of the call that set up the link.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerLink {
    /// The workspace we act in on the link.
    pub workspace: String,
    /// The peer's workspace.
    pub peer_workspace: String,
    /// The peer's user info (`Nil` when unknown).
    pub peer_user: Value,
}

impl EngineConfig {
    /// Defaults for client `client_id`.
    pub fn new(client_id: impl Into<String>) -> Self {
        EngineConfig {
            client_id: client_id.into(),
            workspace: None,
            token: None,
            method_timeout: Duration::from_secs(30),
            rintf_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(30),
            token_refresh_interval: Duration::from_secs(7200),
            registration_check_interval: Some(Duration::from_secs(60)),
            limits: Limits::default(),
            chunk_size: 262_144,
            transport_max_message: 16 * 1024 * 1024,
            seed: 0,
            first_heartbeat_after: Duration::ZERO,
            peer: None,
        }
    }
}

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Overrides [`EngineConfig::method_timeout`].
    pub timeout: Option<Duration>,
    /// The `parent` session: set it to [`Invocation::session`] when calling a function that
    /// arrived in that invocation's arguments.
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No transport.
    Idle,
    /// Handshake sent, waiting for `connection_info`.
    Handshaking { deadline: Instant },
    /// Connected, registering `built-in`.
    Registering,
    /// Connected and usable.
    Ready,
    /// [`Engine::close`] was called.
    Closed,
}

#[derive(Debug, Clone, PartialEq)]
enum Internal {
    Builtin,
    Subscribe,
    Restore(String),
    Chunk {
        upload: u64,
        step: ChunkStep,
    },
    /// An unregistration the user made while the link was down (best effort).
    Unregister,
    /// The periodic check that the server still lists our `built-in`.
    CheckRegistration,
}

#[derive(Debug)]
struct Pending {
    id: CallId,
    target: String,
    method: String,
    timeout: Duration,
    deadline: Instant,
    internal: Option<Internal>,
    callbacks: Vec<(String, FnId)>,
    generators: Vec<(String, GenId)>,
    /// For a user's `register_service`: the service, so a registration cut off by a
    /// disconnection is redone (and settled) after the reconnection.
    registers: Option<String>,
    /// The request went out encrypted.
    encrypted: bool,
    /// A heartbeat or chunk progress came back (the callee could read the request).
    heard: bool,
}

/// The key pair and cipher of end-to-end encryption (see [`crate::crypto`]).
struct CryptoSlot(Box<dyn Crypto>);

impl core::fmt::Debug for CryptoSlot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Crypto(public {})", crate::crypto::to_hex(&self.0.public_key()))
    }
}

/// The Hypha RPC protocol engine for one client. See the [module docs](self) for the drive loop.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    rng: Rng,
    state: State,
    info: Option<ConnectionInfo>,
    reconnection_token: Option<String>,
    services: Vec<ServiceSpec>,
    deferred_registrations: Vec<(CallId, String)>,
    deferred_unregistrations: Vec<String>,
    /// Calls waiting for a reply (up to `Limits::max_pending_calls`), boxed so that shifting
    /// entries moves 32 bytes each.
    sessions: DequeMap<String, Box<Pending>>,
    /// Their deadlines: mostly added last and removed first, which a deque does cheaply.
    deadlines: DequeSet<(Instant, String)>,
    /// Calls being served (up to `Limits::max_active_invocations`); ids only grow, and calls
    /// mostly end in the order they came.
    active: DequeMap<InvokeId, Active>,
    beats: DequeSet<(Instant, InvokeId)>,
    next_call: u64,
    next_invoke: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// Frames waiting for the connection, with the session of the call each belongs to (a
    /// frame whose call settled meanwhile is dropped, never sent late).
    backlog: VecDeque<(Option<String>, Bytes)>,
    next_ping: Option<Instant>,
    next_refresh: Option<Instant>,
    next_check: Option<Instant>,
    ever_ready: bool,
    me: Str,
    reassembly: Reassembly,
    uploads: VecMap<u64, Upload>,
    next_upload: u64,
    exports: VecMap<String, Export>,
    interfaces: VecMap<String, Interface>,
    crypto: Option<CryptoSlot>,
    /// The caller's key of the incoming call being handled, when it came encrypted.
    incoming_key: Option<[u8; KEY_LEN]>,
}

/// What the server would have written into a frame from the peer of a [`PeerLink`]: its
/// `from` moved into the peer's workspace, `ws` and `user` set from the link.
fn trust_peer_link(frame: &mut Frame, link: &PeerLink) -> Result<(), InputError> {
    let from = frame.main.get("from").and_then(Value::as_str).map(String::from);
    if let Some(from) = from {
        let (ws, client) = split_client(&from);
        if client.is_empty() || client.contains(['/', '*']) {
            return Err(InputError::Protocol("a peer frame with a bad `from`".into()));
        }
        if ws != link.peer_workspace {
            frame.main.insert("from", Value::from(format!("{}/{client}", link.peer_workspace)));
        }
    }
    frame.main.insert("ws", Value::from(link.peer_workspace.as_str()));
    frame.main.insert("user", link.peer_user.clone());
    Ok(())
}

fn split_client(id: &str) -> (&str, &str) {
    id.split_once('/').unwrap_or(("", id))
}

impl Engine {
    /// A new engine with no transport. Call [`Engine::handle_transport_open`] once the
    /// websocket is open.
    pub fn new(config: EngineConfig, _now: Instant) -> Engine {
        Engine {
            rng: Rng::new(config.seed),
            config,
            state: State::Idle,
            info: None,
            reconnection_token: None,
            services: Vec::new(),
            deferred_registrations: Vec::new(),
            deferred_unregistrations: Vec::new(),
            sessions: DequeMap::new(),
            deadlines: DequeSet::new(),
            active: DequeMap::new(),
            beats: DequeSet::new(),
            next_call: 0,
            next_invoke: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            backlog: VecDeque::new(),
            next_ping: None,
            next_refresh: None,
            next_check: None,
            ever_ready: false,
            me: Str::default(),
            reassembly: Reassembly::default(),
            uploads: VecMap::new(),
            next_upload: 0,
            exports: VecMap::new(),
            interfaces: VecMap::new(),
            crypto: None,
            incoming_key: None,
        }
    }

    /// Turns end-to-end encryption on with this key pair (PROTOCOL.md §12): calls to functions
    /// whose descriptor carries a public key (`_renc_pub`, set by
    /// `get_service(id, encryption_public_key)` in the adapters) are encrypted, encrypted
    /// calls to us are decrypted and answered encrypted, and the functions we send carry our
    /// key. Without it, encrypted frames are refused.
    pub fn set_crypto(&mut self, crypto: Box<dyn Crypto>) {
        self.crypto = Some(CryptoSlot(crypto));
    }

    /// Our encryption public key, when encryption is on.
    pub fn public_key(&self) -> Option<[u8; KEY_LEN]> {
        self.crypto.as_ref().map(|c| c.0.public_key())
    }

    /// Replaces a frame's `extra` with the encrypted envelope for `to` (nothing to do for a
    /// frame without `extra`, such as a heartbeat). An error when encryption is off or the
    /// key is one that must not be used; the frame must then not be sent.
    fn seal_frame(&mut self, frame: &mut Frame, to: &[u8; KEY_LEN]) -> Result<(), EngineError> {
        let Some(c) = self.crypto.as_mut() else {
            return Err(EngineError::Encryption(
                "the peer has an encryption key but encryption is off here".into(),
            ));
        };
        let Some(extra) = frame.extra.take() else { return Ok(()) };
        let plaintext = crate::codec::to_vec(&Value::Map(extra));
        let Some((nonce, data)) = c.0.seal(to, &plaintext) else {
            return Err(EngineError::Encryption(format!(
                "refusing to encrypt for the small-order public key {} (anyone could read it)",
                crate::crypto::to_hex(to)
            )));
        };
        let mut enc = Map::with_capacity(3);
        enc.push(Value::from_static("v"), 2u64);
        enc.push(Value::from_static("pub"), Value::bin(Bytes::copy_from_slice(&c.0.public_key())));
        enc.push(Value::from_static("nonce"), Value::bin(Bytes::copy_from_slice(&nonce)));
        let mut envelope = Map::with_capacity(2);
        envelope.push(Value::from_static("_enc"), Value::Map(enc));
        envelope.push(Value::from_static("data"), Value::bin(data));
        frame.extra = Some(envelope);
        Ok(())
    }

    /// Opens an encrypted `extra` in place. `Ok(None)`: it was not encrypted; `Ok(Some(key))`:
    /// it was, from `key`.
    fn open_extra(&mut self, extra: &mut Map, what: &str) -> Result<Option<[u8; KEY_LEN]>, InputError> {
        let Some(enc) = extra.get("_enc") else { return Ok(None) };
        let fail = |why: &str| InputError::Encryption(format!("Decryption failed for method {what}: {why}"));
        let enc = enc.as_map().ok_or_else(|| fail("`_enc` is not a map"))?;
        if enc.get("v").and_then(Value::as_u64) != Some(2) {
            return Err(fail("unsupported envelope version"));
        }
        let key: [u8; KEY_LEN] = enc
            .get("pub")
            .and_then(Value::as_bin)
            .and_then(|b| b.as_ref().try_into().ok())
            .ok_or_else(|| fail("`pub` is not 32 bytes"))?;
        let nonce: [u8; NONCE_LEN] = enc
            .get("nonce")
            .and_then(Value::as_bin)
            .and_then(|b| b.as_ref().try_into().ok())
            .ok_or_else(|| fail("`nonce` is not 24 bytes"))?;
        let data = extra.get("data").and_then(Value::as_bin).ok_or_else(|| fail("no `data`"))?;
        let Some(c) = self.crypto.as_mut() else {
            return Err(fail("encryption is off here"));
        };
        let plaintext = c.0.open(&key, &nonce, data).ok_or_else(|| fail("invalid key or tampered data"))?;
        // The plaintext is as untrusted as any frame: the same bounded decoder.
        let (inner, used) = crate::codec::decode_value_slice(&plaintext, &self.config.limits)
            .map_err(|e| fail(&format!("bad plaintext: {e}")))?;
        match inner {
            Value::Map(m) if used == plaintext.len() => *extra = m,
            _ => return Err(fail("the plaintext is not one map")),
        }
        Ok(Some(key))
    }

    // ---- accessors ---------------------------------------------------------------------------

    /// What the server said at the last successful handshake.
    pub fn connection_info(&self) -> Option<&ConnectionInfo> {
        self.info.as_ref()
    }
    /// `true` between [`Event::Connected`] and the next disconnect.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }
    /// The token the next handshake will present.
    pub fn reconnection_token(&self) -> Option<&str> {
        self.reconnection_token.as_deref()
    }
    /// Calls waiting for a reply (ours and the engine's own).
    pub fn pending_calls(&self) -> usize {
        self.sessions.len()
    }
    /// Invocations not yet answered.
    pub fn active_invocations(&self) -> usize {
        self.active.len()
    }
    /// Local generators a peer can still pull from.
    pub fn open_generators(&self) -> usize {
        self.exports.values().map(|x| x.generators.len()).sum::<usize>()
            + self.sessions.values().map(|p| p.generators.len()).sum::<usize>()
    }
    /// `_rintf` interfaces we sent that are still alive.
    pub fn interfaces(&self) -> usize {
        self.interfaces.len()
    }
    /// Sessions holding functions or generators we returned in replies.
    pub fn exports(&self) -> usize {
        self.exports.len()
    }
    /// Large messages we are uploading in chunks.
    pub fn uploads(&self) -> usize {
        self.uploads.len()
    }
    /// Messages being uploaded to us in chunks.
    pub fn partial_messages(&self) -> usize {
        self.reassembly.len()
    }
    /// Frames waiting for the connection to come back.
    pub fn queued_frames(&self) -> usize {
        self.backlog.len()
    }
    /// The spec of service `id`, as registered.
    pub fn service(&self, id: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.id == id)
    }
    /// Ids of the services we serve (without `built-in`).
    pub fn service_ids(&self) -> impl Iterator<Item = &str> {
        self.services.iter().map(|s| s.id.as_str())
    }

    // ---- output ------------------------------------------------------------------------------

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }
    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
    /// When [`Engine::handle_timeout`] should be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        if let State::Handshaking { deadline } = self.state {
            consider(Some(deadline));
        }
        consider(self.deadlines.first().map(|(t, _)| *t));
        consider(self.reassembly.next_expiry(&self.config.limits));
        let expiry = self.config.limits.export_idle_expiry;
        consider(self.exports.values().map(|x| x.last_used + expiry).min());
        if matches!(self.state, State::Ready | State::Registering) {
            consider(self.beats.first().map(|(t, _)| *t));
            consider(self.next_ping);
            consider(self.next_refresh);
        }
        if self.state == State::Ready {
            consider(self.next_check);
        }
        t
    }

    // ---- transport inputs ----------------------------------------------------------------------

    /// A new transport is open: starts the handshake (with the reconnection token when there
    /// is one).
    pub fn handle_transport_open(&mut self, now: Instant) -> Result<(), EngineError> {
        if self.state == State::Closed {
            return Err(EngineError::Closed);
        }
        self.transmits.retain(|t| !matches!(t, Transmit::Text(_)));
        if let Some(link) = self.config.peer.clone() {
            if self.ever_ready {
                return Err(EngineError::Closed);
            }
            let info = ConnectionInfo {
                hypha_version: None,
                public_base_url: String::new(),
                local_base_url: None,
                manager_id: String::new(),
                workspace: link.workspace,
                client_id: self.config.client_id.clone(),
                user: Value::Nil,
                reconnection_token: None,
                reconnection_token_life_time: None,
            };
            self.me = Str::from(format!("{}/{}", info.workspace, self.config.client_id));
            self.info = Some(info.clone());
            self.state = State::Ready;
            self.ever_ready = true;
            tracing::info!(workspace = %info.workspace, client = %info.client_id, "peer link open");
            self.events.push_back(Event::Connected { info, reconnected: false });
            return Ok(());
        }
        self.state = State::Handshaking { deadline: now + self.config.handshake_timeout };
        let hs = connection::handshake(
            &self.config.client_id,
            self.config.workspace.as_deref(),
            self.config.token.as_deref(),
            self.reconnection_token.as_deref(),
        );
        self.transmits.push_back(Transmit::Text(hs));
        Ok(())
    }

    /// The transport closed (either side). Pending calls keep their timers: replies can still
    /// arrive after a quick reconnection, as with the Python client.
    pub fn handle_transport_closed(&mut self, now: Instant, code: Option<u16>, reason: &str) {
        match self.state {
            State::Handshaking { .. } => {
                self.state = State::Idle;
                let permanent = matches!(code, Some(1003 | 1008));
                self.events.push_back(Event::ConnectionFailed {
                    error: ConnectError::Closed { code, reason: reason.into() },
                    permanent,
                });
            }
            State::Registering | State::Ready => {
                self.state = State::Idle;
                self.next_ping = None;
                self.next_refresh = None;
                self.next_check = None;
                // Binary frames the driver never took go out again after the reconnection.
                let unsent: Vec<_> = self.transmits.drain(..).collect();
                for t in unsent.into_iter().rev() {
                    if let Transmit::Binary(b) = t {
                        self.backlog.push_front((None, b));
                    }
                }
                // A user's registration cut off here is redone, and settled, after reconnecting.
                let cut = self.sessions_where(|p| p.registers.is_some());
                for s in cut {
                    if let Some(p) = self.forget_session(&s) {
                        self.deferred_registrations.push((p.id, p.registers.unwrap_or_default()));
                    }
                }
                // Large messages being uploaded cannot resume on a new connection (the receiver
                // may be gone or have dropped the partial message): the calls they carry fail now.
                let uploads: Vec<u64> = self.uploads.keys().copied().collect();
                for id in uploads {
                    if let Some(u) = self.uploads.remove(&id) {
                        if let Some(s) = u.call_session {
                            let err = CallError::ConnectionLost {
                                reason: "the connection dropped while sending a large message".into(),
                            };
                            self.settle(now, s, Err(err));
                        }
                    }
                }
                // The engine's own calls are redone on the next connection.
                let internal = self.sessions_where(|p| p.internal.is_some());
                for s in internal {
                    self.forget_session(&s);
                }
                // `_rintf` services die with the connection: no zombies on the server or here.
                self.drop_interfaces(None);
                tracing::info!(?code, reason, pending = self.sessions.len(), "disconnected");
                self.events.push_back(Event::Disconnected { code, reason: reason.into() });
            }
            State::Idle | State::Closed => {}
        }
    }

    /// A text frame from the transport.
    pub fn handle_text(&mut self, now: Instant, text: &str) -> Result<(), InputError> {
        if self.config.peer.is_some() {
            // Control messages come from a server; a peer has no say in them.
            return Err(InputError::Unexpected("a text frame on a peer link"));
        }
        if text.len() > self.config.limits.max_frame_bytes {
            return Err(InputError::BadText("text frame too large".into()));
        }
        let control = connection::parse_control(text, &self.config.limits).map_err(InputError::BadText)?;
        match (self.state, control) {
            (State::Handshaking { .. }, Control::ConnectionInfo(map)) => {
                let info = match ConnectionInfo::parse(&map) {
                    Ok(info) => info,
                    Err(error) => {
                        self.fail_handshake(error, false);
                        return Ok(());
                    }
                };
                if let Some(want) = &self.config.workspace {
                    if *want != info.workspace {
                        let msg = format!("asked for workspace {want}, got {}", info.workspace);
                        self.fail_handshake(ConnectError::BadConnectionInfo(msg), true);
                        return Ok(());
                    }
                }
                self.connected(now, info);
            }
            (State::Handshaking { .. }, Control::Error(message)) => {
                self.fail_handshake(ConnectError::Refused { message }, true);
            }
            (_, Control::ReconnectionToken(token)) => self.reconnection_token = Some(token),
            // pong, errors just before a close, unknown types: nothing to do.
            _ => {}
        }
        Ok(())
    }

    /// A binary frame from the transport. A bad frame is dropped on its own; the error says
    /// why (for logging).
    pub fn handle_binary(&mut self, now: Instant, bytes: &Bytes) -> Result<(), InputError> {
        match self.state {
            // Python skips binary frames that arrive before connection_info (buffered messages).
            State::Handshaking { .. } => return Ok(()),
            State::Idle | State::Closed => {
                return Err(InputError::Unexpected("binary frame without a connection"));
            }
            State::Registering | State::Ready => {}
        }
        let result =
            decode_frame(bytes, &self.config.limits).map_err(InputError::from).and_then(|mut frame| {
                if let Some(link) = &self.config.peer {
                    trust_peer_link(&mut frame, link)?;
                }
                self.dispatch(now, frame, false)
            });
        if let Err(e) = &result {
            tracing::debug!(len = bytes.len(), error = %e, "dropped an incoming frame");
        }
        result
    }

    /// Acts on one decoded frame (delivered directly, or reassembled from chunks).
    fn dispatch(&mut self, now: Instant, frame: Frame, reassembled: bool) -> Result<(), InputError> {
        let kind = frame.main_str("type").ok_or_else(|| InputError::Protocol("no `type`".into()))?;
        match kind {
            "method" => self.handle_method(now, frame, reassembled),
            "client_disconnected" => {
                self.check_from_server(&frame)?;
                let data = frame.main.get("data").and_then(Value::as_map);
                let id = data.and_then(|d| d.get("id")).and_then(Value::as_str);
                let ws = data.and_then(|d| d.get("workspace")).and_then(Value::as_str);
                let (Some(id), Some(ws)) = (id, ws) else {
                    return Err(InputError::Protocol("client_disconnected without data.id/workspace".into()));
                };
                let peer = if id.contains('/') { id.to_string() } else { format!("{ws}/{id}") };
                self.peer_gone(now, &peer);
                self.events.push_back(Event::PeerDisconnected { peer });
                Ok(())
            }
            "peer_not_found" => {
                self.check_from_server(&frame)?;
                let merged = frame.merged();
                let peer = merged.get("peer_id").and_then(Value::as_str).map(String::from);
                if let Some(s) = merged.get("session").and_then(Value::as_str) {
                    if let Some(p) = self.sessions.get(s) {
                        let peer = peer.clone().unwrap_or_else(|| p.target.clone());
                        self.settle(now, s.to_string(), Err(CallError::PeerDisconnected { peer }));
                    }
                }
                if let Some(peer) = peer {
                    self.peer_gone(now, &peer);
                }
                Ok(())
            }
            _ => {
                let kind = kind.to_string();
                self.events.push_back(Event::ServerEvent { kind, message: frame.merged() });
                Ok(())
            }
        }
    }

    /// Deadlines reached: call timeouts, heartbeats, keep-alive pings, token refresh. Calling
    /// it early, late or twice is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let State::Handshaking { deadline } = self.state {
            if now >= deadline {
                self.fail_handshake(ConnectError::Timeout(self.config.handshake_timeout), false);
                self.transmits.push_back(Transmit::Close { code: 1000, reason: "handshake timeout".into() });
            }
        }
        while let Some((t, s)) = self.deadlines.first().cloned() {
            if t > now {
                break;
            }
            let Some(p) = self.sessions.get(&s) else {
                self.deadlines.pop_first();
                continue;
            };
            let (target, method, after) = (p.target.clone(), p.method.clone(), p.timeout);
            let err = if p.encrypted && !p.heard {
                CallError::NoReplyEncrypted { target, method, after }
            } else {
                CallError::Timeout { target, method, after }
            };
            self.settle(now, s, Err(err));
        }
        self.reassembly.expire(now, &self.config.limits);
        self.drop_exports(now, None);
        if !matches!(self.state, State::Ready | State::Registering) {
            return;
        }
        while let Some((t, id)) = self.beats.first().copied() {
            if t > now {
                break;
            }
            self.beats.pop_first();
            let Some(a) = self.active.get_mut(&id) else { continue };
            let Some(interval) = a.interval else { continue };
            let next = now + interval;
            a.beat_at = Some(next);
            self.beats.insert((next, id));
            let Some(addr) = slot_address(&a.route, &a.caller, a.session.as_deref(), Slot::Heartbeat) else {
                continue;
            };
            let parent = a.session.clone();
            let frame = self.fire_frame(addr, parent.as_deref(), None);
            self.transmits.push_back(Transmit::Binary(encode_frame(&frame)));
        }
        if self.next_ping.is_some_and(|t| t <= now) {
            self.transmits.push_back(Transmit::Text(connection::control("ping")));
            self.next_ping = Some(now + self.config.ping_interval);
        }
        if self.state == State::Ready && self.next_check.is_some_and(|t| t <= now) {
            self.next_check = self.config.registration_check_interval.map(|i| now + i);
            // Our services as the server lists them; the answer must name all of ours.
            let mut query = Map::new();
            query.push("workspace", self.workspace());
            query.push("client_id", self.config.client_id.as_str());
            let mut kwargs = Map::new();
            kwargs.push("include_unlisted", true);
            if let Ok(t) = self.manager_method("list_services") {
                let internal = Some(Internal::CheckRegistration);
                let _ = self.call_inner(
                    now,
                    &t,
                    vec![Value::Map(query)],
                    Some(kwargs),
                    CallOptions::default(),
                    internal,
                );
            }
        }
        if self.next_refresh.is_some_and(|t| t <= now) {
            self.transmits.push_back(Transmit::Text(connection::control("refresh_token")));
            self.next_refresh = Some(now + self.refresh_interval());
        }
    }

    // ---- commands ----------------------------------------------------------------------------

    /// Calls a remote function given by its descriptor (from `get_service`, or received as an
    /// argument). The result arrives as [`Event::CallSettled`] with the returned id.
    ///
    /// Local functions inside `args`/`kwargs` ([`local_function`]) become callbacks the callee
    /// may call until the call settles. While the connection is down (after a first
    /// connection), the frame waits and goes out after the reconnection; the timeout counts
    /// from now.
    pub fn call(
        &mut self,
        now: Instant,
        target: &Method,
        args: Vec<Value>,
        kwargs: Option<Map>,
        options: CallOptions,
    ) -> Result<CallId, EngineError> {
        self.call_inner(now, target, args, kwargs, options, None)
    }

    /// Calls a method of the workspace manager (`services.default.<name>`: `echo`,
    /// `list_services`, `generate_token`, ...).
    pub fn call_manager(
        &mut self,
        now: Instant,
        name: &str,
        args: Vec<Value>,
        kwargs: Option<Map>,
    ) -> Result<CallId, EngineError> {
        let target = self.manager_method(name)?;
        self.call_inner(now, &target, args, kwargs, CallOptions::default(), None)
    }

    /// Fetches a service through the manager. `id` takes every form the Python client accepts
    /// (`svc`, `client:svc`, `ws/client:svc`, `svc@app`). The result is the service map, whose
    /// functions are [`Method`] descriptors ready for [`Engine::call`]. `config` is the
    /// manager's `GetServiceConfig` (`mode`, `timeout`, `case_conversion`, ...); it is sent as
    /// the `config` keyword, as Python does, empty when `None`.
    pub fn get_service(
        &mut self,
        now: Instant,
        id: &str,
        config: Option<Map>,
    ) -> Result<CallId, EngineError> {
        let mut kwargs = Map::with_capacity(1);
        kwargs.push(Value::from_static("config"), config.unwrap_or_default());
        self.call_manager(now, "get_service", vec![id.into()], Some(kwargs))
    }

    /// Fetches service `service` straight from peer `peer` (`ws/client`), by calling its
    /// `built-in.get_service`: how services are found on a [`PeerLink`], where there is no
    /// manager. The result is the service map, as with [`Engine::get_service`].
    pub fn get_peer_service(
        &mut self,
        now: Instant,
        peer: &str,
        service: &str,
    ) -> Result<CallId, EngineError> {
        let target = Method {
            target: peer.into(),
            method: "services.built-in.get_service".into(),
            promise: Some(PromiseMode::Compact),
            ..Method::default()
        };
        self.call_inner(now, &target, vec![service.into()], None, CallOptions::default(), None)
    }

    /// Registers a service: the engine keeps it (and registers it again after every
    /// reconnection) and announces it to the manager. Replaces a service with the same id.
    /// The manager's answer settles the returned call (at the next connection if there is
    /// none now).
    pub fn register_service(&mut self, now: Instant, spec: ServiceSpec) -> Result<CallId, EngineError> {
        spec.validate()?;
        if spec.id == "built-in" || spec.id.starts_with("_rintf_") {
            return Err(EngineError::InvalidName { what: "service id (reserved)", value: spec.id });
        }
        if self.state == State::Closed {
            return Err(EngineError::Closed);
        }
        let id = spec.id.clone();
        match self.services.iter_mut().find(|s| s.id == id) {
            Some(s) => *s = spec,
            None => self.services.push(spec),
        }
        if self.config.peer.is_some() {
            // Served to the peer at once; there is no manager to tell.
            let call = self.new_call_id();
            let result = Ok(self.register_info(&id));
            self.events.push_back(Event::CallSettled { id: call, result });
            return Ok(call);
        }
        if self.state == State::Ready {
            let info = self.register_info(&id);
            let target = self.manager_method("register_service")?;
            let call = self.call_inner(now, &target, vec![info], None, CallOptions::default(), None)?;
            if let Some(p) = self.sessions.values_mut().find(|p| p.id == call) {
                p.registers = Some(id);
            }
            Ok(call)
        } else {
            let call = self.new_call_id();
            self.deferred_registrations.push((call, id));
            Ok(call)
        }
    }

    /// Stops serving a service and tells the manager.
    pub fn unregister_service(&mut self, now: Instant, id: &str) -> Result<CallId, EngineError> {
        let pos = self
            .services
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| EngineError::UnknownService(id.into()))?;
        self.services.remove(pos);
        match &self.info {
            Some(info) if self.state == State::Ready && self.config.peer.is_none() => {
                let full = format!("{}/{}:{id}", info.workspace, info.client_id);
                self.call_manager(now, "unregister_service", vec![full.into()], None)
            }
            other => {
                // Done locally; the manager hears of it after the reconnection (a half-open
                // old connection may still hold the registration server-side).
                if let Some(info) = other.as_ref().filter(|_| self.config.peer.is_none()) {
                    self.deferred_unregistrations.push(format!("{}/{}:{id}", info.workspace, info.client_id));
                }
                let call = self.new_call_id();
                self.events.push_back(Event::CallSettled { id: call, result: Ok(Value::Nil) });
                Ok(call)
            }
        }
    }

    /// Answers an [`Event::Invoke`]: `Ok(value)` resolves the caller's call, `Err(error)`
    /// rejects it with a remote error (message and traceback).
    pub fn reply(
        &mut self,
        now: Instant,
        id: InvokeId,
        result: Result<Value, RemoteError>,
    ) -> Result<(), EngineError> {
        let a = self.active.get(&id).ok_or(EngineError::UnknownInvocation)?;
        let mut payload = match result {
            Ok(v) => Ok(v),
            Err(e) => Err(e.to_value()),
        };
        // Returned local functions and generators live in a new session that only the caller
        // may call (Python: the callee's `S'`, PROTOCOL.md §5.4).
        let mut export_session = None;
        let mut created = Vec::new();
        if let Ok(v) = &mut payload {
            if contains_local_function(v) && !matches!(a.route, Route::None) {
                let max = self.config.limits.max_exports;
                if self.exports.len() >= max {
                    return Err(EngineError::LimitReached { what: "sessions of returned functions", max });
                }
                let peer = a.caller.clone();
                let s = self.rng.short_id();
                let mut locals = Locals { peer: peer.clone(), ..Locals::default() };
                self.replace_locals(v, &s, true, &mut locals);
                created = core::mem::take(&mut locals.interfaces);
                if let Some(e) = locals.error {
                    for sid in created {
                        self.interfaces.remove(&sid);
                    }
                    return Err(e);
                }
                if !locals.functions.is_empty() || !locals.generators.is_empty() {
                    let export = Export {
                        peer,
                        functions: locals.functions,
                        generators: locals.generators,
                        last_used: now,
                    };
                    self.exports.insert(s.clone(), export);
                    export_session = Some(s);
                }
            }
        }
        let a = self.active.remove(&id).ok_or(EngineError::UnknownInvocation)?;
        if let Some(t) = a.beat_at {
            self.beats.remove(&(t, id));
        }
        if let (Some((s, key)), Ok(v)) = (&a.generator, &payload) {
            if is_stop_iteration(v) {
                self.forget_generator(s, key);
            }
        }
        let (slot, value) = match payload {
            Ok(v) => (Slot::Resolve, v),
            Err(e) => (Slot::Reject, e),
        };
        if let Some(addr) = slot_address(&a.route, &a.caller, a.session.as_deref(), slot) {
            let to = addr.0.clone();
            let mut frame = self.fire_frame(addr, a.session.as_deref(), Some(value));
            if let Some(key) = a.reply_key {
                // An encrypted request is answered encrypted, whatever its promise form (it was
                // opened with this key, so sealing cannot fail).
                self.seal_frame(&mut frame, &key)?;
            }
            if let Err(e) = self.send_reply(now, to, a.session, encode_frame(&frame)) {
                // Nobody will ever hear of what the reply carried: free it.
                if let Some(s) = export_session {
                    self.release_export(&s);
                }
                for sid in created {
                    self.interfaces.remove(&sid);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Consumes one item of a remote generator (from a `_rtype: "generator"` value). The call
    /// resolves with the item, or with a value for which [`is_stop_iteration`] holds at the end.
    pub fn generator_next(&mut self, now: Instant, generator: &Generator) -> Result<CallId, EngineError> {
        let next = Method {
            target: generator.target.clone(),
            method: generator.method.clone(),
            promise: Some(PromiseMode::Compact),
            enc_pub: self.generator_key(generator),
            ..Method::default()
        };
        self.call(now, &next, Vec::new(), None, CallOptions::default())
    }

    /// The producer's key when it sent one (our own peers do) and encryption is on here.
    fn generator_key(&self, generator: &Generator) -> Option<Bytes> {
        self.crypto.as_ref()?;
        generator.other.get("_renc_pub").and_then(Value::as_bin).filter(|k| k.len() == KEY_LEN).cloned()
    }

    /// Closes a remote generator early so its producer frees it.
    pub fn generator_close(&mut self, now: Instant, generator: &Generator) -> Result<CallId, EngineError> {
        let method = generator.close_method.clone().unwrap_or_else(|| format!("{}:close", generator.method));
        let close = Method {
            target: generator.target.clone(),
            method,
            promise: Some(PromiseMode::Compact),
            enc_pub: self.generator_key(generator),
            ..Method::default()
        };
        self.call(now, &close, Vec::new(), None, CallOptions::default())
    }

    /// Closes for good: fails every pending call ([`CallError::Closed`]), drops invocations,
    /// uploads, partial messages, returned functions and generators (`GeneratorClosed`) and
    /// `_rintf` interfaces (`InterfaceDisposed`), and asks the driver to close the transport
    /// with code 1000.
    pub fn close(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        let was_connected =
            matches!(self.state, State::Registering | State::Ready | State::Handshaking { .. });
        self.state = State::Closed;
        let sessions: Vec<String> = self.sessions.keys().cloned().collect();
        for s in sessions {
            self.settle(now, s, Err(CallError::Closed));
        }
        for (pending, _) in core::mem::take(&mut self.deferred_registrations) {
            self.events.push_back(Event::CallSettled { id: pending, result: Err(CallError::Closed) });
        }
        self.active.clear();
        self.beats.clear();
        self.backlog.clear();
        self.transmits.clear();
        self.next_ping = None;
        self.next_refresh = None;
        self.next_check = None;
        // Everything we served or were sent goes too, with the events that tell the driver.
        self.drop_interfaces(None);
        let all: Vec<String> = self.exports.keys().cloned().collect();
        for s in all {
            self.release_export(&s);
        }
        self.uploads.clear();
        self.reassembly = Reassembly::default();
        if was_connected {
            self.transmits.push_back(Transmit::Close { code: 1000, reason: String::new() });
        }
    }

    // ---- internals: connection -----------------------------------------------------------------

    fn fail_handshake(&mut self, error: ConnectError, permanent: bool) {
        tracing::warn!(%error, permanent, "connection attempt failed");
        self.state = State::Idle;
        self.events.push_back(Event::ConnectionFailed { error, permanent });
    }

    fn refresh_interval(&self) -> Duration {
        let life = self.info.as_ref().and_then(|i| i.reconnection_token_life_time).unwrap_or(f64::INFINITY);
        let cap = if life.is_finite() && life > 0.0 {
            Duration::from_secs_f64(life / 1.5)
        } else {
            self.config.token_refresh_interval
        };
        self.config.token_refresh_interval.min(cap).max(Duration::from_secs(1))
    }

    fn connected(&mut self, now: Instant, info: ConnectionInfo) {
        if let Some(old) = &self.info {
            if old.manager_id != info.manager_id {
                // The server restarted: nobody will answer calls addressed to the old manager.
                let old_manager = old.manager_address();
                let dead = self.sessions_where(|p| p.target == old_manager);
                for s in dead {
                    let Some(p) = self.sessions.get(&s) else { continue };
                    let err =
                        CallError::ServerRestarted { target: p.target.clone(), method: p.method.clone() };
                    self.settle(now, s, Err(err));
                }
            }
        }
        if let Some(t) = &info.reconnection_token {
            self.reconnection_token = Some(t.clone());
        }
        self.me = Str::from(format!("{}/{}", info.workspace, self.config.client_id));
        self.info = Some(info);
        self.state = State::Registering;
        self.next_ping = Some(now + self.config.ping_interval);
        self.next_refresh = Some(now + self.refresh_interval());
        let builtin = self.builtin_spec().registration(self.workspace(), &self.config.client_id);
        if let Ok(target) = self.manager_method("register_service") {
            let _ = self.call_inner(
                now,
                &target,
                vec![builtin],
                None,
                CallOptions::default(),
                Some(Internal::Builtin),
            );
        }
    }

    fn became_ready(&mut self, now: Instant) {
        let reconnected = self.ever_ready;
        self.ever_ready = true;
        self.state = State::Ready;
        self.next_check = self.config.registration_check_interval.map(|i| now + i);
        let Some(info) = self.info.clone() else { return };
        tracing::info!(workspace = %info.workspace, manager = %info.manager_id, reconnected, "connected");
        self.events.push_back(Event::Connected { info, reconnected });
        if let Ok(t) = self.manager_method("subscribe") {
            let events = Value::Array(vec!["client_disconnected".into()]);
            let _ = self.call_inner(
                now,
                &t,
                vec![events],
                None,
                CallOptions::default(),
                Some(Internal::Subscribe),
            );
        }
        // Unregistrations made while the link was down, then every service we serve: each
        // user registration made or cut off meanwhile settles with its own call, the rest are
        // restored by the engine.
        for full in core::mem::take(&mut self.deferred_unregistrations) {
            if let Ok(t) = self.manager_method("unregister_service") {
                let internal = Some(Internal::Unregister);
                let _ = self.call_inner(now, &t, vec![full.into()], None, CallOptions::default(), internal);
            }
        }
        let deferred = core::mem::take(&mut self.deferred_registrations);
        let ids: Vec<String> = self.services.iter().map(|s| s.id.clone()).collect();
        for id in ids {
            let info = self.register_info(&id);
            let Ok(target) = self.manager_method("register_service") else { continue };
            let mut calls = deferred.iter().filter(|(_, d)| *d == id).map(|(c, _)| *c).peekable();
            if calls.peek().is_none() {
                let internal = Some(Internal::Restore(id.clone()));
                if let Err(e) =
                    self.call_inner(now, &target, vec![info], None, CallOptions::default(), internal)
                {
                    let error = CallError::Refused { reason: e.to_string() };
                    self.events.push_back(Event::ServiceRestoreFailed { service: id, error });
                }
                continue;
            }
            for call in calls {
                let sent = self.call_with_id(
                    now,
                    call,
                    &target,
                    vec![info.clone()],
                    None,
                    CallOptions::default(),
                    None,
                );
                match sent {
                    Ok(()) => {
                        if let Some(p) = self.sessions.values_mut().find(|p| p.id == call) {
                            p.registers = Some(id.clone());
                        }
                    }
                    Err(e) => {
                        let result = Err(CallError::Refused { reason: e.to_string() });
                        self.events.push_back(Event::CallSettled { id: call, result });
                    }
                }
            }
        }
        for (call, id) in deferred {
            if !self.services.iter().any(|s| s.id == id) {
                // Unregistered before it could be registered.
                self.events.push_back(Event::CallSettled { id: call, result: Ok(Value::Nil) });
            }
        }
        while let Some((session, b)) = self.backlog.pop_front() {
            if session.is_none_or(|s| self.sessions.contains_key(&s)) {
                self.transmits.push_back(Transmit::Binary(b));
            }
        }
    }

    fn check_from_server(&self, frame: &Frame) -> Result<(), InputError> {
        match frame.main.get("from") {
            None => Ok(()),
            Some(v) if v.as_str().is_some() && v.as_str() == self.manager_address().as_deref() => Ok(()),
            Some(_) => Err(InputError::Protocol("a system event from an ordinary client was ignored".into())),
        }
    }

    fn manager_address(&self) -> Option<String> {
        self.info.as_ref().filter(|_| self.config.peer.is_none()).map(ConnectionInfo::manager_address)
    }

    fn workspace(&self) -> &str {
        self.info.as_ref().map_or("", |i| i.workspace.as_str())
    }

    /// `ws/client`, fixed at each handshake.
    fn me(&self) -> &str {
        self.me.as_str()
    }

    fn builtin_spec(&self) -> ServiceSpec {
        service::builtin(self.workspace(), &self.config.client_id)
    }

    fn register_info(&self, id: &str) -> Value {
        match self.services.iter().find(|s| s.id == id) {
            Some(s) => s.registration(self.workspace(), &self.config.client_id),
            None => Value::Nil,
        }
    }

    fn manager_method(&self, name: &str) -> Result<Method, EngineError> {
        let manager = self.manager_address().ok_or(EngineError::NotConnected)?;
        Ok(Method {
            target: manager,
            method: format!("services.default.{name}"),
            promise: Some(PromiseMode::Compact),
            ..Method::default()
        })
    }

    // ---- internals: calls ----------------------------------------------------------------------

    fn new_call_id(&mut self) -> CallId {
        self.next_call += 1;
        CallId(self.next_call)
    }

    fn call_inner(
        &mut self,
        now: Instant,
        target: &Method,
        args: Vec<Value>,
        kwargs: Option<Map>,
        options: CallOptions,
        internal: Option<Internal>,
    ) -> Result<CallId, EngineError> {
        let id = self.new_call_id();
        self.call_with_id(now, id, target, args, kwargs, options, internal)?;
        Ok(id)
    }

    #[allow(clippy::too_many_arguments)]
    fn call_with_id(
        &mut self,
        now: Instant,
        id: CallId,
        target: &Method,
        mut args: Vec<Value>,
        kwargs: Option<Map>,
        options: CallOptions,
        internal: Option<Internal>,
    ) -> Result<(), EngineError> {
        match self.state {
            State::Closed => return Err(EngineError::Closed),
            _ if self.info.is_none() => return Err(EngineError::NotConnected),
            _ => {}
        }
        let limits = &self.config.limits;
        // The engine's own registration bookkeeping (a handful of calls) must get through even
        // when users filled the table, or the engine could never become ready again.
        let own = matches!(
            internal,
            Some(
                Internal::Builtin | Internal::Subscribe | Internal::Restore(_) | Internal::CheckRegistration
            )
        );
        if !own && self.sessions.len() >= limits.max_pending_calls {
            return Err(EngineError::LimitReached { what: "pending calls", max: limits.max_pending_calls });
        }
        let wants_reply = matches!(target.promise, Some(PromiseMode::Compact | PromiseMode::Full));
        let session = wants_reply.then(|| self.rng.short_id());
        let default = if target.method.contains("_rintf_") {
            self.config.rintf_timeout
        } else {
            self.config.method_timeout
        };
        let timeout = options.timeout.unwrap_or(default);
        let me_str = self.me.clone();
        let to = if target.target.contains('/') {
            target.target.clone()
        } else {
            format!("{}/{}", self.workspace(), target.target)
        };

        // Local functions and generators live in this call's session until it settles.
        let mut locals = Locals { peer: to.clone(), ..Locals::default() };
        let with_kwargs = kwargs.is_some();
        if let Some(kw) = kwargs {
            args.push(Value::Map(kw));
        }
        if args.iter().any(contains_local_function) {
            let Some(s) = &session else { return Err(EngineError::CallbackWithoutReply) };
            let s = s.clone();
            for a in &mut args {
                self.replace_locals(a, &s, false, &mut locals);
            }
            if let Some(e) = locals.error.take() {
                for sid in core::mem::take(&mut locals.interfaces) {
                    self.interfaces.remove(&sid);
                }
                return Err(e);
            }
        }

        let mut main = Map::with_capacity(6);
        main.push(Value::from_static("type"), Value::from_static("method"));
        main.push(Value::from_static("from"), me_str);
        main.push(Value::from_static("to"), to.as_str());
        main.push(Value::from_static("method"), target.method.as_str());
        if let Some(p) = &options.parent {
            main.push(Value::from_static("parent"), p.as_str());
        }
        if let Some(s) = &session {
            main.push(Value::from_static("session"), s.as_str());
        }
        if self.config.peer.is_some() {
            // No server writes these on a peer link, and hypha-rpc reads both from the context
            // of a reassembled message (`message_cache.process`), failing without them. The
            // peer must not believe them (we never do, see `PeerLink`).
            main.push(Value::from_static("ws"), self.workspace());
            main.push(Value::from_static("user"), Value::Nil);
        }
        let mut extra = Map::with_capacity(4);
        if !args.is_empty() {
            extra.push(Value::from_static("args"), Value::Array(args));
        }
        if with_kwargs {
            extra.push(Value::from_static("with_kwargs"), true);
        }
        match (target.promise, &session) {
            (Some(PromiseMode::Compact), Some(_)) => {
                extra.push(Value::from_static("promise"), Value::from_static("*"));
                extra.push(Value::from_static("t"), timeout.as_secs_f64() / 2.0);
            }
            (Some(PromiseMode::Full), Some(s)) => {
                let bare = self.config.client_id.as_str();
                let slot = |name: &str| {
                    Method {
                        target: bare.into(),
                        method: format!("{s}.{name}"),
                        promise: Some(PromiseMode::None),
                        ..Method::default()
                    }
                    .to_value()
                };
                let mut promise = Map::with_capacity(4);
                promise.push(Value::from_static("heartbeat"), slot("heartbeat"));
                promise.push(Value::from_static("interval"), timeout.as_secs_f64() / 2.0);
                promise.push(Value::from_static("resolve"), slot("resolve"));
                promise.push(Value::from_static("reject"), slot("reject"));
                extra.push(Value::from_static("promise"), promise);
            }
            _ => {}
        }
        let mut frame = Frame { main, extra: (!extra.is_empty()).then_some(extra) };
        let encrypted = match target.enc_pub.as_deref() {
            Some(key) => {
                let key: [u8; KEY_LEN] = key.try_into().map_err(|_| {
                    EngineError::Encryption(format!("the public key of {to} is {} bytes, not 32", key.len()))
                })?;
                self.seal_frame(&mut frame, &key)?;
                true
            }
            None => false,
        };
        let bytes = encode_frame(&frame);
        // Registered before anything is sent, so a chunked upload's progress finds it; undone
        // below if the frame cannot be sent.
        let created = core::mem::take(&mut locals.interfaces);
        if let Some(s) = &session {
            let deadline = now + timeout;
            self.deadlines.insert((deadline, s.clone()));
            let pending = Pending {
                id,
                target: to.clone(),
                method: target.method.clone(),
                timeout,
                deadline,
                internal: internal.clone(),
                callbacks: locals.functions,
                generators: locals.generators,
                registers: None,
                encrypted,
                heard: false,
            };
            self.sessions.insert(s.clone(), Box::new(pending));
        }
        let sent = match &internal {
            // The engine's own registration calls go out while still registering.
            Some(
                Internal::Builtin | Internal::Subscribe | Internal::Restore(_) | Internal::CheckRegistration,
            ) => {
                self.transmits.push_back(Transmit::Binary(bytes));
                Ok(())
            }
            Some(Internal::Chunk { .. } | Internal::Unregister) => self.send(bytes),
            None if bytes.len() > self.chunk_threshold() => {
                let key = self.rng.short_id();
                self.start_upload(now, to.clone(), key, false, bytes, session.clone())
            }
            None => self.send_for(session.as_deref(), bytes),
        };
        if let Err(e) = sent {
            if let Some(s) = &session {
                self.forget_session(s);
            }
            for sid in created {
                self.interfaces.remove(&sid);
            }
            return Err(e);
        }
        if session.is_none() {
            self.events.push_back(Event::CallSettled { id, result: Ok(Value::Nil) });
        }
        Ok(())
    }

    /// Sends a user frame now, or queues it until the connection is back.
    fn send(&mut self, bytes: Bytes) -> Result<(), EngineError> {
        self.send_for(None, bytes)
    }

    /// Like [`Engine::send`], for a frame of the call with session `session`: if that call
    /// settles (times out) while the frame waits, the frame is dropped.
    fn send_for(&mut self, session: Option<&str>, bytes: Bytes) -> Result<(), EngineError> {
        if self.state == State::Ready {
            self.transmits.push_back(Transmit::Binary(bytes));
            return Ok(());
        }
        let max = self.config.limits.max_queued_frames;
        if self.backlog.len() >= max {
            return Err(EngineError::LimitReached { what: "queued frames", max });
        }
        self.backlog.push_back((session.map(String::from), bytes));
        Ok(())
    }

    /// A fire-and-forget frame calling a reply slot `(target, method)` with `parent`.
    fn fire_frame(&self, slot: (String, String), parent: Option<&str>, value: Option<Value>) -> Frame {
        let mut main = Map::with_capacity(5);
        main.push(Value::from_static("type"), Value::from_static("method"));
        main.push(Value::from_static("from"), self.me.clone());
        main.push(Value::from_static("to"), slot.0);
        main.push(Value::from_static("method"), slot.1);
        if let Some(p) = parent {
            main.push(Value::from_static("parent"), p);
        }
        let extra = value.map(|v| {
            let mut e = Map::with_capacity(1);
            e.push(Value::from_static("args"), Value::Array(vec![v]));
            e
        });
        Frame { main, extra }
    }

    /// The sessions of pending calls that match `f` (collected, so the caller may settle them).
    fn sessions_where(&self, f: impl Fn(&Pending) -> bool) -> Vec<String> {
        self.sessions.iter().filter(|(_, p)| f(p)).map(|(s, _)| s.clone()).collect()
    }

    fn forget_session(&mut self, s: &str) -> Option<Pending> {
        let p = self.sessions.remove(s)?;
        self.deadlines.remove(&(p.deadline, s.to_string()));
        Some(*p)
    }

    /// Settles the call of session `s` exactly once and frees its state.
    fn settle(&mut self, now: Instant, s: String, result: Result<Value, CallError>) {
        let Some(p) = self.forget_session(&s) else { return };
        if let Err(e) = &result {
            tracing::debug!(target = %p.target, method = %p.method, error = %e, "call failed");
        }
        match p.internal {
            None => self.events.push_back(Event::CallSettled { id: p.id, result }),
            Some(Internal::Builtin) => match result {
                Ok(_) => self.became_ready(now),
                Err(e) => {
                    // The state stays as it is until the driver reports the transport closed,
                    // so `handle_transport_closed` does the whole clean-up (interfaces,
                    // uploads, Disconnected) as for any other lost connection.
                    self.events.push_back(Event::ConnectionFailed {
                        error: ConnectError::BuiltinRejected(e.to_string()),
                        permanent: false,
                    });
                    self.transmits
                        .push_back(Transmit::Close { code: 1000, reason: "built-in rejected".into() });
                }
            },
            Some(Internal::Subscribe) => {}
            Some(Internal::Restore(service)) => {
                if let Err(error) = result {
                    self.events.push_back(Event::ServiceRestoreFailed { service, error });
                }
            }
            Some(Internal::Chunk { upload, step }) => self.upload_progress(now, upload, step, result),
            Some(Internal::Unregister) => {}
            Some(Internal::CheckRegistration) => {
                // A listing that lacks one of ours, or no answer at all (replies no longer
                // routed to us); other errors (an older server) prove nothing.
                let lost = match &result {
                    Ok(Value::Array(listed)) => {
                        let ids: Vec<&str> =
                            listed.iter().filter_map(|s| s.as_map()?.get("id")?.as_str()).collect();
                        let mine =
                            core::iter::once("built-in").chain(self.services.iter().map(|s| s.id.as_str()));
                        let missing = mine.map(|id| format!("{}:{id}", self.me)).find(|full| {
                            !ids.iter().any(|l| l == full || l.starts_with(&format!("{full}@")))
                        });
                        missing.map(|m| format!("the server no longer lists {m}"))
                    }
                    Err(CallError::Timeout { .. }) => Some("no answer from the manager".into()),
                    // The server dropped this connection while our socket stays open: only a
                    // new connection helps (the driver reconnects after the close).
                    Err(CallError::Remote { message, .. })
                        if message.contains("Connection has already been closed") =>
                    {
                        tracing::warn!(%message, "the server dropped this connection; reconnecting");
                        self.transmits.push_back(Transmit::Close {
                            code: 1000,
                            reason: "connection lost server-side".into(),
                        });
                        None
                    }
                    _ => None,
                };
                if let Some(e) = lost {
                    if self.state == State::Ready {
                        // The server forgot us while the socket stayed open: register again
                        // (built-in first, then every service); if even that fails, the
                        // built-in failure path asks the driver to reconnect.
                        tracing::warn!(error = %e, "the server no longer lists our built-in service");
                        self.state = State::Registering;
                        let builtin =
                            self.builtin_spec().registration(self.workspace(), &self.config.client_id);
                        if let Ok(target) = self.manager_method("register_service") {
                            let internal = Some(Internal::Builtin);
                            let _ = self.call_inner(
                                now,
                                &target,
                                vec![builtin],
                                None,
                                CallOptions::default(),
                                internal,
                            );
                        }
                    }
                }
            }
        }
    }

    /// A peer left: fail calls to it, drop invocations from it.
    fn peer_gone(&mut self, now: Instant, peer: &str) {
        self.reassembly.forget_owner(peer);
        self.drop_exports(now, Some(peer));
        self.drop_interfaces(Some(peer));
        let dead = self.sessions_where(|p| p.target == peer);
        for s in dead {
            self.settle(now, s, Err(CallError::PeerDisconnected { peer: peer.into() }));
        }
        for (id, a) in self.active.iter_mut() {
            // Advisory only: the caller may come back under the same id (a reconnection), and
            // then the reply still reaches it, as with Python; heartbeats and the reply go out
            // as usual, and the server drops them if it never does.
            if a.caller == peer && !a.cancelled {
                a.cancelled = true;
                self.events.push_back(Event::InvokeCancelled { id: *id });
            }
        }
    }
}
