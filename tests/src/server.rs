//! Starts the pinned real Hypha server on 127.0.0.1 for interop tests, and kills it on drop.
//!
//! [`HyphaServer::start`] runs `scripts/hypha-venv.sh` (which creates or reuses the project
//! venv), picks a free loopback port, spawns `python -m hypha.server` with the same
//! environment as `scripts/hypha-server.sh`, and waits for `GET /health/readiness` to answer
//! 200. A test that needs the server MUST fail when this returns an error, never skip:
//!
//! ```no_run
//! let server = hypha_rpc_tests::server::HyphaServer::start().unwrap_or_else(|e| panic!("{e}"));
//! println!("server at {}", server.url());
//! ```

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The JWT secret every test server uses, so tokens are reproducible across runs.
pub const JWT_SECRET: &str = "hypha-rpc-rs-test-secret";
/// Per-connection binary-frame rate and burst limit; the server's defaults (200/s, burst 2000)
/// are tripped by streaming tests and benchmarks.
pub const MSG_RATE_LIMIT: &str = "100000";
/// How long [`HyphaServer::start`] waits for readiness before giving up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

const START_ATTEMPTS: usize = 3;

/// A running Hypha server child process, bound to 127.0.0.1. Dropping it kills the process
/// and reaps it.
#[derive(Debug)]
pub struct HyphaServer {
    child: Child,
    port: u16,
    url: String,
    python: PathBuf,
    log: PathBuf,
    keep_log: bool,
    tmp: PathBuf,
    env: Vec<(String, String)>,
}

impl HyphaServer {
    /// Starts a fresh server on a free loopback port and waits until it is ready.
    ///
    /// Errors (with the server log's tail when there is one) if the venv cannot be made, the
    /// process cannot be spawned, or it is not ready within [`READY_TIMEOUT`].
    pub fn start() -> Result<HyphaServer, String> {
        Self::start_with_env(&[])
    }

    /// Like [`HyphaServer::start`], with extra environment variables for the server process
    /// (set after, so overriding, the defaults).
    pub fn start_with_env(env: &[(&str, &str)]) -> Result<HyphaServer, String> {
        let root = workspace_root()?;
        let python = venv_python(&root)?;
        let log_dir = root.join("target").join("hypha-server");
        fs::create_dir_all(&log_dir).map_err(|e| format!("cannot create {}: {e}", log_dir.display()))?;
        let mut last_err = String::new();
        // A free port can be taken between probing and binding, and then the server exits at
        // once; retry with a new port then (but not after a readiness timeout).
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            match Self::spawn(&python, &log_dir, port, env) {
                Ok(server) => return Ok(server),
                Err((true, e)) => last_err = e,
                Err((false, e)) => return Err(e),
            }
        }
        Err(last_err)
    }

    /// Spawns one server and waits for it. The error says whether another port may help.
    fn spawn(
        python: &Path,
        log_dir: &Path,
        port: u16,
        env: &[(&str, &str)],
    ) -> Result<HyphaServer, (bool, String)> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let log = log_dir.join(format!("rust-{}-{seq}-{port}.log", std::process::id()));
        // The server's own temp files (an SQLite event log it only deletes on a clean exit)
        // go here, and the directory goes on drop, since the process is killed.
        let tmp = log_dir.join(format!("tmp-{}-{seq}-{port}", std::process::id()));
        fs::create_dir_all(&tmp).map_err(|e| (false, format!("cannot create {}: {e}", tmp.display())))?;
        let out = File::create(&log).map_err(|e| (false, format!("cannot create {}: {e}", log.display())))?;
        let err = out.try_clone().map_err(|e| (false, format!("cannot clone log handle: {e}")))?;
        let mut cmd = Command::new(python);
        cmd.args(["-m", "hypha.server", "--host", "127.0.0.1", "--port", &port.to_string()])
            .current_dir(log_dir)
            .env("HYPHA_JWT_SECRET", JWT_SECRET)
            .env("HYPHA_WS_MSG_RATE_LIMIT", MSG_RATE_LIMIT)
            .env("HYPHA_WS_MSG_BURST_LIMIT", MSG_RATE_LIMIT)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(|e| (false, format!("cannot spawn {} -m hypha.server: {e}", python.display())))?;
        let mut server = HyphaServer {
            child,
            port,
            url: format!("http://127.0.0.1:{port}"),
            python: python.to_path_buf(),
            log,
            keep_log: true,
            tmp,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                let msg = format!(
                    "hypha server on port {port} exited ({status}) before becoming ready\n{}",
                    server.log_tail(40)
                );
                return Err((true, msg));
            }
            if http_status(port, "/health/readiness") == Some(200) {
                server.keep_log = false;
                return Ok(server);
            }
            if Instant::now() >= deadline {
                // Dropping `server` kills and reaps the process; the log stays for inspection.
                let msg = format!(
                    "hypha server on port {port} not ready after {READY_TIMEOUT:?}\n{}",
                    server.log_tail(40)
                );
                return Err((false, msg));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the server (as a crash would: no clean shutdown) and starts a new one on the same
    /// port with the same settings; it has a new manager id and none of the old state.
    pub fn restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let root = workspace_root()?;
        let log_dir = root.join("target").join("hypha-server");
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut last = String::new();
        // The port can stay busy for a moment after the kill.
        for _ in 0..START_ATTEMPTS {
            match Self::spawn(&self.python, &log_dir, self.port, &env) {
                Ok(mut fresh) => {
                    std::mem::swap(self, &mut fresh);
                    return Ok(()); // `fresh` (the dead one) cleans up its files on drop
                }
                Err((_, e)) => last = e,
            }
            thread::sleep(Duration::from_millis(500));
        }
        Err(last)
    }

    /// `http://127.0.0.1:<port>`, the server URL a client is given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `ws://127.0.0.1:<port>/ws`, the WebSocket endpoint.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The venv's python, which has the pinned `hypha-rpc` client, msgpack and numpy.
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// The file receiving the server's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the server log, under a header naming the file.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!("---- last {lines} lines of {} ----\n{tail}", self.log.display())
    }
}

impl Drop for HyphaServer {
    /// Kills and reaps the server. Its log is kept when the server failed to start or the
    /// dropping thread is panicking (a failed test), so logs of passing runs do not pile up.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.tmp);
        if !self.keep_log && !thread::panicking() {
            let _ = fs::remove_file(&self.log);
        }
    }
}

/// The Cargo workspace root: the nearest ancestor of this crate with a `[workspace]` manifest.
pub fn workspace_root() -> Result<PathBuf, String> {
    let start = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in start.ancestors() {
        let manifest = dir.join("Cargo.toml");
        if fs::read_to_string(&manifest).is_ok_and(|s| s.lines().any(|l| l.trim() == "[workspace]")) {
            return Ok(dir.to_path_buf());
        }
    }
    Err(format!("no [workspace] Cargo.toml above {}", start.display()))
}

/// Runs `scripts/hypha-venv.sh` (creating the venv on first use) and returns its python.
pub fn venv_python(root: &Path) -> Result<PathBuf, String> {
    let script = root.join("scripts").join("hypha-venv.sh");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "{} failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
            script.display(),
            out.status
        ));
    }
    let python = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| format!("{} printed no python path\nstderr:\n{stderr}", script.display()))?;
    if !python.is_file() {
        return Err(format!("{} printed {}, which is not a file", script.display(), python.display()));
    }
    Ok(python)
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| format!("no local address: {e}"))
}

/// The status code of a plain HTTP/1.0 `GET path` to 127.0.0.1:`port`, or `None` when there is
/// no well-formed answer within 2 s.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    // Only the status line matters: "HTTP/1.1 200 OK\r\n".
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    parts.next().filter(|p| p.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

/// Installs `tests/js/node_modules` (`npm ci` from the lockfile, via `scripts/js-deps.sh`),
/// panicking with the script's output when node or npm is missing or the install fails.
pub fn install_js_deps(root: &Path) {
    let out = Command::new("bash")
        .arg(root.join("scripts").join("js-deps.sh"))
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/js-deps.sh: {e}"));
    assert!(
        out.status.success(),
        "scripts/js-deps.sh failed ({}): node and npm are required for this test\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
