//! Shared helpers: the `pre_ln` fixture model (vocab 512, 137k parameters) as the model under
//! training, synthetic jsonl corpora in temporary folders, and fixture access.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use opt_checkpoint::{Checkpoint, FileDType};
use opt_tensor::CpuBackend;
use opt_train::trainer::{StartOptions, StepReport};
use opt_train::{TrainConfig, Trainer};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

/// A reference.safetensors file written by tools/reference.
pub struct Reference {
    pub ck: Checkpoint,
}

impl Reference {
    pub fn open(rel: &str) -> Reference {
        Reference { ck: Checkpoint::open(&fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}")) }
    }
    pub fn f32(&self, key: &str) -> Vec<f32> {
        self.ck.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}")).to_f32_vec().expect("f32")
    }
    pub fn i64(&self, key: &str) -> Vec<i64> {
        let t = self.ck.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(t.dtype, FileDType::I64, "{key} is not int64");
        t.bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
    }
}

/// Settings every fixture-model run shares: the pre_ln weights, one jsonl file of id rows
/// (one row per sequence), no validation, no samples, a logbook row per step, no dropout,
/// guards off, AdamW as in the fixtures (lr 1e-3, betas (0.9, 0.95), eps 1e-8, wd 0.1 on all).
pub fn base_sets(dir: &Path, data: &Path) -> Vec<String> {
    [
        format!("model.init_from={}", fixture("pre_ln").display()),
        "model.dropout=0.0".into(),
        "model.attention_dropout=0.0".into(),
        format!("data.train={}", data.display()),
        "data.valid=\"\"".into(),
        "data.seq_len=16".into(),
        "data.packing=false".into(),
        "data.shuffle=false".into(),
        "optim.lr=1e-3".into(),
        "optim.clip_norm=0.0".into(),
        "optim.weight_decay=0.1".into(),
        "schedule.kind=constant".into(),
        "schedule.warmup_steps=0".into(),
        "train.batch_size=1".into(),
        "train.grad_accum=1".into(),
        "train.max_steps=5".into(),
        "guards.enabled=false".into(),
        format!("run.dir={}", dir.join("run").display()),
        "run.checkpoint_every=0".into(),
        "run.log_every=1".into(),
        "run.eval_every=0".into(),
        "run.eval_batches=0".into(),
        "sample.prompts=[]".into(),
    ]
    .into_iter()
    .collect()
}

/// Write `rows` (token-id lists) as a jsonl file of `{"ids": [...]}` rows.
pub fn write_ids_jsonl(path: &Path, rows: &[Vec<u32>]) {
    let text: String = rows.iter().map(|r| format!("{}\n", serde_json::json!({ "ids": r }))).collect();
    std::fs::write(path, text).expect("write jsonl");
}

/// Config = base settings + `extra` overrides (later ones win).
pub fn config(dir: &Path, data: &Path, extra: &[&str]) -> TrainConfig {
    let mut sets = base_sets(dir, data);
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &sets).unwrap_or_else(|e| panic!("config: {e}"))
}

pub fn trainer(cfg: TrainConfig) -> Trainer<CpuBackend> {
    Trainer::new(cfg, CpuBackend::new(), StartOptions::default()).unwrap_or_else(|e| panic!("trainer: {e}"))
}

/// Run `n` steps and return their reports.
pub fn steps(t: &mut Trainer<CpuBackend>, n: usize) -> Vec<StepReport> {
    (0..n).map(|_| t.step(&mut ()).unwrap_or_else(|e| panic!("step: {e}"))).collect()
}

/// The fixture's `train_ids` row.
pub fn train_ids() -> Vec<u32> {
    Reference::open("pre_ln/reference.safetensors").i64("train_ids").into_iter().map(|x| x as u32).collect()
}

/// Deterministic pseudo-random id rows of varying lengths in [3, 512).
pub fn random_rows(n: usize, min_len: usize, max_len: usize, seed: u64) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            let len = min_len + (opt_tensor::rng::bits(seed, i as u64 * 1000) as usize) % (max_len - min_len + 1);
            (0..len).map(|j| 3 + (opt_tensor::rng::bits(seed, i as u64 * 1000 + 1 + j as u64) % 509) as u32).collect()
        })
        .collect()
}

/// Compare parameters (host f32 in ParamLayout order) with `prefix.<HF name>` tensors:
/// `(max |Δ| over all parameters but the k_proj biases, max |Δ| over the k_proj biases)`.
///
/// The key bias's true gradient is exactly zero (adding a constant vector to every key adds
/// the same `q·b` to all of a query's scores, which the softmax ignores), so both torch and
/// opt-rs see rounding noise of ~1e-10 there, and AdamW's normalised update turns noise of
/// either sign into steps of ±lr. Those elements can only be bounded, not matched.
pub fn max_param_diff(t: &Trainer<CpuBackend>, params: &[f32], r: &Reference, prefix: &str) -> (f32, f32) {
    let (mut worst, mut kbias) = (0f32, 0f32);
    for spec in &t.model().layout.specs {
        let key = if spec.name.starts_with("lm_head") {
            format!("{prefix}.{}", spec.name)
        } else {
            format!("{prefix}.model.{}", spec.name)
        };
        let want = r.f32(&key);
        let got = &params[spec.offset..spec.offset + spec.numel()];
        assert_eq!(want.len(), got.len(), "{key}");
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if spec.name.ends_with("k_proj.bias") {
            kbias = kbias.max(d);
        } else {
            worst = worst.max(d);
        }
    }
    (worst, kbias)
}

pub fn logbook(dir: &Path) -> Vec<serde_json::Value> {
    opt_train::logbook::read_rows(&dir.join("run/logbook.jsonl")).expect("logbook")
}

pub fn events(dir: &Path, name: &str) -> Vec<serde_json::Value> {
    logbook(dir).into_iter().filter(|r| r["kind"] == "event" && r["event"] == name).collect()
}
