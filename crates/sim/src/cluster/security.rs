//! The scenario's security: TLS and a shared secret on every connection (controller → replicas, between
//! a replica's processes), made fresh for each run, or
//! plain TCP with the secret under `--insecure`.
//!
//! **What is made.** A throwaway CA and a server certificate for `127.0.0.1` and `localhost` (and, with
//! `--netns`, every address of the run's subnet)
//! (`transport::certs`), which every replica process presents and the controller checks, written to
//! `security/` in the run's data directory (keys readable by their owner only), and a random shared
//! secret, which the replicas read from their environment (`ReplicaProcessSecurity`); it never appears on
//! a command line.
//!
//! **What this is not.** A way to run production: a deployment brings its own certificates (see the
//! README).
//!
//! **Tests.** The scenario's own run in `cargo xtask test-suite` (with TLS); `--insecure` by hand.

use std::path::Path;

use anyhow::{Context, anyhow};
use controller::{ClientSecurity, ReplicaProcessSecurity, ReplicaTlsFiles, SharedSecret, TlsClientConfig};
use transport::certs::{PkiFiles, write_throwaway_pki};

/// The run's certificates and secret. See the module documentation.
#[derive(Debug)]
pub struct ClusterSecurity {
    secret: SharedSecret,
    /// `None` under `--insecure`.
    tls: Option<PkiFiles>,
}

impl ClusterSecurity {
    /// Makes the run's secret and (unless `insecure`) certificates in `dir`, which must not exist yet.
    pub fn generate(dir: &Path, insecure: bool) -> anyhow::Result<ClusterSecurity> {
        ClusterSecurity::generate_for(dir, insecure, &[])
    }

    /// [`generate`](Self::generate), with a server certificate that names `hosts` too (the addresses of
    /// `--netns`'s namespaces, where the replica processes listen).
    pub fn generate_for(
        dir: &Path,
        insecure: bool,
        hosts: &[std::net::IpAddr],
    ) -> anyhow::Result<ClusterSecurity> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let secret = SharedSecret::generate().map_err(|e| anyhow!("cannot draw a shared secret: {e}"))?;
        let names: Vec<String> = ["127.0.0.1".to_string(), "localhost".to_string()]
            .into_iter()
            .chain(hosts.iter().map(|h| h.to_string()))
            .collect();
        let tls = if insecure {
            None
        } else {
            Some(
                write_throwaway_pki(dir, &names.iter().map(String::as_str).collect::<Vec<_>>())
                    .map_err(|e| anyhow!("cannot make the run's certificates: {e}"))?,
            )
        };
        Ok(ClusterSecurity { secret, tls })
    }

    /// `"TLS and a shared secret"` or `"plain TCP and a shared secret (--insecure)"`.
    pub fn describe(&self) -> &'static str {
        match self.tls {
            Some(_) => "TLS and a shared secret",
            None => "plain TCP and a shared secret (--insecure)",
        }
    }

    /// How the orchestrator starts the replica processes.
    pub fn replicas(&self) -> ReplicaProcessSecurity {
        ReplicaProcessSecurity {
            tls: self.tls.as_ref().map(|files| ReplicaTlsFiles {
                cert: files.server_cert.clone(),
                key: files.server_key.clone(),
                client_ca: None,
            }),
            secret: Some(self.secret.clone()),
        }
    }

    /// How this process (the controller) connects to the replicas.
    pub fn client(&self) -> anyhow::Result<ClientSecurity> {
        match &self.tls {
            Some(files) => {
                let tls = TlsClientConfig::from_pem_files(&files.ca, None)
                    .map_err(|e| anyhow!("cannot load the run's CA: {e}"))?;
                ClientSecurity::tls(tls, Some(self.secret.clone())).map_err(|e| anyhow!("{e}"))
            }
            None => Ok(ClientSecurity::insecure(self.secret.clone())),
        }
    }
}
