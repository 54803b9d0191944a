//! Building blocks for the hostile-input tests: hand-made msgpack (valid and not), call frames as the server delivers them, a raw websocket client that plays a hostile peer against the real server, and an engine driver that records every frame it refused.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration as StdDuration, Instant as StdInstant};

use bytes::Bytes;
use hypha_rpc_core::codec::rtype::RemoteError;
use hypha_rpc_core::codec::{Frame, decode_frame, encode_frame, to_vec};
use hypha_rpc_core::time::Instant;
use hypha_rpc_core::{
    CallError, CallId, Engine, EngineConfig, Event, InputError, Invocation, InvokeId, Limits, Map, Transmit,
    Value,
};
use serde_json::Value as Json;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

// ---------------------------------------------------------------------------------------------
// Values and frames.

/// A map from `(key, value)` pairs, in order (a repeated key keeps its last value).
pub fn map_of(entries: &[(&str, Value)]) -> Map {
    let mut m = Map::new();
    for (k, v) in entries {
        m.insert(*k, v.clone());
    }
    m
}

/// `main` then `extra`, as one binary frame.
pub fn frame(main: Map, extra: Option<Map>) -> Bytes {
    encode_frame(&Frame { main, extra })
}

/// The msgpack bytes of one value.
pub fn enc(v: impl Into<Value>) -> Vec<u8> {
    to_vec(&v.into())
}

/// Byte strings glued together.
pub fn concat(parts: &[&[u8]]) -> Bytes {
    Bytes::from(parts.concat())
}

/// The workspace part of `ws/client`.
pub fn ws_of(id: &str) -> &str {
    id.split_once('/').map_or("", |(w, _)| w)
}

/// A call's `main` as the server delivers it: `type, from, to, method, session?`, then the
/// trusted `ws` (the sender's workspace) and `user` (`{"id": "user-<client>"}`).
pub fn call_main(from: &str, to: &str, method: &str, session: Option<&str>) -> Map {
    let mut m = Map::new();
    m.push("type", "method");
    m.push("from", from);
    m.push("to", to);
    m.push("method", method);
    if let Some(s) = session {
        m.push("session", s);
    }
    m.push("ws", ws_of(from));
    m.push("user", map_of(&[("id", format!("user-{}", from.rsplit('/').next().unwrap_or("")).into())]));
    m
}

/// A call's `extra` with a compact promise: `{args?, promise: "*", t: 15.0}`.
pub fn call_extra(args: Vec<Value>) -> Map {
    let mut m = Map::new();
    if !args.is_empty() {
        m.push("args", Value::Array(args));
    }
    m.push("promise", "*");
    m.push("t", 15.0);
    m
}

/// A complete call frame (compact promise when `session` is set, fire-and-forget otherwise).
pub fn call_frame(from: &str, to: &str, method: &str, session: Option<&str>, args: Vec<Value>) -> Bytes {
    let extra = match session {
        Some(_) => call_extra(args),
        None => map_of(&[("args", Value::Array(args))]),
    };
    frame(call_main(from, to, method, session), Some(extra))
}

/// Raw msgpack headers, for frames a well-behaved encoder never writes (lengths that lie).
pub mod mp {
    /// `str32` header declaring `n` bytes.
    pub fn str32(n: u32) -> Vec<u8> {
        [&[0xdb][..], &n.to_be_bytes()].concat()
    }
    /// `bin32` header declaring `n` bytes.
    pub fn bin32(n: u32) -> Vec<u8> {
        [&[0xc6][..], &n.to_be_bytes()].concat()
    }
    /// `bin16` header declaring `n` bytes.
    pub fn bin16(n: u16) -> Vec<u8> {
        [&[0xc5][..], &n.to_be_bytes()].concat()
    }
    /// `ext32` header declaring `n` bytes of type `tag`.
    pub fn ext32(n: u32, tag: i8) -> Vec<u8> {
        [&[0xc9][..], &n.to_be_bytes(), &[tag as u8]].concat()
    }
    /// `array32` header declaring `n` elements.
    pub fn array32(n: u32) -> Vec<u8> {
        [&[0xdd][..], &n.to_be_bytes()].concat()
    }
    /// `map32` header declaring `n` entries.
    pub fn map32(n: u32) -> Vec<u8> {
        [&[0xdf][..], &n.to_be_bytes()].concat()
    }
    /// A fixstr (at most 31 bytes; not checked for UTF-8).
    pub fn fixstr(s: &[u8]) -> Vec<u8> {
        assert!(s.len() < 32);
        [&[0xa0 | s.len() as u8][..], s].concat()
    }
    /// A `str32` with these (possibly invalid UTF-8) bytes.
    pub fn str_bytes(s: &[u8]) -> Vec<u8> {
        [str32(s.len() as u32), s.to_vec()].concat()
    }
}

// ---------------------------------------------------------------------------------------------
// A raw websocket client: a hostile peer against the real server.

/// What a raw client received.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A text frame.
    Text(String),
    /// A binary frame, and its decoding when it is a valid frame.
    Binary(Bytes, Option<Frame>),
    /// The server closed: code and reason.
    Close(Option<u16>, String),
}

/// Why the server refused a raw client's handshake.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The `{"type": "error"}` text, if one came.
    pub error_text: Option<String>,
    /// The close code and reason, if a close frame came.
    pub close: Option<(Option<u16>, String)>,
}

/// A websocket client that writes whatever bytes it is told to: no engine, no checks.
pub struct RawWs {
    ws: WebSocket<TcpStream>,
    /// The server's `connection_info`.
    pub info: Json,
    /// Everything received after `connection_info`, in order.
    pub received: Vec<Received>,
    /// Set once the connection is gone.
    pub closed: Option<(Option<u16>, String)>,
}

fn open_ws(ws_url: &str, max: usize) -> Result<WebSocket<TcpStream>, String> {
    assert!(ws_url.starts_with("ws://127.0.0.1:"), "only the local server is ever contacted: {ws_url}");
    let addr = ws_url.trim_start_matches("ws://").split('/').next().unwrap_or_default().to_string();
    let stream = TcpStream::connect(&addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).ok();
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(max);
    config.max_frame_size = Some(max);
    let (ws, _) = tungstenite::client::client_with_config(ws_url, stream, Some(config))
        .map_err(|e| format!("websocket handshake: {e}"))?;
    Ok(ws)
}

fn read_one(ws: &mut WebSocket<TcpStream>, wait: StdDuration) -> Result<Option<Message>, String> {
    ws.get_ref().set_read_timeout(Some(wait.max(StdDuration::from_millis(1)))).map_err(|e| e.to_string())?;
    match ws.read() {
        Ok(m) => Ok(Some(m)),
        Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

impl RawWs {
    /// Opens `ws_url` and authenticates with the first-frame fields. `Err` carries the server's
    /// refusal (error text and close), or a transport error as the close reason.
    pub fn connect(
        ws_url: &str,
        client_id: &str,
        workspace: Option<&str>,
        token: Option<&str>,
    ) -> Result<RawWs, Refusal> {
        let transport = |e: String| Refusal { error_text: None, close: Some((None, e)) };
        let mut ws = open_ws(ws_url, 64 * 1024 * 1024).map_err(transport)?;
        let auth = serde_json::json!({
            "client_id": client_id, "workspace": workspace, "token": token, "reconnection_token": null
        });
        ws.send(Message::text(auth.to_string())).map_err(|e| transport(e.to_string()))?;
        let deadline = StdInstant::now() + StdDuration::from_secs(15);
        let mut refusal = Refusal { error_text: None, close: None };
        while StdInstant::now() < deadline {
            match read_one(&mut ws, StdDuration::from_millis(50)) {
                Ok(Some(Message::Text(t))) => {
                    let j: Json = serde_json::from_str(t.as_str()).unwrap_or(Json::Null);
                    match j["type"].as_str() {
                        Some("connection_info") => {
                            return Ok(RawWs { ws, info: j, received: Vec::new(), closed: None });
                        }
                        Some("error") => refusal.error_text = j["message"].as_str().map(String::from),
                        _ => {}
                    }
                }
                Ok(Some(Message::Close(c))) => {
                    refusal.close = Some(
                        c.map(|c| (Some(u16::from(c.code)), c.reason.to_string()))
                            .unwrap_or((None, String::new())),
                    );
                    return Err(refusal);
                }
                Ok(_) => {}
                Err(e) => {
                    refusal.close.get_or_insert((None, e));
                    return Err(refusal);
                }
            }
        }
        refusal.close.get_or_insert((None, "no connection_info within 15 s".into()));
        Err(refusal)
    }

    /// `ws/client` as the server named us.
    pub fn full_id(&self) -> String {
        format!(
            "{}/{}",
            self.info["workspace"].as_str().unwrap_or_default(),
            self.info["client_id"].as_str().unwrap_or_default()
        )
    }

    /// Sends one binary message as is.
    pub fn send_binary(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.closed.is_some() {
            return Err("closed".into());
        }
        self.ws.send(Message::binary(bytes.to_vec())).map_err(|e| e.to_string())
    }

    /// Sends one text message as is.
    pub fn send_text(&mut self, text: &str) -> Result<(), String> {
        if self.closed.is_some() {
            return Err("closed".into());
        }
        self.ws.send(Message::text(text.to_string())).map_err(|e| e.to_string())
    }

    /// Reads what is there (waiting up to `wait` for the first message); returns how many
    /// messages arrived.
    pub fn poll(&mut self, wait: StdDuration) -> usize {
        let mut n = 0;
        let mut wait = wait;
        while self.closed.is_none() {
            match read_one(&mut self.ws, wait) {
                Ok(Some(Message::Text(t))) => self.received.push(Received::Text(t.to_string())),
                Ok(Some(Message::Binary(b))) => {
                    let b = Bytes::from(b.to_vec());
                    let f = decode_frame(&b, &Limits::default()).ok();
                    self.received.push(Received::Binary(b, f));
                }
                Ok(Some(Message::Close(c))) => {
                    let c = c
                        .map(|c| (Some(u16::from(c.code)), c.reason.to_string()))
                        .unwrap_or((None, String::new()));
                    self.received.push(Received::Close(c.0, c.1.clone()));
                    self.closed = Some(c);
                }
                Ok(Some(_)) => {}
                Ok(None) => return n,
                Err(e) => {
                    self.received.push(Received::Close(None, e.clone()));
                    self.closed = Some((None, e));
                }
            }
            n += 1;
            wait = StdDuration::from_millis(1);
        }
        n
    }

    /// The decoded binary frames received so far.
    pub fn frames(&self) -> Vec<Frame> {
        self.received
            .iter()
            .filter_map(|r| match r {
                Received::Binary(_, Some(f)) => Some(f.clone()),
                _ => None,
            })
            .collect()
    }

    /// Sends a `{"type": "ping"}` and waits (up to `timeout`) for the `pong`: whether the
    /// server still talks to us.
    pub fn is_alive(&mut self, timeout: StdDuration) -> bool {
        if self.send_text(r#"{"type": "ping"}"#).is_err() {
            return false;
        }
        let from = self.received.len();
        let deadline = StdInstant::now() + timeout;
        while StdInstant::now() < deadline && self.closed.is_none() {
            self.poll(StdDuration::from_millis(20));
            let pong =
                self.received[from..].iter().any(|r| matches!(r, Received::Text(t) if t.contains("pong")));
            if pong {
                return true;
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// An engine on a real websocket that records what it refused and what it sent.

/// User code: `Some(result)` answers at once, `None` holds the invocation (answer it later
/// with [`Tap::reply`]).
pub type TapHandler = Box<dyn FnMut(&Invocation) -> Option<Result<Value, RemoteError>>>;

/// One engine on one real websocket, driven synchronously, keeping a record of every frame it
/// refused ([`InputError`]) and every binary frame it sent.
pub struct Tap {
    /// The engine.
    pub engine: Engine,
    ws: WebSocket<TcpStream>,
    /// Where to reconnect when the engine asks for the socket to be closed.
    url: String,
    max_frame: usize,
    origin: StdInstant,
    /// Settled calls by id (taken out by [`Tap::take`]).
    pub settled: BTreeMap<CallId, Result<Value, CallError>>,
    /// Every event, in order.
    pub events: Vec<Event>,
    /// Every frame the engine refused, with the error.
    pub input_errors: Vec<InputError>,
    /// Every binary frame the engine sent, decoded.
    pub sent: Vec<Frame>,
    /// Every invocation, in order.
    pub invocations: Vec<Invocation>,
    /// Invocations the handler held, not answered yet.
    pub held: Vec<Invocation>,
    /// The handler of every invocation.
    pub handler: Option<TapHandler>,
    /// Set when the transport closed.
    pub closed: Option<(Option<u16>, String)>,
    /// Binary frames received (handled or refused).
    pub binary_in: usize,
}

impl Tap {
    /// Connects and drives the handshake until `Connected`.
    pub fn connect(ws_url: &str, config: EngineConfig) -> Result<Tap, String> {
        let max_frame = config.limits.max_frame_bytes;
        let ws = open_ws(ws_url, max_frame)?;
        let mut engine = Engine::new(config, Instant::ZERO);
        engine.handle_transport_open(Instant::ZERO).map_err(|e| e.to_string())?;
        let mut t = Tap {
            engine,
            ws,
            url: ws_url.to_string(),
            max_frame,
            origin: StdInstant::now(),
            settled: BTreeMap::new(),
            events: Vec::new(),
            input_errors: Vec::new(),
            sent: Vec::new(),
            invocations: Vec::new(),
            held: Vec::new(),
            handler: None,
            closed: None,
            binary_in: 0,
        };
        let deadline = StdInstant::now() + StdDuration::from_secs(20);
        while StdInstant::now() < deadline {
            t.turn(StdDuration::from_millis(20))?;
            if t.events.iter().any(|e| matches!(e, Event::Connected { .. })) {
                return Ok(t);
            }
            if let Some(Event::ConnectionFailed { error, .. }) =
                t.events.iter().find(|e| matches!(e, Event::ConnectionFailed { .. }))
            {
                return Err(format!("connection failed: {error}"));
            }
        }
        Err("no Connected event within 20 s".into())
    }

    /// Engine time now.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.origin.elapsed().as_micros() as u64)
    }

    /// One turn: flush, read what is there (waiting up to `wait` for the first message), run
    /// timers, run user code, flush.
    pub fn turn(&mut self, wait: StdDuration) -> Result<(), String> {
        self.flush()?;
        let mut wait = wait;
        if let Some(t) = self.engine.poll_timeout() {
            let until = StdDuration::from_micros(t.as_micros().saturating_sub(self.now().as_micros()));
            wait = wait.min(until);
        }
        for _ in 0..256 {
            if self.closed.is_some() {
                break;
            }
            let msg = match read_one(&mut self.ws, wait) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    let now = self.now();
                    self.engine.handle_transport_closed(now, None, &e);
                    self.closed = Some((None, e));
                    break;
                }
            };
            wait = StdDuration::from_millis(1);
            let now = self.now();
            let r = match msg {
                Message::Text(t) => self.engine.handle_text(now, t.as_str()),
                Message::Binary(b) => {
                    self.binary_in += 1;
                    self.engine.handle_binary(now, &Bytes::from(b.to_vec()))
                }
                Message::Close(c) => {
                    let (code, reason) = c
                        .map(|c| (Some(u16::from(c.code)), c.reason.to_string()))
                        .unwrap_or((None, String::new()));
                    self.engine.handle_transport_closed(now, code, &reason);
                    self.closed = Some((code, reason));
                    Ok(())
                }
                _ => Ok(()),
            };
            if let Err(e) = r {
                self.input_errors.push(e);
            }
            self.events_and_invocations();
        }
        let now = self.now();
        self.engine.handle_timeout(now);
        self.events_and_invocations();
        self.flush()
    }

    fn events_and_invocations(&mut self) {
        while let Some(e) = self.engine.poll_event() {
            match &e {
                Event::CallSettled { id, result } => {
                    self.settled.insert(*id, result.clone());
                }
                Event::Invoke(inv) => {
                    self.invocations.push(inv.clone());
                    let answer = match &mut self.handler {
                        Some(h) => h(inv),
                        None => {
                            Some(Err(RemoteError { message: "no handler".into(), ..RemoteError::default() }))
                        }
                    };
                    match answer {
                        Some(result) => {
                            let now = self.now();
                            let _ = self.engine.reply(now, inv.id, result);
                        }
                        None => self.held.push(inv.clone()),
                    }
                }
                _ => {}
            }
            self.events.push(e);
        }
    }

    /// Answers a held invocation.
    pub fn reply(&mut self, id: InvokeId, result: Result<Value, RemoteError>) {
        self.held.retain(|i| i.id != id);
        let now = self.now();
        self.engine.reply(now, id, result).expect("reply to a held invocation");
        self.events_and_invocations();
    }

    fn flush(&mut self) -> Result<(), String> {
        if self.closed.is_some() {
            return Ok(());
        }
        while let Some(t) = self.engine.poll_transmit() {
            let msg = match t {
                Transmit::Text(s) => Message::text(s),
                Transmit::Binary(b) => {
                    if let Ok(f) = decode_frame(&b, &Limits::default()) {
                        self.sent.push(f);
                    }
                    Message::binary(b.to_vec())
                }
                Transmit::Close { code, reason } => {
                    // Close, then reconnect as a client adapter does (the engine refuses a new
                    // transport once it was closed for good).
                    let _ = self.ws.close(None);
                    let now = self.now();
                    self.engine.handle_transport_closed(now, Some(code), &reason);
                    if let Ok(ws) = open_ws(&self.url, self.max_frame) {
                        if self.engine.handle_transport_open(now).is_ok() {
                            self.ws = ws;
                        }
                    }
                    continue;
                }
            };
            self.ws.send(msg).map_err(|e| format!("send: {e}"))?;
        }
        Ok(())
    }

    /// The result of call `id`, once settled (removed from [`Tap::settled`]).
    pub fn take(&mut self, id: CallId) -> Option<Result<Value, CallError>> {
        self.settled.remove(&id)
    }
}

/// A snapshot of everything an engine holds; each must stay within `Limits` and come back to
/// its baseline after a hostile frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// `Engine::pending_calls`.
    pub pending_calls: usize,
    /// `Engine::active_invocations`.
    pub active_invocations: usize,
    /// `Engine::partial_messages`.
    pub partial_messages: usize,
    /// `Engine::uploads`.
    pub uploads: usize,
    /// `Engine::exports`.
    pub exports: usize,
    /// `Engine::interfaces`.
    pub interfaces: usize,
    /// `Engine::queued_frames`.
    pub queued_frames: usize,
    /// `Engine::open_generators`.
    pub open_generators: usize,
}

/// The counts of `e` now.
pub fn counts(e: &Engine) -> Counts {
    Counts {
        pending_calls: e.pending_calls(),
        active_invocations: e.active_invocations(),
        partial_messages: e.partial_messages(),
        uploads: e.uploads(),
        exports: e.exports(),
        interfaces: e.interfaces(),
        queued_frames: e.queued_frames(),
        open_generators: e.open_generators(),
    }
}
