//! PROTOCOL.md §3.3.1 rule 7: the engine notices when the server forgets it while the socket
//! stays open, and registers again (services lost) or asks for a new connection (connection
//! dropped server-side).

use hypha_rpc_core::time::{Duration, Instant};
use hypha_rpc_core::{Event, FunctionSpec, Map, ServiceSpec, Value, Visibility};
use hypha_rpc_tests::drive::{self, drain, reply_frame};

const WS: &str = "ws-check";
const MANAGER: &str = "*/manager-check";

fn listing(ids: &[&str]) -> Value {
    Value::Array(
        ids.iter()
            .map(|id| {
                let mut m = Map::new();
                m.push("id", format!("{WS}/me:{id}"));
                Value::Map(m)
            })
            .collect(),
    )
}

/// A connected engine serving `svc`, and the time of the first check.
fn engine() -> (hypha_rpc_core::Engine, Instant) {
    let mut config = hypha_rpc_core::EngineConfig::new("me");
    config.seed = 1; // the check is on by default (every 60 s)
    let mut e = hypha_rpc_core::Engine::new(config, Instant::ZERO);
    let t0 = Instant::ZERO;
    drive::connect(&mut e, t0, "me", WS, "manager-check");
    e.register_service(
        t0,
        ServiceSpec::new("svc").visibility(Visibility::Public).function("f", FunctionSpec::new("f")),
    )
    .unwrap();
    drain(&mut e);
    (e, t0 + Duration::from_secs(60))
}

/// Fires the check and returns its session.
fn check(e: &mut hypha_rpc_core::Engine, at: Instant) -> String {
    e.handle_timeout(at);
    let d = drain(e);
    let f = d
        .frames
        .iter()
        .find(|f| f.main_str("method") == Some("services.default.list_services"))
        .expect("a check");
    f.main_str("session").unwrap().to_string()
}

#[test]
fn a_complete_listing_changes_nothing() {
    let (mut e, at) = engine();
    assert!(e.poll_timeout().unwrap() <= at);
    let s = check(&mut e, at);
    e.handle_binary(at, &reply_frame(MANAGER, &format!("{WS}/me"), &s, true, listing(&["built-in", "svc"])))
        .unwrap();
    let d = drain(&mut e);
    assert!(d.frames.is_empty() && d.events.is_empty(), "{:?} {:?}", d.frames, d.events);
    assert!(e.is_ready());
}

#[test]
fn a_listing_without_our_services_registers_everything_again() {
    let (mut e, at) = engine();
    let s = check(&mut e, at);
    e.handle_binary(at, &reply_frame(MANAGER, &format!("{WS}/me"), &s, true, listing(&["built-in"])))
        .unwrap();
    let d = drain(&mut e);
    let reg = d
        .frames
        .iter()
        .find(|f| f.main_str("method") == Some("services.default.register_service"))
        .expect("built-in again");
    let info = &reg.extra.as_ref().unwrap().get("args").unwrap().as_array().unwrap()[0];
    assert_eq!(info.as_map().unwrap().get("id").and_then(Value::as_str), Some(&*format!("{WS}/me:built-in")));
    assert!(!e.is_ready(), "registering again");
    // The manager accepts built-in: ready again, and `svc` is restored.
    let s = reg.main_str("session").unwrap().to_string();
    e.handle_binary(at, &reply_frame(MANAGER, &format!("{WS}/me"), &s, true, Value::Nil)).unwrap();
    let d = drain(&mut e);
    assert!(matches!(d.events.first(), Some(Event::Connected { reconnected: true, .. })), "{:?}", d.events);
    let restored =
        d.frames.iter().filter(|f| f.main_str("method") == Some("services.default.register_service")).count();
    assert_eq!(restored, 1, "svc registered again");
}

#[test]
fn a_connection_dropped_server_side_asks_for_a_new_one() {
    let (mut e, at) = engine();
    let s = check(&mut e, at);
    let mut err = Map::new();
    err.push("_rtype", "error");
    err.push("_rvalue", format!("Connection has already been closed (client: {WS}/me)"));
    err.push("_rtrace", "");
    e.handle_binary(at, &reply_frame(MANAGER, &format!("{WS}/me"), &s, false, Value::Map(err))).unwrap();
    let d = drain(&mut e);
    assert_eq!(d.closes.len(), 1, "the driver is asked to close (and so reconnect)");
}

#[test]
fn the_check_can_be_turned_off() {
    let mut config = hypha_rpc_core::EngineConfig::new("me");
    config.registration_check_interval = None;
    let mut e = hypha_rpc_core::Engine::new(config, Instant::ZERO);
    drive::connect(&mut e, Instant::ZERO, "me", WS, "manager-check");
    e.handle_timeout(Instant::ZERO + Duration::from_secs(3600));
    let d = drain(&mut e);
    assert!(!d.frames.iter().any(|f| f.main_str("method") == Some("services.default.list_services")));
}
