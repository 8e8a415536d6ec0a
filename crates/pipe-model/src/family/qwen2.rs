//! Qwen2 and Qwen2.5: biases on q, k and v (never on o), and sliding-window attention in the
//! layers from `max_window_layers` on when `use_sliding_window` is true (or as `layer_types`
//! lists them).

use serde_json::{json, Value};

use super::{layer_types_json, plain_decoder, Family, STANDARD_ROPE_TYPES};
use crate::config::{CommonShape, ConfigError, Fields, LayerType, ModelConfig};
use crate::rope::RopeConfig;

pub(super) fn read(f: &Fields<'_>) -> Result<ModelConfig, ConfigError> {
    f.require_str("hidden_act", "silu", &["silu"])?;
    let shape = CommonShape::read(f, 32768, None)?;
    let rope = RopeConfig::read(f, 10000.0, STANDARD_ROPE_TYPES, &[], None)?;
    let mut c = plain_decoder(Family::Qwen2, f, shape, rope, 1e-6, false)?;
    c.qkv_bias = true;
    read_sliding_layers(f, &mut c)?;
    Ok(c)
}

/// Qwen's rule (shared by Qwen3): a window only with `use_sliding_window`, in layers
/// `max_window_layers..`, unless `layer_types` says otherwise.
pub(super) fn read_sliding_layers(f: &Fields<'_>, c: &mut ModelConfig) -> Result<(), ConfigError> {
    let layers = c.num_hidden_layers;
    c.sliding_window = if f.bool_or("use_sliding_window", false)? {
        Some(f.usize_or("sliding_window", 4096)?)
    } else {
        None
    };
    c.layer_types = match f.layer_types(layers)? {
        Some(types) => types,
        None => {
            let from = f.usize_or("max_window_layers", 28)?;
            (0..layers)
                .map(|i| {
                    if c.sliding_window.is_some() && i >= from {
                        LayerType::Sliding
                    } else {
                        LayerType::Full
                    }
                })
                .collect()
        }
    };
    Ok(())
}

pub(super) fn write_sliding_layers(c: &ModelConfig, v: &mut Value) {
    v["use_sliding_window"] = json!(c.sliding_window.is_some());
    v["sliding_window"] = json!(c.sliding_window);
    // `layer_types` decides which layers slide; `max_window_layers` only says where the
    // sliding layers begin, when there are any.
    if let Some(first) = c.layer_types.iter().position(|t| *t == LayerType::Sliding) {
        v["max_window_layers"] = json!(first);
    }
    v["layer_types"] = layer_types_json(c);
}

pub(super) fn write(c: &ModelConfig, v: &mut Value) {
    v["hidden_act"] = json!("silu");
    write_sliding_layers(c, v);
}
