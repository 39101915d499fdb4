//! `cargo xtask`: the command-line entry point of the project's automation.
//!
//! Parses the arguments by hand ([`xtask::flags`]), changes to the project root and dispatches to the task
//! modules of the `xtask` library. Nothing else lives here. Run `cargo xtask help` for the usage.

// xtask is a command-line tool: printing is its interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use anyhow::Context;
use xtask::flags::{self, Task};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the context chain on one line, without the backtrace anyhow would add under
            // `RUST_BACKTRACE`: the failing step's own output, just above, is what matters.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let task = flags::parse(std::env::args().skip(1))?;
    let root = xtask::project_root();
    std::env::set_current_dir(&root).with_context(|| format!("cannot change to {}", root.display()))?;
    match task {
        Task::Help => {
            print!("{}", flags::USAGE);
            Ok(())
        }
        Task::TestSuite(flags) => xtask::test_suite::run(&flags),
        Task::Tidy => xtask::tidy::check(&root),
        Task::Bench { groups } => xtask::bench::run(&root, &groups),
        Task::Sim { seeds } => {
            xtask::sim::run(&seeds, xtask::sim::Profile::Release, xtask::sim::Minimums::NONE)
        }
    }
}
