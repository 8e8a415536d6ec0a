//! The stage-kind interface. Every kind (`download`, `command`, …) implements [`StageKind`];
//! the engine knows nothing else about them. A [`Registry`] lists the kinds a binary offers.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;

use crate::diag::{FieldError, FieldPath, Target};
use crate::key::KeyFields;

/// Where one input of a stage comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputSource {
    /// An artifact of another stage: all its outputs, or one named output (`stage.output`).
    Stage {
        stage: String,
        output: Option<String>,
    },
    /// A file or directory outside the store, resolved against the pipeline file's directory.
    Path(PathBuf),
}

/// A named input of a configured stage. Its digest (not its location) enters the cache key.
#[derive(Debug, Clone)]
pub struct Input {
    /// The name the key and `status --explain` use, e.g. `input` or `data/raw.csv`.
    pub name: String,
    pub source: InputSource,
    /// The field that declared it, to locate errors such as a reference to an unknown stage.
    pub field: FieldPath,
}

/// What a kind's parser sees: the stage's fields (without `kind`), and the other stage ids so
/// that it can tell a reference (`prep.data`) from a path.
pub struct ParseContext<'a> {
    pub stage_id: &'a str,
    /// Where the stage's mapping sits in the document (`stages.<id>`).
    pub path: FieldPath,
    pub stage_ids: &'a [String],
    /// The directory relative paths are resolved against (the pipeline file's).
    pub base_dir: &'a Path,
    /// Where pipe runs and keeps its store: places no stage may deliver over.
    pub workspace: &'a Workspace,
}

impl ParseContext<'_> {
    /// Deserialises the stage's fields into a kind's typed, `deny_unknown_fields` struct,
    /// keeping the path of any error so it can be located in the file.
    pub fn fields<T: DeserializeOwned>(&self, fields: serde_yaml::Value) -> Result<T, FieldError> {
        serde_path_to_error::deserialize(fields).map_err(|e| FieldError::from_serde(&self.path, e))
    }

    /// Reads a reference string: `stage` or `stage.output` when `stage` is an id in this
    /// pipeline, else `None`.
    pub fn as_stage_ref(&self, text: &str) -> Option<InputSource> {
        let (stage, output) = match text.split_once('.') {
            Some((s, o)) => (s, Some(o.to_string())),
            None => (text, None),
        };
        if self.stage_ids.iter().any(|id| id == stage) {
            Some(InputSource::Stage {
                stage: stage.to_string(),
                output: output.filter(|o| !o.is_empty()),
            })
        } else {
            None
        }
    }

    /// Reads a field that must name a stage (`prompts`) or one of its outputs (`prompts.train`).
    pub fn stage_ref(&self, field: &FieldPath, text: &str) -> Result<InputSource, FieldError> {
        match self.as_stage_ref(text) {
            Some(InputSource::Stage { stage, .. }) if stage == self.stage_id => {
                Err(FieldError::new(
                    field.clone(),
                    Target::Value,
                    format!("stage `{stage}` cannot read its own outputs"),
                ))
            }
            Some(r) => Ok(r),
            None => {
                let stage = text.split('.').next().unwrap_or(text);
                Err(FieldError::new(
                    field.clone(),
                    Target::Value,
                    format!("unknown stage `{stage}`"),
                )
                .with_help(format!(
                    "stages in this pipeline: {}",
                    self.stage_ids.join(", ")
                )))
            }
        }
    }

    /// Resolves a path written in the pipeline against the pipeline file's directory.
    pub fn resolve_path(&self, text: &str) -> PathBuf {
        let p = Path::new(text.strip_prefix("file://").unwrap_or(text));
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Resolves the path of a delivery field (`to:`) and refuses the places a delivery would
    /// destroy: the store or anything inside it, and the directory that holds (or is an
    /// ancestor of) the store, the directory pipe runs in, the pipeline file, or the home
    /// directory. `/` is an ancestor of all of them.
    pub fn delivery_target(&self, field: &str, text: &str) -> Result<PathBuf, FieldError> {
        let target = normalize(&self.resolve_path(text));
        let store = normalize(&self.workspace.store);
        let refuse = |what: String| {
            Err(self
                .error(field, format!("`{field}: {text}` {what}"))
                .with_help(format!(
                    "point `{field}:` at a directory of its own, such as `exported/{}`; pipe replaces only a directory it delivered itself",
                    self.stage_id
                )))
        };
        if target.starts_with(&store) && target != store {
            return refuse(format!(
                "is inside the store ({}), which pipe alone manages",
                store.display()
            ));
        }
        let mut protected = vec![
            (store, "the store"),
            (normalize(self.base_dir), "the pipeline file's directory"),
            (
                normalize(&self.workspace.root),
                "the directory pipe runs in",
            ),
        ];
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            protected.push((normalize(Path::new(&home)), "the home directory"));
        }
        if let Some((place, name)) = protected.iter().find(|(place, _)| *place == target) {
            return refuse(format!(
                "is {name} ({}); delivering there would replace it",
                place.display()
            ));
        }
        for (place, name) in protected {
            if place.starts_with(&target) {
                let resolved = if Path::new(text) == target {
                    String::new()
                } else {
                    format!("({}) ", target.display())
                };
                return refuse(format!(
                    "{resolved}holds {name} ({}); delivering there would replace it",
                    place.display()
                ));
            }
        }
        Ok(target)
    }

    /// A field error at `field` (a path below this stage).
    pub fn error(&self, field: &str, message: impl Into<String>) -> FieldError {
        FieldError::new(self.path.key(field), Target::Value, message)
    }
}

/// The places pipe works in, which a stage's parser needs to keep deliveries away from them.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// The directory pipe runs in.
    pub root: PathBuf,
    /// The store (`--cache`).
    pub store: PathBuf,
}

impl Workspace {
    /// The current directory, with the store at `store` (relative paths are read from the
    /// current directory, as the store itself opens them).
    pub fn here(store: &Path) -> Self {
        let root = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Workspace {
            store: root.join(store),
            root,
        }
    }
}

impl Default for Workspace {
    /// The store pipe uses without `--cache`: `$PIPE_CACHE`, else `cache`.
    fn default() -> Self {
        let store = std::env::var_os("PIPE_CACHE")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "cache".into());
        Workspace::here(Path::new(&store))
    }
}

/// `path` made absolute, with symbolic links resolved as far as it exists and `.`/`..` applied
/// to the rest, so that two spellings of one place compare equal.
fn normalize(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    let mut resolved = loop {
        if let Ok(real) = existing.canonicalize() {
            break real;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            // `..` as the last component, or the root: apply it lexically below.
            _ => {
                rest.extend(
                    existing
                        .components()
                        .rev()
                        .map(|c| c.as_os_str().to_os_string()),
                );
                break PathBuf::from("/");
            }
        }
    };
    for part in rest.iter().rev() {
        match Path::new(part).components().next() {
            Some(std::path::Component::ParentDir) => {
                resolved.pop();
            }
            Some(std::path::Component::Normal(n)) => resolved.push(n),
            _ => {}
        }
    }
    resolved
}

/// One kind of stage. Implementations live in the `pipe-stages` crate, one module each.
pub trait StageKind: Send + Sync {
    /// The name written as `kind:` in a pipeline.
    fn name(&self) -> &'static str;
    /// Bumped whenever a change in the implementation can change its outputs; part of the key.
    fn version(&self) -> u32;
    /// What the kind does, in one line: `pipe kinds` lists it beside the name and version.
    fn summary(&self) -> &'static str;
    /// The fields of this kind that are run settings: they change how a result is made (where,
    /// how fast, how often it is saved, where it is delivered) but not what it is, so they
    /// never enter the key (see [`crate::key`]). Every other field is a key field or an input.
    fn run_settings(&self) -> &'static [&'static str] {
        &[]
    }
    /// The JSON Schema of the stage's fields (without `kind`), for `pipe schema`: the same
    /// names, types and defaults that [`StageKind::parse`] accepts.
    fn fields_schema(&self) -> serde_json::Value {
        serde_json::json!({ "type": "object" })
    }
    /// Checks and types the stage's fields.
    fn parse(
        &self,
        cx: &ParseContext<'_>,
        fields: serde_yaml::Value,
    ) -> Result<Box<dyn Stage>, FieldError>;
}

/// A stage as configured in one pipeline: what it reads, the parameters that define its
/// result, and how to produce it.
pub trait Stage: Send + Sync {
    /// Everything the stage reads. Their content digests enter the cache key.
    fn inputs(&self) -> Vec<Input>;
    /// The key fields: the kind's typed key struct, made by [`KeyFields::of`] from the
    /// stage's YAML fields (defaults filled in, overrides applied). No locations, names, run
    /// settings or secrets: see [`crate::key`] for what may enter.
    fn key_fields(&self) -> KeyFields;
    /// The output names it promises (`stage.name` references are checked against them), or
    /// `None` when they are only known after a run.
    fn outputs(&self) -> Option<Vec<String>> {
        None
    }
    /// Whether state it leaves in its work directory lets an interrupted run continue.
    /// What it needs of the machine when its pipeline does not say (`resources:`), e.g. the
    /// GPUs of its `device:`.
    fn resources(&self) -> crate::resources::Resources {
        Default::default()
    }
    /// Non-resumable stages start from an empty work directory on every attempt.
    fn resumable(&self) -> bool {
        false
    }
    /// How many nodes (machines) run it at once, each a `pipe run-stage` given its
    /// [`StageNode`]; most stages run on one.
    fn nodes(&self) -> usize {
        1
    }
    /// Things `pipe status` should say about this stage, e.g. that its source is unpinned.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// Produces the outputs into `cx.out_dir`.
    fn run(&self, cx: &mut StageContext) -> anyhow::Result<()>;
    /// Called once the stage's outputs are in the store — after a run or on a cache hit — by
    /// stages that also deliver them outside the store (`export` with `to:`). Returns what it
    /// did, for the log.
    fn deliver(&self, _outputs: &Path) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
    /// Checks what only the stages it reads from can tell (a sequence length against the
    /// model's context, say), once the whole pipeline is parsed; `stage` looks one up by id.
    fn check_upstream<'a>(
        &self,
        _stage: &dyn Fn(&str) -> Option<StageInfo<'a>>,
    ) -> Result<(), FieldError> {
        Ok(())
    }
    /// The memory the stage will hold at its peak on each device, in words (`pipe check` and
    /// `pipe run --dry-run` print it), when its settings and the stages it reads tell.
    fn memory_plan<'a>(&self, _stage: &dyn Fn(&str) -> Option<StageInfo<'a>>) -> Option<String> {
        None
    }
}

/// What a stage's [`Stage::check_upstream`] sees of another stage of the pipeline.
#[derive(Clone, Copy)]
pub struct StageInfo<'a> {
    pub kind: &'static str,
    /// Its [`Stage::key_fields`], as JSON.
    pub fields: &'a serde_json::Value,
    pub inputs: &'a [Input],
}

/// The error a stage returns when it stopped because the run was interrupted.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Progress a running stage reports to the live view.
pub trait Progress: Send + Sync {
    fn set_length(&self, len: u64);
    /// Like `set_length`, for a count of bytes (shown with a rate and ETA).
    fn set_bytes_length(&self, len: u64) {
        self.set_length(len)
    }
    fn set_position(&self, pos: u64);
    fn set_message(&self, msg: String);
}

/// A progress sink that shows nothing (used by tests and `--quiet`).
pub struct NoProgress;
impl Progress for NoProgress {
    fn set_length(&self, _: u64) {}
    fn set_position(&self, _: u64) {}
    fn set_message(&self, _: String) {}
}

/// One node of a stage that runs on several machines at once (a train stage's `nodes: N`):
/// one `pipe run-stage` per node, started by `srun` in a Slurm job or by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageNode {
    /// 0 for the node that writes the stage's results; 1.. for the others.
    pub rank: usize,
    pub nodes: usize,
    /// `host:port` where node 0 listens for the others.
    pub coordinator: String,
    /// How long a node waits for another before it gives up on it.
    pub timeout: std::time::Duration,
}

/// What a running stage gets from the engine.
pub struct StageContext {
    pub stage_id: String,
    pub key: String,
    /// Input name → where its bytes are (a store path or an external path).
    pub inputs: BTreeMap<String, PathBuf>,
    /// Everything written here becomes the stage's outputs. Empty at the start of each attempt.
    pub out_dir: PathBuf,
    /// Survives failures and kills of this key's attempts (when the stage is resumable).
    pub work_dir: PathBuf,
    /// The pipeline file's directory.
    pub base_dir: PathBuf,
    pub log_path: PathBuf,
    /// The GPU ordinals the run loop granted it for its `resources:` (empty: none declared).
    pub gpus: Vec<usize>,
    /// Set when this process is one node of a stage that runs on several (`nodes: N`).
    pub node: Option<StageNode>,
    pub(crate) log: Arc<Mutex<File>>,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) progress: Arc<dyn Progress>,
    pub(crate) metrics: Option<serde_json::Value>,
}

impl StageContext {
    /// True once the run was asked to stop (Ctrl-C, SIGTERM): save state and return
    /// [`Interrupted`].
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
    /// Appends a line to the stage's log file.
    pub fn log(&self, line: &str) {
        if let Ok(mut f) = self.log.lock() {
            let _ = writeln!(f, "{line}");
        }
    }
    /// A handle on the log file, e.g. for a child process's stdout/stderr.
    pub fn log_file(&self) -> std::io::Result<File> {
        self.log.lock().expect("log lock").try_clone()
    }
    pub fn progress(&self) -> &dyn Progress {
        self.progress.as_ref()
    }
    /// A summary of the stage's metrics, recorded in its manifest and shown by `pipe show`.
    pub fn set_metrics(&mut self, metrics: serde_json::Value) {
        self.metrics = Some(metrics);
    }
    /// The path of an input, by name.
    pub fn input(&self, name: &str) -> anyhow::Result<&Path> {
        self.inputs
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| anyhow::anyhow!("stage `{}` has no input `{name}`", self.stage_id))
    }

    /// A context for unit-testing a kind outside the engine.
    pub fn for_test(
        out_dir: PathBuf,
        work_dir: PathBuf,
        base_dir: PathBuf,
        log_path: PathBuf,
    ) -> Self {
        let log = File::create(&log_path).expect("create test log");
        StageContext {
            stage_id: "test".into(),
            key: "0".repeat(64),
            inputs: BTreeMap::new(),
            out_dir,
            work_dir,
            base_dir,
            log_path,
            gpus: Vec::new(),
            node: None,
            log: Arc::new(Mutex::new(log)),
            cancel: Arc::new(AtomicBool::new(false)),
            progress: Arc::new(NoProgress),
            metrics: None,
        }
    }
}

/// The stage kinds a binary offers, and the workspace their pipelines are read for.
#[derive(Default)]
pub struct Registry {
    kinds: Vec<Box<dyn StageKind>>,
    workspace: Workspace,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with(mut self, kind: impl StageKind + 'static) -> Self {
        self.kinds.push(Box::new(kind));
        self
    }
    /// Reads pipelines for `workspace` (default: [`Workspace::default`]).
    pub fn in_workspace(mut self, workspace: Workspace) -> Self {
        self.workspace = workspace;
        self
    }
    pub fn workspace(&self) -> &Workspace {
        &self.workspace
    }
    pub fn get(&self, name: &str) -> Option<&dyn StageKind> {
        self.kinds
            .iter()
            .find(|k| k.name() == name)
            .map(|k| k.as_ref())
    }
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.name()).collect()
    }
    pub fn kinds(&self) -> impl Iterator<Item = &dyn StageKind> {
        self.kinds.iter().map(|k| k.as_ref())
    }
}
