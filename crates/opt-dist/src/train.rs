//! opt-train's trainer, sharded: [`MeshParallel`] implements `opt_train::parallel::Parallel`
//! over a [`Mesh`], so `Trainer::new_parallel` runs the whole recipe (data pipeline, schedule,
//! guards, fp16 scaling, logbook, checkpoints) on one rank of a `tp × fsdp × dp` layout; and
//! [`reshard`] rewrites its checkpoints at another layout.
//!
//! A rank's share of the work:
//! - tensor parallel: the model is this tp rank's Megatron slice (`plan::shard_params`) with the
//!   [`TpHooks`](crate::TpHooks) collectives; its flat buffer has `ParamLayout::sharded`'s layout;
//! - fsdp: the slice's flat buffer is cut into `fsdp` windows of `ceil(n / fsdp)` (the last one
//!   shorter); a rank keeps its window's f32 master weights and AdamW moments and reduce-scatters
//!   the gradient into it. With `reshard_after_forward` (ZeRO-3) the model holds one layer at a
//!   time, gathered over the windows it spans ([`Parallel::gather_range`], an all-gather with
//!   per-rank counts); otherwise (ZeRO-2) the whole slice is all-gathered after the update and
//!   kept, and layers are copied out of it. Either way each layer's gradient is
//!   reduce-scattered right after its backward ([`Parallel::reduce_range`]);
//! - dp: the window's gradient is then all-reduced over the replicas.
//!
//! The gradient norm counts tensor-parallel-replicated tensors (LayerNorms, biases of row-split
//! layers, positions) on tp rank 0 only, and is summed over the ranks of one replica.

use std::path::Path;

use opt_checkpoint::Checkpoint;
use opt_model::{OptConfig, OptModel, ParamLayout};
use opt_tensor::{Backend, DType};
use opt_train::checkpoint::{self as tck, Part, ShardedMeta, Snapshot, SHARD_TENSORS};
use opt_train::parallel::{Parallel, RankInfo};
use opt_train::TrainConfig;

use crate::comm::ReduceOp;
use crate::plan::{copy_slice, shard_params, split_of, Mesh, ParallelPlan, Split};
use crate::{DistError, Result};

type TResult<T> = opt_train::Result<T>;

/// The `[parallel]` layout of a training run, over its communicators.
pub struct MeshParallel {
    pub mesh: Mesh,
}

impl MeshParallel {
    pub fn new(mesh: Mesh) -> Self {
        MeshParallel { mesh }
    }
}

/// The window `[lo, hi)` fsdp rank `f` of `k` owns in a slice of `n` parameters.
pub fn window(n: usize, k: usize, f: usize) -> (usize, usize) {
    let shard = n.div_ceil(k.max(1));
    let lo = (f * shard).min(n);
    (lo, (lo + shard).min(n))
}

/// The flat layout of one tensor-parallel slice.
pub fn slice_layout(cfg: &OptConfig, tp: usize) -> ParamLayout {
    if tp == 1 {
        ParamLayout::new(cfg)
    } else {
        ParamLayout::sharded(cfg, tp)
    }
}

impl MeshParallel {
    fn shard_len(&self, n: usize) -> usize {
        n.div_ceil(self.mesh.plan.fsdp)
    }

    /// How many elements of `[a, b)` each fsdp rank's window holds.
    fn range_counts(&self, n: usize, (a, b): (usize, usize)) -> Vec<usize> {
        let k = self.mesh.plan.fsdp;
        (0..k)
            .map(|f| {
                let (lo, hi) = window(n, k, f);
                b.min(hi).saturating_sub(a.max(lo))
            })
            .collect()
    }
}

impl<B: Backend + 'static> Parallel<B> for MeshParallel {
    fn info(&self) -> RankInfo {
        let (p, c) = (&self.mesh.plan, &self.mesh.coords);
        RankInfo {
            rank: self.mesh.world.rank(),
            world: self.mesh.world.size(),
            tp: p.tp,
            tp_rank: c.tp,
            fsdp: p.fsdp,
            fsdp_rank: c.fsdp,
            dp: p.dp,
            dp_rank: c.dp,
        }
    }

    fn check_model(&self, cfg: &OptConfig) -> TResult<()> {
        Ok(self.mesh.plan.validate(self.mesh.world.size(), cfg)?)
    }

    fn layout(&self, cfg: &OptConfig) -> ParamLayout {
        slice_layout(cfg, self.mesh.plan.tp)
    }

    fn slice_flat(&self, cfg: &OptConfig, full: &[f32]) -> TResult<Vec<f32>> {
        if self.mesh.plan.tp == 1 {
            return Ok(full.to_vec());
        }
        Ok(shard_params(cfg, full, self.mesh.plan.tp, self.mesh.coords.tp)?)
    }

    fn model_from_slice(
        &self,
        backend: B,
        cfg: OptConfig,
        slice: &[f32],
        dtype: DType,
        streamed: bool,
    ) -> TResult<OptModel<B>> {
        Ok(crate::tensor_parallel::from_shard_with(backend, cfg, slice, dtype, self.mesh.tp.clone(), streamed)?)
    }

    fn window(&self, n: usize) -> (usize, usize) {
        window(n, self.mesh.plan.fsdp, self.mesh.coords.fsdp)
    }

    fn sum_over_data(&self, x: &mut [f32]) -> TResult<()> {
        Ok(self.mesh.data.all_reduce(x, ReduceOp::Sum)?)
    }

    fn reduce_grads(&self, grads: &[f32]) -> TResult<Vec<f32>> {
        let n = grads.len();
        let shard = self.shard_len(n);
        let mut padded = grads.to_vec();
        padded.resize(shard * self.mesh.plan.fsdp, 0.0);
        let mut mine = vec![0f32; shard];
        self.mesh.fsdp.reduce_scatter(&padded, &mut mine)?;
        self.mesh.dp.all_reduce(&mut mine, ReduceOp::Sum)?;
        let (lo, hi) = window(n, self.mesh.plan.fsdp, self.mesh.coords.fsdp);
        mine.truncate(hi - lo);
        Ok(mine)
    }

    fn grad_sum_squares(&self, layout: &ParamLayout, w: &[f32]) -> TResult<f64> {
        let (lo, hi) = window(layout.total(), self.mesh.plan.fsdp, self.mesh.coords.fsdp);
        let mut local = 0f64;
        for s in &layout.specs {
            // Every tp slice holds a replicated tensor whole: count it on tp rank 0 only.
            if split_of(&s.name) == Split::Replicated && self.mesh.coords.tp != 0 {
                continue;
            }
            let (a, b) = (s.offset.max(lo), (s.offset + s.numel()).min(hi));
            if a < b {
                local += w[a - lo..b - lo].iter().map(|&x| x as f64 * x as f64).sum::<f64>();
            }
        }
        // Sum over one replica's ranks (its fsdp windows, then its tp slices); replicas agree.
        let mut x = [local as f32];
        self.mesh.fsdp.all_reduce(&mut x, ReduceOp::Sum)?;
        self.mesh.tp.all_reduce(&mut x, ReduceOp::Sum)?;
        Ok(x[0] as f64)
    }

    fn gather(&self, w: &[f32], n: usize) -> TResult<Vec<f32>> {
        let k = self.mesh.plan.fsdp;
        let shard = self.shard_len(n);
        let mut mine = w.to_vec();
        mine.resize(shard, 0.0);
        let mut full = vec![0f32; shard * k];
        self.mesh.fsdp.all_gather(&mine, &mut full)?;
        full.truncate(n);
        Ok(full)
    }

    fn gather_range(&self, mine: &[f32], n: usize, range: (usize, usize)) -> TResult<Vec<f32>> {
        let counts = self.range_counts(n, range);
        let mut out = vec![0f32; range.1 - range.0];
        self.mesh.fsdp.all_gather_v(mine, &counts, &mut out)?;
        Ok(out)
    }

    fn reduce_range(&self, grads: &[f32], n: usize, range: (usize, usize)) -> TResult<Vec<f32>> {
        let counts = self.range_counts(n, range);
        let mut out = vec![0f32; counts[self.mesh.coords.fsdp]];
        self.mesh.fsdp.reduce_scatter_v(grads, &counts, &mut out)?;
        Ok(out)
    }

    fn sum_over_replicas(&self, x: &mut [f32]) -> TResult<()> {
        Ok(self.mesh.dp.all_reduce(x, ReduceOp::Sum)?)
    }

    fn any(&self, flag: bool) -> TResult<bool> {
        let mut x = [if flag { 1f32 } else { 0.0 }];
        self.mesh.world.all_reduce(&mut x, ReduceOp::Max)?;
        Ok(x[0] > 0.0)
    }

    fn barrier(&self) -> TResult<()> {
        Ok(self.mesh.world.barrier()?)
    }
}

fn file_err(path: &Path, detail: impl ToString) -> DistError {
    DistError::File { path: path.to_path_buf(), detail: detail.to_string() }
}

/// A training checkpoint folder opened for reading tensor by tensor.
struct Source {
    cfg: OptConfig,
    kind: SourceKind,
}

enum SourceKind {
    /// One process: `model.safetensors` (HF names) + flat `exp_avg` / `exp_avg_sq`.
    Whole { model: Checkpoint, moments: [Checkpoint; 2] },
    /// `files[t][f]`; `starts[f]`: where window f begins in its slice.
    Sharded { tp: usize, files: Vec<Vec<Checkpoint>>, starts: Vec<usize> },
}

fn read_range(path: &Path, bytes: &[u8], a: usize, b: usize, out: &mut [f32]) -> Result<()> {
    let src = bytes.get(a * 4..b * 4).ok_or_else(|| file_err(path, format!("range {a}..{b} past the tensor's end")))?;
    for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}

impl Source {
    fn open(dir: &Path) -> Result<Source> {
        let cfg = OptConfig::from_path(dir)?;
        let kind = match tck::sharded_meta(dir)? {
            None => SourceKind::Whole {
                model: Checkpoint::open(&dir.join("model.safetensors"))?,
                moments: [
                    Checkpoint::open(&dir.join("exp_avg.safetensors"))?,
                    Checkpoint::open(&dir.join("exp_avg_sq.safetensors"))?,
                ],
            },
            Some(meta) => {
                let mut files = Vec::with_capacity(meta.tp);
                let mut starts = vec![0usize; meta.fsdp + 1];
                for t in 0..meta.tp {
                    let mut row = Vec::with_capacity(meta.fsdp);
                    for f in 0..meta.fsdp {
                        let ck = Checkpoint::open(&tck::shard_path(dir, t, f))?;
                        let len = ck.tensor("params")?.numel();
                        if t == 0 {
                            starts[f + 1] = starts[f] + len;
                        }
                        row.push(ck);
                    }
                    files.push(row);
                }
                if starts[meta.fsdp] != meta.slice_len {
                    return Err(file_err(
                        dir,
                        format!(
                            "shards hold {} parameters per slice, parallel.json says {}",
                            starts[meta.fsdp], meta.slice_len
                        ),
                    ));
                }
                SourceKind::Sharded { tp: meta.tp, files, starts }
            }
        };
        Ok(Source { cfg, kind })
    }

    /// Whole tensor `idx` of `ParamLayout::new` (its `part`), assembled from the source.
    fn tensor(&self, part: Part, idx: usize) -> Result<Vec<f32>> {
        let whole = ParamLayout::new(&self.cfg);
        let w = &whole.specs[idx];
        let mut full = vec![0f32; w.numel()];
        match &self.kind {
            SourceKind::Whole { model, moments } => match part {
                Part::Params => {
                    let name = if w.name.starts_with("lm_head") { w.name.clone() } else { format!("model.{}", w.name) };
                    let t = model.tensor(&name)?;
                    if t.shape != w.shape.as_slice() {
                        return Err(file_err(t.file, format!("{name}: shape {:?}, expected {:?}", t.shape, w.shape)));
                    }
                    t.read_f32_into(&mut full)?;
                }
                Part::ExpAvg | Part::ExpAvgSq => {
                    let (ck, name) =
                        if part == Part::ExpAvg { (&moments[0], "exp_avg") } else { (&moments[1], "exp_avg_sq") };
                    let t = ck.tensor(name)?;
                    read_range(t.file, t.bytes, w.offset, w.offset + w.numel(), &mut full)?;
                }
            },
            SourceKind::Sharded { tp, files, starts } => {
                let name = SHARD_TENSORS.iter().find(|(p, _)| *p == part).map(|(_, n)| *n).unwrap_or("params");
                let local = slice_layout(&self.cfg, *tp);
                let l = &local.specs[idx];
                for (r, row) in files.iter().enumerate() {
                    // This slice's part of the tensor, read from the windows it spans.
                    let mut piece = vec![0f32; l.numel()];
                    let (a, b) = (l.offset, l.offset + l.numel());
                    for (f, ck) in row.iter().enumerate() {
                        let (lo, hi) = (starts[f].max(a), starts[f + 1].min(b));
                        if lo < hi {
                            let t = ck.tensor(name)?;
                            read_range(t.file, t.bytes, lo - starts[f], hi - starts[f], &mut piece[lo - a..hi - a])?;
                        }
                    }
                    if split_of(&w.name) == Split::Replicated && r > 0 {
                        continue;
                    }
                    copy_slice(split_of(&w.name), &w.shape, &l.shape, r, &piece, &mut full, false);
                }
            }
        }
        Ok(full)
    }

    /// Tensor `idx`'s slice for tp rank `t` of `tp` (layout `slice_layout(cfg, tp)`).
    fn slice(&self, part: Part, idx: usize, tp: usize, t: usize) -> Result<Vec<f32>> {
        let full = self.tensor(part, idx)?;
        if tp == 1 {
            return Ok(full);
        }
        let w = &ParamLayout::new(&self.cfg).specs[idx];
        let l = &ParamLayout::sharded(&self.cfg, tp).specs[idx];
        let mut out = vec![0f32; l.numel()];
        copy_slice(split_of(&w.name), &w.shape, &l.shape, t, &full, &mut out, true);
        Ok(out)
    }

    /// Window `[lo, hi)` of tp slice `t`'s flat buffer (`part`), tensor by tensor.
    fn window(&self, part: Part, tp: usize, t: usize, (lo, hi): (usize, usize)) -> Result<Vec<f32>> {
        let layout = slice_layout(&self.cfg, tp);
        let mut out = vec![0f32; hi - lo];
        for (idx, s) in layout.specs.iter().enumerate() {
            let (a, b) = (s.offset.max(lo), (s.offset + s.numel()).min(hi));
            if a >= b {
                continue;
            }
            let x = self.slice(part, idx, tp, t)?;
            out[a - lo..b - lo].copy_from_slice(&x[a - s.offset..b - s.offset]);
        }
        Ok(out)
    }
}

/// The whole model's parameters (`ParamLayout::new` order) of a training checkpoint folder,
/// one-process or sharded, assembled tensor by tensor, and its config.
pub fn consolidated_params(src: &Path) -> Result<(OptConfig, Vec<f32>)> {
    let source = Source::open(src)?;
    let n = ParamLayout::new(&source.cfg).total();
    let params = source.window(Part::Params, 1, 0, (0, n))?;
    Ok((source.cfg, params))
}

/// Rewrite the training checkpoint folder `src` (one-process or sharded) at `tp × fsdp` into the
/// new folder `dst`: parameters and AdamW moments, the trainer state as it was, and the saved
/// `config.toml` with its `[parallel]` set to the new layout (dp kept). `tp = fsdp = 1` writes the
/// one-process form (an HF model folder that `opt-rs score` and `export` read too).
///
/// It works one output window and one tensor at a time, so it needs about one rank's share of
/// memory (plus the largest tensor), never the whole model's state at once — except for the
/// one-process form, which is one buffer of the whole model at a time.
pub fn reshard(src: &Path, dst: &Path, tp: usize, fsdp: usize) -> Result<()> {
    let source = Source::open(src)?;
    let cfg = &source.cfg;
    let state = tck::read_state(src)?;
    let old_meta = tck::sharded_meta(src)?;
    let dp = old_meta.as_ref().map_or(1, |m| m.dp);
    ParallelPlan { tp, fsdp, dp: 1 }.validate(tp * fsdp, cfg)?;
    if dst.exists() {
        return Err(file_err(dst, "already exists; choose a new folder"));
    }
    let toml_path = src.join("config.toml");
    let old_toml = std::fs::read_to_string(&toml_path).map_err(|e| file_err(&toml_path, e))?;
    let sets = [format!("parallel.tp={tp}"), format!("parallel.fsdp={fsdp}"), format!("parallel.dp={dp}")];
    let config_toml = TrainConfig::from_parts(Some((&old_toml, &toml_path.display().to_string())), &sets)?.to_toml()?;

    if tp == 1 && fsdp == 1 {
        let n = ParamLayout::new(cfg).total();
        let mut fetch = |part: Part| -> opt_train::Result<Vec<f32>> { Ok(source.window(part, 1, 0, (0, n))?) };
        let mut snap = Snapshot { state: &state, model_cfg: cfg, config_toml: &config_toml, fetch: &mut fetch };
        tck::save_to(dst, &mut snap)?;
        return Ok(());
    }
    // Write into a temporary folder beside dst, renamed when complete.
    let parent = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
    let n = slice_layout(cfg, tp).total();
    for t in 0..tp {
        for f in 0..fsdp {
            let w = window(n, fsdp, f);
            // One window of one part in memory at a time.
            let mut failed = None;
            let r = tck::write_shard(&tck::shard_path(&tmp, t, f), w.1 - w.0, &mut |p| {
                source.window(p, tp, t, w).map_err(|e| {
                    let text = e.to_string();
                    failed = Some(e);
                    opt_train::TrainError::Checkpoint { path: tmp.clone(), detail: text }
                })
            });
            if let (Err(_), Some(e)) = (&r, failed) {
                return Err(e);
            }
            r?;
        }
    }
    tck::write_sharded_common(&tmp, cfg, &ShardedMeta::new(tp, fsdp, dp, n), &config_toml, &state)?;
    std::fs::rename(&tmp, dst).map_err(|e| file_err(dst, e))?;
    Ok(())
}
