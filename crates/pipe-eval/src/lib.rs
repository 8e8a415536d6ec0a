//! Scores a causal language model the way practitioners compare them: multiple-choice tasks by
//! log-likelihood exactly as EleutherAI's lm-evaluation-harness does (`acc`, `acc_norm`, with
//! standard errors), loss and perplexity on held-out tokens, and generated samples (greedy or
//! sampled, with a key/value cache).

pub mod generate;
pub mod perplexity;
pub mod score;
pub mod stats;
pub mod tasks;

pub use generate::{generate, generation_length, Sampling};
pub use perplexity::{heldout_loss, heldout_passes};
pub use score::{encode_pair, loglikelihood_passes, loglikelihoods, Request, TaskResult};
pub use tasks::{read_docs, Doc, FewShot, TaskFormat};

/// One forward pass of a scorer: `rows` rows of `seq` tokens, `scored` of whose positions are
/// projected onto the vocabulary. The scorers say which passes they will make
/// ([`heldout_passes`], [`loglikelihood_passes`]) so that the memory plan can size them before
/// a model is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ForwardPass {
    pub rows: usize,
    pub seq: usize,
    pub scored: usize,
    /// Each row has its own attention mask (choices packed after their shared context);
    /// otherwise the rows share one causal mask.
    pub packed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Task(String),
    #[error("cannot tokenize: {0}")]
    Tokenize(String),
    #[error("interrupted")]
    Interrupted,
}
