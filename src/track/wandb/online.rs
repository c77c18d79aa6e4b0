//! Sends a [`PreparedRun`] to a W&B server the way W&B's own client does: GraphQL `UpsertBucket` creates the
//! run, `CreateRunFiles` + PUT upload the media, `file_stream` carries history and summary lines and finally
//! `complete`/`exitcode`. Requests are retried with exponential back-off on 429, 5xx and network errors.

use std::time::Duration;

use base64::Engine;
use serde_json::{Map, Value, json};

use super::{PreparedRun, backoff_delay};
use crate::track::Secret;
use crate::{Error, Result};

/// HTTP behaviour of the online client.
#[derive(Clone, Debug)]
pub struct OnlineOptions {
    /// Tries per request (first try included).
    pub attempts: u32,
    /// Wait before the first retry; doubled each time.
    pub base_delay: Duration,
    /// Longest wait between tries (also caps a server's Retry-After).
    pub max_delay: Duration,
    /// Limit for one whole request.
    pub timeout: Duration,
}

impl Default for OnlineOptions {
    fn default() -> Self {
        OnlineOptions {
            attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            timeout: Duration::from_secs(60),
        }
    }
}

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

impl Client {
    pub fn new(base_url: &str, key: Secret, options: OnlineOptions) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(options.timeout))
            .user_agent(concat!("segq/", env!("CARGO_PKG_VERSION")))
            .build();
        let token = base64::engine::general_purpose::STANDARD.encode(format!("api:{}", key.expose()));
        Client {
            agent: ureq::Agent::new_with_config(config),
            base_url: base_url.trim_end_matches('/').to_string(),
            authorization: Secret::new(format!("Basic {token}")),
            options,
        }
    }

    /// Sends a request, retrying on 429, 5xx and network failures; returns the body of a 2xx answer.
    fn send(&self, request: &Request) -> Result<String> {
        let Request { what, method, url, .. } = *request;
        let target = format!("{what}: {method} {url}");
        let mut attempt = 0;
        loop {
            let mut builder = match method {
                "PUT" => self.agent.put(url),
                _ => self.agent.post(url),
            };
            builder = builder.header("Content-Type", request.content_type);
            if request.authenticated {
                builder = builder.header("Authorization", self.authorization.expose());
            }
            for (name, value) in request.extra_headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            let (failure, retry_after) = match builder.send(request.body) {
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let body = response.body_mut().read_to_string().unwrap_or_default();
                    if (200..300).contains(&status) {
                        return Ok(body);
                    }
                    let snippet: String = body.chars().take(200).collect::<String>().replace(['\n', '\r'], " ");
                    let failure = format!("HTTP {status}: {snippet}");
                    if status != 429 && status < 500 {
                        return Err(Error::network(target, failure));
                    }
                    (failure, retry_after)
                }
                Err(err) => {
                    let failure = err.to_string();
                    if !is_transient(&err) {
                        return Err(Error::network(target, failure));
                    }
                    (failure, None)
                }
            };
            attempt += 1;
            if attempt >= self.options.attempts {
                return Err(Error::network(
                    target,
                    format!("{failure} (gave up after {attempt} tries)"),
                ));
            }
            let delay = backoff_delay(&self.options, attempt - 1, retry_after);
            tracing::debug!(%target, %failure, ?delay, "W&B request failed, retrying");
            std::thread::sleep(delay);
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
        assert_eq!(backoff_delay(&options, 0, None), Duration::from_millis(100));
        assert_eq!(backoff_delay(&options, 1, None), Duration::from_millis(200));
        assert_eq!(backoff_delay(&options, 2, None), Duration::from_millis(350));
        assert_eq!(
            backoff_delay(&options, 0, Some(Duration::from_secs(9))),
            Duration::from_millis(350)
        );
    }
}
