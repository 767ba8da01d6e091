//! Skinny products for decoding: `out[m, n] = alpha * a[m, k] · w[n, k]ᵀ + beta * out` with
//! few rows `m` (one token per sequence) and a weight `w` stored row-major as PyTorch's
//! `Linear.weight` — f32, bf16 or f16.
//!
//! At decode time the product is memory-bound: every weight is read once per step. `gemm`'s
//! packing is wasted there, and widening a bf16 weight to f32 first would triple the traffic.
//! Here each task streams a block of weight rows straight from memory (widening bf16/f16 in
//! registers) and dots each row with every row of `a`, which stays in L1.
//!
//! Batch invariance: every output element is computed by the same sequence of operations (the
//! same 16-wide lanes over k, the same final reduction) whatever `m` is and however rows are
//! grouped, so a sequence decoded next to others gets bit-identical logits to one decoded
//! alone (the server relies on this: greedy output under load equals greedy output alone).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::Int8Matrix;

/// The largest `m` routed here; larger products go to `gemm`.
pub(crate) const GEMV_MAX_M: usize = 64;

/// Weight rows per task: ~100 KB of f32 weights at k = 768, enough to amortise a task.
const ROWS_PER_TASK: usize = 32;

/// The weight operand, in its storage dtype.
#[derive(Clone, Copy)]
pub(crate) enum WRows<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint output columns (their own weight rows).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method (not a field access) so closures capture the whole Send + Sync wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[i*n + j] = alpha * dot(a[i*k..], w[j*k..]) + beta * out[i*n + j]`.
/// Lengths: `a.len() >= m*k`, `w` has `n*k` elements, `out.len() >= m*n` (checked by caller).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemv_nt(out: &mut [f32], a: &[f32], w: WRows<'_>, m: usize, n: usize, k: usize, alpha: f32, beta: f32) {
    drive(out, m, n, k, alpha, beta, |j, dots| dot_rows(a, w, j, m, k, dots));
}

/// `out[i*n + j] = dot(a[i*k..], ŵ[j*k..])` for an int8 weight `w [n, k]`, dequantized on the
/// fly: one byte per weight is read instead of four (f32) or two (bf16). Bit-identical to
/// [`gemv_nt`] over `w.dequantize()` (each weight is widened as the single product `q · s`,
/// then the same lanes and reduction follow).
pub(crate) fn gemv_nt_i8(out: &mut [f32], a: &[f32], w: &Int8Matrix, m: usize) {
    let (n, k) = (w.rows(), w.cols());
    drive(out, m, n, k, 1.0, 0.0, |j, dots| dot_rows_i8(a, w, j, m, dots));
}

/// The parallel driver shared by the weight dtypes: tasks own blocks of weight rows (output
/// columns); `dot(j, dots)` writes the dots of weight row `j` with rows `0..m` of `a`.
#[allow(clippy::too_many_arguments)]
fn drive(out: &mut [f32], m: usize, n: usize, k: usize, alpha: f32, beta: f32, dot: impl Fn(usize, &mut [f32]) + Sync) {
    let optr = OutPtr(out.as_mut_ptr());
    let tasks = n.div_ceil(ROWS_PER_TASK);
    let run = |t: usize| {
        let j0 = t * ROWS_PER_TASK;
        let j1 = (j0 + ROWS_PER_TASK).min(n);
        let mut dots = [0f32; GEMV_MAX_M];
        for j in j0..j1 {
            dot(j, &mut dots[..m]);
            for (i, &d) in dots[..m].iter().enumerate() {
                // SAFETY: (i, j) is inside out (m*n checked by the caller) and column j belongs
                // to this task alone.
                unsafe {
                    let p = optr.get().add(i * n + j);
                    *p = if beta == 0.0 { alpha * d } else { alpha * d + beta * *p };
                }
            }
        }
    };
    if n * k * m >= 1 << 16 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Dots of int8 weight row `j` with rows `0..m` of `a`.
fn dot_rows_i8(a: &[f32], w: &Int8Matrix, j: usize, m: usize, dots: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were checked just above.
            unsafe { x86::dot_rows_i8(a, w, j, m, dots) };
            return;
        }
    }
    let k = w.cols();
    let mut wrow = vec![0f32; k];
    w.dequantize_rows_into(j, &mut wrow);
    scalar_dots(a, &wrow, m, k, dots)
}

/// Dots of weight row `j` with rows `0..m` of `a`.
fn dot_rows(a: &[f32], w: WRows<'_>, j: usize, m: usize, k: usize, dots: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features were checked just above.
            unsafe { x86::dot_rows(a, w, j, m, k, dots) };
            return;
        }
    }
    scalar_dot_rows(a, w, j, m, k, dots)
}

/// Portable fallback with the same lane structure (16 partial sums, pairwise reduction) so
/// results do not depend on the row grouping either.
fn scalar_dot_rows(a: &[f32], w: WRows<'_>, j: usize, m: usize, k: usize, dots: &mut [f32]) {
    let wrow: Vec<f32> = match w {
        WRows::F32(s) => s[j * k..(j + 1) * k].to_vec(),
        WRows::BF16(s) => s[j * k..(j + 1) * k].iter().map(|x| x.to_f32()).collect(),
        WRows::F16(s) => s[j * k..(j + 1) * k].iter().map(|x| x.to_f32()).collect(),
    };
    scalar_dots(a, &wrow, m, k, dots)
}

/// Dots of one widened weight row with rows `0..m` of `a`, in the lane structure of the AVX2
/// path.
fn scalar_dots(a: &[f32], wrow: &[f32], m: usize, k: usize, dots: &mut [f32]) {
    for (i, d) in dots.iter_mut().enumerate().take(m) {
        let x = &a[i * k..(i + 1) * k];
        let mut lanes = [0f32; 16];
        let body = k / 16 * 16;
        for c in (0..body).step_by(16) {
            for l in 0..16 {
                lanes[l] = x[c + l].mul_add(wrow[c + l], lanes[l]);
            }
        }
        let mut tail = 0f32;
        for c in body..k {
            tail = x[c].mul_add(wrow[c], tail);
        }
        *d = reduce16(&lanes) + tail;
    }
}

/// Sum 16 lanes as the AVX2 path does: (lo8 + hi8), then 8 → 4 → 2 → 1 pairwise.
fn reduce16(l: &[f32; 16]) -> f32 {
    let mut v = [0f32; 8];
    for i in 0..8 {
        v[i] = l[i] + l[i + 8];
    }
    let v4 = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    let v2 = [v4[0] + v4[2], v4[1] + v4[3]];
    v2[0] + v2[1]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::WRows;
    use crate::Int8Matrix;
    use std::arch::x86_64::*;

    /// Load 8 weights at `w[idx..idx + 8]` widened to f32.
    #[inline(always)]
    unsafe fn load_w(w: WRows<'_>, idx: usize) -> __m256 {
        match w {
            WRows::F32(s) => _mm256_loadu_ps(s.as_ptr().add(idx)),
            WRows::BF16(s) => {
                // bf16 is the top half of an f32: widen by a 16-bit shift.
                let h = _mm_loadu_si128(s.as_ptr().add(idx) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
            WRows::F16(s) => _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().add(idx) as *const __m128i)),
        }
    }

    #[inline(always)]
    unsafe fn wscalar(w: WRows<'_>, idx: usize) -> f32 {
        match w {
            WRows::F32(s) => *s.get_unchecked(idx),
            WRows::BF16(s) => s.get_unchecked(idx).to_f32(),
            WRows::F16(s) => s.get_unchecked(idx).to_f32(),
        }
    }

    /// Horizontal sum matching `super::reduce16`: lanes (lo + hi), then 8 → 4 → 2 → 1.
    #[inline(always)]
    unsafe fn hsum(lo: __m256, hi: __m256) -> f32 {
        let v = _mm256_add_ps(lo, hi);
        let v4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
        let v1 = _mm_add_ss(v2, _mm_shuffle_ps(v2, v2, 1));
        _mm_cvtss_f32(v1)
    }

    /// Dots of weight row `j` with up to 4 rows of `a` at once (the weight chunk is loaded
    /// once per 4 rows), 16 lanes per row in two accumulators.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(a: &[f32], w: WRows<'_>, j: usize, m: usize, k: usize, dots: &mut [f32]) {
        let body = k / 16 * 16;
        let wbase = j * k;
        let ap = a.as_ptr();
        let mut i = 0;
        while i < m {
            let r = (m - i).min(4);
            let mut lo = [_mm256_setzero_ps(); 4];
            let mut hi = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c < body {
                let w0 = load_w(w, wbase + c);
                let w1 = load_w(w, wbase + c + 8);
                for q in 0..r {
                    let xr = ap.add((i + q) * k + c);
                    lo[q] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, lo[q]);
                    hi[q] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w1, hi[q]);
                }
                c += 16;
            }
            for q in 0..r {
                let mut tail = 0f32;
                for c in body..k {
                    tail = (*ap.add((i + q) * k + c)).mul_add(wscalar(w, wbase + c), tail);
                }
                dots[i + q] = hsum(lo[q], hi[q]) + tail;
            }
            i += r;
        }
    }

    /// [`dot_rows`] for an int8 row: 16 codes are loaded, widened to f32 and multiplied by
    /// their group's scale (a group is a multiple of 16 columns, or the whole row, so a 16-wide
    /// step never straddles two groups), then accumulated exactly as an f32 row would be.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows_i8(a: &[f32], w: &Int8Matrix, j: usize, m: usize, dots: &mut [f32]) {
        let k = w.cols();
        let (gl, gpr) = (w.group_len(), w.groups_per_row());
        let body = k / 16 * 16;
        let qrow = w.codes().as_ptr().add(j * k);
        let srow = &w.scales()[j * gpr..(j + 1) * gpr];
        let ap = a.as_ptr();
        let mut i = 0;
        while i < m {
            let r = (m - i).min(4);
            let mut lo = [_mm256_setzero_ps(); 4];
            let mut hi = [_mm256_setzero_ps(); 4];
            let (mut g, mut gend) = (0, gl);
            let mut sv = _mm256_set1_ps(srow[0]);
            let mut c = 0;
            while c < body {
                if c >= gend {
                    g += 1;
                    gend += gl;
                    sv = _mm256_set1_ps(*srow.get_unchecked(g));
                }
                let raw = _mm_loadu_si128(qrow.add(c) as *const __m128i);
                let w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), sv);
                let w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8))), sv);
                for q in 0..r {
                    let xr = ap.add((i + q) * k + c);
                    lo[q] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, lo[q]);
                    hi[q] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w1, hi[q]);
                }
                c += 16;
            }
            for q in 0..r {
                let mut tail = 0f32;
                for c in body..k {
                    let wv = *qrow.add(c) as f32 * srow[c / gl];
                    tail = (*ap.add((i + q) * k + c)).mul_add(wv, tail);
                }
                dots[i + q] = hsum(lo[q], hi[q]) + tail;
            }
            i += r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|c| a[i * k + c] as f64 * w[j * k + c] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    fn data(len: usize, seed: u64) -> Vec<f32> {
        (0..len).map(|i| crate::rng::uniform(seed, i as u64) * 2.0 - 1.0).collect()
    }

    #[test]
    fn matches_naive_for_every_dtype_and_odd_shapes() {
        for &(m, n, k) in &[(1, 77, 35), (3, 130, 64), (5, 33, 769), (16, 64, 17)] {
            let a = data(m * k, 1);
            let w = data(n * k, 2);
            let want = naive(&a, &w, m, n, k);
            let mut out = vec![f32::NAN; m * n];
            gemv_nt(&mut out, &a, WRows::F32(&w), m, n, k, 1.0, 0.0);
            for (x, y) in out.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "f32 {m}x{n}x{k}: {x} vs {y}");
            }
            let wb: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
            let wbf: Vec<f32> = wb.iter().map(|x| x.to_f32()).collect();
            let want = naive(&a, &wbf, m, n, k);
            gemv_nt(&mut out, &a, WRows::BF16(&wb), m, n, k, 1.0, 0.0);
            for (x, y) in out.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "bf16: {x} vs {y}");
            }
            let wh: Vec<f16> = w.iter().map(|&x| f16::from_f32(x)).collect();
            let whf: Vec<f32> = wh.iter().map(|x| x.to_f32()).collect();
            let want = naive(&a, &whf, m, n, k);
            gemv_nt(&mut out, &a, WRows::F16(&wh), m, n, k, 1.0, 0.0);
            for (x, y) in out.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "f16: {x} vs {y}");
            }
        }
    }

    #[test]
    fn rows_are_bit_identical_whatever_the_batch() {
        let (n, k) = (96, 200);
        let a = data(9 * k, 3);
        let w = data(n * k, 4);
        let mut all = vec![0f32; 9 * n];
        gemv_nt(&mut all, &a, WRows::F32(&w), 9, n, k, 1.0, 0.0);
        for i in 0..9 {
            let mut one = vec![0f32; n];
            gemv_nt(&mut one, &a[i * k..(i + 1) * k], WRows::F32(&w), 1, n, k, 1.0, 0.0);
            assert_eq!(one, all[i * n..(i + 1) * n].to_vec(), "row {i}");
        }
        // The portable path has the same lane structure and gives the same bits.
        let mut dots = vec![0f32; 9];
        scalar_dot_rows(&a, WRows::F32(&w), 5, 9, k, &mut dots);
        for i in 0..9 {
            assert_eq!(dots[i].to_bits(), all[i * n + 5].to_bits(), "scalar row {i}");
        }
    }

    #[test]
    fn int8_rows_match_the_portable_path_bit_for_bit() {
        let (m, n, k) = (5, 12, 200);
        let a = data(m * k, 7);
        for gs in [0, 16, 64] {
            let w = Int8Matrix::quantize(&data(n * k, 8), n, k, gs).unwrap();
            let deq = w.dequantize();
            for j in 0..n {
                let (mut got, mut want) = (vec![0f32; m], vec![0f32; m]);
                dot_rows_i8(&a, &w, j, m, &mut got);
                scalar_dot_rows(&a, WRows::F32(&deq), j, m, k, &mut want);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "gs {gs} row {j}");
            }
        }
    }

    #[test]
    fn accumulates_with_beta() {
        let (m, n, k) = (2, 40, 48);
        let a = data(m * k, 5);
        let w = data(n * k, 6);
        let want = naive(&a, &w, m, n, k);
        let mut out = vec![1.0f32; m * n];
        gemv_nt(&mut out, &a, WRows::F32(&w), m, n, k, 2.0, 1.0);
        for (x, y) in out.iter().zip(&want) {
            assert!((x - (2.0 * y + 1.0)).abs() <= 1e-4, "{x} vs {}", 2.0 * y + 1.0);
        }
    }
}
