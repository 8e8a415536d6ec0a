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
use crate::EvalError;

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
/// tokens from the left, as the harness does).
///
/// Consecutive requests with the same context — the choices of one item — read that context
/// once: the item becomes one packed row (the context, then every continuation attending to
/// it), which scores the same positions with a fraction of the work. Other requests are
/// batched longest first, right-padded (a causal model's earlier positions never see the
/// padding).
/// `on_batch(n)` reports progress; returning `false` stops with [`EvalError::Interrupted`].
pub fn loglikelihoods<B: Backend>(
    model: &CausalLm<B>,
    requests: &[Request],
    batch_size: usize,
    device: &B::Device,
    on_batch: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<Scored>, EvalError> {
    let max_len = model.config.max_position_embeddings;
    let mut scored = vec![
        Scored {
            loglikelihood: 0.0,
            is_greedy: true
        };
        requests.len()
    ];
    let shareable = |r: &Request| {
        !r.context.is_empty()
            && !r.continuation.is_empty()
            && r.context.len() + r.continuation.len() <= max_len + 1
    };
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut single: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < requests.len() {
        let mut j = i + 1;
        while j < requests.len() && requests[j].context == requests[i].context {
            j += 1;
        }
        if j - i >= 2 && (i..j).all(|k| shareable(&requests[k])) {
            groups.push((i..j).collect());
        } else {
            single.extend(i..j);
        }
        i = j;
    }
    score_packed(
        model,
        requests,
        &groups,
        batch_size,
        device,
        &mut scored,
        on_batch,
    )?;
    score_batched(
        model,
        requests,
        &single,
        batch_size,
        device,
        &mut scored,
        on_batch,
    )?;
    Ok(scored)
}

/// Items whose choices share a context, packed one item per row: the context once, then each
/// continuation but its last token, each seeing the context and its own earlier tokens at the
/// positions it would have alone (see [`CausalLm::hidden_packed`]). Rows go `batch_size` at a
/// time, longest first.
fn score_packed<B: Backend>(
    model: &CausalLm<B>,
    requests: &[Request],
    groups: &[Vec<usize>],
    batch_size: usize,
    device: &B::Device,
    scored: &mut [Scored],
    on_batch: &mut dyn FnMut(usize) -> bool,
) -> Result<(), EvalError> {
    struct Packed {
        ids: Vec<u32>,
        positions: Vec<usize>,
        segments: Vec<i32>,
        /// Per request of the group: (request, the row index predicting each of its tokens).
        scored: Vec<(usize, Vec<usize>)>,
    }
    let packed: Vec<Packed> = groups
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
    let mut order: Vec<usize> = (0..packed.len()).collect();
    order.sort_by(|&a, &b| {
        packed[b]
            .ids
            .len()
            .cmp(&packed[a].ids.len())
            .then(a.cmp(&b))
    });
    for batch in order.chunks(batch_size.max(1)) {
        let seq = packed[batch[0]].ids.len();
        let mut ids = vec![0i64; batch.len() * seq];
        let mut positions = Vec::with_capacity(batch.len());
        let mut segments = Vec::with_capacity(batch.len());
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (bi, &g) in batch.iter().enumerate() {
            let p = &packed[g];
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
        for &g in batch {
            for (r, at) in &packed[g].scored {
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

/// Requests scored independently, `batch_size` at a time, longest first.
fn score_batched<B: Backend>(
    model: &CausalLm<B>,
    requests: &[Request],
    which: &[usize],
    batch_size: usize,
    device: &B::Device,
    scored: &mut [Scored],
    on_batch: &mut dyn FnMut(usize) -> bool,
) -> Result<(), EvalError> {
    let max_len = model.config.max_position_embeddings;
    // What the model reads (the whole text but its last token) and how many trailing
    // positions are scored.
    let inputs: Vec<(Vec<u32>, usize)> = which
        .iter()
        .map(|&i| {
            let r = &requests[i];
            let mut whole: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
            if whole.len() > max_len + 1 {
                whole.drain(..whole.len() - (max_len + 1));
            }
            whole.pop();
            (whole, r.continuation.len().min(max_len))
        })
        .collect();
    let mut order: Vec<usize> = (0..which.len()).collect();
    order.sort_by(|&a, &b| inputs[b].0.len().cmp(&inputs[a].0.len()).then(a.cmp(&b)));
    for batch in order.chunks(batch_size.max(1)) {
        let seq = inputs[batch[0]].0.len();
        let mut ids = vec![0i64; batch.len() * seq];
        // Rows of the flattened `[batch·seq, hidden]` states that predict continuation tokens.
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (bi, &k) in batch.iter().enumerate() {
            let (tokens, n_scored) = &inputs[k];
            for (t, &id) in tokens.iter().enumerate() {
                ids[bi * seq + t] = id as i64;
            }
            let cont = &requests[which[k]].continuation;
            let cont = &cont[cont.len() - n_scored..];
            for (j, &target) in cont.iter().enumerate() {
                rows.push((bi * seq + tokens.len() - n_scored + j) as i64);
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
            for &bk in batch {
                let n = inputs[bk].1;
                scored[which[bk]] = Scored {
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
