//! The cluster scenario's separate hosts (`sim cluster --netns`): the controller, the storage services and
//! every replica process each in a Linux network namespace of its own, joined by a bridge in the root
//! namespace, so that every connection crosses a link the scenario can cut (`--link-cuts`).
//!
//! **Layout.** A run creates, all named after this process's id `PID` (so that concurrent runs never
//! share a name): the bridge `snbPID` with no uplink, holding `198.18.N.1/24` (the root namespace, where
//! this process's main thread stays); the namespace `sn-PID-controller` at `198.18.N.2`, which every
//! thread of the scenario's async runtime enters as it starts ([`Network::enter_controller_host`]), so the
//! controller's connections to replicas and storage, and the table writer's, all leave from there;
//! `sn-PID-services` at `198.18.N.3` (PostgreSQL and `moto_server`, started inside it through
//! `ip netns exec`); and, when the orchestrator first starts a replica process, the namespace
//! `sn-PID-iIrRpP` at the next free address (from `.4` up). Each namespace has its loopback up and one
//! veth, `eth0` inside, `snvPID.K` on the bridge. Replica processes are spawned through `ip netns exec`
//! (which replaces itself with `compute-replica`), keep their namespace across restarts, and lose it when
//! the replica is dropped. Every `ip` command runs in the root namespace (`nsenter` into the main
//! thread's), whichever thread asks.
//!
//! **Why 198.18.0.0/15.** Loopback addresses would match the wording, but Linux treats 127/8 as
//! martian on any interface other than `lo` (and this namespace routes all of 127/8 to `lo`), so they
//! cannot cross a veth without rewiring the host's routing. 198.18.0.0/15 is reserved for benchmarking
//! interconnects (RFC 2544), is not routed on the internet, and is unlikely on a LAN; the bridge has no
//! uplink and forwarding is not touched, so nothing on it reaches beyond this machine. A run takes the
//! first `198.18.N.0/24` no interface of this namespace has an address in (under a file lock, so that
//! concurrent runs take different ones).
//!
//! **A link cut** ([`Network::cut`]) takes the bridge side of every veth of one replica down: its
//! processes' packets (to the controller, to storage, between its own processes) are dropped silently,
//! and connections stall rather than fail; [`Network::restore`] brings them up again. With `--netns` the
//! controller gives up a replica connection silent for [`IDLE_TIMEOUT_MS`] (every side writes a keepalive
//! every [`KEEPALIVE_INTERVAL_MS`]), so a cut longer than that ends in a reconnection once the links are
//! back; a shorter one is ridden out by TCP on the same connection.
//!
//! **Cleanup.** [`Network::teardown`] deletes every veth and namespace the run made and the bridge (a
//! veth is deleted itself: the kernel frees a deleted namespace's interfaces only later);
//! [`run`](crate::cluster::run) calls it after the replica processes and the services are gone, on every way out, and `Drop` calls it too (after a panic). A run that was killed
//! with SIGKILL leaves its namespaces behind: [`Network::create`] deletes those of any `PID` that no
//! longer runs `sim` (killing the processes still in them first), before it makes its own.
//! [`Network::leftovers`] lists what is left of this run, which the scenario reports as a violation.
//!
//! **What this is not.** A network emulator: no latency, loss or bandwidth shaping, only links up or
//! down. Needs root and iproute2 (`ip`); [`Network::create`] says so when `ip netns add` fails.
//! **Tests:** `tests/it/cluster.rs` runs `--netns` with a link cut (and says why it did not when the
//! machine allows no namespaces; a failure under `CI=true`); the naming rules below.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow, bail};
use tracing::{info, warn};

use controller::{ProcessHost, ProcessHosts};
use protocol::{InstanceId, ReplicaId};
use storage::services::ServiceHost;

/// How often, with `--netns`, a replica process and the controller write a keepalive on a quiet
/// connection, in milliseconds (`compute-replica --keepalive-interval-ms`,
/// `ControllerConfig::replica_keepalive_interval_ms`).
pub const KEEPALIVE_INTERVAL_MS: u64 = 500;
/// How long, with `--netns`, the controller waits on a silent replica connection before it gives it up
/// and reconnects, in milliseconds (`ControllerConfig::replica_idle_timeout_ms`): five keepalives.
pub const IDLE_TIMEOUT_MS: u64 = 2_500;

/// The first two octets of every address (198.18.0.0/16, half of the RFC 2544 range).
const PREFIX: [u8; 2] = [198, 18];
/// The last octet of the controller's address (the bridge, in the root namespace, is `.1`).
const CONTROLLER_HOST: u8 = 2;
/// The last octet of the services' address.
const SERVICES_HOST: u8 = 3;
/// The last octet of the first replica process's address.
const FIRST_REPLICA_HOST: u8 = 4;
/// The last octet of the last address a run hands out.
const LAST_HOST: u8 = 254;

/// One host: a namespace, its veth's bridge side, its address.
#[derive(Debug, Clone)]
struct Host {
    netns: String,
    veth: String,
    address: Ipv4Addr,
}

/// A run's bridge and namespaces. See the module documentation.
#[derive(Debug)]
pub struct Network {
    pid: u32,
    subnet: u8,
    bridge: String,
    controller: Host,
    services: Host,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The next host's last octet.
    next: u8,
    /// Every host made (or begun) and not deleted yet.
    hosts: Vec<Host>,
    /// The hosts of each replica's processes, in process order.
    replicas: BTreeMap<(InstanceId, ReplicaId), Vec<Host>>,
    /// Whether [`Network::teardown`] ran.
    torn_down: bool,
}

/// Runs `ip ARGS` in the root namespace (the one this process's main thread never leaves), whatever
/// namespace the calling thread is in; an error carries its output.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let root = format!("--net=/proc/{}/ns/net", std::process::id());
    let output = Command::new("nsenter")
        .args([root.as_str(), "--", "ip"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| "cannot run `nsenter` and `ip` (install util-linux and iproute2)".to_string())?;
    if !output.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The bridge's name for run `pid`.
fn bridge_name(pid: u32) -> String {
    format!("snb{pid}")
}

/// The namespace-name prefix of run `pid`.
fn netns_prefix(pid: u32) -> String {
    format!("sn-{pid}-")
}

/// The bridge side of host `index`'s veth in run `pid` (at most 15 bytes, Linux's limit: `snv` and a
/// pid of at most 7 digits, a dot, at most 3 digits).
fn veth_name(pid: u32, index: u8) -> String {
    format!("snv{pid}.{index}")
}

/// The pid a scenario-made name belongs to (`sn-PID-...`, `snbPID`, `snvPID.K`), if it is one.
fn owner(name: &str) -> Option<u32> {
    let digits = |s: &str| s.split(['-', '.']).next().and_then(|d| d.parse::<u32>().ok());
    if let Some(rest) = name.strip_prefix("sn-") {
        return digits(rest);
    }
    name.strip_prefix("snb").or_else(|| name.strip_prefix("snv")).and_then(digits)
}

/// Whether `pid` is a running `sim` process.
fn runs_sim(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "sim")
}

/// The namespaces `ip netns list` shows.
fn namespaces() -> anyhow::Result<Vec<String>> {
    // Lines are `NAME` or `NAME (id: N)`.
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// The links of this namespace.
fn links() -> anyhow::Result<Vec<String>> {
    // Lines are `N: NAME@PEER: <FLAGS> ...` or `N: NAME: <FLAGS> ...`.
    Ok(ip(&["-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect())
}

/// Deletes namespace `name`, killing what still runs in it (a run that died leaves its processes).
fn delete_namespace(name: &str, kill: bool) -> anyhow::Result<()> {
    if kill {
        let pids: Vec<String> =
            ip(&["netns", "pids", name]).unwrap_or_default().split_whitespace().map(str::to_string).collect();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg("-9").args(&pids).stderr(Stdio::null()).status();
        }
    }
    ip(&["netns", "del", name]).map(|_| ())
}

/// Deletes `host`: its veth first (the kernel frees a deleted namespace, and the veth inside it, only
/// later, in the background), then its namespace. Failures are logged; [`Network::leftovers`] finds what
/// is left.
fn delete_host(host: &Host) {
    if links().is_ok_and(|links| links.contains(&host.veth))
        && let Err(error) = ip(&["link", "del", &host.veth])
    {
        warn!(veth = %host.veth, error = %format!("{error:#}"), "cannot delete a veth");
    }
    if let Err(error) = delete_namespace(&host.netns, false) {
        warn!(netns = %host.netns, error = %format!("{error:#}"), "cannot delete a namespace");
    }
}

/// Deletes what runs that no longer exist left behind.
fn clean_stale() -> anyhow::Result<()> {
    for name in namespaces()? {
        if let Some(pid) = owner(&name).filter(|pid| !runs_sim(*pid)) {
            warn!(netns = %name, pid, "deleting a namespace left by a run that is gone");
            delete_namespace(&name, true)?;
        }
    }
    for name in links()? {
        if owner(&name).is_some_and(|pid| !runs_sim(pid)) {
            warn!(link = %name, "deleting a link left by a run that is gone");
            // A veth whose peer's namespace went first is gone already.
            let _ = ip(&["link", "del", &name]);
        }
    }
    Ok(())
}

/// The first `198.18.N` no address of this namespace is in.
fn free_subnet() -> anyhow::Result<u8> {
    let addresses = ip(&["-4", "-o", "addr", "show"])?;
    let used = |n: u8| addresses.contains(&format!(" {}.{}.{n}.", PREFIX[0], PREFIX[1]));
    (0..=u8::MAX).find(|n| !used(*n)).ok_or_else(|| anyhow!("every 198.18.N.0/24 is in use on this machine"))
}

/// Whether this machine lets the scenario make network namespaces: adds and deletes one (`Err`: why not,
/// in `ip`'s words).
pub fn available() -> Result<(), String> {
    let probe = format!("{}probe", netns_prefix(std::process::id()));
    ip(&["netns", "add", &probe]).map_err(|e| format!("{e:#}"))?;
    ip(&["netns", "del", &probe]).map(|_| ()).map_err(|e| format!("{e:#}"))
}

impl Network {
    /// Cleans what dead runs left, then makes this run's bridge and the services' namespace. Fails with
    /// `ip`'s reason where network namespaces cannot be made (not root, no iproute2, a sandbox).
    pub fn create() -> anyhow::Result<Arc<Network>> {
        let pid = std::process::id();
        let lock_path = std::env::temp_dir().join("sim-netns.lock");
        let lock = std::fs::File::create(&lock_path)
            .with_context(|| format!("cannot create {}", lock_path.display()))?;
        lock.lock().with_context(|| format!("cannot lock {}", lock_path.display()))?;
        clean_stale().context("network namespaces are not available here (needs root and iproute2)")?;
        let subnet = free_subnet()?;
        let bridge = bridge_name(pid);
        let controller = Host {
            netns: format!("{}controller", netns_prefix(pid)),
            veth: veth_name(pid, CONTROLLER_HOST),
            address: Ipv4Addr::new(PREFIX[0], PREFIX[1], subnet, CONTROLLER_HOST),
        };
        let services = Host {
            netns: format!("{}services", netns_prefix(pid)),
            veth: veth_name(pid, SERVICES_HOST),
            address: Ipv4Addr::new(PREFIX[0], PREFIX[1], subnet, SERVICES_HOST),
        };
        let network = Network {
            pid,
            subnet,
            bridge: bridge.clone(),
            controller: controller.clone(),
            services: services.clone(),
            state: Mutex::new(State { next: FIRST_REPLICA_HOST, ..State::default() }),
        };
        // From here on, dropping `network` deletes whatever was made.
        ip(&["link", "add", &bridge, "type", "bridge"])
            .context("network namespaces are not available here (needs root and iproute2)")?;
        ip(&["addr", "add", &format!("{}/24", network.address(1)), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        network.make_host(&controller)?;
        network.make_host(&services)?;
        drop(lock);
        info!(pid, subnet = %format!("{}.{}.{subnet}.0/24", PREFIX[0], PREFIX[1]), "network namespaces ready");
        Ok(Arc::new(network))
    }

    fn address(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(PREFIX[0], PREFIX[1], self.subnet, host)
    }

    /// Every address a host of this run may have (the server certificate names them all).
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        (1..=LAST_HOST).map(|host| self.address(host)).collect()
    }

    /// The subnet, `198.18.N.0/24`.
    pub fn describe(&self) -> String {
        format!(
            "network namespaces on the bridge {} ({}.{}.{}.0/24): the controller and the table writer at {} \
             ({}), the services at {}, a namespace per replica process",
            self.bridge,
            PREFIX[0],
            PREFIX[1],
            self.subnet,
            self.controller.address,
            self.controller.netns,
            self.services.address
        )
    }

    /// The controller's address (its namespace's `eth0`).
    pub fn controller_address(&self) -> Ipv4Addr {
        self.controller.address
    }

    /// The file naming the controller's namespace (`ip netns add` makes it).
    fn controller_netns_file(&self) -> std::path::PathBuf {
        std::path::Path::new("/var/run/netns").join(&self.controller.netns)
    }

    /// Moves the calling thread into the controller's namespace: every socket it opens afterwards (the
    /// controller's replica connections, the storage engines' connections) is that host's. The async
    /// runtime's threads call it as they start.
    pub fn enter_controller_host(&self) -> anyhow::Result<()> {
        let path = self.controller_netns_file();
        let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("cannot enter the network namespace {}", self.controller.netns))
    }

    /// Whether the calling thread is in the controller's namespace (compares the namespaces' inodes).
    pub fn in_controller_host(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let inode = |path: &std::path::Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
        let here = inode(std::path::Path::new("/proc/thread-self/ns/net"));
        here.is_some() && here == inode(&self.controller_netns_file())
    }

    /// Where the storage services run.
    pub fn services_host(&self) -> ServiceHost {
        ServiceHost { address: self.services.address, netns: Some(self.services.netns.clone()) }
    }

    /// Makes `host`'s namespace and veth, recording the host for [`teardown`](Self::teardown).
    fn make_host(&self, host: &Host) -> anyhow::Result<()> {
        ip(&["netns", "add", &host.netns])
            .context("network namespaces are not available here (needs root and iproute2)")?;
        lock(&self.state).hosts.push(host.clone());
        ip(&["link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", &host.netns])?;
        ip(&["link", "set", &host.veth, "master", &self.bridge, "up"])?;
        ip(&["-n", &host.netns, "addr", "add", &format!("{}/24", host.address), "dev", "eth0"])?;
        ip(&["-n", &host.netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &host.netns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A new host for process `process` of `replica`.
    fn replica_host(&self, instance: InstanceId, replica: ReplicaId, process: usize) -> anyhow::Result<Host> {
        let index = {
            let mut state = lock(&self.state);
            if state.torn_down {
                bail!("the run's network is torn down");
            }
            let index = state.next;
            if index > LAST_HOST {
                bail!("the run's subnet has no address left for another replica process");
            }
            state.next += 1;
            index
        };
        let host = Host {
            netns: format!("{}i{}r{}p{process}", netns_prefix(self.pid), instance.0, replica.0),
            veth: veth_name(self.pid, index),
            address: self.address(index),
        };
        self.make_host(&host)?;
        lock(&self.state).replicas.entry((instance, replica)).or_default().push(host.clone());
        Ok(host)
    }

    fn set_links(&self, instance: InstanceId, replica: ReplicaId, up: bool) -> anyhow::Result<usize> {
        let hosts = lock(&self.state).replicas.get(&(instance, replica)).cloned().unwrap_or_default();
        if hosts.is_empty() {
            bail!("{replica} has no hosts in this run's network");
        }
        for host in &hosts {
            ip(&["link", "set", &host.veth, if up { "up" } else { "down" }])?;
        }
        Ok(hosts.len())
    }

    /// Takes down the link of every process of `replica`; returns how many.
    pub fn cut(&self, instance: InstanceId, replica: ReplicaId) -> anyhow::Result<usize> {
        self.set_links(instance, replica, false)
    }

    /// Brings the links of `replica`'s processes back up.
    pub fn restore(&self, instance: InstanceId, replica: ReplicaId) -> anyhow::Result<usize> {
        self.set_links(instance, replica, true)
    }

    /// Deletes every namespace this run made and its bridge; idempotent. Call it once the processes in
    /// them are gone (a process still inside keeps its namespace alive, unnamed, until it exits).
    pub fn teardown(&self) {
        let hosts = {
            let mut state = lock(&self.state);
            state.torn_down = true;
            state.replicas.clear();
            std::mem::take(&mut state.hosts)
        };
        for host in hosts {
            delete_host(&host);
        }
        if links().is_ok_and(|links| links.contains(&self.bridge))
            && let Err(error) = ip(&["link", "del", &self.bridge])
        {
            warn!(bridge = %self.bridge, error = %format!("{error:#}"), "cannot delete the bridge");
        }
    }

    /// What is left of this run's namespaces and links (empty after a complete [`teardown`](Self::teardown)).
    pub fn leftovers(&self) -> Vec<String> {
        let mine = |name: &String| owner(name) == Some(self.pid);
        let mut left: Vec<String> = namespaces().unwrap_or_default().into_iter().filter(mine).collect();
        left.extend(links().unwrap_or_default().into_iter().filter(mine));
        left
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding it leaves names that `teardown` still deletes.
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The orchestrator's hosts on a [`Network`]: a namespace per replica process.
#[derive(Debug)]
pub struct NetnsHosts(pub Arc<Network>);

impl ProcessHosts for NetnsHosts {
    fn host(&self, instance: InstanceId, replica: ReplicaId, process: usize) -> Result<ProcessHost, String> {
        let host = self.0.replica_host(instance, replica, process).map_err(|e| format!("{e:#}"))?;
        Ok(ProcessHost {
            address: host.address.into(),
            prefix: ["ip", "netns", "exec", host.netns.as_str()].map(Into::into).to_vec(),
        })
    }

    fn release(&self, instance: InstanceId, replica: ReplicaId) {
        let hosts = {
            let mut state = lock(&self.0.state);
            let hosts = state.replicas.remove(&(instance, replica)).unwrap_or_default();
            state.hosts.retain(|made| !hosts.iter().any(|h| h.netns == made.netns));
            hosts
        };
        for host in hosts {
            delete_host(&host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_a_run_makes_fits_linux_limits_and_names_its_run() {
        let pid = 4_194_304; // The largest pid Linux hands out.
        for name in [bridge_name(pid), veth_name(pid, LAST_HOST), veth_name(pid, 3)] {
            assert!(name.len() <= 15, "{name} is longer than an interface name may be");
            assert_eq!(owner(&name), Some(pid), "{name}");
        }
        let netns = format!("{}i1r12p3", netns_prefix(pid));
        assert_eq!(owner(&netns), Some(pid));
        assert_eq!(owner(&format!("{}services", netns_prefix(7))), Some(7));
        for foreign in ["eth0", "lo", "snbridge", "docker0", "sn-x-1", "veth12"] {
            assert_eq!(owner(foreign), None, "{foreign} is not the scenario's");
        }
    }
}
