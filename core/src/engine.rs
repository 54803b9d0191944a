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
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use bytes::Bytes;

use crate::chunk::Reassembly;
use crate::codec::rtype::{Generator, Method, MethodLayout, PromiseMode, RTypeCodec, RemoteError};
use crate::codec::{Frame, decode_frame, encode_frame};
use crate::connection::{self, ConnectionInfo, Control};
use crate::error::{CallError, ConnectError, EngineError, InputError};
use crate::event::{CallId, Context, Event, FnId, GenId, Invocation, InvokeId, InvokeTarget, Transmit};
use crate::rng::Rng;
use crate::service::{self, ServiceSpec, Visibility};
use crate::time::{Duration, Instant};
use crate::{Limits, Map, Str, Value};

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

fn parse_local_generator(v: &Value) -> Option<GenId> {
    match v {
        Value::Ext(LOCAL_GENERATOR_EXT, p) if p.len() == 8 => {
            Some(GenId(u64::from_be_bytes(p[..8].try_into().ok()?)))
        }
        _ => None,
    }
}

/// `true` for the `{_rtype: "stop_iteration"}` a remote generator answers at its end.
pub fn is_stop_iteration(v: &Value) -> bool {
    v.rtype() == Some("stop_iteration")
}

fn parse_local_function(v: &Value) -> Option<(FnId, String)> {
    match v {
        Value::Ext(LOCAL_FUNCTION_EXT, p) if p.len() >= 8 => {
            let id = u64::from_be_bytes(p[..8].try_into().ok()?);
            let name = core::str::from_utf8(&p[8..]).ok()?;
            Some((FnId(id), name.into()))
        }
        _ => None,
    }
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
            limits: Limits::default(),
            chunk_size: 262_144,
            transport_max_message: 16 * 1024 * 1024,
            seed: 0,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkStep {
    Create,
    Set(usize),
    Process,
    Remove,
}

/// A large message we are uploading to a peer's `message_cache` (PROTOCOL.md §7.2).
#[derive(Debug)]
struct Upload {
    /// The receiver, `ws/client`.
    target: String,
    /// The cache key: the receiver's session for replies, a fresh id otherwise.
    key: String,
    /// `true` for replies: each step also counts as a heartbeat of the receiver's call.
    heartbeat: bool,
    /// The whole frame.
    data: Bytes,
    chunk: usize,
    /// Next chunk index to send, and chunks acknowledged.
    next: usize,
    acked: usize,
    /// The session of our call this message is, if it is one.
    call_session: Option<String>,
}

impl Upload {
    fn chunks(&self) -> usize {
        self.data.len().div_ceil(self.chunk)
    }
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
}

/// Local functions and generators we returned in a reply, kept in a session of ours that
/// only the peer we answered may call (PROTOCOL.md §5.4, §8).
#[derive(Debug)]
struct Export {
    peer: String,
    functions: Vec<(String, FnId)>,
    generators: Vec<(String, GenId)>,
    last_used: Instant,
}

/// What `replace_locals` found in a value.
#[derive(Debug, Default)]
struct Locals {
    /// The peer the value goes to: the only one allowed to call `_rintf` interfaces in it.
    peer: String,
    functions: Vec<(String, FnId)>,
    generators: Vec<(String, GenId)>,
    /// Set when an interface could not be created (limit reached).
    error: Option<EngineError>,
}

/// A `_rintf` object we sent: a local-only service `_rintf_<id>` that only `peer` may call,
/// until it calls `_dispose`, leaves, or we reconnect (PROTOCOL.md §9).
#[derive(Debug)]
struct Interface {
    peer: String,
    functions: Vec<(String, FnId)>,
}

/// Where the replies of an incoming call go (PROTOCOL.md §5.2).
#[derive(Debug, Default)]
enum Route {
    /// Fire and forget: no reply.
    #[default]
    None,
    /// `promise: "*"`: `<session>.resolve|reject|heartbeat` at the caller, built when used.
    Compact,
    /// A full promise object: the resolve, reject and heartbeat slots as sent (targets
    /// qualified).
    Full(Box<[Option<Method>; 3]>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Resolve,
    Reject,
    Heartbeat,
}

#[derive(Debug)]
struct Active {
    caller: String,
    session: Option<String>,
    route: Route,
    /// Heartbeat interval, when the caller asked for heartbeats.
    interval: Option<Duration>,
    beat_at: Option<Instant>,
    cancelled: bool,
    /// For a generator's `next`: its session and key, so the end frees it.
    generator: Option<(String, String)>,
}

/// The (target, method) of a reply slot, or `None` when the caller did not ask for it.
fn slot_address(route: &Route, caller: &str, session: Option<&str>, slot: Slot) -> Option<(String, String)> {
    match route {
        Route::None => None,
        Route::Compact => {
            let name = match slot {
                Slot::Resolve => "resolve",
                Slot::Reject => "reject",
                Slot::Heartbeat => "heartbeat",
            };
            Some((caller.to_string(), format!("{}.{name}", session?)))
        }
        Route::Full(slots) => {
            let [resolve, reject, heartbeat] = &**slots;
            let m = match slot {
                Slot::Resolve => resolve,
                Slot::Reject => reject,
                Slot::Heartbeat => heartbeat,
            };
            m.as_ref().map(|m| (m.target.clone(), m.method.clone()))
        }
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
    sessions: BTreeMap<String, Pending>,
    deadlines: BTreeSet<(Instant, String)>,
    active: BTreeMap<InvokeId, Active>,
    beats: BTreeSet<(Instant, InvokeId)>,
    next_call: u64,
    next_invoke: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// Frames waiting for the connection, with the session of the call each belongs to (a
    /// frame whose call settled meanwhile is dropped, never sent late).
    backlog: VecDeque<(Option<String>, Bytes)>,
    next_ping: Option<Instant>,
    next_refresh: Option<Instant>,
    ever_ready: bool,
    me: Str,
    reassembly: Reassembly,
    uploads: BTreeMap<u64, Upload>,
    next_upload: u64,
    exports: BTreeMap<String, Export>,
    interfaces: BTreeMap<String, Interface>,
}

/// Chunk uploads in flight per message, as the Python client does.
const UPLOAD_WINDOW: usize = 30;

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
            sessions: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            active: BTreeMap::new(),
            beats: BTreeSet::new(),
            next_call: 0,
            next_invoke: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            backlog: VecDeque::new(),
            next_ping: None,
            next_refresh: None,
            ever_ready: false,
            me: Str::default(),
            reassembly: Reassembly::default(),
            uploads: BTreeMap::new(),
            next_upload: 0,
            exports: BTreeMap::new(),
            interfaces: BTreeMap::new(),
        }
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
                // Binary frames the driver never took go out again after the reconnection.
                let unsent: Vec<_> = self.transmits.drain(..).collect();
                for t in unsent.into_iter().rev() {
                    if let Transmit::Binary(b) = t {
                        self.backlog.push_front((None, b));
                    }
                }
                // A user's registration cut off here is redone, and settled, after reconnecting.
                let cut: Vec<String> = self
                    .sessions
                    .iter()
                    .filter(|(_, p)| p.registers.is_some())
                    .map(|(s, _)| s.clone())
                    .collect();
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
                let internal: Vec<String> = self
                    .sessions
                    .iter()
                    .filter(|(_, p)| p.internal.is_some())
                    .map(|(s, _)| s.clone())
                    .collect();
                for s in internal {
                    self.forget_session(&s);
                }
                // `_rintf` services die with the connection: no zombies on the server or here.
                self.drop_interfaces(None);
                self.events.push_back(Event::Disconnected { code, reason: reason.into() });
            }
            State::Idle | State::Closed => {}
        }
    }

    /// A text frame from the transport.
    pub fn handle_text(&mut self, now: Instant, text: &str) -> Result<(), InputError> {
        if text.len() > self.config.limits.max_frame_bytes {
            return Err(InputError::BadText("text frame too large".into()));
        }
        let control = connection::parse_control(text).map_err(InputError::BadText)?;
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
        let frame = decode_frame(bytes, &self.config.limits)?;
        self.dispatch(now, frame, false)
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
            let err =
                CallError::Timeout { target: p.target.clone(), method: p.method.clone(), after: p.timeout };
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
            Some(info) if self.state == State::Ready => {
                let full = format!("{}/{}:{id}", info.workspace, info.client_id);
                self.call_manager(now, "unregister_service", vec![full.into()], None)
            }
            other => {
                // Done locally; the manager hears of it after the reconnection (a half-open
                // old connection may still hold the registration server-side).
                if let Some(info) = other {
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
        if let Ok(v) = &mut payload {
            if contains_local_function(v) && !a.cancelled && !matches!(a.route, Route::None) {
                let max = self.config.limits.max_exports;
                if self.exports.len() >= max {
                    return Err(EngineError::LimitReached { what: "sessions of returned functions", max });
                }
                let peer = a.caller.clone();
                let s = self.rng.short_id();
                let mut locals = Locals { peer: peer.clone(), ..Locals::default() };
                self.replace_locals(v, &s, true, &mut locals);
                if let Some(e) = locals.error {
                    return Err(e);
                }
                if !locals.functions.is_empty() || !locals.generators.is_empty() {
                    let export = Export {
                        peer,
                        functions: locals.functions,
                        generators: locals.generators,
                        last_used: now,
                    };
                    self.exports.insert(s, export);
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
        if a.cancelled {
            return Ok(());
        }
        let (slot, value) = match payload {
            Ok(v) => (Slot::Resolve, v),
            Err(e) => (Slot::Reject, e),
        };
        if let Some(addr) = slot_address(&a.route, &a.caller, a.session.as_deref(), slot) {
            let to = addr.0.clone();
            let frame = self.fire_frame(addr, a.session.as_deref(), Some(value));
            self.send_reply(now, to, a.session, encode_frame(&frame))?;
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
            ..Method::default()
        };
        self.call(now, &next, Vec::new(), None, CallOptions::default())
    }

    /// Closes a remote generator early so its producer frees it.
    pub fn generator_close(&mut self, now: Instant, generator: &Generator) -> Result<CallId, EngineError> {
        let method = generator.close_method.clone().unwrap_or_else(|| format!("{}:close", generator.method));
        let close = Method {
            target: generator.target.clone(),
            method,
            promise: Some(PromiseMode::Compact),
            ..Method::default()
        };
        self.call(now, &close, Vec::new(), None, CallOptions::default())
    }

    /// Closes for good: fails every pending call ([`CallError::Closed`]), drops invocations, and
    /// asks the driver to close the transport with code 1000.
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
        if was_connected {
            self.transmits.push_back(Transmit::Close { code: 1000, reason: String::new() });
        }
    }

    // ---- internals: connection -----------------------------------------------------------------

    fn fail_handshake(&mut self, error: ConnectError, permanent: bool) {
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
                let dead: Vec<String> = self
                    .sessions
                    .iter()
                    .filter(|(_, p)| p.target == old_manager)
                    .map(|(s, _)| s.clone())
                    .collect();
                for s in dead {
                    let p = &self.sessions[&s];
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
        let Some(info) = self.info.clone() else { return };
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
                let internal = Some(Internal::Restore(id));
                let _ = self.call_inner(now, &target, vec![info], None, CallOptions::default(), internal);
                continue;
            }
            for call in calls {
                let _ = self.call_with_id(
                    now,
                    call,
                    &target,
                    vec![info.clone()],
                    None,
                    CallOptions::default(),
                    None,
                );
                if let Some(p) = self.sessions.values_mut().find(|p| p.id == call) {
                    p.registers = Some(id.clone());
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
        self.info.as_ref().map(ConnectionInfo::manager_address)
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

    // ---- internals: incoming calls -------------------------------------------------------------

    fn handle_method(&mut self, now: Instant, mut frame: Frame, reassembled: bool) -> Result<(), InputError> {
        // Envelope keys come from `main` only (the server wrote `from`, `ws`, `user`); the
        // payload keys from `extra` only. A forged `from` inside `extra` is never read.
        let main_str = |k: &str| frame.main.get(k).and_then(Value::as_str).map(String::from);
        let from =
            main_str("from").ok_or_else(|| InputError::Protocol("method frame without `from`".into()))?;
        let method =
            main_str("method").ok_or_else(|| InputError::Protocol("method frame without `method`".into()))?;
        let session = main_str("session");
        let parent = main_str("parent");
        let (remote_ws, _) = split_client(&from);
        let remote_ws = remote_ws.to_string();
        let my_ws = self.workspace();
        if let Some(to) = main_str("to") {
            let to_ws = split_client(&to).0;
            if !to_ws.is_empty() && to_ws != my_ws {
                return Err(InputError::Protocol(format!("workspace mismatch: frame for {to}")));
            }
        }
        let mut extra_map = frame.extra.take().unwrap_or_default();
        let extra = &extra_map;

        // Where replies go (PROTOCOL.md §5.2).
        let (route, interval) = self.promise_route(extra, &from, session.as_deref())?;

        // Resolve the method path.
        let mut generator_key = None;
        let target = if let Some(rest) = method.strip_prefix("services._rintf_") {
            let (svc, path) = rest.split_once('.').unwrap_or((rest, ""));
            let svc = format!("_rintf_{svc}");
            match self.interfaces.get(&svc) {
                // Only the peer it was sent to: stricter than Python, which lets any client of
                // our workspace call it.
                Some(i) if i.peer != from => {
                    Err(format!("Permission denied for invoking protected method {method}"))
                }
                Some(_) if path == "_dispose" => {
                    if let Some(i) = self.interfaces.remove(&svc) {
                        let functions = i.functions.into_iter().map(|(_, f)| f).collect();
                        self.events.push_back(Event::InterfaceDisposed { service: svc, functions });
                    }
                    return self.answer_now(now, &route, &from, session.as_deref(), Ok(Value::Nil));
                }
                Some(i) => match i.functions.iter().find(|(k, _)| k == path) {
                    Some((_, f)) => Ok(Some(InvokeTarget::Interface { service: svc.clone(), function: *f })),
                    None => Err(format!("Method expired or not found: {from}:{method}")),
                },
                None => Err(format!("Method expired or not found: {from}:{method}")),
            }
        } else if let Some(rest) = method.strip_prefix("services.") {
            let (svc, path) = rest.split_once('.').unwrap_or((rest, ""));
            self.resolve_service_call(&from, &remote_ws, svc, path, &method)
        } else {
            let (s, rest) = method.split_once('.').unwrap_or((method.as_str(), ""));
            if let Some(x) = self.exports.get_mut(s) {
                // A function or generator we returned earlier.
                x.last_used = now;
                if x.peer != from {
                    Err(format!("Access denied for method call ({method}) from {from}"))
                } else if let Some(key) = rest.strip_suffix(":close") {
                    let found = x.generators.iter().position(|(k, _)| k == key);
                    let closed = found.map(|i| x.generators.remove(i).1);
                    let s = s.to_string();
                    self.drop_export_if_empty(&s);
                    if let Some(generator) = closed {
                        self.events.push_back(Event::GeneratorClosed { generator });
                    }
                    // Closing twice, or after the end, is harmless (`true`, as Python).
                    return self.answer_now(now, &route, &from, session.as_deref(), Ok(Value::Bool(true)));
                } else if let Some((_, g)) = x.generators.iter().find(|(k, _)| k == rest) {
                    generator_key = Some((s.to_string(), rest.to_string()));
                    Ok(Some(InvokeTarget::GeneratorNext { generator: *g }))
                } else if let Some((_, f)) = x.functions.iter().find(|(k, _)| k == rest) {
                    Ok(Some(InvokeTarget::Returned { function: *f }))
                } else {
                    Err(format!("Method expired or not found: {from}:{method}"))
                }
            } else {
                match self.sessions.get(s) {
                    None if matches!(rest, "resolve" | "reject" | "heartbeat") => return Ok(()), // late reply
                    // Closing a generator that already ended or was closed is harmless: `true`.
                    None if rest.ends_with(":close") => {
                        return self.answer_now(
                            now,
                            &route,
                            &from,
                            session.as_deref(),
                            Ok(Value::Bool(true)),
                        );
                    }
                    None => Err(format!("Session not found: {from}:{method}")),
                    Some(p) if p.target != from => {
                        Err(format!("Access denied for method call ({method}) from {from}"))
                    }
                    Some(p) => match rest {
                        "heartbeat" => {
                            let key = s.to_string();
                            self.touch_session(now, &key, true);
                            return Ok(());
                        }
                        "resolve" | "reject" => {
                            let mut value =
                                extra.get("args").and_then(Value::as_array).and_then(|a| a.first()).cloned();
                            if let Some(v) = &mut value {
                                if sanitize_incoming(v, &remote_ws).is_err() {
                                    let err =
                                        CallError::BadReply("reply carries a reserved ext value".into());
                                    self.settle(now, s.to_string(), Err(err));
                                    return Ok(());
                                }
                            }
                            let result = if rest == "resolve" {
                                Ok(value.unwrap_or_default())
                            } else {
                                Err(remote_error(value.as_ref()))
                            };
                            self.settle(now, s.to_string(), result);
                            return Ok(());
                        }
                        key => {
                            if let Some((_, f)) = p.callbacks.iter().find(|(k, _)| k == key) {
                                Ok(Some(InvokeTarget::Callback { function: *f, call: p.id }))
                            } else if let Some((_, g)) = p.generators.iter().find(|(k, _)| k == key) {
                                generator_key = Some((s.to_string(), key.to_string()));
                                Ok(Some(InvokeTarget::GeneratorNext { generator: *g }))
                            } else if let Some(k) = key.strip_suffix(":close") {
                                let id = p.generators.iter().find(|(g, _)| g == k).map(|(_, id)| *id);
                                if let Some(p) = self.sessions.get_mut(s) {
                                    p.generators.retain(|(g, _)| g != k);
                                }
                                if let Some(generator) = id {
                                    self.events.push_back(Event::GeneratorClosed { generator });
                                }
                                return self.answer_now(
                                    now,
                                    &route,
                                    &from,
                                    session.as_deref(),
                                    Ok(Value::Bool(true)),
                                );
                            } else {
                                Err(format!("Method expired or not found: {from}:{method}"))
                            }
                        }
                    },
                }
            }
        };
        let target = match target {
            Ok(Some(t)) => t,
            Ok(None) => {
                // The built-in service, answered here.
                let path = method.strip_prefix("services.built-in.").unwrap_or_default().to_string();
                if reassembled && path.starts_with("message_cache.") {
                    let err = RemoteError {
                        message: "nested chunked messages are refused".into(),
                        ..RemoteError::default()
                    };
                    return self.answer_now(now, &route, &from, session.as_deref(), Err(err));
                }
                let (result, message) = self.builtin_call(now, &path, extra, &frame);
                self.answer_now(now, &route, &from, session.as_deref(), result)?;
                return match message {
                    Some(m) => self.dispatch(now, m, true),
                    None => Ok(()),
                };
            }
            Err(message) => {
                let err = RemoteError {
                    message: message.clone(),
                    trace: Some(format!("Exception: {message}\n")),
                    other: Map::new(),
                };
                self.answer_now(now, &route, &from, session.as_deref(), Err(err))?;
                return Err(InputError::Protocol(message));
            }
        };

        if self.active.len() >= self.config.limits.max_active_invocations {
            let message =
                format!("Too many concurrent calls (limit {})", self.config.limits.max_active_invocations);
            let err = RemoteError { message, trace: None, other: Map::new() };
            return self.answer_now(now, &route, &from, session.as_deref(), Err(err));
        }

        let with_kwargs = extra.get("with_kwargs").and_then(Value::as_bool).unwrap_or(false);
        let mut args = match extra_map.remove("args") {
            Some(Value::Array(a)) => a,
            _ => Vec::new(),
        };
        for a in &mut args {
            if sanitize_incoming(a, &remote_ws).is_err() {
                let err = RemoteError {
                    message: "reserved ext value in arguments".into(),
                    trace: None,
                    other: Map::new(),
                };
                return self.answer_now(now, &route, &from, session.as_deref(), Err(err));
            }
        }
        let mut kwargs = None;
        let trailing_rkwargs = args
            .last()
            .and_then(Value::as_map)
            .is_some_and(|m| m.get("_rkwargs") == Some(&Value::Bool(true)));
        if with_kwargs || trailing_rkwargs {
            match args.pop() {
                Some(Value::Map(mut m)) => {
                    m.remove("_rkwargs");
                    kwargs = Some(m);
                }
                _ => {
                    let err = RemoteError {
                        message: "with_kwargs set but the last argument is not a map".into(),
                        trace: None,
                        other: Map::new(),
                    };
                    return self.answer_now(now, &route, &from, session.as_deref(), Err(err));
                }
            }
        }
        let context = match &target {
            InvokeTarget::Service { service, function } => {
                let wants = self
                    .services
                    .iter()
                    .find(|s| s.id == *service)
                    .is_some_and(|s| s.wants_context(function));
                wants.then(|| Context {
                    from: from.clone(),
                    to: self.me().to_string(),
                    ws: frame.main.get("ws").and_then(Value::as_str).unwrap_or(&remote_ws).to_string(),
                    user: frame.main.get("user").cloned().unwrap_or_default(),
                    method: method.clone(),
                    session: session.clone(),
                    parent: parent.clone(),
                    connection_type: "websocket",
                })
            }
            _ => None,
        };
        self.next_invoke += 1;
        let id = InvokeId(self.next_invoke);
        let wants_reply = !matches!(route, Route::None);
        let beat_at = interval.map(|_| now);
        if let Some(t) = beat_at {
            // Due at once, sent only if the driver has not replied by its next timeout check:
            // a handler that answers synchronously costs no heartbeat.
            self.beats.insert((t, id));
        }
        self.active.insert(
            id,
            Active {
                caller: from.clone(),
                session: session.clone(),
                route,
                interval,
                beat_at,
                cancelled: false,
                generator: generator_key,
            },
        );
        self.events.push_back(Event::Invoke(Invocation {
            id,
            target,
            args,
            kwargs,
            context,
            caller: from,
            session,
            wants_reply,
        }));
        Ok(())
    }

    /// `Ok(Some)` for a user service function, `Ok(None)` for `built-in`, `Err` with Python's
    /// message when the path names nothing callable or the caller may not call it.
    fn resolve_service_call(
        &self,
        from: &str,
        remote_ws: &str,
        svc: &str,
        path: &str,
        method: &str,
    ) -> Result<Option<InvokeTarget>, String> {
        if svc == "built-in" {
            return match self.builtin_spec().function_at(path) {
                Some(_) => Ok(None),
                None => Err(format!("Method expired or not found: {from}:{method}")),
            };
        }
        let spec = self.services.iter().find(|s| s.id == svc);
        let Some(spec) = spec.filter(|s| s.function_at(path).is_some()) else {
            return Err(format!("Method expired or not found: {from}:{method}"));
        };
        if spec.visibility == Visibility::Protected
            && remote_ws != self.workspace()
            && !spec.authorized_workspaces.iter().any(|w| w == remote_ws)
            && Some(from) != self.manager_address().as_deref()
        {
            return Err(format!("Permission denied for invoking protected method {method}"));
        }
        Ok(Some(InvokeTarget::Service { service: svc.into(), function: path.into() }))
    }

    /// Calls of our `built-in` service (PROTOCOL.md §6.2), answered by the engine itself.
    /// A reassembled large message comes back in the second slot, to be dispatched once the
    /// `process` call is answered.
    fn builtin_call(
        &mut self,
        now: Instant,
        path: &str,
        extra: &Map,
        frame: &Frame,
    ) -> (Result<Value, RemoteError>, Option<Frame>) {
        if let Some(op) = path.strip_prefix("message_cache.") {
            return self.message_cache(now, op, extra, frame);
        }
        (self.builtin_simple(path, extra, frame), None)
    }

    fn builtin_simple(&self, path: &str, extra: &Map, frame: &Frame) -> Result<Value, RemoteError> {
        let err = |message: String| RemoteError { message, trace: None, other: Map::new() };
        let (args, kw) = split_kwargs(extra);
        let arg = |i: usize, name: &str| args.get(i).or_else(|| kw.and_then(|k| k.get(name)));
        match path {
            "ping" => match arg(0, "msg").and_then(Value::as_str) {
                Some("ping") => Ok("pong".into()),
                _ => Err(err("ping expects the message \"ping\"".into())),
            },
            "get_service" => {
                let id = arg(0, "service_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err("get_service needs a service id".into()))?;
                // The manager asks with `ws` set to our workspace; callers elsewhere need
                // visibility public/unlisted or an authorized workspace.
                let caller_ws = frame.main.get("ws").and_then(Value::as_str).unwrap_or_default();
                let local = id.rsplit_once(':').map_or(id, |(_, s)| s);
                let local = local.split_once('@').map_or(local, |(s, _)| s);
                let server = self.info.as_ref().map(|i| i.public_base_url.clone()).unwrap_or_default();
                let me = self.me();
                if local == "built-in" {
                    return Ok(self.builtin_spec().served(&server, me));
                }
                let spec = self
                    .services
                    .iter()
                    .find(|s| s.id == local)
                    .ok_or_else(|| err(format!("Service not found: {id}")))?;
                if spec.visibility == Visibility::Protected
                    && caller_ws != self.workspace()
                    && !spec.authorized_workspaces.iter().any(|w| w == caller_ws)
                {
                    return Err(err(format!("Permission denied for getting protected service: {id}")));
                }
                Ok(spec.served(&server, me))
            }
            _ => Err(err(format!("Method not found: built-in.{path}"))),
        }
    }

    /// `message_cache.{create, append, set, process, remove}`: chunked uploads to us
    /// (PROTOCOL.md §7.3). Keys are private to the peer that created them.
    fn message_cache(
        &mut self,
        now: Instant,
        op: &str,
        extra: &Map,
        frame: &Frame,
    ) -> (Result<Value, RemoteError>, Option<Frame>) {
        let err = |message: String| RemoteError { message, trace: None, other: Map::new() };
        let (args, kw) = split_kwargs(extra);
        let arg = |i: usize, name: &str| args.get(i).or_else(|| kw.and_then(|k| k.get(name)));
        let flag = |i: usize, name: &str| arg(i, name).and_then(Value::as_bool).unwrap_or(false);
        let owner = frame.main_str("from").unwrap_or_default().to_string();
        let Some(key) = arg(0, "key").and_then(Value::as_str).map(String::from) else {
            return (Err(err("message_cache needs a string key".into())), None);
        };
        let limits = &self.config.limits;
        let (result, heartbeat) = match op {
            "create" => (
                self.reassembly.create(now, &key, &owner, flag(2, "overwrite"), limits),
                flag(1, "heartbeat"),
            ),
            "append" | "set" => {
                let (index, data_at, hb_at) =
                    if op == "set" { (arg(1, "index").map(Value::as_u64), 2, 3) } else { (None, 1, 2) };
                let index = match index {
                    Some(None) => {
                        return (Err(err("chunk index must be a non-negative integer".into())), None);
                    }
                    Some(Some(i)) => Some(i),
                    None if op == "set" => return (Err(err("set needs a chunk index".into())), None),
                    None => None,
                };
                match arg(data_at, "data").and_then(Value::as_bin) {
                    Some(data) => (
                        self.reassembly.add(now, &key, &owner, index, data.clone(), limits),
                        flag(hb_at, "heartbeat"),
                    ),
                    None => return (Err(err("chunk data must be bytes".into())), None),
                }
            }
            "remove" => (self.reassembly.remove(&key, &owner), false),
            "process" => {
                self.touch_session(now, &key, flag(1, "heartbeat"));
                let bytes = match self.reassembly.take(&key, &owner) {
                    Ok(b) => b,
                    Err(e) => return (Err(err(e.0)), None),
                };
                // A reassembled message may exceed one frame's caps, up to `max_message_bytes`.
                let mut limits = self.config.limits.clone();
                limits.max_frame_bytes = limits.max_message_bytes;
                limits.max_bin_len = limits.max_bin_len.max(limits.max_message_bytes);
                limits.max_str_len = limits.max_str_len.max(limits.max_message_bytes);
                let mut message = match decode_frame(&bytes, &limits) {
                    Ok(f) => f,
                    Err(e) => return (Err(err(format!("reassembled message {key} is invalid: {e}"))), None),
                };
                // The sender wrote the reassembled header; the trusted fields come from the
                // server's rewrite of the `process` call itself.
                for k in ["from", "to", "ws", "user"] {
                    match frame.main.get(k) {
                        Some(v) => {
                            message.main.insert(k, v.clone());
                        }
                        None => {
                            message.main.remove(k);
                        }
                    }
                }
                return (Ok(Value::Nil), Some(message));
            }
            _ => return (Err(err(format!("Method not found: message_cache.{op}"))), None),
        };
        if let (Err(e), true) = (&result, heartbeat) {
            // A chunked reply to our own call `key` that we cannot take: that call fails now
            // instead of waiting for its timeout.
            if self.sessions.get(&key).is_some_and(|p| p.target == owner) {
                self.reassembly.forget_key(&key);
                self.settle(now, key.clone(), Err(CallError::BadReply(format!("reply refused: {}", e.0))));
                return (Err(err(e.0.clone())), None);
            }
        }
        self.touch_session(now, &key, heartbeat);
        (result.map(|()| Value::Nil).map_err(|e| err(e.0)), None)
    }

    /// A chunked reply to our call `key` is arriving: its progress counts as a heartbeat.
    fn touch_session(&mut self, now: Instant, key: &str, heartbeat: bool) {
        if !heartbeat {
            return;
        }
        if let Some(p) = self.sessions.get_mut(key) {
            let old = p.deadline;
            p.deadline = now + p.timeout;
            let new = p.deadline;
            self.deadlines.remove(&(old, key.to_string()));
            self.deadlines.insert((new, key.to_string()));
        }
    }

    /// Answers a call the engine handles itself (or refuses) straight away.
    fn answer_now(
        &mut self,
        now: Instant,
        route: &Route,
        caller: &str,
        session: Option<&str>,
        result: Result<Value, RemoteError>,
    ) -> Result<(), InputError> {
        let (slot, value) = match result {
            Ok(v) => (Slot::Resolve, v),
            Err(e) => (Slot::Reject, e.to_value()),
        };
        if let Some(addr) = slot_address(route, caller, session, slot) {
            let to = addr.0.clone();
            let frame = self.fire_frame(addr, session, Some(value));
            // Queueing fails only when the backlog is full; the caller then times out.
            let _ = self.send_reply(now, to, session.map(String::from), encode_frame(&frame));
        }
        Ok(())
    }

    /// Where replies to an incoming call go, and the heartbeat interval it asked for (clamped
    /// to [`Limits::min_heartbeat_interval`]).
    fn promise_route(
        &self,
        extra: &Map,
        from: &str,
        session: Option<&str>,
    ) -> Result<(Route, Option<Duration>), InputError> {
        let min = self.config.limits.min_heartbeat_interval;
        let interval = |v: Option<&Value>| {
            v.and_then(Value::as_f64)
                .filter(|t| t.is_finite() && *t >= 0.0)
                .map(|t| Duration::from_secs_f64(t.min(86_400.0)).max(min))
        };
        match extra.get("promise") {
            None => Ok((Route::None, None)),
            Some(Value::Str(star)) if *star == "*" => {
                if session.is_none() {
                    return Err(InputError::Protocol("promise \"*\" without a session".into()));
                }
                Ok((Route::Compact, interval(extra.get("t"))))
            }
            Some(Value::Map(p)) => {
                let (ws, _) = split_client(from);
                let slot = |k: &str| -> Result<Option<Method>, InputError> {
                    match p.get(k) {
                        None | Some(Value::Nil) => Ok(None),
                        Some(v) => {
                            let mut m = Method::from_value(v)
                                .ok_or_else(|| InputError::Protocol(format!("promise.{k} is not a method")))?
                                .map_err(|e| InputError::Protocol(e.to_string()))?;
                            if !m.target.contains('/') {
                                m.target = format!("{ws}/{}", m.target);
                            }
                            Ok(Some(m))
                        }
                    }
                };
                let heartbeat = slot("heartbeat")?;
                let every = if heartbeat.is_some() { interval(p.get("interval")) } else { None };
                Ok((Route::Full(Box::new([slot("resolve")?, slot("reject")?, heartbeat])), every))
            }
            Some(other) => Err(InputError::Protocol(format!("promise is a {}", other.kind()))),
        }
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
        if self.sessions.len() >= limits.max_pending_calls {
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
        let frame = Frame { main, extra: (!extra.is_empty()).then_some(extra) };
        let bytes = encode_frame(&frame);
        match &internal {
            // The engine's own registration calls go out while still registering.
            Some(Internal::Builtin | Internal::Subscribe | Internal::Restore(_)) => {
                self.transmits.push_back(Transmit::Binary(bytes))
            }
            Some(Internal::Chunk { .. } | Internal::Unregister) => self.send(bytes)?,
            None if bytes.len() > self.chunk_threshold() => {
                let key = self.rng.short_id();
                self.start_upload(now, to.clone(), key, false, bytes, session.clone())?;
            }
            None => self.send_for(session.as_deref(), bytes)?,
        }
        match session {
            Some(s) => {
                let deadline = now + timeout;
                self.deadlines.insert((deadline, s.clone()));
                self.sessions.insert(
                    s,
                    Pending {
                        id,
                        target: to,
                        method: target.method.clone(),
                        timeout,
                        deadline,
                        internal,
                        callbacks: locals.functions,
                        generators: locals.generators,
                        registers: None,
                    },
                );
            }
            None => self.events.push_back(Event::CallSettled { id, result: Ok(Value::Nil) }),
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

    /// Replaces [`local_function`] and [`local_generator`] placeholders in `v` with
    /// descriptors living in session `session`, collecting them in `out`. `qualified`: write
    /// `_rtarget` as `ws/client` (Python does in replies) or bare (in call arguments).
    fn replace_locals(&mut self, v: &mut Value, session: &str, qualified: bool, out: &mut Locals) {
        let me = self.me.to_string();
        let target = if qualified { me.clone() } else { split_client(&me).1.to_string() };
        let server = self.info.as_ref().map(|i| i.public_base_url.clone()).unwrap_or_default();
        if let Some((fid, name)) = parse_local_function(v) {
            let key =
                if name.is_empty() { self.rng.short_id() } else { format!("{}#{name}", self.rng.short_id()) };
            *v = Method {
                target,
                method: format!("{session}.{key}"),
                promise: Some(PromiseMode::Compact),
                server: Some(server),
                name: Some(if name.is_empty() { "callback".into() } else { name }),
                doc: Some(Value::Nil),
                layout: MethodLayout::Callback,
                ..Method::default()
            }
            .to_value();
            out.functions.push((key, fid));
            return;
        }
        if let Some(gid) = parse_local_generator(v) {
            let max = self.config.limits.max_generators;
            if self.open_generators() + out.generators.len() >= max {
                out.error = Some(EngineError::LimitReached { what: "open generators", max });
                return;
            }
            let key = self.rng.short_id();
            *v = Generator {
                server: Some(server),
                target: me,
                method: format!("{session}.{key}"),
                close_method: Some(format!("{session}.{key}:close")),
                promise: Some(PromiseMode::Compact),
                doc: Some("Remote generator".into()),
                other: Map::new(),
            }
            .to_value();
            out.generators.push((key, gid));
            return;
        }
        if let Value::Map(m) = v {
            if m.get("_rintf") == Some(&Value::Bool(true))
                && m.values().any(|x| parse_local_function(x).is_some())
            {
                self.make_interface(m, session, qualified, out);
                return;
            }
        }
        match v {
            Value::Array(a) => a.iter_mut().for_each(|x| self.replace_locals(x, session, qualified, out)),
            Value::Map(m) => m.iter_mut().for_each(|(_, x)| self.replace_locals(x, session, qualified, out)),
            _ => {}
        }
    }

    /// Turns a `_rintf: true` map into a local-only `_rintf_<id>` service callable only by
    /// `out.peer`, written as Python writes it: functions as service descriptors, then
    /// `_dispose` and `_rintf_service_id`.
    fn make_interface(&mut self, m: &mut Map, session: &str, qualified: bool, out: &mut Locals) {
        let max = self.config.limits.max_interfaces;
        if self.interfaces.len() >= max {
            out.error = Some(EngineError::LimitReached { what: "_rintf interfaces", max });
            return;
        }
        let sid = format!("_rintf_{}", self.rng.short_id());
        let server = self.info.as_ref().map(|i| i.public_base_url.clone()).unwrap_or_default();
        let me = self.me.to_string();
        let descriptor = |name: &str, key: &str, is_async: bool| {
            Method {
                target: me.clone(),
                method: format!("services.{sid}.{key}"),
                promise: Some(PromiseMode::Compact),
                server: Some(server.clone()),
                name: Some(name.into()),
                is_async: Some(is_async),
                doc: Some(Value::Nil),
                ..Method::default()
            }
            .to_value()
        };
        let mut functions = Vec::new();
        let mut encoded = Map::with_capacity(m.len() + 2);
        for (k, x) in core::mem::take(m) {
            let key = k.as_str().map(String::from);
            match (key, parse_local_function(&x)) {
                (Some(key), Some((fid, name))) if !key.starts_with('_') => {
                    let name = if name.is_empty() { key.clone() } else { name };
                    encoded.push(k, descriptor(&name, &key, false));
                    functions.push((key, fid));
                }
                _ => {
                    let mut x = x;
                    self.replace_locals(&mut x, session, qualified, out);
                    encoded.push(k, x);
                }
            }
        }
        encoded.insert("_dispose", descriptor("_dispose", "_dispose", true));
        encoded.insert("_rintf_service_id", sid.as_str());
        *m = encoded;
        self.interfaces.insert(sid, Interface { peer: out.peer.clone(), functions });
    }

    /// Drops interfaces (all, or those of `peer`), telling the driver which functions died.
    fn drop_interfaces(&mut self, peer: Option<&str>) {
        let dead: Vec<String> = self
            .interfaces
            .iter()
            .filter(|(_, i)| peer.is_none_or(|p| i.peer == p))
            .map(|(s, _)| s.clone())
            .collect();
        for s in dead {
            if let Some(i) = self.interfaces.remove(&s) {
                let functions = i.functions.into_iter().map(|(_, f)| f).collect();
                self.events.push_back(Event::InterfaceDisposed { service: s, functions });
            }
        }
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

    fn forget_session(&mut self, s: &str) -> Option<Pending> {
        let p = self.sessions.remove(s)?;
        self.deadlines.remove(&(p.deadline, s.to_string()));
        Some(p)
    }

    /// Settles the call of session `s` exactly once and frees its state.
    fn settle(&mut self, now: Instant, s: String, result: Result<Value, CallError>) {
        let Some(p) = self.forget_session(&s) else { return };
        match p.internal {
            None => self.events.push_back(Event::CallSettled { id: p.id, result }),
            Some(Internal::Builtin) => match result {
                Ok(_) => self.became_ready(now),
                Err(e) => {
                    self.state = State::Idle;
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
        }
    }

    // ---- internals: large outgoing messages ------------------------------------------------

    /// Sends a reply frame, through the caller's `message_cache` when it is large (keyed by the
    /// caller's session, with `heartbeat` so the upload keeps its call alive).
    fn send_reply(
        &mut self,
        now: Instant,
        to: String,
        session: Option<String>,
        bytes: Bytes,
    ) -> Result<(), EngineError> {
        if bytes.len() <= self.chunk_threshold() {
            return self.send(bytes);
        }
        let (key, heartbeat) = match session {
            Some(s) => (s, true),
            None => (self.rng.short_id(), false),
        };
        self.start_upload(now, to, key, heartbeat, bytes, None)
    }

    /// Frames longer than this go through the receiver's `message_cache`.
    fn chunk_threshold(&self) -> usize {
        self.chunk_size() + 1024
    }

    /// The chunk size in force: the configured one, kept below the transport's message limit
    /// (and so below the 524 288-byte object limit of a Python receiver at the default).
    fn chunk_size(&self) -> usize {
        self.config.chunk_size.min(self.config.transport_max_message.saturating_sub(2048)).max(1024)
    }

    /// Starts uploading `data` to `target` under `key`: create, then sets, then process.
    fn start_upload(
        &mut self,
        now: Instant,
        target: String,
        key: String,
        heartbeat: bool,
        data: Bytes,
        call_session: Option<String>,
    ) -> Result<(), EngineError> {
        self.next_upload += 1;
        let id = self.next_upload;
        let chunk = self.chunk_size();
        self.uploads
            .insert(id, Upload { target, key, heartbeat, data, chunk, next: 0, acked: 0, call_session });
        self.upload_step(now, id, ChunkStep::Create)
    }

    /// Sends one step of upload `id` as a call of the receiver's `built-in.message_cache`.
    fn upload_step(&mut self, now: Instant, id: u64, step: ChunkStep) -> Result<(), EngineError> {
        let Some(u) = self.uploads.get(&id) else { return Ok(()) };
        let (name, args): (&str, Vec<Value>) = match step {
            ChunkStep::Create => ("create", vec![u.key.as_str().into(), u.heartbeat.into()]),
            ChunkStep::Set(i) => {
                let end = ((i + 1) * u.chunk).min(u.data.len());
                let part = u.data.slice(i * u.chunk..end);
                ("set", vec![u.key.as_str().into(), i.into(), Value::Bin(part), u.heartbeat.into()])
            }
            ChunkStep::Process => ("process", vec![u.key.as_str().into(), u.heartbeat.into()]),
            ChunkStep::Remove => ("remove", vec![u.key.as_str().into()]),
        };
        let target = Method {
            target: u.target.clone(),
            method: format!("services.built-in.message_cache.{name}"),
            promise: Some(PromiseMode::Compact),
            ..Method::default()
        };
        let internal = Some(Internal::Chunk { upload: id, step });
        self.call_inner(now, &target, args, None, CallOptions::default(), internal).map(|_| ())
    }

    /// One step of an upload settled: send the next ones, or finish, or give up.
    fn upload_progress(&mut self, now: Instant, id: u64, step: ChunkStep, result: Result<Value, CallError>) {
        if step == ChunkStep::Remove {
            return;
        }
        let Some(u) = self.uploads.get_mut(&id) else { return };
        if let Err(error) = result {
            // Best effort: free the receiver's buffer, then fail the call this message was.
            let call = u.call_session.take();
            let _ = self.upload_step(now, id, ChunkStep::Remove);
            self.uploads.remove(&id);
            if let Some(s) = call {
                self.settle(now, s, Err(error));
            }
            return;
        }
        // Progress keeps our own call alive while its request is still uploading.
        if let Some(s) = u.call_session.clone() {
            self.touch_session(now, &s, true);
        }
        let Some(u) = self.uploads.get_mut(&id) else { return };
        let mut next = Vec::new();
        match step {
            ChunkStep::Create | ChunkStep::Set(_) => {
                if matches!(step, ChunkStep::Set(_)) {
                    u.acked += 1;
                }
                let total = u.chunks();
                while u.next < total && u.next - u.acked < UPLOAD_WINDOW {
                    next.push(ChunkStep::Set(u.next));
                    u.next += 1;
                }
                if u.acked == total {
                    next.push(ChunkStep::Process);
                }
            }
            ChunkStep::Process => {
                self.uploads.remove(&id);
            }
            ChunkStep::Remove => {}
        }
        for step in next {
            if let Err(e) = self.upload_step(now, id, step) {
                let call = self.uploads.remove(&id).and_then(|u| u.call_session);
                if let Some(s) = call {
                    self.settle(now, s, Err(CallError::BadReply(format!("could not send a chunk: {e}"))));
                }
                return;
            }
        }
    }

    /// Frees a generator that reached its end (in an export or a call's session).
    fn forget_generator(&mut self, s: &str, key: &str) {
        if let Some(x) = self.exports.get_mut(s) {
            x.generators.retain(|(k, _)| k != key);
            let s = s.to_string();
            self.drop_export_if_empty(&s);
        } else if let Some(p) = self.sessions.get_mut(s) {
            p.generators.retain(|(k, _)| k != key);
        }
    }

    fn drop_export_if_empty(&mut self, s: &str) {
        if self.exports.get(s).is_some_and(|x| x.functions.is_empty() && x.generators.is_empty()) {
            self.exports.remove(s);
        }
    }

    /// Drops exports: of `peer` (it left), or idle past the expiry when `peer` is `None`.
    fn drop_exports(&mut self, now: Instant, peer: Option<&str>) {
        let expiry = self.config.limits.export_idle_expiry;
        let dead: Vec<String> = self
            .exports
            .iter()
            .filter(|(_, x)| match peer {
                Some(p) => x.peer == p,
                None => now >= x.last_used + expiry,
            })
            .map(|(s, _)| s.clone())
            .collect();
        for s in dead {
            if let Some(x) = self.exports.remove(&s) {
                for (_, generator) in x.generators {
                    self.events.push_back(Event::GeneratorClosed { generator });
                }
            }
        }
    }

    /// A peer left: fail calls to it, drop invocations from it.
    fn peer_gone(&mut self, now: Instant, peer: &str) {
        self.reassembly.forget_owner(peer);
        self.drop_exports(now, Some(peer));
        self.drop_interfaces(Some(peer));
        let dead: Vec<String> =
            self.sessions.iter().filter(|(_, p)| p.target == peer).map(|(s, _)| s.clone()).collect();
        for s in dead {
            self.settle(now, s, Err(CallError::PeerDisconnected { peer: peer.into() }));
        }
        for (id, a) in self.active.iter_mut() {
            if a.caller == peer && !a.cancelled {
                a.cancelled = true;
                if let Some(t) = a.beat_at.take() {
                    self.beats.remove(&(t, *id));
                }
                self.events.push_back(Event::InvokeCancelled { id: *id });
            }
        }
    }
}

/// The error of a reject: `{_rtype: "error", _rvalue, _rtrace}`, or whatever else was sent.
fn remote_error(v: Option<&Value>) -> CallError {
    match v.and_then(RemoteError::from_value) {
        Some(Ok(e)) => CallError::Remote { message: e.message, trace: e.trace },
        _ => CallError::Remote { message: v.map(|v| format!("{v:?}")).unwrap_or_default(), trace: None },
    }
}

/// Prepares a value a peer sent: bare `_rtarget`s of callables get the sender's workspace
/// (PROTOCOL.md §4.3), and our reserved placeholder ext is refused.
fn sanitize_incoming(v: &mut Value, ws: &str) -> Result<(), ()> {
    match v {
        Value::Ext(LOCAL_FUNCTION_EXT | LOCAL_GENERATOR_EXT, _) => Err(()),
        Value::Array(a) => a.iter_mut().try_for_each(|x| sanitize_incoming(x, ws)),
        Value::Map(m) => {
            let callable = matches!(m.get("_rtype").and_then(Value::as_str), Some("method" | "generator"));
            if callable {
                if let Some(Value::Str(t)) = m.get_mut("_rtarget") {
                    if !t.contains('/') {
                        *t = format!("{ws}/{t}").into();
                    }
                }
            }
            m.iter_mut().try_for_each(|(k, x)| {
                sanitize_incoming(k, ws)?;
                sanitize_incoming(x, ws)
            })
        }
        _ => Ok(()),
    }
}

/// Positional arguments and the kwargs map of a call's `extra`.
fn split_kwargs(extra: &Map) -> (&[Value], Option<&Map>) {
    let args = extra.get("args").and_then(Value::as_array).unwrap_or(&[]);
    if extra.get("with_kwargs").and_then(Value::as_bool) == Some(true) {
        if let Some((last, rest)) = args.split_last() {
            return (rest, last.as_map());
        }
    }
    (args, None)
}

fn contains_local_function(v: &Value) -> bool {
    match v {
        Value::Ext(LOCAL_FUNCTION_EXT | LOCAL_GENERATOR_EXT, _) => true,
        Value::Array(a) => a.iter().any(contains_local_function),
        Value::Map(m) => m.iter().any(|(k, x)| contains_local_function(k) || contains_local_function(x)),
        _ => false,
    }
}
