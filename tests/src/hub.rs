//! A deterministic in-memory model of the Hypha server (the "simulated hub") that speaks the real wire protocol, so protocol engines can be tested without sockets, clocks or Python.
//!
//! The hub is sans-IO: a test driver tells it that a WebSocket was opened
//! ([`Hub::open`]), that a message arrived ([`Hub::handle_message`]) or that the link closed
//! ([`Hub::handle_close`]), and collects what the server would send with [`Hub::poll_output`].
//! Time is always an argument (microseconds, any epoch); [`Hub::tick`] fires the timers
//! (authentication and idle timeouts, the manager's `get_service` timeout and heartbeats).
//! Every id and token comes from counters and a seeded generator, and every collection that is
//! iterated for output is a `BTreeMap`/`BTreeSet`, so the same inputs give the same outputs.
//!
//! Modelled after hypha 0.21.137 (PROTOCOL.md §2, §3, §10; `hypha/websocket.py`,
//! `hypha/core/__init__.py` and `hypha/core/workspace.py` of the server):
//! - the handshake (anonymous users, tokens minted by `generate_token`, reconnection tokens,
//!   the duplicate-client check, every close code and the `{"type":"error"}` text before it);
//! - text control frames (`ping`, `refresh_token`, the 1000-character limit);
//! - the rewrite of `main` (§3.3) with the remainder copied byte for byte, routing, broadcasts,
//!   and the dead-peer reject for recently disconnected targets (remembered 120 s);
//! - the rate limit (200 frames/s, burst 2000, close 1008) and the 16 MiB frame cap (1009);
//! - the workspace manager `*/manager-<server_id>` with `built-in.get_service("default")` and
//!   the `default` methods `register_service`, `unregister_service`, `get_service`,
//!   `get_service_info`, `list_services`, `list_clients`, `generate_token`, `subscribe`,
//!   `unsubscribe`, `echo` and `log` (other methods reject with `NotImplementedError`);
//! - disconnection cleanup and the `client_disconnected` broadcast.
//!
//! Tokens are not JWTs. `generate_token` returns `hubtoken:<workspace>:<user id>` and
//! `connection_info` carries `hubreconnect:<workspace>/<client id>:<user id>`; the hub keeps
//! what each minted token grants in a registry that, like the real server's JWT secret,
//! survives [`Hub::restart`]. A hand-written `hubtoken:<workspace>:<user id>` that the hub
//! never minted is also accepted: it logs in a registered (non-anonymous) user with
//! read-write permission on that workspace, which lets tests place clients where they want.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

use bytes::Bytes;
use hypha_rpc_core::codec::{decode_value, decode_value_slice, encode_value};
use hypha_rpc_core::{Limits, Map, Value};
use serde_json::Value as Json;

/// The `hypha_version` the hub reports.
pub const HYPHA_VERSION: &str = "0.21.137";
/// `reconnection_token_life_time`, in seconds.
pub const RECONNECTION_TOKEN_LIFE_S: u64 = 172_800;
/// Time a new connection has to send its authentication text frame.
pub const AUTH_TIMEOUT_US: u64 = 5_000_000;
/// The server closes a connection that sent no data frame for this long (`HYPHA_WS_IDLE_TIMEOUT`).
pub const IDLE_TIMEOUT_US: u64 = 600_000_000;
/// How long a disconnected client counts as "recently disconnected" for the dead-peer reject.
pub const RECENT_DISCONNECT_TTL_US: u64 = 120_000_000;
/// Text control frames longer than this many characters are ignored.
pub const MAX_TEXT_CHARS: usize = 1000;
/// Binary frames larger than this close the connection with 1009 (uvicorn's default).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Binary frames per second a connection may send on average (`HYPHA_WS_MSG_RATE_LIMIT`).
pub const RATE_LIMIT_PER_S: f64 = 200.0;
/// Binary frames a connection may send in a burst (`HYPHA_WS_MSG_BURST_LIMIT`).
pub const RATE_LIMIT_BURST: f64 = 2000.0;

const ANONYMOUS_EXPIRY_S: u64 = 600;
const TOKEN_DEFAULT_EXPIRY_S: u64 = 3600;
const GET_SERVICE_TIMEOUT_S: f64 = 10.0;
/// The manager's `method_timeout / 2`, sent as the full-promise `interval`.
const MANAGER_INTERVAL_S: f64 = 15.0;
const MAX_SERVICES_PER_CLIENT: usize = 1000;
const DECODE_FAILED: &str = "Failed to decode authentication information";

/// One WebSocket connection of the hub. Ids are never reused, not even across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// A WebSocket data message, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMessage {
    /// A text frame (JSON control messages).
    Text(String),
    /// A binary frame (msgpack RPC frames and events).
    Binary(Bytes),
}

/// Something the server does to one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubOutput {
    /// The server sends this message.
    Message(WsMessage),
    /// The server closes the connection. After this the hub ignores the connection. Code
    /// 1006 means the real server drops the socket without a close frame (a superseded
    /// connection); every other code is sent as a close frame.
    Close {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
}

/// How to build a [`Hub`].
#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    /// The server id; the manager id is `manager-<server_id>`.
    pub server_id: String,
    /// `public_base_url` (and `local_base_url`) in `connection_info` and `_rserver`.
    pub public_base_url: String,
    /// Answer calls to a recently disconnected peer with a `peer_not_found` event instead of
    /// the reject frame server 0.21.137 sends.
    pub send_peer_not_found: bool,
    /// Seed of the generator behind anonymous user names, minted user ids and session ids.
    pub seed: u64,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            server_id: "simulated-hub-00000000".into(),
            public_base_url: "http://127.0.0.1:9527".into(),
            send_peer_not_found: false,
            seed: 0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The rewrite of `main`, as a pure function.

/// What the server makes of one binary frame (PROTOCOL.md §3.3).
#[derive(Debug, Clone, PartialEq)]
pub struct Rewritten {
    /// `main` as the sender wrote it.
    pub original_main: Map,
    /// `main` after the rewrite: `to` qualified, `from` overwritten, `ws` and `user` set.
    pub main: Map,
    /// The qualified target: `ws/client`, `ws/*` (broadcast) or `*/manager-…`.
    pub target: String,
    /// The frame to deliver: the re-packed `main`, then the sender's remaining bytes unchanged.
    pub bytes: Bytes,
    /// Where the remainder (`extra`) starts in the sender's frame.
    pub extra_offset: usize,
}

/// Rewrites `frame` as the server does for a frame sent by `sender_ws/sender_client` whose
/// `UserInfo` is `user`: unpack `main`, qualify `to`, then set `ws`, `to`, `from`, `user` (keys
/// already present keep their position, new ones are appended in that order), re-pack `main`
/// the way Python msgpack does and append the rest of the frame untouched.
///
/// `ws` is the sender's workspace, except for a sender in workspace `*` (the manager), where it
/// is the target's workspace. Returns `None` when the server drops the frame: `main` is not a
/// msgpack map with only string keys, or has no string `to`.
pub fn rewrite_frame(frame: &Bytes, sender_ws: &str, sender_client: &str, user: &Value) -> Option<Rewritten> {
    let (value, used) = decode_value(frame, &Limits::default()).ok()?;
    let Value::Map(original_main) = value else { return None };
    let mut repacked = Value::Map(original_main.clone());
    if !python_repack(&mut repacked) {
        return None;
    }
    let Value::Map(mut main) = repacked else { return None };
    let to = main.get("to")?.as_str()?;
    let target = qualify_target(to, sender_ws);
    let ws = if sender_ws == "*" { workspace_of(&target).to_string() } else { sender_ws.to_string() };
    main.insert("ws", ws);
    main.insert("to", target.as_str());
    main.insert("from", format!("{sender_ws}/{sender_client}"));
    main.insert("user", user.clone());
    let mut out = Vec::with_capacity(frame.len() + 512);
    encode_value(&Value::Map(main.clone()), &mut out);
    out.extend_from_slice(&frame[used..]);
    Some(Rewritten { original_main, main, target, bytes: Bytes::from(out), extra_offset: used })
}

/// `"*"` → `<ws>/*`, bare `x` → `<ws>/x`, a qualified id unchanged.
fn qualify_target(to: &str, ws: &str) -> String {
    if to == "*" {
        format!("{ws}/*")
    } else if !to.contains('/') {
        format!("{ws}/{to}")
    } else {
        to.to_string()
    }
}

/// What Python's `unpackb` + `packb` does to a value: float32 becomes float64, a map with a
/// repeated key keeps the first position and the last value. `false` if a map key is not a
/// string (Python's `strict_map_key` refuses the frame).
fn python_repack(v: &mut Value) -> bool {
    match v {
        Value::F32(f) => {
            *v = Value::F64(f64::from(*f));
            true
        }
        Value::Array(a) => a.iter_mut().all(python_repack),
        Value::Map(m) => {
            let mut out = Map::with_capacity(m.len());
            for (k, val) in std::mem::take(m) {
                let Some(key) = k.as_str() else { return false };
                let mut val = val;
                if !python_repack(&mut val) {
                    return false;
                }
                out.insert(key, val);
            }
            *m = out;
            true
        }
        _ => true,
    }
}

fn workspace_of(id: &str) -> &str {
    id.split('/').next().unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// Users and permissions.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Perm {
    Read,
    ReadWrite,
    Admin,
}

impl Perm {
    fn code(self) -> &'static str {
        match self {
            Perm::Read => "r",
            Perm::ReadWrite => "rw",
            Perm::Admin => "a",
        }
    }
    /// `UserPermission[name]`, as `generate_token` reads `TokenConfig.permission`.
    fn from_name(name: &str) -> Option<Perm> {
        match name {
            "read" => Some(Perm::Read),
            "read_write" => Some(Perm::ReadWrite),
            "admin" => Some(Perm::Admin),
            _ => None,
        }
    }
}

/// The server's `UserInfo`, field for field.
#[derive(Debug, Clone, PartialEq)]
struct UserInfo {
    id: String,
    roles: Vec<String>,
    is_anonymous: bool,
    scope_workspace: Option<String>,
    /// `scope.workspaces`, in insertion order.
    workspaces: Vec<(String, Perm)>,
    scope_client: Option<String>,
    extra_scopes: Option<Vec<String>>,
    email: Option<String>,
    parent: Option<String>,
    expires_at: Option<f64>,
    current_workspace: Option<String>,
}

impl UserInfo {
    fn root() -> UserInfo {
        UserInfo {
            id: "root".into(),
            roles: vec!["admin".into()],
            is_anonymous: false,
            scope_workspace: Some("*".into()),
            workspaces: vec![("*".into(), Perm::Admin)],
            scope_client: None,
            extra_scopes: None,
            email: None,
            parent: None,
            expires_at: None,
            current_workspace: None,
        }
    }

    fn own_workspace(&self) -> String {
        format!("ws-user-{}", self.id)
    }

    /// Whether `ws` is this user's personal workspace (or its parent's, for minted users).
    fn owns(&self, ws: &str) -> bool {
        ws == self.own_workspace() || self.parent.as_deref().is_some_and(|p| ws == format!("ws-user-{p}"))
    }

    /// The stronger of the `*` and the `ws` grant.
    fn permission(&self, ws: &str) -> Option<Perm> {
        self.workspaces.iter().filter(|(w, _)| w == "*" || w == ws).map(|(_, p)| *p).max()
    }

    fn has(&self, ws: &str, min: Perm) -> bool {
        self.permission(ws).is_some_and(|p| p >= min)
    }

    fn set_permission(&mut self, ws: &str, perm: Perm) {
        match self.workspaces.iter_mut().find(|(w, _)| w == ws) {
            Some(entry) => entry.1 = perm,
            None => self.workspaces.push((ws.to_string(), perm)),
        }
    }

    /// `UserInfo.model_dump()`.
    fn to_value(&self) -> Value {
        let opt = |s: &Option<String>| s.clone().map_or(Value::Nil, Value::from);
        let workspaces: Map = self.workspaces.iter().map(|(w, p)| (w.as_str(), p.code())).collect();
        let extra_scopes = self.extra_scopes.as_ref().map_or(Value::Nil, |x| strings(x));
        let scope = obj([
            ("current_workspace", opt(&self.scope_workspace)),
            ("workspaces", workspaces.into()),
            ("client_id", opt(&self.scope_client)),
            ("extra_scopes", extra_scopes),
        ]);
        obj([
            ("id", self.id.as_str().into()),
            ("roles", strings(&self.roles)),
            ("is_anonymous", self.is_anonymous.into()),
            ("scope", scope.into()),
            ("email", opt(&self.email)),
            ("parent", opt(&self.parent)),
            ("expires_at", self.expires_at.map_or(Value::Nil, Value::F64)),
            ("current_workspace", opt(&self.current_workspace)),
        ])
        .into()
    }
}

/// What a minted token grants, kept by the hub instead of a JWT signature.
#[derive(Debug, Clone)]
struct TokenGrant {
    user: UserInfo,
    expires_us: u64,
}

// ---------------------------------------------------------------------------------------------
// Connections, services, pending manager calls.

#[derive(Debug)]
enum ConnState {
    AwaitingAuth,
    Open(Box<Client>),
    Closed,
}

#[derive(Debug)]
struct Conn {
    opened_us: u64,
    state: ConnState,
}

#[derive(Debug, Clone)]
struct Client {
    ws: String,
    client_id: String,
    full_id: String,
    user: UserInfo,
    user_value: Value,
    readonly: bool,
    subscriptions: BTreeSet<String>,
    last_seen_us: u64,
    bucket: f64,
    bucket_at_us: u64,
}

/// The caller of a manager method: the trusted fields of the delivered `main`.
#[derive(Debug, Clone)]
struct Caller {
    conn: ConnId,
    ws: String,
    full_id: String,
    user: UserInfo,
}

/// A registered service: the normalised `ServiceInfo.model_dump()`.
#[derive(Debug, Clone)]
struct StoredService {
    info: Map,
    visibility: String,
    stype: String,
    app_id: String,
}

impl StoredService {
    /// The server's Redis key: `services:<visibility>|<type>:<id>@<app_id>`.
    fn key(&self, id: &str) -> String {
        format!("services:{}|{}:{id}@{}", self.visibility, self.stype, self.app_id)
    }
    fn authorized_workspaces(&self) -> Vec<String> {
        let cfg = self.info.get("config").and_then(Value::as_map);
        let list = cfg.and_then(|c| c.get("authorized_workspaces")).and_then(Value::as_array).unwrap_or(&[]);
        list.iter().filter_map(Value::as_str).map(String::from).collect()
    }
}

/// Where and how the manager answers one incoming call.
#[derive(Debug, Clone)]
struct Reply {
    resolve: (String, String),
    reject: (String, String),
    heartbeat: Option<(String, String)>,
    interval_s: f64,
    parent: Option<String>,
}

/// A `get_service` the manager forwarded to a provider's `built-in.get_service`.
#[derive(Debug, Clone)]
struct PendingGet {
    requester: ConnId,
    reply: Option<Reply>,
    service_id: String,
    provider: String,
    deadline_us: u64,
    timeout_s: f64,
    next_heartbeat_us: Option<u64>,
}

/// A manager method failure, sent as a reject.
#[derive(Debug, Clone, PartialEq)]
struct MgrError {
    rvalue: String,
    rtrace: String,
}

impl MgrError {
    /// An exception raised inside an async manager method: `_rvalue` is the traceback text.
    fn raised(kind: &str, msg: impl std::fmt::Display) -> MgrError {
        let rvalue =
            format!("Traceback (most recent call last):\n  File \"<simulated hub>\"\n{kind}: {msg}\n");
        let rtrace = format!("Exception: {rvalue}\n");
        MgrError { rvalue, rtrace }
    }
    /// A dispatch failure detected before any handler ran.
    fn dispatch(msg: String) -> MgrError {
        MgrError { rtrace: format!("Exception: {msg}\n"), rvalue: msg }
    }
    fn to_value(&self) -> Value {
        obj([
            ("_rtype", "error".into()),
            ("_rvalue", self.rvalue.as_str().into()),
            ("_rtrace", self.rtrace.as_str().into()),
        ])
        .into()
    }
}

enum Outcome {
    Done(Value),
    Fail(MgrError),
    Pending,
}

/// A handshake failure: the close code and reason (the error text always goes first).
struct Refusal {
    code: u16,
    reason: String,
}

impl Refusal {
    fn auth(detail: impl std::fmt::Display) -> Refusal {
        Refusal { code: 1008, reason: format!("Authentication error: {detail}") }
    }
    fn setup(detail: impl std::fmt::Display) -> Refusal {
        Refusal { code: 1001, reason: format!("Failed to establish connection: {detail}") }
    }
}

// ---------------------------------------------------------------------------------------------
// The hub.

/// The simulated Hypha server. See the module documentation for what it models.
#[derive(Debug)]
pub struct Hub {
    config: HubConfig,
    server_id: String,
    rng: Rng,
    next_conn: u64,
    conns: BTreeMap<ConnId, Conn>,
    /// `ws/client` → its current connection.
    clients: BTreeMap<String, ConnId>,
    /// `ws/client` → when it disconnected.
    recently_disconnected: BTreeMap<String, u64>,
    /// Full service id (`ws/client:svc`) → its stored info.
    services: BTreeMap<String, StoredService>,
    /// Manager session id → the forwarded `get_service` waiting for the provider.
    pending: BTreeMap<String, PendingGet>,
    /// Minted token → what it grants. Survives restarts.
    tokens: BTreeMap<String, TokenGrant>,
    outputs: VecDeque<(ConnId, HubOutput)>,
    frames_routed: u64,
    dropped_registrations: u64,
    limits: Limits,
}

impl Hub {
    /// A hub with no connections, serving manager `manager-<config.server_id>`.
    pub fn new(config: HubConfig) -> Hub {
        Hub {
            server_id: config.server_id.clone(),
            rng: Rng::new(config.seed),
            config,
            next_conn: 1,
            conns: BTreeMap::new(),
            clients: BTreeMap::new(),
            recently_disconnected: BTreeMap::new(),
            services: BTreeMap::new(),
            pending: BTreeMap::new(),
            tokens: BTreeMap::new(),
            outputs: VecDeque::new(),
            frames_routed: 0,
            dropped_registrations: 0,
            limits: Limits::default(),
        }
    }

    /// A WebSocket was opened at `/ws`; the hub now waits for its authentication text frame.
    pub fn open(&mut self, now_us: u64) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        self.conns.insert(id, Conn { opened_us: now_us, state: ConnState::AwaitingAuth });
        id
    }

    /// A data message arrived on `conn`. Messages on unknown or closed connections are ignored.
    pub fn handle_message(&mut self, now_us: u64, conn: ConnId, msg: WsMessage) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        match &mut c.state {
            ConnState::Closed => {}
            ConnState::AwaitingAuth => match msg {
                WsMessage::Text(text) => self.handshake(now_us, conn, &text),
                // The real server's `receive_text` fails and the socket drops (the client sees
                // 1006); the hub closes with 1003 instead, without error text.
                WsMessage::Binary(_) => self.server_close(now_us, conn, 1003, DECODE_FAILED, false),
            },
            ConnState::Open(client) => {
                client.last_seen_us = now_us;
                match msg {
                    WsMessage::Text(text) => self.control_text(now_us, conn, &text),
                    WsMessage::Binary(bytes) => {
                        if bytes.len() > MAX_FRAME_BYTES {
                            return self.server_close(now_us, conn, 1009, "Message too big", false);
                        }
                        let elapsed_s = now_us.saturating_sub(client.bucket_at_us) as f64 / 1e6;
                        client.bucket = (client.bucket + elapsed_s * RATE_LIMIT_PER_S).min(RATE_LIMIT_BURST);
                        client.bucket_at_us = now_us;
                        if client.bucket < 1.0 {
                            let reason = "Rate limit exceeded: too many messages per second";
                            return self.server_close(now_us, conn, 1008, reason, true);
                        }
                        client.bucket -= 1.0;
                        self.route_from_client(now_us, conn, &bytes);
                    }
                }
            }
        }
    }

    /// The client closed `conn`, or the link dropped. The hub removes the client's services,
    /// remembers it as recently disconnected, fails manager calls waiting on it and broadcasts
    /// `client_disconnected`. Nothing is sent back on `conn` itself.
    pub fn handle_close(&mut self, now_us: u64, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if let ConnState::Open(client) = std::mem::replace(&mut c.state, ConnState::Closed) {
            self.client_gone(now_us, conn, &client);
        }
    }

    /// The next thing the server sends, in the order it was produced.
    pub fn poll_output(&mut self) -> Option<(ConnId, HubOutput)> {
        self.outputs.pop_front()
    }

    /// Fires every timer due at `now_us`: the 5 s authentication timeout (close 1008), the
    /// 600 s idle timeout (close 1001), and the manager's `get_service` heartbeats and timeout.
    pub fn tick(&mut self, now_us: u64) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get(&id) else { continue };
            match &c.state {
                ConnState::AwaitingAuth if now_us.saturating_sub(c.opened_us) >= AUTH_TIMEOUT_US => {
                    self.server_close(now_us, id, 1008, "Authentication payload timeout", true);
                }
                ConnState::Open(client) if now_us.saturating_sub(client.last_seen_us) >= IDLE_TIMEOUT_US => {
                    let reason = format!("Idle timeout ({}s)", IDLE_TIMEOUT_US / 1_000_000);
                    self.server_close(now_us, id, 1001, &reason, true);
                }
                _ => {}
            }
        }
        let sessions: Vec<String> = self.pending.keys().cloned().collect();
        for session in sessions {
            let Some(p) = self.pending.get(&session).cloned() else { continue };
            if now_us >= p.deadline_us {
                self.pending.remove(&session);
                let err = MgrError::raised(
                    "TimeoutError",
                    format!("Failed to get remote service: {} (timeout: {}s)", p.service_id, p.timeout_s),
                );
                self.settle(p.reply.as_ref(), Err(err));
                continue;
            }
            if let (Some(due), Some(reply)) = (p.next_heartbeat_us, &p.reply) {
                if now_us >= due {
                    self.manager_heartbeat(reply);
                    let next = due + secs_to_us(reply.interval_s).max(1);
                    if let Some(entry) = self.pending.get_mut(&session) {
                        entry.next_heartbeat_us = Some(next.max(now_us + 1));
                    }
                }
            }
        }
    }

    /// The earliest time at which [`Hub::tick`] has something to do, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        let conns = self.conns.values().filter_map(|c| match &c.state {
            ConnState::AwaitingAuth => Some(c.opened_us + AUTH_TIMEOUT_US),
            ConnState::Open(client) => Some(client.last_seen_us + IDLE_TIMEOUT_US),
            ConnState::Closed => None,
        });
        let pending =
            self.pending.values().flat_map(|p| [Some(p.deadline_us), p.next_heartbeat_us]).flatten();
        conns.chain(pending).min()
    }

    /// The server restarts: every connection gets `{"type":"error"}` text (authenticated ones)
    /// and `Close{1001, "Server is stopping"}`; connections, services, subscriptions and
    /// pending calls are lost, and the manager id becomes `manager-<new_server_id>`. Minted
    /// tokens stay valid, as JWTs do.
    pub fn restart(&mut self, new_server_id: &str) {
        for (id, conn) in self.conns.iter_mut() {
            match std::mem::replace(&mut conn.state, ConnState::Closed) {
                ConnState::Open(_) => {
                    let text = error_text("Server is stopping");
                    self.outputs.push_back((*id, HubOutput::Message(WsMessage::Text(text))));
                    self.outputs.push_back((*id, close(1001, "Server is stopping")));
                }
                ConnState::AwaitingAuth => self.outputs.push_back((*id, close(1001, "Server is stopping"))),
                ConnState::Closed => {}
            }
        }
        self.clients.clear();
        self.recently_disconnected.clear();
        self.services.clear();
        self.pending.clear();
        self.server_id = new_server_id.to_string();
    }

    /// `manager-<server_id>`; the manager's address is `*/` followed by this.
    pub fn manager_id(&self) -> String {
        format!("manager-{}", self.server_id)
    }

    /// The current server id.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// The configuration the hub was built with.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// Full ids (`ws/client:svc`) of the registered services, sorted.
    pub fn services(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// The stored service info (`ServiceInfo.model_dump()`) of `id` (`ws/client:svc`).
    pub fn service_info(&self, id: &str) -> Option<Value> {
        self.services.get(id).map(|s| Value::Map(s.info.clone()))
    }

    /// `ws/client` of an authenticated, still open connection.
    pub fn connection_client(&self, conn: ConnId) -> Option<String> {
        match &self.conns.get(&conn)?.state {
            ConnState::Open(client) => Some(client.full_id.clone()),
            _ => None,
        }
    }

    /// The `UserInfo` the server puts in `user` for frames from `conn`.
    pub fn connection_user(&self, conn: ConnId) -> Option<Value> {
        match &self.conns.get(&conn)?.state {
            ConnState::Open(client) => Some(client.user_value.clone()),
            _ => None,
        }
    }

    /// The event types `conn` subscribed to, sorted.
    pub fn subscriptions(&self, conn: ConnId) -> Vec<String> {
        match self.conns.get(&conn).map(|c| &c.state) {
            Some(ConnState::Open(client)) => client.subscriptions.iter().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Whether `conn` is open (authenticated or still waiting for its first frame).
    pub fn is_open(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| !matches!(c.state, ConnState::Closed))
    }

    /// Open connections, in id order.
    pub fn open_connections(&self) -> Vec<ConnId> {
        self.conns.iter().filter(|(_, c)| !matches!(c.state, ConnState::Closed)).map(|(id, _)| *id).collect()
    }

    /// Binary frames from clients that were delivered: to a client, to the manager, or as a
    /// workspace broadcast (counted once). Dropped and rejected frames, and frames the manager
    /// or the server itself sends, are not counted. Not reset by [`Hub::restart`].
    pub fn frames_routed(&self) -> u64 {
        self.frames_routed
    }

    /// `register_service` calls the manager resolved with nil but did not store, because the
    /// caller's `built-in` was not registered yet (the server drops them silently too).
    pub fn dropped_registrations(&self) -> u64 {
        self.dropped_registrations
    }

    // -----------------------------------------------------------------------------------------
    // Output helpers.

    fn push(&mut self, conn: ConnId, out: HubOutput) {
        self.outputs.push_back((conn, out));
    }

    fn push_text(&mut self, conn: ConnId, text: String) {
        self.push(conn, HubOutput::Message(WsMessage::Text(text)));
    }

    fn push_binary(&mut self, conn: ConnId, bytes: Bytes) {
        self.push(conn, HubOutput::Message(WsMessage::Binary(bytes)));
    }

    /// The server closes `conn`, with the `{"type":"error"}` text first when `error_text_first`.
    /// An authenticated client is then cleaned up as on any disconnection.
    fn server_close(&mut self, now_us: u64, conn: ConnId, code: u16, reason: &str, error_text_first: bool) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let prev = std::mem::replace(&mut c.state, ConnState::Closed);
        if matches!(prev, ConnState::Closed) {
            return;
        }
        if error_text_first {
            self.push_text(conn, error_text(reason));
        }
        self.push(conn, close(code, reason));
        if let ConnState::Open(client) = prev {
            self.client_gone(now_us, conn, &client);
        }
    }

    fn open_client(&self, conn: ConnId) -> Option<&Client> {
        match &self.conns.get(&conn)?.state {
            ConnState::Open(client) => Some(client),
            _ => None,
        }
    }

    fn open_client_mut(&mut self, conn: ConnId) -> Option<&mut Client> {
        match &mut self.conns.get_mut(&conn)?.state {
            ConnState::Open(client) => Some(client),
            _ => None,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Handshake (PROTOCOL.md §2.2–2.4).

    fn handshake(&mut self, now_us: u64, conn: ConnId, text: &str) {
        let parsed: Result<Json, _> = serde_json::from_str(text);
        // A JSON value that is not an object makes the real server crash on `.get`; the hub
        // treats it like undecodable JSON.
        let Some(auth) = parsed.ok().and_then(|j| j.as_object().cloned()) else {
            return self.server_close(now_us, conn, 1003, DECODE_FAILED, true);
        };
        match self.authenticate(now_us, &auth) {
            Err(refusal) => self.server_close(now_us, conn, refusal.code, &refusal.reason, true),
            Ok((user, ws, client_id, reconnecting)) => {
                self.accept(now_us, conn, user, ws, client_id, reconnecting)
            }
        }
    }

    /// Authenticates the first frame: the user, workspace and client id, or why not.
    fn authenticate(
        &mut self,
        now_us: u64,
        auth: &serde_json::Map<String, Json>,
    ) -> Result<(UserInfo, String, String, bool), Refusal> {
        let field = |key: &str| -> Result<Option<String>, String> {
            match auth.get(key) {
                None | Some(Json::Null) => Ok(None),
                Some(Json::String(s)) if s.is_empty() => Ok(None),
                Some(Json::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(format!("invalid {key}: {other}")),
            }
        };
        let token = field("token").map_err(Refusal::auth)?;
        let reconnection_token = field("reconnection_token").map_err(Refusal::auth)?;
        let workspace = field("workspace").map_err(Refusal::setup)?;
        let client_id = field("client_id").map_err(|_| Refusal::setup("Invalid client id"))?;
        let reconnecting = reconnection_token.is_some();

        let (mut user, ws) = if let Some(rt) = reconnection_token {
            self.reconnection_user(now_us, &rt, client_id.as_deref(), workspace)?
        } else if let Some(t) = token {
            self.token_user(now_us, &t, client_id.as_deref(), workspace)?
        } else {
            self.anonymous_user(now_us, client_id.as_deref(), workspace)
        };

        // update_user_scope: grant admin on the personal workspace, record the current one.
        let mut perm = user.permission(&ws);
        if perm.is_none() && user.owns(&ws) {
            perm = Some(Perm::Admin);
        }
        if let Some(p) = perm {
            user.set_permission(&ws, p);
        }
        if user.roles.iter().any(|r| r == "admin") {
            user.set_permission("*", Perm::Admin);
        }
        user.scope_workspace = Some(ws.clone());
        user.scope_client = client_id.clone();
        if !user.has(&ws, Perm::Read) {
            return Err(Refusal::setup(format!("Permission denied for workspace: {ws}")));
        }
        let Some(client_id) = client_id else {
            return Err(Refusal::setup(format!("Failed to authenticate user to workspace: {ws}")));
        };
        if client_id.contains('/') {
            return Err(Refusal::setup(format!("Invalid client id: {client_id}")));
        }
        let full_id = format!("{ws}/{client_id}");
        // The real server pings the old client's built-in and refuses only if it answers;
        // the hub refuses whenever the id is connected.
        if !reconnecting && self.clients.contains_key(&full_id) {
            return Err(Refusal::setup(format!("Client already exists and is active: {full_id}")));
        }
        Ok((user, ws, client_id, reconnecting))
    }

    fn anonymous_user(
        &mut self,
        now_us: u64,
        client_id: Option<&str>,
        workspace: Option<String>,
    ) -> (UserInfo, String) {
        let id = format!("anonymouz-{}", self.rng.readable_id());
        let own = format!("ws-user-{id}");
        let ws = workspace.unwrap_or_else(|| own.clone());
        let user = UserInfo {
            id,
            roles: vec!["anonymous".into()],
            is_anonymous: true,
            scope_workspace: Some(ws.clone()),
            workspaces: vec![(own, Perm::Admin)],
            scope_client: client_id.map(String::from),
            extra_scopes: None,
            email: None,
            parent: None,
            expires_at: Some((now_us / 1_000_000 + ANONYMOUS_EXPIRY_S) as f64),
            current_workspace: None,
        };
        (user, ws)
    }

    fn token_user(
        &self,
        now_us: u64,
        token: &str,
        client_id: Option<&str>,
        workspace: Option<String>,
    ) -> Result<(UserInfo, String), Refusal> {
        let grant = self.lookup_token(now_us, token).map_err(Refusal::auth)?;
        let mut user = grant.user;
        if let Some(cid) = &user.scope_client {
            if Some(cid.as_str()) != client_id {
                return Err(Refusal::setup(format!(
                    "Failed to authenticate user: Client id mismatch: this token is restricted to client with client_id='{cid}'"
                )));
            }
        }
        if let (Some(tws), Some(ws)) = (&user.scope_workspace, &workspace) {
            if tws != ws {
                return Err(Refusal::setup(format!(
                    "Failed to authenticate user: Current workspace encoded in the token ({tws}) does not match the specified workspace ({ws})"
                )));
            }
        }
        let own = user.own_workspace();
        user.set_permission(&own, Perm::Admin);
        let ws = workspace.or_else(|| user.scope_workspace.clone()).unwrap_or(own);
        user.expires_at = (grant.expires_us != u64::MAX).then_some((grant.expires_us / 1_000_000) as f64);
        user.current_workspace = Some(ws.clone());
        Ok((user, ws))
    }

    fn reconnection_user(
        &self,
        now_us: u64,
        token: &str,
        client_id: Option<&str>,
        workspace: Option<String>,
    ) -> Result<(UserInfo, String), Refusal> {
        let fail = |m: String| Refusal::setup(format!("Failed to authenticate user: {m}"));
        let grant = self.lookup_token(now_us, token).map_err(Refusal::auth)?;
        let mut user = grant.user;
        let Some(scope_ws) = user.scope_workspace.clone() else {
            return Err(fail("Invalid scope, current_workspace is required".into()));
        };
        if let Some(ws) = &workspace {
            if *ws != scope_ws {
                return Err(fail(format!("Invalid scope, workspace mismatch: {ws} != {scope_ws}")));
            }
        }
        let Some(cid) = user.scope_client.clone() else {
            return Err(fail("Invalid scope, client_id is required".into()));
        };
        if !user.has(&scope_ws, Perm::Read) {
            return Err(fail(format!("Permission denied for workspace: {scope_ws}")));
        }
        if Some(cid.as_str()) != client_id {
            return Err(fail("Client id mismatch, disconnecting".into()));
        }
        user.expires_at = Some((grant.expires_us / 1_000_000) as f64);
        user.current_workspace = Some(scope_ws.clone());
        Ok((user, scope_ws))
    }

    /// A minted token's grant, or the implicit grant of a hand-written `hubtoken:<ws>:<user>`.
    fn lookup_token(&self, now_us: u64, token: &str) -> Result<TokenGrant, String> {
        if let Some(grant) = self.tokens.get(token) {
            if now_us > grant.expires_us {
                return Err("The token has expired. Please fetch a new one".into());
            }
            return Ok(grant.clone());
        }
        let parts: Vec<&str> =
            token.strip_prefix("hubtoken:").map(|r| r.split(':').collect()).unwrap_or_default();
        match parts.as_slice() {
            [ws, id] if !ws.is_empty() && !id.is_empty() && !ws.contains('/') && !id.contains('/') => {
                let user = UserInfo {
                    id: id.to_string(),
                    roles: Vec::new(),
                    is_anonymous: false,
                    scope_workspace: Some(ws.to_string()),
                    workspaces: vec![(ws.to_string(), Perm::ReadWrite)],
                    scope_client: None,
                    extra_scopes: Some(Vec::new()),
                    email: None,
                    parent: None,
                    expires_at: None,
                    current_workspace: None,
                };
                Ok(TokenGrant { user, expires_us: u64::MAX })
            }
            _ => Err("Invalid token".into()),
        }
    }

    fn mint_reconnection_token(&mut self, now_us: u64, client: &Client) -> String {
        let token = format!("hubreconnect:{}:{}", client.full_id, client.user.id);
        let expires_us = now_us + RECONNECTION_TOKEN_LIFE_S * 1_000_000;
        self.tokens.insert(token.clone(), TokenGrant { user: client.user.clone(), expires_us });
        token
    }

    fn accept(
        &mut self,
        now_us: u64,
        conn: ConnId,
        user: UserInfo,
        ws: String,
        client_id: String,
        reconnecting: bool,
    ) {
        let full_id = format!("{ws}/{client_id}");
        // A reconnection supersedes a connection that is still open under the same id: the
        // real server cancels its handler and the socket drops without a close frame.
        if let Some(old) = self.clients.get(&full_id).copied() {
            if old != conn && reconnecting {
                if let Some(c) = self.conns.get_mut(&old) {
                    c.state = ConnState::Closed;
                }
                self.push(old, close(1006, &format!("Old connection for {full_id} superseded")));
            }
        }
        let client = Client {
            readonly: user.permission(&ws) == Some(Perm::Read),
            user_value: user.to_value(),
            ws: ws.clone(),
            client_id: client_id.clone(),
            full_id: full_id.clone(),
            user,
            subscriptions: BTreeSet::new(),
            last_seen_us: now_us,
            bucket: RATE_LIMIT_BURST,
            bucket_at_us: now_us,
        };
        let token = self.mint_reconnection_token(now_us, &client);
        let mut info = serde_json::Map::new();
        info.insert("type".into(), "connection_info".into());
        info.insert("hypha_version".into(), HYPHA_VERSION.into());
        info.insert("public_base_url".into(), self.config.public_base_url.clone().into());
        info.insert("local_base_url".into(), self.config.public_base_url.clone().into());
        info.insert("manager_id".into(), self.manager_id().into());
        info.insert("workspace".into(), ws.into());
        info.insert("client_id".into(), client_id.into());
        info.insert("user".into(), to_json(&client.user_value));
        info.insert("reconnection_token".into(), token.into());
        info.insert("reconnection_token_life_time".into(), (RECONNECTION_TOKEN_LIFE_S as f64).into());
        self.push_text(conn, py_json(&Json::Object(info)));
        self.recently_disconnected.remove(&full_id);
        self.clients.insert(full_id, conn);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = ConnState::Open(Box::new(client));
        }
    }

    // -----------------------------------------------------------------------------------------
    // Text control frames (PROTOCOL.md §2.5).

    fn control_text(&mut self, now_us: u64, conn: ConnId, text: &str) {
        if text.chars().count() > MAX_TEXT_CHARS {
            return;
        }
        let Ok(json) = serde_json::from_str::<Json>(text) else { return };
        let Some(client) = self.open_client(conn).cloned() else { return };
        let Some(obj) = json.as_object() else {
            // `data.get("type")` raises on a non-object; the handler dies and the server
            // cleans up as for a disconnection, closing with 1001.
            let reason = format!("Client {} disconnected", client.full_id);
            return self.server_close(now_us, conn, 1001, &reason, true);
        };
        match obj.get("type").and_then(Json::as_str) {
            Some("ping") => self.push_text(conn, r#"{"type": "pong"}"#.into()),
            Some("refresh_token") => {
                let token = self.mint_reconnection_token(now_us, &client);
                let mut m = serde_json::Map::new();
                m.insert("type".into(), "reconnection_token".into());
                m.insert("reconnection_token".into(), token.into());
                self.push_text(conn, py_json(&Json::Object(m)));
            }
            _ => {}
        }
    }

    // -----------------------------------------------------------------------------------------
    // Binary routing (PROTOCOL.md §3.3, §3.4).

    fn route_from_client(&mut self, now_us: u64, conn: ConnId, frame: &Bytes) {
        let Some(client) = self.open_client(conn) else { return };
        let (ws, client_id, user, readonly) =
            (client.ws.clone(), client.client_id.clone(), client.user_value.clone(), client.readonly);
        let Some(rw) = rewrite_frame(frame, &ws, &client_id, &user) else { return };
        if readonly && rw.original_main.get("to").and_then(Value::as_str) == Some("*") {
            let msg = format!(
                "Read-only client {ws}/{client_id} cannot broadcast messages. Only point-to-point messages are allowed for read-only clients."
            );
            return self.server_reject(conn, &rw.original_main, &rw.target, &msg);
        }
        let manager = format!("*/{}", self.manager_id());
        if rw.target == manager {
            self.frames_routed += 1;
            let extra = frame.slice(rw.extra_offset..);
            self.manager_receive(now_us, conn, &rw.main, &extra);
        } else if let Some(bws) = rw.target.strip_suffix("/*") {
            self.frames_routed += 1;
            let kind = rw.main.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
            let bws = bws.to_string();
            for id in self.subscribers(&bws, &kind) {
                self.push_binary(id, rw.bytes.clone());
            }
        } else if let Some(&target_conn) = self.clients.get(&rw.target) {
            self.frames_routed += 1;
            self.push_binary(target_conn, rw.bytes);
        } else if !rw.target.contains('*')
            && rw.target.contains('/')
            && self.is_recently_disconnected(now_us, &rw.target)
        {
            let msg = format!("Target peer {} is not connected", rw.target);
            self.server_reject(conn, &rw.original_main, &rw.target, &msg);
        }
        // Anything else goes to an event-bus channel nobody listens to: dropped silently.
    }

    fn is_recently_disconnected(&mut self, now_us: u64, id: &str) -> bool {
        match self.recently_disconnected.get(id) {
            Some(&at) if now_us.saturating_sub(at) <= RECENT_DISCONNECT_TTL_US => true,
            Some(_) => {
                self.recently_disconnected.remove(id);
                false
            }
            None => false,
        }
    }

    /// The server's own answer to a frame it could not route, sent only when `main` has a
    /// `session`: a reject frame with no `parent`/`ws`/`user`, or `peer_not_found` if configured.
    fn server_reject(&mut self, conn: ConnId, original: &Map, target: &str, msg: &str) {
        let Some(session) = original.get("session").and_then(Value::as_str).filter(|s| !s.is_empty()) else {
            return;
        };
        let bytes = if self.config.send_peer_not_found {
            let event = obj([
                ("type", "peer_not_found".into()),
                ("session", session.into()),
                ("peer_id", target.into()),
                ("error", msg.into()),
            ]);
            Bytes::from(hypha_rpc_core::codec::to_vec(&Value::Map(event)))
        } else {
            let or_empty = |k: &str| original.get(k).cloned().unwrap_or_else(|| "".into());
            let main = obj([
                ("type", "method".into()),
                ("from", or_empty("to")),
                ("to", or_empty("from")),
                ("method", format!("{session}.reject").into()),
            ]);
            let err = obj([("_rtype", "error".into()), ("_rvalue", msg.into()), ("_rtrace", "".into())]);
            let extra = obj([("args", Value::Array(vec![err.into()]))]);
            encode_pair(&main, Some(&extra))
        };
        self.push_binary(conn, bytes);
    }

    /// Open connections in `ws` subscribed to `event`, in id order.
    fn subscribers(&self, ws: &str, event: &str) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter_map(|(id, c)| match &c.state {
                ConnState::Open(client) if client.ws == ws && client.subscriptions.contains(event) => {
                    Some(*id)
                }
                _ => None,
            })
            .collect()
    }

    /// A server event (`{"type", "to": "*", "data"}`, one msgpack object) to the subscribers.
    fn broadcast_event(&mut self, ws: &str, event: &str, data: Value) {
        let msg = obj([("type", event.into()), ("to", "*".into()), ("data", data)]);
        let bytes = Bytes::from(hypha_rpc_core::codec::to_vec(&Value::Map(msg)));
        for id in self.subscribers(ws, event) {
            self.push_binary(id, bytes.clone());
        }
    }

    // -----------------------------------------------------------------------------------------
    // Disconnection (PROTOCOL.md §2.6, §10.4).

    fn client_gone(&mut self, now_us: u64, conn: ConnId, client: &Client) {
        // A newer connection took this id over: leave its state alone.
        if self.clients.get(&client.full_id) != Some(&conn) {
            return;
        }
        self.clients.remove(&client.full_id);
        self.recently_disconnected.insert(client.full_id.clone(), now_us);
        let prefix = format!("{}:", client.full_id);
        self.services.retain(|id, _| !id.starts_with(&prefix));
        let sessions: Vec<String> = self.pending.keys().cloned().collect();
        for session in sessions {
            let Some(p) = self.pending.get(&session) else { continue };
            if p.requester == conn {
                self.pending.remove(&session);
            } else if p.provider == client.full_id {
                let p = self.pending.remove(&session).expect("present");
                let err = MgrError::raised("Exception", format!("Client disconnected: {}", client.full_id));
                self.settle(p.reply.as_ref(), Err(err));
            }
        }
        let data = obj([("id", client.client_id.as_str().into()), ("workspace", client.ws.as_str().into())]);
        self.broadcast_event(&client.ws, "client_disconnected", data.into());
    }

    // -----------------------------------------------------------------------------------------
    // The workspace manager (PROTOCOL.md §10).

    fn caller(&self, conn: ConnId) -> Option<Caller> {
        let c = self.open_client(conn)?;
        Some(Caller { conn, ws: c.ws.clone(), full_id: c.full_id.clone(), user: c.user.clone() })
    }

    fn manager_receive(&mut self, now_us: u64, conn: ConnId, main: &Map, extra_bytes: &Bytes) {
        let extra = if extra_bytes.is_empty() {
            Map::new()
        } else {
            match decode_value_slice(extra_bytes, &self.limits) {
                Ok((Value::Map(m), _)) => m,
                _ => return,
            }
        };
        let (Some(method), Some(from)) =
            (main.get("method").and_then(Value::as_str), main.get("from").and_then(Value::as_str))
        else {
            return;
        };
        let session = main.get("session").and_then(Value::as_str).filter(|s| !s.is_empty());
        let Some(path) = method.strip_prefix("services.") else {
            return self.manager_callback(method, from, &extra);
        };
        let Ok(reply) = parse_promise(extra.get("promise"), extra.get("t"), from, session) else { return };
        let Some(caller) = self.caller(conn) else { return };
        let no_args = Vec::new();
        let args = extra.get("args").and_then(Value::as_array).unwrap_or(&no_args);
        let with_kwargs = extra.get("with_kwargs").and_then(Value::as_bool) == Some(true);
        let outcome = match (path, path.strip_prefix("default.").and_then(method_spec)) {
            ("built-in.get_service", _) => match args.first().and_then(Value::as_str) {
                Some("default") => Outcome::Done(self.manager_service()),
                other => Outcome::Fail(MgrError::raised(
                    "KeyError",
                    format!("Service not found: {}", other.unwrap_or_default()),
                )),
            },
            ("built-in.ping", _) => Outcome::Done("pong".into()),
            (_, Some(spec)) => {
                if let Some(r) = &reply {
                    self.manager_heartbeat(r);
                }
                match bind(spec, args, with_kwargs) {
                    Ok(bound) => self.call_manager_method(now_us, &caller, spec.key, bound, reply.clone()),
                    Err(e) => Outcome::Fail(e),
                }
            }
            _ => Outcome::Fail(MgrError::dispatch(format!("Method expired or not found: {from}:{method}"))),
        };
        match outcome {
            Outcome::Done(v) => self.settle(reply.as_ref(), Ok(v)),
            Outcome::Fail(e) => self.settle(reply.as_ref(), Err(e)),
            Outcome::Pending => {}
        }
    }

    /// A call on one of the manager's own sessions: a provider answering a forwarded
    /// `built-in.get_service`. Only the provider the session was created for may call it;
    /// heartbeats do not extend the manager's timeout.
    fn manager_callback(&mut self, method: &str, from: &str, extra: &Map) {
        let Some((session, slot)) = method.split_once('.') else { return };
        if slot != "resolve" && slot != "reject" {
            return;
        }
        if self.pending.get(session).map(|p| p.provider.as_str()) != Some(from) {
            return;
        }
        let Some(p) = self.pending.remove(session) else { return };
        let arg =
            extra.get("args").and_then(Value::as_array).and_then(|a| a.first()).cloned().unwrap_or_default();
        let result = if slot == "resolve" {
            self.finish_get_service(&p, arg)
        } else {
            let msg = match &arg {
                Value::Map(m) => m.get("_rvalue").and_then(Value::as_str).unwrap_or_default().to_string(),
                other => format!("{other:?}"),
            };
            Err(MgrError::raised("Exception", format!("RemoteError:{msg}")))
        };
        self.settle(p.reply.as_ref(), result);
    }

    /// The provider's encoded service, as the manager forwards it (get_service #3 → #4): bare
    /// `_rtarget`s qualified, `id` set to the full id, `config.workspace` and `config.url` added.
    fn finish_get_service(&self, p: &PendingGet, value: Value) -> Result<Value, MgrError> {
        let Value::Map(mut svc) = value else {
            let msg = format!("'{}' object does not support item assignment", value.kind());
            return Err(MgrError::raised("TypeError", msg));
        };
        let provider_ws = workspace_of(&p.provider).to_string();
        for (_, v) in svc.iter_mut() {
            qualify_descriptors(v, &provider_ws);
        }
        svc.insert("id", p.service_id.as_str());
        let ws = workspace_of(&p.service_id).to_string();
        let local = p.service_id.split('/').next_back().unwrap_or_default();
        let url = format!("{}/{ws}/services/{local}", self.config.public_base_url);
        match svc.get_mut("config") {
            Some(Value::Map(cfg)) => {
                cfg.insert("workspace", ws);
                cfg.insert("url", url);
            }
            Some(_) => {
                return Err(MgrError::raised("TypeError", "'config' does not support item assignment"));
            }
            None => return Err(MgrError::raised("KeyError", "'config'")),
        }
        Ok(Value::Map(svc))
    }

    /// Sends the resolve or reject of a manager call, if the caller asked for one.
    fn settle(&mut self, reply: Option<&Reply>, result: Result<Value, MgrError>) {
        let Some(r) = reply else { return };
        let ((to, method), value) = match result {
            Ok(v) => (&r.resolve, v),
            Err(e) => (&r.reject, e.to_value()),
        };
        let extra = obj([("args", Value::Array(vec![value]))]);
        let bytes = self.manager_frame(to, method, r.parent.as_deref(), None, Some(&extra));
        self.manager_deliver(to, bytes);
    }

    fn manager_heartbeat(&mut self, r: &Reply) {
        if let Some((to, method)) = &r.heartbeat {
            let bytes = self.manager_frame(to, method, r.parent.as_deref(), None, None);
            self.manager_deliver(to, bytes);
        }
    }

    /// A frame the manager sends, already in its delivered form (`ws` = target's workspace,
    /// `user` = root).
    fn manager_frame(
        &self,
        to: &str,
        method: &str,
        parent: Option<&str>,
        session: Option<&str>,
        extra: Option<&Map>,
    ) -> Bytes {
        let mut main = obj([
            ("type", "method".into()),
            ("from", format!("*/{}", self.manager_id()).into()),
            ("to", to.into()),
            ("method", method.into()),
        ]);
        if let Some(p) = parent {
            main.push("parent", p);
        }
        if let Some(s) = session {
            main.push("session", s);
        }
        main.push("ws", workspace_of(to));
        main.push("user", UserInfo::root().to_value());
        encode_pair(&main, extra)
    }

    fn manager_deliver(&mut self, to: &str, bytes: Bytes) -> bool {
        match self.clients.get(to).copied() {
            Some(conn) => {
                self.push_binary(conn, bytes);
                true
            }
            None => false,
        }
    }

    /// The manager's `default` service as `built-in.get_service("default")` returns it.
    fn manager_service(&self) -> Value {
        let base = &self.config.public_base_url;
        let config = obj([
            ("require_context", true.into()),
            ("visibility", "public".into()),
            ("server_id", self.server_id.as_str().into()),
            ("hypha_version", HYPHA_VERSION.into()),
            ("public_base_url", base.as_str().into()),
            ("local_base_url", base.as_str().into()),
            ("auth0_client_id", "paEagfNXPBVw8Ss80U5RAmAV4pjCPsD2".into()),
            ("auth0_domain", "amun-ai.eu.auth0.com".into()),
            ("auth0_audience", "https://amun-ai.eu.auth0.com/api/v2/".into()),
            ("auth0_issuer", "https://amun.ai/".into()),
            ("login_service_url", format!("{base}/public/services/hypha-login").into()),
        ]);
        let mut svc = obj([
            ("id", "default".into()),
            ("name", "Default workspace management service".into()),
            ("description", "Services for managing workspace.".into()),
            ("config", config.into()),
        ]);
        let target = format!("*/{}", self.manager_id());
        for spec in MANAGER_METHODS {
            let properties: Map = spec.params.iter().map(|p| (*p, Value::Map(Map::new()))).collect();
            let mut parameters = obj([("properties", properties.into())]);
            if !spec.required.is_empty() {
                parameters.push("required", strings(spec.required));
            }
            parameters.push("type", "object");
            let schema = obj([
                ("name", spec.key.into()),
                ("description", spec.doc.into()),
                ("parameters", parameters.into()),
            ]);
            let descriptor = obj([
                ("_rtype", "method".into()),
                ("_rserver", base.as_str().into()),
                ("_rtarget", target.as_str().into()),
                ("_rmethod", format!("services.default.{}", spec.key).into()),
                ("_rpromise", "*".into()),
                ("_rname", spec.rname.into()),
                ("_rasync", true.into()),
                ("_rdoc", spec.doc.into()),
                ("_rschema", schema.into()),
            ]);
            svc.push(spec.key, descriptor);
        }
        svc.push("type", "generic");
        svc.into()
    }

    fn call_manager_method(
        &mut self,
        now_us: u64,
        caller: &Caller,
        name: &str,
        args: Vec<Value>,
        reply: Option<Reply>,
    ) -> Outcome {
        let result = match name {
            "echo" => self.require(caller, Perm::ReadWrite).map(|_| args[0].clone()),
            "log" => self.require(caller, Perm::ReadWrite).map(|_| Value::Nil),
            "register_service" => self.register_service(caller, &args[0]),
            "unregister_service" => self.unregister_service(caller, &args[0]),
            "get_service_info" => self.get_service_info(caller, &args[0], &args[1]),
            "list_services" => self.list_services(caller, &args[0], truthy(&args[1])),
            "list_clients" => self.list_clients(caller, &args[0]),
            "generate_token" => self.generate_token(now_us, caller, &args[0]),
            "subscribe" => self.subscribe(caller, &args[0], true),
            "unsubscribe" => self.subscribe(caller, &args[0], false),
            "get_service" => return self.get_service(now_us, caller, &args[0], &args[1], reply),
            other => Err(MgrError::raised(
                "NotImplementedError",
                format!("{other} is not modelled by the simulated hub"),
            )),
        };
        match result {
            Ok(v) => Outcome::Done(v),
            Err(e) => Outcome::Fail(e),
        }
    }

    fn require(&self, caller: &Caller, perm: Perm) -> Result<(), MgrError> {
        if caller.user.has(&caller.ws, perm) {
            Ok(())
        } else {
            Err(MgrError::raised("PermissionError", format!("Permission denied for workspace {}", caller.ws)))
        }
    }

    fn register_service(&mut self, caller: &Caller, service: &Value) -> Result<Value, MgrError> {
        self.require(caller, Perm::ReadWrite)?;
        let ws = caller.ws.as_str();
        let invalid =
            |m: &str| MgrError::raised("ValidationError", format!("1 validation error for ServiceInfo\n{m}"));
        let Value::Map(svc) = service else {
            return Err(invalid("service: Input should be a valid dictionary"));
        };
        let Some(raw_id) = svc.get("id").and_then(Value::as_str) else {
            return Err(invalid("id: Field required"));
        };
        let raw_cfg = match svc.get("config") {
            None | Some(Value::Nil) => {
                return Err(MgrError::raised(
                    "AttributeError",
                    "'NoneType' object has no attribute 'workspace'",
                ));
            }
            Some(Value::Map(m)) => m.clone(),
            Some(_) => return Err(invalid("config: Input should be a valid dictionary")),
        };
        let visibility = match raw_cfg.get("visibility") {
            None => "protected".to_string(),
            Some(Value::Str(v)) if ["public", "protected", "unlisted"].contains(&v.as_str()) => v.to_string(),
            Some(_) => {
                return Err(invalid(
                    "config.visibility: Input should be 'public', 'protected' or 'unlisted'",
                ));
            }
        };
        let opt_str = |k: &str| -> Result<Value, MgrError> {
            match svc.get(k) {
                None | Some(Value::Nil) => Ok(Value::Nil),
                Some(Value::Str(s)) => Ok(Value::Str(s.clone())),
                Some(_) => Err(invalid(&format!("{k}: Input should be a valid string"))),
            }
        };
        let description = opt_str("description")?;
        if description.as_str().is_some_and(|d| d.chars().count() > 1024) {
            return Err(invalid("description: String should have at most 1024 characters"));
        }
        let docs = opt_str("docs")?;
        let stype = match svc.get("type") {
            None => Value::from("generic"),
            Some(_) => opt_str("type")?,
        };
        let id = if raw_id.contains('/') { raw_id.to_string() } else { format!("{ws}/{raw_id}") };
        if !id.contains(':') {
            return Err(MgrError::raised("AssertionError", "Service id info must contain ':'"));
        }
        let id_ws = workspace_of(&id);
        if id_ws != ws {
            return Err(MgrError::raised(
                "PermissionError",
                format!(
                    "Service ID workspace prefix '{id_ws}' does not match the current workspace '{ws}'. Cannot register services in other workspaces."
                ),
            ));
        }
        let service_name = id.split(':').nth(1).unwrap_or_default().to_string();
        if truthy(raw_cfg.get("_local_only").unwrap_or(&Value::Nil)) || service_name.starts_with("_rintf_") {
            return Ok(Value::Nil);
        }
        let client_prefix = format!("{}:", caller.full_id);
        if !id.contains(":built-in") {
            let count = self
                .services
                .keys()
                .filter(|k| k.starts_with(&client_prefix) && !k.ends_with(":built-in"))
                .count();
            if count >= MAX_SERVICES_PER_CLIENT {
                return Err(MgrError::raised(
                    "RuntimeError",
                    format!(
                        "Service quota exceeded: client {} already has {count} services (max {MAX_SERVICES_PER_CLIENT}). Remove unused services before registering new ones.",
                        caller.full_id
                    ),
                ));
            }
        }
        let name = match svc.get("name") {
            Some(Value::Str(n)) if !n.is_empty() => n.to_string(),
            _ => service_name.clone(),
        };
        let app_id = match svc.get("app_id") {
            Some(Value::Str(a)) if !a.is_empty() => a.to_string(),
            _ => "*".to_string(),
        };
        if app_id.contains('/') {
            return Err(MgrError::raised("AssertionError", "App id info must not contain '/'"));
        }
        let created_by = if service_name == "built-in" && stype.as_str() == Some("built-in") {
            let mut u = caller.user.clone();
            u.current_workspace = Some(ws.to_string());
            u.to_value()
        } else {
            obj([("id", caller.user.id.as_str().into())]).into()
        };
        let authorized = raw_cfg.get("authorized_workspaces").cloned().unwrap_or_default();
        if !authorized.is_nil() && visibility != "protected" {
            return Err(MgrError::raised(
                "ValueError",
                format!(
                    "authorized_workspaces can only be set when visibility is 'protected', got visibility='{visibility}'"
                ),
            ));
        }
        let singleton = truthy(raw_cfg.get("singleton").unwrap_or(&Value::Nil));
        let same_name = |other_id: &str| {
            workspace_of(other_id) == ws && other_id.split(':').nth(1) == Some(service_name.as_str())
        };
        for (other_id, other) in &self.services {
            let other_singleton = other
                .info
                .get("config")
                .and_then(Value::as_map)
                .and_then(|c| c.get("singleton"))
                .is_some_and(truthy);
            if !same_name(other_id)
                || (singleton && other_singleton && *other_id == id && other.app_id == app_id)
            {
                continue;
            }
            if singleton || other_singleton {
                return Err(MgrError::raised(
                    "ValueError",
                    format!(
                        "A singleton service with the same name ({service_name}) already exists in the workspace ({ws}), please remove it first or use a different name."
                    ),
                ));
            }
        }
        if !id.contains(":built-in")
            && ws != "ws-user-root"
            && ws != "public"
            && !self.services.contains_key(&format!("{}:built-in", caller.full_id))
        {
            self.dropped_registrations += 1;
            return Ok(Value::Nil);
        }

        // ServiceConfig.model_dump(): declared fields in order, then the extra keys.
        const CONFIG_FIELDS: [&str; 8] = [
            "visibility",
            "require_context",
            "workspace",
            "flags",
            "singleton",
            "created_by",
            "service_embedding",
            "authorized_workspaces",
        ];
        let field = |k: &str, default: Value| raw_cfg.get(k).cloned().unwrap_or(default);
        let mut config = obj([
            ("visibility", visibility.as_str().into()),
            ("require_context", field("require_context", false.into())),
            ("workspace", ws.into()),
            ("flags", field("flags", Value::Array(Vec::new()))),
            ("singleton", field("singleton", false.into())),
            ("created_by", created_by),
            ("service_embedding", field("service_embedding", Value::Nil)),
            ("authorized_workspaces", authorized),
        ]);
        for (k, v) in raw_cfg.iter() {
            if k.as_str().is_some_and(|k| !CONFIG_FIELDS.contains(&k)) {
                config.insert(k.clone(), v.clone());
            }
        }
        let info = obj([
            ("config", config.into()),
            ("id", id.as_str().into()),
            ("name", name.into()),
            ("type", stype.clone()),
            ("description", description),
            ("docs", docs),
            ("app_id", app_id.as_str().into()),
            ("service_schema", svc.get("service_schema").cloned().unwrap_or_default()),
        ]);
        let stored = StoredService {
            info: info.clone(),
            visibility,
            stype: stype.as_str().unwrap_or("None").to_string(),
            app_id,
        };
        let replaced = self.services.insert(id.clone(), stored).is_some();
        let is_builtin = id.ends_with(":built-in");
        let client_event = obj([("id", caller.full_id.as_str().into()), ("workspace", ws.into())]);
        match (replaced, is_builtin) {
            (true, true) => self.broadcast_event(ws, "client_updated", client_event.into()),
            (false, true) => self.broadcast_event(ws, "client_connected", client_event.into()),
            (true, false) => {
                self.broadcast_event(ws, "service_removed", info.clone().into());
                self.broadcast_event(ws, "service_added", info.into());
            }
            (false, false) => self.broadcast_event(ws, "service_added", info.into()),
        }
        Ok(Value::Nil)
    }

    fn unregister_service(&mut self, caller: &Caller, service_id: &Value) -> Result<Value, MgrError> {
        self.require(caller, Perm::ReadWrite)?;
        let id = match self.resolve_service(caller, service_id, Some("exact"))? {
            Resolved::Service(id) | Resolved::Authorized(id) => id,
            Resolved::Manager => return Err(MgrError::raised("KeyError", "Service not found: ~")),
        };
        let Some(stored) = self.services.remove(&id) else {
            return Err(MgrError::raised("KeyError", format!("Service not found: {id}")));
        };
        let ws = caller.ws.clone();
        if id.ends_with(":built-in") {
            // The server reports the caller's full `ws/client` here, not a bare id.
            let data = obj([("id", caller.full_id.as_str().into()), ("workspace", ws.as_str().into())]);
            self.broadcast_event(&ws, "client_disconnected", data.into());
        } else {
            self.broadcast_event(&ws, "service_removed", stored.info.into());
        }
        Ok(Value::Nil)
    }

    /// `get_service_info`'s id resolution and access check (PROTOCOL.md §10.3).
    fn resolve_service(
        &mut self,
        caller: &Caller,
        service_id: &Value,
        mode: Option<&str>,
    ) -> Result<Resolved, MgrError> {
        let Some(sid) = service_id.as_str() else {
            return Err(MgrError::raised("AssertionError", "Service ID must be a string."));
        };
        for (c, what) in [('/', "'/'"), (':', "':'"), ('@', "'@'")] {
            if sid.matches(c).count() > 1 {
                return Err(MgrError::raised(
                    "AssertionError",
                    format!("Service id must contain at most one {what}"),
                ));
            }
        }
        if sid == "~" || sid.ends_with("/~") {
            return Ok(Resolved::Manager);
        }
        let mut sid = if sid.contains('/') { sid.to_string() } else { format!("{}/{sid}", caller.ws) };
        if !sid.contains(':') {
            let (w, s) = sid.split_once('/').unwrap_or_default();
            sid = format!("{w}/*:{s}");
        }
        let (sid, app_id) = match sid.split_once('@') {
            Some((s, a)) => (s.to_string(), a.to_string()),
            None => (sid, "*".to_string()),
        };
        let workspace = workspace_of(&sid).to_string();
        if workspace == "*" {
            return Err(MgrError::raised(
                "AssertionError",
                "You must specify a workspace for the service query, otherwise please call list_services to find the service.",
            ));
        }
        let pattern = format!("services:*|*:{sid}@{app_id}");
        let keys: Vec<String> = self
            .services
            .iter()
            .filter(|(id, s)| glob_match(&pattern, &s.key(id)))
            .map(|(id, _)| id.clone())
            .collect();
        if keys.is_empty() {
            return Err(MgrError::raised("KeyError", format!("Service not found: {sid}@{app_id}")));
        }
        let mode = mode.unwrap_or(if workspace == "public" { "random" } else { "exact" });
        let id = match mode {
            "exact" if keys.len() == 1 => keys[0].clone(),
            "exact" => {
                let shown: Vec<String> = keys.iter().take(5).map(|k| self.services[k].key(k)).collect();
                return Err(MgrError::raised(
                    "AssertionError",
                    format!(
                        "Multiple services found for {sid}, e.g. {shown:?}. You can either specify the mode as 'random', 'first', 'last', 'native:random', or use 'select:criteria:function' format."
                    ),
                ));
            }
            // min_load and native:random need load metrics the hub does not keep: random.
            "random" | "min_load" | "native:random" => {
                keys[self.rng.below(keys.len() as u64) as usize].clone()
            }
            "first" => keys[0].clone(),
            "last" => keys[keys.len() - 1].clone(),
            m if m.starts_with("select:") => {
                return Err(MgrError::raised(
                    "NotImplementedError",
                    "select modes are not modelled by the simulated hub",
                ));
            }
            m => {
                return Err(MgrError::raised(
                    "ValueError",
                    format!(
                        "Invalid mode: {m}. Mode must be 'random', 'first', 'last', 'exact', 'min_load', 'native:random', or 'select:criteria:function' format (e.g., 'select:min:get_load')"
                    ),
                ));
            }
        };
        let stored = &self.services[&id];
        if stored.visibility != "public"
            && stored.visibility != "unlisted"
            && !caller.user.has(&workspace, Perm::Read)
        {
            if !stored.authorized_workspaces().contains(&caller.ws) {
                return Err(MgrError::raised(
                    "PermissionError",
                    format!("Permission denied for non-public service in workspace {workspace}"),
                ));
            }
            return Ok(Resolved::Authorized(id));
        }
        Ok(Resolved::Service(id))
    }

    fn get_service_info(
        &mut self,
        caller: &Caller,
        service_id: &Value,
        config: &Value,
    ) -> Result<Value, MgrError> {
        let mode = config.as_map().and_then(|c| c.get("mode")).and_then(Value::as_str).map(String::from);
        let (id, hide_authorized) = match self.resolve_service(caller, service_id, mode.as_deref())? {
            Resolved::Manager => {
                return Err(MgrError::raised(
                    "NotImplementedError",
                    "the manager's own service info is not modelled",
                ));
            }
            Resolved::Service(id) => (id, false),
            Resolved::Authorized(id) => (id, true),
        };
        let mut info = self.services[&id].info.clone();
        if hide_authorized {
            if let Some(Value::Map(cfg)) = info.get_mut("config") {
                cfg.remove("authorized_workspaces");
            }
        }
        info.push("_rtype", "pydantic-model");
        Ok(info.into())
    }

    fn get_service(
        &mut self,
        now_us: u64,
        caller: &Caller,
        service_id: &Value,
        config: &Value,
        reply: Option<Reply>,
    ) -> Outcome {
        if service_id.as_str() == Some("*") {
            // The server's message really has the unformatted placeholder.
            return Outcome::Fail(MgrError::raised(
                "AssertionError",
                "Invalid service id: {service_id}, it cannot be a wildcard.",
            ));
        }
        let cfg = config.as_map();
        let mode = cfg.and_then(|c| c.get("mode")).and_then(Value::as_str).map(String::from);
        let timeout_s =
            cfg.and_then(|c| c.get("timeout")).and_then(Value::as_f64).unwrap_or(GET_SERVICE_TIMEOUT_S);
        let id = match self.resolve_service(caller, service_id, mode.as_deref()) {
            Err(e) => return Outcome::Fail(e),
            Ok(Resolved::Manager) => return Outcome::Done(self.manager_service()),
            Ok(Resolved::Service(id) | Resolved::Authorized(id)) => id,
        };
        let (provider, local) =
            id.split_once(':').map(|(p, l)| (p.to_string(), l.to_string())).unwrap_or_default();
        if !self.clients.contains_key(&provider) && self.is_recently_disconnected(now_us, &provider) {
            return Outcome::Fail(MgrError::raised(
                "Exception",
                format!("Target peer {provider} is not connected"),
            ));
        }
        let session = self.rng.session_id();
        let slot = |name: &str| {
            obj([
                ("_rtype", "method".into()),
                ("_rtarget", self.manager_id().into()),
                ("_rmethod", format!("{session}.{name}").into()),
                ("_rpromise", false.into()),
            ])
        };
        let promise = obj([
            ("heartbeat", slot("heartbeat").into()),
            ("interval", MANAGER_INTERVAL_S.into()),
            ("resolve", slot("resolve").into()),
            ("reject", slot("reject").into()),
        ]);
        let extra = obj([("args", Value::Array(vec![local.into()])), ("promise", promise.into())]);
        let bytes = self.manager_frame(
            &provider,
            "services.built-in.get_service",
            None,
            Some(&session),
            Some(&extra),
        );
        self.manager_deliver(&provider, bytes);
        let next_heartbeat_us = reply
            .as_ref()
            .filter(|r| r.heartbeat.is_some())
            .map(|r| now_us + secs_to_us(r.interval_s).max(1));
        self.pending.insert(
            session,
            PendingGet {
                requester: caller.conn,
                reply,
                service_id: id,
                provider,
                deadline_us: now_us + secs_to_us(timeout_s),
                timeout_s,
                next_heartbeat_us,
            },
        );
        Outcome::Pending
    }

    fn list_services(
        &self,
        caller: &Caller,
        query: &Value,
        include_unlisted: bool,
    ) -> Result<Value, MgrError> {
        let cws = caller.ws.clone();
        let (mut visibility, mut workspace, mut client, mut service, mut stype, mut app) =
            ("*".to_string(), cws.clone(), "*".to_string(), "*".to_string(), "*".to_string(), None::<String>);
        match query {
            Value::Nil => {}
            Value::Str(q) => {
                if let (Some((w, rest)), true) = (q.split_once('/'), q.contains(':')) {
                    let mut cs = rest.split(':');
                    client = cs.next().unwrap_or("*").to_string();
                    service = cs.next().unwrap_or("*").to_string();
                    if w == "*" {
                        visibility = "public".into();
                    } else {
                        workspace = w.to_string();
                    }
                } else if q.contains(':') {
                    let mut cs = q.split(':');
                    client = cs.next().unwrap_or("*").to_string();
                    service = cs.next().unwrap_or("*").to_string();
                } else if let Some((w, s)) = q.split_once('/') {
                    service = s.split('/').next().unwrap_or("*").to_string();
                    if w == "*" {
                        visibility = "public".into();
                    } else {
                        workspace = w.to_string();
                    }
                } else {
                    workspace = q.to_string();
                }
            }
            Value::Map(m) => {
                if m.contains_key("id") && m.contains_key("service_id") {
                    return Err(MgrError::raised(
                        "AssertionError",
                        "Cannot specify both 'id' and 'service_id' in the query.",
                    ));
                }
                for (k, v) in m.iter() {
                    let key = k.as_str().unwrap_or_default();
                    let allowed =
                        ["visibility", "workspace", "client_id", "service_id", "id", "type", "app_id"];
                    if !allowed.contains(&key) {
                        return Err(MgrError::raised(
                            "ValueError",
                            format!("Invalid query keys: {{'{key}'}}"),
                        ));
                    }
                    let Some(v) = v.as_str().map(String::from) else {
                        return Err(MgrError::raised("ValueError", format!("Invalid query value for {key}")));
                    };
                    match key {
                        "visibility" => visibility = v,
                        "workspace" => workspace = v,
                        "client_id" => client = v,
                        "service_id" | "id" => service = v,
                        "type" => stype = v,
                        _ => app = Some(v),
                    }
                }
            }
            _ => {
                return Err(MgrError::raised(
                    "ValidationError",
                    "query: Input should be a valid dictionary or string",
                ));
            }
        }
        let original_visibility = visibility.clone();
        if workspace == "*" {
            if original_visibility == "protected" || original_visibility == "unlisted" {
                return Err(MgrError::raised(
                    "AssertionError",
                    "Cannot list protected or unlisted services in all workspaces.",
                ));
            }
            if include_unlisted {
                return Err(MgrError::raised(
                    "PermissionError",
                    "Cannot include unlisted services when searching all workspaces.",
                ));
            }
            visibility = "public".into();
        } else if workspace != "public" && workspace != cws && include_unlisted {
            return Err(MgrError::raised(
                "PermissionError",
                format!(
                    "Cannot include unlisted services from workspace {workspace}. Only services from your current workspace ({cws}) can include unlisted services."
                ),
            ));
        }
        let mut app_id = "*".to_string();
        if let Some((s, a)) = service.clone().split_once('@') {
            service = s.to_string();
            app_id = a.to_string();
            if let Some(q) = app.as_ref().filter(|q| **q != app_id) {
                return Err(MgrError::raised("ValueError", format!("App id mismatch: {q} != {app_id}")));
            }
        }
        if let Some(a) = app {
            app_id = a;
        }
        let user = &caller.user;
        if !user.has(&workspace, Perm::Read) && visibility == "unlisted" {
            visibility = "public".into();
        }
        let mut patterns = Vec::new();
        if include_unlisted && workspace == cws {
            for vis in ["public", "protected", "unlisted"] {
                patterns.push(format!("services:{vis}|{stype}:{workspace}/{client}:{service}@{app_id}"));
            }
        } else {
            patterns.push(format!("services:{visibility}|{stype}:{workspace}/{client}:{service}@{app_id}"));
        }
        if workspace == "*" {
            patterns
                .push(format!("services:{original_visibility}|{stype}:{cws}/{client}:{service}@{app_id}"));
        }
        let mut out = Vec::new();
        for (id, stored) in &self.services {
            let key = stored.key(id);
            if !patterns.iter().any(|p| glob_match(p, &key)) {
                continue;
            }
            let svc_ws = workspace_of(id);
            let mut info = stored.info.clone();
            if stored.visibility == "unlisted" && (!include_unlisted || svc_ws != cws) {
                continue;
            }
            if stored.visibility != "public"
                && stored.visibility != "unlisted"
                && !user.has(svc_ws, Perm::Read)
            {
                if !stored.authorized_workspaces().contains(&cws) {
                    continue;
                }
                if let Some(Value::Map(cfg)) = info.get_mut("config") {
                    cfg.remove("authorized_workspaces");
                }
            }
            out.push(Value::Map(info));
        }
        Ok(Value::Array(out))
    }

    fn list_clients(&self, caller: &Caller, workspace: &Value) -> Result<Value, MgrError> {
        let ws = workspace.as_str().unwrap_or(&caller.ws).to_string();
        if !caller.user.has(&ws, Perm::Read) {
            return Err(MgrError::raised("PermissionError", format!("Permission denied for workspace {ws}")));
        }
        let clients = self
            .services
            .iter()
            .filter(|(id, _)| workspace_of(id) == ws && id.ends_with(":built-in"))
            .map(|(id, s)| {
                let client = id.split('/').nth(1).and_then(|r| r.split(':').next()).unwrap_or_default();
                let created_by =
                    s.info.get("config").and_then(Value::as_map).and_then(|c| c.get("created_by")).cloned();
                Value::from(obj([
                    ("id", format!("{ws}/{client}").into()),
                    ("user", created_by.unwrap_or_default()),
                ]))
            })
            .collect();
        Ok(Value::Array(clients))
    }

    fn generate_token(&mut self, now_us: u64, caller: &Caller, config: &Value) -> Result<Value, MgrError> {
        let empty = Map::new();
        let cfg = match config {
            Value::Nil => &empty,
            Value::Map(m) => m,
            _ => {
                return Err(MgrError::raised(
                    "ValidationError",
                    "config: Input should be a valid dictionary",
                ));
            }
        };
        let get_str = |k: &str| cfg.get(k).and_then(Value::as_str).map(String::from);
        let user = &caller.user;
        let allowed_ws = get_str("workspace").unwrap_or_else(|| caller.ws.clone());
        let mut max = user.permission(&allowed_ws);
        if max != Some(Perm::Admin) {
            if user.owns(&allowed_ws) {
                max = Some(Perm::Admin);
            } else if max.is_none() {
                return Err(MgrError::raised(
                    "PermissionError",
                    format!("You do not have any permission for workspace: {allowed_ws}"),
                ));
            }
        }
        if max != Some(Perm::Admin) {
            return Err(MgrError::raised("PermissionError", "Only admin can generate token."));
        }
        let perm_name = get_str("permission").unwrap_or_else(|| "read_write".into());
        let Some(perm) = Perm::from_name(&perm_name) else {
            return Err(MgrError::raised("KeyError", format!("'{perm_name}'")));
        };
        let extra_scopes: Vec<String> = cfg
            .get("extra_scopes")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(String::from).collect())
            .unwrap_or_default();
        let mut minted = user.clone();
        minted.parent = Some(user.parent.clone().unwrap_or_else(|| user.id.clone()));
        minted.id = self.rng.readable_id();
        minted.scope_workspace = Some(allowed_ws.clone());
        minted.workspaces = vec![(allowed_ws.clone(), perm)];
        minted.scope_client = get_str("client_id");
        minted.extra_scopes = Some(extra_scopes);
        minted.expires_at = None;
        minted.current_workspace = None;
        if let Some(email) = get_str("email") {
            if !user.roles.iter().any(|r| r == "admin") {
                return Err(MgrError::raised(
                    "PermissionError",
                    "Only callers with the 'admin' role may set TokenConfig.email",
                ));
            }
            minted.email = Some(email);
        }
        let expires_in = cfg
            .get("expires_in")
            .and_then(Value::as_u64)
            .filter(|s| *s > 0)
            .unwrap_or(TOKEN_DEFAULT_EXPIRY_S);
        let token = format!("hubtoken:{allowed_ws}:{}", minted.id);
        self.tokens
            .insert(token.clone(), TokenGrant { user: minted, expires_us: now_us + expires_in * 1_000_000 });
        Ok(token.into())
    }

    fn subscribe(&mut self, caller: &Caller, event_type: &Value, add: bool) -> Result<Value, MgrError> {
        let events: Vec<String> = match event_type {
            Value::Str(s) => vec![s.to_string()],
            Value::Array(a) if a.iter().all(|v| v.as_str().is_some()) => {
                a.iter().filter_map(Value::as_str).map(String::from).collect()
            }
            _ => {
                return Err(MgrError::raised(
                    "ValidationError",
                    "event_type: Input should be a valid string or list of strings",
                ));
            }
        };
        if add {
            for e in &events {
                validate_event_subscription(e, &caller.ws)?;
            }
        }
        let Some(client) = self.open_client_mut(caller.conn) else {
            return Err(MgrError::raised(
                "RuntimeError",
                format!("Connection not found for client {}", caller.full_id),
            ));
        };
        for e in events {
            if add {
                client.subscriptions.insert(e);
            } else {
                client.subscriptions.remove(&e);
            }
        }
        Ok(true.into())
    }
}

enum Resolved {
    Manager,
    Service(String),
    /// A protected service reached through `authorized_workspaces`.
    Authorized(String),
}

/// `_validate_event_subscription` of the workspace manager.
fn validate_event_subscription(event: &str, ws: &str) -> Result<(), MgrError> {
    const SYSTEM: [&str; 12] = [
        "service_added",
        "service_removed",
        "service_updated",
        "client_connected",
        "client_disconnected",
        "client_updated",
        "workspace_loaded",
        "workspace_deleted",
        "workspace_changed",
        "workspace_ready",
        "workspace_unloaded",
        "workspace_status_changed",
    ];
    if SYSTEM.contains(&event) {
        return Ok(());
    }
    let forbidden = |m: String| Err(MgrError::raised("ValueError", m));
    if let Some((event_ws, _)) = event.split_once('/') {
        if event_ws != ws {
            return forbidden(format!(
                "Subscription to event '{event}' is forbidden. Event workspace '{event_ws}' does not match your workspace '{ws}'. Clients can only subscribe to events within their own workspace or system events."
            ));
        }
        return Ok(());
    }
    if event.starts_with("ws-") && event != ws {
        return forbidden(format!(
            "Subscription to event '{event}' is forbidden as it contains workspace identifiers. Clients can only subscribe to events within their own workspace ({ws}) or system events."
        ));
    }
    if let Some((first, _)) = event.split_once(':') {
        if first.starts_with("ws-") && first != ws {
            return forbidden(format!(
                "Subscription to event '{event}' is forbidden. Workspace '{first}' does not match your workspace '{ws}'."
            ));
        }
    }
    Ok(())
}

/// The promise slots of an incoming manager call (PROTOCOL.md §5.2). `Err` means the Python
/// callee would fail while decoding the promise and drop the call.
fn parse_promise(
    promise: Option<&Value>,
    t: Option<&Value>,
    from: &str,
    session: Option<&str>,
) -> Result<Option<Reply>, ()> {
    let ws = workspace_of(from);
    match promise {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Str(s)) if s == "*" => {
            let session = session.ok_or(())?;
            let t = t.and_then(Value::as_f64).ok_or(())?;
            let slot = |n: &str| (from.to_string(), format!("{session}.{n}"));
            Ok(Some(Reply {
                resolve: slot("resolve"),
                reject: slot("reject"),
                heartbeat: Some(slot("heartbeat")),
                interval_s: t,
                parent: Some(session.to_string()),
            }))
        }
        Some(Value::Map(m)) => {
            let slot = |n: &str| -> Option<(String, String)> {
                let d = m.get(n)?.as_map()?;
                let target = d.get("_rtarget")?.as_str()?;
                let method = d.get("_rmethod")?.as_str()?;
                Some((qualify_target(target, ws), method.to_string()))
            };
            let (resolve, reject) = (slot("resolve").ok_or(())?, slot("reject").ok_or(())?);
            let interval = m.get("interval").and_then(Value::as_f64);
            let heartbeat = slot("heartbeat").filter(|_| interval.is_some());
            Ok(Some(Reply {
                resolve,
                reject,
                heartbeat,
                interval_s: interval.unwrap_or(MANAGER_INTERVAL_S),
                parent: session.map(String::from),
            }))
        }
        Some(_) => Err(()),
    }
}

/// Qualifies the bare `_rtarget` of every remote-callable descriptor inside `v`, as the
/// manager's RPC does when it decodes a provider's reply.
fn qualify_descriptors(v: &mut Value, ws: &str) {
    match v {
        Value::Array(a) => a.iter_mut().for_each(|x| qualify_descriptors(x, ws)),
        Value::Map(m) => {
            let callable = matches!(m.get("_rtype").and_then(Value::as_str), Some("method" | "generator"));
            for (k, x) in m.iter_mut() {
                if callable && k.as_str() == Some("_rtarget") {
                    if let Value::Str(t) = x {
                        if !t.contains('/') {
                            *t = format!("{ws}/{t}").into();
                        }
                    }
                } else {
                    qualify_descriptors(x, ws);
                }
            }
        }
        _ => {}
    }
}

/// Redis-style glob with `*` only (the server builds its patterns that way).
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

// ---------------------------------------------------------------------------------------------
// The manager's method table (names, `_rname`, `_rdoc`, parameters as in connect_handshake #3).

struct MethodSpec {
    key: &'static str,
    rname: &'static str,
    doc: &'static str,
    params: &'static [&'static str],
    required: &'static [&'static str],
}

const fn spec(
    key: &'static str,
    rname: &'static str,
    doc: &'static str,
    params: &'static [&'static str],
    required: &'static [&'static str],
) -> MethodSpec {
    MethodSpec { key, rname, doc, params, required }
}

#[rustfmt::skip]
const MANAGER_METHODS: &[MethodSpec] = &[
    spec("echo", "echo", "Log a app message.", &["data"], &["data"]),
    spec("log", "log", "Log a app message.", &["msg"], &["msg"]),
    spec("log_event", "log_event", "Log a new event, checking permissions.", &["event_type", "data"], &["event_type"]),
    spec("get_event_stats", "get_event_stats", "Get statistics for specific event types, filtered by workspace, user, and time range.", &["event_type", "start_time", "end_time"], &[]),
    spec("get_events", "get_events", "Search for events with various filters, enforcing workspace and permission checks.", &["event_type", "start_time", "end_time"], &[]),
    spec("register_service", "register_service", "Register a new service.", &["service", "config"], &["service"]),
    spec("unregister_service", "unregister_service", "Unregister a new service.", &["service_id"], &["service_id"]),
    spec("list_workspaces", "list_workspaces", "Get all workspaces with pagination.", &["match", "offset", "limit"], &[]),
    spec("list_services", "list_services", "Return a list of services based on the query, optionally including services from installed apps.", &["query", "include_unlisted", "include_app_services", "prioritize_running_services"], &[]),
    spec("search_services", "search_services", "Search services with support for hybrid queries and pure filter-based queries.", &["query", "filters", "limit", "offset", "return_fields", "order_by", "pagination", "include_unlisted"], &[]),
    spec("list_clients", "list_clients", "Return a list of clients based on the services.", &["workspace"], &[]),
    spec("register_service_type", "register_service_type", "Register a new service type.", &["type_info"], &["type_info"]),
    spec("get_service_type", "get_service_type", "Get a service type by ID.", &["type_id"], &["type_id"]),
    spec("list_service_types", "list_service_types", "List all service types in the workspace.", &["workspace"], &[]),
    spec("get_service_info", "get_service_info", "Get the service info.", &["service_id", "config"], &["service_id"]),
    spec("get_service", "get_service", "Get a service based on the service_id", &["service_id", "config"], &["service_id"]),
    spec("generate_token", "generate_token", "Generate an authentication token for workspace access.", &["config"], &[]),
    spec("revoke_token", "revoke_token", "Revoke a token by storing it in Redis with a prefix and expiration time.", &["token"], &["token"]),
    spec("parse_token", "parse_token", "Parse a token.", &["token"], &["token"]),
    spec("create_workspace", "create_workspace", "Create a new workspace for organizing services and data.", &["config", "overwrite"], &["config"]),
    spec("delete_workspace", "delete_workspace", "Remove a workspace.", &["workspace"], &["workspace"]),
    spec("bookmark", "bookmark", "Bookmark workspace or service to the user's workspace.", &["item"], &["item"]),
    spec("unbookmark", "unbookmark", "Unbookmark workspace or service from the user's workspace.", &["item"], &["item"]),
    spec("get_workspace_info", "get_workspace_info", "Get the workspace info.", &["workspace"], &[]),
    spec("get_summary", "get_summary", "Get a summary about the workspace.", &[], &[]),
    spec("ping", "ping_client", "Ping a client.", &["client_id", "timeout"], &["client_id"]),
    spec("cleanup", "cleanup", "Cleanup the workspace.", &["workspace", "timeout"], &[]),
    spec("check_status", "check_status", "Check the status of the workspace.", &[], &[]),
    spec("set_env", "set_env", "Set an environment variable for the workspace.", &["key", "value"], &["key", "value"]),
    spec("get_env", "get_env", "Get environment variable(s) from the workspace.", &["key"], &[]),
    spec("subscribe", "subscribe", "Subscribe to event types for receiving broadcast messages.", &["event_type"], &["event_type"]),
    spec("unsubscribe", "unsubscribe", "Unsubscribe from event types to stop receiving broadcast messages.", &["event_type"], &["event_type"]),
];

fn method_spec(name: &str) -> Option<&'static MethodSpec> {
    MANAGER_METHODS.iter().find(|s| s.key == name)
}

/// Binds positional args and a trailing kwargs map to the method's parameters; a missing
/// optional parameter is nil. `context` passed by the caller is ignored (the server injects it).
fn bind(spec: &MethodSpec, args: &[Value], with_kwargs: bool) -> Result<Vec<Value>, MgrError> {
    let type_error = |m: String| MgrError::raised("TypeError", format!("{}() {m}", spec.rname));
    let (positional, kwargs) = match (with_kwargs, args.split_last()) {
        (true, Some((Value::Map(kw), rest))) => (rest, Some(kw)),
        (true, Some(_)) => return Err(type_error("argument after ** must be a mapping".into())),
        _ => (args, None),
    };
    if positional.len() > spec.params.len() {
        return Err(type_error(format!(
            "takes {} positional arguments but {} were given",
            spec.params.len(),
            positional.len()
        )));
    }
    let mut bound: Vec<Option<Value>> = vec![None; spec.params.len()];
    for (slot, v) in bound.iter_mut().zip(positional) {
        *slot = Some(v.clone());
    }
    for (k, v) in kwargs.into_iter().flatten() {
        let Some(k) = k.as_str() else { return Err(type_error("keywords must be strings".into())) };
        if k == "context" {
            continue;
        }
        let Some(i) = spec.params.iter().position(|p| *p == k) else {
            return Err(type_error(format!("got an unexpected keyword argument '{k}'")));
        };
        if bound[i].is_some() {
            return Err(type_error(format!("got multiple values for argument '{k}'")));
        }
        bound[i] = Some(v.clone());
    }
    for r in spec.required {
        let i = spec.params.iter().position(|p| p == r).expect("required is a parameter");
        if bound[i].is_none() {
            return Err(type_error(format!("missing 1 required positional argument: '{r}'")));
        }
    }
    Ok(bound.into_iter().map(Option::unwrap_or_default).collect())
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

fn obj<const N: usize>(entries: [(&str, Value); N]) -> Map {
    let mut m = Map::with_capacity(N);
    for (k, v) in entries {
        m.push(k, v);
    }
    m
}

fn strings(items: &[impl AsRef<str>]) -> Value {
    Value::Array(items.iter().map(|s| Value::from(s.as_ref())).collect())
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Nil => false,
        Value::Bool(b) => *b,
        Value::Integer(i) => i.as_u64() != Some(0),
        Value::F64(f) => *f != 0.0,
        Value::F32(f) => *f != 0.0,
        Value::Str(s) => !s.is_empty(),
        Value::Bin(b) => !b.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Map(m) => !m.is_empty(),
        Value::Ext(..) => true,
    }
}

fn secs_to_us(s: f64) -> u64 {
    if s.is_finite() && s > 0.0 { (s * 1e6) as u64 } else { 0 }
}

fn close(code: u16, reason: &str) -> HubOutput {
    HubOutput::Close { code, reason: reason.to_string() }
}

fn encode_pair(main: &Map, extra: Option<&Map>) -> Bytes {
    let mut out = Vec::with_capacity(512);
    encode_value(&Value::Map(main.clone()), &mut out);
    if let Some(e) = extra {
        encode_value(&Value::Map(e.clone()), &mut out);
    }
    Bytes::from(out)
}

fn error_text(reason: &str) -> String {
    let mut m = serde_json::Map::new();
    m.insert("type".into(), "error".into());
    m.insert("message".into(), reason.into());
    py_json(&Json::Object(m))
}

/// A msgpack value as JSON (for the text frames).
fn to_json(v: &Value) -> Json {
    match v {
        Value::Nil | Value::Ext(..) => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Integer(i) => {
            i.as_i64().map(Json::from).or_else(|| i.as_u64().map(Json::from)).unwrap_or(Json::Null)
        }
        Value::F64(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(Json::Null, Json::Number),
        Value::Str(s) => Json::String(s.to_string()),
        Value::Bin(b) => Json::Array(b.iter().map(|x| Json::from(*x)).collect()),
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        Value::Map(m) => Json::Object(
            m.iter()
                .map(|(k, v)| (k.as_str().map_or_else(|| format!("{k:?}"), String::from), to_json(v)))
                .collect(),
        ),
    }
}

/// JSON text as Python's `json.dumps` writes it: `", "` and `": "` separators, non-ASCII
/// escaped as `\uXXXX`.
fn py_json(v: &Json) -> String {
    let mut out = String::new();
    write_json(&mut out, v);
    out
}

fn write_json(out: &mut String, v: &Json) {
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Json::String(s) => hypha_rpc_core::connection::json_str(out, s),
        Json::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(out, x);
            }
            out.push(']');
        }
        Json::Object(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                hypha_rpc_core::connection::json_str(out, k);
                out.push_str(": ");
                write_json(out, x);
            }
            out.push('}');
        }
    }
}

/// splitmix64: small, seedable, and the same on every platform.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// `<adjective>-<noun>-<8 digits>`, like hypha's `random_id(readable=True)`.
    fn readable_id(&mut self) -> String {
        const ADJECTIVES: [&str; 16] = [
            "amber",
            "brave",
            "calm",
            "delicate",
            "eager",
            "fuzzy",
            "gentle",
            "hyper",
            "icy",
            "jolly",
            "keen",
            "lucky",
            "mellow",
            "nimble",
            "quiet",
            "spectacled",
        ];
        const NOUNS: [&str; 16] = [
            "badger",
            "comet",
            "dirigible",
            "ember",
            "forest",
            "glacier",
            "harbor",
            "island",
            "lantern",
            "meadow",
            "otter",
            "pebble",
            "river",
            "titanium",
            "valley",
            "willow",
        ];
        let a = ADJECTIVES[self.below(16) as usize];
        let n = NOUNS[self.below(16) as usize];
        format!("{a}-{n}-{:08}", self.below(100_000_000))
    }
    /// A 22-character shortuuid-style session id.
    fn session_id(&mut self) -> String {
        const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
        (0..22).map(|_| ALPHABET[self.below(ALPHABET.len() as u64) as usize] as char).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("services:*|*:ws/*:svc@*", "services:public|generic:ws/c:svc@*"));
        assert!(!glob_match("services:*|*:ws/*:svc@*", "services:public|generic:ws/c:svc2@*"));
        assert!(glob_match("a*", "a"));
        assert!(!glob_match("a", "ab"));
    }

    #[test]
    fn python_json_spacing() {
        let j: Json = serde_json::from_str(r#"{"a": [1, 2.5, "é"], "b": null}"#).unwrap();
        assert_eq!(py_json(&j), r#"{"a": [1, 2.5, "\u00e9"], "b": null}"#);
    }
}
