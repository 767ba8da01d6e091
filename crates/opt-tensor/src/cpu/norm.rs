//! LayerNorm over the last dimension (PyTorch `nn.LayerNorm` semantics: biased variance, `eps`
//! inside the square root).
//!
//! Row statistics are two-pass (mean, then the mean of squared deviations) accumulated in f64,
//! so they stay accurate for rows with a large common offset, where the one-pass
//! `E[x²] - E[x]²` (or f32 accumulation) loses digits. The parameter gradients are deterministic reductions over
//! fixed blocks of [`REDUCE_ROWS`] rows combined in block order.

use rayon::prelude::*;

use super::elementwise::add_partials_in_order;
use super::math;
use super::par::{self, PAR_MIN_ELEMS, REDUCE_ROWS};
use super::simd::multiversion;

multiversion! {
    /// One row: writes `o`, returns `(mean, rstd)`.
    fn forward_row(o: &mut [f32], x: &[f32], weight: Option<&[f32]>, bias: Option<&[f32]>, eps: f32) -> (f32, f32) {
        let dim = x.len() as f64;
        let mu = math::sum_map_f64(x, |v| v) / dim;
        let mu32 = mu as f32;
        let var = math::sum_map_f64(x, |v| (v - mu) * (v - mu)) / dim;
        let rs = (1.0 / (var + eps as f64).sqrt()) as f32;
        match (weight, bias) {
            (Some(w), Some(b)) => {
                for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
                    *o = (x - mu32) * rs * w + b;
                }
            }
            (Some(w), None) => {
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    *o = (x - mu32) * rs * w;
                }
            }
            (None, Some(b)) => {
                for ((o, &x), &b) in o.iter_mut().zip(x).zip(b) {
                    *o = (x - mu32) * rs + b;
                }
            }
            (None, None) => {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = (x - mu32) * rs;
                }
            }
        }
        (mu32, rs)
    }
}

multiversion! {
    /// One row of the backward pass: `d += ...`; accumulates into `dw`/`db` unless they are
    /// empty. `xhat` and `g` are row-sized scratch.
    #[allow(clippy::too_many_arguments)]
    fn backward_row(
        d: &mut [f32],
        dy: &[f32],
        x: &[f32],
        weight: Option<&[f32]>,
        stats: (f32, f32),
        xhat: &mut [f32],
        g: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let (mu, rs) = stats;
        for (xh, &x) in xhat.iter_mut().zip(x) {
            *xh = (x - mu) * rs;
        }
        match weight {
            Some(w) => g.iter_mut().zip(dy).zip(w).for_each(|((g, &dy), &w)| *g = dy * w),
            None => g.copy_from_slice(dy),
        }
        dw.iter_mut().zip(dy).zip(&*xhat).for_each(|((a, &dy), &xh)| *a += dy * xh);
        db.iter_mut().zip(dy).for_each(|(a, &dy)| *a += dy);
        let inv_dim = 1.0 / x.len() as f32;
        let mean_g = (math::sum(g) as f32) * inv_dim;
        let mean_gx = math::dot(g, xhat) * inv_dim;
        for ((d, &g), &xh) in d.iter_mut().zip(&*g).zip(&*xhat) {
            *d += rs * (g - mean_g - xh * mean_gx);
        }
    }
}

/// `out = (x - mean) * rstd * w + b` per row; saves `mean` and `rstd = 1 / sqrt(var + eps)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    dim: usize,
    eps: f32,
) {
    if dim == 0 || mean.is_empty() {
        return;
    }
    let rows_task = par::rows_per_task(dim);
    type Task<'a> = (usize, ((&'a mut [f32], &'a mut [f32]), &'a mut [f32]));
    let task = |(ci, ((o, m), r)): Task<'_>| {
        for (j, o) in o.chunks_exact_mut(dim).enumerate() {
            let row = ci * rows_task + j;
            (m[j], r[j]) = forward_row(o, &inp[row * dim..(row + 1) * dim], weight, bias, eps);
        }
    };
    if par::worth_parallel(inp.len(), PAR_MIN_ELEMS) {
        out.par_chunks_mut(rows_task * dim)
            .zip(mean.par_chunks_mut(rows_task))
            .zip(rstd.par_chunks_mut(rows_task))
            .enumerate()
            .for_each(task);
    } else {
        out.chunks_mut(rows_task * dim)
            .zip(mean.chunks_mut(rows_task))
            .zip(rstd.chunks_mut(rows_task))
            .enumerate()
            .for_each(task);
    }
}

/// LayerNorm backward with `xhat = (x - mean) * rstd`, `g = dout * w`:
/// `dinp += rstd * (g - mean(g) - xhat * mean(g * xhat))`, `dweight += Σ_rows dout * xhat`,
/// `dbias += Σ_rows dout`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dinp: &mut [f32],
    dweight: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: Option<&[f32]>,
    mean: &[f32],
    rstd: &[f32],
    dim: usize,
) {
    if dim == 0 || mean.is_empty() {
        return;
    }
    let (want_dw, want_db) = (dweight.is_some(), dbias.is_some());
    // One block of REDUCE_ROWS rows: writes its dinp rows, returns its (dweight, dbias) partials.
    let block = |(ci, d): (usize, &mut [f32])| -> (Vec<f32>, Vec<f32>) {
        let mut dw = vec![0.0f32; if want_dw { dim } else { 0 }];
        let mut db = vec![0.0f32; if want_db { dim } else { 0 }];
        let mut xhat = vec![0.0f32; dim];
        let mut g = vec![0.0f32; dim];
        for (j, d) in d.chunks_exact_mut(dim).enumerate() {
            let row = ci * REDUCE_ROWS + j;
            let rows = row * dim..(row + 1) * dim;
            let stats = (mean[row], rstd[row]);
            backward_row(d, &dout[rows.clone()], &inp[rows], weight, stats, &mut xhat, &mut g, &mut dw, &mut db);
        }
        (dw, db)
    };
    let partials: Vec<(Vec<f32>, Vec<f32>)> = if par::worth_parallel(inp.len(), PAR_MIN_ELEMS) {
        dinp.par_chunks_mut(REDUCE_ROWS * dim).enumerate().map(block).collect()
    } else {
        dinp.chunks_mut(REDUCE_ROWS * dim).enumerate().map(block).collect()
    };
    let (dws, dbs): (Vec<Vec<f32>>, Vec<Vec<f32>>) = partials.into_iter().unzip();
    if let Some(dweight) = dweight {
        add_partials_in_order(dweight, &dws);
    }
    if let Some(dbias) = dbias {
        add_partials_in_order(dbias, &dbs);
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::{Backend, Buffer};
    use crate::cpu::testutil::*;
    use crate::cpu::{CpuBackend, CpuBuf};
    use crate::DType;

    /// f64 LayerNorm of one configuration, returning the outputs.
    fn ln_ref(x: &[f32], w: Option<&[f32]>, b: Option<&[f32]>, dim: usize, eps: f64) -> Vec<f64> {
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(dim) {
            let mu = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            let var = row.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / dim as f64;
            let rs = 1.0 / (var + eps).sqrt();
            for (c, &v) in row.iter().enumerate() {
                let y = (v as f64 - mu) * rs;
                out.push(y * w.map_or(1.0, |w| w[c] as f64) + b.map_or(0.0, |b| b[c] as f64));
            }
        }
        out
    }

    #[test]
    fn forward_matches_reference_all_dtypes() {
        let be = CpuBackend::new();
        let (rows, dim) = (50, 96);
        // A large common offset checks the two-pass variance.
        let x: Vec<f32> = randn(1, rows * dim).iter().map(|v| v + 300.0).collect();
        let w = randn(2, dim);
        let bias = randn(3, dim);
        let xb = CpuBuf::from_f32_vec(x.clone());
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let wb = be.from_f32(&w, dt).unwrap();
            let bb = be.from_f32(&bias, dt).unwrap();
            let (ww, bw) = (wb.to_f32_vec(), bb.to_f32_vec());
            let mut out = out_f32(rows * dim);
            let (mut mean, mut rstd) = (out_f32(rows), out_f32(rows));
            be.layernorm_forward(out.vm(), mean.vm(), rstd.vm(), xb.v(), Some(wb.v()), Some(bb.v()), dim, 1e-5)
                .unwrap();
            let want: Vec<f32> = ln_ref(&x, Some(&ww), Some(&bw), dim, 1e-5).iter().map(|&v| v as f32).collect();
            assert_all_close(out.as_f32().unwrap(), &want, 2e-4);
            let mu0 = x[..dim].iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            assert_close(mean.as_f32().unwrap()[0], mu0 as f32, 1e-7);
        }
        // Non-affine.
        let mut out = out_f32(rows * dim);
        let (mut mean, mut rstd) = (out_f32(rows), out_f32(rows));
        let x2 = randn(4, rows * dim);
        let xb2 = CpuBuf::from_f32_vec(x2.clone());
        be.layernorm_forward(out.vm(), mean.vm(), rstd.vm(), xb2.v(), None, None, dim, 1e-5).unwrap();
        let want: Vec<f32> = ln_ref(&x2, None, None, dim, 1e-5).iter().map(|&v| v as f32).collect();
        assert_all_close(out.as_f32().unwrap(), &want, 2e-6);
        // Shape errors.
        assert!(be
            .layernorm_forward(out.vm(), mean.at_mut(0, rows - 1), rstd.vm(), xb2.v(), None, None, dim, 1e-5)
            .is_err());
        let short_w = CpuBuf::from_f32_vec(vec![1.0; dim - 1]);
        assert!(be
            .layernorm_forward(out.vm(), mean.vm(), rstd.vm(), xb2.v(), Some(short_w.v()), None, dim, 1e-5)
            .is_err());
    }

    /// Finite-difference check of all three gradients against the f64 reference LayerNorm with
    /// loss `Σ out * dout`.
    #[test]
    fn backward_matches_finite_differences() {
        let be = CpuBackend::new();
        let (rows, dim) = (5, 12);
        let x = randn(5, rows * dim);
        let w: Vec<f32> = randn(6, dim).iter().map(|v| v + 1.0).collect();
        let b = randn(7, dim);
        let dy = randn(8, rows * dim);
        let eps = 1e-5;
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            ln_ref(x, Some(w), Some(b), dim, eps).iter().zip(&dy).map(|(o, &g)| o * g as f64).sum()
        };
        let (xb, wb) = (CpuBuf::from_f32_vec(x.clone()), CpuBuf::from_f32_vec(w.clone()));
        let bb = CpuBuf::from_f32_vec(b.clone());
        let (mut out, mut mean, mut rstd) = (out_f32(rows * dim), out_f32(rows), out_f32(rows));
        be.layernorm_forward(out.vm(), mean.vm(), rstd.vm(), xb.v(), Some(wb.v()), Some(bb.v()), dim, eps as f32)
            .unwrap();
        let init = randn(9, rows * dim); // dinp accumulates
        let mut dx = CpuBuf::from_f32_vec(init.clone());
        let (mut dw, mut db) = (CpuBuf::from_f32_vec(vec![0.5; dim]), out_f32(dim));
        let dyb = CpuBuf::from_f32_vec(dy.clone());
        be.layernorm_backward(
            dx.vm(),
            Some(dw.vm()),
            Some(db.vm()),
            dyb.v(),
            xb.v(),
            Some(wb.v()),
            mean.v(),
            rstd.v(),
            dim,
        )
        .unwrap();
        let h = 1e-3f32;
        let fd = |f: &dyn Fn(f32) -> f64| ((f(h) - f(-h)) / (2.0 * h as f64)) as f32;
        for i in 0..rows * dim {
            let g = fd(&|d| {
                let mut xp = x.clone();
                xp[i] += d;
                loss(&xp, &w, &b)
            });
            assert_close(dx.as_f32().unwrap()[i] - init[i], g, 2e-3);
        }
        for c in 0..dim {
            let gw = fd(&|d| {
                let mut wp = w.clone();
                wp[c] += d;
                loss(&x, &wp, &b)
            });
            let gb = fd(&|d| {
                let mut bp = b.clone();
                bp[c] += d;
                loss(&x, &w, &bp)
            });
            assert_close(dw.as_f32().unwrap()[c] - 0.5, gw, 2e-3);
            assert_close(db.as_f32().unwrap()[c], gb, 2e-3);
        }
        // Non-affine backward: dinp only.
        let (mut mean2, mut rstd2, mut out2) = (out_f32(rows), out_f32(rows), out_f32(rows * dim));
        be.layernorm_forward(out2.vm(), mean2.vm(), rstd2.vm(), xb.v(), None, None, dim, eps as f32).unwrap();
        let mut dx2 = out_f32(rows * dim);
        be.layernorm_backward(dx2.vm(), None, None, dyb.v(), xb.v(), None, mean2.v(), rstd2.v(), dim).unwrap();
        let ones = vec![1.0f32; dim];
        let zeros = vec![0.0f32; dim];
        for i in (0..rows * dim).step_by(7) {
            let g = fd(&|d| {
                let mut xp = x.clone();
                xp[i] += d;
                loss(&xp, &ones, &zeros)
            });
            assert_close(dx2.as_f32().unwrap()[i], g, 2e-3);
        }
    }

    #[test]
    fn parameter_gradients_are_deterministic_across_pools() {
        let be = CpuBackend::new();
        let (rows, dim) = (700, 96);
        let x = CpuBuf::from_f32_vec(randn(10, rows * dim));
        let w = be.from_f32(&randn(11, dim), DType::BF16).unwrap();
        let dy = CpuBuf::from_f32_vec(randn(12, rows * dim));
        let (mut out, mut mean, mut rstd) = (out_f32(rows * dim), out_f32(rows), out_f32(rows));
        be.layernorm_forward(out.vm(), mean.vm(), rstd.vm(), x.v(), Some(w.v()), None, dim, 1e-5).unwrap();
        let runs = in_pools(|| {
            let (mut dx, mut dw, mut db) = (out_f32(rows * dim), out_f32(dim), out_f32(dim));
            be.layernorm_backward(
                dx.vm(),
                Some(dw.vm()),
                Some(db.vm()),
                dy.v(),
                x.v(),
                Some(w.v()),
                mean.v(),
                rstd.v(),
                dim,
            )
            .unwrap();
            (bits_of(&dx), bits_of(&dw), bits_of(&db))
        });
        assert!(runs.windows(2).all(|w| w[0] == w[1]));
        // And the summed dbias equals the f64 column sums closely.
        let d = dy.as_f32().unwrap();
        let db0: f64 = (0..rows).map(|r| d[r * dim] as f64).sum();
        assert_close(f32::from_bits(runs[0].2[0]), db0 as f32, 1e-4);
    }
}
