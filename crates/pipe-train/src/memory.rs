//! The memory plan: how many bytes a training or evaluation run will hold at its peak on each
//! device, worked out from the model's shape and the run's settings before anything is loaded,
//! so that a run that cannot fit is refused with advice instead of failing hours in.
//!
//! The figures are what pipe's own implementation allocates (burn's autodiff keeps every
//! forward result a backward operation needs until the backward pass frees it), calibrated
//! against measured peaks (`bench/memory.sh` prints estimate and measurement side by side):
//! - weights: every parameter in f32, plus a bf16 copy of each matrix while products run in bf16
//!   (`dtype: bf16`: the rounded operand lives until the backward pass has used it) — except a
//!   LoRA base's projections at `dtype: bf16`, which are kept in bf16 alone, as PEFT keeps a
//!   bf16 base (`CausalLm::keep_frozen_projections_in_bf16`);
//! - gradients: one f32 value per trainable parameter, and AdamW's two f32 moments — for full
//!   fine-tuning with `weights: bf16`, the layers' projections instead hold their weight,
//!   gradient, two moments and (with compensated updates) compensation in bf16 (10 or 8 bytes,
//!   `crate::optimizer`), and have no second bf16 copy;
//! - activations: per decoder layer, the saved results of the norms, projections, rotary
//!   embedding, grouped-query expansion, attention scores and probabilities (seq × seq per
//!   head: burn 0.21's `attention` op is fused on CUDA and tiled on the CPU, but its autodiff
//!   decomposes it into these same products and softmax, so training holds them — unless a
//!   layer's scores outgrow `pipe_model::attention::BLOCK_SCORE_BYTES`: then none are held, and
//!   one layer's backward pass holds a block's), and SwiGLU; then the final norm, the logits
//!   and the cross-entropy over the vocabulary. Gradient checkpointing keeps each layer's input
//!   alone and recomputes one layer at a time (`crate::segments`): the inputs, the gradient
//!   flowing down, and the head's results or one layer's, whichever is larger.
//! - on a CPU, replicas share one memory: the weights count once, each replica adds its own
//!   activations and gradients; on GPUs each device holds a whole replica's weights,
//!   activations and gradients, and its share of the optimizer state and of the summed
//!   gradients (ZeRO stage 1, `crate::step::optimizer_owners`).

use pipe_eval::ForwardPass;
#[cfg(test)]
use pipe_model::attention::BLOCK_SCORE_BYTES;
use pipe_model::ModelConfig;

use crate::optimizer::Bf16Rounding;
use serde::Serialize;

/// What a training run's memory depends on besides the model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainShape {
    /// `None`: full fine-tuning; `Some(rank)`: LoRA of that rank on `lora_targets` projections
    /// per layer (7 for all-linear).
    pub lora: Option<LoraShape>,
    pub micro_batch_size: usize,
    /// Tokens per row (the tokenize stage's `max_len`).
    pub seq_len: usize,
    /// bf16 matrix products (`dtype: bf16`).
    pub bf16_products: bool,
    /// Full fine-tuning with the layers' projections in bf16 (`weights: bf16`).
    pub bf16_weights: bool,
    /// How their updates are rounded: compensation keeps a bf16 value a parameter more.
    pub bf16_rounding: Bf16Rounding,
    pub gradient_checkpointing: bool,
    pub replicas: usize,
    pub on_gpu: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraShape {
    pub rank: usize,
    /// How many of the seven projections of a layer carry an adapter.
    pub targets_per_layer: usize,
}

/// Estimated peak bytes of one device, by what holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    /// The process and backend's own (allocator, threads, a GPU's context).
    pub overhead: u64,
    /// On the busiest device.
    pub total: u64,
}

const F32: u64 = 4;
const BF16: u64 = 2;
/// A CUDA context with burn's kernels and memory pools, measured: none yet on a GPU; the usual
/// context size of recent drivers.
const GPU_OVERHEAD: u64 = 600 << 20;
/// The process itself on a CPU (code, threads, allocator's slack): 6 MiB measured for a
/// one-layer model, and some room.
const CPU_OVERHEAD: u64 = 8 << 20;

/// A model's sizes as counts: hidden `d`, intermediate `i`, vocabulary `v`, layers `l`, and
/// the widths of all query heads `q` and of all key/value heads `kv`.
struct Dims {
    d: u64,
    i: u64,
    v: u64,
    l: u64,
    q: u64,
    kv: u64,
}

impl Dims {
    fn of(cfg: &ModelConfig) -> Self {
        Dims {
            d: cfg.hidden_size as u64,
            i: cfg.intermediate_size as u64,
            v: cfg.vocab_size as u64,
            l: cfg.num_hidden_layers as u64,
            q: (cfg.num_attention_heads * cfg.head_dim) as u64,
            kv: (cfg.num_key_value_heads * cfg.head_dim) as u64,
        }
    }

    /// The weights of one layer's seven projections.
    fn per_layer(&self) -> u64 {
        let Dims { d, i, q, kv, .. } = *self;
        d * q + 2 * d * kv + q * d + 3 * d * i
    }
}

/// Parameters of the model as pipe builds it: (all, in matrices).
pub fn parameter_count(cfg: &ModelConfig) -> (u64, u64) {
    let n = Dims::of(cfg);
    let embeddings = n.v * n.d * if cfg.tie_word_embeddings { 1 } else { 2 };
    let matrices = n.l * n.per_layer() + embeddings;
    // Norms and biases are the rest.
    let all = u64::try_from(cfg.parameter_count()).unwrap_or(u64::MAX);
    (all, matrices)
}

/// The parameters of the linear projections: every layer's seven, and an untied `lm_head`.
fn projection_count(cfg: &ModelConfig) -> u64 {
    let n = Dims::of(cfg);
    let lm_head = if cfg.tie_word_embeddings {
        0
    } else {
        n.v * n.d
    };
    n.l * n.per_layer() + lm_head
}

/// The parameters of every layer's seven projections (what `weights: bf16` keeps in bf16).
fn layer_projection_count(cfg: &ModelConfig) -> u64 {
    let n = Dims::of(cfg);
    n.l * n.per_layer()
}

/// LoRA's parameters for `shape` on `cfg`: A `[in, r]` and B `[r, out]` on each targeted
/// projection, counted as if all seven were targeted and scaled to the targeted share.
fn lora_parameters(cfg: &ModelConfig, shape: LoraShape) -> u64 {
    let Dims { d, i, l, q, kv, .. } = Dims::of(cfg);
    let r = shape.rank as u64;
    let all_seven = r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + i) + (i + d));
    l * all_seven * shape.targets_per_layer as u64 / 7
}

/// f32 values one decoder layer keeps for the backward pass, per token of a micro-batch, and
/// per (query, key) pair: `(per_token, per_score)`. `fused`: on the CPU, where attention's
/// softmax, SwiGLU and the heads' layout are single operations with their own backward
/// (`pipe_model::kernels`), which keep only their inputs or results.
fn saved_per_layer(cfg: &ModelConfig, fused: bool) -> (u64, u64) {
    let Dims { d, i, q, kv, .. } = Dims::of(cfg);
    let h = cfg.num_attention_heads as u64;
    // Norms (two of them: input and normalised, and composed their square too), the rotary
    // embedding (inputs laid out by head, rotated halves and products for q and k), attention
    // output, o_proj input, the residuals. Keys and values are not repeated for every query
    // head: each key/value head's queries are stacked against it.
    let norms = 2 * norm_values(fused) * d;
    let shared = 3 * (q + kv) + 2 * q + 2 * d;
    if fused {
        // Values laid out by head; SwiGLU's gate, up and product; the probabilities.
        (norms + shared + kv + 3 * i, h)
    } else {
        // The projections q/k/v (views of them are laid out by head); SwiGLU (gate, its
        // sigmoid, silu, up, product); scores, their scaled-and-masked sum, the softmax's exp
        // and result.
        (norms + shared + (q + 2 * kv) + 5 * i, 4 * h)
    }
}

/// Values of `hidden` an RMSNorm keeps a token: its input and result, and composed (burn's
/// operations) the square too.
fn norm_values(fused: bool) -> u64 {
    if fused {
        2
    } else {
        3
    }
}

/// The estimated peak of a training run.
pub fn plan_training(cfg: &ModelConfig, shape: &TrainShape) -> MemoryPlan {
    let (all, matrices) = parameter_count(cfg);
    let adapters = shape.lora.map_or(0, |l| lora_parameters(cfg, l));
    let trainable = if shape.lora.is_some() { adapters } else { all };
    // A LoRA base's projections at bf16 are stored in bf16 only (no f32 weight, no copy).
    let bf16_base = if shape.lora.is_some() && shape.bf16_products {
        projection_count(cfg)
    } else {
        0
    };
    // Full fine-tuning's layer projections in bf16: weight, gradient, moments, compensation.
    let bf16_trained = if shape.lora.is_none() && shape.bf16_weights {
        layer_projection_count(cfg)
    } else {
        0
    };
    let in_bf16 = bf16_base + bf16_trained;
    let mut weights = (all - in_bf16 + adapters) * F32 + in_bf16 * BF16;
    if shape.bf16_products {
        // A bf16 copy of every matrix stored in f32, kept for the backward pass; recomputing
        // layers keeps only the recomputed layer's.
        let mut copies = matrices - in_bf16;
        if shape.gradient_checkpointing {
            let layers = cfg.num_hidden_layers as u64;
            let layer_f32 = if in_bf16 > 0 {
                0
            } else {
                layer_projection_count(cfg)
            };
            copies -= layer_f32 - layer_f32 / layers.max(1);
        }
        weights += copies * BF16;
    }
    let tokens = (shape.micro_batch_size * shape.seq_len) as u64;
    let fused = !shape.on_gpu;
    // Scores held from a layer's forward pass to its backward pass, unless rows too long for
    // that are attended a block of queries at a time: then the backward pass of one layer
    // holds a block's probabilities, their gradient and the scores' gradient (composed, the
    // products of the softmax's backward pass too).
    let score_block = attention_score_block(cfg, shape.micro_batch_size, shape.seq_len);
    let scores = if score_block.is_some() {
        0
    } else {
        (shape.micro_batch_size * shape.seq_len * shape.seq_len) as u64
    };
    let block_copies = if fused { 3 } else { 5 };
    let attention_blocks = score_block.map_or(0, |n| block_copies * n * F32);
    let (per_token, per_score) = saved_per_layer(cfg, fused);
    let layers = cfg.num_hidden_layers as u64;
    let (d, v) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    // One layer's results, and with bf16 products the bf16 operands its products keep: the
    // inputs of the projections (the normed input cast once for each of q, k, v, gate, up;
    // o_proj's and down_proj's), q, k, v and the probabilities. burn's composed operations
    // (GPU) measured as `4 · hidden` a token on the CPU, their larger count of f32 results
    // absorbing the rest; the fused kernels keep fewer, and the bf16 copies show.
    let mut layer = (tokens * per_token + scores * per_score) * F32;
    if shape.bf16_products {
        layer += if fused {
            let Dims { i, q, kv, .. } = Dims::of(cfg);
            let h = cfg.num_attention_heads as u64;
            (tokens * (5 * d + 2 * q + 2 * kv + i) + scores * h) * BF16
        } else {
            tokens * 4 * d * BF16
        };
    }
    // Final norm, the logits, and (composed) their log-softmax over the vocabulary; with bf16
    // products, the bf16 logits the output product makes (and its backward pass, their
    // gradient rounded to bf16).
    let logit_copies = if fused { 1 } else { 2 };
    let bf16_logits = if shape.bf16_products {
        tokens * v * BF16
    } else {
        0
    };
    let head = tokens * (norm_values(fused) * d + logit_copies * v) * F32 + bf16_logits;
    let activations = if shape.gradient_checkpointing {
        // Every layer's input and the gradient flowing down, beside the peak of the head's
        // backward pass (its results and as many gradients of the logits) or of one recomputed
        // layer's (its results and their gradients) (`crate::segments`). Without
        // recomputation the layers' backward passes free results as they make gradients.
        let head_backward =
            tokens * (norm_values(fused) * d + 2 * logit_copies * v) * F32 + bf16_logits;
        (layers + 2) * tokens * d * F32 + head_backward.max(2 * layer + attention_blocks)
    } else {
        layers * layer + head.max(attention_blocks)
    };
    let mut gradients = (trainable - bf16_trained) * F32 + bf16_trained * BF16;
    let bf16_states = match shape.bf16_rounding {
        Bf16Rounding::Compensated => 3,
        Bf16Rounding::Stochastic => 2,
    };
    let mut optimizer = 2 * (trainable - bf16_trained) * F32 + bf16_states * bf16_trained * BF16;
    let replicas = shape.replicas.max(1) as u64;
    if shape.on_gpu && replicas > 1 {
        // ZeRO stage 1 (`crate::step::optimizer_owners`): each device keeps its share of the
        // optimizer state and of the summed gradients, besides its replica's own gradients.
        optimizer = optimizer.div_ceil(replicas);
        gradients += gradients.div_ceil(replicas);
    }
    let (overhead, total) = if shape.on_gpu {
        (
            GPU_OVERHEAD,
            weights + gradients + optimizer + activations + GPU_OVERHEAD,
        )
    } else {
        // One memory for every replica: their activations and gradients add up.
        let replica_grads = (replicas - 1) * gradients;
        (
            CPU_OVERHEAD,
            weights + gradients + replica_grads + optimizer + replicas * activations + CPU_OVERHEAD,
        )
    };
    MemoryPlan {
        weights,
        gradients,
        optimizer,
        activations,
        overhead,
        total,
    }
}

/// What an evaluation's memory depends on besides the model's shape: the forward passes its
/// scorers make (`pipe_eval::heldout_passes`, `pipe_eval::loglikelihood_passes`) and its
/// longest generation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalShape {
    pub passes: Vec<ForwardPass>,
    /// The longest generation: the prompt's tokens read at once, and the most tokens its
    /// key/value cache holds (`pipe_eval::generation_length`).
    pub generation: Option<(usize, usize)>,
    pub on_gpu: bool,
}

/// What sets an evaluation's peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalPeak {
    /// Loading the model: its largest tensor is held twice while it is read and converted.
    Loading,
    Pass(ForwardPass),
    /// A generation of that many tokens, from a prompt of that many.
    Generation {
        prompt: usize,
        tokens: usize,
    },
}

/// The pipe process itself around an evaluate stage: the engine, the tokenizer, what the
/// stages before it left in the heap — 29 MiB measured with a one-layer model (`bench/memory.sh`).
const PIPE_PROCESS_OVERHEAD: u64 = 32 << 20;

/// The estimated peak of an evaluation (no gradients, no autodiff graph): the f32 weights
/// (`load_model` widens a bf16 or f16 checkpoint), and the largest of loading them (one
/// tensor twice), its widest forward pass and its longest generation.
///
/// A forward pass holds, at its peak, one layer's working set beside the residual stream —
/// in attention, the normed input, q, k and v laid out by head and rotated, keys and values
/// repeated for every query head under grouped-query attention, the output and its layout;
/// in the MLP, the normed input, gate, up and their product — and the attention mask
/// (one per row for packed rows). Attention scores are not held on the CPU (burn-flex's
/// `attention` works one head at a time, or tiles the keys); on a GPU burn's flash kernel
/// declines an additive mask and the composed path holds the scores, their exponentials and
/// probabilities of every head. Then the scored positions' logits and their log-softmax.
/// A generation holds its prompt's forward pass and the key/value cache, one layer's keys
/// or values twice while they grow. Batches of different lengths leave the heap fragmented:
/// a tenth more, as measured on the CPU.
pub fn plan_evaluation(cfg: &ModelConfig, shape: &EvalShape) -> (MemoryPlan, EvalPeak) {
    let (all, _) = parameter_count(cfg);
    let weights = all * F32;
    let Dims { d, v, i, .. } = Dims::of(cfg);
    let largest_tensor = (v * d).max(i * d) * F32;
    let pass_bytes = |p: &ForwardPass| forward_pass_bytes(cfg, p, shape.on_gpu) * 11 / 10;
    let mut peak = (largest_tensor, EvalPeak::Loading);
    for p in &shape.passes {
        let bytes = pass_bytes(p);
        if bytes > peak.0 {
            peak = (bytes, EvalPeak::Pass(*p));
        }
    }
    if let Some((prompt, tokens)) = shape.generation {
        let Dims { l, kv, .. } = Dims::of(cfg);
        let cache = 2 * l * kv * tokens as u64 * F32;
        let prefill = ForwardPass {
            rows: 1,
            seq: prompt,
            scored: 1,
            packed: false,
        };
        let bytes = pass_bytes(&prefill) + cache + 2 * cache / l.max(1);
        if bytes > peak.0 {
            peak = (bytes, EvalPeak::Generation { prompt, tokens });
        }
    }
    let overhead = if shape.on_gpu {
        GPU_OVERHEAD
    } else {
        PIPE_PROCESS_OVERHEAD
    };
    let plan = MemoryPlan {
        weights,
        gradients: 0,
        optimizer: 0,
        activations: peak.0,
        overhead,
        total: weights + peak.0 + overhead,
    };
    (plan, peak.1)
}

/// The scores (f32 values, every head of every row) of one block of queries when rows of
/// `seq` tokens are attended a block at a time (`pipe_model::attention`); `None` when a
/// layer's scores are made whole.
fn attention_score_block(cfg: &ModelConfig, rows: usize, seq: usize) -> Option<u64> {
    let h = cfg.num_attention_heads;
    pipe_model::attention::query_block_rows(rows, h, seq, seq)
        .map(|block| (block.min(seq) * rows * h * seq) as u64)
}

/// The bytes one forward pass of an evaluation holds at its peak (see [`plan_evaluation`]).
fn forward_pass_bytes(cfg: &ModelConfig, p: &ForwardPass, on_gpu: bool) -> u64 {
    let Dims { d, i, v, q, kv, .. } = Dims::of(cfg);
    let h = cfg.num_attention_heads as u64;
    let tokens = (p.rows * p.seq) as u64;
    let repeated = if cfg.num_key_value_heads < cfg.num_attention_heads {
        2 * q
    } else {
        0
    };
    // Residual, normed input, q/k/v and their layout by head, output and its layout.
    let attention = 2 * d + 3 * q + 2 * kv + repeated;
    // Residual, attention's sum, normed input, gate, up, product (composed: silu too), output.
    let mlp = 3 * d + if on_gpu { 4 } else { 3 } * i;
    let mut layer = tokens * attention.max(mlp);
    let seq = p.seq as u64;
    let mask_rows = if p.packed { p.rows as u64 } else { 1 };
    layer += mask_rows * seq * seq;
    if on_gpu {
        // burn's flash kernel declines the additive mask: the composed scores, exponentials
        // and probabilities, of every query or of one block of them.
        layer +=
            3 * attention_score_block(cfg, p.rows, p.seq).unwrap_or(h * p.rows as u64 * seq * seq);
    }
    // The scored positions' hidden states, logits and log-softmax.
    let head = tokens * d + p.scored as u64 * (d + 2 * v);
    layer.max(head) * F32
}

/// Changes to `shape` that bring its plan within `available` bytes, each a complete set of
/// settings a user writes (`micro_batch_size: 64`, `gradient_checkpointing: true,
/// micro_batch_size: 128`, `method: lora`), with micro-batch sizes that divide `batch_size`
/// into a number of micro-batches the replicas share evenly. Empty when nothing would fit.
pub fn what_would_fit(
    cfg: &ModelConfig,
    shape: &TrainShape,
    batch_size: usize,
    available: u64,
) -> Vec<String> {
    let valid = |m: usize, replicas: usize| {
        batch_size.is_multiple_of(m) && (batch_size / m).is_multiple_of(replicas.max(1))
    };
    // The largest valid micro-batch, up to the current one, at which `s` fits.
    let largest = |s: &TrainShape| {
        (1..=shape.micro_batch_size).rev().find(|&m| {
            valid(m, s.replicas)
                && plan_training(
                    cfg,
                    &TrainShape {
                        micro_batch_size: m,
                        ..s.clone()
                    },
                )
                .total
                    <= available
        })
    };
    let with_micro = |change: &str, m: usize| {
        if m == shape.micro_batch_size {
            change.to_string()
        } else {
            format!("{change}, micro_batch_size: {m}")
        }
    };
    let mut advice = Vec::new();
    let plain = largest(shape);
    if let Some(m) = plain {
        advice.push(format!("micro_batch_size: {m}"));
    }
    let better = |m: usize| plain.is_none_or(|p| m > p);
    if !shape.gradient_checkpointing {
        let with = TrainShape {
            gradient_checkpointing: true,
            ..shape.clone()
        };
        if let Some(m) = largest(&with).filter(|&m| better(m)) {
            advice.push(with_micro("gradient_checkpointing: true", m));
        }
    }
    if shape.lora.is_none() {
        // bf16 weights with compensated updates where they fit, else with stochastic rounding
        // (a bf16 value a parameter less).
        let dtype = if shape.bf16_products {
            ""
        } else {
            "dtype: bf16, "
        };
        let rounded = |rounding| TrainShape {
            bf16_products: true,
            bf16_weights: true,
            bf16_rounding: rounding,
            gradient_checkpointing: true,
            ..shape.clone()
        };
        let compensated = (!shape.bf16_weights)
            .then(|| largest(&rounded(Bf16Rounding::Compensated)))
            .flatten()
            .filter(|&m| better(m) || plain.is_none());
        let stochastic = (shape.bf16_rounding == Bf16Rounding::Compensated)
            .then(|| largest(&rounded(Bf16Rounding::Stochastic)))
            .flatten()
            .filter(|&m| compensated.is_none_or(|c| m > c) && (better(m) || plain.is_none()));
        if let Some(m) = compensated {
            let change = format!("{dtype}weights: bf16, gradient_checkpointing: true");
            advice.push(with_micro(&change, m));
        }
        if let Some(m) = stochastic {
            let change = format!(
                "{dtype}weights: bf16, bf16_rounding: stochastic, gradient_checkpointing: true"
            );
            advice.push(with_micro(&change, m));
        }
    }
    if shape.on_gpu {
        // More GPUs share out the optimizer state: the fewest (up to 8) at which the settings
        // as they are fit.
        let more = (1..=3)
            .map(|doublings| shape.replicas.max(1) << doublings)
            .filter(|&n| n <= 8)
            .find_map(|n| {
                let wider = TrainShape {
                    replicas: n,
                    ..shape.clone()
                };
                largest(&wider)
                    .filter(|&m| better(m) || plain.is_none())
                    .map(|m| (n, m))
            });
        if let Some((n, m)) = more {
            let names: Vec<String> = (0..n).map(|k| format!("cuda:{k}")).collect();
            advice.push(with_micro(&format!("devices: [{}]", names.join(", ")), m));
        }
    }
    if shape.lora.is_none() {
        let lora = TrainShape {
            lora: Some(LoraShape {
                rank: 16,
                targets_per_layer: 7,
            }),
            ..shape.clone()
        };
        if let Some(m) = largest(&lora).filter(|&m| better(m) || plain.is_none()) {
            advice.push(with_micro("method: lora", m));
        }
    }
    advice
}

/// Bytes this process can still allocate on the CPU: the kernel's `MemAvailable`, or less where
/// a cgroup (a container, a Slurm job) sets a lower limit. `None` where neither can be read.
pub fn available_cpu_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)?;
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{name}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let cgroup =
        read("memory.max").map(|max| max.saturating_sub(read("memory.current").unwrap_or(0)));
    Some(cgroup.map_or(available, |c| c.min(available)))
}

/// `n` bytes for people: `512 MiB`, `3.1 GiB`.
pub fn human_bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / GIB)
    } else {
        format!("{} MiB", n.div_ceil(1 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama2_7b() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                "max_position_embeddings": 4096}"#,
        )
        .unwrap()
    }

    /// Full fine-tuning of one row of 512 tokens under `dtype: bf16` on one GPU.
    fn full_at_512() -> TrainShape {
        TrainShape {
            lora: None,
            micro_batch_size: 1,
            seq_len: 512,
            bf16_products: true,
            bf16_weights: false,
            bf16_rounding: Bf16Rounding::Compensated,
            gradient_checkpointing: false,
            replicas: 1,
            on_gpu: true,
        }
    }

    #[test]
    fn llama2_7b_has_its_published_parameter_count() {
        let (all, _) = parameter_count(&llama2_7b());
        assert_eq!(all, 6_738_415_616);
    }

    #[test]
    fn lora_r16_all_linear_on_7b_matches_peft() {
        // PEFT's print_trainable_parameters for r=16 on every linear layer of Llama-2-7B.
        let lora = LoraShape {
            rank: 16,
            targets_per_layer: 7,
        };
        assert_eq!(lora_parameters(&llama2_7b(), lora), 39_976_960);
    }

    #[test]
    fn a_lora_base_at_bf16_is_held_in_bf16() {
        let shape = |bf16_products| TrainShape {
            lora: Some(LoraShape {
                rank: 16,
                targets_per_layer: 7,
            }),
            micro_batch_size: 4,
            seq_len: 512,
            bf16_products,
            bf16_weights: false,
            bf16_rounding: Bf16Rounding::Compensated,
            gradient_checkpointing: true,
            replicas: 1,
            on_gpu: true,
        };
        let cfg = llama2_7b();
        let bf16 = plan_training(&cfg, &shape(true));
        let f32 = plan_training(&cfg, &shape(false));
        // The 6.6 billion projection weights (lm_head included) at 2 bytes instead of 4 (the
        // embeddings, norms and adapters stay f32; the embeddings' bf16 copy for the output
        // product remains).
        let projections = projection_count(&cfg);
        assert_eq!(projections, 6_607_077_376);
        let (all, _) = parameter_count(&cfg);
        let adapters = 39_976_960;
        assert_eq!(
            bf16.weights,
            (all - projections + adapters) * F32 + projections * BF16 + 32_000 * 4096 * BF16
        );
        // 14.2 GB of weights where an f32 base held 28.4 GB (PEFT's bf16 base: 13.5 GB).
        assert!(bf16.weights < f32.weights * 6 / 10, "{bf16:?} vs {f32:?}");
    }

    #[test]
    fn long_rows_cost_their_tokens_not_the_square_of_their_length() {
        // Held whole, 32 heads' scores, masked sum, exp and probabilities of a row of 4096
        // tokens would be 4096² × 32 × 4 × 4 bytes = 8 GiB a layer, 256 GiB for 32 layers.
        // Attended a block of queries at a time, no layer keeps its scores: one row of 4096
        // tokens costs what eight rows of 512 do (both in blocks), but for the size of a block.
        let shape = |micro_batch_size, seq_len, gradient_checkpointing| TrainShape {
            lora: Some(LoraShape {
                rank: 16,
                targets_per_layer: 7,
            }),
            micro_batch_size,
            seq_len,
            gradient_checkpointing,
            ..full_at_512()
        };
        let block = (BLOCK_SCORE_BYTES * 5) as u64;
        for checkpointing in [false, true] {
            let long = plan_training(&llama2_7b(), &shape(1, 4096, checkpointing));
            let many = plan_training(&llama2_7b(), &shape(8, 512, checkpointing));
            assert!(
                long.activations.abs_diff(many.activations) <= block,
                "{long:?} vs {many:?}"
            );
            if checkpointing {
                // 22.5 GB; 39.6 GB when a layer held its scores whole.
                assert!(long.total < 24 << 30, "{long:?}");
            }
        }
        // Short rows keep their scores whole (4 rows of 128 tokens: 8 MiB a layer): every
        // layer, the four composed copies of 32 heads' scores, besides what grows with tokens.
        let scores = |seq: u64| 32 * 4 * seq * seq * (4 * 32) * F32;
        let short = plan_training(&llama2_7b(), &shape(4, 128, false));
        let shorter = plan_training(&llama2_7b(), &shape(4, 64, false));
        assert_eq!(
            short.activations - scores(128),
            2 * (shorter.activations - scores(64)),
            "{short:?} vs {shorter:?}"
        );
    }

    #[test]
    fn full_fine_tuning_of_7b_in_f32_needs_sixteen_bytes_a_parameter_before_activations() {
        let shape = TrainShape {
            lora: None,
            micro_batch_size: 1,
            seq_len: 1,
            bf16_products: false,
            bf16_weights: false,
            bf16_rounding: Bf16Rounding::Compensated,
            gradient_checkpointing: false,
            replicas: 1,
            on_gpu: true,
        };
        let plan = plan_training(&llama2_7b(), &shape);
        assert_eq!(
            plan.weights + plan.gradients + plan.optimizer,
            16 * 6_738_415_616
        );
    }

    #[test]
    fn full_fine_tuning_of_7b_with_bf16_weights_fits_one_80_gb_gpu() {
        let shape = |bf16_weights, micro_batch_size| TrainShape {
            lora: None,
            micro_batch_size,
            seq_len: 512,
            bf16_products: true,
            bf16_weights,
            bf16_rounding: Bf16Rounding::Compensated,
            gradient_checkpointing: true,
            replicas: 1,
            on_gpu: true,
        };
        let cfg = llama2_7b();
        let f32 = plan_training(&cfg, &shape(false, 1));
        let bf16 = plan_training(&cfg, &shape(true, 1));
        // The layers' 6.5 billion projection parameters at 10 bytes instead of 16 (and no bf16
        // copy of the recomputed layer's); embeddings, lm_head and norms as before.
        let p = layer_projection_count(&cfg);
        assert_eq!(p, 6_476_005_376);
        assert_eq!(
            (f32.weights + f32.gradients + f32.optimizer)
                - (bf16.weights + bf16.gradients + bf16.optimizer),
            p * (16 - 10) + p / 32 * 2
        );
        // 71.2 GB with bf16 weights, against 110 GB; the recipe's micro-batch of 4 within an
        // 80 GB card's 80 GiB.
        assert!(f32.total > 100 << 30, "{}", f32.total);
        assert!(bf16.total <= 72_000_000_000, "{}", bf16.total);
        assert!(plan_training(&cfg, &shape(true, 4)).total < 80 << 30);
        // Stochastic rounding keeps no compensation: 2 bytes a projection parameter less.
        let stochastic = plan_training(
            &cfg,
            &TrainShape {
                bf16_rounding: Bf16Rounding::Stochastic,
                ..shape(true, 1)
            },
        );
        assert_eq!(bf16.optimizer - stochastic.optimizer, 2 * p);
        assert_eq!(bf16.total - stochastic.total, 2 * p);
    }

    #[test]
    fn four_80_gb_gpus_hold_the_published_alpaca_recipe_with_a_fifth_to_spare() {
        // Stanford Alpaca: full fine-tuning of 7B at 512 tokens in bf16 on 4 × A100 80 GB,
        // 4 rows a GPU per micro-batch.
        let shape = |replicas| TrainShape {
            micro_batch_size: 4,
            bf16_weights: true,
            gradient_checkpointing: true,
            replicas,
            ..full_at_512()
        };
        let cfg = llama2_7b();
        let (one, four) = (
            plan_training(&cfg, &shape(1)),
            plan_training(&cfg, &shape(4)),
        );
        // Each GPU keeps a quarter of the optimizer state and of the summed gradients, besides
        // its replica's weights, gradients and activations.
        assert_eq!(four.optimizer, one.optimizer.div_ceil(4));
        assert_eq!(four.gradients, one.gradients + one.gradients.div_ceil(4));
        assert_eq!(
            (four.weights, four.activations),
            (one.weights, one.activations)
        );
        let gpu = 80u64 << 30;
        assert!(four.total * 5 <= gpu * 4, "{} GiB", four.total >> 30);
        // Every replica holding all of the optimizer state would leave no such room.
        assert!((four.total - four.optimizer + one.optimizer) * 5 > gpu * 4);
    }

    #[test]
    fn lora_r16_on_7b_at_micro_batch_4_fits_in_20_gb() {
        // The bf16 base (13.5 GB in PEFT), the adapters with their gradients and AdamW state,
        // every layer's input and one recomputed layer's results.
        let plan = plan_training(
            &llama2_7b(),
            &TrainShape {
                lora: Some(LoraShape {
                    rank: 16,
                    targets_per_layer: 7,
                }),
                micro_batch_size: 4,
                gradient_checkpointing: true,
                ..full_at_512()
            },
        );
        assert!(plan.total <= 20_000_000_000, "{plan:?}");
        assert!(plan.weights > 13_500_000_000, "{plan:?}");
    }

    #[test]
    fn advice_offers_more_gpus_when_sharing_the_optimizer_state_out_fits() {
        let cfg = llama2_7b();
        let shape = TrainShape {
            bf16_weights: true,
            gradient_checkpointing: true,
            ..full_at_512()
        };
        // 66 GiB on one GPU; 54 GiB without the compensation, or 53 GiB a GPU on two.
        let advice = what_would_fit(&cfg, &shape, 8, 60 << 30);
        assert_eq!(
            advice,
            [
                "weights: bf16, bf16_rounding: stochastic, gradient_checkpointing: true",
                "devices: [cuda:0, cuda:1]",
                "method: lora"
            ]
        );
        // On a CPU, replicas share one memory: more of them never help.
        let cpu = TrainShape {
            on_gpu: false,
            ..shape
        };
        assert!(!what_would_fit(&cfg, &cpu, 8, 60 << 30)
            .iter()
            .any(|a| a.starts_with("devices")));
    }

    #[test]
    fn checkpointing_and_lora_shrink_the_plan_and_batch_grows_it() {
        let base = TrainShape {
            micro_batch_size: 4,
            ..full_at_512()
        };
        let cfg = llama2_7b();
        let full = plan_training(&cfg, &base);
        let ckpt = plan_training(
            &cfg,
            &TrainShape {
                gradient_checkpointing: true,
                ..base.clone()
            },
        );
        let lora = plan_training(
            &cfg,
            &TrainShape {
                lora: Some(LoraShape {
                    rank: 16,
                    targets_per_layer: 7,
                }),
                ..base.clone()
            },
        );
        let bigger = plan_training(
            &cfg,
            &TrainShape {
                micro_batch_size: 8,
                ..base.clone()
            },
        );
        assert!(ckpt.activations < full.activations * 3 / 4);
        assert!(lora.gradients * 100 < full.gradients);
        assert!(lora.total < full.total);
        assert!(bigger.activations > full.activations * 19 / 10);
    }

    #[test]
    fn advice_names_settings_that_fit_and_none_that_do_not() {
        let cfg = llama2_7b();
        let shape = TrainShape {
            micro_batch_size: 8,
            ..full_at_512()
        };
        // An 80 GB card cannot hold full fine-tuning with f32 weights (108 GB of states
        // alone), but can with bf16 weights and recomputed layers at the same micro-batch, or
        // LoRA at a smaller one …
        let advice = what_would_fit(&cfg, &shape, 8, 80 << 30);
        assert_eq!(
            advice,
            [
                "weights: bf16, gradient_checkpointing: true",
                "method: lora, micro_batch_size: 4"
            ],
        );
        // … a 141 GB one can at a smaller micro-batch: the largest that divides the batch of 8
        // and fits is proposed.
        let advice = what_would_fit(&cfg, &shape, 8, 141 << 30);
        let m: usize = advice[0]
            .strip_prefix("micro_batch_size: ")
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("{advice:?}"));
        let at = |m| {
            plan_training(
                &cfg,
                &TrainShape {
                    micro_batch_size: m,
                    ..shape.clone()
                },
            )
            .total
        };
        assert!(
            m < 8 && 8usize.is_multiple_of(m) && at(m) <= 141 << 30 && at(2 * m) > 141 << 30,
            "{advice:?}"
        );
        // Nothing fits in 1 GB.
        assert!(what_would_fit(&cfg, &shape, 8, 1 << 30).is_empty());
    }

    fn eval_shape(passes: Vec<ForwardPass>, generation: Option<(usize, usize)>) -> EvalShape {
        EvalShape {
            passes,
            generation,
            on_gpu: true,
        }
    }

    fn pass(rows: usize, seq: usize, scored: usize) -> ForwardPass {
        ForwardPass {
            rows,
            seq,
            scored,
            packed: false,
        }
    }

    #[test]
    fn evaluation_needs_the_weights_and_its_widest_pass() {
        let cfg = llama2_7b();
        let (nothing, peak) = plan_evaluation(&cfg, &eval_shape(vec![], None));
        assert_eq!(peak, EvalPeak::Loading);
        assert_eq!(nothing.weights, 4 * 6_738_415_616);
        // The embeddings, read and converted.
        assert_eq!(nothing.activations, 32000 * 4096 * 4);
        let wide = pass(8, 512, 8 * 511);
        let (plan, peak) = plan_evaluation(&cfg, &eval_shape(vec![pass(8, 100, 10), wide], None));
        assert_eq!(peak, EvalPeak::Pass(wide));
        // Every scored position's logits and their log-softmax at least.
        assert!(plan.activations > 2 * 8 * 511 * 32000 * 4, "{plan:?}");
        assert_eq!(plan.total, plan.weights + plan.activations + plan.overhead);
        // On the CPU (no attention scores held) the logits set the peak: fewer scored
        // positions, fewer bytes; packed rows carry a mask each.
        let on_cpu = |passes| {
            plan_evaluation(
                &cfg,
                &EvalShape {
                    on_gpu: false,
                    ..eval_shape(passes, None)
                },
            )
            .0
            .activations
        };
        let few = on_cpu(vec![pass(8, 512, 8)]);
        assert!(few < on_cpu(vec![wide]));
        let packed = ForwardPass {
            packed: true,
            ..pass(8, 512, 8)
        };
        // Eight masks instead of the one the rows share (and a tenth for fragmentation).
        let masks = on_cpu(vec![packed]) - few;
        assert!(masks.abs_diff(7 * 512 * 512 * 4 * 11 / 10) <= 1, "{masks}");
        // On a GPU the composed attention's scores come first.
        assert!(plan.activations >= 3 * 32 * 8 * 512 * 512 * 4, "{plan:?}");
        // Far less than training the same batch.
        assert!(
            plan.total
                < plan_training(
                    &cfg,
                    &TrainShape {
                        lora: None,
                        micro_batch_size: 8,
                        seq_len: 512,
                        bf16_products: false,
                        bf16_weights: false,
                        bf16_rounding: Bf16Rounding::Compensated,
                        gradient_checkpointing: false,
                        replicas: 1,
                        on_gpu: true,
                    }
                )
                .total
        );
    }

    #[test]
    fn a_long_generation_is_sized_by_its_key_value_cache() {
        let cfg = llama2_7b();
        // 4096 tokens of keys and values, 32 layers of 4096 wide, in f32: 4 GiB.
        let (plan, peak) =
            plan_evaluation(&cfg, &eval_shape(vec![pass(1, 64, 63)], Some((96, 4096))));
        assert_eq!(
            peak,
            EvalPeak::Generation {
                prompt: 96,
                tokens: 4096
            }
        );
        let cache = 2 * 32 * 4096 * 4096 * 4;
        assert!(
            plan.activations >= cache && plan.activations < cache + (1 << 30),
            "{plan:?}"
        );
    }

    #[test]
    fn available_memory_is_read_on_linux() {
        let n = available_cpu_memory().expect("/proc/meminfo");
        assert!(n > 16 << 20, "{n}");
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(1), "1 MiB");
    }
}
