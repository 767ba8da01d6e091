//! Matrix products through cuBLAS, in the row-major convention of opt-tensor's `Gemm`.
//!
//! cuBLAS is column-major. A row-major matrix with row stride `ld` is, read column-major, its
//! transpose with the same `ld`; so the row-major product `C = op(A) · op(B)` (m×n) is the
//! column-major product `Cᵀ = op(B)ᵀ · op(A)ᵀ` (n×m): swap the operands and the sizes, keep the
//! transpose flags and leading dimensions.
//!
//! Inputs are f32 (strict f32 arithmetic, no TF32, so f32 models match the CPU to ~1e-6) or
//! bf16/f16 (tensor cores, f32 accumulate and f32 output, like torch's autocast).

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasGemmStridedBatchedEx, cublasOperation_t, cudaDataType,
};
use cudarc::cublas::CudaBlas;
use opt_tensor::DType;

use crate::error::{CudaError, Result};

/// One strided-batched product on raw device addresses, row-major: for each `i < batch`,
/// `c[i] = alpha · op(a[i]) · op(b[i]) + beta · c[i]`, `op(a)` m×k, `op(b)` k×n, `c` m×n with
/// row strides `lda`, `ldb`, `ldc` and batch strides `stride_*` (elements).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawGemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub a: u64,
    pub lda: usize,
    pub stride_a: usize,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: usize,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    pub alpha: f32,
    pub beta: f32,
    /// The dtype of `a` and `b` (equal); `c` is always f32.
    pub ab: DType,
}

fn int(op: &'static str, what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| CudaError::Limit { op, detail: format!("{what} = {x} exceeds cuBLAS's 32-bit range") })
}

fn long(op: &'static str, what: &str, x: usize) -> Result<i64> {
    i64::try_from(x).map_err(|_| CudaError::Limit { op, detail: format!("{what} = {x} exceeds i64") })
}

fn data_type(d: DType) -> cudaDataType {
    match d {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        DType::F16 => cudaDataType::CUDA_R_16F,
    }
}

/// Run `g` on `blas`'s stream. Callers have checked every operand's extent.
pub(crate) fn gemm(blas: &CudaBlas, g: &RawGemm) -> Result<()> {
    const OP: &str = "matmul";
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let (m, n, k) = (int(OP, "m", g.m)?, int(OP, "n", g.n)?, int(OP, "k", g.k)?);
    // A leading dimension must be at least 1 even for empty operands.
    let (lda, ldb, ldc) = (int(OP, "lda", g.lda.max(1))?, int(OP, "ldb", g.ldb.max(1))?, int(OP, "ldc", g.ldc.max(1))?);
    let (sa, sb, sc) =
        (long(OP, "stride_a", g.stride_a)?, long(OP, "stride_b", g.stride_b)?, long(OP, "stride_c", g.stride_c)?);
    let batch = int(OP, "batch", g.batch)?;
    let t = data_type(g.ab);
    // SAFETY: the handle is live and bound to our stream; the addresses were bounds-checked by
    // the caller for these sizes, strides and leading dimensions; alpha/beta are host f32
    // (the default pointer mode) matching the f32 compute type.
    let status = unsafe {
        cublasGemmStridedBatchedEx(
            *blas.handle(),
            op(g.trans_b),
            op(g.trans_a),
            n,
            m,
            k,
            (&g.alpha as *const f32).cast(),
            g.b as *const std::ffi::c_void,
            t,
            ldb,
            sb,
            g.a as *const std::ffi::c_void,
            t,
            lda,
            sa,
            (&g.beta as *const f32).cast(),
            g.c as *mut std::ffi::c_void,
            cudaDataType::CUDA_R_32F,
            ldc,
            sc,
            batch,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    status.result().map_err(|e| CudaError::Blas { op: OP, msg: format!("{e:?} for {g:?}") })
}
