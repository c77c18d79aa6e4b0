//! W&B back end: turns a [`RunLog`] into W&B's run data (media files, history rows, summary, config), writes it
//! as W&B's offline run folder, and uploads it online when asked.

pub mod offline;
pub mod online;
pub mod records;
pub mod txlog;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::secret;
use super::{RunLog, RunOutcome, TrackOutcome, TrackingMode, TrackingSettings};
use crate::{Error, Result};

pub use online::OnlineOptions;

/// A media file to write under the run's `files/` and upload.
#[derive(Clone, Debug)]
pub struct MediaFile {
    /// Relative to `files/`, `/`-separated (e.g. `media/images/sample_0_<hash>.png`).
    pub path: String,
    pub bytes: Vec<u8>,
}

/// One run in W&B's terms, ready to write or send.
#[derive(Clone, Debug)]
pub struct PreparedRun {
    pub run_id: String,
    pub display_name: String,
    pub project: String,
    /// Empty: the server's default entity for the key.
    pub entity: String,
    pub group: String,
    pub tags: Vec<String>,
    /// The user's config.
    pub config: Map<String, Value>,
    /// W&B's own `_wandb` config entry (mask class labels).
    pub wandb_config: Map<String, Value>,
    /// Rows with `_step`, `_timestamp`, `_runtime` added.
    pub history: Vec<Map<String, Value>>,
    pub summary: Map<String, Value>,
    pub media: Vec<MediaFile>,
    pub start_time: SystemTime,
    pub runtime_s: f64,
    pub exit_code: i32,
}

impl PreparedRun {
    /// Config with `_wandb` included, as the Config record and the online upsert carry it.
    pub fn full_config(&self) -> Map<String, Value> {
        let mut config = self.config.clone();
        config.insert("_wandb".into(), Value::Object(self.wandb_config.clone()));
        config
    }
}

/// A fresh W&B run id: 8 characters of [a-z0-9].
pub fn new_run_id() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    // RandomState is seeded from the OS per instance; mixing in time and pid keeps ids distinct across processes.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.write_u32(std::process::id());
    let mut bits = hasher.finish();
    (0..8)
        .map(|_| {
            let c = ALPHABET[(bits % 36) as usize] as char;
            bits /= 36;
            c
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A media key made safe for a file name (keys like `samples/0` become `samples_0`).
fn file_stem(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn encode_png<P: image::PixelWithColorType, C: std::ops::Deref<Target = [P::Subpixel]>>(
    img: &image::ImageBuffer<P, C>,
    what: &str,
) -> Result<Vec<u8>>
where
    [P::Subpixel]: image::EncodableLayout,
{
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| Error::invalid(what, format!("PNG encoding failed: {e}")))?;
    Ok(out.into_inner())
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Builds W&B's view of `log`: renders media to PNG/JSON files, adds W&B's step keys to history, and makes
/// the summary the last value of every history key overlaid by the explicit summary.
pub fn prepare_run(settings: &TrackingSettings, log: &RunLog, run_id: String) -> Result<PreparedRun> {
    let start_time = SystemTime::now();
    let display_name = match (&settings.name, log.name.is_empty()) {
        (Some(prefix), false) => format!("{prefix}-{}", log.name),
        (Some(prefix), true) => prefix.clone(),
        (None, _) => log.name.clone(),
    };
    let mut tags: Vec<String> = settings.tags.clone().unwrap_or_default();
    for tag in &log.tags {
        if !tags.contains(tag) {
            tags.push(tag.clone());
        }
    }
    let mut history = log.history.clone();
    if history.is_empty() && (!log.tables.is_empty() || !log.images.is_empty()) {
        history.push(Map::new());
    }
    // Tables and images are logged with the last row.
    let media_step = history.len().saturating_sub(1);
    let mut media = Vec::new();
    let mut media_values = Map::new();
    let mut class_labels = Map::new();
    let mut seen_keys = BTreeSet::new();
    for key in log.history.iter().flat_map(|row| row.keys()) {
        if key.starts_with('_') {
            return Err(Error::invalid(
                format!("run {}: history key {key}", log.name),
                "names starting with _ are W&B's",
            ));
        }
    }
    for table in &log.tables {
        if !seen_keys.insert(table.key.clone()) {
            return Err(Error::invalid(
                format!("run {}", log.name),
                format!("media key {} used twice", table.key),
            ));
        }
        if let Some((row, cells)) = table
            .rows
            .iter()
            .enumerate()
            .find(|(_, r)| r.len() != table.columns.len())
        {
            return Err(Error::invalid(
                format!("run {}: table {} row {row}", log.name, table.key),
                format!("{} cells for {} columns", cells.len(), table.columns.len()),
            ));
        }
        let bytes = serde_json::to_vec(&json!({"columns": table.columns, "data": table.rows}))
            .map_err(|e| Error::invalid(format!("table {}", table.key), e.to_string()))?;
        let sha = sha256_hex(&bytes);
        let path = format!(
            "media/table/{}_{media_step}_{}.table.json",
            file_stem(&table.key),
            &sha[..20]
        );
        media_values.insert(
            table.key.clone(),
            json!({"_type": "table-file", "path": path, "sha256": sha, "size": bytes.len(),
                   "ncols": table.columns.len(), "nrows": table.rows.len()}),
        );
        media.push(MediaFile { path, bytes });
    }
    for image in &log.images {
        if !seen_keys.insert(image.key.clone()) {
            return Err(Error::invalid(
                format!("run {}", log.name),
                format!("media key {} used twice", image.key),
            ));
        }
        let bytes = encode_png(&image.rgb, &image.key)?;
        let sha = sha256_hex(&bytes);
        let path = format!("media/images/{}_{media_step}_{}.png", file_stem(&image.key), &sha[..20]);
        let mut value = json!({"_type": "image-file", "path": path, "sha256": sha, "size": bytes.len(),
            "format": "png", "width": image.rgb.width(), "height": image.rgb.height()});
        media.push(MediaFile { path, bytes });
        if !image.caption.is_empty() {
            value["caption"] = json!(image.caption);
        }
        let labels: Map<String, Value> = image
            .class_labels
            .iter()
            .map(|(id, name)| (id.to_string(), json!(name)))
            .collect();
        let mut masks = Map::new();
        for (mask_name, mask) in &image.masks {
            if mask.dimensions() != image.rgb.dimensions() {
                return Err(Error::invalid(
                    format!("image {} mask {mask_name}", image.key),
                    format!(
                        "{}x{} does not match the image's {}x{}",
                        mask.width(),
                        mask.height(),
                        image.rgb.width(),
                        image.rgb.height()
                    ),
                ));
            }
            let bytes = encode_png(mask, &format!("{} mask {mask_name}", image.key))?;
            let sha = sha256_hex(&bytes);
            let path = format!(
                "media/images/mask/{}_{media_step}_{}.mask.png",
                file_stem(&image.key),
                &sha[..20]
            );
            masks.insert(
                mask_name.clone(),
                json!({"_type": "mask", "path": path, "sha256": sha, "size": bytes.len()}),
            );
            // Identical masks (same hash) share one file, as W&B's client does.
            if !media.iter().any(|m| m.path == path) {
                media.push(MediaFile { path, bytes });
            }
            // W&B's spelling of "delimiter".
            let label_key = format!("{}_wandb_delimeter_{mask_name}", image.key);
            class_labels.insert(
                label_key.clone(),
                json!({"type": "mask/class_labels", "key": label_key, "value": labels}),
            );
        }
        if !masks.is_empty() {
            value["masks"] = Value::Object(masks);
        }
        media_values.insert(image.key.clone(), value);
    }

    let timestamp = unix_seconds(start_time);
    let runtime_s = start_time.elapsed().map_or(0.0, |d| d.as_secs_f64());
    for (step, row) in history.iter_mut().enumerate() {
        if step == media_step {
            row.extend(media_values.clone());
        }
        row.insert("_step".into(), json!(step));
        row.insert("_timestamp".into(), json!(timestamp));
        row.insert("_runtime".into(), json!(runtime_s));
    }
    let mut summary = Map::new();
    for row in &history {
        summary.extend(row.clone());
    }
    summary.extend(log.summary.clone());
    summary.entry("_runtime").or_insert(json!(runtime_s));

    let mut wandb_config = Map::new();
    if !class_labels.is_empty() {
        wandb_config.insert("mask/class_labels".into(), Value::Object(class_labels));
    }
    Ok(PreparedRun {
        run_id,
        display_name,
        project: settings.project_or_default().to_string(),
        entity: settings.entity.clone().unwrap_or_default(),
        group: settings.group.clone().unwrap_or_else(|| log.group.clone()),
        tags,
        config: log.config.clone(),
        wandb_config,
        history,
        summary,
        media,
        start_time,
        runtime_s,
        exit_code: log.exit_code,
    })
}

/// The one-line hint printed when a run stays on disk.
pub fn sync_hint(dir: &std::path::Path) -> String {
    format!("upload it later with `wandb sync {}`", dir.display())
}

/// Tracking settings checked and resolved: what a publication does, decided before any evaluation starts.
pub struct Resolved {
    /// Online only with a key; Disabled means nothing else here is used.
    pub mode: TrackingMode,
    pub key: Option<secret::Secret>,
    /// Why the mode was chosen for the user (no key found: offline), shown once for all runs.
    pub notice: Option<String>,
    pub base_url: String,
    /// `<dir>/wandb`, where the run folders go.
    pub wandb_dir: PathBuf,
}

/// Checks `settings` (already merged with the environment) the way a publication will use them, so that a bad
/// setting fails before an evaluation rather than after it: the values themselves, the API key when online (and
/// that it travels only over HTTPS or to a loopback address), and that the run folder can be written. Errors
/// name the environment variable when one set the value, else the segq.toml key.
pub fn resolve(settings: &TrackingSettings, env: &dyn Fn(&str) -> Option<String>) -> Result<Resolved> {
    let from_env = |var: &str| env(var).is_some_and(|v| !v.trim().is_empty());
    let base_url = settings.base_url_or_default().to_string();
    let base_url_key = if from_env("WANDB_BASE_URL") {
        "WANDB_BASE_URL"
    } else {
        "tracking.base_url"
    };
    let dir_key = if from_env("WANDB_DIR") {
        "WANDB_DIR"
    } else {
        "tracking.dir"
    };
    settings.validate()?;
    let wandb_dir = settings.dir_or_default().join("wandb");
    let mut resolved = Resolved {
        mode: TrackingMode::Disabled,
        key: None,
        notice: None,
        base_url,
        wandb_dir,
    };
    let base_url = resolved.base_url.as_str();
    match settings.mode {
        Some(TrackingMode::Disabled) => return Ok(resolved),
        Some(TrackingMode::Offline) => resolved.mode = TrackingMode::Offline,
        Some(TrackingMode::Online) => match secret::find_api_key(base_url, env) {
            Some((key, source)) => {
                tracing::debug!(source = %secret::describe_source(&source), "W&B API key found");
                resolved.mode = TrackingMode::Online;
                resolved.key = Some(key);
            }
            None => {
                return Err(Error::config(
                    "WANDB_API_KEY",
                    format!(
                        "tracking mode is online but no W&B API key was found for {base_url}: set WANDB_API_KEY, \
                         run `wandb login`, or use WANDB_MODE=offline"
                    ),
                ));
            }
        },
        None => match secret::find_api_key(base_url, env) {
            Some((key, _)) => {
                resolved.mode = TrackingMode::Online;
                resolved.key = Some(key);
            }
            None => {
                resolved.mode = TrackingMode::Offline;
                resolved.notice = Some("no API key found (WANDB_API_KEY or netrc)".into());
            }
        },
    }
    if resolved.key.is_some() {
        secret::check_transport(base_url, base_url_key)?;
    }
    check_writable_folder(&settings.dir_or_default(), dir_key)?;
    Ok(resolved)
}

/// Refuses a run folder location that cannot be written: a file in the way, or a folder without write access
/// (tried by creating and removing a file in the nearest existing folder). Creates nothing that stays.
fn check_writable_folder(dir: &std::path::Path, key: &str) -> Result<()> {
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
            _ => {
                existing = std::path::Path::new(".");
                break;
            }
        }
    }
    let shown = dir.display();
    if !existing.is_dir() {
        let what = if existing == dir {
            "is a file, not a folder".to_string()
        } else {
            format!("cannot be a folder: {} is a file", existing.display())
        };
        return Err(Error::config(
            key,
            format!("{key} {shown} {what} (W&B run folders go in it)"),
        ));
    }
    let probe = existing.join(format!(".segq-write-test-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(Error::config(
            key,
            format!("{key} {shown}: cannot write in {} ({e})", existing.display()),
        )),
    }
}

/// [`super::log_runs`] with injectable HTTP options and environment (for tests).
///
/// Every run's offline folder is written before the first upload starts, so that a failed, slow or interrupted
/// upload leaves every run ready for `wandb sync`. After one upload fails, the remaining runs are not tried (the
/// server is known to be failing); after a stop request, none is.
pub fn log_runs_with(
    settings: &TrackingSettings,
    runs: &[RunLog],
    options: &OnlineOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<TrackOutcome> {
    let resolved = resolve(settings, env)?;
    let mut outcome = TrackOutcome {
        runs: Vec::with_capacity(runs.len()),
        notice: resolved.notice.clone(),
        wandb_dir: resolved.wandb_dir.clone(),
        interrupted: false,
    };
    if resolved.mode == TrackingMode::Disabled {
        outcome.runs = runs
            .iter()
            .map(|r| RunOutcome {
                name: r.name.clone(),
                run_id: String::new(),
                mode: TrackingMode::Disabled,
                offline_dir: None,
                url: None,
                upload_error: None,
            })
            .collect();
        return Ok(outcome);
    }
    let mut prepared_runs = Vec::with_capacity(runs.len());
    for log in runs {
        let prepared = prepare_run(settings, log, new_run_id())?;
        let offline_dir = offline::write_run(&resolved.wandb_dir, &prepared)?;
        tracing::debug!(run = %prepared.run_id, name = %prepared.display_name, dir = %offline_dir.display(), "W&B run written");
        outcome.runs.push(RunOutcome {
            name: prepared.display_name.clone(),
            run_id: prepared.run_id.clone(),
            mode: TrackingMode::Offline,
            offline_dir: Some(offline_dir),
            url: None,
            upload_error: None,
        });
        prepared_runs.push(prepared);
    }
    let (TrackingMode::Online, Some(key)) = (resolved.mode, resolved.key) else {
        return Ok(outcome);
    };
    let base_url = resolved.base_url.as_str();
    let client = online::Client::new(base_url, key, options.clone());
    // Why the remaining runs are not tried, once one failed or a stop was asked for.
    let mut skip_reason: Option<String> = None;
    for (run, prepared) in outcome.runs.iter_mut().zip(&prepared_runs) {
        let Some(offline_dir) = run.offline_dir.clone() else {
            continue;
        };
        let who = format!("W&B run {} ({})", prepared.run_id, prepared.display_name);
        let kept = format!("kept in {}: {}", offline_dir.display(), sync_hint(&offline_dir));
        if skip_reason.is_none() && crate::interrupt::stop_requested() {
            outcome.interrupted = true;
            skip_reason = Some("interrupted".into());
        }
        if let Some(reason) = &skip_reason {
            run.upload_error = Some(format!("{who} not uploaded to {base_url} ({reason}); {kept}"));
            continue;
        }
        match client.upload_run(prepared) {
            Ok(url) => {
                run.mode = TrackingMode::Online;
                run.offline_dir = Some(offline::mark_synced(&offline_dir)?);
                tracing::debug!(run = %prepared.run_id, %url, "W&B run uploaded");
                run.url = Some(url);
            }
            Err(Error::Interrupted) => {
                outcome.interrupted = true;
                run.upload_error = Some(format!("{who}: upload to {base_url} interrupted; {kept}"));
                skip_reason = Some("interrupted".into());
            }
            Err(err) => {
                run.upload_error = Some(format!("{who}: upload to {base_url} failed: {err}; {kept}"));
                skip_reason = Some(format!("the upload of run {} failed", prepared.run_id));
            }
        }
    }
    Ok(outcome)
}

/// The online client's wait before retry number `attempt + 1` when the server gave no `Retry-After`; a function
/// so tests can see the schedule.
pub(crate) fn backoff_delay(options: &OnlineOptions, attempt: u32) -> Duration {
    options
        .base_delay
        .saturating_mul(1u32 << attempt.min(16))
        .min(options.max_delay)
}

/// The `YYYYMMDD_HHMMSS` stamp (UTC) W&B puts in run folder names.
pub fn folder_stamp(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's days_from_civil inverse).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}_{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The offline run folder's path for a run.
pub fn run_folder(wandb_dir: &std::path::Path, run: &PreparedRun) -> PathBuf {
    wandb_dir.join(format!("offline-run-{}-{}", folder_stamp(run.start_time), run.run_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::{MaskedImage, Table};
    use std::collections::BTreeMap;

    pub(crate) fn sample_log() -> RunLog {
        let mut config = Map::new();
        config.insert("model".into(), json!("nvidia/segformer-b0"));
        config.insert("level".into(), json!("int8"));
        let row = |miou: f64| {
            let mut m = Map::new();
            m.insert("mean_iou".into(), json!(miou));
            m
        };
        let mut summary = Map::new();
        summary.insert("images_per_s".into(), json!(2.5));
        let rgb = image::RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        let gt = image::GrayImage::from_fn(6, 4, |x, _| image::Luma([(x % 3) as u8]));
        let pred = image::GrayImage::from_fn(6, 4, |_, y| image::Luma([(y % 3) as u8]));
        RunLog {
            name: "int8-rtn".into(),
            group: "eval-1".into(),
            tags: vec!["int8".into()],
            config,
            history: vec![row(0.30), row(0.35)],
            summary,
            tables: vec![Table {
                key: "per_class_iou".into(),
                columns: vec!["class".into(), "iou".into()],
                rows: vec![vec![json!("wall"), json!(0.7)], vec![json!("floor"), Value::Null]],
            }],
            images: vec![MaskedImage {
                key: "samples/0".into(),
                caption: "ADE_val_00000001".into(),
                rgb,
                masks: vec![("ground_truth".into(), gt), ("predictions".into(), pred)],
                class_labels: BTreeMap::from([(0, "wall".into()), (1, "floor".into()), (2, "sky".into())]),
            }],
            exit_code: 0,
        }
    }

    #[test]
    fn run_ids_are_eight_lowercase_alphanumerics() {
        let a = new_run_id();
        assert_eq!(a.len(), 8);
        assert!(a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(a, new_run_id());
    }

    #[test]
    fn folder_stamp_is_utc_civil_time() {
        assert_eq!(folder_stamp(UNIX_EPOCH), "19700101_000000");
        assert_eq!(
            folder_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723)),
            "20000229_010203"
        );
        assert_eq!(
            folder_stamp(UNIX_EPOCH + Duration::from_secs(1_795_957_738)),
            "20261129_130858"
        );
    }

    #[test]
    fn prepare_adds_steps_media_and_class_labels() {
        let settings = TrackingSettings {
            name: Some("exp".into()),
            tags: Some(vec!["t".into()]),
            ..Default::default()
        };
        let run = prepare_run(&settings, &sample_log(), "abc12345".into()).unwrap();
        assert_eq!(run.display_name, "exp-int8-rtn");
        assert_eq!(run.tags, vec!["t".to_string(), "int8".to_string()]);
        assert_eq!(run.group, "eval-1");
        assert_eq!(run.project, "segq");
        assert_eq!(run.history.len(), 2);
        assert_eq!(run.history[1]["_step"], json!(1));
        let image = &run.history[1]["samples/0"];
        assert_eq!(image["_type"], "image-file");
        assert_eq!(image["width"], 6);
        let gt_path = image["masks"]["ground_truth"]["path"].as_str().unwrap();
        assert!(gt_path.starts_with("media/images/mask/samples_0_1_") && gt_path.ends_with(".mask.png"));
        let table = &run.history[1]["per_class_iou"];
        assert_eq!(
            (table["_type"].as_str(), table["nrows"].as_u64()),
            (Some("table-file"), Some(2))
        );
        assert!(!run.history[0].contains_key("per_class_iou"));
        // 1 table + 1 image + 2 distinct masks.
        assert_eq!(run.media.len(), 4);
        for file in &run.media {
            let hash = sha256_hex(&file.bytes);
            assert!(file.path.contains(&hash[..20]), "{}", file.path);
        }
        let mask_file = run.media.iter().find(|m| m.path == gt_path).unwrap();
        let decoded = image::load_from_memory(&mask_file.bytes).unwrap();
        assert_eq!(decoded.color(), image::ColorType::L8);
        assert_eq!(decoded.to_luma8().get_pixel(2, 0).0, [2]);
        let labels = &run.wandb_config["mask/class_labels"]["samples/0_wandb_delimeter_predictions"];
        assert_eq!(labels["type"], "mask/class_labels");
        assert_eq!(labels["value"]["2"], "sky");
        assert_eq!(run.summary["mean_iou"], json!(0.35));
        assert_eq!(run.summary["images_per_s"], json!(2.5));
        assert_eq!(run.summary["_step"], json!(1));
    }

    #[test]
    fn bad_inputs_are_one_line_errors() {
        let mut log = sample_log();
        log.tables[0].rows.push(vec![json!("x")]);
        let err = prepare_run(&TrackingSettings::default(), &log, "a".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("table per_class_iou row 2"), "{err}");
        let mut log = sample_log();
        log.images[0].masks[0].1 = image::GrayImage::new(3, 3);
        let err = prepare_run(&TrackingSettings::default(), &log, "a".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("mask ground_truth: 3x3"), "{err}");
        let mut log = sample_log();
        log.history[0].insert("_step".into(), json!(3));
        assert!(prepare_run(&TrackingSettings::default(), &log, "a".into()).is_err());
    }
}
