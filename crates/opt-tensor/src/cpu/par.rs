//! Parallelism helpers.
//!
//! Two rules keep the CPU backend fast and deterministic:
//! - small problems run on the calling thread (a rayon fork/join costs microseconds, more
//!   than e.g. adding two 768-wide rows during single-token decoding);
//! - reductions split their input into chunks of a *constant* size (never derived from the
//!   number of threads), reduce each chunk sequentially, and combine the chunk results in chunk
//!   order. Scheduling then cannot change a single bit of the result.

use rayon::prelude::*;

/// Below this many elements of work, elementwise kernels run sequentially.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// Elements per parallel task for elementwise kernels.
pub(crate) const ELEM_CHUNK: usize = 1 << 14;

/// Rows per reduction chunk for row-summing reductions (bias/LayerNorm parameter gradients).
/// A constant: part of the definition of the summation order.
pub(crate) const REDUCE_ROWS: usize = 32;

/// Elements per reduction chunk for flat reductions (`sum_squares`). A constant, as above.
pub(crate) const REDUCE_ELEMS: usize = 1 << 14;

/// Rows per task for row-wise kernels over `dim`-wide rows (about [`ELEM_CHUNK`] elements).
pub(crate) fn rows_per_task(dim: usize) -> usize {
    (ELEM_CHUNK / dim.max(1)).max(1)
}

/// Whether work of `elems` elements is worth forking for.
pub(crate) fn worth_parallel(elems: usize, min_par: usize) -> bool {
    elems >= min_par && rayon::current_num_threads() > 1
}

/// Call `f(chunk_index, chunk)` for each `chunk`-sized piece of `data` (the last may be
/// shorter), in parallel when `data.len() >= min_par`.
pub(crate) fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    min_par: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let chunk = chunk.max(1);
    if worth_parallel(data.len(), min_par) {
        data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    }
}
