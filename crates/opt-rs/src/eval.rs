//! `opt-rs eval`: zero-shot tasks and perplexity, scored as lm-evaluation-harness scores them
//! (the rules live in the `opt-eval` crate; this file parses arguments, draws progress and
//! prints results).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use opt_eval::metrics::Items;
use opt_eval::{evaluate, load_task, EvalOptions, ScoreOptions, Task, TaskResult};
use opt_model::{OptConfig, OptModel};
use opt_tensor::{CpuBackend, DType};
use serde_json::Value;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// HF model folder (config.json + weights; int8 folders of `opt-rs quantize` too), or a
    /// metaseq checkpoint (a .pt file or a folder of them; give --config or --preset).
    #[arg(long, required_unless_present = "random_preset", conflicts_with = "random_preset")]
    model: Option<PathBuf>,
    #[command(flatten)]
    metaseq: crate::load::MetaseqArgs,
    /// For benchmarking only: random weights in the shape of a preset (125m, 350m, ...) instead
    /// of --model. The scores are meaningless; the timings are what it is for.
    #[arg(long)]
    random_preset: Option<String>,
    /// A built-in task (lambada, hellaswag, piqa, arc_easy, wikitext) or an llm-foundry .jsonl
    /// file (multiple_choice or schema, detected from its keys). Repeat for several tasks.
    #[arg(long = "task", required = true)]
    tasks: Vec<String>,
    /// Score only the first N items of each task (for wikitext: the first N rows of text).
    #[arg(long)]
    limit: Option<usize>,
    /// (context, continuation) rows per forward (sliding windows per forward for wikitext).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Run every request as its own full sequence instead of running each shared context once
    /// (the harness's layout; with --batch-size 1 this is "one at a time").
    #[arg(long)]
    no_context_reuse: bool,
    /// Sliding-window stride for wikitext (default: half the model's context).
    #[arg(long)]
    stride: Option<usize>,
    /// Folder with the built-in tasks' data (default: ../shared/data/eval beside the repository).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print JSON (one object per task; a list for several tasks) instead of a table.
    #[arg(long)]
    json: bool,
    /// Include every item's log-likelihoods and predictions.
    #[arg(long)]
    per_item: bool,
    /// Weight dtype on load (compute is f32 on CPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Tokenizer folder (default: the model folder if it has one, else the bundled OPT tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Quantize the layer matrices to int8 after loading (as `opt-rs quantize` would), to
    /// measure the drift without writing a folder. A quantized folder needs no flag.
    #[arg(long)]
    int8: bool,
    #[command(flatten)]
    quant: crate::quantize::QuantOpts,
}

/// `--data-dir`, else `shared/data/eval` next to this checkout (found from the source path the
/// binary was built from, then from the working directory).
fn default_data_dir() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    [repo.join("../shared/data/eval"), PathBuf::from("../shared/data/eval")].into_iter().find(|p| p.is_dir())
}

pub fn run(a: EvalArgs) -> Result<()> {
    let dtype: DType = a.dtype.parse().map_err(anyhow::Error::msg).context("--dtype")?;
    let data_dir = a.data_dir.clone().or_else(default_data_dir);
    // Load every task first, so a bad file fails before the model is loaded and run.
    let tasks: Vec<Task> = a
        .tasks
        .iter()
        .map(|t| {
            if data_dir.is_none() && opt_eval::tasks::builtin_name(t).is_some() {
                anyhow::bail!(
                    "task '{t}' reads its data from a folder: pass --data-dir DIR \
                     (the default, ../shared/data/eval beside the repository, was not found)"
                );
            }
            // The library's errors name the task or file (with line) themselves.
            Ok(load_task(t, data_dir.as_deref(), a.limit)?)
        })
        .collect::<Result<_>>()?;

    let (model, tok) = match (&a.model, &a.random_preset) {
        (Some(dir), _) => {
            let m = crate::load::load_model(CpuBackend::new(), dir, dtype, &a.metaseq)?;
            (m, crate::score::tokenizer_for(dir, a.tokenizer.as_deref())?)
        }
        (None, Some(preset)) => {
            let cfg = OptConfig::preset(preset)?;
            let std = cfg.init_std;
            eprintln!("note: random weights in the shape of {preset} (--random-preset is for benchmarking; scores are meaningless)");
            (
                OptModel::new_random(CpuBackend::new(), cfg, dtype, std, 0)?,
                crate::load_tokenizer(a.tokenizer.as_deref())?,
            )
        }
        (None, None) => anyhow::bail!("give --model DIR (or --random-preset for benchmarking)"),
    };
    let model = if a.int8 { model.quantize(a.quant.config()?).context("quantizing")? } else { model };

    let opts = EvalOptions {
        score: ScoreOptions { batch_size: a.batch_size, reuse_context: !a.no_context_reuse },
        stride: a.stride,
    };
    let mut results = Vec::with_capacity(tasks.len());
    for task in &tasks {
        let bar = ProgressBar::new(0);
        let style = ProgressStyle::with_template("{prefix:>12} [{bar:32}] {pos}/{len} {msg} ({elapsed}, eta {eta})")?
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(task.name.clone());
        bar.set_message(if matches!(task.data, opt_eval::TaskData::Rolling { .. }) { "windows" } else { "requests" });
        let start = Instant::now();
        let res = evaluate(&model, &tok, task, &opts, &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
        .with_context(|| format!("evaluating {} ({})", task.name, task.origin))?;
        bar.finish_and_clear();
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{}: {} items in {:.2} s ({:.2} items/s; batch size {}, context reuse {})",
            task.name,
            res.n,
            secs,
            res.n as f64 / secs,
            a.batch_size,
            if a.no_context_reuse { "off" } else { "on" }
        );
        results.push(res);
    }

    if a.json {
        let mut objs: Vec<Value> = results.iter().map(|r| r.to_json(a.per_item)).collect();
        let out = if objs.len() == 1 { objs.remove(0) } else { Value::Array(objs) };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&results);
        if a.per_item {
            for r in &results {
                print_items(r);
            }
        }
    }
    Ok(())
}

fn print_table(results: &[TaskResult]) {
    println!("{:<16} {:<18} {:>14} {:>10} {:>8}", "task", "metric", "value", "stderr", "n");
    for r in results {
        for m in &r.metrics {
            let stderr = m.stderr.map_or("-".to_string(), |s| format!("{s:.4}"));
            println!("{:<16} {:<18} {:>14.4} {:>10} {:>8}", r.task, m.name, m.value, stderr, r.n);
        }
    }
}

fn print_items(r: &TaskResult) {
    println!("\n{}:", r.task);
    match &r.items {
        Items::Choice(items) => {
            for (k, it) in items.iter().enumerate() {
                let lls: Vec<String> = it.loglikelihoods.iter().map(|x| format!("{x:.4}")).collect();
                println!(
                    "{k:>6}  gold {}  pred {}  pred_norm {}  loglikelihoods [{}]",
                    it.gold,
                    it.pred,
                    it.pred_norm,
                    lls.join(", ")
                );
            }
        }
        Items::LastWord(items) => {
            for (k, it) in items.iter().enumerate() {
                println!(
                    "{k:>6}  {:<24} loglikelihood {:>10.4}  tokens {}  greedy {}",
                    format!("{:?}", it.target),
                    it.loglikelihood,
                    it.tokens,
                    it.is_greedy
                );
            }
        }
        Items::Rolling(windows) => {
            for w in windows {
                println!(
                    "{:>8}..{:<8} scored {:>6}..  {:>5} tokens  nll {:.4}",
                    w.begin, w.end, w.first_target, w.n, w.nll
                );
            }
        }
    }
}
