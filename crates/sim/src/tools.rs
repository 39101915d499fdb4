//! Outside tools that check what the system exposes: Prometheus' `promtool` validates a metrics
//! exposition, headless Chromium renders the report page and takes a screenshot. [`check_report`] runs
//! both on a `sim cluster --report DIR` directory (`sim check-report DIR`, the `cluster` step of
//! `cargo xtask test-suite`); `sim`'s `tests/it/observability.rs` uses them on live endpoints and on the
//! example page.
//!
//! **Installing.** A tool that is not on the `PATH` is installed from Debian's packages (`prometheus`,
//! `chromium`) with `apt-get` (as root, waiting up to two minutes for the package lock); if that fails the
//! caller gets an error naming the package. Nothing here skips: a check that cannot run fails, on CI
//! (`CI=true`) and everywhere else.
//!
//! **What the screenshot check covers.** That Chromium loads the page and draws it at the size asked
//! for, with the charts' colours present in it: the fault marks' red, the replica status bands' green,
//! and more than a few hundred distinct colours overall. It cannot tell whether a chart is *right*; the
//! page's structure is `html.rs`'s tests', and a person looks at the screenshot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Finds `binary` on the `PATH`, installing Debian package `package` first if it is missing.
pub fn ensure_tool(binary: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = find_on_path(binary) {
        return Ok(path);
    }
    let installed = Command::new("apt-get")
        .args(["-o", "DPkg::Lock::Timeout=120", "install", "-y", "-qq", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .output();
    match installed {
        Ok(output) if output.status.success() => {}
        Ok(output) => bail!(
            "`{binary}` is missing and `apt-get install {package}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(e) => {
            bail!("`{binary}` is missing and apt-get cannot run ({e}): install the `{package}` package")
        }
    }
    find_on_path(binary).with_context(|| format!("`{binary}` is still missing after installing `{package}`"))
}

fn find_on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(binary)).find(|candidate| candidate.is_file())
}

/// Runs `command` with `input` on its stdin, killing it after `timeout`; returns its combined output.
// Real processes, real time.
#[allow(clippy::disallowed_methods)]
fn run(mut command: Command, input: &[u8], timeout: Duration) -> anyhow::Result<(bool, String)> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).context("cannot write to the tool")?;
    }
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{command:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output()?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    Ok((output.status.success(), text))
}

/// `promtool check metrics` on a text exposition: `Ok` if it is valid (lint warnings included in
/// nothing: promtool's own rules about names and help decide), else its complaints.
pub fn promtool_check(exposition: &str) -> anyhow::Result<()> {
    let promtool = ensure_tool("promtool", "prometheus")?;
    let mut command = Command::new(promtool);
    command.args(["check", "metrics"]);
    let (ok, output) = run(command, exposition.as_bytes(), Duration::from_secs(60))?;
    if !ok {
        bail!("promtool check metrics: {}", output.trim());
    }
    Ok(())
}

/// What [`screenshot`] saw in its picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Screenshot {
    /// Pixels wide.
    pub width: u32,
    /// Pixels high.
    pub height: u32,
    /// Distinct colours.
    pub colours: usize,
    /// Pixels of the fault marks' red (220, 30, 30).
    pub fault_pixels: usize,
    /// Pixels of the `connected` status green (46, 160, 67).
    pub connected_pixels: usize,
}

/// Renders `page` in headless Chromium at `width` x `height` into `png`, and counts its colours.
pub fn screenshot(page: &Path, png: &Path, (width, height): (u32, u32)) -> anyhow::Result<Screenshot> {
    let chromium = ensure_tool("chromium", "chromium")?;
    let profile = tempfile_dir("sim-chromium")?;
    let page = page.canonicalize().with_context(|| format!("no page at {}", page.display()))?;
    let mut command = Command::new(chromium);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display()));
    let result = run(command, b"", Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(&profile);
    let (ok, output) = result?;
    if !ok || !png.is_file() {
        bail!("chromium took no screenshot of {}: {}", page.display(), output.trim());
    }
    count_colours(png)
}

/// A fresh directory under the system's temporary directory.
fn tempfile_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn count_colours(png: &Path) -> anyhow::Result<Screenshot> {
    let file = std::fs::File::open(png).with_context(|| format!("cannot open {}", png.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().context("not a PNG")?;
    let mut pixels = vec![0; reader.output_buffer_size().context("the PNG is too large")?];
    let info = reader.next_frame(&mut pixels).context("cannot decode the PNG")?;
    let channels = info.color_type.samples();
    if channels < 3 {
        bail!("a {:?} screenshot has no colours", info.color_type);
    }
    let mut colours = std::collections::BTreeSet::new();
    let (mut fault_pixels, mut connected_pixels) = (0, 0);
    for pixel in pixels[..info.buffer_size()].chunks_exact(channels) {
        let rgb = (pixel[0], pixel[1], pixel[2]);
        colours.insert(rgb);
        fault_pixels += usize::from(rgb == (220, 30, 30));
        connected_pixels += usize::from(rgb == (46, 160, 67));
    }
    Ok(Screenshot {
        width: info.width,
        height: info.height,
        colours: colours.len(),
        fault_pixels,
        connected_pixels,
    })
}

/// Checks `shot` against what a report page shows: the size asked for, the fault marks and the status
/// bands drawn, charts' worth of colours.
pub fn check_screenshot(shot: &Screenshot, (width, height): (u32, u32)) -> anyhow::Result<()> {
    if (shot.width, shot.height) != (width, height) {
        bail!("the screenshot is {}x{}, not {width}x{height}", shot.width, shot.height);
    }
    if shot.fault_pixels < 50 {
        bail!("the screenshot shows no fault marks ({} red pixels): {shot:?}", shot.fault_pixels);
    }
    if shot.connected_pixels < 500 {
        bail!(
            "the screenshot shows no replica status bands ({} green pixels): {shot:?}",
            shot.connected_pixels
        );
    }
    if shot.colours < 200 {
        bail!("the screenshot has only {} colours: no charts drawn? {shot:?}", shot.colours);
    }
    Ok(())
}

/// The size [`check_report`] renders a report page at: wide enough for a chart, tall enough for all four.
pub const REPORT_SCREENSHOT: (u32, u32) = (1000, 2200);

/// Checks a `sim cluster --report` directory: every `metrics/*.prom` passes `promtool check metrics`, and
/// `report.html` renders in Chromium ([`check_screenshot`]) into `report.png`. Returns a line per check.
pub fn check_report(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let metrics = dir.join("metrics");
    let mut scrapes: Vec<PathBuf> = std::fs::read_dir(&metrics)
        .with_context(|| format!("no scraped metrics in {}", metrics.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "prom"))
        .collect();
    scrapes.sort();
    if scrapes.is_empty() {
        bail!("no scraped metrics in {}", metrics.display());
    }
    for scrape in scrapes {
        let text =
            std::fs::read_to_string(&scrape).with_context(|| format!("cannot read {}", scrape.display()))?;
        promtool_check(&text).with_context(|| format!("{} is not a valid exposition", scrape.display()))?;
        done.push(format!(
            "promtool check metrics: {} ok ({} lines)",
            scrape.display(),
            text.lines().count()
        ));
    }
    let png = dir.join("report.png");
    let shot = screenshot(&dir.join("report.html"), &png, REPORT_SCREENSHOT)?;
    check_screenshot(&shot, REPORT_SCREENSHOT)?;
    done.push(format!(
        "chromium: {} ({}x{}, {} colours)",
        png.display(),
        shot.width,
        shot.height,
        shot.colours
    ));
    Ok(done)
}
