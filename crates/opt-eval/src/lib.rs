//! opt-eval: zero-shot evaluation of OPT models, scored the way lm-evaluation-harness scores them.
//!
//! - [`harness`]: the harness's text and token rules (`</s>` prepended, trailing context spaces
//!   moved onto the continuation, continuation ids cut from `enc(context + continuation)`,
//!   HellaSwag preprocessing, word counts).
//! - [`scorer`]: `loglikelihood(context, continuation)` for many requests at once: batched,
//!   sorted by length, each distinct context run once with its continuations on top of its KV
//!   cache, contexts truncated from the left to the model's window.
//! - [`rolling`]: sliding-window perplexity (HF's perplexity guide) for long texts.
//! - [`tasks`]: the built-in tasks (lambada, hellaswag, piqa, arc_easy, wikitext) and
//!   llm-foundry jsonl files (`multiple_choice`, `schema`, detected from their keys).
//! - [`metrics`]: running a task end to end into acc / acc_norm / perplexities with stderr.
//!
//! From the command line:
//!
//! ```text
//! opt-rs eval --model DIR --task hellaswag --task piqa [--data-dir ../shared/data/eval] [--limit N]
//!             [--batch-size 16] [--no-context-reuse] [--stride S] [--json [--per-item]]
//! opt-rs eval --model DIR --task my_mc.jsonl            # llm-foundry multiple_choice / schema file
//! opt-rs eval --random-preset 125m --task hellaswag --limit 20   # timing only: random weights
//! ```
//!
//! Agreement with HF transformers is checked on a random-weight model with the real vocabulary
//! (`fixtures/eval/`, written by `tools/reference/generate_eval.py`): per-request
//! log-likelihoods agree to ~1e-5, predictions and acc / acc_norm exactly.

pub mod harness;
pub mod metrics;
pub mod rolling;
pub mod scorer;
pub mod tasks;

use std::path::PathBuf;

pub use harness::{encode_pair, Request};
pub use metrics::{evaluate, score_pairs, EvalOptions, Items, Metric, TaskResult};
pub use rolling::{plan_windows, rolling_nll, RollingScore, Window};
pub use scorer::{loglikelihoods, ScoreOptions, Scored};
pub use tasks::{load_task, Task, TaskData, BUILTIN_TASKS};

/// Errors from loading tasks and scoring them.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A task file's content is wrong at a given line (1-based).
    #[error("{}:{line}: {msg}", path.display())]
    Format { path: PathBuf, line: usize, msg: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown task '{name}': known tasks are {}; or give the path of a .jsonl file", BUILTIN_TASKS.join(", "))]
    UnknownTask { name: String },
    /// A built-in task's data file is not in the data directory.
    #[error("task '{task}' needs {} (pass --data-dir with the folder holding the eval data)", path.display())]
    MissingData { task: String, path: PathBuf },
    /// Inputs the caller controls that cannot be scored (options, over-long continuations).
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Model(#[from] opt_model::ModelError),
    #[error(transparent)]
    Tokenizer(#[from] opt_tokenizer::TokenizerError),
    #[error(transparent)]
    Backend(#[from] opt_tensor::TensorError),
}

pub type Result<T> = std::result::Result<T, EvalError>;
