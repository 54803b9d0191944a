//! Real-server smoke test: Python clients talk through a recording proxy; our codec must handle every frame.
//!
//! 1. Start the pinned Hypha server ([`HyphaServer`]).
//! 2. Start a loopback WebSocket proxy that forwards every message unchanged between a client
//!    and the server's `/ws` and records each binary message with its direction. The proxy does
//!    not negotiate permessage-deflate, so frames pass uncompressed.
//! 3. Run `tests/py/smoke_client.py`: a provider registers a service, a caller fetches it with
//!    `get_service` and calls it (positional, kwargs, bytes, error); check the printed results.
//! 4. Every recorded binary frame must decode with `decode_frame`; every client-sent one must
//!    re-encode byte for byte with `encode_frame`; plus structural checks on the protocol.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hypha_rpc_core::codec::{Frame, decode_frame, decode_value, encode_frame};
use hypha_rpc_core::{Limits, Value};
use hypha_rpc_tests::server::{HyphaServer, workspace_root};
use tungstenite::handshake::server::{Callback, ErrorResponse, Request, Response};
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

/// Longest the Python clients may run before the test kills them and fails.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the proxy may take to see every connection close after the clients exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Client → server: bytes exactly as the Python client packed them.
    ToServer,
    /// Server → client: bytes as delivered after the server's rewrite of `main`.
    ToClient,
}

#[derive(Debug, Clone)]
struct Recorded {
    conn: usize,
    dir: Dir,
    data: Bytes,
}

/// A socket whose writes can be muted. The proxy reads each socket through one `WebSocket`
/// and writes it through another; the reading one must not answer pings or closes itself,
/// since the far end answers them through the proxy.
struct ReadHalf {
    tcp: TcpStream,
    mute: bool,
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.read(buf)
    }
}

impl Write for ReadHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.mute { Ok(buf.len()) } else { self.tcp.write(buf) }
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.mute { Ok(()) } else { self.tcp.flush() }
    }
}

/// State shared by the proxy's threads.
#[derive(Default)]
struct Shared {
    frames: Mutex<Vec<Recorded>>,
    text_frames: AtomicUsize,
    connections: AtomicUsize,
    active: AtomicUsize,
    errors: Mutex<Vec<String>>,
    sockets: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

/// A loopback WebSocket proxy in front of the server's port; one thread per direction.
struct Proxy {
    port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind proxy on 127.0.0.1:0");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let conn = sh.connections.fetch_add(1, Ordering::SeqCst);
                sh.active.fetch_add(1, Ordering::SeqCst);
                let sh = sh.clone();
                thread::spawn(move || {
                    if let Err(e) = proxy_connection(conn, stream, upstream_port, &sh) {
                        sh.errors.lock().unwrap().push(format!("connection {conn}: {e}"));
                        sh.active.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        Proxy { port, shared }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until every proxied connection has closed; false on timeout.
    fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.shared.active.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for s in self.shared.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
    }
}

/// Handshake callback that remembers the request's path and query and accepts unchanged
/// (so no extension, permessage-deflate included, is negotiated).
struct PathRecorder<'a>(&'a mut String);

impl Callback for PathRecorder<'_> {
    fn on_request(self, req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
        if let Some(pq) = req.uri().path_and_query() {
            *self.0 = pq.as_str().to_owned();
        }
        Ok(resp)
    }
}

/// Handshakes with the client, connects upstream with the same path, then pumps both ways.
fn proxy_connection(
    conn: usize,
    client: TcpStream,
    upstream_port: u16,
    sh: &Arc<Shared>,
) -> Result<(), String> {
    let io = |what: &'static str| move |e: io::Error| format!("{what}: {e}");
    client.set_nodelay(true).map_err(io("nodelay"))?;
    let mut path = String::from("/ws");
    let read_client = ReadHalf { tcp: client.try_clone().map_err(io("clone"))?, mute: false };
    let mut client_rd = tungstenite::accept_hdr(read_client, PathRecorder(&mut path))
        .map_err(|e| format!("client handshake: {e}"))?;

    let upstream =
        TcpStream::connect((Ipv4Addr::LOCALHOST, upstream_port)).map_err(io("connect upstream"))?;
    upstream.set_nodelay(true).map_err(io("nodelay"))?;
    let read_upstream = ReadHalf { tcp: upstream.try_clone().map_err(io("clone"))?, mute: false };
    let url = format!("ws://127.0.0.1:{upstream_port}{path}");
    let (mut server_rd, _) =
        tungstenite::client(url.as_str(), read_upstream).map_err(|e| format!("upstream handshake: {e}"))?;
    client_rd.get_mut().mute = true;
    server_rd.get_mut().mute = true;
    let client_wr = WebSocket::from_raw_socket(client.try_clone().map_err(io("clone"))?, Role::Server, None);
    let server_wr =
        WebSocket::from_raw_socket(upstream.try_clone().map_err(io("clone"))?, Role::Client, None);
    {
        let mut socks = sh.sockets.lock().unwrap();
        socks.push(client.try_clone().map_err(io("clone"))?);
        socks.push(upstream.try_clone().map_err(io("clone"))?);
    }
    let done = Arc::new(AtomicUsize::new(0));
    let pair = Arc::new((client, upstream));
    let (sh2, done2, pair2) = (sh.clone(), done.clone(), pair.clone());
    thread::spawn(move || pump(conn, Dir::ToClient, server_rd, client_wr, &sh2, &done2, &pair2));
    pump(conn, Dir::ToServer, client_rd, server_wr, sh, &done, &pair);
    Ok(())
}

/// Forwards messages from `rd` to `wr` until `rd` ends, recording binary ones. The second pump
/// of a connection to finish closes both sockets; after an abrupt end (no close frame) the
/// first one does, so the other pump's blocking read ends too.
fn pump(
    conn: usize,
    dir: Dir,
    mut rd: WebSocket<ReadHalf>,
    mut wr: WebSocket<TcpStream>,
    sh: &Shared,
    done: &AtomicUsize,
    sockets: &(TcpStream, TcpStream),
) {
    let mut saw_close = false;
    while let Ok(msg) = rd.read() {
        match &msg {
            Message::Binary(data) => {
                sh.frames.lock().unwrap().push(Recorded { conn, dir, data: data.clone() });
            }
            Message::Text(_) => {
                sh.text_frames.fetch_add(1, Ordering::SeqCst);
            }
            Message::Close(_) => saw_close = true,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        if wr.send(msg).is_err() {
            break;
        }
    }
    let finished = done.fetch_add(1, Ordering::SeqCst) + 1;
    if finished == 1 && saw_close {
        // Orderly close: give the other direction time to carry the peer's close reply.
        let deadline = Instant::now() + Duration::from_secs(5);
        while done.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = sockets.0.shutdown(Shutdown::Both);
    let _ = sockets.1.shutdown(Shutdown::Both);
    if finished == 2 {
        sh.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Output of a finished child process.
struct Finished {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Waits for `child` (with piped stdout/stderr) for at most `timeout`; kills it on timeout.
fn wait_bounded(mut child: Child, timeout: Duration) -> Result<Finished, String> {
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Finished { status, stdout, stderr }),
        None => Err(format!("killed after {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}")),
    }
}

fn str_at<'a>(frame: &'a Frame, key: &str) -> Option<&'a str> {
    frame.main.get(key).and_then(Value::as_str)
}

fn extra_get<'a>(frame: &'a Frame, key: &str) -> Option<&'a Value> {
    frame.extra.as_ref().and_then(|e| e.get(key))
}

fn first_arg(frame: &Frame) -> Option<&Value> {
    extra_get(frame, "args").and_then(Value::as_array).and_then(|a| a.first())
}

fn first_diff(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()))
}

/// The bytes `tests/py/smoke_client.py` echoes (keep in sync with `ECHO_BYTES` there).
fn echo_bytes() -> Vec<u8> {
    let mut v: Vec<u8> = (0..=255u8).collect();
    for _ in 0..8 {
        v.extend_from_slice(&[0x00, 0xff]);
    }
    v
}

fn expected_nested(name: &str, n: i64) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "n": n,
        "items": [1, -2, 2.5, "three", null, true, false],
        "inner": {"list": [[1, 2], [3], []], "map": {"a": {"b": name}}, "empty": {}},
        "big": 1u64 << 40,
    })
}

#[test]
fn python_clients_through_recording_proxy() {
    let started = Instant::now();
    let server = HyphaServer::start().unwrap_or_else(|e| panic!("cannot start the real hypha server: {e}"));
    println!("hypha server {} ready in {:?}", server.url(), started.elapsed());
    let proxy = Proxy::start(server.port());

    // --- Python clients through the proxy ---------------------------------------------------
    let script = workspace_root().expect("workspace root").join("tests/py/smoke_client.py");
    let child = Command::new(server.python())
        .arg(&script)
        .arg(proxy.url())
        .current_dir(script.parent().unwrap_or(Path::new(".")))
        .env("PYTHONUNBUFFERED", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let py = wait_bounded(child, PYTHON_TIMEOUT)
        .unwrap_or_else(|e| panic!("smoke_client.py did not finish: {e}\n{}", server.log_tail(30)));
    assert!(
        py.status.success(),
        "smoke_client.py failed ({})\nstdout:\n{}\nstderr:\n{}\n{}",
        py.status,
        py.stdout,
        py.stderr,
        server.log_tail(30)
    );
    let last = py.stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let res: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("smoke_client.py printed no JSON ({e}):\n{}\n{}", py.stdout, py.stderr));
    println!("python clients done in {:?}", started.elapsed());

    let workspace = res["workspace"].as_str().expect("workspace in results").to_owned();
    assert_eq!(res["service_id"], format!("{workspace}/smoke-provider:smoke"));
    assert_eq!(res["positional"], expected_nested("hypha", 2));
    assert_eq!(res["kwargs"], expected_nested("kw", 5));
    assert_eq!(res["echo_ok"], true, "bytes did not round-trip: {}", res["echo_b64"]);
    let error = res["error"].as_str().expect("the failing call must raise");
    assert!(error.contains("smoke failure: boom"), "unexpected error text: {error}");

    // --- every recorded frame through our codec ----------------------------------------------
    assert!(proxy.drain(DRAIN_TIMEOUT), "proxied connections still open after {DRAIN_TIMEOUT:?}");
    let errors = proxy.shared.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "proxy errors: {errors:#?}");
    let recorded = proxy.shared.frames.lock().unwrap().clone();
    let connections = proxy.shared.connections.load(Ordering::SeqCst);
    assert_eq!(connections, 2, "expected one proxied connection per Python client");

    let limits = Limits::default();
    let mut decoded: Vec<(Recorded, Frame)> = Vec::with_capacity(recorded.len());
    let mut mismatches = Vec::new();
    let mut delivered_exact = 0;
    for (i, rec) in recorded.iter().enumerate() {
        let frame = decode_frame(&rec.data, &limits).unwrap_or_else(|e| {
            panic!(
                "frame #{i} ({:?}, connection {}, {} bytes) does not decode: {e}\nfirst bytes: {:02x?}",
                rec.dir,
                rec.conn,
                rec.data.len(),
                &rec.data[..rec.data.len().min(64)]
            )
        });
        let again = encode_frame(&frame);
        if again == rec.data {
            if rec.dir == Dir::ToClient {
                delivered_exact += 1;
            }
        } else if rec.dir == Dir::ToServer {
            let at = first_diff(&again, &rec.data);
            mismatches.push(format!(
                "frame #{i} (connection {}, method {:?}): {} bytes re-encoded as {}, first difference at \
                 offset {at}: wire {:02x?} vs ours {:02x?}",
                rec.conn,
                str_at(&frame, "method"),
                rec.data.len(),
                again.len(),
                &rec.data[at..rec.data.len().min(at + 16)],
                &again[at..again.len().min(at + 16)],
            ));
        }
        decoded.push((rec.clone(), frame));
    }
    if std::env::var_os("SMOKE_DUMP").is_some() {
        for (i, (r, f)) in decoded.iter().enumerate() {
            println!(
                "#{i:<3} conn {} {:?} {:>6} B type={:?} method={:?} to={:?} extra keys={:?}",
                r.conn,
                r.dir,
                r.data.len(),
                str_at(f, "type"),
                str_at(f, "method"),
                str_at(f, "to"),
                f.extra.as_ref().map(|e| e.keys().filter_map(Value::as_str).collect::<Vec<_>>())
            );
        }
    }
    assert!(
        mismatches.is_empty(),
        "client frames that do not re-encode byte-exact:\n{}",
        mismatches.join("\n")
    );

    // --- structural facts --------------------------------------------------------------------
    let sent: Vec<&(Recorded, Frame)> = decoded.iter().filter(|(r, _)| r.dir == Dir::ToServer).collect();
    let delivered: Vec<&(Recorded, Frame)> = decoded.iter().filter(|(r, _)| r.dir == Dir::ToClient).collect();
    assert!(decoded.iter().any(|(_, f)| str_at(f, "type") == Some("method")), "no type=method frame");

    // Python fetches the manager service with built-in.get_service, addressed to */<manager_id>.
    assert!(
        sent.iter().any(|(_, f)| str_at(f, "method") == Some("services.built-in.get_service")
            && str_at(f, "to").is_some_and(|t| t.starts_with("*/manager-"))),
        "no client call of services.built-in.get_service on the manager"
    );
    // The caller looked our service up through the manager.
    assert!(
        sent.iter().any(|(_, f)| str_at(f, "method") == Some("services.default.get_service")),
        "no services.default.get_service call"
    );
    // Every delivered RPC frame carries the server's trusted `ws` and `user`, appended last.
    let mut rewritten = 0;
    for (r, f) in &delivered {
        if str_at(f, "type") != Some("method") {
            continue;
        }
        assert!(
            str_at(f, "ws").is_some(),
            "delivered frame without ws on connection {}: {:?}",
            r.conn,
            f.main
        );
        let user = f.main.get("user").and_then(Value::as_map);
        assert!(
            user.is_some_and(|u| u.get("id").and_then(Value::as_str).is_some()),
            "delivered frame without user.id: {:?}",
            f.main
        );
        let keys: Vec<&str> = f.main.keys().filter_map(Value::as_str).collect();
        assert_eq!(&keys[keys.len() - 2..], ["ws", "user"], "ws and user must come last: {keys:?}");
        rewritten += 1;
    }
    assert!(rewritten > 0, "no delivered RPC frame");
    // The kwargs call sets with_kwargs and ends args with the kwargs map.
    let kw = sent
        .iter()
        .find(|(_, f)| {
            str_at(f, "method") == Some("services.smoke.nested")
                && extra_get(f, "with_kwargs") == Some(&true.into())
        })
        .expect("no with_kwargs call of services.smoke.nested");
    let kw_args = extra_get(&kw.1, "args").and_then(Value::as_array).expect("kwargs call has args");
    let kw_map = kw_args.last().and_then(Value::as_map).expect("last arg is the kwargs map");
    assert_eq!(kw_map.get("name").and_then(Value::as_str), Some("kw"));
    assert_eq!(kw_map.get("n").and_then(Value::as_i64), Some(5));
    // The bytes travel as msgpack bin, both ways.
    let echo = echo_bytes();
    let bin_frames = decoded
        .iter()
        .filter(|(_, f)| first_arg(f).and_then(Value::as_bin).is_some_and(|b| b[..] == echo[..]))
        .count();
    assert!(
        bin_frames >= 4,
        "expected the echo bytes as bin in call and reply, both sides; saw {bin_frames}"
    );
    // The failure comes back as a reject whose argument is an `_rtype: "error"` map.
    assert!(
        sent.iter().any(|(_, f)| str_at(f, "method").is_some_and(|m| m.ends_with(".reject"))
            && first_arg(f).and_then(Value::rtype) == Some("error")),
        "no reject carrying an _rtype error"
    );
    // Client-to-client frames reach the peer with `extra` byte-identical (the server re-packs
    // only `main`) and `from` rewritten to <ws>/<sender>.
    let mut relayed = 0;
    for (r, f) in &sent {
        let Some(to) = str_at(f, "to") else { continue };
        if !(to.ends_with("/smoke-provider") || to.ends_with("/smoke-caller")) || f.extra.is_none() {
            continue;
        }
        let (_, main_len) = decode_value(&r.data, &limits).expect("main decodes");
        let extra_bytes = &r.data[main_len..];
        let hit = delivered.iter().find(|(d, df)| {
            d.conn != r.conn && d.data.ends_with(extra_bytes) && str_at(df, "method") == str_at(f, "method")
        });
        let (_, df) =
            hit.unwrap_or_else(|| panic!("frame {:?} to {to} never delivered with the same extra", f.main));
        let from = str_at(df, "from").expect("delivered from");
        assert!(from.starts_with(&format!("{workspace}/smoke-")), "delivered from {from:?}");
        relayed += 1;
    }
    assert!(relayed >= 8, "expected at least 4 calls and 4 replies between the clients, saw {relayed}");

    let events = delivered.iter().filter(|(_, f)| f.extra.is_none()).count();
    println!(
        "checked {} binary frames ({} client->server re-encoded byte-exact, {} server->client of which {} \
         re-encode byte-exact, {} single-object, {relayed} relayed with extra intact), {} text frames, \
         {connections} connections, total {:?}",
        decoded.len(),
        sent.len(),
        delivered.len(),
        delivered_exact,
        events,
        proxy.shared.text_frames.load(Ordering::SeqCst),
        started.elapsed()
    );
    drop(proxy);
    drop(server);
}
