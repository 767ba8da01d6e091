//! Applying Megatron tensor parallelism to an `OptModel`: slice its weights for one rank and
//! attach the collectives the model calls at its hook points (`opt_model::parallel`).

use std::path::Path;
use std::sync::Arc;

use opt_checkpoint::Checkpoint;
use opt_model::{HostReduce, OptConfig, OptModel, ParallelHooks, ParamLayout};
use opt_tensor::{Backend, Buffer, DType, ViewMut};

use crate::comm::{Communicator, ReduceOp};
use crate::plan::{copy_slice, shard_params, split_of};
use crate::{DistError, Result};

/// [`ParallelHooks`] over a tensor-parallel group. Buffers are staged through the host, which
/// costs nothing on the CPU backend; a GPU run would hand NCCL device pointers instead.
pub struct TpHooks {
    pub comm: Arc<dyn Communicator>,
}

fn model_err(e: crate::DistError) -> opt_model::ModelError {
    opt_model::ModelError::Input(format!("tensor-parallel collective failed: {e}"))
}

impl<B: Backend> ParallelHooks<B> for TpHooks {
    fn tp_rank(&self) -> usize {
        self.comm.rank()
    }
    fn tp_size(&self) -> usize {
        self.comm.size()
    }
    fn all_reduce_sum(&self, be: &B, x: ViewMut<'_, B::Buf>) -> opt_model::Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let mut host = be.to_f32(x.as_view())?;
        self.comm.all_reduce(&mut host, ReduceOp::Sum).map_err(model_err)?;
        be.copy(x, be.from_f32(&host, DType::F32)?.v())?;
        Ok(())
    }
    fn all_reduce_host(&self, x: &mut [f32], op: HostReduce) -> opt_model::Result<()> {
        let op = match op {
            HostReduce::Sum => ReduceOp::Sum,
            HostReduce::Max => ReduceOp::Max,
        };
        self.comm.all_reduce(x, op).map_err(model_err)
    }
    fn all_gather_host(&self, x: &[f32]) -> opt_model::Result<Vec<f32>> {
        let mut out = vec![0f32; x.len() * self.comm.size()];
        self.comm.all_gather(x, &mut out).map_err(model_err)?;
        Ok(out)
    }
}

/// Turn a whole model into this rank's tensor-parallel shard: weights sliced as metaseq's
/// `reshard_mp` does, the layout set to [`ParamLayout::sharded`], and hooks over `tp`. With a
/// group of one the model is returned unchanged (apart from the no-op hooks being absent).
pub fn parallelize<B: Backend + 'static>(model: OptModel<B>, tp: Arc<dyn Communicator>) -> Result<OptModel<B>> {
    if tp.size() == 1 {
        return Ok(model);
    }
    if model.is_quantized() {
        return Err(crate::DistError::Config {
            key: "tp",
            detail: "tensor parallelism over an int8-quantized model is not supported".into(),
        });
    }
    let full = model.params_f32()?;
    let dtype = model.dtype();
    let local = shard_params(&model.cfg, &full, tp.size(), tp.rank())?;
    from_shard(model.backend, model.cfg, &local, dtype, tp)
}

/// Build a rank's shard model from already-sliced parameters (e.g. a sharded checkpoint).
pub fn from_shard<B: Backend + 'static>(
    backend: B,
    cfg: opt_model::OptConfig,
    local: &[f32],
    dtype: DType,
    tp: Arc<dyn Communicator>,
) -> Result<OptModel<B>> {
    from_shard_with(backend, cfg, local, dtype, tp, false)
}

/// [`from_shard`]; with `streamed`, the model holds only the non-layer parameters and one layer
/// slot (`ParamLayout::streamed`, for FSDP / ZeRO-3): `local` is the shard (whose layers are
/// not uploaded) or already its streamed buffer.
pub fn from_shard_with<B: Backend + 'static>(
    backend: B,
    cfg: opt_model::OptConfig,
    local: &[f32],
    dtype: DType,
    tp: Arc<dyn Communicator>,
    streamed: bool,
) -> Result<OptModel<B>> {
    let layout = ParamLayout::sharded(&cfg, tp.size());
    // A streamed model may also be given its streamed buffer directly.
    if streamed && local.len() == layout.streamed().total() && local.len() != layout.total() {
        let params = backend.from_f32(local, dtype)?;
        let hooks: Option<Arc<dyn ParallelHooks<B>>> =
            if tp.size() > 1 { Some(Arc::new(TpHooks { comm: tp })) } else { None };
        return Ok(OptModel { cfg, layout: layout.streamed(), params, backend, hooks, quant: None });
    }
    if local.len() != layout.total() {
        return Err(crate::DistError::Config {
            key: "tp",
            detail: format!("shard holds {} parameters, tp = {} needs {}", local.len(), tp.size(), layout.total()),
        });
    }
    let (layout, params) = if streamed {
        (layout.streamed(), backend.from_f32(&layout.streamed_host(local), dtype)?)
    } else {
        let params = backend.from_f32(local, dtype)?;
        (layout, params)
    };
    let hooks: Option<Arc<dyn ParallelHooks<B>>> =
        if tp.size() > 1 { Some(Arc::new(TpHooks { comm: tp })) } else { None };
    Ok(OptModel { cfg, layout, params, backend, hooks, quant: None })
}

/// Load this rank's tensor-parallel shard of the model folder `dir` without ever holding the
/// whole model: an HF folder (any layout `opt-checkpoint` reads) is read one tensor at a time and
/// sliced (peak host memory: the shard plus the largest tensor, the embedding); a folder of
/// `model-tpXX-of-YY.safetensors` shards written at this `tp` is read as is. With a group of
/// one this is `OptModel::from_folder`.
pub fn load_shard_model<B: Backend + 'static>(
    backend: B,
    dir: &Path,
    dtype: DType,
    tp: Arc<dyn Communicator>,
) -> Result<OptModel<B>> {
    let (n, rank) = (tp.size(), tp.rank());
    if n == 1 && !dir.join("parallel.json").exists() {
        return Ok(OptModel::from_folder(backend, dir, dtype)?);
    }
    let sharded = dir.join("parallel.json").exists();
    let cfg = if sharded { crate::checkpoint::read_meta(dir)?.0 } else { OptConfig::from_path(dir)? };
    // Before reading any weights: heads and ffn_dim must split over the group.
    crate::ParallelPlan { tp: n, fsdp: 1, dp: 1 }.validate(n, &cfg)?;
    let local = if sharded {
        let meta = crate::checkpoint::read_meta(dir)?.1;
        if meta.tp != n {
            return Err(DistError::Config {
                key: "tp",
                detail: format!(
                    "{} holds tensor-parallel shards for tp = {}, not {n} (rewrite them with `opt-rs checkpoint \
                     reshard {} OUT --tp {n}`)",
                    dir.display(),
                    meta.tp,
                    dir.display()
                ),
            });
        }
        crate::checkpoint::load_shard(dir, &cfg, n, rank)?
    } else {
        slice_checkpoint(&cfg, &Checkpoint::open(dir)?, n, rank)?
    };
    backend.set_mixed_precision((dtype != DType::F32).then_some(dtype));
    from_shard(backend, cfg, &local, dtype, tp)
}

/// Slice `tp_rank`'s parameters out of a whole-model checkpoint, tensor by tensor.
fn slice_checkpoint(cfg: &OptConfig, ck: &Checkpoint, tp: usize, tp_rank: usize) -> Result<Vec<f32>> {
    let whole = ParamLayout::new(cfg);
    let local = ParamLayout::sharded(cfg, tp);
    let mut out = vec![0f32; local.total()];
    let mut full = Vec::new();
    for (w, l) in whole.specs.iter().zip(&local.specs) {
        let t = opt_model::io::find_tensor(ck, &w.name, cfg.tie_word_embeddings)?;
        if t.shape != w.shape.as_slice() {
            return Err(DistError::File {
                path: t.file.to_path_buf(),
                detail: format!("tensor '{}': shape {:?}, but the config needs {:?}", t.name, t.shape, w.shape),
            });
        }
        full.resize(w.numel(), 0f32);
        t.read_f32_into(&mut full)?;
        let dst = &mut out[l.offset..l.offset + l.numel()];
        copy_slice(split_of(&w.name), &w.shape, &l.shape, tp_rank, &full, dst, true);
    }
    Ok(out)
}
