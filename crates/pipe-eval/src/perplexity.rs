//! Loss and perplexity on held-out examples, over their labelled tokens only (the response
//! tokens of an instruction set, as training counts them).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use pipe_data::dataset::Dataset;
use pipe_model::CausalLm;
use serde::Serialize;

use crate::{EvalError, ForwardPass};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HeldOut {
    pub examples: usize,
    /// Tokens counted (labels other than -100, after the shift).
    pub tokens: usize,
    /// Mean negative log-likelihood per counted token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
}

/// The forward passes [`heldout_loss`] makes over `data` with a model of `max_len` positions:
/// what the memory plan sizes before the model is loaded.
pub fn heldout_passes(data: &Dataset, batch_size: usize, max_len: usize) -> Vec<ForwardPass> {
    batches(data, batch_size, max_len)
        .into_iter()
        .map(|(batch, seq)| ForwardPass {
            rows: batch.len(),
            seq,
            scored: batch
                .iter()
                .map(|&i| labelled_positions(data, i, seq).count())
                .sum(),
            packed: false,
        })
        .filter(|p| p.seq > 0 && p.scored > 0)
        .collect()
}

/// Examples one by one, packed or not (the loss of each is its own), longest first,
/// `batch_size` at a time; each batch with its row length, at most `max_len`.
fn batches(data: &Dataset, batch_size: usize, max_len: usize) -> Vec<(Vec<usize>, usize)> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(data.example(i).0.len()));
    order
        .chunks(batch_size.max(1))
        .map(|batch| (batch.to_vec(), data.example(batch[0]).0.len().min(max_len)))
        .collect()
}

/// The positions of example `i` (in a row of `seq` tokens) whose logits are scored: those
/// followed by a label, as training counts them.
fn labelled_positions(data: &Dataset, i: usize, seq: usize) -> impl Iterator<Item = usize> + '_ {
    let (input, labels) = data.example(i);
    let n = input.len().min(seq);
    (0..n.saturating_sub(1)).filter(move |&t| labels[t + 1] >= 0)
}

/// Token-weighted mean cross-entropy of `data`'s examples, `batch_size` at a time: the logits
/// at position t are scored against the label at t + 1, as in training. `on_batch(n)` reports
/// progress; returning `false` stops with [`EvalError::Interrupted`].
pub fn heldout_loss<B: Backend>(
    model: &CausalLm<B>,
    data: &Dataset,
    batch_size: usize,
    device: &B::Device,
    on_batch: &mut dyn FnMut(usize) -> bool,
) -> Result<HeldOut, EvalError> {
    let mut total = 0.0f64;
    let mut tokens = 0usize;
    for (batch, seq) in batches(data, batch_size, model.config.max_position_embeddings) {
        let mut ids = vec![0i64; batch.len() * seq];
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (bi, &i) in batch.iter().enumerate() {
            let (input, labels) = data.example(i);
            for (t, &id) in input.iter().take(seq).enumerate() {
                ids[bi * seq + t] = id as i64;
            }
            for t in labelled_positions(data, i, seq) {
                rows.push((bi * seq + t) as i64);
                targets.push(labels[t + 1] as i64);
            }
        }
        if !rows.is_empty() && seq > 0 {
            let ids =
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch.len(), seq]), device);
            let hidden = model.hidden(ids, None);
            let [b, s, h] = hidden.dims();
            let m = rows.len();
            let (picked, _) = crate::score::score_rows(
                model,
                hidden.reshape([b * s, h]),
                rows,
                &targets,
                device,
            )?;
            total -= picked.iter().map(|&x| x as f64).sum::<f64>();
            tokens += m;
        }
        if !on_batch(batch.len()) {
            return Err(EvalError::Interrupted);
        }
    }
    let loss = if tokens == 0 {
        f64::NAN
    } else {
        total / tokens as f64
    };
    Ok(HeldOut {
        examples: data.len(),
        tokens,
        loss,
        perplexity: loss.exp(),
    })
}
