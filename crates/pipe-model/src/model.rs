//! The Llama decoder, block by block, numerically the same as transformers'
//! `LlamaForCausalLM`: RMSNorm, rotary embeddings (the `rotate_half` convention),
//! grouped-query attention, SwiGLU MLP, optional tied embeddings.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, FloatDType, Int, Tensor, TensorData};

use crate::config::ModelConfig;

/// How matrix products are computed: in f32, or as mixed-precision training does (PyTorch's
/// `autocast` to bf16): both operands rounded to bf16, the result (accumulated in f32 by the
/// backend) rounded to bf16 and widened back. Parameters, optimizer state, norms, softmax and
/// the loss stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    #[default]
    F32,
    Bf16,
}

/// `a·b` at `precision`.
pub fn matmul_at<B: Backend, const D: usize>(
    precision: MatmulPrecision,
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Tensor<B, D> {
    match precision {
        MatmulPrecision::F32 => a.matmul(b),
        MatmulPrecision::Bf16 => a
            .cast(FloatDType::BF16)
            .matmul(b.cast(FloatDType::BF16))
            .cast(FloatDType::F32),
    }
}

/// A linear map `y = x·W (+ b)`, with `W` stored `[d_input, d_output]` (transposed from the
/// `[out, in]` of a Hugging Face checkpoint when loaded), and optionally a LoRA adapter.
#[derive(Module, Debug)]
pub struct Proj<B: Backend> {
    /// `[d_input, d_output]`
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_output]`
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<Lora<B>>,
    #[module(skip)]
    pub precision: MatmulPrecision,
}

/// A low-rank update as PEFT computes it: `y += (x·A)·B · alpha/r`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[d_input, r]` (PEFT's `lora_A.weight`, transposed)
    pub a: Param<Tensor<B, 2>>,
    /// `[r, d_output]` (PEFT's `lora_B.weight`, transposed)
    pub b: Param<Tensor<B, 2>>,
    /// `alpha / r`
    pub scaling: f64,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`).
    pub dropout: f64,
}

impl<B: Backend> Proj<B> {
    /// `[batch, seq, d_input]` → `[batch, seq, d_output]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        // One [batch·seq, d_input] × [d_input, d_output] product rather than `batch` small
        // ones: CPU matrix kernels are far faster on one large operand.
        let y = matmul_at(
            self.precision,
            x.clone().reshape([b * s, d]),
            self.weight.val(),
        );
        let d_out = y.dims()[1];
        let mut y = y.reshape([b, s, d_out]);
        if let Some(b) = &self.bias {
            y = y + b.val().unsqueeze();
        }
        if let Some(l) = &self.lora {
            let device = x.device();
            // Only while gradients are tracked (training), as torch's Dropout in train mode.
            let x = if l.dropout > 0.0 && B::ad_enabled(&device) {
                let keep = Tensor::<B, 3>::random(
                    x.shape(),
                    Distribution::Bernoulli(1.0 - l.dropout),
                    &device,
                );
                x * keep / (1.0 - l.dropout)
            } else {
                x
            };
            let down = matmul_at(self.precision, x.reshape([b * s, d]), l.a.val());
            let update = matmul_at(self.precision, down, l.b.val()).reshape([b, s, d_out]);
            y = y + update * l.scaling;
        }
        y
    }
}

/// RMSNorm as transformers computes it: in f32, `x · rsqrt(mean(x²) + ε) · γ`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[d_model]`
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// `[batch, seq, d_model]` → same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let variance = x.clone().powi_scalar(2).mean_dim(2);
        let normed = x * (variance + self.eps).sqrt().recip();
        normed * self.weight.val().unsqueeze()
    }
}

/// Precomputed rotary tables: `cos` and `sin`, `[max_positions, head_dim]`, each half
/// repeated (transformers' `cat((freqs, freqs), -1)`).
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub head_dim: usize,
    pub max_positions: usize,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let inv_freq: Vec<f32> = cfg.inv_freq().iter().map(|&f| f as f32).collect();
        let (d, n) = (cfg.head_dim, cfg.max_position_embeddings);
        let mut cos = Vec::with_capacity(n * d);
        let mut sin = Vec::with_capacity(n * d);
        for p in 0..n {
            // Both halves of the head dim use the same frequencies.
            for f in inv_freq.iter().chain(&inv_freq) {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Rope {
            cos,
            sin,
            head_dim: d,
            max_positions: n,
        }
    }

    /// `cos`, `sin` for positions `start..start + seq`, `[1, 1, seq, head_dim]`.
    fn tables<B: Backend>(
        &self,
        start: usize,
        seq: usize,
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let range = start * self.head_dim..(start + seq) * self.head_dim;
        let cos = Tensor::<B, 2>::from_data(
            TensorData::new(self.cos[range.clone()].to_vec(), [seq, self.head_dim]),
            device,
        );
        let sin = Tensor::<B, 2>::from_data(
            TensorData::new(self.sin[range].to_vec(), [seq, self.head_dim]),
            device,
        );
        (cos.unsqueeze(), sin.unsqueeze())
    }
}

/// `x·cos + rotate_half(x)·sin`, with `rotate_half([a, b]) = [-b, a]` over the head dim.
fn apply_rope<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, _, _, d] = x.dims();
    let first = x.clone().narrow(3, 0, d / 2);
    let second = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos + rotated * sin
}

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Proj<B>,
    pub k_proj: Proj<B>,
    pub v_proj: Proj<B>,
    pub o_proj: Proj<B>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Of the score and weighted-sum products (the projections have their own).
    #[module(skip)]
    pub precision: MatmulPrecision,
}

impl<B: Backend> Attention<B> {
    /// `x`: `[batch, seq, hidden]`; `mask`: additive, `[batch, 1, seq, past + seq]`;
    /// `past`: this layer's cached keys and values of earlier positions (extended with this
    /// call's) → `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        mask: Tensor<B, 4>,
        past: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // The rotation is applied while heads are still the inner dimension ([batch, seq,
        // heads, head_dim], as the projections leave them), where the elementwise work runs on
        // contiguous memory; `[rows, 1, seq, d]` tables read as `[rows, seq, 1, d]` for free.
        let [rows, _, _, _] = cos.dims();
        let cos = cos.reshape([rows, s, 1, d]);
        let sin = sin.reshape([rows, s, 1, d]);
        let q = self.q_proj.forward(x.clone()).reshape([b, s, h, d]);
        let k = self.k_proj.forward(x.clone()).reshape([b, s, kv, d]);
        let q = apply_rope(q, cos.clone(), sin.clone()).swap_dims(1, 2);
        let k = apply_rope(k, cos, sin).swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, s, kv, d])
            .swap_dims(1, 2);
        let (k, v) = match past {
            None => (k, v),
            Some(cache) => {
                let (k, v) = match cache.take() {
                    None => (k, v),
                    Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
                };
                *cache = Some((k.clone(), v.clone()));
                (k, v)
            }
        };
        let t = k.dims()[2];
        // Head i reads key/value head i / (h / kv), as transformers' repeat_kv arranges it.
        let (k, v) = if kv == h {
            (k, v)
        } else {
            let rep = h / kv;
            let k = k
                .unsqueeze_dim::<5>(2)
                .expand([b, kv, rep, t, d])
                .reshape([b, h, t, d]);
            let v = v
                .unsqueeze_dim::<5>(2)
                .expand([b, kv, rep, t, d])
                .reshape([b, h, t, d]);
            (k, v)
        };
        let out = if self.precision == MatmulPrecision::F32 && !B::ad_enabled(&q.device()) {
            // Scoring and generation: the backend's own attention (burn-flex tiles the keys
            // with an online softmax once the score matrix outgrows its cache, so no seq ×
            // seq matrix per head is held). Training keeps the explicit form below: burn's
            // autodiff decomposes `attention` into the same operations anyway.
            attention(q, k, v, None, Some(mask), AttentionModuleOptions::default())
        } else {
            let scores = matmul_at(self.precision, q, k.swap_dims(2, 3)) / (d as f64).sqrt() + mask;
            matmul_at(self.precision, softmax(scores, 3), v)
        };
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, s, h * d]))
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Proj<B>,
    pub up_proj: Proj<B>,
    pub down_proj: Proj<B>,
}

impl<B: Backend> Mlp<B> {
    /// `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down_proj
            .forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// `[batch, seq, hidden]` → same (`mask` and `past` as in [`Attention::forward`])
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 4>,
        sin: Tensor<B, 4>,
        mask: Tensor<B, 4>,
        past: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), cos, sin, mask, past);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// The causal language model.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// `[vocab, hidden]`
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when the output projection is the (transposed) input embedding.
    pub lm_head: Option<Proj<B>>,
    /// Of the tied output projection (the other products have their own).
    #[module(skip)]
    pub matmul_precision: MatmulPrecision,
    #[module(skip)]
    pub rope: Rope,
    #[module(skip)]
    pub config: ModelConfig,
}

impl<B: Backend> CausalLm<B> {
    /// Every matrix product of the model at `precision` (mixed-precision training with
    /// `MatmulPrecision::Bf16`).
    pub fn with_matmul_precision(mut self, precision: MatmulPrecision) -> Self {
        self.matmul_precision = precision;
        for layer in &mut self.layers {
            layer.self_attn.precision = precision;
        }
        for (_, proj) in self.linear_modules_mut() {
            proj.precision = precision;
        }
        self
    }

    /// Stores every frozen projection matrix (a LoRA base's) in bf16, as PEFT keeps a bf16
    /// base: half the memory of those weights, and the same numbers, because products at
    /// `MatmulPrecision::Bf16` round both operands to bf16 anyway — the rounding moves from
    /// every product to once. At f32 precision it leaves the model as it is: a bf16 operand
    /// would be widened again at every product and that copy kept for the backward pass.
    /// Trainable matrices (full fine-tuning, `modules_to_save`) stay f32.
    pub fn keep_frozen_projections_in_bf16(mut self) -> Self {
        if self.matmul_precision != MatmulPrecision::Bf16 {
            return self;
        }
        for (_, proj) in self.linear_modules_mut() {
            let weight = proj.weight.val();
            if weight.is_require_grad() {
                continue;
            }
            proj.weight = Param::initialized(proj.weight.id, weight.cast(FloatDType::BF16));
        }
        self
    }

    /// `input_ids`: `[batch, seq]`; `attention_mask`: `[batch, seq]`, 1 for tokens and 0 for
    /// padding (keys at 0 are not attended to) → logits `[batch, seq, vocab]`.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<&[Vec<u8>]>,
    ) -> Tensor<B, 3> {
        self.logits(self.hidden(input_ids, attention_mask))
    }

    /// The final hidden states (after the last norm), before the output projection:
    /// `input_ids` `[batch, seq]` → `[batch, seq, hidden]`. Scoring a few positions of a long
    /// sequence projects only those onto the vocabulary.
    pub fn hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<&[Vec<u8>]>,
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        assert!(
            s <= self.rope.max_positions,
            "sequence of {s} exceeds max_position_embeddings {}",
            self.rope.max_positions
        );
        let device = input_ids.device();
        let mut x = burn::tensor::module::embedding(self.embed_tokens.val(), input_ids);
        let (cos, sin) = self.rope.tables::<B>(0, s, &device);
        let mask = additive_mask::<B>(b, s, 0, attention_mask, &device);
        for layer in &self.layers {
            x = layer.forward(x, cos.clone(), sin.clone(), mask.clone(), None);
        }
        self.norm.forward(x)
    }

    /// [`Self::hidden`] for rows that hold several sequences side by side (packed):
    /// `segments[b][t]` names the sequence token t of row b belongs to. A token sees the earlier
    /// tokens of its own segment and of segment 0, the shared prefix (`0` everywhere: plain
    /// causal attention; a prefix then one segment per continuation: several continuations of
    /// one context in one row); `positions[b][t]` is its rotary position. Negative segments are
    /// padding. `[batch, seq]` → `[batch, seq, hidden]`.
    pub fn hidden_packed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        positions: &[Vec<usize>],
        segments: &[Vec<i32>],
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let d = self.rope.head_dim;
        let mut cos = Vec::with_capacity(b * s * d);
        let mut sin = Vec::with_capacity(b * s * d);
        for row in positions {
            for &p in row {
                assert!(
                    p < self.rope.max_positions,
                    "position {p} exceeds max_position_embeddings {}",
                    self.rope.max_positions
                );
                cos.extend_from_slice(&self.rope.cos[p * d..(p + 1) * d]);
                sin.extend_from_slice(&self.rope.sin[p * d..(p + 1) * d]);
            }
        }
        let cos = Tensor::<B, 4>::from_data(TensorData::new(cos, [b, 1, s, d]), &device);
        let sin = Tensor::<B, 4>::from_data(TensorData::new(sin, [b, 1, s, d]), &device);
        let mut m = vec![f32::MIN; b * s * s];
        for (bi, seg) in segments.iter().enumerate() {
            for i in 0..s {
                for j in 0..=i {
                    let visible = seg[i] >= 0 && (seg[j] == seg[i] || seg[j] == 0);
                    // Padding sees itself, so that its (unused) softmax stays finite.
                    if visible || i == j {
                        m[(bi * s + i) * s + j] = 0.0;
                    }
                }
            }
        }
        let mask = Tensor::<B, 4>::from_data(TensorData::new(m, [b, 1, s, s]), &device);
        let mut x = burn::tensor::module::embedding(self.embed_tokens.val(), input_ids);
        for layer in &self.layers {
            x = layer.forward(x, cos.clone(), sin.clone(), mask.clone(), None);
        }
        self.norm.forward(x)
    }

    /// The output projection: `[batch, seq, hidden]` → logits `[batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, h] = hidden.dims();
                let logits = matmul_at(
                    self.matmul_precision,
                    hidden.reshape([b * s, h]),
                    self.embed_tokens.val().transpose(),
                );
                let v = logits.dims()[1];
                logits.reshape([b, s, v])
            }
        }
    }

    /// Incremental decoding: runs `input_ids` `[batch, seq]` after the positions already in
    /// `cache` (extending it) → the logits of the last position, `[batch, vocab]`.
    pub fn forward_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 2> {
        let [b, s] = input_ids.dims();
        let last = self.hidden_cached(input_ids, cache).narrow(1, s - 1, 1);
        let logits = self.logits(last);
        let [_, _, v] = logits.dims();
        logits.reshape([b, v])
    }

    /// [`Self::hidden`] after the positions already in `cache` (extending it): `input_ids`
    /// `[batch, seq]` → `[batch, seq, hidden]`.
    pub fn hidden_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        let past = cache.len;
        assert!(
            past + s <= self.rope.max_positions,
            "sequence of {} exceeds max_position_embeddings {}",
            past + s,
            self.rope.max_positions
        );
        if cache.layers.len() != self.layers.len() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let device = input_ids.device();
        let mut x = burn::tensor::module::embedding(self.embed_tokens.val(), input_ids);
        let (cos, sin) = self.rope.tables::<B>(past, s, &device);
        let mask = additive_mask::<B>(b, s, past, None, &device);
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, cos.clone(), sin.clone(), mask.clone(), Some(slot));
        }
        cache.len = past + s;
        self.norm.forward(x)
    }
}

/// One layer's keys and values so far, `[batch, n_kv_heads, positions, head_dim]` each.
pub type LayerCache<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// The keys and values of every layer for the positions decoded so far.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    len: usize,
}

impl<B: Backend> Default for KvCache<B> {
    fn default() -> Self {
        KvCache {
            layers: Vec::new(),
            len: 0,
        }
    }
}

impl<B: Backend> KvCache<B> {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The causal mask (and padding, if given) as additive biases: 0 where attending is allowed,
/// the lowest f32 elsewhere (as transformers uses `finfo.min`). The `s` queries follow `past`
/// cached positions: `[batch, 1, s, past + s]`.
fn additive_mask<B: Backend>(
    b: usize,
    s: usize,
    past: usize,
    padding: Option<&[Vec<u8>]>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let t = past + s;
    let mut m = vec![0f32; b * s * t];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..t {
                let padded = padding.is_some_and(|p| p[bi][j] == 0);
                if j > past + i || padded {
                    m[(bi * s + i) * t + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [b, 1, s, t]), device)
}

/// Mean cross-entropy over labels ≠ -100, with logits at position t predicting the label at
/// t + 1 (transformers' shift). Returns (sum of token losses, number of counted tokens), so
/// that gradient accumulation can normalise over every token of an effective batch.
pub fn shifted_cross_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    labels: &[Vec<i64>],
) -> (Tensor<B, 1>, usize) {
    let [b, s, v] = logits.dims();
    let device = logits.device();
    let mut targets = Vec::with_capacity(b * (s - 1));
    let mut weights = Vec::with_capacity(b * (s - 1));
    for row in labels {
        for &l in &row[1..s] {
            targets.push(if l < 0 { 0 } else { l });
            weights.push(if l < 0 { 0f32 } else { 1.0 });
        }
    }
    let count = weights.iter().filter(|w| **w > 0.0).count();
    let logits = logits.narrow(1, 0, s - 1).reshape([b * (s - 1), v]);
    let logp = burn::tensor::activation::log_softmax(logits, 1);
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [b * (s - 1), 1]), &device);
    let picked = logp.gather(1, idx).reshape([b * (s - 1)]);
    let w = Tensor::<B, 1>::from_data(TensorData::new(weights, [b * (s - 1)]), &device);
    ((picked * w).sum().neg(), count)
}
