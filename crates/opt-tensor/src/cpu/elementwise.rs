//! Elementwise kernels (bias, add, scale, activations, dropout) and the two flat reductions
//! (`bias_backward`, `sum_squares`). Shapes are checked by the caller.

use rayon::prelude::*;

use super::math;
use super::par::{self, ELEM_CHUNK, PAR_MIN_ELEMS, REDUCE_ELEMS, REDUCE_ROWS};
use crate::backend::{Activation, Dropout};
use crate::rng;

/// `out[r, c] += bias[c]`.
pub(crate) fn bias_add(out: &mut [f32], bias: &[f32]) {
    let dim = bias.len();
    let rows = par::rows_per_task(dim);
    par::for_each_chunk_mut(out, rows * dim, PAR_MIN_ELEMS, |_, chunk| {
        for row in chunk.chunks_exact_mut(dim) {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
    });
}

/// `dbias[c] += sum_r dout[r, c]`.
///
/// Deterministic: rows are summed sequentially within fixed blocks of [`REDUCE_ROWS`] rows, and
/// the block sums are added in block order, whatever the number of threads.
pub(crate) fn bias_backward(dbias: &mut [f32], dout: &[f32]) {
    let dim = dbias.len();
    if dim == 0 {
        return;
    }
    let partials: Vec<Vec<f32>> = {
        let block = |rows: &[f32]| {
            let mut acc = vec![0.0f32; dim];
            for row in rows.chunks_exact(dim) {
                for (a, x) in acc.iter_mut().zip(row) {
                    *a += x;
                }
            }
            acc
        };
        if par::worth_parallel(dout.len(), PAR_MIN_ELEMS) {
            dout.par_chunks(REDUCE_ROWS * dim).map(block).collect()
        } else {
            dout.chunks(REDUCE_ROWS * dim).map(block).collect()
        }
    };
    add_partials_in_order(dbias, &partials);
}

/// `out += sum_k partials[k]`, with the partials first summed in index order.
pub(crate) fn add_partials_in_order(out: &mut [f32], partials: &[Vec<f32>]) {
    let Some((first, rest)) = partials.split_first() else { return };
    let mut total = first.clone();
    for p in rest {
        for (t, x) in total.iter_mut().zip(p) {
            *t += x;
        }
    }
    for (o, t) in out.iter_mut().zip(&total) {
        *o += t;
    }
}

/// `out = a + b`.
pub(crate) fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    par::for_each_chunk_mut(out, ELEM_CHUNK, PAR_MIN_ELEMS, |i, o| {
        let base = i * ELEM_CHUNK;
        let (a, b) = (&a[base..base + o.len()], &b[base..base + o.len()]);
        for ((o, x), y) in o.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    });
}

/// `out += a`.
pub(crate) fn add_assign(out: &mut [f32], a: &[f32]) {
    par::for_each_chunk_mut(out, ELEM_CHUNK, PAR_MIN_ELEMS, |i, o| {
        let base = i * ELEM_CHUNK;
        let a = &a[base..base + o.len()];
        for (o, x) in o.iter_mut().zip(a) {
            *o += x;
        }
    });
}

/// `out *= s`.
pub(crate) fn scale(out: &mut [f32], s: f32) {
    par::for_each_chunk_mut(out, ELEM_CHUNK, PAR_MIN_ELEMS, |_, o| {
        for o in o.iter_mut() {
            *o *= s;
        }
    });
}

/// `sum_i x[i]^2` in f64, deterministic: fixed [`REDUCE_ELEMS`]-element blocks, each summed with
/// four f64 lanes, block sums added in order.
pub(crate) fn sum_squares(x: &[f32]) -> f64 {
    fn block(x: &[f32]) -> f64 {
        let c = x.chunks_exact(4);
        let r = c.remainder();
        let mut acc = [0.0f64; 4];
        for v in c {
            for l in 0..4 {
                let t = v[l] as f64;
                acc[l] += t * t;
            }
        }
        let mut s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
        for &v in r {
            s += v as f64 * v as f64;
        }
        s
    }
    let partials: Vec<f64> = if par::worth_parallel(x.len(), PAR_MIN_ELEMS) {
        x.par_chunks(REDUCE_ELEMS).map(block).collect()
    } else {
        x.chunks(REDUCE_ELEMS).map(block).collect()
    };
    partials.iter().fold(0.0, |a, b| a + b)
}

/// Work per element of GELU (an f64 `erfc`), relative to an add; used to parallelise earlier.
const GELU_COST: usize = 16;

/// `out = act(inp)`.
pub(crate) fn activation_forward(act: Activation, out: &mut [f32], inp: &[f32]) {
    let min_par = match act {
        Activation::Relu => PAR_MIN_ELEMS,
        Activation::Gelu => PAR_MIN_ELEMS / GELU_COST,
    };
    par::for_each_chunk_mut(out, ELEM_CHUNK, min_par, |i, o| {
        let x = &inp[i * ELEM_CHUNK..i * ELEM_CHUNK + o.len()];
        match act {
            // `x < 0 ? 0 : x` keeps NaN (like torch.relu).
            Activation::Relu => o.iter_mut().zip(x).for_each(|(o, &x)| *o = if x < 0.0 { 0.0 } else { x }),
            Activation::Gelu => o.iter_mut().zip(x).for_each(|(o, &x)| *o = math::gelu(x)),
        }
    });
}

/// `dinp = act'(inp) * dout`.
pub(crate) fn activation_backward(act: Activation, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    let min_par = match act {
        Activation::Relu => PAR_MIN_ELEMS,
        Activation::Gelu => PAR_MIN_ELEMS / GELU_COST,
    };
    par::for_each_chunk_mut(dinp, ELEM_CHUNK, min_par, |i, d| {
        let base = i * ELEM_CHUNK;
        let (x, g) = (&inp[base..base + d.len()], &dout[base..base + d.len()]);
        match act {
            // torch's threshold_backward: gradient passes where x > 0.
            Activation::Relu => {
                for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                    *d = if x > 0.0 { g } else { 0.0 };
                }
            }
            Activation::Gelu => {
                for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                    *d = math::gelu_grad(x) * g;
                }
            }
        }
    });
}

/// Whether element `index` of a dropout draw is dropped.
#[inline(always)]
pub(crate) fn dropped(d: &Dropout, index: u64) -> bool {
    rng::uniform(d.seed, d.offset.wrapping_add(index)) < d.p
}

/// The factor applied to kept elements, `1 / (1 - p)`.
#[inline]
pub(crate) fn keep_scale(p: f32) -> f32 {
    1.0 / (1.0 - p)
}

/// In place: element `i` is dropped iff `uniform(seed, offset + i) < p`, kept ones scaled by
/// `1 / (1 - p)`. `p == 0` is a no-op; `p == 1` zeroes everything.
pub(crate) fn dropout(x: &mut [f32], d: &Dropout) {
    if d.p <= 0.0 {
        return;
    }
    if d.p >= 1.0 {
        x.fill(0.0);
        return;
    }
    let s = keep_scale(d.p);
    par::for_each_chunk_mut(x, ELEM_CHUNK, PAR_MIN_ELEMS / 4, |i, c| {
        let base = (i * ELEM_CHUNK) as u64;
        for (j, v) in c.iter_mut().enumerate() {
            *v = if dropped(d, base + j as u64) { 0.0 } else { *v * s };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Buffer};
    use crate::cpu::testutil::*;
    use crate::cpu::{CpuBackend, CpuBuf};
    use crate::DType;

    #[test]
    fn bias_add_and_backward() {
        let be = CpuBackend::new();
        let (rows, dim) = (37, 5);
        let x = randn(1, rows * dim);
        let bias = randn(2, dim);
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let b = be.from_f32(&bias, dt).unwrap();
            let bw = b.to_f32_vec();
            let mut out = CpuBuf::from_f32_vec(x.clone());
            be.bias_add(out.vm(), b.v(), dim).unwrap();
            let want: Vec<f32> = (0..rows * dim).map(|i| x[i] + bw[i % dim]).collect();
            assert_eq!(out.to_f32_vec(), want);
        }
        let mut db = CpuBuf::from_f32_vec(vec![1.0; dim]);
        let dout = CpuBuf::from_f32_vec(x.clone());
        be.bias_backward(db.vm(), dout.v(), dim).unwrap();
        for c in 0..dim {
            let want: f64 = 1.0 + (0..rows).map(|r| x[r * dim + c] as f64).sum::<f64>();
            assert_close(db.as_f32().unwrap()[c], want as f32, 1e-5);
        }
        assert!(be.bias_add(out_f32(rows * dim + 1).vm(), CpuBuf::from_f32_vec(bias.clone()).v(), dim).is_err());
        assert!(be.bias_backward(out_f32(dim + 1).vm(), dout.v(), dim).is_err());
        // Outputs must be f32.
        let mut h = be.zeros(DType::BF16, dim).unwrap();
        assert!(matches!(be.bias_backward(h.vm(), dout.v(), dim), Err(crate::TensorError::DType { .. })));
    }

    #[test]
    fn add_scale_add_assign() {
        let be = CpuBackend::new();
        for n in [7, 100_003] {
            let (a, b) = (randn(3, n), randn(4, n));
            let (ab, bb) = (CpuBuf::from_f32_vec(a.clone()), CpuBuf::from_f32_vec(b.clone()));
            let mut out = out_f32(n);
            be.add(out.vm(), ab.v(), bb.v()).unwrap();
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            assert_eq!(out.as_f32().unwrap(), &want[..]);
            be.add_assign(out.vm(), ab.v()).unwrap();
            let want: Vec<f32> = want.iter().zip(&a).map(|(x, y)| x + y).collect();
            assert_eq!(out.as_f32().unwrap(), &want[..]);
            be.scale(out.vm(), 0.5).unwrap();
            let want: Vec<f32> = want.iter().map(|x| x * 0.5).collect();
            assert_eq!(out.as_f32().unwrap(), &want[..]);
            assert!(be.add(out.vm(), ab.at(0, n - 1), bb.v()).is_err());
        }
        // bf16 operands are widened.
        let a = be.from_f32(&[1.5, 2.0], DType::BF16).unwrap();
        let mut out = CpuBuf::from_f32_vec(vec![1.0, 1.0]);
        be.add_assign(out.vm(), a.v()).unwrap();
        assert_eq!(out.to_f32_vec(), vec![2.5, 3.0]);
    }

    #[test]
    fn sum_squares_value_and_determinism() {
        let be = CpuBackend::new();
        let x = randn(5, 300_001);
        let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let b = CpuBuf::from_f32_vec(x);
        let got = be.sum_squares(b.v()).unwrap();
        assert!((got - want).abs() / want < 1e-12);
        let bits = in_pools(|| be.sum_squares(b.v()).unwrap().to_bits());
        assert!(bits.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(bits[0], got.to_bits());
        let h = be.from_f32(&[3.0, 4.0], DType::F16).unwrap();
        assert_eq!(be.sum_squares(h.v()).unwrap(), 25.0);
    }

    #[test]
    fn bias_backward_is_deterministic_across_pools() {
        let be = CpuBackend::new();
        let (rows, dim) = (1000, 77);
        let dout = CpuBuf::from_f32_vec(randn(6, rows * dim));
        let runs = in_pools(|| {
            let mut db = out_f32(dim);
            be.bias_backward(db.vm(), dout.v(), dim).unwrap();
            bits_of(&db)
        });
        assert!(runs.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn activations_forward_and_backward() {
        let be = CpuBackend::new();
        let mut x = randn(7, 5000);
        for v in x.iter_mut().step_by(7) {
            *v *= 4.0;
        }
        let xb = CpuBuf::from_f32_vec(x.clone());
        let g = randn(8, 5000);
        let gb = CpuBuf::from_f32_vec(g.clone());
        for act in [Activation::Relu, Activation::Gelu] {
            let f = |v: f64| match act {
                Activation::Relu => v.max(0.0),
                Activation::Gelu => v * 0.5 * (1.0 + math::erf(v / 2f64.sqrt())),
            };
            let mut out = out_f32(x.len());
            be.activation_forward(act, out.vm(), xb.v()).unwrap();
            for (o, &v) in out.as_f32().unwrap().iter().zip(&x) {
                assert_close(*o, f(v as f64) as f32, 1e-6);
            }
            let mut dx = out_f32(x.len());
            be.activation_backward(act, dx.vm(), xb.v(), gb.v()).unwrap();
            for ((d, &v), &gv) in dx.as_f32().unwrap().iter().zip(&x).zip(&g) {
                if act == Activation::Relu && v.abs() < 1e-3 {
                    continue; // kink
                }
                let h = 1e-4;
                let v = v as f64;
                let fd = (f(v + h) - f(v - h)) / (2.0 * h) * gv as f64;
                assert_close(*d, fd as f32, 2e-5);
            }
        }
        // Large input takes the parallel path and matches the sequential one.
        let big = randn(9, 200_000);
        let bb = CpuBuf::from_f32_vec(big.clone());
        let mut out = out_f32(big.len());
        be.activation_forward(Activation::Gelu, out.vm(), bb.v()).unwrap();
        for i in (0..big.len()).step_by(997) {
            assert_eq!(out.as_f32().unwrap()[i], math::gelu(big[i]));
        }
    }

    #[test]
    fn dropout_mask_and_scale() {
        let be = CpuBackend::new();
        let n = 100_000;
        let d = Dropout { p: 0.25, seed: 11, offset: 1000 };
        let mut x = CpuBuf::from_f32_vec(vec![1.0; n]);
        be.dropout(x.vm(), &d).unwrap();
        let mut zeros = 0;
        for (i, &v) in x.as_f32().unwrap().iter().enumerate() {
            if rng::uniform(11, 1000 + i as u64) < 0.25 {
                assert_eq!(v, 0.0);
                zeros += 1;
            } else {
                assert_eq!(v, 1.0 / 0.75);
            }
        }
        assert!((zeros as f64 / n as f64 - 0.25).abs() < 0.01);
        // A sub-view uses indices relative to the view.
        let mut y = CpuBuf::from_f32_vec(vec![1.0; 10]);
        be.dropout(y.at_mut(3, 7), &Dropout { p: 0.5, seed: 1, offset: 0 }).unwrap();
        for i in 0..7 {
            let want = if rng::uniform(1, i as u64) < 0.5 { 0.0 } else { 2.0 };
            assert_eq!(y.as_f32().unwrap()[3 + i], want);
        }
        // p = 0 is a no-op.
        let mut z = CpuBuf::from_f32_vec(vec![3.0; 10]);
        be.dropout(z.vm(), &Dropout { p: 0.0, seed: 1, offset: 0 }).unwrap();
        assert_eq!(z.to_f32_vec(), vec![3.0; 10]);
        assert!(be.dropout(z.vm(), &Dropout { p: 1.5, seed: 1, offset: 0 }).is_err());
    }
}
