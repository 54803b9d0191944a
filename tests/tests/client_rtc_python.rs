//! WebRTC between our client and a real Python `hypha-rpc` peer (aiortc), signaled through the
//! real server, loopback only: a Python offerer calling a Rust service, and a Rust offerer
//! calling a Python service, with callbacks, generators, contexts and 20 MB payloads where the
//! reference can carry them.
//!
//! Both peers offer only 127.0.0.1 host candidates and use no STUN server
//! (`tests/py/rtc_peer.py` pins aioice's host addresses and passes `ice_servers: [{urls: []}]`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hypha_rpc::rtc::WebRtc;
use hypha_rpc_tests::pypeer::PyPeer;
use hypha_rpc_tests::rtc::{interop_service, loopback, pattern, sha256_hex};
use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::{Callback, RemoteGenerator, ServerConfig, connect_to_server, serde_bytes::ByteBuf};
use serde_json::{Value as Json, json};

const T: Duration = Duration::from_secs(90);

async fn call(py: &PyPeer, alias: &str, method: &str, args: Json) -> Result<Json, String> {
    let r = py.request(json!({"cmd": "call", "alias": alias, "method": method, "args": args}), T).await;
    match r.get("ok") {
        Some(v) => Ok(v.clone()),
        None => Err(format!("{} {}", r["type"], r["error"])),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_offerer_calls_a_rust_service_over_webrtc() {
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let rs = connect_to_server(
        ServerConfig::new(hs.url()).client_id("rs-answerer").webrtc(WebRtc::On, loopback()),
    )
    .await
    .expect("connect with webrtc");
    rs.register_service(interop_service("rs-rtc")).await.unwrap();
    let token = rs.generate_token(None).await.unwrap();
    let rt: Arc<dyn hypha_rpc::runtime::Runtime> = Arc::new(hypha_rpc_tokio::TokioRuntime);
    let py =
        PyPeer::start(&hs, rt, "rtc_peer.py", &["client", "--workspace", rs.workspace(), "--token", &token]);
    let ready = py.event("ready", T).await;
    let py_client = ready["client_id"].as_str().unwrap().to_string();
    let rtc_id = format!("{}/rs-answerer-rtc", rs.workspace());

    // get_rtc_service, as Python users call it.
    let got = py
        .request(json!({"cmd": "get", "alias": "r", "service": rtc_id, "name": "rs-rtc", "via": "rtc"}), T)
        .await;
    assert_eq!(got["ok"]["webrtc"], json!(true), "{got}");
    eprintln!("python get_rtc_service: channel open after {}s", got["ok"]["connect_elapsed"]);
    assert_eq!(call(&py, "r", "echo", json!(["hi"])).await.unwrap(), json!("hi"));

    // The context Python's own answerer never gives: the caller as the server vouched for it.
    let who = call(&py, "r", "whoami", json!([])).await.unwrap();
    assert_eq!(who["connection_type"], json!("webrtc"), "{who}");
    assert_eq!(who["ws"], json!(rs.workspace()), "{who}");
    assert!(who["user_id"].is_string(), "the offer's trusted user is in the context: {who}");
    assert!(who["from"].as_str().unwrap().starts_with(&format!("{}/", rs.workspace())), "{who}");

    assert_eq!(call(&py, "r", "call_cb", json!([{"$cb": "triple"}, 5])).await.unwrap(), json!(15));
    assert_eq!(call(&py, "r", "count", json!([4])).await.unwrap(), json!({"$items": [0, 1, 2, 3]}));

    // 20 MB each way. Python's 256 KiB chunks fit the 1 MiB we advertise; ours are cut to the
    // 64 KiB aiortc advertises.
    for n in [300_000usize, 20_000_000] {
        let up = call(&py, "r", "digest", json!([{"$pattern": n}])).await.unwrap();
        assert_eq!(up, json!({"len": n, "sha256": sha256_hex(&pattern(n))}), "{n} bytes from Python");
        let down = call(&py, "r", "make_bytes", json!([n])).await.unwrap();
        assert_eq!(down, json!({"$len": n, "$sha256": sha256_hex(&pattern(n))}), "{n} bytes to Python");
    }

    // Python's get_service(id, {"webrtc": True}) finds `<client>-rtc` from the service id.
    let full = format!("{}/rs-answerer:rs-rtc", rs.workspace());
    let got = py.request(json!({"cmd": "get", "alias": "g", "service": full, "via": "get_service"}), T).await;
    assert_eq!(got["ok"]["webrtc"], json!(true), "{got}");
    assert_eq!(call(&py, "g", "echo", json!([{"a": [1, 2]}])).await.unwrap(), json!({"a": [1, 2]}));
    // And the nested form: `offer` called over a first data channel, to open a second.
    let got = py
        .request(
            json!({"cmd": "get", "alias": "n", "service": rtc_id, "name": "rs-rtc", "via": "rtc", "nested": true}),
            T,
        )
        .await;
    assert_eq!(got["ok"]["webrtc"], json!(true), "{got}");
    assert_eq!(call(&py, "n", "echo", json!([7])).await.unwrap(), json!(7));

    // The offerer closes its peer connection: later calls on it fail, ours carry on.
    py.request(json!({"cmd": "close", "alias": "r"}), T).await;
    assert!(call(&py, "r", "echo", json!([1])).await.is_err());
    assert_eq!(call(&py, "g", "echo", json!([2])).await.unwrap(), json!(2));
    let _ = py_client;
    py.request(json!({"cmd": "leave"}), T).await;
    rs.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_offerer_calls_a_python_service_over_webrtc() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let rt: Arc<dyn hypha_rpc::runtime::Runtime> = Arc::new(hypha_rpc_tokio::TokioRuntime);
    let py = PyPeer::start(&hs, rt, "rtc_peer.py", &["serve"]);
    let ready = py.event("ready", T).await;
    let ws = ready["workspace"].as_str().unwrap().to_string();
    let token =
        py.request(json!({"cmd": "token", "config": {}}), T).await["ok"].as_str().unwrap().to_string();
    let rs = connect_to_server(
        ServerConfig::new(hs.url()).workspace(&ws).token(token).webrtc(WebRtc::Off, loopback()),
    )
    .await
    .expect("join the Python peer's workspace");
    let rtc_id = ready["rtc_service_id"].as_str().unwrap();

    let t0 = std::time::Instant::now();
    let peer = rs.get_rtc_service(rtc_id, loopback()).await.expect("a peer connection to aiortc");
    let svc = peer.get_service("py-rtc").await.expect("py-rtc over the channel");
    assert_eq!(svc.call::<String>("echo", ("hi",)).await.unwrap(), "hi");
    eprintln!("get_rtc_service (aiortc answerer) to first call: {:?}", t0.elapsed());
    // aiortc says 65 536 in its SDP: we chunk below it.
    assert_eq!(peer.max_message_size(), 65_536);

    let triple = Callback::new(|x: i64| async move { Ok::<_, String>(x * 3) });
    assert_eq!(svc.call::<i64>("call_cb", (triple, 5)).await.unwrap(), 15);
    let items: Vec<i64> = svc
        .call::<RemoteGenerator>("count", (4,))
        .await
        .unwrap()
        .typed::<i64>()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(items, vec![0, 1, 2, 3]);

    // 20 MB from Python: its chunks come through `message_cache` on our side of the channel.
    let n = 20_000_000usize;
    let t = std::time::Instant::now();
    let b: ByteBuf = svc.call("make_bytes", (n,)).await.unwrap();
    eprintln!("20 MB from aiortc: {:?}", t.elapsed());
    assert!(b.as_ref() == pattern(n).as_slice());
    // Up to aiortc's advertised size, a single message.
    let d: Json = svc.call("digest", (ByteBuf::from(pattern(60_000)),)).await.unwrap();
    assert_eq!(d["len"], json!(60_000), "{d}");

    // 20 MB to Python: cut to its 64 KiB. hypha-rpc's own offerers fail here (their chunks
    // reach the answerer's websocket RPC without the `ws`/`user` it needs); ours carry them.
    let d: Json = svc.call("digest", (ByteBuf::from(pattern(n)),)).await.unwrap();
    assert_eq!(d, json!({"len": n, "sha256": sha256_hex(&pattern(n))}));
    // hypha-rpc 0.21.47's answerer gives its require_context functions no context over
    // WebRTC (theirs to fix; ours does): logged, not asserted.
    let r = svc.call::<Json>("whoami", ()).await;
    eprintln!("whoami on a Python answerer: {r:?}");

    peer.disconnect().await;
    assert!(svc.call::<String>("echo", ("x",)).await.is_err(), "calls after disconnect fail at once");
    py.request(json!({"cmd": "leave"}), T).await;
    rs.disconnect().await;
}
