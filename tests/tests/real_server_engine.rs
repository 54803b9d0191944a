//! The sans-IO engine against the real Hypha server and a real Python hypha-rpc peer, both
//! ways: we call a Python service (args, kwargs, errors, callbacks, context), and Python calls
//! ours. Driven by a blocking websocket loop; the async client comes later.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration as StdDuration;

use hypha_rpc_core::codec::rtype::{Generator, Method, RTypeCodec, RemoteError, StopIteration};
use hypha_rpc_core::engine::{is_stop_iteration, local_function, local_generator};
use hypha_rpc_core::{
    CallError, CallOptions, EngineConfig, FnId, FunctionSpec, GenId, InvokeTarget, Map, RequireContext,
    ServiceSpec, Value, Visibility,
};
use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tests::ws_driver::WsClient;

const WAIT: StdDuration = StdDuration::from_secs(20);

#[test]
fn engine_talks_to_python_through_the_real_server() {
    let server = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/engine_peer.py");
    let mut py = Command::new(server.python())
        .arg(&script)
        .arg(server.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python peer");
    let (tx, rx) = mpsc::channel();
    let stdout = py.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first: serde_json::Value =
        serde_json::from_str(&rx.recv_timeout(WAIT).expect("peer ready line")).unwrap();
    let workspace = first["workspace"].as_str().unwrap().to_string();

    let mut config = EngineConfig::new("rust-client");
    config.workspace = Some(workspace.clone());
    config.token = Some(first["token"].as_str().unwrap().to_string());
    let mut c = WsClient::connect(&server.ws_url(), config).expect("engine connects to the real server");
    assert_eq!(c.engine.connection_info().unwrap().workspace, workspace);

    // We call Python.
    let now = c.now();
    let id = c.engine.get_service(now, first["service_id"].as_str().unwrap(), None).unwrap();
    let svc = c.wait(id, WAIT).expect("get_service");
    let m = |name: &str| Method::from_value(svc.as_map().unwrap().get(name).unwrap()).unwrap().unwrap();
    let call = |c: &mut WsClient, name: &str, args: Vec<Value>, kwargs: Option<Map>| {
        let now = c.now();
        let id = c.engine.call(now, &m(name), args, kwargs, CallOptions::default()).unwrap();
        c.wait(id, WAIT)
    };
    assert_eq!(call(&mut c, "add", vec![2.into(), 3.into()], None), Ok(Value::from(5)));
    // 600 kB each way: our call and Python's reply both go through message_cache in chunks.
    let big: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let back = call(&mut c, "echo", vec![Value::bin(big.clone())], None).expect("large echo");
    assert_eq!(back.as_bin().map(|b| &b[..]), Some(&big[..]), "600 kB echo through Python");
    let kw: Map = [("c", 3)].into_iter().collect();
    let r = call(&mut c, "kwfunc", vec![1.into()], Some(kw)).unwrap();
    assert_eq!(r.as_map().unwrap().get("c"), Some(&Value::from(3)));
    assert_eq!(r.as_map().unwrap().get("b"), Some(&Value::from(2)));
    match call(&mut c, "raise_error", vec!["boom".into()], None) {
        Err(CallError::Remote { message, trace }) => {
            assert!(message.contains("interop-error: boom"), "{message}");
            assert!(trace.is_some_and(|t| !t.is_empty()));
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    let who = call(&mut c, "whoami", vec![], None).unwrap();
    assert_eq!(
        who.as_map().unwrap().get("from").and_then(Value::as_str),
        Some(&*format!("{workspace}/rust-client"))
    );
    // A callback: Python calls our function three times before answering.
    c.handler = Some(Box::new(|inv| match (&inv.target, inv.args.first().and_then(Value::as_i64)) {
        (InvokeTarget::Callback { function: FnId(7), .. }, Some(i)) => Ok(Value::from(i * 10)),
        _ => Err(RemoteError { message: format!("unexpected {:?}", inv.target), ..RemoteError::default() }),
    }));
    let r = call(&mut c, "call_callback", vec![local_function(FnId(7), "times_ten"), 3.into()], None);
    assert_eq!(r, Ok(Value::Array(vec![0.into(), 10.into(), 20.into()])));

    // Python's generators, sync and async, consumed here; one closed early.
    let gen_of = |v: Value| Generator::from_value(&v).expect("a generator").expect("valid");
    for (name, want) in [("sync_gen", vec![0i64, 1, 2]), ("async_gen", vec![0, 1, 4])] {
        let g = gen_of(call(&mut c, name, vec![3.into()], None).unwrap());
        let mut items = Vec::new();
        loop {
            let now = c.now();
            let id = c.engine.generator_next(now, &g).unwrap();
            let v = c.wait(id, WAIT).expect("next item");
            if is_stop_iteration(&v) {
                break;
            }
            items.push(v.as_i64().unwrap());
        }
        assert_eq!(items, want, "{name}");
    }
    let g = gen_of(call(&mut c, "sync_gen", vec![100.into()], None).unwrap());
    let now = c.now();
    let id = c.engine.generator_next(now, &g).unwrap();
    assert_eq!(c.wait(id, WAIT), Ok(Value::from(0)));
    let now = c.now();
    let id = c.engine.generator_close(now, &g).unwrap();
    assert_eq!(c.wait(id, WAIT), Ok(Value::Bool(true)), "Python closes its generator");

    // Python calls us.
    let svc = ServiceSpec::new("rust-svc")
        .visibility(Visibility::Public)
        .require_context(RequireContext::Functions(vec!["whoami".into()]))
        .function("echo", FunctionSpec::new("echo").doc("Return the argument."))
        .function("add", FunctionSpec::new("add"))
        .function("greet", FunctionSpec::new("greet"))
        .function("whoami", FunctionSpec::new("whoami"))
        .function("fail", FunctionSpec::new("fail"))
        .function("count", FunctionSpec::new("count"));
    let now = c.now();
    let reg = c.engine.register_service(now, svc).unwrap();
    c.wait(reg, WAIT).expect("register_service");
    let mut positions = std::collections::BTreeMap::<u64, u64>::new();
    c.handler = Some(Box::new(move |inv| {
        let function = match &inv.target {
            InvokeTarget::Service { function, .. } => function.as_str(),
            InvokeTarget::GeneratorNext { generator } => {
                // Generator `GenId(n)` yields 0..n.
                let at = positions.entry(generator.0).or_default();
                *at += 1;
                return Ok(if *at <= generator.0 { Value::from(*at - 1) } else { StopIteration.to_value() });
            }
            other => panic!("unexpected {other:?}"),
        };
        match function {
            "count" => Ok(local_generator(GenId(inv.args[0].as_u64().unwrap()))),
            "echo" => Ok(inv.args[0].clone()),
            "add" => Ok(Value::from(inv.args[0].as_i64().unwrap() + inv.args[1].as_i64().unwrap())),
            "greet" => {
                let name =
                    inv.kwargs.as_ref().and_then(|k| k.get("name")).and_then(Value::as_str).unwrap_or("?");
                Ok(Value::from(format!("Hello, {name}!")))
            }
            "whoami" => Ok(inv.context.as_ref().expect("context").to_value()),
            _ => Err(RemoteError {
                message: "rust-failure: boom".into(),
                trace: Some("in rust".into()),
                ..RemoteError::default()
            }),
        }
    }));
    let full_id = format!("{workspace}/rust-client:rust-svc");
    writeln!(py.stdin.as_mut().unwrap(), "call {full_id}").unwrap();
    let mut results = None;
    for _ in 0..2000 {
        c.turn(StdDuration::from_millis(10)).expect("driver");
        if let Ok(line) = rx.try_recv() {
            results = Some(line);
            break;
        }
    }
    let results: serde_json::Value = serde_json::from_str(&results.expect("Python's results")).unwrap();
    let r = &results["results"];
    assert_eq!(r["echo"], serde_json::json!({"a": [1, 2.5, null, "x"], "b": {"bytes": [0, 1]}}));
    assert_eq!(r["add"], 42);
    assert_eq!(r["count"], serde_json::json!([0, 1, 2, 3]), "Python consumed our generator");
    assert_eq!(r["count_early"], serde_json::json!([0, 1]));
    assert_eq!(r["big_echo_ok"], true, "Python's 600 kB echo through our message_cache and back");
    assert_eq!(r["greet"], "Hello, Ada!");
    assert_eq!(r["whoami"]["from"], format!("{workspace}/py-peer"));
    assert_eq!(r["whoami"]["ws"], workspace);
    assert!(r["fail"].as_str().unwrap().contains("rust-failure: boom"), "{}", r["fail"]);
    let status = py.wait().unwrap();
    assert!(status.success(), "Python peer failed");
    // Python left: the server tells us, and nothing of ours is pending but the subscription.
    c.run_for(StdDuration::from_millis(300));
    assert!(
        c.events.iter().any(
            |e| matches!(e, hypha_rpc_core::Event::PeerDisconnected { peer } if peer.ends_with("/py-peer"))
        ),
        "client_disconnected for py-peer"
    );
    assert_eq!(c.engine.active_invocations(), 0);
    assert!(
        c.events
            .iter()
            .any(|e| matches!(e, hypha_rpc_core::Event::GeneratorClosed { generator: GenId(100) })),
        "Python's early break closed our generator"
    );
    assert_eq!(c.engine.exports(), 0, "no generator or returned function left behind");
    println!("real server: {} events, all calls settled", c.events.len());
}
