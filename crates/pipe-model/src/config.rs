//! The model configuration, read from a Hugging Face `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Why a `config.json` does not describe a model pipe can run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("model_type `{0}` is not a Llama-family decoder (llama)")]
    ModelType(String),
    #[error("hidden_act `{0}` is not supported (Llama uses silu)")]
    HiddenAct(String),
    #[error("{heads} attention heads cannot be grouped over {kv} key/value heads")]
    Heads { heads: usize, kv: usize },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("head_dim {0} must be even and at least 2 for rotary embeddings")]
    HeadDim(usize),
    #[error("max_position_embeddings {positions} × head_dim {head_dim} is more positions than pipe's rotary tables hold ({limit} values)")]
    TooManyPositions {
        positions: usize,
        head_dim: usize,
        limit: u128,
    },
    /// `rope_scaling` of `kind` (linear, llama3) without its `factor`.
    #[error("rope_scaling: {kind} needs `factor`")]
    RopeFactor { kind: &'static str },
    #[error("rope_scaling type `{0}` is not supported (default, linear, llama3)")]
    RopeType(String),
}

/// How rotary frequencies are rescaled for long contexts (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's piecewise scaling of the frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// A Llama-family decoder's shape, as `LlamaForCausalLM` reads it from config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype`), e.g. `bfloat16`.
    pub torch_dtype: Option<String>,
}

/// config.json as written by transformers (only the fields that matter here).
#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pad_token_id: Option<serde_json::Value>,
    #[serde(default)]
    torch_dtype: Option<String>,
}

fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_act() -> String {
    "silu".into()
}

/// A token id field that may be a number, a list (the first counts) or null.
fn token_id(v: Option<serde_json::Value>) -> Option<u32> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64().map(|x| x as u32),
        serde_json::Value::Array(a) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::Io(path.display().to_string(), e))?;
        Self::from_json(&text).map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: Raw = serde_json::from_str(text)?;
        if let Some(t) = &raw.model_type {
            if !matches!(t.as_str(), "llama" | "mistral") {
                return Err(ConfigError::ModelType(t.clone()));
            }
        }
        if raw.hidden_act != "silu" {
            return Err(ConfigError::HiddenAct(raw.hidden_act));
        }
        let heads = raw.num_attention_heads;
        let kv = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(ConfigError::Heads { heads, kv });
        }
        for (name, n) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("max_position_embeddings", raw.max_position_embeddings),
        ] {
            if n == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ConfigError::HeadDim(head_dim));
        }
        // The rotary tables hold every position: 2^28 values each is 1 GiB, and a model with
        // a million positions of head_dim 256 fits.
        const MAX_ROTARY_VALUES: u128 = 1 << 28;
        if raw.max_position_embeddings as u128 * head_dim as u128 > MAX_ROTARY_VALUES {
            return Err(ConfigError::TooManyPositions {
                positions: raw.max_position_embeddings,
                head_dim,
                limit: MAX_ROTARY_VALUES,
            });
        }
        let rope_scaling = match raw.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("default")
                    .to_string();
                let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
                match kind.as_str() {
                    "default" => None,
                    "linear" => Some(RopeScaling::Linear {
                        factor: f("factor").ok_or(ConfigError::RopeFactor { kind: "linear" })?,
                    }),
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: f("factor").ok_or(ConfigError::RopeFactor { kind: "llama3" })?,
                        low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: v
                            .get("original_max_position_embeddings")
                            .and_then(|x| x.as_u64())
                            .unwrap_or(8192)
                            as usize,
                    }),
                    other => return Err(ConfigError::RopeType(other.to_string())),
                }
            }
        };
        Ok(ModelConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw.attention_bias,
            mlp_bias: raw.mlp_bias,
            bos_token_id: token_id(raw.bos_token_id),
            eos_token_id: token_id(raw.eos_token_id),
            pad_token_id: token_id(raw.pad_token_id),
            torch_dtype: raw.torch_dtype,
        })
    }

    /// The number of weights of the model (without LoRA adapters), counted wide enough for
    /// any config.
    pub fn parameter_count(&self) -> u128 {
        let [vocab, hidden, inter, layers, heads, kv, head] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        ]
        .map(|n| n as u128);
        let attention = hidden * heads * head * 2 + hidden * kv * head * 2;
        let mlp = 3 * hidden * inter;
        let per_layer = attention + mlp + 2 * hidden;
        let head_weights = if self.tie_word_embeddings {
            0
        } else {
            vocab * hidden
        };
        vocab * hidden + layers * per_layer + hidden + head_weights
    }

    /// The inverse frequencies of the rotary embedding (length `head_dim / 2`), as
    /// transformers' `ROPE_INIT_FUNCTIONS` compute them.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f64;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}
