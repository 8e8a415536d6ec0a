//! The Llama-family decoder in burn, numerically the same model as transformers'
//! `LlamaForCausalLM`, loaded from Hugging Face checkpoints (safetensors only).

pub mod config;
pub mod load;
pub mod lora;
pub mod model;
pub mod save;

pub use config::ModelConfig;
pub use load::{load_model, load_model_with, Checkpoint};
pub use lora::{LoraSpec, Targets};
pub use model::{shifted_cross_entropy, KvCache, CausalLm, MatmulPrecision};
pub use save::{init_model, SaveDtype};

/// The backend pipe computes with on the CPU: burn-flex (threads and SIMD), the fastest of
/// burn 0.21's CPU backends on the training benchmark (`bench/train.sh`: ndarray, candle and
/// flex measured side by side; burn-cpu needs an LLVM download at build time).
pub type CpuBackend = burn::backend::Flex;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {0}: {1}")]
    Io(String, std::io::Error),
    #[error("cannot write {0}: {1}")]
    Write(String, std::io::Error),
    #[error("bad model config: {0}")]
    Config(String),
    #[error("bad checkpoint: {0}")]
    Checkpoint(String),
}
