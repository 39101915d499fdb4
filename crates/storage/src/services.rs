//! Throwaway storage services on loopback (cargo feature `services`): a PostgreSQL server ([`Postgres`])
//! and an S3-compatible `moto_server` ([`Moto`]), for the storage tests and benchmarks and for
//! `sim cluster --services local`.
//!
//! **What this is.** [`Postgres::start`] runs `initdb` into a fresh temporary directory (as the
//! `postgres` user when running as root, since the server refuses root) and starts the server on a free
//! loopback port with its socket in that directory; [`Postgres::stop`] and [`Postgres::start_again`] take it
//! down and bring it back on the same port and data (the outage tests); dropping it stops the server and
//! deletes the directory. [`Moto::start`] runs `moto_server` from a Python venv that it creates and
//! installs (`moto[server]` from PyPI) the first time, cached under the target directory
//! (`target/services/moto-venv`, or `$STORAGE_SERVICES_DIR/moto-venv`), guarded by a file lock so that
//! parallel test processes install it once; [`Moto::pause`] and [`Moto::resume`] freeze and thaw the
//! server (SIGSTOP, SIGCONT: connections stay open and requests hang, the blob outage of `sim cluster`);
//! dropping it kills the server (paused or not).
//!
//! **Where they listen.** On `127.0.0.1` by default; [`Postgres::start_on`] and [`Moto::start_on`] take a
//! [`ServiceHost`] instead: an address and, optionally, a network namespace the server runs in (through
//! `ip netns exec`, which replaces itself with the server, so the child's pid is the server's). Ports are
//! probed free on this host's loopback; inside a fresh namespace every port is free. PostgreSQL off
//! loopback also trusts clients of its own subnet (`samenet` in `pg_hba.conf`). With
//! [`PostgresOptions::tls`] the server speaks TLS only, with a certificate from a throwaway CA
//! (`transport::certs`) whose file [`Postgres::ca_file`] names; with
//! [`PostgresOptions::client_certificates`] it also wants a client certificate from that CA naming the
//! user ([`Postgres::client_certificate`], for `postgres`; `create_database` presents it too).
//!
//! **Missing services.** Every start returns a [`ServiceError`] saying what is missing and how to get it
//! (`apt-get install -y postgresql`, `python3-venv`). [`services_required`] says whether the caller must
//! fail on it (`CI=true`) rather than skip: under CI a missing service fails the run, never silently.
//!
//! **What this is not.** No tuning for production: these servers live for one test or one run.
//! Blocking calls (`std::process`), meant for test set-up.
//!
//! **Tests.** Used by `tests/it/` (conformance suites, faults) and `benches/storage.rs`.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::external::random_id;

/// The `moto[server]` versions the venv installs.
pub const MOTO_REQUIREMENT: &str = "moto[server]>=5.1,<5.3";

/// Why a service could not be started or controlled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// A program the service needs is not installed.
    #[error("{what} is not installed ({hint})")]
    Missing {
        /// What is missing.
        what: String,
        /// How to install it.
        hint: String,
    },
    /// A command failed.
    #[error("{command} failed: {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its status and the tail of its output.
        output: String,
    },
    /// The service did not come up in time.
    #[error("{what} did not start within {timeout_ms} ms: {log}")]
    Timeout {
        /// The service.
        what: String,
        /// How long we waited.
        timeout_ms: u64,
        /// The tail of its log.
        log: String,
    },
    /// A file-system operation failed.
    #[error("{0}")]
    Io(String),
}

/// Where a service listens: an address and the network namespace it runs in (`None`: this one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceHost {
    /// The address the server binds and clients connect to.
    pub address: Ipv4Addr,
    /// The network namespace (`ip netns` name) the server runs in.
    pub netns: Option<String>,
}

impl ServiceHost {
    /// `127.0.0.1` in this namespace.
    pub fn loopback() -> ServiceHost {
        ServiceHost { address: Ipv4Addr::LOCALHOST, netns: None }
    }

    /// A command running `program` on this host.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(program);
                command
            }
            None => Command::new(program),
        }
    }
}

/// Whether a missing service must fail the caller: `CI` is set to `true` (or `1`).
pub fn services_required() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after).
pub fn free_port() -> Result<u16, ServiceError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| ServiceError::Io(format!("no free port: {e}")))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| ServiceError::Io(e.to_string()))
}

fn run(command: &mut Command) -> Result<String, ServiceError> {
    let line = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| ServiceError::Command { command: line.clone(), output: e.to_string() })?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() {
        Ok(text)
    } else {
        Err(ServiceError::Command { command: line, output: format!("{}: {}", output.status, tail(&text)) })
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

fn read_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    tail(&text)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn wait_for_port(address: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from((address, port));
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while waited < timeout {
        if TcpStream::connect_timeout(&addr, step).is_ok() {
            return true;
        }
        std::thread::sleep(step);
        waited += step;
    }
    false
}

fn scratch_dir(prefix: &str) -> Result<PathBuf, ServiceError> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{:x}", random_id()));
    fs::create_dir_all(&dir)
        .map_err(|e| ServiceError::Io(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

/// Where the PostgreSQL server binaries are: `$STORAGE_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout).
fn postgres_bin() -> Result<PathBuf, ServiceError> {
    if let Ok(dir) = std::env::var("STORAGE_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| ServiceError::Missing {
        what: "the PostgreSQL server (initdb, pg_ctl)".into(),
        hint: "apt-get install -y postgresql, or set STORAGE_PG_BIN".into(),
    })
}

/// How to run the throwaway PostgreSQL server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PostgresOptions {
    /// Whether the server fsyncs its log (off makes tests faster; on for benchmarks).
    pub fsync: bool,
    /// Whether the server speaks TLS only: a throwaway CA signs its certificate ([`Postgres::ca_file`]),
    /// and `pg_hba.conf` refuses connections without TLS.
    pub tls: bool,
    /// With `tls`: whether every client must also present a certificate from that CA naming its database
    /// user (`clientcert=verify-full`); [`Postgres::client_certificate`] names one for `postgres`.
    pub client_certificates: bool,
}

/// A throwaway PostgreSQL server; see the module documentation.
#[derive(Debug)]
pub struct Postgres {
    host: ServiceHost,
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    options: PostgresOptions,
    /// With [`PostgresOptions::tls`]: the CA, the server's and a client's certificates, as written.
    pki: Option<transport::certs::PkiFiles>,
    as_postgres_user: bool,
    running: bool,
}

impl Postgres {
    /// Creates a cluster in a fresh temporary directory and starts it on a free loopback port.
    pub fn start(options: PostgresOptions) -> Result<Postgres, ServiceError> {
        Postgres::start_on(options, ServiceHost::loopback())
    }

    /// [`start`](Self::start), listening on `host` (see the module documentation).
    pub fn start_on(options: PostgresOptions, host: ServiceHost) -> Result<Postgres, ServiceError> {
        let bin = postgres_bin()?;
        let dir = scratch_dir("storage-postgres")?;
        let as_postgres_user = is_root();
        let port = free_port()?;
        let mut server =
            Postgres { host, dir, bin, port, options, pki: None, as_postgres_user, running: false };
        if as_postgres_user {
            run(Command::new("chown").args(["-R", "postgres"]).arg(&server.dir))?;
        }
        let data = server.dir.join("data");
        run(server.pg_command("initdb").arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]))?;
        let hba = data.join("pg_hba.conf");
        let mut text = fs::read_to_string(&hba)
            .map_err(|e| ServiceError::Io(format!("cannot read {}: {e}", hba.display())))?;
        if !server.host.address.is_loopback() {
            // initdb trusts loopback only; clients on the host's own subnet connect from elsewhere.
            text.push_str("\nhost all all samenet trust\n");
        }
        if options.tls {
            // TLS or nothing over TCP (the Unix socket, which `pg_ctl` uses, stays as it is), and with
            // client certificates, one naming the user too.
            let client_cert = if options.client_certificates { " clientcert=verify-full" } else { "" };
            text = text
                .lines()
                .map(|line| match line.starts_with("host ") {
                    true => format!("{}{client_cert}\n", line.replacen("host ", "hostssl ", 1)),
                    false => format!("{line}\n"),
                })
                .collect();
            let address = server.host.address.to_string();
            let pki = transport::certs::write_throwaway_pki_for(&server.dir, &[address.as_str()], "postgres")
                .map_err(|e| ServiceError::Io(format!("cannot make certificates: {e}")))?;
            let conf = data.join("postgresql.conf");
            let mut settings = fs::read_to_string(&conf)
                .map_err(|e| ServiceError::Io(format!("cannot read {}: {e}", conf.display())))?;
            settings.push_str(&format!(
                "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_ca_file = '{}'\n",
                pki.server_cert.display(),
                pki.server_key.display(),
                pki.ca.display()
            ));
            fs::write(&conf, settings)
                .map_err(|e| ServiceError::Io(format!("cannot write {}: {e}", conf.display())))?;
            if as_postgres_user {
                // The server refuses a key it does not own.
                run(Command::new("chown").args(["-R", "postgres"]).arg(&server.dir))?;
            }
            server.pki = Some(pki);
        }
        fs::write(&hba, text)
            .map_err(|e| ServiceError::Io(format!("cannot write {}: {e}", hba.display())))?;
        server.start_again()?;
        Ok(server)
    }

    fn pg_command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres_user {
            let mut command = self.host.command("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            self.host.command(path)
        }
    }

    /// Starts the server (again) on its port and data directory.
    pub fn start_again(&mut self) -> Result<(), ServiceError> {
        assert!(!self.running, "the postgres server is already running");
        let options = format!(
            "-p {} -k {} -c listen_addresses={} -c fsync={} -c max_connections=200",
            self.port,
            self.dir.display(),
            self.host.address,
            if self.options.fsync { "on" } else { "off" }
        );
        let log = self.dir.join("log");
        let started = run(self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "30", "start", "-o", &options]));
        if let Err(error) = started {
            return Err(ServiceError::Command {
                command: "pg_ctl start".into(),
                output: format!("{error}\n{}", read_tail(&log)),
            });
        }
        self.running = true;
        Ok(())
    }

    /// Stops the server (fast shutdown: connections are closed, the data stays).
    pub fn stop(&mut self) -> Result<(), ServiceError> {
        if self.running {
            run(self
                .pg_command("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "fast", "-w", "stop"]))?;
            self.running = false;
        }
        Ok(())
    }

    /// The CA that signed the server's certificate (a PEM file), with [`PostgresOptions::tls`]: a
    /// client's `sslrootcert`.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.pki.as_ref().map(|pki| pki.ca.clone())
    }

    /// A client certificate and its key (PEM files) for the user `postgres`, from the CA of
    /// [`ca_file`](Self::ca_file), with [`PostgresOptions::tls`]: a client's `sslcert` and `sslkey`.
    pub fn client_certificate(&self) -> Option<(PathBuf, PathBuf)> {
        self.pki.as_ref().map(|pki| (pki.client_cert.clone(), pki.client_key.clone()))
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `db` (see [`create_database`](Self::create_database)).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}:{}/{db}", self.host.address, self.port)
    }

    /// Creates database `name` (letters, digits and `_`).
    pub fn create_database(&self, name: &str) -> Result<(), ServiceError> {
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "database name {name:?}");
        let psql = if self.bin.join("psql").exists() { self.bin.join("psql") } else { PathBuf::from("psql") };
        let mut command = Command::new(psql);
        if let Some((cert, key)) = self.client_certificate().filter(|_| self.options.client_certificates) {
            command.env("PGSSLCERT", cert).env("PGSSLKEY", key);
        }
        run(command
            .arg("-h")
            .arg(self.host.address.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-p"])
            .arg(self.port.to_string())
            .args(["-c", &format!("CREATE DATABASE {name}")]))?;
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            tracing::warn!(%error, "cannot stop the throwaway postgres server");
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The directory that caches the moto venv.
fn services_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("STORAGE_SERVICES_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("services")
}

/// Creates (once) the venv with `moto_server`; returns its directory.
pub fn moto_venv() -> Result<PathBuf, ServiceError> {
    let dir = services_dir();
    fs::create_dir_all(&dir)
        .map_err(|e| ServiceError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let venv = dir.join("moto-venv");
    let marker = venv.join(".installed");
    if marker.exists() {
        return Ok(venv);
    }
    let lock_path = dir.join("moto-venv.lock");
    let lock = fs::File::create(&lock_path)
        .map_err(|e| ServiceError::Io(format!("{}: {e}", lock_path.display())))?;
    lock.lock().map_err(|e| ServiceError::Io(format!("cannot lock {}: {e}", lock_path.display())))?;
    if marker.exists() {
        return Ok(venv);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    if Command::new(&python).arg("--version").output().is_err() {
        return Err(ServiceError::Missing {
            what: python,
            hint: "apt-get install -y python3 python3-venv".into(),
        });
    }
    let _ = fs::remove_dir_all(&venv);
    run(Command::new(&python).args(["-m", "venv"]).arg(&venv)).map_err(|error| ServiceError::Missing {
        what: "python3's venv module".into(),
        hint: format!("apt-get install -y python3-venv ({error})"),
    })?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", MOTO_REQUIREMENT]))?;
    fs::write(&marker, MOTO_REQUIREMENT)
        .map_err(|e| ServiceError::Io(format!("{}: {e}", marker.display())))?;
    Ok(venv)
}

/// A throwaway `moto_server` (an S3-compatible server); see the module documentation.
#[derive(Debug)]
pub struct Moto {
    host: ServiceHost,
    child: Child,
    venv: PathBuf,
    port: u16,
    log: PathBuf,
    paused: bool,
}

/// The access key every [`Moto`] URL uses (moto accepts any).
pub const MOTO_ACCESS_KEY: &str = "testing";

impl Moto {
    /// Starts `moto_server` on a free loopback port (creating its venv first if needed).
    pub fn start() -> Result<Moto, ServiceError> {
        Moto::start_on(ServiceHost::loopback())
    }

    /// [`start`](Self::start), listening on `host` (see the module documentation).
    pub fn start_on(host: ServiceHost) -> Result<Moto, ServiceError> {
        let venv = moto_venv()?;
        let port = free_port()?;
        let log = std::env::temp_dir().join(format!("storage-moto-{:x}.log", random_id()));
        let log_file =
            fs::File::create(&log).map_err(|e| ServiceError::Io(format!("{}: {e}", log.display())))?;
        let err_file = log_file.try_clone().map_err(|e| ServiceError::Io(e.to_string()))?;
        let child = host
            .command(venv.join("bin/moto_server"))
            .args(["-H", &host.address.to_string(), "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .spawn()
            .map_err(|e| ServiceError::Command { command: "moto_server".into(), output: e.to_string() })?;
        let address = host.address;
        let mut moto = Moto { host, child, venv, port, log, paused: false };
        let timeout = Duration::from_secs(30);
        if !wait_for_port(address, port, timeout) {
            return Err(ServiceError::Timeout {
                what: "moto_server".into(),
                timeout_ms: timeout.as_millis() as u64,
                log: read_tail(&moto.log),
            });
        }
        if let Ok(Some(status)) = moto.child.try_wait() {
            return Err(ServiceError::Command {
                command: "moto_server".into(),
                output: format!("{status}: {}", read_tail(&moto.log)),
            });
        }
        Ok(moto)
    }

    /// The server's endpoint, `http://ADDRESS:PORT` (`127.0.0.1` unless started on another host).
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host.address, self.port)
    }

    /// Creates bucket `name` (through boto3, which `moto[server]` brings along).
    pub fn create_bucket(&self, name: &str) -> Result<(), ServiceError> {
        assert!(
            name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "bucket {name:?}"
        );
        let script = format!(
            "import boto3; boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
             aws_access_key_id='{MOTO_ACCESS_KEY}', aws_secret_access_key='{MOTO_ACCESS_KEY}').create_bucket(Bucket='{name}')",
            self.endpoint()
        );
        run(Command::new(self.venv.join("bin/python")).args(["-c", &script]))?;
        Ok(())
    }

    /// Freezes the server (SIGSTOP): it keeps its port and connections but answers nothing until
    /// [`resume`](Self::resume)d, so requests hang (or time out) rather than fail.
    pub fn pause(&mut self) -> Result<(), ServiceError> {
        assert!(!self.paused, "moto_server is already paused");
        self.signal("-STOP")?;
        self.paused = true;
        Ok(())
    }

    /// Thaws a [`pause`](Self::pause)d server (SIGCONT); the requests it held are answered.
    pub fn resume(&mut self) -> Result<(), ServiceError> {
        assert!(self.paused, "moto_server is not paused");
        self.signal("-CONT")?;
        self.paused = false;
        Ok(())
    }

    /// Whether the server is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Sends `signal` to the server with `kill` (no libc dependency).
    fn signal(&mut self, signal: &str) -> Result<(), ServiceError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(ServiceError::Command {
                command: format!("kill {signal} moto_server"),
                output: format!("moto_server has exited ({status}): {}", read_tail(&self.log)),
            });
        }
        run(Command::new("kill").arg(signal).arg(self.child.id().to_string()))?;
        Ok(())
    }

    /// A `--blob` URL for `prefix` in `bucket` on this server.
    pub fn blob_url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint={}&region=us-east-1&access_key_id={MOTO_ACCESS_KEY}&secret_access_key={MOTO_ACCESS_KEY}",
            self.endpoint()
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.log);
    }
}
