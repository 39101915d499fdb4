//! TLS and authentication over real sockets: certificates from a throwaway CA made here, the shared
//! secret's proofs inside TLS, client certificates instead of a secret, and every way a peer that should
//! not get in is kept out (a wrong secret, a certificate from another CA or for another name, no client
//! certificate, TLS against plain TCP).

use tokio::net::{TcpListener, TcpStream};
use transport::certs::{ThrowawayCa, write_file};
use transport::{
    AuthError, ClientSecurity, Refusal, SecurityError, ServerSecurity, SharedSecret, TlsClientConfig,
    TlsServerConfig,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn secret(byte: u8) -> SharedSecret {
    SharedSecret::new(vec![byte; 32]).unwrap()
}

/// A CA's files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: ThrowawayCa,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = ThrowawayCa::new("test CA").unwrap();
        write_file(&dir.path().join("ca.pem"), ca.cert_pem(), false).unwrap();
        Pki { dir, ca }
    }

    fn server(&self, names: &[&str], client_ca: Option<&Pki>) -> TlsServerConfig {
        let issued = self.ca.server(names).unwrap();
        let (cert, key) = (self.dir.path().join("server.pem"), self.dir.path().join("server.key"));
        write_file(&cert, &issued.cert_pem, false).unwrap();
        write_file(&key, &issued.key_pem, true).unwrap();
        let client_ca = client_ca.map(|pki| pki.dir.path().join("ca.pem"));
        TlsServerConfig::from_pem_files(&cert, &key, client_ca.as_deref()).unwrap()
    }

    /// A client trusting `trusted`'s CA, with a certificate of this CA if `certificate`.
    fn client(&self, trusted: &Pki, certificate: bool) -> TlsClientConfig {
        let ca = trusted.dir.path().join("ca.pem");
        if !certificate {
            return TlsClientConfig::from_pem_files(&ca, None).unwrap();
        }
        let issued = self.ca.client("controller").unwrap();
        let (cert, key) = (self.dir.path().join("client.pem"), self.dir.path().join("client.key"));
        write_file(&cert, &issued.cert_pem, false).unwrap();
        write_file(&key, &issued.key_pem, true).unwrap();
        TlsClientConfig::from_pem_files(&ca, Some((&cert, &key))).unwrap()
    }
}

/// Connects `client` to a server secured with `server`, exchanges one message if both ends authenticate,
/// and returns both ends' outcomes.
async fn handshake(
    server: ServerSecurity,
    client: ClientSecurity,
    address_name: &str,
) -> (Result<(), AuthError>, Result<(), AuthError>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepting = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut input, mut output) = server.accept(stream, "compute").await?;
        input.set_max_frame_bytes(1 << 20);
        output.set_max_frame_bytes(1 << 20);
        let message: String = input.recv().await?;
        output.send(&format!("echo {message}")).await?;
        Ok::<(), AuthError>(())
    });
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connected = async {
        let (mut input, mut output) =
            client.connect(stream, &format!("{address_name}:{port}"), "compute").await?;
        input.set_max_frame_bytes(1 << 20);
        output.set_max_frame_bytes(1 << 20);
        output.send(&"x".repeat(100_000)).await?;
        let echo: String = input.recv().await?;
        assert_eq!(echo.len(), 100_005);
        Ok::<(), AuthError>(())
    }
    .await;
    (accepting.await.unwrap(), connected)
}

#[test]
fn tls_with_a_shared_secret_authenticates_both_ends_and_carries_large_messages() {
    runtime().block_on(async {
        let pki = Pki::new();
        let server =
            ServerSecurity::tls(pki.server(&["127.0.0.1", "localhost"], None), Some(secret(1))).unwrap();
        let client = ClientSecurity::tls(pki.client(&pki, false), Some(secret(1))).unwrap();
        let (accepted, connected) = handshake(server.clone(), client.clone(), "127.0.0.1").await;
        assert!(accepted.is_ok() && connected.is_ok(), "{accepted:?} {connected:?}");
        // The name checked is the host connected to: localhost is in the certificate too.
        let (accepted, connected) = handshake(server, client, "localhost").await;
        assert!(accepted.is_ok() && connected.is_ok(), "{accepted:?} {connected:?}");
    });
}

#[test]
fn a_wrong_secret_inside_tls_is_refused_on_both_ends() {
    runtime().block_on(async {
        let pki = Pki::new();
        let server = ServerSecurity::tls(pki.server(&["127.0.0.1"], None), Some(secret(1))).unwrap();
        let client = ClientSecurity::tls(pki.client(&pki, false), Some(secret(2))).unwrap();
        let (accepted, connected) = handshake(server, client, "127.0.0.1").await;
        assert!(matches!(connected, Err(AuthError::WrongProof)), "{connected:?}");
        assert!(accepted.is_err());
    });
}

#[test]
fn a_server_certificate_from_another_ca_or_for_another_name_is_refused_by_the_client() {
    runtime().block_on(async {
        let (pki, other) = (Pki::new(), Pki::new());
        let server = ServerSecurity::tls(pki.server(&["127.0.0.1"], None), Some(secret(1))).unwrap();
        let trusting_other = ClientSecurity::tls(pki.client(&other, false), Some(secret(1))).unwrap();
        let (accepted, connected) = handshake(server.clone(), trusting_other, "127.0.0.1").await;
        assert!(matches!(connected, Err(AuthError::Tls(_))), "{connected:?}");
        assert!(matches!(accepted, Err(AuthError::Tls(_))), "{accepted:?}");
        // The right CA, but the certificate is for 127.0.0.1, not localhost.
        let client = ClientSecurity::tls(pki.client(&pki, false), Some(secret(1))).unwrap();
        let (_, connected) = handshake(server.clone(), client.clone(), "localhost").await;
        assert!(matches!(connected, Err(AuthError::Tls(_))), "{connected:?}");
        // Unless the client is told which name to check.
        let named = ClientSecurity::tls(
            pki.client(&pki, false).with_server_name("127.0.0.1").unwrap(),
            Some(secret(1)),
        )
        .unwrap();
        let (accepted, connected) = handshake(server, named, "localhost").await;
        assert!(accepted.is_ok() && connected.is_ok(), "{accepted:?} {connected:?}");
    });
}

#[test]
fn client_certificates_authenticate_without_a_secret_and_their_absence_or_another_ca_is_refused() {
    runtime().block_on(async {
        let (pki, clients, strangers) = (Pki::new(), Pki::new(), Pki::new());
        let server = ServerSecurity::tls(pki.server(&["127.0.0.1"], Some(&clients)), None).unwrap();
        assert!(server.requires_client_certificates());
        let with_certificate = ClientSecurity::tls(clients.client(&pki, true), None).unwrap();
        let (accepted, connected) = handshake(server.clone(), with_certificate, "127.0.0.1").await;
        assert!(accepted.is_ok() && connected.is_ok(), "{accepted:?} {connected:?}");
        // A certificate from a CA the server does not trust: TLS ends it (in TLS 1.3 the client may
        // only learn it when it first reads).
        let stranger = ClientSecurity::tls(strangers.client(&pki, true), None).unwrap();
        let (accepted, connected) = handshake(server.clone(), stranger, "127.0.0.1").await;
        assert!(matches!(accepted, Err(AuthError::Tls(_))), "{accepted:?}");
        assert!(connected.is_err());
        // No certificate, only a secret the server does not use: TLS ends it too.
        let anonymous = ClientSecurity::tls(pki.client(&pki, false), Some(secret(1))).unwrap();
        let (accepted, connected) = handshake(server, anonymous, "127.0.0.1").await;
        assert!(matches!(accepted, Err(AuthError::Tls(_))), "{accepted:?}");
        assert!(connected.is_err());
    });
}

#[test]
fn tls_and_plain_tcp_do_not_talk_to_each_other() {
    runtime().block_on(async {
        let pki = Pki::new();
        let tls_server = ServerSecurity::tls(pki.server(&["127.0.0.1"], None), Some(secret(1))).unwrap();
        let (accepted, connected) =
            handshake(tls_server, ClientSecurity::insecure(secret(1)), "127.0.0.1").await;
        assert!(matches!(accepted, Err(AuthError::Tls(_))), "{accepted:?}");
        assert!(connected.is_err());
        let tls_client = ClientSecurity::tls(pki.client(&pki, false), Some(secret(1))).unwrap();
        let (accepted, connected) =
            handshake(ServerSecurity::insecure(secret(1)), tls_client, "127.0.0.1").await;
        assert!(accepted.is_err());
        assert!(matches!(connected, Err(AuthError::Tls(_))), "{connected:?}");
    });
}

#[test]
fn plain_tcp_with_the_same_secret_authenticates_and_without_it_is_refused() {
    runtime().block_on(async {
        let (accepted, connected) =
            handshake(ServerSecurity::insecure(secret(1)), ClientSecurity::insecure(secret(1)), "127.0.0.1")
                .await;
        assert!(accepted.is_ok() && connected.is_ok(), "{accepted:?} {connected:?}");
        let (accepted, connected) =
            handshake(ServerSecurity::insecure(secret(1)), ClientSecurity::insecure(secret(3)), "127.0.0.1")
                .await;
        assert!(matches!(connected, Err(AuthError::WrongProof)), "{connected:?}");
        assert!(accepted.is_err());
    });
}

#[test]
fn configurations_that_authenticate_nobody_are_refused() {
    let pki = Pki::new();
    assert_eq!(
        ServerSecurity::tls(pki.server(&["127.0.0.1"], None), None).unwrap_err(),
        SecurityError::NoAuthentication
    );
    assert_eq!(
        ClientSecurity::tls(pki.client(&pki, false), None).unwrap_err(),
        SecurityError::NoAuthentication
    );
    // A refusal tells the peer only why the exchange failed.
    assert_eq!(Refusal::WrongProof.to_string(), "wrong proof of the shared secret");
}
