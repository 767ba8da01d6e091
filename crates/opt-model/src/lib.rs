//! opt-model: the OPT decoder — config, parameter layout, explicit forward/backward passes,
//! KV cache, metaseq initialisation, and loading/saving HF-layout folders.

pub mod config;
pub mod init;
pub mod io;
pub mod model;
pub mod parallel;
pub mod params;
pub mod quant;
pub mod score;

use std::path::PathBuf;

pub use config::{OptConfig, PRESETS};
pub use model::{causal_targets, position_ids, DropoutCfg, KvCache, LogitsMode, OptModel, TrainBatch, TrainState};
pub use parallel::{HostReduce, LayerStream, ParallelHooks, Pass};
pub use params::{ParamLayout, ParamSpec};
pub use quant::{QuantConfig, QuantWeights};
pub use score::{score_sequence, SequenceScore};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{origin}: field '{field}': {detail}")]
    Config { origin: String, field: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Checkpoint(#[from] opt_checkpoint::CheckpointError),
    #[error("{file}: tensor '{name}': {detail}")]
    Weights { file: String, name: String, detail: String },
    #[error("invalid input: {0}")]
    Input(String),
    /// A collective of a parallel hook or layer stream failed (another rank died, timed out).
    #[error("{0}")]
    Parallel(String),
    #[error(transparent)]
    Backend(#[from] opt_tensor::TensorError),
}

pub type Result<T> = std::result::Result<T, ModelError>;
