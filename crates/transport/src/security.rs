//! How a connection is secured: [`ServerSecurity`] for the accepting end, [`ClientSecurity`] for the
//! connecting end, and the one call each makes on a new TCP connection ([`ServerSecurity::accept`],
//! [`ClientSecurity::connect`]): TLS (unless insecure), then authentication (`auth`), returning framed
//! halves whose limit is still [`PRE_AUTH_MAX_FRAME_BYTES`] (the shell raises it once its own handshake
//! is done).
//!
//! **The choices, and what each protects against.**
//!
//! | server | client | who is authenticated | on-path attacker |
//! |---|---|---|---|
//! | TLS + secret | TLS (CA) + secret | the server by its certificate and proof, the client by its proof | sees and changes nothing |
//! | TLS + client CA | TLS (CA) + client certificate | both by certificates | sees and changes nothing |
//! | TLS + client CA + secret | TLS + client certificate + secret | both, both ways | sees and changes nothing |
//! | insecure + secret | insecure + secret | both by proofs, once | reads everything; can take over an authenticated connection |
//!
//! Plain TCP is never a default: it is only had through [`ServerSecurity::insecure`] and
//! [`ClientSecurity::insecure`] (a binary's `--insecure`), and even then a secret is required. A
//! configuration that would authenticate nobody (TLS without a client CA and without a secret) is refused
//! ([`SecurityError::NoAuthentication`]).
//!
//! **Binding.** Under TLS both proofs cover keying material exported from the TLS session, so a proof
//! is good for that session only.
//!
//! **Tests.** `tests/it/security.rs`.

use std::sync::Arc;

use tokio::net::TcpStream;

use crate::auth::{self, AuthError, AuthParams, PRE_AUTH_MAX_FRAME_BYTES};
use crate::secret::SharedSecret;
use crate::tls::{
    EXPORTER_LABEL, SecureReadHalf, SecureWriteHalf, TlsClientConfig, TlsServerConfig, split_plain, split_tls,
};
use crate::{FramedRead, FramedWrite};

/// An authenticated connection's framed halves (their limit still [`PRE_AUTH_MAX_FRAME_BYTES`]).
pub type Secured = (FramedRead<SecureReadHalf>, FramedWrite<SecureWriteHalf>);

/// A security configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecurityError {
    /// Neither a shared secret nor client certificates: nobody would be authenticated.
    #[error(
        "no authentication configured: give a shared secret, or client certificates (a client CA on the server, a client certificate on the client)"
    )]
    NoAuthentication,
}

/// The accepting end's security. See the module documentation.
#[derive(Clone)]
pub struct ServerSecurity {
    tls: Option<(tokio_rustls::TlsAcceptor, bool)>,
    secret: Option<SharedSecret>,
}

impl std::fmt::Debug for ServerSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSecurity")
            .field("tls", &self.tls.is_some())
            .field("client_certificates", &self.requires_client_certificates())
            .field("secret", &self.secret.is_some())
            .finish()
    }
}

impl ServerSecurity {
    /// TLS with `tls`; clients prove `secret` if one is given, and must present a certificate if `tls`
    /// requires one. Refused if neither.
    pub fn tls(tls: TlsServerConfig, secret: Option<SharedSecret>) -> Result<ServerSecurity, SecurityError> {
        let client_certificates = tls.requires_client_certificates();
        if secret.is_none() && !client_certificates {
            return Err(SecurityError::NoAuthentication);
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
        Ok(ServerSecurity { tls: Some((acceptor, client_certificates)), secret })
    }

    /// Plain TCP (explicitly insecure); clients prove `secret`.
    pub fn insecure(secret: SharedSecret) -> ServerSecurity {
        ServerSecurity { tls: None, secret: Some(secret) }
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.tls.as_ref().is_some_and(|(_, required)| *required)
    }

    /// The shared secret, if clients prove one.
    pub fn secret(&self) -> Option<&SharedSecret> {
        self.secret.as_ref()
    }

    /// Secures and authenticates a new connection for `service`. No timeout here: the caller bounds the
    /// whole handshake.
    pub async fn accept(&self, stream: TcpStream, service: &str) -> Result<Secured, AuthError> {
        let (read, write, binding) = match &self.tls {
            None => {
                let (read, write) = split_plain(stream);
                (read, write, Vec::new())
            }
            Some((acceptor, _)) => {
                let stream = acceptor.accept(stream).await.map_err(AuthError::Tls)?;
                let binding = export_binding(stream.get_ref().1)?;
                let (read, write) = split_tls(stream.into());
                (read, write, binding)
            }
        };
        let mut input = FramedRead::new(read, PRE_AUTH_MAX_FRAME_BYTES);
        let mut output = FramedWrite::new(write, PRE_AUTH_MAX_FRAME_BYTES);
        let params = AuthParams { secret: self.secret.as_ref(), service, binding: &binding };
        auth::accept(&mut input, &mut output, params).await?;
        Ok((input, output))
    }
}

/// The connecting end's security. See the module documentation.
#[derive(Clone)]
pub struct ClientSecurity {
    tls: Option<(tokio_rustls::TlsConnector, TlsClientConfig)>,
    secret: Option<SharedSecret>,
}

impl std::fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecurity")
            .field("tls", &self.tls.as_ref().map(|(_, config)| config))
            .field("secret", &self.secret.is_some())
            .finish()
    }
}

impl ClientSecurity {
    /// TLS with `tls` (the server's certificate checked against its CA); we prove `secret` if one is
    /// given, and present a client certificate if `tls` has one. Refused if neither.
    pub fn tls(tls: TlsClientConfig, secret: Option<SharedSecret>) -> Result<ClientSecurity, SecurityError> {
        if secret.is_none() && !tls.has_client_certificate() {
            return Err(SecurityError::NoAuthentication);
        }
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
        Ok(ClientSecurity { tls: Some((connector, tls)), secret })
    }

    /// Plain TCP (explicitly insecure); we prove `secret` and require the server's proof of it.
    pub fn insecure(secret: SharedSecret) -> ClientSecurity {
        ClientSecurity { tls: None, secret: Some(secret) }
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The shared secret, if we prove one.
    pub fn secret(&self) -> Option<&SharedSecret> {
        self.secret.as_ref()
    }

    /// Secures and authenticates a new connection to `address` (whose host is the name the server's
    /// certificate must have, unless the TLS configuration names another) for `service`. No timeout
    /// here: the caller bounds the whole handshake.
    pub async fn connect(
        &self,
        stream: TcpStream,
        address: &str,
        service: &str,
    ) -> Result<Secured, AuthError> {
        let (read, write, binding) = self.connect_without_authentication(stream, address).await?;
        let mut input = FramedRead::new(read, PRE_AUTH_MAX_FRAME_BYTES);
        let mut output = FramedWrite::new(write, PRE_AUTH_MAX_FRAME_BYTES);
        let params = AuthParams { secret: self.secret.as_ref(), service, binding: &binding };
        auth::connect(&mut input, &mut output, params).await?;
        Ok((input, output))
    }

    /// The first half of [`Self::connect`]: TLS (unless insecure), and not the authentication. The raw
    /// halves and the session's binding (empty without TLS) for the exchange's proofs. For adversarial
    /// tests that speak (or garble) the exchange themselves; a client always calls [`Self::connect`].
    pub async fn connect_without_authentication(
        &self,
        stream: TcpStream,
        address: &str,
    ) -> Result<(SecureReadHalf, SecureWriteHalf, Vec<u8>), AuthError> {
        Ok(match &self.tls {
            None => {
                let (read, write) = split_plain(stream);
                (read, write, Vec::new())
            }
            Some((connector, config)) => {
                let name = config
                    .server_name_for(address)
                    .map_err(|e| AuthError::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
                let stream = connector.connect(name, stream).await.map_err(AuthError::Tls)?;
                let binding = export_binding(stream.get_ref().1)?;
                let (read, write) = split_tls(stream.into());
                (read, write, binding)
            }
        })
    }
}

/// 32 bytes of keying material exported from a TLS session: the binding of proofs to it.
fn export_binding<D>(connection: &rustls::ConnectionCommon<D>) -> Result<Vec<u8>, AuthError> {
    connection
        .export_keying_material(vec![0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| AuthError::Tls(std::io::Error::other(e)))
}
