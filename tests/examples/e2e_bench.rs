//! The cost of end-to-end encryption (PROTOCOL.md §12), Rust↔Rust through one local Hypha
//! server, in the same run: sequential echo calls of 1 KB and 1 MB of bytes, in clear and
//! encrypted (the request and the reply are each sealed and opened once), for SECONDS each
//! (default 3). It prints median latency and calls/s per case, the encrypted ÷ clear ratio,
//! and the per-message overhead in bytes (the envelope's size minus the plain `extra`'s, for a
//! 1 KB argument).
//!
//! `cargo run --release -p hypha-rpc-tests --example e2e_bench [-- SECONDS]`

use std::time::{Duration, Instant};

use hypha_rpc_core::codec::to_vec;
use hypha_rpc_core::crypto::{Crypto, NaclBox};
use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::serde_bytes::ByteBuf;
use hypha_rpc_tokio::{Map, ServerConfig, Service, ServiceProxy, Value, Visibility, connect_to_server};

/// Nonces for the size measurement (their value does not change any size).
struct Counter(u64);

impl rand_core::RngCore for Counter {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.0
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for Counter {}

/// Median latency (s) and calls/s of sequential echo calls of `payload` for `seconds`.
async fn measure(svc: &ServiceProxy, payload: &ByteBuf, seconds: f64) -> (f64, f64) {
    for _ in 0..5 {
        let back: ByteBuf = svc.call("echo", (payload,)).await.expect("warm-up echo");
        assert!(back == *payload, "echo came back different");
    }
    let mut lat = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end || lat.len() < 5 {
        let t = Instant::now();
        let back: ByteBuf = svc.call("echo", (payload,)).await.expect("echo");
        lat.push(t.elapsed().as_secs_f64());
        assert_eq!(back.len(), payload.len());
    }
    let rate = lat.len() as f64 / lat.iter().sum::<f64>();
    lat.sort_by(f64::total_cmp);
    (lat[lat.len() / 2], rate)
}

/// The `extra` of a compact-promise call with one argument, and its encrypted envelope.
fn overhead(arg_len: usize) -> (usize, usize) {
    let mut extra = Map::new();
    extra.push(Value::from("args"), Value::Array(vec![Value::bin(vec![7u8; arg_len])]));
    extra.push(Value::from("promise"), Value::from("*"));
    extra.push(Value::from("t"), Value::from(10.0));
    let plain = to_vec(&Value::Map(extra));
    let mut me = NaclBox::from_secret([1; 32], Counter(1));
    let them = NaclBox::from_secret([2; 32], Counter(2));
    let (nonce, data) = me.seal(&them.public_key(), &plain).expect("an honest key");
    let mut enc = Map::new();
    enc.push(Value::from("v"), 2u64);
    enc.push(Value::from("pub"), Value::bin(me.public_key().to_vec()));
    enc.push(Value::from("nonce"), Value::bin(nonce.to_vec()));
    let mut envelope = Map::new();
    envelope.push(Value::from("_enc"), Value::Map(enc));
    envelope.push(Value::from("data"), Value::bin(data));
    (plain.len(), to_vec(&Value::Map(envelope)).len())
}

/// Mean time of one local seal and one open of `len` bytes (no network), in seconds.
fn local_crypto(len: usize) -> (f64, f64) {
    let mut me = NaclBox::from_secret([1; 32], Counter(1));
    let mut them = NaclBox::from_secret([2; 32], Counter(2));
    let pt = vec![7u8; len];
    let n = if len > 100_000 { 50 } else { 2000 };
    let t = Instant::now();
    let mut last = None;
    for _ in 0..n {
        last = me.seal(&them.public_key(), &pt);
    }
    let seal = t.elapsed().as_secs_f64() / n as f64;
    let (nonce, ct) = last.unwrap();
    let t = Instant::now();
    for _ in 0..n {
        assert!(them.open(&me.public_key(), &nonce, &ct).is_some());
    }
    (seal, t.elapsed().as_secs_f64() / n as f64)
}

async fn run(url: &str, seconds: f64) {
    let slow = Duration::from_secs(120);
    let owner =
        connect_to_server(ServerConfig::new(url).method_timeout(slow).encryption(true)).await.expect("owner");
    let owner_key = owner.get_public_key().expect("owner key");
    let token = owner.generate_token(None).await.expect("token");
    let id = owner
        .register_service(
            Service::new("bench")
                .visibility(Visibility::Public)
                .function("echo", |x: ByteBuf| async move { Ok::<_, String>(x) }),
        )
        .await
        .expect("register");
    let join = |enc: bool| {
        connect_to_server(
            ServerConfig::new(url)
                .workspace(owner.workspace())
                .token(token.clone())
                .method_timeout(slow)
                .encryption(enc),
        )
    };
    let plain_caller = join(false).await.expect("clear caller");
    let enc_caller = join(true).await.expect("encrypting caller");
    let clear = plain_caller.get_service(&id).await.expect("get_service");
    let sealed = enc_caller.get_encrypted_service(&id, &owner_key).await.expect("get_encrypted_service");

    println!(
        "| payload | clear median | encrypted median | clear calls/s | encrypted calls/s | cost (enc ÷ clear latency) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, len) in [("1 KB", 1024usize), ("1 MB", 1024 * 1024)] {
        let payload = ByteBuf::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        // Interleaved (clear, encrypted, clear, encrypted) halves, so drift hits both alike.
        let mut c = Vec::new();
        let mut e = Vec::new();
        for _ in 0..2 {
            c.push(measure(&clear, &payload, seconds / 2.0).await);
            e.push(measure(&sealed, &payload, seconds / 2.0).await);
        }
        let avg = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
        let (cm, cr) = (avg(&c, |x| x.0), avg(&c, |x| x.1));
        let (em, er) = (avg(&e, |x| x.0), avg(&e, |x| x.1));
        println!(
            "| {name} echo | {:.3} ms | {:.3} ms | {cr:.0} | {er:.0} | {:.2}× |",
            cm * 1e3,
            em * 1e3,
            em / cm
        );
    }
    let (plain, envelope) = overhead(1024);
    println!();
    println!(
        "per-message overhead (1 KB argument): plain extra {plain} B, envelope {envelope} B, +{} B",
        envelope - plain
    );
    for (name, len) in [("0 B", 0usize), ("1 KB", 1024), ("1 MB", 1024 * 1024)] {
        let (seal, open) = local_crypto(len);
        println!(
            "local crypto_box of {name} (XSalsa20-Poly1305; the X25519 exchange is cached per peer): seal {:.1} µs, open {:.1} µs",
            seal * 1e6,
            open * 1e6
        );
    }
    for s in [enc_caller, plain_caller, owner] {
        s.disconnect().await;
    }
}

fn main() {
    let seconds: f64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(hs.url(), seconds));
}
