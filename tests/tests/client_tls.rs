//! `wss://`: a TLS-terminating proxy with a self-signed certificate in front of the real
//! server. The client refuses it by default (verification is always on) and connects once the
//! certificate's root is added with `ServerConfig::add_root_certificate`.

use std::sync::Arc;

use hypha_rpc_tests::server::HyphaServer;
use hypha_rpc_tokio::{ServerConfig, Service, connect_to_server};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Starts a TLS proxy on 127.0.0.1 for "localhost" forwarding to `backend_port`; returns its
/// port and the certificate (DER) to trust.
async fn tls_proxy(backend_port: u16) -> (u16, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let der = cert.der().to_vec();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut backend) = TcpStream::connect(("127.0.0.1", backend_port)).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut backend).await;
            });
        }
    });
    (port, der)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_private_root() {
    let hs = HyphaServer::start().unwrap_or_else(|e| panic!("the real Hypha server must start: {e}"));
    let (port, root) = tls_proxy(hs.port()).await;
    let url = format!("https://localhost:{port}");

    // Not trusted: the TLS handshake fails, with a message that says so.
    let err = connect_to_server(ServerConfig::new(&url)).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("tls handshake") && text.to_lowercase().contains("certificate"), "{text}");

    // Trusted: a full session over wss://.
    let server = connect_to_server(ServerConfig::new(&url).add_root_certificate(root.clone()))
        .await
        .expect("connect over wss with the private root");
    let id = server
        .register_service(
            Service::new("tls").function("twice", |x: i64| async move { Ok::<_, String>(x * 2) }),
        )
        .await
        .unwrap();
    let v: i64 = server.get_service(&id).await.unwrap().call("twice", (21,)).await.unwrap();
    assert_eq!(v, 42);
    server.disconnect().await;

    // The wss:// form of the URL works too.
    let server =
        connect_to_server(ServerConfig::new(format!("wss://localhost:{port}/ws")).add_root_certificate(root))
            .await
            .expect("wss:// url");
    server.disconnect().await;
}
