//! Serve a service until Ctrl-C: typed arguments, a struct filled from keyword arguments, the
//! caller's trusted identity, and a generator.
//!
//! `cargo run -p hypha-rpc-tokio --example serve -- http://127.0.0.1:9527`
//! then from Python: `svc = await server.get_service("<printed id>")`,
//! `await svc.scale(values=[1, 2], factor=3)`, `await svc.whoami()`,
//! `[x async for x in await svc.countdown(3)]`.

use hypha_rpc_tokio::{Context, Generator, ServerConfig, Service, Visibility, connect_to_server};
use serde::{Deserialize, Serialize};

/// Python's `svc.scale(values=[...], factor=2.0)` arrives as one map of keyword arguments.
#[derive(Deserialize)]
struct ScaleArgs {
    values: Vec<f64>,
    #[serde(default = "one")]
    factor: f64,
}
fn one() -> f64 {
    1.0
}

#[derive(Serialize)]
struct Scaled {
    values: Vec<f64>,
    sum: f64,
}

#[tokio::main]
async fn main() -> hypha_rpc_tokio::Result<()> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:9527".into());
    let server = connect_to_server(ServerConfig::new(url)).await?;
    let service = Service::new("demo")
        .visibility(Visibility::Public)
        .function_doc("scale", "Multiply values by factor (keyword arguments).", |a: ScaleArgs| async move {
            let values: Vec<f64> = a.values.iter().map(|v| v * a.factor).collect();
            Ok::<_, String>(Scaled { sum: values.iter().sum(), values })
        })
        .function_with_context("whoami", |ctx: Context| async move { Ok::<_, String>(ctx.from) })
        .function("countdown", |n: u32| async move {
            Ok::<_, String>(Generator::new(futures::stream::iter((0..=n).rev())))
        });
    let id = server.register_service(service).await?;
    println!(
        "serving {id} in workspace {}; token: {}",
        server.workspace(),
        server.generate_token(None).await?
    );
    let _ = tokio::signal::ctrl_c().await;
    server.disconnect().await;
    Ok(())
}
