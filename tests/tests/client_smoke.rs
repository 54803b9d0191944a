//! The async client (tokio) against the real server, Rust to Rust: services, typed calls,
//! callbacks, generators and `_rintf` objects.

use futures::StreamExt;
use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::{
    Callback, Generator, Interface, RemoteFunction, RemoteGenerator, RemoteInterface, ServerConfig, Service,
    connect_to_server,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_service_called_from_rust() {
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let a = connect_to_server(ServerConfig::new(hs.url())).await.expect("connect a");
    let token = a.generate_token(None).await.expect("token");
    let b = connect_to_server(ServerConfig::new(hs.url()).workspace(a.workspace()).token(token))
        .await
        .expect("connect b");

    let svc = Service::new("hello")
        .function("greet", |name: String| async move {
            Ok::<_, hypha_rpc_tokio::Error>(format!("Hello, {name}!"))
        })
        .function("add", |x: i64, y: i64| async move { Ok::<_, String>(x + y) })
        .function("fail", || async move { Err::<(), _>("boom") })
        .function("twice", |f: RemoteFunction, x: i64| async move {
            let once: i64 = f.call((x,)).await.map_err(|e| e.to_string())?;
            f.call::<i64>((once,)).await.map_err(|e| e.to_string())
        })
        .function(
            "count",
            |n: u32| async move { Ok::<_, String>(Generator::new(futures::stream::iter(0..n))) },
        )
        .function("counter", || async move {
            Ok::<_, String>(Interface::new().function("inc", |x: i64| async move { Ok::<_, String>(x + 1) }))
        })
        .function_with_context(
            "whoami",
            |ctx: hypha_rpc_tokio::Context| async move { Ok::<_, String>(ctx.from) },
        );
    let id = a.register_service(svc).await.expect("register");
    assert!(id.ends_with(":hello"), "{id}");

    let p = b.get_service(&id).await.expect("get_service");
    assert_eq!(p.call::<String>("greet", ("Ada",)).await.unwrap(), "Hello, Ada!");
    assert_eq!(p.call::<i64>("add", (2, 3)).await.unwrap(), 5);
    let err = p.call::<()>("fail", ()).await.unwrap_err();
    assert!(err.remote_message().unwrap().contains("boom"), "{err}");
    let double = Callback::new(|x: i64| async move { Ok::<_, String>(x * 2) });
    assert_eq!(p.call::<i64>("twice", (double, 5)).await.unwrap(), 20);
    let items: Vec<u32> = p
        .call::<RemoteGenerator>("count", (4,))
        .await
        .unwrap()
        .typed::<u32>()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(items, vec![0, 1, 2, 3]);
    let counter: RemoteInterface = p.call("counter", ()).await.unwrap();
    assert_eq!(counter.call::<i64>("inc", (41,)).await.unwrap(), 42);
    counter.dispose().await.unwrap();
    let who: String = p.call("whoami", ()).await.unwrap();
    assert!(who.ends_with(b.client_id()), "{who}");
    assert_eq!(b.echo(&vec![1, 2, 3]).await.unwrap(), vec![1, 2, 3]);
    assert!(
        b.list_services()
            .await
            .unwrap()
            .iter()
            .any(|s| s.get("id").and_then(|v| v.as_str()) == Some(id.as_str()))
    );

    b.disconnect().await;
    a.disconnect().await;
}

/// The blocking wrapper, from a plain (non-async) test.
#[test]
fn blocking_wrapper_works_without_async_code() {
    use hypha_rpc_tokio::blocking;
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let server = blocking::connect_to_server(ServerConfig::new(hs.url())).expect("connect");
    let id = server
        .register_service(
            Service::new("adder").function("add", |a: i64, b: i64| async move { Ok::<_, String>(a + b) }),
        )
        .expect("register");
    let svc = server.get_service(&id).expect("get_service");
    assert_eq!(svc.call::<i64>("add", (40, 2)).unwrap(), 42);
    let e = svc.call::<i64>("nope", ()).unwrap_err();
    assert!(matches!(e, hypha_rpc_tokio::Error::NoSuchMethod { .. }), "{e}");
    assert_eq!(server.echo(&"hi".to_string()).unwrap(), "hi");
    server.disconnect();
    // After disconnect every call fails with a clear error instead of hanging.
    let e = svc.call::<i64>("add", (1, 2)).unwrap_err();
    assert!(matches!(e, hypha_rpc_tokio::Error::Closed), "{e}");
}
