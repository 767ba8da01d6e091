//! Producing one planned tensor's bytes, in any dtype, in bounded chunks.
//!
//! A parameter's elements are runs of file tensors (segments); a run is converted by
//! handing opt-checkpoint a [`TensorRef`] over just that byte range, so dtype conversion
//! (rounding to nearest even) is the same code that loads HF files. At most [`CHUNK_ELEMS`]
//! elements are converted at a time, so memory stays bounded however large the tensor.

use std::collections::BTreeSet;

use opt_checkpoint::TensorRef;
use opt_tensor::DType;

use crate::fsdp::{Param, Segment};
use crate::inputs::InputFile;
use crate::plan::{Assembly, Block, PlannedTensor};
use crate::{MetaseqError, Result};

/// Elements converted per chunk (4 MiB of f32).
pub const CHUNK_ELEMS: usize = 1 << 20;

/// A parameter with its segments looked up in the opened files.
struct Resolved<'a> {
    runs: Vec<(TensorRef<'a>, &'a Segment)>,
}

fn resolve<'a>(files: &'a [InputFile], p: &'a Param, name: &str) -> Result<Resolved<'a>> {
    let mut runs = Vec::with_capacity(p.segments.len());
    for s in &p.segments {
        let f = files.get(s.file).ok_or_else(|| MetaseqError::Tensor {
            name: name.to_string(),
            detail: "internal: bad file index".into(),
        })?;
        runs.push((f.ckpt.tensor(&s.key)?, s));
    }
    Ok(Resolved { runs })
}

impl Resolved<'_> {
    /// Converts elements `[start, start + dst.len() / size)` of the parameter into `dst`.
    fn read(&self, start: usize, dst: &mut [u8], dtype: DType) -> Result<()> {
        let esz_out = dtype.size_in_bytes();
        let end = start + dst.len() / esz_out;
        let mut at = 0usize; // parameter element where the current run starts
        let mut filled = 0usize;
        for (t, s) in &self.runs {
            let (a, b) = (start.max(at), end.min(at + s.len));
            if a < b {
                let esz_in = t.dtype.size_in_bits() / 8;
                let from = (s.start + a - at) * esz_in;
                let to = (s.start + b - at) * esz_in;
                let shape = [b - a];
                let sub = TensorRef {
                    name: t.name,
                    dtype: t.dtype,
                    shape: &shape,
                    bytes: t.bytes.get(from..to).ok_or_else(|| MetaseqError::Tensor {
                        name: t.name.to_string(),
                        detail: format!("{}: bytes {from}..{to} lie outside the tensor's data", t.file.display()),
                    })?,
                    file: t.file,
                };
                let out = dst.get_mut(filled * esz_out..(filled + b - a) * esz_out).ok_or_else(|| {
                    MetaseqError::Tensor { name: t.name.to_string(), detail: "internal: destination too small".into() }
                })?;
                sub.read_into(out, dtype)?;
                filled += b - a;
            }
            at += s.len;
            if at >= end {
                break;
            }
        }
        if filled * esz_out != dst.len() {
            return Err(MetaseqError::Tensor {
                name: self.runs.first().map(|(t, _)| t.name.to_string()).unwrap_or_default(),
                detail: format!("internal: read {filled} of {} elements", dst.len() / esz_out),
            });
        }
        Ok(())
    }
}

/// Lets the kernel drop the pages of these files from our resident set.
fn release(files: &[InputFile], used: &BTreeSet<usize>) {
    for &i in used {
        if let Some(f) = files.get(i) {
            f.ckpt.release_pages();
        }
    }
}

fn files_of(blocks: &[Block]) -> BTreeSet<usize> {
    blocks.iter().flat_map(|b| b.param.segments.iter().map(|s| s.file)).collect()
}

/// Streams tensor `t` in `dtype` into `sink`, row-major, at most [`CHUNK_ELEMS`] at a time;
/// with `release_pages`, the input pages are released after each chunk.
pub(crate) fn emit(
    files: &[InputFile],
    t: &PlannedTensor,
    dtype: DType,
    release_pages: bool,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let esz = dtype.size_in_bytes();
    match &t.assembly {
        Assembly::Rows(blocks) => {
            let mut buf = vec![0u8; CHUNK_ELEMS.min(t.numel().max(1)) * esz];
            for b in blocks {
                let r = resolve(files, &b.param, &t.name)?;
                let used = files_of(std::slice::from_ref(b));
                let (first, total) = (b.first_row * b.row_len, b.rows * b.row_len);
                let mut done = 0usize;
                while done < total {
                    let n = (total - done).min(CHUNK_ELEMS);
                    let chunk = &mut buf[..n * esz];
                    r.read(first + done, chunk, dtype)?;
                    sink(chunk)?;
                    if release_pages {
                        release(files, &used);
                    }
                    done += n;
                }
            }
        }
        Assembly::Cols(blocks) => emit_cols(files, t, blocks, dtype, release_pages, sink)?,
    }
    Ok(())
}

/// Dim-1 concatenation: output row r is row r of every block; whole output rows are gathered
/// into the chunk buffer (at least one row, however wide).
fn emit_cols(
    files: &[InputFile],
    t: &PlannedTensor,
    blocks: &[Block],
    dtype: DType,
    release_pages: bool,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let esz = dtype.size_in_bytes();
    let resolved = blocks.iter().map(|b| resolve(files, &b.param, &t.name)).collect::<Result<Vec<_>>>()?;
    let used = files_of(blocks);
    let out_row: usize = blocks.iter().map(|b| b.row_len).sum();
    let rows = blocks.first().map_or(0, |b| b.rows);
    if out_row == 0 || rows == 0 {
        return Ok(());
    }
    let rows_per_chunk = (CHUNK_ELEMS / out_row).clamp(1, rows);
    let mut buf = vec![0u8; rows_per_chunk * out_row * esz];
    let mut r = 0usize;
    while r < rows {
        let n = (rows - r).min(rows_per_chunk);
        let mut at = 0usize;
        for row in r..r + n {
            for (b, res) in blocks.iter().zip(&resolved) {
                let len = b.row_len * esz;
                res.read((b.first_row + row) * b.row_len, &mut buf[at..at + len], dtype)?;
                at += len;
            }
        }
        sink(&buf[..at])?;
        if release_pages {
            release(files, &used);
        }
        r += n;
    }
    Ok(())
}
