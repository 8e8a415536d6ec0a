//! Training a pipe-model Llama: learning-rate schedules, token-exact gradient accumulation,
//! global-norm clipping and AdamW, matching PyTorch + transformers step for step.

pub mod run;
pub mod schedule;
pub mod step;

pub use run::{
    train, BaseModel, DataMeta, Dirs, Hooks, Method, Summary, TrainError, TrainSpec, Trained,
};
pub use schedule::{Decay, Schedule};
pub use step::{adamw, train_step, train_step_parallel, AdamWSettings, MicroBatch, StepStats};
