//! WebRTC peer-to-peer calls (PROTOCOL.md §13): services reached over a data channel, with the
//! server only in the signaling. Interoperable with hypha-rpc's `register_rtc_service` and
//! `get_rtc_service` (Python on aiortc, JS in browsers), and stricter than them where they are
//! lax.
//!
//! - **Signaling** is hypha-rpc's: the answerer registers `<client_id>-rtc` with one
//!   `offer({sdp, type})` function answering `{sdp, type: "answer", workspace}`. There is no
//!   trickle: both SDPs carry every candidate (host candidates on the configured addresses).
//! - **Framing** is the websocket's: one RPC frame per data-channel message, driven by the same
//!   engine, on a [peer link](hypha_rpc_core::PeerLink). Messages larger than the peer's
//!   `a=max-message-size` (64 KiB when absent) are chunked below it, both ways.
//! - **Trust**: the data channel is unauthenticated, so the caller's identity is taken from the
//!   server's context of the `offer` call. Visibility, `trusted_keys` and `require_context`
//!   work as on the websocket; contexts say `connection_type: "webrtc"`.
//!
//! ```no_run
//! # async fn demo(server: hypha_rpc::Server) -> hypha_rpc::Result<()> {
//! use std::net::Ipv4Addr;
//! use hypha_rpc::rtc::WebRtcConfig;
//! // Answerer: serve our services over WebRTC too.
//! let rtc_id = server.register_rtc_service("my-rtc", WebRtcConfig::default()).await?;
//! // Offerer (usually another client): connect peer to peer, then call.
//! let peer = server.get_rtc_service(&rtc_id, WebRtcConfig::default().host_addresses([Ipv4Addr::LOCALHOST.into()])).await?;
//! let svc = peer.get_service("hello").await?;
//! let s: String = svc.call("greet", ("Ada",)).await?;
//! # Ok(()) }
//! ```

mod transport;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message;
use bytes::Bytes;
use futures::channel::mpsc;
use futures::future::{BoxFuture, Either, FutureExt, poll_fn};
use futures::{Sink, Stream, StreamExt};
use hypha_rpc_core::{ConnectionInfo, Context, PeerLink, Value, Visibility};
use serde::{Deserialize, Serialize};

pub use transport::{
    DEFAULT_REMOTE_MAX_MESSAGE, Datagram, LOCAL_MAX_MESSAGE, PeerTransport, PendingOffer, TransportEvent,
    max_message_size,
};

use crate::driver::{ConnectionState, Inner, Link, new_engine};
use crate::error::{Error, Result};
use crate::runtime::{Runtime, Udp};
use crate::server::{Server, ServiceProxy};
use crate::service::Service;
use crate::values::Locals;

/// Whether to use WebRTC (Python's `webrtc: False | True | "auto"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WebRtc {
    /// Never (the default).
    #[default]
    Off,
    /// Always; failing to set up the peer connection is an error.
    On,
    /// When it can be set up; otherwise the websocket, with a warning in the log saying why.
    Auto,
}

/// How peer connections are made (Python's `webrtc_config`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WebRtcConfig {
    /// The local addresses offered as ICE host candidates, one UDP socket each. Default: the
    /// address of the default route (found without sending anything), or loopback when there
    /// is none. Set `[127.0.0.1]` for peers on the same machine.
    pub host_addresses: Vec<IpAddr>,
    /// The data channel's label on the offering side (the peer id the answerer acts as);
    /// default a random one.
    pub peer_id: Option<String>,
    /// How long the peer connection may take to open. Default 30 s.
    pub connect_timeout: Duration,
    /// For [`Server::register_rtc_service`]: who may ask for a connection. Default protected
    /// (our workspace only), as Python.
    pub visibility: Visibility,
    /// STUN servers, as `stun:host[:port]` URLs (Python's `ice_servers[].urls`): each host
    /// socket asks them for its public address, offered as a server-reflexive candidate.
    /// Default none: unlike hypha-rpc, which falls back to Google's STUN server, nothing is
    /// contacted unless configured. `turn:` URLs are not supported yet (logged and skipped).
    pub ice_servers: Vec<String>,
}

impl Default for WebRtcConfig {
    fn default() -> Self {
        WebRtcConfig {
            host_addresses: Vec::new(),
            peer_id: None,
            connect_timeout: Duration::from_secs(30),
            visibility: Visibility::Protected,
            ice_servers: Vec::new(),
        }
    }
}

impl WebRtcConfig {
    /// Sets [`WebRtcConfig::host_addresses`].
    pub fn host_addresses(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.host_addresses = addrs.into_iter().collect();
        self
    }
    /// Sets [`WebRtcConfig::peer_id`].
    pub fn peer_id(mut self, id: impl Into<String>) -> Self {
        self.peer_id = Some(id.into());
        self
    }
    /// Sets [`WebRtcConfig::connect_timeout`].
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }
    /// Sets [`WebRtcConfig::ice_servers`].
    pub fn ice_servers<S: Into<String>>(mut self, urls: impl IntoIterator<Item = S>) -> Self {
        self.ice_servers = urls.into_iter().map(Into::into).collect();
        self
    }
    /// Sets [`WebRtcConfig::visibility`].
    pub fn visibility(mut self, v: Visibility) -> Self {
        self.visibility = v;
        self
    }

    fn addresses(&self) -> Vec<IpAddr> {
        if !self.host_addresses.is_empty() {
            return self.host_addresses.clone();
        }
        // Connecting a UDP socket only picks a route; no packet leaves.
        let routed = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .and_then(|s| s.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).and_then(|_| s.local_addr()))
            .map(|a| a.ip())
            .ok()
            .filter(|ip| !ip.is_unspecified());
        vec![routed.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))]
    }
}

/// `{sdp, type}` as both sides of the signaling write it.
#[derive(Debug, Serialize, Deserialize)]
struct Description {
    sdp: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    workspace: Option<String>,
}

/// A peer id must be usable as a client id.
fn valid_peer_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

// ---- the UDP pump --------------------------------------------------------------------------

enum LinkCmd {
    Send(Bytes),
    Close,
}

/// Datagrams taken from a socket per wake-up, at most.
const MAX_BURST: usize = 64;

/// Stop reading datagrams while this much received data waits for the driver: the peer then
/// meets SCTP's flow control, and a slow engine never makes us hold an unbounded queue.
const MAX_INBOUND: usize = 8 * 1024 * 1024;

/// Received bytes the pump handed over and the driver has not taken yet.
#[derive(Default)]
struct Inbound {
    bytes: std::sync::atomic::AtomicUsize,
    /// The pump, waiting for the driver to take some.
    waker: futures::task::AtomicWaker,
}

impl Inbound {
    fn full(&self) -> bool {
        self.bytes.load(std::sync::atomic::Ordering::Acquire) >= MAX_INBOUND
    }
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
    }
    fn take(&self, n: usize) {
        let before = self.bytes.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
        if before >= MAX_INBOUND && before - n < MAX_INBOUND {
            self.waker.wake();
        }
    }
}

/// Stop reading the driver's messages while this much waits for the channel.
const MAX_QUEUED: usize = 2 * 1024 * 1024;

/// UDP sockets and their local addresses, in the same order.
type Sockets = (Vec<Box<dyn Udp>>, Vec<SocketAddr>);

/// Binds one UDP socket per address and returns them with their local addresses.
fn bind(rt: &dyn Runtime, addrs: &[IpAddr]) -> Result<Sockets> {
    let mut sockets = Vec::new();
    let mut locals = Vec::new();
    for ip in addrs {
        let s = rt
            .bind_udp(SocketAddr::new(*ip, 0))
            .map_err(|e| Error::Transport(format!("webrtc: cannot bind UDP on {ip}: {e}")))?;
        locals.push(s.local_addr().map_err(|e| Error::Transport(e.to_string()))?);
        sockets.push(s);
    }
    Ok((sockets, locals))
}

/// How long STUN servers get to answer, in all.
const STUN_TIMEOUT: Duration = Duration::from_millis(1500);

/// `stun:host[:port]` → the host and port (3478 by default); `None` for anything else.
fn stun_host(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("stun:")?;
    let rest = rest.split('?').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        let port = after.strip_prefix(':').map_or(Some(3478), |p| p.parse().ok())?;
        return Some((h.to_string(), port));
    }
    match rest.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((rest.to_string(), 3478)),
    }
}

/// Resolves STUN server URLs off the async runtime (the lookup blocks).
async fn resolve_stun(urls: &[String]) -> Vec<SocketAddr> {
    let mut hosts = Vec::new();
    for url in urls {
        match stun_host(url) {
            Some(h) => hosts.push(h),
            None => tracing::warn!(%url, "webrtc: only stun: ICE servers are supported; skipped"),
        }
    }
    if hosts.is_empty() {
        return Vec::new();
    }
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::spawn(move || {
        use std::net::ToSocketAddrs;
        let addrs: Vec<SocketAddr> = hosts
            .iter()
            .flat_map(|(h, p)| (h.as_str(), *p).to_socket_addrs().into_iter().flatten())
            .collect();
        let _ = tx.send(addrs);
    });
    rx.await.unwrap_or_default()
}

/// Asks each STUN server, from each host socket of the same address family, for the address
/// it sees us at (RFC 8489 Binding, retried at 250 and 750 ms). Returns `(reflexive address,
/// host address)` pairs that differ from the host address.
async fn gather_reflexive(
    rt: &Arc<dyn Runtime>,
    sockets: &[Box<dyn Udp>],
    locals: &[SocketAddr],
    servers: &[SocketAddr],
) -> Vec<(SocketAddr, SocketAddr)> {
    use str0m::ice::StunMessage;
    let mut asks = Vec::new(); // (socket index, server, transaction id)
    for (i, local) in locals.iter().enumerate() {
        for server in servers.iter().filter(|s| s.is_ipv4() == local.is_ipv4()) {
            let mut id = [0u8; 12];
            id.iter_mut().for_each(|b| *b = fastrand::u8(..));
            asks.push((i, *server, id));
        }
    }
    if asks.is_empty() {
        return Vec::new();
    }
    let request = |id: &[u8; 12]| {
        let mut r = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        r.extend_from_slice(id);
        r
    };
    let mut found: Vec<(SocketAddr, SocketAddr)> = Vec::new();
    let mut answered = vec![false; asks.len()];
    let started = Instant::now();
    let mut buf = vec![0u8; 1500];
    for round in [Duration::ZERO, Duration::from_millis(250), Duration::from_millis(750)] {
        if answered.iter().all(|a| *a) || started.elapsed() >= STUN_TIMEOUT {
            break;
        }
        for (k, (i, server, id)) in asks.iter().enumerate() {
            if !answered[k] {
                let _ = poll_fn(|cx| sockets[*i].poll_send_to(cx, &request(id), *server)).await;
            }
        }
        let until = (round + Duration::from_millis(250)).max(Duration::from_millis(250));
        let mut wait = rt.sleep(until.min(STUN_TIMEOUT.saturating_sub(started.elapsed())));
        loop {
            let got = poll_fn(|cx| {
                for (i, s) in sockets.iter().enumerate() {
                    if let Poll::Ready(Ok((n, from))) = s.poll_recv_from(cx, &mut buf) {
                        return Poll::Ready(Some((i, n, from)));
                    }
                }
                if wait.poll_unpin(cx).is_ready() { Poll::Ready(None) } else { Poll::Pending }
            })
            .await;
            let Some((i, n, from)) = got else { break };
            let Ok(msg) = StunMessage::parse(&buf[..n]) else { continue };
            // The transaction id is bytes 8..20 of the header.
            let tid = &buf[8..20];
            let Some(k) =
                asks.iter().position(|(si, srv, id)| *si == i && *srv == from && tid == id.as_slice())
            else {
                continue;
            };
            answered[k] = true;
            if let Some(mapped) =
                msg.mapped_address().filter(|m| *m != locals[i] && msg.is_successful_binding_response())
            {
                if !found.contains(&(mapped, locals[i])) {
                    found.push((mapped, locals[i]));
                }
            }
            if answered.iter().all(|a| *a) {
                break;
            }
        }
    }
    tracing::debug!(?found, asked = asks.len(), "webrtc: server-reflexive candidates");
    found
}

/// Runs a [`PeerTransport`] over UDP sockets until it closes: datagrams and timers in,
/// datagrams out, channel messages to `events`, the driver's messages from `cmds`.
async fn pump(
    rt: Arc<dyn Runtime>,
    mut t: PeerTransport,
    sockets: Vec<Box<dyn Udp>>,
    locals: Vec<SocketAddr>,
    mut cmds: mpsc::Receiver<LinkCmd>,
    events: mpsc::UnboundedSender<TransportEvent>,
    inbound: Arc<Inbound>,
) {
    enum Wake {
        Datagram(usize, usize, SocketAddr),
        Timer,
        Cmd(Option<LinkCmd>),
    }
    let mut buf = vec![0u8; 2048];
    let mut timer: Option<(Instant, BoxFuture<'static, ()>)> = None;
    let mut cmds_open = true;
    loop {
        while let Some(d) = t.poll_datagram() {
            let Some(i) = locals.iter().position(|a| *a == d.source) else { continue };
            if let Err(e) = poll_fn(|cx| sockets[i].poll_send_to(cx, &d.contents, d.destination)).await {
                tracing::debug!(error = %e, to = %d.destination, "webrtc: send failed");
            }
        }
        let mut closed = false;
        while let Some(e) = t.poll_event() {
            closed |= matches!(e, TransportEvent::Closed { .. });
            if let TransportEvent::Message(m) = &e {
                inbound.add(m.len());
            }
            let _ = events.unbounded_send(e);
        }
        if closed {
            return;
        }
        // str0m moves its deadline with nearly every packet. A timer due no later than the
        // new deadline is kept (waking early is harmless: str0m re-arms), so timers are not
        // re-created per datagram.
        match t.poll_timeout() {
            None => timer = None,
            Some(d) if timer.as_ref().is_some_and(|(x, _)| *x <= d) => {}
            Some(d) => timer = Some((d, rt.sleep(d.saturating_duration_since(Instant::now())))),
        }
        let take_cmds = cmds_open && t.queued_bytes() < MAX_QUEUED;
        let wake = poll_fn(|cx| {
            // While the driver is behind, datagrams wait in the kernel (and then the peer).
            inbound.waker.register(cx.waker());
            let readable = if inbound.full() { &sockets[..0] } else { &sockets[..] };
            for (i, s) in readable.iter().enumerate() {
                loop {
                    match s.poll_recv_from(cx, &mut buf) {
                        Poll::Ready(Ok((n, from))) => return Poll::Ready(Wake::Datagram(i, n, from)),
                        // ICMP errors (a peer port that went away) surface here: skip them.
                        Poll::Ready(Err(e)) => tracing::trace!(error = %e, "webrtc: receive error"),
                        Poll::Pending => break,
                    }
                }
            }
            if take_cmds {
                if let Poll::Ready(c) = cmds.poll_next_unpin(cx) {
                    return Poll::Ready(Wake::Cmd(c));
                }
            }
            if let Some((_, f)) = timer.as_mut() {
                if f.poll_unpin(cx).is_ready() {
                    timer = None;
                    return Poll::Ready(Wake::Timer);
                }
            }
            Poll::Pending
        })
        .await;
        match wake {
            Wake::Datagram(i, n, from) => {
                let now = Instant::now();
                t.handle_datagram(now, from, locals[i], &buf[..n]);
                // Take what else already waits on that socket (one wake-up per burst).
                let waker = futures::task::noop_waker();
                let mut cx = TaskContext::from_waker(&waker);
                for _ in 0..MAX_BURST {
                    if inbound.full() {
                        break;
                    }
                    match sockets[i].poll_recv_from(&mut cx, &mut buf) {
                        Poll::Ready(Ok((n, from))) => t.handle_datagram(now, from, locals[i], &buf[..n]),
                        _ => break,
                    }
                }
            }
            Wake::Timer => t.handle_timeout(Instant::now()),
            Wake::Cmd(Some(LinkCmd::Send(b))) => {
                if let Err(e) = t.send(b) {
                    tracing::warn!(error = %e, "webrtc: message not sent; closing the peer connection");
                    t.close();
                }
            }
            Wake::Cmd(Some(LinkCmd::Close)) => t.close(),
            Wake::Cmd(None) => {
                cmds_open = false;
                t.close();
            }
        }
    }
}

/// The data channel as the driver sees a transport: a stream of messages and a sink for ours.
struct ChannelLink {
    events: mpsc::UnboundedReceiver<TransportEvent>,
    inbound: Arc<Inbound>,
    cmds: mpsc::Sender<LinkCmd>,
}

impl Stream for ChannelLink {
    type Item = core::result::Result<Message, String>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        loop {
            return match self.events.poll_next_unpin(cx) {
                Poll::Ready(Some(TransportEvent::Message(b))) => {
                    self.inbound.take(b.len());
                    Poll::Ready(Some(Ok(Message::Binary(b))))
                }
                Poll::Ready(Some(TransportEvent::Closed { reason })) => Poll::Ready(Some(Err(reason))),
                Poll::Ready(Some(TransportEvent::Open { .. })) => continue,
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

impl Sink<Message> for ChannelLink {
    type Error = String;
    fn poll_ready(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<core::result::Result<(), String>> {
        self.cmds.poll_ready(cx).map_err(|_| "the peer connection is closed".to_string())
    }
    fn start_send(mut self: Pin<&mut Self>, m: Message) -> core::result::Result<(), String> {
        let cmd = match m {
            Message::Binary(b) => LinkCmd::Send(b),
            Message::Close(_) => LinkCmd::Close,
            _ => return Ok(()),
        };
        self.cmds.start_send(cmd).map_err(|_| "the peer connection is closed".to_string())
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<core::result::Result<(), String>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<core::result::Result<(), String>> {
        self.cmds.close_channel();
        Poll::Ready(Ok(()))
    }
}

impl Link for ChannelLink {
    type RecvError = String;
    type SendError = String;
}

/// Starts the pump of `t` and waits until its channel opens (or `timeout`). Returns the
/// channel's label and the link for the driver.
async fn open(
    rt: &Arc<dyn Runtime>,
    t: PeerTransport,
    sockets: Vec<Box<dyn Udp>>,
    locals: Vec<SocketAddr>,
    timeout: Duration,
) -> Result<(String, ChannelLink)> {
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let (ev_tx, mut ev_rx) = mpsc::unbounded();
    let inbound = Arc::new(Inbound::default());
    rt.spawn(Box::pin(pump(rt.clone(), t, sockets, locals, cmd_rx, ev_tx, inbound.clone())));
    let first = futures::future::select(ev_rx.next(), rt.sleep(timeout)).await;
    match first {
        Either::Left((Some(TransportEvent::Open { label }), _)) => {
            Ok((label, ChannelLink { events: ev_rx, inbound, cmds: cmd_tx }))
        }
        Either::Left((Some(TransportEvent::Closed { reason }), _)) => {
            Err(Error::Transport(format!("webrtc: the peer connection failed: {reason}")))
        }
        Either::Left((_, _)) => Err(Error::Transport("webrtc: the peer connection ended".into())),
        Either::Right(_) => {
            drop(cmd_tx); // the pump closes the connection
            Err(Error::Transport(format!("webrtc: the data channel did not open within {timeout:?}")))
        }
    }
}

// ---- the two roles ---------------------------------------------------------------------------

/// A peer connection made with [`Server::get_rtc_service`]: the remote client's services,
/// reached over a WebRTC data channel. Cheap to clone.
#[derive(Clone)]
pub struct RtcPeer {
    inner: Arc<Inner>,
    info: Arc<ConnectionInfo>,
    /// `ws/peer_id`: who answers on the channel.
    peer: String,
    max_message: usize,
}

impl std::fmt::Debug for RtcPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RtcPeer({})", self.peer)
    }
}

impl RtcPeer {
    /// Gets service `name` (a local id, no `:` or `/`) of the peer, over the channel.
    pub async fn get_service(&self, name: &str) -> Result<ServiceProxy> {
        if name.is_empty() || name.contains([':', '/']) {
            return Err(Error::InvalidArgument(format!(
                "{name:?}: give the service's local id (without workspace or client)"
            )));
        }
        let peer = self.peer.clone();
        let rx = self.inner.start(Locals::default(), |e, now| e.get_peer_service(now, &peer, name))?;
        let v = Inner::settle(rx).await?;
        ServiceProxy::from_value(self.inner.clone(), v, name)
    }
    /// Like [`RtcPeer::get_service`], with calls end-to-end encrypted for `public_key` (the
    /// provider's, 64 hex characters), as [`Server::get_encrypted_service`] does on the
    /// websocket. Needs [`ServerConfig::encryption`](crate::ServerConfig::encryption).
    pub async fn get_encrypted_service(&self, name: &str, public_key: &str) -> Result<ServiceProxy> {
        let key = hypha_rpc_core::crypto::key_from_hex(public_key).ok_or_else(|| {
            Error::InvalidArgument(format!("public key {public_key:?} is not 64 hex characters"))
        })?;
        if self.inner.lock().engine.public_key().is_none() {
            return Err(Error::InvalidArgument(
                "encryption is off: connect with ServerConfig::encryption(true)".into(),
            ));
        }
        let mut proxy = self.get_service(name).await?;
        crate::server::attach_key(&mut proxy.info, &key);
        Ok(proxy)
    }
    /// The peer's workspace (from the answer).
    pub fn workspace(&self) -> &str {
        &self.info.workspace
    }
    /// The channel's label: the id the peer acts as on the channel.
    pub fn peer_id(&self) -> &str {
        self.peer.rsplit('/').next().unwrap_or(&self.peer)
    }
    /// The peer's largest message (its `a=max-message-size`); larger ones are chunked.
    pub fn max_message_size(&self) -> usize {
        self.max_message
    }
    /// `true` until the channel closes.
    pub fn is_connected(&self) -> bool {
        self.inner.lock().engine.is_ready()
    }
    /// The channel's state changes from now on (ends with `Closed`).
    pub fn connection_states(&self) -> impl Stream<Item = ConnectionState> + Send + Unpin + use<> {
        self.inner.subscribe()
    }
    /// Closes the peer connection; calls in flight fail.
    pub async fn disconnect(&self) {
        self.inner.shutdown().await;
    }
}

/// A link's config: the connection's, never reconnecting.
fn link_config(server: &Inner) -> crate::ServerConfig {
    let mut c = server.config.clone();
    c.reconnect = false;
    c
}

/// The cap on the peer's advertised message size: our own frame limit.
fn cap(server: &Inner) -> usize {
    server.config.limits.max_frame_bytes.max(DEFAULT_REMOTE_MAX_MESSAGE)
}

/// Answers an offer: the answerer's half of the signaling, run by the `offer` function.
async fn answer(
    server: Weak<Inner>,
    config: WebRtcConfig,
    ctx: Context,
    desc: Description,
) -> Result<Description> {
    let server = server.upgrade().ok_or(Error::Closed)?;
    if desc.kind != "offer" {
        return Err(Error::InvalidArgument(format!("expected an offer, got {:?}", desc.kind)));
    }
    let rt = server.rt.clone();
    let (sockets, locals) = bind(&*rt, &config.addresses())?;
    let servers = resolve_stun(&config.ice_servers).await;
    let reflexive = gather_reflexive(&rt, &sockets, &locals, &servers).await;
    let (t, sdp) = PeerTransport::answer(Instant::now(), &locals, &reflexive, &desc.sdp, cap(&server))
        .map_err(|e| Error::InvalidArgument(format!("webrtc: {e}")))?;
    let remote_max = t.remote_max_message();
    let workspace = server.lock().engine.connection_info().map(|i| i.workspace.clone()).unwrap_or_default();
    // Everything on the channel counts as coming from the caller the server vouched for.
    let link = PeerLink {
        workspace: workspace.clone(),
        peer_workspace: ctx.ws.clone(),
        peer_user: ctx.user.clone(),
    };
    let services: Vec<_> = {
        let s = server.lock();
        // All of them, the rtc service included: hypha-rpc offerers connected with `webrtc`
        // may call `offer` over an existing channel to open another.
        s.services
            .iter()
            .filter_map(|(id, h)| s.engine.service(id).map(|spec| (spec.clone(), h.clone())))
            .collect()
    };
    let caller = ctx.from.clone();
    let timeout = config.connect_timeout;
    let server_done = server.done.clone();
    rt.clone().spawn(Box::pin(async move {
        let (label, channel) = match open(&rt, t, sockets, locals, timeout).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, %caller, "webrtc: an offered connection did not open");
                return;
            }
        };
        if !valid_peer_id(&label) {
            tracing::warn!(%caller, label, "webrtc: refused a data channel whose label is not a valid peer id");
            return;
        }
        let mut config = link_config(&server);
        config.limits.max_frame_bytes = config.limits.max_frame_bytes.max(remote_max);
        let engine = new_engine(&config, label.clone(), Some((link, remote_max)));
        drop(server);
        match Inner::connect_link(rt.clone(), config, engine, channel, services).await {
            Ok((link, _)) => {
                tracing::info!(%caller, peer = %label, "webrtc: serving a peer connection");
                tie(&rt, server_done, &link);
            }
            Err(e) => tracing::warn!(error = %e, %caller, "webrtc: the peer link failed"),
        }
    }));
    Ok(Description { sdp, kind: "answer".into(), workspace: Some(workspace) })
}

/// Ends `link` when the server connection that made it ends (unless it ended first).
fn tie(
    rt: &Arc<dyn Runtime>,
    server_done: futures::future::Shared<futures::channel::oneshot::Receiver<()>>,
    link: &Arc<Inner>,
) {
    let link_done = link.done.clone();
    let weak = Arc::downgrade(link);
    rt.spawn(Box::pin(async move {
        if let Either::Left(_) = futures::future::select(server_done, link_done).await {
            if let Some(link) = weak.upgrade() {
                link.shutdown().await;
            }
        }
    }));
}

impl Server {
    /// Serves our services over WebRTC too (Python `register_rtc_service`): registers
    /// `service_id` with one `offer` function through which peers set up a data channel to
    /// us. Returns its full id, which offerers pass to [`Server::get_rtc_service`]. Peers
    /// get the services registered at the time they connect.
    pub async fn register_rtc_service(&self, service_id: &str, config: WebRtcConfig) -> Result<String> {
        let weak = Arc::downgrade(&self.inner);
        let visibility = config.visibility;
        let svc = Service::new(service_id)
            .visibility(visibility)
            .function_with_context("offer", move |ctx: Context, desc: Description| {
                answer(weak.clone(), config.clone(), ctx, desc)
            });
        self.register_service(svc).await
    }

    /// Connects peer to peer with the client serving `rtc_service_id` (a
    /// [`Server::register_rtc_service`] id, `ws/client:client-rtc`; Python
    /// `get_rtc_service`). The returned peer's [`RtcPeer::get_service`] works over the data
    /// channel.
    pub async fn get_rtc_service(&self, rtc_service_id: &str, config: WebRtcConfig) -> Result<RtcPeer> {
        let signaling = self.get_service(rtc_service_id).await?;
        // The answerer's workspace, as the server told it (the id of what it returned).
        let peer_ws = signaling
            .id()
            .split_once('/')
            .map(|(ws, _)| ws.to_string())
            .unwrap_or_else(|| self.workspace().to_string());
        let peer_id = config.peer_id.clone().unwrap_or_else(|| format!("rs-{:016x}", fastrand::u64(..)));
        if !valid_peer_id(&peer_id) {
            return Err(Error::InvalidArgument(format!("peer id {peer_id:?}: use letters, digits, - and _")));
        }
        let rt = self.inner.rt.clone();
        let (sockets, locals) = bind(&*rt, &config.addresses())?;
        let servers = resolve_stun(&config.ice_servers).await;
        let reflexive = gather_reflexive(&rt, &sockets, &locals, &servers).await;
        let (mut t, sdp, pending) = PeerTransport::offer(Instant::now(), &locals, &reflexive, &peer_id)
            .map_err(|e| Error::Transport(format!("webrtc: {e}")))?;
        tracing::debug!(%sdp, "webrtc: our offer");
        let offer = Description { sdp, kind: "offer".into(), workspace: None };
        let answer: Description = signaling.call("offer", (offer,)).await?;
        tracing::debug!(sdp = %answer.sdp, "webrtc: the answer");
        if answer.kind != "answer" {
            return Err(Error::Decode(format!("webrtc: expected an answer, got {:?}", answer.kind)));
        }
        t.accept_answer(Instant::now(), pending, &answer.sdp, cap(&self.inner))
            .map_err(|e| Error::Transport(format!("webrtc: {e}")))?;
        let remote_max = t.remote_max_message();
        let (_, channel) = open(&rt, t, sockets, locals, config.connect_timeout).await?;
        let workspace = answer.workspace.unwrap_or_else(|| peer_ws.clone());
        let link =
            PeerLink { workspace: workspace.clone(), peer_workspace: peer_ws.clone(), peer_user: Value::Nil };
        let mut lconfig = link_config(&self.inner);
        lconfig.limits.max_frame_bytes = lconfig.limits.max_frame_bytes.max(remote_max);
        let engine = new_engine(&lconfig, format!("rs-{:016x}", fastrand::u64(..)), Some((link, remote_max)));
        let (inner, info) = Inner::connect_link(rt.clone(), lconfig, engine, channel, Vec::new()).await?;
        tie(&rt, self.inner.done.clone(), &inner);
        Ok(RtcPeer {
            inner,
            info: Arc::new(info),
            peer: format!("{peer_ws}/{peer_id}"),
            max_message: remote_max,
        })
    }

    /// Gets a service over WebRTC when `mode` says so (Python `get_service(id, {"webrtc":
    /// ...})`): with [`WebRtc::On`] or [`WebRtc::Auto`], `id` (`ws/client:svc`) is fetched
    /// from its provider's `<client>-rtc` service over a data channel; `Auto` falls back to the
    /// websocket (and logs why). [`WebRtc::Off`] is the plain websocket, always (Python 0.21.47
    /// tries WebRTC even then). Peer connections are made with
    /// [`ServerConfig::webrtc_config`](crate::ServerConfig::webrtc_config); one per provider is
    /// kept and reused.
    pub async fn get_service_with(&self, id: &str, mode: WebRtc) -> Result<ServiceProxy> {
        let svc = self.get_service(id).await?;
        if mode == WebRtc::Off {
            return Ok(svc);
        }
        let config = self.inner.config.webrtc_config.clone();
        match self.rtc_fetch(&svc, config).await {
            Ok(p) => Ok(p),
            Err(e) if mode == WebRtc::Auto => {
                tracing::warn!(error = %e, service = %svc.id(), "webrtc unavailable; using the websocket");
                Ok(svc)
            }
            Err(e) => Err(Error::Transport(format!("Failed to get the service via webrtc: {e}"))),
        }
    }

    async fn rtc_fetch(&self, svc: &ServiceProxy, config: WebRtcConfig) -> Result<ServiceProxy> {
        let full = svc.id();
        let (provider, name) = full
            .rsplit_once(':')
            .ok_or_else(|| Error::InvalidArgument(format!("{full}: not a ws/client:service id")))?;
        let (ws, client) = provider
            .split_once('/')
            .ok_or_else(|| Error::InvalidArgument(format!("{full}: no workspace")))?;
        let name = name.split_once('@').map_or(name, |(n, _)| n);
        let rtc_id = format!("{ws}/{client}:{client}-rtc");
        let cached = self.inner.rtc_peers().get(&rtc_id).filter(|p| p.is_connected()).cloned();
        let peer = match cached {
            Some(p) => p,
            None => {
                let p = self.get_rtc_service(&rtc_id, config).await?;
                self.inner.rtc_peers().insert(rtc_id, p.clone());
                p
            }
        };
        peer.get_service(name).await
    }
}

impl Inner {
    fn rtc_peers(&self) -> std::sync::MutexGuard<'_, HashMap<String, RtcPeer>> {
        self.rtc.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_pump_stops_reading_at_the_inbound_cap_and_is_woken_below_it() {
        let inbound = Inbound::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        inbound.waker.register(&std::task::Waker::from(count.clone()));
        inbound.add(MAX_INBOUND - 1);
        assert!(!inbound.full());
        inbound.add(2);
        assert!(inbound.full(), "at the cap the pump stops reading datagrams");
        inbound.take(1);
        assert!(inbound.full());
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "still at the cap: no wake-up");
        inbound.take(1);
        assert!(!inbound.full());
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the driver took enough: the pump reads again");
    }

    #[test]
    fn stun_urls_parse_as_hypha_rpc_writes_them() {
        assert_eq!(stun_host("stun:stun.l.google.com:19302"), Some(("stun.l.google.com".into(), 19302)));
        assert_eq!(stun_host("stun:127.0.0.1"), Some(("127.0.0.1".into(), 3478)));
        assert_eq!(stun_host("stun:[::1]:3479"), Some(("::1".into(), 3479)));
        assert_eq!(stun_host("turn:relay.example:3478"), None);
        assert_eq!(stun_host("stun:host:notaport"), None);
    }
}
