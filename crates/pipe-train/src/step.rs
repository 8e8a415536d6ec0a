//! One optimizer step over an effective batch of micro-batches: token-exact loss
//! normalisation across them, global-norm gradient clipping, AdamW.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, FloatDType, Int, Tensor, TensorData};
use pipe_model::{shifted_cross_entropy, CausalLm};

use crate::nodes::{NodeError, NodeGroup};
use crate::optimizer::{compensated_adamw, CompensatedAdamW};
use serde::{Deserialize, Serialize};

/// Token ids and labels (-100: not learned) of one micro-batch, `[batch][seq]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MicroBatch {
    pub input_ids: Vec<Vec<i64>>,
    pub labels: Vec<Vec<i64>>,
    /// 1 for tokens, 0 for padding; `None`: no padding.
    pub attention_mask: Option<Vec<Vec<u8>>>,
    /// Packed rows: every token's position and which example it belongs to (from 1; -1 for
    /// padding), so that examples do not attend to each other (see `CausalLm::hidden_packed`).
    pub packing: Option<Packing>,
}

/// Where the examples of packed rows are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Packing {
    pub positions: Vec<Vec<usize>>,
    pub segments: Vec<Vec<i32>>,
}

impl MicroBatch {
    /// Labels that count in the loss (after the shift: positions 1..).
    pub fn target_tokens(&self) -> usize {
        self.labels
            .iter()
            .map(|r| r[1..].iter().filter(|&&l| l >= 0).count())
            .sum()
    }
}

/// AdamW's settings (PyTorch's meaning; burn's defaults differ, so all are explicit).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Mean loss over every target token of the effective batch.
    pub loss: f64,
    /// The global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
}

/// AdamW (burn's for f32 weights; compensated for bf16 ones, see [`crate::optimizer`]).
pub type Optim<B> = OptimizerAdaptor<CompensatedAdamW, CausalLm<B>, B>;

pub fn adamw<B: AutodiffBackend>(s: &AdamWSettings) -> Optim<B> {
    compensated_adamw(s)
}

fn ids<B: AutodiffBackend>(rows: &[Vec<i64>], device: &B::Device) -> Tensor<B, 2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    Tensor::from_data(
        TensorData::new(rows.iter().flatten().copied().collect::<Vec<i64>>(), [b, s]),
        device,
    )
}

/// Runs forward and backward over `batches` and one AdamW update at `lr`.
pub fn train_step<B: AutodiffBackend>(
    model: CausalLm<B>,
    optim: &mut Optim<B>,
    batches: &[MicroBatch],
    lr: f64,
    max_grad_norm: Option<f64>,
) -> (CausalLm<B>, StepStats) {
    let device = model.embed_tokens.val().device();
    train_step_parallel(model, optim, batches, &[device], lr, max_grad_norm)
}

/// [`train_step`] with data parallelism: one replica of the model per entry of `replicas` (a
/// device may appear more than once: two replicas on the CPU use both its cores), micro-batch
/// `i` runs on replica `i % replicas.len()`, and the gradients are summed on the model's own
/// device in replica order before the one update. With one replica this is `train_step` itself,
/// bit for bit; with more, the sum runs in another order (equal to float rounding).
pub fn train_step_parallel<B: AutodiffBackend>(
    model: CausalLm<B>,
    optim: &mut Optim<B>,
    batches: &[MicroBatch],
    replicas: &[B::Device],
    lr: f64,
    max_grad_norm: Option<f64>,
) -> (CausalLm<B>, StepStats) {
    train_step_on_nodes(model, optim, batches, replicas, None, lr, max_grad_norm)
        .expect("one node does not talk to others")
}

/// [`train_step_parallel`] across the nodes of `group` as well: node `k`'s replica `j` is
/// replica `k × replicas.len() + j` of the whole run, each node sums its replicas' gradients,
/// and the nodes add their sums around a ring in a fixed order (see [`crate::nodes`]); every
/// node then makes the same update. Without a group, one node.
pub fn train_step_on_nodes<B: AutodiffBackend>(
    model: CausalLm<B>,
    optim: &mut Optim<B>,
    batches: &[MicroBatch],
    replicas: &[B::Device],
    group: Option<&NodeGroup>,
    lr: f64,
    max_grad_norm: Option<f64>,
) -> Result<(CausalLm<B>, StepStats), NodeError> {
    let device = model.embed_tokens.val().device();
    let total: usize = batches.iter().map(MicroBatch::target_tokens).sum();
    let local = replicas.len().max(1);
    let (nodes, rank) = group.map_or((1, 0), |g| (g.nodes(), g.rank()));
    let all = nodes * local;
    // The micro-batches of each of this node's replicas.
    let mine = |j: usize| batches.iter().skip(rank * local + j).step_by(all);
    let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
    let mut loss = 0f64;
    if local == 1 || batches.len() <= 1 {
        let (grads, part) = forward_backward(&model, mine(0), total);
        loss += part;
        acc.accumulate(&model, grads);
    } else {
        let n = local.min(batches.len());
        let results: Vec<(GradientsParams, f64)> = std::thread::scope(|scope| {
            let workers: Vec<_> = replicas[..n]
                .iter()
                .enumerate()
                .map(|(w, replica_device)| {
                    // A fork is a fresh leaf per parameter (same ids), so each replica's graph
                    // is its own and the backward passes do not wait for one another.
                    let replica = model.clone().fork(replica_device);
                    let batches = mine(w);
                    scope.spawn(move || forward_backward(&replica, batches, total))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a training replica panicked"))
                .collect()
        });
        for (grads, part) in results {
            loss += part;
            acc.accumulate(&model, grads.to_device(&device, &model));
        }
    }
    let mut grads = acc.grads();
    if let Some(group) = group {
        let mut sum = SumOverNodes::<B> {
            grads: &mut grads,
            group,
            error: None,
            _b: std::marker::PhantomData,
        };
        model.visit(&mut sum);
        if let Some(e) = sum.error {
            return Err(e);
        }
        let mut l = [loss];
        group.sum_f64(&mut l)?;
        loss = l[0];
    }
    let grad_norm = global_norm(&model, &grads);
    if let Some(max) = max_grad_norm {
        let coef = max / (grad_norm + 1e-6);
        if coef < 1.0 {
            model.visit(&mut Scale::<B> {
                grads: &mut grads,
                factor: coef,
                _b: std::marker::PhantomData,
            });
        }
    }
    let model = optim.step(lr, model, grads);
    Ok((
        model,
        StepStats {
            loss,
            grad_norm,
            tokens: total,
        },
    ))
}

/// Replaces each gradient by its sum over the nodes, parameter by parameter in the model's
/// order (the same on every node), so that no second copy of all gradients is ever held. A
/// node without micro-batches this step (the last, short batch of an epoch) adds zeros; a
/// parameter that no node has a gradient for stays without one, as on one node.
struct SumOverNodes<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    group: &'a NodeGroup,
    error: Option<NodeError>,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SumOverNodes<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if self.error.is_some() {
            return;
        }
        let value = p.val();
        if !value.is_require_grad() {
            return;
        }
        let (shape, device) = (value.shape(), value.device());
        let own = self.grads.remove::<B::InnerBackend, D>(p.id);
        let had = own.is_some();
        // The gradient (zeros if this node has none), then 1 if it has one, else 0.
        let mut values: Vec<f32> = match own {
            Some(g) => g
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 gradient"),
            None => vec![0.0; shape.num_elements()],
        };
        values.push(f32::from(u8::from(had)));
        if let Err(e) = self.group.sum_f32(&mut values) {
            self.error = Some(e);
            return;
        }
        if values.pop().is_some_and(|had| had > 0.0) {
            self.grads.register::<B::InnerBackend, D>(
                p.id,
                Tensor::from_data(TensorData::new(values, shape), &device),
            );
        }
    }
}

/// The summed gradients of `batches` on `model`'s device, each micro-batch's loss divided by
/// the effective batch's `total` target tokens, and the sum of those losses.
fn forward_backward<'a, B: AutodiffBackend>(
    model: &CausalLm<B>,
    batches: impl Iterator<Item = &'a MicroBatch>,
    total: usize,
) -> (GradientsParams, f64) {
    let device = model.embed_tokens.val().device();
    let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
    let mut loss = 0f64;
    for mb in batches {
        let input_ids = ids::<B>(&mb.input_ids, &device);
        let logits = match &mb.packing {
            Some(p) => model.logits(model.hidden_packed(input_ids, &p.positions, &p.segments)),
            None => model.forward(input_ids, mb.attention_mask.as_deref()),
        };
        let (sum, _) = shifted_cross_entropy(logits, &mb.labels);
        // Each micro-batch's summed loss over the whole effective batch's token count, so the
        // accumulated gradient is that of the mean over every target token.
        let part = sum / total.max(1) as f64;
        loss += part.clone().into_scalar().elem::<f64>();
        let grads = GradientsParams::from_grads(part.backward(), model);
        acc.accumulate(model, grads);
    }
    (acc.grads(), loss)
}

/// The L2 norm of all gradients together (`torch.nn.utils.clip_grad_norm_`'s).
pub fn global_norm<B: AutodiffBackend>(model: &CausalLm<B>, grads: &GradientsParams) -> f64 {
    let mut v = SquaredNorm::<B> {
        grads,
        sum: 0.0,
        _b: std::marker::PhantomData,
    };
    model.visit(&mut v);
    v.sum.sqrt()
}

struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: f64,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(p.id) {
            // bf16 gradients (of bf16 weights) are squared and summed in f32.
            let g = g.cast(FloatDType::F32);
            self.sum += g.powi_scalar(2).sum().into_scalar().elem::<f64>();
        }
    }
}

struct Scale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: f64,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(p.id) {
            self.grads
                .register::<B::InnerBackend, D>(p.id, g * self.factor);
        }
    }
}

/// The model without its autodiff graph, for evaluation.
pub fn for_inference<B: AutodiffBackend>(model: &CausalLm<B>) -> CausalLm<B::InnerBackend> {
    model.valid()
}
