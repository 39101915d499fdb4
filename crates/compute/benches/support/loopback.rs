//! Loopback TCP round trips, the baseline of the benchmarks that measure peeks over a socket
//! (`compute` and `controller`): each includes this file with `#[path]`.
//!
//! **What it measures:** `request` bytes out and `response` bytes back over a loopback connection with
//! `TCP_NODELAY`, answered by a thread that does nothing else: the cost of the network path alone.

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

/// Round trips of `request` bytes out and `response` bytes back over loopback TCP, sorted.
pub fn echo_latencies(request: usize, response: usize, warmup: usize, measured: usize) -> Vec<Duration> {
    let (addr, server) = echo_server(request, response);
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let outbound = vec![1u8; request];
    let mut inbound = vec![0u8; response];
    let mut latencies = Vec::with_capacity(measured);
    for i in 0..warmup + measured {
        let start = Instant::now();
        stream.write_all(&outbound).expect("write");
        stream.read_exact(&mut inbound).expect("read");
        if i >= warmup {
            latencies.push(start.elapsed());
        }
    }
    drop(stream);
    let _ = server.join();
    latencies.sort();
    latencies
}
