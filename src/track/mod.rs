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
    /// A shard of a sharded evaluation (`--shard I/N`) also logs its partial runs, named `<level>-shard-I-of-N` and
    /// tagged `shard-I-of-N` (default false: only `segq merge` publishes, the merged runs). Needs `group`.
    pub shard_runs: Option<bool>,
    /// Folder under which `wandb/` run folders are written (default ".").
    pub dir: Option<PathBuf>,
    /// API server (default https://api.wandb.ai).
    pub base_url: Option<String>,
    /// Seconds to wait for a connection to the W&B server (default 10).
    pub connect_timeout_s: Option<f64>,
    /// Seconds one try of one request may take, as `WANDB_HTTP_TIMEOUT` (default 30).
    pub http_timeout_s: Option<f64>,
    /// Seconds the uploads of one `segq eval` may lose to failed tries and waits (back-off, `Retry-After`) before
    /// the remaining runs are left offline (default 30).
    pub retry_budget_s: Option<f64>,
}

/// Default of `tracking.connect_timeout_s`.
pub const DEFAULT_CONNECT_TIMEOUT_S: f64 = 10.0;
/// Default of `tracking.http_timeout_s` / `WANDB_HTTP_TIMEOUT`.
pub const DEFAULT_HTTP_TIMEOUT_S: f64 = 30.0;
/// Default of `tracking.retry_budget_s`: short enough that an unreachable server costs half a minute, not the
/// five minutes of five 60-second tries it used to.
pub const DEFAULT_RETRY_BUDGET_S: f64 = 30.0;
/// Longest accepted value of any of the three durations: a day. Anything longer is a typo (milliseconds).
const MAX_SECONDS: f64 = 86_400.0;

impl TrackingSettings {
    /// Layers W&B's environment variables over `file` (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME,
    /// WANDB_RUN_GROUP, WANDB_TAGS, WANDB_DIR, WANDB_BASE_URL, WANDB_HTTP_TIMEOUT); a malformed value is an error
    /// naming the variable.
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
        if let Some(url) = var("WANDB_BASE_URL") {
            check_base_url(&url)
                .map_err(|why| crate::Error::config("WANDB_BASE_URL", format!("WANDB_BASE_URL={url}: {why}")))?;
            merged.base_url = Some(url);
        }
        if let Some(seconds) = var("WANDB_HTTP_TIMEOUT") {
            merged.http_timeout_s = Some(parse_seconds(&seconds).map_err(|why| {
                crate::Error::config("WANDB_HTTP_TIMEOUT", format!("WANDB_HTTP_TIMEOUT={seconds}: {why}"))
            })?);
        }
        Ok(merged)
    }

    /// Checks what serde cannot: the server address and the three durations. Errors name the segq.toml key.
    pub fn validate(&self) -> crate::Result<()> {
        if let Some(url) = &self.base_url {
            check_base_url(url).map_err(|why| {
                crate::Error::config("tracking.base_url", format!("tracking.base_url {url:?}: {why}"))
            })?;
        }
        for (key, value) in [
            ("tracking.connect_timeout_s", self.connect_timeout_s),
            ("tracking.http_timeout_s", self.http_timeout_s),
            ("tracking.retry_budget_s", self.retry_budget_s),
        ] {
            if let Some(seconds) = value {
                check_seconds(seconds).map_err(|why| crate::Error::config(key, format!("{key} = {seconds}: {why}")))?;
            }
        }
        Ok(())
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
            shard_runs: over.shard_runs.or(self.shard_runs),
            dir: over.dir.or(self.dir),
            base_url: over.base_url.or(self.base_url),
            connect_timeout_s: over.connect_timeout_s.or(self.connect_timeout_s),
            http_timeout_s: over.http_timeout_s.or(self.http_timeout_s),
            retry_budget_s: over.retry_budget_s.or(self.retry_budget_s),
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

/// Why `url` cannot be a W&B server address, if it cannot: it must be `http(s)://host[:port][/path]`.
pub fn check_base_url(url: &str) -> Result<(), String> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains spaces or control characters".into());
    }
    let lower = url.to_ascii_lowercase();
    let Some(rest) = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://")) else {
        return Err("expected an http:// or https:// address, e.g. https://api.wandb.ai".into());
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(
            "user names or passwords do not belong in the address (the API key is read from WANDB_API_KEY)".into(),
        );
    }
    let (_, host) = secret::api_host(url);
    if host.is_empty() {
        return Err("no host name".into());
    }
    if rest.contains(['?', '#']) {
        return Err("a server address has no query or fragment".into());
    }
    url.parse::<ureq::http::Uri>()
        .map_err(|e| format!("not a valid address ({e})"))?;
    let port = authority.rsplit_once(']').map_or(authority, |(_, after)| after);
    if let Some((_, port)) = port.rsplit_once(':')
        && !port.parse::<u16>().is_ok_and(|p| p != 0)
    {
        return Err(format!("port `{port}` is not a number from 1 to 65535"));
    }
    Ok(())
}

/// A duration in seconds as written in a setting: a positive number no larger than a day.
fn parse_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| "expected a number of seconds".to_string())?;
    check_seconds(seconds)?;
    Ok(seconds)
}

fn check_seconds(seconds: f64) -> Result<(), String> {
    if seconds.is_finite() && seconds > 0.0 && seconds <= MAX_SECONDS {
        Ok(())
    } else {
        Err(format!(
            "expected a number of seconds above 0 and at most {MAX_SECONDS}"
        ))
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
    /// Why the runs were kept offline when the mode was chosen for the user (no API key found), once for all runs.
    pub notice: Option<String>,
    /// The `wandb/` folder that holds the run folders.
    pub wandb_dir: PathBuf,
    /// A stop was asked for (Ctrl-C) before every upload was done; the runs not uploaded are on disk.
    pub interrupted: bool,
}

#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// The run's display name in W&B (the `tracking.name` prefix included).
    pub name: String,
    /// Empty when tracking is disabled.
    pub run_id: String,
    /// Where the run ended up: Online only if the upload completed.
    pub mode: TrackingMode,
    /// The W&B run folder written on disk.
    pub offline_dir: Option<PathBuf>,
    /// The run's page, when uploaded.
    pub url: Option<String>,
    /// Why an online run was not uploaded, in one line naming the server and the run folder to `wandb sync`.
    pub upload_error: Option<String>,
}

/// Logs every run as configured; see [`wandb::log_runs_with`] for the knobs tests use.
pub fn log_runs(settings: &TrackingSettings, runs: &[RunLog]) -> crate::Result<TrackOutcome> {
    wandb::log_runs_with(
        settings,
        runs,
        &wandb::OnlineOptions::from_settings(settings),
        &|name| std::env::var(name).ok(),
    )
}

/// Checks `settings` (merged with the environment) as [`log_runs`] will use them, with the real environment:
/// the call to make before a long evaluation whose results will be logged. See [`wandb::resolve`].
pub fn check_settings(settings: &TrackingSettings) -> crate::Result<()> {
    wandb::resolve(settings, &|name| std::env::var(name).ok()).map(|_| ())
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
    fn server_addresses_and_durations_are_checked() {
        for good in [
            "https://api.wandb.ai",
            "http://127.0.0.1:8080/",
            "https://wandb.example.com/base",
            "http://[::1]:9",
        ] {
            assert!(check_base_url(good).is_ok(), "{good}");
        }
        for bad in [
            "api.wandb.ai",
            "not a url",
            "http//api.wandb.ai",
            "ftp://api.wandb.ai",
            "http://",
            "http://:8080",
            "http://localhost:99999",
            "http://localhost:0",
            "https://user:pw@api.wandb.ai",
            "https://api.wandb.ai/?x=1",
        ] {
            assert!(check_base_url(bad).is_err(), "{bad}");
        }
        let vars = |name: &str| match name {
            "WANDB_BASE_URL" => Some("http//oops".to_string()),
            _ => None,
        };
        let err = TrackingSettings::from_vars_over(TrackingSettings::default(), &vars).unwrap_err();
        assert!(err.to_string().starts_with("WANDB_BASE_URL=http//oops: "), "{err}");
        for (value, ok) in [
            ("2.5", true),
            ("0", false),
            ("-1", false),
            ("soon", false),
            ("1e9", false),
        ] {
            let vars = |name: &str| (name == "WANDB_HTTP_TIMEOUT").then(|| value.to_string());
            let merged = TrackingSettings::from_vars_over(TrackingSettings::default(), &vars);
            assert_eq!(merged.is_ok(), ok, "{value}");
            if let Err(e) = merged {
                assert!(e.to_string().contains("WANDB_HTTP_TIMEOUT"), "{e}");
            }
        }
        let settings = TrackingSettings {
            retry_budget_s: Some(f64::NAN),
            ..Default::default()
        };
        assert!(
            settings
                .validate()
                .unwrap_err()
                .to_string()
                .contains("tracking.retry_budget_s")
        );
        assert!(TrackingSettings::default().validate().is_ok());
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
