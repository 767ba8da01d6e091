//! `opt-rs quantize`: write a weight-only int8 copy of a model folder (format and choices in
//! `opt_model::quant` and `docs/quantization.md`), and the quantization options `bench` shares.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use opt_model::{OptModel, QuantConfig};
use opt_tensor::{CpuBackend, DType};

/// Whether the token embedding (and the LM head) is quantized too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Embeddings {
    /// Keep them in the storage dtype (default: the LM head's error goes straight to the
    /// log-probabilities).
    Keep,
    /// Quantize them as well (smallest model; decode reads the largest matrix in int8).
    Int8,
}

/// The quantization choices.
#[derive(clap::Args, Clone, Debug)]
pub struct QuantOpts {
    /// Columns per scale: 0 = one scale per output channel; else group-wise, a multiple of 16
    /// (e.g. 64 or 128).
    #[arg(long, default_value_t = 0)]
    pub group_size: usize,
    /// Quantize the token embedding / LM head too, or keep them.
    #[arg(long, value_enum, default_value = "keep")]
    pub embeddings: Embeddings,
}

impl QuantOpts {
    pub fn config(&self) -> Result<QuantConfig> {
        let qc = QuantConfig { group_size: self.group_size, embeddings: self.embeddings == Embeddings::Int8 };
        qc.validate().map_err(anyhow::Error::msg).context("--group-size")?;
        Ok(qc)
    }
}

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// HF model folder to quantize.
    #[arg(long)]
    model: PathBuf,
    /// Output folder (config.json with quantization_config + model.safetensors; tokenizer
    /// files of the source are copied).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    quant: QuantOpts,
    /// Dtype of the parameters that stay unquantized (LayerNorms, biases, positions, kept
    /// embeddings); default: the source's `torch_dtype`, else f32.
    #[arg(long)]
    dtype: Option<String>,
}

/// Files beside the weights that make a folder usable on its own.
const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "generation_config.json",
];

/// The dtype a folder's config.json declares (`torch_dtype`, or transformers 5's `dtype`).
fn declared_dtype(dir: &Path) -> Option<DType> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    ["torch_dtype", "dtype"].iter().find_map(|k| v.get(*k)?.as_str()?.parse().ok())
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let qc = a.quant.config()?;
    let dtype = match &a.dtype {
        Some(d) => d.parse().map_err(anyhow::Error::msg).context("--dtype")?,
        None => declared_dtype(&a.model).unwrap_or(DType::F32),
    };
    if a.out.exists() && std::fs::canonicalize(&a.out).ok() == std::fs::canonicalize(&a.model).ok() {
        anyhow::bail!("--out is the source folder {}: write the quantized model elsewhere", a.model.display());
    }
    let model = OptModel::from_folder(CpuBackend::new(), &a.model, dtype)
        .with_context(|| format!("loading model from {}", a.model.display()))?;
    if model.is_quantized() {
        anyhow::bail!("{} is already quantized", a.model.display());
    }
    let before = model.weight_bytes();
    let q = model.quantize(qc).context("quantizing")?;
    q.save_hf(&a.out).with_context(|| format!("writing {}", a.out.display()))?;
    for f in SIDE_FILES {
        let src = a.model.join(f);
        if src.is_file() {
            std::fs::copy(&src, a.out.join(f)).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    let after = q.weight_bytes();
    let n = q.quant.as_ref().map_or(0, |w| w.len());
    let scheme =
        if qc.group_size == 0 { "per output channel".to_string() } else { format!("groups of {}", qc.group_size) };
    println!(
        "{n} matrices → int8 ({scheme}{}); other parameters {dtype}; weights {:.1} MB → {:.1} MB ({:.2}× smaller); wrote {}",
        if qc.embeddings { ", embeddings included" } else { "" },
        before as f64 / 1e6,
        after as f64 / 1e6,
        before as f64 / after.max(1) as f64,
        a.out.display()
    );
    Ok(())
}
