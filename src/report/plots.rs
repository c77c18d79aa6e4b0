//! Report plots drawn with plotters, each as PNG and SVG: mIoU against bits per weight, throughput per level,
//! and the classes whose IoU drops most at the worst quantized level.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::eval::results::{EvalResults, LevelResult};
use crate::{Error, Result};

/// Embedded so that PNG text never depends on the fonts of the machine (see assets/fonts/README.md).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
pub(crate) const FAMILY: &str = "sans-serif";
/// How many classes the class-drop plot shows.
pub const WORST_CLASSES: usize = 15;

pub(crate) fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            if plotters::style::register_font(FAMILY, style, FONT).is_err() {
                tracing::warn!("the embedded font could not be registered; plot text may be missing");
            }
        }
    });
}

/// Why a chart could not be drawn, as text: plotters' error type differs per backend (bitmap, SVG), and the text
/// only ever becomes part of the [`Error::Write`] that names the file.
pub(crate) struct DrawError(String);

pub(crate) type DrawResult = std::result::Result<(), DrawError>;

pub(crate) fn text_error(error: impl std::fmt::Display) -> DrawError {
    DrawError(error.to_string())
}

/// Draws one chart into `dir/name.png` and `dir/name.svg`, returning both paths.
pub(crate) fn save_both(
    dir: &Path,
    name: &str,
    size: (u32, u32),
    draw_png: impl FnOnce(DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult,
    draw_svg: impl FnOnce(DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult,
) -> Result<Vec<PathBuf>> {
    let png = dir.join(format!("{name}.png"));
    let svg = dir.join(format!("{name}.svg"));
    draw_png(BitMapBackend::new(&png, size).into_drawing_area())
        .map_err(|DrawError(e)| Error::write(&png, format!("cannot draw plot: {e}")))?;
    draw_svg(SVGBackend::new(&svg, size).into_drawing_area())
        .map_err(|DrawError(e)| Error::write(&svg, format!("cannot draw plot: {e}")))?;
    Ok(vec![png, svg])
}

/// Writes every plot that has data into `dir` and returns the files written.
pub fn write_plots(results: &EvalResults, dir: &Path) -> Result<Vec<PathBuf>> {
    register_font();
    let scored: Vec<&LevelResult> = results
        .levels
        .iter()
        .filter(|l| l.is_ok() && l.miou().is_finite())
        .collect();
    if scored.is_empty() && results.levels.iter().all(|l| l.images() == 0) {
        tracing::info!("no level has scores or timings; no plots written");
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut written = Vec::new();

    if !scored.is_empty() {
        let points: Vec<(String, f64, f64)> = scored
            .iter()
            .map(|l| (l.label.clone(), l.bits_per_weight, l.miou() * 100.0))
            .collect();
        let baseline = results.baseline().map(|b| b.miou() * 100.0).filter(|m| m.is_finite());
        written.extend(save_both(
            dir,
            "miou_vs_bits",
            (1000, 650),
            |root| miou_vs_bits(root, &points, baseline),
            |root| miou_vs_bits(root, &points, baseline),
        )?);
    }

    let throughput: Vec<(String, f64, f64)> = results
        .levels
        .iter()
        .filter(|l| l.images() > 0)
        .map(|l| (l.label.clone(), l.images_per_s_model(), l.images_per_s_pipeline()))
        .collect();
    if !throughput.is_empty() {
        written.extend(save_both(
            dir,
            "throughput",
            (1000, 700),
            |root| throughput_bars(root, &throughput),
            |root| throughput_bars(root, &throughput),
        )?);
    }

    if let Some((level, drops)) = worst_class_drops(results) {
        let title = format!(
            "Per-class IoU change vs f32 at {} (worst {} classes)",
            level,
            drops.len()
        );
        written.extend(save_both(
            dir,
            "class_iou_drop",
            (1000, 650),
            |root| class_drop_bars(root, &title, &drops),
            |root| class_drop_bars(root, &title, &drops),
        )?);
    }
    Ok(written)
}

/// The quantized level with the lowest mIoU and its [`WORST_CLASSES`] largest per-class IoU drops against f32
/// (class name, change in percentage points, most negative first). `None` without a baseline or a scored level.
pub fn worst_class_drops(results: &EvalResults) -> Option<(String, Vec<(String, f64)>)> {
    let baseline = results.baseline()?;
    let worst = results
        .levels
        .iter()
        .filter(|l| l.label != baseline.label && l.is_ok() && l.miou().is_finite())
        .min_by(|a, b| a.miou().total_cmp(&b.miou()))?;
    let mut drops: Vec<(String, f64)> = results
        .class_iou_delta(worst)
        .into_iter()
        .enumerate()
        .filter_map(|(id, delta)| Some((results.class_name(id), delta? * 100.0)))
        .collect();
    drops.sort_by(|a, b| a.1.total_cmp(&b.1));
    drops.truncate(WORST_CLASSES);
    (!drops.is_empty()).then(|| (worst.label.clone(), drops))
}

/// Axis range that contains `values` with a margin, and is never empty.
fn padded_range(values: impl Iterator<Item = f64>, include_zero: bool) -> std::ops::Range<f64> {
    let (mut low, mut high) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !low.is_finite() {
        (low, high) = (0.0, 1.0);
    }
    if include_zero {
        low = low.min(0.0);
        high = high.max(0.0);
    }
    let margin = ((high - low) * 0.08).max(0.5);
    (if include_zero && low == 0.0 { 0.0 } else { low - margin })..(high + margin)
}

fn miou_vs_bits<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    points: &[(String, f64, f64)],
    baseline: Option<f64>,
) -> DrawResult {
    root.fill(&WHITE).map_err(text_error)?;
    let x_range = padded_range(points.iter().map(|p| p.1), true);
    let y_range = padded_range(points.iter().map(|p| p.2).chain(baseline), false);
    let mut chart = ChartBuilder::on(&root)
        .caption("mIoU against bits per weight", (FAMILY, 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range.clone(), y_range)
        .map_err(text_error)?;
    chart
        .configure_mesh()
        .x_desc("bits per weight")
        .y_desc("mIoU %")
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .draw()
        .map_err(text_error)?;
    if let Some(baseline) = baseline {
        let dashed = DashedLineSeries::new(
            [(x_range.start, baseline), (x_range.end, baseline)],
            8,
            6,
            ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(1),
        );
        chart
            .draw_series(dashed)
            .map_err(text_error)?
            .label("f32")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    for (index, (label, bits, miou)) in points.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        let marker = EmptyElement::at((*bits, *miou))
            + Circle::new((0, 0), 6, color.filled())
            + Text::new(label.clone(), (9, -18), (FAMILY, 15));
        chart.draw_series([marker]).map_err(text_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FAMILY, 15))
        .draw()
        .map_err(text_error)?;
    root.present().map_err(text_error)
}

/// Vertical bars, one per level, on a segmented axis with the level labels underneath.
fn bar_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    bars: &[(String, f64)],
    color: RGBColor,
) -> DrawResult {
    let count = bars.len() as i32;
    let top = padded_range(bars.iter().map(|b| b.1), true).end;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((0..count - 1).into_segmented(), 0.0..top)
        .map_err(text_error)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let format_level = |value: &SegmentValue<i32>| match value {
        SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&format_level)
        .y_desc(y_desc)
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(text_error)?;
    chart
        .draw_series(
            bars.iter()
                .enumerate()
                .filter(|(_, b)| b.1.is_finite())
                .map(|(i, (_, value))| {
                    let i = i as i32;
                    let mut bar = Rectangle::new(
                        [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *value)],
                        color.filled(),
                    );
                    bar.set_margin(0, 0, 12, 12);
                    bar
                }),
        )
        .map_err(text_error)?;
    Ok(())
}

fn throughput_bars<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, levels: &[(String, f64, f64)]) -> DrawResult {
    root.fill(&WHITE).map_err(text_error)?;
    let (upper, lower) = root.split_vertically(root.dim_in_pixel().1 / 2);
    let model: Vec<(String, f64)> = levels.iter().map(|l| (l.0.clone(), l.1)).collect();
    let pipeline: Vec<(String, f64)> = levels.iter().map(|l| (l.0.clone(), l.2)).collect();
    bar_panel(
        &upper,
        "Model forward pass throughput",
        "images/s",
        &model,
        RGBColor(52, 101, 164),
    )?;
    bar_panel(
        &lower,
        "Whole pipeline throughput",
        "images/s",
        &pipeline,
        RGBColor(245, 121, 0),
    )?;
    root.present().map_err(text_error)
}

fn class_drop_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    drops: &[(String, f64)],
) -> DrawResult {
    root.fill(&WHITE).map_err(text_error)?;
    let count = drops.len() as i32;
    let x_range = padded_range(drops.iter().map(|d| d.1), true);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(190)
        .build_cartesian_2d(x_range, (0..count - 1).into_segmented())
        .map_err(text_error)?;
    let format_class = |value: &SegmentValue<i32>| match value {
        // The worst class goes on top: row `count - 1` shows the first drop.
        SegmentValue::CenterOf(i) => drops
            .get((count - 1 - *i) as usize)
            .map(|d| d.0.clone())
            .unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(drops.len())
        .y_label_formatter(&format_class)
        .x_desc("IoU change vs f32, percentage points")
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(text_error)?;
    chart
        .draw_series(drops.iter().enumerate().map(|(rank, (_, change))| {
            let i = count - 1 - rank as i32;
            let color = if *change < 0.0 {
                RGBColor(204, 0, 0)
            } else {
                RGBColor(78, 154, 6)
            };
            let mut bar = Rectangle::new(
                [(0.0, SegmentValue::Exact(i)), (*change, SegmentValue::Exact(i + 1))],
                color.filled(),
            );
            bar.set_margin(3, 3, 0, 0);
            bar
        }))
        .map_err(text_error)?;
    root.present().map_err(text_error)
}
