//! End-to-end encryption between Rust clients through the real server: sealed calls and
//! results, callbacks, generators and a chunked 3 MB message inside an encrypted call,
//! `trusted_keys`, and every failure mode (untrusted key, clear call to a locked service,
//! wrong key) with a clear error instead of a bare timeout.

use std::time::{Duration, Instant};

use futures::StreamExt;
use hypha_rpc::serde_bytes::ByteBuf;
use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::{
    CallError, Callback, Context, Error, Generator, RemoteFunction, RemoteGenerator, ServerConfig, Service,
    Visibility, connect_to_server,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_calls_between_rust_clients() {
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let provider = connect_to_server(ServerConfig::new(hs.url()).encryption(true)).await.expect("provider");
    let token = provider.generate_token(None).await.unwrap();
    let join = |enc: bool| {
        let c = ServerConfig::new(hs.url())
            .workspace(provider.workspace())
            .token(token.clone())
            .method_timeout(Duration::from_secs(3))
            .encryption(enc);
        connect_to_server(c)
    };
    let alice = join(true).await.expect("alice");
    let mallory = join(true).await.expect("mallory");
    let plain = join(false).await.expect("plain");
    let provider_key = provider.get_public_key().expect("provider key");
    let alice_key = alice.get_public_key().expect("alice key");
    assert_eq!(provider_key.len(), 64);
    assert!(plain.get_public_key().is_none());

    let service = |id: &str| {
        Service::new(id)
            .visibility(Visibility::Public)
            .function_with_context("whoami", |ctx: Context| async move {
                Ok::<_, String>((ctx.from, ctx.caller_public_key))
            })
            .function("sha", |b: ByteBuf| async move {
                Ok::<_, String>((b.len(), b.iter().map(|x| *x as u64).sum::<u64>()))
            })
            .function("twice", |f: RemoteFunction, x: i64| async move {
                f.call::<i64>((x,)).await.map_err(|e| e.to_string())
            })
            .function("count", |n: u32| async move {
                Ok::<_, String>(Generator::new(futures::stream::iter(0..n)))
            })
    };
    let open_id = provider.register_service(service("open")).await.unwrap();
    let locked_id =
        provider.register_service(service("locked").trusted_keys([alice_key.clone()])).await.unwrap();

    // An empty trusted_keys list is refused, not read as "everyone".
    let e = provider.register_service(service("empty").trusted_keys(Vec::<String>::new())).await.unwrap_err();
    assert!(e.to_string().contains("omit it"), "{e}");

    // Alice, trusted, encrypted: everything works and the callee sees her key.
    let locked = alice.get_encrypted_service(&locked_id, &provider_key).await.expect("get locked");
    let (from, key): (String, Option<String>) = locked.call("whoami", ()).await.expect("whoami");
    assert!(from.ends_with(alice.client_id()), "{from}");
    assert_eq!(key.as_deref(), Some(alice_key.as_str()));
    let big = ByteBuf::from(vec![7u8; 3 * 1024 * 1024]);
    let (len, sum): (usize, u64) = locked.call("sha", (&big,)).await.expect("3 MB, chunked, encrypted");
    assert_eq!((len, sum), (big.len(), 7 * big.len() as u64));
    let cb = Callback::new(|x: i64| async move { Ok::<_, String>(x * 3) });
    assert_eq!(locked.call::<i64>("twice", (cb, 5)).await.expect("callback"), 15);
    let g: RemoteGenerator = locked.call("count", (3,)).await.expect("generator");
    let items: Vec<u32> = g.typed::<u32>().map(|r| r.unwrap()).collect().await;
    assert_eq!(items, vec![0, 1, 2]);

    // Mallory encrypts too, but is not listed.
    let as_mallory = mallory.get_encrypted_service(&locked_id, &provider_key).await.unwrap();
    let e = as_mallory.call::<(String, Option<String>)>("whoami", ()).await.unwrap_err();
    assert!(e.remote_message().is_some_and(|m| m.contains("not in the trusted keys list")), "{e:?}");
    // A clear call to the locked service.
    let clear = plain.get_service(&locked_id).await.unwrap();
    let e = clear.call::<(String, Option<String>)>("whoami", ()).await.unwrap_err();
    assert!(e.remote_message().is_some_and(|m| m.contains("Encryption required")), "{e:?}");
    // The open service still serves clear callers, and tells them apart.
    let (_, key): (String, Option<String>) =
        plain.get_service(&open_id).await.unwrap().call("whoami", ()).await.unwrap();
    assert_eq!(key, None);

    // A wrong key: the provider cannot open the request, so no reply can come; the caller
    // learns it was probably the key, not a plain timeout.
    let wrong = "ab".repeat(32);
    let bad = alice.get_encrypted_service(&open_id, &wrong).await.unwrap();
    let t = Instant::now();
    let e = bad.call::<(String, Option<String>)>("whoami", ()).await.unwrap_err();
    assert!(matches!(e, Error::Call(CallError::NoReplyEncrypted { .. })), "{e:?}");
    assert!(e.to_string().contains("encryption key mismatch"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Bad input is refused before anything is sent.
    assert!(alice.get_encrypted_service(&open_id, "nothex").await.is_err());
    assert!(plain.get_encrypted_service(&open_id, &provider_key).await.is_err(), "encryption off");

    for s in [plain, mallory, alice, provider] {
        s.disconnect().await;
    }
}
