//! TLS on the controller's listeners: the gRPC listener's config (client certificates requested, optional:
//! devices present one, operators use bearer tokens) and a TLS listener for the HTTP server whose handshakes
//! run in their own tasks, bounded in number and time, so a slow client never holds up the others.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio_rustls::server::TlsStream;

use crate::pki::Pki;

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once on the HTTP listener.
const MAX_HANDSHAKES: usize = 256;
/// Finished handshakes waiting for the HTTP server to pick them up.
const ACCEPTED_QUEUE: usize = 64;

/// The gRPC listener's TLS: the controller's certificate, client certificates from the CA requested but
/// optional (the session handler refuses a device session without one).
pub fn grpc_config(pki: &Pki) -> tonic::transport::ServerTlsConfig {
    let server = pki.server();
    tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&server.cert_pem, &server.key_pem))
        .client_ca_root(tonic::transport::Certificate::from_pem(pki.ca_pem()))
        .client_auth_optional(true)
        .timeout(HANDSHAKE_TIMEOUT)
}

/// The HTTP listener's TLS (registry and probes): server authentication only; clients send tokens.
pub fn http_config(pki: &Pki) -> anyhow::Result<Arc<ServerConfig>> {
    let server = pki.server();
    let certs = CertificateDer::pem_slice_iter(server.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes())?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A listener yielding TLS streams whose handshake finished; failed handshakes are logged and dropped.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        let acceptor = TlsAcceptor::from(config);
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "Accepting an HTTP connection failed.");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Without it a response's last small write waits for the client's delayed ACK (40 ms per
                // small blob or manifest).
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%peer, %error, "TCP_NODELAY could not be set.");
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed."),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out."),
                    }
                });
            }
        });
        Ok(TlsListener { accepted, local, task })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept task only ends with the listener: wait for shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
