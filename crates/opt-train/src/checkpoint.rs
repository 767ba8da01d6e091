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
//! A multi-rank run (`[parallel]`) writes the same folder in its sharded form instead: each
//! shard of the layout writes `shard-tpTT-fsdpFFF.safetensors` (the flat `params`, `exp_avg`
//! and `exp_avg_sq` of its window of its tensor-parallel slice, see [`crate::parallel`]), and
//! rank 0 writes `config.json` (the whole model's config), `config.toml`, `trainer.json` and
//! `parallel.json` ([`ShardedMeta`]). Such a folder resumes at the same `tp` and `fsdp` (any
//! `dp`); `opt-rs checkpoint reshard` rewrites it at another layout, `--tp 1 --fsdp 1` giving
//! the one-process form above.
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
use crate::parallel::RankInfo;
use crate::{Result, TrainError};

pub const CHECKPOINTS: &str = "checkpoints";
const STATE_FILE: &str = "trainer.json";
const MOMENTS: [(Part, &str); 2] = [(Part::ExpAvg, "exp_avg"), (Part::ExpAvgSq, "exp_avg_sq")];
const FORMAT: u32 = 1;
/// The layout file of a sharded checkpoint.
pub const SHARDED_META: &str = "parallel.json";
const SHARDED_FORMAT: &str = "opt-rs sharded training checkpoint v1";
/// The flat tensors of a shard file, in [`Part`] order.
pub const SHARD_TENSORS: [(Part, &str); 3] =
    [(Part::Params, "params"), (Part::ExpAvg, "exp_avg"), (Part::ExpAvgSq, "exp_avg_sq")];

/// `parallel.json` of a sharded checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardedMeta {
    pub format: String,
    pub tp: usize,
    pub fsdp: usize,
    /// The replicated degree of the run that wrote it (informational: any dp resumes it).
    pub dp: usize,
    /// Parameters in one tensor-parallel slice's flat buffer; shard `f` of a slice holds the
    /// next contiguous window of it, in fsdp order (the lengths are the files' tensor shapes).
    pub slice_len: usize,
}

impl ShardedMeta {
    pub fn new(tp: usize, fsdp: usize, dp: usize, slice_len: usize) -> Self {
        ShardedMeta { format: SHARDED_FORMAT.into(), tp, fsdp, dp, slice_len }
    }
}

/// The file of shard `(tp_rank, fsdp_rank)` in a sharded checkpoint folder.
pub fn shard_path(dir: &Path, tp_rank: usize, fsdp_rank: usize) -> PathBuf {
    dir.join(format!("shard-tp{tp_rank:02}-fsdp{fsdp_rank:03}.safetensors"))
}

/// The layout of a sharded checkpoint folder, or `None` for a one-process one.
pub fn sharded_meta(dir: &Path) -> Result<Option<ShardedMeta>> {
    let p = dir.join(SHARDED_META);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrainError::io(&p, e)),
    };
    let meta: ShardedMeta = serde_json::from_str(&text)
        .map_err(|e| TrainError::Checkpoint { path: p.clone(), detail: format!("{SHARDED_META}: {e}") })?;
    if meta.format != SHARDED_FORMAT {
        return Err(TrainError::Checkpoint { path: p, detail: format!("unknown format {:?}", meta.format) });
    }
    Ok(Some(meta))
}

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
    /// `params`, `m` and `v` are this rank's window of its tensor-parallel slice (a sharded
    /// checkpoint read by [`load_shard`]), not the whole model.
    pub windowed: bool,
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
    write_parts(&tmp, snap, crash_after)?;
    let dst = root.join(&name);
    publish(root, &tmp, &dst, keep_last)?;
    Ok(dst)
}

/// Write a one-process checkpoint's files into the new folder `tmp`, `trainer.json` last.
fn write_parts(tmp: &Path, snap: &mut Snapshot<'_>, crash_after: Option<usize>) -> Result<()> {
    let io = |p: &Path, e| TrainError::io(p, e);
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(|e| io(tmp, e))?;
    }
    std::fs::create_dir_all(tmp).map_err(|e| io(tmp, e))?;
    let crash = |written: usize| -> Result<()> {
        if crash_after == Some(written) {
            return Err(TrainError::Checkpoint {
                path: tmp.to_path_buf(),
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
            path: tmp.to_path_buf(),
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
    let hf = serde_json::to_string_pretty(&snap.model_cfg.to_hf_json(DType::F32)).map_err(|e| {
        TrainError::Checkpoint { path: tmp.to_path_buf(), detail: format!("serialising config.json: {e}") }
    })?;
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
        path: tmp.to_path_buf(),
        detail: format!("serialising the trainer state: {e}"),
    })?;
    write_synced(&tmp.join(STATE_FILE), json.as_bytes())?;
    crash(4)
}

/// Rename the finished folder `tmp` to `dst` (replacing a same-step folder left by a rollback),
/// make the rename durable, and keep the newest `keep_last` checkpoints under `root`.
fn publish(root: &Path, tmp: &Path, dst: &Path, keep_last: usize) -> Result<()> {
    let io = |p: &Path, e| TrainError::io(p, e);
    if dst.exists() {
        let name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let old = root.join(format!(".tmp-old-{name}-{}", std::process::id()));
        std::fs::rename(dst, &old).map_err(|e| io(dst, e))?;
        std::fs::rename(tmp, dst).map_err(|e| io(dst, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    } else {
        std::fs::rename(tmp, dst).map_err(|e| io(dst, e))?;
    }
    if let Ok(d) = std::fs::File::open(root) {
        let _ = d.sync_all();
    }
    let all = list(root)?;
    if all.len() > keep_last {
        for (_, p) in &all[..all.len() - keep_last] {
            std::fs::remove_dir_all(p).map_err(|e| io(p, e))?;
        }
    }
    Ok(())
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
    if let Some(meta) = sharded_meta(dir)? {
        return Err(bad(format!(
            "written by a sharded run (parallel.tp = {}, parallel.fsdp = {}); resume it with that layout, or \
             rewrite it for one process with `opt-rs checkpoint reshard {} OUT --tp 1 --fsdp 1`",
            meta.tp,
            meta.fsdp,
            dir.display()
        )));
    }
    let state = read_state(dir)?;
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
    Ok(Loaded { dir: dir.to_path_buf(), state, model_cfg, params, m, v, windowed: false })
}

/// A checkpoint's `trainer.json`.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
    let bad = |detail: String| TrainError::Checkpoint { path: dir.to_path_buf(), detail };
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| bad(format!("{STATE_FILE}: {e}")))?;
    if state.format != FORMAT {
        return Err(bad(format!("checkpoint format {} (this build reads {FORMAT})", state.format)));
    }
    Ok(state)
}

/// Read one shard's window `[lo, hi)` of a sharded checkpoint written at this run's `tp` and
/// `fsdp` (`info`), whose slices hold `slice_len` parameters.
pub fn load_shard(dir: &Path, info: &RankInfo, slice_len: usize, (lo, hi): (usize, usize)) -> Result<Loaded> {
    let bad = |detail: String| TrainError::Checkpoint { path: dir.to_path_buf(), detail };
    let Some(meta) = sharded_meta(dir)? else {
        return Err(bad("not a sharded checkpoint (no parallel.json)".into()));
    };
    if (meta.tp, meta.fsdp) != (info.tp, info.fsdp) {
        return Err(bad(format!(
            "written at parallel.tp = {}, parallel.fsdp = {}, but this run has tp = {}, fsdp = {}; run with that \
             layout, or rewrite the checkpoint with `opt-rs checkpoint reshard {} OUT --tp {} --fsdp {}`",
            meta.tp,
            meta.fsdp,
            info.tp,
            info.fsdp,
            dir.display(),
            info.tp,
            info.fsdp
        )));
    }
    if meta.slice_len != slice_len {
        return Err(bad(format!(
            "its tensor-parallel slices hold {} parameters, this model's hold {slice_len}",
            meta.slice_len
        )));
    }
    let state = read_state(dir)?;
    let model_cfg = OptConfig::from_path(dir)?;
    let path = shard_path(dir, info.tp_rank, info.fsdp_rank);
    let ck = Checkpoint::open(&path)?;
    let mut parts = Vec::with_capacity(3);
    for (_, name) in SHARD_TENSORS {
        let t = ck.tensor(name)?;
        if t.shape != [hi - lo] {
            return Err(TrainError::Checkpoint {
                path: path.clone(),
                detail: format!("{name}: shape {:?}, this rank's window holds {}", t.shape, hi - lo),
            });
        }
        let mut out = vec![0f32; hi - lo];
        t.read_f32_into(&mut out)?;
        parts.push(out);
    }
    let v = parts.pop().unwrap_or_default();
    let m = parts.pop().unwrap_or_default();
    let params = parts.pop().unwrap_or_default();
    Ok(Loaded { dir: dir.to_path_buf(), state, model_cfg, params, m, v, windowed: true })
}

/// How the ranks of a sharded save keep in step: `sync(failed_here)` is a collective that
/// returns whether any rank failed (so every rank stops instead of waiting for a dead one).
pub type SyncFn<'a> = &'a mut dyn FnMut(bool) -> Result<bool>;

/// The sharded save (every rank calls it): `snap.fetch` gives this rank's windows (of
/// `window_len` values each, fetched and written one at a time); `meta` describes the layout.
pub fn save_sharded(
    root: &Path,
    snap: &mut Snapshot<'_>,
    keep_last: usize,
    info: &RankInfo,
    meta: &ShardedMeta,
    window_len: usize,
    sync: SyncFn<'_>,
) -> Result<PathBuf> {
    let name = step_name(snap.state.step);
    // One name for every rank's view of the temporary folder.
    let tmp = root.join(format!(".tmp-{name}-sharded"));
    let io = |p: &Path, e| TrainError::io(p, e);
    let phase = |r: Result<()>, sync: SyncFn<'_>| -> Result<()> {
        let failed = sync(r.is_err())?;
        r?;
        if failed {
            return Err(TrainError::Checkpoint { path: tmp.clone(), detail: "another rank failed to save".into() });
        }
        Ok(())
    };
    // 1. Rank 0 prepares the temporary folder.
    let r = (|| {
        if info.is_main() {
            std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
            remove_stale_temporaries(root)?;
            std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        Ok(())
    })();
    phase(r, sync)?;
    // 2. One replica of each shard writes its windows.
    let r = (|| {
        if !info.writes_shard() {
            return Ok(());
        }
        write_shard(&shard_path(&tmp, info.tp_rank, info.fsdp_rank), window_len, &mut |p| (snap.fetch)(p))
    })();
    phase(r, sync)?;
    // 3. Rank 0 writes the shared files, trainer.json last, and publishes the folder.
    let dst = root.join(&name);
    let r = (|| {
        if !info.is_main() {
            return Ok(());
        }
        let json = |what: &str, v: serde_json::Result<String>| {
            v.map_err(|e| TrainError::Checkpoint { path: tmp.clone(), detail: format!("serialising {what}: {e}") })
        };
        let hf = json("config.json", serde_json::to_string_pretty(&snap.model_cfg.to_hf_json(DType::F32)))?;
        write_synced(&tmp.join("config.json"), hf.as_bytes())?;
        write_synced(&tmp.join(SHARDED_META), json(SHARDED_META, serde_json::to_string_pretty(meta))?.as_bytes())?;
        write_synced(&tmp.join("config.toml"), snap.config_toml.as_bytes())?;
        write_synced(&tmp.join(STATE_FILE), json(STATE_FILE, serde_json::to_string_pretty(snap.state))?.as_bytes())?;
        publish(root, &tmp, &dst, keep_last)
    })();
    phase(r, sync)?;
    Ok(dst)
}

/// Write one shard file: the `params`, `exp_avg` and `exp_avg_sq` windows (`len` values each)
/// that `fetch` gives, one at a time, so a save holds one window's host copy at once.
pub fn write_shard(path: &Path, len: usize, fetch: &mut dyn FnMut(Part) -> Result<Vec<f32>>) -> Result<()> {
    let heads: Vec<(String, usize)> = SHARD_TENSORS.iter().map(|&(_, n)| (n.to_string(), len)).collect();
    let mut failed = None;
    let r = opt_checkpoint::save_safetensors_f32_streamed(path, &heads, &mut |i| {
        fetch(SHARD_TENSORS[i].0).map_err(|e| {
            let text = e.to_string();
            failed = Some(e);
            std::io::Error::other(text)
        })
    });
    match (r, failed) {
        (Err(_), Some(e)) => Err(e),
        (r, _) => Ok(r?),
    }
}

/// Write a finished checkpoint folder's files for a sharded layout from whole-folder parts
/// (used by resharding): the shared files. Shard files are written by the caller.
pub fn write_sharded_common(
    dir: &Path,
    model_cfg: &OptConfig,
    meta: &ShardedMeta,
    config_toml: &str,
    state: &TrainerState,
) -> Result<()> {
    let ser = |what: &str, v: serde_json::Result<String>| {
        v.map_err(|e| TrainError::Checkpoint { path: dir.to_path_buf(), detail: format!("serialising {what}: {e}") })
    };
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let hf = ser("config.json", serde_json::to_string_pretty(&model_cfg.to_hf_json(DType::F32)))?;
    write_synced(&dir.join("config.json"), hf.as_bytes())?;
    write_synced(&dir.join(SHARDED_META), ser(SHARDED_META, serde_json::to_string_pretty(meta))?.as_bytes())?;
    write_synced(&dir.join("config.toml"), config_toml.as_bytes())?;
    write_synced(&dir.join(STATE_FILE), ser(STATE_FILE, serde_json::to_string_pretty(state))?.as_bytes())
}

/// A one-process checkpoint written straight into `dir` (no temporary folder, no pruning):
/// for tools that build a checkpoint outside a run, such as resharding to one process.
pub fn save_to(dir: &Path, snap: &mut Snapshot<'_>) -> Result<()> {
    if dir.exists() {
        return Err(TrainError::Checkpoint { path: dir.to_path_buf(), detail: "already exists".into() });
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
    std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    write_parts(&tmp, snap, None)?;
    std::fs::rename(&tmp, dir).map_err(|e| TrainError::io(dir, e))
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
