//! Fuzz target bodies, shared by `fuzz/` (libFuzzer) and the stable corpus replay in `cargo test`.
//!
//! Compiled only with the `fuzzing` feature. Each body may panic: a panic is the finding.

use crate::codec::rtype::RType;
use crate::codec::{decode_frame, decode_frame_slice, encode_frame, to_vec};
use crate::{Limits, Value};

/// Any bytes as a binary frame: decoding must not panic, and whatever decodes must re-encode
/// to bytes that decode to the same frame, with every typed `_rtype` view stable.
pub fn frame_decode(data: &[u8]) {
    let limits = Limits::default();
    let Ok(frame) = decode_frame_slice(data, &limits) else { return };
    let once = encode_frame(&frame);
    let back = decode_frame(&once, &limits).expect("our own encoding must decode");
    // Compare bytes, not values: NaN != NaN.
    assert_eq!(encode_frame(&back), once, "re-encoding is not stable");
    check_typed(&crate::Value::Map(frame.main));
    if let Some(extra) = frame.extra {
        check_typed(&Value::Map(extra));
    }
}

fn check_typed(v: &Value) {
    match v {
        Value::Array(a) => a.iter().for_each(check_typed),
        Value::Map(m) => {
            if let Some(Ok(t)) = RType::from_value(v) {
                let first = to_vec(&t.to_value());
                let again = RType::from_value(&t.to_value())
                    .expect("still typed")
                    .expect("our own typed encoding must parse");
                assert_eq!(to_vec(&again.to_value()), first, "typed view of {} is not stable", t.name());
            }
            m.iter().for_each(|(k, x)| {
                check_typed(k);
                check_typed(x);
            });
        }
        _ => {}
    }
}

/// An engine that completed a handshake (and serves a small service), then fed arbitrary
/// frames: `data` is split into frames by 2-byte big-endian length prefixes, interleaved with
/// timeouts. Nothing may panic, every frame error is a value, and the engine's state stays
/// within its `Limits`.
pub fn engine_frames(data: &[u8]) {
    use crate::service::{FunctionSpec, ServiceSpec, Visibility};
    use crate::time::{Duration, Instant};
    use crate::{Engine, EngineConfig, Event};
    use bytes::Bytes;

    let mut config = EngineConfig::new("py-peer");
    config.limits.max_pending_calls = 64;
    config.limits.max_active_invocations = 64;
    config.limits.max_queued_frames = 64;
    let limits = config.limits.clone();
    let mut now = Instant::from_micros(1);
    let mut engine = Engine::new(config, now);
    let _ = engine.handle_transport_open(now);
    let info = r#"{"type": "connection_info", "public_base_url": "http://127.0.0.1:9527", "manager_id": "manager-delicate-dirigible-06049537", "workspace": "ws-user-anonymouz-hyper-titanium-83345890", "client_id": "py-peer", "user": {"id": "u"}, "reconnection_token": "r", "reconnection_token_life_time": 100.0}"#;
    let _ = engine.handle_text(now, info);
    // The transcripts' ids, so seeds built from captured frames reach the dispatch code.
    let svc = ServiceSpec::new("interop")
        .visibility(Visibility::Public)
        .function("add", FunctionSpec::new("add"))
        .function("kwfunc", FunctionSpec::new("kwfunc"))
        .function("sleep", FunctionSpec::new("sleep"))
        .function("call_callback", FunctionSpec::new("call_callback"));
    let _ = engine.register_service(now, svc);
    let mut rest = data;
    let mut step = 0u32;
    while rest.len() >= 2 {
        let len = (usize::from(rest[0]) << 8 | usize::from(rest[1])).min(rest.len() - 2);
        let frame = Bytes::copy_from_slice(&rest[2..2 + len]);
        rest = &rest[2 + len..];
        step += 1;
        if frame.first() == Some(&b'{') {
            let _ = engine.handle_text(now, core::str::from_utf8(&frame).unwrap_or("{}"));
        } else {
            let _ = engine.handle_binary(now, &frame);
        }
        // Answer some invocations, leave others to time out; advance time now and then.
        while let Some(e) = engine.poll_event() {
            if let Event::Invoke(inv) = e {
                if step % 3 != 0 {
                    let _ = engine.reply(now, inv.id, Ok(crate::Value::Nil));
                }
            }
        }
        while engine.poll_transmit().is_some() {}
        if step % 4 == 0 {
            now += Duration::from_secs(7);
            engine.handle_timeout(now);
        }
        assert!(engine.pending_calls() <= limits.max_pending_calls);
        assert!(engine.active_invocations() <= limits.max_active_invocations);
        assert!(engine.queued_frames() <= limits.max_queued_frames);
    }
    // Far in the future every call has timed out and been freed.
    now += Duration::from_secs(3600);
    engine.handle_timeout(now);
    assert_eq!(engine.pending_calls(), 0, "calls outlived their timeout");
}
