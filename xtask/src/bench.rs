//! `cargo xtask bench [GROUP...]`: runs the benchmark groups and collects their figures into one report.
//!
//! A group is a `[[bench]] name = "<group>" harness = false` target of its crate, in
//! `crates/<crate>/benches/<group>.rs`, run in release by `cargo bench -p <crate> --bench <group> --locked`.
//! Its stdout is streamed through, and every line of the form
//! `bench <name>: <value> <unit> (baseline <value> <unit>, ratio <r>)` (the parenthesis optional) is
//! collected. At the end the collected lines are printed again and written as a markdown table, with the
//! machine and the date, to `bench.md` in the target directory (`$CARGO_TARGET_DIR`, else `target/`).
//! A group whose file does not exist yet is reported and skipped; a group whose process fails makes the
//! task fail after the other groups ran.
//!
//! Not here: the measurements themselves, or judging them against DESIGN §6's bars (each bench prints its
//! own ratio and warning, since it knows its bar).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};

use crate::cmd;

/// A benchmark group: a bench target named `name` in crate `krate`.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    /// The group, which is also the bench target's name.
    pub name: &'static str,
    /// The package whose `benches/` has it.
    pub krate: &'static str,
}

/// Every group, in the order `cargo xtask bench` runs them by default.
pub const GROUPS: &[Group] = &[
    Group { name: "frontiers", krate: "frontiers" },
    Group { name: "storage", krate: "storage" },
    Group { name: "compute", krate: "compute" },
    Group { name: "replica-client", krate: "replica-client" },
    Group { name: "controller", krate: "controller" },
    Group { name: "tpch", krate: "tpch" },
];

/// One collected `bench ...` line, split into its fields (kept as printed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    /// The group that printed it.
    pub group: String,
    /// The measurement's name, e.g. `frontiers.hold_cycle_10k`.
    pub name: String,
    /// The figure.
    pub value: String,
    /// Its unit.
    pub unit: String,
    /// The baseline figure and unit it is compared with, if any.
    pub baseline: Option<(String, String)>,
    /// The ratio to the baseline, if any.
    pub ratio: Option<String>,
}

/// Parses `bench <name>: <value> <unit>` with an optional ` (baseline <value> <unit>, ratio <r>)`;
/// `None` if `line` does not have that form.
pub fn parse_line(group: &str, line: &str) -> Option<Measurement> {
    let (name, rest) = line.strip_prefix("bench ")?.split_once(": ")?;
    let (figure, comparison) = match rest.split_once(" (") {
        Some((figure, comparison)) => (figure, Some(comparison.strip_suffix(')')?)),
        None => (rest, None),
    };
    let (value, unit) = value_and_unit(figure)?;
    let (baseline, ratio) = match comparison {
        None => (None, None),
        Some(comparison) => {
            let (baseline, ratio) = comparison.split_once(", ")?;
            let baseline = value_and_unit(baseline.strip_prefix("baseline ")?)?;
            let ratio = ratio.strip_prefix("ratio ")?.trim();
            ratio.parse::<f64>().ok()?;
            (Some(baseline), Some(ratio.to_owned()))
        }
    };
    if name.trim().is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    Some(Measurement { group: group.to_owned(), name: name.to_owned(), value, unit, baseline, ratio })
}

fn value_and_unit(text: &str) -> Option<(String, String)> {
    let mut words = text.split_whitespace();
    let (value, unit) = (words.next()?, words.next()?);
    if words.next().is_some() || value.parse::<f64>().is_err() {
        return None;
    }
    Some((value.to_owned(), unit.to_owned()))
}

/// Runs `groups` (names from [`GROUPS`]) and writes the report; fails if any group's process failed.
pub fn run(root: &Path, groups: &[String]) -> anyhow::Result<()> {
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut not_built = Vec::new();
    let mut failed = Vec::new();
    for name in groups {
        let group =
            GROUPS.iter().find(|g| g.name == name).with_context(|| format!("unknown group {name}"))?;
        let file = format!("crates/{}/benches/{}.rs", group.krate, group.name);
        if !root.join(&file).is_file() {
            println!("bench group {name}: not built yet ({file} missing)");
            not_built.push(name.as_str());
            continue;
        }
        let mut command = cmd::cargo();
        command.args(["bench", "--package", group.krate, "--bench", group.name, "--locked"]);
        println!("$ {}", cmd::display(&command));
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{}`", cmd::display(&command)))?;
        let stdout = child.stdout.take().context("the bench's stdout is piped")?;
        for line in BufReader::new(stdout).lines() {
            let line = line.context("cannot read the bench's output")?;
            println!("{line}");
            if line.starts_with("bench ") {
                lines.push((name.clone(), line));
            }
        }
        let status = child.wait().context("cannot wait for the bench")?;
        if !status.success() {
            println!("bench group {name}: FAILED ({status})");
            failed.push(name.as_str());
        }
    }

    println!("\nbench results:");
    for (_, line) in &lines {
        println!("{line}");
    }
    if lines.is_empty() {
        println!("(none)");
    }
    let report = report(&lines, groups, &not_built, &failed);
    let path = target_dir(root).join("bench.md");
    std::fs::create_dir_all(path.parent().unwrap_or(root))?;
    std::fs::write(&path, report).with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());

    if !failed.is_empty() {
        bail!("bench group(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The target directory, as cargo would pick it (`$CARGO_TARGET_DIR`, relative to the root, else `target`).
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn report(lines: &[(String, String)], groups: &[String], not_built: &[&str], failed: &[&str]) -> String {
    let cores = cmd::output(&mut std::process::Command::new("nproc")).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or_else(|_| "?".to_owned(), |n| n.to_string())
    });
    let uname = cmd::output(std::process::Command::new("uname").arg("-srm")).unwrap_or_else(|| "?".into());
    let date = cmd::output(std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M:%S UTC"]))
        .unwrap_or_else(|| "?".into());
    let mut out = String::new();
    out.push_str("# Benchmarks\n\n");
    out.push_str(&format!("- machine: {cores} cores (`nproc`), {uname} (`uname -srm`)\n"));
    out.push_str(&format!("- date: {date}\n"));
    out.push_str(&format!("- groups: {}\n", groups.join(", ")));
    if !not_built.is_empty() {
        out.push_str(&format!("- not built yet: {}\n", not_built.join(", ")));
    }
    if !failed.is_empty() {
        out.push_str(&format!("- FAILED: {}\n", failed.join(", ")));
    }
    out.push_str("\n| group | name | value | unit | baseline | ratio |\n|---|---|---|---|---|---|\n");
    let mut unparsed = Vec::new();
    for (group, line) in lines {
        match parse_line(group, line) {
            Some(m) => {
                let baseline = m.baseline.map(|(value, unit)| format!("{value} {unit}")).unwrap_or_default();
                let ratio = m.ratio.unwrap_or_default();
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {baseline} | {ratio} |\n",
                    m.group, m.name, m.value, m.unit
                ));
            }
            None => unparsed.push(format!("- {group}: `{line}`\n")),
        }
    }
    if !unparsed.is_empty() {
        out.push_str(
            "\nLines that do not have the form `bench <name>: <value> <unit> (baseline ..., ratio ...)`:\n\n",
        );
        out.extend(unparsed);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(
        name: &str,
        value: &str,
        unit: &str,
        baseline: Option<(&str, &str)>,
        ratio: Option<&str>,
    ) -> Measurement {
        Measurement {
            group: "g".into(),
            name: name.into(),
            value: value.into(),
            unit: unit.into(),
            baseline: baseline.map(|(v, u)| (v.into(), u.into())),
            ratio: ratio.map(Into::into),
        }
    }

    #[test]
    fn bench_lines_parse_into_their_fields() {
        let cases = [
            (
                "bench frontiers.hold_cycle_100: 81.2 ns",
                Some(m("frontiers.hold_cycle_100", "81.2", "ns", None, None)),
            ),
            (
                "bench frontiers.hold_cycle_10k: 120.5 ns (baseline 81.2 ns, ratio 1.48)",
                Some(m("frontiers.hold_cycle_10k", "120.5", "ns", Some(("81.2", "ns")), Some("1.48"))),
            ),
            (
                "bench peek.p99: 0.9 ms (baseline 1 ms, ratio 0.9)",
                Some(m("peek.p99", "0.9", "ms", Some(("1", "ms")), Some("0.9"))),
            ),
            ("bench x: fast", None),
            ("bench x: 1.0", None),
            ("bench x: 1.0 ns extra", None),
            ("bench x: 1.0 ns (baseline 2 ns)", None),
            ("bench x: 1.0 ns (baseline 2 ns, ratio big)", None),
            ("bench x y: 1.0 ns", None),
            ("benchmark x: 1.0 ns", None),
        ];
        for (line, expected) in cases {
            assert_eq!(parse_line("g", line), expected, "parsing `{line}`");
        }
    }

    #[test]
    fn the_report_is_a_markdown_table_with_every_line() {
        let lines = vec![
            ("frontiers".to_owned(), "bench a: 1 ns".to_owned()),
            ("frontiers".to_owned(), "bench b: 2 ns (baseline 1 ns, ratio 2.00)".to_owned()),
            ("frontiers".to_owned(), "bench c: odd".to_owned()),
        ];
        let report = report(&lines, &["frontiers".into(), "storage".into()], &["storage"], &[]);
        assert!(report.contains("| frontiers | a | 1 | ns |  |  |\n"), "{report}");
        assert!(report.contains("| frontiers | b | 2 | ns | 1 ns | 2.00 |\n"), "{report}");
        assert!(report.contains("- frontiers: `bench c: odd`"), "{report}");
        assert!(report.contains("- not built yet: storage"), "{report}");
        assert!(report.contains("- machine: "), "{report}");
    }
}
