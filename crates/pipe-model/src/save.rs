//! [`CausalLm`] → Hugging Face files: tensors under transformers' names (`[out, in]` weights),
//! f32 or bf16, PEFT adapter files; and a seeded random model from a config (`init:`).

use std::collections::HashMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use pipe_rand::SplitMix64;
use safetensors::Dtype;

use crate::config::ModelConfig;
use crate::load::named_param;
use crate::model::{Attention, DecoderLayer, CausalLm, MatmulPrecision, Mlp, Proj, RmsNorm, Rope};
use crate::ModelError;

/// On-disk dtype for saved weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
}

/// A named host tensor in Hugging Face layout.
pub struct Named {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub(crate) fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data");
    (shape, data)
}

fn linear<B: Backend>(name: &str, p: &Proj<B>, out: &mut Vec<Named>) {
    // Stored [in, out]; Hugging Face keeps [out, in].
    let (shape, data) = host(p.weight.val().transpose());
    out.push(Named {
        name: format!("{name}.weight"),
        shape,
        data,
    });
    if let Some(b) = &p.bias {
        let (shape, data) = host(b.val());
        out.push(Named {
            name: format!("{name}.bias"),
            shape,
            data,
        });
    }
}

impl<B: Backend> CausalLm<B> {
    /// Every base weight under its transformers name (adapters not included).
    pub fn hf_tensors(&self) -> Vec<Named> {
        let mut out = Vec::new();
        let (shape, data) = host(self.embed_tokens.val());
        out.push(Named {
            name: "model.embed_tokens.weight".into(),
            shape,
            data,
        });
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let (shape, data) = host(l.input_layernorm.weight.val());
            out.push(Named {
                name: format!("{p}.input_layernorm.weight"),
                shape,
                data,
            });
            let (shape, data) = host(l.post_attention_layernorm.weight.val());
            out.push(Named {
                name: format!("{p}.post_attention_layernorm.weight"),
                shape,
                data,
            });
            linear(
                &format!("{p}.self_attn.q_proj"),
                &l.self_attn.q_proj,
                &mut out,
            );
            linear(
                &format!("{p}.self_attn.k_proj"),
                &l.self_attn.k_proj,
                &mut out,
            );
            linear(
                &format!("{p}.self_attn.v_proj"),
                &l.self_attn.v_proj,
                &mut out,
            );
            linear(
                &format!("{p}.self_attn.o_proj"),
                &l.self_attn.o_proj,
                &mut out,
            );
            linear(&format!("{p}.mlp.gate_proj"), &l.mlp.gate_proj, &mut out);
            linear(&format!("{p}.mlp.up_proj"), &l.mlp.up_proj, &mut out);
            linear(&format!("{p}.mlp.down_proj"), &l.mlp.down_proj, &mut out);
        }
        let (shape, data) = host(self.norm.weight.val());
        out.push(Named {
            name: "model.norm.weight".into(),
            shape,
            data,
        });
        if let Some(h) = &self.lm_head {
            linear("lm_head", h, &mut out);
        }
        out
    }

    /// Every LoRA adapter under PEFT's names (`base_model.model.<module>.lora_A.weight`).
    pub fn peft_tensors(&mut self) -> Vec<Named> {
        let mut out = Vec::new();
        for (name, p) in self.linear_modules_mut() {
            if let Some(l) = &p.lora {
                let (shape, data) = host(l.a.val().transpose());
                out.push(Named {
                    name: format!("base_model.model.{name}.lora_A.weight"),
                    shape,
                    data,
                });
                let (shape, data) = host(l.b.val().transpose());
                out.push(Named {
                    name: format!("base_model.model.{name}.lora_B.weight"),
                    shape,
                    data,
                });
            }
        }
        out
    }

    /// Writes `config.json` and `model.safetensors` (Hugging Face layout) into `dir`.
    pub fn save_hf(&self, dir: &Path, dtype: SaveDtype) -> Result<(), ModelError> {
        self.save_hf_sharded(dir, dtype, u64::MAX)
    }

    /// Like [`save_hf`](Self::save_hf), split into `model-0000i-of-0000N.safetensors` files of at
    /// most `max_shard_bytes` each (a single tensor larger than that gets a shard of its own),
    /// with `model.safetensors.index.json`, when the weights do not fit in one.
    pub fn save_hf_sharded(
        &self,
        dir: &Path,
        dtype: SaveDtype,
        max_shard_bytes: u64,
    ) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ModelError::Write(dir.display().to_string(), e))?;
        let mut cfg = hf_config_json(&self.config);
        cfg["torch_dtype"] = serde_json::json!(match dtype {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
        });
        let p = dir.join("config.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&cfg).expect("json"))
            .map_err(|e| ModelError::Write(p.display().to_string(), e))?;
        let tensors = self.hf_tensors();
        let width = match dtype {
            SaveDtype::F32 => 4,
            SaveDtype::Bf16 => 2,
        };
        let bytes = |t: &Named| t.data.len() as u64 * width;
        let total: u64 = tensors.iter().map(bytes).sum();
        if total <= max_shard_bytes {
            return write_safetensors(
                &dir.join("model.safetensors"),
                &tensors,
                dtype,
                &[("format", "pt")],
            );
        }
        let mut shards: Vec<Vec<Named>> = vec![Vec::new()];
        let mut size = 0;
        for t in tensors {
            if size > 0 && size + bytes(&t) > max_shard_bytes {
                shards.push(Vec::new());
                size = 0;
            }
            size += bytes(&t);
            shards.last_mut().expect("a shard").push(t);
        }
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            for t in shard {
                weight_map.insert(t.name.clone(), serde_json::Value::String(name.clone()));
            }
            write_safetensors(&dir.join(&name), shard, dtype, &[("format", "pt")])?;
        }
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = dir.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&index).expect("json"))
            .map_err(|e| ModelError::Write(p.display().to_string(), e))
    }
}

/// The config.json transformers writes for this configuration.
pub fn hf_config_json(c: &ModelConfig) -> serde_json::Value {
    let rope_scaling = match &c.rope_scaling {
        None => serde_json::Value::Null,
        Some(crate::config::RopeScaling::Linear { factor }) => {
            serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        Some(crate::config::RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => serde_json::json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings}),
    };
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "hidden_act": "silu",
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
    })
}

/// Writes tensors to a safetensors file, atomically (temporary file, then rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &[Named],
    dtype: SaveDtype,
    meta: &[(&str, &str)],
) -> Result<(), ModelError> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| match dtype {
            SaveDtype::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            SaveDtype::Bf16 => t
                .data
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                .collect(),
        })
        .collect();
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
    };
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            safetensors::tensor::TensorView::new(st_dtype, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| ModelError::Checkpoint(format!("{}: {e}", t.name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let tmp = path.with_extension("safetensors.tmp");
    // A failed write (a full disk) is an I/O error on this file, not a malformed checkpoint.
    safetensors::tensor::serialize_to_file(views, Some(meta), &tmp).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => {
            ModelError::Write(tmp.display().to_string(), io)
        }
        other => ModelError::Checkpoint(format!("{}: {other}", path.display())),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::Write(path.display().to_string(), e))
}

/// Normal(0, std) samples from a fixed generator (Box–Muller over SplitMix64).
struct Gaussian {
    rng: SplitMix64,
    spare: Option<f64>,
}

impl Gaussian {
    fn sample(&mut self, std: f64) -> f32 {
        if let Some(s) = self.spare.take() {
            return (s * std) as f32;
        }
        let u1 = ((self.rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = self.rng.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some(r * s);
        (r * c * std) as f32
    }
}

/// A model with transformers' initialisation (weights ~ N(0, `std`), norms 1) from `seed`: the
/// same on every backend.
pub fn init_model<B: Backend>(
    cfg: &ModelConfig,
    seed: u64,
    std: f64,
    device: &B::Device,
    trainable: bool,
) -> CausalLm<B> {
    let mut g = Gaussian {
        rng: SplitMix64::new(seed),
        spare: None,
    };
    let mut matrix = |name: &str, rows: usize, cols: usize| -> Param<Tensor<B, 2>> {
        let data: Vec<f32> = (0..rows * cols).map(|_| g.sample(std)).collect();
        named_param(
            name,
            Tensor::from_data(TensorData::new(data, [rows, cols]), device),
            trainable,
        )
    };
    let embed = matrix("model.embed_tokens.weight", cfg.vocab_size, cfg.hidden_size);
    let ones = |name: &str, n: usize| RmsNorm {
        weight: named_param(name, Tensor::<B, 1>::ones([n], device), trainable),
        eps: cfg.rms_norm_eps,
    };
    let (hid, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let (q_dim, kv_dim) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let mut layers = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        // Drawn [out, in] as transformers stores them, then laid out [in, out].
        let mut proj = |name: String, out_dim: usize, in_dim: usize| {
            let w = matrix(&format!("{name}.weight"), out_dim, in_dim);
            Proj {
                weight: named_param(&format!("{name}.weight"), w.val().transpose(), trainable),
                bias: None,
                lora: None,
                precision: MatmulPrecision::F32,
            }
        };
        let q = proj(format!("{p}.self_attn.q_proj"), q_dim, hid);
        let k = proj(format!("{p}.self_attn.k_proj"), kv_dim, hid);
        let v = proj(format!("{p}.self_attn.v_proj"), kv_dim, hid);
        let o = proj(format!("{p}.self_attn.o_proj"), hid, q_dim);
        let gate = proj(format!("{p}.mlp.gate_proj"), inter, hid);
        let up = proj(format!("{p}.mlp.up_proj"), inter, hid);
        let down = proj(format!("{p}.mlp.down_proj"), hid, inter);
        layers.push(DecoderLayer {
            input_layernorm: ones(&format!("{p}.input_layernorm.weight"), hid),
            self_attn: Attention {
                q_proj: q,
                k_proj: k,
                v_proj: v,
                o_proj: o,
                n_heads: cfg.num_attention_heads,
                n_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                precision: MatmulPrecision::F32,
            },
            post_attention_layernorm: ones(&format!("{p}.post_attention_layernorm.weight"), hid),
            mlp: Mlp {
                gate_proj: gate,
                up_proj: up,
                down_proj: down,
            },
        });
    }
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        let w = matrix("lm_head.weight", cfg.vocab_size, hid);
        Some(Proj {
            weight: named_param("lm_head.weight", w.val().transpose(), trainable),
            bias: None,
            lora: None,
            precision: MatmulPrecision::F32,
        })
    };
    CausalLm {
        embed_tokens: embed,
        layers,
        norm: ones("model.norm.weight", hid),
        lm_head,
        matmul_precision: MatmulPrecision::F32,
        rope: Rope::new(cfg),
        config: cfg.clone(),
    }
}
