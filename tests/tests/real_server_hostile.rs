//! A raw hostile client against our engine through the real Hypha server (127.0.0.1 only): forged envelope keys, fake system events, stray replies, bad paths, stolen callbacks, malformed msgpack, `t = 0` and a duplicate login, each followed by proof that nothing else was disturbed.
//!
//! Three clients of one workspace: the victim (our engine, serving `svc`), a friend (our
//! engine too, the legitimate peer) and mallory (a raw websocket writing whatever bytes it
//! likes). Every step records what the server did with mallory's frames and what the victim
//! made of them, then checks: the victim is still connected, its service is still registered
//! and answers the friend, a call it made before the step settles with the real answer, and
//! its counts are back to the baseline.

use std::time::{Duration as StdDuration, Instant as StdInstant};

use bytes::Bytes;
use hypha_rpc_core::codec::rtype::{Generator, Method, RTypeCodec, RemoteError, StopIteration};
use hypha_rpc_core::codec::{Frame, encode_frame};
use hypha_rpc_core::engine::{local_function, local_generator};
use hypha_rpc_core::{
    CallError, CallId, CallOptions, EngineConfig, Event, FnId, FunctionSpec, GenId, InputError, Invocation,
    InvokeTarget, Map, RequireContext, ServiceSpec, Value,
};
use hypha_rpc_tests::hostile::{RawWs, Received, Tap, call_extra, concat, enc, map_of, mp};
use hypha_rpc_tests::server::HyphaServer;

const WAIT: StdDuration = StdDuration::from_secs(10);

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

use hypha_rpc_tests::hostile::{Counts, counts};

fn descriptor(v: &Value) -> Result<Method, String> {
    match Method::from_value(v) {
        Some(Ok(m)) => Ok(m),
        other => Err(format!("not a method descriptor: {v:?} ({other:?})")),
    }
}

fn remote_message(v: &Value) -> String {
    match RemoteError::from_value(v) {
        Some(Ok(e)) => e.message,
        _ => format!("{v:?}"),
    }
}

fn args_of(f: &Frame) -> &[Value] {
    f.extra.as_ref().and_then(|e| e.get("args")).and_then(Value::as_array).unwrap_or(&[])
}

/// The last line of a (Python traceback) message, shortened.
fn last_line(s: &str) -> String {
    short(s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(s).trim())
}

fn short(s: &str) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() > 110 { format!("{}…", s.chars().take(110).collect::<String>()) } else { s }
}

/// The victim's service.
fn victim_service() -> ServiceSpec {
    ServiceSpec::new("svc")
        .require_context(RequireContext::Functions(vec!["whoami".into()]))
        .function("echo", FunctionSpec::new("echo"))
        .function("whoami", FunctionSpec::new("whoami"))
        .function("hold", FunctionSpec::new("hold"))
        .function("gen", FunctionSpec::new("gen"))
        .value("answer", 42)
}

/// The victim's user code: `hold` is held (answered by the test), everything else at once.
fn victim_handler(inv: &Invocation) -> Option<Result<Value, RemoteError>> {
    match &inv.target {
        InvokeTarget::Service { function, .. } => match function.as_str() {
            "echo" => Some(Ok(inv.args.first().cloned().unwrap_or_default())),
            "whoami" => Some(Ok(inv.context.as_ref().map(|c| c.to_value()).unwrap_or_default())),
            "gen" => Some(Ok(local_generator(GenId(5)))),
            _ => None,
        },
        InvokeTarget::GeneratorNext { .. } => Some(Ok(StopIteration.to_value())),
        _ => Some(Ok("callback ran".into())),
    }
}

/// The three clients.
struct Net {
    v: Tap,
    f: Tap,
    m: RawWs,
    url: String,
    ws: String,
    token: String,
    /// `ws/client` of the victim, the friend and mallory.
    fv: String,
    ff: String,
    fm: String,
    /// The victim's service as the friend fetched it; the friend's as the victim did.
    victim_svc: Value,
    friend_svc: Value,
    base: Counts,
    /// The victim's call of the friend's `work`, left pending by the friend during a step.
    control: Option<CallId>,
}

impl Net {
    fn pump(&mut self) {
        self.v.turn(StdDuration::from_millis(1)).expect("victim driver");
        self.f.turn(StdDuration::from_millis(1)).expect("friend driver");
        self.m.poll(StdDuration::from_millis(1));
    }

    /// Pumps until `pred` holds (true) or `timeout` passes (false).
    fn until(&mut self, timeout: StdDuration, pred: impl Fn(&Net) -> bool) -> bool {
        let deadline = StdInstant::now() + timeout;
        while StdInstant::now() < deadline {
            self.pump();
            if pred(self) {
                return true;
            }
        }
        false
    }

    fn spin(&mut self, d: StdDuration) {
        let _ = self.until(d, |_| false);
    }

    fn wait_v(&mut self, id: CallId) -> Result<Result<Value, CallError>, String> {
        if !self.until(WAIT, |n| n.v.settled.contains_key(&id)) {
            return Err(format!("the victim's call {id:?} did not settle"));
        }
        Ok(self.v.take(id).expect("settled"))
    }

    fn wait_f(&mut self, id: CallId) -> Result<Result<Value, CallError>, String> {
        if !self.until(WAIT, |n| n.f.settled.contains_key(&id)) {
            return Err(format!("the friend's call {id:?} did not settle"));
        }
        Ok(self.f.take(id).expect("settled"))
    }

    fn f_call(&mut self, target: &Method, args: Vec<Value>, parent: Option<String>) -> CallId {
        let now = self.f.now();
        let options = CallOptions { parent, ..CallOptions::default() };
        self.f.engine.call(now, target, args, None, options).expect("friend call")
    }

    fn v_call(&mut self, target: &Method, args: Vec<Value>) -> CallId {
        let now = self.v.now();
        self.v.engine.call(now, target, args, None, CallOptions::default()).expect("victim call")
    }

    /// The friend's held invocation of `function`.
    fn friend_held(&mut self, function: &str) -> Result<Invocation, String> {
        let is =
            |i: &Invocation| matches!(&i.target, InvokeTarget::Service { function: f, .. } if f == function);
        if !self.until(WAIT, |n| n.f.held.iter().any(is)) {
            return Err(format!("the friend never got {function}"));
        }
        Ok(self.f.held.iter().find(|i| is(i)).cloned().expect("held"))
    }

    /// Mallory sends raw bytes.
    fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.m.send_binary(bytes) {
            println!("    (mallory could not send: {e})");
        }
    }

    /// Mallory calls `method` at the victim with `session`, a compact promise and `extra`
    /// entries added (or overriding).
    fn mallory_calls(&mut self, method: &str, session: &str, args: Vec<Value>, add: &[(&str, Value)]) {
        let main = map_of(&[
            ("type", "method".into()),
            ("from", "forged/whoever".into()),
            ("to", self.fv.as_str().into()),
            ("method", method.into()),
            ("session", session.into()),
        ]);
        let mut extra = call_extra(args);
        for (k, v) in add {
            extra.insert(*k, v.clone());
        }
        let bytes = encode_frame(&Frame { main, extra: Some(extra) });
        self.send(&bytes);
    }

    /// Waits for the frame `<session>.<slot>` at mallory; its first argument.
    fn mallory_got(&mut self, session: &str, slot: &str) -> Result<Value, String> {
        let method = format!("{session}.{slot}");
        let find = |n: &Net| n.m.frames().into_iter().find(|f| f.main_str("method") == Some(method.as_str()));
        if !self.until(WAIT, |n| find(n).is_some()) {
            return Err(format!("mallory got no {method}"));
        }
        Ok(args_of(&find(self).expect("found")).first().cloned().unwrap_or_default())
    }

    /// Mallory calls `method`; it must be rejected with `sub`. The reject's message.
    fn mallory_rejected(&mut self, method: &str, session: &str, sub: &str) -> Result<String, String> {
        let ran = self.v.invocations.len();
        self.mallory_calls(method, session, vec![], &[]);
        let m = remote_message(&self.mallory_got(session, "reject")?);
        ensure!(m.contains(sub), "{method}: the reject says {m:?}, expected {sub:?}");
        ensure!(self.v.invocations.len() == ran, "the victim ran something for {method}");
        Ok(m)
    }

    /// The victim's control call: the friend holds it until [`Net::end_control`].
    fn start_control(&mut self) -> Result<(), String> {
        let work = descriptor(self.friend_svc.as_map().and_then(|m| m.get("work")).ok_or("no work")?)?;
        let id = self.v_call(&work, vec![]);
        self.friend_held("work")?;
        self.control = Some(id);
        Ok(())
    }

    fn control_session(&self) -> String {
        self.v
            .sent
            .iter()
            .rev()
            .find(|f| f.main_str("method") == Some("services.friendsvc.work"))
            .and_then(|f| f.main_str("session").map(String::from))
            .unwrap_or_default()
    }

    fn end_control(&mut self) -> Check {
        let id = self.control.take().ok_or("no control call")?;
        ensure!(
            !self.v.settled.contains_key(&id),
            "the control call settled early: {:?}",
            self.v.settled.get(&id)
        );
        let held = self.friend_held("work")?;
        self.f.reply(held.id, Ok("work done".into()));
        let r = self.wait_v(id)?;
        ensure!(r == Ok(Value::from("work done")), "the control call settled with {r:?}");
        Ok(())
    }

    /// After every step: still connected, still registered and served, the control call
    /// settles with the real answer, the counts are back.
    fn check(&mut self) -> Check {
        ensure!(
            self.v.engine.is_ready() && self.v.closed.is_none(),
            "the victim lost its connection: {:?}",
            self.v.closed
        );
        let gone: Vec<_> = self
            .v
            .events
            .iter()
            .filter(|e| matches!(e, Event::PeerDisconnected { peer } if *peer == self.ff))
            .collect();
        ensure!(gone.is_empty(), "the victim believes the friend left: {gone:?}");
        self.end_control()?;
        let now = self.f.now();
        let id = self.f.engine.get_service(now, "victim:svc", None).map_err(|e| e.to_string())?;
        let fresh = self.wait_f(id)?.map_err(|e| format!("the victim's service is no longer served: {e}"))?;
        for svc in [self.victim_svc.clone(), fresh] {
            let echo = descriptor(svc.as_map().and_then(|m| m.get("echo")).ok_or("no echo")?)?;
            let id = self.f_call(&echo, vec!["still here".into()], None);
            let r = self.wait_f(id)?;
            ensure!(r == Ok(Value::from("still here")), "the friend's call of echo: {r:?}");
        }
        let _ = self.until(StdDuration::from_millis(500), |n| counts(&n.v.engine) == n.base);
        let now = counts(&self.v.engine);
        ensure!(
            now == self.base,
            "the victim's counts are not back:\n  now  {now:?}\n  base {:?}",
            self.base
        );
        Ok(())
    }

    /// New input errors of the victim since `from`, as short strings.
    fn refused_since(&self, from: usize) -> Vec<String> {
        self.v.input_errors[from..].iter().map(|e| short(&e.to_string())).collect()
    }
}

struct Row {
    step: &'static str,
    frame: String,
    server: String,
    victim: String,
}

/// One hostile frame of mallory, recorded: what reached the victim, what mallory got back,
/// whether mallory's connection survived.
fn record(net: &mut Net, rows: &mut Vec<Row>, step: &'static str, what: &str, bytes: &[u8]) {
    let (errors, received, invoked) =
        (net.v.input_errors.len(), net.m.received.len(), net.v.invocations.len());
    let (arrived, events) = (net.v.binary_in, net.v.events.len());
    net.send(bytes);
    net.spin(StdDuration::from_millis(150));
    let refused = net.refused_since(errors);
    let invoked = net.v.invocations.len() - invoked;
    let back: Vec<String> = net.m.received[received..]
        .iter()
        .map(|r| match r {
            Received::Text(t) => format!("text {}", short(t)),
            Received::Binary(_, Some(f)) => {
                let m = f.main_str("method").unwrap_or("?");
                match args_of(f).first() {
                    Some(v) if m.ends_with(".reject") => format!("{m}: {}", short(&remote_message(v))),
                    _ => m.to_string(),
                }
            }
            Received::Binary(b, None) => format!("{} undecodable bytes", b.len()),
            Received::Close(code, reason) => format!("close {code:?} {reason}"),
        })
        .collect();
    let alive = net.m.closed.is_none() && net.m.is_alive(StdDuration::from_secs(2));
    let server = format!(
        "{}; mallory {}",
        if back.is_empty() { "nothing back".to_string() } else { back.join(" | ") },
        if alive { "still connected".to_string() } else { format!("disconnected {:?}", net.m.closed) }
    );
    let arrived = net.v.binary_in - arrived;
    let reported: Vec<String> = net.v.events[events..]
        .iter()
        .filter_map(|e| match e {
            Event::ServerEvent { kind, message } => {
                Some(format!("{kind} from {}", message.get("from").and_then(Value::as_str).unwrap_or("?")))
            }
            _ => None,
        })
        .collect();
    let victim = match (arrived, refused.is_empty(), invoked) {
        (0, _, _) => "nothing arrived".to_string(),
        (_, false, _) => format!("refused: {}", refused.join(" | ")),
        (_, true, 0) if !reported.is_empty() => format!("reported as ServerEvent {}", reported.join(", ")),
        (_, true, 0) => "arrived, ignored (Ok)".to_string(),
        (_, true, n) => format!("served {n} call(s)"),
    };
    rows.push(Row { step, frame: what.to_string(), server, victim });
    if !alive {
        // The server cut mallory: she comes back (same id) for the next steps.
        net.m = RawWs::connect(&net.url, "mallory", Some(&net.ws), Some(&net.token))
            .unwrap_or_else(|r| panic!("mallory cannot come back: {r:?}"));
    }
}

#[test]
fn a_hostile_raw_client_through_the_real_server() {
    let t0 = StdInstant::now();
    let server = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let url = server.ws_url();
    assert!(url.starts_with("ws://127.0.0.1:"), "only the local server is contacted: {url}");
    let started = t0.elapsed();

    // The victim, anonymous in its own workspace, serving `svc`.
    // Checks every second that the server still lists it (PROTOCOL.md §3.3.1 rule 7), so the
    // duplicate-login step sees it recover within its few seconds.
    let mut victim_config = EngineConfig::new("victim");
    victim_config.registration_check_interval = Some(hypha_rpc_core::time::Duration::from_secs(1));
    let mut v = Tap::connect(&url, victim_config).expect("the victim connects");
    v.handler = Some(Box::new(victim_handler));
    let now = v.now();
    let reg = v.engine.register_service(now, victim_service()).unwrap();
    let ws = v.engine.connection_info().unwrap().workspace.clone();
    let now = v.now();
    let tok = v
        .engine
        .call_manager(
            now,
            "generate_token",
            vec![map_of(&[("permission", "read_write".into())]).into()],
            None,
        )
        .unwrap();
    let deadline = StdInstant::now() + WAIT;
    while !(v.settled.contains_key(&reg) && v.settled.contains_key(&tok)) && StdInstant::now() < deadline {
        v.turn(StdDuration::from_millis(5)).unwrap();
    }
    v.take(reg).expect("registered").expect("registration ok");
    let token = v.take(tok).expect("token").expect("token ok").as_str().expect("a token string").to_string();

    // The friend, in the same workspace, serving `friendsvc` (every call held by the test).
    let mut config = EngineConfig::new("friend");
    config.token = Some(token.clone());
    config.workspace = Some(ws.clone());
    let mut f = Tap::connect(&url, config).expect("the friend connects");
    f.handler = Some(Box::new(|_| None));
    let spec = ServiceSpec::new("friendsvc")
        .function("work", FunctionSpec::new("work"))
        .function("take", FunctionSpec::new("take"))
        .function("take_cb", FunctionSpec::new("take_cb"));
    let now = f.now();
    let reg = f.engine.register_service(now, spec).unwrap();
    let deadline = StdInstant::now() + WAIT;
    while !f.settled.contains_key(&reg) && StdInstant::now() < deadline {
        f.turn(StdDuration::from_millis(5)).unwrap();
        v.turn(StdDuration::from_millis(1)).unwrap();
    }
    f.take(reg).expect("registered").expect("registration ok");

    // Mallory, a raw client of the same workspace.
    let m = RawWs::connect(&url, "mallory", Some(&ws), Some(&token)).expect("mallory connects");
    let (fv, ff, fm) = (format!("{ws}/victim"), format!("{ws}/friend"), m.full_id());
    let mut net = Net {
        v,
        f,
        m,
        url: url.clone(),
        ws: ws.clone(),
        token: token.clone(),
        fv,
        ff,
        fm,
        victim_svc: Value::Nil,
        friend_svc: Value::Nil,
        base: Counts {
            pending_calls: 0,
            active_invocations: 0,
            partial_messages: 0,
            uploads: 0,
            exports: 0,
            interfaces: 0,
            queued_frames: 0,
            open_generators: 0,
        },
        control: None,
    };
    let now = net.f.now();
    let id = net.f.engine.get_service(now, "victim:svc", None).unwrap();
    net.victim_svc = net.wait_f(id).unwrap().expect("the friend fetches the victim's service");
    let now = net.v.now();
    let id = net.v.engine.get_service(now, "friend:friendsvc", None).unwrap();
    net.friend_svc = net.wait_v(id).unwrap().expect("the victim fetches the friend's service");
    net.spin(StdDuration::from_millis(100));
    net.base = counts(&net.v.engine);
    let setup = t0.elapsed();

    let mut rows: Vec<Row> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut timings: Vec<(&str, StdDuration)> = Vec::new();
    let mut bugs: Vec<String> = Vec::new();
    type Step = fn(&mut Net, &mut Vec<Row>) -> Check;
    let steps: Vec<(&'static str, Step, Option<&'static str>)> = vec![
        ("forged envelope keys", forged_envelope, None),
        ("fake system events", fake_events, None),
        ("replies to unknown sessions", unknown_sessions, None),
        ("unregistered paths", bad_paths, None),
        ("objects sent to someone else", stolen_objects, None),
        ("malformed msgpack", malformed, None),
        ("t = 0", zero_interval, None),
        // Last: it leaves the victim unreachable.
        // The engine notices the server dropped it (its periodic registration check) and
        // reconnects: PROTOCOL.md §3.3.1 rule 7.
        ("duplicate login", duplicate_login, None),
    ];
    for (name, step, known_bug) in steps {
        let t = StdInstant::now();
        let outcome = net.start_control().and_then(|()| step(&mut net, &mut rows)).and_then(|()| net.check());
        match (&outcome, known_bug) {
            (Ok(()), Some(bug)) => {
                failures.push(format!("{name}: marked as a known engine bug ({bug}) but passes"))
            }
            (Err(e), Some(bug)) => bugs.push(format!("{name}: {e}\n      known engine bug: {bug}")),
            _ => {}
        }
        if let (Err(e), None) = (outcome, known_bug) {
            failures.push(format!("{name}: {e}"));
            // Leave nothing held for the next step.
            let held: Vec<_> = net.f.held.iter().map(|i| i.id).collect();
            for id in held {
                net.f.reply(id, Ok(Value::Nil));
            }
            net.control = None;
            net.spin(StdDuration::from_millis(300));
        }
        timings.push((name, t.elapsed()));
    }

    println!("real server: started in {started:.2?}, three clients ready at {setup:.2?}");
    println!("{:<28} | {:<58} | {:<70} | victim", "step", "mallory sent", "the server");
    for r in &rows {
        println!("{:<28} | {:<58} | {:<70} | {}", r.step, r.frame, r.server, r.victim);
    }
    for (name, t) in &timings {
        println!("  {name}: {t:.2?}");
    }
    println!(
        "real server hostile test: {} hostile frames in {} steps, {:.2?} in all; victim refused {} frames",
        rows.len(),
        timings.len(),
        t0.elapsed(),
        net.v.input_errors.len()
    );
    for b in &bugs {
        println!("  EXPECTED FAILURE {b}");
    }
    if !failures.is_empty() {
        println!("{}", server.log_tail(30));
    }
    assert!(failures.is_empty(), "{} steps failed:\n{}", failures.len(), failures.join("\n"));
    assert!(t0.elapsed() < StdDuration::from_secs(60), "took {:?}", t0.elapsed());
}

/// Mallory calls `whoami` with each envelope key forged in extra: the context the victim
/// builds (and sends back to mallory) comes from what the server wrote.
fn forged_envelope(net: &mut Net, rows: &mut Vec<Row>) -> Check {
    let control = net.control_session();
    let user_id = net.m.info["user"]["id"].as_str().unwrap_or_default().to_string();
    for key in hypha_rpc_core::codec::ENVELOPE_KEYS {
        let forged: Value = match key {
            "type" => "client_disconnected".into(),
            "from" => net.ff.as_str().into(),
            "to" => "ws-elsewhere/victim".into(),
            "method" => "services.svc.echo".into(),
            "session" | "parent" => control.as_str().into(),
            "ws" => "ws-forged".into(),
            _ => map_of(&[("id", "root".into()), ("roles", Value::Array(vec!["admin".into()]))]).into(),
        };
        let session = format!("forge-{key}");
        net.mallory_calls("services.svc.whoami", &session, vec![], &[(key, forged)]);
        let ctx = net.mallory_got(&session, "resolve")?;
        let get = |k: &str| ctx.as_map().and_then(|m| m.get(k)).cloned().unwrap_or_default();
        ensure!(get("from") == Value::from(net.fm.as_str()), "{key}: from {:?}", get("from"));
        ensure!(get("ws") == Value::from(net.ws.as_str()), "{key}: ws {:?}", get("ws"));
        let uid = get("user").as_map().and_then(|u| u.get("id")).cloned().unwrap_or_default();
        ensure!(uid == Value::from(user_id.as_str()), "{key}: user {:?}", get("user"));
        ensure!(get("method") == Value::from("services.svc.whoami"), "{key}: method {:?}", get("method"));
        ensure!(
            get("session") == Value::from(session.as_str()) && get("parent") == Value::Nil,
            "{key}: {ctx:?}"
        );
        rows.push(Row {
            step: "forged envelope",
            frame: format!("whoami with `{key}` forged in extra"),
            server: "delivered; mallory got the resolve".into(),
            victim: format!(
                "context from {}, user {}",
                short(get("from").as_str().unwrap_or("?")),
                short(&format!("{uid:?}"))
            ),
        });
    }
    Ok(())
}

/// client_disconnected about the friend (direct and broadcast), peer_not_found naming the
/// victim's pending call, force-exit.
fn fake_events(net: &mut Net, rows: &mut Vec<Row>) -> Check {
    let data = map_of(&[("id", "friend".into()), ("workspace", net.ws.as_str().into())]);
    let session = net.control_session();
    let frames: Vec<(&str, Map)> = vec![
        (
            "client_disconnected about the friend, to the victim",
            map_of(&[
                ("type", "client_disconnected".into()),
                ("to", net.fv.as_str().into()),
                ("data", data.clone().into()),
            ]),
        ),
        (
            "client_disconnected about the friend, to \"*\"",
            map_of(&[("type", "client_disconnected".into()), ("to", "*".into()), ("data", data.into())]),
        ),
        (
            "peer_not_found naming the victim's pending call",
            map_of(&[
                ("type", "peer_not_found".into()),
                ("to", net.fv.as_str().into()),
                ("session", session.as_str().into()),
                ("peer_id", net.ff.as_str().into()),
                ("error", "Target peer is not connected".into()),
            ]),
        ),
        (
            "force-exit to the victim",
            map_of(&[("type", "force-exit".into()), ("to", net.fv.as_str().into())]),
        ),
    ];
    let friend_errors = net.f.input_errors.len();
    for (what, main) in frames {
        let bytes = encode_frame(&Frame { main, extra: None });
        record(net, rows, "fake system events", what, &bytes);
    }
    let ordinary = |e: &InputError| matches!(e, InputError::Protocol(m) if m.contains("ordinary client"));
    ensure!(
        !net.v.events.iter().any(|e| matches!(e, Event::PeerDisconnected { .. })),
        "the victim believed it"
    );
    ensure!(
        net.f.input_errors[friend_errors..].iter().all(ordinary),
        "{:?}",
        &net.f.input_errors[friend_errors..]
    );
    ensure!(net.v.engine.is_ready(), "force-exit disconnected the victim");
    Ok(())
}

/// Replies to sessions that do not exist, and to the victim's pending call.
fn unknown_sessions(net: &mut Net, rows: &mut Vec<Row>) -> Check {
    let control = net.control_session();
    let errors = net.v.input_errors.len();
    for (what, session, slot) in [
        ("resolve of an unknown session", "nosuchsession000", "resolve"),
        ("reject of an unknown session", "nosuchsession000", "reject"),
        ("heartbeat of an unknown session", "nosuchsession000", "heartbeat"),
        ("resolve of the victim's pending call", control.as_str(), "resolve"),
        ("heartbeat of the victim's pending call", control.as_str(), "heartbeat"),
    ] {
        let main = map_of(&[
            ("type", "method".into()),
            ("to", net.fv.as_str().into()),
            ("method", format!("{session}.{slot}").into()),
            ("parent", session.into()),
        ]);
        let extra =
            map_of(&[("args", Value::Array(vec!["forged".into()])), ("from", net.ff.as_str().into())]);
        let bytes = encode_frame(&Frame { main, extra: Some(extra) });
        record(net, rows, "unknown sessions", what, &bytes);
    }
    let refused = &net.v.input_errors[errors..];
    ensure!(
        refused.len() == 2
            && refused.iter().all(|e| matches!(e, InputError::Protocol(m) if m.contains("Access denied"))),
        "{refused:?}"
    );
    Ok(())
}

fn bad_paths(net: &mut Net, rows: &mut Vec<Row>) -> Check {
    for (i, (path, sub)) in [
        ("services.svc.answer", "Method expired or not found"),
        ("services.svc.echo.__call__", "Method expired or not found"),
        ("services.svc", "Method expired or not found"),
        ("services.nosuch.echo", "Method expired or not found"),
        ("services.built-in.message_cache", "Method expired or not found"),
        ("services._rintf_nosuch.inc", "Method expired or not found"),
        ("nosuchsession.callback#cb", "Session not found"),
    ]
    .into_iter()
    .enumerate()
    {
        let m = net.mallory_rejected(path, &format!("path{i:03}"), sub)?;
        rows.push(Row {
            step: "unregistered paths",
            frame: format!("call {path}"),
            server: "delivered; mallory got a reject".into(),
            victim: format!("rejected: {}", short(&m)),
        });
    }
    Ok(())
}

/// A callback, a generator and an `_rintf` interface the victim gave the friend, each called
/// by mallory, then used by the friend.
fn stolen_objects(net: &mut Net, rows: &mut Vec<Row>) -> Check {
    let friend = |name: &str, net: &Net| -> Result<Method, String> {
        descriptor(net.friend_svc.as_map().and_then(|m| m.get(name)).ok_or("no such function")?)
    };
    // A callback.
    let take_cb = friend("take_cb", net)?;
    let call = net.v_call(&take_cb, vec![local_function(FnId(1), "cb")]);
    let inv = net.friend_held("take_cb")?;
    let cb = descriptor(inv.args.first().ok_or("no callback")?)?;
    let m = net.mallory_rejected(&cb.method, "steal-cb", "Access denied")?;
    rows.push(Row {
        step: "stolen objects",
        frame: "call the friend's callback".into(),
        server: "delivered".into(),
        victim: short(&m),
    });
    let id = net.f_call(&cb, vec![], inv.session.clone());
    ensure!(net.wait_f(id)? == Ok(Value::from("callback ran")), "the friend's callback call failed");
    net.f.reply(inv.id, Ok("took".into()));
    ensure!(net.wait_v(call)? == Ok(Value::from("took")), "take_cb");
    // A generator.
    let gen_fn = descriptor(net.victim_svc.as_map().and_then(|m| m.get("gen")).ok_or("no gen")?)?;
    let id = net.f_call(&gen_fn, vec![], None);
    let v = net.wait_f(id)?.map_err(|e| e.to_string())?;
    let generator = match Generator::from_value(&v) {
        Some(Ok(g)) => g,
        other => return Err(format!("not a generator: {other:?}")),
    };
    for (what, method) in
        [("pull", generator.method.clone()), ("close", generator.close_method.clone().unwrap_or_default())]
    {
        let m = net.mallory_rejected(&method, &format!("steal-gen-{what}"), "Access denied")?;
        rows.push(Row {
            step: "stolen objects",
            frame: format!("{what} the friend's generator"),
            server: "delivered".into(),
            victim: short(&m),
        });
    }
    let now = net.f.now();
    let id = net.f.engine.generator_next(now, &generator).map_err(|e| e.to_string())?;
    let item = net.wait_f(id)?.map_err(|e| e.to_string())?;
    ensure!(item.rtype() == Some("stop_iteration"), "{item:?}");
    // An interface.
    let take = friend("take", net)?;
    let intf = map_of(&[("_rintf", true.into()), ("inc", local_function(FnId(3), "inc"))]);
    let call = net.v_call(&take, vec![intf.into()]);
    let inv = net.friend_held("take")?;
    let got = inv.args.first().and_then(Value::as_map).cloned().ok_or("no interface")?;
    let inc = descriptor(got.get("inc").ok_or("no inc")?)?;
    let dispose = descriptor(got.get("_dispose").ok_or("no _dispose")?)?;
    for (what, method) in [("call", &inc.method), ("dispose of", &dispose.method)] {
        let m = net.mallory_rejected(method, &format!("steal-intf-{}", what.len()), "Permission denied")?;
        rows.push(Row {
            step: "stolen objects",
            frame: format!("{what} the friend's _rintf"),
            server: "delivered".into(),
            victim: short(&m),
        });
    }
    ensure!(net.v.engine.interfaces() == 1, "mallory disposed of it");
    let id = net.f_call(&inc, vec![], None);
    ensure!(net.wait_f(id)? == Ok(Value::from("callback ran")), "the friend's inc");
    let id = net.f_call(&dispose, vec![], None);
    ensure!(net.wait_f(id)? == Ok(Value::Nil), "the friend's dispose");
    net.f.reply(inv.id, Ok(Value::Nil));
    ensure!(net.wait_v(call)? == Ok(Value::Nil), "take");
    Ok(())
}

fn malformed(net: &mut Net, rows: &mut Vec<Row>) -> Check {
    let main = enc(map_of(&[
        ("type", "method".into()),
        ("to", net.fv.as_str().into()),
        ("method", "services.svc.echo".into()),
        ("session", "malformed0".into()),
    ]));
    let arg = |raw: Vec<u8>| {
        [vec![0x83], enc("promise"), enc("*"), enc("t"), enc(15.0), enc("args"), vec![0x91], raw].concat()
    };
    let frames: Vec<(&str, Bytes)> = vec![
        ("the reserved byte 0xc1 alone", Bytes::from_static(&[0xc1])),
        ("a main nested 1000 arrays deep", Bytes::from([vec![0x91; 1000], vec![0xc0]].concat())),
        ("a main with an integer key", concat(&[&[0x82, 0x01, 0x02], &enc("to"), &enc(net.fv.as_str())])),
        (
            "a main without `to`",
            Bytes::from(enc(map_of(&[("type", "method".into()), ("method", "services.svc.echo".into())]))),
        ),
        ("a main cut short", concat(&[&main[..main.len() / 2]])),
        ("a valid main, then 0xc1", concat(&[&main, &[0xc1]])),
        (
            "a valid main, then args claiming 4 Gi elements",
            concat(&[&main, &[0x81], &enc("args"), &mp::array32(u32::MAX)]),
        ),
        ("a valid main, then invalid UTF-8", concat(&[&main, &arg(mp::str_bytes(b"\xff\xfe"))])),
        (
            "a valid main, then args 100 000 deep",
            concat(&[&main, &arg([vec![0x91; 100_000], vec![0xc0]].concat())]),
        ),
        (
            "a valid main, then 3 bytes of trailing garbage",
            concat(&[&main, &enc(call_extra(vec![])), &[1, 2, 3]]),
        ),
    ];
    let errors = net.v.input_errors.len();
    for (what, bytes) in frames {
        record(net, rows, "malformed msgpack", what, &bytes);
    }
    let refused = &net.v.input_errors[errors..];
    ensure!(refused.iter().all(|e| matches!(e, InputError::Decode(_))), "{refused:?}");
    ensure!(refused.len() >= 5, "the victim refused only {} frames: {refused:?}", refused.len());
    Ok(())
}

/// Mallory calls the victim's `hold` with `t = 0`: at most 2 heartbeats a second come back.
fn zero_interval(net: &mut Net, rows: &mut Vec<Row>) -> Check {
    let window = StdDuration::from_secs(3);
    net.mallory_calls("services.svc.hold", "zero-t", vec![], &[("t", 0.0.into())]);
    let start = StdInstant::now();
    let is_hold =
        |i: &Invocation| matches!(&i.target, InvokeTarget::Service { function, .. } if function == "hold");
    ensure!(net.until(WAIT, |n| n.v.held.iter().any(is_hold)), "the victim never got the call");
    net.spin(window.saturating_sub(start.elapsed()));
    let beats = net.m.frames().iter().filter(|f| f.main_str("method") == Some("zero-t.heartbeat")).count();
    let inv = net.v.held.iter().find(|i| is_hold(i)).cloned().ok_or("not held")?;
    net.v.reply(inv.id, Ok("held".into()));
    ensure!(net.mallory_got("zero-t", "resolve")? == Value::from("held"), "no answer");
    rows.push(Row {
        step: "t = 0",
        frame: "call `hold` with t = 0".into(),
        server: format!("delivered; {beats} heartbeats reached mallory in {window:?}"),
        victim: "served, heartbeats clamped to min_heartbeat_interval".into(),
    });
    ensure!(
        (4..=7).contains(&beats),
        "{beats} heartbeats in {window:?} (at most 2 a second, and one at once)"
    );
    Ok(())
}

/// A second login with the victim's client id.
fn duplicate_login(net: &mut Net, rows: &mut Vec<Row>) -> Check {
    // The server pings the victim's built-in before it decides: the victim keeps running
    // while the duplicate's handshake is under way in another thread.
    let (url, ws, token) = (net.url.clone(), net.ws.clone(), net.token.clone());
    let attempt = std::thread::spawn(move || RawWs::connect(&url, "victim", Some(&ws), Some(&token)));
    let (served, sent) = (net.v.invocations.len(), net.v.sent.len());
    let _ = net.until(StdDuration::from_secs(20), |_| attempt.is_finished());
    let r = attempt.join().expect("the duplicate's thread");
    let replies = net.v.sent[sent..]
        .iter()
        .filter(|f| f.main_str("method").is_some_and(|m| m.ends_with(".resolve") || m.ends_with(".reject")))
        .count();
    let user_calls = net.v.invocations.len() - served;
    let outcome = match &r {
        Ok(_) => "accepted!".to_string(),
        Err(refusal) => {
            format!("refused: {:?}, close {:?}", refusal.error_text.as_deref().map(short), refusal.close)
        }
    };
    net.spin(StdDuration::from_millis(300));
    rows.push(Row {
        step: "duplicate login",
        frame: "handshake as `victim` with a valid token".into(),
        server: outcome.clone(),
        victim: format!(
            "{}; answered the server's liveness check ({replies} replies from built-in, {user_calls} user calls)",
            if net.v.engine.is_ready() { "still connected" } else { "disconnected" },
        ),
    });
    match r {
        Ok(_) => return Err("the server let a second `victim` in".into()),
        Err(refusal) => {
            let text = refusal.error_text.unwrap_or_default();
            ensure!(text.contains("Client already exists and is active"), "{outcome}");
        }
    }
    // hypha 0.21.137 then removes the *active* client it just defended (the cleanup in the
    // `except` branch of its connection setup, websocket.py): the victim's socket stays open,
    // but nothing is routed to it any more. PROTOCOL.md §3.3.1 rule 7: the engine must notice
    // and re-register or reconnect. Give it a few seconds, then see whether it is reachable.
    let reachable = |net: &mut Net| -> Result<String, String> {
        let now = net.f.now();
        let id = net.f.engine.get_service(now, "victim:svc", None).map_err(|e| e.to_string())?;
        let fetched = if net.until(StdDuration::from_secs(3), |n| n.f.settled.contains_key(&id)) {
            net.f
                .take(id)
                .expect("settled")
                .map(|_| "fetched".to_string())
                .map_err(|e| last_line(&e.to_string()))
        } else {
            Err("no answer in 3 s".into())
        };
        let echo = descriptor(net.victim_svc.as_map().and_then(|m| m.get("echo")).ok_or("no echo")?)?;
        let now = net.f.now();
        let options = CallOptions {
            timeout: Some(hypha_rpc_core::time::Duration::from_secs(2)),
            ..CallOptions::default()
        };
        let id =
            net.f.engine.call(now, &echo, vec!["ping".into()], None, options).map_err(|e| e.to_string())?;
        let _ = net.until(StdDuration::from_secs(3), |n| n.f.settled.contains_key(&id));
        let called = net.f.take(id).map(|r| r.map_err(|e| last_line(&e.to_string())));
        match (fetched, called) {
            (Ok(_), Some(Ok(_))) => Ok("reachable".into()),
            (f, c) => Err(format!("get_service: {f:?}; direct call of echo: {c:?}")),
        }
    };
    net.spin(StdDuration::from_secs(2));
    let state = reachable(net);
    rows.push(Row {
        step: "duplicate login",
        frame: "(then the friend tries to reach the victim)".into(),
        server: format!("{state:?}"),
        victim: format!(
            "is_ready() = {}, services {:?}",
            net.v.engine.is_ready(),
            net.v.engine.service_ids().collect::<Vec<_>>()
        ),
    });
    state.map(|_| ()).map_err(|e| {
        format!(
            "after the refused duplicate login the server no longer routes to the victim ({e}), \
             and the victim still believes it is connected and registered"
        )
    })
}
