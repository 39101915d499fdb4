//! `sim cluster --report DIR`: the run as a page people can look at. [`write_report`] writes
//! `DIR/report.html` (a summary, the faults, and four charts over the timed run: peek latency
//! percentiles, wall-clock lag per collection, rows written per second and replica status, every one with
//! the injected faults marked as red dashed lines on its time axis, an outage as a shaded span to its end) and `DIR/report.json` (the report and
//! the timeline). The charts are SVG drawn by `plotters` and inlined, so the page needs no other file and
//! no script.
//!
//! **Not here:** the text report (printed by `report.rs` as before) and the data (`timeline.rs`).
//! **Tests:** below (the page's structure for a synthetic run); `sim`'s `tests/it/observability.rs`
//! renders it in headless Chromium and checks the screenshot; the `cluster` step of
//! `cargo xtask test-suite` writes it for a real run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;

use crate::cluster::report::{Outcome, Report, Stats};
use crate::cluster::timeline::{FaultKind, FaultMark, Timeline, TimelineSample};

/// Chart size, pixels.
const WIDTH: u32 = 960;
const HEIGHT: u32 = 280;
/// The fault marks' colour.
const FAULT: RGBColor = RGBColor(220, 30, 30);
/// The lines' colours (no red: that is the faults').
const LINES: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// What `report.json` holds.
#[derive(Serialize)]
struct JsonReport<'a> {
    report: &'a Report,
    timeline: &'a Timeline,
}

/// Writes `dir/report.html` and `dir/report.json` (creating `dir`); returns the page's path.
pub fn write_report(dir: &Path, timeline: &Timeline, report: &Report) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let page = dir.join("report.html");
    std::fs::write(&page, render(timeline, report)?)
        .with_context(|| format!("cannot write {}", page.display()))?;
    let json =
        serde_json::to_string_pretty(&JsonReport { report, timeline }).context("cannot render the JSON")?;
    std::fs::write(dir.join("report.json"), json).context("cannot write report.json")?;
    Ok(page)
}

/// The page.
pub fn render(timeline: &Timeline, report: &Report) -> anyhow::Result<String> {
    let end_s = timeline.end_s();
    let at = |pick: fn(&crate::cluster::timeline::TimelineSample) -> Option<f64>| -> Vec<(f64, f64)> {
        timeline.samples.iter().filter_map(|s| pick(s).map(|v| (s.at_s, v))).collect()
    };
    let latency = line_chart(
        "Peek latency over the last second",
        "milliseconds",
        vec![("p50".to_string(), at(|s| s.peek_p50_ms)), ("p99".to_string(), at(|s| s.peek_p99_ms))],
        &timeline.faults,
        end_s,
    )?;
    let mut lags: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for sample in &timeline.samples {
        for (collection, lag) in &sample.lag_s {
            lags.entry(collection.clone()).or_default().push((sample.at_s, *lag));
        }
    }
    let lag = line_chart(
        "Wall-clock lag per collection (slowest replica)",
        "seconds",
        lags.into_iter().collect(),
        &timeline.faults,
        end_s,
    )?;
    let rows = line_chart(
        "Rows written per second",
        "rows/s",
        vec![("rows/s".to_string(), at(|s| Some(s.rows_per_s)))],
        &timeline.faults,
        end_s,
    )?;
    let status = status_chart(timeline, end_s)?;

    let mut html = String::new();
    let outcome = serde_json::to_value(report.outcome).ok().and_then(|v| v.as_str().map(str::to_owned));
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>sim cluster report</title>\
         <style>body{{font-family:sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}h2{{margin-top:28px}}\
         .fault{{color:#dc1e1e}}</style></head><body>\n<h1>sim cluster: {}</h1>\n",
        escape(outcome.as_deref().unwrap_or("?"))
    );
    summary(&mut html, report);
    faults(&mut html, &timeline.faults);
    for (title, svg) in [
        ("Peek latency", latency),
        ("Wall-clock lag", lag),
        ("Rows written", rows),
        ("Replica status", status),
    ] {
        let _ = write!(html, "<h2>{title}</h2>\n<div class=\"chart\">{svg}</div>\n");
    }
    html.push_str("</body></html>\n");
    Ok(html)
}

fn summary(html: &mut String, report: &Report) {
    let rows: Vec<(&str, String)> = vec![
        ("seed", report.seed.to_string()),
        ("timed run", format!("{:.1} s", report.duration_s)),
        (
            "replicas",
            report
                .replicas
                .iter()
                .map(|r| format!("{} ({} processes)", r.replica, r.processes))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("rows written", format!("{} ({:.0}/s)", report.rows_written, report.rows_per_second)),
        ("peeks checked", format!("{} ({:.0}/s)", report.peeks.checked, report.peeks.per_second)),
        (
            "peek latency",
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
                report.peeks.latency_ms.p50, report.peeks.latency_ms.p99, report.peeks.latency_ms.max
            ),
        ),
        ("subscribe batches checked", report.subscribe_batches.to_string()),
        ("violations", report.violation_count.to_string()),
    ];
    html.push_str("<table>\n");
    for (name, value) in rows {
        let _ = writeln!(html, "<tr><th>{name}</th><td>{}</td></tr>", escape(&value));
    }
    html.push_str("</table>\n");
    if let Some(error) = &report.error {
        let _ = writeln!(html, "<p class=\"fault\">error: {}</p>", escape(error));
    }
    for violation in &report.violations {
        let _ = writeln!(html, "<p class=\"fault\">violation: {}</p>", escape(violation));
    }
}

fn faults(html: &mut String, faults: &[FaultMark]) {
    html.push_str("<h2>Injected faults</h2>\n");
    if faults.is_empty() {
        html.push_str("<p>none</p>\n");
        return;
    }
    html.push_str("<table><tr><th>at</th><th>until</th><th>fault</th><th>target</th></tr>\n");
    for fault in faults {
        let _ = writeln!(
            html,
            "<tr class=\"fault\"><td>{:.1} s</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            fault.at_s,
            fault.until_s.map_or(String::new(), |until| format!("{until:.1} s")),
            fault.kind.name(),
            escape(&fault.target)
        );
    }
    html.push_str("</table>\n");
}

/// `text` with the characters HTML gives meaning to escaped.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            other => out.push(other),
        }
    }
    out
}

/// A plotters error, as text (its error types are not `Send`).
fn plot<T, E: std::fmt::Debug>(result: Result<T, E>) -> anyhow::Result<T> {
    result.map_err(|e| anyhow!("cannot draw a chart: {e:?}"))
}

/// Draws the faults as dashed vertical lines with their names, over `y` from `low` to `high`; one that
/// lasts (an outage) also shades its span.
fn draw_faults<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    faults: &[FaultMark],
    (low, high): (f64, f64),
) -> anyhow::Result<()> {
    for fault in faults {
        if let Some(until) = fault.until_s {
            let span = Rectangle::new([(fault.at_s, low), (until, high)], FAULT.mix(0.12).filled());
            plot(chart.draw_series(std::iter::once(span)))?;
        }
        let line = vec![(fault.at_s, low), (fault.at_s, high)];
        plot(chart.draw_series(DashedLineSeries::new(line, 6, 4, FAULT.stroke_width(2))))?;
        let label = format!("{} {}", fault.kind.name(), fault.target);
        let style = ("sans-serif", 12).into_font().color(&FAULT);
        plot(chart.draw_series(std::iter::once(Text::new(label, (fault.at_s, high), style))))?;
    }
    Ok(())
}

/// A chart of lines over the run's time, with the faults marked.
fn line_chart(
    title: &str,
    unit: &str,
    series: Vec<(String, Vec<(f64, f64)>)>,
    faults: &[FaultMark],
    end_s: f64,
) -> anyhow::Result<String> {
    let top = series.iter().flat_map(|(_, points)| points.iter().map(|(_, y)| *y)).fold(0.0, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        plot(root.fill(&WHITE))?;
        let mut chart = plot(
            ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..end_s, 0.0..top),
        )?;
        plot(chart.configure_mesh().x_desc("seconds into the run").y_desc(unit).draw())?;
        for (index, (name, points)) in series.into_iter().enumerate() {
            let color = LINES[index % LINES.len()];
            let drawn = plot(chart.draw_series(LineSeries::new(points, color.stroke_width(2))))?;
            drawn
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        draw_faults(&mut chart, faults, (0.0, top))?;
        plot(chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw())?;
        plot(root.present())?;
    }
    Ok(svg)
}

/// The colour of a replica status.
fn status_color(status: &str) -> RGBColor {
    match status {
        "connected" => RGBColor(46, 160, 67),
        "hydrating" | "rehydrating" => RGBColor(240, 170, 30),
        "connecting" => RGBColor(120, 140, 220),
        _ => RGBColor(200, 40, 40),
    }
}

/// One band per replica, coloured by its status at each sample, with the faults marked.
fn status_chart(timeline: &Timeline, end_s: f64) -> anyhow::Result<String> {
    let replicas: Vec<String> = {
        let mut all: Vec<String> = timeline.samples.iter().flat_map(|s| s.status.keys().cloned()).collect();
        all.sort();
        all.dedup();
        all
    };
    let bands = replicas.len().max(1) as f64;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        plot(root.fill(&WHITE))?;
        let (chart_area, legend_area) = root.split_vertically(HEIGHT - 28);
        let mut chart = plot(
            ChartBuilder::on(&chart_area)
                .caption(
                    "Replica status (green connected, amber (re)hydrating, blue connecting, red failed)",
                    ("sans-serif", 16),
                )
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..end_s, 0.0..bands),
        )?;
        plot(chart.configure_mesh().x_desc("seconds into the run").y_labels(0).disable_y_mesh().draw())?;
        for (row, replica) in replicas.iter().enumerate() {
            let row = row as f64;
            let cells = timeline.samples.windows(2).filter_map(|pair| {
                let status = pair[0].status.get(replica)?;
                let area = [(pair[0].at_s, row + 0.15), (pair[1].at_s, row + 0.85)];
                Some(Rectangle::new(area, status_color(status).filled()))
            });
            plot(chart.draw_series(cells))?;
            let name = Text::new(replica.clone(), (end_s * 0.005, row + 0.6), ("sans-serif", 14).into_font());
            plot(chart.draw_series(std::iter::once(name)))?;
        }
        draw_faults(&mut chart, &timeline.faults, (0.0, bands))?;
        legend(&legend_area)?;
        plot(root.present())?;
    }
    Ok(svg)
}

fn legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
    let mut x = 70;
    for status in ["connected", "hydrating", "rehydrating", "connecting", "failed"] {
        plot(area.draw(&Rectangle::new([(x, 8), (x + 14, 22)], status_color(status).filled())))?;
        plot(area.draw(&Text::new(status, (x + 18, 10), ("sans-serif", 12))))?;
        x += 120;
    }
    Ok(())
}

/// A made-up run of ten seconds (two collections, two replicas, one of them killed at 4 s and
/// rehydrating until 7 s, r1's links cut from 5 s to 6.5 s, a recreation at 7 s, a consensus outage from
/// 8 s to 9.5 s, a collection name that needs escaping): what the tests render, and what
/// [`write_example`] shows of the page's layout without a cluster run.
pub fn example_timeline() -> Timeline {
    let mut timeline = Timeline::default();
    for second in 0..=10 {
        let t = second as f64;
        let killed = (4..7).contains(&second);
        let status = BTreeMap::from([
            ("r1".to_string(), "connected".to_string()),
            ("r2".to_string(), if killed { "rehydrating" } else { "connected" }.to_string()),
        ]);
        timeline.sample(TimelineSample {
            at_s: t,
            peek_p50_ms: Some(1.0 + t / 10.0),
            peek_p99_ms: Some(if killed { 40.0 } else { 6.0 }),
            rows_per_s: 2_000.0,
            lag_s: BTreeMap::from([
                ("u1".to_string(), if killed { 3.0 } else { 0.4 }),
                ("u2<&>".to_string(), 0.2),
            ]),
            status,
        });
    }
    timeline.fault(4.0, FaultKind::Kill, "r2");
    let cut = timeline.fault(5.0, FaultKind::LinkCut, "r1");
    timeline.end_fault(cut, 6.5);
    timeline.fault(7.0, FaultKind::Recreation, "u3");
    let outage = timeline.fault(8.0, FaultKind::ConsensusOutage, "postgres");
    timeline.end_fault(outage, 9.5);
    timeline
}

/// Writes the page of [`example_timeline`] into `dir` (see [`write_report`]): the page's layout without a
/// cluster run, for the browser test and for a look.
pub fn write_example(dir: &Path) -> anyhow::Result<PathBuf> {
    let report = Report::new(&Stats::default(), Outcome::Passed, None, 7, 2_000, Vec::new());
    write_report(dir, &example_timeline(), &report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_a_chart_per_subject_each_marking_every_fault_and_escapes_names() {
        let timeline = example_timeline();
        let report = Report::new(&Stats::default(), Outcome::Passed, None, 7, 2_000, Vec::new());
        let html = render(&timeline, &report).expect("renders");
        assert_eq!(html.matches("<svg").count(), 4, "four charts");
        for title in
            ["Peek latency", "Wall-clock lag per collection", "Rows written per second", "Replica status"]
        {
            assert!(html.contains(title), "{title}");
        }
        // Every chart carries every fault's label.
        assert_eq!(html.matches("kill r2").count(), 4);
        assert_eq!(html.matches("recreate u3").count(), 4);
        assert_eq!(html.matches("consensus outage postgres").count(), 4);
        assert_eq!(html.matches("link cut r1").count(), 4);
        assert!(html.contains("<td>6.5 s</td><td>link cut</td>"), "the cut's end is listed");
        assert!(html.contains("<td>9.5 s</td><td>consensus outage</td>"), "the outage's end is listed");
        assert!(html.contains("u2&lt;&amp;&gt;") && !html.contains("u2<&>"), "names are escaped");
        assert!(html.contains("rgb(220,30,30)") || html.contains("#DC1E1E"), "the fault colour is drawn");
    }

    #[test]
    fn the_report_directory_gets_the_page_and_the_json() {
        let dir = std::env::temp_dir().join(format!("sim-html-{}", std::process::id()));
        let report = Report::new(&Stats::default(), Outcome::Passed, None, 7, 2_000, Vec::new());
        let page = write_report(&dir, &example_timeline(), &report).expect("written");
        assert!(std::fs::read_to_string(&page).expect("page").starts_with("<!DOCTYPE html>"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).expect("json"))
                .expect("parses");
        assert_eq!(json.pointer("/timeline/faults/0/kind").and_then(|v| v.as_str()), Some("kill"));
        assert_eq!(json.pointer("/report/seed").and_then(|v| v.as_u64()), Some(7));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
