//! Fixture access for the generation tests: the HF fixture models (`fixtures/<model>/`, written
//! by `tools/reference/generate.py`) and the generation references (`fixtures/generation/`,
//! written by `tools/reference/generate_generation.py`).
#![allow(dead_code)]

use std::path::PathBuf;

use opt_model::{OptConfig, OptModel};
use opt_tensor::{CpuBackend, DType};

pub const MODELS: [&str; 4] = ["pre_ln", "post_ln_proj", "galactica", "no_final_ln"];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

pub fn load(name: &str) -> OptModel<CpuBackend> {
    OptModel::from_folder(CpuBackend::new(), &fixture(name), DType::F32)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// A random-weight model with OPT's real vocabulary (so the bundled tokenizer fits).
pub fn tiny_random(seed: u64) -> OptModel<CpuBackend> {
    let cfg = OptConfig::preset("tiny").expect("tiny preset");
    OptModel::new_random(CpuBackend::new(), cfg, DType::F32, 0.02, seed).expect("random model")
}

pub fn read_json(rel: &str) -> serde_json::Value {
    let path = fixture(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}
