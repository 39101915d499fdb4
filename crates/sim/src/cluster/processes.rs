//! The cluster scenario's operating-system side: finding (or building) the binaries it runs, its data
//! directory, and killing replica processes.
//!
//! **What this is.** `cargo run -p sim` builds only `sim`, so [`binaries`] runs
//! `$CARGO build --locked --bin compute-replica` with the profile and target directory of the running
//! executable (cargo decides whether anything needs rebuilding), then finds it next to it.
//!
//! **What this is not.** Replica processes are the controller's `ProcessOrchestrator`'s; only
//! [`kill_processes`] touches them, to inject a crash, and [`running_children`] looks at them after the
//! cleanup.
//!
//! **Tests:** exercised by running the scenario (`sim cluster`), and [`binaries`] by `tests/it/process_orchestrator.rs`,
//! which builds `compute-replica` with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

#[path = "../../../test-support/src/cargo_env.rs"]
mod cargo_env;

/// Where the scenario's files go and where its binaries are.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The directory holding `sim` and `compute-replica` (e.g. `target/release`).
    pub profile_dir: PathBuf,
    /// The cargo target directory (e.g. `target`).
    pub target_dir: PathBuf,
    /// The profile's name (`release`, `debug`, ...).
    pub profile: String,
    /// `target/cluster-data`: emptied at the start of every run.
    pub data_dir: PathBuf,
}

impl Layout {
    /// The layout of the running executable.
    pub fn of_current_exe() -> anyhow::Result<Layout> {
        let exe = std::env::current_exe().context("cannot find the running executable")?;
        let mut profile_dir = exe.parent().context("the executable has no directory")?.to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps" || n == "examples") {
            profile_dir.pop();
        }
        let profile = profile_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let target_dir = profile_dir.parent().context("the profile directory has no parent")?.to_path_buf();
        let data_dir = target_dir.join("cluster-data");
        Ok(Layout { profile_dir, target_dir, profile, data_dir })
    }

    /// Where logs go (the replicas' and `sim`'s own).
    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }

    /// Empties and recreates the data directory.
    pub fn fresh_data_dir(&self) -> anyhow::Result<()> {
        if self.data_dir.exists() {
            std::fs::remove_dir_all(&self.data_dir)
                .with_context(|| format!("cannot remove {}", self.data_dir.display()))?;
        }
        let dir = self.log_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(())
    }

    fn binary(&self, name: &str) -> PathBuf {
        self.profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
    }
}

/// The binary the scenario spawns.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `compute-replica`.
    pub compute_replica: PathBuf,
}

/// Builds `compute-replica` with the running executable's profile (cargo reuses it when it is up to
/// date) and returns its path. `say` reports what is happening.
pub fn binaries(layout: &Layout, say: &dyn Fn(&str)) -> anyhow::Result<Binaries> {
    let found = Binaries { compute_replica: layout.binary("compute-replica") };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let exists = found.compute_replica.exists();
    if !manifest.exists() {
        if exists {
            say("the workspace is not where sim was built; using the compute-replica next to it");
            return Ok(found);
        }
        bail!(
            "cannot build compute-replica: no workspace at {} and no binary in {}",
            manifest.display(),
            layout.profile_dir.display()
        );
    }
    // Without what cargo set for this process (`cargo run`, a test): see `cargo_env`.
    let mut command = cargo_env::command();
    let cargo = command.get_program().to_owned();
    command
        .arg("build")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--bin", "compute-replica"])
        .env("CARGO_TARGET_DIR", &layout.target_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    match layout.profile.as_str() {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    let profile_flag = match layout.profile.as_str() {
        "debug" => String::new(),
        "release" => " --release".to_string(),
        other => format!(" --profile {other}"),
    };
    say(&format!("building compute-replica (cargo build{profile_flag} --locked --bin compute-replica)"));
    let status = command.status().with_context(|| format!("cannot run {}", cargo.to_string_lossy()))?;
    if !status.success() {
        if exists {
            say(&format!(
                "cargo build failed ({status}); using the compute-replica already in {}",
                layout.profile_dir.display()
            ));
            return Ok(found);
        }
        bail!("cargo build of compute-replica failed ({status})");
    }
    if !found.compute_replica.exists() {
        bail!("cargo built, but {} does not exist", found.compute_replica.display());
    }
    Ok(found)
}

/// The processes among `pids` that still run as children of this process (read from `/proc`; a pid
/// reused by an unrelated process has another parent, and a zombie has exited). Empty where `/proc` is
/// not (the check is then not made; the scenario runs on Linux).
pub fn running_children(pids: &[u32]) -> Vec<u32> {
    let me = std::process::id();
    pids.iter()
        .copied()
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
            // `pid (command) state ppid ...`; the command may hold spaces and parentheses.
            let Some((_, rest)) = stat.rsplit_once(')') else { return false };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let parent = fields.next().and_then(|p| p.parse::<u32>().ok());
            parent == Some(me) && state != Some("Z") && state != Some("X")
        })
        .collect()
}

/// Sends SIGKILL to `pids` with `kill -9` (no libc dependency).
pub fn kill_processes(pids: &[u32]) -> anyhow::Result<()> {
    if pids.is_empty() {
        bail!("no processes to kill");
    }
    let status = Command::new("kill")
        .arg("-9")
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        bail!("kill -9 {pids:?} failed ({status})");
    }
    Ok(())
}
