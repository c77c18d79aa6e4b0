//! Experiment tracking: publishes evaluation results (plain data, no eval types) to Weights & Biases, as
//! W&B's own offline run folders that `wandb sync` uploads, and online through W&B's HTTP API.

pub mod secret;
pub mod wandb;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use secret::Secret;

/// Default W&B project when neither segq.toml, `WANDB_PROJECT` nor the command line names one.
pub const DEFAULT_PROJECT: &str = "segq";
/// W&B's public API server.
pub const DEFAULT_BASE_URL: &str = "https://api.wandb.ai";

/// Where tracking data goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum TrackingMode {
    /// Upload to the W&B server (the offline folder is written too, and kept if the upload fails).
    Online,
    /// Only write W&B's offline run folder, for a later `wandb sync`.
    Offline,
    /// Log nothing.
    Disabled,
}

impl TrackingMode {
    /// Parses `WANDB_MODE` spellings, including W&B's older `dryrun` and `run`.
    pub fn parse(text: &str) -> Option<TrackingMode> {
        match text.trim().to_ascii_lowercase().as_str() {
            "online" | "run" => Some(TrackingMode::Online),
            "offline" | "dryrun" => Some(TrackingMode::Offline),
            "disabled" | "off" => Some(TrackingMode::Disabled),
            _ => None,
        }
    }
}

impl std::str::FromStr for TrackingMode {
    type Err = crate::Error;
    fn from_str(text: &str) -> crate::Result<TrackingMode> {
        TrackingMode::parse(text)
            .ok_or_else(|| crate::Error::unsupported(format!("`{text}`"), "expected online, offline or disabled"))
    }
}

/// segq.toml's `tracking.mode`, `--wandb` and `WANDB_MODE` accept the same spellings.
impl TryFrom<String> for TrackingMode {
    type Error = crate::Error;
    fn try_from(text: String) -> crate::Result<TrackingMode> {
        text.parse()
    }
}

/// Tracking settings as users write them (`[tracking]` in segq.toml, env vars, CLI flags); `None` = not set at
/// this layer. Merge order: defaults < file < environment < command line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingSettings {
    /// online | offline | disabled; unset: online when an API key is found, else offline (with a notice).
    pub mode: Option<TrackingMode>,
    /// W&B project (default "segq").
    pub project: Option<String>,
    /// W&B entity (user or team); unset: the key's default entity.
    pub entity: Option<String>,
    /// Display-name prefix for the runs; unset: each run's own name.
    pub name: Option<String>,
    /// Group that holds all runs of one `segq eval`.
    pub group: Option<String>,
    /// Tags added to every run.
    pub tags: Option<Vec<String>>,
    /// Folder under which `wandb/` run folders are written (default ".").
    pub dir: Option<PathBuf>,
    /// API server (default https://api.wandb.ai).
    pub base_url: Option<String>,
}

impl TrackingSettings {
    /// Layers W&B's environment variables over `file` (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME,
    /// WANDB_RUN_GROUP, WANDB_TAGS, WANDB_DIR, WANDB_BASE_URL).
    pub fn from_env_over(file: TrackingSettings) -> crate::Result<TrackingSettings> {
        Self::from_vars_over(file, &|name| std::env::var(name).ok())
    }

    /// As [`Self::from_env_over`] with an injected variable lookup.
    pub fn from_vars_over(
        file: TrackingSettings,
        vars: &dyn Fn(&str) -> Option<String>,
    ) -> crate::Result<TrackingSettings> {
        let var = |name: &str| vars(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let mut merged = file;
        if let Some(mode) = var("WANDB_MODE") {
            merged.mode = Some(TrackingMode::parse(&mode).ok_or_else(|| {
                crate::Error::config(
                    "WANDB_MODE",
                    format!("WANDB_MODE={mode}: expected online, offline or disabled"),
                )
            })?);
        }
        merged.project = var("WANDB_PROJECT").or(merged.project);
        merged.entity = var("WANDB_ENTITY").or(merged.entity);
        merged.name = var("WANDB_NAME").or(merged.name);
        merged.group = var("WANDB_RUN_GROUP").or(merged.group);
        if let Some(tags) = var("WANDB_TAGS") {
            merged.tags = Some(split_tags(&tags));
        }
        merged.dir = var("WANDB_DIR").map(PathBuf::from).or(merged.dir);
        merged.base_url = var("WANDB_BASE_URL").or(merged.base_url);
        Ok(merged)
    }

    /// Overlays every field set in `over` (the command line) on `self`.
    pub fn overlay(self, over: TrackingSettings) -> TrackingSettings {
        TrackingSettings {
            mode: over.mode.or(self.mode),
            project: over.project.or(self.project),
            entity: over.entity.or(self.entity),
            name: over.name.or(self.name),
            group: over.group.or(self.group),
            tags: over.tags.or(self.tags),
            dir: over.dir.or(self.dir),
            base_url: over.base_url.or(self.base_url),
        }
    }

    pub fn project_or_default(&self) -> &str {
        self.project.as_deref().unwrap_or(DEFAULT_PROJECT)
    }

    pub fn dir_or_default(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| PathBuf::from("."))
    }

    pub fn base_url_or_default(&self) -> &str {
        self.base_url
            .as_deref()
            .unwrap_or(DEFAULT_BASE_URL)
            .trim_end_matches('/')
    }
}

/// Splits a comma list of tags, dropping blanks.
pub fn split_tags(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Everything logged for one evaluated level + method: one W&B run.
#[derive(Clone, Debug, Default)]
pub struct RunLog {
    pub name: String,
    pub group: String,
    pub tags: Vec<String>,
    pub config: Map<String, Value>,
    /// One row per step, in step order.
    pub history: Vec<Map<String, Value>>,
    pub summary: Map<String, Value>,
    pub tables: Vec<Table>,
    pub images: Vec<MaskedImage>,
    pub exit_code: i32,
}

/// A W&B table (logged at the run's last step).
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub key: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// An image with segmentation masks (pixel = class id), shown by W&B as toggleable overlays.
#[derive(Clone, Debug)]
pub struct MaskedImage {
    pub key: String,
    pub caption: String,
    pub rgb: image::RgbImage,
    /// (mask name, e.g. "ground_truth" or "predictions", mask of the image's size).
    pub masks: Vec<(String, image::GrayImage)>,
    pub class_labels: BTreeMap<u32, String>,
}

/// What happened to each run.
#[derive(Clone, Debug, Default)]
pub struct TrackOutcome {
    pub runs: Vec<RunOutcome>,
}

#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub name: String,
    /// Empty when tracking is disabled.
    pub run_id: String,
    /// Where the run ended up: Online only if the upload completed.
    pub mode: TrackingMode,
    /// The W&B run folder written on disk.
    pub offline_dir: Option<PathBuf>,
    /// The run's page, when uploaded.
    pub url: Option<String>,
    /// One-line notices (fallbacks, sync hints).
    pub warnings: Vec<String>,
}

/// Logs every run as configured; see [`wandb::log_runs_with`] for the knobs tests use.
pub fn log_runs(settings: &TrackingSettings, runs: &[RunLog]) -> crate::Result<TrackOutcome> {
    wandb::log_runs_with(settings, runs, &wandb::OnlineOptions::default(), &|name| {
        std::env::var(name).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_and_cli_overrides_env() {
        let file = TrackingSettings {
            mode: Some(TrackingMode::Online),
            project: Some("from-file".into()),
            entity: Some("team".into()),
            ..Default::default()
        };
        let vars = |name: &str| match name {
            "WANDB_MODE" => Some("dryrun".to_string()),
            "WANDB_PROJECT" => Some("from-env".to_string()),
            "WANDB_TAGS" => Some("a, b,,c ".to_string()),
            "WANDB_DIR" => Some("/tmp/x".to_string()),
            "WANDB_ENTITY" => Some("   ".to_string()),
            _ => None,
        };
        let merged = TrackingSettings::from_vars_over(file, &vars).unwrap();
        assert_eq!(merged.mode, Some(TrackingMode::Offline));
        assert_eq!(merged.project.as_deref(), Some("from-env"));
        assert_eq!(
            merged.entity.as_deref(),
            Some("team"),
            "blank env var does not override"
        );
        assert_eq!(merged.tags, Some(vec!["a".into(), "b".into(), "c".into()]));
        assert_eq!(merged.dir, Some(PathBuf::from("/tmp/x")));
        let cli = TrackingSettings {
            project: Some("from-cli".into()),
            ..Default::default()
        };
        let last = merged.overlay(cli);
        assert_eq!(last.project_or_default(), "from-cli");
        assert_eq!(last.mode, Some(TrackingMode::Offline));
        assert_eq!(TrackingSettings::default().project_or_default(), "segq");
        assert_eq!(
            TrackingSettings::default().base_url_or_default(),
            "https://api.wandb.ai"
        );
    }

    #[test]
    fn bad_mode_is_one_line_error() {
        let vars = |name: &str| (name == "WANDB_MODE").then(|| "sometimes".to_string());
        let err = TrackingSettings::from_vars_over(TrackingSettings::default(), &vars)
            .unwrap_err()
            .to_string();
        assert!(err.contains("WANDB_MODE=sometimes") && !err.contains('\n'), "{err}");
    }

    #[test]
    fn settings_from_toml() {
        let table: toml::Table = toml::from_str("mode = \"dryrun\"\nproject = \"p\"\ntags = [\"x\"]\n").unwrap();
        let settings: TrackingSettings = table.try_into().unwrap();
        assert_eq!(
            settings.mode,
            Some(TrackingMode::Offline),
            "W&B's `dryrun` spelling, as WANDB_MODE accepts"
        );
        let bad: Result<TrackingSettings, _> = toml::from_str("mode = \"sometimes\"\n");
        assert!(bad.unwrap_err().to_string().contains("sometimes"));
    }
}
