//! The Hypha RPC client on tokio. This crate only supplies tokio's sockets, timers and spawn
//! to the shared driver in [`hypha_rpc`], and re-exports its API.
//!
//! ```no_run
//! use hypha_rpc_tokio::{connect_to_server, Service, ServerConfig};
//!
//! #[tokio::main]
//! async fn main() -> hypha_rpc_tokio::Result<()> {
//!     let server = connect_to_server(ServerConfig::new("http://127.0.0.1:9527")).await?;
//!     let id = server
//!         .register_service(Service::new("hello").function("greet", |name: String| async move {
//!             Ok::<_, hypha_rpc_tokio::Error>(format!("Hello, {name}!"))
//!         }))
//!         .await?;
//!     let greeting: String = server.get_service(&id).await?.call("greet", ("Ada",)).await?;
//!     println!("{greeting}");
//!     server.disconnect().await;
//!     Ok(())
//! }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hypha_rpc::runtime::{BoxIo, Runtime, Udp};
use tokio_util::compat::TokioAsyncReadCompatExt;

pub use hypha_rpc::*;

pub mod blocking;

/// tokio as a [`Runtime`]: `tokio::spawn`, `tokio::time::sleep`, `tokio::net::TcpStream`.
/// Must be used from inside a tokio runtime with the time and IO drivers enabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioRuntime;

impl Runtime for TokioRuntime {
    fn spawn(&self, task: BoxFuture<'static, ()>) {
        tokio::spawn(task);
    }
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(duration))
    }
    fn connect_tcp(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<BoxIo>> {
        let addr = format!("{host}:{port}");
        let addr = if host.contains(':') { format!("[{host}]:{port}") } else { addr };
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(Box::pin(tcp.compat()) as BoxIo)
        })
    }
    fn bind_udp(&self, addr: std::net::SocketAddr) -> io::Result<Box<dyn Udp>> {
        let socket = hypha_rpc::runtime::bind_udp_socket(addr)?;
        Ok(Box::new(TokioUdp(tokio::net::UdpSocket::from_std(socket)?)))
    }
}

struct TokioUdp(tokio::net::UdpSocket);

impl Udp for TokioUdp {
    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }
    fn poll_recv_from(
        &self,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<(usize, std::net::SocketAddr)>> {
        let mut rb = tokio::io::ReadBuf::new(buf);
        self.0.poll_recv_from(cx, &mut rb).map_ok(|from| (rb.filled().len(), from))
    }
    fn poll_send_to(
        &self,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
        target: std::net::SocketAddr,
    ) -> std::task::Poll<io::Result<usize>> {
        self.0.poll_send_to(cx, buf, target)
    }
}

/// Connects to a Hypha server (Python: `connect_to_server`) and waits until we are
/// registered. Call from inside a tokio runtime.
///
/// ```no_run
/// # async fn demo() -> hypha_rpc_tokio::Result<()> {
/// let server = hypha_rpc_tokio::connect_to_server(
///     hypha_rpc_tokio::ServerConfig::new("http://127.0.0.1:9527").workspace("my-ws").token("..."),
/// )
/// .await?;
/// println!("connected to {} as {}", server.workspace(), server.client_id());
/// # Ok(()) }
/// ```
pub async fn connect_to_server(config: ServerConfig) -> Result<Server> {
    connect_with_runtime(Arc::new(TokioRuntime), config).await
}

/// Logs in through the server's login service and returns the token (Python `login`): hands
/// the login URL to [`LoginConfig::callback`] (default: print it), then waits up to
/// [`LoginConfig::timeout`] for the user to log in. See [`hypha_rpc::login`] for the flow
/// and the errors. Call from inside a tokio runtime.
///
/// ```no_run
/// # async fn demo() -> hypha_rpc_tokio::Result<()> {
/// use hypha_rpc_tokio::{LoginConfig, ServerConfig, connect_to_server, login};
/// let token = login(LoginConfig::new("http://127.0.0.1:9527").callback(|info| {
///     println!("Please log in at {}", info.login_url);
/// }))
/// .await?;
/// let server = connect_to_server(ServerConfig::new("http://127.0.0.1:9527").token(token)).await?;
/// println!("logged in to {}", server.workspace());
/// # Ok(()) }
/// ```
pub async fn login(config: LoginConfig) -> Result<String> {
    login_with_runtime(Arc::new(TokioRuntime), config).await
}

/// Like [`login()`], but returns the whole [`LoginProfile`] (Python `login` with
/// `profile: True`). Call from inside a tokio runtime.
///
/// ```no_run
/// # async fn demo() -> hypha_rpc_tokio::Result<()> {
/// let profile = hypha_rpc_tokio::login_profile(hypha_rpc_tokio::LoginConfig::new("http://127.0.0.1:9527")).await?;
/// println!("{:?} <{:?}>", profile.name, profile.email);
/// # Ok(()) }
/// ```
pub async fn login_profile(config: LoginConfig) -> Result<LoginProfile> {
    login_profile_with_runtime(Arc::new(TokioRuntime), config).await
}
