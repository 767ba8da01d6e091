//! Applying Megatron tensor parallelism to an `OptModel`: slice its weights for one rank and
//! attach the collectives the model calls at its hook points (`opt_model::parallel`).

use std::sync::Arc;

use opt_model::{HostReduce, OptModel, ParallelHooks, ParamLayout};
use opt_tensor::{Backend, Buffer, DType, ViewMut};

use crate::comm::{Communicator, ReduceOp};
use crate::plan::shard_params;
use crate::Result;

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
    let layout = ParamLayout::sharded(&cfg, tp.size());
    if local.len() != layout.total() {
        return Err(crate::DistError::Config {
            key: "tp",
            detail: format!("shard holds {} parameters, tp = {} needs {}", local.len(), tp.size(), layout.total()),
        });
    }
    let params = backend.from_f32(local, dtype)?;
    let hooks: Option<Arc<dyn ParallelHooks<B>>> =
        if tp.size() > 1 { Some(Arc::new(TpHooks { comm: tp })) } else { None };
    Ok(OptModel { cfg, layout, params, backend, hooks, quant: None })
}
