//! Running child processes: a `cargo` command with the environment every task shares, and running a
//! command with its command line echoed and its exit status checked.
//!
//! Not a shell abstraction: plain `std::process::Command`, so that xtask needs no dependency to build.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, bail};

#[path = "../../crates/test-support/src/cargo_env.rs"]
mod cargo_env;

/// A `cargo` command. When the environment has `CI=true`, it also sets `CARGO_INCREMENTAL=0` (incremental
/// artefacts are wasted work on a clean CI checkout). The variable is set per command because
/// `std::env::set_var` is `unsafe` in edition 2024 and the workspace denies `unsafe_code`.
///
/// It leaves out what cargo set for this process when `cargo xtask` ran it (`CARGO_MANIFEST_DIR` and the
/// like): see [`cargo_env`], which this crate includes from `test-support` (it has no dependency on it).
pub fn cargo() -> Command {
    let mut cmd = cargo_env::command();
    if on_ci() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

/// Whether we run on CI, i.e. the environment has `CI=true`.
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// The command line of `cmd` as a shell would show it, with the environment variables it sets first.
pub fn display(cmd: &Command) -> String {
    let mut words: Vec<String> = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            words.push(format!("{}={}", key.to_string_lossy(), value.to_string_lossy()));
        }
    }
    words.push(cmd.get_program().to_string_lossy().into_owned());
    words.extend(cmd.get_args().map(|arg| arg.to_string_lossy().into_owned()));
    words.join(" ")
}

/// Echoes `cmd` as `$ <command line>`, runs it with inherited stdio and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = display(cmd);
    println!("$ {line}");
    let status = cmd.status().with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Echoes `cmd` as `$ <command line>` and runs it with stdin and stderr inherited and stdout passed through
/// line by line as it comes (so a long run shows its progress) and also collected. Returns the exit status
/// and the collected stdout; the caller decides what a failure means (it may want the output either way).
pub fn run_capturing(cmd: &mut Command) -> anyhow::Result<(ExitStatus, String)> {
    let line = display(cmd);
    println!("$ {line}");
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot start `{line}`"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut collected = String::new();
    for text in BufReader::new(stdout).lines() {
        match text {
            Ok(text) => {
                println!("{text}");
                collected.push_str(&text);
                collected.push('\n');
            }
            Err(error) => {
                // Not UTF-8, or the pipe broke: stop reading, but still reap the child.
                let _ = child.kill();
                let _ = child.wait();
                bail!("cannot read the output of `{line}`: {error}");
            }
        }
    }
    let status = child.wait().with_context(|| format!("cannot wait for `{line}`"))?;
    Ok((status, collected))
}

/// Whether `cmd` runs and exits successfully, with its output discarded (for probing tools).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The trimmed stdout of `cmd` if it runs and succeeds (for `uname`, `nproc`, `date`).
pub fn output(cmd: &mut Command) -> Option<String> {
    let output = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
