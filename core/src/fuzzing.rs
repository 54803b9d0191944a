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
    engine_frames_on(data, false);
    // The same frames on a peer link (a WebRTC data channel): no server rewrites them, and the
    // engine must still hold its caps and never believe the peer's own `from`/`ws`/`user`.
    engine_frames_on(data, true);
}

fn engine_frames_on(data: &[u8], peer: bool) {
    use crate::service::{FunctionSpec, ServiceSpec, Visibility};
    use crate::time::{Duration, Instant};
    use crate::{Engine, EngineConfig, Event};
    use bytes::Bytes;

    let mut config = EngineConfig::new("py-peer");
    config.limits.max_pending_calls = 64;
    config.limits.max_active_invocations = 64;
    config.limits.max_queued_frames = 64;
    // Off, so that far in the future no fresh check call is pending (the check has its own
    // tests); the registrations still happen.
    config.registration_check_interval = None;
    if peer {
        config.peer = Some(crate::PeerLink {
            workspace: "ws-user-anonymouz-hyper-titanium-83345890".into(),
            peer_workspace: "ws-other".into(),
            peer_user: crate::Value::Nil,
        });
        config.transport_max_message = 65_536;
    }
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
        // The engine's own registration calls may exceed the user limit by a handful.
        assert!(engine.pending_calls() <= limits.max_pending_calls + 4);
        assert!(engine.active_invocations() <= limits.max_active_invocations);
        assert!(engine.queued_frames() <= limits.max_queued_frames);
    }
    // Far in the future every call has timed out and been freed.
    now += Duration::from_secs(3600);
    engine.handle_timeout(now);
    assert_eq!(engine.pending_calls(), 0, "calls outlived their timeout");
}

/// Chunk reassembly driven by arbitrary operations, checked against a simple model: `data` is
/// read as `op, key, index, len` bytes followed by `len` payload bytes. Caps must hold at every
/// step and a completed message must equal its chunks in index order.
pub fn chunk_reassembly(data: &[u8]) {
    use crate::chunk::Reassembly;
    use crate::time::{Duration, Instant};
    use alloc::collections::BTreeMap;
    use alloc::string::String;
    use alloc::vec::Vec;
    use bytes::Bytes;

    let limits = Limits {
        max_message_bytes: 4096,
        max_reassembly_bytes: 8192,
        max_chunks_per_message: 16,
        max_partial_messages: 3,
        max_waiting_chunks: 4,
        partial_message_expiry: Duration::from_secs(10),
        ..Limits::default()
    };
    let mut r = Reassembly::default();
    // Model: per key, the owner and the chunks received (by index).
    let mut model: BTreeMap<String, (String, BTreeMap<u64, Vec<u8>>)> = BTreeMap::new();
    let mut now = Instant::from_micros(1);
    let mut rest = data;
    while rest.len() >= 4 {
        let (op, key, index, len) =
            (rest[0] % 7, rest[1] % 4, u64::from(rest[2] % 20), usize::from(rest[3]) * 4);
        rest = &rest[4..];
        let payload = &rest[..len.min(rest.len())];
        rest = &rest[payload.len()..];
        let key = alloc::format!("k{key}");
        let owner = if op == 6 { "ws/stranger" } else { "ws/owner" };
        match op {
            0 => {
                if r.create(now, &key, owner, index % 2 == 0, &limits).is_ok() {
                    model.insert(key, (owner.into(), BTreeMap::new()));
                }
            }
            1 | 2 | 6 => {
                let idx = if op == 2 { None } else { Some(index) };
                let ok = r.add(now, &key, owner, idx, Bytes::copy_from_slice(payload), &limits).is_ok();
                if ok {
                    let entry = model.get_mut(&key).expect("an accepted chunk has a message");
                    assert_eq!(entry.0, owner, "a stranger's chunk was accepted");
                    let at = idx.unwrap_or_else(|| entry.1.keys().next_back().map_or(0, |k| k + 1));
                    assert!(entry.1.insert(at, payload.to_vec()).is_none(), "duplicate chunk accepted");
                    let in_order = entry.1.keys().copied().zip(0..).take_while(|(k, i)| k == i).count();
                    let ahead = entry.1.len() - in_order;
                    assert!(ahead <= limits.max_waiting_chunks, "{ahead} chunks held ahead of a gap");
                }
            }
            3 => match r.take(&key, owner) {
                Ok(whole) => {
                    let (_, chunks) = model.remove(&key).expect("taken message existed");
                    let want: Vec<u8> = chunks.values().flatten().copied().collect();
                    let contiguous = chunks.keys().copied().eq(0..chunks.len() as u64);
                    assert!(contiguous, "a message with a gap was completed");
                    assert_eq!(&whole[..], &want[..], "reassembled bytes differ from the chunks");
                }
                Err(_) => {
                    // Refused: gone if it existed and belonged to the owner (a gap drops it).
                    if model.get(&key).is_some_and(|(o, _)| o == owner) {
                        model.remove(&key);
                    }
                }
            },
            4 => {
                if r.remove(&key, owner).is_ok() {
                    model.remove(&key);
                }
            }
            _ => {
                now += Duration::from_secs(u64::from(rest.first().copied().unwrap_or(0) % 12));
                r.expire(now, &limits);
                model.retain(|k, _| r.contains(k));
            }
        }
        assert!(r.len() <= limits.max_partial_messages, "too many partial messages");
        assert!(r.bytes() <= limits.max_reassembly_bytes, "too many bytes held");
        assert_eq!(r.len(), model.len(), "reassembly and model disagree on live messages");
    }
}

/// The end-to-end envelope (PROTOCOL.md §12) into a connected engine with (fake) encryption
/// on. `data` is cut into records `mode, flip, len(2), bytes`:
/// - mode 0: `bytes` is a plaintext (any msgpack, ideally an `extra` map) that a peer seals
///   correctly: whatever it holds, nothing panics and every reply goes back sealed;
/// - mode 1: the same, with one ciphertext byte flipped: it must never reach user code;
/// - mode 2: `bytes` are raw envelope fields (`pub`, `nonce`, `data`): rejected cleanly.
pub fn e2e_envelope(data: &[u8]) {
    use crate::codec::Frame;
    use crate::crypto::{Crypto, FakeCrypto};
    use crate::service::{FunctionSpec, ServiceSpec, Visibility};
    use crate::time::{Duration, Instant};
    use crate::{Engine, EngineConfig, Event, Map, Transmit};
    use bytes::Bytes;

    let mut config = EngineConfig::new("callee");
    config.registration_check_interval = None;
    let mut now = Instant::from_micros(1);
    let mut engine = Engine::new(config, now);
    engine.set_crypto(alloc::boxed::Box::new(FakeCrypto::new(2)));
    let mut peer = FakeCrypto::new(1);
    let callee_key = engine.public_key().expect("encryption is on");
    let _ = engine.handle_transport_open(now);
    let info = r#"{"type": "connection_info", "public_base_url": "http://127.0.0.1:9527", "manager_id": "m", "workspace": "ws", "client_id": "callee", "user": {"id": "u"}}"#;
    let _ = engine.handle_text(now, info);
    let svc = ServiceSpec::new("svc").visibility(Visibility::Public).function("f", FunctionSpec::new("f"));
    let locked = ServiceSpec::new("locked")
        .visibility(Visibility::Public)
        .trusted_keys([crate::crypto::to_hex(&[7u8; 32])])
        .function("f", FunctionSpec::new("f"));
    let _ = engine.register_service(now, svc);
    let _ = engine.register_service(now, locked);
    while engine.poll_transmit().is_some() {}
    while engine.poll_event().is_some() {}

    let mut rest = data;
    let mut n = 0u32;
    while rest.len() >= 4 {
        let (mode, flip) = (rest[0] % 3, rest[1]);
        let len = (usize::from(rest[2]) << 8 | usize::from(rest[3])).min(rest.len() - 4);
        let body = &rest[4..4 + len];
        rest = &rest[4 + len..];
        n += 1;
        let mut main = Map::new();
        main.insert("type", "method");
        main.insert("from", "ws/caller");
        main.insert("to", "ws/callee");
        main.insert("method", if n % 2 == 0 { "services.svc.f" } else { "services.locked.f" });
        main.insert("session", alloc::format!("s{n}"));
        let envelope = |pub_key: &[u8], nonce: &[u8], sealed: &[u8]| {
            let mut enc = Map::new();
            enc.insert("v", 2u64);
            enc.insert("pub", Value::bin(Bytes::copy_from_slice(pub_key)));
            enc.insert("nonce", Value::bin(Bytes::copy_from_slice(nonce)));
            let mut extra = Map::new();
            extra.insert("_enc", Value::Map(enc));
            extra.insert("data", Value::bin(Bytes::copy_from_slice(sealed)));
            extra
        };
        let extra = match mode {
            0 | 1 => {
                let (nonce, mut sealed) = peer.seal(&callee_key, body).expect("fake keys are fine");
                if mode == 1 {
                    let i = usize::from(flip) % sealed.len();
                    sealed[i] ^= 1 | (flip >> 1);
                }
                envelope(&peer.public_key(), &nonce, &sealed)
            }
            _ => {
                let (k, r) = body.split_at(body.len().min(32));
                let (nonce, sealed) = r.split_at(r.len().min(24));
                envelope(k, nonce, sealed)
            }
        };
        let frame = encode_frame(&Frame { main, extra: Some(extra) });
        let r = engine.handle_binary(now, &frame);
        while let Some(e) = engine.poll_event() {
            if let Event::Invoke(inv) = e {
                assert!(mode == 0, "a tampered or forged envelope reached user code");
                assert!(
                    inv.context.is_none()
                        || inv.context.as_ref().is_some_and(|c| c.caller_public_key.is_some())
                );
                let _ = engine.reply(now, inv.id, Ok(Value::from("secret result")));
            }
        }
        if mode != 0 {
            assert!(r.is_err(), "mode {mode} frame was accepted");
        }
        while let Some(t) = engine.poll_transmit() {
            if let Transmit::Binary(b) = t {
                let f = decode_frame(&b, &Limits::default()).expect("our frames decode");
                // Anything carrying a payload back to the encrypted caller is sealed.
                if let Some(x) = &f.extra {
                    assert!(x.contains_key("_enc"), "a reply to an encrypted call went out in clear: {x:?}");
                }
            }
        }
        if n % 5 == 0 {
            now += Duration::from_secs(20);
            engine.handle_timeout(now);
            while engine.poll_transmit().is_some() {}
        }
    }
}

/// Parses `text` as the engine parses the server's JSON text frames (exposed for the
/// differential test against serde_json).
pub fn json_parse(text: &str, limits: &Limits) -> Result<Value, alloc::string::String> {
    crate::json::parse(text, limits)
}

/// Any bytes as a JSON text frame: parsing must not panic or exceed its caps, and whatever
/// parses must survive being written back as JSON and parsed again unchanged.
pub fn json_text(data: &[u8]) {
    let limits = Limits { max_depth: 16, max_collection_len: 64, max_str_len: 256, ..Limits::default() };
    let text = alloc::string::String::from_utf8_lossy(data);
    let Ok(v) = crate::json::parse(&text, &limits) else { return };
    let mut out = alloc::string::String::new();
    write_json(&v, &mut out);
    let back = crate::json::parse(&out, &limits).unwrap_or_else(|e| panic!("{out}: {e}"));
    // Compare encodings, not values: NaN != NaN.
    assert_eq!(to_vec(&back), to_vec(&v), "{out} does not read back the same");
}

/// Our values as JSON, the way Python's `json.dumps` writes them (`NaN`, `Infinity`).
fn write_json(v: &Value, out: &mut alloc::string::String) {
    use core::fmt::Write;
    match v {
        Value::Nil => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        Value::F64(x) if x.is_nan() => out.push_str("NaN"),
        Value::F64(x) if x.is_infinite() => out.push_str(if *x > 0.0 { "Infinity" } else { "-Infinity" }),
        // `{:?}` always writes a `.` or an exponent, so it reads back as a float.
        Value::F64(x) => {
            let _ = write!(out, "{x:?}");
        }
        Value::Str(s) => crate::connection::json_str(out, s.as_str()),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(x, out);
            }
            out.push(']');
        }
        Value::Map(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                crate::connection::json_str(out, k.as_str().expect("JSON keys are strings"));
                out.push(':');
                write_json(x, out);
            }
            out.push('}');
        }
        other => panic!("JSON never yields {other:?}"),
    }
}
