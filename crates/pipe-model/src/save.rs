//! [`CausalLm`] → Hugging Face files: tensors under transformers' names (`[out, in]` weights),
//! f32 or bf16, PEFT adapter files; and a seeded random model from a config (`init:`).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use safetensors::Dtype;

use crate::config::ModelConfig;
use crate::model::CausalLm;
use crate::weights::Weights;
use crate::{CheckpointError, ModelError};

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

impl Named {
    /// A tensor as it is (the caller lays it out as transformers does).
    pub fn of<B: Backend, const D: usize>(name: String, t: Tensor<B, D>) -> Self {
        let (shape, data) = host(t);
        Named { name, shape, data }
    }
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

impl<B: Backend> CausalLm<B> {
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
        std::fs::create_dir_all(dir).map_err(|e| ModelError::Write {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let mut cfg = self.config.hf_config_json();
        cfg["torch_dtype"] = serde_json::json!(match dtype {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
        });
        let p = dir.join("config.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&cfg).expect("json"))
            .map_err(|e| ModelError::Write { path: p, source: e })?;
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
            .map_err(|e| ModelError::Write { path: p, source: e })
    }
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
                .map_err(|e| CheckpointError::Serialize {
                    name: t.name.clone(),
                    source: e,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let tmp = path.with_extension("safetensors.tmp");
    // A failed write (a full disk) is an I/O error on this file, not a malformed checkpoint.
    safetensors::tensor::serialize_to_file(views, Some(meta), &tmp).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => ModelError::Write {
            path: tmp.clone(),
            source: io,
        },
        other => CheckpointError::Safetensors {
            path: path.to_path_buf(),
            source: other,
        }
        .into(),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::Write {
        path: path.to_path_buf(),
        source: e,
    })
}

/// A model with transformers' initialisation (weights ~ N(0, `std`), biases 0, norms the
/// identity) from `seed`: the same on every backend.
pub fn init_model<B: Backend>(
    cfg: &ModelConfig,
    seed: u64,
    std: f64,
    device: &B::Device,
    trainable: bool,
) -> CausalLm<B> {
    cfg.init(&mut Weights::seeded(seed, std, device, trainable))
        .expect("a seeded model reads no file")
}
