//! Authentication by challenge-response: both ends of a connection prove they hold the same
//! [`SharedSecret`] without sending it, before anything else is said.
//!
//! **The exchange** (one frame each, every frame at most [`PRE_AUTH_MAX_FRAME_BYTES`]):
//!
//! ```text
//! connector                                         acceptor
//!   Hello { version, challenge c }            ──▶
//!                                             ◀──   Challenge { version, challenge a, proof_A }
//!   Proof { proof_C }                         ──▶
//!                                             ◀──   Accepted   (or Refused(reason), then close)
//! ```
//!
//! `proof_X = HMAC-SHA256(secret, "ccr-auth/1" ‖ role X ‖ service ‖ c ‖ a ‖ binding)` ([`Transcript`]):
//! the role keeps a proof made by one side from passing as the other's (an acceptor cannot be used to
//! compute a connector's proof), `service` keeps a proof for one kind of port from passing at another,
//! `binding` is the TLS session's exported keying material when there is TLS (a proof is then good for
//! that session only) and empty otherwise. Challenges are 32 bytes from the operating system's CSPRNG,
//! drawn afresh by each side for each connection, so a recorded proof is never valid again: a replayed
//! handshake meets a new challenge. Proofs are compared in constant time (`hmac`'s `verify_slice`).
//!
//! **Mutual.** A connector with a secret requires the acceptor's proof too (so a plain-TCP controller
//! knows it reached a replica that holds the secret, not an impostor). An end without a secret (TLS with
//! client certificates instead, see `security`) sends no proof and requires none; its TLS layer
//! authenticated the peer.
//!
//! **What a refusal says.** Only why the exchange failed (version, wrong or missing proof, an unexpected
//! message): an acceptor reveals nothing about itself to an unauthenticated peer.
//!
//! **Drivers.** The exchange's steps are pure functions ([`Acceptor`], [`Connector`]); two drivers run
//! them: [`accept`]/[`connect`] over tokio framed halves, and [`accept_blocking`]/[`connect_blocking`] over
//! blocking `std::io` streams (the timely cluster's ports, test clients). Timeouts are the callers'.
//!
//! **Tests.** `mod tests` below (proofs, roles, replays, wrong and missing secrets, both drivers);
//! `tests/it/security.rs` over TLS and plain sockets.

use std::io::{Read, Write};

use hmac::{Hmac, KeyInit, Mac};
use protocol::frame::{FrameError, read_frame, write_frame};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::secret::SharedSecret;
use crate::{FramedRead, FramedWrite};

/// The version of the exchange's messages and proofs.
pub const AUTH_VERSION: u32 = 1;

/// The largest frame either end accepts before the peer has authenticated (the exchange's messages are
/// under 100 bytes).
pub const PRE_AUTH_MAX_FRAME_BYTES: usize = 4 * 1024;

/// The domain-separation prefix of every proof.
const PROOF_CONTEXT: &[u8] = b"ccr-auth/1";

type HmacSha256 = Hmac<Sha256>;

/// 32 bytes drawn from the operating system's CSPRNG for one connection.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge([u8; 32]);

impl std::fmt::Debug for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Challenge(..)")
    }
}

impl Challenge {
    /// A fresh challenge.
    pub fn random() -> Result<Challenge, AuthError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| AuthError::Random(e.to_string()))?;
        Ok(Challenge(bytes))
    }
}

/// An HMAC-SHA256 proof of the secret over a [`Transcript`].
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof([u8; 32]);

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Proof(..)")
    }
}

/// Which end of a connection makes a proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The end that opened the connection (a controller, a storage client, a higher-indexed cluster
    /// process).
    Connector,
    /// The end that accepted it (a replica, a lower-indexed cluster process).
    Acceptor,
}

/// What a proof covers. See the module documentation.
#[derive(Clone, Copy, Debug)]
pub struct Transcript<'a> {
    /// What the port serves (`"compute"`, `"storage"`, a cluster's name).
    pub service: &'a str,
    /// The connector's challenge.
    pub connector: &'a Challenge,
    /// The acceptor's challenge.
    pub acceptor: &'a Challenge,
    /// The TLS session's exported keying material, or empty.
    pub binding: &'a [u8],
}

impl Transcript<'_> {
    fn mac(&self, secret: &SharedSecret, role: Role) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(secret.expose()).expect("HMAC takes keys of any length");
        mac.update(PROOF_CONTEXT);
        mac.update(match role {
            Role::Connector => b"connector",
            Role::Acceptor => b"acceptor\0",
        });
        for part in [self.service.as_bytes(), &self.connector.0, &self.acceptor.0, self.binding] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }

    /// `role`'s proof of `secret` over this transcript.
    pub fn prove(&self, secret: &SharedSecret, role: Role) -> Proof {
        Proof(self.mac(secret, role).finalize().into_bytes().into())
    }

    /// Whether `proof` is `role`'s proof of `secret` over this transcript (compared in constant time).
    pub fn verify(&self, secret: &SharedSecret, role: Role, proof: &Proof) -> bool {
        self.mac(secret, role).verify_slice(&proof.0).is_ok()
    }
}

/// What the connector sends.
#[derive(Debug, Serialize, Deserialize)]
pub enum ConnectorMessage {
    /// Opens the exchange.
    Hello {
        /// The connector's [`AUTH_VERSION`].
        version: u32,
        /// The connector's challenge.
        challenge: Challenge,
    },
    /// The connector's proof (none if it has no secret).
    Proof(Option<Proof>),
}

/// What the acceptor sends.
#[derive(Debug, Serialize, Deserialize)]
pub enum AcceptorMessage {
    /// The acceptor's challenge and its own proof (none if it has no secret).
    Challenge {
        /// The acceptor's [`AUTH_VERSION`].
        version: u32,
        /// The acceptor's challenge.
        challenge: Challenge,
        /// The acceptor's proof.
        proof: Option<Proof>,
    },
    /// The connector is authenticated: the connection's own protocol starts.
    Accepted,
    /// The connector is not; the acceptor closes the connection.
    Refused(Refusal),
}

/// Why an acceptor refused a connector: all it tells an unauthenticated peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The connector speaks another version of the exchange.
    #[error("the acceptor speaks authentication version {acceptor}")]
    Version {
        /// The acceptor's [`AUTH_VERSION`].
        acceptor: u32,
    },
    /// The connector's proof is wrong (another secret).
    #[error("wrong proof of the shared secret")]
    WrongProof,
    /// The connector sent no proof and the acceptor requires one.
    #[error("no proof of the shared secret")]
    MissingProof,
    /// The connector sent a message out of turn.
    #[error("unexpected message")]
    Unexpected,
}

/// Why a connection could not be secured (TLS) or authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The TLS handshake failed (a certificate not trusted, a name that does not match, not TLS at all).
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    /// A frame could not be read or written: garbage, over [`PRE_AUTH_MAX_FRAME_BYTES`], truncated, the
    /// connection closed or failed.
    #[error("authentication failed: {0}")]
    Frame(#[from] FrameError),
    /// The peer refused us.
    #[error("refused by the peer: {0}")]
    Refused(Refusal),
    /// The peer's proof is wrong: it does not hold our secret.
    #[error("the peer's proof of the shared secret is wrong")]
    WrongProof,
    /// The peer sent no proof, and we require one.
    #[error("the peer sent no proof of the shared secret")]
    MissingProof,
    /// The peer speaks another version of the exchange.
    #[error("authentication version mismatch: ours {ours}, the peer's {theirs}")]
    Version {
        /// Ours.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// The peer sent a message out of turn.
    #[error("unexpected {0} during authentication")]
    Unexpected(&'static str),
    /// No randomness for a challenge.
    #[error("no randomness for a challenge: {0}")]
    Random(String),
    /// The exchange did not finish in time.
    #[error("the handshake did not finish within {0} ms")]
    TimedOut(u64),
}

/// The parameters of one exchange, for either end.
#[derive(Debug, Clone, Copy)]
pub struct AuthParams<'a> {
    /// Our secret, if we prove and require proofs with one.
    pub secret: Option<&'a SharedSecret>,
    /// What the port serves (both ends must agree).
    pub service: &'a str,
    /// The TLS session's exported keying material, or empty.
    pub binding: &'a [u8],
}

/// The acceptor's steps.
#[derive(Debug)]
pub struct Acceptor<'a> {
    params: AuthParams<'a>,
    connector: Challenge,
    acceptor: Challenge,
}

/// What a step says to do next: send a message (if any), then go on or end with an error.
pub type Step<M, S> = (Option<M>, Result<S, AuthError>);

impl<'a> Acceptor<'a> {
    /// The answer to the connector's first message: our challenge (and proof), or a refusal.
    pub fn hello(params: AuthParams<'a>, message: ConnectorMessage) -> Step<AcceptorMessage, Acceptor<'a>> {
        let connector = match message {
            ConnectorMessage::Hello { version, challenge } if version == AUTH_VERSION => challenge,
            ConnectorMessage::Hello { version, .. } => {
                let refusal = Refusal::Version { acceptor: AUTH_VERSION };
                return (
                    Some(AcceptorMessage::Refused(refusal)),
                    Err(AuthError::Version { ours: AUTH_VERSION, theirs: version }),
                );
            }
            ConnectorMessage::Proof(_) => {
                return (
                    Some(AcceptorMessage::Refused(Refusal::Unexpected)),
                    Err(AuthError::Unexpected("Proof")),
                );
            }
        };
        let acceptor = match Challenge::random() {
            Ok(challenge) => challenge,
            Err(error) => return (None, Err(error)),
        };
        let state = Acceptor { params, connector, acceptor };
        let proof = params.secret.map(|secret| state.transcript().prove(secret, Role::Acceptor));
        let answer = AcceptorMessage::Challenge { version: AUTH_VERSION, challenge: acceptor, proof };
        (Some(answer), Ok(state))
    }

    fn transcript(&self) -> Transcript<'_> {
        Transcript {
            service: self.params.service,
            connector: &self.connector,
            acceptor: &self.acceptor,
            binding: self.params.binding,
        }
    }

    /// Checks the connector's proof: `Accepted`, or a refusal.
    pub fn proof(self, message: ConnectorMessage) -> Step<AcceptorMessage, ()> {
        let proof = match message {
            ConnectorMessage::Proof(proof) => proof,
            ConnectorMessage::Hello { .. } => {
                return (
                    Some(AcceptorMessage::Refused(Refusal::Unexpected)),
                    Err(AuthError::Unexpected("Hello")),
                );
            }
        };
        let refuse = |refusal: Refusal, error| (Some(AcceptorMessage::Refused(refusal)), Err(error));
        match (self.params.secret, proof) {
            (None, _) => (Some(AcceptorMessage::Accepted), Ok(())),
            (Some(_), None) => refuse(Refusal::MissingProof, AuthError::MissingProof),
            (Some(secret), Some(proof)) => {
                if self.transcript().verify(secret, Role::Connector, &proof) {
                    (Some(AcceptorMessage::Accepted), Ok(()))
                } else {
                    refuse(Refusal::WrongProof, AuthError::WrongProof)
                }
            }
        }
    }
}

/// The connector's steps.
#[derive(Debug)]
pub struct Connector<'a> {
    params: AuthParams<'a>,
    connector: Challenge,
}

impl<'a> Connector<'a> {
    /// Our first message.
    pub fn start(params: AuthParams<'a>) -> Result<(ConnectorMessage, Connector<'a>), AuthError> {
        let connector = Challenge::random()?;
        Ok((
            ConnectorMessage::Hello { version: AUTH_VERSION, challenge: connector },
            Connector { params, connector },
        ))
    }

    /// Checks the acceptor's challenge and proof; our proof.
    pub fn challenge(self, message: AcceptorMessage) -> Step<ConnectorMessage, ()> {
        let (version, acceptor, proof) = match message {
            AcceptorMessage::Challenge { version, challenge, proof } => (version, challenge, proof),
            AcceptorMessage::Refused(refusal) => return (None, Err(AuthError::Refused(refusal))),
            AcceptorMessage::Accepted => return (None, Err(AuthError::Unexpected("Accepted"))),
        };
        if version != AUTH_VERSION {
            return (None, Err(AuthError::Version { ours: AUTH_VERSION, theirs: version }));
        }
        let transcript = Transcript {
            service: self.params.service,
            connector: &self.connector,
            acceptor: &acceptor,
            binding: self.params.binding,
        };
        let Some(secret) = self.params.secret else {
            return (Some(ConnectorMessage::Proof(None)), Ok(()));
        };
        match proof {
            None => (None, Err(AuthError::MissingProof)),
            Some(proof) if !transcript.verify(secret, Role::Acceptor, &proof) => {
                (None, Err(AuthError::WrongProof))
            }
            Some(_) => {
                (Some(ConnectorMessage::Proof(Some(transcript.prove(secret, Role::Connector)))), Ok(()))
            }
        }
    }

    /// The acceptor's verdict.
    pub fn verdict(message: AcceptorMessage) -> Result<(), AuthError> {
        match message {
            AcceptorMessage::Accepted => Ok(()),
            AcceptorMessage::Refused(refusal) => Err(AuthError::Refused(refusal)),
            AcceptorMessage::Challenge { .. } => Err(AuthError::Unexpected("Challenge")),
        }
    }
}

/// Runs the acceptor's side over framed halves (whose limit should be [`PRE_AUTH_MAX_FRAME_BYTES`]).
pub async fn accept<R, W>(
    input: &mut FramedRead<R>,
    output: &mut FramedWrite<W>,
    params: AuthParams<'_>,
) -> Result<(), AuthError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (answer, state) = Acceptor::hello(params, input.recv().await?);
    send_then(output, answer, state).await?.proof_async(input, output).await
}

impl Acceptor<'_> {
    async fn proof_async<R, W>(
        self,
        input: &mut FramedRead<R>,
        output: &mut FramedWrite<W>,
    ) -> Result<(), AuthError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (answer, outcome) = self.proof(input.recv().await?);
        send_then(output, answer, outcome).await
    }
}

/// Runs the connector's side over framed halves (whose limit should be [`PRE_AUTH_MAX_FRAME_BYTES`]).
pub async fn connect<R, W>(
    input: &mut FramedRead<R>,
    output: &mut FramedWrite<W>,
    params: AuthParams<'_>,
) -> Result<(), AuthError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (hello, state) = Connector::start(params)?;
    output.send(&hello).await?;
    let (proof, outcome) = state.challenge(input.recv().await?);
    send_then(output, proof, outcome).await?;
    Connector::verdict(input.recv().await?)
}

/// Sends `message` (if any; a failure to send a refusal does not hide the refusal's reason), then
/// returns `outcome`.
async fn send_then<W: AsyncWrite + Unpin, M: Serialize, S>(
    output: &mut FramedWrite<W>,
    message: Option<M>,
    outcome: Result<S, AuthError>,
) -> Result<S, AuthError> {
    if let Some(message) = message {
        let sent = output.send(&message).await;
        if outcome.is_ok() {
            sent?;
        }
    }
    outcome
}

/// Runs the acceptor's side over a blocking stream.
pub fn accept_blocking<S: Read + Write>(stream: &mut S, params: AuthParams<'_>) -> Result<(), AuthError> {
    let hello = read_frame(stream, PRE_AUTH_MAX_FRAME_BYTES)?;
    let (answer, state) = Acceptor::hello(params, hello);
    let state = send_then_blocking(stream, answer, state)?;
    let proof = read_frame(stream, PRE_AUTH_MAX_FRAME_BYTES)?;
    let (answer, outcome) = state.proof(proof);
    send_then_blocking(stream, answer, outcome)
}

/// Runs the connector's side over a blocking stream.
pub fn connect_blocking<S: Read + Write>(stream: &mut S, params: AuthParams<'_>) -> Result<(), AuthError> {
    let (hello, state) = Connector::start(params)?;
    write_frame(stream, &hello, PRE_AUTH_MAX_FRAME_BYTES)?;
    let challenge = read_frame(stream, PRE_AUTH_MAX_FRAME_BYTES)?;
    let (proof, outcome) = state.challenge(challenge);
    send_then_blocking(stream, proof, outcome)?;
    Connector::verdict(read_frame(stream, PRE_AUTH_MAX_FRAME_BYTES)?)
}

fn send_then_blocking<W: Write, M: Serialize, S>(
    stream: &mut W,
    message: Option<M>,
    outcome: Result<S, AuthError>,
) -> Result<S, AuthError> {
    if let Some(message) = message {
        let sent = write_frame(stream, &message, PRE_AUTH_MAX_FRAME_BYTES);
        if outcome.is_ok() {
            sent?;
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> SharedSecret {
        SharedSecret::new(vec![byte; 32]).unwrap()
    }

    fn params(secret: Option<&SharedSecret>) -> AuthParams<'_> {
        AuthParams { secret, service: "compute", binding: b"" }
    }

    #[test]
    fn a_proof_verifies_only_for_its_secret_role_service_challenges_and_binding() {
        let (s, other) = (secret(1), secret(2));
        let (c, a, x) =
            (Challenge::random().unwrap(), Challenge::random().unwrap(), Challenge::random().unwrap());
        let base = Transcript { service: "compute", connector: &c, acceptor: &a, binding: b"tls" };
        let proof = base.prove(&s, Role::Connector);
        assert!(base.verify(&s, Role::Connector, &proof));
        // (what differs, the transcript or secret or role it is checked with)
        let variants: [(&str, Transcript<'_>, &SharedSecret, Role); 6] = [
            ("secret", base, &other, Role::Connector),
            ("role", base, &s, Role::Acceptor),
            ("service", Transcript { service: "storage", ..base }, &s, Role::Connector),
            ("connector challenge", Transcript { connector: &x, ..base }, &s, Role::Connector),
            ("acceptor challenge", Transcript { acceptor: &x, ..base }, &s, Role::Connector),
            ("binding", Transcript { binding: b"other session", ..base }, &s, Role::Connector),
        ];
        for (what, transcript, secret, role) in variants {
            assert!(!transcript.verify(secret, role, &proof), "a proof passed with another {what}");
        }
    }

    /// Runs both ends over a pair of connected sockets, blocking.
    fn exchange(
        acceptor: Option<SharedSecret>,
        connector: Option<SharedSecret>,
    ) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let accepting = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            accept_blocking(&mut stream, params(acceptor.as_ref()))
        });
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        let connected = connect_blocking(&mut stream, params(connector.as_ref()));
        drop(stream);
        (accepting.join().unwrap(), connected)
    }

    #[test]
    fn the_same_secret_authenticates_both_ends_and_others_are_refused() {
        let (accepted, connected) = exchange(Some(secret(1)), Some(secret(1)));
        assert!(accepted.is_ok() && connected.is_ok(), "{accepted:?} {connected:?}");
        // A connector with the wrong secret finds the acceptor's proof wrong and gives up first.
        let (accepted, connected) = exchange(Some(secret(1)), Some(secret(2)));
        assert!(matches!(connected, Err(AuthError::WrongProof)), "{connected:?}");
        assert!(accepted.is_err());
        // A connector with no secret is refused for its missing proof.
        let (accepted, connected) = exchange(Some(secret(1)), None);
        assert!(matches!(accepted, Err(AuthError::MissingProof)), "{accepted:?}");
        assert!(matches!(connected, Err(AuthError::Refused(Refusal::MissingProof))), "{connected:?}");
        // An acceptor with no secret (client certificates instead) cannot satisfy a connector with one.
        let (_, connected) = exchange(None, Some(secret(1)));
        assert!(matches!(connected, Err(AuthError::MissingProof)), "{connected:?}");
    }

    #[test]
    fn a_connector_that_lies_about_its_proof_is_refused_as_wrong() {
        let s = secret(1);
        let (hello, _) = Connector::start(params(Some(&s))).unwrap();
        let (answer, state) = Acceptor::hello(params(Some(&s)), hello);
        assert!(matches!(answer, Some(AcceptorMessage::Challenge { proof: Some(_), .. })));
        let (answer, outcome) = state.unwrap().proof(ConnectorMessage::Proof(Some(Proof([0; 32]))));
        assert!(matches!(answer, Some(AcceptorMessage::Refused(Refusal::WrongProof))));
        assert!(matches!(outcome, Err(AuthError::WrongProof)));
    }

    #[test]
    fn a_recorded_proof_does_not_pass_a_new_challenge() {
        let s = secret(1);
        // A legitimate exchange, recorded.
        let (hello, connector) = Connector::start(params(Some(&s))).unwrap();
        let ConnectorMessage::Hello { challenge, .. } = &hello else { panic!("a hello") };
        let replayed_hello = ConnectorMessage::Hello { version: AUTH_VERSION, challenge: *challenge };
        let (answer, acceptor) = Acceptor::hello(params(Some(&s)), hello);
        let (proof, outcome) = connector.challenge(answer.unwrap());
        assert!(outcome.is_ok());
        let Some(ConnectorMessage::Proof(Some(recorded))) = proof else { panic!("a proof") };
        assert!(acceptor.unwrap().proof(ConnectorMessage::Proof(Some(recorded))).1.is_ok());
        // The same messages replayed against a new connection: the acceptor's challenge is new.
        let (_, acceptor) = Acceptor::hello(params(Some(&s)), replayed_hello);
        let (answer, outcome) = acceptor.unwrap().proof(ConnectorMessage::Proof(Some(recorded)));
        assert!(matches!(answer, Some(AcceptorMessage::Refused(Refusal::WrongProof))));
        assert!(matches!(outcome, Err(AuthError::WrongProof)));
    }

    #[test]
    fn messages_out_of_turn_and_other_versions_are_refused() {
        let s = secret(1);
        let (answer, outcome) = Acceptor::hello(params(Some(&s)), ConnectorMessage::Proof(None));
        assert!(matches!(answer, Some(AcceptorMessage::Refused(Refusal::Unexpected))));
        assert!(outcome.is_err());
        let hello =
            ConnectorMessage::Hello { version: AUTH_VERSION + 1, challenge: Challenge::random().unwrap() };
        let (answer, outcome) = Acceptor::hello(params(Some(&s)), hello);
        assert!(matches!(
            answer,
            Some(AcceptorMessage::Refused(Refusal::Version { acceptor: AUTH_VERSION }))
        ));
        assert!(matches!(outcome, Err(AuthError::Version { .. })));
    }
}
