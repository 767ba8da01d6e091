//! Building models: from an HF folder (any weight layout `opt-checkpoint` reads), from a config
//! with metaseq's random initialisation, and saving back in HF's layout (config.json +
//! model.safetensors) so that `OPTForCausalLM.from_pretrained` loads what we write.

use std::path::Path;

use opt_checkpoint::{Checkpoint, CheckpointError, TensorWrite};
use opt_tensor::{Backend, Buffer, DType};

use crate::config::OptConfig;
use crate::init::metaseq_init;
use crate::model::OptModel;
use crate::params::ParamLayout;
use crate::quant::QuantConfig;
use crate::{ModelError, Result};

/// Key prefixes a checkpoint may use for decoder tensors: `OPTForCausalLM` saves
/// `model.decoder.*`, the bare `OPTModel` (and metaseq conversions) `decoder.*`.
const PREFIXES: [&str; 2] = ["model.", ""];

impl<B: Backend> OptModel<B> {
    /// Load an HF model folder: `config.json` plus weights in any supported layout, converted
    /// to `dtype` on load.
    ///
    /// A folder written for a quantized model (`quantization_config` in `config.json`, see
    /// [`crate::quant`]) loads as one: its int8 matrices stay int8 and `dtype` applies to the
    /// other parameters.
    pub fn from_folder(backend: B, dir: &Path, dtype: DType) -> Result<Self> {
        let cfg = OptConfig::from_path(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        match QuantConfig::from_folder(dir)? {
            Some(qc) => Self::from_quantized_checkpoint(backend, cfg, qc, &ckpt, dtype),
            None => Self::from_checkpoint(backend, cfg, &ckpt, dtype),
        }
    }

    /// Build the model for `cfg` from the tensors of an opened checkpoint.
    pub fn from_checkpoint(backend: B, cfg: OptConfig, ckpt: &Checkpoint, dtype: DType) -> Result<Self> {
        let layout = ParamLayout::new(&cfg);
        let host = read_params(ckpt, &cfg, &layout)?;
        let params = backend.from_f32(&host, dtype)?;
        backend.set_mixed_precision((dtype != DType::F32).then_some(dtype));
        Ok(OptModel { cfg, layout, params, backend, hooks: None, quant: None })
    }

    /// A randomly initialised model (metaseq's scheme, see [`crate::init`]).
    pub fn new_random(backend: B, cfg: OptConfig, dtype: DType, std: f32, seed: u64) -> Result<Self> {
        cfg.validate("config")?;
        let layout = ParamLayout::new(&cfg);
        let mut host = vec![0f32; layout.total()];
        metaseq_init(&cfg, &layout, &mut host, std, seed);
        let params = backend.from_f32(&host, dtype)?;
        backend.set_mixed_precision((dtype != DType::F32).then_some(dtype));
        Ok(OptModel { cfg, layout, params, backend, hooks: None, quant: None })
    }

    /// Build from host f32 parameters in this layout (tests, optimizers).
    pub fn from_params(backend: B, cfg: OptConfig, host: &[f32], dtype: DType) -> Result<Self> {
        let layout = ParamLayout::new(&cfg);
        if host.len() != layout.total() {
            return Err(ModelError::Input(format!("{} parameters given, layout has {}", host.len(), layout.total())));
        }
        let params = backend.from_f32(host, dtype)?;
        backend.set_mixed_precision((dtype != DType::F32).then_some(dtype));
        Ok(OptModel { cfg, layout, params, backend, hooks: None, quant: None })
    }

    /// This model holding its decoder layers one at a time ([`ParamLayout::streamed`]): the
    /// resident parameters are kept, the layers dropped (a `LayerStream` supplies them to
    /// `forward_streamed` / `forward_backward_streamed`). Tensor-parallel hooks are kept.
    pub fn into_streamed(mut self) -> Result<Self> {
        if self.layout.slot.is_some() {
            return Ok(self);
        }
        if self.quant.is_some() {
            return Err(ModelError::Input("an int8 model cannot hold its layers one at a time".into()));
        }
        let compact = self.layout.streamed_host(&self.params_f32()?);
        let dtype = self.dtype();
        self.params = self.backend.zeros(dtype, 0)?;
        self.params = self.backend.from_f32(&compact, dtype)?;
        self.layout = self.layout.streamed();
        Ok(self)
    }

    /// Storage dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.params.dtype()
    }

    /// All parameters as host f32.
    pub fn params_f32(&self) -> Result<Vec<f32>> {
        Ok(self.backend.to_f32(self.params.v())?)
    }

    /// Save as an HF folder: `config.json` + `model.safetensors` in the parameters' dtype, with
    /// `OPTForCausalLM`'s key names. Tied models omit `lm_head.weight`, as HF does.
    ///
    /// A quantized model is saved in the int8 folder format of [`crate::quant`].
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::Io { path: dir.to_path_buf(), source: e })?;
        if let Some(q) = &self.quant {
            return self.save_quantized(dir, q);
        }
        let dtype = self.dtype();
        let host = self.params_f32()?;
        let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(self.layout.specs.len());
        for spec in &self.layout.specs {
            let vals = &host[spec.offset..spec.offset + spec.numel()];
            let bytes = encode(vals, dtype);
            let name =
                if spec.name.starts_with("lm_head") { spec.name.clone() } else { format!("model.{}", spec.name) };
            blobs.push((name, spec.shape.clone(), bytes));
        }
        let tensors: Vec<TensorWrite<'_>> = blobs
            .iter()
            .map(|(name, shape, bytes)| TensorWrite { name: name.clone(), dtype, shape: shape.clone(), bytes })
            .collect();
        opt_checkpoint::save_safetensors(&dir.join("model.safetensors"), &tensors)?;
        let cfg_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.cfg.to_hf_json(dtype))
            .map_err(|e| ModelError::Input(format!("serialising config: {e}")))?;
        write_atomic(&cfg_path, text.as_bytes())?;
        Ok(())
    }
}

/// Read the parameters of `layout` (its flat-buffer ones) from a checkpoint, as host f32.
pub(crate) fn read_params(ckpt: &Checkpoint, cfg: &OptConfig, layout: &ParamLayout) -> Result<Vec<f32>> {
    let mut host = vec![0f32; layout.total()];
    for spec in &layout.specs {
        let t = find_tensor(ckpt, &spec.name, cfg.tie_word_embeddings)?;
        if t.shape != spec.shape.as_slice() {
            return Err(ModelError::Weights {
                file: t.file.display().to_string(),
                name: t.name.to_string(),
                detail: format!("shape {:?}, but the config needs {:?}", t.shape, spec.shape),
            });
        }
        t.read_f32_into(&mut host[spec.offset..spec.offset + spec.numel()])?;
    }
    Ok(host)
}

/// Find parameter `name` (HF name without `model.`) under any accepted prefix (also used by
/// `opt-dist` to read one tensor-parallel slice at a time).
pub fn find_tensor<'a>(ckpt: &'a Checkpoint, name: &str, tied: bool) -> Result<opt_checkpoint::TensorRef<'a>> {
    if name == "lm_head.weight" {
        return Ok(ckpt.tensor(name)?);
    }
    for p in PREFIXES {
        let key = format!("{p}{name}");
        if ckpt.contains(&key) {
            return Ok(ckpt.tensor(&key)?);
        }
    }
    // A tied checkpoint may carry the shared matrix only as lm_head.weight.
    if tied && name == "decoder.embed_tokens.weight" && ckpt.contains("lm_head.weight") {
        return Ok(ckpt.tensor("lm_head.weight")?);
    }
    Err(ModelError::Checkpoint(CheckpointError::Missing {
        path: ckpt.describe().into(),
        name: format!("model.{name}"),
    }))
}

pub(crate) fn encode(vals: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => vals.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        DType::F16 => vals.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
    }
}

/// Write a file atomically: temporary file in the same folder, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let io = |e| ModelError::Io { path: path.to_path_buf(), source: e };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}
