//! Writing safetensors files that HF transformers loads.
//!
//! A file is `u64 LE header length`, the JSON header
//! `{"__metadata__":{"format":"pt"},"<name>":{"dtype":..,"shape":[..],"data_offsets":[b,e]},..}`
//! padded with spaces to a multiple of 8 bytes (so the data section is 8-byte aligned), then
//! the tensors' bytes back to back in the order given.
//!
//! Writes are atomic: the file is written to `<path>.tmp-<pid>` in the same folder, flushed and
//! fsynced, then renamed over `path` (and the folder fsynced, best effort), so a reader sees
//! either the old file or the complete new one, never a partial file.
//!
//! Sharded saving follows `transformers`' `save_pretrained`: tensors are packed in order into
//! shards of at most `max_shard_bytes` (a tensor larger than that gets a shard of its own),
//! named `model-00001-of-0000N.safetensors`, plus `model.safetensors.index.json` with
//! `metadata.total_size` (the sum of tensor bytes), `metadata.total_parameters` (the sum of
//! element counts, as transformers 5 writes) and the sorted `weight_map`, formatted like
//! Python's `json.dumps(index, indent=2, sort_keys=True) + "\n"`.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{io_err, tensor_err, CheckpointError, RawTensorWrite, Result, TensorWrite};

/// Builds the (padded) header for `tensors` and checks names and sizes.
fn header(path: &Path, tensors: &[RawTensorWrite<'_>]) -> Result<Vec<u8>> {
    let heads: Vec<Head<'_>> =
        tensors.iter().map(|t| Head { name: &t.name, dtype: t.dtype, shape: &t.shape, bytes: t.bytes.len() }).collect();
    header_of(path, &heads)
}

/// What the header says of one tensor: its data's length in bytes, not the data.
struct Head<'a> {
    name: &'a str,
    dtype: crate::FileDType,
    shape: &'a [usize],
    bytes: usize,
}

fn header_of(path: &Path, tensors: &[Head<'_>]) -> Result<Vec<u8>> {
    let mut seen = HashSet::new();
    let mut h = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0usize;
    for t in tensors {
        if t.name == "__metadata__" {
            return Err(tensor_err(path, t.name, "the name __metadata__ is reserved"));
        }
        if !seen.insert(t.name) {
            return Err(tensor_err(path, t.name, "appears twice"));
        }
        if !t.dtype.size_in_bits().is_multiple_of(8) {
            return Err(tensor_err(path, t.name, format!("writing {} (sub-byte) tensors is not supported", t.dtype)));
        }
        let elem = t.dtype.size_in_bits() / 8;
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| tensor_err(path, t.name, format!("shape {:?} overflows", t.shape)))?;
        let want = numel.checked_mul(elem);
        if want != Some(t.bytes) {
            return Err(tensor_err(
                path,
                t.name,
                format!("has {} bytes, but shape {:?} of {} needs {} × {}", t.bytes, t.shape, t.dtype, numel, elem),
            ));
        }
        let end = offset + t.bytes;
        let name = serde_json::to_string(t.name)
            .map_err(|e| tensor_err(path, t.name, format!("name cannot be encoded: {e}")))?;
        let shape = t.shape.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        h.push_str(&format!(
            r#",{name}:{{"dtype":"{}","shape":[{shape}],"data_offsets":[{offset},{end}]}}"#,
            t.dtype.safetensors_name()
        ));
        offset = end;
    }
    h.push('}');
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let mut out = Vec::with_capacity(8 + h.len());
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    Ok(out)
}

/// Writes `contents` to `path` atomically (temporary file in the same folder, fsync, rename).
fn write_atomic(path: &Path, contents: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io_err(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path")))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| -> std::io::Result<()> {
        let f = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        contents(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    // Make the rename durable (best effort: not every platform can fsync a directory).
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Write tensors as one safetensors file (with `{"format": "pt"}` metadata, as HF writes),
/// atomically (temporary file + rename).
pub fn save_safetensors(path: &Path, tensors: &[TensorWrite<'_>]) -> Result<()> {
    let raw: Vec<RawTensorWrite<'_>> = tensors
        .iter()
        .map(|t| RawTensorWrite { name: t.name.clone(), dtype: t.dtype.into(), shape: t.shape.clone(), bytes: t.bytes })
        .collect();
    save_safetensors_raw(path, &raw)
}

/// [`save_safetensors`] for tensors of any (whole-byte) safetensors dtype, e.g. the `I8` codes
/// of a quantized model.
pub fn save_safetensors_raw(path: &Path, tensors: &[RawTensorWrite<'_>]) -> Result<()> {
    let header = header(path, tensors)?;
    write_atomic(path, |w| {
        w.write_all(&header)?;
        for t in tensors {
            w.write_all(t.bytes)?;
        }
        Ok(())
    })
}

/// A safetensors file of flat f32 tensors `(name, length)` whose data `fill(i)` produces in
/// order, one at a time: only one tensor's data is in memory at once (a training shard's
/// parameters and AdamW moments). Written atomically like [`save_safetensors`].
pub fn save_safetensors_f32_streamed(
    path: &Path,
    tensors: &[(String, usize)],
    fill: &mut dyn FnMut(usize) -> std::io::Result<Vec<f32>>,
) -> Result<()> {
    let shapes: Vec<[usize; 1]> = tensors.iter().map(|t| [t.1]).collect();
    let heads: Vec<Head<'_>> = tensors
        .iter()
        .zip(&shapes)
        .map(|(t, sh)| Head { name: &t.0, dtype: crate::FileDType::F32, shape: sh, bytes: t.1 * 4 })
        .collect();
    let header = header_of(path, &heads)?;
    write_atomic(path, |w| {
        w.write_all(&header)?;
        for (i, (name, len)) in tensors.iter().enumerate() {
            let x = fill(i)?;
            if x.len() != *len {
                return Err(std::io::Error::other(format!("{name}: {} values for a tensor of {len}", x.len())));
            }
            w.write_all(bytemuck::cast_slice(&x))?;
        }
        Ok(())
    })
}

/// Write tensors as HF-style sharded safetensors in `dir`: `model-0000k-of-0000n.safetensors`
/// (each at most `max_shard_bytes` of tensor data, except that a single larger tensor gets a
/// shard of its own; tensors keep the given order) and `model.safetensors.index.json`.
///
/// Always writes the sharded layout, even for a single shard (`model-00001-of-00001`). Files
/// of an earlier save that would shadow or confuse the new one — `model.safetensors` (which
/// [`Checkpoint::open`](crate::Checkpoint::open) prefers over an index) and
/// `model-*-of-*.safetensors` shards not written now — are removed after the new files are in
/// place. Returns the paths written: the shards in order, then the index.
pub fn save_safetensors_sharded(dir: &Path, tensors: &[TensorWrite<'_>], max_shard_bytes: u64) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    // Pack in order.
    let mut groups: Vec<Vec<&TensorWrite<'_>>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let size = t.bytes.len() as u64;
        let last = groups.len() - 1;
        if !groups[last].is_empty() && current.saturating_add(size) > max_shard_bytes {
            groups.push(Vec::new());
            current = 0;
        }
        current = current.saturating_add(size);
        if let Some(g) = groups.last_mut() {
            g.push(t);
        }
    }
    let n = groups.len();
    let index_path = dir.join(crate::SAFETENSORS_INDEX);

    let mut seen = HashSet::new();
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(tensor_err(&index_path, &t.name, "appears twice"));
        }
    }

    let mut written = Vec::with_capacity(n + 1);
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0u64;
    let mut total_parameters = 0u64;
    for (i, group) in groups.into_iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let path = dir.join(&name);
        let owned: Vec<TensorWrite<'_>> = group
            .iter()
            .map(|t| TensorWrite { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), bytes: t.bytes })
            .collect();
        save_safetensors(&path, &owned)?;
        for t in &owned {
            total_size += t.bytes.len() as u64;
            total_parameters += t.shape.iter().product::<usize>() as u64;
            weight_map.insert(t.name.clone(), name.clone());
        }
        written.push(path);
    }

    let index = serde_json::json!({
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": weight_map,
    });
    let mut text = serde_json::to_string_pretty(&index).map_err(|e| CheckpointError::Corrupt {
        path: index_path.clone(),
        detail: format!("cannot encode index: {e}"),
    })?;
    text.push('\n');
    write_atomic(&index_path, |w| w.write_all(text.as_bytes()))?;

    // Remove stale weights from an earlier save.
    let keep: HashSet<PathBuf> = written.iter().cloned().collect();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let fname = e.file_name().to_string_lossy().into_owned();
            let stale_shard = fname.starts_with("model-")
                && fname.ends_with(".safetensors")
                && fname.contains("-of-")
                && !keep.contains(&e.path());
            if fname == crate::SAFETENSORS || stale_shard {
                fs::remove_file(e.path()).map_err(|err| io_err(&e.path(), err))?;
            }
        }
    }
    written.push(index_path);
    Ok(written)
}
