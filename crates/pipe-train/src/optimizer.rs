//! AdamW for f32 weights and for weights kept in bf16.
//!
//! An f32 weight is updated by burn's AdamW itself, bit for bit. A bf16 weight (full
//! fine-tuning with `weights: bf16`) keeps its AdamW moments in bf16 too, and the update is
//! computed in f32 from widened copies. Rounding the updated weight back to bf16 would lose
//! every update smaller than half a bf16 step (2⁻⁸ of the weight): late in a run, with a
//! small learning rate, most of them. So the update is added with compensated (Kahan)
//! summation: what rounding dropped is kept, in bf16, and added to the next update (Zamirai et
//! al. 2020, "Revisiting BFloat16 Training"). The weight then follows the f32 trajectory to
//! within about one bf16 step, at 10 bytes a parameter (weight, gradient, two moments and the
//! compensation, 2 bytes each) instead of 16.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, Optimizer, SimpleOptimizer,
};
use burn::record::Record;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor};

use crate::step::AdamWSettings;

/// AdamW with compensated updates for bf16 weights (see the module's documentation).
#[derive(Clone)]
pub struct CompensatedAdamW {
    adamw: AdamW,
}

/// The state of one weight: AdamW's, and for a bf16 weight the rounding error its last update
/// left (`None` for f32 weights).
#[derive(Record, Clone)]
pub struct CompensatedAdamWState<B: Backend, const D: usize> {
    pub adam: AdamWState<B, D>,
    pub compensation: Option<Tensor<B, D>>,
}

/// The optimizer of a training run, for a module `M` (the model).
pub fn compensated_adamw<B: AutodiffBackend, M: AutodiffModule<B>>(
    s: &AdamWSettings,
) -> OptimizerAdaptor<CompensatedAdamW, M, B> {
    let adamw = AdamWConfig::new()
        .with_beta_1(s.beta1 as f32)
        .with_beta_2(s.beta2 as f32)
        .with_epsilon(s.eps as f32)
        .with_weight_decay(s.weight_decay as f32)
        .with_grad_clipping(None)
        .build();
    OptimizerAdaptor::from(CompensatedAdamW { adamw })
}

fn cast<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    t.cast(dtype)
}

fn cast_moments<B: Backend, const D: usize>(
    s: AdamWState<B, D>,
    dtype: FloatDType,
) -> AdamWState<B, D> {
    let m = s.momentum;
    AdamWState {
        momentum: AdaptiveMomentumState {
            time: m.time,
            moment_1: cast(m.moment_1, dtype),
            moment_2: cast(m.moment_2, dtype),
            max_moment_2: m.max_moment_2.map(|t| cast(t, dtype)),
        },
    }
}

impl<B: Backend> SimpleOptimizer<B> for CompensatedAdamW {
    type State<const D: usize> = CompensatedAdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        if tensor.dtype() != DType::BF16 {
            let (updated, adam) = self.adamw.step(lr, tensor, grad, state.map(|s| s.adam));
            let state = adam.map(|adam| CompensatedAdamWState {
                adam,
                compensation: None,
            });
            return (updated, state);
        }
        let (adam, compensation) = match state {
            Some(s) => (
                Some(cast_moments(s.adam, FloatDType::F32)),
                s.compensation.map(|c| cast(c, FloatDType::F32)),
            ),
            None => (None, None),
        };
        let weight = cast(tensor, FloatDType::F32);
        let (updated, adam) =
            self.adamw
                .step(lr, weight.clone(), cast(grad, FloatDType::F32), adam);
        // Kahan: add the update less what the last rounding dropped; keep what this one drops.
        let update = updated - weight.clone();
        let update = match compensation {
            Some(c) => update - c,
            None => update,
        };
        let rounded = cast(weight.clone() + update.clone(), FloatDType::BF16);
        let dropped = (cast(rounded.clone(), FloatDType::F32) - weight) - update;
        let state = adam.map(|adam| CompensatedAdamWState {
            adam: cast_moments(adam, FloatDType::BF16),
            compensation: Some(cast(dropped, FloatDType::BF16)),
        });
        (rounded, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        CompensatedAdamWState {
            adam: <AdamW as SimpleOptimizer<B>>::to_device(state.adam, device),
            compensation: state.compensation.map(|c| c.to_device(device)),
        }
    }
}

/// The optimizer state of a checkpoint written before compensated updates (burn's AdamW's
/// record), as this optimizer's: the same moments, no compensation (all weights were f32).
pub fn from_plain_adamw<B: AutodiffBackend, M: AutodiffModule<B>>(
    old: <OptimizerAdaptor<AdamW, M, B> as Optimizer<M, B>>::Record,
) -> <OptimizerAdaptor<CompensatedAdamW, M, B> as Optimizer<M, B>>::Record {
    fn wrap<B: Backend, const D: usize>(adam: AdamWState<B, D>) -> CompensatedAdamWState<B, D> {
        CompensatedAdamWState {
            adam,
            compensation: None,
        }
    }
    old.into_iter()
        .map(|(id, record)| {
            let AdaptorRecord::V1(v1) = record;
            let record = match v1 {
                AdaptorRecordV1::Rank0(s) => AdaptorRecord::from_state::<0>(wrap(s)),
                AdaptorRecordV1::Rank1(s) => AdaptorRecord::from_state::<1>(wrap(s)),
                AdaptorRecordV1::Rank2(s) => AdaptorRecord::from_state::<2>(wrap(s)),
                AdaptorRecordV1::Rank3(s) => AdaptorRecord::from_state::<3>(wrap(s)),
                AdaptorRecordV1::Rank4(s) => AdaptorRecord::from_state::<4>(wrap(s)),
                AdaptorRecordV1::Rank5(s) => AdaptorRecord::from_state::<5>(wrap(s)),
                AdaptorRecordV1::Rank6(s) => AdaptorRecord::from_state::<6>(wrap(s)),
                AdaptorRecordV1::Rank7(s) => AdaptorRecord::from_state::<7>(wrap(s)),
                AdaptorRecordV1::Rank8(s) => AdaptorRecord::from_state::<8>(wrap(s)),
            };
            (id, record)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type Cpu = pipe_model::CpuBackend;

    fn random(seed: u64, shape: [usize; 2]) -> Tensor<Cpu, 2> {
        <Cpu as Backend>::seed(&Default::default(), seed);
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn bits(t: Tensor<Cpu, 2>) -> Vec<u32> {
        t.cast(FloatDType::F32)
            .into_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn f32_weights_are_updated_by_burns_adamw_bit_for_bit() {
        let adamw = AdamWConfig::new()
            .with_weight_decay(0.01)
            .with_grad_clipping(None)
            .build();
        let ours = CompensatedAdamW {
            adamw: adamw.clone(),
        };
        let (mut a, mut b) = (random(1, [8, 16]), random(1, [8, 16]));
        let (mut sa, mut sb) = (None, None);
        for step in 0..5 {
            let g = random(100 + step, [8, 16]);
            (a, sa) = adamw.step(1e-2, a, g.clone(), sa);
            let (t, s) = ours.step(1e-2, b, g, sb);
            assert!(s.as_ref().is_some_and(|s| s.compensation.is_none()));
            (b, sb) = (t, s);
            assert_eq!(bits(a.clone()), bits(b.clone()), "step {step}");
        }
    }

    #[test]
    fn compensation_keeps_a_bf16_weight_on_its_f32_course_where_plain_rounding_stalls() {
        // Updates of about 1e-4 on weights of about 1: far below half a bf16 step (2^-9).
        let ours = CompensatedAdamW {
            adamw: AdamWConfig::new().with_grad_clipping(None).build(),
        };
        // Weights in [0.5, 0.95), where a bf16 step is 2^-8 ≈ 3.9e-3.
        // All three start from the same (bf16) values.
        let start = random(2, [4, 64])
            .abs()
            .clamp(0.0, 1.0)
            .mul_scalar(0.45)
            .add_scalar(0.5)
            .cast(FloatDType::BF16)
            .cast(FloatDType::F32);
        let (mut f32w, mut kahan, mut plain) = (
            start.clone(),
            start.clone().cast(FloatDType::BF16),
            start.clone().cast(FloatDType::BF16),
        );
        let (mut sf, mut sk, mut sp) = (None, None, None);
        let lr = 1e-4;
        for step in 0..300 {
            // A gradient of constant sign: every update pushes the same way.
            let g = random(1000 + step, [4, 64]).abs().add_scalar(0.1);
            (f32w, sf) = ours.step(lr, f32w, g.clone(), sf);
            (kahan, sk) = ours.step(lr, kahan, g.clone(), sk);
            // Plain bf16: AdamW in f32 on a widened copy, rounded back.
            let (p, s) = ours.adamw.step(
                lr,
                plain.cast(FloatDType::F32),
                g,
                sp.map(|s: AdamWState<Cpu, 2>| cast_moments(s, FloatDType::F32)),
            );
            plain = p.cast(FloatDType::BF16);
            sp = s.map(|s| cast_moments(s, FloatDType::BF16));
        }
        let moved = (start.clone() - f32w.clone()).abs().mean().into_scalar();
        let err = |w: Tensor<Cpu, 2>| {
            (w.cast(FloatDType::F32) - f32w.clone())
                .abs()
                .max()
                .into_scalar()
        };
        let (kahan_err, plain_err) = (err(kahan.clone()), err(plain));
        // The f32 weights moved by about 300 × 1e-4: several bf16 steps, which plain rounding
        // loses and compensation keeps to within about half a step.
        assert!(moved > 0.02, "{moved}");
        assert!(kahan_err < 2.5e-3, "compensated: {kahan_err}");
        assert!(plain_err > 0.015, "plain: {plain_err}");
        eprintln!("moved {moved}, compensated error {kahan_err}, plain error {plain_err}");
        assert_eq!(kahan.dtype(), DType::BF16);
    }
}
