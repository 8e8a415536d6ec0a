//! AdamW for f32 weights and for weights kept in bf16.
//!
//! An f32 weight is updated by burn's AdamW itself, bit for bit. A bf16 weight (full
//! fine-tuning with `weights: bf16`) keeps its AdamW moments in bf16 too, and the update is
//! computed in f32 from widened copies. Rounding the updated weight back to bf16 to the nearest
//! value would lose every update smaller than half a bf16 step (2⁻⁸ of the weight): late in a
//! run, with a small learning rate, most of them. Two remedies ([`Bf16Rounding`]):
//! - **compensated** (Kahan) summation: what rounding dropped is kept, in bf16, and added to the
//!   next update (Zamirai et al. 2020, "Revisiting BFloat16 Training"). The weight follows the
//!   f32 trajectory to within about one bf16 step, at 10 bytes a parameter (weight, gradient,
//!   two moments and the compensation, 2 bytes each) instead of 16.
//! - **stochastic** rounding: the updated weight is rounded up or down at random, up with the
//!   probability of how far it lies towards the upper neighbour, so that every update counts in
//!   expectation (Gupta et al. 2015, "Deep Learning with Limited Numerical Precision"). No
//!   compensation is kept: 8 bytes a parameter; the weight wanders around the f32 trajectory by
//!   a random walk of bf16 steps. The draws come from the backend's generator, which the run
//!   seeds at every step, so a resumed run draws the same ones.

use burn::module::{AutodiffModule, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, Optimizer, SimpleOptimizer,
};
use burn::record::Record;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, FloatDType, Tensor};
use serde::{Deserialize, Serialize};

use pipe_model::kernels;

use crate::step::AdamWSettings;

/// How a bf16 weight's update is rounded back to bf16 (see the module's documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bf16Rounding {
    /// Kahan summation: the rounding error is kept and added to the next update.
    #[default]
    Compensated,
    /// Up or down at random, in proportion to the distance to each neighbour.
    Stochastic,
}

/// AdamW with compensated or stochastically rounded updates for bf16 weights (see the
/// module's documentation).
#[derive(Clone)]
pub struct CompensatedAdamW {
    adamw: AdamW,
    /// `adamw`'s settings, for the CPU's fused update of f32 weights.
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    rounding: Bf16Rounding,
}

/// The state of one weight: AdamW's, and for a bf16 weight with compensated updates the
/// rounding error its last update left (`None` for f32 weights and stochastic rounding).
#[derive(Record, Clone)]
pub struct CompensatedAdamWState<B: Backend, const D: usize> {
    pub adam: AdamWState<B, D>,
    pub compensation: Option<Tensor<B, D>>,
}

/// The optimizer of a training run, for a module `M` (the model).
pub fn compensated_adamw<B: AutodiffBackend, M: AutodiffModule<B>>(
    s: &AdamWSettings,
) -> OptimizerAdaptor<CompensatedAdamW, M, B> {
    OptimizerAdaptor::from(CompensatedAdamW::new(s))
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
            if fusable(&tensor, &grad, state.as_ref()) {
                return self.fused_step(lr, tensor, grad, state);
            }
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
        if self.rounding == Bf16Rounding::Stochastic {
            let state = adam.map(|adam| CompensatedAdamWState {
                adam: cast_moments(adam, FloatDType::BF16),
                compensation: None,
            });
            return (round_stochastically(updated), state);
        }
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

impl CompensatedAdamW {
    fn new(s: &AdamWSettings) -> Self {
        let (beta_1, beta_2, epsilon, weight_decay) = (
            s.beta1 as f32,
            s.beta2 as f32,
            s.eps as f32,
            s.weight_decay as f32,
        );
        CompensatedAdamW {
            adamw: AdamWConfig::new()
                .with_beta_1(beta_1)
                .with_beta_2(beta_2)
                .with_epsilon(epsilon)
                .with_weight_decay(weight_decay)
                .with_grad_clipping(None)
                .build(),
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            rounding: s.bf16_rounding,
        }
    }

    /// burn's AdamW update of an f32 weight on the CPU, fused into one parallel pass
    /// ([`kernels::adamw_update`]: the same result, bit for bit).
    fn fused_step<B: Backend, const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<CompensatedAdamWState<B, D>>,
    ) -> (Tensor<B, D>, Option<CompensatedAdamWState<B, D>>) {
        let (time, moments) = match state {
            Some(s) => {
                let m = s.adam.momentum;
                (m.time + 1, Some((m.moment_1, m.moment_2)))
            }
            None => (1, None),
        };
        let update = kernels::AdamWUpdate {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            lr,
            time,
        };
        let (updated, moment_1, moment_2) = kernels::adamw_update(tensor, grad, moments, &update);
        let adam = AdamWState {
            momentum: AdaptiveMomentumState {
                time,
                moment_1,
                moment_2,
                max_moment_2: None,
            },
        };
        let state = CompensatedAdamWState {
            adam,
            compensation: None,
        };
        (updated, Some(state))
    }
}

/// Whether an f32 weight's update can take the CPU's fused kernel: weight, gradient and
/// moments all on the CPU backend in f32, no AMSGrad maximum, no compensation.
fn fusable<B: Backend, const D: usize>(
    weight: &Tensor<B, D>,
    grad: &Tensor<B, D>,
    state: Option<&CompensatedAdamWState<B, D>>,
) -> bool {
    kernels::is_plain_cpu_f32(weight)
        && kernels::is_plain_cpu_f32(grad)
        && weight.dims() == grad.dims()
        && state.is_none_or(|s| {
            let m = &s.adam.momentum;
            s.compensation.is_none()
                && m.max_moment_2.is_none()
                && kernels::is_plain_cpu_f32(&m.moment_1)
                && kernels::is_plain_cpu_f32(&m.moment_2)
                && m.moment_1.dims() == weight.dims()
                && m.moment_2.dims() == weight.dims()
        })
}

/// `x` rounded to one of its two bf16 neighbours at random: the upper one with probability
/// (x − lower) / (upper − lower), so that the rounding is unbiased. Computed exactly with float
/// operations (burn has no bit casts): for |x| in [2^e, 2^(e+1)) the bf16 values are the
/// multiples of 2^(e−7), so |x| / 2^(e−7) has an integral part (the lower neighbour's multiple)
/// and a fraction (the probability of rounding up), both exact in f32.
pub fn round_stochastically<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let magnitude = x.clone().abs();
    // 2^floor(log2 |x|): the exponential's few ulps of error vanish when it is snapped to
    // bf16, which holds every power of two; the logarithm may miss by one near a power of
    // two, which the comparisons mend. Zero (and anything below 2^-100) lands on the
    // multiples of 2^-107, where it stays itself or a neighbour as well.
    let exponent = magnitude
        .clone()
        .clamp_min(2f32.powi(-100))
        .log()
        .div_scalar(std::f32::consts::LN_2)
        .floor();
    let power = cast(
        cast(
            exponent.mul_scalar(std::f32::consts::LN_2).exp(),
            FloatDType::BF16,
        ),
        FloatDType::F32,
    );
    let too_big = power.clone().greater(magnitude.clone());
    let power = power.clone().mask_where(too_big, power.div_scalar(2));
    let too_small = power.clone().mul_scalar(2).lower_equal(magnitude.clone());
    let power = power.clone().mask_where(too_small, power.mul_scalar(2));
    let step = power.div_scalar(128);
    let multiple = magnitude.div(step.clone());
    let lower = multiple.clone().floor();
    let up = x
        .random_like(Distribution::Default)
        .lower(multiple - lower.clone())
        .float();
    cast((lower + up) * step * x.sign(), FloatDType::BF16)
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

/// `record` with each weight's state moved to `device_of(id)` (left where it is for `None`):
/// a resumed run's states, read onto one device, go to the replicas that own them before the
/// first step (see `crate::step::optimizer_owners`).
pub fn place_states<B: AutodiffBackend, M: AutodiffModule<B>>(
    record: <OptimizerAdaptor<CompensatedAdamW, M, B> as Optimizer<M, B>>::Record,
    device_of: impl Fn(ParamId) -> Option<B::Device>,
) -> <OptimizerAdaptor<CompensatedAdamW, M, B> as Optimizer<M, B>>::Record {
    fn moved<B: AutodiffBackend, const D: usize>(
        state: CompensatedAdamWState<B::InnerBackend, D>,
        device: &B::Device,
    ) -> AdaptorRecord<CompensatedAdamW, B> {
        AdaptorRecord::from_state::<D>(
            <CompensatedAdamW as SimpleOptimizer<B::InnerBackend>>::to_device(state, device),
        )
    }
    record
        .into_iter()
        .map(|(id, record)| {
            let Some(device) = device_of(id) else {
                return (id, record);
            };
            let AdaptorRecord::V1(v1) = record;
            let record = match v1 {
                AdaptorRecordV1::Rank0(s) => moved::<B, 0>(s, &device),
                AdaptorRecordV1::Rank1(s) => moved::<B, 1>(s, &device),
                AdaptorRecordV1::Rank2(s) => moved::<B, 2>(s, &device),
                AdaptorRecordV1::Rank3(s) => moved::<B, 3>(s, &device),
                AdaptorRecordV1::Rank4(s) => moved::<B, 4>(s, &device),
                AdaptorRecordV1::Rank5(s) => moved::<B, 5>(s, &device),
                AdaptorRecordV1::Rank6(s) => moved::<B, 6>(s, &device),
                AdaptorRecordV1::Rank7(s) => moved::<B, 7>(s, &device),
                AdaptorRecordV1::Rank8(s) => moved::<B, 8>(s, &device),
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

    /// The CPU backend's generator is one for the process: the tests that seed and draw from
    /// it take turns, or one's draws would come from another's seed.
    fn one_generator_user() -> std::sync::MutexGuard<'static, ()> {
        static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
        GENERATOR.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn random(seed: u64, shape: [usize; 2]) -> Tensor<Cpu, 2> {
        <Cpu as Backend>::seed(&Default::default(), seed);
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    /// bf16 values in [0.5, 0.95), where a bf16 step is 2^-8 ≈ 3.9e-3, as f32.
    fn bf16_weights_near_one(shape: [usize; 2]) -> Tensor<Cpu, 2> {
        random(2, shape)
            .abs()
            .clamp(0.0, 1.0)
            .mul_scalar(0.45)
            .add_scalar(0.5)
            .cast(FloatDType::BF16)
            .cast(FloatDType::F32)
    }

    /// Plain bf16: AdamW in f32 on a widened copy, rounded back to the nearest bf16.
    fn plain_bf16_step(
        adamw: &AdamW,
        lr: f64,
        w: Tensor<Cpu, 2>,
        g: Tensor<Cpu, 2>,
        state: Option<AdamWState<Cpu, 2>>,
    ) -> (Tensor<Cpu, 2>, Option<AdamWState<Cpu, 2>>) {
        let (w, s) = adamw.step(
            lr,
            w.cast(FloatDType::F32),
            g,
            state.map(|s| cast_moments(s, FloatDType::F32)),
        );
        (
            w.cast(FloatDType::BF16),
            s.map(|s| cast_moments(s, FloatDType::BF16)),
        )
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
        let _turn = one_generator_user();
        // With and without weight decay; a small weight and one of several tasks' chunks with
        // a tail (the CPU's fused update).
        for (decay, shape) in [(0.01, [8, 16]), (0.0, [8, 16]), (0.1, [61, 709])] {
            let settings = AdamWSettings {
                weight_decay: decay,
                ..AdamWSettings::default()
            };
            let ours = CompensatedAdamW::new(&settings);
            let adamw = ours.adamw.clone();
            let (mut a, mut b) = (random(1, shape), random(1, shape));
            let (mut sa, mut sb) = (None, None);
            for step in 0..5 {
                let g = random(100 + step, shape);
                (a, sa) = adamw.step(1e-2, a, g.clone(), sa);
                let (t, s) = ours.step(1e-2, b, g, sb);
                assert!(s.as_ref().is_some_and(|s| s.compensation.is_none()));
                (b, sb) = (t, s);
                assert_eq!(bits(a.clone()), bits(b.clone()), "step {step}, {shape:?}");
                let (ma, mb) = (
                    &sa.as_ref().unwrap().momentum,
                    &sb.as_ref().unwrap().adam.momentum,
                );
                assert_eq!(ma.time, mb.time);
                assert_eq!(bits(ma.moment_1.clone()), bits(mb.moment_1.clone()));
                assert_eq!(bits(ma.moment_2.clone()), bits(mb.moment_2.clone()));
            }
        }
    }

    #[test]
    fn compensation_keeps_a_bf16_weight_on_its_f32_course_where_plain_rounding_stalls() {
        let _turn = one_generator_user();
        // Updates of about 1e-4 on weights of about 1: far below half a bf16 step (2^-9).
        let ours = CompensatedAdamW::new(&AdamWSettings::default());
        // All three start from the same (bf16) values.
        let start = bf16_weights_near_one([4, 64]);
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
            (plain, sp) = plain_bf16_step(&ours.adamw, lr, plain, g, sp);
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

    /// The two bf16 values around `x`: toward zero and away from it (equal when `x` is one).
    fn neighbours(x: f32) -> (f32, f32) {
        let toward_zero = f32::from_bits(x.to_bits() & 0xffff_0000);
        if toward_zero == x {
            return (x, x);
        }
        let away = f32::from_bits((x.to_bits() & 0xffff_0000) + 0x1_0000);
        (toward_zero, away)
    }

    #[test]
    fn stochastic_rounding_lands_on_a_neighbour_and_keeps_bf16_values() {
        let _turn = one_generator_user();
        // Every sign and scale, bf16 values themselves, zero, and values next to powers of two
        // (where the logarithm is least sure of the exponent).
        let mut values: Vec<f32> = random(3, [1, 4000])
            .into_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, v)| v * 10f32.powi(i as i32 % 9 - 6))
            .collect();
        for k in -20..20 {
            let p = 2f32.powi(k);
            values.extend([
                p,
                -p,
                p * (1.0 - f32::EPSILON / 2.0),
                p * (1.0 + f32::EPSILON),
            ]);
            values.extend([p * 1.5, p * (1.0 + 1.0 / 128.0)]);
        }
        values.extend([0.0, -0.0, 1e-30, 3.0e38]);
        let n = values.len();
        let x = Tensor::<Cpu, 1>::from_floats(values.as_slice(), &Default::default());
        for draw in 0..3 {
            <Cpu as Backend>::seed(&Default::default(), draw);
            let r = round_stochastically(x.clone());
            assert_eq!(r.dtype(), DType::BF16);
            let r = r.cast(FloatDType::F32).into_data().to_vec::<f32>().unwrap();
            assert_eq!(r.len(), n);
            for (&v, &got) in values.iter().zip(&r) {
                let (a, b) = neighbours(v);
                assert!(
                    got.to_bits() == a.to_bits() || got.to_bits() == b.to_bits() || got == v,
                    "{v:e} rounded to {got:e}, not {a:e} or {b:e}"
                );
                if a == b {
                    assert_eq!(got, v, "a bf16 value moved");
                }
            }
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let _turn = one_generator_user();
        // 1 + 0.3 of a bf16 step, and a negative value 0.9 of a step from its lower magnitude.
        for (x, p) in [(1.0 + 0.3 / 128.0, 0.3), (-(0.75 + 0.9 / 256.0), 0.9)] {
            let n = 200_000;
            let t = Tensor::<Cpu, 1>::full([n], x, &Default::default());
            <Cpu as Backend>::seed(&Default::default(), 7);
            let r = round_stochastically(t).cast(FloatDType::F32);
            let (a, b) = neighbours(x);
            let up = r.clone().equal_elem(b).int().sum().into_scalar() as f64 / n as f64;
            // The share rounded away from zero is the fraction: within 5 standard deviations.
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (up - p).abs() < 5.0 * sd,
                "{x}: {up} rounded up, expected {p}"
            );
            let mean = r.mean().into_scalar() as f64;
            assert!(
                (mean - x as f64).abs() < 5.0 * sd * (b - a).abs() as f64,
                "{x}: mean {mean}"
            );
        }
    }

    #[test]
    fn stochastic_rounding_keeps_a_bf16_weight_on_its_f32_course_on_average() {
        let _turn = one_generator_user();
        let stochastic = CompensatedAdamW::new(&AdamWSettings {
            bf16_rounding: Bf16Rounding::Stochastic,
            ..AdamWSettings::default()
        });
        let adamw = stochastic.adamw.clone();
        // As in the compensated test: updates of about 1e-4 that always push the same way, far
        // below half a bf16 step.
        let start = bf16_weights_near_one([16, 64]);
        let (mut f32w, mut sr, mut plain) = (
            start.clone(),
            start.clone().cast(FloatDType::BF16),
            start.clone().cast(FloatDType::BF16),
        );
        let (mut sf, mut ss, mut sp) = (None, None, None);
        for step in 0..300 {
            let g = random(1000 + step, [16, 64]).abs().add_scalar(0.1);
            <Cpu as Backend>::seed(&Default::default(), 5000 + step);
            (f32w, sf) = adamw.step(1e-4, f32w, g.clone(), sf);
            (sr, ss) = stochastic.step(1e-4, sr, g.clone(), ss);
            assert!(ss.as_ref().is_some_and(|s| s.compensation.is_none()));
            (plain, sp) = plain_bf16_step(&adamw, 1e-4, plain, g, sp);
        }
        let moved = (start - f32w.clone()).mean().into_scalar();
        // The signed error, averaged over the 1024 weights: rounding to nearest loses the
        // whole way; stochastic rounding's errors cancel out.
        let bias = |w: Tensor<Cpu, 2>| {
            (w.cast(FloatDType::F32) - f32w.clone())
                .mean()
                .into_scalar()
        };
        let (sr_bias, plain_bias) = (bias(sr.clone()), bias(plain));
        eprintln!("moved {moved}, stochastic bias {sr_bias}, plain bias {plain_bias}");
        assert!(moved > 0.02, "{moved}");
        assert!(plain_bias.abs() > 0.8 * moved, "plain: {plain_bias}");
        assert!(sr_bias.abs() < 0.1 * moved, "stochastic: {sr_bias}");
        assert_eq!(sr.dtype(), DType::BF16);
    }
}
