//! `[parallel] tp, fsdp, dp`: validation, the rank mesh, and which way each parameter splits.
//!
//! Ranks are laid out with tensor parallelism innermost (Megatron's order, so a TP group sits
//! on one node's fast links): `rank = (dp_i · fsdp + fsdp_i) · tp + tp_i`.

use std::sync::Arc;

use opt_model::{OptConfig, ParamLayout};
use serde::{Deserialize, Serialize};

use crate::comm::Communicator;
use crate::{DistError, Result};

/// The parallel layout, as in the training config's `[parallel]` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelPlan {
    /// Tensor-parallel degree (Megatron column/row split of every layer).
    pub tp: usize,
    /// Fully-sharded data-parallel degree (parameters, gradients and optimizer state sharded).
    pub fsdp: usize,
    /// Replicated data-parallel degree (gradients all-reduced).
    pub dp: usize,
}

impl Default for ParallelPlan {
    fn default() -> Self {
        ParallelPlan { tp: 1, fsdp: 1, dp: 1 }
    }
}

/// Where a rank sits in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coords {
    pub tp: usize,
    pub fsdp: usize,
    pub dp: usize,
}

impl ParallelPlan {
    pub fn world(&self) -> usize {
        self.tp * self.fsdp * self.dp
    }

    /// Data-parallel ranks (each sees its own rows of the batch): `fsdp · dp`.
    pub fn data_ranks(&self) -> usize {
        self.fsdp * self.dp
    }

    /// Check the plan against the launched world and the model. Errors name the key to change.
    pub fn validate(&self, world: usize, cfg: &OptConfig) -> Result<()> {
        for (key, v) in [("tp", self.tp), ("fsdp", self.fsdp), ("dp", self.dp)] {
            if v == 0 {
                return Err(DistError::Config { key, detail: "must be at least 1".into() });
            }
        }
        if self.world() != world {
            return Err(DistError::Config {
                key: "tp",
                detail: format!(
                    "tp × fsdp × dp = {} × {} × {} = {}, but {world} processes were launched",
                    self.tp,
                    self.fsdp,
                    self.dp,
                    self.world()
                ),
            });
        }
        if !cfg.num_attention_heads.is_multiple_of(self.tp) {
            return Err(DistError::Config {
                key: "tp",
                detail: format!("{} attention heads do not split over tp = {}", cfg.num_attention_heads, self.tp),
            });
        }
        if !cfg.ffn_dim.is_multiple_of(self.tp) {
            return Err(DistError::Config {
                key: "tp",
                detail: format!("ffn_dim {} does not split over tp = {}", cfg.ffn_dim, self.tp),
            });
        }
        // The vocabulary needs no divisibility: it is padded to a multiple of tp.
        Ok(())
    }

    pub fn coords(&self, rank: usize) -> Coords {
        Coords { tp: rank % self.tp, fsdp: (rank / self.tp) % self.fsdp, dp: rank / (self.tp * self.fsdp) }
    }
}

/// The groups one rank takes part in.
#[derive(Clone)]
pub struct Mesh {
    pub plan: ParallelPlan,
    pub coords: Coords,
    pub world: Arc<dyn Communicator>,
    /// Same (dp, fsdp): the ranks that split each layer.
    pub tp: Arc<dyn Communicator>,
    /// Same (dp, tp): the ranks that shard one tensor-parallel slice's parameters.
    pub fsdp: Arc<dyn Communicator>,
    /// Same (fsdp, tp): replicas of one parameter shard.
    pub dp: Arc<dyn Communicator>,
    /// Same tp: every rank that sees different data for the same slice (fsdp × dp).
    pub data: Arc<dyn Communicator>,
}

impl Mesh {
    /// Split `world` into the groups of `plan` (collective over `world`).
    pub fn new(world: Arc<dyn Communicator>, plan: ParallelPlan) -> Result<Mesh> {
        if plan.world() != world.size() {
            return Err(DistError::Config {
                key: "tp",
                detail: format!("tp × fsdp × dp = {} but the world has {} ranks", plan.world(), world.size()),
            });
        }
        let c = plan.coords(world.rank());
        let tp = world.split(c.dp * plan.fsdp + c.fsdp, c.tp)?;
        let fsdp = world.split(c.dp * plan.tp + c.tp, c.fsdp)?;
        let dp = world.split(c.fsdp * plan.tp + c.tp, c.dp)?;
        let data = world.split(c.tp, c.dp * plan.fsdp + c.fsdp)?;
        Ok(Mesh { plan, coords: c, world, tp, fsdp, dp, data })
    }
}

/// How tensor parallelism splits a parameter (metaseq `reshard_mp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Dim 0 (rows): embed_tokens, lm_head, q/k/v and fc1 weights and biases.
    Rows,
    /// Dim 1 (columns): out_proj and fc2 weights.
    Cols,
    /// Every rank holds all of it: positions, norms, row-parallel biases, projections.
    Replicated,
}

pub fn split_of(name: &str) -> Split {
    let col = ["self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", ".fc1."];
    if name == "decoder.embed_tokens.weight" || name == "lm_head.weight" || col.iter().any(|p| name.contains(p)) {
        Split::Rows
    } else if name.ends_with("self_attn.out_proj.weight") || name.ends_with(".fc2.weight") {
        Split::Cols
    } else {
        Split::Replicated
    }
}

/// Shard `tp_rank`'s slice of the full parameters `full` (layout of `cfg`), in the layout
/// [`ParamLayout::sharded`]`(cfg, tp)`. Vocabulary rows past `vocab_size` are zero padding.
pub fn shard_params(cfg: &OptConfig, full: &[f32], tp: usize, tp_rank: usize) -> Result<Vec<f32>> {
    let whole = ParamLayout::new(cfg);
    let local = ParamLayout::sharded(cfg, tp);
    if full.len() != whole.total() {
        return Err(DistError::Config {
            key: "tp",
            detail: format!("{} parameters given, the model has {}", full.len(), whole.total()),
        });
    }
    let mut out = vec![0f32; local.total()];
    for (w, l) in whole.specs.iter().zip(&local.specs) {
        let src = &full[w.offset..w.offset + w.numel()];
        let dst = &mut out[l.offset..l.offset + l.numel()];
        copy_slice(split_of(&w.name), &w.shape, &l.shape, tp_rank, src, dst, true);
    }
    Ok(out)
}

/// The inverse of [`shard_params`]: the full parameters from all `tp` shards (in rank order).
pub fn unshard_params(cfg: &OptConfig, shards: &[Vec<f32>]) -> Result<Vec<f32>> {
    let tp = shards.len();
    let whole = ParamLayout::new(cfg);
    let local = ParamLayout::sharded(cfg, tp);
    if let Some(bad) = shards.iter().find(|s| s.len() != local.total()) {
        return Err(DistError::Config {
            key: "tp",
            detail: format!("a shard holds {} parameters, tp = {tp} needs {}", bad.len(), local.total()),
        });
    }
    let mut full = vec![0f32; whole.total()];
    for (w, l) in whole.specs.iter().zip(&local.specs) {
        let dst = &mut full[w.offset..w.offset + w.numel()];
        for (r, s) in shards.iter().enumerate() {
            let src = &s[l.offset..l.offset + l.numel()];
            // Replicated tensors are identical on every rank; take rank 0's.
            if split_of(&w.name) == Split::Replicated && r > 0 {
                continue;
            }
            // Copy in the reverse direction: local slice back into the full tensor.
            let mut tmp = dst.to_vec();
            copy_slice(split_of(&w.name), &w.shape, &l.shape, r, src, &mut tmp, false);
            dst.copy_from_slice(&tmp);
        }
    }
    Ok(full)
}

/// Move the `rank`-th slice between a full tensor (`full_shape`) and a local one: full → local
/// when `to_local`, local → full otherwise (`a` is then the local source, `b` the full target).
pub(crate) fn copy_slice(
    split: Split,
    full_shape: &[usize],
    local_shape: &[usize],
    rank: usize,
    a: &[f32],
    b: &mut [f32],
    to_local: bool,
) {
    match split {
        Split::Replicated => b.copy_from_slice(a),
        Split::Rows => {
            let cols: usize = full_shape[1..].iter().product();
            let (rows_full, rows_local) = (full_shape[0], local_shape[0]);
            let lo = rank * rows_local;
            // Padding rows (past the full tensor's end) stay zero.
            let n = rows_full.saturating_sub(lo).min(rows_local);
            let (f0, l0) = (lo * cols, 0);
            if to_local {
                b[l0..l0 + n * cols].copy_from_slice(&a[f0..f0 + n * cols]);
            } else {
                b[f0..f0 + n * cols].copy_from_slice(&a[l0..l0 + n * cols]);
            }
        }
        Split::Cols => {
            let (rows, cf, cl) = (full_shape[0], full_shape[1], local_shape[1]);
            for r in 0..rows {
                let f = r * cf + rank * cl;
                let l = r * cl;
                if to_local {
                    b[l..l + cl].copy_from_slice(&a[f..f + cl]);
                } else {
                    b[f..f + cl].copy_from_slice(&a[l..l + cl]);
                }
            }
        }
    }
}
