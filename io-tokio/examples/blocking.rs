//! The blocking API, for programs without async code (Python's `hypha_rpc.sync`).
//!
//! `cargo run -p hypha-rpc-tokio --example blocking -- http://127.0.0.1:9527`

use hypha_rpc_tokio::blocking;
use hypha_rpc_tokio::{ServerConfig, Service};

fn main() -> hypha_rpc_tokio::Result<()> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:9527".into());
    let server = blocking::connect_to_server(ServerConfig::new(url))?;
    let id = server.register_service(
        Service::new("adder").function("add", |a: i64, b: i64| async move { Ok::<_, String>(a + b) }),
    )?;
    let sum: i64 = server.get_service(&id)?.call("add", (40, 2))?;
    println!("{id}: add(40, 2) = {sum}");
    server.disconnect();
    Ok(())
}
