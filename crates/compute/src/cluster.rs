//! The connections between the processes of a multi-process replica, made here and handed to timely.
//!
//! **Why not timely's own.** Timely's `create_sockets` binds its port only once `execute` runs (on a thread
//! nobody watched: a port taken meanwhile left a process serving with no workers), trusts the first eight
//! bytes on its port as a peer's index (anything else that connects, or a connection to the wrong
//! listener, makes it panic or hand timely a socket that closes: "reading data: socket closed", then
//! "MergeQueue poisoned"), retries with one-second sleeps, prints to stdout, and waits forever for a peer
//! that never comes. Here:
//!
//! - [`ClusterListener::bind`] binds this process's address when the replica starts, so a port that is
//!   taken is a start error (`compute-replica` exits non-zero), not a silent half-start;
//! - [`ClusterListener::connect`] connects to every lower-indexed process and accepts every
//!   higher-indexed one (timely's convention), each with a fixed-size handshake ([`Handshake`]) that names
//!   the cluster (a hash of the address list, so a process of another replica is refused), the two
//!   processes and the direction. A connection that does not complete a valid handshake in time is closed
//!   and logged, and the wait goes on; a connection that reaches a listener which is not a peer (or loops
//!   back to itself, which loopback TCP allows when a port is free) is retried. The whole start-up has a
//!   deadline; missing peers then are an error naming them;
//! - [`Cut`] closes the sockets when the process fails, so that every peer's timely threads fail too
//!   (their reads end without timely's clean-shutdown message) instead of waiting forever for a process
//!   that has stopped answering.
//!
//! **What this is not.** Authentication: the handshake identifies, it does not prove (the shared-secret
//! proof of issue 19 belongs in [`Handshake`]). Nothing after the handshake: the sockets are timely's.
//!
//! **Invariants.** Every returned socket completed a handshake for this cluster and this pair of processes;
//! the slot of this process is `None`; each peer is connected exactly once.
//!
//! **Tests.** `tests/it/cluster.rs` (strangers on the port, a port taken, a peer that never comes, a
//! start-up stress loop, and a process failure reaching its peer); the handshake's encoding in
//! `mod tests` below.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

/// How long one handshake (after the TCP connection) may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// The pause between connection attempts to a peer that is not there yet.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The first bytes of every handshake.
const MAGIC: [u8; 8] = *b"ccr-tmly";
/// The version of the handshake's layout.
const HANDSHAKE_VERSION: u32 = 1;

/// What a handshake message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// From the connecting (higher-indexed) process.
    Hello = 1,
    /// The accepting process's answer.
    Ack = 2,
}

/// One handshake message: 40 bytes, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handshake {
    kind: Kind,
    /// [`cluster_id`] of the sender's address list.
    cluster: u64,
    /// The sender's process index.
    from: u64,
    /// The receiver's process index.
    to: u64,
}

const HANDSHAKE_BYTES: usize = 40;

impl Handshake {
    fn encode(&self) -> [u8; HANDSHAKE_BYTES] {
        let mut out = [0u8; HANDSHAKE_BYTES];
        out[..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&HANDSHAKE_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(self.kind as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.cluster.to_le_bytes());
        out[24..32].copy_from_slice(&self.from.to_le_bytes());
        out[32..40].copy_from_slice(&self.to.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; HANDSHAKE_BYTES]) -> Result<Handshake, String> {
        let word =
            |range: std::ops::Range<usize>| u64::from_le_bytes(bytes[range].try_into().expect("eight bytes"));
        let half =
            |range: std::ops::Range<usize>| u32::from_le_bytes(bytes[range].try_into().expect("four bytes"));
        if bytes[..8] != MAGIC {
            return Err("not a timely cluster handshake".to_string());
        }
        let version = half(8..12);
        if version != HANDSHAKE_VERSION {
            return Err(format!("handshake version {version}, expected {HANDSHAKE_VERSION}"));
        }
        let kind = match half(12..16) {
            1 => Kind::Hello,
            2 => Kind::Ack,
            other => return Err(format!("unknown handshake kind {other}")),
        };
        Ok(Handshake { kind, cluster: word(16..24), from: word(24..32), to: word(32..40) })
    }
}

/// The identity of a cluster: an FNV-1a hash of its address list (every process of a replica is given
/// the same list, and no two replicas share an address).
fn cluster_id(addresses: &[String]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for address in addresses {
        for byte in address.bytes().chain([b'\n']) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// Closes a process's cluster sockets when it fails, so that its peers fail too. See the module
/// documentation. Shared by the thread that connects the sockets and the one that learns of a failure,
/// in either order.
#[derive(Debug, Default)]
pub(crate) struct Cut {
    cut: AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
}

impl Cut {
    /// Registers clones of the cluster's sockets (closed at once if the process already failed).
    fn register(&self, sockets: &[Option<TcpStream>]) -> io::Result<()> {
        let mut registered = self.sockets.lock().expect("cut lock");
        for socket in sockets.iter().flatten() {
            registered.push(socket.try_clone()?);
        }
        drop(registered);
        if self.cut.load(Ordering::SeqCst) {
            self.cut();
        }
        Ok(())
    }

    /// Closes every registered socket (now and on registration from now on).
    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for socket in self.sockets.lock().expect("cut lock").drain(..) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// This process's cluster port, bound when the replica starts.
#[derive(Debug)]
pub(crate) struct ClusterListener {
    listener: TcpListener,
    addresses: Vec<String>,
    process: usize,
    cluster: u64,
}

impl ClusterListener {
    /// Binds this process's address among `addresses`.
    pub(crate) fn bind(addresses: Vec<String>, process: usize) -> io::Result<ClusterListener> {
        let listener = TcpListener::bind(addresses[process].as_str())?;
        listener.set_nonblocking(true)?;
        let cluster = cluster_id(&addresses);
        Ok(ClusterListener { listener, addresses, process, cluster })
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Connects to every other process within `timeout`: one socket per process in process order, `None`
    /// at this process's own slot. The sockets are registered with `cut`.
    pub(crate) fn connect(self, timeout: Duration, cut: &Cut) -> Result<Vec<Option<TcpStream>>, String> {
        // A deadline needs the clock: this is the replica's shell, not simulated code.
        #[allow(clippy::disallowed_methods)]
        let deadline = Instant::now() + timeout;
        let (lower, higher) = std::thread::scope(|scope| {
            let connecting = scope.spawn(|| self.connect_lower(deadline));
            let higher = self.accept_higher(deadline);
            (connecting.join().expect("the connecting thread does not panic"), higher)
        });
        let mut sockets: Vec<Option<TcpStream>> = lower?.into_iter().map(Some).collect();
        sockets.push(None);
        sockets.extend(higher?.into_iter().map(Some));
        assert_eq!(sockets.len(), self.addresses.len(), "one slot per process");
        for socket in sockets.iter().flatten() {
            socket.set_read_timeout(None).map_err(|e| e.to_string())?;
            socket.set_write_timeout(None).map_err(|e| e.to_string())?;
        }
        cut.register(&sockets).map_err(|e| format!("cannot keep the cluster's sockets: {e}"))?;
        Ok(sockets)
    }

    /// Connects to processes `0..self.process`, in order.
    fn connect_lower(&self, deadline: Instant) -> Result<Vec<TcpStream>, String> {
        let mut sockets = Vec::with_capacity(self.process);
        for peer in 0..self.process {
            let socket = loop {
                match self.try_connect(peer) {
                    Ok(socket) => break socket,
                    Err(e) => {
                        debug!(process = self.process, peer, error = %e, "cluster connection attempt failed");
                        #[allow(clippy::disallowed_methods)]
                        if Instant::now() >= deadline {
                            return Err(format!(
                                "process {} could not connect to process {peer} at {}: {e}",
                                self.process, self.addresses[peer]
                            ));
                        }
                    }
                }
                std::thread::sleep(RETRY_PAUSE);
            };
            sockets.push(socket);
        }
        Ok(sockets)
    }

    /// One attempt to connect to `peer` and complete the handshake.
    fn try_connect(&self, peer: usize) -> Result<TcpStream, String> {
        let address = self.addresses[peer]
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.addresses[peer]))?;
        let mut socket =
            TcpStream::connect_timeout(&address, HANDSHAKE_TIMEOUT).map_err(|e| e.to_string())?;
        socket.set_nodelay(true).map_err(|e| e.to_string())?;
        socket.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
        socket.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
        let hello = Handshake {
            kind: Kind::Hello,
            cluster: self.cluster,
            from: self.process as u64,
            to: peer as u64,
        };
        socket.write_all(&hello.encode()).map_err(|e| e.to_string())?;
        let answer = read_handshake(&mut socket)?;
        let expected =
            Handshake { kind: Kind::Ack, cluster: self.cluster, from: peer as u64, to: self.process as u64 };
        if answer != expected {
            // Our own hello back means the connection looped to itself.
            return Err(format!("unexpected answer {answer:?}"));
        }
        Ok(socket)
    }

    /// Accepts processes `self.process + 1..`, in any order.
    fn accept_higher(&self, deadline: Instant) -> Result<Vec<TcpStream>, String> {
        let processes = self.addresses.len();
        let mut slots: Vec<Option<TcpStream>> = (self.process + 1..processes).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match self.listener.accept() {
                Ok((socket, peer_address)) => match self.admit(socket, &slots) {
                    Ok((from, socket)) => slots[from - self.process - 1] = Some(socket),
                    Err(reason) => {
                        warn!(process = self.process, %peer_address, %reason, "refused a connection on the cluster port");
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    #[allow(clippy::disallowed_methods)]
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| i + self.process + 1)
                            .collect();
                        return Err(format!(
                            "process {} waited in vain for processes {missing:?} to connect",
                            self.process
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("accepting on the cluster port failed: {e}")),
            }
        }
        Ok(slots.into_iter().map(|s| s.expect("every slot filled")).collect())
    }

    /// Checks an accepted connection's handshake and answers it: the peer's index and the socket.
    fn admit(
        &self,
        mut socket: TcpStream,
        slots: &[Option<TcpStream>],
    ) -> Result<(usize, TcpStream), String> {
        socket.set_nonblocking(false).map_err(|e| e.to_string())?;
        socket.set_nodelay(true).map_err(|e| e.to_string())?;
        socket.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
        socket.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
        let hello = read_handshake(&mut socket)?;
        if hello.kind != Kind::Hello || hello.cluster != self.cluster || hello.to != self.process as u64 {
            return Err(format!("a handshake for another cluster or process: {hello:?}"));
        }
        let from = usize::try_from(hello.from).map_err(|_| format!("process index {}", hello.from))?;
        if from <= self.process || from >= self.addresses.len() {
            return Err(format!("process {from} does not connect to process {}", self.process));
        }
        if slots[from - self.process - 1].is_some() {
            return Err(format!("process {from} is already connected"));
        }
        let ack =
            Handshake { kind: Kind::Ack, cluster: self.cluster, from: self.process as u64, to: hello.from };
        socket.write_all(&ack.encode()).map_err(|e| e.to_string())?;
        Ok((from, socket))
    }
}

fn read_handshake(socket: &mut TcpStream) -> Result<Handshake, String> {
    let mut bytes = [0u8; HANDSHAKE_BYTES];
    socket.read_exact(&mut bytes).map_err(|e| format!("reading the handshake: {e}"))?;
    Handshake::decode(&bytes)
}

/// The cluster's shared failure switch and the listener, as the replica's start hands them to the timely
/// thread.
#[derive(Debug)]
pub(crate) struct Cluster {
    /// This process's bound cluster port.
    pub listener: ClusterListener,
    /// Closes the sockets when the process fails.
    pub cut: Arc<Cut>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handshake_round_trips_and_garbage_is_refused() {
        let hello = Handshake { kind: Kind::Hello, cluster: 42, from: 1, to: 0 };
        assert_eq!(Handshake::decode(&hello.encode()), Ok(hello));
        let mut garbage = hello.encode();
        garbage[0] = b'x';
        assert!(Handshake::decode(&garbage).is_err());
        let mut other_version = hello.encode();
        other_version[8] = 9;
        assert!(Handshake::decode(&other_version).is_err());
        let mut other_kind = hello.encode();
        other_kind[12] = 7;
        assert!(Handshake::decode(&other_kind).is_err());
    }

    #[test]
    fn clusters_with_different_address_lists_have_different_ids() {
        let a = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let b = vec!["127.0.0.1:1".to_string(), "127.0.0.1:3".to_string()];
        let c = vec!["127.0.0.1:12".to_string(), "7.0.0.1:3".to_string()];
        assert_ne!(cluster_id(&a), cluster_id(&b));
        assert_ne!(cluster_id(&b), cluster_id(&c));
        assert_eq!(cluster_id(&a), cluster_id(&a.clone()));
    }
}
