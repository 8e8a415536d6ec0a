//! The run loop: stages in dependency order, independent ones concurrently, each either a
//! cache hit or an attempt whose outputs are committed to the store.
//!
//! One coordinator thread owns all decisions. A stage becomes ready when every stage it reads
//! from has a manifest; its key is then computed from their output digests (early cutoff) and
//! looked up. Misses run on worker threads (at most `jobs` at once). A failure stops its
//! dependents; independent branches finish. Ctrl-C/SIGTERM asks running stages to save their
//! state and stop, and starts nothing new.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::digest::HashMemo;
use crate::graph::{Dag, Selection};
use crate::key::{diff, Change, KeyRecipe};
use crate::kind::{InputSource, Interrupted, StageContext};
use crate::lock::WorkspaceLock;
use crate::progress::StageLine;
use crate::spec::Pipeline;
use crate::store::{InputRecord, Manifest, RunRecord, StageRef, Store, MANIFEST_FORMAT};

/// Set once SIGINT or SIGTERM arrives. A second signal exits at once (status 130).
pub fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // Order matters: the conditional exit sees the flag as it was before this signal.
            let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
            let _ = signal_hook::flag::register(sig, flag.clone());
        }
        flag
    })
    .clone()
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub selection: Selection,
    /// Stages run at once, at most.
    pub jobs: usize,
}

/// How a stage ended in a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Cached,
    Done,
    Failed(String),
    /// Not run: an upstream stage failed, the run was interrupted, or it was not selected.
    Skipped(String),
    Interrupted,
}

impl Status {
    pub fn word(&self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::Done => "done",
            Status::Failed(_) => "FAILED",
            Status::Skipped(_) => "skipped",
            Status::Interrupted => "interrupted",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub stage: String,
    pub status: Status,
    pub wall: Duration,
    pub key: Option<String>,
    /// Where the outputs are (complete stages), or the log (failed ones).
    pub artifacts: Option<PathBuf>,
    pub log: Option<PathBuf>,
}

impl Outcome {
    /// How `stage` ended; no time, key, artifacts or log until they are added.
    fn new(stage: &str, status: Status) -> Self {
        Outcome {
            stage: stage.to_string(),
            status,
            wall: Duration::ZERO,
            key: None,
            artifacts: None,
            log: None,
        }
    }

    fn keyed(self, key: &str) -> Self {
        Outcome {
            key: Some(key.to_string()),
            ..self
        }
    }

    fn stored_in(self, artifacts: PathBuf) -> Self {
        Outcome {
            artifacts: Some(artifacts),
            ..self
        }
    }

    fn took(self, wall: Duration) -> Self {
        Outcome { wall, ..self }
    }

    fn logged(self, log: Option<PathBuf>) -> Self {
        Outcome { log, ..self }
    }
}

#[derive(Debug)]
pub struct RunSummary {
    pub pipeline: String,
    pub outcomes: Vec<Outcome>,
    pub interrupted: bool,
    pub wall: Duration,
}

impl RunSummary {
    /// True when every selected stage is in the cache now.
    pub fn ok(&self) -> bool {
        !self.interrupted
            && self.outcomes.iter().all(|o| match &o.status {
                Status::Cached | Status::Done => true,
                Status::Skipped(r) => r == NOT_SELECTED,
                _ => false,
            })
    }

    /// The final table: stage, status, wall time, key prefix, artifact location; then, for
    /// each failure, why and where its log is.
    pub fn table(&self) -> String {
        let cwd = std::env::current_dir().unwrap_or_default();
        let rel = |p: &PathBuf| {
            p.strip_prefix(&cwd)
                .map(|r| r.display().to_string())
                .unwrap_or_else(|_| p.display().to_string())
        };
        let w = self
            .outcomes
            .iter()
            .map(|o| o.stage.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut s = format!(
            "{:w$}  {:11}  {:>8}  {:12}  artifacts\n",
            "stage", "status", "time", "key"
        );
        for o in &self.outcomes {
            let time = match o.status {
                Status::Done | Status::Failed(_) | Status::Interrupted => {
                    format!("{:.1}s", o.wall.as_secs_f64())
                }
                _ => "-".into(),
            };
            let key = o.key.as_deref().map(|k| &k[..12]).unwrap_or("-");
            let loc = o.artifacts.as_ref().map(rel).unwrap_or_else(|| "-".into());
            s.push_str(&format!(
                "{:w$}  {:11}  {:>8}  {:12}  {}\n",
                o.stage,
                o.status.word(),
                time,
                key,
                loc
            ));
        }
        for o in &self.outcomes {
            match &o.status {
                Status::Failed(why) => {
                    s.push_str(&format!(
                        "\nstage `{}` failed: {}\n",
                        o.stage,
                        why.trim_end()
                    ));
                    if let Some(log) = &o.log {
                        s.push_str(&format!("  log: {}\n", rel(log)));
                    }
                }
                Status::Skipped(why) if why != NOT_SELECTED => {
                    s.push_str(&format!("stage `{}` did not run: {why}\n", o.stage));
                }
                _ => {}
            }
        }
        let left_out: Vec<String> = self
            .outcomes
            .iter()
            .filter(|o| matches!(&o.status, Status::Skipped(r) if r == NOT_SELECTED))
            .map(|o| format!("`{}`", o.stage))
            .collect();
        if !left_out.is_empty() {
            s.push_str(&format!(
                "\nleft out (not selected, not in the cache): {}; a run without --only/--until makes {}\n",
                left_out.join(", "),
                if left_out.len() == 1 { "it" } else { "them" }
            ));
        }
        if self.interrupted {
            s.push_str("\ninterrupted: finished stages are in the cache; run the same command again to resume\n");
        }
        s
    }
}

const NOT_SELECTED: &str = "not selected";

/// What a stage needs before it can run: its key recipe, the records of its inputs and where
/// they are.
struct Resolved {
    recipe: KeyRecipe,
    inputs: BTreeMap<String, InputRecord>,
    paths: BTreeMap<String, PathBuf>,
}

/// A pipeline bound to a store.
pub struct Engine<'p> {
    pub pipeline: &'p Pipeline,
    pub store: Store,
    pub dag: Dag,
    memo: HashMemo,
}

/// Whether a stage would run, and why (for `--dry-run` and `status`).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Cached,
    NeverRun,
    Stale(Vec<Change>),
    /// Its last record is gone from the store (garbage-collected or invalidated).
    Missing,
    /// Its entry is in the store, but the bytes of an output are not the recorded ones: the
    /// next run discards and re-makes it. The first damaged file, described.
    Damaged(String),
    Forced,
    /// Its key depends on outputs of upstream stages that are not in the cache yet.
    WaitsOn(Vec<String>),
    NotSelected,
    Error(String),
}

#[derive(Debug, Clone)]
pub struct PlanRow {
    pub stage: String,
    pub kind: String,
    pub verdict: Verdict,
    pub key: Option<String>,
    /// What the stage itself wants said (e.g. an unpinned source).
    pub notes: Vec<String>,
}

impl std::fmt::Display for PlanRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.verdict {
            Verdict::Cached => write!(f, "cached      {}", self.stage),
            Verdict::NeverRun => write!(f, "run         {}  (never run)", self.stage),
            Verdict::Missing => write!(
                f,
                "run         {}  (its last result is no longer in the store)",
                self.stage
            ),
            Verdict::Stale(c) => {
                let first = c
                    .first()
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "key changed".into());
                let more = if c.len() > 1 {
                    format!(" (+{} more)", c.len() - 1)
                } else {
                    String::new()
                };
                write!(f, "run         {}  ({first}{more})", self.stage)
            }
            Verdict::Forced => write!(f, "run         {}  (forced)", self.stage),
            Verdict::Damaged(d) => write!(
                f,
                "run         {}  (its stored outputs are damaged: {d})",
                self.stage
            ),
            Verdict::WaitsOn(ups) => write!(
                f,
                "run?        {}  (after {} run: only if their outputs change)",
                self.stage,
                ups.iter()
                    .map(|u| format!("`{u}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Verdict::NotSelected => write!(f, "skip        {}  (not selected)", self.stage),
            Verdict::Error(e) => write!(f, "error       {}  ({e})", self.stage),
        }
    }
}

impl<'p> Engine<'p> {
    pub fn new(pipeline: &'p Pipeline, store: Store) -> Self {
        let memo = HashMemo::load(&store.memo_path());
        Engine {
            dag: Dag::new(pipeline),
            pipeline,
            store,
            memo,
        }
    }

    /// The recipe of stage `i` given the manifests of the stages it reads, or `Ok(None)` when
    /// one of them is not available.
    fn resolve(
        &mut self,
        i: usize,
        done: &HashMap<usize, Manifest>,
    ) -> Result<Option<Resolved>, String> {
        let s = &self.pipeline.stages[i];
        let mut inputs = BTreeMap::new();
        let mut paths = BTreeMap::new();
        let mut digests = BTreeMap::new();
        for input in &s.inputs {
            let (source, digest, path) = match &input.source {
                InputSource::Path(p) => {
                    let d = self
                        .memo
                        .digest_path(p)
                        .map_err(|e| format!("input `{}` cannot be read: {e}", input.name))?;
                    (input.name.clone(), d.digest, p.clone())
                }
                InputSource::Stage { stage, output } => {
                    let up = self.pipeline.index(stage).expect("checked reference");
                    let Some(m) = done.get(&up) else {
                        return Ok(None);
                    };
                    let digest = m.output_digest(output.as_deref()).ok_or_else(|| {
                        format!(
                            "input `{}`: stage `{stage}` produced no output `{}`",
                            input.name,
                            output.as_deref().unwrap_or("")
                        )
                    })?;
                    let mut path = self.store.out_dir(&m.key);
                    if let Some(o) = output {
                        path = path.join(o);
                    }
                    let source = match output {
                        Some(o) => format!("stage:{stage}/{o}"),
                        None => format!("stage:{stage}"),
                    };
                    (source, digest, path)
                }
            };
            digests.insert(input.name.clone(), digest.clone());
            inputs.insert(input.name.clone(), InputRecord { source, digest });
            paths.insert(input.name.clone(), path);
        }
        Ok(Some(Resolved {
            recipe: KeyRecipe {
                kind: s.kind.to_string(),
                kind_version: s.kind_version,
                params: s.params.clone(),
                inputs: digests,
            },
            inputs,
            paths,
        }))
    }

    /// The first input of stage `i` read from a stored entry whose bytes are damaged: that
    /// upstream stage, and what is wrong.
    fn damaged_input(
        &self,
        i: usize,
        done: &HashMap<usize, Manifest>,
    ) -> Option<(usize, Vec<crate::store::Damage>)> {
        self.pipeline.stages[i]
            .inputs
            .iter()
            .filter_map(|input| match &input.source {
                InputSource::Stage { stage, .. } => self.pipeline.index(stage),
                InputSource::Path(_) => None,
            })
            .find_map(|up| {
                let damage = self.store.damage(done.get(&up)?);
                (!damage.is_empty()).then_some((up, damage))
            })
    }

    /// What a run with `selection` would do, stage by stage, without running anything.
    pub fn plan(&mut self, selection: &Selection) -> Result<Vec<PlanRow>, String> {
        let plan = selection.plan(self.pipeline, &self.dag)?;
        let mut done: HashMap<usize, Manifest> = HashMap::new();
        let mut rows = Vec::new();
        for i in self.dag.order() {
            let s = &self.pipeline.stages[i];
            let mut row = PlanRow {
                stage: s.id.clone(),
                kind: s.kind.to_string(),
                verdict: Verdict::NeverRun,
                key: None,
                notes: s.stage.notes(),
            };
            match self.resolve(i, &done) {
                Err(e) => row.verdict = Verdict::Error(e),
                Ok(None) => {
                    let ups = self
                        .dag
                        .upstream(i)
                        .into_iter()
                        .filter(|u| !done.contains_key(u))
                        .map(|u| self.pipeline.stages[u].id.clone())
                        .collect();
                    row.verdict = Verdict::WaitsOn(ups);
                }
                Ok(Some(r)) => {
                    let key = r.recipe.key();
                    let hit = self.store.lookup(&key);
                    let damage = hit
                        .as_ref()
                        .map(|m| self.store.damage(m))
                        .unwrap_or_default();
                    row.verdict = if plan.forced.contains(&i) && plan.selected.contains(&i) {
                        Verdict::Forced
                    } else if let Some(d) = damage.first() {
                        Verdict::Damaged(d.to_string())
                    } else if let Some(m) = &hit {
                        done.insert(i, m.clone());
                        Verdict::Cached
                    } else {
                        self.explain(&s.id, &r.recipe)
                    };
                    row.key = Some(key);
                }
            }
            if !plan.selected.contains(&i) && row.verdict != Verdict::Cached {
                row.verdict = Verdict::NotSelected;
            }
            rows.push(row);
        }
        let _ = self.memo.save();
        Ok(rows)
    }

    /// Why a stage that is not cached would run: never run, or what changed since its last run.
    fn explain(&self, stage: &str, now: &KeyRecipe) -> Verdict {
        let Some(r) = self.store.read_ref(&self.pipeline.name, stage) else {
            return Verdict::NeverRun;
        };
        let Some(m) = self.store.read_manifest(&r.key) else {
            return Verdict::Missing;
        };
        let before = KeyRecipe {
            kind: m.kind,
            kind_version: m.kind_version,
            params: m.params,
            inputs: m.inputs.into_iter().map(|(k, v)| (k, v.digest)).collect(),
        };
        let changes = diff(&before, now);
        if changes.is_empty() {
            Verdict::Missing
        } else {
            Verdict::Stale(changes)
        }
    }

    /// Runs the pipeline. Takes the workspace lock for the duration.
    pub fn run(
        &mut self,
        opts: &RunOptions,
        cancel: Arc<AtomicBool>,
    ) -> anyhow::Result<RunSummary> {
        let _lock = WorkspaceLock::acquire(&self.store.root)?;
        let started_at = SystemTime::now();
        let t0 = Instant::now();
        let plan = opts
            .selection
            .plan(self.pipeline, &self.dag)
            .map_err(|e| anyhow::anyhow!(e))?;
        let order = self.dag.order();
        let n = self.pipeline.stages.len();
        let jobs = opts.jobs.max(1);
        let lines: Vec<StageLine> = self
            .pipeline
            .stages
            .iter()
            .map(|s| StageLine::new(&s.id))
            .collect();

        let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
        let mut done: HashMap<usize, Manifest> = HashMap::new();
        let mut running: HashMap<usize, (String, Instant)> = HashMap::new();
        // Written now and as stages start or hit, so that a killed run leaves its record too
        // (gc keeps what it used, and the work dirs it would resume from).
        let mut record = RunRecord {
            pipeline: self.pipeline.name.clone(),
            started: humantime::format_rfc3339_millis(started_at).to_string(),
            keys: BTreeMap::new(),
            finished: false,
        };
        self.store.record_run(&record)?;
        // Stages whose entry was found damaged and discarded in this run: each is re-made once.
        let mut remade: HashSet<usize> = HashSet::new();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<(usize, Attempt)>();

        let pipeline = self.pipeline;
        std::thread::scope(|scope| -> anyhow::Result<()> {
            loop {
                if cancel.load(Ordering::SeqCst) {
                    stop.store(true, Ordering::SeqCst);
                }
                let stopping = stop.load(Ordering::SeqCst);
                let mut progressed = false;
                for &i in &order {
                    if outcomes[i].is_some() || running.contains_key(&i) {
                        continue;
                    }
                    let id = &pipeline.stages[i].id;
                    let ups = self.dag.upstream(i);
                    if let Some(&bad) = ups
                        .iter()
                        .find(|u| outcomes[**u].is_some() && !done.contains_key(u))
                    {
                        let up = &pipeline.stages[bad].id;
                        if !plan.selected.contains(&i) {
                            // Its upstream did not complete, but it was not asked for either.
                            lines[i].finish("skipped", NOT_SELECTED);
                            outcomes[i] =
                                Some(Outcome::new(id, Status::Skipped(NOT_SELECTED.into())));
                            progressed = true;
                            continue;
                        }
                        let why = match &outcomes[bad].as_ref().expect("finished").status {
                            Status::Skipped(r) if r == NOT_SELECTED => format!(
                                "it reads `{up}`, which is not selected and not in the cache (run it first, or widen the selection)"
                            ),
                            _ => format!("upstream stage `{up}` did not complete"),
                        };
                        lines[i].finish("skipped", &why);
                        outcomes[i] = Some(Outcome::new(id, Status::Skipped(why)));
                        progressed = true;
                        continue;
                    }
                    if ups.iter().any(|u| !done.contains_key(u)) {
                        continue;
                    }
                    let resolved = match self.resolve(i, &done) {
                        Ok(Some(r)) => r,
                        Ok(None) => continue,
                        Err(e) => {
                            lines[i].finish("FAILED", &e);
                            outcomes[i] = Some(Outcome::new(id, Status::Failed(e)));
                            progressed = true;
                            continue;
                        }
                    };
                    let key = resolved.recipe.key();
                    let selected = plan.selected.contains(&i);
                    let forced = plan.forced.contains(&i) && selected;
                    if !forced {
                        if let Some(m) = self.store.lookup_intact(&key) {
                            if let Err(e) = deliver(&pipeline.stages[i], &self.store.out_dir(&key))
                            {
                                lines[i].finish("FAILED", &e);
                                outcomes[i] = Some(
                                    Outcome::new(id, Status::Failed(e))
                                        .keyed(&key)
                                        .stored_in(self.store.out_dir(&key)),
                                );
                                progressed = true;
                                continue;
                            }
                            lines[i].finish("cached", &key[..12]);
                            self.store.write_ref(
                                &pipeline.name,
                                id,
                                &StageRef {
                                    key: key.clone(),
                                    finished: m.finished.clone(),
                                },
                            )?;
                            record.keys.insert(id.clone(), key.clone());
                            self.store.record_run(&record)?;
                            outcomes[i] = Some(
                                Outcome::new(id, Status::Cached)
                                    .keyed(&key)
                                    .stored_in(self.store.out_dir(&key)),
                            );
                            done.insert(i, m);
                            progressed = true;
                            continue;
                        }
                    }
                    if !selected {
                        lines[i].finish("skipped", NOT_SELECTED);
                        outcomes[i] = Some(Outcome::new(id, Status::Skipped(NOT_SELECTED.into())));
                        progressed = true;
                        continue;
                    }
                    if stopping {
                        lines[i].finish("skipped", "interrupted before it started");
                        let why = "the run was interrupted before it started";
                        outcomes[i] = Some(Outcome::new(id, Status::Skipped(why.into())));
                        progressed = true;
                        continue;
                    }
                    // Two stages with the same recipe share one entry: the second waits.
                    if running.len() >= jobs || running.values().any(|(k, _)| *k == key) {
                        continue;
                    }
                    // Its inputs are read from the store: their bytes are checked first, and a
                    // damaged upstream entry is discarded and re-made before this stage runs.
                    if let Some((up, damage)) = self.damaged_input(i, &done) {
                        let up_id = &pipeline.stages[up].id;
                        let m = done.remove(&up).expect("a damaged input was done");
                        self.store.discard(&m, &damage);
                        if remade.insert(up) {
                            lines[up].again("its stored outputs were damaged; re-making them");
                            outcomes[up] = None;
                        } else {
                            let why = format!(
                                "the stored outputs of `{up_id}` were damaged again after it was re-made in this run: {}",
                                damage[0]
                            );
                            lines[i].finish("FAILED", &why);
                            outcomes[i] = Some(Outcome::new(id, Status::Failed(why)).keyed(&key));
                        }
                        progressed = true;
                        continue;
                    }
                    record.keys.insert(id.clone(), key.clone());
                    self.store.record_run(&record)?;
                    lines[i].running();
                    running.insert(i, (key.clone(), Instant::now()));
                    let job = Job {
                        store: self.store.clone(),
                        pipeline: pipeline.name.clone(),
                        base_dir: pipeline.base_dir.clone(),
                        stage_index: i,
                        key,
                        resolved,
                        cancel: stop.clone(),
                        progress: Arc::new(lines[i].reporter()),
                    };
                    let tx = tx.clone();
                    scope.spawn(move || {
                        let attempt = job.attempt(pipeline);
                        let _ = tx.send((job.stage_index, attempt));
                    });
                    progressed = true;
                }
                if outcomes.iter().all(Option::is_some) {
                    break;
                }
                if progressed {
                    continue;
                }
                // Nothing could start: wait for a running stage (or a signal).
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok((i, attempt)) => {
                        let (key, t) = running.remove(&i).expect("was running");
                        let wall = t.elapsed();
                        let id = &pipeline.stages[i].id;
                        let outcome = match attempt {
                            Attempt::Done(m) => {
                                self.store.write_ref(
                                    &pipeline.name,
                                    id,
                                    &StageRef {
                                        key: key.clone(),
                                        finished: m.finished.clone(),
                                    },
                                )?;
                                let out = self.store.out_dir(&key);
                                let status = match deliver(&pipeline.stages[i], &out) {
                                    // The outputs are stored; only their delivery failed.
                                    Err(e) => {
                                        lines[i].finish("FAILED", &e);
                                        Status::Failed(e)
                                    }
                                    Ok(()) => {
                                        lines[i]
                                            .finish("done", &format!("{:.1}s", wall.as_secs_f64()));
                                        done.insert(i, *m);
                                        Status::Done
                                    }
                                };
                                Outcome::new(id, status)
                                    .keyed(&key)
                                    .stored_in(out)
                                    .took(wall)
                            }
                            Attempt::Failed { error, log } => {
                                lines[i].finish("FAILED", &first_line(&error));
                                Outcome::new(id, Status::Failed(error))
                                    .keyed(&key)
                                    .took(wall)
                                    .logged(log)
                            }
                            Attempt::Interrupted { log } => {
                                lines[i].finish("interrupted", "state saved");
                                Outcome::new(id, Status::Interrupted)
                                    .keyed(&key)
                                    .took(wall)
                                    .logged(log)
                            }
                        };
                        outcomes[i] = Some(outcome);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        unreachable!("the coordinator holds a sender")
                    }
                }
            }
            Ok(())
        })?;

        tracing::debug!(
            "read {} bytes of external inputs to hash them",
            self.memo.bytes_hashed
        );
        let _ = self.memo.save();
        record.finished = true;
        let _ = self.store.record_run(&record);
        let outcomes: Vec<Outcome> = order
            .iter()
            .map(|&i| outcomes[i].take().expect("every stage ends"))
            .collect();
        Ok(RunSummary {
            pipeline: pipeline.name.clone(),
            interrupted: stop.load(Ordering::SeqCst),
            outcomes,
            wall: t0.elapsed(),
        })
    }
}

/// Lets a stage deliver its stored outputs (see [`crate::kind::Stage::deliver`]).
fn deliver(def: &crate::spec::StageDef, out: &std::path::Path) -> Result<(), String> {
    match def.stage.deliver(out) {
        Ok(Some(msg)) => {
            tracing::info!("{}: {msg}", def.id);
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(format!("cannot deliver the outputs: {e:#}")),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(100).collect()
}

enum Attempt {
    Done(Box<Manifest>),
    Failed { error: String, log: Option<PathBuf> },
    Interrupted { log: Option<PathBuf> },
}

/// One attempt at one stage, on a worker thread.
struct Job {
    store: Store,
    pipeline: String,
    base_dir: PathBuf,
    stage_index: usize,
    key: String,
    resolved: Resolved,
    cancel: Arc<AtomicBool>,
    progress: Arc<dyn crate::kind::Progress>,
}

impl Job {
    fn attempt(&self, pipeline: &Pipeline) -> Attempt {
        let def = &pipeline.stages[self.stage_index];
        let started = SystemTime::now();
        let stamp = humantime::format_rfc3339_millis(started).to_string();
        let log_rel = format!("logs/{}/{}.log", self.key, stamp.replace(':', "-"));
        let log_path = self.store.root.join(&log_rel);
        let prepared = (|| -> std::io::Result<(PathBuf, PathBuf, fs::File)> {
            let work = self.store.work_dir(&self.key);
            let state = work.join("state");
            let out = work.join("out");
            if !def.stage.resumable() && state.exists() {
                fs::remove_dir_all(&state)?;
            }
            if out.exists() {
                fs::remove_dir_all(&out)?;
            }
            fs::create_dir_all(&state)?;
            fs::create_dir_all(&out)?;
            fs::create_dir_all(log_path.parent().expect("log dir"))?;
            let log = fs::File::create(&log_path)?;
            Ok((state, out, log))
        })();
        let (state, out, log) = match prepared {
            Ok(x) => {
                crate::fault::point("attempt-started");
                x
            }
            Err(e) => {
                return Attempt::Failed {
                    error: format!("cannot prepare the stage's work directory: {e}"),
                    log: None,
                }
            }
        };
        let mut cx = StageContext {
            stage_id: def.id.clone(),
            key: self.key.clone(),
            inputs: self.resolved.paths.clone(),
            out_dir: out.clone(),
            work_dir: state,
            base_dir: self.base_dir.clone(),
            log_path: log_path.clone(),
            log: Arc::new(Mutex::new(log)),
            cancel: self.cancel.clone(),
            progress: self.progress.clone(),
            metrics: None,
        };
        cx.log(&format!(
            "# pipe: stage `{}` ({} v{}) key {} started {stamp}",
            def.id, def.kind, def.kind_version, self.key
        ));
        let t = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| def.stage.run(&mut cx)));
        let wall = t.elapsed();
        let log = Some(log_path.clone());
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is::<Interrupted>() => {
                cx.log("# pipe: interrupted; work state kept for the next run");
                return Attempt::Interrupted { log };
            }
            Ok(Err(e)) => {
                let error = format!("{e:#}");
                cx.log(&format!("# pipe: failed: {error}"));
                return Attempt::Failed { error, log };
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                let error = format!(
                    "the `{}` stage kind crashed (a bug in pipe): {msg}",
                    def.kind
                );
                cx.log(&format!("# pipe: {error}"));
                return Attempt::Failed { error, log };
            }
        }
        let finished = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key: self.key.clone(),
            pipeline: self.pipeline.clone(),
            stage: def.id.clone(),
            kind: def.kind.to_string(),
            kind_version: def.kind_version,
            params: def.params.clone(),
            inputs: self.resolved.inputs.clone(),
            outputs: Vec::new(),
            outputs_digest: String::new(),
            started: stamp,
            finished,
            wall_s: wall.as_secs_f64(),
            metrics: cx.metrics.take(),
            log: log_rel,
        };
        if let Some(outs) = def.stage.outputs() {
            if let Some(missing) = outs.iter().find(|o| !out.join(o).exists()) {
                let error = format!(
                    "the stage finished but did not produce its declared output `{missing}`"
                );
                cx.log(&format!("# pipe: {error}"));
                return Attempt::Failed { error, log };
            }
        }
        match self.store.commit(&out, manifest) {
            Ok(m) => {
                cx.log("# pipe: committed");
                let m = Box::new(m);
                let _ = fs::remove_dir_all(self.store.work_dir(&self.key));
                Attempt::Done(m)
            }
            Err(e) => Attempt::Failed {
                error: format!("cannot store the outputs: {e}"),
                log,
            },
        }
    }
}
