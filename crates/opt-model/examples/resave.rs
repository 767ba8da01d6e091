//! Load an HF folder and save it again with opt-rs's writer (optionally in another dtype):
//!
//!     cargo run --release -p opt-model --example resave -- fixtures/pre_ln /tmp/out [f32|bf16|f16]
//!
//! `tools/reference/check_roundtrip.py /tmp/out pre_ln` then loads the result with HF
//! transformers and compares logits with the fixture: the save → HF-load round trip.

use std::path::PathBuf;

use opt_model::OptModel;
use opt_tensor::{CpuBackend, DType};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (src, dst) = match (args.first(), args.get(1)) {
        (Some(s), Some(d)) => (PathBuf::from(s), PathBuf::from(d)),
        _ => return Err("usage: resave SRC_DIR DST_DIR [f32|bf16|f16]".into()),
    };
    let dtype: DType = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(DType::F32);
    let model = OptModel::from_folder(CpuBackend::new(), &src, dtype)?;
    model.save_hf(&dst)?;
    println!("saved {} ({dtype}) to {}", src.display(), dst.display());
    Ok(())
}
