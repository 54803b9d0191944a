//! The same client on smol: serve a function, call it, pass a callback.
//!
//! `cargo run -p hypha-rpc-smol --example hello -- http://127.0.0.1:9527`

use hypha_rpc_smol::{Callback, RemoteFunction, ServerConfig, Service, connect_to_server};

fn main() -> hypha_rpc_smol::Result<()> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:9527".into());
    smol::block_on(async {
        let server = connect_to_server(ServerConfig::new(url)).await?;
        let service = Service::new("hello")
            .function("greet", |name: String| async move { Ok::<_, String>(format!("Hello, {name}!")) })
            .function("apply", |f: RemoteFunction, x: i64| async move {
                f.call::<i64>((x,)).await.map_err(|e| e.to_string())
            });
        let id = server.register_service(service).await?;
        let svc = server.get_service(&id).await?;
        let greeting: String = svc.call("greet", ("smol",)).await?;
        let squared: i64 =
            svc.call("apply", (Callback::new(|x: i64| async move { Ok::<_, String>(x * x) }), 7)).await?;
        println!("{greeting} 7² = {squared}");
        server.disconnect().await;
        Ok(())
    })
}
