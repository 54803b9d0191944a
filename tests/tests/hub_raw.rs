//! Drives the simulated hub with hand-built raw frames (and recorded transcript frames) to pin down every server behaviour engines will be tested against.

use std::iter;

use bytes::Bytes;
use hypha_rpc_core::codec::{Frame, decode_frame, decode_value, encode_frame};
use hypha_rpc_core::{Limits, Map, Value};
use hypha_rpc_tests::hub::{
    AUTH_TIMEOUT_US, ConnId, Hub, HubConfig, HubOutput, IDLE_TIMEOUT_US, RECENT_DISCONNECT_TTL_US, WsMessage,
    rewrite_frame,
};
use hypha_rpc_tests::transcripts::{self, CapturedFrame};
use serde_json::{Value as Json, json};

const SEC: u64 = 1_000_000;

// ---------------------------------------------------------------------------------------------
// Helpers: a tiny raw client.

fn hub() -> Hub {
    Hub::new(HubConfig::default())
}

fn drain(hub: &mut Hub) -> Vec<(ConnId, HubOutput)> {
    iter::from_fn(|| hub.poll_output()).collect()
}

/// JSON (with `preserve_order`) to a msgpack value, keeping key order.
fn v(j: Json) -> Value {
    match j {
        Json::Null => Value::Nil,
        Json::Bool(b) => b.into(),
        Json::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into(),
            (_, Some(i)) => i.into(),
            _ => n.as_f64().unwrap().into(),
        },
        Json::String(s) => s.into(),
        Json::Array(a) => Value::Array(a.into_iter().map(v).collect()),
        Json::Object(o) => Value::Map(o.into_iter().map(|(k, x)| (k, v(x))).collect()),
    }
}

fn map(j: Json) -> Map {
    match v(j) {
        Value::Map(m) => m,
        other => panic!("not a map: {other:?}"),
    }
}

fn keys(m: &Map) -> Vec<&str> {
    m.keys().map(|k| k.as_str().unwrap()).collect()
}

fn auth(
    client_id: Option<&str>,
    workspace: Option<&str>,
    token: Option<&str>,
    rt: Option<&str>,
) -> WsMessage {
    let j = json!({"client_id": client_id, "workspace": workspace, "token": token, "reconnection_token": rt});
    WsMessage::Text(j.to_string())
}

fn text(out: &HubOutput) -> &str {
    match out {
        HubOutput::Message(WsMessage::Text(t)) => t,
        other => panic!("expected text, got {other:?}"),
    }
}

fn text_json(out: &HubOutput) -> Json {
    serde_json::from_str(text(out)).unwrap()
}

fn bin(out: &HubOutput) -> &Bytes {
    match out {
        HubOutput::Message(WsMessage::Binary(b)) => b,
        other => panic!("expected binary, got {other:?}"),
    }
}

fn frame(out: &HubOutput) -> Frame {
    decode_frame(bin(out), &Limits::default()).unwrap()
}

fn close(code: u16, reason: &str) -> HubOutput {
    HubOutput::Close { code, reason: reason.into() }
}

fn error_then_close(outs: &[(ConnId, HubOutput)], conn: ConnId, code: u16, reason: &str) {
    assert_eq!(outs.len(), 2, "{outs:?}");
    assert_eq!(outs[0].0, conn);
    assert_eq!(text_json(&outs[0].1), json!({"type": "error", "message": reason}));
    assert_eq!(outs[1], (conn, close(code, reason)));
}

#[derive(Debug, Clone)]
struct Peer {
    conn: ConnId,
    ws: String,
    client: String,
    info: Json,
}

impl Peer {
    fn full(&self) -> String {
        format!("{}/{}", self.ws, self.client)
    }
}

fn connect(hub: &mut Hub, now: u64, client: &str, workspace: Option<&str>, token: Option<&str>) -> Peer {
    let conn = hub.open(now);
    hub.handle_message(now, conn, auth(Some(client), workspace, token, None));
    let outs = drain(hub);
    assert_eq!(outs.len(), 1, "{outs:?}");
    assert_eq!(outs[0].0, conn);
    let info = text_json(&outs[0].1);
    assert_eq!(info["type"], "connection_info", "{info}");
    Peer { conn, ws: info["workspace"].as_str().unwrap().into(), client: client.into(), info }
}

fn send(hub: &mut Hub, now: u64, peer: &Peer, bytes: Bytes) -> Vec<(ConnId, HubOutput)> {
    hub.handle_message(now, peer.conn, WsMessage::Binary(bytes));
    drain(hub)
}

fn raw_frame(main: Json, extra: Option<Json>) -> Bytes {
    encode_frame(&Frame { main: map(main), extra: extra.map(map) })
}

fn mgr(hub: &Hub) -> String {
    format!("*/{}", hub.manager_id())
}

/// A `services.default.<name>` call with a compact promise, as Python sends it.
fn mgr_call(
    hub: &mut Hub,
    now: u64,
    peer: &Peer,
    session: &str,
    name: &str,
    args: Json,
) -> Vec<(ConnId, HubOutput)> {
    let mut extra = json!({"args": args});
    let kwargs = extra["args"].as_array().unwrap().last().is_some_and(|a| a.get("__kwargs__").is_some());
    if kwargs {
        let mut kw = extra["args"].as_array_mut().unwrap().pop().unwrap();
        kw.as_object_mut().unwrap().remove("__kwargs__");
        extra["args"].as_array_mut().unwrap().push(kw);
        extra["with_kwargs"] = json!(true);
    }
    extra["promise"] = json!("*");
    extra["t"] = json!(15.0);
    let main = json!({"type": "method", "from": peer.full(), "to": mgr(hub),
                      "method": format!("services.default.{name}"), "session": session});
    send(hub, now, peer, raw_frame(main, Some(extra)))
}

/// The settled value of `session` in the frames delivered to `conn`: `Ok` for resolve.
fn settled(outs: &[(ConnId, HubOutput)], conn: ConnId, session: &str) -> Result<Value, Value> {
    for (c, out) in outs {
        let HubOutput::Message(WsMessage::Binary(_)) = out else { continue };
        let f = frame(out);
        let method = f.main_str("method").unwrap_or_default().to_string();
        let arg = || f.extra.as_ref().unwrap().get("args").unwrap().as_array().unwrap()[0].clone();
        if *c == conn && method == format!("{session}.resolve") {
            assert_eq!(f.main_str("parent"), Some(session));
            return Ok(arg());
        }
        if *c == conn && method == format!("{session}.reject") {
            return Err(arg());
        }
    }
    panic!("{session} not settled in {outs:?}")
}

fn rvalue(err: &Value) -> &str {
    assert_eq!(err.rtype(), Some("error"), "{err:?}");
    err.as_map().unwrap().get("_rvalue").unwrap().as_str().unwrap()
}

fn builtin_info(p: &Peer) -> Json {
    json!({"config": {"require_context": true, "visibility": "public", "api_version": 3, "workspace": p.ws},
           "id": format!("{}:built-in", p.full()), "name": format!("Builtin services for {}", p.full()),
           "description": null, "type": "built-in", "docs": null, "app_id": "*", "service_schema": {}})
}

fn service_info(p: &Peer, name: &str, visibility: &str) -> Json {
    json!({"config": {"visibility": visibility, "require_context": false, "workspace": p.ws},
           "id": format!("{}:{name}", p.full()), "name": name, "description": "a test service",
           "type": "generic", "docs": null, "app_id": "*", "service_schema": {}})
}

fn register(hub: &mut Hub, now: u64, p: &Peer, info: Json) -> Result<Value, Value> {
    let outs = mgr_call(hub, now, p, "REGxxxxxxxxxxxxxxxxxxx", "register_service", json!([info]));
    settled(&outs, p.conn, "REGxxxxxxxxxxxxxxxxxxx")
}

fn subscribe(hub: &mut Hub, now: u64, p: &Peer, events: Json) {
    let outs = mgr_call(hub, now, p, "SUBxxxxxxxxxxxxxxxxxxx", "subscribe", json!([events]));
    assert_eq!(settled(&outs, p.conn, "SUBxxxxxxxxxxxxxxxxxxx"), Ok(Value::Bool(true)));
}

// ---------------------------------------------------------------------------------------------
// Handshake.

#[test]
fn anonymous_handshake_sends_connection_info_in_server_order() {
    let mut hub = hub();
    let conn = hub.open(0);
    hub.handle_message(0, conn, auth(Some("py-peer"), None, None, None));
    let outs = drain(&mut hub);
    assert_eq!(outs.len(), 1);
    let raw = text(&outs[0].1);
    assert!(raw.starts_with(r#"{"type": "connection_info", "hypha_version": "0.21.137", "#), "{raw}");
    let info = text_json(&outs[0].1);
    let order: Vec<&str> = info.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        order,
        [
            "type",
            "hypha_version",
            "public_base_url",
            "local_base_url",
            "manager_id",
            "workspace",
            "client_id",
            "user",
            "reconnection_token",
            "reconnection_token_life_time"
        ]
    );
    let user = &info["user"];
    let user_id = user["id"].as_str().unwrap();
    assert!(user_id.starts_with("anonymouz-"), "{user_id}");
    let ws = format!("ws-user-{user_id}");
    assert_eq!(info["workspace"], json!(ws));
    assert_eq!(info["manager_id"], json!(hub.manager_id()));
    assert_eq!(info["public_base_url"], json!("http://127.0.0.1:9527"));
    assert_eq!(info["reconnection_token_life_time"], json!(172800.0));
    assert_eq!(info["reconnection_token"], json!(format!("hubreconnect:{ws}/py-peer:{user_id}")));
    assert_eq!(
        user,
        &json!({"id": user_id, "roles": ["anonymous"], "is_anonymous": true,
                "scope": {"current_workspace": ws, "workspaces": {ws.clone(): "a"}, "client_id": "py-peer",
                          "extra_scopes": null},
                "email": null, "parent": null, "expires_at": 600.0, "current_workspace": null})
    );
    assert_eq!(hub.connection_client(conn), Some(format!("{ws}/py-peer")));
}

#[test]
fn handshake_failures_close_with_the_server_codes() {
    let mut hub = hub();
    let decode = "Failed to decode authentication information";

    let c = hub.open(0);
    hub.handle_message(0, c, WsMessage::Text("{not json".into()));
    error_then_close(&drain(&mut hub), c, 1003, decode);
    assert!(!hub.is_open(c));
    hub.handle_message(0, c, auth(Some("late"), None, None, None));
    assert!(drain(&mut hub).is_empty(), "a closed connection is ignored");

    let c = hub.open(0);
    hub.handle_message(0, c, WsMessage::Binary(Bytes::from_static(&[0x80])));
    assert_eq!(drain(&mut hub), [(c, close(1003, decode))]);

    let c = hub.open(0);
    hub.handle_message(0, c, auth(None, None, None, None));
    let outs = drain(&mut hub);
    let reason = text_json(&outs[0].1)["message"].as_str().unwrap().to_string();
    assert!(
        reason.starts_with(
            "Failed to establish connection: Failed to authenticate user to workspace: ws-user-"
        )
    );
    error_then_close(&outs, c, 1001, &reason);

    let c = hub.open(0);
    hub.handle_message(0, c, auth(Some("a/b"), None, None, None));
    error_then_close(&drain(&mut hub), c, 1001, "Failed to establish connection: Invalid client id: a/b");

    let c = hub.open(0);
    hub.handle_message(0, c, auth(Some("x"), None, Some("garbage"), None));
    error_then_close(&drain(&mut hub), c, 1008, "Authentication error: Invalid token");

    let c = hub.open(0);
    hub.handle_message(0, c, auth(Some("x"), None, None, Some("hubreconnect:nope/x:y")));
    error_then_close(&drain(&mut hub), c, 1008, "Authentication error: Invalid token");

    // An anonymous user may not join someone else's workspace.
    let c = hub.open(0);
    hub.handle_message(0, c, auth(Some("x"), Some("ws-user-somebody"), None, None));
    error_then_close(
        &drain(&mut hub),
        c,
        1001,
        "Failed to establish connection: Permission denied for workspace: ws-user-somebody",
    );

    // A token scoped to one workspace cannot join another.
    let c = hub.open(0);
    hub.handle_message(0, c, auth(Some("x"), Some("ws-b"), Some("hubtoken:ws-a:alice"), None));
    error_then_close(
        &drain(&mut hub),
        c,
        1001,
        "Failed to establish connection: Failed to authenticate user: Current workspace encoded in the token (ws-a) does not match the specified workspace (ws-b)",
    );

    // Duplicate client ids are refused while the first one is connected.
    let first = connect(&mut hub, 0, "dup", None, Some("hubtoken:ws-a:alice"));
    let c = hub.open(0);
    hub.handle_message(0, c, auth(Some("dup"), None, Some("hubtoken:ws-a:alice"), None));
    error_then_close(
        &drain(&mut hub),
        c,
        1001,
        "Failed to establish connection: Client already exists and is active: ws-a/dup",
    );
    assert_eq!(hub.connection_client(first.conn).as_deref(), Some("ws-a/dup"));

    // No authentication frame within 5 s.
    let c = hub.open(10 * SEC);
    hub.tick(10 * SEC + AUTH_TIMEOUT_US - 1);
    assert!(drain(&mut hub).is_empty());
    hub.tick(10 * SEC + AUTH_TIMEOUT_US);
    error_then_close(&drain(&mut hub), c, 1008, "Authentication payload timeout");
}

#[test]
fn text_control_frames() {
    let mut hub = hub();
    let p = connect(&mut hub, 0, "c", None, None);
    hub.handle_message(SEC, p.conn, WsMessage::Text(r#"{"type": "ping"}"#.into()));
    assert_eq!(
        drain(&mut hub),
        [(p.conn, HubOutput::Message(WsMessage::Text(r#"{"type": "pong"}"#.into())))]
    );

    hub.handle_message(SEC, p.conn, WsMessage::Text(r#"{"type":"refresh_token"}"#.into()));
    let outs = drain(&mut hub);
    let j = text_json(&outs[0].1);
    assert_eq!(j.as_object().unwrap().keys().collect::<Vec<_>>(), ["type", "reconnection_token"]);
    assert_eq!(j["type"], "reconnection_token");
    assert_eq!(j["reconnection_token"], p.info["reconnection_token"]);

    // Unknown types and over-long frames get no answer.
    hub.handle_message(SEC, p.conn, WsMessage::Text(r#"{"type": "hello"}"#.into()));
    let long = format!(r#"{{"type": "ping", "pad": "{}"}}"#, "x".repeat(1000));
    hub.handle_message(SEC, p.conn, WsMessage::Text(long));
    hub.handle_message(SEC, p.conn, WsMessage::Text("not json".into()));
    assert!(drain(&mut hub).is_empty());

    // A JSON value that is not an object kills the server's handler: 1001.
    hub.handle_message(SEC, p.conn, WsMessage::Text("[]".into()));
    error_then_close(&drain(&mut hub), p.conn, 1001, &format!("Client {} disconnected", p.full()));
}

// ---------------------------------------------------------------------------------------------
// Routing and the rewrite of `main`.

#[test]
fn routing_rewrites_main_and_copies_extra_byte_for_byte() {
    let mut hub = hub();
    let a = connect(&mut hub, 0, "a", Some("ws-t"), Some("hubtoken:ws-t:alice"));
    let b = connect(&mut hub, 0, "b", Some("ws-t"), Some("hubtoken:ws-t:bob"));

    // `from` is forged, `to` is bare, the extra has a float32 and a bin.
    let main = json!({"type": "method", "from": "ws-evil/mallory", "to": "b", "method": "services.s.f",
                      "session": "S1"});
    let mut extra = map(json!({"args": [1, "two"], "promise": "*", "t": 15.0}));
    extra.insert("f32", Value::F32(1.5));
    extra.insert("raw", Value::bin(vec![0xc1u8, 0, 1]));
    let sent = encode_frame(&Frame { main: map(main), extra: Some(extra) });
    let main_len = decode_value(&sent, &Limits::default()).unwrap().1;
    let outs = send(&mut hub, 1, &a, sent.clone());
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].0, b.conn);
    let delivered = bin(&outs[0].1).clone();
    let (got_main, got_len) = decode_value(&delivered, &Limits::default()).unwrap();
    let got_main = got_main.as_map().unwrap().clone();
    assert_eq!(keys(&got_main), ["type", "from", "to", "method", "session", "ws", "user"]);
    assert_eq!(got_main.get("from"), Some(&Value::from("ws-t/a")));
    assert_eq!(got_main.get("to"), Some(&Value::from("ws-t/b")));
    assert_eq!(got_main.get("ws"), Some(&Value::from("ws-t")));
    assert_eq!(got_main.get("user"), hub.connection_user(a.conn).as_ref());
    assert_eq!(&delivered[got_len..], &sent[main_len..], "extra must pass through untouched");
    assert_eq!(hub.frames_routed(), 1);

    // Without `from`, the server's dict update appends ws, from, user in that order; a float32
    // in main is re-packed as float64 and a repeated key keeps its first position.
    let mut main = map(json!({"type": "method", "to": "ws-t/b", "method": "m"}));
    main.push("x", Value::F32(0.5));
    main.push("type", "event");
    let outs = send(&mut hub, 2, &a, encode_frame(&Frame { main, extra: None }));
    let f = frame(&outs[0].1);
    assert_eq!(keys(&f.main), ["type", "to", "method", "x", "ws", "from", "user"]);
    assert_eq!(f.main.get("x"), Some(&Value::F64(0.5)));
    assert_eq!(f.main_str("type"), Some("event"));
    assert!(f.extra.is_none());

    // A malformed frame is dropped; the connection stays usable.
    let outs = send(&mut hub, 3, &a, Bytes::from_static(&[0x85, 0xa4, b't']));
    assert!(outs.is_empty());
    let mut bad_key = Map::new();
    bad_key.push(1, "x");
    bad_key.push("to", "ws-t/b");
    assert!(send(&mut hub, 3, &a, encode_frame(&Frame { main: bad_key, extra: None })).is_empty());
    assert!(send(&mut hub, 3, &a, raw_frame(json!({"type": "method", "method": "m"}), None)).is_empty());
    assert!(hub.is_open(a.conn));
    assert_eq!(hub.frames_routed(), 2);
}

#[test]
fn frames_to_departed_peers_are_rejected_only_if_recent_and_with_session() {
    let mut hub = hub();
    let a = connect(&mut hub, 0, "a", Some("ws-t"), Some("hubtoken:ws-t:alice"));
    let b = connect(&mut hub, 0, "b", Some("ws-t"), Some("hubtoken:ws-t:bob"));
    hub.handle_close(SEC, b.conn);
    assert!(drain(&mut hub).is_empty(), "nobody subscribed to client_disconnected");

    let call = |to: &str, session: Option<&str>| {
        let mut main = json!({"type": "method", "from": "forged", "to": to, "method": "services.s.f"});
        if let Some(s) = session {
            main["session"] = json!(s);
        }
        raw_frame(main, Some(json!({"args": [], "promise": "*", "t": 15.0})))
    };
    let outs = send(&mut hub, 2 * SEC, &a, call("b", Some("SESS")));
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].0, a.conn);
    let f = frame(&outs[0].1);
    // The reject echoes the *original* to/from and has no parent, ws or user.
    assert_eq!(f.main, map(json!({"type": "method", "from": "b", "to": "forged", "method": "SESS.reject"})));
    assert_eq!(
        f.extra.unwrap(),
        map(
            json!({"args": [{"_rtype": "error", "_rvalue": "Target peer ws-t/b is not connected", "_rtrace": ""}]})
        )
    );

    assert!(send(&mut hub, 2 * SEC, &a, call("b", None)).is_empty(), "fire-and-forget: silent");
    assert!(send(&mut hub, 2 * SEC, &a, call("ws-t/never", Some("S"))).is_empty(), "unknown: silent");
    let later = SEC + RECENT_DISCONNECT_TTL_US + 1;
    assert!(send(&mut hub, later, &a, call("b", Some("S"))).is_empty(), "forgotten after 120 s");
    assert_eq!(hub.frames_routed(), 0);

    let mut hub = Hub::new(HubConfig { send_peer_not_found: true, ..HubConfig::default() });
    let a = connect(&mut hub, 0, "a", Some("ws-t"), Some("hubtoken:ws-t:alice"));
    let b = connect(&mut hub, 0, "b", Some("ws-t"), Some("hubtoken:ws-t:bob"));
    hub.handle_close(SEC, b.conn);
    let outs = send(&mut hub, 2 * SEC, &a, call("ws-t/b", Some("SESS")));
    let f = frame(&outs[0].1);
    assert!(f.extra.is_none());
    assert_eq!(
        f.main,
        map(json!({"type": "peer_not_found", "session": "SESS", "peer_id": "ws-t/b",
                   "error": "Target peer ws-t/b is not connected"}))
    );
}

#[test]
fn client_broadcasts_reach_subscribers_of_the_type() {
    let mut hub = hub();
    let a = connect(&mut hub, 0, "a", Some("ws-t"), Some("hubtoken:ws-t:alice"));
    let b = connect(&mut hub, 0, "b", Some("ws-t"), Some("hubtoken:ws-t:bob"));
    let c = connect(&mut hub, 0, "c", Some("ws-t"), Some("hubtoken:ws-t:carol"));
    let other = connect(&mut hub, 0, "d", Some("ws-u"), Some("hubtoken:ws-u:dave"));
    subscribe(&mut hub, 0, &b, json!("my-event"));
    subscribe(&mut hub, 0, &other, json!(["my-event"]));
    assert_eq!(hub.subscriptions(b.conn), ["my-event"]);
    let outs = send(&mut hub, 1, &a, raw_frame(json!({"type": "my-event", "to": "*", "data": 1}), None));
    assert_eq!(outs.len(), 1, "only b: c is not subscribed, d is in another workspace");
    assert_eq!(outs[0].0, b.conn);
    let f = frame(&outs[0].1);
    assert_eq!(f.main_str("to"), Some("ws-t/*"));
    assert_eq!(f.main_str("from"), Some("ws-t/a"));
    let _ = c;

    // A read-only client may not broadcast.
    let owner = connect(&mut hub, 0, "owner", None, None);
    let read_token = token(&mut hub, &owner, json!({"permission": "read"}));
    let ro = connect(&mut hub, 0, "ro", Some(&owner.ws), Some(&read_token));
    assert_eq!(ro.info["user"]["scope"]["workspaces"][&owner.ws], json!("r"));
    let main = json!({"type": "my-event", "to": "*", "session": "RO"});
    let outs = send(&mut hub, 1, &ro, raw_frame(main, None));
    let f = frame(&outs[0].1);
    assert_eq!(outs[0].0, ro.conn);
    assert_eq!(f.main_str("method"), Some("RO.reject"));
}

/// Mints a token through the manager as `admin` (who must be an admin of its workspace).
fn token(hub: &mut Hub, admin: &Peer, config: Json) -> String {
    let outs = mgr_call(hub, 0, admin, "TOKxxxxxxxxxxxxxxxxxxx", "generate_token", json!([config]));
    settled(&outs, admin.conn, "TOKxxxxxxxxxxxxxxxxxxx").unwrap().as_str().unwrap().to_string()
}

#[test]
fn rate_limit_and_oversized_frames_close_the_connection() {
    let mut hub = hub();
    let a = connect(&mut hub, 0, "a", None, None);
    let ping = raw_frame(json!({"type": "x", "to": "nobody"}), None);
    for _ in 0..2000 {
        assert!(send(&mut hub, 0, &a, ping.clone()).is_empty());
    }
    // 200 frames/s refill: 5 ms buys one more frame.
    assert!(send(&mut hub, 5_000, &a, ping.clone()).is_empty());
    let outs = send(&mut hub, 5_000, &a, ping.clone());
    error_then_close(&outs, a.conn, 1008, "Rate limit exceeded: too many messages per second");

    let b = connect(&mut hub, 0, "b", None, None);
    let huge = Bytes::from(vec![0u8; 16 * 1024 * 1024 + 1]);
    assert_eq!(send(&mut hub, 0, &b, huge), [(b.conn, close(1009, "Message too big"))]);
}

#[test]
fn idle_connections_are_closed_after_600_s_of_silence() {
    let mut hub = hub();
    let a = connect(&mut hub, 0, "a", None, None);
    hub.handle_message(100 * SEC, a.conn, WsMessage::Text(r#"{"type": "ping"}"#.into()));
    drain(&mut hub);
    assert_eq!(hub.next_deadline(), Some(100 * SEC + IDLE_TIMEOUT_US));
    hub.tick(100 * SEC + IDLE_TIMEOUT_US - 1);
    assert!(drain(&mut hub).is_empty());
    hub.tick(100 * SEC + IDLE_TIMEOUT_US);
    error_then_close(&drain(&mut hub), a.conn, 1001, "Idle timeout (600s)");
    assert_eq!(hub.connection_client(a.conn), None);
}

// ---------------------------------------------------------------------------------------------
// The workspace manager.

#[test]
fn manager_service_is_served_by_built_in_get_service() {
    let mut hub = hub();
    let p = connect(&mut hub, 0, "py-peer", None, None);
    let s = "6wQUg5Vfhi3YnvoNNdfsTY";
    let slot = |n: &str| json!({"_rtype": "method", "_rtarget": "py-peer", "_rmethod": format!("{s}.{n}"), "_rpromise": false});
    let extra = json!({"args": ["default"], "promise": {"heartbeat": slot("heartbeat"), "interval": 15.0,
                       "resolve": slot("resolve"), "reject": slot("reject")}});
    let main = json!({"type": "method", "from": p.full(), "to": mgr(&hub), "method": "services.built-in.get_service",
                      "session": s});
    let outs = send(&mut hub, 0, &p, raw_frame(main, Some(extra)));
    assert_eq!(outs.len(), 1, "no heartbeat for the manager's own built-in");
    let f = frame(&outs[0].1);
    assert_eq!(keys(&f.main), ["type", "from", "to", "method", "parent", "ws", "user"]);
    assert_eq!(f.main_str("from"), Some(mgr(&hub).as_str()));
    assert_eq!(f.main_str("to"), Some(p.full().as_str()));
    assert_eq!(f.main_str("ws"), Some(p.ws.as_str()));
    assert_eq!(f.main.get("user").unwrap().as_map().unwrap().get("id"), Some(&Value::from("root")));
    let svc = settled(&outs, p.conn, s).unwrap();
    let svc = svc.as_map().unwrap();
    let k = keys(svc);
    assert_eq!(&k[..4], ["id", "name", "description", "config"]);
    assert_eq!(k.len(), 4 + 32 + 1);
    assert_eq!(k.last(), Some(&"type"));
    let echo = svc.get("echo").unwrap().as_map().unwrap();
    assert_eq!(
        keys(echo),
        ["_rtype", "_rserver", "_rtarget", "_rmethod", "_rpromise", "_rname", "_rasync", "_rdoc", "_rschema"]
    );
    assert_eq!(echo.get("_rtarget"), Some(&Value::from(mgr(&hub))));
    assert_eq!(echo.get("_rmethod"), Some(&Value::from("services.default.echo")));
}

#[test]
fn echo_heartbeats_first_then_resolves() {
    let mut hub = hub();
    let p = connect(&mut hub, 0, "c", None, None);
    let outs = mgr_call(&mut hub, 0, &p, "S", "echo", json!([{"a": [1, 2.5, null]}]));
    assert_eq!(outs.len(), 2);
    let hb = frame(&outs[0].1);
    assert!(hb.extra.is_none());
    assert_eq!(keys(&hb.main), ["type", "from", "to", "method", "parent", "ws", "user"]);
    assert_eq!(hb.main_str("method"), Some("S.heartbeat"));
    assert_eq!(settled(&outs, p.conn, "S"), Ok(v(json!({"a": [1, 2.5, null]}))));

    // kwargs arrive as a trailing map with with_kwargs; unknown kwargs are a TypeError.
    let outs = mgr_call(&mut hub, 0, &p, "K", "echo", json!([{"data": "kw", "__kwargs__": true}]));
    assert_eq!(settled(&outs, p.conn, "K"), Ok("kw".into()));
    let outs = mgr_call(&mut hub, 0, &p, "E", "echo", json!([{"nope": 1, "__kwargs__": true}]));
    assert!(rvalue(&settled(&outs, p.conn, "E").unwrap_err()).contains("unexpected keyword argument 'nope'"));
    let outs = mgr_call(&mut hub, 0, &p, "U", "get_summary", json!([]));
    assert!(rvalue(&settled(&outs, p.conn, "U").unwrap_err()).contains("NotImplementedError"));

    // Unknown method: a dispatch reject without heartbeat.
    let main = json!({"type": "method", "from": p.full(), "to": mgr(&hub), "method": "services.default.nope",
                      "session": "N"});
    let outs = send(&mut hub, 0, &p, raw_frame(main, Some(json!({"promise": "*", "t": 15.0}))));
    assert_eq!(outs.len(), 1);
    let err = settled(&outs, p.conn, "N").unwrap_err();
    assert_eq!(rvalue(&err), format!("Method expired or not found: {}:services.default.nope", p.full()));

    // A compact promise without `t` is dropped by the Python callee.
    let main = json!({"type": "method", "from": p.full(), "to": mgr(&hub), "method": "services.default.echo",
                      "session": "T"});
    assert!(send(&mut hub, 0, &p, raw_frame(main, Some(json!({"args": [1], "promise": "*"})))).is_empty());
}

#[test]
fn register_requires_built_in_first_and_list_services_reports_infos() {
    let mut hub = hub();
    let p = connect(&mut hub, 0, "prov", None, None);
    assert_eq!(register(&mut hub, 0, &p, service_info(&p, "early", "public")), Ok(Value::Nil));
    assert!(hub.services().is_empty(), "dropped silently before built-in");
    assert_eq!(hub.dropped_registrations(), 1);

    assert_eq!(register(&mut hub, 0, &p, builtin_info(&p)), Ok(Value::Nil));
    assert_eq!(register(&mut hub, 0, &p, service_info(&p, "svc", "protected")), Ok(Value::Nil));
    let mut rintf = service_info(&p, "_rintf_abc", "protected");
    rintf["config"]["_local_only"] = json!(true);
    assert_eq!(register(&mut hub, 0, &p, rintf), Ok(Value::Nil));
    let mut local_only = service_info(&p, "lo", "protected");
    local_only["config"]["_local_only"] = json!(true);
    assert_eq!(register(&mut hub, 0, &p, local_only), Ok(Value::Nil));
    assert_eq!(hub.services(), [format!("{}:built-in", p.full()), format!("{}:svc", p.full())]);

    // Another workspace cannot be targeted.
    let mut foreign = service_info(&p, "x", "public");
    foreign["id"] = json!("ws-other/prov:x");
    assert!(
        rvalue(&register(&mut hub, 0, &p, foreign).unwrap_err())
            .contains("does not match the current workspace")
    );

    let outs = mgr_call(&mut hub, 0, &p, "L", "list_services", json!([]));
    let list = settled(&outs, p.conn, "L").unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let svc = list[1].as_map().unwrap();
    assert_eq!(
        keys(svc),
        ["config", "id", "name", "type", "description", "docs", "app_id", "service_schema"]
    );
    let cfg = svc.get("config").unwrap().as_map().unwrap();
    assert_eq!(
        keys(cfg),
        [
            "visibility",
            "require_context",
            "workspace",
            "flags",
            "singleton",
            "created_by",
            "service_embedding",
            "authorized_workspaces"
        ]
    );
    assert_eq!(cfg.get("created_by"), Some(&v(json!({"id": p.info["user"]["id"]}))));
    let builtin_cfg = list[0].as_map().unwrap().get("config").unwrap().as_map().unwrap();
    assert_eq!(builtin_cfg.get("api_version"), Some(&Value::from(3)), "extra config keys are kept");

    // A string query and list_clients.
    let outs = mgr_call(&mut hub, 0, &p, "Q", "list_services", json!(["prov:svc"]));
    assert_eq!(settled(&outs, p.conn, "Q").unwrap().as_array().unwrap().len(), 1);
    let outs = mgr_call(&mut hub, 0, &p, "C", "list_clients", json!([]));
    let clients = settled(&outs, p.conn, "C").unwrap();
    assert_eq!(clients.as_array().unwrap()[0].as_map().unwrap().get("id"), Some(&Value::from(p.full())));

    // unregister_service by local id.
    let outs = mgr_call(&mut hub, 0, &p, "D", "unregister_service", json!(["svc"]));
    assert_eq!(settled(&outs, p.conn, "D"), Ok(Value::Nil));
    assert_eq!(hub.services(), [format!("{}:built-in", p.full())]);
}

/// The provider side: answers the manager's forwarded `built-in.get_service`.
fn provider_answer(
    hub: &mut Hub,
    outs: &[(ConnId, HubOutput)],
    provider: &Peer,
    answer: Result<Json, &str>,
) -> String {
    let (_, out) = outs.iter().find(|(c, _)| *c == provider.conn).expect("forwarded to the provider");
    let f = frame(out);
    assert_eq!(keys(&f.main), ["type", "from", "to", "method", "session", "ws", "user"]);
    assert_eq!(f.main_str("method"), Some("services.built-in.get_service"));
    let session = f.main_str("session").unwrap().to_string();
    let extra = f.extra.unwrap();
    let promise = extra.get("promise").unwrap().as_map().unwrap();
    assert_eq!(keys(promise), ["heartbeat", "interval", "resolve", "reject"]);
    let resolve = promise.get("resolve").unwrap().as_map().unwrap();
    assert_eq!(resolve.get("_rtarget"), Some(&Value::from(hub.manager_id())), "bare manager id");
    let (slot, value) = match answer {
        Ok(svc) => ("resolve", svc),
        Err(msg) => ("reject", json!({"_rtype": "error", "_rvalue": msg, "_rtrace": ""})),
    };
    let main = json!({"type": "method", "from": provider.full(), "to": mgr(hub),
                      "method": format!("{session}.{slot}"), "parent": session});
    hub.handle_message(1, provider.conn, WsMessage::Binary(raw_frame(main, Some(json!({"args": [value]})))));
    extra.get("args").unwrap().as_array().unwrap()[0].as_str().unwrap().to_string()
}

#[test]
fn get_service_round_trip_through_a_provider() {
    let mut hub = hub();
    let p = connect(&mut hub, 0, "prov", Some("ws-t"), Some("hubtoken:ws-t:alice"));
    let c = connect(&mut hub, 0, "caller", Some("ws-t"), Some("hubtoken:ws-t:bob"));
    register(&mut hub, 0, &p, builtin_info(&p)).unwrap();
    register(&mut hub, 0, &p, service_info(&p, "interop", "public")).unwrap();

    let served = json!({"id": "interop", "name": "interop", "description": "a test service",
        "config": {"visibility": "public", "require_context": false},
        "add": {"_rtype": "method", "_rserver": "http://127.0.0.1:9527", "_rtarget": "ws-t/prov",
                "_rmethod": "services.interop.add", "_rpromise": "*", "_rname": "add", "_rasync": false, "_rdoc": null},
        "nested": {"cb": {"_rtype": "method", "_rtarget": "prov", "_rmethod": "services.interop.nested.cb"}},
        "type": "generic"});

    for (i, id) in
        ["ws-t/prov:interop", "interop", "prov:interop", "ws-t/interop", "interop@*"].iter().enumerate()
    {
        let session = format!("G{i}");
        let args = json!([id, {"config": {}, "__kwargs__": true}]);
        let outs = mgr_call(&mut hub, 0, &c, &session, "get_service", args);
        assert_eq!(outs.len(), 2, "heartbeat to the caller, call to the provider: {outs:?}");
        assert_eq!(frame(&outs[0].1).main_str("method"), Some(format!("{session}.heartbeat").as_str()));
        assert_eq!(provider_answer(&mut hub, &outs, &p, Ok(served.clone())), "interop");
        let outs = drain(&mut hub);
        let svc = settled(&outs, c.conn, &session).unwrap();
        let svc = svc.as_map().unwrap();
        assert_eq!(keys(svc), ["id", "name", "description", "config", "add", "nested", "type"]);
        assert_eq!(svc.get("id"), Some(&Value::from("ws-t/prov:interop")));
        assert_eq!(
            svc.get("config"),
            Some(&v(json!({"visibility": "public", "require_context": false, "workspace": "ws-t",
                           "url": "http://127.0.0.1:9527/ws-t/services/prov:interop"})))
        );
        assert_eq!(svc.get("add"), Some(&v(served["add"].clone())), "descriptors are forwarded verbatim");
        let cb = svc.get("nested").unwrap().as_map().unwrap().get("cb").unwrap().as_map().unwrap();
        assert_eq!(cb.get("_rtarget"), Some(&Value::from("ws-t/prov")), "bare targets are qualified");
    }

    // The provider rejects.
    let outs = mgr_call(&mut hub, 0, &c, "R", "get_service", json!(["interop"]));
    provider_answer(&mut hub, &outs, &p, Err("Service not found: interop"));
    let err = settled(&drain(&mut hub), c.conn, "R").unwrap_err();
    assert!(rvalue(&err).contains("RemoteError:Service not found: interop"), "{err:?}");

    // Unknown service, protected service of another workspace.
    let outs = mgr_call(&mut hub, 0, &c, "NF", "get_service", json!(["missing"]));
    assert!(
        rvalue(&settled(&outs, c.conn, "NF").unwrap_err())
            .contains("KeyError: Service not found: ws-t/*:missing@*")
    );

    // The provider disconnects while the manager waits.
    let outs = mgr_call(&mut hub, 0, &c, "GONE", "get_service", json!(["interop"]));
    assert_eq!(outs.len(), 2);
    hub.handle_close(2, p.conn);
    let err = settled(&drain(&mut hub), c.conn, "GONE").unwrap_err();
    assert!(rvalue(&err).contains("Client disconnected: ws-t/prov"), "{err:?}");
    assert!(hub.services().is_empty(), "the provider's services go with it");
}

#[test]
fn get_service_times_out_and_keeps_the_caller_alive_with_heartbeats() {
    let mut hub = hub();
    let p = connect(&mut hub, 0, "prov", Some("ws-t"), Some("hubtoken:ws-t:alice"));
    let c = connect(&mut hub, 0, "caller", Some("ws-t"), Some("hubtoken:ws-t:bob"));
    register(&mut hub, 0, &p, builtin_info(&p)).unwrap();
    register(&mut hub, 0, &p, service_info(&p, "slow", "protected")).unwrap();
    let outs = mgr_call(&mut hub, 0, &c, "S", "get_service", json!(["slow", {"timeout": 40.0}]));
    assert_eq!(outs.len(), 2);
    hub.tick(15 * SEC);
    let outs = drain(&mut hub);
    assert_eq!(outs.len(), 1);
    assert_eq!(frame(&outs[0].1).main_str("method"), Some("S.heartbeat"));
    hub.tick(40 * SEC);
    let outs = drain(&mut hub);
    let err = settled(&outs, c.conn, "S").unwrap_err();
    assert!(rvalue(&err).contains("TimeoutError: Failed to get remote service: ws-t/prov:slow"), "{err:?}");
    // A late answer is ignored.
    hub.tick(100 * SEC);
    assert!(drain(&mut hub).is_empty());
}

#[test]
fn generated_tokens_join_the_workspace_as_a_child_user() {
    let mut hub = hub();
    let owner = connect(&mut hub, 0, "owner", None, None);
    let tok = token(&mut hub, &owner, json!({"expires_in": 86400, "permission": "read_write"}));
    assert!(tok.starts_with(&format!("hubtoken:{}:", owner.ws)), "{tok}");
    let guest = connect(&mut hub, 0, "guest", Some(&owner.ws), Some(&tok));
    assert_eq!(guest.ws, owner.ws);
    let user = &guest.info["user"];
    let gid = user["id"].as_str().unwrap();
    assert_eq!(user["parent"], owner.info["user"]["id"]);
    assert_eq!(user["roles"], json!(["anonymous"]));
    assert_eq!(user["expires_at"], json!(86400.0));
    assert_eq!(user["current_workspace"], json!(owner.ws));
    assert_eq!(
        user["scope"],
        json!({"current_workspace": owner.ws, "workspaces": {owner.ws.clone(): "rw", format!("ws-user-{gid}"): "a"},
               "client_id": "guest", "extra_scopes": []})
    );
    // A child of the owner counts as owner of the workspace and may mint tokens; another
    // read-write user may not.
    let outs = mgr_call(&mut hub, 0, &guest, "T", "generate_token", json!([]));
    assert!(settled(&outs, guest.conn, "T").unwrap().as_str().unwrap().starts_with("hubtoken:"));
    let stranger =
        connect(&mut hub, 0, "stranger", Some(&owner.ws), Some(&format!("hubtoken:{}:mallory", owner.ws)));
    let outs = mgr_call(&mut hub, 0, &stranger, "T", "generate_token", json!([]));
    assert!(
        rvalue(&settled(&outs, stranger.conn, "T").unwrap_err()).contains("Only admin can generate token.")
    );
    // An expired token is refused.
    let c = hub.open(86401 * SEC);
    hub.handle_message(86401 * SEC, c, auth(Some("late"), None, Some(&tok), None));
    error_then_close(
        &drain(&mut hub),
        c,
        1008,
        "Authentication error: The token has expired. Please fetch a new one",
    );
}

#[test]
fn client_disconnected_is_broadcast_to_subscribers() {
    let mut hub = hub();
    let a = connect(&mut hub, 0, "a", Some("ws-t"), Some("hubtoken:ws-t:alice"));
    let b = connect(&mut hub, 0, "b", Some("ws-t"), Some("hubtoken:ws-t:bob"));
    let c = connect(&mut hub, 0, "c", Some("ws-t"), Some("hubtoken:ws-t:carol"));
    subscribe(&mut hub, 0, &b, json!(["client_disconnected"]));
    register(&mut hub, 0, &a, builtin_info(&a)).unwrap();
    hub.handle_close(SEC, a.conn);
    let outs = drain(&mut hub);
    assert_eq!(outs.len(), 1, "c did not subscribe: {outs:?}");
    assert_eq!(outs[0].0, b.conn);
    let f = frame(&outs[0].1);
    assert!(f.extra.is_none(), "a single msgpack object");
    assert_eq!(
        f.main,
        map(json!({"type": "client_disconnected", "to": "*", "data": {"id": "a", "workspace": "ws-t"}}))
    );
    assert!(hub.services().is_empty());
    assert_eq!(hub.connection_client(a.conn), None);
    hub.handle_close(SEC, a.conn);
    assert!(drain(&mut hub).is_empty(), "closing twice is harmless");

    // unsubscribe
    let outs = mgr_call(&mut hub, 0, &b, "U", "unsubscribe", json!(["client_disconnected"]));
    assert_eq!(settled(&outs, b.conn, "U"), Ok(Value::Bool(true)));
    hub.handle_close(SEC, c.conn);
    assert!(drain(&mut hub).is_empty());
    let outs = mgr_call(&mut hub, 0, &b, "X", "subscribe", json!(["ws-other/evt"]));
    assert!(rvalue(&settled(&outs, b.conn, "X").unwrap_err()).contains("is forbidden"));
}

#[test]
fn reconnection_tokens_restore_identity_and_supersede_the_old_socket() {
    let mut hub = hub();
    let a = connect(&mut hub, 0, "a", None, None);
    let rt = a.info["reconnection_token"].as_str().unwrap().to_string();

    // Still connected: the reconnection skips the duplicate check; the old socket drops.
    let c = hub.open(SEC);
    hub.handle_message(SEC, c, auth(Some("a"), None, None, Some(&rt)));
    let outs = drain(&mut hub);
    assert_eq!(outs[0], (a.conn, close(1006, &format!("Old connection for {} superseded", a.full()))));
    let info = text_json(&outs[1].1);
    assert_eq!(info["workspace"], json!(a.ws));
    assert_eq!(info["user"]["id"], a.info["user"]["id"]);
    assert_eq!(hub.connection_client(c), Some(a.full()));
    assert!(!hub.is_open(a.conn));

    // The token belongs to its client id.
    let d = hub.open(SEC);
    hub.handle_message(SEC, d, auth(Some("other"), None, None, Some(&rt)));
    error_then_close(
        &drain(&mut hub),
        d,
        1001,
        "Failed to establish connection: Failed to authenticate user: Client id mismatch, disconnecting",
    );
}

#[test]
fn restart_closes_everything_and_changes_the_manager() {
    let mut hub = hub();
    let a = connect(&mut hub, 0, "a", None, None);
    register(&mut hub, 0, &a, builtin_info(&a)).unwrap();
    let pending = hub.open(0);
    let old_manager = hub.manager_id();
    hub.restart("fresh-start-00000001");
    let outs = drain(&mut hub);
    assert_eq!(outs.len(), 3);
    error_then_close(&outs[..2], a.conn, 1001, "Server is stopping");
    assert_eq!(outs[2], (pending, close(1001, "Server is stopping")));
    assert_eq!(hub.manager_id(), "manager-fresh-start-00000001");
    assert_ne!(hub.manager_id(), old_manager);
    assert!(hub.services().is_empty());
    assert!(hub.open_connections().is_empty());

    // The reconnection token survives the restart, as a JWT would.
    let rt = a.info["reconnection_token"].as_str().unwrap();
    let c = hub.open(SEC);
    hub.handle_message(SEC, c, auth(Some("a"), None, None, Some(rt)));
    let info = text_json(&drain(&mut hub)[0].1);
    assert_eq!(info["manager_id"], json!("manager-fresh-start-00000001"));
    assert_eq!(info["workspace"], json!(a.ws));
    // Calls to the old manager id go nowhere.
    let p = Peer { conn: c, ws: a.ws.clone(), client: "a".into(), info };
    let main = json!({"type": "method", "from": p.full(), "to": format!("*/{old_manager}"),
                      "method": "services.default.echo", "session": "S"});
    assert!(
        send(&mut hub, SEC, &p, raw_frame(main, Some(json!({"args": [1], "promise": "*", "t": 15.0}))))
            .is_empty()
    );
}

#[test]
fn same_inputs_same_outputs() {
    let run = |seed: u64| {
        let mut hub = Hub::new(HubConfig { seed, ..HubConfig::default() });
        let p = connect(&mut hub, 0, "p", None, None);
        let tok = token(&mut hub, &p, json!({}));
        let c = connect(&mut hub, 0, "c", Some(&p.ws), Some(&tok));
        register(&mut hub, 0, &p, builtin_info(&p)).unwrap();
        register(&mut hub, 0, &p, service_info(&p, "svc", "protected")).unwrap();
        let outs = mgr_call(&mut hub, 0, &c, "S", "get_service", json!(["svc"]));
        let mut all = vec![format!("{:?}", (&p.info, &c.info))];
        all.extend(outs.iter().map(|o| format!("{o:?}")));
        all
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

// ---------------------------------------------------------------------------------------------
// Recorded transcripts.

const TRANSCRIPT_WS: &str = "ws-user-anonymouz-hyper-titanium-83345890";

fn scenario(frames: &[CapturedFrame], name: &str) -> Vec<CapturedFrame> {
    frames.iter().filter(|f| f.scenario == name).cloned().collect()
}

fn seq(frames: &[CapturedFrame], n: u64) -> &CapturedFrame {
    frames.iter().find(|f| f.seq == n).unwrap()
}

/// A hub holding `py-peer` and `py-caller` in the transcripts' workspace, under the
/// transcripts' manager id.
fn transcript_hub() -> (Hub, Peer, Peer) {
    let mut hub =
        Hub::new(HubConfig { server_id: "delicate-dirigible-06049537".into(), ..HubConfig::default() });
    let peer_token = format!("hubtoken:{TRANSCRIPT_WS}:anonymouz-hyper-titanium-83345890");
    let caller_token = format!("hubtoken:{TRANSCRIPT_WS}:spectacled-forest-87471032");
    let peer = connect(&mut hub, 0, "py-peer", Some(TRANSCRIPT_WS), Some(&peer_token));
    let caller = connect(&mut hub, 0, "py-caller", Some(TRANSCRIPT_WS), Some(&caller_token));
    (hub, peer, caller)
}

/// Keys (recursively) of two values: same shape, same key order.
fn same_keys(a: &Value, b: &Value, path: &str) {
    if let (Some(x), Some(y)) = (a.as_map(), b.as_map()) {
        assert_eq!(keys(x), keys(y), "{path}");
        for ((k, vx), (_, vy)) in x.iter().zip(y.iter()) {
            same_keys(vx, vy, &format!("{path}.{}", k.as_str().unwrap()));
        }
    }
}

#[test]
fn call_args_kwargs_transcript_is_delivered_with_the_recorded_main_layout() {
    let all = transcripts::load_all();
    let frames = scenario(&all, "call_args_kwargs");
    let (mut hub, peer, caller) = transcript_hub();
    for c2s in frames.iter().filter(|f| f.dir == "c2s") {
        let s2c = seq(&frames, c2s.seq + 1);
        assert_eq!(s2c.dir, "s2c");
        let (from, to) = if c2s.json["conn"] == "py-caller" { (&caller, &peer) } else { (&peer, &caller) };
        let sent = Bytes::from(c2s.bytes.clone());
        let outs = send(&mut hub, 0, from, sent.clone());
        assert_eq!(outs.len(), 1, "{}", c2s.label());
        assert_eq!(outs[0].0, to.conn);
        let got = bin(&outs[0].1).clone();
        let want = Bytes::from(s2c.bytes.clone());
        let (got_main, got_len) = decode_value(&got, &Limits::default()).unwrap();
        let (want_main, want_len) = decode_value(&want, &Limits::default()).unwrap();
        same_keys(&got_main, &want_main, &s2c.label());
        // Everything but the user matches exactly; the extra bytes are identical.
        let strip = |m: &Value| {
            let mut m = m.as_map().unwrap().clone();
            m.remove("user");
            m
        };
        assert_eq!(strip(&got_main), strip(&want_main), "{}", s2c.label());
        assert_eq!(&got[got_len..], &want[want_len..], "{}", s2c.label());

        // Given the recorded user, the rewrite reproduces the recorded frame byte for byte.
        let user = want_main.as_map().unwrap().get("user").unwrap().clone();
        let rw = rewrite_frame(&sent, TRANSCRIPT_WS, &from.client, &user).unwrap();
        assert_eq!(rw.bytes, want, "{}", s2c.label());
    }
    assert_eq!(hub.frames_routed(), 4);
}

#[test]
fn disconnect_transcript_event_is_byte_identical() {
    let all = transcripts::load_all();
    let frames = scenario(&all, "disconnect");
    let (mut hub, peer, caller) = transcript_hub();
    subscribe(&mut hub, 0, &peer, json!(["client_disconnected"]));
    hub.handle_close(0, caller.conn);
    let outs = drain(&mut hub);
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].0, peer.conn);
    assert_eq!(bin(&outs[0].1)[..], seq(&frames, 2).bytes[..]);
}

/// Replaces a 22-character session id inside recorded bytes (same length, same layout).
fn with_session(bytes: &[u8], old: &str, new: &str) -> Bytes {
    assert_eq!(old.len(), new.len());
    let mut out = bytes.to_vec();
    let mut i = 0;
    while i + old.len() <= out.len() {
        if &out[i..i + old.len()] == old.as_bytes() {
            out[i..i + old.len()].copy_from_slice(new.as_bytes());
            i += old.len();
        } else {
            i += 1;
        }
    }
    Bytes::from(out)
}

#[test]
fn manager_transcripts_are_reproduced() {
    let all = transcripts::load_all();
    let (mut hub, peer, caller) = transcript_hub();

    // connect_handshake: fetch the manager service, register built-in, subscribe.
    let hs = scenario(&all, "connect_handshake");
    let outs = send(&mut hub, 0, &peer, Bytes::from(seq(&hs, 2).bytes.clone()));
    assert_eq!(outs.len(), 1);
    let f = frame(&outs[0].1);
    let want = &seq(&hs, 3).json;
    transcripts::compare(&Value::Map(f.main.clone()), &want["main"], "#3.main").unwrap();
    let got_svc = f.extra.unwrap().get("args").unwrap().as_array().unwrap()[0].clone();
    let want_svc = want["extra"]["args"][0].as_object().unwrap();
    let got_svc = got_svc.as_map().unwrap();
    assert_eq!(keys(got_svc), want_svc.keys().map(String::as_str).collect::<Vec<_>>());
    for (k, got) in got_svc.iter() {
        let k = k.as_str().unwrap();
        let mut got = got.clone();
        let mut want = want_svc[k].clone();
        if let (Some(g), Some(w)) = (got.as_map_mut(), want.as_object_mut()) {
            if g.contains_key("_rschema") {
                // Schemas are simplified and docs cut to their first line.
                assert_eq!(keys(g), w.keys().map(String::as_str).collect::<Vec<_>>(), "{k}");
                g.remove("_rschema");
                g.remove("_rdoc");
                w.remove("_rschema");
                w.remove("_rdoc");
            }
        }
        transcripts::compare(&got, &want, k).unwrap();
    }

    for (c2s, replies) in [(4, vec![5, 6]), (7, vec![9, 10])] {
        let outs = send(&mut hub, 0, &peer, Bytes::from(seq(&hs, c2s).bytes.clone()));
        assert_eq!(outs.len(), replies.len());
        for ((_, out), r) in outs.iter().zip(replies) {
            assert_eq!(bin(out)[..], seq(&hs, r).bytes[..], "connect_handshake#{r}");
        }
    }

    // register_service: the interop service.
    let reg = scenario(&all, "register_service");
    let outs = send(&mut hub, 0, &peer, Bytes::from(seq(&reg, 2).bytes.clone()));
    assert_eq!(bin(&outs[0].1)[..], seq(&reg, 3).bytes[..]);
    assert_eq!(bin(&outs[1].1)[..], seq(&reg, 4).bytes[..]);
    assert_eq!(hub.services().len(), 2);

    // get_service: caller → manager → provider → manager → caller.
    let gs = scenario(&all, "get_service");
    let outs = send(&mut hub, 0, &caller, Bytes::from(seq(&gs, 0).bytes.clone()));
    assert_eq!(outs.len(), 2);
    assert_eq!(outs[0].0, caller.conn);
    assert_eq!(bin(&outs[0].1)[..], seq(&gs, 1).bytes[..]);
    assert_eq!(outs[1].0, peer.conn);
    let ours = frame(&outs[1].1).main_str("session").unwrap().to_string();
    let recorded = "54EbB3wCrcLD9WC68Ug4Tf";
    assert_eq!(bin(&outs[1].1), &with_session(&seq(&gs, 2).bytes, recorded, &ours));
    let outs = send(&mut hub, 0, &peer, with_session(&seq(&gs, 3).bytes, recorded, &ours));
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].0, caller.conn);
    assert_eq!(bin(&outs[0].1)[..], seq(&gs, 4).bytes[..], "get_service#4");
}
