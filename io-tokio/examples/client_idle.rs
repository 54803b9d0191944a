//! An idle connected Rust client (tokio, current-thread runtime), for the idle-RSS figure of
//! `client_bench`: prints READY once connected, exits when stdin closes. It lives here, not in
//! the tests crate, so it is built with the client's default features (no WebRTC), as a user's
//! client would be: `cargo build --release -p hypha-rpc-tokio --example client_idle`.

use std::io::BufRead;

fn main() {
    let url = std::env::args().nth(1).expect("usage: client_idle SERVER_URL");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let server = hypha_rpc_tokio::connect_to_server(hypha_rpc_tokio::ServerConfig::new(url))
            .await
            .expect("connect");
        println!("READY");
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::stdin().lock().lines().next();
            let _ = tx.send(());
        });
        let _ = rx.await;
        server.disconnect().await;
    });
}
