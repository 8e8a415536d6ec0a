//! `kind: evaluate` — the numbers practitioners compare, for the tuned model and (side by
//! side) the model it started from: held-out loss and perplexity on a tokenize stage's
//! validation split, multiple-choice tasks scored by log-likelihood as lm-evaluation-harness
//! does (`acc`, `acc_norm`, standard errors), and generated samples (exact match against the
//! reference responses when they come from a format stage).
//!
//! ```yaml
//! eval:
//!   kind: evaluate
//!   model: train                 # a train stage (model or adapter), a model directory,
//!                                # or {init: {…config…}, seed: N}
//!   base: model                  # the model before tuning: evaluated beside it (and the
//!                                # base an adapter is applied to)
//!   data: tokens                 # a tokenize stage: loss/perplexity on its val split
//!   tasks:
//!     - {name: arc_easy, format: arc, path: data/arc_easy.jsonl, limit: 500}
//!     - {format: mmlu, path: data/mmlu.jsonl, num_fewshot: 5, fewshot_path: data/mmlu_dev.jsonl}
//!     - {format: piqa, path: "${params.piqa}"}   # left out while the path is ""
//!   generate:
//!     prompts: prompts           # a format stage: its val split's prompts and responses
//!                                # (conversations: the chat template with the generation
//!                                # prompt, up to the last assistant turn, its reference)
//!     instructions: ["Name three primary colours."]   # more prompts, Alpaca template
//!     chat: false                # true: instructions as user turns of the chat template
//!     # chat_template: "…"       # default: the tokenizer's tokenizer_config.json
//!     limit: 20
//!     max_new_tokens: 128
//!     temperature: 0.0           # 0: greedy; else sampled with top_p and seed
//!   batch_size: 8
//! ```
//!
//! Outputs: `metrics.json`, `report.md` (metric, base, tuned, delta), `report.html` (the same
//! drawn: the model's training curves, a bar chart per metric, the samples; self-contained),
//! `items/<task>.jsonl` (every item's log-likelihoods and predictions) and `samples.jsonl`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use burn::tensor::backend::Backend;
use pipe_core::diag::FieldError;
use pipe_core::{
    Input, InputSource, Interrupted, KeyFields, ParseContext, Stage, StageContext, StageInfo,
    StageKind,
};
use pipe_data::dataset::Dataset;
use pipe_data::format::find_data_file;
use pipe_data::prompt::{Template, TemplateSpec};
use pipe_data::records::Record;
use pipe_eval::score::{task_requests, task_result};
use pipe_eval::tasks::{read_docs, FewShot, TaskFormat};
use pipe_eval::ForwardPass;
use pipe_eval::{EvalError, Request, Sampling};
use pipe_model::{init_model, load_model, CausalLm, CpuBackend, ModelConfig};
use pipe_train::memory::{human_bytes, plan_evaluation, EvalPeak, EvalShape, MemoryPlan};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::sources::LocalSources;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::eval_report;
use crate::models::{find_weights, Device, InitKey, ModelField, ModelSource, Weights};

pub struct EvaluateKind;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct TaskFields {
    #[serde(default)]
    name: Option<String>,
    format: TaskFormat,
    path: String,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    num_fewshot: usize,
    /// A dev file whose first `num_fewshot` items are the examples; without it they are drawn
    /// (seeded) from the task's own items.
    #[serde(default)]
    fewshot_path: Option<String>,
    #[serde(default = "default_fewshot_seed")]
    fewshot_seed: u64,
    /// Encode with the tokenizer's special tokens (a Llama tokenizer's BOS), as the harness
    /// does by default since v0.4.9.2; `false` for none, as it did before.
    #[serde(default = "yes")]
    add_bos_token: bool,
}

fn yes() -> bool {
    true
}
fn default_fewshot_seed() -> u64 {
    1234
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
enum InstructionField {
    Text(String),
    Record(BTreeMap<String, String>),
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct GenerateFields {
    #[serde(default)]
    prompts: Option<String>,
    #[serde(default)]
    instructions: Vec<InstructionField>,
    /// `instructions` as user turns rendered with the chat template (with the generation
    /// prompt), instead of the Alpaca template.
    #[serde(default)]
    chat: bool,
    /// The chat template for chat prompts (default: the tokenizer's).
    #[serde(default)]
    chat_template: Option<String>,
    #[serde(default = "default_gen_limit")]
    limit: usize,
    #[serde(default = "default_max_new")]
    max_new_tokens: usize,
    #[serde(default)]
    temperature: f64,
    #[serde(default = "default_top_p")]
    top_p: f64,
    #[serde(default)]
    seed: u64,
}

fn default_gen_limit() -> usize {
    16
}
fn default_max_new() -> usize {
    128
}
fn default_top_p() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Fields {
    model: ModelField,
    #[serde(default)]
    base: Option<ModelField>,
    /// Evaluate `base` too (default: whenever it is given).
    #[serde(default)]
    compare: Option<bool>,
    #[serde(default)]
    tokenizer: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    tasks: Vec<TaskFields>,
    #[serde(default)]
    generate: Option<GenerateFields>,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default = "default_device")]
    device: String,
}

fn default_batch() -> usize {
    8
}
fn default_device() -> String {
    "cpu".into()
}

struct Task {
    name: String,
    fields: TaskFields,
}

struct EvaluateStage {
    /// The user's files that inputs are store copies of, for error messages.
    sources: LocalSources,
    fields: Fields,
    model: ModelSource,
    base: Option<ModelSource>,
    compare: bool,
    tasks: Vec<Task>,
    inputs: Vec<Input>,
}

impl StageKind for EvaluateKind {
    fn name(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        // 2: attention through the backend's own op (other float rounding).
        // 3: every model family; a seeded model's key holds the family-aware config.
        3
    }
    fn summary(&self) -> &'static str {
        "score a model (and its base, side by side): held-out perplexity, lm-eval-harness multiple choice, generated samples"
    }
    fn fields_schema(&self) -> serde_json::Value {
        crate::schema_of::<Fields>()
    }
    fn run_settings(&self) -> &'static [&'static str] {
        &["batch_size", "device"]
    }
    fn parse(
        &self,
        cx: &ParseContext<'_>,
        fields: serde_yaml::Value,
    ) -> Result<Box<dyn Stage>, FieldError> {
        let f: Fields = cx.fields(fields)?;
        let mut inputs = Vec::new();
        let model = f.model.parse(cx, "model", &mut inputs)?;
        let base = f
            .base
            .as_ref()
            .map(|b| b.parse(cx, "base", &mut inputs))
            .transpose()?;
        let compare = f.compare.unwrap_or(base.is_some());
        if compare && base.is_none() {
            return Err(cx.error(
                "compare",
                "`compare: true` needs a `base:` model to compare with",
            ));
        }
        let source = |text: &str| {
            cx.as_stage_ref(text)
                .unwrap_or_else(|| InputSource::Path(cx.resolve_path(text)))
        };
        for (name, value) in [("tokenizer", &f.tokenizer), ("data", &f.data)] {
            if let Some(v) = value {
                inputs.push(Input {
                    name: name.into(),
                    source: source(v),
                    field: cx.path.key(name),
                });
            }
        }
        let mut tasks: Vec<Task> = Vec::new();
        for (i, t) in f.tasks.iter().enumerate() {
            // An empty path leaves the task out: pipelines declare optional tasks whose file a
            // `--set params.…=FILE` supplies.
            if t.path.is_empty() {
                continue;
            }
            let at = cx.path.key("tasks").index(i);
            let name = t
                .name
                .clone()
                .unwrap_or_else(|| t.format.name().to_string());
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
            if !valid {
                return Err(FieldError::new(
                    at.key("name"),
                    pipe_core::diag::Target::Value,
                    format!("task name `{name}` must be letters, digits, `_`, `-` or `.`"),
                ));
            }
            if tasks.iter().any(|o| o.name == name) {
                return Err(FieldError::new(
                    at.clone(),
                    pipe_core::diag::Target::Key,
                    format!("two tasks are named `{name}`"),
                )
                .with_help("give one of them a `name:`"));
            }
            let mut t = t.clone();
            if t.fewshot_path.as_deref() == Some("") {
                t.fewshot_path = None;
            }
            if t.fewshot_path.is_some() && t.num_fewshot == 0 {
                return Err(FieldError::new(
                    at.key("fewshot_path"),
                    pipe_core::diag::Target::Value,
                    "`fewshot_path` is set but `num_fewshot` is 0",
                ));
            }
            inputs.push(Input {
                name: format!("task/{name}"),
                source: source(&t.path),
                field: at.key("path"),
            });
            if let Some(p) = &t.fewshot_path {
                inputs.push(Input {
                    name: format!("fewshot/{name}"),
                    source: source(p),
                    field: at.key("fewshot_path"),
                });
            }
            tasks.push(Task { name, fields: t });
        }
        if let Some(g) = &f.generate {
            if let Some(p) = &g.prompts {
                inputs.push(Input {
                    name: "prompts".into(),
                    source: cx.stage_ref(&cx.path.key("generate").key("prompts"), p)?,
                    field: cx.path.key("generate").key("prompts"),
                });
            }
            if g.prompts.is_none() && g.instructions.is_empty() {
                return Err(cx
                    .error("generate", "nothing to generate from")
                    .with_help("set `prompts:` (a format stage) or `instructions:` (a list)"));
            }
            if !(g.temperature >= 0.0 && g.temperature.is_finite()) {
                return Err(cx.error("generate", "`temperature` must be 0 (greedy) or more"));
            }
            if !(g.top_p > 0.0 && g.top_p <= 1.0) {
                return Err(cx.error("generate", "`top_p` must be in (0, 1]"));
            }
            for (i, ins) in g.instructions.iter().enumerate() {
                if let InstructionField::Record(r) = ins {
                    if !r.contains_key("instruction") {
                        return Err(FieldError::new(
                            cx.path.key("generate").key("instructions").index(i),
                            pipe_core::diag::Target::Value,
                            "an instruction record needs an `instruction` (and may have an `input`)",
                        ));
                    }
                }
            }
        }
        if f.data.is_none() && tasks.is_empty() && f.generate.is_none() {
            return Err(cx
                .error("model", "nothing to evaluate")
                .with_help("set `data:` (held-out loss), `tasks:` and/or `generate:`"));
        }
        if f.batch_size == 0 {
            return Err(cx.error("batch_size", "batch_size must be at least 1"));
        }
        Device::parse(&f.device).map_err(|e| cx.error("device", e))?;
        Ok(Box::new(EvaluateStage {
            sources: LocalSources::default(),
            model,
            base,
            compare,
            tasks,
            inputs,
            fields: f,
        }))
    }
}

/// What decides an evaluation's numbers (see `pipe_core::key`): seeded models (checkpoints,
/// the data, task files and prompts are inputs, by content), whether the base is scored too,
/// each task's settings and name (it names its `items/<task>.jsonl`), and the generation
/// settings. Not the device or the batch size: they change float rounding only, not what is
/// measured.
#[derive(Serialize)]
struct EvaluateKey<'a> {
    model: Option<InitKey<'a>>,
    base: Option<InitKey<'a>>,
    compare: bool,
    tasks: Vec<TaskKey<'a>>,
    generate: Option<GenerateKey<'a>>,
}

#[derive(Serialize)]
struct TaskKey<'a> {
    name: &'a str,
    format: TaskFormat,
    limit: Option<usize>,
    num_fewshot: usize,
    fewshot_seed: u64,
    add_bos_token: bool,
}

#[derive(Serialize)]
struct GenerateKey<'a> {
    instructions: &'a [InstructionField],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    chat: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    chat_template: Option<&'a str>,
    limit: usize,
    max_new_tokens: usize,
    temperature: f64,
    top_p: f64,
    seed: u64,
}

impl EvaluateStage {
    fn key(&self) -> EvaluateKey<'_> {
        EvaluateKey {
            model: InitKey::of(&self.model),
            base: self.base.as_ref().and_then(InitKey::of),
            compare: self.compare,
            tasks: self
                .tasks
                .iter()
                .map(|t| TaskKey {
                    name: &t.name,
                    format: t.fields.format,
                    limit: t.fields.limit,
                    num_fewshot: t.fields.num_fewshot,
                    fewshot_seed: t.fields.fewshot_seed,
                    add_bos_token: t.fields.add_bos_token,
                })
                .collect(),
            generate: self.fields.generate.as_ref().map(|g| GenerateKey {
                instructions: &g.instructions,
                chat: g.chat,
                chat_template: g.chat_template.as_deref(),
                limit: g.limit,
                max_new_tokens: g.max_new_tokens,
                temperature: g.temperature,
                top_p: g.top_p,
                seed: g.seed,
            }),
        }
    }
}

impl Stage for EvaluateStage {
    fn inputs(&self) -> Vec<Input> {
        self.inputs.clone()
    }
    fn resources(&self) -> pipe_core::resources::Resources {
        crate::models::gpu_resources([self.fields.device.as_str()])
    }
    fn key_fields(&self) -> KeyFields {
        KeyFields::of(&self.key())
    }
    fn outputs(&self) -> Option<Vec<String>> {
        let mut outs = vec![
            "metrics.json".to_string(),
            "report.md".to_string(),
            "report.html".to_string(),
        ];
        if !self.tasks.is_empty() {
            outs.push("items".into());
        }
        if self.fields.generate.is_some() {
            outs.push("samples.jsonl".into());
        }
        Some(outs)
    }
    fn check_upstream<'a>(
        &self,
        stage: &dyn Fn(&str) -> Option<pipe_core::StageInfo<'a>>,
    ) -> Result<(), FieldError> {
        self.sources.learn(&self.inputs, stage);
        Ok(())
    }
    fn memory_plan<'a>(&self, stage: &dyn Fn(&str) -> Option<StageInfo<'a>>) -> Option<String> {
        let known = |m: &ModelSource| crate::models::known_config(m, &self.inputs, stage);
        let Some(config) = largest(
            [Some(&self.model), self.base.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(known),
        ) else {
            return Some(
                "known once its model is available (a download or an earlier stage)".into(),
            );
        };
        // Before anything runs, the held-out rows are known by their longest (the tokenize
        // stage's `max_len`); the tasks and prompts are tokenized when the stage runs.
        let longest = self
            .inputs
            .iter()
            .find(|i| i.name == "data")
            .and_then(|i| match &i.source {
                InputSource::Stage { stage: id, .. } => stage(id)?.fields["max_len"].as_u64(),
                InputSource::Path(_) => None,
            })
            .and_then(|n| usize::try_from(n).ok());
        let passes = longest
            .map(|len| {
                let seq = len.min(config.max_position_embeddings);
                let rows = self.fields.batch_size;
                vec![ForwardPass {
                    rows,
                    seq,
                    scored: rows * seq.saturating_sub(1),
                    packed: false,
                }]
            })
            .unwrap_or_default();
        let shape = EvalShape {
            passes,
            generation: None,
            on_gpu: self.on_gpu(),
        };
        let (plan, peak) = plan_evaluation(&config, &shape);
        let mut text = describe_plan(&plan, peak);
        if !self.tasks.is_empty() || self.fields.generate.is_some() {
            text.push_str(
                "; its tasks and prompts are sized when it runs, before the model is loaded",
            );
        }
        Some(text)
    }
    fn run(&self, cx: &mut StageContext) -> anyhow::Result<()> {
        self.run_stage(cx)
            .map_err(|e| self.sources.rename_in(cx, e))
    }
}

/// The largest `n` below `limit` for which `fits(n)` holds, where a larger `n` never needs less
/// memory (a batch size, a number of new tokens): found by bisection, as `limit` may be large.
fn largest_fitting(limit: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    if limit <= 1 || !fits(1) {
        return None;
    }
    // `fits(low)` holds; `high` is excluded.
    let (mut low, mut high) = (1, limit);
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if fits(mid) {
            low = mid;
        } else {
            high = mid;
        }
    }
    Some(low)
}

/// The config of the largest model among `configs` (by parameters).
fn largest(configs: impl IntoIterator<Item = ModelConfig>) -> Option<ModelConfig> {
    configs
        .into_iter()
        .max_by_key(|c| pipe_train::memory::parameter_count(c).0)
}

/// An evaluation's memory plan in words: the total per device and what makes it up.
fn describe_plan(plan: &MemoryPlan, peak: EvalPeak) -> String {
    let widest = match peak {
        EvalPeak::Loading => "loading the model".to_string(),
        EvalPeak::Pass(p) => format!(
            "its widest batch: {} × {} tokens, {} scored",
            p.rows, p.seq, p.scored
        ),
        EvalPeak::Generation { prompt, tokens } => {
            format!("a generation of {tokens} tokens from a prompt of {prompt}")
        }
    };
    format!(
        "about {} per device: weights {}, activations {} ({widest})",
        human_bytes(plan.total),
        human_bytes(plan.weights),
        human_bytes(plan.activations),
    )
}

impl EvaluateStage {
    fn on_gpu(&self) -> bool {
        self.fields.device.starts_with("cuda")
    }

    fn run_stage(&self, cx: &mut StageContext) -> anyhow::Result<()> {
        let device = Device::open(&self.fields.device)?;
        let work = self.prepare(cx)?;
        self.check_memory(cx, &work, device)?;
        match device {
            Device::Cpu => self.evaluate::<CpuBackend>(cx, work, &Default::default()),
            #[cfg(feature = "cuda")]
            Device::Cuda(index) => self.evaluate::<burn::backend::Cuda<f32, i32>>(
                cx,
                work,
                &burn::backend::cuda::CudaDevice::new(index),
            ),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => unreachable!("Device::open refuses cuda without the feature"),
        }
    }
}

/// Everything prepared once and scored for each model.
struct Work {
    tokenizer: Tokenizer,
    heldout: Option<Dataset>,
    tasks: Vec<PreparedTask>,
    prompts: Vec<Prompt>,
    stop: Vec<u32>,
}

/// A task's items, their tokenized requests, and how many requests each item has.
struct PreparedTask {
    name: String,
    docs: Vec<pipe_eval::Doc>,
    requests: Vec<Request>,
    counts: Vec<usize>,
}

struct Prompt {
    /// Where it came from: `val:<record index>` or `instruction:<n>`.
    id: String,
    text: String,
    ids: Vec<u32>,
    reference: Option<String>,
    /// Encoded with the tokenizer's special tokens (Alpaca prompts); a chat template writes its
    /// own, so chat prompts are encoded without, as `apply_chat_template` does.
    add_special_tokens: bool,
}

fn interrupted(e: EvalError) -> anyhow::Error {
    match e {
        EvalError::Interrupted => Interrupted.into(),
        other => anyhow!("{other}"),
    }
}

impl EvaluateStage {
    /// The tokenizer: the `tokenizer:` input, else the one beside the model's weights, else
    /// the data's, else the base's.
    fn tokenizer(&self, cx: &StageContext) -> anyhow::Result<(Tokenizer, Option<Value>)> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Ok(p) = cx.input("tokenizer") {
            candidates.push(p.to_path_buf());
        }
        for name in ["model", "data", "base"] {
            if let Ok(p) = cx.input(name) {
                candidates.push(p.to_path_buf());
                if let Ok(Weights::Model(d) | Weights::Adapter(d)) = find_weights(p) {
                    candidates.push(d);
                }
            }
        }
        for c in &candidates {
            if c.join("tokenizer.json").exists()
                || (c.is_file() && c.extension().is_some_and(|e| e == "json"))
            {
                let mut loaded = pipe_data::tokenize::load_tokenizer(c)?;
                let tok = &mut loaded.tokenizer;
                tok.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
                tok.with_padding(None);
                return Ok((loaded.tokenizer, loaded.config));
            }
        }
        bail!("no tokenizer.json found beside the model, the data or the base: set `tokenizer:`")
    }

    fn prepare(&self, cx: &StageContext) -> anyhow::Result<Work> {
        let (tokenizer, config) = self.tokenizer(cx)?;
        let heldout = match cx.input("data") {
            Ok(dir) => {
                let file = dir.join("val.safetensors");
                if !file.exists() {
                    bail!(
                        "`data` must be a tokenize stage (no val.safetensors in {})",
                        dir.display()
                    );
                }
                let d = Dataset::open(&file)?;
                if d.is_empty() {
                    bail!("the tokenize stage has no validation split: set `val_size` on its format stage")
                }
                Some(d)
            }
            Err(_) => None,
        };
        let token_id = |t: &str| tokenizer.token_to_id(t);
        // The harness's prefix token for an empty context: BOS, or EOS where there is none.
        let named = |key: &str| match config.as_ref().and_then(|c| c.get(key)) {
            Some(Value::String(t)) => token_id(t),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).and_then(token_id),
            _ => None,
        };
        let prefix_token = named("bos_token")
            .or_else(|| named("eos_token"))
            .or_else(|| {
                ["<s>", "<|begin_of_text|>", "<|endoftext|>", "</s>"]
                    .iter()
                    .find_map(|t| token_id(t))
            })
            .unwrap_or(0);
        let mut tasks = Vec::new();
        for t in &self.tasks {
            let path = task_file(cx.input(&format!("task/{}", t.name))?)?;
            let docs = read_docs(&path, t.fields.format, t.fields.limit)
                .with_context(|| format!("task `{}`", t.name))?;
            let fewshot = match (
                t.fields.num_fewshot,
                cx.input(&format!("fewshot/{}", t.name)),
            ) {
                (0, _) => FewShot::None,
                (k, Ok(dev)) => {
                    let dev = task_file(dev)?;
                    let docs = read_docs(&dev, t.fields.format, Some(k))
                        .with_context(|| format!("task `{}` few-shot file", t.name))?;
                    if docs.len() < k {
                        bail!(
                            "task `{}`: num_fewshot {k} but {} has {} items",
                            t.name,
                            dev.display(),
                            docs.len()
                        );
                    }
                    FewShot::FirstOf { docs, k }
                }
                (k, Err(_)) => {
                    if docs.len() <= k {
                        bail!(
                            "task `{}`: num_fewshot {k} needs more than {k} items (it has {})",
                            t.name,
                            docs.len()
                        );
                    }
                    FewShot::Sampled {
                        k,
                        seed: t.fields.fewshot_seed,
                    }
                }
            };
            let (requests, counts) = task_requests(
                &tokenizer,
                &docs,
                &fewshot,
                prefix_token,
                t.fields.add_bos_token,
            )
            .map_err(|e| anyhow!("task `{}`: {e}", t.name))?;
            tasks.push(PreparedTask {
                name: t.name.clone(),
                docs,
                requests,
                counts,
            });
        }
        let mut prompts = Vec::new();
        let mut stop = Vec::new();
        if let Some(g) = &self.fields.generate {
            // The chat template, made when a chat prompt needs it.
            let mut chat: Option<pipe_data::chat::ChatTemplate> = None;
            let chat_template = || -> anyhow::Result<pipe_data::chat::ChatTemplate> {
                let source = match &g.chat_template {
                    Some(t) => t.clone(),
                    None => pipe_data::chat::config_template(config.as_ref())?.ok_or_else(|| {
                        anyhow!("`generate`: chat prompts need a chat template, and the tokenizer's tokenizer_config.json has none\n  = help: set `generate.chat_template:`, or use a tokenizer with one")
                    })?,
                };
                Ok(pipe_data::chat::ChatTemplate::new(
                    &source,
                    pipe_data::chat::special_tokens(config.as_ref()),
                )?)
            };
            if let Ok(dir) = cx.input("prompts") {
                let file = dir.join("val.jsonl");
                let examples = pipe_data::format::read_examples(&file)?;
                if examples.is_empty() {
                    bail!("`generate.prompts`: the format stage has no validation split (set its `val_size`)");
                }
                match examples {
                    pipe_data::format::Examples::Pairs(pairs) => {
                        for p in pairs.into_iter().take(g.limit) {
                            prompts.push(Prompt {
                                id: format!("val:{}", p.index),
                                text: p.prompt,
                                ids: Vec::new(),
                                reference: Some(p.response),
                                add_special_tokens: true,
                            });
                        }
                    }
                    pipe_data::format::Examples::Chat(convs) => {
                        let t = chat.insert(chat_template()?);
                        for c in convs.into_iter().take(g.limit) {
                            // Up to the last assistant turn, which is the reference.
                            let last = c.messages.iter().rposition(|m| m.role == "assistant");
                            let (context, reference) = match last {
                                Some(k) => (&c.messages[..k], Some(c.messages[k].content.clone())),
                                None => (&c.messages[..], None),
                            };
                            prompts.push(Prompt {
                                id: format!("val:{}", c.index),
                                text: t.render(context, true, c.index)?.text,
                                ids: Vec::new(),
                                reference,
                                add_special_tokens: false,
                            });
                        }
                    }
                }
            }
            let template = Template::new(&TemplateSpec::alpaca(), BTreeMap::new())?;
            for (i, ins) in g.instructions.iter().enumerate() {
                let mut fields: serde_json::Map<String, Value> = match ins {
                    InstructionField::Text(t) => {
                        [("instruction".to_string(), Value::from(t.as_str()))]
                            .into_iter()
                            .collect()
                    }
                    InstructionField::Record(r) => r
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                        .collect(),
                };
                if g.chat {
                    // The instruction (and its input, on a new line) as the user's turn.
                    let field = |k: &str| fields.get(k).and_then(Value::as_str).unwrap_or("");
                    let mut content = field("instruction").to_string();
                    if !field("input").is_empty() {
                        content = format!("{content}\n{}", field("input"));
                    }
                    let mut messages = Vec::new();
                    if !field("system").is_empty() {
                        messages.push(pipe_data::chat::Message {
                            role: "system".into(),
                            content: field("system").to_string(),
                        });
                    }
                    messages.push(pipe_data::chat::Message {
                        role: "user".into(),
                        content,
                    });
                    if chat.is_none() {
                        chat = Some(chat_template()?);
                    }
                    let t = chat.as_ref().expect("made above");
                    prompts.push(Prompt {
                        id: format!("instruction:{i}"),
                        text: t
                            .render(&messages, true, i)
                            .with_context(|| format!("generate.instructions[{i}]"))?
                            .text,
                        ids: Vec::new(),
                        reference: None,
                        add_special_tokens: false,
                    });
                    continue;
                }
                // The template renders a response too; here there is none yet.
                fields.entry("output").or_insert(Value::from(""));
                let rec = Record {
                    index: i,
                    line: None,
                    row: None,
                    fields,
                };
                let (text, _) = template
                    .format(&rec)
                    .with_context(|| format!("generate.instructions[{i}]"))?;
                prompts.push(Prompt {
                    id: format!("instruction:{i}"),
                    text,
                    ids: Vec::new(),
                    reference: None,
                    add_special_tokens: true,
                });
            }
            // Prompts are encoded as the tokenize stage encodes training text (with the
            // tokenizer's special tokens, e.g. BOS).
            for p in &mut prompts {
                p.ids = tokenizer
                    .encode_fast(p.text.as_str(), p.add_special_tokens)
                    .map_err(|e| anyhow!("cannot tokenize prompt {}: {e}", p.id))?
                    .get_ids()
                    .to_vec();
            }
            stop.extend(named("eos_token"));
            for t in [
                "</s>",
                "<|endoftext|>",
                "<|eot_id|>",
                "<|end_of_text|>",
                "<|im_end|>",
                "<end_of_turn>",
                "<|end|>",
            ] {
                stop.extend(token_id(t));
            }
        }
        Ok(Work {
            tokenizer,
            heldout,
            tasks,
            prompts,
            stop,
        })
    }

    /// The model to evaluate: `which` is the tuned model or the base.
    fn load<B: Backend>(
        &self,
        cx: &StageContext,
        source: &ModelSource,
        vocab: usize,
        device: &B::Device,
    ) -> anyhow::Result<CausalLm<B>> {
        let full = |s: &ModelSource| -> anyhow::Result<CausalLm<B>> {
            let m = match s {
                ModelSource::Init { config, seed } => {
                    init_model(config, *seed, 0.02, device, false)
                }
                ModelSource::Input(name) => match find_weights(cx.input(name)?)? {
                    Weights::Model(dir) => load_model(&dir, device)
                        .with_context(|| format!("loading {}", dir.display()))?,
                    Weights::Adapter(dir) => {
                        bail!("{} is a LoRA adapter, not a full model", dir.display())
                    }
                },
            };
            // An added pad token grows the embeddings as training did (mean of the old rows).
            Ok(if vocab > m.config.vocab_size {
                m.resize_embeddings(vocab)
            } else {
                m
            })
        };
        if let ModelSource::Input(name) = source {
            if let Weights::Adapter(dir) = find_weights(cx.input(name)?)? {
                let base = self.base.as_ref().ok_or_else(|| {
                    anyhow!("`model` is a LoRA adapter: set `base:` to the model it was trained on")
                })?;
                let model = full(base)?
                    .load_peft_adapter(&dir, false)
                    .with_context(|| format!("applying the adapter {}", dir.display()))?;
                return Ok(model.merge_lora());
            }
        }
        full(source)
    }

    /// The config of a model to evaluate, read before it is loaded (an adapter's is its
    /// base's); `None` where it cannot be read (loading will say why).
    fn config_of(&self, cx: &StageContext, source: &ModelSource) -> Option<ModelConfig> {
        match source {
            ModelSource::Init { config, .. } => Some(config.as_ref().clone()),
            ModelSource::Input(name) => match find_weights(cx.input(name).ok()?).ok()? {
                Weights::Model(dir) => ModelConfig::from_file(&dir.join("config.json")).ok(),
                Weights::Adapter(_) => self.config_of(cx, self.base.as_ref()?),
            },
        }
    }

    /// The passes and the longest generation of scoring `work` `batch_size` rows at a time
    /// with a model of `max_pos` positions, generating `max_new_tokens` at most.
    fn eval_shape(
        &self,
        work: &Work,
        batch_size: usize,
        max_pos: usize,
        max_new_tokens: usize,
    ) -> EvalShape {
        let mut passes = Vec::new();
        if let Some(data) = &work.heldout {
            passes.extend(pipe_eval::heldout_passes(data, batch_size, max_pos));
        }
        for t in &work.tasks {
            passes.extend(pipe_eval::loglikelihood_passes(
                &t.requests,
                batch_size,
                max_pos,
            ));
        }
        let generation = work
            .prompts
            .iter()
            .map(|p| pipe_eval::generation_length(p.ids.len(), max_new_tokens, max_pos))
            .reduce(|(a, b), (c, d)| (a.max(c), b.max(d)));
        EvalShape {
            passes,
            generation,
            on_gpu: self.on_gpu(),
        }
    }

    /// Refuses an evaluation whose memory plan is larger than what the device has free,
    /// before any model is loaded, saying what would fit; logs the plan otherwise.
    fn check_memory(&self, cx: &StageContext, work: &Work, device: Device) -> anyhow::Result<()> {
        let configs = self
            .models()
            .into_iter()
            .map(|(_, s)| self.config_of(cx, s));
        let Some(mut config) = configs.collect::<Option<Vec<_>>>().and_then(largest) else {
            cx.log(
                "memory plan: a model's config.json could not be read before loading: not checked",
            );
            return Ok(());
        };
        // An added pad token grows the embeddings (`load`).
        config.vocab_size = config.vocab_size.max(work.tokenizer.get_vocab_size(true));
        let max_pos = config.max_position_embeddings;
        let max_new = self
            .fields
            .generate
            .as_ref()
            .map_or(0, |g| g.max_new_tokens);
        let plan_at = |batch: usize, max_new: usize| {
            plan_evaluation(&config, &self.eval_shape(work, batch, max_pos, max_new))
        };
        let batch = self.fields.batch_size;
        let (plan, peak) = plan_at(batch, max_new);
        cx.log(&format!("memory plan: {}", describe_plan(&plan, peak)));
        let Some((place, available)) = crate::models::free_memory(cx, device) else {
            return Ok(());
        };
        if plan.total <= available {
            return Ok(());
        }
        let fits = |batch: usize, max_new: usize| plan_at(batch, max_new).0.total <= available;
        let mut advice = Vec::new();
        if let Some(b) = largest_fitting(batch, |b| fits(b, max_new)) {
            advice.push(format!("batch_size: {b}"));
        }
        if max_new > 0 && !fits(1, max_new) {
            // The longest generation's key/value cache: fewer new tokens.
            if let Some(n) = largest_fitting(max_new, |n| fits(batch, n)) {
                advice.push(format!("generate.max_new_tokens: {n}"));
            } else if let Some(n) = largest_fitting(max_new, |n| fits(1, n)) {
                advice.push(format!("generate.max_new_tokens: {n}, batch_size: 1"));
            }
        }
        bail!(
            "this evaluation needs about {} on {place}, which has {} free; nothing was loaded\n  plan: {}\n  {}",
            human_bytes(plan.total),
            human_bytes(available),
            describe_plan(&plan, peak),
            if advice.is_empty() {
                "no setting of this stage would fit: use a smaller model, shorter rows (`limit:` on long tasks, a smaller `max_len`) or a device with more memory".to_string()
            } else {
                format!("settings that would fit: {}", advice.join("; or "))
            }
        )
    }

    fn evaluate<B: Backend>(
        &self,
        cx: &mut StageContext,
        work: Work,
        device: &B::Device,
    ) -> anyhow::Result<()> {
        let vocab = work.tokenizer.get_vocab_size(true);
        let models = self.models();
        cx.progress()
            .set_length((work.steps_per_model() * models.len()) as u64);
        std::fs::create_dir_all(cx.out_dir.join("items"))?;
        let mut outcome = Outcome::default();
        let done = std::cell::Cell::new(0u64);
        let advance = |n: u64| {
            done.set(done.get() + n);
            cx.progress().set_position(done.get());
        };
        for (label, source) in &models {
            let model: CausalLm<B> = self.load(cx, source, vocab, device)?;
            let scoring = Scoring {
                cx: &*cx,
                label,
                model: &model,
                device,
                batch_size: self.fields.batch_size,
                advance: &advance,
            };
            let metrics = self.score(&scoring, &work, &mut outcome)?;
            outcome
                .metrics
                .insert(label.to_string(), Value::Object(metrics));
            drop(model);
            // The next model would be laid out among this one's freed batches, growing the
            // peak by a fragmented heap.
            pipe_train::release_freed_memory();
        }
        self.write_outputs(cx, outcome)
    }

    /// The models to score, labelled as the metrics name them: the base, then the tuned
    /// model, when comparing; else the one model.
    fn models(&self) -> Vec<(&'static str, &ModelSource)> {
        if self.compare {
            vec![
                ("base", self.base.as_ref().expect("compare needs base")),
                ("tuned", &self.model),
            ]
        } else {
            vec![("model", &self.model)]
        }
    }

    /// One model's metrics: held-out loss, then the tasks, then generation; its items and
    /// samples go to `outcome`.
    fn score<B: Backend>(
        &self,
        s: &Scoring<'_, B>,
        work: &Work,
        outcome: &mut Outcome,
    ) -> anyhow::Result<serde_json::Map<String, Value>> {
        let mut m = serde_json::Map::new();
        if let Some(data) = &work.heldout {
            m.insert("heldout".into(), heldout_metrics(s, data)?);
        }
        let task_metrics = task_metrics(s, &work.tasks, &mut outcome.items)?;
        if !task_metrics.is_empty() {
            m.insert("tasks".into(), Value::Object(task_metrics));
        }
        if let Some(g) = &self.fields.generate {
            m.insert(
                "generation".into(),
                generation_metrics(s, g, work, &mut outcome.samples)?,
            );
        }
        Ok(m)
    }

    /// Writes `items/<task>.jsonl`, `samples.jsonl`, `metrics.json`, `report.md` and
    /// `report.html`, and
    /// records the headline numbers as the stage's metrics.
    fn write_outputs(&self, cx: &mut StageContext, outcome: Outcome) -> anyhow::Result<()> {
        let out = &cx.out_dir;
        for (name, rows) in &outcome.items {
            write_jsonl(&out.join("items").join(format!("{name}.jsonl")), rows)?;
        }
        if self.fields.generate.is_some() {
            write_jsonl(&out.join("samples.jsonl"), &outcome.samples)?;
        }
        let metrics = Value::Object(outcome.metrics);
        std::fs::write(
            out.join("metrics.json"),
            serde_json::to_vec_pretty(&metrics)?,
        )?;
        let rows = flatten(&metrics);
        std::fs::write(out.join("report.md"), report(&rows, self.compare))?;
        // The training curves of the model's own train stage, when it came from one.
        let curves = cx
            .input("model")
            .map(eval_report::training_curves)
            .unwrap_or_default();
        std::fs::write(
            out.join("report.html"),
            eval_report::render("Evaluation", &rows, &curves, &outcome.samples),
        )?;
        cx.set_metrics(Value::Object(
            rows.into_iter()
                .flat_map(|(k, vals)| {
                    vals.into_iter()
                        .map(move |(label, v)| (format!("{label}.{k}"), json!(v)))
                })
                .collect(),
        ));
        Ok(())
    }
}

/// What scoring the models gathers, written out once all are scored.
#[derive(Default)]
struct Outcome {
    /// Model label → its metrics.
    metrics: serde_json::Map<String, Value>,
    /// Task name → each item's scores, for every model.
    items: BTreeMap<String, Vec<Value>>,
    /// The generated samples, for every model.
    samples: Vec<Value>,
}

impl Work {
    /// The progress bar's steps for one model: held-out examples, task requests, prompts.
    fn steps_per_model(&self) -> usize {
        let heldout_n = self.heldout.as_ref().map_or(0, |d| d.len());
        let requests_n: usize = self.tasks.iter().map(|t| t.requests.len()).sum();
        heldout_n + requests_n + self.prompts.len()
    }
}

/// One model being scored, and where its progress goes.
struct Scoring<'a, B: Backend> {
    cx: &'a StageContext,
    /// `model`, or `base` / `tuned` when comparing.
    label: &'a str,
    model: &'a CausalLm<B>,
    device: &'a B::Device,
    batch_size: usize,
    /// Moves the progress bar on by that many steps.
    advance: &'a dyn Fn(u64),
}

impl<B: Backend> Scoring<'_, B> {
    /// For the batched scorers: counts `n` steps done and says whether to go on.
    fn on_batch(&self) -> impl FnMut(usize) -> bool + '_ {
        move |n| {
            (self.advance)(n as u64);
            !self.cx.is_cancelled()
        }
    }
}

/// Held-out loss and perplexity on the tokenize stage's validation split.
fn heldout_metrics<B: Backend>(s: &Scoring<'_, B>, data: &Dataset) -> anyhow::Result<Value> {
    let label = s.label;
    s.cx.progress()
        .set_message(format!("{label}: held-out loss"));
    let h = pipe_eval::heldout_loss(s.model, data, s.batch_size, s.device, &mut s.on_batch())
        .map_err(interrupted)?;
    s.cx.log(&format!(
        "{label}: held-out loss {:.4}, perplexity {:.3} over {} tokens of {} examples",
        h.loss, h.perplexity, h.tokens, h.examples
    ));
    Ok(serde_json::to_value(h)?)
}

/// Each multiple-choice task's accuracy, by task name; every item's scores go to `items`.
fn task_metrics<B: Backend>(
    s: &Scoring<'_, B>,
    tasks: &[PreparedTask],
    items: &mut BTreeMap<String, Vec<Value>>,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let label = s.label;
    let mut task_metrics = serde_json::Map::new();
    for PreparedTask {
        name,
        docs,
        requests,
        counts,
    } in tasks
    {
        s.cx.progress().set_message(format!("{label}: {name}"));
        let started = std::time::Instant::now();
        let scored =
            pipe_eval::loglikelihoods(s.model, requests, s.batch_size, s.device, &mut s.on_batch())
                .map_err(interrupted)?;
        let secs = started.elapsed().as_secs_f64();
        let r = task_result(docs, &scored, counts);
        // Speed goes to the log only: the outputs must not depend on it.
        s.cx.log(&format!(
            "{label}: {name}: {} items ({} requests) scored in {secs:.1} s, {:.2} items/s",
            r.items,
            requests.len(),
            r.items as f64 / secs.max(1e-9)
        ));
        s.cx.log(&format!(
            "{label}: {name}: acc {:.4} ± {:.4}{} over {} items",
            r.acc.value,
            r.acc.stderr.unwrap_or(f64::NAN),
            r.acc_norm
                .map(|a| format!(
                    ", acc_norm {:.4} ± {:.4}",
                    a.value,
                    a.stderr.unwrap_or(f64::NAN)
                ))
                .unwrap_or_default(),
            r.items
        ));
        let rows = items.entry(name.clone()).or_default();
        for it in &r.per_item {
            let mut v = serde_json::to_value(it)?;
            v["model"] = Value::from(label);
            rows.push(v);
        }
        task_metrics.insert(
            name.clone(),
            json!({
                "items": r.items,
                "acc": r.acc.value,
                "acc_stderr": r.acc.stderr,
                "acc_norm": r.acc_norm.map(|a| a.value),
                "acc_norm_stderr": r.acc_norm.and_then(|a| a.stderr),
            }),
        );
    }
    Ok(task_metrics)
}

/// Generates from every prompt, with exact match where a prompt has a reference response;
/// the samples go to `samples`.
fn generation_metrics<B: Backend>(
    s: &Scoring<'_, B>,
    g: &GenerateFields,
    work: &Work,
    samples: &mut Vec<Value>,
) -> anyhow::Result<Value> {
    let label = s.label;
    s.cx.progress().set_message(format!("{label}: generating"));
    let sampling = if g.temperature > 0.0 {
        Sampling::Sample {
            temperature: g.temperature,
            top_p: g.top_p,
            seed: g.seed,
        }
    } else {
        Sampling::Greedy
    };
    let mut exact = Vec::new();
    for (i, p) in work.prompts.iter().enumerate() {
        let cancelled = || s.cx.is_cancelled();
        let out = pipe_eval::generate(
            s.model,
            &p.ids,
            g.max_new_tokens,
            &work.stop,
            &sampling,
            i as u64,
            s.device,
            &cancelled,
        )
        .map_err(interrupted)?;
        let text = work
            .tokenizer
            .decode(&out, true)
            .map_err(|e| anyhow!("cannot decode a generated sample: {e}"))?;
        let matched = p.reference.as_ref().map(|r| r.trim() == text.trim());
        if let Some(ok) = matched {
            exact.push(ok as u8 as f64);
        }
        samples.push(json!({
            "model": label,
            "id": p.id,
            "prompt": p.text,
            "output": text,
            "reference": p.reference,
            "exact_match": matched,
            "tokens": out.len(),
        }));
        (s.advance)(1);
    }
    let mut gm = json!({ "samples": work.prompts.len() });
    if !exact.is_empty() {
        let e = pipe_eval::stats::mean_and_stderr(&exact);
        s.cx.log(&format!(
            "{label}: exact match {:.4} ± {:.4} over {} held-out prompts",
            e.value,
            e.stderr.unwrap_or(f64::NAN),
            exact.len()
        ));
        gm["exact_match"] = json!(e.value);
        gm["exact_match_stderr"] = json!(e.stderr);
        gm["exact_match_items"] = json!(exact.len());
    }
    Ok(gm)
}

/// A task's JSONL file: the path itself, or the one `.jsonl` file of a directory (a download
/// stage's output).
fn task_file(path: &Path) -> anyhow::Result<PathBuf> {
    find_data_file(
        path,
        None,
        &["jsonl"],
        "point the task's `path` at one of them",
    )
    .map_err(anyhow::Error::from)
}

fn write_jsonl(path: &Path, rows: &[Value]) -> anyhow::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in rows {
        serde_json::to_writer(&mut w, r)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

/// The headline numbers, metric → [(model label, value)], in a stable order.
fn flatten(metrics: &Value) -> Vec<(String, Vec<(String, f64)>)> {
    let mut rows: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    let mut put = |metric: String, label: &str, v: Option<f64>| {
        let Some(v) = v else { return };
        match rows.iter_mut().find(|r| r.0 == metric) {
            Some(r) => r.1.push((label.to_string(), v)),
            None => rows.push((metric, vec![(label.to_string(), v)])),
        }
    };
    for (label, m) in metrics.as_object().into_iter().flatten() {
        put("heldout.loss".into(), label, m["heldout"]["loss"].as_f64());
        put(
            "heldout.perplexity".into(),
            label,
            m["heldout"]["perplexity"].as_f64(),
        );
        for (task, t) in m["tasks"].as_object().into_iter().flatten() {
            put(format!("{task}.acc"), label, t["acc"].as_f64());
            put(format!("{task}.acc_norm"), label, t["acc_norm"].as_f64());
        }
        put(
            "generation.exact_match".into(),
            label,
            m["generation"]["exact_match"].as_f64(),
        );
    }
    rows
}

fn report(rows: &[(String, Vec<(String, f64)>)], compare: bool) -> String {
    let mut s = String::from("# Evaluation\n\n");
    if compare {
        s.push_str("| metric | base | tuned | delta |\n|---|---:|---:|---:|\n");
        for (metric, vals) in rows {
            let get = |l: &str| vals.iter().find(|v| v.0 == l).map(|v| v.1);
            let (b, t) = (get("base"), get("tuned"));
            let fmt = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_default();
            let delta = match (b, t) {
                (Some(b), Some(t)) => format!("{:+.4}", t - b),
                _ => String::new(),
            };
            s.push_str(&format!(
                "| {metric} | {} | {} | {delta} |\n",
                fmt(b),
                fmt(t)
            ));
        }
    } else {
        s.push_str("| metric | value |\n|---|---:|\n");
        for (metric, vals) in rows {
            s.push_str(&format!("| {metric} | {:.4} |\n", vals[0].1));
        }
    }
    s
}
