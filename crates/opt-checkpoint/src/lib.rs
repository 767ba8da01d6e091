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
//!
//! # Layout of the crate
//!
//! * [`safetensors`] — parsing (and validating) a single `.safetensors`
//!   file, which is memory-mapped; tensors borrow their bytes from the map.
//! * `sharded` — the HF `*.index.json` files (`{"metadata": {...}, "weight_map": {...}}`)
//!   that split a checkpoint over several shard files, for both safetensors and `.bin`.
//! * [`pickle`] — the restricted unpickler (allowed opcodes and globals, and why).
//! * [`torchzip`] — PyTorch's zip checkpoint format (`pytorch_model.bin`):
//!   finding `data.pkl`, mapping storages, materialising strided views.
//! * `convert` — dtype conversion (F64/F32/BF16/F16 to f32/bf16/f16, round to nearest even).
//! * `save` — writing safetensors files, single ([`save_safetensors`]) and sharded
//!   ([`save_safetensors_sharded`]), atomically.
//!
//! # Choosing what to open
//!
//! [`Checkpoint::open`] takes a folder or a file. In a folder it uses, in this order:
//! `model.safetensors`, `model.safetensors.index.json`, `pytorch_model.bin`,
//! `pytorch_model.bin.index.json`; otherwise [`CheckpointError::NoWeights`]. A file is read by
//! its name (`*.index.json` is an index, `*.safetensors` safetensors, `*.bin` / `*.pt` / `*.pth`
//! / `*.ckpt` a PyTorch checkpoint; anything else is sniffed: a zip archive is a PyTorch
//! checkpoint, everything else is tried as safetensors).
//!
//! For PyTorch files the state dict is the top-level dict of the pickle (what HF writes), except
//! that a top-level dict with a `"model"` (or else `"state_dict"`) key whose value is a dict
//! holding tensors uses that inner dict (metaseq / fairseq training checkpoints keep the weights
//! under `"model"` next to optimizer state and configuration).
//!
//! # Errors
//!
//! Every error names the file it is about and, where there is one, the tensor. No input, however
//! malformed, makes this crate panic.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use opt_tensor::DType;

mod convert;
pub mod pickle;
pub mod safetensors;
mod save;
mod sharded;
pub mod torchzip;

pub use save::{save_safetensors, save_safetensors_f32_streamed, save_safetensors_raw, save_safetensors_sharded};

/// Element types found in checkpoint files. Only floating types can become OPT weights.
///
/// The variants after `Bool` are the other types a safetensors header (or a torch storage) may
/// declare; they are accepted so that such files can be opened, but only
/// [`FileDType::is_readable_float`] types can be converted by [`TensorRef::read_into`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileDType {
    F64,
    F32,
    BF16,
    F16,
    I64,
    I32,
    U8,
    Bool,
    I16,
    I8,
    U16,
    U32,
    U64,
    /// Complex with two f32 parts (8 bytes).
    C64,
    F8E4M3,
    F8E5M2,
    F8E8M0,
    F8E4M3Fnuz,
    F8E5M2Fnuz,
    F6E2M3,
    F6E3M2,
    F4,
}

impl FileDType {
    /// Size of one element in bits (sub-byte types exist in safetensors).
    pub fn size_in_bits(self) -> usize {
        match self {
            FileDType::F64 | FileDType::I64 | FileDType::U64 | FileDType::C64 => 64,
            FileDType::F32 | FileDType::I32 | FileDType::U32 => 32,
            FileDType::BF16 | FileDType::F16 | FileDType::I16 | FileDType::U16 => 16,
            FileDType::U8
            | FileDType::I8
            | FileDType::Bool
            | FileDType::F8E4M3
            | FileDType::F8E5M2
            | FileDType::F8E8M0
            | FileDType::F8E4M3Fnuz
            | FileDType::F8E5M2Fnuz => 8,
            FileDType::F6E2M3 | FileDType::F6E3M2 => 6,
            FileDType::F4 => 4,
        }
    }

    /// The name safetensors headers use for this type (`"F32"`, `"BF16"`, `"I64"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            FileDType::F64 => "F64",
            FileDType::F32 => "F32",
            FileDType::BF16 => "BF16",
            FileDType::F16 => "F16",
            FileDType::I64 => "I64",
            FileDType::I32 => "I32",
            FileDType::U8 => "U8",
            FileDType::Bool => "BOOL",
            FileDType::I16 => "I16",
            FileDType::I8 => "I8",
            FileDType::U16 => "U16",
            FileDType::U32 => "U32",
            FileDType::U64 => "U64",
            FileDType::C64 => "C64",
            FileDType::F8E4M3 => "F8_E4M3",
            FileDType::F8E5M2 => "F8_E5M2",
            FileDType::F8E8M0 => "F8_E8M0",
            FileDType::F8E4M3Fnuz => "F8_E4M3FNUZ",
            FileDType::F8E5M2Fnuz => "F8_E5M2FNUZ",
            FileDType::F6E2M3 => "F6_E2M3",
            FileDType::F6E3M2 => "F6_E3M2",
            FileDType::F4 => "F4",
        }
    }

    /// Parses a safetensors dtype name; `None` for names this crate does not know.
    pub fn from_safetensors_name(name: &str) -> Option<FileDType> {
        const ALL: [FileDType; 22] = [
            FileDType::F64,
            FileDType::F32,
            FileDType::BF16,
            FileDType::F16,
            FileDType::I64,
            FileDType::I32,
            FileDType::U8,
            FileDType::Bool,
            FileDType::I16,
            FileDType::I8,
            FileDType::U16,
            FileDType::U32,
            FileDType::U64,
            FileDType::C64,
            FileDType::F8E4M3,
            FileDType::F8E5M2,
            FileDType::F8E8M0,
            FileDType::F8E4M3Fnuz,
            FileDType::F8E5M2Fnuz,
            FileDType::F6E2M3,
            FileDType::F6E3M2,
            FileDType::F4,
        ];
        ALL.into_iter().find(|d| d.safetensors_name() == name)
    }

    /// True for the types [`TensorRef::read_into`] can convert: F64, F32, BF16 and F16.
    pub fn is_readable_float(self) -> bool {
        matches!(self, FileDType::F64 | FileDType::F32 | FileDType::BF16 | FileDType::F16)
    }
}

impl From<DType> for FileDType {
    fn from(d: DType) -> FileDType {
        match d {
            DType::F32 => FileDType::F32,
            DType::BF16 => FileDType::BF16,
            DType::F16 => FileDType::F16,
        }
    }
}

impl fmt::Display for FileDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )]
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

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> CheckpointError {
    CheckpointError::Io { path: path.to_path_buf(), source }
}

pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt { path: path.to_path_buf(), detail: detail.into() }
}

pub(crate) fn tensor_err(path: &Path, name: &str, detail: impl Into<String>) -> CheckpointError {
    CheckpointError::Tensor { path: path.to_path_buf(), name: name.to_string(), detail: detail.into() }
}

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

impl fmt::Debug for TensorRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorRef")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.bytes.len())
            .field("file", &self.file)
            .finish()
    }
}

impl TensorRef<'_> {
    /// Number of elements (saturating; shapes of opened files never overflow).
    pub fn numel(&self) -> usize {
        self.shape.iter().fold(1usize, |a, &d| a.saturating_mul(d))
    }
    /// Convert to f32 into `dst` (`dst.len() == numel`); errors for non-float dtypes.
    pub fn read_f32_into(&self, dst: &mut [f32]) -> Result<()> {
        self.read_into(bytemuck::cast_slice_mut::<f32, u8>(dst), DType::F32)?;
        #[cfg(target_endian = "big")]
        for x in dst.iter_mut() {
            *x = f32::from_bits(u32::from_le(x.to_bits()));
        }
        Ok(())
    }
    /// Convert into `dst` of `dtype` given as raw little-endian bytes
    /// (`dst.len() == numel * dtype.size_in_bytes()`), rounding to nearest even.
    ///
    /// Same-type reads (f32→f32, bf16→bf16, f16→f16) are a plain copy.
    pub fn read_into(&self, dst: &mut [u8], dtype: DType) -> Result<()> {
        if !self.dtype.is_readable_float() {
            return Err(tensor_err(
                self.file,
                self.name,
                format!(
                    "has dtype {}, which cannot be read as floating point (only F64, F32, BF16 and F16 can)",
                    self.dtype
                ),
            ));
        }
        let numel = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| tensor_err(self.file, self.name, format!("shape {:?} overflows", self.shape)))?;
        let src_size = self.dtype.size_in_bits() / 8;
        if numel.checked_mul(src_size) != Some(self.bytes.len()) {
            return Err(tensor_err(
                self.file,
                self.name,
                format!(
                    "has {} bytes of data, but shape {:?} of {} needs {} × {src_size}",
                    self.bytes.len(),
                    self.shape,
                    self.dtype,
                    numel
                ),
            ));
        }
        let dst_size = dtype.size_in_bytes();
        if numel.checked_mul(dst_size) != Some(dst.len()) {
            return Err(tensor_err(
                self.file,
                self.name,
                format!(
                    "destination holds {} bytes, but shape {:?} as {} needs {} × {dst_size}",
                    dst.len(),
                    self.shape,
                    dtype,
                    numel
                ),
            ));
        }
        convert::convert(self.bytes, self.dtype, dst, dtype);
        Ok(())
    }
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.numel()];
        self.read_f32_into(&mut v)?;
        Ok(v)
    }
    /// Convert into a new vector of `dtype` little-endian bytes.
    pub fn to_vec(&self, dtype: DType) -> Result<Vec<u8>> {
        let len = self
            .numel()
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| tensor_err(self.file, self.name, "size overflows"))?;
        let mut v = vec![0u8; len];
        self.read_into(&mut v, dtype)?;
        Ok(v)
    }
}

/// The layout a [`Checkpoint`] was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// One `.safetensors` file.
    Safetensors,
    /// Several safetensors shards listed by `model.safetensors.index.json`.
    ShardedSafetensors,
    /// One PyTorch zip checkpoint (`pytorch_model.bin`).
    PytorchBin,
    /// Several PyTorch shards listed by `pytorch_model.bin.index.json`.
    ShardedPytorchBin,
}

impl fmt::Display for CheckpointFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckpointFormat::Safetensors => "safetensors",
            CheckpointFormat::ShardedSafetensors => "sharded safetensors",
            CheckpointFormat::PytorchBin => "pytorch zip",
            CheckpointFormat::ShardedPytorchBin => "sharded pytorch zip",
        })
    }
}

/// Where a tensor's bytes live.
pub(crate) enum Data {
    /// A byte range of the file's memory map.
    Map { start: usize, len: usize },
    /// A byte range of one of the file's decompressed buffers.
    Buf { buf: usize, start: usize, len: usize },
    /// Bytes materialised at open time (e.g. a strided view copied to contiguous).
    Owned(Vec<u8>),
}

/// One tensor's metadata and location.
pub(crate) struct Entry {
    pub(crate) dtype: FileDType,
    pub(crate) shape: Vec<usize>,
    /// Index into [`Checkpoint::files`] (for a freshly loaded file: 0).
    pub(crate) file: usize,
    pub(crate) data: Data,
}

/// The backing store of one opened file.
pub(crate) struct LoadedFile {
    pub(crate) path: PathBuf,
    pub(crate) map: memmap2::Mmap,
    /// Decompressed zip entries (PyTorch files whose storages are not stored uncompressed).
    pub(crate) bufs: Vec<Vec<u8>>,
}

/// One file as read by a format loader: its backing store and its tensors (all with `file: 0`).
pub(crate) struct Loaded {
    pub(crate) file: LoadedFile,
    pub(crate) tensors: Vec<(String, Entry)>,
}

/// Memory-maps a whole file read-only.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    // SAFETY: the map is read-only and private to this process. As with every memory-mapped
    // reader, another process truncating or rewriting the file while it is open is undefined
    // behaviour (in practice SIGBUS or changed bytes); checkpoint files are not modified while
    // being read, and our own writer replaces files by rename, which leaves open maps intact.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| io_err(path, e))?;
    Ok(map)
}

/// An opened checkpoint (one or several files).
pub struct Checkpoint {
    source: PathBuf,
    format: CheckpointFormat,
    files: Vec<LoadedFile>,
    tensors: BTreeMap<String, Entry>,
}

pub(crate) const SAFETENSORS: &str = "model.safetensors";
pub(crate) const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
pub(crate) const PYTORCH_BIN: &str = "pytorch_model.bin";
pub(crate) const PYTORCH_BIN_INDEX: &str = "pytorch_model.bin.index.json";

impl Checkpoint {
    /// Open the weights in an HF model folder (or a single `.safetensors` / `.bin` file, or an
    /// `*.index.json`).
    ///
    /// In a folder the first of `model.safetensors`, `model.safetensors.index.json`,
    /// `pytorch_model.bin`, `pytorch_model.bin.index.json` that exists is used.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
        if meta.is_dir() {
            for name in [SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX] {
                let p = path.join(name);
                if p.is_file() {
                    let mut ck = Self::open_file(&p)?;
                    ck.source = path.to_path_buf();
                    return Ok(ck);
                }
            }
            return Err(CheckpointError::NoWeights { path: path.to_path_buf() });
        }
        Self::open_file(path)
    }

    fn open_file(path: &Path) -> Result<Checkpoint> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.ends_with(".index.json") {
            let (format, loaded) = sharded::load(path)?;
            return Ok(Self::assemble(path, format, loaded));
        }
        let torch_ext = [".bin", ".pt", ".pth", ".ckpt"].iter().any(|e| name.ends_with(e));
        let (format, loaded) = if name.ends_with(".safetensors") {
            (CheckpointFormat::Safetensors, safetensors::load(path)?)
        } else if torch_ext || torchzip::looks_like_zip(path)? {
            (CheckpointFormat::PytorchBin, torchzip::load(path)?)
        } else {
            (CheckpointFormat::Safetensors, safetensors::load(path)?)
        };
        let files = vec![loaded.file];
        let tensors = loaded.tensors.into_iter().collect();
        Ok(Checkpoint { source: path.to_path_buf(), format, files, tensors })
    }

    fn assemble(
        source: &Path,
        format: CheckpointFormat,
        (files, tensors): (Vec<LoadedFile>, BTreeMap<String, Entry>),
    ) -> Checkpoint {
        Checkpoint { source: source.to_path_buf(), format, files, tensors }
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    /// The layout the weights were read from.
    pub fn format(&self) -> CheckpointFormat {
        self.format
    }
    /// The files the weights were read from (one, or the shards in name order).
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }
    /// A tensor by its name in the file; `Missing` if absent.
    pub fn tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        let (key, entry) = self
            .tensors
            .get_key_value(name)
            .ok_or_else(|| CheckpointError::Missing { path: self.source.clone(), name: name.to_string() })?;
        self.make_ref(key, entry)
    }
    /// All tensors, in name order.
    pub fn tensors(&self) -> impl Iterator<Item = Result<TensorRef<'_>>> + '_ {
        self.tensors.iter().map(|(k, e)| self.make_ref(k, e))
    }

    fn make_ref<'a>(&'a self, name: &'a str, entry: &'a Entry) -> Result<TensorRef<'a>> {
        let file =
            self.files.get(entry.file).ok_or_else(|| tensor_err(&self.source, name, "internal: bad file index"))?;
        let bytes: Option<&[u8]> = match &entry.data {
            Data::Map { start, len } => start.checked_add(*len).and_then(|end| file.map.get(*start..end)),
            Data::Buf { buf, start, len } => {
                start.checked_add(*len).and_then(|end| file.bufs.get(*buf).and_then(|b| b.get(*start..end)))
            }
            Data::Owned(v) => Some(v.as_slice()),
        };
        let bytes = bytes.ok_or_else(|| tensor_err(&file.path, name, "data range lies outside the file"))?;
        Ok(TensorRef { name, dtype: entry.dtype, shape: &entry.shape, bytes, file: &file.path })
    }

    /// Drops the pages of this checkpoint's memory-mapped files from the process's resident
    /// set (`MADV_DONTNEED`); a later read faults them back in from the file.
    ///
    /// Reading every tensor of a memory-mapped checkpoint leaves all of its pages resident and
    /// counted in the process's RSS, even though the kernel may reclaim them. A caller that
    /// streams a checkpoint larger than RAM tensor by tensor (a format converter) calls this
    /// after each tensor so that its footprint stays at what it is working on. Decompressed and
    /// copied tensors live on the heap and are not affected. No-op where `madvise` is missing.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        for f in &self.files {
            // SAFETY: the maps are read-only views of files that are not modified while open
            // (the assumption `map_file` already rests on). For such a mapping, MADV_DONTNEED
            // only unmaps the pages: the next access reads the same bytes back from the file,
            // so slices borrowed from the map keep seeing identical contents.
            let _ = unsafe { f.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// A short description of where the weights came from (for messages), e.g. the folder path.
    pub fn describe(&self) -> String {
        let n = self.files.len();
        if n > 1 {
            format!("{} ({}, {} shards, {} tensors)", self.source.display(), self.format, n, self.tensors.len())
        } else {
            format!("{} ({}, {} tensors)", self.source.display(), self.format, self.tensors.len())
        }
    }
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A tensor to write: name, dtype, shape and little-endian bytes.
pub struct TensorWrite<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

/// A tensor to write with any safetensors dtype (see [`save_safetensors_raw`]).
pub struct RawTensorWrite<'a> {
    pub name: String,
    pub dtype: FileDType,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}
