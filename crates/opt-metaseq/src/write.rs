//! Converting to an HF folder by streaming: `config.json` plus `model.safetensors`, or
//! `model-0000k-of-0000n.safetensors` shards with `model.safetensors.index.json` when the
//! weights exceed the shard size.
//!
//! A safetensors header lists every tensor's dtype, shape and byte range, and all of that
//! follows from the plan's shapes, so each file's header is written first and the tensors'
//! data appended one tensor at a time, chunk by chunk, straight from the input files. After
//! each chunk the input files' pages are released, so resident memory stays at about one
//! chunk (plus the plan) whatever the model's size. Files are written under a temporary name,
//! fsynced and renamed, so an interrupted conversion never leaves a valid-looking partial
//! file; the shard layout and index format are those of opt-checkpoint's
//! `save_safetensors_sharded` (and of HF's `save_pretrained`).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use opt_tensor::DType;

use crate::plan::PlannedTensor;
use crate::{io_err, MetaseqCheckpoint, MetaseqError, Result};

/// How to convert.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Output dtype; `None` keeps the checkpoint's own (f16 for the OPT release).
    pub dtype: Option<DType>,
    /// Largest shard of tensor data; a larger model is split into several files.
    pub max_shard_bytes: u64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            dtype: None,
            // transformers' default `max_shard_size` ("5GB").
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// What a conversion wrote.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    /// Weight files, then the index (if sharded), then `config.json`.
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    pub dtype: DType,
    /// metaseq keys left out, with why.
    pub dropped: Vec<String>,
}

/// One output tensor: its name in the file (`model.decoder...` or `lm_head.weight`).
struct Out<'a> {
    name: String,
    t: &'a PlannedTensor,
    bytes: u64,
}

fn file_key(t: &PlannedTensor) -> String {
    if t.name.starts_with("lm_head") {
        t.name.clone()
    } else {
        format!("model.{}", t.name)
    }
}

/// The safetensors header for `tensors` (8-byte length, JSON, space padding to 8 bytes).
fn header(tensors: &[Out<'_>], dtype: DType) -> Result<Vec<u8>> {
    let mut h = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0u64;
    for o in tensors {
        let name = serde_json::to_string(&o.name).map_err(|e| MetaseqError::Tensor {
            name: o.name.clone(),
            detail: format!("name cannot be encoded: {e}"),
        })?;
        let shape = o.t.shape.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let end = offset + o.bytes;
        h.push_str(&format!(
            r#",{name}:{{"dtype":"{}","shape":[{shape}],"data_offsets":[{offset},{end}]}}"#,
            dtype.safetensors_name()
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

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes one safetensors file: header, then each tensor streamed from the checkpoint.
fn write_file(
    ck: &MetaseqCheckpoint,
    path: &Path,
    tensors: &[Out<'_>],
    dtype: DType,
    progress: &mut dyn FnMut(&PlannedTensor),
) -> Result<()> {
    let tmp = tmp_path(path);
    let result = (|| -> Result<()> {
        let f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 22, f);
        w.write_all(&header(tensors, dtype)?).map_err(|e| io_err(&tmp, e))?;
        for o in tensors {
            let mut written = 0u64;
            ck.stream(o.t, dtype, &mut |b| {
                written += b.len() as u64;
                w.write_all(b).map_err(|e| io_err(&tmp, e))
            })?;
            // The header promised exactly this many bytes.
            if written != o.bytes {
                return Err(MetaseqError::Tensor {
                    name: o.name.clone(),
                    detail: format!("internal: wrote {written} bytes, expected {}", o.bytes),
                });
            }
            progress(o.t);
        }
        let f = w.into_inner().map_err(|e| io_err(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| io_err(path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = tmp_path(path);
    let r = fs::write(&tmp, text).and_then(|_| fs::rename(&tmp, path));
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path, e));
    }
    Ok(())
}

/// Converts an opened metaseq checkpoint into an HF folder at `out_dir` (created if needed):
/// `config.json` and safetensors weights, streamed tensor by tensor. `progress` is called after
/// each tensor is written.
///
/// Weight files of an earlier conversion that would shadow or confuse the new ones
/// (`model.safetensors`, `model-*-of-*.safetensors`, the index) are removed once the new files
/// are in place.
pub fn convert(
    ck: &MetaseqCheckpoint,
    out_dir: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(&PlannedTensor),
) -> Result<ConvertReport> {
    fs::create_dir_all(out_dir).map_err(|e| io_err(out_dir, e))?;
    let dtype = opts.dtype.unwrap_or_else(|| ck.source_dtype());
    let esz = dtype.size_in_bytes() as u64;
    let outs: Vec<Out<'_>> =
        ck.tensors().iter().map(|t| Out { name: file_key(t), t, bytes: t.numel() as u64 * esz }).collect();

    // Pack in order, as save_pretrained does: a tensor larger than a shard gets its own.
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0u64;
    for (i, o) in outs.iter().enumerate() {
        let last = groups.len() - 1;
        if !groups[last].is_empty() && current.saturating_add(o.bytes) > opts.max_shard_bytes {
            groups.push(Vec::new());
            current = 0;
        }
        current = current.saturating_add(o.bytes);
        if let Some(g) = groups.last_mut() {
            g.push(i);
        }
    }
    let n = groups.len();
    let mut files = Vec::with_capacity(n + 2);
    let mut weight_map = BTreeMap::new();
    for (k, g) in groups.iter().enumerate() {
        let fname =
            if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", k + 1) };
        let path = out_dir.join(&fname);
        let group: Vec<Out<'_>> =
            g.iter().map(|&i| Out { name: outs[i].name.clone(), t: outs[i].t, bytes: outs[i].bytes }).collect();
        write_file(ck, &path, &group, dtype, progress)?;
        for o in &group {
            weight_map.insert(o.name.clone(), fname.clone());
        }
        files.push(path);
    }
    let total_size: u64 = outs.iter().map(|o| o.bytes).sum();
    let index_path = out_dir.join("model.safetensors.index.json");
    if n > 1 {
        let total_parameters: u64 = outs.iter().map(|o| o.t.numel() as u64).sum();
        let index = serde_json::json!({
            "metadata": {"total_parameters": total_parameters, "total_size": total_size},
            "weight_map": weight_map,
        });
        let mut text = serde_json::to_string_pretty(&index).map_err(|e| MetaseqError::Tensor {
            name: "(index)".into(),
            detail: format!("cannot encode the index: {e}"),
        })?;
        text.push('\n');
        write_text_atomic(&index_path, &text)?;
        files.push(index_path.clone());
    }
    let cfg_path = out_dir.join("config.json");
    let cfg_text = serde_json::to_string_pretty(&ck.config().to_hf_json(dtype)).map_err(|e| MetaseqError::Tensor {
        name: "(config)".into(),
        detail: format!("cannot encode config.json: {e}"),
    })?;
    write_text_atomic(&cfg_path, &cfg_text)?;
    files.push(cfg_path);

    // Remove what an earlier conversion left that the loader could pick instead of ours.
    if let Ok(rd) = fs::read_dir(out_dir) {
        for e in rd.flatten() {
            let p = e.path();
            if files.contains(&p) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = name == "model.safetensors"
                || name == "model.safetensors.index.json"
                || (name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors"));
            if stale {
                fs::remove_file(&p).map_err(|err| io_err(&p, err))?;
            }
        }
    }
    Ok(ConvertReport { files, tensors: outs.len(), bytes: total_size, dtype, dropped: ck.dropped().to_vec() })
}
