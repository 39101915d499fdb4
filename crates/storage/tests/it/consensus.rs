//! The `Consensus` conformance suite, run against every backend: in-memory, SQLite and PostgreSQL 15.
//! It checks the contract of `storage::consensus`: compare-and-set appends `expected + 1` iff the head is
//! `expected`; the multi-key form commits all keys or none; invalid requests are determinate errors;
//! scan, truncate (never the head) and list; racing compare-and-sets from two independent opens of the
//! same store (two processes' worth of connections), on one key and on two keys at once, lose no
//! increment and apply none twice;
//! PostgreSQL pushes every committed key to the other open's change channel; a PostgreSQL writer cut off
//! the network right after its compare-and-set holds no lock another writer waits for (through a proxy
//! that stops passing bytes); and a SQLite compare-and-set waits for a write lock another connection
//! holds, up to the store's timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use storage::consensus::{CasOp, CasOutcome, Consensus, VersionedData};
use storage::external::ExternalError;

use crate::backends::{Backend, on_every_backend};

fn version(seqno: u64, data: &'static [u8]) -> VersionedData {
    VersionedData { seqno, data: Bytes::from_static(data) }
}

fn op(key: &str, expected: Option<u64>, seqno: u64) -> CasOp {
    CasOp { key: key.into(), expected, new: version(seqno, b"multi") }
}

async fn the_consensus_contract_holds(consensus: Arc<dyn Consensus>) {
    let c = &*consensus;
    assert_eq!(c.head("k").await.unwrap(), None);
    assert_eq!(c.compare_and_set("k", None, version(0, b"\0zero\0")).await.unwrap(), CasOutcome::Committed);
    assert_eq!(c.head("k").await.unwrap(), Some(version(0, b"\0zero\0")));
    assert_eq!(c.compare_and_set("k", None, version(0, b"again")).await.unwrap(), CasOutcome::Mismatch);
    assert_eq!(c.compare_and_set("k", Some(0), version(1, b"one")).await.unwrap(), CasOutcome::Committed);
    assert_eq!(c.compare_and_set("k", Some(0), version(1, b"late")).await.unwrap(), CasOutcome::Mismatch);
    assert_eq!(c.head("k").await.unwrap(), Some(version(1, b"one")));
    for (expected, seqno) in [(Some(1), 3), (Some(1), 1), (None, 1)] {
        let result = c.compare_and_set("k", expected, version(seqno, b"bad")).await;
        assert!(matches!(result, Err(ExternalError::Determinate(_))), "{expected:?} -> {seqno}: {result:?}");
    }

    // Multi-key: one stale expectation and nothing changes; then all at once.
    let stale = vec![op("x", None, 0), op("k", Some(0), 1)];
    assert_eq!(c.compare_and_set_multi(stale).await.unwrap(), CasOutcome::Mismatch);
    assert_eq!(c.head("x").await.unwrap(), None);
    assert_eq!(c.head("k").await.unwrap(), Some(version(1, b"one")));
    // The mismatch on the last key in key order: the keys before it moved first, and are rolled back.
    let last_stale = vec![op("a", None, 0), op("k", Some(1), 2), op("z", Some(0), 1)];
    assert_eq!(c.compare_and_set_multi(last_stale).await.unwrap(), CasOutcome::Mismatch);
    assert_eq!(c.head("a").await.unwrap(), None);
    assert_eq!(c.head("k").await.unwrap(), Some(version(1, b"one")));
    assert!(c.scan("k", 2, 10).await.unwrap().is_empty(), "no version 2 of k");
    let twice = vec![op("x", None, 0), op("x", None, 0)];
    assert!(matches!(c.compare_and_set_multi(twice).await, Err(ExternalError::Determinate(_))));
    let both = vec![op("x", None, 0), op("k", Some(1), 2)];
    assert_eq!(c.compare_and_set_multi(both).await.unwrap(), CasOutcome::Committed);
    assert_eq!(c.head("x").await.unwrap(), Some(version(0, b"multi")));
    assert_eq!(c.head("k").await.unwrap().unwrap().seqno, 2);

    // Scan, truncate, list.
    let seqnos = |versions: Vec<VersionedData>| versions.into_iter().map(|v| v.seqno).collect::<Vec<_>>();
    assert_eq!(seqnos(c.scan("k", 0, 10).await.unwrap()), [0, 1, 2]);
    assert_eq!(seqnos(c.scan("k", 1, 1).await.unwrap()), [1]);
    assert!(c.scan("missing", 0, 10).await.unwrap().is_empty());
    assert_eq!(c.truncate("k", 2).await.unwrap(), 2);
    assert_eq!(seqnos(c.scan("k", 0, 10).await.unwrap()), [2]);
    assert!(matches!(c.truncate("k", 3).await, Err(ExternalError::Determinate(_))), "never the head");
    assert!(c.truncate("missing", 1).await.is_err());
    assert_eq!(c.truncate("k", 2).await.unwrap(), 0);
    assert_eq!(c.head("k").await.unwrap().unwrap().seqno, 2);
    assert_eq!(c.list_keys().await.unwrap(), vec![("k".to_owned(), 2), ("x".to_owned(), 0)]);
}

/// `tasks` tasks, alternating between two opens, each increment every one of `keys` together `wins`
/// times by compare-and-set (multi-key for several keys): every key ends at the same version, each win
/// applied once to every key.
async fn racing_increments_are_each_applied_once(
    (a, b): (Arc<dyn Consensus>, Arc<dyn Consensus>),
    keys: &'static [&'static str],
    tasks: u64,
    wins: u64,
) {
    let mut running = Vec::new();
    for task in 0..tasks {
        let consensus = if task % 2 == 0 { Arc::clone(&a) } else { Arc::clone(&b) };
        running.push(tokio::spawn(async move {
            let mut won = 0;
            while won < wins {
                let mut ops = Vec::new();
                for key in keys {
                    let head = consensus.head(key).await.unwrap().map(|v| v.seqno);
                    ops.push(op(key, head, head.map_or(0, |s| s + 1)));
                }
                match consensus.compare_and_set_multi(ops).await {
                    Ok(CasOutcome::Committed) => won += 1,
                    // A busy database (a lock it timed out on, a deadlock it broke) is determinate.
                    Ok(CasOutcome::Mismatch) | Err(ExternalError::Determinate(_)) => {}
                    Err(error) => panic!("{error}"),
                }
            }
        }));
    }
    for task in running {
        task.await.unwrap();
    }
    for key in keys {
        assert_eq!(a.head(key).await.unwrap().unwrap().seqno, tasks * wins - 1, "{key}: a version per win");
        assert_eq!(a.scan(key, 0, 1_000).await.unwrap().len() as u64, tasks * wins, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_consensus_backend_meets_the_consensus_contract() {
    on_every_backend(async |stores| {
        the_consensus_contract_holds(stores.consensus().await).await;
        let opens = (stores.consensus().await, stores.consensus().await);
        racing_increments_are_each_applied_once(opens.clone(), &["race"], 16, 25).await;
        racing_increments_are_each_applied_once(opens, &["pair-b", "pair-a"], 8, 10).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pushes_every_committed_key_to_other_opens_and_the_others_have_no_push_channel() {
    on_every_backend(async |stores| {
        let listener = stores.consensus().await;
        let writer = stores.consensus().await;
        let Some(mut changes) = listener.changes() else {
            assert_ne!(stores.backend, Backend::Remote, "PostgreSQL has a push channel");
            return;
        };
        // The listener connects in the background: keep writing until its first notification arrives.
        let mut seqno = None;
        let received = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let next = seqno.map_or(0, |s| s + 1);
                assert_eq!(
                    writer.compare_and_set("pushed", seqno, version(next, b"p")).await.unwrap(),
                    CasOutcome::Committed
                );
                seqno = Some(next);
                if let Ok(Ok(key)) = tokio::time::timeout(Duration::from_millis(200), changes.recv()).await {
                    return key;
                }
            }
        })
        .await
        .expect("no notification within 10 s");
        assert_eq!(received, "pushed");
        // A mismatch commits nothing and announces nothing.
        assert_eq!(
            writer.compare_and_set("pushed", None, version(0, b"x")).await.unwrap(),
            CasOutcome::Mismatch
        );
        let next = seqno.unwrap() + 1;
        writer.compare_and_set("other", None, version(0, b"o")).await.unwrap();
        writer.compare_and_set("pushed", seqno, version(next, b"p")).await.unwrap();
        let mut keys = Vec::new();
        while keys.last().map(String::as_str) != Some("pushed") || !keys.iter().any(|k| k == "other") {
            keys.push(tokio::time::timeout(Duration::from_secs(5), changes.recv()).await.unwrap().unwrap());
        }
        assert!(keys.iter().all(|k| k == "pushed" || k == "other"), "{keys:?}");
    })
    .await;
}

/// Takes SQLite's write lock on `path` from a connection of its own (as another process would), answers
/// once it has it, and keeps it for `hold`.
fn hold_the_write_lock(path: std::path::PathBuf, hold: Duration) -> std::thread::JoinHandle<()> {
    let (taken, wait) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        taken.send(()).unwrap();
        std::thread::sleep(hold);
        conn.execute_batch("COMMIT").unwrap();
    });
    wait.recv().unwrap();
    holder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_compare_and_set_waits_while_another_process_holds_the_write_lock_and_then_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("consensus.db");
    let url = format!("sqlite://{}?timeout_ms=10000", path.display());
    let consensus = url.parse::<storage::consensus::ConsensusConfig>().unwrap().open().await.unwrap();
    let holder = hold_the_write_lock(path, Duration::from_millis(300));
    let outcome = consensus.compare_and_set("k", None, version(0, b"after the lock")).await;
    assert_eq!(outcome.unwrap(), CasOutcome::Committed);
    holder.join().unwrap();
    assert_eq!(consensus.head("k").await.unwrap(), Some(version(0, b"after the lock")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_compare_and_set_gives_up_at_its_timeout_when_another_process_keeps_the_write_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("consensus.db");
    let url = format!("sqlite://{}?timeout_ms=200", path.display());
    let consensus = url.parse::<storage::consensus::ConsensusConfig>().unwrap().open().await.unwrap();
    let holder = hold_the_write_lock(path, Duration::from_secs(3));
    let attempt = tokio::time::timeout(
        Duration::from_secs(2),
        consensus.compare_and_set("k", None, version(0, b"never")),
    )
    .await
    .expect("the busy wait ends at the store's timeout, long before the lock is released");
    assert!(matches!(attempt, Err(ExternalError::Determinate(_))), "{attempt:?}");
    holder.join().unwrap();
    assert_eq!(consensus.head("k").await.unwrap(), None);
}

/// A TCP proxy in front of PostgreSQL that can cut its client off just after a statement: once armed, it
/// forwards the next chunk the client sends that starts with a `Bind` message (`B`: a prepared statement's
/// execution, sent with its `Execute` and `Sync` in one write) and from then on passes nothing either way
/// on that connection, keeping the server's side open, as a host that dropped off the network would.
struct CuttingProxy {
    addr: std::net::SocketAddr,
    armed: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    async fn start(server: std::net::SocketAddr) -> CuttingProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (armed, cut) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (armed_in, cut_in) = (Arc::clone(&armed), Arc::clone(&cut));
        let task = tokio::spawn(async move {
            let mut connections = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = upstream.into_split();
                let silent = Arc::new(AtomicBool::new(false));
                let (armed, cut, silent_up) =
                    (Arc::clone(&armed_in), Arc::clone(&cut_in), Arc::clone(&silent));
                connections.push(tokio::spawn(async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if silent_up.load(Ordering::SeqCst) {
                            continue;
                        }
                        if server_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                        if buffer[0] == b'B' && armed.swap(false, Ordering::SeqCst) {
                            silent_up.store(true, Ordering::SeqCst);
                            cut.store(true, Ordering::SeqCst);
                        }
                    }
                    // A cut-off host sends no FIN: the server's side stays open until the proxy goes.
                    std::future::pending::<()>().await;
                    drop(server_write);
                }));
                connections.push(tokio::spawn(async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    while let Ok(n) = server_read.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        if !silent.load(Ordering::SeqCst)
                            && client_write.write_all(&buffer[..n]).await.is_err()
                        {
                            break;
                        }
                    }
                }));
            }
            drop(connections);
        });
        CuttingProxy { addr, armed, cut, task }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A compare-and-set is one statement that the server commits on its own: a writer cut off the network
/// right after sending it holds no row lock that would stall the other writers of its shard. (A
/// transaction of several round trips would hold the head row's lock while its client is silent, up to
/// the server's idle timeout; the cluster scenario's link cut stalled the table writer that way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_writer_cut_off_after_its_compare_and_set_stalls_no_other_writer() {
    use std::sync::atomic::Ordering;
    let Some(services) = crate::backends::Services::start() else { return };
    let (_, url) = services.fresh();
    let port = services.postgres.port();
    let server = format!("127.0.0.1:{port}").parse().unwrap();
    let proxy = CuttingProxy::start(server).await;
    let through_proxy = url.replacen(&format!(":{port}/"), &format!(":{}/", proxy.addr.port()), 1);
    assert_ne!(through_proxy, url, "{url}");
    let open =
        async |url: String| url.parse::<storage::consensus::ConsensusConfig>().unwrap().open().await.unwrap();
    // The cut-off writer waits long for its answer; the other writer's calls give up after 5 s.
    let cut = open(format!("{through_proxy}?connections=1&timeout_ms=60000&listen=false")).await;
    let other = open(format!("{url}?timeout_ms=5000&listen=false")).await;

    assert_eq!(cut.compare_and_set("k", None, version(0, b"zero")).await.unwrap(), CasOutcome::Committed);
    proxy.armed.store(true, Ordering::SeqCst);
    let stuck = tokio::spawn(async move { cut.compare_and_set("k", Some(0), version(1, b"cut off")).await });
    tokio::time::timeout(Duration::from_secs(5), async {
        while !proxy.cut.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the proxy cuts the writer off after its compare-and-set");

    // The server commits the statement without its client, at once.
    let committed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match other.head("k").await.unwrap() {
                Some(head) if head.seqno == 1 => return head,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
    .expect("the cut-off compare-and-set commits without its client");
    assert_eq!(committed, version(1, b"cut off"));
    // And the head row is free: another writer moves it on within its own timeout.
    let next = other.compare_and_set("k", Some(1), version(2, b"other")).await;
    assert_eq!(next.unwrap(), CasOutcome::Committed);
    assert!(!stuck.is_finished(), "the cut-off writer never hears its answer");
    stuck.abort();
}

/// With `sslmode=verify-full`, every connection is TLS and the server's certificate is checked. Against a
/// server that refuses connections without TLS (`pg_hba.conf`: `hostssl` only), the whole contract holds,
/// push channel included; a plain connection is refused by that server (so the contract ran over TLS);
/// and a CA that did not sign the server's certificate fails the open as a refusal, not as an
/// unreachable server to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_meets_the_contract_and_plain_or_untrusted_connections_are_refused() {
    use storage::consensus::{ConsensusConfig, ConsensusOpenError};
    use storage::services::{Postgres, PostgresOptions};
    let options = PostgresOptions { tls: true, ..PostgresOptions::default() };
    let Some(server) = crate::backends::require("PostgreSQL with TLS", Postgres::start(options)) else {
        return;
    };
    server.create_database("tls").unwrap();
    let url = server.url("tls");
    let ca = server.ca_file().expect("a TLS server has a CA");
    let open = async |url: String| url.parse::<ConsensusConfig>().unwrap().open().await;
    let verified = |ca: &std::path::Path| format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());

    let (secured, listener) = (open(verified(&ca)).await.unwrap(), open(verified(&ca)).await.unwrap());
    let mut changes = listener.changes().expect("PostgreSQL has a push channel");
    the_consensus_contract_holds(Arc::clone(&secured)).await;
    // The listener's own TLS connection delivers the commits' announcements.
    let announced = tokio::time::timeout(Duration::from_secs(10), async {
        let mut seqno = None;
        loop {
            let next = seqno.map_or(0, |s: u64| s + 1);
            secured.compare_and_set("pushed", seqno, version(next, b"p")).await.unwrap();
            seqno = Some(next);
            // The contract's own keys were announced first.
            while let Ok(Ok(key)) = tokio::time::timeout(Duration::from_millis(200), changes.recv()).await {
                if key == "pushed" {
                    return;
                }
            }
        }
    })
    .await;
    assert!(announced.is_ok(), "no notification of \"pushed\" over TLS within 10 s");

    match open(format!("{url}?sslmode=disable")).await {
        Err(ConsensusOpenError::Backend(reason)) => assert!(reason.contains("no encryption"), "{reason}"),
        other => panic!("a plain connection to a TLS-only server: {other:?}"),
    }
    let elsewhere = tempfile::tempdir().unwrap();
    let other_ca = transport::certs::write_throwaway_pki(elsewhere.path(), &["127.0.0.1"]).unwrap().ca;
    match open(verified(&other_ca)).await {
        Err(ConsensusOpenError::Backend(reason)) => {
            assert!(reason.to_lowercase().contains("certificate"), "{reason}")
        }
        other => panic!("a server whose certificate the CA did not sign: {other:?}"),
    }
}

/// A server that also wants a client certificate naming the database user (`clientcert=verify-full` in
/// `pg_hba.conf`): a client presenting one (`sslcert`, `sslkey`) meets the contract; one presenting none
/// is refused by the server, by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_wanting_client_certificates_admits_only_a_client_that_presents_one() {
    use storage::consensus::{ConsensusConfig, ConsensusOpenError};
    use storage::services::{Postgres, PostgresOptions};
    let options = PostgresOptions { tls: true, client_certificates: true, ..PostgresOptions::default() };
    let Some(server) =
        crate::backends::require("PostgreSQL with client certificates", Postgres::start(options))
    else {
        return;
    };
    server.create_database("certs").unwrap();
    let ca = server.ca_file().expect("a TLS server has a CA");
    let (cert, key) = server.client_certificate().expect("a TLS server has a client certificate");
    let verified = format!("{}?sslmode=verify-full&sslrootcert={}", server.url("certs"), ca.display());
    let open = async |url: String| url.parse::<ConsensusConfig>().unwrap().open().await;

    let presenting = open(format!("{verified}&sslcert={}&sslkey={}", cert.display(), key.display())).await;
    the_consensus_contract_holds(presenting.unwrap()).await;
    match open(verified).await {
        Err(ConsensusOpenError::Backend(reason)) => assert!(reason.contains("certificate"), "{reason}"),
        other => panic!("a client without a certificate: {other:?}"),
    }
}
