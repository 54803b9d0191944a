//! Transcript replay: the server→client frames of real Python sessions are fed to our engine,
//! and every frame it answers with must equal the one the Python client sent, byte for byte,
//! once random session ids are mapped.

use std::collections::BTreeMap;

use bytes::Bytes;
use hypha_rpc_core::codec::decode_frame;
use hypha_rpc_core::codec::rtype::{Method, RTypeCodec, RemoteError};
use hypha_rpc_core::engine::local_function;
use hypha_rpc_core::time::{Duration, Instant};
use hypha_rpc_core::{
    CallError, CallOptions, Event, FnId, FunctionSpec, Invocation, InvokeTarget, Limits, Map, RequireContext,
    ServiceSpec, Value, Visibility,
};
use hypha_rpc_tests::drive::{self, assert_same_up_to_ids, drain, substitute_frame};
use hypha_rpc_tests::transcripts::{self, CapturedFrame};

const WS: &str = "ws-user-anonymouz-hyper-titanium-83345890";
const MANAGER: &str = "manager-delicate-dirigible-06049537";

struct Recording(Vec<CapturedFrame>);

impl Recording {
    fn load() -> Self {
        Recording(transcripts::load_all())
    }
    fn bytes(&self, scenario: &str, seq: u64) -> Bytes {
        let f = self.0.iter().find(|f| f.scenario == scenario && f.seq == seq).expect("frame");
        assert!(!f.truncated);
        Bytes::from(f.bytes.clone())
    }
}

fn interop_service() -> ServiceSpec {
    ServiceSpec::new("interop")
        .name("Interop test service")
        .description("hypha-rpc interop acceptance service")
        .visibility(Visibility::Public)
        .require_context(RequireContext::Functions(vec!["whoami".into()]))
        .function("echo", FunctionSpec::new("echo").doc("Return the argument unchanged."))
        .function("add", FunctionSpec::new("add").doc("Add two values."))
        .function(
            "kwfunc",
            FunctionSpec::new("kwfunc").doc("Return the received positional/keyword arguments."),
        )
        .function(
            "raise_error",
            FunctionSpec::new("raise_error").doc("Raise an exception with a specific message."),
        )
        .function("call_callback", FunctionSpec::new("call_callback"))
        .function("whoami", FunctionSpec::new("whoami"))
        .function("sleep", FunctionSpec::new("sleep"))
}

fn invocation(events: &[Event]) -> Invocation {
    match events {
        [Event::Invoke(i)] => i.clone(),
        other => panic!("expected one invocation, got {other:?}"),
    }
}

fn method_at(v: &Value) -> Method {
    Method::from_value(v).expect("a method").expect("valid")
}

/// The callee side (py-peer): our replies, heartbeats and callback calls must equal Python's.
#[test]
fn callee_frames_match_python() {
    let rec = Recording::load();
    let mut e = drive::engine("py-peer", 1);
    let t0 = Instant::from_micros(1_000_000);
    drive::connect(&mut e, t0, "py-peer", WS, MANAGER);
    e.register_service(t0, interop_service()).unwrap();
    let d = drain(&mut e);
    assert_eq!(d.frames.len(), 1);
    // Registration: everything but the generated schemas equals Python's.
    let ours = d.frames[0].extra.as_ref().unwrap().get("args").unwrap().as_array().unwrap()[0].clone();
    let theirs = decode_frame(&rec.bytes("register_service", 2), &Limits::default()).unwrap();
    let theirs = theirs.extra.unwrap().get("args").unwrap().as_array().unwrap()[0].clone();
    let strip = |v: &Value| {
        let mut m = v.as_map().unwrap().clone();
        m.remove("service_schema");
        m
    };
    assert_eq!(strip(&ours), strip(&theirs), "service registration info");

    let mut checked = 0;
    // add(2, 3) -> 5 and kwfunc(1, c=3) -> {a, b, c}: byte-exact replies.
    for (call, reply, value) in
        [(1, 2, Value::from(5)), (5, 6, Value::Map([("a", 1), ("b", 2), ("c", 3)].into_iter().collect()))]
    {
        e.handle_binary(t0, &rec.bytes("call_args_kwargs", call)).unwrap();
        let inv = invocation(&drain(&mut e).events);
        if call == 5 {
            assert_eq!(inv.args, vec![Value::from(1)]);
            assert_eq!(inv.kwargs.as_ref().and_then(|k| k.get("c")), Some(&Value::from(3)));
        }
        e.reply(t0, inv.id, Ok(value)).unwrap();
        let d = drain(&mut e);
        assert_eq!(d.bytes, vec![rec.bytes("call_args_kwargs", reply)], "call_args_kwargs #{reply}");
        checked += 1;
    }

    // raise_error("boom") -> reject with the error value.
    e.handle_binary(t0, &rec.bytes("error", 1)).unwrap();
    let inv = invocation(&drain(&mut e).events);
    let recorded = decode_frame(&rec.bytes("error", 2), &Limits::default()).unwrap();
    let err = RemoteError::from_value(&recorded.extra.unwrap().get("args").unwrap().as_array().unwrap()[0])
        .unwrap()
        .unwrap();
    e.reply(t0, inv.id, Err(err)).unwrap();
    assert_eq!(drain(&mut e).bytes, vec![rec.bytes("error", 2)], "error #2");
    checked += 1;

    // whoami(): the context comes from the server-written header only.
    e.handle_binary(t0, &rec.bytes("require_context", 1)).unwrap();
    let inv = invocation(&drain(&mut e).events);
    let ctx = inv.context.expect("whoami requires context");
    let recorded = decode_frame(&rec.bytes("require_context", 2), &Limits::default()).unwrap();
    let answer = recorded.extra.as_ref().unwrap().get("args").unwrap().as_array().unwrap()[0].clone();
    let answer = answer.as_map().unwrap();
    assert_eq!(answer.get("ws").and_then(Value::as_str), Some(ctx.ws.as_str()));
    assert_eq!(answer.get("from").and_then(Value::as_str), Some(ctx.from.as_str()));
    assert_eq!(
        answer.get("user_id").and_then(Value::as_str),
        ctx.user.as_map().and_then(|u| u.get("id")).and_then(Value::as_str)
    );
    e.reply(t0, inv.id, Ok(Value::Map(answer.clone()))).unwrap();
    assert_eq!(drain(&mut e).bytes, vec![rec.bytes("require_context", 2)], "require_context #2");
    checked += 1;

    // sleep(1.3) with t = 0.5: heartbeats at once, +0.5 s, +1.0 s, then the resolve.
    e.handle_binary(t0, &rec.bytes("heartbeat", 1)).unwrap();
    let inv = invocation(&drain(&mut e).events);
    for (dt, seq) in [(0, 2), (500, 4), (1000, 6)] {
        let now = t0 + Duration::from_millis(dt);
        assert_eq!(e.poll_timeout(), Some(now), "next heartbeat due");
        e.handle_timeout(now);
        assert_eq!(drain(&mut e).bytes, vec![rec.bytes("heartbeat", seq)], "heartbeat #{seq}");
        checked += 1;
    }
    e.reply(t0 + Duration::from_millis(1300), inv.id, Ok(Value::F64(1.3))).unwrap();
    assert_eq!(drain(&mut e).bytes, vec![rec.bytes("heartbeat", 8)], "heartbeat #8");
    checked += 1;

    // call_callback(cb, 2): heartbeat, then two calls of the caller's callback, then the result.
    let mut ids = BTreeMap::new();
    e.handle_binary(t0, &rec.bytes("callback", 1)).unwrap();
    let inv = invocation(&drain(&mut e).events);
    e.handle_timeout(t0);
    assert_eq!(drain(&mut e).bytes, vec![rec.bytes("callback", 2)], "callback #2 heartbeat");
    let cb = method_at(&inv.args[0]);
    assert_eq!(cb.target, format!("{WS}/py-caller"), "bare _rtarget qualified with the sender's workspace");
    let mut results = Vec::new();
    for (i, (sent, answer)) in [(3, 7), (8, 11)].into_iter().enumerate() {
        let opts = CallOptions { parent: inv.session.clone(), ..CallOptions::default() };
        let call = e.call(t0, &cb, vec![Value::from(i as u64)], None, opts).unwrap();
        let d = drain(&mut e);
        assert_same_up_to_ids(&d.bytes[0], &rec.bytes("callback", sent), &mut ids, "callback call");
        e.handle_binary(t0, &substitute_frame(&rec.bytes("callback", answer), &ids)).unwrap();
        match &drain(&mut e).events[..] {
            [Event::CallSettled { id, result: Ok(v) }] if *id == call => results.push(v.clone()),
            other => panic!("{other:?}"),
        }
        checked += 1;
    }
    e.reply(t0, inv.id, Ok(Value::Array(results))).unwrap();
    assert_eq!(drain(&mut e).bytes, vec![rec.bytes("callback", 12)], "callback #12");
    checked += 1;

    // The manager fetches our service for a caller: built-in.get_service("interop").
    e.handle_binary(t0, &rec.bytes("get_service", 2)).unwrap();
    let d = drain(&mut e);
    assert!(d.events.is_empty(), "built-in is answered by the engine itself");
    let ours = &d.frames[0];
    let theirs = decode_frame(&rec.bytes("get_service", 3), &Limits::default()).unwrap();
    assert_eq!(ours.main, theirs.main, "get_service reply header");
    let served = ours.extra.as_ref().unwrap().get("args").unwrap().as_array().unwrap()[0].clone();
    let recorded = theirs.extra.as_ref().unwrap().get("args").unwrap().as_array().unwrap()[0].clone();
    for key in ["id", "name", "description", "config"] {
        assert_eq!(served.as_map().unwrap().get(key), recorded.as_map().unwrap().get(key), "served {key}");
    }
    for f in ["echo", "add", "kwfunc", "raise_error"] {
        let mut ours = method_at(served.as_map().unwrap().get(f).unwrap());
        let theirs = method_at(recorded.as_map().unwrap().get(f).unwrap());
        ours.is_async = theirs.is_async; // Python's `_rasync` says whether its function is a coroutine
        assert_eq!(ours, theirs, "served descriptor of {f}");
    }
    checked += 1;
    assert_eq!(e.active_invocations(), 0);
    println!("replay: {checked} callee frames equal to Python's");
}

/// The caller side (py-caller): our calls must equal Python's, and their replies settle them.
#[test]
fn caller_frames_match_python() {
    let rec = Recording::load();
    let mut e = drive::engine("py-caller", 2);
    let t0 = Instant::from_micros(5_000_000);
    drive::connect(&mut e, t0, "py-caller", WS, MANAGER);
    let mut ids = BTreeMap::new();

    // get_service through the manager.
    let call = e.get_service(t0, &format!("{WS}/py-peer:interop"), None).unwrap();
    let d = drain(&mut e);
    assert_same_up_to_ids(&d.bytes[0], &rec.bytes("get_service", 0), &mut ids, "get_service #0");
    e.handle_binary(t0, &substitute_frame(&rec.bytes("get_service", 1), &ids)).unwrap(); // manager heartbeat
    e.handle_binary(t0, &substitute_frame(&rec.bytes("get_service", 4), &ids)).unwrap();
    let svc = match &drain(&mut e).events[..] {
        [Event::CallSettled { id, result: Ok(v) }] if *id == call => v.as_map().unwrap().clone(),
        other => panic!("{other:?}"),
    };
    let m = |name: &str| method_at(svc.get(name).unwrap());

    let mut checked = 1;
    let mut expect = |e: &mut hypha_rpc_core::Engine, call, sent: (&str, u64), answer: (&str, u64)| {
        let d = drain(e);
        assert_same_up_to_ids(&d.bytes[0], &rec.bytes(sent.0, sent.1), &mut ids, &format!("{sent:?}"));
        e.handle_binary(t0, &substitute_frame(&rec.bytes(answer.0, answer.1), &ids)).unwrap();
        checked += 1;
        match drain(e).events.as_slice() {
            [Event::CallSettled { id, result }] if *id == call => result.clone(),
            other => panic!("{other:?}"),
        }
    };
    let c = e.call(t0, &m("add"), vec![2.into(), 3.into()], None, CallOptions::default()).unwrap();
    assert_eq!(expect(&mut e, c, ("call_args_kwargs", 0), ("call_args_kwargs", 3)), Ok(Value::from(5)));
    let kw: Map = [("c", 3)].into_iter().collect();
    let c = e.call(t0, &m("kwfunc"), vec![1.into()], Some(kw), CallOptions::default()).unwrap();
    let r = expect(&mut e, c, ("call_args_kwargs", 4), ("call_args_kwargs", 7)).unwrap();
    assert_eq!(r.as_map().unwrap().get("c"), Some(&Value::from(3)));
    let c = e.call(t0, &m("raise_error"), vec!["boom".into()], None, CallOptions::default()).unwrap();
    match expect(&mut e, c, ("error", 0), ("error", 3)) {
        Err(CallError::Remote { message, trace }) => {
            assert_eq!(message, "interop-error: boom");
            assert!(trace.unwrap().starts_with("Traceback"));
        }
        other => panic!("{other:?}"),
    }
    let c = e.call(t0, &m("whoami"), vec![], None, CallOptions::default()).unwrap();
    let r = expect(&mut e, c, ("require_context", 0), ("require_context", 3)).unwrap();
    assert!(r.as_map().unwrap().contains_key("user_id"));

    // A callback passed as an argument: the callee calls it twice before answering.
    let c = e
        .call(
            t0,
            &m("call_callback"),
            vec![local_function(FnId(9), "<lambda>"), 2.into()],
            None,
            CallOptions::default(),
        )
        .unwrap();
    let d = drain(&mut e);
    assert_same_up_to_ids(&d.bytes[0], &rec.bytes("callback", 0), &mut ids, "callback #0");
    e.handle_binary(t0, &substitute_frame(&rec.bytes("callback", 4), &ids)).unwrap(); // heartbeat
    for (call_in, reply, value) in [(5, 6, 0u64), (9, 10, 10)] {
        e.handle_binary(t0, &substitute_frame(&rec.bytes("callback", call_in), &ids)).unwrap();
        let inv = invocation(&drain(&mut e).events);
        assert_eq!(inv.target, InvokeTarget::Callback { function: FnId(9), call: c });
        e.reply(t0, inv.id, Ok(Value::from(value))).unwrap();
        let d = drain(&mut e);
        assert_same_up_to_ids(&d.bytes[0], &rec.bytes("callback", reply), &mut ids, "callback reply");
        checked += 2;
    }
    e.handle_binary(t0, &substitute_frame(&rec.bytes("callback", 13), &ids)).unwrap();
    match drain(&mut e).events.as_slice() {
        [Event::CallSettled { id, result: Ok(v) }] if *id == c => {
            assert_eq!(v, &Value::Array(vec![0.into(), 10.into()]))
        }
        other => panic!("{other:?}"),
    }
    // Every call settled and its session was freed (the engine's own subscribe call aside).
    assert_eq!(e.pending_calls(), 1);
    println!("replay: {checked} caller frames equal to Python's");
}

/// A caller with `method_timeout = 1 s` sends `t: 0.5`, as Python's does.
#[test]
fn heartbeat_caller_frame_matches_python() {
    let rec = Recording::load();
    let mut config = hypha_rpc_core::EngineConfig::new("py-caller-hb");
    config.method_timeout = Duration::from_secs(1);
    let mut e = hypha_rpc_core::Engine::new(config, Instant::ZERO);
    drive::connect(&mut e, Instant::ZERO, "py-caller-hb", WS, MANAGER);
    let sleep = Method {
        target: format!("{WS}/py-peer"),
        method: "services.interop.sleep".into(),
        promise: Some(hypha_rpc_core::codec::rtype::PromiseMode::Compact),
        ..Method::default()
    };
    e.call(Instant::ZERO, &sleep, vec![Value::F64(1.3)], None, CallOptions::default()).unwrap();
    let d = drain(&mut e);
    let mut ids = BTreeMap::new();
    assert_same_up_to_ids(&d.bytes[0], &rec.bytes("heartbeat", 0), &mut ids, "heartbeat #0");
}

/// The first text frame and the `built-in` registration equal Python's (service schemas aside).
#[test]
fn handshake_and_builtin_registration_match_python() {
    let rec = Recording::load();
    let mut e = drive::engine("py-peer", 3);
    e.handle_transport_open(Instant::ZERO).unwrap();
    let d = drain(&mut e);
    assert_eq!(d.texts[0].as_bytes(), &rec.bytes("connect_handshake", 0)[..], "handshake text");
    let info = rec.0.iter().find(|f| f.scenario == "connect_handshake" && f.seq == 1).unwrap();
    e.handle_text(Instant::ZERO, std::str::from_utf8(&info.bytes).unwrap()).unwrap();
    let d = drain(&mut e);
    let ours = d.frames[0].clone();
    let theirs = decode_frame(&rec.bytes("connect_handshake", 4), &Limits::default()).unwrap();
    let strip = |f: &hypha_rpc_core::codec::Frame| {
        let mut extra = f.extra.clone().unwrap();
        let mut info = extra.get("args").unwrap().as_array().unwrap()[0].as_map().unwrap().clone();
        info.remove("service_schema");
        extra.insert("args", Value::Array(vec![Value::Map(info)]));
        extra.remove("promise");
        extra.remove("t");
        extra
    };
    assert_eq!(strip(&ours), strip(&theirs), "built-in registration info");
    let mut main = ours.main.clone();
    main.insert("session", theirs.main_str("session").unwrap());
    assert_eq!(main, theirs.main, "built-in registration header");
    assert_eq!(e.connection_info().unwrap().manager_id, MANAGER);
}

/// Large messages (PROTOCOL.md §7): a Python caller uploads a chunked call through our
/// `message_cache`, and a Python callee sends us a chunked reply keyed by our session.
#[test]
fn chunked_messages_from_python_are_reassembled() {
    let rec = Recording::load();
    let sc = "large_chunked_small";
    // Callee side: create, three sets, process; each answered exactly as Python did, then the
    // reassembled call arrives with the trusted header of the `process` frame.
    let mut e = drive::engine("py-peer-sc", 4);
    let t0 = Instant::from_micros(1);
    drive::connect(&mut e, t0, "py-peer-sc", WS, MANAGER);
    let svc = ServiceSpec::new("interop-sc")
        .visibility(Visibility::Public)
        .function("echo_bytes", FunctionSpec::new("echo_bytes"));
    e.register_service(t0, svc).unwrap();
    drain(&mut e);
    e.handle_binary(t0, &rec.bytes(sc, 1)).unwrap(); // get_service("built-in")
    let d = drain(&mut e);
    let builtin = &d.frames[0].extra.as_ref().unwrap().get("args").unwrap().as_array().unwrap()[0];
    let cfg = builtin.as_map().unwrap().get("config").unwrap().as_map().unwrap();
    assert_eq!(cfg.get("api_version"), Some(&Value::from(3)), "Python senders need api_version >= 3");
    assert!(
        builtin.as_map().unwrap().get("message_cache").and_then(Value::as_map).is_some_and(|m| m.len() == 5)
    );
    for (sent, reply) in [(5, 6), (11, 12), (13, 16), (14, 17)] {
        e.handle_binary(t0, &rec.bytes(sc, sent)).unwrap();
        assert_eq!(drain(&mut e).bytes, vec![rec.bytes(sc, reply)], "{sc} #{reply}");
    }
    assert_eq!(e.partial_messages(), 1);
    e.handle_binary(t0, &rec.bytes(sc, 21)).unwrap(); // process
    let d = drain(&mut e);
    assert_eq!(d.bytes, vec![rec.bytes(sc, 22)], "{sc} #22");
    let inv = invocation(&d.events);
    assert_eq!(
        inv.target,
        InvokeTarget::Service { service: "interop-sc".into(), function: "echo_bytes".into() }
    );
    assert_eq!(inv.caller, format!("{WS}/py-caller-sc"));
    let recorded =
        &rec.0.iter().find(|f| f.scenario == sc && f.seq == 21).unwrap().json["reassembled"][1]["args"][0];
    hypha_rpc_tests::transcripts::compare(&inv.args[0], recorded, "args[0]").unwrap();
    assert_eq!(inv.args[0].as_bin().unwrap().len(), 10_000);
    assert_eq!(e.partial_messages(), 0, "the buffer is freed once processed");

    // Caller side: our call's reply comes back in chunks keyed by our session.
    let mut e = drive::engine("py-caller-sc", 5);
    drive::connect(&mut e, t0, "py-caller-sc", WS, MANAGER);
    let echo = Method {
        target: format!("{WS}/py-peer-sc"),
        method: "services.interop-sc.echo_bytes".into(),
        promise: Some(hypha_rpc_core::codec::rtype::PromiseMode::Compact),
        ..Method::default()
    };
    let call = e.call(t0, &echo, vec![Value::bin(vec![0u8; 16])], None, CallOptions::default()).unwrap();
    let d = drain(&mut e);
    let ours = d.frames[0].main_str("session").unwrap().to_string();
    let mut ids = BTreeMap::from([("bVXFJMQKx3o8Jpt6nRUCAz".to_string(), ours)]);
    // The peer's built-in lookup, then create/set/process with heartbeat = true.
    e.handle_binary(t0, &substitute_frame(&rec.bytes(sc, 25), &ids)).unwrap();
    drain(&mut e);
    let later = t0 + Duration::from_secs(20);
    for (seq, ack) in [(29, 30), (35, 36), (37, 40), (38, 41)] {
        e.handle_binary(later, &substitute_frame(&rec.bytes(sc, seq), &ids)).unwrap();
        let d = drain(&mut e);
        assert_same_up_to_ids(&d.bytes[0], &rec.bytes(sc, ack), &mut ids, "chunk ack");
    }
    // Each chunk step counted as a heartbeat: at t0 + 40 s the call (30 s timeout) is alive.
    e.handle_timeout(t0 + Duration::from_secs(40));
    assert!(drain(&mut e).events.is_empty(), "chunk progress must reset the call's timer");
    e.handle_binary(later, &substitute_frame(&rec.bytes(sc, 45), &ids)).unwrap();
    let d = drain(&mut e);
    match d.events.as_slice() {
        [Event::CallSettled { id, result: Ok(v) }] if *id == call => {
            assert_eq!(v.as_bin().unwrap().len(), 10_000)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.partial_messages(), 0);
}

/// `_rintf` (PROTOCOL.md §9): an interface we return equals Python's, its methods are called
/// with `t: 5.0`, and `_dispose` frees it.
#[test]
fn rintf_interfaces_match_python() {
    let rec = Recording::load();
    let t0 = Instant::from_micros(1);
    // Producer side (py-peer): make_counter(10) returns {_rintf, name, inc, value}.
    let mut e = drive::engine("py-peer", 6);
    drive::connect(&mut e, t0, "py-peer", WS, MANAGER);
    let svc = ServiceSpec::new("interop")
        .visibility(Visibility::Public)
        .function("make_counter", FunctionSpec::new("make_counter"));
    e.register_service(t0, svc).unwrap();
    drain(&mut e);
    let mut ids = BTreeMap::new();
    e.handle_binary(t0, &rec.bytes("rintf", 1)).unwrap();
    let inv = invocation(&drain(&mut e).events);
    let mut counter = Map::new();
    counter.push("_rintf", true);
    counter.push("name", "counter");
    counter.push("inc", local_function(FnId(1), "inc"));
    counter.push("value", local_function(FnId(2), "value"));
    e.reply(t0, inv.id, Ok(Value::Map(counter))).unwrap();
    let d = drain(&mut e);
    assert_same_up_to_ids(&d.bytes[0], &rec.bytes("rintf", 2), &mut ids, "rintf #2");
    assert_eq!(e.interfaces(), 1);
    for (call, reply, f) in [(5, 6, 1), (9, 10, 2)] {
        e.handle_binary(t0, &substitute_frame(&rec.bytes("rintf", call), &ids)).unwrap();
        let inv = invocation(&drain(&mut e).events);
        assert!(
            matches!(inv.target, InvokeTarget::Interface { function: FnId(x), .. } if x == f),
            "{:?}",
            inv.target
        );
        e.reply(t0, inv.id, Ok(Value::from(11))).unwrap();
        assert_same_up_to_ids(&drain(&mut e).bytes[0], &rec.bytes("rintf", reply), &mut ids, "rintf reply");
    }
    e.handle_binary(t0, &substitute_frame(&rec.bytes("rintf", 13), &ids)).unwrap();
    let d = drain(&mut e);
    assert_same_up_to_ids(&d.bytes[0], &rec.bytes("rintf", 15), &mut ids, "_dispose reply");
    assert!(
        matches!(&d.events[..], [Event::InterfaceDisposed { functions, .. }] if functions == &[FnId(1), FnId(2)])
    );
    assert_eq!(e.interfaces(), 0);

    // Consumer side (py-caller): the interface's methods use the rintf timeout (t = 5.0).
    let mut e = drive::engine("py-caller", 7);
    drive::connect(&mut e, t0, "py-caller", WS, MANAGER);
    let mut ids = BTreeMap::new();
    let make = Method {
        target: format!("{WS}/py-peer"),
        method: "services.interop.make_counter".into(),
        promise: Some(hypha_rpc_core::codec::rtype::PromiseMode::Compact),
        ..Method::default()
    };
    let c = e.call(t0, &make, vec![10.into()], None, CallOptions::default()).unwrap();
    assert_same_up_to_ids(&drain(&mut e).bytes[0], &rec.bytes("rintf", 0), &mut ids, "rintf #0");
    e.handle_binary(t0, &substitute_frame(&rec.bytes("rintf", 3), &ids)).unwrap();
    let counter = match drain(&mut e).events.as_slice() {
        [Event::CallSettled { id, result: Ok(v) }] if *id == c => v.as_map().unwrap().clone(),
        other => panic!("{other:?}"),
    };
    for (name, sent, answer, want) in
        [("inc", 4, 7, Value::from(11)), ("value", 8, 11, Value::from(11)), ("_dispose", 12, 17, Value::Nil)]
    {
        let m = method_at(counter.get(name).unwrap());
        let c = e.call(t0, &m, vec![], None, CallOptions::default()).unwrap();
        assert_same_up_to_ids(&drain(&mut e).bytes[0], &rec.bytes("rintf", sent), &mut ids, name);
        e.handle_binary(t0, &substitute_frame(&rec.bytes("rintf", answer), &ids)).unwrap();
        match drain(&mut e).events.as_slice() {
            [Event::CallSettled { id, result: Ok(v) }] if *id == c => assert_eq!(v, &want),
            other => panic!("{other:?}"),
        }
    }
}

/// Generators (PROTOCOL.md §8), against the `generator` and `generator_early_close`
/// transcripts: producer frames (descriptor, heartbeat + item per pull, stop_iteration, close)
/// and consumer frames equal Python's.
#[test]
fn generators_match_python() {
    use hypha_rpc_core::GenId;
    use hypha_rpc_core::codec::rtype::{Generator, StopIteration};
    use hypha_rpc_core::engine::local_generator;
    let rec = Recording::load();
    let t0 = Instant::from_micros(1);
    for (sc, items, close_at) in [("generator", 3u64, None), ("generator_early_close", 10, Some(10u64))] {
        // Producer (py-peer).
        let mut e = drive::engine("py-peer", 8);
        drive::connect(&mut e, t0, "py-peer", WS, MANAGER);
        let svc = ServiceSpec::new("interop")
            .visibility(Visibility::Public)
            .function("sync_gen", FunctionSpec::new("sync_gen"))
            .function("async_gen", FunctionSpec::new("async_gen"));
        e.register_service(t0, svc).unwrap();
        drain(&mut e);
        let mut ids = BTreeMap::new();
        e.handle_binary(t0, &rec.bytes(sc, 1)).unwrap();
        let inv = invocation(&drain(&mut e).events);
        assert_eq!(inv.args, vec![Value::from(items)]);
        e.reply(t0, inv.id, Ok(local_generator(GenId(items)))).unwrap();
        assert_same_up_to_ids(&drain(&mut e).bytes[0], &rec.bytes(sc, 2), &mut ids, "generator descriptor");
        let mut seq = 5;
        let mut n = 0u64;
        loop {
            if close_at.map(|c| c + 1) == Some(seq) {
                // The consumer closes early: answered at once (Python heartbeats first), and
                // the driver is told.
                e.handle_binary(t0, &substitute_frame(&rec.bytes(sc, seq), &ids)).unwrap();
                let d = drain(&mut e);
                assert_same_up_to_ids(&d.bytes[0], &rec.bytes(sc, seq + 2), &mut ids, "close reply");
                assert!(
                    matches!(&d.events[..], [Event::GeneratorClosed { generator: GenId(10) }]),
                    "{:?}",
                    d.events
                );
                break;
            }
            e.handle_binary(t0, &substitute_frame(&rec.bytes(sc, seq), &ids)).unwrap();
            let inv = invocation(&drain(&mut e).events);
            assert_eq!(inv.target, InvokeTarget::GeneratorNext { generator: GenId(items) });
            e.handle_timeout(t0); // an async producer: one heartbeat before the item
            assert_same_up_to_ids(&drain(&mut e).bytes[0], &rec.bytes(sc, seq + 1), &mut ids, "heartbeat");
            let recorded = decode_frame(&rec.bytes(sc, seq + 2), &Limits::default()).unwrap();
            let item = recorded.extra.unwrap().get("args").unwrap().as_array().unwrap()[0].clone();
            let end = hypha_rpc_core::engine::is_stop_iteration(&item);
            let reply = if end { StopIteration.to_value() } else { item };
            e.reply(t0, inv.id, Ok(reply)).unwrap();
            assert_same_up_to_ids(&drain(&mut e).bytes[0], &rec.bytes(sc, seq + 2), &mut ids, "item");
            n += 1;
            seq += 6;
            if end {
                assert_eq!(n, items + 1);
                break;
            }
        }
        assert_eq!(e.exports(), 0, "{sc}: the producer holds nothing afterwards");

        // Consumer (py-caller).
        let mut e = drive::engine("py-caller", 9);
        drive::connect(&mut e, t0, "py-caller", WS, MANAGER);
        let mut ids = BTreeMap::new();
        let name = if sc == "generator" { "sync_gen" } else { "async_gen" };
        let make = Method {
            target: format!("{WS}/py-peer"),
            method: format!("services.interop.{name}"),
            promise: Some(hypha_rpc_core::codec::rtype::PromiseMode::Compact),
            ..Method::default()
        };
        let c = e.call(t0, &make, vec![items.into()], None, CallOptions::default()).unwrap();
        assert_same_up_to_ids(&drain(&mut e).bytes[0], &rec.bytes(sc, 0), &mut ids, "call");
        e.handle_binary(t0, &substitute_frame(&rec.bytes(sc, 3), &ids)).unwrap();
        let g = match drain(&mut e).events.as_slice() {
            [Event::CallSettled { id, result: Ok(v) }] if *id == c => {
                Generator::from_value(v).unwrap().unwrap()
            }
            other => panic!("{other:?}"),
        };
        let mut seq = 4;
        loop {
            let closing = close_at == Some(seq);
            let id = if closing { e.generator_close(t0, &g) } else { e.generator_next(t0, &g) }.unwrap();
            let sent = seq;
            assert_same_up_to_ids(&drain(&mut e).bytes[0], &rec.bytes(sc, sent), &mut ids, "pull");
            e.handle_binary(t0, &substitute_frame(&rec.bytes(sc, sent + 4), &ids)).unwrap(); // heartbeat
            e.handle_binary(t0, &substitute_frame(&rec.bytes(sc, sent + 5), &ids)).unwrap();
            let v = match drain(&mut e).events.as_slice() {
                [Event::CallSettled { id: got, result: Ok(v) }] if *got == id => v.clone(),
                other => panic!("{other:?}"),
            };
            if closing {
                assert_eq!(v, Value::Bool(true));
                break;
            }
            if hypha_rpc_core::engine::is_stop_iteration(&v) {
                break;
            }
            seq += 6;
        }
    }
}
