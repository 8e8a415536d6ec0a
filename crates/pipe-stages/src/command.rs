//! `kind: command` — a user's shell command as a stage, DVC-style.
//!
//! ```yaml
//! featurize:
//!   kind: command
//!   cmd: python featurize.py ${prepare.data} ${out}/features.csv
//!   deps: [featurize.py, prepare.data]   # files/dirs, or `stage` / `stage.output` references
//!   outs: [features.csv]                 # what it must write under ${out}
//! ```
//!
//! The command runs with `sh -c` in the pipeline file's directory. In `cmd`, `${out}` is the
//! directory its outputs go to, `${work}` a directory that survives an interrupted attempt
//! (with `resumable: true`), and `${DEP}` the path of any entry of `deps`. The same are in the
//! environment as `PIPE_OUT`, `PIPE_WORK`. Its stdout and stderr go to the stage's log.
//! The key covers the command text (before paths are filled in), `outs`, `env`, `metrics` and
//! the digests of the deps.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pipe_core::diag::{FieldError, Target};
use pipe_core::{
    Input, InputSource, Interrupted, KeyFields, ParseContext, Stage, StageContext, StageKind,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub struct CommandKind;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Fields {
    /// The shell command.
    cmd: String,
    /// Files, directories and stage outputs it reads.
    #[serde(default)]
    deps: Vec<String>,
    /// Paths under `${out}` it must produce.
    #[serde(default)]
    outs: Vec<String>,
    /// Extra environment variables (part of the key: put no secrets here).
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Keep `${work}` across interrupted attempts, so the command can continue its work.
    #[serde(default)]
    resumable: bool,
    /// An output (JSON) whose contents become the stage's metrics summary.
    #[serde(default)]
    metrics: Option<String>,
}

/// What decides a command's result (see `pipe_core::key`): the command line, what it must
/// produce, its environment, and which output is its metrics. Its deps are inputs, by content,
/// named as `deps` writes them: the command line refers to them by those names, so where a dep
/// is, is part of the command.
#[derive(Serialize)]
struct CommandKey<'a> {
    cmd: &'a str,
    outs: &'a [String],
    env: &'a BTreeMap<String, String>,
    metrics: Option<&'a str>,
}

impl Fields {
    fn key(&self) -> CommandKey<'_> {
        CommandKey {
            cmd: &self.cmd,
            outs: &self.outs,
            env: &self.env,
            metrics: self.metrics.as_deref(),
        }
    }
}

struct CommandStage {
    fields: Fields,
    inputs: Vec<Input>,
}

/// How long a stopped command gets to exit after SIGTERM before SIGKILL.
const GRACE: Duration = Duration::from_secs(10);

impl StageKind for CommandKind {
    fn name(&self) -> &'static str {
        "command"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "run a shell command with declared deps and outs"
    }
    fn fields_schema(&self) -> serde_json::Value {
        crate::schema_of::<Fields>()
    }
    fn run_settings(&self) -> &'static [&'static str] {
        &["resumable"]
    }
    fn parse(
        &self,
        cx: &ParseContext<'_>,
        fields: serde_yaml::Value,
    ) -> Result<Box<dyn Stage>, FieldError> {
        let fields: Fields = cx.fields(fields)?;
        if fields.cmd.trim().is_empty() {
            return Err(cx.error("cmd", "`cmd` is empty"));
        }
        let mut inputs = Vec::new();
        for (i, dep) in fields.deps.iter().enumerate() {
            let field = cx.path.key("deps").index(i);
            if inputs.iter().any(|d: &Input| d.name == *dep) {
                return Err(FieldError::new(
                    field,
                    Target::Value,
                    format!("`{dep}` is listed twice in deps"),
                ));
            }
            let source = match cx.as_stage_ref(dep) {
                Some(InputSource::Stage { stage, .. }) if stage == cx.stage_id => {
                    return Err(FieldError::new(field, Target::Value, format!("stage `{stage}` cannot read its own outputs"))
                        .with_help(format!("a path that starts with `{stage}.` is read as a reference to stage `{stage}`; write `./{dep}` for a file")));
                }
                Some(r) => r,
                None => InputSource::Path(cx.resolve_path(dep)),
            };
            inputs.push(Input {
                name: dep.clone(),
                source,
                field,
            });
        }
        for (i, out) in fields.outs.iter().enumerate() {
            if let Err(e) = pipe_core::relpath::relative_path(out) {
                return Err(FieldError::new(
                    cx.path.key("outs").index(i),
                    Target::Value,
                    format!("output {e}"),
                )
                .with_help("an output is a relative path inside ${out}, such as `features.csv` or `model/config.json`"));
            }
        }
        if let Some(m) = &fields.metrics {
            if !fields.outs.iter().any(|o| o == m) {
                return Err(cx.error(
                    "metrics",
                    format!("`metrics: {m}` must also be listed in `outs`"),
                ));
            }
        }
        for name in placeholders(&fields.cmd) {
            if name != "out" && name != "work" && !fields.deps.contains(&name) {
                return Err(cx
                    .error("cmd", format!("`${{{name}}}` in `cmd` is neither `${{out}}`, `${{work}}` nor an entry of `deps`"))
                    .with_help(format!("add `{name}` to `deps` so that pipe knows the command reads it")));
            }
        }
        Ok(Box::new(CommandStage { fields, inputs }))
    }
}

/// The names in `${name}` placeholders of a command.
fn placeholders(cmd: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = cmd;
    while let Some(pos) = rest.find("${") {
        let tail = &rest[pos + 2..];
        match tail.find('}') {
            Some(end) => {
                out.push(tail[..end].to_string());
                rest = &tail[end + 1..];
            }
            None => break,
        }
    }
    out
}

impl Stage for CommandStage {
    fn inputs(&self) -> Vec<Input> {
        self.inputs.clone()
    }
    fn key_fields(&self) -> KeyFields {
        KeyFields::of(&self.fields.key())
    }
    fn outputs(&self) -> Option<Vec<String>> {
        (!self.fields.outs.is_empty()).then(|| self.fields.outs.clone())
    }
    fn resumable(&self) -> bool {
        self.fields.resumable
    }
    fn run(&self, cx: &mut StageContext) -> anyhow::Result<()> {
        let mut cmd = self.fields.cmd.clone();
        cmd = cmd.replace("${out}", &cx.out_dir.to_string_lossy());
        cmd = cmd.replace("${work}", &cx.work_dir.to_string_lossy());
        for dep in &self.fields.deps {
            let path = cx.input(dep)?;
            cmd = cmd.replace(&format!("${{{dep}}}"), &path.to_string_lossy());
        }
        cx.log(&format!("$ {cmd}"));
        let log = cx.log_file()?;
        let mut process = Process::new("sh");
        process
            .arg("-c")
            .arg(&cmd)
            .current_dir(&cx.base_dir)
            .env("PIPE_OUT", &cx.out_dir)
            .env("PIPE_WORK", &cx.work_dir)
            .env("PIPE_STAGE", &cx.stage_id)
            .envs(&self.fields.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group, so that stopping it reaches everything it started.
            .process_group(0);
        if !cx.gpus.is_empty() {
            // The GPUs the run loop granted its `resources: {gpus: …}`, and no others.
            process.env(
                "CUDA_VISIBLE_DEVICES",
                pipe_core::resources::Machine::visible_devices(&cx.gpus),
            );
        }
        // SAFETY: prctl is async-signal-safe; it makes the kernel kill the command if pipe
        // itself is killed (kill -9), so no orphan keeps writing into the store.
        unsafe {
            process.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = process
            .spawn()
            .with_context(|| format!("cannot start `sh -c {cmd}`"))?;
        let pgid = child.id() as i32;
        loop {
            if let Some(status) = child.try_wait()? {
                if status.success() {
                    break;
                }
                let tail = log_tail(cx, 12);
                match status.code() {
                    Some(code) => bail!("command exited with status {code}{tail}"),
                    None => bail!("command was killed by a signal{tail}"),
                }
            }
            if cx.is_cancelled() {
                // SAFETY: plain syscalls on the child's process group.
                unsafe { libc::killpg(pgid, libc::SIGTERM) };
                let t = Instant::now();
                while child.try_wait()?.is_none() {
                    if t.elapsed() > GRACE {
                        unsafe { libc::killpg(pgid, libc::SIGKILL) };
                        child.wait()?;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                return Err(Interrupted.into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(m) = &self.fields.metrics {
            let path = cx.out_dir.join(m);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read metrics file `{m}`"))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("metrics file `{m}` is not valid JSON"))?;
            cx.set_metrics(value);
        }
        Ok(())
    }
}

/// The last lines of the stage's log, to show with a failure.
fn log_tail(cx: &StageContext, lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(&cx.log_path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut text = String::new();
    let _ = f.read_to_string(&mut text);
    let tail: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("# pipe:") && !l.starts_with("$ "))
        .collect();
    let tail = &tail[tail.len().saturating_sub(lines)..];
    if tail.is_empty() {
        String::new()
    } else {
        format!("; its last output:\n    {}", tail.join("\n    "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found() {
        assert_eq!(
            placeholders("a ${out}/x ${prep.data} $HOME ${work"),
            vec!["out", "prep.data"]
        );
    }
}
