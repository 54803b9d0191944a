//! End-to-end encryption between our async client (tokio) and the npm `hypha-rpc` client under
//! node (tests/js/e2e_js.mjs, installed by scripts/js-deps.sh), through the real server, both
//! directions: sealed arguments, keyword arguments, results, errors, callbacks and 2 MB byte
//! arrays; the callee seeing the caller's key; `trusted_keys` accepting and refusing on both
//! sides; a wrong key. A tap on the JS client's socket checks the wire too: every request and
//! every reply between the two (whole or chunked) is an `_enc` v2 envelope from the sender's
//! key, except the calls made in clear on purpose.
//!
//! What the pinned JS client (hypha-rpc 0.21.40, tweetnacl bundled) calls things:
//! - connect options `encryption: true`, and optionally `encryption_private_key` /
//!   `encryption_public_key` (raw 32-byte `Uint8Array`s, both required to bring a key pair);
//! - its key: `server.rpc.getPublicKey()` (64 hex, `null` when off); the workspace-manager
//!   object `server` itself has no `getPublicKey`/`get_public_key`;
//! - a sealed service: `server.getService(id, {encryption_public_key: hex})` (the key is put on
//!   every function's `_renc_pub` locally, nothing goes to the server);
//! - service config `trusted_keys: [hex, ...]` (checked per function after the visibility
//!   checks, same error texts as Python and as ours);
//! - a JS function with `config.require_context: true` gets a context with
//!   `encryption: true` and `caller_public_key: hex` when the call arrived sealed, neither
//!   when in clear;
//! - a request it cannot open is dropped with `Decryption failed for method <m>. Invalid key or
//!   tampered data.` logged, so the caller gets no reply at all;
//! - under node its ESM build cannot make a key: the bundled tweetnacl looks for randomness at
//!   `self.crypto` only (webpack stubbed out its `require("crypto")`), so `encryption: true`
//!   fails with "no PRNG" unless the script sets `globalThis.self` first (e2e_js.mjs does).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use hypha_rpc_tests::server::{HyphaServer, install_js_deps, workspace_root};
use hypha_rpc_tokio::serde_bytes::ByteBuf;
use hypha_rpc_tokio::{
    Call, CallError, Callback, Context, Error, Map, RemoteFunction, Server, ServerConfig, Service, Value,
    Visibility, connect_to_server,
};
use serde_json::json;

/// How long the node peer may run before it is killed and the test fails.
const NODE_TIMEOUT: Duration = Duration::from_secs(120);
/// A valid key nobody holds, for `trusted_keys` that must refuse.
const OTHER_KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";
/// RFC 7748 §6.1 Alice's public key: the JS client that brings its own key pair uses her
/// secret key (see e2e_js.mjs).
const BYO_PUBLIC: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";

/// `whoami` calls a Rust service saw: (service, caller, caller's public key).
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;
/// What `ready` hands the test: the JS key and the ids of the JS services.
type Ready = Arc<Mutex<Option<oneshot::Sender<(String, Vec<String>)>>>>;

/// Kills node when dropped: when the test panics, its runtime drops the task running node.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `node <args>` in `dir` without blocking the runtime (our services must keep serving),
/// killing it after [`NODE_TIMEOUT`]. Returns (exit success, stdout, stderr).
async fn run_node(dir: PathBuf, args: Vec<String>) -> (bool, String, String) {
    let mut child = KillOnDrop(
        Command::new("node")
            .args(&args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn node: {e}")),
    );
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(child.0.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.0.stderr.take().expect("stderr")));
    let deadline = Instant::now() + NODE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for node") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.0.kill();
            let _ = child.0.wait();
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

/// `i % 251` for `i` in `0..n` (the JS side uses the same pattern).
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

fn byte_sum(b: &[u8]) -> u64 {
    b.iter().map(|&x| x as u64).sum()
}

/// The Rust service JS calls: the same functions under three ids (open, trusting JS, trusting
/// someone else).
fn rust_service(id: &'static str, seen: Seen) -> Service {
    Service::new(id)
        .visibility(Visibility::Public)
        .function("add", |a: i64, b: i64| async move { Ok::<_, String>(a + b) })
        .function_raw("echo", |call: Call| async move {
            let mut m = Map::new();
            m.insert("args", Value::Array(call.args.clone()));
            m.insert("kwargs", call.kwargs.clone().map(Value::Map));
            Ok::<_, String>(Value::Map(m))
        })
        .function_with_context("whoami", move |ctx: Context| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push((id.to_string(), ctx.from.clone(), ctx.caller_public_key.clone()));
                Ok::<_, String>((ctx.from, ctx.caller_public_key))
            }
        })
        .function("sha", |b: ByteBuf| async move { Ok::<_, String>((b.len(), byte_sum(&b))) })
        .function("make_bytes", |n: usize| async move { Ok::<_, String>(ByteBuf::from(pattern(n))) })
        .function("twice", |f: RemoteFunction, x: i64| async move {
            f.call::<i64>((x,)).await.map_err(|e| e.to_string())
        })
        .function("fail", |why: String| async move { Err::<(), _>(format!("rust refused: {why}")) })
}

/// The out-of-band key exchange: `hello(js_key)` registers the Rust services that trust (or do
/// not trust) that key and returns their ids; `ready(js_key, js_service_ids)` starts the
/// Rust-to-JS half.
fn control(rust: Server, seen: Seen, ready: Ready) -> Service {
    Service::new("e2e-control")
        .visibility(Visibility::Public)
        .function("hello", move |js_key: String| {
            let (rust, seen) = (rust.clone(), seen.clone());
            async move {
                let trusted = rust_service("e2e-trusted", seen.clone()).trusted_keys([js_key]);
                let trusted = rust.register_service(trusted).await.map_err(|e| e.to_string())?;
                let other = rust_service("e2e-other", seen).trusted_keys([OTHER_KEY]);
                let other = rust.register_service(other).await.map_err(|e| e.to_string())?;
                Ok::<_, String>((trusted, other))
            }
        })
        .function("ready", move |js_key: String, ids: Vec<String>| {
            let tx = ready.lock().unwrap().take();
            async move {
                let tx = tx.ok_or("ready was already called")?;
                tx.send((js_key, ids)).map_err(|_| "the test is gone")?;
                Ok::<_, String>(true)
            }
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_between_js_and_rust() {
    let started = Instant::now();
    let root = workspace_root().unwrap_or_else(|e| panic!("{e}"));
    install_js_deps(&root);
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let rust = connect_to_server(ServerConfig::new(hs.url()).encryption(true)).await.expect("connect Rust");
    let token = rust.generate_token(None).await.expect("token");
    let rust_key = rust.get_public_key().expect("encryption on: a key");
    // For the wrong-key case only: a 3 s timeout.
    let impatient = connect_to_server(
        ServerConfig::new(hs.url())
            .workspace(rust.workspace())
            .token(token.clone())
            .method_timeout(Duration::from_secs(3))
            .encryption(true),
    )
    .await
    .expect("connect the impatient Rust client");

    let seen = Seen::default();
    let open_id = rust.register_service(rust_service("e2e-open", seen.clone())).await.expect("register open");
    let (ready_tx, ready_rx) = oneshot::channel();
    let ready = Arc::new(Mutex::new(Some(ready_tx)));
    let control_id =
        rust.register_service(control(rust.clone(), seen.clone(), ready)).await.expect("register control");

    let js_dir = root.join("tests").join("js");
    let script = js_dir.join("e2e_js.mjs").to_str().expect("utf-8 path").to_string();
    let args = vec![
        script,
        hs.url().to_string(),
        rust.workspace().to_string(),
        token,
        rust_key.clone(),
        OTHER_KEY.to_string(),
        open_id.clone(),
        control_id,
    ];
    let mut node = tokio::spawn(run_node(js_dir, args));

    // JS has called Rust (its results come with RESULT at the end); now Rust calls JS.
    let (js_key, js_ids) = tokio::select! {
        r = ready_rx => r.expect("ready sender dropped"),
        n = &mut node => {
            let (ok, out, err) = n.expect("node task");
            panic!("node exited (success {ok}) before ready\nstdout:\n{out}\nstderr:\n{err}\n{}", hs.log_tail(40))
        }
    };
    assert_eq!(js_key.len(), 64, "{js_key}");
    let [js_open, js_trusted, js_other]: [String; 3] =
        js_ids.try_into().unwrap_or_else(|v| panic!("three JS service ids, got {v:?}"));
    let t = Instant::now();

    type J = serde_json::Value;
    let open = rust.get_encrypted_service(&js_open, &js_key).await.expect("get JS open service");
    let whoami = open.call::<J>("whoami", ()).await;
    let echo_json = json!({"s": "x", "n": -3, "f": 2.5, "l": [1, null, true], "m": {"k": "v"}});
    let echo = open.call::<J>("echo", (&echo_json,)).await;
    let echo_bytes = open.call::<ByteBuf>("echo", (ByteBuf::from(vec![0u8, 1, 255]),)).await;
    // JS maps keyword arguments onto its parameter names.
    let echo_kwargs = open.call_with_kwargs::<i64>("echo", (), json!({"x": 5})).await;
    let big = ByteBuf::from(pattern(2_000_000));
    let sha = open.call::<(String, usize, u64)>("sha", (&big,)).await;
    let made = open.call::<ByteBuf>("make_bytes", (2_500_000,)).await;
    let cb = Callback::new(|x: i64| async move { Ok::<_, String>(x * 3) });
    let twice = open.call::<i64>("twice", (cb, 5)).await;
    let fail = open.call::<J>("fail", ("cold",)).await;
    let clear = rust.get_service(&js_open).await.expect("get JS open in clear").call::<J>("whoami", ()).await;
    let trusted = rust.get_encrypted_service(&js_trusted, &js_key).await.expect("get JS trusted");
    let trusted = trusted.call::<J>("whoami", ()).await;
    let trusted_clear = rust.get_service(&js_trusted).await.expect("get JS trusted in clear");
    let trusted_clear = trusted_clear.call::<J>("whoami", ()).await;
    let other = rust.get_encrypted_service(&js_other, &js_key).await.expect("get JS other");
    let other = other.call::<J>("whoami", ()).await;
    let bad =
        impatient.get_encrypted_service(&js_open, &"ab".repeat(32)).await.expect("get with a wrong key");
    let t_wrong = Instant::now();
    let wrong = bad.call::<J>("whoami", ()).await;
    let wrong_after = t_wrong.elapsed();
    let bye = open.call::<String>("finish", ()).await;
    let rust_to_js = t.elapsed();

    let (ok, out, err) = node.await.expect("node task");
    eprintln!("node stderr:\n{err}");
    assert!(ok, "node failed\nstdout:\n{out}\nstderr:\n{err}\n{}", hs.log_tail(40));
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line\nstdout:\n{out}\nstderr:\n{err}"));
    let r: J = serde_json::from_str(line).expect("RESULT is JSON");
    println!("js results: {}", serde_json::to_string_pretty(&r["results"]).unwrap());
    println!("js observed: {}", serde_json::to_string_pretty(&r["observed"]).unwrap());
    let rows: Vec<String> = r["sealing"].as_array().unwrap().iter().map(|x| x.to_string()).collect();
    println!("js wire tap:\n{}", rows.join("\n"));
    let res = &r["results"];
    let ok = |name: &str| -> &J {
        let c = &res[name];
        assert_eq!(c["ok"], json!(true), "{name}: {c}");
        &c["value"]
    };
    let refused = |name: &str, text: &str| {
        let c = &res[name];
        assert_eq!(c["ok"], json!(false), "{name}: {c}");
        assert!(c["error"].as_str().is_some_and(|e| e.contains(text)), "{name}: want {text:?}, got {c}");
    };

    // ---- JS calls Rust ----
    assert_eq!(ok("js_key"), &json!(js_key), "the key JS reported is the one it gave `ready`");
    assert_ne!(js_key, rust_key);
    assert_eq!(ok("add"), &json!(42));
    assert_eq!(
        ok("echo"),
        &json!({"args": ["s", 7, -2.5, null, true, [1, "a"], {"k": {"n": 1}},
                         {"ctor": "Uint8Array", "values": [1, 2, 3]}],
                "kwargs": null})
    );
    assert_eq!(ok("echo_kwargs"), &json!({"args": ["pos"], "kwargs": {"name": "Ada", "n": 3}}));
    let from = ok("whoami")[0].as_str().expect("whoami: from").to_string();
    assert_eq!(ok("whoami")[1], json!(js_key), "Rust saw the JS key");
    assert_eq!(ok("whoami_clear"), &json!([from, null]), "in clear Rust sees no key");
    assert_eq!(ok("sha_big"), &json!([2_000_000, byte_sum(&pattern(2_000_000))]));
    assert_eq!(
        ok("make_bytes_big"),
        &json!({"ctor": "Uint8Array", "length": 2_500_000, "sum": byte_sum(&pattern(2_500_000))})
    );
    assert_eq!(ok("callback"), &json!(15), "Rust called the JS callback inside the sealed session");
    refused("error", "rust refused: boom");
    assert_eq!(ok("trusted"), &json!([from, js_key]), "a Rust service trusting JS's key");
    refused("trusted_clear", "Encryption required");
    refused("other", "not in the trusted keys list");
    // The JS client that brought its own key pair.
    let byo = ok("byo");
    assert_eq!(byo["key"], json!(BYO_PUBLIC), "getPublicKey() with encryption_public_key given");
    assert_eq!(byo["whoami"][1], json!(BYO_PUBLIC), "Rust opened the request sealed with that pair");
    assert_eq!(byo["wrong"]["ok"], json!(false), "{byo}");
    assert!(byo["wrong"]["error"].as_str().is_some_and(|e| e.contains("timed out")), "{byo}");
    assert!(byo["wrong"]["ms"].as_u64().is_some_and(|ms| ms < 10_000), "{byo}");

    // What the Rust services saw, in order (the refused calls never reach the function).
    let byo_from = byo["whoami"][0].as_str().expect("byo: from").to_string();
    let who = |s: &str, f: &str, k: Option<&str>| (s.to_string(), f.to_string(), k.map(str::to_string));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            who("e2e-open", &from, Some(&js_key)),
            who("e2e-open", &from, None),
            who("e2e-trusted", &from, Some(&js_key)),
            who("e2e-open", &byo_from, Some(BYO_PUBLIC)),
        ]
    );

    // ---- Rust calls JS ----
    let me = format!("{}/{}", rust.workspace(), rust.client_id());
    let sealed = json!({"from": me, "encryption": true, "caller_public_key": rust_key});
    assert_eq!(whoami.expect("whoami"), sealed, "JS saw our key in its context");
    assert_eq!(echo.expect("echo"), echo_json);
    assert_eq!(echo_bytes.expect("echo bytes").into_vec(), vec![0u8, 1, 255]);
    assert_eq!(echo_kwargs.expect("echo with kwargs"), 5);
    assert_eq!(sha.expect("2 MB to JS"), ("Uint8Array".to_string(), big.len(), byte_sum(&big)));
    assert_eq!(made.expect("2.5 MB from JS").into_vec(), pattern(2_500_000));
    assert_eq!(twice.expect("JS called our callback"), 30);
    let e = fail.expect_err("JS raised");
    assert!(e.remote_message().is_some_and(|m| m.contains("js refused: cold")), "{e:?}");
    assert_eq!(
        clear.expect("whoami in clear"),
        json!({"from": me, "encryption": false, "caller_public_key": null})
    );
    assert_eq!(trusted.expect("a JS service trusting our key"), sealed);
    let e = trusted_clear.expect_err("clear call to a JS service with trusted_keys");
    assert!(e.remote_message().is_some_and(|m| m.contains("Encryption required")), "{e:?}");
    let e = other.expect_err("a JS service trusting another key");
    assert!(e.remote_message().is_some_and(|m| m.contains("not in the trusted keys list")), "{e:?}");
    let e = wrong.expect_err("JS cannot open a request sealed for another key");
    assert!(matches!(e, Error::Call(CallError::NoReplyEncrypted { .. })), "{e:?}");
    assert!(wrong_after < Duration::from_secs(10), "{wrong_after:?}");
    assert_eq!(bye.expect("finish"), "bye");

    // What the JS functions saw, in order: every sealed call with our key, the clear one without.
    let enc = |s: &str, m: &str| json!({"service": s, "method": m, "encryption": true, "caller_public_key": rust_key});
    let clear_call =
        |s: &str, m: &str| json!({"service": s, "method": m, "encryption": false, "caller_public_key": null});
    assert_eq!(
        r["observed"],
        json!([
            enc("e2e-js-open", "whoami"),
            enc("e2e-js-open", "echo"),
            enc("e2e-js-open", "echo"),
            enc("e2e-js-open", "echo"),
            enc("e2e-js-open", "sha"),
            enc("e2e-js-open", "make_bytes"),
            enc("e2e-js-open", "twice"),
            enc("e2e-js-open", "fail"),
            clear_call("e2e-js-open", "whoami"),
            enc("e2e-js-trusted", "whoami"),
            enc("e2e-js-open", "finish"),
        ])
    );

    // ---- The wire, as JS's socket saw it ----
    // Every request and every result or error between JS and Rust was an `_enc` v2 envelope
    // from the sender's key, whole or chunked; only the clear calls (and their replies) were not.
    let wrong_key = impatient.get_public_key().expect("impatient key");
    let env = |key: &str| json!({"v": 2, "pub": key, "nonce": 24});
    let sealed_by = |k: Option<&str>| k.map_or(J::Null, env);
    let row = |dir: &str,
               method: &str,
               req: Option<&str>,
               req_chunked: bool,
               reply: Option<(&str, Option<&str>, bool)>| {
        let reply = reply.map_or(
            json!("unseen"),
            |(how, k, chunked)| json!({"how": how, "enc": sealed_by(k), "chunked": chunked}),
        );
        json!({"dir": dir, "method": method, "request": sealed_by(req), "chunked": req_chunked, "reply": reply})
    };
    let (js, rs) = (Some(js_key.as_str()), Some(rust_key.as_str()));
    // JS calls Rust: sealed with the JS key, answered sealed with ours.
    let out = |m: &str, how: &str| row("out", &format!("services.{m}"), js, false, Some((how, rs, false)));
    let clear_out =
        |m: &str, how: &str| row("out", &format!("services.{m}"), None, false, Some((how, None, false)));
    // Rust calls JS: the other way round.
    let inc = |m: &str, how: &str| row("in", &format!("services.{m}"), rs, false, Some((how, js, false)));
    let clear_in =
        |m: &str, how: &str| row("in", &format!("services.{m}"), None, false, Some((how, None, false)));
    let want = json!([
        out("e2e-control.hello", "resolve"),
        out("e2e-open.add", "resolve"),
        out("e2e-open.echo", "resolve"),
        out("e2e-open.echo", "resolve"),
        out("e2e-open.whoami", "resolve"),
        clear_out("e2e-open.whoami", "resolve"),
        row("out", "services.e2e-open.sha", js, true, Some(("resolve", rs, false))),
        row("out", "services.e2e-open.make_bytes", js, false, Some(("resolve", rs, true))),
        out("e2e-open.twice", "resolve"),
        row("in", "callback", rs, false, Some(("resolve", js, false))),
        out("e2e-open.fail", "reject"),
        out("e2e-trusted.whoami", "resolve"),
        clear_out("e2e-trusted.whoami", "reject"),
        out("e2e-other.whoami", "reject"),
        out("e2e-control.ready", "resolve"),
        inc("e2e-js-open.whoami", "resolve"),
        inc("e2e-js-open.echo", "resolve"),
        inc("e2e-js-open.echo", "resolve"),
        inc("e2e-js-open.echo", "resolve"),
        row("in", "services.e2e-js-open.sha", rs, true, Some(("resolve", js, false))),
        row("in", "services.e2e-js-open.make_bytes", rs, false, Some(("resolve", js, true))),
        inc("e2e-js-open.twice", "resolve"),
        row("out", "callback", js, false, Some(("resolve", rs, false))),
        inc("e2e-js-open.fail", "reject"),
        clear_in("e2e-js-open.whoami", "resolve"),
        inc("e2e-js-trusted.whoami", "resolve"),
        clear_in("e2e-js-trusted.whoami", "reject"),
        inc("e2e-js-other.whoami", "reject"),
        row("in", "services.e2e-js-open.whoami", Some(&wrong_key), false, None),
        inc("e2e-js-open.finish", "resolve"),
    ]);
    assert_eq!(r["sealing"], want, "the wire tap");

    impatient.disconnect().await;
    rust.disconnect().await;
    println!(
        "Rust to JS took {rust_to_js:?} (wrong key: {wrong_after:?}); whole test {:?}",
        started.elapsed()
    );
}
