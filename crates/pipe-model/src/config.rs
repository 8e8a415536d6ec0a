//! The model configuration: one description of a decoder's blocks that every family's
//! `config.json` is read into (by its file under [`crate::family`]), and that the model is
//! built from.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::family::Family;
use crate::rope::{RopeConfig, RopeScaling};
use crate::ModelError;

/// Why a `config.json` does not describe a model pipe can run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("config.json is not a JSON object")]
    NotAnObject,
    #[error("model_type `{found}` is not supported (supported: {})", Family::SUPPORTED.join(", "))]
    ModelType { found: String },
    #[error("`{field}` is missing")]
    Missing { field: &'static str },
    #[error("`{field}` must be {expected}, not {found}")]
    FieldType {
        field: String,
        expected: &'static str,
        found: String,
    },
    /// A value that would change the model's math in a way pipe does not implement.
    #[error("`{field}` = {value} is not supported (supported: {supported})")]
    Unsupported {
        field: String,
        value: String,
        supported: String,
    },
    #[error("{heads} attention heads cannot be grouped over {kv} key/value heads")]
    Heads { heads: usize, kv: usize },
    #[error("`{0}` must be at least 1")]
    Zero(&'static str),
    #[error(
        "the rotary dimension {0} (head_dim × partial_rotary_factor) must be even and at least 2"
    )]
    RotaryDim(usize),
    #[error("max_position_embeddings {positions} × head_dim {head_dim} is more positions than pipe's rotary tables hold ({limit} values)")]
    TooManyPositions {
        positions: usize,
        head_dim: usize,
        limit: u128,
    },
    #[error("`{field}` has {found} entries, but the model has {expected} {what}")]
    Length {
        field: &'static str,
        found: usize,
        expected: usize,
        what: &'static str,
    },
}

/// How RMSNorm applies its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormStyle {
    /// `x̂ · w` (Llama, Qwen, Mistral, Phi-3); weights initialised to 1.
    Weight,
    /// `x̂ · (1 + w)` (Gemma); weights initialised to 0.
    OnePlusWeight,
}

/// The feed-forward block's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `silu` (SwiGLU).
    Silu,
    /// `gelu_pytorch_tanh` (GeGLU with the tanh approximation, Gemma).
    GeluTanh,
}

/// Which keys a layer's queries see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerType {
    /// Every earlier position (`full_attention`).
    Full,
    /// The last `sliding_window` positions, the query's own included (`sliding_attention`).
    Sliding,
}

impl LayerType {
    /// The name transformers gives it in `layer_types`.
    pub fn hf_name(self) -> &'static str {
        match self {
            LayerType::Full => "full_attention",
            LayerType::Sliding => "sliding_attention",
        }
    }
}

/// A decoder's shape and every quirk that changes its math, as its family's `config.json`
/// describes it. Built by [`ModelConfig::from_json`] (the family's reader) and written back by
/// [`ModelConfig::hf_config_json`] (the family's writer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// The rotary embedding of full-attention layers (of every layer, unless `local_rope`).
    pub rope: RopeConfig,
    /// Gemma 3's own rotary embedding for sliding-window layers (`rope_local_base_freq`).
    pub local_rope: Option<RopeConfig>,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// A bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k before the rotation (Qwen3, Gemma 3).
    pub qk_norm: bool,
    pub norm_style: NormStyle,
    /// Norms after attention and around the feed-forward block (Gemma 2/3: four per layer).
    pub sandwich_norms: bool,
    pub activation: Activation,
    /// Embeddings multiplied by √hidden_size (Gemma).
    pub scale_embeddings: bool,
    /// Scores scaled by `query_pre_attn_scalar^-½` instead of `head_dim^-½` (Gemma).
    pub query_pre_attn_scalar: Option<f64>,
    /// Scores soft-capped as `c · tanh(s / c)` before the mask (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// Logits soft-capped the same way (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// The window of `LayerType::Sliding` layers.
    pub sliding_window: Option<usize>,
    /// One entry per layer.
    pub layer_types: Vec<LayerType>,
    /// q/k/v in one `qkv_proj` and gate/up in one `gate_up_proj` (Phi-3).
    pub fused_projections: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype`), e.g. `bfloat16`.
    pub torch_dtype: Option<String>,
}

/// Typed access to config.json's fields, with errors that name the field.
pub(crate) struct Fields<'a> {
    map: &'a serde_json::Map<String, serde_json::Value>,
}

fn kind_of(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null".into(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => format!("\"{s}\""),
        serde_json::Value::Array(_) => "a list".into(),
        serde_json::Value::Object(_) => "an object".into(),
    }
}

impl<'a> Fields<'a> {
    pub(crate) fn new(map: &'a serde_json::Map<String, serde_json::Value>) -> Self {
        Fields { map }
    }

    /// Whether `key` is present (even as null).
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// The value of `key`, `None` when absent or null.
    pub(crate) fn get(&self, key: &str) -> Option<&'a serde_json::Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn type_error(&self, key: &str, expected: &'static str) -> ConfigError {
        ConfigError::FieldType {
            field: key.to_string(),
            expected,
            found: self.get(key).map(kind_of).unwrap_or_else(|| "null".into()),
        }
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.type_error(key, "a whole number")),
        }
    }

    pub(crate) fn usize(&self, key: &'static str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?
            .ok_or(ConfigError::Missing { field: key })
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.type_error(key, "a number")),
        }
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.type_error(key, "true or false")),
        }
    }

    pub(crate) fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.type_error(key, "a string")),
        }
    }

    /// A token id that may be a number, a list (the first counts) or null.
    pub(crate) fn token_id(&self, key: &str) -> Option<u32> {
        match self.get(key)? {
            serde_json::Value::Number(n) => n.as_u64().and_then(|x| u32::try_from(x).ok()),
            serde_json::Value::Array(a) => a
                .first()
                .and_then(|x| x.as_u64())
                .and_then(|x| u32::try_from(x).ok()),
            _ => None,
        }
    }

    /// Refuses a value of `key` other than `allowed` (absent counts as allowed): for fields
    /// whose other values change the math in ways pipe does not implement.
    pub(crate) fn require_str(
        &self,
        key: &str,
        default: &str,
        allowed: &[&str],
    ) -> Result<(), ConfigError> {
        let v = self.str_or(key, default)?;
        if allowed.contains(&v) {
            Ok(())
        } else {
            Err(ConfigError::Unsupported {
                field: key.into(),
                value: format!("\"{v}\""),
                supported: allowed.join(", "),
            })
        }
    }

    /// Refuses a nonzero dropout probability: training would drop activations that pipe keeps.
    pub(crate) fn require_no_dropout(&self, key: &str) -> Result<(), ConfigError> {
        match self.opt_f64(key)? {
            Some(p) if p != 0.0 => Err(ConfigError::Unsupported {
                field: key.into(),
                value: p.to_string(),
                supported: "0.0 (pipe trains without dropout inside the model)".into(),
            }),
            _ => Ok(()),
        }
    }

    /// `layer_types` as written by transformers ≥ 4.53, or `None` when absent.
    pub(crate) fn layer_types(&self, layers: usize) -> Result<Option<Vec<LayerType>>, ConfigError> {
        let Some(v) = self.get("layer_types") else {
            return Ok(None);
        };
        let list = v
            .as_array()
            .ok_or_else(|| self.type_error("layer_types", "a list"))?;
        if list.len() != layers {
            return Err(ConfigError::Length {
                field: "layer_types",
                found: list.len(),
                expected: layers,
                what: "layers",
            });
        }
        list.iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(LayerType::Full),
                Some("sliding_attention") => Ok(LayerType::Sliding),
                _ => Err(ConfigError::Unsupported {
                    field: "layer_types".into(),
                    value: kind_of(t),
                    supported: "full_attention, sliding_attention".into(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// The shape every family shares, read with the family's defaults.
pub(crate) struct CommonShape {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
}

impl CommonShape {
    /// The size fields (required: pipe never guesses a model's size), `num_key_value_heads`
    /// (default: as many as attention heads) and `head_dim` (default: hidden / heads, or
    /// `default_head_dim` where the family fixes one).
    pub(crate) fn read(
        f: &Fields<'_>,
        default_max_positions: usize,
        default_head_dim: Option<usize>,
    ) -> Result<Self, ConfigError> {
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(ConfigError::Zero("num_attention_heads"));
        }
        let kv = f.usize_or("num_key_value_heads", num_attention_heads)?;
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => default_head_dim.unwrap_or(hidden_size / num_attention_heads),
        };
        Ok(CommonShape {
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: kv,
            head_dim,
            max_position_embeddings: f
                .usize_or("max_position_embeddings", default_max_positions)?,
        })
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Reads a `config.json` by its `model_type` (`llama` when absent, as pipe's `init:`
    /// allows), with that family's defaults, and checks that the result is a model pipe runs.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(text)?;
        let map = value.as_object().ok_or(ConfigError::NotAnObject)?;
        let fields = Fields::new(map);
        let model_type = fields.str_or("model_type", "llama")?;
        let family = Family::from_model_type(model_type).ok_or_else(|| ConfigError::ModelType {
            found: model_type.to_string(),
        })?;
        let config = family.read_config(&fields)?;
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` transformers writes for this model (its family's `architectures`,
    /// `model_type` and fields).
    pub fn hf_config_json(&self) -> serde_json::Value {
        self.family.write_config(self)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let (heads, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(ConfigError::Heads { heads, kv });
        }
        for (name, n) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("head_dim", self.head_dim),
        ] {
            if n == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(ConfigError::Length {
                field: "layer_types",
                found: self.layer_types.len(),
                expected: self.num_hidden_layers,
                what: "layers",
            });
        }
        if self.layer_types.contains(&LayerType::Sliding) && self.sliding_window.is_none() {
            return Err(ConfigError::Missing {
                field: "sliding_window",
            });
        }
        if self.sliding_window == Some(0) {
            return Err(ConfigError::Zero("sliding_window"));
        }
        for rope in std::iter::once(&self.rope).chain(&self.local_rope) {
            rope.validate(self.head_dim)?;
        }
        // The rotary tables of a call hold every position up to its last: 2^28 values each is
        // 1 GiB, and a model with a million positions of head_dim 256 fits.
        const MAX_ROTARY_VALUES: u128 = 1 << 28;
        if self.max_position_embeddings as u128 * self.head_dim as u128 > MAX_ROTARY_VALUES {
            return Err(ConfigError::TooManyPositions {
                positions: self.max_position_embeddings,
                head_dim: self.head_dim,
                limit: MAX_ROTARY_VALUES,
            });
        }
        Ok(())
    }

    /// The most positions pipe trains and scores a sequence on: `max_position_embeddings`,
    /// except under dynamic NTK scaling, which exists to stretch past it (`None`: no limit).
    /// The model itself computes any position, as transformers does (generation may run past
    /// the limit).
    pub fn max_positions(&self) -> Option<usize> {
        match self.rope.scaling {
            Some(RopeScaling::Dynamic { .. }) => None,
            _ => Some(self.max_position_embeddings),
        }
    }

    /// The width of the q projection's output.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// The width of the k and v projections' outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The number of weights of the model (without LoRA adapters), counted wide enough for
    /// any config.
    pub fn parameter_count(&self) -> u128 {
        let [vocab, hidden, inter, layers, q, kv, head] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.q_dim(),
            self.kv_dim(),
            self.head_dim,
        ]
        .map(|n| n as u128);
        let mut attention = hidden * q * 2 + hidden * kv * 2;
        if self.qkv_bias {
            attention += q + 2 * kv;
        }
        if self.o_bias {
            attention += hidden;
        }
        if self.qk_norm {
            attention += 2 * head;
        }
        let mut mlp = 3 * hidden * inter;
        if self.mlp_bias {
            mlp += 2 * inter + hidden;
        }
        let norms = if self.sandwich_norms { 4 } else { 2 } * hidden;
        let per_layer = attention + mlp + norms;
        let head_weights = if self.tie_word_embeddings {
            0
        } else {
            vocab * hidden
        };
        vocab * hidden + layers * per_layer + hidden + head_weights
    }

    /// The rotary embedding a layer uses.
    pub fn rope_of(&self, layer: LayerType) -> &RopeConfig {
        match (layer, &self.local_rope) {
            (LayerType::Sliding, Some(local)) => local,
            _ => &self.rope,
        }
    }
}
