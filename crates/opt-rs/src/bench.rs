//! `opt-rs bench`: prefill and decode timings on random weights of a preset, printed in the
//! same JSON-lines shape as `bench/hf_cpu.py` (and `shared/anchors/hf_cpu_baseline.py`) so
//! `bench/cpu.sh` can print ratios from one run.

use std::time::Instant;

use anyhow::{Context, Result};
use opt_model::{KvCache, LogitsMode, OptConfig, OptModel};
use opt_tensor::{Backend, Buffer, DType};
use serde_json::json;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model shape (random weights): tiny, 125m, 350m, 1.3b, ...
    #[arg(long, default_value = "125m")]
    preset: String,
    /// Weight dtype (compute is f32 on CPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Prefill length (batch 1).
    #[arg(long, default_value_t = 128)]
    prefill: usize,
    /// Prompt length for the decode benchmark.
    #[arg(long, default_value_t = 16)]
    prompt: usize,
    /// New tokens for the decode benchmark.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Which parts: prefill, decode (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "prefill,decode")]
    what: Vec<String>,
}

fn time<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<f64> {
    f()?;
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(start.elapsed().as_secs_f64() / reps.max(1) as f64)
}

/// Deterministic pseudo-random token ids in [4, 50000).
fn ids(n: usize, seed: u64) -> Vec<u32> {
    (0..n).map(|i| 4 + (opt_tensor::rng::bits(seed, i as u64) % 49_996) as u32).collect()
}

/// `opt-rs bench` on any backend.
pub struct BenchJob(pub BenchArgs);

impl crate::device::Job for BenchJob {
    type Output = ();
    fn run<B: Backend + 'static>(self, backend: B) -> Result<()> {
        run(self.0, backend)
    }
}

/// Wait for the device: download one element of `buf` (a no-op cost on CPU).
fn sync<B: Backend>(be: &B, buf: &B::Buf) -> Result<()> {
    be.to_f32(buf.at(0, 1))?;
    Ok(())
}

fn run<B: Backend>(a: BenchArgs, backend: B) -> Result<()> {
    let dtype: DType = a.dtype.parse().map_err(anyhow::Error::msg).context("--dtype")?;
    let cfg = OptConfig::preset(&a.preset)?;
    let std = cfg.init_std;
    let model = OptModel::new_random(backend, cfg, dtype, std, 0)?;
    let sys = if model.backend.name() == "cpu" {
        "opt-rs-cpu".to_string()
    } else {
        format!("opt-rs-{}", model.backend.name())
    };
    let name = a.preset.as_str();
    let threads = rayon::current_num_threads();
    let want = |w: &str| a.what.iter().any(|x| x == w);
    if want("prefill") {
        let x = ids(a.prefill, 1);
        let dt = time(a.reps, || {
            let l = model.forward(&x, 1, None, None, LogitsMode::All)?;
            sync(&model.backend, &l)
        })?;
        emit(json!({"sys": sys, "task": "prefill", "model": name, "dtype": a.dtype, "threads": threads,
                   "tokens": a.prefill, "logits": "all", "ms": round1(dt * 1e3), "tok_per_s": round1(a.prefill as f64 / dt)}));
        let dt = time(a.reps, || {
            let l = model.forward(&x, 1, None, None, LogitsMode::Last)?;
            sync(&model.backend, &l)
        })?;
        emit(json!({"sys": sys, "task": "prefill_last", "model": name, "dtype": a.dtype, "threads": threads,
                   "tokens": a.prefill, "logits": "last", "ms": round1(dt * 1e3), "tok_per_s": round1(a.prefill as f64 / dt)}));
    }
    if want("decode") {
        let prompt = ids(a.prompt, 2);
        let v = model.cfg.vocab_size;
        let steps = a.new_tokens;
        let reps = (a.reps / 2).max(1);
        let dt = time(reps, || {
            // Greedy: prefill (last logits only), then one token per step with the KV cache.
            let mut cache = KvCache::new(&model.backend, &model.cfg, 1, prompt.len() + steps)?;
            let mut logits = model.forward(&prompt, 1, None, Some(&mut cache), LogitsMode::Last)?;
            for _ in 1..steps {
                let row = model.backend.to_f32(logits.at(0, v))?;
                let next = argmax(&row[..v]);
                logits = model.forward(&[next], 1, None, Some(&mut cache), LogitsMode::Last)?;
            }
            Ok(())
        })?;
        let label = format!("generate{}+{}", a.prompt, steps);
        emit(json!({"sys": sys, "task": label, "model": name, "dtype": a.dtype, "threads": threads,
                   "s": round2(dt), "new_tok_per_s": round1(steps as f64 / dt)}));
    }
    Ok(())
}

/// Print one JSON line; a closed pipe (`| head -1`) ends the program quietly instead of panicking.
fn emit(v: serde_json::Value) {
    use std::io::Write;
    if writeln!(std::io::stdout(), "{v}").is_err() {
        std::process::exit(0);
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
