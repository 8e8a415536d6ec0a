//! Decoder-only language models in burn, numerically the same as transformers' — Llama,
//! Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 — loaded from Hugging Face
//! checkpoints (safetensors only), trained with PEFT's LoRA, and saved back.
//!
//! - [`config`]: one description of a decoder's blocks ([`ModelConfig`]);
//! - [`family`]: each family's config.json read into it and written back, one file each;
//! - [`model`]: the blocks (`*Config::init` + `Module`) and the forward passes;
//! - [`kernels`]: the CPU's fused attention softmax, cross-entropy, SwiGLU and head swap,
//!   each with its own backward;
//! - [`weights`]: where a model's weights come from when built (a checkpoint or a seed);
//! - [`load`], [`save`], [`lora`]: checkpoints, Hugging Face files, PEFT adapters.

pub mod attention;
pub mod config;
pub mod family;
pub mod gguf;
pub mod kernels;
pub mod load;
pub mod lora;
pub mod model;
pub mod rope;
pub mod save;
pub mod weights;

use std::path::PathBuf;

pub use config::{Activation, ConfigError, LayerType, ModelConfig, NormStyle};
pub use family::Family;
pub use load::{load_model, load_model_with, Checkpoint};
pub use lora::{LoraSpec, Targets};
pub use model::{shifted_cross_entropy, CausalLm, KvCache, LayerContext, MatmulPrecision, Rows};
pub use rope::{RopeConfig, RopeScaling};
pub use save::{init_model, SaveDtype};

/// The backend pipe computes with on the CPU: burn-flex (threads and SIMD), the fastest of
/// burn 0.21's CPU backends on the training benchmark (`bench/train.sh`: ndarray, candle and
/// flex measured side by side; burn-cpu needs an LLVM download at build time).
pub type CpuBackend = burn::backend::Flex;

/// Why a model could not be read, built or written.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad model config {}: {source}", path.display())]
    Config {
        path: PathBuf,
        source: Box<ConfigError>,
    },
    // Boxed: every fallible call returns this, and the detailed causes are large.
    #[error("bad checkpoint: {0}")]
    Checkpoint(Box<CheckpointError>),
    #[error("bad LoRA adapter: {0}")]
    Adapter(Box<AdapterError>),
}

impl From<CheckpointError> for ModelError {
    fn from(e: CheckpointError) -> Self {
        ModelError::Checkpoint(Box::new(e))
    }
}

impl From<AdapterError> for ModelError {
    fn from(e: AdapterError) -> Self {
        ModelError::Adapter(Box::new(e))
    }
}

/// What is wrong with a checkpoint's files.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{} has no model.safetensors (or model.safetensors.index.json)", dir.display())]
    NoWeights { dir: PathBuf },
    #[error("{} has only pickle weights ({}); pipe never loads pickle, since unpickling can run arbitrary code. Convert them to safetensors first (e.g. with transformers: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`)", dir.display(), files.join(", "))]
    PickleOnly { dir: PathBuf, files: Vec<String> },
    #[error("{}: {source}", path.display())]
    IndexJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: no weight_map", path.display())]
    NoWeightMap { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
    #[error("the checkpoint has no tensor `{name}`")]
    Missing { name: String },
    #[error("{name} has shape {found:?}, but config.json implies {expected:?}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{name} is {dtype}; pipe reads f32, f16 and bf16 weights")]
    Dtype { name: String, dtype: String },
    #[error("cannot serialize {name}: {source}")]
    Serialize {
        name: String,
        source: safetensors::SafeTensorError,
    },
}

/// What is wrong with a LoRA adapter or its settings.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{}: {source}", path.display())]
    ConfigJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: no `r`", path.display())]
    NoRank { path: PathBuf },
    #[error("{what} adapters are not supported (plain LoRA only)")]
    Unsupported { what: &'static str },
    #[error("{} holds no LoRA weights for this model (its modules: {})", dir.display(), modules.join(", "))]
    NoWeights { dir: PathBuf, modules: Vec<String> },
    #[error("no linear layer matches the LoRA targets {targets} (this model's: {})", modules.join(", "))]
    NoTargets {
        targets: String,
        modules: Vec<String>,
    },
    #[error(
        "the adapter for {module} has shapes {a:?}/{b:?}, expected {expected_a:?}/{expected_b:?}"
    )]
    Shape {
        module: String,
        a: Vec<usize>,
        b: Vec<usize>,
        expected_a: Vec<usize>,
        expected_b: Vec<usize>,
    },
    #[error(
        "adapter_config.json lists `{module}` in modules_to_save but the adapter has no {key}"
    )]
    MissingSaved { module: String, key: String },
    #[error("no module `{0}` to save (embed_tokens, lm_head, or a linear layer's name)")]
    NoModule(String),
    #[error("`lm_head` is tied to `embed_tokens` in this model: save `embed_tokens`")]
    TiedHead,
    #[error("the saved {module} has shape {found:?}, the model's is {expected:?} (a vocabulary that grew must be resized the same way before the adapter is applied)")]
    SavedShape {
        module: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
}
