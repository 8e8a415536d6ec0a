//! Fused kernels for the CPU backend, each with its own backward pass: attention's scaled,
//! masked softmax, the cross-entropy over the vocabulary, SwiGLU's gating, RMSNorm, and the
//! swap of attention's heads with the sequence.
//!
//! burn composes the first four from several tensor operations each (the softmax: scale, add
//! the mask, max, subtract, exp, sum, divide — and as many again backward), every one a pass
//! over memory on one core with glibc's scalar `exp`, which takes its slow underflow path for
//! every masked score; and it copies a swapped view element by element wherever it is
//! reshaped. Here each is one pass forward and one backward, parallel over rows, with an
//! `exp` the compiler vectorises for the CPU found at run time.
//!
//! Only burn-flex tensors of f32 take these kernels, plain or under autodiff; every other
//! backend (CUDA) and dtype takes burn's composition, unchanged. The choice is made from the
//! tensor's primitive type at run time: burn's backend traits have no hook for an operation
//! with its own backward, and a backend-extension trait would have to be carried as a bound
//! through every generic function of the four crates that run a model.

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Int, Tensor, TensorData, TensorMetadata, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// burn-flex's tensor under autodiff (burn-autodiff names the type only through the backend).
type AutodiffTensor = FloatTensor<Autodiff<Flex>>;

/// `softmax(scores · scale + mask)` over the last dimension.
///
/// `scores`: `[batch, heads, s, t]`; `mask`: additive, `[mask rows, 1, s, t]` where the mask
/// rows (1 or batch) divide batch·heads evenly, row `r` serving the `batch·heads / rows`
/// consecutive heads from `r` on → `[batch, heads, s, t]`. The mask takes no gradient.
pub fn masked_softmax<B: Backend>(
    scores: Tensor<B, 4>,
    mask: Tensor<B, 4>,
    scale: f32,
) -> Tensor<B, 4> {
    let [b, h, s, t] = scores.dims();
    let mask_rows = mask.dims()[0];
    let fits = (b * h).is_multiple_of(mask_rows) && mask.dims()[1..] == [1, s, t];
    match cpu_f32::<B>(scores.into_primitive().tensor()) {
        CpuF32::Tracked(x) if fits => from_autodiff(softmax_tracked(x, &cpu_mask(mask), scale)),
        CpuF32::Plain(x) if fits => from_flex(masked_softmax_forward(&x, &cpu_mask(mask), scale)),
        other => {
            let scores: Tensor<B, 4> = other.into_tensor();
            let z = (scores * scale).reshape([mask_rows, b * h / mask_rows, s * t])
                + mask.reshape([mask_rows, 1, s * t]);
            burn::tensor::activation::softmax(z.reshape([b, h, s, t]), 3)
        }
    }
}

/// The backward pass of [`masked_softmax`] given its probabilities `probs` and their gradient
/// `grad` (both `[batch, heads, s, t]`): `scale · p ⊙ (g − Σ_row g ⊙ p)`, the scores' gradient.
/// For a caller that makes its own backward pass (untracked tensors).
pub fn masked_softmax_grad<B: Backend>(
    probs: Tensor<B, 4>,
    grad: Tensor<B, 4>,
    scale: f32,
) -> Tensor<B, 4> {
    match (
        cpu_f32::<B>(probs.into_primitive().tensor()),
        cpu_f32::<B>(grad.into_primitive().tensor()),
    ) {
        (CpuF32::Plain(p), CpuF32::Plain(g)) => {
            from_flex(masked_softmax_backward(&p.to_contiguous(), &g, scale))
        }
        (p, g) => {
            let (p, g): (Tensor<B, 4>, Tensor<B, 4>) = (p.into_tensor(), g.into_tensor());
            let dot = (p.clone() * g.clone()).sum_dim(3);
            p * (g - dot) * scale
        }
    }
}

/// The burn-flex tensor of a mask beside burn-flex scores (it takes no gradient).
fn cpu_mask<B: Backend>(mask: Tensor<B, 4>) -> FlexTensor {
    match cpu_f32::<B>(mask.into_primitive().tensor()) {
        CpuF32::Tracked(t) => t.primitive,
        CpuF32::Plain(t) => t,
        CpuF32::Other(_) => unreachable!("scores on burn-flex come with their mask on burn-flex"),
    }
}

/// `Σ_r weights[r] · −log softmax(logits[r])[targets[r]]`: the weighted sum of the rows'
/// cross-entropies. `logits`: `[rows, vocab]` → `[1]`. Rows of weight 0 cost nothing on the
/// CPU and take no gradient.
pub fn cross_entropy_sum<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Vec<usize>,
    weights: Vec<f32>,
) -> Tensor<B, 1> {
    let rows = logits.dims()[0];
    let device = logits.device();
    match cpu_f32::<B>(logits.into_primitive().tensor()) {
        CpuF32::Tracked(x) => from_autodiff(cross_entropy_tracked(x, Rows { targets, weights })),
        CpuF32::Plain(x) => {
            let (sum, _) = cross_entropy_forward(&x, &Rows { targets, weights });
            from_flex(FlexTensor::from_data(TensorData::new(vec![sum], [1])))
        }
        CpuF32::Other(x) => {
            let logits = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
            let logp = burn::tensor::activation::log_softmax(logits, 1);
            let targets = targets.iter().map(|&t| t as i64).collect();
            let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [rows, 1]), &device);
            let picked = logp.gather(1, idx).reshape([rows]);
            let w = Tensor::<B, 1>::from_data(TensorData::new(weights, [rows]), &device);
            (picked * w).sum().neg()
        }
    }
}

/// `silu(gate) · up`, SwiGLU's gating, elementwise; `gate` and `up` of one shape.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    if gate.dims() != up.dims() {
        return burn::tensor::activation::silu(gate) * up;
    }
    match (
        cpu_f32::<B>(gate.into_primitive().tensor()),
        cpu_f32::<B>(up.into_primitive().tensor()),
    ) {
        (CpuF32::Tracked(gate), CpuF32::Tracked(up)) => from_autodiff(swiglu_tracked(gate, up)),
        (CpuF32::Plain(gate), CpuF32::Plain(up)) => from_flex(swiglu_forward(&gate, &up)),
        (gate, up) => burn::tensor::activation::silu(gate.into_tensor()) * up.into_tensor::<D>(),
    }
}

/// RMSNorm as transformers computes it in f32: `γ · (x · 1/√(mean(x²) + ε))` over the last
/// dimension. `x`: `[…, dim]`; `gamma`: `[dim]` → `[…, dim]`.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dim = x.dims()[D - 1];
    if gamma.dims() != [dim] || dim == 0 {
        return rms_norm_composed(x, gamma, eps);
    }
    match (
        cpu_f32::<B>(x.into_primitive().tensor()),
        cpu_f32::<B>(gamma.into_primitive().tensor()),
    ) {
        (CpuF32::Tracked(x), CpuF32::Tracked(gamma)) => {
            from_autodiff(rms_norm_tracked(x, gamma, eps as f32))
        }
        (CpuF32::Plain(x), CpuF32::Plain(gamma)) => {
            let gamma = gamma.to_contiguous();
            from_flex(rms_norm_forward(&x, gamma.storage::<f32>(), eps as f32).0)
        }
        (x, gamma) => rms_norm_composed(x.into_tensor(), gamma.into_tensor(), eps),
    }
}

/// burn's composition of RMSNorm, for every other backend and dtype.
fn rms_norm_composed<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
    let normed = x * (variance + eps).sqrt().recip();
    normed * gamma.unsqueeze()
}

/// `[a, m, n, d]` → `[a, n, m, d]`, the middle dimensions swapped (attention's heads split
/// from and merged back into the sequence). On the CPU the result is materialised in one
/// pass of `d`-element block copies, and so is its gradient: burn-flex would otherwise copy
/// the strided view element by element wherever it is reshaped or read, forward and back.
/// Elsewhere it is `swap_dims(1, 2)`, a view.
pub fn swap_middle<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    match cpu_f32::<B>(x.into_primitive().tensor()) {
        CpuF32::Tracked(x) => from_autodiff(swap_middle_tracked(x)),
        CpuF32::Plain(x) => from_flex(swap_middle_forward(&x)),
        CpuF32::Other(x) => {
            Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x)).swap_dims(1, 2)
        }
    }
}

/// `a·b` over the last two dimensions: `[…, m, k]·[…, k, n]` → `[…, m, n]`, the leading
/// (batch) dimensions of `a` and `b` equal. On the CPU the products run in gemm exactly as
/// burn-flex runs them (same strides, same split across threads, so the same sums), but the
/// result is written into fresh memory: burn-flex zeroes every result buffer and then copies
/// it to realign it, two passes over memory on one core for every product, forward and back,
/// while the other core waits. Elsewhere (other backends, dtypes, broadcast batch
/// dimensions) it is burn's `matmul`.
pub fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    let (a_dims, b_dims) = (a.dims(), b.dims());
    let fits = D >= 2 && a_dims[..D - 2] == b_dims[..D - 2] && a_dims[D - 1] == b_dims[D - 2];
    match (
        cpu_f32::<B>(a.into_primitive().tensor()),
        cpu_f32::<B>(b.into_primitive().tensor()),
    ) {
        (CpuF32::Tracked(a), CpuF32::Tracked(b)) if fits => from_autodiff(matmul_tracked(a, b)),
        (CpuF32::Plain(a), CpuF32::Plain(b)) if fits => from_flex(gemm_product(&a, &b)),
        (a, b) => a.into_tensor::<D>().matmul(b.into_tensor()),
    }
}

/// Rotary position embedding, transformers' `x·cos + rotate_half(x)·sin`, on the leading
/// `rotary_dim` of each head's dimensions (`rotate_half`: the halves `[a, b]` → `[−b, a]`);
/// the rest pass through.
///
/// `x`: `[batch, heads, seq, head_dim]`; `cos`, `sin`: `[rows, 1, seq · head_dim]` (1 and 0
/// past the rotary dimensions), where the rows (1 or batch) divide batch·heads evenly, row `r`
/// serving the `batch·heads / rows` consecutive heads from `r` on; `rotate_half`:
/// `[head_dim, head_dim]`, the signed permutation with `x · rotate_half = rotate_half(x)`. →
/// `[batch, heads, seq, head_dim]`, contiguous. The tables take no gradient.
///
/// On the CPU the rotation is one pass forward and one back, parallel over heads; elsewhere
/// the permutation is a matrix product (exact: one ±1 a column), then two products and a sum
/// with the tables, which is what the CPU computes too.
pub fn rotary<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
    rotate_half: Tensor<B, 2>,
    rotary_dim: usize,
) -> Tensor<B, 4> {
    let [b, n, s, d] = x.dims();
    let rows = cos.dims()[0];
    let fits = rows > 0
        && (b * n).is_multiple_of(rows)
        && cos.dims() == [rows, 1, s * d]
        && sin.dims() == cos.dims()
        && rotary_dim <= d
        && rotary_dim.is_multiple_of(2);
    let table = |t: &Tensor<B, 3>| match cpu_f32::<B>(t.clone().into_primitive().tensor()) {
        CpuF32::Tracked(t) => Some(t.primitive.to_contiguous()),
        CpuF32::Plain(t) => Some(t.to_contiguous()),
        CpuF32::Other(_) => None,
    };
    let tables = fits
        .then(|| {
            Some(RotaryTables {
                cos: table(&cos)?,
                sin: table(&sin)?,
                rotary_dim,
                block: s * d,
                head_dim: d,
            })
        })
        .flatten();
    match (cpu_f32::<B>(x.into_primitive().tensor()), tables) {
        (CpuF32::Tracked(x), Some(t)) => from_autodiff(rotary_tracked(x, t)),
        (CpuF32::Plain(x), Some(t)) => from_flex(rotary_pass(&x, &t, Direction::Forward)),
        (x, _) => rotary_composed(x.into_tensor(), cos, sin, rotate_half),
    }
}

/// burn's composition of [`rotary`], for every other backend and dtype.
fn rotary_composed<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
    rotate_half: Tensor<B, 2>,
) -> Tensor<B, 4> {
    let [b, n, s, d] = x.dims();
    let flat = x.reshape([b * n * s, d]);
    // A plain f32 product even under bf16 matrix products: it only moves values.
    let rotated = matmul(flat.clone(), rotate_half);
    let rows = cos.dims()[0];
    let by_row = |x: Tensor<B, 2>| x.reshape([rows, b * n / rows, s * d]);
    (by_row(flat) * cos + by_row(rotated) * sin).reshape([b, n, s, d])
}

/// Whether `t` is an f32 tensor of the CPU backend outside autodiff: what [`adamw_update`]
/// takes.
pub fn is_plain_cpu_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> bool {
    TypeId::of::<FloatTensor<B>>() == TypeId::of::<FlexTensor>() && t.dtype() == DType::F32
}

/// The constants of one AdamW update as burn's `AdamW` (decoupled weight decay, no AMSGrad)
/// uses them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWUpdate {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    pub lr: f64,
    /// The number of this update, from 1.
    pub time: usize,
}

/// One AdamW update of a weight: `(weight, moment 1, moment 2)` after it, given the gradient
/// and the moments before (`None` at the first update). The operations of burn's `AdamW`, in
/// its order and precision, so the result is its result bit for bit — but in one pass over
/// the four tensors, in place where they are not shared, parallel over chunks, where burn
/// makes about fifteen single-threaded passes, each with a fresh buffer.
///
/// Every tensor must satisfy [`is_plain_cpu_f32`], all of one shape.
pub fn adamw_update<B: Backend, const D: usize>(
    weight: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
    u: &AdamWUpdate,
) -> (Tensor<B, D>, Tensor<B, D>, Tensor<B, D>) {
    let flex = |t: Tensor<B, D>| -> FlexTensor {
        let t: FlexTensor = same_type(Box::new(t.into_primitive().tensor()));
        // Unique and contiguous from element 0 (a copy only where it is not).
        FlexTensor::from_data(t.into_data())
    };
    let mut w = flex(weight);
    let g = flex(grad);
    let first = moments.is_none();
    let (mut m1, mut m2) = match moments {
        Some((m1, m2)) => (flex(m1), flex(m2)),
        None => {
            let zeros = || {
                FlexTensor::from_data(TensorData::new(
                    vec![0f32; g.shape().num_elements()],
                    g.shape(),
                ))
            };
            (zeros(), zeros())
        }
    };
    let (b1, b2, eps) = (u.beta_1, u.beta_2, u.epsilon);
    let (f1, f2) = (1.0 - b1, 1.0 - b2);
    let time = u.time as i32;
    // As burn's `div_scalar(1 − β^t)`: an f32, divided by (not multiplied by its reciprocal).
    let (c1, c2) = (1f32 - b1.powi(time), 1f32 - b2.powi(time));
    let decay_rate = u.lr * u.weight_decay as f64;
    let decay = (decay_rate != 0.0).then_some((1.0 - decay_rate) as f32);
    let lr = u.lr as f32;
    let g_values = g.storage::<f32>();
    let (w_values, m1_values, m2_values) = (
        w.try_storage_mut::<f32>().expect("made unique above"),
        m1.try_storage_mut::<f32>().expect("made unique above"),
        m2.try_storage_mut::<f32>().expect("made unique above"),
    );
    w_values
        .par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(m1_values.par_chunks_mut(ELEMENTS_PER_TASK))
        .zip(m2_values.par_chunks_mut(ELEMENTS_PER_TASK))
        .zip(g_values.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|(((w, m1), m2), g)| {
            vectorised(|| {
                for (((w, m1), m2), &g) in w.iter_mut().zip(m1).zip(m2).zip(g) {
                    let g2 = g * g;
                    (*m1, *m2) = if first {
                        (g * f1, g2 * f2)
                    } else {
                        (*m1 * b1 + g * f1, *m2 * b2 + g2 * f2)
                    };
                    let delta = (*m1 / c1) / ((*m2 / c2).sqrt() + eps);
                    let decayed = match decay {
                        Some(factor) => *w * factor,
                        None => *w,
                    };
                    *w = decayed - delta * lr;
                }
            })
        });
    (from_flex(w), from_flex(m1), from_flex(m2))
}

/// A float primitive sorted by whether the kernels here can take it.
enum CpuF32<B: Backend> {
    /// burn-flex under autodiff (training).
    Tracked(AutodiffTensor),
    /// burn-flex (inference).
    Plain(FlexTensor),
    /// Anything else, handed back untouched.
    Other(FloatTensor<B>),
}

fn cpu_f32<B: Backend>(t: FloatTensor<B>) -> CpuF32<B> {
    let boxed: Box<dyn Any> = Box::new(t);
    let boxed = match boxed.downcast::<AutodiffTensor>() {
        Ok(t) if t.primitive.dtype() == DType::F32 => return CpuF32::Tracked(*t),
        Ok(t) => t as Box<dyn Any>,
        Err(other) => other,
    };
    let boxed = match boxed.downcast::<FlexTensor>() {
        Ok(t) if t.dtype() == DType::F32 => return CpuF32::Plain(*t),
        Ok(t) => t as Box<dyn Any>,
        Err(other) => other,
    };
    CpuF32::Other(same_type(boxed))
}

impl<B: Backend> CpuF32<B> {
    /// The tensor back, for burn's composed operations.
    fn into_tensor<const D: usize>(self) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(self.into_float()))
    }

    /// The primitive back, for burn's composed operations.
    fn into_float(self) -> FloatTensor<B> {
        match self {
            CpuF32::Tracked(t) => same_type(Box::new(t)),
            CpuF32::Plain(t) => same_type(Box::new(t)),
            CpuF32::Other(t) => t,
        }
    }
}

/// The value back as the type it is known to have (it was boxed from a `FloatTensor<B>`).
pub(crate) fn same_type<T: 'static>(boxed: Box<dyn Any>) -> T {
    *boxed
        .downcast::<T>()
        .unwrap_or_else(|_| unreachable!("a primitive is unboxed as the type it was boxed from"))
}

fn from_autodiff<B: Backend, const D: usize>(t: AutodiffTensor) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(same_type(Box::new(t))))
}

fn from_flex<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(same_type(Box::new(t))))
}

// ---------------------------------------------------------------------------------------
// Matrix products

#[derive(Debug)]
struct MatmulBackward;

impl Backward<Flex, 2> for MatmulBackward {
    /// `a` when `b` takes a gradient, `b` when `a` does (what burn's matmul keeps).
    type State = (Option<FlexTensor>, Option<FlexTensor>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (a, b) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let [a_node, b_node] = ops.parents;
        let last = grad.shape().num_dims() - 1;
        if let (Some(node), Some(b)) = (a_node, b) {
            // d a = g · bᵀ; the transpose is a view, read through its strides.
            grads.register::<Flex>(node.id, gemm_product(&grad, &b.transpose(last - 1, last)));
        }
        if let (Some(node), Some(a)) = (b_node, a) {
            // d b = aᵀ · g
            grads.register::<Flex>(node.id, gemm_product(&a.transpose(last - 1, last), &grad));
        }
    }
}

fn matmul_tracked(a: AutodiffTensor, b: AutodiffTensor) -> AutodiffTensor {
    let (a_tracked, b_tracked) = (a.is_tracked(), b.is_tracked());
    match MatmulBackward
        .prepare::<NoCheckpointing>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = gemm_product(&a.primitive, &b.primitive);
            let keep_a = b_tracked.then(|| a.primitive.clone());
            let keep_b = a_tracked.then(|| b.primitive.clone());
            prep.finish((keep_a, keep_b), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(gemm_product(&a.primitive, &b.primitive)),
    }
}

/// Products below this many multiply-adds run on one thread (burn-flex's threshold).
const GEMM_PARALLEL_OPS: usize = 192 * 192 * 192;
/// Batches of small products above this many multiply-adds in all are shared out a product
/// per task (burn-flex's threshold).
const GEMM_BATCH_PARALLEL_OPS: usize = 128 * 128 * 128;

/// `a·b` over the last two dimensions, through gemm, into a buffer gemm writes without reading
/// (`[…, m, k]·[…, k, n]` → `[…, m, n]`, equal batch dimensions, any strides). The products
/// are split across threads as burn-flex splits them, so the sums are its sums.
fn gemm_product(a: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let (a_shape, b_shape) = (a.shape(), b.shape());
    let rank = a_shape.num_dims();
    let (m, k, n) = (a_shape[rank - 2], a_shape[rank - 1], b_shape[rank - 1]);
    let batch_dims: Vec<usize> = (0..rank - 2).map(|i| a_shape[i]).collect();
    let batches: usize = batch_dims.iter().product();
    let mut out_dims = batch_dims.clone();
    out_dims.extend([m, n]);
    let size = m * n;
    let (a_layout, b_layout) = (a.layout(), b.layout());
    let (a_strides, b_strides) = (a_layout.strides(), b_layout.strides());
    // The element offset of batch `i`'s matrix in a tensor of these strides.
    let offset = |i: usize, start: usize, strides: &[isize]| -> isize {
        let mut rest = i;
        let mut at = start as isize;
        for d in (0..batch_dims.len()).rev() {
            at += (rest % batch_dims[d]) as isize * strides[d];
            rest /= batch_dims[d];
        }
        at
    };
    let (a_data, b_data) = (a.storage::<f32>(), b.storage::<f32>());
    let mut out: Vec<f32> = Vec::with_capacity(batches * size);
    if k == 0 {
        out.resize(batches * size, 0.0);
        return FlexTensor::from_data(TensorData::new(out, out_dims));
    }
    let dst = SendPtr(out.as_mut_ptr());
    let one = |i: usize, parallelism: gemm::Parallelism| {
        // SAFETY: every batch index writes its own `m × n` block of `out`, whose capacity
        // holds all of them; the operands are read inside their storage through their
        // layouts' strides and offsets.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.at(i * size),
                1,
                n as isize,
                false,
                a_data
                    .as_ptr()
                    .offset(offset(i, a_layout.start_offset(), a_strides)),
                a_strides[rank - 1],
                a_strides[rank - 2],
                b_data
                    .as_ptr()
                    .offset(offset(i, b_layout.start_offset(), b_strides)),
                b_strides[rank - 1],
                b_strides[rank - 2],
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    };
    let per_product = m.saturating_mul(n).saturating_mul(k);
    let total = per_product.saturating_mul(batches);
    let prefer_batches = batches >= 4 && total >= GEMM_BATCH_PARALLEL_OPS;
    if per_product >= GEMM_PARALLEL_OPS && !prefer_batches {
        (0..batches).for_each(|i| one(i, gemm::Parallelism::Rayon(0)));
    } else if batches > 1 && total >= GEMM_BATCH_PARALLEL_OPS {
        (0..batches)
            .into_par_iter()
            .for_each(|i| one(i, gemm::Parallelism::None));
    } else {
        (0..batches).for_each(|i| one(i, gemm::Parallelism::None));
    }
    // SAFETY: gemm wrote all `batches · m · n` elements (it does not read the destination).
    unsafe { out.set_len(batches * size) };
    FlexTensor::from_data(TensorData::new(out, out_dims))
}

/// A result buffer shared by the tasks that each write their own part of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks write disjoint parts of one buffer that outlives them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY (callers): `offset` lies within the buffer's capacity.
        unsafe { self.0.add(offset) }
    }
}

// ---------------------------------------------------------------------------------------
// Rotary position embedding

/// The tables of one rotation, contiguous (see [`rotary`]).
#[derive(Debug, Clone)]
struct RotaryTables {
    /// `[rows, seq · head_dim]`
    cos: FlexTensor,
    sin: FlexTensor,
    rotary_dim: usize,
    /// `seq · head_dim`: one head's values.
    block: usize,
    head_dim: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Direction {
    /// `y = x·cos + rotate_half(x)·sin`
    Forward,
    /// `dx = g·cos + rotate_halfᵀ(g·sin)`
    Backward,
}

#[derive(Debug)]
struct RotaryBackward;

impl Backward<Flex, 1> for RotaryBackward {
    type State = RotaryTables;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let tables = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            rotary_pass(&grad, &tables, Direction::Backward)
        });
    }
}

fn rotary_tracked(x: AutodiffTensor, tables: RotaryTables) -> AutodiffTensor {
    match RotaryBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = rotary_pass(&x.primitive, &tables, Direction::Forward);
            prep.finish(tables, y)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(rotary_pass(&x.primitive, &tables, Direction::Forward))
        }
    }
}

/// One pass of the rotation over `x` (`[batch, heads, seq, head_dim]`), forward or its
/// gradient, a task per head. Each value is computed with the operations and in the order of
/// the composition (products with the tables, then their sum), so the two agree.
fn rotary_pass(x: &FlexTensor, t: &RotaryTables, direction: Direction) -> FlexTensor {
    let shape = x.shape();
    let x = x.to_contiguous();
    let x = x.storage::<f32>();
    let (cos, sin) = (t.cos.storage::<f32>(), t.sin.storage::<f32>());
    let rows = cos.len() / t.block;
    let heads_per_row = x.len() / t.block / rows;
    let (d, half) = (t.head_dim, t.rotary_dim / 2);
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(t.block)
        .zip(x.par_chunks(t.block))
        .enumerate()
        .for_each(|(head, (y, x))| {
            let row = head / heads_per_row;
            let (cos, sin) = (
                &cos[row * t.block..][..t.block],
                &sin[row * t.block..][..t.block],
            );
            for (((y, x), cos), sin) in y
                .chunks_exact_mut(d)
                .zip(x.chunks_exact(d))
                .zip(cos.chunks_exact(d))
                .zip(sin.chunks_exact(d))
            {
                for j in 0..d {
                    let turned = match direction {
                        // rotate_half(x)_j · sin_j
                        Direction::Forward if j < half => -x[j + half] * sin[j],
                        Direction::Forward if j < 2 * half => x[j - half] * sin[j],
                        // (g·sin) through rotate_half's transpose
                        Direction::Backward if j < half => x[j + half] * sin[j + half],
                        Direction::Backward if j < 2 * half => -(x[j - half] * sin[j - half]),
                        _ => 0.0 * sin[j],
                    };
                    y[j] = x[j] * cos[j] + turned;
                }
            }
        });
    FlexTensor::from_data(TensorData::new(y, shape))
}

// ---------------------------------------------------------------------------------------
// Attention's softmax

#[derive(Debug)]
struct MaskedSoftmaxBackward;

impl Backward<Flex, 1> for MaskedSoftmaxBackward {
    /// The probabilities and the scale.
    type State = (FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (probs, scale) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            masked_softmax_backward(&probs, &grad, scale)
        });
    }
}

fn softmax_tracked(scores: AutodiffTensor, mask: &FlexTensor, scale: f32) -> AutodiffTensor {
    match MaskedSoftmaxBackward
        .prepare::<NoCheckpointing>([scores.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let probs = masked_softmax_forward(&scores.primitive, mask, scale);
            prep.finish((probs.clone(), scale), probs)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(masked_softmax_forward(&scores.primitive, mask, scale))
        }
    }
}

fn masked_softmax_forward(scores: &FlexTensor, mask: &FlexTensor, scale: f32) -> FlexTensor {
    let shape = scores.shape();
    let (s, t) = (shape[2], shape[3]);
    let scores = scores.to_contiguous();
    let mask = mask.to_contiguous();
    let (x, m) = (scores.storage::<f32>(), mask.storage::<f32>());
    let heads_per_mask_row = x.len() / m.len();
    let mut probs = vec![0f32; x.len()];
    probs
        .par_chunks_mut(s * t)
        .zip(x.par_chunks(s * t))
        .enumerate()
        .for_each(|(head, (y, x))| {
            let m = &m[head / heads_per_mask_row * s * t..][..s * t];
            vectorised(|| {
                for ((y, x), m) in y
                    .chunks_exact_mut(t)
                    .zip(x.chunks_exact(t))
                    .zip(m.chunks_exact(t))
                {
                    softmax_row(x, m, scale, y);
                }
            })
        });
    FlexTensor::from_data(TensorData::new(probs, shape))
}

/// `d scores = scale · p ⊙ (g − Σ g ⊙ p)`, row by row.
fn masked_softmax_backward(probs: &FlexTensor, grad: &FlexTensor, scale: f32) -> FlexTensor {
    let shape = probs.shape();
    let t = shape[shape.num_dims() - 1];
    let grad = grad.to_contiguous();
    let (p, g) = (probs.storage::<f32>(), grad.storage::<f32>());
    let mut dx = vec![0f32; p.len()];
    let rows_per_task = (4096 / t).max(1) * t;
    dx.par_chunks_mut(rows_per_task)
        .zip(p.par_chunks(rows_per_task).zip(g.par_chunks(rows_per_task)))
        .for_each(|(dx, (p, g))| {
            vectorised(|| {
                for ((dx, p), g) in dx
                    .chunks_exact_mut(t)
                    .zip(p.chunks_exact(t))
                    .zip(g.chunks_exact(t))
                {
                    let dot = lanes_dot(p, g);
                    for ((dx, &p), &g) in dx.iter_mut().zip(p).zip(g) {
                        *dx = scale * (p * (g - dot));
                    }
                }
            })
        });
    FlexTensor::from_data(TensorData::new(dx, shape))
}

/// One row: `y = softmax(x · scale + m)`.
#[inline(always)]
fn softmax_row(x: &[f32], m: &[f32], scale: f32, y: &mut [f32]) {
    for ((y, &x), &m) in y.iter_mut().zip(x).zip(m) {
        *y = x * scale + m;
    }
    let max = lanes_max(y);
    for y in y.iter_mut() {
        *y = exp_nonpositive(*y - max);
    }
    let sum = lanes_sum(y, |y| y);
    for y in y.iter_mut() {
        *y /= sum;
    }
}

// ---------------------------------------------------------------------------------------
// Cross-entropy

/// Each row's target and weight.
#[derive(Debug, Clone)]
struct Rows {
    targets: Vec<usize>,
    weights: Vec<f32>,
}

/// A row's softmax normaliser: its largest logit and `ln Σ exp(x − max)`, kept apart because
/// `x − max − ln_sum` is exact where `x − (max + ln_sum)` would round the sum to the precision
/// of `max` — which loses the gradient of a confidently predicted target (`1 − p` of about
/// 1e-5 against logits near 10).
#[derive(Debug, Clone, Copy, Default)]
struct Normaliser {
    max: f32,
    ln_sum: f32,
}

impl Normaliser {
    fn of(x: &[f32]) -> Self {
        let max = lanes_max(x);
        let ln_sum = lanes_sum(x, |x| exp_nonpositive(x - max)).ln();
        Normaliser { max, ln_sum }
    }

    /// `log softmax(x)_i` for `x_i`, as PyTorch and burn compute it: `(x − max) − ln_sum`.
    #[inline(always)]
    fn log_prob(self, x: f32) -> f32 {
        (x - self.max) - self.ln_sum
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    /// The logits, the rows' targets and weights, and each row's normaliser.
    type State = (FlexTensor, Rows, Vec<Normaliser>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, rows, normalisers) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            cross_entropy_backward(&logits, &rows, &normalisers, &grad)
        });
    }
}

fn cross_entropy_tracked(logits: AutodiffTensor, rows: Rows) -> AutodiffTensor {
    let sum_tensor = |sum: f32| FlexTensor::from_data(TensorData::new(vec![sum], [1]));
    match CrossEntropyBackward
        .prepare::<NoCheckpointing>([logits.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let logits = logits.primitive.to_contiguous();
            let (sum, normalisers) = cross_entropy_forward(&logits, &rows);
            prep.finish((logits, rows, normalisers), sum_tensor(sum))
        }
        OpsKind::UnTracked(prep) => {
            let (sum, _) = cross_entropy_forward(&logits.primitive, &rows);
            prep.finish(sum_tensor(sum))
        }
    }
}

/// The weighted sum of the rows' losses, and each row's normaliser (zeros for rows of weight 0).
fn cross_entropy_forward(logits: &FlexTensor, rows: &Rows) -> (f32, Vec<Normaliser>) {
    let logits = logits.to_contiguous();
    let x = logits.storage::<f32>();
    let vocab = logits.shape()[1];
    let normalisers: Vec<Normaliser> = x
        .par_chunks(vocab)
        .zip(rows.weights.par_iter())
        .map(|(x, &w)| {
            if w == 0.0 {
                return Normaliser::default();
            }
            vectorised(|| Normaliser::of(x))
        })
        .collect();
    // Summed in one order, in f64, so that the loss is the same on every run and CPU count.
    let sum: f64 = normalisers
        .iter()
        .zip(x.chunks_exact(vocab))
        .zip(rows.targets.iter().zip(&rows.weights))
        .filter(|(_, (_, &w))| w != 0.0)
        // A target outside the vocabulary makes the loss NaN, which training reports.
        .map(|((n, x), (&t, &w))| {
            -(w as f64) * n.log_prob(x.get(t).copied().unwrap_or(f32::NAN)) as f64
        })
        .sum();
    (sum as f32, normalisers)
}

/// `d logits[r] = g · w_r · (softmax(logits[r]) − onehot(t_r))`.
fn cross_entropy_backward(
    logits: &FlexTensor,
    rows: &Rows,
    normalisers: &[Normaliser],
    grad: &FlexTensor,
) -> FlexTensor {
    let shape = logits.shape();
    let vocab = shape[1];
    let g = grad.to_contiguous().storage::<f32>()[0];
    let x = logits.storage::<f32>();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(vocab)
        .zip(x.par_chunks(vocab))
        .zip(normalisers.par_iter())
        .zip(rows.targets.par_iter().zip(rows.weights.par_iter()))
        .for_each(|(((dx, x), &n), (&t, &w))| {
            if w == 0.0 {
                return;
            }
            let gw = g * w;
            vectorised(|| {
                for (dx, &x) in dx.iter_mut().zip(x) {
                    *dx = gw * exp_nonpositive(n.log_prob(x));
                }
            });
            if let Some(d) = dx.get_mut(t) {
                *d -= gw;
            }
        });
    FlexTensor::from_data(TensorData::new(dx, shape))
}

// ---------------------------------------------------------------------------------------
// Swapping the middle dimensions

#[derive(Debug)]
struct SwapMiddleBackward;

impl Backward<Flex, 1> for SwapMiddleBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            swap_middle_forward(&grad)
        });
    }
}

fn swap_middle_tracked(x: AutodiffTensor) -> AutodiffTensor {
    match SwapMiddleBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((), swap_middle_forward(&x.primitive)),
        OpsKind::UnTracked(prep) => prep.finish(swap_middle_forward(&x.primitive)),
    }
}

fn swap_middle_forward(x: &FlexTensor) -> FlexTensor {
    let shape = x.shape();
    let [a, m, n, d] = [shape[0], shape[1], shape[2], shape[3]];
    let x = x.to_contiguous();
    let x = x.storage::<f32>();
    let mut y = vec![0f32; x.len()];
    if y.is_empty() {
        return FlexTensor::from_data(TensorData::new(y, [a, n, m, d]));
    }
    // Each task writes one `[m, d]` block of the output: `y[ai, ni] = x[ai, :, ni]`.
    y.par_chunks_mut(m * d).enumerate().for_each(|(block, y)| {
        let (ai, ni) = (block / n, block % n);
        for (mi, y) in y.chunks_exact_mut(d).enumerate() {
            let from = ((ai * m + mi) * n + ni) * d;
            y.copy_from_slice(&x[from..from + d]);
        }
    });
    FlexTensor::from_data(TensorData::new(y, [a, n, m, d]))
}

// ---------------------------------------------------------------------------------------
// SwiGLU

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    /// `gate` and `up`, contiguous.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let [gate_node, up_node] = ops.parents;
        let (d_gate, d_up) = swiglu_backward(&gate, &up, &grad);
        if let Some(node) = gate_node {
            grads.register::<Flex>(node.id, d_gate);
        }
        if let Some(node) = up_node {
            grads.register::<Flex>(node.id, d_up);
        }
    }
}

fn swiglu_tracked(gate: AutodiffTensor, up: AutodiffTensor) -> AutodiffTensor {
    match SwigluBackward
        .prepare::<NoCheckpointing>([gate.node.clone(), up.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (gate, up) = (gate.primitive.to_contiguous(), up.primitive.to_contiguous());
            let out = swiglu_forward(&gate, &up);
            prep.finish((gate, up), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(swiglu_forward(&gate.primitive, &up.primitive)),
    }
}

/// Elements a task: enough to outweigh a task's cost, few enough to share the work out.
const ELEMENTS_PER_TASK: usize = 1 << 14;

fn swiglu_forward(gate: &FlexTensor, up: &FlexTensor) -> FlexTensor {
    let shape = gate.shape();
    let (gate, up) = (gate.to_contiguous(), up.to_contiguous());
    let (g, u) = (gate.storage::<f32>(), up.storage::<f32>());
    let mut y = vec![0f32; g.len()];
    y.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(
            g.par_chunks(ELEMENTS_PER_TASK)
                .zip(u.par_chunks(ELEMENTS_PER_TASK)),
        )
        .for_each(|(y, (g, u))| {
            vectorised(|| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    // silu rounded first, then the product: PyTorch's `act_fn(gate) * up`.
                    *y = (g * sigmoid(g)) * u;
                }
            })
        });
    FlexTensor::from_data(TensorData::new(y, shape))
}

/// `d gate = g · up · σ(gate) · (1 + gate · (1 − σ(gate)))`, `d up = g · silu(gate)`.
fn swiglu_backward(
    gate: &FlexTensor,
    up: &FlexTensor,
    grad: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let shape = gate.shape();
    let grad = grad.to_contiguous();
    let (x, u, g) = (
        gate.storage::<f32>(),
        up.storage::<f32>(),
        grad.storage::<f32>(),
    );
    let mut d_gate = vec![0f32; x.len()];
    let mut d_up = vec![0f32; x.len()];
    d_gate
        .par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(d_up.par_chunks_mut(ELEMENTS_PER_TASK))
        .zip(x.par_chunks(ELEMENTS_PER_TASK))
        .zip(
            u.par_chunks(ELEMENTS_PER_TASK)
                .zip(g.par_chunks(ELEMENTS_PER_TASK)),
        )
        .for_each(|(((d_gate, d_up), x), (u, g))| {
            vectorised(|| {
                for ((((dg, du), &x), &u), &g) in
                    d_gate.iter_mut().zip(d_up.iter_mut()).zip(x).zip(u).zip(g)
                {
                    let s = sigmoid(x);
                    *du = g * (x * s);
                    *dg = g * u * (s * (1.0 + x * (1.0 - s)));
                }
            })
        });
    (
        FlexTensor::from_data(TensorData::new(d_gate, shape.clone())),
        FlexTensor::from_data(TensorData::new(d_up, shape)),
    )
}

// ---------------------------------------------------------------------------------------
// RMSNorm

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    /// `x` (contiguous), γ, and each row's `1/√(mean(x²) + ε)`.
    type State = (FlexTensor, Vec<f32>, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gamma, inv_rms) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let [x_node, gamma_node] = ops.parents;
        let (dx, d_gamma) = rms_norm_backward(&x, &gamma, &inv_rms, &grad, gamma_node.is_some());
        if let Some(node) = x_node {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = gamma_node {
            let dim = gamma.len();
            grads.register::<Flex>(
                node.id,
                FlexTensor::from_data(TensorData::new(d_gamma, [dim])),
            );
        }
    }
}

fn rms_norm_tracked(x: AutodiffTensor, gamma: AutodiffTensor, eps: f32) -> AutodiffTensor {
    let gamma_values = gamma.primitive.to_contiguous().storage::<f32>().to_vec();
    match RmsNormBackward
        .prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let x = x.primitive.to_contiguous();
            let (y, inv_rms) = rms_norm_forward(&x, &gamma_values, eps);
            prep.finish((x, gamma_values, inv_rms), y)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(rms_norm_forward(&x.primitive, &gamma_values, eps).0)
        }
    }
}

/// Rows of `dim` elements a task: about `ELEMENTS_PER_TASK` elements.
fn rows_per_task(dim: usize) -> usize {
    (ELEMENTS_PER_TASK / dim).max(1)
}

/// The normalised rows, and each row's `1/√(mean(x²) + ε)`.
fn rms_norm_forward(x: &FlexTensor, gamma: &[f32], eps: f32) -> (FlexTensor, Vec<f32>) {
    let shape = x.shape();
    let dim = gamma.len();
    let x = x.to_contiguous();
    let x = x.storage::<f32>();
    let mut y = vec![0f32; x.len()];
    let mut inv_rms = vec![0f32; x.len() / dim];
    let rows = rows_per_task(dim);
    y.par_chunks_mut(rows * dim)
        .zip(inv_rms.par_chunks_mut(rows))
        .zip(x.par_chunks(rows * dim))
        .for_each(|((y, inv_rms), x)| {
            vectorised(|| {
                for ((y, r), x) in y
                    .chunks_exact_mut(dim)
                    .zip(inv_rms.iter_mut())
                    .zip(x.chunks_exact(dim))
                {
                    let mean_square = lanes_sum(x, |v| v * v) / dim as f32;
                    *r = 1.0 / (mean_square + eps).sqrt();
                    for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
                        *y = g * (x * *r);
                    }
                }
            })
        });
    (FlexTensor::from_data(TensorData::new(y, shape)), inv_rms)
}

/// With `n = x · r` and `dn = g ⊙ γ`: `dx = r · (dn − n · mean(dn ⊙ n))`, and `dγ = Σ_rows
/// g ⊙ n` (summed task by task in a fixed order, the same on every run and CPU count; left
/// empty when γ takes no gradient).
fn rms_norm_backward(
    x: &FlexTensor,
    gamma: &[f32],
    inv_rms: &[f32],
    grad: &FlexTensor,
    with_gamma: bool,
) -> (FlexTensor, Vec<f32>) {
    let shape = x.shape();
    let dim = gamma.len();
    let grad = grad.to_contiguous();
    let (x, g) = (x.storage::<f32>(), grad.storage::<f32>());
    let mut dx = vec![0f32; x.len()];
    let rows = rows_per_task(dim);
    let partial_d_gamma: Vec<Vec<f32>> = dx
        .par_chunks_mut(rows * dim)
        .zip(x.par_chunks(rows * dim).zip(g.par_chunks(rows * dim)))
        .zip(inv_rms.par_chunks(rows))
        .map(|((dx, (x, g)), inv_rms)| {
            let mut d_gamma = vec![0f32; if with_gamma { dim } else { 0 }];
            vectorised(|| {
                for (((dx, x), g), &r) in dx
                    .chunks_exact_mut(dim)
                    .zip(x.chunks_exact(dim))
                    .zip(g.chunks_exact(dim))
                    .zip(inv_rms)
                {
                    let dot = lanes_sum_zip3(x, g, gamma, |x, g, gamma| (g * gamma) * (x * r));
                    let mean = dot / dim as f32;
                    for (((dx, &x), &g), &gamma) in dx.iter_mut().zip(x).zip(g).zip(gamma) {
                        *dx = r * ((g * gamma) - (x * r) * mean);
                    }
                    for ((d, &x), &g) in d_gamma.iter_mut().zip(x).zip(g) {
                        *d += g * (x * r);
                    }
                }
            });
            d_gamma
        })
        .collect();
    let mut d_gamma = vec![0f32; if with_gamma { dim } else { 0 }];
    for partial in &partial_d_gamma {
        for (d, &p) in d_gamma.iter_mut().zip(partial) {
            *d += p;
        }
    }
    (FlexTensor::from_data(TensorData::new(dx, shape)), d_gamma)
}

// ---------------------------------------------------------------------------------------
// Vectorised arithmetic

/// Runs `f` compiled for the widest SIMD instruction set of this CPU (AVX-512, AVX2+FMA or
/// the x86-64 baseline), chosen at run time; the loops inside are vectorised by the compiler.
#[inline(always)]
fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// The lanes of the sums and maxima here: sixteen accumulators let the compiler fill a
/// register of any width, and fix the order of the additions whatever the CPU.
const LANES: usize = 16;

/// The largest of `x` (−∞ when empty). A NaN is passed over here and surfaces in the
/// `exp(x − max)` that follows every call.
#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut max = acc.into_iter().fold(f32::NEG_INFINITY, f32::max);
    for &v in tail {
        max = max.max(v);
    }
    max
}

/// `Σ f(x_i)`, added in `LANES` interleaved partial sums.
#[inline(always)]
fn lanes_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    let mut sum = acc.into_iter().sum::<f32>();
    for &v in tail {
        sum += f(v);
    }
    sum
}

/// `Σ a_i · b_i`, added in `LANES` interleaved partial sums.
#[inline(always)]
fn lanes_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_tail, b_tail) = (a_chunks.remainder(), b_chunks.remainder());
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((acc, &a), &b) in acc.iter_mut().zip(a).zip(b) {
            *acc += a * b;
        }
    }
    let mut sum = acc.into_iter().sum::<f32>();
    for (&a, &b) in a_tail.iter().zip(b_tail) {
        sum += a * b;
    }
    sum
}

/// `Σ f(a_i, b_i, c_i)`, added in `LANES` interleaved partial sums.
#[inline(always)]
fn lanes_sum_zip3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len().min(b.len()).min(c.len());
    let whole = n / LANES * LANES;
    for ((a, b), c) in a[..whole]
        .chunks_exact(LANES)
        .zip(b[..whole].chunks_exact(LANES))
        .zip(c[..whole].chunks_exact(LANES))
    {
        for (((acc, &a), &b), &c) in acc.iter_mut().zip(a).zip(b).zip(c) {
            *acc += f(a, b, c);
        }
    }
    let mut sum = acc.into_iter().sum::<f32>();
    for ((&a, &b), &c) in a[whole..n].iter().zip(&b[whole..n]).zip(&c[whole..n]) {
        sum += f(a, b, c);
    }
    sum
}

/// `1 / (1 + e^−x)`, from `e^−|x|` so that the exponential never overflows.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let one_over = 1.0 / (1.0 + e);
    if x >= 0.0 {
        one_over
    } else {
        e * one_over
    }
}

/// `exp(x)` for `x ≤ 0` (every argument here: a value less its row's maximum), within 2 ulp
/// of the exact value (Cephes' `expf`: `2^n · e^r` with `|r| ≤ ln 2 / 2` and a degree-6
/// polynomial for `e^r`), written so that the compiler vectorises it. Below −87.3, where
/// `e^x` leaves the normal floats, it is 0; NaN stays NaN.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // Adding 1.5·2^23 rounds x·log2(e) to the nearest integer n and leaves n in the low bits.
    const SHIFTER: f32 = 12_582_912.0;
    // ln 2 in two parts: n·LN2_HI is exact, so that r = x − n·ln 2 keeps its precision.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * (r * r) + r + 1.0;
    let n_bits = shifted.to_bits().wrapping_sub(SHIFTER.to_bits());
    let two_to_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < -87.3 {
        0.0
    } else {
        e_r * two_to_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x <= 0.0 {
            let exact = (x as f64).exp();
            let ulp = (exact as f32).to_bits();
            let got = exp_nonpositive(x);
            let ulps = (got.to_bits() as i64 - ulp as i64).abs() as f64;
            worst = worst.max(ulps);
            x += 0.000_37;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::MIN), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    type AD = Autodiff<Flex>;

    fn tensor<B: Backend, const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
        let n: usize = shape.iter().product();
        let mut state = seed;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
            })
            .collect();
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 + 1e-5 * w.abs(),
                "{what}[{i}]: {g} against burn's {w}"
            );
        }
    }

    /// A causal mask, one per batch row or shared.
    fn causal<B: Backend>(rows: usize, s: usize) -> Tensor<B, 4> {
        let m: Vec<f32> = (0..rows * s * s)
            .map(|k| {
                let (i, j) = ((k / s) % s, k % s);
                if j > i || (k / (s * s) == 1 && j == 0 && i > 0) {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_data(TensorData::new(m, [rows, 1, s, s]), &Default::default())
    }

    /// burn's composition, the reference for the fused kernel, on the same backend.
    fn composed_softmax(scores: Tensor<AD, 4>, mask: Tensor<AD, 4>, scale: f32) -> Tensor<AD, 4> {
        let [b, h, s, t] = scores.dims();
        let rows = mask.dims()[0];
        let z =
            (scores * scale).reshape([rows, b * h / rows, s * t]) + mask.reshape([rows, 1, s * t]);
        burn::tensor::activation::softmax(z.reshape([b, h, s, t]), 3)
    }

    #[test]
    fn masked_softmax_and_its_gradient_equal_burns_composition() {
        for (mask_rows, t) in [(1, 5), (2, 37)] {
            let shape = [2, 3, t, t];
            let upstream = tensor::<AD, 4>(shape, 7);
            let run = |fused: bool| {
                let scores = tensor::<AD, 4>(shape, 1).require_grad();
                let mask = causal::<AD>(mask_rows, t);
                let probs = if fused {
                    masked_softmax(scores.clone(), mask, 0.3)
                } else {
                    composed_softmax(scores.clone(), mask, 0.3)
                };
                let grads = (probs.clone() * upstream.clone()).sum().backward();
                (values(probs), values(scores.grad(&grads).unwrap()))
            };
            let (p, g) = run(true);
            let (p_ref, g_ref) = run(false);
            assert_close(&p, &p_ref, "probabilities");
            assert_close(&g, &g_ref, "gradient");
            // Inference takes the same kernel.
            let plain = masked_softmax(
                tensor::<Flex, 4>(shape, 1),
                causal::<Flex>(mask_rows, t),
                0.3,
            );
            assert_close(&values(plain), &p_ref, "probabilities without autodiff");
        }
    }

    #[test]
    fn cross_entropy_and_its_gradient_equal_burns_log_softmax() {
        let (rows, vocab) = (6, 300);
        let targets = vec![3, 299, 0, 7, 150, 42];
        let weights = vec![1.0, 0.0, 1.0, 2.0, 0.0, 1.0];
        let run = |fused: bool| {
            let logits = tensor::<AD, 2>([rows, vocab], 3).require_grad();
            let sum = if fused {
                cross_entropy_sum(logits.clone(), targets.clone(), weights.clone())
            } else {
                let logp = burn::tensor::activation::log_softmax(logits.clone(), 1);
                let idx = targets.iter().map(|&t| t as i64).collect();
                let idx = Tensor::<AD, 2, Int>::from_data(
                    TensorData::new(idx, [rows, 1]),
                    &Default::default(),
                );
                let w = Tensor::<AD, 1>::from_data(
                    TensorData::new(weights.clone(), [rows]),
                    &Default::default(),
                );
                (logp.gather(1, idx).reshape([rows]) * w).sum().neg()
            };
            let grads = (sum.clone() * 0.5).backward();
            (values(sum), values(logits.grad(&grads).unwrap()))
        };
        let (l, g) = run(true);
        let (l_ref, g_ref) = run(false);
        assert_close(&l, &l_ref, "loss");
        assert_close(&g, &g_ref, "gradient");
        // Rows of weight 0 take no gradient.
        assert!(g[vocab..2 * vocab].iter().all(|&d| d == 0.0));
        let plain = cross_entropy_sum(
            tensor::<Flex, 2>([rows, vocab], 3),
            targets.clone(),
            weights.clone(),
        );
        assert_close(&values(plain), &l_ref, "loss without autodiff");
    }

    #[test]
    fn matmul_and_its_gradients_are_burns_bit_for_bit() {
        // Sizes on both sides of the thresholds that split a product across threads or a batch
        // of products across tasks, a transposed (strided) operand, and an operand that takes
        // no gradient.
        let shapes: [([usize; 4], [usize; 4], bool); 4] = [
            ([1, 1, 5, 3], [1, 1, 3, 4], false),
            ([2, 3, 33, 17], [2, 3, 17, 9], false),
            ([1, 2, 200, 190], [1, 2, 190, 210], true),
            ([4, 2, 70, 64], [4, 2, 64, 70], true),
        ];
        for (i, (a_shape, b_shape, b_transposed)) in shapes.into_iter().enumerate() {
            let upstream = tensor::<AD, 4>([a_shape[0], a_shape[1], a_shape[2], b_shape[3]], 3);
            let run = |fused: bool, b_trains: bool| {
                let a = tensor::<AD, 4>(a_shape, 1 + i as u64).require_grad();
                let b = if b_transposed {
                    let [n0, n1, k, n] = b_shape;
                    tensor::<AD, 4>([n0, n1, n, k], 2).swap_dims(2, 3)
                } else {
                    tensor::<AD, 4>(b_shape, 2)
                };
                let b = if b_trains { b.require_grad() } else { b };
                let y = if fused {
                    matmul(a.clone(), b.clone())
                } else {
                    a.clone().matmul(b.clone())
                };
                let grads = (y.clone() * upstream.clone()).sum().backward();
                (
                    values(y),
                    values(a.grad(&grads).unwrap()),
                    b.grad(&grads).map(values),
                )
            };
            for b_trains in [true, false] {
                let got = run(true, b_trains);
                let want = run(false, b_trains);
                assert_eq!(got.0, want.0, "product {i}");
                assert_eq!(got.1, want.1, "product {i}: a's gradient");
                assert_eq!(got.2, want.2, "product {i}: b's gradient");
                assert_eq!(got.2.is_some(), b_trains);
            }
        }
        let a = tensor::<Flex, 2>([130, 250], 7);
        let b = tensor::<Flex, 2>([250, 260], 8);
        assert_eq!(
            values(matmul(a.clone(), b.clone())),
            values(a.matmul(b)),
            "2-D product without autodiff"
        );
    }

    #[test]
    fn rotary_and_its_gradient_equal_the_composition() {
        // Whole and partial rotation (pass-through dimensions), tables shared by all heads or
        // one row of them per batch row.
        for (rotary_dim, rows) in [(8, 1), (4, 2)] {
            let (b, n, s, d) = (2, 3, 5, 8);
            let table = |seed| {
                let t = tensor::<AD, 3>([rows, 1, s * d], seed);
                // 1 and 0 past the rotary dimensions, as the model's tables are.
                let keep: Vec<f32> = (0..rows * s * d)
                    .map(|i| if i % d < rotary_dim { 1.0 } else { 0.0 })
                    .collect();
                let keep = Tensor::<AD, 3>::from_data(
                    TensorData::new(keep, [rows, 1, s * d]),
                    &Default::default(),
                );
                (t * keep.clone(), keep)
            };
            let (cos, keep) = table(11);
            let cos = cos + (keep.neg() + 1.0);
            let (sin, _) = table(12);
            let mut rotate = vec![0f32; d * d];
            for j in 0..rotary_dim / 2 {
                rotate[(j + rotary_dim / 2) * d + j] = -1.0;
                rotate[j * d + j + rotary_dim / 2] = 1.0;
            }
            let rotate =
                Tensor::<AD, 2>::from_data(TensorData::new(rotate, [d, d]), &Default::default());
            let upstream = tensor::<AD, 4>([b, n, s, d], 13);
            let run = |fused: bool| {
                let x = tensor::<AD, 4>([b, n, s, d], 14).require_grad();
                let y = if fused {
                    rotary(
                        x.clone(),
                        cos.clone(),
                        sin.clone(),
                        rotate.clone(),
                        rotary_dim,
                    )
                } else {
                    rotary_composed(x.clone(), cos.clone(), sin.clone(), rotate.clone())
                };
                let grads = (y.clone() * upstream.clone()).sum().backward();
                (values(y), values(x.grad(&grads).unwrap()))
            };
            let (y, dx) = run(true);
            let (y_ref, dx_ref) = run(false);
            assert_eq!(y, y_ref, "rotary_dim {rotary_dim}, rows {rows}");
            assert_eq!(dx, dx_ref, "rotary_dim {rotary_dim}, rows {rows}: gradient");
            let plain = rotary(
                tensor::<Flex, 4>([b, n, s, d], 14),
                Tensor::from_data(cos.clone().into_data(), &Default::default()),
                Tensor::from_data(sin.clone().into_data(), &Default::default()),
                Tensor::from_data(rotate.clone().into_data(), &Default::default()),
                rotary_dim,
            );
            assert_eq!(values(plain), y_ref, "without autodiff");
        }
    }

    #[test]
    fn swiglu_and_its_gradients_equal_burns_silu_product() {
        let shape = [3, 7, 37];
        let upstream = tensor::<AD, 3>(shape, 9);
        let run = |fused: bool| {
            let gate = (tensor::<AD, 3>(shape, 4) * 4.0).require_grad();
            let up = tensor::<AD, 3>(shape, 5).require_grad();
            let y = if fused {
                swiglu(gate.clone(), up.clone())
            } else {
                burn::tensor::activation::silu(gate.clone()) * up.clone()
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (
                values(y),
                values(gate.grad(&grads).unwrap()),
                values(up.grad(&grads).unwrap()),
            )
        };
        let (y, d_gate, d_up) = run(true);
        let (y_ref, d_gate_ref, d_up_ref) = run(false);
        assert_close(&y, &y_ref, "output");
        assert_close(&d_gate, &d_gate_ref, "gate's gradient");
        assert_close(&d_up, &d_up_ref, "up's gradient");
        let plain = swiglu(
            tensor::<Flex, 3>(shape, 4) * 4.0,
            tensor::<Flex, 3>(shape, 5),
        );
        assert_close(&values(plain), &y_ref, "output without autodiff");
    }

    #[test]
    fn rms_norm_and_its_gradients_equal_burns_composition() {
        // A row length with a tail past the lanes, and a 4-D input (the q/k norms').
        for shape in [[2, 3, 5, 37], [1, 2, 4, 64]] {
            let upstream = tensor::<AD, 4>(shape, 13);
            let dim = shape[3];
            let run = |fused: bool, gamma_trained: bool| {
                let x = tensor::<AD, 4>(shape, 8).require_grad();
                let gamma = tensor::<AD, 1>([dim], 12) + 1.0;
                let gamma = if gamma_trained {
                    gamma.require_grad()
                } else {
                    gamma
                };
                let y = if fused {
                    rms_norm(x.clone(), gamma.clone(), 1e-5)
                } else {
                    rms_norm_composed(x.clone(), gamma.clone(), 1e-5)
                };
                let grads = (y.clone() * upstream.clone()).sum().backward();
                let d_gamma = gamma.grad(&grads).map(values);
                (values(y), values(x.grad(&grads).unwrap()), d_gamma)
            };
            let (y, dx, d_gamma) = run(true, true);
            let (y_ref, dx_ref, d_gamma_ref) = run(false, true);
            assert_close(&y, &y_ref, "output");
            assert_close(&dx, &dx_ref, "input's gradient");
            assert_close(
                &d_gamma.unwrap(),
                &d_gamma_ref.unwrap(),
                "weight's gradient",
            );
            // A frozen weight (LoRA) takes no gradient; the input's is the same.
            let (_, dx_frozen, d_gamma_frozen) = run(true, false);
            assert_eq!(dx_frozen, dx);
            assert!(d_gamma_frozen.is_none());
            let gamma = tensor::<Flex, 1>([dim], 12) + 1.0;
            let plain = rms_norm(tensor::<Flex, 4>(shape, 8), gamma, 1e-5);
            assert_close(&values(plain), &y_ref, "output without autodiff");
        }
    }

    #[test]
    fn swap_middle_and_its_gradient_equal_swap_dims() {
        let shape = [2, 5, 3, 4];
        let upstream = tensor::<AD, 4>([2, 3, 5, 4], 11);
        let run = |fused: bool| {
            let x = tensor::<AD, 4>(shape, 6).require_grad();
            let y = if fused {
                swap_middle(x.clone())
            } else {
                x.clone().swap_dims(1, 2)
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (y.dims(), values(y), values(x.grad(&grads).unwrap()))
        };
        let (dims, y, g) = run(true);
        let (dims_ref, y_ref, g_ref) = run(false);
        assert_eq!(dims, dims_ref);
        assert_eq!(y, y_ref);
        assert_eq!(g, g_ref);
        let plain = swap_middle(tensor::<Flex, 4>(shape, 6));
        assert_eq!(values(plain), y_ref);
    }
}
