//! Matrix multiply on top of the `gemm` crate (runtime-dispatched AVX2/AVX-512/NEON kernels).
//!
//! Transposes cost nothing: `gemm` takes a row and a column stride per operand, so `op(a)` and
//! `op(b)` are just different strides over the same memory. Note `gemm::gemm` computes
//! `dst = alpha * dst + beta * lhs · rhs` — its `alpha`/`beta` are the reverse of BLAS's (and of
//! [`Gemm`]'s), which is why the call below passes `(g.beta, g.alpha)`.
//!
//! Summation order in `gemm` depends only on the problem shape (its k-blocking comes from cache
//! sizes; threads split m and n), so results are the same whatever the thread count.

use rayon::prelude::*;

use super::gemv::GEMV_MAX_M;
use super::memory::widen_into;
use super::{gemm_nt, par, with_scratch, CpuBuf};
use crate::backend::Gemm;
use crate::{Result, TensorError};

/// Problems with fewer multiply-adds than this run single-threaded (a fork costs more).
const PAR_GEMM_WORK: usize = 64 * 64 * 64;

/// Output columns per task in the column-blocked product (a multiple of every microkernel
/// width). A `b` block of 1024 × k stays in L2/L3 while it is converted and consumed.
const COL_BLOCK: usize = 1024;

/// Elements a batched operand needs: `(batch - 1) * stride + size`.
fn extent(batch: usize, stride: usize, size: usize) -> Option<usize> {
    if size == 0 {
        return Some(0);
    }
    (batch - 1).checked_mul(stride)?.checked_add(size)
}

/// Validate operand lengths for `g`.
pub(crate) fn check(out_len: usize, a_len: usize, b_len: usize, g: &Gemm) -> Result<()> {
    if g.batch == 0 {
        return Ok(());
    }
    let err = |detail: String| TensorError::Shape { op: "matmul", detail };
    let size = |x: usize, y: usize| x.checked_mul(y).ok_or_else(|| err(format!("{g:?} overflows usize")));
    let (mk, kn, mn) = (size(g.m, g.k)?, size(g.k, g.n)?, size(g.m, g.n)?);
    for (what, len, stride, sz) in
        [("a", a_len, g.stride_a, mk), ("b", b_len, g.stride_b, kn), ("out", out_len, g.stride_out, mn)]
    {
        let need = extent(g.batch, stride, sz).ok_or_else(|| err(format!("{g:?} overflows usize")))?;
        if len < need {
            return Err(err(format!("{what} has {len} elements, {g:?} needs at least {need}")));
        }
    }
    Ok(())
}

/// Whether a low-precision `b` should be widened block by block inside the product (large
/// problems: no full-size f32 copy of a big weight, and the conversion runs in parallel and
/// in cache) rather than all at once up front.
pub(crate) fn widen_b_per_block(g: &Gemm) -> bool {
    g.batch >= 1 && g.n >= 2 * COL_BLOCK && g.m.saturating_mul(g.n).saturating_mul(g.k) >= PAR_GEMM_WORK
}

/// Zero the outputs (or scale them by beta) when `k == 0`: the product is empty.
fn empty_product(out: &mut [f32], g: &Gemm) {
    let mn = g.m * g.n;
    for bi in 0..g.batch {
        let o = &mut out[bi * g.stride_out..bi * g.stride_out + mn];
        if g.beta == 0.0 {
            o.fill(0.0);
        } else {
            o.iter_mut().for_each(|x| *x *= g.beta);
        }
    }
}

/// `out[b] = alpha * op(a[b]) · op(b[b]) + beta * out[b]` (lengths already checked by [`check`]).
pub(crate) fn matmul(out: &mut [f32], a: &[f32], b: &[f32], g: &Gemm) {
    let Gemm { m, n, k, batch, stride_a, stride_b, stride_out, .. } = *g;
    if batch == 0 || m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        return empty_product(out, g);
    }
    if batch == 1 && g.trans_b && !g.trans_a && m > GEMV_MAX_M && gemm_nt::available() {
        // Prefill-shaped product against a PyTorch-layout weight: stream the weight unpacked.
        return gemm_nt::gemm_nt(out, a, b, m, n, k, g.alpha, g.beta);
    }
    let mn = m * n;
    let (a_size, b_size) = (m * k, k * n);
    let work = mn.saturating_mul(k);
    let disjoint = stride_out >= mn;
    if batch > 1 && disjoint && work < PAR_GEMM_WORK && par::worth_parallel(work.saturating_mul(batch), PAR_GEMM_WORK) {
        // Many small problems (e.g. per-head products): one problem per task, each serial.
        let span = (batch - 1) * stride_out + mn;
        out[..span].par_chunks_mut(stride_out.max(1)).enumerate().for_each(|(bi, o)| {
            let a = &a[bi * stride_a..bi * stride_a + a_size];
            let b = &b[bi * stride_b..bi * stride_b + b_size];
            gemm_one(&mut o[..mn], a, b, g, gemm::Parallelism::None);
        });
        return;
    }
    let parallelism = if work >= PAR_GEMM_WORK { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    for bi in 0..batch {
        // Sequential, so overlapping outputs (e.g. `stride_out == 0` accumulating over the
        // batch) behave as a loop over problems.
        let o = &mut out[bi * stride_out..bi * stride_out + mn];
        let a = &a[bi * stride_a..bi * stride_a + a_size];
        let b = &b[bi * stride_b..bi * stride_b + b_size];
        gemm_one(o, a, b, g, parallelism);
    }
}

/// Like [`matmul`] with a bf16/f16 `b` (`buf[b_off..]`), widened to f32 one column block at a
/// time in thread-local scratch; blocks run in parallel. For [`widen_b_per_block`] problems.
pub(crate) fn matmul_wide_b(out: &mut [f32], a: &[f32], b: &CpuBuf, b_off: usize, g: &Gemm) {
    let Gemm { m, n, k, batch, stride_a, stride_b, stride_out, .. } = *g;
    if batch == 0 || m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        return empty_product(out, g);
    }
    let (mn, a_size) = (m * n, m * k);
    for bi in 0..batch {
        let o = &mut out[bi * stride_out..bi * stride_out + mn];
        let a = &a[bi * stride_a..bi * stride_a + a_size];
        let off = b_off + bi * stride_b;
        col_blocked(o, a, g, |j0, w, scratch| {
            scratch.resize(k * w, 0.0);
            if g.trans_b {
                // Rows j0..j0+w of the stored n×k matrix: one contiguous range.
                widen_into(b, off + j0 * k, scratch);
            } else {
                // Columns j0..j0+w of the stored k×n matrix: k strided row pieces.
                for (p, row) in scratch.chunks_exact_mut(w).enumerate() {
                    widen_into(b, off + p * n + j0, row);
                }
            }
        });
    }
}

/// Raw output pointer shared by column-block tasks, each writing its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used by `col_blocked`, whose tasks write disjoint column ranges.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper, not the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One m×n problem split into [`COL_BLOCK`]-wide column blocks computed in parallel, each by a
/// serial gemm. `fill(j0, w, scratch)` writes columns `j0..j0+w` of `op(b)` into `scratch` as a
/// k×w (`!trans_b`) or w×k (`trans_b`) row-major block.
pub(crate) fn col_blocked(out: &mut [f32], a: &[f32], g: &Gemm, fill: impl Fn(usize, usize, &mut Vec<f32>) + Sync) {
    let (m, n, k) = (g.m, g.n, g.k);
    debug_assert!(out.len() == m * n && a.len() == m * k);
    let (a_rs, a_cs) = if g.trans_a { (1, m) } else { (k, 1) };
    let dst = OutPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(COL_BLOCK);
    let task = |bi: usize| {
        let j0 = bi * COL_BLOCK;
        let w = COL_BLOCK.min(n - j0);
        with_scratch(|scratch| {
            fill(j0, w, scratch);
            let (b_rs, b_cs) = if g.trans_b { (1, k) } else { (w, 1) };
            // SAFETY: `scratch` holds the k×w block of op(b) with these strides (filled above).
            // The block writes out[i * n + j0 + jj] for i < m, jj < w: inside `out` (m×n), and
            // tasks have disjoint column ranges, so no two tasks touch the same element; `out`
            // stays exclusively borrowed by this function until every task has finished.
            unsafe {
                gemm::gemm(
                    m,
                    w,
                    k,
                    dst.get().add(j0),
                    1,
                    n as isize,
                    g.beta != 0.0,
                    a.as_ptr(),
                    a_cs as isize,
                    a_rs as isize,
                    scratch.as_ptr(),
                    b_cs as isize,
                    b_rs as isize,
                    g.beta,
                    g.alpha,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    };
    if par::worth_parallel((m * n).saturating_mul(k), PAR_GEMM_WORK) {
        (0..blocks).into_par_iter().for_each(task);
    } else {
        (0..blocks).for_each(task);
    }
}

/// Row and column strides (in elements) of a matrix inside a slice.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strides {
    pub rs: usize,
    pub cs: usize,
}

impl Strides {
    /// Row-major with row stride `rs`.
    pub(crate) fn rows(rs: usize) -> Self {
        Strides { rs, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    pub(crate) fn cols(rs: usize) -> Self {
        Strides { rs: 1, cs: rs }
    }
    /// Smallest slice length holding an `r × c` matrix with these strides.
    fn extent(self, r: usize, c: usize) -> usize {
        if r == 0 || c == 0 {
            0
        } else {
            (r - 1) * self.rs + (c - 1) * self.cs + 1
        }
    }
}

/// Single-threaded strided product `dst (m×n) = scale * lhs (m×k) · rhs (k×n)` (or `+=` when
/// `accumulate`), for kernels that multiply sub-matrices in place, e.g. one attention head
/// (columns `h*HS..` of `[T, C]` rows). Panics if a matrix does not fit its slice (an internal
/// invariant: callers validate shapes first).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_s: Strides,
    lhs: &[f32],
    lhs_s: Strides,
    rhs: &[f32],
    rhs_s: Strides,
    scale: f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_s.rs + j * dst_s.cs] = 0.0;
                }
            }
        }
        return;
    }
    assert!(
        dst_s.extent(m, n) <= dst.len() && lhs_s.extent(m, k) <= lhs.len() && rhs_s.extent(k, n) <= rhs.len(),
        "gemm_strided operands out of bounds"
    );
    // SAFETY: the assert above bounds every element gemm reads or writes; `dst` is exclusively
    // borrowed so it aliases neither input. (Overlapping dst elements — a zero stride — would
    // only be a logic error, not memory-unsafe.)
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_s.cs as isize,
            dst_s.rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_s.cs as isize,
            lhs_s.rs as isize,
            rhs.as_ptr(),
            rhs_s.cs as isize,
            rhs_s.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// One problem: `out (m×n) = alpha * op(a) · op(b) + beta * out`, slices exactly sized.
fn gemm_one(out: &mut [f32], a: &[f32], b: &[f32], g: &Gemm, parallelism: gemm::Parallelism) {
    let (m, n, k) = (g.m, g.n, g.k);
    debug_assert!(out.len() == m * n && a.len() == m * k && b.len() == k * n);
    // (row stride, column stride) of op(a) (m×k) and op(b) (k×n) in their row-major storage.
    let (a_rs, a_cs) = if g.trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if g.trans_b { (1, k) } else { (n, 1) };
    // SAFETY: with these strides every element gemm touches is inside the slices: op(a)(i, p)
    // is at most (m-1)*k + (k-1) < m*k (or (k-1)*m + (m-1) transposed), likewise for b and out;
    // `out` is exclusively borrowed, so it does not alias `a` or `b`. With `read_dst == false`
    // gemm never reads `out` (so stale NaNs there do not leak in when beta == 0).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            g.beta != 0.0,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            g.beta,
            g.alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Buffer};
    use crate::cpu::testutil::*;
    use crate::cpu::{CpuBackend, CpuBuf};
    use crate::DType;

    /// Check `be.matmul` against the naive product for one configuration.
    fn check_case(g: Gemm, a_dt: DType, b_dt: DType, seed: u64) {
        let be = CpuBackend::new();
        let a_len = extent(g.batch, g.stride_a, g.m * g.k).unwrap();
        let b_len = extent(g.batch, g.stride_b, g.k * g.n).unwrap();
        let o_len = extent(g.batch, g.stride_out, g.m * g.n).unwrap();
        let a = be.from_f32(&randn(seed, a_len), a_dt).unwrap();
        let b = be.from_f32(&randn(seed + 1, b_len), b_dt).unwrap();
        let init = randn(seed + 2, o_len);
        let mut out = CpuBuf::from_f32_vec(init.clone());
        be.matmul(out.vm(), a.v(), b.v(), &g).unwrap();
        // The reference uses the values after rounding to the storage dtype.
        let (af, bf) = (a.to_f32_vec(), b.to_f32_vec());
        let mut want: Vec<f64> = init.iter().map(|&x| x as f64).collect();
        for bi in 0..g.batch {
            let p = naive_matmul(&af[bi * g.stride_a..], &bf[bi * g.stride_b..], g.m, g.n, g.k, g.trans_a, g.trans_b);
            for (i, v) in p.iter().enumerate() {
                let o = &mut want[bi * g.stride_out + i];
                *o = g.alpha as f64 * v + if g.beta == 0.0 { 0.0 } else { g.beta as f64 * *o };
            }
        }
        let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        assert_all_close(out.as_f32().unwrap(), &want, 1e-4 * (g.k as f32).sqrt().max(1.0));
    }

    #[test]
    fn all_transposes_against_naive() {
        let mut seed = 100;
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 9, 33), (70, 80, 90), (1, 200, 64), (130, 1, 20)] {
            for ta in [false, true] {
                for tb in [false, true] {
                    seed += 3;
                    check_case(Gemm::new(m, n, k, ta, tb), DType::F32, DType::F32, seed);
                }
            }
        }
    }

    #[test]
    fn alpha_beta_accumulate_and_low_precision_operands() {
        let mut g = Gemm::new(20, 30, 40, false, true);
        g.alpha = 0.5;
        g.beta = 2.0;
        check_case(g, DType::F32, DType::F32, 1);
        check_case(Gemm::new(20, 30, 40, false, true).accumulate(), DType::F32, DType::F32, 2);
        for (a_dt, b_dt) in [(DType::F32, DType::BF16), (DType::F32, DType::F16), (DType::BF16, DType::F16)] {
            check_case(Gemm::new(33, 65, 48, false, true), a_dt, b_dt, 3);
            check_case(Gemm::new(33, 65, 48, true, false), a_dt, b_dt, 4);
        }
        // beta == 0 ignores NaN in the output buffer.
        let be = CpuBackend::new();
        let mut out = CpuBuf::from_f32_vec(vec![f32::NAN; 4]);
        let a = CpuBuf::from_f32_vec(vec![1.0, 2.0, 3.0, 4.0]);
        be.matmul(out.vm(), a.v(), a.v(), &Gemm::new(2, 2, 2, false, false)).unwrap();
        assert_eq!(out.to_f32_vec(), vec![7.0, 10.0, 15.0, 22.0]);
    }

    #[test]
    fn low_precision_b_widened_per_column_block() {
        // n spans several COL_BLOCKs plus a ragged tail, so `matmul_wide_b` is taken.
        let n = 2 * COL_BLOCK + 37;
        for (tb, dt) in [(true, DType::BF16), (false, DType::F16), (true, DType::F16)] {
            let g = Gemm::new(6, n, 24, false, tb);
            assert!(widen_b_per_block(&g));
            check_case(g, DType::F32, dt, 11);
            let mut g2 = Gemm::new(5, n, 16, true, tb);
            g2.alpha = -1.5;
            g2.beta = 0.5;
            g2.batch = 2;
            g2.stride_a = 5 * 16 + 1;
            g2.stride_b = n * 16 + 3;
            g2.stride_out = 5 * n;
            check_case(g2, DType::F32, dt, 12);
        }
    }

    #[test]
    fn batched_problems() {
        // Small per-head problems (parallel over the batch) and a larger batched one.
        for &(batch, m, n, k) in &[(24, 8, 8, 16), (3, 70, 70, 70)] {
            for (ta, tb) in [(false, true), (true, false)] {
                let mut g = Gemm::new(m, n, k, ta, tb);
                g.batch = batch;
                g.stride_a = m * k + 3; // gaps between problems
                g.stride_b = k * n;
                g.stride_out = m * n + 5;
                check_case(g, DType::F32, DType::F32, 7);
            }
        }
        // Broadcast b (stride 0) and accumulate all problems into one output (stride 0).
        let mut g = Gemm::new(4, 5, 6, false, false).accumulate();
        g.batch = 3;
        g.stride_b = 0;
        g.stride_out = 0;
        check_case(g, DType::F32, DType::F32, 8);
    }

    #[test]
    fn empty_inner_dimension_and_shape_errors() {
        let be = CpuBackend::new();
        let mut out = CpuBuf::from_f32_vec(vec![1.0; 6]);
        let e = CpuBuf::from_f32_vec(vec![]);
        let mut g = Gemm::new(2, 3, 0, false, false);
        g.beta = 3.0;
        be.matmul(out.vm(), e.v(), e.v(), &g).unwrap();
        assert_eq!(out.to_f32_vec(), vec![3.0; 6]);
        be.matmul(out.vm(), e.v(), e.v(), &Gemm::new(2, 3, 0, false, false)).unwrap();
        assert_eq!(out.to_f32_vec(), vec![0.0; 6]);

        let a = CpuBuf::from_f32_vec(vec![0.0; 6]);
        let g = Gemm::new(2, 3, 3, false, false);
        assert!(be.matmul(out.vm(), a.v(), a.at(0, 5), &g).is_err());
        assert!(be.matmul(out.at_mut(0, 5), a.v(), a.v(), &g).is_err());
        let mut h = be.zeros(DType::BF16, 6).unwrap();
        assert!(matches!(be.matmul(h.vm(), a.v(), a.v(), &g), Err(TensorError::DType { .. })));
    }

    #[test]
    fn same_bits_whatever_the_thread_count() {
        let be = CpuBackend::new();
        let (m, n, k) = (96, 300, 256);
        let a = CpuBuf::from_f32_vec(randn(1, m * k));
        let b = be.from_f32(&randn(2, n * k), DType::BF16).unwrap();
        let runs = in_pools(|| {
            let mut out = out_f32(m * n);
            be.matmul(out.vm(), a.v(), b.v(), &Gemm::new(m, n, k, false, true)).unwrap();
            bits_of(&out)
        });
        assert!(runs.windows(2).all(|w| w[0] == w[1]));
    }
}
