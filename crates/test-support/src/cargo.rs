//! Building a workspace binary from a benchmark: [`release_binary`] runs `cargo build --release` for it
//! into the target directory the running benchmark was built in, and returns its path.
//!
//! The build runs without the variables cargo set for the benchmark ([`crate::cargo_env`]).
//!
//! **What this is not.** Not for tests: they run binaries of their own package (`CARGO_BIN_EXE_*`).
//!
//! **Tests:** the benchmarks that use it (`controller`, `tpch`); `cargo_env`'s below.

use std::path::PathBuf;

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
    let status = crate::cargo_env::command()
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
