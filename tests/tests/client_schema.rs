//! Schemas for LLM function calling (issue #8.1) through the real server: a Rust
//! `schema_function` is seen by a real Python client as `__schema__` and in
//! `service_schema`, exactly in Python's layout; a Python `schema_function`'s schema is read
//! from Rust.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::{ServerConfig, Service, Value, Visibility, connect_to_server};
use serde_json::json;

/// Add two numbers.
#[derive(schemars::JsonSchema, serde::Deserialize)]
struct Add {
    /// The first number.
    a: i64,
    /// The second number.
    b: i64,
}

fn json_of(v: &Value) -> serde_json::Value {
    serde_json::to_value(v).expect("a JSON-compatible value")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_reach_python_and_back() {
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let server = connect_to_server(ServerConfig::new(hs.url())).await.expect("connect");
    let custom = json!({"name": "custom", "description": "Hand-written.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}});
    let svc = Service::new("tools")
        .visibility(Visibility::Public)
        .schema_function("add", |x: Add| async move { Ok::<_, String>(x.a + x.b) })
        .function("custom", |q: String| async move { Ok::<_, String>(q) })
        .schema(hypha_rpc_tokio::to_value(&custom).unwrap())
        .function("plain", || async move { Ok::<_, String>(1) });
    let id = server.register_service(svc).await.expect("register");
    let token = server.generate_token(None).await.unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/schema_peer.py");
    let mut py = Command::new(hs.python())
        .args([script, hs.url(), server.workspace(), &token, &id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python peer");
    let mut line = String::new();
    BufReader::new(py.stdout.take().unwrap()).read_line(&mut line).expect("a result line");
    let r: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));

    let add = json!({"name": "add", "description": "Add two numbers.", "parameters": {
        "type": "object",
        "properties": {
            "a": {"description": "The first number.", "type": "integer", "format": "int64"},
            "b": {"description": "The second number.", "type": "integer", "format": "int64"}},
        "required": ["a", "b"]}});
    let seen = &r["rust"];
    assert_eq!(seen["add_schema"], add, "Python's __schema__ of a Rust schema_function");
    assert_eq!(seen["custom_schema"], custom);
    assert_eq!(seen["plain_schema"], json!(null), "no schema, no __schema__");
    assert_eq!(seen["add_result"], json!(42), "called with keyword arguments, as LLM tools are");
    assert_eq!(
        seen["service_schema"],
        json!({"add": {"type": "function", "function": add}, "custom": {"type": "function", "function": custom}}),
        "service_schema as Python writes it"
    );

    // And the other way: a Python schema_function read from Rust.
    let py_id = r["py_service"].as_str().expect("py service id");
    let proxy = server.get_service(py_id).await.expect("get py-tools");
    let schema = json_of(&proxy.schema("multiply").expect("Python's schema"));
    assert_eq!(schema["name"], "multiply");
    assert!(schema["description"].as_str().unwrap().starts_with("Multiply two numbers."), "{schema}");
    assert_eq!(schema["parameters"]["properties"]["a"]["type"], "number", "{schema}");
    assert_eq!(schema["parameters"]["required"], json!(["a"]), "{schema}");
    let v: f64 = proxy.call_with_kwargs("multiply", (), json!({"a": 21.0})).await.unwrap();
    assert_eq!(v, 42.0);

    let _ = writeln!(py.stdin.take().unwrap());
    assert!(py.wait().unwrap().success());
    server.disconnect().await;
}
