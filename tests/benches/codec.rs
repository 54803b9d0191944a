// Codec benchmark: our msgpack round trip vs plain rmpv and Python hypha-rpc on hypha-rpc's payloads.
//! `cargo bench -p hypha-rpc-tests --bench codec`
//!
//! 1. Criterion, one group per payload of [`hypha_rpc_tests::payloads`]: `ours` (`to_vec` +
//!    `decode_value`, plus `NdArray::from_value` for every top-level ndarray) and `rmpv` (the
//!    same tree as `rmpv::Value`, `write_value` + `read_value`).
//! 2. Our own medians for the same two closures (`Instant`, median of batch means).
//! 3. `tests/py/bench_codec.py` in the project venv (`scripts/hypha-venv.sh`): Python
//!    hypha-rpc's `_encode` + `msgpack.packb` + `msgpack.unpackb` + `_decode`. The bench
//!    panics if that Python cannot run, or if its packed bytes differ from ours.
//! 4. A table with the ratios and the targets: at least 50x faster than Python, at most 1.5x
//!    plain rmpv. Set `HYPHA_BENCH_ENFORCE=1` to make a missed target fail the run.
//!
//! Under `cargo test --benches` (criterion's test mode) every step runs briefly, as a smoke test.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use hypha_rpc_core::codec::rtype::{NdArray, RTypeCodec};
use hypha_rpc_core::codec::{decode_value, to_vec};
use hypha_rpc_core::{Limits, Value};
use hypha_rpc_tests::payloads::{self, Payload};
use serde_json::Value as Json;

/// Target: our round trip at least this many times faster than Python hypha-rpc.
const MIN_PY_SPEEDUP: f64 = 50.0;
/// Target: our round trip at most this many times slower than plain rmpv.
const MAX_RMP_RATIO: f64 = 1.5;

/// What criterion's command line asked for, decided as criterion itself decides it.
#[derive(Clone, Copy, PartialEq)]
enum RunMode {
    /// `cargo bench`: full measurements.
    Bench,
    /// `cargo test --benches` or `cargo bench -- --test`: one quick pass of everything.
    Smoke,
    /// `--list` or `--profile-time`: criterion only, no table.
    CriterionOnly,
}

fn run_mode() -> RunMode {
    let args: Vec<String> = std::env::args().collect();
    let has = |a: &str| args.iter().any(|x| x == a || x.starts_with(&format!("{a}=")));
    if has("--list") || has("--profile-time") {
        RunMode::CriterionOnly
    } else if has("--bench") && !has("--test") {
        RunMode::Bench
    } else {
        RunMode::Smoke
    }
}

/// Our round trip: encode, decode (binaries borrow the buffer), parse the ndarrays back.
fn ours_roundtrip(p: &Payload, limits: &Limits) -> Value {
    let bytes = Bytes::from(to_vec(black_box(&p.value)));
    let (back, used) = decode_value(&bytes, limits).expect("our codec decodes its own bytes");
    debug_assert_eq!(used, bytes.len());
    if p.has_ndarrays {
        black_box(parse_ndarrays(&back));
    }
    back
}

/// Parses every top-level `_rtype: "ndarray"` value, as a receiver would; returns how many.
fn parse_ndarrays(v: &Value) -> usize {
    let Some(m) = v.as_map() else { return 0 };
    let mut n = 0;
    for a in m.values().filter_map(NdArray::from_value) {
        black_box(a.expect("payload ndarray parses"));
        n += 1;
    }
    n
}

/// Plain rmpv round trip of the same tree.
fn rmp_roundtrip(v: &rmpv::Value) -> rmpv::Value {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, black_box(v)).expect("writing to a Vec cannot fail");
    rmpv::decode::read_value(&mut &buf[..]).expect("rmpv decodes its own bytes")
}

fn criterion_benches(c: &mut Criterion, all: &[(Payload, rmpv::Value, usize)]) {
    let limits = Limits::default();
    for (p, rv, len) in all {
        let mut g = c.benchmark_group(p.name);
        g.throughput(Throughput::Bytes(*len as u64));
        g.bench_function("ours", |b| b.iter(|| ours_roundtrip(p, &limits)));
        g.bench_function("rmpv", |b| b.iter(|| rmp_roundtrip(rv)));
        g.finish();
    }
}

/// Median over batches of the mean time per call, in ns. Batches last about `batch`.
fn median_ns(mut f: impl FnMut(), batch: Duration, batches: usize) -> f64 {
    let start = Instant::now();
    let mut calls = 0u32;
    while calls < 3 || start.elapsed() < batch {
        f();
        calls += 1;
    }
    let per_call = start.elapsed() / calls;
    let per_batch = (batch.as_nanos() / per_call.as_nanos().max(1)).max(1) as u32;
    let mut samples: Vec<f64> = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(per_batch)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Runs `tests/py/bench_codec.py` in the project venv; panics with the reason if it cannot.
fn run_python(smoke: bool) -> serde_json::Map<String, Json> {
    let root = workspace_root();
    let script = root.join("scripts/hypha-venv.sh");
    let venv = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("codec bench: cannot run {}: {e}", script.display()));
    assert!(
        venv.status.success(),
        "codec bench: {} failed ({}); the Python column needs the venv",
        script.display(),
        venv.status
    );
    let stdout = String::from_utf8_lossy(&venv.stdout);
    let python = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| panic!("codec bench: {} printed no python path", script.display()));

    let bench_py = root.join("tests/py/bench_codec.py");
    let mut cmd = Command::new(python);
    cmd.arg(&bench_py).arg("--with-bytes").stderr(Stdio::inherit());
    if smoke {
        cmd.arg("--quick");
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("codec bench: cannot run venv python {python} (from {}): {e}", script.display())
    });
    assert!(out.status.success(), "codec bench: {python} {} failed ({})", bench_py.display(), out.status);
    match serde_json::from_slice(&out.stdout) {
        Ok(Json::Object(m)) => m,
        other => panic!("codec bench: {} did not print a JSON object: {other:?}", bench_py.display()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One row of the final table.
struct Row {
    name: &'static str,
    bytes: usize,
    ours: f64,
    rmp: f64,
    python: f64,
}

impl Row {
    fn rmp_ratio(&self) -> f64 {
        self.ours / self.rmp
    }
    fn speedup(&self) -> f64 {
        self.python / self.ours
    }
    fn meets_targets(&self) -> (bool, bool) {
        (self.speedup() >= MIN_PY_SPEEDUP, self.rmp_ratio() <= MAX_RMP_RATIO)
    }
}

fn print_table(rows: &[Row], smoke: bool) {
    let ok = |b: bool| if b { "yes" } else { "NO" };
    println!();
    println!(
        "codec round trip (encode + decode), median ns{}",
        if smoke { " -- SMOKE RUN, numbers not meaningful" } else { "" }
    );
    println!(
        "{:<22} {:>7} {:>11} {:>11} {:>13} {:>9} {:>10} {:>8} {:>8}",
        "payload", "bytes", "ours ns", "rmpv ns", "python ns", "ours/rmp", "py/ours", ">=50x py", "<=1.5rmp"
    );
    for r in rows {
        let (py_ok, rmp_ok) = r.meets_targets();
        println!(
            "{:<22} {:>7} {:>11.0} {:>11.0} {:>13.0} {:>8.2}x {:>9.1}x {:>8} {:>8}",
            r.name,
            r.bytes,
            r.ours,
            r.rmp,
            r.python,
            r.rmp_ratio(),
            r.speedup(),
            ok(py_ok),
            ok(rmp_ok)
        );
    }
}

fn main() {
    let mode = run_mode();
    let limits = Limits::default();

    // The trees, their rmpv twins, and sanity checks before anything is timed.
    let all: Vec<(Payload, rmpv::Value, usize)> = payloads::all()
        .into_iter()
        .map(|p| {
            let ours = to_vec(&p.value);
            let rv = rmpv::Value::from(p.value.clone());
            let mut theirs = Vec::new();
            rmpv::encode::write_value(&mut theirs, &rv).expect("writing to a Vec cannot fail");
            if theirs != ours {
                println!("note: {}: rmpv writes {} bytes, ours {}", p.name, theirs.len(), ours.len());
            }
            let back = ours_roundtrip(&p, &limits);
            assert_eq!(back, p.value, "{}: our round trip changed the value", p.name);
            if p.has_ndarrays {
                assert!(parse_ndarrays(&back) > 0, "{}: no ndarray found", p.name);
            }
            let len = ours.len();
            (p, rv, len)
        })
        .collect();

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    criterion_benches(&mut c, &all);
    c.final_summary();

    if mode == RunMode::CriterionOnly {
        println!("codec bench: --list/--profile-time given, comparison table not produced");
        return;
    }
    let smoke = mode == RunMode::Smoke;
    let (batch, batches) =
        if smoke { (Duration::from_millis(2), 3) } else { (Duration::from_millis(20), 25) };

    let mut rows = Vec::new();
    let ours_ns: Vec<(f64, f64)> = all
        .iter()
        .map(|(p, rv, _)| {
            let ours = median_ns(|| drop(black_box(ours_roundtrip(p, &limits))), batch, batches);
            let rmp = median_ns(|| drop(black_box(rmp_roundtrip(rv))), batch, batches);
            (ours, rmp)
        })
        .collect();

    let py = run_python(smoke);
    for ((p, _, len), (ours, rmp)) in all.iter().zip(ours_ns) {
        let entry = py
            .get(p.name)
            .unwrap_or_else(|| panic!("codec bench: bench_codec.py reported no payload {:?}", p.name));
        let py_bytes = entry["bytes"].as_u64().expect("bench_codec.py: bytes") as usize;
        let python = entry["ns_per_roundtrip"].as_f64().expect("bench_codec.py: ns_per_roundtrip");
        let py_hex = entry["packed_hex"].as_str().expect("bench_codec.py: packed_hex");
        println!("{:<22} bytes: ours {len}, python {py_bytes}", p.name);
        assert!(
            py_bytes == *len && py_hex == hex(&to_vec(&p.value)),
            "codec bench: {}: Python packs different bytes than we encode ({py_bytes} vs {len}); \
             tests/src/payloads.rs and tests/py/bench_codec.py have drifted apart",
            p.name
        );
        rows.push(Row { name: p.name, bytes: *len, ours, rmp, python });
    }
    print_table(&rows, smoke);

    let mut missed = Vec::new();
    for r in &rows {
        let (py_ok, rmp_ok) = r.meets_targets();
        if !py_ok {
            missed.push(format!(
                "{}: {:.1}x faster than Python, want >= {MIN_PY_SPEEDUP}x",
                r.name,
                r.speedup()
            ));
        }
        if !rmp_ok {
            missed.push(format!("{}: {:.2}x plain rmpv, want <= {MAX_RMP_RATIO}x", r.name, r.rmp_ratio()));
        }
    }
    if missed.is_empty() {
        println!("all targets met");
    } else {
        println!("targets missed:\n  {}", missed.join("\n  "));
        if !smoke && std::env::var_os("HYPHA_BENCH_ENFORCE").is_some_and(|v| v == "1") {
            panic!("codec bench: {} target(s) missed (HYPHA_BENCH_ENFORCE=1)", missed.len());
        }
    }
}
