//! The decoder, block by block, each a `*Config` (built from [`ModelConfig`], `init` from
//! [`Weights`]) and a `Module`, numerically the same as transformers' models of every
//! family: RMSNorm (`w` or `1 + w`), rotary embeddings (the `rotate_half` convention, whole or
//! partial heads), grouped-query attention (biases, q/k norms, soft-capping, sliding windows),
//! gated MLPs (SwiGLU, GeGLU; fused or not), tied or untied embeddings.

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu_approximate, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention as backend_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, FloatDType, Int, Tensor, TensorData};

use crate::attention;
use crate::config::{Activation, LayerType, ModelConfig, NormStyle};
use crate::kernels;
use crate::rope::RopeConfig;
use crate::save::Named;
use crate::weights::{Fill, Weights};
use crate::ModelError;

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
        MatmulPrecision::F32 => kernels::matmul(a, b),
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

/// A linear map's shape.
#[derive(Debug, Clone, Copy)]
pub struct ProjConfig {
    pub d_input: usize,
    pub d_output: usize,
    pub bias: bool,
}

impl ProjConfig {
    /// The projection stored as `{name}.weight` (`[d_output, d_input]`) and `{name}.bias`.
    pub fn init<B: Backend>(
        &self,
        name: &str,
        w: &mut Weights<'_, B>,
    ) -> Result<Proj<B>, ModelError> {
        let weight = w.linear(&format!("{name}.weight"), self.d_output, self.d_input)?;
        let bias = if self.bias {
            Some(w.vector(&format!("{name}.bias"), self.d_output, Fill::Zeros)?)
        } else {
            None
        };
        Ok(Proj {
            weight,
            bias,
            lora: None,
            precision: MatmulPrecision::F32,
        })
    }
}

impl<B: Backend> Proj<B> {
    /// `(name, tensor)` in the Hugging Face layout (`[out, in]`).
    fn tensors(&self, name: &str, out: &mut Vec<Named>) {
        out.push(Named::of(
            format!("{name}.weight"),
            self.weight.val().transpose(),
        ));
        if let Some(b) = &self.bias {
            out.push(Named::of(format!("{name}.bias"), b.val()));
        }
    }
}

/// RMSNorm's width and style.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormConfig {
    pub dim: usize,
    pub eps: f64,
    pub style: NormStyle,
}

impl RmsNormConfig {
    fn of(cfg: &ModelConfig, dim: usize) -> Self {
        RmsNormConfig {
            dim,
            eps: cfg.rms_norm_eps,
            style: cfg.norm_style,
        }
    }

    pub fn init<B: Backend>(
        &self,
        name: &str,
        w: &mut Weights<'_, B>,
    ) -> Result<RmsNorm<B>, ModelError> {
        // A fresh norm is the identity: weights 1, or 0 where the norm adds 1 itself.
        let fill = match self.style {
            NormStyle::Weight => Fill::Ones,
            NormStyle::OnePlusWeight => Fill::Zeros,
        };
        Ok(RmsNorm {
            weight: w.vector(name, self.dim, fill)?,
            eps: self.eps,
            one_plus: self.style == NormStyle::OnePlusWeight,
        })
    }
}

/// RMSNorm as transformers computes it, in f32: `x · rsqrt(mean(x²) + ε) · γ`, where γ is
/// the weight, or `1 + weight` (Gemma).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]`
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
    pub one_plus: bool,
}

impl<B: Backend> RmsNorm<B> {
    /// `[…, dim]` → same, normalised over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let gamma = if self.one_plus {
            self.weight.val() + 1.0
        } else {
            self.weight.val()
        };
        kernels::rms_norm(x, gamma, self.eps)
    }
}

/// The rotary tables of one call for one kind of layer. The rotation runs on `[batch, heads,
/// seq, head_dim]` values flattened to `[batch, heads, seq · head_dim]`, so that the tables
/// broadcast over batch and heads as one shared row (contiguous, vectorised) rather than a
/// strided walk.
#[derive(Clone)]
pub struct RopeTables<B: Backend> {
    /// `[rows, 1, seq · head_dim]`: the cosines of each position's angles, 1 past the rotary
    /// dimensions (rows 1 when every row has the same positions).
    pub cos: Tensor<B, 3>,
    /// `[rows, 1, seq · head_dim]`: the sines, 0 past the rotary dimensions.
    pub sin: Tensor<B, 3>,
    /// `[head_dim, head_dim]`: `x · rotate_half = rotate_half(x)` on the rotary dimensions
    /// (`[a, b]` → `[-b, a]`), 0 past them. A signed permutation: the product is exact.
    pub rotate_half: Tensor<B, 2>,
    /// How many of each head's leading dimensions rotate.
    pub rotary_dim: usize,
}

impl<B: Backend> RopeTables<B> {
    /// The tables of `rope` for `positions[row]`, in a call whose positions end at `seq_len`.
    fn new(
        cfg: &ModelConfig,
        rope: &RopeConfig,
        positions: &[Vec<usize>],
        seq_len: usize,
        device: &B::Device,
    ) -> Self {
        let rows = positions.len();
        let s = positions.first().map_or(0, Vec::len);
        let (cos, sin) = rope.tables(
            cfg.head_dim,
            cfg.max_position_embeddings,
            positions.iter().flatten().copied(),
            seq_len,
        );
        let (d, r) = (cfg.head_dim, rope.rotary_dim(cfg.head_dim));
        // Each position's r rotary values, then the pass-through dimensions: cos 1, sin 0.
        let widen = |v: Vec<f32>, pass: f32| -> Vec<f32> {
            v.chunks(r)
                .flat_map(|c| c.iter().copied().chain(std::iter::repeat_n(pass, d - r)))
                .collect()
        };
        let t =
            |v: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(v, [rows, 1, s * d]), device);
        let mut rotate = vec![0f32; d * d];
        for j in 0..r / 2 {
            rotate[(j + r / 2) * d + j] = -1.0;
            rotate[j * d + j + r / 2] = 1.0;
        }
        RopeTables {
            cos: t(widen(cos, 1.0)),
            sin: t(widen(sin, 0.0)),
            rotate_half: Tensor::from_data(TensorData::new(rotate, [d, d]), device),
            rotary_dim: r,
        }
    }

    /// Rotates the leading `rotary_dim` dimensions of `x` (`[batch, heads, seq, head_dim]`) as
    /// `x·cos + rotate_half(x)·sin`; the rest pass through. → `[batch, heads, seq, head_dim]`,
    /// contiguous.
    fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        kernels::rotary(
            x,
            self.cos.clone(),
            self.sin.clone(),
            self.rotate_half.clone(),
            self.rotary_dim,
        )
    }
}

/// Grouped-query attention's shape and quirks.
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// q, k and v in one `qkv_proj`.
    pub fused: bool,
    pub qk_norm: Option<RmsNormConfig>,
    pub scale: f64,
    pub softcap: Option<f64>,
}

impl AttentionConfig {
    fn of(cfg: &ModelConfig) -> Self {
        AttentionConfig {
            hidden: cfg.hidden_size,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            qkv_bias: cfg.qkv_bias,
            o_bias: cfg.o_bias,
            fused: cfg.fused_projections,
            qk_norm: cfg.qk_norm.then(|| RmsNormConfig::of(cfg, cfg.head_dim)),
            scale: cfg
                .query_pre_attn_scalar
                .unwrap_or(cfg.head_dim as f64)
                .powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
        }
    }

    /// The attention block under `{prefix}.self_attn`.
    pub fn init<B: Backend>(
        &self,
        prefix: &str,
        w: &mut Weights<'_, B>,
    ) -> Result<Attention<B>, ModelError> {
        let (q, kv) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let proj = |d_output, d_input, bias| ProjConfig {
            d_input,
            d_output,
            bias,
        };
        let p = format!("{prefix}.self_attn");
        let (q_proj, k_proj, v_proj, qkv_proj) = if self.fused {
            let qkv =
                proj(q + 2 * kv, self.hidden, self.qkv_bias).init(&format!("{p}.qkv_proj"), w)?;
            (None, None, None, Some(qkv))
        } else {
            (
                Some(proj(q, self.hidden, self.qkv_bias).init(&format!("{p}.q_proj"), w)?),
                Some(proj(kv, self.hidden, self.qkv_bias).init(&format!("{p}.k_proj"), w)?),
                Some(proj(kv, self.hidden, self.qkv_bias).init(&format!("{p}.v_proj"), w)?),
                None,
            )
        };
        let o_proj = proj(self.hidden, q, self.o_bias).init(&format!("{p}.o_proj"), w)?;
        let (q_norm, k_norm) = match &self.qk_norm {
            Some(n) => (
                Some(n.init(&format!("{p}.q_norm.weight"), w)?),
                Some(n.init(&format!("{p}.k_norm.weight"), w)?),
            ),
            None => (None, None),
        };
        Ok(Attention {
            q_proj,
            k_proj,
            v_proj,
            qkv_proj,
            o_proj,
            q_norm,
            k_norm,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            scale: self.scale,
            softcap: self.softcap,
            precision: MatmulPrecision::F32,
        })
    }
}

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Separate q, k and v projections (every family but Phi-3) …
    pub q_proj: Option<Proj<B>>,
    pub k_proj: Option<Proj<B>>,
    pub v_proj: Option<Proj<B>>,
    /// … or one `[hidden] → [q | k | v]` projection (Phi-3).
    pub qkv_proj: Option<Proj<B>>,
    pub o_proj: Proj<B>,
    /// Per-head RMSNorm of q and k before the rotation (Qwen3, Gemma 3), `[head_dim]`.
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies the scores.
    pub scale: f64,
    /// Scores become `c · tanh(s / c)` before the mask.
    pub softcap: Option<f64>,
    /// Of the score and weighted-sum products (the projections have their own).
    #[module(skip)]
    pub precision: MatmulPrecision,
}

impl<B: Backend> Attention<B> {
    /// `x` `[batch, seq, hidden]` → q `[batch, seq, heads, head_dim]`, k and v
    /// `[batch, seq, kv_heads, head_dim]`.
    fn project(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s, _] = x.dims();
        let (h, kv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (q, k, v) = match (&self.qkv_proj, &self.q_proj, &self.k_proj, &self.v_proj) {
            (Some(qkv), _, _, _) => {
                let all = qkv.forward(x);
                (
                    all.clone().narrow(2, 0, h * d),
                    all.clone().narrow(2, h * d, kv * d),
                    all.narrow(2, (h + kv) * d, kv * d),
                )
            }
            (None, Some(q), Some(k), Some(v)) => {
                (q.forward(x.clone()), k.forward(x.clone()), v.forward(x))
            }
            _ => unreachable!("an attention block has q, k and v projections, fused or not"),
        };
        (
            q.reshape([b, s, h, d]),
            k.reshape([b, s, kv, d]),
            v.reshape([b, s, kv, d]),
        )
    }

    /// `x`: `[batch, seq, hidden]`; `mask`: additive, `[batch, 1, seq, past + seq]`;
    /// `past`: this layer's cached keys and values of earlier positions (extended with this
    /// call's) → `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Tensor<B, 4>,
        past: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kv, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (mut q, mut k, v) = self.project(x);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        let q = rope.apply(kernels::swap_middle(q));
        let k = rope.apply(kernels::swap_middle(k));
        let v = kernels::swap_middle(v);
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
        // Query head i reads key/value head i / rep, as transformers' repeat_kv arranges it.
        let rep = h / kv;
        // Rows too long for their scores to be held whole are attended a block of queries at
        // a time (with a backward pass that computes each block's scores again).
        let blocks = attention::query_block_rows(b, h, s, t);
        let untracked_f32 = self.precision == MatmulPrecision::F32 && !B::ad_enabled(&q.device());
        let out = if untracked_f32 && (blocks.is_none() || kernels::is_plain_cpu_f32(&q)) {
            // Scoring and generation: the backend's own attention (burn-flex tiles the keys
            // with an online softmax once the score matrix outgrows its cache, so no seq ×
            // seq matrix per head is held; it scales, soft-caps, then adds the mask, as
            // transformers does; on CUDA its flash kernel declines an additive mask, so long
            // rows there are taken in blocks). Training keeps the explicit form below: burn's
            // autodiff decomposes `attention` into the same operations anyway.
            let every_head = |x: Tensor<B, 4>| {
                if rep == 1 {
                    return x;
                }
                x.unsqueeze_dim::<5>(2)
                    .expand([b, kv, rep, t, d])
                    .reshape([b, h, t, d])
            };
            let options = AttentionModuleOptions {
                scale: Some(self.scale),
                softcap: self.softcap,
                is_causal: false,
            };
            let [mb, _, ms, mt] = mask.dims();
            let mask = if mb == b {
                mask
            } else {
                mask.expand([b, 1, ms, mt])
            };
            backend_attention(q, every_head(k), every_head(v), None, Some(mask), options)
        } else if let Some(block) = blocks {
            let scores = attention::Scores {
                scale: self.scale,
                softcap: self.softcap,
                precision: self.precision,
            };
            attention::attention_in_blocks(q, k, v, mask, scores, block)
        } else {
            // The `rep` query heads of a key/value head stacked into one matrix against its
            // keys: no repeated copies of keys and values, in the forward or the backward pass.
            let grouped = q.reshape([b, kv, rep * s, d]);
            let scores =
                matmul_at(self.precision, grouped, k.swap_dims(2, 3)).reshape([b, h, s, t]);
            let probs = match self.softcap {
                None => kernels::masked_softmax(scores, mask, self.scale as f32),
                Some(c) => {
                    let scores = ((scores * self.scale) / c).tanh() * c;
                    softmax(add_mask(scores, mask), 3)
                }
            };
            let probs = probs.reshape([b, kv, rep * s, t]);
            matmul_at(self.precision, probs, v).reshape([b, h, s, d])
        };
        self.o_proj
            .forward(kernels::swap_middle(out).reshape([b, s, h * d]))
    }

    fn tensors(&self, prefix: &str, out: &mut Vec<Named>) {
        let p = format!("{prefix}.self_attn");
        for (name, proj) in self.projections() {
            proj.tensors(&format!("{p}.{name}"), out);
        }
        for (name, norm) in [("q_norm", &self.q_norm), ("k_norm", &self.k_norm)] {
            if let Some(n) = norm {
                out.push(Named::of(format!("{p}.{name}.weight"), n.weight.val()));
            }
        }
    }

    /// The projections with their module names, in checkpoint order.
    fn projections(&self) -> Vec<(&'static str, &Proj<B>)> {
        [
            ("q_proj", self.q_proj.as_ref()),
            ("k_proj", self.k_proj.as_ref()),
            ("v_proj", self.v_proj.as_ref()),
            ("qkv_proj", self.qkv_proj.as_ref()),
            ("o_proj", Some(&self.o_proj)),
        ]
        .into_iter()
        .filter_map(|(n, p)| p.map(|p| (n, p)))
        .collect()
    }

    fn projections_mut(&mut self) -> Vec<(&'static str, &mut Proj<B>)> {
        [
            ("q_proj", self.q_proj.as_mut()),
            ("k_proj", self.k_proj.as_mut()),
            ("v_proj", self.v_proj.as_mut()),
            ("qkv_proj", self.qkv_proj.as_mut()),
            ("o_proj", Some(&mut self.o_proj)),
        ]
        .into_iter()
        .filter_map(|(n, p)| p.map(|p| (n, p)))
        .collect()
    }
}

/// The gated feed-forward block's shape.
#[derive(Debug, Clone)]
pub struct MlpConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub bias: bool,
    pub activation: Activation,
    /// gate and up in one `gate_up_proj` (gate first).
    pub fused: bool,
}

impl MlpConfig {
    fn of(cfg: &ModelConfig) -> Self {
        MlpConfig {
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            bias: cfg.mlp_bias,
            activation: cfg.activation,
            fused: cfg.fused_projections,
        }
    }

    /// The block under `{prefix}.mlp`.
    pub fn init<B: Backend>(
        &self,
        prefix: &str,
        w: &mut Weights<'_, B>,
    ) -> Result<Mlp<B>, ModelError> {
        let p = format!("{prefix}.mlp");
        let (h, i, bias) = (self.hidden, self.intermediate, self.bias);
        let proj = |d_output, d_input| ProjConfig {
            d_input,
            d_output,
            bias,
        };
        let (gate_proj, up_proj, gate_up_proj) = if self.fused {
            (
                None,
                None,
                Some(proj(2 * i, h).init(&format!("{p}.gate_up_proj"), w)?),
            )
        } else {
            (
                Some(proj(i, h).init(&format!("{p}.gate_proj"), w)?),
                Some(proj(i, h).init(&format!("{p}.up_proj"), w)?),
                None,
            )
        };
        Ok(Mlp {
            gate_proj,
            up_proj,
            gate_up_proj,
            down_proj: proj(h, i).init(&format!("{p}.down_proj"), w)?,
            activation: self.activation,
        })
    }
}

/// The gated feed-forward block: `down(act(gate(x)) · up(x))`, with SiLU (SwiGLU) or tanh
/// GELU (GeGLU).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Option<Proj<B>>,
    pub up_proj: Option<Proj<B>>,
    /// `[hidden] → [gate | up]` (Phi-3), in place of the two above.
    pub gate_up_proj: Option<Proj<B>>,
    pub down_proj: Proj<B>,
    #[module(skip)]
    pub activation: Activation,
}

impl<B: Backend> Mlp<B> {
    /// `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, up) = match (&self.gate_up_proj, &self.gate_proj, &self.up_proj) {
            (Some(gu), _, _) => {
                let both = gu.forward(x);
                let i = both.dims()[2] / 2;
                (both.clone().narrow(2, 0, i), both.narrow(2, i, i))
            }
            (None, Some(g), Some(u)) => (g.forward(x.clone()), u.forward(x)),
            _ => unreachable!("a feed-forward block has gate and up projections, fused or not"),
        };
        let gated = match self.activation {
            Activation::Silu => kernels::swiglu(gate, up),
            Activation::GeluTanh => gelu_approximate(gate) * up,
        };
        self.down_proj.forward(gated)
    }

    fn projections(&self) -> Vec<(&'static str, &Proj<B>)> {
        [
            ("gate_proj", self.gate_proj.as_ref()),
            ("up_proj", self.up_proj.as_ref()),
            ("gate_up_proj", self.gate_up_proj.as_ref()),
            ("down_proj", Some(&self.down_proj)),
        ]
        .into_iter()
        .filter_map(|(n, p)| p.map(|p| (n, p)))
        .collect()
    }

    fn projections_mut(&mut self) -> Vec<(&'static str, &mut Proj<B>)> {
        [
            ("gate_proj", self.gate_proj.as_mut()),
            ("up_proj", self.up_proj.as_mut()),
            ("gate_up_proj", self.gate_up_proj.as_mut()),
            ("down_proj", Some(&mut self.down_proj)),
        ]
        .into_iter()
        .filter_map(|(n, p)| p.map(|p| (n, p)))
        .collect()
    }
}

/// One decoder layer's shape.
#[derive(Debug, Clone)]
pub struct DecoderLayerConfig {
    pub attention: AttentionConfig,
    pub mlp: MlpConfig,
    pub norm: RmsNormConfig,
    /// Gemma's four norms per layer, instead of two.
    pub sandwich_norms: bool,
    pub layer_type: LayerType,
}

impl DecoderLayerConfig {
    /// Layer `index` of the model.
    pub fn of(cfg: &ModelConfig, index: usize) -> Self {
        DecoderLayerConfig {
            attention: AttentionConfig::of(cfg),
            mlp: MlpConfig::of(cfg),
            norm: RmsNormConfig::of(cfg, cfg.hidden_size),
            sandwich_norms: cfg.sandwich_norms,
            layer_type: cfg.layer_types[index],
        }
    }

    /// The layer under `prefix` (`model.layers.N`).
    pub fn init<B: Backend>(
        &self,
        prefix: &str,
        w: &mut Weights<'_, B>,
    ) -> Result<DecoderLayer<B>, ModelError> {
        let norm = |name: &str, w: &mut Weights<'_, B>| {
            self.norm.init(&format!("{prefix}.{name}.weight"), w)
        };
        let input_layernorm = norm("input_layernorm", w)?;
        let self_attn = self.attention.init(prefix, w)?;
        let post_attention_layernorm = norm("post_attention_layernorm", w)?;
        let pre_feedforward_layernorm = if self.sandwich_norms {
            Some(norm("pre_feedforward_layernorm", w)?)
        } else {
            None
        };
        let mlp = self.mlp.init(prefix, w)?;
        let post_feedforward_layernorm = if self.sandwich_norms {
            Some(norm("post_feedforward_layernorm", w)?)
        } else {
            None
        };
        Ok(DecoderLayer {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            pre_feedforward_layernorm,
            mlp,
            post_feedforward_layernorm,
            layer_type: self.layer_type,
        })
    }
}

/// One pre-norm decoder layer. Llama-style: `h = x + attn(norm₁(x))`, `h + mlp(norm₂(h))`,
/// where norm₂ is `post_attention_layernorm`. Gemma-style (sandwich): `h = x +
/// post_attention_layernorm(attn(input_layernorm(x)))`, `h + post_ff(mlp(pre_ff(h)))`.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    pub mlp: Mlp<B>,
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
    #[module(skip)]
    pub layer_type: LayerType,
}

impl<B: Backend> DecoderLayer<B> {
    /// `[batch, seq, hidden]` → same (`mask` and `past` as in [`Attention::forward`])
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Tensor<B, 4>,
        past: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let attended =
            self.self_attn
                .forward(self.input_layernorm.forward(x.clone()), rope, mask, past);
        match (
            &self.pre_feedforward_layernorm,
            &self.post_feedforward_layernorm,
        ) {
            (Some(pre), Some(post)) => {
                let h = x + self.post_attention_layernorm.forward(attended);
                h.clone() + post.forward(self.mlp.forward(pre.forward(h)))
            }
            _ => {
                let h = x + attended;
                h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
            }
        }
    }

    fn tensors(&self, prefix: &str, out: &mut Vec<Named>) {
        let norms = [
            ("input_layernorm", Some(&self.input_layernorm)),
            (
                "post_attention_layernorm",
                Some(&self.post_attention_layernorm),
            ),
            (
                "pre_feedforward_layernorm",
                self.pre_feedforward_layernorm.as_ref(),
            ),
            (
                "post_feedforward_layernorm",
                self.post_feedforward_layernorm.as_ref(),
            ),
        ];
        for (name, norm) in norms {
            if let Some(n) = norm {
                out.push(Named::of(format!("{prefix}.{name}.weight"), n.weight.val()));
            }
        }
        self.self_attn.tensors(prefix, out);
        for (name, proj) in self.mlp.projections() {
            proj.tensors(&format!("{prefix}.mlp.{name}"), out);
        }
    }

    /// Every linear layer with its module name under `prefix`.
    fn linears_mut(&mut self, prefix: &str) -> Vec<(String, &mut Proj<B>)> {
        let mut out: Vec<(String, &mut Proj<B>)> = Vec::new();
        for (name, p) in self.self_attn.projections_mut() {
            out.push((format!("{prefix}.self_attn.{name}"), p));
        }
        for (name, p) in self.mlp.projections_mut() {
            out.push((format!("{prefix}.mlp.{name}"), p));
        }
        out
    }
}

impl ModelConfig {
    /// The model, every weight taken from `weights` under its transformers name: one
    /// constructor for a checkpoint ([`crate::load_model_with`]) and a seeded initialisation
    /// ([`crate::init_model`]).
    pub fn init<B: Backend>(
        &self,
        weights: &mut Weights<'_, B>,
    ) -> Result<CausalLm<B>, ModelError> {
        let embed_tokens = weights.embedding(
            "model.embed_tokens.weight",
            self.vocab_size,
            self.hidden_size,
        )?;
        let layers = (0..self.num_hidden_layers)
            .map(|i| DecoderLayerConfig::of(self, i).init(&format!("model.layers.{i}"), weights))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNormConfig::of(self, self.hidden_size).init("model.norm.weight", weights)?;
        // Tied checkpoints may still carry an lm_head copy; the config decides.
        let lm_head = if self.tie_word_embeddings {
            None
        } else {
            let head = ProjConfig {
                d_input: self.hidden_size,
                d_output: self.vocab_size,
                bias: false,
            };
            Some(head.init("lm_head", weights)?)
        };
        Ok(CausalLm {
            embed_tokens,
            layers,
            norm,
            lm_head,
            matmul_precision: MatmulPrecision::F32,
            config: self.clone(),
        })
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
    pub config: ModelConfig,
}

/// How the rows of a forward call are laid out.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// One sequence a row from position 0; `attention_mask` `[batch, seq]`: 1 for tokens, 0
    /// for padding (see [`CausalLm::forward`]).
    Plain {
        attention_mask: Option<&'a [Vec<u8>]>,
    },
    /// Several sequences a row (see [`CausalLm::hidden_packed`]).
    Packed {
        positions: &'a [Vec<usize>],
        segments: &'a [Vec<i32>],
    },
}

/// What every layer of one forward call shares, built once ([`CausalLm::layer_context`]).
pub struct LayerContext<B: Backend>(CallContext<B>);

/// What every layer of one forward call shares: each kind of layer's rotary tables and mask.
struct CallContext<B: Backend> {
    rope: RopeTables<B>,
    local_rope: Option<RopeTables<B>>,
    mask: Tensor<B, 4>,
    sliding_mask: Option<Tensor<B, 4>>,
}

impl<B: Backend> CallContext<B> {
    /// For rows whose tokens sit at `positions[row]` (all rows alike: one row), in a call whose
    /// positions end at `seq_len`, with `mask(window)` building the additive mask of a window.
    fn new(
        cfg: &ModelConfig,
        positions: &[Vec<usize>],
        seq_len: usize,
        mask: impl Fn(Option<usize>) -> Tensor<B, 4>,
        device: &B::Device,
    ) -> Self {
        let slides = cfg.layer_types.contains(&LayerType::Sliding);
        CallContext {
            rope: RopeTables::new(cfg, &cfg.rope, positions, seq_len, device),
            local_rope: match (&cfg.local_rope, slides) {
                (Some(local), true) => {
                    Some(RopeTables::new(cfg, local, positions, seq_len, device))
                }
                _ => None,
            },
            mask: mask(None),
            sliding_mask: if slides {
                Some(mask(cfg.sliding_window))
            } else {
                None
            },
        }
    }

    fn for_layer(&self, layer: LayerType) -> (&RopeTables<B>, Tensor<B, 4>) {
        match layer {
            LayerType::Full => (&self.rope, self.mask.clone()),
            LayerType::Sliding => (
                self.local_rope.as_ref().unwrap_or(&self.rope),
                self.sliding_mask
                    .clone()
                    .unwrap_or_else(|| self.mask.clone()),
            ),
        }
    }
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

    /// Stores every trainable projection matrix in bf16 (full fine-tuning with `weights:
    /// bf16`): the weights, their gradients and the optimizer's state of them take half the
    /// memory, and the optimizer updates them with compensated summation
    /// (`pipe_train::optimizer`). Embeddings, the output layer and norms stay f32. Products
    /// must be at `MatmulPrecision::Bf16`, which rounds both operands to bf16 anyway.
    pub fn keep_trainable_projections_in_bf16(mut self) -> Self {
        for (name, proj) in self.linear_modules_mut() {
            let weight = proj.weight.val();
            if name == "lm_head"
                || !weight.is_require_grad()
                || weight.dtype() == burn::tensor::DType::BF16
            {
                continue;
            }
            // A leaf of its own: the cast must not be a step of the graph.
            let weight = weight
                .detach()
                .cast(FloatDType::BF16)
                .detach()
                .require_grad();
            proj.weight = Param::initialized(proj.weight.id, weight);
        }
        self
    }

    /// Every linear layer with its Hugging Face module name (PEFT's target names).
    pub fn linear_modules_mut(&mut self) -> Vec<(String, &mut Proj<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            out.extend(layer.linears_mut(&format!("model.layers.{i}")));
        }
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head".to_string(), h));
        }
        out
    }

    /// Every base weight under its transformers name (adapters not included).
    pub fn hf_tensors(&self) -> Vec<Named> {
        let mut out = vec![Named::of(
            "model.embed_tokens.weight".into(),
            self.embed_tokens.val(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            layer.tensors(&format!("model.layers.{i}"), &mut out);
        }
        out.push(Named::of(
            "model.norm.weight".into(),
            self.norm.weight.val(),
        ));
        if let Some(h) = &self.lm_head {
            h.tensors("lm_head", &mut out);
        }
        out
    }

    fn run_layers(
        &self,
        mut x: Tensor<B, 3>,
        cx: &CallContext<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        match cache {
            None => {
                for layer in &self.layers {
                    let (rope, mask) = cx.for_layer(layer.layer_type);
                    x = layer.forward(x, rope, mask, None);
                }
            }
            Some(cache) => {
                for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
                    let (rope, mask) = cx.for_layer(layer.layer_type);
                    x = layer.forward(x, rope, mask, Some(slot));
                }
            }
        }
        self.norm.forward(x)
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
        let cx = self.layer_context(Rows::Plain { attention_mask }, &input_ids);
        self.run_layers(self.embed(input_ids), &cx.0, None)
    }

    /// [`Self::hidden`] for rows that hold several sequences side by side (packed):
    /// `segments[b][t]` names the sequence token t of row b belongs to. A token sees the earlier
    /// tokens of its own segment and of segment 0, the shared prefix (`0` everywhere: plain
    /// causal attention; a prefix then one segment per continuation: several continuations of
    /// one context in one row); `positions[b][t]` is its rotary position (a sliding window
    /// counts positions). Negative segments are padding. `[batch, seq]` → `[batch, seq, hidden]`.
    pub fn hidden_packed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        positions: &[Vec<usize>],
        segments: &[Vec<i32>],
    ) -> Tensor<B, 3> {
        let cx = self.layer_context(
            Rows::Packed {
                positions,
                segments,
            },
            &input_ids,
        );
        self.run_layers(self.embed(input_ids), &cx.0, None)
    }

    /// What every layer of a forward call over `input_ids` (`[batch, seq]`) laid out as `rows`
    /// shares — rotary tables and masks — for running the layers one at a time
    /// ([`Self::layer_forward`]), as training does when it recomputes them.
    pub fn layer_context(&self, rows: Rows<'_>, input_ids: &Tensor<B, 2, Int>) -> LayerContext<B> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let cx = match rows {
            Rows::Plain { attention_mask } => CallContext::new(
                &self.config,
                &[(0..s).collect()],
                s,
                |window| additive_mask::<B>(b, s, 0, attention_mask, window, &device),
                &device,
            ),
            Rows::Packed {
                positions,
                segments,
            } => {
                let end = positions.iter().flatten().max().map_or(0, |p| p + 1);
                let mask = |window: Option<usize>| {
                    let mut m = vec![f32::MIN; b * s * s];
                    for (bi, seg) in segments.iter().enumerate() {
                        let pos = &positions[bi];
                        for i in 0..s {
                            for j in 0..=i {
                                let in_window = window.is_none_or(|w| pos[i] < pos[j] + w);
                                let visible =
                                    seg[i] >= 0 && (seg[j] == seg[i] || seg[j] == 0) && in_window;
                                // Padding sees itself, so that its (unused) softmax stays
                                // finite.
                                if visible || i == j {
                                    m[(bi * s + i) * s + j] = 0.0;
                                }
                            }
                        }
                    }
                    Tensor::<B, 4>::from_data(TensorData::new(m, [b, 1, s, s]), &device)
                };
                CallContext::new(&self.config, positions, end, mask, &device)
            }
        };
        LayerContext(cx)
    }

    /// The token embeddings of `input_ids` `[batch, seq]` → `[batch, seq, hidden]`, the first
    /// layer's input, scaled by √hidden_size where the family does (Gemma, with the factor
    /// rounded to f32 as transformers casts it to the activations' dtype).
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = burn::tensor::module::embedding(self.embed_tokens.val(), input_ids);
        if self.config.scale_embeddings {
            x * ((self.config.hidden_size as f64).sqrt() as f32)
        } else {
            x
        }
    }

    /// Layer `index` alone: `[batch, seq, hidden]` → same.
    pub fn layer_forward(
        &self,
        index: usize,
        x: Tensor<B, 3>,
        cx: &LayerContext<B>,
    ) -> Tensor<B, 3> {
        let layer = &self.layers[index];
        let (rope, mask) = cx.0.for_layer(layer.layer_type);
        layer.forward(x, rope, mask, None)
    }

    /// The norm after the last layer: `[batch, seq, hidden]` → same, the input of
    /// [`Self::logits`].
    pub fn final_norm(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.norm.forward(x)
    }

    /// The output projection: `[batch, seq, hidden]` → logits `[batch, seq, vocab]`
    /// (soft-capped where the family does).
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let logits = match &self.lm_head {
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
        };
        match self.config.final_logit_softcapping {
            Some(c) => (logits / c).tanh() * c,
            None => logits,
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
    /// `[batch, seq]` → `[batch, seq, hidden]`. Keys cached by earlier calls keep the rotation
    /// they were made with, as transformers' cache does (this matters for dynamic NTK, whose
    /// frequencies depend on the length). LongRoPE is the exception: the call that crosses the
    /// original context runs the whole sequence again with the long factors.
    pub fn hidden_cached(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let [b, s] = input_ids.dims();
        let past = cache.len;
        if past > 0 && self.crosses_long_rope(past, past + s) {
            // LongRoPE switches every position to the long factors once a sequence grows past
            // the original context: the cached keys were rotated with the short ones, so the
            // whole sequence runs again (what transformers' Phi-3 means to do when it drops
            // its cache at that step).
            let ids = cache
                .ids
                .take()
                .expect("a cache with positions holds their ids");
            let all = Tensor::cat(vec![ids, input_ids], 1);
            *cache = KvCache::default();
            let hidden = self.hidden_cached(all, cache);
            return hidden.narrow(1, past, s);
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let device = input_ids.device();
        let cx = CallContext::new(
            &self.config,
            &[(past..past + s).collect()],
            past + s,
            |window| additive_mask::<B>(b, s, past, None, window, &device),
            &device,
        );
        // The ids are kept only while a LongRoPE crossing, which re-runs them, is still ahead.
        cache.ids = if self.crosses_long_rope(past + s, usize::MAX) {
            Some(match cache.ids.take() {
                None => input_ids.clone(),
                Some(ids) => Tensor::cat(vec![ids, input_ids.clone()], 1),
            })
        } else {
            None
        };
        let out = self.run_layers(self.embed(input_ids), &cx, Some(cache));
        cache.len = past + s;
        out
    }

    /// Whether positions up to `before` used LongRoPE's short factors and a call ending at
    /// `after` uses the long ones.
    fn crosses_long_rope(&self, before: usize, after: usize) -> bool {
        match &self.config.rope.scaling {
            Some(crate::rope::RopeScaling::LongRope {
                original_max_position_embeddings: original,
                ..
            }) => before <= *original && after > *original,
            _ => false,
        }
    }
}

/// One layer's keys and values so far, `[batch, n_kv_heads, positions, head_dim]` each.
pub type LayerCache<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// The keys and values of every layer for the positions decoded so far.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    len: usize,
    /// The token ids of those positions, `[batch, len]`, while a LongRoPE model may still
    /// have to run them again (see [`CausalLm::hidden_cached`]); else `None`.
    ids: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> Default for KvCache<B> {
    fn default() -> Self {
        KvCache {
            layers: Vec::new(),
            len: 0,
            ids: None,
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

/// `scores` `[batch, heads, s, t]` plus the additive `mask` `[batch or 1, 1, s, t]`, laid out
/// as `[mask rows, batch·heads / mask rows, s·t]`: a mask shared by every row is then one row
/// broadcast over batch and heads, which the CPU backend vectorises, instead of a strided walk.
fn add_mask<B: Backend>(scores: Tensor<B, 4>, mask: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, s, t] = scores.dims();
    let rows = mask.dims()[0];
    (scores.reshape([rows, b * h / rows, s * t]) + mask.reshape([rows, 1, s * t]))
        .reshape([b, h, s, t])
}

/// The causal mask (with padding and a sliding window of `window` keys, the query's own
/// included, if given) as additive biases: 0 where attending is allowed,
/// the lowest f32 elsewhere (as transformers uses `finfo.min`). The `s` queries follow `past`
/// cached positions: `[batch, 1, s, past + s]`, or `[1, 1, s, past + s]` when every row has
/// the same mask.
fn additive_mask<B: Backend>(
    b: usize,
    s: usize,
    past: usize,
    padding: Option<&[Vec<u8>]>,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4> {
    // Padding at the end of every row hides nothing from a real token that causality does
    // not: all its keys come before the padding. Such rows share the causal mask, in which
    // padding also sees padding; what padding's positions compute carries no label.
    let right_padded = padding
        .is_none_or(|rows| past == 0 && rows.iter().all(|r| r.windows(2).all(|w| w[0] >= w[1])));
    let (b, padding) = if right_padded {
        (1, None)
    } else {
        (b, padding)
    };
    let t = past + s;
    let mut m = vec![0f32; b * s * t];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..t {
                let padded = padding.is_some_and(|p| p[bi][j] == 0);
                let outside_window = window.is_some_and(|w| past + i >= j + w);
                if j > past + i || padded || outside_window {
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
    // Every position is a row; the last of each sequence predicts nothing (weight 0), which
    // spares narrowing the logits (a copy, and a scatter backward).
    let mut targets = Vec::with_capacity(b * s);
    let mut weights = Vec::with_capacity(b * s);
    for row in labels {
        for i in 0..s {
            // Position i predicts the label at i + 1; the last position predicts nothing.
            let label = if i + 1 < s {
                row.get(i + 1).copied().unwrap_or(-100)
            } else {
                -100
            };
            targets.push(usize::try_from(label).unwrap_or(0));
            weights.push(if label < 0 { 0f32 } else { 1.0 });
        }
    }
    let count = weights.iter().filter(|w| **w > 0.0).count();
    let sum = kernels::cross_entropy_sum(logits.reshape([b * s, v]), targets, weights);
    (sum, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Flex;

    /// Rows padded only at the end share one causal mask; any other padding keeps a mask a
    /// row, hiding the padding from every query.
    #[test]
    fn only_rows_padded_at_the_end_share_one_mask() {
        let device = Default::default();
        let mask = |padding: &[Vec<u8>]| {
            let m = additive_mask::<B>(padding.len(), 3, 0, Some(padding), None, &device);
            (m.dims(), m.into_data().to_vec::<f32>().unwrap())
        };
        let (dims, values) = mask(&[vec![1, 1, 1], vec![1, 1, 0]]);
        assert_eq!(dims, [1, 1, 3, 3]);
        let x = f32::MIN;
        assert_eq!(values, [0.0, x, x, 0.0, 0.0, x, 0.0, 0.0, 0.0]);

        let (dims, values) = mask(&[vec![1, 1, 1], vec![0, 1, 1]]);
        assert_eq!(dims, [2, 1, 3, 3]);
        // The second row's first key is padding: no query of that row sees it.
        assert_eq!(&values[9..], [x, x, x, x, 0.0, x, x, 0.0, 0.0]);
    }
}
