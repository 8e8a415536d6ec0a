//! Text generation with a key/value cache: greedy, or sampled with temperature and top-p
//! (nucleus) from a seeded generator.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use pipe_model::{CausalLm, KvCache};
use pipe_rand::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::EvalError;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Sampling {
    /// The most likely token (the first, on a tie).
    Greedy,
    /// Drawn from softmax(logits / temperature), restricted to the smallest set of most likely
    /// tokens whose probabilities add up to `top_p` (transformers' TopPLogitsWarper).
    Sample {
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

/// Continues `prompt` until a token of `stop` (not included in the result) or
/// `max_new_tokens`, and no further than the model's context. `stream` is a per-prompt
/// number mixed into the sampling seed, so each prompt's draw is reproducible on its own.
/// `cancelled()` is polled between tokens.
/// How much of a prompt of `prompt_len` tokens [`generate`] keeps (its last tokens, leaving room
/// for one new token) and the most tokens the sequence can reach — what its key/value cache
/// holds at the end — with a model of `max_pos` positions.
pub fn generation_length(
    prompt_len: usize,
    max_new_tokens: usize,
    max_pos: usize,
) -> (usize, usize) {
    let kept = prompt_len.min(max_pos.saturating_sub(1));
    (kept, kept + max_new_tokens.min(max_pos - kept))
}

#[allow(clippy::too_many_arguments)]
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    prompt: &[u32],
    max_new_tokens: usize,
    stop: &[u32],
    sampling: &Sampling,
    stream: u64,
    device: &B::Device,
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<u32>, EvalError> {
    let max_pos = model.config.max_position_embeddings;
    if prompt.is_empty() {
        return Err(EvalError::Task("an empty prompt".into()));
    }
    let (kept, total) = generation_length(prompt.len(), max_new_tokens, max_pos);
    let prompt = &prompt[prompt.len() - kept..];
    let budget = total - kept;
    let mut rng = match sampling {
        Sampling::Sample { seed, .. } => {
            SplitMix64::new(seed ^ stream.wrapping_mul(0xD134_2543_DE82_EF95))
        }
        Sampling::Greedy => SplitMix64::new(0),
    };
    let mut cache = KvCache::<B>::default();
    let mut next_input: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut out = Vec::new();
    while out.len() < budget {
        if cancelled() {
            return Err(EvalError::Interrupted);
        }
        let n = next_input.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(next_input, [1, n]), device);
        let logits: Vec<f32> = model
            .forward_cached(ids, &mut cache)
            .into_data()
            .to_vec()
            .map_err(|e| EvalError::Task(format!("{e:?}")))?;
        let token = choose(&logits, sampling, &mut rng);
        if stop.contains(&token) {
            break;
        }
        out.push(token);
        next_input = vec![token as i64];
    }
    Ok(out)
}

fn choose(logits: &[f32], sampling: &Sampling, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    let (temperature, top_p) = match *sampling {
        Sampling::Greedy => return argmax(),
        Sampling::Sample {
            temperature, top_p, ..
        } => (temperature, top_p),
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, ((x as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    // Most likely first; equal probabilities by token id, so the order is reproducible.
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1 / total;
        if mass >= top_p {
            break;
        }
    }
    let nucleus = &probs[..kept];
    let nucleus_total: f64 = nucleus.iter().map(|p| p.1).sum();
    let u = rng.next_f64() * nucleus_total;
    let mut acc = 0.0;
    for p in nucleus {
        acc += p.1;
        if u < acc {
            return p.0 as u32;
        }
    }
    nucleus[kept - 1].0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = SplitMix64::new(0);
        assert_eq!(
            choose(&[0.0, 3.0, 3.0, 1.0], &Sampling::Greedy, &mut rng),
            1
        );
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ∝ e^x: token 2 alone holds > 90% of the mass.
        let logits = [0.0, 1.0, 6.0, 0.5];
        let s = Sampling::Sample {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
        };
        let mut rng = SplitMix64::new(7);
        for _ in 0..200 {
            assert_eq!(choose(&logits, &s, &mut rng), 2);
        }
        // With the whole distribution, the others appear too, in proportion.
        let s = Sampling::Sample {
            temperature: 1.0,
            top_p: 1.0,
            seed: 7,
        };
        let draws: Vec<u32> = (0..2000).map(|_| choose(&logits, &s, &mut rng)).collect();
        let other = draws.iter().filter(|&&t| t != 2).count() as f64 / 2000.0;
        let expected =
            (1.0 + 1f64.exp() + 0.5f64.exp()) / (1.0 + 1f64.exp() + 6f64.exp() + 0.5f64.exp());
        assert!((other - expected).abs() < 0.02, "{other} vs {expected}");
    }

    #[test]
    fn a_generation_stays_within_the_model_s_positions() {
        assert_eq!(generation_length(10, 5, 100), (10, 15));
        assert_eq!(generation_length(10, 500, 100), (10, 100));
        // A long prompt keeps its last tokens, with room for one new token.
        assert_eq!(generation_length(200, 5, 100), (99, 100));
    }
}
