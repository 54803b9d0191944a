//! Call a service: typed results, keyword arguments, a callback the service may call, and a
//! remote generator consumed as a Stream.
//!
//! `cargo run -p hypha-rpc-tokio --example call -- http://127.0.0.1:9527 WORKSPACE TOKEN SERVICE_ID`
//! (for example against the `serve` example).

use futures::StreamExt;
use hypha_rpc_tokio::{RemoteGenerator, ServerConfig, Value, connect_to_server};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [url, workspace, token, id] = a.as_slice() else {
        return Err("usage: call SERVER_URL WORKSPACE TOKEN SERVICE_ID".into());
    };
    let server = connect_to_server(ServerConfig::new(url).workspace(workspace).token(token)).await?;
    let svc = server.get_service(id).await?;
    println!("{} has {:?}", svc.id(), svc.functions());

    // Keyword arguments: any serde map or struct.
    let kwargs = serde_json_like(&[("values", Value::Array(vec![1.into(), 2.into()])), ("factor", 3.into())]);
    let scaled: Value = svc.call_with_kwargs("scale", (), kwargs).await?;
    println!("scale -> {scaled:?}");

    let me: String = svc.call("whoami", ()).await?;
    println!("whoami -> {me}");

    let items: Vec<u32> = svc
        .call::<RemoteGenerator>("countdown", (3,))
        .await?
        .typed::<u32>()
        .map(|r| r.expect("item"))
        .collect()
        .await;
    println!("countdown -> {items:?}");
    server.disconnect().await;
    Ok(())
}

fn serde_json_like(pairs: &[(&str, Value)]) -> hypha_rpc_tokio::Map {
    let mut m = hypha_rpc_tokio::Map::new();
    for (k, v) in pairs {
        m.insert(*k, v.clone());
    }
    m
}
