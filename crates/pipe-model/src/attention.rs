//! Attention over long rows, a block of queries at a time, with its own backward pass.
//!
//! burn 0.21's autodiff holds every head's seq × seq scores (and, composed, their masked sum,
//! exponentials and probabilities) from the forward pass to the backward pass of a layer:
//! Llama-2-7B at 4096 tokens would keep 8 GiB a layer per row. Here the queries are taken in
//! blocks of rows whose scores stay within [`BLOCK_SCORE_BYTES`]; each block's scores are
//! computed against every key, so its softmax is exact (no running maximum, no rescaling), and
//! dropped once the block's output is made. The backward pass keeps only q, k and v and
//! computes each block's probabilities again (FlashAttention's trade: one more `q·kᵀ` and
//! softmax for the memory of the scores):
//!
//! ```text
//! p = softmax(z + mask),  z = q·kᵀ · scale  (soft-capped: c · tanh(q·kᵀ · scale / c))
//! dv += pᵀ·do,  dp = do·vᵀ,  dz = p ⊙ (dp − Σ_row dp ⊙ p)
//! ds = dz · scale  (soft-capped: dz · (1 − tanh²) · scale)
//! dq = ds·k,  dk += dsᵀ·q
//! ```
//!
//! Rows whose scores fit the budget whole keep the one-block path of [`crate::model`], so short
//! rows (every reference fixture) compute exactly what they did. The choice is a function of
//! the shapes alone, so a layer recomputed under gradient checkpointing takes the path its
//! first pass took.
//!
//! The op with its own backward pass needs the backend under autodiff by name (burn's backend
//! traits have no hook for it): burn-flex, and CUDA when built with the `cuda` feature. Any
//! other autodiff backend takes burn's composition of the same blocks, which is exact too but
//! keeps every block's scores.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::kernels::{self, same_type};
use crate::model::{matmul_at, MatmulPrecision};

/// The most bytes one block of queries' scores take (f32, every head of every row).
pub const BLOCK_SCORE_BYTES: usize = 64 << 20;

/// The query rows a block takes when `batch` rows of `heads` heads, `s` queries against `t`
/// keys, hold more than [`BLOCK_SCORE_BYTES`] of scores; `None` when they fit whole.
pub fn query_block_rows(batch: usize, heads: usize, s: usize, t: usize) -> Option<usize> {
    let per_query = batch * heads * t * 4;
    (per_query * s > BLOCK_SCORE_BYTES).then(|| (BLOCK_SCORE_BYTES / per_query.max(1)).max(1))
}

/// How the scores are formed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// Multiplies `q·kᵀ`.
    pub scale: f64,
    /// Scores become `c · tanh(s / c)` before the mask.
    pub softcap: Option<f64>,
    /// Of the products `q·kᵀ` and `p·v`, and of their gradients.
    pub precision: MatmulPrecision,
}

/// `softmax(scores(q, k) + mask) · v`, `block` query rows at a time.
///
/// `q`: `[batch, heads, s, head_dim]`; `k`, `v`: `[batch, kv_heads, t, head_dim]`, query head
/// `i` reading key/value head `i / (heads / kv_heads)`; `mask`: additive, `[rows, 1, s, t]`,
/// the rows (1 or batch) dividing batch·heads, row `r` serving the `batch·heads / rows`
/// consecutive heads from `r` on; it takes no gradient. → `[batch, heads, s, head_dim]`.
pub fn attention_in_blocks<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4>,
    scores: Scores,
    block: usize,
) -> Tensor<B, 4> {
    let op = BlockAttention {
        scores,
        block: block.max(1),
    };
    if autodiff_over::<B, Flex>() {
        return op.tracked::<B, Flex>(q, k, v, mask);
    }
    #[cfg(feature = "cuda")]
    if autodiff_over::<B, burn::backend::Cuda<f32, i32>>() {
        return op.tracked::<B, burn::backend::Cuda<f32, i32>>(q, k, v, mask);
    }
    op.output(q, k, v, mask)
}

fn autodiff_over<B: Backend, I: Backend>() -> bool {
    TypeId::of::<FloatTensor<B>>() == TypeId::of::<FloatTensor<Autodiff<I>>>()
}

fn primitive<B: Backend>(t: Tensor<B, 4>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn tensor<B: Backend>(p: FloatTensor<B>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

#[derive(Clone, Copy, Debug)]
struct BlockAttention {
    scores: Scores,
    block: usize,
}

/// One block's probabilities, and (soft-capped) `tanh` of its scaled scores.
struct BlockProbs<B: Backend> {
    /// `[batch, heads, rows, t]`
    probs: Tensor<B, 4>,
    tanh: Option<Tensor<B, 4>>,
}

impl BlockAttention {
    /// The query rows of each block: `(first, count)`.
    fn blocks(&self, s: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..s)
            .step_by(self.block)
            .map(move |start| (start, self.block.min(s - start)))
    }

    /// `q_block` `[batch, heads, rows, d]` against `k` `[batch, kv_heads, t, d]`.
    fn probs<B: Backend>(
        &self,
        q_block: Tensor<B, 4>,
        k: &Tensor<B, 4>,
        mask_block: Tensor<B, 4>,
    ) -> BlockProbs<B> {
        let [b, h, rows, d] = q_block.dims();
        let [_, kv, t, _] = k.dims();
        let grouped = q_block.reshape([b, kv, h / kv * rows, d]);
        let raw = matmul_at(self.scores.precision, grouped, k.clone().swap_dims(2, 3))
            .reshape([b, h, rows, t]);
        match self.scores.softcap {
            None => BlockProbs {
                probs: kernels::masked_softmax(raw, mask_block, self.scores.scale as f32),
                tanh: None,
            },
            Some(c) => {
                let tanh = (raw * (self.scores.scale / c)).tanh();
                BlockProbs {
                    probs: kernels::masked_softmax(tanh.clone() * c, mask_block, 1.0),
                    tanh: Some(tanh),
                }
            }
        }
    }

    /// The output, untracked: `[batch, heads, s, d]`.
    fn output<B: Backend>(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let [b, h, s, d] = q.dims();
        let kv = k.dims()[1];
        let outputs = self
            .blocks(s)
            .map(|(start, rows)| {
                let p = self.probs(
                    q.clone().narrow(2, start, rows),
                    &k,
                    mask.clone().narrow(2, start, rows),
                );
                let t = p.probs.dims()[3];
                matmul_at(
                    self.scores.precision,
                    p.probs.reshape([b, kv, h / kv * rows, t]),
                    v.clone(),
                )
                .reshape([b, h, rows, d])
            })
            .collect();
        Tensor::cat(outputs, 2)
    }

    /// The gradients of q, k and v given the output's, `grad` `[batch, heads, s, d]`.
    fn gradients<B: Backend>(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Tensor<B, 4>,
        grad: Tensor<B, 4>,
    ) -> [Tensor<B, 4>; 3] {
        let [b, h, s, d] = q.dims();
        let [_, kv, t, _] = k.dims();
        let (rep, precision) = (h / kv, self.scores.precision);
        let mut dq = Vec::new();
        let mut dk: Option<Tensor<B, 4>> = None;
        let mut dv: Option<Tensor<B, 4>> = None;
        let accumulate = |sum: &mut Option<Tensor<B, 4>>, term: Tensor<B, 4>| {
            *sum = Some(match sum.take() {
                None => term,
                Some(sum) => sum + term,
            });
        };
        for (start, rows) in self.blocks(s) {
            let q_block = q.clone().narrow(2, start, rows);
            let BlockProbs { probs, tanh } =
                self.probs(q_block.clone(), &k, mask.clone().narrow(2, start, rows));
            let grouped = |x: Tensor<B, 4>, width: usize| x.reshape([b, kv, rep * rows, width]);
            let g = grouped(grad.clone().narrow(2, start, rows), d);
            accumulate(
                &mut dv,
                matmul_at(
                    precision,
                    grouped(probs.clone(), t).swap_dims(2, 3),
                    g.clone(),
                ),
            );
            let dp = matmul_at(precision, g, v.clone().swap_dims(2, 3)).reshape([b, h, rows, t]);
            let ds = match tanh {
                None => kernels::masked_softmax_grad(probs, dp, self.scores.scale as f32),
                Some(tanh) => {
                    let dz = kernels::masked_softmax_grad(probs, dp, 1.0);
                    dz * (tanh.square().neg() + 1.0) * self.scores.scale
                }
            };
            let ds = grouped(ds, t);
            dq.push(matmul_at(precision, ds.clone(), k.clone()).reshape([b, h, rows, d]));
            accumulate(
                &mut dk,
                matmul_at(precision, ds.swap_dims(2, 3), grouped(q_block, d)),
            );
        }
        let none = || unreachable!("attention has at least one query");
        [
            Tensor::cat(dq, 2),
            dk.unwrap_or_else(none),
            dv.unwrap_or_else(none),
        ]
    }

    /// The op under autodiff over `I`, whose tensors `B`'s are.
    fn tracked<B: Backend, I: Backend>(
        self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let inner =
            |t: Tensor<B, 4>| -> FloatTensor<Autodiff<I>> { same_type(Box::new(primitive(t))) };
        let (q, k, v, mask) = (inner(q), inner(k), inner(v), inner(mask));
        let state = (q.primitive, k.primitive, v.primitive, mask.primitive);
        let run = |(q, k, v, mask): &(
            FloatTensor<I>,
            FloatTensor<I>,
            FloatTensor<I>,
            FloatTensor<I>,
        )| {
            primitive(self.output(
                tensor::<I>(q.clone()),
                tensor(k.clone()),
                tensor(v.clone()),
                tensor(mask.clone()),
            ))
        };
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        let out = match Backward::<I, 3>::prepare::<NoCheckpointing>(self, nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = run(&state);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(run(&state)),
        };
        tensor(same_type(Box::new(out)))
    }
}

impl<I: Backend> Backward<I, 3> for BlockAttention {
    /// q, k, v and the mask.
    type State = (
        FloatTensor<I>,
        FloatTensor<I>,
        FloatTensor<I>,
        FloatTensor<I>,
    );

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (q, k, v, mask) = ops.state;
        let grad = grads.consume::<I>(&ops.node);
        let d = self.gradients::<I>(tensor(q), tensor(k), tensor(v), tensor(mask), tensor(grad));
        for (parent, d) in ops.parents.into_iter().zip(d) {
            if let Some(node) = parent {
                grads.register::<I>(node.id, primitive(d));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::softmax;
    use burn::tensor::{DType, Distribution, FloatDType, TensorData};

    type Cpu = Flex;
    type Tracked = Autodiff<Flex>;

    /// Batch 2, 6 query heads on 2 key/value heads, 7 queries after 2 cached positions, head
    /// dimension 4; row 1 padded at its first key.
    fn inputs<B: Backend>() -> [Tensor<B, 4>; 4] {
        let device = Default::default();
        let (b, h, kv, s, t, d) = (2, 6, 2, 7, 9, 4);
        let random = |shape: [usize; 4]| {
            let data = Tensor::<Cpu, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
                .into_data();
            Tensor::<B, 4>::from_data(data, &Default::default())
        };
        let mut mask = vec![0f32; b * s * t];
        for row in 0..b {
            for i in 0..s {
                for j in 0..t {
                    let after = j > i + (t - s);
                    let padded = row == 1 && j == 0;
                    if after || padded {
                        mask[(row * s + i) * t + j] = f32::MIN;
                    }
                }
            }
        }
        [
            random([b, h, s, d]),
            random([b, kv, t, d]),
            random([b, kv, t, d]),
            Tensor::from_data(TensorData::new(mask, [b, 1, s, t]), &Default::default()),
        ]
    }

    /// burn's composition of the whole attention at once, keys repeated for every query head.
    fn whole<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Tensor<B, 4>,
        scores: Scores,
    ) -> Tensor<B, 4> {
        let [b, h, _, d] = q.dims();
        let [_, kv, t, _] = k.dims();
        let every_head = |x: Tensor<B, 4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([b, kv, h / kv, t, d])
                .reshape([b, h, t, d])
        };
        let z = q.matmul(every_head(k).swap_dims(2, 3)) * scores.scale;
        let z = match scores.softcap {
            None => z,
            Some(c) => (z / c).tanh() * c,
        };
        softmax(z + mask, 3).matmul(every_head(v))
    }

    fn assert_close<B: Backend>(got: Tensor<B, 4>, want: Tensor<B, 4>, what: &str) {
        let (got, want) = (
            got.into_data().to_vec::<f32>().unwrap(),
            want.into_data().to_vec::<f32>().unwrap(),
        );
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{what}: differs by {worst}");
    }

    const PLAIN: Scores = Scores {
        scale: 0.5,
        softcap: None,
        precision: MatmulPrecision::F32,
    };
    const CAPPED: Scores = Scores {
        scale: 0.5,
        softcap: Some(1.5),
        precision: MatmulPrecision::F32,
    };

    #[test]
    fn blocks_of_queries_attend_as_the_whole_does() {
        for scores in [PLAIN, CAPPED] {
            let [q, k, v, mask] = inputs::<Cpu>();
            let want = whole(q.clone(), k.clone(), v.clone(), mask.clone(), scores);
            for block in [1, 3, 7, 100] {
                let got = attention_in_blocks(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    mask.clone(),
                    scores,
                    block,
                );
                assert_close(got, want.clone(), &format!("{scores:?}, blocks of {block}"));
            }
        }
    }

    #[test]
    fn blocks_of_queries_take_the_gradients_of_the_whole() {
        for scores in [PLAIN, CAPPED] {
            let [q, k, v, mask] = inputs::<Tracked>();
            let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
            // A weighted sum, so that every output element's gradient differs.
            let weights = Tensor::<Tracked, 4>::random(
                q.dims(),
                Distribution::Normal(0.0, 1.0),
                &Default::default(),
            );
            let loss = |out: Tensor<Tracked, 4>| (out * weights.clone()).sum();
            let want =
                loss(whole(q.clone(), k.clone(), v.clone(), mask.clone(), scores)).backward();
            for block in [1, 3, 7] {
                let got = loss(attention_in_blocks(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    mask.clone(),
                    scores,
                    block,
                ))
                .backward();
                for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                    assert_close(
                        x.grad(&got).unwrap(),
                        x.grad(&want).unwrap(),
                        &format!("d{name}, {scores:?}, blocks of {block}"),
                    );
                }
            }
        }
    }

    /// In f64 the CPU's fused kernels step aside, and the blocks run on burn's composed
    /// operations, as they do on CUDA.
    #[test]
    fn blocks_of_queries_on_composed_operations_take_the_gradients_of_the_whole() {
        let wide = |x: Tensor<Tracked, 4>| x.cast(FloatDType::F64);
        let narrow = |x: Tensor<Tracked, 4>| x.cast(FloatDType::F32);
        for scores in [PLAIN, CAPPED] {
            let [q, k, v, mask] = inputs::<Tracked>().map(wide);
            let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
            let weights = wide(Tensor::random(
                q.dims(),
                Distribution::Normal(0.0, 1.0),
                &Default::default(),
            ));
            let loss = |out: Tensor<Tracked, 4>| (out * weights.clone()).sum();
            let whole_out = whole(q.clone(), k.clone(), v.clone(), mask.clone(), scores);
            let want = loss(whole_out.clone()).backward();
            let out = attention_in_blocks(q.clone(), k.clone(), v.clone(), mask.clone(), scores, 3);
            assert_eq!(out.dtype(), DType::F64);
            assert_close(narrow(out.clone()), narrow(whole_out), "output in f64");
            let got = loss(out).backward();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let grad = |g| x.grad(g).unwrap().cast(FloatDType::F32);
                assert_close(
                    grad(&got),
                    grad(&want),
                    &format!("d{name} in f64, {scores:?}"),
                );
            }
        }
    }

    #[test]
    fn only_rows_whose_scores_outgrow_the_budget_are_split() {
        assert_eq!(query_block_rows(4, 32, 512, 512), Some(256));
        assert_eq!(query_block_rows(1, 32, 4096, 4096), Some(128));
        assert_eq!(query_block_rows(8, 6, 128, 128), None);
        // Exactly the budget still fits whole.
        assert_eq!(query_block_rows(1, 4, 2048, 2048), None);
        assert_eq!(query_block_rows(1, 4, 2049, 2048), Some(2048));
        // A query whose scores alone exceed the budget is a block of its own.
        assert_eq!(query_block_rows(1, 1, 4, 1 << 25), Some(1));
    }
}
