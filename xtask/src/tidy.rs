//! `cargo xtask tidy`: the repository's own rules, checked textually over the sources and against
//! `cargo metadata`. The `tidy` step of `test-suite` calls [`check`]; `cargo test -p xtask` runs the same
//! checks as the test `the_repository_passes_tidy` at the bottom of this file (rust-analyzer's pattern).
//!
//! The rules, each reported as `path:line: message`:
//! - every `.rs` file under `crates/*/src`, `crates/*/tests`, `crates/*/benches` and `xtask/src` starts with a
//!   `//!` doc comment on its first line (no blank line or inner attribute before it) saying what it is;
//! - workspace crates depend on each other only as DESIGN §4 allows: the table is [`LAYERS`], the one place
//!   it lives, checked against `cargo metadata --no-deps`; a crate missing from the table is an error too;
//! - no ignored or should-panic tests, no `dbg!` and no `todo!`, anywhere (STYLE 10);
//! - no hard-coded proptest case counts (`with_cases`): `PROPTEST_CASES` decides (STYLE, "proptest pitfall");
//! - no printing macros in library crates' `src/` (everything but `sim` and `xtask`, and except `main.rs`
//!   and files under `src/bin/`), unless the line says `// tidy: allow-print`.
//!
//! **Not here:** parsing Rust. The checks are textual, so they also see comments and strings; write the
//! banned words differently in prose. This file builds its own needles by concatenation so that it does not
//! trip over itself.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cmd;

/// One row of DESIGN §4's dependency table: which workspace crates `krate` may depend on.
#[derive(Debug, Clone, Copy)]
pub struct Layer {
    /// The package name.
    pub krate: &'static str,
    /// Workspace crates allowed as normal and build dependencies.
    pub deps: &'static [&'static str],
    /// Workspace crates allowed as dev-dependencies in addition to `deps` (and to the crate itself, which a
    /// crate may dev-depend on to enable features for its own tests).
    pub extra_dev_deps: &'static [&'static str],
}

/// DESIGN §4's table of allowed edges between workspace crates. Change it only together with DESIGN.md.
pub const LAYERS: &[Layer] = &[
    Layer { krate: "frontiers", deps: &[], extra_dev_deps: &["test-support"] },
    Layer { krate: "protocol", deps: &["frontiers"], extra_dev_deps: &[] },
    // A process's metrics (DESIGN §10): series that remove themselves and the `/metrics` endpoint. It knows
    // no other workspace crate; every process crate uses it.
    Layer { krate: "telemetry", deps: &[], extra_dev_deps: &[] },
    // What tests and benchmarks share (a seeded RNG, loopback baselines, an allocation counter, process
    // memory, proptest settings): a dev-dependency only, knowing no workspace crate.
    Layer { krate: "test-support", deps: &[], extra_dev_deps: &[] },
    // Framed tokio connections over `protocol::frame` (later TLS, authentication and connection bounds):
    // the async half `protocol` must not have, shared by every socket shell.
    Layer { krate: "transport", deps: &["protocol"], extra_dev_deps: &[] },
    Layer {
        krate: "storage",
        deps: &["protocol", "frontiers", "transport", "telemetry"],
        extra_dev_deps: &["test-support"],
    },
    Layer {
        krate: "compute",
        deps: &["protocol", "frontiers", "storage", "transport", "telemetry"],
        extra_dev_deps: &["test-support"],
    },
    Layer {
        krate: "replica-client",
        deps: &["protocol", "frontiers", "transport"],
        extra_dev_deps: &["test-support"],
    },
    Layer {
        krate: "controller",
        deps: &["frontiers", "protocol", "transport", "storage", "replica-client", "telemetry"],
        // The controller's tests run against real, in-process replicas.
        extra_dev_deps: &["compute", "test-support"],
    },
    Layer {
        // TPC-H's data, queries and SQLite oracle, and a runner that drives a replica through the
        // controller (so the tests, the benchmark and the cluster scenario share it).
        krate: "tpch",
        deps: &["frontiers", "protocol", "transport", "storage", "compute", "controller"],
        extra_dev_deps: &["test-support"],
    },
    Layer {
        krate: "sim",
        deps: &[
            "frontiers",
            "protocol",
            "transport",
            "storage",
            "compute",
            "replica-client",
            "controller",
            "tpch",
            "telemetry",
        ],
        extra_dev_deps: &[],
    },
    Layer { krate: "xtask", deps: &[], extra_dev_deps: &[] },
];

/// Which rule a [`Violation`] breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The file does not start with a `//!` doc comment.
    ModuleDoc,
    /// An ignored or should-panic test, `dbg!` or `todo!`.
    Banned,
    /// A hard-coded proptest case count.
    WithCases,
    /// A printing macro in library code.
    Print,
    /// A dependency DESIGN §4 does not allow.
    Dependency,
    /// A workspace crate that [`LAYERS`] does not list.
    UnknownCrate,
}

/// One broken rule at one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The file, relative to the project root, with `/` separators.
    pub path: String,
    /// The 1-based line.
    pub line: usize,
    /// The rule broken.
    pub rule: Rule,
    /// What is wrong and what to do instead.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path, self.line, self.message)
    }
}

/// A string that must not appear as a token (not preceded or followed by an identifier character where
/// the needle itself starts or ends with one).
struct Needle {
    text: &'static str,
    rule: Rule,
    why: &'static str,
}

/// Banned everywhere. Built by concatenation so that this file does not contain them.
const BANNED: &[Needle] = &[
    Needle {
        text: concat!("#[", "ignore"),
        rule: Rule::Banned,
        why: "no ignored tests (STYLE 10): fix or delete the test",
    },
    Needle {
        text: concat!("#[", "should_panic"),
        rule: Rule::Banned,
        why: "no should-panic tests (STYLE 10): test an error value, or the invariant another way",
    },
    Needle { text: concat!("dbg", "!("), rule: Rule::Banned, why: "debugging output must not be committed" },
    Needle { text: concat!("todo", "!("), rule: Rule::Banned, why: "unfinished code must not be committed" },
    Needle {
        text: concat!("with_", "cases("),
        rule: Rule::WithCases,
        why: "it overrides PROPTEST_CASES: build the config with `..Config::default()` from the environment",
    },
];

/// Banned in library `src/`.
const PRINTS: &[Needle] = &[
    Needle { text: concat!("print", "ln!("), rule: Rule::Print, why: "" },
    Needle { text: concat!("eprint", "ln!("), rule: Rule::Print, why: "" },
    Needle { text: concat!("print", "!("), rule: Rule::Print, why: "" },
    Needle { text: concat!("eprint", "!("), rule: Rule::Print, why: "" },
];

/// A line containing this may print in library code.
pub const ALLOW_PRINT: &str = concat!("// tidy: ", "allow-print");

/// Runs every check over the repository at `root`, prints the violations and fails if there are any.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let violations = violations(root)?;
    if violations.is_empty() {
        println!("tidy: ok");
        return Ok(());
    }
    for violation in &violations {
        println!("{violation}");
    }
    bail!("tidy found {} violation(s); each is listed above as path:line: message", violations.len())
}

/// Every violation in the repository at `root`: the source checks over [`source_files`], then the
/// dependency check over `cargo metadata`.
pub fn violations(root: &Path) -> anyhow::Result<Vec<Violation>> {
    let mut violations = Vec::new();
    for path in source_files(root)? {
        let text =
            std::fs::read_to_string(root.join(&path)).with_context(|| format!("cannot read {path}"))?;
        violations.extend(check_source(&path, &text));
    }
    let metadata = cargo_metadata(root)?;
    violations.extend(check_dependencies(root, &metadata, &|path| std::fs::read_to_string(path).ok()));
    Ok(violations)
}

/// The `.rs` files tidy checks, relative to `root` with `/` separators, sorted: everything under
/// `crates/*/src`, `crates/*/tests`, `crates/*/benches` and `xtask/src`.
pub fn source_files(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut dirs = Vec::new();
    let crates = root.join("crates");
    for entry in std::fs::read_dir(&crates).with_context(|| format!("cannot list {}", crates.display()))? {
        let crate_dir = entry?.path();
        for sub in ["src", "tests", "benches"] {
            dirs.push(crate_dir.join(sub));
        }
    }
    dirs.push(root.join("xtask").join("src"));
    let mut files = Vec::new();
    for dir in dirs {
        collect_rs(&dir, &mut files)?;
    }
    let mut relative: Vec<String> = files
        .iter()
        .map(|file| {
            let path = file.strip_prefix(root).unwrap_or(file);
            path.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
        })
        .collect();
    relative.sort();
    Ok(relative)
}

fn collect_rs(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_rs(&path, files)?;
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    Ok(())
}

/// The source rules for one file: `path` is relative to the project root (it decides whether the print
/// rule applies), `text` its contents.
pub fn check_source(path: &str, text: &str) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut report = |line: usize, rule: Rule, message: String| {
        violations.push(Violation { path: path.to_owned(), line, rule, message });
    };

    let doc = "the file must start with a `//!` doc comment saying what it is and what it is not";
    match text.lines().next() {
        Some(first) if first.starts_with("//!") => {}
        Some(first) if first.trim().is_empty() => {
            report(1, Rule::ModuleDoc, format!("{doc}; remove the blank line(s) before it"));
        }
        Some(first) => report(1, Rule::ModuleDoc, format!("{doc}, found `{}`", first.trim())),
        None => report(1, Rule::ModuleDoc, format!("{doc}; the file is empty")),
    }

    let library = is_library_source(path);
    for (index, line) in text.lines().enumerate() {
        for needle in BANNED {
            if contains_token(line, needle.text) {
                report(index + 1, needle.rule, format!("`{}` is banned: {}", needle.text, needle.why));
            }
        }
        if library && !line.contains(ALLOW_PRINT) {
            for needle in PRINTS {
                if contains_token(line, needle.text) {
                    report(
                        index + 1,
                        needle.rule,
                        format!(
                            "`{}` in library code: log with tracing, or return the text; \
                             if printing is really meant, end the line with `{ALLOW_PRINT}`",
                            needle.text
                        ),
                    );
                }
            }
        }
    }
    violations
}

/// Whether the print rule applies to `path`: `crates/<c>/src/...` for every crate but `sim`, except
/// `main.rs` files and files under a `bin/` directory.
fn is_library_source(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    parts.len() >= 4
        && parts[0] == "crates"
        && parts[1] != "sim"
        && parts[2] == "src"
        && !path.contains("/bin/")
        && parts.last() != Some(&"main.rs")
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `needle` occurs in `line` as a token: where the needle starts (ends) with an identifier
/// character, the character before (after) the occurrence must not be one.
fn contains_token(line: &str, needle: &str) -> bool {
    let starts_ident = needle.chars().next().is_some_and(is_ident);
    let ends_ident = needle.chars().last().is_some_and(is_ident);
    line.match_indices(needle).any(|(at, _)| {
        let before_ok = !starts_ident || !line[..at].chars().next_back().is_some_and(is_ident);
        let after_ok = !ends_ident || !line[at + needle.len()..].chars().next().is_some_and(is_ident);
        before_ok && after_ok
    })
}

fn cargo_metadata(root: &Path) -> anyhow::Result<Value> {
    let mut command = cmd::cargo();
    command.args(["metadata", "--format-version", "1", "--no-deps"]).current_dir(root);
    let output = command.stderr(Stdio::inherit()).output().context("cannot run cargo metadata")?;
    if !output.status.success() {
        bail!("`{}` failed ({})", cmd::display(&command), output.status);
    }
    serde_json::from_slice(&output.stdout).context("cannot parse the output of cargo metadata")
}

/// The dependency rule over `metadata` (the JSON of `cargo metadata --format-version 1 --no-deps`, whose
/// packages are exactly the workspace members). `read_manifest` reads a `Cargo.toml`, to name the line.
pub fn check_dependencies(
    root: &Path,
    metadata: &Value,
    read_manifest: &dyn Fn(&Path) -> Option<String>,
) -> Vec<Violation> {
    let no_packages = Vec::new();
    let packages = metadata["packages"].as_array().unwrap_or(&no_packages);
    let workspace: BTreeSet<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut violations = Vec::new();
    for package in packages {
        let name = package["name"].as_str().unwrap_or("?");
        let manifest = PathBuf::from(package["manifest_path"].as_str().unwrap_or("Cargo.toml"));
        let path = manifest.strip_prefix(root).unwrap_or(&manifest).to_string_lossy().replace('\\', "/");
        let Some(layer) = LAYERS.iter().find(|layer| layer.krate == name) else {
            violations.push(Violation {
                path,
                line: 1,
                rule: Rule::UnknownCrate,
                message: format!(
                    "workspace crate `{name}` is not in the dependency table `LAYERS` of xtask/src/tidy.rs: \
                     add its row there as DESIGN §4 says (and add it to DESIGN §4 if it is new)"
                ),
            });
            continue;
        };
        let manifest_text = read_manifest(&manifest).unwrap_or_default();
        for dep in package["dependencies"].as_array().unwrap_or(&no_packages) {
            let dep_name = dep["name"].as_str().unwrap_or("?");
            if !workspace.contains(dep_name) || !dep["source"].is_null() {
                continue; // Not a workspace crate.
            }
            let kind = dep["kind"].as_str();
            let allowed = match kind {
                Some("dev") => {
                    dep_name == name
                        || layer.deps.contains(&dep_name)
                        || layer.extra_dev_deps.contains(&dep_name)
                }
                _ => layer.deps.contains(&dep_name),
            };
            if allowed {
                continue;
            }
            let key = dep["rename"].as_str().unwrap_or(dep_name);
            let mut allowed_list: Vec<&str> = layer.deps.to_vec();
            if kind == Some("dev") {
                allowed_list.extend(layer.extra_dev_deps);
            }
            let allowed_text =
                if allowed_list.is_empty() { "none".to_owned() } else { allowed_list.join(", ") };
            violations.push(Violation {
                path: path.clone(),
                line: manifest_line(&manifest_text, key, kind),
                rule: Rule::Dependency,
                message: format!(
                    "`{name}` must not depend on `{dep_name}` ({} dependency): DESIGN §4 allows {allowed_text} \
                     (table `LAYERS` in xtask/src/tidy.rs)",
                    kind.unwrap_or("normal")
                ),
            });
        }
    }
    violations
}

/// The 1-based line of `Cargo.toml` text that declares dependency `key` of `kind` (`None` normal, `"dev"`,
/// `"build"`), in `[dependencies]`-style tables (also `target.*` ones) or as a `[dependencies.key]` table;
/// 1 when not found.
fn manifest_line(text: &str, key: &str, kind: Option<&str>) -> usize {
    let table = match kind {
        Some("dev") => ["dev-dependencies", "dev_dependencies"],
        Some("build") => ["build-dependencies", "build_dependencies"],
        _ => ["dependencies", "dependencies"],
    };
    let is_table = |header: &str| table.iter().any(|t| header == *t || header.ends_with(&format!(".{t}")));
    let mut section = String::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            section = header.trim_end_matches(']').trim().to_owned();
            if let Some((parent, name)) = section.rsplit_once('.')
                && is_table(parent)
                && name.trim_matches('"') == key
            {
                return index + 1;
            }
            continue;
        }
        if is_table(&section)
            && let Some(rest) = line.strip_prefix(key).or_else(|| {
                line.strip_prefix('"').and_then(|l| l.strip_prefix(key)).and_then(|l| l.strip_prefix('"'))
            })
            && (rest.trim_start().starts_with('=') || rest.starts_with('.'))
        {
            return index + 1;
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::project_root;
    use serde_json::json;

    #[test]
    fn the_repository_passes_tidy() {
        let violations = violations(&project_root()).unwrap();
        let listing: Vec<String> = violations.iter().map(ToString::to_string).collect();
        assert!(violations.is_empty(), "tidy violations:\n{}", listing.join("\n"));
    }

    /// A path, a source text, and the expected `(rule, line)` of every violation, in order.
    type SourceCase = (&'static str, &'static str, Vec<(Rule, usize)>);

    #[test]
    fn source_checks_report_exactly_the_expected_violations() {
        use Rule::*;
        let cases: Vec<SourceCase> = vec![
            ("crates/a/src/lib.rs", "//! Doc.\nfn f() {}\n", vec![]),
            ("crates/a/src/lib.rs", "\n//! Doc after a blank line.\n", vec![(ModuleDoc, 1)]),
            ("crates/a/src/lib.rs", "#![forbid(missing_docs)]\n//! Doc.\n", vec![(ModuleDoc, 1)]),
            ("crates/a/src/lib.rs", "/// Item doc, not a module doc.\nfn f() {}\n", vec![(ModuleDoc, 1)]),
            ("crates/a/src/lib.rs", "", vec![(ModuleDoc, 1)]),
            ("crates/a/src/lib.rs", "//! Doc.\n#![forbid(missing_docs)]\n", vec![]),
            (
                "crates/a/tests/it/main.rs",
                concat!("//! T.\n#[test]\n#[", "ignore]\nfn t() {}\n"),
                vec![(Banned, 3)],
            ),
            ("crates/a/tests/it/main.rs", concat!("//! T.\n#[", "ignore = \"slow\"]\n"), vec![(Banned, 2)]),
            (
                "crates/a/src/lib.rs",
                concat!("//! T.\n#[", "should_panic(expected = \"x\")]\n"),
                vec![(Banned, 2)],
            ),
            ("crates/a/src/lib.rs", concat!("//! T.\n#[", "ignored_attr]\n"), vec![]),
            ("xtask/src/x.rs", concat!("//! T.\nlet x = db", "g!(1);\n"), vec![(Banned, 2)]),
            ("crates/sim/src/main.rs", concat!("//! T.\nfn f() { to", "do!() }\n"), vec![(Banned, 2)]),
            ("crates/a/src/lib.rs", concat!("//! T.\nfn f() { my_to", "do!() }\n"), vec![]),
            (
                "crates/a/src/hold.rs",
                concat!("//! T.\nproptest! { #![proptest_config(Config::with_", "cases(8))] }\n"),
                vec![(WithCases, 2)],
            ),
            ("crates/a/src/lib.rs", concat!("//! T.\nfn f() { ", "println!(\"x\") }\n"), vec![(Print, 2)]),
            (
                "crates/a/src/lib.rs",
                concat!("//! T.\n", "eprintln!(\"x\");\n", "eprint!(\"y\");\n"),
                vec![(Print, 2), (Print, 3)],
            ),
            ("crates/a/src/x/y.rs", concat!("//! T.\n", "print!(\"x\");\n"), vec![(Print, 2)]),
            (
                "crates/a/src/lib.rs",
                concat!("//! T.\n", "println!(\"x\"); // tidy: ", "allow-print\n"),
                vec![],
            ),
            ("crates/a/src/main.rs", concat!("//! T.\n", "println!(\"x\");\n"), vec![]),
            ("crates/a/src/bin/tool.rs", concat!("//! T.\n", "println!(\"x\");\n"), vec![]),
            ("crates/sim/src/report.rs", concat!("//! T.\n", "println!(\"x\");\n"), vec![]),
            ("crates/a/tests/it/main.rs", concat!("//! T.\n", "println!(\"x\");\n"), vec![]),
            ("crates/a/benches/a.rs", concat!("//! T.\n", "println!(\"x\");\n"), vec![]),
            ("xtask/src/lib.rs", concat!("//! T.\n", "println!(\"x\");\n"), vec![]),
            ("crates/a/src/lib.rs", "//! T.\nwriteln!(out, \"x\")?;\n", vec![]),
            (
                "crates/a/src/lib.rs",
                concat!("#[", "ignore]\n", "db", "g!(", "println!(\"x\"));\n"),
                vec![(ModuleDoc, 1), (Banned, 1), (Banned, 2), (Print, 2)],
            ),
        ];
        for (path, source, expected) in cases {
            let found: Vec<(Rule, usize)> =
                check_source(path, source).iter().map(|v| (v.rule, v.line)).collect();
            assert_eq!(found, expected, "checking {path}:\n{source}");
        }
    }

    #[test]
    fn violations_name_the_file_and_line() {
        let violation = &check_source("crates/a/src/lib.rs", concat!("//! T.\n\n", "to", "do!()\n"))[0];
        assert_eq!(violation.to_string().split(": ").next(), Some("crates/a/src/lib.rs:3"));
    }

    /// Metadata with every crate of [`LAYERS`] (plus `extra`) as a workspace package, where `package`
    /// has the single dependency `dep` of `kind` (from the registry when `external`).
    fn metadata(package: &str, dep: &str, kind: Option<&str>, external: bool, extra: &[&str]) -> Value {
        let names: BTreeSet<&str> = LAYERS.iter().map(|l| l.krate).chain(extra.iter().copied()).collect();
        let packages: Vec<Value> = names
            .iter()
            .map(|name| {
                let dependencies = if *name == package {
                    let source = if external {
                        json!("registry+https://github.com/rust-lang/crates.io-index")
                    } else {
                        Value::Null
                    };
                    vec![json!({ "name": dep, "kind": kind, "source": source, "rename": null })]
                } else {
                    vec![]
                };
                json!({
                    "name": name,
                    "manifest_path": format!("/repo/crates/{name}/Cargo.toml"),
                    "dependencies": dependencies,
                })
            })
            .collect();
        json!({ "packages": packages })
    }

    /// Package, dependency, kind, whether the dependency comes from a registry, and the expected
    /// violations' rules.
    type DependencyCase = (&'static str, &'static str, Option<&'static str>, bool, Vec<Rule>);

    #[test]
    fn dependency_check_follows_the_design_table() {
        use Rule::*;
        let cases: Vec<DependencyCase> = vec![
            ("protocol", "frontiers", None, false, vec![]),
            ("storage", "protocol", None, false, vec![]),
            ("storage", "compute", None, false, vec![Dependency]),
            ("compute", "storage", None, false, vec![]),
            ("compute", "controller", None, false, vec![Dependency]),
            ("replica-client", "storage", None, false, vec![Dependency]),
            ("controller", "replica-client", None, false, vec![]),
            ("controller", "compute", None, false, vec![Dependency]),
            ("controller", "compute", Some("dev"), false, vec![]),
            ("controller", "compute", Some("build"), false, vec![Dependency]),
            ("controller", "sim", Some("dev"), false, vec![Dependency]),
            ("frontiers", "protocol", Some("dev"), false, vec![Dependency]),
            ("frontiers", "protocol", None, false, vec![Dependency]),
            ("protocol", "protocol", Some("dev"), false, vec![]),
            ("storage", "compute", Some("dev"), false, vec![Dependency]),
            ("sim", "controller", None, false, vec![]),
            ("sim", "compute", None, false, vec![]),
            ("sim", "xtask", None, false, vec![Dependency]),
            ("xtask", "frontiers", None, false, vec![Dependency]),
            ("frontiers", "compute", None, true, vec![]),
            ("newcrate", "frontiers", None, false, vec![UnknownCrate]),
        ];
        for (package, dep, kind, external, expected) in cases {
            let metadata = metadata(package, dep, kind, external, &["newcrate"]);
            let found: Vec<Rule> = check_dependencies(Path::new("/repo"), &metadata, &|_| None)
                .into_iter()
                .filter(|v| v.rule != UnknownCrate || v.path == format!("crates/{package}/Cargo.toml"))
                .map(|v| v.rule)
                .collect();
            assert_eq!(found, expected, "{package} -> {dep} ({kind:?}, external: {external})");
        }
    }

    #[test]
    fn dependency_violations_point_at_the_manifest_line() {
        let manifest = "[package]\nname = \"controller\"\n\n[dependencies]\nfrontiers.workspace = true\n\
                        compute = { workspace = true }\n\n[dev-dependencies]\ncompute.workspace = true\n";
        let metadata = metadata("controller", "compute", None, false, &[]);
        let violations = check_dependencies(Path::new("/repo"), &metadata, &|path| {
            (path == Path::new("/repo/crates/controller/Cargo.toml")).then(|| manifest.to_owned())
        });
        assert_eq!(violations.len(), 1);
        assert_eq!((violations[0].path.as_str(), violations[0].line), ("crates/controller/Cargo.toml", 6));
    }

    /// Each case: manifest text, key, kind, expected line.
    #[test]
    fn manifest_line_finds_the_declaration_in_the_right_table() {
        let manifest = "[package]\nname = \"x\"\n[dependencies]\ncompute-extra = 1\ncompute.workspace = true\n\
                        [dev-dependencies]\n\"compute\" = { workspace = true }\n[dependencies.storage]\n\
                        workspace = true\n[target.'cfg(unix)'.build-dependencies]\nprotocol = { path = \"p\" }\n";
        let cases = [
            ("compute", None, 5),
            ("compute", Some("dev"), 7),
            ("storage", None, 8),
            ("protocol", Some("build"), 11),
            ("protocol", None, 1),
            ("frontiers", None, 1),
        ];
        for (key, kind, expected) in cases {
            assert_eq!(manifest_line(manifest, key, kind), expected, "{key} ({kind:?})");
        }
    }
}
