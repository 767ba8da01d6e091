//! `opt-rs`: the command line. It only parses arguments and wires the library crates together.

mod bench;
mod score;

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "opt-rs", version, about = "OPT language models in Rust: score, tokenize, benchmark")]
struct Cli {
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
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting up the thread pool")?;
    }
    match cli.cmd {
        Cmd::Score(a) => score::run(a),
        Cmd::Tokenize(a) => tokenize(a),
        Cmd::Bench(a) => bench::run(a),
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
