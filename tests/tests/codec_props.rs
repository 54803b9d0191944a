//! Property tests of the codec: any value and any typed `_rtype` object round-trips exactly,
//! and arbitrary bytes never panic the decoder nor make it allocate more than the input backs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use hypha_rpc_core::codec::rtype::*;
use hypha_rpc_core::codec::{DType, Frame, Scalar, decode_frame, decode_value, encode_frame, to_vec};
use hypha_rpc_core::{Limits, Map, Value};
use proptest::prelude::*;

// ---- allocation accounting, per thread so parallel tests do not disturb each other ----------

struct Counting;
thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}
fn grow(n: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + n;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}
fn shrink(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
}
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grow(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        shrink(l.size());
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        grow(n);
        shrink(l.size());
        unsafe { System.realloc(p, l, n) }
    }
}
#[global_allocator]
static A: Counting = Counting;

/// Peak bytes allocated (above the level at entry) while `f` runs on this thread.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get) - base)
}

/// What one input byte may cost at most: one `Value` slot (arrays reserve one per declared
/// element, and every element needs at least one byte), plus slack for small fixed overheads.
fn alloc_bound(input_len: usize) -> usize {
    input_len * (std::mem::size_of::<Value>() + 8) + 4096
}

// ---- strategies -------------------------------------------------------------------------------

fn leaf(nan: bool) -> impl Strategy<Value = Value> {
    let f64s =
        if nan { any::<f64>().boxed() } else { any::<f64>().prop_filter("no NaN", |f| !f.is_nan()).boxed() };
    let f32s =
        if nan { any::<f32>().boxed() } else { any::<f32>().prop_filter("no NaN", |f| !f.is_nan()).boxed() };
    prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-40i64..300).prop_map(Value::from),
        f32s.prop_map(Value::F32),
        f64s.prop_map(Value::F64),
        ".{0,40}".prop_map(Value::from),
        prop::collection::vec(any::<u8>(), 0..300).prop_map(Value::bin),
        (any::<i8>(), prop::collection::vec(any::<u8>(), 0..20)).prop_map(|(t, b)| Value::Ext(t, b.into())),
    ]
}

fn value(nan: bool) -> impl Strategy<Value = Value> {
    leaf(nan).prop_recursive(5, 128, 20, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..20).prop_map(Value::Array),
            prop::collection::vec(
                (prop_oneof![3 => "[a-z_]{0,12}".prop_map(Value::from), 1 => inner.clone()], inner),
                0..20
            )
            .prop_map(|kv| Value::Map(kv.into())),
        ]
    })
}

fn opt_str() -> impl Strategy<Value = Option<String>> {
    prop::option::of("[ -~]{0,40}")
}

/// Extra keys that cannot collide with any known field.
fn other_map() -> impl Strategy<Value = Map> {
    prop::collection::vec(("x_[a-z]{0,6}", value(false)), 0..3).prop_map(|kv| {
        let mut m = Map::new();
        for (k, v) in kv {
            m.insert(k, v);
        }
        m
    })
}

fn promise() -> impl Strategy<Value = PromiseMode> {
    prop_oneof![Just(PromiseMode::Compact), Just(PromiseMode::Full), Just(PromiseMode::None)]
}

fn method() -> impl Strategy<Value = Method> {
    (
        (
            "[ -~]{0,30}",
            "[ -~]{0,30}",
            prop::option::of(promise()),
            opt_str(),
            opt_str(),
            prop::option::of(any::<bool>()),
        ),
        (
            prop::option::of(prop_oneof![Just(Value::Nil), ".{0,30}".prop_map(Value::from)]),
            prop::option::of(value(false)),
            prop::option::of(prop::collection::vec(any::<u8>(), 32..=32)),
            any::<bool>(),
            other_map(),
        ),
    )
        .prop_map(
            |((target, method, promise, server, name, is_async), (doc, schema, enc, callback, other))| {
                // A callback layout is only recognisable when both `_rname` and `_rpromise` exist.
                let callback = callback && name.is_some() && promise.is_some();
                Method {
                    target,
                    method,
                    promise,
                    server,
                    name,
                    is_async,
                    doc,
                    schema,
                    enc_pub: enc.map(Bytes::from),
                    layout: if callback { MethodLayout::Callback } else { MethodLayout::Service },
                    other,
                }
            },
        )
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        prop::sample::select(Scalar::ALL.to_vec()).prop_map(DType::Native),
        prop::sample::select(Scalar::ALL.to_vec())
            .prop_filter("multi-byte", |s| s.size() > 1)
            .prop_map(DType::BigEndian),
        prop::sample::select(vec!["<U5", "object", "<f4", "datetime64[ns]", "|S3"])
            .prop_map(|s| DType::Other(s.into())),
    ]
}

fn rtype() -> impl Strategy<Value = RType> {
    let nd =
        (dtype(), prop::collection::vec(0u64..5, 0..4), other_map()).prop_map(|(dtype, shape, other)| {
            let n = shape.iter().product::<u64>() as usize * dtype.item_size().unwrap_or(1);
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            RType::NdArray(NdArray { data: data.into(), shape, dtype, other })
        });
    let typed = (prop::sample::select(Scalar::ALL.to_vec()), 0usize..10).prop_map(|(s, n)| {
        RType::TypedArray(TypedArray {
            data: vec![7u8; n * s.size()].into(),
            dtype: DType::Native(s),
            other: Map::new(),
        })
    });
    prop_oneof![
        method().prop_map(RType::Method),
        ("[ -~]{0,20}", "[ -~]{0,20}", opt_str(), opt_str(), prop::option::of(promise()), other_map())
            .prop_map(|(target, method, close_method, server, promise, other)| RType::Generator(Generator {
                server,
                target,
                method,
                close_method,
                promise,
                doc: Some("Remote generator".into()),
                other,
            })),
        Just(RType::StopIteration),
        nd,
        typed,
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| RType::MemoryView(MemoryView(b.into()))),
        prop::collection::vec(value(false), 0..5).prop_map(|v| RType::Set(Set(v))),
        prop::collection::vec((value(false), value(false)), 0..5)
            .prop_map(|v| RType::OrderedMap(OrderedMap(v))),
        (".{0,60}", opt_str(), other_map()).prop_map(|(message, trace, other)| RType::Error(RemoteError {
            message,
            trace,
            other
        })),
        (prop::collection::vec(("p[a-z]{0,6}", value(false)), 0..4), opt_str()).prop_map(|(kv, native)| {
            let mut props = Map::new();
            for (k, v) in kv {
                props.insert(k, v);
            }
            RType::IoStream(IoStream { props, native })
        }),
        ("custom_[a-z]{1,8}", other_map()).prop_map(|(name, fields)| RType::Custom { name, fields }),
    ]
}

// ---- properties -------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn values_round_trip_exactly(v in value(false)) {
        let bytes = Bytes::from(to_vec(&v));
        let (back, used) = decode_value(&bytes, &Limits::default()).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&back, &v);
    }

    #[test]
    fn values_with_nan_round_trip_bytewise(v in value(true)) {
        let bytes = Bytes::from(to_vec(&v));
        let (back, _) = decode_value(&bytes, &Limits::default()).unwrap();
        prop_assert_eq!(to_vec(&back), bytes.to_vec());
    }

    #[test]
    fn our_bytes_match_rmp(v in value(true)) {
        // rmp (via rmpv) also writes the smallest forms; the two must agree byte for byte.
        let mut theirs = Vec::new();
        rmpv::encode::write_value(&mut theirs, &rmpv::Value::from(v.clone())).unwrap();
        prop_assert_eq!(to_vec(&v), theirs);
    }

    #[test]
    fn rtypes_round_trip_exactly(t in rtype()) {
        let bytes = Bytes::from(to_vec(&t.to_value()));
        let (back, _) = decode_value(&bytes, &Limits::default()).unwrap();
        let parsed = RType::from_value(&back).expect("typed map").expect("valid fields");
        prop_assert_eq!(&parsed, &t);
        prop_assert_eq!(to_vec(&parsed.to_value()), bytes.to_vec());
    }

    #[test]
    fn frames_round_trip(main in prop::collection::vec(("[a-z]{1,8}", value(false)), 0..6),
                         extra in prop::option::of(prop::collection::vec(("[a-z]{1,8}", value(false)), 0..6))) {
        let to_map = |kv: Vec<(String, Value)>| kv.into_iter().collect::<Map>();
        let frame = Frame { main: to_map(main), extra: extra.map(to_map) };
        let bytes = encode_frame(&frame);
        prop_assert_eq!(decode_frame(&bytes, &Limits::default()).unwrap(), frame);
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_overallocate(input in prop::collection::vec(any::<u8>(), 0..2048)) {
        let bytes = Bytes::from(input);
        let limits = Limits::default();
        let (_, peak) = peak_during(|| decode_frame(&bytes, &limits));
        prop_assert!(peak <= alloc_bound(bytes.len()), "{} bytes allocated {}", bytes.len(), peak);
        let (_, peak) = peak_during(|| decode_value(&bytes, &limits));
        prop_assert!(peak <= alloc_bound(bytes.len()));
    }

    #[test]
    fn mutated_valid_frames_never_panic_or_overallocate(v in value(false), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        // Valid structure with a few corrupted bytes reaches deeper decoder paths than noise.
        let mut bytes = to_vec(&v);
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        let bytes = Bytes::from(bytes);
        let (_, peak) = peak_during(|| decode_value(&bytes, &Limits::default()));
        prop_assert!(peak <= alloc_bound(bytes.len()), "{} bytes allocated {}", bytes.len(), peak);
    }
}

/// Headers that claim gigabytes cost nothing: every claim is checked against the input first.
#[test]
fn hostile_headers_allocate_nothing_big() {
    let limits = Limits::default();
    let cases: &[&[u8]] = &[
        &[0xdd, 0xff, 0xff, 0xff, 0xff],       // array32 of 4 G elements
        &[0xdf, 0xff, 0xff, 0xff, 0xff],       // map32
        &[0xdd, 0x00, 0x0f, 0xff, 0xff, 0x01], // array of 1 M with one element present
        &[0xdb, 0x00, 0xff, 0xff, 0xff],       // str32 of 16 MiB
        &[0xc6, 0x00, 0xff, 0xff, 0xff],       // bin32
        &[0xc9, 0x00, 0xff, 0xff, 0xff, 0x01], // ext32
    ];
    for &case in cases {
        let bytes = Bytes::copy_from_slice(case);
        let (r, peak) = peak_during(|| decode_value(&bytes, &limits));
        assert!(r.is_err(), "{case:x?} decoded");
        assert!(peak < 1024, "{case:x?} allocated {peak} bytes");
    }
    // A depth bomb: 100 000 nested arrays is refused at the depth cap, without recursing further.
    let bomb = Bytes::from(vec![0x91u8; 100_000]);
    let (r, peak) = peak_during(|| decode_value(&bomb, &limits));
    assert!(matches!(r, Err(hypha_rpc_core::codec::DecodeError::TooDeep { .. })), "{r:?}");
    assert!(peak < 64 * 1024, "depth bomb allocated {peak}");
    // Invalid UTF-8 in a key is an error, not a panic.
    let bad_key = Bytes::from_static(&[0x81, 0xa2, 0xc3, 0x28, 0x01]);
    assert!(decode_value(&bad_key, &limits).is_err());
}
