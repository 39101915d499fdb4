//! Integration tests of `telemetry`: [`Series`] removal and the [`MetricsServer`] over real loopback
//! sockets (its answers, its connection limit, its deadlines and its header limit).

// The deadline tests measure real time: nothing here is simulated.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};
use telemetry::{MetricsServer, MetricsServerConfig, Scraped, Series, encode_text, scrape};

const TIMEOUT: Duration = Duration::from_secs(5);

fn registry_with_a_counter() -> Registry {
    let registry = Registry::new();
    let counter = IntCounter::new("test_requests_total", "Requests.").expect("valid");
    registry.register(Box::new(counter.clone())).expect("registered");
    counter.inc_by(7);
    registry
}

async fn get(addr: SocketAddr, path: &'static str) -> std::io::Result<Scraped> {
    tokio::task::spawn_blocking(move || scrape(addr, path, TIMEOUT)).await.expect("scrape task")
}

/// Reads until the peer closes (`Ok(bytes)`), or fails on the timeout.
fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> std::io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(timeout))?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[test]
fn a_dropped_series_is_gone_from_the_exposition_and_its_siblings_stay() {
    let registry = Registry::new();
    let family = IntCounterVec::new(Opts::new("test_events_total", "Events."), &["owner", "kind"]).unwrap();
    let latency =
        HistogramVec::new(HistogramOpts::new("test_latency_seconds", "Latency."), &["owner"]).unwrap();
    registry.register(Box::new(family.clone())).unwrap();
    registry.register(Box::new(latency.clone())).unwrap();
    let a = Series::new(&family, &["a", "x"]);
    let b = Series::new(&family, &["b", "x"]);
    let a_latency = Series::new(&latency, &["a"]);
    a.inc();
    b.inc_by(2);
    a_latency.observe(0.5);
    assert_eq!(a.labels(), ["a", "x"]);
    let text = encode_text(&registry);
    assert!(text.contains("test_events_total{kind=\"x\",owner=\"a\"} 1"), "{text}");
    assert!(text.contains("test_latency_seconds_count{owner=\"a\"} 1"), "{text}");
    drop((a, a_latency));
    let text = encode_text(&registry);
    assert!(!text.contains("owner=\"a\""), "{text}");
    assert!(text.contains("test_events_total{kind=\"x\",owner=\"b\"} 2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_get_metrics_with_the_text_exposition() {
    let server =
        MetricsServer::bind("127.0.0.1:0".parse().unwrap(), registry_with_a_counter()).await.unwrap();
    assert_eq!(server.url(), format!("http://{}/metrics", server.local_addr()));
    let scraped = get(server.local_addr(), "/metrics").await.unwrap();
    assert_eq!(scraped.status, 200);
    assert_eq!(scraped.content_type.as_deref(), Some("text/plain; version=0.0.4; charset=utf-8"));
    assert!(
        scraped.body.contains("# TYPE test_requests_total counter\ntest_requests_total 7\n"),
        "{scraped:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_are_not_found_and_other_methods_are_not_allowed() {
    let server =
        MetricsServer::bind("127.0.0.1:0".parse().unwrap(), registry_with_a_counter()).await.unwrap();
    let scraped = get(server.local_addr(), "/").await.unwrap();
    assert_eq!(scraped.status, 404);
    let addr = server.local_addr();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .unwrap();
        read_until_closed(&mut stream, TIMEOUT).unwrap()
    })
    .await
    .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("allow: get, head"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_beyond_the_limit_is_closed_unanswered_until_one_goes() {
    let config = MetricsServerConfig { max_connections: 2, ..MetricsServerConfig::default() };
    let server = MetricsServer::bind_with("127.0.0.1:0".parse().unwrap(), registry_with_a_counter(), config)
        .await
        .unwrap();
    let addr = server.local_addr();
    let answer = tokio::task::spawn_blocking(move || {
        // Two idle connections take both places.
        let first = TcpStream::connect(addr).unwrap();
        let _second = TcpStream::connect(addr).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let mut third = TcpStream::connect(addr).unwrap();
        let _ = third.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let refused = read_until_closed(&mut third, TIMEOUT);
        // Once a place is free again, the next client is answered.
        drop(first);
        std::thread::sleep(Duration::from_millis(200));
        (refused, scrape(addr, "/metrics", TIMEOUT))
    })
    .await
    .unwrap();
    match answer.0 {
        Ok(bytes) => assert!(bytes.is_empty(), "the connection over the limit was answered: {bytes:?}"),
        // A reset is a close too.
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert_eq!(answer.1.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_no_request_is_disconnected_after_the_header_timeout() {
    let config = MetricsServerConfig { header_read_timeout_ms: 200, ..MetricsServerConfig::default() };
    let server = MetricsServer::bind_with("127.0.0.1:0".parse().unwrap(), registry_with_a_counter(), config)
        .await
        .unwrap();
    let addr = server.local_addr();
    let closed = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        read_until_closed(&mut stream, TIMEOUT)
    })
    .await
    .unwrap();
    // Closed (possibly with a 408) well before the test's own timeout.
    let bytes = closed.expect("closed by the server within the test's timeout");
    let text = String::from_utf8_lossy(&bytes);
    assert!(bytes.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_is_closed_at_the_end_of_its_lifetime() {
    let config = MetricsServerConfig { connection_lifetime_ms: 300, ..MetricsServerConfig::default() };
    let server = MetricsServer::bind_with("127.0.0.1:0".parse().unwrap(), registry_with_a_counter(), config)
        .await
        .unwrap();
    let addr = server.local_addr();
    let (answer, closed) = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let started = std::time::Instant::now();
        let rest = read_until_closed(&mut stream, TIMEOUT);
        (rest, started.elapsed())
    })
    .await
    .unwrap();
    let answer = String::from_utf8(answer.expect("closed by the server")).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Long before the header timeout (5 s) could have closed it.
    assert!(closed < Duration::from_secs(2), "closed after {closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_over_the_limit_are_refused() {
    let server =
        MetricsServer::bind("127.0.0.1:0".parse().unwrap(), registry_with_a_counter()).await.unwrap();
    let addr = server.local_addr();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let padding = "a".repeat(64 * 1024);
        let _ = stream
            .write_all(format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {padding}\r\n\r\n").as_bytes());
        read_until_closed(&mut stream, TIMEOUT)
    })
    .await
    .unwrap();
    if let Ok(bytes) = answer {
        let text = String::from_utf8_lossy(&bytes);
        assert!(bytes.is_empty() || text.starts_with("HTTP/1.1 431"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_server_stops_listening() {
    let server =
        MetricsServer::bind("127.0.0.1:0".parse().unwrap(), registry_with_a_counter()).await.unwrap();
    let addr = server.local_addr();
    drop(server);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(get(addr, "/metrics").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_limit_is_refused() {
    let config = MetricsServerConfig { max_connections: 0, ..MetricsServerConfig::default() };
    let error =
        MetricsServer::bind_with("127.0.0.1:0".parse().unwrap(), Registry::new(), config).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
}
