//! Gemma 3 text models (`Gemma3ForCausalLM`, `gemma3_text`): Gemma 2's quirks without its
//! attention soft-capping (final-logit capping only if set), RMSNorm over each head of q and k, and local layers (five of every
//! six unless `layer_types` says otherwise) that slide and rotate with their own base
//! (`rope_local_base_freq`, never scaled) while global layers use `rope_theta` and
//! `rope_scaling`.

use serde_json::{json, Value};

use super::{gemma2, plain_decoder, Family, STANDARD_ROPE_TYPES};
use crate::config::{CommonShape, ConfigError, Fields, ModelConfig};
use crate::rope::RopeConfig;

pub(super) fn read(f: &Fields<'_>) -> Result<ModelConfig, ConfigError> {
    let shape = CommonShape::read(f, 131072, Some(256))?;
    let rope = RopeConfig::read(f, 1_000_000.0, STANDARD_ROPE_TYPES, &[], None)?;
    let mut c = plain_decoder(Family::Gemma3, f, shape, rope, 1e-6, true)?;
    gemma2::gemma_quirks(f, &mut c)?;
    c.qk_norm = true;
    // Gemma3's attention never applies `attn_logit_softcapping` (transformers 4.57 does not
    // pass it on), so neither does pipe.
    c.attn_logit_softcapping = None;
    c.final_logit_softcapping = f.opt_f64("final_logit_softcapping")?;
    c.sliding_window = Some(f.usize_or("sliding_window", 4096)?);
    let pattern = f.usize_or("sliding_window_pattern", 6)?;
    c.layer_types = gemma2::alternating_layers(f, c.num_hidden_layers, pattern)?;
    c.local_rope = Some(RopeConfig::plain(
        f.f64_or("rope_local_base_freq", 10000.0)?,
    ));
    Ok(c)
}

pub(super) fn write(c: &ModelConfig, v: &mut Value) {
    gemma2::write_gemma(c, v);
    v["rope_local_base_freq"] = json!(c.local_rope.as_ref().map(|r| r.theta));
}
