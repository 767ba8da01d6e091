//! The engine: one thread owns the model and runs continuous batching.
//!
//! Requests ([`Job`]s) arrive on a bounded channel. Each turn of the loop the engine
//! 1. drops the requests whose client went away (their event receiver is closed), freeing
//!    their sequences and KV cache at once;
//! 2. admits waiting requests in arrival order while the KV-cache budget and the sequence limit
//!    allow: each prompt is prefilled alone into its own batch-1 cache (copied for `n` > 1), its
//!    first token is chosen from the prefill logits, and its sequences join the running batch;
//! 3. runs one decode step for every running sequence with [`OptModel::forward_step`] — one
//!    batched GEMM per projection, attention per sequence over its own cache — and hands each
//!    sequence its next token; finished sequences leave the batch at once.
//!
//! Admission reserves a sequence's whole cache (prompt + max_tokens - 1 positions) when it
//! joins, so a running sequence never has to be preempted: the budget is a hard bound on the
//! KV memory, at the price of reserving positions a sequence may not use (it may stop early).
//! The order is first come, first served: a large request at the head waits for room rather
//! than being overtaken forever by small ones.
//!
//! Token choice is the one of `opt_generate::Generator` (same processors, same argmax, same
//! seeded draws keyed by (seed, candidate, step)), and `forward_step` gives every row the
//! result it would have alone, so a request's output does not depend on what else is running:
//! greedy under load equals greedy alone, and a seeded sample is reproducible.
//!
//! Beam search (`num_beams` > 1, or `best_of` > 1 without sampling, metaseq's convention) does
//! not fit a per-sequence step (beams are reordered every step), so such a request runs whole
//! through `Generator` on this thread, pausing the batch while it runs. They are rare in
//! serving; the pause is the price of not duplicating the HF-exact beam search here.
//!
//! Every model call goes through a `Runner` (`runner.rs`), which also owns the sequences' KV
//! caches: with tensor parallelism it first hands each call to the follower ranks.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use opt_generate::params::Mode;
use opt_generate::processors::{Processors, SeqContext};
use opt_generate::sample::{argmax, sample, sequence_seed, uniform_f64};
use opt_generate::{
    Completion, FinishReason, GenerateError, GenerateRequest, Prompt, SamplingParams, TextStream, TokenLogprob,
};
use opt_model::score::top_k_of;
use opt_model::{OptConfig, OptModel};
use opt_tensor::{Backend, Buffer, DType};
use opt_tokenizer::OptTokenizer;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Notify;

use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::runner::{Followers, Runner};

/// Limits of the engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// KV-cache memory the running sequences may reserve, in bytes.
    pub kv_cache_bytes: usize,
    /// Requests that may wait for admission; more get 429.
    pub max_queue: usize,
    /// Sequences in the decode batch at most. On the CPU backend, decode products with at most
    /// 64 rows take a batch-invariant kernel (`opt-tensor`'s gemv); larger batches go to a GEMM
    /// whose rounding depends on the row count, so keep this ≤ 64 for batch-independent output.
    pub max_running: usize,
    /// Prompt tokens prefilled per loop turn (at least one request is always admitted when it
    /// fits), so a burst of long prompts does not stall the running sequences for long.
    pub prefill_tokens_per_step: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { kv_cache_bytes: 2 << 30, max_queue: 256, max_running: 64, prefill_tokens_per_step: 2048 }
    }
}

/// What the engine tells a request's handler, in order: per prompt one `Prompt` before any of
/// that prompt's choices, then `Token`s (streamable requests) or `Whole` choices, then `Done`.
#[derive(Debug)]
pub(crate) enum Event {
    /// Prompt `prompt` was prefilled; its log-probs when `echo` and `logprobs` were asked for.
    Prompt {
        prompt: usize,
        logprobs: Option<Vec<TokenLogprob>>,
    },
    /// The next token of choice `choice` (= prompt · n + i). `text` is the text that became
    /// safe to show; the last token of a choice carries `finish`.
    Token {
        choice: usize,
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
        finish: Option<FinishReason>,
    },
    /// A whole choice (best_of ranking, beam search, nothing to generate).
    Whole {
        choice: usize,
        completion: Completion,
    },
    Done,
    Error(String),
}

/// A request as the engine sees it: tokenized, checked, with a resolved seed.
pub(crate) struct Job {
    pub prompts: Vec<Vec<u32>>,
    pub params: SamplingParams,
    pub mode: Mode,
    pub seed: u64,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
    /// KV-cache bytes and sequences the request needs once admitted.
    pub kv_bytes: usize,
    pub sequences: usize,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SubmitError {
    Full,
    Closed,
}

/// What the handlers need to know about the model and the engine's limits.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub context: usize,
    pub vocab: usize,
    /// KV-cache bytes per position of one sequence (f32 keys and values, every layer).
    pub kv_bytes_per_position: usize,
}

impl ModelInfo {
    pub fn new(cfg: &OptConfig) -> Self {
        Self::with_kv_width(cfg, cfg.hidden_size)
    }

    /// For a model whose caches hold `width` values per position and layer (a tensor-parallel
    /// rank caches only its heads: `hidden_size / tp`, so the same `--kv-cache-bytes` per
    /// process admits `tp` times the tokens).
    pub fn with_kv_width(cfg: &OptConfig, width: usize) -> Self {
        ModelInfo {
            context: cfg.max_position_embeddings,
            vocab: cfg.vocab_size,
            kv_bytes_per_position: 2 * cfg.num_hidden_layers * width * DType::F32.size_in_bytes(),
        }
    }

    /// Sequences a request runs at once: prompts × candidates (or beams); none when there is
    /// nothing to generate.
    pub fn sequences(&self, prompts: usize, max_new: usize, mode: Mode) -> usize {
        if max_new == 0 {
            return 0;
        }
        match mode {
            Mode::Greedy => prompts,
            Mode::Sample { candidates } => prompts * candidates,
            Mode::Beam { beams } => prompts * beams,
        }
    }

    /// KV-cache bytes a request reserves once admitted (see the module docs).
    pub fn kv_bytes(&self, prompts: &[Vec<u32>], max_new: usize, mode: Mode) -> usize {
        if max_new == 0 {
            return 0;
        }
        let cap = |len: usize| len + max_new - 1;
        let positions = match mode {
            Mode::Greedy => prompts.iter().map(|p| cap(p.len())).sum::<usize>(),
            Mode::Sample { candidates } => prompts.iter().map(|p| cap(p.len())).sum::<usize>() * candidates,
            Mode::Beam { beams } => {
                // Generator: a left-padded prefill cache of P rows, then P·beams rows, double
                // buffered while beams are reordered.
                let tp = prompts.iter().map(Vec::len).max().unwrap_or(1);
                prompts.len() * (1 + 2 * beams) * cap(tp)
            }
        };
        positions * self.kv_bytes_per_position
    }
}

/// The handlers' side of the engine: a bounded queue and the shared metrics.
#[derive(Clone)]
pub(crate) struct EngineHandle {
    jobs: mpsc::SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    pub info: ModelInfo,
    pub options: EngineOptions,
    /// Signalled when the engine thread ends, with why it ended early (if it did).
    pub stopped: Arc<Stopped>,
}

/// The end of the engine thread.
#[derive(Default)]
pub(crate) struct Stopped {
    pub notify: Notify,
    pub reason: std::sync::Mutex<Option<String>>,
}

impl EngineHandle {
    /// Queue a job, or refuse it at once when the queue is full (429) or the engine is gone.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if !self.metrics.engine_alive.load(Ordering::Acquire) {
            return Err(SubmitError::Closed);
        }
        // Count first, then send: the engine decrements when it admits, so the count never
        // goes below the number of jobs really waiting.
        if self.metrics.queued.fetch_add(1, Ordering::AcqRel) >= self.options.max_queue {
            self.metrics.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Full);
        }
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queued.fetch_sub(1, Ordering::AcqRel);
                Err(match e {
                    mpsc::TrySendError::Full(_) => SubmitError::Full,
                    mpsc::TrySendError::Disconnected(_) => SubmitError::Closed,
                })
            }
        }
    }
}

/// Start the engine thread for `model` (a tensor-parallel leader when `followers` is given). It
/// runs until every handle is dropped.
pub(crate) fn spawn<B: Backend + 'static>(
    model: OptModel<B>,
    tokenizer: Arc<OptTokenizer>,
    options: EngineOptions,
    followers: Option<Box<dyn Followers>>,
) -> Result<EngineHandle, ServeError> {
    if options.max_running == 0 {
        return Err(ServeError::Option { option: "max_running", detail: "must be at least 1".into() });
    }
    if tokenizer.vocab_size() > model.cfg.vocab_size {
        return Err(ServeError::TokenizerMismatch { tokenizer: tokenizer.vocab_size(), model: model.cfg.vocab_size });
    }
    // The caches the runner allocates (`KvCache::for_model`): this rank's heads only.
    let info = ModelInfo::with_kv_width(&model.cfg, model.layout.attn_dim);
    let metrics = Arc::new(Metrics::new(options.kv_cache_bytes));
    // The channel holds at most the queue's worth of jobs; the `queued` counter is the real bound.
    let (tx, rx) = mpsc::sync_channel(options.max_queue.max(1));
    let stopped = Arc::new(Stopped::default());
    let engine = Engine {
        eos: model.cfg.eos_token_id,
        runner: Runner::new(model, followers),
        tok: tokenizer,
        opts: options.clone(),
        metrics: metrics.clone(),
        rx,
        waiting: VecDeque::new(),
        reqs: HashMap::new(),
        running: Vec::new(),
        kv_used: 0,
        kv_per_position: info.kv_bytes_per_position,
        next_id: 0,
        next_seq: 0,
        stopped: stopped.clone(),
    };
    std::thread::Builder::new()
        .name("opt-serve-engine".into())
        .spawn(move || engine.run())
        .map_err(ServeError::Spawn)?;
    Ok(EngineHandle { jobs: tx, metrics, info, options, stopped })
}

/// A request in the running batch.
struct Req {
    events: UnboundedSender<Event>,
    params: SamplingParams,
    procs: Processors,
    greedy: bool,
    /// Every candidate is returned (no best_of ranking): tokens are streamed as they come.
    live: bool,
    /// Per-token log-probs are needed (asked for, or for ranking candidates).
    need_logprob: bool,
    sequences_left: usize,
    /// Finished candidates per prompt, for best_of ranking.
    finished: Vec<Vec<Candidate>>,
    kv_bytes: usize,
    received: Instant,
    first_token_seen: bool,
}

struct Candidate {
    candidate: usize,
    completion: Completion,
}

/// One sequence in the batch: its decoding state (its KV cache is the runner's, under `id`).
struct Seq {
    req: u64,
    /// The runner's key for this sequence's cache.
    id: u64,
    prompt: usize,
    candidate: usize,
    history: Vec<u32>,
    generated: Vec<u32>,
    counts: HashMap<u32, u32>,
    logprobs: Vec<TokenLogprob>,
    cumulative: f64,
    text: TextStream,
    seed: u64,
    max_new: usize,
    /// The token to feed at the next step.
    next: u32,
}

/// The outcome of choosing one token.
struct Advance {
    token: u32,
    record: Option<TokenLogprob>,
    delta: String,
    finish: Option<FinishReason>,
}

struct Engine<B: Backend> {
    runner: Runner<B>,
    tok: Arc<OptTokenizer>,
    eos: u32,
    opts: EngineOptions,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<Job>,
    waiting: VecDeque<Job>,
    reqs: HashMap<u64, Req>,
    running: Vec<Seq>,
    kv_used: usize,
    /// KV-cache bytes per position of one sequence.
    kv_per_position: usize,
    next_id: u64,
    /// The next sequence id (the runner's cache key).
    next_seq: u64,
    stopped: Arc<Stopped>,
}

/// Marks the engine dead when its thread ends, however it ends (a panic included), so that
/// `/health` and new requests see it, and wakes whoever waits for the end.
struct AliveGuard(Arc<Metrics>, Arc<Stopped>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.engine_alive.store(false, Ordering::Release);
        self.1.notify.notify_one();
    }
}

impl<B: Backend> Engine<B> {
    fn run(mut self) {
        let _alive = AliveGuard(self.metrics.clone(), self.stopped.clone());
        loop {
            if let Some(why) = self.runner.broken().map(str::to_string) {
                self.fail_all(&why);
                eprintln!("opt-serve: engine stopped: {why}");
                if let Ok(mut r) = self.stopped.reason.lock() {
                    *r = Some(why);
                }
                return;
            }
            if self.running.is_empty() && self.waiting.is_empty() {
                // Idle: sleep until a request arrives; every handle gone means shut down. A
                // tensor-parallel leader wakes now and then to tell its followers it lives.
                let job = match self.runner.heartbeat() {
                    None => self.rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    Some(every) => self.rx.recv_timeout(every),
                };
                match job {
                    Ok(job) => self.waiting.push_back(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.runner.idle();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.waiting.push_back(job);
            }
            self.drop_cancelled();
            self.admit();
            // Published after admission too, so the peaks see the batch at its largest.
            self.publish();
            if !self.running.is_empty() {
                self.step();
            }
            // Caches of sequences that left the batch this turn (finished, cancelled, failed).
            let running = &self.running;
            self.runner.retain(|id| running.iter().any(|s| s.id == id));
            self.publish();
        }
    }

    /// Answer every waiting and running request with `why` (the engine is stopping).
    fn fail_all(&mut self, why: &str) {
        for job in self.waiting.drain(..) {
            self.metrics.queued.fetch_sub(1, Ordering::AcqRel);
            send(&job.events, Event::Error(format!("the engine stopped: {why}")));
        }
        while let Ok(job) = self.rx.try_recv() {
            self.metrics.queued.fetch_sub(1, Ordering::AcqRel);
            send(&job.events, Event::Error(format!("the engine stopped: {why}")));
        }
        for (_, r) in self.reqs.drain() {
            send(&r.events, Event::Error(format!("the engine stopped: {why}")));
        }
        self.running.clear();
        self.kv_used = 0;
    }

    fn publish(&self) {
        self.metrics.running_requests.store(self.reqs.len(), Ordering::Relaxed);
        self.metrics.running_sequences.store(self.running.len(), Ordering::Relaxed);
        self.metrics.kv_used_bytes.store(self.kv_used, Ordering::Relaxed);
        self.metrics.kv_peak_bytes.fetch_max(self.kv_used, Ordering::Relaxed);
        self.metrics.running_sequences_peak.fetch_max(self.running.len(), Ordering::Relaxed);
    }

    /// Forget requests whose client disconnected: waiting ones leave the queue, running ones
    /// leave the batch and give back their KV cache.
    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        for _ in self.waiting.len()..before {
            self.metrics.queued.fetch_sub(1, Ordering::AcqRel);
            self.metrics.cancelled();
        }
        let gone: Vec<u64> = self.reqs.iter().filter(|(_, r)| r.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            self.remove(id);
            self.metrics.cancelled();
        }
    }

    /// Remove a request and its sequences from the batch.
    fn remove(&mut self, id: u64) {
        if let Some(r) = self.reqs.remove(&id) {
            self.kv_used = self.kv_used.saturating_sub(r.kv_bytes);
        }
        self.running.retain(|s| s.req != id);
    }

    fn admit(&mut self) {
        let mut prefilled = 0usize;
        while let Some(job) = self.waiting.front() {
            let fits = self.kv_used + job.kv_bytes <= self.opts.kv_cache_bytes
                && self.running.len() + job.sequences <= self.opts.max_running;
            let tokens: usize = job.prompts.iter().map(Vec::len).sum();
            if !fits {
                if self.running.is_empty() {
                    // Nothing will free memory: the request can never run. (The handler checks
                    // this before queueing; this guards the loop against waiting forever.)
                    if let Some(job) = self.waiting.pop_front() {
                        self.metrics.queued.fetch_sub(1, Ordering::AcqRel);
                        let _ = job
                            .events
                            .send(Event::Error("the request does not fit the server's KV-cache budget".into()));
                    }
                    continue;
                }
                break;
            }
            if prefilled > 0 && prefilled + tokens > self.opts.prefill_tokens_per_step {
                break;
            }
            let Some(job) = self.waiting.pop_front() else { break };
            self.metrics.queued.fetch_sub(1, Ordering::AcqRel);
            self.metrics.queue_wait(job.received.elapsed());
            prefilled += tokens.max(1);
            match job.mode {
                Mode::Beam { .. } => self.run_whole(job),
                Mode::Greedy | Mode::Sample { .. } => self.start(job),
            }
        }
    }

    /// Prefill a request's prompts and put its sequences in the batch.
    fn start(&mut self, job: Job) {
        let id = self.next_id;
        self.next_id += 1;
        let (greedy, candidates) = match job.mode {
            Mode::Greedy => (true, 1),
            Mode::Sample { candidates } => (false, candidates),
            Mode::Beam { .. } => (true, 1),
        };
        let p = &job.params;
        let live = candidates == p.n;
        let mut req = Req {
            events: job.events.clone(),
            procs: Processors::new(p, Some(self.eos), !greedy),
            greedy,
            live,
            need_logprob: p.logprobs.is_some() || !live,
            sequences_left: 0,
            finished: (0..job.prompts.len()).map(|_| Vec::new()).collect(),
            kv_bytes: 0,
            received: job.received,
            first_token_seen: false,
            params: job.params.clone(),
        };
        let mut seqs = Vec::new();
        let mut first_tokens = 0;
        let result = (|| -> Result<(), String> {
            for (pi, ids) in job.prompts.iter().enumerate() {
                let max_new = req.params.max_new_tokens;
                let want_lp = req.params.echo && req.params.logprobs.is_some();
                let top = req.params.logprobs.unwrap_or(0);
                if max_new == 0 {
                    // Nothing to generate: scoring only (lm-evaluation-harness's echo + max_tokens 0).
                    let lps = if want_lp { Some(self.score(ids, top)?) } else { None };
                    send(&req.events, Event::Prompt { prompt: pi, logprobs: lps });
                    for c in 0..req.params.n {
                        send(
                            &req.events,
                            Event::Whole {
                                choice: pi * req.params.n + c,
                                completion: empty_completion(c, &req.params),
                            },
                        );
                    }
                    continue;
                }
                let prefilled = self.next_seq;
                self.next_seq += 1;
                let capacity = ids.len() + max_new - 1;
                let (last, lps) =
                    self.prefill(prefilled, ids, capacity, want_lp.then_some(top)).map_err(|e| e.to_string())?;
                send(&req.events, Event::Prompt { prompt: pi, logprobs: lps });
                for c in 0..candidates {
                    // The last candidate takes the prefilled cache; the others get copies.
                    let seq_id = if c + 1 == candidates {
                        prefilled
                    } else {
                        let to = self.next_seq;
                        self.next_seq += 1;
                        self.runner.fork(prefilled, to).map_err(|e| e.to_string())?;
                        to
                    };
                    let mut seq = Seq {
                        req: id,
                        id: seq_id,
                        prompt: pi,
                        candidate: c,
                        history: ids.clone(),
                        generated: Vec::new(),
                        counts: HashMap::new(),
                        logprobs: Vec::new(),
                        cumulative: 0.0,
                        text: TextStream::new(&req.params.stop),
                        seed: sequence_seed(job.seed, c),
                        max_new,
                        next: 0,
                    };
                    req.kv_bytes += capacity * self.kv_per_position;
                    req.sequences_left += 1;
                    let adv = advance(&mut seq, &req, &self.tok, self.eos, &last)?;
                    first_tokens += 1;
                    if !deliver(&self.metrics, &mut req, &mut seq, adv) {
                        seqs.push(seq);
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            send(&req.events, Event::Error(format!("generation failed: {e}")));
            return;
        }
        self.metrics.tokens(first_tokens, None);
        if req.sequences_left == 0 {
            self.finish(req);
            return;
        }
        self.kv_used += req.kv_bytes;
        self.running.extend(seqs);
        self.reqs.insert(id, req);
    }

    /// Prompt log-probs without generation: exactly `score_sequence` (what `opt-rs score` prints).
    fn score(&mut self, ids: &[u32], top: usize) -> Result<Vec<TokenLogprob>, String> {
        let s = self.runner.score(ids, top).map_err(|e| e.to_string())?;
        Ok(s.tokens
            .iter()
            .zip(s.token_logprobs.iter().zip(s.top_logprobs))
            .map(|(&id, (&lp, top))| TokenLogprob { id, logprob: lp, top: top.unwrap_or_default() })
            .collect())
    }

    /// Run the prompt into a fresh batch-1 cache `seq` of `capacity` positions. Returns the last
    /// position's logits and, with `prompt_top`, the prompt's log-probs (log-softmax on the
    /// backend, as `score_sequence` computes them).
    fn prefill(
        &mut self,
        seq: u64,
        ids: &[u32],
        capacity: usize,
        prompt_top: Option<usize>,
    ) -> opt_model::Result<(Vec<f32>, Option<Vec<TokenLogprob>>)> {
        let logits = self.runner.prefill(seq, ids, capacity, prompt_top.is_some())?;
        let model = self.runner.model();
        let be = &model.backend;
        let v = model.cfg.vocab_size;
        let t = ids.len();
        let rows = if prompt_top.is_some() { t } else { 1 };
        let last = be.to_f32(logits.at((rows - 1) * v, v))?;
        let lps = match prompt_top {
            None => None,
            Some(top) => {
                let mut lsm = be.zeros(DType::F32, t * v)?;
                be.log_softmax(lsm.vm(), logits.v(), v)?;
                let lsm = be.to_f32(lsm.v())?;
                let mut out = vec![TokenLogprob { id: ids[0], logprob: None, top: Vec::new() }];
                for i in 1..t {
                    let row = &lsm[(i - 1) * v..i * v];
                    out.push(TokenLogprob { id: ids[i], logprob: Some(row[ids[i] as usize]), top: top_k_of(row, top) });
                }
                Some(out)
            }
        };
        Ok((last, lps))
    }

    /// One decode step over the whole batch.
    fn step(&mut self) {
        let started = Instant::now();
        let tokens: Vec<u32> = self.running.iter().map(|s| s.next).collect();
        let seqs: Vec<u64> = self.running.iter().map(|s| s.id).collect();
        let logits = self.runner.step(&seqs, &tokens).and_then(|l| Ok(self.runner.model().backend.to_f32(l.v())?));
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                // A failed step leaves every cache in an unknown state: fail the whole batch.
                let ids: Vec<u64> = self.reqs.keys().copied().collect();
                for id in ids {
                    if let Some(r) = self.reqs.get(&id) {
                        send(&r.events, Event::Error(format!("decode step failed: {e}")));
                    }
                    self.remove(id);
                }
                return;
            }
        };
        let v = self.runner.model().cfg.vocab_size;
        let Engine { running, reqs, tok, eos, metrics, .. } = self;
        let mut finished = vec![false; running.len()];
        let mut failed: Vec<(u64, String)> = Vec::new();
        for (i, seq) in running.iter_mut().enumerate() {
            let Some(req) = reqs.get_mut(&seq.req) else {
                finished[i] = true;
                continue;
            };
            match advance(seq, req, tok, *eos, &logits[i * v..(i + 1) * v]) {
                Ok(adv) => finished[i] = deliver(metrics, req, seq, adv),
                Err(e) => failed.push((seq.req, e)),
            }
        }
        let mut i = 0;
        running.retain(|_| {
            i += 1;
            !finished[i - 1]
        });
        self.metrics.tokens(tokens.len(), Some(started.elapsed()));
        for (id, e) in failed {
            if let Some(r) = self.reqs.get(&id) {
                send(&r.events, Event::Error(e));
            }
            self.remove(id);
        }
        // Requests whose last sequence finished this step.
        let done: Vec<u64> = self.reqs.iter().filter(|(_, r)| r.sequences_left == 0).map(|(&id, _)| id).collect();
        for id in done {
            if let Some(req) = self.reqs.remove(&id) {
                self.kv_used = self.kv_used.saturating_sub(req.kv_bytes);
                self.running.retain(|s| s.req != id);
                self.finish(req);
            }
        }
    }

    /// Every sequence of `req` is done: rank best_of candidates if needed, then `Done`.
    fn finish(&self, mut req: Req) {
        if !req.live {
            let n = req.params.n;
            for (pi, cands) in req.finished.iter_mut().enumerate() {
                // OpenAI's best_of: the n candidates with the highest mean log-prob per token
                // (ties to the earlier candidate), as `Generator` ranks them.
                let mean = |c: &Candidate| {
                    let len = c.completion.token_ids.len();
                    if len == 0 {
                        0.0
                    } else {
                        c.completion.cumulative_logprob / len as f64
                    }
                };
                cands.sort_by(|a, b| {
                    mean(b)
                        .partial_cmp(&mean(a))
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(a.candidate.cmp(&b.candidate))
                });
                for (i, c) in cands.drain(..).take(n).enumerate() {
                    let mut completion = c.completion;
                    completion.index = i;
                    send(&req.events, Event::Whole { choice: pi * n + i, completion });
                }
            }
        }
        send(&req.events, Event::Done);
    }

    /// Beam search: the whole request through `Generator` (see the module docs).
    fn run_whole(&mut self, job: Job) {
        let prompts = job.prompts.iter().map(|p| Prompt::Ids(p.clone())).collect();
        let request = GenerateRequest::new(prompts, job.params.clone());
        let events = job.events.clone();
        let started = Instant::now();
        let tok = self.tok.clone();
        let out = self.runner.generate(&tok, &request, || events.is_closed());
        match out {
            Ok(out) => {
                let n = job.params.n;
                let mut generated = 0;
                for (pi, po) in out.prompts.into_iter().enumerate() {
                    send(&events, Event::Prompt { prompt: pi, logprobs: po.prompt_logprobs });
                    for c in po.choices {
                        generated += c.token_ids.len();
                        send(&events, Event::Whole { choice: pi * n + c.index, completion: c });
                    }
                }
                self.metrics.first_token(job.received.elapsed());
                self.metrics.tokens(generated, Some(started.elapsed()));
                send(&events, Event::Done);
            }
            Err(GenerateError::Cancelled) => self.metrics.cancelled(),
            Err(e) => send(&events, Event::Error(format!("generation failed: {e}"))),
        }
    }
}

/// Send a token's event (or keep the finished candidate for ranking). Returns true when the
/// sequence finished.
fn deliver(metrics: &Metrics, req: &mut Req, seq: &mut Seq, adv: Advance) -> bool {
    if !req.first_token_seen {
        req.first_token_seen = true;
        metrics.first_token(req.received.elapsed());
    }
    let n = req.params.n;
    if req.live {
        send(
            &req.events,
            Event::Token {
                choice: seq.prompt * n + seq.candidate,
                token: adv.token,
                text: adv.delta,
                logprob: adv.record.filter(|_| req.params.logprobs.is_some()),
                finish: adv.finish,
            },
        );
    }
    let Some(finish) = adv.finish else { return false };
    req.sequences_left -= 1;
    if !req.live {
        let completion = Completion {
            index: seq.candidate,
            text: Some(seq.text.text().to_string()),
            token_ids: std::mem::take(&mut seq.generated),
            finish_reason: finish,
            logprobs: req.params.logprobs.map(|_| std::mem::take(&mut seq.logprobs)),
            cumulative_logprob: seq.cumulative,
            score: None,
        };
        req.finished[seq.prompt].push(Candidate { candidate: seq.candidate, completion });
    }
    true
}

/// A send whose failure only means the client left; the next turn's cancellation sweep then
/// removes the request.
fn send(tx: &UnboundedSender<Event>, e: Event) {
    let _ = tx.send(e);
}

fn empty_completion(index: usize, params: &SamplingParams) -> Completion {
    Completion {
        index,
        text: Some(String::new()),
        token_ids: Vec::new(),
        finish_reason: FinishReason::Length,
        logprobs: params.logprobs.map(|_| Vec::new()),
        cumulative_logprob: 0.0,
        score: None,
    }
}

/// `log Σ exp(row)` with the sum in f64 (as `Generator` computes it).
fn logsumexp(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return m;
    }
    let s: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
    m + s.ln() as f32
}

/// Choose the next token of `seq` from its raw logits `raw` — `Generator`'s rule exactly —
/// and update its text and history.
fn advance(seq: &mut Seq, req: &Req, tok: &OptTokenizer, eos: u32, raw: &[f32]) -> Result<Advance, String> {
    let token = if req.greedy && req.procs.is_identity() {
        argmax(raw)
    } else {
        let mut scores = raw.to_vec();
        let ctx = SeqContext { history: &seq.history, generated: seq.generated.len(), counts: &seq.counts };
        req.procs.apply(&mut scores, &ctx);
        if req.greedy {
            argmax(&scores)
        } else {
            let u = uniform_f64(seq.seed, seq.generated.len() as u64);
            sample(&scores, u).ok_or_else(|| {
                format!(
                    "every token was filtered out at step {} (penalties / no_repeat_ngram_size)",
                    seq.generated.len()
                )
            })?
        }
    };
    let record = req.need_logprob.then(|| {
        let lse = logsumexp(raw);
        let top = req.params.logprobs.unwrap_or(0);
        let top =
            if top > 0 { top_k_of(raw, top).into_iter().map(|(i, x)| (i, x - lse)).collect() } else { Vec::new() };
        TokenLogprob { id: token, logprob: Some(raw[token as usize] - lse), top }
    });
    if let Some(r) = &record {
        seq.cumulative += r.logprob.unwrap_or(0.0) as f64;
        if !req.live && req.params.logprobs.is_some() {
            seq.logprobs.push(r.clone());
        }
    }
    seq.generated.push(token);
    seq.history.push(token);
    *seq.counts.entry(token).or_insert(0) += 1;
    let mut finish = None;
    if token == eos {
        finish = Some(FinishReason::Eos);
    } else if token != tok.pad_id() && seq.text.push(&tok.token_bytes(token).unwrap_or_default()) {
        finish = Some(FinishReason::Stop);
    }
    if finish.is_none() && seq.generated.len() >= seq.max_new {
        finish = Some(FinishReason::Length);
    }
    let mut delta = seq.text.take_delta();
    if finish.is_some() {
        delta.push_str(&seq.text.finish());
    }
    seq.next = token;
    Ok(Advance { token, record, delta, finish })
}

#[cfg(test)]
mod kv_budget_tests {
    use super::ModelInfo;

    #[test]
    fn a_tensor_parallel_rank_budgets_its_heads_only() {
        let cfg = opt_model::OptConfig::preset("125m").expect("preset");
        let whole = ModelInfo::new(&cfg);
        assert_eq!(whole.kv_bytes_per_position, 2 * 12 * 768 * 4);
        let half = ModelInfo::with_kv_width(&cfg, opt_model::ParamLayout::sharded(&cfg, 2).attn_dim);
        assert_eq!(half.kv_bytes_per_position * 2, whole.kv_bytes_per_position);
    }
}
