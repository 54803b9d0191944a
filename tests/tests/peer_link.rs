//! Two engines on a direct peer link (a WebRTC data channel's job, PROTOCOL.md §13), wired to
//! each other in memory: no server, no handshake. Checks that the link is ready at once, that
//! services are found through `built-in.get_service`, and that the identity a peer writes
//! about itself is never believed (visibility, context).

use std::collections::VecDeque;

use hypha_rpc_core::codec::rtype::{Method, RTypeCodec};
use hypha_rpc_core::time::{Duration, Instant};
use hypha_rpc_core::{
    CallError, CallId, CallOptions, Engine, EngineConfig, Event, FunctionSpec, InvokeTarget, Map, PeerLink,
    RequireContext, ServiceSpec, Transmit, Value, Visibility,
};

/// The answerer (serves) and the offerer (calls), as the WebRTC roles.
struct Pair {
    a: Engine,
    b: Engine,
    now: Instant,
    settled: Vec<(CallId, Result<Value, CallError>)>,
}

fn link(workspace: &str, peer_workspace: &str) -> PeerLink {
    PeerLink {
        workspace: workspace.into(),
        peer_workspace: peer_workspace.into(),
        peer_user: Value::Map(Map::from_iter([("id", Value::from("alice"))])),
    }
}

impl Pair {
    /// Answerer `label` in `ws-b` believing its peer is in `trusted_ws`; the offerer acts in
    /// `offerer_ws` and knows the answerer is in `ws-b`.
    fn new(trusted_ws: &str, offerer_ws: &str, visibility: Visibility) -> Pair {
        let now = Instant::ZERO;
        let mut ca = EngineConfig::new("peer-label");
        ca.peer = Some(link("ws-b", trusted_ws));
        let mut a = Engine::new(ca, now);
        let spec = ServiceSpec::new("svc")
            .visibility(visibility)
            .require_context(RequireContext::Functions(vec!["whoami".into()]))
            .function("echo", FunctionSpec::new("echo"))
            .function("whoami", FunctionSpec::new("whoami"));
        a.register_service(now, spec).unwrap();
        let mut cb = EngineConfig::new("offerer-x");
        cb.peer = Some(PeerLink {
            workspace: offerer_ws.into(),
            peer_workspace: "ws-b".into(),
            peer_user: Value::Nil,
        });
        let b = Engine::new(cb, now);
        let mut p = Pair { a, b, now, settled: Vec::new() };
        p.a.handle_transport_open(now).unwrap();
        p.b.handle_transport_open(now).unwrap();
        p
    }

    /// Moves frames both ways and answers invocations until nothing moves.
    fn run(&mut self) {
        loop {
            let mut moved = false;
            let mut to_b = VecDeque::new();
            while let Some(t) = self.a.poll_transmit() {
                match t {
                    Transmit::Binary(bytes) => to_b.push_back(bytes),
                    other => panic!("a peer link sent {other:?}"),
                }
            }
            let mut to_a = VecDeque::new();
            while let Some(t) = self.b.poll_transmit() {
                match t {
                    Transmit::Binary(bytes) => to_a.push_back(bytes),
                    other => panic!("a peer link sent {other:?}"),
                }
            }
            for f in to_b {
                moved = true;
                let _ = self.b.handle_binary(self.now, &f);
            }
            for f in to_a {
                moved = true;
                let _ = self.a.handle_binary(self.now, &f);
            }
            while let Some(e) = self.a.poll_event() {
                moved = true;
                if let Event::Invoke(inv) = e {
                    let reply = match &inv.target {
                        InvokeTarget::Service { function, .. } if function == "echo" => {
                            Ok(inv.args.first().cloned().unwrap_or_default())
                        }
                        InvokeTarget::Service { function, .. } if function == "whoami" => {
                            Ok(inv.context.as_ref().map(|c| c.to_value()).unwrap_or_default())
                        }
                        other => panic!("unexpected invocation {other:?}"),
                    };
                    self.a.reply(self.now, inv.id, reply).unwrap();
                }
            }
            while let Some(e) = self.b.poll_event() {
                moved = true;
                if let Event::CallSettled { id, result } = e {
                    self.settled.push((id, result));
                }
            }
            if !moved {
                break;
            }
            self.now += Duration::from_millis(1);
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
        }
    }

    fn result(&mut self, id: CallId) -> Result<Value, CallError> {
        self.run();
        let i = self.settled.iter().position(|(c, _)| *c == id).expect("the call settled");
        self.settled.remove(i).1
    }

    fn get(&mut self, name: &str) -> Result<Value, CallError> {
        let id = self.b.get_peer_service(self.now, "ws-b/peer-label", name).unwrap();
        self.result(id)
    }

    fn call(&mut self, svc: &Value, f: &str, args: Vec<Value>) -> Result<Value, CallError> {
        let m = Method::from_value(svc.as_map().unwrap().get(f).unwrap()).unwrap().unwrap();
        let id = self.b.call(self.now, &m, args, None, CallOptions::default()).unwrap();
        self.result(id)
    }
}

fn message(r: Result<Value, CallError>) -> String {
    match r {
        Err(CallError::Remote { message, .. }) => message,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

#[test]
fn a_peer_link_is_ready_at_once_and_serves_its_services() {
    let mut p = Pair::new("ws-b", "ws-b", Visibility::Protected);
    let connected = |e: &mut Engine| {
        std::iter::from_fn(|| e.poll_event())
            .any(|e| matches!(e, Event::Connected { reconnected: false, .. }))
    };
    assert!(connected(&mut p.a) && connected(&mut p.b));
    assert!(p.a.is_ready() && p.b.is_ready());
    let svc = p.get("svc").expect("the service");
    assert_eq!(p.call(&svc, "echo", vec!["hi".into()]).unwrap(), Value::from("hi"));
    // `built-in` is there too, and the link sent no text frame (no handshake, no pings).
    assert!(p.get("built-in").is_ok());
    p.now += Duration::from_secs(60);
    p.a.handle_timeout(p.now);
    p.b.handle_timeout(p.now);
    p.run();
    assert!(message(p.get("nope")).contains("Service not found"));
}

#[test]
fn the_context_comes_from_the_link_not_from_the_frames() {
    // The offerer claims to be in `ws-b` (its `from`); the link says it is `ws-b` too, but
    // with the trusted user. Everything in the context is the link's.
    let mut p = Pair::new("ws-b", "ws-b", Visibility::Protected);
    let svc = p.get("svc").unwrap();
    let ctx = p.call(&svc, "whoami", vec![]).unwrap();
    let ctx = ctx.as_map().unwrap();
    assert_eq!(ctx.get("connection_type").and_then(Value::as_str), Some("webrtc"));
    assert_eq!(ctx.get("ws").and_then(Value::as_str), Some("ws-b"));
    assert_eq!(ctx.get("from").and_then(Value::as_str), Some("ws-b/offerer-x"));
    let user = ctx.get("user").and_then(Value::as_map).expect("the trusted user");
    assert_eq!(user.get("id").and_then(Value::as_str), Some("alice"));
}

#[test]
fn visibility_is_checked_against_the_trusted_workspace() {
    // The offerer writes `from: ws-b/…` (it claims our workspace), but the link knows it is in
    // `ws-a`: a protected service is refused, exactly as through the server.
    let mut p = Pair::new("ws-a", "ws-b", Visibility::Protected);
    let err = message(p.get("svc"));
    assert!(err.contains("Permission denied"), "{err}");
    // A public one works, and the caller shows up in its real workspace.
    let mut p = Pair::new("ws-a", "ws-b", Visibility::Public);
    let svc = p.get("svc").unwrap();
    let ctx = p.call(&svc, "whoami", vec![]).unwrap();
    assert_eq!(ctx.as_map().unwrap().get("from").and_then(Value::as_str), Some("ws-a/offerer-x"));
    assert_eq!(ctx.as_map().unwrap().get("ws").and_then(Value::as_str), Some("ws-a"));
}

#[test]
fn a_peer_link_does_not_reopen_and_has_no_manager() {
    let mut p = Pair::new("ws-b", "ws-b", Visibility::Protected);
    assert!(p.b.call_manager(p.now, "echo", vec![], None).is_err());
    p.b.handle_transport_closed(p.now, None, "channel closed");
    assert!(p.b.handle_transport_open(p.now).is_err(), "a peer link is one channel, once");
}
