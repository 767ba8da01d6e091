//! AdamW, following PyTorch's single-tensor (`foreach=False`, non-fused) `torch.optim.AdamW`
//! step operation by operation:
//!
//! ```text
//! g = grad * grad_scale
//! p *= 1 - lr * wd                                  (decoupled weight decay)
//! m  = lerp(m, g, 1 - b1)                           (= b1 m + (1 - b1) g)
//! v  = v * b2 + (1 - b2) * g * g
//! p += (-lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! Scalars derived from the hyper-parameters are computed in f64 (as Python does) and rounded
//! to f32 where PyTorch passes them to an f32 kernel; element arithmetic is f32 in PyTorch's
//! order (`lerp` uses its two-branch formula, `addcdiv` is `p + (s * m) / d`).

use rayon::prelude::*;

use super::par::{self, ELEM_CHUNK, PAR_MIN_ELEMS};
use crate::backend::AdamW;

/// One AdamW step over matching slices (lengths checked by the caller).
pub(crate) fn adamw(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamW) {
    let lr = hp.lr as f64;
    let decay = (1.0 - lr * hp.weight_decay as f64) as f32;
    let (b1, b2) = (hp.beta1, hp.beta2);
    let w1 = (1.0 - b1 as f64) as f32; // lerp weight
    let c2 = (1.0 - b2 as f64) as f32;
    let bc1 = 1.0 - (b1 as f64).powf(hp.step as f64);
    let bc2 = 1.0 - (b2 as f64).powf(hp.step as f64);
    let neg_step_size = (-lr / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let (eps, gs) = (hp.eps, hp.grad_scale);

    let block = |((p, m), v): ((&mut [f32], &mut [f32]), &mut [f32]), g: &[f32]| {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = g * gs;
            *p *= decay;
            // torch.lerp: exact at both ends, two formulas split at weight 0.5.
            *m = if w1 < 0.5 { *m + w1 * (g - *m) } else { g - (g - *m) * (1.0 - w1) };
            *v = *v * b2 + c2 * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p += neg_step_size * *m / denom;
        }
    };
    if par::worth_parallel(params.len(), PAR_MIN_ELEMS) {
        params
            .par_chunks_mut(ELEM_CHUNK)
            .zip(m.par_chunks_mut(ELEM_CHUNK))
            .zip(v.par_chunks_mut(ELEM_CHUNK))
            .zip(grads.par_chunks(ELEM_CHUNK))
            .for_each(|(pmv, g)| block(pmv, g));
    } else {
        block(((params, m), v), grads);
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::{AdamW, Backend, Buffer};
    use crate::cpu::testutil::*;
    use crate::cpu::{CpuBackend, CpuBuf};
    use crate::DType;

    /// The textbook AdamW in f64.
    fn reference(p: &mut [f64], g: &[f32], m: &mut [f64], v: &mut [f64], hp: &AdamW) {
        let (lr, b1, b2, eps, wd) =
            (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64, hp.eps as f64, hp.weight_decay as f64);
        for i in 0..p.len() {
            let g = g[i] as f64 * hp.grad_scale as f64;
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let bc1 = 1.0 - b1.powi(hp.step as i32);
            let bc2 = 1.0 - b2.powi(hp.step as i32);
            p[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + eps);
        }
    }

    #[test]
    fn matches_reference_over_several_steps() {
        let be = CpuBackend::new();
        for n in [10, 70_000] {
            let p0 = randn(1, n);
            let mut p = CpuBuf::from_f32_vec(p0.clone());
            let (mut m, mut v) = (out_f32(n), out_f32(n));
            let mut pr: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
            let (mut mr, mut vr) = (vec![0.0; n], vec![0.0; n]);
            for step in 1..=5u64 {
                let g = randn(10 + step, n);
                let hp =
                    AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.5 };
                let gb = CpuBuf::from_f32_vec(g.clone());
                be.adamw(p.vm(), gb.v(), m.vm(), v.vm(), &hp).unwrap();
                reference(&mut pr, &g, &mut mr, &mut vr, &hp);
            }
            let want: Vec<f32> = pr.iter().map(|&x| x as f32).collect();
            assert_all_close(p.as_f32().unwrap(), &want, 1e-6);
            let want: Vec<f32> = vr.iter().map(|&x| x as f32).collect();
            assert_all_close(v.as_f32().unwrap(), &want, 1e-6);
        }
    }

    #[test]
    fn rejects_bad_inputs() {
        let be = CpuBackend::new();
        let hp = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
        let g = out_f32(4);
        let (mut m, mut v) = (out_f32(4), out_f32(4));
        let mut p16 = be.zeros(DType::BF16, 4).unwrap();
        assert!(be.adamw(p16.vm(), g.v(), m.vm(), v.vm(), &hp).is_err());
        let mut p = out_f32(4);
        assert!(be.adamw(p.vm(), g.at(0, 3), m.vm(), v.vm(), &hp).is_err());
        assert!(be.adamw(p.vm(), g.v(), m.vm(), v.vm(), &AdamW { step: 0, ..hp }).is_err());
        assert!(be.adamw(p.vm(), g.v(), m.vm(), v.vm(), &hp).is_ok());
    }
}
