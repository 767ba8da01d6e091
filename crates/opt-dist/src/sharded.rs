//! FSDP / ZeRO and data-parallel training steps over the flat parameter buffer.
//!
//! Each tensor-parallel slice's flat parameter buffer (padded to a multiple of `fsdp`) is cut
//! into `fsdp` contiguous shards. A rank keeps its shard's fp32 master weights, AdamW moments
//! and gradient; per step it
//! 1. all-gathers the shards of its fsdp group into the model's parameter buffer,
//! 2. runs forward and backward on its own rows of the batch, scaled by 1 / (targets in the
//!    whole global batch) so that the sum over data ranks is the global mean's gradient,
//! 3. reduce-scatters the gradient over the fsdp group, then all-reduces its shard over dp,
//! 4. computes the global gradient norm (tensor-parallel-replicated parameters counted once)
//!    for clipping, and
//! 5. runs AdamW on its shard.
//!
//! By default the gather is of the whole slice, kept between forward and backward (what the OPT
//! runs did, ZeRO-2-like for parameters). [`ShardedTrainer::streaming_layers`] switches to
//! ZeRO-3: the model keeps its non-layer parameters and one layer slot, each layer is gathered
//! just before its forward and its backward and its gradient reduce-scattered right after its
//! backward (opt-train's [`opt_train::zero3`] stream over [`crate::train::MeshParallel`]).

use opt_model::{causal_targets, OptModel, ParamLayout, TrainBatch, TrainState};
use opt_tensor::{AdamW, Backend, Buffer, DType};
use opt_train::zero3::{self, Zero3Stream};

use crate::comm::ReduceOp;
use crate::plan::{split_of, Mesh, Split};
use crate::{DistError, Result};

/// Optimizer settings (PyTorch AdamW; weight decay on every parameter, as the parity fixture).
#[derive(Clone, Copy, Debug)]
pub struct TrainHp {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `clip_grad_norm_` max norm, or `None`.
    pub clip: Option<f32>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

pub struct ShardedTrainer<B: Backend> {
    pub model: OptModel<B>,
    pub mesh: Mesh,
    pub hp: TrainHp,
    pub step: u64,
    shard: usize,
    master: B::Buf,
    m: B::Buf,
    v: B::Buf,
    grads: B::Buf,
    grad_shard: B::Buf,
    /// `[start, end)` ranges of this shard whose squares count toward the gradient norm.
    norm_ranges: Vec<(usize, usize)>,
    state: Option<TrainState<B>>,
    /// The slice's ordinary layout (the model's, unless it streams its layers).
    slice: ParamLayout,
    /// ZeRO-3: the collectives for the layer stream, when the model streams its layers.
    streaming: Option<crate::train::MeshParallel>,
}

impl<B: Backend + 'static> ShardedTrainer<B> {
    /// Wrap an (already tensor-parallel) model. Every rank of an fsdp group must pass the same
    /// parameters; each keeps only its shard as master weights.
    pub fn new(model: OptModel<B>, mesh: Mesh, hp: TrainHp) -> Result<Self> {
        let be = &model.backend;
        let total = model.layout.total();
        let k = mesh.plan.fsdp;
        let shard = total.div_ceil(k);
        let lo = mesh.coords.fsdp * shard;
        let mut host = model.params_f32()?;
        host.resize(shard * k, 0.0);
        let master = be.from_f32(&host[lo..lo + shard], DType::F32)?;
        // Tensor-parallel slices each hold their part of a split tensor, but every slice holds
        // a replicated tensor in full: count those on tp rank 0 only.
        let mut norm_ranges = Vec::new();
        for s in &model.layout.specs {
            if split_of(&s.name) == Split::Replicated && mesh.coords.tp != 0 {
                continue;
            }
            let (a, b) = (s.offset.max(lo), (s.offset + s.numel()).min(lo + shard));
            if a < b {
                norm_ranges.push((a - lo, b - lo));
            }
        }
        Ok(ShardedTrainer {
            m: be.zeros(DType::F32, shard)?,
            v: be.zeros(DType::F32, shard)?,
            grads: be.zeros(DType::F32, total)?,
            grad_shard: be.zeros(DType::F32, shard)?,
            master,
            shard,
            norm_ranges,
            slice: model.layout.clone(),
            model,
            mesh,
            hp,
            step: 0,
            state: None,
            streaming: None,
        })
    }

    /// Switch to ZeRO-3: the model drops its layers (keeping the non-layer parameters and one
    /// layer slot) and gathers each layer from the fsdp shards as it runs.
    pub fn streaming_layers(mut self) -> Result<Self> {
        if self.streaming.is_none() {
            self.model = self.model.into_streamed()?;
            self.streaming = Some(crate::train::MeshParallel::new(self.mesh.clone()));
            self.state = None;
            self.grads = self.model.backend.zeros(DType::F32, self.model.layout.total())?;
        }
        Ok(self)
    }

    /// This rank's window `[lo, hi)` of the slice (the shard, less the padding past the end).
    fn window(&self) -> (usize, usize) {
        crate::train::window(self.slice.total(), self.mesh.plan.fsdp, self.mesh.coords.fsdp)
    }

    /// All-gather the parameter shards: the slice's parameters, on the host.
    fn gather_host(&self) -> Result<Vec<f32>> {
        let be = &self.model.backend;
        let k = self.mesh.plan.fsdp;
        let mine = be.to_f32(self.master.v())?;
        let mut full = vec![0f32; self.shard * k];
        self.mesh.fsdp.all_gather(&mine, &mut full)?;
        full.truncate(self.slice.total());
        Ok(full)
    }

    /// All-gather the parameter shards into the model's buffer (ZeRO-3: its non-layer part).
    fn gather_params(&mut self) -> Result<()> {
        if let Some(par) = &self.streaming {
            let window = self.window();
            return Ok(zero3::gather_resident(par, &self.slice, window, &self.master, &mut self.model)?);
        }
        let full = self.gather_host()?;
        let dtype = self.model.dtype();
        self.model.params = self.model.backend.from_f32(&full, dtype)?;
        Ok(())
    }

    /// The current parameters of this tensor-parallel slice (gathered).
    pub fn params_f32(&mut self) -> Result<Vec<f32>> {
        self.gather_host()
    }

    /// One optimizer step on this rank's rows: `ids` is `[rows, seq]` with all positions real.
    /// Every data rank passes its own rows; tensor-parallel peers pass the same rows.
    pub fn train_step(&mut self, ids: &[u32], rows: usize) -> Result<StepReport> {
        if rows == 0 || !ids.len().is_multiple_of(rows) {
            return Err(DistError::Collective {
                op: "train_step",
                detail: format!("{} ids for {rows} rows", ids.len()),
            });
        }
        let seq = ids.len() / rows;
        let mask = vec![1u8; ids.len()];
        let targets = causal_targets(ids, &mask, rows, seq);
        self.gather_params()?;
        let be = &self.model.backend;

        // Targets over the whole global batch, so the per-rank scale sums to the mean.
        let mut count = [targets.iter().filter(|&&t| t >= 0).count() as f32];
        self.mesh.data.all_reduce(&mut count, ReduceOp::Sum)?;
        let scale = if count[0] > 0.0 { 1.0 / count[0] } else { 0.0 };

        if self.state.as_ref().is_none_or(|s| s.batch != rows || s.seq != seq) {
            self.state = Some(TrainState::new(&self.model, rows, seq)?);
        }
        let st =
            self.state.as_mut().ok_or_else(|| DistError::Collective { op: "train_step", detail: "no state".into() })?;
        be.fill(self.grads.vm(), 0.0)?;
        let batch = TrainBatch { ids, mask: &mask, targets: &targets, batch: rows, seq };
        let mut gs = vec![0f32; self.shard];
        let loss_sum = match &self.streaming {
            Some(par) => {
                // ZeRO-3: each layer's gradient is reduce-scattered into `gs` as its backward
                // ends; the non-layer parameters' after the whole backward.
                let window = crate::train::window(self.slice.total(), self.mesh.plan.fsdp, self.mesh.coords.fsdp);
                let acc = &mut gs[..window.1 - window.0];
                let mut z = Zero3Stream::new(par, &self.slice, window, &self.master, Some(acc));
                let r = self.model.forward_backward_streamed(&batch, st, &mut self.grads, Some(scale), None, &mut z);
                let (loss_sum, _) = z.finish(r)?;
                let be = &self.model.backend;
                zero3::reduce_resident(par, be, &self.slice, window, &self.grads, &mut gs[..window.1 - window.0])?;
                loss_sum
            }
            None => {
                let (loss_sum, _) = self.model.forward_backward(&batch, st, &mut self.grads, Some(scale), None)?;
                // Gradients: reduce-scatter over fsdp.
                let k = self.mesh.plan.fsdp;
                let mut g = self.model.backend.to_f32(self.grads.v())?;
                g.resize(self.shard * k, 0.0);
                self.mesh.fsdp.reduce_scatter(&g, &mut gs)?;
                loss_sum
            }
        };
        // Then all-reduce the shard over dp.
        self.mesh.dp.all_reduce(&mut gs, ReduceOp::Sum)?;
        let be = &self.model.backend;

        // Global norm: sums of squares of this shard (replicated tensors once), over every rank
        // of one data replica... and every replica holds the same values, so reduce over the
        // tp × fsdp ranks of this dp index only: the world sum divided by dp.
        let mut sq = [self
            .norm_ranges
            .iter()
            .map(|&(a, b)| gs[a..b].iter().map(|&x| x as f64 * x as f64).sum::<f64>())
            .sum::<f64>() as f32];
        self.mesh.world.all_reduce(&mut sq, ReduceOp::Sum)?;
        let norm = (sq[0] as f64 / self.mesh.plan.dp as f64).sqrt();

        let mut l = [loss_sum as f32];
        self.mesh.data.all_reduce(&mut l, ReduceOp::Sum)?;
        let loss = l[0] as f64 * scale as f64;

        let grad_scale = match self.hp.clip {
            Some(max) => (max as f64 / (norm + 1e-6)).min(1.0) as f32,
            None => 1.0,
        };
        self.step += 1;
        let hp = AdamW {
            lr: self.hp.lr,
            beta1: self.hp.beta1,
            beta2: self.hp.beta2,
            eps: self.hp.eps,
            weight_decay: self.hp.weight_decay,
            step: self.step,
            grad_scale,
        };
        self.grad_shard = be.from_f32(&gs, DType::F32)?;
        be.adamw(self.master.vm(), self.grad_shard.v(), self.m.vm(), self.v.vm(), &hp)?;
        Ok(StepReport { loss, grad_norm: norm })
    }
}
