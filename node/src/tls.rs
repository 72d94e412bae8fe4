//! TLS (`[tls]`, rustls with ring).
//!
//! - **gRPC listener** (ingress, admin and the node-to-node `Mesh` service share it): TLS with
//!   the node's certificate. A client may present a certificate; if it does, it must chain to
//!   the cluster's CA or the handshake fails (logged with the peer's address and the reason,
//!   counted in `statemesh_tls_refused_total`). The `Mesh` service additionally requires one:
//!   a connection without a member certificate is refused with PERMISSION_DENIED (so only
//!   members can join, forward, or exchange epochs).
//! - **Node to node**: every channel to a peer is `https://`, verifies the peer's certificate
//!   against the cluster's CA and its address (a certificate names its node's advertised host
//!   as a DNS name or IP address), and presents this node's certificate (mutual TLS).
//! - **HTTP listener**: TLS with the node's certificate (no client certificates).
//! - **Remote functions**: `https://` endpoints are verified against the system's roots plus
//!   `remote_ca`.
//!
//! One process runs one node: the node-to-node client identity is process-wide.

use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// A node's loaded TLS material.
pub struct Tls {
    /// The gRPC listener's (member certificates verified, optional).
    pub grpc: Arc<rustls::ServerConfig>,
    /// The HTTP listener's.
    pub http: Arc<rustls::ServerConfig>,
    /// The cluster's CA (PEM), for this node's own clients of other members' admin API.
    pub ca_pem: Vec<u8>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("tls.{what}: {}: {e}", path.display()))
}

fn certs(pem: &[u8], what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.{what}: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.{what}: {}: no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn roots(pem: &[u8], what: &str, path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(pem, what, path)? {
        store
            .add(c)
            .map_err(|e| format!("tls.{what}: {}: {e}", path.display()))?;
    }
    Ok(store)
}

/// The node-to-node client identity and roots, once TLS is on.
static MESH_CLIENT: RwLock<Option<tonic::transport::ClientTlsConfig>> = RwLock::new(None);
/// The roots of `https://` remote function endpoints.
static REMOTE_ROOTS: RwLock<Option<Arc<rustls::ClientConfig>>> = RwLock::new(None);

/// The TLS settings of channels to other members, if TLS is on.
pub(crate) fn mesh_client() -> Option<tonic::transport::ClientTlsConfig> {
    MESH_CLIENT.read().clone()
}

/// The client configuration of `https://` remote function endpoints: the system's roots plus
/// `[tls] remote_ca`.
pub(crate) fn remote_client() -> Arc<rustls::ClientConfig> {
    if let Some(c) = REMOTE_ROOTS.read().clone() {
        return c;
    }
    let c = remote_config(None).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "no roots for https remote functions");
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    });
    *REMOTE_ROOTS.write() = Some(c.clone());
    c
}

fn remote_config(extra: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut store = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = store.add(c);
    }
    if let Some(p) = extra {
        let pem = read(p, "remote_ca")?;
        for c in certs(&pem, "remote_ca", p)? {
            store
                .add(c)
                .map_err(|e| format!("tls.remote_ca: {}: {e}", p.display()))?;
        }
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(store)
            .with_no_client_auth(),
    ))
}

/// Loads `[tls]`: `None` when it is off. Also sets the process's node-to-node client and the
/// roots of remote function endpoints.
pub fn load(cfg: &TlsConfig) -> Result<Option<Arc<Tls>>, String> {
    if cfg.remote_ca.is_some() {
        *REMOTE_ROOTS.write() = Some(remote_config(cfg.remote_ca.as_deref())?);
    }
    let (Some(cert_path), Some(key_path), Some(ca_path)) = (&cfg.cert, &cfg.key, &cfg.ca) else {
        return Ok(None);
    };
    let cert_pem = read(cert_path, "cert")?;
    let key_pem = read(key_path, "key")?;
    let ca_pem = read(ca_path, "ca")?;
    let chain = certs(&cert_pem, "cert", cert_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("tls.key: {}: {e}", key_path.display()))?;
    let ca = Arc::new(roots(&ca_pem, "ca", ca_path)?);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(ca, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("tls.ca: {}: {e}", ca_path.display()))?;
    let server = |client_auth: bool| -> Result<Arc<rustls::ServerConfig>, String> {
        let b = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let b = if client_auth {
            b.with_client_cert_verifier(verifier.clone())
        } else {
            b.with_no_client_auth()
        };
        let mut c = b
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("tls.cert/tls.key: {e}"))?;
        c.alpn_protocols = if client_auth {
            vec![b"h2".to_vec()]
        } else {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        };
        Ok(Arc::new(c))
    };
    let tls = Tls {
        grpc: server(true)?,
        http: server(false)?,
        ca_pem: ca_pem.clone(),
    };
    let client = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem))
        .identity(tonic::transport::Identity::from_pem(&cert_pem, &key_pem));
    *MESH_CLIENT.write() = Some(client);
    Ok(Some(Arc::new(tls)))
}

/// Who may use the node-to-node service: 0 anyone (no `[tls]`, no `[auth]`), 1 members (a
/// certificate of the cluster's CA), 2 nobody (`[auth]` without `[tls]`: a node alone).
static MESH_POLICY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets who may use the node-to-node service (at start).
pub(crate) fn set_mesh_policy(tls: bool, auth: bool) {
    let p = if tls {
        1
    } else if auth {
        2
    } else {
        0
    };
    MESH_POLICY.store(p, std::sync::atomic::Ordering::Relaxed);
}

/// Requires a member certificate on node-to-node requests when TLS is on (the handshake
/// checked that any certificate presented chains to the cluster's CA); refuses them all with
/// `[auth]` but no `[tls]` (anyone could join, forward or read egress past the tokens).
pub(crate) fn require_member(req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    match MESH_POLICY.load(std::sync::atomic::Ordering::Relaxed) {
        0 => return Ok(req),
        2 => {
            tracing::warn!(peer = ?req.remote_addr(), "node-to-node request refused: [auth] without [tls]");
            return Err(tonic::Status::permission_denied(
                "this node has [auth] but no [tls]: its node-to-node service is closed (a cluster with [auth] needs [tls])",
            ));
        }
        _ => {}
    }
    match req.peer_certs() {
        Some(c) if !c.is_empty() => Ok(req),
        _ => {
            tracing::warn!(peer = ?req.remote_addr(), "node-to-node request without a member certificate refused");
            Err(tonic::Status::permission_denied(
                "node-to-node requests need a certificate signed by the cluster's CA ([tls] cert)",
            ))
        }
    }
}

/// The TLS connections of a listener: each accepted connection's handshake runs on its own
/// task (at most 10 s); one that fails is logged (with the peer and the reason), counted, and
/// dropped.
pub(crate) fn incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    metrics: crate::metrics::Metrics,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                // The server stopped: the port is released.
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            tokio::spawn(async move {
                let hs =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                        .await;
                match hs {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => {
                        metrics.tls_refused.inc();
                        tracing::warn!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        metrics.tls_refused.inc();
                        tracing::warn!(%peer, "TLS handshake refused: no handshake within 10 s");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
