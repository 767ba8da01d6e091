//! What the trainer needs from the other ranks of a multi-process run.
//!
//! opt-train makes no collective calls of its own. A multi-rank launch hands
//! [`crate::Trainer::new_parallel`] an implementation of [`Parallel`] (opt-dist's, over its
//! communicators and the `[parallel]` mesh), and the trainer calls it at the few points where a
//! step crosses ranks:
//!
//! - the model is cut into this rank's tensor-parallel slice ([`Parallel::slice_flat`],
//!   [`Parallel::model_from_slice`]); the slice's flat buffer has its own [`ParamLayout`];
//! - this rank owns a window `[lo, hi)` of that flat buffer ([`Parallel::window`]): its f32
//!   master weights, AdamW moments and reduced gradient (FSDP / ZeRO; the whole slice without
//!   fsdp);
//! - each data rank trains on its own rows of every global batch; [`Parallel::sum_over_data`]
//!   adds up the loss, [`Parallel::reduce_grads`] the gradient (into the window),
//!   [`Parallel::grad_sum_squares`] the squared norm for clipping;
//! - after AdamW on the window, [`Parallel::gather`] rebuilds the slice's parameters.
//!
//! With `parallel.reshard_after_forward` (FSDP's FULL_SHARD, ZeRO-3; the default when
//! `fsdp > 1`) the rank never holds its whole slice: the model keeps its non-layer parameters
//! and one layer slot ([`opt_model::ParamLayout::streamed`]), and [`crate::zero3`] fetches each
//! layer just before its forward and backward ([`Parallel::gather_range`]) and reduce-scatters
//! its gradient right after its backward ([`Parallel::reduce_range`], then
//! [`Parallel::sum_over_replicas`] once per step). With `reshard_after_forward = false` (ZeRO-2)
//! the whole slice is gathered once per step and kept, and the same stream copies layers out of
//! it; gradients are reduced layer by layer as under ZeRO-3. Windows, checkpoints and the
//! optimizer are the same in every mode.
//!
//! A single process uses none of this (the trainer keeps its one-process path).

use opt_model::{OptConfig, OptModel, ParamLayout};
use opt_tensor::{Backend, DType};

use crate::Result;

/// Where this rank sits in the `[parallel]` mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankInfo {
    /// World rank and size.
    pub rank: usize,
    pub world: usize,
    pub tp: usize,
    pub tp_rank: usize,
    pub fsdp: usize,
    pub fsdp_rank: usize,
    pub dp: usize,
    pub dp_rank: usize,
}

impl RankInfo {
    /// Ranks that see different rows of a batch, and this rank's index among them.
    pub fn data_ranks(&self) -> usize {
        self.fsdp * self.dp
    }
    pub fn data_rank(&self) -> usize {
        self.dp_rank * self.fsdp + self.fsdp_rank
    }
    /// Only world rank 0 writes the logbook, plot, samples and shared checkpoint files.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
    /// One replica of every shard writes it to a checkpoint: the ranks with `dp_rank == 0`.
    pub fn writes_shard(&self) -> bool {
        self.dp_rank == 0
    }
}

/// The collectives and tensor-parallel slicing a sharded run needs. Every rank must make the
/// same calls in the same order; results must be bit-identical on the ranks that share them.
pub trait Parallel<B: Backend>: Send {
    fn info(&self) -> RankInfo;
    /// Check the model against the layout (heads and ffn divisible by tp, ...); the error names
    /// the `parallel.*` key to change.
    fn check_model(&self, cfg: &OptConfig) -> Result<()>;
    /// The flat-buffer layout of this rank's tensor-parallel slice.
    fn layout(&self, cfg: &OptConfig) -> ParamLayout;
    /// This rank's tensor-parallel slice of a whole flat buffer (parameters or AdamW moments in
    /// [`ParamLayout::new`] order).
    fn slice_flat(&self, cfg: &OptConfig, full: &[f32]) -> Result<Vec<f32>>;
    /// The slice model from its flat parameters (weights in `dtype`, tensor-parallel hooks set);
    /// with `streamed`, in [`opt_model::ParamLayout::streamed`] form: `slice` is then the whole
    /// slice (whose layers are not kept) or already the streamed buffer.
    fn model_from_slice(
        &self,
        backend: B,
        cfg: OptConfig,
        slice: &[f32],
        dtype: DType,
        streamed: bool,
    ) -> Result<OptModel<B>>;
    /// `[lo, hi)`: the part of a slice of `n` parameters this rank owns.
    fn window(&self, n: usize) -> (usize, usize);
    /// Sum `x` over the data ranks (same slice, other rows), in place.
    fn sum_over_data(&self, x: &mut [f32]) -> Result<()>;
    /// This rank's slice gradient (its own rows) → the window of the gradient summed over the
    /// data ranks.
    fn reduce_grads(&self, grads: &[f32]) -> Result<Vec<f32>>;
    /// The sum of squares of the whole model's gradient, from every rank's window (`layout`
    /// is the slice layout: tensor-parallel-replicated tensors count once).
    fn grad_sum_squares(&self, layout: &ParamLayout, window: &[f32]) -> Result<f64>;
    /// The slice's `n` parameters from every rank's window.
    fn gather(&self, window: &[f32], n: usize) -> Result<Vec<f32>>;
    /// Range `[a, b)` of the slice's `n` parameters, whole, from every fsdp rank's part of it
    /// (`mine`: this rank's window ∩ the range; an all-gather over the fsdp group).
    fn gather_range(&self, mine: &[f32], n: usize, range: (usize, usize)) -> Result<Vec<f32>>;
    /// `grads`: range `[a, b)` of this rank's slice gradient (its own rows) → this rank's
    /// window ∩ the range, summed over the fsdp group (a reduce-scatter; the dp replicas are
    /// summed afterwards by [`Parallel::sum_over_replicas`]).
    fn reduce_range(&self, grads: &[f32], n: usize, range: (usize, usize)) -> Result<Vec<f32>>;
    /// Sum `x` over the dp replicas of this shard, in place.
    fn sum_over_replicas(&self, x: &mut [f32]) -> Result<()>;
    /// Whether `flag` is set on any rank.
    fn any(&self, flag: bool) -> Result<bool>;
    fn barrier(&self) -> Result<()>;
}
