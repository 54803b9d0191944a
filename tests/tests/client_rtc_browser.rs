//! A browser reaches a Rust service over WebRTC: the npm `hypha-rpc` bundle in headless
//! Chromium (Debian's, driven by playwright-core: `tests/js/rtc_browser.mjs`) calls
//! `getRTCService` on our `<client_id>-rtc` service, then runs its checks over the data channel:
//! echo, a callback, a generator, the context, and 1 MB and 20 MB each way. Loopback only: the
//! page keeps only 127.0.0.1 candidates and uses no STUN server.
//!
//! Needs node, npm and Chromium; `scripts/js-deps.sh` and `scripts/chromium.sh` install them
//! (the test runs both), and it fails loudly when they cannot.

use std::path::Path;
use std::process::{Command, Stdio};

use hypha_rpc::rtc::WebRtc;
use hypha_rpc_tests::rtc::{interop_service, loopback};
use hypha_rpc_tests::server::{HyphaServer, install_js_deps, workspace_root};
use hypha_rpc_tokio::{ServerConfig, connect_to_server};
use serde_json::Value as Json;

fn chromium(root: &Path) -> String {
    let out = Command::new("bash")
        .arg(root.join("scripts").join("chromium.sh"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/chromium.sh: {e}"));
    assert!(
        out.status.success(),
        "scripts/chromium.sh failed: Chromium is required for this test\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_calls_a_rust_service_over_webrtc() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let root = workspace_root().expect("the workspace root");
    install_js_deps(&root);
    let chromium = chromium(&root);
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let rs =
        connect_to_server(ServerConfig::new(hs.url()).client_id("rs-browser").webrtc(WebRtc::On, loopback()))
            .await
            .expect("connect with webrtc");
    rs.register_service(interop_service("rs-rtc")).await.unwrap();
    let token = rs.generate_token(None).await.unwrap();
    let rtc_id = format!("{}/rs-browser-rtc", rs.workspace());

    let script = root.join("tests").join("js").join("rtc_browser.mjs");
    let (url, ws) = (hs.url().to_string(), rs.workspace().to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .args([url.as_str(), ws.as_str(), token.as_str(), rtc_id.as_str(), "rs-rtc"])
            .env("CHROMIUM", chromium)
            .env("RTC_BROWSER_TIMEOUT", "240")
            // hypha-rpc's 256 KiB chunks do not fit Chromium's own 262 144-byte limit (the
            // reference's bug, not ours): the page chunks smaller, as a user of it must.
            .env("RTC_BROWSER_CHUNK_SIZE", "131072")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdin(Stdio::null())
            .output()
            .expect("run node tests/js/rtc_browser.mjs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser harness failed ({}):\n{stdout}\n{stderr}", out.status);
    let lines: Vec<Json> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let check = |name: &str| -> &Json {
        lines
            .iter()
            .find(|l| l["check"] == name)
            .unwrap_or_else(|| panic!("no {name} check in the output:\n{stdout}\n{stderr}"))
    };
    for l in &lines {
        eprintln!("{l}");
    }
    // Everything passes against our answerer, including what fails against Python's.
    for name in [
        "connect_ms",
        "sdp",
        "echo",
        "callback",
        "generator",
        "whoami",
        "bytes_probe",
        "bytes_1mb",
        "bytes_20mb",
    ] {
        assert_eq!(check(name)["ok"], Json::Bool(true), "{name}: {}", check(name));
    }
    let who = &check("whoami")["detail"];
    let who_text = who.to_string();
    assert!(who_text.contains("webrtc"), "the browser's call carried a webrtc context: {who_text}");
    assert!(who_text.contains(rs.workspace()), "{who_text}");
    assert!(lines.iter().any(|l| l["done"] == Json::Bool(true)), "{stdout}");
    rs.disconnect().await;
}
