//! The CPU backend: the reference implementation of every kernel.
//!
//! Layout of this module:
//! - this file: [`CpuBuf`] (a host buffer of one dtype) with its helper API, view checking and
//!   dtype widening, and the [`Backend`] impl that validates shapes and dispatches;
//! - `memory` (fill/copy/convert), `matmul` (the `gemm` crate), `elementwise` (bias, add, scale,
//!   activations, dropout, squared norm), `embedding`, `norm` (LayerNorm), `attention`, `loss`
//!   (cross-entropy, log-softmax), `optim` (AdamW);
//! - `math` (accurate `erf`, a vectorisable `exp`, fixed-order dot products), `par`
//!   (parallelism thresholds and the fixed chunking that keeps reductions deterministic) and
//!   `simd` (run-time AVX2 dispatch of the hot row kernels, bit-identical to the baseline).
//!
//! Kernels work on plain slices; this file turns views into slices. Low-precision inputs
//! (bf16/f16 weights) are widened to f32 into reusable thread-local scratch buffers (a large
//! matmul widens its weight one column block at a time, inside the parallel product), so all
//! arithmetic is f32 (or f64 where noted). The scratch pool keeps up to four buffers per
//! thread, sized by the largest widened operand seen.
//!
//! Determinism: every reduction uses chunks whose size is a constant (never derived from the
//! thread count) and combines the per-chunk results sequentially in chunk order, so results are
//! bit-identical whatever rayon's pool size or scheduling.

mod attention;
mod elementwise;
mod embedding;
mod gemm_nt;
mod gemv;
mod loss;
mod math;
mod matmul;
mod memory;
mod norm;
mod optim;
mod par;
mod quant;
mod simd;

#[cfg(test)]
mod testutil;

use std::borrow::Cow;
use std::cell::RefCell;

use half::{bf16, f16};

use crate::backend::{Activation, AdamW, AttnDims, Backend, Buffer, Dropout, Gemm, View, ViewMut};
use crate::{DType, Int8Matrix, Result, TensorError};

/// A host buffer of one dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum CpuBuf {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Buffer for CpuBuf {
    fn len(&self) -> usize {
        match self {
            CpuBuf::F32(v) => v.len(),
            CpuBuf::BF16(v) => v.len(),
            CpuBuf::F16(v) => v.len(),
        }
    }
    fn dtype(&self) -> DType {
        match self {
            CpuBuf::F32(_) => DType::F32,
            CpuBuf::BF16(_) => DType::BF16,
            CpuBuf::F16(_) => DType::F16,
        }
    }
}

impl CpuBuf {
    /// A zero-filled buffer of `len` elements.
    pub fn zeros(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => CpuBuf::F32(vec![0.0; len]),
            DType::BF16 => CpuBuf::BF16(vec![bf16::ZERO; len]),
            DType::F16 => CpuBuf::F16(vec![f16::ZERO; len]),
        }
    }

    /// Wrap an f32 vector (no copy).
    pub fn from_f32_vec(data: Vec<f32>) -> Self {
        CpuBuf::F32(data)
    }

    /// Convert f32 data to `dtype` (round-to-nearest-even for bf16/f16).
    pub fn from_f32_slice(data: &[f32], dtype: DType) -> Self {
        let mut buf = CpuBuf::zeros(dtype, data.len());
        memory::convert_into(&mut buf, 0, data);
        buf
    }

    /// Build a buffer from little-endian raw bytes (e.g. a safetensors payload). The byte slice
    /// need not be aligned. Errors when its length is not a multiple of the element size.
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> Result<Self> {
        let size = dtype.size_in_bytes();
        if !bytes.len().is_multiple_of(size) {
            return Err(TensorError::Shape {
                op: "from_le_bytes",
                detail: format!("{} bytes is not a whole number of {dtype} elements", bytes.len()),
            });
        }
        // x86/ARM hosts are little-endian, so the element encoding is the native one. Copy
        // through the (aligned) destination's bytes, since `bytes` may be unaligned.
        #[cfg(target_endian = "big")]
        compile_error!("opt-tensor's CPU backend assumes a little-endian host");
        let mut buf = CpuBuf::zeros(dtype, bytes.len() / size);
        let dst: &mut [u8] = match &mut buf {
            CpuBuf::F32(v) => bytemuck::cast_slice_mut(v),
            CpuBuf::BF16(v) => bytemuck::cast_slice_mut(v),
            CpuBuf::F16(v) => bytemuck::cast_slice_mut(v),
        };
        dst.copy_from_slice(bytes);
        Ok(buf)
    }

    /// The data as f32, when the buffer is f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            CpuBuf::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The data as mutable f32, when the buffer is f32.
    pub fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        match self {
            CpuBuf::F32(v) => Some(v),
            _ => None,
        }
    }

    /// A copy of the whole buffer widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        memory::widen(self, 0, self.len())
    }

    /// The raw bytes of the buffer (native = little-endian element encoding).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CpuBuf::F32(v) => bytemuck::cast_slice(v),
            CpuBuf::BF16(v) => bytemuck::cast_slice(v),
            CpuBuf::F16(v) => bytemuck::cast_slice(v),
        }
    }
}

// ---- views to slices -------------------------------------------------------------------------

/// Check that a view lies inside its buffer (views have public fields, so they can be built
/// by hand past the end).
fn check_bounds(op: &'static str, buf_len: usize, off: usize, len: usize) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= buf_len => Ok(()),
        _ => Err(TensorError::Shape {
            op,
            detail: format!("view [{off}, {off}+{len}) exceeds buffer of {buf_len} elements"),
        }),
    }
}

/// The mutable f32 slice of a view; `DType` error for other dtypes (outputs must be f32).
pub(crate) fn f32_mut<'a>(op: &'static str, v: ViewMut<'a, CpuBuf>) -> Result<&'a mut [f32]> {
    check_bounds(op, v.buf.len(), v.off, v.len)?;
    let dtype = v.buf.dtype();
    match v.buf {
        CpuBuf::F32(data) => Ok(&mut data[v.off..v.off + v.len]),
        _ => Err(TensorError::DType { op, dtype }),
    }
}

/// A view as f32: borrowed when it already is f32, otherwise a widened copy.
pub(crate) fn f32_cow<'a>(op: &'static str, v: View<'a, CpuBuf>) -> Result<Cow<'a, [f32]>> {
    check_bounds(op, v.buf.len(), v.off, v.len)?;
    Ok(match v.buf {
        CpuBuf::F32(data) => Cow::Borrowed(&data[v.off..v.off + v.len]),
        other => Cow::Owned(memory::widen(other, v.off, v.len)),
    })
}

thread_local! {
    /// Reusable widening buffers, so converting a large bf16 weight for every matmul does not
    /// allocate (and page-fault) a fresh buffer each call. Vectors are taken out of the pool
    /// while in use, so nested/re-entrant use (rayon work stealing) is safe.
    static SCRATCH: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Most buffers kept per thread; more are simply dropped.
const SCRATCH_POOL: usize = 4;

/// Run `f` with a vector from this thread's scratch pool (contents unspecified; it is
/// returned to the pool afterwards).
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    let mut scratch = SCRATCH.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    let r = f(&mut scratch);
    SCRATCH.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < SCRATCH_POOL {
            pool.push(scratch);
        }
    });
    r
}

/// Run `f` on the view as f32: borrowed when f32, otherwise widened into pooled scratch.
pub(crate) fn with_f32<R>(op: &'static str, v: View<'_, CpuBuf>, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    check_bounds(op, v.buf.len(), v.off, v.len)?;
    if let CpuBuf::F32(data) = v.buf {
        return Ok(f(&data[v.off..v.off + v.len]));
    }
    Ok(with_scratch(|scratch| {
        scratch.clear();
        scratch.resize(v.len, 0.0);
        memory::widen_into(v.buf, v.off, scratch);
        f(scratch)
    }))
}

fn shape_err(op: &'static str, detail: String) -> TensorError {
    TensorError::Shape { op, detail }
}

/// `len == want`, else a `Shape` error naming the operand.
pub(crate) fn expect_len(op: &'static str, what: &str, len: usize, want: usize) -> Result<()> {
    if len == want {
        Ok(())
    } else {
        Err(shape_err(op, format!("{what} has {len} elements, expected {want}")))
    }
}

/// `len` is a whole number of rows of `dim`; returns the row count.
pub(crate) fn rows_of(op: &'static str, what: &str, len: usize, dim: usize) -> Result<usize> {
    if dim == 0 {
        return if len == 0 { Ok(0) } else { Err(shape_err(op, format!("{what}: dim is 0"))) };
    }
    if !len.is_multiple_of(dim) {
        return Err(shape_err(op, format!("{what} has {len} elements, not a multiple of dim {dim}")));
    }
    Ok(len / dim)
}

/// `a * b` (and more), erroring instead of overflowing on absurd shapes.
pub(crate) fn checked_prod(op: &'static str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| shape_err(op, format!("shape {factors:?} overflows usize")))
}

/// The CPU backend. Kernels run on rayon's global pool (or the pool installed by the caller).
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

impl Backend for CpuBackend {
    type Buf = CpuBuf;

    fn name(&self) -> String {
        "cpu".to_string()
    }

    // ---- memory ---------------------------------------------------------------------------
    fn zeros(&self, dtype: DType, len: usize) -> Result<CpuBuf> {
        Ok(CpuBuf::zeros(dtype, len))
    }

    fn from_f32(&self, data: &[f32], dtype: DType) -> Result<CpuBuf> {
        Ok(CpuBuf::from_f32_slice(data, dtype))
    }

    fn to_f32(&self, src: View<'_, CpuBuf>) -> Result<Vec<f32>> {
        check_bounds("to_f32", src.buf.len(), src.off, src.len)?;
        Ok(memory::widen(src.buf, src.off, src.len))
    }

    fn fill(&self, out: ViewMut<'_, CpuBuf>, value: f32) -> Result<()> {
        check_bounds("fill", out.buf.len(), out.off, out.len)?;
        memory::fill(out.buf, out.off, out.len, value);
        Ok(())
    }

    fn copy(&self, out: ViewMut<'_, CpuBuf>, src: View<'_, CpuBuf>) -> Result<()> {
        const OP: &str = "copy";
        check_bounds(OP, out.buf.len(), out.off, out.len)?;
        check_bounds(OP, src.buf.len(), src.off, src.len)?;
        expect_len(OP, "src", src.len, out.len)?;
        memory::copy_rows(out.buf, out.off, 0, src.buf, src.off, 0, 1, out.len);
        Ok(())
    }

    fn copy_2d(
        &self,
        out: ViewMut<'_, CpuBuf>,
        out_stride: usize,
        src: View<'_, CpuBuf>,
        src_stride: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        const OP: &str = "copy_2d";
        check_bounds(OP, out.buf.len(), out.off, out.len)?;
        check_bounds(OP, src.buf.len(), src.off, src.len)?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let need = |stride: usize| {
            (rows - 1)
                .checked_mul(stride)
                .and_then(|x| x.checked_add(cols))
                .ok_or_else(|| shape_err(OP, "extent overflows usize".into()))
        };
        let (need_out, need_src) = (need(out_stride)?, need(src_stride)?);
        if out.len < need_out || src.len < need_src {
            return Err(shape_err(
                OP,
                format!(
                    "{rows}x{cols} with strides out {out_stride}/src {src_stride} needs out >= {need_out}, \
                     src >= {need_src}; got {} and {}",
                    out.len, src.len
                ),
            ));
        }
        if rows > 1 && out_stride < cols {
            return Err(shape_err(OP, format!("out rows overlap: stride {out_stride} < cols {cols}")));
        }
        memory::copy_rows(out.buf, out.off, out_stride, src.buf, src.off, src_stride, rows, cols);
        Ok(())
    }

    // ---- dense algebra --------------------------------------------------------------------------
    fn matmul(&self, out: ViewMut<'_, CpuBuf>, a: View<'_, CpuBuf>, b: View<'_, CpuBuf>, g: &Gemm) -> Result<()> {
        const OP: &str = "matmul";
        let out = f32_mut(OP, out)?;
        matmul::check(out.len(), a.len, b.len, g)?;
        check_bounds(OP, b.buf.len(), b.off, b.len)?;
        with_f32(OP, a, |a| {
            if g.trans_b && !g.trans_a && g.batch == 1 && g.m <= gemv::GEMV_MAX_M && g.k > 0 {
                // Decode-shaped product against a PyTorch-layout weight: stream the weight in
                // its storage dtype (see `gemv`).
                let nk = g.n * g.k;
                let w = match b.buf {
                    CpuBuf::F32(v) => gemv::WRows::F32(&v[b.off..b.off + nk]),
                    CpuBuf::BF16(v) => gemv::WRows::BF16(&v[b.off..b.off + nk]),
                    CpuBuf::F16(v) => gemv::WRows::F16(&v[b.off..b.off + nk]),
                };
                gemv::gemv_nt(out, a, w, g.m, g.n, g.k, g.alpha, g.beta);
                return Ok(());
            }
            if b.buf.dtype() != DType::F32 && matmul::widen_b_per_block(g) {
                matmul::matmul_wide_b(out, a, b.buf, b.off, g);
                Ok(())
            } else {
                with_f32(OP, b, |b| matmul::matmul(out, a, b, g))
            }
        })??;
        Ok(())
    }

    fn matmul_int8(&self, out: ViewMut<'_, CpuBuf>, x: View<'_, CpuBuf>, w: &Int8Matrix) -> Result<()> {
        const OP: &str = "matmul_int8";
        let out = f32_mut(OP, out)?;
        let m = rows_of(OP, "x", x.len, w.cols())?;
        expect_len(OP, "out", out.len(), checked_prod(OP, &[m, w.rows()])?)?;
        with_f32(OP, x, |x| quant::matmul_int8(out, x, w, m))
    }

    fn embedding_int8(
        &self,
        out: ViewMut<'_, CpuBuf>,
        table: &Int8Matrix,
        ids: &[u32],
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "embedding_int8";
        let out = f32_mut(OP, out)?;
        expect_len(OP, "out", out.len(), checked_prod(OP, &[ids.len(), table.cols()])?)?;
        embedding::check_ids(OP, ids, table.rows())?;
        quant::embedding_int8(out, table, ids, accumulate);
        Ok(())
    }

    fn bias_add(&self, out: ViewMut<'_, CpuBuf>, bias: View<'_, CpuBuf>, dim: usize) -> Result<()> {
        const OP: &str = "bias_add";
        let out = f32_mut(OP, out)?;
        rows_of(OP, "out", out.len(), dim)?;
        expect_len(OP, "bias", bias.len, dim)?;
        let bias = f32_cow(OP, bias)?;
        elementwise::bias_add(out, &bias);
        Ok(())
    }

    fn bias_backward(&self, dbias: ViewMut<'_, CpuBuf>, dout: View<'_, CpuBuf>, dim: usize) -> Result<()> {
        const OP: &str = "bias_backward";
        let dbias = f32_mut(OP, dbias)?;
        let dout = f32_cow(OP, dout)?;
        rows_of(OP, "dout", dout.len(), dim)?;
        expect_len(OP, "dbias", dbias.len(), dim)?;
        elementwise::bias_backward(dbias, &dout);
        Ok(())
    }

    fn add(&self, out: ViewMut<'_, CpuBuf>, a: View<'_, CpuBuf>, b: View<'_, CpuBuf>) -> Result<()> {
        const OP: &str = "add";
        let out = f32_mut(OP, out)?;
        expect_len(OP, "a", a.len, out.len())?;
        expect_len(OP, "b", b.len, out.len())?;
        let (a, b) = (f32_cow(OP, a)?, f32_cow(OP, b)?);
        elementwise::add(out, &a, &b);
        Ok(())
    }

    fn add_assign(&self, out: ViewMut<'_, CpuBuf>, a: View<'_, CpuBuf>) -> Result<()> {
        const OP: &str = "add_assign";
        let out = f32_mut(OP, out)?;
        expect_len(OP, "a", a.len, out.len())?;
        let a = f32_cow(OP, a)?;
        elementwise::add_assign(out, &a);
        Ok(())
    }

    fn scale(&self, out: ViewMut<'_, CpuBuf>, s: f32) -> Result<()> {
        elementwise::scale(f32_mut("scale", out)?, s);
        Ok(())
    }

    fn sum_squares(&self, x: View<'_, CpuBuf>) -> Result<f64> {
        Ok(elementwise::sum_squares(&f32_cow("sum_squares", x)?))
    }

    // ---- embeddings -------------------------------------------------------------------------------
    fn embedding_forward(
        &self,
        out: ViewMut<'_, CpuBuf>,
        table: View<'_, CpuBuf>,
        ids: &[u32],
        dim: usize,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "embedding_forward";
        let out = f32_mut(OP, out)?;
        expect_len(OP, "out", out.len(), checked_prod(OP, &[ids.len(), dim])?)?;
        check_bounds(OP, table.buf.len(), table.off, table.len)?;
        let vocab = rows_of(OP, "table", table.len, dim)?;
        embedding::check_ids(OP, ids, vocab)?;
        embedding::forward(out, table.buf, table.off, ids, dim, accumulate);
        Ok(())
    }

    fn embedding_backward(
        &self,
        dtable: ViewMut<'_, CpuBuf>,
        ids: &[u32],
        dout: View<'_, CpuBuf>,
        dim: usize,
    ) -> Result<()> {
        const OP: &str = "embedding_backward";
        let dtable = f32_mut(OP, dtable)?;
        let dout = f32_cow(OP, dout)?;
        expect_len(OP, "dout", dout.len(), checked_prod(OP, &[ids.len(), dim])?)?;
        let vocab = rows_of(OP, "dtable", dtable.len(), dim)?;
        embedding::check_ids(OP, ids, vocab)?;
        embedding::backward(dtable, ids, &dout, dim);
        Ok(())
    }

    // ---- normalisation ------------------------------------------------------------------------------
    fn layernorm_forward(
        &self,
        out: ViewMut<'_, CpuBuf>,
        mean: ViewMut<'_, CpuBuf>,
        rstd: ViewMut<'_, CpuBuf>,
        inp: View<'_, CpuBuf>,
        weight: Option<View<'_, CpuBuf>>,
        bias: Option<View<'_, CpuBuf>>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "layernorm_forward";
        let (out, mean, rstd) = (f32_mut(OP, out)?, f32_mut(OP, mean)?, f32_mut(OP, rstd)?);
        let inp = f32_cow(OP, inp)?;
        let rows = rows_of(OP, "inp", inp.len(), dim)?;
        expect_len(OP, "out", out.len(), inp.len())?;
        expect_len(OP, "mean", mean.len(), rows)?;
        expect_len(OP, "rstd", rstd.len(), rows)?;
        let weight = weight.map(|w| expect_len(OP, "weight", w.len, dim).and(f32_cow(OP, w))).transpose()?;
        let bias = bias.map(|b| expect_len(OP, "bias", b.len, dim).and(f32_cow(OP, b))).transpose()?;
        norm::forward(out, mean, rstd, &inp, weight.as_deref(), bias.as_deref(), dim, eps);
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dinp: ViewMut<'_, CpuBuf>,
        dweight: Option<ViewMut<'_, CpuBuf>>,
        dbias: Option<ViewMut<'_, CpuBuf>>,
        dout: View<'_, CpuBuf>,
        inp: View<'_, CpuBuf>,
        weight: Option<View<'_, CpuBuf>>,
        mean: View<'_, CpuBuf>,
        rstd: View<'_, CpuBuf>,
        dim: usize,
    ) -> Result<()> {
        const OP: &str = "layernorm_backward";
        let dinp = f32_mut(OP, dinp)?;
        let dweight = dweight.map(|v| f32_mut(OP, v)).transpose()?;
        let dbias = dbias.map(|v| f32_mut(OP, v)).transpose()?;
        let (dout, inp) = (f32_cow(OP, dout)?, f32_cow(OP, inp)?);
        let (mean, rstd) = (f32_cow(OP, mean)?, f32_cow(OP, rstd)?);
        let rows = rows_of(OP, "inp", inp.len(), dim)?;
        expect_len(OP, "dinp", dinp.len(), inp.len())?;
        expect_len(OP, "dout", dout.len(), inp.len())?;
        expect_len(OP, "mean", mean.len(), rows)?;
        expect_len(OP, "rstd", rstd.len(), rows)?;
        if let Some(dw) = &dweight {
            expect_len(OP, "dweight", dw.len(), dim)?;
        }
        if let Some(db) = &dbias {
            expect_len(OP, "dbias", db.len(), dim)?;
        }
        let weight = weight.map(|w| expect_len(OP, "weight", w.len, dim).and(f32_cow(OP, w))).transpose()?;
        norm::backward(dinp, dweight, dbias, &dout, &inp, weight.as_deref(), &mean, &rstd, dim);
        Ok(())
    }

    // ---- activations and dropout ------------------------------------------------------------------
    fn activation_forward(&self, act: Activation, out: ViewMut<'_, CpuBuf>, inp: View<'_, CpuBuf>) -> Result<()> {
        const OP: &str = "activation_forward";
        let out = f32_mut(OP, out)?;
        expect_len(OP, "inp", inp.len, out.len())?;
        let inp = f32_cow(OP, inp)?;
        elementwise::activation_forward(act, out, &inp);
        Ok(())
    }

    fn activation_backward(
        &self,
        act: Activation,
        dinp: ViewMut<'_, CpuBuf>,
        inp: View<'_, CpuBuf>,
        dout: View<'_, CpuBuf>,
    ) -> Result<()> {
        const OP: &str = "activation_backward";
        let dinp = f32_mut(OP, dinp)?;
        expect_len(OP, "inp", inp.len, dinp.len())?;
        expect_len(OP, "dout", dout.len, dinp.len())?;
        let (inp, dout) = (f32_cow(OP, inp)?, f32_cow(OP, dout)?);
        elementwise::activation_backward(act, dinp, &inp, &dout);
        Ok(())
    }

    fn dropout(&self, x: ViewMut<'_, CpuBuf>, d: &Dropout) -> Result<()> {
        const OP: &str = "dropout";
        let x = f32_mut(OP, x)?;
        if !(0.0..=1.0).contains(&d.p) {
            return Err(shape_err(OP, format!("dropout probability {} outside [0, 1]", d.p)));
        }
        elementwise::dropout(x, d);
        Ok(())
    }

    // ---- attention ------------------------------------------------------------------------------
    fn attention_forward(
        &self,
        out: ViewMut<'_, CpuBuf>,
        probs: Option<ViewMut<'_, CpuBuf>>,
        q: View<'_, CpuBuf>,
        k: View<'_, CpuBuf>,
        v: View<'_, CpuBuf>,
        key_mask: Option<&[u8]>,
        dims: &AttnDims,
        dropout: Option<&Dropout>,
    ) -> Result<()> {
        const OP: &str = "attention_forward";
        let out = f32_mut(OP, out)?;
        let probs = probs.map(|p| f32_mut(OP, p)).transpose()?;
        let (q, k, v) = (f32_cow(OP, q)?, f32_cow(OP, k)?, f32_cow(OP, v)?);
        let shape = attention::check(OP, dims, q.len(), k.len(), v.len(), key_mask, dropout)?;
        expect_len(OP, "out", out.len(), shape.q_len)?;
        if let Some(p) = &probs {
            expect_len(OP, "probs", p.len(), shape.probs_len)?;
        }
        attention::forward(out, probs, &q, &k, &v, key_mask, dims, dropout);
        Ok(())
    }

    fn attention_backward(
        &self,
        dq: ViewMut<'_, CpuBuf>,
        dk: ViewMut<'_, CpuBuf>,
        dv: ViewMut<'_, CpuBuf>,
        dout: View<'_, CpuBuf>,
        q: View<'_, CpuBuf>,
        k: View<'_, CpuBuf>,
        v: View<'_, CpuBuf>,
        probs: View<'_, CpuBuf>,
        dims: &AttnDims,
        dropout: Option<&Dropout>,
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        let (dq, dk, dv) = (f32_mut(OP, dq)?, f32_mut(OP, dk)?, f32_mut(OP, dv)?);
        let (q, k, v) = (f32_cow(OP, q)?, f32_cow(OP, k)?, f32_cow(OP, v)?);
        let (dout, probs) = (f32_cow(OP, dout)?, f32_cow(OP, probs)?);
        let shape = attention::check(OP, dims, q.len(), k.len(), v.len(), None, dropout)?;
        expect_len(OP, "dq", dq.len(), shape.q_len)?;
        expect_len(OP, "dout", dout.len(), shape.q_len)?;
        expect_len(OP, "dk", dk.len(), shape.kv_dense_len)?;
        expect_len(OP, "dv", dv.len(), shape.kv_dense_len)?;
        expect_len(OP, "probs", probs.len(), shape.probs_len)?;
        attention::backward(dq, dk, dv, &dout, &q, &k, &v, &probs, dims, dropout);
        Ok(())
    }

    // ---- output layer ---------------------------------------------------------------------------
    fn cross_entropy(
        &self,
        logits: ViewMut<'_, CpuBuf>,
        losses: ViewMut<'_, CpuBuf>,
        targets: &[i32],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        const OP: &str = "cross_entropy";
        let (logits, losses) = (f32_mut(OP, logits)?, f32_mut(OP, losses)?);
        let rows = rows_of(OP, "logits", logits.len(), vocab)?;
        expect_len(OP, "losses", losses.len(), rows)?;
        expect_len(OP, "targets", targets.len(), rows)?;
        if let Some(&t) = targets.iter().find(|&&t| t >= 0 && t as usize >= vocab) {
            return Err(shape_err(OP, format!("target {t} out of range for vocab {vocab}")));
        }
        loss::cross_entropy(logits, losses, targets, vocab, grad_scale);
        Ok(())
    }

    fn log_softmax(&self, out: ViewMut<'_, CpuBuf>, logits: View<'_, CpuBuf>, vocab: usize) -> Result<()> {
        const OP: &str = "log_softmax";
        let out = f32_mut(OP, out)?;
        let logits = f32_cow(OP, logits)?;
        rows_of(OP, "logits", logits.len(), vocab)?;
        expect_len(OP, "out", out.len(), logits.len())?;
        loss::log_softmax(out, &logits, vocab);
        Ok(())
    }

    // ---- optimizer ------------------------------------------------------------------------------
    fn adamw(
        &self,
        params: ViewMut<'_, CpuBuf>,
        grads: View<'_, CpuBuf>,
        m: ViewMut<'_, CpuBuf>,
        v: ViewMut<'_, CpuBuf>,
        hp: &AdamW,
    ) -> Result<()> {
        const OP: &str = "adamw";
        let (params, m, v) = (f32_mut(OP, params)?, f32_mut(OP, m)?, f32_mut(OP, v)?);
        let grads = f32_cow(OP, grads)?;
        expect_len(OP, "grads", grads.len(), params.len())?;
        expect_len(OP, "m", m.len(), params.len())?;
        expect_len(OP, "v", v.len(), params.len())?;
        if hp.step == 0 {
            return Err(shape_err(OP, "step is 1-based; got 0".into()));
        }
        optim::adamw(params, &grads, m, v, hp);
        Ok(())
    }
}
