//! A train stage with `tracking: {mlflow: …}` logs to a real MLflow server (started here on
//! 127.0.0.1 with a sqlite store, installed by tests/setup.sh): a run named after the stage,
//! its key fields as params, every step's values as metrics, the status at the end; read
//! back with MLflow's own client. An unreachable server is a warning, not a failed stage, and
//! the tracking token is never written anywhere.

mod common;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Project;

fn pipeline(server: &str) -> String {
    let train = common::tiny_train_stage(
        5,
        &[r#"tracking: {mlflow: "${params.server}", experiment: pipe-tests}"#],
    );
    common::example_pipeline("tracked", 64, &train).replacen(
        "stages:",
        &format!("params:\n  server: {server}\nstages:"),
        1,
    )
}

/// `mlflow server` on a free port of 127.0.0.1, stopped when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let port = pipe_testkit::free_loopback_port();
        let mlflow = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/bin/mlflow");
        assert!(
            mlflow.exists(),
            "{} is missing: run `bash tests/setup.sh` first",
            mlflow.display()
        );
        let child = Command::new(mlflow)
            .args(["server", "--host", "127.0.0.1", "--workers", "1", "--port"])
            .arg(port.to_string())
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--default-artifact-root")
            .arg(dir.join("artifacts"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: `mlflow server` runs the app as a child (uvicorn), which
            // must stop with it.
            .process_group(0)
            .spawn()
            .unwrap();
        let server = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        // The port opens before the app answers (its worker still importing on a loaded
        // machine): wait for /health, or pipe's first request could time out.
        let t0 = Instant::now();
        while !healthy(port) {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "mlflow server did not start"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        server
    }
}

/// The server on `port` answers `GET /health` with 200.
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut answer = String::new();
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.split_whitespace().nth(1) == Some("200")
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group this test started; no memory is involved.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// What MLflow's client reads of the experiment's runs: status, tags, params, and the history
/// of train/loss.
const READ: &str = r#"
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=sys.argv[1])
exp = client.get_experiment_by_name("pipe-tests")
runs = client.search_runs([exp.experiment_id])
print(json.dumps([{
    "status": r.info.status,
    "name": r.info.run_name,
    "tags": {k: v for k, v in r.data.tags.items() if k.startswith("pipe.")},
    "params": r.data.params,
    "loss": [[m.step, m.value] for m in client.get_metric_history(r.info.run_id, "train/loss")],
    "last": r.data.metrics,
} for r in runs]))
"#;

#[test]
fn a_tracked_train_stage_logs_its_run_to_mlflow() {
    let p = Project::with_examples("");
    let server = Server::start(p.dir.path());
    p.write("p.yaml", &pipeline(&server.url));
    let r = p
        .cmd(&["run", "p.yaml"])
        .env("MLFLOW_TRACKING_TOKEN", "secret-token-4711")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    // Tracking failures are warnings: none here.
    assert!(
        !stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains("MLflow")),
        "{stderr}"
    );
    let runs: serde_json::Value =
        serde_json::from_str(&common::tool_python(READ, &[server.url.as_ref()])).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    assert_eq!(run["status"], "FINISHED");
    assert_eq!(run["tags"]["pipe.stage"], "train");
    assert!(run["name"].as_str().unwrap().starts_with("train-"));
    assert_eq!(run["params"]["lr"], "0.003");
    assert_eq!(run["params"]["max_steps"], "5");
    // Every step's loss, as metrics.jsonl has it.
    let metrics = common::train_metrics(&p);
    let logged: Vec<(u64, f32)> = run["loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
        .collect();
    let expected: Vec<(u64, f32)> = metrics
        .iter()
        .map(|m| {
            (
                m["step"].as_u64().unwrap(),
                m["loss"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_eq!(logged, expected);
    assert!(run["last"]["summary/tokens_per_second"].as_f64().unwrap() > 0.0);
    // The token went to the server only: not into the store, its logs or the output.
    assert_eq!(
        common::file_holding(&p.path("cache"), "secret-token-4711"),
        None
    );
    assert!(!stderr.contains("secret-token-4711"));
    // A second run is a cache hit: nothing more is logged.
    p.pipe(&["run", "p.yaml"]).ok();
    let again: serde_json::Value =
        serde_json::from_str(&common::tool_python(READ, &[server.url.as_ref()])).unwrap();
    assert_eq!(again.as_array().unwrap().len(), 1);
}

#[test]
fn an_unreachable_server_is_a_warning_not_a_failure() {
    // A port that nothing listens on.
    let port = pipe_testkit::free_loopback_port();
    let p = Project::with_examples(&pipeline(&format!("http://127.0.0.1:{port}")));
    let r = p.pipe(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("MLflow:") && r.stderr.contains("training goes on untracked"),
        "{}",
        r.stderr
    );
}
