//! WebRTC against the server websocket, Rust↔Rust through one local Hypha server, in the same
//! run: the time from `get_service_with(id, WebRtc::On)` to the first call's result, small echo
//! latency (median, p99) and calls/s for SECONDS (default 3) each, and a 50 MB bytes echo,
//! over the websocket (through the server) and over a WebRTC data channel (loopback UDP).
//!
//! `cargo run --release -p hypha-rpc-tests --example rtc_bench [-- SECONDS]`

use std::time::{Duration, Instant};

use hypha_rpc::rtc::WebRtc;
use hypha_rpc_tests::rtc::{loopback, pattern};
use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::serde_bytes::ByteBuf;
use hypha_rpc_tokio::{ServerConfig, Service, ServiceProxy, Value, connect_to_server};

struct Row {
    median: Duration,
    p99: Duration,
    per_s: f64,
}

async fn small(svc: &ServiceProxy, secs: f64) -> Row {
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        let v: Value = svc.call("echo", ("ping",)).await.expect("echo");
        assert_eq!(v.as_str(), Some("ping"));
        lat.push(t.elapsed());
    }
    let per_s = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    Row { median: lat[lat.len() / 2], p99: lat[lat.len() * 99 / 100], per_s }
}

async fn big(svc: &ServiceProxy, data: &[u8]) -> Duration {
    let t = Instant::now();
    let back: ByteBuf = svc.call("echo_bytes", (ByteBuf::from(data.to_vec()),)).await.expect("50 MB echo");
    let d = t.elapsed();
    assert!(back.as_ref() == data, "50 MB came back intact");
    d
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: f64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let a = connect_to_server(ServerConfig::new(hs.url()).webrtc(WebRtc::On, loopback()))
        .await
        .expect("connect a");
    a.register_service(
        Service::new("bench")
            .function("echo", |x: Value| async move { Ok::<_, String>(x) })
            .function("echo_bytes", |b: ByteBuf| async move { Ok::<_, String>(b) }),
    )
    .await
    .unwrap();
    let token = a.generate_token(None).await.unwrap();
    let b = connect_to_server(
        ServerConfig::new(hs.url()).workspace(a.workspace()).token(token).webrtc(WebRtc::Off, loopback()),
    )
    .await
    .expect("connect b");
    let id = format!("{}/{}:bench", a.workspace(), a.client_id());

    let t = Instant::now();
    let ws = b.get_service(&id).await.unwrap();
    let _: Value = ws.call("echo", (1,)).await.unwrap();
    let ws_first = t.elapsed();
    let t = Instant::now();
    let rtc = b.get_service_with(&id, WebRtc::On).await.expect("the service over WebRTC");
    let _: Value = rtc.call("echo", (1,)).await.unwrap();
    let rtc_first = t.elapsed();

    let ws_small = small(&ws, secs).await;
    let rtc_small = small(&rtc, secs).await;
    let data = pattern(50_000_000);
    let ws_big = big(&ws, &data).await;
    let rtc_big = big(&rtc, &data).await;

    println!(
        "WebRTC vs the server websocket, Rust <-> Rust, one local server, same run ({secs} s per latency row)"
    );
    println!("| measure | websocket (via server) | WebRTC (loopback) | WebRTC / websocket |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| get_service to first call result | {} | {} | {:.2}x |",
        ms(ws_first),
        ms(rtc_first),
        rtc_first.as_secs_f64() / ws_first.as_secs_f64()
    );
    println!(
        "| small echo, median | {} | {} | {:.2}x |",
        ms(ws_small.median),
        ms(rtc_small.median),
        rtc_small.median.as_secs_f64() / ws_small.median.as_secs_f64()
    );
    println!(
        "| small echo, p99 | {} | {} | {:.2}x |",
        ms(ws_small.p99),
        ms(rtc_small.p99),
        rtc_small.p99.as_secs_f64() / ws_small.p99.as_secs_f64()
    );
    println!(
        "| calls/s, sequential | {:.0} | {:.0} | {:.2}x |",
        ws_small.per_s,
        rtc_small.per_s,
        rtc_small.per_s / ws_small.per_s
    );
    println!(
        "| 50 MB echo (both ways) | {:.3} s ({:.0} MB/s) | {:.3} s ({:.0} MB/s) | {:.2}x |",
        ws_big.as_secs_f64(),
        100.0 / ws_big.as_secs_f64(),
        rtc_big.as_secs_f64(),
        100.0 / rtc_big.as_secs_f64(),
        rtc_big.as_secs_f64() / ws_big.as_secs_f64()
    );
    b.disconnect().await;
    a.disconnect().await;
}
