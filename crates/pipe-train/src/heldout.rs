//! Evaluation during training, as transformers' Trainer does it: held-out loss every
//! `eval_steps` steps (`evaluation_strategy="steps"`), the weights of the step with the lowest
//! held-out loss kept and published at the end (`load_best_model_at_end`), and a stop after
//! `early_stopping_patience` evaluations without a lower loss (`EarlyStoppingCallback`).
//!
//! Resume-exact: the best loss so far and the evaluations since are part of the checkpoint
//! state, and the best weights are kept as `best-<step>/` in the work directory until no
//! checkpoint refers to them, so a run resumed from any checkpoint publishes what an
//! uninterrupted run publishes.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use pipe_data::dataset::Dataset;
use pipe_model::CausalLm;
use serde::{Deserialize, Serialize};

use crate::step::for_inference;

/// What a run evaluates, and what it does with the results.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalSettings {
    /// Held-out loss every this many steps, and at the last step.
    pub every: Option<u64>,
    /// Publish the weights of the step with the lowest held-out loss, not the last step's.
    pub keep_best: bool,
    /// Stop after this many evaluations in a row without a lower held-out loss.
    pub early_stopping_patience: Option<u64>,
}

/// The lowest held-out loss so far, and its step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub step: u64,
    pub loss: f64,
}

/// Where evaluation stands (part of a checkpoint's state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalState {
    pub best: Option<Best>,
    /// Evaluations since the best one.
    pub since_best: u64,
}

/// What one evaluation concluded.
pub struct Evaluated {
    pub loss: f64,
    /// This step has the lowest held-out loss so far.
    pub improved: bool,
    /// The patience ran out: training stops here.
    pub stop: bool,
}

impl EvalSettings {
    /// Whether step `step` of `total` is evaluated.
    pub fn due(&self, step: u64, total: u64) -> bool {
        self.every
            .is_some_and(|k| k > 0 && (step.is_multiple_of(k) || step == total))
    }
}

/// The held-out loss of `model` on `data`, `batch_size` examples at a time (no gradients).
pub fn heldout_loss<B: AutodiffBackend>(
    model: &CausalLm<B>,
    data: &Dataset,
    batch_size: usize,
    device: &B::Device,
) -> Result<f64, pipe_eval::EvalError> {
    let model = for_inference(model);
    let held =
        pipe_eval::perplexity::heldout_loss(&model, data, batch_size, device, &mut |_| true)?;
    Ok(held.loss)
}

impl EvalState {
    /// Takes the loss of `step` into account.
    pub fn record(&mut self, settings: &EvalSettings, step: u64, loss: f64) -> Evaluated {
        let improved = self.best.is_none_or(|b| loss < b.loss);
        if improved {
            self.best = Some(Best { step, loss });
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        let stop = settings
            .early_stopping_patience
            .is_some_and(|k| self.since_best >= k);
        Evaluated {
            loss,
            improved,
            stop,
        }
    }
}

/// The directory that keeps the weights of step `step` while it is the best.
pub fn best_dir(work: &Path, step: u64) -> PathBuf {
    work.join(format!("best-{step}"))
}

/// The steps of the `best-<step>` directories in `work`.
pub fn best_dirs(work: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(work) else {
        return Vec::new();
    };
    let mut steps: Vec<u64> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("best-")?.parse().ok())
        .collect();
    steps.sort();
    steps
}

/// Removes the `best-<step>` directories that `keep` does not name.
pub fn prune_best_dirs(work: &Path, keep: &[u64]) -> std::io::Result<()> {
    for step in best_dirs(work) {
        if !keep.contains(&step) {
            std::fs::remove_dir_all(best_dir(work, step))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patience_counts_evaluations_without_a_lower_loss() {
        let settings = EvalSettings {
            every: Some(2),
            keep_best: true,
            early_stopping_patience: Some(2),
        };
        let mut state = EvalState::default();
        let seen: Vec<(bool, bool)> =
            [(2, 3.0), (4, 2.0), (6, 2.0), (8, 1.5), (10, 1.6), (12, 1.7)]
                .into_iter()
                .map(|(step, loss)| {
                    let e = state.record(&settings, step, loss);
                    (e.improved, e.stop)
                })
                .collect();
        // An equal loss is no improvement, as for EarlyStoppingCallback (threshold 0).
        assert_eq!(
            seen,
            [
                (true, false),
                (true, false),
                (false, false),
                (true, false),
                (false, false),
                (false, true)
            ]
        );
        assert_eq!(state.best, Some(Best { step: 8, loss: 1.5 }));
    }

    #[test]
    fn every_kth_step_and_the_last_are_evaluated() {
        let s = EvalSettings {
            every: Some(3),
            ..Default::default()
        };
        let due: Vec<u64> = (1..=8).filter(|&step| s.due(step, 8)).collect();
        assert_eq!(due, [3, 6, 8]);
        assert!(!EvalSettings::default().due(3, 8));
    }
}
