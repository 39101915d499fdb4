//! Building a workspace binary from a benchmark: [`release_binary`] runs `cargo build --release` for it
//! into the target directory the running benchmark was built in, and returns its path.
//!
//! **The environment.** Cargo runs a benchmark with variables of its own (`CARGO_MANIFEST_DIR`,
//! `CARGO_PKG_*`, [`CARGO_RUN_VARIABLES`]). A build that inherited them would fingerprint a build script
//! that watches one (ring's watches `CARGO_MANIFEST_DIR`) differently from a plain `cargo build`, and each
//! would then rebuild half the tree after the other; the build leaves them out. (`xtask` and the `sim`
//! scenario, which cannot depend on this crate, leave out the same list.)
//!
//! **What this is not.** Not for tests: they run binaries of their own package (`CARGO_BIN_EXE_*`).
//!
//! **Tests:** below (the command leaves out what cargo set for the test and keeps the rest).

use std::path::PathBuf;
use std::process::Command;

/// The variables cargo sets for the process it runs, by prefix.
pub const CARGO_RUN_VARIABLES: &[&str] = &[
    "CARGO_MANIFEST_",
    "CARGO_PKG_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
];

/// A `cargo` command (the `CARGO` that runs this process, else `cargo` on the path) without the variables
/// cargo set for this process.
pub fn command() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if CARGO_RUN_VARIABLES.iter().any(|prefix| name.starts_with(prefix)) {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// Builds `binary` of `package` in release (a no-op when it is fresh) into the target directory the
/// running executable (a benchmark, in `target/<profile>/deps/`) was built in, and returns its path. The
/// target directory is given explicitly: a relative `CARGO_TARGET_DIR` would resolve against the
/// benchmark's working directory (its crate's), not the workspace's, and the benchmark would run a stale
/// binary. If the build fails and a binary is there, it is used, with a note saying so for the caller
/// to print.
pub fn release_binary(package: &str, binary: &str) -> Result<(PathBuf, Option<String>), String> {
    let exe = std::env::current_exe().map_err(|e| format!("the running executable's path: {e}"))?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| format!("{} is not in target/<profile>/deps/", exe.display()))?;
    let target_dir = dir.parent().ok_or_else(|| format!("{} has no parent", dir.display()))?;
    let path = dir.join(binary);
    let status = command()
        .args(["build", "--release", "--locked", "--quiet", "-p", package, "--bin", binary])
        .arg("--target-dir")
        .arg(target_dir)
        .status();
    let note = match status {
        Ok(status) if status.success() => None,
        other if path.is_file() => {
            Some(format!("could not rebuild {binary} ({other:?}); using {}", path.display()))
        }
        other => return Err(format!("cannot build {binary}: {other:?}")),
    };
    if !path.is_file() {
        return Err(format!("{} missing after the build", path.display()));
    }
    Ok((path, note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_leaves_out_what_cargo_set_for_this_process_and_keeps_the_rest() {
        // Cargo (and nextest) set these for every test they run.
        for name in ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME"] {
            assert!(std::env::var_os(name).is_some(), "{name} is set for a test");
        }
        let command = command();
        let removed: Vec<String> = command
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_string_lossy().into_owned())
            .collect();
        for name in ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME", "CARGO_PKG_VERSION"] {
            assert!(removed.iter().any(|r| r == name), "{name} is left out: {removed:?}");
        }
        for name in ["CARGO", "CARGO_HOME", "CARGO_TARGET_DIR", "CARGO_INCREMENTAL", "PATH"] {
            assert!(!removed.iter().any(|r| r == name), "{name} is kept: {removed:?}");
        }
    }
}
