//! Qwen3: RMSNorm over each head of q and k before the rotation, `head_dim` independent of
//! the hidden size (default 128), `attention_bias` on all four projections (default none),
//! Qwen's sliding-window rule.

use serde_json::{json, Value};

use super::{plain_decoder, qwen2, Family, STANDARD_ROPE_TYPES};
use crate::config::{CommonShape, ConfigError, Fields, ModelConfig};
use crate::rope::RopeConfig;

pub(super) fn read(f: &Fields<'_>) -> Result<ModelConfig, ConfigError> {
    f.require_str("hidden_act", "silu", &["silu"])?;
    let shape = CommonShape::read(f, 32768, Some(128))?;
    let rope = RopeConfig::read(f, 10000.0, STANDARD_ROPE_TYPES, &[], None)?;
    let mut c = plain_decoder(Family::Qwen3, f, shape, rope, 1e-6, false)?;
    c.qkv_bias = f.bool_or("attention_bias", false)?;
    c.o_bias = c.qkv_bias;
    c.qk_norm = true;
    qwen2::read_sliding_layers(f, &mut c)?;
    Ok(c)
}

pub(super) fn write(c: &ModelConfig, v: &mut Value) {
    v["hidden_act"] = json!("silu");
    v["attention_bias"] = json!(c.qkv_bias);
    qwen2::write_sliding_layers(c, v);
}
