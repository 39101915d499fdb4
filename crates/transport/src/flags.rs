//! [`SecurityFlags`]: the security flags the workspace's binary (`compute-replica`) takes, and how they
//! become a [`ServerSecurity`] or a [`ClientSecurity`].
//!
//! ```text
//! --tls-cert FILE --tls-key FILE   this process's certificate chain and key (PEM): TLS on its port
//! --tls-ca FILE                    the CA that the certificates of the servers it connects to chain to
//! --tls-client-ca FILE             require client certificates chaining to this CA (instead of, or with,
//!                                  the shared secret)
//! --insecure                       plain TCP instead of TLS (the shared secret is still required)
//! --secret-file FILE               the shared secret (a file only its owner can read); without it, the
//!                                  environment variable CCR_SHARED_SECRET
//! ```
//!
//! TLS or `--insecure` must be chosen explicitly; giving both is an error, and so is a combination that
//! authenticates nobody. The secret is never a flag's value (it would show in `ps`).
//!
//! **Tests.** `mod tests` below.

use std::path::PathBuf;

use crate::secret::{SECRET_ENV, SharedSecret};
use crate::security::{ClientSecurity, ServerSecurity};
use crate::tls::{TlsClientConfig, TlsServerConfig};

/// The flags, parsed. See the module documentation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SecurityFlags {
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// `--tls-ca`.
    pub tls_ca: Option<PathBuf>,
    /// `--tls-client-ca`.
    pub tls_client_ca: Option<PathBuf>,
    /// `--secret-file`.
    pub secret_file: Option<PathBuf>,
    /// `--insecure`.
    pub insecure: bool,
}

impl SecurityFlags {
    /// The flags' usage, for a binary's usage line.
    pub const USAGE: &'static str = "(--tls-cert FILE --tls-key FILE [--tls-ca FILE] [--tls-client-ca FILE] | --insecure) [--secret-file FILE]";

    /// Takes `flag` if it is one of these, reading its value with `value`: whether it was.
    ///
    /// # Examples
    /// ```
    /// use transport::SecurityFlags;
    /// let mut flags = SecurityFlags::default();
    /// assert_eq!(flags.parse("--tls-ca", || Ok("ca.pem".to_string())), Ok(true));
    /// assert_eq!(flags.parse("--insecure", || unreachable!()), Ok(true));
    /// assert_eq!(flags.parse("--workers", || unreachable!()), Ok(false));
    /// assert_eq!(flags.tls_ca.as_deref(), Some(std::path::Path::new("ca.pem")));
    /// ```
    pub fn parse(
        &mut self,
        flag: &str,
        value: impl FnOnce() -> Result<String, String>,
    ) -> Result<bool, String> {
        let slot = match flag {
            "--tls-cert" => &mut self.tls_cert,
            "--tls-key" => &mut self.tls_key,
            "--tls-ca" => &mut self.tls_ca,
            "--tls-client-ca" => &mut self.tls_client_ca,
            "--secret-file" => &mut self.secret_file,
            "--insecure" => {
                self.insecure = true;
                return Ok(true);
            }
            _ => return Ok(false),
        };
        *slot = Some(PathBuf::from(value()?));
        Ok(true)
    }

    /// The shared secret: from `--secret-file`, else from [`SECRET_ENV`], else none.
    pub fn secret(&self) -> Result<Option<SharedSecret>, String> {
        if let Some(path) = &self.secret_file {
            return SharedSecret::from_file(path).map(Some).map_err(|e| e.to_string());
        }
        match std::env::var_os(SECRET_ENV) {
            Some(value) if !value.is_empty() => {
                SharedSecret::from_env(SECRET_ENV).map(Some).map_err(|e| e.to_string())
            }
            _ => Ok(None),
        }
    }

    fn choose_mode(&self) -> Result<bool, String> {
        let any_tls = self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_client_ca.is_some();
        match (self.insecure, any_tls) {
            (true, true) => Err("--insecure and the --tls-* flags exclude each other".to_string()),
            (true, false) => Ok(false),
            (false, _) => Ok(true),
        }
    }

    /// The security of this process's listening port.
    pub fn server(&self) -> Result<ServerSecurity, String> {
        let secret = self.secret()?;
        if !self.choose_mode()? {
            let secret = secret.ok_or_else(|| missing_secret("--insecure"))?;
            return Ok(ServerSecurity::insecure(secret));
        }
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Err("TLS needs --tls-cert and --tls-key (or plain TCP: --insecure)".to_string());
        };
        let tls = TlsServerConfig::from_pem_files(cert, key, self.tls_client_ca.as_deref())
            .map_err(|e| e.to_string())?;
        ServerSecurity::tls(tls, secret).map_err(|e| e.to_string())
    }

    /// The security of this process's connections to servers (they prove the shared secret; client
    /// certificates are for controllers, not for these).
    pub fn client(&self) -> Result<ClientSecurity, String> {
        let insecure = self.insecure;
        let secret = self.secret()?.ok_or_else(|| missing_secret("connecting to a server"))?;
        if insecure {
            return Ok(ClientSecurity::insecure(secret));
        }
        let ca =
            self.tls_ca.as_ref().ok_or("connecting with TLS needs --tls-ca (or plain TCP: --insecure)")?;
        let tls = TlsClientConfig::from_pem_files(ca, None).map_err(|e| e.to_string())?;
        ClientSecurity::tls(tls, Some(secret)).map_err(|e| e.to_string())
    }
}

fn missing_secret(when: &str) -> String {
    format!("{when} needs a shared secret: --secret-file FILE or the environment variable {SECRET_ENV}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Result<SecurityFlags, String> {
        let mut flags = SecurityFlags::default();
        let mut args = args.iter().map(|a| a.to_string());
        while let Some(flag) = args.next() {
            let taken = flags.parse(&flag, || args.next().ok_or("a value".to_string()))?;
            assert!(taken, "{flag} is a security flag");
        }
        Ok(flags)
    }

    #[test]
    fn plain_tcp_must_be_asked_for_and_needs_a_secret_and_tls_needs_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        SharedSecret::new(vec![b'x'; 32]).unwrap().write_to_file(&secret_file).unwrap();
        let secret_file = secret_file.to_str().unwrap();
        // (flags, the server's security is had, or the error mentions)
        let table: [(&[&str], Result<(), &str>); 5] = [
            (&["--insecure", "--secret-file", secret_file], Ok(())),
            (&["--secret-file", secret_file], Err("--tls-cert")),
            (&["--insecure", "--tls-cert", "c.pem", "--secret-file", secret_file], Err("exclude")),
            (
                &["--tls-cert", "missing.pem", "--tls-key", "missing.key", "--secret-file", secret_file],
                Err("missing.pem"),
            ),
            (&["--secret-file", "/nonexistent/secret", "--insecure"], Err("/nonexistent/secret")),
        ];
        for (args, expected) in table {
            let outcome = flags(args).unwrap().server().map(|_| ());
            match (outcome, expected) {
                (Ok(()), Ok(())) => {}
                (Err(error), Err(mention)) => assert!(error.contains(mention), "{args:?}: {error}"),
                (outcome, expected) => panic!("{args:?}: {outcome:?}, expected {expected:?}"),
            }
        }
        let client = flags(&["--secret-file", secret_file]).unwrap().client();
        assert!(client.unwrap_err().contains("--tls-ca"));
        assert!(flags(&["--insecure", "--secret-file", secret_file]).unwrap().client().is_ok());
    }
}
