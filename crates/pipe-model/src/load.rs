//! Hugging Face checkpoints → [`CausalLm`]: `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, f32/f16/bf16 on disk, memory-mapped. Pickle files are never
//! read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::ModelConfig;
use crate::model::{CausalLm, Proj};
use crate::weights::{named_param, Weights};
use crate::{CheckpointError, ModelError};

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
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::Io {
                path: index_path.clone(),
                source: e,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| CheckpointError::IndexJson {
                    path: index_path.clone(),
                    source: e,
                })?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| CheckpointError::NoWeightMap {
                    path: index_path.clone(),
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
            let dir = dir.to_path_buf();
            return Err(if pickles.is_empty() {
                CheckpointError::NoWeights { dir }
            } else {
                CheckpointError::PickleOnly {
                    dir,
                    files: pickles,
                }
            }
            .into());
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
            let io = |e| ModelError::Io {
                path: path.clone(),
                source: e,
            };
            let file = std::fs::File::open(&path).map_err(io)?;
            // SAFETY: checkpoint files are not modified while a run reads them (the store's
            // objects are read-only).
            let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| CheckpointError::Safetensors {
                path: path.clone(),
                source: e,
            })?;
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
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| CheckpointError::Missing {
                name: name.to_string(),
            })?;
        let (path, mmap) = &self.files[i];
        let safetensors_error = |e| CheckpointError::Safetensors {
            path: path.clone(),
            source: e,
        };
        let st = SafeTensors::deserialize(mmap).map_err(safetensors_error)?;
        let view = st.tensor(name).map_err(safetensors_error)?;
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
                return Err(CheckpointError::Dtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                }
                .into())
            }
        };
        Ok(HostTensor {
            shape: view.shape().to_vec(),
            data,
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
    let checkpoint = Checkpoint::open(dir)?;
    cfg.init(&mut Weights::checkpoint(&checkpoint, device, trainable))
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
