//! `opt-rs train`, `opt-rs data prepare` and `opt-rs export`: argument parsing, the progress
//! bar and the end-of-run report. The work is in the `opt-train` crate.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use opt_dist::launch::Launch;
use opt_dist::train::MeshParallel;
use opt_dist::{Mesh, ParallelPlan};
use opt_tensor::{Backend, DType};
use opt_train::config::BadRowPolicy;
use opt_train::trainer::{EvalReport, Event, Observer, RunInfo, StartOptions, StepOutcome, StepReport};
use opt_train::{TrainConfig, Trainer};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Run configuration (TOML). Keys it leaves out keep their defaults (see --print-config).
    /// With --resume and no --config, the run folder's saved config.toml is used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one key, e.g. --set train.max_steps=12 --set run.dir=runs/x (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in run.dir from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Delete run.dir's checkpoints and logbook and start over.
    #[arg(long, conflicts_with = "resume")]
    fresh: bool,
    /// Print the documented default configuration and exit.
    #[arg(long)]
    print_config: bool,
}

/// `opt-rs train` on the backend `--device` names.
pub struct TrainJob(pub TrainArgs);

impl crate::device::Job for TrainJob {
    type Output = ();
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        run_with(self.0, backend)
    }
}

fn run_with<B: Backend + 'static>(a: TrainArgs, backend: B) -> Result<()> {
    if a.print_config {
        print!("{}", opt_train::DEFAULT_TOML);
        return Ok(());
    }
    let mut cfg = TrainConfig::load(a.config.as_deref(), &a.sets)?;
    if a.resume && a.config.is_none() {
        // Resume with the configuration the run was started with (plus this call's --set).
        let saved = cfg.run_dir().join("config.toml");
        if saved.is_file() {
            cfg = TrainConfig::load(Some(&saved), &a.sets)?;
        }
    }
    let opts = StartOptions { resume: a.resume, fresh: a.fresh };
    let setup = Instant::now();
    // A multi-process launch (mpirun, torchrun, srun) trains sharded by `[parallel]`: each rank
    // drives the same trainer with opt-dist's collectives plugged in (see opt_dist::train).
    let launch = Launch::detect(&|k| std::env::var(k).ok()).context("reading the launch environment")?;
    let par: Option<Box<dyn opt_train::parallel::Parallel<B>>> = match &launch {
        Launch::Single => None,
        _ => {
            let world = launch.connect(Duration::from_secs(300)).context("connecting the ranks")?;
            let p = &cfg.parallel;
            let mesh = Mesh::new(world, ParallelPlan { tp: p.tp, fsdp: p.fsdp, dp: p.dp })?;
            Some(Box::new(MeshParallel::new(mesh)))
        }
    };
    let out = train_ranks(cfg, backend, opts, par, setup);
    // A failed rank exits without MPI_Finalize (which could wait for peers still in a
    // collective); mpirun then ends the job.
    #[cfg(feature = "mpi")]
    if out.is_ok() && matches!(launch, Launch::Mpi { .. }) {
        opt_dist::mpi::MpiComm::finalize().context("MPI_Finalize")?;
    }
    out
}

fn train_ranks<B: Backend>(
    cfg: TrainConfig,
    backend: B,
    opts: StartOptions,
    par: Option<Box<dyn opt_train::parallel::Parallel<B>>>,
    setup: Instant,
) -> Result<()> {
    let mut trainer = Trainer::new_parallel(cfg, backend, opts, par)?;
    if trainer.rank_info().is_some_and(|i| !i.is_main()) {
        // Other ranks train silently; rank 0 reports.
        trainer.run(&mut ())?;
        return Ok(());
    }
    if let Some(i) = trainer.rank_info() {
        eprintln!("opt-rs train: {} ranks, parallel tp = {} × fsdp = {} × dp = {}", i.world, i.tp, i.fsdp, i.dp);
    }
    let mut bar = Bar::new(trainer.config().run.log_every);
    let setup_s = setup.elapsed().as_secs_f64();
    let summary = trainer.run(&mut bar)?;
    bar.finish();

    let run_dir = trainer.run_dir().display().to_string();
    println!("run folder        {run_dir} (setup {setup_s:.1} s, training {:.1} s)", summary.wall_s);
    if let (Some(a), Some(b)) = (summary.first_loss, summary.recent_loss) {
        println!("train loss        {a:.4} (first step) → {b:.4} (mean of the last 25 steps)");
    }
    match (&summary.initial_valid, &summary.final_valid) {
        (Some(a), Some(b)) => println!(
            "valid loss        {:.4} (ppl {:.1}) at step {} → {:.4} (ppl {:.1}) at step {}",
            a.loss, a.ppl, a.step, b.loss, b.ppl, b.step
        ),
        (None, Some(b)) => println!("valid loss        {:.4} (ppl {:.1}) at step {}", b.loss, b.ppl, b.step),
        _ => {}
    }
    if let Some(c) = &summary.checkpoint {
        println!("checkpoint        {}", c.display());
    }
    println!("logbook, plot     {run_dir}/logbook.jsonl, {run_dir}/loss.svg");
    println!("samples           {run_dir}/samples.txt");
    for (p, c) in &summary.samples {
        println!("\n--- {p:?}\n{p}{c}");
    }
    Ok(())
}

/// Progress on the terminal: an indicatif bar (step, loss, tokens/s, ETA) when stderr is a
/// terminal, otherwise a plain line now and then (logs, CI).
struct Bar {
    pb: Option<ProgressBar>,
    every: u64,
    ewma: Option<f64>,
    tps: Option<f64>,
}

impl Bar {
    fn new(log_every: u64) -> Self {
        Bar { pb: None, every: log_every.max(1), ewma: None, tps: None }
    }

    fn line(&self, text: &str) {
        match &self.pb {
            Some(pb) if !pb.is_hidden() => pb.suspend(|| eprintln!("{text}")),
            _ => eprintln!("{text}"),
        }
    }

    fn finish(&self) {
        if let Some(pb) = &self.pb {
            pb.finish();
        }
    }
}

impl Observer for Bar {
    fn started(&mut self, info: &RunInfo) {
        let pb = ProgressBar::with_draw_target(Some(info.max_steps), ProgressDrawTarget::stderr_with_hz(4));
        pb.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:28.cyan/blue}] step {pos}/{len} {msg} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_position(info.start_step);
        pb.reset_eta();
        let what = match &info.resumed_from {
            Some(d) => format!("resuming from {}", d.display()),
            None => "starting".to_string(),
        };
        self.pb = Some(pb);
        self.line(&format!(
            "opt-rs train: {what}; {} parameters, {} tokens/step, {} training documents, {} validation batches → {}",
            info.params,
            info.tokens_per_step,
            info.train_docs,
            info.valid_batches,
            info.run_dir.display()
        ));
        // Non-terminal output gets about 20 progress lines per run.
        if self.pb.as_ref().is_some_and(|p| p.is_hidden()) {
            self.every = (info.max_steps.saturating_sub(info.start_step) / 20).max(self.every);
        }
    }

    fn step(&mut self, r: &StepReport) {
        if r.outcome == StepOutcome::Applied && r.loss.is_finite() {
            self.ewma = Some(self.ewma.map_or(r.loss, |e| 0.9 * e + 0.1 * r.loss));
        }
        if r.seconds > 0.0 {
            let t = r.tokens as f64 / r.seconds;
            self.tps = Some(self.tps.map_or(t, |e| 0.8 * e + 0.2 * t));
        }
        let msg = format!("loss {:.3} | {:.0} tok/s", self.ewma.unwrap_or(f64::NAN), self.tps.unwrap_or(0.0));
        if let Some(pb) = &self.pb {
            if let StepOutcome::RolledBack { to_step } = r.outcome {
                pb.set_position(to_step);
            } else {
                pb.set_position(r.step);
            }
            pb.set_message(msg.clone());
            if pb.is_hidden() && r.step.is_multiple_of(self.every) {
                eprintln!("step {} {msg} lr {:.2e}", r.step, r.lr);
            }
        }
    }

    fn eval(&mut self, r: &EvalReport) {
        self.line(&format!("step {}: valid loss {:.4} (ppl {:.1}, {} tokens)", r.step, r.loss, r.ppl, r.tokens));
    }

    fn event(&mut self, e: &Event) {
        if !matches!(e.name, "start" | "done") {
            self.line(&format!("step {}: {}: {}", e.step, e.name, e.detail));
        }
    }
}

#[derive(clap::Args)]
pub struct DataArgs {
    #[command(subcommand)]
    cmd: DataCmd,
}

#[derive(clap::Subcommand)]
enum DataCmd {
    /// Pre-tokenize corpora into one memory-mapped token file (.tok) for `data.train`.
    Prepare(PrepareArgs),
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// Input corpora: .jsonl files, metaseq folders, .txt files or builtin:shakespeare/{train,valid}.
    #[arg(required = true)]
    inputs: Vec<String>,
    /// Output token file (conventionally .tok).
    #[arg(long)]
    out: PathBuf,
    /// Malformed jsonl lines: fail (report file:line and stop) or skip (report and continue).
    #[arg(long, default_value = "fail", value_parser = ["fail", "skip"])]
    on_bad_row: String,
    /// Tokenizer folder (default: the bundled OPT tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Vocabulary size ids must stay below (OPT: 50272).
    #[arg(long, default_value_t = opt_tokenizer::EMBEDDING_ROWS)]
    vocab_size: usize,
}

pub fn run_data(a: DataArgs) -> Result<()> {
    match a.cmd {
        DataCmd::Prepare(p) => {
            let tok = crate::load_tokenizer(p.tokenizer.as_deref())?;
            let policy = if p.on_bad_row == "skip" { BadRowPolicy::Skip } else { BadRowPolicy::Fail };
            let t = Instant::now();
            let stats = opt_train::data::prepare(&p.inputs, &p.out, &tok, p.vocab_size, policy)?;
            for s in &stats.skipped {
                eprintln!("skipped {s}");
            }
            println!(
                "{}: {} documents, {} tokens ({} malformed rows skipped) in {:.1} s",
                p.out.display(),
                stats.documents,
                stats.tokens,
                stats.skipped.len(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Run folder (run.dir of the training run).
    #[arg(long)]
    run: PathBuf,
    /// Output HF model folder.
    #[arg(long)]
    out: PathBuf,
    /// Checkpoint step (default: the newest).
    #[arg(long)]
    step: Option<u64>,
    /// Weight dtype to write: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run_export(a: ExportArgs) -> Result<()> {
    let dtype: DType = a.dtype.parse().map_err(anyhow::Error::msg).context("--dtype")?;
    // A multi-rank run's checkpoint is consolidated from its shards, one tensor at a time.
    let load = |dir: &Path, dtype: DType| -> opt_train::Result<opt_model::OptModel<opt_tensor::CpuBackend>> {
        match opt_train::checkpoint::sharded_meta(dir)? {
            Some(_) => {
                let (cfg, params) = opt_dist::train::consolidated_params(dir).map_err(|e| {
                    opt_train::TrainError::Checkpoint { path: dir.to_path_buf(), detail: e.to_string() }
                })?;
                Ok(opt_model::OptModel::from_params(opt_tensor::CpuBackend::new(), cfg, &params, dtype)?)
            }
            None => Ok(opt_model::OptModel::from_folder(opt_tensor::CpuBackend::new(), dir, dtype)?),
        }
    };
    let from = opt_train::export::export_run_with(&a.run, a.step, &a.out, dtype, &load)?;
    println!("exported {} → {} ({dtype})", display(&from), display(&a.out));
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
