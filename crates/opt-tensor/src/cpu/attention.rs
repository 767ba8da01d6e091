//! Causal multi-head attention with a key padding mask, attention dropout and a KV-cache
//! friendly key/value layout (see [`AttnDims`]).
//!
//! Semantics (HF `OPTAttention`, eager path): `scores = (q · k) * scale`; keys `j > q_offset + i`
//! (future) and keys with `key_mask == 0` (padding) are excluded; softmax in f32. HF adds
//! `finfo(f32).min` instead of `-inf` for every excluded entry (future or padding), and
//! `score + finfo.min` rounds to `finfo.min` for any ordinary score, so a row whose causal keys
//! are *all* padding (a left-padding query) sees equal scores everywhere and gets uniform
//! weights over *all* `tk` keys, future ones included. We reproduce exactly that, as the
//! [`Backend`] contract states; such rows only ever feed padding positions.
//!
//! Dropout (training) multiplies the probabilities after the softmax by the mask of
//! `rng::uniform(seed, offset + flat index into [B, NH, Tq, Tk])`; the saved probabilities are
//! the pre-dropout ones, and the backward pass regenerates the mask.
//!
//! The products (`Q Kᵀ`, `P V` and the four backward ones) are strided single-threaded `gemm`
//! calls directly on a head's columns of the `[B, T, C]` activations (no head-split copies).
//! Work is split over (batch, head) pairs. Each pair writes a private `[T, HS]` slab of a
//! scratch buffer, then the slabs are scattered into the `[B, T, C]` outputs: no shared writes,
//! and each pair's sums (including the `dk`/`dv` accumulation over query blocks) run in a fixed
//! order, so the results do not depend on scheduling.
//!
//! [`Backend`]: crate::Backend

use rayon::prelude::*;

use super::elementwise::{dropped, keep_scale};
use super::math::{self, dot};
use super::matmul::{gemm_strided, Strides};
use super::par::{self, PAR_MIN_ELEMS};
use super::simd::multiversion;
use crate::backend::{AttnDims, Dropout};
use crate::{Result, TensorError};

/// Below this many multiply-adds (`B * NH * Tq * Tk * HS`) attention runs on one thread.
const PAR_ATTN_WORK: usize = 1 << 16;

/// Queries per block: scores are computed for a block of queries at a time, only up to the
/// block's last causal key (skipping most of the masked upper triangle), and without saved
/// probabilities the score buffer stays `Q_BLOCK × Tk`.
const Q_BLOCK: usize = 64;

/// Element counts of the attention operands.
pub(crate) struct Shapes {
    /// `B * Tq * C`: q, out, dq, dout.
    pub q_len: usize,
    /// `B * Tk * C`: dk, dv (contiguous).
    pub kv_dense_len: usize,
    /// `B * NH * Tq * Tk`.
    pub probs_len: usize,
}

/// Validate dims against the operand lengths; returns the expected sizes of the others.
pub(crate) fn check(
    op: &'static str,
    d: &AttnDims,
    q_len: usize,
    k_len: usize,
    v_len: usize,
    key_mask: Option<&[u8]>,
    dropout: Option<&Dropout>,
) -> Result<Shapes> {
    let err = |detail: String| TensorError::Shape { op, detail };
    let ovf = || err(format!("{d:?} overflows usize"));
    let prod = |f: &[usize]| f.iter().try_fold(1usize, |a, &x| a.checked_mul(x)).ok_or_else(ovf);
    if d.heads == 0 || d.head_dim == 0 {
        return Err(err(format!("heads ({}) and head_dim ({}) must be positive", d.heads, d.head_dim)));
    }
    if d.tk == 0 && d.batch * d.tq > 0 {
        return Err(err("queries with no keys (tk == 0)".into()));
    }
    let c = prod(&[d.heads, d.head_dim])?;
    let shapes = Shapes {
        q_len: prod(&[d.batch, d.tq, c])?,
        kv_dense_len: prod(&[d.batch, d.tk, c])?,
        probs_len: prod(&[d.batch, d.heads, d.tq, d.tk])?,
    };
    if q_len != shapes.q_len {
        return Err(err(format!("q has {q_len} elements, expected B*Tq*C = {}", shapes.q_len)));
    }
    if d.batch > 0 {
        let need = prod(&[d.batch - 1, d.kv_batch_stride])?.checked_add(prod(&[d.tk, c])?).ok_or_else(ovf)?;
        for (what, len) in [("k", k_len), ("v", v_len)] {
            if len < need {
                return Err(err(format!("{what} has {len} elements, needs {need} ((B-1)*kv_batch_stride + Tk*C)")));
            }
        }
    }
    if let Some(m) = key_mask {
        if m.len() != d.batch * d.tk {
            return Err(err(format!("key_mask has {} entries, expected B*Tk = {}", m.len(), d.batch * d.tk)));
        }
    }
    if let Some(dr) = dropout {
        if !(0.0..1.0).contains(&dr.p) {
            return Err(err(format!("attention dropout probability {} outside [0, 1)", dr.p)));
        }
    }
    Ok(shapes)
}

/// Dims unpacked once, plus the derived channel count.
#[derive(Clone, Copy)]
struct Geo {
    tq: usize,
    tk: usize,
    heads: usize,
    hs: usize,
    c: usize,
    q_offset: usize,
    kvs: usize,
}

impl Geo {
    fn new(d: &AttnDims) -> Self {
        Geo {
            tq: d.tq,
            tk: d.tk,
            heads: d.heads,
            hs: d.head_dim,
            c: d.heads * d.head_dim,
            q_offset: d.q_offset,
            kvs: d.kv_batch_stride,
        }
    }
    /// Number of causal keys of query `i`: keys `0..=q_offset + i`, capped at `tk`.
    #[inline]
    fn causal(&self, i: usize) -> usize {
        (self.q_offset + i + 1).min(self.tk)
    }
}

/// Dropout factor for one probability: 0 when dropped, `1/(1-p)` when kept, 1 without dropout.
#[inline]
fn drop_factor(d: Option<&Dropout>, scale: f32, index: usize) -> f32 {
    match d {
        Some(d) if dropped(d, index as u64) => 0.0,
        Some(_) => scale,
        None => 1.0,
    }
}

multiversion! {
    /// One query row in place: `prow[..limit]` holds the causal keys' scores; padding keys are
    /// excluded, the row is softmaxed, and future keys get 0. Returns how many leading keys may
    /// carry weight: `limit`, or `tk` for a row whose keys are all padding (uniform over all keys,
    /// see the module docs).
    fn softmax_row(prow: &mut [f32], limit: usize, mask: Option<&[u8]>) -> usize {
        if let Some(m) = mask {
            for (p, &keep) in prow[..limit].iter_mut().zip(m) {
                if keep == 0 {
                    *p = f32::NEG_INFINITY;
                }
            }
        }
        let mx = math::max(&prow[..limit]);
        if mx == f32::NEG_INFINITY {
            // Every causal key is padding: HF's additive finfo.min mask makes all `tk` scores equal.
            prow.fill(1.0 / prow.len() as f32);
            return prow.len();
        }
        prow[limit..].fill(0.0);
        // exp(-inf - max) = 0 for the padding keys.
        for p in prow[..limit].iter_mut() {
            *p = math::exp(*p - mx);
        }
        let inv = (1.0 / math::sum(&prow[..limit])) as f32;
        for p in prow[..limit].iter_mut() {
            *p *= inv;
        }
        limit
    }
}

/// `dst[r, j] = src[r, j] * dropout factor` for rows `i0..i0+rows` of pair `bh` (first `cols`
/// columns of each `tk`-wide row).
#[allow(clippy::too_many_arguments)]
fn apply_dropout(dst: &mut [f32], src: &[f32], g: &Geo, bh: usize, i0: usize, cols: usize, d: &Dropout, scale: f32) {
    for (r, (drow, srow)) in dst.chunks_exact_mut(g.tk).zip(src.chunks_exact(g.tk)).enumerate() {
        let flat = (bh * g.tq + i0 + r) * g.tk;
        for j in 0..cols {
            drow[j] = srow[j] * drop_factor(Some(d), scale, flat + j);
        }
    }
}

/// Scatter `[B, NH, T, HS]` head slabs into `[B, T, C]` rows (overwriting).
fn scatter_heads(dst: &mut [f32], src: &[f32], t: usize, heads: usize, hs: usize) {
    let c = heads * hs;
    par::for_each_chunk_mut(dst, c, PAR_MIN_ELEMS, |bt, row| {
        let (b, i) = (bt / t, bt % t);
        for h in 0..heads {
            let s = ((b * heads + h) * t + i) * hs;
            row[h * hs..(h + 1) * hs].copy_from_slice(&src[s..s + hs]);
        }
    });
}

/// Attention forward; shapes checked by [`check`].
///
/// Per (batch, head) pair and block of [`Q_BLOCK`] queries: `S = scale · Q Kᵀ` (one strided
/// gemm over the head's columns, only up to the block's last causal key), row softmax with the
/// masks, optional dropout, then `ctx = P V` (another gemm).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    out: &mut [f32],
    probs: Option<&mut [f32]>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: Option<&[u8]>,
    dims: &AttnDims,
    dropout: Option<&Dropout>,
) {
    let g = Geo::new(dims);
    if dims.batch == 0 || g.tq == 0 {
        return;
    }
    let drop = dropout.filter(|d| d.p > 0.0);
    let dscale = drop.map_or(1.0, |d| keep_scale(d.p));
    let mut ctx = vec![0.0f32; dims.batch * g.heads * g.tq * g.hs];
    let block_len = Q_BLOCK.min(g.tq) * g.tk;

    // One (batch, head) pair: `ctx` is its [Tq, HS] slab, `probs` its [Tq, Tk] block if saved.
    let pair = |bh: usize, ctx: &mut [f32], mut probs: Option<&mut [f32]>| {
        let (b, h) = (bh / g.heads, bh % g.heads);
        let kv = &k[b * g.kvs + h * g.hs..];
        let vv = &v[b * g.kvs + h * g.hs..];
        let mask = key_mask.map(|m| &m[b * g.tk..(b + 1) * g.tk]);
        let mut scores = if probs.is_some() { Vec::new() } else { vec![0.0f32; block_len] };
        let mut dropped = if drop.is_some() { vec![0.0f32; block_len] } else { Vec::new() };
        for i0 in (0..g.tq).step_by(Q_BLOCK) {
            let rows = Q_BLOCK.min(g.tq - i0);
            let sblock: &mut [f32] = match probs.as_deref_mut() {
                Some(p) => &mut p[i0 * g.tk..(i0 + rows) * g.tk],
                None => &mut scores[..rows * g.tk],
            };
            let qrows = &q[(b * g.tq + i0) * g.c + h * g.hs..];
            let keys = g.causal(i0 + rows - 1);
            gemm_strided(
                (rows, keys, g.hs),
                sblock,
                Strides::rows(g.tk),
                qrows,
                Strides::rows(g.c),
                kv,
                Strides::cols(g.c),
                dims.scale,
                false,
            );
            let mut span = 0;
            for (r, prow) in sblock.chunks_exact_mut(g.tk).enumerate() {
                span = span.max(softmax_row(prow, g.causal(i0 + r), mask));
            }
            let pblock: &[f32] = match drop {
                Some(d) => {
                    apply_dropout(&mut dropped[..rows * g.tk], sblock, &g, bh, i0, span, d, dscale);
                    &dropped[..rows * g.tk]
                }
                None => sblock,
            };
            gemm_strided(
                (rows, g.hs, span),
                &mut ctx[i0 * g.hs..],
                Strides::rows(g.hs),
                pblock,
                Strides::rows(g.tk),
                vv,
                Strides::rows(g.c),
                1.0,
                false,
            );
        }
    };

    let parallel = par::worth_parallel((dims.batch * g.heads * g.tq * g.tk).saturating_mul(g.hs), PAR_ATTN_WORK);
    let slab = g.tq * g.hs;
    match probs {
        Some(p) if parallel => ctx
            .par_chunks_mut(slab)
            .zip(p.par_chunks_mut(g.tq * g.tk))
            .enumerate()
            .for_each(|(bh, (c, p))| pair(bh, c, Some(p))),
        Some(p) => ctx
            .chunks_mut(slab)
            .zip(p.chunks_mut(g.tq * g.tk))
            .enumerate()
            .for_each(|(bh, (c, p))| pair(bh, c, Some(p))),
        None if parallel => ctx.par_chunks_mut(slab).enumerate().for_each(|(bh, c)| pair(bh, c, None)),
        None => ctx.chunks_mut(slab).enumerate().for_each(|(bh, c)| pair(bh, c, None)),
    }
    scatter_heads(out, &ctx, g.tq, g.heads, g.hs);
}

/// Attention backward from the saved (pre-dropout) probabilities `P`:
/// `P' = P ∘ D` (dropout), `dV = P'ᵀ dO`, `dP = (dO Vᵀ) ∘ D`, `dS = P ∘ (dP - rowsum(P ∘ dP))`,
/// then `dQ = scale · dS K` and `dK = scale · dSᵀ Q`. The saved `P` is used over all `tk` keys
/// with no re-masking, as autograd does: masked keys have `P = 0` and get nothing, and rows that
/// were entirely padding (uniform `P` over all keys) are differentiated as a softmax over equal
/// scores, which is what autograd gives for HF's additive `finfo.min` mask.
///
/// Each (batch, head) pair walks its query blocks in order, accumulating `dK`/`dV` in its own
/// slabs, so the sums are sequential and deterministic.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dims: &AttnDims,
    dropout: Option<&Dropout>,
) {
    let g = Geo::new(dims);
    let pairs = dims.batch * g.heads;
    if pairs == 0 || g.tq == 0 {
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        return;
    }
    let drop = dropout.filter(|d| d.p > 0.0);
    let dscale = drop.map_or(1.0, |d| keep_scale(d.p));
    let mut dq_s = vec![0.0f32; pairs * g.tq * g.hs];
    let mut dk_s = vec![0.0f32; pairs * g.tk * g.hs];
    let mut dv_s = vec![0.0f32; pairs * g.tk * g.hs];
    let block_len = Q_BLOCK.min(g.tq) * g.tk;

    // One (batch, head) pair; its dq [Tq, HS] and dk, dv [Tk, HS] slabs start zeroed.
    let pair = |bh: usize, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]| {
        let (b, h) = (bh / g.heads, bh % g.heads);
        let kv = &k[b * g.kvs + h * g.hs..];
        let vv = &v[b * g.kvs + h * g.hs..];
        let pall = &probs[bh * g.tq * g.tk..(bh + 1) * g.tq * g.tk];
        let mut ds = vec![0.0f32; block_len];
        let mut dropped = if drop.is_some() { vec![0.0f32; block_len] } else { Vec::new() };
        for i0 in (0..g.tq).step_by(Q_BLOCK) {
            let rows = Q_BLOCK.min(g.tq - i0);
            let pblock = &pall[i0 * g.tk..(i0 + rows) * g.tk];
            // Keys with weight in this block: the causal ones, or all when a row was uniform.
            let causal = g.causal(i0 + rows - 1);
            let keys =
                if pblock.chunks_exact(g.tk).any(|r| r[causal..].iter().any(|&p| p != 0.0)) { g.tk } else { causal };
            let row0 = (b * g.tq + i0) * g.c + h * g.hs;
            let (dorows, qrows) = (&dout[row0..], &q[row0..]);
            let pd: &[f32] = match drop {
                Some(d) => {
                    apply_dropout(&mut dropped[..rows * g.tk], pblock, &g, bh, i0, keys, d, dscale);
                    &dropped[..rows * g.tk]
                }
                None => pblock,
            };
            // dV += P'ᵀ dO
            gemm_strided(
                (keys, g.hs, rows),
                dv,
                Strides::rows(g.hs),
                pd,
                Strides::cols(g.tk),
                dorows,
                Strides::rows(g.c),
                1.0,
                true,
            );
            // dP' = dO Vᵀ
            let dsb = &mut ds[..rows * g.tk];
            gemm_strided(
                (rows, keys, g.hs),
                dsb,
                Strides::rows(g.tk),
                dorows,
                Strides::rows(g.c),
                vv,
                Strides::cols(g.c),
                1.0,
                false,
            );
            // dS = scale · P ∘ (dP - rowsum(P ∘ dP)), with dP = dP' ∘ D.
            for (r, (dsr, pr)) in dsb.chunks_exact_mut(g.tk).zip(pblock.chunks_exact(g.tk)).enumerate() {
                let (dsr, pr) = (&mut dsr[..keys], &pr[..keys]);
                if drop.is_some() {
                    let flat = (bh * g.tq + i0 + r) * g.tk;
                    for (j, x) in dsr.iter_mut().enumerate() {
                        *x *= drop_factor(drop, dscale, flat + j);
                    }
                }
                let pdp = dot(pr, dsr);
                for (x, &p) in dsr.iter_mut().zip(pr) {
                    *x = p * (*x - pdp) * dims.scale;
                }
            }
            // dQ = dS K, dK += dSᵀ Q
            gemm_strided(
                (rows, g.hs, keys),
                &mut dq[i0 * g.hs..],
                Strides::rows(g.hs),
                dsb,
                Strides::rows(g.tk),
                kv,
                Strides::rows(g.c),
                1.0,
                false,
            );
            gemm_strided(
                (keys, g.hs, rows),
                dk,
                Strides::rows(g.hs),
                dsb,
                Strides::cols(g.tk),
                qrows,
                Strides::rows(g.c),
                1.0,
                true,
            );
        }
    };

    let (sq, skv) = (g.tq * g.hs, g.tk * g.hs);
    if par::worth_parallel((pairs * g.tq * g.tk).saturating_mul(g.hs), PAR_ATTN_WORK) {
        dq_s.par_chunks_mut(sq)
            .zip(dk_s.par_chunks_mut(skv))
            .zip(dv_s.par_chunks_mut(skv))
            .enumerate()
            .for_each(|(bh, ((a, b), c))| pair(bh, a, b, c));
    } else {
        dq_s.chunks_mut(sq)
            .zip(dk_s.chunks_mut(skv))
            .zip(dv_s.chunks_mut(skv))
            .enumerate()
            .for_each(|(bh, ((a, b), c))| pair(bh, a, b, c));
    }
    scatter_heads(dq, &dq_s, g.tq, g.heads, g.hs);
    scatter_heads(dk, &dk_s, g.tk, g.heads, g.hs);
    scatter_heads(dv, &dv_s, g.tk, g.heads, g.hs);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Buffer};
    use crate::cpu::testutil::*;
    use crate::cpu::{CpuBackend, CpuBuf};
    use crate::rng;

    /// Naive f64 attention: returns (out [B,Tq,C], probs [B,NH,Tq,Tk] pre-dropout).
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[u8]>,
        d: &AttnDims,
        drop: Option<&Dropout>,
    ) -> (Vec<f64>, Vec<f64>) {
        let c = d.heads * d.head_dim;
        let mut out = vec![0.0; d.batch * d.tq * c];
        let mut probs = vec![0.0; d.batch * d.heads * d.tq * d.tk];
        for b in 0..d.batch {
            for h in 0..d.heads {
                for i in 0..d.tq {
                    let allowed = |j: usize| j <= d.q_offset + i && mask.is_none_or(|m| m[b * d.tk + j] != 0);
                    let keys: Vec<usize> = (0..d.tk).filter(|&j| allowed(j)).collect();
                    let mut p = vec![0.0f64; d.tk];
                    if keys.is_empty() {
                        // HF: every score + finfo.min rounds to finfo.min: uniform over all keys.
                        p.fill(1.0 / d.tk as f64);
                    } else {
                        let s: Vec<f64> = keys
                            .iter()
                            .map(|&j| {
                                (0..d.head_dim)
                                    .map(|e| {
                                        q[(b * d.tq + i) * c + h * d.head_dim + e] as f64
                                            * k[b * d.kv_batch_stride + j * c + h * d.head_dim + e] as f64
                                    })
                                    .sum::<f64>()
                                    * d.scale as f64
                            })
                            .collect();
                        let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                        let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                        for (&j, x) in keys.iter().zip(&s) {
                            p[j] = (x - mx).exp() / z;
                        }
                    }
                    for j in 0..d.tk {
                        let flat = ((b * d.heads + h) * d.tq + i) * d.tk + j;
                        probs[flat] = p[j];
                        let w = match drop {
                            Some(dr) if rng::uniform(dr.seed, dr.offset + flat as u64) < dr.p => 0.0,
                            Some(dr) => p[j] / (1.0 - dr.p as f64),
                            None => p[j],
                        };
                        for e in 0..d.head_dim {
                            out[(b * d.tq + i) * c + h * d.head_dim + e] +=
                                w * v[b * d.kv_batch_stride + j * c + h * d.head_dim + e] as f64;
                        }
                    }
                }
            }
        }
        (out, probs)
    }

    fn dims(batch: usize, tq: usize, tk: usize, heads: usize, hs: usize) -> AttnDims {
        AttnDims {
            batch,
            tq,
            tk,
            heads,
            head_dim: hs,
            q_offset: tk - tq,
            kv_batch_stride: tk * heads * hs,
            scale: 1.0 / (hs as f32).sqrt(),
        }
    }

    fn run_forward(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[u8]>,
        d: &AttnDims,
        drop: Option<&Dropout>,
    ) -> (Vec<f32>, Vec<f32>) {
        let be = CpuBackend::new();
        let (qb, kb, vb) =
            (CpuBuf::from_f32_vec(q.to_vec()), CpuBuf::from_f32_vec(k.to_vec()), CpuBuf::from_f32_vec(v.to_vec()));
        let mut out = out_f32(q.len());
        let mut probs = out_f32(d.batch * d.heads * d.tq * d.tk);
        be.attention_forward(out.vm(), Some(probs.vm()), qb.v(), kb.v(), vb.v(), mask, d, drop).unwrap();
        // Without saved probabilities the output is identical.
        let mut out2 = out_f32(q.len());
        be.attention_forward(out2.vm(), None, qb.v(), kb.v(), vb.v(), mask, d, drop).unwrap();
        assert_eq!(bits_of(&out), bits_of(&out2));
        (out.to_f32_vec(), probs.to_f32_vec())
    }

    fn to32(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }

    #[test]
    fn forward_matches_naive_with_padding_and_fully_masked_rows() {
        let d = dims(2, 6, 6, 3, 8);
        let n = 2 * 6 * 24;
        let (q, k, v) = (randn(1, n), randn(2, n), randn(3, n));
        // Batch 0: right padding; batch 1: left padding (queries 0, 1 see only padding).
        let mask = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1u8];
        for m in [None, Some(&mask[..])] {
            let (out, probs) = run_forward(&q, &k, &v, m, &d, None);
            let (wo, wp) = naive(&q, &k, &v, m, &d, None);
            assert_all_close(&out, &to32(&wo), 1e-5);
            assert_all_close(&probs, &to32(&wp), 1e-6);
        }
        // The fully masked queries 0 and 1 of batch 1 attend uniformly to all keys (as HF's
        // additive finfo.min mask gives), future ones included.
        let (_, probs) = run_forward(&q, &k, &v, Some(&mask), &d, None);
        for i in 0..2 {
            let row = &probs[(3 * 6 + i) * 6..(3 * 6 + i) * 6 + 6];
            assert_eq!(row, &[1.0 / 6.0; 6]);
        }
    }

    #[test]
    fn forward_with_kv_cache_layout_and_large_problem() {
        // KV cache of capacity 10, 7 filled, 2 new queries at positions 5 and 6.
        let (b, heads, hs, tmax) = (2, 2, 4, 10);
        let c = heads * hs;
        let mut d = dims(b, 2, 7, heads, hs);
        d.kv_batch_stride = tmax * c;
        let q = randn(4, b * 2 * c);
        let k = randn(5, b * tmax * c);
        let v = randn(6, b * tmax * c);
        let mask = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1u8];
        let (out, probs) = run_forward(&q, &k, &v, Some(&mask), &d, None);
        let (wo, wp) = naive(&q, &k, &v, Some(&mask), &d, None);
        assert_all_close(&out, &to32(&wo), 1e-5);
        assert_all_close(&probs, &to32(&wp), 1e-6);
        // Single-token decode.
        let mut d1 = d;
        d1.tq = 1;
        d1.q_offset = 6;
        let (out, _) = run_forward(&q[..b * c], &k, &v, None, &d1, None);
        let (wo, _) = naive(&q[..b * c], &k, &v, None, &d1, None);
        assert_all_close(&out, &to32(&wo), 1e-5);
        // A problem big enough to run in parallel.
        let d = dims(2, 64, 64, 4, 16);
        let n = 2 * 64 * 64;
        let (q, k, v) = (randn(7, n), randn(8, n), randn(9, n));
        let (out, probs) = run_forward(&q, &k, &v, None, &d, None);
        let (wo, wp) = naive(&q, &k, &v, None, &d, None);
        assert_all_close(&out, &to32(&wo), 1e-5);
        assert_all_close(&probs, &to32(&wp), 1e-6);
    }

    #[test]
    fn forward_dropout_applies_counter_mask() {
        let d = dims(2, 5, 5, 2, 4);
        let n = 2 * 5 * 8;
        let (q, k, v) = (randn(10, n), randn(11, n), randn(12, n));
        let drop = Dropout { p: 0.3, seed: 77, offset: 5 };
        let (out, probs) = run_forward(&q, &k, &v, None, &d, Some(&drop));
        let (wo, wp) = naive(&q, &k, &v, None, &d, Some(&drop));
        assert_all_close(&out, &to32(&wo), 1e-5);
        // Saved probabilities are pre-dropout.
        assert_all_close(&probs, &to32(&wp), 1e-6);
        let (plain, _) = run_forward(&q, &k, &v, None, &d, None);
        assert_ne!(out, plain);
    }

    /// Finite differences of `L = Σ out * dout` in f64 against the backward kernel.
    /// Analytic attention backward in f64 from the naive probabilities, over all `tk` keys (what
    /// autograd computes through HF's additive mask). Returns (dq, dk, dv) with dk/dv dense.
    fn naive_backward(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[u8]>,
        d: &AttnDims,
        drop: Option<&Dropout>,
        dy: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (_, probs) = naive(q, k, v, mask, d, drop);
        let (c, hs) = (d.heads * d.head_dim, d.head_dim);
        let mut dq = vec![0.0; d.batch * d.tq * c];
        let mut dk = vec![0.0; d.batch * d.tk * c];
        let mut dv = vec![0.0; d.batch * d.tk * c];
        for b in 0..d.batch {
            for h in 0..d.heads {
                for i in 0..d.tq {
                    let qrow = (b * d.tq + i) * c + h * hs;
                    let kv = |j: usize| b * d.kv_batch_stride + j * c + h * hs;
                    let dense = |j: usize| (b * d.tk + j) * c + h * hs;
                    let flat0 = ((b * d.heads + h) * d.tq + i) * d.tk;
                    let f = |j: usize| match drop {
                        Some(dr) if rng::uniform(dr.seed, dr.offset + (flat0 + j) as u64) < dr.p => 0.0,
                        Some(dr) => 1.0 / (1.0 - dr.p as f64),
                        None => 1.0,
                    };
                    let p = &probs[flat0..flat0 + d.tk];
                    let dp: Vec<f64> = (0..d.tk)
                        .map(|j| (0..hs).map(|e| dy[qrow + e] as f64 * v[kv(j) + e] as f64).sum::<f64>() * f(j))
                        .collect();
                    let pdp: f64 = (0..d.tk).map(|j| p[j] * dp[j]).sum();
                    for j in 0..d.tk {
                        let ds = p[j] * (dp[j] - pdp) * d.scale as f64;
                        for e in 0..hs {
                            dv[dense(j) + e] += p[j] * f(j) * dy[qrow + e] as f64;
                            dq[qrow + e] += ds * k[kv(j) + e] as f64;
                            dk[dense(j) + e] += ds * q[qrow + e] as f64;
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }

    /// Check the backward kernel against the analytic f64 backward, and against central finite
    /// differences of `L = Σ out * dout` for dv always and for dq/dk when `fd_qk` (rows whose
    /// keys are all padding have a forward independent of q/k, see the module docs).
    #[allow(clippy::too_many_arguments)]
    fn check_backward(d: AttnDims, mask: Option<&[u8]>, drop: Option<&Dropout>, kv_len: usize, seed: u64, fd_qk: bool) {
        let be = CpuBackend::new();
        let c = d.heads * d.head_dim;
        let qn = d.batch * d.tq * c;
        let (q, k, v) = (randn(seed, qn), randn(seed + 1, kv_len), randn(seed + 2, kv_len));
        let dy = randn(seed + 3, qn);
        let (qb, kb, vb) =
            (CpuBuf::from_f32_vec(q.clone()), CpuBuf::from_f32_vec(k.clone()), CpuBuf::from_f32_vec(v.clone()));
        let mut out = out_f32(qn);
        let mut probs = out_f32(d.batch * d.heads * d.tq * d.tk);
        be.attention_forward(out.vm(), Some(probs.vm()), qb.v(), kb.v(), vb.v(), mask, &d, drop).unwrap();
        let dense = d.batch * d.tk * c;
        let (mut dq, mut dk, mut dv) = (
            CpuBuf::from_f32_vec(vec![9.0; qn]), // overwritten, not accumulated
            CpuBuf::from_f32_vec(vec![9.0; dense]),
            CpuBuf::from_f32_vec(vec![9.0; dense]),
        );
        let dyb = CpuBuf::from_f32_vec(dy.clone());
        be.attention_backward(dq.vm(), dk.vm(), dv.vm(), dyb.v(), qb.v(), kb.v(), vb.v(), probs.v(), &d, drop).unwrap();
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            naive(q, k, v, mask, &d, drop).0.iter().zip(&dy).map(|(o, &g)| o * g as f64).sum()
        };
        let h = 1e-2f32;
        let fd = |which: usize, idx: usize| -> f32 {
            let eval = |delta: f32| {
                let (mut q, mut k, mut v) = (q.clone(), k.clone(), v.clone());
                [&mut q, &mut k, &mut v][which][idx] += delta;
                loss(&q, &k, &v)
            };
            ((eval(h) - eval(-h)) / (2.0 * h as f64)) as f32
        };
        let (wq, wk, wv) = naive_backward(&q, &k, &v, mask, &d, drop, &dy);
        assert_all_close(dq.as_f32().unwrap(), &to32(&wq), 1e-5);
        assert_all_close(dk.as_f32().unwrap(), &to32(&wk), 1e-5);
        assert_all_close(dv.as_f32().unwrap(), &to32(&wv), 1e-5);
        if fd_qk {
            for i in 0..qn {
                assert_close(dq.as_f32().unwrap()[i], fd(0, i), 2e-3);
            }
        }
        // dk/dv are [B, Tk, C] contiguous; the k/v inputs may be strided by kv_batch_stride.
        for b in 0..d.batch {
            for t in 0..d.tk * c {
                let src = b * d.kv_batch_stride + t;
                let dst = b * d.tk * c + t;
                if fd_qk {
                    assert_close(dk.as_f32().unwrap()[dst], fd(1, src), 2e-3);
                }
                assert_close(dv.as_f32().unwrap()[dst], fd(2, src), 2e-3);
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let d = dims(2, 4, 4, 2, 3);
        let kv = 2 * 4 * 6;
        check_backward(d, None, None, kv, 20, true);
        // Padding keys (no fully masked query rows).
        let mask = [1, 1, 0, 1, 1, 0, 1, 1u8];
        check_backward(d, Some(&mask), None, kv, 30, true);
        // Dropout.
        check_backward(d, Some(&mask), Some(&Dropout { p: 0.4, seed: 3, offset: 17 }), kv, 40, true);
        // Queries at an offset into longer keys, with a strided (cache-like) k/v layout.
        let mut d2 = dims(2, 2, 5, 2, 3);
        d2.kv_batch_stride = 7 * 6;
        check_backward(d2, None, None, 7 * 6 + 5 * 6, 50, true);
        // Left padding: queries 0-1 of batch 1 see only padding (uniform over all keys).
        let mask = [1, 1, 1, 1, 0, 0, 1, 1u8];
        let drop = Dropout { p: 0.25, seed: 5, offset: 0 };
        check_backward(d, Some(&mask), None, kv, 60, false);
        check_backward(d, Some(&mask), Some(&drop), kv, 70, false);
    }

    #[test]
    fn several_query_blocks_forward_and_backward() {
        // tq > Q_BLOCK: several query blocks, each with its own causal key range; left padding
        // (fully masked rows in the first block) and dropout.
        let (b, tq, heads, hs) = (2, Q_BLOCK * 2 + 22, 2, 4);
        let d = dims(b, tq, tq, heads, hs);
        let n = b * tq * heads * hs;
        let (q, k, v) = (randn(80, n), randn(81, n), randn(82, n));
        let mut mask = vec![1u8; b * tq];
        mask[tq..tq + 3].fill(0);
        let drop = Dropout { p: 0.2, seed: 8, offset: 3 };
        for dr in [None, Some(&drop)] {
            let (out, probs) = run_forward(&q, &k, &v, Some(&mask), &d, dr);
            let (wo, wp) = naive(&q, &k, &v, Some(&mask), &d, dr);
            assert_all_close(&out, &to32(&wo), 1e-5);
            assert_all_close(&probs, &to32(&wp), 1e-6);
            let be = CpuBackend::new();
            let dy = randn(83, n);
            let (mut dq, mut dk, mut dv) = (out_f32(n), out_f32(n), out_f32(n));
            let bufs: Vec<CpuBuf> =
                [&q, &k, &v, &dy, &probs].iter().map(|x| CpuBuf::from_f32_vec(x.to_vec())).collect();
            be.attention_backward(
                dq.vm(),
                dk.vm(),
                dv.vm(),
                bufs[3].v(),
                bufs[0].v(),
                bufs[1].v(),
                bufs[2].v(),
                bufs[4].v(),
                &d,
                dr,
            )
            .unwrap();
            let (wq, wk, wv) = naive_backward(&q, &k, &v, Some(&mask), &d, dr, &dy);
            assert_all_close(dq.as_f32().unwrap(), &to32(&wq), 1e-5);
            assert_all_close(dk.as_f32().unwrap(), &to32(&wk), 1e-5);
            assert_all_close(dv.as_f32().unwrap(), &to32(&wv), 1e-5);
        }
    }

    #[test]
    fn backward_is_deterministic_across_pools() {
        let be = CpuBackend::new();
        let d = dims(2, 40, 40, 4, 16);
        let n = 2 * 40 * 64;
        let (q, k, v, dy) = (
            CpuBuf::from_f32_vec(randn(60, n)),
            CpuBuf::from_f32_vec(randn(61, n)),
            CpuBuf::from_f32_vec(randn(62, n)),
            CpuBuf::from_f32_vec(randn(63, n)),
        );
        let drop = Dropout { p: 0.1, seed: 9, offset: 0 };
        let mut out = out_f32(n);
        let mut probs = out_f32(2 * 4 * 40 * 40);
        be.attention_forward(out.vm(), Some(probs.vm()), q.v(), k.v(), v.v(), None, &d, Some(&drop)).unwrap();
        let runs = in_pools(|| {
            let (mut dq, mut dk, mut dv) = (out_f32(n), out_f32(n), out_f32(n));
            be.attention_backward(dq.vm(), dk.vm(), dv.vm(), dy.v(), q.v(), k.v(), v.v(), probs.v(), &d, Some(&drop))
                .unwrap();
            (bits_of(&dq), bits_of(&dk), bits_of(&dv))
        });
        assert!(runs.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn shape_errors() {
        let be = CpuBackend::new();
        let d = dims(1, 2, 2, 2, 2);
        let x = out_f32(8);
        let mut out = out_f32(8);
        assert!(be.attention_forward(out.vm(), None, x.v(), x.at(0, 7), x.v(), None, &d, None).is_err());
        assert!(be.attention_forward(out.at_mut(0, 7), None, x.v(), x.v(), x.v(), None, &d, None).is_err());
        assert!(be.attention_forward(out.vm(), None, x.v(), x.v(), x.v(), Some(&[1]), &d, None).is_err());
        let mut p = out_f32(7);
        assert!(be.attention_forward(out.vm(), Some(p.vm()), x.v(), x.v(), x.v(), None, &d, None).is_err());
        assert!(be.attention_forward(out.vm(), None, x.v(), x.v(), x.v(), None, &d, None).is_ok());
    }
}
