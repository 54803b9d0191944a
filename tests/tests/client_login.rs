//! `login` (Python `hypha_rpc.login`) against the real server's `public/hypha-login` service.
//!
//! A browser is not needed: the login page only calls the service's `report(key, token, ...)`
//! with a token the server can verify, so a second client does that here with a token from
//! its own `generate_token`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::{
    Error, LoginConfig, LoginInfo, Server, ServerConfig, Value, connect_to_server, login, login_profile,
};

fn start_server() -> HyphaServer {
    HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"))
}

/// A login config whose callback sends the [`LoginInfo`] into the returned receiver.
fn config_with_channel(url: &str, timeout: Duration) -> (LoginConfig, oneshot::Receiver<LoginInfo>) {
    let (tx, rx) = oneshot::channel();
    let tx = Mutex::new(Some(tx));
    let config = LoginConfig::new(url).timeout(timeout).callback(move |info| {
        if let Some(tx) = tx.lock().unwrap().take() {
            let _ = tx.send(info);
        }
    });
    (config, rx)
}

/// What the login page does after the user logged in: `report(key, token, **profile)`.
async fn report(user: &Server, key: &str, token: &str, kwargs: serde_json::Value) {
    let svc = user.get_service("public/hypha-login").await.expect("get the login service");
    let mut all = serde_json::json!({"key": key, "token": token});
    all.as_object_mut().unwrap().extend(kwargs.as_object().unwrap().clone());
    let () = svc.call_with_kwargs("report", (), all).await.expect("report the login");
}

fn user_field<'a>(server: &'a Server, field: &str) -> Option<&'a str> {
    match &server.connection_info().user {
        Value::Map(m) => m.get(field).and_then(Value::as_str),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_completed_by_report_returns_a_usable_token() {
    let hs = start_server();
    // The "user" who logs in on the web page.
    let user = connect_to_server(ServerConfig::new(hs.url())).await.expect("connect the user");
    let user_id = user_field(&user, "id").expect("user id").to_string();
    let user_token = user.generate_token(None).await.expect("generate_token");

    let (config, rx) = config_with_channel(hs.url(), Duration::from_secs(20));
    let page = async {
        let info = rx.await.expect("the callback got the login info");
        report(&user, &info.key, &user_token, serde_json::json!({})).await;
        info
    };
    let (token, info) = futures::join!(login(config), page);
    let token = token.expect("login returns the reported token");

    // The callback saw a login URL on this very server.
    let prefix = format!("{}/public/apps/hypha-login/?key=", hs.url());
    assert!(info.login_url.starts_with(&prefix), "{}", info.login_url);
    assert_eq!(info.login_url[prefix.len()..], info.key);
    assert!(!info.key.is_empty());
    assert_eq!(
        info.report_url.as_deref(),
        Some(format!("{}/public/services/hypha-login/report", hs.url()).as_str())
    );
    assert_eq!(
        info.check_url.as_deref(),
        Some(format!("{}/public/services/hypha-login/check", hs.url()).as_str())
    );
    assert_eq!(token, user_token, "check returns the token the page reported");

    // The token logs in as (a child of) the user, into the user's workspace.
    let me = connect_to_server(ServerConfig::new(hs.url()).token(&token)).await.expect("connect with token");
    assert_eq!(me.workspace(), user.workspace());
    assert_eq!(user_field(&me, "parent"), Some(user_id.as_str()), "{:?}", me.connection_info().user);
    assert_eq!(user_field(&me, "current_workspace"), Some(user.workspace()));
    // It can act in that workspace: the manager answers.
    assert_eq!(me.echo(&"hi".to_string()).await.unwrap(), "hi");

    // A session key is single-use: the server deleted it when check succeeded.
    let svc = user.get_service("public/hypha-login").await.unwrap();
    let err = svc.call::<Option<String>>("check", (&info.key, 0, false)).await.unwrap_err();
    assert!(err.remote_message().is_some_and(|m| m.contains("Invalid key")), "{err}");

    me.disconnect().await;
    user.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_profile_and_workspace_scoped_report() {
    let hs = start_server();
    let user = connect_to_server(ServerConfig::new(hs.url())).await.expect("connect the user");
    let user_token = user.generate_token(None).await.expect("generate_token");

    // profile = true: the whole UserTokenInfo the page reported comes back.
    let (config, rx) = config_with_channel(hs.url(), Duration::from_secs(20));
    let page = async {
        let info = rx.await.expect("login info");
        let profile = serde_json::json!({"email": "ada@example.com", "name": "Ada", "user_id": "ada"});
        report(&user, &info.key, &user_token, profile).await;
    };
    let (profile, ()) = futures::join!(login_profile(config), page);
    let profile = profile.expect("login_profile");
    assert_eq!(profile.token, user_token);
    assert_eq!(profile.email.as_deref(), Some("ada@example.com"));
    assert_eq!(profile.name.as_deref(), Some("Ada"));
    assert_eq!(profile.user_id.as_deref(), Some("ada"));
    assert_eq!(profile.workspace, None);

    // A report naming a workspace makes the server mint a new token scoped to it.
    let (config, rx) = config_with_channel(hs.url(), Duration::from_secs(20));
    let config = config.workspace(user.workspace()).expires_in(Duration::from_secs(600));
    let page = async {
        let info = rx.await.expect("login info");
        assert!(info.login_url.contains(&format!("&workspace={}", user.workspace())), "{}", info.login_url);
        let scope = serde_json::json!({"workspace": user.workspace(), "expires_in": 600});
        report(&user, &info.key, &user_token, scope).await;
    };
    let (token, ()) = futures::join!(login(config), page);
    let token = token.expect("scoped login");
    assert_ne!(token, user_token, "the server minted a scoped token");
    let me = connect_to_server(ServerConfig::new(hs.url()).token(&token)).await.expect("connect scoped");
    assert_eq!(me.workspace(), user.workspace());

    me.disconnect().await;
    user.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_never_completed_times_out() {
    let hs = start_server();
    let timeout = Duration::from_secs(2);
    let called = Arc::new(Mutex::new(None::<(Instant, LoginInfo)>));
    let seen = called.clone();
    let config = LoginConfig::new(hs.url())
        .timeout(timeout)
        .callback(move |info| *seen.lock().unwrap() = Some((Instant::now(), info)));

    let start = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), login(config))
        .await
        .expect("login must not hang")
        .expect_err("nobody logged in");
    let end = Instant::now();
    let (called_at, info) = called.lock().unwrap().take().expect("the callback ran");
    assert!(info.login_url.starts_with(hs.url()), "{}", info.login_url);

    assert!(err.is_timeout(), "{err:?}");
    match &err {
        Error::LoginTimeout { after, login_url } => {
            assert_eq!((*after, login_url.as_str()), (timeout, info.login_url.as_str()));
            assert!(err.to_string().starts_with("login timed out after"), "{err}");
        }
        other => panic!("expected a login timeout, got {other:?}"),
    }
    let waited = end - called_at;
    assert!(waited >= timeout, "gave up early, after {waited:?}");
    assert!(waited < timeout + Duration::from_millis(1500), "waited {waited:?} for a {timeout:?} timeout");
    assert!(end - start < Duration::from_secs(15), "the whole login took {:?}", end - start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_errors_are_reported_not_hung() {
    let hs = start_server();
    // A forged token is refused by the server's `report`, so the login cannot complete.
    let (config, rx) = config_with_channel(hs.url(), Duration::from_secs(2));
    let user = connect_to_server(ServerConfig::new(hs.url())).await.expect("connect");
    let page = async {
        let info = rx.await.expect("login info");
        let svc = user.get_service("public/hypha-login").await.unwrap();
        let kwargs = serde_json::json!({"key": info.key, "token": "not-a-jwt"});
        svc.call_with_kwargs::<()>("report", (), kwargs).await.expect_err("forged token refused")
    };
    let (res, refused) = futures::join!(login(config), page);
    assert!(refused.remote_message().is_some_and(|m| m.contains("Invalid token")), "{refused}");
    assert!(res.expect_err("not logged in").is_timeout());

    // A login service that does not exist fails at once.
    let config = LoginConfig::new(hs.url()).login_service_id("public/no-such-login").callback(|_| {});
    let err = tokio::time::timeout(Duration::from_secs(30), login(config))
        .await
        .expect("must not hang")
        .expect_err("no such service");
    assert!(!err.is_timeout(), "{err:?}");

    // Nothing listens at this server URL.
    let config = LoginConfig::new("http://127.0.0.1:1").timeout(Duration::from_secs(2));
    let err = tokio::time::timeout(Duration::from_secs(30), login(config))
        .await
        .expect("must not hang")
        .expect_err("no server");
    assert!(!err.is_timeout(), "{err:?}");
    user.disconnect().await;
}

#[test]
fn login_on_smol() {
    let hs = start_server();
    smol::block_on(async {
        let user = hypha_rpc_smol::connect_to_server(ServerConfig::new(hs.url())).await.expect("connect");
        let user_token = user.generate_token(None).await.expect("generate_token");
        let (config, rx) = config_with_channel(hs.url(), Duration::from_secs(20));
        let page = async {
            let info = rx.await.expect("login info");
            report(&user, &info.key, &user_token, serde_json::json!({})).await;
        };
        let (token, ()) = futures::join!(hypha_rpc_smol::login(config), page);
        assert_eq!(token.expect("login on smol"), user_token);

        let timeout = Duration::from_secs(1);
        let started = Instant::now();
        let err = hypha_rpc_smol::login(LoginConfig::new(hs.url()).timeout(timeout).callback(|_| {}))
            .await
            .expect_err("nobody logged in");
        assert!(err.is_timeout(), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
        user.disconnect().await;
    });
}
