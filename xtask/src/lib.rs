//! Project automation for this workspace: `cargo xtask test-suite` (alias `ci`), `tidy`, `bench` and `sim`.
//!
//! **What this is.** The rust-analyzer xtask pattern (see STYLE.md): a plain Rust crate, run through the
//! `.cargo/config.toml` alias `cargo xtask`, that drives cargo with `std::process::Command`. Each task lives
//! in its own module with a `run` function returning `anyhow::Result`; `main.rs` only parses the arguments
//! ([`flags`]), changes to the project root and dispatches. The tasks are a library so that checks can run
//! as tests: `cargo test -p xtask` runs [`tidy`] over the repository, and `test-suite` calls it directly.
//!
//! **What this is not.** Not part of the product and depended on by no crate. It has no dependencies
//! beyond `anyhow` and `serde_json` (no xshell, no clap): it is built first on every fresh clone.
//!
//! **Tests.** Table-driven unit tests at the bottom of [`flags`], [`tidy`], [`bench`](mod@bench), [`sim`] (the
//! simulator's summary checks), [`cluster`] (the cluster report checks) and [`test_suite`];
//! `tidy::tests::the_repository_passes_tidy` runs every check over this checkout.

// xtask is a command-line tool: printing is its interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]
// xtask times steps and benchmarks; it is not simulated code, so the clock rule of clippy.toml does not apply.
#![allow(clippy::disallowed_methods)]

pub mod bench;
pub mod cluster;
pub mod cmd;
pub mod flags;
pub mod sim;
pub mod test_suite;
pub mod tidy;

use std::path::{Path, PathBuf};

/// The workspace root: the parent of this crate's manifest directory. Every task runs from here.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one directory below the workspace root")
        .to_path_buf()
}
