//! The websocket transport, written once for every runtime: TCP from the [`Runtime`], TLS
//! with rustls (ring provider, webpki roots, verification always on), websocket framing by
//! async-tungstenite with message sizes bounded by the engine's [`Limits`].

use std::sync::Arc;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use futures_rustls::TlsConnector;
use futures_rustls::pki_types::{CertificateDer, ServerName};
use futures_rustls::rustls::{self, ClientConfig, RootCertStore};
use hypha_rpc_core::Limits;

use crate::config::Endpoint;
use crate::error::{Error, Result};
use crate::runtime::{BoxIo, Runtime};

/// An open websocket to the server.
pub(crate) type Socket = WebSocketStream<BoxIo>;

fn tls_config(extra_roots: &[Vec<u8>]) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for der in extra_roots {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| Error::Transport(format!("bad root certificate: {e}")))?;
    }
    // The provider is chosen here, explicitly: ring.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Transport(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Opens the websocket to `endpoint`.
pub(crate) async fn connect(
    rt: &dyn Runtime,
    endpoint: &Endpoint,
    limits: &Limits,
    extra_roots: &[Vec<u8>],
) -> Result<Socket> {
    let tcp = rt
        .connect_tcp(&endpoint.host, endpoint.port)
        .await
        .map_err(|e| Error::Transport(format!("connect to {}:{}: {e}", endpoint.host, endpoint.port)))?;
    let io: BoxIo = if endpoint.secure {
        let connector = TlsConnector::from(Arc::new(tls_config(extra_roots)?));
        let name = ServerName::try_from(endpoint.host.clone())
            .map_err(|_| Error::InvalidUrl { url: endpoint.url(), reason: "bad host name for TLS" })?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| Error::Transport(format!("tls handshake with {}: {e}", endpoint.host)))?;
        Box::pin(tls)
    } else {
        tcp
    };
    let max = limits.max_frame_bytes;
    // Small read buffer: an idle client holds little; large messages grow it as needed.
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let (socket, _) = async_tungstenite::client_async_with_config(endpoint.url(), io, Some(config))
        .await
        .map_err(|e| Error::Transport(format!("websocket handshake with {}: {e}", endpoint.url())))?;
    Ok(socket)
}
