//! The Hypha RPC client on smol. This crate only supplies smol's sockets, timers and spawn
//! to the shared driver in [`hypha_rpc`], and re-exports its API.
//!
//! ```no_run
//! use hypha_rpc_smol::{connect_to_server, Service, ServerConfig};
//!
//! fn main() -> hypha_rpc_smol::Result<()> {
//!     smol::block_on(async {
//!         let server = connect_to_server(ServerConfig::new("http://127.0.0.1:9527")).await?;
//!         let id = server
//!             .register_service(Service::new("hello").function("greet", |name: String| async move {
//!                 Ok::<_, hypha_rpc_smol::Error>(format!("Hello, {name}!"))
//!             }))
//!             .await?;
//!         let greeting: String = server.get_service(&id).await?.call("greet", ("Ada",)).await?;
//!         println!("{greeting}");
//!         server.disconnect().await;
//!         Ok(())
//!     })
//! }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hypha_rpc::runtime::{BoxIo, Runtime, Udp};

pub use hypha_rpc::*;

/// smol as a [`Runtime`]: `smol::spawn` (the global executor), `smol::Timer`,
/// `smol::net::TcpStream`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SmolRuntime;

impl Runtime for SmolRuntime {
    fn spawn(&self, task: BoxFuture<'static, ()>) {
        smol::spawn(task).detach();
    }
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            smol::Timer::after(duration).await;
        })
    }
    fn connect_tcp(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<BoxIo>> {
        let host = host.to_string();
        Box::pin(async move {
            let tcp = smol::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            Ok(Box::pin(tcp) as BoxIo)
        })
    }
    fn bind_udp(&self, addr: std::net::SocketAddr) -> io::Result<Box<dyn Udp>> {
        let socket = hypha_rpc::runtime::bind_udp_socket(addr)?;
        Ok(Box::new(SmolUdp(smol::Async::new(socket)?)))
    }
}

struct SmolUdp(smol::Async<std::net::UdpSocket>);

impl Udp for SmolUdp {
    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.get_ref().local_addr()
    }
    fn poll_recv_from(
        &self,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<(usize, std::net::SocketAddr)>> {
        loop {
            match self.0.get_ref().recv_from(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return std::task::Poll::Ready(r),
            }
            std::task::ready!(self.0.poll_readable(cx))?;
        }
    }
    fn poll_send_to(
        &self,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
        target: std::net::SocketAddr,
    ) -> std::task::Poll<io::Result<usize>> {
        loop {
            match self.0.get_ref().send_to(buf, target) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return std::task::Poll::Ready(r),
            }
            std::task::ready!(self.0.poll_writable(cx))?;
        }
    }
}

/// Connects to a Hypha server (Python: `connect_to_server`) and waits until we are
/// registered. Tasks run on smol's global executor.
///
/// ```no_run
/// # async fn demo() -> hypha_rpc_smol::Result<()> {
/// let server = hypha_rpc_smol::connect_to_server(hypha_rpc_smol::ServerConfig::new("http://127.0.0.1:9527")).await?;
/// println!("connected as {}", server.client_id());
/// # Ok(()) }
/// ```
pub async fn connect_to_server(config: ServerConfig) -> Result<Server> {
    connect_with_runtime(Arc::new(SmolRuntime), config).await
}

/// Logs in through the server's login service and returns the token (Python `login`): hands
/// the login URL to [`LoginConfig::callback`] (default: print it), then waits up to
/// [`LoginConfig::timeout`] for the user to log in. See [`hypha_rpc::login`] for the flow
/// and the errors. Tasks run on smol's global executor.
///
/// ```no_run
/// # async fn demo() -> hypha_rpc_smol::Result<()> {
/// use hypha_rpc_smol::{LoginConfig, ServerConfig, connect_to_server, login};
/// let token = login(LoginConfig::new("http://127.0.0.1:9527").callback(|info| {
///     println!("Please log in at {}", info.login_url);
/// }))
/// .await?;
/// let server = connect_to_server(ServerConfig::new("http://127.0.0.1:9527").token(token)).await?;
/// println!("logged in to {}", server.workspace());
/// # Ok(()) }
/// ```
pub async fn login(config: LoginConfig) -> Result<String> {
    login_with_runtime(Arc::new(SmolRuntime), config).await
}

/// Like [`login()`], but returns the whole [`LoginProfile`] (Python `login` with
/// `profile: True`). Tasks run on smol's global executor.
///
/// ```no_run
/// # async fn demo() -> hypha_rpc_smol::Result<()> {
/// let profile = hypha_rpc_smol::login_profile(hypha_rpc_smol::LoginConfig::new("http://127.0.0.1:9527")).await?;
/// println!("{:?} <{:?}>", profile.name, profile.email);
/// # Ok(()) }
/// ```
pub async fn login_profile(config: LoginConfig) -> Result<LoginProfile> {
    login_profile_with_runtime(Arc::new(SmolRuntime), config).await
}
