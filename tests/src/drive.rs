//! Helpers that drive a single engine by hand: connect it with a scripted server, build
//! server frames, and compare our frames with recorded ones up to random ids.

use std::collections::BTreeMap;

use bytes::Bytes;
use hypha_rpc_core::codec::{Frame, decode_frame, encode_frame};
use hypha_rpc_core::time::Instant;
use hypha_rpc_core::{Engine, EngineConfig, Event, Limits, Map, Transmit, Value};

/// Everything the engine emitted since the last drain.
#[derive(Debug, Default)]
pub struct Drained {
    /// Binary frames, decoded.
    pub frames: Vec<Frame>,
    /// The same frames, as bytes.
    pub bytes: Vec<Bytes>,
    /// Text frames.
    pub texts: Vec<String>,
    /// Close requests.
    pub closes: Vec<(u16, String)>,
    /// Events.
    pub events: Vec<Event>,
}

/// Takes every transmit and event out of `engine`.
pub fn drain(engine: &mut Engine) -> Drained {
    let mut d = Drained::default();
    while let Some(t) = engine.poll_transmit() {
        match t {
            Transmit::Binary(b) => {
                d.frames.push(decode_frame(&b, &Limits::default()).expect("engine wrote an invalid frame"));
                d.bytes.push(b);
            }
            Transmit::Text(s) => d.texts.push(s),
            Transmit::Close { code, reason } => d.closes.push((code, reason)),
        }
    }
    while let Some(e) = engine.poll_event() {
        d.events.push(e);
    }
    d
}

/// A `connection_info` JSON text as the server sends it.
pub fn connection_info(client_id: &str, workspace: &str, manager_id: &str) -> String {
    serde_json::json!({
        "type": "connection_info",
        "hypha_version": "0.21.137",
        "public_base_url": "http://127.0.0.1:9527",
        "local_base_url": "http://127.0.0.1:9527",
        "manager_id": manager_id,
        "workspace": workspace,
        "client_id": client_id,
        "user": {"id": "test-user", "roles": [], "is_anonymous": true},
        "reconnection_token": format!("reconnect-{client_id}"),
        "reconnection_token_life_time": 172800.0,
    })
    .to_string()
}

/// A reply frame from `from` resolving (or rejecting) session `session` of `to`, with the
/// server-set `ws` and `user` appended as the real server does.
pub fn reply_frame(from: &str, to: &str, session: &str, ok: bool, value: Value) -> Bytes {
    let mut main = Map::new();
    main.push("type", "method");
    main.push("from", from);
    main.push("to", to);
    main.push("method", format!("{session}.{}", if ok { "resolve" } else { "reject" }));
    main.push("parent", session);
    main.push("ws", to.split_once('/').map(|(w, _)| w).unwrap_or_default());
    main.push("user", Value::Map(Map::new()));
    let mut extra = Map::new();
    extra.push("args", Value::Array(vec![value]));
    encode_frame(&Frame { main, extra: Some(extra) })
}

/// Connects `engine` through a scripted server: handshake, `connection_info`, and the
/// manager's resolve of the `built-in` registration. Returns the drained output after ready
/// (the subscribe call and any service registrations, still pending).
pub fn connect(
    engine: &mut Engine,
    now: Instant,
    client_id: &str,
    workspace: &str,
    manager_id: &str,
) -> Drained {
    engine.handle_transport_open(now).unwrap();
    let d = drain(engine);
    assert_eq!(d.texts.len(), 1, "one handshake text");
    engine.handle_text(now, &connection_info(client_id, workspace, manager_id)).unwrap();
    let d = drain(engine);
    assert_eq!(d.frames.len(), 1, "exactly the built-in registration: {:?}", d.frames);
    let reg = &d.frames[0];
    assert_eq!(reg.main_str("method"), Some("services.default.register_service"));
    let session = reg.main_str("session").unwrap().to_string();
    let me = format!("{workspace}/{client_id}");
    let manager = format!("*/{manager_id}");
    engine.handle_binary(now, &reply_frame(&manager, &me, &session, true, Value::Nil)).unwrap();
    let d = drain(engine);
    assert!(matches!(d.events.first(), Some(Event::Connected { .. })), "{:?}", d.events);
    d
}

/// A fresh engine with a fixed seed, for scripted tests: no manager answers here, so the
/// periodic registration check is off (tests/tests/registration_check.rs turns it on).
pub fn engine(client_id: &str, seed: u64) -> Engine {
    let mut config = EngineConfig::new(client_id);
    config.seed = seed;
    config.registration_check_interval = None;
    Engine::new(config, Instant::ZERO)
}

fn is_id(s: &str) -> bool {
    s.len() == 22 && s.bytes().all(|c| c.is_ascii_alphanumeric())
}

/// Maps random ids of `recorded` onto the ids at the same places in `ours`: strings that differ
/// only in 22-character id tokens (split on `.`, `#` and `_`) pair those tokens up.
fn align(ours: &Value, recorded: &Value, map: &mut BTreeMap<String, String>) {
    match (ours, recorded) {
        (Value::Str(a), Value::Str(b)) if a != b => {
            let split = |s: &str| s.split(['.', '#', '_']).map(String::from).collect::<Vec<_>>();
            let (pa, pb) = (split(a), split(b));
            if pa.len() == pb.len() {
                for (x, y) in pa.iter().zip(&pb) {
                    if x != y && is_id(x) && is_id(y) {
                        map.insert(y.clone(), x.clone());
                    }
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => a.iter().zip(b).for_each(|(x, y)| align(x, y, map)),
        (Value::Map(a), Value::Map(b)) => {
            a.iter().zip(b.iter()).for_each(|((_, x), (_, y))| align(x, y, map))
        }
        _ => {}
    }
}

/// Replaces every id of `map` inside string values.
pub fn substitute(v: &Value, map: &BTreeMap<String, String>) -> Value {
    match v {
        Value::Str(s) => {
            let mut s = s.to_string();
            for (from, to) in map {
                s = s.replace(from.as_str(), to);
            }
            Value::from(s)
        }
        // Chunks of a large message carry ids inside raw bytes; ids have equal lengths, so a
        // byte-level replacement keeps the chunk's msgpack valid.
        Value::Bin(b) => {
            let mut bytes = b.to_vec();
            for (from, to) in map {
                let (f, t) = (from.as_bytes(), to.as_bytes());
                if f.len() != t.len() || f.is_empty() {
                    continue;
                }
                let mut i = 0;
                while i + f.len() <= bytes.len() {
                    if &bytes[i..i + f.len()] == f {
                        bytes[i..i + f.len()].copy_from_slice(t);
                        i += f.len();
                    } else {
                        i += 1;
                    }
                }
            }
            Value::bin(bytes)
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| substitute(x, map)).collect()),
        Value::Map(m) => {
            Value::Map(m.iter().map(|(k, x)| (k.clone(), substitute(x, map))).collect::<Vec<_>>().into())
        }
        other => other.clone(),
    }
}

/// Frame bytes with ids substituted in both objects.
pub fn substitute_frame(bytes: &[u8], map: &BTreeMap<String, String>) -> Bytes {
    let f = decode_frame(&Bytes::copy_from_slice(bytes), &Limits::default()).unwrap();
    let main = substitute(&Value::Map(f.main), map);
    let extra = f.extra.map(|e| substitute(&Value::Map(e), map));
    let to_map = |v: Value| match v {
        Value::Map(m) => m,
        _ => unreachable!(),
    };
    encode_frame(&Frame { main: to_map(main), extra: extra.map(to_map) })
}

/// Asserts that our frame equals the recorded one byte for byte once the recorded random ids
/// are replaced by ours; learns the id mapping into `ids` for later frames.
pub fn assert_same_up_to_ids(ours: &Bytes, recorded: &[u8], ids: &mut BTreeMap<String, String>, what: &str) {
    let limits = Limits::default();
    let o = decode_frame(ours, &limits).unwrap();
    let r = decode_frame(&Bytes::copy_from_slice(recorded), &limits).unwrap();
    align(&Value::Map(o.main.clone()), &Value::Map(r.main.clone()), ids);
    if let (Some(a), Some(b)) = (&o.extra, &r.extra) {
        align(&Value::Map(a.clone()), &Value::Map(b.clone()), ids);
    }
    let expected = substitute_frame(recorded, ids);
    assert!(
        ours[..] == expected[..],
        "{what}: our frame differs from the recording\n ours:     {:?}\n recorded: {:?}",
        o,
        decode_frame(&expected, &limits).unwrap()
    );
}
