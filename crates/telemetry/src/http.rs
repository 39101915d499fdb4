//! [`MetricsServer`]: a registry served as `GET /metrics` over HTTP/1, and [`scrape`], its blocking client.
//!
//! **Limits.** At most [`MetricsServerConfig::max_connections`] connections at once (one more is closed at
//! once, unanswered, and counted in the log at DEBUG); a client must send its request headers within
//! `header_read_timeout_ms` and at most 16 KiB of them; a connection, keep-alive included, lasts at most
//! `connection_lifetime_ms`. Nothing a client sends grows without bound.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

use crate::encode_text;

/// The content type of the text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The most request header bytes a connection buffers (hyper's minimum is 8 KiB).
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The limits of a [`MetricsServer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsServerConfig {
    /// Connections served at once; one more is closed unanswered. Default 16.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, in milliseconds. Default 5 s.
    pub header_read_timeout_ms: u64,
    /// How long a connection may stay open, keep-alive included, in milliseconds. Default 30 s.
    pub connection_lifetime_ms: u64,
}

impl Default for MetricsServerConfig {
    fn default() -> Self {
        MetricsServerConfig {
            max_connections: 16,
            header_read_timeout_ms: 5_000,
            connection_lifetime_ms: 30_000,
        }
    }
}

/// A registry served at `http://ADDR/metrics` by a task on the tokio runtime that bound it. Dropping the
/// server stops the task and closes every connection.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Serves `registry` on `addr` (port 0 picks a free port: see [`local_addr`](Self::local_addr)) with
    /// the default limits. Must be called on a tokio runtime, which runs the server from then on.
    pub async fn bind(addr: SocketAddr, registry: Registry) -> std::io::Result<MetricsServer> {
        Self::bind_with(addr, registry, MetricsServerConfig::default()).await
    }

    /// [`bind`](Self::bind) with explicit limits. A `max_connections` of 0 is refused.
    pub async fn bind_with(
        addr: SocketAddr,
        registry: Registry,
        config: MetricsServerConfig,
    ) -> std::io::Result<MetricsServer> {
        if config.max_connections == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a metrics server needs room for at least one connection",
            ));
        }
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let task = tokio::spawn(accept(listener, registry, config));
        Ok(MetricsServer { local_addr, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where to scrape it: `http://ADDR/metrics`.
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.local_addr)
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        // The connections are tasks of the accept task's set, aborted with it.
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, registry: Registry, config: MetricsServerConfig) {
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                        let max = config.max_connections;
                        debug!(%peer, max, "metrics connection refused: too many open");
                        drop(stream);
                        continue;
                    };
                    let registry = registry.clone();
                    connections.spawn(async move {
                        serve(stream, registry, config).await;
                        drop(permit);
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    warn!(%error, "metrics listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn serve(stream: tokio::net::TcpStream, registry: Registry, config: MetricsServerConfig) {
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.header_read_timeout_ms))
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(
            TokioIo::new(stream),
            service_fn(move |request| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(answer(&request, &registry)) }
            }),
        );
    match tokio::time::timeout(Duration::from_millis(config.connection_lifetime_ms), connection).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => debug!(%error, "metrics connection failed"),
        Err(_) => debug!("metrics connection closed at the end of its lifetime"),
    }
}

fn answer(request: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    if request.uri().path() != "/metrics" {
        *response.status_mut() = StatusCode::NOT_FOUND;
        *response.body_mut() = Full::new(Bytes::from_static(b"not found: metrics are at /metrics\n"));
        return response;
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
    *response.body_mut() = Full::new(Bytes::from(encode_text(registry)));
    response
}

/// What [`scrape`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scraped {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: String,
}

/// The most body bytes [`scrape`] reads.
const MAX_SCRAPE_BYTES: usize = 64 << 20;

/// `GET http://addr{path}` with `Connection: close`, blocking, each read and write bounded by `timeout`:
/// what a test or a tool needs to read an endpoint. Reads bodies with a `Content-Length` or up to the close
/// of the connection, at most 64 MiB; a chunked body is an error (the [`MetricsServer`] never sends one).
pub fn scrape(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<Scraped> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    (&mut stream).take(MAX_SCRAPE_BYTES as u64 + 1).read_to_end(&mut raw)?;
    if raw.len() > MAX_SCRAPE_BYTES {
        return Err(invalid("response larger than 64 MiB"));
    }
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| invalid("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| invalid("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("no status line"))?;
    let (mut content_type, mut content_length) = (None, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => content_type = Some(value.to_owned()),
            "content-length" => content_length = value.parse::<usize>().ok(),
            "transfer-encoding" if value.eq_ignore_ascii_case("chunked") => {
                return Err(invalid("chunked bodies are not read"));
            }
            _ => {}
        }
    }
    let mut body = raw.split_off(end + 4);
    if let Some(length) = content_length {
        if body.len() < length {
            return Err(invalid("body shorter than its Content-Length"));
        }
        body.truncate(length);
    }
    let body = String::from_utf8(body).map_err(|_| invalid("body is not UTF-8"))?;
    Ok(Scraped { status, content_type, body })
}
