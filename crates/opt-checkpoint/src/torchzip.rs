//! PyTorch checkpoints (`pytorch_model.bin`, `*.pt`): the zip format of `torch.save` (≥ 1.6).
//!
//! # Layout
//!
//! ```text
//! <archive>/data.pkl          the pickled object (a state dict), protocol 2
//! <archive>/byteorder         optional, "little" (big-endian files are refused)
//! <archive>/data/<key>        one entry per storage: its raw little-endian bytes
//! <archive>/version, .data/serialization_id, ...   ignored
//! ```
//!
//! `<archive>` is usually `archive` but torch uses the file stem in some versions, so `data.pkl`
//! is found by suffix. Tensors in the pickle are `_rebuild_tensor_v2(storage, offset, size,
//! stride, ...)` calls whose storage is a persistent id `('storage', torch.FloatStorage, key,
//! location, numel)` — see [`crate::pickle`] for how this is interpreted without running code.
//!
//! # Storages and views
//!
//! torch writes storages uncompressed ("stored") and 64-byte aligned, so the file is
//! memory-mapped and a stored entry's bytes are taken directly from the map; compressed entries
//! (from other zip tools) are decompressed into memory once per storage. Many tensors may share
//! one storage at different offsets (metaseq / fairseq files do this), so a tensor is the view
//! `storage[offset ..]` with its `size` and `stride`. Contiguous views borrow the storage bytes;
//! any other view (transposed, sliced, expanded) is copied into a contiguous buffer at open time.
//! Every index is bounds-checked against the storage first.
//!
//! # Which dict is the state dict
//!
//! The top-level object must be a dict. If it has a `"model"` key whose value is a dict holding
//! at least one tensor, that inner dict is the state dict (metaseq / fairseq checkpoints:
//! `{"model": {...}, "cfg": ..., "last_optimizer_state": ...}`); failing that the same for a
//! `"state_dict"` key; otherwise the top-level dict itself (HF `pytorch_model.bin`). In the
//! chosen dict, tensors are kept under their (string) keys, plain non-tensor values (ints,
//! strings, None, nested containers) are skipped, and a placeholder value — something only code
//! execution could have built — is refused with
//! [`CheckpointError::Unsafe`].

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;
use std::rc::Rc;

use crate::pickle::{self, TensorDesc, Unpickled, Value};
use crate::{corrupt, io_err, map_file, CheckpointError, Data, Entry, Loaded, LoadedFile, Result};

/// Largest `data.pkl` accepted (state dict pickles are a few MB even for huge models).
const MAX_PICKLE: u64 = 1 << 30;
/// Budget for copies of non-contiguous views, beyond 4× the file size: keeps a small file
/// full of overlapping (e.g. stride-0 "expanded") views from requesting huge buffers.
const COPY_ALLOWANCE: u64 = 1 << 30;

/// True when the file starts with a zip local-file header (or is an empty zip).
pub(crate) fn looks_like_zip(path: &Path) -> Result<bool> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < 4 {
        match f.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(path, e)),
        }
    }
    Ok(n == 4 && (magic == *b"PK\x03\x04" || magic == *b"PK\x05\x06"))
}

/// Where a storage's bytes are.
#[derive(Clone, Copy)]
enum StorageLoc {
    Map { start: usize, len: usize },
    Buf { buf: usize, len: usize },
}

impl StorageLoc {
    fn len(self) -> usize {
        match self {
            StorageLoc::Map { len, .. } | StorageLoc::Buf { len, .. } => len,
        }
    }
}

/// Opens a PyTorch zip checkpoint.
pub(crate) fn load(path: &Path) -> Result<Loaded> {
    let map = map_file(path)?;
    if !map.starts_with(b"PK") {
        return Err(corrupt(
            path,
            "not a zip archive (PyTorch's legacy pre-1.6 format is not supported; re-save with torch.save or use safetensors)",
        ));
    }
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let tensors = {
        let bytes: &[u8] = &map;
        let mut zip =
            zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| corrupt(path, format!("bad zip archive: {e}")))?;

        let (prefix, unpickled) = unpickle_data_pkl(path, &mut zip)?;
        let wanted = select_state_dict(path, &unpickled)?;

        let mut storages: HashMap<String, StorageLoc> = HashMap::new();
        let mut copy_budget = (bytes.len() as u64).saturating_mul(4).saturating_add(COPY_ALLOWANCE);
        let mut tensors = Vec::with_capacity(wanted.len());
        for (name, desc) in wanted {
            let key = &desc.storage.key;
            let loc = match storages.get(key) {
                Some(l) => *l,
                None => {
                    let entry = format!("{prefix}data/{key}");
                    let l = locate_storage(&mut zip, bytes.len(), &entry, &mut bufs).map_err(|e| {
                        CheckpointError::Tensor {
                            path: path.to_path_buf(),
                            name: name.clone(),
                            detail: format!("storage {entry}: {e}"),
                        }
                    })?;
                    storages.insert(key.clone(), l);
                    l
                }
            };
            let entry = materialise(bytes, &bufs, loc, &desc, &mut copy_budget)
                .map_err(|detail| CheckpointError::Tensor { path: path.to_path_buf(), name: name.clone(), detail })?;
            tensors.push((name, entry));
        }
        tensors
    };
    Ok(Loaded { file: LoadedFile { path: path.to_path_buf(), map, bufs }, tensors })
}

/// Reads and unpickles `data.pkl` of a PyTorch zip checkpoint without touching its storages.
///
/// This is the whole pickled object — for callers that need the values stored beside the
/// state dict, such as metaseq's FSDP `shard_metadata` — interpreted by the same restricted
/// unpickler as [`Checkpoint::open`](crate::Checkpoint::open): nothing is imported or called,
/// and every global outside the allow-list is an inert [`Value::Opaque`] placeholder. Tensors
/// appear as [`Value::Tensor`] descriptions; their bytes are not read (open the file as a
/// [`Checkpoint`](crate::Checkpoint) for those).
pub fn read_pickle(path: &Path) -> Result<Unpickled> {
    let map = map_file(path)?;
    if !map.starts_with(b"PK") {
        return Err(corrupt(path, "not a zip archive (PyTorch's legacy pre-1.6 format is not supported)"));
    }
    let bytes: &[u8] = &map;
    let mut zip =
        zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| corrupt(path, format!("bad zip archive: {e}")))?;
    Ok(unpickle_data_pkl(path, &mut zip)?.1)
}

/// Finds `<prefix>data.pkl` (preferring exactly one folder level, `archive/data.pkl`), checks
/// the byte order, and unpickles it. Returns the entry prefix (`archive/`) and the object.
fn unpickle_data_pkl(path: &Path, zip: &mut zip::ZipArchive<Cursor<&[u8]>>) -> Result<(String, Unpickled)> {
    let names: Vec<String> =
        (0..zip.len()).filter_map(|i| zip.name_for_index(i).and_then(|r| r.ok()).map(|n| n.into_owned())).collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .or_else(|| names.iter().find(|n| n.ends_with("/data.pkl") || *n == "data.pkl"))
        .ok_or_else(|| corrupt(path, "zip archive has no data.pkl (not a torch.save file?)"))?
        .clone();
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();

    let byteorder_name = format!("{prefix}byteorder");
    if names.contains(&byteorder_name) {
        let b = read_entry(zip, &byteorder_name, 64).map_err(|e| corrupt(path, e))?;
        let order = String::from_utf8_lossy(&b);
        if order.trim() != "little" {
            return Err(corrupt(
                path,
                format!("byteorder is {:?}; only little-endian checkpoints are supported", order.trim()),
            ));
        }
    }

    let pkl_bytes = read_entry(zip, &pkl, MAX_PICKLE).map_err(|e| corrupt(path, e))?;
    let unpickled = pickle::unpickle(&pkl_bytes).map_err(|e| corrupt(path, format!("{pkl}: {e}")))?;
    Ok((prefix, unpickled))
}

/// Reads a whole (small) entry, refusing more than `limit` bytes.
fn read_entry(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    limit: u64,
) -> std::result::Result<Vec<u8>, String> {
    let f = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    if f.size() > limit {
        return Err(format!("{name}: {} bytes is too large", f.size()));
    }
    let mut v = Vec::new();
    f.take(limit + 1).read_to_end(&mut v).map_err(|e| format!("{name}: {e}"))?;
    if v.len() as u64 > limit {
        return Err(format!("{name}: too large"));
    }
    Ok(v)
}

/// Finds a storage's bytes: a range of the map for stored entries, else decompresses.
fn locate_storage(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    file_len: usize,
    entry: &str,
    bufs: &mut Vec<Vec<u8>>,
) -> std::result::Result<StorageLoc, String> {
    let idx = zip.index_for_name(entry).ok_or("missing from the zip archive")?;
    let (stored, start, size, csize) = {
        let f = zip.by_index_raw(idx).map_err(|e| e.to_string())?;
        if f.encrypted() {
            return Err("encrypted zip entries are not supported".into());
        }
        (f.compression() == zip::CompressionMethod::Stored, f.data_start(), f.size(), f.compressed_size())
    };
    if stored {
        let start = start.ok_or("zip entry has no data offset")?;
        let end = start.checked_add(csize).filter(|&e| e <= file_len as u64 && csize == size).ok_or_else(|| {
            format!("stored zip entry [{start}, {start}+{csize}) lies outside the file ({file_len} bytes; truncated?)")
        })?;
        // end <= file_len: both fit in usize.
        return Ok(StorageLoc::Map { start: start as usize, len: (end - start) as usize });
    }
    let f = zip.by_index(idx).map_err(|e| e.to_string())?;
    let mut v = Vec::new();
    // Reserve what the header promises, up to 64 MiB (a lying header cannot make us allocate
    // more than the decompressed data actually needs).
    v.try_reserve(usize::try_from(size.min(1 << 26)).unwrap_or(0))
        .map_err(|_| format!("cannot allocate {size} bytes"))?;
    f.take(size).read_to_end(&mut v).map_err(|e| format!("decompressing: {e}"))?;
    if v.len() as u64 != size {
        return Err(format!("decompressed to {} bytes, expected {size}", v.len()));
    }
    let len = v.len();
    bufs.push(v);
    Ok(StorageLoc::Buf { buf: bufs.len() - 1, len })
}

/// Turns a tensor view into an [`Entry`]: borrowed if contiguous, copied otherwise.
fn materialise(
    map: &[u8],
    bufs: &[Vec<u8>],
    loc: StorageLoc,
    desc: &TensorDesc,
    copy_budget: &mut u64,
) -> std::result::Result<Entry, String> {
    let dtype = desc.storage.dtype;
    let esz = (dtype.size_in_bits() / 8) as u64;
    let storage_bytes = loc.len() as u64;
    let declared = desc.storage.numel.checked_mul(esz).ok_or("storage size overflows")?;
    if declared > storage_bytes {
        return Err(format!(
            "storage holds {storage_bytes} bytes but declares {} elements of {dtype} ({declared} bytes)",
            desc.storage.numel
        ));
    }
    let storage_numel = storage_bytes / esz;
    let shape: Vec<usize> = desc
        .size
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| "dimension overflows".to_string()))
        .collect::<std::result::Result<_, _>>()?;
    let numel = desc.size.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or("size overflows")?;
    let nbytes = numel.checked_mul(esz).ok_or("size overflows")?;
    if numel == 0 {
        return Ok(Entry { dtype, shape, file: 0, data: Data::Owned(Vec::new()) });
    }
    // Largest element index the view touches.
    let mut last = desc.offset;
    for (&d, &s) in desc.size.iter().zip(&desc.stride) {
        last = (d - 1).checked_mul(s).and_then(|x| x.checked_add(last)).ok_or("view extent overflows")?;
    }
    if last >= storage_numel {
        return Err(format!(
            "view (offset {}, size {:?}, stride {:?}) reaches element {last}, past the storage's {storage_numel} elements",
            desc.offset, desc.size, desc.stride
        ));
    }
    // Bounds are checked: all byte offsets below are < storage_bytes <= usize::MAX.
    let (base, src): (usize, &[u8]) = match loc {
        StorageLoc::Map { start, len } => (start, map.get(start..start + len).unwrap_or_default()),
        StorageLoc::Buf { buf, len } => (0, bufs.get(buf).and_then(|b| b.get(..len)).unwrap_or_default()),
    };
    let esz = esz as usize;
    let offset_bytes = desc.offset as usize * esz;
    if is_contiguous(&desc.size, &desc.stride) {
        let len = nbytes as usize;
        let data = match loc {
            StorageLoc::Map { .. } => Data::Map { start: base + offset_bytes, len },
            StorageLoc::Buf { buf, .. } => Data::Buf { buf, start: offset_bytes, len },
        };
        return Ok(Entry { dtype, shape, file: 0, data });
    }
    if nbytes > *copy_budget {
        return Err(format!(
            "non-contiguous view of {nbytes} bytes (over a {storage_bytes}-byte storage) exceeds what this file may make us copy"
        ));
    }
    *copy_budget -= nbytes;
    let out = gather(src, esz, desc.offset as usize, &shape, &desc.stride)?;
    Ok(Entry { dtype, shape, file: 0, data: Data::Owned(out) })
}

/// Row-major contiguity, ignoring the strides of size-1 dimensions.
fn is_contiguous(size: &[u64], stride: &[u64]) -> bool {
    let mut expected = 1u64;
    for (&d, &s) in size.iter().zip(stride).rev() {
        if d != 1 {
            if s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
    }
    true
}

/// Copies a strided view (already bounds-checked, non-empty) into a contiguous buffer.
fn gather(
    src: &[u8],
    esz: usize,
    offset: usize,
    shape: &[usize],
    stride: &[u64],
) -> std::result::Result<Vec<u8>, String> {
    let numel: usize = shape.iter().product();
    let mut out: Vec<u8> = Vec::new();
    out.try_reserve_exact(numel * esz).map_err(|_| format!("cannot allocate {} bytes", numel * esz))?;
    let stride: Vec<usize> = stride.iter().map(|&s| s as usize).collect();
    let ndim = shape.len();
    let mut idx = vec![0usize; ndim];
    let (inner_n, inner_s) = match (shape.last(), stride.last()) {
        (Some(&n), Some(&s)) => (n, s),
        _ => (1, 0), // 0-dim tensor: one element
    };
    let outer = ndim.saturating_sub(1);
    loop {
        let mut pos = offset;
        for d in 0..outer {
            pos += idx[d] * stride[d];
        }
        for i in 0..inner_n {
            let p = (pos + i * inner_s) * esz;
            out.extend_from_slice(src.get(p..p + esz).ok_or("view out of bounds")?);
        }
        // advance the outer multi-index
        let mut d = outer;
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Picks the state dict (see the module docs) and returns its tensors.
fn select_state_dict(path: &Path, u: &Unpickled) -> Result<Vec<(String, Rc<TensorDesc>)>> {
    let top = u.top();
    let unsafe_err = |detail: String| CheckpointError::Unsafe { path: path.to_path_buf(), detail };
    match top {
        Value::Dict(_) => {}
        Value::Opaque(d) => {
            return Err(unsafe_err(format!(
                "the pickled object is built by `{d}`, which is not on the allow-list of torch.save globals (it was not executed)"
            )))
        }
        other => {
            return Err(corrupt(
                path,
                format!("the pickled object is {}, not a state dict", other.kind()),
            ))
        }
    }
    let holds_tensor = |v: &Value| u.dict(v).iter().any(|(_, x)| matches!(x, Value::Tensor(_)));
    let sd = ["model", "state_dict"].iter().filter_map(|k| u.get(top, k)).find(|v| holds_tensor(v)).unwrap_or(top);

    let mut out: Vec<(String, Rc<TensorDesc>)> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (k, v) in u.dict(sd) {
        let name = match k {
            Value::Str(s) => s.to_string(),
            other => {
                if matches!(v, Value::Tensor(_)) {
                    return Err(corrupt(
                        path,
                        format!("state dict has a tensor under {}, not a string key", other.kind()),
                    ));
                }
                continue;
            }
        };
        match v {
            Value::Tensor(t) => {
                // Later duplicates win, as in a Python dict.
                if let Some(&i) = seen.get(&name) {
                    out[i].1 = t.clone();
                } else {
                    seen.insert(name.clone(), out.len());
                    out.push((name, t.clone()));
                }
            }
            Value::Opaque(d) => {
                return Err(unsafe_err(format!(
                    "tensor '{name}' would be built by `{d}`, which is not on the allow-list of torch.save globals (it was not executed)"
                )))
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(!is_contiguous(&[2, 3], &[6, 1]));
    }

    #[test]
    fn random_views_never_panic() {
        use crate::pickle::StorageRef;
        use crate::FileDType;
        let mut s = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let storage: Vec<u8> = (0..64).collect();
        let interesting = [0u64, 1, 2, 3, 7, 16, 63, 64, u32::MAX as u64, u64::MAX / 3, u64::MAX];
        for _ in 0..20000 {
            let mut pick = |small: bool| {
                let r = next();
                if small || r % 4 != 0 {
                    r % 5
                } else {
                    interesting[(r >> 8) as usize % interesting.len()]
                }
            };
            let ndim = (pick(true) % 4) as usize;
            let size: Vec<u64> = (0..ndim).map(|_| pick(false)).collect();
            let stride: Vec<u64> = (0..ndim).map(|_| pick(false)).collect();
            let desc = TensorDesc {
                storage: Rc::new(StorageRef {
                    dtype: [FileDType::F32, FileDType::BF16, FileDType::U8][(pick(true) % 3) as usize],
                    key: "0".into(),
                    location: "cpu".into(),
                    numel: pick(false),
                }),
                offset: pick(false),
                size,
                stride,
            };
            let loc = StorageLoc::Map { start: 0, len: storage.len() };
            if let Ok(e) = materialise(&storage, &[], loc, &desc, &mut (1 << 20)) {
                let n: usize = e.shape.iter().product();
                let len = match e.data {
                    Data::Map { start, len } => {
                        assert!(start + len <= storage.len());
                        len
                    }
                    Data::Owned(v) => v.len(),
                    Data::Buf { .. } => unreachable!(),
                };
                assert_eq!(len, n * desc.storage.dtype.size_in_bits() / 8);
            }
        }
    }

    #[test]
    fn gather_transpose_and_offset() {
        // storage 0..8 as u8, view offset 1, size [2, 3], stride [1, 2] (a transposed slice)
        let src: Vec<u8> = (0..8).collect();
        let out = gather(&src, 1, 1, &[2, 3], &[1, 2]).unwrap();
        assert_eq!(out, vec![1, 3, 5, 2, 4, 6]);
        // 0-dim
        assert_eq!(gather(&src, 1, 5, &[], &[]).unwrap(), vec![5]);
        // expanded (stride 0)
        assert_eq!(gather(&src, 2, 1, &[3], &[0]).unwrap(), vec![2, 3, 2, 3, 2, 3]);
    }
}
