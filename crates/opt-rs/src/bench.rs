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
    /// Which parts: prefill, decode, train (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "prefill,decode")]
    what: Vec<String>,
    /// Sequences decoded together (decode), or rows per step (train).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tokens per row for the training benchmark.
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    /// Timed training steps (after two warm-up steps).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Training: recompute each layer's activations in the backward pass (activation
    /// checkpointing) instead of keeping them.
    #[arg(long)]
    recompute: bool,
    /// Quantize the layer matrices to int8 (weight-only; `--dtype` is then the dtype of the
    /// other parameters). Inference only (prefill, decode).
    #[arg(long)]
    int8: bool,
    #[command(flatten)]
    quant: crate::quantize::QuantOpts,
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
    let mut model = OptModel::new_random(backend, cfg, dtype, std, 0)?;
    if a.int8 {
        model = model.quantize(a.quant.config()?)?;
    }
    // The weights as benchmarked: "f32", "bf16", "int8-g0+bf16" (int8 matrices with 0 = per-channel
    // or N-column groups, the rest in bf16), "int8-g128-emb+bf16" (embeddings int8 too).
    let weights = match &model.quant {
        None => a.dtype.clone(),
        Some(q) => {
            format!("int8-g{}{}+{}", q.config.group_size, if q.config.embeddings { "-emb" } else { "" }, model.dtype())
        }
    };
    let weight_mb = round1(model.weight_bytes() as f64 / 1e6);
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
        emit(json!({"sys": sys, "task": "prefill", "model": name, "dtype": weights, "weight_mb": weight_mb,
                   "threads": threads, "tokens": a.prefill, "logits": "all", "ms": round1(dt * 1e3), "tok_per_s": round1(a.prefill as f64 / dt)}));
        let dt = time(a.reps, || {
            let l = model.forward(&x, 1, None, None, LogitsMode::Last)?;
            sync(&model.backend, &l)
        })?;
        emit(json!({"sys": sys, "task": "prefill_last", "model": name, "dtype": weights, "weight_mb": weight_mb,
                   "threads": threads, "tokens": a.prefill, "logits": "last", "ms": round1(dt * 1e3), "tok_per_s": round1(a.prefill as f64 / dt)}));
    }
    if want("decode") {
        let b = a.batch.max(1);
        let prompt = ids(a.prompt * b, 2);
        let v = model.cfg.vocab_size;
        let steps = a.new_tokens;
        let reps = (a.reps / 2).max(1);
        // The fastest single decode step too: on a shared machine the minimum is far less
        // disturbed by other processes than the mean.
        let mut min_step = f64::INFINITY;
        let dt = time(reps, || {
            // Greedy: prefill (last logits only), then one token per row and step with the KV cache.
            let mut cache = KvCache::for_model(&model, b, a.prompt + steps)?;
            let mut logits = model.forward(&prompt, b, None, Some(&mut cache), LogitsMode::Last)?;
            for _ in 1..steps {
                // Greedy choice where the logits are (on a GPU only the ids cross the bus).
                let next = model.backend.argmax_rows(logits.at(0, b * v), v)?;
                let t0 = Instant::now();
                logits = model.forward(&next, b, None, Some(&mut cache), LogitsMode::Last)?;
                sync(&model.backend, &logits)?;
                min_step = min_step.min(t0.elapsed().as_secs_f64());
            }
            sync(&model.backend, &logits)
        })?;
        let label = if b == 1 { format!("generate{}+{}", a.prompt, steps) } else { "generate".to_string() };
        emit(json!({"sys": sys, "device": model.backend.name(), "task": label, "model": name, "dtype": weights,
                   "weight_mb": weight_mb, "threads": threads, "batch": b, "prompt": a.prompt, "new": steps,
                   "s": round2(dt), "new_tok_per_s": round1((b * steps) as f64 / dt),
                   "min_step_ms": round2(min_step * 1e3)}));
    }
    if want("train") {
        train(&a, &mut model, &sys)?;
    }
    Ok(())
}

/// Training steps at `batch × seq` on random tokens: forward, backward, gradient norm and an
/// AdamW update of f32 master weights (copied back to the storage dtype when that is not f32),
/// as `opt-rs train` does. The step time is the mean of `--steps` steps after two warm-ups.
fn train<B: Backend>(a: &BenchArgs, model: &mut OptModel<B>, sys: &str) -> Result<()> {
    use opt_model::{causal_targets, TrainBatch, TrainState};
    let be = &model.backend;
    let (b, t) = (a.batch.max(1), a.seq);
    if t > model.cfg.max_position_embeddings {
        anyhow::bail!("--seq {t} exceeds the model's {} positions", model.cfg.max_position_embeddings);
    }
    let n_params = model.layout.total();
    let mut st = TrainState::with_recompute(model, b, t, a.recompute)?;
    let saved_gb = round1(st.saved_layer_floats() as f64 * 4.0 / (1u64 << 30) as f64);
    let mut grads = be.zeros(DType::F32, n_params)?;
    let f32_master = model.params.dtype() != DType::F32;
    let mut master = if f32_master { Some(be.zeros(DType::F32, n_params)?) } else { None };
    if let Some(m) = master.as_mut() {
        be.copy(m.vm(), model.params.v())?;
    }
    let mut m1 = be.zeros(DType::F32, n_params)?;
    let mut m2 = be.zeros(DType::F32, n_params)?;
    let tokens = ids(b * t, 3);
    let mask = vec![1u8; b * t];
    let targets = causal_targets(&tokens, &mask, b, t);
    let count = targets.iter().filter(|&&x| x >= 0).count().max(1);
    let tb = TrainBatch { ids: &tokens, mask: &mask, targets: &targets, batch: b, seq: t };
    let mut step_no = 0u64;
    let mut step = |model: &mut OptModel<B>| -> Result<f64> {
        step_no += 1;
        let be = &model.backend;
        be.fill(grads.vm(), 0.0)?;
        let (loss, _) = model.forward_backward(&tb, &mut st, &mut grads, Some(1.0 / count as f32), None)?;
        let norm = be.sum_squares(grads.v())?.sqrt();
        let clip = if norm > 1.0 { (1.0 / (norm + 1e-6)) as f32 } else { 1.0 };
        let hp = opt_tensor::AdamW {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: step_no,
            grad_scale: clip,
        };
        match master.as_mut() {
            Some(mst) => {
                be.adamw(mst.vm(), grads.v(), m1.vm(), m2.vm(), &hp)?;
                be.copy(model.params.vm(), mst.v())?;
            }
            None => be.adamw(model.params.vm(), grads.v(), m1.vm(), m2.vm(), &hp)?,
        }
        Ok(loss / count as f64)
    };
    let mut loss = 0.0;
    for _ in 0..2 {
        loss = step(model)?;
    }
    sync(&model.backend, &model.params)?;
    let start = Instant::now();
    for _ in 0..a.steps.max(1) {
        loss = step(model)?;
    }
    sync(&model.backend, &model.params)?;
    let be = &model.backend;
    let dt = start.elapsed().as_secs_f64() / a.steps.max(1) as f64;
    let (l, c) = (model.cfg.num_hidden_layers as f64, model.cfg.hidden_size as f64);
    let flops_tok = 6.0 * n_params as f64 + 12.0 * l * c * t as f64;
    let tok_s = (b * t) as f64 / dt;
    let mem = be.memory_in_use().map(|x| round1(x as f64 / (1u64 << 30) as f64));
    emit(json!({"sys": sys, "device": be.name(), "task": "train", "model": a.preset, "dtype": a.dtype,
               "params": n_params, "batch": b, "seq": t, "step_s": (dt * 1e4).round() / 1e4,
               "tok_per_s": tok_s.round(), "tflops": round1(flops_tok * tok_s / 1e12),
               "mem_in_use_gb": mem, "recompute": a.recompute, "saved_activations_gb": saved_gb,
               "loss": round2(loss)}));
    Ok(())
}

/// Print one JSON line; a closed pipe (`| head -1`) ends the program quietly instead of panicking.
fn emit(v: serde_json::Value) {
    use std::io::Write;
    if writeln!(std::io::stdout(), "{v}").is_err() {
        std::process::exit(0);
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
