//! Training checkpoints: everything a run needs to continue bit for bit.
//!
//! `RUN_DIR/checkpoints/step_NNNNNNN/` holds
//! - `config.json` + `model.safetensors`: the f32 master weights as an HF folder (so
//!   `OPTForCausalLM.from_pretrained` and `opt-rs score` load a checkpoint directly);
//! - `exp_avg.safetensors`, `exp_avg_sq.safetensors`: AdamW's moments, one flat f32 tensor
//!   `[N]` each in [`opt_model::ParamLayout`] order (two files, so saving holds one host copy
//!   of one buffer at a time);
//! - `config.toml`: the run configuration when it was saved;
//! - `trainer.json`: step, applied updates, data position, loss scaler, guard state, LR factor,
//!   rollback count and seed ([`TrainerState`]). That is the whole RNG state: every random
//!   draw (data order, dropout masks, sampling) is a counter-based function of the seed and
//!   the step/epoch/position counters, so nothing else needs saving.
//!
//! A checkpoint is written into `checkpoints/.tmp-step_NNNNNNN-PID/` and renamed into place
//! only when every file is complete, so a crash mid-write leaves the previous checkpoints as
//! they were (and a stray temporary folder, removed by the next save). Only folders named
//! `step_*` that contain `trainer.json` count as checkpoints.

use std::path::{Path, PathBuf};

use opt_checkpoint::{Checkpoint, TensorWrite};
use opt_model::{OptConfig, OptModel, ParamLayout};
use opt_tensor::{CpuBackend, DType};
use serde::{Deserialize, Serialize};

use crate::data::DataPosition;
use crate::guards::GuardState;
use crate::optim::LossScaler;
use crate::{Result, TrainError};

pub const CHECKPOINTS: &str = "checkpoints";
const STATE_FILE: &str = "trainer.json";
const MOMENTS: [(Part, &str); 2] = [(Part::ExpAvg, "exp_avg"), (Part::ExpAvgSq, "exp_avg_sq")];
const FORMAT: u32 = 1;

/// The trainer's counters and small state, saved as `trainer.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: u32,
    /// Steps taken (batches consumed as steps, skipped ones included); drives the schedule.
    pub step: u64,
    /// AdamW updates applied (its bias-correction step).
    pub updates: u64,
    pub data: DataPosition,
    pub scaler: Option<LossScaler>,
    pub guards: GuardState,
    /// Multiplier on the scheduled learning rate (lowered by rollbacks).
    #[serde(with = "exact_f64")]
    pub lr_factor: f64,
    pub rollbacks: usize,
    pub tokens_seen: u64,
    pub seed: u64,
}

impl TrainerState {
    pub fn new(seed: u64, scaler: Option<LossScaler>) -> Self {
        TrainerState {
            format: FORMAT,
            step: 0,
            updates: 0,
            data: DataPosition::default(),
            scaler,
            guards: GuardState::default(),
            lr_factor: 1.0,
            rollbacks: 0,
            tokens_seen: 0,
            seed,
        }
    }
}

/// The flat f32 buffers of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Master weights.
    Params,
    ExpAvg,
    ExpAvgSq,
}

/// What a checkpoint holds, borrowed from the trainer for saving. The flat buffers are fetched
/// to the host one at a time (`fetch`) and dropped once written, which bounds the extra memory
/// of a save to one copy of the parameters.
pub struct Snapshot<'a> {
    pub state: &'a TrainerState,
    pub model_cfg: &'a OptConfig,
    pub config_toml: &'a str,
    pub fetch: &'a mut dyn FnMut(Part) -> Result<Vec<f32>>,
}

/// A checkpoint read back.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub model_cfg: OptConfig,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

fn step_name(step: u64) -> String {
    format!("step_{step:07}")
}

/// Save a checkpoint under `root` (the run's `checkpoints/` folder) and keep the newest
/// `keep_last`. Returns the checkpoint folder.
pub fn save(root: &Path, snap: &mut Snapshot<'_>, keep_last: usize) -> Result<PathBuf> {
    save_inner(root, snap, keep_last, None)
}

/// [`save`], stopping (with an error, as a crash would) after `files_written` of its files.
/// For tests of the atomic write.
#[doc(hidden)]
pub fn save_interrupted(root: &Path, snap: &mut Snapshot<'_>, files_written: usize) -> Result<PathBuf> {
    save_inner(root, snap, usize::MAX, Some(files_written))
}

fn save_inner(root: &Path, snap: &mut Snapshot<'_>, keep_last: usize, crash_after: Option<usize>) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
    remove_stale_temporaries(root)?;
    let name = step_name(snap.state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    let io = |p: &Path, e| TrainError::io(p, e);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let crash = |written: usize| -> Result<()> {
        if crash_after == Some(written) {
            return Err(TrainError::Checkpoint {
                path: tmp.clone(),
                detail: format!("simulated crash after {written} files"),
            });
        }
        Ok(())
    };

    // 1. Master weights as an HF folder: OPTForCausalLM's key names (as `OptModel::save_hf`
    // writes them), straight from the host copy.
    let layout = ParamLayout::new(snap.model_cfg);
    let params = (snap.fetch)(Part::Params)?;
    if params.len() != layout.total() {
        return Err(TrainError::Checkpoint {
            path: tmp.clone(),
            detail: format!("{} parameters given, the model has {}", params.len(), layout.total()),
        });
    }
    let bytes: &[u8] = bytemuck::cast_slice(&params);
    let tensors: Vec<TensorWrite<'_>> = layout
        .specs
        .iter()
        .map(|s| TensorWrite {
            name: if s.name.starts_with("lm_head") { s.name.clone() } else { format!("model.{}", s.name) },
            dtype: DType::F32,
            shape: s.shape.clone(),
            bytes: &bytes[s.offset * 4..(s.offset + s.numel()) * 4],
        })
        .collect();
    opt_checkpoint::save_safetensors(&tmp.join("model.safetensors"), &tensors)?;
    drop(tensors);
    drop(params);
    let hf = serde_json::to_string_pretty(&snap.model_cfg.to_hf_json(DType::F32))
        .map_err(|e| TrainError::Checkpoint { path: tmp.clone(), detail: format!("serialising config.json: {e}") })?;
    write_synced(&tmp.join("config.json"), hf.as_bytes())?;
    crash(1)?;
    // 2. Optimizer moments.
    for (part, name) in MOMENTS {
        let x = (snap.fetch)(part)?;
        let t =
            TensorWrite { name: name.into(), dtype: DType::F32, shape: vec![x.len()], bytes: bytemuck::cast_slice(&x) };
        opt_checkpoint::save_safetensors(&tmp.join(format!("{name}.safetensors")), &[t])?;
    }
    crash(2)?;
    // 3. The configuration.
    write_synced(&tmp.join("config.toml"), snap.config_toml.as_bytes())?;
    crash(3)?;
    // 4. The counters, last: a folder with trainer.json is complete.
    let json = serde_json::to_string_pretty(snap.state).map_err(|e| TrainError::Checkpoint {
        path: tmp.clone(),
        detail: format!("serialising the trainer state: {e}"),
    })?;
    write_synced(&tmp.join(STATE_FILE), json.as_bytes())?;
    crash(4)?;

    // Publish: rename the finished folder into place (replacing a same-step folder left by a
    // rollback), then make the rename durable.
    let dst = root.join(&name);
    if dst.exists() {
        let old = root.join(format!(".tmp-old-{name}-{}", std::process::id()));
        std::fs::rename(&dst, &old).map_err(|e| io(&dst, e))?;
        std::fs::rename(&tmp, &dst).map_err(|e| io(&dst, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    } else {
        std::fs::rename(&tmp, &dst).map_err(|e| io(&dst, e))?;
    }
    if let Ok(d) = std::fs::File::open(root) {
        let _ = d.sync_all();
    }
    // Keep the newest `keep_last`.
    let all = list(root)?;
    if all.len() > keep_last {
        for (_, p) in &all[..all.len() - keep_last] {
            std::fs::remove_dir_all(p).map_err(|e| io(p, e))?;
        }
    }
    Ok(dst)
}

/// Temporary folders of interrupted saves (by this or an earlier process).
fn remove_stale_temporaries(root: &Path) -> Result<()> {
    for entry in std::fs::read_dir(root).map_err(|e| TrainError::io(root, e))? {
        let entry = entry.map_err(|e| TrainError::io(root, e))?;
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let p = entry.path();
            std::fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
        }
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |e| TrainError::io(path, e);
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(TrainError::io(root, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| TrainError::io(root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("step_").and_then(|s| s.parse::<u64>().ok()) {
            if entry.path().join(STATE_FILE).is_file() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `root`.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list(root)?.pop().map(|(_, p)| p))
}

/// Read a checkpoint folder.
pub fn load(dir: &Path) -> Result<Loaded> {
    let bad = |detail: String| TrainError::Checkpoint { path: dir.to_path_buf(), detail };
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| bad(format!("{STATE_FILE}: {e}")))?;
    if state.format != FORMAT {
        return Err(bad(format!("checkpoint format {} (this build reads {FORMAT})", state.format)));
    }
    let model = OptModel::from_folder(CpuBackend::new(), dir, DType::F32)?;
    let params = model.params_f32()?;
    let model_cfg = model.cfg.clone();
    drop(model);
    let read = |name: &str| -> Result<Vec<f32>> {
        let ck = Checkpoint::open(&dir.join(format!("{name}.safetensors")))?;
        let t = ck.tensor(name)?;
        if t.shape != [params.len()] {
            return Err(bad(format!(
                "{name}.safetensors: shape {:?}, the model has {} parameters",
                t.shape,
                params.len()
            )));
        }
        let mut out = vec![0f32; params.len()];
        t.read_f32_into(&mut out)?;
        Ok(out)
    };
    let (m, v) = (read("exp_avg")?, read("exp_avg_sq")?);
    Ok(Loaded { dir: dir.to_path_buf(), state, model_cfg, params, m, v })
}

/// Serde for f64 fields that must survive a save/load bit for bit: written as Rust's shortest
/// round-trip decimal string and read with Rust's correctly rounded parser (serde_json's float
/// parsing is only best-effort without its `float_roundtrip` feature).
pub mod exact_f64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{x:?}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<f64>().map_err(serde::de::Error::custom)
    }
}
