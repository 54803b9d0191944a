//! The async client (tokio) against the real server, JavaScript to Rust: the npm `hypha-rpc`
//! client under node (tests/js/call_rust.mjs, installed by scripts/js-deps.sh) calls a service
//! our Rust client registered, with positional and keyword (`_rkwargs`) arguments, typed
//! arrays both ways, and errors.
//!
//! Wire forms seen from the pinned JS client (hypha-rpc 0.21.40):
//! - `Uint8Array` is a plain msgpack bin;
//! - every other typed array is `{_rtype: "typedarray", _rvalue: bin, _rdtype: "float32" | ...}`
//!   holding the WHOLE underlying buffer (a `subarray` view sends all of it);
//! - an `ArrayBuffer` is `{_rtype: "memoryview", _rvalue: bin}`;
//! - keyword arguments are the last argument map with `with_kwargs: true` on the message.
//!
//! Back to JS: a bin becomes a `Uint8Array`, a `typedarray` map the matching typed array, a
//! `memoryview` an `ArrayBuffer`, and an `ndarray` stays the raw map (no numjs/tfjs in node).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hypha_rpc_core::codec::rtype::{MemoryView, NdArray, RType, RTypeCodec, TypedArray};
use hypha_rpc_core::codec::{DType, Scalar};
use hypha_rpc_tests::server::{HyphaServer, install_js_deps, workspace_root};
use hypha_rpc_tokio::serde_bytes::ByteBuf;
use hypha_rpc_tokio::{Call, Map, ServerConfig, Service, Value, Visibility, connect_to_server};
use serde_json::json;

/// How long the node peer may run before it is killed and the test fails.
const NODE_TIMEOUT: Duration = Duration::from_secs(120);

/// What the Rust service saw, for assertions after node exits.
#[derive(Default)]
struct Seen {
    /// `describe` calls: positional arguments and keyword arguments, in call order.
    described: Vec<(Vec<Value>, Option<Map>)>,
    /// `inspect` calls: the label and the raw first argument, in call order.
    inspected: Vec<(String, Value)>,
}

/// Runs `node <args>` in `dir` without blocking the runtime (our service must keep serving),
/// killing it after [`NODE_TIMEOUT`]. Returns (exit success, stdout, stderr).
async fn run_node(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new("node")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn node: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + NODE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (out, err) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
    let Some(status) = status else {
        panic!("node did not finish within {NODE_TIMEOUT:?} and was killed\nstdout:\n{out}\nstderr:\n{err}");
    };
    (status.success(), out, err)
}

/// Little-endian elements of `data` as f64 (every JS typed array element fits).
fn elements(dtype: &DType, data: &[u8]) -> Result<Vec<f64>, String> {
    let DType::Native(s) = dtype else { return Err(format!("unexpected dtype {dtype}")) };
    let size = s.size();
    if data.len() % size != 0 {
        return Err(format!("{} bytes are not a whole number of {dtype}", data.len()));
    }
    Ok(data
        .chunks_exact(size)
        .map(|c| match s {
            Scalar::Int8 => i8::from_le_bytes([c[0]]) as f64,
            Scalar::UInt8 => c[0] as f64,
            Scalar::Int16 => i16::from_le_bytes([c[0], c[1]]) as f64,
            Scalar::UInt16 => u16::from_le_bytes([c[0], c[1]]) as f64,
            Scalar::Int32 => i32::from_le_bytes(c.try_into().unwrap()) as f64,
            Scalar::UInt32 => u32::from_le_bytes(c.try_into().unwrap()) as f64,
            Scalar::Float32 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
            Scalar::Float64 => f64::from_le_bytes(c.try_into().unwrap()),
            _ => f64::NAN,
        })
        .collect())
}

/// `inspect`: what kind of value arrived, its dtype, byte count and elements.
fn inspect(v: &Value) -> Result<Value, String> {
    let (kind, dtype, data) = match v {
        Value::Bin(b) => ("bin", DType::Native(Scalar::UInt8), b.clone()),
        other => match RType::from_value(other) {
            Some(Ok(RType::TypedArray(t))) => ("typedarray", t.dtype, t.data),
            Some(Ok(RType::MemoryView(m))) => ("memoryview", DType::Native(Scalar::UInt8), m.0),
            Some(Ok(r)) => return Err(format!("unexpected _rtype {}", r.name())),
            Some(Err(e)) => return Err(format!("bad typed value: {e}")),
            None => return Err(format!("expected binary data, got {}", other.kind())),
        },
    };
    let values = elements(&dtype, &data)?;
    let mut m = Map::new();
    m.insert("kind", kind);
    m.insert("dtype", dtype.to_string());
    m.insert("nbytes", data.len() as u64);
    m.insert("values", Value::Array(values.into_iter().map(Value::from).collect()));
    Ok(Value::Map(m))
}

fn typed(scalar: Scalar, data: Vec<u8>) -> Value {
    TypedArray { data: Bytes::from(data), dtype: DType::Native(scalar), other: Map::new() }.to_value()
}

fn le<T: Copy, const N: usize>(xs: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    xs.iter().flat_map(|&x| f(x)).collect()
}

/// `make_bytes`'s content: `i % 251` for `i` in `0..n`.
fn pattern(n: u32) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// `got == want`, but numbers only to a relative 1e-15 (serde_json may parse a float one ulp off).
fn assert_close(got: &serde_json::Value, want: &serde_json::Value, what: &str) {
    use serde_json::Value as J;
    let same = match (got, want) {
        (J::Number(a), J::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            a == b || (a - b).abs() <= 1e-15 * a.abs().max(b.abs())
        }
        (J::Array(a), J::Array(b)) => {
            a.len() == b.len() && {
                a.iter().zip(b).for_each(|(x, y)| assert_close(x, y, what));
                true
            }
        }
        (J::Object(a), J::Object(b)) => {
            a.keys().eq(b.keys()) && {
                a.values().zip(b.values()).for_each(|(x, y)| assert_close(x, y, what));
                true
            }
        }
        (a, b) => a == b,
    };
    assert!(same, "{what}: got {got}, want {want}");
}

fn service(seen: Arc<Mutex<Seen>>) -> Service {
    let seen_describe = seen.clone();
    Service::new("js-interop")
        .visibility(Visibility::Public)
        .function("add", |a: i64, b: i64| async move { Ok::<_, String>(a + b) })
        .function_raw("describe", move |call: Call| {
            let seen = seen_describe.clone();
            async move {
                seen.lock().unwrap().described.push((call.args.clone(), call.kwargs.clone()));
                let mut m = Map::new();
                m.insert("nargs", call.args.len() as u64);
                m.insert(
                    "kwarg_keys",
                    call.kwargs.as_ref().map(|k| Value::Array(k.keys().cloned().collect::<Vec<_>>())),
                );
                Ok::<_, String>(Value::Map(m))
            }
        })
        .function(
            "scale",
            |x: f64, opts: ScaleOpts| async move { Ok::<_, String>(x * opts.factor + opts.offset) },
        )
        .function_raw("inspect", move |call: Call| {
            let seen = seen.clone();
            async move {
                let label: String = call.arg(1).map_err(|e| format!("label: {e}"))?;
                let arg = call.args.first().cloned().unwrap_or(Value::Nil);
                seen.lock().unwrap().inspected.push((label, arg.clone()));
                inspect(&arg)
            }
        })
        .function_raw("double_f32", |call: Call| async move {
            let Some(Ok(t)) = call.args.first().and_then(TypedArray::from_value) else {
                return Err(format!("expected a typedarray, got {:?}", call.args));
            };
            if t.dtype != DType::Native(Scalar::Float32) {
                return Err(format!("expected float32, got {}", t.dtype));
            }
            let doubled: Vec<f32> =
                elements(&t.dtype, &t.data)?.into_iter().map(|x| x as f32 * 2.0).collect();
            Ok(typed(Scalar::Float32, le(&doubled, f32::to_le_bytes)))
        })
        .function("make_bytes", |n: u32| async move { Ok::<_, String>(ByteBuf::from(pattern(n))) })
        .function_raw("make_typed", |_call: Call| async move {
            let mut m = Map::new();
            m.insert("i32", typed(Scalar::Int32, le(&[i32::MIN, -7, i32::MAX], i32::to_le_bytes)));
            m.insert("f64", typed(Scalar::Float64, le(&[0.1f64, -2.5], f64::to_le_bytes)));
            m.insert("u16", typed(Scalar::UInt16, le(&[1u16, 65535], u16::to_le_bytes)));
            m.insert("i8", typed(Scalar::Int8, le(&[-128i8, 127], i8::to_le_bytes)));
            m.insert("u8", typed(Scalar::UInt8, vec![3, 250]));
            Ok::<_, String>(Value::Map(m))
        })
        .function_raw("make_ndarray", |_call: Call| async move {
            let data = le(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.5], f32::to_le_bytes);
            let nd = NdArray {
                data: Bytes::from(data),
                shape: vec![2, 3],
                dtype: DType::Native(Scalar::Float32),
                other: Map::new(),
            };
            Ok::<_, String>(nd.to_value())
        })
        .function_raw("make_memoryview", |_call: Call| async move {
            Ok::<_, String>(MemoryView(Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef])).to_value())
        })
        .function("fail", |why: String| async move { Err::<(), _>(format!("rust refused: {why}")) })
}

#[derive(serde::Deserialize)]
struct ScaleOpts {
    factor: f64,
    offset: f64,
}

fn f32s(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| x as f64).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_peer_calls_rust_service() {
    let started = Instant::now();
    let root = workspace_root().unwrap_or_else(|e| panic!("{e}"));
    install_js_deps(&root);
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let rust = connect_to_server(ServerConfig::new(hs.url())).await.expect("connect the Rust client");
    let token = rust.generate_token(None).await.expect("token");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let id = rust.register_service(service(seen.clone())).await.expect("register");
    assert!(id.ends_with(":js-interop"), "{id}");

    let script = root.join("tests").join("js").join("call_rust.mjs");
    let script = script.to_str().expect("utf-8 path");
    let (ok, out, err) =
        run_node(&root.join("tests").join("js"), &[script, hs.url(), rust.workspace(), &token, &id]).await;
    eprintln!("node stderr:\n{err}");
    assert!(ok, "node failed\nstdout:\n{out}\nstderr:\n{err}\n{}", hs.log_tail(40));
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line\nstdout:\n{out}\nstderr:\n{err}"));
    let r: serde_json::Value = serde_json::from_str(line).expect("RESULT is JSON");
    println!("js results: {}", serde_json::to_string_pretty(&r).unwrap());
    let ok = |name: &str| -> &serde_json::Value {
        let c = &r[name];
        assert_eq!(c["ok"], json!(true), "{name}: {c}");
        &c["value"]
    };

    // Positional and keyword arguments, as JS saw the replies.
    assert_eq!(ok("positional"), &json!(42));
    assert_eq!(ok("positional_object"), &json!({"nargs": 2, "kwarg_keys": null}));
    assert_eq!(ok("kwargs"), &json!({"nargs": 1, "kwarg_keys": ["name", "count"]}));
    assert_eq!(ok("kwargs_empty"), &json!({"nargs": 0, "kwarg_keys": []}));
    assert_eq!(ok("kwargs_typed"), &json!(6.5));
    assert_eq!(ok("kwargs_typedarray"), &json!({"nargs": 0, "kwarg_keys": ["label", "data"]}));

    // Typed arrays into Rust, as JS saw the replies.
    let inspected = |label: &str, kind: &str, dtype: &str, nbytes: usize, values: Vec<f64>| {
        let name = format!("inspect_{label}");
        assert_close(
            ok(&name),
            &json!({"kind": kind, "dtype": dtype, "nbytes": nbytes, "values": values}),
            &name,
        );
    };
    inspected("f32", "typedarray", "float32", 16, f32s(&[1.5, -2.25, 0.1, 3e38]));
    inspected("f64", "typedarray", "float64", 24, vec![0.1, -1e300, 2.5]);
    inspected("i8", "typedarray", "int8", 4, vec![-128.0, -1.0, 0.0, 127.0]);
    inspected("i16", "typedarray", "int16", 6, vec![-32768.0, 1234.0, 32767.0]);
    inspected("i32", "typedarray", "int32", 16, vec![-2147483648.0, -1.0, 0.0, 2147483647.0]);
    inspected("u8", "bin", "uint8", 4, vec![0.0, 1.0, 254.0, 255.0]);
    inspected("u16", "typedarray", "uint16", 6, vec![0.0, 513.0, 65535.0]);
    inspected("u32", "typedarray", "uint32", 12, vec![0.0, 1.0, 4294967295.0]);
    // The JS client sends a view's whole underlying buffer, not just the view.
    inspected("f32_sub", "typedarray", "float32", 16, vec![1.0, 2.0, 3.0, 4.0]);
    inspected("buffer", "memoryview", "uint8", 3, vec![9.0, 8.0, 7.0]);
    inspected("f32_empty", "typedarray", "float32", 0, vec![]);
    assert_eq!(
        ok("inspect_large"),
        &json!({"kind": "typedarray", "dtype": "float64", "nbytes": 4_000_000, "n": 500_000, "last": 249_999.5})
    );

    // Arrays and bytes from Rust, as JS decoded them.
    assert_close(
        ok("double_f32"),
        &json!({"ctor": "Float32Array", "values": f32s(&[2.5, -6.0, 2e-3])}),
        "double_f32",
    );
    assert_eq!(ok("make_bytes"), &json!({"ctor": "Uint8Array", "values": [0, 1, 2, 3, 4]}));
    let sum: u64 = pattern(3_000_000).iter().map(|&b| b as u64).sum();
    assert_eq!(ok("make_bytes_large"), &json!({"ctor": "Uint8Array", "length": 3_000_000, "sum": sum}));
    assert_close(
        ok("make_typed"),
        &json!({
            "i32": {"ctor": "Int32Array", "values": [i32::MIN, -7, i32::MAX]},
            "f64": {"ctor": "Float64Array", "values": [0.1, -2.5]},
            "u16": {"ctor": "Uint16Array", "values": [1, 65535]},
            "i8": {"ctor": "Int8Array", "values": [-128, 127]},
            "u8": {"ctor": "Uint8Array", "values": [3, 250]},
        }),
        "make_typed",
    );
    assert_close(
        ok("make_ndarray"),
        &json!({"rtype": "ndarray", "shape": [2, 3], "dtype": "float32", "rvalue_ctor": "Uint8Array",
                "values": [1.0, 2.0, 3.0, 4.0, 5.0, 6.5]}),
        "make_ndarray",
    );
    assert_eq!(ok("make_memoryview"), &json!({"ctor": "ArrayBuffer", "values": [0xde, 0xad, 0xbe, 0xef]}));

    // Errors from Rust reach JS with their message.
    let e = &r["error"];
    assert_eq!(e["ok"], json!(false), "{e}");
    assert!(e["error"].as_str().unwrap().contains("rust refused: too cold"), "{e}");
    let e = &r["error_decode"];
    assert_eq!(e["ok"], json!(false), "{e}");
    let text = e["error"].as_str().unwrap();
    assert!(text.contains("argument 1 should be i64, got str"), "{e}");

    // What arrived on the Rust side, exactly.
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let map = |pairs: Vec<(&str, Value)>| {
        let mut m = Map::new();
        for (k, v) in pairs {
            m.push(k, v);
        }
        m
    };
    let mut obj = Map::new();
    obj.push("a", 1);
    assert_eq!(
        seen.described,
        vec![
            (vec![Value::from("pos"), Value::Map(obj)], None),
            (vec![Value::from("pos")], Some(map(vec![("name", "Ada".into()), ("count", 3.into())]))),
            (vec![], Some(Map::new())),
            (
                vec![],
                Some(map(vec![
                    ("label", "kw".into()),
                    ("data", typed(Scalar::Float32, le(&[0.5f32, -4.0], f32::to_le_bytes))),
                ]))
            ),
        ]
    );
    let wire: Vec<(&str, Value)> = vec![
        ("f32", typed(Scalar::Float32, le(&[1.5f32, -2.25, 0.1, 3e38], f32::to_le_bytes))),
        ("f64", typed(Scalar::Float64, le(&[0.1f64, -1e300, 2.5], f64::to_le_bytes))),
        ("i8", typed(Scalar::Int8, le(&[-128i8, -1, 0, 127], i8::to_le_bytes))),
        ("i16", typed(Scalar::Int16, le(&[-32768i16, 1234, 32767], i16::to_le_bytes))),
        ("i32", typed(Scalar::Int32, le(&[i32::MIN, -1, 0, i32::MAX], i32::to_le_bytes))),
        ("u8", Value::bin(vec![0u8, 1, 254, 255])),
        ("u16", typed(Scalar::UInt16, le(&[0u16, 513, 65535], u16::to_le_bytes))),
        ("u32", typed(Scalar::UInt32, le(&[0u32, 1, u32::MAX], u32::to_le_bytes))),
        ("f32_sub", typed(Scalar::Float32, le(&[1.0f32, 2.0, 3.0, 4.0], f32::to_le_bytes))),
        ("buffer", MemoryView(Bytes::from_static(&[9, 8, 7])).to_value()),
        ("f32_empty", typed(Scalar::Float32, vec![])),
        (
            "large",
            typed(
                Scalar::Float64,
                le(&(0..500_000).map(|i| i as f64 * 0.5).collect::<Vec<_>>(), f64::to_le_bytes),
            ),
        ),
    ];
    let got: Vec<(&str, &Value)> = seen.inspected.iter().map(|(l, v)| (l.as_str(), v)).collect();
    let want: Vec<(&str, &Value)> = wire.iter().map(|(l, v)| (*l, v)).collect();
    assert_eq!(got, want);

    rust.disconnect().await;
    println!("js interop took {:?}", started.elapsed());
}
