//! Log-likelihood scoring of (context, continuation) requests, as lm-evaluation-harness's
//! Hugging Face backend computes it, and the accuracy metrics built on it.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use pipe_model::CausalLm;
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::stats::{mean_and_stderr, Estimate};
use crate::tasks::{prefix, Doc, FewShot};
use crate::{EvalError, ForwardPass};

/// One tokenized request: the model reads `context` and is scored on `continuation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

fn encode(tok: &Tokenizer, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EvalError> {
    tok.encode_fast(text, add_special_tokens)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| EvalError::Tokenize(e.to_string()))
}

/// The harness's `_encode_pair`: whitespace at the end of the context moves to the start of
/// the continuation; the continuation's tokens are those of `context + continuation` beyond
/// the context's own encoding (so a merge across the boundary is scored as the model would
/// see it). An empty context becomes `[prefix_token]` (BOS, or EOS where there is none).
/// `add_special_tokens`: encode with the tokenizer's own special tokens (e.g. a Llama
/// tokenizer's BOS), as the harness does since v0.4.9.2; without, as it did before.
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
    prefix_token: u32,
    add_special_tokens: bool,
) -> Result<Request, EvalError> {
    if context.is_empty() {
        let mut continuation = encode(tok, continuation, add_special_tokens)?;
        // A tokenizer that adds BOS already starts the continuation with the prefix token.
        let context = if continuation.first() == Some(&prefix_token) {
            vec![continuation.remove(0)]
        } else {
            vec![prefix_token]
        };
        return Ok(Request {
            context,
            continuation,
        });
    }
    let trimmed = context.trim_end();
    let (context, continuation) = if trimmed.len() < context.len() {
        (
            trimmed.to_string(),
            format!("{}{continuation}", &context[trimmed.len()..]),
        )
    } else {
        (context.to_string(), continuation.to_string())
    };
    let whole = encode(tok, &format!("{context}{continuation}"), add_special_tokens)?;
    let context_ids = encode(tok, &context, add_special_tokens)?;
    let split = context_ids.len().min(whole.len());
    Ok(Request {
        continuation: whole[split..].to_vec(),
        context: context_ids,
    })
}

/// The log-likelihood of a request's continuation, and whether greedy decoding would have
/// produced it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scored {
    pub loglikelihood: f64,
    pub is_greedy: bool,
}

/// Scores every request: the sum over the continuation's tokens of log-softmax of the logits
/// that predict them, the model reading at most `max_len + 1` tokens (longer requests lose
/// tokens from the left, as the harness does); the choices of an item share one row
/// ([`Layout`]). `on_batch(n)` reports progress; returning `false` stops with
/// [`EvalError::Interrupted`].
pub fn loglikelihoods<B: Backend>(
    model: &CausalLm<B>,
    requests: &[Request],
    batch_size: usize,
    device: &B::Device,
    on_batch: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<Scored>, EvalError> {
    let layout = Layout::new(requests, model.config.max_position_embeddings);
    let mut scored = vec![
        Scored {
            loglikelihood: 0.0,
            is_greedy: true
        };
        requests.len()
    ];
    score_packed(
        model,
        requests,
        &layout.packed,
        batch_size,
        device,
        &mut scored,
        on_batch,
    )?;
    score_batched(
        model,
        requests,
        &layout.single,
        batch_size,
        device,
        &mut scored,
        on_batch,
    )?;
    Ok(scored)
}

/// The forward passes [`loglikelihoods`] makes for `requests` with a model of `max_len`
/// positions: what the memory plan sizes before the model is loaded.
pub fn loglikelihood_passes(
    requests: &[Request],
    batch_size: usize,
    max_len: usize,
) -> Vec<ForwardPass> {
    let layout = Layout::new(requests, max_len);
    let packed = layout
        .packed
        .chunks(batch_size.max(1))
        .map(|batch| ForwardPass {
            rows: batch.len(),
            seq: batch[0].ids.len(),
            scored: batch
                .iter()
                .flat_map(|p| &p.scored)
                .map(|(_, at)| at.len())
                .sum(),
            packed: true,
        });
    let single = layout
        .single
        .chunks(batch_size.max(1))
        .map(|batch| ForwardPass {
            rows: batch.len(),
            seq: batch[0].tokens.len(),
            scored: batch.iter().map(|r| r.scored).sum(),
            packed: false,
        });
    packed
        .chain(single)
        .filter(|p| p.seq > 0 && p.scored > 0)
        .collect()
}

/// How [`loglikelihoods`] lays requests out in rows, each kind longest first (in request
/// order among equals), to be taken `batch_size` rows at a time.
///
/// Consecutive requests with the same context — the choices of one item — read that context
/// once: the item becomes one packed row (the context, then every continuation attending to
/// it), which scores the same positions with a fraction of the work. Other requests are a row
/// each, right-padded in their batch (a causal model's earlier positions never see the
/// padding).
struct Layout {
    packed: Vec<Packed>,
    single: Vec<Single>,
}

/// The choices of one item in one row: the context once, then each continuation but its last
/// token, each seeing the context and its own earlier tokens at the positions it would have
/// alone (see [`CausalLm::hidden_packed`]).
struct Packed {
    ids: Vec<u32>,
    positions: Vec<usize>,
    segments: Vec<i32>,
    /// Per request of the group: (request, the row index predicting each of its tokens).
    scored: Vec<(usize, Vec<usize>)>,
}

/// A request read alone: what the model reads (the whole text but its last token, at most
/// `max_len + 1` tokens, losing tokens from the left as the harness does) and how many
/// trailing positions are scored.
struct Single {
    request: usize,
    tokens: Vec<u32>,
    scored: usize,
}

impl Layout {
    fn new(requests: &[Request], max_len: usize) -> Layout {
        let shareable = |r: &Request| {
            !r.context.is_empty()
                && !r.continuation.is_empty()
                && r.context.len() + r.continuation.len() <= max_len + 1
        };
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut alone: Vec<usize> = Vec::new();
        let mut i = 0;
        while i < requests.len() {
            let mut j = i + 1;
            while j < requests.len() && requests[j].context == requests[i].context {
                j += 1;
            }
            if j - i >= 2 && (i..j).all(|k| shareable(&requests[k])) {
                groups.push((i..j).collect());
            } else {
                alone.extend(i..j);
            }
            i = j;
        }
        let mut packed: Vec<Packed> = groups
            .iter()
            .map(|group| {
                let context = &requests[group[0]].context;
                let l = context.len();
                let mut p = Packed {
                    ids: context.clone(),
                    positions: (0..l).collect(),
                    segments: vec![0; l],
                    scored: Vec::new(),
                };
                for (c, &r) in group.iter().enumerate() {
                    let cont = &requests[r].continuation;
                    let start = p.ids.len();
                    let mut at = vec![l - 1];
                    for (j, &t) in cont[..cont.len() - 1].iter().enumerate() {
                        p.ids.push(t);
                        p.positions.push(l + j);
                        p.segments.push(c as i32 + 1);
                        at.push(start + j);
                    }
                    p.scored.push((r, at));
                }
                p
            })
            .collect();
        let mut single: Vec<Single> = alone
            .into_iter()
            .map(|i| {
                let r = &requests[i];
                let mut whole: Vec<u32> =
                    r.context.iter().chain(&r.continuation).copied().collect();
                if whole.len() > max_len + 1 {
                    whole.drain(..whole.len() - (max_len + 1));
                }
                whole.pop();
                Single {
                    request: i,
                    tokens: whole,
                    scored: r.continuation.len().min(max_len),
                }
            })
            .collect();
        // Stable sorts: equal lengths keep request order.
        packed.sort_by_key(|p| std::cmp::Reverse(p.ids.len()));
        single.sort_by_key(|r| std::cmp::Reverse(r.tokens.len()));
        Layout { packed, single }
    }
}

/// The packed rows, `batch_size` at a time.
fn score_packed<B: Backend>(
    model: &CausalLm<B>,
    requests: &[Request],
    packed: &[Packed],
    batch_size: usize,
    device: &B::Device,
    scored: &mut [Scored],
    on_batch: &mut dyn FnMut(usize) -> bool,
) -> Result<(), EvalError> {
    for batch in packed.chunks(batch_size.max(1)) {
        let seq = batch[0].ids.len();
        let mut ids = vec![0i64; batch.len() * seq];
        let mut positions = Vec::with_capacity(batch.len());
        let mut segments = Vec::with_capacity(batch.len());
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (bi, p) in batch.iter().enumerate() {
            for (t, &id) in p.ids.iter().enumerate() {
                ids[bi * seq + t] = id as i64;
            }
            let mut pos = p.positions.clone();
            pos.resize(seq, 0);
            let mut seg = p.segments.clone();
            seg.resize(seq, -1);
            positions.push(pos);
            segments.push(seg);
            for (r, at) in &p.scored {
                for (&row, &t) in at.iter().zip(&requests[*r].continuation) {
                    rows.push((bi * seq + row) as i64);
                    targets.push(t as i64);
                }
            }
        }
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch.len(), seq]), device);
        let hidden = model.hidden_packed(ids, &positions, &segments);
        let [b, s, h] = hidden.dims();
        let (logp, greedy) = score_rows(model, hidden.reshape([b * s, h]), rows, &targets, device)?;
        let mut k = 0;
        let mut n = 0;
        for p in batch {
            for (r, at) in &p.scored {
                let len = at.len();
                scored[*r] = Scored {
                    loglikelihood: logp[k..k + len].iter().map(|&x| x as f64).sum(),
                    is_greedy: (k..k + len).all(|i| greedy[i] == targets[i]),
                };
                k += len;
                n += 1;
            }
        }
        if !on_batch(n) {
            return Err(EvalError::Interrupted);
        }
    }
    Ok(())
}

/// The requests read alone, `batch_size` at a time.
fn score_batched<B: Backend>(
    model: &CausalLm<B>,
    requests: &[Request],
    single: &[Single],
    batch_size: usize,
    device: &B::Device,
    scored: &mut [Scored],
    on_batch: &mut dyn FnMut(usize) -> bool,
) -> Result<(), EvalError> {
    for batch in single.chunks(batch_size.max(1)) {
        let seq = batch[0].tokens.len();
        let mut ids = vec![0i64; batch.len() * seq];
        // Rows of the flattened `[batch·seq, hidden]` states that predict continuation tokens.
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (bi, r) in batch.iter().enumerate() {
            for (t, &id) in r.tokens.iter().enumerate() {
                ids[bi * seq + t] = id as i64;
            }
            let cont = &requests[r.request].continuation;
            let cont = &cont[cont.len() - r.scored..];
            for (j, &target) in cont.iter().enumerate() {
                rows.push((bi * seq + r.tokens.len() - r.scored + j) as i64);
                targets.push(target as i64);
            }
        }
        if !rows.is_empty() && seq > 0 {
            let ids =
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch.len(), seq]), device);
            let hidden = model.hidden(ids, None);
            let [b, s, h] = hidden.dims();
            let (logp, greedy) =
                score_rows(model, hidden.reshape([b * s, h]), rows, &targets, device)?;
            let mut k = 0;
            for r in batch {
                let n = r.scored;
                scored[r.request] = Scored {
                    loglikelihood: logp[k..k + n].iter().map(|&x| x as f64).sum(),
                    is_greedy: (k..k + n).all(|i| greedy[i] == targets[i]),
                };
                k += n;
            }
        }
        if !on_batch(batch.len()) {
            return Err(EvalError::Interrupted);
        }
    }
    Ok(())
}

/// Projects the chosen rows of `states` `[rows, hidden]` onto the vocabulary: the
/// log-probability of each target, and the most likely token.
pub(crate) fn score_rows<B: Backend>(
    model: &CausalLm<B>,
    states: Tensor<B, 2>,
    rows: Vec<i64>,
    targets: &[i64],
    device: &B::Device,
) -> Result<(Vec<f32>, Vec<i64>), EvalError> {
    let m = rows.len();
    let picked = states.select(
        0,
        Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [m]), device),
    );
    let logits = model.logits(picked.unsqueeze::<3>());
    let v = logits.dims()[2];
    let logp = log_softmax(logits.reshape([m, v]), 1);
    let greedy: Vec<i64> = logp
        .clone()
        .argmax(1)
        .reshape([m])
        .into_data()
        .convert::<i64>()
        .to_vec()
        .map_err(|e| EvalError::Task(format!("{e:?}")))?;
    let target = Tensor::<B, 2, Int>::from_data(TensorData::new(targets.to_vec(), [m, 1]), device);
    let logp: Vec<f32> = logp
        .gather(1, target)
        .reshape([m])
        .into_data()
        .to_vec()
        .map_err(|e| EvalError::Task(format!("{e:?}")))?;
    Ok((logp, greedy))
}

/// A multiple-choice task's results for one model.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    pub items: usize,
    pub acc: Estimate,
    /// `None` where the choices are contexts (WinoGrande).
    pub acc_norm: Option<Estimate>,
    pub per_item: Vec<ItemResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ItemResult {
    pub index: usize,
    pub gold: usize,
    pub loglikelihoods: Vec<f64>,
    pub pred: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pred_norm: Option<usize>,
}

/// The requests of every item of a task, in item order then choice order, and how many
/// belong to each item.
pub fn task_requests(
    tok: &Tokenizer,
    docs: &[Doc],
    fewshot: &FewShot,
    prefix_token: u32,
    add_special_tokens: bool,
) -> Result<(Vec<Request>, Vec<usize>), EvalError> {
    let mut requests = Vec::new();
    let mut counts = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let p = prefix(doc, docs, i, fewshot);
        let pairs = doc.requests(&p);
        counts.push(pairs.len());
        for (context, continuation) in pairs {
            requests.push(encode_pair(
                tok,
                &context,
                &continuation,
                prefix_token,
                add_special_tokens,
            )?);
        }
    }
    Ok((requests, counts))
}

/// The first index of the largest value (numpy's `argmax`).
fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// `acc`: the choice with the highest log-likelihood is the gold one; `acc_norm`: the same
/// with each log-likelihood divided by its choice's length in characters.
pub fn task_result(docs: &[Doc], scored: &[Scored], counts: &[usize]) -> TaskResult {
    let mut per_item = Vec::with_capacity(docs.len());
    let mut start = 0;
    for (doc, &n) in docs.iter().zip(counts) {
        let lls: Vec<f64> = scored[start..start + n]
            .iter()
            .map(|s| s.loglikelihood)
            .collect();
        start += n;
        let pred = argmax(lls.iter().copied());
        let pred_norm = doc
            .choice_lengths()
            .map(|lens| argmax(lls.iter().zip(&lens).map(|(ll, &len)| ll / len as f64)));
        per_item.push(ItemResult {
            index: doc.index,
            gold: doc.gold,
            loglikelihoods: lls,
            pred,
            pred_norm,
        });
    }
    let acc: Vec<f64> = per_item
        .iter()
        .map(|r| (r.pred == r.gold) as u8 as f64)
        .collect();
    let acc_norm: Option<Vec<f64>> = per_item
        .iter()
        .map(|r| r.pred_norm.map(|p| (p == r.gold) as u8 as f64))
        .collect();
    TaskResult {
        items: docs.len(),
        acc: mean_and_stderr(&acc),
        acc_norm: acc_norm.map(|v| mean_and_stderr(&v)),
        per_item,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(context: &[u32], continuation: &[u32]) -> Request {
        Request {
            context: context.to_vec(),
            continuation: continuation.to_vec(),
        }
    }

    #[test]
    fn the_passes_are_the_rows_scoring_lays_out() {
        let requests = [
            // An item of two choices: one packed row of 3 + 0 + 1 tokens, 1 + 2 scored.
            request(&[1, 2, 3], &[4]),
            request(&[1, 2, 3], &[5, 6]),
            // Another: 2 + 2 + 0 tokens, 3 + 1 scored.
            request(&[7, 8], &[9, 10, 11]),
            request(&[7, 8], &[12]),
            // Alone: reads 2 tokens, 2 scored; 4 tokens, 1 scored; 7 tokens cut to the last
            // max_len + 1 = 5, of which it reads 4, 1 scored.
            request(&[1], &[2, 3]),
            request(&[5, 5, 5, 5], &[6]),
            request(&[1, 2, 3, 4, 5, 6], &[7]),
        ];
        let pass = |rows, seq, scored, packed| ForwardPass {
            rows,
            seq,
            scored,
            packed,
        };
        assert_eq!(
            loglikelihood_passes(&requests, 2, 4),
            [
                pass(2, 4, 7, true),
                // Longest first, request order among equals.
                pass(2, 4, 2, false),
                pass(1, 2, 2, false),
            ]
        );
        let layout = Layout::new(&requests, 4);
        let order: Vec<usize> = layout.single.iter().map(|s| s.request).collect();
        assert_eq!(order, [5, 6, 4]);
        assert_eq!(loglikelihood_passes(&requests, 8, 4).len(), 2);
    }
}
