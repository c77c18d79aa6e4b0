//! Combining the result files of a sharded evaluation into the result of one run, and finding this process's
//! shard from a cluster scheduler's environment (`--shard auto`).
//!
//! Shard rule (shared with the data loader): shard `i` of `n` covers the contiguous rows
//! `[i * len / n, (i + 1) * len / n)` of the selection, so concatenating shards in index order gives the
//! unsharded order. Merging sums confusion matrices and counts and concatenates per-image latencies and per-image
//! class counts, so every count-derived number (mIoU, accuracies, agreement, latency quantiles, and the bootstrap
//! intervals, drawn over the images in index order with the shards' recorded seed) equals the unsharded run's
//! exactly. Each level's worst images are the global top-K of the shards' lists (each shard's top-K holds every
//! image of the global top-K it saw); [`worst_overlay_sources`] says which shard's overlay file each one is.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::eval::metrics::ConfusionMatrix;
use crate::eval::results::{Counts, DatasetInfo, EvalResults, LevelResult, LevelStatus, MachineInfo, utc_now};
use crate::eval::worst::{WorstImage, merge_lists};
use crate::outputs::Input;
use crate::{Error, Result};

/// Configuration keys that legitimately differ between the shards of one evaluation (at any depth).
pub const PER_SHARD_CONFIG_KEYS: &[&str] = &["shard", "out", "out_dir", "output", "output_dir", "threads"];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeOptions {
    /// Merge even when some shards are missing: the result is marked `complete: false` and a warning names
    /// the missing shards. Off by default, so a forgotten shard cannot pass for the whole dataset.
    pub allow_partial: bool,
}

/// Refuses an output folder `out` that would overwrite a shard being merged: one of the `inputs`, or inside one.
/// A `DIR/results.json` input counts as its folder `DIR` (the same shard, spelled as a file: the merged
/// `results.json` would land on it); any other file counts as itself. Also refuses an `out` that is a file.
pub fn check_out_dir(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    crate::outputs::check_folder("--out", out)?;
    let inputs: Vec<Input<'_>> = inputs
        .iter()
        .map(|input| {
            if input.is_dir() {
                Input::Folder(input)
            } else if input.file_name().is_some_and(|n| n == "results.json") {
                Input::Folder(
                    input
                        .parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(Path::new(".")),
                )
            } else {
                Input::File(input)
            }
        })
        .collect();
    crate::outputs::check_not_input("--out", out, &inputs)
}

/// Merges the shards of one evaluation; every shard `0..n` must be present exactly once.
pub fn merge(parts: Vec<EvalResults>) -> Result<EvalResults> {
    merge_with(parts, MergeOptions::default())
}

/// Merges shards of one evaluation. Checks that all parts come from the same segq version, model, dataset
/// selection, configuration (apart from [`PER_SHARD_CONFIG_KEYS`]) and levels, and that the shards are distinct.
pub fn merge_with(mut parts: Vec<EvalResults>, options: MergeOptions) -> Result<EvalResults> {
    let Some(first) = parts.first() else {
        return Err(Error::invalid("merge", "nothing to merge: no result files given"));
    };
    if parts.len() == 1 && first.dataset.shard.is_none() {
        return Ok(parts.remove(0));
    }
    let mut shards = Vec::with_capacity(parts.len());
    for (position, part) in parts.iter().enumerate() {
        match part.dataset.shard {
            Some(shard) => shards.push(shard),
            None => {
                return Err(Error::invalid(
                    format!("result {position}"),
                    format!(
                        "result {position} (created {}) is not a shard: only shards of one run can be merged",
                        part.created_utc
                    ),
                ));
            }
        }
    }
    let count = shards[0].1;
    let mut present = BTreeSet::new();
    for &(index, of) in &shards {
        if of != count {
            return Err(Error::invalid(
                format!("shard {index}/{of}"),
                format!("shard {index}/{of} does not belong to a run of {count} shards"),
            ));
        }
        if index >= count {
            return Err(Error::invalid(
                format!("shard index {index}"),
                format!("shard index {index} is out of range for {count} shards"),
            ));
        }
        if !present.insert(index) {
            return Err(Error::invalid(
                format!("shard {index}/{count}"),
                format!("shard {index}/{count} is given twice"),
            ));
        }
    }
    let missing: Vec<usize> = (0..count).filter(|i| !present.contains(i)).collect();
    if !missing.is_empty() {
        let list = missing.iter().map(usize::to_string).collect::<Vec<_>>().join(", ");
        if !options.allow_partial {
            return Err(Error::not_found(
                format!("shards {list}"),
                format!(
                    "missing shards {list} of {count}; merge the rest with allow-partial to get an incomplete result"
                ),
            ));
        }
        tracing::warn!(missing = %list, count, "merging an incomplete set of shards; the result is marked incomplete");
    }
    parts.sort_by_key(|p| p.dataset.shard.map_or(0, |s| s.0));
    for part in &parts[1..] {
        check_compatible(&parts[0], part)?;
    }

    let first = &parts[0];
    let worst_capacity = worst_capacity(&parts);
    let levels = (0..first.levels.len())
        .map(|index| merge_level(&parts, index, count, worst_capacity))
        .collect::<Result<Vec<_>>>()?;
    let mut counts = Counts::default();
    for part in &parts {
        counts.read += part.counts.read;
        counts.evaluated += part.counts.evaluated;
        counts.skipped += part.counts.skipped;
        counts.unreadable_files += part.counts.unreadable_files;
        counts.skip_reasons.extend(part.counts.skip_reasons.iter().cloned());
    }
    let mut config = first.config.clone();
    remove_keys(&mut config, &["shard"]);
    let merged = EvalResults {
        segq_version: first.segq_version.clone(),
        created_utc: utc_now(),
        complete: missing.is_empty() && parts.iter().all(|p| p.complete) && counts.unreadable_files == 0,
        config,
        model: first.model.clone(),
        dataset: DatasetInfo {
            shard: None,
            examples_total_selected: parts.iter().map(|p| p.dataset.examples_total_selected).sum(),
            ..first.dataset.clone()
        },
        machine: merge_machines(&parts),
        counts,
        bootstrap: first.bootstrap,
        calibration: merge_calibrations(&parts)?,
        levels,
    };
    let mut merged = merged;
    merged.validate()?;
    merged.refresh_summaries();
    tracing::info!(
        shards = parts.len(),
        of = count,
        complete = merged.complete,
        "merged results"
    );
    Ok(merged)
}

fn check_compatible(first: &EvalResults, part: &EvalResults) -> Result<()> {
    let shard = part
        .dataset
        .shard
        .map_or_else(String::new, |(i, n)| format!("shard {i}/{n}"));
    let mismatch = |what: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
        Err(Error::invalid(
            &shard,
            format!("{what} differs from the first shard's: {b:?} vs {a:?}"),
        ))
    };
    if part.segq_version != first.segq_version {
        return mismatch("segq version", &first.segq_version, &part.segq_version);
    }
    if part.model != first.model {
        return mismatch("model", &first.model.source, &part.model.source);
    }
    if part.bootstrap != first.bootstrap {
        return mismatch("bootstrap", &first.bootstrap, &part.bootstrap);
    }
    let (a, b) = (&first.dataset, &part.dataset);
    if (&a.source, &a.split, a.offset, a.limit) != (&b.source, &b.split, b.offset, b.limit) {
        return mismatch(
            "dataset selection",
            &(&a.source, &a.split, a.offset, a.limit),
            &(&b.source, &b.split, b.offset, b.limit),
        );
    }
    let (mut config_a, mut config_b) = (first.config.clone(), part.config.clone());
    remove_keys(&mut config_a, PER_SHARD_CONFIG_KEYS);
    remove_keys(&mut config_b, PER_SHARD_CONFIG_KEYS);
    if let Some(path) = first_difference(&config_a, &config_b, String::new()) {
        return Err(Error::invalid(
            shard,
            format!("configuration key `{path}` differs from the first shard's"),
        ));
    }
    let labels = |r: &EvalResults| r.levels.iter().map(|l| l.label.clone()).collect::<Vec<_>>();
    if labels(part) != labels(first) {
        return mismatch("list of levels", &labels(first), &labels(part));
    }
    for (x, y) in first.levels.iter().zip(&part.levels) {
        if (&x.level, &x.method, x.group_size) != (&y.level, &y.method, y.group_size) {
            return mismatch(
                &format!("level {:?}", x.label),
                &(x.level.name(), x.method.to_string()),
                &(y.level.name(), y.method.to_string()),
            );
        }
    }
    Ok(())
}

/// How many worst images a level lists: the shards' `eval.worst_images`, else (files that do not record it) the
/// longest list a shard holds.
fn worst_capacity(parts: &[EvalResults]) -> usize {
    let configured = parts[0]
        .config
        .get("eval")
        .and_then(|e| e.get("worst_images"))
        .and_then(|k| k.as_u64());
    match configured {
        Some(k) => k as usize,
        None => parts
            .iter()
            .flat_map(|p| p.levels.iter().map(|l| l.worst_images.len()))
            .max()
            .unwrap_or(0),
    }
}

/// Where the merged worst images' overlays are in the shards: `(shard position in the sorted parts, overlay path
/// in that shard's folder, overlay path in the merged folder)` for every merged entry that has one.
pub fn worst_overlay_sources(merged: &EvalResults, parts: &[EvalResults]) -> Vec<(usize, String, String)> {
    let mut sorted: Vec<(usize, &EvalResults)> = parts.iter().enumerate().collect();
    sorted.sort_by_key(|(_, p)| p.dataset.shard.map_or(0, |s| s.0));
    let mut sources = Vec::new();
    for (index, level) in merged.levels.iter().enumerate() {
        for image in &level.worst_images {
            let Some(target) = &image.overlay else { continue };
            let found = sorted.iter().find_map(|(position, part)| {
                let listed = part
                    .levels
                    .get(index)?
                    .worst_images
                    .iter()
                    .find(|w| w.index == image.index)?;
                Some((*position, listed.overlay.clone()?))
            });
            if let Some((position, source)) = found {
                sources.push((position, source, target.clone()));
            }
        }
    }
    sources
}

/// Level `index` of every part (sorted by shard), combined.
fn merge_level(parts: &[EvalResults], index: usize, count: usize, worst_capacity: usize) -> Result<LevelResult> {
    let first = &parts[0].levels[index];
    let failures: Vec<String> = parts
        .iter()
        .filter_map(|part| match &part.levels[index].status {
            LevelStatus::Ok => None,
            LevelStatus::Failed { reason } => Some(format!(
                "shard {}/{count}: {reason}",
                part.dataset.shard.map_or(0, |s| s.0)
            )),
        })
        .collect();
    let merge_matrices = |pick: fn(&LevelResult) -> &Option<ConfusionMatrix>| -> Result<Option<ConfusionMatrix>> {
        let mut merged: Option<ConfusionMatrix> = None;
        for part in parts {
            let Some(matrix) = pick(&part.levels[index]) else {
                return Ok(None);
            };
            match &mut merged {
                Some(total) => total.merge(matrix)?,
                None => merged = Some(matrix.clone()),
            }
        }
        Ok(merged)
    };
    let (status, confusion, agreement, per_image, worst_images) = if failures.is_empty() {
        let lists: Vec<&[WorstImage]> = parts.iter().map(|p| p.levels[index].worst_images.as_slice()).collect();
        (
            LevelStatus::Ok,
            merge_matrices(|l| &l.confusion)?,
            merge_matrices(|l| &l.agreement)?,
            // Shards hold ascending, contiguous rows and come sorted by shard index: the concatenation ascends.
            parts
                .iter()
                .flat_map(|part| part.levels[index].per_image.iter().cloned())
                .collect(),
            merge_lists(&lists, worst_capacity, &first.label)
                .into_iter()
                .map(|(image, _)| image)
                .collect(),
        )
    } else {
        // Scores of the shards that did run would pass for the whole dataset: keep none.
        (
            LevelStatus::Failed {
                reason: failures.join("; "),
            },
            None,
            None,
            Vec::new(),
            Vec::new(),
        )
    };
    let levels: Vec<&LevelResult> = parts.iter().map(|p| &p.levels[index]).collect();
    if levels
        .iter()
        .any(|l| l.weight_bytes_memory != first.weight_bytes_memory)
    {
        tracing::warn!(level = %first.label, "shards report different weight sizes; keeping the first shard's");
    }
    let mean = |get: fn(&LevelResult) -> f64| levels.iter().map(|l| get(l)).sum::<f64>() / levels.len() as f64;
    Ok(LevelResult {
        status,
        confusion,
        agreement,
        per_image,
        // Each shard loads and quantizes the model itself: report the typical (mean) cost per worker.
        load_time_s: mean(|l| l.load_time_s),
        quantize_time_s: mean(|l| l.quantize_time_s),
        peak_rss_bytes: levels.iter().map(|l| l.peak_rss_bytes).max().unwrap_or(0),
        working_bytes: levels.iter().map(|l| l.working_bytes).max().unwrap_or(0),
        model_latency_ms: levels.iter().flat_map(|l| l.model_latency_ms.iter().copied()).collect(),
        pipeline_latency_ms: levels
            .iter()
            .flat_map(|l| l.pipeline_latency_ms.iter().copied())
            .collect(),
        wall_time_s: levels.iter().map(|l| l.wall_time_s).sum(),
        worst_images,
        summary: None,
        ..first.clone()
    })
}

/// The calibration every shard used: the same set (shards draw it from the same source, seed and size), else an
/// error; its time is the mean per worker, like quantization's.
fn merge_calibrations(parts: &[EvalResults]) -> Result<Option<crate::calib::CalibrationInfo>> {
    let Some(first) = parts.iter().find_map(|p| p.calibration.as_ref()) else {
        return Ok(None);
    };
    for (i, part) in parts.iter().enumerate() {
        let same = part.calibration.as_ref().is_some_and(|c| c.set_id == first.set_id);
        if !same {
            return Err(Error::invalid(
                format!("result {}", i + 1),
                format!(
                    "calibrated on {}, but another shard on set {}: shards must share one calibration set (same \
                     --calib, --calib-size and --calib-seed)",
                    part.calibration
                        .as_ref()
                        .map_or("nothing".to_string(), |c| format!("set {}", c.set_id)),
                    first.set_id
                ),
            ));
        }
    }
    let seconds = parts
        .iter()
        .filter_map(|p| p.calibration.as_ref())
        .map(|c| c.seconds)
        .sum::<f64>();
    Ok(Some(crate::calib::CalibrationInfo {
        seconds: seconds / parts.len() as f64,
        ..first.clone()
    }))
}

/// The first shard's machine; CPU models and systems of differing machines are listed, separated by " | ".
fn merge_machines(parts: &[EvalResults]) -> MachineInfo {
    let distinct = |get: fn(&MachineInfo) -> &String| {
        let mut seen: Vec<&str> = Vec::new();
        for part in parts {
            let value = get(&part.machine).as_str();
            if !seen.contains(&value) {
                seen.push(value);
            }
        }
        seen.join(" | ")
    };
    MachineInfo {
        cpu_model: distinct(|m| &m.cpu_model),
        os: distinct(|m| &m.os),
        ..parts[0].machine.clone()
    }
}

pub(crate) fn remove_keys(value: &mut serde_json::Value, keys: &[&str]) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|k, _| !keys.contains(&k.as_str()));
            map.values_mut().for_each(|v| remove_keys(v, keys));
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| remove_keys(v, keys)),
        _ => {}
    }
}

/// Dotted path of the first place where two JSON values differ.
pub(crate) fn first_difference(a: &serde_json::Value, b: &serde_json::Value, path: String) -> Option<String> {
    use serde_json::Value;
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|key| match (x.get(key), y.get(key)) {
                (Some(u), Some(v)) => first_difference(u, v, join(key)),
                _ => Some(join(key)),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| first_difference(u, v, format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(if path.is_empty() { "(root)".into() } else { path }),
    }
}

/// This process's shard `(index, count)` from the scheduler's environment, for `--shard auto`:
///
/// - Slurm job arrays with `SEGQ_SHARD_COUNT` set: index = `SLURM_ARRAY_TASK_ID`, count = `SEGQ_SHARD_COUNT`. The
///   task id is the shard index, so a rerun of one failed task (`sbatch --array=3`, where Slurm says the array has
///   one task) still evaluates shard 3 of the whole count.
/// - Slurm job arrays without it: index = (`SLURM_ARRAY_TASK_ID` - `SLURM_ARRAY_TASK_MIN`) /
///   `SLURM_ARRAY_TASK_STEP` (step 1 when unset), count = `SLURM_ARRAY_TASK_COUNT`. A one-task array, or one whose
///   `SLURM_ARRAY_TASK_MAX` is off the grid of min, step and count (a rerun of some tasks), is refused: it cannot
///   tell which shard it is, and would silently evaluate the wrong rows.
/// - Kubernetes Indexed Jobs: index = `JOB_COMPLETION_INDEX`, count = `SEGQ_SHARD_COUNT` (Kubernetes does not
///   expose `spec.completions` to the pod, so the manifest sets it to the same number).
/// - Anything else: `SEGQ_SHARD_INDEX` with `SEGQ_SHARD_COUNT`.
///
/// `Ok(None)` when none of these is set. Errors name the variable at fault.
pub fn shard_from_env() -> Result<Option<(usize, usize)>> {
    shard_from_vars(|name| std::env::var(name).ok())
}

/// [`shard_from_env`] over any variable lookup (tests pass a map).
pub fn shard_from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<(usize, usize)>> {
    let number = |name: &str| -> Result<Option<usize>> {
        match var(name) {
            None => Ok(None),
            Some(text) => text.trim().parse::<usize>().map(Some).map_err(|_| {
                Error::config(
                    name,
                    format!("environment variable {name}={text:?} is not a non-negative integer"),
                )
            }),
        }
    };
    let required = |name: &str, why: &str| -> Result<usize> {
        number(name)?.ok_or_else(|| Error::config(name, format!("environment variable {name} is not set ({why})")))
    };
    let explicit_count = number("SEGQ_SHARD_COUNT")?;
    let (index, count, source) = if let Some(task_id) = number("SLURM_ARRAY_TASK_ID")? {
        if let Some(count) = explicit_count {
            if task_id >= count {
                return Err(Error::config(
                    "SLURM_ARRAY_TASK_ID",
                    format!(
                        "SLURM_ARRAY_TASK_ID={task_id} is not a shard of SEGQ_SHARD_COUNT={count}: with \
                         SEGQ_SHARD_COUNT set the task id is the shard index (use --array=0-{})",
                        count.saturating_sub(1)
                    ),
                ));
            }
            return Ok(Some((task_id, count)));
        }
        let min = required("SLURM_ARRAY_TASK_MIN", "Slurm sets it in every array task")?;
        let count = required("SLURM_ARRAY_TASK_COUNT", "Slurm sets it in every array task")?;
        let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1);
        if task_id < min || step == 0 || (task_id - min) % step != 0 {
            return Err(Error::config(
                "SLURM_ARRAY_TASK_ID",
                format!(
                    "SLURM_ARRAY_TASK_ID={task_id} is not on the array's grid (min {min}, step {step}); \
                     use --array=0-{} or pass --shard I/N",
                    count.saturating_sub(1)
                ),
            ));
        }
        let max = number("SLURM_ARRAY_TASK_MAX")?;
        let full_grid = max.is_none_or(|max| max >= min && (max - min) % step == 0 && (max - min) / step + 1 == count);
        if count == 1 || !full_grid {
            let array = match max {
                Some(max) => format!("tasks {min}-{max}, step {step}, {count} task(s)"),
                None => format!("{count} task(s)"),
            };
            return Err(Error::config(
                "SLURM_ARRAY_TASK_COUNT",
                format!(
                    "this Slurm array ({array}) is not the whole sharded run (a rerun of some tasks?), so its \
                     shard count is unknown; set SEGQ_SHARD_COUNT to the number of shards (the task id is then the \
                     shard index) or pass --shard {task_id}/N"
                ),
            ));
        }
        ((task_id - min) / step, count, "SLURM_ARRAY_TASK_ID")
    } else if let Some(index) = number("JOB_COMPLETION_INDEX")? {
        let count = explicit_count.ok_or_else(|| {
            Error::config(
                "SEGQ_SHARD_COUNT",
                "environment variable SEGQ_SHARD_COUNT is not set (set it to the Indexed Job's spec.completions)",
            )
        })?;
        (index, count, "JOB_COMPLETION_INDEX")
    } else if let Some(index) = number("SEGQ_SHARD_INDEX")? {
        let count = explicit_count.ok_or_else(|| {
            Error::config(
                "SEGQ_SHARD_COUNT",
                "environment variable SEGQ_SHARD_COUNT is not set (it goes with SEGQ_SHARD_INDEX)",
            )
        })?;
        (index, count, "SEGQ_SHARD_INDEX")
    } else {
        return Ok(None);
    };
    if count == 0 || index >= count {
        return Err(Error::config(
            source,
            format!("{source} gives shard {index} of {count}, which does not exist (shards are 0..{count})"),
        ));
    }
    Ok(Some((index, count)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::eval::results::test_support::run;

    /// The documented shard rule: shard `i` of `n` covers rows `[i * len / n, (i + 1) * len / n)`.
    fn shard_rows(len: usize, index: usize, count: usize) -> std::ops::Range<usize> {
        index * len / count..(index + 1) * len / count
    }

    fn shards(len: usize, count: usize) -> Vec<EvalResults> {
        (0..count)
            .map(|i| run(shard_rows(len, i, count), len, Some((i, count))))
            .collect()
    }

    #[test]
    fn merged_shards_equal_the_unsharded_run() {
        const ROWS: usize = 23;
        let whole = run(0..ROWS, ROWS, None);
        for count in [1, 2, 3, 7] {
            let mut parts = shards(ROWS, count);
            parts.reverse(); // order of the files given must not matter
            let merged = merge(parts).unwrap();
            assert!(merged.complete);
            assert_eq!(merged.dataset.shard, None);
            assert_eq!(merged.dataset.examples_total_selected, ROWS);
            assert_eq!(merged.counts, whole.counts, "{count} shards");
            for (m, w) in merged.levels.iter().zip(&whole.levels) {
                assert_eq!(m.confusion, w.confusion, "{count} shards, level {}", m.label);
                assert_eq!(m.agreement, w.agreement, "{count} shards, level {}", m.label);
                assert_eq!(m.metrics(), w.metrics());
                assert_eq!(m.agreement_metrics(), w.agreement_metrics());
                assert_eq!(m.model_latency_ms, w.model_latency_ms);
                assert_eq!(m.pipeline_latency_ms, w.pipeline_latency_ms);
                assert_eq!(m.model_p95_ms(), w.model_p95_ms());
                assert!((m.images_per_s_model() - w.images_per_s_model()).abs() < 1e-9);
                assert_eq!(m.status, LevelStatus::Ok);
                assert_eq!(m.worst_images, w.worst_images, "{count} shards, level {}", m.label);
            }
            assert!(
                !whole.levels[2].worst_images.is_empty(),
                "the test data has disagreeing images"
            );
            assert_eq!(merged.delta_miou(&merged.levels[2]), whole.delta_miou(&whole.levels[2]));
            assert!(merged.config["eval"].get("shard").is_none(), "the shard key is dropped");
        }
    }

    #[test]
    fn merged_shards_give_the_unsharded_intervals() {
        const ROWS: usize = 23;
        let whole = run(0..ROWS, ROWS, None);
        let expected = whole.confidence_intervals();
        assert!(expected[2].delta_miou.is_some() && expected[2].agreement_miou.is_some());
        for count in [2, 3, 7] {
            let mut parts = shards(ROWS, count);
            parts.reverse();
            let merged = merge(parts).unwrap();
            for (m, w) in merged.levels.iter().zip(&whole.levels) {
                assert_eq!(m.per_image, w.per_image, "{count} shards, level {}", m.label);
            }
            assert_eq!(merged.bootstrap, whole.bootstrap);
            assert_eq!(merged.confidence_intervals(), expected, "{count} shards");
            let summary = merged.levels[2].summary.as_ref().expect("merge fills the summaries");
            assert_eq!(summary.delta_miou_ci, expected[2].delta_miou);
            assert_eq!(summary.agreement_miou_ci, expected[2].agreement_miou);
        }
        // Shards drawn with another seed cannot make one interval.
        let mut parts = shards(ROWS, 2);
        parts[1].bootstrap = Some(crate::eval::bootstrap::BootstrapSettings {
            resamples: 200,
            seed: 43,
        });
        let error = merge(parts).unwrap_err().to_string();
        assert!(error.contains("bootstrap"), "{error}");
    }

    #[test]
    fn missing_duplicate_and_foreign_shards_are_refused() {
        let mut parts = shards(20, 4);
        parts.remove(2);
        let error = merge(parts.clone()).unwrap_err().to_string();
        assert!(error.contains("missing shards 2 of 4"), "{error}");
        let partial = merge_with(parts.clone(), MergeOptions { allow_partial: true }).unwrap();
        assert!(!partial.complete);
        assert_eq!(partial.dataset.examples_total_selected, 15);

        let mut duplicated = parts.clone();
        duplicated.push(parts[0].clone());
        assert!(
            merge(duplicated)
                .unwrap_err()
                .to_string()
                .contains("shard 0/4 is given twice")
        );

        let mut mixed = shards(20, 2);
        mixed.push(run(0..5, 20, Some((2, 3))));
        assert!(merge(mixed).unwrap_err().to_string().contains("2/3"));

        let mut other_model = shards(20, 2);
        other_model[1].model.source = "someone/else".into();
        assert!(merge(other_model).unwrap_err().to_string().contains("model differs"));

        let mut other_config = shards(20, 2);
        other_config[1].config["eval"]["levels"] = serde_json::json!(["f32"]);
        let error = merge(other_config).unwrap_err().to_string();
        assert!(error.contains("`eval.levels`"), "{error}");

        let mut other_levels = shards(20, 2);
        other_levels[1].levels[2].label = "int4-rtn".into();
        assert!(merge(other_levels).unwrap_err().to_string().contains("list of levels"));

        let mut unsharded = shards(20, 2);
        unsharded[1].dataset.shard = None;
        assert!(merge(unsharded).unwrap_err().to_string().contains("not a shard"));
        assert!(merge(Vec::new()).is_err());

        let single = run(0..5, 5, None);
        assert_eq!(merge(vec![single.clone()]).unwrap(), single);
    }

    #[test]
    fn a_failed_shard_fails_the_level_and_incomplete_parts_stay_incomplete() {
        let mut parts = shards(12, 3);
        parts[1].levels[2].status = LevelStatus::Failed {
            reason: "out of memory".into(),
        };
        parts[2].complete = false;
        parts[0].machine.cpu_model = "Intel Xeon".into();
        let merged = merge(parts).unwrap();
        assert!(!merged.complete);
        assert_eq!(
            merged.levels[2].status,
            LevelStatus::Failed {
                reason: "shard 1/3: out of memory".into()
            }
        );
        assert!(merged.levels[2].confusion.is_none());
        assert_eq!(merged.levels[1].status, LevelStatus::Ok);
        assert_eq!(merged.machine.cpu_model, "Intel Xeon | AMD EPYC");
        assert_eq!(merged.levels[0].peak_rss_bytes, 200_000_000 + 8 * 1000);
    }

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn shard_from_scheduler_variables() {
        assert_eq!(shard_from_vars(vars(&[])).unwrap(), None);
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
        ];
        assert_eq!(shard_from_vars(vars(&slurm)).unwrap(), Some((4, 8)));
        let stepped = [
            ("SLURM_ARRAY_TASK_ID", "6"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert_eq!(shard_from_vars(vars(&stepped)).unwrap(), Some((3, 4)));
        let error = shard_from_vars(vars(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(error.contains("SLURM_ARRAY_TASK_ID=3"), "{error}");
        let error = shard_from_vars(vars(&[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_MIN", "0")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("SLURM_ARRAY_TASK_COUNT"), "{error}");
        let error = shard_from_vars(vars(&[("SLURM_ARRAY_TASK_ID", "x")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("SLURM_ARRAY_TASK_ID=\"x\""), "{error}");

        assert_eq!(
            shard_from_vars(vars(&[("JOB_COMPLETION_INDEX", "2"), ("SEGQ_SHARD_COUNT", "3")])).unwrap(),
            Some((2, 3))
        );
        let error = shard_from_vars(vars(&[("JOB_COMPLETION_INDEX", "2")]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("SEGQ_SHARD_COUNT") && error.contains("completions"),
            "{error}"
        );
        let error = shard_from_vars(vars(&[("JOB_COMPLETION_INDEX", "3"), ("SEGQ_SHARD_COUNT", "3")]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("JOB_COMPLETION_INDEX") && error.contains("shard 3 of 3"),
            "{error}"
        );
        assert_eq!(
            shard_from_vars(vars(&[("SEGQ_SHARD_INDEX", "0"), ("SEGQ_SHARD_COUNT", "1")])).unwrap(),
            Some((0, 1))
        );
    }

    /// `sbatch --array=3` reruns one failed task: Slurm then describes a one-task array (min = max = 3, count 1),
    /// which must not become shard 0 of 1 (the whole dataset, which the merge then refuses).
    #[test]
    fn a_rerun_of_one_slurm_task_keeps_its_shard() {
        let rerun = [
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
            ("SLURM_ARRAY_TASK_MAX", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "1"),
        ];
        let error = shard_from_vars(vars(&rerun)).unwrap_err().to_string();
        assert!(
            error.contains("SEGQ_SHARD_COUNT") && error.contains("--shard 3/N"),
            "{error}"
        );
        let with_count: Vec<_> = rerun.iter().copied().chain([("SEGQ_SHARD_COUNT", "8")]).collect();
        assert_eq!(shard_from_vars(vars(&with_count)).unwrap(), Some((3, 8)));

        // The first run of the same script: a full 0-7 array with the explicit count gives the same shards.
        for task in 0..8 {
            let id = task.to_string();
            let full = [
                ("SLURM_ARRAY_TASK_ID", id.as_str()),
                ("SLURM_ARRAY_TASK_MIN", "0"),
                ("SLURM_ARRAY_TASK_MAX", "7"),
                ("SLURM_ARRAY_TASK_COUNT", "8"),
            ];
            assert_eq!(shard_from_vars(vars(&full)).unwrap(), Some((task, 8)));
            let with_count: Vec<_> = full.iter().copied().chain([("SEGQ_SHARD_COUNT", "8")]).collect();
            assert_eq!(shard_from_vars(vars(&with_count)).unwrap(), Some((task, 8)));
        }

        // Rerunning tasks 1 and 5 (`--array=1,5`): min, max and count do not describe one grid.
        let partial = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ];
        let error = shard_from_vars(vars(&partial)).unwrap_err().to_string();
        assert!(
            error.contains("tasks 1-5") && error.contains("SEGQ_SHARD_COUNT"),
            "{error}"
        );
        let with_count: Vec<_> = partial.iter().copied().chain([("SEGQ_SHARD_COUNT", "8")]).collect();
        assert_eq!(shard_from_vars(vars(&with_count)).unwrap(), Some((5, 8)));

        // With the explicit count the task id is the shard index: an id past it is an error naming both.
        let error = shard_from_vars(vars(&[("SLURM_ARRAY_TASK_ID", "8"), ("SEGQ_SHARD_COUNT", "8")]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("SLURM_ARRAY_TASK_ID=8") && error.contains("--array=0-7"),
            "{error}"
        );
        let error = shard_from_vars(vars(&[("SLURM_ARRAY_TASK_ID", "1"), ("SEGQ_SHARD_COUNT", "x")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("SEGQ_SHARD_COUNT=\"x\""), "{error}");
    }

    #[test]
    fn shard_rule_covers_every_row_once() {
        for len in [0, 1, 5, 23, 2000] {
            for count in [1, 2, 3, 7] {
                let covered: Vec<usize> = (0..count).flat_map(|i| shard_rows(len, i, count)).collect();
                assert_eq!(covered, (0..len).collect::<Vec<_>>(), "{len} rows in {count} shards");
            }
        }
    }
}
