//! NCCL through cudarc (feature `nccl`; libnccl is opened at run time, so this builds without
//! CUDA). One process per GPU. The unique id is made by rank 0 and shared through a bootstrap
//! [`Communicator`] (MPI or the TCP rendezvous); sub-groups get their own NCCL communicator
//! the same way over the bootstrap's split.
//!
//! The [`Communicator`] interface takes host slices, so these collectives stage through device
//! buffers: correct, and enough for the CPU-hosted parameter shards of `sharded`; a GPU
//! training path would call [`NcclComm::inner`] on its device buffers directly.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp as NcclOp};

use crate::comm::{check_gather, Communicator, ReduceOp};
use crate::{DistError, Result};

pub struct NcclComm {
    comm: Mutex<Comm>,
    stream: Arc<CudaStream>,
    bootstrap: Arc<dyn Communicator>,
    rank: usize,
    size: usize,
}

// SAFETY: the NCCL communicator is only used under the mutex, one collective at a time.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

fn err(op: &'static str, e: impl std::fmt::Debug) -> DistError {
    DistError::Collective { op, detail: format!("NCCL/CUDA: {e:?}") }
}

impl NcclComm {
    /// Open NCCL on GPU `ordinal` for the ranks of `bootstrap` (same ranks, same order).
    pub fn new(ordinal: usize, bootstrap: Arc<dyn Communicator>) -> Result<NcclComm> {
        let ctx = CudaContext::new(ordinal).map_err(|e| err("init", e))?;
        Self::on_stream(ctx.default_stream(), bootstrap)
    }

    fn on_stream(stream: Arc<CudaStream>, bootstrap: Arc<dyn Communicator>) -> Result<NcclComm> {
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        let mut bytes = if rank == 0 {
            let id = Id::new().map_err(|e| err("unique id", e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        bootstrap.broadcast_bytes(&mut bytes, 0)?;
        let mut raw = [0 as std::ffi::c_char; 128];
        if bytes.len() != raw.len() {
            return Err(err("unique id", format!("{} bytes received", bytes.len())));
        }
        for (r, b) in raw.iter_mut().zip(&bytes) {
            *r = *b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), rank, size, Id::uninit(raw)).map_err(|e| err("init", e))?;
        Ok(NcclComm { comm: Mutex::new(comm), stream, bootstrap, rank, size })
    }

    /// The cudarc communicator, for collectives on device buffers.
    pub fn inner(&self) -> std::sync::MutexGuard<'_, Comm> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn op(op: ReduceOp) -> NcclOp {
        match op {
            ReduceOp::Sum => NcclOp::Sum,
            ReduceOp::Max => NcclOp::Max,
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce(&self, x: &mut [f32], op: ReduceOp) -> Result<()> {
        let s = &self.stream;
        let mut d = s.clone_htod(x).map_err(|e| err("all_reduce", e))?;
        self.inner().all_reduce_in_place(&mut d, &Self::op(op)).map_err(|e| err("all_reduce", e))?;
        let h = s.clone_dtoh(&d).map_err(|e| err("all_reduce", e))?;
        x.copy_from_slice(&h);
        Ok(())
    }
    fn all_gather(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_gather("all_gather", self.size, x.len(), out.len())?;
        let s = &self.stream;
        let d = s.clone_htod(x).map_err(|e| err("all_gather", e))?;
        let mut o = s.alloc_zeros::<f32>(out.len()).map_err(|e| err("all_gather", e))?;
        self.inner().all_gather(&d, &mut o).map_err(|e| err("all_gather", e))?;
        out.copy_from_slice(&s.clone_dtoh(&o).map_err(|e| err("all_gather", e))?);
        Ok(())
    }
    fn reduce_scatter(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_gather("reduce_scatter", self.size, out.len(), x.len())?;
        let s = &self.stream;
        let d = s.clone_htod(x).map_err(|e| err("reduce_scatter", e))?;
        let mut o = s.alloc_zeros::<f32>(out.len()).map_err(|e| err("reduce_scatter", e))?;
        self.inner().reduce_scatter(&d, &mut o, &NcclOp::Sum).map_err(|e| err("reduce_scatter", e))?;
        out.copy_from_slice(&s.clone_dtoh(&o).map_err(|e| err("reduce_scatter", e))?);
        Ok(())
    }
    fn broadcast(&self, x: &mut [f32], root: usize) -> Result<()> {
        let s = &self.stream;
        let mut d = s.clone_htod(x).map_err(|e| err("broadcast", e))?;
        self.inner().broadcast_in_place(&mut d, root as i32).map_err(|e| err("broadcast", e))?;
        x.copy_from_slice(&s.clone_dtoh(&d).map_err(|e| err("broadcast", e))?);
        Ok(())
    }
    fn broadcast_bytes(&self, x: &mut Vec<u8>, root: usize) -> Result<()> {
        // Control data: over the bootstrap, not the GPU.
        self.bootstrap.broadcast_bytes(x, root)
    }
    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>> {
        let sub = self.bootstrap.split(color, key)?;
        Ok(Arc::new(NcclComm::on_stream(self.stream.clone(), sub)?))
    }
    fn describe(&self) -> String {
        format!("nccl {}/{}", self.rank, self.size)
    }
}
