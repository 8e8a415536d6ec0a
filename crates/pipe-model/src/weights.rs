//! Where a model's weights come from when it is built ([`ModelConfig::init`]): a checkpoint
//! (each tensor read by its transformers name and its shape checked) or a seed (transformers'
//! initialisation: matrices ~ N(0, std), biases 0, norms the identity).
//!
//! [`ModelConfig::init`]: crate::ModelConfig::init

use burn::module::{Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use pipe_rand::SplitMix64;

use crate::load::{Checkpoint, HostTensor};
use crate::{CheckpointError, ModelError};

/// How a fresh vector starts (a checkpoint's is read).
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    Zeros,
    Ones,
}

/// The source of every weight of a model being built.
pub enum Weights<'a, B: Backend> {
    Checkpoint {
        checkpoint: &'a Checkpoint,
        device: &'a B::Device,
        trainable: bool,
    },
    Seeded {
        gaussian: Gaussian,
        std: f64,
        device: &'a B::Device,
        trainable: bool,
    },
}

impl<'a, B: Backend> Weights<'a, B> {
    /// Every tensor from `checkpoint`; with `trainable`, every weight takes gradients.
    pub fn checkpoint(checkpoint: &'a Checkpoint, device: &'a B::Device, trainable: bool) -> Self {
        Weights::Checkpoint {
            checkpoint,
            device,
            trainable,
        }
    }

    /// Matrices drawn from N(0, `std`) in the order the model asks for them, from `seed`: the
    /// same numbers on every backend.
    pub fn seeded(seed: u64, std: f64, device: &'a B::Device, trainable: bool) -> Self {
        Weights::Seeded {
            gaussian: Gaussian::new(seed),
            std,
            device,
            trainable,
        }
    }

    fn device_and_trainable(&self) -> (&'a B::Device, bool) {
        match self {
            Weights::Checkpoint {
                device, trainable, ..
            }
            | Weights::Seeded {
                device, trainable, ..
            } => (device, *trainable),
        }
    }

    /// A `[rows, cols]` matrix as the checkpoint stores it (drawn in that order).
    fn matrix_data(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<f32>, ModelError> {
        match self {
            Weights::Checkpoint { checkpoint, .. } => {
                let t = checkpoint.read(name)?;
                expect_shape(name, &t, &[rows, cols])?;
                Ok(t.data)
            }
            Weights::Seeded { gaussian, std, .. } => {
                Ok((0..rows * cols).map(|_| gaussian.sample(*std)).collect())
            }
        }
    }

    /// An embedding table `[rows, cols]`, stored as it is on disk.
    pub fn embedding(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Param<Tensor<B, 2>>, ModelError> {
        let data = self.matrix_data(name, rows, cols)?;
        let (device, trainable) = self.device_and_trainable();
        let t = Tensor::from_data(TensorData::new(data, [rows, cols]), device);
        Ok(named_param(name, t, trainable))
    }

    /// A linear weight stored `[d_output, d_input]` on disk, held `[d_input, d_output]`.
    pub fn linear(
        &mut self,
        name: &str,
        d_output: usize,
        d_input: usize,
    ) -> Result<Param<Tensor<B, 2>>, ModelError> {
        let data = self.matrix_data(name, d_output, d_input)?;
        let (device, trainable) = self.device_and_trainable();
        let t = Tensor::<B, 2>::from_data(TensorData::new(data, [d_output, d_input]), device);
        Ok(named_param(name, t.transpose(), trainable))
    }

    /// A vector of `len` (a bias or a norm's weight); `fill` when seeded.
    pub fn vector(
        &mut self,
        name: &str,
        len: usize,
        fill: Fill,
    ) -> Result<Param<Tensor<B, 1>>, ModelError> {
        let data = match self {
            Weights::Checkpoint { checkpoint, .. } => {
                let t = checkpoint.read(name)?;
                expect_shape(name, &t, &[len])?;
                t.data
            }
            Weights::Seeded { .. } => vec![
                match fill {
                    Fill::Zeros => 0.0,
                    Fill::Ones => 1.0,
                };
                len
            ],
        };
        let (device, trainable) = self.device_and_trainable();
        Ok(named_param(
            name,
            Tensor::from_data(TensorData::new(data, [len]), device),
            trainable,
        ))
    }
}

fn expect_shape(name: &str, t: &HostTensor, shape: &[usize]) -> Result<(), ModelError> {
    if t.shape != shape {
        return Err(CheckpointError::Shape {
            name: name.to_string(),
            found: t.shape.clone(),
            expected: shape.to_vec(),
        }
        .into());
    }
    Ok(())
}

/// A parameter whose id is derived from its checkpoint name, so that optimizer state saved in
/// one process finds its parameter in the next (burn keys optimizer state by id).
pub fn named_param<B: Backend, const D: usize>(
    name: &str,
    t: Tensor<B, D>,
    trainable: bool,
) -> Param<Tensor<B, D>> {
    let id = ParamId::from(stable_id(name));
    // A leaf of its own: values computed from other parameters (a transpose, a resize, a
    // merge) must not keep their history. And a fresh, contiguous buffer: a transposed view
    // makes the backend sum in another order than for the optimizer's (contiguous) updates,
    // and a resumed run would drift from an uninterrupted one in the last bits.
    let t = t.detach().mul_scalar(1.0);
    Param::initialized(id, if trainable { t.require_grad() } else { t })
}

/// FNV-1a of a parameter name.
pub fn stable_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Normal(0, std) samples from a fixed generator (Box–Muller over SplitMix64).
pub struct Gaussian {
    rng: SplitMix64,
    spare: Option<f64>,
}

impl Gaussian {
    pub fn new(seed: u64) -> Self {
        Gaussian {
            rng: SplitMix64::new(seed),
            spare: None,
        }
    }

    pub fn sample(&mut self, std: f64) -> f32 {
        if let Some(s) = self.spare.take() {
            return (s * std) as f32;
        }
        let u1 = ((self.rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = self.rng.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare = Some(r * s);
        (r * c * std) as f32
    }
}
