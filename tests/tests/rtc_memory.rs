//! Two engines talking over two real WebRTC stacks (str0m: ICE, DTLS, SCTP) wired together in
//! memory with a virtual clock: the whole peer-to-peer path without sockets or waiting. Calls,
//! a callback, a generator, the context and a 50 MB payload each way, then a close. The
//! engines are on [peer links](hypha_rpc_core::PeerLink) and chunk to the transport's
//! `max-message-size`, as the async client sets them up.

use std::net::SocketAddr;
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use hypha_rpc::rtc::{PeerTransport, TransportEvent};
use hypha_rpc_core::codec::rtype::{Generator, Method, RTypeCodec};
use hypha_rpc_core::engine::{is_stop_iteration, local_function, local_generator};
use hypha_rpc_core::time::Instant;
use hypha_rpc_core::{
    CallError, CallId, CallOptions, Engine, EngineConfig, Event, FnId, FunctionSpec, GenId, InvokeId,
    InvokeTarget, Map, PeerLink, RequireContext, ServiceSpec, Transmit, Value,
};

/// One side: an engine on a transport.
struct Side {
    engine: Engine,
    rtc: PeerTransport,
    open: bool,
    closed: bool,
    settled: Vec<(CallId, Result<Value, CallError>)>,
}

struct World {
    a: Side,
    b: Side,
    start: StdInstant,
    now: StdInstant,
    /// A's `twice` waiting for B's callback: (A's call to the callback, the invocation).
    twice: Vec<(CallId, InvokeId)>,
    /// A's generator: items left.
    gen_left: u32,
    /// B's callback calls.
    cb_calls: u32,
}

fn engine_time(w_start: StdInstant, now: StdInstant) -> Instant {
    Instant::from_micros(now.duration_since(w_start).as_micros() as u64)
}

fn link(ws: &str, peer_ws: &str, user: Value) -> PeerLink {
    PeerLink { workspace: ws.into(), peer_workspace: peer_ws.into(), peer_user: user }
}

impl World {
    fn new() -> World {
        let start = StdInstant::now();
        let (ha, hb): (SocketAddr, SocketAddr) =
            ("127.0.0.1:50001".parse().unwrap(), "127.0.0.1:50002".parse().unwrap());
        // B offers (the caller), A answers (the service), as with `get_rtc_service`.
        let (mut rb, offer, pending) = PeerTransport::offer(start, &[hb], &[], "peer-b").unwrap();
        let (ra, answer) = PeerTransport::answer(start, &[ha], &[], &offer, 64 << 20).unwrap();
        rb.accept_answer(start, pending, &answer, 64 << 20).unwrap();
        let user = Value::Map(Map::from_iter([("id", Value::from("bob"))]));
        let mut ca = EngineConfig::new("peer-b");
        ca.peer = Some(link("ws-a", "ws-a", user));
        ca.transport_max_message = ra.remote_max_message();
        let mut cb = EngineConfig::new("offerer");
        cb.peer = Some(link("ws-a", "ws-a", Value::Nil));
        cb.transport_max_message = rb.remote_max_message();
        let t0 = Instant::ZERO;
        let mut a = Engine::new(ca, t0);
        let spec = ServiceSpec::new("svc")
            .require_context(RequireContext::Functions(vec!["whoami".into()]))
            .function("echo", FunctionSpec::new("echo"))
            .function("whoami", FunctionSpec::new("whoami"))
            .function("len", FunctionSpec::new("len"))
            .function("make", FunctionSpec::new("make"))
            .function("twice", FunctionSpec::new("twice"))
            .function("count", FunctionSpec::new("count"));
        a.register_service(t0, spec).unwrap();
        let side = |engine, rtc| Side { engine, rtc, open: false, closed: false, settled: Vec::new() };
        World {
            a: side(a, ra),
            b: side(Engine::new(cb, t0), rb),
            start,
            now: start,
            twice: Vec::new(),
            gen_left: 0,
            cb_calls: 0,
        }
    }

    fn t(&self) -> Instant {
        engine_time(self.start, self.now)
    }

    /// One round: datagrams across, channel messages into the engines, engine output into the
    /// channels, invocations answered. Returns whether anything moved.
    fn step(&mut self) -> bool {
        let mut moved = false;
        let now = self.now;
        let t = self.t();
        while let Some(d) = self.a.rtc.poll_datagram() {
            moved = true;
            self.b.rtc.handle_datagram(now, d.source, d.destination, &d.contents);
        }
        while let Some(d) = self.b.rtc.poll_datagram() {
            moved = true;
            self.a.rtc.handle_datagram(now, d.source, d.destination, &d.contents);
        }
        for side in [&mut self.a, &mut self.b] {
            while let Some(e) = side.rtc.poll_event() {
                moved = true;
                match e {
                    TransportEvent::Open { .. } => {
                        side.open = true;
                        side.engine.handle_transport_open(t).unwrap();
                    }
                    TransportEvent::Message(m) => {
                        let _ = side.engine.handle_binary(t, &m);
                    }
                    TransportEvent::Closed { reason } => {
                        side.closed = true;
                        side.engine.handle_transport_closed(t, None, &reason);
                    }
                }
            }
            if side.open && !side.closed {
                while let Some(x) = side.engine.poll_transmit() {
                    moved = true;
                    match x {
                        Transmit::Binary(b) => side.rtc.send(b).expect("frames fit the channel"),
                        other => panic!("a peer link sent {other:?}"),
                    }
                }
            }
        }
        while let Some(e) = self.a.engine.poll_event() {
            moved = true;
            self.on_a(e);
        }
        while let Some(e) = self.b.engine.poll_event() {
            moved = true;
            match e {
                Event::CallSettled { id, result } => self.b.settled.push((id, result)),
                Event::Invoke(inv) => {
                    // B's callback: doubles.
                    assert!(matches!(inv.target, InvokeTarget::Callback { .. }), "{:?}", inv.target);
                    self.cb_calls += 1;
                    let x = inv.args[0].as_i64().unwrap();
                    self.b.engine.reply(t, inv.id, Ok(Value::from(x * 2))).unwrap();
                }
                _ => {}
            }
        }
        moved
    }

    fn on_a(&mut self, e: Event) {
        let t = self.t();
        match e {
            Event::Invoke(inv) => {
                let reply = match &inv.target {
                    InvokeTarget::Service { function, .. } => match function.as_str() {
                        "echo" => Ok(inv.args[0].clone()),
                        "whoami" => Ok(inv.context.as_ref().expect("a context").to_value()),
                        "len" => Ok(Value::from(inv.args[0].as_bin().unwrap().len() as u64)),
                        "make" => {
                            let n = inv.args[0].as_u64().unwrap() as usize;
                            Ok(Value::bin(Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<_>>())))
                        }
                        "twice" => {
                            let cb = Method::from_value(&inv.args[0]).unwrap().unwrap();
                            let opts = CallOptions { parent: inv.session.clone(), ..Default::default() };
                            let id =
                                self.a.engine.call(t, &cb, vec![inv.args[1].clone()], None, opts).unwrap();
                            self.twice.push((id, inv.id));
                            return;
                        }
                        "count" => {
                            self.gen_left = inv.args[0].as_u64().unwrap() as u32;
                            Ok(local_generator(GenId(7)))
                        }
                        other => panic!("unexpected {other}"),
                    },
                    InvokeTarget::GeneratorNext { .. } => {
                        if self.gen_left == 0 {
                            Ok(hypha_rpc_core::codec::rtype::StopIteration.to_value())
                        } else {
                            self.gen_left -= 1;
                            Ok(Value::from(self.gen_left as u64))
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                };
                self.a.engine.reply(t, inv.id, reply).unwrap();
            }
            Event::CallSettled { id, result } => {
                if let Some(i) = self.twice.iter().position(|(c, _)| *c == id) {
                    let (_, inv) = self.twice.remove(i);
                    let x = result.unwrap().as_i64().unwrap();
                    self.a.engine.reply(t, inv, Ok(Value::from(x * 2))).unwrap();
                }
            }
            _ => {}
        }
    }

    /// Runs until quiet, jumping the clock to the next deadline when nothing moves.
    fn run_until(&mut self, mut done: impl FnMut(&mut World) -> bool) {
        for _ in 0..2_000_000 {
            if done(self) {
                return;
            }
            if self.step() {
                continue;
            }
            let t = |s: &Side| s.rtc.poll_timeout();
            let e = |s: &Side, w: &World| {
                s.engine.poll_timeout().map(|x| w.start + Duration::from_micros(x.as_micros()))
            };
            let next =
                [t(&self.a), t(&self.b), e(&self.a, self), e(&self.b, self)].into_iter().flatten().min();
            let Some(next) = next else { break };
            self.now = next.max(self.now);
            let (now, et) = (self.now, self.t());
            for s in [&mut self.a, &mut self.b] {
                s.rtc.handle_timeout(now);
                s.engine.handle_timeout(et);
            }
        }
        assert!(done(self), "the world went quiet before the condition held");
    }

    fn call(&mut self, svc: &Value, f: &str, args: Vec<Value>) -> Result<Value, CallError> {
        let m = Method::from_value(svc.as_map().unwrap().get(f).unwrap()).unwrap().unwrap();
        let t = self.t();
        let id = self.b.engine.call(t, &m, args, None, CallOptions::default()).unwrap();
        self.result(id)
    }

    fn result(&mut self, id: CallId) -> Result<Value, CallError> {
        self.run_until(|w| w.b.settled.iter().any(|(c, _)| *c == id));
        let i = self.b.settled.iter().position(|(c, _)| *c == id).unwrap();
        self.b.settled.remove(i).1
    }
}

#[test]
fn engines_over_webrtc_in_memory() {
    let mut w = World::new();
    w.run_until(|w| w.a.open && w.b.open);
    let opened = w.now.duration_since(w.start);
    eprintln!("open after {opened:?} of virtual time");
    assert!(opened < Duration::from_secs(2), "ICE + DTLS + SCTP took {opened:?} of virtual time");

    let t = w.t();
    let id = w.b.engine.get_peer_service(t, "ws-a/peer-b", "svc").unwrap();
    let svc = w.result(id).expect("the service, over the channel");
    assert_eq!(w.call(&svc, "echo", vec!["hi".into()]).unwrap(), Value::from("hi"));

    // The context: connection type and the trusted user from the link.
    let ctx = w.call(&svc, "whoami", vec![]).unwrap();
    let ctx = ctx.as_map().unwrap();
    assert_eq!(ctx.get("connection_type").and_then(Value::as_str), Some("webrtc"));
    assert_eq!(ctx.get("from").and_then(Value::as_str), Some("ws-a/offerer"));
    assert_eq!(
        ctx.get("user").and_then(Value::as_map).and_then(|u| u.get("id")).and_then(Value::as_str),
        Some("bob")
    );

    // A callback: A calls B's function back over the same channel.
    let cb = local_function(FnId(1), "double");
    assert_eq!(w.call(&svc, "twice", vec![cb, Value::from(5)]).unwrap(), Value::from(20));
    assert_eq!(w.cb_calls, 1);

    // A generator.
    let g = w.call(&svc, "count", vec![Value::from(3u64)]).unwrap();
    let g = Generator::from_value(&g).unwrap().unwrap();
    let mut items = Vec::new();
    loop {
        let t = w.t();
        let id = w.b.engine.generator_next(t, &g).unwrap();
        let v = w.result(id).unwrap();
        if is_stop_iteration(&v) {
            break;
        }
        items.push(v.as_u64().unwrap());
    }
    assert_eq!(items, vec![2, 1, 0]);

    // 50 MB each way: chunked through `message_cache` below the 1 MiB channel messages.
    let big: Vec<u8> = (0..50_000_000).map(|i| (i % 251) as u8).collect();
    let before = w.now;
    let n = w.call(&svc, "len", vec![Value::bin(Bytes::from(big.clone()))]).unwrap();
    assert_eq!(n.as_u64(), Some(50_000_000));
    let back = w.call(&svc, "make", vec![Value::from(50_000_000u64)]).unwrap();
    assert!(back.as_bin().unwrap().as_ref() == big.as_slice());
    eprintln!("100 MB moved in {:?} of virtual time", w.now.duration_since(before));
    assert_eq!(w.a.engine.partial_messages(), 0);

    // B closes: A's engine sees the link end.
    w.b.rtc.close();
    let before = w.now;
    w.run_until(|w| w.a.closed);
    assert!(
        w.now.duration_since(before) < Duration::from_secs(1),
        "the close was seen at once, not by a timeout"
    );
    assert!(!w.a.engine.is_ready());
}
