//! Mistral: the plain decoder with sliding-window attention in every layer when
//! `sliding_window` is set (absent means transformers' default, 4096; `null` means none).

use serde_json::{json, Value};

use super::{plain_decoder, Family, STANDARD_ROPE_TYPES};
use crate::config::{CommonShape, ConfigError, Fields, LayerType, ModelConfig};
use crate::rope::RopeConfig;

pub(super) fn read(f: &Fields<'_>) -> Result<ModelConfig, ConfigError> {
    f.require_str("hidden_act", "silu", &["silu"])?;
    let shape = CommonShape::read(f, 4096 * 32, None)?;
    let rope = RopeConfig::read(f, 10000.0, STANDARD_ROPE_TYPES, &[], None)?;
    let mut c = plain_decoder(Family::Mistral, f, shape, rope, 1e-6, false)?;
    c.sliding_window = if f.contains("sliding_window") {
        f.opt_usize("sliding_window")?
    } else {
        Some(4096)
    };
    if c.sliding_window.is_some() {
        c.layer_types = vec![LayerType::Sliding; c.num_hidden_layers];
    }
    Ok(c)
}

pub(super) fn write(c: &ModelConfig, v: &mut Value) {
    v["hidden_act"] = json!("silu");
    // MistralConfig keeps `head_dim` null when it is hidden / heads.
    if c.head_dim == c.hidden_size / c.num_attention_heads {
        v["head_dim"] = Value::Null;
    }
    v["sliding_window"] = json!(c.sliding_window);
}
