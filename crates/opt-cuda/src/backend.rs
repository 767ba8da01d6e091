//! [`CudaBackend`]: opt-tensor's [`Backend`] on one NVIDIA GPU.
//!
//! Every kernel is queued on one stream, so operations run in call order and no call waits for
//! the GPU except those that return host data (`to_f32`, `sum_squares`). Temporaries (widened
//! inputs, uploaded ids and masks, partial sums) come from the driver's stream-ordered memory
//! pool and are released in stream order when they go out of scope.
//!
//! Low-precision inputs: matrix products take bf16/f16 operands natively (an f32 operand
//! paired with a bf16 one is rounded to bf16, as torch's autocast does); LayerNorm and bias
//! kernels read bf16/f16 parameters as they are; other kernels read f32 (a bf16/f16 input view
//! is widened into a temporary first). Outputs are f32, as the trait requires.
//!
//! Mixed precision (`set_mixed_precision(Some(BF16))`, set by a model with bf16 weights): f32 ×
//! f32 products (weight gradients) and attention's two products run on tensor cores with bf16
//! operands and f32 accumulation, as under autocast. An f32 model stays exact f32 (no TF32).
//!
//! Decoding steps (a few rows): `linear`, `linear3`, `linear_act` and `linear_residual` run one
//! fused kernel that streams the bf16 weights once (decode.cu), attention for one query per
//! row runs its own kernel, and greedy decoding takes the argmax on the device.
//!
//! `OPT_RS_CUDA_PROFILE=1`: every operation waits for the GPU and is timed; the table (per
//! operation and GEMM shape) is printed to stderr when the backend is dropped.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    sys as drv_sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use half::{bf16, f16};
use opt_tensor::{
    Activation, AdamW, AttnDims, Backend, Buffer, DType, Dropout, Gemm, Result, TensorError, View, ViewMut,
};

use crate::blas::{self, RawGemm};
use crate::check::{self, bounds, expect_len, prod, rows_of, shape_err};
use crate::compile::{self, KERNEL_FILES};
use crate::error::{drv, CudaError};

/// Launch a kernel of `$be` by name with a config and arguments. Arguments must be local
/// variables (identifiers) whose Rust types match the kernel's C parameters exactly
/// (u64 for pointers and u64, u32, i32 for int, f32 for float): the launch keeps pointers to them.
macro_rules! launch {
    ($be:expr, $name:literal, $cfg:expr $(, $arg:ident)* $(,)?) => {{
        let f = $be.func($name)?;
        let mut lb = $be.stream.launch_builder(f);
        $( lb.arg(&$arg); )*
        // SAFETY: argument count and types match the kernel's signature in kernels/*.cu, and
        // every address was derived from a bounds-checked view of a live buffer.
        unsafe { lb.launch($cfg) }
            .map(|_| ())
            .map_err(|e| TensorError::from(CudaError::Driver { op: $name, msg: format!("{e:?}") }))
    }};
}

/// A device buffer of one dtype. Dropping it returns the memory to the stream's pool.
pub struct CudaBuf {
    data: CudaSlice<u8>,
    /// The device address of element 0 (cached: it never changes).
    ptr: u64,
    len: usize,
    dtype: DType,
}

impl Buffer for CudaBuf {
    fn len(&self) -> usize {
        self.len
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

impl CudaBuf {
    /// The device address of element `off`.
    fn addr(&self, off: usize) -> u64 {
        self.ptr + (off * self.dtype.size_in_bytes()) as u64
    }
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf({} x {}, {} bytes)", self.len, self.dtype, self.data.len())
    }
}

/// Start-up options.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Where compiled kernels are cached (`None`: compile at every start).
    pub kernel_cache: Option<PathBuf>,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions { kernel_cache: compile::default_cache_dir() }
    }
}

/// What the backend runs on, for logs and benchmark records.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// `sm_90` on an H100.
    pub arch: String,
    pub multiprocessors: u32,
    pub total_memory_bytes: usize,
}

/// The CUDA backend: a context, one stream, a cuBLAS handle and the loaded kernels.
pub struct CudaBackend {
    info: DeviceInfo,
    /// Per-operation timings when `OPT_RS_CUDA_PROFILE` is set: every operation then waits for
    /// the GPU, and the table is printed to stderr when the backend is dropped.
    prof: Option<Mutex<Vec<(String, u64, f64)>>>,
    /// The last attention key mask uploaded (host copy, device copy): a forward pass hands every
    /// layer the same mask, so it crosses the bus once.
    mask_cache: Mutex<Option<(Vec<u8>, CudaSlice<u8>)>>,
    /// `set_mixed_precision(Some(BF16))`: attention's two products run on tensor cores in bf16.
    mixed_bf16: AtomicBool,
    // Field order is drop order: kernels and the cuBLAS handle go before the stream and context.
    kernels: Vec<(&'static str, CudaFunction)>,
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

fn missing(lib: &'static str, hint: &'static str, names: &str) -> CudaError {
    CudaError::MissingLibrary { lib, hint, names: names.to_string() }
}

/// The number of CUDA devices, or why there are none to use.
pub fn device_count() -> std::result::Result<usize, CudaError> {
    // SAFETY: only tries to dlopen the candidate names.
    if !unsafe { drv_sys::is_culib_present() } {
        return Err(missing("driver (libcuda.so)", "no NVIDIA driver on this machine", "libcuda.so, libcuda.so.1"));
    }
    cudarc::driver::result::init().map_err(drv("cuInit"))?;
    let n = CudaContext::device_count().map_err(drv("cuDeviceGetCount"))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

const THREADS: u32 = 256;

impl CudaBackend {
    /// Open GPU `ordinal` with default options. Errors (never panics) when there is no driver,
    /// no such device, or a library is missing.
    pub fn new(ordinal: usize) -> std::result::Result<Self, CudaError> {
        Self::with_options(ordinal, &CudaOptions::default())
    }

    /// Open GPU `ordinal`: create the context and stream, open cuBLAS, compile (or load from the
    /// cache) and load every kernel for the device's architecture.
    pub fn with_options(ordinal: usize, opts: &CudaOptions) -> std::result::Result<Self, CudaError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count: count as i32 });
        }
        // SAFETY: only tries to dlopen the candidate names.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(missing(
                "cuBLAS",
                "add the CUDA 13 libraries' folder (e.g. /usr/local/cuda-13/targets/x86_64-linux/lib) to LD_LIBRARY_PATH",
                "libcublas.so, libcublas.so.13",
            ));
        }
        compile::ensure_nvrtc()?;
        let ctx = CudaContext::new(ordinal).map_err(drv("cuCtxCreate"))?;
        // SAFETY: every operation of this backend runs on the one stream below, so cudarc's
        // cross-stream event bookkeeping is unnecessary (it costs two driver calls per buffer use).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas { op: "cublasCreate", msg: format!("{e:?}") })?;
        let (major, minor) = ctx.compute_capability().map_err(drv("compute capability"))?;
        let arch = compile::arch_name(major, minor);
        let attr = |a| ctx.attribute(a).map_err(drv("cuDeviceGetAttribute"));
        let sms = attr(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let name = ctx.name().map_err(drv("cuDeviceGetName"))?;
        let total = ctx.total_mem().map_err(drv("cuDeviceTotalMem"))?;
        let mut kernels = Vec::new();
        for file in KERNEL_FILES {
            let cubin = compile::cubin_cached(file, &arch, opts.kernel_cache.as_deref())?;
            let module = ctx.load_module(Ptx::from_binary(cubin)).map_err(drv("cuModuleLoadData"))?;
            for &f in file.functions {
                kernels.push((f, module.load_function(f).map_err(drv("cuModuleGetFunction"))?));
            }
        }
        let info = DeviceInfo {
            ordinal,
            name,
            arch,
            multiprocessors: u32::try_from(sms).unwrap_or(1).max(1),
            total_memory_bytes: total,
        };
        let prof = std::env::var_os("OPT_RS_CUDA_PROFILE").filter(|v| !v.is_empty() && v != "0");
        Ok(CudaBackend {
            info,
            prof: prof.map(|_| Mutex::new(Vec::new())),
            mask_cache: Mutex::new(None),
            mixed_bf16: AtomicBool::new(false),
            kernels,
            blas,
            stream,
            ctx,
        })
    }

    /// The device this backend runs on.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Wait until every queued operation has finished (for timing; the trait's methods that
    /// return host data wait by themselves).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv("cuStreamSynchronize"))?;
        Ok(())
    }

    /// The underlying stream (for CUDA-graph capture of a decode step, events, ...).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn func(&self, name: &'static str) -> Result<&CudaFunction> {
        self.kernels
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f)
            .ok_or_else(|| TensorError::Device(format!("kernel {name} is not loaded")))
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))?;
        Ok(())
    }

    /// A timing guard for one operation (a no-op unless profiling, see `prof`).
    fn prof(&self, op: &'static str) -> ProfGuard<'_> {
        self.prof_with(|| op.to_string())
    }

    fn prof_with(&self, key: impl FnOnce() -> String) -> ProfGuard<'_> {
        let start = self.prof.as_ref().map(|_| {
            let _ = self.stream.synchronize();
            (key(), Instant::now())
        });
        ProfGuard { be: self, start }
    }

    /// The device copy of an attention key mask (`None` for an all-ones mask, which the kernels
    /// treat as no mask), uploaded only when it differs from the last one.
    fn key_mask_device(&self, mask: Option<&[u8]>) -> Result<u64> {
        let Some(m) = mask.filter(|m| m.contains(&0)) else {
            return Ok(0);
        };
        let mut cache = self.mask_cache.lock().map_err(|_| TensorError::Device("mask cache poisoned".into()))?;
        if let Some((host, dev)) = cache.as_ref() {
            if host.as_slice() == m {
                return Ok(dev.device_ptr(&self.stream).0);
            }
        }
        let (dev, ptr) = self.upload(m)?;
        *cache = Some((m.to_vec(), dev));
        Ok(ptr)
    }

    /// Whether attention's products may run in bf16 (see `set_mixed_precision`).
    fn mixed(&self) -> bool {
        self.mixed_bf16.load(Ordering::Relaxed)
    }

    /// An uninitialised device buffer (for temporaries that are fully written before use).
    fn alloc(&self, dtype: DType, len: usize) -> Result<CudaBuf> {
        let bytes = len
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| shape_err("alloc", format!("{len} elements overflow")))?;
        // cuMemAlloc rejects 0 bytes; empty buffers get a few bytes nobody reads.
        // SAFETY: callers write every element before reading it.
        let data = unsafe { self.stream.alloc::<u8>(bytes.max(16)) }.map_err(drv("cuMemAlloc"))?;
        Ok(self.wrap(data, len, dtype))
    }

    fn wrap(&self, data: CudaSlice<u8>, len: usize, dtype: DType) -> CudaBuf {
        let ptr = {
            let (ptr, _sync) = data.device_ptr(&self.stream);
            ptr
        };
        CudaBuf { ptr, data, len, dtype }
    }

    fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<(CudaSlice<T>, u64)> {
        if host.is_empty() {
            // SAFETY: never read (the kernels are not launched for empty inputs).
            let s = unsafe { self.stream.alloc::<T>(1) }.map_err(drv("cuMemAlloc"))?;
            let p = s.device_ptr(&self.stream).0;
            return Ok((s, p));
        }
        let s = self.stream.clone_htod(host).map_err(drv("cuMemcpyHtoD"))?;
        let p = s.device_ptr(&self.stream).0;
        Ok((s, p))
    }

    /// A grid for a grid-stride loop over `n` elements: enough blocks to fill the chip, and no
    /// more than the work needs.
    fn grid_1d(&self, n: usize) -> LaunchConfig {
        let want = n.div_ceil(THREADS as usize).max(1);
        let cap = (self.info.multiprocessors as usize) * 16;
        LaunchConfig { grid_dim: (want.min(cap) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// The f32 device address of an output view (outputs must be f32).
    fn out_f32(&self, op: &'static str, v: &ViewMut<'_, CudaBuf>) -> Result<u64> {
        bounds(op, v.buf.len, v.off, v.len)?;
        if v.buf.dtype != DType::F32 {
            return Err(TensorError::DType { op, dtype: v.buf.dtype });
        }
        Ok(v.buf.addr(v.off))
    }

    /// The f32 device address of an input view: the view itself when f32, otherwise a widened
    /// temporary (kept alive by the returned guard).
    fn in_f32(&self, op: &'static str, v: View<'_, CudaBuf>) -> Result<F32In> {
        bounds(op, v.buf.len, v.off, v.len)?;
        if v.buf.dtype == DType::F32 {
            return Ok(F32In { ptr: v.buf.addr(v.off), _tmp: None });
        }
        let mut tmp = self.alloc(DType::F32, v.len)?;
        self.copy_rows(&mut tmp, 0, 0, v.buf, v.off, 0, 1, v.len)?;
        Ok(F32In { ptr: tmp.ptr, _tmp: Some(tmp) })
    }

    /// A copy of `src[off .. off + len]` converted to `dtype` (for matmul operands).
    fn converted(&self, src: &CudaBuf, off: usize, len: usize, dtype: DType) -> Result<CudaBuf> {
        let mut tmp = self.alloc(dtype, len)?;
        self.copy_rows(&mut tmp, 0, 0, src, off, 0, 1, len)?;
        Ok(tmp)
    }

    /// `rows` rows of `cols` elements, converting dtypes; bounds checked by the caller.
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &self,
        out: &mut CudaBuf,
        out_off: usize,
        out_stride: usize,
        src: &CudaBuf,
        src_off: usize,
        src_stride: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(THREADS as usize).min(1024) as u32, rows.min(65_535) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (o, odt, ost) = (out.addr(out_off), dtype_code(out.dtype), out_stride as u64);
        let (s, sdt, sst) = (src.addr(src_off), dtype_code(src.dtype), src_stride as u64);
        let (rows, cols) = (rows as u64, cols as u64);
        launch!(self, "copy2d", cfg, o, odt, ost, s, sdt, sst, rows, cols)
    }

    /// Column sums of `x [rows, dim]` (optionally times xhat, see reduce.cu) added into
    /// `out[dim]`, deterministically in two stages.
    #[allow(clippy::too_many_arguments)]
    fn colsum_into(&self, out: u64, x: u64, xin: u64, mean: u64, rstd: u64, rows: usize, dim: usize) -> Result<()> {
        const CHUNK_ROWS: usize = 256;
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let chunks = rows.div_ceil(CHUNK_ROWS);
        if chunks > 65_535 {
            return Err(CudaError::Limit { op: "colsum", detail: format!("{rows} rows exceed the grid limit") }.into());
        }
        let part = self.alloc(DType::F32, chunks * dim)?;
        let p = part.ptr;
        let (rows64, dim32, chunk32) = (rows as u64, u32c("colsum", dim)?, CHUNK_ROWS as u32);
        let cfg = LaunchConfig {
            grid_dim: (dim.div_ceil(32) as u32, chunks as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "colsum_partials", cfg, x, xin, mean, rstd, rows64, dim32, chunk32, p)?;
        let chunks32 = chunks as u32;
        let cfg =
            LaunchConfig { grid_dim: (dim.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "colsum_finish", cfg, p, chunks32, dim32, out)
    }
}

/// Attention's mixed-precision path runs for at least this many queries (prefill, training);
/// decoding steps keep the single-launch kernels.
const MIXED_MIN_TQ: usize = 16;

/// The decoding attention kernel keeps a row's `tk` weights in shared memory (48 KB by default).
const DECODE_MAX_TK: usize = 8192;

/// `linear` runs the fused small-row kernel up to this many rows (decoding batches).
const LINEAR_SMALL_MAX_ROWS: usize = 8;

/// f32 device addresses of the attention backward's inputs.
struct MixedBwdIn {
    q: u64,
    k: u64,
    v: u64,
    dout: u64,
    probs: u64,
}

impl CudaBackend {
    /// A bf16 copy of `len` f32 elements at device address `src`.
    fn bf16_copy(&self, src: u64, len: usize) -> Result<CudaBuf> {
        let tmp = self.alloc(DType::BF16, len)?;
        if len == 0 {
            return Ok(tmp);
        }
        let cfg = LaunchConfig {
            grid_dim: (len.div_ceil(THREADS as usize).min(1024) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (o, odt, ost) = (tmp.addr(0), dtype_code(DType::BF16), 0u64);
        let (sdt, sst, rows, cols) = (dtype_code(DType::F32), 0u64, 1u64, len as u64);
        launch!(self, "copy2d", cfg, o, odt, ost, src, sdt, sst, rows, cols)?;
        Ok(tmp)
    }

    /// One strided-batched bf16 product over the heads of one batch element (f32 out).
    #[allow(clippy::too_many_arguments)]
    fn heads_gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        (trans_a, trans_b): (bool, bool),
        (a, lda, stride_a): (u64, usize, usize),
        (b, ldb, stride_b): (u64, usize, usize),
        (c, ldc, stride_c): (u64, usize, usize),
        batch: usize,
        alpha: f32,
    ) -> Result<()> {
        let g = RawGemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            a,
            lda,
            stride_a,
            b,
            ldb,
            stride_b,
            c,
            ldc,
            stride_c,
            batch,
            alpha,
            beta: 0.0,
            ab: DType::BF16,
        };
        blas::gemm(&self.blas, &g)?;
        Ok(())
    }

    /// Forward attention with bf16 products (see attention.cu, "mixed precision"): per batch
    /// element, S = scale·QKᵀ (f32, into the saved probabilities when requested), the masked
    /// softmax, and O = P'V.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward_mixed(
        &self,
        out: u64,
        probs: Option<u64>,
        q: &F32In,
        k: &F32In,
        v: &F32In,
        mask: u64,
        dims: &AttnDims,
        dropout: Option<&Dropout>,
    ) -> Result<()> {
        const OP: &str = "attention_forward";
        let (bsz, tq, tk, nh, hs) = (dims.batch, dims.tq, dims.tk, dims.heads, dims.head_dim);
        let c = nh * hs;
        let kvs = dims.kv_batch_stride;
        let kv_extent = (bsz - 1) * kvs + tk * c;
        let qh = self.bf16_copy(q.ptr, bsz * tq * c)?;
        let kh = self.bf16_copy(k.ptr, kv_extent)?;
        let vh = self.bf16_copy(v.ptr, kv_extent)?;
        let per_b = nh * tq * tk;
        let scores = if probs.is_none() { Some(self.alloc(DType::F32, per_b)?) } else { None };
        let pd = self.alloc(DType::BF16, per_b)?;
        let (has_drop, seed, doff, p, dscale) = dropout_params(dropout);
        let (f4, h2) = (|x: usize| (x * 4) as u64, |x: usize| (x * 2) as u64);
        let (tq32, tk32, qoff) = (u32c(OP, tq)?, u32c(OP, tk)?, u32c(OP, dims.q_offset)?);
        let rows = u32c(OP, nh * tq)?;
        for b in 0..bsz {
            // Scores go straight into the saved probabilities when they are kept.
            let s_b = match probs {
                Some(pp) => pp + f4(b * per_b),
                None => scores.as_ref().map_or(0, |t| t.ptr),
            };
            // S = scale · Q Kᵀ: [tq, hs] × [tk, hs]ᵀ per head; head h starts hs columns in.
            self.heads_gemm(
                (tq, tk, hs),
                (false, true),
                (qh.ptr + h2(b * tq * c), c, hs),
                (kh.ptr + h2(b * kvs), c, hs),
                (s_b, tk, tq * tk),
                nh,
                dims.scale,
            )?;
            let (pdp, mask_b, base_row) =
                (pd.ptr, if mask == 0 { 0 } else { mask + (b * tk) as u64 }, (b * nh * tq) as u64);
            let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            launch!(
                self,
                "attention_softmax_mixed",
                cfg,
                s_b,
                pdp,
                mask_b,
                tq32,
                tk32,
                qoff,
                has_drop,
                base_row,
                seed,
                doff,
                p,
                dscale
            )?;
            // O = P' V: [tq, tk] × [tk, hs] per head, written into head h's columns of out.
            self.heads_gemm(
                (tq, hs, tk),
                (false, false),
                (pd.ptr, tk, tq * tk),
                (vh.ptr + h2(b * kvs), c, hs),
                (out + f4(b * tq * c), c, hs),
                nh,
                1.0,
            )?;
        }
        Ok(())
    }

    /// Backward attention with bf16 products from the saved f32 probabilities.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_mixed(
        &self,
        dq: u64,
        dk: u64,
        dv: u64,
        ins: &MixedBwdIn,
        dims: &AttnDims,
        kv_extent: usize,
        dropout: Option<&Dropout>,
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        let (bsz, tq, tk, nh, hs) = (dims.batch, dims.tq, dims.tk, dims.heads, dims.head_dim);
        let c = nh * hs;
        let kvs = dims.kv_batch_stride;
        let qh = self.bf16_copy(ins.q, bsz * tq * c)?;
        let doh = self.bf16_copy(ins.dout, bsz * tq * c)?;
        let kh = self.bf16_copy(ins.k, kv_extent)?;
        let vh = self.bf16_copy(ins.v, kv_extent)?;
        let per_b = nh * tq * tk;
        let pd = self.alloc(DType::BF16, per_b)?;
        let ds = self.alloc(DType::F32, per_b)?;
        let ds16 = self.alloc(DType::BF16, per_b)?;
        let (has_drop, seed, doff, p, dscale) = dropout_params(dropout);
        let (f4, h2) = (|x: usize| (x * 4) as u64, |x: usize| (x * 2) as u64);
        let tk32 = u32c(OP, tk)?;
        for b in 0..bsz {
            let probs_b = ins.probs + f4(b * per_b);
            let (pdp, n, base) = (pd.ptr, per_b as u64, (b * per_b) as u64);
            launch!(
                self,
                "attention_probs_bf16",
                self.grid_1d(per_b),
                pdp,
                probs_b,
                n,
                base,
                has_drop,
                seed,
                doff,
                p,
                dscale
            )?;
            let (q_b, do_b) = (qh.ptr + h2(b * tq * c), doh.ptr + h2(b * tq * c));
            let (k_b, v_b) = (kh.ptr + h2(b * kvs), vh.ptr + h2(b * kvs));
            let (dq_b, dk_b, dv_b) = (dq + f4(b * tq * c), dk + f4(b * tk * c), dv + f4(b * tk * c));
            // dV = P'ᵀ dO
            self.heads_gemm((tk, hs, tq), (true, false), (pd.ptr, tk, tq * tk), (do_b, c, hs), (dv_b, c, hs), nh, 1.0)?;
            // dP' = dO Vᵀ (f32, into ds)
            self.heads_gemm((tq, tk, hs), (false, true), (do_b, c, hs), (v_b, c, hs), (ds.ptr, tk, tq * tk), nh, 1.0)?;
            // dS = scale · P ∘ (dP − rowsum(P ∘ dP)) as bf16
            let (pds, scale, base_row, pds16) = (ds.ptr, dims.scale, (b * nh * tq) as u64, ds16.ptr);
            let cfg =
                LaunchConfig { grid_dim: (u32c(OP, nh * tq)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            launch!(
                self,
                "attention_softmax_backward",
                cfg,
                pds,
                probs_b,
                tk32,
                scale,
                has_drop,
                base_row,
                seed,
                doff,
                p,
                dscale,
                pds16
            )?;
            // dQ = dS K, dK = dSᵀ Q
            self.heads_gemm(
                (tq, hs, tk),
                (false, false),
                (ds16.ptr, tk, tq * tk),
                (k_b, c, hs),
                (dq_b, c, hs),
                nh,
                1.0,
            )?;
            self.heads_gemm(
                (tk, hs, tq),
                (true, false),
                (ds16.ptr, tk, tq * tk),
                (q_b, c, hs),
                (dk_b, c, hs),
                nh,
                1.0,
            )?;
        }
        Ok(())
    }
}

/// Optional epilogues of the small-row linear kernel (see decode.cu's `linear_small`).
#[derive(Clone, Copy)]
struct SmallEpilogue {
    /// Where the value before the activation goes (0 = nowhere).
    pre: u64,
    /// -1 none, 0 ReLU, 1 GELU.
    act: i32,
    /// An f32 residual added last (0 = none).
    res: u64,
}

impl Default for SmallEpilogue {
    fn default() -> Self {
        SmallEpilogue { pre: 0, act: -1, res: 0 }
    }
}

/// Whether `linear_small` can run: a decoding step's few rows, bf16/f16 weights and 16-byte
/// aligned rows (otherwise cuBLAS does the product).
fn small_linear_ok(rows: usize, x: &View<'_, CudaBuf>, ws: &[&View<'_, CudaBuf>], in_dim: usize) -> bool {
    (1..=LINEAR_SMALL_MAX_ROWS).contains(&rows)
        && x.buf.dtype == DType::F32
        && in_dim.is_multiple_of(8)
        && x.buf.addr(x.off).is_multiple_of(16)
        && ws.iter().all(|w| {
            matches!(w.buf.dtype, DType::BF16 | DType::F16)
                && w.buf.dtype == ws[0].buf.dtype
                && w.buf.addr(w.off).is_multiple_of(16)
        })
}

impl CudaBackend {
    /// The f32 address of a linear layer's output after checking its length.
    fn linear_out(&self, op: &'static str, out: &ViewMut<'_, CudaBuf>, len: usize) -> Result<u64> {
        let o = self.out_f32(op, out)?;
        expect_len(op, "out", out.len, len)?;
        Ok(o)
    }

    /// A weight's and its bias's addresses and the bias dtype code, after checking them.
    fn linear_weight(
        &self,
        op: &'static str,
        w: &View<'_, CudaBuf>,
        bias: Option<&View<'_, CudaBuf>>,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<(u64, u64, i32)> {
        bounds(op, w.buf.len, w.off, w.len).map_err(|e| shape_err(op, format!("w: {e}")))?;
        expect_len(op, "w", w.len, out_dim * in_dim)?;
        let (pb, bdt) = match bias {
            Some(b) => {
                bounds(op, b.buf.len, b.off, b.len)?;
                expect_len(op, "bias", b.len, out_dim)?;
                (b.buf.addr(b.off), dtype_code(b.buf.dtype))
            }
            None => (0, 0),
        };
        Ok((w.buf.addr(w.off), pb, bdt))
    }

    /// Launch `linear_small` for up to three `(out, w, bias)` triples sharing `x` and the shape.
    #[allow(clippy::too_many_arguments)]
    fn linear_small(
        &self,
        triples: &[(u64, u64, u64)],
        x: &View<'_, CudaBuf>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
        (wdt, bdt): (DType, i32),
        epi: SmallEpilogue,
    ) -> Result<()> {
        const OP: &str = "linear";
        bounds(OP, x.buf.len, x.off, x.len).map_err(|e| shape_err(OP, format!("x: {e}")))?;
        expect_len(OP, "x", x.len, rows * in_dim)?;
        if out_dim == 0 || triples.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let t = |i: usize| triples.get(i).copied().unwrap_or((0, 0, 0));
        let ((o0, w0, b0), (o1, w1, b1), (o2, w2, b2)) = (t(0), t(1), t(2));
        let wdt = dtype_code(wdt);
        let px = x.buf.addr(x.off);
        let (m, n, k) = (rows as u32, u32c(OP, out_dim)?, u32c(OP, in_dim)?);
        let (res, pre, act) = (epi.res, epi.pre, epi.act);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8), triples.len().min(3) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "linear_small", cfg, o0, px, w0, b0, m, n, k, wdt, bdt, res, pre, act, o1, w1, b1, o2, w2, b2)
    }
}

/// Adds the time from its creation to the GPU's completion of the work queued meanwhile to the
/// profile when dropped (only when profiling).
struct ProfGuard<'a> {
    be: &'a CudaBackend,
    start: Option<(String, Instant)>,
}

impl Drop for ProfGuard<'_> {
    fn drop(&mut self) {
        let (Some((key, t0)), Some(prof)) = (self.start.take(), self.be.prof.as_ref()) else {
            return;
        };
        let _ = self.be.stream.synchronize();
        let dt = t0.elapsed().as_secs_f64();
        if let Ok(mut v) = prof.lock() {
            match v.iter_mut().find(|e| e.0 == key) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += dt;
                }
                None => v.push((key, 1, dt)),
            }
        }
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let Some(prof) = self.prof.as_ref() else { return };
        let Ok(mut v) = prof.lock() else { return };
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        let total: f64 = v.iter().map(|e| e.2).sum();
        eprintln!("\n== CUDA profile ({} ops, {:.1} ms; each op synchronised)", v.len(), total * 1e3);
        eprintln!("{:>10} {:>6} {:>9} {:>8}  op", "ms", "%", "calls", "us/call");
        for (k, n, t) in v.iter().take(40) {
            eprintln!(
                "{:>10.2} {:>6.1} {:>9} {:>8.1}  {k}",
                t * 1e3,
                100.0 * t / total.max(1e-12),
                n,
                t * 1e6 / *n as f64
            );
        }
    }
}

/// An f32 input's device address, and the widened temporary behind it when there is one.
struct F32In {
    ptr: u64,
    _tmp: Option<CudaBuf>,
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

/// `x` as a u32 kernel argument, or a clear error.
fn u32c(op: &'static str, x: usize) -> Result<u32> {
    u32::try_from(x)
        .map_err(|_| CudaError::Limit { op, detail: format!("{x} exceeds the kernels' 32-bit sizes") }.into())
}

fn dropout_params(d: Option<&Dropout>) -> (i32, u64, u64, f32, f32) {
    match d.filter(|d| d.p > 0.0) {
        // keep_scale as the CPU computes it, in f32.
        Some(d) => (1, d.seed, d.offset, d.p, 1.0 / (1.0 - d.p)),
        None => (0, 0, 0, 0.0, 1.0),
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;

    fn set_mixed_precision(&self, dtype: Option<DType>) {
        self.mixed_bf16.store(dtype == Some(DType::BF16), Ordering::Relaxed);
    }

    fn loss_chunk_rows(&self) -> usize {
        // 2048 rows of 50272 f32 logits = 412 MB: large products, few launches.
        2048
    }

    fn memory_in_use(&self) -> Option<u64> {
        self.bind().ok()?;
        let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
        Some(total.saturating_sub(free) as u64)
    }

    fn name(&self) -> String {
        format!("cuda:{}", self.info.ordinal)
    }

    // ---- memory ---------------------------------------------------------------------------
    fn zeros(&self, dtype: DType, len: usize) -> Result<CudaBuf> {
        let _prof = self.prof("zeros");
        self.bind()?;
        let bytes = len
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| shape_err("zeros", format!("{len} elements overflow")))?;
        let data = self.stream.alloc_zeros::<u8>(bytes.max(16)).map_err(drv("cuMemAlloc"))?;
        Ok(self.wrap(data, len, dtype))
    }

    fn from_f32(&self, data: &[f32], dtype: DType) -> Result<CudaBuf> {
        let _prof = self.prof("from_f32");
        self.bind()?;
        if data.is_empty() {
            return self.zeros(dtype, 0);
        }
        // Round on the host with the `half` crate: the same bits as the CPU backend.
        let bytes: Vec<u8> = match dtype {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::BF16 => data.iter().flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes()).collect(),
            DType::F16 => data.iter().flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes()).collect(),
        };
        let dev = self.stream.clone_htod(&bytes).map_err(drv("cuMemcpyHtoD"))?;
        Ok(self.wrap(dev, data.len(), dtype))
    }

    fn to_f32(&self, src: View<'_, CudaBuf>) -> Result<Vec<f32>> {
        let _prof = self.prof("to_f32");
        bounds("to_f32", src.buf.len, src.off, src.len)?;
        if src.len == 0 {
            return Ok(Vec::new());
        }
        self.bind()?;
        let size = src.buf.dtype.size_in_bytes();
        let window = src.buf.data.slice(src.off * size..(src.off + src.len) * size);
        let bytes: Vec<u8> = self.stream.clone_dtoh(&window).map_err(drv("cuMemcpyDtoH"))?;
        self.synchronize()?;
        Ok(match src.buf.dtype {
            DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::BF16 => {
                bytes.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
            }
            DType::F16 => {
                bytes.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
            }
        })
    }

    fn fill(&self, out: ViewMut<'_, CudaBuf>, value: f32) -> Result<()> {
        let _prof = self.prof("fill");
        bounds("fill", out.buf.len, out.off, out.len)?;
        if out.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let (bits, width): (u32, i32) = match out.buf.dtype {
            DType::F32 => (value.to_bits(), 4),
            DType::BF16 => (bf16::from_f32(value).to_bits() as u32, 2),
            DType::F16 => (f16::from_f32(value).to_bits() as u32, 2),
        };
        let (p, n) = (out.buf.addr(out.off), out.len as u64);
        launch!(self, "fill", self.grid_1d(out.len), p, n, width, bits)
    }

    fn copy(&self, out: ViewMut<'_, CudaBuf>, src: View<'_, CudaBuf>) -> Result<()> {
        let _prof = self.prof("copy");
        const OP: &str = "copy";
        bounds(OP, out.buf.len, out.off, out.len)?;
        bounds(OP, src.buf.len, src.off, src.len)?;
        expect_len(OP, "src", src.len, out.len)?;
        self.bind()?;
        let (off, len) = (out.off, out.len);
        self.copy_rows(out.buf, off, 0, src.buf, src.off, 0, 1, len)
    }

    fn copy_2d(
        &self,
        out: ViewMut<'_, CudaBuf>,
        out_stride: usize,
        src: View<'_, CudaBuf>,
        src_stride: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let _prof = self.prof("copy_2d");
        const OP: &str = "copy_2d";
        bounds(OP, out.buf.len, out.off, out.len)?;
        bounds(OP, src.buf.len, src.off, src.len)?;
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
        self.bind()?;
        let off = out.off;
        self.copy_rows(out.buf, off, out_stride, src.buf, src.off, src_stride, rows, cols)
    }

    // ---- dense algebra --------------------------------------------------------------------------
    fn linear(
        &self,
        mut out: ViewMut<'_, CudaBuf>,
        x: View<'_, CudaBuf>,
        w: View<'_, CudaBuf>,
        bias: Option<View<'_, CudaBuf>>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        if !small_linear_ok(rows, &x, &[&w], in_dim) {
            self.matmul(out.rb(), x, w, &Gemm::new(rows, out_dim, in_dim, false, true))?;
            return match bias {
                Some(b) => self.bias_add(out, b, out_dim),
                None => Ok(()),
            };
        }
        let _prof = self.prof_with(|| format!("linear_small {rows}x{out_dim}x{in_dim}"));
        let o = self.linear_out("linear", &out, rows * out_dim)?;
        let wb = self.linear_weight("linear", &w, bias.as_ref(), in_dim, out_dim)?;
        self.linear_small(&[(o, wb.0, wb.1)], &x, rows, in_dim, out_dim, (w.buf.dtype, wb.2), SmallEpilogue::default())
    }

    fn linear3(
        &self,
        outs: [ViewMut<'_, CudaBuf>; 3],
        x: View<'_, CudaBuf>,
        ws: [View<'_, CudaBuf>; 3],
        biases: [Option<View<'_, CudaBuf>>; 3],
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        let same_dtype = ws.iter().all(|w| w.buf.dtype == ws[0].buf.dtype)
            && biases.iter().all(|b| b.as_ref().map(|b| b.buf.dtype) == biases[0].as_ref().map(|b| b.buf.dtype));
        if !same_dtype || !small_linear_ok(rows, &x, &[&ws[0], &ws[1], &ws[2]], in_dim) {
            for ((out, w), b) in outs.into_iter().zip(ws).zip(biases) {
                self.linear(out, x, w, b, rows, in_dim, out_dim)?;
            }
            return Ok(());
        }
        let _prof = self.prof_with(|| format!("linear3_small {rows}x{out_dim}x{in_dim}"));
        let mut triples = Vec::with_capacity(3);
        let mut bdt = 0;
        for (out, (w, b)) in outs.iter().zip(ws.iter().zip(biases.iter())) {
            let o = self.linear_out("linear3", out, rows * out_dim)?;
            let (pw, pb, d) = self.linear_weight("linear3", w, b.as_ref(), in_dim, out_dim)?;
            bdt = d;
            triples.push((o, pw, pb));
        }
        self.linear_small(&triples, &x, rows, in_dim, out_dim, (ws[0].buf.dtype, bdt), SmallEpilogue::default())
    }

    fn linear_act(
        &self,
        mut pre: ViewMut<'_, CudaBuf>,
        out: ViewMut<'_, CudaBuf>,
        x: View<'_, CudaBuf>,
        w: View<'_, CudaBuf>,
        bias: Option<View<'_, CudaBuf>>,
        act: Activation,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        if !small_linear_ok(rows, &x, &[&w], in_dim) {
            self.linear(pre.rb(), x, w, bias, rows, in_dim, out_dim)?;
            return self.activation_forward(act, out, pre.as_view());
        }
        let _prof = self.prof_with(|| format!("linear_act_small {rows}x{out_dim}x{in_dim}"));
        let o = self.linear_out("linear_act", &out, rows * out_dim)?;
        let p = self.linear_out("linear_act", &pre, rows * out_dim)?;
        let (pw, pb, bdt) = self.linear_weight("linear_act", &w, bias.as_ref(), in_dim, out_dim)?;
        let epi = SmallEpilogue { pre: p, act: act_code(act), res: 0 };
        self.linear_small(&[(o, pw, pb)], &x, rows, in_dim, out_dim, (w.buf.dtype, bdt), epi)
    }

    fn linear_residual(
        &self,
        out: ViewMut<'_, CudaBuf>,
        mut tmp: ViewMut<'_, CudaBuf>,
        x: View<'_, CudaBuf>,
        w: View<'_, CudaBuf>,
        bias: Option<View<'_, CudaBuf>>,
        residual: View<'_, CudaBuf>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        if !small_linear_ok(rows, &x, &[&w], in_dim) || residual.buf.dtype != DType::F32 {
            self.linear(tmp.rb(), x, w, bias, rows, in_dim, out_dim)?;
            return self.add(out, residual, tmp.as_view());
        }
        let _prof = self.prof_with(|| format!("linear_res_small {rows}x{out_dim}x{in_dim}"));
        let o = self.linear_out("linear_residual", &out, rows * out_dim)?;
        bounds("linear_residual", residual.buf.len, residual.off, residual.len)?;
        expect_len("linear_residual", "residual", residual.len, rows * out_dim)?;
        let (pw, pb, bdt) = self.linear_weight("linear_residual", &w, bias.as_ref(), in_dim, out_dim)?;
        let epi = SmallEpilogue { pre: 0, act: -1, res: residual.buf.addr(residual.off) };
        self.linear_small(&[(o, pw, pb)], &x, rows, in_dim, out_dim, (w.buf.dtype, bdt), epi)
    }

    fn matmul(&self, out: ViewMut<'_, CudaBuf>, a: View<'_, CudaBuf>, b: View<'_, CudaBuf>, g: &Gemm) -> Result<()> {
        let _prof = self
            .prof_with(|| format!("matmul {}x{}x{} batch {} {}·{}", g.m, g.n, g.k, g.batch, a.buf.dtype, b.buf.dtype));
        const OP: &str = "matmul";
        let o = self.out_f32(OP, &out)?;
        bounds(OP, a.buf.len, a.off, a.len)?;
        bounds(OP, b.buf.len, b.off, b.len)?;
        let (ext_a, ext_b, _) = check::gemm(out.len, a.len, b.len, g)?;
        if g.batch == 0 || g.m == 0 || g.n == 0 {
            return Ok(());
        }
        self.bind()?;
        if g.k == 0 {
            // An empty product: out = beta * out, batch by batch.
            let mn = g.m * g.n;
            for bi in 0..g.batch {
                let p = o + (bi * g.stride_out * 4) as u64;
                let n = mn as u64;
                if g.beta == 0.0 {
                    let (bits, width) = (0u32, 4i32);
                    launch!(self, "fill", self.grid_1d(mn), p, n, width, bits)?;
                } else {
                    let s = g.beta;
                    launch!(self, "scale", self.grid_1d(mn), p, s, n)?;
                }
            }
            return Ok(());
        }
        // Pick the operand type: equal dtypes run as they are; f32 with bf16/f16 rounds the f32
        // side down (autocast); bf16 with f16 widens both.
        let (da, db) = (a.buf.dtype, b.buf.dtype);
        let ab = match (da, db) {
            // Mixed precision (a bf16 model): f32 × f32 products (weight gradients, attention-free
            // activations) run on tensor cores in bf16 with f32 accumulation, as under autocast.
            (DType::F32, DType::F32) if self.mixed() => DType::BF16,
            (x, y) if x == y => x,
            (DType::F32, y) => y,
            (x, DType::F32) => x,
            _ => DType::F32,
        };
        let ta = if da != ab { Some(self.converted(a.buf, a.off, ext_a, ab)?) } else { None };
        let tb = if db != ab { Some(self.converted(b.buf, b.off, ext_b, ab)?) } else { None };
        let pa = ta.as_ref().map_or(a.buf.addr(a.off), |t| t.ptr);
        let pb = tb.as_ref().map_or(b.buf.addr(b.off), |t| t.ptr);
        let raw = RawGemm {
            m: g.m,
            n: g.n,
            k: g.k,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            a: pa,
            lda: if g.trans_a { g.m } else { g.k },
            stride_a: g.stride_a,
            b: pb,
            ldb: if g.trans_b { g.k } else { g.n },
            stride_b: g.stride_b,
            c: o,
            ldc: g.n,
            stride_c: g.stride_out,
            batch: g.batch,
            alpha: g.alpha,
            beta: g.beta,
            ab,
        };
        blas::gemm(&self.blas, &raw)?;
        Ok(())
    }

    fn bias_add(&self, out: ViewMut<'_, CudaBuf>, bias: View<'_, CudaBuf>, dim: usize) -> Result<()> {
        let _prof = self.prof("bias_add");
        const OP: &str = "bias_add";
        let o = self.out_f32(OP, &out)?;
        rows_of(OP, "out", out.len, dim)?;
        expect_len(OP, "bias", bias.len, dim)?;
        if out.len == 0 {
            return Ok(());
        }
        self.bind()?;
        bounds(OP, bias.buf.len, bias.off, bias.len)?;
        let (bp, bdt) = (bias.buf.addr(bias.off), dtype_code(bias.buf.dtype));
        let (n, d) = (out.len as u64, u32c(OP, dim)?);
        launch!(self, "bias_add", self.grid_1d(out.len), o, bp, n, d, bdt)
    }

    fn bias_backward(&self, dbias: ViewMut<'_, CudaBuf>, dout: View<'_, CudaBuf>, dim: usize) -> Result<()> {
        let _prof = self.prof("bias_backward");
        const OP: &str = "bias_backward";
        let db = self.out_f32(OP, &dbias)?;
        let rows = rows_of(OP, "dout", dout.len, dim)?;
        expect_len(OP, "dbias", dbias.len, dim)?;
        self.bind()?;
        let dout = self.in_f32(OP, dout)?;
        self.colsum_into(db, dout.ptr, 0, 0, 0, rows, dim)
    }

    fn add(&self, out: ViewMut<'_, CudaBuf>, a: View<'_, CudaBuf>, b: View<'_, CudaBuf>) -> Result<()> {
        let _prof = self.prof("add");
        const OP: &str = "add";
        let o = self.out_f32(OP, &out)?;
        expect_len(OP, "a", a.len, out.len)?;
        expect_len(OP, "b", b.len, out.len)?;
        if out.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let (a, b) = (self.in_f32(OP, a)?, self.in_f32(OP, b)?);
        let (pa, pb, n) = (a.ptr, b.ptr, out.len as u64);
        launch!(self, "add", self.grid_1d(out.len), o, pa, pb, n)
    }

    fn add_assign(&self, out: ViewMut<'_, CudaBuf>, a: View<'_, CudaBuf>) -> Result<()> {
        let _prof = self.prof("add_assign");
        const OP: &str = "add_assign";
        let o = self.out_f32(OP, &out)?;
        expect_len(OP, "a", a.len, out.len)?;
        if out.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let a = self.in_f32(OP, a)?;
        let (pa, n) = (a.ptr, out.len as u64);
        launch!(self, "add_assign", self.grid_1d(out.len), o, pa, n)
    }

    fn scale(&self, out: ViewMut<'_, CudaBuf>, s: f32) -> Result<()> {
        let _prof = self.prof("scale");
        let o = self.out_f32("scale", &out)?;
        if out.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let n = out.len as u64;
        launch!(self, "scale", self.grid_1d(out.len), o, s, n)
    }

    fn sum_squares(&self, x: View<'_, CudaBuf>) -> Result<f64> {
        let _prof = self.prof("sum_squares");
        const OP: &str = "sum_squares";
        // Fixed chunk size: the partials (and so the bits of the result) do not depend on the GPU.
        const CHUNK: usize = 1 << 16;
        bounds(OP, x.buf.len, x.off, x.len)?;
        if x.len == 0 {
            return Ok(0.0);
        }
        self.bind()?;
        let xin = self.in_f32(OP, x)?;
        let blocks = x.len.div_ceil(CHUNK);
        let part = self.alloc(DType::F32, blocks * 2)?; // f64 partials
        let total = self.alloc(DType::F32, 2)?;
        let (px, n, chunk, pp, pt) = (xin.ptr, x.len as u64, CHUNK as u64, part.ptr, total.ptr);
        let cfg = LaunchConfig { grid_dim: (u32c(OP, blocks)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "sumsq_partials", cfg, px, n, chunk, pp)?;
        let count = u32c(OP, blocks)?;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "sumsq_finish", cfg, pp, count, pt)?;
        let bytes: Vec<u8> = self.stream.clone_dtoh(&total.data.slice(0..8)).map_err(drv("cuMemcpyDtoH"))?;
        self.synchronize()?;
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(&bytes[..8]);
        Ok(f64::from_le_bytes(b8))
    }

    // ---- embeddings -------------------------------------------------------------------------------
    fn embedding_forward(
        &self,
        out: ViewMut<'_, CudaBuf>,
        table: View<'_, CudaBuf>,
        ids: &[u32],
        dim: usize,
        accumulate: bool,
    ) -> Result<()> {
        let _prof = self.prof("embedding_forward");
        const OP: &str = "embedding_forward";
        let o = self.out_f32(OP, &out)?;
        expect_len(OP, "out", out.len, prod(OP, &[ids.len(), dim])?)?;
        bounds(OP, table.buf.len, table.off, table.len)?;
        let vocab = rows_of(OP, "table", table.len, dim)?;
        check_ids(OP, ids, vocab)?;
        if ids.is_empty() || dim == 0 {
            return Ok(());
        }
        self.bind()?;
        let (_ids, pid) = self.upload(ids)?;
        let (pt, tdt, n, d, acc) = (
            table.buf.addr(table.off),
            dtype_code(table.buf.dtype),
            ids.len() as u64,
            u32c(OP, dim)?,
            accumulate as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (dim.div_ceil(THREADS as usize).min(1024) as u32, ids.len().min(65_535) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "embedding_forward", cfg, o, pt, tdt, pid, n, d, acc)
    }

    fn embedding_backward(
        &self,
        dtable: ViewMut<'_, CudaBuf>,
        ids: &[u32],
        dout: View<'_, CudaBuf>,
        dim: usize,
    ) -> Result<()> {
        let _prof = self.prof("embedding_backward");
        const OP: &str = "embedding_backward";
        let dt = self.out_f32(OP, &dtable)?;
        expect_len(OP, "dout", dout.len, prod(OP, &[ids.len(), dim])?)?;
        let vocab = rows_of(OP, "dtable", dtable.len, dim)?;
        check_ids(OP, ids, vocab)?;
        if ids.is_empty() || dim == 0 {
            return Ok(());
        }
        self.bind()?;
        u32c(OP, ids.len())?;
        let dout = self.in_f32(OP, dout)?;
        // Rows grouped by id (stable sort keeps each id's rows in their original order).
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&r| ids[r as usize]);
        let mut seg_start = Vec::new();
        let mut seg_id = Vec::new();
        for (k, &r) in order.iter().enumerate() {
            let id = ids[r as usize];
            if seg_id.last() != Some(&id) {
                seg_start.push(k as u32);
                seg_id.push(id);
            }
        }
        seg_start.push(order.len() as u32);
        let segs = seg_id.len();
        let (_o, po) = self.upload(&order)?;
        let (_s, ps) = self.upload(&seg_start)?;
        let (_i, pi) = self.upload(&seg_id)?;
        let (pd, d) = (dout.ptr, u32c(OP, dim)?);
        let cfg = LaunchConfig {
            grid_dim: (u32c(OP, segs)?, u32c(OP, dim.div_ceil(THREADS as usize))?, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "embedding_backward", cfg, dt, pd, po, ps, pi, d)
    }

    // ---- normalisation ------------------------------------------------------------------------------
    fn layernorm_forward(
        &self,
        out: ViewMut<'_, CudaBuf>,
        mean: ViewMut<'_, CudaBuf>,
        rstd: ViewMut<'_, CudaBuf>,
        inp: View<'_, CudaBuf>,
        weight: Option<View<'_, CudaBuf>>,
        bias: Option<View<'_, CudaBuf>>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let _prof = self.prof("layernorm_forward");
        const OP: &str = "layernorm_forward";
        let (o, pm, pr) = (self.out_f32(OP, &out)?, self.out_f32(OP, &mean)?, self.out_f32(OP, &rstd)?);
        bounds(OP, inp.buf.len, inp.off, inp.len)?;
        let rows = rows_of(OP, "inp", inp.len, dim)?;
        expect_len(OP, "out", out.len, inp.len)?;
        expect_len(OP, "mean", mean.len, rows)?;
        expect_len(OP, "rstd", rstd.len, rows)?;
        if let Some(w) = &weight {
            expect_len(OP, "weight", w.len, dim)?;
        }
        if let Some(b) = &bias {
            expect_len(OP, "bias", b.len, dim)?;
        }
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        self.bind()?;
        let x = self.in_f32(OP, inp)?;
        // The kernel reads the parameters in their stored dtype when they share one.
        let wdt = weight.as_ref().or(bias.as_ref()).map_or(DType::F32, |v| v.buf.dtype);
        let same = [&weight, &bias].iter().all(|p| p.as_ref().is_none_or(|v| v.buf.dtype == wdt));
        let param = |v: Option<View<'_, CudaBuf>>| -> Result<(u64, Option<F32In>)> {
            match v {
                None => Ok((0, None)),
                Some(v) if same => {
                    bounds(OP, v.buf.len, v.off, v.len)?;
                    Ok((v.buf.addr(v.off), None))
                }
                Some(v) => {
                    let t = self.in_f32(OP, v)?;
                    Ok((t.ptr, Some(t)))
                }
            }
        };
        let (pw, _w) = param(weight)?;
        let (pb, _b) = param(bias)?;
        let wdt = dtype_code(if same { wdt } else { DType::F32 });
        let px = x.ptr;
        let d = u32c(OP, dim)?;
        let cfg = LaunchConfig { grid_dim: (u32c(OP, rows)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "layernorm_forward", cfg, o, pm, pr, px, pw, pb, d, eps, wdt)
    }

    fn layernorm_backward(
        &self,
        dinp: ViewMut<'_, CudaBuf>,
        dweight: Option<ViewMut<'_, CudaBuf>>,
        dbias: Option<ViewMut<'_, CudaBuf>>,
        dout: View<'_, CudaBuf>,
        inp: View<'_, CudaBuf>,
        weight: Option<View<'_, CudaBuf>>,
        mean: View<'_, CudaBuf>,
        rstd: View<'_, CudaBuf>,
        dim: usize,
    ) -> Result<()> {
        let _prof = self.prof("layernorm_backward");
        const OP: &str = "layernorm_backward";
        let pdi = self.out_f32(OP, &dinp)?;
        let pdw = dweight.as_ref().map(|v| self.out_f32(OP, v)).transpose()?;
        let pdb = dbias.as_ref().map(|v| self.out_f32(OP, v)).transpose()?;
        bounds(OP, inp.buf.len, inp.off, inp.len)?;
        let rows = rows_of(OP, "inp", inp.len, dim)?;
        expect_len(OP, "dinp", dinp.len, inp.len)?;
        expect_len(OP, "dout", dout.len, inp.len)?;
        expect_len(OP, "mean", mean.len, rows)?;
        expect_len(OP, "rstd", rstd.len, rows)?;
        if let Some(dw) = &dweight {
            expect_len(OP, "dweight", dw.len, dim)?;
        }
        if let Some(db) = &dbias {
            expect_len(OP, "dbias", db.len, dim)?;
        }
        if let Some(w) = &weight {
            expect_len(OP, "weight", w.len, dim)?;
        }
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        self.bind()?;
        let (dy, x) = (self.in_f32(OP, dout)?, self.in_f32(OP, inp)?);
        let (m, r) = (self.in_f32(OP, mean)?, self.in_f32(OP, rstd)?);
        let w = weight.map(|w| self.in_f32(OP, w)).transpose()?;
        let (pdy, px, pm, pr, pw) = (dy.ptr, x.ptr, m.ptr, r.ptr, w.as_ref().map_or(0, |w| w.ptr));
        let d = u32c(OP, dim)?;
        let cfg = LaunchConfig { grid_dim: (u32c(OP, rows)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "layernorm_backward_dx", cfg, pdi, pdy, px, pw, pm, pr, d)?;
        if let Some(pdw) = pdw {
            self.colsum_into(pdw, pdy, px, pm, pr, rows, dim)?;
        }
        if let Some(pdb) = pdb {
            self.colsum_into(pdb, pdy, 0, 0, 0, rows, dim)?;
        }
        Ok(())
    }

    // ---- activations and dropout ------------------------------------------------------------------
    fn activation_forward(&self, act: Activation, out: ViewMut<'_, CudaBuf>, inp: View<'_, CudaBuf>) -> Result<()> {
        let _prof = self.prof("activation_forward");
        const OP: &str = "activation_forward";
        let o = self.out_f32(OP, &out)?;
        expect_len(OP, "inp", inp.len, out.len)?;
        if out.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let x = self.in_f32(OP, inp)?;
        let (code, px, n) = (act_code(act), x.ptr, out.len as u64);
        launch!(self, "activation_forward", self.grid_1d(out.len), code, o, px, n)
    }

    fn activation_backward(
        &self,
        act: Activation,
        dinp: ViewMut<'_, CudaBuf>,
        inp: View<'_, CudaBuf>,
        dout: View<'_, CudaBuf>,
    ) -> Result<()> {
        let _prof = self.prof("activation_backward");
        const OP: &str = "activation_backward";
        let d = self.out_f32(OP, &dinp)?;
        expect_len(OP, "inp", inp.len, dinp.len)?;
        expect_len(OP, "dout", dout.len, dinp.len)?;
        if dinp.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let (x, dy) = (self.in_f32(OP, inp)?, self.in_f32(OP, dout)?);
        let (code, px, pdy, n) = (act_code(act), x.ptr, dy.ptr, dinp.len as u64);
        launch!(self, "activation_backward", self.grid_1d(dinp.len), code, d, px, pdy, n)
    }

    fn dropout(&self, x: ViewMut<'_, CudaBuf>, d: &Dropout) -> Result<()> {
        let _prof = self.prof("dropout");
        const OP: &str = "dropout";
        let px = self.out_f32(OP, &x)?;
        if !(0.0..=1.0).contains(&d.p) {
            return Err(shape_err(OP, format!("dropout probability {} outside [0, 1]", d.p)));
        }
        if d.p <= 0.0 || x.len == 0 {
            return Ok(());
        }
        if d.p >= 1.0 {
            return self.fill(x, 0.0);
        }
        self.bind()?;
        let (n, seed, offset, p, scale) = (x.len as u64, d.seed, d.offset, d.p, 1.0f32 / (1.0 - d.p));
        launch!(self, "dropout", self.grid_1d(x.len), px, n, seed, offset, p, scale)
    }

    // ---- attention ----------------------------------------------------------------------------
    fn attention_forward(
        &self,
        out: ViewMut<'_, CudaBuf>,
        probs: Option<ViewMut<'_, CudaBuf>>,
        q: View<'_, CudaBuf>,
        k: View<'_, CudaBuf>,
        v: View<'_, CudaBuf>,
        key_mask: Option<&[u8]>,
        dims: &AttnDims,
        dropout: Option<&Dropout>,
    ) -> Result<()> {
        let _prof = self.prof("attention_forward");
        const OP: &str = "attention_forward";
        let po = self.out_f32(OP, &out)?;
        let pp = probs.as_ref().map(|p| self.out_f32(OP, p)).transpose()?;
        for (what, view) in [("q", &q), ("k", &k), ("v", &v)] {
            bounds(OP, view.buf.len, view.off, view.len).map_err(|e| shape_err(OP, format!("{what}: {e}")))?;
        }
        let shape = check::attention(OP, dims, q.len, k.len, v.len, key_mask, dropout)?;
        expect_len(OP, "out", out.len, shape.q_len)?;
        if let Some(p) = &probs {
            expect_len(OP, "probs", p.len, shape.probs_len)?;
        }
        if dims.head_dim > 128 {
            return Err(shape_err(OP, format!("head_dim {} > 128 is not supported by the CUDA kernel", dims.head_dim)));
        }
        if dims.batch == 0 || dims.tq == 0 {
            return Ok(());
        }
        self.bind()?;
        let qin = self.in_f32(OP, q)?;
        let kin = self.in_f32(OP, View::new(k.buf, k.off, shape.kv_extent))?;
        let vin = self.in_f32(OP, View::new(v.buf, v.off, shape.kv_extent))?;
        let pmask = self.key_mask_device(key_mask)?;
        let (has_drop, seed, doff, p, dscale) = dropout_params(dropout);
        if self.mixed() && dims.tq >= MIXED_MIN_TQ {
            return self.attention_forward_mixed(po, pp, &qin, &kin, &vin, pmask, dims, dropout);
        }
        if dims.tq == 1 && pp.is_none() && has_drop == 0 && dims.tk <= DECODE_MAX_TK {
            // A decoding step: one query per (row, head) over the cache.
            let smem = ((dims.tk + 256 + 128 + 4 * dims.head_dim) * 4) as u32;
            let cfg = LaunchConfig {
                grid_dim: (u32c(OP, dims.batch * dims.heads)?, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: smem,
            };
            let (pq, pk, pv) = (qin.ptr, kin.ptr, vin.ptr);
            let (tk, heads, hs32, qoff) =
                (u32c(OP, dims.tk)?, u32c(OP, dims.heads)?, dims.head_dim as u32, u32c(OP, dims.q_offset)?);
            let (kvs, scale) = (dims.kv_batch_stride as u64, dims.scale);
            return launch!(self, "attention_decode", cfg, po, pq, pk, pv, pmask, tk, heads, hs32, qoff, kvs, scale);
        }
        const BQ: usize = 16; // ATT_BQ in attention.cu
        let q_blocks = dims.tq.div_ceil(BQ);
        if q_blocks > 65_535 {
            return Err(
                CudaError::Limit { op: OP, detail: format!("tq = {} is too long for one launch", dims.tq) }.into()
            );
        }
        let hs = dims.head_dim;
        let smem = (BQ * hs + 32 * (hs + 1) + 32 * hs) * 4;
        let cfg = LaunchConfig {
            grid_dim: (u32c(OP, dims.batch * dims.heads)?, q_blocks as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (pq, pk, pv, ppr) = (qin.ptr, kin.ptr, vin.ptr, pp.unwrap_or(0));
        let (tq, tk, heads, hs32, qoff) =
            (u32c(OP, dims.tq)?, u32c(OP, dims.tk)?, u32c(OP, dims.heads)?, hs as u32, u32c(OP, dims.q_offset)?);
        let (kvs, scale) = (dims.kv_batch_stride as u64, dims.scale);
        launch!(
            self,
            "attention_forward",
            cfg,
            po,
            ppr,
            pq,
            pk,
            pv,
            pmask,
            tq,
            tk,
            heads,
            hs32,
            qoff,
            kvs,
            scale,
            has_drop,
            seed,
            doff,
            p,
            dscale
        )
    }

    fn attention_backward(
        &self,
        dq: ViewMut<'_, CudaBuf>,
        dk: ViewMut<'_, CudaBuf>,
        dv: ViewMut<'_, CudaBuf>,
        dout: View<'_, CudaBuf>,
        q: View<'_, CudaBuf>,
        k: View<'_, CudaBuf>,
        v: View<'_, CudaBuf>,
        probs: View<'_, CudaBuf>,
        dims: &AttnDims,
        dropout: Option<&Dropout>,
    ) -> Result<()> {
        let _prof = self.prof("attention_backward");
        const OP: &str = "attention_backward";
        let (pdq, pdk, pdv) = (self.out_f32(OP, &dq)?, self.out_f32(OP, &dk)?, self.out_f32(OP, &dv)?);
        for view in [&dout, &q, &k, &v, &probs] {
            bounds(OP, view.buf.len, view.off, view.len)?;
        }
        let shape = check::attention(OP, dims, q.len, k.len, v.len, None, dropout)?;
        expect_len(OP, "dq", dq.len, shape.q_len)?;
        expect_len(OP, "dout", dout.len, shape.q_len)?;
        expect_len(OP, "dk", dk.len, shape.kv_dense_len)?;
        expect_len(OP, "dv", dv.len, shape.kv_dense_len)?;
        expect_len(OP, "probs", probs.len, shape.probs_len)?;
        self.bind()?;
        let pairs = dims.batch * dims.heads;
        if pairs == 0 || dims.tq == 0 {
            self.fill(dq, 0.0)?;
            self.fill(dk, 0.0)?;
            return self.fill(dv, 0.0);
        }
        let (b_, tq, tk, nh, hs) = (dims.batch, dims.tq, dims.tk, dims.heads, dims.head_dim);
        let c = nh * hs;
        let qin = self.in_f32(OP, q)?;
        let kin = self.in_f32(OP, View::new(k.buf, k.off, shape.kv_extent))?;
        let vin = self.in_f32(OP, View::new(v.buf, v.off, shape.kv_extent))?;
        let doin = self.in_f32(OP, dout)?;
        let pin = self.in_f32(OP, probs)?;
        let (has_drop, seed, doff, p, dscale) = dropout_params(dropout);
        let per_b = nh * tq * tk; // one batch element's probabilities [NH, Tq, Tk]
        if self.mixed() && tq >= MIXED_MIN_TQ {
            let ins = MixedBwdIn { q: qin.ptr, k: kin.ptr, v: vin.ptr, dout: doin.ptr, probs: pin.ptr };
            return self.attention_backward_mixed(pdq, pdk, pdv, &ins, dims, shape.kv_extent, dropout);
        }
        let ds = self.alloc(DType::F32, per_b)?;
        let pd = if has_drop != 0 { Some(self.alloc(DType::F32, per_b)?) } else { None };
        let f4 = |x: usize| (x * 4) as u64;
        for b in 0..b_ {
            let probs_b = pin.ptr + f4(b * per_b);
            let p_used = match &pd {
                Some(pd) => {
                    let (dst, n, base) = (pd.ptr, per_b as u64, (b * per_b) as u64);
                    launch!(
                        self,
                        "attention_dropout_probs",
                        self.grid_1d(per_b),
                        dst,
                        probs_b,
                        n,
                        base,
                        seed,
                        doff,
                        p,
                        dscale
                    )?;
                    pd.ptr
                }
                None => probs_b,
            };
            let q_b = qin.ptr + f4(b * tq * c);
            let do_b = doin.ptr + f4(b * tq * c);
            let k_b = kin.ptr + f4(b * dims.kv_batch_stride);
            let v_b = vin.ptr + f4(b * dims.kv_batch_stride);
            let dq_b = pdq + f4(b * tq * c);
            let dk_b = pdk + f4(b * tk * c);
            let dv_b = pdv + f4(b * tk * c);
            // Batched over heads: head h's columns start HS elements after head h-1's.
            let head = |m, n, k, trans_a, trans_b, a, lda, sa, bb, ldb, sb, out, ldc, sc| RawGemm {
                m,
                n,
                k,
                trans_a,
                trans_b,
                a,
                lda,
                stride_a: sa,
                b: bb,
                ldb,
                stride_b: sb,
                c: out,
                ldc,
                stride_c: sc,
                batch: nh,
                alpha: 1.0,
                beta: 0.0,
                ab: DType::F32,
            };
            // dV = P'ᵀ dO
            blas::gemm(&self.blas, &head(tk, hs, tq, true, false, p_used, tk, tq * tk, do_b, c, hs, dv_b, c, hs))?;
            // dP' = dO Vᵀ (into ds)
            blas::gemm(&self.blas, &head(tq, tk, hs, false, true, do_b, c, hs, v_b, c, hs, ds.ptr, tk, tq * tk))?;
            // dS = scale · P ∘ (dP − rowsum(P ∘ dP)), dP = dP' ∘ dropout mask
            let (pds, tk32, scale, base_row, no_ds16) = (ds.ptr, u32c(OP, tk)?, dims.scale, (b * nh * tq) as u64, 0u64);
            let cfg =
                LaunchConfig { grid_dim: (u32c(OP, nh * tq)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            launch!(
                self,
                "attention_softmax_backward",
                cfg,
                pds,
                probs_b,
                tk32,
                scale,
                has_drop,
                base_row,
                seed,
                doff,
                p,
                dscale,
                no_ds16
            )?;
            // dQ = dS K, dK = dSᵀ Q
            blas::gemm(&self.blas, &head(tq, hs, tk, false, false, ds.ptr, tk, tq * tk, k_b, c, hs, dq_b, c, hs))?;
            blas::gemm(&self.blas, &head(tk, hs, tq, true, false, ds.ptr, tk, tq * tk, q_b, c, hs, dk_b, c, hs))?;
        }
        Ok(())
    }

    // ---- output layer ---------------------------------------------------------------------------
    fn cross_entropy(
        &self,
        logits: ViewMut<'_, CudaBuf>,
        losses: ViewMut<'_, CudaBuf>,
        targets: &[i32],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        let _prof = self.prof("cross_entropy");
        const OP: &str = "cross_entropy";
        let (pl, ploss) = (self.out_f32(OP, &logits)?, self.out_f32(OP, &losses)?);
        let rows = rows_of(OP, "logits", logits.len, vocab)?;
        expect_len(OP, "losses", losses.len, rows)?;
        expect_len(OP, "targets", targets.len(), rows)?;
        if let Some(&t) = targets.iter().find(|&&t| t >= 0 && t as usize >= vocab) {
            return Err(shape_err(OP, format!("target {t} out of range for vocab {vocab}")));
        }
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        self.bind()?;
        let (_t, pt) = self.upload(targets)?;
        let (v, has_grad, s) = (u32c(OP, vocab)?, grad_scale.is_some() as i32, grad_scale.unwrap_or(0.0));
        let cfg = LaunchConfig { grid_dim: (u32c(OP, rows)?, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "cross_entropy", cfg, pl, ploss, pt, v, has_grad, s)
    }

    fn argmax_rows(&self, logits: View<'_, CudaBuf>, vocab: usize) -> Result<Vec<u32>> {
        let _prof = self.prof("argmax_rows");
        const OP: &str = "argmax_rows";
        let rows = rows_of(OP, "logits", logits.len, vocab)?;
        if rows == 0 || vocab == 0 {
            return Ok(Vec::new());
        }
        self.bind()?;
        let x = self.in_f32(OP, logits)?;
        // The indices come back through an f32-typed buffer, bit for bit.
        let idx = self.alloc(DType::F32, rows)?;
        let (pi, px, v) = (idx.ptr, x.ptr, u32c(OP, vocab)?);
        let cfg = LaunchConfig { grid_dim: (u32c(OP, rows)?, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "argmax_rows", cfg, pi, px, v)?;
        Ok(self.to_f32(idx.v())?.into_iter().map(f32::to_bits).collect())
    }

    fn log_softmax(&self, out: ViewMut<'_, CudaBuf>, logits: View<'_, CudaBuf>, vocab: usize) -> Result<()> {
        let _prof = self.prof("log_softmax");
        const OP: &str = "log_softmax";
        let o = self.out_f32(OP, &out)?;
        let rows = rows_of(OP, "logits", logits.len, vocab)?;
        expect_len(OP, "out", out.len, logits.len)?;
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        self.bind()?;
        let x = self.in_f32(OP, logits)?;
        let (px, v) = (x.ptr, u32c(OP, vocab)?);
        let cfg = LaunchConfig { grid_dim: (u32c(OP, rows)?, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "log_softmax", cfg, o, px, v)
    }

    // ---- optimizer ----------------------------------------------------------------------------
    fn adamw(
        &self,
        params: ViewMut<'_, CudaBuf>,
        grads: View<'_, CudaBuf>,
        m: ViewMut<'_, CudaBuf>,
        v: ViewMut<'_, CudaBuf>,
        hp: &AdamW,
    ) -> Result<()> {
        let _prof = self.prof("adamw");
        const OP: &str = "adamw";
        let (pp, pm, pv) = (self.out_f32(OP, &params)?, self.out_f32(OP, &m)?, self.out_f32(OP, &v)?);
        expect_len(OP, "grads", grads.len, params.len)?;
        expect_len(OP, "m", m.len, params.len)?;
        expect_len(OP, "v", v.len, params.len)?;
        if hp.step == 0 {
            return Err(shape_err(OP, "step is 1-based; got 0".into()));
        }
        if params.len == 0 {
            return Ok(());
        }
        self.bind()?;
        let g = self.in_f32(OP, grads)?;
        // The scalar coefficients exactly as the CPU reference computes them.
        let lr = hp.lr as f64;
        let decay = (1.0 - lr * hp.weight_decay as f64) as f32;
        let w1 = (1.0 - hp.beta1 as f64) as f32;
        let b2 = hp.beta2;
        let c2 = (1.0 - hp.beta2 as f64) as f32;
        let bc1 = 1.0 - (hp.beta1 as f64).powf(hp.step as f64);
        let bc2 = 1.0 - (hp.beta2 as f64).powf(hp.step as f64);
        let neg_step = (-lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (pg, n, eps, gs) = (g.ptr, params.len as u64, hp.eps, hp.grad_scale);
        launch!(
            self,
            "adamw",
            self.grid_1d(params.len),
            pp,
            pg,
            pm,
            pv,
            n,
            decay,
            w1,
            b2,
            c2,
            neg_step,
            bc2_sqrt,
            eps,
            gs
        )
    }
}

fn act_code(a: Activation) -> i32 {
    match a {
        Activation::Relu => 0,
        Activation::Gelu => 1,
    }
}

fn check_ids(op: &'static str, ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(shape_err(op, format!("id {id} out of range for {vocab} rows"))),
        None => Ok(()),
    }
}
