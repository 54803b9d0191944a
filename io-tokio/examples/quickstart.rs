//! Quickstart: a Rust service and a Python client talking through a local Hypha server, and
//! back. Run by `scripts/quickstart.sh` (which starts the server); by hand:
//! `cargo run -p hypha-rpc-tokio --example quickstart -- http://127.0.0.1:9527 python3 tests/py/quickstart_client.py`

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use hypha_rpc_tokio::{Generator, ServerConfig, Service, Visibility, connect_to_server};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or("usage: quickstart SERVER_URL [PYTHON] [SCRIPT]")?;
    let python = args.next().unwrap_or_else(|| "python3".into());
    let script = args.next().unwrap_or_else(|| "tests/py/quickstart_client.py".into());

    // 1. Connect and serve `hello`.
    let server = connect_to_server(ServerConfig::new(&url).client_id("quickstart-rust")).await?;
    println!("rust: connected to {url} as {}/{}", server.workspace(), server.client_id());
    let hello = Service::new("hello")
        .visibility(Visibility::Public)
        .function_doc("greet", "Say hello.", |name: String| async move {
            Ok::<_, String>(format!("Hello, {name}! (from Rust)"))
        })
        .function_doc("add", "Add two numbers.", |a: i64, b: i64| async move { Ok::<_, String>(a + b) })
        .arg_names(&["a", "b"]) // so Python may call add(40, b=2)
        .function_doc("count", "Count from 0 to n-1, as a generator.", |n: u32| async move {
            Ok::<_, String>(Generator::new(futures::stream::iter(0..n)))
        });
    let service_id = server.register_service(hello).await?;
    println!("rust: registered {service_id}");
    let token = server.generate_token(None).await?;

    // 2. A Python client calls it, then serves `py-hello` for us.
    let mut py = Command::new(&python)
        .args([&script, &url, server.workspace(), &token, &service_id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start {python} {script}: {e}"))?;
    let (tx, mut rx) = futures::channel::mpsc::unbounded();
    let out = py.stdout.take().ok_or("no stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.unbounded_send(line);
        }
    });
    let py_service = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), rx.next())
            .await
            .map_err(|_| "the Python client did not answer within 30 s")?
            .ok_or("the Python client exited early")?;
        match line.strip_prefix("READY ") {
            Some(id) => break id.to_string(),
            None => println!("{line}"),
        }
    };

    // 3. We call Python back.
    let py_hello = server.get_service(&py_service).await?;
    let shouted: String = py_hello.call("shout", ("hello from rust",)).await?;
    println!("rust: py-hello.shout('hello from rust') -> {shouted:?}");

    // 4. Clean up.
    if let Some(mut stdin) = py.stdin.take() {
        let _ = writeln!(stdin, "bye");
    }
    let status = py.wait()?;
    server.disconnect().await;
    if !status.success() {
        return Err(format!("the Python client failed: {status}").into());
    }
    println!("quickstart: done");
    Ok(())
}
