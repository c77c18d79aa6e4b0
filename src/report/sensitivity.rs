//! Publishing a per-layer sensitivity report ([`SensitivityReport`]): the ranked console table, `sensitivity.json`,
//! the bar chart `plots/sensitivity.{png,svg}` (damage per group, one colour per level) and the W&B run.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{Map, Value, json};

use crate::eval::sensitivity::{GroupSensitivity, SensitivityReport};
use crate::report::plots::{DrawResult, FAMILY, register_font, save_both, text_error};
use crate::report::table::wrap_caption;
use crate::track::{RunLog, Table};
use crate::{Error, Result};

/// Widest group name the console table shows whole (without `segformer.encoder.`); longer ones keep their end.
const NAME_WIDTH: usize = 32;

/// Shortens `name` to `width` characters, keeping its end behind `…`.
fn shorten(name: &str, width: usize) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= width {
        return name.to_string();
    }
    let tail: String = chars[chars.len() - (width - 1)..].iter().collect();
    format!("…{tail}")
}

/// `12.3`, with NaN as `-` (and no `-0.00` for an exact zero).
fn number(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        let value = value + 0.0;
        format!("{value:.decimals$}")
    } else {
        "-".to_string()
    }
}

/// KL in nats with three significant digits (`0.0123`, `1.2e-05`), NaN as `-`.
fn kl(value: f64) -> String {
    if !value.is_finite() {
        "-".to_string()
    } else if value == 0.0 {
        "0".to_string()
    } else if value >= 0.01 {
        format!("{value:.3}")
    } else {
        format!("{value:.1e}")
    }
}

/// The console table, worst group first: per level the agreement-mIoU drop in points and the KL divergence.
/// `rows` limits the groups shown (all when `None`); the caption says what the numbers are. Fits 100 columns with
/// up to three levels.
pub fn format_table(report: &SensitivityReport, rows: Option<usize>) -> String {
    let ranked = report.ranked();
    let shown = rows.unwrap_or(ranked.len()).min(ranked.len());
    let levels: Vec<String> = report
        .groups
        .first()
        .map(|g| g.levels.iter().map(|s| s.level.name().to_string()).collect())
        .unwrap_or_default();
    let mut header = vec!["#".to_string(), "group".to_string(), "params".to_string()];
    for level in &levels {
        header.push(format!("{level} Δ"));
        header.push(format!("{level} KL"));
    }
    let row = |rank: usize, g: &GroupSensitivity| -> Vec<String> {
        let mut cells = vec![
            (rank + 1).to_string(),
            shorten(&label_of(&g.name), NAME_WIDTH),
            human_count(g.parameters),
        ];
        for s in &g.levels {
            cells.push(number(-s.damage(), 2));
            cells.push(kl(s.kl_divergence));
        }
        cells
    };
    let mut body: Vec<Vec<String>> = ranked.iter().take(shown).enumerate().map(|(i, g)| row(i, g)).collect();
    let mut whole = vec![String::new(), "(every layer)".to_string(), String::new()];
    for s in &report.whole_model {
        whole.push(number(-s.damage(), 2));
        whole.push(kl(s.kl_divergence));
    }
    body.push(whole);
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            body.iter()
                .map(|r| r.get(c).map_or(0, |v| v.chars().count()))
                .chain([header[c].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let render = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &w))| {
                let pad = " ".repeat(w.saturating_sub(cell.chars().count()));
                if c == 1 {
                    format!("{cell}{pad}")
                } else {
                    format!("{pad}{cell}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let what = if report.reverse {
        "everything quantized except the group"
    } else {
        "only the group quantized"
    };
    let caption = format!(
        "Sensitivity per {} ({what}), {} images, {}: Δ = agreement mIoU change vs f32 in points, KL = mean \
         KL(f32 || quantized) per pixel in nats; encoder names without `segformer.encoder.`; worst first{}",
        report.granularity,
        report.images,
        report.method,
        if shown < ranked.len() {
            format!(", {shown} of {} groups shown (all in sensitivity.json)", ranked.len())
        } else {
            String::new()
        }
    );
    let mut out = wrap_caption(&caption, crate::report::COMPACT_WIDTH);
    out.push('\n');
    out.push_str(&render(&header));
    out.push('\n');
    let last = body.len() - 1;
    for (i, r) in body.iter().enumerate() {
        if i == last {
            out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
            out.push('\n');
        }
        out.push_str(&render(r));
        out.push('\n');
    }
    out
}

/// `1.2M`, `45.1k`, `640`.
fn human_count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.2}M", n as f64 / 1e6),
    }
}

/// Writes `sensitivity.json` and `plots/sensitivity.{png,svg}` into `dir` and returns the files written.
pub fn write_all(report: &SensitivityReport, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = dir.join("sensitivity.json");
    report.write(&json)?;
    let mut written = vec![json];
    written.extend(write_plot(report, &dir.join("plots"))?);
    Ok(written)
}

/// Level colours: the same order as the eval plots' palette, so int8 is always the first colour.
fn level_colour(index: usize) -> RGBAColor {
    const COLOURS: [RGBColor; 6] = [
        RGBColor(52, 101, 164),
        RGBColor(245, 121, 0),
        RGBColor(204, 0, 0),
        RGBColor(78, 154, 6),
        RGBColor(117, 80, 123),
        RGBColor(193, 125, 17),
    ];
    COLOURS[index % COLOURS.len()].to_rgba()
}

/// The bar chart: one row per group in forward order (so layers read as the network), one bar per level, length =
/// agreement-mIoU drop in points.
pub fn write_plot(report: &SensitivityReport, dir: &Path) -> Result<Vec<PathBuf>> {
    if report.groups.is_empty() {
        return Ok(Vec::new());
    }
    register_font();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let rows = report.groups.len() as u32;
    let levels = report.groups[0].levels.len().max(1) as u32;
    let height = (160 + rows * (6 * levels + 8)).clamp(400, 6000);
    save_both(
        dir,
        "sensitivity",
        (1100, height),
        |root| damage_bars(root, report),
        |root| damage_bars(root, report),
    )
}

fn damage_bars<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, report: &SensitivityReport) -> DrawResult {
    root.fill(&WHITE).map_err(text_error)?;
    let groups = &report.groups;
    let count = groups.len() as i32;
    let levels = groups[0].levels.len().max(1);
    let top = groups
        .iter()
        .flat_map(|g| g.levels.iter().map(|s| s.damage()))
        .filter(|d| d.is_finite())
        .fold(0.0f64, f64::max);
    // Room on the right for the legend, so it never hides a bar.
    let x_max = if top > 0.0 { top * 1.3 } else { 1.0 };
    let title = format!(
        "Agreement mIoU lost when {} is quantized ({} images)",
        if report.reverse {
            "everything except the group"
        } else {
            "only the group"
        },
        report.images
    );
    let name_width = groups
        .iter()
        .map(|g| label_of(&g.name).chars().count())
        .max()
        .unwrap_or(10);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size((name_width as u32 * 7 + 20).clamp(80, 420))
        .build_cartesian_2d(0.0..x_max, (0..count - 1).into_segmented())
        .map_err(text_error)?;
    let names: Vec<String> = groups.iter().map(|g| label_of(&g.name)).collect();
    let format_group = |value: &SegmentValue<i32>| match value {
        // The first group on top.
        SegmentValue::CenterOf(i) => names.get((count - 1 - *i) as usize).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(groups.len())
        .y_label_formatter(&format_group)
        .x_desc("agreement mIoU lost vs f32, percentage points")
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(text_error)?;
    // Each level gets a slice of its group's row, in pixels: the plotting area's height over the rows.
    let row_px = chart.plotting_area().dim_in_pixel().1 as f64 / count.max(1) as f64;
    let pad = (row_px * 0.12).max(1.0);
    let bar_px = ((row_px - 2.0 * pad) / levels as f64).max(1.0);
    for l in 0..levels {
        let colour = level_colour(l);
        let label = groups[0].levels.get(l).map(|s| s.label.clone()).unwrap_or_default();
        let top = (pad + bar_px * l as f64) as u32;
        let bottom = (row_px - pad - bar_px * (l + 1) as f64).max(0.0) as u32;
        chart
            .draw_series(groups.iter().enumerate().filter_map(|(row, g)| {
                let damage = g.levels.get(l)?.damage();
                if !damage.is_finite() {
                    return None;
                }
                let i = count - 1 - row as i32;
                let mut bar = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (damage.max(0.0), SegmentValue::Exact(i + 1)),
                    ],
                    colour.filled(),
                );
                bar.set_margin(top, bottom, 0, 0);
                Some(bar)
            }))
            .map_err(text_error)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FAMILY, 15))
        .draw()
        .map_err(text_error)?;
    root.present().map_err(text_error)
}

/// A group's name on the chart: without the `segformer.encoder.` prefix every encoder layer shares.
fn label_of(name: &str) -> String {
    name.strip_prefix("segformer.encoder.").unwrap_or(name).to_string()
}

/// The W&B run of a report: its settings as config, the whole-model scores and per group and level the three
/// measures as summary, one history step per group (forward order), and a table of every group and level.
pub fn run_log(report: &SensitivityReport, group: &str, tags: &[String]) -> RunLog {
    let mut config = Map::new();
    config.insert("model".into(), json!(report.model));
    if let Some(d) = &report.dataset {
        config.insert("dataset".into(), json!(d.source));
        config.insert("split".into(), json!(d.split));
    }
    config.insert("granularity".into(), json!(report.granularity));
    config.insert("reverse".into(), json!(report.reverse));
    config.insert("method".into(), json!(report.method));
    config.insert("group_size".into(), json!(report.group_size));
    config.insert(
        "levels".into(),
        json!(report.whole_model.iter().map(|s| s.label.clone()).collect::<Vec<_>>()),
    );
    config.insert("images".into(), json!(report.images));
    config.insert("segq_version".into(), json!(report.segq_version));
    let finite = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
    let mut summary = Map::new();
    for s in &report.whole_model {
        summary.insert(
            format!("whole_model/{}/agreement_miou", s.level),
            finite(s.agreement_miou),
        );
        summary.insert(
            format!("whole_model/{}/kl_divergence", s.level),
            finite(s.kl_divergence),
        );
    }
    let mut history = Vec::new();
    let mut rows = Vec::new();
    for (index, g) in report.groups.iter().enumerate() {
        let mut step = Map::new();
        step.insert("group_index".into(), json!(index));
        for s in &g.levels {
            for (measure, value) in [
                ("agreement_miou", s.agreement_miou),
                ("pixel_agreement", s.pixel_agreement),
                ("kl_divergence", s.kl_divergence),
            ] {
                step.insert(format!("{}/{measure}", s.level), finite(value));
                summary.insert(format!("{}/{}/{measure}", g.name, s.level), finite(value));
            }
            rows.push(vec![
                json!(g.name),
                json!(s.label),
                json!(g.parameters),
                finite(s.agreement_miou),
                finite(s.pixel_agreement),
                finite(s.kl_divergence),
                finite(s.damage()),
            ]);
        }
        history.push(step);
    }
    summary.insert("seconds".into(), finite(report.timing.total_s));
    RunLog {
        name: format!(
            "sensitivity-{}{}",
            report.granularity,
            if report.reverse { "-reverse" } else { "" }
        ),
        group: group.to_string(),
        tags: tags.to_vec(),
        config,
        history,
        summary,
        tables: vec![Table {
            key: "sensitivity".into(),
            columns: [
                "group",
                "level",
                "parameters",
                "agreement_miou",
                "pixel_agreement",
                "kl_divergence",
                "damage_points",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        }],
        images: Vec::new(),
        exit_code: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::sensitivity::{Granularity, Scores, SensitivityReuse, SensitivityTiming};
    use crate::quant::{Level, Method};

    fn scores(level: Level, miou: f64, kl: f64) -> Scores {
        Scores {
            level,
            label: level.name().to_string(),
            agreement_miou: miou,
            pixel_agreement: miou,
            kl_divergence: kl,
            bits_per_weight: 4.0,
        }
    }

    fn report() -> SensitivityReport {
        let group = |name: &str, int2: f64| GroupSensitivity {
            name: name.to_string(),
            starts_at: "block 0.0".into(),
            weights: vec![format!("{name}.weight")],
            parameters: 123_456,
            levels: vec![
                scores(Level::Int8, 1.0, 0.0),
                scores(Level::Int4, 0.999, 1e-5),
                scores(Level::Int2, int2, 0.0123),
            ],
        };
        SensitivityReport {
            segq_version: "0".into(),
            created_utc: "2026-12-02T00:00:00Z".into(),
            model: "m".into(),
            dataset: None,
            granularity: Granularity::Layer,
            reverse: false,
            method: Method::Rtn,
            group_size: None,
            images: 2,
            input_sizes: vec![[256, 256]],
            whole_model: vec![
                scores(Level::Int8, 1.0, 0.0),
                scores(Level::Int4, 0.99, 1e-4),
                scores(Level::Int2, 0.7, 0.03),
            ],
            groups: vec![
                group("segformer.encoder.block.0.0.attention.self.query", 0.95),
                group(
                    "segformer.encoder.block.10.11.attention.output.dense.with.a.long.name",
                    0.5,
                ),
            ],
            timing: SensitivityTiming::default(),
            reuse: SensitivityReuse::default(),
        }
    }

    #[test]
    fn the_table_ranks_worst_first_fits_100_columns_and_writes_no_negative_zero() {
        let table = format_table(&report(), None);
        for line in table.lines() {
            assert!(line.chars().count() <= 100, "{} columns: {line}", line.chars().count());
        }
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .collect();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].contains("-50.00") && rows[0].contains('…'), "{table}");
        assert!(
            rows[1].contains("block.0.0.attention.self.query") && rows[1].contains("-5.00"),
            "{table}"
        );
        assert!(rows[1].contains(" 0.00 ") && !table.contains("-0.00 "), "{table}");
        assert!(table.contains("(every layer)") && table.contains("-30.00"), "{table}");
        let top = format_table(&report(), Some(1));
        assert!(top.contains("1 of 2 groups shown"), "{top}");
    }

    #[test]
    fn the_run_log_has_every_group_and_level() {
        let run = run_log(&report(), "g", &[]);
        assert_eq!(run.name, "sensitivity-layer");
        assert_eq!(run.history.len(), 2);
        assert_eq!(run.tables[0].rows.len(), 6);
        assert_eq!(
            run.summary["segformer.encoder.block.0.0.attention.self.query/int2/kl_divergence"],
            json!(0.0123)
        );
    }
}
