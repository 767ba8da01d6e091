//! The collective interface every engine implements (MPI, NCCL, TCP, single process).
//!
//! Buffers are host `f32` slices: the CPU backend computes in them directly; a device backend
//! stages through the host, except for the NCCL engine whose device path lives in `nccl`.

use std::sync::Arc;

use crate::{DistError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

impl ReduceOp {
    pub fn apply(self, acc: &mut [f32], x: &[f32]) {
        match self {
            ReduceOp::Sum => acc.iter_mut().zip(x).for_each(|(a, b)| *a += b),
            ReduceOp::Max => acc.iter_mut().zip(x).for_each(|(a, b)| *a = a.max(*b)),
        }
    }
}

/// A group of ranks that run collectives together. Every member must call the same collectives
/// in the same order. Implementations must give every rank bit-identical results (replicated
/// parameters must stay identical across ranks), which the TCP engine guarantees by reducing
/// in rank order at one root.
pub trait Communicator: Send + Sync {
    /// This process's index in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Reduce `x` over the group, in place.
    fn all_reduce(&self, x: &mut [f32], op: ReduceOp) -> Result<()>;
    /// `out` (`size · x.len()`) = every rank's `x`, in rank order.
    fn all_gather(&self, x: &[f32], out: &mut [f32]) -> Result<()>;
    /// Sum `x` (`size · out.len()`) over the group and keep this rank's slice in `out`.
    fn reduce_scatter(&self, x: &[f32], out: &mut [f32]) -> Result<()>;
    /// Copy `root`'s `x` to every rank.
    fn broadcast(&self, x: &mut [f32], root: usize) -> Result<()>;
    /// `out` (`Σ counts`) = every rank's `x` (`counts[rank]` elements, possibly none), in rank
    /// order (`MPI_Allgatherv`). The default broadcasts each non-empty part from its owner, so
    /// every element crosses the links once, as in an all-gather.
    fn all_gather_v(&self, x: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
        check_counts("all_gather_v", self, counts, x.len(), out.len())?;
        let mut off = 0;
        for (r, &c) in counts.iter().enumerate() {
            if c > 0 {
                if r == self.rank() {
                    out[off..off + c].copy_from_slice(x);
                }
                self.broadcast(&mut out[off..off + c], r)?;
            }
            off += c;
        }
        Ok(())
    }
    /// Sum `x` (`Σ counts` elements) over the group; this rank keeps its part, the
    /// `counts[rank]` elements after `Σ counts[..rank]`, in `out` (`MPI_Reduce_scatter`). The
    /// default all-reduces each non-empty part (twice a reduce-scatter's traffic); MPI
    /// overrides it with the native call.
    fn reduce_scatter_v(&self, x: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
        check_counts("reduce_scatter_v", self, counts, out.len(), x.len())?;
        let mut off = 0;
        for (r, &c) in counts.iter().enumerate() {
            if c > 0 {
                let mut part = x[off..off + c].to_vec();
                self.all_reduce(&mut part, ReduceOp::Sum)?;
                if r == self.rank() {
                    out.copy_from_slice(&part);
                }
            }
            off += c;
        }
        Ok(())
    }
    /// Copy `root`'s bytes to every rank (lengths may differ before the call).
    fn broadcast_bytes(&self, x: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Wait until every rank got here.
    fn barrier(&self) -> Result<()> {
        let mut x = [0f32];
        self.all_reduce(&mut x, ReduceOp::Sum)
    }
    /// `MPI_Comm_split`: ranks passing the same `color` form a group, ordered by `key`.
    /// Collective over this group.
    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>>;
    /// A short description for logs ("tcp 1/4", "mpi 0/2").
    fn describe(&self) -> String;
}

/// Checks shared by implementations.
pub(crate) fn check_gather(op: &'static str, size: usize, part: usize, whole: usize) -> Result<()> {
    if part * size != whole {
        return Err(DistError::Collective {
            op,
            detail: format!("buffers of {part} and {whole} elements for a group of {size}"),
        });
    }
    Ok(())
}

/// Checks of the variable-count collectives: one count per rank, this rank's part and the
/// whole of the right lengths.
pub(crate) fn check_counts<C: Communicator + ?Sized>(
    op: &'static str,
    comm: &C,
    counts: &[usize],
    part: usize,
    whole: usize,
) -> Result<()> {
    let bad = |detail: String| Err(DistError::Collective { op, detail });
    if counts.len() != comm.size() {
        return bad(format!("{} counts for a group of {}", counts.len(), comm.size()));
    }
    if counts[comm.rank()] != part || counts.iter().sum::<usize>() != whole {
        return bad(format!(
            "rank {} passes {part} of {whole} elements, the counts {counts:?} say {} of {}",
            comm.rank(),
            counts[comm.rank()],
            counts.iter().sum::<usize>()
        ));
    }
    Ok(())
}

/// The single-process group: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelfComm;

impl Communicator for SelfComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce(&self, _x: &mut [f32], _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_gather("all_gather", 1, x.len(), out.len())?;
        out.copy_from_slice(x);
        Ok(())
    }
    fn reduce_scatter(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        check_gather("reduce_scatter", 1, out.len(), x.len())?;
        out.copy_from_slice(x);
        Ok(())
    }
    fn broadcast(&self, _x: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _x: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn split(&self, _color: usize, _key: usize) -> Result<Arc<dyn Communicator>> {
        Ok(Arc::new(SelfComm))
    }
    fn describe(&self) -> String {
        "single process".into()
    }
}

/// Split `world` into the group of ranks that share `color`, ordered by `key`, using only
/// `all_gather` (engines without a native split use this to agree on membership).
pub fn split_members(comm: &dyn Communicator, color: usize, key: usize) -> Result<Vec<usize>> {
    let n = comm.size();
    let mut all = vec![0f32; 2 * n];
    // Colors and keys are small rank arithmetic; f32 represents integers exactly below 2^24.
    if color >= 1 << 24 || key >= 1 << 24 {
        return Err(DistError::Collective { op: "split", detail: format!("color {color} / key {key} too large") });
    }
    comm.all_gather(&[color as f32, key as f32], &mut all)?;
    let mut members: Vec<(usize, usize)> =
        (0..n).filter(|&r| all[2 * r] as usize == color).map(|r| (all[2 * r + 1] as usize, r)).collect();
    members.sort();
    Ok(members.into_iter().map(|(_, r)| r).collect())
}
