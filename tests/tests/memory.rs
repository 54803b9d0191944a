//! How much memory the engine needs to receive a 50 MB message in chunks, measured with a
//! counting allocator: the chunk frames are made one at a time and dropped once delivered, so
//! everything above the baseline (the sender's copy of the message) is the receiver's.
//! Reallocations of blocks above glibc's mmap threshold count as growth in place (mremap),
//! smaller ones as a copy.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use hypha_rpc_core::codec::{Frame, encode_frame};
use hypha_rpc_core::time::Instant;
use hypha_rpc_core::{Event, FunctionSpec, InvokeTarget, Map, ServiceSpec, Value, Visibility};
use hypha_rpc_tests::drive;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
fn grow(n: usize) {
    let v = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(v, Ordering::Relaxed);
}
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grow(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if l.size() >= MMAP_THRESHOLD && n >= MMAP_THRESHOLD {
            // glibc keeps blocks this large in their own mappings and grows them with mremap:
            // old and new never coexist.
            if n > l.size() {
                grow(n - l.size());
            } else {
                LIVE.fetch_sub(l.size() - n, Ordering::Relaxed);
            }
        } else {
            // A copying realloc: old and new coexist for a moment.
            grow(n);
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
        unsafe { System.realloc(p, l, n) }
    }
}
#[global_allocator]
static A: Counting = Counting;

/// glibc's default `M_MMAP_THRESHOLD`.
const MMAP_THRESHOLD: usize = 128 * 1024;

const WS: &str = "ws-mem";
const MB: usize = 1024 * 1024;

/// A call frame from the sender to the receiver's built-in.
fn builtin_call(op: &str, args: Vec<Value>, session: &str) -> Bytes {
    let mut main = Map::new();
    main.push("type", "method");
    main.push("from", format!("{WS}/sender"));
    main.push("to", format!("{WS}/receiver"));
    main.push("method", format!("services.built-in.message_cache.{op}"));
    main.push("session", session);
    let mut extra = Map::new();
    extra.push("args", Value::Array(args));
    extra.push("promise", "*");
    extra.push("t", 15.0);
    encode_frame(&Frame { main, extra: Some(extra) })
}

#[test]
fn a_50_mb_message_costs_about_50_mb() {
    let size = 50 * MB;
    let chunk = 262_144;
    let mut rx = drive::engine("receiver", 1);
    drive::connect(&mut rx, Instant::ZERO, "receiver", WS, "manager-mem");
    rx.register_service(
        Instant::ZERO,
        ServiceSpec::new("sink").visibility(Visibility::Public).function("take", FunctionSpec::new("take")),
    )
    .unwrap();
    drive::drain(&mut rx);

    // The whole message the sender would upload: a call of sink.take(<50 MB>).
    let message = {
        let mut main = Map::new();
        main.push("type", "method");
        main.push("from", format!("{WS}/sender"));
        main.push("to", format!("{WS}/receiver"));
        main.push("method", "services.sink.take");
        main.push("session", "callsession0000000000000");
        let mut extra = Map::new();
        extra.push("args", Value::Array(vec![Value::bin(vec![7u8; size])]));
        extra.push("promise", "*");
        extra.push("t", 15.0);
        encode_frame(&Frame { main, extra: Some(extra) })
    };
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);

    let key = "bigmessagekey000000000";
    rx.handle_binary(Instant::ZERO, &builtin_call("create", vec![key.into(), false.into()], "s-create"))
        .unwrap();
    drive::drain(&mut rx);
    for (i, part) in message.chunks(chunk).enumerate() {
        let f = builtin_call(
            "set",
            vec![key.into(), i.into(), Value::bin(part.to_vec()), false.into()],
            &format!("s-set-{i}"),
        );
        rx.handle_binary(Instant::ZERO, &f).unwrap();
        drop(f);
        drive::drain(&mut rx);
    }
    rx.handle_binary(Instant::ZERO, &builtin_call("process", vec![key.into(), false.into()], "s-process"))
        .unwrap();
    let d = drive::drain(&mut rx);
    let inv = d
        .events
        .into_iter()
        .find_map(|e| match e {
            Event::Invoke(inv) => Some(inv),
            _ => None,
        })
        .expect("the reassembled call reaches user code");
    assert_eq!(inv.target, InvokeTarget::Service { service: "sink".into(), function: "take".into() });
    let got = inv.args[0].as_bin().unwrap().len();
    assert_eq!(got, size);
    rx.reply(Instant::ZERO, inv.id, Ok(Value::from(got))).unwrap();
    drop(inv);
    drive::drain(&mut rx);
    let peak = PEAK.load(Ordering::Relaxed) - baseline;
    let after = LIVE.load(Ordering::Relaxed).saturating_sub(baseline);
    println!(
        "50 MB message: peak receiver memory {:.1} MB ({:.2}x the message), {:.1} MB left afterwards",
        peak as f64 / MB as f64,
        peak as f64 / message.len() as f64,
        after as f64 / MB as f64
    );
    assert!(peak < message.len() * 15 / 10, "peak {peak} for a {} byte message", message.len());
    assert!(after < MB, "{after} bytes still held after the call");
    assert_eq!(rx.partial_messages(), 0);
}
