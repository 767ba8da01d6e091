//! opt-checkpoint: reading and writing OPT weights.
//!
//! Reads an HF model folder in any of its layouts — `model.safetensors`, sharded safetensors
//! with `model.safetensors.index.json`, or `pytorch_model.bin` (a zip of pickle + raw storages,
//! read by a restricted unpickler that only rebuilds tensors, storages and plain containers and
//! never runs code) — and writes our models as safetensors that HF transformers loads.
//!
//! Tensors are exposed by the name they have in the file (`model.decoder.layers.0.fc1.weight`,
//! `decoder.embed_tokens.weight`, `lm_head.weight`, ...); mapping names to model parameters is
//! the model crate's job.

use std::path::{Path, PathBuf};

pub use opt_tensor::DType;

/// Element types found in checkpoint files. Only floating types can become OPT weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileDType {
    F64,
    F32,
    BF16,
    F16,
    I64,
    I32,
    U8,
    Bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)")]
    NoWeights { path: PathBuf },
    #[error("{path}: corrupt or truncated file: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: tensor '{name}': {detail}")]
    Tensor { path: PathBuf, name: String, detail: String },
    #[error("tensor '{name}' not found (looked in {path})")]
    Missing { path: PathBuf, name: String },
    #[error("{path}: refused to load: {detail}")]
    Unsafe { path: PathBuf, detail: String },
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

/// One tensor of an opened checkpoint: metadata plus its little-endian bytes (borrowed from a
/// memory map where the format allows).
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: FileDType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
    /// The file this tensor lives in (for error messages).
    pub file: &'a Path,
}

impl TensorRef<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Convert to f32 into `dst` (`dst.len() == numel`); errors for non-float dtypes.
    pub fn read_f32_into(&self, _dst: &mut [f32]) -> Result<()> {
        todo!()
    }
    /// Convert into `dst` of `dtype` given as raw little-endian bytes
    /// (`dst.len() == numel * dtype.size_in_bytes()`), rounding to nearest even.
    pub fn read_into(&self, _dst: &mut [u8], _dtype: DType) -> Result<()> {
        todo!()
    }
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.numel()];
        self.read_f32_into(&mut v)?;
        Ok(v)
    }
}

/// An opened checkpoint (one or several files).
pub struct Checkpoint {
    _dir: PathBuf,
}

impl Checkpoint {
    /// Open the weights in an HF model folder (or a single `.safetensors` / `.bin` file).
    pub fn open(_path: &Path) -> Result<Checkpoint> {
        todo!()
    }
    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        todo!()
    }
    pub fn contains(&self, _name: &str) -> bool {
        todo!()
    }
    /// A tensor by its name in the file; `Missing` if absent.
    pub fn tensor(&self, _name: &str) -> Result<TensorRef<'_>> {
        todo!()
    }
    /// A short description of where the weights came from (for messages), e.g. the folder path.
    pub fn describe(&self) -> String {
        todo!()
    }
}

/// A tensor to write: name, dtype, shape and little-endian bytes.
pub struct TensorWrite<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

/// Write tensors as one safetensors file (with `{"format": "pt"}` metadata, as HF writes),
/// atomically (temporary file + rename).
pub fn save_safetensors(_path: &Path, _tensors: &[TensorWrite<'_>]) -> Result<()> {
    todo!()
}
