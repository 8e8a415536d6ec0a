//! Instruction data: reading records (JSON, JSON Lines, Parquet), formatting prompts (the
//! Alpaca templates verbatim, or user templates) or conversations (rendered with the model's
//! own chat template), mixing sources, splitting, and tokenizing with label masking exactly as
//! Stanford Alpaca's preprocessing (or transformers' `apply_chat_template`) does, into a
//! compact memory-mapped dataset.

pub mod bytelevel;
pub mod chat;
pub mod columnar;
pub mod dataset;
pub mod fastbpe;
pub mod format;
pub mod mixture;
pub mod prompt;
pub mod records;
pub mod tokenize;
