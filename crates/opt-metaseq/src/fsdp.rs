//! FSDP flat-parameter shards and their `shard_metadata`, unflattened into whole parameters.
//!
//! # What fairscale wrote
//!
//! metaseq trains OPT under fairscale's `FullyShardedDataParallel`: the root model and every
//! decoder layer are separate FSDP instances. Each instance flattens its own parameters (in
//! module order; a parameter shared with an earlier one is left out) into one 1-D
//! `flat_param_0`, which `torch.chunk` splits across the data-parallel world; every chunk is
//! zero-padded to the size of the first. A rank's file holds its chunk under
//! `<fsdp_path>.flat_param_0` (`flat_param_0` for the root), and beside the weights:
//!
//! ```text
//! shard_metadata = {
//!   "param_metadata": [                      # one per FSDP instance, root first
//!     {"fsdp_path": "decoder.layers.0",
//!      "params": {"flat_param_0": {"names":   ["self_attn.k_proj.weight", ...],  # relative
//!                                  "shapes":  [torch.Size([C, C]), ...],
//!                                  "numels":  [C*C, ...],
//!                                  "padding": 3}},            # zeros at the end of THIS rank's chunk
//!      "no_broadcast_optim_state": False,                     # True: only rank 0's chunk counts
//!      "shared_param_info": [("decoder.embed_tokens.weight",  # (source, shared copy)
//!                             "decoder.output_projection.weight")]},
//!     ...],
//!   "buffer_names": ["decoder.version"],     # not sharded: taken from rank 0
//! }
//! ```
//!
//! Consolidating (fairscale's `consolidate_shard_weights`) concatenates the ranks' chunks minus
//! their padding and cuts the result by `numels`. Here the cut is only bookkeeping: a parameter
//! becomes the list of segments of the shard tensors that hold its elements, which may span
//! two files. A tensor-parallel part without `shard_metadata` is one file of whole tensors.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use opt_checkpoint::pickle::{Unpickled, Value};
use opt_checkpoint::CheckpointError;

use crate::inputs::InputFile;
use crate::{MetaseqError, Result};

/// `len` elements from element `start` of tensor `key` of input file `file`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) file: usize,
    pub(crate) key: String,
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// A metaseq parameter of one tensor-parallel part, as a consolidated file would hold it: its
/// shape and where its elements (row-major) are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Param {
    pub(crate) shape: Vec<usize>,
    pub(crate) segments: Vec<Segment>,
}

impl Param {
    pub(crate) fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A part's parameters by metaseq name.
pub(crate) type PartParams = BTreeMap<String, Param>;

/// `shard_metadata` of one FSDP rank's file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMetadata {
    pub instances: Vec<FsdpInstance>,
    pub buffer_names: Vec<String>,
}

/// One FSDP-wrapped module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsdpInstance {
    /// Module path (`""` for the root), the prefix of its keys.
    pub fsdp_path: String,
    /// Flat parameter name (`flat_param_0`) → what it holds, in file order.
    pub params: Vec<(String, FlatParam)>,
    pub no_broadcast_optim_state: bool,
    /// (source, destination) full parameter names: the destination is the same tensor.
    pub shared_param_info: Vec<(String, String)>,
}

/// The parameters packed into one flat parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatParam {
    /// Relative to the instance's `fsdp_path`.
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub numels: Vec<usize>,
    /// Zeros appended to this rank's chunk.
    pub padding: usize,
}

/// Reads pickle values with errors that name the file and the position in the metadata.
struct Reader<'a> {
    u: &'a Unpickled,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn wrong(&self, at: &str, v: &Value, want: &str) -> MetaseqError {
        if let Value::Opaque(_) = v {
            // Something only code execution could have built stands where data should be.
            return MetaseqError::Checkpoint(CheckpointError::Unsafe {
                path: self.path.to_path_buf(),
                detail: format!(
                    "shard_metadata {at} is {}, which only running code could build (it was not executed)",
                    v.kind()
                ),
            });
        }
        self.meta_err(format!("{at}: expected {want}, found {}", v.kind()))
    }
    fn meta_err(&self, detail: String) -> MetaseqError {
        MetaseqError::Metadata { path: self.path.to_path_buf(), detail }
    }
    fn get(&self, v: &'a Value, key: &str, at: &str) -> Result<&'a Value> {
        if !matches!(v, Value::Dict(_)) {
            return Err(self.wrong(at, v, "a dict"));
        }
        self.u.get(v, key).ok_or_else(|| self.meta_err(format!("{at} has no \"{key}\"")))
    }
    fn seq(&self, v: &'a Value, at: &str) -> Result<&'a [Value]> {
        match v {
            Value::List(i) => Ok(self.u.lists.get(*i).map(Vec::as_slice).unwrap_or_default()),
            Value::Tuple(_) => Ok(self.u.tuple(v)),
            other => Err(self.wrong(at, other, "a list")),
        }
    }
    fn string(&self, v: &Value, at: &str) -> Result<String> {
        match v {
            Value::Str(s) => Ok(s.to_string()),
            other => Err(self.wrong(at, other, "a string")),
        }
    }
    fn uint(&self, v: &Value, at: &str) -> Result<usize> {
        match v {
            Value::Int(i) if *i >= 0 => {
                usize::try_from(*i).map_err(|_| self.meta_err(format!("{at}: {i} is too large")))
            }
            Value::Bool(b) => Ok(usize::from(*b)),
            other => Err(self.wrong(at, other, "a non-negative int")),
        }
    }
}

impl ShardMetadata {
    /// The `shard_metadata` of an unpickled metaseq file, if it has one.
    pub fn from_pickle(u: &Unpickled, path: &Path) -> Result<Option<ShardMetadata>> {
        let top = u.top();
        let sm = match u.get(top, "shard_metadata") {
            None | Some(Value::None) => return Ok(None),
            Some(v) => v,
        };
        let r = Reader { u, path };
        let pm = r.get(sm, "param_metadata", "shard_metadata")?;
        let mut instances = Vec::new();
        for (i, inst) in r.seq(pm, "param_metadata")?.iter().enumerate() {
            let at = format!("param_metadata[{i}]");
            let fsdp_path = r.string(r.get(inst, "fsdp_path", &at)?, &format!("{at}.fsdp_path"))?;
            let params_v = r.get(inst, "params", &at)?;
            if !matches!(params_v, Value::Dict(_)) {
                return Err(r.wrong(&format!("{at}.params"), params_v, "a dict"));
            }
            let mut params = Vec::new();
            for (k, info) in u.dict(params_v) {
                let flat = r.string(k, &format!("{at}.params key"))?;
                let at = format!("{at}.params.{flat}");
                let names = r
                    .seq(r.get(info, "names", &at)?, &format!("{at}.names"))?
                    .iter()
                    .map(|n| r.string(n, &format!("{at}.names[]")))
                    .collect::<Result<Vec<_>>>()?;
                let shapes = r
                    .seq(r.get(info, "shapes", &at)?, &format!("{at}.shapes"))?
                    .iter()
                    .map(|s| {
                        r.seq(s, &format!("{at}.shapes[]"))?
                            .iter()
                            .map(|d| r.uint(d, &format!("{at}.shapes[][]")))
                            .collect::<Result<Vec<_>>>()
                    })
                    .collect::<Result<Vec<_>>>()?;
                let numels = r
                    .seq(r.get(info, "numels", &at)?, &format!("{at}.numels"))?
                    .iter()
                    .map(|n| r.uint(n, &format!("{at}.numels[]")))
                    .collect::<Result<Vec<_>>>()?;
                let padding = r.uint(r.get(info, "padding", &at)?, &format!("{at}.padding"))?;
                if names.len() != shapes.len() || names.len() != numels.len() {
                    return Err(r.meta_err(format!(
                        "{at}: {} names, {} shapes and {} numels",
                        names.len(),
                        shapes.len(),
                        numels.len()
                    )));
                }
                for ((n, s), &k) in names.iter().zip(&shapes).zip(&numels) {
                    let prod = s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                    if prod != Some(k) {
                        return Err(r.meta_err(format!("{at}: '{n}' has shape {s:?} but numel {k}")));
                    }
                }
                params.push((flat, FlatParam { names, shapes, numels, padding }));
            }
            let no_broadcast_optim_state = match u.get(inst, "no_broadcast_optim_state") {
                None | Some(Value::None) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => return Err(r.wrong(&format!("{at}.no_broadcast_optim_state"), other, "a bool")),
            };
            let mut shared_param_info = Vec::new();
            if let Some(sp) = u.get(inst, "shared_param_info") {
                for pair in r.seq(sp, &format!("{at}.shared_param_info"))? {
                    let at = format!("{at}.shared_param_info[]");
                    match r.seq(pair, &at)? {
                        [a, b] => shared_param_info.push((r.string(a, &at)?, r.string(b, &at)?)),
                        other => {
                            return Err(r.meta_err(format!(
                                "{at}: expected a (source, destination) pair, found {} items",
                                other.len()
                            )))
                        }
                    }
                }
            }
            instances.push(FsdpInstance { fsdp_path, params, no_broadcast_optim_state, shared_param_info });
        }
        let buffer_names = match u.get(sm, "buffer_names") {
            None | Some(Value::None) => Vec::new(),
            Some(b) => {
                r.seq(b, "buffer_names")?.iter().map(|n| r.string(n, "buffer_names[]")).collect::<Result<Vec<_>>>()?
            }
        };
        Ok(Some(ShardMetadata { instances, buffer_names }))
    }
}

/// Drops the wrapper modules FSDP and activation checkpointing insert into parameter paths.
fn clean_path(p: &str) -> String {
    p.split('.')
        .filter(|c| !matches!(*c, "_fsdp_wrapped_module" | "_fpw_module" | "_checkpoint_wrapped_module"))
        .collect::<Vec<_>>()
        .join(".")
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// The sub-list of `segs` (laid end to end) covering elements `[offset, offset + len)`.
fn slice_segments(segs: &[Segment], offset: usize, len: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    let (lo, hi) = (offset, offset + len);
    let mut at = 0usize;
    for s in segs {
        let (a, b) = (at.max(lo), (at + s.len).min(hi));
        if a < b {
            out.push(Segment { file: s.file, key: s.key.clone(), start: s.start + (a - at), len: b - a });
        }
        at += s.len;
        if at >= hi {
            break;
        }
    }
    out
}

fn is_flat_key(name: &str) -> bool {
    name.split('.').any(|c| c.starts_with("flat_param"))
}

/// The parameters of one tensor-parallel part, given its files (FSDP shards in rank order, or
/// one file of whole tensors).
pub(crate) fn part_params(files: &[InputFile], idx: &[usize]) -> Result<PartParams> {
    let Some(&first) = idx.first() else {
        return Ok(PartParams::new());
    };
    if files[first].meta.is_some() {
        return unflatten(files, idx);
    }
    let f = &files[first];
    let mut out = PartParams::new();
    for name in f.ckpt.names() {
        if is_flat_key(name) {
            return Err(MetaseqError::Unsupported {
                path: f.path.clone(),
                detail: format!(
                    "holds flattened FSDP parameters ('{name}') but no shard_metadata to cut them back into tensors; use the original *-shardK.pt files, which carry it (opt-rs reads them directly), or an unflattened checkpoint"
                ),
            });
        }
        let t = f.ckpt.tensor(name)?;
        out.insert(
            name.to_string(),
            Param {
                shape: t.shape.to_vec(),
                segments: vec![Segment { file: first, key: name.to_string(), start: 0, len: t.numel() }],
            },
        );
    }
    Ok(out)
}

fn unflatten(files: &[InputFile], idx: &[usize]) -> Result<PartParams> {
    let f0 = &files[idx[0]];
    let part = f0.part.unwrap_or(0);
    let names_of = |ix: &[usize]| ix.iter().map(|&i| files[i].name()).collect::<Vec<_>>().join(", ");
    let meta_of = |i: usize| -> Result<&ShardMetadata> {
        files[i].meta.as_ref().ok_or_else(|| MetaseqError::Metadata {
            path: files[i].path.clone(),
            detail: "missing (other shards of this part have it)".into(),
        })
    };
    let m0 = meta_of(idx[0])?;
    let mut out = PartParams::new();
    let mut described: HashSet<String> = HashSet::new();
    let mut shared: Vec<(String, String)> = Vec::new();
    for (ii, inst) in m0.instances.iter().enumerate() {
        for (flat, info) in &inst.params {
            let key = join(&inst.fsdp_path, flat);
            described.insert(key.clone());
            let ranks = if inst.no_broadcast_optim_state { &idx[..1] } else { idx };
            let mut segs = Vec::with_capacity(ranks.len());
            let mut total = 0usize;
            for &fi in ranks {
                let f = &files[fi];
                let pad = meta_of(fi)?
                    .instances
                    .get(ii)
                    .filter(|m| m.fsdp_path == inst.fsdp_path)
                    .and_then(|m| m.params.iter().find(|(n, _)| n == flat))
                    .map(|(_, p)| p.padding)
                    .ok_or_else(|| MetaseqError::Metadata {
                        path: f.path.clone(),
                        detail: format!(
                            "has no entry for '{key}' at param_metadata[{ii}] although {} does: the shards are not from one checkpoint",
                            f0.name()
                        ),
                    })?;
                let t = f.ckpt.tensor(&key)?;
                let n = t.numel();
                if pad > n {
                    return Err(MetaseqError::Metadata {
                        path: f.path.clone(),
                        detail: format!("'{key}' holds {n} elements but claims {pad} of padding"),
                    });
                }
                segs.push(Segment { file: fi, key: key.clone(), start: 0, len: n - pad });
                total += n - pad;
            }
            // (A crafted metadata's numels may not even sum without overflowing.)
            let expected = info.numels.iter().try_fold(0usize, |a, &x| a.checked_add(x));
            if expected != Some(total) {
                let expected = expected.map_or_else(|| "more than usize::MAX".to_string(), |e| e.to_string());
                return Err(MetaseqError::Metadata {
                    path: f0.path.clone(),
                    detail: format!(
                        "flat parameter '{key}' of model part {part}: the {} shard file(s) given ({}) hold {total} elements once padding is removed, but the parameters it packs need {expected}; is a shard missing, or from another checkpoint?",
                        ranks.len(),
                        names_of(ranks)
                    ),
                });
            }
            let mut offset = 0usize;
            for ((n, shape), &numel) in info.names.iter().zip(&info.shapes).zip(&info.numels) {
                let name = clean_path(&join(&inst.fsdp_path, n));
                out.insert(name, Param { shape: shape.clone(), segments: slice_segments(&segs, offset, numel) });
                offset += numel;
            }
        }
        for (src, dst) in &inst.shared_param_info {
            shared.push((clean_path(src), clean_path(dst)));
        }
    }
    for (src, dst) in shared {
        let p = out.get(&src).cloned().ok_or_else(|| MetaseqError::Metadata {
            path: f0.path.clone(),
            detail: format!("shared_param_info shares '{src}' as '{dst}', but no flat parameter holds '{src}'"),
        })?;
        out.insert(dst, p);
    }
    // Buffers (`decoder.version`) and anything else stored whole: from rank 0, as fairscale does.
    for name in f0.ckpt.names() {
        if described.contains(name) || out.contains_key(name) {
            continue;
        }
        if is_flat_key(name) {
            return Err(MetaseqError::Metadata {
                path: f0.path.clone(),
                detail: format!("holds '{name}', which its shard_metadata does not describe"),
            });
        }
        let t = f0.ckpt.tensor(name)?;
        out.insert(
            name.to_string(),
            Param {
                shape: t.shape.to_vec(),
                segments: vec![Segment { file: idx[0], key: name.to_string(), start: 0, len: t.numel() }],
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(file: usize, start: usize, len: usize) -> Segment {
        Segment { file, key: format!("k{file}"), start, len }
    }

    #[test]
    fn slicing_spans_shards() {
        // Two ranks' chunks (7 and 5 elements after unpadding), laid end to end.
        let segs = [seg(0, 0, 7), seg(1, 0, 5)];
        assert_eq!(slice_segments(&segs, 0, 3), vec![seg(0, 0, 3)]);
        assert_eq!(slice_segments(&segs, 5, 4), vec![seg(0, 5, 2), seg(1, 0, 2)]);
        assert_eq!(slice_segments(&segs, 9, 3), vec![seg(1, 2, 3)]);
        assert_eq!(slice_segments(&segs, 12, 0), vec![]);
        // A parameter inside a segment that itself starts at an offset.
        assert_eq!(slice_segments(&[seg(2, 10, 6)], 1, 2), vec![seg(2, 11, 2)]);
    }

    #[test]
    fn wrapper_modules_are_dropped_from_paths() {
        assert_eq!(
            clean_path("decoder.layers.0._fsdp_wrapped_module._fpw_module.fc1.weight"),
            "decoder.layers.0.fc1.weight"
        );
        assert_eq!(clean_path("_checkpoint_wrapped_module.self_attn.k_proj.bias"), "self_attn.k_proj.bias");
        assert_eq!(join("", "flat_param_0"), "flat_param_0");
        assert_eq!(join("decoder.layers.1", "flat_param_0"), "decoder.layers.1.flat_param_0");
    }
}
