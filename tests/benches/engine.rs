//! Round trips per second between two engines in memory (no server, no sockets): the cost of
//! the protocol engine itself — encode, decode, dispatch, settle — on one core.

use std::hint::black_box;
use std::time::Instant as StdInstant;

use criterion::{Criterion, criterion_group};
use hypha_rpc_core::codec::rtype::{Method, PromiseMode};
use hypha_rpc_core::time::Instant;
use hypha_rpc_core::{CallOptions, Engine, Event, FunctionSpec, ServiceSpec, Transmit, Value, Visibility};
use hypha_rpc_tests::drive;

const WS: &str = "ws-bench";

struct Pair {
    caller: Engine,
    callee: Engine,
    echo: Method,
}

fn pair() -> Pair {
    let mut caller = drive::engine("caller", 1);
    let mut callee = drive::engine("callee", 2);
    drive::connect(&mut caller, Instant::ZERO, "caller", WS, "manager-bench");
    drive::connect(&mut callee, Instant::ZERO, "callee", WS, "manager-bench");
    let svc =
        ServiceSpec::new("bench").visibility(Visibility::Public).function("echo", FunctionSpec::new("echo"));
    callee.register_service(Instant::ZERO, svc).unwrap();
    drive::drain(&mut callee);
    let echo = Method {
        target: format!("{WS}/callee"),
        method: "services.bench.echo".into(),
        promise: Some(PromiseMode::Compact),
        ..Method::default()
    };
    Pair { caller, callee, echo }
}

/// The callee answers every call it was given with its first argument, and its frames go
/// to the caller.
fn echo_back(p: &mut Pair) {
    let now = Instant::ZERO;
    while let Some(e) = p.callee.poll_event() {
        if let Event::Invoke(inv) = e {
            let v = inv.args.into_iter().next().unwrap_or_default();
            p.callee.reply(now, inv.id, Ok(v)).unwrap();
        }
    }
    while let Some(Transmit::Binary(b)) = p.callee.poll_transmit() {
        p.caller.handle_binary(now, &b).unwrap();
    }
}

/// One call `echo(arg)` from caller to callee and back; frames move directly between the
/// two engines (the `from` each writes is already what the server would set).
fn round_trip(p: &mut Pair, arg: &Value) -> Value {
    let now = Instant::ZERO;
    let id = p.caller.call(now, &p.echo, vec![arg.clone()], None, CallOptions::default()).unwrap();
    while let Some(Transmit::Binary(b)) = p.caller.poll_transmit() {
        p.callee.handle_binary(now, &b).unwrap();
    }
    echo_back(p);
    match p.caller.poll_event() {
        Some(Event::CallSettled { id: got, result: Ok(v) }) if got == id => v,
        other => panic!("{other:?}"),
    }
}

/// Items per second pulled from a generator between the two engines, with `prefetch` pulls in
/// flight (frames move after each pump, as a transport would batch them).
fn generator_items_per_second(prefetch: usize, items: u64) -> f64 {
    use hypha_rpc_core::GeneratorReader;
    use hypha_rpc_core::codec::rtype::{Generator, RTypeCodec, StopIteration};
    use hypha_rpc_core::engine::local_generator;
    use hypha_rpc_core::{GenId, InvokeTarget};
    let mut p = pair();
    let now = Instant::ZERO;
    // The callee answers this first call with a local generator.
    p.caller.call(now, &p.echo, vec![], None, CallOptions::default()).unwrap();
    let mut generator: Option<Generator> = None;
    let mut next_item = 0u64;
    let mut reader: Option<GeneratorReader> = None;
    let mut got = 0u64;
    let start = StdInstant::now();
    loop {
        while let Some(Transmit::Binary(b)) = p.caller.poll_transmit() {
            p.callee.handle_binary(now, &b).unwrap();
        }
        while let Some(e) = p.callee.poll_event() {
            if let Event::Invoke(inv) = e {
                let reply = match inv.target {
                    InvokeTarget::GeneratorNext { .. } if next_item < items => {
                        next_item += 1;
                        Value::from(next_item)
                    }
                    InvokeTarget::GeneratorNext { .. } => StopIteration.to_value(),
                    _ => local_generator(GenId(1)),
                };
                p.callee.reply(now, inv.id, Ok(reply)).unwrap();
            }
        }
        while let Some(Transmit::Binary(b)) = p.callee.poll_transmit() {
            p.caller.handle_binary(now, &b).unwrap();
        }
        while let Some(e) = p.caller.poll_event() {
            match e {
                Event::CallSettled { id, result } => {
                    if let Some(r) = reader.as_mut() {
                        if r.handle_settled(id, result.clone()) {
                            continue;
                        }
                    }
                    if generator.is_none() {
                        if let Ok(v) = &result {
                            generator = Generator::from_value(v).and_then(Result::ok);
                            reader = generator.clone().map(|g| GeneratorReader::new(g, prefetch));
                        }
                    }
                }
                Event::Invoke(inv) => p.caller.reply(now, inv.id, Ok(Value::Nil)).unwrap(),
                _ => {}
            }
        }
        let Some(r) = reader.as_mut() else { continue };
        while let Some(item) = r.poll_item() {
            item.unwrap();
            got += 1;
        }
        if r.is_finished() {
            break;
        }
        r.pump(&mut p.caller, now).unwrap();
    }
    assert_eq!(got, items);
    got as f64 / start.elapsed().as_secs_f64()
}

/// `n` calls issued at once, then served 500 at a time (the callee's cap is 1024) and settled:
/// the cost per call when the engines' tables hold thousands of entries. Seconds per call.
fn burst(p: &mut Pair, n: usize) -> f64 {
    let now = Instant::ZERO;
    let start = StdInstant::now();
    for i in 0..n {
        p.caller.call(now, &p.echo, vec![Value::from(i as u64)], None, CallOptions::default()).unwrap();
    }
    let mut frames = Vec::new();
    while let Some(Transmit::Binary(b)) = p.caller.poll_transmit() {
        frames.push(b);
    }
    for batch in frames.chunks(500) {
        for b in batch {
            p.callee.handle_binary(now, b).unwrap();
        }
        echo_back(p);
    }
    let mut settled = 0;
    while let Some(e) = p.caller.poll_event() {
        settled += usize::from(matches!(e, Event::CallSettled { result: Ok(_), .. }));
    }
    assert_eq!(settled, n, "every call of the burst settles");
    start.elapsed().as_secs_f64() / n as f64
}

fn bench(c: &mut Criterion) {
    let mut p = pair();
    let small = Value::from("hello");
    let mut g = c.benchmark_group("engine_pair");
    g.sample_size(20);
    g.bench_function("echo_small_round_trip", |b| b.iter(|| black_box(round_trip(&mut p, &small))));
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    // A direct figure: round trips per second on this core, median of 5 one-second batches.
    let mut p = pair();
    let arg = Value::from("hello");
    let mut rates = Vec::new();
    let quick = std::env::args().any(|a| a == "--test") || std::env::var_os("CARGO_BENCH_QUICK").is_some();
    for _ in 0..if quick { 1 } else { 5 } {
        let start = StdInstant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < if quick { 0.05 } else { 1.0 } {
            for _ in 0..100 {
                black_box(round_trip(&mut p, &arg));
            }
            n += 100;
        }
        rates.push(n as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!("engine pair: {median:.0} round trips/s on one core (target >= 500000)");
    assert_eq!(p.caller.pending_calls(), 1, "only the engine's own subscribe call stays pending");
    assert_eq!(p.callee.active_invocations(), 0);
    for n in [16, 2_000, 9_000] {
        let mut p = pair();
        burst(&mut p, n.min(1_000)); // warm: tables and buffers grown once
        let mut t: Vec<f64> = (0..if quick { 1 } else { 5 }).map(|_| burst(&mut p, n)).collect();
        t.sort_by(f64::total_cmp);
        println!("engine pair: {n} calls in flight: {:.2} µs per call", t[t.len() / 2] * 1e6);
    }
    let items = if quick { 1_000 } else { 50_000 };
    for prefetch in [1, 8] {
        let rate = generator_items_per_second(prefetch, items);
        println!("generator between engines: {rate:.0} items/s with prefetch {prefetch}");
    }
}
