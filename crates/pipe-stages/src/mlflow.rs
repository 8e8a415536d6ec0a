//! MLflow tracking for a train stage (`tracking: {mlflow: URL, experiment: NAME}`), through
//! MLflow's REST API (`/api/2.0/mlflow/…`): a run per stage key, its key fields as params,
//! every step's values as metrics (in batches), the summary at the end, and the run's status.
//!
//! Tracking is a view of the run, never its result: it is not in the key, and an unreachable
//! server, a refused request or a bad answer is a warning, after which the stage goes on
//! untracked. Credentials come from `MLFLOW_TRACKING_TOKEN` (a bearer token) or
//! `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`, and are never logged. A resumed attempt
//! continues the run its interrupted attempt started (the run id is kept in the work directory).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Where the metrics go: an MLflow server and an experiment in it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrackingFields {
    /// The tracking server, `http(s)://HOST[:PORT]`.
    pub mlflow: String,
    /// The experiment (created if missing).
    #[serde(default = "default_experiment")]
    pub experiment: String,
}

fn default_experiment() -> String {
    "pipe".into()
}

/// MLflow's limit on metrics per `log-batch` request.
const BATCH: usize = 1000;
/// Values are sent at least this often while training runs.
const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// An MLflow run being logged to.
pub(crate) struct MlflowRun {
    agent: ureq::Agent,
    base: String,
    auth: Option<String>,
    run_id: String,
    pending: Vec<Value>,
    last_flush: Instant,
}

#[derive(Deserialize, Serialize)]
struct Saved {
    server: String,
    run_id: String,
}

impl MlflowRun {
    /// Starts (or, after an interruption, continues) the run of stage `stage` with key `key`,
    /// and logs `params` on a new run.
    pub(crate) fn start(
        fields: &TrackingFields,
        stage: &str,
        key: &str,
        params: &[(String, String)],
        work: &Path,
    ) -> Result<Self, String> {
        let base = fields.mlflow.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!("`{base}` is not an http(s) URL"));
        }
        let mut run = MlflowRun {
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build(),
            base,
            auth: credentials(),
            run_id: String::new(),
            pending: Vec::new(),
            last_flush: Instant::now(),
        };
        let saved_path = work.join("mlflow-run.json");
        let saved: Option<Saved> = std::fs::read(&saved_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|s: &Saved| s.server == run.base);
        if let Some(saved) = saved {
            run.run_id = saved.run_id;
            run.post(
                "runs/update",
                json!({"run_id": run.run_id, "status": "RUNNING"}),
            )?;
            return Ok(run);
        }
        let experiment = run.experiment_id(&fields.experiment)?;
        let created = run.post(
            "runs/create",
            json!({
                "experiment_id": experiment,
                "run_name": format!("{stage}-{}", &key[..12.min(key.len())]),
                "start_time": now_ms(),
                "tags": [
                    {"key": "pipe.stage", "value": stage},
                    {"key": "pipe.key", "value": key},
                ],
            }),
        )?;
        run.run_id = created["run"]["info"]["run_id"]
            .as_str()
            .ok_or("runs/create answered without a run id")?
            .to_string();
        let saved = Saved {
            server: run.base.clone(),
            run_id: run.run_id.clone(),
        };
        let _ = std::fs::write(&saved_path, serde_json::to_vec(&saved).expect("json"));
        for chunk in params.chunks(100) {
            let params: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| json!({"key": k, "value": v.chars().take(6000).collect::<String>()}))
                .collect();
            run.post(
                "runs/log-batch",
                json!({"run_id": run.run_id, "params": params}),
            )?;
        }
        Ok(run)
    }

    /// Queues the values of `step`; sends them when enough have gathered or some time passed.
    pub(crate) fn log(&mut self, step: u64, values: &[(&str, f64)]) -> Result<(), String> {
        let timestamp = now_ms();
        for (name, value) in values.iter().filter(|(_, v)| v.is_finite()) {
            self.pending.push(json!({
                "key": name, "value": value, "timestamp": timestamp, "step": step
            }));
        }
        if self.pending.len() >= BATCH || self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what is queued.
    pub(crate) fn flush(&mut self) -> Result<(), String> {
        self.last_flush = Instant::now();
        while !self.pending.is_empty() {
            let n = self.pending.len().min(BATCH);
            let metrics: Vec<Value> = self.pending.drain(..n).collect();
            self.post(
                "runs/log-batch",
                json!({"run_id": self.run_id, "metrics": metrics}),
            )?;
        }
        Ok(())
    }

    /// Sends what is queued and marks the run `FINISHED`, `FAILED` or `KILLED`.
    pub(crate) fn end(&mut self, status: &str) -> Result<(), String> {
        self.flush()?;
        self.post(
            "runs/update",
            json!({"run_id": self.run_id, "status": status, "end_time": now_ms()}),
        )
        .map(|_| ())
    }

    pub(crate) fn run_id(&self) -> &str {
        &self.run_id
    }

    fn experiment_id(&self, name: &str) -> Result<String, String> {
        let url = format!(
            "{}/api/2.0/mlflow/experiments/get-by-name?experiment_name={}",
            self.base,
            url_encode(name)
        );
        match self.request("GET", &url).call() {
            Ok(r) => {
                let v: Value = read_json(r)?;
                v["experiment"]["experiment_id"]
                    .as_str()
                    .map(String::from)
                    .ok_or_else(|| "experiments/get-by-name answered without an id".into())
            }
            Err(ureq::Error::Status(404, _)) => {
                let v = self.post("experiments/create", json!({"name": name}))?;
                v["experiment_id"]
                    .as_str()
                    .map(String::from)
                    .ok_or_else(|| "experiments/create answered without an id".into())
            }
            Err(e) => Err(describe(e)),
        }
    }

    fn post(&self, endpoint: &str, body: Value) -> Result<Value, String> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        let answer = self
            .request("POST", &url)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .map_err(describe)?;
        read_json(answer).map_err(|e| format!("{endpoint}: {e}"))
    }

    fn request(&self, method: &str, url: &str) -> ureq::Request {
        let r = self.agent.request(method, url);
        match &self.auth {
            Some(a) => r.set("Authorization", a),
            None => r,
        }
    }
}

fn read_json(r: ureq::Response) -> Result<Value, String> {
    let text = r.into_string().map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("an answer that is not JSON: {e}"))
}

/// The Authorization header the MLflow client's environment variables ask for.
fn credentials() -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let Some(token) = var("MLFLOW_TRACKING_TOKEN") {
        return Some(format!("Bearer {token}"));
    }
    let (user, password) = (
        var("MLFLOW_TRACKING_USERNAME")?,
        var("MLFLOW_TRACKING_PASSWORD")?,
    );
    let pair = format!("{user}:{password}");
    Some(format!("Basic {}", BASE64_STANDARD.encode(pair)))
}

/// What went wrong with a request, without its headers (which may hold credentials).
fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, r) => {
            let url = r.get_url().to_string();
            let body = r.into_string().unwrap_or_default();
            format!(
                "{url} answered {code}: {}",
                body.chars().take(300).collect::<String>()
            )
        }
        ureq::Error::Transport(t) => t.to_string(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The key fields as MLflow params: nested names joined with `.`, values as JSON text.
pub(crate) fn params_of(fields: &Value) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(o) => {
                for (k, v) in o {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&name, v, out);
                }
            }
            Value::String(s) => out.push((prefix.to_string(), s.clone())),
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk("", fields, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experiment_names_are_encoded_for_the_query() {
        assert_eq!(url_encode("my exp/1"), "my%20exp%2F1");
    }

    #[test]
    fn key_fields_become_flat_params() {
        let p = params_of(&json!({"lr": 0.0002, "lora": {"r": 16}, "schedule": "cosine"}));
        assert_eq!(
            p,
            [
                ("lora.r".to_string(), "16".to_string()),
                ("lr".to_string(), "0.0002".to_string()),
                ("schedule".to_string(), "cosine".to_string())
            ]
        );
    }
}
