//! The run's report: the fault matrix as Markdown, and the soak's charts (SVG, plotters).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::scenarios::Row;
use crate::soak::Sample;

/// The fault matrix: one line per scenario.
pub fn matrix(rows: &[Row]) -> String {
    let mut text = String::from(
        "| scenario | path and fault | offered | OK | failed (by reason) | broken | lost | duplicates | \
         failed but stored | not ready after | ready after heal | recovery | peak RSS | verdict |\n\
         |---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for row in rows {
        let seconds = |value: Option<f64>| value.map_or("-".to_owned(), |s| format!("{s:.1} s"));
        let verdict = if row.violations.is_empty() {
            "pass".to_owned()
        } else {
            format!("**FAIL**: {}", row.violations.join("; "))
        };
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} MiB | {} |",
            row.scenario,
            row.path,
            row.offered,
            row.ok,
            counts(&row.failed),
            counts(&row.broken),
            row.lost,
            row.duplicates,
            row.failed_but_stored,
            seconds(row.not_ready_after_s),
            seconds(row.ready_after_heal_s),
            seconds(row.recovery_s),
            row.peak_rss_mib,
            verdict,
        );
    }
    text
}

fn counts(counts: &std::collections::BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "0".to_owned();
    }
    counts
        .iter()
        .map(|(what, n)| format!("{n} {what}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every row's notes, as a list under its scenario.
pub fn notes(rows: &[Row]) -> String {
    let mut text = String::new();
    for row in rows.iter().filter(|row| !row.notes.is_empty()) {
        let _ = writeln!(text, "- **{}**: {}", row.scenario, row.notes.join("; "));
    }
    text
}

/// A named quantity read off each soak sample.
type Series = (&'static str, fn(&Sample) -> f64);

/// One panel of the soak chart.
struct Panel {
    title: &'static str,
    series: &'static [Series],
}

const PANELS: &[Panel] = &[
    Panel {
        title: "gateway RSS, MiB",
        series: &[("RSS", |s| s.rss_mib)],
    },
    Panel {
        title: "open descriptors, threads, AMQP connections and links",
        series: &[
            ("descriptors", |s| s.fds),
            ("threads", |s| s.threads),
            ("pool connections", |s| s.pool_connections),
            ("pool links", |s| s.pool_links),
        ],
    },
    Panel {
        title: "events answered OK per second",
        series: &[("OK/s", |s| s.ok_per_second)],
    },
];

const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// Draws the soak's readings over time into `path` (one SVG, a panel per quantity).
pub fn soak_chart(samples: &[Sample], path: &Path) -> Result<()> {
    draw(samples, path)
        .map_err(|error| anyhow::anyhow!("{error}"))
        .with_context(|| format!("draws {}", path.display()))
}

fn draw(samples: &[Sample], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 300 * PANELS.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let end = samples.last().map_or(1.0, |s| s.at_s).max(1.0);
    for (area, panel) in root.split_evenly((PANELS.len(), 1)).iter().zip(PANELS) {
        let top = samples
            .iter()
            .flat_map(|s| panel.series.iter().map(move |(_, value)| value(s)))
            .fold(1.0, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..end, 0f64..top)?;
        chart
            .configure_mesh()
            .x_desc("seconds into the soak")
            .draw()?;
        for (index, (label, value)) in panel.series.iter().enumerate() {
            let colour = COLOURS[index % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(
                    samples.iter().map(|s| (s.at_s, value(s))),
                    colour.stroke_width(2),
                ))?
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 15, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_row_says_why_and_counts_read_as_words() {
        let mut row = Row {
            scenario: "blackhole-long".into(),
            offered: 10,
            ok: 7,
            ..Row::default()
        };
        row.failed.insert("EVENT_HUBS_UNAVAILABLE".into(), 3);
        row.violations
            .push("2 events answered OK are not stored".into());
        let text = matrix(&[row]);
        assert!(text.contains("| blackhole-long |"));
        assert!(text.contains("3 EVENT_HUBS_UNAVAILABLE"));
        assert!(text.contains("**FAIL**: 2 events answered OK are not stored"));
    }

    #[test]
    fn the_soak_chart_is_an_svg_with_every_series() {
        let samples: Vec<Sample> = (0..10)
            .map(|i| Sample {
                at_s: f64::from(i),
                rss_mib: 30.0,
                fds: 20.0,
                ok_per_second: 100.0,
                ..Sample::default()
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("chaos-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("soak.svg");
        soak_chart(&samples, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        for label in ["RSS", "descriptors", "pool links", "OK/s"] {
            assert!(svg.contains(label), "{label}");
        }
    }
}
