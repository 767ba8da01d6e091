//! Timing check for the CPU matmul (not a test): GFLOP/s of the OPT-125m shaped products.
//!
//! `cargo run -p opt-tensor --release --example matmul_speed`

use std::time::Instant;

use opt_tensor::{Backend, Buffer, CpuBackend, CpuBuf, DType, Gemm};

/// Best and median GFLOP/s of `reps` runs after a warm-up.
fn bench(name: &str, m: usize, n: usize, k: usize, trans_b: bool, b_dtype: DType, reps: usize) {
    let be = CpuBackend::new();
    let a = CpuBuf::from_f32_vec((0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect());
    let b_host: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    let b = be.from_f32(&b_host, b_dtype).expect("upload");
    let mut out = CpuBuf::zeros(DType::F32, m * n);
    let g = Gemm::new(m, n, k, false, trans_b);
    for _ in 0..2 {
        be.matmul(out.vm(), a.v(), b.v(), &g).expect("matmul");
    }
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            be.matmul(out.vm(), a.v(), b.v(), &g).expect("matmul");
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let flops = 2.0 * (m * n * k) as f64;
    println!(
        "{name:<40} best {:7.2} ms  {:6.1} GFLOP/s   median {:7.2} ms  {:6.1} GFLOP/s",
        times[0] * 1e3,
        flops / times[0] / 1e9,
        times[reps / 2] * 1e3,
        flops / times[reps / 2] / 1e9
    );
}

fn main() {
    println!("rayon threads: {}", rayon::current_num_threads());
    bench("128x768 . 768x3072 (fc1, b row-major)", 128, 3072, 768, false, DType::F32, 60);
    bench("128x768 . (3072x768)^T (fc1, trans_b)", 128, 3072, 768, true, DType::F32, 60);
    bench("128x3072 . (768x3072)^T (fc2, trans_b)", 128, 768, 3072, true, DType::F32, 60);
    bench("128x768 . (768x768)^T (attn proj)", 128, 768, 768, true, DType::F32, 60);
    bench("128x768 . (50272x768)^T (lm_head)", 128, 50272, 768, true, DType::F32, 20);
    bench("128x768 . (50272x768)^T bf16 weights", 128, 50272, 768, true, DType::BF16, 20);
    bench("1x768 . (50272x768)^T (decode lm_head)", 1, 50272, 768, true, DType::F32, 20);
}
