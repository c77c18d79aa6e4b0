//! Where files come from: a local path, a Hugging Face Hub repo (hf-hub, sharing the Python libraries' cache and
//! honouring HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN), or an http(s) URL cached on disk. Downloads are
//! bounded (size cap, timeouts, stop requests) and checked before they enter a cache, so a cache never holds an
//! error page or half a file. Tokens are never logged or put in error messages.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::interrupt::{Received, recv_unless_stopped};
use crate::secret::Secret;
use crate::{Error, Result, limits};

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

/// A repository's file names, as [`HubRepo::listing`] found them.
#[derive(Clone, Debug)]
pub struct Listing {
    pub files: Vec<String>,
    /// The commit of the listed revision, when known.
    pub commit: Option<String>,
    /// Listed from the local cache (offline or the Hub unreachable): only the files downloaded before.
    pub from_cache: bool,
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

    /// A file of the repo, from the shared cache when present, else downloaded (unless offline). Either way it is
    /// checked ([`check_download`]): a bad cached file is named for deletion, a bad download is removed from the
    /// cache. A stop request ends the wait for a download.
    pub fn get(&self, filename: &str) -> Result<PathBuf> {
        let cache = Cache::new(self.cache_dir.clone());
        if let Some(path) = cache.repo(self.repo()).get(filename) {
            tracing::debug!(file = filename, path = %path.display(), "found in the Hub cache");
            check_download(&path, filename).map_err(|why| {
                Error::invalid(
                    path.display().to_string(),
                    format!(
                        "cached `{filename}` of {} is not usable: {why}; delete {} to download it again",
                        self.describe(),
                        path.display()
                    ),
                )
            })?;
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
        // hf-hub blocks in its own socket reads: it runs on a worker thread, abandoned on a stop request.
        let repo = api.repo(self.repo());
        let name = filename.to_string();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("segq-hub-download".into())
            .spawn(move || {
                let _ = sender.send(repo.get(&name).map_err(|e| e.to_string()));
            })
            .map_err(|e| Error::internal(format!("cannot start a download thread: {e}")))?;
        let path = match recv_unless_stopped(&receiver, None) {
            Received::Value(Ok(path)) => path,
            Received::Value(Err(message)) => return Err(self.download_error(filename, &message)),
            Received::Stopped => return Err(Error::Interrupted),
            Received::TimedOut | Received::Disconnected => {
                return Err(self.download_error(filename, "the download ended without a result"));
            }
        };
        if let Err(why) = check_download(&path, filename) {
            // Not left in the shared cache, where every later run (and transformers) would pick it up.
            if let Ok(blob) = std::fs::canonicalize(&path) {
                let _ = std::fs::remove_file(blob);
            }
            let _ = std::fs::remove_file(&path);
            return Err(Error::invalid(
                self.describe(),
                format!("downloaded `{filename}` is not usable: {why}; it was not kept in the cache"),
            ));
        }
        Ok(path)
    }

    /// Names of the repo's files: from the Hub, or from the cached snapshot when offline or unreachable.
    pub fn list_files(&self) -> Result<Vec<String>> {
        self.listing().map(|listing| listing.files)
    }

    /// The repo's files and the commit they belong to: from the Hub, or from the cached snapshot when offline or
    /// unreachable (then `from_cache` is true and only the cached files are listed).
    pub fn listing(&self) -> Result<Listing> {
        let cached = || -> Result<Listing> {
            Ok(Listing {
                files: self.cached_snapshot_files()?,
                commit: self.cached_commit().ok(),
                from_cache: true,
            })
        };
        if self.offline {
            return cached();
        }
        let api = self.api()?;
        match api.repo(self.repo()).info() {
            Ok(info) => Ok(Listing {
                files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
                commit: Some(info.sha).filter(|sha| !sha.is_empty()),
                from_cache: false,
            }),
            Err(e) => {
                // Fall back to what is cached, as huggingface_hub does when the Hub cannot be reached.
                match cached() {
                    Ok(listing) if !listing.files.is_empty() => Ok(listing),
                    _ => Err(self.download_error("(file list)", &e.to_string())),
                }
            }
        }
    }

    /// Cache only (`HF_HUB_OFFLINE`).
    pub fn offline(&self) -> bool {
        self.offline
    }

    /// The repo's folder name in the cache (`datasets--owner--name`).
    pub fn folder_name(&self) -> String {
        self.repo().folder_name()
    }

    /// True when `filename` is in the shared cache for this revision (nothing is checked or downloaded).
    pub fn is_cached(&self, filename: &str) -> bool {
        Cache::new(self.cache_dir.clone())
            .repo(self.repo())
            .get(filename)
            .is_some()
    }

    /// The cache folder of this repo (`<cache>/datasets--owner--name`), where the Python libraries keep it too.
    pub fn cache_folder(&self) -> PathBuf {
        self.cache_dir.join(self.repo().folder_name())
    }

    /// The last `bytes` bytes of `filename` at `commit` and the file's whole size, by one HTTP Range request (with
    /// `HF_TOKEN`, to `HF_ENDPOINT`): how a Parquet footer is read without the file. Fails, without reading the
    /// body, when the server ignores the range (HTTP 200) or the answer is not the file's tail.
    pub fn read_tail(&self, filename: &str, commit: &str, bytes: u64) -> Result<(Vec<u8>, u64)> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        let url = format!(
            "{}/{}/resolve/{commit}/{filename}",
            endpoint.trim_end_matches('/'),
            self.repo().url()
        );
        let limits = DownloadLimits::from_env()?;
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(limits.timeout))
            .timeout_recv_response(Some(limits.timeout))
            .timeout_per_read(Some(limits.timeout))
            // The Hub redirects file requests to its CDN with a signed address: the token stays with the Hub.
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .user_agent(concat!("segq/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = ureq::Agent::new_with_config(config);
        let mut request = agent.get(&url).header("Range", format!("bytes=-{bytes}"));
        if let Some(token) = hub_token() {
            request = request.header("Authorization", format!("Bearer {}", token.expose()));
        }
        let what = format!("`{filename}` of {}", self.describe());
        let mut response = request
            .call()
            .map_err(|e| Error::network(&what, format!("cannot read its footer: {}", scrub(&e.to_string()))))?;
        let status = response.status().as_u16();
        if status != 206 {
            return Err(Error::network(
                &what,
                format!("reading its footer with a Range request gave HTTP {status}, not 206"),
            ));
        }
        let size = response
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('/').next())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::network(&what, "the Range answer has no usable Content-Range"))?;
        let tail = response
            .body_mut()
            .with_config()
            .limit(bytes)
            .read_to_vec()
            .map_err(|e| Error::network(&what, format!("cannot read its footer: {e}")))?;
        if tail.len() as u64 != bytes.min(size) {
            return Err(Error::network(
                &what,
                format!("asked for the last {} bytes, got {}", bytes.min(size), tail.len()),
            ));
        }
        Ok((tail, size))
    }

    /// The commit the cached revision points at (`refs/<revision>`), or the revision itself when it is a hash.
    fn cached_commit(&self) -> Result<String> {
        if self.id.revision.len() == 40 {
            return Ok(self.id.revision.clone());
        }
        let ref_file = self.cache_folder().join("refs").join(&self.id.revision);
        std::fs::read_to_string(&ref_file)
            .map(|text| text.trim().to_string())
            .map_err(|_| {
                Error::not_found(
                    self.describe(),
                    format!("not cached at {} and HF_HUB_OFFLINE is set", self.cache_dir.display()),
                )
            })
    }

    fn cached_snapshot_files(&self) -> Result<Vec<String>> {
        let snapshot = self.cache_folder().join("snapshots").join(self.cached_commit()?);
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

/// Limits of one URL download.
#[derive(Clone, Debug)]
pub struct DownloadLimits {
    /// Largest file accepted: a `Content-Length` above it fails before reading, a body that grows past it is cut.
    pub max_bytes: u64,
    /// Limit for connecting, for the answer to start and for every wait for more data.
    pub timeout: Duration,
}

/// Seconds a download waits for the server when `HF_HUB_DOWNLOAD_TIMEOUT` is not set (huggingface_hub's default).
pub const DEFAULT_DOWNLOAD_TIMEOUT_S: f64 = 10.0;

impl DownloadLimits {
    /// `SEGQ_MAX_DOWNLOAD_BYTES` (default [`limits::DEFAULT_MAX_DOWNLOAD_BYTES`]) and `HF_HUB_DOWNLOAD_TIMEOUT`
    /// seconds (as huggingface_hub reads it; default 10); a malformed value is an error naming the variable.
    pub fn from_env() -> Result<DownloadLimits> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let max_bytes = match var("SEGQ_MAX_DOWNLOAD_BYTES") {
            None => limits::DEFAULT_MAX_DOWNLOAD_BYTES,
            Some(text) => text.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| {
                Error::config(
                    "SEGQ_MAX_DOWNLOAD_BYTES",
                    format!("SEGQ_MAX_DOWNLOAD_BYTES={text}: expected a number of bytes above 0"),
                )
            })?,
        };
        let timeout = match var("HF_HUB_DOWNLOAD_TIMEOUT") {
            None => Duration::from_secs_f64(DEFAULT_DOWNLOAD_TIMEOUT_S),
            Some(text) => text
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && *s <= 86_400.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    Error::config(
                        "HF_HUB_DOWNLOAD_TIMEOUT",
                        format!("HF_HUB_DOWNLOAD_TIMEOUT={text}: expected a number of seconds above 0, at most a day"),
                    )
                })?,
        };
        Ok(DownloadLimits { max_bytes, timeout })
    }
}

/// segq's own cache folder: `$XDG_CACHE_HOME/segq`, else `~/.cache/segq`.
pub fn segq_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home_dir().join(".cache"))
        .join("segq")
}

/// segq's URL cache: `$XDG_CACHE_HOME/segq/urls`, else `~/.cache/segq/urls`.
pub fn url_cache_dir() -> PathBuf {
    segq_cache_dir().join("urls")
}

/// Downloads `url` into segq's URL cache ([`url_cache_dir`]), keyed by the URL, and returns the local path; a
/// cached copy is reused without network. Limits from the environment ([`DownloadLimits::from_env`]).
pub fn fetch_url(url: &str) -> Result<PathBuf> {
    fetch_url_with(url, &url_cache_dir(), &DownloadLimits::from_env()?, hub_offline())
}

/// [`fetch_url`] with an explicit cache folder, limits and offline switch (`HF_HUB_OFFLINE`). The body streams to a `.part` file beside its final
/// name, is checked ([`check_download`]) and only then renamed into place: a failed, cut, oversized, interrupted
/// or invalid download leaves nothing in the cache. A stop request ends the download within about a second.
pub fn fetch_url_with(url: &str, cache_root: &Path, limits: &DownloadLimits, offline: bool) -> Result<PathBuf> {
    let key = format!("{:016x}", fnv1a(url.as_bytes()));
    let name = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .unwrap_or("download");
    let dir = cache_root.join(key);
    let path = dir.join(name);
    if path.exists() {
        tracing::debug!(url, path = %path.display(), "URL cache hit");
        check_download(&path, name).map_err(|why| {
            Error::invalid(
                path.display().to_string(),
                format!(
                    "cached download of {url} is not usable: {why}; delete {} to download it again",
                    path.display()
                ),
            )
        })?;
        return Ok(path);
    }
    if offline {
        return Err(Error::not_found(url, "not in the URL cache and HF_HUB_OFFLINE is set"));
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    remove_abandoned_parts(&dir);
    let part = PartFile {
        path: dir.join(format!(".{name}.{}.part", std::process::id())),
    };
    tracing::info!(url, "downloading");
    let result = download_to(url, &part.path, limits).and_then(|status| {
        check_download(&part.path, name)
            .map_err(|why| Error::invalid(url, format!("the server's answer (HTTP {status}) is not usable: {why}")))?;
        std::fs::rename(&part.path, &path).map_err(|e| Error::io(&path, e))
    });
    drop(part);
    if result.is_err() {
        // Leaves no empty key folder behind either (fails harmlessly when another file is there).
        let _ = std::fs::remove_dir(&dir);
    }
    result.map(|()| path)
}

/// A download in progress; removed when dropped (renamed away first on success).
struct PartFile {
    path: PathBuf,
}

impl Drop for PartFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes `.part` files of processes that no longer run (killed mid-download). Where `/proc` is missing, keeps
/// them: another process may be writing.
fn remove_abandoned_parts(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(stem) = file_name.to_str().and_then(|n| n.strip_suffix(".part")) else {
            continue;
        };
        let Some(pid) = stem.rsplit('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let proc = Path::new("/proc");
        if proc.is_dir() && !proc.join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// What the download thread hands over.
enum Piece {
    /// The status line and announced size.
    Head {
        status: u16,
        length: Option<u64>,
    },
    Data(Vec<u8>),
    End,
    Failed(String),
}

/// Bytes read from the socket per piece; at most [`PIECES_IN_FLIGHT`] pieces wait in memory.
const PIECE_BYTES: usize = 64 << 10;
const PIECES_IN_FLIGHT: usize = 8;

/// Streams `url`'s body to `part` within `limits`; returns the HTTP status. The socket is read on a worker thread
/// so that waiting for it notices a stop request and the stall deadline even when the server stops sending.
fn download_to(url: &str, part: &Path, limits: &DownloadLimits) -> Result<u16> {
    // The waiting side enforces `limits.timeout` (and names the variable); these longer limits only end the
    // worker thread once it has been abandoned.
    let reaper = limits.timeout * 2 + Duration::from_secs(1);
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(reaper))
        .timeout_recv_response(Some(reaper))
        .timeout_per_read(Some(reaper))
        .user_agent(concat!("segq/", env!("CARGO_PKG_VERSION")))
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let (sender, receiver) = std::sync::mpsc::sync_channel(PIECES_IN_FLIGHT);
    let worker_url = url.to_string();
    std::thread::Builder::new()
        .name("segq-download".into())
        .spawn(move || read_body(&agent, &worker_url, &sender))
        .map_err(|e| Error::internal(format!("cannot start a download thread: {e}")))?;
    let mut file = std::fs::File::create(part).map_err(|e| Error::io(part, e))?;
    let limit_text = format!(
        "the download limit of {} (SEGQ_MAX_DOWNLOAD_BYTES)",
        limits::human_bytes(limits.max_bytes)
    );
    let mut status = 0;
    let mut length = None;
    let mut written: u64 = 0;
    loop {
        let piece = match recv_unless_stopped(&receiver, Some(Instant::now() + limits.timeout)) {
            Received::Value(piece) => piece,
            Received::Stopped => return Err(Error::Interrupted),
            Received::TimedOut => {
                return Err(Error::network(
                    url,
                    format!(
                        "the server sent nothing for {} s after {} (HF_HUB_DOWNLOAD_TIMEOUT)",
                        limits.timeout.as_secs_f64(),
                        limits::human_bytes(written)
                    ),
                ));
            }
            Received::Disconnected => return Err(Error::internal("the download thread ended without a word")),
        };
        match piece {
            Piece::Head {
                status: code,
                length: announced,
            } => {
                status = code;
                length = announced;
                if code == 404 || code == 410 {
                    return Err(Error::not_found(
                        url,
                        format!("HTTP {code}: no such file on the server"),
                    ));
                }
                if !(200..300).contains(&code) {
                    return Err(Error::network(
                        url,
                        format!("HTTP {code} (to work offline, pass a local folder)"),
                    ));
                }
                if let Some(n) = announced.filter(|&n| n > limits.max_bytes) {
                    return Err(Error::network(
                        url,
                        format!(
                            "the server announces {}, more than {limit_text}",
                            limits::human_bytes(n)
                        ),
                    ));
                }
            }
            Piece::Data(bytes) => {
                written += bytes.len() as u64;
                if written > limits.max_bytes {
                    return Err(Error::network(
                        url,
                        format!("the download grew past {limit_text} and was stopped"),
                    ));
                }
                file.write_all(&bytes).map_err(|e| Error::io(part, e))?;
            }
            Piece::End => break,
            Piece::Failed(why) => {
                return Err(Error::network(
                    url,
                    format!("download failed after {}: {why}", limits::human_bytes(written)),
                ));
            }
        }
    }
    if let Some(n) = length.filter(|&n| n != written) {
        return Err(Error::network(
            url,
            format!("the connection closed after {written} of {n} bytes"),
        ));
    }
    file.sync_all().map_err(|e| Error::io(part, e))?;
    Ok(status)
}

/// The download thread: sends the head, then the body in pieces, until the end, an error, or the receiver is gone.
fn read_body(agent: &ureq::Agent, url: &str, sender: &std::sync::mpsc::SyncSender<Piece>) {
    let mut response = match agent.get(url).call() {
        Ok(response) => response,
        Err(e) => {
            let _ = sender.send(Piece::Failed(e.to_string()));
            return;
        }
    };
    let status = response.status().as_u16();
    let length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if sender.send(Piece::Head { status, length }).is_err() || !(200..300).contains(&status) {
        return;
    }
    // No body limit here: the receiving side counts and stops at its own.
    let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
    loop {
        let mut buffer = vec![0; PIECE_BYTES];
        let piece = match reader.read(&mut buffer) {
            Ok(0) => Piece::End,
            Ok(n) => {
                buffer.truncate(n);
                Piece::Data(buffer)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => Piece::Failed(e.to_string()),
        };
        let last = !matches!(piece, Piece::Data(_));
        if sender.send(piece).is_err() || last {
            return;
        }
    }
}

/// Largest safetensors header accepted (the format's own readers refuse above 100 MB).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Why a downloaded or cached file cannot be what its `name` says, if it cannot: an HTML page (a login wall, an
/// error page served with 200); a `.safetensors` whose header does not parse or whose size does not match it
/// (cut short); a `.json` that does not parse; a `.bin` that is neither a zip nor a pickle (PyTorch's formats).
/// Reads the header and small files only, never a whole checkpoint.
pub fn check_download(path: &Path, name: &str) -> std::result::Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut start = Vec::with_capacity(512);
    (&mut file)
        .take(512)
        .read_to_end(&mut start)
        .map_err(|e| e.to_string())?;
    if looks_like_html(&start) {
        return Err("it is an HTML page, not a model file (a login or error page?)".into());
    }
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".safetensors") {
        check_safetensors(&mut file, size)
    } else if lower.ends_with(".json") {
        file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        serde_json::from_reader::<_, serde::de::IgnoredAny>(std::io::BufReader::new(file))
            .map(|_| ())
            .map_err(|e| format!("not valid JSON ({e})"))
    } else if lower.ends_with(".bin") || lower.ends_with(".pt") || lower.ends_with(".pth") {
        if start.starts_with(b"PK\x03\x04") || start.first() == Some(&0x80) {
            Ok(())
        } else {
            Err("neither a zip nor a pickle, so not a PyTorch checkpoint".into())
        }
    } else if size == 0 {
        Err("it is empty".into())
    } else {
        Ok(())
    }
}

fn looks_like_html(start: &[u8]) -> bool {
    let text = start.strip_prefix(b"\xef\xbb\xbf").unwrap_or(start);
    let first = text.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(text.len());
    let head: Vec<u8> = text[first..].iter().take(9).map(u8::to_ascii_lowercase).collect();
    head.starts_with(b"<!doctype") || head.starts_with(b"<html")
}

/// Header length, header JSON and total size of a safetensors file: data offsets must end exactly at its end.
fn check_safetensors(file: &mut std::fs::File, size: u64) -> std::result::Result<(), String> {
    if size < 8 {
        return Err(format!("{size} bytes, too short for a safetensors file"));
    }
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(|e| e.to_string())?;
    let header_length = u64::from_le_bytes(length);
    if header_length <= MAX_SAFETENSORS_HEADER && header_length > size - 8 {
        return Err(format!(
            "the safetensors header announces {header_length} bytes but the file has only {size} (cut short?)"
        ));
    }
    if header_length > MAX_SAFETENSORS_HEADER {
        return Err(format!(
            "not a safetensors file (its first 8 bytes announce a {header_length}-byte header in a {size}-byte file)"
        ));
    }
    let mut header = vec![0u8; header_length as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("safetensors header is not a JSON object ({e})"))?;
    let mut data_end = 0u64;
    for (name, entry) in &header {
        if name == "__metadata__" {
            continue;
        }
        let end = entry
            .pointer("/data_offsets/1")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("safetensors header entry {name} has no data_offsets"))?;
        data_end = data_end.max(end);
    }
    let expected = 8 + header_length + data_end;
    if expected != size {
        return Err(format!(
            "the safetensors header describes {expected} bytes but the file has {size} (cut short?)"
        ));
    }
    Ok(())
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

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("segq-hub-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A safetensors file with one f32 tensor of `values`, cut to `keep` bytes when given.
    fn safetensors(values: usize, keep: Option<usize>) -> Vec<u8> {
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{values}],"data_offsets":[0,{}]}}}}"#,
            values * 4
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, values * 4));
        bytes.truncate(keep.unwrap_or(bytes.len()));
        bytes
    }

    #[test]
    fn downloads_are_checked_for_what_their_name_says() {
        let dir = scratch("check");
        let check = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            check_download(&path, name)
        };
        assert!(check("model.safetensors", &safetensors(10, None)).is_ok());
        let cut = check("model.safetensors", &safetensors(10, Some(60))).unwrap_err();
        assert!(cut.contains("cut short"), "{cut}");
        let junk = check("model.safetensors", &[0xff; 100]).unwrap_err();
        assert!(junk.contains("not a safetensors file"), "{junk}");
        let html = check("model.safetensors", b"\n  <!DOCTYPE html><html>login</html>").unwrap_err();
        assert!(html.contains("HTML"), "{html}");
        assert!(
            check("config.json", b"<HTML><body>x</body></HTML>")
                .unwrap_err()
                .contains("HTML")
        );
        assert!(check("config.json", br#"{"model_type": "segformer"}"#).is_ok());
        assert!(
            check("config.json", b"{\"model_type\": ")
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(check("pytorch_model.bin", b"PK\x03\x04rest").is_ok());
        assert!(check("pytorch_model.bin", b"\x80\x02}q").is_ok());
        assert!(check("pytorch_model.bin", b"hello").is_err());
        assert!(check("notes.txt", b"").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Serves `answers` in order, one connection each, then stops listening.
    fn serve(answers: Vec<Vec<u8>>) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for answer in answers {
                let (mut stream, _) = listener.accept().unwrap();
                let mut request = [0u8; 2048];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(&answer);
            }
        });
        url
    }

    fn http_200(body: &[u8]) -> Vec<u8> {
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(body);
        answer
    }

    #[test]
    fn a_bad_download_is_not_cached_and_a_good_one_is_reused() {
        let cache = scratch("fetch");
        let limits = DownloadLimits {
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(10),
        };
        let good = safetensors(16, None);
        let base = serve(vec![
            http_200(b"<!doctype html><title>502</title>"),
            b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            http_200(&good),
        ]);
        let url = format!("{base}/m/model.safetensors");
        let html = fetch_url_with(&url, &cache, &limits, false).unwrap_err().to_string();
        assert!(
            html.contains(&url) && html.contains("HTML") && html.contains("HTTP 200"),
            "{html}"
        );
        let busy = fetch_url_with(&url, &cache, &limits, false).unwrap_err().to_string();
        assert!(busy.contains("HTTP 503"), "{busy}");
        let mut left = Vec::new();
        collect_files(&cache, &cache, &mut left);
        assert!(left.is_empty(), "{left:?}");
        let path = fetch_url_with(&url, &cache, &limits, false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), good);
        // The server is gone: a second call is served by the cache.
        assert_eq!(fetch_url_with(&url, &cache, &limits, false).unwrap(), path);
        std::fs::write(&path, b"<html>stale error page</html>").unwrap();
        let stale = fetch_url_with(&url, &cache, &limits, false).unwrap_err().to_string();
        assert!(stale.contains(&format!("delete {}", path.display())), "{stale}");
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn an_announced_size_over_the_cap_is_refused_before_reading() {
        let cache = scratch("cap");
        let limits = DownloadLimits {
            max_bytes: 1000,
            timeout: Duration::from_secs(10),
        };
        let base = serve(vec![http_200(&[0u8; 5000])]);
        let err = fetch_url_with(&format!("{base}/big.bin"), &cache, &limits, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("announces") && err.contains("SEGQ_MAX_DOWNLOAD_BYTES"),
            "{err}"
        );
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn scrub_hides_tokens() {
        assert_eq!(
            scrub("auth failed for hf_abcdef123 at x"),
            "auth failed for hf_*** at x"
        );
    }
}
