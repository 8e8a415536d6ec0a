//! Rotary position embeddings as transformers computes them (`modeling_rope_utils.py`): the
//! inverse frequencies of every scaling type these families use, and the cos/sin tables of a
//! forward call.

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Fields};

/// How rotary frequencies are rescaled for long contexts (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// NTK-aware scaling recomputed per call: a call reaching past `max_position_embeddings`
    /// positions raises the base for its own length.
    Dynamic { factor: f64 },
    /// YaRN: interpolation blended with extrapolation over a ramp of dimensions, and cos/sin
    /// scaled by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        /// As written in config.json (`None`: derived from `factor`, `mscale`, `mscale_all_dim`).
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
    },
    /// Llama 3.1's piecewise scaling of the frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Phi-3's LongRoPE: per-frequency factors, the long ones for calls that reach past
    /// `original_max_position_embeddings`, and cos/sin scaled by an attention factor.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        /// As written in config.json (`None`: derived from the context extension).
        attention_factor: Option<f64>,
    },
}

impl RopeScaling {
    /// Its `rope_scaling.rope_type` in config.json.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::LongRope { .. } => "longrope",
        }
    }
}

/// One rotary embedding: its base, scaling, and how much of each head it rotates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
    /// The leading fraction of each head that rotates (Phi-3's `partial_rotary_factor`).
    pub partial_rotary_factor: f64,
}

impl RopeConfig {
    /// An unscaled rotation of whole heads.
    pub fn plain(theta: f64) -> Self {
        RopeConfig {
            theta,
            scaling: None,
            partial_rotary_factor: 1.0,
        }
    }

    /// Reads `rope_scaling` (and `partial_rotary_factor`) beside `rope_theta`. `original_max`
    /// is a family's top-level `original_max_position_embeddings` (Phi-3), which LongRoPE reads
    /// from there. `aliases` are older names of a type (Phi-3's `su`).
    pub(crate) fn read(
        f: &Fields<'_>,
        default_theta: f64,
        allowed: &[&str],
        aliases: &[(&str, &str)],
        original_max: Option<usize>,
    ) -> Result<Self, ConfigError> {
        let theta = f.f64_or("rope_theta", default_theta)?;
        let partial_rotary_factor = f.f64_or("partial_rotary_factor", 1.0)?;
        let scaling = match f.get("rope_scaling") {
            None => None,
            Some(v) => {
                let obj = v.as_object().ok_or_else(|| ConfigError::FieldType {
                    field: "rope_scaling".into(),
                    expected: "an object or null",
                    found: v.to_string(),
                })?;
                Self::read_scaling(&Fields::new(obj), allowed, aliases, f, original_max)?
            }
        };
        Ok(RopeConfig {
            theta,
            scaling,
            partial_rotary_factor,
        })
    }

    fn read_scaling(
        s: &Fields<'_>,
        allowed: &[&str],
        aliases: &[(&str, &str)],
        top: &Fields<'_>,
        original_max: Option<usize>,
    ) -> Result<Option<RopeScaling>, ConfigError> {
        let kind = match s.get("rope_type").or_else(|| s.get("type")) {
            None => "default",
            Some(v) => v.as_str().ok_or_else(|| ConfigError::FieldType {
                field: "rope_scaling.rope_type".into(),
                expected: "a string",
                found: v.to_string(),
            })?,
        };
        let kind = aliases
            .iter()
            .find(|(old, _)| *old == kind)
            .map_or(kind, |(_, new)| *new);
        if kind != "default" && !allowed.contains(&kind) {
            return Err(ConfigError::Unsupported {
                field: "rope_scaling.rope_type".into(),
                value: format!("\"{kind}\""),
                supported: std::iter::once("default")
                    .chain(allowed.iter().copied())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let factor = |kind: &'static str| -> Result<f64, ConfigError> {
            s.opt_f64("factor")?.ok_or(ConfigError::Missing {
                field: match kind {
                    "linear" => "rope_scaling.factor (linear)",
                    "dynamic" => "rope_scaling.factor (dynamic)",
                    "yarn" => "rope_scaling.factor (yarn)",
                    _ => "rope_scaling.factor (llama3)",
                },
            })
        };
        let max_positions = top.opt_usize("max_position_embeddings")?;
        Ok(match kind {
            "default" => None,
            "linear" => Some(RopeScaling::Linear {
                factor: factor("linear")?,
            }),
            "dynamic" => Some(RopeScaling::Dynamic {
                factor: factor("dynamic")?,
            }),
            "yarn" => Some(RopeScaling::Yarn {
                factor: factor("yarn")?,
                original_max_position_embeddings: match s
                    .opt_usize("original_max_position_embeddings")?
                {
                    Some(n) => n,
                    None => max_positions.ok_or(ConfigError::Missing {
                        field: "max_position_embeddings",
                    })?,
                },
                // transformers reads these with `or`: 0 counts as absent.
                beta_fast: s
                    .opt_f64("beta_fast")?
                    .filter(|b| *b != 0.0)
                    .unwrap_or(32.0),
                beta_slow: s.opt_f64("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                truncate: s.bool_or("truncate", true)?,
                attention_factor: s.opt_f64("attention_factor")?,
                mscale: s.opt_f64("mscale")?,
                mscale_all_dim: s.opt_f64("mscale_all_dim")?,
            }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: factor("llama3")?,
                low_freq_factor: s.f64_or("low_freq_factor", 1.0)?,
                high_freq_factor: s.f64_or("high_freq_factor", 4.0)?,
                original_max_position_embeddings: s
                    .usize_or("original_max_position_embeddings", 8192)?,
            }),
            "longrope" => {
                let list = |key: &'static str| -> Result<Vec<f64>, ConfigError> {
                    let v = s.get(key).ok_or(ConfigError::Missing { field: key })?;
                    v.as_array()
                        .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| ConfigError::FieldType {
                            field: format!("rope_scaling.{key}"),
                            expected: "a list of numbers",
                            found: v.to_string(),
                        })
                };
                Some(RopeScaling::LongRope {
                    short_factor: list("short_factor")?,
                    long_factor: list("long_factor")?,
                    original_max_position_embeddings: match original_max {
                        Some(n) => n,
                        None => max_positions.ok_or(ConfigError::Missing {
                            field: "max_position_embeddings",
                        })?,
                    },
                    attention_factor: s.opt_f64("attention_factor")?,
                })
            }
            other => unreachable!("rope type {other} was checked against the allowed ones"),
        })
    }

    /// The number of leading dimensions of each head that rotate.
    pub fn rotary_dim(&self, head_dim: usize) -> usize {
        (head_dim as f64 * self.partial_rotary_factor) as usize
    }

    pub(crate) fn validate(&self, head_dim: usize) -> Result<(), ConfigError> {
        let dim = self.rotary_dim(head_dim);
        if dim < 2 || !dim.is_multiple_of(2) || dim > head_dim {
            return Err(ConfigError::RotaryDim(dim));
        }
        if let Some(RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        }) = &self.scaling
        {
            for (field, list) in [
                ("rope_scaling.short_factor", short_factor),
                ("rope_scaling.long_factor", long_factor),
            ] {
                if list.len() != dim / 2 {
                    return Err(ConfigError::Length {
                        field,
                        found: list.len(),
                        expected: dim / 2,
                        what: "rotary frequencies (head_dim × partial_rotary_factor / 2)",
                    });
                }
            }
        }
        Ok(())
    }

    /// `rope_scaling` as config.json spells it.
    pub fn scaling_json(&self) -> serde_json::Value {
        use serde_json::json;
        match &self.scaling {
            None => serde_json::Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Dynamic { factor }) => {
                json!({"rope_type": "dynamic", "factor": factor})
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
                mscale,
                mscale_all_dim,
            }) => {
                let mut v = json!({
                    "rope_type": "yarn", "factor": factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                    "beta_fast": beta_fast, "beta_slow": beta_slow, "truncate": truncate,
                });
                for (key, value) in [
                    ("attention_factor", attention_factor),
                    ("mscale", mscale),
                    ("mscale_all_dim", mscale_all_dim),
                ] {
                    if let Some(x) = value {
                        v[key] = json!(x);
                    }
                }
                v
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings}),
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                attention_factor,
                ..
            }) => {
                let mut v = json!({"rope_type": "longrope", "short_factor": short_factor,
                    "long_factor": long_factor});
                if let Some(a) = attention_factor {
                    v["attention_factor"] = json!(a);
                }
                v
            }
        }
    }

    /// The inverse frequencies (length `rotary_dim / 2`) and the factor cos and sin are
    /// multiplied by, for a call whose positions end at `seq_len` (dynamic NTK and LongRoPE
    /// depend on it; transformers decides per forward from `max(position_ids) + 1`).
    /// `max_positions` is the model's `max_position_embeddings`.
    pub fn inv_freq(
        &self,
        head_dim: usize,
        max_positions: usize,
        seq_len: usize,
    ) -> (Vec<f64>, f64) {
        let d = self.rotary_dim(head_dim);
        let powers = |base: f64| -> Vec<f64> {
            (0..d / 2)
                .map(|i| base.powf((2 * i) as f64 / d as f64))
                .collect()
        };
        let base: Vec<f64> = powers(self.theta).iter().map(|p| 1.0 / p).collect();
        match &self.scaling {
            None => (base, 1.0),
            Some(RopeScaling::Linear { factor }) => {
                (base.iter().map(|f| f / factor).collect(), 1.0)
            }
            Some(RopeScaling::Dynamic { factor }) => {
                let original = max_positions as f64;
                let seq = (seq_len.max(max_positions)) as f64;
                let theta = self.theta
                    * ((factor * seq / original) - (factor - 1.0))
                        .powf(d as f64 / (d as f64 - 2.0));
                (powers(theta).iter().map(|p| 1.0 / p).collect(), 1.0)
            }
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
                mscale,
                mscale_all_dim,
            }) => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(all)) if *m != 0.0 && *all != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *all)
                    }
                    _ => get_mscale(*factor, 1.0),
                };
                let original = *original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    (d as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let freqs = base
                    .iter()
                    .enumerate()
                    .map(|(i, &extrapolated)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        let interpolated = extrapolated / factor;
                        interpolated * (1.0 - keep) + extrapolated * keep
                    })
                    .collect();
                (freqs, attention)
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f64;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                let freqs = base
                    .iter()
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
                    .collect();
                (freqs, 1.0)
            }
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            }) => {
                let original = *original_max_position_embeddings;
                let factor = max_positions as f64 / original as f64;
                let attention = attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (original as f64).ln()).sqrt()
                });
                let ext = if seq_len > original {
                    long_factor
                } else {
                    short_factor
                };
                let freqs = base.iter().zip(ext).map(|(f, e)| f / e).collect();
                (freqs, attention)
            }
        }
    }

    /// `cos` and `sin` of `positions` (each `[positions.len(), rotary_dim]`, flat, each half
    /// repeated as transformers' `cat((freqs, freqs), -1)`), for a call whose positions end
    /// at `seq_len`.
    pub fn tables(
        &self,
        head_dim: usize,
        max_positions: usize,
        positions: impl Iterator<Item = usize>,
        seq_len: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (inv_freq, attention) = self.inv_freq(head_dim, max_positions, seq_len);
        // transformers holds the frequencies and the angles in f32.
        let inv_freq: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
        let attention = attention as f32;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in positions {
            for f in inv_freq.iter().chain(&inv_freq) {
                let angle = p as f32 * f;
                cos.push(angle.cos() * attention);
                sin.push(angle.sin() * attention);
            }
        }
        (cos, sin)
    }
}
