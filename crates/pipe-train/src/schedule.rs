//! Learning-rate schedules with Hugging Face semantics: linear warm-up from 0, then cosine
//! (to 0), linear (to 0) or constant. `lr(step)` is the rate used by optimizer step `step`
//! (0-based), as `get_*_schedule_with_warmup` gives it before `scheduler.step()`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub decay: Decay,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// Warm-up steps from a ratio, as the Trainer computes them: `ceil(total · ratio)`.
    pub fn warmup_from_ratio(total_steps: u64, ratio: f64) -> u64 {
        (total_steps as f64 * ratio).ceil() as u64
    }

    pub fn lr(&self, step: u64) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        if step < w {
            return self.peak * step as f64 / w.max(1) as f64;
        }
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Linear => {
                self.peak
                    * ((t.saturating_sub(step)) as f64 / t.saturating_sub(w).max(1) as f64).max(0.0)
            }
            Decay::Cosine => {
                let progress = (step - w) as f64 / t.saturating_sub(w).max(1) as f64;
                self.peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_with_warmup_matches_transformers() {
        // get_cosine_schedule_with_warmup(opt, 1, 4) at peak 1e-3: 0, 1e-3, 7.5e-4, 2.5e-4.
        let s = Schedule {
            peak: 1e-3,
            decay: Decay::Cosine,
            warmup_steps: 1,
            total_steps: 4,
        };
        let got: Vec<f64> = (0..4).map(|i| s.lr(i)).collect();
        for (g, w) in got.iter().zip([0.0, 1e-3, 7.5e-4, 2.5e-4]) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        let l = Schedule {
            peak: 1.0,
            decay: Decay::Linear,
            warmup_steps: 2,
            total_steps: 10,
        };
        assert_eq!((l.lr(1), l.lr(2), l.lr(6), l.lr(10)), (0.5, 1.0, 0.5, 0.0));
        assert_eq!(Schedule::warmup_from_ratio(1218, 0.03), 37);
    }
}
