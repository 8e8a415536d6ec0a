//! Llama (1, 2, 3.x; also TinyLlama, SmolLM, and every `LlamaForCausalLM` checkpoint):
//! the plain decoder. `attention_bias` puts biases on all four attention projections.

use serde_json::{json, Value};

use super::{plain_decoder, Family, STANDARD_ROPE_TYPES};
use crate::config::{CommonShape, ConfigError, Fields, ModelConfig};
use crate::rope::RopeConfig;

pub(super) fn read(f: &Fields<'_>) -> Result<ModelConfig, ConfigError> {
    f.require_str("hidden_act", "silu", &["silu"])?;
    let shape = CommonShape::read(f, 2048, None)?;
    let rope = RopeConfig::read(f, 10000.0, STANDARD_ROPE_TYPES, &[], None)?;
    let mut c = plain_decoder(Family::Llama, f, shape, rope, 1e-6, false)?;
    c.qkv_bias = f.bool_or("attention_bias", false)?;
    c.o_bias = c.qkv_bias;
    c.mlp_bias = f.bool_or("mlp_bias", false)?;
    Ok(c)
}

pub(super) fn write(c: &ModelConfig, v: &mut Value) {
    v["hidden_act"] = json!("silu");
    v["attention_bias"] = json!(c.qkv_bias);
    v["mlp_bias"] = json!(c.mlp_bias);
}
