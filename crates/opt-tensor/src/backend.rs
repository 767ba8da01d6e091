//! The kernel boundary. Model code is written against [`Backend`] only; the CPU
//! implementation ([`crate::cpu::CpuBackend`]) is the reference, and a CUDA implementation
//! fills in the same trait without touching model code.
//!
//! Conventions shared by every kernel:
//! - All matrices are row-major and contiguous unless a stride says otherwise.
//! - Buffers carry a dtype. Inputs may be f32, bf16 or f16 (weights stored in low precision);
//!   outputs, activations and gradients are f32. On CPU, low-precision inputs are widened to f32
//!   and all arithmetic is f32.
//! - "Accumulate" means `out += ...`; otherwise `out = ...`.
//! - Every reduction is deterministic: the same inputs give the same bits whatever the thread
//!   scheduling (fixed chunking, fixed summation order). Training resume is checked bit for bit.
//! - Shape legend: N = rows (B*T), C = channels, V = vocab, B = batch, T = time,
//!   NH = heads, HS = head size (C / NH).

use crate::{DType, Int8Matrix, Result, TensorError};

/// A read-only window `[off, off + len)` (in elements) of a backend buffer.
pub struct View<'a, T: ?Sized> {
    pub buf: &'a T,
    pub off: usize,
    pub len: usize,
}

/// A writable window `[off, off + len)` (in elements) of a backend buffer.
pub struct ViewMut<'a, T: ?Sized> {
    pub buf: &'a mut T,
    pub off: usize,
    pub len: usize,
}

impl<T: ?Sized> Clone for View<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for View<'_, T> {}

impl<'a, T: ?Sized> View<'a, T> {
    pub fn new(buf: &'a T, off: usize, len: usize) -> Self {
        View { buf, off, len }
    }
    /// A sub-window relative to this one.
    pub fn sub(&self, off: usize, len: usize) -> Self {
        assert!(off + len <= self.len, "view out of range: {off}+{len} > {}", self.len);
        View { buf: self.buf, off: self.off + off, len }
    }
}

impl<'a, T: ?Sized> ViewMut<'a, T> {
    pub fn new(buf: &'a mut T, off: usize, len: usize) -> Self {
        ViewMut { buf, off, len }
    }
    /// Reborrow (so a `ViewMut` can be passed to several calls in turn).
    pub fn rb(&mut self) -> ViewMut<'_, T> {
        ViewMut { buf: &mut *self.buf, off: self.off, len: self.len }
    }
    /// A writable sub-window relative to this one.
    pub fn sub(&mut self, off: usize, len: usize) -> ViewMut<'_, T> {
        assert!(off + len <= self.len, "view out of range: {off}+{len} > {}", self.len);
        ViewMut { buf: &mut *self.buf, off: self.off + off, len }
    }
    pub fn as_view(&self) -> View<'_, T> {
        View { buf: &*self.buf, off: self.off, len: self.len }
    }
}

/// Buffers of a backend know their element count and dtype.
pub trait Buffer: Send + Sync {
    fn len(&self) -> usize;
    fn dtype(&self) -> DType;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The whole buffer as a view.
    fn v(&self) -> View<'_, Self> {
        View { buf: self, off: 0, len: self.len() }
    }
    /// The whole buffer as a writable view.
    fn vm(&mut self) -> ViewMut<'_, Self> {
        let len = self.len();
        ViewMut { buf: self, off: 0, len }
    }
    /// A window of the buffer.
    fn at(&self, off: usize, len: usize) -> View<'_, Self> {
        assert!(off + len <= self.len(), "view out of range: {off}+{len} > {}", self.len());
        View { buf: self, off, len }
    }
    /// A writable window of the buffer.
    fn at_mut(&mut self, off: usize, len: usize) -> ViewMut<'_, Self> {
        assert!(off + len <= self.len(), "view out of range: {off}+{len} > {}", self.len());
        ViewMut { buf: self, off, len }
    }
}

/// Matrix-multiply shape: `out[b] = alpha * op(a[b]) · op(b[b]) + beta * out[b]` for each of
/// `batch` problems. `op(a)` is m×k (a stored k×m when `trans_a`), `op(b)` is k×n (b stored n×k
/// when `trans_b`), out is m×n. All row-major; `stride_*` are element offsets between batches.
///
/// A linear layer `y = x Wᵀ` (W is out×in, as in PyTorch) is `a = x (N×in)`,
/// `b = W` with `trans_b = true`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_out: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// A single (non-batched) product `out = op(a) · op(b)`.
    pub fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Self {
        Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_out: m * n,
            alpha: 1.0,
            beta: 0.0,
        }
    }
    /// `out += op(a) · op(b)` instead of `=`.
    pub fn accumulate(mut self) -> Self {
        self.beta = 1.0;
        self
    }
}

/// Elementwise activation functions OPT uses (`activation_function` in config.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// Exact GELU, `x * Φ(x)` with the error function (PyTorch `gelu`, HF "gelu").
    Gelu,
}

/// Dropout parameters. The keep mask is a pure function of `(seed, offset + element index)`
/// through [`crate::rng::uniform`], so the backward pass regenerates it instead of storing it,
/// and CPU and CUDA draw the same mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    pub offset: u64,
}

/// Attention shapes. Queries `q` are `[B, Tq, C]`; keys/values `k`, `v` are `[B, Tk, C]` rows
/// taken with a batch stride of `kv_batch_stride` elements (so a KV cache of capacity `Tmax`
/// uses `kv_batch_stride = Tmax * C` and `tk` = filled length). Query `i` sits at absolute
/// position `q_offset + i` and attends to keys `j <= q_offset + i` whose `key_mask[b * tk + j]`
/// is non-zero (causal + padding mask). `C = heads * head_dim`; head `h` is columns
/// `h*HS..(h+1)*HS`. Output `[B, Tq, C]`. Saved probabilities are `[B, NH, Tq, Tk]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnDims {
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub q_offset: usize,
    pub kv_batch_stride: usize,
    /// Multiplier applied to `q·k` before the softmax (OPT: `head_dim^-0.5`).
    pub scale: f32,
}

impl AttnDims {
    pub fn channels(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// AdamW hyper-parameters for one step (PyTorch `torch.optim.AdamW` semantics: decoupled weight
/// decay `p -= lr * wd * p`, bias-corrected moments, `eps` added to `sqrt(v_hat)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number (for bias correction).
    pub step: u64,
    /// Gradients are multiplied by this before use (gradient clipping / loss-scale undo).
    pub grad_scale: f32,
}

/// The kernels OPT needs, each with its backward. See the module docs for conventions.
/// Views index elements of the buffer; lengths are checked by implementations.
pub trait Backend: Send + Sync {
    type Buf: Buffer;

    /// A short name for messages ("cpu", "cuda:0").
    fn name(&self) -> String;
    /// Device memory in use now, in bytes, where the backend can tell (benchmarks' memory
    /// figure); `None` on the CPU.
    fn memory_in_use(&self) -> Option<u64> {
        None
    }
    /// Mixed-precision hint, set by a model whose weights are stored in `dtype` (bf16/f16), or
    /// `None` for f32: kernels may then round activations to that type where torch's autocast
    /// would (a GPU runs attention's two products on tensor cores). The CPU backend, the
    /// reference, computes in f32 regardless.
    fn set_mixed_precision(&self, _dtype: Option<DType>) {}
    /// Rows of logits the fused training loss computes at once: bounds the logits buffer to
    /// `rows × vocab` floats. Small on the CPU (cache-sized); a GPU wants fewer, larger products.
    fn loss_chunk_rows(&self) -> usize {
        128
    }

    // ---- memory -------------------------------------------------------------------------
    /// A zero-filled buffer.
    fn zeros(&self, dtype: DType, len: usize) -> Result<Self::Buf>;
    /// Upload f32 host data, converting to `dtype` (round-to-nearest-even for bf16/f16).
    #[allow(clippy::wrong_self_convention)] // a backend method, not a conversion constructor
    fn from_f32(&self, data: &[f32], dtype: DType) -> Result<Self::Buf>;
    /// Download a window as f32.
    fn to_f32(&self, src: View<'_, Self::Buf>) -> Result<Vec<f32>>;
    /// `out[i] = value`.
    fn fill(&self, out: ViewMut<'_, Self::Buf>, value: f32) -> Result<()>;
    /// `out = src` (lengths equal), converting dtypes.
    fn copy(&self, out: ViewMut<'_, Self::Buf>, src: View<'_, Self::Buf>) -> Result<()>;
    /// Strided 2-D copy: `rows` rows of `cols` elements, row `r` of src at `r*src_stride`, of
    /// out at `r*out_stride` (used for KV-cache writes and gathering last positions).
    #[allow(clippy::too_many_arguments)]
    fn copy_2d(
        &self,
        out: ViewMut<'_, Self::Buf>,
        out_stride: usize,
        src: View<'_, Self::Buf>,
        src_stride: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    // ---- dense algebra ----------------------------------------------------------------------
    /// A linear layer: `out[rows, out_dim] = x[rows, in_dim] · wᵀ (+ bias)` with `w` stored
    /// `[out_dim, in_dim]` (PyTorch's layout). The default is [`Backend::matmul`] then
    /// [`Backend::bias_add`]; a backend may fuse them (a GPU's decoding steps, where `rows` is a
    /// handful and every launch counts).
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        mut out: ViewMut<'_, Self::Buf>,
        x: View<'_, Self::Buf>,
        w: View<'_, Self::Buf>,
        bias: Option<View<'_, Self::Buf>>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        self.matmul(out.rb(), x, w, &Gemm::new(rows, out_dim, in_dim, false, true))?;
        match bias {
            Some(b) => self.bias_add(out, b, out_dim),
            None => Ok(()),
        }
    }
    /// Three linear layers of the same shape over the same input (attention's q, k and v):
    /// `outs[i] = x · ws[i]ᵀ (+ biases[i])`. The default is three [`Backend::linear`] calls; a
    /// GPU decoding step runs them as one launch.
    #[allow(clippy::too_many_arguments)]
    fn linear3(
        &self,
        outs: [ViewMut<'_, Self::Buf>; 3],
        x: View<'_, Self::Buf>,
        ws: [View<'_, Self::Buf>; 3],
        biases: [Option<View<'_, Self::Buf>>; 3],
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        for ((out, w), b) in outs.into_iter().zip(ws).zip(biases) {
            self.linear(out, x, w, b, rows, in_dim, out_dim)?;
        }
        Ok(())
    }
    /// A linear layer and its activation: `pre = x · wᵀ (+ bias)`, `out = act(pre)` (both kept:
    /// the backward pass reads `pre`). The default is [`Backend::linear`] then
    /// [`Backend::activation_forward`].
    #[allow(clippy::too_many_arguments)]
    fn linear_act(
        &self,
        mut pre: ViewMut<'_, Self::Buf>,
        out: ViewMut<'_, Self::Buf>,
        x: View<'_, Self::Buf>,
        w: View<'_, Self::Buf>,
        bias: Option<View<'_, Self::Buf>>,
        act: Activation,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        self.linear(pre.rb(), x, w, bias, rows, in_dim, out_dim)?;
        self.activation_forward(act, out, pre.as_view())
    }
    /// A linear layer added to a residual stream: `out = residual + (x · wᵀ (+ bias))`, with
    /// `tmp` as scratch for the product. The default is [`Backend::linear`] into `tmp` then
    /// [`Backend::add`].
    #[allow(clippy::too_many_arguments)]
    fn linear_residual(
        &self,
        out: ViewMut<'_, Self::Buf>,
        mut tmp: ViewMut<'_, Self::Buf>,
        x: View<'_, Self::Buf>,
        w: View<'_, Self::Buf>,
        bias: Option<View<'_, Self::Buf>>,
        residual: View<'_, Self::Buf>,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<()> {
        self.linear(tmp.rb(), x, w, bias, rows, in_dim, out_dim)?;
        self.add(out, residual, tmp.as_view())
    }
    /// Batched, optionally transposed matrix multiply (see [`Gemm`]). `a` and `b` may be any
    /// dtype; `out` is f32.
    fn matmul(
        &self,
        out: ViewMut<'_, Self::Buf>,
        a: View<'_, Self::Buf>,
        b: View<'_, Self::Buf>,
        g: &Gemm,
    ) -> Result<()>;
    /// Weight-only int8 linear: `out [rows, w.rows()] = x [rows, w.cols()] · ŵᵀ` where `ŵ` is the
    /// dequantized weight (see [`crate::quant`]); `out` is f32. Inference only (no backward).
    /// Backends without int8 kernels keep this default, an `Unsupported` error.
    fn matmul_int8(&self, out: ViewMut<'_, Self::Buf>, x: View<'_, Self::Buf>, w: &Int8Matrix) -> Result<()> {
        let _ = (out, x, w);
        Err(TensorError::Unsupported { op: "matmul_int8", backend: self.name() })
    }
    /// `out[r, :] (+)= ŵ[ids[r], :]` for an int8 embedding table (`out [ids.len(), w.cols()]`).
    /// Default: an `Unsupported` error.
    fn embedding_int8(
        &self,
        out: ViewMut<'_, Self::Buf>,
        table: &Int8Matrix,
        ids: &[u32],
        accumulate: bool,
    ) -> Result<()> {
        let _ = (out, table, ids, accumulate);
        Err(TensorError::Unsupported { op: "embedding_int8", backend: self.name() })
    }
    /// `out[r, c] += bias[c]` for `out` of shape `[rows, dim]`.
    fn bias_add(&self, out: ViewMut<'_, Self::Buf>, bias: View<'_, Self::Buf>, dim: usize) -> Result<()>;
    /// `dbias[c] += sum_r dout[r, c]` (deterministic).
    fn bias_backward(&self, dbias: ViewMut<'_, Self::Buf>, dout: View<'_, Self::Buf>, dim: usize) -> Result<()>;
    /// `out = a + b`.
    fn add(&self, out: ViewMut<'_, Self::Buf>, a: View<'_, Self::Buf>, b: View<'_, Self::Buf>) -> Result<()>;
    /// `out += a`.
    fn add_assign(&self, out: ViewMut<'_, Self::Buf>, a: View<'_, Self::Buf>) -> Result<()>;
    /// `out *= s`.
    fn scale(&self, out: ViewMut<'_, Self::Buf>, s: f32) -> Result<()>;
    /// `sum_i x[i]^2` in f64, deterministic (for gradient norms).
    fn sum_squares(&self, x: View<'_, Self::Buf>) -> Result<f64>;

    // ---- embeddings -------------------------------------------------------------------------
    /// `out[r, :] (+)= table[ids[r], :]` for `out` of shape `[ids.len(), dim]`.
    fn embedding_forward(
        &self,
        out: ViewMut<'_, Self::Buf>,
        table: View<'_, Self::Buf>,
        ids: &[u32],
        dim: usize,
        accumulate: bool,
    ) -> Result<()>;
    /// `dtable[ids[r], :] += dout[r, :]`, deterministic (rows with equal ids summed in order).
    fn embedding_backward(
        &self,
        dtable: ViewMut<'_, Self::Buf>,
        ids: &[u32],
        dout: View<'_, Self::Buf>,
        dim: usize,
    ) -> Result<()>;

    // ---- normalisation ------------------------------------------------------------------------
    /// LayerNorm over the last dim of `inp [rows, dim]`: `out = (x - mean) * rstd * w + b`, with
    /// `w`/`b` optional (non-affine LN when `None`). Saves `mean[rows]`, `rstd[rows]`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: ViewMut<'_, Self::Buf>,
        mean: ViewMut<'_, Self::Buf>,
        rstd: ViewMut<'_, Self::Buf>,
        inp: View<'_, Self::Buf>,
        weight: Option<View<'_, Self::Buf>>,
        bias: Option<View<'_, Self::Buf>>,
        dim: usize,
        eps: f32,
    ) -> Result<()>;
    /// LayerNorm backward. `dinp += ...`; `dweight`/`dbias` accumulate (deterministic).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: ViewMut<'_, Self::Buf>,
        dweight: Option<ViewMut<'_, Self::Buf>>,
        dbias: Option<ViewMut<'_, Self::Buf>>,
        dout: View<'_, Self::Buf>,
        inp: View<'_, Self::Buf>,
        weight: Option<View<'_, Self::Buf>>,
        mean: View<'_, Self::Buf>,
        rstd: View<'_, Self::Buf>,
        dim: usize,
    ) -> Result<()>;

    // ---- activations and dropout ------------------------------------------------------------
    /// `out = act(inp)`.
    fn activation_forward(&self, act: Activation, out: ViewMut<'_, Self::Buf>, inp: View<'_, Self::Buf>) -> Result<()>;
    /// `dinp = act'(inp) * dout` (overwrites `dinp`).
    fn activation_backward(
        &self,
        act: Activation,
        dinp: ViewMut<'_, Self::Buf>,
        inp: View<'_, Self::Buf>,
        dout: View<'_, Self::Buf>,
    ) -> Result<()>;
    /// In place: `x[i] = keep(i) ? x[i] / (1 - p) : 0` with the mask of [`Dropout`]. The backward
    /// pass is the same call on the gradient with the same parameters.
    fn dropout(&self, x: ViewMut<'_, Self::Buf>, d: &Dropout) -> Result<()>;

    // ---- attention ----------------------------------------------------------------------------
    /// Causal self-attention with a key padding mask (see [`AttnDims`]). When `probs` is given
    /// the softmax probabilities (before dropout) are saved there for the backward pass.
    /// `key_mask` has `batch * tk` entries (1 = attend, 0 = padding); `None` = all ones.
    /// A query row whose causal keys are all masked (a left-padding position) gets uniform
    /// weights over *all* `tk` keys: HF's eager path adds `finfo(f32).min` for every masked
    /// entry, so such a row's scores all round to the same value. The backward pass then uses
    /// the saved probabilities over all `tk` keys (no re-masking), as autograd does.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: ViewMut<'_, Self::Buf>,
        probs: Option<ViewMut<'_, Self::Buf>>,
        q: View<'_, Self::Buf>,
        k: View<'_, Self::Buf>,
        v: View<'_, Self::Buf>,
        key_mask: Option<&[u8]>,
        dims: &AttnDims,
        dropout: Option<&Dropout>,
    ) -> Result<()>;
    /// Attention backward from the saved probabilities. Overwrites `dq`, `dk`, `dv`
    /// (`dk`/`dv` are `[B, Tk, C]` contiguous, i.e. `kv_batch_stride == tk * C` in training).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: ViewMut<'_, Self::Buf>,
        dk: ViewMut<'_, Self::Buf>,
        dv: ViewMut<'_, Self::Buf>,
        dout: View<'_, Self::Buf>,
        q: View<'_, Self::Buf>,
        k: View<'_, Self::Buf>,
        v: View<'_, Self::Buf>,
        probs: View<'_, Self::Buf>,
        dims: &AttnDims,
        dropout: Option<&Dropout>,
    ) -> Result<()>;

    // ---- output layer -------------------------------------------------------------------------
    /// Fused softmax cross-entropy over `logits [rows, vocab]` (in place). Writes
    /// `losses[r] = -log softmax(logits[r])[targets[r]]`, or 0 where `targets[r] < 0` (ignore
    /// index). When `grad_scale` is `Some(s)`, overwrites the logits with
    /// `s * (softmax - onehot)` (zero for ignored rows), so no separate probability buffer is kept.
    fn cross_entropy(
        &self,
        logits: ViewMut<'_, Self::Buf>,
        losses: ViewMut<'_, Self::Buf>,
        targets: &[i32],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()>;
    /// Row-wise `out = log_softmax(logits)` for `[rows, vocab]`.
    fn log_softmax(&self, out: ViewMut<'_, Self::Buf>, logits: View<'_, Self::Buf>, vocab: usize) -> Result<()>;
    /// The index of each row's largest value in `logits [rows, vocab]`, the first one on ties
    /// (rows are assumed free of NaN): greedy decoding's choice. The default reads the logits back to the
    /// host; a GPU computes it in place and returns `rows` integers.
    fn argmax_rows(&self, logits: View<'_, Self::Buf>, vocab: usize) -> Result<Vec<u32>> {
        if vocab == 0 || !logits.len.is_multiple_of(vocab) {
            return Err(crate::TensorError::Shape {
                op: "argmax_rows",
                detail: format!("{} logits are not rows of {vocab}", logits.len),
            });
        }
        let host = self.to_f32(logits)?;
        Ok(host
            .chunks(vocab)
            .map(|row| {
                let mut best = 0;
                for (i, &x) in row.iter().enumerate() {
                    if x > row[best] {
                        best = i;
                    }
                }
                best as u32
            })
            .collect())
    }

    // ---- optimizer ----------------------------------------------------------------------------
    /// One AdamW step over a window: params (f32 master copy), grads, first and second moments.
    fn adamw(
        &self,
        params: ViewMut<'_, Self::Buf>,
        grads: View<'_, Self::Buf>,
        m: ViewMut<'_, Self::Buf>,
        v: ViewMut<'_, Self::Buf>,
        hp: &AdamW,
    ) -> Result<()>;
}
