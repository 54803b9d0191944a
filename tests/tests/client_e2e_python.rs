//! End-to-end encryption (PROTOCOL.md §12) between the async Rust client and the real Python
//! `hypha-rpc` 0.21.47 client (PyNaCl 1.5.0) through the real Hypha server, both directions,
//! on tokio and on smol. The Python peer is `tests/py/e2e_peer.py`, driven over JSON lines.
//!
//! A: Python (`encryption: True`) calls Rust services fetched with
//! `get_service(id, {"encryption_public_key": rust_key})`: round trips; the Rust function sees
//! `ctx.caller_public_key == python get_public_key()`; `trusted_keys` accepts Python's key,
//! rejects others ("not in the trusted keys list") and clear calls ("Encryption required"); a
//! Python callback inside an encrypted call; 3 MB of bytes (chunked, encrypted); a wrong key:
//! Python times out and the Rust function never ran.
//!
//! B: Rust (`ServerConfig::encryption(true)`) calls Python via `get_encrypted_service`: round
//! trips; Python's context says `encryption: True` and `caller_public_key == our key`; Python
//! `trusted_keys` accept us / reject us with Python's message / refuse clear calls; a Rust
//! callback inside the encrypted call; 3 MB; a Python async generator (its items travel in
//! clear: Python's generator descriptor carries no `_renc_pub`, so `next` calls and their
//! results are not encrypted); a wrong key fails with `CallError::NoReplyEncrypted`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use hypha_rpc::runtime::Runtime;
use hypha_rpc::serde_bytes::ByteBuf;
use hypha_rpc::{
    CallError, Callback, Context, Error, RemoteFunction, RemoteGenerator, Server, ServerConfig, Service,
    Value, Visibility,
};
use hypha_rpc_tests::pypeer::PyPeer;
use hypha_rpc_tests::server::HyphaServer;
use serde_json::{Value as Json, json};
use sha2::Digest;

/// A connect function: `hypha_rpc_tokio::connect_to_server` or `hypha_rpc_smol::connect_to_server`.
type Connect = fn(ServerConfig) -> BoxFuture<'static, hypha_rpc::Result<Server>>;

/// 3 MB: chunked (the chunk size is 256 KiB), encrypted before chunking.
const BIG: usize = 3 * 1024 * 1024;
/// The method timeout of the "wrong key" callers on both sides.
const SHORT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_e2e_tokio() {
    let connect: Connect = |c| Box::pin(hypha_rpc_tokio::connect_to_server(c));
    scenario("tokio", Arc::new(hypha_rpc_tokio::TokioRuntime), connect).await;
}

#[test]
fn python_e2e_smol() {
    let connect: Connect = |c| Box::pin(hypha_rpc_smol::connect_to_server(c));
    smol::block_on(scenario("smol", Arc::new(hypha_rpc_smol::SmolRuntime), connect));
}

/// The bytes both sides agree on: `i % 251`.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

fn sha256_hex(b: &[u8]) -> String {
    hypha_rpc_core::crypto::to_hex(&sha2::Sha256::digest(b))
}

// ---- the Python peer process ------------------------------------------------------------------

/// The e2e peer's commands (tests/py/e2e_peer.py), on the shared Python peer driver.
trait E2ePeer {
    async fn get(&self, alias: &str, service: &str, key: Option<&str>, short: bool);
    async fn call(&self, alias: &str, method: &str, args: Json) -> Result<Json, (String, String)>;
    async fn leave(&mut self);
}

impl E2ePeer for PyPeer {
    /// `get_service` on the Python side, kept as `alias`.
    async fn get(&self, alias: &str, service: &str, key: Option<&str>, short: bool) {
        let cmd = json!({"cmd": "get", "alias": alias, "service": service, "key": key, "short": short});
        self.request(cmd, Duration::from_secs(30)).await;
    }

    /// Calls `alias.method(*args)` on the Python side: `Ok(result)` or `Err((text, class))`.
    async fn call(&self, alias: &str, method: &str, args: Json) -> Result<Json, (String, String)> {
        let cmd = json!({"cmd": "call", "alias": alias, "method": method, "args": args});
        let v = self.request(cmd, Duration::from_secs(60)).await;
        match v.get("error") {
            Some(e) => {
                Err((e.as_str().unwrap_or_default().to_string(), v["type"].as_str().unwrap().to_string()))
            }
            None => Ok(v["ok"].clone()),
        }
    }

    async fn leave(&mut self) {
        self.request(json!({"cmd": "leave"}), Duration::from_secs(30)).await;
        self.wait_exit(Duration::from_secs(10)).await;
    }
}

// ---- the Rust services ---------------------------------------------------------------------------

/// How often each Rust service's `mark` ran.
#[derive(Default)]
struct Marks {
    open: AtomicU64,
    trusted: AtomicU64,
    other: AtomicU64,
}

/// A Rust service Python calls in part A; `mark` counts its runs in `counter`.
fn rust_service(id: &str, marks: Arc<Marks>, counter: fn(&Marks) -> &AtomicU64) -> Service {
    Service::new(id)
        .visibility(Visibility::Public)
        .function("echo", |x: Value| async move { Ok::<_, String>(x) })
        .function_with_context("whoami", |ctx: Context| async move {
            Ok::<_, String>(json!({"from": ctx.from, "caller_public_key": ctx.caller_public_key}))
        })
        .function("digest", |b: ByteBuf| async move {
            Ok::<_, String>(json!({"len": b.len(), "sha256": sha256_hex(&b)}))
        })
        .function("twice", |f: RemoteFunction, x: i64| async move {
            f.call::<i64>((x,)).await.map_err(|e| format!("the callback failed: {e}"))
        })
        .function("mark", move || {
            counter(&marks).fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, String>("ran") }
        })
}

// ---- the scenario -------------------------------------------------------------------------------

async fn scenario(name: &str, rt: Arc<dyn Runtime>, connect: Connect) {
    let started = Instant::now();
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let rs = connect(
        ServerConfig::new(hs.url())
            .client_id("rs-e2e")
            .method_timeout(Duration::from_secs(20))
            .encryption(true),
    )
    .await
    .expect("connect rs-e2e");
    let rust_key = rs.get_public_key().expect("encryption is on");
    assert_eq!(rust_key.len(), 64);
    let ws = rs.workspace().to_string();
    let token = rs.generate_token(None).await.expect("generate_token");

    let mut py = PyPeer::start(&hs, rt.clone(), "e2e_peer.py", &[&ws, &token]);
    let ready = py.event("ready", Duration::from_secs(60)).await;
    assert_eq!(ready["workspace"], ws);
    let py_key = ready["public_key"].as_str().expect("Python's get_public_key()").to_string();
    assert_eq!(py_key.len(), 64);
    assert!(py_key.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{py_key}");
    let py_svc = ready["service_id"].as_str().unwrap().to_string();
    println!("[{name}] server, Rust and Python clients up after {:?}", started.elapsed());

    let t = Instant::now();
    python_calls_rust(&rs, &py, &py_key, &rust_key).await;
    println!("[{name}] A: Python called Rust (encrypted) in {:?}", t.elapsed());

    let t = Instant::now();
    rust_calls_python(&rs, &py, &py_svc, &py_key, &rust_key).await;
    let short = connect(
        ServerConfig::new(hs.url())
            .workspace(ws.clone())
            .token(token.clone())
            .client_id("rs-e2e-short")
            .method_timeout(SHORT)
            .encryption(true),
    )
    .await
    .expect("connect rs-e2e-short");
    rust_calls_python_with_wrong_key(&short, &py_svc, &py_key).await;
    println!("[{name}] B: Rust called Python (encrypted) in {:?}", t.elapsed());

    py.leave().await;
    short.disconnect().await;
    rs.disconnect().await;
    println!("[{name}] total {:?}", started.elapsed());
}

/// Part A: Python calls Rust services fetched with our public key.
async fn python_calls_rust(rs: &Server, py: &PyPeer, py_key: &str, rust_key: &str) {
    let marks = Arc::new(Marks::default());
    let other_key = "cd".repeat(32);
    let open = rs.register_service(rust_service("rs-open", marks.clone(), |m| &m.open)).await.unwrap();
    let trusted = rs
        .register_service(rust_service("rs-trusted", marks.clone(), |m| &m.trusted).trusted_keys([py_key]))
        .await
        .unwrap();
    let other = rs
        .register_service(
            rust_service("rs-other", marks.clone(), |m| &m.other).trusted_keys([other_key.as_str()]),
        )
        .await
        .unwrap();

    // Round trips through an encrypted call, and the reply comes back encrypted (Python can
    // only read it because it decrypts the sealed resolve).
    py.get("open", &open, Some(rust_key), false).await;
    let values =
        json!([null, true, -7, 18446744073709551615u64, 1.5, "grüße 🌍", [1, "a", null], {"k": {"n": [2]}}]);
    for v in values.as_array().unwrap() {
        let back = py.call("open", "echo", json!([v])).await.unwrap_or_else(|e| panic!("echo {v}: {e:?}"));
        assert_eq!(&back, v, "echo through an encrypted call");
    }
    let who = py.call("open", "whoami", json!([])).await.expect("whoami");
    assert_eq!(who["caller_public_key"], py_key, "the Rust function sees Python's key: {who}");
    assert!(who["from"].as_str().unwrap().ends_with("/py-e2e"), "{who}");

    // The same service without the key: a clear call, and the function can tell.
    py.get("open-clear", &open, None, false).await;
    let who = py.call("open-clear", "whoami", json!([])).await.expect("clear whoami");
    assert_eq!(who["caller_public_key"], Json::Null, "{who}");

    // trusted_keys: Python's key gets in; another list rejects it; a clear call is refused.
    py.get("trusted", &trusted, Some(rust_key), false).await;
    let who = py.call("trusted", "whoami", json!([])).await.expect("trusted whoami");
    assert_eq!(who["caller_public_key"], py_key);
    assert_eq!(py.call("trusted", "mark", json!([])).await.unwrap(), "ran");
    py.get("other", &other, Some(rust_key), false).await;
    let (e, _) = py.call("other", "mark", json!([])).await.expect_err("an untrusted key");
    assert!(e.contains("not in the trusted keys list"), "{e}");
    py.get("trusted-clear", &trusted, None, false).await;
    let (e, _) = py.call("trusted-clear", "mark", json!([])).await.expect_err("a clear call");
    assert!(e.contains("Encryption required"), "{e}");
    assert_eq!(marks.trusted.load(Ordering::SeqCst), 1, "only the trusted, encrypted call ran");
    assert_eq!(marks.other.load(Ordering::SeqCst), 0);

    // A Python callback inside an encrypted call: Rust calls it back (encrypted for Python's
    // `_renc_pub`) and gets the result.
    let before = py.request(json!({"cmd": "cb_calls"}), Duration::from_secs(5)).await["ok"].as_u64().unwrap();
    let r = py.call("trusted", "twice", json!([{"$cb": "triple"}, 5])).await.expect("callback");
    assert_eq!(r, 15);
    let after = py.request(json!({"cmd": "cb_calls"}), Duration::from_secs(5)).await["ok"].as_u64().unwrap();
    assert_eq!(after, before + 1, "the Python callback ran once");

    // 3 MB of bytes: encrypted, then chunked.
    let t = Instant::now();
    let d = py.call("trusted", "digest", json!([{"$pattern": BIG}])).await.expect("3 MB");
    assert_eq!(d, json!({"len": BIG, "sha256": sha256_hex(&pattern(BIG))}));
    println!("  A: 3 MB encrypted Python -> Rust in {:?}", t.elapsed());

    // A wrong key: Rust cannot open the request, so nothing runs and no reply can come; the
    // Python caller (method_timeout 3 s) times out.
    let before = marks.open.load(Ordering::SeqCst);
    py.get("wrong", &open, Some(&"ab".repeat(32)), true).await;
    let (e, class) = py.call("wrong", "mark", json!([])).await.expect_err("a wrong key");
    assert_eq!(class, "TimeoutError", "{e}");
    assert!(e.to_lowercase().contains("time"), "{e}");
    assert_eq!(marks.open.load(Ordering::SeqCst), before, "the Rust function ran for a wrong key");
    // Still nothing later (the frame arrived long before the 3 s timeout).
    assert_eq!(py.call("open", "mark", json!([])).await.unwrap(), "ran");
    assert_eq!(marks.open.load(Ordering::SeqCst), before + 1);
}

/// Part B: Rust calls the Python service with Python's public key.
async fn rust_calls_python(rs: &Server, py: &PyPeer, py_svc: &str, py_key: &str, rust_key: &str) {
    let p = rs.get_encrypted_service(py_svc, py_key).await.expect("get_encrypted_service");
    // Round trips.
    for v in [
        json!(null),
        json!(-5),
        json!(u64::MAX),
        json!(2.5),
        json!("héllo ✓"),
        json!([1, [2, [3]], {"a": null}]),
        json!({"nested": {"list": [true, false], "s": "x"}}),
    ] {
        let back: Json = p.call("echo", (&v,)).await.unwrap_or_else(|e| panic!("echo {v}: {e}"));
        assert_eq!(back, v, "echo through Python, encrypted");
    }
    let b = ByteBuf::from(pattern(1000));
    let back: ByteBuf = p.call("echo", (&b,)).await.expect("echo bytes");
    assert_eq!(back, b);
    // Python's context.
    let who: Json = p.call("whoami", ()).await.expect("whoami");
    assert_eq!(who["encryption"], true, "{who}");
    assert_eq!(who["caller_public_key"], rust_key, "{who}");
    assert!(who["from"].as_str().unwrap().ends_with("/rs-e2e"), "{who}");
    // The control: a clear call of the same service.
    let clear = rs.get_service(py_svc).await.expect("get_service");
    let who: Json = clear.call("whoami", ()).await.expect("clear whoami");
    assert_eq!((&who["encryption"], &who["caller_public_key"]), (&json!(false), &Json::Null), "{who}");

    // Python trusted_keys.
    let register = |id: &str, keys: Vec<String>| {
        py.request(
            json!({"cmd": "register", "service_id": id, "trusted_keys": keys}),
            Duration::from_secs(30),
        )
    };
    let ok_id =
        register("py-trusted-ok", vec![rust_key.to_string()]).await["ok"].as_str().unwrap().to_string();
    let other_id =
        register("py-trusted-other", vec!["ef".repeat(32)]).await["ok"].as_str().unwrap().to_string();
    let ok = rs.get_encrypted_service(&ok_id, py_key).await.unwrap();
    let who: Json = ok.call("whoami", ()).await.expect("trusted whoami");
    assert_eq!(who["caller_public_key"], rust_key);
    let other = rs.get_encrypted_service(&other_id, py_key).await.unwrap();
    let e = other.call::<Json>("whoami", ()).await.expect_err("not trusted");
    let msg = e.remote_message().unwrap_or_else(|| panic!("a remote error, got {e:?}"));
    assert!(msg.contains("Caller's public key is not in the trusted keys list"), "{msg}");
    let e = rs.get_service(&ok_id).await.unwrap().call::<Json>("whoami", ()).await.expect_err("clear");
    let msg = e.remote_message().unwrap_or_else(|| panic!("a remote error, got {e:?}"));
    assert!(msg.contains("Encryption required for method"), "{msg}");

    // A Rust callback inside an encrypted call: Python calls it back, encrypted for our key.
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let cb = Callback::new(move |x: i64| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, String>(x * 3) }
    });
    assert_eq!(p.call::<i64>("call_cb", (cb, 7)).await.expect("callback"), 21);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // 3 MB, chunked after encryption.
    let big = ByteBuf::from(pattern(BIG));
    let t = Instant::now();
    let d: Json = p.call("digest", (&big,)).await.expect("3 MB");
    assert_eq!(d, json!({"len": BIG, "sha256": sha256_hex(&big)}));
    println!("  B: 3 MB encrypted Rust -> Python in {:?}", t.elapsed());

    // A Python async generator: the call that returns it is encrypted; its items are not
    // (no `_renc_pub` on Python's generator descriptor).
    let g: RemoteGenerator = p.call("count", (4,)).await.expect("generator");
    let items: Vec<i64> = g.typed::<i64>().map(|r| r.expect("item")).collect().await;
    assert_eq!(items, vec![0, 1, 2, 3]);
}

/// Part B, wrong key: Python cannot open the request and cannot answer; we say why.
async fn rust_calls_python_with_wrong_key(short: &Server, py_svc: &str, py_key: &str) {
    let bad = short.get_encrypted_service(py_svc, &"ab".repeat(32)).await.expect("get with a wrong key");
    let t = Instant::now();
    let e = bad.call::<Json>("whoami", ()).await.expect_err("a wrong key");
    let took = t.elapsed();
    assert!(matches!(e, Error::Call(CallError::NoReplyEncrypted { .. })), "{e:?}");
    assert!(e.to_string().contains("possibly an encryption key mismatch"), "{e}");
    assert!(took >= SHORT - Duration::from_millis(100) && took < SHORT * 3, "{took:?}");
    println!("  B: wrong key -> {e} (after {took:?})");
    // Python logs its "Decryption failed" PermissionError only at debug level. The same client
    // with the right key gets through.
    let good = short.get_encrypted_service(py_svc, py_key).await.unwrap();
    let who: Json = good.call("whoami", ()).await.expect("the right key");
    assert_eq!(who["caller_public_key"], short.get_public_key().unwrap());
}
