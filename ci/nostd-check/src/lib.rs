//! A `no_std` staticlib that exercises the codec, so the build proves core needs no std.
#![no_std]

extern crate alloc;

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use hypha_rpc_core::codec::rtype::{NdArray, RTypeCodec};
use hypha_rpc_core::codec::{DType, Frame, Scalar, decode_frame, encode_frame};
use hypha_rpc_core::{Limits, Map, Value};

/// A bump allocator over a static arena: enough for a device with no OS.
struct Bump {
    arena: UnsafeCell<[u8; 1 << 20]>,
    next: AtomicUsize,
}
unsafe impl Sync for Bump {}

unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = (cur + layout.align() - 1) & !(layout.align() - 1);
            let end = start + layout.size();
            if end > 1 << 20 {
                return core::ptr::null_mut();
            }
            match self.next.compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return unsafe { (self.arena.get() as *mut u8).add(start) },
                Err(seen) => cur = seen,
            }
        }
    }
    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}

#[global_allocator]
static ALLOC: Bump = Bump { arena: UnsafeCell::new([0; 1 << 20]), next: AtomicUsize::new(0) };

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The prebuilt `alloc` references an unwinding personality even under `panic = "abort"`;
/// nothing ever unwinds here, so an empty one satisfies the linker.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Encodes a small call frame with an ndarray argument, decodes it back, and returns the
/// frame's length (or 0 if the round trip failed).
#[unsafe(no_mangle)]
pub extern "C" fn hypha_nostd_roundtrip() -> usize {
    let mut main = Map::new();
    main.insert("type", "method");
    main.insert("to", "ws/peer");
    main.insert("method", "services.demo.add");
    let array = NdArray {
        data: bytes::Bytes::from_static(&[0, 0, 128, 63]),
        shape: alloc::vec![1],
        dtype: DType::Native(Scalar::Float32),
        other: Map::new(),
    };
    let mut extra = Map::new();
    extra.insert("args", Value::Array(alloc::vec![array.to_value(), 2.into()]));
    let frame = Frame { main, extra: Some(extra) };
    let bytes = encode_frame(&frame);
    match decode_frame(&bytes, &Limits::default()) {
        Ok(back) if back == frame => bytes.len(),
        _ => 0,
    }
}

/// A minimal client on a device: an engine connects (handshake), registers a service, and
/// answers one call to it. Returns the number of frames it sent (0 on failure). Used by
/// `footprint.sh` to measure the code size of such a build.
#[unsafe(no_mangle)]
pub extern "C" fn hypha_nostd_engine() -> usize {
    use hypha_rpc_core::service::{FunctionSpec, ServiceSpec, Visibility};
    use hypha_rpc_core::time::Instant;
    use hypha_rpc_core::{Engine, EngineConfig, Event, Transmit};

    let now = Instant::from_micros(1);
    let mut engine = Engine::new(EngineConfig::new("device"), now);
    if engine.handle_transport_open(now).is_err() {
        return 0;
    }
    let info = r#"{"type": "connection_info", "public_base_url": "http://127.0.0.1:9527", "manager_id": "m", "workspace": "ws", "client_id": "device"}"#;
    if engine.handle_text(now, info).is_err() {
        return 0;
    }
    let svc =
        ServiceSpec::new("sensor").visibility(Visibility::Public).function("read", FunctionSpec::new("read"));
    if engine.register_service(now, svc).is_err() {
        return 0;
    }
    let mut main = Map::new();
    main.insert("type", "method");
    main.insert("from", "ws/caller");
    main.insert("to", "ws/device");
    main.insert("method", "services.sensor.read");
    main.insert("session", "s1");
    let mut extra = Map::new();
    extra.insert("args", Value::Array(alloc::vec![1.into()]));
    extra.insert("promise", "*");
    extra.insert("t", 15.0);
    let bytes = encode_frame(&Frame { main, extra: Some(extra) });
    let _ = engine.handle_binary(now, &bytes);
    while let Some(e) = engine.poll_event() {
        if let Event::Invoke(inv) = e {
            let _ = engine.reply(now, inv.id, Ok(Value::F64(21.5)));
        }
    }
    let mut sent = 0;
    while let Some(t) = engine.poll_transmit() {
        if matches!(t, Transmit::Binary(_) | Transmit::Text(_)) {
            sent += 1;
        }
    }
    sent
}
