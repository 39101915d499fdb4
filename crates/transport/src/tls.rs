//! TLS with `rustls` (TLS 1.3 only, the `ring` provider): configurations read from PEM files, and the
//! stream halves the shells read and write ([`SecureReadHalf`], [`SecureWriteHalf`]: TLS or plain TCP).
//!
//! - [`TlsServerConfig`]: a server's certificate chain and key, and optionally a CA whose certificates
//!   clients must present (client certificates, an alternative to the shared secret);
//! - [`TlsClientConfig`]: the CA a server's certificate must chain to (the name checked is the host of
//!   the address connected to, or [`TlsClientConfig::with_server_name`]), and optionally the client's own
//!   certificate and key.
//!
//! **What this is not.** No policy: which ends need what is `security`'s.
//!
//! **Tests.** `tests/it/security.rs` (certificates from `certs`, a wrong CA, a wrong name, a missing or
//! untrusted client certificate).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The label of the keying material exported from a TLS session to bind authentication proofs to it
/// (RFC 5705 / RFC 8446 §7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-ccr-auth-binding";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A PEM file could not be read or holds nothing of the kind expected.
    #[error("{what} from {path}: {reason}")]
    Pem {
        /// What was read (certificate chain, private key, CA).
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the material (a key that does not match, a CA that is not one, ...).
    #[error("invalid TLS configuration: {0}")]
    Rustls(String),
    /// A server name that is neither a DNS name nor an IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// The `ring` provider: it builds with a C compiler alone (`aws-lc-rs` needs more of the build machine).
/// rustls 0.23.48 deprecates it for lacking post-quantum key exchange (X25519MLKEM768); traffic recorded
/// today could be decrypted by a future quantum computer. Moving to `aws-lc-rs` is a change of this
/// function and of the workspace's `rustls` features.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn rustls_error(error: impl std::fmt::Display) -> TlsConfigError {
    TlsConfigError::Rustls(error.to_string())
}

/// The certificates in a PEM file (at least one).
fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = |reason: String| TlsConfigError::Pem { what, path: path.display().to_string(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificate in the file".to_string()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsConfigError::Pem {
        what: "private key",
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn root_store(path: &Path) -> Result<rustls::RootCertStore, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates("CA certificates", path)? {
        roots.add(cert).map_err(rustls_error)?;
    }
    Ok(roots)
}

/// A TLS server's configuration. See the module documentation.
#[derive(Clone)]
pub struct TlsServerConfig {
    pub(crate) config: Arc<rustls::ServerConfig>,
    client_certificates: bool,
}

impl std::fmt::Debug for TlsServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServerConfig").field("client_certificates", &self.client_certificates).finish()
    }
}

impl TlsServerConfig {
    /// A server presenting the chain in `cert_chain` with the key in `key` (PEM files); with `client_ca`,
    /// every client must present a certificate that chains to a CA in that file.
    pub fn from_pem_files(
        cert_chain: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<TlsServerConfig, TlsConfigError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_error)?;
        let builder = match client_ca {
            Some(path) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(root_store(path)?),
                    provider(),
                )
                .build()
                .map_err(rustls_error)?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(certificates("certificate chain", cert_chain)?, private_key(key)?)
            .map_err(rustls_error)?;
        Ok(TlsServerConfig { config: Arc::new(config), client_certificates: client_ca.is_some() })
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_certificates
    }
}

/// A TLS client's configuration. See the module documentation.
#[derive(Clone)]
pub struct TlsClientConfig {
    pub(crate) config: Arc<rustls::ClientConfig>,
    server_name: Option<ServerName<'static>>,
    client_certificate: bool,
}

impl std::fmt::Debug for TlsClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClientConfig")
            .field("server_name", &self.server_name)
            .field("client_certificate", &self.client_certificate)
            .finish()
    }
}

impl TlsClientConfig {
    /// A client that trusts the CAs in `ca` (a PEM file) and, with `client`, presents the certificate chain
    /// and key in those PEM files.
    pub fn from_pem_files(
        ca: &Path,
        client: Option<(&Path, &Path)>,
    ) -> Result<TlsClientConfig, TlsConfigError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_error)?
            .with_root_certificates(root_store(ca)?);
        let config = match client {
            Some((chain, key)) => builder
                .with_client_auth_cert(certificates("client certificate chain", chain)?, private_key(key)?)
                .map_err(rustls_error)?,
            None => builder.with_no_client_auth(),
        };
        Ok(TlsClientConfig {
            config: Arc::new(config),
            server_name: None,
            client_certificate: client.is_some(),
        })
    }

    /// Checks servers' certificates for `name` instead of the host of the address connected to.
    pub fn with_server_name(mut self, name: &str) -> Result<TlsClientConfig, TlsConfigError> {
        let parsed = ServerName::try_from(name.to_string())
            .map_err(|_| TlsConfigError::ServerName(name.to_string()))?;
        self.server_name = Some(parsed);
        Ok(self)
    }

    /// The rustls configuration, for a client that runs the handshake itself (the PostgreSQL consensus,
    /// whose driver starts TLS inside its own protocol).
    pub fn rustls_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.config)
    }

    /// Whether this client presents a certificate.
    pub fn has_client_certificate(&self) -> bool {
        self.client_certificate
    }

    /// The name a server reached at `address` (`host:port`, `[v6]:port`) must have in its certificate.
    pub(crate) fn server_name_for(&self, address: &str) -> Result<ServerName<'static>, TlsConfigError> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = match address.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => address,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string()).map_err(|_| TlsConfigError::ServerName(host.to_string()))
    }
}

type TlsStream = tokio_rustls::TlsStream<TcpStream>;

/// The read half of a connection, TLS or plain TCP.
#[derive(Debug)]
pub enum SecureReadHalf {
    /// Plain TCP (`--insecure`).
    Plain(OwnedReadHalf),
    /// TLS.
    Tls(ReadHalf<TlsStream>),
}

/// The write half of a connection, TLS or plain TCP.
#[derive(Debug)]
pub enum SecureWriteHalf {
    /// Plain TCP (`--insecure`).
    Plain(OwnedWriteHalf),
    /// TLS.
    Tls(WriteHalf<TlsStream>),
}

/// Splits a TLS stream into halves.
pub(crate) fn split_tls(stream: TlsStream) -> (SecureReadHalf, SecureWriteHalf) {
    let (read, write) = tokio::io::split(stream);
    (SecureReadHalf::Tls(read), SecureWriteHalf::Tls(write))
}

/// Splits a plain TCP stream into halves.
pub(crate) fn split_plain(stream: TcpStream) -> (SecureReadHalf, SecureWriteHalf) {
    let (read, write) = stream.into_split();
    (SecureReadHalf::Plain(read), SecureWriteHalf::Plain(write))
}

impl AsyncRead for SecureReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SecureReadHalf::Plain(half) => Pin::new(half).poll_read(cx, buf),
            SecureReadHalf::Tls(half) => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SecureWriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SecureWriteHalf::Plain(half) => Pin::new(half).poll_write(cx, buf),
            SecureWriteHalf::Tls(half) => Pin::new(half).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SecureWriteHalf::Plain(half) => Pin::new(half).poll_flush(cx),
            SecureWriteHalf::Tls(half) => Pin::new(half).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SecureWriteHalf::Plain(half) => Pin::new(half).poll_shutdown(cx),
            SecureWriteHalf::Tls(half) => Pin::new(half).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SecureWriteHalf::Plain(half) => Pin::new(half).poll_write_vectored(cx, bufs),
            SecureWriteHalf::Tls(half) => Pin::new(half).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            SecureWriteHalf::Plain(half) => half.is_write_vectored(),
            SecureWriteHalf::Tls(half) => half.is_write_vectored(),
        }
    }
}
