//! Controllers and replicas that do not belong together, end to end over TLS (the harness's throwaway
//! CA and shared secret): a newer controller (a higher epoch) takes a replica over and the older one is
//! told once, as `ComputeControllerResponse::ReplicaFenced`, and stops connecting; a controller of a lower
//! epoch, or of the same epoch while its holder is connected, never gets in; a controller that does not trust the replica's certificate, or does not hold
//! the secret, never reaches the replica's protocol. In every case the legitimate controller keeps being
//! served.

use std::sync::Arc;
use std::time::Duration;

use controller::{
    ClientSecurity, ComputeController, ComputeControllerResponse, ControllerEpoch, PeekOptions,
    ReplicaLocation, SharedSecret, TlsClientConfig,
};
use protocol::{GlobalId, InstanceId, PeekTarget, ReplicaId};
use storage::{AppendRequest, InProcess, StorageCollections, StoreConfig};

use crate::harness::{
    any_port, controller_config, desc, f, index_on_storage, kv, pki_files, start_replica, u,
};

const INSTANCE: InstanceId = InstanceId(1);
const R1: ReplicaId = ReplicaId(1);

/// A storage with table `u1` holding `(0, 0)` and `(1, 10)` at time 0 (upper 1).
async fn storage_with_a_table() -> Arc<InProcess> {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    storage.create_collection(u(1), desc()).await.expect("create table");
    let updates = vec![(kv(0, 0), 0, 1), (kv(1, 10), 0, 1)];
    let request = AppendRequest { id: u(1), updates, expected_upper: f(0), new_upper: f(1) };
    storage.append(vec![request]).await.expect("append");
    storage
}

/// A controller of `epoch` connecting with `security`, with instance 1, replica 1 at `replica` and an
/// index `index` on the table.
async fn controller_on(
    storage: &Arc<InProcess>,
    epoch: u64,
    security: ClientSecurity,
    replica: std::net::SocketAddr,
    index: GlobalId,
) -> ComputeController {
    let config = controller::ControllerConfig {
        epoch: ControllerEpoch(epoch),
        replica_security: security,
        ..controller_config(false)
    };
    let mut controller =
        ComputeController::new(Arc::clone(storage) as Arc<dyn StorageCollections>, None, config)
            .await
            .expect("controller");
    controller.create_instance(INSTANCE, controller.default_instance_config()).expect("instance");
    let location = ReplicaLocation::Unmanaged { addresses: vec![replica.to_string()] };
    controller.add_replica(INSTANCE, R1, location).await.expect("add replica");
    controller.create_dataflow(INSTANCE, index_on_storage(u(1), index, 0)).await.expect("index");
    controller
}

/// The index's rows at time 0 through `controller`, or `None` if no answer came within `within`.
async fn peek_rows(controller: &ComputeController, index: GlobalId, within: Duration) -> Option<usize> {
    let options = PeekOptions { timeout_ms: Some(within.as_millis() as u64), ..PeekOptions::default() };
    let handle =
        controller.peek(INSTANCE, PeekTarget::Index { id: index }, 0, options).await.expect("peek accepted");
    handle.result().await.ok().map(|rows| rows.len())
}

/// The `ReplicaFenced` responses `controller` reports within `within`.
async fn fenced_reports(controller: &mut ComputeController, within: Duration) -> Vec<(u64, u64)> {
    let mut fenced = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(response)) = tokio::time::timeout_at(deadline, controller.process()).await {
        if let ComputeControllerResponse::ReplicaFenced { instance, replica, epoch, current } = response {
            assert_eq!((instance, replica), (INSTANCE, R1));
            fenced.push((epoch.0, current.0));
        }
    }
    fenced
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_controller_takes_the_replica_over_and_an_older_one_is_told_once_and_stops_trying() {
    let storage = storage_with_a_table().await;
    let replica = start_replica(&storage, any_port());
    let security = crate::harness::controller_security();
    let mut first = controller_on(&storage, 1, security.clone(), replica.local_addr(), u(11)).await;
    assert_eq!(
        peek_rows(&first, u(11), Duration::from_secs(30)).await,
        Some(2),
        "the first controller is served"
    );

    // Epoch 2 takes over; epoch 1 is fenced at its reconnection, told once, and never tries again (its
    // backoff is 10 to 100 ms: retrying would report many times in two seconds).
    let second = controller_on(&storage, 2, security.clone(), replica.local_addr(), u(12)).await;
    assert_eq!(peek_rows(&second, u(12), Duration::from_secs(30)).await, Some(2), "the newer controller");
    assert_eq!(fenced_reports(&mut first, Duration::from_secs(2)).await, vec![(1, 2)]);
    assert_eq!(peek_rows(&first, u(11), Duration::from_millis(300)).await, None, "the old one is not served");

    // A controller of a lower epoch, started afresh, is fenced at once; the newer one is still served.
    let mut third = controller_on(&storage, 1, security, replica.local_addr(), u(13)).await;
    assert_eq!(fenced_reports(&mut third, Duration::from_secs(2)).await, vec![(1, 2)]);
    assert_eq!(peek_rows(&second, u(12), Duration::from_secs(30)).await, Some(2), "still served");
    // Another controller claiming the same epoch while the holder is connected is fenced too.
    let mut fourth =
        controller_on(&storage, 2, crate::harness::controller_security(), replica.local_addr(), u(14)).await;
    assert_eq!(fenced_reports(&mut fourth, Duration::from_secs(2)).await, vec![(2, 2)]);
    assert_eq!(peek_rows(&second, u(12), Duration::from_secs(30)).await, Some(2), "still served");
    drop((first, second, third, fourth));
    tokio::task::spawn_blocking(move || replica.shutdown()).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_without_the_secret_or_the_replicas_ca_never_get_in_and_the_legitimate_one_is_served() {
    let storage = storage_with_a_table().await;
    let replica = start_replica(&storage, any_port());
    let legitimate =
        controller_on(&storage, 1, crate::harness::controller_security(), replica.local_addr(), u(11)).await;
    assert_eq!(peek_rows(&legitimate, u(11), Duration::from_secs(30)).await, Some(2));

    let (files, _) = pki_files();
    let wrong_secret = SharedSecret::new(b"not the secret the replicas were given".to_vec()).expect("secret");
    let trusting = TlsClientConfig::from_pem_files(&files.ca, None).expect("the CA");
    // A CA of its own: the replica's certificate does not chain to it.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let other = transport::certs::write_throwaway_pki(dir.path(), &["127.0.0.1"]).expect("another CA");
    let distrusting = TlsClientConfig::from_pem_files(&other.ca, None).expect("the other CA");
    let (_, secret) = pki_files();
    let intruders = [
        ClientSecurity::tls(trusting, Some(wrong_secret.clone())).expect("security"),
        ClientSecurity::tls(distrusting, Some(secret.clone())).expect("security"),
        // Plain TCP to a TLS port, with the right secret.
        ClientSecurity::insecure(secret.clone()),
    ];
    for (n, security) in intruders.into_iter().enumerate() {
        // A higher epoch: were it let in, it would take the replica over.
        let intruder = controller_on(&storage, 9, security, replica.local_addr(), u(20 + n as u64)).await;
        assert_eq!(
            peek_rows(&intruder, u(20 + n as u64), Duration::from_millis(500)).await,
            None,
            "intruder {n} is never served"
        );
        assert_eq!(
            peek_rows(&legitimate, u(11), Duration::from_secs(30)).await,
            Some(2),
            "after intruder {n}"
        );
    }
    drop(legitimate);
    tokio::task::spawn_blocking(move || replica.shutdown()).await.expect("shutdown");
}
