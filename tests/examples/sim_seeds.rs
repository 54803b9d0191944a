//! Runs the seeded deterministic simulation (`hypha_rpc_tests::workload`) from the command line: one seed with its whole trace, or many seeds in parallel with a summary.
//!
//! ```text
//! cargo run --release -p hypha-rpc-tests --example sim_seeds -- --seed 42
//! cargo run --release -p hypha-rpc-tests --example sim_seeds -- --seeds 100000
//! cargo run --release -p hypha-rpc-tests --example sim_seeds -- --seeds 5000 --from 20000 --threads 4
//! ```
//!
//! Options: `--seed N` (one seed: its action log, the determinism check, the failure in full);
//! `--seeds N` and `--from K` (seeds `K..K+N`, default 1000 from 0); `--threads T` (default 2);
//! `--steps S` (workload steps per seed instead of 20–60); `--determinism` (run every seed
//! twice and compare the frame hashes); `--known-bugs` (also drive the engine where its known
//! bugs live, see `WorkloadOptions::known_bugs`); `--log` (print the action log of failures).
//! The exit code is 1 when any seed fails.

use std::process::ExitCode;
use std::time::Instant;

use hypha_rpc_tests::workload::{Summary, WorkloadOptions, run_seed, run_seeds};

struct Args {
    seed: Option<u64>,
    seeds: u64,
    from: u64,
    threads: usize,
    opts: WorkloadOptions,
    log: bool,
}

fn parse() -> Result<Args, String> {
    let mut args =
        Args { seed: None, seeds: 1000, from: 0, threads: 2, opts: WorkloadOptions::default(), log: false };
    let mut it = std::env::args().skip(1);
    let number = |it: &mut dyn Iterator<Item = String>, flag: &str| -> Result<u64, String> {
        let v = it.next().ok_or(format!("{flag} needs a number"))?;
        v.replace('_', "").parse().map_err(|e| format!("{flag} {v}: {e}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seed" => args.seed = Some(number(&mut it, "--seed")?),
            "--seeds" => args.seeds = number(&mut it, "--seeds")?,
            "--from" => args.from = number(&mut it, "--from")?,
            "--threads" => args.threads = number(&mut it, "--threads")? as usize,
            "--steps" => args.opts.steps = Some(number(&mut it, "--steps")? as usize),
            "--determinism" => args.opts.check_determinism = true,
            "--known-bugs" => args.opts.known_bugs = true,
            "--encryption" => args.opts.encryption = true,
            "--log" => args.log = true,
            "-h" | "--help" => {
                return Err("usage: sim_seeds [--seed N | --seeds N [--from K] [--threads T]] [--steps S] \
                            [--determinism] [--known-bugs] [--encryption] [--log]"
                    .into());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

fn one(seed: u64, mut opts: WorkloadOptions) -> ExitCode {
    opts.trace = true;
    opts.check_determinism = true;
    let started = Instant::now();
    match run_seed(seed, &opts) {
        Ok(r) => {
            for line in &r.log {
                println!("{line}");
            }
            let mut summary = Summary::default();
            summary.add(Ok(r.clone()));
            println!("\n{summary}");
            println!("frame hash {} (the same twice); {:?} wall", r.frame_hash, started.elapsed());
            ExitCode::SUCCESS
        }
        Err(f) => {
            for line in &f.log {
                println!("{line}");
            }
            println!("\n{}\n\n{f}", f.message);
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(seed) = args.seed {
        return one(seed, args.opts);
    }
    let (from, n) = (args.from, args.seeds);
    println!("running seeds {from}..{} on {} threads", from + n, args.threads);
    let started = Instant::now();
    let every = (n / 20).clamp(1, 5000);
    let progress = |done: u64| {
        if done % every == 0 {
            let s = started.elapsed().as_secs_f64();
            eprintln!("  {done}/{n} seeds, {s:.0} s ({:.0} seeds/s)", done as f64 / s);
        }
    };
    let summary = run_seeds(from..from + n, &args.opts, args.threads, &progress);
    let wall = started.elapsed();
    println!("{summary}");
    println!(
        "wall time: {:.1} s ({:.0} seeds/s on {} threads)",
        wall.as_secs_f64(),
        summary.seeds as f64 / wall.as_secs_f64(),
        args.threads
    );
    if args.log {
        for f in &summary.failures {
            println!("\n--- seed {} ---\n{}", f.seed, f.log.join("\n"));
        }
    }
    if summary.failures.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
