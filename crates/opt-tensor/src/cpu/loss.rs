//! Output-layer kernels: fused softmax cross-entropy and row-wise log-softmax.
//!
//! Both are numerically stable: the row maximum is subtracted before exponentiating, and the
//! sum of exponentials is accumulated with f64 block totals (a 50k-entry vocabulary row in plain
//! f32 would lose ~4 digits). Rows are independent, so they run in parallel with no effect on
//! the bits.

use rayon::prelude::*;

use super::math;
use super::par::{self, PAR_MIN_ELEMS};
use super::simd::multiversion;

multiversion! {
    /// One cross-entropy row (target `t >= 0`): returns the loss; with a gradient scale the
    /// row becomes `s * (softmax - onehot)`.
    fn ce_row(x: &mut [f32], t: usize, grad_scale: Option<f32>) -> f32 {
        let mx = math::max(x);
        let xt = x[t];
        match grad_scale {
            None => {
                let sum = math::sum_exp(x, mx);
                (mx as f64 + sum.ln() - xt as f64) as f32
            }
            Some(s) => {
                for v in x.iter_mut() {
                    *v = math::exp(*v - mx);
                }
                let sum = math::sum(x);
                let f = (s as f64 / sum) as f32;
                for v in x.iter_mut() {
                    *v *= f;
                }
                x[t] -= s;
                (mx as f64 + sum.ln() - xt as f64) as f32
            }
        }
    }
}

multiversion! {
    /// One log-softmax row.
    fn log_softmax_row(o: &mut [f32], x: &[f32]) {
        let mx = math::max(x);
        let lse = math::sum_exp(x, mx).ln() as f32;
        for (o, &v) in o.iter_mut().zip(x) {
            *o = v - mx - lse;
        }
    }
}

/// Per row: `loss = logsumexp(x) - x[t]` (0 when `t < 0`); with `grad_scale = Some(s)` the row
/// is overwritten by `s * (softmax(x) - onehot(t))` (zeros when ignored).
pub(crate) fn cross_entropy(
    logits: &mut [f32],
    losses: &mut [f32],
    targets: &[i32],
    vocab: usize,
    grad_scale: Option<f32>,
) {
    if vocab == 0 {
        return;
    }
    let row_fn = |((x, loss), &t): ((&mut [f32], &mut f32), &i32)| {
        if t < 0 {
            *loss = 0.0;
            if grad_scale.is_some() {
                x.fill(0.0);
            }
            return;
        }
        *loss = ce_row(x, t as usize, grad_scale);
    };
    if par::worth_parallel(logits.len(), PAR_MIN_ELEMS) {
        logits.par_chunks_mut(vocab).zip(losses.par_iter_mut()).zip(targets.par_iter()).for_each(row_fn);
    } else {
        logits.chunks_mut(vocab).zip(losses.iter_mut()).zip(targets.iter()).for_each(row_fn);
    }
}

/// `out = x - max(x) - ln(Σ exp(x - max(x)))` per row.
pub(crate) fn log_softmax(out: &mut [f32], logits: &[f32], vocab: usize) {
    if vocab == 0 {
        return;
    }
    let rows_task = par::rows_per_task(vocab);
    par::for_each_chunk_mut(out, rows_task * vocab, PAR_MIN_ELEMS, |ci, chunk| {
        for (r, o) in chunk.chunks_exact_mut(vocab).enumerate() {
            let row = ci * rows_task + r;
            log_softmax_row(o, &logits[row * vocab..(row + 1) * vocab]);
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::backend::{Backend, Buffer};
    use crate::cpu::testutil::*;
    use crate::cpu::CpuBackend;
    use crate::cpu::CpuBuf;

    fn ref_log_softmax(x: &[f32]) -> Vec<f64> {
        let mx = x.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = mx + x.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
        x.iter().map(|&v| v as f64 - lse).collect()
    }

    #[test]
    fn cross_entropy_loss_and_gradient() {
        let be = CpuBackend::new();
        for &(rows, vocab) in &[(6, 10), (40, 3000)] {
            // Large logits check the max subtraction.
            let x: Vec<f32> = randn(1, rows * vocab).iter().map(|v| v * 8.0 + 50.0).collect();
            let targets: Vec<i32> =
                (0..rows).map(|r| if r % 5 == 4 { -100 } else { ((r * 7) % vocab) as i32 }).collect();
            let mut losses = out_f32(rows);
            let mut lg = CpuBuf::from_f32_vec(x.clone());
            be.cross_entropy(lg.vm(), losses.vm(), &targets, vocab, None).unwrap();
            // Without a gradient the logits are untouched.
            assert_eq!(lg.as_f32().unwrap(), &x[..]);
            let s = 0.25f32;
            let mut losses2 = out_f32(rows);
            be.cross_entropy(lg.vm(), losses2.vm(), &targets, vocab, Some(s)).unwrap();
            assert_eq!(losses.as_f32().unwrap(), losses2.as_f32().unwrap());
            for r in 0..rows {
                let ls = ref_log_softmax(&x[r * vocab..(r + 1) * vocab]);
                let g = &lg.as_f32().unwrap()[r * vocab..(r + 1) * vocab];
                if targets[r] < 0 {
                    assert_eq!(losses.as_f32().unwrap()[r], 0.0);
                    assert!(g.iter().all(|&v| v == 0.0));
                    continue;
                }
                let t = targets[r] as usize;
                assert_close(losses.as_f32().unwrap()[r], -ls[t] as f32, 1e-6);
                for (j, (&gj, &l)) in g.iter().zip(&ls).enumerate() {
                    let want = s as f64 * (l.exp() - if j == t { 1.0 } else { 0.0 });
                    assert!((gj as f64 - want).abs() < 1e-7, "row {r} col {j}: {gj} vs {want}");
                }
            }
        }
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let be = CpuBackend::new();
        let vocab = 7;
        let x = randn(3, vocab);
        let loss_of = |x: &[f32]| -> f64 { -ref_log_softmax(x)[2] };
        let mut lg = CpuBuf::from_f32_vec(x.clone());
        let mut loss = out_f32(1);
        be.cross_entropy(lg.vm(), loss.vm(), &[2], vocab, Some(1.0)).unwrap();
        for j in 0..vocab {
            let h = 1e-3f32;
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[j] += h;
            xm[j] -= h;
            let fd = ((loss_of(&xp) - loss_of(&xm)) / (2.0 * h as f64)) as f32;
            assert_close(lg.as_f32().unwrap()[j], fd, 1e-4);
        }
    }

    #[test]
    fn cross_entropy_errors() {
        let be = CpuBackend::new();
        let mut lg = out_f32(6);
        let mut loss = out_f32(2);
        assert!(be.cross_entropy(lg.vm(), loss.vm(), &[0, 3], 3, None).is_err());
        assert!(be.cross_entropy(lg.vm(), loss.vm(), &[0], 3, None).is_err());
        assert!(be.cross_entropy(lg.vm(), loss.at_mut(0, 1), &[0, 1], 3, None).is_err());
        assert!(be.cross_entropy(lg.vm(), loss.vm(), &[0, -1], 3, None).is_ok());
    }

    #[test]
    fn log_softmax_matches_reference() {
        let be = CpuBackend::new();
        for &(rows, vocab) in &[(3, 5), (20, 5000)] {
            let x: Vec<f32> = randn(4, rows * vocab).iter().map(|v| v * 10.0).collect();
            let xb = CpuBuf::from_f32_vec(x.clone());
            let mut out = out_f32(rows * vocab);
            be.log_softmax(out.vm(), xb.v(), vocab).unwrap();
            let want: Vec<f32> = x.chunks(vocab).flat_map(ref_log_softmax).map(|v| v as f32).collect();
            assert_all_close(out.as_f32().unwrap(), &want, 2e-6);
        }
        let x = out_f32(6);
        assert!(be.log_softmax(out_f32(5).vm(), x.v(), 3).is_err());
    }
}
