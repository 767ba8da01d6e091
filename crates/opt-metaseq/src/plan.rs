//! From metaseq parameters of P tensor-parallel parts to the HF tensors of a config.
//!
//! # Merging parts (metaseq's `reshard_mp` layout)
//!
//! | metaseq key (module) | split across parts | HF tensor |
//! |---|---|---|
//! | `embed_tokens`, `q_proj`, `k_proj`, `v_proj`, `fc1` (weight and bias) | rows (dim 0) | concatenate rows |
//! | `out_proj.weight`, `fc2.weight` | columns (dim 1) | concatenate columns |
//! | `qkv_proj` (weight and bias) | rows, each part `[K_p; V_p; Q_p]` | `k_proj` = `[K_0; K_1; ...]`, same for V and Q |
//! | `output_projection.weight` | rows when a part has `vocab / P` of them | `lm_head.weight` (untied) or dropped (tied) |
//! | everything else: `embed_positions`, layer norms, `out_proj` / `fc2` biases, `project_in_dim` / `project_out_dim` | replicated | part 0's copy |
//!
//! With one part every rule is a copy (and `qkv_proj` still splits in K, V, Q order, as HF's
//! converter does). Parts must hold the same keys with the same shapes: metaseq splits evenly.
//!
//! # Renames (HF's `convert_opt_original_pytorch_checkpoint_to_pytorch`)
//!
//! `decoder.layer_norm.*` → `decoder.final_layer_norm.*`; `decoder.project_in_dim.weight` →
//! `decoder.project_in.weight` (and `out`); `decoder.output_projection.weight` → `lm_head.weight`
//! when the config is untied, dropped when tied; `decoder.version` and sinusoidal
//! `*._float_tensor` placeholders are dropped. Everything else keeps its name.
//!
//! The result is checked against [`ParamLayout`]: every parameter of the config must be
//! produced with exactly its shape, and nothing else may be left over.

use std::collections::HashMap;

use opt_checkpoint::FileDType;
use opt_model::{OptConfig, ParamLayout};
use opt_tensor::DType;

use crate::fsdp::{Param, PartParams};
use crate::inputs::InputFile;
use crate::{MetaseqError, Result};

/// Rows `[first_row, first_row + rows)` of a part's parameter, each `row_len` elements.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    pub(crate) param: Param,
    pub(crate) first_row: usize,
    pub(crate) rows: usize,
    pub(crate) row_len: usize,
}

/// How the blocks form the output tensor (row-major).
#[derive(Clone, Debug)]
pub(crate) enum Assembly {
    /// The blocks one after the other (dim-0 concatenation; a single block is a copy).
    Rows(Vec<Block>),
    /// Output row r is row r of every block in turn (dim-1 concatenation).
    Cols(Vec<Block>),
}

/// One HF tensor and where its data comes from.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    /// HF name without the `model.` prefix (as [`ParamLayout`] names it).
    pub name: String,
    pub shape: Vec<usize>,
    /// The metaseq key(s) it is built from, for messages.
    pub source: String,
    /// The dimension the tensor-parallel parts were concatenated along (none if replicated).
    pub(crate) split_dim: Option<usize>,
    pub(crate) assembly: Assembly,
}

impl PlannedTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub(crate) fn blocks(&self) -> &[Block] {
        match &self.assembly {
            Assembly::Rows(b) | Assembly::Cols(b) => b,
        }
    }

    /// The stored dtype of its first element (f64 reported as f32).
    pub(crate) fn source_dtype(&self, files: &[InputFile]) -> Option<DType> {
        let seg = self.blocks().first()?.param.segments.first()?;
        let t = files.get(seg.file)?.ckpt.tensor(&seg.key).ok()?;
        Some(match t.dtype {
            FileDType::BF16 => DType::BF16,
            FileDType::F16 => DType::F16,
            _ => DType::F32,
        })
    }
}

/// The plan: tensors in [`ParamLayout`] order, and the metaseq keys left out (with why).
pub(crate) struct Planned {
    pub(crate) tensors: Vec<PlannedTensor>,
    pub(crate) dropped: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    Rows,
    Cols,
    Replicated,
    Qkv,
}

fn split_of(key: &str, shape: &[usize], parts: usize, cfg: &OptConfig) -> Split {
    let (module, leaf) = key.rsplit_once('.').unwrap_or(("", key));
    let module = module.rsplit('.').next().unwrap_or(module);
    match module {
        "qkv_proj" => Split::Qkv,
        "q_proj" | "k_proj" | "v_proj" | "fc1" | "embed_tokens" => Split::Rows,
        "out_proj" | "fc2" if leaf == "weight" => Split::Cols,
        // metaseq keeps the untied output projection vocab-parallel like the embedding; a part
        // holding all `vocab` rows is a replicated copy instead.
        "output_projection" if parts > 1 && shape.first() == Some(&cfg.vocab_size) => Split::Replicated,
        "output_projection" => Split::Rows,
        _ => Split::Replicated,
    }
}

fn hf_name(key: &str) -> String {
    match key {
        "decoder.layer_norm.weight" => "decoder.final_layer_norm.weight".into(),
        "decoder.layer_norm.bias" => "decoder.final_layer_norm.bias".into(),
        "decoder.project_in_dim.weight" => "decoder.project_in.weight".into(),
        "decoder.project_out_dim.weight" => "decoder.project_out.weight".into(),
        "decoder.output_projection.weight" => "lm_head.weight".into(),
        other => other.to_string(),
    }
}

/// The metaseq keys an HF parameter may come from (for "not found" messages).
fn metaseq_candidates(hf: &str) -> Vec<String> {
    let mut v = vec![match hf {
        "decoder.final_layer_norm.weight" => "decoder.layer_norm.weight".into(),
        "decoder.final_layer_norm.bias" => "decoder.layer_norm.bias".into(),
        "decoder.project_in.weight" => "decoder.project_in_dim.weight".into(),
        "decoder.project_out.weight" => "decoder.project_out_dim.weight".into(),
        "lm_head.weight" => "decoder.output_projection.weight".into(),
        other => other.to_string(),
    }];
    for p in [".q_proj.", ".k_proj.", ".v_proj."] {
        if hf.contains(p) {
            v.push(hf.replace(p, ".qkv_proj."));
        }
    }
    v
}

fn rows_and_len(shape: &[usize]) -> (usize, usize) {
    (shape.first().copied().unwrap_or(1), shape.iter().skip(1).product())
}

fn part_names(files: &[InputFile], part_files: &[usize]) -> String {
    part_files.iter().filter_map(|&i| files.get(i)).map(InputFile::name).collect::<Vec<_>>().join(", ")
}

/// Merges the parts, renames, and checks the result against `cfg`.
pub(crate) fn plan(
    files: &[InputFile],
    part_files: &[Vec<usize>],
    parts: &[PartParams],
    cfg: &OptConfig,
) -> Result<Planned> {
    let Some(p0) = parts.first() else {
        return Err(MetaseqError::Layout("no model parts".into()));
    };
    let n = parts.len();
    let names = |p: usize| part_names(files, part_files.get(p).map_or(&[][..], Vec::as_slice));
    for (pi, part) in parts.iter().enumerate().skip(1) {
        if let Some(k) = p0.keys().find(|k| !part.contains_key(*k)) {
            return Err(MetaseqError::Tensor {
                name: k.clone(),
                detail: format!(
                    "in model part 0 ({}) but missing from model part {pi} ({}): the parts are not from one checkpoint",
                    names(0),
                    names(pi)
                ),
            });
        }
        if let Some(k) = part.keys().find(|k| !p0.contains_key(*k)) {
            return Err(MetaseqError::Tensor {
                name: k.clone(),
                detail: format!(
                    "in model part {pi} ({}) but missing from model part 0 ({}): the parts are not from one checkpoint",
                    names(pi),
                    names(0)
                ),
            });
        }
    }

    let mut out: Vec<PlannedTensor> = Vec::new();
    let mut dropped = Vec::new();
    for (key, first) in p0 {
        if key == "decoder.version" || key.ends_with("._float_tensor") {
            dropped.push(format!("{key} (metaseq bookkeeping, not a weight)"));
            continue;
        }
        if key == "decoder.output_projection.weight" && cfg.tie_word_embeddings {
            dropped.push(format!("{key} (tied to decoder.embed_tokens.weight)"));
            continue;
        }
        let params: Vec<&Param> = parts.iter().filter_map(|p| p.get(key)).collect();
        if params.iter().any(|p| p.shape != first.shape) {
            let shapes: Vec<String> =
                params.iter().enumerate().map(|(i, p)| format!("{:?} in part {i} ({})", p.shape, names(i))).collect();
            return Err(MetaseqError::Tensor {
                name: key.clone(),
                detail: format!("inconsistent shapes across model parts: {}", shapes.join(", ")),
            });
        }
        let shape = &first.shape;
        let (rows, row_len) = rows_and_len(shape);
        let whole = |p: &Param| Block { param: p.clone(), first_row: 0, rows, row_len };
        let with_rows = |r: usize| {
            let mut s = shape.clone();
            if let Some(d) = s.first_mut() {
                *d = r;
            }
            s
        };
        match split_of(key, shape, n, cfg) {
            Split::Replicated => out.push(PlannedTensor {
                name: hf_name(key),
                shape: shape.clone(),
                source: format!("{key} (replicated; part 0's copy)"),
                split_dim: None,
                assembly: Assembly::Rows(vec![whole(first)]),
            }),
            Split::Rows => out.push(PlannedTensor {
                name: hf_name(key),
                shape: with_rows(rows * n),
                source: format!("{key} (rows of {n} part(s))"),
                split_dim: Some(0),
                assembly: Assembly::Rows(params.iter().map(|p| whole(p)).collect()),
            }),
            Split::Cols => {
                if shape.len() != 2 {
                    return Err(MetaseqError::Tensor {
                        name: key.clone(),
                        detail: format!("row-parallel weight of shape {shape:?} is not a matrix"),
                    });
                }
                out.push(PlannedTensor {
                    name: hf_name(key),
                    shape: vec![rows, row_len * n],
                    source: format!("{key} (columns of {n} part(s))"),
                    split_dim: Some(1),
                    assembly: Assembly::Cols(params.iter().map(|p| whole(p)).collect()),
                })
            }
            Split::Qkv => {
                if !rows.is_multiple_of(3) {
                    return Err(MetaseqError::Tensor {
                        name: key.clone(),
                        detail: format!("fused qkv_proj of shape {shape:?} in {} does not split in three", names(0)),
                    });
                }
                let d = rows / 3;
                // metaseq's sequence-parallel layer stores K, V, Q (not Q, K, V).
                for (j, which) in ["k_proj", "v_proj", "q_proj"].iter().enumerate() {
                    out.push(PlannedTensor {
                        name: key.replace("qkv_proj", which),
                        shape: with_rows(d * n),
                        source: format!("{key} (rows {}..{} of each of {n} part(s))", j * d, (j + 1) * d),
                        split_dim: Some(0),
                        assembly: Assembly::Rows(
                            params
                                .iter()
                                .map(|p| Block { param: (*p).clone(), first_row: j * d, rows: d, row_len })
                                .collect(),
                        ),
                    });
                }
            }
        }
    }

    let mut by_name: HashMap<String, PlannedTensor> = HashMap::with_capacity(out.len());
    for t in out {
        if let Some(prev) = by_name.get(&t.name) {
            return Err(MetaseqError::Tensor {
                name: t.name.clone(),
                detail: format!("built twice, from {} and from {}", prev.source, t.source),
            });
        }
        by_name.insert(t.name.clone(), t);
    }

    let all_files = part_names(files, &(0..files.len()).collect::<Vec<_>>());
    let layout = ParamLayout::new(cfg);
    let mut tensors = Vec::with_capacity(layout.specs.len());
    for spec in &layout.specs {
        let Some(t) = by_name.remove(&spec.name) else {
            return Err(MetaseqError::Tensor {
                name: spec.name.clone(),
                detail: format!(
                    "the config needs it but the checkpoint has no {} (files: {all_files}); does the config match the checkpoint?",
                    metaseq_candidates(&spec.name).join(" or ")
                ),
            });
        };
        if t.shape != spec.shape {
            return Err(MetaseqError::Tensor {
                name: spec.name.clone(),
                detail: format!(
                    "merged shape {:?} from {}, but the config needs {:?}{}",
                    t.shape,
                    t.source,
                    spec.shape,
                    shape_hint(&t.shape, &spec.shape, t.split_dim, n)
                ),
            });
        }
        for b in t.blocks() {
            check_block(files, &t.name, b)?;
        }
        tensors.push(t);
    }
    if !by_name.is_empty() {
        let mut extra: Vec<String> = by_name.keys().cloned().collect();
        extra.sort();
        let shown = extra.len().min(5);
        return Err(MetaseqError::Tensor {
            name: by_name
                .keys()
                .min()
                .cloned()
                .unwrap_or_default(),
            detail: format!(
                "{} tensor(s) of the checkpoint have no place in the config's model: {}{}; does the config match the checkpoint (layers, biases, projection, final layer norm, tied embeddings)?",
                extra.len(),
                extra[..shown].join(", "),
                if extra.len() > shown { ", ..." } else { "" }
            ),
        });
    }
    dropped.sort();
    Ok(Planned { tensors, dropped })
}

/// A hint when a merged shape falls a whole multiple short of the config's along the axis the
/// parts were concatenated on: some parts were probably not given.
fn shape_hint(have: &[usize], want: &[usize], split_dim: Option<usize>, parts: usize) -> String {
    if have.len() != want.len() {
        return " (wrong config for this checkpoint?)".into();
    }
    let diff: Vec<usize> = (0..have.len()).filter(|&i| have[i] != want[i]).collect();
    match diff.as_slice() {
        [i] if Some(*i) == split_dim && have[*i] > 0 && want[*i] > have[*i] && want[*i].is_multiple_of(have[*i]) => {
            format!(
                " ({}× as large along dim {i}: were only {parts} of {} model parts given?)",
                want[*i] / have[*i],
                parts * want[*i] / have[*i]
            )
        }
        _ => " (wrong config for this checkpoint?)".into(),
    }
}

/// Checks that a block's data exists: float tensors, ranges inside them, rows inside the
/// parameter. Done while planning so that a conversion never fails half-way through.
fn check_block(files: &[InputFile], name: &str, b: &Block) -> Result<()> {
    let err = |detail: String| MetaseqError::Tensor { name: name.to_string(), detail };
    let held: usize = b.param.segments.iter().map(|s| s.len).sum();
    if held != b.param.numel() {
        return Err(err(format!(
            "shape {:?} needs {} elements but its data holds {held}",
            b.param.shape,
            b.param.numel()
        )));
    }
    if (b.first_row + b.rows) * b.row_len > held {
        return Err(err("internal: block outside its parameter".into()));
    }
    for s in &b.param.segments {
        let f = files.get(s.file).ok_or_else(|| err("internal: bad file index".into()))?;
        let t = f.ckpt.tensor(&s.key)?;
        if !t.dtype.is_readable_float() {
            return Err(err(format!("'{}' in {} is {}, not a floating-point weight", s.key, f.name(), t.dtype)));
        }
        if s.start + s.len > t.numel() {
            return Err(err(format!(
                "'{}' in {} has {} elements; elements {}..{} were expected",
                s.key,
                f.name(),
                t.numel(),
                s.start,
                s.start + s.len
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_follow_reshard_mp() {
        let cfg = OptConfig::preset("tiny").expect("preset");
        let k = |s| split_of(s, &[8, 4], 2, &cfg);
        assert_eq!(k("decoder.layers.3.self_attn.qkv_proj.weight"), Split::Qkv);
        assert_eq!(k("decoder.layers.3.self_attn.qkv_proj.bias"), Split::Qkv);
        assert_eq!(k("decoder.layers.3.self_attn.v_proj.bias"), Split::Rows);
        assert_eq!(k("decoder.layers.3.fc1.weight"), Split::Rows);
        assert_eq!(k("decoder.embed_tokens.weight"), Split::Rows);
        assert_eq!(k("decoder.layers.3.fc2.weight"), Split::Cols);
        assert_eq!(k("decoder.layers.3.self_attn.out_proj.weight"), Split::Cols);
        assert_eq!(k("decoder.layers.3.fc2.bias"), Split::Replicated);
        assert_eq!(k("decoder.layers.3.self_attn.out_proj.bias"), Split::Replicated);
        assert_eq!(k("decoder.layers.3.final_layer_norm.weight"), Split::Replicated);
        assert_eq!(k("decoder.project_in_dim.weight"), Split::Replicated);
        assert_eq!(k("decoder.embed_positions.weight"), Split::Replicated);
        assert_eq!(k("decoder.output_projection.weight"), Split::Rows);
        let full = [cfg.vocab_size, 4];
        assert_eq!(split_of("decoder.output_projection.weight", &full, 2, &cfg), Split::Replicated);
    }

    #[test]
    fn renames_follow_hf_converter() {
        assert_eq!(hf_name("decoder.layer_norm.bias"), "decoder.final_layer_norm.bias");
        assert_eq!(hf_name("decoder.project_out_dim.weight"), "decoder.project_out.weight");
        assert_eq!(hf_name("decoder.layers.0.final_layer_norm.bias"), "decoder.layers.0.final_layer_norm.bias");
        assert_eq!(
            metaseq_candidates("decoder.layers.1.self_attn.q_proj.weight"),
            vec![
                "decoder.layers.1.self_attn.q_proj.weight".to_string(),
                "decoder.layers.1.self_attn.qkv_proj.weight".to_string()
            ]
        );
    }

    #[test]
    fn hints_point_at_missing_parts() {
        let hint = shape_hint(&[256, 64], &[512, 64], Some(0), 1);
        assert!(hint.contains("only 1 of 2 model parts"), "{hint}");
        let hint = shape_hint(&[64, 32], &[64, 128], Some(1), 2);
        assert!(hint.contains("only 2 of 8 model parts"), "{hint}");
        // Not along the split axis, or a replicated tensor: the config is wrong instead.
        assert!(shape_hint(&[512, 32], &[512, 64], Some(0), 1).contains("wrong config"));
        assert!(shape_hint(&[66, 32], &[66, 64], None, 1).contains("wrong config"));
        assert!(shape_hint(&[64], &[32], Some(0), 1).contains("wrong config"));
    }
}
