//! Real-server chaos (issue #7.4): calls, callbacks and generators between Rust and Python
//! peers while the real server is killed and restarted several times. Every call must end in
//! a result or a clear error — none may be lost (hang past its timeout) — and after every
//! restart both services are registered again, exactly once.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::{
    Callback, Error, Generator, RemoteFunction, RemoteGenerator, Server, ServerConfig, Service, Visibility,
    connect_to_server,
};

const TIMEOUT: Duration = Duration::from_secs(5);
/// A call not settled this long after it started is lost (its own timeout is 5 s).
const LOST_AFTER: Duration = Duration::from_secs(40);

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    lost: AtomicU64,
}

fn rust_service() -> Service {
    Service::new("rs-chaos")
        .visibility(Visibility::Public)
        .function("echo", |x: u64| async move { Ok::<_, String>(x) })
        .function("call_back", |f: RemoteFunction, x: u64| async move {
            f.call::<u64>((x,)).await.map_err(|e| e.to_string())
        })
        .function(
            "count",
            |n: u32| async move { Ok::<_, String>(Generator::new(futures::stream::iter(0..n))) },
        )
}

/// One unit of work against service `id`: an echo, a callback round trip, or a 3-item generator.
async fn one(caller: &Server, id: &str, i: u64) -> Result<(), Error> {
    let svc = caller.get_service(id).await?;
    match i % 3 {
        0 => {
            let v: u64 = svc.call("echo", (i,)).await?;
            assert_eq!(v, i);
        }
        1 => {
            let cb = Callback::new(|x: u64| async move { Ok::<_, String>(x * 2) });
            let v: u64 = svc.call("call_back", (cb, i)).await?;
            assert_eq!(v, i * 2);
        }
        _ => {
            let g: RemoteGenerator = svc.call("count", (3,)).await?;
            let items: Vec<Result<u32, Error>> = g.typed::<u32>().collect().await;
            let items: Vec<u32> = items.into_iter().collect::<Result<_, _>>()?;
            assert_eq!(items, vec![0, 1, 2]);
        }
    }
    Ok(())
}

async fn load(
    caller: Server,
    ids: Vec<String>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let id = &ids[(i as usize) % ids.len()];
        match tokio::time::timeout(LOST_AFTER, one(&caller, id, i)).await {
            Ok(Ok(())) => tally.ok.fetch_add(1, Ordering::Relaxed),
            Ok(Err(e)) => {
                errors.lock().unwrap().push(e.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
                tally.failed.fetch_add(1, Ordering::Relaxed)
            }
            Err(_) => tally.lost.fetch_add(1, Ordering::Relaxed),
        };
        i += 1;
    }
}

async fn wait_callable(caller: &Server, id: &str) -> Duration {
    let start = Instant::now();
    loop {
        if tokio::time::timeout(TIMEOUT * 2, one(caller, id, 0)).await.is_ok_and(|r| r.is_ok()) {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{id} not callable 60 s after the restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_repeated_server_restarts() {
    let mut hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let cfg = |hs: &HyphaServer| ServerConfig::new(hs.url()).method_timeout(TIMEOUT);
    let owner = connect_to_server(cfg(&hs)).await.expect("owner");
    let rs_id = owner.register_service(rust_service()).await.expect("register");
    let token = owner.generate_token(None).await.expect("token");
    let caller =
        connect_to_server(cfg(&hs).workspace(owner.workspace()).token(token.clone())).await.expect("caller");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/chaos_peer.py");
    let mut py = Command::new(hs.python())
        .args([script, hs.url(), owner.workspace(), &token])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python peer");
    let mut line = String::new();
    let mut out = BufReader::new(py.stdout.take().unwrap());
    out.read_line(&mut line).expect("READY");
    // Keep draining the peer's stdout so its logging never hits a closed pipe.
    std::thread::spawn(move || out.lines().for_each(drop));
    let py_id =
        line.trim().strip_prefix("READY ").unwrap_or_else(|| panic!("peer said {line:?}")).to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let w = load(
            caller.clone(),
            vec![rs_id.clone(), py_id.clone()],
            stop.clone(),
            tally.clone(),
            errors.clone(),
        );
        workers.push(tokio::spawn(w));
    }

    // CI runs 3; a longer run: `HYPHA_CHAOS_RESTARTS=20 cargo test -p hypha-rpc-tests --test chaos -- --nocapture`.
    let restarts: usize =
        std::env::var("HYPHA_CHAOS_RESTARTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut recoveries = Vec::new();
    for round in 0..restarts {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = tally.ok.load(Ordering::Relaxed);
        assert!(before > 0, "round {round}: no call completed before the restart");
        tokio::task::block_in_place(|| hs.restart()).unwrap_or_else(|e| panic!("restart {round}: {e}"));
        recoveries.push(wait_callable(&caller, &rs_id).await);
        wait_callable(&caller, &py_id).await;
        let listed = caller.list_services().await.expect("list_services");
        for id in [&rs_id, &py_id] {
            let n =
                listed.iter().filter(|s| s.get("id").and_then(|v| v.as_str()) == Some(id.as_str())).count();
            assert_eq!(n, 1, "round {round}: {id} registered {n} times");
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed, lost) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        tally.lost.load(Ordering::Relaxed),
    );
    let errors = errors.lock().unwrap().clone();
    let mut kinds: Vec<String> = errors
        .iter()
        .map(|e| e.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").chars().take(90).collect())
        .collect();
    kinds.sort();
    kinds.dedup();
    println!(
        "chaos: {restarts} restarts, {ok} completed, {failed} failed with an error, {lost} lost; recovery {recoveries:?}"
    );
    println!("chaos: error kinds: {kinds:#?}");
    assert_eq!(lost, 0, "calls lost");
    assert!(ok > 50, "too little work done: {ok}");
    // Every failure is a clear error, not a decoding accident.
    assert!(errors.iter().all(|e| !e.starts_with("cannot decode")), "{errors:?}");

    let _ = writeln!(py.stdin.take().unwrap());
    let _ = py.wait();
    caller.disconnect().await;
    owner.disconnect().await;
}
