//! The async client against a real Python `hypha-rpc` client through the real Hypha server, in
//! both directions, on tokio and on smol.
//!
//! A: Python (`tests/py/client_peer.py`, command `call_rust`) calls a Rust service: every data
//! type of the encoding table (typed and untyped), numpy arrays, errors, kwargs, callbacks both
//! ways, `require_context`, generators, `_rintf` with dispose, 20 MiB of bytes, a call longer
//! than the caller's `method_timeout` kept alive by heartbeats, a missing method; then a call
//! to a Rust client that disconnects (in flight and afterwards) must fail fast.
//!
//! B: Rust calls the Python services `py-svc` and `py-ctx`: the same list the other way round
//! (plus a control: a sync Python function sends no heartbeats, so our 3 s timeout fires),
//! ending with a call in flight when the Python client leaves and one after it left.
//!
//! (Three cases once failed here because of client bugs; all are fixed and enabled.)
//!
//! The scenario is written once against `hypha_rpc::Server` and run by `python_interop_tokio`
//! and `python_interop_smol`; each starts its own Hypha server and Python peer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::channel::mpsc;
use futures::future::BoxFuture;
use hypha_rpc::runtime::Runtime;
use hypha_rpc::serde_bytes::ByteBuf;
use hypha_rpc::{
    Call, CallError, Callback, Context, Error, Generator, Interface, RemoteFunction, RemoteGenerator,
    RemoteInterface, Server, ServerConfig, Service, Value, Visibility,
};
use hypha_rpc_tests::pypeer::{PyPeer, within};
use hypha_rpc_tests::server::HyphaServer;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use sha2::Digest;

/// A connect function: `hypha_rpc_tokio::connect_to_server` or `hypha_rpc_smol::connect_to_server`.
type Connect = fn(ServerConfig) -> BoxFuture<'static, hypha_rpc::Result<Server>>;

/// 20 MiB: above the default `Limits::max_bin_len` (16 MiB), which chunked messages may exceed
/// up to `max_message_bytes`.
const BIG: usize = 20 * 1024 * 1024;
/// Upper bound for "fails fast": the callers' method timeouts are 20 s.
const FAST: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_interop_tokio() {
    let connect: Connect = |c| Box::pin(hypha_rpc_tokio::connect_to_server(c));
    interop("tokio", Arc::new(hypha_rpc_tokio::TokioRuntime), connect).await;
}

#[test]
fn python_interop_smol() {
    let connect: Connect = |c| Box::pin(hypha_rpc_smol::connect_to_server(c));
    smol::block_on(interop("smol", Arc::new(hypha_rpc_smol::SmolRuntime), connect));
}

// ---- wire shapes ------------------------------------------------------------------------------

/// A numpy array as it travels (`_rtype: ndarray`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct NdWire {
    #[serde(rename = "_rtype")]
    rtype: String,
    #[serde(rename = "_rvalue")]
    value: ByteBuf,
    #[serde(rename = "_rshape")]
    shape: Vec<u64>,
    #[serde(rename = "_rdtype")]
    dtype: String,
}

/// A Python `set` as it travels (`_rtype: set`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct SetWire<T> {
    #[serde(rename = "_rtype")]
    rtype: String,
    #[serde(rename = "_rvalue")]
    items: Vec<T>,
}

fn set_of<T>(items: Vec<T>) -> SetWire<T> {
    SetWire { rtype: "set".into(), items }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Item {
    x: i64,
    tags: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Nested {
    name: String,
    items: Vec<Item>,
    child: Option<Box<Nested>>,
}

/// What `typed_all` receives as keyword arguments from Python (`ALL_TYPES` in the script).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct AllTypes {
    none: Option<i64>,
    t: bool,
    f: bool,
    neg: i64,
    min: i64,
    max: u64,
    big: u64,
    float: f64,
    text: String,
    bytes: ByteBuf,
    list: Vec<i64>,
    tuple: (i64, String, bool),
    dict: BTreeMap<String, i64>,
    nested: Nested,
    set: SetWire<i64>,
}

fn expected_all_types() -> AllTypes {
    AllTypes {
        none: None,
        t: true,
        f: false,
        neg: -7,
        min: i64::MIN,
        max: u64::MAX,
        big: (1 << 32) + 5,
        float: -0.125,
        text: "grüße, 世界 🌍".into(),
        bytes: ByteBuf::from(vec![0, 1, 2, 255]),
        list: vec![1, 2, 3],
        tuple: (4, "four".into(), false),
        dict: [("x".to_string(), 1), ("y".to_string(), -2)].into_iter().collect(),
        nested: Nested {
            name: "outer".into(),
            items: vec![Item { x: 1, tags: vec!["a".into()] }],
            child: Some(Box::new(Nested { name: "inner".into(), items: vec![], child: None })),
        },
        set: set_of(vec![5, 6]),
    }
}

/// What Python's `make_values` returns, decoded into Rust types.
#[derive(Deserialize, Debug)]
struct PyValues {
    none: Option<i64>,
    t: bool,
    f: bool,
    zero: u8,
    neg: i32,
    min: i64,
    max: u64,
    big: u64,
    float: f64,
    tiny: f64,
    text: String,
    empty: String,
    bytes: ByteBuf,
    list: Vec<i64>,
    tuple: (i64, String, bool),
    dict: BTreeMap<String, i64>,
    nested: Nested,
    set: SetWire<i64>,
    array: NdWire,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct GreetArgs {
    name: String,
    punctuation: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct ScaleKw {
    factor: i64,
}

#[derive(Serialize, Debug)]
struct RawArgs {
    args: Vec<Value>,
    kwargs: Option<hypha_rpc::Map>,
}

/// A callback inside a map argument.
#[derive(Deserialize, Debug)]
struct NestedCallback {
    f: RemoteFunction,
    x: i64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct WhoAmI {
    from: String,
    ws: String,
    to: String,
}

/// The numpy item size of a dtype name.
fn item_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "bool" | "int8" | "uint8" => 1,
        "int16" | "uint16" => 2,
        "int32" | "uint32" | "float32" => 4,
        "int64" | "uint64" | "float64" | "complex64" => 8,
        "complex128" => 16,
        _ => return None,
    })
}

/// The bytes of the script's `make_array(dtype, shape)`: `(arange(n) % 7 - 3).astype(dtype)`,
/// little-endian, computed here independently of Python.
fn expected_nd_bytes(dtype: &str, n: usize) -> Vec<u8> {
    let vals = (0..n).map(|i| (i % 7) as i64 - 3);
    let mut out = Vec::new();
    for v in vals {
        match dtype {
            "bool" => out.push((v != 0) as u8),
            "int8" => out.extend((v as i8).to_le_bytes()),
            "uint8" => out.extend((v as u8).to_le_bytes()),
            "int16" => out.extend((v as i16).to_le_bytes()),
            "uint16" => out.extend((v as u16).to_le_bytes()),
            "int32" => out.extend((v as i32).to_le_bytes()),
            "uint32" => out.extend((v as u32).to_le_bytes()),
            "int64" => out.extend(v.to_le_bytes()),
            "uint64" => out.extend((v as u64).to_le_bytes()),
            "float32" => out.extend((v as f32).to_le_bytes()),
            "float64" => out.extend((v as f64).to_le_bytes()),
            "complex64" => {
                out.extend((v as f32).to_le_bytes());
                out.extend(0f32.to_le_bytes());
            }
            "complex128" => {
                out.extend((v as f64).to_le_bytes());
                out.extend(0f64.to_le_bytes());
            }
            other => panic!("no expected bytes for {other}"),
        }
    }
    out
}

fn big_payload() -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8 ^ (i >> 16) as u8).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// The Python peer process (`tests/py/client_peer.py`) is driven by
// `hypha_rpc_tests::pypeer::PyPeer`: JSON lines, requests with an `id`, events without.

// ---- the Rust services --------------------------------------------------------------------------

/// What the Rust service saw, for assertions after Python is done.
#[derive(Default)]
struct Observed {
    endless_closed: AtomicBool,
    counter_released: AtomicBool,
    last_counter: AtomicI64,
    typed_all_calls: AtomicU64,
}

/// Flags a drop (the end of a generator stream, the release of an interface's functions).
struct SetOnDrop(Arc<Observed>, fn(&Observed) -> &AtomicBool);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        (self.1)(&self.0).store(true, Ordering::SeqCst);
    }
}

/// The Rust service Python calls in part A.
fn rust_service(rt: Arc<dyn Runtime>, obs: Arc<Observed>, me: String) -> Service {
    let o = obs.clone();
    let o2 = obs.clone();
    let o3 = obs.clone();
    let o4 = obs.clone();
    Service::new("rust-svc")
        .visibility(Visibility::Public)
        .function_raw("echo", |call: Call| async move {
            Ok::<_, String>(call.args.into_iter().next().unwrap_or(Value::Nil))
        })
        .function("typed_all", move |all: AllTypes| {
            o.typed_all_calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let want = expected_all_types();
                if all == want {
                    Ok(all)
                } else {
                    Err(format!("typed_all mismatch: got {all:?}, want {want:?}"))
                }
            }
        })
        .function("nd_info", |a: NdWire| async move {
            let n: u64 = a.shape.iter().product();
            let size = item_size(&a.dtype).ok_or_else(|| format!("unknown dtype {}", a.dtype))? as u64;
            Ok::<_, String>(json!({
                "rtype": a.rtype,
                "dtype": a.dtype,
                "shape": a.shape,
                "nbytes": a.value.len(),
                "consistent": n * size == a.value.len() as u64,
                "as_expected": a.value.as_slice() == expected_nd_bytes(&a.dtype, n as usize).as_slice(),
            }))
        })
        .function("nd_echo", |a: NdWire| async move { Ok::<_, String>(a) })
        .function("nd_make", |n: u64| async move {
            let value: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
            Ok::<_, String>(NdWire {
                rtype: "ndarray".into(),
                value: ByteBuf::from(value),
                shape: vec![2, n / 2],
                dtype: "float32".into(),
            })
        })
        .function("make_set", || async move { Ok::<_, String>(set_of(vec![3i64, 1, 2])) })
        .function("fail", |msg: String| async move { Err::<(), _>(format!("rust-failure: {msg}")) })
        .function("add", |a: i64, b: i64| async move { Ok::<_, String>(a + b) })
        .function("greet", |args: GreetArgs| async move {
            Ok::<_, String>(format!("Hello, {}{}", args.name, args.punctuation.as_deref().unwrap_or(".")))
        })
        .function("scale", |x: i64, kw: ScaleKw| async move { Ok::<_, String>(x * kw.factor) })
        .function_raw("raw_args", |call: Call| async move {
            Ok::<_, String>(RawArgs { args: call.args, kwargs: call.kwargs })
        })
        .function("apply", |f: RemoteFunction, x: i64| async move {
            f.call::<i64>((x,)).await.map_err(|e| format!("the callback failed: {e}"))
        })
        .function("apply_nested", |opts: NestedCallback| async move {
            opts.f.call::<i64>((opts.x,)).await.map_err(|e| e.to_string())
        })
        .function("collect_gen", |g: RemoteGenerator| async move {
            let items: Vec<hypha_rpc::Result<i64>> = g.typed::<i64>().collect().await;
            items.into_iter().collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())
        })
        .function("notify_each", |items: Vec<String>, f: RemoteFunction| async move {
            let mut out = Vec::new();
            for it in items {
                out.push(f.call::<i64>((it,)).await.map_err(|e| e.to_string())?);
            }
            Ok::<_, String>(out)
        })
        .function("make_adder", |n: i64| async move {
            Ok::<_, String>(Callback::new(move |x: i64| async move { Ok::<_, String>(x + n) }).named("adder"))
        })
        .function_with_context("whoami", |ctx: Context| async move {
            Ok::<_, String>(WhoAmI { from: ctx.from, ws: ctx.ws, to: ctx.to })
        })
        .function(
            "count",
            |n: u32| async move { Ok::<_, String>(Generator::new(futures::stream::iter(0..n))) },
        )
        .function("items", || async move {
            let items = vec![
                Value::from(1),
                Value::from("two"),
                Value::Array(vec![Value::from(3)]),
                Value::Map([("four", 4)].into_iter().collect()),
                Value::Nil,
                Value::bin(vec![5u8, 5]),
                Value::from(6.5),
            ];
            Ok::<_, String>(Generator::new(futures::stream::iter(items)))
        })
        .function("endless", move || {
            let guard = SetOnDrop(o2.clone(), |o| &o.endless_closed);
            async move {
                let s = futures::stream::iter(0u64..).map(move |i| {
                    let _keep = &guard;
                    i
                });
                Ok::<_, String>(Generator::new(s))
            }
        })
        .function("count_fail", |n: u32| async move {
            let s = futures::stream::iter((0..n).map(Ok))
                .chain(futures::stream::once(async { Err("rust-gen-failure".to_string()) }));
            Ok::<_, String>(Generator::try_new(s))
        })
        .function("counter", move |start: i64| {
            let obs = o3.clone();
            async move {
                let v = Arc::new(AtomicI64::new(start));
                let guard = Arc::new(SetOnDrop(obs.clone(), |o| &o.counter_released));
                let (v1, v2, g1, g2, o) = (v.clone(), v, guard.clone(), guard, obs);
                Ok::<_, String>(
                    Interface::new()
                        .value("name", "rust-counter")
                        .function("inc", move |by: i64| {
                            let _keep = &g1;
                            let now = v1.fetch_add(by, Ordering::SeqCst) + by;
                            o.last_counter.store(now, Ordering::SeqCst);
                            async move { Ok::<_, String>(now) }
                        })
                        .function("get", move || {
                            let _keep = &g2;
                            let now = v2.load(Ordering::SeqCst);
                            async move { Ok::<_, String>(now) }
                        }),
                )
            }
        })
        .function("counter_total", move || {
            let now = o4.last_counter.load(Ordering::SeqCst);
            async move { Ok::<_, String>(now) }
        })
        .function("echo_bytes", |b: ByteBuf| async move { Ok::<_, String>(b) })
        .function("bytes_sha256", |b: ByteBuf| async move { Ok::<_, String>(hex(&sha2::Sha256::digest(&b))) })
        .function("sleep", move |secs: f64| {
            let rt = rt.clone();
            async move {
                rt.sleep(Duration::from_secs_f64(secs)).await;
                Ok::<_, String>(secs)
            }
        })
        .function("missing_method", move || {
            // A descriptor of a function this service does not have, built as plain data.
            let m = json!({
                "_rtype": "method",
                "_rtarget": me,
                "_rmethod": "services.rust-svc.does_not_exist",
                "_rpromise": "*",
            });
            async move { Ok::<_, String>(m) }
        })
}

// ---- the scenario -------------------------------------------------------------------------------

async fn interop(name: &str, rt: Arc<dyn Runtime>, connect: Connect) {
    let started = Instant::now();
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let rs =
        connect(ServerConfig::new(hs.url()).client_id("rs-main").method_timeout(Duration::from_secs(20)))
            .await
            .expect("connect rs-main");
    let ws = rs.workspace().to_string();
    let token = rs.generate_token(None).await.expect("generate_token");
    let config = |id: &str| {
        ServerConfig::new(hs.url()).workspace(ws.clone()).token(token.clone()).client_id(id.to_string())
    };

    let obs = Arc::new(Observed::default());
    let me = format!("{ws}/{}", rs.client_id());
    let rust_svc =
        rs.register_service(rust_service(rt.clone(), obs.clone(), me)).await.expect("register rust-svc");
    assert_eq!(rust_svc, format!("{ws}/rs-main:rust-svc"));

    let mut py = PyPeer::start(&hs, rt.clone(), "client_peer.py", &[&ws, &token]);
    let ready = py.event("ready", Duration::from_secs(60)).await;
    assert_eq!(ready["workspace"], ws);
    println!("[{name}] server, clients and Python peer up after {:?}", started.elapsed());

    let t = Instant::now();
    python_calls_rust(&py, &rust_svc, &obs, &ws, &*rt).await;
    println!("[{name}] A: Python called Rust in {:?}", t.elapsed());

    let t = Instant::now();
    python_calls_departed_rust(&py, connect, config("rs-gone"), rt.clone()).await;
    println!("[{name}] A: calls to a departed Rust client in {:?}", t.elapsed());

    let t = Instant::now();
    let py_svc = ready["service_id"].as_str().unwrap().to_string();
    let ctx_svc = ready["ctx_service_id"].as_str().unwrap().to_string();
    rust_calls_python(&rs, &py_svc, &ctx_svc, &rt).await;
    let hb = connect(config("rs-hb").method_timeout(Duration::from_secs(3))).await.expect("connect rs-hb");
    heartbeat_keeps_rust_call_alive(&hb, &py, &py_svc).await;
    println!("[{name}] B: Rust called Python in {:?}", t.elapsed());

    let t = Instant::now();
    rust_calls_departed_python(&rs, &mut py, &py_svc, &rt).await;
    println!("[{name}] B: calls to a departed Python client in {:?}", t.elapsed());

    hb.disconnect().await;
    rs.disconnect().await;
    println!("[{name}] total {:?}", started.elapsed());
}

/// Part A: Python calls `rust-svc`; the assertions are on what Python reports.
async fn python_calls_rust(py: &PyPeer, rust_svc: &str, obs: &Observed, ws: &str, rt: &dyn Runtime) {
    let out = py.request(json!({"cmd": "call_rust", "service": rust_svc}), Duration::from_secs(120)).await;
    let r = &out["results"];
    let ok = |k: &str| -> &Json {
        let v = &r[k];
        assert!(v.get("error").is_none() && v.get("ok").is_some(), "{k}: {v}");
        &v["ok"]
    };

    // Every type through an untyped echo: same value back, with the Python type it had (a
    // tuple comes back as a list, a dict as hypha-rpc's ObjectProxy, a set as a set).
    let types = [
        ("none", "NoneType"),
        ("true", "bool"),
        ("false", "bool"),
        ("zero", "int"),
        ("neg", "int"),
        ("min_i64", "int"),
        ("max_u64", "int"),
        ("big", "int"),
        ("neg_big", "int"),
        ("float", "float"),
        ("neg_float", "float"),
        ("text", "str"),
        ("empty_str", "str"),
        ("bytes", "bytes"),
        ("empty_bytes", "bytes"),
        ("list", "list"),
        ("empty_list", "list"),
        ("tuple", "list"),
        ("dict", "ObjectProxy"),
        ("empty_dict", "ObjectProxy"),
        ("nested", "ObjectProxy"),
        ("set", "set"),
    ];
    let echo = r["echo"].as_object().expect("echo results");
    assert_eq!(echo.len(), types.len(), "{echo:?}");
    for (k, ty) in types {
        let e = &echo[k];
        assert!(e.get("error").is_none(), "echo {k}: {e}");
        assert_eq!(e["equal"], true, "echo {k} came back different: {e}");
        assert_eq!(e["type"], ty, "echo {k}: {e}");
    }
    assert_eq!(echo["max_u64"]["ok"], json!(u64::MAX));
    assert_eq!(echo["min_i64"]["ok"], json!(i64::MIN));
    assert_eq!(echo["text"]["ok"], "héllo wörld ✓ 日本語 🎉");
    assert_eq!(echo["set"]["ok"], json!({"$set": [1, 2, 3]}));
    assert_eq!(echo["bytes"]["ok"]["$bytes"], hex(&(0..=255u8).collect::<Vec<_>>()));

    // The same types as typed Rust fields (kwargs into one struct) and back to Python.
    assert_eq!(obs.typed_all_calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        *ok("typed_all"),
        json!({
            "none": null, "t": true, "f": false, "neg": -7, "min": i64::MIN, "max": u64::MAX,
            "big": 4294967301u64, "float": -0.125, "text": "grüße, 世界 🌍",
            "bytes": {"$bytes": "000102ff"}, "list": [1, 2, 3], "tuple": [4, "four", false],
            "dict": {"x": 1, "y": -2},
            "nested": {"name": "outer", "items": [{"x": 1, "tags": ["a"]}],
                       "child": {"name": "inner", "items": [], "child": null}},
            "set": {"$set": [5, 6]},
        })
    );

    // numpy: Rust sees the dtype, shape and exact bytes; the typed echo is the same array.
    let nd = r["nd"].as_array().expect("nd results");
    assert_eq!(nd.len(), 15);
    for case in nd {
        let info = &case["info"];
        assert!(info.get("error").is_none(), "nd_info {case}");
        let info = &info["ok"];
        assert_eq!(info["rtype"], "ndarray", "{case}");
        assert_eq!(info["dtype"], case["dtype"], "{case}");
        assert_eq!(info["shape"], case["shape"], "{case}");
        assert_eq!(info["consistent"], true, "{case}");
        assert_eq!(info["as_expected"], true, "bytes differ from Rust's computation: {case}");
        assert_eq!(case["roundtrip_equal"], true, "Python -> Rust -> Python: {case}");
    }
    assert_eq!(r["nd_make"], json!({"is_ndarray": true, "equal": true, "dtype": "float32", "shape": [2, 3]}));
    assert_eq!(r["set_from_rust"], json!({"type": "set", "value": {"$set": [1, 2, 3]}}));

    // Errors: the Rust Err text arrives as a Python exception; a bad argument too.
    let fail = &r["fail"];
    assert!(fail["error"].as_str().is_some_and(|e| e.contains("rust-failure: boom")), "{fail}");
    let bad = &r["bad_arg"];
    assert!(bad["error"].as_str().is_some_and(|e| e.contains("argument")), "{bad}");

    // kwargs.
    assert_eq!(*ok("greet_kwargs"), "Hello, Ada!");
    assert_eq!(*ok("greet_kwarg_default"), "Hello, Bob.");
    assert_eq!(*ok("scale_mixed"), 42);
    assert_eq!(*ok("raw_args"), json!({"args": [1, "two"], "kwargs": {"x": 3, "y": [4]}}));

    // Callbacks both ways.
    assert_eq!(*ok("apply_sync"), 21);
    assert_eq!(*ok("apply_async"), 101);
    let af = &r["apply_failing"];
    assert!(af["error"].as_str().is_some_and(|e| e.contains("py-callback-failure")), "{af}");
    assert_eq!(r["adder"], json!([11, 12]));
    assert_eq!(*ok("adder_later"), 15, "a returned Rust function outlives its call");
    assert_eq!(*ok("notify"), json!([1, 2, 3]));
    assert_eq!(r["notify_got"], json!(["a", "b", "c"]));

    assert_eq!(*ok("apply_nested"), -5, "a callback inside a map");
    assert_eq!(*ok("sum_gen"), json!([0, 1, 4, 9, 16]), "a Python generator passed as an argument");
    assert_eq!(*ok("gather"), json!((0..200).map(|i| 2 * i).collect::<Vec<_>>()), "200 concurrent calls");

    // require_context: the trusted caller is the Python client.
    assert_eq!(
        *ok("whoami"),
        json!({"from": format!("{ws}/py-peer"), "ws": ws, "to": format!("{ws}/rs-main")})
    );

    // Generators.
    assert_eq!(r["count"], json!([0, 1, 2, 3, 4]));
    assert_eq!(r["count_empty"], json!([]));
    assert_eq!(r["items"], json!([1, "two", [3], {"four": 4}, null, {"$bytes": "0505"}, 6.5]));
    assert_eq!(r["endless_early"], json!([0, 1, 2]));
    let cf = &r["count_fail"];
    assert_eq!(cf["items"], json!([0, 1]), "{cf}");
    assert!(cf["error"].as_str().is_some_and(|e| e.contains("rust-gen-failure")), "{cf}");
    // The producer's own error travels verbatim, as Python's does.
    assert!(!cf["error"].as_str().unwrap().contains("cannot encode"), "{cf}");
    // Python's `break` closed the stream: the Rust side dropped it.
    for _ in 0..100 {
        if obs.endless_closed.load(Ordering::SeqCst) {
            break;
        }
        rt.sleep(Duration::from_millis(50)).await;
    }
    assert!(obs.endless_closed.load(Ordering::SeqCst), "Python's early break did not close the Rust stream");

    // _rintf: works until disposed, then calls fail (fast), and Rust released the functions.
    let keys = r["rintf_keys"].as_array().unwrap();
    for k in ["_dispose", "_rintf", "get", "inc", "name"] {
        assert!(keys.contains(&json!(k)), "{k} missing from {keys:?}");
    }
    assert_eq!(r["rintf_name"], "rust-counter");
    assert_eq!(*ok("rintf_inc"), 15);
    assert_eq!(*ok("rintf_inc2"), 16);
    assert_eq!(*ok("rintf_get"), 16);
    ok("rintf_dispose");
    let after = &r["rintf_after_dispose"];
    assert!(after.get("error").is_some(), "a disposed interface still answered: {after}");
    assert!(after["elapsed"].as_f64().unwrap() < FAST.as_secs_f64(), "{after}");
    assert_eq!(*ok("rintf_total"), 16, "the call after dispose must not reach the function");
    assert!(obs.counter_released.load(Ordering::SeqCst), "dispose did not release the interface's functions");

    // 20 MiB each way.
    let big = &r["big"];
    assert!(big.get("error").is_none(), "20 MiB echo: {big}");
    assert_eq!(big["type"], "bytes");
    assert_eq!(big["equal"], true, "{big}");
    assert_eq!(*ok("big_rust_sha256"), r["big_sha256"], "Rust received different bytes");

    // Heartbeats: Python's method_timeout is 3 s, the Rust function takes 6 s.
    assert_eq!(r["heartbeat_timeout"], 3);
    let hb = &r["heartbeat"];
    assert_eq!(hb["ok"], 6.0, "{hb}");
    assert!(hb["elapsed"].as_f64().unwrap() >= 5.9, "{hb}");

    // A method the service does not have, and a service that does not exist.
    let mm = &r["missing_method"];
    assert!(mm["error"].as_str().is_some_and(|e| e.contains("does_not_exist")), "{mm}");
    assert!(mm["elapsed"].as_f64().unwrap() < FAST.as_secs_f64(), "{mm}");
    let ms = &r["missing_service"];
    assert!(ms["error"].as_str().is_some_and(|e| e.contains("no-such-service")), "{ms}");
}

/// Part A, last: Python holds a Rust service whose client disconnects, during a call and
/// before one. Both calls must fail well before Python's 20 s method_timeout.
async fn python_calls_departed_rust(
    py: &PyPeer,
    connect: Connect,
    config: ServerConfig,
    rt: Arc<dyn Runtime>,
) {
    let gone = connect(config).await.expect("connect rs-gone");
    let (started_tx, mut started_rx) = mpsc::unbounded::<()>();
    let svc = Service::new("ephemeral")
        .visibility(Visibility::Public)
        .function("ping", || async move { Ok::<_, String>("pong") })
        .function("slow", move |secs: f64| {
            let _ = started_tx.unbounded_send(());
            let rt = rt.clone();
            async move {
                rt.sleep(Duration::from_secs_f64(secs)).await;
                Ok::<_, String>(secs)
            }
        });
    let id = gone.register_service(svc).await.expect("register ephemeral");
    let got = py.request(json!({"cmd": "get", "service": id}), Duration::from_secs(20)).await;
    assert!(got["ok"].as_array().unwrap().contains(&json!("slow")), "{got}");
    let pong = py.request(json!({"cmd": "call", "method": "ping"}), Duration::from_secs(20)).await;
    assert_eq!(pong["ok"], "pong", "{pong}");

    // In flight: Python waits on `slow(30)` when we leave.
    let call = py.request(json!({"cmd": "call", "method": "slow", "args": [30]}), Duration::from_secs(40));
    let leave = async {
        within(py.runtime(), Duration::from_secs(20), started_rx.next())
            .await
            .expect("Python's call reached Rust");
        gone.disconnect().await;
        Instant::now()
    };
    let (r, left_at) = futures::join!(call, leave);
    let after_leave = left_at.elapsed();
    println!("in-flight call to a departed Rust client: {r} ({after_leave:?} after disconnect)");
    assert!(r.get("error").is_some(), "a call in flight to a departed Rust client: {r}");
    assert!(after_leave < FAST, "Python noticed only after {after_leave:?}: {r}");

    // After: the proxy Python still holds.
    let r = py.request(json!({"cmd": "call", "method": "ping"}), Duration::from_secs(40)).await;
    println!("call to a departed Rust client: {r}");
    assert!(r.get("error").is_some(), "a departed Rust client answered: {r}");
    assert!(r["elapsed"].as_f64().unwrap() < FAST.as_secs_f64(), "{r}");
}

/// Part B: Rust calls `py-svc` and `py-ctx`.
async fn rust_calls_python(rs: &Server, py_svc: &str, ctx_svc: &str, rt: &Arc<dyn Runtime>) {
    let p = rs.get_service(py_svc).await.expect("get py-svc");
    for f in ["echo", "describe", "make_values", "make_counter", "slow", "count"] {
        assert!(p.functions().iter().any(|x| x == f), "{f} not in {:?}", p.functions());
    }

    // Typed round trips through Python's echo.
    macro_rules! roundtrip {
        ($v:expr, $t:ty) => {{
            let v: $t = $v;
            let back: $t = p.call("echo", (v.clone(),)).await.unwrap_or_else(|e| panic!("echo {:?}: {e}", v));
            assert_eq!(back, v, "echo through Python");
        }};
    }
    roundtrip!(None, Option<i64>);
    roundtrip!(Some(3), Option<i64>);
    roundtrip!((), ());
    roundtrip!(true, bool);
    roundtrip!(false, bool);
    roundtrip!(0, i64);
    roundtrip!(-5, i64);
    roundtrip!(i64::MIN, i64);
    roundtrip!(i64::MAX, i64);
    roundtrip!(u64::MAX, u64);
    roundtrip!((1 << 32) + 5, u64);
    roundtrip!(-(1 << 40), i64);
    roundtrip!(1.5, f64);
    roundtrip!(-1e300, f64);
    roundtrip!(0.25, f32);
    roundtrip!("héllo wörld ✓ 日本語 🎉".into(), String);
    roundtrip!(String::new(), String);
    roundtrip!(ByteBuf::from((0..=255u8).collect::<Vec<_>>()), ByteBuf);
    roundtrip!(ByteBuf::new(), ByteBuf);
    roundtrip!(vec![1, -2, 3], Vec<i64>);
    roundtrip!(vec![], Vec<String>);
    roundtrip!((7, "seven".into(), true), (i64, String, bool));
    roundtrip!([("a".to_string(), 1), ("b".to_string(), 2)].into_iter().collect(), BTreeMap<String, i64>);
    roundtrip!(expected_all_types().nested, Nested);
    let all: AllTypes = p.call("echo", (expected_all_types(),)).await.expect("echo AllTypes");
    let mut want = expected_all_types();
    want.set.items.sort();
    let mut all = all;
    all.set.items.sort();
    assert_eq!(all, want, "a struct with every type through Python");
    let set: SetWire<i64> = p.call("echo", (set_of(vec![3i64, 1, 2]),)).await.expect("echo set");
    let mut items = set.items.clone();
    items.sort();
    assert_eq!((set.rtype.as_str(), items), ("set", vec![1, 2, 3]));
    let v: Value = p.call_value("echo", vec![Value::from(5)], None).await.expect("call_value");
    assert_eq!(v, Value::from(5));

    // What Python makes of Rust values.
    let describe = |v: Value| {
        let p = p.clone();
        async move { p.call::<Json>("describe", (v,)).await.expect("describe") }
    };
    let d = p.call::<Json>("describe", (ByteBuf::from(vec![1u8, 2]),)).await.unwrap();
    assert_eq!(d, json!({"type": "bytes", "value": {"$bytes": "0102"}}));
    let d = p.call::<Json>("describe", (vec![1u8, 2],)).await.unwrap();
    assert_eq!(d, json!({"type": "list", "value": [1, 2]}), "a Vec<u8> is a list");
    let d = p.call::<Json>("describe", ((1, "a"),)).await.unwrap();
    assert_eq!(d, json!({"type": "list", "value": [1, "a"]}));
    let d = p.call::<Json>("describe", (set_of(vec!["b", "a"]),)).await.unwrap();
    assert_eq!(d, json!({"type": "set", "value": {"$set": ["a", "b"]}}));
    let d = p.call::<Json>("describe", (None::<i64>,)).await.unwrap();
    assert_eq!(d, json!({"type": "NoneType", "value": null}));
    let d = p.call::<Json>("describe", (u64::MAX,)).await.unwrap();
    assert_eq!(d, json!({"type": "int", "value": u64::MAX}));
    let d = p.call::<Json>("describe", (0.5f32,)).await.unwrap();
    assert_eq!(d, json!({"type": "float", "value": 0.5}));
    let d = p.call::<Json>("describe", (GreetArgs { name: "x".into(), punctuation: None },)).await.unwrap();
    assert_eq!(d, json!({"type": "ObjectProxy", "value": {"name": "x", "punctuation": null}}));
    let d = describe(Value::Map([("k", Value::from(-1))].into_iter().collect())).await;
    assert_eq!(d, json!({"type": "ObjectProxy", "value": {"k": -1}}));
    let d = describe(Value::from("ünï")).await;
    assert_eq!(d, json!({"type": "str", "value": "ünï"}));

    // Python's values decoded into Rust types.
    let v: PyValues = p.call("make_values", ()).await.expect("make_values");
    assert_eq!((v.none, v.t, v.f, v.zero, v.neg), (None, true, false, 0, -5));
    assert_eq!((v.min, v.max, v.big), (i64::MIN, u64::MAX, (1 << 32) + 5));
    assert_eq!((v.float, v.tiny), (1.5, -2.5e-300));
    assert_eq!((v.text.as_str(), v.empty.as_str()), ("héllo wörld ✓ 日本語 🎉", ""));
    assert_eq!(v.bytes.as_slice(), (0..=255u8).collect::<Vec<_>>().as_slice());
    assert_eq!(v.list, vec![1, -2, 3]);
    assert_eq!(v.tuple, (7, "seven".to_string(), true), "a Python tuple decodes as a Rust tuple");
    assert_eq!(v.dict, [("a".to_string(), 1), ("b".to_string(), 2)].into_iter().collect());
    assert_eq!(v.nested.items[0].tags, vec!["a", "b"]);
    assert_eq!(v.nested.child.as_ref().map(|c| c.name.as_str()), Some("inner"));
    let mut items = v.set.items.clone();
    items.sort();
    assert_eq!((v.set.rtype.as_str(), items), ("set", vec![1, 2, 3]), "a Python set is `_rtype: set`");
    assert_eq!(
        (v.array.rtype.as_str(), v.array.dtype.as_str(), &v.array.shape[..]),
        ("ndarray", "float32", &[2, 3][..])
    );
    assert_eq!(v.array.value.as_slice(), expected_nd_bytes("float32", 6).as_slice());

    // numpy arrays: Python -> Rust (checked against Rust's own bytes) -> Python.
    let cases: [(&str, &[u64]); 13] = [
        ("float32", &[2, 3]),
        ("float64", &[5]),
        ("int8", &[3, 2]),
        ("int16", &[2, 2, 2]),
        ("int32", &[4]),
        ("int64", &[2, 3]),
        ("uint8", &[16]),
        ("uint16", &[3]),
        ("uint32", &[1, 4]),
        ("uint64", &[2]),
        ("bool", &[6]),
        ("complex64", &[2]),
        ("complex128", &[]),
    ];
    for (dtype, shape) in cases {
        let a: NdWire =
            p.call("make_nd", (dtype, shape)).await.unwrap_or_else(|e| panic!("make_nd {dtype}: {e}"));
        let n = shape.iter().product::<u64>() as usize;
        assert_eq!((a.rtype.as_str(), a.dtype.as_str(), &a.shape[..]), ("ndarray", dtype, shape));
        assert_eq!(a.value.as_slice(), expected_nd_bytes(dtype, n).as_slice(), "{dtype} bytes");
        let check: Json = p.call("check_nd", (a, dtype, shape)).await.expect("check_nd");
        assert_eq!(
            check,
            json!({"is_ndarray": true, "dtype": dtype, "shape": shape, "equal": true}),
            "{dtype}"
        );
    }
    // An array made in Rust.
    let mine = NdWire {
        rtype: "ndarray".into(),
        value: ByteBuf::from(expected_nd_bytes("int32", 6)),
        shape: vec![3, 2],
        dtype: "int32".into(),
    };
    let check: Json = p.call("check_nd", (mine.clone(), "int32", [3, 2])).await.expect("check_nd mine");
    assert_eq!(check, json!({"is_ndarray": true, "dtype": "int32", "shape": [3, 2], "equal": true}));
    let back: NdWire = p.call("echo", (mine.clone(),)).await.expect("echo ndarray");
    assert_eq!(back, mine);

    // A map with non-string keys would be dropped whole by Python's unpacker (strict_map_key,
    // PROTOCOL 4.1) and the call would time out; it is refused at once instead.
    let int_keys: BTreeMap<i64, &str> = [(1, "a")].into_iter().collect();
    let t = Instant::now();
    let e = p.call::<Json>("describe", (int_keys,)).await.expect_err("non-string map keys");
    assert!(matches!(e, Error::Encode(_)) && t.elapsed() < FAST, "{e:?} after {:?}", t.elapsed());

    // Keyword arguments.
    #[derive(Serialize)]
    struct C {
        c: i64,
    }
    let r: Json = p.call_with_kwargs("kwfunc", (1,), C { c: 3 }).await.expect("kwfunc");
    assert_eq!(r, json!({"a": 1, "b": 2, "c": 3}));
    let kw: BTreeMap<&str, i64> = [("a", 5), ("b", 6)].into_iter().collect();
    let r: Json = p.call_with_kwargs("kwfunc", (), kw).await.expect("kwfunc kwargs only");
    assert_eq!(r, json!({"a": 5, "b": 6, "c": null}));

    // Errors.
    let e = p.call::<()>("raise_error", ("boom",)).await.unwrap_err();
    assert!(e.remote_message().is_some_and(|m| m.contains("py-failure: boom")), "{e:?}");
    assert!(!e.is_timeout());

    // Callbacks: ours called by Python, Python's called by us.
    let times_ten = Callback::new(|i: i64| async move { Ok::<_, String>(i * 10) });
    let r: Vec<i64> = p.call("call_callback", (times_ten, 3)).await.expect("call_callback");
    assert_eq!(r, vec![0, 10, 20]);
    let failing = Callback::new(|_: String| async move { Err::<(), _>("rust-cb-failure") });
    let r: Json = p.call("callback_error", (failing,)).await.expect("callback_error");
    assert_eq!(r["raised"], true, "{r}");
    assert!(r["message"].as_str().unwrap().contains("rust-cb-failure"), "{r}");
    let mul: RemoteFunction = p.call("make_multiplier", (6,)).await.expect("make_multiplier");
    assert_eq!(mul.call::<i64>((7,)).await.expect("multiply"), 42);
    let _: Value = p.call("echo", (1,)).await.unwrap();
    assert_eq!(
        mul.call::<i64>((-2,)).await.expect("multiply later"),
        -12,
        "a returned function outlives its call"
    );

    // require_context on the Python side: it sees our id.
    let c = rs.get_service(ctx_svc).await.expect("get py-ctx");
    let me = format!("{}/{}", rs.workspace(), rs.client_id());
    let who: WhoAmI = c.call("whoami", ()).await.expect("whoami");
    assert_eq!(
        who,
        WhoAmI { from: me.clone(), ws: rs.workspace().into(), to: format!("{}/py-peer", rs.workspace()) }
    );
    let r: Json = c.call("add_ctx", (2, 3)).await.expect("add_ctx");
    assert_eq!(r, json!({"sum": 5, "from": me}));
    let r: Json = c.call_with_kwargs("add_ctx", (), json!({"a": 4, "b": 5})).await.expect("add_ctx kwargs");
    assert_eq!(r, json!({"sum": 9, "from": me}));

    // Python's async generators.
    let g: RemoteGenerator = p.call("count", (5,)).await.expect("count");
    let items: Vec<i64> = g.typed::<i64>().map(|r| r.expect("item")).collect().await;
    assert_eq!(items, vec![0, 1, 2, 3, 4]);
    // Prefetching against Python (which refuses concurrent pulls) still yields every item once.
    let g: RemoteGenerator = p.call("count", (20,)).await.expect("count 20");
    let items: Vec<i64> = g.prefetch(4).typed::<i64>().map(|r| r.expect("item")).collect().await;
    assert_eq!(items, (0..20).collect::<Vec<_>>());
    let g: RemoteGenerator = p.call("count", (0,)).await.expect("count 0");
    assert_eq!(g.count().await, 0);
    let mut g = p.call::<RemoteGenerator>("tracked", (1000,)).await.expect("tracked").typed::<i64>();
    assert_eq!(g.next().await.unwrap().unwrap(), 0);
    assert_eq!(g.next().await.unwrap().unwrap(), 1);
    drop(g);
    let mut closed = false;
    for _ in 0..100 {
        if p.call::<bool>("tracked_closed", ()).await.unwrap() {
            closed = true;
            break;
        }
        rt.sleep(Duration::from_millis(50)).await;
    }
    assert!(closed, "dropping the RemoteGenerator did not close Python's generator");
    let mut g = p.call::<RemoteGenerator>("gen_fail", (2,)).await.expect("gen_fail");
    assert_eq!(g.next().await.unwrap().unwrap(), Value::from(0));
    assert_eq!(g.next().await.unwrap().unwrap(), Value::from(1));
    let e = g.next().await.expect("an error item").unwrap_err();
    assert!(e.remote_message().is_some_and(|m| m.contains("py-gen-failure")), "{e:?}");
    drop(g);

    // Our generator passed to Python as an argument.
    let mine = Generator::new(futures::stream::iter(vec!["a", "b", "c"]));
    let r: Vec<String> = p.call("consume", (mine,)).await.expect("consume");
    assert_eq!(r, vec!["a", "b", "c"]);

    // Many calls at once.
    let calls = (0..200i64).map(|i| p.call::<i64>("echo", (i,)));
    let results = futures::future::join_all(calls).await;
    let results: Vec<i64> = results.into_iter().map(|r| r.expect("concurrent echo")).collect();
    assert_eq!(results, (0..200).collect::<Vec<_>>());

    // Python's `_rintf` object.
    let counter: RemoteInterface = p.call("make_counter", (10,)).await.expect("make_counter");
    assert_eq!(counter.get("name"), Some(&Value::from("py-counter")));
    assert!(counter.service_id().is_some_and(|s| s.starts_with("_rintf_")), "{counter:?}");
    assert_eq!(counter.call::<i64>("inc", (5,)).await.expect("inc"), 15);
    assert_eq!(counter.call::<i64>("inc", ()).await.expect("inc default"), 16);
    assert_eq!(counter.call::<i64>("get", ()).await.expect("get"), 16);
    counter.dispose().await.expect("dispose");
    let t = Instant::now();
    let e = counter.call::<i64>("inc", (1,)).await.expect_err("a disposed Python interface answered");
    assert!(t.elapsed() < FAST, "{e} after {:?}", t.elapsed());
    assert!(!e.is_timeout(), "{e}");

    // Our `_rintf` object passed to Python, which calls it, disposes of it, and calls again.
    let value = Arc::new(AtomicI64::new(100));
    let (v1, v2) = (value.clone(), value.clone());
    let obj = Interface::new()
        .value("name", "rust-arg-counter")
        .function("inc", move |by: i64| {
            let now = v1.fetch_add(by, Ordering::SeqCst) + by;
            async move { Ok::<_, String>(now) }
        })
        .function("get", move || {
            let now = v2.load(Ordering::SeqCst);
            async move { Ok::<_, String>(now) }
        });
    let r: Json = p.call("use_interface", (obj,)).await.expect("use_interface");
    assert_eq!(r["keys"], json!(["_dispose", "_rintf", "get", "inc", "name"]), "{r}");
    assert_eq!((&r["inc"], &r["get"], &r["name"]), (&json!(102), &json!(102), &json!("rust-arg-counter")));
    assert!(r["after_dispose"].as_str().is_some_and(|e| e.contains("not found")), "{r}");
    assert!(r["after_dispose_elapsed"].as_f64().unwrap() < FAST.as_secs_f64(), "{r}");
    assert_eq!(value.load(Ordering::SeqCst), 102, "the call after dispose reached the function");

    // 20 MiB through Python and back (with the default limits).
    let big = big_payload();
    let t = Instant::now();
    let back: ByteBuf =
        p.call("echo", (ByteBuf::from(big.clone()),)).await.expect("20 MiB echo through Python");
    assert!(back.as_slice() == big.as_slice(), "20 MiB came back different");
    println!("20 MiB echo through Python: {:?}", t.elapsed());

    // A missing method: locally (not in the service description) and remotely (a descriptor
    // Python made up), and a missing service.
    match p.call::<Value>("nope", ()).await {
        Err(Error::NoSuchMethod { method, .. }) => assert_eq!(method, "nope"),
        other => panic!("expected NoSuchMethod, got {other:?}"),
    }
    let missing: RemoteFunction = p.call("missing_method", ()).await.expect("missing_method");
    let t = Instant::now();
    let e = missing.call::<Value>(()).await.expect_err("a missing Python method answered");
    assert!(e.remote_message().is_some_and(|m| m.contains("does_not_exist")), "{e:?}");
    assert!(t.elapsed() < FAST);
    let e = rs.get_service("py-peer:no-such-service").await.expect_err("a missing service");
    assert!(e.to_string().contains("no-such-service"), "{e}");
}

/// Part B: our method_timeout is 3 s, Python's async function takes 6 s.
async fn heartbeat_keeps_rust_call_alive(hb: &Server, py: &PyPeer, py_svc: &str) {
    let p = hb.get_service(py_svc).await.expect("rs-hb: get py-svc");
    let t = Instant::now();
    let r: f64 = p.call("slow", (6.0,)).await.expect("a 6 s call with a 3 s method_timeout");
    assert_eq!(r, 6.0);
    assert!(t.elapsed() >= Duration::from_secs_f64(5.9), "{:?}", t.elapsed());
    py.event("slow_started", Duration::from_secs(1)).await;
    // Control: a sync Python function sends no heartbeats, so the same 3 s timeout fires.
    let t = Instant::now();
    let e = p.call::<f64>("block", (4.5,)).await.expect_err("a 4.5 s call without heartbeats succeeded");
    let took = t.elapsed();
    assert!(e.is_timeout(), "{e:?}");
    assert!(
        took >= Duration::from_secs_f64(2.9) && took < Duration::from_secs_f64(4.5),
        "{e} after {took:?}"
    );
    // Python's late reply is dropped quietly; the connection still works.
    assert_eq!(p.call::<i64>("echo", (1,)).await.expect("echo after a timeout"), 1);
}

/// Part B, last: a call in flight when the Python client leaves, and one after it left, must
/// fail well before our 20 s method_timeout.
async fn rust_calls_departed_python(rs: &Server, py: &mut PyPeer, py_svc: &str, rt: &Arc<dyn Runtime>) {
    let p = rs.get_service(py_svc).await.expect("get py-svc");
    let call = p.call::<f64>("slow", (30.0,));
    let leave = async {
        py.event("slow_started", Duration::from_secs(20)).await;
        let r = py.request(json!({"cmd": "leave"}), Duration::from_secs(20)).await;
        assert_eq!(r["left"], true);
        Instant::now()
    };
    let (r, left_at) = futures::join!(within(&**rt, Duration::from_secs(40), call), leave);
    let after_leave = left_at.elapsed();
    let r = r.expect("the call in flight did not settle within 40 s");
    println!("in-flight call to a departed Python client: {r:?} ({after_leave:?} after it left)");
    let e = r.expect_err("a departed Python client answered");
    assert!(!e.is_timeout(), "{e}");
    assert!(after_leave < FAST, "noticed only after {after_leave:?}: {e}");
    assert!(matches!(e, Error::Call(CallError::PeerDisconnected { .. })), "{e:?}");

    let status = py.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "the Python peer failed: {status}");
    let t = Instant::now();
    let e = p.call::<Value>("echo", (1,)).await.expect_err("a departed Python client answered");
    println!("call to a departed Python client: {e:?} after {:?}", t.elapsed());
    assert!(t.elapsed() < FAST, "{e} after {:?}", t.elapsed());
    assert!(!e.is_timeout(), "{e}");
    // The server's own reject ("Target peer <id> is not connected") is the same typed error
    // the in-flight call got, so one `match` catches "the callee is gone".
    assert!(matches!(e, Error::Call(CallError::PeerDisconnected { .. })), "{e:?}");
}
