//! `opt-rs serve`: the OpenAI/metaseq-compatible completions server (crate `opt-serve`) on a
//! model folder. This file only parses arguments, loads the model and tokenizer, and starts the
//! server; everything else lives in the library.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use opt_model::{OptConfig, OptModel};
use opt_serve::{EngineOptions, Server, ServerOptions};
use opt_tensor::{Backend, DType};

use crate::tp_infer::TpGroup;

/// Environment variable read for the API key when `--api-key` is not given (keeps the key out
/// of the process list).
const API_KEY_ENV: &str = "OPT_RS_API_KEY";

#[derive(clap::Args)]
pub struct ServeArgs {
    /// HF model folder (config.json + weights; int8 folders of `opt-rs quantize` too), or a
    /// metaseq checkpoint (a .pt file or a folder of them; give --config or --preset).
    #[arg(long, required_unless_present = "random_preset")]
    model: Option<PathBuf>,
    #[command(flatten)]
    metaseq: crate::load::MetaseqArgs,
    /// Benchmarks: random weights of a preset (tiny, 125m, ...) with the bundled tokenizer
    /// instead of --model.
    #[arg(long, conflicts_with = "model")]
    random_preset: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// TCP port (0 = any free port; the chosen address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on the API routes (default: $OPT_RS_API_KEY if set).
    #[arg(long)]
    api_key: Option<String>,
    /// The model id clients use (default: the model folder's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Weight dtype on load (compute is f32 on CPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Tokenizer folder (default: the model folder if it has one, else the bundled OPT tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// KV-cache memory for running sequences, MiB; requests wait for room (admission control).
    #[arg(long, default_value_t = 2048)]
    kv_cache_mib: usize,
    /// Requests that may wait for the batch; more are answered 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Sequences decoded together at most (continuous batch size). Up to 64 the CPU decode step
    /// stays on its batch-invariant kernel, so a request's output never depends on the batch;
    /// above 64 it may differ in the last bits.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Tensor parallelism: split the model over the N processes of an `mpirun -np N` (or
    /// torchrun-style) launch, each loading only its slice; rank 0 serves HTTP.
    #[arg(long, default_value_t = 1)]
    tp: usize,
}

/// `opt-rs serve` on the backend `--device` names.
pub struct ServeJob(pub ServeArgs);

impl crate::device::Job for ServeJob {
    type Output = ();
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        run_with(self.0, backend)
    }
}

fn run_with<B: Backend + 'static>(a: ServeArgs, backend: B) -> Result<()> {
    let dtype: DType = a.dtype.parse().map_err(anyhow::Error::msg).context("--dtype")?;
    if a.tp > 1 && backend.name() != "cpu" {
        bail!("--tp {} runs tensor-parallel shards on the CPU backend so far; drop --device {}", a.tp, backend.name());
    }
    // `--tp N`: one slice of the model per process (tp_infer.rs).
    match TpGroup::join(a.tp, a.model.as_deref(), a.random_preset.as_deref())? {
        Some(g) => {
            let out = g.load(a.model.as_deref(), a.random_preset.as_deref(), dtype).and_then(|model| {
                let (tok, name) = tokenizer_and_name(&a)?;
                serve(a, model, tok, name, Some(&g))
            });
            g.finish(out)
        }
        None => {
            let model = match (&a.model, &a.random_preset) {
                (Some(dir), _) => crate::load::load_model(backend, dir, dtype, &a.metaseq)?,
                (None, Some(preset)) => {
                    let cfg = OptConfig::preset(preset)?;
                    let std = cfg.init_std;
                    OptModel::new_random(backend, cfg, dtype, std, 0)?
                }
                (None, None) => bail!("--model is required"),
            };
            let (tok, name) = tokenizer_and_name(&a)?;
            serve(a, model, tok, name, None)
        }
    }
}

/// The tokenizer and the default served-model name for `--model` / `--random-preset`.
fn tokenizer_and_name(a: &ServeArgs) -> Result<(opt_tokenizer::OptTokenizer, String)> {
    match (&a.model, &a.random_preset) {
        (Some(dir), _) => {
            let tok = crate::score::tokenizer_for(dir, a.tokenizer.as_deref())?;
            let name = std::fs::canonicalize(dir)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "opt".to_string());
            Ok((tok, name))
        }
        (None, Some(preset)) => Ok((crate::load_tokenizer(a.tokenizer.as_deref())?, format!("opt-{preset}-random"))),
        (None, None) => bail!("--model is required"),
    }
}

fn serve<B: Backend + 'static>(
    a: ServeArgs,
    model: OptModel<B>,
    tok: opt_tokenizer::OptTokenizer,
    default_name: String,
    group: Option<&TpGroup>,
) -> Result<()> {
    if let Some(g) = group.filter(|g| !g.is_leader()) {
        // The other ranks repeat rank 0's model calls until its engine stops.
        return g.follow(model, &tok);
    }
    let api_key = a.api_key.clone().or_else(|| std::env::var(API_KEY_ENV).ok()).filter(|k| !k.is_empty());
    let options = ServerOptions {
        served_model_name: a.served_model_name.clone().unwrap_or(default_name),
        api_key,
        engine: EngineOptions {
            kv_cache_bytes: a.kv_cache_mib.saturating_mul(1 << 20),
            max_queue: a.max_queue,
            max_running: a.max_running,
            ..EngineOptions::default()
        },
        ..ServerOptions::new("")
    };
    if a.max_running > 64 {
        eprintln!(
            "warning: --max-running {} > 64: batches that large leave the batch-invariant decode kernel, so outputs may depend on the batch in the last bits",
            a.max_running
        );
    }
    let name = options.served_model_name.clone();
    let keyed = options.api_key.is_some();
    let (server, followers_done) = match group {
        Some(g) => {
            eprintln!("opt-rs serve: tensor parallel over {} ranks (rank 0 serves HTTP)", g.comm.size());
            let (followers, done) = g.followers();
            (Server::new_tp_leader(model, tok, options, followers)?, Some(done))
        }
        None => (Server::new(model, tok, options)?, None),
    };
    let context = server.model_info().context;

    // An IPv6 literal needs brackets before the port.
    let addr = if a.host.contains(':') && !a.host.starts_with('[') {
        format!("[{}]:{}", a.host, a.port)
    } else {
        format!("{}:{}", a.host, a.port)
    };
    let served = server.run_until_ctrl_c(&addr, |local| {
        // One parseable line on stdout (tests and scripts read the port from it with --port 0).
        println!("listening on http://{local}");
        std::io::stdout().flush().ok();
        eprintln!(
            "opt-rs serve: model '{name}' (context {context}){}; playground at http://{local}/, API at http://{local}/v1/completions",
            if keyed { ", API key required" } else { "" }
        );
    });
    // The engine tells the followers to stop as it ends (with the server): wait for that.
    if let Some(done) = followers_done {
        let _ = done.recv();
    }
    served?;
    Ok(())
}
