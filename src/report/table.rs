//! The per-level summary table, in three renderings: CSV (raw fractions and full precision, for programs),
//! Markdown and aligned terminal text (percentages and rounded figures, for people). CSV, Markdown and the wide
//! terminal table hold every column; the default terminal table holds the few a person reads first and fits 100
//! columns. Bootstrap intervals are one `[low, high]` column for people (marked `†` where a difference to f32 is
//! not significant, with a footnote) and `_low`/`_high` fields in CSV.

use crate::eval::results::{EvalResults, LevelResult, LevelStatus};

const MB: f64 = 1e6;

/// One column: CSV name, human header, how the human rendering scales and rounds the value, and its short header
/// when the compact terminal table shows it.
struct Column {
    csv: &'static str,
    header: &'static str,
    style: Style,
    compact: Option<&'static str>,
}

#[derive(Clone, Copy)]
enum Style {
    Text,
    /// A fraction shown as a percentage with two decimals.
    Percent,
    /// A fraction difference shown in percentage points with a sign.
    SignedPoints,
    Decimals(usize),
    /// A `[low, high]` interval of fractions: signed points (`signed`) or percentages; in CSV the fields `csv`
    /// (low, high) and, where given, a `true`/`false` significance field.
    Interval {
        signed: bool,
        csv: [&'static str; 2],
        significant_csv: Option<&'static str>,
    },
}

/// Marks an interval of Δ mIoU that includes 0.
const NOT_SIGNIFICANT: &str = "†";

const COLUMNS: &[Column] = &[
    Column {
        csv: "level",
        header: "level",
        style: Style::Text,
        compact: Some("level"),
    },
    Column {
        csv: "method",
        header: "method",
        style: Style::Text,
        compact: None,
    },
    Column {
        csv: "bits_per_weight",
        header: "bits/weight",
        style: Style::Decimals(2),
        compact: Some("bits/w"),
    },
    Column {
        csv: "miou",
        header: "mIoU %",
        style: Style::Percent,
        compact: Some("mIoU %"),
    },
    Column {
        csv: "delta_miou_vs_f32",
        header: "Δ mIoU vs f32",
        style: Style::SignedPoints,
        compact: Some("Δ mIoU"),
    },
    Column {
        csv: "delta_miou_ci",
        header: "Δ mIoU 95% CI",
        style: Style::Interval {
            signed: true,
            csv: ["delta_miou_ci_low", "delta_miou_ci_high"],
            significant_csv: Some("delta_miou_significant"),
        },
        compact: Some("95% CI"),
    },
    Column {
        csv: "mean_accuracy",
        header: "mean acc %",
        style: Style::Percent,
        compact: None,
    },
    Column {
        csv: "overall_accuracy",
        header: "overall acc %",
        style: Style::Percent,
        compact: None,
    },
    Column {
        csv: "pixel_agreement_f32",
        header: "pixel agreement f32 %",
        style: Style::Percent,
        compact: None,
    },
    Column {
        csv: "agreement_miou",
        header: "agreement mIoU %",
        style: Style::Percent,
        compact: Some("agree mIoU %"),
    },
    Column {
        csv: "agreement_miou_ci",
        header: "agreement mIoU 95% CI",
        style: Style::Interval {
            signed: false,
            csv: ["agreement_miou_ci_low", "agreement_miou_ci_high"],
            significant_csv: None,
        },
        compact: None,
    },
    Column {
        csv: "weight_mb",
        header: "weight MB",
        style: Style::Decimals(2),
        // Left to the wide table for the interval's room; `bits/w` and `memory MB` tell the size.
        compact: None,
    },
    Column {
        csv: "ratio_to_f32",
        header: "ratio to f32",
        style: Style::Decimals(3),
        compact: None,
    },
    Column {
        csv: "load_s",
        header: "load s",
        style: Style::Decimals(2),
        compact: None,
    },
    Column {
        csv: "model_median_ms",
        header: "model median ms",
        style: Style::Decimals(1),
        compact: Some("model ms"),
    },
    Column {
        csv: "model_p95_ms",
        header: "p95 ms",
        style: Style::Decimals(1),
        compact: None,
    },
    Column {
        csv: "images_per_s_model",
        header: "images/s model",
        style: Style::Decimals(2),
        compact: None,
    },
    Column {
        csv: "images_per_s_pipeline",
        header: "images/s pipeline",
        style: Style::Decimals(2),
        compact: None,
    },
    Column {
        csv: "peak_rss_mb",
        header: "peak RSS MB",
        style: Style::Decimals(1),
        compact: None,
    },
    Column {
        csv: "inference_mb",
        header: "inference MB",
        style: Style::Decimals(1),
        compact: Some("memory MB"),
    },
    Column {
        csv: "status",
        header: "status",
        style: Style::Text,
        compact: Some("status"),
    },
];

enum Cell {
    Text(String),
    /// NaN means "not available" and renders as an empty CSV field or a dash.
    Number(f64),
    /// `[low, high]` and whether it excludes 0 (`None`: not asked, e.g. the reference row).
    Interval(Option<[f64; 2]>, Option<bool>),
}

fn row(results: &EvalResults, level: &LevelResult) -> Vec<Cell> {
    let metrics = level.metrics();
    let agreement = level.agreement_metrics();
    let metric = |get: fn(&crate::eval::metrics::MeanIou) -> f64| metrics.as_ref().map_or(f64::NAN, get);
    let status = match &level.status {
        LevelStatus::Ok => "ok".to_string(),
        LevelStatus::Failed { reason } => format!("failed: {reason}"),
    };
    let summary = level.summary.as_ref();
    vec![
        Cell::Text(level.label.clone()),
        Cell::Text(level.method.to_string()),
        Cell::Number(level.bits_per_weight),
        Cell::Number(metric(|m| m.mean_iou)),
        Cell::Number(results.delta_miou(level)),
        Cell::Interval(
            summary.and_then(|s| s.delta_miou_ci),
            summary.and_then(|s| s.delta_miou_significant),
        ),
        Cell::Number(metric(|m| m.mean_accuracy)),
        Cell::Number(metric(|m| m.overall_accuracy)),
        Cell::Number(agreement.map_or(f64::NAN, |a| a.pixel_agreement)),
        Cell::Number(agreement.map_or(f64::NAN, |a| a.miou)),
        Cell::Interval(summary.and_then(|s| s.agreement_miou_ci), None),
        Cell::Number(level.weight_bytes_memory as f64 / MB),
        Cell::Number(level.ratio_to_f32),
        Cell::Number(level.load_time_s),
        // Fake-quantized activations run slower than a real kernel would: their speed says nothing.
        if level.level.simulated_activations() {
            Cell::Text("simulated".into())
        } else {
            Cell::Number(level.model_median_ms())
        },
        Cell::Number(level.model_p95_ms()),
        Cell::Number(level.images_per_s_model()),
        Cell::Number(level.images_per_s_pipeline()),
        Cell::Number(level.peak_rss_bytes as f64 / MB),
        Cell::Number(level.inference_bytes() / MB),
        Cell::Text(status),
    ]
}

fn human(cell: &Cell, style: Style) -> String {
    match cell {
        Cell::Text(text) => text.clone(),
        Cell::Number(value) if !value.is_finite() => "-".into(),
        Cell::Number(value) => match style {
            Style::Percent => format!("{:.2}", value * 100.0),
            Style::SignedPoints => format!("{:+.2}", value * 100.0),
            Style::Decimals(places) => format!("{value:.places$}"),
            Style::Text | Style::Interval { .. } => value.to_string(),
        },
        Cell::Interval(None, _) => "-".into(),
        Cell::Interval(Some([low, high]), significant) => {
            let (low, high) = (low * 100.0, high * 100.0);
            let mark = if *significant == Some(false) {
                NOT_SIGNIFICANT
            } else {
                ""
            };
            match style {
                Style::Interval { signed: true, .. } => format!("[{low:+.2}, {high:+.2}]{mark}"),
                _ => format!("[{low:.2}, {high:.2}]{mark}"),
            }
        }
    }
}

/// The line under a table that says how its intervals were drawn and what `†` means; `None` without intervals.
fn interval_footnote(results: &EvalResults) -> Option<String> {
    let settings = results.bootstrap?;
    let images = results.baseline()?.per_image.len();
    let any = results
        .levels
        .iter()
        .any(|l| l.summary.as_ref().is_some_and(|s| s.delta_miou_ci.is_some()));
    if !any {
        return None;
    }
    let baseline = results.baseline().map_or("f32", |b| b.label.as_str());
    Some(format!(
        "95% CI: paired bootstrap over the {images} images ({} resamples, seed {}); {NOT_SIGNIFICANT} the interval \
         includes 0: the difference to {baseline} is not significant on these images.",
        settings.resamples, settings.seed
    ))
}

/// The calibration images of the calibrated rows (gptq, awq, static levels), when any row used them.
fn calibration_footnote(results: &EvalResults) -> Option<String> {
    let c = results.calibration.as_ref()?;
    let shared = if c.overlap > 0 {
        format!(", {} of them also evaluated (--calib-allow-overlap)", c.overlap)
    } else {
        ", none evaluated".to_string()
    };
    let skipped = if c.skipped > 0 {
        format!(", {} unreadable skipped", c.skipped)
    } else {
        String::new()
    };
    let fallbacks = results.levels.iter().map(|l| l.fallbacks.len()).max().unwrap_or(0);
    let fallbacks = if fallbacks > 0 {
        format!(
            "; layers without statistics (depthwise convolutions, {fallbacks}) use {}",
            results
                .levels
                .iter()
                .flat_map(|l| l.fallbacks.iter().map(|f| f.method.name()))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join("/")
        )
    } else {
        String::new()
    };
    Some(format!(
        "Calibrated rows: {} images of {} ({} split, seed {}, set {}{shared}{skipped}), {:.1} s{fallbacks}.",
        c.images, c.source, c.split, c.seed, c.set_id, c.seconds
    ))
}

fn human_rows(results: &EvalResults) -> Vec<Vec<String>> {
    results
        .levels
        .iter()
        .map(|level| {
            row(results, level)
                .iter()
                .zip(COLUMNS)
                .map(|(cell, c)| human(cell, c.style))
                .collect()
        })
        .collect()
}

/// CSV quoting: fields with a comma, quote or line break are quoted, quotes doubled.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.into()
    }
}

/// `summary.csv`: one row per level, fractions as fractions, full precision, empty fields for missing values.
pub fn summary_csv(results: &EvalResults) -> String {
    let mut out = csv_columns().join(",");
    out.push('\n');
    for level in &results.levels {
        let fields: Vec<String> = row(results, level)
            .iter()
            .zip(COLUMNS)
            .flat_map(|(cell, column)| match cell {
                Cell::Text(text) => vec![csv_field(text)],
                Cell::Number(value) if value.is_finite() => vec![value.to_string()],
                Cell::Number(_) => vec![String::new()],
                Cell::Interval(bounds, significant) => {
                    let number = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
                    let mut fields = vec![number(bounds.map(|b| b[0])), number(bounds.map(|b| b[1]))];
                    if let Style::Interval {
                        significant_csv: Some(_),
                        ..
                    } = column.style
                    {
                        fields.push(significant.map_or(String::new(), |s| s.to_string()));
                    }
                    fields
                }
            })
            .collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// A short description of what was evaluated, the same above the Markdown and terminal tables.
fn caption(results: &EvalResults) -> String {
    let dataset = &results.dataset;
    let mut text = format!(
        "{} on {} ({}), {} of {} selected examples evaluated",
        results.model.source, dataset.source, dataset.split, results.counts.evaluated, dataset.examples_total_selected
    );
    if let Some((index, count)) = dataset.shard {
        text.push_str(&format!(", shard {index}/{count}"));
    }
    if results.counts.skipped > 0 {
        text.push_str(&format!(", {} skipped", results.counts.skipped));
    }
    if !results.complete {
        text.push_str(" (INCOMPLETE)");
    }
    text
}

/// `summary.md`: a caption and a Markdown table (percentages, rounded figures).
pub fn summary_markdown(results: &EvalResults) -> String {
    let escape = |text: &str| text.replace('|', "\\|");
    let mut out = format!("# segq evaluation\n\n{}\n\n", escape(&caption(results)));
    out.push_str(&format!(
        "| {} |\n",
        COLUMNS.iter().map(|c| c.header).collect::<Vec<_>>().join(" | ")
    ));
    let rule: Vec<&str> = COLUMNS
        .iter()
        .map(|c| if matches!(c.style, Style::Text) { "---" } else { "---:" })
        .collect();
    out.push_str(&format!("| {} |\n", rule.join(" | ")));
    for cells in human_rows(results) {
        let cells: Vec<String> = cells.iter().map(|c| escape(c)).collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    if let Some(footnote) = interval_footnote(results) {
        out.push_str(&format!("\n{}\n", escape(&footnote)));
    }
    if let Some(footnote) = calibration_footnote(results) {
        out.push_str(&format!("\n{}\n", escape(&footnote)));
    }
    out.push_str(&worst_images_markdown(results));
    out
}

/// The "Worst images" section of summary.md: per level, its listed images worst first, linked to their overlays;
/// empty when no level lists any.
pub fn worst_images_markdown(results: &EvalResults) -> String {
    let escape = |text: &str| text.replace('|', "\\|");
    let listed: Vec<_> = results.levels.iter().filter(|l| !l.worst_images.is_empty()).collect();
    if listed.is_empty() {
        return String::new();
    }
    let reference = results.baseline().map_or("the reference", |b| b.label.as_str());
    let mut out = format!(
        "\n## Worst images\n\nPer level, the images whose prediction differs from {} on the largest fraction of scored \
         pixels. Each overlay shows the image, the {} prediction, the level's, and in red where they differ.\n",
        escape(reference),
        escape(reference)
    );
    for level in listed {
        out.push_str(&format!(
            "\n### {}\n\n| rank | image | row | pixels differing | overlay |\n| ---: | --- | ---: | ---: | --- |\n",
            escape(&level.label)
        ));
        for (rank, image) in level.worst_images.iter().enumerate() {
            let overlay = match &image.overlay {
                Some(path) => format!("[{}](<{}>)", escape(path.rsplit('/').next().unwrap_or(path)), path),
                None => "-".to_string(),
            };
            out.push_str(&format!(
                "| {} | {} | {} | {:.2}% ({} of {}) | {} |\n",
                rank + 1,
                escape(&image.id),
                image.index,
                image.loss * 100.0,
                image.disagreeing_pixels,
                image.pixels,
                overlay
            ));
        }
    }
    out
}

/// How much of the table a terminal gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableWidth {
    /// The columns a person reads first (level, bits, mIoU and its change, agreement, size, speed, memory,
    /// status), within 100 characters for the usual labels; failure reasons follow the table.
    Compact,
    /// Every column, as in summary.md.
    Wide,
}

/// The terminal width the compact table is made to fit.
pub const COMPACT_WIDTH: usize = 100;

/// The summary table for a terminal: caption, then columns aligned (text left, numbers right).
pub fn format_table(results: &EvalResults, width: TableWidth) -> String {
    let rows = human_rows(results);
    let footnote = interval_footnote(results);
    let shown: Vec<(usize, &str)> = COLUMNS
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match width {
            TableWidth::Wide => Some((i, c.header)),
            // A run without intervals (bootstrap off, older files) keeps the compact table free of empty columns.
            TableWidth::Compact if footnote.is_none() && matches!(c.style, Style::Interval { .. }) => None,
            TableWidth::Compact => c.compact.map(|short| (i, short)),
        })
        .collect();
    let cell = |row: &[String], i: usize| -> String {
        // The compact status is one word; the reasons are listed under the table.
        if width == TableWidth::Compact && COLUMNS[i].csv == "status" && row[i].starts_with("failed") {
            "FAILED".to_string()
        } else {
            row[i].clone()
        }
    };
    let widths: Vec<usize> = shown
        .iter()
        .map(|&(i, header)| {
            rows.iter()
                .map(|r| cell(r, i).chars().count())
                .chain([header.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let render = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&shown)
            .zip(&widths)
            .map(|((cell, &(i, _)), &width)| {
                let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
                if matches!(COLUMNS[i].style, Style::Text) {
                    format!("{cell}{pad}")
                } else {
                    format!("{pad}{cell}")
                }
            })
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = match width {
        TableWidth::Wide => caption(results),
        TableWidth::Compact => wrap_caption(&caption(results), COMPACT_WIDTH),
    };
    out.push('\n');
    out.push_str(&render(shown.iter().map(|(_, h)| h.to_string()).collect()));
    out.push('\n');
    for r in &rows {
        out.push_str(&render(shown.iter().map(|&(i, _)| cell(r, i)).collect()));
        out.push('\n');
    }
    if let Some(footnote) = footnote {
        let footnote = match width {
            TableWidth::Wide => footnote,
            TableWidth::Compact => wrap_caption(&footnote, COMPACT_WIDTH),
        };
        out.push_str(&footnote);
        out.push('\n');
    }
    if let Some(footnote) = calibration_footnote(results) {
        let footnote = match width {
            TableWidth::Wide => footnote,
            TableWidth::Compact => wrap_caption(&footnote, COMPACT_WIDTH),
        };
        out.push_str(&footnote);
        out.push('\n');
    }
    if width == TableWidth::Compact {
        for level in &results.levels {
            if let LevelStatus::Failed { reason } = &level.status {
                out.push_str(&format!("{} failed: {reason}\n", level.label));
            }
        }
    }
    out
}

/// Breaks a caption into lines of at most `width` characters at spaces (a word longer than that, such as a long
/// path, stays whole on its own line).
pub(crate) fn wrap_caption(text: &str, width: usize) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines.join("\n")
}

/// Column names of `summary.csv`, in order (an interval column is its `_low` and `_high` fields, and Δ mIoU's
/// significance).
pub fn csv_columns() -> Vec<&'static str> {
    COLUMNS
        .iter()
        .flat_map(|c| match c.style {
            Style::Interval {
                csv, significant_csv, ..
            } => csv.into_iter().chain(significant_csv).collect(),
            _ => vec![c.csv],
        })
        .collect()
}
