//! The OPT decoder: explicit forward and backward passes, llm.c style, over any [`Backend`].
//!
//! Shape legend: B = batch, T = time (new tokens this call), Tk = keys (past + T),
//! N = B·T rows, C = hidden_size, Dp = word_embed_proj_dim, F = ffn_dim, V = vocab_size,
//! NH = heads, HS = C / NH, L = layers.
//!
//! Where OPT departs from the usual decoder:
//! - positions start at 2 (`position id + 2` indexes the table; see [`crate::config::POSITION_OFFSET`]),
//!   and are derived from the attention mask (`cumsum(mask) * mask - 1`), so left padding works;
//! - 350M is post-LN (LayerNorm after each residual add, no final LayerNorm) and has a 512-wide
//!   embedding with `project_in`/`project_out`;
//! - Galactica has GELU, no biases and LayerNorms without affine parameters.

use std::sync::Arc;

use opt_tensor::{AttnDims, Backend, Buffer, DType, Dropout, Gemm, View, ViewMut};

use crate::config::{OptConfig, LN_EPS, POSITION_OFFSET};
use crate::parallel::{HostReduce, LayerStream, ParallelHooks, Pass};
use crate::params::{LayerIdx, ParamLayout};
use crate::quant::QuantWeights;
use crate::{ModelError, Result};

/// Which positions to compute logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsMode {
    /// Every position: `[B * T, V]`.
    All,
    /// The last position of each row: `[B, V]` (generation, prefill).
    Last,
}

/// An OPT model: config, parameter layout and one parameter buffer on a backend.
pub struct OptModel<B: Backend> {
    pub cfg: OptConfig,
    pub layout: ParamLayout,
    /// All parameters in one buffer (see [`ParamLayout`]), in the storage dtype.
    pub params: B::Buf,
    pub backend: B,
    /// Tensor-parallel collectives when `layout` is a shard (set by `opt-dist`'s
    /// `parallelize`); `None` for the single-process model.
    pub hooks: Option<Arc<dyn ParallelHooks<B>>>,
    /// The int8 matrices of a quantized model (inference only; see [`crate::quant`]). Their
    /// layout offsets lie past `params`, so every product with a weight goes through
    /// `OptModel::matmul_w`, which looks them up here first.
    pub quant: Option<QuantWeights>,
}

/// Per-layer key/value cache for incremental decoding: `k[l]`, `v[l]` are `[B, capacity, C]`.
pub struct KvCache<B: Backend> {
    pub k: Vec<B::Buf>,
    pub v: Vec<B::Buf>,
    pub batch: usize,
    pub capacity: usize,
    /// Filled positions (same for every row; padding is expressed by the mask).
    pub len: usize,
}

impl<B: Backend> KvCache<B> {
    /// A cache for `cfg`'s full width (`hidden_size` per position).
    pub fn new(backend: &B, cfg: &OptConfig, batch: usize, capacity: usize) -> Result<Self> {
        Self::with_width(backend, cfg, batch, capacity, cfg.hidden_size)
    }

    /// A cache sized for `model`: a tensor-parallel shard keeps only its heads' keys and values
    /// (`layout.attn_dim` per position, the layout the model's forward uses).
    pub fn for_model(model: &OptModel<B>, batch: usize, capacity: usize) -> Result<Self> {
        Self::with_width(&model.backend, &model.cfg, batch, capacity, model.layout.attn_dim)
    }

    fn with_width(backend: &B, cfg: &OptConfig, batch: usize, capacity: usize, width: usize) -> Result<Self> {
        let n = batch * capacity * width;
        let mut k = Vec::with_capacity(cfg.num_hidden_layers);
        let mut v = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            k.push(backend.zeros(DType::F32, n)?);
            v.push(backend.zeros(DType::F32, n)?);
        }
        Ok(KvCache { k, v, batch, capacity, len: 0 })
    }
}

/// Where a layer's attention finds its keys/values.
enum LayerKv<'a, B: Backend> {
    /// This call's own keys/values (no cache).
    None,
    /// One cache for the whole batch, every row filled to `past`.
    Shared { k: &'a mut B::Buf, v: &'a mut B::Buf, past: usize, cap: usize },
    /// One cache per row `(k, v, past, capacity)` (continuous batching, one token per row).
    PerRow(Vec<(&'a mut B::Buf, &'a mut B::Buf, usize, usize)>),
}

/// Activations of one decoder layer. In training one of these is kept per layer for the
/// backward pass; at inference a single one is reused as scratch for every layer.
///
/// Kept for backward (per layer, N = B·T): `x_in`, `ln1_out`, `resid1`, `ln2_out` (pre-LN) or
/// `resid2` (post-LN), `q`, `k`, `v`, `attn_y` — each `N·C` floats; `fc1_pre` and `fc1_act`,
/// `N·F` each; LayerNorm mean/rstd, `4·N`; attention probabilities `B·NH·T·T`. For OPT-125m at
/// 4×128 that is ≈ 9·N·C + 2·N·F + B·NH·T² ≈ 18.5 MB per layer in f32. Dropout masks are not
/// stored: they are regenerated from the counter-based RNG. Logits are never stored for the
/// whole batch: the loss is computed in row chunks (see [`OptModel::forward_backward`]).
pub struct LayerActs<B: Backend> {
    /// Layer input (residual stream) `[N, C]`.
    pub x_in: B::Buf,
    /// First LayerNorm output `[N, C]` (pre-LN: of `x_in`; post-LN: of `resid1`).
    pub ln1_out: B::Buf,
    pub ln1_mean: B::Buf,
    pub ln1_rstd: B::Buf,
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    /// Softmax probabilities `[B, NH, T, T]` (training only; empty at inference).
    pub probs: B::Buf,
    /// Attention output before `out_proj` `[N, C]`.
    pub attn_y: B::Buf,
    /// `x_in + dropout(out_proj(attn_y))` `[N, C]`.
    pub resid1: B::Buf,
    /// Second LayerNorm output `[N, C]` (pre-LN only; post-LN writes it to the layer output).
    pub ln2_out: B::Buf,
    pub ln2_mean: B::Buf,
    pub ln2_rstd: B::Buf,
    /// `fc1` output before / after the activation `[N, F]`.
    pub fc1_pre: B::Buf,
    pub fc1_act: B::Buf,
    /// Post-LN: `ln1_out + dropout(fc2(...))`, the second LayerNorm's input `[N, C]`.
    pub resid2: B::Buf,
    /// Scratch `[N, C]` for projections before the residual add.
    pub tmp: B::Buf,
}

impl<B: Backend> LayerActs<B> {
    /// Only the layer input, `n_c` floats (a recomputed layer's saved state).
    fn input_only(be: &B, n_c: usize) -> Result<Self> {
        let z = |len: usize| be.zeros(DType::F32, len).map_err(ModelError::from);
        Ok(LayerActs {
            x_in: z(n_c)?,
            ln1_out: z(0)?,
            ln1_mean: z(0)?,
            ln1_rstd: z(0)?,
            q: z(0)?,
            k: z(0)?,
            v: z(0)?,
            probs: z(0)?,
            attn_y: z(0)?,
            resid1: z(0)?,
            ln2_out: z(0)?,
            ln2_mean: z(0)?,
            ln2_rstd: z(0)?,
            fc1_pre: z(0)?,
            fc1_act: z(0)?,
            resid2: z(0)?,
            tmp: z(0)?,
        })
    }

    fn floats(&self) -> usize {
        [
            &self.x_in,
            &self.ln1_out,
            &self.ln1_mean,
            &self.ln1_rstd,
            &self.q,
            &self.k,
            &self.v,
            &self.probs,
            &self.attn_y,
            &self.resid1,
            &self.ln2_out,
            &self.ln2_mean,
            &self.ln2_rstd,
            &self.fc1_pre,
            &self.fc1_act,
            &self.resid2,
            &self.tmp,
        ]
        .iter()
        .map(|b| b.len())
        .sum()
    }

    fn new(be: &B, cfg: &OptConfig, batch: usize, t: usize, keep_probs: bool) -> Result<Self> {
        let n = batch * t;
        let c = cfg.hidden_size;
        let f = cfg.ffn_dim;
        let z = |len: usize| be.zeros(DType::F32, len).map_err(ModelError::from);
        Ok(LayerActs {
            x_in: z(n * c)?,
            ln1_out: z(n * c)?,
            ln1_mean: z(n)?,
            ln1_rstd: z(n)?,
            q: z(n * c)?,
            k: z(n * c)?,
            v: z(n * c)?,
            probs: z(if keep_probs { batch * cfg.num_attention_heads * t * t } else { 0 })?,
            attn_y: z(n * c)?,
            resid1: z(n * c)?,
            ln2_out: z(if cfg.do_layer_norm_before { n * c } else { 0 })?,
            ln2_mean: z(n)?,
            ln2_rstd: z(n)?,
            fc1_pre: z(n * f)?,
            fc1_act: z(n * f)?,
            resid2: z(if cfg.do_layer_norm_before { 0 } else { n * c })?,
            tmp: z(n * c)?,
        })
    }
}

/// Everything the training step keeps between forward and backward, plus backward scratch.
/// Allocated once per (batch, seq) shape and reused across steps.
///
/// With activation recomputation ([`TrainState::with_recompute`], metaseq's activation
/// checkpointing) each layer keeps only its input between forward and backward; the layer's
/// forward runs again just before its backward, into one shared set of activations. The
/// gradients are bit-identical (every kernel is deterministic and dropout masks are a
/// function of the seed, layer and site), for one more forward pass per step.
pub struct TrainState<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    pub layers: Vec<LayerActs<B>>,
    /// Recomputation: the one full set of layer activations (`layers` hold only `x_in`).
    scratch: Option<LayerActs<B>>,
    /// Recomputation: where the re-run forward writes the layer output (not needed again).
    recompute_out: B::Buf,
    /// Token embedding rows `[N, Dp]` (input of `project_in` when present).
    pub emb: B::Buf,
    /// Output of the last layer `[N, C]`.
    pub x_last: B::Buf,
    /// Final LayerNorm output `[N, C]` and stats.
    pub xf: B::Buf,
    pub lnf_mean: B::Buf,
    pub lnf_rstd: B::Buf,
    /// Input of the LM head `[N, Dp]` (after `project_out` when present).
    pub xp: B::Buf,
    // backward scratch
    dx: B::Buf,
    da: B::Buf,
    db: B::Buf,
    dc: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
    df1: B::Buf,
    df2: B::Buf,
    dxp: B::Buf,
    demb: B::Buf,
    logits: B::Buf,
    losses: B::Buf,
    dlnw: B::Buf,
    dlnb: B::Buf,
}

impl<B: Backend> TrainState<B> {
    pub fn new(model: &OptModel<B>, batch: usize, seq: usize) -> Result<Self> {
        Self::with_recompute(model, batch, seq, false)
    }

    /// [`TrainState::new`]; with `recompute`, layers keep only their input and are recomputed
    /// in the backward pass (see the type's documentation).
    pub fn with_recompute(model: &OptModel<B>, batch: usize, seq: usize, recompute: bool) -> Result<Self> {
        let cfg = &model.cfg;
        let be = &model.backend;
        let n = batch * seq;
        let (c, f, dp, v) = (cfg.hidden_size, cfg.ffn_dim, cfg.word_embed_proj_dim, cfg.vocab_size);
        let z = |len: usize| be.zeros(DType::F32, len).map_err(ModelError::from);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            layers.push(match recompute {
                true => LayerActs::input_only(be, n * c)?,
                false => LayerActs::new(be, cfg, batch, seq, true)?,
            });
        }
        let scratch = if recompute { Some(LayerActs::new(be, cfg, batch, seq, true)?) } else { None };
        Ok(TrainState {
            batch,
            seq,
            layers,
            scratch,
            recompute_out: z(if recompute { n * c } else { 0 })?,
            emb: z(n * dp)?,
            x_last: z(n * c)?,
            xf: z(n * c)?,
            lnf_mean: z(n)?,
            lnf_rstd: z(n)?,
            xp: z(n * dp)?,
            dx: z(n * c)?,
            da: z(n * c)?,
            db: z(n * c)?,
            dc: z(n * c)?,
            dq: z(n * c)?,
            dk: z(n * c)?,
            dv: z(n * c)?,
            df1: z(n * f)?,
            df2: z(n * f)?,
            dxp: z(n * dp)?,
            demb: z(n * dp)?,
            // The fused loss computes `loss_chunk_rows` rows of logits at a time, so the logits
            // take `chunk × V` floats instead of `N × V`.
            logits: z(be.loss_chunk_rows().max(1).min(n) * v)?,
            losses: z(be.loss_chunk_rows().max(1).min(n))?,
            dlnw: z(c)?,
            dlnb: z(c)?,
        })
    }

    /// Whether layers are recomputed in the backward pass.
    pub fn recomputes(&self) -> bool {
        self.scratch.is_some()
    }

    /// Floats the layers keep between forward and backward (every layer's saved activations;
    /// with recomputation their inputs plus the one shared set).
    pub fn saved_layer_floats(&self) -> usize {
        self.layers.iter().chain(self.scratch.as_ref()).map(LayerActs::floats).sum()
    }

    /// Swap layer `li`'s kept input into the shared full set and that set into place
    /// (recomputation only; undone by [`TrainState::park`]).
    fn unpark(&mut self, li: usize) {
        if let Some(s) = self.scratch.as_mut() {
            std::mem::swap(&mut self.layers[li].x_in, &mut s.x_in);
            std::mem::swap(&mut self.layers[li], s);
        }
    }

    fn park(&mut self, li: usize) {
        if let Some(s) = self.scratch.as_mut() {
            std::mem::swap(&mut self.layers[li], s);
            std::mem::swap(&mut self.layers[li].x_in, &mut s.x_in);
        }
    }
}

/// The state of one inference forward between its layers.
struct ForwardRun<B: Backend> {
    batch: usize,
    t: usize,
    /// Cached positions before this call, and after it.
    past: usize,
    total: usize,
    /// `[B, past + T]`.
    mask: Vec<u8>,
    acts: LayerActs<B>,
    x_next: B::Buf,
}

/// Dropout seeds for one training step (`None` = evaluation, no dropout).
#[derive(Clone, Copy, Debug)]
pub struct DropoutCfg {
    pub p: f32,
    pub attn_p: f32,
    pub seed: u64,
}

impl DropoutCfg {
    fn site(&self, layer: usize, site: u64, p: f32) -> Option<Dropout> {
        (p > 0.0).then(|| Dropout { p, seed: opt_tensor::rng::derive(self.seed, layer as u64 * 8 + site), offset: 0 })
    }
}

/// A training batch: `ids`/`mask` are `[B, T]`; `targets[b*T + t]` is the id predicted at
/// position t, or negative to ignore.
pub struct TrainBatch<'a> {
    pub ids: &'a [u32],
    pub mask: &'a [u8],
    pub targets: &'a [i32],
    pub batch: usize,
    pub seq: usize,
}

/// Next-token targets in HF's `labels = input_ids` convention: position t predicts `ids[t+1]`,
/// ignored where t+1 is padding or past the end.
pub fn causal_targets(ids: &[u32], mask: &[u8], batch: usize, seq: usize) -> Vec<i32> {
    let mut t = vec![-100i32; batch * seq];
    for b in 0..batch {
        for s in 0..seq.saturating_sub(1) {
            if mask[b * seq + s + 1] != 0 {
                t[b * seq + s] = ids[b * seq + s + 1] as i32;
            }
        }
    }
    t
}

/// Position ids the way HF derives them from the mask: `cumsum(mask) * mask - 1`, then offset
/// by 2 (so padding positions read row 1 of the table). `mask` covers `past + t` columns per
/// row; ids for the last `t` columns are returned, `[B, t]`.
pub fn position_ids(mask: &[u8], batch: usize, total: usize, t: usize) -> Vec<u32> {
    let past = total - t;
    let mut out = Vec::with_capacity(batch * t);
    for b in 0..batch {
        let row = &mask[b * total..(b + 1) * total];
        let mut cum: i64 = 0;
        for (j, &m) in row.iter().enumerate() {
            let m = (m != 0) as i64;
            cum += m;
            if j >= past {
                out.push((cum * m - 1 + POSITION_OFFSET as i64) as u32);
            }
        }
    }
    out
}

impl<B: Backend> OptModel<B> {
    /// Sum partial results over the tensor-parallel group (no-op without hooks).
    fn tp_reduce(&self, x: ViewMut<'_, B::Buf>) -> Result<()> {
        match &self.hooks {
            Some(h) => h.all_reduce_sum(&self.backend, x),
            None => Ok(()),
        }
    }

    /// First vocabulary id this shard owns (0 without tensor parallelism).
    fn vocab_start(&self) -> usize {
        self.hooks.as_ref().map_or(0, |h| h.tp_rank() * self.layout.vocab)
    }

    /// Ids relative to this shard's vocabulary slice, and whether each is owned here (ids
    /// owned elsewhere read row 0 and are zeroed afterwards).
    fn local_ids(&self, ids: &[u32]) -> (Vec<u32>, Vec<bool>) {
        let (lo, n) = (self.vocab_start(), self.layout.vocab);
        ids.iter()
            .map(|&i| {
                let i = i as usize;
                if i >= lo && i < lo + n {
                    ((i - lo) as u32, true)
                } else {
                    (0, false)
                }
            })
            .unzip()
    }

    /// Attention heads of this shard.
    fn local_heads(&self) -> usize {
        self.cfg.num_attention_heads / self.layout.tp
    }

    /// LM-head logits `[rows, V]` from `xp [rows, Dp]`: with tensor parallelism each rank
    /// computes its vocabulary slice, and the slices are gathered (padding columns dropped).
    fn logits(&self, xp: View<'_, B::Buf>, rows: usize) -> Result<B::Buf> {
        let be = &self.backend;
        let (dp, vl) = (self.cfg.word_embed_proj_dim, self.layout.vocab);
        let mut local = be.zeros(DType::F32, rows * vl)?;
        if self.quant.is_some() {
            self.matmul_w(local.vm(), xp, self.layout.lm_head_or_wte(), rows, dp, vl)?;
        } else {
            be.linear(local.vm(), xp, self.p(self.layout.lm_head_or_wte(), vl * dp), None, rows, dp, vl)?;
        }
        let Some(h) = &self.hooks else { return Ok(local) };
        let parts = h.all_gather_host(&be.to_f32(local.v())?)?;
        let v = self.cfg.vocab_size;
        let mut full = vec![0f32; rows * v];
        for (r, row) in full.chunks_mut(v).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                let (shard, col) = (j / vl, j % vl);
                *x = parts[shard * rows * vl + r * vl + col];
            }
        }
        Ok(be.from_f32(&full, DType::F32)?)
    }

    /// Vocabulary-parallel fused softmax cross-entropy over this shard's logits
    /// `[rows, Vl]`, in place (Megatron's `vocab_parallel_cross_entropy`): the row max, the
    /// sum of exponentials and the target logit are reduced over the group, so no rank holds
    /// full-vocabulary logits. Writes `losses` like [`Backend::cross_entropy`] and leaves
    /// `scale · (softmax − onehot)` for this slice in `logits`.
    fn vocab_parallel_ce(
        &self,
        h: &dyn ParallelHooks<B>,
        logits: ViewMut<'_, B::Buf>,
        losses: ViewMut<'_, B::Buf>,
        targets: &[i32],
        scale: f32,
    ) -> Result<()> {
        let be = &self.backend;
        let (vl, lo, v) = (self.layout.vocab, self.vocab_start(), self.cfg.vocab_size);
        let rows = targets.len();
        // Columns past the real vocabulary are padding: excluded from the softmax.
        let valid = v.saturating_sub(lo).min(vl);
        let mut x = be.to_f32(logits.as_view())?;
        let mut mx: Vec<f32> =
            x.chunks(vl).map(|r| r[..valid].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))).collect();
        h.all_reduce_host(&mut mx, HostReduce::Max)?;
        let mut stats = vec![0f32; 2 * rows];
        for r in 0..rows {
            let row = &x[r * vl..(r + 1) * vl];
            stats[r] = row[..valid].iter().map(|&z| (z - mx[r]).exp()).sum();
            let t = targets[r];
            if t >= 0 && (t as usize) >= lo && (t as usize) < lo + valid {
                stats[rows + r] = row[t as usize - lo];
            }
        }
        h.all_reduce_host(&mut stats, HostReduce::Sum)?;
        let mut loss = vec![0f32; rows];
        for r in 0..rows {
            let row = &mut x[r * vl..(r + 1) * vl];
            let t = targets[r];
            if t < 0 {
                row.fill(0.0);
                continue;
            }
            let (m, sum) = (mx[r], stats[r]);
            loss[r] = sum.ln() + m - stats[rows + r];
            for (j, z) in row.iter_mut().enumerate() {
                let p = if j < valid { (*z - m).exp() / sum } else { 0.0 };
                let onehot = if lo + j == t as usize { 1.0 } else { 0.0 };
                *z = (p - onehot) * scale;
            }
        }
        be.copy(logits, be.from_f32(&x, DType::F32)?.v())?;
        be.copy(losses, be.from_f32(&loss, DType::F32)?.v())?;
        Ok(())
    }

    /// A row-parallel linear: the matmul gives this rank's partial sum, which is reduced over
    /// the group before the (replicated) bias is added once.
    #[allow(clippy::too_many_arguments)]
    fn linear_row(
        &self,
        mut out: ViewMut<'_, B::Buf>,
        x: View<'_, B::Buf>,
        w: usize,
        b: Option<usize>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        let be = &self.backend;
        if self.hooks.is_none() && self.quant.is_none() {
            // No tensor parallelism: nothing to reduce between the product and the bias.
            return Ok(be.linear(out, x, self.p(w, out_dim * in_dim), self.po(b, out_dim), rows, in_dim, out_dim)?);
        }
        self.matmul_w(out.rb(), x, w, rows, in_dim, out_dim)?;
        self.tp_reduce(out.rb())?;
        if let Some(b) = b {
            be.bias_add(out, self.p(b, out_dim), out_dim)?;
        }
        Ok(())
    }

    /// `out[rows, out_dim] = x[rows, in_dim] · Wᵀ` for the weight at layout offset `w`: the
    /// int8 matrix when the model holds one there, else the flat buffer.
    pub(crate) fn matmul_w(
        &self,
        out: ViewMut<'_, B::Buf>,
        x: View<'_, B::Buf>,
        w: usize,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        if let Some(q) = self.quant.as_ref().and_then(|q| q.get(w)) {
            return Ok(self.backend.matmul_int8(out, x, q)?);
        }
        let g = Gemm::new(rows, out_dim, in_dim, false, true);
        Ok(self.backend.matmul(out, x, self.p(w, out_dim * in_dim), &g)?)
    }

    /// A view of parameter `off` of `len` elements.
    fn p(&self, off: usize, len: usize) -> View<'_, B::Buf> {
        self.params.at(off, len)
    }
    fn po(&self, off: Option<usize>, len: usize) -> Option<View<'_, B::Buf>> {
        off.map(|o| self.params.at(o, len))
    }

    /// `out[rows, out_dim] = x[rows, in_dim] · Wᵀ (+ b)`.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        mut out: ViewMut<'_, B::Buf>,
        x: View<'_, B::Buf>,
        w: usize,
        b: Option<usize>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        let be = &self.backend;
        self.matmul_w(out.rb(), x, w, rows, in_dim, out_dim)?;
        if let Some(b) = b {
            be.bias_add(out, self.p(b, out_dim), out_dim)?;
        }
        Ok(())
    }

    /// Embeddings for `ids` at `pos` into `x [N, C]`; the raw token rows go to `emb [N, Dp]`.
    fn embed(&self, x: &mut B::Buf, emb: &mut B::Buf, ids: &[u32], pos: &[u32]) -> Result<()> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let (c, dp) = (cfg.hidden_size, cfg.word_embed_proj_dim);
        let n = ids.len();
        check_ids(ids, cfg.vocab_size)?;
        let wpe = self.p(self.layout.wpe, cfg.position_rows() * c);
        // Vocabulary-parallel lookup: each shard contributes the rows it owns, zeros elsewhere,
        // and the sum over the group is the full embedding.
        let local = self.hooks.as_ref().map(|_| self.local_ids(ids));
        let tok = match &local {
            Some((l, _)) => l.as_slice(),
            None => ids,
        };
        let tok_out = if self.layout.project_in.is_some() { &mut *emb } else { &mut *x };
        match self.quant.as_ref().and_then(|q| q.get(self.layout.wte)) {
            Some(q) => be.embedding_int8(tok_out.at_mut(0, n * dp), q, tok, false)?,
            None => {
                let wte = self.p(self.layout.wte, self.layout.vocab * dp);
                be.embedding_forward(tok_out.at_mut(0, n * dp), wte, tok, dp, false)?
            }
        }
        if let Some((_, owned)) = &local {
            for (r, _) in owned.iter().enumerate().filter(|(_, &o)| !o) {
                be.fill(tok_out.at_mut(r * dp, dp), 0.0)?;
            }
            self.tp_reduce(tok_out.at_mut(0, n * dp))?;
        }
        if let Some(pi) = self.layout.project_in {
            be.matmul(x.at_mut(0, n * c), emb.at(0, n * dp), self.p(pi, c * dp), &Gemm::new(n, c, dp, false, true))?;
        }
        be.embedding_forward(x.at_mut(0, n * c), wpe, pos, c, true)?;
        Ok(())
    }

    /// One decoder layer forward: reads `acts.x_in`, writes the layer output to `out`.
    /// With `cache`, new keys/values are appended at `cache.len` and attention runs over the
    /// cache; otherwise over this call's keys. `key_mask` is `[B, Tk]`.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        li: usize,
        acts: &mut LayerActs<B>,
        mut out: ViewMut<'_, B::Buf>,
        batch: usize,
        t: usize,
        key_mask: Option<&[u8]>,
        cache: LayerKv<'_, B>,
        keep_probs: bool,
        drop: Option<&DropoutCfg>,
    ) -> Result<()> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let l: &LayerIdx = &self.layout.layers[li];
        // ca/f: this shard's attention and FFN widths (C and F without tensor parallelism).
        let (c, f, ca) = (cfg.hidden_size, self.layout.ffn_dim, self.layout.attn_dim);
        let n = batch * t;
        let nc = n * c;
        let nca = n * ca;
        let pre = cfg.do_layer_norm_before;

        // --- self-attention block -------------------------------------------------------
        if pre {
            be.layernorm_forward(
                acts.ln1_out.at_mut(0, nc),
                acts.ln1_mean.at_mut(0, n),
                acts.ln1_rstd.at_mut(0, n),
                acts.x_in.at(0, nc),
                self.po(l.ln1_w, c),
                self.po(l.ln1_b, c),
                c,
                LN_EPS,
            )?;
        }
        {
            let a_in = if pre { acts.ln1_out.at(0, nc) } else { acts.x_in.at(0, nc) };
            if self.quant.is_some() {
                // int8 matrices live outside the flat buffer: one product each.
                self.linear(acts.q.at_mut(0, nca), a_in, l.q_w, l.q_b, n, c, ca)?;
                self.linear(acts.k.at_mut(0, nca), a_in, l.k_w, l.k_b, n, c, ca)?;
                self.linear(acts.v.at_mut(0, nca), a_in, l.v_w, l.v_b, n, c, ca)?;
            } else {
                // q, k, v: one call (a GPU decoding step runs it as one launch).
                let (wq, wk, wv) = (self.p(l.q_w, ca * c), self.p(l.k_w, ca * c), self.p(l.v_w, ca * c));
                be.linear3(
                    [acts.q.at_mut(0, nca), acts.k.at_mut(0, nca), acts.v.at_mut(0, nca)],
                    a_in,
                    [wq, wk, wv],
                    [self.po(l.q_b, ca), self.po(l.k_b, ca), self.po(l.v_b, ca)],
                    n,
                    c,
                    ca,
                )?;
            }
        }
        let attn_drop = drop.and_then(|d| d.site(li, 2, d.attn_p));
        let mut dims = AttnDims {
            batch,
            tq: t,
            tk: t,
            heads: self.local_heads(),
            head_dim: cfg.head_dim(),
            q_offset: 0,
            kv_batch_stride: t * ca,
            // HF scales q after q_proj; scaling the product instead is the same math.
            scale: (cfg.head_dim() as f32).powf(-0.5),
        };
        let probs = if keep_probs { Some(acts.probs.at_mut(0, batch * self.local_heads() * t * t)) } else { None };
        match cache {
            LayerKv::Shared { k: kc, v: vc, past, cap } => {
                // Append this call's keys/values to the cache rows [past, past + t): one strided
                // copy per tensor (row b of the cache starts b·cap positions in).
                let span = (batch - 1) * cap * ca + t * ca;
                be.copy_2d(kc.at_mut(past * ca, span), cap * ca, acts.k.at(0, batch * t * ca), t * ca, batch, t * ca)?;
                be.copy_2d(vc.at_mut(past * ca, span), cap * ca, acts.v.at(0, batch * t * ca), t * ca, batch, t * ca)?;
                dims.tk = past + t;
                dims.q_offset = past;
                dims.kv_batch_stride = cap * ca;
                let kv_len = (batch - 1) * cap * ca + dims.tk * ca;
                be.attention_forward(
                    acts.attn_y.at_mut(0, nca),
                    probs,
                    acts.q.at(0, nca),
                    kc.at(0, kv_len),
                    vc.at(0, kv_len),
                    key_mask,
                    &dims,
                    attn_drop.as_ref(),
                )?;
            }
            LayerKv::PerRow(rows) => {
                // Continuous batching: row b is one new token of its own sequence, with its own
                // cache and length. Projections above ran batched; attention runs per row.
                for (b, (kc, vc, past, cap)) in rows.into_iter().enumerate() {
                    be.copy(kc.at_mut(past * ca, ca), acts.k.at(b * ca, ca))?;
                    be.copy(vc.at_mut(past * ca, ca), acts.v.at(b * ca, ca))?;
                    let d =
                        AttnDims { batch: 1, tq: 1, tk: past + 1, q_offset: past, kv_batch_stride: cap * ca, ..dims };
                    be.attention_forward(
                        acts.attn_y.at_mut(b * ca, ca),
                        None,
                        acts.q.at(b * ca, ca),
                        kc.at(0, (past + 1) * ca),
                        vc.at(0, (past + 1) * ca),
                        None,
                        &d,
                        None,
                    )?;
                }
            }
            LayerKv::None => {
                be.attention_forward(
                    acts.attn_y.at_mut(0, nca),
                    probs,
                    acts.q.at(0, nca),
                    acts.k.at(0, nca),
                    acts.v.at(0, nca),
                    key_mask,
                    &dims,
                    attn_drop.as_ref(),
                )?;
            }
        }
        let o_drop = drop.and_then(|d| d.site(li, 0, d.p));
        if o_drop.is_none() && self.hooks.is_none() && self.quant.is_none() {
            // resid1 = x_in + out_proj(attn_y), the add fused where the backend can.
            be.linear_residual(
                acts.resid1.at_mut(0, nc),
                acts.tmp.at_mut(0, nc),
                acts.attn_y.at(0, nca),
                self.p(l.o_w, c * ca),
                self.po(l.o_b, c),
                acts.x_in.at(0, nc),
                n,
                ca,
                c,
            )?;
        } else {
            self.linear_row(acts.tmp.at_mut(0, nc), acts.attn_y.at(0, nca), l.o_w, l.o_b, n, ca, c)?;
            if let Some(d) = o_drop {
                be.dropout(acts.tmp.at_mut(0, nc), &d)?;
            }
            be.add(acts.resid1.at_mut(0, nc), acts.x_in.at(0, nc), acts.tmp.at(0, nc))?;
        }

        // --- feed-forward block ---------------------------------------------------------
        if pre {
            be.layernorm_forward(
                acts.ln2_out.at_mut(0, nc),
                acts.ln2_mean.at_mut(0, n),
                acts.ln2_rstd.at_mut(0, n),
                acts.resid1.at(0, nc),
                self.po(l.ln2_w, c),
                self.po(l.ln2_b, c),
                c,
                LN_EPS,
            )?;
        } else {
            // Post-LN (350M): normalise after the residual add.
            be.layernorm_forward(
                acts.ln1_out.at_mut(0, nc),
                acts.ln1_mean.at_mut(0, n),
                acts.ln1_rstd.at_mut(0, n),
                acts.resid1.at(0, nc),
                self.po(l.ln1_w, c),
                self.po(l.ln1_b, c),
                c,
                LN_EPS,
            )?;
        }
        {
            // fc1 and its activation (fc1_pre is kept for the backward pass).
            let f_in = if pre { acts.ln2_out.at(0, nc) } else { acts.ln1_out.at(0, nc) };
            if self.quant.is_some() {
                self.linear(acts.fc1_pre.at_mut(0, n * f), f_in, l.fc1_w, l.fc1_b, n, c, f)?;
                be.activation_forward(cfg.activation(), acts.fc1_act.at_mut(0, n * f), acts.fc1_pre.at(0, n * f))?;
            } else {
                be.linear_act(
                    acts.fc1_pre.at_mut(0, n * f),
                    acts.fc1_act.at_mut(0, n * f),
                    f_in,
                    self.p(l.fc1_w, f * c),
                    self.po(l.fc1_b, f),
                    cfg.activation(),
                    n,
                    c,
                    f,
                )?;
            }
        }
        let f_drop = drop.and_then(|d| d.site(li, 1, d.p));
        if f_drop.is_none() && self.hooks.is_none() && self.quant.is_none() {
            // The residual add fused into fc2 where the backend can.
            let (dst, residual) = if pre {
                (out.rb(), acts.resid1.at(0, nc))
            } else {
                (acts.resid2.at_mut(0, nc), acts.ln1_out.at(0, nc))
            };
            be.linear_residual(
                dst,
                acts.tmp.at_mut(0, nc),
                acts.fc1_act.at(0, n * f),
                self.p(l.fc2_w, c * f),
                self.po(l.fc2_b, c),
                residual,
                n,
                f,
                c,
            )?;
        } else {
            self.linear_row(acts.tmp.at_mut(0, nc), acts.fc1_act.at(0, n * f), l.fc2_w, l.fc2_b, n, f, c)?;
            if let Some(d) = f_drop {
                be.dropout(acts.tmp.at_mut(0, nc), &d)?;
            }
            if pre {
                be.add(out.rb(), acts.resid1.at(0, nc), acts.tmp.at(0, nc))?;
            } else {
                be.add(acts.resid2.at_mut(0, nc), acts.ln1_out.at(0, nc), acts.tmp.at(0, nc))?;
            }
        }
        if !pre {
            be.layernorm_forward(
                out.rb(),
                acts.ln2_mean.at_mut(0, n),
                acts.ln2_rstd.at_mut(0, n),
                acts.resid2.at(0, nc),
                self.po(l.ln2_w, c),
                self.po(l.ln2_b, c),
                c,
                LN_EPS,
            )?;
        }
        Ok(())
    }

    /// Final LayerNorm (if any) and `project_out` (if any): `x [N, C]` → `xp [N, Dp]`.
    /// `xf`/`mean`/`rstd` receive the LayerNorm output and stats.
    #[allow(clippy::too_many_arguments)]
    fn head_input(
        &self,
        x: View<'_, B::Buf>,
        xf: &mut B::Buf,
        mean: &mut B::Buf,
        rstd: &mut B::Buf,
        xp: &mut B::Buf,
        n: usize,
    ) -> Result<()> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let (c, dp) = (cfg.hidden_size, cfg.word_embed_proj_dim);
        if cfg.has_final_layer_norm() {
            be.layernorm_forward(
                xf.at_mut(0, n * c),
                mean.at_mut(0, n),
                rstd.at_mut(0, n),
                x,
                self.po(self.layout.final_ln_w, c),
                self.po(self.layout.final_ln_b, c),
                c,
                LN_EPS,
            )?;
        } else {
            be.copy(xf.at_mut(0, n * c), x)?;
        }
        match self.layout.project_out {
            Some(po) => {
                be.matmul(xp.at_mut(0, n * dp), xf.at(0, n * c), self.p(po, dp * c), &Gemm::new(n, dp, c, false, true))?
            }
            None => be.copy(xp.at_mut(0, n * dp), xf.at(0, n * c))?,
        }
        Ok(())
    }

    /// Inference forward over a (padded) batch of new tokens.
    ///
    /// `ids` is `[B, T]`. `mask` is `[B, past + T]` (1 = token, 0 = padding; `None` = all ones)
    /// where `past = cache.len` (0 without a cache). With a cache, keys/values of the new tokens
    /// are appended and `cache.len` advances by T. Returns logits `[B·T, V]` or `[B, V]`.
    pub fn forward(
        &self,
        ids: &[u32],
        batch: usize,
        mask: Option<&[u8]>,
        mut cache: Option<&mut KvCache<B>>,
        mode: LogitsMode,
    ) -> Result<B::Buf> {
        self.refuse_streamed()?;
        let mut run = self.forward_begin(ids, batch, mask, cache.as_deref())?;
        for li in 0..self.cfg.num_hidden_layers {
            self.forward_layer(&mut run, li, cache.as_deref_mut())?;
        }
        self.forward_end(run, cache, mode)
    }

    /// [`OptModel::forward`] for a streamed model (layout [`ParamLayout::streamed`]): each
    /// layer's parameters are fetched from `stream` into the slot just before the layer runs.
    pub fn forward_streamed(
        &mut self,
        ids: &[u32],
        batch: usize,
        mask: Option<&[u8]>,
        mut cache: Option<&mut KvCache<B>>,
        mode: LogitsMode,
        stream: &mut dyn LayerStream<B>,
    ) -> Result<B::Buf> {
        let mut run = self.forward_begin(ids, batch, mask, cache.as_deref())?;
        for li in 0..self.cfg.num_hidden_layers {
            self.fetch_layer(stream, li, Pass::Forward)?;
            self.forward_layer(&mut run, li, cache.as_deref_mut())?;
        }
        self.forward_end(run, cache, mode)
    }

    /// A model with a streamed layout holds one layer at a time: the ordinary entry points
    /// would read the slot for every layer.
    fn refuse_streamed(&self) -> Result<()> {
        if self.layout.slot.is_some() {
            return Err(ModelError::Input(
                "this model holds its layers one at a time (FSDP / ZeRO-3): use the *_streamed entry points".into(),
            ));
        }
        Ok(())
    }

    /// Fill the layer slot of a streamed model with layer `li`'s parameters.
    fn fetch_layer(&mut self, stream: &mut dyn LayerStream<B>, li: usize, pass: Pass) -> Result<()> {
        let Some((a, b)) = self.layout.slot else {
            return Err(ModelError::Input("this model's layout is not streamed (ParamLayout::streamed)".into()));
        };
        stream.fetch(&self.backend, li, pass, self.params.at_mut(a, b - a))
    }

    /// Checks, positions and the embedding of an inference forward.
    fn forward_begin(
        &self,
        ids: &[u32],
        batch: usize,
        mask: Option<&[u8]>,
        cache: Option<&KvCache<B>>,
    ) -> Result<ForwardRun<B>> {
        let be = &self.backend;
        let cfg = &self.cfg;
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(ModelError::Input(format!("{} ids do not form a batch of {batch} rows", ids.len())));
        }
        let t = ids.len() / batch;
        let past = cache.map_or(0, |c| c.len);
        let total = past + t;
        if let Some(c) = cache {
            if c.batch != batch {
                return Err(ModelError::Input(format!("KV cache holds {} rows, batch has {batch}", c.batch)));
            }
            if total > c.capacity {
                return Err(ModelError::Input(format!(
                    "KV cache capacity {} exceeded ({total} positions)",
                    c.capacity
                )));
            }
        }
        let mask = match mask {
            Some(m) => {
                if m.len() != batch * total {
                    return Err(ModelError::Input(format!(
                        "attention mask has {} entries, expected {batch}×{total}",
                        m.len()
                    )));
                }
                m.to_vec()
            }
            None => vec![1u8; batch * total],
        };
        let pos = position_ids(&mask, batch, total, t);
        if let Some(&p) = pos.iter().max() {
            if p as usize >= cfg.position_rows() {
                return Err(ModelError::Input(format!(
                    "sequence of {} positions exceeds max_position_embeddings {}",
                    p as usize + 1 - POSITION_OFFSET,
                    cfg.max_position_embeddings
                )));
            }
        }
        let n = batch * t;
        let (c, dp) = (cfg.hidden_size, cfg.word_embed_proj_dim);
        let mut acts = LayerActs::new(be, cfg, batch, t, false)?;
        let x_next = be.zeros(DType::F32, n * c)?;
        let mut emb = be.zeros(DType::F32, if cfg.has_projection() { n * dp } else { 0 })?;
        self.embed(&mut acts.x_in, &mut emb, ids, &pos)?;
        Ok(ForwardRun { batch, t, past, total, mask, acts, x_next })
    }

    /// Layer `li` of an inference forward.
    fn forward_layer(&self, run: &mut ForwardRun<B>, li: usize, cache: Option<&mut KvCache<B>>) -> Result<()> {
        let ForwardRun { batch, t, past, mask, acts, x_next, .. } = run;
        let cache_bufs = match cache {
            Some(kv) => {
                let cap = kv.capacity;
                LayerKv::Shared { k: &mut kv.k[li], v: &mut kv.v[li], past: *past, cap }
            }
            None => LayerKv::None,
        };
        self.layer_forward(li, acts, x_next.vm(), *batch, *t, Some(mask), cache_bufs, false, None)?;
        std::mem::swap(&mut acts.x_in, x_next);
        Ok(())
    }

    /// The final norm and the logits of an inference forward.
    fn forward_end(&self, run: ForwardRun<B>, cache: Option<&mut KvCache<B>>, mode: LogitsMode) -> Result<B::Buf> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let ForwardRun { batch, t, total, acts, mut x_next, .. } = run;
        let n = batch * t;
        let (c, dp) = (cfg.hidden_size, cfg.word_embed_proj_dim);
        if let Some(kv) = cache {
            kv.len = total;
        }
        // acts.x_in now holds the last layer's output [N, C].
        let rows = match mode {
            LogitsMode::All => n,
            LogitsMode::Last => batch,
        };
        let x_rows = match mode {
            LogitsMode::All => acts.x_in.at(0, n * c),
            LogitsMode::Last => {
                // Gather row (b, T-1) of every sequence.
                be.copy_2d(
                    x_next.at_mut(0, batch * c),
                    c,
                    acts.x_in.at((t - 1) * c, n * c - (t - 1) * c),
                    t * c,
                    batch,
                    c,
                )?;
                x_next.at(0, batch * c)
            }
        };
        let mut xf = be.zeros(DType::F32, rows * c)?;
        let mut mean = be.zeros(DType::F32, rows)?;
        let mut rstd = be.zeros(DType::F32, rows)?;
        let mut xp = be.zeros(DType::F32, rows * dp)?;
        self.head_input(x_rows, &mut xf, &mut mean, &mut rstd, &mut xp, rows)?;
        self.logits(xp.v(), rows)
    }

    /// One decode step for several independent sequences (continuous batching): row `i` is the
    /// next token of the sequence whose cache is `caches[i]` (each a batch-1 cache, prefilled
    /// without padding). Rows may have different lengths; each cache advances by one.
    /// Returns logits `[n, V]`. Projections and the MLP run as one batched GEMM; attention runs
    /// per row over that row's cache, so a row's result does not depend on its neighbours'
    /// lengths.
    pub fn forward_step(&self, tokens: &[u32], caches: &mut [&mut KvCache<B>]) -> Result<B::Buf> {
        self.refuse_streamed()?;
        let be = &self.backend;
        let cfg = &self.cfg;
        let n = tokens.len();
        if n == 0 || n != caches.len() {
            return Err(ModelError::Input(format!("{n} tokens for {} sequences", caches.len())));
        }
        let mut pos = Vec::with_capacity(n);
        for c in caches.iter() {
            if c.batch != 1 {
                return Err(ModelError::Input("forward_step needs one single-row cache per sequence".into()));
            }
            if c.len >= c.capacity {
                return Err(ModelError::Input(format!("KV cache capacity {} exceeded", c.capacity)));
            }
            if c.len + POSITION_OFFSET >= cfg.position_rows() {
                return Err(ModelError::Input(format!(
                    "sequence of {} positions exceeds max_position_embeddings {}",
                    c.len + 1,
                    cfg.max_position_embeddings
                )));
            }
            pos.push((c.len + POSITION_OFFSET) as u32);
        }
        let (c, dp) = (cfg.hidden_size, cfg.word_embed_proj_dim);
        let mut acts = LayerActs::new(be, cfg, n, 1, false)?;
        let mut x_next = be.zeros(DType::F32, n * c)?;
        let mut emb = be.zeros(DType::F32, if cfg.has_projection() { n * dp } else { 0 })?;
        self.embed(&mut acts.x_in, &mut emb, tokens, &pos)?;
        for li in 0..cfg.num_hidden_layers {
            let rows: Vec<_> = caches
                .iter_mut()
                .map(|kv| {
                    let (past, cap) = (kv.len, kv.capacity);
                    let KvCache { k, v, .. } = &mut **kv;
                    (&mut k[li], &mut v[li], past, cap)
                })
                .collect();
            self.layer_forward(li, &mut acts, x_next.vm(), n, 1, None, LayerKv::PerRow(rows), false, None)?;
            std::mem::swap(&mut acts.x_in, &mut x_next);
        }
        for kv in caches.iter_mut() {
            kv.len += 1;
        }
        let mut xf = be.zeros(DType::F32, n * c)?;
        let mut mean = be.zeros(DType::F32, n)?;
        let mut rstd = be.zeros(DType::F32, n)?;
        let mut xp = be.zeros(DType::F32, n * dp)?;
        self.head_input(acts.x_in.at(0, n * c), &mut xf, &mut mean, &mut rstd, &mut xp, n)?;
        self.logits(xp.v(), n)
    }

    /// Training forward and backward: accumulates into `grads` (same layout as `params`, f32)
    /// the gradient of `loss_scale · Σ cross-entropy` over non-ignored targets, and returns
    /// `(Σ loss, number of non-ignored targets)`. With `loss_scale = 1 / count` this is the
    /// gradient of the mean (HF's loss); gradient accumulation passes `1 / total count`.
    pub fn forward_backward(
        &self,
        batch: &TrainBatch<'_>,
        st: &mut TrainState<B>,
        grads: &mut B::Buf,
        loss_scale: Option<f32>,
        drop: Option<&DropoutCfg>,
    ) -> Result<(f64, usize)> {
        self.refuse_streamed()?;
        let pos = self.train_begin(batch, st, grads)?;
        let nl = self.cfg.num_hidden_layers;
        for li in 0..nl {
            self.train_layer_forward(li, batch, st, drop)?;
        }
        let out = self.train_head(batch, st, grads, loss_scale)?;
        for li in (0..nl).rev() {
            self.train_layer_backward(li, batch, st, grads, drop)?;
        }
        self.train_embed_backward(batch, st, grads, &pos)?;
        Ok(out)
    }

    /// [`OptModel::forward_backward`] for a streamed model (layout [`ParamLayout::streamed`],
    /// `grads` in that layout too): each layer's parameters are fetched from `stream` before
    /// its forward and again before its backward (the last layer stays in the slot between
    /// the two), and its gradient is handed to `stream` right after its backward and cleared.
    /// The resident parameters' gradients accumulate in `grads` as usual.
    pub fn forward_backward_streamed(
        &mut self,
        batch: &TrainBatch<'_>,
        st: &mut TrainState<B>,
        grads: &mut B::Buf,
        loss_scale: Option<f32>,
        drop: Option<&DropoutCfg>,
        stream: &mut dyn LayerStream<B>,
    ) -> Result<(f64, usize)> {
        let Some((a, b)) = self.layout.slot else {
            return Err(ModelError::Input("this model's layout is not streamed (ParamLayout::streamed)".into()));
        };
        let pos = self.train_begin(batch, st, grads)?;
        let nl = self.cfg.num_hidden_layers;
        for li in 0..nl {
            self.fetch_layer(stream, li, Pass::Forward)?;
            self.train_layer_forward(li, batch, st, drop)?;
        }
        let out = self.train_head(batch, st, grads, loss_scale)?;
        self.backend.fill(grads.at_mut(a, b - a), 0.0)?;
        for li in (0..nl).rev() {
            if li + 1 != nl {
                self.fetch_layer(stream, li, Pass::Backward)?;
            }
            self.train_layer_backward(li, batch, st, grads, drop)?;
            stream.reduce(&self.backend, li, grads.at(a, b - a))?;
            self.backend.fill(grads.at_mut(a, b - a), 0.0)?;
        }
        self.train_embed_backward(batch, st, grads, &pos)?;
        Ok(out)
    }

    /// Checks and the embedding of a training step; returns the position ids.
    fn train_begin(&self, batch: &TrainBatch<'_>, st: &mut TrainState<B>, grads: &B::Buf) -> Result<Vec<u32>> {
        let cfg = &self.cfg;
        let (bsz, t) = (batch.batch, batch.seq);
        if self.quant.is_some() {
            return Err(ModelError::Input(
                "this model holds int8 weights, which are for inference only; train from the f32/bf16 model".into(),
            ));
        }
        if st.batch != bsz || st.seq != t {
            return Err(ModelError::Input(format!("train state is for {}×{}, batch is {bsz}×{t}", st.batch, st.seq)));
        }
        let n = bsz * t;
        if batch.ids.len() != n || batch.mask.len() != n || batch.targets.len() != n {
            return Err(ModelError::Input(format!(
                "batch of {bsz}×{t} needs {n} ids, mask entries and targets (got {}, {}, {})",
                batch.ids.len(),
                batch.mask.len(),
                batch.targets.len()
            )));
        }
        if grads.len() != self.layout.total() || grads.dtype() != DType::F32 {
            return Err(ModelError::Input("gradient buffer does not match the parameter layout".into()));
        }
        if let Some(bad) = batch.targets.iter().find(|&&x| x >= cfg.vocab_size as i32) {
            return Err(ModelError::Input(format!("target id {bad} is outside the vocabulary of {}", cfg.vocab_size)));
        }
        let pos = position_ids(batch.mask, bsz, t, t);
        if let Some(&p) = pos.iter().max() {
            if p as usize >= cfg.position_rows() {
                return Err(ModelError::Input(format!(
                    "sequence of {t} positions exceeds max_position_embeddings {}",
                    cfg.max_position_embeddings
                )));
            }
        }
        let first = &mut st.layers[0];
        self.embed(&mut first.x_in, &mut st.emb, batch.ids, &pos)?;
        Ok(pos)
    }

    /// Forward of layer `li` in a training step (activations kept for the backward).
    fn train_layer_forward(
        &self,
        li: usize,
        batch: &TrainBatch<'_>,
        st: &mut TrainState<B>,
        drop: Option<&DropoutCfg>,
    ) -> Result<()> {
        st.unpark(li);
        let keep = !st.recomputes();
        let (head, tail) = st.layers.split_at_mut(li + 1);
        let acts = &mut head[li];
        let out = match tail.first_mut() {
            Some(next) => next.x_in.vm(),
            None => st.x_last.vm(),
        };
        // Recomputation: this pass's probabilities are not needed (the backward re-runs it).
        let r = self.layer_forward(li, acts, out, batch.batch, batch.seq, Some(batch.mask), LayerKv::None, keep, drop);
        st.park(li);
        r
    }

    /// Backward of layer `li` in a training step; with recomputation, the layer's forward runs
    /// again first (same parameters, inputs and dropout masks, so the same activations).
    fn train_layer_backward(
        &self,
        li: usize,
        batch: &TrainBatch<'_>,
        st: &mut TrainState<B>,
        grads: &mut B::Buf,
        drop: Option<&DropoutCfg>,
    ) -> Result<()> {
        if !st.recomputes() {
            return self.layer_backward(li, st, grads, batch.batch, batch.seq, drop);
        }
        st.unpark(li);
        let r = (|| {
            let out = st.recompute_out.vm();
            let (b, t) = (batch.batch, batch.seq);
            self.layer_forward(li, &mut st.layers[li], out, b, t, Some(batch.mask), LayerKv::None, true, drop)?;
            self.layer_backward(li, st, grads, b, t, drop)
        })();
        st.park(li);
        r
    }

    /// The head of a training step: final norm, fused LM head + loss, and their backward down
    /// to `st.dx` = d(last layer output). Returns `(Σ loss, targets)`.
    fn train_head(
        &self,
        batch: &TrainBatch<'_>,
        st: &mut TrainState<B>,
        grads: &mut B::Buf,
        loss_scale: Option<f32>,
    ) -> Result<(f64, usize)> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let n = batch.batch * batch.seq;
        // v: this shard's vocabulary rows (V without tensor parallelism).
        let (c, dp, v) = (cfg.hidden_size, cfg.word_embed_proj_dim, self.layout.vocab);
        let nc = n * c;
        let lay = &self.layout;
        self.head_input(st.x_last.at(0, nc), &mut st.xf, &mut st.lnf_mean, &mut st.lnf_rstd, &mut st.xp, n)?;

        // ---- fused LM head + cross-entropy, in row chunks --------------------------------
        let count = batch.targets.iter().filter(|&&x| x >= 0).count();
        let scale = loss_scale.unwrap_or(if count > 0 { 1.0 / count as f32 } else { 0.0 });
        let head_off = lay.lm_head_or_wte();
        let mut total_loss = 0f64;
        let mut r0 = 0;
        while r0 < n {
            let rows = be.loss_chunk_rows().max(1).min(n - r0);
            let xp = st.xp.at(r0 * dp, rows * dp);
            be.matmul(
                st.logits.at_mut(0, rows * v),
                xp,
                self.p(head_off, v * dp),
                &Gemm::new(rows, v, dp, false, true),
            )?;
            match &self.hooks {
                Some(h) => self.vocab_parallel_ce(
                    h.as_ref(),
                    st.logits.at_mut(0, rows * v),
                    st.losses.at_mut(0, rows),
                    &batch.targets[r0..r0 + rows],
                    scale,
                )?,
                None => be.cross_entropy(
                    st.logits.at_mut(0, rows * v),
                    st.losses.at_mut(0, rows),
                    &batch.targets[r0..r0 + rows],
                    v,
                    Some(scale),
                )?,
            }
            total_loss += be.to_f32(st.losses.at(0, rows))?.iter().map(|&x| x as f64).sum::<f64>();
            // d head[V, Dp] += dlogitsᵀ · xp ; dxp = dlogits · head
            be.matmul(
                grads.at_mut(head_off, v * dp),
                st.logits.at(0, rows * v),
                xp,
                &Gemm::new(v, dp, rows, true, false).accumulate(),
            )?;
            be.matmul(
                st.dxp.at_mut(r0 * dp, rows * dp),
                st.logits.at(0, rows * v),
                self.p(head_off, v * dp),
                &Gemm::new(rows, dp, v, false, false),
            )?;
            r0 += rows;
        }
        // Each vocabulary shard gave a partial d(xp).
        self.tp_reduce(st.dxp.at_mut(0, n * dp))?;

        // ---- backward through project_out and the final LayerNorm ------------------------
        // st.dx <- d(last layer output)
        let dxf = match lay.project_out {
            Some(po) => {
                be.matmul(
                    grads.at_mut(po, dp * c),
                    st.dxp.at(0, n * dp),
                    st.xf.at(0, nc),
                    &Gemm::new(dp, c, n, true, false).accumulate(),
                )?;
                be.matmul(
                    st.da.at_mut(0, nc),
                    st.dxp.at(0, n * dp),
                    self.p(po, dp * c),
                    &Gemm::new(n, c, dp, false, false),
                )?;
                st.da.at(0, nc)
            }
            None => st.dxp.at(0, nc),
        };
        if cfg.has_final_layer_norm() {
            be.fill(st.dx.at_mut(0, nc), 0.0)?;
            ln_backward(
                be,
                grads,
                &mut st.dlnw,
                &mut st.dlnb,
                lay.final_ln_w,
                lay.final_ln_b,
                st.dx.at_mut(0, nc),
                dxf,
                st.x_last.at(0, nc),
                self.po(lay.final_ln_w, c),
                st.lnf_mean.at(0, n),
                st.lnf_rstd.at(0, n),
                c,
            )?;
        } else {
            be.copy(st.dx.at_mut(0, nc), dxf)?;
        }

        Ok((total_loss, count))
    }

    /// The embeddings' backward, from `st.dx` = d(first layer input).
    fn train_embed_backward(
        &self,
        batch: &TrainBatch<'_>,
        st: &mut TrainState<B>,
        grads: &mut B::Buf,
        pos: &[u32],
    ) -> Result<()> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let n = batch.batch * batch.seq;
        let (c, dp, v) = (cfg.hidden_size, cfg.word_embed_proj_dim, self.layout.vocab);
        let nc = n * c;
        let lay = &self.layout;
        be.embedding_backward(grads.at_mut(lay.wpe, cfg.position_rows() * c), pos, st.dx.at(0, nc), c)?;
        match lay.project_in {
            Some(pi) => {
                be.matmul(
                    grads.at_mut(pi, c * dp),
                    st.dx.at(0, nc),
                    st.emb.at(0, n * dp),
                    &Gemm::new(c, dp, n, true, false).accumulate(),
                )?;
                be.matmul(
                    st.demb.at_mut(0, n * dp),
                    st.dx.at(0, nc),
                    self.p(pi, c * dp),
                    &Gemm::new(n, dp, c, false, false),
                )?;
            }
            None => be.copy(st.demb.at_mut(0, n * dp), st.dx.at(0, nc))?,
        }
        // nn.Embedding(padding_idx = pad_token_id): the padding row gets no gradient from the
        // lookup (it may still get one through a tied LM head).
        // Ids another vocabulary shard owns contribute nothing here.
        let (local, owned) = match &self.hooks {
            Some(_) => self.local_ids(batch.ids),
            None => (batch.ids.to_vec(), vec![true; n]),
        };
        for (r, &id) in batch.ids.iter().enumerate() {
            if id == cfg.pad_token_id || !owned[r] {
                be.fill(st.demb.at_mut(r * dp, dp), 0.0)?;
            }
        }
        be.embedding_backward(grads.at_mut(lay.wte, v * dp), &local, st.demb.at(0, n * dp), dp)?;
        Ok(())
    }

    /// Linear backward: `dW += dyᵀ x`, `db += Σ dy`, `dx (+)= dy W`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        grads: &mut B::Buf,
        dx: ViewMut<'_, B::Buf>,
        dx_accumulate: bool,
        dy: View<'_, B::Buf>,
        x: View<'_, B::Buf>,
        w: usize,
        b: Option<usize>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        let be = &self.backend;
        be.matmul(
            grads.at_mut(w, out_dim * in_dim),
            dy,
            x,
            &Gemm::new(out_dim, in_dim, rows, true, false).accumulate(),
        )?;
        if let Some(b) = b {
            be.bias_backward(grads.at_mut(b, out_dim), dy, out_dim)?;
        }
        let mut g = Gemm::new(rows, in_dim, out_dim, false, false);
        if dx_accumulate {
            g = g.accumulate();
        }
        be.matmul(dx, dy, self.p(w, out_dim * in_dim), &g)?;
        Ok(())
    }

    /// Backward of layer `li`: on entry `st.dx` = d(layer output); on exit d(layer input).
    fn layer_backward(
        &self,
        li: usize,
        st: &mut TrainState<B>,
        grads: &mut B::Buf,
        batch: usize,
        t: usize,
        drop: Option<&DropoutCfg>,
    ) -> Result<()> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let l = &self.layout.layers[li];
        let (c, f, ca) = (cfg.hidden_size, self.layout.ffn_dim, self.layout.attn_dim);
        let n = batch * t;
        let nc = n * c;
        let nca = n * ca;
        let nf = n * f;
        let pre = cfg.do_layer_norm_before;
        let acts = &st.layers[li];
        let act = cfg.activation();

        // FFN block. `st.da` ends as d(f_in).
        // pre-LN: out = resid1 + drop(fc2(act(fc1(ln2(resid1)))))
        // post-LN: out = ln2(resid2), resid2 = ln1_out + drop(fc2(...(ln1_out)))
        if !pre {
            // st.dc = d resid2
            be.fill(st.dc.at_mut(0, nc), 0.0)?;
            ln_backward(
                be,
                grads,
                &mut st.dlnw,
                &mut st.dlnb,
                l.ln2_w,
                l.ln2_b,
                st.dc.at_mut(0, nc),
                st.dx.at(0, nc),
                acts.resid2.at(0, nc),
                self.po(l.ln2_w, c),
                acts.ln2_mean.at(0, n),
                acts.ln2_rstd.at(0, n),
                c,
            )?;
            // residual path: d ln1_out starts as d resid2
            be.copy(st.dx.at_mut(0, nc), st.dc.at(0, nc))?;
        } else {
            be.copy(st.dc.at_mut(0, nc), st.dx.at(0, nc))?;
        }
        // st.dc = d(fc2 output) before dropout-backward; st.dx = d(residual input of FFN)
        if let Some(d) = drop.and_then(|d| d.site(li, 1, d.p)) {
            be.dropout(st.dc.at_mut(0, nc), &d)?;
        }
        self.linear_backward(
            grads,
            st.df1.at_mut(0, nf),
            false,
            st.dc.at(0, nc),
            acts.fc1_act.at(0, nf),
            l.fc2_w,
            l.fc2_b,
            n,
            f,
            c,
        )?;
        be.activation_backward(act, st.df2.at_mut(0, nf), acts.fc1_pre.at(0, nf), st.df1.at(0, nf))?;
        let f_in = if pre { acts.ln2_out.at(0, nc) } else { acts.ln1_out.at(0, nc) };
        self.linear_backward(grads, st.da.at_mut(0, nc), false, st.df2.at(0, nf), f_in, l.fc1_w, l.fc1_b, n, c, f)?;
        // fc1 is column-parallel: its input gradient is a partial sum over the FFN shards.
        self.tp_reduce(st.da.at_mut(0, nc))?;
        if pre {
            // d resid1 = d out (residual, in st.dx) + LN2ᵀ(d f_in)
            ln_backward(
                be,
                grads,
                &mut st.dlnw,
                &mut st.dlnb,
                l.ln2_w,
                l.ln2_b,
                st.dx.at_mut(0, nc),
                st.da.at(0, nc),
                acts.resid1.at(0, nc),
                self.po(l.ln2_w, c),
                acts.ln2_mean.at(0, n),
                acts.ln2_rstd.at(0, n),
                c,
            )?;
        } else {
            // d ln1_out = residual part (st.dx) + d f_in; then d resid1 = LN1ᵀ(d ln1_out)
            be.add_assign(st.dx.at_mut(0, nc), st.da.at(0, nc))?;
            be.fill(st.dc.at_mut(0, nc), 0.0)?;
            ln_backward(
                be,
                grads,
                &mut st.dlnw,
                &mut st.dlnb,
                l.ln1_w,
                l.ln1_b,
                st.dc.at_mut(0, nc),
                st.dx.at(0, nc),
                acts.resid1.at(0, nc),
                self.po(l.ln1_w, c),
                acts.ln1_mean.at(0, n),
                acts.ln1_rstd.at(0, n),
                c,
            )?;
            be.copy(st.dx.at_mut(0, nc), st.dc.at(0, nc))?;
        }
        // st.dx = d resid1 = d x_in (residual part) = d(out_proj output after dropout)

        // Attention block.
        be.copy(st.dc.at_mut(0, nc), st.dx.at(0, nc))?;
        if let Some(d) = drop.and_then(|d| d.site(li, 0, d.p)) {
            be.dropout(st.dc.at_mut(0, nc), &d)?;
        }
        self.linear_backward(
            grads,
            st.db.at_mut(0, nca),
            false,
            st.dc.at(0, nc),
            acts.attn_y.at(0, nca),
            l.o_w,
            l.o_b,
            n,
            ca,
            c,
        )?;
        let dims = AttnDims {
            batch,
            tq: t,
            tk: t,
            heads: self.local_heads(),
            head_dim: cfg.head_dim(),
            q_offset: 0,
            kv_batch_stride: t * ca,
            scale: (cfg.head_dim() as f32).powf(-0.5),
        };
        let attn_drop = drop.and_then(|d| d.site(li, 2, d.attn_p));
        be.attention_backward(
            st.dq.at_mut(0, nca),
            st.dk.at_mut(0, nca),
            st.dv.at_mut(0, nca),
            st.db.at(0, nca),
            acts.q.at(0, nca),
            acts.k.at(0, nca),
            acts.v.at(0, nca),
            acts.probs.at(0, batch * dims.heads * t * t),
            &dims,
            attn_drop.as_ref(),
        )?;
        let a_in = if pre { acts.ln1_out.at(0, nc) } else { acts.x_in.at(0, nc) };
        self.linear_backward(grads, st.da.at_mut(0, nc), false, st.dq.at(0, nca), a_in, l.q_w, l.q_b, n, c, ca)?;
        self.linear_backward(grads, st.da.at_mut(0, nc), true, st.dk.at(0, nca), a_in, l.k_w, l.k_b, n, c, ca)?;
        self.linear_backward(grads, st.da.at_mut(0, nc), true, st.dv.at(0, nca), a_in, l.v_w, l.v_b, n, c, ca)?;
        // q/k/v are column-parallel: their input gradient is a partial sum over the head shards.
        self.tp_reduce(st.da.at_mut(0, nc))?;
        if pre {
            ln_backward(
                be,
                grads,
                &mut st.dlnw,
                &mut st.dlnb,
                l.ln1_w,
                l.ln1_b,
                st.dx.at_mut(0, nc),
                st.da.at(0, nc),
                acts.x_in.at(0, nc),
                self.po(l.ln1_w, c),
                acts.ln1_mean.at(0, n),
                acts.ln1_rstd.at(0, n),
                c,
            )?;
        } else {
            be.add_assign(st.dx.at_mut(0, nc), st.da.at(0, nc))?;
        }
        Ok(())
    }
}

/// LayerNorm backward whose weight/bias gradients land in `grads` at `w`/`b`. The kernel
/// accumulates them into scratch first because two writable windows of one buffer cannot be
/// borrowed at once.
#[allow(clippy::too_many_arguments)]
fn ln_backward<B: Backend>(
    be: &B,
    grads: &mut B::Buf,
    dlnw: &mut B::Buf,
    dlnb: &mut B::Buf,
    w: Option<usize>,
    b: Option<usize>,
    dinp: ViewMut<'_, B::Buf>,
    dout: View<'_, B::Buf>,
    inp: View<'_, B::Buf>,
    weight: Option<View<'_, B::Buf>>,
    mean: View<'_, B::Buf>,
    rstd: View<'_, B::Buf>,
    c: usize,
) -> Result<()> {
    if w.is_some() {
        be.fill(dlnw.at_mut(0, c), 0.0)?;
    }
    if b.is_some() {
        be.fill(dlnb.at_mut(0, c), 0.0)?;
    }
    be.layernorm_backward(
        dinp,
        w.map(|_| dlnw.at_mut(0, c)),
        b.map(|_| dlnb.at_mut(0, c)),
        dout,
        inp,
        weight,
        mean,
        rstd,
        c,
    )?;
    if let Some(o) = w {
        be.add_assign(grads.at_mut(o, c), dlnw.at(0, c))?;
    }
    if let Some(o) = b {
        be.add_assign(grads.at_mut(o, c), dlnb.at(0, c))?;
    }
    Ok(())
}

fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&i| i as usize >= vocab) {
        Some(bad) => Err(ModelError::Input(format!("token id {bad} is outside the vocabulary of {vocab}"))),
        None => Ok(()),
    }
}
