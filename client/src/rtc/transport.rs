//! The sans-IO WebRTC transport: one str0m peer connection carrying one data channel, with
//! datagrams and the time in, datagrams, channel messages and the next deadline out. The async
//! pump in [`super`] drives it with UDP sockets; tests drive two of them against each other in
//! memory with a virtual clock.
//!
//! It keeps str0m's single-mutation rule (every mutation is followed by a full drain of
//! `poll_output`), queues what the channel does not accept yet (`write → Ok(false)` is
//! backpressure, retried when the buffered amount drops), and knows the peer's largest
//! message (`a=max-message-size`), which the engine chunks to.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event as RtcEvent, IceConnectionState, Input, Output, Rtc};

/// The largest message we accept, advertised in our SDP (`a=max-message-size`).
pub const LOCAL_MAX_MESSAGE: u32 = 1024 * 1024;
/// How much the channel may hold unacknowledged before writes wait.
const MAX_BUFFERED: usize = 4 * 1024 * 1024;
/// Writes resume when the buffered amount falls below this.
const LOW_WATER: usize = 1024 * 1024;
/// The peer's largest message when its SDP does not say (RFC 8841: 64 KiB).
pub const DEFAULT_REMOTE_MAX_MESSAGE: usize = 65_536;

/// What happened on the transport.
#[derive(Debug, PartialEq)]
pub enum TransportEvent {
    /// The data channel is open; `label` is the offerer's peer id.
    Open {
        /// The channel's label.
        label: String,
    },
    /// A binary message arrived on the channel.
    Message(Bytes),
    /// The channel or the connection ended (once; nothing follows).
    Closed {
        /// Why.
        reason: String,
    },
}

/// A datagram to send from local address `source`.
#[derive(Debug)]
pub struct Datagram {
    /// The local address to send from (one of the candidates).
    pub source: SocketAddr,
    /// Where to.
    pub destination: SocketAddr,
    /// The bytes.
    pub contents: Vec<u8>,
}

/// One peer connection with one data channel: the sans-IO core of [`crate::rtc`].
pub struct PeerTransport {
    rtc: Rtc,
    channel: Option<ChannelId>,
    outq: VecDeque<Bytes>,
    queued_bytes: usize,
    datagrams: VecDeque<Datagram>,
    events: VecDeque<TransportEvent>,
    deadline: Option<Instant>,
    remote_max: usize,
    closed: bool,
    /// Datagrams str0m did not accept yet, retried after the next one it does.
    early: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
}

/// How many not-yet-accepted datagrams are kept.
const MAX_EARLY: usize = 8;

impl std::fmt::Debug for PeerTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTransport")
            .field("open", &self.channel.is_some())
            .field("queued", &self.outq.len())
            .field("remote_max", &self.remote_max)
            .field("closed", &self.closed)
            .finish()
    }
}

/// The value of `a=max-message-size` in an SDP: the peer's largest message. Absent: 64 KiB;
/// 0 ("no limit", RFC 8841) or more than `cap`: `cap`.
pub fn max_message_size(sdp: &str, cap: usize) -> usize {
    let found = sdp
        .lines()
        .find_map(|l| l.trim().strip_prefix("a=max-message-size:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match found {
        None => DEFAULT_REMOTE_MAX_MESSAGE.min(cap),
        Some(0) => cap,
        Some(n) => n.min(cap),
    }
}

fn new_rtc(
    now: Instant,
    candidates: &[SocketAddr],
    reflexive: &[(SocketAddr, SocketAddr)],
) -> Result<Rtc, String> {
    let mut builder = Rtc::builder()
        .set_sctp_max_message_size(LOCAL_MAX_MESSAGE)
        .set_sctp_max_buffered_amount(MAX_BUFFERED);
    if !candidates.is_empty() && candidates.iter().all(|a| a.ip().is_loopback()) {
        // Loopback has no path MTU to fear: the largest datagrams str0m allows mean fewer
        // packets, and SCTP's cost is per packet.
        builder = builder.set_mtu(str0m::DATAGRAM_MTU_TARGET_MAX..=str0m::DATAGRAM_MTU_TARGET_MAX);
    }
    let mut rtc = builder.build(now);
    for addr in candidates {
        let c = Candidate::host(*addr, "udp").map_err(|e| format!("bad local candidate {addr}: {e}"))?;
        rtc.add_local_candidate(c);
    }
    for (addr, base) in reflexive {
        match Candidate::server_reflexive(*addr, *base, "udp") {
            Ok(c) => {
                rtc.add_local_candidate(c);
            }
            Err(e) => tracing::debug!(%addr, error = %e, "webrtc: skipped a reflexive candidate"),
        }
    }
    Ok(rtc)
}

impl PeerTransport {
    fn wrap(rtc: Rtc) -> Self {
        PeerTransport {
            rtc,
            channel: None,
            outq: VecDeque::new(),
            queued_bytes: 0,
            datagrams: VecDeque::new(),
            events: VecDeque::new(),
            deadline: None,
            remote_max: DEFAULT_REMOTE_MAX_MESSAGE,
            closed: false,
            early: VecDeque::new(),
        }
    }

    /// The offering side: a connection with host candidates `candidates` (and server-reflexive
    /// ones, `(address, host address it maps)`) and one ordered, reliable data channel
    /// labelled `label`. Returns the SDP offer to send; give the
    /// answer to [`PeerTransport::accept_answer`].
    pub fn offer(
        now: Instant,
        candidates: &[SocketAddr],
        reflexive: &[(SocketAddr, SocketAddr)],
        label: &str,
    ) -> Result<(Self, String, PendingOffer), String> {
        let mut rtc = new_rtc(now, candidates, reflexive)?;
        let mut api = rtc.sdp_api();
        api.add_channel_with_config(ChannelConfig {
            label: label.into(),
            ordered: true,
            ..Default::default()
        });
        let (offer, pending) = api.apply().ok_or("str0m made no offer")?;
        let mut t = Self::wrap(rtc);
        t.drain();
        // We take the DTLS client role (`active`, not `actpass`): the side that is DTLS client
        // starts SCTP in str0m, while aiortc starts it only when it is the ICE-controlling
        // side, so with an aiortc answerer (controlled, and DTLS client if we said actpass)
        // nobody would send SCTP INIT. Browsers and str0m accept an active offerer.
        let sdp = offer.to_sdp_string().replace("a=setup:actpass", "a=setup:active");
        Ok((t, sdp, PendingOffer(pending)))
    }

    /// Applies the answer to our offer.
    pub fn accept_answer(
        &mut self,
        now: Instant,
        pending: PendingOffer,
        sdp: &str,
        cap: usize,
    ) -> Result<(), String> {
        let answer =
            SdpAnswer::from_sdp_string(sdp).map_err(|e| format!("the answer is not valid SDP: {e}"))?;
        self.rtc
            .sdp_api()
            .accept_answer(pending.0, answer)
            .map_err(|e| format!("the answer was refused: {e}"))?;
        self.remote_max = max_message_size(sdp, cap);
        self.drain();
        // ICE starts at the first timeout: now, not when the peer's first check arrives (a
        // peer that knows none of our candidates sends none).
        self.handle_timeout(now);
        Ok(())
    }

    /// The answering side: accepts `offer` with host candidates `candidates` and returns the
    /// answer's SDP.
    pub fn answer(
        now: Instant,
        candidates: &[SocketAddr],
        reflexive: &[(SocketAddr, SocketAddr)],
        offer: &str,
        cap: usize,
    ) -> Result<(Self, String), String> {
        let parsed =
            SdpOffer::from_sdp_string(offer).map_err(|e| format!("the offer is not valid SDP: {e}"))?;
        let mut rtc = new_rtc(now, candidates, reflexive)?;
        let answer = rtc.sdp_api().accept_offer(parsed).map_err(|e| format!("the offer was refused: {e}"))?;
        let mut t = Self::wrap(rtc);
        t.remote_max = max_message_size(offer, cap);
        t.drain();
        t.handle_timeout(now);
        Ok((t, answer.to_sdp_string()))
    }

    /// The peer's largest message (from its SDP, capped); the engine chunks to it.
    pub fn remote_max_message(&self) -> usize {
        self.remote_max
    }

    /// `true` once the channel is open (until it closes).
    pub fn is_open(&self) -> bool {
        self.channel.is_some() && !self.closed
    }

    /// Bytes waiting here for the channel to take them.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Bytes not yet acknowledged by the peer: queued here, or buffered in SCTP.
    pub fn unacknowledged_bytes(&mut self) -> usize {
        let buffered = match self.channel.filter(|_| !self.closed) {
            Some(id) => self.rtc.channel(id).map_or(0, |mut c| c.buffered_amount()),
            None => 0,
        };
        self.drain();
        self.queued_bytes + buffered
    }

    /// A datagram arrived on local address `destination` from `source`. Datagrams that are
    /// not ours (or not valid) are ignored.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) {
        if self.closed {
            return;
        }
        if !self.feed(now, source, destination, data) {
            // Not (yet) ours: DTLS can arrive before our side of ICE has completed (the peer
            // nominated first). Kept briefly and retried, rather than costing a 1 s DTLS
            // retransmission.
            if self.early.len() == MAX_EARLY {
                self.early.pop_front();
            }
            self.early.push_back((source, destination, data.to_vec()));
            return;
        }
        for (s, d, bytes) in std::mem::take(&mut self.early) {
            if !self.feed(now, s, d, &bytes) {
                tracing::trace!(from = %s, "webrtc: dropped an early datagram");
            }
        }
        self.flush();
    }

    /// Hands one datagram to str0m if it takes it; `false` if it does not (yet).
    fn feed(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, data: &[u8]) -> bool {
        let Ok(r) = Receive::new(Protocol::Udp, source, destination, data) else { return true };
        let input = Input::Receive(now, r);
        if !self.rtc.accepts(&input) {
            return false;
        }
        if let Err(e) = self.rtc.handle_input(input) {
            tracing::debug!(error = %e, "webrtc: input refused");
        }
        self.drain();
        true
    }

    /// Time passed: call at [`PeerTransport::poll_timeout`] (early or late is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if let Err(e) = self.rtc.handle_input(Input::Timeout(now)) {
            tracing::debug!(error = %e, "webrtc: timeout input refused");
        }
        self.drain();
        self.flush();
    }

    /// Queues one message for the channel (sent in order, as SCTP accepts them). Messages
    /// above the peer's limit are refused: the engine must chunk below it.
    pub fn send(&mut self, data: Bytes) -> Result<(), String> {
        if self.closed {
            return Err("the data channel is closed".into());
        }
        if data.len() > self.remote_max {
            return Err(format!(
                "a {} byte message exceeds the peer's limit of {}",
                data.len(),
                self.remote_max
            ));
        }
        self.queued_bytes += data.len();
        self.outq.push_back(data);
        self.flush();
        Ok(())
    }

    /// Closes the channel and the connection gracefully (SCTP shutdown, DTLS close_notify),
    /// so the peer sees it at once. The goodbye datagrams are still to be taken with
    /// [`PeerTransport::poll_datagram`].
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        if let Some(id) = self.channel {
            self.rtc.direct_api().close_data_channel(id);
            self.drain();
        }
        if let Err(e) = self.rtc.close() {
            tracing::debug!(error = %e, "webrtc: close");
        }
        self.drain();
        self.finish("closed here");
    }

    /// The next datagram to send.
    pub fn poll_datagram(&mut self) -> Option<Datagram> {
        self.datagrams.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<TransportEvent> {
        self.events.pop_front()
    }

    /// When [`PeerTransport::handle_timeout`] is due (`None` once closed).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed { None } else { self.deadline }
    }

    fn finish(&mut self, reason: &str) {
        if !self.closed {
            self.closed = true;
            self.outq.clear();
            self.queued_bytes = 0;
            self.events.push_back(TransportEvent::Closed { reason: reason.into() });
        }
    }

    /// Writes queued messages while the channel takes them, each write followed by a drain.
    fn flush(&mut self) {
        while let (Some(id), Some(front)) = (self.channel, self.outq.front()) {
            if self.closed {
                return;
            }
            let Some(mut ch) = self.rtc.channel(id) else {
                self.finish("the data channel is gone");
                return;
            };
            match ch.write(true, front) {
                Ok(true) => {
                    let n = front.len();
                    self.outq.pop_front();
                    self.queued_bytes -= n;
                    self.drain();
                }
                Ok(false) => return, // backpressure: retried after input or a timeout
                Err(e) => {
                    self.drain();
                    self.finish(&format!("data channel write failed: {e}"));
                    return;
                }
            }
        }
    }

    /// Drains str0m's output until its next timeout.
    fn drain(&mut self) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.deadline = Some(t);
                    if !self.rtc.is_alive() {
                        // The peer ended DTLS (close_notify) or SCTP: str0m stops quietly.
                        self.finish("the peer closed the connection");
                    }
                    return;
                }
                Ok(Output::Transmit(t)) => self.datagrams.push_back(Datagram {
                    source: t.source,
                    destination: t.destination,
                    contents: t.contents.to_vec(),
                }),
                Ok(Output::Event(e)) => self.on_event(e),
                Err(e) => {
                    self.finish(&format!("webrtc failed: {e}"));
                    self.deadline = None;
                    return;
                }
            }
        }
    }

    fn on_event(&mut self, e: RtcEvent) {
        match e {
            RtcEvent::ChannelOpen(id, label) if self.channel.is_none() => {
                self.channel = Some(id);
                if let Some(mut ch) = self.rtc.channel(id) {
                    ch.set_buffered_amount_low_threshold(LOW_WATER);
                }
                self.events.push_back(TransportEvent::Open { label });
            }
            RtcEvent::ChannelData(d) if Some(d.id) == self.channel && !self.closed => {
                if d.binary {
                    self.events.push_back(TransportEvent::Message(Bytes::from(d.data)));
                } else {
                    tracing::debug!(len = d.data.len(), "webrtc: ignored a text message");
                }
            }
            RtcEvent::ChannelClose(id) if Some(id) == self.channel => {
                self.finish("the peer closed the data channel")
            }
            RtcEvent::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                self.finish("the peer is unreachable (ICE disconnected)")
            }
            _ => {}
        }
    }
}

/// An offer waiting for its answer.
pub struct PendingOffer(SdpPendingOffer);

impl std::fmt::Debug for PendingOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingOffer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn max_message_size_follows_rfc_8841() {
        let cap = 16 << 20;
        assert_eq!(max_message_size("v=0\r\na=max-message-size:262144\r\n", cap), 262_144);
        assert_eq!(max_message_size("v=0\r\n", cap), 65_536);
        assert_eq!(max_message_size("a=max-message-size:0\r\n", cap), cap);
        assert_eq!(max_message_size("a=max-message-size:99999999999\r\n", cap), cap);
        assert_eq!(max_message_size("a=max-message-size:junk\r\n", cap), 65_536);
    }

    #[test]
    fn reflexive_candidates_are_offered_with_their_base() {
        let host: SocketAddr = "10.0.0.5:40001".parse().unwrap();
        let public: SocketAddr = "203.0.113.9:61000".parse().unwrap();
        let (_, offer, _) = PeerTransport::offer(Instant::now(), &[host], &[(public, host)], "p").unwrap();
        assert!(offer.contains("10.0.0.5 40001 typ host"), "{offer}");
        // str0m does not reveal the base (raddr 0.0.0.0), as browsers do not.
        assert!(offer.contains("203.0.113.9 61000 typ srflx"), "{offer}");
    }

    /// Moves datagrams between two transports, advancing a virtual clock to the next deadline
    /// when nothing moves. Returns the events of each side.
    fn pump(
        a: &mut PeerTransport,
        b: &mut PeerTransport,
        now: &mut Instant,
        until_quiet: bool,
    ) -> (Vec<TransportEvent>, Vec<TransportEvent>) {
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        for _ in 0..200_000 {
            let mut moved = false;
            while let Some(d) = a.poll_datagram() {
                moved = true;
                b.handle_datagram(*now, d.source, d.destination, &d.contents);
            }
            while let Some(d) = b.poll_datagram() {
                moved = true;
                a.handle_datagram(*now, d.source, d.destination, &d.contents);
            }
            ea.extend(std::iter::from_fn(|| a.poll_event()));
            eb.extend(std::iter::from_fn(|| b.poll_event()));
            if !moved {
                let next = [a.poll_timeout(), b.poll_timeout()].into_iter().flatten().min();
                let Some(next) = next else { break };
                if until_quiet
                    && a.unacknowledged_bytes() == 0
                    && b.unacknowledged_bytes() == 0
                    && next > *now + Duration::from_millis(50)
                {
                    break;
                }
                *now = next.max(*now);
                a.handle_timeout(*now);
                b.handle_timeout(*now);
            }
        }
        (ea, eb)
    }

    #[test]
    fn two_transports_open_a_channel_and_move_large_data_in_virtual_time() {
        let mut now = Instant::now();
        let (ha, hb): (SocketAddr, SocketAddr) =
            ("127.0.0.1:40001".parse().unwrap(), "127.0.0.1:40002".parse().unwrap());
        let (mut a, offer, pending) = PeerTransport::offer(now, &[ha], &[], "peer-1").unwrap();
        let (mut b, answer) = PeerTransport::answer(now, &[hb], &[], &offer, 16 << 20).unwrap();
        a.accept_answer(now, pending, &answer, 16 << 20).unwrap();
        assert_eq!(a.remote_max_message(), LOCAL_MAX_MESSAGE as usize);
        assert!(
            offer.contains("a=candidate") && answer.contains("a=candidate"),
            "no trickle: candidates in the SDP"
        );
        let (ea, eb) = pump(&mut a, &mut b, &mut now, true);
        assert!(ea.contains(&TransportEvent::Open { label: "peer-1".into() }), "{ea:?}");
        assert!(eb.contains(&TransportEvent::Open { label: "peer-1".into() }), "{eb:?}");
        // 8 MiB in 1 MiB messages, more than the buffered amount: backpressure and resume.
        let msg: Vec<u8> = (0..LOCAL_MAX_MESSAGE as usize).map(|i| (i % 251) as u8).collect();
        for _ in 0..8 {
            a.send(Bytes::from(msg.clone())).unwrap();
        }
        assert!(a.queued_bytes() > 0, "SCTP cannot take 8 MiB at once");
        assert!(a.send(Bytes::from(vec![0; LOCAL_MAX_MESSAGE as usize + 1])).is_err());
        let (_, eb) = pump(&mut a, &mut b, &mut now, true);
        let got: Vec<_> = eb
            .iter()
            .filter_map(|e| if let TransportEvent::Message(m) = e { Some(m) } else { None })
            .collect();
        assert_eq!(got.len(), 8);
        assert!(got.iter().all(|m| m.as_ref() == msg.as_slice()));
        // Closing one side closes the other.
        a.close();
        let (ea, eb) = pump(&mut a, &mut b, &mut now, false);
        assert!(matches!(ea.last(), Some(TransportEvent::Closed { .. })), "{ea:?}");
        assert!(eb.iter().any(|e| matches!(e, TransportEvent::Closed { .. })), "{eb:?}");
    }
}
