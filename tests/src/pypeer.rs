//! A real Python `hypha-rpc` peer process driven over stdin/stdout JSON lines: commands with
//! an `id` get the answer line with the same `id`; lines without one are events. Shared by the
//! client's interop tests (`tests/py/client_peer.py`, `tests/py/e2e_peer.py`).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use futures::future::Either;
use hypha_rpc::runtime::Runtime;
use serde_json::Value as Json;

use crate::server::HyphaServer;

/// A running Python peer; killed on drop (its stderr printed if the test is failing).
pub struct PyPeer {
    child: Child,
    stdin: Mutex<Option<ChildStdin>>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Json>>>>,
    events: futures::lock::Mutex<mpsc::UnboundedReceiver<Json>>,
    next_id: AtomicU64,
    stderr: Arc<Mutex<VecDeque<String>>>,
    rt: Arc<dyn Runtime>,
}

impl PyPeer {
    /// Starts `tests/py/<script>` with the venv's python and `args` (after the server URL).
    pub fn start(hs: &HyphaServer, rt: Arc<dyn Runtime>, script: &str, args: &[&str]) -> PyPeer {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(script);
        let mut child = Command::new(hs.python())
            .arg(&script)
            .arg(hs.url())
            .args(args)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the Python peer");
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Json>>>> = Arc::default();
        let (ev_tx, ev_rx) = mpsc::unbounded();
        let stdout = child.stdout.take().unwrap();
        let p = pending.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Json>(&line) else {
                    eprintln!("[py stdout] {line}");
                    continue;
                };
                if let Some(id) = v.get("id").and_then(Json::as_u64) {
                    if let Some(tx) = p.lock().unwrap().remove(&id) {
                        let _ = tx.send(v);
                    }
                } else {
                    let _ = ev_tx.unbounded_send(v);
                }
            }
            // EOF: the peer exited; waiting requests fail.
            p.lock().unwrap().clear();
        });
        let stderr: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let err_pipe = child.stderr.take().unwrap();
        let e = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                let mut q = e.lock().unwrap();
                q.push_back(line);
                if q.len() > 300 {
                    q.pop_front();
                }
            }
        });
        let stdin = Mutex::new(child.stdin.take());
        PyPeer {
            child,
            stdin,
            pending,
            events: futures::lock::Mutex::new(ev_rx),
            next_id: AtomicU64::new(1),
            stderr,
            rt,
        }
    }

    /// The runtime its waits run on.
    pub fn runtime(&self) -> &dyn Runtime {
        &*self.rt
    }

    /// The peer's last stderr lines, for failure messages.
    pub fn stderr_tail(&self) -> String {
        let q = self.stderr.lock().unwrap();
        let lines: Vec<&str> = q.iter().map(String::as_str).collect();
        format!("---- Python peer stderr (last {} lines) ----\n{}", lines.len(), lines.join("\n"))
    }

    /// Writes one raw line to the peer's stdin (for scripts driven by plain commands).
    pub fn send_line(&self, line: &str) {
        let mut stdin = self.stdin.lock().unwrap();
        let pipe = stdin.as_mut().expect("stdin open");
        writeln!(pipe, "{line}").and_then(|_| pipe.flush()).expect("write to the Python peer");
    }

    /// Sends a command and waits for its answer.
    pub async fn request(&self, mut cmd: Json, timeout: Duration) -> Json {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        cmd["id"] = id.into();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        {
            let mut stdin = self.stdin.lock().unwrap();
            let pipe = stdin.as_mut().expect("stdin open");
            writeln!(pipe, "{cmd}").and_then(|_| pipe.flush()).expect("write to the Python peer");
        }
        match within(&*self.rt, timeout, rx).await {
            Some(Ok(v)) => {
                assert!(
                    v.get("exception").is_none(),
                    "Python command {cmd} raised: {v}\n{}",
                    self.stderr_tail()
                );
                v
            }
            Some(Err(_)) => panic!("the Python peer exited during {cmd}\n{}", self.stderr_tail()),
            None => panic!("no answer to {cmd} within {timeout:?}\n{}", self.stderr_tail()),
        }
    }

    /// Waits for the out-of-band line `{"event": name, ...}`, skipping others.
    pub async fn event(&self, name: &str, timeout: Duration) -> Json {
        let mut events = self.events.lock().await;
        let wait = async {
            while let Some(v) = events.next().await {
                if v["event"] == name {
                    return Some(v);
                }
            }
            None
        };
        match within(&*self.rt, timeout, wait).await {
            Some(Some(v)) => v,
            Some(None) => panic!("the Python peer exited before event {name}\n{}", self.stderr_tail()),
            None => panic!("no event {name} within {timeout:?}\n{}", self.stderr_tail()),
        }
    }

    /// Waits (polling, without blocking the executor) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the Python peer did not exit\n{}", self.stderr_tail());
            self.rt.sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PyPeer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.stderr_tail());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `fut`'s output, or `None` after `timeout`.
pub async fn within<F: std::future::Future>(
    rt: &dyn Runtime,
    timeout: Duration,
    fut: F,
) -> Option<F::Output> {
    match futures::future::select(std::pin::pin!(fut), rt.sleep(timeout)).await {
        Either::Left((v, _)) => Some(v),
        Either::Right(_) => None,
    }
}
