//! The decoding loop: prompts → one left-padded batch → prefill → one token per step with the KV
//! cache, for greedy/sampling (one row per candidate) or beam search (K rows per prompt).
//!
//! Rows leave the batch as soon as they finish (their KV-cache rows are dropped), so a long
//! batch does not keep paying for short answers. Every row depends only on its own prompt, its
//! own seed stream and its own history, so a prompt decodes the same alone or in a batch.
//!
//! Shapes: P = prompts, Tp = padded prompt length, R = rows in the batch, V = vocab.

use std::collections::HashMap;
use std::ops::ControlFlow;

use opt_model::score::top_k_of;
use opt_model::{KvCache, LogitsMode, OptConfig, OptModel};
use opt_tensor::{Backend, Buffer};
use opt_tokenizer::OptTokenizer;
use serde::{Deserialize, Serialize};

use crate::beam::{BeamConfig, BeamGroup};
use crate::params::{GenerateRequest, Mode, Prompt, SamplingParams};
use crate::processors::{log_softmax, Processors, SeqContext};
use crate::sample::{argmax, fresh_seed, sample, sequence_seed, uniform_f64};
use crate::stream::{find_stop, TextStream};
use crate::{GenerateError, Result};

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_new_tokens` reached (or the model's context is full).
    Length,
    /// A stop string matched.
    Stop,
    /// The model produced its end-of-sequence token.
    Eos,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Eos => "eos",
        }
    }
}

/// A token's log-probability under the model (before any processor: the raw distribution) and
/// the most likely alternatives at its position, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub id: u32,
    /// `None` for the first prompt token (nothing precedes it).
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// One returned sequence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub index: usize,
    /// Generated text (stop string and EOS excluded); `None` without a tokenizer.
    pub text: Option<String>,
    /// Generated ids (the EOS that ended the sequence included, as HF returns it).
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Per generated token, when `logprobs` was asked for.
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Sum of the raw log-probs of `token_ids`.
    pub cumulative_logprob: f64,
    /// Beam search only: the length-penalised beam score (HF `sequences_scores`).
    pub score: Option<f32>,
}

/// Everything returned for one prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptOutput {
    /// The ids the model saw (after BOS insertion and truncation).
    pub prompt_token_ids: Vec<u32>,
    /// With `echo` and a tokenizer: the prompt's text.
    pub prompt_text: Option<String>,
    /// With `echo`: per prompt token (the first has no log-prob).
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    pub choices: Vec<Completion>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateOutput {
    pub prompts: Vec<PromptOutput>,
    /// The sampling seed used (given or drawn), so the run can be repeated.
    pub seed: Option<u64>,
    /// Things the caller should know: truncated prompts, options without effect, ...
    pub warnings: Vec<String>,
}

/// Streamed progress of one sequence. With greedy decoding and plain sampling events come token
/// by token; with beam search or `best_of > n` the winners are only known at the end, so each
/// choice arrives as one event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StreamEvent {
    pub prompt: usize,
    pub choice: usize,
    /// Text that became safe to show (complete characters, no possible stop-string prefix).
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Log-prob records of `token_ids` (when requested).
    pub logprobs: Vec<TokenLogprob>,
    /// Set on the sequence's last event.
    pub finish_reason: Option<FinishReason>,
}

/// Decodes requests on a model. Cheap to build; holds only references.
pub struct Generator<'a, B: Backend> {
    model: &'a OptModel<B>,
    tokenizer: Option<&'a OptTokenizer>,
    eos: Option<u32>,
}

/// A prompt after tokenization, truncation and context checks.
struct Prepared {
    ids: Vec<u32>,
    /// New tokens this prompt may have (max_new_tokens, or less when the context is short).
    max_new: usize,
}

/// The batch on the model: KV cache and attention mask `[R, cache.len]`.
struct Batch<B: Backend> {
    cache: KvCache<B>,
    mask: Vec<u8>,
    rows: usize,
    /// A cache of the same shape kept for reuse by [`Batch::select`] (beam search reorders
    /// every step, so it double-buffers).
    spare: Option<KvCache<B>>,
}

impl<B: Backend> Batch<B> {
    /// Keep (and reorder / duplicate) rows: new row i is old row `src[i]`.
    fn select(&mut self, model: &OptModel<B>, src: &[usize]) -> Result<()> {
        if src.len() == self.rows && src.iter().enumerate().all(|(i, &s)| i == s) {
            return Ok(());
        }
        let cfg: &OptConfig = &model.cfg;
        let be = &model.backend;
        let cap = self.cache.capacity;
        // Keys/values per position: this rank's heads only under tensor parallelism (the model
        // lays row b of the cache out at b · cap · attn_dim).
        let c = model.layout.attn_dim;
        let stride = cap * c;
        let n = self.cache.len * c;
        let w = self.cache.len;
        if src.windows(2).all(|p| p[0] < p[1]) {
            // Rows leaving the batch: compact in place (row s moves down to i ≤ s) through a
            // one-row buffer, so finishing rows cost no new cache allocation.
            if n > 0 {
                let mut tmp = be.zeros(opt_tensor::DType::F32, n)?;
                for l in 0..cfg.num_hidden_layers {
                    for (i, &s) in src.iter().enumerate().filter(|(i, s)| i != *s) {
                        be.copy(tmp.at_mut(0, n), self.cache.k[l].at(s * stride, n))?;
                        be.copy(self.cache.k[l].at_mut(i * stride, n), tmp.at(0, n))?;
                        be.copy(tmp.at_mut(0, n), self.cache.v[l].at(s * stride, n))?;
                        be.copy(self.cache.v[l].at_mut(i * stride, n), tmp.at(0, n))?;
                    }
                }
            }
            // The buffers keep their size; the model only reads the first `batch` rows.
            self.cache.batch = src.len();
            self.mask = src.iter().flat_map(|&s| self.mask[s * w..(s + 1) * w].iter().copied()).collect();
            self.rows = src.len();
            return Ok(());
        }
        let mut dst = match self.spare.take() {
            Some(c) if c.batch == src.len() && c.capacity == cap => c,
            _ => KvCache::for_model(model, src.len(), cap)?,
        };
        if n > 0 {
            for l in 0..cfg.num_hidden_layers {
                for (i, &s) in src.iter().enumerate() {
                    be.copy(dst.k[l].at_mut(i * stride, n), self.cache.k[l].at(s * stride, n))?;
                    be.copy(dst.v[l].at_mut(i * stride, n), self.cache.v[l].at(s * stride, n))?;
                }
            }
        }
        dst.len = self.cache.len;
        let old = std::mem::replace(&mut self.cache, dst);
        // Beam search reorders at a constant batch size every step: keep the old cache for the
        // next reorder instead of allocating one.
        if old.batch == self.cache.batch {
            self.spare = Some(old);
        }
        self.mask = src.iter().flat_map(|&s| self.mask[s * w..(s + 1) * w].iter().copied()).collect();
        self.rows = src.len();
        Ok(())
    }

    /// Feed one token per row; returns the next logits `[R, V]` on the host.
    fn step(&mut self, model: &OptModel<B>, tokens: &[u32]) -> Result<Vec<f32>> {
        let w = self.cache.len;
        let mut mask = Vec::with_capacity(self.rows * (w + 1));
        for r in 0..self.rows {
            mask.extend_from_slice(&self.mask[r * w..(r + 1) * w]);
            mask.push(1);
        }
        self.mask = mask;
        let logits = model.forward(tokens, self.rows, Some(&self.mask), Some(&mut self.cache), LogitsMode::Last)?;
        Ok(model.backend.to_f32(logits.v())?)
    }
}

/// One greedy/sampled sequence in flight.
struct SeqRow {
    prompt: usize,
    candidate: usize,
    history: Vec<u32>,
    generated: Vec<u32>,
    counts: HashMap<u32, u32>,
    logprobs: Vec<TokenLogprob>,
    cumulative: f64,
    text: Option<TextStream>,
    seed: u64,
    max_new: usize,
    finish: Option<FinishReason>,
}

/// `log Σ exp(row)` (f64 sum).
fn logsumexp(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return m;
    }
    let s: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
    m + s.ln() as f32
}

/// The raw log-prob record of `token` given logits `row` with log-normaliser `lse`.
fn logprob_record(row: &[f32], lse: f32, token: u32, top: usize) -> TokenLogprob {
    let top = if top > 0 { top_k_of(row, top).into_iter().map(|(i, x)| (i, x - lse)).collect() } else { Vec::new() };
    TokenLogprob { id: token, logprob: Some(row[token as usize] - lse), top }
}

impl<'a, B: Backend> Generator<'a, B> {
    /// A generator for `model`. Without a tokenizer, prompts must be ids, outputs have no text
    /// and stop strings are refused. EOS is the model config's `eos_token_id`.
    pub fn new(model: &'a OptModel<B>, tokenizer: Option<&'a OptTokenizer>) -> Self {
        Generator { model, tokenizer, eos: Some(model.cfg.eos_token_id) }
    }

    /// Use another end-of-sequence token, or none (decode to `max_new_tokens` always).
    pub fn with_eos(mut self, eos: Option<u32>) -> Self {
        self.eos = eos;
        self
    }

    pub fn model(&self) -> &OptModel<B> {
        self.model
    }

    pub fn tokenizer(&self) -> Option<&OptTokenizer> {
        self.tokenizer
    }

    /// Generate without streaming.
    pub fn generate(&self, req: &GenerateRequest) -> Result<GenerateOutput> {
        self.generate_stream(req, |_| ControlFlow::Continue(()))
    }

    /// Bytes of token `id` as text: nothing for `</s>` and `<pad>` (HF's `skip_special_tokens`)
    /// or without a tokenizer.
    fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self.tokenizer {
            Some(t) if id != t.eos_id() && id != t.pad_id() => t.token_bytes(id).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Text of a token sequence (lossy UTF-8, specials skipped).
    pub fn decode(&self, ids: &[u32]) -> Option<String> {
        self.tokenizer?;
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_bytes(i)).collect();
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn prepare(
        &self,
        index: usize,
        prompt: &Prompt,
        params: &SamplingParams,
        warnings: &mut Vec<String>,
    ) -> Result<Prepared> {
        let cfg = &self.model.cfg;
        let mut ids = match prompt {
            Prompt::Text(s) => {
                let tok = self.tokenizer.ok_or(GenerateError::NoTokenizer("a text prompt"))?;
                tok.encode(s, true)?
            }
            Prompt::Ids(v) => v.clone(),
        };
        if ids.is_empty() {
            // Nothing to condition on: start from `</s>`, as OPT's tokenizer does for "".
            ids.push(cfg.bos_token_id);
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(GenerateError::Prompt {
                index,
                detail: format!("token id {bad} is outside the vocabulary of {}", cfg.vocab_size),
            });
        }
        let ctx = cfg.max_position_embeddings;
        let want = params.max_new_tokens;
        // The last new token is never fed back, so prompt + max_new - 1 positions are needed.
        let needed = ids.len() + want.saturating_sub(1);
        if ids.len() > ctx && !params.truncate {
            return Err(GenerateError::Prompt {
                index,
                detail: format!(
                    "{} tokens do not fit the model's context of {ctx} (truncate to keep the last ones)",
                    ids.len()
                ),
            });
        }
        if params.truncate && needed > ctx {
            let keep = ctx.saturating_sub(want.saturating_sub(1)).max(1).min(ids.len());
            if keep < ids.len() {
                warnings.push(format!(
                    "prompt {index}: {} tokens + {want} new exceed the context of {ctx}; kept the last {keep} prompt tokens",
                    ids.len()
                ));
                ids.drain(..ids.len() - keep);
            }
        }
        let room = ctx + 1 - ids.len();
        if want > room {
            warnings
                .push(format!("prompt {index}: the context of {ctx} leaves room for {room} new tokens, not {want}"));
        }
        Ok(Prepared { max_new: want.min(room), ids })
    }

    /// Generate, calling `on_event` as text becomes available. Returning `ControlFlow::Break`
    /// from the callback cancels the request ([`GenerateError::Cancelled`]).
    pub fn generate_stream<F>(&self, req: &GenerateRequest, mut on_event: F) -> Result<GenerateOutput>
    where
        F: FnMut(StreamEvent) -> ControlFlow<()>,
    {
        let params = &req.params;
        let mode = params.validate()?;
        let cfg = &self.model.cfg;
        let v = cfg.vocab_size;
        if let Some(k) = params.logprobs {
            if k > v {
                return Err(GenerateError::option(
                    "logprobs",
                    format!("asks for {k} alternatives, the vocabulary has {v}"),
                ));
            }
        }
        if !params.stop.is_empty() && self.tokenizer.is_none() {
            return Err(GenerateError::NoTokenizer("stop"));
        }
        if req.prompts.is_empty() {
            return Err(GenerateError::Prompt { index: 0, detail: "no prompt given".into() });
        }
        let mut warnings = Vec::new();
        let ignored = params.ignored_options(mode);
        if !ignored.is_empty() {
            warnings.push(format!("ignored in this decoding mode: {}", ignored.join(", ")));
        }
        let prepared: Vec<Prepared> = req
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| self.prepare(i, p, params, &mut warnings))
            .collect::<Result<_>>()?;
        let seed = matches!(mode, Mode::Sample { .. }).then(|| params.seed.unwrap_or_else(fresh_seed));

        let mut outputs: Vec<PromptOutput> = prepared
            .iter()
            .map(|p| PromptOutput {
                prompt_token_ids: p.ids.clone(),
                prompt_text: if params.echo { self.decode(&p.ids) } else { None },
                prompt_logprobs: None,
                choices: Vec::new(),
            })
            .collect();

        let max_new = prepared.iter().map(|p| p.max_new).max().unwrap_or(0);
        if max_new == 0 && !params.echo {
            for (out, _) in outputs.iter_mut().zip(&prepared) {
                out.choices = (0..params.n).map(|i| self.empty_completion(i, params)).collect();
            }
            return Ok(GenerateOutput { prompts: outputs, seed, warnings });
        }

        // ---- prefill: the prompts as one left-padded batch [P, Tp] ----------------------------
        let p = prepared.len();
        let tp = prepared.iter().map(|x| x.ids.len()).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(p * tp);
        let mut mask = Vec::with_capacity(p * tp);
        for x in &prepared {
            let pad = tp - x.ids.len();
            ids.extend(std::iter::repeat_n(cfg.pad_token_id, pad).chain(x.ids.iter().copied()));
            mask.extend(std::iter::repeat_n(0u8, pad).chain(std::iter::repeat_n(1u8, x.ids.len())));
        }
        let capacity = tp + max_new.saturating_sub(1);
        let mut cache = KvCache::for_model(self.model, p, capacity.max(tp))?;
        let lmode = if params.echo { LogitsMode::All } else { LogitsMode::Last };
        let logits = self.model.forward(&ids, p, Some(&mask), Some(&mut cache), lmode)?;
        let host = self.model.backend.to_f32(logits.v())?;
        drop(logits);
        let last_row = |i: usize| -> &[f32] {
            let r = if params.echo { i * tp + tp - 1 } else { i };
            &host[r * v..(r + 1) * v]
        };
        if params.echo {
            let top = params.logprobs.unwrap_or(0);
            for (i, x) in prepared.iter().enumerate() {
                let pad = tp - x.ids.len();
                let mut lps = vec![TokenLogprob { id: x.ids[0], logprob: None, top: Vec::new() }];
                for j in 1..x.ids.len() {
                    let r = i * tp + pad + j - 1;
                    let row = &host[r * v..(r + 1) * v];
                    lps.push(logprob_record(row, logsumexp(row), x.ids[j], top));
                }
                outputs[i].prompt_logprobs = Some(lps);
            }
        }
        let first_logits: Vec<Vec<f32>> = (0..p).map(|i| last_row(i).to_vec()).collect();
        drop(host);
        let batch = Batch { cache, mask, rows: p, spare: None };

        match mode {
            Mode::Beam { beams } => {
                self.run_beams(params, beams, &prepared, batch, first_logits, &mut outputs, &mut on_event)?
            }
            Mode::Greedy => {
                self.run_rows(params, true, 1, 0, &prepared, batch, first_logits, &mut outputs, &mut on_event)?
            }
            Mode::Sample { candidates } => {
                let seed = seed.unwrap_or(0);
                self.run_rows(
                    params,
                    false,
                    candidates,
                    seed,
                    &prepared,
                    batch,
                    first_logits,
                    &mut outputs,
                    &mut on_event,
                )?
            }
        }
        Ok(GenerateOutput { prompts: outputs, seed, warnings })
    }

    fn empty_completion(&self, index: usize, params: &SamplingParams) -> Completion {
        Completion {
            index,
            text: self.tokenizer.map(|_| String::new()),
            token_ids: Vec::new(),
            finish_reason: FinishReason::Length,
            logprobs: params.logprobs.map(|_| Vec::new()),
            cumulative_logprob: 0.0,
            score: None,
        }
    }

    /// Greedy decoding or sampling: `candidates` rows per prompt.
    #[allow(clippy::too_many_arguments)]
    fn run_rows<F: FnMut(StreamEvent) -> ControlFlow<()>>(
        &self,
        params: &SamplingParams,
        greedy: bool,
        candidates: usize,
        seed: u64,
        prepared: &[Prepared],
        mut batch: Batch<B>,
        first_logits: Vec<Vec<f32>>,
        outputs: &mut [PromptOutput],
        on_event: &mut F,
    ) -> Result<()> {
        let v = self.model.cfg.vocab_size;
        let procs = Processors::new(params, self.eos, !greedy);
        let live = candidates == params.n;
        let top = params.logprobs.unwrap_or(0);
        let mut rows: Vec<SeqRow> = Vec::new();
        let mut src = Vec::new();
        let mut logits = Vec::new();
        for (pi, x) in prepared.iter().enumerate() {
            for c in 0..candidates {
                rows.push(SeqRow {
                    prompt: pi,
                    candidate: c,
                    history: x.ids.clone(),
                    generated: Vec::new(),
                    counts: HashMap::new(),
                    logprobs: Vec::new(),
                    cumulative: 0.0,
                    text: self.tokenizer.map(|_| TextStream::new(&params.stop)),
                    seed: sequence_seed(seed, c),
                    max_new: x.max_new,
                    finish: if x.max_new == 0 { Some(FinishReason::Length) } else { None },
                });
                if x.max_new > 0 {
                    src.push(pi);
                    logits.extend_from_slice(&first_logits[pi]);
                }
            }
        }
        drop(first_logits);
        // Rows in batch order (indices into `rows`), unfinished only.
        let mut active: Vec<usize> =
            rows.iter().enumerate().filter(|(_, r)| r.finish.is_none()).map(|(i, _)| i).collect();
        if !active.is_empty() {
            batch.select(self.model, &src)?;
        }
        let mut scratch = vec![0f32; v];
        while !active.is_empty() {
            let mut next = Vec::with_capacity(active.len());
            let mut keep = Vec::with_capacity(active.len());
            let mut events = Vec::new();
            for (slot, &ri) in active.iter().enumerate() {
                let row = &mut rows[ri];
                let raw = &logits[slot * v..(slot + 1) * v];
                let token = if greedy && procs.is_identity() {
                    argmax(raw)
                } else {
                    scratch.copy_from_slice(raw);
                    let ctx = SeqContext { history: &row.history, generated: row.generated.len(), counts: &row.counts };
                    procs.apply(&mut scratch, &ctx);
                    if greedy {
                        argmax(&scratch)
                    } else {
                        let u = uniform_f64(row.seed, row.generated.len() as u64);
                        sample(&scratch, u).ok_or_else(|| GenerateError::Prompt {
                            index: row.prompt,
                            detail: format!(
                                "every token was filtered out at step {} (penalties / no_repeat_ngram_size)",
                                row.generated.len()
                            ),
                        })?
                    }
                };
                let rec = logprob_record(raw, logsumexp(raw), token, top);
                row.cumulative += rec.logprob.unwrap_or(0.0) as f64;
                row.generated.push(token);
                row.history.push(token);
                *row.counts.entry(token).or_insert(0) += 1;
                let mut finish = None;
                let mut delta = String::new();
                if Some(token) == self.eos {
                    finish = Some(FinishReason::Eos);
                } else if let Some(ts) = row.text.as_mut() {
                    if ts.push(&self.token_bytes(token)) {
                        finish = Some(FinishReason::Stop);
                    }
                }
                if finish.is_none() && row.generated.len() >= row.max_new {
                    finish = Some(FinishReason::Length);
                }
                if let Some(ts) = row.text.as_mut() {
                    delta = ts.take_delta();
                    if finish.is_some() {
                        delta.push_str(&ts.finish());
                    }
                }
                row.finish = finish;
                if live {
                    events.push(StreamEvent {
                        prompt: row.prompt,
                        choice: row.candidate,
                        text: delta,
                        token_ids: vec![token],
                        logprobs: if params.logprobs.is_some() { vec![rec.clone()] } else { Vec::new() },
                        finish_reason: finish,
                    });
                }
                if params.logprobs.is_some() {
                    row.logprobs.push(rec);
                }
                if finish.is_none() {
                    next.push(token);
                    keep.push(slot);
                }
            }
            for e in events {
                if on_event(e).is_break() {
                    return Err(GenerateError::Cancelled);
                }
            }
            if keep.is_empty() {
                break;
            }
            if keep.len() != active.len() {
                batch.select(self.model, &keep)?;
                active = keep.iter().map(|&s| active[s]).collect();
            }
            logits = batch.step(self.model, &next)?;
        }

        // Collect: per prompt, the candidates (ranked by mean log-prob when best_of > n).
        let mut per_prompt: Vec<Vec<SeqRow>> = (0..prepared.len()).map(|_| Vec::new()).collect();
        for r in rows {
            per_prompt[r.prompt].push(r);
        }
        for (pi, mut cands) in per_prompt.into_iter().enumerate() {
            if !live {
                let mean =
                    |r: &SeqRow| if r.generated.is_empty() { 0.0 } else { r.cumulative / r.generated.len() as f64 };
                cands.sort_by(|a, b| {
                    mean(b)
                        .partial_cmp(&mean(a))
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(a.candidate.cmp(&b.candidate))
                });
                cands.truncate(params.n);
            }
            for (i, r) in cands.into_iter().enumerate() {
                let c = Completion {
                    index: i,
                    text: r.text.as_ref().map(|t| t.text().to_string()),
                    token_ids: r.generated,
                    finish_reason: r.finish.unwrap_or(FinishReason::Length),
                    logprobs: params.logprobs.map(|_| r.logprobs),
                    cumulative_logprob: r.cumulative,
                    score: None,
                };
                if !live || c.token_ids.is_empty() {
                    self.emit_whole(pi, &c, on_event)?;
                }
                outputs[pi].choices.push(c);
            }
        }
        Ok(())
    }

    /// One event carrying a whole completion (beam search, best_of, or nothing generated).
    fn emit_whole<F: FnMut(StreamEvent) -> ControlFlow<()>>(
        &self,
        prompt: usize,
        c: &Completion,
        on_event: &mut F,
    ) -> Result<()> {
        let e = StreamEvent {
            prompt,
            choice: c.index,
            text: c.text.clone().unwrap_or_default(),
            token_ids: c.token_ids.clone(),
            logprobs: c.logprobs.clone().unwrap_or_default(),
            finish_reason: Some(c.finish_reason),
        };
        if on_event(e).is_break() {
            return Err(GenerateError::Cancelled);
        }
        Ok(())
    }

    /// Beam search: `beams` rows per prompt, reordered every step.
    #[allow(clippy::too_many_arguments)]
    fn run_beams<F: FnMut(StreamEvent) -> ControlFlow<()>>(
        &self,
        params: &SamplingParams,
        beams: usize,
        prepared: &[Prepared],
        mut batch: Batch<B>,
        first_logits: Vec<Vec<f32>>,
        outputs: &mut [PromptOutput],
        on_event: &mut F,
    ) -> Result<()> {
        let v = self.model.cfg.vocab_size;
        let procs = Processors::new(params, self.eos, false);
        let top = params.logprobs.unwrap_or(0);
        let mut groups: Vec<BeamGroup> = prepared
            .iter()
            .map(|x| {
                BeamGroup::new(BeamConfig {
                    num_beams: beams,
                    length_penalty: params.length_penalty,
                    early_stopping: params.early_stopping,
                    max_new: x.max_new,
                    eos: self.eos,
                })
            })
            .collect();
        let stops = &params.stop;
        let stop_hit = |toks: &[u32]| -> bool {
            if stops.is_empty() {
                return false;
            }
            self.decode(toks).is_some_and(|t| find_stop(&t, stops).is_some())
        };
        // Groups in batch order, each with `beams` consecutive rows.
        let mut active: Vec<usize> = (0..groups.len()).filter(|&g| !groups[g].done).collect();
        let src: Vec<usize> = active.iter().flat_map(|&g| std::iter::repeat_n(g, beams)).collect();
        let mut logits: Vec<f32> = src.iter().flat_map(|&g| first_logits[g].iter().copied()).collect();
        drop(first_logits);
        if !active.is_empty() {
            batch.select(self.model, &src)?;
        }
        while !active.is_empty() {
            let mut rows_next = Vec::new();
            let mut tokens_next = Vec::new();
            for (gslot, &g) in active.iter().enumerate() {
                let group = &mut groups[g];
                let mut lps = Vec::with_capacity(beams);
                let mut raw_lsm = Vec::new();
                for (k, beam) in group.running.iter().enumerate() {
                    let r = gslot * beams + k;
                    let mut lp = log_softmax(&logits[r * v..(r + 1) * v]);
                    raw_lsm.push(lp.clone());
                    if !procs.is_identity() {
                        let mut history = prepared[g].ids.clone();
                        history.extend_from_slice(&beam.tokens);
                        let mut counts = HashMap::new();
                        for &t in &beam.tokens {
                            *counts.entry(t).or_insert(0u32) += 1;
                        }
                        let ctx = SeqContext { history: &history, generated: beam.tokens.len(), counts: &counts };
                        procs.apply(&mut lp, &ctx);
                    }
                    lps.push(lp);
                }
                let record = |k: usize, t: u32| -> TokenLogprob {
                    let row: &[f32] = &raw_lsm[k];
                    let top = if top > 0 { top_k_of(row, top) } else { Vec::new() };
                    TokenLogprob { id: t, logprob: Some(row[t as usize]), top }
                };
                let sources = group.step(&lps, &stop_hit, Some(&record));
                if !group.done {
                    for (k, &s) in sources.iter().enumerate() {
                        rows_next.push(gslot * beams + s);
                        tokens_next.push(*group.running[k].tokens.last().unwrap_or(&0));
                    }
                }
            }
            active.retain(|&g| !groups[g].done);
            if active.is_empty() {
                break;
            }
            batch.select(self.model, &rows_next)?;
            logits = batch.step(self.model, &tokens_next)?;
        }

        for (g, group) in groups.into_iter().enumerate() {
            let n = params.n;
            let hyps = group.finished.into_iter().filter(|h| h.finished).take(n);
            let mut choices = Vec::new();
            for (i, h) in hyps.enumerate() {
                let mut text = self.decode(&h.tokens);
                let mut finish = FinishReason::Length;
                if h.tokens.last().copied() == self.eos && self.eos.is_some() {
                    finish = FinishReason::Eos;
                } else if let Some(t) = text.as_mut() {
                    if let Some(at) = find_stop(t, stops) {
                        t.truncate(at);
                        finish = FinishReason::Stop;
                    }
                }
                let cumulative = h.logprobs.iter().filter_map(|l| l.logprob).map(f64::from).sum();
                choices.push(Completion {
                    index: i,
                    text,
                    token_ids: h.tokens,
                    finish_reason: finish,
                    logprobs: params.logprobs.map(|_| h.logprobs),
                    cumulative_logprob: cumulative,
                    score: Some(h.score),
                });
            }
            if choices.is_empty() {
                // max_new = 0: nothing to search.
                choices = (0..n).map(|i| self.empty_completion(i, params)).collect();
            }
            for c in &choices {
                self.emit_whole(g, c, on_event)?;
            }
            outputs[g].choices = choices;
        }
        Ok(())
    }
}
