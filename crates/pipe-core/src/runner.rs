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
use crate::graph::{Dag, Plan as SelectionPlan, Selection};
use crate::key::{diff, Change, KeyFields, KeyRecipe};
use crate::kind::{InputSource, Interrupted, NoProgress, Progress, StageContext, StageNode};
use crate::lock::WorkspaceLock;
use crate::remote::{Pushed, RemoteCache, Transfers};
use crate::resources::{Grant, Ledger, Machine};
use crate::slurm::{self, Executor, JobRecord, SlurmOptions, StageCommand};
use crate::spec::Pipeline;
use crate::store::{
    Damage, Entry, InputRecord, Manifest, RunRecord, StageRef, Store, MANIFEST_FORMAT,
};

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
    /// What the machine offers stages' `resources:` (default: detected).
    pub machine: Option<Machine>,
    /// How a Slurm job runs one stage (`pipe run-stage`); required by `executor: slurm`.
    pub stage_command: Option<StageCommand>,
}

/// How a stage ended in a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Cached,
    /// Its result was in the remote cache and is now in the local store.
    Pulled,
    Done,
    Failed(String),
    /// Not run: an upstream stage failed, the run was interrupted, or it was not selected.
    Skipped(Skip),
    Interrupted,
}

/// Why a stage did not run.
#[derive(Debug, Clone, PartialEq)]
pub enum Skip {
    /// Not selected (`--only`/`--until`) and not in the cache.
    NotSelected,
    /// It reads this stage, which was not selected and is not in the cache.
    ReadsUnselected(String),
    /// It reads this stage, which did not complete.
    UpstreamFailed(String),
    /// The run was interrupted before it started.
    Interrupted,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::NotSelected => write!(f, "not selected"),
            Skip::ReadsUnselected(up) => write!(
                f,
                "it reads `{up}`, which is not selected and not in the cache (run it first, or widen the selection)"
            ),
            Skip::UpstreamFailed(up) => write!(f, "upstream stage `{up}` did not complete"),
            Skip::Interrupted => write!(f, "the run was interrupted before it started"),
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
    /// Why it ran (stages that ran).
    pub why: Option<Why>,
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
            why: None,
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

    fn because(self, why: Why) -> Self {
        Outcome {
            why: Some(why),
            ..self
        }
    }
}

#[derive(Debug)]
pub struct RunSummary {
    pub pipeline: String,
    /// In the pipeline's dependency order.
    pub outcomes: Vec<Outcome>,
    pub interrupted: bool,
    pub wall: Duration,
    /// What moved to and from the remote cache, when there is one.
    pub transfers: Option<Transfers>,
}

impl RunSummary {
    /// True when every selected stage is in the cache now.
    pub fn ok(&self) -> bool {
        !self.interrupted
            && self.outcomes.iter().all(|o| {
                matches!(
                    o.status,
                    Status::Cached
                        | Status::Pulled
                        | Status::Done
                        | Status::Skipped(Skip::NotSelected)
                )
            })
    }

    /// The stages that ran because their last result was made by a pipe with another cache
    /// format, and that format.
    pub fn other_format(&self) -> Vec<(&str, u32)> {
        self.outcomes
            .iter()
            .filter_map(|o| match o.why {
                Some(Why::OtherFormat(f)) => Some((o.stage.as_str(), f)),
                _ => None,
            })
            .collect()
    }
}

/// What the run loop reports as it goes, to whoever shows it (the binary's live view).
pub trait Observer: Sync {
    /// Stage `stage` starts an attempt; it reports its progress to the returned sink.
    fn started(&self, _stage: &str) -> Arc<dyn Progress> {
        Arc::new(NoProgress)
    }
    /// A stage ended, as `outcome` says.
    fn finished(&self, _outcome: &Outcome) {}
    /// A stage that had finished in this run must be made again, and why.
    fn again(&self, _stage: &str, _why: &str) {}
}

/// An observer that shows nothing.
pub struct Unobserved;
impl Observer for Unobserved {}

/// Why a stage must run (or would, were it selected).
#[derive(Debug, Clone, PartialEq)]
pub enum Why {
    /// `--force`d.
    Forced,
    /// No result of this stage was ever recorded in this store.
    NeverRun,
    /// Its key changed since its last result: what changed.
    Changed(Vec<Change>),
    /// Its last result is gone from the store (garbage-collected or invalidated).
    Missing,
    /// Its last result was made by a pipe with this other cache format, which is never reused.
    OtherFormat(u32),
    /// Its entry is in the store, but the bytes of outputs are not the recorded ones: a run
    /// discards and re-makes it.
    Damaged(Vec<Damage>),
}

/// What the engine does with a stage whose key is known. [`Engine::decide`] makes it, for
/// `run`, `run --dry-run` and `status` alike.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Its result is in the store, intact: reuse it.
    Reuse(Box<Manifest>),
    /// Its result is in the remote cache (this manifest): pull it.
    Pull(Box<Manifest>),
    /// Run it.
    Run(Why),
    /// Not selected and not reusable: leave it out of this run (it would run because of this).
    LeaveOut(Why),
}

/// What `--dry-run` and `status` say of a stage.
#[derive(Debug, Clone)]
pub enum PlanState {
    Decided(Decision),
    /// Its key depends on outputs of these upstream stages, which are not in the cache yet: it
    /// runs after them only if their outputs change.
    WaitsOn(Vec<String>),
    /// Its key cannot be computed (an input cannot be read).
    Error(String),
}

#[derive(Debug, Clone)]
pub struct PlanRow {
    pub stage: String,
    pub kind: String,
    pub state: PlanState,
    pub key: Option<String>,
    /// What the stage itself wants said (e.g. an unpinned source).
    pub notes: Vec<String>,
}

/// Which way `pipe pull` / `pipe push` move entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Pull,
    Push,
}

/// What `pipe pull` / `pipe push` did with one stage's current result.
#[derive(Debug, Clone, PartialEq)]
pub enum Synced {
    /// Pull: the local store has it already.
    Local,
    Pulled,
    Pushed(Pushed),
    /// Not in the store it would come from (pull: the remote; push: the local store).
    Absent,
    /// Its key depends on outputs of these stages, which neither store holds.
    WaitsOn(Vec<String>),
    Failed(String),
}

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
    remote: Option<Arc<RemoteCache>>,
}

impl<'p> Engine<'p> {
    pub fn new(pipeline: &'p Pipeline, store: Store) -> Self {
        let memo = HashMemo::load(&store.memo_path());
        Engine {
            dag: Dag::new(pipeline),
            pipeline,
            store,
            memo,
            remote: None,
        }
    }

    /// Consults `remote` on local misses, and pushes what runs to it (unless it is read-only).
    pub fn with_remote(mut self, remote: Option<Arc<RemoteCache>>) -> Self {
        self.remote = remote;
        self
    }

    pub fn remote(&self) -> Option<&RemoteCache> {
        self.remote.as_deref()
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
                fields: s.fields.clone(),
                inputs: digests,
            },
            inputs,
            paths,
        }))
    }

    /// The one decision: what to do with stage `i`, whose recipe is `recipe`, in a run with
    /// this selection. A forced stage runs; else an intact stored result is reused; else one in
    /// the remote cache is pulled; else the stage runs if it is selected, and is left out if
    /// not — with the reason it would run.
    pub fn decide(&self, i: usize, recipe: &KeyRecipe, selection: &SelectionPlan) -> Decision {
        let selected = selection.selected.contains(&i);
        if selected && selection.forced.contains(&i) {
            return Decision::Run(Why::Forced);
        }
        let key = recipe.key();
        let why = match self.store.lookup(&key) {
            Some(m) => {
                let damage = self.store.damage(&m);
                if damage.is_empty() {
                    return Decision::Reuse(Box::new(m));
                }
                Why::Damaged(damage)
            }
            None => {
                if let Some(m) = self.remote.as_ref().and_then(|r| r.lookup(&key)) {
                    return Decision::Pull(Box::new(m));
                }
                self.why_not_stored(&self.pipeline.stages[i].id, recipe)
            }
        };
        if selected {
            Decision::Run(why)
        } else {
            Decision::LeaveOut(why)
        }
    }

    /// Why a stage has no stored result for `now`: never run, its last result gone or of
    /// another format, or what changed since its last result.
    fn why_not_stored(&self, stage: &str, now: &KeyRecipe) -> Why {
        let Some(r) = self.store.read_ref(&self.pipeline.name, stage) else {
            return Why::NeverRun;
        };
        let m = match self.store.entry(&r.key) {
            Entry::Current(m) => m,
            Entry::OtherFormat(format) => return Why::OtherFormat(format),
            Entry::Unreadable => return Why::Missing,
        };
        let before = KeyRecipe {
            kind: m.kind,
            kind_version: m.kind_version,
            fields: KeyFields::from_json(m.fields),
            inputs: m.inputs.into_iter().map(|(k, v)| (k, v.digest)).collect(),
        };
        let changes = diff(&before, now);
        if changes.is_empty() {
            Why::Missing
        } else {
            Why::Changed(changes)
        }
    }

    /// The first input of stage `i` read from a stored entry whose bytes are damaged: that
    /// upstream stage, and what is wrong.
    fn damaged_input(
        &self,
        i: usize,
        done: &HashMap<usize, Manifest>,
    ) -> Option<(usize, Vec<Damage>)> {
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

    /// The stages that stage `i` reads and that have no result in `done` yet.
    fn waiting_on(&self, i: usize, done: &HashMap<usize, Manifest>) -> Vec<String> {
        self.dag
            .upstream(i)
            .into_iter()
            .filter(|u| !done.contains_key(u))
            .map(|u| self.pipeline.stages[u].id.clone())
            .collect()
    }

    /// What a run with `selection` would do, stage by stage, without running anything: the
    /// same [`Engine::decide`] as the run, for every stage whose key is known now.
    pub fn plan(&mut self, selection: &Selection) -> Result<Vec<PlanRow>, String> {
        let selection = selection.plan(self.pipeline, &self.dag)?;
        let mut done: HashMap<usize, Manifest> = HashMap::new();
        let mut rows = Vec::new();
        for i in self.dag.order() {
            let s = &self.pipeline.stages[i];
            let (state, key) = match self.resolve(i, &done) {
                Err(e) => (PlanState::Error(e), None),
                Ok(None) => (PlanState::WaitsOn(self.waiting_on(i, &done)), None),
                Ok(Some(r)) => {
                    let decision = self.decide(i, &r.recipe, &selection);
                    // A result in the remote counts as one here: what reads it gets its key.
                    if let Decision::Reuse(m) | Decision::Pull(m) = &decision {
                        done.insert(i, (**m).clone());
                    }
                    (PlanState::Decided(decision), Some(r.recipe.key()))
                }
            };
            rows.push(PlanRow {
                stage: s.id.clone(),
                kind: s.kind.to_string(),
                state,
                key,
                notes: s.stage.notes(),
            });
        }
        let _ = self.memo.save();
        Ok(rows)
    }

    /// `pipe pull` / `pipe push`: moves the current result of each of `stages` (every stage
    /// when empty) between the local store and the remote cache. The keys of later stages are
    /// computed from whichever store holds the earlier ones (their manifests only: nothing is
    /// moved that was not asked for).
    pub fn sync(
        &mut self,
        direction: Direction,
        stages: &[String],
        progress: &dyn Progress,
    ) -> anyhow::Result<Vec<(String, Synced)>> {
        let Some(remote) = self.remote.clone() else {
            anyhow::bail!(
                "no remote cache is configured (use --remote URL, PIPE_REMOTE, or `pipe remote set URL`)"
            );
        };
        if direction == Direction::Push && !remote.writable() {
            anyhow::bail!(
                "the remote cache {} is read-only: pipe pulls from it and never pushes",
                remote.location()
            );
        }
        if let Some(unknown) = stages.iter().find(|s| self.pipeline.index(s).is_none()) {
            let ids: Vec<&str> = self.pipeline.stages.iter().map(|s| s.id.as_str()).collect();
            anyhow::bail!(
                "the pipeline has no stage `{unknown}` (stages: {})",
                ids.join(", ")
            );
        }
        let _lock = WorkspaceLock::acquire(&self.store.root)?;
        let mut done: HashMap<usize, Manifest> = HashMap::new();
        let mut rows = Vec::new();
        for i in self.dag.order() {
            let id = self.pipeline.stages[i].id.clone();
            let asked = stages.is_empty() || stages.contains(&id);
            let synced = match self.resolve(i, &done) {
                Err(e) => Synced::Failed(e),
                Ok(None) => Synced::WaitsOn(self.waiting_on(i, &done)),
                Ok(Some(r)) => {
                    let key = r.recipe.key();
                    let local = self
                        .store
                        .lookup(&key)
                        .filter(|m| self.store.damage(m).is_empty());
                    match (direction, local) {
                        (Direction::Pull, Some(m)) => {
                            done.insert(i, m);
                            Synced::Local
                        }
                        (Direction::Push, Some(m)) => {
                            let synced = if asked {
                                match remote.push(&self.store, &m, progress) {
                                    Ok(p) => {
                                        let _ = self.store.set_push_pending(&key, false);
                                        Synced::Pushed(p)
                                    }
                                    Err(e) => Synced::Failed(e.to_string()),
                                }
                            } else {
                                Synced::Local
                            };
                            done.insert(i, m);
                            synced
                        }
                        (direction, None) => match remote.lookup(&key) {
                            Some(m) if asked && direction == Direction::Pull => {
                                let synced = match remote.pull(&self.store, &m, progress) {
                                    Ok(local) => {
                                        self.store.write_ref(
                                            &self.pipeline.name,
                                            &id,
                                            &StageRef {
                                                key: key.clone(),
                                                finished: local.finished.clone(),
                                            },
                                        )?;
                                        Synced::Pulled
                                    }
                                    Err(e) => Synced::Failed(e.to_string()),
                                };
                                done.insert(i, m);
                                synced
                            }
                            Some(m) => {
                                done.insert(i, m);
                                Synced::Absent
                            }
                            None if !remote.reachable() => Synced::Failed(format!(
                                "the remote cache {} cannot be reached",
                                remote.location()
                            )),
                            None => Synced::Absent,
                        },
                    }
                }
            };
            if asked {
                rows.push((id, synced));
            }
        }
        let _ = self.memo.save();
        Ok(rows)
    }

    /// `pipe run-stage`, what a Slurm job runs on its compute node: stage `id`, whose key
    /// must be `key` (the pipeline and its inputs unchanged since the job was submitted),
    /// with its upstream results read from the store, run here and committed. The log goes
    /// to `log` (appended); progress to `progress`. Takes no workspace lock: the submitting
    /// run holds it.
    ///
    /// With `node`, this process is one node of a stage that runs on several: node 0 runs and
    /// commits it as above; any other node runs it beside node 0 (reading the same work
    /// directory) and commits nothing.
    pub fn run_stage(
        &mut self,
        id: &str,
        key: &str,
        log: PathBuf,
        cancel: Arc<AtomicBool>,
        progress: Arc<dyn Progress>,
        node: Option<StageNode>,
    ) -> anyhow::Result<Status> {
        let (i, resolved) = self.resolve_with_stored_inputs(id)?;
        let now = resolved.recipe.key();
        if now != key {
            anyhow::bail!(
                "stage `{id}` has key {now} here, but the job was submitted for key {key}: the pipeline file or the stage's inputs changed since; run `pipe run` again"
            );
        }
        let def = &self.pipeline.stages[i];
        let job = Job {
            store: self.store.clone(),
            remote: None,
            pull: None,
            run_if_not_pulled: true,
            gpus: Vec::new(),
            pipeline: self.pipeline.name.clone(),
            base_dir: self.pipeline.base_dir.clone(),
            stage_index: i,
            key: key.to_string(),
            resolved,
            cancel,
            progress,
            stage_command: None,
        };
        if let Some(node) = node.as_ref().filter(|n| n.rank > 0) {
            return job.run_as_other_node(def, log, node.clone());
        }
        let status = match job.run_here(def, Some(log), node) {
            Attempt::Done(_) | Attempt::Pulled(_) => Status::Done,
            Attempt::Failed { error, .. } => Status::Failed(error),
            Attempt::Interrupted { .. } => Status::Interrupted,
            Attempt::NotPulled => Status::Skipped(Skip::NotSelected),
        };
        let _ = self.memo.save();
        Ok(status)
    }

    /// The key stage `id` has now, for `pipe run-stage` started by hand.
    pub fn key_of(&mut self, id: &str) -> anyhow::Result<String> {
        Ok(self.resolve_with_stored_inputs(id)?.1.recipe.key())
    }

    /// Stage `id` resolved against the results of its inputs in the store.
    fn resolve_with_stored_inputs(&mut self, id: &str) -> anyhow::Result<(usize, Resolved)> {
        let Some(i) = self.pipeline.index(id) else {
            anyhow::bail!("the pipeline has no stage `{id}`");
        };
        // Only what it depends on: other stages' inputs need not be read (hashed) here.
        let ancestors = self.dag.ancestors(i);
        let mut done: HashMap<usize, Manifest> = HashMap::new();
        for j in self.dag.order() {
            if j == i || !ancestors.contains(&j) {
                continue;
            }
            if let Ok(Some(r)) = self.resolve(j, &done) {
                if let Some(m) = self.store.lookup(&r.recipe.key()) {
                    done.insert(j, m);
                }
            }
        }
        let resolved = match self.resolve(i, &done) {
            Ok(Some(r)) => r,
            Ok(None) => anyhow::bail!(
                "stage `{id}` reads {}, whose results are not in the store {}: is it on a file system this node shares?",
                self.waiting_on(i, &done).iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "),
                self.store.root.display()
            ),
            Err(e) => anyhow::bail!("stage `{id}`: {e}"),
        };
        Ok((i, resolved))
    }

    /// Runs the pipeline. Takes the workspace lock for the duration; reports each stage's
    /// progress and end to `observer`.
    pub fn run(
        &mut self,
        opts: &RunOptions,
        cancel: Arc<AtomicBool>,
        observer: &dyn Observer,
    ) -> anyhow::Result<RunSummary> {
        let _lock = WorkspaceLock::acquire(&self.store.root)?;
        let t0 = Instant::now();
        let selection = opts
            .selection
            .plan(self.pipeline, &self.dag)
            .map_err(|e| anyhow::anyhow!(e))?;
        let machine = opts.machine.clone().unwrap_or_else(Machine::detect);
        let mut run = RunLoop::new(self, selection, opts.jobs.max(1), machine, observer)?;
        run.stage_command = opts.stage_command.clone();
        let stop = run.stop.clone();
        let (tx, rx) = mpsc::channel::<(usize, Attempt)>();
        std::thread::scope(|scope| -> anyhow::Result<()> {
            loop {
                if cancel.load(Ordering::SeqCst) {
                    stop.store(true, Ordering::SeqCst);
                }
                let mut progressed = false;
                for i in run.order.clone() {
                    if run.outcomes[i].is_some() || run.running.contains_key(&i) {
                        continue;
                    }
                    match run.step(i)? {
                        Step::Wait => {}
                        Step::Progressed => progressed = true,
                        Step::Start(job) => {
                            let tx = tx.clone();
                            let pipeline = run.engine.pipeline;
                            scope.spawn(move || {
                                let attempt = job.attempt(pipeline);
                                let _ = tx.send((job.stage_index, attempt));
                            });
                            progressed = true;
                        }
                    }
                }
                if run.outcomes.iter().all(Option::is_some) {
                    break;
                }
                if progressed {
                    continue;
                }
                // Nothing could start: wait for a running stage (or a signal).
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok((i, attempt)) => run.collect(i, attempt)?,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        unreachable!("the coordinator holds a sender")
                    }
                }
            }
            Ok(())
        })?;
        let summary = run.finish(stop.load(Ordering::SeqCst), t0.elapsed());
        tracing::debug!(
            "read {} bytes of external inputs to hash them",
            self.memo.bytes_hashed
        );
        let _ = self.memo.save();
        Ok(summary)
    }
}

/// What the coordinator did with a stage in one pass.
enum Step {
    /// Nothing yet: its upstream stages are still running, or no job slot is free.
    Wait,
    /// It ended (cached, skipped, failed) or a damaged input was sent back to be re-made.
    Progressed,
    /// Start this attempt on a worker thread.
    Start(Box<Job>),
}

/// The state of one run: what has ended, what runs, and the run's record.
struct RunLoop<'e, 'p> {
    engine: &'e mut Engine<'p>,
    selection: SelectionPlan,
    observer: &'e dyn Observer,
    jobs: usize,
    order: Vec<usize>,
    outcomes: Vec<Option<Outcome>>,
    /// Stages whose result is in the store: their manifests.
    done: HashMap<usize, Manifest>,
    /// Stage → (key, why it runs (None: only pulled), when it started).
    running: HashMap<usize, (String, Option<Why>, Instant)>,
    /// What the running stages hold of the machine, and each one's share.
    ledger: Ledger,
    grants: HashMap<usize, Grant>,
    /// Stages whose entry was found damaged and discarded in this run: each is re-made once.
    remade: HashSet<usize>,
    record: RunRecord,
    /// Set once the run is asked to stop: running stages save their state, none starts.
    stop: Arc<AtomicBool>,
    stage_command: Option<StageCommand>,
}

impl<'e, 'p> RunLoop<'e, 'p> {
    fn new(
        engine: &'e mut Engine<'p>,
        selection: SelectionPlan,
        jobs: usize,
        machine: Machine,
        observer: &'e dyn Observer,
    ) -> anyhow::Result<Self> {
        let n = engine.pipeline.stages.len();
        // Written now and as stages start or hit, so that a killed run leaves its record too
        // (gc keeps what it used, and the work dirs it would resume from).
        let record = RunRecord {
            pipeline: engine.pipeline.name.clone(),
            started: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            keys: BTreeMap::new(),
            finished: false,
        };
        engine.store.record_run(&record)?;
        Ok(RunLoop {
            order: engine.dag.order(),
            engine,
            selection,
            observer,
            jobs,
            outcomes: vec![None; n],
            done: HashMap::new(),
            running: HashMap::new(),
            ledger: Ledger::new(machine),
            grants: HashMap::new(),
            remade: HashSet::new(),
            record,
            stop: Arc::new(AtomicBool::new(false)),
            stage_command: None,
        })
    }

    /// Records how stage `i` ended and tells the observer.
    fn end(&mut self, i: usize, outcome: Outcome) {
        self.observer.finished(&outcome);
        self.outcomes[i] = Some(outcome);
    }

    /// Moves stage `i` on, if it can: skipped after a failed upstream stage, reused, left out,
    /// or started.
    fn step(&mut self, i: usize) -> anyhow::Result<Step> {
        let pipeline = self.engine.pipeline;
        let id = &pipeline.stages[i].id;
        let ups = self.engine.dag.upstream(i);
        if let Some(&bad) = ups
            .iter()
            .find(|u| self.outcomes[**u].is_some() && !self.done.contains_key(u))
        {
            let skip = if !self.selection.selected.contains(&i) {
                // Its upstream did not complete, but it was not asked for either.
                Skip::NotSelected
            } else {
                let up = pipeline.stages[bad].id.clone();
                match &self.outcomes[bad].as_ref().expect("finished").status {
                    Status::Skipped(Skip::NotSelected) => Skip::ReadsUnselected(up),
                    _ => Skip::UpstreamFailed(up),
                }
            };
            self.end(i, Outcome::new(id, Status::Skipped(skip)));
            return Ok(Step::Progressed);
        }
        if ups.iter().any(|u| !self.done.contains_key(u)) {
            return Ok(Step::Wait);
        }
        let resolved = match self.engine.resolve(i, &self.done) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(Step::Wait),
            Err(e) => {
                self.end(i, Outcome::new(id, Status::Failed(e)));
                return Ok(Step::Progressed);
            }
        };
        let key = resolved.recipe.key();
        // `why` is None for a stage that is only pulled, never run (not selected).
        let (why, pull) = match self.engine.decide(i, &resolved.recipe, &self.selection) {
            Decision::Reuse(m) => {
                self.reuse(i, &key, *m)?;
                return Ok(Step::Progressed);
            }
            Decision::LeaveOut(_) => {
                self.end(i, Outcome::new(id, Status::Skipped(Skip::NotSelected)));
                return Ok(Step::Progressed);
            }
            Decision::Run(why) => (Some(why), None),
            Decision::Pull(m) => {
                // Should the pull fail, a selected stage runs here instead.
                let why = self
                    .selection
                    .selected
                    .contains(&i)
                    .then(|| self.engine.why_not_stored(id, &resolved.recipe));
                (why, Some(m))
            }
        };
        if self.stop.load(Ordering::SeqCst) {
            self.end(i, Outcome::new(id, Status::Skipped(Skip::Interrupted)));
            return Ok(Step::Progressed);
        }
        // Two stages with the same recipe share one entry: the second waits. `jobs` counts
        // the stages that run here; Slurm's own scheduler decides when its jobs run.
        let local = pipeline.stages[i].executor == Executor::Local;
        let running_here = self
            .running
            .keys()
            .filter(|r| pipeline.stages[**r].executor == Executor::Local)
            .count();
        if (local && running_here >= self.jobs) || self.running.values().any(|(k, ..)| *k == key) {
            return Ok(Step::Wait);
        }
        // Its inputs are read from the store: their bytes are checked first, and a damaged
        // upstream entry is discarded and re-made before this stage runs.
        if let Some((up, damage)) = self.engine.damaged_input(i, &self.done) {
            self.remake(i, up, &key, &damage);
            return Ok(Step::Progressed);
        }
        // Last: what it needs of this machine is taken only when it starts (a Slurm job's
        // resources are Slurm's to grant).
        let resources = if local {
            pipeline.stages[i].resources.clone()
        } else {
            Default::default()
        };
        let grant = match self.ledger.take(&resources) {
            Ok(Some(grant)) => grant,
            Ok(None) => return Ok(Step::Wait),
            Err(why) => {
                let why = format!(
                    "cannot run here: {why} (resources: {})",
                    pipeline.stages[i].resources
                );
                self.end(i, Outcome::new(id, Status::Failed(why)).keyed(&key));
                return Ok(Step::Progressed);
            }
        };
        let gpus = grant.gpus.clone();
        self.grants.insert(i, grant);
        if let Some(Why::Damaged(damage)) = &why {
            self.engine.store.discard(&key, damage);
        }
        self.record.keys.insert(id.clone(), key.clone());
        self.engine.store.record_run(&self.record)?;
        let progress = self.observer.started(id);
        self.running
            .insert(i, (key.clone(), why.clone(), Instant::now()));
        Ok(Step::Start(Box::new(Job {
            store: self.engine.store.clone(),
            remote: self.engine.remote.clone(),
            pull,
            run_if_not_pulled: why.is_some(),
            gpus,
            pipeline: pipeline.name.clone(),
            base_dir: pipeline.base_dir.clone(),
            stage_index: i,
            key,
            resolved,
            cancel: self.stop.clone(),
            progress,
            stage_command: self.stage_command.clone(),
        })))
    }

    /// Stage `i`'s result is in the store: deliver it (where the stage delivers), point the
    /// pipeline's ref at it, and record it as used by this run.
    fn reuse(&mut self, i: usize, key: &str, m: Manifest) -> anyhow::Result<()> {
        let pipeline = self.engine.pipeline;
        let id = &pipeline.stages[i].id;
        let out = self.engine.store.out_dir(key);
        if let Err(e) = deliver(&pipeline.stages[i], &out) {
            let outcome = Outcome::new(id, Status::Failed(e))
                .keyed(key)
                .stored_in(out);
            self.end(i, outcome);
            return Ok(());
        }
        self.engine.store.write_ref(
            &pipeline.name,
            id,
            &StageRef {
                key: key.to_string(),
                finished: m.finished.clone(),
            },
        )?;
        self.record.keys.insert(id.clone(), key.to_string());
        self.engine.store.record_run(&self.record)?;
        if let Some(remote) = &self.engine.remote {
            if self.engine.store.push_pending(key) {
                push_entry(&self.engine.store, remote, &m, &NoProgress, &|line| {
                    tracing::info!("{id}: {}", line.trim_start_matches("# pipe: "))
                });
            }
        }
        self.done.insert(i, m);
        self.end(
            i,
            Outcome::new(id, Status::Cached).keyed(key).stored_in(out),
        );
        Ok(())
    }

    /// Stage `i` reads the damaged entry of stage `up`: discard it and send `up` back to be
    /// made again (once per run; a second time, `i` fails).
    fn remake(&mut self, i: usize, up: usize, key: &str, damage: &[Damage]) {
        let pipeline = self.engine.pipeline;
        let m = self.done.remove(&up).expect("a damaged input was done");
        self.engine.store.discard(&m.key, damage);
        if self.remade.insert(up) {
            self.observer.again(
                &pipeline.stages[up].id,
                "its stored outputs were damaged; re-making them",
            );
            self.outcomes[up] = None;
        } else {
            let why = format!(
                "the stored outputs of `{}` were damaged again after it was re-made in this run: {}",
                pipeline.stages[up].id, damage[0]
            );
            let outcome = Outcome::new(&pipeline.stages[i].id, Status::Failed(why)).keyed(key);
            self.end(i, outcome);
        }
    }

    /// An attempt of stage `i` ended on its worker thread.
    fn collect(&mut self, i: usize, attempt: Attempt) -> anyhow::Result<()> {
        let pipeline = self.engine.pipeline;
        let pulled = matches!(attempt, Attempt::Pulled(_));
        let (key, why, t) = self.running.remove(&i).expect("was running");
        if let Some(grant) = self.grants.remove(&i) {
            self.ledger.give_back(&grant);
        }
        let wall = t.elapsed();
        let id = &pipeline.stages[i].id;
        let outcome = match attempt {
            Attempt::Done(m) | Attempt::Pulled(m) => {
                let status = if pulled { Status::Pulled } else { Status::Done };
                self.engine.store.write_ref(
                    &pipeline.name,
                    id,
                    &StageRef {
                        key: key.clone(),
                        finished: m.finished.clone(),
                    },
                )?;
                let out = self.engine.store.out_dir(&key);
                let status = match deliver(&pipeline.stages[i], &out) {
                    // The outputs are stored; only their delivery failed.
                    Err(e) => Status::Failed(e),
                    Ok(()) => {
                        self.done.insert(i, *m);
                        status
                    }
                };
                Outcome::new(id, status).stored_in(out)
            }
            Attempt::Failed { error, log } => Outcome::new(id, Status::Failed(error)).logged(log),
            Attempt::Interrupted { log } => Outcome::new(id, Status::Interrupted).logged(log),
            Attempt::NotPulled => Outcome::new(id, Status::Skipped(Skip::NotSelected)),
        };
        let mut outcome = outcome.keyed(&key).took(wall);
        if let Some(why) = why.filter(|_| !pulled) {
            outcome = outcome.because(why);
        }
        self.end(i, outcome);
        Ok(())
    }

    /// The summary, in dependency order; the run's record marked finished.
    fn finish(mut self, interrupted: bool, wall: Duration) -> RunSummary {
        self.record.finished = true;
        let _ = self.engine.store.record_run(&self.record);
        let outcomes = self
            .order
            .iter()
            .map(|&i| self.outcomes[i].take().expect("every stage ends"))
            .collect();
        RunSummary {
            pipeline: self.engine.pipeline.name.clone(),
            outcomes,
            interrupted,
            wall,
            transfers: self.engine.remote.as_ref().map(|r| r.transfers()),
        }
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

enum Attempt {
    Done(Box<Manifest>),
    /// Its result was pulled from the remote cache.
    Pulled(Box<Manifest>),
    Failed {
        error: String,
        log: Option<PathBuf>,
    },
    Interrupted {
        log: Option<PathBuf>,
    },
    /// The pull failed and the stage is not selected: it does not run.
    NotPulled,
}

/// One attempt at one stage, on a worker thread: a pull from the remote cache, or a run (and
/// then a push).
/// Runs the stage kind's own code in `cx`: `Done`, `Interrupted`, or `Failed` with the error —
/// a panic included, as a bug in pipe — which is logged.
fn run_kind(def: &crate::spec::StageDef, cx: &mut StageContext) -> Status {
    match std::panic::catch_unwind(AssertUnwindSafe(|| def.stage.run(cx))) {
        Ok(Ok(())) => Status::Done,
        Ok(Err(e)) if e.is::<Interrupted>() => Status::Interrupted,
        Ok(Err(e)) => {
            let error = format!("{e:#}");
            cx.log(&format!("# pipe: failed: {error}"));
            Status::Failed(error)
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
            Status::Failed(error)
        }
    }
}

struct Job {
    store: Store,
    remote: Option<Arc<RemoteCache>>,
    /// Pull this remote entry first.
    pull: Option<Box<Manifest>>,
    /// Run the stage when there is no pull or it fails.
    run_if_not_pulled: bool,
    /// The GPU ordinals granted for its `resources:`.
    gpus: Vec<usize>,
    pipeline: String,
    base_dir: PathBuf,
    stage_index: usize,
    key: String,
    resolved: Resolved,
    cancel: Arc<AtomicBool>,
    progress: Arc<dyn Progress>,
    /// How a Slurm job runs the stage.
    stage_command: Option<StageCommand>,
}

impl Job {
    fn attempt(&self, pipeline: &Pipeline) -> Attempt {
        let def = &pipeline.stages[self.stage_index];
        if let (Some(m), Some(remote)) = (&self.pull, &self.remote) {
            match remote.pull(&self.store, m, &*self.progress) {
                Ok(local) => return Attempt::Pulled(Box::new(local)),
                Err(e) => {
                    let then = if self.run_if_not_pulled {
                        "running it here instead"
                    } else {
                        "it is not selected, so it does not run"
                    };
                    tracing::warn!(
                        "{}: cannot pull its result from {}: {e}; {then}",
                        def.id,
                        remote.location()
                    );
                    if !self.run_if_not_pulled {
                        return Attempt::NotPulled;
                    }
                }
            }
        }
        match &def.executor {
            Executor::Local => self.run_here(def, None, None),
            Executor::Slurm(options) => self.run_on_slurm(pipeline, def, options),
        }
    }

    /// A new log file's path, named for when it starts, and that time.
    fn new_log(&self) -> (PathBuf, String) {
        self.store.new_log(&self.key)
    }

    /// Runs the stage in this process and commits its outputs. Its log goes to `log`
    /// (appended: a Slurm job's output shares it) or to a new file.
    /// What the stage gets to run with: its `(out, work)` directories and its `(path, file)`
    /// log.
    fn context(
        &self,
        def: &crate::spec::StageDef,
        (out_dir, work_dir): (PathBuf, PathBuf),
        (log_path, log): (PathBuf, fs::File),
        node: Option<StageNode>,
    ) -> StageContext {
        StageContext {
            stage_id: def.id.clone(),
            key: self.key.clone(),
            inputs: self.resolved.paths.clone(),
            out_dir,
            work_dir,
            base_dir: self.base_dir.clone(),
            log_path,
            gpus: self.gpus.clone(),
            node,
            log: Arc::new(Mutex::new(log)),
            cancel: self.cancel.clone(),
            progress: self.progress.clone(),
            metrics: None,
        }
    }

    /// Runs the stage as node `node.rank` (> 0) of several: in the stage's work directory,
    /// which node 0 owns (this node only reads it), with outputs that are thrown away —
    /// node 0 writes and commits the results.
    fn run_as_other_node(
        &self,
        def: &crate::spec::StageDef,
        log_path: PathBuf,
        node: StageNode,
    ) -> anyhow::Result<Status> {
        let work = self.store.work_dir(&self.key);
        let scratch = work.join(format!("node-{}", node.rank));
        if scratch.exists() {
            fs::remove_dir_all(&scratch)?;
        }
        fs::create_dir_all(&scratch)?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cx = self.context(
            def,
            (scratch.clone(), work.join("state")),
            (log_path, log),
            Some(node.clone()),
        );
        cx.log(&format!(
            "# pipe: stage `{}` ({} v{}) key {} started as node {} of {}",
            def.id, def.kind, def.kind_version, self.key, node.rank, node.nodes
        ));
        let status = run_kind(def, &mut cx);
        let _ = fs::remove_dir_all(&scratch);
        match status {
            Status::Done => cx.log("# pipe: done; node 0 commits the results"),
            Status::Interrupted => cx.log("# pipe: interrupted"),
            _ => {}
        }
        Ok(status)
    }

    fn run_here(
        &self,
        def: &crate::spec::StageDef,
        log: Option<PathBuf>,
        node: Option<StageNode>,
    ) -> Attempt {
        let (new_log, stamp) = self.new_log();
        let log_path = log.unwrap_or(new_log);
        let log_rel = log_path
            .strip_prefix(&self.store.root)
            .unwrap_or(&log_path)
            .display()
            .to_string();
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
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)?;
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
        let mut cx = self.context(def, (out.clone(), state), (log_path.clone(), log), node);
        cx.log(&format!(
            "# pipe: stage `{}` ({} v{}) key {} started {stamp}",
            def.id, def.kind, def.kind_version, self.key
        ));
        let t = Instant::now();
        let status = run_kind(def, &mut cx);
        let wall = t.elapsed();
        let log = Some(log_path.clone());
        match status {
            Status::Interrupted => {
                cx.log("# pipe: interrupted; work state kept for the next run");
                return Attempt::Interrupted { log };
            }
            Status::Failed(error) => return Attempt::Failed { error, log },
            _ => {}
        }
        let finished = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key: self.key.clone(),
            pipeline: self.pipeline.clone(),
            stage: def.id.clone(),
            kind: def.kind.to_string(),
            kind_version: def.kind_version,
            fields: def.fields.as_json().clone(),
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
        if self.remote.as_ref().is_some_and(|r| r.writable()) {
            // Before the entry exists: a kill between its commit and its push leaves the mark.
            let _ = self.store.set_push_pending(&self.key, true);
        }
        match self.store.commit(&out, manifest) {
            Ok(m) => {
                cx.log("# pipe: committed");
                let _ = fs::remove_dir_all(self.store.work_dir(&self.key));
                self.push(&cx, &m);
                Attempt::Done(Box::new(m))
            }
            Err(e) => Attempt::Failed {
                error: format!("cannot store the outputs: {e}"),
                log,
            },
        }
    }
}

impl Job {
    /// Runs the stage as a Slurm job (see [`crate::slurm`]): re-attaches to the job a killed
    /// run left queued or running, else submits one, and tracks it to its end. A job that
    /// Slurm preempts or loses with its node is submitted again (it resumes from the
    /// stage's saved state), up to [`RESUBMITS`] times.
    fn run_on_slurm(
        &self,
        pipeline: &Pipeline,
        def: &crate::spec::StageDef,
        options: &SlurmOptions,
    ) -> Attempt {
        let work = self.store.work_dir(&self.key);
        if let Err(e) = fs::create_dir_all(work.join("state")) {
            return Attempt::Failed {
                error: format!("cannot prepare the stage's work directory: {e}"),
                log: None,
            };
        }
        if self.remote.as_ref().is_some_and(|r| r.writable()) {
            // Set before the compute node commits: see `attempt`.
            let _ = self.store.set_push_pending(&self.key, true);
        }
        let mut attach = slurm::read_record(&work)
            .filter(|r| matches!(slurm::query(&r.job_id), Ok(Some(state)) if !state.ended()));
        let mut resubmits = 0;
        loop {
            let record = match attach.take() {
                Some(record) => {
                    slurm::append_to_log(
                        &record.log,
                        &format!(
                            "# pipe: re-attached to Slurm job {} (submitted {})",
                            record.job_id, record.submitted
                        ),
                    );
                    tracing::info!("{}: re-attached to Slurm job {}", def.id, record.job_id);
                    record
                }
                None => match self.submit(pipeline, def, options, &work) {
                    Ok(record) => record,
                    Err((error, log)) => return Attempt::Failed { error, log },
                },
            };
            let log = Some(record.log.clone());
            let mut last = slurm::ProgressState::default();
            let mut shown = String::new();
            let progress_file = slurm::progress_path(&work);
            let ended = slurm::track(
                &record.job_id,
                options,
                &record.log,
                &self.cancel,
                |state| {
                    if state.state == "RUNNING" {
                        slurm::relay_progress(&progress_file, &*self.progress, &mut last);
                    } else {
                        let said = format!("Slurm job {}: {state}", record.job_id);
                        if said != shown {
                            self.progress.set_message(said.clone());
                            shown = said;
                        }
                    }
                },
            );
            match ended {
                slurm::Ended::Completed => {
                    let _ = fs::remove_file(slurm::record_path(&work));
                    return match self.store.lookup(&self.key) {
                        Some(m) => {
                            if let Some(remote) = &self.remote {
                                push_entry(&self.store, remote, &m, &*self.progress, &|line| {
                                    slurm::append_to_log(&record.log, line)
                                });
                            }
                            Attempt::Done(Box::new(m))
                        }
                        None => Attempt::Failed {
                            error: format!(
                                "Slurm job {} completed, but the stage's result is not in the store {}: the store must be on a file system that the compute nodes share (see the log)",
                                record.job_id,
                                self.store.root.display()
                            ),
                            log,
                        },
                    };
                }
                slurm::Ended::Lost(why) if resubmits < RESUBMITS => {
                    resubmits += 1;
                    let line = format!(
                        "{why}; submitting it again ({resubmits} of {RESUBMITS}): it resumes from its saved state"
                    );
                    slurm::append_to_log(&record.log, &format!("# pipe: {line}"));
                    tracing::warn!("{}: {line}", def.id);
                }
                slurm::Ended::Lost(why) => {
                    let _ = fs::remove_file(slurm::record_path(&work));
                    return Attempt::Failed {
                        error: format!(
                            "{why}, after {RESUBMITS} resubmissions; not submitted again"
                        ),
                        log,
                    };
                }
                slurm::Ended::Interrupted => {
                    let _ = fs::remove_file(slurm::record_path(&work));
                    return Attempt::Interrupted { log };
                }
                slurm::Ended::Failed(error) => {
                    let _ = fs::remove_file(slurm::record_path(&work));
                    return Attempt::Failed { error, log };
                }
            }
        }
    }

    /// Writes the batch script into the work dir, submits it and records the job there. The
    /// job's output is the stage's new log. On failure: what went wrong, and the log if any.
    fn submit(
        &self,
        pipeline: &Pipeline,
        def: &crate::spec::StageDef,
        options: &SlurmOptions,
        work: &std::path::Path,
    ) -> Result<JobRecord, (String, Option<PathBuf>)> {
        let Some(command) = &self.stage_command else {
            return Err((
                "this stage runs on Slurm, but this program cannot start `pipe run-stage` on a compute node".into(),
                None,
            ));
        };
        let (log, stamp) = self.new_log();
        let io = |e: std::io::Error| (format!("cannot prepare the Slurm job: {e}"), None);
        fs::create_dir_all(log.parent().expect("log dir")).map_err(io)?;
        let file = pipeline
            .file
            .canonicalize()
            .unwrap_or_else(|_| pipeline.file.clone());
        let mut argv = vec![command.program.display().to_string()];
        argv.extend(command.args.iter().cloned());
        argv.extend([
            file.display().to_string(),
            "--stage".into(),
            def.id.clone(),
            "--key".into(),
            self.key.clone(),
            "--log".into(),
            log.display().to_string(),
        ]);
        for o in &pipeline.overrides {
            argv.extend(["--set".to_string(), o.clone()]);
        }
        let script = work.join("slurm-job.sh");
        let comment = format!(
            "pipe: stage `{}` of pipeline `{}`, key {}",
            def.id, pipeline.name, self.key
        );
        let nodes = def.stage.nodes();
        fs::write(&script, slurm::batch_script(&comment, &argv, nodes)).map_err(io)?;
        let mut args = options.sbatch_args(&def.resources);
        if nodes > 1 {
            args[0] = format!("--nodes={nodes}");
            args.insert(1, "--ntasks-per-node=1".into());
        }
        let cwd = std::env::current_dir().unwrap_or_else(|_| pipeline.base_dir.clone());
        args.splice(
            0..0,
            [
                format!("--job-name=pipe:{}:{}", pipeline.name, def.id),
                format!("--output={}", log.display()),
                "--open-mode=append".into(),
                // Preempted jobs go back to the queue and resume from the saved state.
                "--requeue".into(),
                format!("--chdir={}", cwd.display()),
            ],
        );
        slurm::append_to_log(
            &log,
            &format!(
                "# pipe: stage `{}` ({} v{}) key {} submitted to Slurm {stamp}: sbatch {}",
                def.id,
                def.kind,
                def.kind_version,
                self.key,
                args.join(" ")
            ),
        );
        let job_id = slurm::submit(&script, &args).map_err(|e| {
            slurm::append_to_log(&log, &format!("# pipe: failed: {e}"));
            (e, Some(log.clone()))
        })?;
        let record = JobRecord {
            job_id,
            log: log.clone(),
            submitted: stamp,
        };
        slurm::write_record(work, &record).map_err(|e| {
            let _ = slurm::cancel(&record.job_id);
            (
                format!(
                    "cannot record Slurm job {} (cancelled it): {e}",
                    record.job_id
                ),
                Some(log.clone()),
            )
        })?;
        slurm::append_to_log(&log, &format!("# pipe: Slurm job {}", record.job_id));
        tracing::info!("{}: submitted to Slurm as job {}", def.id, record.job_id);
        Ok(record)
    }

    /// Pushes the committed entry `m` to the remote cache, if there is a writable one; a
    /// failure is reported, never a failure of the stage.
    fn push(&self, cx: &StageContext, m: &Manifest) {
        let Some(remote) = self.remote.as_ref() else {
            return;
        };
        push_entry(&self.store, remote, m, &*self.progress, &|line| {
            cx.log(line)
        });
    }
}

/// Pushes the complete local entry `m` to `remote` if it is writable and reachable, and clears
/// its pending mark once the manifest is written (the mark is set before the entry's commit,
/// so a run that reuses an entry whose push was cut short pushes it). A failure is reported,
/// never a failure of the stage.
fn push_entry(
    store: &Store,
    remote: &RemoteCache,
    m: &Manifest,
    progress: &dyn Progress,
    log: &dyn Fn(&str),
) {
    if !remote.writable() || !remote.reachable() {
        return;
    }
    match remote.push(store, m, progress) {
        Ok(p) => {
            let _ = store.set_push_pending(&m.key, false);
            log(&format!(
                "# pipe: pushed to {}: {} ({} bytes){}",
                remote.location(),
                plural(p.objects, "object"),
                p.bytes,
                if p.manifest_written {
                    ""
                } else {
                    "; the remote had this entry already"
                }
            ));
        }
        Err(e) => {
            log(&format!(
                "# pipe: push to {} failed: {e}",
                remote.location()
            ));
            if let crate::remote::RemoteError::Failed(e) = e {
                tracing::warn!(
                    "{}: cannot push its result to {}: {e}",
                    m.stage,
                    remote.location()
                );
            }
        }
    }
}

/// How many times one attempt submits a job again after Slurm preempted or lost it.
const RESUBMITS: usize = 3;

fn plural(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}
