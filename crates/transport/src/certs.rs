//! Throwaway certificate authorities (feature `certs`): a CA made on the spot, and certificates it signs
//! for servers and clients, written as PEM files. For tests, benchmarks and the cluster scenario, which
//! run with TLS on without anyone having to make certificates first.
//!
//! **What this is not.** A way to run production: a real deployment's certificates come from its own CA
//! and are named with `--tls-cert`, `--tls-key`, `--tls-ca` (and `--tls-client-ca`).
//!
//! **Invariants.** Private keys are written readable by their owner only (mode 600 on Unix).
//!
//! **Tests.** `tests/it/security.rs` makes every certificate it uses here.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused (an invalid name, ...).
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// A certificate authority made on the spot. See the module documentation.
pub struct ThrowawayCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ThrowawayCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrowawayCa").finish_non_exhaustive()
    }
}

impl ThrowawayCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<ThrowawayCa, CertError> {
        let mut params = CertificateParams::new(Vec::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(ThrowawayCa { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// The CA's certificate (what clients and servers trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> Result<Issued, CertError> {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate named `name`.
    pub fn client(&self, name: &str) -> Result<Issued, CertError> {
        self.issue(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Result<Issued, CertError> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("peer"));
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// The files of a throwaway public-key infrastructure ([`write_throwaway_pki`]).
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// The CA's certificate.
    pub ca: PathBuf,
    /// The server certificate.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

/// Makes a CA, a server certificate for `server_names` and a client certificate named `controller`, and
/// writes them to `dir` (`ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`; keys readable by
/// their owner only).
pub fn write_throwaway_pki(dir: &Path, server_names: &[&str]) -> Result<PkiFiles, CertError> {
    write_throwaway_pki_for(dir, server_names, "controller")
}

/// [`write_throwaway_pki`] with the client certificate named `client_name` (a PostgreSQL server maps it
/// to the database user).
pub fn write_throwaway_pki_for(
    dir: &Path,
    server_names: &[&str],
    client_name: &str,
) -> Result<PkiFiles, CertError> {
    let ca = ThrowawayCa::new("throwaway CA")?;
    let server = ca.server(server_names)?;
    let client = ca.client(client_name)?;
    let files = PkiFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    write_file(&files.ca, ca.cert_pem(), false)?;
    write_file(&files.server_cert, &server.cert_pem, false)?;
    write_file(&files.server_key, &server.key_pem, true)?;
    write_file(&files.client_cert, &client.cert_pem, false)?;
    write_file(&files.client_key, &client.key_pem, true)?;
    Ok(files)
}

/// Writes `contents` to `path` (replacing it), readable by its owner only if `private`.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io { path: path.to_path_buf(), source };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if private { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)
}
