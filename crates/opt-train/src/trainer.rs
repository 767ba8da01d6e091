//! The training loop: one process, any [`Backend`].
//!
//! A step: take `batch_size` sequences (in `grad_accum` micro-batches), run forward and backward
//! on each with the loss scaled by `1 / (tokens in the whole step)` (times the fp16 loss scale),
//! measure the global gradient norm, let the guards and the loss scaler judge the step, then
//! clip and apply AdamW to the f32 master weights and refresh the compute copy (bf16/fp16).
//!
//! Everything random is a pure function of `(train.seed, step, ...)` through the counter-based
//! RNG (dropout masks, data order, sampling), so a checkpoint needs no RNG state beyond the
//! seed and counters, and a resumed run reproduces an uninterrupted one bit for bit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use opt_model::{DropoutCfg, OptConfig, OptModel, ParamLayout, TrainBatch, TrainState};
use opt_tensor::{rng, Backend, Buffer, CpuBackend, DType};
use opt_tokenizer::OptTokenizer;
use serde_json::json;

use crate::checkpoint::{self, Part, Snapshot, TrainerState};
use crate::config::{Precision, TrainConfig};
use crate::data::{self, Batch, Corpus, Loader};
use crate::guards::Verdict;
use crate::logbook::{self, Logbook};
use crate::optim::{self, AdamWState, LossScaler, ScaleChange};
use crate::parallel::{Parallel, RankInfo};
use crate::plot::LossCurve;
use crate::sample::{self, SampleParams};
use crate::schedule::Schedule;
use crate::zero3::{self, Zero3Stream};
use crate::{Result, TrainError};

/// Labels mixed into the seed for each random stream.
const DROPOUT_LABEL: u64 = 0xD509;
const SAMPLE_LABEL: u64 = 0x5A3B;

/// Faults a test can inject into a step (real runs never set any).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Overwrite the first gradient element with NaN after backward.
    NanGradient,
}

/// How a step ended.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOutcome {
    Applied,
    /// Not applied: `nonfinite_skipped`, `spike_skipped`, `overflow` or `empty_batch`.
    Skipped(&'static str),
    /// Rolled back to the checkpoint at `to_step`.
    RolledBack {
        to_step: u64,
    },
}

/// One step, as the observer and the logbook see it.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Steps done, this one included (1-based number of this step).
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping (of the unscaled gradient).
    pub grad_norm: f64,
    /// Real input tokens in the batch.
    pub tokens: usize,
    pub seconds: f64,
    pub loss_scale: Option<f64>,
    pub outcome: StepOutcome,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    pub step: u64,
    pub loss: f64,
    pub ppl: f64,
    pub tokens: usize,
}

/// A logbook event.
#[derive(Clone, Debug)]
pub struct Event {
    pub step: u64,
    pub name: &'static str,
    pub detail: String,
}

/// What a run is about to do (for progress displays).
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub run_dir: PathBuf,
    pub start_step: u64,
    pub max_steps: u64,
    pub params: usize,
    pub tokens_per_step: usize,
    pub resumed_from: Option<PathBuf>,
    pub train_docs: usize,
    pub valid_batches: usize,
}

/// Receives progress; every method has a no-op default.
pub trait Observer {
    fn started(&mut self, _info: &RunInfo) {}
    fn step(&mut self, _r: &StepReport) {}
    fn eval(&mut self, _r: &EvalReport) {}
    fn event(&mut self, _e: &Event) {}
}

impl Observer for () {}

/// How a run folder is used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Continue from the newest checkpoint in the run folder (start fresh if there is none).
    pub resume: bool,
    /// Delete the folder's checkpoints and logbook first.
    pub fresh: bool,
}

/// The result of [`Trainer::run`].
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub steps: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    /// Mean training loss over the last (up to) 25 applied steps: one batch is noisy.
    pub recent_loss: Option<f64>,
    pub initial_valid: Option<EvalReport>,
    pub final_valid: Option<EvalReport>,
    /// `(prompt, continuation)`.
    pub samples: Vec<(String, String)>,
    pub checkpoint: Option<PathBuf>,
    pub wall_s: f64,
}

pub struct Trainer<B: Backend> {
    cfg: TrainConfig,
    config_toml: String,
    run_dir: PathBuf,
    /// The model in its compute dtype (f32, bf16 or f16 weights); in a multi-rank run, this
    /// rank's tensor-parallel slice of it.
    model: OptModel<B>,
    /// f32 master weights when the model computes in bf16/fp16 (with f32, `model.params` is it);
    /// in a multi-rank run always, and only this rank's window of them.
    master: Option<B::Buf>,
    opt: AdamWState<B>,
    grads: B::Buf,
    /// fp16 only: an f16 copy of the gradients, to detect what would overflow in fp16.
    grad16: Option<B::Buf>,
    /// Multi-rank runs: the other ranks, this rank's window `[lo, hi)` of the slice's flat
    /// buffer, and the gradient window reduced over the data ranks.
    par: Option<Box<dyn Parallel<B>>>,
    window: (usize, usize),
    grad_window: Option<B::Buf>,
    /// The slice's ordinary layout (the model's, unless it streams its layers).
    slice: ParamLayout,
    /// fsdp > 1: the model holds its non-layer parameters and one layer slot, fed by a layer
    /// stream; `grad_acc` collects the step's gradient window as each layer's backward
    /// finishes (see [`crate::zero3`]).
    streamed: bool,
    grad_acc: Vec<f32>,
    /// ZeRO-2 (`parallel.reshard_after_forward = false`): the whole slice in the compute dtype,
    /// gathered after each update; the stream copies layers out of it.
    gathered: Option<B::Buf>,
    acts: TrainState<B>,
    tok: Arc<OptTokenizer>,
    train: Loader,
    valid: Vec<Batch>,
    sched: Schedule,
    state: TrainerState,
    /// `None` on ranks other than 0 of a multi-rank run.
    logbook: Option<Logbook>,
    curve: LossCurve,
    flops_per_token: f64,
    last_saved: Option<u64>,
    resumed_from: Option<PathBuf>,
    /// `--resume` was asked for but the run folder had no checkpoint.
    resume_missing: bool,
    fault: Option<Box<dyn FnMut(u64) -> Option<Fault> + Send>>,
    pending_events: Vec<Event>,
    /// Since the last logbook row: tokens and compute seconds.
    interval: (usize, f64),
    started: Instant,
}

impl<B: Backend> Trainer<B> {
    /// Set up a run: model (random, from `init_from`, or from the newest checkpoint with
    /// `resume`), optimizer, data, logbook.
    pub fn new(cfg: TrainConfig, backend: B, opts: StartOptions) -> Result<Self> {
        Self::new_parallel(cfg, backend, opts, None)
    }

    /// [`Trainer::new`] for one rank of a multi-rank run (`par`: the other ranks; see
    /// [`crate::parallel`]). Every rank calls it with the same configuration; the run folder
    /// must be shared. Only rank 0 writes the logbook, plot, samples and shared checkpoint
    /// files. `None` is a single process.
    pub fn new_parallel(
        cfg: TrainConfig,
        backend: B,
        opts: StartOptions,
        par: Option<Box<dyn Parallel<B>>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let info = par.as_ref().map(|p| p.info());
        check_world(&cfg, info.as_ref())?;
        let main = info.is_none_or(|i| i.is_main());
        let run_dir = cfg.run_dir();
        let ck_root = run_dir.join(checkpoint::CHECKPOINTS);
        let logbook_path = run_dir.join("logbook.jsonl");
        let prepared = if main { prepare_run_folder(&run_dir, opts) } else { Ok(()) };
        agree(par.as_deref(), prepared, &run_dir)?;
        let mut loaded = if opts.resume && !opts.fresh {
            checkpoint::latest(&ck_root)?.map(|d| load_checkpoint(par.as_deref(), &d)).transpose()?
        } else {
            None
        };

        let tok = Arc::new(if cfg.data.tokenizer.is_empty() {
            OptTokenizer::bundled()?
        } else {
            OptTokenizer::from_dir(Path::new(&cfg.data.tokenizer))?
        });

        // Model config: the checkpoint's, or init_from's, or the preset's; dropout from the run.
        let mut model_cfg = match &loaded {
            Some(l) => l.model_cfg.clone(),
            None => base_model_config(&cfg)?,
        };
        model_cfg.dropout = cfg.model.dropout;
        model_cfg.attention_dropout = cfg.model.attention_dropout;
        if let Some(l) = &loaded {
            let want = base_model_config(&cfg)?;
            if ParamLayout::new(&want).specs != ParamLayout::new(&l.model_cfg).specs {
                return Err(TrainError::Checkpoint {
                    path: l.dir.clone(),
                    detail: "the checkpoint's model shape differs from the one the config describes (model.preset / model.init_from)".into(),
                });
            }
        }
        if cfg.data.seq_len > model_cfg.max_position_embeddings {
            return Err(TrainError::Config {
                key: "data.seq_len".into(),
                detail: format!(
                    "{} exceeds the model's max_position_embeddings {}",
                    cfg.data.seq_len, model_cfg.max_position_embeddings
                ),
            });
        }
        if let Some(p) = &par {
            p.check_model(&model_cfg)?;
        }

        let compute = compute_dtype(cfg.train.precision);
        let whole = ParamLayout::new(&model_cfg).total();
        let mut gathered = None;
        let (model, master, window, moments) = match &par {
            None => {
                let (host, moments) = match loaded.as_mut() {
                    Some(l) => {
                        (std::mem::take(&mut l.params), Some((std::mem::take(&mut l.m), std::mem::take(&mut l.v))))
                    }
                    None => (initial_params(&cfg, &model_cfg)?, None),
                };
                let model = OptModel::from_params(backend, model_cfg.clone(), &host, compute)?;
                let be = &model.backend;
                let master = if compute == DType::F32 { None } else { Some(be.from_f32(&host, DType::F32)?) };
                (model, master, (0, whole), moments)
            }
            Some(p) => {
                let n = p.layout(&model_cfg).total();
                let window = p.window(n);
                let streamed = cfg.parallel.streams_layers();
                let r = rank_state(p.as_ref(), &cfg, &model_cfg, loaded.as_mut(), window, streamed)?;
                let model = p.model_from_slice(backend, model_cfg.clone(), &r.model, compute, streamed)?;
                let master = Some(model.backend.from_f32(&r.master, DType::F32)?);
                if streamed && !cfg.parallel.reshard_after_forward {
                    let whole = p.gather(&r.master, n)?;
                    gathered = Some(model.backend.from_f32(&whole, compute)?);
                }
                (model, master, window, r.moments)
            }
        };
        let be = &model.backend;
        let (lo, hi) = window;
        let slice = match &par {
            Some(p) => p.layout(&model_cfg),
            None => model.layout.clone(),
        };
        let streamed = model.layout.slot.is_some();
        let mut opt = AdamWState::new_window(be, &slice, &cfg.optim, lo, hi)?;
        let n = model.layout.total();
        let grads = be.zeros(DType::F32, n)?;
        let grad16 = if cfg.train.precision == Precision::Fp16 { Some(be.zeros(DType::F16, hi - lo)?) } else { None };
        let rows = cfg.micro_batch() / info.map_or(1, |i| i.data_ranks());
        let acts = TrainState::with_recompute(&model, rows, cfg.data.seq_len, cfg.train.recompute)?;
        let scaler = (cfg.train.precision == Precision::Fp16).then(|| LossScaler::new(&cfg.fp16));
        let mut state = TrainerState::new(cfg.train.seed, scaler);
        let mut pending_events = Vec::new();
        if let Some(i) = info {
            let mode = match (streamed, gathered.is_some()) {
                (true, false) => "ZeRO-3: layers gathered one at a time",
                (true, true) => "ZeRO-2: slice kept gathered, layer gradients reduce-scattered",
                _ => "whole slice",
            };
            pending_events.push(Event {
                step: loaded.as_ref().map_or(0, |l| l.state.step),
                name: "parallel",
                detail: format!(
                    "rank {} of {}: tp {} × fsdp {} × dp {}; {mode}; the model computes with {} of the slice's {} parameters, keeps a window of {}",
                    i.rank,
                    i.world,
                    i.tp,
                    i.fsdp,
                    i.dp,
                    model.layout.total(),
                    slice.total(),
                    hi - lo
                ),
            });
        }
        if let Some(l) = loaded.as_mut() {
            if let Some((m, v)) = moments {
                opt.m = be.from_f32(&m, DType::F32)?;
                opt.v = be.from_f32(&v, DType::F32)?;
            }
            opt.updates = l.state.updates;
            state = l.state.clone();
            // A run resumed under another precision starts a fresh loss scaler (or drops it).
            match (cfg.train.precision == Precision::Fp16, state.scaler.is_some()) {
                (true, false) => state.scaler = Some(LossScaler::new(&cfg.fp16)),
                (false, true) => state.scaler = None,
                _ => {}
            }
            // The random streams (data order, dropout) continue from the checkpoint's seed.
            if cfg.train.seed != state.seed {
                pending_events.push(Event {
                    step: state.step,
                    name: "seed_kept",
                    detail: format!(
                        "train.seed = {} differs from the checkpoint's {}; the resumed run keeps {} so it continues exactly",
                        cfg.train.seed, state.seed, state.seed
                    ),
                });
            }
        }

        // Data.
        let vocab = model_cfg.vocab_size;
        let corpus = Corpus::open(&cfg.data.train, vocab, cfg.data.on_bad_row)?;
        if !corpus.skipped.is_empty() {
            pending_events.push(Event {
                step: state.step,
                name: "bad_rows_skipped",
                detail: format!(
                    "train: {} malformed rows skipped: {}",
                    corpus.skipped.len(),
                    corpus.skipped.join("; ")
                ),
            });
        }
        let (eos, pad) = (model_cfg.eos_token_id, model_cfg.pad_token_id);
        let mut train = Loader::new(
            corpus,
            tok.clone(),
            cfg.data.seq_len,
            cfg.data.packing,
            cfg.data.shuffle,
            state.seed,
            eos,
            pad,
        );
        train.seek(state.data)?;
        let (valid, valid_event) = validation_batches(&cfg, tok.clone(), vocab, eos, pad)?;
        pending_events.extend(valid_event.map(|detail| Event { step: state.step, name: "bad_rows_skipped", detail }));

        let config_toml = cfg.to_toml()?;
        let (curve, logbook) = if main {
            write_atomic(&run_dir.join("config.toml"), config_toml.as_bytes())?;
            let curve = if loaded.is_some() {
                LossCurve::from_rows(&logbook::read_rows(&logbook_path)?)
            } else {
                LossCurve::default()
            };
            (curve, Some(Logbook::open(&logbook_path)?))
        } else {
            (LossCurve::default(), None)
        };
        let flops_per_token =
            logbook::flops_per_token(whole, model_cfg.num_hidden_layers, model_cfg.hidden_size, cfg.data.seq_len);
        let last_saved = loaded.as_ref().map(|l| l.state.step);
        let resume_missing = opts.resume && !opts.fresh && loaded.is_none();
        let resumed_from = loaded.map(|l| l.dir);
        Ok(Trainer {
            sched: Schedule::from_config(&cfg),
            cfg,
            config_toml,
            run_dir,
            model,
            master,
            opt,
            grads,
            grad16,
            par,
            window,
            grad_window: None,
            slice,
            streamed,
            grad_acc: if streamed { vec![0.0; hi - lo] } else { Vec::new() },
            gathered,
            acts,
            tok,
            train,
            valid,
            state,
            logbook,
            curve,
            flops_per_token,
            last_saved,
            resumed_from,
            resume_missing,
            fault: None,
            pending_events,
            interval: (0, 0.0),
            started: Instant::now(),
        })
    }

    /// Inject faults into steps: `hook(step)` is asked before each step (0-based).
    pub fn inject_faults(&mut self, hook: impl FnMut(u64) -> Option<Fault> + Send + 'static) {
        self.fault = Some(Box::new(hook));
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }
    pub fn model(&self) -> &OptModel<B> {
        &self.model
    }
    pub fn tokenizer(&self) -> &OptTokenizer {
        &self.tok
    }
    pub fn state(&self) -> &TrainerState {
        &self.state
    }
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The f32 master weights (in a multi-rank run: this rank's tensor-parallel slice of them,
    /// gathered from the fsdp windows, a collective).
    pub fn master_params(&self) -> Result<Vec<f32>> {
        let buf = self.master.as_ref().unwrap_or(&self.model.params);
        let host = self.model.backend.to_f32(buf.v())?;
        match &self.par {
            Some(p) => p.gather(&host, self.slice.total()),
            None => Ok(host),
        }
    }

    /// Where this rank sits in a multi-rank run (`None` for a single process).
    pub fn rank_info(&self) -> Option<RankInfo> {
        self.par.as_ref().map(|p| p.info())
    }

    /// The learning rate step `s` uses (schedule × rollback factor).
    pub fn lr_at(&self, s: u64) -> f64 {
        self.sched.lr(s) * self.state.lr_factor
    }

    fn emit(&mut self, obs: &mut dyn Observer, step: u64, name: &'static str, detail: String) -> Result<()> {
        if let Some(lb) = self.logbook.as_mut() {
            lb.write(&json!({"kind": "event", "step": step, "event": name, "detail": detail}))?;
        }
        if matches!(name, "rollback" | "spike_skipped" | "nonfinite_skipped" | "overflow") {
            self.curve.events.push((step, name.to_string()));
        }
        obs.event(&Event { step, name, detail });
        Ok(())
    }

    /// One optimizer step (or a skipped one).
    pub fn step(&mut self, obs: &mut dyn Observer) -> Result<StepReport> {
        let t0 = Instant::now();
        let s = self.state.step;
        let lr = self.lr_at(s);
        let accum = self.cfg.train.grad_accum;
        let micro = self.cfg.micro_batch();
        let mut batches = Vec::with_capacity(accum);
        for _ in 0..accum {
            batches.push(self.train.next_batch(micro)?);
        }
        self.state.data = self.train.position();
        let count: usize = batches.iter().map(Batch::count).sum();
        let tokens: usize = batches.iter().map(Batch::tokens).sum();
        let loss_scale = self.state.scaler.as_ref().map(|sc| sc.scale);
        let mut report = StepReport {
            step: s + 1,
            loss: f64::NAN,
            lr,
            grad_norm: f64::NAN,
            tokens,
            seconds: 0.0,
            loss_scale,
            outcome: StepOutcome::Applied,
        };
        if count == 0 {
            self.state.step += 1;
            report.outcome = StepOutcome::Skipped("empty_batch");
            self.emit(obs, s + 1, "empty_batch", "no targets in this step's batch".into())?;
            report.seconds = t0.elapsed().as_secs_f64();
            return Ok(report);
        }

        // A multi-rank run: every rank read the whole global batch (so `count` and `tokens` are
        // global); each data rank trains on its own rows of it.
        let info = self.par.as_ref().map(|p| p.info());
        if let Some(i) = info.filter(|i| i.data_ranks() > 1) {
            batches = batches.iter().map(|b| b.rows_of(i.data_rank(), i.data_ranks())).collect();
        }

        // Forward and backward, accumulating the gradient of scale · mean loss over the step.
        let be = &self.model.backend;
        be.fill(self.grads.vm(), 0.0)?;
        if self.streamed {
            self.grad_acc = vec![0.0; self.window.1 - self.window.0];
        }
        let scale = loss_scale.unwrap_or(1.0);
        let per_token = (scale / count as f64) as f32;
        let drop_p = (self.cfg.model.dropout, self.cfg.model.attention_dropout);
        let mut loss_sum = 0f64;
        for (k, b) in batches.iter().enumerate() {
            let drop = (drop_p.0 > 0.0 || drop_p.1 > 0.0).then(|| {
                let mut seed = rng::derive(rng::derive(rng::derive(self.state.seed, DROPOUT_LABEL), s), k as u64);
                // Data ranks hold different rows: each draws its own masks (tensor-parallel
                // peers share theirs, as they compute the same activations).
                if let Some(i) = info.filter(|i| i.data_ranks() > 1) {
                    seed = rng::derive(seed, i.data_rank() as u64);
                }
                DropoutCfg { p: drop_p.0, attn_p: drop_p.1, seed }
            });
            let tb = TrainBatch { ids: &b.ids, mask: &b.mask, targets: &b.targets, batch: b.rows, seq: b.seq };
            let (sum, _) = match (&self.par, &self.master) {
                (Some(p), Some(master)) if self.streamed => {
                    let mut z =
                        Zero3Stream::new(p.as_ref(), &self.slice, self.window, master, Some(&mut self.grad_acc))
                            .with_local(self.gathered.as_ref());
                    let r = self.model.forward_backward_streamed(
                        &tb,
                        &mut self.acts,
                        &mut self.grads,
                        Some(per_token),
                        drop.as_ref(),
                        &mut z,
                    );
                    z.finish(r)?
                }
                _ => {
                    self.model.forward_backward(&tb, &mut self.acts, &mut self.grads, Some(per_token), drop.as_ref())?
                }
            };
            loss_sum += sum;
        }
        if let Some(p) = &self.par {
            let mut x = [loss_sum as f32];
            p.sum_over_data(&mut x)?;
            loss_sum = x[0] as f64;
        }
        let loss = loss_sum / count as f64;
        let be = &self.model.backend;
        if let Some(Fault::NanGradient) = self.fault.as_mut().and_then(|f| f(s)) {
            be.fill(self.grads.at_mut(0, 1), f32::NAN)?;
        }
        let norm = match &self.par {
            None => optim::grad_norm(be, &self.grads)? / scale,
            Some(p) => {
                // Reduce the gradient over the data ranks into this rank's window (ZeRO-3: the
                // layers' parts were reduced during the backward; the rest now).
                let w = if self.streamed {
                    let mut w = std::mem::take(&mut self.grad_acc);
                    zero3::reduce_resident(p.as_ref(), be, &self.slice, self.window, &self.grads, &mut w)?;
                    p.sum_over_replicas(&mut w)?;
                    w
                } else {
                    p.reduce_grads(&be.to_f32(self.grads.v())?)?
                };
                let sq = p.grad_sum_squares(&self.slice, &w)?;
                // Free the last step's window before filling the new one.
                self.grad_window = None;
                self.grad_window = Some(be.from_f32(&w, DType::F32)?);
                drop(w);
                sq.sqrt() / scale
            }
        };
        report.loss = loss;
        report.grad_norm = norm;
        self.state.step += 1;
        self.state.tokens_seen += tokens as u64;

        // fp16: would the gradients have overflowed in half precision? (The CPU computes them
        // in f32; rounding a copy to f16 finds the elements that fp16 could not hold.)
        if let (Some(g16), true) = (self.grad16.as_mut(), self.state.scaler.is_some()) {
            be.copy(g16.vm(), self.grad_window.as_ref().unwrap_or(&self.grads).v())?;
            let mut overflow = !loss.is_finite() || !norm.is_finite() || !be.sum_squares(g16.v())?.is_finite();
            if let Some(p) = &self.par {
                overflow = p.any(overflow)?;
            }
            if overflow {
                match self.state.scaler.as_mut().map(|sc| sc.overflow().map(|_| sc.scale)) {
                    Some(Ok(now)) => {
                        let detail = format!("gradient overflow at loss scale {scale}; step skipped, scale now {now}");
                        report.outcome = StepOutcome::Skipped("overflow");
                        self.emit(obs, s + 1, "overflow", detail)?;
                        report.seconds = t0.elapsed().as_secs_f64();
                        return Ok(report);
                    }
                    Some(Err(at)) => {
                        return Err(TrainError::LossScaleUnderflow {
                            step: s + 1,
                            scale: at,
                            min: self.cfg.fp16.min_scale,
                        })
                    }
                    None => {}
                }
            }
        }

        // Stability guards.
        match self.state.guards.judge(&self.cfg.guards, s, loss, norm) {
            Verdict::Accept => {}
            Verdict::SkipNonFinite => {
                report.outcome = StepOutcome::Skipped("nonfinite_skipped");
                self.emit(obs, s + 1, "nonfinite_skipped", format!("loss {loss}, grad norm {norm}: step not applied"))?;
                report.seconds = t0.elapsed().as_secs_f64();
                return Ok(report);
            }
            Verdict::SkipSpike { ratio, ewma } => {
                report.outcome = StepOutcome::Skipped("spike_skipped");
                let detail = format!("loss {loss:.4} is {ratio:.2} × the running average {ewma:.4}: batch skipped");
                self.emit(obs, s + 1, "spike_skipped", detail)?;
                report.seconds = t0.elapsed().as_secs_f64();
                return Ok(report);
            }
            Verdict::Rollback { reason } => {
                let to = self.rollback(obs, s + 1, &reason)?;
                report.outcome = StepOutcome::RolledBack { to_step: to };
                report.seconds = t0.elapsed().as_secs_f64();
                return Ok(report);
            }
        }

        // Clip and update the f32 master weights; refresh the compute copy.
        let coef = optim::clip_coef(norm, self.cfg.optim.clip_norm);
        let grad_scale = (coef as f64 / scale) as f32;
        let lr32 = lr as f32;
        {
            let OptModel { params, backend, layout, .. } = &mut self.model;
            match (self.master.as_mut(), &self.par, &self.grad_window) {
                (Some(m), Some(_), Some(g)) if self.streamed => {
                    // Update this rank's window; `refresh_streamed` below brings the model up
                    // to date (ZeRO-3: the layers are gathered as the next step uses them).
                    self.opt.update(backend, m, g, lr32, grad_scale)?;
                }
                (Some(m), Some(p), Some(g)) => {
                    // Update this rank's window; gather the slice's new parameters.
                    self.opt.update(backend, m, g, lr32, grad_scale)?;
                    let slice = p.gather(&backend.to_f32(m.v())?, layout.total())?;
                    let dtype = params.dtype();
                    *params = backend.from_f32(&slice, dtype)?;
                }
                (Some(m), _, _) => {
                    self.opt.update(backend, m, &self.grads, lr32, grad_scale)?;
                    backend.copy(params.vm(), m.v())?;
                }
                (None, _, _) => self.opt.update(backend, params, &self.grads, lr32, grad_scale)?,
            }
        }
        if self.streamed {
            self.refresh_streamed()?;
        }
        self.state.updates = self.opt.updates;
        self.state.guards.accept(&self.cfg.guards, loss);
        let grew = self.state.scaler.as_mut().map(|sc| (sc.clean_step(), sc.window));
        if let Some((ScaleChange::Grew(to), window)) = grew {
            self.emit(obs, s + 1, "loss_scale_up", format!("{window} clean steps: loss scale {scale} → {to}"))?;
        }
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Restore the newest checkpoint (or the initial weights when there is none), lower the
    /// learning rate and keep the data position: the bad batches are not replayed.
    fn rollback(&mut self, obs: &mut dyn Observer, at: u64, reason: &str) -> Result<u64> {
        let rollbacks = self.state.rollbacks + 1;
        if rollbacks > self.cfg.guards.max_rollbacks {
            return Err(TrainError::Diverged {
                step: at,
                detail: format!(
                    "{reason}, and guards.max_rollbacks = {} rollbacks are used up",
                    self.cfg.guards.max_rollbacks
                ),
            });
        }
        let lr_factor = self.state.lr_factor * self.cfg.guards.rollback_lr_factor;
        let data = self.train.position();
        let tokens_seen = self.state.tokens_seen;
        let ck_root = self.run_dir.join(checkpoint::CHECKPOINTS);
        let be = &self.model.backend;
        let (to_step, from) = match checkpoint::latest(&ck_root)? {
            Some(dir) => {
                let mut l = load_checkpoint(self.par.as_deref(), &dir)?;
                let moments = match &self.par {
                    Some(p) => {
                        let r = rank_state(
                            p.as_ref(),
                            &self.cfg,
                            &self.model.cfg,
                            Some(&mut l),
                            self.window,
                            self.streamed,
                        )?;
                        self.upload_rank(&r.model, &r.master)?;
                        r.moments
                    }
                    None => {
                        self.upload(&std::mem::take(&mut l.params))?;
                        Some((std::mem::take(&mut l.m), std::mem::take(&mut l.v)))
                    }
                };
                let be = &self.model.backend;
                if let Some((m, v)) = moments {
                    self.opt.m = be.from_f32(&m, DType::F32)?;
                    self.opt.v = be.from_f32(&v, DType::F32)?;
                }
                self.opt.updates = l.state.updates;
                self.state = l.state;
                (self.state.step, dir.display().to_string())
            }
            None => {
                be.fill(self.opt.m.vm(), 0.0)?;
                be.fill(self.opt.v.vm(), 0.0)?;
                self.opt.updates = 0;
                match &self.par {
                    Some(p) => {
                        let r = rank_state(p.as_ref(), &self.cfg, &self.model.cfg, None, self.window, self.streamed)?;
                        self.upload_rank(&r.model, &r.master)?;
                    }
                    None => self.upload(&initial_params(&self.cfg, &self.model.cfg)?)?,
                }
                let scaler = self.state.scaler.as_ref().map(|_| LossScaler::new(&self.cfg.fp16));
                self.state = TrainerState::new(self.cfg.train.seed, scaler);
                (0, "the initial weights (no checkpoint yet)".to_string())
            }
        };
        self.state.lr_factor = lr_factor;
        self.state.rollbacks = rollbacks;
        self.state.data = data;
        self.state.tokens_seen = tokens_seen;
        self.state.guards.clear_trouble();
        self.last_saved = Some(to_step);
        let detail = format!(
            "{reason} at step {at}: rolled back to step {to_step} from {from}; learning rate × {lr_factor}; continuing on fresh data (rollback {rollbacks} of at most {})",
            self.cfg.guards.max_rollbacks
        );
        self.emit(obs, at, "rollback", detail)?;
        Ok(to_step)
    }

    /// A multi-rank run: replace the model's parameters (`model`: the slice, or its streamed
    /// buffer under ZeRO-3; see [`RankParams`]) and the master window.
    fn upload_rank(&mut self, model: &[f32], master: &[f32]) -> Result<()> {
        let OptModel { params, backend, .. } = &mut self.model;
        let dtype = params.dtype();
        *params = backend.from_f32(model, dtype)?;
        self.master = Some(backend.from_f32(master, DType::F32)?);
        if self.gathered.is_some() {
            self.refresh_streamed()?;
        }
        Ok(())
    }

    /// A streamed model after the master windows changed: ZeRO-3 gathers the non-layer
    /// parameters (the layers are gathered as they are used); ZeRO-2 gathers the whole slice
    /// and copies the non-layer parameters out of it.
    fn refresh_streamed(&mut self) -> Result<()> {
        let (Some(p), Some(m)) = (&self.par, &self.master) else { return Ok(()) };
        match self.gathered.as_mut() {
            Some(g) => {
                let be = &self.model.backend;
                let whole = p.gather(&be.to_f32(m.v())?, self.slice.total())?;
                *g = be.from_f32(&whole, g.dtype())?;
                zero3::copy_resident(&self.slice, g, &mut self.model)
            }
            None => zero3::gather_resident(p.as_ref(), &self.slice, self.window, m, &mut self.model),
        }
    }

    /// Replace the master weights (and the compute copy) with host f32 values (one process).
    fn upload(&mut self, host: &[f32]) -> Result<()> {
        let OptModel { params, backend, .. } = &mut self.model;
        let fresh = backend.from_f32(host, DType::F32)?;
        match self.master.as_mut() {
            Some(m) => {
                *m = fresh;
                backend.copy(params.vm(), m.v())?;
            }
            None => *params = fresh,
        }
        Ok(())
    }

    /// Mean token loss on the validation batches (no dropout). `None` without validation data.
    pub fn evaluate(&mut self) -> Result<Option<EvalReport>> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        let v = self.model.cfg.vocab_size;
        let (mut sum, mut count) = (0f64, 0usize);
        for b in &self.valid {
            let t = b.seq;
            let mut losses = self.model.backend.zeros(DType::F32, t)?;
            // One sequence at a time bounds the logits to T × V floats.
            for r in 0..b.rows {
                let targets = &b.targets[r * t..(r + 1) * t];
                let (ids, mask) = (&b.ids[r * t..(r + 1) * t], &b.mask[r * t..(r + 1) * t]);
                let all = opt_model::LogitsMode::All;
                let mut logits = match (&self.par, &self.master) {
                    (Some(p), Some(master)) if self.streamed => {
                        let mut z = Zero3Stream::new(p.as_ref(), &self.slice, self.window, master, None)
                            .with_local(self.gathered.as_ref());
                        let r = self.model.forward_streamed(ids, 1, Some(mask), None, all, &mut z);
                        z.finish(r)?
                    }
                    _ => self.model.forward(ids, 1, Some(mask), None, all)?,
                };
                let be = &self.model.backend;
                be.cross_entropy(logits.vm(), losses.vm(), targets, v, None)?;
                sum += be.to_f32(losses.v())?.iter().map(|&x| x as f64).sum::<f64>();
                count += targets.iter().filter(|&&x| x >= 0).count();
            }
        }
        let loss = sum / count.max(1) as f64;
        Ok(Some(EvalReport { step: self.state.step, loss, ppl: loss.exp(), tokens: count }))
    }

    /// Save a checkpoint of the current state; returns its folder.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let be = &self.model.backend;
        let master = self.master.as_ref().unwrap_or(&self.model.params);
        let (m, v) = (&self.opt.m, &self.opt.v);
        let mut fetch = |part: Part| -> Result<Vec<f32>> {
            let buf = match part {
                Part::Params => master,
                Part::ExpAvg => m,
                Part::ExpAvgSq => v,
            };
            Ok(be.to_f32(buf.v())?)
        };
        let mut snap = Snapshot {
            state: &self.state,
            model_cfg: &self.model.cfg,
            config_toml: &self.config_toml,
            fetch: &mut fetch,
        };
        let root = self.run_dir.join(checkpoint::CHECKPOINTS);
        let dir = match &self.par {
            None => checkpoint::save(&root, &mut snap, self.cfg.run.keep_last)?,
            Some(p) => {
                let info = p.info();
                let meta = checkpoint::ShardedMeta::new(info.tp, info.fsdp, info.dp, self.slice.total());
                let mut sync = |failed: bool| p.any(failed);
                let len = self.window.1 - self.window.0;
                checkpoint::save_sharded(&root, &mut snap, self.cfg.run.keep_last, &info, &meta, len, &mut sync)?
            }
        };
        self.last_saved = Some(self.state.step);
        Ok(dir)
    }

    fn log_step(&mut self, r: &StepReport) -> Result<()> {
        let (tokens, secs) = std::mem::take(&mut self.interval);
        let tps = if secs > 0.0 { tokens as f64 / secs } else { 0.0 };
        // tokens/s are the whole run's; the peak is one device's: divide by the processes.
        let devices = self.par.as_ref().map_or(1, |p| p.info().world) as f64;
        let mfu = tps * self.flops_per_token / (self.cfg.run.peak_gflops * 1e9 * devices);
        let mut row = json!({
            "kind": "train",
            "step": r.step,
            "loss": finite_or_null(r.loss),
            "lr": r.lr,
            "grad_norm": finite_or_null(r.grad_norm),
            "tokens_per_s": (tps * 10.0).round() / 10.0,
            "mfu": (mfu * 1e5).round() / 1e5,
            "tokens": self.state.tokens_seen,
            "elapsed_s": (self.started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        });
        if let Some(obj) = row.as_object_mut() {
            if let Some(mb) = logbook::peak_rss_mb() {
                obj.insert("peak_rss_mb".into(), json!(mb.round()));
            }
            if let Some(sc) = r.loss_scale {
                obj.insert("loss_scale".into(), json!(sc));
            }
        }
        if let Some(lb) = self.logbook.as_mut() {
            lb.write(&row)?;
        }
        self.curve.train.push((r.step, r.loss));
        Ok(())
    }

    fn log_eval(&mut self, e: &EvalReport, obs: &mut dyn Observer) -> Result<()> {
        if let Some(lb) = self.logbook.as_mut() {
            lb.write(&json!({
                "kind": "eval", "step": e.step, "valid_loss": e.loss, "valid_ppl": e.ppl, "valid_tokens": e.tokens,
            }))?;
        }
        self.curve.valid.push((e.step, e.loss));
        obs.eval(e);
        Ok(())
    }

    fn refresh_plot(&self) -> Result<()> {
        if self.logbook.is_none() {
            return Ok(());
        }
        let title = format!("{} — {}", self.run_dir.display(), self.cfg.data.train);
        write_atomic(&self.run_dir.join("loss.svg"), self.curve.svg(&title).as_bytes())
    }

    /// Continue the configured prompts with the current model (ZeRO-3: every layer is gathered
    /// for each forward of the sampler).
    pub fn samples(&mut self) -> Result<Vec<(String, String)>> {
        let sc = &self.cfg.sample;
        let mut out = Vec::with_capacity(sc.prompts.len());
        for (i, prompt) in sc.prompts.iter().enumerate() {
            let p = SampleParams {
                max_new_tokens: sc.max_new_tokens,
                temperature: sc.temperature,
                top_k: sc.top_k,
                seed: rng::derive(rng::derive(self.state.seed, SAMPLE_LABEL), i as u64),
            };
            let text = match (&self.par, &self.master) {
                (Some(par), Some(master)) if self.streamed => {
                    let (slice, window, local) = (&self.slice, self.window, self.gathered.as_ref());
                    sample::continue_text_with(&mut self.model, &self.tok, prompt, &p, |m, ids, cache| {
                        let mut z = Zero3Stream::new(par.as_ref(), slice, window, master, None).with_local(local);
                        let r = m.forward_streamed(ids, 1, None, Some(cache), opt_model::LogitsMode::Last, &mut z);
                        z.finish(r)
                    })?
                }
                _ => sample::continue_text(&self.model, &self.tok, prompt, &p)?,
            };
            out.push((prompt.clone(), text));
        }
        Ok(out)
    }

    /// Train to `train.max_steps`: log, evaluate, checkpoint and plot as configured; at the end
    /// evaluate, checkpoint and write sample continuations.
    pub fn run(&mut self, obs: &mut dyn Observer) -> Result<RunSummary> {
        let max = self.cfg.train.max_steps;
        let run = self.cfg.run.clone();
        let info = RunInfo {
            run_dir: self.run_dir.clone(),
            start_step: self.state.step,
            max_steps: max,
            params: ParamLayout::new(&self.model.cfg).total(),
            tokens_per_step: self.cfg.train.batch_size * self.cfg.data.seq_len,
            resumed_from: self.resumed_from.clone(),
            train_docs: self.train.corpus().len(),
            valid_batches: self.valid.len(),
        };
        obs.started(&info);
        let (start_name, start_detail) = match &self.resumed_from {
            Some(d) => ("resume", format!("resumed from {} at step {}", d.display(), self.state.step)),
            None => {
                let note = if self.resume_missing {
                    " (--resume: no checkpoint in the run folder, starting at step 0)"
                } else {
                    ""
                };
                ("start", format!("{} parameters, {} training documents{note}", info.params, info.train_docs))
            }
        };
        self.emit(obs, self.state.step, start_name, start_detail)?;
        for e in std::mem::take(&mut self.pending_events) {
            self.emit(obs, e.step, e.name, e.detail)?;
        }
        let mut summary = RunSummary {
            steps: 0,
            first_loss: None,
            last_loss: None,
            recent_loss: None,
            initial_valid: None,
            final_valid: None,
            samples: vec![],
            checkpoint: None,
            wall_s: 0.0,
        };
        if self.state.step == 0 {
            if let Some(e) = self.evaluate()? {
                self.log_eval(&e, obs)?;
                summary.initial_valid = Some(e);
            }
        }
        let mut recent = std::collections::VecDeque::with_capacity(25);
        while self.state.step < max {
            let r = self.step(obs)?;
            self.interval.0 += r.tokens;
            self.interval.1 += r.seconds;
            obs.step(&r);
            summary.steps += 1;
            if r.outcome == StepOutcome::Applied {
                summary.first_loss.get_or_insert(r.loss);
                summary.last_loss = Some(r.loss);
                if recent.len() == 25 {
                    recent.pop_front();
                }
                recent.push_back(r.loss);
            }
            let s = self.state.step;
            if r.outcome == StepOutcome::Applied && (s.is_multiple_of(run.log_every) || s == max) {
                self.log_step(&r)?;
                self.refresh_plot()?;
            }
            if run.eval_every > 0 && s.is_multiple_of(run.eval_every) && s < max {
                if let Some(e) = self.evaluate()? {
                    self.log_eval(&e, obs)?;
                }
            }
            if run.checkpoint_every > 0
                && s.is_multiple_of(run.checkpoint_every)
                && s < max
                && self.last_saved != Some(s)
            {
                let dir = self.save_checkpoint()?;
                self.emit(obs, s, "checkpoint", dir.display().to_string())?;
            }
        }
        if !recent.is_empty() {
            summary.recent_loss = Some(recent.iter().sum::<f64>() / recent.len() as f64);
        }
        let s = self.state.step;
        if let Some(e) = self.evaluate()? {
            self.log_eval(&e, obs)?;
            summary.final_valid = Some(e);
        }
        if self.last_saved != Some(s) {
            let dir = self.save_checkpoint()?;
            self.emit(obs, s, "checkpoint", dir.display().to_string())?;
        }
        summary.checkpoint = checkpoint::latest(&self.run_dir.join(checkpoint::CHECKPOINTS))?;
        self.refresh_plot()?;
        summary.samples = self.samples()?;
        let mut text = String::new();
        for (p, c) in &summary.samples {
            text.push_str(&format!("=== step {s}, prompt {p:?} ===\n{p}{c}\n\n"));
        }
        if self.logbook.is_some() {
            write_atomic(&self.run_dir.join("samples.txt"), text.as_bytes())?;
        }
        summary.wall_s = self.started.elapsed().as_secs_f64();
        self.emit(obs, s, "done", format!("{} steps in {:.1} s", summary.steps, summary.wall_s))?;
        Ok(summary)
    }
}

/// Check the run folder before use: a folder that already holds a run needs `resume` (or
/// `fresh`, which deletes its checkpoints, logbook, plot and samples first).
fn prepare_run_folder(run_dir: &Path, opts: StartOptions) -> Result<()> {
    std::fs::create_dir_all(run_dir).map_err(|e| TrainError::io(run_dir, e))?;
    let ck_root = run_dir.join(checkpoint::CHECKPOINTS);
    let logbook_path = run_dir.join("logbook.jsonl");
    if opts.fresh {
        for p in [run_dir.join("loss.svg"), run_dir.join("samples.txt"), logbook_path] {
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| TrainError::io(&p, e))?;
            }
        }
        if ck_root.exists() {
            std::fs::remove_dir_all(&ck_root).map_err(|e| TrainError::io(&ck_root, e))?;
        }
        return Ok(());
    }
    let existing = checkpoint::list(&ck_root)?;
    if !opts.resume && (!existing.is_empty() || logbook_path.exists()) {
        return Err(TrainError::Checkpoint {
            path: run_dir.to_path_buf(),
            detail: format!(
                "this run folder already holds a run ({} checkpoints); pass --resume to continue it, \
                 --fresh to start over, or choose another folder with --set run.dir=...",
                existing.len()
            ),
        });
    }
    Ok(())
}

/// The fixed validation set: at most `run.eval_batches` micro-batches from the first,
/// unshuffled pass over `data.valid` (or the metaseq folder's valid/ split). Also returns a
/// note about skipped malformed rows.
fn validation_batches(
    cfg: &TrainConfig,
    tok: Arc<OptTokenizer>,
    vocab: usize,
    eos: u32,
    pad: u32,
) -> Result<(Vec<Batch>, Option<String>)> {
    let spec =
        if cfg.data.valid.is_empty() { data::default_valid(&cfg.data.train) } else { Some(cfg.data.valid.clone()) };
    let Some(spec) = spec else { return Ok((vec![], None)) };
    if cfg.run.eval_batches == 0 {
        return Ok((vec![], None));
    }
    let vc = Corpus::open(&spec, vocab, cfg.data.on_bad_row)?;
    let note = (!vc.skipped.is_empty())
        .then(|| format!("valid: {} malformed rows skipped: {}", vc.skipped.len(), vc.skipped.join("; ")));
    let mut vl = Loader::new(vc, tok, cfg.data.seq_len, cfg.data.packing, false, 0, eos, pad);
    let mut valid = Vec::new();
    for _ in 0..cfg.run.eval_batches {
        valid.push(vl.next_batch(cfg.micro_batch())?);
        if vl.position().epoch > 0 {
            break;
        }
    }
    Ok((valid, note))
}

/// The model config a run starts from: `init_from`'s config.json, or the preset.
fn base_model_config(cfg: &TrainConfig) -> Result<OptConfig> {
    if cfg.model.init_from.is_empty() {
        OptConfig::preset(&cfg.model.preset)
            .map_err(|e| TrainError::Config { key: "model.preset".into(), detail: e.to_string() })
    } else {
        Ok(OptConfig::from_path(Path::new(&cfg.model.init_from))?)
    }
}

/// Initial f32 weights: `init_from`'s, or metaseq's random init from the seed.
fn initial_params(cfg: &TrainConfig, model_cfg: &OptConfig) -> Result<Vec<f32>> {
    if cfg.model.init_from.is_empty() {
        let layout = ParamLayout::new(model_cfg);
        let mut host = vec![0f32; layout.total()];
        opt_model::init::metaseq_init(model_cfg, &layout, &mut host, cfg.model.init_std, cfg.train.seed);
        Ok(host)
    } else {
        let m = OptModel::from_folder(CpuBackend::new(), Path::new(&cfg.model.init_from), DType::F32)?;
        Ok(m.params_f32()?)
    }
}

fn compute_dtype(p: Precision) -> DType {
    match p {
        Precision::F32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Fp16 => DType::F16,
    }
}

fn finite_or_null(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!(x)
    } else {
        serde_json::Value::Null
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(opt_model::io::write_atomic(path, bytes)?)
}

/// A `[parallel]` layout needs as many ranks as it names; a single process needs none.
fn check_world(cfg: &TrainConfig, info: Option<&RankInfo>) -> Result<()> {
    let p = &cfg.parallel;
    let world = info.map_or(1, |i| i.world);
    if p.world() == world {
        return Ok(());
    }
    let key = if p.tp > 1 {
        "parallel.tp"
    } else if p.fsdp > 1 {
        "parallel.fsdp"
    } else {
        "parallel.dp"
    };
    let how = if world == 1 {
        format!("; launch {} processes (mpirun -np {} or torchrun), or set it to 1", p.world(), p.world())
    } else {
        String::new()
    };
    Err(TrainError::Config {
        key: key.into(),
        detail: format!(
            "tp × fsdp × dp = {} × {} × {} = {}, but {world} {} launched{how}",
            p.tp,
            p.fsdp,
            p.dp,
            p.world(),
            if world == 1 { "process was" } else { "processes were" }
        ),
    })
}

/// Every rank learns whether any rank failed `r` (a collective): a rank whose own part went
/// well but another's failed stops too, instead of waiting for it.
fn agree<B: Backend>(par: Option<&dyn Parallel<B>>, r: Result<()>, dir: &Path) -> Result<()> {
    let Some(p) = par else { return r };
    let failed = p.any(r.is_err())?;
    r?;
    if failed {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            detail: "rank 0 could not prepare the run folder".into(),
        });
    }
    Ok(())
}

/// Read a checkpoint folder as this run can use it: a one-process checkpoint whole; a sharded
/// one (multi-rank runs only) as this rank's window.
fn load_checkpoint<B: Backend>(par: Option<&dyn Parallel<B>>, dir: &Path) -> Result<checkpoint::Loaded> {
    match (par, checkpoint::sharded_meta(dir)?) {
        (Some(p), Some(_)) => {
            let model_cfg = OptConfig::from_path(dir)?;
            let n = p.layout(&model_cfg).total();
            checkpoint::load_shard(dir, &p.info(), n, p.window(n))
        }
        _ => checkpoint::load(dir),
    }
}

/// AdamW's first and second moments, host copies.
type Moments = (Vec<f32>, Vec<f32>);

/// A multi-rank run's starting parameters on this rank.
struct RankParams {
    /// The model's buffer: the whole tensor-parallel slice, or under ZeRO-3 its streamed form
    /// (non-layer parameters, empty layer slot).
    model: Vec<f32>,
    /// This rank's window of the slice: its f32 master weights.
    master: Vec<f32>,
    /// From a checkpoint: the window of the AdamW moments.
    moments: Option<Moments>,
}

/// A multi-rank run's starting point. From a sharded checkpoint the rank reads its own window
/// and gathers the rest of what its model holds from the other fsdp ranks (a collective): the
/// whole slice, or with a streamed model (`streamed`) only the non-layer parameters. A random
/// start draws only those parts. From a one-process checkpoint or `init_from` the slice is cut
/// from the whole model.
fn rank_state<B: Backend>(
    p: &dyn Parallel<B>,
    cfg: &TrainConfig,
    model_cfg: &OptConfig,
    loaded: Option<&mut checkpoint::Loaded>,
    (lo, hi): (usize, usize),
    streamed: bool,
) -> Result<RankParams> {
    let layout = p.layout(model_cfg);
    let n = layout.total();
    // Without tensor parallelism the slice is the whole model: no copy.
    let slice_of = |full: Vec<f32>| -> Result<Vec<f32>> {
        if p.info().tp == 1 {
            Ok(full)
        } else {
            p.slice_flat(model_cfg, &full)
        }
    };
    let (whole, moments) = match loaded {
        Some(l) if l.windowed => {
            let master = std::mem::take(&mut l.params);
            let moments = Some((std::mem::take(&mut l.m), std::mem::take(&mut l.v)));
            let model = if streamed {
                let mut out = vec![0f32; layout.streamed().total()];
                for (a, b, at) in layout.resident_ranges() {
                    let (x, y) = (a.max(lo), b.min(hi));
                    let mine = if x < y { &master[x - lo..y - lo] } else { &[][..] };
                    out[at..at + b - a].copy_from_slice(&p.gather_range(mine, n, (a, b))?);
                }
                out
            } else {
                p.gather(&master, n)?
            };
            return Ok(RankParams { model, master, moments });
        }
        Some(l) => {
            let whole = slice_of(std::mem::take(&mut l.params))?;
            let m = slice_of(std::mem::take(&mut l.m))?[lo..hi].to_vec();
            let v = slice_of(std::mem::take(&mut l.v))?[lo..hi].to_vec();
            (whole, Some((m, v)))
        }
        None if cfg.model.init_from.is_empty() => {
            // A random start: this rank draws only its window and what its model holds (the
            // same values as the whole model's initialisation), never the whole model.
            let info = p.info();
            let init = |r: (usize, usize)| {
                opt_model::init::metaseq_init_range(
                    model_cfg,
                    info.tp,
                    info.tp_rank,
                    r,
                    cfg.model.init_std,
                    cfg.train.seed,
                )
            };
            let master = init((lo, hi));
            let model = if streamed {
                let mut out = vec![0f32; layout.streamed().total()];
                for (a, b, at) in layout.resident_ranges() {
                    out[at..at + b - a].copy_from_slice(&init((a, b)));
                }
                out
            } else {
                init((0, n))
            };
            return Ok(RankParams { model, master, moments: None });
        }
        None => (slice_of(initial_params(cfg, model_cfg)?)?, None),
    };
    let master = whole[lo..hi].to_vec();
    let model = if streamed { layout.streamed_host(&whole) } else { whole };
    Ok(RankParams { model, master, moments })
}
