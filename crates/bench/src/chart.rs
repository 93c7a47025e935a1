//! The report's charts as SVG (plotters): events/s per scenario and event size (log scale), and latency
//! percentiles where measured, one chart per simulated round trip.

use std::path::Path;

use plotters::prelude::*;

use crate::scenarios::Outcome;

const SIZE_COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Writes `throughput-<rtt>ms.svg` and `latency-<rtt>ms.svg` into `directory`; returns the paths written.
pub fn write(directory: &Path, outcomes: &[Outcome]) -> anyhow::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(directory)?;
    let mut latencies: Vec<u64> = outcomes.iter().map(|o| o.latency_ms).collect();
    latencies.sort_unstable();
    latencies.dedup();
    let mut written = Vec::new();
    for rtt in latencies {
        let these: Vec<&Outcome> = outcomes.iter().filter(|o| o.latency_ms == rtt).collect();
        let path = directory.join(format!("throughput-{rtt}ms.svg"));
        throughput(&path, rtt, &these)?;
        written.push(path);
        if these.iter().any(|o| o.percentiles_ms.is_some()) {
            let path = directory.join(format!("latency-{rtt}ms.svg"));
            latency(&path, rtt, &these)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Distinct values in first-seen order.
fn distinct<T: PartialEq + Copy>(values: impl Iterator<Item = T>) -> Vec<T> {
    let mut seen = Vec::new();
    for value in values {
        if !seen.contains(&value) {
            seen.push(value);
        }
    }
    seen
}

/// Horizontal bars, one group per scenario, one bar per event size, on a log axis.
fn throughput(path: &Path, rtt: u64, outcomes: &[&Outcome]) -> anyhow::Result<()> {
    let scenarios = distinct(outcomes.iter().map(|o| o.scenario.as_str()));
    let sizes = distinct(outcomes.iter().map(|o| o.size));
    let rows = scenarios.len() * sizes.len();
    let most = outcomes
        .iter()
        .map(|o| o.events_per_second)
        .fold(1.0, f64::max);
    let height = 120 + 22 * rows as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("events/s per scenario, {rtt} ms simulated round trip"),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(170)
        .build_cartesian_2d((100f64..most * 8.0).log_scale(), 0f64..rows as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("events per second (log scale)")
        .draw()?;
    for (group, scenario) in scenarios.iter().enumerate() {
        for (index, size) in sizes.iter().enumerate() {
            let row = (group * sizes.len() + index) as f64;
            let Some(outcome) = outcomes
                .iter()
                .find(|o| o.scenario == *scenario && o.size == *size)
            else {
                continue;
            };
            let colour = SIZE_COLOURS[index % SIZE_COLOURS.len()];
            let value = outcome.events_per_second.max(100.0);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(100.0, row + 0.1), (value, row + 0.9)],
                colour.filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{:.0}", outcome.events_per_second),
                (value * 1.05, row + 0.75),
                ("sans-serif", 12),
            )))?;
        }
        let label_row = (group * sizes.len()) as f64 + sizes.len() as f64 / 2.0 + 0.3;
        root.draw(&Text::new(
            scenario.to_string(),
            (10, chart.backend_coord(&(100.0, label_row)).1),
            ("sans-serif", 14),
        ))?;
    }
    for (index, size) in sizes.iter().enumerate() {
        let colour = SIZE_COLOURS[index % SIZE_COLOURS.len()];
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
            .label(format!("{size} B events"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// p50, p99 and p999 per scenario and size, milliseconds, as grouped vertical bars.
fn latency(path: &Path, rtt: u64, outcomes: &[&Outcome]) -> anyhow::Result<()> {
    let measured: Vec<(String, [f64; 3])> = outcomes
        .iter()
        .filter_map(|o| Some((format!("{} {} B", o.scenario, o.size), o.percentiles_ms?)))
        .collect();
    let most = measured
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .fold(1.0, f64::max);
    // Log scale: a few seconds of tail next to a few milliseconds of median.
    let least = 0.1;
    let width = 200 + 150 * measured.len() as u32;
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("latency percentiles, {rtt} ms simulated round trip"),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..measured.len() as f64, (least..most * 2.0).log_scale())?;
    let labels: Vec<String> = measured.iter().map(|(label, _)| label.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(measured.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let index = x.floor() as usize;
            if (x - index as f64 - 0.5).abs() < 0.01 {
                labels.get(index).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("milliseconds (log scale)")
        .draw()?;
    let names = ["p50", "p99", "p999"];
    for (which, name) in names.iter().enumerate() {
        let colour = SIZE_COLOURS[which];
        chart
            .draw_series(measured.iter().enumerate().map(|(index, (_, p))| {
                let left = index as f64 + 0.1 + 0.27 * which as f64;
                Rectangle::new(
                    [(left, least), (left + 0.25, p[which].max(least))],
                    colour.filled(),
                )
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
