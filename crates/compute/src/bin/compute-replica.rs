//! `compute-replica`: one process of a compute replica, as a standalone program.
//!
//! ```text
//! compute-replica --listen ADDR --workers N --storage ADDR [--process I --addresses A0,A1,...]
//!                 [--metrics-addr ADDR]
//! ```
//!
//! A thin wrapper: it connects a `storage::Client` to the storage server and calls
//! `compute::ReplicaServer::start_with_registry` with the process's Prometheus registry, then runs until
//! interrupted (Ctrl-C / SIGINT: exit status 0) or until the process fails (a worker panicked, timely
//! failed, the I/O thread panicked: see `compute::ReplicaHandle::failed`), when it exits with status 1 at
//! once, without waiting for the other processes of its replica (their cluster connections close with it,
//! so they fail too), for its orchestrator to restart the replica. It prints the address it listens on as
//! `listening on ADDR` (useful with port 0). With `--metrics-addr` it serves the registry at
//! `http://ADDR/metrics` (`telemetry::MetricsServer`) and prints `metrics on http://ADDR/metrics`. It is not
//! where any replica logic lives; see the `compute` library. Tested by the `sim` crate's `tests/it/`, which
//! runs it under the process orchestrator (a worker panic and an injected I/O-thread panic,
//! `compute::FAULT_ENV`, each exit with status 1) and scrapes its metrics and checks them with `promtool`.

// The binary talks to a person on its terminal (usage errors, the address it listens on).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use compute::{ReplicaConfig, ReplicaServer};

#[derive(Debug)]
struct Args {
    listen: SocketAddr,
    workers: usize,
    storage: String,
    process: usize,
    addresses: Vec<String>,
    metrics_addr: Option<SocketAddr>,
}

const USAGE: &str = "usage: compute-replica --listen ADDR --workers N --storage ADDR \
[--process I --addresses A0,A1,...] [--metrics-addr ADDR]";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut listen = None;
    let mut workers = 1;
    let mut storage = None;
    let mut process = 0;
    let mut addresses = Vec::new();
    let mut metrics_addr = None;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--workers" => workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?,
            "--storage" => storage = Some(value()?),
            "--process" => process = value()?.parse().map_err(|e| format!("--process: {e}"))?,
            "--addresses" => {
                addresses = value()?.split(',').filter(|a| !a.is_empty()).map(str::to_string).collect()
            }
            "--metrics-addr" => {
                metrics_addr = Some(value()?.parse().map_err(|e| format!("--metrics-addr: {e}"))?)
            }
            "--help" | "-h" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?,
        workers,
        storage: storage.ok_or_else(|| format!("--storage is required\n{USAGE}"))?,
        process,
        addresses,
        metrics_addr,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = match runtime.block_on(storage::Client::connect(args.storage.as_str())) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("cannot connect to storage at {}: {e}", args.storage);
            return ExitCode::FAILURE;
        }
    };
    let config = ReplicaConfig::new(args.listen, args.workers, Arc::new(client))
        .in_cluster(args.process, args.addresses);
    // The process's registry: the replica's metrics, served at `--metrics-addr`.
    let registry = prometheus::Registry::new();
    let handle = match ReplicaServer::start_with_registry(config, registry.clone()) {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("cannot start the replica: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {}", handle.local_addr());
    let _metrics_server = match args.metrics_addr {
        None => None,
        Some(addr) => match runtime.block_on(telemetry::MetricsServer::bind(addr, registry)) {
            Ok(server) => {
                println!("metrics on {}", server.url());
                Some(server)
            }
            Err(e) => {
                eprintln!("cannot serve metrics on {addr}: {e}");
                handle.shutdown();
                return ExitCode::FAILURE;
            }
        },
    };
    let failure = runtime.block_on(async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => None,
            failure = handle.failed() => Some(failure),
        }
    });
    match failure {
        None => {
            handle.shutdown();
            ExitCode::SUCCESS
        }
        Some(failure) => {
            // The orchestrator restarts the process; the controller replays its commands to it. No
            // shutdown: joining timely's threads would wait for the other processes of the replica.
            eprintln!("replica failed: {failure}");
            std::process::exit(1)
        }
    }
}
