//! The forward and backward pass of one micro-batch, with the decoder layers as segments.
//!
//! Without gradient checkpointing the whole pass is one autodiff graph, which keeps every
//! intermediate result of every layer until the backward pass has used it. With it, the layers
//! are recomputed one at a time: the forward pass runs untracked and keeps only each layer's
//! input (`[batch, seq, hidden]`); the backward pass starts at the output head, then rebuilds
//! one layer's graph from its saved input, takes its gradients given the gradient of its
//! output, and drops the graph before the next layer down. A run then holds one layer's
//! intermediate results instead of all of them (transformers' `gradient_checkpointing_enable`
//! makes the same trade), and computes the same numbers: the same operations on the same values
//! in the same order, so the same weights (tested bit for bit).
//!
//! LoRA dropout draws its masks while a layer runs; the recomputation must draw the same ones,
//! so the backend's generator is seeded from the step, the micro-batch and the layer before
//! each layer runs, in both modes (a run with gradient checkpointing trains the weights of one
//! without).

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use pipe_model::{shifted_cross_entropy, CausalLm, Rows};

use crate::step::MicroBatch;

/// How [`micro_batch_gradients`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Recompute each layer in the backward pass (`gradient_checkpointing`).
    pub recompute_layers: bool,
    /// Seeds LoRA dropout's masks; `None` when nothing draws (no dropout), so that replicas
    /// running at once do not reset one another's generator.
    pub dropout_seed: Option<u64>,
}

/// The gradients of `mb`'s summed loss over `total` target tokens on `model`'s parameters, and
/// that loss.
pub fn micro_batch_gradients<B: AutodiffBackend>(
    model: &CausalLm<B>,
    mb: &MicroBatch,
    total: usize,
    pass: Pass,
) -> (GradientsParams, f64) {
    let device = model.embed_tokens.val().device();
    let input_ids = ids::<B>(&mb.input_ids, &device);
    let rows = match &mb.packing {
        Some(p) => Rows::Packed {
            positions: &p.positions,
            segments: &p.segments,
        },
        None => Rows::Plain {
            attention_mask: mb.attention_mask.as_deref(),
        },
    };
    let cx = model.layer_context(rows, &input_ids);
    let seed_layer = |layer: usize| {
        if let Some(seed) = pass.dropout_seed {
            B::seed(&device, layer_seed(seed, layer));
        }
    };
    // Each micro-batch's summed loss over the whole effective batch's token count, so the
    // accumulated gradient is that of the mean over every target token.
    let loss_of = |hidden: Tensor<B, 3>| {
        let (sum, _) = shifted_cross_entropy(model.logits(model.final_norm(hidden)), &mb.labels);
        sum / total.max(1) as f64
    };
    let layers = model.layers.len();

    if !pass.recompute_layers {
        let mut x = model.embed(input_ids);
        for i in 0..layers {
            seed_layer(i);
            x = model.layer_forward(i, x, &cx);
        }
        let part = loss_of(x);
        let loss = part.clone().into_scalar().elem::<f64>();
        return (GradientsParams::from_grads(part.backward(), model), loss);
    }

    // Forward, untracked: parameters without gradients build no graph (dropout still draws,
    // the backend being autodiff's). Only each layer's input is kept.
    let untracked = model.clone().no_grad();
    let mut inputs = Vec::with_capacity(layers);
    let mut x = untracked.embed(input_ids.clone());
    for i in 0..layers {
        inputs.push(x.clone());
        seed_layer(i);
        x = untracked.layer_forward(i, x, &cx);
    }
    drop(untracked);

    // The head, from the last layer's output.
    let last = x.detach().require_grad();
    let part = loss_of(last.clone());
    let loss = part.clone().into_scalar().elem::<f64>();
    let mut grads = part.backward();
    let mut upstream = last.grad_remove(&mut grads);
    let mut sums = GradientsParams::from_grads(grads, model);

    // The layers, last first, each from its saved input and its output's gradient.
    for i in (0..layers).rev() {
        let Some(g) = upstream else {
            break;
        };
        let input = inputs.pop().expect("one input a layer").require_grad();
        seed_layer(i);
        let out = model.layer_forward(i, input.clone(), &cx);
        let mut grads = (out * Tensor::from_inner(g)).sum().backward();
        upstream = input.grad_remove(&mut grads);
        add_into(
            &mut sums,
            GradientsParams::from_grads(grads, &model.layers[i]),
            &model.layers[i],
        );
    }

    // The embeddings, when they train (full fine-tuning, or a LoRA's modules_to_save).
    if let Some(g) = upstream {
        if model.embed_tokens.val().is_require_grad() {
            let grads = (model.embed(input_ids) * Tensor::from_inner(g))
                .sum()
                .backward();
            add_into(&mut sums, GradientsParams::from_grads(grads, model), model);
        }
    }
    (sums, loss)
}

/// A seed for layer `layer`'s draws from a micro-batch's `seed` (SplitMix64's mixing, so that
/// neighbouring layers and micro-batches draw unrelated masks).
fn layer_seed(seed: u64, layer: usize) -> u64 {
    let mut rng = pipe_rand::SplitMix64::new(seed ^ (layer as u64).wrapping_mul(0x9e37_79b9));
    rng.next_u64()
}

/// Adds `part`'s gradients of `module`'s parameters into `sums` (a parameter of both: the tied
/// embeddings, which the head and the input both use).
fn add_into<B: AutodiffBackend, M: AutodiffModule<B>>(
    sums: &mut GradientsParams,
    mut part: GradientsParams,
    module: &M,
) {
    struct Add<'a, B: AutodiffBackend> {
        sums: &'a mut GradientsParams,
        part: &'a mut GradientsParams,
        _b: std::marker::PhantomData<B>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Add<'_, B> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let Some(g) = self.part.remove::<B::InnerBackend, D>(p.id) else {
                return;
            };
            let sum = match self.sums.remove::<B::InnerBackend, D>(p.id) {
                Some(s) => s + g,
                None => g,
            };
            self.sums.register::<B::InnerBackend, D>(p.id, sum);
        }
    }
    module.visit(&mut Add::<B> {
        sums,
        part: &mut part,
        _b: std::marker::PhantomData,
    });
}

fn ids<B: AutodiffBackend>(rows: &[Vec<i64>], device: &B::Device) -> Tensor<B, 2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    Tensor::from_data(
        TensorData::new(rows.iter().flatten().copied().collect::<Vec<i64>>(), [b, s]),
        device,
    )
}
