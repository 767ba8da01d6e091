//! Fixture access for the parity tests. Fixtures are written by `tools/reference/generate.py`
//! (HF transformers 5.17 + torch 2.11) and committed under `fixtures/`.
#![allow(dead_code)]

use std::path::PathBuf;

use opt_checkpoint::{Checkpoint, FileDType};
use opt_model::OptModel;
use opt_tensor::{CpuBackend, DType};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

pub struct Reference {
    pub ck: Checkpoint,
}

impl Reference {
    pub fn open(name: &str) -> Reference {
        let ck = Checkpoint::open(&fixture(name).join("reference.safetensors")).expect("reference.safetensors");
        Reference { ck }
    }
    pub fn has(&self, key: &str) -> bool {
        self.ck.contains(key)
    }
    pub fn f32(&self, key: &str) -> Vec<f32> {
        self.ck.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}")).to_f32_vec().expect("f32")
    }
    pub fn shape(&self, key: &str) -> Vec<usize> {
        self.ck.tensor(key).expect("tensor").shape.to_vec()
    }
    pub fn i64(&self, key: &str) -> Vec<i64> {
        let t = self.ck.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(t.dtype, FileDType::I64, "{key} is not int64");
        t.bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
    }
    pub fn u32s(&self, key: &str) -> Vec<u32> {
        self.i64(key).into_iter().map(|x| x as u32).collect()
    }
    pub fn mask(&self, key: &str) -> Vec<u8> {
        self.i64(key).into_iter().map(|x| x as u8).collect()
    }
}

pub fn load(name: &str, dtype: DType) -> OptModel<CpuBackend> {
    OptModel::from_folder(CpuBackend::new(), &fixture(name), dtype).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

/// Max |a - b| over positions where `keep(row)` holds; rows are `width` wide.
pub fn max_abs_diff_rows(a: &[f32], b: &[f32], width: usize, keep: impl Fn(usize) -> bool) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut m = 0f32;
    for (r, (ra, rb)) in a.chunks(width).zip(b.chunks(width)).enumerate() {
        if keep(r) {
            for (x, y) in ra.iter().zip(rb) {
                m = m.max((x - y).abs());
            }
        }
    }
    m
}

pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}
