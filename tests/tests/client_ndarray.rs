//! `hypha_rpc::ndarray` (feature `ndarray`) against a real Python `hypha-rpc` client with numpy,
//! through the real Hypha server.
//!
//! A: Python (`tests/py/ndarray_peer.py`, command `call_rust`) sends arrays of every supported
//! dtype (bool, int8 ... uint64, float32, float64) in many shapes and layouts (0-d, numpy scalar,
//! 1-d, 3-d, empty, sliced, negative strides, Fortran order, a column, big-endian) to a Rust
//! service that receives them as `NdArray<T>`, checks every element against the list Python
//! sent beside it, and returns the array transformed (not / +1 / ×2) and transposed, which
//! Python checks with `np.array_equal`, dtype and shape. Also: `AnyNdArray`, plain bytes and a
//! JS-style `typedarray` map, a 4 MiB array, and the errors for complex, float16, strings,
//! mismatched dtypes, non-arrays and a wrong byte length.
//!
//! B: Rust builds arrays with `ndarray` (every dtype; 0-d, 1-d, 3-d, empty, Fortran order,
//! sliced, transposed) and sends them to the Python service `py-nd`, which checks them as numpy
//! arrays and answers them transposed; plus a struct with a `serde_array` field.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hypha_rpc::ndarray::{AnyNdArray, Element, NdArray};
use hypha_rpc::{Server, ServerConfig, Service, ServiceProxy, Visibility};
use hypha_rpc_tests::pypeer::PyPeer;
use hypha_rpc_tests::server::HyphaServer;
use ndarray::{Array, Array2, ArrayD, IxDyn, ShapeBuilder, s};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

// ---- element helpers shared with the Python script ------------------------------------------------

/// What both sides agree on: `samples(n)` is `samples(dtype, n)` in `ndarray_peer.py`, and
/// `bump` is its `bump` (not, wrapping +1, ×2).
trait TestElem: Element + Serialize + DeserializeOwned {
    fn samples(n: usize) -> Vec<Self>;
    fn bump(self) -> Self;
    /// Equality that treats NaN as equal to NaN and tells -0.0 from 0.0.
    fn same(a: Self, b: Self) -> bool {
        a == b
    }
}

impl TestElem for bool {
    fn samples(n: usize) -> Vec<bool> {
        (0..n).map(|i| i % 3 == 0).collect()
    }
    fn bump(self) -> bool {
        !self
    }
}

macro_rules! int_elems {
    ($($t:ty: $shift:expr),*) => {$(
        impl TestElem for $t {
            fn samples(n: usize) -> Vec<$t> {
                let special = [<$t>::MIN, <$t>::MAX, 0, 1, <$t>::MAX - 1];
                (0..n)
                    .map(|i| if i < special.len() { special[i] } else { ((i * 37 % 200) as i64 - $shift) as $t })
                    .collect()
            }
            fn bump(self) -> $t {
                self.wrapping_add(1)
            }
        }
    )*};
}
int_elems!(i8: 100, i16: 100, i32: 100, i64: 100, u8: 0, u16: 0, u32: 0, u64: 0);

macro_rules! float_elems {
    ($($t:ty),*) => {$(
        impl TestElem for $t {
            fn samples(n: usize) -> Vec<$t> {
                let special =
                    [0.0, -0.0, 1.5, -2.25, <$t>::MAX, <$t>::MIN_POSITIVE, <$t>::INFINITY, <$t>::NEG_INFINITY, <$t>::NAN];
                (0..n).map(|i| if i < special.len() { special[i] } else { (i as $t - 50.0) / 8.0 }).collect()
            }
            fn bump(self) -> $t {
                self * 2.0
            }
            fn same(a: $t, b: $t) -> bool {
                (a.is_nan() && b.is_nan()) || (a == b && a.is_sign_negative() == b.is_sign_negative())
            }
        }
    )*};
}
float_elems!(f32, f64);

fn same_arrays<T: TestElem>(a: &ArrayD<T>, b: &ArrayD<T>) -> bool {
    a.shape() == b.shape() && a.iter().zip(b.iter()).all(|(x, y)| T::same(*x, *y))
}

// ---- the Rust service (part A) ------------------------------------------------------------------

/// How many received arrays of more-than-one-byte elements could be viewed in place.
static VIEWED: AtomicUsize = AtomicUsize::new(0);
static COPIED: AtomicUsize = AtomicUsize::new(0);

fn note_view<T: Element>(a: &NdArray<T>) {
    if size_of::<T>() > 1 && !a.is_empty() {
        let counter = if a.view().is_some() { &VIEWED } else { &COPIED };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Checks `arr` against the elements and shape Python sent beside it; returns it bumped and
/// transposed (sent from a non-standard layout).
async fn echo<T: TestElem>(arr: NdArray<T>, flat: Vec<T>, shape: Vec<usize>) -> Result<NdArray<T>, String> {
    let name = T::SCALAR.name();
    let dtype = arr.dtype().to_string();
    let dtype_ok = if arr.is_big_endian() { dtype.starts_with('>') } else { dtype == name };
    if !dtype_ok {
        return Err(format!("{name}: dtype {dtype}"));
    }
    if arr.shape() != shape.as_slice() {
        return Err(format!("{name}: shape {:?}, Python said {shape:?}", arr.shape()));
    }
    note_view(&arr);
    let a = arr.as_cow();
    if a.len() != flat.len() || !a.iter().zip(&flat).all(|(x, y)| T::same(*x, *y)) {
        return Err(format!("{name}: elements {:?}, Python said {flat:?}", a.iter().collect::<Vec<_>>()));
    }
    if arr.to_vec().len() != flat.len() || !same_arrays(&arr.to_array(), &a.to_owned()) {
        return Err(format!("{name}: to_vec/to_array disagree with the view"));
    }
    let bumped = a.mapv(T::bump);
    Ok(NdArray::from(&bumped.t()))
}

#[derive(Serialize)]
struct Large {
    sum: f64,
    back: NdArray<f32>,
}

fn rust_service() -> Service {
    Service::new("rust-nd")
        .visibility(Visibility::Public)
        .function("echo_bool", echo::<bool>)
        .function("echo_int8", echo::<i8>)
        .function("echo_uint8", echo::<u8>)
        .function("echo_int16", echo::<i16>)
        .function("echo_uint16", echo::<u16>)
        .function("echo_int32", echo::<i32>)
        .function("echo_uint32", echo::<u32>)
        .function("echo_int64", echo::<i64>)
        .function("echo_uint64", echo::<u64>)
        .function("echo_float32", echo::<f32>)
        .function("echo_float64", echo::<f64>)
        .function("describe_any", |a: AnyNdArray| async move {
            Ok::<_, String>((a.dtype().to_string(), a.shape().to_vec()))
        })
        .function("large", |a: NdArray<f32>| async move {
            note_view(&a);
            let view = a.as_cow();
            let sum = view.iter().map(|&x| f64::from(x)).sum();
            Ok::<_, String>(Large { sum, back: NdArray::from(&view.t()) })
        })
}

// The Python peer (`tests/py/ndarray_peer.py`) is driven by `hypha_rpc_tests::pypeer::PyPeer`:
// plain command lines in, JSON event lines out.

// ---- part B: Rust sends ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(bound = "T: TestElem")]
struct CheckReply<T: TestElem> {
    ok: bool,
    detail: String,
    back: Option<NdArray<T>>,
}

/// Arrays built in Rust, in several shapes and layouts, checked by Python as numpy arrays.
async fn rust_sends<T: TestElem>(py: &ServiceProxy) -> usize {
    let name = T::SCALAR.name();
    let x = T::samples(120);
    let grid = Array2::from_shape_vec((6, 20), x.clone()).unwrap();
    let cases: Vec<(&str, ArrayD<T>)> = vec![
        ("0d", ArrayD::from_elem(IxDyn(&[]), x[1])),
        ("1d", Array::from_vec(x[..11].to_vec()).into_dyn()),
        ("3d", Array::from_shape_vec((2, 3, 4), x[..24].to_vec()).unwrap().into_dyn()),
        ("empty", ArrayD::from_shape_vec(IxDyn(&[0]), vec![]).unwrap()),
        ("empty3d", ArrayD::from_shape_vec(IxDyn(&[2, 0, 3]), vec![]).unwrap()),
        ("fortran", Array::from_shape_vec((3, 4).f(), x[..12].to_vec()).unwrap().into_dyn()),
    ];
    // Views are sent without making them owned first.
    let sliced = grid.slice(s![..;2, 1..;3]);
    let transposed = grid.t();
    let reversed = grid.slice(s![..;-1, 4]);
    let views: Vec<(&str, ArrayD<T>, NdArray<T>)> = vec![
        ("sliced", sliced.to_owned().into_dyn(), NdArray::from(&sliced)),
        ("transposed", transposed.to_owned().into_dyn(), NdArray::from(&transposed)),
        ("reversed_column", reversed.to_owned().into_dyn(), NdArray::from(&reversed)),
    ];
    let all = cases.into_iter().map(|(c, a)| (c, a.clone(), NdArray::from(a))).chain(views);
    let mut n = 0;
    for (case, a, nd) in all {
        assert_eq!(nd.dtype().to_string(), name);
        let flat: Vec<T> = a.iter().copied().collect();
        let r: CheckReply<T> = py
            .call("check", (nd, name, a.shape().to_vec(), flat))
            .await
            .unwrap_or_else(|e| panic!("{name}/{case}: check failed: {e}"));
        assert!(r.ok, "{name}/{case}: Python says {}", r.detail);
        let back = r.back.unwrap_or_else(|| panic!("{name}/{case}: no array back"));
        let want = a.t().to_owned();
        assert!(same_arrays(&back.to_array(), &want), "{name}/{case}: back {back:?} is not {want:?}");
        n += 1;
    }
    n
}

#[derive(Serialize)]
struct Frame {
    label: String,
    #[serde(with = "hypha_rpc::ndarray::serde_array")]
    pixels: Array2<u8>,
}

async fn rust_calls_python(rs: &Server, py_svc: &str) {
    let py = rs.get_service(py_svc).await.expect("get py-nd");
    let mut n = 0;
    n += rust_sends::<bool>(&py).await;
    n += rust_sends::<i8>(&py).await;
    n += rust_sends::<u8>(&py).await;
    n += rust_sends::<i16>(&py).await;
    n += rust_sends::<u16>(&py).await;
    n += rust_sends::<i32>(&py).await;
    n += rust_sends::<u32>(&py).await;
    n += rust_sends::<i64>(&py).await;
    n += rust_sends::<u64>(&py).await;
    n += rust_sends::<f32>(&py).await;
    n += rust_sends::<f64>(&py).await;
    println!("B: {n} arrays built in Rust checked by numpy and returned transposed");

    let pixels = Array2::from_shape_fn((3, 5), |(i, j)| (i * 5 + j) as u8 * 10);
    let sum: u64 = pixels.iter().map(|&p| u64::from(p)).sum();
    let frame = Frame { label: "f1".into(), pixels };
    let got: Json = py.call("check_frame", (frame,)).await.expect("check_frame");
    assert_eq!(
        got,
        serde_json::json!({"label": "f1", "is_ndarray": true, "dtype": "uint8", "shape": [3, 5], "sum": sum})
    );
}

// ---- the test -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numpy_arrays_both_ways() {
    let started = Instant::now();
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let rs = hypha_rpc_tokio::connect_to_server(
        ServerConfig::new(hs.url()).client_id("rs-nd").method_timeout(Duration::from_secs(60)),
    )
    .await
    .expect("connect rs-nd");
    let ws = rs.workspace().to_string();
    let token = rs.generate_token(None).await.expect("generate_token");
    let rust_svc = rs.register_service(rust_service()).await.expect("register rust-nd");

    let rt: Arc<dyn hypha_rpc::runtime::Runtime> = Arc::new(hypha_rpc_tokio::TokioRuntime);
    let mut py = PyPeer::start(&hs, rt, "ndarray_peer.py", &[&ws, &token, &rust_svc]);
    let ready = py.event("ready", Duration::from_secs(60)).await;
    let py_svc = ready["service_id"].as_str().expect("service_id").to_string();
    println!("server, Rust client and Python peer up after {:?}", started.elapsed());

    // A: Python calls Rust.
    let t = Instant::now();
    py.send_line("call_rust");
    let out = py.event("results", Duration::from_secs(300)).await;
    assert!(out.get("error").is_none(), "call_rust raised: {}\n{}", out["error"], py.stderr_tail());
    let results = out["results"].as_array().expect("results");
    let failed: Vec<&Json> = results.iter().filter(|r| r["ok"] != true).collect();
    for f in &failed {
        eprintln!("FAILED {}: {}", f["case"], f["detail"]);
    }
    assert!(failed.is_empty(), "{} of {} Python → Rust cases failed", failed.len(), results.len());
    // Every dtype and every layout were exercised.
    let cases: Vec<&str> = results.iter().filter_map(|r| r["case"].as_str()).collect();
    for dtype in ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32"]
    {
        for layout in
            ["0d", "scalar", "1d", "3d", "empty", "empty3d", "slice", "reversed", "fortran", "column"]
        {
            let case = format!("{dtype}/{layout}");
            assert!(cases.contains(&case.as_str()), "missing case {case}");
        }
    }
    for case in
        ["int16/bigendian", "uint64/bigendian", "float64/bigendian", "float64/fortran", "error/length"]
    {
        assert!(cases.contains(&case), "missing case {case}");
    }
    println!(
        "A: {} Python → Rust cases passed in {:?} (received multi-byte arrays viewed in place: {}, copied: {})",
        results.len(),
        t.elapsed(),
        VIEWED.load(Ordering::Relaxed),
        COPIED.load(Ordering::Relaxed),
    );

    // B: Rust calls Python.
    let t = Instant::now();
    rust_calls_python(&rs, &py_svc).await;
    println!("B: done in {:?}", t.elapsed());

    py.send_line("leave");
    let status = py.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "the Python peer failed: {status}");
    rs.disconnect().await;
    println!("total {:?}", started.elapsed());
}
