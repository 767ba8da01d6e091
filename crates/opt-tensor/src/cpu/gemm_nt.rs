//! Prefill-shaped products against a PyTorch-layout weight:
//! `out[m, n] = alpha * a[m, k] · w[n, k]ᵀ + beta * out` with f32 `w`, on AVX-512.
//!
//! `gemm` packs (transposes) every weight panel before multiplying. The weights of a forward
//! pass (~500 MB for OPT-125m with its LM head) do not fit in any cache, so that packing is a
//! separate phase that waits on DRAM — about a sixth of a 128-token prefill. Here only the small
//! activation operand is repacked (transposed, once per call); the weight rows are streamed
//! straight from memory, each weight element broadcast against 64 tokens at a time, so the
//! weight traffic overlaps the arithmetic.
//!
//! Microkernel: a tile of 64 tokens (four 16-lane vectors) × 6 weight rows in 24 accumulators.
//! Each output element is one f32 FMA chain over `k` in order, so its bits do not depend on
//! how rows, tokens or tasks are grouped — nor on the thread count.

use rayon::prelude::*;

use super::with_scratch;

/// Tokens per tile: four 16-lane vectors.
const TILE_M: usize = 64;
/// Weight rows per microkernel call.
const TILE_N: usize = 6;
/// Weight rows per parallel task (a multiple of [`TILE_N`]): ~140 KB of f32 weights at k = 768.
const ROWS_PER_TASK: usize = 48;
/// Below this many multiply-adds the product runs on the calling thread.
const PAR_WORK: usize = 1 << 18;

/// Whether [`gemm_nt`] can run here (AVX-512F; otherwise callers use `gemm`).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
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

/// `out[i*n + j] = alpha * Σ_p a[i*k + p] * w[j*k + p] + beta * out[i*n + j]` (`beta == 0`
/// ignores `out`). Requires [`available`] and `a.len() >= m*k`, `w.len() >= n*k`,
/// `out.len() >= m*n` (panics otherwise).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_nt(out: &mut [f32], a: &[f32], w: &[f32], m: usize, n: usize, k: usize, alpha: f32, beta: f32) {
    assert!(available(), "gemm_nt needs AVX-512F");
    assert!(a.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "gemm_nt operands too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for o in &mut out[..m * n] {
            *o = if beta == 0.0 { 0.0 } else { beta * *o };
        }
        return;
    }
    let tiles = m.div_ceil(TILE_M);
    with_scratch(|scratch| {
        let pa = pack_a(scratch, a, m, k, tiles);
        let optr = OutPtr(out.as_mut_ptr());
        let run = |t: usize| {
            let j0 = t * ROWS_PER_TASK;
            let j1 = (j0 + ROWS_PER_TASK).min(n);
            // SAFETY: `available()` was asserted; `pa` holds `tiles` zero-padded panels of
            // k × 64; rows j0..j1 of `w` and columns j0..j1 of `out` are in bounds (asserted
            // above) and columns j0..j1 belong to this task alone.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::rows(optr.get(), pa, w, (m, n, k), j0, j1, alpha, beta)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (optr, pa, j1);
        };
        let tasks = n.div_ceil(ROWS_PER_TASK);
        if m.saturating_mul(n).saturating_mul(k) >= PAR_WORK && tasks > 1 {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    });
}

/// Transpose `a [m, k]` into `tiles` panels of `[k][64]` (token lanes contiguous, tokens past
/// `m` zero) inside `scratch`, 64-byte aligned; returns the panels. Groups of 16 tokens are
/// packed in parallel for large operands.
fn pack_a<'s>(scratch: &'s mut Vec<f32>, a: &[f32], m: usize, k: usize, tiles: usize) -> &'s [f32] {
    let len = tiles * k * TILE_M;
    if scratch.len() < len + 16 {
        scratch.resize(len + 16, 0.0);
    }
    let skip = scratch.as_ptr().align_offset(64).min(16);
    let pa = OutPtr(scratch[skip..skip + len].as_mut_ptr());
    let groups = tiles * TILE_M / 16;
    let group = |g: usize| {
        // SAFETY: group g writes lanes 16*(g%4)..+16 of every k-row of panel g/4: inside the
        // `len` elements, and no other group writes them.
        unsafe {
            let panel = pa.get().add(g / 4 * k * TILE_M + 16 * (g % 4));
            pack_group(panel, a, m, k, 16 * g);
        }
    };
    if m * k >= 1 << 15 {
        (0..groups).into_par_iter().for_each(group);
    } else {
        (0..groups).for_each(group);
    }
    &scratch[skip..skip + len]
}

/// Tokens `i0..i0+16` of `a` (zeros past `m`) into `panel[p*64 + 0..16]` for every `p < k`.
///
/// # Safety
/// `panel` is valid for writes at `p * 64 + l` for `p < k`, `l < 16`.
unsafe fn pack_group(panel: *mut f32, a: &[f32], m: usize, k: usize, i0: usize) {
    let rows = m.saturating_sub(i0).min(16);
    let mut p = 0;
    #[cfg(target_arch = "x86_64")]
    if rows == 16 {
        let blocks = k / 16 * 16;
        while p < blocks {
            // SAFETY: rows i0..i0+16 exist (rows == 16) and columns p..p+16 are inside k;
            // avx512f is present (the only caller is gemm_nt, which asserted `available`).
            x86::transpose16(a.as_ptr().add(i0 * k + p), k, panel.add(p * TILE_M));
            p += 16;
        }
    }
    for p in p..k {
        let dst = panel.add(p * TILE_M);
        for l in 0..16 {
            *dst.add(l) = if l < rows { a[(i0 + l) * k + p] } else { 0.0 };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{TILE_M, TILE_N};
    use std::arch::x86_64::*;

    /// Output columns `j0..j1` for all `m` rows.
    ///
    /// # Safety
    /// AVX-512F present; `pa` as built by `pack_a`; `w` holds rows `..j1` of length `k`;
    /// `out` points at an `m × n` matrix whose columns `j0..j1` nobody else touches meanwhile.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(
        out: *mut f32,
        pa: &[f32],
        w: &[f32],
        (m, n, k): (usize, usize, usize),
        j0: usize,
        j1: usize,
        alpha: f32,
        beta: f32,
    ) {
        let mut tile = [[0f32; TILE_M]; TILE_N];
        let mut jb = j0;
        while jb < j1 {
            let nr = (j1 - jb).min(TILE_N);
            let wp = w.as_ptr().add(jb * k);
            // The next microtile's weight rows, fetched into L2 during the first token tile.
            let next = (j1 - jb - nr).min(TILE_N);
            for (t, panel) in pa.chunks_exact(k * TILE_M).enumerate() {
                let i0 = t * TILE_M;
                let rows = (m - i0).min(TILE_M);
                let mv = rows.div_ceil(16);
                let pf = Prefetch { base: wp.wrapping_add(nr * k), rows: if t == 0 { next } else { 0 } };
                kernel_dispatch(mv, nr, panel.as_ptr(), wp, k, pf, &mut tile);
                // Row by row, so each output row's `nr` adjacent columns are written together.
                for i in 0..rows {
                    let o = out.add((i0 + i) * n + jb);
                    for (r, col) in tile.iter().enumerate().take(nr) {
                        let o = o.add(r);
                        *o = if beta == 0.0 { alpha * col[i] } else { alpha * col[i] + beta * *o };
                    }
                }
            }
            jb += nr;
        }
    }

    /// Write the transpose of the 16×16 block at `src` (row stride `ld`) as 16 rows of 16 at
    /// `dst` with row stride 64: `dst[c*64 + r] = src[r*ld + c]`.
    ///
    /// # Safety
    /// AVX-512F present; the block is readable and the destination rows writable.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(src: *const f32, ld: usize, dst: *mut f32) {
        let mut r = [_mm512_setzero_ps(); 16];
        for (q, x) in r.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(src.add(q * ld));
        }
        // 32-bit interleave of row pairs, then 64-bit: u[4j + c] holds, in 128-bit lane L,
        // rows 4j..4j+4 of column 4L + c.
        let mut t = [_mm512_setzero_ps(); 16];
        for j in 0..8 {
            t[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
            t[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            let d = |x: __m512| _mm512_castps_pd(x);
            let (t0, t1, t2, t3) = (d(t[4 * j]), d(t[4 * j + 1]), d(t[4 * j + 2]), d(t[4 * j + 3]));
            u[4 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
            u[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
            u[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
            u[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
        }
        // Gather lane L of u[c], u[4+c], u[8+c], u[12+c] into column 4L + c.
        for c in 0..4 {
            let x0 = _mm512_shuffle_f32x4::<0b01_00_01_00>(u[c], u[4 + c]);
            let x1 = _mm512_shuffle_f32x4::<0b11_10_11_10>(u[c], u[4 + c]);
            let y0 = _mm512_shuffle_f32x4::<0b01_00_01_00>(u[8 + c], u[12 + c]);
            let y1 = _mm512_shuffle_f32x4::<0b11_10_11_10>(u[8 + c], u[12 + c]);
            let cols = [
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x0, y0),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x0, y0),
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x1, y1),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x1, y1),
            ];
            for (l, v) in cols.into_iter().enumerate() {
                _mm512_storeu_ps(dst.add((4 * l + c) * TILE_M), v);
            }
        }
    }

    /// Weight rows to prefetch while a microkernel runs: `rows` rows of `k` from `base`.
    #[derive(Clone, Copy)]
    pub(super) struct Prefetch {
        base: *const f32,
        rows: usize,
    }

    /// `kernel::<MV, NR>` for runtime `mv` (1..=4) and `nr` (1..=6).
    #[inline(always)]
    unsafe fn kernel_dispatch(
        mv: usize,
        nr: usize,
        pa: *const f32,
        w: *const f32,
        k: usize,
        pf: Prefetch,
        tile: &mut [[f32; TILE_M]; TILE_N],
    ) {
        macro_rules! go {
            ($($mv:literal),*; $nrs:tt) => {
                match mv {
                    $($mv => go!(@nr $mv; $nrs),)*
                    _ => unreachable!(),
                }
            };
            (@nr $mv:literal; [$($nr:literal),*]) => {
                match nr {
                    $($nr => kernel::<$mv, $nr>(pa, w, k, pf, tile),)*
                    _ => unreachable!(),
                }
            };
        }
        go!(1, 2, 3, 4; [1, 2, 3, 4, 5, 6])
    }

    /// `tile[r][16v + l] = Σ_p pa[p*64 + 16v + l] * w[r*k + p]` for `v < MV`, `r < NR`, and
    /// one cache line of each `pf` row per 16 steps of `p` prefetched into L2.
    #[inline(always)]
    unsafe fn kernel<const MV: usize, const NR: usize>(
        pa: *const f32,
        w: *const f32,
        k: usize,
        pf: Prefetch,
        tile: &mut [[f32; TILE_M]; TILE_N],
    ) {
        let mut acc = [[_mm512_setzero_ps(); NR]; MV];
        let mut wr = [w; NR];
        for (r, p) in wr.iter_mut().enumerate() {
            *p = w.add(r * k);
        }
        let mut step = |p: usize| {
            let ap = pa.add(p * TILE_M);
            let mut av = [_mm512_setzero_ps(); MV];
            for (v, x) in av.iter_mut().enumerate() {
                *x = _mm512_load_ps(ap.add(16 * v));
            }
            for r in 0..NR {
                let b = _mm512_set1_ps(*wr[r].add(p));
                for v in 0..MV {
                    acc[v][r] = _mm512_fmadd_ps(av[v], b, acc[v][r]);
                }
            }
        };
        let mut p = 0;
        while p + 16 <= k {
            for r in 0..pf.rows {
                _mm_prefetch::<_MM_HINT_T1>(pf.base.wrapping_add(r * k + p) as *const i8);
            }
            for q in p..p + 16 {
                step(q);
            }
            p += 16;
        }
        for q in p..k {
            step(q);
        }
        for (v, row) in acc.iter().enumerate() {
            for (r, &x) in row.iter().enumerate() {
                _mm512_storeu_ps(tile[r].as_mut_ptr().add(16 * v), x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{in_pools, naive_matmul, randn};

    fn product(a: &[f32], w: &[f32], (m, n, k): (usize, usize, usize), alpha: f32, beta: f32, init: f32) -> Vec<f32> {
        let mut out = vec![init; m * n];
        gemm_nt(&mut out, a, w, m, n, k, alpha, beta);
        out
    }

    #[test]
    fn matches_naive_on_ragged_shapes() {
        if !available() {
            return;
        }
        let mut seed = 40;
        for &(m, n, k) in &[(1, 1, 1), (65, 7, 5), (130, 97, 33), (200, 13, 48), (128, 50, 160), (79, 6, 17), (3, 5, 0)]
        {
            seed += 3;
            let (a, w) = (randn(seed, m * k), randn(seed + 1, n * k));
            let want = naive_matmul(&a, &w, m, n, k, false, true);
            let tol = 1e-5 * (k as f64).sqrt().max(1.0);
            // beta == 0 overwrites (NaN in out ignored); beta != 0 accumulates.
            for (alpha, beta, init) in [(1.0, 0.0, f32::NAN), (-0.5, 2.0, 0.25)] {
                let got = product(&a, &w, (m, n, k), alpha, beta, init);
                for (i, (&g, &y)) in got.iter().zip(&want).enumerate() {
                    let y = alpha as f64 * y + if beta == 0.0 { 0.0 } else { (beta * init) as f64 };
                    assert!((g as f64 - y).abs() <= tol * y.abs().max(1.0), "{m}x{n}x{k} [{i}]: {g} vs {y}");
                }
            }
        }
    }

    #[test]
    fn same_bits_whatever_the_threads_or_the_rows_around() {
        if !available() {
            return;
        }
        let (m, n, k) = (150, 301, 200);
        let (a, w) = (randn(1, m * k), randn(2, n * k));
        let runs = in_pools(|| product(&a, &w, (m, n, k), 1.0, 0.0, 0.0));
        assert!(runs.windows(2).all(|x| x[0] == x[1]));
        // Each output is one FMA chain over k: rows computed in a different batch (offset and
        // size, so different tiles and padding) give the same bits.
        let (lo, rows) = (37, 70);
        let part = product(&a[lo * k..(lo + rows) * k], &w, (rows, n, k), 1.0, 0.0, 0.0);
        assert!(part == runs[0][lo * n..(lo + rows) * n]);
    }
}
