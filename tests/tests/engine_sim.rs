//! Engine ↔ engine tests through the simulated hub: real protocol engines call each other via an in-memory Hypha server under virtual time, covering services, errors, context, callbacks, timeouts, heartbeats, disconnections, reconnection, restarts, hostile peers and determinism.

use std::cell::Cell;
use std::rc::Rc;

use hypha_rpc_core::codec::rtype::{Method, PromiseMode, RTypeCodec};
use hypha_rpc_core::codec::{Frame, encode_frame};
use hypha_rpc_core::engine::local_function;
use hypha_rpc_core::time::{Duration, Instant};
use hypha_rpc_core::{
    CallError, CallId, CallOptions, EngineConfig, Event, FnId, FunctionSpec, Invocation, InvokeTarget, Map,
    RequireContext, ServiceSpec, Value, Visibility,
};
use hypha_rpc_tests::hub::{HubConfig, HubOutput, WsMessage};
use hypha_rpc_tests::sim::{ClientId, Dir, Handler, Owner, Reply, Sim, handler, method_at, remote_error};

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------------------------
// Helpers.

fn new_sim() -> Sim {
    Sim::new(HubConfig::default())
}

/// An anonymous client, connected (alone in its own workspace).
fn anon(sim: &mut Sim, name: &str) -> ClientId {
    let c = sim.add_client(EngineConfig::new(name));
    sim.connect(c);
    c
}

/// A token minted by `owner` through the manager's `generate_token`.
fn mint_token(sim: &mut Sim, owner: ClientId) -> String {
    let mut config = Map::new();
    config.insert("permission", "read_write");
    let call = sim.call_manager(owner, "generate_token", vec![Value::from(config)], None);
    let token = sim.wait_ok(owner, call);
    token.as_str().expect("a token string").to_string()
}

/// A client that joins `owner`'s workspace with a token `owner` minted.
fn join(sim: &mut Sim, owner: ClientId, name: &str) -> ClientId {
    let token = mint_token(sim, owner);
    join_with(sim, owner, name, &token, Duration::from_secs(30))
}

fn join_with(sim: &mut Sim, owner: ClientId, name: &str, token: &str, method_timeout: Duration) -> ClientId {
    let mut config = EngineConfig::new(name);
    config.token = Some(token.to_string());
    config.workspace = Some(sim.workspace(owner));
    config.method_timeout = method_timeout;
    let c = sim.add_client(config);
    sim.connect(c);
    c
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or_else(|| panic!("not an integer: {v:?}"))
}

fn get<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.as_map().and_then(|m| m.get(key)).unwrap_or_else(|| panic!("no `{key}` in {v:?}"))
}

fn get_str<'a>(v: &'a Value, key: &str) -> &'a str {
    get(v, key).as_str().unwrap_or_else(|| panic!("`{key}` is not a string in {v:?}"))
}

fn map_of(entries: &[(&str, Value)]) -> Map {
    let mut m = Map::new();
    for (k, v) in entries {
        m.insert(*k, v.clone());
    }
    m
}

fn sum_handler() -> Handler {
    handler(|inv: &Invocation| Reply::ok(inv.args.iter().filter_map(Value::as_i64).sum::<i64>()))
}

/// `{args, kwargs}` exactly as the handler received them.
fn echo_call_handler() -> Handler {
    handler(|inv: &Invocation| {
        let kwargs = inv.kwargs.clone().map_or(Value::Nil, Value::from);
        Reply::ok(map_of(&[("args", Value::from(inv.args.clone())), ("kwargs", kwargs)]))
    })
}

fn math_service() -> ServiceSpec {
    ServiceSpec::new("math")
        .function("add", FunctionSpec::new("add").doc("Add numbers."))
        .function("kw", FunctionSpec::new("kw"))
        .function("fail", FunctionSpec::new("fail"))
}

fn math_handlers() -> Vec<(&'static str, Handler)> {
    vec![
        ("add", sum_handler()),
        ("kw", echo_call_handler()),
        (
            "fail",
            handler(|_: &Invocation| {
                Reply::Err(hypha_rpc_core::codec::rtype::RemoteError {
                    message: "boom: division by zero".into(),
                    trace: Some(
                        "Traceback (most recent call last):\nZeroDivisionError: division by zero\n".into(),
                    ),
                    other: Map::new(),
                })
            }),
        ),
    ]
}

/// A service of slow functions: `long` takes `secs` (first argument) of async work.
fn slow_service() -> ServiceSpec {
    ServiceSpec::new("slow")
        .function("long", FunctionSpec::new("long"))
        .function("stuck", FunctionSpec::new("stuck"))
        .function("forever", FunctionSpec::new("forever"))
}

fn slow_handlers() -> Vec<(&'static str, Handler)> {
    vec![
        (
            "long",
            handler(|inv: &Invocation| {
                let secs = inv.args.first().and_then(Value::as_u64).unwrap_or(10);
                Reply::After(Duration::from_secs(secs), Ok(Value::from(format!("slept {secs}s"))))
            }),
        ),
        ("stuck", handler(|_: &Invocation| Reply::Blocking(Duration::from_secs(100), Ok("too late".into())))),
        ("forever", handler(|_: &Invocation| Reply::Never)),
    ]
}

/// Alice (anonymous, serves `math` and `slow`) and Bob (in Alice's workspace via a token).
fn world() -> (Sim, ClientId, ClientId) {
    let mut sim = new_sim();
    let a = anon(&mut sim, "alice");
    let reg = sim.register(a, math_service(), math_handlers());
    assert_eq!(sim.wait_ok(a, reg), Value::Nil);
    let reg = sim.register(a, slow_service(), slow_handlers());
    sim.wait_ok(a, reg);
    let b = join(&mut sim, a, "bob");
    (sim, a, b)
}

fn fetch(sim: &mut Sim, c: ClientId, id: &str) -> Value {
    let call = sim.get_service(c, id);
    sim.wait_ok(c, call)
}

fn remote_message(r: &Result<Value, CallError>) -> &str {
    match r {
        Err(CallError::Remote { message, .. }) => message,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

/// The `session` of the last call frame `c` sent for `method`.
fn session_of(sim: &Sim, c: ClientId, method: &str) -> String {
    sim.frames(c, Dir::Up)
        .iter()
        .rev()
        .find(|(_, f)| f.main_str("method") == Some(method))
        .and_then(|(_, f)| f.main_str("session").map(String::from))
        .unwrap_or_else(|| panic!("no call of {method}"))
}

/// Heartbeat frames `c` sent for session `session`, with their times.
fn heartbeats(sim: &Sim, c: ClientId, session: &str) -> Vec<Instant> {
    let method = format!("{session}.heartbeat");
    sim.frames(c, Dir::Up)
        .iter()
        .filter(|(_, f)| f.main_str("method") == Some(method.as_str()))
        .map(|(t, _)| *t)
        .collect()
}

fn frame(main: Map, extra: Option<Map>) -> bytes::Bytes {
    encode_frame(&Frame { main, extra })
}

// ---------------------------------------------------------------------------------------------
// Connecting.

#[test]
fn clients_connect_into_their_own_or_a_shared_workspace() {
    let mut sim = new_sim();
    let a = anon(&mut sim, "alice");
    let x = anon(&mut sim, "xavier");
    assert_ne!(sim.workspace(a), sim.workspace(x), "each anonymous client gets its own workspace");
    assert!(sim.workspace(a).starts_with("ws-user-anonymouz-"), "{}", sim.workspace(a));

    let b = join(&mut sim, a, "bob");
    assert_eq!(sim.workspace(b), sim.workspace(a), "a token from generate_token joins alice's workspace");
    for c in [a, x, b] {
        let link = sim.link(c).expect("connected");
        assert_eq!(sim.hub.connection_client(link), Some(sim.full_id(c)));
        assert!(sim.hub.services().contains(&format!("{}:built-in", sim.full_id(c))));
        assert_eq!(sim.hub.subscriptions(link), vec!["client_disconnected".to_string()]);
        assert!(sim.engine(c).is_ready());
        assert!(matches!(sim.events(c)[0].1, Event::Connected { reconnected: false, .. }));
    }
    // Bob's user is the token's: a child of alice's anonymous user.
    let bob_user = sim.hub.connection_user(sim.link(b).unwrap()).unwrap();
    let alice_user = sim.hub.connection_user(sim.link(a).unwrap()).unwrap();
    assert_eq!(get_str(&bob_user, "parent"), get_str(&alice_user, "id"));
    sim.finish();
}

#[test]
fn step_jumps_to_the_earliest_deadline_and_keepalives_hold_links_open() {
    let mut sim = new_sim();
    let a = anon(&mut sim, "alice");
    let t0 = sim.now();
    let link = sim.link(a);
    // The first deadline is alice's keep-alive ping, 20 s after connecting.
    assert_eq!(sim.next_deadline(), Some(t0 + 20 * SEC));
    assert_eq!(sim.step(), Some(t0 + 20 * SEC));
    let last = sim.trace().iter().rev().take(2).collect::<Vec<_>>();
    assert_eq!(last[1].text(), Some(r#"{"type": "ping"}"#));
    assert_eq!(last[0].text(), Some(r#"{"type": "pong"}"#));

    // A raw client that never speaks again is cut by the idle timeout at exactly 600 s; the
    // pinging engine stays on its link for an hour.
    let raw = sim.raw_connect("quiet", None, None);
    let t1 = sim.now();
    sim.run_until(t0 + 3600 * SEC);
    assert_eq!(sim.link(a), link, "no reconnection was needed");
    let closed = sim
        .trace()
        .iter()
        .find(|t| t.conn == sim.raw_conn(raw) && matches!(t.what, HubOutput::Close { .. }))
        .expect("the idle raw connection was closed");
    assert_eq!(closed.at, t1 + 600 * SEC);
    assert_eq!(closed.what, HubOutput::Close { code: 1001, reason: "Idle timeout (600s)".into() });
    let pings = sim.frames(a, Dir::Up).len();
    assert!(pings >= 2, "alice's binary traffic: {pings}");
    sim.finish();
}

// ---------------------------------------------------------------------------------------------
// Services and calls.

#[test]
fn get_service_in_every_id_form_and_call_with_args_and_kwargs() {
    let (mut sim, a, b) = world();
    let ws = sim.workspace(a);
    let full = format!("{ws}/alice:math");
    for id in ["math".to_string(), "alice:math".to_string(), full.clone()] {
        let svc = fetch(&mut sim, b, &id);
        assert_eq!(get_str(&svc, "id"), full, "get_service({id})");
        assert_eq!(get_str(get(&svc, "config"), "workspace"), ws);
        let add = method_at(&svc, "add");
        assert_eq!(add.target, sim.full_id(a));
        assert_eq!(add.method, "services.math.add");
        assert_eq!(add.promise, Some(PromiseMode::Compact));
        assert_eq!(add.doc_str(), Some("Add numbers."));
        let call = sim.call(b, &add, vec![2.into(), 3.into()], None);
        assert_eq!(sim.wait_ok(b, call), Value::from(5));
    }

    let svc = fetch(&mut sim, b, "math");
    let kw = method_at(&svc, "kw");
    let kwargs = map_of(&[("c", 3.into()), ("name", "x".into())]);
    let call = sim.call(b, &kw, vec![1.into(), "two".into()], Some(kwargs.clone()));
    let out = sim.wait_ok(b, call);
    assert_eq!(get(&out, "args"), &Value::from(vec![Value::from(1), Value::from("two")]));
    assert_eq!(get(&out, "kwargs"), &Value::from(kwargs.clone()));
    let (_, inv) = sim.invocations(a).last().unwrap();
    assert_eq!(inv.caller, sim.full_id(b));
    assert_eq!(inv.kwargs.as_ref(), Some(&kwargs));
    assert!(inv.context.is_none(), "math does not ask for the context");
    assert_eq!(inv.target, InvokeTarget::Service { service: "math".into(), function: "kw".into() });

    // A call with no arguments at all.
    let call = sim.call(b, &method_at(&svc, "add"), vec![], None);
    assert_eq!(sim.wait_ok(b, call), Value::from(0));
    sim.finish();
}

#[test]
fn remote_errors_arrive_as_call_error_remote() {
    let (mut sim, _a, b) = world();
    let svc = fetch(&mut sim, b, "math");
    let call = sim.call(b, &method_at(&svc, "fail"), vec![], None);
    match sim.wait(b, call) {
        Err(CallError::Remote { message, trace }) => {
            assert_eq!(message, "boom: division by zero");
            assert_eq!(
                trace.as_deref(),
                Some("Traceback (most recent call last):\nZeroDivisionError: division by zero\n")
            );
        }
        other => panic!("{other:?}"),
    }

    // A function the service does not have: the callee engine refuses it.
    let mut missing = method_at(&svc, "add");
    missing.method = "services.math.nope".into();
    let call = sim.call(b, &missing, vec![], None);
    let r = sim.wait(b, call);
    assert!(remote_message(&r).contains("Method expired or not found"), "{r:?}");

    // A service nobody registered: the manager refuses it.
    let call = sim.get_service(b, "nothing-here");
    let r = sim.wait(b, call);
    assert!(remote_message(&r).contains("Service not found"), "{r:?}");
    sim.finish();
}

#[test]
fn manager_api_echo_list_services_generate_token() {
    let (mut sim, a, b) = world();
    let data = map_of(&[
        ("x", Value::from(vec![Value::from(1), Value::from("two"), Value::from(3.5)])),
        ("nested", Value::from(map_of(&[("ok", true.into())]))),
    ]);
    let call = sim.call_manager(b, "echo", vec![Value::from(data.clone())], None);
    assert_eq!(sim.wait_ok(b, call), Value::from(data));

    let call = sim.call_manager(b, "list_services", vec![], None);
    let list = sim.wait_ok(b, call);
    let mut ids: Vec<String> =
        list.as_array().unwrap().iter().map(|s| get_str(s, "id").to_string()).collect();
    ids.sort();
    let (fa, fb) = (sim.full_id(a), sim.full_id(b));
    let mut want =
        vec![format!("{fa}:built-in"), format!("{fa}:math"), format!("{fa}:slow"), format!("{fb}:built-in")];
    want.sort();
    assert_eq!(ids, want);
    let math = list.as_array().unwrap().iter().find(|s| get_str(s, "id").ends_with(":math")).unwrap();
    assert_eq!(get_str(get(math, "config"), "visibility"), "protected");

    // kwargs reach the manager too.
    let query = map_of(&[("query", Value::from(map_of(&[("type", "built-in".into())])))]);
    let call = sim.call_manager(b, "list_services", vec![], Some(query));
    assert_eq!(sim.wait_ok(b, call).as_array().unwrap().len(), 2);

    // A minted token lets a third client in; the minted user is a child of alice's.
    let token = mint_token(&mut sim, a);
    assert!(token.starts_with("hubtoken:"), "{token}");
    let c = join_with(&mut sim, a, "carol", &token, Duration::from_secs(30));
    assert_eq!(sim.workspace(c), sim.workspace(a));
    // A client of another workspace may not mint tokens for alice's.
    let d = anon(&mut sim, "dave");
    let config = map_of(&[("workspace", sim.workspace(a).into())]);
    let call = sim.call_manager(d, "generate_token", vec![Value::from(config)], None);
    let r = sim.wait(d, call);
    assert!(remote_message(&r).contains("You do not have any permission for workspace"), "{r:?}");
    sim.finish();
}

#[test]
fn protected_services_refuse_other_workspaces_public_ones_do_not() {
    let mut sim = new_sim();
    let a = anon(&mut sim, "alice");
    let secret = ServiceSpec::new("secret").function("add", FunctionSpec::new("add"));
    let open =
        ServiceSpec::new("open").visibility(Visibility::Public).function("add", FunctionSpec::new("add"));
    for spec in [secret, open] {
        let reg = sim.register(a, spec, vec![("add", sum_handler())]);
        sim.wait_ok(a, reg);
    }
    let b = join(&mut sim, a, "bob");
    let d = anon(&mut sim, "dave"); // another workspace
    let ws = sim.workspace(a);

    // Same workspace: both work.
    let svc = fetch(&mut sim, b, "secret");
    let secret_add = method_at(&svc, "add");
    let call = sim.call(b, &secret_add, vec![1.into(), 2.into()], None);
    assert_eq!(sim.wait_ok(b, call), Value::from(3));

    // Another workspace: the manager refuses the protected service...
    let call = sim.get_service(d, &format!("{ws}/alice:secret"));
    let r = sim.wait(d, call);
    assert!(remote_message(&r).contains("Permission denied"), "{r:?}");
    // ...and so does alice's engine when dave calls it directly with a descriptor he obtained.
    let call = sim.call(d, &secret_add, vec![1.into(), 2.into()], None);
    let r = sim.wait(d, call);
    assert!(remote_message(&r).contains("Permission denied for invoking protected method"), "{r:?}");
    assert_eq!(sim.invocations(a).len(), 1, "the handler never ran for dave");

    // The public service is reachable from anywhere.
    let svc = fetch(&mut sim, d, &format!("{ws}/alice:open"));
    let call = sim.call(d, &method_at(&svc, "add"), vec![4.into(), 5.into()], None);
    assert_eq!(sim.wait_ok(d, call), Value::from(9));
    assert_eq!(sim.invocations(a).last().unwrap().1.caller, sim.full_id(d));
    sim.finish();
}

// ---------------------------------------------------------------------------------------------
// The trusted context.

#[test]
fn require_context_is_set_by_the_server_and_cannot_be_forged() {
    let (mut sim, a, b) = world();
    let spec = ServiceSpec::new("ctx")
        .require_context(RequireContext::Functions(vec!["whoami".into()]))
        .function("whoami", FunctionSpec::new("whoami"))
        .function("plain", FunctionSpec::new("plain"));
    let whoami = handler(|inv: &Invocation| {
        let ctx = inv.context.as_ref().expect("whoami gets the context");
        let user_id = ctx.user.as_map().and_then(|u| u.get("id")).cloned().unwrap_or_default();
        Reply::ok(map_of(&[
            ("from", ctx.from.as_str().into()),
            ("ws", ctx.ws.as_str().into()),
            ("to", ctx.to.as_str().into()),
            ("method", ctx.method.as_str().into()),
            ("user_id", user_id),
        ]))
    });
    let plain = handler(|inv: &Invocation| Reply::ok(inv.context.is_none()));
    let reg = sim.register(a, spec, vec![("whoami", whoami), ("plain", plain)]);
    sim.wait_ok(a, reg);

    let bob_user = sim.hub.connection_user(sim.link(b).unwrap()).unwrap();
    let bob_user_id = get_str(&bob_user, "id").to_string();
    let svc = fetch(&mut sim, b, "ctx");
    let call = sim.call(b, &method_at(&svc, "whoami"), vec![], None);
    let me = sim.wait_ok(b, call);
    assert_eq!(get_str(&me, "from"), sim.full_id(b));
    assert_eq!(get_str(&me, "ws"), sim.workspace(b));
    assert_eq!(get_str(&me, "to"), sim.full_id(a));
    assert_eq!(get_str(&me, "method"), "services.ctx.whoami");
    assert_eq!(get_str(&me, "user_id"), bob_user_id);
    let call = sim.call(b, &method_at(&svc, "plain"), vec![], None);
    assert_eq!(sim.wait_ok(b, call), Value::from(true), "plain does not get the context");

    // Bob hand-crafts a frame with forged identity fields in main (the hub overwrites them)
    // and in extra (only the engine can ignore those).
    let forged_user =
        Value::from(map_of(&[("id", "root".into()), ("roles", Value::from(vec!["admin".into()]))]));
    let main = map_of(&[
        ("type", "method".into()),
        ("from", "evil-ws/mallory".into()),
        ("to", sim.full_id(a).into()),
        ("method", "services.ctx.whoami".into()),
        ("session", "ForgedSession0000000001".into()),
        ("ws", "evil-ws".into()),
        ("user", forged_user.clone()),
    ]);
    let extra = map_of(&[
        ("promise", "*".into()),
        ("t", 15.0.into()),
        ("from", "evil-ws/mallory".into()),
        ("to", sim.full_id(a).into()),
        ("ws", "evil-ws".into()),
        ("user", forged_user),
        ("method", "services.ctx.plain".into()),
    ]);
    let invocations = sim.invocations(a).len();
    sim.inject(b, frame(main, Some(extra)));
    assert_eq!(sim.invocations(a).len(), invocations + 1);
    let (_, inv) = sim.invocations(a).last().unwrap().clone();
    assert_eq!(inv.target, InvokeTarget::Service { service: "ctx".into(), function: "whoami".into() });
    let ctx = inv.context.expect("context");
    assert_eq!(ctx.from, sim.full_id(b));
    assert_eq!(ctx.ws, sim.workspace(b));
    assert_eq!(
        ctx.user.as_map().and_then(|u| u.get("id")).and_then(Value::as_str),
        Some(bob_user_id.as_str())
    );
    assert_eq!(inv.caller, sim.full_id(b));
    // The answer went to bob (the real sender) and says who he really is.
    let reply = sim
        .frames(b, Dir::Down)
        .into_iter()
        .find(|(_, f)| f.main_str("method") == Some("ForgedSession0000000001.resolve"))
        .expect("the reply to the hand-made call reached bob");
    let args = reply.1.extra.as_ref().and_then(|e| e.get("args")).and_then(Value::as_array).unwrap();
    assert_eq!(get_str(&args[0], "from"), sim.full_id(b));
    assert_eq!(get_str(&args[0], "user_id"), bob_user_id);
    sim.finish();
}

// ---------------------------------------------------------------------------------------------
// Callbacks.

#[test]
fn callbacks_are_called_back_during_the_call_and_expire_after_it() {
    let (mut sim, a, b) = world();
    let spec = ServiceSpec::new("jobs").function("run", FunctionSpec::new("run"));
    // run(callback, n): calls callback("50%") first, works n more seconds, then returns
    // ["done", <what the callback returned>].
    let run = handler(|inv: &Invocation| {
        let cb = Method::from_value(&inv.args[0]).expect("a method").expect("valid");
        let secs = inv.args.get(1).and_then(Value::as_u64).unwrap_or(0);
        Reply::call(cb, vec!["50%".into()], move |r| match r {
            Ok(v) => Reply::After(Duration::from_secs(secs), Ok(Value::from(vec!["done".into(), v]))),
            Err(e) => Reply::error(format!("callback failed: {e}")),
        })
    });
    let reg = sim.register(a, spec, vec![("run", run)]);
    sim.wait_ok(a, reg);
    let seen = Rc::new(Cell::new(0));
    let counter = seen.clone();
    sim.on_callback(
        b,
        handler(move |inv: &Invocation| {
            counter.set(counter.get() + 1);
            match &inv.target {
                InvokeTarget::Callback { function, .. } => {
                    Reply::ok(format!("ack {} {}", function.0, inv.args[0].as_str().unwrap_or("?")))
                }
                other => Reply::error(format!("unexpected {other:?}")),
            }
        }),
    );

    let svc = fetch(&mut sim, b, "jobs");
    let t0 = sim.now();
    let call =
        sim.call(b, &method_at(&svc, "run"), vec![local_function(FnId(7), "on_progress"), 5.into()], None);
    // The callback already ran (zero latency); the call is still busy for 5 s.
    assert_eq!(seen.get(), 1);
    let (_, cb_inv) = sim.invocations(b).last().unwrap().clone();
    assert_eq!(cb_inv.target, InvokeTarget::Callback { function: FnId(7), call });
    assert_eq!(cb_inv.caller, sim.full_id(a));
    assert_eq!(cb_inv.args, vec![Value::from("50%")]);

    // The descriptor alice received, and the parent her callback call carried.
    let (_, run_inv) = sim.invocations(a).last().unwrap().clone();
    let cb = Method::from_value(&run_inv.args[0]).unwrap().unwrap();
    assert_eq!(cb.target, sim.full_id(b), "bare _rtarget qualified with bob's workspace");
    assert!(cb.method.ends_with("#on_progress"), "{}", cb.method);
    let cb_frame = sim
        .frames(a, Dir::Up)
        .into_iter()
        .find(|(_, f)| f.main_str("method") == Some(cb.method.as_str()))
        .expect("alice called the callback");
    assert_eq!(cb_frame.1.main_str("parent"), run_inv.session.as_deref());

    // While the call runs, a third client of the workspace may not call bob's callback.
    let c = join(&mut sim, a, "carol");
    let opts = CallOptions { parent: run_inv.session.clone(), ..CallOptions::default() };
    let stolen = sim.call_with(c, &cb, vec!["stolen".into()], None, opts.clone());
    let r = sim.wait(c, stolen);
    assert!(remote_message(&r).contains("Access denied"), "{r:?}");
    assert_eq!(seen.get(), 1);

    let done = sim.wait_ok(b, call);
    assert_eq!(done, Value::from(vec!["done".into(), "ack 7 50%".into()]));
    assert_eq!(sim.settled_at(b, call), Some(t0 + 5 * SEC));

    // After the call settled, the callback is gone.
    let late = sim.call_with(a, &cb, vec!["late".into()], None, opts);
    let r = sim.wait(a, late);
    assert!(remote_message(&r).contains("not found"), "{r:?}");
    assert_eq!(seen.get(), 1, "the callback ran exactly once");
    sim.finish();
}

// ---------------------------------------------------------------------------------------------
// Timeouts and heartbeats.

#[test]
fn a_handler_that_never_answers_times_out_at_method_timeout_not_earlier() {
    let (mut sim, a, b) = world();
    let svc = fetch(&mut sim, b, "slow");
    // `stuck` is a synchronous handler blocking alice for 100 s: no heartbeat can go out.
    let t0 = sim.now();
    let call = sim.call(b, &method_at(&svc, "stuck"), vec![], None);
    sim.run_until(t0 + Duration::from_micros(30_000_000 - 1));
    assert_eq!(sim.settled(b, call), None, "not a microsecond early");
    sim.run_until(t0 + 30 * SEC);
    assert_eq!(sim.settled_at(b, call), Some(t0 + 30 * SEC));
    match sim.settled(b, call) {
        Some(Err(CallError::Timeout { target, method, after })) => {
            assert_eq!(target, sim.full_id(a));
            assert_eq!(method, "services.slow.stuck");
            assert_eq!(after, 30 * SEC);
        }
        other => panic!("{other:?}"),
    }
    // Alice's late answer (at 100 s) is dropped by bob: the call settled once.
    let session = session_of(&sim, b, "services.slow.stuck");
    sim.run_until(t0 + 101 * SEC);
    assert!(heartbeats(&sim, a, &session).is_empty(), "a blocked client sends no heartbeat");
    let late = sim
        .frames(b, Dir::Down)
        .into_iter()
        .find(|(_, f)| f.main_str("method") == Some(format!("{session}.resolve").as_str()))
        .expect("the late answer reached bob");
    assert_eq!(late.0, t0 + 100 * SEC);

    // A target that never existed: the hub drops the call and the caller times out.
    let ghost = Method {
        target: format!("{}/ghost", sim.workspace(b)),
        method: "services.x.y".into(),
        promise: Some(PromiseMode::Compact),
        ..Method::default()
    };
    let t1 = sim.now();
    let call = sim.call(b, &ghost, vec![], None);
    assert!(matches!(sim.wait(b, call), Err(CallError::Timeout { .. })));
    assert_eq!(sim.settled_at(b, call), Some(t1 + 30 * SEC));

    // A per-call timeout overrides method_timeout.
    let t2 = sim.now();
    let opts = CallOptions { timeout: Some(5 * SEC), ..CallOptions::default() };
    let call = sim.call_with(b, &ghost, vec![], None, opts);
    assert!(matches!(sim.wait(b, call), Err(CallError::Timeout { after, .. }) if after == 5 * SEC));
    assert_eq!(sim.settled_at(b, call), Some(t2 + 5 * SEC));
    sim.finish();
}

#[test]
fn heartbeats_keep_a_long_call_alive() {
    let (mut sim, a, b) = world();
    let svc = fetch(&mut sim, b, "slow");
    let t0 = sim.now();
    // 100 s of async work against bob's 30 s method_timeout (t = 15 s).
    let call = sim.call(b, &method_at(&svc, "long"), vec![100.into()], None);
    let sent = sim.frames(b, Dir::Up).last().unwrap().1.clone();
    assert_eq!(sent.extra.as_ref().and_then(|e| e.get("t")), Some(&Value::from(15.0)));
    assert_eq!(sim.wait_ok(b, call), Value::from("slept 100s"));
    assert_eq!(sim.settled_at(b, call), Some(t0 + 100 * SEC));
    let session = session_of(&sim, b, "services.slow.long");
    let beats = heartbeats(&sim, a, &session);
    let expected: Vec<Instant> = (0..7).map(|i| t0 + Duration::from_secs(15 * i)).collect();
    assert_eq!(beats, expected, "a heartbeat at once, then every t = 15 s");
    sim.finish();
}

#[test]
fn an_async_handler_that_never_finishes_keeps_its_caller_waiting_until_it_leaves() {
    let (mut sim, a, b) = world();
    let svc = fetch(&mut sim, b, "slow");
    let t0 = sim.now();
    let call = sim.call(b, &method_at(&svc, "forever"), vec![], None);
    sim.run_until(t0 + 300 * SEC);
    assert_eq!(sim.settled(b, call), None, "heartbeats keep it alive");
    let session = session_of(&sim, b, "services.slow.forever");
    assert_eq!(heartbeats(&sim, a, &session).len(), 21);
    sim.drop_link(a);
    assert_eq!(sim.settled(b, call), Some(Err(CallError::PeerDisconnected { peer: sim.full_id(a) })));
    sim.finish();
}

#[test]
fn without_heartbeats_a_long_call_times_out() {
    let (mut sim, a, b) = world();
    let svc = fetch(&mut sim, b, "slow");
    let t0 = sim.now();
    let call = sim.call(b, &method_at(&svc, "long"), vec![100.into()], None);
    sim.run_until(t0 + SEC);
    // Alice's transport dies but the hub does not notice (half-open): nobody tells bob, and
    // alice cannot send heartbeats. Bob's only way out is the timeout, 30 s after the last beat.
    sim.cut_link(a);
    assert!(!sim.engine(a).is_ready());
    let r = sim.wait(b, call);
    assert!(matches!(r, Err(CallError::Timeout { .. })), "{r:?}");
    assert_eq!(sim.settled_at(b, call), Some(t0 + 30 * SEC));
    let session = session_of(&sim, b, "services.slow.long");
    assert_eq!(heartbeats(&sim, a, &session), vec![t0]);
    assert!(
        !sim.events(b).iter().any(|(_, e)| matches!(e, Event::PeerDisconnected { .. })),
        "the hub never saw alice leave"
    );

    // Alice comes back (superseding her half-open connection) and finishes the work; bob
    // ignores the late answer.
    sim.run_until(t0 + 40 * SEC);
    sim.reconnect(a);
    sim.run_until(t0 + 101 * SEC);
    let resolve = format!("{session}.resolve");
    assert!(
        sim.frames(b, Dir::Down)
            .iter()
            .any(|(t, f)| f.main_str("method") == Some(resolve.as_str()) && *t == t0 + 100 * SEC),
        "the late answer arrived after the reconnection"
    );
    sim.finish();
}

// ---------------------------------------------------------------------------------------------
// Peers leaving.

#[test]
fn a_peer_vanishing_mid_call_fails_the_call_at_once() {
    let (mut sim, a, b) = world();
    let svc = fetch(&mut sim, b, "slow");
    let math = fetch(&mut sim, b, "math");
    let t0 = sim.now();
    let call = sim.call(b, &method_at(&svc, "long"), vec![60.into()], None);
    sim.run_until(t0 + SEC);
    sim.drop_link(a);
    assert_eq!(sim.settled(b, call), Some(Err(CallError::PeerDisconnected { peer: sim.full_id(a) })));
    assert_eq!(sim.settled_at(b, call), Some(t0 + SEC), "long before the 30 s timeout");
    assert!(sim.events(b).iter().any(|(_, e)| *e == Event::PeerDisconnected { peer: sim.full_id(a) }));

    // A call to the client that just left: the server answers for it, at once.
    let again = sim.call(b, &method_at(&math, "add"), vec![1.into()], None);
    assert_eq!(sim.settled_at(b, again), Some(sim.now()));
    let r = sim.settled(b, again).unwrap();
    assert_eq!(r, Err(CallError::PeerDisconnected { peer: sim.full_id(a) }), "the server's reject, typed");

    // A provider killed for good does the same to its callers.
    let k = join(&mut sim, b, "kim");
    let reg = sim.register(k, slow_service(), slow_handlers());
    sim.wait_ok(k, reg);
    let kim_slow = fetch(&mut sim, b, "kim:slow");
    let call = sim.call(b, &method_at(&kim_slow, "forever"), vec![], None);
    sim.run_for(3 * SEC);
    sim.kill_client(k);
    assert_eq!(
        sim.settled(b, call),
        Some(Err(CallError::PeerDisconnected { peer: format!("{}/kim", sim.workspace(b)) }))
    );

    // And a caller that vanishes: the callee is told its work is for nobody.
    sim.reconnect(a);
    let svc = fetch(&mut sim, b, "slow");
    let _orphan = sim.call(b, &method_at(&svc, "long"), vec![10.into()], None);
    let (_, inv) = sim.invocations(a).last().unwrap().clone();
    sim.kill_client(b);
    assert!(sim.events(a).iter().any(|(_, e)| *e == Event::InvokeCancelled { id: inv.id }));
    sim.run_for(11 * SEC);
    sim.finish();
}

#[test]
fn a_client_closing_fails_its_calls_and_cancels_its_invocations() {
    let (mut sim, a, b) = world();
    let svc = fetch(&mut sim, b, "slow");
    let call = sim.call(b, &method_at(&svc, "long"), vec![10.into()], None);
    let (_, inv) = sim.invocations(a).last().unwrap().clone();
    sim.close_client(b);
    assert_eq!(sim.settled(b, call), Some(Err(CallError::Closed)));
    assert!(sim.events(a).iter().any(|(_, e)| *e == Event::InvokeCancelled { id: inv.id }));
    assert!(!sim.hub.services().iter().any(|s| s.starts_with(&sim.full_id(b))));
    sim.run_for(11 * SEC);
    sim.finish();
}

// ---------------------------------------------------------------------------------------------
// Reconnection and restarts.

#[test]
fn after_a_reconnection_services_are_back_and_queued_calls_go_out() {
    let (mut sim, a, b) = world();
    let echo = ServiceSpec::new("echo").function("echo", FunctionSpec::new("echo"));
    let reg =
        sim.register(b, echo, vec![("echo", handler(|inv: &Invocation| Reply::Ok(inv.args[0].clone())))]);
    sim.wait_ok(b, reg);
    let math = fetch(&mut sim, b, "math");
    let bob_echo = fetch(&mut sim, a, "bob:echo");
    let fa = sim.full_id(a);
    let ws = sim.workspace(a);

    sim.drop_link(a);
    assert!(
        !sim.hub.services().iter().any(|s| s.starts_with(&format!("{fa}:"))),
        "the hub forgot alice's services"
    );
    // Calls alice makes while disconnected wait for the connection.
    let queued = sim.call(a, &method_at(&bob_echo, "echo"), vec!["while away".into()], None);
    assert_eq!(sim.engine(a).queued_frames(), 1);
    sim.run_for(2 * SEC);
    assert_eq!(sim.settled(a, queued), None);

    let reconnect_at = sim.trace().len();
    let info = sim.reconnect(a);
    assert_eq!(info.workspace, ws, "the reconnection token keeps alice's workspace");
    assert!(matches!(
        sim.events(a).iter().rev().find(|(_, e)| matches!(e, Event::Connected { .. })),
        Some((_, Event::Connected { reconnected: true, .. }))
    ));
    let services = sim.hub.services();
    for s in ["built-in", "math", "slow"] {
        assert!(services.contains(&format!("{fa}:{s}")), "{s} is registered again: {services:?}");
    }
    // built-in first, then the others, in registration order.
    let registered: Vec<String> = sim.trace()[reconnect_at..]
        .iter()
        .filter(|t| t.dir == Dir::Up && t.owner == Some(Owner::Client(a)))
        .filter_map(|t| t.frame())
        .filter(|f| f.main_str("method") == Some("services.default.register_service"))
        .map(|f| {
            let args =
                f.extra.as_ref().and_then(|e| e.get("args")).and_then(Value::as_array).unwrap().to_vec();
            get_str(&args[0], "id").rsplit(':').next().unwrap().to_string()
        })
        .collect();
    assert_eq!(registered, ["built-in", "math", "slow"]);

    assert_eq!(sim.wait_ok(a, queued), Value::from("while away"));
    let call = sim.call(b, &method_at(&math, "add"), vec![20.into(), 22.into()], None);
    assert_eq!(sim.wait_ok(b, call), Value::from(42));
    sim.finish();
}

#[test]
fn calls_pending_across_an_outage_settle_and_never_hang() {
    let (mut sim, a, b) = world();
    let slow = ServiceSpec::new("bslow").function("long", FunctionSpec::new("long"));
    let reg = sim.register(b, slow, vec![("long", slow_handlers().remove(0).1)]);
    sim.wait_ok(b, reg);
    let alice_slow = fetch(&mut sim, b, "slow");
    let bob_slow = fetch(&mut sim, a, "bob:bslow");

    // 1. The callee's link dies unnoticed by the hub and comes back: the answer still arrives.
    let t0 = sim.now();
    let call = sim.call(b, &method_at(&alice_slow, "long"), vec![10.into()], None);
    sim.run_until(t0 + SEC);
    sim.cut_link(a);
    sim.run_until(t0 + 3 * SEC);
    sim.reconnect(a);
    assert_eq!(sim.wait_ok(b, call), Value::from("slept 10s"));
    assert_eq!(sim.settled_at(b, call), Some(t0 + 10 * SEC));

    // 2. The caller's link drops (the hub tells the callee: InvokeCancelled, advisory) and comes
    //    back before the work is done: the reply still reaches it, as with Python.
    let t1 = sim.now();
    let call = sim.call(a, &method_at(&bob_slow, "long"), vec![5.into()], None);
    let (_, inv) = sim.invocations(b).last().unwrap().clone();
    sim.run_until(t1 + SEC);
    sim.drop_link(a);
    assert!(sim.events(b).iter().any(|(_, e)| *e == Event::InvokeCancelled { id: inv.id }));
    sim.run_until(t1 + 2 * SEC);
    sim.reconnect(a);
    assert_eq!(sim.wait_ok(a, call), Value::from("slept 5s"));
    assert_eq!(sim.settled_at(a, call), Some(t1 + 5 * SEC));

    // 3. The callee leaves for good: its callers learn it at once.
    let call = sim.call(b, &method_at(&alice_slow, "long"), vec![10.into()], None);
    sim.kill_client(a);
    assert!(matches!(sim.settled(b, call), Some(Err(CallError::PeerDisconnected { .. }))));
    sim.finish();
}

#[test]
fn a_hub_restart_reconnects_everyone_and_fails_calls_to_the_old_manager() {
    let (mut sim, a, b) = world();
    let math = fetch(&mut sim, b, "math");
    let slow = fetch(&mut sim, b, "slow");
    let old_manager = format!("*/{}", sim.hub.manager_id());
    let (fa, fb) = (sim.full_id(a), sim.full_id(b));

    // A call to alice that spans the restart, and a manager call still on the wire (bob's link
    // has 50 ms latency) when the server goes down.
    let t0 = sim.now();
    let long = sim.call(b, &method_at(&slow, "long"), vec![5.into()], None);
    sim.set_latency(b, 50 * MS);
    let echo = sim.call_manager(b, "echo", vec!["lost".into()], None);
    sim.restart_hub("reborn-00000001");
    sim.run_until(|s: &Sim| {
        [a, b].iter().all(|&c| s.engine(c).is_ready() && s.info(c).manager_id == "manager-reborn-00000001")
    });
    match sim.settled(b, echo) {
        Some(Err(CallError::ServerRestarted { target, method })) => {
            assert_eq!(target, old_manager);
            assert_eq!(method, "services.default.echo");
        }
        other => panic!("{other:?}"),
    }
    // The close reaches bob after 50 ms; he reconnects at once and the new connection_info
    // arrives 100 ms later: that is when the echo fails.
    assert_eq!(sim.settled_at(b, echo), Some(t0 + 150 * MS), "failed as soon as bob saw the new manager");
    for c in [a, b] {
        assert!(matches!(
            sim.events(c).iter().rev().find(|(_, e)| matches!(e, Event::Connected { .. })),
            Some((_, Event::Connected { reconnected: true, .. }))
        ));
        assert_eq!(sim.full_id(c), if c == a { fa.clone() } else { fb.clone() });
    }
    let services = sim.hub.services();
    for s in [format!("{fa}:built-in"), format!("{fa}:math"), format!("{fa}:slow"), format!("{fb}:built-in")]
    {
        assert!(services.contains(&s), "{s} restored: {services:?}");
    }
    // The peer call survived the restart; old descriptors still work; the new manager serves.
    assert_eq!(sim.wait_ok(b, long), Value::from("slept 5s"));
    let call = sim.call(b, &method_at(&math, "add"), vec![1.into(), 1.into()], None);
    assert_eq!(sim.wait_ok(b, call), Value::from(2));
    let fresh = fetch(&mut sim, b, "math");
    assert_eq!(method_at(&fresh, "add").target, fa);
    sim.finish();
}

// ---------------------------------------------------------------------------------------------
// Hostile peers.

#[test]
fn a_hostile_raw_client_cannot_disturb_other_clients() {
    let (mut sim, a, b) = world();
    let bslow = ServiceSpec::new("bslow").function("long", FunctionSpec::new("long"));
    let reg = sim.register(b, bslow, vec![("long", slow_handlers().remove(0).1)]);
    sim.wait_ok(b, reg);
    let alice_slow = fetch(&mut sim, b, "slow");
    let bob_slow = fetch(&mut sim, a, "bob:bslow");
    let math = fetch(&mut sim, b, "math");
    let ws = sim.workspace(a);
    let token = mint_token(&mut sim, a);
    let c = sim.raw_connect("mallory", Some(&ws), Some(&token));
    assert_eq!(sim.raw_full_id(c), format!("{ws}/mallory"));

    // Pending calls both ways.
    let t0 = sim.now();
    let b_call = sim.call(b, &method_at(&alice_slow, "long"), vec![2.into()], None);
    let a_call = sim.call(a, &method_at(&bob_slow, "long"), vec![2.into()], None);
    let b_session = session_of(&sim, b, "services.slow.long");
    let (fa, fb) = (sim.full_id(a), sim.full_id(b));
    let errors_before = sim.input_errors(b).len();

    let send = |sim: &mut Sim, main: Map, extra: Option<Map>| {
        sim.raw_send(c, WsMessage::Binary(frame(main, extra)));
    };
    let data = |id: &str| Value::from(map_of(&[("id", id.into()), ("workspace", ws.as_str().into())]));
    // "Bob left", to the whole workspace (alice and bob receive it).
    send(
        &mut sim,
        map_of(&[("type", "client_disconnected".into()), ("to", "*".into()), ("data", data("bob"))]),
        None,
    );
    // "Alice left", to bob directly.
    send(
        &mut sim,
        map_of(&[("type", "client_disconnected".into()), ("to", fb.clone().into()), ("data", data("alice"))]),
        None,
    );
    // "Alice is not found", with bob's session.
    send(
        &mut sim,
        map_of(&[
            ("type", "peer_not_found".into()),
            ("to", fb.clone().into()),
            ("session", b_session.as_str().into()),
            ("peer_id", fa.clone().into()),
        ]),
        None,
    );
    // A reply to bob's session, pretending to be alice (in main and in extra).
    for (slot, value) in
        [("resolve", Value::from("forged")), ("reject", Value::from(remote_error("forged").message))]
    {
        let main = map_of(&[
            ("type", "method".into()),
            ("from", fa.clone().into()),
            ("to", fb.clone().into()),
            ("method", format!("{b_session}.{slot}").into()),
            ("parent", b_session.as_str().into()),
        ]);
        let extra = map_of(&[("args", Value::from(vec![value])), ("from", fa.clone().into())]);
        send(&mut sim, main, Some(extra));
    }
    // A heartbeat on bob's session (it must not extend anything either).
    let hb = map_of(&[
        ("type", "method".into()),
        ("to", fb.clone().into()),
        ("method", format!("{b_session}.heartbeat").into()),
        ("parent", b_session.as_str().into()),
    ]);
    send(&mut sim, hb, None);

    // Nothing changed: no call settled, nobody believes anybody left.
    assert_eq!(sim.settled(b, b_call), None);
    assert_eq!(sim.settled(a, a_call), None);
    for x in [a, b] {
        assert!(!sim.events(x).iter().any(|(_, e)| matches!(e, Event::PeerDisconnected { .. })));
    }
    let refused = &sim.input_errors(b)[errors_before..];
    assert_eq!(refused.len(), 6, "bob refused every hostile frame: {refused:?}");
    assert!(refused.iter().any(|(_, e)| e.to_string().contains("Access denied")), "{refused:?}");
    assert!(!sim.input_errors(a).is_empty(), "alice refused the broadcast");

    // The real answers arrive, and bob's calls keep working.
    assert_eq!(sim.wait_ok(b, b_call), Value::from("slept 2s"));
    assert_eq!(sim.wait_ok(a, a_call), Value::from("slept 2s"));
    assert_eq!(sim.settled_at(b, b_call), Some(t0 + 2 * SEC));
    let call = sim.call(b, &method_at(&math, "add"), vec![2.into(), 2.into()], None);
    assert_eq!(sim.wait_ok(b, call), Value::from(4));
    // The raw client got nothing back: it subscribed to nothing and asked for no reply.
    assert_eq!(sim.raw_received(c).len(), 1, "only its connection_info: {:?}", sim.raw_received(c));
    sim.finish();
}

// ---------------------------------------------------------------------------------------------
// Many engines, latency, livelock, determinism.

#[test]
fn latency_is_paid_on_every_hop() {
    let (mut sim, a, b) = world();
    let math = fetch(&mut sim, b, "math");
    sim.set_latency(a, 10 * MS);
    sim.set_latency(b, 40 * MS);
    let t0 = sim.now();
    let call = sim.call(b, &method_at(&math, "add"), vec![1.into(), 2.into()], None);
    assert_eq!(sim.settled(b, call), None);
    assert_eq!(sim.wait_ok(b, call), Value::from(3));
    // bob → hub 40 ms, hub → alice 10 ms, alice → hub 10 ms, hub → bob 40 ms.
    assert_eq!(sim.settled_at(b, call), Some(t0 + 100 * MS));
    sim.finish();
}

#[test]
fn many_engines_call_each_other_concurrently() {
    const N: usize = 6;
    let mut sim = new_sim();
    let first = anon(&mut sim, "node0");
    let token = mint_token(&mut sim, first);
    let mut nodes = vec![first];
    for i in 1..N {
        nodes.push(join_with(&mut sim, first, &format!("node{i}"), &token, Duration::from_secs(30)));
    }
    for (i, &n) in nodes.iter().enumerate() {
        sim.set_latency(n, Duration::from_millis(3 * i as u64 + 1));
        let name = format!("node{i}");
        let who = handler(move |inv: &Invocation| {
            Reply::After(
                Duration::from_millis(50),
                Ok(Value::from(format!("{name} got {}", int(&inv.args[0])))),
            )
        });
        let reg = sim.register(
            n,
            ServiceSpec::new("node").function("who", FunctionSpec::new("who")),
            vec![("who", who)],
        );
        sim.wait_ok(n, reg);
    }
    let mut calls: Vec<(ClientId, CallId, String)> = Vec::new();
    for (i, &from) in nodes.iter().enumerate() {
        for j in 0..N {
            if i == j {
                continue;
            }
            let svc = fetch(&mut sim, from, &format!("node{j}:node"));
            let id = sim.call(from, &method_at(&svc, "who"), vec![Value::from(i * 10 + j)], None);
            calls.push((from, id, format!("node{j} got {}", i * 10 + j)));
        }
    }
    for (from, id, want) in &calls {
        assert_eq!(sim.wait_ok(*from, *id), Value::from(want.as_str()));
    }
    assert_eq!(calls.len(), N * (N - 1));
    sim.finish();
}

#[test]
#[should_panic(expected = "livelock")]
fn a_livelock_is_detected() {
    let (mut sim, a, b) = world();
    let pong = ServiceSpec::new("ping").function("pong", FunctionSpec::new("pong"));
    let reg = sim.register(b, pong, vec![("pong", handler(|_: &Invocation| Reply::ok("pong")))]);
    sim.wait_ok(b, reg);
    let bob = fetch(&mut sim, a, "bob:ping");
    // alice's `spin` calls bob's `pong` again and again, for ever, at zero latency.
    fn spin(target: Method) -> Reply {
        let again = target.clone();
        Reply::call(target, vec![], move |_| spin(again.clone()))
    }
    let pong = method_at(&bob, "pong");
    let reg = sim.register(
        a,
        ServiceSpec::new("loop").function("spin", FunctionSpec::new("spin")),
        vec![("spin", handler(move |_: &Invocation| spin(pong.clone())))],
    );
    sim.wait_ok(a, reg);
    let svc = fetch(&mut sim, b, "loop");
    // Below the hub's rate limit (a 2000-frame burst), which would otherwise end the loop by
    // closing alice's link with 1008.
    sim.livelock_limit = 5_000;
    sim.call(b, &method_at(&svc, "spin"), vec![], None);
}

/// Everything at once, for the determinism check: returns the hash of all frames exchanged.
fn scenario(hub_seed: u64) -> (String, usize) {
    let mut sim = Sim::new(HubConfig { seed: hub_seed, ..HubConfig::default() });
    let a = anon(&mut sim, "alice");
    let reg = sim.register(a, math_service(), math_handlers());
    sim.wait_ok(a, reg);
    let reg = sim.register(a, slow_service(), slow_handlers());
    sim.wait_ok(a, reg);
    let b = join(&mut sim, a, "bob");
    sim.set_latency(b, 7 * MS);
    sim.on_callback(b, handler(|inv: &Invocation| Reply::Ok(inv.args[0].clone())));
    let jobs = ServiceSpec::new("jobs").function("run", FunctionSpec::new("run"));
    let run = handler(|inv: &Invocation| {
        let cb = Method::from_value(&inv.args[0]).unwrap().unwrap();
        Reply::call(cb, vec!["x".into()], |r| match r {
            Ok(v) => Reply::Ok(v),
            Err(e) => Reply::error(e.to_string()),
        })
    });
    let reg = sim.register(a, jobs, vec![("run", run)]);
    sim.wait_ok(a, reg);
    let math = fetch(&mut sim, b, "math");
    let slow = fetch(&mut sim, b, "slow");
    let jobs = fetch(&mut sim, b, "jobs");
    let calls = [
        sim.call(b, &method_at(&math, "add"), vec![1.into(), 2.into()], None),
        sim.call(b, &method_at(&slow, "long"), vec![40.into()], None),
        sim.call(b, &method_at(&slow, "stuck"), vec![], None),
        sim.call(b, &method_at(&jobs, "run"), vec![local_function(FnId(1), "cb")], None),
    ];
    sim.run_for(50 * SEC);
    sim.drop_link(a);
    // `stuck` blocks alice until 100 s: she can reconnect only after that.
    sim.run_for(60 * SEC);
    sim.reconnect(a);
    sim.restart_hub("again-00000002");
    sim.run_for(60 * SEC);
    for id in calls {
        assert!(sim.settled(b, id).is_some());
    }
    sim.finish();
    (sim.frame_hash(), sim.trace().len())
}

#[test]
fn the_same_scenario_gives_the_same_frames() {
    let first = scenario(0);
    let second = scenario(0);
    assert_eq!(first, second);
    assert!(first.1 > 100, "a real exchange: {} messages", first.1);
    // The hash does see differences: another hub seed names the anonymous users differently.
    assert_ne!(scenario(1).0, first.0);
}

// ---------------------------------------------------------------------------------------------
// Registration and outages: the corners.

fn echo_service(id: &str) -> (ServiceSpec, Vec<(&'static str, Handler)>) {
    let spec = ServiceSpec::new(id).function("echo", FunctionSpec::new("echo"));
    (spec, vec![("echo", handler(|inv: &Invocation| Reply::Ok(inv.args[0].clone())))])
}

#[test]
fn unregistering_a_service_removes_it_everywhere() {
    let (mut sim, a, b) = world();
    let math = fetch(&mut sim, b, "math");
    let call = sim.unregister(a, "math");
    assert_eq!(sim.wait_ok(a, call), Value::Nil);
    let fa = sim.full_id(a);
    assert!(!sim.hub.services().contains(&format!("{fa}:math")));
    assert_eq!(sim.engine(a).service_ids().collect::<Vec<_>>(), ["slow"]);
    let call = sim.get_service(b, "math");
    let r = sim.wait(b, call);
    assert!(remote_message(&r).contains("Service not found"), "{r:?}");
    let call = sim.call(b, &method_at(&math, "add"), vec![1.into()], None);
    let r = sim.wait(b, call);
    assert!(remote_message(&r).contains("Method expired or not found"), "{r:?}");
    sim.finish();
}

#[test]
fn registrations_made_while_disconnected_are_sent_after_reconnecting() {
    let (mut sim, a, _b) = world();
    let fa = sim.full_id(a);
    sim.drop_link(a);
    let (spec, handlers) = echo_service("late");
    let late = sim.register(a, spec, handlers);
    let (spec, handlers) = echo_service("gone");
    let gone = sim.register(a, spec, handlers);
    let unreg = sim.unregister(a, "gone");
    assert_eq!(sim.settled(a, unreg), Some(Ok(Value::Nil)));
    assert_eq!(sim.settled(a, late), None, "settles with the manager's answer, after reconnecting");
    sim.reconnect(a);
    assert_eq!(sim.wait_ok(a, late), Value::Nil);
    assert_eq!(sim.settled(a, gone), Some(Ok(Value::Nil)));
    let services = sim.hub.services();
    assert!(services.contains(&format!("{fa}:late")), "{services:?}");
    assert!(!services.contains(&format!("{fa}:gone")), "{services:?}");
    sim.finish();
}

#[test]
fn registering_the_same_service_twice_while_disconnected_settles_both_calls() {
    let (mut sim, a, _b) = world();
    sim.drop_link(a);
    let (spec, handlers) = echo_service("twice");
    let first = sim.register(a, spec.clone(), handlers.clone());
    let second = sim.register(a, spec.name("second version"), handlers);
    sim.reconnect(a);
    sim.run_for(60 * SEC);
    assert_eq!(sim.settled(a, first), Some(Ok(Value::Nil)));
    assert_eq!(sim.settled(a, second), Some(Ok(Value::Nil)), "the second registration call never settles");
    sim.finish();
}

#[test]
fn a_registration_in_flight_when_the_link_drops_reports_the_restored_registration() {
    let (mut sim, a, _b) = world();
    let fa = sim.full_id(a);
    sim.set_latency(a, 10 * MS);
    let (spec, handlers) = echo_service("inflight");
    let t0 = sim.now();
    let reg = sim.register(a, spec, handlers);
    sim.drop_link(a); // the frame was still on the wire
    sim.set_latency(a, Duration::ZERO);
    sim.reconnect(a);
    assert!(sim.hub.services().contains(&format!("{fa}:inflight")), "the engine restored it");
    let r = sim.wait(a, reg);
    assert_eq!(r, Ok(Value::Nil), "settled at {:?} (t0 = {t0:?})", sim.settled_at(a, reg));
    sim.finish();
}

#[test]
fn a_call_that_timed_out_while_disconnected_is_not_sent_later() {
    let (mut sim, a, b) = world();
    let (spec, handlers) = echo_service("echo");
    let reg = sim.register(b, spec, handlers);
    sim.wait_ok(b, reg);
    let bob_echo = fetch(&mut sim, a, "bob:echo");
    sim.drop_link(a);
    let t0 = sim.now();
    let call = sim.call(a, &method_at(&bob_echo, "echo"), vec!["stale".into()], None);
    let r = sim.wait(a, call);
    assert!(matches!(r, Err(CallError::Timeout { .. })), "{r:?}");
    assert_eq!(sim.settled_at(a, call), Some(t0 + 30 * SEC));
    let before = sim.invocations(b).len();
    sim.reconnect(a);
    sim.run_for(SEC);
    assert_eq!(
        sim.invocations(b).len(),
        before,
        "bob ran a call alice had already reported as timed out: {:?}",
        sim.invocations(b).last()
    );
    sim.finish();
}

#[test]
fn unregistering_while_disconnected_leaves_no_stale_registration() {
    let (mut sim, a, b) = world();
    let fa = sim.full_id(a);
    sim.cut_link(a); // the hub still believes alice is connected
    let call = sim.unregister(a, "math");
    assert_eq!(sim.settled(a, call), Some(Ok(Value::Nil)));
    sim.reconnect(a);
    sim.run_for(SEC);
    let listed = sim.hub.services().contains(&format!("{fa}:math"));
    let fetched = {
        let c = sim.get_service(b, "math");
        sim.wait(b, c)
    };
    assert!(!listed, "the hub still lists {fa}:math; get_service gives {fetched:?}");
    sim.finish();
}

#[test]
fn a_duplicate_client_is_refused_for_good() {
    let (mut sim, a, _b) = world();
    let token = mint_token(&mut sim, a);
    let mut config = EngineConfig::new("bob");
    config.token = Some(token);
    config.workspace = Some(sim.workspace(a));
    let twin = sim.add_client(config);
    match sim.try_connect(twin) {
        Err((hypha_rpc_core::ConnectError::Refused { message }, true)) => {
            assert!(message.contains("Client already exists and is active"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    sim.run_for(120 * SEC);
    assert_eq!(sim.link(twin), None, "no retry after a permanent refusal");
    assert_eq!(sim.events(twin).len(), 1, "{:?}", sim.events(twin));
    sim.finish();
}

#[test]
fn a_manager_call_queued_across_a_restart_fails_with_server_restarted() {
    let (mut sim, a, b) = world();
    sim.set_auto_reconnect(b, false);
    sim.restart_hub("reborn-00000002");
    assert!(!sim.engine(b).is_ready());
    let t0 = sim.now();
    let echo = sim.call_manager(b, "echo", vec!["queued".into()], None);
    let call = sim.get_service(b, "math");
    sim.run_for(5 * SEC);
    assert_eq!(sim.settled(b, echo), None);
    sim.reconnect(b);
    for id in [echo, call] {
        assert!(
            matches!(sim.settled(b, id), Some(Err(CallError::ServerRestarted { .. }))),
            "{:?}",
            sim.settled(b, id)
        );
        assert_eq!(sim.settled_at(b, id), Some(t0 + 5 * SEC));
    }
    // Alice reconnected by herself long ago; the new manager serves bob.
    assert!(sim.engine(a).is_ready());
    assert_eq!(sim.hub.subscriptions(sim.link(b).unwrap()), vec!["client_disconnected".to_string()]);
    let svc = fetch(&mut sim, b, "math");
    let call = sim.call(b, &method_at(&svc, "add"), vec![3.into(), 4.into()], None);
    assert_eq!(sim.wait_ok(b, call), Value::from(7));
    sim.finish();
}

#[test]
fn get_service_of_a_blocked_provider_fails_after_the_managers_timeout() {
    let (mut sim, a, b) = world();
    let slow = fetch(&mut sim, b, "slow");
    let stuck = sim.call(b, &method_at(&slow, "stuck"), vec![], None); // blocks alice for 100 s
    let t0 = sim.now();
    let call = sim.get_service(b, "alice:math");
    let r = sim.wait(b, call);
    assert!(remote_message(&r).contains("Failed to get remote service"), "{r:?}");
    assert_eq!(sim.settled_at(b, call), Some(t0 + 10 * SEC), "the manager waits 10 s for the provider");
    assert!(matches!(sim.wait(b, stuck), Err(CallError::Timeout { .. })));
    sim.run_for(100 * SEC);
    assert!(sim.engine(a).is_ready());
    sim.finish();
}

#[test]
fn a_call_across_workspaces_to_a_vanished_peer_times_out() {
    let mut sim = new_sim();
    let a = anon(&mut sim, "alice");
    let (spec, handlers) = slow_service_public();
    let reg = sim.register(a, spec, handlers);
    sim.wait_ok(a, reg);
    let d = anon(&mut sim, "dave");
    let id = format!("{}/alice:pslow", sim.workspace(a));
    let svc = fetch(&mut sim, d, &id);
    let t0 = sim.now();
    let call = sim.call(d, &method_at(&svc, "long"), vec![60.into()], None);
    sim.run_until(t0 + 5 * SEC);
    sim.kill_client(a);
    // client_disconnected is broadcast to alice's workspace only: dave learns nothing and
    // falls back on his timeout, 30 s after alice's last heartbeat (at t0; she vanished at 5 s).
    let r = sim.wait(d, call);
    assert!(matches!(r, Err(CallError::Timeout { .. })), "{r:?}");
    assert_eq!(sim.settled_at(d, call), Some(t0 + 30 * SEC));
    // The next call is refused by the server at once.
    let again = sim.call(d, &method_at(&svc, "long"), vec![1.into()], None);
    let r = sim.settled(d, again).expect("at once");
    assert!(matches!(r, Err(CallError::PeerDisconnected { .. })), "{r:?}");
    sim.finish();
}

fn slow_service_public() -> (ServiceSpec, Vec<(&'static str, Handler)>) {
    let spec =
        ServiceSpec::new("pslow").visibility(Visibility::Public).function("long", FunctionSpec::new("long"));
    (spec, vec![("long", slow_handlers().remove(0).1)])
}

#[test]
fn a_peer_not_found_event_from_the_server_fails_the_call_at_once() {
    let mut sim = Sim::new(HubConfig { send_peer_not_found: true, ..HubConfig::default() });
    let a = anon(&mut sim, "alice");
    let reg = sim.register(a, math_service(), math_handlers());
    sim.wait_ok(a, reg);
    let b = join(&mut sim, a, "bob");
    let math = fetch(&mut sim, b, "math");
    sim.drop_link(a);
    let call = sim.call(b, &method_at(&math, "add"), vec![1.into()], None);
    assert_eq!(sim.settled_at(b, call), Some(sim.now()));
    assert_eq!(sim.settled(b, call), Some(Err(CallError::PeerDisconnected { peer: sim.full_id(a) })));
    sim.finish();
}

#[test]
fn forged_heartbeats_do_not_keep_a_call_alive() {
    let (mut sim, a, b) = world();
    let ws = sim.workspace(a);
    let token = mint_token(&mut sim, a);
    let mallory = sim.raw_connect("mallory", Some(&ws), Some(&token));
    let ghost = Method {
        target: format!("{ws}/ghost"),
        method: "services.x.y".into(),
        promise: Some(PromiseMode::Compact),
        ..Method::default()
    };
    let t0 = sim.now();
    let call = sim.call(b, &ghost, vec![], None);
    let session = session_of(&sim, b, "services.x.y");
    for at in [10, 20, 29] {
        sim.run_until(t0 + Duration::from_secs(at));
        let hb = map_of(&[
            ("type", "method".into()),
            ("from", format!("{ws}/ghost").into()),
            ("to", sim.full_id(b).into()),
            ("method", format!("{session}.heartbeat").into()),
            ("parent", session.as_str().into()),
        ]);
        sim.raw_send(mallory, WsMessage::Binary(frame(hb, None)));
    }
    assert!(matches!(sim.wait(b, call), Err(CallError::Timeout { .. })));
    assert_eq!(sim.settled_at(b, call), Some(t0 + 30 * SEC));
    assert_eq!(sim.input_errors(b).len(), 3, "{:?}", sim.input_errors(b));
    sim.finish();
}

#[test]
fn returned_functions_are_released_when_their_caller_leaves() {
    let mut sim = new_sim();
    let a = anon(&mut sim, "alice");
    let spec = ServiceSpec::new("maker").function("make", FunctionSpec::new("make"));
    let make = handler(|_: &Invocation| Reply::ok(local_function(FnId(77), "adder")));
    let reg = sim.register(a, spec, vec![("make", make)]);
    sim.wait_ok(a, reg);
    let b = join(&mut sim, a, "bob");
    let svc = fetch(&mut sim, b, "maker");
    let call = sim.call(b, &method_at(&svc, "make"), vec![], None);
    let returned = sim.wait_ok(b, call);
    assert_eq!(returned.rtype(), Some("method"), "{returned:?}");
    assert_eq!(sim.engine(a).exports(), 1);
    let released = |sim: &Sim| {
        sim.events(a).iter().filter(|(_, e)| matches!(e, Event::FunctionsReleased { .. })).count()
    };
    assert_eq!(released(&sim), 0, "alive while bob is here");
    sim.kill_client(b);
    assert_eq!(sim.engine(a).exports(), 0);
    let events: Vec<_> = sim
        .events(a)
        .iter()
        .filter_map(|(_, e)| match e {
            Event::FunctionsReleased { functions } => Some(functions.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(events, vec![vec![FnId(77)]], "released once, with its id");
    sim.finish();
}
