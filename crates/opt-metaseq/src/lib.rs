//! opt-metaseq: OPT checkpoints as metaseq shipped them, read safely and turned into our
//! (HF) layout one tensor at a time.
//!
//! OPT-175B exists only in metaseq's format, and the smaller sizes were released in it first.
//! Three layouts occur, all `torch.save` zips of `{"model": state_dict, "cfg": ...,
//! "optimizer_history": ..., ...}` with metaseq's `decoder.*` names:
//!
//! * a **consolidated singleton** (`restored.pt`, `consolidated.pt`): one file, whole tensors;
//! * **tensor-parallel parts** (`reshard-model_part-N.pt`): each file holds 1/P of the
//!   column-parallel tensors (rows of `embed_tokens`, `q/k/v_proj`, `fc1`), 1/P of the columns
//!   of the row-parallel ones (`out_proj`, `fc2` weights), and a copy of everything else
//!   (positions, layer norms, `out_proj` / `fc2` biases) — metaseq's `reshard_mp` layout;
//! * **FSDP flat-parameter shards** (`checkpoint_last-model_part-N-shardK.pt`, the 992 files of
//!   the OPT-175B release): every FSDP-wrapped module's parameters are flattened into one
//!   `flat_param_0`, split across data-parallel ranks and zero-padded; the `shard_metadata`
//!   stored beside the weights says how to cut them back (see [`fsdp`]).
//!
//! A layer's attention may also be one fused `qkv_proj` whose rows are **K, V, Q** (metaseq's
//! sequence-parallel layer; the order HF's converter splits in), per tensor-parallel part.
//!
//! # Pipeline
//!
//! 1. [`inputs`]: expand folders to their `*.pt` files, open each through opt-checkpoint's
//!    restricted unpickler (nothing is executed; `cfg`, `args` and optimizer state are inert
//!    placeholders) and read the file name's `model_part-N` / `shardK`.
//! 2. [`fsdp`]: per model part, unflatten FSDP shards into whole parameters. A parameter is a
//!    list of *segments* — element ranges of tensors in the files — so nothing is copied.
//! 3. [`plan`]: merge the parts (reshard_mp's rules), split fused qkv, rename to HF names
//!    (`decoder.layer_norm` → `decoder.final_layer_norm`, `project_in_dim` → `project_in`, ...;
//!    `decoder.version` and a tied `output_projection` dropped) and check every tensor against
//!    the config. Errors name the files and keys involved.
//! 4. [`read`]: produce one planned tensor's bytes in any dtype, in bounded chunks.
//! 5. [`mod@write`] ([`convert`]): stream an HF folder (safetensors, sharded if large) — headers
//!    are computed from shapes up front, data appended tensor by tensor, input pages released
//!    after every chunk — or [`load_model`]: fill the model's parameters directly.

pub mod fsdp;
pub mod inputs;
pub mod plan;
pub mod read;
pub mod write;

use std::path::{Path, PathBuf};

use opt_checkpoint::CheckpointError;
use opt_model::{ModelError, OptConfig, OptModel, ParamLayout};
use opt_tensor::{Backend, DType};

pub use inputs::{expand_inputs, is_metaseq};
pub use plan::PlannedTensor;
pub use write::{convert, ConvertOptions, ConvertReport};

/// Everything that can go wrong reading metaseq checkpoints. Messages name the files and the
/// tensor keys involved.
#[derive(Debug, thiserror::Error)]
pub enum MetaseqError {
    /// Opening or reading a file (includes pickles refused as unsafe).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The set of files does not form one checkpoint (missing model part or FSDP shard, ...).
    #[error("{0}")]
    Layout(String),
    /// FSDP `shard_metadata` that is malformed or disagrees with the weights.
    #[error("{path}: shard_metadata: {detail}")]
    Metadata { path: PathBuf, detail: String },
    /// A tensor that cannot be merged or does not fit the config.
    #[error("tensor '{name}': {detail}")]
    Tensor { name: String, detail: String },
    /// A layout this crate does not read, with what to do instead.
    #[error("{path}: {detail}")]
    Unsupported { path: PathBuf, detail: String },
}

pub type Result<T> = std::result::Result<T, MetaseqError>;

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> MetaseqError {
    MetaseqError::Io { path: path.to_path_buf(), source }
}

/// A metaseq checkpoint — one or many files — opened and planned as HF tensors for a config.
///
/// Opening reads only the pickles (and memory-maps the files); tensor data is read when a
/// tensor is [`read`](MetaseqCheckpoint::read).
pub struct MetaseqCheckpoint {
    files: Vec<inputs::InputFile>,
    cfg: OptConfig,
    tensors: Vec<PlannedTensor>,
    dropped: Vec<String>,
    layout: String,
}

impl MetaseqCheckpoint {
    /// Opens the metaseq files (or folders of `*.pt` files) in `paths` and plans every
    /// parameter of `cfg` from them.
    pub fn open(paths: &[PathBuf], cfg: &OptConfig) -> Result<Self> {
        cfg.validate("config")?;
        let files = inputs::open_all(&expand_inputs(paths)?)?;
        let groups = inputs::group(&files)?;
        let mut parts = Vec::with_capacity(groups.parts.len());
        for shard_files in &groups.parts {
            parts.push(fsdp::part_params(&files, shard_files)?);
        }
        let planned = plan::plan(&files, &groups.parts, &parts, cfg)?;
        Ok(MetaseqCheckpoint {
            files,
            cfg: cfg.clone(),
            tensors: planned.tensors,
            dropped: planned.dropped,
            layout: groups.describe(),
        })
    }

    /// The planned HF tensors, in [`ParamLayout`] order.
    pub fn tensors(&self) -> &[PlannedTensor] {
        &self.tensors
    }

    /// A planned tensor by its HF name (without `model.`), e.g. `decoder.layers.0.fc1.weight`.
    pub fn tensor(&self, name: &str) -> Result<&PlannedTensor> {
        self.tensors.iter().find(|t| t.name == name).ok_or_else(|| MetaseqError::Tensor {
            name: name.to_string(),
            detail: "not part of this checkpoint's plan".into(),
        })
    }

    pub fn config(&self) -> &OptConfig {
        &self.cfg
    }

    /// metaseq keys present in the files that have no place in the HF model (and why).
    pub fn dropped(&self) -> &[String] {
        &self.dropped
    }

    /// The files, in the order they were given.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// e.g. "2 model parts × 3 FSDP shards (6 files)".
    pub fn describe(&self) -> String {
        self.layout.clone()
    }

    /// The dtype the weights are stored in (that of the token embedding), as one we compute
    /// with: f64 becomes f32.
    pub fn source_dtype(&self) -> DType {
        self.tensors.first().and_then(|t| t.source_dtype(&self.files)).unwrap_or(DType::F32)
    }

    /// Streams tensor `t` converted to `dtype`, in row-major order and bounded chunks, into
    /// `sink` (which sees `numel × dtype size` bytes in total).
    pub fn read(&self, t: &PlannedTensor, dtype: DType, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        read::emit(&self.files, t, dtype, false, sink)
    }

    /// Like [`read`](Self::read), for passes over a whole model: after every chunk the input
    /// files' pages are released from our resident set (see
    /// [`opt_checkpoint::Checkpoint::release_pages`]), so memory stays at about one chunk
    /// however large the checkpoint. Re-reading costs a page-cache lookup, not disk I/O.
    pub fn stream(&self, t: &PlannedTensor, dtype: DType, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        read::emit(&self.files, t, dtype, true, sink)
    }

    /// Tensor `t` as a vector of `dtype` little-endian bytes (small tensors, tests).
    pub fn read_to_vec(&self, t: &PlannedTensor, dtype: DType) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.read(t, dtype, &mut |b| {
            v.extend_from_slice(b);
            Ok(())
        })?;
        Ok(v)
    }

    /// Builds the model: every parameter is streamed from the files into the f32 host buffer
    /// (peak memory: that buffer plus one chunk), then handed to the backend in `dtype`.
    pub fn load_model<B: Backend>(&self, backend: B, dtype: DType) -> Result<OptModel<B>> {
        let layout = ParamLayout::new(&self.cfg);
        let mut host = vec![0f32; layout.total()];
        for spec in &layout.specs {
            let t = self.tensor(&spec.name)?;
            let dst = host.get_mut(spec.offset..spec.offset + spec.numel()).ok_or_else(|| MetaseqError::Tensor {
                name: spec.name.clone(),
                detail: "internal: outside the parameter buffer".into(),
            })?;
            let mut filled = 0usize;
            self.stream(t, DType::F32, &mut |bytes| {
                let n = bytes.len() / 4;
                let out = dst.get_mut(filled..filled + n).ok_or_else(|| MetaseqError::Tensor {
                    name: spec.name.clone(),
                    detail: "internal: more data than the parameter holds".into(),
                })?;
                for (d, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                filled += n;
                Ok(())
            })?;
            if filled != spec.numel() {
                return Err(MetaseqError::Tensor {
                    name: spec.name.clone(),
                    detail: format!("internal: read {filled} of {} elements", spec.numel()),
                });
            }
        }
        Ok(OptModel::from_params(backend, self.cfg.clone(), &host, dtype)?)
    }
}

/// Loads an [`OptModel`] straight from metaseq files (any layout above), for `score`,
/// `generate` and `serve`: the same as converting and loading the HF folder, without writing it.
pub fn load_model<B: Backend>(backend: B, paths: &[PathBuf], cfg: OptConfig, dtype: DType) -> Result<OptModel<B>> {
    MetaseqCheckpoint::open(paths, &cfg)?.load_model(backend, dtype)
}

#[cfg(test)]
mod tests {
    /// The server shares one opened checkpoint (or the model built from it) across threads.
    #[test]
    fn checkpoint_is_send_and_sync() {
        fn assert<T: Send + Sync>() {}
        assert::<super::MetaseqCheckpoint>();
        assert::<super::MetaseqError>();
    }
}
