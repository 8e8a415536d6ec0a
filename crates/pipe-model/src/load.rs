//! Hugging Face checkpoints → [`Llama`]: `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, f32/f16/bf16 on disk, memory-mapped. Pickle files are never
//! read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::LlamaConfig;
use crate::model::{Attention, DecoderLayer, Llama, Mlp, Proj, RmsNorm, Rope};
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
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for name in shard_names {
            let path = dir.join(&name);
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

fn param1<B: Backend>(t: HostTensor, device: &B::Device) -> Param<Tensor<B, 1>> {
    let n = t.data.len();
    Param::from_tensor(Tensor::from_data(TensorData::new(t.data, [n]), device))
}

fn param2<B: Backend>(t: HostTensor, device: &B::Device) -> Param<Tensor<B, 2>> {
    let shape = [t.shape[0], t.shape[1]];
    Param::from_tensor(Tensor::from_data(TensorData::new(t.data, shape), device))
}

/// A Hugging Face `[out, in]` linear weight as a [`Proj`] (`[in, out]`).
fn proj<B: Backend>(
    ck: &Checkpoint,
    prefix: &str,
    out_dim: usize,
    in_dim: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Proj<B>, ModelError> {
    let name = format!("{prefix}.weight");
    let w = ck.read(&name)?;
    expect_shape(&name, &w, &[out_dim, in_dim])?;
    let weight =
        Tensor::<B, 2>::from_data(TensorData::new(w.data, [out_dim, in_dim]), device).transpose();
    let bias = if bias {
        let name = format!("{prefix}.bias");
        let b = ck.read(&name)?;
        expect_shape(&name, &b, &[out_dim])?;
        Some(param1(b, device))
    } else {
        None
    };
    Ok(Proj {
        weight: Param::from_tensor(weight),
        bias,
    })
}

fn norm<B: Backend>(
    ck: &Checkpoint,
    name: &str,
    dim: usize,
    eps: f64,
    device: &B::Device,
) -> Result<RmsNorm<B>, ModelError> {
    let w = ck.read(name)?;
    expect_shape(name, &w, &[dim])?;
    Ok(RmsNorm {
        weight: param1(w, device),
        eps,
    })
}

/// Loads a model directory (config.json + safetensors weights).
pub fn load_llama<B: Backend>(dir: &Path, device: &B::Device) -> Result<Llama<B>, ModelError> {
    let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open(dir)?;
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
        let ab = cfg.attention_bias;
        let mb = cfg.mlp_bias;
        layers.push(DecoderLayer {
            input_layernorm: norm(
                &ck,
                &format!("{p}.input_layernorm.weight"),
                hid,
                cfg.rms_norm_eps,
                device,
            )?,
            self_attn: Attention {
                q_proj: proj(
                    &ck,
                    &format!("{p}.self_attn.q_proj"),
                    q_dim,
                    hid,
                    ab,
                    device,
                )?,
                k_proj: proj(
                    &ck,
                    &format!("{p}.self_attn.k_proj"),
                    kv_dim,
                    hid,
                    ab,
                    device,
                )?,
                v_proj: proj(
                    &ck,
                    &format!("{p}.self_attn.v_proj"),
                    kv_dim,
                    hid,
                    ab,
                    device,
                )?,
                o_proj: proj(
                    &ck,
                    &format!("{p}.self_attn.o_proj"),
                    hid,
                    q_dim,
                    ab,
                    device,
                )?,
                n_heads: cfg.num_attention_heads,
                n_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            },
            post_attention_layernorm: norm(
                &ck,
                &format!("{p}.post_attention_layernorm.weight"),
                hid,
                cfg.rms_norm_eps,
                device,
            )?,
            mlp: Mlp {
                gate_proj: proj(&ck, &format!("{p}.mlp.gate_proj"), inter, hid, mb, device)?,
                up_proj: proj(&ck, &format!("{p}.mlp.up_proj"), inter, hid, mb, device)?,
                down_proj: proj(&ck, &format!("{p}.mlp.down_proj"), hid, inter, mb, device)?,
            },
        });
    }
    // Tied checkpoints may still carry an lm_head copy; the config decides.
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(proj(&ck, "lm_head", cfg.vocab_size, hid, false, device)?)
    };
    Ok(Llama {
        embed_tokens: param2(embed, device),
        layers,
        norm: norm(&ck, "model.norm.weight", hid, cfg.rms_norm_eps, device)?,
        lm_head,
        rope: Rope::new(&cfg),
        config: cfg,
    })
}

impl<B: Backend> Llama<B> {
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
        self.embed_tokens = Param::from_tensor(grow_rows(self.embed_tokens.val()));
        if let Some(head) = self.lm_head.take() {
            // [hidden, vocab]: grow columns.
            let w = grow_rows(head.weight.val().transpose()).transpose();
            self.lm_head = Some(Proj {
                weight: Param::from_tensor(w),
                bias: head.bias,
            });
        }
        self.config.vocab_size = new_vocab;
        self
    }
}
