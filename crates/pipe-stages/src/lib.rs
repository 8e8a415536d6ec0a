//! Every stage kind pipe offers, one module each. Adding a kind is adding a module here and a
//! line to [`registry`].

pub mod command;
pub mod download;
mod eval_report;
pub mod evaluate;
pub mod export;
pub mod format;
mod gguf;
mod mlflow;
mod models;
mod sources;
pub mod tokenize;
pub mod train;

use pipe_core::Registry;

/// The JSON Schema of a kind's YAML fields, as serde reads them.
fn schema_of<T: schemars::JsonSchema>() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(T)).expect("a schema is JSON")
}

/// All stage kinds, as the `pipe` binary offers them.
pub fn registry() -> Registry {
    Registry::new()
        .with(download::DownloadKind)
        .with(format::FormatKind)
        .with(tokenize::TokenizeKind)
        .with(train::TrainKind)
        .with(evaluate::EvaluateKind)
        .with(export::ExportKind)
        .with(command::CommandKind)
}
