//! What the WebRTC interop tests share: loopback-only peer connections, the byte pattern both
//! sides agree on, and a Rust service with the Python peer's method names.

use std::net::{IpAddr, Ipv4Addr};

use hypha_rpc::rtc::WebRtcConfig;
use hypha_rpc::serde_bytes::ByteBuf;
use hypha_rpc::{Context, Generator, RemoteFunction, Service, Value};
use serde_json::json;
use sha2::Digest;

/// Host candidates on 127.0.0.1 only (and no STUN: we never use one).
pub fn loopback() -> WebRtcConfig {
    WebRtcConfig::default().host_addresses([IpAddr::V4(Ipv4Addr::LOCALHOST)])
}

/// `n` bytes, `i % 251`: what every peer of the interop tests sends and expects.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// SHA-256 as lowercase hex.
pub fn sha256_hex(b: &[u8]) -> String {
    hypha_rpc_core::crypto::to_hex(&sha2::Sha256::digest(b))
}

/// A Rust service with the method names of `tests/py/rtc_peer.py`'s Python service (and the
/// browser harness's checks): `echo`, `whoami` (context as JSON), `call_cb`, `count`, `digest`
/// (`{len, sha256}`) and `make_bytes` (`i % 251`).
pub fn interop_service(id: &str) -> Service {
    Service::new(id)
        .function("echo", |x: Value| async move { Ok::<_, String>(x) })
        .function_with_context("whoami", |ctx: Context| async move {
            Ok::<_, String>(json!({
                "from": ctx.from, "ws": ctx.ws, "connection_type": ctx.connection_type,
                "user_id": ctx.user.as_map().and_then(|u| u.get("id")).and_then(|v| v.as_str()).map(String::from),
            }))
        })
        .function("call_cb", |cb: RemoteFunction, x: i64| async move {
            cb.call::<i64>((x,)).await.map_err(|e| format!("the callback failed: {e}"))
        })
        .function("count", |n: u32| async move { Ok::<_, String>(Generator::new(futures::stream::iter(0..n))) })
        .function("digest", |b: ByteBuf| async move {
            Ok::<_, String>(json!({"len": b.len(), "sha256": sha256_hex(&b)}))
        })
        .function("make_bytes", |n: usize| async move { Ok::<_, String>(ByteBuf::from(pattern(n))) })
}
