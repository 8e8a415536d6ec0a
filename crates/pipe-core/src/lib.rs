//! The pipe engine: pipeline files → a DAG of stages → cache keys → a content-addressed store,
//! and the run loop that ties them together. Stage kinds plug in through [`kind::StageKind`].
//!
//! Where to look:
//! - the stage-kind interface: [`kind`]
//! - the cache key recipe: [`key`]
//! - the run loop: [`runner`]
//! - the store layout: [`store`]
//! - the remote cache seam: [`remote`]
//! - the Slurm executor: [`slurm`]

pub mod diag;
pub mod digest;
pub mod fault;
pub mod graph;
pub mod key;
pub mod kind;
pub mod lock;
pub mod relpath;
pub mod remote;
pub mod resources;
pub mod runner;
pub mod schema;
pub mod slurm;
pub mod spec;
pub mod store;

pub use diag::{FieldError, FieldPath, SpecError};
pub use key::{KeyFields, KeyRecipe};
pub use kind::{
    Input, InputSource, Interrupted, ParseContext, Registry, Stage, StageContext, StageInfo,
    StageKind, StageNode,
};
pub use runner::{Decision, Engine, Observer, RunOptions, RunSummary, Status, Why};
pub use spec::{load, LoadError, Pipeline};
pub use store::Store;
