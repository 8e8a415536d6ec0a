//! The Slurm executor: a stage with `executor: slurm` runs as a Slurm batch job instead of on
//! a thread of the submitting `pipe run`.
//!
//! The job runs `pipe run-stage` on the compute node: that process loads the same pipeline,
//! checks that the stage's key is still the one submitted, runs the stage against the same
//! store (which must be on a file system the nodes share) and commits its entry, exactly as a
//! local attempt does. The submitting run only tracks the job: it polls `squeue` (then `sacct`
//! once the controller has forgotten the job), relays the stage's progress from a file the
//! compute node writes, and reads the entry once the job completed. The job's output *is* the
//! stage's usual log (`--output`, appended), so `pipe show` and failures point at one file.
//!
//! The job id is recorded in the stage's work dir before anything waits on it: a `pipe run`
//! that was killed leaves it there, and the next run re-attaches to a job that is still queued
//! or running instead of submitting a second one. Ctrl-C cancels the jobs (`scancel`, which
//! signals the compute node's pipe: it saves its state and stops). A job preempted or lost
//! with its node is submitted again, and resumes from the stage's saved state; every other
//! way a job ends is told as what it means (time limit, memory, cancelled by someone).

use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::diag::{FieldError, FieldPath, Target};
use crate::kind::Progress;
use crate::resources::{Gpus, Resources};

/// Where a stage runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Executor {
    /// On a thread (or child process) of `pipe run`.
    #[default]
    Local,
    /// As a Slurm batch job.
    Slurm(SlurmOptions),
}

impl Executor {
    /// The pipeline's `executor:` and `slurm:`, read at `path` (the pipeline's root or a
    /// stage); `inherited` is what applies where nothing is said (the pipeline's, for a stage).
    pub fn parse(
        executor: Option<&Value>,
        slurm: Option<&Value>,
        path: &FieldPath,
        inherited: &Executor,
    ) -> Result<Executor, FieldError> {
        let slurm_here = match slurm {
            Some(v) => Some(SlurmOptions::parse(v, &path.key("slurm"))?),
            None => None,
        };
        let is_slurm = match executor {
            None => matches!(inherited, Executor::Slurm(_)),
            Some(Value::String(s)) if s == "local" => false,
            Some(Value::String(s)) if s == "slurm" => true,
            Some(_) => {
                return Err(FieldError::new(
                    path.key("executor"),
                    Target::Value,
                    "`executor` must be `local` or `slurm`",
                ))
            }
        };
        if !is_slurm {
            if slurm_here.is_some() {
                return Err(FieldError::new(
                    path.key("slurm"),
                    Target::Key,
                    "`slurm` settings, but this runs with the local executor",
                )
                .with_help("add `executor: slurm` beside them, or remove them"));
            }
            return Ok(Executor::Local);
        }
        let base = match inherited {
            Executor::Slurm(o) => o.clone(),
            Executor::Local => SlurmOptions::default(),
        };
        Ok(Executor::Slurm(match slurm_here {
            Some(own) => base.overridden_by(own),
            None => base,
        }))
    }
}

/// A stage's `slurm:` (over the pipeline's): what its batch job asks Slurm for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub account: Option<String>,
    /// A Slurm time limit: `MINUTES`, `HH:MM:SS`, `D-HH:MM`, …
    pub time: Option<String>,
    pub gpus_per_node: Option<usize>,
    pub nodes: Option<usize>,
    /// Passed to `sbatch` as they are, after pipe's own options (so they win).
    pub extra_args: Vec<String>,
}

impl SlurmOptions {
    fn parse(value: &Value, path: &FieldPath) -> Result<SlurmOptions, FieldError> {
        let Value::Mapping(map) = value else {
            return Err(FieldError::new(
                path.clone(),
                Target::Value,
                "`slurm` must be a mapping: {partition, account, time, gpus_per_node, nodes, extra_args}",
            ));
        };
        let mut o = SlurmOptions::default();
        for (k, v) in map {
            let name = k.as_str().unwrap_or_default();
            let at = path.key(name);
            let text = |what: &str| -> Result<String, FieldError> {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => String::new(),
                };
                if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(FieldError::new(
                        at.clone(),
                        Target::Value,
                        format!("`{name}` must be {what} (one word)"),
                    ));
                }
                Ok(s)
            };
            let count = |what: &str| -> Result<usize, FieldError> {
                match v.as_u64() {
                    Some(n) if n >= 1 => Ok(n as usize),
                    _ => Err(FieldError::new(
                        at.clone(),
                        Target::Value,
                        format!("`{name}` must be {what} (at least 1)"),
                    )),
                }
            };
            match name {
                "partition" => o.partition = Some(text("a partition name")?),
                "account" => o.account = Some(text("an account name")?),
                "time" => {
                    let t = text("a Slurm time limit")?;
                    if !t
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == ':' || c == '-')
                    {
                        return Err(FieldError::new(
                            at,
                            Target::Value,
                            format!("`{t}` is not a Slurm time limit"),
                        )
                        .with_help(
                            "write MINUTES, HH:MM:SS or DAYS-HH:MM:SS, e.g. `90` or `1-12:00:00`",
                        ));
                    }
                    o.time = Some(t);
                }
                "gpus_per_node" => o.gpus_per_node = Some(count("a number of GPUs")?),
                "nodes" => {
                    let n = count("a number of nodes")?;
                    if n > 1 {
                        return Err(FieldError::new(
                            at,
                            Target::Value,
                            format!("`nodes: {n}` under `slurm:`: the stage says how many nodes it runs on"),
                        )
                        .with_help("set `nodes: N` on a train stage (data parallel across nodes); its job asks Slurm for N nodes"));
                    }
                    o.nodes = Some(n);
                }
                "extra_args" => {
                    let Value::Sequence(items) = v else {
                        return Err(FieldError::new(
                            at,
                            Target::Value,
                            "`extra_args` must be a list of sbatch arguments, e.g. [\"--qos=high\"]",
                        ));
                    };
                    o.extra_args = items
                        .iter()
                        .map(|i| match i {
                            Value::String(s) => Ok(s.clone()),
                            _ => Err(FieldError::new(
                                at.clone(),
                                Target::Value,
                                "each of `extra_args` must be a string",
                            )),
                        })
                        .collect::<Result<_, _>>()?;
                }
                _ => {
                    return Err(FieldError::new(
                        at,
                        Target::Key,
                        format!("unknown field `{name}` in `slurm`"),
                    )
                    .with_help(
                        "expected partition, account, time, gpus_per_node, nodes or extra_args",
                    ))
                }
            }
        }
        Ok(o)
    }

    /// These options with each field that `own` sets replaced by its value.
    fn overridden_by(self, own: SlurmOptions) -> SlurmOptions {
        SlurmOptions {
            partition: own.partition.or(self.partition),
            account: own.account.or(self.account),
            time: own.time.or(self.time),
            gpus_per_node: own.gpus_per_node.or(self.gpus_per_node),
            nodes: own.nodes.or(self.nodes),
            extra_args: if own.extra_args.is_empty() {
                self.extra_args
            } else {
                own.extra_args
            },
        }
    }

    /// The `sbatch` options for a job with these settings and `resources`.
    pub fn sbatch_args(&self, resources: &Resources) -> Vec<String> {
        let mut args = vec![format!("--nodes={}", self.nodes.unwrap_or(1))];
        if let Some(p) = &self.partition {
            args.push(format!("--partition={p}"));
        }
        if let Some(a) = &self.account {
            args.push(format!("--account={a}"));
        }
        if let Some(t) = &self.time {
            args.push(format!("--time={t}"));
        }
        // `cuda:N` counts among the GPUs the job gets, which the node numbers from 0.
        let gpus = self.gpus_per_node.or(match &resources.gpus {
            Some(Gpus::Count(n)) => Some(*n),
            Some(Gpus::Devices(d)) => d.iter().max().map(|m| m + 1),
            None => None,
        });
        if let Some(g) = gpus.filter(|g| *g > 0) {
            args.push(format!("--gpus-per-node={g}"));
        }
        if let Some(c) = resources.cpus {
            args.push(format!("--cpus-per-task={c}"));
        }
        if let Some(m) = resources.memory {
            args.push(format!("--mem={}M", m.div_ceil(1 << 20)));
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// How a compute node runs one stage: this program with these arguments, to which the
/// stage's own are added (`FILE --stage ID --key KEY --log LOG [--set …]`).
#[derive(Debug, Clone)]
pub struct StageCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// What the work dir records of a submitted job, so that a later run re-attaches to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub log: PathBuf,
    pub submitted: String,
}

/// The file in a stage's work dir that records its job.
pub fn record_path(work_dir: &Path) -> PathBuf {
    work_dir.join("slurm-job.json")
}

/// The file in a stage's work dir through which the compute node reports progress.
pub fn progress_path(work_dir: &Path) -> PathBuf {
    work_dir.join("progress.json")
}

pub fn read_record(work_dir: &Path) -> Option<JobRecord> {
    serde_json::from_slice(&fs::read(record_path(work_dir)).ok()?).ok()
}

pub fn write_record(work_dir: &Path, record: &JobRecord) -> std::io::Result<()> {
    let path = record_path(work_dir);
    let tmp = path.with_extension("json.tmp");
    fs::write(
        &tmp,
        serde_json::to_vec_pretty(record).expect("serialisable"),
    )?;
    fs::rename(tmp, path)
}

/// Appends `line` to the log at `path` (best effort: a log line is never worth a failure).
pub fn append_to_log(path: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// What `pipe run-stage` is handed must stay inside `store`: `key` a key (it names the work
/// dir) and `log` a log of that key.
pub fn check_job_paths(store: &crate::Store, key: &str, log: &Path) -> Result<(), String> {
    if !crate::remote::is_digest(key) {
        return Err(format!("`{key}` is not a stage key"));
    }
    let dir = log.parent().and_then(|d| d.canonicalize().ok());
    if dir.is_none() || dir != store.log_dir(key).canonicalize().ok() {
        return Err(format!(
            "the log {} is not one of key {key}'s in the store {}",
            log.display(),
            store.root.display()
        ));
    }
    Ok(())
}

/// Submits `script` with `args` (`sbatch --parsable`): the job id.
pub fn submit(script: &Path, args: &[String]) -> Result<String, String> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .args(args)
        .arg(script)
        .output()
        .map_err(|e| format!("cannot run `sbatch` ({e}): is Slurm installed on this machine?"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "sbatch refused the job: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // `--parsable` prints `ID` or `ID;CLUSTER`.
    let id = stdout
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
        return Err(format!("sbatch printed no job id: `{}`", stdout.trim()));
    }
    Ok(id)
}

/// Asks Slurm to cancel the job (its processes get SIGTERM, then SIGKILL after KillWait).
pub fn cancel(job_id: &str) -> Result<(), String> {
    let out = Command::new("scancel")
        .arg(job_id)
        .output()
        .map_err(|e| format!("cannot run `scancel`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// What Slurm says of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobState {
    /// `PENDING`, `RUNNING`, `COMPLETED`, `TIMEOUT`, … (Slurm's base state names).
    pub state: String,
    /// Why it is pending, or why it ended, when Slurm says.
    pub reason: String,
    /// The node(s) it runs or ran on.
    pub nodes: String,
}

impl JobState {
    /// True once the job has ended (it will not run again unless resubmitted).
    pub fn ended(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "OUT_OF_MEMORY"
                | "NODE_FAIL"
                | "BOOT_FAIL"
                | "DEADLINE"
                | "PREEMPTED"
                | "REVOKED"
        )
    }
}

/// The job's state: from `squeue` while the controller knows it, else from `sacct`. `None`
/// when neither knows the job.
pub fn query(job_id: &str) -> Result<Option<JobState>, String> {
    let out = Command::new("squeue")
        .args(["-h", "--states=all", "-o", "%T|%r|%N", "-j", job_id])
        .output()
        .map_err(|e| format!("cannot run `squeue` ({e}): is Slurm installed on this machine?"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        if let Some(line) = stdout.lines().find(|l| !l.trim().is_empty()) {
            return Ok(Some(parse_state(line)));
        }
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.contains("Invalid job id") {
            return Err(format!("squeue failed: {}", err.trim()));
        }
    }
    // The controller forgets ended jobs after MinJobAge; accounting remembers them.
    let Ok(out) = Command::new("sacct")
        .args([
            "-n",
            "-P",
            "-X",
            "-o",
            "State,Reason,NodeList",
            "-j",
            job_id,
        ])
        .output()
    else {
        return Ok(None);
    };
    if !out.status.success() {
        return Ok(None);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(parse_state))
}

/// `STATE|REASON|NODES`; sacct writes `CANCELLED by 0` and squeue may add `+` flags.
fn parse_state(line: &str) -> JobState {
    let mut parts = line.trim().split('|');
    let state = parts.next().unwrap_or_default();
    let state = state
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_end_matches('+')
        .to_string();
    JobState {
        state,
        reason: parts.next().unwrap_or_default().trim().to_string(),
        nodes: parts.next().unwrap_or_default().trim().to_string(),
    }
}

/// How a tracked job ended, for the run loop.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// It completed: the compute node committed the entry.
    Completed,
    /// Slurm took it away through no fault of its own (preempted, its node failed): submit it
    /// again, and it resumes from its saved state.
    Lost(String),
    /// It was cancelled because this run was interrupted.
    Interrupted,
    /// It failed, for this reason (said as what to do about it).
    Failed(String),
}

/// Waits for job `job_id` to end, asking Slurm every quarter second at first, then less often
/// (every 2 s from the first few seconds on: the controller serves a whole cluster). When
/// `cancel` is set, the job is cancelled (once) and waited for. `tick` runs after each check
/// (to relay progress).
pub fn track(
    job_id: &str,
    options: &SlurmOptions,
    log: &Path,
    cancel: &AtomicBool,
    mut tick: impl FnMut(&JobState),
) -> Ended {
    let mut poll = Duration::from_millis(250);
    let grace = Duration::from_secs(120);
    let mut cancelled_at: Option<Instant> = None;
    let mut unknown_since: Option<Instant> = None;
    loop {
        if cancel.load(Ordering::SeqCst) && cancelled_at.is_none() {
            if let Err(e) = self::cancel(job_id) {
                tracing::warn!("cannot cancel Slurm job {job_id}: {e}");
            }
            cancelled_at = Some(Instant::now());
        }
        match query(job_id) {
            Ok(Some(state)) => {
                unknown_since = None;
                tick(&state);
                if state.ended() {
                    return ending(job_id, &state, options, log, cancelled_at.is_some());
                }
            }
            Ok(None) => {
                // A job is briefly unknown right after submission on some clusters.
                let since = *unknown_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(30) {
                    return if cancelled_at.is_some() {
                        Ended::Interrupted
                    } else {
                        Ended::Failed(format!(
                            "Slurm no longer knows job {job_id} (it ended long ago and job accounting is off); see the log {}",
                            log.display()
                        ))
                    };
                }
            }
            Err(e) => tracing::warn!("cannot ask Slurm about job {job_id}: {e}"),
        }
        if cancelled_at.is_some_and(|t| t.elapsed() > grace) {
            return Ended::Failed(format!(
                "Slurm job {job_id} was cancelled but has not ended after {} s; check `squeue -j {job_id}`",
                grace.as_secs()
            ));
        }
        // A Ctrl-C is acted on at once, not at the next check.
        let slept = Instant::now();
        while slept.elapsed() < poll && !(cancel.load(Ordering::SeqCst) && cancelled_at.is_none()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if cancelled_at.is_none() {
            poll = (poll * 2).min(Duration::from_secs(2));
        }
    }
}

/// What an ended job means.
fn ending(
    job_id: &str,
    state: &JobState,
    options: &SlurmOptions,
    log: &Path,
    we_cancelled: bool,
) -> Ended {
    let on = if state.nodes.is_empty() {
        String::new()
    } else {
        format!(" on {}", state.nodes)
    };
    let logged = failure_in_log(log);
    match state.state.as_str() {
        "COMPLETED" => Ended::Completed,
        _ if we_cancelled => Ended::Interrupted,
        "PREEMPTED" => Ended::Lost(format!("Slurm job {job_id} was preempted{on}")),
        "NODE_FAIL" | "BOOT_FAIL" => Ended::Lost(format!(
            "the node of Slurm job {job_id}{on} failed ({})",
            state.state
        )),
        "TIMEOUT" => Ended::Failed(format!(
            "Slurm job {job_id}{on} reached its time limit ({}); raise `slurm.time` (a train stage resumes from its last checkpoint on the next run)",
            options.time.as_deref().map(|t| format!("slurm.time: {t}")).unwrap_or_else(|| "the partition's default".into())
        )),
        "OUT_OF_MEMORY" => Ended::Failed(format!(
            "Slurm job {job_id}{on} ran out of memory and was killed at its limit; raise `resources.memory` (sbatch --mem), or lower the batch size"
        )),
        "DEADLINE" => Ended::Failed(format!("Slurm job {job_id} missed its deadline")),
        "CANCELLED" => Ended::Failed(format!(
            "Slurm job {job_id}{on} was cancelled outside pipe{}",
            if state.reason.is_empty() || state.reason == "None" {
                String::new()
            } else {
                format!(" ({})", state.reason)
            }
        )),
        _ => match logged {
            Some(error) => Ended::Failed(error),
            None => Ended::Failed(format!(
                "Slurm job {job_id}{on} ended {}{}; see the log {}",
                state.state,
                if state.reason.is_empty() || state.reason == "None" {
                    String::new()
                } else {
                    format!(" ({})", state.reason)
                },
                log.display()
            )),
        },
    }
}

/// Why the compute node's pipe said the stage failed in its last attempt (the log's last
/// `# pipe: failed: …` line, if no attempt started after it). Only the log's tail is read.
pub fn failure_in_log(log: &Path) -> Option<String> {
    let mut f = fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(64 << 10))).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let mut failure: Option<String> = None;
    let mut more = false;
    for line in String::from_utf8_lossy(&tail).lines() {
        if let Some(error) = line.strip_prefix("# pipe: failed: ") {
            failure = Some(error.to_string());
            more = true;
        } else if line.starts_with("# pipe: stage `") && line.contains(" started ") {
            failure = None;
            more = false;
        } else if line.starts_with("# pipe: ") || line.starts_with("slurmstepd") {
            more = false;
        } else if more {
            // A multi-line error (a command's last output lines, say).
            if let Some(f) = failure.as_mut() {
                f.push('\n');
                f.push_str(line);
            }
        }
    }
    failure
}

/// Quotes `arg` for a POSIX shell.
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// The batch script that runs `command` (one stage) on the compute node; for a stage on
/// `nodes` > 1 nodes, on each node of the job through `srun`, told its node number by
/// `SLURM_PROCID` and node 0's address: the host the script runs on (the job's first node,
/// where task 0 runs), at a port taken from the job id.
pub fn batch_script(comment: &str, command: &[String], nodes: usize) -> String {
    let line: Vec<String> = command.iter().map(|a| shell_quote(a)).collect();
    let head = format!(
        "#!/bin/sh\n# {comment}\n# Written by pipe; the stage's log is this job's output.\n"
    );
    if nodes <= 1 {
        return format!("{head}exec {}\n", line.join(" "));
    }
    format!(
        "{head}# One task per node; node 0 (the first) listens for the others.\n\
         PIPE_COORDINATOR=\"$(hostname):$((20000 + SLURM_JOB_ID % 20000))\"\n\
         exec srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 {} --nodes {nodes} --coordinator \"$PIPE_COORDINATOR\"\n",
        line.join(" ")
    )
}

/// A progress sink that a compute node's `pipe run-stage` reports to: the latest state,
/// written to a file (at most twice a second) that the submitting run reads.
pub struct FileProgress {
    path: PathBuf,
    state: Mutex<(ProgressState, Option<Instant>)>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressState {
    pub length: Option<u64>,
    pub bytes: bool,
    pub position: u64,
    pub message: String,
}

impl FileProgress {
    pub fn new(path: PathBuf) -> Self {
        FileProgress {
            path,
            state: Mutex::new((ProgressState::default(), None)),
        }
    }

    fn update(&self, change: impl FnOnce(&mut ProgressState)) {
        let Ok(mut guard) = self.state.lock() else {
            return;
        };
        change(&mut guard.0);
        if guard
            .1
            .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return;
        }
        guard.1 = Some(Instant::now());
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec(&guard.0).expect("serialisable");
        if fs::write(&tmp, body).is_ok() {
            let _ = fs::rename(tmp, &self.path);
        }
    }
}

impl Progress for FileProgress {
    fn set_length(&self, len: u64) {
        self.update(|s| {
            s.length = Some(len);
            s.bytes = false;
        })
    }
    fn set_bytes_length(&self, len: u64) {
        self.update(|s| {
            s.length = Some(len);
            s.bytes = true;
        })
    }
    fn set_position(&self, pos: u64) {
        self.update(|s| s.position = pos)
    }
    fn set_message(&self, msg: String) {
        self.update(|s| s.message = msg)
    }
}

/// Passes what the compute node last reported in `path` on to `progress`, if it changed
/// since `last`.
pub fn relay_progress(path: &Path, progress: &dyn Progress, last: &mut ProgressState) {
    let Some(now) = fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<ProgressState>(&b).ok())
    else {
        return;
    };
    if now == *last {
        return;
    }
    if now.length != last.length || now.bytes != last.bytes {
        match (now.length, now.bytes) {
            (Some(len), true) => progress.set_bytes_length(len),
            (Some(len), false) => progress.set_length(len),
            (None, _) => {}
        }
    }
    if now.message != last.message {
        progress.set_message(now.message.clone());
    }
    progress.set_position(now.position);
    *last = now;
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.to_lowercase();
        match self.state.as_str() {
            "PENDING" if !self.reason.is_empty() && self.reason != "None" => {
                write!(f, "{state} ({})", self.reason)
            }
            _ if !self.nodes.is_empty() => write!(f, "{state} on {}", self.nodes),
            _ => f.write_str(&state),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn a_stage_inherits_the_pipelines_slurm_settings_and_overrides_field_by_field() {
        let root = FieldPath::root();
        let pipeline = Executor::parse(
            Some(&yaml("slurm")),
            Some(&yaml(
                "{partition: gpu, time: '60', extra_args: ['--qos=high']}",
            )),
            &root,
            &Executor::Local,
        )
        .unwrap();
        let stage = Executor::parse(
            None,
            Some(&yaml("{time: '1-00:00:00', gpus_per_node: 8}")),
            &root.key("stages").key("train"),
            &pipeline,
        )
        .unwrap();
        let Executor::Slurm(o) = stage else {
            panic!("slurm expected")
        };
        assert_eq!(o.partition.as_deref(), Some("gpu"));
        assert_eq!(o.time.as_deref(), Some("1-00:00:00"));
        assert_eq!(o.gpus_per_node, Some(8));
        assert_eq!(o.extra_args, vec!["--qos=high".to_string()]);
        let local = Executor::parse(Some(&yaml("local")), None, &root, &pipeline).unwrap();
        assert_eq!(local, Executor::Local);
    }

    #[test]
    fn mistakes_name_the_field() {
        let root = FieldPath::root();
        let err = |e: Option<&str>, s: Option<&str>| {
            Executor::parse(
                e.map(yaml).as_ref(),
                s.map(yaml).as_ref(),
                &root,
                &Executor::Local,
            )
            .unwrap_err()
        };
        assert!(err(Some("kubernetes"), None)
            .message
            .contains("`local` or `slurm`"));
        let e = err(Some("slurm"), Some("{partiton: gpu}"));
        assert!(
            e.message.contains("unknown field `partiton`"),
            "{}",
            e.message
        );
        let e = err(Some("slurm"), Some("{time: 'two hours'}"));
        assert!(e.message.contains("one word") || e.message.contains("time limit"));
        let e = err(Some("slurm"), Some("{nodes: 4}"));
        assert!(
            e.message.contains("the stage says how many nodes"),
            "{}",
            e.message
        );
        let e = err(None, Some("{partition: gpu}"));
        assert!(e.message.contains("local executor"), "{}", e.message);
    }

    #[test]
    fn sbatch_arguments_follow_the_settings_and_resources() {
        let o = SlurmOptions {
            partition: Some("gpu".into()),
            time: Some("90".into()),
            extra_args: vec!["--qos=high".into()],
            ..Default::default()
        };
        let r = Resources {
            gpus: Some(Gpus::Devices([0, 3].into())),
            cpus: Some(8),
            memory: Some(3 << 30),
        };
        assert_eq!(
            o.sbatch_args(&r),
            [
                "--nodes=1",
                "--partition=gpu",
                "--time=90",
                "--gpus-per-node=4",
                "--cpus-per-task=8",
                "--mem=3072M",
                "--qos=high"
            ]
        );
    }

    #[test]
    fn ended_jobs_are_told_as_what_they_mean() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        fs::write(
            &log,
            "# pipe: stage `a` (command v1) key k started now\n# pipe: failed: command exited with status 3\nlast words\nslurmstepd: error: oops\n",
        )
        .unwrap();
        let o = SlurmOptions {
            time: Some("30".into()),
            ..Default::default()
        };
        let state = |s: &str| JobState {
            state: s.into(),
            reason: "None".into(),
            nodes: "n1".into(),
        };
        assert_eq!(
            ending("7", &state("FAILED"), &o, &log, false),
            Ended::Failed("command exited with status 3\nlast words".into())
        );
        assert!(matches!(
            ending("7", &state("PREEMPTED"), &o, &log, false),
            Ended::Lost(_)
        ));
        assert!(matches!(
            ending("7", &state("NODE_FAIL"), &o, &log, false),
            Ended::Lost(_)
        ));
        assert_eq!(
            ending("7", &state("FAILED"), &o, &log, true),
            Ended::Interrupted
        );
        let Ended::Failed(t) = ending("7", &state("TIMEOUT"), &o, &log, false) else {
            panic!()
        };
        assert!(
            t.contains("time limit (slurm.time: 30)") && t.contains("on n1"),
            "{t}"
        );
        let Ended::Failed(m) = ending("7", &state("OUT_OF_MEMORY"), &o, &log, false) else {
            panic!()
        };
        assert!(
            m.contains("ran out of memory") && m.contains("resources.memory"),
            "{m}"
        );
        // A failure of an earlier attempt is not the last attempt's.
        fs::write(
            &log,
            "# pipe: failed: old\n# pipe: stage `a` (command v1) key k started later\n",
        )
        .unwrap();
        let Ended::Failed(f) = ending("7", &state("FAILED"), &o, &log, false) else {
            panic!()
        };
        assert!(f.starts_with("Slurm job 7 on n1 ended FAILED"), "{f}");
    }

    #[test]
    fn a_stage_job_is_handed_paths_inside_the_store_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::Store::open(&dir.path().join("cache")).unwrap();
        let key = "a".repeat(64);
        fs::create_dir_all(store.log_dir(&key)).unwrap();
        let log = store.log_dir(&key).join("x.log");
        assert_eq!(check_job_paths(&store, &key, &log), Ok(()));
        assert!(check_job_paths(&store, "../../etc", &log).is_err());
        assert!(check_job_paths(&store, &key, &dir.path().join("x.log")).is_err());
        let other = "b".repeat(64);
        fs::create_dir_all(store.log_dir(&other)).unwrap();
        assert!(check_job_paths(&store, &key, &store.log_dir(&other).join("x.log")).is_err());
    }

    #[test]
    fn states_and_scripts() {
        let s = parse_state("CANCELLED by 0|None|node1");
        assert_eq!(s.state, "CANCELLED");
        assert!(s.ended());
        assert!(!parse_state("PENDING|Priority|").ended());
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("/a/b-c.yaml"), "/a/b-c.yaml");
        let script = batch_script("x", &["/bin/pipe".into(), "a b".into()], 1);
        assert!(script.ends_with("exec /bin/pipe 'a b'\n"));
        let script = batch_script("x", &["/bin/pipe".into(), "run-stage".into()], 2);
        assert!(script.ends_with(
            "exec srun --nodes=2 --ntasks=2 --ntasks-per-node=1 /bin/pipe run-stage --nodes 2 --coordinator \"$PIPE_COORDINATOR\"\n"
        ));
    }
}
