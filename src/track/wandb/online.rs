//! Sends a [`PreparedRun`] to a W&B server the way W&B's own client does: GraphQL `UpsertBucket` creates the
//! run, `CreateRunFiles` + PUT upload the media, `file_stream` carries history and summary lines and finally
//! `complete`/`exitcode`. Every try has a connect and a whole-try deadline; tries that fail with 429, 5xx or a
//! network error are retried with exponential back-off (or the server's `Retry-After`) while the retry budget
//! lasts; a stop request (Ctrl-C) ends any wait within about a second.

use std::cell::Cell;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Map, Value, json};

use super::{PreparedRun, backoff_delay};
use crate::interrupt::{Received, recv_unless_stopped, sleep_unless_stopped, stop_requested};
use crate::track::{
    DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_HTTP_TIMEOUT_S, DEFAULT_RETRY_BUDGET_S, Secret, TrackingSettings,
};
use crate::{Error, Result};

/// HTTP behaviour of the online client.
#[derive(Clone, Debug)]
pub struct OnlineOptions {
    /// Most tries per request (first try included); the retry budget usually ends retrying first.
    pub attempts: u32,
    /// Wait before the first retry; doubled each time.
    pub base_delay: Duration,
    /// Longest back-off wait between tries (a server's `Retry-After` is honoured up to the retry budget instead).
    pub max_delay: Duration,
    /// Limit for opening a connection.
    pub connect_timeout: Duration,
    /// Limit for one try of one request, from sending to the last byte of the answer.
    pub timeout: Duration,
    /// Time all the uploads of one call may lose to failed tries and waits before giving up.
    pub retry_budget: Duration,
}

impl Default for OnlineOptions {
    fn default() -> Self {
        OnlineOptions {
            attempts: 8,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            connect_timeout: Duration::from_secs_f64(DEFAULT_CONNECT_TIMEOUT_S),
            timeout: Duration::from_secs_f64(DEFAULT_HTTP_TIMEOUT_S),
            retry_budget: Duration::from_secs_f64(DEFAULT_RETRY_BUDGET_S),
        }
    }
}

impl OnlineOptions {
    /// The defaults with `tracking.connect_timeout_s`, `tracking.http_timeout_s` (`WANDB_HTTP_TIMEOUT`) and
    /// `tracking.retry_budget_s` applied (they are checked by [`TrackingSettings::validate`]).
    pub fn from_settings(settings: &TrackingSettings) -> OnlineOptions {
        let seconds = |value: Option<f64>, default: Duration| {
            value
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .unwrap_or(default)
        };
        let defaults = OnlineOptions::default();
        OnlineOptions {
            connect_timeout: seconds(settings.connect_timeout_s, defaults.connect_timeout),
            timeout: seconds(settings.http_timeout_s, defaults.timeout),
            retry_budget: seconds(settings.retry_budget_s, defaults.retry_budget),
            ..defaults
        }
    }
}

/// Largest answer read from the W&B server: its JSON answers are a few kilobytes; a larger one is not W&B.
const MAX_ANSWER_BYTES: u64 = 4 << 20;

const UPSERT_BUCKET: &str = "mutation UpsertBucket($id: String, $name: String, $project: String, $entity: String, \
$groupName: String, $displayName: String, $config: JSONString, $host: String, $jobType: String, $tags: [String!], \
$summaryMetrics: JSONString) { upsertBucket(input: {id: $id, name: $name, groupName: $groupName, modelName: $project, \
entityName: $entity, displayName: $displayName, config: $config, host: $host, jobType: $jobType, tags: $tags, \
summaryMetrics: $summaryMetrics}) { bucket { id name displayName project { id name entity { id name } } } inserted } }";

const CREATE_RUN_FILES: &str = "mutation CreateRunFiles($entity: String!, $project: String!, $run: String!, \
$files: [String!]!) { createRunFiles(input: {entityName: $entity, projectName: $project, runName: $run, \
files: $files}) { runID uploadHeaders files { name uploadUrl } } }";

/// History lines per file_stream request.
const HISTORY_LINES_PER_REQUEST: usize = 100;

/// A W&B API client bound to one server and key.
pub struct Client {
    agent: ureq::Agent,
    base_url: String,
    /// The whole `Authorization` header value (`Basic base64(api:key)`).
    authorization: Secret,
    options: OnlineOptions,
    /// Time lost so far to failed tries and waits, spent from `options.retry_budget`.
    lost: Cell<Duration>,
}

/// What one request is, for error messages (never the key or the body sent).
struct Request<'a> {
    what: &'a str,
    method: &'a str,
    url: &'a str,
    content_type: &'a str,
    /// Send the API key (only to the W&B server itself, never to upload URLs).
    authenticated: bool,
    extra_headers: &'a [(String, String)],
    body: &'a [u8],
}

/// How one try ended, when it did not bring a 2xx answer.
enum TryFailure {
    /// Worth another try (429, 5xx, network error, timeout); the server's `Retry-After`, if it sent one.
    Transient {
        failure: String,
        retry_after: Option<Duration>,
    },
    /// Another try would fail the same way (4xx, a refused address).
    Fatal(String),
    Interrupted,
}

impl Client {
    pub fn new(base_url: &str, key: Secret, options: OnlineOptions) -> Client {
        // The agent's own limits end a try that the caller has already abandoned (on a stop or its deadline).
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(options.connect_timeout))
            .timeout_global(Some(options.timeout))
            .user_agent(concat!("segq/", env!("CARGO_PKG_VERSION")))
            .build();
        let token = base64::engine::general_purpose::STANDARD.encode(format!("api:{}", key.expose()));
        Client {
            agent: ureq::Agent::new_with_config(config),
            base_url: base_url.trim_end_matches('/').to_string(),
            authorization: Secret::new(format!("Basic {token}")),
            options,
            lost: Cell::new(Duration::ZERO),
        }
    }

    fn budget_left(&self) -> Duration {
        self.options.retry_budget.saturating_sub(self.lost.get())
    }

    fn lose(&self, time: Duration) {
        self.lost.set(self.lost.get() + time);
    }

    /// Sends a request, retrying on 429, 5xx and network failures while the retry budget lasts; returns the body
    /// of a 2xx answer. `Error::Interrupted` when a stop is asked for meanwhile.
    fn send(&self, request: &Request) -> Result<String> {
        let Request { what, method, url, .. } = *request;
        // Upload URLs may carry a signature in their query: messages show the address without it.
        let target = format!("{what}: {method} {}", url.split('?').next().unwrap_or(url));
        let budget = self.options.retry_budget.as_secs_f64();
        let mut tries = 0u32;
        loop {
            if stop_requested() {
                return Err(Error::Interrupted);
            }
            let left = self.budget_left();
            if left.is_zero() {
                return Err(Error::network(
                    target,
                    format!(
                        "not sent: the W&B retry budget ({budget:.0} s, tracking.retry_budget_s) was spent on earlier failures"
                    ),
                ));
            }
            let started = Instant::now();
            let (failure, retry_after) = match self.try_once(request, self.options.timeout.min(left)) {
                Ok(body) => return Ok(body),
                Err(TryFailure::Interrupted) => return Err(Error::Interrupted),
                Err(TryFailure::Fatal(failure)) => return Err(Error::network(target, failure)),
                Err(TryFailure::Transient { failure, retry_after }) => (failure, retry_after),
            };
            tries += 1;
            self.lose(started.elapsed());
            let left = self.budget_left();
            let gave_up = |why: String| {
                let plural = if tries == 1 { "try" } else { "tries" };
                Error::network(&target, format!("{failure} (gave up after {tries} {plural}: {why})"))
            };
            if tries >= self.options.attempts {
                return Err(gave_up("no tries left".into()));
            }
            let delay = match retry_after {
                Some(wait) if wait >= left => {
                    return Err(gave_up(format!(
                        "the server asks to wait {} s, more than the {:.0} s left of the retry budget, tracking.retry_budget_s",
                        wait.as_secs_f64(),
                        left.as_secs_f64()
                    )));
                }
                Some(wait) => wait,
                None => backoff_delay(&self.options, tries - 1),
            };
            if delay >= left {
                return Err(gave_up(format!(
                    "the retry budget of {budget:.0} s, tracking.retry_budget_s, is spent"
                )));
            }
            tracing::debug!(%target, %failure, ?delay, "W&B request failed, retrying");
            if !sleep_unless_stopped(delay) {
                return Err(Error::Interrupted);
            }
            self.lose(delay);
        }
    }

    /// One try, made on a worker thread so that waiting for it notices a stop request and ends at `limit` even
    /// when the server accepts the connection and never answers. An abandoned try ends at the agent's own limit.
    fn try_once(&self, request: &Request, limit: Duration) -> Result<String, TryFailure> {
        let mut headers = vec![("Content-Type".to_string(), request.content_type.to_string())];
        if request.authenticated {
            headers.push(("Authorization".into(), self.authorization.expose().to_string()));
        }
        headers.extend(request.extra_headers.iter().cloned());
        let agent = self.agent.clone();
        let put = request.method == "PUT";
        let url = request.url.to_string();
        let body = request.body.to_vec();
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("segq-wandb-http".into())
            .spawn(move || {
                let _ = sender.send(try_request(&agent, put, &url, &headers, &body));
            })
            .map_err(|e| TryFailure::Fatal(format!("cannot start a thread for the request: {e}")))?;
        match recv_unless_stopped(&receiver, Some(Instant::now() + limit)) {
            Received::Value(result) => result,
            Received::TimedOut => Err(TryFailure::Transient {
                failure: format!("no answer within {} s", limit.as_secs_f64()),
                retry_after: None,
            }),
            Received::Stopped => Err(TryFailure::Interrupted),
            Received::Disconnected => Err(TryFailure::Fatal("the request ended without an answer".into())),
        }
    }

    fn post_json(&self, what: &str, url: &str, body: &Value) -> Result<String> {
        let bytes = serde_json::to_vec(body).map_err(|e| Error::internal(format!("{what}: {e}")))?;
        self.send(&Request {
            what,
            method: "POST",
            url,
            content_type: "application/json",
            authenticated: true,
            extra_headers: &[],
            body: &bytes,
        })
    }

    /// Runs a GraphQL operation and returns its `data`, or the server's first error message.
    pub fn graphql(&self, operation: &str, query: &str, variables: Value) -> Result<Value> {
        let url = format!("{}/graphql", self.base_url);
        let body = json!({"query": query, "variables": variables, "operationName": operation});
        let text = self.post_json(operation, &url, &body)?;
        let mut answer: Value = serde_json::from_str(&text)
            .map_err(|e| Error::network(format!("{operation}: {url}"), format!("answer is not JSON: {e}")))?;
        if let Some(message) = answer.pointer("/errors/0/message").and_then(Value::as_str) {
            return Err(Error::network(
                format!("{operation}: {url}"),
                format!("server error: {message}"),
            ));
        }
        match answer.get_mut("data") {
            Some(data) if !data.is_null() => Ok(data.take()),
            _ => Err(Error::network(format!("{operation}: {url}"), "answer has no data")),
        }
    }

    /// Uploads a whole run and returns its page's URL.
    pub fn upload_run(&self, run: &PreparedRun) -> Result<String> {
        let (entity, project) = self.upsert_bucket(run)?;
        if !run.media.is_empty() {
            self.upload_media(&entity, &project, run)?;
        }
        let stream_url = format!("{}/files/{entity}/{project}/{}/file_stream", self.base_url, run.run_id);
        let lines: Vec<String> = run
            .history
            .iter()
            .map(|row| Value::Object(row.clone()).to_string())
            .collect();
        for (index, chunk) in lines.chunks(HISTORY_LINES_PER_REQUEST).enumerate() {
            let body = json!({"files": {"wandb-history.jsonl":
                {"offset": index * HISTORY_LINES_PER_REQUEST, "content": chunk}}});
            self.post_json("file_stream history", &stream_url, &body)?;
        }
        let summary_line = Value::Object(run.summary.clone()).to_string();
        let body = json!({"files": {"wandb-summary.json": {"offset": 0, "content": [summary_line]}}});
        self.post_json("file_stream summary", &stream_url, &body)?;
        let uploaded: Vec<&str> = run.media.iter().map(|m| m.path.as_str()).collect();
        let body = json!({"complete": true, "exitcode": run.exit_code, "uploaded": uploaded});
        self.post_json("file_stream finish", &stream_url, &body)?;
        Ok(format!(
            "{}/{entity}/{project}/runs/{}",
            app_url(&self.base_url),
            run.run_id
        ))
    }

    /// Creates or updates the run; returns the (entity, project) names the server settled on.
    fn upsert_bucket(&self, run: &PreparedRun) -> Result<(String, String)> {
        let config: Map<String, Value> = run
            .full_config()
            .into_iter()
            .map(|(key, value)| (key, json!({"value": value})))
            .collect();
        let mut variables = json!({
            "name": run.run_id,
            "project": run.project,
            "displayName": run.display_name,
            "config": Value::Object(config).to_string(),
            "tags": run.tags,
            "jobType": "eval",
        });
        if !run.entity.is_empty() {
            variables["entity"] = json!(run.entity);
        }
        if !run.group.is_empty() {
            variables["groupName"] = json!(run.group);
        }
        let data = self.graphql("UpsertBucket", UPSERT_BUCKET, variables)?;
        let project = data.pointer("/upsertBucket/bucket/project");
        let entity = project.and_then(|p| p.pointer("/entity/name")).and_then(Value::as_str);
        let project_name = project.and_then(|p| p.get("name")).and_then(Value::as_str);
        match (entity, project_name) {
            (Some(entity), Some(project)) => Ok((entity.to_string(), project.to_string())),
            _ => Err(Error::network(
                "UpsertBucket",
                "answer lacks upsertBucket.bucket.project.{name,entity.name}",
            )),
        }
    }

    /// Asks for upload URLs and PUTs each media file there (without the API key).
    fn upload_media(&self, entity: &str, project: &str, run: &PreparedRun) -> Result<()> {
        let names: Vec<&str> = run.media.iter().map(|m| m.path.as_str()).collect();
        let variables = json!({"entity": entity, "project": project, "run": run.run_id, "files": names});
        let data = self.graphql("CreateRunFiles", CREATE_RUN_FILES, variables)?;
        let headers: Vec<(String, String)> = data
            .pointer("/createRunFiles/uploadHeaders")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|h| h.split_once(':'))
            .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
            .collect();
        let files = data
            .pointer("/createRunFiles/files")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for media in &run.media {
            let upload_url = files
                .iter()
                .find(|f| f.get("name").and_then(Value::as_str) == Some(media.path.as_str()))
                .and_then(|f| f.get("uploadUrl"))
                .and_then(Value::as_str)
                .ok_or_else(|| Error::network("CreateRunFiles", format!("no upload URL for {}", media.path)))?;
            let content_type = if media.path.ends_with(".png") {
                "image/png"
            } else {
                "application/json"
            };
            self.send(&Request {
                what: &format!("upload {}", media.path),
                method: "PUT",
                url: upload_url,
                content_type,
                authenticated: false,
                extra_headers: &headers,
                body: &media.bytes,
            })?;
        }
        Ok(())
    }
}

/// Sends one request and reads the answer (at most [`MAX_ANSWER_BYTES`]).
fn try_request(
    agent: &ureq::Agent,
    put: bool,
    url: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<String, TryFailure> {
    let mut builder = if put { agent.put(url) } else { agent.post(url) };
    for (name, value) in headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let classify = |err: ureq::Error, doing: &str| {
        let failure = format!("{doing}{err}");
        if is_transient(&err) {
            TryFailure::Transient {
                failure,
                retry_after: None,
            }
        } else {
            TryFailure::Fatal(failure)
        }
    };
    let mut response = builder.send(body).map_err(|e| classify(e, ""))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .lossy_utf8(true)
        .read_to_string()
        .map_err(|e| classify(e, &format!("HTTP {status}, answer unreadable: ")))?;
    if (200..300).contains(&status) {
        return Ok(text);
    }
    let snippet: String = text.chars().take(200).collect::<String>().replace(['\n', '\r'], " ");
    let failure = format!("HTTP {status}: {}", snippet.trim());
    if status == 429 || status >= 500 {
        Err(TryFailure::Transient { failure, retry_after })
    } else {
        Err(TryFailure::Fatal(failure))
    }
}

/// `Retry-After` in seconds (W&B sends a number; an HTTP date is read as "no advice": back-off applies).
fn parse_retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

fn is_transient(err: &ureq::Error) -> bool {
    matches!(
        err,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
            | ureq::Error::BodyStalled
    )
}

/// The web app's address for an API address (api.wandb.ai -> wandb.ai; self-hosted servers serve both).
pub fn app_url(base_url: &str) -> String {
    base_url.replacen("://api.wandb.ai", "://wandb.ai", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_url_for_cloud_and_self_hosted() {
        assert_eq!(app_url("https://api.wandb.ai"), "https://wandb.ai");
        assert_eq!(app_url("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let options = OnlineOptions {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(350),
            ..Default::default()
        };
        assert_eq!(backoff_delay(&options, 0), Duration::from_millis(100));
        assert_eq!(backoff_delay(&options, 1), Duration::from_millis(200));
        assert_eq!(backoff_delay(&options, 2), Duration::from_millis(350));
        assert_eq!(backoff_delay(&options, 40), Duration::from_millis(350));
    }

    #[test]
    fn retry_after_in_seconds_or_no_advice() {
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("1e300"), None);
    }

    #[test]
    fn options_follow_the_settings() {
        let settings = TrackingSettings {
            http_timeout_s: Some(2.5),
            retry_budget_s: Some(4.0),
            ..Default::default()
        };
        let options = OnlineOptions::from_settings(&settings);
        assert_eq!(options.timeout, Duration::from_millis(2500));
        assert_eq!(options.retry_budget, Duration::from_secs(4));
        assert_eq!(options.connect_timeout, Duration::from_secs(10));
    }
}
