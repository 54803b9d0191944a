//! A blocking websocket driver for one engine (tungstenite over std TcpStream), so tests can
//! run the sans-IO engine against the real Hypha server before the async client exists.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration as StdDuration, Instant as StdInstant};

use bytes::Bytes;
use hypha_rpc_core::codec::rtype::RemoteError;
use hypha_rpc_core::time::Instant;
use hypha_rpc_core::{CallError, CallId, Engine, EngineConfig, Event, Invocation, Transmit, Value};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// User code for incoming calls: `(invocation) -> result`.
pub type Handler = Box<dyn FnMut(&Invocation) -> Result<Value, RemoteError>>;

/// One engine on one real websocket, driven synchronously.
pub struct WsClient {
    /// The engine.
    pub engine: Engine,
    ws: WebSocket<TcpStream>,
    origin: StdInstant,
    /// Settled calls by id.
    pub settled: BTreeMap<CallId, Result<Value, CallError>>,
    /// Every event seen, in order (calls settled are also in `settled`).
    pub events: Vec<Event>,
    /// Handler for all invocations.
    pub handler: Option<Handler>,
}

impl WsClient {
    /// Connects to `ws_url` (`ws://127.0.0.1:PORT/ws`) and drives the handshake until the
    /// engine reports `Connected` (or fails).
    pub fn connect(ws_url: &str, config: EngineConfig) -> Result<WsClient, String> {
        let addr = ws_url.trim_start_matches("ws://").split('/').next().unwrap_or_default().to_string();
        let stream = TcpStream::connect(&addr).map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).ok();
        let mut wsc = WebSocketConfig::default();
        wsc.max_message_size = Some(config.limits.max_frame_bytes);
        let (ws, _) = tungstenite::client::client_with_config(ws_url, stream, Some(wsc))
            .map_err(|e| format!("websocket handshake: {e}"))?;
        let origin = StdInstant::now();
        let mut engine = Engine::new(config, Instant::ZERO);
        engine.handle_transport_open(Instant::ZERO).map_err(|e| e.to_string())?;
        let mut c =
            WsClient { engine, ws, origin, settled: BTreeMap::new(), events: Vec::new(), handler: None };
        let deadline = StdInstant::now() + StdDuration::from_secs(20);
        while StdInstant::now() < deadline {
            c.turn(StdDuration::from_millis(50))?;
            if c.events.iter().any(|e| matches!(e, Event::Connected { .. })) {
                return Ok(c);
            }
            if let Some(Event::ConnectionFailed { error, .. }) =
                c.events.iter().find(|e| matches!(e, Event::ConnectionFailed { .. }))
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

    /// One turn: flush output, wait up to `wait` (or the engine's next deadline) for one
    /// message, feed it, run timers, answer invocations.
    pub fn turn(&mut self, wait: StdDuration) -> Result<(), String> {
        self.flush()?;
        let now = self.now();
        let until_deadline = self
            .engine
            .poll_timeout()
            .map(|t| StdDuration::from_micros(t.as_micros().saturating_sub(now.as_micros())))
            .unwrap_or(wait);
        let wait = wait.min(until_deadline).max(StdDuration::from_millis(1));
        self.ws.get_ref().set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
        match self.ws.read() {
            Ok(Message::Text(t)) => {
                let now = self.now();
                let _ = self.engine.handle_text(now, t.as_str());
            }
            Ok(Message::Binary(b)) => {
                let now = self.now();
                let _ = self.engine.handle_binary(now, &Bytes::from(b.to_vec()));
            }
            Ok(Message::Close(c)) => {
                let now = self.now();
                let (code, reason) = c
                    .map(|c| (Some(u16::from(c.code)), c.reason.to_string()))
                    .unwrap_or((None, String::new()));
                self.engine.handle_transport_closed(now, code, &reason);
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("websocket: {e}")),
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
                    let result = match &mut self.handler {
                        Some(h) => h(inv),
                        None => Err(RemoteError { message: "no handler".into(), ..RemoteError::default() }),
                    };
                    let now = self.now();
                    let _ = self.engine.reply(now, inv.id, result);
                }
                _ => {}
            }
            self.events.push(e);
        }
    }

    fn flush(&mut self) -> Result<(), String> {
        while let Some(t) = self.engine.poll_transmit() {
            let msg = match t {
                Transmit::Text(s) => Message::text(s),
                Transmit::Binary(b) => Message::binary(b.to_vec()),
                Transmit::Close { .. } => {
                    let _ = self.ws.close(None);
                    continue;
                }
            };
            self.ws.send(msg).map_err(|e| format!("send: {e}"))?;
        }
        Ok(())
    }

    /// Drives until call `id` settles (or `timeout` passes).
    pub fn wait(&mut self, id: CallId, timeout: StdDuration) -> Result<Value, CallError> {
        let deadline = StdInstant::now() + timeout;
        while StdInstant::now() < deadline {
            if let Some(r) = self.settled.remove(&id) {
                return r;
            }
            if let Err(e) = self.turn(StdDuration::from_millis(20)) {
                panic!("driver failed while waiting for {id:?}: {e}");
            }
        }
        panic!("call {id:?} did not settle within {timeout:?}");
    }

    /// Drives for `d`.
    pub fn run_for(&mut self, d: StdDuration) {
        let deadline = StdInstant::now() + d;
        while StdInstant::now() < deadline {
            self.turn(StdDuration::from_millis(20)).expect("driver");
        }
    }
}
