//! Shape and bounds checks, the same rules as the CPU backend's (its helpers are private to
//! opt-tensor). Every device address handed to a kernel is derived from a view checked here.

use opt_tensor::{AttnDims, Dropout, Gemm, Result, TensorError};

pub(crate) fn shape_err(op: &'static str, detail: String) -> TensorError {
    TensorError::Shape { op, detail }
}

/// The window `[off, off + len)` lies inside a buffer of `buf_len` elements.
pub(crate) fn bounds(op: &'static str, buf_len: usize, off: usize, len: usize) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= buf_len => Ok(()),
        _ => Err(shape_err(op, format!("view [{off}, {off}+{len}) exceeds buffer of {buf_len} elements"))),
    }
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

/// `a * b * ...`, erroring instead of overflowing.
pub(crate) fn prod(op: &'static str, factors: &[usize]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| shape_err(op, format!("shape {factors:?} overflows usize")))
}

/// Elements spanned by `batch` problems of `size` elements `stride` apart.
fn extent(batch: usize, stride: usize, size: usize) -> Option<usize> {
    if batch == 0 {
        return Some(0);
    }
    (batch - 1).checked_mul(stride)?.checked_add(size)
}

/// The element extents of a, b and out for a `Gemm` (after checking the operand lengths).
pub(crate) fn gemm(out_len: usize, a_len: usize, b_len: usize, g: &Gemm) -> Result<(usize, usize, usize)> {
    const OP: &str = "matmul";
    if g.batch == 0 {
        return Ok((0, 0, 0));
    }
    let ovf = || shape_err(OP, format!("{g:?} overflows usize"));
    let size = |x: usize, y: usize| x.checked_mul(y).ok_or_else(ovf);
    let (mk, kn, mn) = (size(g.m, g.k)?, size(g.k, g.n)?, size(g.m, g.n)?);
    let need_a = extent(g.batch, g.stride_a, mk).ok_or_else(ovf)?;
    let need_b = extent(g.batch, g.stride_b, kn).ok_or_else(ovf)?;
    let need_o = extent(g.batch, g.stride_out, mn).ok_or_else(ovf)?;
    for (what, len, need) in [("a", a_len, need_a), ("b", b_len, need_b), ("out", out_len, need_o)] {
        if len < need {
            return Err(shape_err(OP, format!("{what} has {len} elements, {g:?} needs at least {need}")));
        }
    }
    Ok((need_a, need_b, need_o))
}

/// Element counts of the attention operands.
pub(crate) struct AttnShapes {
    /// `B * Tq * C`: q, out, dq, dout.
    pub q_len: usize,
    /// `B * Tk * C`: dk, dv (contiguous).
    pub kv_dense_len: usize,
    /// `(B-1) * kv_batch_stride + Tk * C`: the extent read from k and v.
    pub kv_extent: usize,
    /// `B * NH * Tq * Tk`.
    pub probs_len: usize,
}

/// Validate attention dims against the operand lengths (the CPU backend's rules).
pub(crate) fn attention(
    op: &'static str,
    d: &AttnDims,
    q_len: usize,
    k_len: usize,
    v_len: usize,
    key_mask: Option<&[u8]>,
    dropout: Option<&Dropout>,
) -> Result<AttnShapes> {
    let err = |detail: String| shape_err(op, detail);
    let ovf = || err(format!("{d:?} overflows usize"));
    let p = |f: &[usize]| f.iter().try_fold(1usize, |a, &x| a.checked_mul(x)).ok_or_else(ovf);
    if d.heads == 0 || d.head_dim == 0 {
        return Err(err(format!("heads ({}) and head_dim ({}) must be positive", d.heads, d.head_dim)));
    }
    if d.tk == 0 && d.batch * d.tq > 0 {
        return Err(err("queries with no keys (tk == 0)".into()));
    }
    let c = p(&[d.heads, d.head_dim])?;
    let kv_extent = if d.batch == 0 {
        0
    } else {
        p(&[d.batch - 1, d.kv_batch_stride])?.checked_add(p(&[d.tk, c])?).ok_or_else(ovf)?
    };
    let shapes = AttnShapes {
        q_len: p(&[d.batch, d.tq, c])?,
        kv_dense_len: p(&[d.batch, d.tk, c])?,
        kv_extent,
        probs_len: p(&[d.batch, d.heads, d.tq, d.tk])?,
    };
    if q_len != shapes.q_len {
        return Err(err(format!("q has {q_len} elements, expected B*Tq*C = {}", shapes.q_len)));
    }
    for (what, len) in [("k", k_len), ("v", v_len)] {
        if len < kv_extent {
            return Err(err(format!("{what} has {len} elements, needs {kv_extent} ((B-1)*kv_batch_stride + Tk*C)")));
        }
    }
    if let Some(m) = key_mask {
        if m.len() != d.batch * d.tk {
            return Err(err(format!("key_mask has {} entries, expected B*Tk = {}", m.len(), d.batch * d.tk)));
        }
    }
    if let Some(dr) = dropout {
        if !(0.0..1.0).contains(&dr.p) {
            return Err(err(format!("attention dropout probability {} outside [0, 1)", dr.p)));
        }
    }
    Ok(shapes)
}
