//! The per-level summary table, in three renderings with the same content: CSV (raw fractions and full
//! precision, for programs), Markdown and aligned terminal text (percentages and rounded figures, for people).

use crate::eval::results::{EvalResults, LevelResult, LevelStatus};

const MB: f64 = 1e6;

/// One column: CSV name, human header, how the human rendering scales and rounds the value.
struct Column {
    csv: &'static str,
    header: &'static str,
    style: Style,
}

#[derive(Clone, Copy)]
enum Style {
    Text,
    /// A fraction shown as a percentage with two decimals.
    Percent,
    /// A fraction difference shown in percentage points with a sign.
    SignedPoints,
    Decimals(usize),
}

const COLUMNS: &[Column] = &[
    Column {
        csv: "level",
        header: "level",
        style: Style::Text,
    },
    Column {
        csv: "method",
        header: "method",
        style: Style::Text,
    },
    Column {
        csv: "bits_per_weight",
        header: "bits/weight",
        style: Style::Decimals(2),
    },
    Column {
        csv: "miou",
        header: "mIoU %",
        style: Style::Percent,
    },
    Column {
        csv: "delta_miou_vs_f32",
        header: "Δ mIoU vs f32",
        style: Style::SignedPoints,
    },
    Column {
        csv: "mean_accuracy",
        header: "mean acc %",
        style: Style::Percent,
    },
    Column {
        csv: "overall_accuracy",
        header: "overall acc %",
        style: Style::Percent,
    },
    Column {
        csv: "pixel_agreement_f32",
        header: "pixel agreement f32 %",
        style: Style::Percent,
    },
    Column {
        csv: "agreement_miou",
        header: "agreement mIoU %",
        style: Style::Percent,
    },
    Column {
        csv: "weight_mb",
        header: "weight MB",
        style: Style::Decimals(2),
    },
    Column {
        csv: "ratio_to_f32",
        header: "ratio to f32",
        style: Style::Decimals(3),
    },
    Column {
        csv: "load_s",
        header: "load s",
        style: Style::Decimals(2),
    },
    Column {
        csv: "model_median_ms",
        header: "model median ms",
        style: Style::Decimals(1),
    },
    Column {
        csv: "model_p95_ms",
        header: "p95 ms",
        style: Style::Decimals(1),
    },
    Column {
        csv: "images_per_s_model",
        header: "images/s model",
        style: Style::Decimals(2),
    },
    Column {
        csv: "images_per_s_pipeline",
        header: "images/s pipeline",
        style: Style::Decimals(2),
    },
    Column {
        csv: "peak_rss_mb",
        header: "peak RSS MB",
        style: Style::Decimals(1),
    },
    Column {
        csv: "status",
        header: "status",
        style: Style::Text,
    },
];

enum Cell {
    Text(String),
    /// NaN means "not available" and renders as an empty CSV field or a dash.
    Number(f64),
}

fn row(results: &EvalResults, level: &LevelResult) -> Vec<Cell> {
    let metrics = level.metrics();
    let agreement = level.agreement_metrics();
    let metric = |get: fn(&crate::eval::metrics::MeanIou) -> f64| metrics.as_ref().map_or(f64::NAN, get);
    let status = match &level.status {
        LevelStatus::Ok => "ok".to_string(),
        LevelStatus::Failed { reason } => format!("failed: {reason}"),
    };
    vec![
        Cell::Text(level.label.clone()),
        Cell::Text(level.method.to_string()),
        Cell::Number(level.bits_per_weight),
        Cell::Number(metric(|m| m.mean_iou)),
        Cell::Number(results.delta_miou(level)),
        Cell::Number(metric(|m| m.mean_accuracy)),
        Cell::Number(metric(|m| m.overall_accuracy)),
        Cell::Number(agreement.map_or(f64::NAN, |a| a.pixel_agreement)),
        Cell::Number(agreement.map_or(f64::NAN, |a| a.miou)),
        Cell::Number(level.weight_bytes_memory as f64 / MB),
        Cell::Number(level.ratio_to_f32),
        Cell::Number(level.load_time_s),
        Cell::Number(level.model_median_ms()),
        Cell::Number(level.model_p95_ms()),
        Cell::Number(level.images_per_s_model()),
        Cell::Number(level.images_per_s_pipeline()),
        Cell::Number(level.peak_rss_bytes as f64 / MB),
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
            Style::Text => value.to_string(),
        },
    }
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
    let mut out = COLUMNS.iter().map(|c| c.csv).collect::<Vec<_>>().join(",");
    out.push('\n');
    for level in &results.levels {
        let fields: Vec<String> = row(results, level)
            .iter()
            .map(|cell| match cell {
                Cell::Text(text) => csv_field(text),
                Cell::Number(value) if value.is_finite() => value.to_string(),
                Cell::Number(_) => String::new(),
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
    out
}

/// The summary table for a terminal: caption, then columns aligned (text left, numbers right).
pub fn format_table(results: &EvalResults) -> String {
    let rows = human_rows(results);
    let widths: Vec<usize> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([c.header.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let render = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(COLUMNS)
            .zip(&widths)
            .map(|((cell, column), &width)| {
                let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
                if matches!(column.style, Style::Text) {
                    format!("{cell}{pad}")
                } else {
                    format!("{pad}{cell}")
                }
            })
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = caption(results);
    out.push('\n');
    out.push_str(&render(COLUMNS.iter().map(|c| c.header).collect()));
    out.push('\n');
    for cells in &rows {
        out.push_str(&render(cells.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// Column names of `summary.csv`, in order.
pub fn csv_columns() -> Vec<&'static str> {
    COLUMNS.iter().map(|c| c.csv).collect()
}
