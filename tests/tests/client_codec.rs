//! Custom codecs (issue #8.2) through the real server: a Rust `Point` and a Python `Point`
//! class with a registered codec of the same name turn into each other, in arguments, results
//! and lists, both ways.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use hypha_rpc::codec::{Codec, Coded};
use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::{ServerConfig, Service, Visibility, connect_to_server};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Point {
    x: f64,
    y: f64,
}

impl Codec for Point {
    const NAME: &'static str = "Point";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_type_round_trips_through_a_python_codec() {
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let server = connect_to_server(ServerConfig::new(hs.url())).await.expect("connect");
    let svc = Service::new("shapes")
        .visibility(Visibility::Public)
        .function("shift", |p: Coded<Point>, by: f64| async move {
            Ok::<_, String>(Coded(Point { x: p.x + by, y: p.y + by }))
        })
        .function("line", |n: u32| async move {
            Ok::<_, String>(
                (0..n).map(|i| Coded(Point { x: i as f64, y: 2.0 * i as f64 })).collect::<Vec<_>>(),
            )
        });
    let id = server.register_service(svc).await.expect("register");
    let token = server.generate_token(None).await.unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/codec_peer.py");
    let mut py = Command::new(hs.python())
        .args([script, hs.url(), server.workspace(), &token, &id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python peer");
    let mut out = BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).expect("READY");
    let py_id = line.trim().strip_prefix("READY ").unwrap_or_else(|| panic!("{line:?}")).to_string();

    // Rust -> Python: our Point arrives as a Python Point (norm asserts it), and Python's
    // Points come back as ours.
    let geo = server.get_service(&py_id).await.expect("geometry");
    let n: f64 = geo.call("norm", (Coded(Point { x: 3.0, y: 4.0 }),)).await.expect("norm");
    assert_eq!(n, 5.0);
    let p: Coded<Point> = geo.call("make", (1.0, 2.0)).await.expect("make");
    assert_eq!(p.0, Point { x: 1.0, y: 2.0 });
    let kinds: Vec<String> = geo
        .call("kinds", (vec![Coded(Point { x: 0.0, y: 0.0 }), Coded(Point { x: 1.0, y: 1.0 })],))
        .await
        .unwrap();
    assert_eq!(kinds, ["Point", "Point"]);
    // Not a Point: a clear decoding error, not a silent wrong value.
    let e = geo.call::<Coded<Point>>("norm", (Coded(Point { x: 3.0, y: 4.0 }),)).await.unwrap_err();
    assert!(matches!(e, hypha_rpc::Error::Decode(_)) && e.to_string().contains("expected a map"), "{e}");

    // Python -> Rust.
    let _ = writeln!(py.stdin.take().unwrap());
    line.clear();
    out.read_line(&mut line).expect("results");
    let r: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(r["shift_type"], "Point", "{r}");
    assert_eq!(r["shift"], serde_json::json!([11.5, 8.0]));
    assert_eq!(r["line"], serde_json::json!([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]));
    assert!(py.wait().unwrap().success());
    server.disconnect().await;
}
