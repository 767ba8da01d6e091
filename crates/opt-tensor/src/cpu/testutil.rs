//! Helpers shared by the CPU kernel tests.

use crate::cpu::CpuBuf;
use crate::rng;

/// `n` standard-normal values from a fixed seed.
pub(crate) fn randn(seed: u64, n: usize) -> Vec<f32> {
    (0..n as u64).map(|i| rng::normal(seed, i)).collect()
}

/// A zeroed f32 buffer.
pub(crate) fn out_f32(n: usize) -> CpuBuf {
    CpuBuf::from_f32_vec(vec![0.0; n])
}

/// `|got - want| <= tol * max(1, |want|)`.
#[track_caller]
pub(crate) fn assert_close(got: f32, want: f32, tol: f32) {
    let err = (got - want).abs();
    assert!(err <= tol * want.abs().max(1.0), "got {got}, want {want} (err {err}, tol {tol})");
}

/// Elementwise [`assert_close`] over slices of equal length.
#[track_caller]
pub(crate) fn assert_all_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(err <= tol * w.abs().max(1.0), "element {i}: got {g}, want {w} (err {err}, tol {tol})");
    }
}

/// The bits of an f32 buffer, for exact comparisons.
pub(crate) fn bits_of(b: &CpuBuf) -> Vec<u32> {
    b.to_f32_vec().iter().map(|x| x.to_bits()).collect()
}

/// Run `f` on the global pool, then inside dedicated rayon pools of 1, 2 and 3 threads.
/// Deterministic kernels must return the same value from every run.
pub(crate) fn in_pools<T: Send>(f: impl Fn() -> T + Sync) -> Vec<T> {
    let mut out = vec![f()];
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
        out.push(pool.install(&f));
    }
    out
}

/// Naive `op(a) · op(b)` for one problem, in f64.
pub(crate) fn naive_matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f64> {
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let x = if ta { a[p * m + i] } else { a[i * k + p] };
                let y = if tb { b[j * k + p] } else { b[p * n + j] };
                s += x as f64 * y as f64;
            }
            out[i * n + j] = s;
        }
    }
    out
}
