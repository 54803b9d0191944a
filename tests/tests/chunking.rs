//! Large messages between two engines in memory: calls and replies above the chunk threshold
//! travel through the receiver's `message_cache` and arrive intact, with nothing left behind.

use hypha_rpc_core::codec::rtype::{Method, PromiseMode};
use hypha_rpc_core::time::Instant;
use hypha_rpc_core::{
    CallOptions, Engine, EngineConfig, Event, FunctionSpec, ServiceSpec, Transmit, Value, Visibility,
};
use hypha_rpc_tests::drive;

const WS: &str = "ws-chunks";

fn engine(id: &str, chunk: usize) -> Engine {
    let mut c = EngineConfig::new(id);
    c.chunk_size = chunk;
    let mut e = Engine::new(c, Instant::ZERO);
    drive::connect(&mut e, Instant::ZERO, id, WS, "manager-x");
    e
}

/// Moves frames both ways until quiet; the callee echoes every invocation. Returns frames moved
/// and the largest frame seen.
fn pump(a: &mut Engine, b: &mut Engine) -> (usize, usize) {
    let (mut moved, mut largest) = (0, 0);
    loop {
        let mut any = false;
        for flip in [false, true] {
            let (from, to) = if flip { (&mut *b, &mut *a) } else { (&mut *a, &mut *b) };
            while let Some(t) = from.poll_transmit() {
                if let Transmit::Binary(bytes) = t {
                    largest = largest.max(bytes.len());
                    to.handle_binary(Instant::ZERO, &bytes).unwrap();
                    moved += 1;
                    any = true;
                }
            }
        }
        for e in [&mut *a, &mut *b] {
            let mut invs = Vec::new();
            let mut rest = Vec::new();
            while let Some(ev) = e.poll_event() {
                match ev {
                    Event::Invoke(inv) => invs.push(inv),
                    other => rest.push(other),
                }
            }
            for inv in invs {
                let v = inv.args.into_iter().next().unwrap_or_default();
                e.reply(Instant::ZERO, inv.id, Ok(v)).unwrap();
                any = true;
            }
            SETTLED.with(|s| s.borrow_mut().extend(rest));
        }
        if !any {
            return (moved, largest);
        }
    }
}

thread_local! {
    static SETTLED: std::cell::RefCell<Vec<Event>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[test]
fn large_call_and_reply_round_trip() {
    for (chunk, size) in [(262_144, 3_000_000usize), (4096, 50_000), (4096, 263_000)] {
        let mut a = engine("a", chunk);
        let mut b = engine("b", chunk);
        let svc = ServiceSpec::new("echo")
            .visibility(Visibility::Public)
            .function("echo", FunctionSpec::new("echo"));
        b.register_service(Instant::ZERO, svc).unwrap();
        drive::drain(&mut a);
        drive::drain(&mut b);
        let echo = Method {
            target: format!("{WS}/b"),
            method: "services.echo.echo".into(),
            promise: Some(PromiseMode::Compact),
            ..Method::default()
        };
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let id = a
            .call(Instant::ZERO, &echo, vec![Value::bin(payload.clone())], None, CallOptions::default())
            .unwrap();
        let (moved, largest) = pump(&mut a, &mut b);
        let settled = SETTLED.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let result = settled.iter().find_map(|e| match e {
            Event::CallSettled { id: got, result } if *got == id => Some(result.clone()),
            _ => None,
        });
        let value = result.expect("the call settled").expect("echo succeeded");
        assert_eq!(value.as_bin().unwrap()[..], payload[..], "chunk {chunk}, size {size}");
        assert!(largest <= chunk + 2048, "a frame of {largest} bytes went out with chunk size {chunk}");
        let chunks = size.div_ceil(chunk);
        assert!(moved >= 4 * chunks, "{moved} frames for {chunks} chunks each way");
        // No manager answers here: the subscription (both) and b's registration stay pending.
        for (e, baseline) in [(&a, 1), (&b, 2)] {
            assert_eq!(e.uploads(), 0);
            assert_eq!(e.partial_messages(), 0);
            assert_eq!(e.active_invocations(), 0);
            assert_eq!(e.pending_calls(), baseline, "every chunk call settled");
        }
        println!("chunk {chunk}: {size} bytes echoed in {moved} frames, largest {largest}");
    }
}
