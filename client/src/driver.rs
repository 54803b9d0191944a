//! The runtime-agnostic driver: owns the [`Engine`], feeds it websocket messages and the time,
//! sends what it emits, runs user functions for its `Invoke` events, settles the futures of
//! pending calls, and reconnects with backoff. Written once for every runtime.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use futures::SinkExt;
use futures::channel::{mpsc, oneshot};
use futures::future::{BoxFuture, FutureExt, poll_fn};
use futures::stream::StreamExt;
use futures::task::AtomicWaker;
use hypha_rpc_core::codec::rtype::{
    Generator as GeneratorDesc, Method, RTypeCodec, RemoteError, StopIteration,
};
use hypha_rpc_core::time::Instant;
use hypha_rpc_core::{
    CallError, CallId, CallOptions, ConnectionInfo, Engine, EngineError, Event, FnId, GenId, GeneratorReader,
    InvokeId, InvokeTarget, Map, Value,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Endpoint, ServerConfig};
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use crate::service::{Call, DynHandler, Reply};
use crate::values::{Incoming, Locals, check_map, check_sendable, from_value_in, to_value_with_locals};
use crate::ws::{self, Socket};

/// What the connection is doing, as told by [`Server::connection_states`](crate::Server).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connected and registered; after a reconnection our services are registered again.
    Connected {
        /// `true` for every connection after the first.
        reconnected: bool,
    },
    /// The connection dropped; calls in flight wait for the reconnection or their timeout.
    Disconnected {
        /// Why, as far as we know.
        reason: String,
    },
    /// Waiting `delay` before reconnection attempt `attempt`.
    Reconnecting {
        /// 1 for the first attempt after a drop.
        attempt: u32,
        /// The backoff delay.
        delay: Duration,
    },
    /// The server refused us for good (for example an expired token): no more attempts.
    Failed {
        /// What the server said.
        error: String,
    },
    /// [`Server::disconnect`](crate::Server::disconnect) was called, or reconnection is off.
    Closed,
}

/// A wake-up flag for the driver task.
struct Notify {
    flag: AtomicBool,
    waker: AtomicWaker,
}

impl Notify {
    fn notify(&self) {
        self.flag.store(true, Ordering::Release);
        self.waker.wake();
    }
    fn poll(&self, cx: &mut TaskContext<'_>) -> Poll<()> {
        if self.flag.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.flag.swap(false, Ordering::AcqRel) { Poll::Ready(()) } else { Poll::Pending }
    }
}

enum Waiter {
    Once(oneshot::Sender<Result<Value, CallError>>),
    Reader(u64),
}

struct ReaderSlot {
    reader: GeneratorReader,
    waker: Option<Waker>,
}

/// The functions of one service, by dotted path.
pub(crate) type Handlers = HashMap<String, Arc<dyn DynHandler>>;

pub(crate) struct Shared {
    pub(crate) engine: Engine,
    waiters: HashMap<CallId, Waiter>,
    call_functions: HashMap<CallId, Vec<FnId>>,
    functions: HashMap<FnId, Arc<dyn DynHandler>>,
    producers: HashMap<GenId, mpsc::UnboundedSender<InvokeId>>,
    readers: HashMap<u64, ReaderSlot>,
    next_reader: u64,
    pub(crate) services: HashMap<String, Arc<Handlers>>,
    ready: Option<oneshot::Sender<Result<ConnectionInfo>>>,
    listeners: Vec<mpsc::UnboundedSender<ConnectionState>>,
    closing: bool,
    give_up: bool,
    ever_connected: bool,
    /// When the current connection completed its handshake.
    connected_since: Option<std::time::Instant>,
    tasks: Vec<BoxFuture<'static, ()>>,
}

pub(crate) struct Inner {
    shared: Mutex<Shared>,
    wake: Notify,
    pub(crate) rt: Arc<dyn Runtime>,
    epoch: std::time::Instant,
    pub(crate) config: ServerConfig,
    /// Peer connections made by `get_service_with`, by `-rtc` service id, for reuse.
    #[cfg(feature = "webrtc")]
    pub(crate) rtc: Mutex<HashMap<String, crate::rtc::RtcPeer>>,
    /// The server; `None` on a peer link, which never reconnects.
    endpoint: Option<Endpoint>,
    /// Completes when the driver has stopped for good.
    pub(crate) done: futures::future::Shared<oneshot::Receiver<()>>,
}

/// What the drive loop needs of a transport: a stream of received messages and a sink for
/// ours (the server websocket, or a WebRTC data channel dressed as one).
pub(crate) trait Link:
    futures::Stream<Item = core::result::Result<Message, Self::RecvError>>
    + futures::Sink<Message, Error = Self::SendError>
    + Unpin
    + Send
    + 'static
{
    type RecvError: std::fmt::Display;
    type SendError: std::fmt::Display;
}

impl Link for Socket {
    type RecvError = async_tungstenite::tungstenite::Error;
    type SendError = async_tungstenite::tungstenite::Error;
}

fn remote_error(message: impl Into<String>) -> RemoteError {
    RemoteError { message: message.into(), trace: None, other: Map::new() }
}

/// The backoff before reconnection attempt `attempt` (1-based): 1 s doubling to 60 s, with
/// ±25 % jitter so that many clients cut off together do not come back together.
pub(crate) fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = 2f64.powi(attempt.saturating_sub(1).min(6) as i32).min(60.0);
    Duration::from_secs_f64(base * (0.75 + 0.5 * jitter.clamp(0.0, 1.0)))
}

/// A connection that completed the handshake and then lived at least this long resets the
/// backoff; ones that fail or die sooner escalate it (no reconnect storms against a server
/// that accepts and then drops us). A server restarted again and again is not a storm: each
/// good connection starts the backoff over.
const STABLE_AFTER: Duration = Duration::from_secs(2);

enum Wake {
    /// Messages, a poke or a timer: run the engine.
    Input,
    /// The socket ended (close frame, error or EOF), with the close code and reason.
    Ended((Option<u16>, String)),
}

/// An engine as `config` says, for client `client_id`, on the server or on a peer link.
/// A peer link comes with the peer's largest message, which chunks must stay below.
pub(crate) fn new_engine(
    config: &ServerConfig,
    client_id: String,
    peer: Option<(hypha_rpc_core::PeerLink, usize)>,
) -> Engine {
    let mut ec = hypha_rpc_core::EngineConfig::new(client_id);
    match peer {
        None => {
            ec.workspace = config.workspace.clone();
            ec.token = config.token.clone();
        }
        Some((link, max_message)) => {
            ec.peer = Some(link);
            ec.transport_max_message = max_message;
        }
    }
    ec.method_timeout = config.method_timeout;
    ec.limits = config.limits.clone();
    ec.seed = config.seed.unwrap_or_else(|| fastrand::u64(..));
    // Handlers run as tasks, so a reply never comes within the same input: without a delay
    // every call would cost a heartbeat frame.
    ec.first_heartbeat_after = Duration::from_millis(200);
    let mut engine = Engine::new(ec, Instant::ZERO);
    if config.encryption {
        use hypha_rpc_core::crypto::NaclBox;
        let rng = rand_core::OsRng;
        let crypto = match config.encryption_secret_key {
            Some(secret) => NaclBox::from_secret(secret, rng),
            None => NaclBox::generate(rng),
        };
        engine.set_crypto(Box::new(crypto));
    }
    engine
}

/// Messages taken from the socket in one go before the engine runs.
const MAX_BATCH: usize = 64;

/// Hands received messages to the engine (bad ones are dropped by it, and logged).
fn feed(engine: &mut Engine, now: Instant, inbox: &mut Vec<Message>) {
    for m in inbox.drain(..) {
        match m {
            Message::Text(t) => {
                if let Err(e) = engine.handle_text(now, t.as_str()) {
                    tracing::debug!(error = %e, "ignored a text frame");
                }
            }
            Message::Binary(b) => {
                let _ = engine.handle_binary(now, &b);
            }
            _ => {}
        }
    }
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as u64)
    }

    fn spawn_tasks(&self, s: &mut Shared) {
        for t in s.tasks.drain(..) {
            self.rt.spawn(t);
        }
    }

    /// Wakes the driver so it sends what the engine queued.
    pub(crate) fn poke(&self) {
        self.wake.notify();
    }

    /// Starts a connection: opens the websocket, spawns the driver and waits for the
    /// handshake.
    pub(crate) async fn connect(
        rt: Arc<dyn Runtime>,
        config: ServerConfig,
    ) -> Result<(Arc<Inner>, ConnectionInfo)> {
        let endpoint = crate::config::parse_server_url(&config.server_url)?;
        let mut config = config;
        let client_id = config.client_id.clone().unwrap_or_else(|| format!("rs-{:016x}", fastrand::u64(..)));
        if config.encryption && config.encryption_secret_key.is_none() {
            // Chosen here so that peer links (WebRTC) can hold the same key pair.
            let mut secret = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut secret);
            config.encryption_secret_key = Some(secret);
        }
        let engine = new_engine(&config, client_id, None);
        let socket = ws::connect(&*rt, &endpoint, &config.limits, &config.extra_root_certificates).await?;
        let (inner, ready, done_tx) = Inner::new(rt.clone(), config, engine, Some(endpoint));
        let driver = inner.clone();
        rt.spawn(Box::pin(async move {
            driver.run(socket).await;
            let _ = done_tx.send(());
        }));
        let info = ready.await.map_err(|_| Error::Closed)??;
        Ok((inner, info))
    }

    /// Runs `engine` (configured with [`EngineConfig::peer`](hypha_rpc_core::EngineConfig))
    /// over an open peer link, until the link ends or [`Inner::shutdown`].
    #[cfg(feature = "webrtc")]
    pub(crate) async fn connect_link<L: Link>(
        rt: Arc<dyn Runtime>,
        config: ServerConfig,
        engine: Engine,
        link: L,
        services: Vec<(hypha_rpc_core::ServiceSpec, Arc<Handlers>)>,
    ) -> Result<(Arc<Inner>, ConnectionInfo)> {
        let (inner, ready, done_tx) = Inner::new(rt.clone(), config, engine, None);
        {
            let mut s = inner.lock();
            let now = inner.now();
            for (spec, handlers) in services {
                let id = spec.id.clone();
                s.engine.register_service(now, spec)?;
                s.services.insert(id, handlers);
            }
            // The registrations settle at once, with nobody waiting.
            while s.engine.poll_event().is_some() {}
        }
        let driver = inner.clone();
        rt.spawn(Box::pin(async move {
            driver.connection(link).await;
            driver.close_for_good();
            let _ = done_tx.send(());
        }));
        let info = ready.await.map_err(|_| Error::Closed)??;
        Ok((inner, info))
    }

    #[allow(clippy::type_complexity)]
    fn new(
        rt: Arc<dyn Runtime>,
        config: ServerConfig,
        engine: Engine,
        endpoint: Option<Endpoint>,
    ) -> (Arc<Inner>, oneshot::Receiver<Result<ConnectionInfo>>, oneshot::Sender<()>) {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let inner = Arc::new(Inner {
            shared: Mutex::new(Shared {
                engine,
                waiters: HashMap::new(),
                call_functions: HashMap::new(),
                functions: HashMap::new(),
                producers: HashMap::new(),
                readers: HashMap::new(),
                next_reader: 0,
                services: HashMap::new(),
                ready: Some(ready_tx),
                listeners: Vec::new(),
                closing: false,
                give_up: false,
                ever_connected: false,
                connected_since: None,
                tasks: Vec::new(),
            }),
            wake: Notify { flag: AtomicBool::new(false), waker: AtomicWaker::new() },
            rt,
            epoch: std::time::Instant::now(),
            config,
            #[cfg(feature = "webrtc")]
            rtc: Mutex::new(HashMap::new()),
            endpoint,
            done: done_rx.shared(),
        });
        (inner, ready_rx, done_tx)
    }

    /// Asks the driver to close for good and waits until it has.
    pub(crate) async fn shutdown(&self) {
        self.lock().closing = true;
        self.poke();
        let _ = self.done.clone().await;
    }

    pub(crate) fn subscribe(&self) -> mpsc::UnboundedReceiver<ConnectionState> {
        let (tx, rx) = mpsc::unbounded();
        self.lock().listeners.push(tx);
        rx
    }

    fn broadcast(s: &mut Shared, state: ConnectionState) {
        s.listeners.retain(|l| l.unbounded_send(state.clone()).is_ok());
    }

    // ---- the drive loop --------------------------------------------------------------------

    async fn run(self: Arc<Self>, first: Socket) {
        let mut socket = Some(first);
        let mut attempt = 0u32;
        loop {
            if let Some(sock) = socket.take() {
                self.connection(sock).await;
                let lived = self.lock().connected_since.take().map(|t| t.elapsed());
                if lived.is_some_and(|d| d >= STABLE_AFTER) {
                    attempt = 0;
                }
            }
            {
                let s = self.lock();
                if s.closing || s.give_up || !self.config.reconnect {
                    break;
                }
            }
            attempt = attempt.saturating_add(1);
            let delay = backoff(attempt, fastrand::f64());
            tracing::info!(attempt, ?delay, "reconnecting");
            Self::broadcast(&mut self.lock(), ConnectionState::Reconnecting { attempt, delay });
            if !self.idle(Some(delay)).await {
                break;
            }
            let Some(endpoint) = &self.endpoint else { break };
            let limits = &self.config.limits;
            match ws::connect(&*self.rt, endpoint, limits, &self.config.extra_root_certificates).await {
                Ok(sock) => socket = Some(sock),
                Err(e) => tracing::warn!(error = %e, attempt, "reconnection failed"),
            }
        }
        self.close_for_good();
    }

    /// Closed for good: every pending call fails, generators and interfaces are dropped.
    fn close_for_good(self: &Arc<Self>) {
        let mut s = self.lock();
        let now = self.now();
        s.engine.close(now);
        let mut sink = Vec::new();
        self.pump(&mut s, &mut sink);
        if let Some(r) = s.ready.take() {
            let _ = r.send(Err(Error::Closed));
        }
        Self::broadcast(&mut s, ConnectionState::Closed);
        s.listeners.clear();
        s.functions.clear();
        s.producers.clear();
        s.services.clear();
        self.spawn_tasks(&mut s);
    }

    /// Waits without a connection (`delay`, or until closing when `None`), still running the
    /// engine's timers so calls time out. Returns `false` when closing.
    async fn idle(self: &Arc<Self>, delay: Option<Duration>) -> bool {
        let mut sleep = delay.map(|d| self.rt.sleep(d));
        let mut timer: Option<(Instant, BoxFuture<'static, ()>)> = None;
        loop {
            let deadline = {
                let mut s = self.lock();
                if s.closing {
                    return false;
                }
                let mut sink = Vec::new();
                let (deadline, _) = self.pump(&mut s, &mut sink);
                self.spawn_tasks(&mut s);
                deadline
            };
            self.arm(&mut timer, deadline);
            let woke = poll_fn(|cx| {
                if let Some(s) = sleep.as_mut() {
                    if s.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(true);
                    }
                }
                if self.wake.poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                if let Some((_, t)) = timer.as_mut() {
                    if t.as_mut().poll(cx).is_ready() {
                        timer = None;
                        return Poll::Ready(false);
                    }
                }
                Poll::Pending
            })
            .await;
            if woke {
                return !self.lock().closing;
            }
        }
    }

    /// Keeps the timer when it fires no later than the new deadline (an early wake-up only
    /// costs a check): the engine's earliest deadline moves with almost every call
    /// (heartbeats, timeouts), and a runtime timer per move is most of a call's overhead.
    fn arm(&self, timer: &mut Option<(Instant, BoxFuture<'static, ()>)>, deadline: Option<Instant>) {
        match deadline {
            None => *timer = None,
            Some(d) if timer.as_ref().is_some_and(|(t, _)| *t <= d) => {}
            Some(d) => {
                let wait = d.saturating_duration_since(self.now());
                *timer = Some((d, self.rt.sleep(wait)));
            }
        }
    }

    async fn connection<L: Link>(self: &Arc<Self>, mut socket: L) {
        {
            let mut s = self.lock();
            let now = self.now();
            if s.engine.handle_transport_open(now).is_err() {
                return;
            }
        }
        let mut out = Vec::new();
        let mut inbox: Vec<Message> = Vec::new();
        let mut timer: Option<(Instant, BoxFuture<'static, ()>)> = None;
        loop {
            // One lock for everything that arrived and everything it causes.
            let (deadline, close) = {
                let mut s = self.lock();
                let now = self.now();
                feed(&mut s.engine, now, &mut inbox);
                if s.closing {
                    s.engine.close(now);
                }
                let r = self.pump(&mut s, &mut out);
                self.spawn_tasks(&mut s);
                r
            };
            let mut failed = None;
            for m in out.drain(..) {
                if let Err(e) = socket.feed(m).await {
                    failed = Some(e.to_string());
                    break;
                }
            }
            if failed.is_none() {
                if let Err(e) = socket.flush().await {
                    failed = Some(e.to_string());
                }
            }
            if let Some(reason) = failed {
                out.clear();
                self.closed(None, &format!("send failed: {reason}"));
                return;
            }
            if let Some((code, reason)) = close {
                let frame = CloseFrame { code: code.into(), reason: reason.clone().into() };
                let _ = socket.send(Message::Close(Some(frame))).await;
                let _ = SinkExt::close(&mut socket).await;
                self.closed(Some(code), &reason);
                return;
            }
            self.arm(&mut timer, deadline);
            // Wait for input; take every message that is already there (up to a batch), so a
            // burst costs one lock, one engine drain and one flush.
            let wake = poll_fn(|cx| {
                let mut ended = None;
                while inbox.len() < MAX_BATCH {
                    match socket.poll_next_unpin(cx) {
                        Poll::Ready(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => inbox.push(m),
                        Poll::Ready(Some(Ok(Message::Close(frame)))) => {
                            ended = Some(match frame {
                                Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
                                None => (None, String::new()),
                            });
                            break;
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => {
                            ended = Some((None, e.to_string()));
                            break;
                        }
                        Poll::Ready(None) => {
                            ended = Some((None, "the connection was closed".into()));
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
                if let Some(e) = ended {
                    return Poll::Ready(Wake::Ended(e));
                }
                if !inbox.is_empty() {
                    return Poll::Ready(Wake::Input);
                }
                if self.wake.poll(cx).is_ready() {
                    return Poll::Ready(Wake::Input);
                }
                if let Some((_, t)) = timer.as_mut() {
                    if t.as_mut().poll(cx).is_ready() {
                        timer = None;
                        return Poll::Ready(Wake::Input);
                    }
                }
                Poll::Pending
            })
            .await;
            if let Wake::Ended((code, reason)) = wake {
                // Frames that came before the close still count.
                if !inbox.is_empty() {
                    let now = self.now();
                    feed(&mut self.lock().engine, now, &mut inbox);
                }
                self.closed(code, &reason);
                return;
            }
        }
    }

    fn closed(self: &Arc<Self>, code: Option<u16>, reason: &str) {
        let mut s = self.lock();
        let now = self.now();
        s.engine.handle_transport_closed(now, code, reason);
        let mut sink = Vec::new();
        self.pump(&mut s, &mut sink);
        self.spawn_tasks(&mut s);
    }

    /// Runs due timers and drains the engine: messages into `out`, events acted upon.
    /// Returns the next deadline and a close request.
    fn pump(
        self: &Arc<Self>,
        s: &mut Shared,
        out: &mut Vec<Message>,
    ) -> (Option<Instant>, Option<(u16, String)>) {
        let now = self.now();
        if s.engine.poll_timeout().is_some_and(|t| t <= now) {
            s.engine.handle_timeout(now);
        }
        let mut close = None;
        loop {
            let mut busy = false;
            while let Some(e) = s.engine.poll_event() {
                busy = true;
                self.on_event(s, e, now);
            }
            while let Some(t) = s.engine.poll_transmit() {
                busy = true;
                match t {
                    hypha_rpc_core::Transmit::Text(text) => out.push(Message::text(text)),
                    hypha_rpc_core::Transmit::Binary(b) => out.push(Message::Binary(b)),
                    hypha_rpc_core::Transmit::Close { code, reason } => close = Some((code, reason)),
                }
            }
            if !busy {
                break;
            }
        }
        (s.engine.poll_timeout(), close)
    }

    fn on_event(self: &Arc<Self>, s: &mut Shared, event: Event, now: Instant) {
        match event {
            Event::Connected { info, reconnected } => {
                tracing::info!(workspace = %info.workspace, client = %info.client_id, reconnected, "connected");
                s.ever_connected = true;
                s.connected_since = Some(std::time::Instant::now());
                if let Some(r) = s.ready.take() {
                    let _ = r.send(Ok(info));
                }
                Self::broadcast(s, ConnectionState::Connected { reconnected });
            }
            Event::ConnectionFailed { error, permanent } => {
                tracing::warn!(%error, permanent, "connection attempt failed");
                if let Some(r) = s.ready.take() {
                    s.give_up = true;
                    let _ = r.send(Err(error.into()));
                } else if permanent {
                    s.give_up = true;
                    Self::broadcast(s, ConnectionState::Failed { error: error.to_string() });
                }
            }
            Event::Disconnected { reason, .. } => {
                tracing::info!(%reason, "disconnected");
                Self::broadcast(s, ConnectionState::Disconnected { reason });
            }
            Event::CallSettled { id, result } => {
                if let Some(fs) = s.call_functions.remove(&id) {
                    for f in fs {
                        s.functions.remove(&f);
                    }
                }
                match s.waiters.remove(&id) {
                    Some(Waiter::Once(tx)) => {
                        let _ = tx.send(result);
                    }
                    Some(Waiter::Reader(r)) => {
                        if let Some(slot) = s.readers.get_mut(&r) {
                            slot.reader.handle_settled(id, result);
                            if let Some(w) = slot.waker.take() {
                                w.wake();
                            }
                        }
                    }
                    None => {}
                }
            }
            Event::Invoke(inv) => {
                let handler = match &inv.target {
                    InvokeTarget::Service { service, function } => {
                        s.services.get(service).and_then(|h| h.get(function)).cloned()
                    }
                    InvokeTarget::Callback { function, .. }
                    | InvokeTarget::Returned { function }
                    | InvokeTarget::Interface { function, .. } => s.functions.get(function).cloned(),
                    InvokeTarget::GeneratorNext { generator } => {
                        let sent =
                            s.producers.get(generator).is_some_and(|p| p.unbounded_send(inv.id).is_ok());
                        if !sent {
                            let _ = s.engine.reply(now, inv.id, Err(remote_error("the generator is closed")));
                        }
                        return;
                    }
                    _ => None,
                };
                let Some(handler) = handler else {
                    let _ = s.engine.reply(now, inv.id, Err(remote_error("function not found")));
                    return;
                };
                let id = inv.id;
                let call = Call {
                    args: inv.args,
                    kwargs: inv.kwargs,
                    context: inv.context,
                    incoming: Some(Incoming { client: self.clone(), parent: inv.session }),
                };
                let client = self.clone();
                s.tasks.push(Box::pin(async move {
                    let r = AssertUnwindSafe(async move { handler.call(call).await }).catch_unwind().await;
                    let r = r.unwrap_or_else(|_| Err(remote_error("the function panicked")));
                    client.finish(id, r);
                }));
            }
            Event::GeneratorClosed { generator } => {
                s.producers.remove(&generator);
            }
            Event::InterfaceDisposed { functions, .. } | Event::FunctionsReleased { functions } => {
                for f in functions {
                    s.functions.remove(&f);
                }
            }
            Event::ServiceRestoreFailed { service, error } => {
                tracing::warn!(%service, %error, "a service could not be registered again after reconnecting");
            }
            other => tracing::debug!(event = ?other, "event"),
        }
    }

    // ---- the user side ---------------------------------------------------------------------

    /// Puts local functions and generators found in outgoing data where invocations find them.
    fn install(self: &Arc<Self>, s: &mut Shared, locals: Locals, call: Option<CallId>) {
        for (id, h) in locals.functions {
            s.functions.insert(id, h);
            if let Some(c) = call {
                s.call_functions.entry(c).or_default().push(id);
            }
        }
        for (gid, mut stream) in locals.generators {
            let (tx, mut rx) = mpsc::unbounded::<InvokeId>();
            s.producers.insert(gid, tx);
            let client = self.clone();
            // One task per generator answers pulls in the order they came.
            s.tasks.push(Box::pin(async move {
                while let Some(inv) = rx.next().await {
                    let item = AssertUnwindSafe(stream.next()).catch_unwind().await;
                    let (reply, end) = match item {
                        Ok(Some(Ok(v))) => (Ok(v), false),
                        Ok(Some(Err(message))) => (Err(remote_error(message)), false),
                        Ok(None) => (Ok(StopIteration.to_value()), true),
                        Err(_) => (Err(remote_error("the generator panicked")), true),
                    };
                    client.reply(inv, reply);
                    if end {
                        client.lock().producers.remove(&gid);
                        break;
                    }
                }
            }));
        }
    }

    /// Answers an invocation with what a user function returned.
    fn finish(self: &Arc<Self>, id: InvokeId, reply: Reply) {
        let mut s = self.lock();
        let now = self.now();
        let r = match reply {
            Ok((v, locals)) => {
                self.install(&mut s, locals, None);
                s.engine.reply(now, id, Ok(v))
            }
            Err(e) => s.engine.reply(now, id, Err(e)),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not send a reply");
            let _ = s.engine.reply(now, id, Err(remote_error(format!("the reply could not be sent: {e}"))));
        }
        self.spawn_tasks(&mut s);
        drop(s);
        self.poke();
    }

    fn reply(self: &Arc<Self>, id: InvokeId, r: core::result::Result<Value, RemoteError>) {
        let mut s = self.lock();
        let now = self.now();
        if let Err(e) = s.engine.reply(now, id, r) {
            tracing::debug!(error = %e, "generator reply not sent");
        }
        drop(s);
        self.poke();
    }

    /// Issues an engine command that makes a call and returns the future of its result.
    pub(crate) fn start(
        self: &Arc<Self>,
        locals: Locals,
        f: impl FnOnce(&mut Engine, Instant) -> core::result::Result<CallId, EngineError>,
    ) -> Result<oneshot::Receiver<core::result::Result<Value, CallError>>> {
        let mut s = self.lock();
        if s.closing {
            return Err(Error::Closed);
        }
        let now = self.now();
        let id = f(&mut s.engine, now)?;
        self.install(&mut s, locals, Some(id));
        let (tx, rx) = oneshot::channel();
        s.waiters.insert(id, Waiter::Once(tx));
        self.spawn_tasks(&mut s);
        drop(s);
        self.poke();
        Ok(rx)
    }

    /// Waits for a call started with [`Inner::start`].
    pub(crate) async fn settle(
        rx: oneshot::Receiver<core::result::Result<Value, CallError>>,
    ) -> Result<Value> {
        Ok(rx.await.map_err(|_| Error::Closed)??)
    }

    pub(crate) async fn call_values(
        self: &Arc<Self>,
        method: &Method,
        args: Vec<Value>,
        kwargs: Option<Map>,
        parent: Option<String>,
    ) -> Result<Value> {
        args.iter().try_for_each(check_sendable)?;
        if let Some(k) = &kwargs {
            check_map(k)?;
        }
        let options = CallOptions { parent, ..CallOptions::default() };
        let rx = self.start(Locals::default(), |e, now| e.call(now, method, args, kwargs, options))?;
        Self::settle(rx).await
    }

    pub(crate) async fn call_typed<T: DeserializeOwned, A: Serialize + ?Sized, K: Serialize + ?Sized>(
        self: &Arc<Self>,
        method: &Method,
        args: &A,
        kwargs: Option<&K>,
        parent: Option<String>,
    ) -> Result<T> {
        let (args, kwargs, locals) = encode_args(args, kwargs)?;
        let options = CallOptions { parent, ..CallOptions::default() };
        let rx = self.start(locals, |e, now| e.call(now, method, args, kwargs, options))?;
        let v = Self::settle(rx).await?;
        self.decode(&v)
    }

    /// Converts a result, binding remote functions inside it to this client.
    pub(crate) fn decode<T: DeserializeOwned>(self: &Arc<Self>, v: &Value) -> Result<T> {
        from_value_in(v, &Incoming { client: self.clone(), parent: None })
    }

    pub(crate) fn poll_generator(
        self: &Arc<Self>,
        desc: &GeneratorDesc,
        reader: &mut Option<u64>,
        prefetch: usize,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Value>>> {
        let mut s = self.lock();
        let rid = match *reader {
            Some(r) => r,
            None => {
                let r = s.next_reader;
                s.next_reader += 1;
                let slot = ReaderSlot { reader: GeneratorReader::new(desc.clone(), prefetch), waker: None };
                s.readers.insert(r, slot);
                *reader = Some(r);
                r
            }
        };
        let now = self.now();
        let Shared { readers, engine, waiters, .. } = &mut *s;
        let Some(slot) = readers.get_mut(&rid) else { return Poll::Ready(None) };
        if let Some(item) = slot.reader.poll_item() {
            if let Err(e) = &item {
                if !matches!(e, CallError::Remote { .. }) {
                    // The producer is unreachable (timeout, gone, server restarted): the stream
                    // ends after this error instead of pulling into the void forever. Errors the
                    // producer raised leave it open, as in Python.
                    if let Some(mut slot) = readers.remove(&rid) {
                        let _ = slot.reader.close(engine, now);
                    }
                }
            }
            return Poll::Ready(Some(item.map_err(Error::from)));
        }
        if slot.reader.is_finished() {
            // Keep `reader` set: the stream ended, nothing to close on drop.
            readers.remove(&rid);
            return Poll::Ready(None);
        }
        if let Err(e) = slot.reader.pump(engine, now) {
            return Poll::Ready(Some(Err(e.into())));
        }
        for id in slot.reader.in_flight_ids() {
            waiters.entry(id).or_insert(Waiter::Reader(rid));
        }
        slot.waker = Some(cx.waker().clone());
        drop(s);
        self.poke();
        Poll::Pending
    }

    pub(crate) fn close_generator(self: &Arc<Self>, rid: u64) {
        let mut s = self.lock();
        let now = self.now();
        if let Some(mut slot) = s.readers.remove(&rid) {
            let _ = slot.reader.close(&mut s.engine, now);
        }
        drop(s);
        self.poke();
    }

    pub(crate) fn close_unread_generator(self: &Arc<Self>, desc: &GeneratorDesc) {
        let mut s = self.lock();
        if s.closing {
            return;
        }
        let now = self.now();
        let _ = s.engine.generator_close(now, desc);
        drop(s);
        self.poke();
    }
}

/// Positional arguments (a tuple, a single value, or `()`), keyword arguments (a map) and the
/// local objects inside them.
pub(crate) fn encode_args<A: Serialize + ?Sized, K: Serialize + ?Sized>(
    args: &A,
    kwargs: Option<&K>,
) -> Result<(Vec<Value>, Option<Map>, Locals)> {
    let (v, mut locals) = to_value_with_locals(args)?;
    let args = match v {
        Value::Array(a) => a,
        Value::Nil => Vec::new(),
        other => vec![other],
    };
    let kwargs = match kwargs {
        None => None,
        Some(k) => {
            let (kv, more) = to_value_with_locals(k)?;
            locals.functions.extend(more.functions);
            locals.generators.extend(more.generators);
            match kv {
                Value::Map(m) => Some(m),
                Value::Nil => None,
                other => {
                    return Err(Error::Encode(format!(
                        "keyword arguments must be a map, not {}",
                        other.kind()
                    )));
                }
            }
        }
    };
    Ok((args, kwargs, locals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute_with_bounded_jitter() {
        let mid: Vec<f64> = (1..=9).map(|a| backoff(a, 0.5).as_secs_f64()).collect();
        assert_eq!(mid, vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]);
        for attempt in [1, 3, 7, 1000] {
            let lo = backoff(attempt, 0.0).as_secs_f64();
            let hi = backoff(attempt, 1.0).as_secs_f64();
            let base = backoff(attempt, 0.5).as_secs_f64();
            assert!(
                (lo - base * 0.75).abs() < 1e-9 && (hi - base * 1.25).abs() < 1e-9,
                "{attempt}: {lo} {hi}"
            );
        }
        assert_eq!(backoff(0, 0.5), Duration::from_secs(1));
    }

    #[test]
    fn notify_wakes_once_per_notification() {
        let n = Notify { flag: AtomicBool::new(false), waker: AtomicWaker::new() };
        let waker = futures::task::noop_waker();
        let mut cx = TaskContext::from_waker(&waker);
        assert!(n.poll(&mut cx).is_pending());
        n.notify();
        n.notify();
        assert!(n.poll(&mut cx).is_ready());
        assert!(n.poll(&mut cx).is_pending());
    }
}
