//! The five payload shapes of hypha-rpc's own codec benchmark, as `Value` trees shared by benches.
//!
//! Shapes follow `python/tests/bench_rpc_encode_decode.py` in `oeway/hypha-rpc` (flat primitives,
//! nested dicts, numpy arrays, tabular rows, mixed). `tests/py/bench_codec.py` builds the same
//! data in Python, deterministically (the upstream random arrays are replaced by a fixed
//! sequence), so both sides encode to identical bytes.

use bytes::Bytes;
use hypha_rpc_core::codec::rtype::{NdArray, RTypeCodec};
use hypha_rpc_core::codec::{DType, Scalar};
use hypha_rpc_core::{Map, Value};

/// One benchmark payload.
#[derive(Debug, Clone)]
pub struct Payload {
    /// Short name, identical to the key `tests/py/bench_codec.py` reports it under.
    pub name: &'static str,
    /// The tree, as the Python client's `_encode` would hand it to `msgpack.packb`.
    pub value: Value,
    /// `true` when top-level map values include `_rtype: "ndarray"` maps that a receiver parses.
    pub has_ndarrays: bool,
}

/// Every payload, in the order of the upstream benchmark.
pub fn all() -> Vec<Payload> {
    vec![
        Payload { name: "flat_400_keys", value: flat_primitives(100), has_ndarrays: false },
        Payload { name: "nested_depth4", value: nested(4, 4), has_ndarrays: false },
        Payload { name: "ndarray_10x1000_f32", value: numpy_arrays(10, 1000), has_ndarrays: true },
        Payload { name: "table_500_rows", value: tabular(500), has_ndarrays: false },
        Payload { name: "mixed", value: mixed(), has_ndarrays: true },
    ]
}

/// Flat dict of `4 * n` keys: `key_i` int, `str_i` string, `float_i` float64, `bool_i` bool.
pub fn flat_primitives(n: usize) -> Value {
    let mut m = Map::with_capacity(4 * n);
    for i in 0..n {
        m.push(format!("key_{i}"), i);
        m.push(format!("str_{i}"), format!("value_{i}"));
        m.push(format!("float_{i}"), i as f64 * 1.1);
        m.push(format!("bool_{i}"), i % 2 == 0);
    }
    Value::Map(m)
}

/// Dicts `child_0..child_{breadth-1}` nested `depth` levels, with small leaf dicts.
pub fn nested(depth: usize, breadth: usize) -> Value {
    if depth == 0 {
        let mut leaf = Map::with_capacity(3);
        leaf.push("value", 42);
        leaf.push("name", "leaf");
        leaf.push("active", true);
        return Value::Map(leaf);
    }
    let mut m = Map::with_capacity(breadth);
    for i in 0..breadth {
        m.push(format!("child_{i}"), nested(depth - 1, breadth));
    }
    Value::Map(m)
}

/// Element `k` of the deterministic float32 sequence that stands in for `np.random.randn`.
///
/// Always an exact multiple of 1/4096 in `[-8, 8)`, so numpy computes the very same bits.
pub fn sample_f32(k: u64) -> f32 {
    ((k * 40503) % 65536) as i32 as f32 / 4096.0 - 8.0
}

/// A 1-D float32 `ndarray` value holding `sample_f32(start..start + len)`.
fn sample_array(start: u64, len: usize) -> Value {
    let data: Vec<u8> = (start..start + len as u64).flat_map(|k| sample_f32(k).to_le_bytes()).collect();
    NdArray {
        data: Bytes::from(data),
        shape: vec![len as u64],
        dtype: DType::Native(Scalar::Float32),
        other: Map::new(),
    }
    .to_value()
}

/// A square float32 identity matrix (`np.eye(n, dtype=np.float32)`) as an `ndarray` value.
fn eye_f32(n: usize) -> Value {
    let mut data = Vec::with_capacity(n * n * 4);
    for r in 0..n {
        for c in 0..n {
            data.extend_from_slice(&(if r == c { 1.0f32 } else { 0.0 }).to_le_bytes());
        }
    }
    NdArray {
        data: Bytes::from(data),
        shape: vec![n as u64, n as u64],
        dtype: DType::Native(Scalar::Float32),
        other: Map::new(),
    }
    .to_value()
}

/// Dict of `n` float32 arrays of `len` elements (`array_i`) each followed by a label (`label_i`).
pub fn numpy_arrays(n: usize, len: usize) -> Value {
    let mut m = Map::with_capacity(2 * n);
    for i in 0..n {
        m.push(format!("array_{i}"), sample_array((i * len) as u64, len));
        m.push(format!("label_{i}"), format!("data_{i}"));
    }
    Value::Map(m)
}

/// List of `rows` dicts: `id`, `name`, `value` float64, `active` bool, three `tags`.
#[expect(clippy::approx_constant, reason = "upstream's `i * 3.14`, not pi")]
pub fn tabular(rows: usize) -> Value {
    Value::Array(
        (0..rows)
            .map(|i| {
                let mut row = Map::with_capacity(5);
                row.push("id", i);
                row.push("name", format!("item_{i}"));
                row.push("value", i as f64 * 3.14);
                row.push("active", i % 3 == 0);
                row.push("tags", Value::Array((0..3).map(|j| Value::from(format!("tag_{j}"))).collect()));
                Value::Map(row)
            })
            .collect(),
    )
}

/// Metadata with a deep chain, 50 small item dicts, a 100×100 float32 identity matrix, 20 flags.
pub fn mixed() -> Value {
    let mut c = Map::new();
    c.push("c", "deep");
    let mut b = Map::new();
    b.push("b", c);
    let mut a = Map::new();
    a.push("a", b);
    let mut metadata = Map::new();
    metadata.push("version", "1.0");
    metadata.push("count", 100);
    metadata.push("nested", a);

    let items = (0..50)
        .map(|i| {
            let mut item = Map::with_capacity(2);
            item.push("id", i);
            item.push("val", i as f64 * 2.5);
            Value::Map(item)
        })
        .collect::<Vec<_>>();

    let flags = (0..20).map(|i| (format!("flag_{i}"), i % 2 == 0)).collect::<Map>();

    let mut m = Map::with_capacity(4);
    m.push("metadata", metadata);
    m.push("items", items);
    m.push("matrix", eye_f32(100));
    m.push("flags", flags);
    Value::Map(m)
}
