//! Hugging Face checkpoints → [`CausalLm`]: `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, f32/f16/bf16 on disk, memory-mapped. Pickle files are never
//! read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::ModelConfig;
use crate::model::{Attention, DecoderLayer, CausalLm, MatmulPrecision, Mlp, Proj, RmsNorm, Rope};
use crate::ModelError;

/// A tensor read from a checkpoint, as f32 with its shape.
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The tensors of a checkpoint directory, by name, memory-mapped until read.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    /// name → index into `files`
    index: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens the safetensors weights of a Hugging Face model directory.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let shard_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| ModelError::Io(index_path.display().to_string(), e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Checkpoint(format!("{}: {e}", index_path.display())))?;
            let map = v["weight_map"].as_object().ok_or_else(|| {
                ModelError::Checkpoint(format!("{}: no weight_map", index_path.display()))
            })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names
        } else if single.exists() {
            vec!["model.safetensors".into()]
        } else {
            let pickles: Vec<String> = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| {
                            n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth")
                        })
                        .collect()
                })
                .unwrap_or_default();
            return Err(ModelError::Checkpoint(if pickles.is_empty() {
                format!(
                    "{} has no model.safetensors (or model.safetensors.index.json)",
                    dir.display()
                )
            } else {
                format!(
                    "{} has only pickle weights ({}); pipe never loads pickle, since unpickling can run arbitrary code. Convert them to safetensors first (e.g. with transformers: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`)",
                    dir.display(),
                    pickles.join(", ")
                )
            }));
        };
        Self::from_files(shard_names.iter().map(|n| dir.join(n)).collect())
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_files(vec![path.to_path_buf()])
    }

    fn from_files(paths: Vec<PathBuf>) -> Result<Self, ModelError> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for path in paths {
            let file = std::fs::File::open(&path)
                .map_err(|e| ModelError::Io(path.display().to_string(), e))?;
            // SAFETY: checkpoint files are not modified while a run reads them (the store's
            // objects are read-only).
            let mmap = unsafe { Mmap::map(&file) }
                .map_err(|e| ModelError::Io(path.display().to_string(), e))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| ModelError::Checkpoint(format!("{}: {e}", path.display())))?;
            for n in st.names() {
                index.insert(n.to_string(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(Checkpoint { files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Reads one tensor, converted to f32.
    pub fn read(&self, name: &str) -> Result<HostTensor, ModelError> {
        let &i = self.index.get(name).ok_or_else(|| {
            ModelError::Checkpoint(format!("the checkpoint has no tensor `{name}`"))
        })?;
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| ModelError::Checkpoint(format!("{}: {e}", path.display())))?;
        let view = st
            .tensor(name)
            .map_err(|e| ModelError::Checkpoint(format!("{name}: {e}")))?;
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => {
                return Err(ModelError::Checkpoint(format!(
                    "{name} is {other:?}; pipe reads f32, f16 and bf16 weights"
                )))
            }
        };
        Ok(HostTensor {
            shape: view.shape().to_vec(),
            data,
        })
    }
}

fn expect_shape(name: &str, t: &HostTensor, shape: &[usize]) -> Result<(), ModelError> {
    if t.shape != shape {
        return Err(ModelError::Checkpoint(format!(
            "{name} has shape {:?}, but config.json implies {shape:?}",
            t.shape
        )));
    }
    Ok(())
}

/// A parameter whose id is derived from its checkpoint name, so that optimizer state saved in
/// one process finds its parameter in the next (burn keys optimizer state by id).
pub fn named_param<B: Backend, const D: usize>(
    name: &str,
    t: Tensor<B, D>,
    trainable: bool,
) -> Param<Tensor<B, D>> {
    let id = burn::module::ParamId::from(stable_id(name));
    // A leaf of its own: values computed from other parameters (a transpose, a resize, a
    // merge) must not keep their history. And a fresh, contiguous buffer: a transposed view
    // makes the backend sum in another order than for the optimizer's (contiguous) updates,
    // and a resumed run would drift from an uninterrupted one in the last bits.
    let t = t.detach().mul_scalar(1.0);
    Param::initialized(id, if trainable { t.require_grad() } else { t })
}

/// FNV-1a of a parameter name.
pub fn stable_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn param1<B: Backend>(
    name: &str,
    t: HostTensor,
    device: &B::Device,
    trainable: bool,
) -> Param<Tensor<B, 1>> {
    let n = t.data.len();
    named_param(
        name,
        Tensor::from_data(TensorData::new(t.data, [n]), device),
        trainable,
    )
}

fn param2<B: Backend>(
    name: &str,
    t: HostTensor,
    device: &B::Device,
    trainable: bool,
) -> Param<Tensor<B, 2>> {
    let shape = [t.shape[0], t.shape[1]];
    named_param(
        name,
        Tensor::from_data(TensorData::new(t.data, shape), device),
        trainable,
    )
}

struct Loader<'a, B: Backend> {
    ck: &'a Checkpoint,
    device: &'a B::Device,
    trainable: bool,
}

impl<B: Backend> Loader<'_, B> {
    /// A Hugging Face `[out, in]` linear weight as a [`Proj`] (`[in, out]`).
    fn proj(
        &self,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Proj<B>, ModelError> {
        let name = format!("{prefix}.weight");
        let w = self.ck.read(&name)?;
        expect_shape(&name, &w, &[out_dim, in_dim])?;
        let weight =
            Tensor::<B, 2>::from_data(TensorData::new(w.data, [out_dim, in_dim]), self.device)
                .transpose();
        let bias = if bias {
            let name = format!("{prefix}.bias");
            let b = self.ck.read(&name)?;
            expect_shape(&name, &b, &[out_dim])?;
            Some(param1(&name, b, self.device, self.trainable))
        } else {
            None
        };
        Ok(Proj {
            weight: named_param(&name, weight, self.trainable),
            bias,
            lora: None,
            precision: MatmulPrecision::F32,
        })
    }

    fn norm(&self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm<B>, ModelError> {
        let w = self.ck.read(name)?;
        expect_shape(name, &w, &[dim])?;
        Ok(RmsNorm {
            weight: param1(name, w, self.device, self.trainable),
            eps,
        })
    }
}

/// Loads a model directory (config.json + safetensors weights) for inference.
pub fn load_model<B: Backend>(dir: &Path, device: &B::Device) -> Result<CausalLm<B>, ModelError> {
    load_model_with(dir, device, false)
}

/// Loads a model directory; with `trainable`, every weight takes gradients (full
/// fine-tuning), else none does (inference, or a frozen base under LoRA).
pub fn load_model_with<B: Backend>(
    dir: &Path,
    device: &B::Device,
    trainable: bool,
) -> Result<CausalLm<B>, ModelError> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open(dir)?;
    let ld = Loader::<B> {
        ck: &ck,
        device,
        trainable,
    };
    let (hid, inter) = (cfg.hidden_size, cfg.intermediate_size);
    let (q_dim, kv_dim) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let embed = ck.read("model.embed_tokens.weight")?;
    expect_shape("model.embed_tokens.weight", &embed, &[cfg.vocab_size, hid])?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let (ab, mb, eps) = (cfg.attention_bias, cfg.mlp_bias, cfg.rms_norm_eps);
        layers.push(DecoderLayer {
            input_layernorm: ld.norm(&format!("{p}.input_layernorm.weight"), hid, eps)?,
            self_attn: Attention {
                q_proj: ld.proj(&format!("{p}.self_attn.q_proj"), q_dim, hid, ab)?,
                k_proj: ld.proj(&format!("{p}.self_attn.k_proj"), kv_dim, hid, ab)?,
                v_proj: ld.proj(&format!("{p}.self_attn.v_proj"), kv_dim, hid, ab)?,
                o_proj: ld.proj(&format!("{p}.self_attn.o_proj"), hid, q_dim, ab)?,
                n_heads: cfg.num_attention_heads,
                n_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                precision: MatmulPrecision::F32,
            },
            post_attention_layernorm: ld.norm(
                &format!("{p}.post_attention_layernorm.weight"),
                hid,
                eps,
            )?,
            mlp: Mlp {
                gate_proj: ld.proj(&format!("{p}.mlp.gate_proj"), inter, hid, mb)?,
                up_proj: ld.proj(&format!("{p}.mlp.up_proj"), inter, hid, mb)?,
                down_proj: ld.proj(&format!("{p}.mlp.down_proj"), hid, inter, mb)?,
            },
        });
    }
    // Tied checkpoints may still carry an lm_head copy; the config decides.
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(ld.proj("lm_head", cfg.vocab_size, hid, false)?)
    };
    Ok(CausalLm {
        embed_tokens: param2("model.embed_tokens.weight", embed, device, trainable),
        layers,
        norm: ld.norm("model.norm.weight", hid, cfg.rms_norm_eps)?,
        lm_head,
        matmul_precision: MatmulPrecision::F32,
        rope: Rope::new(&cfg),
        config: cfg,
    })
}

impl<B: Backend> CausalLm<B> {
    /// Grows the vocabulary to `new_vocab` rows, the new input and output embedding rows set
    /// to the mean of the old ones (Stanford Alpaca's `smart_tokenizer_and_embedding_resize`).
    pub fn resize_embeddings(mut self, new_vocab: usize) -> Self {
        let old = self.config.vocab_size;
        if new_vocab <= old {
            return self;
        }
        let extra = new_vocab - old;
        let grow_rows = |w: Tensor<B, 2>| -> Tensor<B, 2> {
            // w: [vocab, hidden]
            let mean = w.clone().mean_dim(0); // [1, hidden]
            Tensor::cat(vec![w, mean.repeat_dim(0, extra)], 0)
        };
        let trainable = self.embed_tokens.val().is_require_grad();
        self.embed_tokens = named_param(
            "model.embed_tokens.weight",
            grow_rows(self.embed_tokens.val()),
            trainable,
        );
        if let Some(head) = self.lm_head.take() {
            // [hidden, vocab]: grow columns.
            let w = grow_rows(head.weight.val().transpose()).transpose();
            self.lm_head = Some(Proj {
                weight: named_param("lm_head.weight", w, trainable),
                bias: head.bias,
                lora: head.lora,
                precision: head.precision,
            });
        }
        self.config.vocab_size = new_vocab;
        self
    }
}
