//! The two seams between the shared driver and an async runtime: how to spawn, sleep and open
//! a TCP stream. `hypha-rpc-tokio` and `hypha-rpc-smol` implement [`Runtime`]; nothing else
//! in this crate knows which runtime runs it.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::io::{AsyncRead, AsyncWrite};

/// A byte stream the websocket runs over (a TCP stream, or TLS over it).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Pin<Box<dyn Io>>;

/// What the driver needs from an async runtime. Implementations are a few lines each; see
/// `hypha-rpc-tokio` and `hypha-rpc-smol`.
///
/// ```
/// use std::time::Duration;
/// use futures::future::BoxFuture;
/// use hypha_rpc::runtime::{BoxIo, Runtime};
///
/// /// A runtime that can only fail to connect (enough for this example).
/// struct Nowhere;
/// impl Runtime for Nowhere {
///     fn spawn(&self, task: BoxFuture<'static, ()>) { std::thread::spawn(|| futures::executor::block_on(task)); }
///     fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> { Box::pin(async move { std::thread::sleep(d) }) }
///     fn connect_tcp(&self, _host: &str, _port: u16) -> BoxFuture<'static, std::io::Result<BoxIo>> {
///         Box::pin(async { Err(std::io::ErrorKind::ConnectionRefused.into()) })
///     }
/// }
/// let err = futures::executor::block_on(Nowhere.connect_tcp("127.0.0.1", 1)).err().unwrap();
/// assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
/// ```
pub trait Runtime: Send + Sync + 'static {
    /// Runs `task` to completion in the background.
    fn spawn(&self, task: BoxFuture<'static, ()>);
    /// Completes after `duration`.
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;
    /// Opens a TCP connection to `host:port`.
    fn connect_tcp(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<BoxIo>>;
}
