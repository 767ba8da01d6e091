//! `opt-rs`: the command line. It only parses arguments and wires the library crates together.

mod bench;
mod checkpoint;
mod convert;
mod device;
mod dist;
mod eval;
mod generate;
mod load;
mod quantize;
mod score;
mod serve;
mod tp_infer;
mod train;

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "opt-rs", version, about = "OPT language models in Rust: score, tokenize, benchmark")]
struct Cli {
    /// Where to run: cpu, or cuda[:N] in a build with `--features cuda` (score, bench, train, generate and serve so far).
    #[arg(long, global = true, default_value = "cpu", value_parser = clap::value_parser!(device::Device))]
    device: device::Device,
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Log-probability of every token given the ones before it, and the perplexity.
    Score(score::ScoreArgs),
    /// Tokenize JSON strings read one per line from stdin; print one JSON array of ids per line.
    Tokenize(TokenizeArgs),
    /// Time prefill and decode on random weights of a preset (CPU).
    Bench(bench::BenchArgs),
    /// Zero-shot tasks (lambada, hellaswag, piqa, arc_easy, jsonl files) and wikitext perplexity,
    /// scored as lm-evaluation-harness does.
    Eval(eval::EvalArgs),
    /// Generate text: greedy, sampling, penalties, beam search, stop strings, log-probs;
    /// streamed to the terminal or one JSON object per prompt.
    Generate(generate::GenerateArgs),
    /// Train or fine-tune with the metaseq recipe (no arguments: a tiny OPT on the bundled
    /// Shakespeare, a few minutes on 2 cores). --print-config documents every key.
    Train(train::TrainArgs),
    /// Data tools: `data prepare` pre-tokenizes corpora into a memory-mapped token file.
    Data(train::DataArgs),
    /// Write a training run's checkpoint as a Hugging Face model folder.
    Export(train::ExportArgs),
    /// Convert a metaseq checkpoint (restored.pt, reshard-model_part-N.pt, FSDP shards) into a
    /// Hugging Face model folder, streamed tensor by tensor.
    Convert(convert::ConvertArgs),
    /// Serve an OpenAI/metaseq-compatible completions API (continuous batching, streaming,
    /// /metrics) and a browser playground at /.
    Serve(serve::ServeArgs),
    /// Checkpoint tools: `checkpoint reshard` rewrites a training checkpoint (params and
    /// optimizer state) or a tensor-parallel model folder at another --tp / --fsdp layout.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Write a weight-only int8 copy of a model folder (per-channel or group-wise absmax scales),
    /// which score, generate, serve and eval load like any other folder.
    Quantize(quantize::QuantizeArgs),
    /// Distributed tools: the step-time model table (`dist model`) and `dist reshard` (the same
    /// as `checkpoint reshard`).
    Dist(dist::DistArgs),
}

#[derive(clap::Args)]
struct TokenizeArgs {
    /// Folder with vocab.json + merges.txt (or tokenizer.json); default: the bundled OPT tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Do not prepend `</s>` (OPT's BOS).
    #[arg(long)]
    no_bos: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, skipping a cause whose text the message already holds
/// (library errors quote their I/O cause, e.g. "path: No such file or directory").
fn describe(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting up the thread pool")?;
    }
    match cli.cmd {
        Cmd::Score(a) => device::run_on(cli.device, score::ScoreJob(a)),
        Cmd::Tokenize(a) => tokenize(a),
        Cmd::Bench(a) => device::run_on(cli.device, bench::BenchJob(a)),
        Cmd::Train(a) => device::run_on(cli.device, train::TrainJob(a)),
        Cmd::Generate(a) => device::run_on(cli.device, generate::GenerateJob(a)),
        Cmd::Serve(a) => device::run_on(cli.device, serve::ServeJob(a)),
        _ if cli.device != device::Device::Cpu => {
            anyhow::bail!(
                "--device {}: this command runs on the CPU only so far (score, bench, train, generate and serve take --device)",
                cli.device
            )
        }
        Cmd::Eval(a) => eval::run(a),
        Cmd::Data(a) => train::run_data(a),
        Cmd::Export(a) => train::run_export(a),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Checkpoint(a) => checkpoint::run(a),
        Cmd::Quantize(a) => quantize::run(a),
        Cmd::Dist(a) => dist::run(a),
    }
}

fn load_tokenizer(dir: Option<&std::path::Path>) -> Result<opt_tokenizer::OptTokenizer> {
    Ok(match dir {
        Some(d) => opt_tokenizer::OptTokenizer::from_dir(d)?,
        None => opt_tokenizer::OptTokenizer::bundled()?,
    })
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = load_tokenizer(a.tokenizer.as_deref())?;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for (i, line) in stdin.lock().lines().enumerate() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let text: String =
            serde_json::from_str(&line).with_context(|| format!("stdin line {}: expected a JSON string", i + 1))?;
        let ids = tok.encode(&text, !a.no_bos)?;
        writeln!(out, "{}", serde_json::to_string(&ids)?)?;
    }
    Ok(())
}
