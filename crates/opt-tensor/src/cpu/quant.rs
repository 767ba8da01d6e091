//! Int8 weight operands (see [`crate::quant`]): the linear `y = x · ŵᵀ` and the embedding
//! lookup.
//!
//! Decode-shaped products (`m <= GEMV_MAX_M` rows) stream the int8 codes through the gemv
//! kernel, dequantizing in registers: a quarter of the bytes of an f32 weight cross the memory
//! bus, which is what decode is bound by. Larger products (prefill, scoring) are compute-bound;
//! they dequantize the weight into f32 scratch — one column block at a time inside the parallel
//! product for wide weights, all at once for small ones — and use the same gemm as f32 weights.

use super::{gemv, matmul, with_scratch};
use crate::backend::Gemm;
use crate::Int8Matrix;

/// `out [m, w.rows()] = a [m, w.cols()] · ŵᵀ` (lengths checked by the caller).
pub(crate) fn matmul_int8(out: &mut [f32], a: &[f32], w: &Int8Matrix, m: usize) {
    let (n, k) = (w.rows(), w.cols());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    if m <= gemv::GEMV_MAX_M {
        return gemv::gemv_nt_i8(out, a, w, m);
    }
    let g = Gemm::new(m, n, k, false, true);
    if matmul::widen_b_per_block(&g) {
        matmul::col_blocked(out, a, &g, |j0, cols, scratch| {
            scratch.resize(cols * k, 0.0);
            w.dequantize_rows_into(j0, &mut scratch[..cols * k]);
        });
    } else {
        with_scratch(|scratch| {
            scratch.clear();
            scratch.resize(n * k, 0.0);
            w.dequantize_rows_into(0, scratch);
            matmul::matmul(out, a, scratch, &g);
        });
    }
}

/// `out[r, :] (+)= ŵ[ids[r], :]` (ids checked by the caller).
pub(crate) fn embedding_int8(out: &mut [f32], w: &Int8Matrix, ids: &[u32], accumulate: bool) {
    let dim = w.cols();
    if dim == 0 {
        return;
    }
    let mut row = vec![0f32; dim];
    for (o, &id) in out.chunks_exact_mut(dim).zip(ids) {
        if accumulate {
            w.dequantize_rows_into(id as usize, &mut row);
            o.iter_mut().zip(&row).for_each(|(o, x)| *o += x);
        } else {
            w.dequantize_rows_into(id as usize, o);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::{Backend, Buffer, Gemm};
    use crate::cpu::testutil::{assert_all_close, in_pools, randn};
    use crate::cpu::{CpuBackend, CpuBuf};
    use crate::{DType, Int8Matrix};

    fn weight(n: usize, k: usize, gs: usize, seed: u64) -> Int8Matrix {
        Int8Matrix::quantize(&randn(seed, n * k), n, k, gs).unwrap()
    }

    /// `x · ŵᵀ` through the f32 path of `matmul` on the dequantized weight.
    fn reference(x: &[f32], w: &Int8Matrix, m: usize) -> Vec<f32> {
        let be = CpuBackend::new();
        let (n, k) = (w.rows(), w.cols());
        let deq = CpuBuf::from_f32_vec(w.dequantize());
        let mut out = CpuBuf::zeros(DType::F32, m * n);
        let a = CpuBuf::from_f32_vec(x.to_vec());
        be.matmul(out.vm(), a.v(), deq.v(), &Gemm::new(m, n, k, false, true)).unwrap();
        out.to_f32_vec()
    }

    fn int8(x: &[f32], w: &Int8Matrix, m: usize) -> Vec<f32> {
        let be = CpuBackend::new();
        let mut out = CpuBuf::from_f32_vec(vec![f32::NAN; m * w.rows()]);
        let a = CpuBuf::from_f32_vec(x.to_vec());
        be.matmul_int8(out.vm(), a.v(), w).unwrap();
        out.to_f32_vec()
    }

    #[test]
    fn gemv_path_is_bit_identical_to_the_dequantized_matrix() {
        // m <= 64: the streaming kernel; per-channel and group-wise scales, k with a tail.
        for &(m, n, k) in &[(1, 96, 128), (3, 70, 200), (7, 33, 35), (64, 40, 256)] {
            for gs in [0, 16, 64, 128] {
                let w = weight(n, k, gs, 1);
                let x = randn(2, m * k);
                let got = int8(&x, &w, m);
                let want = reference(&x, &w, m);
                let (g, r): (Vec<u32>, Vec<u32>) =
                    got.iter().zip(&want).map(|(a, b)| (a.to_bits(), b.to_bits())).unzip();
                assert_eq!(g, r, "{m}x{n}x{k} gs {gs}");
            }
        }
    }

    #[test]
    fn gemm_path_matches_the_dequantized_matrix() {
        // m > 64: dequantize + gemm, whole-matrix (small n) and column-blocked (n >= 2048).
        for &(m, n, k) in &[(65, 96, 128), (100, 300, 72), (70, 2100, 64)] {
            for gs in [0, 32, 64] {
                let w = weight(n, k, gs, 3);
                let x = randn(4, m * k);
                assert_all_close(&int8(&x, &w, m), &reference(&x, &w, m), 1e-5);
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch_or_the_pool() {
        let w = weight(100, 160, 32, 5);
        let x = randn(6, 9 * 160);
        let all = int8(&x, &w, 9);
        for i in 0..9 {
            assert_eq!(int8(&x[i * 160..(i + 1) * 160], &w, 1), all[i * 100..(i + 1) * 100].to_vec(), "row {i}");
        }
        let runs = in_pools(|| int8(&x, &w, 9));
        assert!(runs.iter().all(|r| *r == all));
    }

    #[test]
    fn embedding_lookup_dequantizes_rows() {
        let be = CpuBackend::new();
        let w = weight(10, 48, 16, 7);
        let deq = w.dequantize();
        let ids = [3u32, 0, 9, 3];
        let mut out = CpuBuf::from_f32_vec(vec![1.0; 4 * 48]);
        be.embedding_int8(out.vm(), &w, &ids, true).unwrap();
        let got = out.to_f32_vec();
        for (r, &id) in ids.iter().enumerate() {
            for c in 0..48 {
                assert_eq!(got[r * 48 + c], 1.0 + deq[id as usize * 48 + c]);
            }
        }
        let err = be.embedding_int8(out.at_mut(0, 48), &w, &[10], false).unwrap_err().to_string();
        assert!(err.contains("id 10 out of range"), "{err}");
    }

    #[test]
    fn shape_errors_are_reported() {
        let be = CpuBackend::new();
        let w = weight(8, 32, 0, 9);
        let a = CpuBuf::from_f32_vec(vec![0.0; 2 * 31]);
        let mut out = CpuBuf::zeros(DType::F32, 16);
        let err = be.matmul_int8(out.vm(), a.v(), &w).unwrap_err().to_string();
        assert!(err.contains("not a multiple"), "{err}");
        let a = CpuBuf::from_f32_vec(vec![0.0; 2 * 32]);
        let mut out = CpuBuf::zeros(DType::F32, 15);
        let err = be.matmul_int8(out.vm(), a.v(), &w).unwrap_err().to_string();
        assert!(err.contains("out has 15"), "{err}");
        let mut bf = CpuBuf::zeros(DType::BF16, 16);
        assert!(be.matmul_int8(bf.vm(), a.v(), &w).is_err());
    }
}
