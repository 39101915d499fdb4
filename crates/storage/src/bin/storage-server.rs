//! The `storage-server` binary: serves a durable storage directory over TCP.
//!
//! Usage: `storage-server --data-dir DIR --listen ADDR` and the security flags of
//! `transport::SecurityFlags` (TLS with `--tls-cert`/`--tls-key`, or `--insecure`; the shared secret
//! from `--secret-file` or `CCR_SHARED_SECRET`). Prints `listening on ADDR` (the bound address, useful
//! with port 0) once it accepts connections. SIGTERM or ctrl-c stop accepting, close the
//! connections (releasing their holds), flush and close the log, and exit 0. Logs go to stderr through
//! `tracing` (`RUST_LOG` filters them, default `info`).
//!
//! Not here: any storage logic (see the `storage` library). Tested by `tests/it/server.rs`, which runs the
//! same `Server` in process.

// The binary reports its address on stdout and usage errors on stderr; everything else goes through tracing.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use storage::{InProcess, Server, StoreConfig};
use transport::{SecurityFlags, ServerSecurity};

struct Args {
    data_dir: PathBuf,
    listen: String,
    security: ServerSecurity,
}

fn parse_args() -> Result<Args, String> {
    let mut data_dir = None;
    let mut listen = None;
    let mut security = SecurityFlags::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--data-dir" => data_dir = Some(PathBuf::from(args.next().ok_or("--data-dir needs a value")?)),
            "--listen" => listen = Some(args.next().ok_or("--listen needs a value")?),
            "--help" | "-h" => return Err(String::new()),
            other => {
                if !security.parse(other, || args.next().ok_or(format!("{other} needs a value")))? {
                    return Err(format!("unknown argument {other:?}"));
                }
            }
        }
    }
    Ok(Args {
        data_dir: data_dir.ok_or("--data-dir is required")?,
        listen: listen.ok_or("--listen is required")?,
        security: security.server()?,
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only ctrl-c stops the server");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("storage-server: {message}");
            }
            eprintln!("usage: storage-server --data-dir DIR --listen ADDR {}", SecurityFlags::USAGE);
            return ExitCode::from(2);
        }
    };
    let dir = args.data_dir.clone();
    let store = match tokio::task::spawn_blocking(move || InProcess::open(dir, StoreConfig::default())).await
    {
        Ok(Ok(store)) => store,
        Ok(Err(error)) => {
            eprintln!("storage-server: cannot open {}: {error}", args.data_dir.display());
            return ExitCode::FAILURE;
        }
        Err(error) => {
            eprintln!("storage-server: recovery panicked: {error}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::bind(&args.listen, store.clone(), args.security.clone()).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("storage-server: cannot listen on {}: {error}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    match server.local_addr() {
        Ok(addr) => {
            println!("listening on {addr}");
            let _ = std::io::stdout().flush();
        }
        Err(error) => eprintln!("storage-server: {error}"),
    }
    let result = server.serve(shutdown_signal()).await;
    store.shutdown().await;
    match result {
        Ok(()) => {
            tracing::info!("storage-server stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("storage-server: {error}");
            ExitCode::FAILURE
        }
    }
}
