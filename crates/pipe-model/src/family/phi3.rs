//! Phi-3: q, k and v in one `qkv_proj` (in that order) and gate and up in one `gate_up_proj`
//! (gate first) — PEFT targets them by those names — LongRoPE scaling against the top-level
//! `original_max_position_embeddings`, an optional partial rotation, an optional sliding
//! window in every layer.

use serde_json::{json, Value};

use super::{plain_decoder, Family};
use crate::config::{CommonShape, ConfigError, Fields, LayerType, ModelConfig};
use crate::rope::{RopeConfig, RopeScaling};

pub(super) fn read(f: &Fields<'_>) -> Result<ModelConfig, ConfigError> {
    f.require_str("hidden_act", "silu", &["silu"])?;
    f.require_no_dropout("resid_pdrop")?;
    f.require_no_dropout("embd_pdrop")?;
    let shape = CommonShape::read(f, 4096, None)?;
    let original_max = f.usize_or("original_max_position_embeddings", 4096)?;
    let rope = RopeConfig::read(
        f,
        10000.0,
        &["longrope"],
        &[("su", "longrope"), ("yarn", "longrope")],
        Some(original_max),
    )?;
    let mut c = plain_decoder(Family::Phi3, f, shape, rope, 1e-5, false)?;
    c.fused_projections = true;
    c.sliding_window = f.opt_usize("sliding_window")?;
    if c.sliding_window.is_some() {
        c.layer_types = vec![LayerType::Sliding; c.num_hidden_layers];
    }
    Ok(c)
}

pub(super) fn write(c: &ModelConfig, v: &mut Value) {
    v["hidden_act"] = json!("silu");
    v["sliding_window"] = json!(c.sliding_window);
    v["partial_rotary_factor"] = json!(c.rope.partial_rotary_factor);
    v["resid_pdrop"] = json!(0.0);
    v["embd_pdrop"] = json!(0.0);
    // Phi3Config wants exactly {type, short_factor, long_factor}.
    if let Some(RopeScaling::LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings,
        ..
    }) = &c.rope.scaling
    {
        v["rope_scaling"] = json!({"type": "longrope", "short_factor": short_factor,
            "long_factor": long_factor});
        v["original_max_position_embeddings"] = json!(original_max_position_embeddings);
    } else {
        v["original_max_position_embeddings"] = json!(c.max_position_embeddings);
    }
}
