//! Quickstart: a Rust service and a Python client talking through a local Hypha server, and
//! back. Run by `scripts/quickstart.sh`. It drives the sans-IO engine with the blocking
//! websocket loop of the test crate; the async tokio/smol client will replace that loop.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use hypha_rpc_core::codec::rtype::{Method, RTypeCodec, RemoteError};
use hypha_rpc_core::{CallOptions, EngineConfig, FunctionSpec, InvokeTarget, ServiceSpec, Value, Visibility};
use hypha_rpc_tests::ws_driver::WsClient;

fn main() -> Result<(), String> {
    let url = std::env::args().nth(1).ok_or("usage: quickstart SERVER_URL")?;
    let python = std::env::args().nth(2).unwrap_or_else(|| "python3".into());
    let ws_url = format!("{}/ws", url.trim_end_matches('/').replacen("http://", "ws://", 1));
    let wait = Duration::from_secs(20);

    // 1. Connect and serve `hello` with two functions.
    let mut rust = WsClient::connect(&ws_url, EngineConfig::new("quickstart-rust"))?;
    let info = rust.engine.connection_info().ok_or("no connection info")?.clone();
    println!("rust: connected to {} as {}/quickstart-rust", url, info.workspace);
    let hello = ServiceSpec::new("hello")
        .visibility(Visibility::Public)
        .function("greet", FunctionSpec::new("greet").doc("Say hello."))
        .function("add", FunctionSpec::new("add").doc("Add two numbers."));
    let now = rust.now();
    let reg = rust.engine.register_service(now, hello).map_err(|e| e.to_string())?;
    rust.wait(reg, wait).map_err(|e| e.to_string())?;
    rust.handler = Some(Box::new(|call| match &call.target {
        InvokeTarget::Service { function, .. } if function == "greet" => {
            let name = call.args.first().and_then(Value::as_str).unwrap_or("stranger");
            Ok(Value::from(format!("Hello, {name}! (from Rust)")))
        }
        InvokeTarget::Service { function, .. } if function == "add" => {
            let n = |i: usize| call.args.get(i).and_then(Value::as_i64).unwrap_or(0);
            Ok(Value::from(n(0) + n(1)))
        }
        other => {
            Err(RemoteError { message: format!("no such function: {other:?}"), ..RemoteError::default() })
        }
    }));
    let now = rust.now();
    let token = rust.engine.call_manager(now, "generate_token", vec![], None).map_err(|e| e.to_string())?;
    let token = rust.wait(token, wait).map_err(|e| e.to_string())?;
    let token = token.as_str().ok_or("generate_token returned no string")?.to_string();

    // 2. A Python client calls it, then serves `py-hello` for us.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/quickstart_client.py");
    let service_id = format!("{}/quickstart-rust:hello", info.workspace);
    let mut py = Command::new(&python)
        .args([script, &url, &info.workspace, &token, &service_id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start {python}: {e}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let out = py.stdout.take().ok_or("no stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let py_service = loop {
        rust.turn(Duration::from_millis(10))?;
        match rx.try_recv() {
            Ok(line) if line.starts_with("READY ") => break line[6..].to_string(),
            Ok(line) => println!("{line}"),
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
            Err(e) => return Err(format!("the Python client stopped: {e}")),
        }
    };

    // 3. And back: Rust calls the Python service.
    let now = rust.now();
    let svc = rust.engine.get_service(now, &py_service, None).map_err(|e| e.to_string())?;
    let svc = rust.wait(svc, wait).map_err(|e| e.to_string())?;
    let shout = svc.as_map().and_then(|m| m.get("shout")).ok_or("py-hello has no shout")?;
    let shout = Method::from_value(shout).ok_or("not a method")?.map_err(|e| e.to_string())?;
    let now = rust.now();
    let call = rust.engine.call(now, &shout, vec!["hello from rust".into()], None, CallOptions::default());
    let result = rust.wait(call.map_err(|e| e.to_string())?, wait).map_err(|e| e.to_string())?;
    println!("rust: shout('hello from rust') -> {:?}", result.as_str().unwrap_or_default());

    writeln!(py.stdin.as_mut().ok_or("no stdin")?, "done").map_err(|e| e.to_string())?;
    let status = py.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("the Python client failed: {status}"));
    }
    println!("quickstart: Rust -> Python -> Rust round trip complete");
    Ok(())
}
