//! `kind: train` — fine-tunes a model of any family pipe-model runs on a `tokenize` stage's
//! dataset: full or LoRA, AdamW with a warm-up + cosine/linear/constant schedule, token-exact
//! gradient accumulation, global-norm clipping; checkpoints in the stage's work directory, so a killed
//! or interrupted run continues where it stopped (on CPU, to the same final weights).
//!
//! ```yaml
//! train:
//!   kind: train
//!   data: tokens                 # a tokenize stage
//!   model: model                 # a stage or directory with a Hugging Face checkpoint,
//!                                # or {init: {…config.json fields…}, seed: 0}
//!   method: lora                 # or full
//!   lora: {r: 8, alpha: 16, dropout: 0.05, target_modules: all-linear,
//!          modules_to_save: [embed_tokens, lm_head]}   # optional: trained in full
//!   lr: 2.0e-4
//!   schedule: cosine             # linear, constant
//!   warmup_ratio: 0.03           # or warmup_steps
//!   epochs: 3                    # or max_steps
//!   batch_size: 128              # per optimizer step = micro_batch_size × accumulation
//!   micro_batch_size: 4
//!   gradient_checkpointing: true # less memory: recompute each layer in the backward pass
//!   device: cpu                  # or cuda, cuda:N; `devices: [cuda:0, cuda:1]` (or
//!                                # `[cpu, cpu]`): data parallel, one replica per entry
//! ```

use anyhow::{anyhow, bail};
use burn::backend::Autodiff;
use pipe_core::diag::{FieldError, FieldPath, Target};
use pipe_core::{
    Input, InputSource, Interrupted, KeyFields, ParseContext, Stage, StageContext, StageInfo,
    StageKind,
};
use pipe_data::dataset::Dataset;
use pipe_model::{LoraSpec, MatmulPrecision, Targets};
use pipe_train::memory::{
    human_bytes, plan_training, what_would_fit, LoraShape, MemoryPlan, TrainShape,
};
use pipe_train::{
    AdamWSettings, BaseModel, Bf16Rounding, DataMeta, Decay, Dirs, EvalSettings, Hooks, Method,
    NodeRun, Splits, TrainError, TrainSpec,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::mlflow::{params_of, MlflowRun, TrackingFields};
use crate::sources::LocalSources;

use crate::models::{find_weights, Device, InitKey, ModelField, ModelSource, Weights};

pub struct TrainKind;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
enum TargetsField {
    All(String),
    Names(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct LoraFields {
    #[serde(default = "default_r")]
    r: usize,
    #[serde(default = "default_alpha")]
    alpha: f64,
    #[serde(default)]
    dropout: f64,
    #[serde(default = "default_targets")]
    target_modules: TargetsField,
    /// Modules trained in full beside the adapters (PEFT's `modules_to_save`), e.g.
    /// `[embed_tokens, lm_head]` when the vocabulary grew.
    #[serde(default)]
    modules_to_save: Vec<String>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> TargetsField {
    TargetsField::All("all-linear".into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum MethodField {
    Full,
    Lora,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Dtype {
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
enum Bf16RoundingField {
    Compensated,
    Stochastic,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Fields {
    data: String,
    model: ModelField,
    #[serde(default = "default_method")]
    method: MethodField,
    #[serde(default)]
    lora: Option<LoraFields>,
    lr: f64,
    #[serde(default = "default_schedule")]
    schedule: Decay,
    #[serde(default)]
    warmup_ratio: f64,
    #[serde(default)]
    warmup_steps: Option<u64>,
    #[serde(default = "default_epochs")]
    epochs: u64,
    #[serde(default)]
    max_steps: Option<u64>,
    batch_size: usize,
    #[serde(default)]
    micro_batch_size: Option<usize>,
    #[serde(default = "default_clip")]
    max_grad_norm: Option<f64>,
    #[serde(default)]
    weight_decay: f64,
    #[serde(default = "default_beta1")]
    adam_beta1: f64,
    #[serde(default = "default_beta2")]
    adam_beta2: f64,
    #[serde(default = "default_eps")]
    adam_epsilon: f64,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default)]
    save_steps: Option<u64>,
    /// The precision of the computation: `f32`, or `bf16` — mixed precision as PyTorch's
    /// autocast: matrix products in bf16, parameters, optimizer, norms, softmax, loss in f32.
    #[serde(default = "default_dtype")]
    dtype: Dtype,
    /// The dtype of the saved weights.
    #[serde(default = "default_dtype")]
    save_dtype: Dtype,
    /// Full fine-tuning with `dtype: bf16`: `bf16` keeps the projection matrices, their
    /// gradients and AdamW's moments in bf16, with compensated (Kahan) updates — 10 bytes a
    /// parameter instead of 16, so that a 7B model trains on one 80 GB GPU. Embeddings, the
    /// output layer and norms stay f32.
    #[serde(default = "default_dtype")]
    weights: Dtype,
    /// How `weights: bf16` rounds each update back to bf16: `compensated` (the default) keeps
    /// what rounding dropped and adds it to the next update; `stochastic` rounds up or down at
    /// random in proportion, unbiased, and keeps nothing: 8 bytes a parameter instead of 10.
    #[serde(default)]
    bf16_rounding: Option<Bf16RoundingField>,
    /// `cpu`, or `cuda[:N]` (builds with the `cuda` feature).
    #[serde(default)]
    device: Option<String>,
    /// Keep only each layer's input from the forward pass and recompute one layer at a time
    /// in the backward pass: one layer's intermediate results held instead of all of them, a
    /// third more time, the same weights.
    #[serde(default)]
    gradient_checkpointing: bool,
    /// Data parallelism: one replica per entry, e.g. `[cuda:0, cuda:1]`, or `[cpu, cpu]` to
    /// work on two CPU cores at once. Instead of `device`.
    #[serde(default)]
    devices: Option<Vec<String>>,
    /// Data parallelism across machines: one process per node, each with this stage's
    /// `device`/`devices`, summing their gradients at every step. Runs under `executor:
    /// slurm` (one task per node through `srun`) or by `pipe run-stage` started on each node.
    #[serde(default)]
    nodes: Option<usize>,
    /// Held-out loss on the tokenize stage's validation split every this many steps (and at
    /// the last step), into metrics.jsonl and TensorBoard.
    #[serde(default)]
    eval_steps: Option<u64>,
    /// Which weights are the outputs: the last step's, or the best held-out loss's.
    #[serde(default)]
    keep: Keep,
    /// Stop after this many evaluations without a lower held-out loss.
    #[serde(default)]
    early_stopping_patience: Option<u64>,
    /// Log params and every step's values to an MLflow server (a view of the run, not part
    /// of its result).
    #[serde(default)]
    tracking: Option<TrackingFields>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Keep {
    #[default]
    Last,
    Best,
}

impl Fields {
    /// One device per replica.
    fn replicas(&self) -> Vec<String> {
        match (&self.devices, &self.device) {
            (Some(list), _) => list.clone(),
            (None, Some(one)) => vec![one.clone()],
            (None, None) => vec!["cpu".into()],
        }
    }
}

fn one(n: &usize) -> bool {
    *n == 1
}

fn is_f32(d: &Dtype) -> bool {
    *d == Dtype::F32
}

fn default_method() -> MethodField {
    MethodField::Full
}
fn default_schedule() -> Decay {
    Decay::Cosine
}
fn default_epochs() -> u64 {
    1
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_seed() -> u64 {
    42
}
fn default_dtype() -> Dtype {
    Dtype::F32
}

/// What decides a train stage's weights (see `pipe_core::key`): how the model is initialised
/// when it is not a checkpoint (a checkpoint and the data are inputs, by content), the method,
/// the optimisation, the seed, and what changes float rounding — the micro-batch size, the
/// number of replicas, the compute dtype — and the saved dtype. Not where it runs (`device`),
/// how often it saves (`save_steps`) or whether it recomputes activations
/// (`gradient_checkpointing`): those make the same weights.
#[derive(Serialize)]
struct TrainKey<'a> {
    init: Option<InitKey<'a>>,
    method: MethodField,
    lora: Option<LoraKey<'a>>,
    lr: f64,
    schedule: Decay,
    warmup_ratio: f64,
    warmup_steps: Option<u64>,
    epochs: u64,
    max_steps: Option<u64>,
    batch_size: usize,
    micro_batch_size: usize,
    max_grad_norm: Option<f64>,
    weight_decay: f64,
    adam_beta1: f64,
    adam_beta2: f64,
    adam_epsilon: f64,
    seed: u64,
    dtype: Dtype,
    save_dtype: Dtype,
    /// Absent at f32, so that keys from before bf16 weights stay the same.
    #[serde(skip_serializing_if = "is_f32")]
    weights: Dtype,
    /// Absent for compensated updates (the default, and all there was before), so that
    /// their keys stay the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    bf16_rounding: Option<Bf16RoundingField>,
    replicas: usize,
    /// Nodes add their replicas' sums, which rounds differently from one node's replicas.
    /// Absent at 1, so that keys from before multi-node training stay the same.
    #[serde(skip_serializing_if = "one")]
    nodes: usize,
    eval_steps: Option<u64>,
    keep: Keep,
    early_stopping_patience: Option<u64>,
}

/// The LoRA settings in effect (defaults filled in).
#[derive(Serialize)]
struct LoraKey<'a> {
    r: usize,
    alpha: f64,
    dropout: f64,
    target_modules: TargetsField,
    modules_to_save: &'a [String],
}

impl TrainStage {
    fn key(&self) -> TrainKey<'_> {
        let (f, spec) = (&self.fields, &self.spec);
        let lora = match &spec.method {
            Method::Full => None,
            Method::Lora(l) => Some(LoraKey {
                r: l.r,
                alpha: l.alpha,
                dropout: l.dropout,
                target_modules: match &l.targets {
                    Targets::AllLinear => TargetsField::All("all-linear".into()),
                    Targets::Names(names) => TargetsField::Names(names.clone()),
                },
                modules_to_save: &l.modules_to_save,
            }),
        };
        TrainKey {
            init: InitKey::of(&self.model),
            method: f.method,
            lora,
            lr: f.lr,
            schedule: f.schedule,
            warmup_ratio: f.warmup_ratio,
            warmup_steps: f.warmup_steps,
            epochs: f.epochs,
            max_steps: f.max_steps,
            batch_size: f.batch_size,
            micro_batch_size: spec.micro_batch_size,
            max_grad_norm: f.max_grad_norm,
            weight_decay: f.weight_decay,
            adam_beta1: f.adam_beta1,
            adam_beta2: f.adam_beta2,
            adam_epsilon: f.adam_epsilon,
            seed: f.seed,
            dtype: f.dtype,
            save_dtype: f.save_dtype,
            weights: f.weights,
            bf16_rounding: f
                .bf16_rounding
                .filter(|&r| r == Bf16RoundingField::Stochastic),
            replicas: f.replicas().len(),
            nodes: f.nodes.unwrap_or(1),
            eval_steps: f.eval_steps,
            keep: f.keep,
            early_stopping_patience: f.early_stopping_patience,
        }
    }
}

struct TrainStage {
    /// The user's files that inputs are store copies of, for error messages.
    sources: LocalSources,
    id: String,
    fields: Fields,
    spec: TrainSpec,
    model: ModelSource,
    inputs: Vec<Input>,
}

impl StageKind for TrainKind {
    fn name(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        // 2: every model family; a seeded model's key holds the family-aware config, and
        // scores are scaled by multiplication (as transformers does; other float rounding).
        2
    }
    fn summary(&self) -> &'static str {
        "fine-tune a model (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3; full or LoRA), resumable from checkpoints, evaluated as it goes"
    }
    fn fields_schema(&self) -> serde_json::Value {
        crate::schema_of::<Fields>()
    }
    fn run_settings(&self) -> &'static [&'static str] {
        // `devices` enters the key by its count alone (replicas round differently).
        &[
            "device",
            "devices",
            "save_steps",
            "gradient_checkpointing",
            "tracking",
        ]
    }
    fn parse(
        &self,
        cx: &ParseContext<'_>,
        fields: serde_yaml::Value,
    ) -> Result<Box<dyn Stage>, FieldError> {
        let f: Fields = cx.fields(fields)?;
        let data = cx.stage_ref(&cx.path.key("data"), &f.data)?;
        let mut inputs = vec![Input {
            name: "data".into(),
            source: data,
            field: cx.path.key("data"),
        }];
        let model = f.model.parse(cx, "model", &mut inputs)?;
        let method = match (f.method, &f.lora) {
            (MethodField::Full, None) => Method::Full,
            (MethodField::Full, Some(_)) => {
                return Err(cx.error("lora", "`lora:` settings need `method: lora`"))
            }
            (MethodField::Lora, l) => {
                let l = l.clone().unwrap_or(LoraFields {
                    r: default_r(),
                    alpha: default_alpha(),
                    dropout: 0.0,
                    target_modules: default_targets(),
                    modules_to_save: Vec::new(),
                });
                if l.r == 0 {
                    return Err(cx.error("lora", "LoRA rank `r` must be at least 1"));
                }
                // Adapters are r × the layer's width: a rank beyond any width only allocates.
                const MAX_RANK: usize = 1 << 16;
                if l.r > MAX_RANK {
                    return Err(cx.error(
                        "lora",
                        format!(
                            "LoRA rank `r` {} is more than {MAX_RANK}; ranks are usually 4 to 256",
                            l.r
                        ),
                    ));
                }
                if !(0.0..1.0).contains(&l.dropout) {
                    return Err(
                        cx.error("lora", format!("dropout {} must be in [0, 1)", l.dropout))
                    );
                }
                let targets = match l.target_modules {
                    TargetsField::All(s) if s == "all-linear" => Targets::AllLinear,
                    TargetsField::All(s) => Targets::Names(vec![s]),
                    TargetsField::Names(v) => Targets::Names(v),
                };
                Method::Lora(LoraSpec {
                    r: l.r,
                    alpha: l.alpha,
                    dropout: l.dropout,
                    targets,
                    modules_to_save: l.modules_to_save,
                })
            }
        };
        if f.batch_size == 0 {
            return Err(cx.error("batch_size", "batch_size must be at least 1"));
        }
        if f.micro_batch_size == Some(0) {
            return Err(cx.error("micro_batch_size", "micro_batch_size must be at least 1"));
        }
        let micro = f.micro_batch_size.unwrap_or(f.batch_size);
        if !f.batch_size.is_multiple_of(micro) {
            return Err(cx
                .error("batch_size", format!("batch_size {} is not a multiple of micro_batch_size {micro}", f.batch_size))
                .with_help("batch_size is the effective batch: micro_batch_size × gradient accumulation steps"));
        }
        if !(f.lr.is_finite() && f.lr > 0.0) {
            return Err(cx.error("lr", "the learning rate must be a positive number"));
        }
        check_devices(cx, &f, micro)?;
        if f.weights == Dtype::Bf16 {
            if f.dtype != Dtype::Bf16 {
                return Err(cx
                    .error("weights", "`weights: bf16` needs `dtype: bf16`")
                    .with_help("bf16 weights are multiplied in bf16: set `dtype: bf16`"));
            }
            if f.method != MethodField::Full {
                return Err(cx
                    .error("weights", "`weights: bf16` is for full fine-tuning")
                    .with_help("LoRA's adapters are small and train in f32; under `dtype: bf16` its frozen base is kept in bf16 already"));
            }
        }
        if f.bf16_rounding.is_some() && f.weights != Dtype::Bf16 {
            return Err(cx
                .error("bf16_rounding", "`bf16_rounding` is for `weights: bf16`")
                .with_help("f32 weights take every update as it is: set `weights: bf16` (full fine-tuning under `dtype: bf16`) or remove `bf16_rounding`"));
        }
        check_evaluation(cx, &f)?;
        let spec = TrainSpec {
            method,
            lr: f.lr,
            decay: f.schedule,
            warmup_ratio: f.warmup_ratio,
            warmup_steps: f.warmup_steps,
            epochs: f.epochs,
            max_steps: f.max_steps,
            batch_size: f.batch_size,
            micro_batch_size: micro,
            max_grad_norm: f.max_grad_norm,
            adamw: AdamWSettings {
                beta1: f.adam_beta1,
                beta2: f.adam_beta2,
                eps: f.adam_epsilon,
                weight_decay: f.weight_decay,
                bf16_rounding: match f.bf16_rounding {
                    Some(Bf16RoundingField::Stochastic) => Bf16Rounding::Stochastic,
                    Some(Bf16RoundingField::Compensated) | None => Bf16Rounding::Compensated,
                },
            },
            seed: f.seed,
            save_steps: f.save_steps,
            save_dtype_bf16: f.save_dtype == Dtype::Bf16,
            matmul_precision: match f.dtype {
                Dtype::F32 => MatmulPrecision::F32,
                Dtype::Bf16 => MatmulPrecision::Bf16,
            },
            bf16_weights: f.weights == Dtype::Bf16,
            gradient_checkpointing: f.gradient_checkpointing,
            eval: EvalSettings {
                every: f.eval_steps,
                keep_best: f.keep == Keep::Best,
                early_stopping_patience: f.early_stopping_patience,
            },
        };
        Ok(Box::new(TrainStage {
            sources: LocalSources::default(),
            id: cx.stage_id.to_string(),
            fields: f,
            spec,
            model,
            inputs,
        }))
    }
}

impl Stage for TrainStage {
    fn inputs(&self) -> Vec<Input> {
        self.inputs.clone()
    }
    fn resources(&self) -> pipe_core::resources::Resources {
        crate::models::gpu_resources(self.fields.replicas().iter().map(String::as_str))
    }
    fn key_fields(&self) -> KeyFields {
        KeyFields::of(&self.key())
    }
    fn outputs(&self) -> Option<Vec<String>> {
        let weights = match self.spec.method {
            Method::Full => "model",
            Method::Lora(_) => "adapter",
        };
        Some(vec![
            weights.into(),
            "metrics.jsonl".into(),
            "summary.json".into(),
        ])
    }
    fn resumable(&self) -> bool {
        true
    }
    fn nodes(&self) -> usize {
        self.fields.nodes.unwrap_or(1)
    }
    fn check_upstream<'a>(
        &self,
        stage: &dyn Fn(&str) -> Option<StageInfo<'a>>,
    ) -> Result<(), FieldError> {
        self.sources.learn(&self.inputs, stage);
        let Some(data) = self.inputs.iter().find(|i| i.name == "data") else {
            return Ok(());
        };
        let InputSource::Stage {
            stage: tokens_id, ..
        } = &data.source
        else {
            return Ok(());
        };
        let Some(tokens) = stage(tokens_id) else {
            return Ok(());
        };
        if matches!(tokens.kind, "format" | "train" | "evaluate" | "export") {
            return Err(FieldError::new(
                data.field.clone(),
                Target::Value,
                format!(
                    "`data` must be a tokenize stage; `{tokens_id}` is a `{}` stage",
                    tokens.kind
                ),
            )
            .with_help("training reads token ids: put a `kind: tokenize` stage in between"));
        }
        if tokens.kind != "tokenize" {
            return Ok(());
        }
        if let Some(format_id) = stage_input(&tokens, "input") {
            if let Some(format) = stage(format_id).filter(|f| f.kind == "format") {
                if self.spec.eval.every.is_some() && holds_no_record_out(format.fields) {
                    return Err(FieldError::new(
                        FieldPath::root()
                            .key("stages")
                            .key(self.id.as_str())
                            .key("eval_steps"),
                        Target::Value,
                        format!(
                            "`eval_steps` needs held-out examples, and `{format_id}` holds none out (val_size: 0)"
                        ),
                    )
                    .with_help(format!(
                        "give `{format_id}` a val_size (a fraction such as 0.05, or a count)"
                    )));
                }
                if holds_every_record_out(format.fields) {
                    return Err(FieldError::new(
                        data.field.clone(),
                        Target::Value,
                        format!(
                            "`{tokens_id}` holds no training examples: its input `{format_id}` holds every record out for evaluation (val_size: 1.0)"
                        ),
                    )
                    .with_help(format!(
                        "score an evaluation-only split with `kind: evaluate` (`data: {tokens_id}`); to train, give `{format_id}` a val_size below 1"
                    )));
                }
            }
        }
        let max_len = tokens.fields["max_len"].as_u64().unwrap_or(0);
        if let Some(positions) = self.model_positions(stage) {
            if max_len > positions as u64 {
                return Err(FieldError::new(
                    FieldPath::root()
                        .key("stages")
                        .key(tokens_id.as_str())
                        .key("max_len"),
                    Target::Value,
                    format!(
                        "max_len {max_len} is longer than the model of stage `{}` reads: {positions} positions (its max_position_embeddings)",
                        self.id
                    ),
                )
                .with_help(format!(
                    "lower max_len to {positions} or less, or train a model with a longer context"
                )));
            }
        }
        Ok(())
    }
    fn memory_plan<'a>(&self, stage: &dyn Fn(&str) -> Option<StageInfo<'a>>) -> Option<String> {
        let Some(config) = self.model_config(stage) else {
            return Some(
                "known once its model is available (a download or an earlier stage)".into(),
            );
        };
        let data = self.inputs.iter().find(|i| i.name == "data")?;
        let InputSource::Stage { stage: tokens, .. } = &data.source else {
            return None;
        };
        let max_len = stage(tokens)?.fields["max_len"].as_u64()?;
        let shape = self.train_shape(usize::try_from(max_len).ok()?);
        Some(describe_plan(&plan_training(&config, &shape), &shape))
    }
    fn run(&self, cx: &mut StageContext) -> anyhow::Result<()> {
        self.run_stage(cx)
            .map_err(|e| self.sources.rename_in(cx, e))
    }
}

impl TrainStage {
    /// The MLflow run of this attempt, when the stage is tracked and the server answers.
    fn start_tracking(&self, cx: &StageContext, warn: &dyn Fn(&str)) -> Option<MlflowRun> {
        let fields = self.fields.tracking.as_ref()?;
        let params = params_of(self.key_fields().as_json());
        match MlflowRun::start(fields, &cx.stage_id, &cx.key, &params, &cx.work_dir) {
            Ok(run) => {
                cx.log(&format!(
                    "MLflow: logging to run {} at {}",
                    run.run_id(),
                    fields.mlflow
                ));
                Some(run)
            }
            Err(e) => {
                warn(&format!("MLflow: {e}; training goes on untracked"));
                None
            }
        }
    }

    /// This process's part in a run across `nodes:`, from how pipe run-stage was started.
    fn node_run(&self, cx: &StageContext) -> anyhow::Result<Option<NodeRun>> {
        let nodes = self.nodes();
        match &cx.node {
            None if nodes > 1 => bail!(
                "`nodes: {nodes}`: this stage runs as {nodes} processes, one per node; run it under `executor: slurm`, or start `pipe run-stage` on each node (README, \"Multi-node training\")"
            ),
            None => Ok(None),
            Some(node) if node.nodes != nodes => bail!(
                "this process was started as node {} of {}, but the stage has `nodes: {nodes}`",
                node.rank,
                node.nodes
            ),
            Some(node) => Ok(Some(NodeRun {
                role: node.clone(),
                key: cx.key.clone(),
            })),
        }
    }

    fn run_stage(&self, cx: &mut StageContext) -> anyhow::Result<()> {
        let node_run = self.node_run(cx)?;
        let devices = self
            .fields
            .replicas()
            .iter()
            .map(|d| Device::open(d))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let data_dir = cx.input("data")?.to_path_buf();
        let data = Dataset::open(&data_dir.join("train.safetensors"))?;
        let heldout = match self.spec.eval.every {
            Some(_) => Some(Dataset::open(&data_dir.join("val.safetensors"))?),
            None => None,
        };
        if data.is_empty() {
            bail!(
                "`data` holds no training examples: its train split is empty (every record was held out for validation, an evaluation-only split); train on a split that keeps records for training, or score this one with `kind: evaluate`"
            );
        }
        let meta_text = std::fs::read_to_string(data_dir.join("meta.json"))
            .map_err(|e| anyhow!("`data` must be a tokenize stage (no meta.json): {e}"))?;
        let meta: DataMeta = serde_json::from_str(&meta_text)?;
        let base = match &self.model {
            ModelSource::Init { config, seed } => BaseModel::Init {
                config: config.clone(),
                seed: *seed,
            },
            ModelSource::Input(name) => match find_weights(cx.input(name)?)? {
                Weights::Model(dir) => BaseModel::Dir(dir),
                Weights::Adapter(dir) => bail!(
                    "{} is a LoRA adapter; train from the full model it belongs to (export it merged with `kind: export`, `format: hf`)",
                    dir.display()
                ),
            },
        };
        let config = match &base {
            BaseModel::Init { config, .. } => Some(config.as_ref().clone()),
            BaseModel::Dir(dir) => {
                pipe_model::ModelConfig::from_file(&dir.join("config.json")).ok()
            }
        };
        if let Some(config) = config {
            // Micro-batches are padded to their longest unit: a plan at the longest bounds every step.
            self.check_memory(cx, &config, data.longest_unit(), &devices)?;
        }
        let total = pipe_train::run::total_steps(&self.spec, pipe_train::run::units(&data));
        cx.progress().set_length(total);
        let cx_ref = &*cx;
        let cancelled = || cx_ref.is_cancelled();
        let progress = |step: u64, _total: u64, loss: f64| {
            cx_ref.progress().set_position(step);
            cx_ref.progress().set_message(format!("loss {loss:.4}"));
        };
        let log = |line: &str| cx_ref.log(line);
        let warn = |line: &str| {
            cx_ref.log(&format!("warning: {line}"));
            tracing::warn!("{}: {line}", cx_ref.stage_id);
        };
        // Node 0 alone reports to MLflow, as it alone writes the run's files.
        let leader = pipe_train::run::writes_results(node_run.as_ref());
        let mlflow =
            std::cell::RefCell::new(leader.then(|| self.start_tracking(cx_ref, &warn)).flatten());
        let scalars = |step: u64, values: &[(&str, f64)]| {
            let mut run = mlflow.borrow_mut();
            if let Some(Err(e)) = run.as_mut().map(|r| r.log(step, values)) {
                warn(&format!("MLflow: {e}; training goes on untracked"));
                *run = None;
            }
        };
        let hooks = Hooks {
            cancelled: &cancelled,
            progress: &progress,
            log: &log,
            warn: &warn,
            scalars: &scalars,
        };
        // Beside the stage's logs, not among its outputs: they hold wall times and speed.
        let events = cx_ref.log_path.with_file_name("tensorboard");
        let dirs = Dirs {
            work: &cx_ref.work_dir,
            out: &cx_ref.out_dir,
            events: leader.then_some(events.as_path()),
            nodes: node_run.as_ref(),
        };
        let spec = &self.spec;
        macro_rules! train_on {
            ($backend:ty, $devices:expr) => {
                pipe_train::train::<$backend>(
                    &base,
                    &Splits {
                        train: &data,
                        heldout: heldout.as_ref(),
                    },
                    &meta,
                    spec,
                    &dirs,
                    &hooks,
                    $devices,
                )
            };
        }
        let result = match devices[0] {
            Device::Cpu => {
                use pipe_model::CpuBackend;
                let replicas = vec![Default::default(); devices.len()];
                train_on!(Autodiff<CpuBackend>, &replicas)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                use burn::backend::Cuda;
                let gpus: Vec<_> = devices
                    .iter()
                    .map(|d| match d {
                        Device::Cuda(index) => burn::backend::cuda::CudaDevice::new(*index),
                        Device::Cpu => unreachable!("check_devices refuses mixed kinds"),
                    })
                    .collect();
                // bf16 is mixed precision (`spec.matmul_precision`) on f32 parameters.
                train_on!(Autodiff<Cuda<f32, i32>>, &gpus)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => unreachable!("Device::open refuses cuda without the feature"),
        };
        let status = match &result {
            Ok(_) => "FINISHED",
            Err(TrainError::Interrupted { .. }) => "KILLED",
            Err(_) => "FAILED",
        };
        if let Some(run) = mlflow.borrow_mut().as_mut() {
            if let Ok(t) = &result {
                let summary = [
                    ("summary/last_loss", t.summary.last_loss),
                    ("summary/eval_loss", t.summary.eval_loss),
                    ("summary/best_eval_loss", t.summary.best.map(|b| b.loss)),
                    ("summary/tokens_per_second", Some(t.tokens_per_s)),
                ];
                let values: Vec<(&str, f64)> = summary
                    .iter()
                    .filter_map(|(k, v)| v.map(|v| (*k, v)))
                    .collect();
                let _ = run.log(t.summary.steps, &values);
            }
            if let Err(e) = run.end(status) {
                warn(&format!("MLflow: {e}"));
            }
        }
        let trained = match result {
            Ok(s) => s,
            Err(TrainError::Interrupted { step }) => {
                cx.log(&format!("interrupted at step {step}; checkpoint saved"));
                return Err(Interrupted.into());
            }
            Err(e) => return Err(e.into()),
        };
        if !leader {
            cx.log(&format!(
                "{} steps done; node 0 writes the results",
                trained.summary.steps
            ));
            return Ok(());
        }
        // The model directory carries the tokenizer it was trained with.
        let weights = match self.spec.method {
            Method::Full => cx.out_dir.join("model"),
            Method::Lora(_) => cx.out_dir.join("adapter"),
        };
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            let src = data_dir.join(f);
            if src.exists() {
                std::fs::copy(&src, weights.join(f))?;
            }
        }
        cx.log(&format!(
            "{} steps over {} examples: loss {:.4} → {:.4}",
            trained.summary.steps,
            trained.summary.examples,
            trained.summary.first_loss.unwrap_or(f64::NAN),
            trained.summary.last_loss.unwrap_or(f64::NAN)
        ));
        cx.set_metrics(serde_json::to_value(&trained)?);
        Ok(())
    }
}

impl TrainStage {
    /// The context of the model it starts from, when the pipeline tells it before running: a
    /// seeded model, a local model directory (given directly or through a download stage), or
    /// the seeded model another train stage trained.
    fn model_positions<'a>(&self, stage: &dyn Fn(&str) -> Option<StageInfo<'a>>) -> Option<usize> {
        self.model_config(stage).and_then(|c| c.max_positions())
    }

    /// The shape of the model this stage starts from, where it can be known before running: a
    /// seeded model, a local directory (directly or through a download stage), or another
    /// train stage's seeded model.
    fn model_config<'a>(
        &self,
        stage: &dyn Fn(&str) -> Option<StageInfo<'a>>,
    ) -> Option<pipe_model::ModelConfig> {
        crate::models::known_config(&self.model, &self.inputs, stage)
    }

    /// What decides this run's memory besides the model: `seq_len` tokens a row.
    fn train_shape(&self, seq_len: usize) -> TrainShape {
        let replicas = self.fields.replicas();
        TrainShape {
            lora: match &self.spec.method {
                Method::Full => None,
                Method::Lora(l) => Some(LoraShape {
                    rank: l.r,
                    targets_per_layer: match &l.targets {
                        Targets::AllLinear => 7,
                        Targets::Names(names) => names.len().min(7),
                    },
                }),
            },
            micro_batch_size: self.spec.micro_batch_size,
            seq_len,
            bf16_products: self.spec.matmul_precision == MatmulPrecision::Bf16,
            bf16_weights: self.spec.bf16_weights,
            bf16_rounding: self.spec.adamw.bf16_rounding,
            gradient_checkpointing: self.fields.gradient_checkpointing,
            replicas: replicas.len(),
            on_gpu: replicas.iter().any(|d| d.starts_with("cuda")),
        }
    }

    /// Refuses a run whose memory plan is larger than what the device has free, before
    /// anything is loaded, saying what would fit; logs the plan otherwise.
    fn check_memory(
        &self,
        cx: &StageContext,
        config: &pipe_model::ModelConfig,
        seq_len: usize,
        devices: &[Device],
    ) -> anyhow::Result<()> {
        let shape = self.train_shape(seq_len);
        let plan = plan_training(config, &shape);
        cx.log(&format!("memory plan: {}", describe_plan(&plan, &shape)));
        let device = devices.first().copied().unwrap_or(Device::Cpu);
        let Some((place, available)) = crate::models::free_memory(cx, device) else {
            return Ok(());
        };
        if plan.total <= available {
            return Ok(());
        }
        let advice = what_would_fit(config, &shape, self.spec.batch_size, available);
        bail!(
            "this run needs about {} on {place}, which has {} free; nothing was loaded\n  plan: {}\n  {}",
            human_bytes(plan.total),
            human_bytes(available),
            describe_plan(&plan, &shape),
            if advice.is_empty() {
                "no setting of this stage would fit: use a smaller model or a device with more memory".to_string()
            } else {
                format!("settings that would fit: {}", advice.join("; or "))
            }
        )
    }
}

/// A memory plan in words: the total per device and what makes it up.
fn describe_plan(plan: &MemoryPlan, shape: &TrainShape) -> String {
    let per = if shape.on_gpu || shape.replicas == 1 {
        "per device".to_string()
    } else {
        format!("for {} replicas", shape.replicas)
    };
    format!(
        "about {} {per}: weights {}, gradients {}, optimizer {}, activations {} (micro-batch {} × {} tokens{})",
        human_bytes(plan.total),
        human_bytes(plan.weights),
        human_bytes(plan.gradients),
        human_bytes(plan.optimizer),
        human_bytes(plan.activations),
        shape.micro_batch_size,
        shape.seq_len,
        if shape.gradient_checkpointing { ", gradient checkpointing" } else { "" },
    )
}

/// The stage an input of `info` named `name` reads, if it reads one.
fn stage_input<'a>(info: &StageInfo<'a>, name: &str) -> Option<&'a str> {
    match &info.inputs.iter().find(|i| i.name == name)?.source {
        InputSource::Stage { stage, .. } => Some(stage.as_str()),
        InputSource::Path(_) => None,
    }
}

/// Whether a format stage's key fields hold no record out (`val_size: 0`).
fn holds_no_record_out(fields: &serde_json::Value) -> bool {
    fields["val_size"].as_f64() == Some(0.0)
}

/// Whether a format stage's key fields hold every record out (`val_size: 1.0`).
fn holds_every_record_out(fields: &serde_json::Value) -> bool {
    let v = &fields["val_size"];
    v.is_f64() && v.as_f64() == Some(1.0)
}

/// `eval_steps` at least 1, and `keep: best` and `early_stopping_patience` only with it (they
/// act on its evaluations).
fn check_evaluation(cx: &ParseContext<'_>, f: &Fields) -> Result<(), FieldError> {
    if f.eval_steps == Some(0) {
        return Err(cx.error("eval_steps", "eval_steps must be at least 1"));
    }
    if f.early_stopping_patience == Some(0) {
        return Err(cx.error(
            "early_stopping_patience",
            "early_stopping_patience must be at least 1 (an evaluation without improvement)",
        ));
    }
    let needs = |field: &str| {
        Err(cx
            .error(
                field,
                format!("`{field}` acts on evaluations during training, and there are none"),
            )
            .with_help("set `eval_steps: N` to compute the held-out loss every N steps"))
    };
    if f.eval_steps.is_none() {
        if f.keep == Keep::Best {
            return needs("keep");
        }
        if f.early_stopping_patience.is_some() {
            return needs("early_stopping_patience");
        }
    }
    Ok(())
}

/// The devices of `device:` or `devices:`, checked: one kind, no GPU twice, and a number of
/// micro-batches per step that the replicas share evenly (`micro`: the checked micro-batch
/// size).
fn check_devices(cx: &ParseContext<'_>, f: &Fields, micro: usize) -> Result<(), FieldError> {
    if f.device.is_some() && f.devices.is_some() {
        return Err(cx
            .error("devices", "`device` and `devices` are both set")
            .with_help("`devices: [cuda:0, cuda:1]` trains on several; `device: cuda:0` on one"));
    }
    let field = if f.devices.is_some() {
        "devices"
    } else {
        "device"
    };
    let replicas = f
        .replicas()
        .iter()
        .map(|d| Device::parse(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cx.error(field, e))?;
    if replicas.is_empty() {
        return Err(cx.error("devices", "`devices` is empty; list at least one"));
    }
    let on_cpu = |d: &Device| *d == Device::Cpu;
    if replicas.iter().any(on_cpu) && !replicas.iter().all(on_cpu) {
        return Err(cx.error(
            "devices",
            "`devices` mixes the CPU and GPUs; the replicas of one run are all `cpu` or all `cuda:N`",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for d in &replicas {
        if let Device::Cuda(index) = d {
            if !seen.insert(index) {
                return Err(cx.error(
                    "devices",
                    format!("GPU {index} is listed twice in `devices`"),
                ));
            }
        }
    }
    if f.nodes == Some(0) {
        return Err(cx
            .error("nodes", "`nodes: 0`: a stage runs on at least one node")
            .with_help("leave `nodes` out to train on one"));
    }
    let nodes = f.nodes.unwrap_or(1);
    let n = replicas.len() * nodes;
    let field = if nodes > 1 { "nodes" } else { "devices" };
    if n > 1 {
        let accumulation = f.batch_size / micro;
        if !accumulation.is_multiple_of(n) {
            return Err(cx
                .error(
                    field,
                    format!(
                        "{n} replicas{} share each step's micro-batches, but there are {accumulation} (batch_size {} / micro_batch_size {micro})",
                        if nodes > 1 { format!(" ({nodes} nodes × {})", replicas.len()) } else { String::new() },
                        f.batch_size
                    ),
                )
                .with_help(shared_batch_hint(f.batch_size, micro, n)));
        }
        let dropout = f.lora.as_ref().map_or(0.0, |l| l.dropout);
        if dropout > 0.0 {
            return Err(cx
                .error(
                    field,
                    "LoRA dropout with several replicas is not reproducible: the replicas draw their masks from one shared generator in whatever order they run",
                )
                .with_help("set `lora: {dropout: 0}`, or train on one device"));
        }
    }
    Ok(())
}

/// A setting under which `n` replicas share each step's micro-batches evenly: a smaller
/// micro-batch if one fits, else a larger batch.
fn shared_batch_hint(batch: usize, micro: usize, n: usize) -> String {
    let fits = |m: usize| batch.is_multiple_of(m) && (batch / m).is_multiple_of(n);
    match (1..=micro).rev().find(|&m| fits(m)) {
        Some(m) => format!(
            "e.g. micro_batch_size: {m} ({} micro-batches per step)",
            batch / m
        ),
        None => {
            let accumulation = (batch / micro).div_ceil(n) * n;
            format!(
                "batch_size / micro_batch_size must be a multiple of {n}, e.g. batch_size: {}",
                accumulation * micro
            )
        }
    }
}
