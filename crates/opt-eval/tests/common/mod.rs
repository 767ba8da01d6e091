//! Shared fixtures: the random-weight eval model, the bundled tokenizer and the HF reference
//! written by tools/reference/generate_eval.py (see fixtures/eval/README.md).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use opt_model::OptModel;
use opt_tensor::{CpuBackend, DType};
use opt_tokenizer::OptTokenizer;
use serde_json::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn eval_dir() -> PathBuf {
    repo().join("fixtures/eval")
}

pub fn model() -> &'static OptModel<CpuBackend> {
    static M: OnceLock<OptModel<CpuBackend>> = OnceLock::new();
    M.get_or_init(|| {
        OptModel::from_folder(CpuBackend::new(), &repo().join("fixtures/eval_model"), DType::F32)
            .expect("eval model loads")
    })
}

pub fn tok() -> &'static OptTokenizer {
    static T: OnceLock<OptTokenizer> = OnceLock::new();
    T.get_or_init(|| OptTokenizer::bundled().expect("bundled tokenizer"))
}

pub fn reference() -> &'static Value {
    static R: OnceLock<Value> = OnceLock::new();
    R.get_or_init(|| {
        let text = std::fs::read_to_string(eval_dir().join("reference.json")).expect("reference.json");
        serde_json::from_str(&text).expect("reference.json parses")
    })
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

pub fn f(v: &Value) -> f64 {
    v.as_f64().expect("number")
}
