//! The model families pipe runs. A family is one file here: it reads its `config.json` into
//! the common [`ModelConfig`] (its defaults, the quirks it turns on, the values it refuses)
//! and writes one back that transformers loads as the same model. Tensor names follow from the
//! quirks (`fused_projections`, `qk_norm`, `sandwich_norms`), so loading, saving and PEFT's
//! module names need nothing per family.
//!
//! A new family: a file with `read` and `write`, a variant below, and fixtures from
//! transformers (scripts/make_family_fixtures.py).

mod gemma2;
mod gemma3;
mod llama;
mod mistral;
mod phi3;
mod qwen2;
mod qwen3;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{ConfigError, Fields, ModelConfig};

/// A decoder family, as config.json's `model_type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
}

/// The rope scaling types transformers applies to the families that share Llama's rotary
/// embedding.
const STANDARD_ROPE_TYPES: &[&str] = &["linear", "dynamic", "yarn", "llama3"];

impl Family {
    /// Every supported `model_type`, as an error message lists them.
    pub const SUPPORTED: &'static [&'static str] = &[
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3_text",
        "phi3",
    ];

    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    /// config.json's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
        }
    }

    /// config.json's `architectures` entry: the transformers class that loads it.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }

    pub(crate) fn read_config(self, f: &Fields<'_>) -> Result<ModelConfig, ConfigError> {
        match self {
            Family::Llama => llama::read(f),
            Family::Mistral => mistral::read(f),
            Family::Qwen2 => qwen2::read(f),
            Family::Qwen3 => qwen3::read(f),
            Family::Gemma2 => gemma2::read(f),
            Family::Gemma3 => gemma3::read(f),
            Family::Phi3 => phi3::read(f),
        }
    }

    pub(crate) fn write_config(self, c: &ModelConfig) -> Value {
        let mut v = common_json(c);
        match self {
            Family::Llama => llama::write(c, &mut v),
            Family::Mistral => mistral::write(c, &mut v),
            Family::Qwen2 => qwen2::write(c, &mut v),
            Family::Qwen3 => qwen3::write(c, &mut v),
            Family::Gemma2 => gemma2::write(c, &mut v),
            Family::Gemma3 => gemma3::write(c, &mut v),
            Family::Phi3 => phi3::write(c, &mut v),
        }
        v
    }
}

/// What every family's config.json holds.
fn common_json(c: &ModelConfig) -> Value {
    json!({
        "architectures": [c.family.architecture()],
        "model_type": c.family.model_type(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope.theta,
        "rope_scaling": c.rope.scaling_json(),
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": c.torch_dtype,
    })
}

/// `layer_types` as transformers writes it.
fn layer_types_json(c: &ModelConfig) -> Value {
    Value::from(
        c.layer_types
            .iter()
            .map(|t| t.hf_name())
            .collect::<Vec<_>>(),
    )
}

/// The settings every family reads the same way, with the family's defaults filled in by
/// the caller.
fn token_ids(f: &Fields<'_>) -> (Option<u32>, Option<u32>, Option<u32>) {
    (
        f.token_id("bos_token_id"),
        f.token_id("eos_token_id"),
        f.token_id("pad_token_id"),
    )
}

/// A Llama-style decoder (no quirks) of the given shape and rotary embedding: what each family
/// starts from before turning its own quirks on.
fn plain_decoder(
    family: Family,
    f: &Fields<'_>,
    shape: crate::config::CommonShape,
    rope: crate::rope::RopeConfig,
    default_eps: f64,
    default_tied: bool,
) -> Result<ModelConfig, ConfigError> {
    let (bos_token_id, eos_token_id, pad_token_id) = token_ids(f);
    f.require_no_dropout("attention_dropout")?;
    Ok(ModelConfig {
        family,
        vocab_size: shape.vocab_size,
        hidden_size: shape.hidden_size,
        intermediate_size: shape.intermediate_size,
        num_hidden_layers: shape.num_hidden_layers,
        num_attention_heads: shape.num_attention_heads,
        num_key_value_heads: shape.num_key_value_heads,
        head_dim: shape.head_dim,
        max_position_embeddings: shape.max_position_embeddings,
        rms_norm_eps: f.f64_or("rms_norm_eps", default_eps)?,
        rope,
        local_rope: None,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", default_tied)?,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        norm_style: crate::config::NormStyle::Weight,
        sandwich_norms: false,
        activation: crate::config::Activation::Silu,
        scale_embeddings: false,
        query_pre_attn_scalar: None,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        sliding_window: None,
        layer_types: vec![crate::config::LayerType::Full; shape.num_hidden_layers],
        fused_projections: false,
        bos_token_id,
        eos_token_id,
        pad_token_id,
        torch_dtype: f
            .get("torch_dtype")
            .or_else(|| f.get("dtype"))
            .and_then(|v| v.as_str())
            .map(String::from),
    })
}
