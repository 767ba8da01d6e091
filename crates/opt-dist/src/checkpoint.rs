//! Tensor-parallel checkpoints: each tp slice writes its own safetensors file (HF names, local
//! shapes) beside `config.json` (the whole model's) and `parallel.json`; loading at the same
//! layout reads one file per rank; [`reshard`] changes `tp` by consolidating and re-slicing.

use std::path::Path;

use opt_checkpoint::{Checkpoint, TensorWrite};
use opt_model::{OptConfig, ParamLayout};
use opt_tensor::DType;
use serde::{Deserialize, Serialize};

use crate::plan::{shard_params, unshard_params};
use crate::{DistError, Result};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub tp: usize,
    pub vocab_size: usize,
    pub format: String,
}

fn file_err(path: &Path, detail: impl ToString) -> DistError {
    DistError::File { path: path.to_path_buf(), detail: detail.to_string() }
}

pub fn shard_file(dir: &Path, tp: usize, rank: usize) -> std::path::PathBuf {
    dir.join(format!("model-tp{rank:02}-of-{tp:02}.safetensors"))
}

/// Write tp slice `rank`'s parameters (`local`, layout `ParamLayout::sharded(cfg, tp)`).
/// Rank 0 also writes `config.json` and `parallel.json`.
pub fn save_shard(dir: &Path, cfg: &OptConfig, tp: usize, rank: usize, local: &[f32]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let layout = ParamLayout::sharded(cfg, tp);
    if local.len() != layout.total() {
        return Err(file_err(dir, format!("{} parameters for a shard of {}", local.len(), layout.total())));
    }
    let blobs: Vec<(String, Vec<usize>, Vec<u8>)> = layout
        .specs
        .iter()
        .map(|s| {
            let b = local[s.offset..s.offset + s.numel()].iter().flat_map(|x| x.to_le_bytes()).collect();
            (s.name.clone(), s.shape.clone(), b)
        })
        .collect();
    let tensors: Vec<TensorWrite<'_>> = blobs
        .iter()
        .map(|(n, sh, b)| TensorWrite { name: n.clone(), dtype: DType::F32, shape: sh.clone(), bytes: b })
        .collect();
    opt_checkpoint::save_safetensors(&shard_file(dir, tp, rank), &tensors)?;
    if rank == 0 {
        let meta = ShardMeta { tp, vocab_size: cfg.vocab_size, format: "opt-rs tp shards v1".into() };
        let text = serde_json::to_string_pretty(&meta).map_err(|e| file_err(dir, e))?;
        std::fs::write(dir.join("parallel.json"), text).map_err(|e| file_err(dir, e))?;
        let cfg_text = serde_json::to_string_pretty(&cfg.to_hf_json(DType::F32)).map_err(|e| file_err(dir, e))?;
        std::fs::write(dir.join("config.json"), cfg_text).map_err(|e| file_err(dir, e))?;
    }
    Ok(())
}

/// Read the model config and the shard layout of a checkpoint folder.
pub fn read_meta(dir: &Path) -> Result<(OptConfig, ShardMeta)> {
    let p = dir.join("parallel.json");
    let text = std::fs::read_to_string(&p).map_err(|e| file_err(&p, e))?;
    let meta: ShardMeta = serde_json::from_str(&text).map_err(|e| file_err(&p, e))?;
    let cfg = OptConfig::from_path(dir)?;
    Ok((cfg, meta))
}

/// Load tp slice `rank` written at `tp`.
pub fn load_shard(dir: &Path, cfg: &OptConfig, tp: usize, rank: usize) -> Result<Vec<f32>> {
    let path = shard_file(dir, tp, rank);
    let ck = Checkpoint::open(&path)?;
    let layout = ParamLayout::sharded(cfg, tp);
    let mut out = vec![0f32; layout.total()];
    for s in &layout.specs {
        let t = ck.tensor(&s.name)?;
        if t.shape != s.shape.as_slice() {
            return Err(file_err(&path, format!("{}: shape {:?}, tp = {tp} needs {:?}", s.name, t.shape, s.shape)));
        }
        t.read_f32_into(&mut out[s.offset..s.offset + s.numel()])?;
    }
    Ok(out)
}

/// Rewrite the checkpoint in `src` at `tp = to` into `dst`. This holds the whole model in one
/// process (fine up to a few billion parameters); a tensor-at-a-time version would not.
pub fn reshard(src: &Path, dst: &Path, to: usize) -> Result<()> {
    let (cfg, meta) = read_meta(src)?;
    crate::ParallelPlan { tp: to, fsdp: 1, dp: 1 }.validate(to, &cfg)?;
    let shards: Vec<Vec<f32>> = (0..meta.tp).map(|r| load_shard(src, &cfg, meta.tp, r)).collect::<Result<_>>()?;
    let full = unshard_params(&cfg, &shards)?;
    for r in 0..to {
        save_shard(dst, &cfg, to, r, &shard_params(&cfg, &full, to, r)?)?;
    }
    Ok(())
}
