//! Element type conversion: F64/F32/BF16/F16 little-endian bytes into f32, bf16 or f16
//! little-endian bytes.
//!
//! Narrowing rounds to nearest, ties to even (the `half` crate's conversions, which also keep
//! NaN a NaN and saturate to infinity like PyTorch's `.to()`). F64 is narrowed directly to
//! bf16/f16 (no double rounding through f32). Same-type conversions are a plain `memcpy`.

use half::{bf16, f16};

use crate::{DType, FileDType};

/// Applies `f` to each `S`-byte element of `src`, writing `D`-byte elements into `dst`.
/// The caller guarantees `src.len() / S == dst.len() / D`.
#[inline]
fn map<const S: usize, const D: usize>(src: &[u8], dst: &mut [u8], f: impl Fn([u8; S]) -> [u8; D]) {
    for (s, d) in src.chunks_exact(S).zip(dst.chunks_exact_mut(D)) {
        let mut a = [0u8; S];
        a.copy_from_slice(s);
        d.copy_from_slice(&f(a));
    }
}

/// Converts `src` (elements of `from`, a readable float type) into `dst` (elements of `to`).
/// The caller has checked the lengths (same element count) and that `from` is a float type;
/// non-float `from` leaves `dst` untouched.
pub(crate) fn convert(src: &[u8], from: FileDType, dst: &mut [u8], to: DType) {
    match (from, to) {
        (FileDType::F32, DType::F32) | (FileDType::BF16, DType::BF16) | (FileDType::F16, DType::F16) => {
            dst.copy_from_slice(src)
        }
        // to f32
        (FileDType::F64, DType::F32) => map(src, dst, |b: [u8; 8]| (f64::from_le_bytes(b) as f32).to_le_bytes()),
        (FileDType::BF16, DType::F32) => map(src, dst, |b: [u8; 2]| bf16::from_le_bytes(b).to_f32().to_le_bytes()),
        (FileDType::F16, DType::F32) => map(src, dst, |b: [u8; 2]| f16::from_le_bytes(b).to_f32().to_le_bytes()),
        // to bf16
        (FileDType::F64, DType::BF16) => {
            map(src, dst, |b: [u8; 8]| bf16::from_f64(f64::from_le_bytes(b)).to_le_bytes())
        }
        (FileDType::F32, DType::BF16) => {
            map(src, dst, |b: [u8; 4]| bf16::from_f32(f32::from_le_bytes(b)).to_le_bytes())
        }
        (FileDType::F16, DType::BF16) => {
            map(src, dst, |b: [u8; 2]| bf16::from_f32(f16::from_le_bytes(b).to_f32()).to_le_bytes())
        }
        // to f16
        (FileDType::F64, DType::F16) => map(src, dst, |b: [u8; 8]| f16::from_f64(f64::from_le_bytes(b)).to_le_bytes()),
        (FileDType::F32, DType::F16) => map(src, dst, |b: [u8; 4]| f16::from_f32(f32::from_le_bytes(b)).to_le_bytes()),
        (FileDType::BF16, DType::F16) => {
            map(src, dst, |b: [u8; 2]| f16::from_f32(bf16::from_le_bytes(b).to_f32()).to_le_bytes())
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_to_bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties to even gives 1.0.
        let x = 1.0f32 + 2f32.powi(-8);
        let mut out = [0u8; 2];
        convert(&x.to_le_bytes(), FileDType::F32, &mut out, DType::BF16);
        assert_eq!(bf16::from_le_bytes(out).to_f32(), 1.0);
        // 1 + 3·2^-8 is halfway between 1.0078125 (odd) and 1.015625 (even): rounds up.
        let x = 1.0f32 + 3.0 * 2f32.powi(-8);
        convert(&x.to_le_bytes(), FileDType::F32, &mut out, DType::BF16);
        assert_eq!(bf16::from_le_bytes(out).to_f32(), 1.015625);
    }

    #[test]
    fn f64_to_f16_direct() {
        let vals = [0.0f64, -1.5, 65504.0, 1e-8, f64::INFINITY];
        let src: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![0u8; vals.len() * 2];
        convert(&src, FileDType::F64, &mut out, DType::F16);
        for (v, o) in vals.iter().zip(out.chunks_exact(2)) {
            assert_eq!(f16::from_le_bytes([o[0], o[1]]), f16::from_f64(*v));
        }
    }
}
