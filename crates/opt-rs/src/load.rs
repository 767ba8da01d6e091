//! The model a command's `--model PATH` names: an HF folder (plain, or int8-quantized by
//! `opt-rs quantize`), or a metaseq checkpoint read directly — a `.pt` file, or a folder of
//! `reshard-model_part-*.pt` / `restored.pt` / FSDP shards — with its config given as
//! `opt-rs convert --from metaseq` takes it (`--config` or `--preset`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use opt_model::{OptConfig, OptModel};
use opt_tensor::{Backend, DType};

/// The config of a metaseq checkpoint (its files do not record an HF config).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct MetaseqArgs {
    /// With a metaseq checkpoint as --model: the model's HF config.json (or a folder holding
    /// one). Default: config.json in the checkpoint's folder, if there is one.
    #[arg(long = "config", value_name = "CONFIG", conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// With a metaseq checkpoint as --model: a named OPT size (125m, 350m, 1.3b, ..., 175b)
    /// instead of --config.
    #[arg(long = "preset", value_name = "NAME")]
    pub preset: Option<String>,
}

/// The config for the metaseq checkpoint at `path`.
fn metaseq_config(path: &Path, m: &MetaseqArgs) -> Result<OptConfig> {
    if let Some(p) = &m.config {
        return OptConfig::from_path(p).with_context(|| format!("--config {}", p.display()));
    }
    if let Some(name) = &m.preset {
        return OptConfig::preset(name).context("--preset");
    }
    let beside =
        if path.is_dir() { Some(path.join("config.json")) } else { path.parent().map(|d| d.join("config.json")) };
    match beside.filter(|p| p.is_file()) {
        Some(p) => OptConfig::from_path(&p).with_context(|| format!("reading {}", p.display())),
        None => bail!(
            "{} is a metaseq checkpoint, whose files do not say the model's shape: give --config CONFIG.json \
             or --preset NAME (125m, 350m, 1.3b, ...), as for `opt-rs convert --from metaseq`",
            path.display()
        ),
    }
}

/// Load the model at `path` (see the module docs) with parameters in `dtype`.
pub fn load_model<B: Backend>(backend: B, path: &Path, dtype: DType, m: &MetaseqArgs) -> Result<OptModel<B>> {
    if opt_metaseq::is_metaseq(path) {
        let cfg = metaseq_config(path, m)?;
        eprintln!("note: reading the metaseq checkpoint {} directly (no conversion written)", path.display());
        return opt_metaseq::load_model(backend, &[path.to_path_buf()], cfg, dtype)
            .with_context(|| format!("loading the metaseq checkpoint {}", path.display()));
    }
    if m.config.is_some() || m.preset.is_some() {
        bail!(
            "--config/--preset describe a metaseq checkpoint, but {} is not one (an HF folder carries its own config.json)",
            path.display()
        );
    }
    // A multi-rank training run's checkpoint: its shards, consolidated tensor by tensor.
    if path.is_dir() && opt_train::checkpoint::sharded_meta(path).ok().flatten().is_some() {
        eprintln!(
            "note: consolidating the sharded training checkpoint {} (opt-rs export writes it once)",
            path.display()
        );
        let (cfg, params) = opt_dist::train::consolidated_params(path)
            .with_context(|| format!("consolidating the sharded checkpoint {}", path.display()))?;
        return OptModel::from_params(backend, cfg, &params, dtype)
            .with_context(|| format!("loading model from {}", path.display()));
    }
    OptModel::from_folder(backend, path, dtype).with_context(|| format!("loading model from {}", path.display()))
}
