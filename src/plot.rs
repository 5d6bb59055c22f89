//! PNG plots of a run: the units each noise layer keeps, epoch by epoch, and the final
//! histogram of the units' signal-to-noise ratios.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::train::EpochStats;

/// DejaVu Sans Mono (free licence, see `assets/DejaVu-LICENSE.txt`), embedded so plots
/// render the same on every machine.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Registration only fails on a font that does not parse, and this one is fixed.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        reason: format!("cannot draw the plot: {e}"),
    }
}

/// Draws `history` (units kept per noise layer, as a fraction of its units, per epoch)
/// beside a histogram of `log10 SNR` of every unit in `snr` (one list per layer) to a
/// 1200×500 PNG at `path`, written atomically. `layers` names the noise layers and
/// `units` gives their sizes, in the order of [`EpochStats::units_kept`].
pub fn plot_run(
    path: &Path,
    history: &[EpochStats],
    layers: &[String],
    units: &[usize],
    snr: &[Vec<f64>],
) -> Result<()> {
    atomic_png(path, |tmp| draw(tmp, history, layers, units, snr))
}

/// Draws into a temporary file beside `path` and renames it over `path`.
fn atomic_png(path: &Path, draw: impl FnOnce(&Path) -> DrawResult) -> Result<()> {
    register_font();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| plot_error(path, "not a file path"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}.png", std::process::id()));
    let drawn = draw(&tmp).map_err(|e| plot_error(path, e));
    let renamed = drawn.and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    });
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(
    path: &Path,
    history: &[EpochStats],
    layers: &[String],
    units: &[usize],
    snr: &[Vec<f64>],
) -> DrawResult {
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(620);

    let epochs = history.len().max(1);
    let mut chart = ChartBuilder::on(&left)
        .caption("units kept per noise layer", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..epochs as f64, 0f64..1.05)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("fraction kept")
        .draw()?;
    for (k, name) in layers.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let total = units.get(k).copied().unwrap_or(1).max(1) as f64;
        let kept = history.iter().filter_map(|s| {
            s.units_kept
                .get(k)
                .map(|&u| ((s.epoch + 1) as f64, u as f64 / total))
        });
        let points: Vec<(f64, f64)> = std::iter::once((0.0, 1.0)).chain(kept).collect();
        let last = points.last().map_or(0, |p| (p.1 * total).round() as usize);
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(format!("{name}: {last}/{}", total as usize))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;

    let logs: Vec<f64> = snr.iter().flatten().map(|&s| s.max(1e-6).log10()).collect();
    let (lo, hi) = logs.iter().fold((-1.0f64, 1.0f64), |(lo, hi), &v| {
        (lo.min(v.floor()), hi.max(v.ceil()))
    });
    let bins = 40usize;
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for v in &logs {
        counts[(((v - lo) / width) as usize).min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.1;
    let mut hist = ChartBuilder::on(&right)
        .caption(
            "final SNR of every unit (removed: SNR ≤ 1)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(lo..hi, 0f64..top)?;
    hist.configure_mesh()
        .x_desc("log10 SNR")
        .y_desc("units")
        .draw()?;
    hist.draw_series(counts.iter().enumerate().map(|(b, &c)| {
        let x0 = lo + b as f64 * width;
        let color = if x0 + width <= 0.0 {
            RED.mix(0.6)
        } else {
            BLUE.mix(0.6)
        };
        Rectangle::new([(x0, 0.0), (x0 + width, c as f64)], color.filled())
    }))?;
    hist.draw_series(LineSeries::new(
        vec![(0.0, 0.0), (0.0, top)],
        BLACK.stroke_width(2),
    ))?;
    root.present()?;
    Ok(())
}

/// Draws test accuracy against the fraction of units kept (left) and of MACs kept (right),
/// one curve per method, to a 1200×500 PNG at `path` (written atomically).
pub fn plot_comparison(path: &Path, points: &[crate::compare::ComparePoint]) -> Result<()> {
    atomic_png(path, |tmp| draw_comparison(tmp, points))
}

fn draw_comparison(path: &Path, points: &[crate::compare::ComparePoint]) -> DrawResult {
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let mut methods: Vec<&str> = Vec::new();
    for p in points {
        if !methods.contains(&p.method.as_str()) {
            methods.push(&p.method);
        }
    }
    let lo = points
        .iter()
        .map(|p| p.test_accuracy)
        .fold(1.0f64, f64::min)
        .min(0.9);
    for (area, title, pick) in [
        (&left, "accuracy vs units kept", 0usize),
        (&right, "accuracy vs MACs kept", 1usize),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..1.02, (lo - 0.01)..1.0)?;
        chart
            .configure_mesh()
            .x_desc(if pick == 0 {
                "fraction of hidden units kept"
            } else {
                "fraction of MACs kept"
            })
            .y_desc("test accuracy")
            .draw()?;
        for (k, m) in methods.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let pts: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.method == *m)
                .map(|p| {
                    let x = if pick == 0 { p.units_kept } else { p.macs_kept };
                    (x, p.test_accuracy)
                })
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(m.to_string())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
