//! Scores a causal language model the way practitioners compare them: multiple-choice tasks by
//! log-likelihood exactly as EleutherAI's lm-evaluation-harness does (`acc`, `acc_norm`, with
//! standard errors), loss and perplexity on held-out tokens, and generated samples (greedy or
//! sampled, with a key/value cache).

pub mod generate;
pub mod perplexity;
pub mod score;
pub mod stats;
pub mod tasks;

pub use generate::{generate, Sampling};
pub use perplexity::heldout_loss;
pub use score::{encode_pair, loglikelihoods, Request, TaskResult};
pub use tasks::{read_docs, Doc, FewShot, TaskFormat};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Task(String),
    #[error("cannot tokenize: {0}")]
    Tokenize(String),
    #[error("interrupted")]
    Interrupted,
}
