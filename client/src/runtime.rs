//! The seams between the shared driver and an async runtime: how to spawn, sleep, open a TCP
//! stream and bind a UDP socket (for WebRTC). `hypha-rpc-tokio` and `hypha-rpc-smol` implement [`Runtime`]; nothing else
//! in this crate knows which runtime runs it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
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
    /// Binds a UDP socket to `addr` (port 0: any free port). Needed for WebRTC only; the
    /// default says it is unsupported.
    fn bind_udp(&self, addr: SocketAddr) -> io::Result<Box<dyn Udp>> {
        let _ = addr;
        Err(io::Error::new(io::ErrorKind::Unsupported, "this runtime has no UDP sockets"))
    }
}

/// Binds a non-blocking UDP socket for WebRTC, with 4 MiB kernel buffers each way (or the
/// system's cap, `net.core.rmem_max`), so that a burst of a full SCTP window is not dropped by
/// the kernel before the driver reads it. The runtimes wrap it in their own socket type.
pub fn bind_udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    for size in [4 << 20, 1 << 20] {
        if s.set_recv_buffer_size(size).is_ok() {
            break;
        }
    }
    for size in [4 << 20, 1 << 20] {
        if s.set_send_buffer_size(size).is_ok() {
            break;
        }
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A bound, non-blocking UDP socket, as WebRTC's ICE and DTLS need it.
pub trait Udp: Send + Sync + 'static {
    /// The address it is bound to.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Receives one datagram into `buf`, with its sender.
    fn poll_recv_from(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<(usize, SocketAddr)>>;
    /// Sends one datagram to `target`.
    fn poll_send_to(&self, cx: &mut Context<'_>, buf: &[u8], target: SocketAddr) -> Poll<io::Result<usize>>;
}
