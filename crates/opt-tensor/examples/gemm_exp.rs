//! Temporary experiment: whole-problem gemm vs column-blocked gemm.
use rayon::prelude::*;
use std::time::Instant;

#[derive(Clone, Copy)]
struct P(*mut f32);
unsafe impl Send for P {}
unsafe impl Sync for P {}

fn run(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], out: &mut [f32], nb: usize) {
    // out = a (m×k) · bᵀ, b stored n×k.
    if nb == 0 {
        unsafe {
            gemm::gemm(m, n, k, out.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize, b.as_ptr(), k as isize, 1, 0.0, 1.0, false, false, false, gemm::Parallelism::Rayon(0));
        }
        return;
    }
    let p = P(out.as_mut_ptr());
    let nblk = n.div_ceil(nb);
    (0..nblk).into_par_iter().for_each(|bi| {
        let p = p;
        let j0 = bi * nb;
        let w = nb.min(n - j0);
        unsafe {
            gemm::gemm(m, w, k, p.0.add(j0), 1, n as isize, false, a.as_ptr(), 1, k as isize, b.as_ptr().add(j0 * k), k as isize, 1, 0.0, 1.0, false, false, false, gemm::Parallelism::None);
        }
    });
}

fn main() {
    for &(m, n, k) in &[(128usize, 50272usize, 768usize), (128, 3072, 768), (128, 768, 3072), (512, 50272, 768)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut out = vec![0.0f32; m * n];
        for nb in [0usize, 256, 512, 1024, 2048, 4096] {
            if nb > n { continue; }
            run(m, n, k, &a, &b, &mut out, nb);
            let reps = if n > 10000 { 6 } else { 30 };
            let mut ts: Vec<f64> = (0..reps).map(|_| { let t = Instant::now(); run(m, n, k, &a, &b, &mut out, nb); t.elapsed().as_secs_f64() }).collect();
            ts.sort_by(f64::total_cmp);
            let fl = 2.0 * (m * n * k) as f64;
            println!("{m}x{n}x{k} nb={nb:5}: best {:6.1} GFLOP/s median {:6.1}", fl / ts[0] / 1e9, fl / ts[reps / 2] / 1e9);
        }
    }
}
