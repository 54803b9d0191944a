//! The async client against the Python client and the JavaScript client (npm `hypha-rpc`
//! under node), same server, same run: connect-to-ready, idle RSS, small echo latency, calls/s
//! sequential and with 16 in flight, generator items/s, 1/10/50 MB echoes. Each side calls an
//! `echo` service registered by a second client of its own kind, so the server's share is the
//! same on all sides; the ratio columns are other ÷ Rust (higher is better for us) for times
//! and Rust ÷ other for rates. The JS column needs node and npm (`scripts/js-deps.sh`); without
//! them it reads "n/a".
//!
//! `cargo run --release -p hypha-rpc-tests --example client_bench [-- SECONDS]`

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::serde_bytes::ByteBuf;
use hypha_rpc_tokio::{ServerConfig, Service, Value, connect_to_server};

fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A `/proc/PID/status` figure in KiB (`VmRSS:`, or `RssAnon:`: heap and stacks, without the
/// pages of the executable and libraries, which the kernel can drop and share).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Starts an idle client process, waits for READY, and reads its RSS and the anonymous part
/// of it after a short settle.
fn idle_rss(mut cmd: Command) -> (u64, u64) {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn idle client");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("READY line");
    assert_eq!(line.trim(), "READY", "idle client did not connect");
    std::thread::sleep(Duration::from_millis(500));
    let rss = rss_kib(child.id()).expect("read RSS");
    let anon = status_kib(child.id(), "RssAnon:").expect("read RssAnon");
    let _ = writeln!(child.stdin.take().unwrap());
    let _ = child.wait();
    (rss, anon)
}

#[derive(Default, Debug)]
struct Figures {
    connect_s: f64,
    echo_median_s: f64,
    echo_p99_s: f64,
    seq_calls_per_s: f64,
    cpu_per_call_s: f64,
    /// The kernel's share of `cpu_per_call_s` (Rust only: what syscalls cost).
    sys_per_call_s: f64,
    par16_calls_per_s: f64,
    /// (MB, seconds, peak RSS growth in KiB) per big echo.
    big: Vec<(u32, f64, u64)>,
    gen_items_per_s: f64,
    gen_prefetch_items_per_s: f64,
    /// Idle RSS, and the anonymous part of it.
    idle_rss_kib: (u64, u64),
}

/// CPU time of this process so far, in seconds: (user + system, system).
fn cpu_s() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    ((ticks(11) + ticks(12)) / 100.0, ticks(12) / 100.0) // utime, stime (fields 14, 15), USER_HZ = 100
}

/// Resets this process's peak RSS (`/proc/self/clear_refs`), returns the current RSS.
fn reset_peak() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    rss_kib(std::process::id()).unwrap_or(0)
}

fn peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or_default();
    line.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0)
}

async fn rust_side(url: &str, seconds: f64) -> Figures {
    let mut f = Figures::default();
    let mut conn = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let s = connect_to_server(ServerConfig::new(url)).await.expect("connect");
        conn.push(t.elapsed().as_secs_f64());
        s.disconnect().await;
    }
    conn.sort_by(f64::total_cmp);
    f.connect_s = conn[2];

    let slow = Duration::from_secs(120);
    let owner = connect_to_server(ServerConfig::new(url).method_timeout(slow)).await.expect("owner");
    let token = owner.generate_token(None).await.expect("token");
    let id = owner
        .register_service(
            Service::new("bench")
                .visibility(hypha_rpc_tokio::Visibility::Public)
                .function("echo", |x: Value| async move { Ok::<_, String>(x) })
                .function("count", |n: u32| async move {
                    Ok::<_, String>(hypha_rpc_tokio::Generator::new(futures::stream::iter(0..n)))
                }),
        )
        .await
        .expect("register");
    let caller = connect_to_server(
        ServerConfig::new(url).workspace(owner.workspace()).token(token).method_timeout(slow),
    )
    .await
    .expect("caller");
    let svc = caller.get_service(&id).await.expect("get_service");
    for _ in 0..50 {
        let _: String = svc.call("echo", ("warm",)).await.unwrap();
    }
    let mut lat = Vec::new();
    let cpu0 = cpu_s();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let t = Instant::now();
        let _: String = svc.call("echo", ("hello",)).await.unwrap();
        lat.push(t.elapsed().as_secs_f64());
    }
    let cpu1 = cpu_s();
    f.cpu_per_call_s = (cpu1.0 - cpu0.0) / lat.len() as f64;
    f.sys_per_call_s = (cpu1.1 - cpu0.1) / lat.len() as f64;
    lat.sort_by(f64::total_cmp);
    f.echo_median_s = lat[lat.len() / 2];
    f.echo_p99_s = lat[((lat.len() as f64 * 0.99) as usize).min(lat.len() - 1)];
    f.seq_calls_per_s = lat.len() as f64 / lat.iter().sum::<f64>();

    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let t = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..16 {
        let svc = svc.clone();
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let _: String = svc.call("echo", ("hello",)).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut done = 0;
    for w in workers {
        done += w.await.unwrap();
    }
    f.par16_calls_per_s = done as f64 / t.elapsed().as_secs_f64();

    // Generators: items/s through the server, one pull at a time and with 8 in flight.
    for prefetch in [1usize, 8] {
        let n = 2000u32;
        let t = Instant::now();
        let g: hypha_rpc_tokio::RemoteGenerator = svc.call("count", (n,)).await.expect("generator");
        let got = futures::StreamExt::count(g.prefetch(prefetch)).await;
        assert_eq!(got, n as usize);
        let rate = n as f64 / t.elapsed().as_secs_f64();
        if prefetch == 1 { f.gen_items_per_s = rate } else { f.gen_prefetch_items_per_s = rate }
    }

    for mb in [1u32, 10, 50] {
        let big: Vec<u8> =
            (0..mb * 1024 * 1024).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let big = ByteBuf::from(big);
        let base = reset_peak();
        let t = Instant::now();
        let back: ByteBuf = svc.call("echo", (&big,)).await.expect("big echo");
        let took = t.elapsed().as_secs_f64();
        f.big.push((mb, took, peak_kib().saturating_sub(base)));
        assert!(back == big, "{mb} MB echo came back different");
    }
    caller.disconnect().await;
    owner.disconnect().await;
    f
}

fn python_side(hs: &HyphaServer, seconds: f64) -> Figures {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/client_bench.py");
    let out = Command::new(hs.python())
        .args([script, hs.url(), &seconds.to_string()])
        .output()
        .expect("run the Python bench");
    assert!(out.status.success(), "Python bench failed: {}", String::from_utf8_lossy(&out.stderr));
    parse_figures(&String::from_utf8_lossy(&out.stdout)).expect("Python bench JSON")
}

/// The JS column: installs the npm client (`scripts/js-deps.sh`) and runs
/// tests/js/client_bench.mjs under node. `Err` (the column reads "n/a") when node or npm is
/// missing, the install fails, or the script fails.
fn js_side(hs: &HyphaServer, seconds: f64) -> Result<Figures, String> {
    let root = hypha_rpc_tests::server::workspace_root()?;
    // Not `server::install_js_deps`: that one panics, and a missing node is no failure here.
    let deps = Command::new("bash")
        .arg(root.join("scripts").join("js-deps.sh"))
        .current_dir(&root)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run scripts/js-deps.sh: {e}"))?;
    if !deps.status.success() {
        return Err(format!(
            "scripts/js-deps.sh failed ({}): {}",
            deps.status,
            String::from_utf8_lossy(&deps.stderr).trim()
        ));
    }
    // --expose-gc: the script runs a full GC before each big echo (as Python frees at `del`).
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/js/client_bench.mjs");
    let out = Command::new("node")
        .args(["--expose-gc", script, hs.url(), &seconds.to_string()])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run node: {e}"))?;
    if !out.status.success() {
        return Err(format!("JS bench failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    parse_figures(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| "no JSON line from the JS bench".into())
}

/// The figures of the last JSON line of a Python or JS bench script's stdout.
fn parse_figures(stdout: &str) -> Option<Figures> {
    let last = stdout.lines().rfind(|l| l.starts_with('{'))?;
    let j: serde_json::Value = serde_json::from_str(last).ok()?;
    let g = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
    let big = j["big"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    let mb = x[0].as_u64().unwrap_or(0) as u32;
                    (mb, x[1].as_f64().unwrap_or(f64::NAN), x[2].as_u64().unwrap_or(0))
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Figures {
        connect_s: g("connect_s"),
        echo_median_s: g("echo_median_s"),
        echo_p99_s: g("echo_p99_s"),
        seq_calls_per_s: g("seq_calls_per_s"),
        cpu_per_call_s: g("cpu_per_call_s"),
        sys_per_call_s: f64::NAN,
        par16_calls_per_s: g("par16_calls_per_s"),
        big,
        gen_items_per_s: g("gen_items_per_s"),
        gen_prefetch_items_per_s: f64::NAN,
        idle_rss_kib: (0, 0),
    })
}

fn main() {
    let seconds: f64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    // BENCH_RUNTIME=current: a single-threaded tokio runtime (no cross-thread wake-ups).
    let rt = if std::env::var("BENCH_RUNTIME").as_deref() == Ok("current") {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    };
    let mut rust = rt.block_on(rust_side(hs.url(), seconds));
    let mut py = python_side(&hs, seconds);
    let mut js = js_side(&hs, seconds).inspect_err(|e| eprintln!("JS column n/a: {e}")).ok();

    let exe = std::env::current_exe().unwrap();
    let idle = exe.with_file_name("client_idle");
    assert!(
        idle.exists(),
        "build the client_idle example first (cargo build --release -p hypha-rpc-tokio --example client_idle)"
    );
    let mut c = Command::new(idle);
    c.arg(hs.url());
    rust.idle_rss_kib = idle_rss(c);
    let mut c = Command::new(hs.python());
    c.args([concat!(env!("CARGO_MANIFEST_DIR"), "/py/client_idle.py"), hs.url()]);
    py.idle_rss_kib = idle_rss(c);
    if let Some(js) = js.as_mut() {
        let mut c = Command::new("node");
        c.args([concat!(env!("CARGO_MANIFEST_DIR"), "/js/client_idle.mjs"), hs.url()]);
        js.idle_rss_kib = idle_rss(c);
    }

    println!(
        "| measure | Rust (this client) | Python hypha-rpc | JS hypha-rpc (node) | ratio vs Python | ratio vs JS |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    const NA: &str = "n/a";
    // A JS cell, or "n/a" without the JS column.
    let jc = |cell: &dyn Fn(&Figures) -> String| js.as_ref().map_or(NA.to_string(), cell);
    let ms = |x: f64| format!("{:.3} ms", x * 1e3);
    let time_row = |name: &str, get: fn(&Figures) -> f64| {
        let (r, p) = (get(&rust), get(&py));
        println!(
            "| {name} | {} | {} | {} | {:.1}× faster | {} |",
            ms(r),
            ms(p),
            jc(&|j| ms(get(j))),
            p / r,
            jc(&|j| format!("{:.1}× faster", get(j) / r))
        );
    };
    let rate_row = |name: &str, get: fn(&Figures) -> f64| {
        let (r, p) = (get(&rust), get(&py));
        println!(
            "| {name} | {r:.0} /s | {p:.0} /s | {} | {:.2}× | {} |",
            jc(&|j| format!("{:.0} /s", get(j))),
            r / p,
            jc(&|j| format!("{:.2}×", r / get(j)))
        );
    };
    time_row("connect to ready (median of 5)", |f| f.connect_s);
    time_row("small echo latency, median", |f| f.echo_median_s);
    time_row("small echo latency, p99", |f| f.echo_p99_s);
    rate_row("calls/s sequential", |f| f.seq_calls_per_s);
    rate_row("calls/s, 16 in flight", |f| f.par16_calls_per_s);
    let us = |f: &Figures| f.cpu_per_call_s * 1e6;
    println!(
        "| client CPU per sequential echo (both clients) | {:.1} µs | {:.1} µs | {} | {:.1}× less | {} |",
        us(&rust),
        us(&py),
        jc(&|j| format!("{:.1} µs", us(j))),
        us(&py) / us(&rust),
        jc(&|j| format!("{:.1}× less", us(j) / us(&rust)))
    );
    println!(
        "| … of which in the kernel (loopback TCP, epoll, futex) | {:.1} µs | | | | |",
        rust.sys_per_call_s * 1e6
    );
    rate_row("generator items/s (one pull at a time)", |f| f.gen_items_per_s);
    let pre = rust.gen_prefetch_items_per_s;
    println!(
        "| generator items/s (Rust: prefetch 8) | {pre:.0} /s | (no prefetch in Python) | {} | {:.2}× | {} |",
        jc(&|_| "(no prefetch in JS)".into()),
        pre / py.gen_items_per_s,
        jc(&|j| format!("{:.2}×", pre / j.gen_items_per_s))
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    for (i, ((mb, rt, rr), (_, pt, pr))) in rust.big.iter().zip(&py.big).enumerate() {
        let jbig = |j: &Figures| j.big.get(i).copied();
        println!(
            "| {mb} MB echo (peak RSS growth, both clients) | {rt:.3} s ({:.0} MiB) | {pt:.3} s ({:.0} MiB) | {} | {:.1}× faster | {} |",
            mib(*rr),
            mib(*pr),
            jc(&|j| jbig(j).map_or(NA.into(), |(_, jt, jr)| format!("{jt:.3} s ({:.0} MiB)", mib(jr)))),
            pt / rt,
            jc(&|j| jbig(j).map_or(NA.into(), |(_, jt, _)| format!("{:.1}× faster", jt / rt)))
        );
    }
    let idle_mib = |f: &Figures| mib(f.idle_rss_kib.0);
    let anon_mib = |f: &Figures| mib(f.idle_rss_kib.1);
    println!(
        "| idle RSS of a connected client (default features) | {:.1} MiB | {:.1} MiB | {} | {:.1}× smaller | {} |",
        idle_mib(&rust),
        idle_mib(&py),
        jc(&|j| format!("{:.1} MiB", idle_mib(j))),
        idle_mib(&py) / idle_mib(&rust),
        jc(&|j| format!("{:.1}× smaller", idle_mib(j) / idle_mib(&rust)))
    );
    println!(
        "| … of which anonymous (heap, stacks) | {:.1} MiB | {:.1} MiB | {} | {:.1}× smaller | {} |",
        anon_mib(&rust),
        anon_mib(&py),
        jc(&|j| format!("{:.1} MiB", anon_mib(j))),
        anon_mib(&py) / anon_mib(&rust),
        jc(&|j| format!("{:.1}× smaller", anon_mib(j) / anon_mib(&rust)))
    );
}
