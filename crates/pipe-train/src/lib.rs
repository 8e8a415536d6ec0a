//! Training a pipe-model Llama: learning-rate schedules, token-exact gradient accumulation,
//! global-norm clipping and AdamW, matching PyTorch + transformers step for step.

pub mod heldout;
pub mod memory;
pub mod nodes;
pub mod optimizer;
pub mod run;
pub mod schedule;
pub mod segments;
pub mod step;
pub mod tensorboard;

pub use heldout::{Best, EvalSettings};
pub use optimizer::Bf16Rounding;
pub use run::{
    train, BaseModel, DataMeta, Dirs, Hooks, Method, NodeRun, Splits, Summary, TrainError,
    TrainSpec, Trained,
};
pub use schedule::{Decay, Schedule};
pub use step::{
    adamw, train_step, train_step_on_nodes, train_step_parallel, AdamWSettings, MicroBatch,
    StepSettings, StepStats,
};

/// Tensors are large allocations, which glibc maps fresh from the kernel and unmaps on free, so
/// every training step page-faults and zeroes its buffers anew. Keeping freed memory in the
/// heap instead makes training about 10% faster (bench/train.sh); the peak memory is unchanged.
/// Buffers above 32 MiB (the largest threshold glibc accepts; a LoRA step's logits over a 49k
/// vocabulary are 200 MB) are kept too by mapping nothing outside the heap: SmolLM2 LoRA 7.5%
/// faster for 9% more peak memory, still 40% of PEFT's. A heap that cannot grow still falls back
/// to a mapping. A process-wide setting: call it first thing in `main`, before other threads
/// start.
pub fn keep_freed_tensor_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's thresholds; called before any other thread starts.
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit systems.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
}

/// Hands the heap's free memory back to the kernel (glibc's `malloc_trim`) where a large
/// working set was freed and a differently shaped one follows — the next model of an
/// evaluation. [`keep_freed_tensor_memory`] keeps it otherwise, and the new tensors, placed
/// among the old ones' freed blocks, would fragment it and raise the peak.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's heap; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
