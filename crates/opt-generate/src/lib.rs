//! opt-generate: decoding for OPT — greedy, seeded sampling (temperature, top-k, top-p,
//! typical-p), penalties (HF repetition penalty, OpenAI presence/frequency, no-repeat-n-gram,
//! min-new-tokens), `n` samples, `best_of`, HF-exact beam search, stop strings, log-probs with
//! top-K alternatives, echo, and streaming of text deltas.
//!
//! The entry point is [`Generator`]: it borrows an [`opt_model::OptModel`] (and optionally an
//! [`opt_tokenizer::OptTokenizer`]) and runs a [`GenerateRequest`] — several prompts decoded as
//! one left-padded batch — returning a [`GenerateOutput`], or streaming [`StreamEvent`]s to a
//! callback as tokens are decoded. The CLI (`opt-rs generate`) and the HTTP server both sit on
//! this crate; [`SamplingParams`] is what an OpenAI-style request deserialises into.
//!
//! Reference semantics: HF transformers 5.17 `generate()` for greedy, beam search and every
//! logits processor it shares with us (checked against `fixtures/generation/`); OpenAI's
//! completions API for presence/frequency penalties, `n`, `best_of`, `logprobs`, `echo`, `stop`.
//!
//! Decisions worth knowing:
//! - Modes: `num_beams > 1` is beam search; otherwise `greedy` or `temperature: 0` is argmax;
//!   otherwise sampling (the default, temperature 1). `best_of` without sampling is the beam
//!   size (metaseq's API); with sampling, `best_of` samples are drawn and the `n` with the highest
//!   mean log-prob per token are returned (OpenAI).
//! - Sampling draws come from `opt_tensor::rng` keyed by (seed, candidate index, step): the same
//!   seed reproduces the output, independently of batching. Without a seed one is drawn and
//!   reported in [`GenerateOutput::seed`].
//! - Penalties see each row's own tokens only (HF's batched `generate` also counts the left
//!   padding of the row); presence/frequency count generated tokens only (OpenAI).
//! - `logprobs` are the model's raw log-probabilities (log-softmax of the logits, before any
//!   processor); beam scores use the processed ones, as HF's do.
//! - `token_ids` include the EOS that ended a sequence (as HF returns it); `text` never contains
//!   EOS/padding or the stop string. A stop string is searched in the decoded text, so it can
//!   span tokens; the tokens up to the one that completed it are returned.
//! - Context: a prompt longer than `max_position_embeddings` is an error unless `truncate`, which
//!   keeps the last `max_positions - (max_new_tokens - 1)` tokens (so the new tokens fit) and
//!   warns. A prompt that fits but leaves less room than `max_new_tokens` stops at the context
//!   with finish reason `length` (and a warning).

pub mod beam;
pub mod generator;
pub mod params;
pub mod processors;
pub mod sample;
pub mod stream;

pub use generator::{Completion, FinishReason, GenerateOutput, Generator, PromptOutput, StreamEvent, TokenLogprob};
pub use params::{EarlyStopping, GenerateRequest, Prompt, SamplingParams};
pub use stream::TextStream;

/// Errors from generation. Option errors name the offending option (its serde/JSON name).
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("invalid option {option}: {detail}")]
    Option { option: &'static str, detail: String },
    #[error("prompt {index}: {detail}")]
    Prompt { index: usize, detail: String },
    #[error("{0} needs a tokenizer, and none was given (the model folder has no tokenizer files)")]
    NoTokenizer(&'static str),
    #[error("generation cancelled by the caller")]
    Cancelled,
    #[error(transparent)]
    Model(#[from] opt_model::ModelError),
    #[error(transparent)]
    Tensor(#[from] opt_tensor::TensorError),
    #[error(transparent)]
    Tokenizer(#[from] opt_tokenizer::TokenizerError),
}

impl GenerateError {
    pub(crate) fn option(option: &'static str, detail: impl Into<String>) -> Self {
        GenerateError::Option { option, detail: detail.into() }
    }
}

pub type Result<T> = std::result::Result<T, GenerateError>;
