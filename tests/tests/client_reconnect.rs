//! The async client survives a server restart: the real server is killed and started again on
//! the same port while a Rust client has a service registered; the client reconnects with
//! backoff, registers the service again, and it is callable again without user action. Runs
//! on tokio and on smol.

use std::time::{Duration, Instant};

use futures::StreamExt;
use hypha_rpc::{ConnectionState, Server, ServerConfig, Service};
use hypha_rpc_tests::server::HyphaServer;

fn service() -> Service {
    Service::new("survivor")
        .visibility(hypha_rpc::Visibility::Public)
        .function("ping", |x: u32| async move { Ok::<_, String>(x + 1) })
}

/// Calls `id.ping` from `caller` until it answers (or `limit` passes).
async fn call_until_ok(caller: &Server, id: &str, limit: Duration) -> Result<u32, String> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        match caller.get_service(id).await {
            Ok(p) => match p.call::<u32>("ping", (41,)).await {
                Ok(v) => return Ok(v),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        futures_timer(Duration::from_millis(300)).await;
    }
    Err(format!("not callable after {limit:?}: {last}"))
}

/// A runtime-neutral sleep (a thread), so the scenario runs on both runtimes unchanged.
async fn futures_timer(d: Duration) {
    let (tx, rx) = futures::channel::oneshot::channel();
    std::thread::spawn(move || {
        std::thread::sleep(d);
        let _ = tx.send(());
    });
    let _ = rx.await;
}

async fn scenario<F, Fut>(connect: F)
where
    F: Fn(ServerConfig) -> Fut,
    Fut: std::future::Future<Output = hypha_rpc::Result<Server>>,
{
    let mut hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let owner = connect(ServerConfig::new(hs.url())).await.expect("owner connects");
    let token = owner.generate_token(None).await.expect("token");
    let caller = connect(ServerConfig::new(hs.url()).workspace(owner.workspace()).token(token))
        .await
        .expect("caller connects");
    let id = owner.register_service(service()).await.expect("register");
    assert_eq!(call_until_ok(&caller, &id, Duration::from_secs(5)).await, Ok(42));
    let mut states = owner.connection_states();

    hs.restart().unwrap_or_else(|e| panic!("the server must restart: {e}"));

    // The owner notices, backs off, reconnects and says so.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let next =
            futures::future::select(states.next(), Box::pin(futures_timer(Duration::from_secs(1)))).await;
        if let futures::future::Either::Left((Some(s), _)) = next {
            let done = matches!(s, ConnectionState::Connected { reconnected: true });
            seen.push(s);
            if done {
                break;
            }
        }
    }
    assert!(
        matches!(seen.first(), Some(ConnectionState::Disconnected { .. })),
        "first state after the kill: {seen:?}"
    );
    assert!(seen.iter().any(|s| matches!(s, ConnectionState::Reconnecting { .. })), "{seen:?}");
    assert!(
        matches!(seen.last(), Some(ConnectionState::Connected { reconnected: true })),
        "the owner must reconnect: {seen:?}"
    );

    // Without any user action the service is callable again, by the same full id.
    let v = call_until_ok(&caller, &id, Duration::from_secs(30)).await;
    assert_eq!(v, Ok(42), "after the restart");
    // And registered once, not twice.
    let listed = caller.list_services().await.expect("list_services");
    let copies = listed.iter().filter(|s| s.get("id").and_then(|v| v.as_str()) == Some(id.as_str())).count();
    assert_eq!(copies, 1, "{listed:?}");

    caller.disconnect().await;
    owner.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_survives_server_restart_tokio() {
    scenario(hypha_rpc_tokio::connect_to_server).await;
}

#[test]
fn service_survives_server_restart_smol() {
    smol::block_on(scenario(hypha_rpc_smol::connect_to_server));
}
