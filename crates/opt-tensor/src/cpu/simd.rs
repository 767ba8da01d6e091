//! Run-time CPU feature dispatch for the hot row kernels (softmax, cross-entropy, LayerNorm).
//!
//! Builds target the x86-64 baseline (SSE2) unless told otherwise. [`multiversion!`] compiles a
//! function body twice, as is and with AVX2 enabled, and picks one at run time (the feature
//! check is a cached atomic load). Rust never contracts `a * b + c` into an FMA nor reorders
//! float operations, so both versions perform the same IEEE operations in the same order: the
//! results are bit-identical and only the vector width differs. Helpers called from a body must
//! be `#[inline(always)]` to be compiled with the wider instruction set.

/// Define a function whose body is also compiled with AVX2 and dispatched at run time.
macro_rules! multiversion {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident $(<$($lt:lifetime),+>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?
        $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name $(<$($lt),+>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body $(<$($lt),+>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2 $(<$($lt),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::cpu::simd::use_avx2() {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// Whether to take the AVX2 versions (tests can force the baseline to compare the bits).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn use_avx2() -> bool {
    #[cfg(test)]
    if FORCE_BASELINE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx2")
}

/// Test switch: take the baseline versions even where AVX2 is available.
#[cfg(test)]
pub(crate) static FORCE_BASELINE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::FORCE_BASELINE;
    use crate::backend::{AttnDims, Backend, Buffer};
    use crate::cpu::testutil::*;
    use crate::cpu::{CpuBackend, CpuBuf};

    /// Everything the multiversioned kernels produce, as bits.
    fn run_all() -> Vec<Vec<u32>> {
        let be = CpuBackend::new();
        let mut res = Vec::new();
        let (rows, vocab) = (5, 1003);
        let x = CpuBuf::from_f32_vec(randn(1, rows * vocab).iter().map(|v| v * 5.0).collect());
        let mut lg = x.clone();
        let mut loss = out_f32(rows);
        be.cross_entropy(lg.vm(), loss.vm(), &[1, 0, -1, 1002, 7], vocab, Some(0.5)).unwrap();
        res.push(bits_of(&lg));
        res.push(bits_of(&loss));
        let mut ls = out_f32(rows * vocab);
        be.log_softmax(ls.vm(), x.v(), vocab).unwrap();
        res.push(bits_of(&ls));

        let (r, dim) = (7, 77);
        let xin = CpuBuf::from_f32_vec(randn(2, r * dim));
        let w = CpuBuf::from_f32_vec(randn(3, dim));
        let (mut out, mut mean, mut rstd) = (out_f32(r * dim), out_f32(r), out_f32(r));
        be.layernorm_forward(out.vm(), mean.vm(), rstd.vm(), xin.v(), Some(w.v()), Some(w.v()), dim, 1e-5).unwrap();
        let dy = CpuBuf::from_f32_vec(randn(4, r * dim));
        let (mut dx, mut dw, mut db) = (out_f32(r * dim), out_f32(dim), out_f32(dim));
        be.layernorm_backward(
            dx.vm(),
            Some(dw.vm()),
            Some(db.vm()),
            dy.v(),
            xin.v(),
            Some(w.v()),
            mean.v(),
            rstd.v(),
            dim,
        )
        .unwrap();
        for b in [&out, &mean, &rstd, &dx, &dw, &db] {
            res.push(bits_of(b));
        }

        let d = AttnDims {
            batch: 2,
            tq: 70,
            tk: 70,
            heads: 2,
            head_dim: 8,
            q_offset: 0,
            kv_batch_stride: 70 * 16,
            scale: 0.3,
        };
        let n = 2 * 70 * 16;
        let (q, k) = (CpuBuf::from_f32_vec(randn(5, n)), CpuBuf::from_f32_vec(randn(6, n)));
        let mut mask = vec![1u8; 140];
        mask[70] = 0;
        let (mut o, mut p) = (out_f32(n), out_f32(2 * 2 * 70 * 70));
        be.attention_forward(o.vm(), Some(p.vm()), q.v(), k.v(), q.v(), Some(&mask), &d, None).unwrap();
        res.push(bits_of(&o));
        res.push(bits_of(&p));
        res
    }

    #[test]
    fn avx2_and_baseline_give_identical_bits() {
        let fast = run_all();
        FORCE_BASELINE.store(true, Ordering::Relaxed);
        let base = run_all();
        FORCE_BASELINE.store(false, Ordering::Relaxed);
        assert!(fast == base, "AVX2 and baseline kernels differ");
    }
}
