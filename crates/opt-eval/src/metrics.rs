//! Running a task end to end: requests → log-likelihoods → lm-eval's metrics.
//!
//! - multiple choice: `acc` = share of items whose argmax of summed log-likelihood is the gold
//!   choice; `acc_norm` = the same with each log-likelihood divided by its choice's length in
//!   characters. Ties go to the first choice (`np.argmax`).
//! - last word (LAMBADA): `acc` = share of items whose target is entirely greedy;
//!   `perplexity` = `exp(-mean(loglikelihood))` over items (lm-eval's `perplexity` aggregation).
//! - rolling (WikiText): `token_perplexity` = `exp(nll / tokens)`, `word_perplexity` =
//!   `exp(nll / words)`, `byte_perplexity` = `exp(nll / bytes)`, `bits_per_byte` =
//!   `nll / bytes / ln 2`; words as `len(re.split(r"\s+", text))`, bytes of the UTF-8 text.
//!
//! stderr of a mean is lm-eval's `mean_stderr`: sample standard deviation (n - 1) / sqrt(n).
//! lm-eval bootstraps the stderr of `perplexity`; here it is the delta-method estimate
//! `perplexity × stderr(mean loglikelihood)`, which needs no random resampling. The
//! corpus-level perplexities of WikiText have none, as in lm-eval.

use opt_model::OptModel;
use opt_tensor::Backend;
use opt_tokenizer::OptTokenizer;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::harness::{encode_pair, py_word_count, Request};
use crate::rolling::{rolling_nll, Window};
use crate::scorer::{loglikelihoods, ScoreOptions, Scored};
use crate::tasks::{Task, TaskData};
use crate::{EvalError, Result};

/// Options for [`evaluate`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EvalOptions {
    pub score: ScoreOptions,
    /// Sliding-window stride for rolling tasks (default: half the model's window).
    pub stride: Option<usize>,
}

/// One reported number.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Metric {
    pub name: &'static str,
    pub value: f64,
    pub stderr: Option<f64>,
}

/// Per-item results of a multiple-choice task.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChoiceItem {
    pub gold: usize,
    pub loglikelihoods: Vec<f64>,
    /// argmax of `loglikelihoods`.
    pub pred: usize,
    /// argmax of `loglikelihoods[i] / norm_lens[i]`.
    pub pred_norm: usize,
}

/// Per-item results of a last-word task.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LastWordItem {
    pub target: String,
    pub loglikelihood: f64,
    pub is_greedy: bool,
    pub tokens: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Items {
    Choice(Vec<ChoiceItem>),
    LastWord(Vec<LastWordItem>),
    Rolling(Vec<Window>),
}

/// The outcome of one task.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    pub task: String,
    /// Items scored (rows of text for a rolling task).
    pub n: usize,
    pub metrics: Vec<Metric>,
    /// Counts that explain the metrics (tokens, words, bytes, ...).
    pub counts: Vec<(&'static str, usize)>,
    pub items: Items,
}

impl TaskResult {
    /// A metric's value by name.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|m| m.name == name).map(|m| m.value)
    }

    /// `{"task", "n", <metric>: value, "<metric>_stderr": ..., <counts>, "items": [...]}`
    /// (items only with `per_item`).
    pub fn to_json(&self, per_item: bool) -> Value {
        let mut o = Map::new();
        o.insert("task".into(), json!(self.task));
        o.insert("n".into(), json!(self.n));
        for m in &self.metrics {
            o.insert(m.name.into(), json_f64(m.value));
            if let Some(s) = m.stderr {
                o.insert(format!("{}_stderr", m.name), json_f64(s));
            }
        }
        for (k, v) in &self.counts {
            o.insert((*k).into(), json!(v));
        }
        if per_item {
            let items = match &self.items {
                Items::Choice(v) => json!(v),
                Items::LastWord(v) => json!(v),
                Items::Rolling(v) => json!(v),
            };
            o.insert("items".into(), items);
        }
        Value::Object(o)
    }
}

/// NaN and infinities are not JSON numbers; they become null.
fn json_f64(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// lm-eval's `mean_stderr`: sample std (ddof 1) / sqrt(n); `None` below two items.
pub fn mean_stderr(xs: &[f64]) -> Option<f64> {
    let n = xs.len();
    if n < 2 {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some((var / n as f64).sqrt())
}

/// Index of the largest value, the first one on ties (`np.argmax`).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Evaluates `task`. `progress(done, total)` reports requests (or windows) finished.
pub fn evaluate<B: Backend>(
    model: &OptModel<B>,
    tok: &OptTokenizer,
    task: &Task,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TaskResult> {
    if tok.vocab_size() > model.cfg.vocab_size {
        return Err(EvalError::Input(format!(
            "the tokenizer has {} tokens but the model's vocabulary is {}: wrong tokenizer for this model",
            tok.vocab_size(),
            model.cfg.vocab_size
        )));
    }
    match &task.data {
        TaskData::Choice(docs) => {
            let pairs: Vec<(&str, &str)> =
                docs.iter().flat_map(|d| d.requests.iter().map(|(c, x)| (c.as_str(), x.as_str()))).collect();
            let scored = score_pairs(model, tok, &pairs, &opts.score, progress)?;
            let mut items = Vec::with_capacity(docs.len());
            let mut at = 0;
            for d in docs {
                let lls: Vec<f64> = scored[at..at + d.requests.len()].iter().map(|s| s.loglikelihood).collect();
                at += d.requests.len();
                let normed: Vec<f64> = lls.iter().zip(&d.norm_lens).map(|(ll, &n)| ll / n as f64).collect();
                items.push(ChoiceItem {
                    gold: d.gold,
                    pred: argmax(&lls),
                    pred_norm: argmax(&normed),
                    loglikelihoods: lls,
                });
            }
            let acc: Vec<f64> = items.iter().map(|i| f64::from(u8::from(i.pred == i.gold))).collect();
            let acc_norm: Vec<f64> = items.iter().map(|i| f64::from(u8::from(i.pred_norm == i.gold))).collect();
            Ok(TaskResult {
                task: task.name.clone(),
                n: items.len(),
                metrics: vec![
                    Metric { name: "acc", value: mean(&acc), stderr: mean_stderr(&acc) },
                    Metric { name: "acc_norm", value: mean(&acc_norm), stderr: mean_stderr(&acc_norm) },
                ],
                counts: vec![("requests", pairs.len())],
                items: Items::Choice(items),
            })
        }
        TaskData::LastWord(docs) => {
            let pairs: Vec<(&str, &str)> = docs.iter().map(|d| (d.context.as_str(), d.target.as_str())).collect();
            let scored = score_pairs(model, tok, &pairs, &opts.score, progress)?;
            let lls: Vec<f64> = scored.iter().map(|s| s.loglikelihood).collect();
            let greedy: Vec<f64> = scored.iter().map(|s| f64::from(u8::from(s.is_greedy))).collect();
            let ppl = (-mean(&lls)).exp();
            let items = docs
                .iter()
                .zip(&scored)
                .map(|(d, s)| LastWordItem {
                    target: d.target.clone(),
                    loglikelihood: s.loglikelihood,
                    is_greedy: s.is_greedy,
                    tokens: s.tokens,
                })
                .collect::<Vec<_>>();
            Ok(TaskResult {
                task: task.name.clone(),
                n: items.len(),
                metrics: vec![
                    Metric { name: "acc", value: mean(&greedy), stderr: mean_stderr(&greedy) },
                    Metric { name: "perplexity", value: ppl, stderr: mean_stderr(&lls).map(|s| ppl * s) },
                ],
                counts: vec![("truncated", scored.iter().filter(|s| s.truncated).count())],
                items: Items::LastWord(items),
            })
        }
        TaskData::Rolling { text, rows } => {
            let ids = tok.encode(text, true)?;
            let max_len = model.cfg.max_position_embeddings;
            let stride = opts.stride.unwrap_or((max_len / 2).max(1));
            let r = rolling_nll(model, &ids, stride, opts.score.batch_size, progress)?;
            let words = py_word_count(text);
            let bytes = text.len();
            Ok(TaskResult {
                task: task.name.clone(),
                n: *rows,
                metrics: vec![
                    Metric { name: "token_perplexity", value: r.token_perplexity(), stderr: None },
                    Metric { name: "word_perplexity", value: (r.nll / words as f64).exp(), stderr: None },
                    Metric { name: "byte_perplexity", value: (r.nll / bytes as f64).exp(), stderr: None },
                    Metric {
                        name: "bits_per_byte",
                        value: r.nll / bytes as f64 / std::f64::consts::LN_2,
                        stderr: None,
                    },
                ],
                counts: vec![
                    ("tokens", r.tokens),
                    ("words", words),
                    ("bytes", bytes),
                    ("windows", r.windows.len()),
                    ("stride", stride),
                    ("max_length", max_len),
                ],
                items: Items::Rolling(r.windows),
            })
        }
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Encodes `(context, continuation)` strings by the harness's rules and scores them.
pub fn score_pairs<B: Backend>(
    model: &OptModel<B>,
    tok: &OptTokenizer,
    pairs: &[(&str, &str)],
    opts: &ScoreOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Scored>> {
    let requests: Vec<Request> = pairs.iter().map(|(c, x)| encode_pair(tok, c, x)).collect::<Result<_>>()?;
    let total = requests.len();
    let mut done = 0;
    progress(0, total);
    loglikelihoods(model, &requests, opts, &mut |k| {
        done += k;
        progress(done, total);
    })
}
