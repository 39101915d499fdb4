//! A `cargo` command for a process that cargo itself started (a test, a benchmark, `cargo run`,
//! `cargo xtask`): without the variables cargo set for that process.
//!
//! **Why.** Cargo runs a process with variables of its own (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`: the
//! prefixes in [`CARGO_RUN_VARIABLES`]). A build that inherited them would fingerprint a build script that
//! watches one (ring's watches `CARGO_MANIFEST_DIR`) differently from a plain `cargo build`, and each would
//! then rebuild half the tree after the other; the scenario tests each spent two minutes compiling that
//! way, beside the tests running then.
//!
//! **One file, three crates.** `xtask` (which has no workspace dependency) and `sim` (whose binary may not
//! depend on this dev-only crate) include this file as a module of their own (`#[path]`), so the list is
//! written once. It uses nothing but `std`.
//!
//! **Tests:** below (run in each crate that includes it).

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
