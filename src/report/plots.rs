//! Report plots drawn with plotters, each as PNG and SVG: mIoU and agreement mIoU against bits per weight (every
//! uniform and mixed variant, log2 axis, Pareto front, labels placed clear of each other), throughput per level,
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
/// Size of `miou_vs_bits.png`: two panels side by side.
pub const BITS_PLOT_SIZE: (u32, u32) = (1600, 750);
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

    let (dataset, agreement) = bits_points(results);
    if !dataset.is_empty() || !agreement.is_empty() {
        let baseline = results
            .baseline()
            .map(|b| (b.label.as_str(), b.miou() * 100.0))
            .filter(|b| b.1.is_finite());
        written.extend(save_both(
            dir,
            "miou_vs_bits",
            BITS_PLOT_SIZE,
            |root| miou_vs_bits(root, &dataset, &agreement, baseline),
            |root| miou_vs_bits(root, &dataset, &agreement, baseline),
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

/// The points of the bits plot: every level that ran with bits per weight above 0, against its dataset mIoU
/// (levels with a finite one) and against its agreement mIoU with the reference (the reference itself at 100%,
/// as it agrees with itself everywhere), in percent. Failed levels are no points.
pub fn bits_points(results: &EvalResults) -> (Vec<BitsPoint>, Vec<BitsPoint>) {
    let ran: Vec<&LevelResult> = results
        .levels
        .iter()
        .filter(|l| l.is_ok() && l.bits_per_weight.is_finite() && l.bits_per_weight > 0.0)
        .collect();
    let point = |l: &LevelResult, value: f64| BitsPoint {
        label: l.label.clone(),
        bits: l.bits_per_weight,
        value,
    };
    let dataset: Vec<BitsPoint> = ran
        .iter()
        .filter(|l| l.miou().is_finite())
        .map(|l| point(l, l.miou() * 100.0))
        .collect();
    let compared: Vec<BitsPoint> = ran
        .iter()
        .filter_map(|l| Some(point(l, l.agreement_metrics()?.miou * 100.0)))
        .filter(|p| p.value.is_finite())
        .collect();
    let mut agreement = Vec::new();
    if !compared.is_empty() {
        agreement.extend(ran.iter().filter(|l| l.method.is_reference()).map(|l| point(l, 100.0)));
        agreement.extend(compared);
    }
    (dataset, agreement)
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

/// One variant on the bits plot: its label, average bits per weight (> 0) and score in percent.
#[derive(Debug, Clone, PartialEq)]
pub struct BitsPoint {
    pub label: String,
    pub bits: f64,
    pub value: f64,
}

/// The Pareto front of `(bits, value)` points: the indices of the points that no other point beats with as few
/// or fewer bits and as high or a higher value, in order of bits (then value rising). Of identical points the
/// first is kept. Non-finite points are never on it.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len())
        .filter(|&i| points[i].0.is_finite() && points[i].1.is_finite())
        .collect();
    order.sort_by(|&a, &b| {
        points[a]
            .0
            .total_cmp(&points[b].0)
            .then(points[b].1.total_cmp(&points[a].1))
            .then(a.cmp(&b))
    });
    let mut best = f64::NEG_INFINITY;
    let mut front = Vec::new();
    for i in order {
        if points[i].1 > best {
            best = points[i].1;
            front.push(i);
        }
    }
    front
}

/// The front as a step line: flat from each front point to the next one's bits, then up to it, and flat to
/// `right_edge` after the last (more bits buy nothing more).
pub fn pareto_steps(points: &[(f64, f64)], front: &[usize], right_edge: f64) -> Vec<(f64, f64)> {
    let mut steps = Vec::new();
    for (k, &i) in front.iter().enumerate() {
        let (bits, value) = points[i];
        if k > 0 {
            steps.push((bits, points[front[k - 1]].1));
        }
        steps.push((bits, value));
    }
    if let Some(&last) = front.last()
        && right_edge > points[last].0
    {
        steps.push((right_edge, points[last].1));
    }
    steps
}

/// An axis-aligned box in pixels: top-left corner, width and height.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelBox {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl LabelBox {
    pub fn overlaps(&self, other: &LabelBox) -> bool {
        self.x < other.x + other.w
            && other.x < self.x + self.w
            && self.y < other.y + other.h
            && other.y < self.y + self.h
    }

    fn inside(&self, area: &LabelBox) -> bool {
        self.x >= area.x && self.y >= area.y && self.x + self.w <= area.x + area.w && self.y + self.h <= area.y + area.h
    }
}

/// Places one label per point (greedy, in `order`): tries boxes around the point on rings of growing distance,
/// in eight directions (right first), and keeps the first that stays inside `area` and overlaps no label already
/// placed, no point's marker (a square of `2 * marker` pixels) and no `obstacles` (e.g. the front's line).
/// `None` for a label that fits nowhere. Everything is in pixels.
pub fn place_labels(
    anchors: &[(f64, f64)],
    sizes: &[(f64, f64)],
    area: LabelBox,
    marker: f64,
    obstacles: &[LabelBox],
    order: &[usize],
) -> Vec<Option<LabelBox>> {
    const RINGS: [f64; 10] = [3.0, 10.0, 20.0, 32.0, 46.0, 64.0, 86.0, 112.0, 145.0, 185.0];
    let markers: Vec<LabelBox> = anchors
        .iter()
        .map(|&(x, y)| LabelBox {
            x: x - marker,
            y: y - marker,
            w: 2.0 * marker,
            h: 2.0 * marker,
        })
        .collect();
    let mut placed: Vec<Option<LabelBox>> = vec![None; anchors.len()];
    for &i in order {
        let ((ax, ay), (w, h)) = (anchors[i], sizes[i]);
        let candidates = RINGS.iter().flat_map(|ring| {
            let r = marker + ring;
            [
                (ax + r, ay - h / 2.0),
                (ax + r * 0.7, ay - r * 0.7 - h),
                (ax + r * 0.7, ay + r * 0.7),
                (ax - r - w, ay - h / 2.0),
                (ax - r * 0.7 - w, ay - r * 0.7 - h),
                (ax - r * 0.7 - w, ay + r * 0.7),
                (ax - w / 2.0, ay - r - h),
                (ax - w / 2.0, ay + r),
            ]
        });
        placed[i] = candidates.map(|(x, y)| LabelBox { x, y, w, h }).find(|candidate| {
            candidate.inside(&area)
                && !markers.iter().chain(obstacles).any(|m| m.overlaps(candidate))
                && !placed.iter().flatten().any(|p| p.overlaps(candidate))
        });
    }
    placed
}

/// `2^v` as a tick label, only at whole octaves (1, 2, 4, 8, ... bits); the grid lines between stay unlabelled.
fn bits_tick(log2_bits: &f64) -> String {
    if (log2_bits - log2_bits.round()).abs() < 1e-6 {
        format!("{}", log2_bits.round().exp2())
    } else {
        String::new()
    }
}

/// One panel of the bits plot: the points against log2(bits), the Pareto front as a step line, labels placed
/// clear of each other, and an optional dashed reference line.
fn bits_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    points: &[BitsPoint],
    reference_line: Option<(&str, f64)>,
) -> DrawResult {
    let log_bits: Vec<(f64, f64)> = points.iter().map(|p| (p.bits.log2(), p.value)).collect();
    let (low, high) = log_bits.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    // Room on both sides for labels; at least one octave shown.
    let spread = (high - low).max(1.0);
    let x_range = (low - spread * 0.12)..(high + spread * 0.12);
    let y_range = padded_range(points.iter().map(|p| p.value).chain(reference_line.map(|r| r.1)), false);
    let y_range = y_range.start..(y_range.end + (y_range.end - y_range.start) * 0.06);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 22))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(65)
        .build_cartesian_2d(x_range.clone(), y_range)
        .map_err(text_error)?;
    chart
        .configure_mesh()
        .x_desc("bits per weight (log2 scale)")
        .y_desc(y_desc)
        .x_labels(8)
        .x_label_formatter(&bits_tick)
        .light_line_style(RGBColor(238, 238, 238))
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(text_error)?;
    if let Some((name, value)) = reference_line {
        let dashed = DashedLineSeries::new(
            [(x_range.start, value), (x_range.end, value)],
            8,
            6,
            ShapeStyle::from(&BLACK.mix(0.4)).stroke_width(1),
        );
        chart
            .draw_series(dashed)
            .map_err(text_error)?
            .label(name.to_string())
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
    }
    let front = pareto_front(&log_bits);
    let front_color = RGBColor(204, 0, 0);
    let steps = pareto_steps(&log_bits, &front, x_range.end);
    chart
        .draw_series(LineSeries::new(
            steps.iter().copied(),
            ShapeStyle::from(&front_color).stroke_width(2),
        ))
        .map_err(text_error)?
        .label("Pareto front (best score for the bits)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], front_color.stroke_width(2)));
    const MARKER: f64 = 6.0;
    for (index, (bits, value)) in log_bits.iter().enumerate() {
        let on_front = front.contains(&index);
        let color = if on_front {
            RGBColor(32, 74, 135)
        } else {
            RGBColor(136, 138, 133)
        };
        chart
            .draw_series([Circle::new((*bits, *value), MARKER as i32, color.filled())])
            .map_err(text_error)?;
    }
    // Labels, in pixels relative to this panel: the front first, then by bits, so the important ones get the
    // nearest places.
    let base = area.get_base_pixel();
    let (xs, ys) = chart.plotting_area().get_pixel_range();
    let plot_box = LabelBox {
        x: f64::from(xs.start - base.0),
        y: f64::from(ys.start - base.1),
        w: f64::from(xs.end - xs.start),
        h: f64::from(ys.end - ys.start),
    };
    let to_pixels = |p: &(f64, f64)| {
        let (x, y) = chart.backend_coord(p);
        (f64::from(x - base.0), f64::from(y - base.1))
    };
    let anchors: Vec<(f64, f64)> = log_bits.iter().map(to_pixels).collect();
    let style = (FAMILY, 14).into_font().color(&BLACK);
    let sizes: Vec<(f64, f64)> = points
        .iter()
        .map(|p| {
            let (w, h) = area
                .estimate_text_size(&p.label, &style)
                .unwrap_or((7 * p.label.len() as u32, 14));
            (f64::from(w) + 8.0, f64::from(h) + 4.0)
        })
        .collect();
    let mut order: Vec<usize> = front.clone();
    let mut rest: Vec<usize> = (0..points.len()).filter(|i| !front.contains(i)).collect();
    rest.sort_by(|&a, &b| log_bits[a].0.total_cmp(&log_bits[b].0).then(a.cmp(&b)));
    order.extend(rest);
    // Labels keep off the front's line: each of its segments as a box a few pixels thick.
    let line: Vec<LabelBox> = steps
        .windows(2)
        .map(|pair| {
            let ((x0, y0), (x1, y1)) = (to_pixels(&pair[0]), to_pixels(&pair[1]));
            LabelBox {
                x: x0.min(x1) - 2.0,
                y: y0.min(y1) - 2.0,
                w: (x1 - x0).abs() + 4.0,
                h: (y1 - y0).abs() + 4.0,
            }
        })
        .collect();
    let boxes = place_labels(&anchors, &sizes, plot_box, MARKER, &line, &order);
    for (index, placed) in boxes.iter().enumerate() {
        let Some(b) = placed else {
            tracing::debug!(label = %points[index].label, "no room for the label on the bits plot");
            continue;
        };
        let (ax, ay) = anchors[index];
        // A leader line when the label sits away from its point.
        let nearest = (ax.clamp(b.x, b.x + b.w), ay.clamp(b.y, b.y + b.h));
        if (nearest.0 - ax).hypot(nearest.1 - ay) > MARKER + 12.0 {
            area.draw(&PathElement::new(
                [(ax as i32, ay as i32), (nearest.0 as i32, nearest.1 as i32)],
                BLACK.mix(0.35),
            ))
            .map_err(text_error)?;
        }
        area.draw(&Text::new(
            points[index].label.clone(),
            ((b.x + 1.0) as i32, (b.y + 1.0) as i32),
            style.clone(),
        ))
        .map_err(text_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FAMILY, 14))
        .draw()
        .map_err(text_error)?;
    Ok(())
}

/// The bits plot: the dataset metric (when the run has labels to score) and agreement with the reference, side
/// by side, each against log2(bits per weight) with its Pareto front.
fn miou_vs_bits<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    dataset: &[BitsPoint],
    agreement: &[BitsPoint],
    baseline: Option<(&str, f64)>,
) -> DrawResult {
    root.fill(&WHITE).map_err(text_error)?;
    let dataset_panel = (!dataset.is_empty()).then_some(("mIoU against bits per weight", "mIoU %", dataset, baseline));
    let agreement_panel = (!agreement.is_empty()).then_some((
        "Agreement with the reference against bits per weight",
        "agreement mIoU %",
        agreement,
        None,
    ));
    let panels: Vec<_> = dataset_panel.into_iter().chain(agreement_panel).collect();
    let areas = if panels.len() == 2 {
        let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
        vec![left, right]
    } else {
        vec![root.clone()]
    };
    for (area, (title, y_desc, points, reference)) in areas.iter().zip(panels) {
        bits_panel(area, title, y_desc, points, reference)?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_front_keeps_the_best_score_for_the_bits() {
        // (bits, value): f32, f16, int8 (two methods), int4 (two), int2, a mixed level, a duplicate.
        let points = [
            (32.0, 40.0),
            (16.0, 40.0),
            (8.25, 39.9),
            (8.25, 40.1),
            (4.5, 37.0),
            (4.5, 38.5),
            (2.5, 20.0),
            (3.4, 38.6),
            (2.5, 20.0),
            (f64::NAN, 99.0),
        ];
        let front = pareto_front(&points);
        // int2 (the first of the two identical), mixed 3.4b, int8 at 40.1; f16/f32 score less than int8 and the
        // int4 levels less than the mixed one at fewer bits.
        assert_eq!(front, vec![6, 7, 3]);
        let steps = pareto_steps(&points, &front, 40.0);
        assert_eq!(
            steps,
            vec![
                (2.5, 20.0),
                (3.4, 20.0),
                (3.4, 38.6),
                (8.25, 38.6),
                (8.25, 40.1),
                (40.0, 40.1)
            ]
        );
        // Rising scores with bits: every point is on the front.
        let rising = [(2.0, 1.0), (4.0, 2.0), (8.0, 3.0)];
        assert_eq!(pareto_front(&rising), vec![0, 1, 2]);
        assert!(pareto_front(&[]).is_empty());
    }

    #[test]
    fn labels_on_crowded_points_never_overlap() {
        // 14 points, most of them within a few pixels of each other, with long labels.
        let anchors: Vec<(f64, f64)> = (0..14)
            .map(|i| (300.0 + (i % 4) as f64 * 6.0, 200.0 + (i / 4) as f64 * 5.0))
            .collect();
        let sizes: Vec<(f64, f64)> = (0..14).map(|i| (80.0 + 7.0 * i as f64, 16.0)).collect();
        let area = LabelBox {
            x: 0.0,
            y: 0.0,
            w: 800.0,
            h: 600.0,
        };
        let order: Vec<usize> = (0..14).collect();
        // The front's line runs right through the crowd.
        let line = [LabelBox {
            x: 100.0,
            y: 208.0,
            w: 500.0,
            h: 4.0,
        }];
        let boxes = place_labels(&anchors, &sizes, area, 6.0, &line, &order);
        let placed: Vec<LabelBox> = boxes.iter().flatten().copied().collect();
        assert_eq!(placed.len(), 14, "every label found a place: {boxes:?}");
        for (i, a) in placed.iter().enumerate() {
            assert!(a.inside(&area), "{a:?} leaves the plot");
            assert!(!a.overlaps(&line[0]), "{a:?} covers the front's line");
            for b in &placed[i + 1..] {
                assert!(!a.overlaps(b), "{a:?} overlaps {b:?}");
            }
            for &(x, y) in &anchors {
                let marker = LabelBox {
                    x: x - 6.0,
                    y: y - 6.0,
                    w: 12.0,
                    h: 12.0,
                };
                assert!(!a.overlaps(&marker), "{a:?} covers the point at ({x}, {y})");
            }
        }
        // A point alone in the corner gets its label inside the plot, on the side with room.
        let corner = place_labels(&[(795.0, 5.0)], &[(100.0, 16.0)], area, 6.0, &[], &[0]);
        let b = corner[0].expect("placed");
        assert!(b.inside(&area) && b.x + b.w <= 789.0, "{b:?}");
        // No room at all: no label rather than an overlapping one.
        let tiny = LabelBox {
            x: 0.0,
            y: 0.0,
            w: 50.0,
            h: 50.0,
        };
        assert_eq!(
            place_labels(&[(25.0, 25.0)], &[(200.0, 16.0)], tiny, 6.0, &[], &[0]),
            vec![None]
        );
    }

    #[test]
    fn bits_points_skip_failed_levels_and_put_the_reference_at_full_agreement() {
        let mut results = crate::eval::results::test_support::run(0..6, 6, None);
        let (dataset, agreement) = bits_points(&results);
        assert_eq!(dataset.len(), 3);
        assert_eq!(agreement.len(), 3);
        assert_eq!((agreement[0].label.as_str(), agreement[0].value), ("f32", 100.0));
        results.levels[1].status = crate::eval::results::LevelStatus::Failed { reason: "x".into() };
        results.levels[2].label = "mixed-3.4b-1a2b3c4d".into();
        results.levels[2].bits_per_weight = 3.4;
        let (dataset, agreement) = bits_points(&results);
        let labels: Vec<&str> = dataset.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(labels, ["f32", "mixed-3.4b-1a2b3c4d"]);
        assert_eq!(agreement[1].bits, 3.4);
        // Without labels to score against, only the agreement panel has points.
        for level in &mut results.levels {
            level.confusion = None;
        }
        let (dataset, agreement) = bits_points(&results);
        assert!(dataset.is_empty());
        assert_eq!(agreement.len(), 2);
    }
}
