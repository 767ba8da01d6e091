//! Weight-only int8 models for inference: quantizing a model, and the folder format.
//!
//! What is quantized: the six matrices of every decoder layer (`q/k/v/out_proj`, `fc1`, `fc2`)
//! always; the token embedding (and so the tied LM head, or an untied `lm_head`) only when
//! [`QuantConfig::embeddings`] is set. It is off by default because the LM head feeds the
//! softmax directly, so its rounding error reaches the log-probabilities unattenuated (the
//! common practice, e.g. bitsandbytes' LLM.int8 keeps `lm_head` in high precision); with it on,
//! decode reads a quarter of the bytes for the largest matrix of small models. Positions,
//! LayerNorms, biases and 350M's `project_in/out` stay in the storage dtype.
//!
//! In memory the int8 matrices leave the flat parameter buffer ([`ParamLayout::without`]) and
//! live in [`QuantWeights`], keyed by their layout offset; the linear layers look them up
//! there. Training a quantized model is refused.
//!
//! On disk a quantized model is an HF-style folder: `config.json` carries
//! `"quantization_config": {"quant_method": "opt-rs-int8", "bits": 8, "group_size": G,
//! "scheme": "absmax", "quantize_embeddings": false}` (G = 0: one scale per output channel),
//! and `model.safetensors` holds each quantized `*.weight` as `I8 [out, in]` next to
//! `*.weight_scale` as `F32 [out]` (per channel) or `F32 [out, ceil(in / G)]` (group-wise);
//! everything else is stored as usual in the storage dtype. HF transformers does not know this
//! `quant_method`; opt-rs reads it (`OptModel::from_folder` detects it).

use std::collections::BTreeMap;
use std::path::Path;

use opt_checkpoint::{Checkpoint, FileDType, RawTensorWrite};
use opt_tensor::{Backend, Buffer, DType, Int8Matrix};
use serde_json::Value;

use crate::config::OptConfig;
use crate::io::{encode, find_tensor, read_params, write_atomic};
use crate::model::OptModel;
use crate::params::{ParamLayout, ParamSpec};
use crate::{ModelError, Result};

/// `quantization_config.quant_method` of our folders.
pub const QUANT_METHOD: &str = "opt-rs-int8";
/// Suffix of a scale tensor's name: `decoder.layers.0.fc1.weight` → `..fc1.weight_scale`.
pub const SCALE_SUFFIX: &str = "_scale";

/// How a model is quantized. The default: per output channel, embeddings kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuantConfig {
    /// Columns per scale: 0 = one scale per output channel, else a multiple of 16.
    pub group_size: usize,
    /// Quantize `embed_tokens` (and `lm_head`) too.
    pub embeddings: bool,
}

impl QuantConfig {
    /// Whether parameter `spec` is stored as int8 under this config.
    pub fn quantizes(&self, spec: &ParamSpec) -> bool {
        let layer_matrix = spec.is_matrix && spec.name.starts_with("decoder.layers.");
        let embedding = spec.name == "decoder.embed_tokens.weight" || spec.name == "lm_head.weight";
        layer_matrix || (self.embeddings && embedding)
    }

    /// The `quantization_config` object written to `config.json`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "quant_method": QUANT_METHOD,
            "bits": 8,
            "group_size": self.group_size,
            "scheme": "absmax",
            "quantize_embeddings": self.embeddings,
        })
    }

    /// Parse a `quantization_config` object; errors name `origin` and the field.
    pub fn from_json(v: &Value, origin: &str) -> Result<Self> {
        let err = |field: &str, detail: String| ModelError::Config {
            origin: origin.into(),
            field: format!("quantization_config.{field}"),
            detail,
        };
        let obj = v.as_object().ok_or_else(|| err("(root)", format!("expected a JSON object, got {v}")))?;
        match obj.get("quant_method").and_then(Value::as_str) {
            Some(QUANT_METHOD) => {}
            other => {
                return Err(err(
                    "quant_method",
                    format!("{} is not supported (opt-rs reads \"{QUANT_METHOD}\")", other.unwrap_or("(missing)")),
                ))
            }
        }
        match obj.get("bits").and_then(Value::as_u64) {
            Some(8) => {}
            _ => {
                return Err(err(
                    "bits",
                    format!("{} is not supported (only 8)", obj.get("bits").unwrap_or(&Value::Null)),
                ))
            }
        }
        match obj.get("scheme") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "absmax" => {}
            Some(x) => return Err(err("scheme", format!("{x} is not supported (only \"absmax\")"))),
        }
        let group_size = match obj.get("group_size") {
            None | Some(Value::Null) => 0,
            Some(x) => {
                x.as_u64().ok_or_else(|| err("group_size", format!("expected a non-negative integer, got {x}")))?
                    as usize
            }
        };
        let embeddings = match obj.get("quantize_embeddings") {
            None | Some(Value::Null) => false,
            Some(x) => {
                x.as_bool().ok_or_else(|| err("quantize_embeddings", format!("expected true or false, got {x}")))?
            }
        };
        let qc = QuantConfig { group_size, embeddings };
        qc.validate().map_err(|e| err("group_size", e))?;
        Ok(qc)
    }

    /// The group size is 0 or a multiple of [`opt_tensor::quant::GROUP_ALIGN`].
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.group_size.is_multiple_of(opt_tensor::quant::GROUP_ALIGN) {
            Ok(())
        } else {
            Err(format!(
                "group size {} is neither 0 (per output channel) nor a multiple of {}",
                self.group_size,
                opt_tensor::quant::GROUP_ALIGN
            ))
        }
    }

    /// The `quantization_config` of a model folder's `config.json`, `None` when it has none
    /// (an ordinary model) or `dir` is not a folder.
    pub fn from_folder(dir: &Path) -> Result<Option<Self>> {
        if !dir.is_dir() {
            return Ok(None);
        }
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|e| ModelError::Io { path: file.clone(), source: e })?;
        let origin = file.display().to_string();
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            origin: origin.clone(),
            field: "(json)".into(),
            detail: e.to_string(),
        })?;
        match v.get("quantization_config") {
            None | Some(Value::Null) => Ok(None),
            Some(q) => Self::from_json(q, &origin).map(Some),
        }
    }
}

/// The int8 matrices of a quantized model, keyed by their offset in the model's layout (a key
/// past the flat buffer, see [`ParamLayout::without`]).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantWeights {
    pub config: QuantConfig,
    mats: BTreeMap<usize, Int8Matrix>,
}

impl QuantWeights {
    /// The int8 matrix at layout offset `key`, if that parameter is quantized.
    pub fn get(&self, key: usize) -> Option<&Int8Matrix> {
        self.mats.get(&key)
    }
    /// Bytes of codes and scales.
    pub fn size_in_bytes(&self) -> usize {
        self.mats.values().map(Int8Matrix::size_in_bytes).sum()
    }
    /// Number of quantized matrices.
    pub fn len(&self) -> usize {
        self.mats.len()
    }
    pub fn is_empty(&self) -> bool {
        self.mats.is_empty()
    }
}

/// The shape of the scale tensor for an `[rows, cols]` weight.
fn scale_shape(rows: usize, cols: usize, group_size: usize) -> Vec<usize> {
    if group_size == 0 {
        vec![rows]
    } else {
        vec![rows, cols.div_ceil(group_size)]
    }
}

/// The name a parameter has in a saved folder (`OPTForCausalLM` keys).
fn saved_name(name: &str) -> String {
    if name.starts_with("lm_head") {
        name.to_string()
    } else {
        format!("model.{name}")
    }
}

impl<B: Backend> OptModel<B> {
    /// Whether the model holds int8 weights.
    pub fn is_quantized(&self) -> bool {
        self.quant.is_some()
    }

    /// Bytes of weights held: the flat buffer in its dtype plus int8 codes and scales.
    pub fn weight_bytes(&self) -> usize {
        self.params.len() * self.dtype().size_in_bytes() + self.quant.as_ref().map_or(0, QuantWeights::size_in_bytes)
    }

    /// The model with the matrices `qc` selects quantized to int8 (absmax); the remaining
    /// parameters keep their storage dtype.
    pub fn quantize(self, qc: QuantConfig) -> Result<Self> {
        qc.validate().map_err(|e| ModelError::Input(format!("--group-size: {e}")))?;
        if self.quant.is_some() {
            return Err(ModelError::Input("the model is already quantized".into()));
        }
        if self.hooks.is_some() {
            return Err(ModelError::Input("quantize the whole model before sharding it".into()));
        }
        let host = self.params_f32()?;
        let layout = self.layout.without(|s| qc.quantizes(s));
        let mut flat = vec![0f32; layout.total()];
        for s in &layout.specs {
            let old = self.layout.find(&s.name).map_or(0, |o| o.offset);
            flat[s.offset..s.offset + s.numel()].copy_from_slice(&host[old..old + s.numel()]);
        }
        let mut mats = BTreeMap::new();
        for s in &layout.external {
            let old = self.layout.find(&s.name).map_or(0, |o| o.offset);
            let (rows, cols) = (s.shape[0], s.shape[1]);
            let m = Int8Matrix::quantize(&host[old..old + s.numel()], rows, cols, qc.group_size).map_err(|e| {
                ModelError::Weights { file: "(model)".into(), name: s.name.clone(), detail: e.to_string() }
            })?;
            mats.insert(s.offset, m);
        }
        let params = self.backend.from_f32(&flat, self.dtype())?;
        Ok(OptModel {
            cfg: self.cfg,
            layout,
            params,
            backend: self.backend,
            hooks: None,
            quant: Some(QuantWeights { config: qc, mats }),
        })
    }

    /// Build a quantized model from a checkpoint written by [`OptModel::save_hf`] for a
    /// quantized model. Every tensor is checked: codes must be `I8` of the weight's shape and
    /// scales of [`scale_shape`]; errors name the file and the tensor.
    pub(crate) fn from_quantized_checkpoint(
        backend: B,
        cfg: OptConfig,
        qc: QuantConfig,
        ckpt: &Checkpoint,
        dtype: DType,
    ) -> Result<Self> {
        let layout = ParamLayout::new(&cfg).without(|s| qc.quantizes(s));
        let host = read_params(ckpt, &cfg, &layout)?;
        let mut mats = BTreeMap::new();
        for s in &layout.external {
            let (rows, cols) = (s.shape[0], s.shape[1]);
            let t = find_tensor(ckpt, &s.name, cfg.tie_word_embeddings)?;
            let werr = |name: &str, file: &Path, detail: String| ModelError::Weights {
                file: file.display().to_string(),
                name: name.to_string(),
                detail,
            };
            if t.dtype != FileDType::I8 {
                return Err(werr(t.name, t.file, format!("has dtype {}, but a quantized weight is I8", t.dtype)));
            }
            if t.shape != s.shape.as_slice() || t.bytes.len() != rows * cols {
                return Err(werr(
                    t.name,
                    t.file,
                    format!("shape {:?} ({} bytes), but the config needs {:?}", t.shape, t.bytes.len(), s.shape),
                ));
            }
            let codes: Vec<i8> = t.bytes.iter().map(|&b| b as i8).collect();
            let st = find_tensor(ckpt, &format!("{}{SCALE_SUFFIX}", s.name), false)?;
            let want = scale_shape(rows, cols, qc.group_size);
            if st.shape != want.as_slice() {
                return Err(werr(
                    st.name,
                    st.file,
                    format!("shape {:?}, but group_size {} needs {want:?}", st.shape, qc.group_size),
                ));
            }
            let scales = st.to_f32_vec()?;
            let m = Int8Matrix::new(rows, cols, qc.group_size, codes, scales)
                .map_err(|e| werr(st.name, st.file, e.to_string()))?;
            mats.insert(s.offset, m);
        }
        let params = backend.from_f32(&host, dtype)?;
        Ok(OptModel { cfg, layout, params, backend, hooks: None, quant: Some(QuantWeights { config: qc, mats }) })
    }

    /// Save a quantized model (see the module docs for the format); called by `save_hf`.
    pub(crate) fn save_quantized(&self, dir: &Path, q: &QuantWeights) -> Result<()> {
        let dtype = self.dtype();
        let host = self.params_f32()?;
        let mut blobs: Vec<(String, FileDType, Vec<usize>, Vec<u8>)> = Vec::new();
        // In the order of the full layout, each quantized weight followed by its scales.
        for spec in &ParamLayout::new(&self.cfg).specs {
            let name = saved_name(&spec.name);
            if let Some(s) = self.layout.find(&spec.name) {
                let bytes = encode(&host[s.offset..s.offset + s.numel()], dtype);
                blobs.push((name, dtype.into(), s.shape.clone(), bytes));
            } else if let Some(s) = self.layout.external.iter().find(|s| s.name == spec.name) {
                let m = q.get(s.offset).ok_or_else(|| {
                    ModelError::Input(format!("internal: no int8 matrix for {} (offset {})", s.name, s.offset))
                })?;
                let codes = m.codes().iter().map(|&c| c as u8).collect();
                blobs.push((name.clone(), FileDType::I8, s.shape.clone(), codes));
                let scales = m.scales().iter().flat_map(|x| x.to_le_bytes()).collect();
                let shape = scale_shape(m.rows(), m.cols(), q.config.group_size);
                blobs.push((format!("{name}{SCALE_SUFFIX}"), FileDType::F32, shape, scales));
            }
        }
        let tensors: Vec<RawTensorWrite<'_>> = blobs
            .iter()
            .map(|(name, dtype, shape, bytes)| RawTensorWrite {
                name: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
                bytes,
            })
            .collect();
        opt_checkpoint::save_safetensors_raw(&dir.join("model.safetensors"), &tensors)?;
        let mut cfg = self.cfg.to_hf_json(dtype);
        cfg["quantization_config"] = q.config.to_json();
        let text =
            serde_json::to_string_pretty(&cfg).map_err(|e| ModelError::Input(format!("serialising config: {e}")))?;
        write_atomic(&dir.join("config.json"), text.as_bytes())
    }
}
