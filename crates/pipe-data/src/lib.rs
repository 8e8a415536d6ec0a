//! Instruction data: reading records, formatting prompts (the Alpaca templates verbatim, or
//! user templates), splitting, and tokenizing with label masking exactly as Stanford Alpaca's
//! preprocessing does, into a compact memory-mapped dataset.

pub mod dataset;
pub mod fastbpe;
pub mod format;
pub mod prompt;
pub mod records;
pub mod tokenize;
