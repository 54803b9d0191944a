//! WebRTC between two Rust clients, signaled through the real server, over loopback UDP:
//! calls, callbacks, generators, contexts, a 50 MB payload, visibility, the peer closing and
//! the "auto" fallback. No packet leaves 127.0.0.1 (host candidates on loopback only, no STUN).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hypha_rpc::rtc::{WebRtc, WebRtcConfig};
use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::{
    Callback, Context, Generator, Interface, RemoteFunction, RemoteGenerator, RemoteInterface, ServerConfig,
    Service, Visibility, connect_to_server, serde_bytes::ByteBuf,
};

fn loopback() -> WebRtcConfig {
    WebRtcConfig::default().host_addresses([IpAddr::V4(Ipv4Addr::LOCALHOST)])
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

fn hello() -> Service {
    Service::new("hello")
        .function("echo", |x: hypha_rpc_tokio::Value| async move { Ok::<_, String>(x) })
        .function("twice", |f: RemoteFunction, x: i64| async move {
            let once: i64 = f.call((x,)).await.map_err(|e| e.to_string())?;
            f.call::<i64>((once,)).await.map_err(|e| e.to_string())
        })
        .function(
            "count",
            |n: u32| async move { Ok::<_, String>(Generator::new(futures::stream::iter(0..n))) },
        )
        .function("len", |b: ByteBuf| async move { Ok::<_, String>(b.len()) })
        .function("make", |n: usize| async move { Ok::<_, String>(ByteBuf::from(pattern(n))) })
        .function("counter", || async move {
            Ok::<_, String>(Interface::new().function("inc", |x: i64| async move { Ok::<_, String>(x + 1) }))
        })
        .function_with_context("whoami", |ctx: Context| async move {
            Ok::<_, String>((ctx.from, ctx.ws, ctx.connection_type.to_string()))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_to_rust_over_webrtc() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let a = connect_to_server(ServerConfig::new(hs.url())).await.expect("connect a");
    let token = a.generate_token(None).await.expect("token");
    let b = connect_to_server(ServerConfig::new(hs.url()).workspace(a.workspace()).token(token))
        .await
        .expect("connect b");
    a.register_service(hello()).await.expect("register");
    let rtc_id = a.register_rtc_service("a-rtc", loopback()).await.expect("register the rtc service");
    assert!(rtc_id.ends_with(":a-rtc"), "{rtc_id}");

    let t0 = Instant::now();
    let peer = b.get_rtc_service(&rtc_id, loopback()).await.expect("peer connection");
    let svc = peer.get_service("hello").await.expect("the service over the channel");
    let first: hypha_rpc_tokio::Value = svc.call("echo", ("hi",)).await.unwrap();
    let setup = t0.elapsed();
    assert_eq!(first.as_str(), Some("hi"));
    eprintln!("get_rtc_service to first call: {setup:?}");
    assert_eq!(peer.max_message_size(), hypha_rpc::rtc::LOCAL_MAX_MESSAGE as usize);

    // Context: the caller as the server vouched for it, over "webrtc".
    let (from, ws, kind): (String, String, String) = svc.call("whoami", ()).await.unwrap();
    assert_eq!((ws.as_str(), kind.as_str()), (a.workspace(), "webrtc"));
    assert!(from.starts_with(&format!("{}/", a.workspace())), "{from}");

    let double = Callback::new(|x: i64| async move { Ok::<_, String>(x * 2) });
    assert_eq!(svc.call::<i64>("twice", (double, 5)).await.unwrap(), 20);
    let items: Vec<u32> = svc
        .call::<RemoteGenerator>("count", (5,))
        .await
        .unwrap()
        .typed::<u32>()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(items, vec![0, 1, 2, 3, 4]);
    // A returned `_rintf` object works over the channel (hypha-rpc 0.21.47's does not).
    let counter: RemoteInterface = svc.call("counter", ()).await.unwrap();
    assert_eq!(counter.call::<i64>("inc", (41,)).await.unwrap(), 42);
    counter.dispose().await.unwrap();

    // 50 MB each way, chunked below the channel's message size.
    let big = pattern(50_000_000);
    let t = Instant::now();
    let n: usize = svc.call("len", (ByteBuf::from(big.clone()),)).await.unwrap();
    let up = t.elapsed();
    assert_eq!(n, big.len());
    let t = Instant::now();
    let back: ByteBuf = svc.call("make", (50_000_000usize,)).await.unwrap();
    let down = t.elapsed();
    assert!(back.as_ref() == big.as_slice(), "50 MB came back intact");
    eprintln!("50 MB over webrtc: up {up:?}, down {down:?}");

    // The offerer closes one peer connection: its calls fail at once.
    let second = b.get_rtc_service(&rtc_id, loopback()).await.expect("a second peer connection");
    let svc2 = second.get_service("hello").await.unwrap();
    second.disconnect().await;
    assert!(!second.is_connected());
    assert!(svc2.call::<hypha_rpc_tokio::Value>("echo", (1,)).await.is_err());
    assert!(peer.is_connected(), "the first peer connection is unaffected");

    // The answerer's connection ends: its peer connections end with it, and calls fail fast
    // instead of hanging.
    a.disconnect().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while peer.is_connected() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!peer.is_connected(), "the peer saw the channel close");
    assert!(svc.call::<hypha_rpc_tokio::Value>("echo", (1,)).await.is_err());
    b.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_enforces_visibility_and_falls_back_when_asked() {
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let a = connect_to_server(ServerConfig::new(hs.url())).await.expect("connect a");
    // Anyone may ask for a connection, but `hello` stays protected.
    a.register_service(hello()).await.unwrap();
    a.register_service(
        Service::new("open")
            .visibility(Visibility::Public)
            .function("ping", || async { Ok::<_, String>("pong") }),
    )
    .await
    .unwrap();
    let rtc_id =
        a.register_rtc_service("a-rtc", loopback().visibility(Visibility::Public)).await.expect("register");
    let stranger = connect_to_server(ServerConfig::new(hs.url())).await.expect("another workspace");
    assert_ne!(stranger.workspace(), a.workspace());
    let peer = stranger.get_rtc_service(&rtc_id, loopback()).await.expect("a public rtc service");
    let err = peer.get_service("hello").await.unwrap_err().to_string();
    assert!(err.contains("Permission denied"), "{err}");
    let open = peer.get_service("open").await.expect("a public service");
    assert_eq!(open.call::<String>("ping", ()).await.unwrap(), "pong");

    // `get_service_with`: Off never touches WebRTC; Auto uses it when the provider serves
    // `<client>-rtc` and falls back otherwise; On fails instead.
    let token = a.generate_token(None).await.unwrap();
    let b = connect_to_server(
        ServerConfig::new(hs.url())
            .workspace(a.workspace())
            .token(token.clone())
            .webrtc(WebRtc::Off, loopback()),
    )
    .await
    .unwrap();
    let hello_id = format!("{}/{}:hello", a.workspace(), a.client_id());
    let kind = |p: hypha_rpc_tokio::ServiceProxy| async move {
        let (_, _, kind): (String, String, String) = p.call("whoami", ()).await.unwrap();
        kind
    };
    assert_eq!(kind(b.get_service_with(&hello_id, WebRtc::Off).await.unwrap()).await, "websocket");
    // a serves `a-rtc`, not `<client>-rtc`: Auto falls back, On fails.
    assert_eq!(kind(b.get_service_with(&hello_id, WebRtc::Auto).await.unwrap()).await, "websocket");
    let err = b.get_service_with(&hello_id, WebRtc::On).await.unwrap_err().to_string();
    assert!(err.contains("Failed to get the service via webrtc"), "{err}");
    // A client connected with webrtc on serves `<client>-rtc` by itself.
    let c = connect_to_server(
        ServerConfig::new(hs.url()).workspace(a.workspace()).token(token).webrtc(WebRtc::On, loopback()),
    )
    .await
    .unwrap();
    c.register_service(hello()).await.unwrap();
    let c_hello = format!("{}/{}:hello", c.workspace(), c.client_id());
    assert_eq!(kind(b.get_service_with(&c_hello, WebRtc::On).await.unwrap()).await, "webrtc");
    assert_eq!(kind(b.get_service_with(&c_hello, WebRtc::Auto).await.unwrap()).await, "webrtc");
    assert_eq!(kind(b.get_service_with(&c_hello, WebRtc::Off).await.unwrap()).await, "websocket");
    c.disconnect().await;
    for x in [&a, &b, &stranger] {
        x.disconnect().await;
    }
}

/// On smol (its UDP sockets), with end-to-end encryption: `trusted_keys` holds over WebRTC as
/// on the websocket (hypha-rpc 0.21.47 does not check it there).
#[test]
fn trusted_keys_hold_over_webrtc_on_smol() {
    smol::block_on(async {
        use hypha_rpc_smol::connect_to_server;
        let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
        let b = connect_to_server(ServerConfig::new(hs.url()).encryption(true)).await.expect("connect b");
        let b_key = b.get_public_key().unwrap();
        let token = b.generate_token(None).await.unwrap();
        let a = connect_to_server(
            ServerConfig::new(hs.url())
                .workspace(b.workspace())
                .token(token)
                .encryption(true)
                .webrtc(WebRtc::On, loopback()),
        )
        .await
        .expect("connect a");
        let a_key = a.get_public_key().unwrap();
        a.register_service(
            Service::new("locked")
                .trusted_keys([b_key.clone()])
                .function_with_context("whoami", |ctx: Context| async move {
                    Ok::<_, String>(ctx.caller_public_key)
                }),
        )
        .await
        .unwrap();
        let rtc_id = format!("{}/{}:{}-rtc", a.workspace(), a.client_id(), a.client_id());
        let peer = b.get_rtc_service(&rtc_id, loopback()).await.expect("peer connection on smol");
        let clear = peer.get_service("locked").await.unwrap();
        let err = clear.call::<Option<String>>("whoami", ()).await.unwrap_err().to_string();
        assert!(err.contains("Encryption required"), "{err}");
        let sealed = peer.get_encrypted_service("locked", &a_key).await.unwrap();
        let who: Option<String> = sealed.call("whoami", ()).await.unwrap();
        assert_eq!(who.as_deref(), Some(b_key.as_str()), "the caller proved its key over the channel");
        peer.disconnect().await;
        a.disconnect().await;
        b.disconnect().await;
    });
}

/// A STUN server on loopback that answers every Binding request with the sender's port at
/// 127.0.0.2 (so the reflexive address differs from the host one), counting requests.
fn fake_stun() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if n < 20 || buf[0..2] != [0x00, 0x01] || buf[4..8] != [0x21, 0x12, 0xa4, 0x42] {
                continue;
            }
            seen.fetch_add(1, Ordering::SeqCst);
            let mut r = vec![0x01, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
            r.extend_from_slice(&buf[8..20]);
            let port = from.port() ^ 0x2112;
            let ip = u32::from(std::net::Ipv4Addr::new(127, 0, 0, 2)) ^ 0x2112_a442;
            r.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01]);
            r.extend_from_slice(&port.to_be_bytes());
            r.extend_from_slice(&ip.to_be_bytes());
            let _ = sock.send_to(&r, from);
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_servers_give_reflexive_candidates() {
    let (stun, asked) = fake_stun();
    let config = loopback().ice_servers([format!("stun:{stun}"), "turn:127.0.0.1:1".to_string()]);
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let a = connect_to_server(ServerConfig::new(hs.url()).webrtc(WebRtc::On, config.clone())).await.unwrap();
    a.register_service(hello()).await.unwrap();
    let token = a.generate_token(None).await.unwrap();
    let b =
        connect_to_server(ServerConfig::new(hs.url()).workspace(a.workspace()).token(token)).await.unwrap();
    let rtc_id = format!("{}/{}:{}-rtc", a.workspace(), a.client_id(), a.client_id());
    let peer = b.get_rtc_service(&rtc_id, config).await.expect("connects with reflexive candidates offered");
    let svc = peer.get_service("hello").await.unwrap();
    let v: hypha_rpc_tokio::Value = svc.call("echo", ("hi",)).await.unwrap();
    assert_eq!(v.as_str(), Some("hi"));
    assert!(asked.load(std::sync::atomic::Ordering::SeqCst) >= 2, "both sides asked the STUN server");
    b.disconnect().await;
    a.disconnect().await;
}
