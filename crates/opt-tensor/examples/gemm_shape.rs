//! One matmul shape, timed (not a test): for A/B runs under `perf stat` or interleaved with
//! another build. `gemm_shape M N K REPS [bf16]` times `a[M,K] · w[N,K]ᵀ` (a PyTorch-layout
//! weight) and prints the best and median milliseconds, and the CPU time of all threads per
//! product (Linux schedstat): on a loaded machine, `RAYON_NUM_THREADS=1` and CPU time compare
//! kernels better than wall time.
//!
//! `cargo run -p opt-tensor --release --example gemm_shape -- 128 50272 768 10`

use std::time::Instant;

use opt_tensor::{Backend, Buffer, CpuBackend, CpuBuf, DType, Gemm};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (m, n, k, reps) = (num(0, 128), num(1, 50272), num(2, 768), num(3, 10).max(1));
    let dtype = if args.get(4).is_some_and(|s| s == "bf16") { DType::BF16 } else { DType::F32 };
    let be = CpuBackend::new();
    let a = CpuBuf::from_f32_vec((0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect());
    let w: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    let w = be.from_f32(&w, dtype).expect("upload");
    let g = Gemm::new(m, n, k, false, true);
    let mut times = Vec::new();
    let mut cpu = 0.0;
    for r in 0..reps + 1 {
        // A fresh output each time, as the model's forward allocates its logits.
        let mut out = CpuBuf::zeros(DType::F32, m * n);
        let (t, c) = (Instant::now(), cpu_ms());
        be.matmul(out.vm(), a.v(), w.v(), &g).expect("matmul");
        if r > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
            cpu += cpu_ms() - c;
        }
    }
    times.sort_by(f64::total_cmp);
    let gflop = 2.0 * (m * n * k) as f64 / 1e9;
    let (best, med) = (times[0], times[times.len() / 2]);
    println!(
        "{m}x{k} . ({n}x{k})^T {dtype:?}: best {best:.2} ms ({:.1} GFLOP/s), median {med:.2} ms, cpu {:.2} ms",
        gflop / best * 1e3,
        cpu / reps as f64
    );
}

/// CPU time of all this process's threads so far, in ms (0 where schedstat is unavailable).
fn cpu_ms() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    dir.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e6
}
