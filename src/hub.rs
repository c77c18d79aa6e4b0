//! Where files come from: a local path, a Hugging Face Hub repo (hf-hub, sharing the Python libraries' cache and
//! honouring HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN), or an http(s) URL cached on disk.
//! Tokens are never logged or put in error messages.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::secret::Secret;
use crate::{Error, Result};

/// The Hub cache folder the Python libraries use: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    home_dir().join(".cache").join("huggingface").join("hub")
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// True when `HF_HUB_OFFLINE` asks for cache-only access (as huggingface_hub reads it).
pub fn hub_offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE")
            .unwrap_or_default()
            .to_ascii_lowercase()
            .as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// `HF_TOKEN`, else the token file huggingface_hub writes at `$HF_HOME/token`.
fn hub_token() -> Option<Secret> {
    if let Ok(t) = std::env::var("HF_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(Secret::new(t.trim()));
    }
    let home = std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home_dir().join(".cache").join("huggingface"));
    std::fs::read_to_string(home.join("token"))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .map(Secret::new)
}

/// A repo id with an optional `@revision`, e.g. `nvidia/segformer-b0-finetuned-ade-512-512@main`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// A dataset id: like a model id, but legacy datasets have no owner (`scene_parse_150`).
    pub fn parse_dataset(s: &str, default_revision: &str) -> Option<Self> {
        let (name, revision) = match s.split_once('@') {
            Some((n, r)) => (n, r),
            None => (s, default_revision),
        };
        let candidate = if name.contains('/') {
            name.to_string()
        } else {
            format!("_/{name}")
        };
        let id = Self::parse(&format!("{candidate}@{revision}"))?;
        Some(Self {
            repo: id.repo.trim_start_matches("_/").to_string(),
            revision: id.revision,
        })
    }

    pub fn parse(s: &str) -> Option<Self> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r, rev.to_string()),
            None => (s, "main".to_string()),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if parts.len() == 2 && parts.iter().all(|p| valid(p)) && !revision.is_empty() {
            Some(Self {
                repo: repo.to_string(),
                revision,
            })
        } else {
            None
        }
    }
}

/// Access to one Hub repository (model or dataset), cache first.
pub struct HubRepo {
    id: HubId,
    kind: RepoType,
    cache_dir: PathBuf,
    offline: bool,
}

impl HubRepo {
    /// A model repo, with the cache and offline switch from the environment.
    pub fn model(id: HubId) -> Self {
        Self {
            id,
            kind: RepoType::Model,
            cache_dir: hub_cache_dir(),
            offline: hub_offline(),
        }
    }

    /// A dataset repo, with the cache and offline switch from the environment.
    pub fn dataset(id: HubId) -> Self {
        Self {
            id,
            kind: RepoType::Dataset,
            cache_dir: hub_cache_dir(),
            offline: hub_offline(),
        }
    }

    /// The same repo with an explicit cache folder and offline switch (tests, tools).
    pub fn with_cache(mut self, cache_dir: PathBuf, offline: bool) -> Self {
        self.cache_dir = cache_dir;
        self.offline = offline;
        self
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.id.repo.clone(), self.kind, self.id.revision.clone())
    }

    pub fn describe(&self) -> String {
        let kind = if matches!(self.kind, RepoType::Dataset) {
            "dataset"
        } else {
            "model"
        };
        format!("Hub {kind} {}@{}", self.id.repo, self.id.revision)
    }

    /// The Hub client on this repo's cache, with `HF_TOKEN` and `HF_ENDPOINT` as huggingface_hub reads them.
    fn api(&self) -> Result<hf_hub::api::sync::Api> {
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty());
        let mut builder = ApiBuilder::from_cache(Cache::new(self.cache_dir.clone()))
            .with_token(hub_token().map(|t| t.expose().to_string()))
            .with_progress(false);
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        builder.build().map_err(|e| {
            Error::network(
                self.describe(),
                format!("cannot start the Hub client: {}", scrub(&e.to_string())),
            )
        })
    }

    /// A file of the repo, from the shared cache when present, else downloaded (unless offline).
    pub fn get(&self, filename: &str) -> Result<PathBuf> {
        let cache = Cache::new(self.cache_dir.clone());
        if let Some(path) = cache.repo(self.repo()).get(filename) {
            tracing::debug!(file = filename, path = %path.display(), "found in the Hub cache");
            return Ok(path);
        }
        if self.offline {
            return Err(Error::not_found(
                self.describe(),
                format!(
                    "`{filename}` is not in the cache at {} and HF_HUB_OFFLINE is set (download it once with network, or pass a local folder)",
                    self.cache_dir.display()
                ),
            ));
        }
        let api = self.api()?;
        tracing::info!(source = %self.describe(), file = filename, "downloading");
        api.repo(self.repo())
            .get(filename)
            .map_err(|e| self.download_error(filename, &e.to_string()))
    }

    /// Names of the repo's files: from the Hub, or from the cached snapshot when offline or unreachable.
    pub fn list_files(&self) -> Result<Vec<String>> {
        if self.offline {
            return self.cached_snapshot_files();
        }
        let api = self.api()?;
        match api.repo(self.repo()).info() {
            Ok(info) => Ok(info.siblings.into_iter().map(|s| s.rfilename).collect()),
            Err(e) => {
                // Fall back to what is cached, as huggingface_hub does when the Hub cannot be reached.
                let cached = self.cached_snapshot_files().unwrap_or_default();
                if cached.is_empty() {
                    Err(self.download_error("(file list)", &e.to_string()))
                } else {
                    Ok(cached)
                }
            }
        }
    }

    fn cached_snapshot_files(&self) -> Result<Vec<String>> {
        let folder = self.cache_dir.join(self.repo().folder_name());
        let revision = if self.id.revision.len() == 40 {
            self.id.revision.clone()
        } else {
            let ref_file = folder.join("refs").join(&self.id.revision);
            std::fs::read_to_string(&ref_file)
                .map_err(|_| {
                    Error::not_found(
                        self.describe(),
                        format!("not cached at {} and HF_HUB_OFFLINE is set", self.cache_dir.display()),
                    )
                })?
                .trim()
                .to_string()
        };
        let snapshot = folder.join("snapshots").join(revision);
        let mut files = Vec::new();
        collect_files(&snapshot, &snapshot, &mut files);
        files.sort();
        Ok(files)
    }

    fn download_error(&self, filename: &str, message: &str) -> Error {
        let message = scrub(message);
        let missing = message.contains("404");
        let hint = if missing {
            "the repository, revision or file does not exist (or is private: set HF_TOKEN)"
        } else if message.contains("401") || message.contains("403") {
            "access denied: the repository is gated or private; set HF_TOKEN to a token with access"
        } else {
            "the Hub cannot be reached; to work offline, download once with network (the cache is shared with transformers) and set HF_HUB_OFFLINE=1, or pass a local folder"
        };
        let message = format!("cannot fetch `{filename}`: {hint} ({message})");
        if missing {
            Error::not_found(self.describe(), message)
        } else {
            Error::network(self.describe(), message)
        }
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                collect_files(root, &path, out);
            } else if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
}

/// Removes anything that looks like a Hub token (`hf_...`) from a message before it is shown.
pub fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for (i, word) in message.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if let Some(pos) = word.find("hf_") {
            out.push_str(&word[..pos]);
            out.push_str("hf_***");
        } else {
            out.push_str(word);
        }
    }
    if let Some(token) = hub_token() {
        out = out.replace(token.expose(), "***");
    }
    out
}

/// Downloads `url` into segq's URL cache (`$XDG_CACHE_HOME/segq/urls` or `~/.cache/segq/urls`), keyed by the URL,
/// and returns the local path; a cached copy is reused without network.
pub fn fetch_url(url: &str) -> Result<PathBuf> {
    let cache_root = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home_dir().join(".cache"))
        .join("segq")
        .join("urls");
    let key = format!("{:016x}", fnv1a(url.as_bytes()));
    let name = url.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("download");
    let path = cache_root.join(key).join(name);
    if path.exists() {
        tracing::debug!(url, path = %path.display(), "URL cache hit");
        return Ok(path);
    }
    if hub_offline() {
        return Err(Error::not_found(url, "not in the URL cache and HF_HUB_OFFLINE is set"));
    }
    let dir = path.parent().expect("has a parent");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tracing::info!(url, "downloading");
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .new_agent();
    let mut response = agent.get(url).call().map_err(|e| {
        Error::network(
            url,
            format!("download failed: {e} (to work offline, pass a local folder)"),
        )
    })?;
    let tmp = path.with_extension("part");
    let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    std::io::copy(&mut response.body_mut().as_reader(), &mut file).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_ids() {
        assert_eq!(
            HubId::parse("nvidia/segformer-b0-finetuned-ade-512-512@v1"),
            Some(HubId {
                repo: "nvidia/segformer-b0-finetuned-ade-512-512".into(),
                revision: "v1".into()
            })
        );
        assert_eq!(HubId::parse("a/b").unwrap().revision, "main");
        assert!(HubId::parse("./local/dir").is_none());
        assert!(HubId::parse("noslash").is_none());
    }

    #[test]
    fn scrub_hides_tokens() {
        assert_eq!(
            scrub("auth failed for hf_abcdef123 at x"),
            "auth failed for hf_*** at x"
        );
    }
}
