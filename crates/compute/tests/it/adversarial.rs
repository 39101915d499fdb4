//! Attacks on a running `compute-replica` process (the binary, with TLS and a shared secret, its storage
//! shards in a temporary directory): garbage, oversize and truncated frames before
//! and after the authentication, wrong and missing proofs, a replayed handshake, controllers of a lower,
//! equal and higher epoch, 500 idle connections, and connections that try to make the replica buffer as
//! much as they can. Each test asserts the refusal it expects, that the legitimate controller is still
//! served (a peek answered on its connection, which is never replaced), that the process's resident
//! memory stays under [`RSS_GROWTH_LIMIT_BYTES`] above what it was before the attack and under
//! [`RSS_LIMIT_BYTES`] (read from `/proc/PID/status`), and that the process neither exited nor logged a
//! panic.
//!
//! What these do not cover: an attacker holding the secret (an authenticated peer is trusted up to the
//! full frame limit; fencing still keeps an older one out), and the timely cluster ports (`cluster.rs`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use frontiers::Antichain;
use protocol::frame::{DEFAULT_MAX_FRAME_BYTES, encode_frame};
use protocol::{
    AUTH_SERVICE, ComputeCommand, ComputeResponse, ControllerEpoch, GlobalId, InstanceConfig, InstanceId,
    MapFilterProject, PROTOCOL_VERSION, Peek, PeekId, PeekResponse, PeekTarget, ReplicaId, RowSetFinishing,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use transport::certs::{PkiFiles, write_throwaway_pki};
use transport::{
    AUTH_VERSION, AcceptorMessage, AuthError, AuthParams, ClientSecurity, Connector, ConnectorMessage,
    FramedRead, FramedWrite, PRE_AUTH_MAX_FRAME_BYTES, Refusal, Role, SECRET_ENV, SecureReadHalf,
    SecureWriteHalf, SharedSecret, TlsClientConfig, Transcript,
};

/// The replica's resident memory may grow at most this much during an attack.
const RSS_GROWTH_LIMIT_BYTES: u64 = 64 << 20;
/// The replica's resident memory never exceeds this.
const RSS_LIMIT_BYTES: u64 = 256 << 20;
/// How long any one expected answer or closed connection may take.
const WAIT: Duration = Duration::from_secs(10);
/// The legitimate controller's epoch.
const EPOCH: u64 = 5;
/// The legitimate controller's session.
const SESSION: u64 = 1;

/// The secret, as it goes into the child's environment.
const SECRET: &str = "the adversarial tests' shared secret, long enough";

/// A `compute-replica` process under attack, and what it needs.
struct Target {
    child: Child,
    address: String,
    stderr: PathBuf,
    files: PkiFiles,
    _dir: tempfile::TempDir,
}

fn secret() -> SharedSecret {
    SharedSecret::new(SECRET.as_bytes().to_vec()).expect("a long enough secret")
}

impl Target {
    /// Starts a replica process with TLS and the secret, on shards in a temporary directory.
    async fn start() -> Target {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let files = write_throwaway_pki(dir.path(), &["127.0.0.1"]).expect("certificates");
        let (blob, consensus) = storage::embedded_urls(dir.path());
        let stderr = dir.path().join("replica.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_compute-replica"))
            .args(["--listen", "127.0.0.1:0", "--workers", "1", "--blob", &blob, "--consensus", &consensus])
            .arg("--tls-cert")
            .arg(&files.server_cert)
            .arg("--tls-key")
            .arg(&files.server_key)
            .env(SECRET_ENV, SECRET)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("log file"))
            .spawn()
            .expect("start compute-replica");
        let stdout = child.stdout.take().expect("stdout");
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .expect("reader")
        .expect("the replica's first line");
        let address =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).to_string();
        Target { child, address, stderr, files, _dir: dir }
    }

    fn client(&self, secret: Option<SharedSecret>) -> ClientSecurity {
        let tls = TlsClientConfig::from_pem_files(&self.files.ca, None).expect("the CA");
        ClientSecurity::tls(tls, secret).expect("client security")
    }

    /// TLS to the replica, without authenticating: the raw halves and the session's binding.
    async fn tls_only(&self) -> (SecureReadHalf, SecureWriteHalf, Vec<u8>) {
        let stream = TcpStream::connect(&self.address).await.expect("connect");
        self.client(Some(secret())).connect_without_authentication(stream, &self.address).await.expect("TLS")
    }

    /// The replica's resident set, from `/proc`.
    fn rss_bytes(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("/proc status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
        let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number");
        kib * 1024
    }

    /// The process still runs, logged no panic, and its memory stayed within the limits of `before`.
    fn assert_unharmed(&mut self, before: u64, what: &str) {
        assert!(self.child.try_wait().expect("wait").is_none(), "{what}: the replica exited");
        let log = std::fs::read_to_string(&self.stderr).expect("the replica's log");
        assert!(!log.contains("panicked"), "{what}: the replica panicked:\n{log}");
        let rss = self.rss_bytes();
        assert!(
            rss <= before + RSS_GROWTH_LIMIT_BYTES && rss <= RSS_LIMIT_BYTES,
            "{what}: resident memory {} MiB, {} MiB before",
            rss >> 20,
            before >> 20
        );
    }

    /// The replica's log.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).expect("the replica's log")
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A controller's connection, authenticated with TLS and the secret.
struct Controller {
    input: FramedRead<SecureReadHalf>,
    output: FramedWrite<SecureWriteHalf>,
    next_peek: u64,
}

impl Controller {
    /// Authenticates and says Hello with `epoch` and `session`; the replica's answer.
    async fn hello(target: &Target, epoch: u64, session: u64) -> (Controller, ComputeResponse) {
        let stream = TcpStream::connect(&target.address).await.expect("connect");
        let (mut input, mut output) = target
            .client(Some(secret()))
            .connect(stream, &target.address, AUTH_SERVICE)
            .await
            .expect("authenticated");
        input.set_max_frame_bytes(DEFAULT_MAX_FRAME_BYTES);
        output.set_max_frame_bytes(DEFAULT_MAX_FRAME_BYTES);
        let hello = ComputeCommand::<u64>::Hello {
            version: PROTOCOL_VERSION,
            nonce: 3,
            epoch: ControllerEpoch(epoch),
            session,
        };
        output.send(&hello).await.expect("hello");
        let mut controller = Controller { input, output, next_peek: 0 };
        let answer = controller.recv().await.expect("an answer to the Hello");
        (controller, answer)
    }

    /// The legitimate controller: admitted, its instance created.
    async fn connect(target: &Target, epoch: u64, session: u64) -> Controller {
        let (mut controller, answer) = Controller::hello(target, epoch, session).await;
        assert_eq!(answer, ComputeResponse::Hello { version: PROTOCOL_VERSION, nonce: 3 });
        let instance = InstanceConfig { instance_id: InstanceId(1), replica_id: ReplicaId(1) };
        controller.send(ComputeCommand::CreateInstance(instance)).await;
        controller.send(ComputeCommand::InitializationComplete).await;
        controller
    }

    async fn send(&mut self, command: ComputeCommand) {
        self.output.send(&command).await.expect("send");
    }

    /// The next response, or `None` once the replica closed the connection (panics after [`WAIT`]).
    async fn recv(&mut self) -> Option<ComputeResponse> {
        tokio::time::timeout(WAIT, self.input.recv::<ComputeResponse>())
            .await
            .expect("an answer in time")
            .ok()
    }

    /// A peek of an unknown index is answered with an error on this connection.
    async fn assert_served(&mut self, what: &str) {
        self.next_peek += 1;
        let uuid = PeekId(self.next_peek);
        self.send(ComputeCommand::Peek(Peek {
            uuid,
            target: PeekTarget::Index { id: GlobalId::User(999) },
            timestamp: 0,
            literal_constraints: None,
            map_filter_project: MapFilterProject::new(2),
            finishing: RowSetFinishing::unordered(),
        }))
        .await;
        loop {
            match self.recv().await {
                Some(ComputeResponse::PeekResponse { uuid: got, response }) if got == uuid => {
                    assert!(matches!(response, PeekResponse::Error(_)), "{what}: {response:?}");
                    return;
                }
                Some(_) => {}
                None => panic!("{what}: the legitimate controller's connection was closed"),
            }
        }
    }
}

/// Reads until the peer closes the connection (or it fails); panics if that takes longer than [`WAIT`].
async fn assert_closed(read: &mut (impl AsyncReadExt + Unpin), what: &str) -> Vec<u8> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let closing = async {
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, closing)
        .await
        .unwrap_or_else(|_| panic!("{what}: the replica kept the connection"));
    received
}

async fn write_frame<M: serde::Serialize>(write: &mut SecureWriteHalf, message: &M) {
    let mut bytes = Vec::new();
    encode_frame(message, PRE_AUTH_MAX_FRAME_BYTES, &mut bytes).expect("encode");
    write.write_all(&bytes).await.expect("write");
    write.flush().await.expect("flush");
}

/// Byte strings no frame reader may accept before the authentication: (what, bytes, whether the sender
/// then closes its side, whether an authenticated reader refuses them too: a frame within the full limit
/// is legal for an authenticated peer).
fn bad_frames() -> Vec<(&'static str, Vec<u8>, bool, bool)> {
    let mut over_pre_auth = ((PRE_AUTH_MAX_FRAME_BYTES + 1) as u32).to_le_bytes().to_vec();
    over_pre_auth.extend(vec![0u8; PRE_AUTH_MAX_FRAME_BYTES + 1]);
    vec![
        ("garbage", (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect(), false, true),
        ("a frame header announcing 256 MiB", vec![0, 0, 0, 16, 1, 2, 3], false, false),
        ("a frame header announcing 4 GiB", vec![0xff, 0xff, 0xff, 0xff], false, true),
        ("a frame just over the pre-authentication limit", over_pre_auth, false, false),
        ("a truncated frame, then end of stream", vec![100, 0, 0, 0, 1, 2, 3, 4, 5], true, true),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversize_and_truncated_frames_before_and_after_authentication_are_refused() {
    let mut target = Target::start().await;
    let mut legitimate = Controller::connect(&target, EPOCH, SESSION).await;
    legitimate.assert_served("at the start").await;
    let before = target.rss_bytes();
    // Not TLS at all.
    let mut raw = TcpStream::connect(&target.address).await.expect("connect");
    raw.write_all(b"GET / HTTP/1.1\r\nHost: replica\r\n\r\n").await.expect("write");
    assert_closed(&mut raw, "plain HTTP to the TLS port").await;
    for (what, bytes, close, refused_after_authentication) in bad_frames() {
        // Before the authentication, inside TLS: the replica answers nothing and closes.
        let (mut read, mut write, _) = target.tls_only().await;
        write.write_all(&bytes).await.expect("write");
        write.flush().await.expect("flush");
        if close {
            write.shutdown().await.expect("shutdown");
        }
        let answered = assert_closed(&mut read, what).await;
        assert!(answered.is_empty(), "{what}: nothing is said to an unauthenticated peer: {answered:?}");
        legitimate.assert_served(what).await;
        target.assert_unharmed(before, what);
        if !refused_after_authentication {
            continue;
        }
        // After the authentication, before the Hello: rejected as undecodable (or simply closed at end
        // of stream), never admitted.
        let stream = TcpStream::connect(&target.address).await.expect("connect");
        let (mut input, output) = target
            .client(Some(secret()))
            .connect(stream, &target.address, AUTH_SERVICE)
            .await
            .expect("authenticated");
        input.set_max_frame_bytes(DEFAULT_MAX_FRAME_BYTES);
        let mut write = output.into_inner();
        write.write_all(&bytes).await.expect("write");
        write.flush().await.expect("flush");
        if close {
            write.shutdown().await.expect("shutdown");
        }
        match tokio::time::timeout(WAIT, input.recv::<ComputeResponse>()).await.expect("in time") {
            Ok(ComputeResponse::CommandRejected { command, .. }) => {
                assert_eq!(command, "<undecodable>", "{what}")
            }
            Ok(other) => panic!("{what}: {other:?}"),
            Err(_) => assert!(close, "{what}: closed without a word"),
        }
        legitimate.assert_served(what).await;
        target.assert_unharmed(before, what);
    }
    // After the Hello, on an admitted connection (the legitimate controller's own, which it loses).
    let mut own = Controller::connect(&target, EPOCH, SESSION).await;
    own.output.push_keepalive();
    own.output.flush().await.expect("flush");
    let mut write = own.output.into_inner();
    write.write_all(&[0xff, 0xff, 0xff, 0xff]).await.expect("write");
    write.flush().await.expect("flush");
    match tokio::time::timeout(WAIT, own.input.recv::<ComputeResponse>()).await.expect("in time") {
        Ok(ComputeResponse::CommandRejected { command, .. }) => assert_eq!(command, "<undecodable>"),
        other => panic!("an oversize frame after the Hello: {other:?}"),
    }
    let mut reconnected = Controller::connect(&target, EPOCH, SESSION).await;
    reconnected.assert_served("after an oversize frame on an admitted connection").await;
    target.assert_unharmed(before, "frames");
    assert!(target.log().contains("connection refused"), "the refusals are logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_and_missing_proofs_and_replayed_handshakes_are_refused_without_revealing_anything() {
    let mut target = Target::start().await;
    let mut legitimate = Controller::connect(&target, EPOCH, SESSION).await;
    let before = target.rss_bytes();
    // A client with another secret: the replica's proof does not verify, and ours is never sent.
    let wrong = SharedSecret::new(b"another secret entirely, also long".to_vec()).expect("secret");
    let stream = TcpStream::connect(&target.address).await.expect("connect");
    let refused = target.client(Some(wrong.clone())).connect(stream, &target.address, AUTH_SERVICE).await;
    assert!(matches!(refused, Err(AuthError::WrongProof)), "{refused:?}");
    legitimate.assert_served("a client with another secret").await;

    // An exchange done by hand, recorded, with a proof of `proof_secret` (`None`: no proof).
    async fn exchange(
        target: &Target,
        hello: Option<ConnectorMessage>,
        proof: impl FnOnce(&Transcript<'_>) -> ConnectorMessage,
    ) -> (ConnectorMessage, ConnectorMessage, AcceptorMessage) {
        let (read, mut write, binding) = target.tls_only().await;
        let mut input = FramedRead::new(read, PRE_AUTH_MAX_FRAME_BYTES);
        let hello = match hello {
            Some(hello) => hello,
            None => {
                let params = AuthParams { secret: None, service: AUTH_SERVICE, binding: &binding };
                Connector::start(params).expect("a challenge").0
            }
        };
        write_frame(&mut write, &hello).await;
        let ConnectorMessage::Hello { challenge: ours, .. } = &hello else { panic!("a hello") };
        let answer: AcceptorMessage = input.recv().await.expect("the replica's challenge");
        let AcceptorMessage::Challenge { version, challenge: theirs, proof: their_proof } = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(version, AUTH_VERSION);
        let transcript =
            Transcript { service: AUTH_SERVICE, connector: ours, acceptor: &theirs, binding: &binding };
        assert!(
            transcript.verify(&secret(), Role::Acceptor, &their_proof.expect("the replica proves")),
            "the replica proves the secret"
        );
        let proof = proof(&transcript);
        write_frame(&mut write, &proof).await;
        let verdict: AcceptorMessage = input.recv().await.expect("a verdict");
        let (mut read, _) = input.into_parts();
        if !matches!(verdict, AcceptorMessage::Accepted) {
            assert!(assert_closed(&mut read, "a refused exchange").await.is_empty());
        }
        (hello, proof, verdict)
    }
    type MakeProof<'a> = Box<dyn Fn(&Transcript<'_>) -> ConnectorMessage + 'a>;
    let cases: [(&str, MakeProof<'_>, Refusal); 3] = [
        (
            "a wrong proof",
            Box::new(|t| ConnectorMessage::Proof(Some(t.prove(&wrong, Role::Connector)))),
            Refusal::WrongProof,
        ),
        ("no proof", Box::new(|_| ConnectorMessage::Proof(None)), Refusal::MissingProof),
        (
            "the replica's own proof sent back",
            Box::new(|t| ConnectorMessage::Proof(Some(t.prove(&secret(), Role::Acceptor)))),
            Refusal::WrongProof,
        ),
    ];
    for (what, proof, refusal) in cases {
        let (_, _, verdict) = exchange(&target, None, |t| proof(t)).await;
        // The refusal says why and nothing else (no instance or replica id, nothing about the process).
        match verdict {
            AcceptorMessage::Refused(got) => assert_eq!(got, refusal, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        legitimate.assert_served(what).await;
    }
    // A recorded, successful exchange replayed on a new connection: a new challenge and a new TLS session,
    // so the recorded proof no longer verifies.
    let (hello, proof, verdict) =
        exchange(&target, None, |t| ConnectorMessage::Proof(Some(t.prove(&secret(), Role::Connector)))).await;
    assert!(matches!(verdict, AcceptorMessage::Accepted), "{verdict:?}");
    let ConnectorMessage::Proof(Some(recorded)) = proof else { panic!("a proof") };
    let (_, _, replayed) = exchange(&target, Some(hello), |_| ConnectorMessage::Proof(Some(recorded))).await;
    assert!(matches!(replayed, AcceptorMessage::Refused(Refusal::WrongProof)), "{replayed:?}");
    legitimate.assert_served("a replayed handshake").await;
    target.assert_unharmed(before, "proofs");
    let log = target.log();
    assert!(log.contains("wrong proof of the shared secret") || log.contains("connection refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_of_a_lower_or_equal_epoch_are_fenced_and_a_higher_one_takes_over() {
    let mut target = Target::start().await;
    let mut legitimate = Controller::connect(&target, EPOCH, SESSION).await;
    legitimate.assert_served("at the start").await;
    let before = target.rss_bytes();
    for (what, epoch, session) in
        [("a lower epoch", EPOCH - 1, 7), ("the same epoch, another session", EPOCH, 8)]
    {
        let (mut intruder, answer) = Controller::hello(&target, epoch, session).await;
        assert_eq!(answer, ComputeResponse::Fenced { current: ControllerEpoch(EPOCH) }, "{what}");
        assert_eq!(intruder.recv().await, None, "{what}: closed after the refusal");
        legitimate.assert_served(what).await;
        target.assert_unharmed(before, what);
    }
    // A higher epoch takes over; the old controller's connection is closed, and it cannot come back.
    let mut newer = Controller::connect(&target, EPOCH + 1, 9).await;
    newer.assert_served("the newer controller").await;
    loop {
        match legitimate.recv().await {
            None => break,
            Some(ComputeResponse::Frontiers { .. } | ComputeResponse::Status(_)) => {}
            Some(other) => panic!("the superseded controller got {other:?}"),
        }
    }
    let (_, answer) = Controller::hello(&target, EPOCH, SESSION).await;
    assert_eq!(answer, ComputeResponse::Fenced { current: ControllerEpoch(EPOCH + 1) });
    newer.assert_served("after the old controller tried to come back").await;
    newer.send(ComputeCommand::AllowCompaction { id: GlobalId::User(998), frontier: Antichain::new() }).await;
    target.assert_unharmed(before, "epochs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_idle_connections_neither_lock_the_controller_out_nor_grow_the_replica() {
    let mut target = Target::start().await;
    let mut legitimate = Controller::connect(&target, EPOCH, SESSION).await;
    let before = target.rss_bytes();
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(TcpStream::connect(&target.address).await.expect("the replica accepts"));
    }
    legitimate.assert_served("500 idle connections").await;
    // The controller reconnecting (a new connection of its own session) gets in at once: the idle ones
    // are only ever as many as the pending limit, the oldest closed to make room.
    let mut reconnected =
        tokio::time::timeout(Duration::from_secs(5), Controller::connect(&target, EPOCH, SESSION))
            .await
            .expect("in time");
    reconnected.assert_served("a reconnection among 500 idle connections").await;
    let mut open = 0;
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        if let Err(_elapsed) = tokio::time::timeout(Duration::from_millis(2), stream.read(&mut byte)).await {
            open += 1;
        }
    }
    assert!(open <= compute::DEFAULT_MAX_PENDING_CONNECTIONS, "{open} idle connections still open");
    assert!(target.log().contains("unauthenticated connection limit reached"), "the limit is logged");
    target.assert_unharmed(before, "500 idle connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_try_to_make_the_replica_buffer_leave_its_memory_bounded() {
    let mut target = Target::start().await;
    let mut legitimate = Controller::connect(&target, EPOCH, SESSION).await;
    let before = target.rss_bytes();
    // 300 TLS connections, each announcing the largest frame allowed before authentication and sending
    // all of it but one byte, then waiting; and 300 more announcing 256 MiB (refused at the header).
    let mut held = Vec::new();
    for n in 0..600 {
        let (read, mut write, _) = target.tls_only().await;
        let bytes = if n % 2 == 0 {
            let mut bytes = (PRE_AUTH_MAX_FRAME_BYTES as u32).to_le_bytes().to_vec();
            bytes.extend(vec![7u8; PRE_AUTH_MAX_FRAME_BYTES - 1]);
            bytes
        } else {
            vec![0, 0, 0, 16]
        };
        let _ = write.write_all(&bytes).await;
        let _ = write.flush().await;
        held.push((read, write));
    }
    legitimate.assert_served("600 buffering connections").await;
    target.assert_unharmed(before, "600 buffering connections");
    drop(held);
    legitimate.assert_served("after they went").await;
    target.assert_unharmed(before, "after they went");
}
