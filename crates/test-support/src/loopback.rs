//! Loopback TCP round trips, the baseline of the benchmarks that measure peeks over a socket
//! (`compute` and `controller`).
//!
//! **What it measures:** `request` bytes out and `response` bytes back over a loopback connection with
//! `TCP_NODELAY`, answered by a thread that does nothing else: the cost of the network path alone.

// A benchmark baseline measures wall-clock latency: the clock is read for that alone.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A loopback TCP server answering every `request`-byte message with a `response`-byte one.
pub fn echo_server(request: usize, response: usize) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let mut inbound = vec![0u8; request];
        let outbound = vec![7u8; response];
        while stream.read_exact(&mut inbound).is_ok() {
            if stream.write_all(&outbound).is_err() {
                break;
            }
        }
    });
    (addr, server)
}

/// A client of an [`echo_server`], to measure round trips in blocks (interleaved with what they are the
/// baseline of, so both see the same load on the host).
#[derive(Debug)]
pub struct Echo {
    stream: Option<TcpStream>,
    server: Option<std::thread::JoinHandle<()>>,
    outbound: Vec<u8>,
    inbound: Vec<u8>,
}

impl Echo {
    /// Starts a server and connects to it.
    pub fn start(request: usize, response: usize) -> Echo {
        let (addr, server) = echo_server(request, response);
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Echo {
            stream: Some(stream),
            server: Some(server),
            outbound: vec![1u8; request],
            inbound: vec![0u8; response],
        }
    }

    /// `count` round trips, each timed, in order.
    pub fn round_trips(&mut self, count: usize) -> Vec<Duration> {
        let stream = self.stream.as_mut().expect("connected until dropped");
        (0..count)
            .map(|_| {
                let start = Instant::now();
                stream.write_all(&self.outbound).expect("write");
                stream.read_exact(&mut self.inbound).expect("read");
                start.elapsed()
            })
            .collect()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        drop(self.stream.take());
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// Round trips of `request` bytes out and `response` bytes back over loopback TCP, sorted.
pub fn echo_latencies(request: usize, response: usize, warmup: usize, measured: usize) -> Vec<Duration> {
    let mut echo = Echo::start(request, response);
    echo.round_trips(warmup);
    let mut latencies = echo.round_trips(measured);
    latencies.sort();
    latencies
}
