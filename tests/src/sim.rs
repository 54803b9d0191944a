//! A simulated Hypha deployment for engine ↔ engine tests: one in-memory [`Hub`], any number of engines on their own links, a virtual clock, and a model of the user code behind each engine.
//!
//! # The model
//!
//! - **Clients.** [`Sim::add_client`] builds an [`Engine`]; [`Sim::connect`] opens its
//!   websocket "link" (a hub [`ConnId`]) and drives until [`Event::Connected`]. A link can be
//!   dropped ([`Sim::drop_link`]: both ends notice), cut ([`Sim::cut_link`]: only the client
//!   notices, the hub keeps a half-open connection), reopened ([`Sim::reconnect`]), or the
//!   client can vanish for good ([`Sim::kill_client`]); [`Sim::reconnect_after`] schedules a
//!   reconnection without waiting for it. After a close the *hub* initiated (restart, idle
//!   timeout), a client reconnects by itself like the Python client does: at once, then with a
//!   1 s, 2 s, 4 s ... (≤ 60 s) backoff while attempts fail.
//! - **Links.** Messages travel through two FIFO queues per link, each with the link's latency
//!   ([`Sim::set_latency`]; zero by default). Messages in flight on a link that dies are lost.
//! - **Virtual time.** [`Sim::now`] is a [`hypha_rpc_core::time::Instant`] in microseconds.
//!   [`Sim::drive`] moves everything that is due *now* until nothing moves (and panics on a
//!   livelock); [`Sim::step`] jumps to the earliest deadline of any engine, the hub, a link or a
//!   scheduled reply, fires it and drives; [`Sim::run_until`] steps until an instant or a
//!   predicate, with bounds.
//! - **User code.** Each client has a table of service handlers and one callback handler
//!   (`Fn(&Invocation) -> Reply`). The harness runs them on [`Event::Invoke`] and applies the
//!   [`Reply`]: answer now, answer later without blocking (an async handler: the engine sends
//!   heartbeats meanwhile), block the whole client and answer later (a synchronous Python
//!   handler: nothing of that client runs meanwhile, so no heartbeats), never answer, or call
//!   something first (a callback, another service) and answer from its result.
//! - **Book-keeping.** Every event is logged per client with its time; every call id the
//!   harness started is tracked ([`Sim::try_command`] starts any call without panicking on a
//!   refusal), a second settlement of any call panics at once, and [`Sim::finish`] checks that
//!   every call settled and every engine is back to no pending call. Every message exchanged
//!   is recorded in [`Sim::trace`] and hashed ([`Sim::frame_hash`]). A replied value the
//!   engine refuses (a limit) is answered with an error instead ([`Sim::reply_failures`]).
//! - **Guards.** [`Sim::set_checker`] runs invariants after every quiescent [`Sim::drive`];
//!   a drive that never quiesces panics ("livelock"), and so do steps that never let virtual
//!   time move on ("stalled", [`Sim::stall_limit`]).
//!
//! Everything is deterministic: no clocks, no threads, no hashing with random state.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::rc::Rc;

use bytes::Bytes;
use hypha_rpc_core::codec::rtype::{Generator, Method, RTypeCodec, RemoteError};
use hypha_rpc_core::codec::{Frame, decode_frame};
use hypha_rpc_core::time::{Duration, Instant};
use hypha_rpc_core::{
    CallError, CallId, CallOptions, ConnectError, ConnectionInfo, Engine, EngineConfig, EngineError, Event,
    InputError, Invocation, InvokeId, InvokeTarget, Limits, Map, ServiceSpec, Transmit, Value,
};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::hub::{ConnId, Hub, HubConfig, HubOutput, WsMessage};

/// Deliveries one [`Sim::drive`] may make before it declares a livelock.
pub const DEFAULT_LIVELOCK_LIMIT: u64 = 100_000;
/// Steps one [`Sim::run_until`] may take.
pub const DEFAULT_STEP_LIMIT: u64 = 1_000_000;
/// Virtual time one [`Sim::run_until`] with a predicate may spend.
pub const DEFAULT_HORIZON: Duration = Duration::from_secs(7 * 24 * 3600);
/// Steps [`Sim::step`] may take in a row without virtual time moving on.
pub const DEFAULT_STALL_LIMIT: u64 = 100_000;

/// A check run after every [`Sim::drive`] reached quiescence (see [`Sim::set_checker`]).
pub type Checker = Box<dyn FnMut(&Sim)>;

/// A client of the simulation (an index, not the hypha client id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub usize);

/// A raw hub connection driven by hand-written frames (no engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RawId(pub usize);

/// A service function or callback of the user-code model.
pub type Handler = Rc<dyn Fn(&Invocation) -> Reply>;
/// What a handler does with the result of a call it made ([`Reply::Call`]).
pub type Then = Rc<dyn Fn(Result<Value, CallError>) -> Reply>;

/// Wraps a closure as a [`Handler`].
pub fn handler(f: impl Fn(&Invocation) -> Reply + 'static) -> Handler {
    Rc::new(f)
}

/// A [`RemoteError`] as a Python handler raising `Exception(message)` produces it.
pub fn remote_error(message: impl Into<String>) -> RemoteError {
    let message = message.into();
    let trace = format!("Traceback (most recent call last):\n  File \"<sim>\"\nException: {message}\n");
    RemoteError { message, trace: Some(trace), other: Map::new() }
}

/// What a handler does with an invocation.
#[derive(Clone)]
pub enum Reply {
    /// Resolve now.
    Ok(Value),
    /// Reject now.
    Err(RemoteError),
    /// An async handler that finishes after this long; the client keeps running (and its engine
    /// keeps sending heartbeats) meanwhile.
    After(Duration, Result<Value, RemoteError>),
    /// A synchronous handler that blocks its whole client for this long, then answers: no
    /// heartbeats, no timers, no messages in or out of that client meanwhile.
    Blocking(Duration, Result<Value, RemoteError>),
    /// An async handler that never finishes (its engine heartbeats for ever).
    Never,
    /// Call `target` first (with `parent` = the invocation's session, as for a callback found in
    /// the arguments), then answer with what `then` makes of the result.
    Call {
        /// What to call.
        target: Box<Method>,
        /// Positional arguments.
        args: Vec<Value>,
        /// Keyword arguments.
        kwargs: Option<Map>,
        /// The reply, from the call's result.
        then: Then,
    },
}

impl Reply {
    /// Resolve with `v` now.
    pub fn ok(v: impl Into<Value>) -> Reply {
        Reply::Ok(v.into())
    }
    /// Reject with [`remote_error`]`(message)` now.
    pub fn error(message: impl Into<String>) -> Reply {
        Reply::Err(remote_error(message))
    }
    /// Call `target(args)`, then reply with `then(result)`.
    pub fn call(
        target: Method,
        args: Vec<Value>,
        then: impl Fn(Result<Value, CallError>) -> Reply + 'static,
    ) -> Reply {
        Reply::Call { target: Box::new(target), args, kwargs: None, then: Rc::new(then) }
    }
}

/// The method descriptor at dotted `path` inside a service map returned by `get_service`.
///
/// Panics when there is none: a test helper.
pub fn method_at(service: &Value, path: &str) -> Method {
    let mut v = service;
    for part in path.split('.') {
        v = v
            .as_map()
            .and_then(|m| m.get(part))
            .unwrap_or_else(|| panic!("no `{path}` in the service {service:?}"));
    }
    Method::from_value(v)
        .unwrap_or_else(|| panic!("`{path}` is not a method: {v:?}"))
        .expect("a valid method")
}

/// Which way a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    /// Client → hub.
    Up,
    /// Hub → client.
    Down,
}

/// Who a hub connection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    /// An engine.
    Client(ClientId),
    /// A raw connection.
    Raw(RawId),
}

/// One message exchanged between the hub and a client, when it was delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceEntry {
    /// Delivery time (for messages to a link that no longer exists: when the hub sent it).
    pub at: Instant,
    /// The hub connection.
    pub conn: ConnId,
    /// Whose connection it is.
    pub owner: Option<Owner>,
    /// Direction.
    pub dir: Dir,
    /// The message; `Close` in the `Up` direction is the client closing (or its link dying).
    pub what: HubOutput,
    /// `false` when the message never arrived (its link had died).
    pub delivered: bool,
}

impl TraceEntry {
    /// The binary frame, decoded.
    pub fn frame(&self) -> Option<Frame> {
        match &self.what {
            HubOutput::Message(WsMessage::Binary(b)) => decode_frame(b, &Limits::default()).ok(),
            _ => None,
        }
    }
    /// The text message.
    pub fn text(&self) -> Option<&str> {
        match &self.what {
            HubOutput::Message(WsMessage::Text(t)) => Some(t),
            _ => None,
        }
    }
}

/// Where [`Sim::run_until`] stops: an [`Instant`], or a predicate `FnMut(&Sim) -> bool`.
pub trait Until {
    /// Whether to stop now.
    fn reached(&mut self, sim: &Sim) -> bool;
    /// A time not to run past.
    fn deadline(&self) -> Option<Instant>;
}

impl Until for Instant {
    fn reached(&mut self, sim: &Sim) -> bool {
        sim.now >= *self
    }
    fn deadline(&self) -> Option<Instant> {
        Some(*self)
    }
}

impl<F: FnMut(&Sim) -> bool> Until for F {
    fn reached(&mut self, sim: &Sim) -> bool {
        self(sim)
    }
    fn deadline(&self) -> Option<Instant> {
        None
    }
}

enum Up {
    Msg(WsMessage),
    Close { code: u16, reason: String },
}

struct Link {
    conn: ConnId,
    up: VecDeque<(Instant, Up)>,
    down: VecDeque<(Instant, HubOutput)>,
}

impl Link {
    fn new(conn: ConnId) -> Link {
        Link { conn, up: VecDeque::new(), down: VecDeque::new() }
    }
}

struct Nested {
    invoke: InvokeId,
    session: Option<String>,
    then: Then,
}

struct Peer {
    name: String,
    engine: Engine,
    link: Option<Link>,
    latency: Duration,
    auto_reconnect: bool,
    reconnect_attempts: u32,
    reconnect_scheduled: bool,
    gave_up: bool,
    dead: bool,
    closed: bool,
    blocked_until: Option<Instant>,
    handlers: BTreeMap<(String, String), Handler>,
    callback: Option<Handler>,
    events: Vec<(Instant, Event)>,
    invocations: Vec<(Instant, Invocation)>,
    input_errors: Vec<(Instant, InputError)>,
    settled: BTreeMap<CallId, (Instant, Result<Value, CallError>)>,
    issued: BTreeSet<CallId>,
    open_invocations: BTreeSet<InvokeId>,
    nested: BTreeMap<CallId, Nested>,
    /// Settlements of calls the harness never started (made through [`Sim::engine_mut`], or
    /// invented by the engine).
    untracked: u64,
    /// Replies the engine refused ([`Engine::reply`] errors), and handler calls that could not
    /// start: each was answered with an error instead.
    reply_failures: Vec<(Instant, InvokeId, String)>,
}

enum Timer {
    Reply { client: ClientId, invoke: InvokeId, result: Result<Value, RemoteError>, unblock: bool },
    Reconnect(ClientId),
}

struct Raw {
    conn: ConnId,
    received: Vec<HubOutput>,
    info: Option<Json>,
}

/// The simulation: one hub, its clients, and the virtual clock. See the module docs.
pub struct Sim {
    /// The simulated server. Tests may inspect it (`services()`, `connection_user()`, ...).
    pub hub: Hub,
    now: Instant,
    peers: Vec<Peer>,
    raws: Vec<Raw>,
    closing: Vec<(ClientId, Link)>,
    owners: BTreeMap<ConnId, Owner>,
    timers: BTreeMap<(Instant, u64), Timer>,
    next_timer: u64,
    trace: Vec<TraceEntry>,
    hasher: Sha256,
    lost: u64,
    /// Deliveries one [`Sim::drive`] may make before it panics with "livelock".
    pub livelock_limit: u64,
    /// Steps one [`Sim::run_until`] may take before it panics.
    pub step_limit: u64,
    /// Virtual time one [`Sim::run_until`] with a predicate may spend before it panics.
    pub horizon: Duration,
    /// Steps [`Sim::step`] may take in a row at the same instant before it panics ("stalled"):
    /// a timer that keeps firing without letting time move on.
    pub stall_limit: u64,
    stalled_steps: u64,
    checker: Option<Checker>,
}

impl Sim {
    /// A simulation with a hub built from `config`, no clients, at time zero.
    pub fn new(config: HubConfig) -> Sim {
        Sim {
            hub: Hub::new(config),
            now: Instant::ZERO,
            peers: Vec::new(),
            raws: Vec::new(),
            closing: Vec::new(),
            owners: BTreeMap::new(),
            timers: BTreeMap::new(),
            next_timer: 0,
            trace: Vec::new(),
            hasher: Sha256::new(),
            lost: 0,
            livelock_limit: DEFAULT_LIVELOCK_LIMIT,
            step_limit: DEFAULT_STEP_LIMIT,
            horizon: DEFAULT_HORIZON,
            stall_limit: DEFAULT_STALL_LIMIT,
            stalled_steps: 0,
            checker: None,
        }
    }

    /// Runs `check` every time [`Sim::drive`] reaches quiescence (after every command, every
    /// [`Sim::step`] and every fault): a place for invariants that must hold at every step. It
    /// panics to report a violation. `None` removes it.
    pub fn set_checker(&mut self, check: Option<Checker>) {
        self.checker = check;
    }

    // ---- clients ----------------------------------------------------------------------------

    /// Adds a client (not connected yet). A `seed` of 0 is replaced by one derived from the
    /// client's index, so that engines do not share session ids.
    pub fn add_client(&mut self, mut config: EngineConfig) -> ClientId {
        let id = ClientId(self.peers.len());
        if config.seed == 0 {
            config.seed = 0x5EED_0000 + id.0 as u64;
        }
        self.peers.push(Peer {
            name: config.client_id.clone(),
            engine: Engine::new(config, self.now),
            link: None,
            latency: Duration::ZERO,
            auto_reconnect: true,
            reconnect_attempts: 0,
            reconnect_scheduled: false,
            gave_up: false,
            dead: false,
            closed: false,
            blocked_until: None,
            handlers: BTreeMap::new(),
            callback: None,
            events: Vec::new(),
            invocations: Vec::new(),
            input_errors: Vec::new(),
            settled: BTreeMap::new(),
            issued: BTreeSet::new(),
            open_invocations: BTreeSet::new(),
            nested: BTreeMap::new(),
            untracked: 0,
            reply_failures: Vec::new(),
        });
        id
    }

    /// Opens `c`'s link and runs until it is connected ([`Event::Connected`]); panics if the
    /// connection fails instead.
    pub fn connect(&mut self, c: ClientId) -> ConnectionInfo {
        match self.try_connect(c) {
            Ok(info) => info,
            Err((error, permanent)) => {
                panic!("{} could not connect: {error} (permanent: {permanent})", self.peer(c).name)
            }
        }
    }

    /// Opens `c`'s link and runs until [`Event::Connected`] or [`Event::ConnectionFailed`]
    /// (the error, and whether it is permanent).
    pub fn try_connect(&mut self, c: ClientId) -> Result<ConnectionInfo, (ConnectError, bool)> {
        if let Some(until) = self.peer(c).blocked_until {
            panic!("{} is blocked by a synchronous handler until {until:?}", self.peer(c).name);
        }
        self.peer_mut(c).gave_up = false;
        let from = self.peer(c).events.len();
        let done = |e: &Event| matches!(e, Event::Connected { .. } | Event::ConnectionFailed { .. });
        self.open_link(c);
        self.run_until(|s: &Sim| s.peer(c).events[from..].iter().any(|(_, e)| done(e)));
        let outcome = self.peer(c).events[from..].iter().find(|(_, e)| done(e)).map(|(_, e)| e.clone());
        match outcome {
            Some(Event::Connected { info, .. }) => Ok(info),
            Some(Event::ConnectionFailed { error, permanent }) => Err((error, permanent)),
            _ => unreachable!("run_until stopped on one of them"),
        }
    }

    /// [`Sim::connect`] again after the link went down.
    pub fn reconnect(&mut self, c: ClientId) -> ConnectionInfo {
        assert!(self.peer(c).link.is_none(), "{} still has a link", self.peer(c).name);
        self.connect(c)
    }

    /// The transport dies: the hub notices (cleanup, `client_disconnected` broadcast) and so
    /// does the engine. Messages in flight are lost. No automatic reconnection follows.
    pub fn drop_link(&mut self, c: ClientId) {
        let Some(link) = self.peer_mut(c).link.take() else { return };
        self.record(link.conn, Dir::Up, HubOutput::Close { code: 1006, reason: "link dropped".into() }, true);
        self.lost += (link.up.len() + link.down.len()) as u64;
        self.hub.handle_close(self.now.as_micros(), link.conn);
        let now = self.now;
        self.peer_mut(c).engine.handle_transport_closed(now, None, "link dropped");
        self.drive();
    }

    /// The client loses its transport but the hub does not notice (a half-open connection: the
    /// hub keeps the client and its services until a reconnection supersedes it or the idle
    /// timeout). Messages in flight are lost. No automatic reconnection follows.
    pub fn cut_link(&mut self, c: ClientId) {
        let Some(link) = self.peer_mut(c).link.take() else { return };
        self.lost += (link.up.len() + link.down.len()) as u64;
        let now = self.now;
        self.peer_mut(c).engine.handle_transport_closed(now, None, "link cut");
        self.drive();
    }

    /// The client vanishes for good (a crash): its link drops and it never runs again.
    pub fn kill_client(&mut self, c: ClientId) {
        let link = self.peer_mut(c).link.take();
        self.peer_mut(c).dead = true;
        if let Some(link) = link {
            self.record(link.conn, Dir::Up, HubOutput::Close { code: 1006, reason: "killed".into() }, true);
            self.hub.handle_close(self.now.as_micros(), link.conn);
        }
        self.drive();
    }

    /// [`Engine::close`]: the client leaves cleanly (pending calls fail with
    /// [`CallError::Closed`], close 1000).
    pub fn close_client(&mut self, c: ClientId) {
        let now = self.now;
        let p = self.peer_mut(c);
        p.closed = true;
        p.engine.close(now);
        self.drive();
    }

    /// The hub restarts with a new server (and manager) id; clients reconnect by themselves.
    pub fn restart_hub(&mut self, new_server_id: &str) {
        self.hub.restart(new_server_id);
        self.drive();
    }

    /// Latency of `c`'s link, each way (zero by default). Applies to messages sent from now on.
    pub fn set_latency(&mut self, c: ClientId, latency: Duration) {
        self.peer_mut(c).latency = latency;
    }

    /// Whether `c` reconnects by itself after the hub closed its link (default `true`).
    pub fn set_auto_reconnect(&mut self, c: ClientId, on: bool) {
        self.peer_mut(c).auto_reconnect = on;
    }

    /// Schedules `c` to open a new link after `delay` (without waiting for the handshake, unlike
    /// [`Sim::reconnect`]). Nothing happens then if `c` has a link, is dead or closed; a client
    /// blocked by a synchronous handler reconnects once it is free.
    pub fn reconnect_after(&mut self, c: ClientId, delay: Duration) {
        let at = self.now + delay;
        self.add_timer(at, Timer::Reconnect(c));
    }

    // ---- user code ----------------------------------------------------------------------------

    /// Registers `spec` on `c` with a handler per function path (`"add"`, `"nested.f"`).
    pub fn register(&mut self, c: ClientId, spec: ServiceSpec, handlers: Vec<(&str, Handler)>) -> CallId {
        for (path, h) in handlers {
            self.set_handler(c, &spec.id, path, h);
        }
        let now = self.now;
        let id = self.peer_mut(c).engine.register_service(now, spec).expect("register_service");
        self.track(c, id)
    }

    /// Sets (or replaces) the handler of `service`'s function `path` on `c`.
    pub fn set_handler(&mut self, c: ClientId, service: &str, path: &str, h: Handler) {
        self.peer_mut(c).handlers.insert((service.into(), path.into()), h);
    }

    /// The handler of every [`InvokeTarget::Callback`] invocation on `c`.
    pub fn on_callback(&mut self, c: ClientId, h: Handler) {
        self.peer_mut(c).callback = Some(h);
    }

    /// Stops serving service `id` on `c`.
    pub fn unregister(&mut self, c: ClientId, id: &str) -> CallId {
        let now = self.now;
        let call = self.peer_mut(c).engine.unregister_service(now, id).expect("unregister_service");
        self.track(c, call)
    }

    // ---- calls --------------------------------------------------------------------------------

    /// `c` calls `target(args, **kwargs)` with default options.
    pub fn call(&mut self, c: ClientId, target: &Method, args: Vec<Value>, kwargs: Option<Map>) -> CallId {
        self.call_with(c, target, args, kwargs, CallOptions::default())
    }

    /// `c` calls `target` with explicit [`CallOptions`].
    pub fn call_with(
        &mut self,
        c: ClientId,
        target: &Method,
        args: Vec<Value>,
        kwargs: Option<Map>,
        options: CallOptions,
    ) -> CallId {
        let now = self.now;
        let id = self.peer_mut(c).engine.call(now, target, args, kwargs, options).expect("Engine::call");
        self.track(c, id)
    }

    /// `c` calls the manager's `services.default.<name>`.
    pub fn call_manager(&mut self, c: ClientId, name: &str, args: Vec<Value>, kwargs: Option<Map>) -> CallId {
        let now = self.now;
        let id = self.peer_mut(c).engine.call_manager(now, name, args, kwargs).expect("Engine::call_manager");
        self.track(c, id)
    }

    /// `c` fetches service `id` through the manager.
    pub fn get_service(&mut self, c: ClientId, id: &str) -> CallId {
        let now = self.now;
        let call = self.peer_mut(c).engine.get_service(now, id, None).expect("Engine::get_service");
        self.track(c, call)
    }

    /// `c` asks a remote generator for its next item ([`Engine::generator_next`]): the call
    /// resolves with the item, or with `stop_iteration` at the end.
    pub fn generator_next(&mut self, c: ClientId, generator: &Generator) -> CallId {
        let now = self.now;
        let id = self.peer_mut(c).engine.generator_next(now, generator).expect("Engine::generator_next");
        self.track(c, id)
    }

    /// `c` closes a remote generator early ([`Engine::generator_close`]).
    pub fn generator_close(&mut self, c: ClientId, generator: &Generator) -> CallId {
        let now = self.now;
        let id = self.peer_mut(c).engine.generator_close(now, generator).expect("Engine::generator_close");
        self.track(c, id)
    }

    /// Runs a command on `c`'s engine that starts a call (`call`, `get_service`,
    /// `register_service`, `generator_next`, ...), tracks the call like [`Sim::call`] does and
    /// drives; the engine's refusal comes back instead of a panic.
    pub fn try_command(
        &mut self,
        c: ClientId,
        command: impl FnOnce(&mut Engine, Instant) -> Result<CallId, EngineError>,
    ) -> Result<CallId, EngineError> {
        let now = self.now;
        let id = command(&mut self.peer_mut(c).engine, now);
        match id {
            Ok(id) => Ok(self.track(c, id)),
            Err(e) => {
                self.drive();
                Err(e)
            }
        }
    }

    fn track(&mut self, c: ClientId, id: CallId) -> CallId {
        self.peer_mut(c).issued.insert(id);
        self.drive();
        id
    }

    /// The result of call `id` of `c`, once it settled.
    pub fn settled(&self, c: ClientId, id: CallId) -> Option<Result<Value, CallError>> {
        self.peer(c).settled.get(&id).map(|(_, r)| r.clone())
    }

    /// When call `id` of `c` settled.
    pub fn settled_at(&self, c: ClientId, id: CallId) -> Option<Instant> {
        self.peer(c).settled.get(&id).map(|(t, _)| *t)
    }

    /// Runs until call `id` of `c` settles; its result.
    pub fn wait(&mut self, c: ClientId, id: CallId) -> Result<Value, CallError> {
        self.run_until(|s: &Sim| s.settled(c, id).is_some());
        self.settled(c, id).expect("settled")
    }

    /// [`Sim::wait`], expecting success.
    pub fn wait_ok(&mut self, c: ClientId, id: CallId) -> Value {
        match self.wait(c, id) {
            Ok(v) => v,
            Err(e) => panic!("call {id:?} of {} failed: {e:?}", self.peer(c).name),
        }
    }

    // ---- raw connections ----------------------------------------------------------------------

    /// Opens a raw connection and authenticates it with the given first-frame fields; panics
    /// unless the hub answers with `connection_info`.
    pub fn raw_connect(&mut self, client_id: &str, workspace: Option<&str>, token: Option<&str>) -> RawId {
        let conn = self.hub.open(self.now.as_micros());
        let raw = RawId(self.raws.len());
        self.raws.push(Raw { conn, received: Vec::new(), info: None });
        self.owners.insert(conn, Owner::Raw(raw));
        let auth = serde_json::json!({
            "client_id": client_id, "workspace": workspace, "token": token, "reconnection_token": null
        });
        self.raw_send(raw, WsMessage::Text(auth.to_string()));
        let info = self.raws[raw.0]
            .received
            .iter()
            .find_map(|o| match o {
                HubOutput::Message(WsMessage::Text(t)) => serde_json::from_str::<Json>(t).ok(),
                _ => None,
            })
            .filter(|j| j["type"] == "connection_info")
            .unwrap_or_else(|| panic!("raw {client_id} refused: {:?}", self.raws[raw.0].received));
        self.raws[raw.0].info = Some(info);
        raw
    }

    /// Sends `msg` on a raw connection (no latency) and drives.
    pub fn raw_send(&mut self, raw: RawId, msg: WsMessage) {
        let conn = self.raws[raw.0].conn;
        self.record(conn, Dir::Up, HubOutput::Message(msg.clone()), true);
        self.hub.handle_message(self.now.as_micros(), conn, msg);
        self.drive();
    }

    /// Everything the hub sent to a raw connection.
    pub fn raw_received(&self, raw: RawId) -> &[HubOutput] {
        &self.raws[raw.0].received
    }

    /// The raw connection's `connection_info`.
    pub fn raw_info(&self, raw: RawId) -> &Json {
        self.raws[raw.0].info.as_ref().expect("connected")
    }

    /// The hub connection of a raw client.
    pub fn raw_conn(&self, raw: RawId) -> ConnId {
        self.raws[raw.0].conn
    }

    /// `ws/client` of a raw connection.
    pub fn raw_full_id(&self, raw: RawId) -> String {
        let info = self.raw_info(raw);
        format!(
            "{}/{}",
            info["workspace"].as_str().unwrap_or_default(),
            info["client_id"].as_str().unwrap_or_default()
        )
    }

    /// Sends a hand-made binary frame on `c`'s link, as if its engine had written it.
    pub fn inject(&mut self, c: ClientId, frame: Bytes) {
        let due = self.now + self.peer(c).latency;
        let p = self.peer_mut(c);
        let link = p.link.as_mut().unwrap_or_else(|| panic!("{} has no link", p.name));
        link.up.push_back((due, Up::Msg(WsMessage::Binary(frame))));
        self.drive();
    }

    // ---- inspection ---------------------------------------------------------------------------

    /// The virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }
    /// `c`'s engine.
    pub fn engine(&self, c: ClientId) -> &Engine {
        &self.peer(c).engine
    }
    /// `c`'s engine, mutably (calls made through it are not tracked by [`Sim::finish`]).
    pub fn engine_mut(&mut self, c: ClientId) -> &mut Engine {
        &mut self.peer_mut(c).engine
    }
    /// What the server said at `c`'s last handshake.
    pub fn info(&self, c: ClientId) -> ConnectionInfo {
        self.engine(c).connection_info().cloned().expect("connected once")
    }
    /// `c`'s workspace.
    pub fn workspace(&self, c: ClientId) -> String {
        self.info(c).workspace
    }
    /// `ws/client` of `c`.
    pub fn full_id(&self, c: ClientId) -> String {
        let info = self.info(c);
        format!("{}/{}", info.workspace, info.client_id)
    }
    /// `c`'s current hub connection.
    pub fn link(&self, c: ClientId) -> Option<ConnId> {
        self.peer(c).link.as_ref().map(|l| l.conn)
    }
    /// Every event of `c`, with its time.
    pub fn events(&self, c: ClientId) -> &[(Instant, Event)] {
        &self.peer(c).events
    }
    /// Every invocation `c`'s handlers saw, with its time.
    pub fn invocations(&self, c: ClientId) -> &[(Instant, Invocation)] {
        &self.peer(c).invocations
    }
    /// Frames and texts `c`'s engine refused, with why.
    pub fn input_errors(&self, c: ClientId) -> &[(Instant, InputError)] {
        &self.peer(c).input_errors
    }
    /// Every message exchanged so far.
    pub fn trace(&self) -> &[TraceEntry] {
        &self.trace
    }
    /// Delivered binary frames of `c` (any of its links) in direction `dir`, decoded.
    pub fn frames(&self, c: ClientId, dir: Dir) -> Vec<(Instant, Frame)> {
        self.trace
            .iter()
            .filter(|t| t.delivered && t.dir == dir && t.owner == Some(Owner::Client(c)))
            .filter_map(|t| Some((t.at, t.frame()?)))
            .collect()
    }
    /// SHA-256 (hex) of every message exchanged so far, with times, connections and directions.
    pub fn frame_hash(&self) -> String {
        let digest = self.hasher.clone().finalize();
        digest.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
    /// Messages that never arrived because their link died.
    pub fn lost_messages(&self) -> u64 {
        self.lost
    }

    /// Every client added so far, live or not.
    pub fn clients(&self) -> impl Iterator<Item = ClientId> + use<> {
        (0..self.peers.len()).map(ClientId)
    }

    /// Whether `c` was killed ([`Sim::kill_client`]).
    pub fn is_dead(&self, c: ClientId) -> bool {
        self.peer(c).dead
    }

    /// Whether `c` was closed ([`Sim::close_client`]).
    pub fn is_closed(&self, c: ClientId) -> bool {
        self.peer(c).closed
    }

    /// Whether a synchronous handler blocks `c` now ([`Reply::Blocking`]).
    pub fn is_blocked(&self, c: ClientId) -> bool {
        self.peer(c).blocked_until.is_some()
    }

    /// Invocations `c`'s user code has not answered yet.
    pub fn open_invocations(&self, c: ClientId) -> usize {
        self.peer(c).open_invocations.len()
    }

    /// Calls the harness started on `c` that have not settled yet.
    pub fn unsettled(&self, c: ClientId) -> usize {
        let p = self.peer(c);
        p.issued.iter().filter(|id| !p.settled.contains_key(id)).count()
    }

    /// Settlements `c`'s engine reported for calls the harness never started.
    pub fn untracked_settlements(&self, c: ClientId) -> u64 {
        self.peer(c).untracked
    }

    /// Replies `c`'s engine refused and handler calls it could not start: when, for which
    /// invocation, and why. Each invocation was answered with an error instead.
    pub fn reply_failures(&self, c: ClientId) -> &[(Instant, InvokeId, String)] {
        &self.peer(c).reply_failures
    }

    /// Scheduled replies and reconnections not fired yet.
    pub fn pending_timers(&self) -> usize {
        self.timers.len()
    }

    /// Messages travelling on links (both ways, closing links included) and not delivered yet.
    pub fn in_flight(&self) -> usize {
        let links = self.peers.iter().filter_map(|p| p.link.as_ref()).map(|l| l.up.len() + l.down.len());
        links.sum::<usize>() + self.closing.iter().map(|(_, l)| l.up.len()).sum::<usize>()
    }

    /// The longest binary message exchanged so far (either way, delivered or not), in bytes.
    pub fn largest_frame(&self) -> usize {
        self.trace
            .iter()
            .filter_map(|t| match &t.what {
                HubOutput::Message(WsMessage::Binary(b)) => Some(b.len()),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// End-of-test checks: every call the harness started settled (exactly once: a second
    /// settlement already panicked), every live engine is back to no pending call, and its
    /// open invocations are exactly those the user code has not answered.
    pub fn finish(&mut self) {
        self.drive();
        for p in &self.peers {
            if p.dead {
                continue;
            }
            let unsettled: Vec<_> = p.issued.iter().filter(|id| !p.settled.contains_key(id)).collect();
            assert!(unsettled.is_empty(), "{}: calls never settled: {unsettled:?}", p.name);
            assert_eq!(p.engine.pending_calls(), 0, "{}: the engine still has pending calls", p.name);
            assert_eq!(
                p.engine.active_invocations(),
                p.open_invocations.len(),
                "{}: the engine's open invocations differ from the unanswered ones",
                p.name
            );
        }
    }

    /// [`Sim::finish`], and also that every live engine holds nothing any more: no upload in
    /// progress, no partial message, no session of returned functions or generators, no
    /// `_rintf` interface.
    pub fn finish_clean(&mut self) {
        self.finish();
        for p in &self.peers {
            if p.dead {
                continue;
            }
            let e = &p.engine;
            let held = [
                ("uploads", e.uploads()),
                ("partial messages", e.partial_messages()),
                ("exports", e.exports()),
                ("interfaces", e.interfaces()),
            ];
            for (what, n) in held {
                assert_eq!(n, 0, "{}: {n} {what} left at the end", p.name);
            }
        }
    }

    // ---- time ---------------------------------------------------------------------------------

    /// The earliest time something is due: an engine timer, a hub timer, a scheduled reply or
    /// reconnection, or a message in flight.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for p in &self.peers {
            if p.dead {
                continue;
            }
            if p.blocked_until.is_none() {
                consider(p.engine.poll_timeout());
                consider(p.link.as_ref().and_then(|l| l.down.front()).map(|(t, _)| *t));
            }
            consider(p.link.as_ref().and_then(|l| l.up.front()).map(|(t, _)| *t));
        }
        for (_, l) in &self.closing {
            consider(l.up.front().map(|(t, _)| *t));
        }
        consider(self.hub.next_deadline().map(Instant::from_micros));
        consider(self.timers.keys().next().map(|(t, _)| *t));
        t
    }

    /// What is due now (for the "stalled" diagnosis).
    fn due_now(&self) -> String {
        let now = self.now;
        let mut due = Vec::new();
        for p in self.peers.iter().filter(|p| !p.dead) {
            let blocked = if p.blocked_until.is_some() { " (blocked)" } else { "" };
            if p.engine.poll_timeout().is_some_and(|t| t <= now) {
                due.push(format!("{}'s engine timer{blocked} (ready: {})", p.name, p.engine.is_ready()));
            }
            if let Some(l) = &p.link {
                if l.up.front().is_some_and(|(t, _)| *t <= now)
                    || l.down.front().is_some_and(|(t, _)| *t <= now)
                {
                    due.push(format!("a message on {}'s link{blocked}", p.name));
                }
            }
        }
        if self.hub.next_deadline().is_some_and(|d| d <= now.as_micros()) {
            due.push("the hub's timer".into());
        }
        if self.timers.keys().next().is_some_and(|(t, _)| *t <= now) {
            due.push("a scheduled reply or reconnection".into());
        }
        due.join(", ")
    }

    /// Advances to the earliest deadline (never backwards), fires everything due then, and
    /// drives. `None` when nothing will ever happen again.
    pub fn step(&mut self) -> Option<Instant> {
        let t = self.next_deadline()?;
        if t > self.now {
            self.now = t;
            self.stalled_steps = 0;
        } else {
            self.stalled_steps += 1;
            assert!(
                self.stalled_steps <= self.stall_limit,
                "stalled: {} steps at {:?} without time moving on; due: {}",
                self.stalled_steps,
                self.now,
                self.due_now()
            );
        }
        let now = self.now;
        for p in &mut self.peers {
            if !p.dead && p.blocked_until.is_none() && p.engine.poll_timeout().is_some_and(|d| d <= now) {
                p.engine.handle_timeout(now);
            }
        }
        if self.hub.next_deadline().is_some_and(|d| d <= now.as_micros()) {
            self.hub.tick(now.as_micros());
        }
        self.drive();
        Some(now)
    }

    /// Steps until `until` holds: an [`Instant`] (time then stands exactly there), or a
    /// predicate `|sim: &Sim| ...`. Panics when a predicate is not met within
    /// [`Sim::step_limit`] steps or [`Sim::horizon`] of virtual time. Returns the time.
    pub fn run_until(&mut self, mut until: impl Until) -> Instant {
        self.drive();
        let start = self.now;
        let mut steps = 0u64;
        loop {
            if until.reached(self) {
                return self.now;
            }
            let cap = until.deadline();
            match (self.next_deadline(), cap) {
                (Some(next), Some(cap)) if next > cap => {
                    self.now = self.now.max(cap);
                    self.drive();
                }
                (Some(_), _) => {
                    self.step();
                }
                (None, Some(cap)) => {
                    self.now = self.now.max(cap);
                    self.drive();
                }
                (None, None) => panic!("run_until: nothing left to happen at {:?}", self.now),
            }
            steps += 1;
            assert!(steps <= self.step_limit, "run_until: not reached within {steps} steps ({:?})", self.now);
            if cap.is_none() {
                let spent = self.now.saturating_duration_since(start);
                assert!(spent <= self.horizon, "run_until: not reached within {spent:?} of virtual time");
            }
        }
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) -> Instant {
        let until = self.now + d;
        self.run_until(until)
    }

    /// Moves every message, event and scheduled action that is due now, until nothing moves.
    /// Panics ("livelock") after [`Sim::livelock_limit`] deliveries without quiescence.
    pub fn drive(&mut self) {
        let mut total = 0u64;
        loop {
            let mut moved = self.fire_timers();
            for i in 0..self.peers.len() {
                moved += self.pump(ClientId(i));
            }
            moved += self.deliver_up();
            moved += self.route_hub_output();
            moved += self.deliver_down();
            if moved == 0 {
                if let Some(mut check) = self.checker.take() {
                    check(self);
                    self.checker = Some(check);
                }
                return;
            }
            total += moved;
            assert!(
                total <= self.livelock_limit,
                "livelock: {total} deliveries at {:?} without quiescence",
                self.now
            );
        }
    }

    // ---- internals ----------------------------------------------------------------------------

    fn peer(&self, c: ClientId) -> &Peer {
        &self.peers[c.0]
    }

    fn peer_mut(&mut self, c: ClientId) -> &mut Peer {
        &mut self.peers[c.0]
    }

    fn record(&mut self, conn: ConnId, dir: Dir, what: HubOutput, delivered: bool) {
        let owner = self.owners.get(&conn).copied();
        let h = &mut self.hasher;
        h.update(self.now.as_micros().to_be_bytes());
        h.update(conn.0.to_be_bytes());
        h.update([dir as u8, u8::from(delivered)]);
        match &what {
            HubOutput::Message(WsMessage::Text(t)) => {
                h.update([b'T']);
                h.update((t.len() as u64).to_be_bytes());
                h.update(t.as_bytes());
            }
            HubOutput::Message(WsMessage::Binary(b)) => {
                h.update([b'B']);
                h.update((b.len() as u64).to_be_bytes());
                h.update(b);
            }
            HubOutput::Close { code, reason } => {
                h.update([b'C']);
                h.update(code.to_be_bytes());
                h.update(reason.as_bytes());
            }
        }
        self.trace.push(TraceEntry { at: self.now, conn, owner, dir, what, delivered });
    }

    fn add_timer(&mut self, at: Instant, timer: Timer) {
        self.next_timer += 1;
        self.timers.insert((at, self.next_timer), timer);
    }

    fn open_link(&mut self, c: ClientId) {
        let now = self.now;
        let conn = self.hub.open(now.as_micros());
        self.owners.insert(conn, Owner::Client(c));
        let p = self.peer_mut(c);
        assert!(p.link.is_none(), "{} already has a link", p.name);
        p.link = Some(Link::new(conn));
        p.engine.handle_transport_open(now).expect("handle_transport_open");
        self.hasher.update(b"open");
        self.hasher.update(conn.0.to_be_bytes());
        self.drive();
    }

    /// Schedules an automatic reconnection of `c`, with backoff.
    fn maybe_reconnect(&mut self, c: ClientId) {
        let now = self.now;
        let p = self.peer_mut(c);
        if !p.auto_reconnect || p.dead || p.closed || p.gave_up || p.link.is_some() || p.reconnect_scheduled {
            return;
        }
        let delay = match p.reconnect_attempts {
            0 => Duration::ZERO,
            n => Duration::from_secs((1u64 << (n - 1).min(6)).min(60)),
        };
        p.reconnect_attempts += 1;
        p.reconnect_scheduled = true;
        self.add_timer(now + delay, Timer::Reconnect(c));
    }

    fn fire_timers(&mut self) -> u64 {
        let mut fired = 0;
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let timer = entry.remove();
            fired += 1;
            assert!(fired <= self.livelock_limit, "livelock: {fired} timers fired at {:?}", self.now);
            match timer {
                Timer::Reply { client, invoke, result, unblock } => {
                    let p = self.peer_mut(client);
                    if p.dead {
                        continue;
                    }
                    if unblock {
                        p.blocked_until = None;
                    } else if let Some(until) = p.blocked_until {
                        // An async task cannot run while a synchronous handler blocks the loop.
                        self.add_timer(until, Timer::Reply { client, invoke, result, unblock });
                        continue;
                    }
                    self.answer(client, invoke, result);
                }
                Timer::Reconnect(c) => {
                    // A client killed while a synchronous handler blocked it stays "blocked"
                    // for ever (its unblocking reply is skipped): never wait for it.
                    if self.peer(c).dead || self.peer(c).closed {
                        self.peer_mut(c).reconnect_scheduled = false;
                        continue;
                    }
                    if let Some(until) = self.peer(c).blocked_until {
                        self.add_timer(until, Timer::Reconnect(c));
                        continue;
                    }
                    let p = self.peer_mut(c);
                    p.reconnect_scheduled = false;
                    if !p.dead && !p.closed && p.link.is_none() {
                        self.open_link(c);
                    }
                }
            }
        }
        fired
    }

    /// Takes `c`'s transmits onto its link and runs its user code on its events.
    fn pump(&mut self, c: ClientId) -> u64 {
        let mut moved = 0;
        loop {
            let now = self.now;
            let p = self.peer_mut(c);
            if p.dead || p.blocked_until.is_some() {
                return moved;
            }
            if let Some(t) = p.engine.poll_transmit() {
                moved += 1;
                let due = now + p.latency;
                match t {
                    Transmit::Text(s) => self.send_up(c, due, Up::Msg(WsMessage::Text(s))),
                    Transmit::Binary(b) => self.send_up(c, due, Up::Msg(WsMessage::Binary(b))),
                    Transmit::Close { code, reason } => {
                        if let Some(mut link) = p.link.take() {
                            link.up.push_back((due, Up::Close { code, reason: reason.clone() }));
                            self.lost += link.down.len() as u64;
                            link.down.clear();
                            self.closing.push((c, link));
                        }
                        let p = self.peer_mut(c);
                        p.engine.handle_transport_closed(now, Some(code), &reason);
                        self.maybe_reconnect(c);
                    }
                }
                continue;
            }
            if let Some(e) = p.engine.poll_event() {
                moved += 1;
                self.on_event(c, e);
                continue;
            }
            return moved;
        }
    }

    fn send_up(&mut self, c: ClientId, due: Instant, up: Up) {
        match self.peer_mut(c).link.as_mut() {
            Some(link) => link.up.push_back((due, up)),
            None => self.lost += 1,
        }
    }

    fn on_event(&mut self, c: ClientId, e: Event) {
        let now = self.now;
        self.peer_mut(c).events.push((now, e.clone()));
        match e {
            Event::CallSettled { id, result } => {
                let p = self.peer_mut(c);
                if let Some((at, first)) = p.settled.get(&id) {
                    panic!(
                        "{}: call {id:?} settled twice: {first:?} at {at:?}, then {result:?} at {now:?}",
                        p.name
                    );
                }
                if !p.issued.contains(&id) {
                    p.untracked += 1;
                }
                p.settled.insert(id, (now, result.clone()));
                if let Some(n) = p.nested.remove(&id) {
                    let reply = (n.then)(result);
                    self.apply(c, n.invoke, n.session, reply);
                }
            }
            Event::Invoke(inv) => {
                let p = self.peer_mut(c);
                p.invocations.push((now, inv.clone()));
                p.open_invocations.insert(inv.id);
                let h = match &inv.target {
                    InvokeTarget::Service { service, function } => {
                        p.handlers.get(&(service.clone(), function.clone())).cloned()
                    }
                    // Callbacks, returned functions and generators share the callback handler.
                    _ => p.callback.clone(),
                };
                let reply = match h {
                    Some(h) => h(&inv),
                    None => Reply::error(format!("no handler for {:?}", inv.target)),
                };
                self.apply(c, inv.id, inv.session.clone(), reply);
            }
            Event::Connected { .. } => self.peer_mut(c).reconnect_attempts = 0,
            Event::ConnectionFailed { permanent: true, .. } => self.peer_mut(c).gave_up = true,
            _ => {}
        }
    }

    fn apply(&mut self, c: ClientId, invoke: InvokeId, session: Option<String>, reply: Reply) {
        let now = self.now;
        match reply {
            Reply::Ok(v) => self.answer(c, invoke, Ok(v)),
            Reply::Err(e) => self.answer(c, invoke, Err(e)),
            Reply::After(d, result) => {
                self.add_timer(now + d, Timer::Reply { client: c, invoke, result, unblock: false })
            }
            Reply::Blocking(d, result) => {
                self.peer_mut(c).blocked_until = Some(now + d);
                self.add_timer(now + d, Timer::Reply { client: c, invoke, result, unblock: true });
            }
            Reply::Never => {}
            Reply::Call { target, args, kwargs, then } => {
                let p = self.peer_mut(c);
                let options = CallOptions { parent: session.clone(), ..CallOptions::default() };
                match p.engine.call(now, &target, args, kwargs, options) {
                    Ok(id) => {
                        p.issued.insert(id);
                        p.nested.insert(id, Nested { invoke, session, then });
                    }
                    Err(e) => {
                        // The handler's call raises (a limit, a closed engine): so does the handler.
                        let why = format!("a handler's call of {} could not start: {e}", target.method);
                        p.reply_failures.push((now, invoke, why.clone()));
                        self.answer(c, invoke, Err(remote_error(why)));
                    }
                }
            }
        }
    }

    fn answer(&mut self, c: ClientId, invoke: InvokeId, result: Result<Value, RemoteError>) {
        let now = self.now;
        let p = self.peer_mut(c);
        p.open_invocations.remove(&invoke);
        match p.engine.reply(now, invoke, result) {
            Ok(()) => {}
            Err(e @ EngineError::LimitReached { .. }) => {
                // The reply cannot be sent (too many returned sessions or interfaces, a full
                // backlog): the handler raises instead, as a Python handler whose result cannot
                // be sent would. The invocation may already be gone (a full backlog).
                let why = format!("reply to {invoke:?} refused: {e}");
                p.reply_failures.push((now, invoke, why.clone()));
                match p.engine.reply(now, invoke, Err(remote_error(why))) {
                    Ok(()) | Err(EngineError::UnknownInvocation) | Err(EngineError::LimitReached { .. }) => {}
                    Err(e) => panic!("{}: the error reply to {invoke:?} failed: {e}", p.name),
                }
            }
            Err(e) => assert!(p.dead || p.closed, "{}: reply to {invoke:?} failed: {e}", p.name),
        }
    }

    fn deliver_up(&mut self) -> u64 {
        let now = self.now;
        let mut items: Vec<(ConnId, Up)> = Vec::new();
        for p in &mut self.peers {
            if let Some(link) = &mut p.link {
                while link.up.front().is_some_and(|(t, _)| *t <= now) {
                    let (_, up) = link.up.pop_front().expect("front");
                    items.push((link.conn, up));
                }
            }
        }
        for (_, link) in &mut self.closing {
            while link.up.front().is_some_and(|(t, _)| *t <= now) {
                let (_, up) = link.up.pop_front().expect("front");
                items.push((link.conn, up));
            }
        }
        self.closing.retain(|(_, l)| !l.up.is_empty());
        let n = items.len() as u64;
        for (conn, up) in items {
            match up {
                Up::Msg(m) => {
                    self.record(conn, Dir::Up, HubOutput::Message(m.clone()), true);
                    self.hub.handle_message(now.as_micros(), conn, m);
                }
                Up::Close { code, reason } => {
                    self.record(conn, Dir::Up, HubOutput::Close { code, reason }, true);
                    self.hub.handle_close(now.as_micros(), conn);
                }
            }
        }
        n
    }

    fn route_hub_output(&mut self) -> u64 {
        let mut n = 0;
        while let Some((conn, out)) = self.hub.poll_output() {
            n += 1;
            match self.owners.get(&conn).copied() {
                Some(Owner::Client(c)) => {
                    let due = self.now + self.peer(c).latency;
                    match self.peer_mut(c).link.as_mut().filter(|l| l.conn == conn) {
                        Some(link) => link.down.push_back((due, out)),
                        None => {
                            // A link the client no longer has (cut, superseded, closing).
                            self.lost += 1;
                            self.record(conn, Dir::Down, out, false);
                        }
                    }
                }
                Some(Owner::Raw(r)) => {
                    self.raws[r.0].received.push(out.clone());
                    self.record(conn, Dir::Down, out, true);
                }
                None => {
                    self.lost += 1;
                    self.record(conn, Dir::Down, out, false);
                }
            }
        }
        n
    }

    fn deliver_down(&mut self) -> u64 {
        let now = self.now;
        let mut n = 0;
        for i in 0..self.peers.len() {
            let c = ClientId(i);
            loop {
                let p = self.peer_mut(c);
                if p.dead || p.blocked_until.is_some() {
                    break;
                }
                let Some(link) = p.link.as_mut() else { break };
                if link.down.front().is_none_or(|(t, _)| *t > now) {
                    break;
                }
                let conn = link.conn;
                let (_, out) = link.down.pop_front().expect("front");
                n += 1;
                self.record(conn, Dir::Down, out.clone(), true);
                let p = self.peer_mut(c);
                match out {
                    HubOutput::Message(WsMessage::Text(t)) => {
                        if let Err(e) = p.engine.handle_text(now, &t) {
                            p.input_errors.push((now, e));
                        }
                    }
                    HubOutput::Message(WsMessage::Binary(b)) => {
                        if let Err(e) = p.engine.handle_binary(now, &b) {
                            p.input_errors.push((now, e));
                        }
                    }
                    HubOutput::Close { code, reason } => {
                        if let Some(link) = p.link.take() {
                            self.lost += link.down.len() as u64;
                        }
                        let p = self.peer_mut(c);
                        p.engine.handle_transport_closed(now, Some(code), &reason);
                        self.pump(c);
                        self.maybe_reconnect(c);
                        continue;
                    }
                }
                n += self.pump(c);
            }
        }
        n
    }
}
