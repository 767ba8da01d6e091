//! Memory kernels: dtype conversion, fill and (strided) copies.
//!
//! Conversions to bf16/f16 round to nearest even (the `half` crate), so an f32 → bf16 → f32
//! round trip matches `torch.Tensor.to(torch.bfloat16)`. Bounds are checked by the caller.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::par;
use super::CpuBuf;

/// Elements per task for parallel conversions (large enough to amortise rayon's overhead).
const CONVERT_CHUNK: usize = 1 << 16;

/// `dst = src` widened to f32, in parallel for large slices.
fn widen_slice<T: Sync>(dst: &mut [f32], src: &[T], f: impl Fn(&mut [f32], &[T]) + Sync) {
    if dst.len() >= 2 * CONVERT_CHUNK {
        dst.par_chunks_mut(CONVERT_CHUNK).zip(src.par_chunks(CONVERT_CHUNK)).for_each(|(d, s)| f(d, s));
    } else {
        f(dst, src);
    }
}

/// Widen `buf[off .. off + dst.len()]` into `dst`.
pub(crate) fn widen_into(buf: &CpuBuf, off: usize, dst: &mut [f32]) {
    let n = dst.len();
    match buf {
        CpuBuf::F32(v) => dst.copy_from_slice(&v[off..off + n]),
        CpuBuf::BF16(v) => widen_slice(dst, &v[off..off + n], |d, s| s.convert_to_f32_slice(d)),
        CpuBuf::F16(v) => widen_slice(dst, &v[off..off + n], |d, s| s.convert_to_f32_slice(d)),
    }
}

/// `buf[off .. off + len]` widened to a new f32 vector.
pub(crate) fn widen(buf: &CpuBuf, off: usize, len: usize) -> Vec<f32> {
    let mut out = vec![0.0; len];
    widen_into(buf, off, &mut out);
    out
}

/// Store f32 `src` into `buf[off ..]`, rounding to the buffer's dtype.
pub(crate) fn convert_into(buf: &mut CpuBuf, off: usize, src: &[f32]) {
    let n = src.len();
    match buf {
        CpuBuf::F32(v) => v[off..off + n].copy_from_slice(src),
        CpuBuf::BF16(v) => v[off..off + n].convert_from_f32_slice(src),
        CpuBuf::F16(v) => v[off..off + n].convert_from_f32_slice(src),
    }
}

/// `buf[off .. off + len] = value` (rounded to the buffer's dtype).
pub(crate) fn fill(buf: &mut CpuBuf, off: usize, len: usize, value: f32) {
    fn go<T: Copy + Send + Sync>(s: &mut [T], x: T) {
        par::for_each_chunk_mut(s, CONVERT_CHUNK, par::PAR_MIN_ELEMS, |_, c| c.fill(x));
    }
    match buf {
        CpuBuf::F32(v) => go(&mut v[off..off + len], value),
        CpuBuf::BF16(v) => go(&mut v[off..off + len], bf16::from_f32(value)),
        CpuBuf::F16(v) => go(&mut v[off..off + len], f16::from_f32(value)),
    }
}

/// Copy `rows` rows of `cols` elements from `src` (row `r` at `src_off + r * src_stride`) to `out`
/// (row `r` at `out_off + r * out_stride`), converting dtypes. The caller checked bounds and that
/// output rows do not overlap. A plain copy is `rows = 1`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_rows(
    out: &mut CpuBuf,
    out_off: usize,
    out_stride: usize,
    src: &CpuBuf,
    src_off: usize,
    src_stride: usize,
    rows: usize,
    cols: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    // Same-dtype copies are memcpy; f32 → low precision rounds; low precision → f32 widens;
    // bf16 <-> f16 goes through f32 (exact for the widening step).
    let mut tmp = Vec::new();
    for r in 0..rows {
        let (o, s) = (out_off + r * out_stride, src_off + r * src_stride);
        match (&mut *out, src) {
            (CpuBuf::F32(d), CpuBuf::F32(x)) => d[o..o + cols].copy_from_slice(&x[s..s + cols]),
            (CpuBuf::BF16(d), CpuBuf::BF16(x)) => d[o..o + cols].copy_from_slice(&x[s..s + cols]),
            (CpuBuf::F16(d), CpuBuf::F16(x)) => d[o..o + cols].copy_from_slice(&x[s..s + cols]),
            (CpuBuf::F32(d), other) => widen_into(other, s, &mut d[o..o + cols]),
            (d, CpuBuf::F32(x)) => convert_into(d, o, &x[s..s + cols]),
            (d, other) => {
                tmp.resize(cols, 0.0);
                widen_into(other, s, &mut tmp);
                convert_into(d, o, &tmp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, Buffer, View};
    use crate::cpu::CpuBackend;
    use crate::DType;

    #[test]
    fn round_trips_and_rounding() {
        let be = CpuBackend::new();
        let data = [1.0f32, -2.5, 3.140625, 1.0 + 1.0 / 256.0, 65504.0, 1e-3];
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let b = be.from_f32(&data, dt).unwrap();
            assert_eq!(b.dtype(), dt);
            let back = be.to_f32(b.v()).unwrap();
            for (x, y) in data.iter().zip(&back) {
                let want = match dt {
                    DType::F32 => *x,
                    DType::BF16 => bf16::from_f32(*x).to_f32(),
                    DType::F16 => f16::from_f32(*x).to_f32(),
                };
                assert_eq!(*y, want);
            }
        }
        // Round-to-nearest-even: 1 + 2^-8 is a tie in bf16 and rounds to 1.
        let b = be.from_f32(&[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0], DType::BF16).unwrap();
        assert_eq!(be.to_f32(b.v()).unwrap(), vec![1.0, 1.0 + 4.0 / 256.0]);
    }

    #[test]
    fn large_conversion_parallel_path() {
        let n = 3 * CONVERT_CHUNK + 17;
        // Integers below 256 are exact in bf16.
        let data: Vec<f32> = (0..n).map(|i| (i % 256) as f32).collect();
        let b = CpuBuf::from_f32_slice(&data, DType::BF16);
        assert!(b.to_f32_vec() == data);
    }

    #[test]
    fn fill_copy_and_copy_2d() {
        let be = CpuBackend::new();
        let mut a = be.zeros(DType::F32, 6).unwrap();
        be.fill(a.at_mut(1, 3), 2.5).unwrap();
        assert_eq!(a.as_f32().unwrap(), &[0.0, 2.5, 2.5, 2.5, 0.0, 0.0]);
        let mut h = be.zeros(DType::BF16, 6).unwrap();
        be.fill(h.vm(), 1.5).unwrap();
        assert_eq!(h.to_f32_vec(), vec![1.5; 6]);

        // copy f32 -> bf16 and bf16 -> f32 and bf16 -> f16.
        let src = CpuBuf::from_f32_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        be.copy(h.vm(), src.v()).unwrap();
        assert_eq!(h.to_f32_vec(), src.to_f32_vec());
        let mut f = be.zeros(DType::F32, 6).unwrap();
        be.copy(f.vm(), h.v()).unwrap();
        assert_eq!(f.to_f32_vec(), src.to_f32_vec());
        let mut g = be.zeros(DType::F16, 6).unwrap();
        be.copy(g.vm(), h.v()).unwrap();
        assert_eq!(g.to_f32_vec(), src.to_f32_vec());
        assert!(be.copy(f.at_mut(0, 5), h.v()).is_err());

        // copy_2d: gather columns 1..3 of a 3x3 into a 3x2 block with out stride 4.
        let src = CpuBuf::from_f32_vec((0..9).map(|x| x as f32).collect());
        let mut out = be.zeros(DType::F32, 12).unwrap();
        be.copy_2d(out.at_mut(1, 10), 4, src.at(1, 8), 3, 3, 2).unwrap();
        assert_eq!(out.as_f32().unwrap(), &[0.0, 1.0, 2.0, 0.0, 0.0, 4.0, 5.0, 0.0, 0.0, 7.0, 8.0, 0.0]);
        // Too short a view is an error, not a panic.
        assert!(be.copy_2d(out.at_mut(1, 8), 4, src.at(1, 8), 3, 3, 2).is_err());
        // A hand-built view past the end of the buffer is an error too.
        let bad = View { buf: &src, off: 5, len: 10 };
        assert!(be.to_f32(bad).is_err());
    }

    #[test]
    fn cpubuf_helpers() {
        let b = CpuBuf::from_f32_vec(vec![1.0, 2.0]);
        assert_eq!(b.as_bytes(), bytemuck::cast_slice::<f32, u8>(&[1.0, 2.0]));
        let c = CpuBuf::from_le_bytes(DType::F32, b.as_bytes()).unwrap();
        assert_eq!(c, b);
        let h = CpuBuf::from_f32_slice(&[1.0, -2.0], DType::F16);
        assert_eq!(h.as_bytes().len(), 4);
        assert_eq!(CpuBuf::from_le_bytes(DType::F16, h.as_bytes()).unwrap(), h);
        assert!(CpuBuf::from_le_bytes(DType::F32, &[0u8; 6]).is_err());
        assert!(h.as_f32().is_none());
        let mut m = b.clone();
        m.as_f32_mut().unwrap()[0] = 5.0;
        assert_eq!(m.to_f32_vec(), vec![5.0, 2.0]);
    }
}
