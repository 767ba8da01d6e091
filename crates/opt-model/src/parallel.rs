//! The hook points tensor parallelism needs, and nothing else: the model calls these at the
//! exact places Megatron-style TP communicates, and a separate `parallelize` step (crate
//! `opt-dist`) supplies an implementation together with a sharded [`crate::ParamLayout`]. A
//! model without hooks (`OptModel::hooks == None`) is the single-process model, unchanged.
//!
//! Where the model calls them (B = backend, N rows):
//! - forward, after the row-parallel `out_proj` and `fc2` matmuls and before their (replicated)
//!   bias: [`ParallelHooks::all_reduce_sum`] of the partial sums `[N, C]`;
//! - backward, after the input gradient of the column-parallel q/k/v (summed over the three)
//!   and of fc1: `all_reduce_sum` of `[N, C]`;
//! - vocab-parallel embedding: each rank looks up the ids it owns, zero elsewhere, then
//!   `all_reduce_sum`;
//! - vocab-parallel cross-entropy: per-row max and sum-exp through
//!   [`ParallelHooks::all_reduce_host`]; the LM head's input gradient through `all_reduce_sum`;
//! - inference logits: [`ParallelHooks::all_gather_host`] of each rank's vocabulary slice.

use opt_tensor::{Backend, View, ViewMut};

use crate::Result;

/// Reduction for [`ParallelHooks::all_reduce_host`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostReduce {
    Sum,
    Max,
}

/// Collectives over this rank's tensor-parallel group. Every rank of the group must make the
/// same calls in the same order (the model does, as long as all ranks see the same batch).
pub trait ParallelHooks<B: Backend>: Send + Sync {
    /// This rank's index in the tensor-parallel group.
    fn tp_rank(&self) -> usize;
    /// Size of the tensor-parallel group (equals the layout's `tp`).
    fn tp_size(&self) -> usize;
    /// Sum `x` over the group, in place. Every rank must end with the same bits (replicated
    /// parameters stay identical only if the reduction is rank-independent).
    fn all_reduce_sum(&self, be: &B, x: ViewMut<'_, B::Buf>) -> Result<()>;
    /// Reduce a small host vector over the group, in place.
    fn all_reduce_host(&self, x: &mut [f32], op: HostReduce) -> Result<()>;
    /// Concatenate every rank's `x` (all the same length) in rank order.
    fn all_gather_host(&self, x: &[f32]) -> Result<Vec<f32>>;
}

/// Which pass a streamed layer's parameters are fetched for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

/// Where a streamed model's decoder layers live when they are not in use (FSDP / ZeRO-3).
///
/// A model whose layout is [`crate::ParamLayout::streamed`] holds one layer slot. Before a
/// layer's forward, and again before its backward, it asks [`LayerStream::fetch`] to fill the
/// slot with that layer's parameters (opt-train's implementation all-gathers them from the
/// fsdp ranks' shards); right after the layer's backward it hands the slot's gradient to
/// [`LayerStream::reduce`] (which reduce-scatters it into the shards) and clears it. The model
/// itself makes no collective calls.
pub trait LayerStream<B: Backend> {
    /// Write layer `li`'s parameters (in the streamed layout's slot order, i.e. the order of
    /// one layer in the ordinary layout) into `slot`, in the slot's dtype.
    fn fetch(&mut self, be: &B, li: usize, pass: Pass, slot: ViewMut<'_, B::Buf>) -> Result<()>;
    /// Layer `li`'s backward is done: `grad` is the gradient it accumulated (f32, slot order).
    fn reduce(&mut self, be: &B, li: usize, grad: View<'_, B::Buf>) -> Result<()>;
}
