//! A scratch project directory and the real `pipe` binary, for end-to-end tests.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// The `out/` directory of stage `stage` of p.yaml in the store (as `pipe show` names it).
    pub fn stage_out(&self, stage: &str) -> PathBuf {
        let m: serde_json::Value =
            serde_json::from_str(&self.pipe(&["show", "p.yaml", stage, "--json"]).ok().stdout)
                .unwrap();
        self.path("cache/stages")
            .join(m["key"].as_str().unwrap())
            .join("out")
    }

    pub fn new() -> Self {
        Project {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    /// A project holding `pipeline` as p.yaml and copies of the repository's example
    /// instructions and tokenizer (as `instructions.json` and `tokenizer/`).
    pub fn with_examples(pipeline: &str) -> Self {
        let p = Project::new();
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        p.write("p.yaml", pipeline);
        for f in [
            "instructions.json",
            "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json",
        ] {
            p.write(f, &fs::read_to_string(examples.join(f)).unwrap());
        }
        p
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub fn write(&self, rel: &str, text: &str) -> &Self {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
        self
    }
    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap_or_default()
    }
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pipe"));
        c.args(args)
            .current_dir(self.dir.path())
            .env_remove("PIPE_CACHE")
            .env_remove("PIPE_FAULT")
            .env_remove("PIPE_LOG")
            .env_remove("PIPE_REMOTE")
            .env_remove("PIPE_REMOTE_READ_ONLY")
            .stdin(Stdio::null());
        c
    }
    pub fn pipe(&self, args: &[&str]) -> Run {
        Run::from(self.cmd(args).output().expect("run pipe"))
    }
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pipe")
    }
    /// How many times the commands appended to the counter file `runs.log` ran stage `id`.
    pub fn runs_of(&self, id: &str) -> usize {
        self.read("runs.log").lines().filter(|l| *l == id).count()
    }
    /// Every file under the store's entries, with its contents, for comparing two stores.
    pub fn outputs(&self, cache: &str) -> Vec<(String, String)> {
        let mut v = Vec::new();
        let stages = self.path(cache).join("stages");
        for e in fs::read_dir(&stages).unwrap() {
            let e = e.unwrap().path();
            if !e.join("manifest.json").exists() {
                continue;
            }
            collect(&e.join("out"), &e, &mut v);
        }
        v.sort();
        v
    }
    pub fn wait_for(&self, rel: &str, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.path(rel).exists() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

fn collect(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect(&p, root, out);
        } else {
            let rel = p
                .strip_prefix(root.parent().unwrap())
                .unwrap()
                .display()
                .to_string();
            out.push((rel, fs::read_to_string(&p).unwrap_or_default()));
        }
    }
}

/// Every file under `dir`, by its path relative to `dir` (`/`-separated), with its bytes.
pub fn files_under(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().display().to_string();
                files.insert(rel, fs::read(&path).unwrap_or_default());
            }
        }
    }
    files
}

/// The first file under `dir` that holds `secret`, if any.
pub fn file_holding(dir: &Path, secret: &str) -> Option<String> {
    files_under(dir)
        .into_iter()
        .find(|(_, bytes)| bytes.windows(secret.len()).any(|w| w == secret.as_bytes()))
        .map(|(path, _)| path)
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "pipe failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

pub fn sigkill(child: &mut Child) {
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}

pub fn signal(child: &Child, sig: i32) {
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Ctrl-C to a running `pipe run`: it must stop its stages and exit 130.
pub fn ctrl_c(child: Child) {
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// upper ← data.txt; exclaim ← upper; side is independent. Each command appends its stage id
/// to runs.log, so the tests can count how often each really ran.
pub const THREE_COMMANDS: &str = r#"name: e2e
params:
  suffix: "!"
stages:
  upper:
    kind: command
    cmd: echo upper >> runs.log; tr a-z A-Z < ${data.txt} > ${out}/upper.txt
    deps: [data.txt]
    outs: [upper.txt]
  exclaim:
    kind: command
    cmd: echo exclaim >> runs.log; sed 's/$/${params.suffix}/' ${upper.upper.txt} > ${out}/final.txt
    deps: [upper.upper.txt]
    outs: [final.txt]
  side:
    kind: command
    cmd: echo side >> runs.log; echo side > ${out}/side.txt
    outs: [side.txt]
"#;

/// A pipeline `name` that reads the example instructions and tokenizer a
/// [`Project::with_examples`] holds, formats them with the Alpaca templates and tokenizes them
/// at `max_len` into a stage `tokens`; then `stages` (YAML of more stages, indented by two).
pub fn example_pipeline(name: &str, max_len: usize, stages: &str) -> String {
    format!(
        "name: {name}
stages:
  data:
    kind: download
    source: instructions.json
  tokenizer:
    kind: download
    source: tokenizer
  prompts:
    kind: format
    input: data
  tokens:
    kind: tokenize
    input: prompts
    tokenizer: tokenizer
    max_len: {max_len}
{stages}"
    )
}

/// A `train` stage (YAML, indented for [`example_pipeline`]'s `stages`) that fine-tunes a tiny
/// seeded model (hidden 16, one layer, the example tokenizer's 2001 tokens) on `tokens` for
/// `max_steps` steps; `extra` is more of its fields, one per line.
pub fn tiny_train_stage(max_steps: usize, extra: &[&str]) -> String {
    let mut yaml = format!(
        "  train:
    kind: train
    data: tokens
    model:
      init: {{vocab_size: 2001, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64}}
      seed: 1
    lr: 3.0e-3
    max_steps: {max_steps}
    batch_size: 4
"
    );
    for line in extra {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml
}

/// A `train` stage (YAML, indented for [`example_pipeline`]'s `stages`) of a small seeded
/// model (hidden 32, two layers) on `tokens` for `epochs` epochs of 3 steps, with a checkpoint
/// every 3 steps: long enough to interrupt and resume.
pub fn checkpointed_train_stage(epochs: usize) -> String {
    format!(
        "  train:
    kind: train
    data: tokens
    model:
      init: {{vocab_size: 2001, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}}
      seed: 1
    lr: 3.0e-3
    warmup_ratio: 0.1
    epochs: {epochs}
    batch_size: 4
    micro_batch_size: 2
    save_steps: 3
"
    )
}

/// Runs a Python `script` with `args` in the environment of tests/setup.sh (the real tools some
/// tests read pipe's files with) and returns what it printed; fails the test if it fails.
pub fn tool_python(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `bash tests/setup.sh` first (it installs the tools tests read pipe's files with)",
        python.display()
    );
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run the test tools' python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The lines of the stored train stage's metrics.jsonl.
pub fn train_metrics(p: &Project) -> Vec<serde_json::Value> {
    let file = std::fs::read_dir(p.path("cache/stages"))
        .unwrap()
        .map(|e| e.unwrap().path().join("out/metrics.jsonl"))
        .find(|m| m.exists())
        .unwrap();
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The logits of a fixed 16-token input (ids below 2000): what the export tests compare models by.
pub fn sample_logits(model: &pipe_model::CausalLm<pipe_model::CpuBackend>) -> Vec<f32> {
    use burn::tensor::{Int, Tensor, TensorData};
    let ids = Tensor::<pipe_model::CpuBackend, 2, Int>::from_data(
        TensorData::new(
            (1..17).map(|i| i * 37 % 2000).collect::<Vec<i64>>(),
            [1, 16],
        ),
        &Default::default(),
    );
    model.forward(ids, None).into_data().to_vec().unwrap()
}
