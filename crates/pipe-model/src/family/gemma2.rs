//! Gemma 2: RMSNorm as `x̂ · (1 + w)`, embeddings scaled by √hidden_size, GeGLU with tanh
//! GELU, four norms per layer (after attention, before and after the feed-forward block),
//! scores scaled by `query_pre_attn_scalar^-½` and soft-capped, soft-capped logits, and
//! sliding-window attention in every other layer (the first included) unless `layer_types`
//! says otherwise.

use serde_json::{json, Value};

use super::{layer_types_json, plain_decoder, Family, STANDARD_ROPE_TYPES};
use crate::config::{
    Activation, CommonShape, ConfigError, Fields, LayerType, ModelConfig, NormStyle,
};
use crate::rope::RopeConfig;

/// What Gemma 2 and Gemma 3 share, on top of the shape.
pub(super) fn gemma_quirks(f: &Fields<'_>, c: &mut ModelConfig) -> Result<(), ConfigError> {
    f.require_str(
        "hidden_activation",
        "gelu_pytorch_tanh",
        &["gelu_pytorch_tanh"],
    )?;
    c.qkv_bias = f.bool_or("attention_bias", false)?;
    c.o_bias = c.qkv_bias;
    c.norm_style = NormStyle::OnePlusWeight;
    c.sandwich_norms = true;
    c.activation = Activation::GeluTanh;
    c.scale_embeddings = true;
    c.query_pre_attn_scalar = Some(f.f64_or("query_pre_attn_scalar", 256.0)?);
    Ok(())
}

/// `layer_types`, or every `pattern`-th layer full and the others sliding.
pub(super) fn alternating_layers(
    f: &Fields<'_>,
    layers: usize,
    pattern: usize,
) -> Result<Vec<LayerType>, ConfigError> {
    Ok(match f.layer_types(layers)? {
        Some(types) => types,
        None => (0..layers)
            .map(|i| {
                if (i + 1) % pattern.max(1) != 0 {
                    LayerType::Sliding
                } else {
                    LayerType::Full
                }
            })
            .collect(),
    })
}

pub(super) fn read(f: &Fields<'_>) -> Result<ModelConfig, ConfigError> {
    let shape = CommonShape::read(f, 8192, Some(256))?;
    let rope = RopeConfig::read(f, 10000.0, STANDARD_ROPE_TYPES, &[], None)?;
    let mut c = plain_decoder(Family::Gemma2, f, shape, rope, 1e-6, true)?;
    gemma_quirks(f, &mut c)?;
    c.attn_logit_softcapping = Some(f.f64_or("attn_logit_softcapping", 50.0)?);
    c.final_logit_softcapping = Some(f.f64_or("final_logit_softcapping", 30.0)?);
    if f.contains("attn_logit_softcapping") && f.get("attn_logit_softcapping").is_none() {
        c.attn_logit_softcapping = None;
    }
    if f.contains("final_logit_softcapping") && f.get("final_logit_softcapping").is_none() {
        c.final_logit_softcapping = None;
    }
    c.sliding_window = Some(f.usize_or("sliding_window", 4096)?);
    c.layer_types = alternating_layers(f, c.num_hidden_layers, 2)?;
    Ok(c)
}

pub(super) fn write_gemma(c: &ModelConfig, v: &mut Value) {
    v["hidden_activation"] = json!("gelu_pytorch_tanh");
    v["attention_bias"] = json!(c.qkv_bias);
    v["query_pre_attn_scalar"] = json!(c.query_pre_attn_scalar);
    v["final_logit_softcapping"] = json!(c.final_logit_softcapping);
    v["sliding_window"] = json!(c.sliding_window);
    v["layer_types"] = layer_types_json(c);
}

pub(super) fn write(c: &ModelConfig, v: &mut Value) {
    write_gemma(c, v);
    v["attn_logit_softcapping"] = json!(c.attn_logit_softcapping);
}
