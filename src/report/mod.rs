//! Publishing an evaluation's results as files people read: `results.json`, `summary.csv`, `summary.md`,
//! plots, (through [`overlay`]) coloured prediction masks and sample overlays, and logits as `.npy`;
//! [`ReportWriter`] is the evaluation observer that writes them all when a run is over.

pub mod overlay;
pub mod plots;
pub mod sensitivity;
pub mod table;
pub mod wandb_runs;

use std::path::{Path, PathBuf};

use crate::eval::results::EvalResults;
use crate::eval::{EvalObserver, EvalOutput};
use crate::{Error, Result};

pub use table::{COMPACT_WIDTH, TableWidth, format_table, summary_csv, summary_markdown};

/// Writes every report of `results` into `out_dir` (created if needed) and returns the files written:
/// `results.json`, `summary.csv`, `summary.md`, `recipes/*.toml` (mixed-precision rows) and `plots/*.{png,svg}`
/// (plots that have no data are skipped).
pub fn write_all(results: &EvalResults, out_dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut written = Vec::new();

    let json = out_dir.join("results.json");
    results.write(&json)?;
    written.push(json);

    for (name, text) in [
        ("summary.csv", summary_csv(results)),
        ("summary.md", summary_markdown(results)),
    ] {
        let path = out_dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        written.push(path);
    }

    written.extend(write_recipes(results, &out_dir.join("recipes"))?);
    written.extend(plots::write_plots(results, &out_dir.join("plots"))?);
    tracing::debug!(dir = %out_dir.display(), files = written.len(), "wrote reports");
    Ok(written)
}

/// Writes `recipes/<label>.toml` for every mixed-precision row (searched or given by rules), the file
/// `--recipe` reads to evaluate, quantize or predict with that recipe again.
fn write_recipes(results: &EvalResults, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for level in &results.levels {
        let Some(recipe) = &level.recipe else { continue };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(format!("{}.toml", level.label));
        let mut text = format!("# {}: {:.3} bits per weight", level.label, level.bits_per_weight);
        if let Some(auto) = &level.auto {
            text.push_str(&format!(
                ", searched by --quant {} ({} images, method {})",
                auto.target, auto.images, auto.method
            ));
        }
        text.push_str("\n# segq eval --recipe THIS_FILE (also quantize, predict)\n");
        text.push_str(&recipe.to_toml());
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// Writes every report and the sample overlays of a finished evaluation into one folder, and the partial
/// `results.json` at every checkpoint.
pub struct ReportWriter {
    dir: PathBuf,
}

impl ReportWriter {
    /// A writer into `dir`, which is created now and probed with a file, so that a folder that cannot be written
    /// fails before the evaluation instead of after it.
    pub fn create(dir: impl Into<PathBuf>) -> Result<ReportWriter> {
        let dir = dir.into();
        let cannot = |e: std::io::Error| Error::write(&dir, format!("cannot write the output folder: {e}"));
        if dir.exists() && !dir.is_dir() {
            return Err(Error::write(&dir, "the output folder is a file"));
        }
        std::fs::create_dir_all(&dir).map_err(cannot)?;
        let probe = dir.join(".segq-write-probe");
        std::fs::write(&probe, b"").map_err(cannot)?;
        std::fs::remove_file(&probe).map_err(cannot)?;
        Ok(ReportWriter { dir })
    }

    /// `results.json`, summaries and plots ([`write_all`]) plus `samples/` overlays (the first examples, and each
    /// level's worst images in `samples/worst/<level>/`); returns the files written.
    pub fn write(&self, output: &EvalOutput) -> Result<Vec<PathBuf>> {
        let mut written = write_all(&output.results, &self.dir)?;
        written.extend(overlay::save_sample_overlays(
            &output.samples,
            &self.dir.join("samples"),
        )?);
        // Overlays an earlier run left in this folder would pass for this run's worst images.
        for level in &output.results.levels {
            overlay::clear_pngs(&self.dir.join("samples").join("worst").join(&level.label))?;
        }
        written.extend(overlay::save_worst_overlays(&output.worst, &self.dir)?);
        tracing::debug!(
            out = %self.dir.display(),
            files = written.len(),
            complete = output.results.complete,
            "results written"
        );
        Ok(written)
    }
}

impl EvalObserver for ReportWriter {
    fn checkpoint(&mut self, partial: &EvalResults) -> Result<()> {
        partial.write(&self.dir.join("results.json"))
    }

    fn finished(&mut self, output: &EvalOutput) -> Result<()> {
        self.write(output).map(drop)
    }
}

/// Copies the overlays of a merge's worst images from the shard folders into `out`, renamed to their merged
/// rank (so the merged folder reads like an unsharded run's); `part_dirs[i]` is the folder of `parts[i]`. An
/// overlay missing from its shard (results.json copied without its samples/) is warned about once and listed
/// without an overlay. Call before writing the merged results. Returns the files copied.
pub fn copy_worst_overlays(
    merged: &mut EvalResults,
    parts: &[EvalResults],
    part_dirs: &[PathBuf],
    out: &Path,
) -> Result<Vec<PathBuf>> {
    for level in &merged.levels {
        overlay::clear_pngs(&out.join("samples").join("worst").join(&level.label))?;
    }
    let mut copied = Vec::new();
    for (position, source, target) in crate::eval::merge::worst_overlay_sources(merged, parts) {
        let from = part_dirs[position].join(&source);
        let to = out.join(&target);
        if !from.is_file() {
            continue;
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
        copied.push(to);
    }
    let unresolved: Vec<String> = merged
        .levels
        .iter()
        .flat_map(|l| l.worst_images.iter().filter_map(|w| w.overlay.clone()))
        .filter(|path| !copied.iter().any(|c| c == &out.join(path)))
        .collect();
    if !unresolved.is_empty() {
        tracing::warn!(
            overlays = unresolved.len(),
            first = %unresolved[0],
            "worst-image overlays not found in the shard folders; listed without overlays"
        );
        for level in &mut merged.levels {
            for image in &mut level.worst_images {
                if image.overlay.as_ref().is_some_and(|p| unresolved.contains(p)) {
                    image.overlay = None;
                }
            }
        }
    }
    Ok(copied)
}

/// Writes a little-endian float32 C-order `.npy` (format version 1.0), as `numpy.load` reads it.
pub fn write_npy_f32(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_str = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // Magic (6) + version (2) + length (2) + header + newline must be a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::results::LevelStatus;
    use crate::eval::results::test_support::run;

    #[test]
    fn write_all_writes_every_report_and_they_parse_back() {
        let dir = std::env::temp_dir().join(format!("segq-report-{}", std::process::id()));
        let mut results = run(0..8, 8, None);
        results.levels[1].status = LevelStatus::Failed {
            reason: "weights, \"int8\" missing".into(),
        };
        results.levels[1].confusion = None;
        results.levels[1].agreement = None;
        let written = write_all(&results, &dir).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        for expected in [
            "results.json",
            "summary.csv",
            "summary.md",
            "plots/miou_vs_bits.png",
            "plots/miou_vs_bits.svg",
            "plots/throughput.png",
            "plots/throughput.svg",
            "plots/class_iou_drop.png",
            "plots/class_iou_drop.svg",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
            assert!(
                std::fs::metadata(dir.join(expected)).unwrap().len() > 100,
                "{expected} is empty"
            );
        }

        let back = EvalResults::read(&dir.join("results.json")).unwrap();
        assert_eq!(back.levels.len(), 3);
        assert_eq!(back.levels[2].confusion, results.levels[2].confusion);

        let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0].split(',').collect::<Vec<_>>(), table::csv_columns());
        assert_eq!(lines.len(), 4);
        let int4: Vec<&str> = lines[3].split(',').collect();
        assert_eq!(int4.len(), table::csv_columns().len());
        assert_eq!(int4[0], "int4-hqq-g64");
        let miou: f64 = int4[3].parse().unwrap();
        assert_eq!(miou, results.levels[2].miou());
        let delta: f64 = int4[4].parse().unwrap();
        assert_eq!(delta, results.delta_miou(&results.levels[2]));
        assert_eq!(*int4.last().unwrap(), "ok");
        // The failed level: empty score fields and its reason quoted (it holds a comma and quotes).
        assert!(lines[2].starts_with("int8,rtn,8.25,,,,,,,"), "{}", lines[2]);
        assert!(
            lines[2].ends_with(r#","failed: weights, ""int8"" missing""#),
            "{}",
            lines[2]
        );

        let markdown = std::fs::read_to_string(dir.join("summary.md")).unwrap();
        assert!(markdown.contains("| level | method | bits/weight | mIoU % | Δ mIoU vs f32 |"));
        let percent = format!("| {:.2} | {:+.2} |", miou * 100.0, delta * 100.0);
        assert!(markdown.contains(&percent), "{percent} not in\n{markdown}");

        for (plot, size) in [
            ("miou_vs_bits", plots::BITS_PLOT_SIZE),
            ("throughput", (1000, 700)),
            ("class_iou_drop", (1000, 650)),
        ] {
            let png = image::open(dir.join(format!("plots/{plot}.png"))).unwrap();
            assert_eq!((png.width(), png.height()), size, "{plot}");
            // Text was drawn: some pixels are dark (axes, labels), many are white.
            let grey = png.to_luma8();
            assert!(
                grey.pixels().filter(|p| p.0[0] < 60).count() > 500,
                "{plot}.png has almost no dark pixels"
            );
            let svg = std::fs::read_to_string(dir.join(format!("plots/{plot}.svg"))).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("<text"), "{plot}.svg");
        }
        let svg = std::fs::read_to_string(dir.join("plots/class_iou_drop.svg")).unwrap();
        assert!(svg.contains("int4-hqq-g64"), "the worst level is named");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn intervals_that_include_zero_are_flagged_not_significant() {
        let mut results = run(0..8, 8, None);
        results.refresh_summaries();
        let markdown = summary_markdown(&results);
        assert!(markdown.contains("Δ mIoU 95% CI") && markdown.contains("agreement mIoU 95% CI"));
        assert!(markdown.contains("paired bootstrap over the 8 images"), "{markdown}");
        let int8 = results.levels[1].summary.as_mut().unwrap();
        int8.delta_miou_ci = Some([-0.01, 0.02]);
        int8.delta_miou_significant = Some(false);
        let markdown = summary_markdown(&results);
        let row = markdown.lines().find(|l| l.starts_with("| int8")).unwrap();
        assert!(row.contains("[-1.00, +2.00]†"), "{row}");
        assert!(markdown.contains("† the interval includes 0"), "{markdown}");
        // The reference row's [0, 0] is never flagged.
        let f32_row = markdown.lines().find(|l| l.starts_with("| f32")).unwrap();
        assert!(
            f32_row.contains("[+0.00, +0.00]") && !f32_row.contains('†'),
            "{f32_row}"
        );
        // CSV: bounds as fractions and the flag.
        let csv = summary_csv(&results);
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let int8: Vec<&str> = csv
            .lines()
            .find(|l| l.starts_with("int8"))
            .unwrap()
            .split(',')
            .collect();
        let field = |name: &str| int8[header.iter().position(|h| *h == name).unwrap()];
        assert_eq!(
            (
                field("delta_miou_ci_low"),
                field("delta_miou_ci_high"),
                field("delta_miou_significant")
            ),
            ("-0.01", "0.02", "false")
        );
        // Without a bootstrap: dashes, empty CSV fields, no footnote.
        results.bootstrap = None;
        results.refresh_summaries();
        let markdown = summary_markdown(&results);
        assert!(!markdown.contains("paired bootstrap"), "{markdown}");
        let csv = summary_csv(&results);
        let int8: Vec<&str> = csv
            .lines()
            .find(|l| l.starts_with("int8"))
            .unwrap()
            .split(',')
            .collect();
        assert_eq!(int8.len(), header.len());
        assert_eq!(int8[header.iter().position(|h| *h == "delta_miou_ci_low").unwrap()], "");
    }

    #[test]
    fn terminal_table_aligns_columns() {
        let results = run(0..5, 5, Some((0, 2)));
        let table = format_table(&results, TableWidth::Wide);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("shard 0/2"), "{}", lines[0]);
        let header = lines[1];
        assert!(header.starts_with("level"));
        // Numeric columns are right-aligned: each value ends where its header ends.
        // Positions in characters: the header holds a multi-byte "Δ".
        let end_of = |name: &str| header[..header.find(name).unwrap()].chars().count() + name.chars().count();
        for line in &lines[2..] {
            let chars: Vec<char> = line.chars().collect();
            for name in ["mIoU %", "weight MB", "peak RSS MB"] {
                let end = end_of(name);
                let last = chars[end - 1];
                assert!(last.is_ascii_digit() || last == '-', "{name} misaligned in {line:?}");
                assert_eq!(chars[end], ' ', "{name} misaligned in {line:?}");
            }
        }
        assert_eq!(lines.len(), 2 + results.levels.len());
    }

    #[test]
    fn compact_table_fits_100_columns_and_names_failures_below() {
        let mut results = run(0..5, 5, Some((0, 2)));
        results.model.source = "nvidia/segformer-b0-finetuned-ade-512-512".into();
        results.dataset.source = "scene_parse_150 (Hub, Parquet conversion of the validation split)".into();
        results.levels[1].status = LevelStatus::Failed {
            reason: "forward pass failed: a reason long enough to wrap any terminal if it were put in a cell".into(),
        };
        results.refresh_summaries();
        let table = format_table(&results, TableWidth::Compact);
        let lines: Vec<&str> = table.lines().collect();
        for line in &lines {
            assert!(
                line.chars().count() <= COMPACT_WIDTH,
                "{} chars: {line:?}",
                line.chars().count()
            );
        }
        let header = lines.iter().find(|l| l.starts_with("level")).unwrap();
        for name in [
            "bits/w",
            "mIoU %",
            "Δ mIoU",
            "95% CI",
            "agree mIoU %",
            "model ms",
            "memory MB",
            "status",
        ] {
            assert!(header.contains(name), "{name} missing from {header:?}");
        }
        assert!(
            !header.contains("p95"),
            "the compact table leaves the latency tail to summary.md"
        );
        // The intervals: the noisy int4 level's, in points, and the footnote saying how they were drawn.
        let [low, high] = results.levels[2].summary.as_ref().unwrap().delta_miou_ci.unwrap();
        let int4 = lines.iter().find(|l| l.starts_with("int4")).unwrap();
        assert!(
            int4.contains(&format!("[{:+.2}, {:+.2}]", low * 100.0, high * 100.0)),
            "{int4}"
        );
        assert!(
            table.contains("paired bootstrap over the 5 images (200 resamples, seed 42)"),
            "{table}"
        );
        let mut without = results.clone();
        without.bootstrap = None;
        without.refresh_summaries();
        let plain = format_table(&without, TableWidth::Compact);
        assert!(!plain.contains("95% CI") && !plain.contains("bootstrap"), "{plain}");
        let failed = &results.levels[1].label;
        assert!(table.contains("FAILED"), "{table}");
        assert!(
            lines
                .last()
                .unwrap()
                .starts_with(&format!("{failed} failed: forward pass failed")),
            "{table}"
        );
        // The wide table has every column, as summary.md does.
        let wide = format_table(&results, TableWidth::Wide);
        assert!(wide.lines().nth(1).unwrap().contains("p95 ms"));
        assert!(wide.lines().any(|l| l.chars().count() > COMPACT_WIDTH));
    }

    #[test]
    fn no_plots_without_data() {
        let dir = std::env::temp_dir().join(format!("segq-report-empty-{}", std::process::id()));
        let mut results = run(0..0, 0, None);
        for level in &mut results.levels {
            level.status = LevelStatus::Failed {
                reason: "model did not load".into(),
            };
            level.confusion = None;
        }
        let written = write_all(&results, &dir).unwrap();
        assert_eq!(written.len(), 3, "{written:?}");
        assert!(!dir.join("plots").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_single_level_gets_no_class_drop_plot() {
        let dir = std::env::temp_dir().join(format!("segq-report-single-{}", std::process::id()));
        let mut results = run(0..3, 3, None);
        results.levels.truncate(1);
        let written = write_all(&results, &dir).unwrap();
        let plots: Vec<_> = written.iter().filter(|p| p.starts_with(dir.join("plots"))).collect();
        assert_eq!(plots.len(), 4, "{plots:?}");
        assert!(!dir.join("plots/class_iou_drop.png").exists());
        assert!(plots::worst_class_drops(&results).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
