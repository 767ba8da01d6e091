//! Finding, opening and grouping the input files.
//!
//! metaseq encodes a file's place in the checkpoint in its name only:
//! `<prefix>-model_part-<N>[-shard<K>].pt` (tensor-parallel part N, FSDP rank K). A name
//! without `model_part-` is part 0; without `-shard<K>` it is a whole part. So the file set is
//! checked here — every part 0..P present, every part's FSDP shards 0..S present and carrying
//! `shard_metadata` — before any tensor is looked at, and errors list the files given.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use opt_checkpoint::pickle::Value;
use opt_checkpoint::{torchzip, Checkpoint, CheckpointFormat};

use crate::fsdp::ShardMetadata;
use crate::{io_err, MetaseqError, Result};

/// One opened input file.
pub(crate) struct InputFile {
    pub(crate) path: PathBuf,
    /// `model_part-N` in the name.
    pub(crate) part: Option<usize>,
    /// `shardK` in the name.
    pub(crate) shard: Option<usize>,
    pub(crate) ckpt: Checkpoint,
    /// FSDP `shard_metadata`, when the file has one.
    pub(crate) meta: Option<ShardMetadata>,
}

impl InputFile {
    pub(crate) fn name(&self) -> String {
        file_name(&self.path)
    }
}

pub(crate) fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// Expands folders to the `*.pt` files they hold (sorted by name); files are kept as given and
/// duplicates (the same file twice) dropped.
pub fn expand_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut push = |p: PathBuf| {
        let key = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
        if seen.insert(key) {
            out.push(p);
        }
    };
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| io_err(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "pt"))
                .collect();
            if found.is_empty() {
                return Err(MetaseqError::Layout(format!(
                    "{}: no *.pt files in this folder (metaseq checkpoints are restored.pt, reshard-model_part-N.pt or *-model_part-N-shardK.pt)",
                    p.display()
                )));
            }
            found.sort();
            found.into_iter().for_each(&mut push);
        } else {
            push(p.clone());
        }
    }
    if out.is_empty() {
        return Err(MetaseqError::Layout("no input files given".into()));
    }
    Ok(out)
}

/// Parses `model_part-N` and `shardK` (as in `-shard3.pt`, not `reshard-`) out of a file name.
pub fn parse_file_name(name: &str) -> (Option<usize>, Option<usize>) {
    fn number_after(s: &str, tag: &str) -> Option<usize> {
        // The last occurrence followed by digits wins (a prefix may contain the tag too).
        s.rmatch_indices(tag).find_map(|(i, _)| {
            let rest = &s[i + tag.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if digits.is_empty() {
                return None;
            }
            // `shard` must be a word of its own: "-shard3", "_shard3", "shard3" at the start.
            let before = s[..i].chars().last();
            if tag == "shard" && before.is_some_and(|c| c.is_ascii_alphanumeric()) {
                return None;
            }
            digits.parse().ok()
        })
    }
    (number_after(name, "model_part-"), number_after(name, "shard"))
}

/// Opens every file: the state dict through opt-checkpoint (restricted unpickler), and for
/// PyTorch files the whole pickle once more to read `shard_metadata`.
pub(crate) fn open_all(paths: &[PathBuf]) -> Result<Vec<InputFile>> {
    paths.iter().map(|p| open(p)).collect()
}

fn open(path: &Path) -> Result<InputFile> {
    let ckpt = Checkpoint::open(path)?;
    let meta = if ckpt.format() == CheckpointFormat::PytorchBin {
        let u = torchzip::read_pickle(path)?;
        ShardMetadata::from_pickle(&u, path)?
    } else {
        None
    };
    let (part, shard) = parse_file_name(&file_name(path));
    Ok(InputFile { path: path.to_path_buf(), part, shard, ckpt, meta })
}

/// The files of each model part, in FSDP shard order.
pub(crate) struct Groups {
    pub(crate) parts: Vec<Vec<usize>>,
    fsdp: Vec<bool>,
}

impl Groups {
    pub(crate) fn describe(&self) -> String {
        let files: usize = self.parts.iter().map(Vec::len).sum();
        let p = self.parts.len();
        let mut s = if p == 1 { "1 model part".to_string() } else { format!("{p} model parts") };
        if self.fsdp.iter().any(|&f| f) {
            let mut counts: Vec<usize> = self.parts.iter().map(Vec::len).collect();
            counts.dedup();
            match counts.as_slice() {
                [n] => {
                    let _ = write!(s, " × {n} FSDP shards");
                }
                _ => s.push_str(" of FSDP shards"),
            }
        }
        let _ = write!(s, " ({files} file{})", if files == 1 { "" } else { "s" });
        s
    }
}

fn list(files: &[InputFile], idx: &[usize]) -> String {
    idx.iter().filter_map(|&i| files.get(i)).map(InputFile::name).collect::<Vec<_>>().join(", ")
}

/// Checks that the files form one checkpoint and orders them.
pub(crate) fn group(files: &[InputFile]) -> Result<Groups> {
    let mut by_part: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        by_part.entry(f.part.unwrap_or(0)).or_default().push(i);
    }
    let n_parts = by_part.keys().next_back().map_or(0, |&p| p + 1);
    let missing: Vec<String> = (0..n_parts).filter(|p| !by_part.contains_key(p)).map(|p| p.to_string()).collect();
    if !missing.is_empty() {
        let have: Vec<String> = by_part.keys().map(usize::to_string).collect();
        return Err(MetaseqError::Layout(format!(
            "model part {} missing: the files given ({}) hold parts {} of at least {n_parts}; pass every model_part-N file",
            missing.join(", "),
            list(files, &(0..files.len()).collect::<Vec<_>>()),
            have.join(", "),
        )));
    }
    let mut parts = Vec::with_capacity(n_parts);
    let mut fsdp = Vec::with_capacity(n_parts);
    for (p, mut idx) in by_part {
        let with_meta = idx.iter().filter(|&&i| files[i].meta.is_some()).count();
        if with_meta == 0 {
            if idx.len() > 1 {
                return Err(MetaseqError::Layout(format!(
                    "model part {p} is given as {} files ({}) without FSDP shard_metadata; only FSDP shards, which carry it, can be combined within a part (pass one file per model_part-N)",
                    idx.len(),
                    list(files, &idx)
                )));
            }
            parts.push(idx);
            fsdp.push(false);
            continue;
        }
        if with_meta != idx.len() {
            let (a, b): (Vec<usize>, Vec<usize>) = idx.iter().partition(|&&i| files[i].meta.is_some());
            return Err(MetaseqError::Layout(format!(
                "model part {p}: {} carry FSDP shard_metadata but {} do not",
                list(files, &a),
                list(files, &b)
            )));
        }
        idx.sort_by_key(|&i| files[i].shard.unwrap_or(0));
        for w in idx.windows(2) {
            if files[w[0]].shard.unwrap_or(0) == files[w[1]].shard.unwrap_or(0) {
                return Err(MetaseqError::Layout(format!(
                    "model part {p}: {} and {} are both FSDP shard {} (shards are told apart by -shardK in the name)",
                    files[w[0]].name(),
                    files[w[1]].name(),
                    files[w[0]].shard.unwrap_or(0)
                )));
            }
        }
        for (k, &i) in idx.iter().enumerate() {
            let s = files[i].shard.unwrap_or(0);
            if s != k {
                return Err(MetaseqError::Layout(format!(
                    "model part {p}: FSDP shard {k} is missing (given: {}); every shard 0..N of a part is needed",
                    list(files, &idx)
                )));
            }
        }
        parts.push(idx);
        fsdp.push(true);
    }
    Ok(Groups { parts, fsdp })
}

/// Whether `path` looks like metaseq weights: a `.pt` file (or a folder of them, without HF
/// weight files) whose pickle has metaseq's `{"model": state_dict, ...}` wrapper or keys only
/// metaseq uses (`decoder.layer_norm.*`, `decoder.version`, `qkv_proj`, `flat_param_*`,
/// `project_in_dim`, `output_projection`). Reads the pickles only; unreadable means `false`.
pub fn is_metaseq(path: &Path) -> bool {
    if path.is_dir() {
        let hf =
            ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"];
        if hf.iter().any(|f| path.join(f).is_file()) {
            return false;
        }
        return expand_inputs(&[path.to_path_buf()])
            .map(|files| files.iter().any(|f| is_metaseq_file(f)))
            .unwrap_or(false);
    }
    is_metaseq_file(path)
}

fn is_metaseq_file(path: &Path) -> bool {
    let Ok(u) = torchzip::read_pickle(path) else {
        return false;
    };
    let top = u.top();
    if matches!(u.get(top, "model"), Some(Value::Dict(_))) {
        return true;
    }
    u.dict(top).iter().any(|(k, _)| match k {
        Value::Str(s) => is_metaseq_key(s),
        _ => false,
    })
}

fn is_metaseq_key(k: &str) -> bool {
    k.starts_with("decoder.layer_norm.")
        || k == "decoder.version"
        || k.contains(".qkv_proj.")
        || k.contains("flat_param_")
        || k.contains("project_in_dim")
        || k.contains("output_projection")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        let cases = [
            ("restored.pt", (None, None)),
            ("reshard-model_part-3.pt", (Some(3), None)),
            ("reshard.pt", (None, None)),
            ("checkpoint_last-model_part-1-shard17.pt", (Some(1), Some(17))),
            ("checkpoint_last-shard2.pt", (None, Some(2))),
            ("reshard-model_part-0-shard0.pt", (Some(0), Some(0))),
            ("evil_metadata-shard0.pt", (None, Some(0))),
            ("model_part-12_shard4.pt", (Some(12), Some(4))),
            ("sharded.pt", (None, None)),
        ];
        for (name, want) in cases {
            assert_eq!(parse_file_name(name), want, "{name}");
        }
    }
}
