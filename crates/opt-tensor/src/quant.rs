//! Weight-only int8 quantization: symmetric absmax, per output channel or group-wise.
//!
//! An [`Int8Matrix`] is a PyTorch-layout weight `W [rows = out, cols = in]` stored as int8
//! codes `q [rows, cols]` plus f32 scales `s [rows, groups]`, where a row is cut into groups of
//! `group_size` consecutive columns (the last one may be shorter) and `group_size = 0` means one
//! group per row (per-output-channel). The weight it stands for is `ŵ[r, c] = q[r, c] · s[r, g]`
//! with `g = c / group_size`, computed in f32 as exactly that one product, so a kernel that
//! dequantizes on the fly reproduces the dequantized matrix bit for bit.
//!
//! Absmax: `s = max |w| / 127` over the group and `q = round(w / s)` in [-127, 127] (-128 is
//! never used, so the code is symmetric), hence `|w − ŵ| ≤ s / 2` up to f32 rounding. An
//! all-zero group gets `s = 0` and `q = 0`.
//!
//! The matrix lives in host memory: the CPU backend reads it directly. A device backend would
//! want a resident copy (an associated buffer type on [`crate::Backend`]); that is for the
//! backend that first implements int8 to add.

use crate::{Result, TensorError};

/// Group sizes must be a multiple of this (so that the 16-wide lanes of the CPU kernels never
/// straddle two groups).
pub const GROUP_ALIGN: usize = 16;

/// An int8 weight with its scales (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Matrix {
    rows: usize,
    cols: usize,
    group_size: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
}

fn shape_err(detail: String) -> TensorError {
    TensorError::Shape { op: "int8 matrix", detail }
}

/// Checks a group size for `cols` columns; returns the effective group length in columns.
pub fn group_len(group_size: usize, cols: usize) -> Result<usize> {
    if group_size == 0 {
        return Ok(cols.max(1));
    }
    if !group_size.is_multiple_of(GROUP_ALIGN) {
        return Err(shape_err(format!("group size {group_size} is not a multiple of {GROUP_ALIGN}")));
    }
    Ok(group_size)
}

impl Int8Matrix {
    /// Wrap codes and scales, checking their lengths: `q` has `rows * cols` elements and
    /// `scales` `rows * ceil(cols / group)`; scales must be finite and non-negative.
    pub fn new(rows: usize, cols: usize, group_size: usize, q: Vec<i8>, scales: Vec<f32>) -> Result<Self> {
        let gl = group_len(group_size, cols)?;
        let numel = rows.checked_mul(cols).ok_or_else(|| shape_err(format!("{rows}x{cols} overflows usize")))?;
        if q.len() != numel {
            return Err(shape_err(format!("{} int8 codes for a {rows}x{cols} matrix", q.len())));
        }
        let want = rows * cols.div_ceil(gl);
        if scales.len() != want {
            return Err(shape_err(format!(
                "{} scales for a {rows}x{cols} matrix with groups of {gl} (expected {want})",
                scales.len()
            )));
        }
        if let Some(i) = scales.iter().position(|s| !s.is_finite() || *s < 0.0) {
            return Err(shape_err(format!("scale {i} is {} (scales must be finite and >= 0)", scales[i])));
        }
        Ok(Int8Matrix { rows, cols, group_size, q, scales })
    }

    /// Absmax-quantize the row-major `w [rows, cols]`. Errors on non-finite weights.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, group_size: usize) -> Result<Self> {
        let gl = group_len(group_size, cols)?;
        if rows.checked_mul(cols) != Some(w.len()) {
            return Err(shape_err(format!("{} weights for a {rows}x{cols} matrix", w.len())));
        }
        if let Some(i) = w.iter().position(|x| !x.is_finite()) {
            return Err(shape_err(format!("weight {i} is {}, which cannot be quantized", w[i])));
        }
        let gpr = cols.div_ceil(gl);
        let mut q = vec![0i8; w.len()];
        let mut scales = vec![0f32; rows * gpr];
        for r in 0..rows {
            for g in 0..gpr {
                let (c0, c1) = (g * gl, ((g + 1) * gl).min(cols));
                let src = &w[r * cols + c0..r * cols + c1];
                let amax = src.iter().fold(0f32, |m, x| m.max(x.abs()));
                let s = amax / 127.0;
                scales[r * gpr + g] = s;
                if s == 0.0 {
                    continue;
                }
                for (d, &x) in q[r * cols + c0..r * cols + c1].iter_mut().zip(src) {
                    *d = (x / s).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Ok(Int8Matrix { rows, cols, group_size, q, scales })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The group size as configured (0 = per output channel).
    pub fn group_size(&self) -> usize {
        self.group_size
    }
    /// Columns per group (`cols` for per-channel scales).
    pub fn group_len(&self) -> usize {
        if self.group_size == 0 {
            self.cols.max(1)
        } else {
            self.group_size
        }
    }
    /// Scales per row.
    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group_len())
    }
    /// The int8 codes `[rows, cols]`.
    pub fn codes(&self) -> &[i8] {
        &self.q
    }
    /// The scales `[rows, groups_per_row]`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// Bytes held: one per code plus four per scale.
    pub fn size_in_bytes(&self) -> usize {
        self.q.len() + 4 * self.scales.len()
    }

    /// Dequantize rows `r0..r0 + out.len() / cols` into `out` (row-major).
    pub fn dequantize_rows_into(&self, r0: usize, out: &mut [f32]) {
        let (cols, gl, gpr) = (self.cols, self.group_len(), self.groups_per_row());
        if cols == 0 {
            return;
        }
        for (i, row) in out.chunks_exact_mut(cols).enumerate() {
            let r = r0 + i;
            let q = &self.q[r * cols..(r + 1) * cols];
            let s = &self.scales[r * gpr..(r + 1) * gpr];
            for (g, (o, q)) in row.chunks_mut(gl).zip(q.chunks(gl)).enumerate() {
                for (o, &q) in o.iter_mut().zip(q) {
                    *o = q as f32 * s[g];
                }
            }
        }
    }

    /// The whole dequantized matrix `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows_into(0, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        // Rows of very different magnitudes, as real weights have.
        (0..len).map(|i| (crate::rng::uniform(seed, i as u64) * 2.0 - 1.0) * (1.0 + (i % 7) as f32)).collect()
    }

    #[test]
    fn absmax_error_is_at_most_half_a_step() {
        let (rows, cols) = (37, 200);
        let w = data(rows * cols, 1);
        for gs in [0, 16, 64, 128] {
            let m = Int8Matrix::quantize(&w, rows, cols, gs).unwrap();
            let gl = m.group_len();
            assert_eq!(m.scales().len(), rows * cols.div_ceil(gl));
            let deq = m.dequantize();
            for r in 0..rows {
                for c in 0..cols {
                    let s = m.scales()[r * m.groups_per_row() + c / gl];
                    let (x, y) = (w[r * cols + c], deq[r * cols + c]);
                    // Half a step, plus f32 rounding of w / s and of q · s.
                    assert!((x - y).abs() <= s * 0.5 * (1.0 + 1e-5) + 1e-7, "gs {gs} ({r},{c}): {x} vs {y}, s {s}");
                }
                // The largest weight of each group lands exactly on ±127.
                for g in 0..m.groups_per_row() {
                    let q = &m.codes()[r * cols + g * gl..r * cols + ((g + 1) * gl).min(cols)];
                    assert_eq!(q.iter().map(|q| q.unsigned_abs()).max(), Some(127), "gs {gs} row {r} group {g}");
                }
            }
        }
    }

    #[test]
    fn zero_groups_and_bad_inputs() {
        let m = Int8Matrix::quantize(&[0.0; 32], 2, 16, 0).unwrap();
        assert_eq!(m.scales(), &[0.0, 0.0]);
        assert_eq!(m.dequantize(), vec![0.0; 32]);
        assert!(Int8Matrix::quantize(&[0.0; 32], 2, 16, 24).unwrap_err().to_string().contains("multiple of 16"));
        assert!(Int8Matrix::quantize(&[f32::NAN; 4], 2, 2, 0).unwrap_err().to_string().contains("NaN"));
        assert!(Int8Matrix::new(2, 16, 0, vec![0; 32], vec![1.0]).unwrap_err().to_string().contains("1 scales"));
        assert!(Int8Matrix::new(2, 16, 0, vec![0; 31], vec![1.0; 2]).unwrap_err().to_string().contains("31 int8"));
        assert!(Int8Matrix::new(1, 16, 0, vec![0; 16], vec![-1.0]).unwrap_err().to_string().contains("-1"));
        // A short last group: 40 columns in groups of 16 → 3 scales per row.
        let m = Int8Matrix::quantize(&data(80, 2), 2, 40, 16).unwrap();
        assert_eq!(m.groups_per_row(), 3);
    }
}
