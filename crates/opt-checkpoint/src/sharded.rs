//! Sharded checkpoints: HF's `model.safetensors.index.json` / `pytorch_model.bin.index.json`.
//!
//! ```json
//! {
//!   "metadata": {"total_size": 123456},
//!   "weight_map": {"model.decoder.embed_tokens.weight": "model-00001-of-00002.safetensors", ...}
//! }
//! ```
//!
//! `weight_map` is authoritative: the checkpoint holds exactly the tensors it lists, each read
//! from the named shard (a tensor missing from its shard is an error naming both). Each shard is
//! opened once. Shard names must be plain relative paths inside the index's folder (no `..`,
//! no absolute paths). A shard's format follows its file name (`.safetensors` or otherwise a
//! PyTorch zip); the checkpoint's format follows the index name.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde_json::Value;

use crate::{corrupt, io_err, CheckpointError, CheckpointFormat, Entry, LoadedFile, Result};

/// A parsed index file.
pub(crate) struct Index {
    pub(crate) weight_map: BTreeMap<String, String>,
}

pub(crate) fn parse_index(path: &Path, bytes: &[u8]) -> Result<Index> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| corrupt(path, format!("index is not valid JSON: {e}")))?;
    let wm = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| corrupt(path, "index has no \"weight_map\" object"))?;
    let mut weight_map = BTreeMap::new();
    for (name, shard) in wm {
        let shard = shard
            .as_str()
            .ok_or_else(|| corrupt(path, format!("weight_map entry for tensor '{name}' is not a file name")))?;
        let rel = Path::new(shard);
        let plain =
            !shard.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !plain {
            return Err(corrupt(
                path,
                format!("weight_map entry for tensor '{name}' names shard {shard:?}, which is not a relative path inside the folder"),
            ));
        }
        weight_map.insert(name.clone(), shard.to_string());
    }
    Ok(Index { weight_map })
}

type Assembled = (Vec<LoadedFile>, BTreeMap<String, Entry>);

/// Opens every shard named by the index at `path` and gathers the listed tensors.
pub(crate) fn load(path: &Path) -> Result<(CheckpointFormat, Assembled)> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let index = parse_index(path, &bytes)?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let index_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let format = if index_name.ends_with(".safetensors.index.json") {
        CheckpointFormat::ShardedSafetensors
    } else {
        CheckpointFormat::ShardedPytorchBin
    };

    // Shards in name order, each opened once.
    let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, shard) in &index.weight_map {
        shards.entry(shard.as_str()).or_default().push(name.as_str());
    }
    let mut files = Vec::with_capacity(shards.len());
    let mut tensors = BTreeMap::new();
    for (file_idx, (shard, names)) in shards.into_iter().enumerate() {
        let shard_path = dir.join(shard);
        if !shard_path.is_file() {
            return Err(io_err(
                &shard_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("shard listed in {} is missing", path.display()),
                ),
            ));
        }
        let loaded = if shard.ends_with(".safetensors") {
            crate::safetensors::load(&shard_path)?
        } else {
            crate::torchzip::load(&shard_path)?
        };
        let mut in_shard: BTreeMap<String, Entry> = loaded.tensors.into_iter().collect();
        for name in names {
            let mut entry = in_shard
                .remove(name)
                .ok_or_else(|| CheckpointError::Missing { path: shard_path.clone(), name: name.to_string() })?;
            entry.file = file_idx;
            tensors.insert(name.to_string(), entry);
        }
        files.push(loaded.file);
    }
    Ok((format, (files, tensors)))
}
