//! opt-train: training OPT with the metaseq recipe on one process.
//!
//! The pieces, one file each:
//! - [`config`]: the TOML run configuration (every key documented in `default.toml`);
//! - [`data`]: documents from jsonl / metaseq folders / text / token files, packed or one row
//!   per sequence, shuffled by seed, with an exact resumable position; [`tokfile`] is the
//!   memory-mapped pre-tokenized format `opt-rs data prepare` writes;
//! - [`schedule`]: learning-rate schedules (constant, metaseq's linear polynomial decay, cosine);
//! - [`optim`]: AdamW over the flat parameter buffer, global-norm clipping, and the fp16
//!   dynamic loss scaler;
//! - [`guards`]: the stability guards (non-finite skip, loss-spike skip, rollback);
//! - [`checkpoint`]: atomic checkpoints with everything needed to resume bit for bit;
//! - [`logbook`] and [`plot`]: `logbook.jsonl` and the `loss.svg` curve;
//! - [`sample`]: a small sampler for the continuations printed at the end of a run;
//! - [`trainer`]: the loop that ties them together;
//! - [`parallel`]: what a multi-rank run (opt-dist) provides to the trainer;
//! - [`export`]: a run's checkpoint as an HF model folder.
//!
//! The trainer works on whole flat buffers (parameters, gradients, moments) through the
//! [`opt_tensor::Backend`] trait, so sharding them across ranks later is a change of which window
//! each rank owns, not a rewrite of the loop.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod export;
pub mod guards;
pub mod logbook;
pub mod optim;
pub mod parallel;
pub mod plot;
pub mod sample;
pub mod schedule;
pub mod tokfile;
pub mod trainer;
pub mod zero3;

use std::path::{Path, PathBuf};

pub use config::{Precision, TrainConfig, DEFAULT_TOML};
pub use trainer::{
    EvalReport, Event, Fault, Observer, RunInfo, RunSummary, StartOptions, StepOutcome, StepReport, Trainer,
};

/// Everything that can stop a training run, with the context needed to fix it.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A config value is wrong; `key` is its `section.key` name.
    #[error("config key {key}: {detail}")]
    Config { key: String, detail: String },
    /// A config file is not valid TOML.
    #[error("{origin}: {detail}")]
    ConfigSyntax { origin: String, detail: String },
    /// A bad data row or file; `location` is `file:line` where there is one.
    #[error("{location}: {detail}")]
    Data { location: String, detail: String },
    /// The corpus has nothing to train on.
    #[error("empty corpus: {source_name} has no usable documents{hint}")]
    EmptyCorpus { source_name: String, hint: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint or run folder is unusable.
    #[error("{}: {detail}", path.display())]
    Checkpoint { path: PathBuf, detail: String },
    /// fp16 dynamic loss scaling gave up.
    #[error(
        "fp16 loss scale fell below fp16.min_scale = {min} at step {step} (gradients overflow even at scale {scale}): \
         the loss is probably exploding; lower optim.lr, enable optim.clip_norm, raise train.batch_size, or use \
         train.precision = \"bf16\""
    )]
    LossScaleUnderflow { step: u64, scale: f64, min: f64 },
    /// The stability guards ran out of rollbacks.
    #[error("training diverged at step {step}: {detail}")]
    Diverged { step: u64, detail: String },
    #[error(transparent)]
    Model(#[from] opt_model::ModelError),
    #[error(transparent)]
    Backend(#[from] opt_tensor::TensorError),
    #[error(transparent)]
    Tokenizer(#[from] opt_tokenizer::TokenizerError),
    #[error(transparent)]
    Weights(#[from] opt_checkpoint::CheckpointError),
    /// A collective or a layout problem of a multi-rank run (from the [`parallel::Parallel`]
    /// implementation).
    #[error("{0}")]
    Parallel(String),
}

impl TrainError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), source }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
