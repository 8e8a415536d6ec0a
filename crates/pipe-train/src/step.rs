//! One optimizer step over an effective batch of micro-batches: token-exact loss
//! normalisation across them, global-norm gradient clipping, AdamW.

use std::collections::HashMap;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, FloatDType, Tensor, TensorData};
use pipe_model::CausalLm;
use rayon::prelude::*;

use crate::nodes::{NodeError, NodeGroup};
use crate::optimizer::{compensated_adamw, Bf16Rounding, CompensatedAdamW};
use crate::segments::{micro_batch_gradients, Pass};
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
    /// How updates of bf16 weights are rounded (f32 weights are not rounded).
    #[serde(default)]
    pub bf16_rounding: Bf16Rounding,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bf16_rounding: Bf16Rounding::Compensated,
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

/// What a step needs besides the model, its optimizer and its data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSettings {
    pub lr: f64,
    pub max_grad_norm: Option<f64>,
    /// Recompute each layer in the backward pass instead of keeping its intermediate results
    /// (gradient checkpointing; [`crate::segments`]).
    pub recompute_layers: bool,
    /// Seeds the step's random draws (LoRA dropout), per micro-batch and layer; `None` where
    /// nothing draws.
    pub dropout_seed: Option<u64>,
}

impl StepSettings {
    /// At `lr`, clipping at `max_grad_norm`, keeping every layer's results, seeding nothing.
    pub fn plain(lr: f64, max_grad_norm: Option<f64>) -> Self {
        StepSettings {
            lr,
            max_grad_norm,
            recompute_layers: false,
            dropout_seed: None,
        }
    }
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
/// `i` runs on replica `i % replicas.len()`, and each parameter's gradients are summed in
/// replica order on the device of the replica that owns it ([`optimizer_owners`]), where its
/// AdamW state lives and its update runs. With one replica this is `train_step` itself, bit for
/// bit; with more, the sum runs in another order (equal to float rounding).
pub fn train_step_parallel<B: AutodiffBackend>(
    model: CausalLm<B>,
    optim: &mut Optim<B>,
    batches: &[MicroBatch],
    replicas: &[B::Device],
    lr: f64,
    max_grad_norm: Option<f64>,
) -> (CausalLm<B>, StepStats) {
    let settings = StepSettings::plain(lr, max_grad_norm);
    train_step_on_nodes(model, optim, batches, replicas, None, &settings)
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
    settings: &StepSettings,
) -> Result<(CausalLm<B>, StepStats), NodeError> {
    let (lr, max_grad_norm) = (settings.lr, settings.max_grad_norm);
    let device = model.embed_tokens.val().device();
    let total: usize = batches.iter().map(MicroBatch::target_tokens).sum();
    let local = replicas.len().max(1);
    let (nodes, rank) = group.map_or((1, 0), |g| (g.nodes(), g.rank()));
    let all = nodes * local;
    // The micro-batches of each of this node's replicas, with their places in the step.
    let mine = |j: usize| {
        batches
            .iter()
            .enumerate()
            .skip(rank * local + j)
            .step_by(all)
    };
    let mut loss = 0f64;
    // With several replicas, each trainable parameter's summed gradient and AdamW state live
    // on one replica's device (ZeRO stage 1), and its update runs there.
    let owners = (local > 1).then(|| optimizer_owners(&model, local));
    let mut grads = match &owners {
        None => {
            let (grads, part) = forward_backward(&model, mine(0), total, settings);
            loss += part;
            let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
            acc.accumulate(&model, grads);
            acc.grads()
        }
        Some(owners) => {
            let n = local.min(batches.len()).max(1);
            // A fork is a fresh leaf per parameter (same ids), so each replica's graph is its
            // own and the backward passes do not wait for one another.
            let forked: Vec<(usize, CausalLm<B>)> = replicas[..n]
                .iter()
                .enumerate()
                .map(|(w, device)| (w, model.clone().fork(device)))
                .collect();
            let results: Vec<(GradientsParams, f64)> = if rayon::current_num_threads() >= n {
                // As tasks of rayon's pool, the pool their matrix products and kernels split
                // into: a product's pieces are taken up by the core at hand instead of being
                // handed from the replica's thread to the pool and back, a context switch each
                // (a fifth of the default pipeline's time on two cores went to the scheduler).
                forked
                    .into_par_iter()
                    .map(|(w, replica)| forward_backward(&replica, mine(w), total, settings))
                    .collect()
            } else {
                // More replicas than the pool has threads (devices outnumbering cores): a
                // thread each, so that no replica waits for another to finish.
                std::thread::scope(|scope| {
                    let workers: Vec<_> = forked
                        .into_iter()
                        .map(|(w, replica)| {
                            let batches = mine(w);
                            scope
                                .spawn(move || forward_backward(&replica, batches, total, settings))
                        })
                        .collect();
                    workers
                        .into_iter()
                        .map(|w| w.join().expect("a training replica panicked"))
                        .collect()
                })
            };
            let mut per_replica = Vec::with_capacity(results.len());
            for (grads, part) in results {
                loss += part;
                per_replica.push(grads);
            }
            let mut sum = SumAtOwners::<B> {
                per_replica,
                owners,
                devices: replicas,
                sums: GradientsParams::new(),
            };
            model.visit(&mut sum);
            sum.sums
        }
    };
    if let Some(group) = group {
        let mut sum = SumOverNodes::<B> {
            grads: &mut grads,
            group,
            owners: owners.as_ref().map(|owners| Placement {
                owners,
                devices: replicas,
            }),
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
    let mut model = optim.step(lr, model, grads);
    if owners.is_some() {
        // Each update ran where its parameter's state lives; the weights come back together
        // on the model's device, from which the next step's replicas are forked.
        model = model.fork(&device);
    }
    Ok((
        model,
        StepStats {
            loss,
            grad_norm,
            tokens: total,
        },
    ))
}

/// Which of `replicas` replicas owns each trainable parameter: keeps its summed gradient and
/// its AdamW state, and runs its update (ZeRO stage 1, at the granularity of whole parameters).
/// The largest parameters are placed first, each on the replica with the fewest parameters so
/// far (ties: the lowest index), so every replica holds close to its share of the optimizer
/// state: at most one parameter more than an even split. The placement depends only on the
/// model's shapes and `replicas`, so every step and every resumed run places the same way.
pub fn optimizer_owners<B: AutodiffBackend>(
    model: &CausalLm<B>,
    replicas: usize,
) -> HashMap<ParamId, usize> {
    struct Trainable(Vec<(ParamId, usize)>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Trainable {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let value = p.val();
            if value.is_require_grad() {
                self.0.push((p.id, value.shape().num_elements()));
            }
        }
    }
    let mut trainable = Trainable(Vec::new());
    model.visit(&mut trainable);
    let mut params: Vec<(usize, ParamId, usize)> = trainable
        .0
        .into_iter()
        .enumerate()
        .map(|(order, (id, size))| (order, id, size))
        .collect();
    // Largest first; equal sizes in the model's order.
    params.sort_by_key(|&(order, _, size)| (std::cmp::Reverse(size), order));
    let mut load = vec![0usize; replicas.max(1)];
    params
        .into_iter()
        .map(|(_, id, size)| {
            let lightest = (0..load.len()).min_by_key(|&k| (load[k], k)).unwrap_or(0);
            load[lightest] += size;
            (id, lightest)
        })
        .collect()
}

/// Each trainable parameter's owner ([`optimizer_owners`]) and the replicas' devices.
struct Placement<'a, B: AutodiffBackend> {
    owners: &'a HashMap<ParamId, usize>,
    devices: &'a [B::Device],
}

impl<B: AutodiffBackend> Placement<'_, B> {
    fn device_of(&self, id: ParamId) -> Option<B::Device> {
        self.owners.get(&id).map(|&k| self.devices[k].clone())
    }
}

/// Sums each owned parameter's gradients over the replicas, in replica order, on its owner's
/// device, taking them out of the replicas' sets one parameter at a time.
struct SumAtOwners<'a, B: AutodiffBackend> {
    per_replica: Vec<GradientsParams>,
    owners: &'a HashMap<ParamId, usize>,
    devices: &'a [B::Device],
    sums: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SumAtOwners<'_, B> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let Some(&owner) = self.owners.get(&p.id) else {
            return;
        };
        let device = &self.devices[owner];
        let mut sum: Option<Tensor<B::InnerBackend, D>> = None;
        for grads in &mut self.per_replica {
            if let Some(g) = grads.remove::<B::InnerBackend, D>(p.id) {
                let g = g.to_device(device);
                sum = Some(match sum {
                    Some(s) => s + g,
                    None => g,
                });
            }
        }
        if let Some(sum) = sum {
            self.sums.register::<B::InnerBackend, D>(p.id, sum);
        }
    }
}

/// Replaces each gradient by its sum over the nodes, parameter by parameter in the model's
/// order (the same on every node), so that no second copy of all gradients is ever held. A
/// node without micro-batches this step (the last, short batch of an epoch) adds zeros; a
/// parameter that no node has a gradient for stays without one, as on one node.
struct SumOverNodes<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    group: &'a NodeGroup,
    /// Where each parameter's gradient lives with several replicas; else on the parameter's
    /// own device.
    owners: Option<Placement<'a, B>>,
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
        let shape = value.shape();
        let device = self
            .owners
            .as_ref()
            .and_then(|o| o.device_of(p.id))
            .unwrap_or_else(|| value.device());
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

/// The summed gradients of `batches` (each with its place in the step) on `model`'s device,
/// each micro-batch's loss divided by the effective batch's `total` target tokens, and the sum
/// of those losses.
fn forward_backward<'a, B: AutodiffBackend>(
    model: &CausalLm<B>,
    batches: impl Iterator<Item = (usize, &'a MicroBatch)>,
    total: usize,
    settings: &StepSettings,
) -> (GradientsParams, f64) {
    let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
    let mut loss = 0f64;
    for (place, mb) in batches {
        let pass = Pass {
            recompute_layers: settings.recompute_layers,
            dropout_seed: settings
                .dropout_seed
                .map(|seed| seed.wrapping_add((place as u64).wrapping_mul(0x2545_f491_4f6c_dd1d))),
        };
        let (grads, part) = micro_batch_gradients(model, mb, total, pass);
        loss += part;
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use pipe_model::{init_model, LoraSpec, ModelConfig, Targets};

    type B = Autodiff<pipe_model::CpuBackend>;

    fn tiny() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64}"#,
        )
        .unwrap()
    }

    /// (id, elements) of every trainable parameter, in the model's order.
    fn trainable(model: &CausalLm<B>) -> Vec<(ParamId, usize)> {
        struct Collect(Vec<(ParamId, usize)>);
        impl ModuleVisitor<B> for Collect {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                if p.val().is_require_grad() {
                    self.0.push((p.id, p.val().shape().num_elements()));
                }
            }
        }
        let mut c = Collect(Vec::new());
        model.visit(&mut c);
        c.0
    }

    #[test]
    fn every_trainable_parameter_has_one_owner_and_the_shares_are_even() {
        let full: CausalLm<B> = init_model(&tiny(), 3, 0.02, &Default::default(), true);
        let lora = init_model::<B>(&tiny(), 3, 0.02, &Default::default(), false)
            .add_lora(
                &LoraSpec {
                    r: 4,
                    alpha: 8.0,
                    dropout: 0.0,
                    targets: Targets::AllLinear,
                    modules_to_save: Vec::new(),
                },
                5,
            )
            .unwrap();
        for model in [&full, &lora] {
            let params = trainable(model);
            let largest = params.iter().map(|&(_, n)| n).max().unwrap();
            let all: usize = params.iter().map(|&(_, n)| n).sum();
            for replicas in [2, 3, 4] {
                let owners = optimizer_owners(model, replicas);
                // Only trainable parameters (a LoRA base has no optimizer state), each once.
                assert_eq!(owners.len(), params.len());
                assert!(params.iter().all(|(id, _)| owners[id] < replicas));
                let mut load = vec![0usize; replicas];
                for (id, n) in &params {
                    load[owners[id]] += n;
                }
                for (k, &l) in load.iter().enumerate() {
                    assert!(l > 0, "replica {k} of {replicas} owns nothing");
                    assert!(
                        l <= all / replicas + largest,
                        "replica {k} of {replicas}: {l} of {all} (largest {largest})"
                    );
                }
                // Fixed by the shapes: the same on every call (every step, every resume).
                assert_eq!(owners, optimizer_owners(model, replicas));
            }
        }
        // Full fine-tuning's 21 parameters (9 a layer, embeddings, lm_head, final norm); the
        // 28 adapters (A and B on 7 projections a layer).
        assert_eq!(trainable(&full).len(), 2 * 9 + 3);
        assert_eq!(trainable(&lora).len(), 2 * 7 * 2);
    }

    fn batch(seed: i64) -> MicroBatch {
        let row = |r: i64| -> Vec<i64> { (0..12).map(|t| (seed * 7 + r * 3 + t) % 40).collect() };
        let input_ids = vec![row(0), row(1)];
        let mut labels = input_ids.clone();
        labels[0][..4].fill(-100);
        MicroBatch {
            input_ids,
            labels,
            attention_mask: None,
            packing: None,
        }
    }

    /// Sharding moves where each sum and update runs, not what it computes: two replicas'
    /// step equals summing both micro-batches' gradients in one place and one plain update, bit
    /// for bit, and leaves one AdamW state per trainable parameter.
    #[test]
    fn a_sharded_step_makes_the_update_of_an_unsharded_one() {
        let model: CausalLm<B> = init_model(&tiny(), 3, 0.02, &Default::default(), true);
        let batches = [batch(1), batch(2), batch(3), batch(4)];
        let settings = AdamWSettings {
            weight_decay: 0.01,
            ..Default::default()
        };
        let device = Default::default();

        let mut sharded_optim = adamw::<B>(&settings);
        let mut sharded = model.clone();
        for _ in 0..2 {
            (sharded, _) = train_step_parallel(
                sharded,
                &mut sharded_optim,
                &batches,
                &[device, device],
                1e-2,
                Some(1.0),
            );
        }

        let mut plain_optim = adamw::<B>(&settings);
        let mut plain = model;
        let total: usize = batches.iter().map(MicroBatch::target_tokens).sum();
        for _ in 0..2 {
            let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
            for replica in 0..2 {
                let fork = plain.clone().fork(&device);
                let (grads, _) = forward_backward(
                    &fork,
                    batches.iter().enumerate().skip(replica).step_by(2),
                    total,
                    &StepSettings::plain(1e-2, Some(1.0)),
                );
                acc.accumulate(&plain, grads);
            }
            let mut grads = acc.grads();
            let coef = 1.0 / (global_norm(&plain, &grads) + 1e-6);
            if coef < 1.0 {
                plain.visit(&mut Scale::<B> {
                    grads: &mut grads,
                    factor: coef,
                    _b: std::marker::PhantomData,
                });
            }
            plain = plain_optim.step(1e-2, plain, grads);
        }
        let values = |m: &CausalLm<B>| -> Vec<u32> {
            struct Bits(Vec<u32>);
            impl ModuleVisitor<B> for Bits {
                fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                    let v = p.val().into_data().to_vec::<f32>().unwrap();
                    self.0.extend(v.iter().map(|x| x.to_bits()));
                }
            }
            let mut b = Bits(Vec::new());
            m.visit(&mut b);
            b.0
        };
        assert_eq!(values(&sharded), values(&plain));
        assert_eq!(sharded_optim.to_record().len(), trainable(&sharded).len());
        // The weights came back as trainable leaves.
        assert_eq!(trainable(&sharded).len(), trainable(&plain).len());
    }
}
