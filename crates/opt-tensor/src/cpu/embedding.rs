//! Embedding lookup and its (deterministic) scatter-add backward.

use rayon::prelude::*;

use super::memory::widen_into;
use super::par::{self, PAR_MIN_ELEMS};
use super::CpuBuf;
use crate::{Result, TensorError};

/// Every id must index a row of the table.
pub(crate) fn check_ids(op: &'static str, ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(TensorError::Shape { op, detail: format!("id {id} out of range for {vocab} rows") }),
        None => Ok(()),
    }
}

/// `out[r, :] (+)= table[off + ids[r] * dim ..][..dim]`, widening bf16/f16 tables.
pub(crate) fn forward(out: &mut [f32], table: &CpuBuf, off: usize, ids: &[u32], dim: usize, accumulate: bool) {
    if dim == 0 {
        return;
    }
    let rows = par::rows_per_task(dim);
    par::for_each_chunk_mut(out, rows * dim, PAR_MIN_ELEMS, |ci, chunk| {
        let mut tmp = if accumulate { vec![0.0f32; dim] } else { Vec::new() };
        for (r, o) in chunk.chunks_exact_mut(dim).enumerate() {
            let start = off + ids[ci * rows + r] as usize * dim;
            if accumulate {
                widen_into(table, start, &mut tmp);
                o.iter_mut().zip(&tmp).for_each(|(o, t)| *o += t);
            } else {
                widen_into(table, start, o);
            }
        }
    });
}

/// `dtable[ids[r], :] += dout[r, :]`.
///
/// Deterministic: every table row receives its contributions in increasing `r`, on either path.
/// The parallel path sorts row indices by id (a stable sort keeps `r` order within an id) and
/// gives each task a disjoint range of table rows, so no two tasks touch the same row.
pub(crate) fn backward(dtable: &mut [f32], ids: &[u32], dout: &[f32], dim: usize) {
    if dim == 0 || ids.is_empty() {
        return;
    }
    if !par::worth_parallel(dout.len(), PAR_MIN_ELEMS) {
        for (r, &id) in ids.iter().enumerate() {
            let row = &mut dtable[id as usize * dim..(id as usize + 1) * dim];
            row.iter_mut().zip(&dout[r * dim..(r + 1) * dim]).for_each(|(d, g)| *d += g);
        }
        return;
    }
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&r| ids[r]); // stable
    let rows_task = par::rows_per_task(dim);
    dtable.par_chunks_mut(rows_task * dim).enumerate().for_each(|(ci, chunk)| {
        let lo = ci * rows_task;
        let hi = lo + chunk.len() / dim;
        let mut x = order.partition_point(|&r| (ids[r] as usize) < lo);
        while let Some(&r) = order.get(x) {
            let id = ids[r] as usize;
            if id >= hi {
                break;
            }
            let row = &mut chunk[(id - lo) * dim..(id - lo + 1) * dim];
            row.iter_mut().zip(&dout[r * dim..(r + 1) * dim]).for_each(|(d, g)| *d += g);
            x += 1;
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::backend::{Backend, Buffer};
    use crate::cpu::testutil::*;
    use crate::cpu::{CpuBackend, CpuBuf};
    use crate::DType;

    #[test]
    fn forward_gathers_rows_any_dtype() {
        let be = CpuBackend::new();
        let (vocab, dim) = (11, 6);
        let table = randn(1, vocab * dim);
        let ids = [3u32, 0, 10, 3, 7];
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let t = be.from_f32(&table, dt).unwrap();
            let tw = t.to_f32_vec();
            let mut out = out_f32(ids.len() * dim);
            be.embedding_forward(out.vm(), t.v(), &ids, dim, false).unwrap();
            let want: Vec<f32> =
                ids.iter().flat_map(|&id| tw[id as usize * dim..(id as usize + 1) * dim].to_vec()).collect();
            assert_eq!(out.as_f32().unwrap(), &want[..]);
            // accumulate adds on top.
            be.embedding_forward(out.vm(), t.v(), &ids, dim, true).unwrap();
            let twice: Vec<f32> = want.iter().map(|x| x + x).collect();
            assert_eq!(out.as_f32().unwrap(), &twice[..]);
        }
        // A table view that starts inside a larger buffer (e.g. positions offset by 2 in OPT).
        let t = CpuBuf::from_f32_vec(table.clone());
        let mut out = out_f32(dim);
        be.embedding_forward(out.vm(), t.at(2 * dim, 9 * dim), &[1], dim, false).unwrap();
        assert_eq!(out.as_f32().unwrap(), &table[3 * dim..4 * dim]);
        // Out-of-range id and wrong output size are errors.
        assert!(be.embedding_forward(out.vm(), t.v(), &[11], dim, false).is_err());
        assert!(be.embedding_forward(out.vm(), t.v(), &[1, 2], dim, false).is_err());
    }

    #[test]
    fn backward_scatter_adds_and_is_deterministic() {
        let be = CpuBackend::new();
        // Large enough for the parallel path, with many repeated ids.
        let (vocab, dim, n) = (50, 64, 3000);
        let ids: Vec<u32> = (0..n).map(|i| ((i * 7919) % 97 % vocab) as u32).collect();
        let dout = CpuBuf::from_f32_vec(randn(2, n * dim));
        let init = randn(3, vocab * dim);
        let run = || {
            let mut dt = CpuBuf::from_f32_vec(init.clone());
            be.embedding_backward(dt.vm(), &ids, dout.v(), dim).unwrap();
            dt
        };
        let got = run();
        // Naive sequential reference (same order: increasing r) must match bit for bit.
        let d = dout.as_f32().unwrap();
        let mut want = init.clone();
        for (r, &id) in ids.iter().enumerate() {
            for c in 0..dim {
                want[id as usize * dim + c] += d[r * dim + c];
            }
        }
        assert_eq!(got.as_f32().unwrap(), &want[..]);
        let runs = in_pools(|| bits_of(&run()));
        assert!(runs.windows(2).all(|w| w[0] == w[1]));
        // Small problem (sequential path) also matches.
        let mut dt = out_f32(vocab * dim);
        be.embedding_backward(dt.vm(), &ids[..3], dout.at(0, 3 * dim), dim).unwrap();
        let mut want = vec![0.0f32; vocab * dim];
        for (r, &id) in ids[..3].iter().enumerate() {
            for c in 0..dim {
                want[id as usize * dim + c] += d[r * dim + c];
            }
        }
        assert_eq!(dt.as_f32().unwrap(), &want[..]);
        assert!(be.embedding_backward(dt.vm(), &[50], dout.at(0, dim), dim).is_err());
    }
}
