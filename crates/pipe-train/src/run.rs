//! A whole training run: batches from a tokenized dataset, the step loop, checkpoints that a
//! killed or interrupted run resumes from exactly, metrics, and the trained model's files.
//!
//! The data order is a pure function of (seed, epoch), and a checkpoint holds the trainable
//! weights (f32), the optimizer state, the metrics so far and the step, so a resumed run
//! computes the same updates as an uninterrupted one: on CPU its final weights are
//! bit-identical. Every file of a checkpoint is listed with its blake3 in `state.json`, under
//! one digest; a damaged checkpoint is never resumed from: the previous one
//! (`checkpoint.old`) is, or the run starts over, with a warning that names the damage.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder, RecorderError};
use burn::tensor::backend::AutodiffBackend;
use pipe_data::dataset::Dataset;
use pipe_model::save::{write_safetensors, SaveDtype};
use pipe_model::{init_model, load_model_with, CausalLm, LoraSpec, MatmulPrecision, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::heldout::{
    best_dir, best_dirs, heldout_loss, prune_best_dirs, Best, EvalSettings, EvalState, Evaluated,
};
use crate::nodes::{Agreement, NodeError, NodeGroup, NodeRole};
use crate::schedule::{Decay, Schedule};
use crate::step::{
    adamw, optimizer_owners, train_step_on_nodes, AdamWSettings, MicroBatch, Optim, Packing,
    StepSettings,
};
use crate::tensorboard::EventWriter;

/// Where the weights to start from come from.
#[derive(Debug, Clone)]
pub enum BaseModel {
    /// A Hugging Face model directory.
    Dir(PathBuf),
    /// A fresh model of this shape, initialised from `seed`.
    Init { config: Box<ModelConfig>, seed: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Method {
    Full,
    Lora(LoraSpec),
}

/// Everything that decides the result of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSpec {
    pub method: Method,
    pub lr: f64,
    pub decay: Decay,
    pub warmup_ratio: f64,
    pub warmup_steps: Option<u64>,
    pub epochs: u64,
    pub max_steps: Option<u64>,
    /// Examples per optimizer step (micro_batch_size × accumulation).
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub max_grad_norm: Option<f64>,
    pub adamw: AdamWSettings,
    pub seed: u64,
    /// Checkpoint every this many steps (and on interruption).
    pub save_steps: Option<u64>,
    pub save_dtype_bf16: bool,
    /// Mixed precision: matrix products in bf16, all else f32. In the stage's cache key as
    /// its `dtype` field.
    #[serde(skip)]
    pub matmul_precision: MatmulPrecision,
    /// Full fine-tuning keeps its trainable projection matrices, their gradients and AdamW's
    /// state of them in bf16, updated with compensated summation ([`crate::optimizer`]).
    #[serde(default)]
    pub bf16_weights: bool,
    /// Recompute each layer in the backward pass instead of keeping its intermediate results
    /// ([`crate::segments`]): less memory, the same weights, so not part of the result.
    #[serde(skip)]
    pub gradient_checkpointing: bool,
    /// Held-out evaluation during training (none by default).
    pub eval: EvalSettings,
}

/// The special tokens of the dataset (from the tokenize stage's meta.json).
#[derive(Debug, Clone, Deserialize)]
pub struct DataMeta {
    pub pad_token_id: u32,
    pub vocab_size_after: usize,
    #[serde(default)]
    pub added_tokens: Vec<String>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
}

/// Where a run keeps its resume state, and where it writes its result.
pub struct Dirs<'a> {
    pub work: &'a Path,
    pub out: &'a Path,
    /// Where TensorBoard event files go (the stage's log directory), if anywhere.
    pub events: Option<&'a Path>,
    /// This process's part in a run across several nodes, if it is one. Every node reads
    /// `work`'s checkpoint (a shared directory); only node 0 writes there and into `out`.
    pub nodes: Option<&'a NodeRun>,
}

/// A node of a run across nodes: where it stands, and the key the nodes must share.
#[derive(Debug, Clone)]
pub struct NodeRun {
    pub role: NodeRole,
    /// The stage's cache key.
    pub key: String,
}

/// Whether this process writes the run's checkpoints, metrics and outputs: a run on one node
/// does; of a run across nodes, node 0.
pub fn writes_results(nodes: Option<&NodeRun>) -> bool {
    nodes.is_none_or(|n| n.role.rank == 0)
}

/// What a run trains on, and what it evaluates on (`TrainSpec::eval`).
pub struct Splits<'a> {
    pub train: &'a Dataset,
    pub heldout: Option<&'a Dataset>,
}

/// How the run talks to whoever runs it.
pub struct Hooks<'a> {
    pub cancelled: &'a dyn Fn() -> bool,
    pub progress: &'a dyn Fn(u64, u64, f64),
    pub log: &'a dyn Fn(&str),
    /// Something the user must hear about although the run goes on (a damaged checkpoint).
    pub warn: &'a dyn Fn(&str),
    /// The values of each step (and its held-out loss when evaluated), named as TensorBoard
    /// shows them, for trackers (MLflow) that the caller feeds.
    pub scalars: &'a dyn Fn(u64, &[Scalar<'_>]),
}

/// A named value of a step, e.g. `("train/loss", 2.31)`.
pub type Scalar<'a> = (&'a str, f64);

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("interrupted at step {step}; a checkpoint was saved and the next run resumes from it")]
    Interrupted { step: u64 },
    #[error("the loss became {value} at step {step}; training stopped and the last good checkpoint (step {last_checkpoint}) is kept")]
    NonFinite {
        step: u64,
        value: f64,
        last_checkpoint: u64,
    },
    #[error("no device to train on")]
    NoDevice,
    /// Training across nodes: a node failed, died or disagrees.
    #[error(transparent)]
    Nodes(#[from] NodeError),
    #[error("{replicas} replicas need a number of micro-batches per step that they divide; there are {micro_batches}")]
    Replicas {
        replicas: usize,
        micro_batches: usize,
    },
    #[error(
        "batch_size ({batch_size}) and micro_batch_size ({micro_batch_size}) must be at least 1"
    )]
    ZeroBatch {
        batch_size: usize,
        micro_batch_size: usize,
    },
    #[error("batch_size {batch_size} must be a multiple of micro_batch_size {micro_batch_size}")]
    BatchNotMultiple {
        batch_size: usize,
        micro_batch_size: usize,
    },
    #[error("the training split has no examples")]
    NoExamples,
    #[error("evaluation during training needs held-out examples, and the validation split is empty; give the format stage a val_size")]
    NoHeldOut,
    #[error("the held-out evaluation at step {step} failed")]
    Eval {
        step: u64,
        #[source]
        source: pipe_eval::EvalError,
    },
    /// A training unit (an example, or a packed row) longer than the model's context.
    #[error("the training data's longest {unit} has {longest} tokens, but the model reads at most {limit} positions (its max_position_embeddings); lower the tokenize stage's max_len to {limit} or less, or train a model with a longer context")]
    TooLong {
        unit: &'static str,
        longest: usize,
        limit: usize,
    },
    #[error("the best step's weights ({step}) cannot be loaded: {detail}")]
    BestWeights { step: u64, detail: String },
    #[error(transparent)]
    Model(#[from] pipe_model::ModelError),
    /// Reading or writing `what` (a file or directory of the run) failed.
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint could not be written; `detail` says why, `advice` what happens next.
    #[error("cannot save the checkpoint at step {step}: {detail}; {advice}")]
    Save {
        step: u64,
        detail: String,
        /// The kind of I/O error behind it, if one was.
        io_kind: Option<std::io::ErrorKind>,
        advice: String,
    },
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> TrainError {
    move |source| TrainError::Io { what, source }
}

/// One line of metrics.jsonl. Only what the training computed: the outputs of a run must
/// not depend on how fast it went (or whether it was resumed), or everything downstream would
/// get a new cache key each time. Speed goes to the stage's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricLine {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    /// The held-out loss after this step, at the steps that are evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// summary.json: the result of a run (the same for a resumed run as for an uninterrupted one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub steps: u64,
    pub examples: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub tokens: u64,
    /// The last held-out loss, when the run evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// The step with the lowest held-out loss (whose weights are the outputs with `keep_best`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<Best>,
    /// Stopped before the last step: `early_stopping_patience` evaluations without a lower
    /// held-out loss.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped_early: bool,
}

/// What a call to [`train`] did: its result and how this attempt went.
#[derive(Debug, Clone, Serialize)]
pub struct Trained {
    #[serde(flatten)]
    pub summary: Summary,
    pub resumed_from_step: u64,
    /// This attempt's training time and throughput (steps since the resume point).
    pub wall_s: f64,
    pub tokens_per_s: f64,
}

/// Where a run stands: what a checkpoint resumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CheckpointState {
    /// Optimizer steps done; with the seed, this is the position in the data.
    step: u64,
    metrics_lines: usize,
    tokens: u64,
    first_loss: Option<f64>,
    #[serde(default)]
    eval: EvalState,
    /// How optimizer.bin is laid out; absent in checkpoints of earlier versions (burn's
    /// AdamW), and so not written for them, to keep their digests.
    #[serde(default, skip_serializing_if = "OptimizerFormat::is_plain")]
    optimizer: OptimizerFormat,
}

/// The layout of a checkpoint's optimizer.bin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum OptimizerFormat {
    /// burn's AdamW record (checkpoints written before compensated updates).
    #[default]
    PlainAdamw,
    /// [`crate::optimizer::CompensatedAdamW`]'s record.
    CompensatedAdamw,
}

impl OptimizerFormat {
    fn is_plain(&self) -> bool {
        *self == OptimizerFormat::PlainAdamw
    }
}

/// One file of a checkpoint as it was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileDigest {
    bytes: u64,
    blake3: String,
}

/// A checkpoint's `state.json`: the state, every file beside it (path relative to the
/// checkpoint) with its size and blake3, and one digest over both, so that a change to any
/// byte of the checkpoint — weights, optimizer, metrics or the state itself — is seen.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointManifest {
    state: CheckpointState,
    files: BTreeMap<String, FileDigest>,
    digest: String,
}

impl CheckpointManifest {
    fn new(state: CheckpointState, files: BTreeMap<String, FileDigest>) -> Self {
        let digest = Self::digest_of(&state, &files);
        CheckpointManifest {
            state,
            files,
            digest,
        }
    }
    fn digest_of(state: &CheckpointState, files: &BTreeMap<String, FileDigest>) -> String {
        let bytes = serde_json::to_vec(&(state, files)).expect("json");
        blake3::hash(&bytes).to_hex().to_string()
    }
}

/// The steps of a run over `n` examples.
pub fn total_steps(spec: &TrainSpec, n: usize) -> u64 {
    let per_epoch = n.div_ceil(spec.batch_size) as u64;
    let all = per_epoch.saturating_mul(spec.epochs);
    // `max_steps` wins over `epochs` (and may run past the end of the data, reshuffled).
    spec.max_steps.unwrap_or(all)
}

/// The example indices of every micro-batch of optimizer step `step`.
pub fn step_examples(spec: &TrainSpec, n: usize, step: u64) -> Vec<Vec<usize>> {
    let per_epoch = n.div_ceil(spec.batch_size) as u64;
    let epoch = step / per_epoch;
    let k = (step % per_epoch) as usize;
    let mut order: Vec<usize> = (0..n).collect();
    pipe_data::format::shuffle(
        &mut order,
        spec.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let batch = &order[k * spec.batch_size..((k + 1) * spec.batch_size).min(n)];
    batch
        .chunks(spec.micro_batch_size)
        .map(|c| c.to_vec())
        .collect()
}

/// The units training draws batches from: examples, or the rows of a packed dataset.
pub fn units(ds: &Dataset) -> usize {
    ds.rows().map_or(ds.len(), |r| r.len() - 1)
}

/// A micro-batch of units `idx` (examples, or packed rows).
pub fn micro_batch(ds: &Dataset, idx: &[usize], pad: u32) -> MicroBatch {
    if ds.packed() {
        packed_micro_batch(ds, idx, pad)
    } else {
        plain_micro_batch(ds, idx, pad)
    }
}

/// Packed rows, right-padded to the longest. Each example keeps its own positions (from 0)
/// and attends only to itself; its first token's label is dropped, since what precedes it in
/// the row is another example.
fn packed_micro_batch(ds: &Dataset, idx: &[usize], pad: u32) -> MicroBatch {
    let rows = ds.rows().expect("packed");
    let offsets = ds.offsets();
    let positions_all = ds
        .position_ids()
        .expect("packed datasets have position ids");
    let (all_ids, all_labels) = (ds.all_input_ids(), ds.all_labels());
    let range = |r: usize| rows[r] as usize..rows[r + 1] as usize;
    let len = idx
        .iter()
        .map(|&r| range(r).len())
        .max()
        .unwrap_or(1)
        .max(2);
    let mut mb = MicroBatch {
        input_ids: Vec::new(),
        labels: Vec::new(),
        attention_mask: None,
        packing: Some(Packing {
            positions: Vec::new(),
            segments: Vec::new(),
        }),
    };
    let packing = mb.packing.as_mut().expect("set above");
    for &r in idx {
        let span = range(r);
        let mut ids: Vec<i64> = all_ids[span.clone()].iter().map(|&x| x as i64).collect();
        let mut labels: Vec<i64> = all_labels[span.clone()].iter().map(|&x| x as i64).collect();
        let mut positions: Vec<usize> = positions_all[span.clone()]
            .iter()
            .map(|&p| p as usize)
            .collect();
        // Examples start where an offset falls inside the row.
        let mut segments = vec![0i32; span.len()];
        let first = offsets.partition_point(|&o| (o as usize) < span.start);
        let mut seg = 0;
        for w in offsets[first..].windows(2) {
            let (a, b) = (w[0] as usize, w[1] as usize);
            if a >= span.end {
                break;
            }
            seg += 1;
            segments[a - span.start..b - span.start].fill(seg);
            labels[a - span.start] = -100;
        }
        ids.resize(len, pad as i64);
        labels.resize(len, -100);
        positions.resize(len, 0);
        segments.resize(len, -1);
        mb.input_ids.push(ids);
        mb.labels.push(labels);
        packing.positions.push(positions);
        packing.segments.push(segments);
    }
    mb
}

/// Right-pads examples to the longest, with -100 labels and a 0 mask on the padding.
fn plain_micro_batch(ds: &Dataset, idx: &[usize], pad: u32) -> MicroBatch {
    let len = idx
        .iter()
        .map(|&i| ds.example(i).0.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let mut input_ids = Vec::new();
    let mut labels = Vec::new();
    let mut mask = Vec::new();
    for &i in idx {
        let (ids, lab) = ds.example(i);
        let mut r: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        let mut l: Vec<i64> = lab.iter().map(|&x| x as i64).collect();
        let mut m = vec![1u8; r.len()];
        r.resize(len, pad as i64);
        l.resize(len, -100);
        m.resize(len, 0);
        input_ids.push(r);
        labels.push(l);
        mask.push(m);
    }
    let padded = mask.iter().any(|m| m.contains(&0));
    MicroBatch {
        input_ids,
        labels,
        attention_mask: padded.then_some(mask),
        packing: None,
    }
}

/// Evaluates the model after `state.step` on the held-out split and records it: the best
/// step's weights are kept in `best-<step>/` (with `keep_best`) until no checkpoint needs them.
fn evaluate<B: AutodiffBackend>(
    model: &mut CausalLm<B>,
    heldout: &Dataset,
    spec: &TrainSpec,
    device: &B::Device,
    work: Option<&Path>,
    state: &mut CheckpointState,
) -> Result<Evaluated, TrainError> {
    let step = state.step;
    let loss = heldout_loss(model, heldout, spec.micro_batch_size, device)
        .map_err(|source| TrainError::Eval { step, source })?;
    let evaluated = state.eval.record(&spec.eval, step, loss);
    if let Some(work) = work.filter(|_| evaluated.improved && spec.eval.keep_best) {
        let dir = best_dir(work, step);
        let tmp = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        write_trainable(model, spec, &tmp.join("weights"), SaveDtype::F32)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).map_err(io("best weights"))?;
    }
    Ok(evaluated)
}

/// The held-out loss of the last evaluated step in metrics.jsonl's text.
fn last_eval_loss(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<MetricLine>(l).ok()?.eval_loss)
        .next_back()
}

/// The run's TensorBoard events (see [`crate::tensorboard`]). They are a view of the run,
/// not its result: a file that cannot be written is reported once and the run goes on.
struct TrainEvents(Option<EventWriter>);

impl TrainEvents {
    fn open(dir: Option<&Path>, step: u64, hooks: &Hooks<'_>) -> Self {
        let Some(dir) = dir else {
            return TrainEvents(None);
        };
        let opened = EventWriter::create(dir).and_then(|mut w| {
            if step > 0 {
                // Resumed after `step`: what an earlier attempt logged from step + 1 on is void.
                w.start_at(step + 1)?;
            }
            Ok(w)
        });
        match opened {
            Ok(w) => TrainEvents(Some(w)),
            Err(e) => {
                (hooks.warn)(&format!(
                    "TensorBoard events cannot be written in {}: {e}; training goes on without them",
                    dir.display()
                ));
                TrainEvents(None)
            }
        }
    }

    fn step(&mut self, step: u64, values: &[(&str, f64)], hooks: &Hooks<'_>) {
        let Some(w) = &mut self.0 else { return };
        if let Err(e) = w.scalars(step, values) {
            (hooks.warn)(&format!(
                "TensorBoard events cannot be written to {}: {e}; training goes on without them",
                w.path().display()
            ));
            self.0 = None;
        }
    }
}

fn build_model<B: AutodiffBackend>(
    base: &BaseModel,
    spec: &TrainSpec,
    meta: &DataMeta,
    device: &B::Device,
) -> Result<CausalLm<B>, TrainError> {
    let full = matches!(spec.method, Method::Full);
    let model: CausalLm<B> = match base {
        BaseModel::Dir(d) => load_model_with(d, device, full)?,
        BaseModel::Init { config, seed } => init_model(config, *seed, 0.02, device, full),
    };
    let model = if meta.vocab_size_after > model.config.vocab_size {
        model.resize_embeddings(meta.vocab_size_after)
    } else {
        model
    };
    Ok(match &spec.method {
        Method::Full => model,
        Method::Lora(l) => {
            let mut model = model.add_lora(l, spec.seed)?;
            let saved = model.resolve_saved_modules(&l.modules_to_save)?;
            model.train_saved_modules(&saved)
        }
    })
}

/// Trains, checkpointing into `work`, and writes the result into `out`: `model/` (full) or
/// `adapter/` (LoRA), `metrics.jsonl` and `summary.json`.
///
/// `devices` holds one entry per data-parallel replica (see [`crate::step::train_step_parallel`]); the
/// model, optimizer and checkpoints live on the first.
///
/// With `dirs.nodes`, this process is one node of a run across nodes ([`crate::nodes`]): the
/// nodes join once each has loaded its resume point, train in lockstep, and a node that fails
/// tells the others why.
pub fn train<B: AutodiffBackend>(
    base: &BaseModel,
    splits: &Splits<'_>,
    meta: &DataMeta,
    spec: &TrainSpec,
    dirs: &Dirs<'_>,
    hooks: &Hooks<'_>,
    devices: &[B::Device],
) -> Result<Trained, TrainError> {
    let mut group = None;
    let result = train_as_node::<B>(base, splits, meta, spec, dirs, hooks, devices, &mut group);
    if let (Err(e), Some(g)) = (&result, &group) {
        g.fail(&e.to_string());
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn train_as_node<B: AutodiffBackend>(
    base: &BaseModel,
    splits: &Splits<'_>,
    meta: &DataMeta,
    spec: &TrainSpec,
    dirs: &Dirs<'_>,
    hooks: &Hooks<'_>,
    devices: &[B::Device],
    group: &mut Option<NodeGroup>,
) -> Result<Trained, TrainError> {
    let (work, out) = (dirs.work, dirs.out);
    let nodes = dirs.nodes.map_or(1, |n| n.role.nodes);
    // Only node 0 writes: checkpoints, metrics, best weights and outputs.
    let leader = writes_results(dirs.nodes);
    let (data, heldout) = (splits.train, splits.heldout);
    let Some(device) = devices.first() else {
        return Err(TrainError::NoDevice);
    };
    let accumulation = spec.batch_size / spec.micro_batch_size.max(1);
    let replicas = devices.len() * nodes;
    if replicas > 1 && !accumulation.is_multiple_of(replicas) {
        return Err(TrainError::Replicas {
            replicas,
            micro_batches: accumulation,
        });
    }
    // The CPU backends draw random numbers (dropout) from one process-wide generator, which
    // `B::seed` resets at every step; two runs at once would interleave their draws and lose
    // reproducibility. Training is one at a time per process.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if spec.micro_batch_size == 0 || spec.batch_size == 0 {
        return Err(TrainError::ZeroBatch {
            batch_size: spec.batch_size,
            micro_batch_size: spec.micro_batch_size,
        });
    }
    if !spec.batch_size.is_multiple_of(spec.micro_batch_size) {
        return Err(TrainError::BatchNotMultiple {
            batch_size: spec.batch_size,
            micro_batch_size: spec.micro_batch_size,
        });
    }
    if data.is_empty() {
        return Err(TrainError::NoExamples);
    }
    let heldout = match heldout {
        Some(h) if !h.is_empty() => Some(h),
        _ if spec.eval.every.is_some() => return Err(TrainError::NoHeldOut),
        _ => None,
    };
    // Batches are drawn from examples, or from the rows of a packed dataset.
    let n = units(data);
    let total = total_steps(spec, n);
    let warmup = spec
        .warmup_steps
        .unwrap_or_else(|| Schedule::warmup_from_ratio(total, spec.warmup_ratio));
    let schedule = Schedule {
        peak: spec.lr,
        decay: spec.decay,
        warmup_steps: warmup,
        total_steps: total,
    };
    std::fs::create_dir_all(work).map_err(io("work directory"))?;
    let ckpt = work.join("checkpoint");
    let metrics_path = work.join("metrics.jsonl");

    let mut model = build_model::<B>(base, spec, meta, device)?;
    check_sequence_lengths(data, &model.config)?;
    let mut optim: Optim<B> = adamw::<B>(&spec.adamw);
    let mut state = CheckpointState {
        step: 0,
        metrics_lines: 0,
        tokens: 0,
        first_loss: None,
        eval: EvalState::default(),
        optimizer: OptimizerFormat::CompensatedAdamw,
    };
    // The metrics so far; the work directory's metrics.jsonl is only a live view of them, and
    // what a checkpoint and the outputs hold comes from here.
    let mut metrics_text = String::new();
    let (resumed, damaged) = resume_point::<B>(&ckpt, base, spec, meta, device, hooks)?;
    if let Some(resumed) = resumed {
        (model, optim, state, metrics_text) = resumed;
        (hooks.log)(&format!(
            "resuming from the checkpoint at step {} of {total}",
            state.step
        ));
    }
    if leader {
        std::fs::write(&metrics_path, &metrics_text).map_err(io("metrics.jsonl"))?;
        // Best weights that an interrupted attempt kept after the step it resumes from are void.
        let before: Vec<u64> = best_dirs(work)
            .into_iter()
            .filter(|&s| s <= state.step)
            .collect();
        prune_best_dirs(work, &before).map_err(io("best weights"))?;
    }
    if let Some(run) = dirs.nodes {
        let agreement = Agreement {
            key: run.key.clone(),
            step: state.step,
            replicas: devices.len(),
        };
        (hooks.log)(&format!(
            "node {} of {}: joining the others at {}",
            run.role.rank, run.role.nodes, run.role.coordinator
        ));
        *group = Some(NodeGroup::join(&run.role, &agreement)?);
        (hooks.log)(&format!(
            "all {} nodes joined; training on {replicas} replicas in all",
            run.role.nodes
        ));
    }
    // Node 0's to remove, in a run across nodes, and only once every node has joined: each
    // joins after choosing its resume point, so none can find the damaged checkpoint gone
    // half-way (or at all) and all of them pass it over alike.
    if leader {
        for dir in damaged {
            std::fs::remove_dir_all(dir).map_err(io("damaged checkpoint"))?;
        }
    }
    let group = group.as_ref();
    let mut model = model
        .with_matmul_precision(spec.matmul_precision)
        .keep_frozen_projections_in_bf16();
    if spec.bf16_weights {
        model = model.keep_trainable_projections_in_bf16();
    }
    if devices.len() > 1 && state.step > 0 {
        // A resumed run read every state onto the first device; each goes to its owner now,
        // before the first step's activations and gradients join them there.
        let owners = optimizer_owners(&model, devices.len());
        let record = crate::optimizer::place_states::<B, CausalLm<B>>(optim.to_record(), |id| {
            owners.get(&id).map(|&k| devices[k].clone())
        });
        optim = adamw::<B>(&spec.adamw).load_record(record);
    }
    let resumed_from_step = state.step;
    let tokens_at_start = state.tokens;
    let t0 = Instant::now();
    // How often speed is logged: about ten times a run.
    let log_every = (total / 10).max(1);
    let mut last_loss = None;
    let mut last_checkpoint = state.step;
    let mut metrics: Box<dyn Write> = if leader {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(io("metrics.jsonl"))?,
        )
    } else {
        Box::new(std::io::sink())
    };
    let mut events = TrainEvents::open(dirs.events, state.step, hooks);
    // The checkpoint resumed from becomes the fallback at the next save: its best stays too.
    let mut best_of_previous_checkpoint = state.eval.best;
    let mut stopped_early = false;
    // LoRA dropout is the only thing that draws in a pass; without it nothing is seeded.
    let draws = matches!(&spec.method, Method::Lora(l) if l.dropout > 0.0);
    while state.step < total {
        let step_started = Instant::now();
        // The nodes stop together, at the same step, so that node 0's checkpoint is theirs.
        let cancelled = match group {
            Some(g) => g.any((hooks.cancelled)())?,
            None => (hooks.cancelled)(),
        };
        if cancelled {
            if leader {
                save_checkpoint(&mut model, &optim, &state, &metrics_text, &ckpt, spec)
                    .map_err(|e| e.into_error(state.step, last_checkpoint))?;
            }
            return Err(TrainError::Interrupted { step: state.step });
        }
        let step = state.step;
        // Every draw of a step (dropout masks, stochastic rounding) depends on the step only,
        // so a resumed run draws the same ones.
        let step_seed = spec.seed.wrapping_add(step.wrapping_mul(1_000_003));
        B::seed(device, step_seed);
        let batches: Vec<MicroBatch> = step_examples(spec, n, step)
            .iter()
            .map(|idx| micro_batch(data, idx, meta.pad_token_id))
            .collect();
        let lr = schedule.lr(step);
        let settings = StepSettings {
            lr,
            max_grad_norm: spec.max_grad_norm,
            recompute_layers: spec.gradient_checkpointing,
            dropout_seed: draws.then_some(step_seed),
        };
        let (m, stats) =
            train_step_on_nodes(model, &mut optim, &batches, devices, group, &settings)?;
        model = m;
        if !stats.loss.is_finite() {
            return Err(TrainError::NonFinite {
                step: step + 1,
                value: stats.loss,
                last_checkpoint,
            });
        }
        let tokens: usize = batches
            .iter()
            .flat_map(|b| b.input_ids.iter())
            .map(|r| r.iter().filter(|&&x| x != meta.pad_token_id as i64).count())
            .sum();
        state.step += 1;
        state.tokens += tokens as u64;
        state.first_loss.get_or_insert(stats.loss);
        last_loss = Some(stats.loss);
        let evaluated = match heldout.filter(|_| spec.eval.due(state.step, total)) {
            Some(h) => Some(evaluate(
                &mut model,
                h,
                spec,
                device,
                leader.then_some(work),
                &mut state,
            )?),
            None => None,
        };
        let line = MetricLine {
            step: state.step,
            epoch: state.step as f64 / n.div_ceil(spec.batch_size) as f64,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens,
            eval_loss: evaluated.as_ref().map(|e| e.loss),
        };
        let line = format!("{}\n", serde_json::to_string(&line).expect("json"));
        metrics
            .write_all(line.as_bytes())
            .map_err(io("metrics.jsonl"))?;
        metrics_text.push_str(&line);
        state.metrics_lines += 1;
        let step_s = step_started.elapsed().as_secs_f64().max(1e-9);
        let mut scalars = vec![
            ("train/loss", stats.loss),
            ("train/learning_rate", lr),
            ("train/grad_norm", stats.grad_norm),
            (
                "train/epoch",
                state.step as f64 / n.div_ceil(spec.batch_size) as f64,
            ),
            ("train/tokens_per_second", tokens as f64 / step_s),
        ];
        if let Some(e) = &evaluated {
            scalars.push(("eval/loss", e.loss));
            (hooks.log)(&format!(
                "step {}: held-out loss {:.4}{}",
                state.step,
                e.loss,
                if e.improved { " (best so far)" } else { "" }
            ));
        }
        events.step(state.step, &scalars, hooks);
        (hooks.scalars)(state.step, &scalars);
        (hooks.progress)(state.step, total, stats.loss);
        if state.step.is_multiple_of(log_every) || state.step == total {
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            (hooks.log)(&format!(
                "step {}/{total}: loss {:.4}, lr {lr:.3e}, {:.0} tokens/s",
                state.step,
                stats.loss,
                (state.tokens - tokens_at_start) as f64 / secs
            ));
        }
        if spec
            .save_steps
            .is_some_and(|k| k > 0 && state.step.is_multiple_of(k))
            && state.step < total
            && leader
        {
            metrics.flush().map_err(io("metrics.jsonl"))?;
            save_checkpoint(&mut model, &optim, &state, &metrics_text, &ckpt, spec)
                .map_err(|e| e.into_error(state.step, last_checkpoint))?;
            last_checkpoint = state.step;
            // What this checkpoint and the previous one (the fallback) refer to stays.
            let keep: Vec<u64> = [state.eval.best, best_of_previous_checkpoint]
                .into_iter()
                .flatten()
                .map(|b| b.step)
                .collect();
            prune_best_dirs(work, &keep).map_err(io("best weights"))?;
            best_of_previous_checkpoint = state.eval.best;
        }
        if evaluated.is_some_and(|e| e.stop) {
            stopped_early = true;
            (hooks.log)(&format!(
                "stopping early at step {}: {} held-out evaluations without a lower loss",
                state.step, state.eval.since_best
            ));
            break;
        }
    }
    metrics.flush().map_err(io("metrics.jsonl"))?;
    let best = state.eval.best.filter(|_| spec.eval.every.is_some());
    let summary = Summary {
        steps: state.step,
        examples: data.len(),
        first_loss: state.first_loss,
        last_loss: last_loss.or(state.first_loss),
        tokens: state.tokens,
        eval_loss: last_eval_loss(&metrics_text),
        best,
        stopped_early,
    };
    let wall_s = t0.elapsed().as_secs_f64();
    let trained = Trained {
        summary,
        resumed_from_step,
        wall_s,
        tokens_per_s: (state.tokens - tokens_at_start) as f64 / wall_s.max(1e-9),
    };
    if !leader {
        return Ok(trained);
    }
    match best.filter(|b| spec.eval.keep_best && b.step != state.step) {
        Some(b) => {
            // The outputs are the best step's weights: let the last ones go first.
            drop(optim);
            drop(model);
            let weights = best_dir(work, b.step).join("weights");
            let mut best_model =
                load_weights::<B>(&weights, base, spec, meta, device).map_err(|e| {
                    TrainError::BestWeights {
                        step: b.step,
                        detail: e,
                    }
                })?;
            (hooks.log)(&format!(
                "publishing the weights of step {} (held-out loss {:.4}), the lowest",
                b.step, b.loss
            ));
            write_outputs(&mut best_model, spec, out)?;
        }
        None => write_outputs(&mut model, spec, out)?,
    }
    std::fs::write(out.join("metrics.jsonl"), &metrics_text).map_err(io("metrics.jsonl"))?;
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_vec_pretty(&trained.summary).expect("json"),
    )
    .map_err(io("summary.json"))?;
    Ok(trained)
}

/// The trainable weights in files a later run (or transformers/PEFT) can read.
fn write_trainable<B: AutodiffBackend>(
    model: &mut CausalLm<B>,
    spec: &TrainSpec,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<(), pipe_model::ModelError> {
    let write_error = |p: &Path| {
        let path = p.to_path_buf();
        move |e| pipe_model::ModelError::Write { path, source: e }
    };
    std::fs::create_dir_all(dir).map_err(write_error(dir))?;
    match &spec.method {
        Method::Full => model.save_hf(dir, dtype)?,
        Method::Lora(l) => {
            let saved = model.resolve_saved_modules(&l.modules_to_save)?;
            let mut tensors = model.peft_tensors();
            tensors.extend(model.saved_module_tensors(&saved));
            write_safetensors(
                &dir.join("adapter_model.safetensors"),
                &tensors,
                dtype,
                &[("format", "pt")],
            )?;
            let targets: Vec<String> = model
                .linear_modules_mut()
                .into_iter()
                .filter(|(_, p)| p.lora.is_some())
                .map(|(n, _)| n)
                .collect();
            let cfg = serde_json::json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": l.r,
                "lora_alpha": l.alpha,
                "lora_dropout": l.dropout,
                "target_modules": targets,
                "bias": "none",
                "fan_in_fan_out": false,
                "init_lora_weights": true,
                "inference_mode": true,
                "modules_to_save": (!l.modules_to_save.is_empty()).then_some(&l.modules_to_save),
                "base_model_name_or_path": null,
            });
            let path = dir.join("adapter_config.json");
            std::fs::write(&path, serde_json::to_vec_pretty(&cfg).expect("json"))
                .map_err(write_error(&path))?;
        }
    }
    Ok(())
}

fn write_outputs<B: AutodiffBackend>(
    model: &mut CausalLm<B>,
    spec: &TrainSpec,
    out: &Path,
) -> Result<(), TrainError> {
    let dtype = if spec.save_dtype_bf16 {
        SaveDtype::Bf16
    } else {
        SaveDtype::F32
    };
    let dir = match spec.method {
        Method::Full => out.join("model"),
        Method::Lora(_) => out.join("adapter"),
    };
    Ok(write_trainable(model, spec, &dir, dtype)?)
}

/// Why a checkpoint could not be written: the message, and the kind of I/O error behind it.
#[derive(Debug)]
struct SaveFailure {
    message: String,
    io_kind: Option<std::io::ErrorKind>,
}

impl From<pipe_model::ModelError> for SaveFailure {
    fn from(e: pipe_model::ModelError) -> Self {
        let io_kind = match &e {
            pipe_model::ModelError::Io { source, .. }
            | pipe_model::ModelError::Write { source, .. } => Some(source.kind()),
            _ => None,
        };
        SaveFailure {
            message: e.to_string(),
            io_kind,
        }
    }
}

impl SaveFailure {
    fn io(what: &Path) -> impl Fn(std::io::Error) -> SaveFailure + '_ {
        move |e| SaveFailure {
            message: format!("cannot write {}: {e}", what.display()),
            io_kind: Some(e.kind()),
        }
    }

    /// The error of the run that failed to save its checkpoint at `step`; `kept` is the step
    /// of the last checkpoint, which stays in place.
    fn into_error(self, step: u64, kept: u64) -> TrainError {
        let resume = if kept > 0 {
            format!("the next run resumes from the checkpoint at step {kept}")
        } else {
            "the next run starts over".to_string()
        };
        let advice = if self.io_kind == Some(std::io::ErrorKind::StorageFull) {
            format!("the disk is full: free some space and run again ({resume})")
        } else {
            resume
        };
        TrainError::Save {
            step,
            detail: self.message,
            io_kind: self.io_kind,
            advice,
        }
    }
}

/// Writes the checkpoint beside the current one, then swaps it in, so that a kill at any
/// moment leaves a whole checkpoint; the one it replaces stays as `checkpoint.old`, to fall
/// back to should the new one be found damaged.
fn save_checkpoint<B: AutodiffBackend>(
    model: &mut CausalLm<B>,
    optim: &Optim<B>,
    state: &CheckpointState,
    metrics: &str,
    dir: &Path,
    spec: &TrainSpec,
) -> Result<(), SaveFailure> {
    let tmp = dir.with_extension("partial");
    let old = dir.with_extension("old");
    let remove = |d: &Path| match std::fs::remove_dir_all(d) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(SaveFailure {
            message: format!("cannot remove {}: {e}", d.display()),
            io_kind: Some(e.kind()),
        }),
        _ => Ok(()),
    };
    remove(&tmp)?;
    // Two checkpoints on disk at most: while the new one is written, the current one is the
    // fallback.
    if dir.exists() {
        remove(&old)?;
    }
    if let Err(e) = write_checkpoint(model, optim, state, metrics, &tmp, spec) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(SaveFailure::io(&old))?;
    }
    std::fs::rename(&tmp, dir).map_err(SaveFailure::io(dir))
}

fn write_checkpoint<B: AutodiffBackend>(
    model: &mut CausalLm<B>,
    optim: &Optim<B>,
    state: &CheckpointState,
    metrics: &str,
    dir: &Path,
    spec: &TrainSpec,
) -> Result<(), SaveFailure> {
    write_trainable(model, spec, &dir.join("weights"), SaveDtype::F32)?;
    let bytes = BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(optim.to_record(), ())
        .map_err(|e| SaveFailure {
            message: format!("cannot serialise the optimizer state: {e}"),
            io_kind: None,
        })?;
    let optimizer = dir.join("optimizer.bin");
    std::fs::write(&optimizer, &bytes).map_err(SaveFailure::io(&optimizer))?;
    let metrics_path = dir.join("metrics.jsonl");
    std::fs::write(&metrics_path, metrics).map_err(SaveFailure::io(&metrics_path))?;
    let files = digest_files(dir).map_err(SaveFailure::io(dir))?;
    // What this version writes, whatever the checkpoint resumed from was.
    let state = CheckpointState {
        optimizer: OptimizerFormat::CompensatedAdamw,
        ..state.clone()
    };
    let manifest = CheckpointManifest::new(state, files);
    let state_path = dir.join("state.json");
    std::fs::write(
        &state_path,
        serde_json::to_vec_pretty(&manifest).expect("json"),
    )
    .map_err(SaveFailure::io(&state_path))
}

/// Size and blake3 of every file under `dir` but `state.json`, by relative path.
fn digest_files(dir: &Path) -> std::io::Result<BTreeMap<String, FileDigest>> {
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut BTreeMap<String, FileDigest>,
    ) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
                continue;
            }
            let rel = path
                .strip_prefix(root)
                .expect("below the root")
                .to_string_lossy()
                .replace('\\', "/");
            if rel == "state.json" {
                continue;
            }
            out.insert(rel, digest_file(&path)?);
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

fn digest_file(path: &Path) -> std::io::Result<FileDigest> {
    Ok(FileDigest {
        bytes: std::fs::metadata(path)?.len(),
        blake3: pipe_core::digest::hash_file(path)?,
    })
}

/// Checks a checkpoint against its `state.json`: the state and the metrics it holds, or what
/// is damaged.
fn verify_checkpoint(dir: &Path) -> Result<(CheckpointState, String), String> {
    let state_path = dir.join("state.json");
    let text = std::fs::read(&state_path).map_err(|e| format!("state.json: {e}"))?;
    let manifest: CheckpointManifest = serde_json::from_slice(&text).map_err(|e| {
        let older = serde_json::from_slice::<serde_json::Value>(&text)
            .is_ok_and(|v| v.get("optimizer_blake3").is_some());
        if older {
            "state.json was written by an older pipe, without a digest over the whole checkpoint"
                .to_string()
        } else {
            format!("state.json is not a checkpoint state ({e})")
        }
    })?;
    let digest = CheckpointManifest::digest_of(&manifest.state, &manifest.files);
    if digest != manifest.digest {
        return Err(format!(
            "state.json does not match its own digest (it records {}, its contents hash to {digest})",
            manifest.digest
        ));
    }
    for (rel, expected) in &manifest.files {
        let path = dir.join(rel);
        let actual = digest_file(&path).map_err(|e| format!("{rel}: {e}"))?;
        if actual.bytes != expected.bytes {
            return Err(format!(
                "{rel} is {} bytes, state.json expects {} (truncated or overwritten)",
                actual.bytes, expected.bytes
            ));
        }
        if actual.blake3 != expected.blake3 {
            return Err(format!(
                "{rel} has changed: state.json expects blake3 {}, the file hashes to {}",
                expected.blake3, actual.blake3
            ));
        }
    }
    for required in ["optimizer.bin", "metrics.jsonl"] {
        if !manifest.files.contains_key(required) {
            return Err(format!("state.json lists no {required}"));
        }
    }
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map_err(|e| format!("metrics.jsonl: {e}"))?;
    let lines = metrics.lines().count();
    if lines != manifest.state.metrics_lines {
        return Err(format!(
            "metrics.jsonl holds {lines} lines, the state {}",
            manifest.state.metrics_lines
        ));
    }
    Ok((manifest.state, metrics))
}

type Resumed<B> = (CausalLm<B>, Optim<B>, CheckpointState, String);

/// The checkpoint to resume from: the latest whole one (none: the run starts over), and the
/// damaged ones passed over on the way, each named in a warning, for the caller to remove.
fn resume_point<B: AutodiffBackend>(
    ckpt: &Path,
    base: &BaseModel,
    spec: &TrainSpec,
    meta: &DataMeta,
    device: &B::Device,
    hooks: &Hooks<'_>,
) -> Result<(Option<Resumed<B>>, Vec<PathBuf>), TrainError> {
    // A kill between the two renames of save_checkpoint leaves only `.old`.
    let candidates: Vec<PathBuf> = [ckpt.to_path_buf(), ckpt.with_extension("old")]
        .into_iter()
        .filter(|d| d.exists())
        .collect();
    let mut damaged = Vec::new();
    for (i, dir) in candidates.iter().enumerate() {
        let damage = match load_checkpoint::<B>(dir, base, spec, meta, device) {
            Ok(resumed) => return Ok((Some(resumed), damaged)),
            Err(damage) => damage,
        };
        let next = match candidates.get(i + 1) {
            Some(previous) => format!("resuming from the previous one, {}", previous.display()),
            None => "starting over from step 0".to_string(),
        };
        (hooks.warn)(&format!(
            "the checkpoint {} is damaged and is not used: {damage}; {next}",
            dir.display()
        ));
        damaged.push(dir.clone());
    }
    Ok((None, damaged))
}

/// A verified checkpoint, loaded; or what is damaged in it.
fn load_checkpoint<B: AutodiffBackend>(
    dir: &Path,
    base: &BaseModel,
    spec: &TrainSpec,
    meta: &DataMeta,
    device: &B::Device,
) -> Result<Resumed<B>, String> {
    let (state, metrics) = verify_checkpoint(dir)?;
    let bytes =
        std::fs::read(dir.join("optimizer.bin")).map_err(|e| format!("optimizer.bin: {e}"))?;
    let model = load_weights::<B>(&dir.join("weights"), base, spec, meta, device)?;
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let unreadable = |e: RecorderError| format!("optimizer.bin cannot be read: {e}");
    type Plain<B> = OptimizerAdaptor<AdamW, CausalLm<B>, B>;
    let record = match state.optimizer {
        OptimizerFormat::CompensatedAdamw => recorder.load(bytes, device).map_err(unreadable)?,
        OptimizerFormat::PlainAdamw => crate::optimizer::from_plain_adamw::<B, CausalLm<B>>(
            recorder
                .load::<<Plain<B> as Optimizer<CausalLm<B>, B>>::Record>(bytes, device)
                .map_err(unreadable)?,
        ),
    };
    let optim = adamw::<B>(&spec.adamw).load_record(record);
    Ok((model, optim, state, metrics))
}

/// The model with the trainable weights that [`write_trainable`] wrote in `weights` (a full
/// model, or the base with its adapter).
fn load_weights<B: AutodiffBackend>(
    weights: &Path,
    base: &BaseModel,
    spec: &TrainSpec,
    meta: &DataMeta,
    device: &B::Device,
) -> Result<CausalLm<B>, String> {
    match &spec.method {
        Method::Full => load_model_with::<B>(weights, device, true),
        Method::Lora(_) => {
            let m: CausalLm<B> = match base {
                BaseModel::Dir(d) => {
                    load_model_with(d, device, false).map_err(|e| format!("the base model: {e}"))?
                }
                BaseModel::Init { config, seed } => init_model(config, *seed, 0.02, device, false),
            };
            let m = if meta.vocab_size_after > m.config.vocab_size {
                m.resize_embeddings(meta.vocab_size_after)
            } else {
                m
            };
            m.load_peft_adapter(weights, true)
        }
    }
    .map_err(|e| format!("its weights cannot be loaded: {e}"))
}

/// The model is trained on at most `max_position_embeddings` positions (any length under
/// dynamic NTK scaling, which exists to stretch the context): a longer example would be
/// trained where the model never was, and a longer packed row (its examples side by side)
/// would be given an attention mask of its length squared — a tokenize `max_len` far beyond
/// the context packs the whole dataset into one row.
fn check_sequence_lengths(data: &Dataset, config: &ModelConfig) -> Result<(), TrainError> {
    let unit = if data.packed() {
        "packed row"
    } else {
        "example"
    };
    let longest = data.longest_unit();
    let Some(limit) = config.max_positions() else {
        return Ok(());
    };
    if longest > limit {
        return Err(TrainError::TooLong {
            unit,
            longest,
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk while saving says so, and that the last checkpoint is kept; it is not
    /// reported as a damaged checkpoint.
    #[test]
    fn a_full_disk_while_saving_says_so() {
        let full = std::fs::write("/dev/full", b"x").unwrap_err();
        assert_eq!(full.kind(), std::io::ErrorKind::StorageFull);
        let e = SaveFailure::io(Path::new("work/checkpoint.partial/optimizer.bin"))(full)
            .into_error(12, 10)
            .to_string();
        assert!(e.contains("the disk is full"), "{e}");
        assert!(e.contains("resumes from the checkpoint at step 10"), "{e}");
        assert!(e.contains("optimizer.bin"), "{e}");
        assert!(!e.contains("bad checkpoint"), "{e}");
    }

    /// A state whose losses need all 17 digits to round-trip reads back to the same digest
    /// (JSON's default float parser may land one ulp off, which made sound checkpoints look
    /// damaged).
    #[test]
    fn a_state_with_any_loss_reads_back_to_its_own_digest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("optimizer.bin"), b"moments").unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), "{}\n".repeat(7)).unwrap();
        for (first, best) in [
            (1.8633077471020778, 0.9708457963667825),
            (1.7437576519952733, 0.1),
        ] {
            let state = CheckpointState {
                step: 7,
                metrics_lines: 7,
                tokens: 700,
                first_loss: Some(first),
                eval: EvalState {
                    best: Some(crate::heldout::Best {
                        step: 6,
                        loss: best,
                    }),
                    since_best: 1,
                },
                optimizer: OptimizerFormat::CompensatedAdamw,
            };
            let files = digest_files(dir.path()).unwrap();
            let manifest = CheckpointManifest::new(state.clone(), files);
            std::fs::write(
                dir.path().join("state.json"),
                serde_json::to_vec_pretty(&manifest).unwrap(),
            )
            .unwrap();
            let (read, _) = verify_checkpoint(dir.path()).unwrap();
            assert_eq!(read, state);
        }
    }
}
