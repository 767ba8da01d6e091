//! Reading safetensors files.
//!
//! # Format
//!
//! ```text
//! +----------------+----------------------------+--------------------------------------+
//! | N: u64 LE (8)  | header: N bytes JSON UTF-8 | data section: raw little-endian bytes |
//! +----------------+----------------------------+--------------------------------------+
//! ```
//!
//! The header is a JSON object mapping each tensor name to
//! `{"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}`, plus an optional
//! `"__metadata__"` object of string → string (HF writes `{"format": "pt"}`). Offsets are
//! relative to the start of the data section, `end - begin` must equal
//! `numel × size(dtype)`, and tensors are stored row-major (C order). Writers pad the header
//! with spaces so that the data section starts 8-byte aligned.
//!
//! The file is memory-mapped and tensors borrow their bytes from the map, so opening is cheap
//! and nothing is copied until a tensor is converted.
//!
//! # Validation
//!
//! Everything is checked before a tensor is handed out: the header length lies inside the file
//! (and below 100 MB, as in the reference implementation), the header is a JSON object whose
//! entries have a known dtype, an integer shape and two ordered offsets inside the data section
//! that match dtype × shape. Overlapping tensors and gaps are tolerated (the format forbids
//! them, but they cannot make reading unsafe). A truncated file therefore fails with
//! [`CheckpointError::Corrupt`](crate::CheckpointError::Corrupt) naming the file (and the first
//! tensor that does not fit), never with a panic or an out-of-bounds read.

use std::path::Path;

use serde_json::Value;

use crate::{corrupt, map_file, Data, Entry, FileDType, Loaded, LoadedFile, Result};

/// Largest header accepted (the reference implementation's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor as described by a safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: FileDType,
    pub shape: Vec<usize>,
    /// Byte range within the whole file (the header-relative offsets plus `8 + N`).
    pub start: usize,
    pub len: usize,
}

/// A parsed safetensors header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Tensors in file (data offset) order.
    pub tensors: Vec<HeaderEntry>,
    /// The `__metadata__` object, with non-string values rendered as JSON.
    pub metadata: Vec<(String, String)>,
}

/// Parses and validates the header of a safetensors file held entirely in `bytes`.
///
/// Returns a description of the problem (without the file name) on failure.
pub fn parse(bytes: &[u8]) -> std::result::Result<Header, String> {
    let file_len = bytes.len() as u64;
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(format!("file is {file_len} bytes, shorter than the 8-byte header length"));
    };
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(n8);
    if n > file_len - 8 {
        return Err(format!(
            "header length {n} exceeds the {} bytes after the length field (file is {file_len} bytes)",
            file_len - 8
        ));
    }
    if n > MAX_HEADER_LEN {
        return Err(format!("header length {n} exceeds the {MAX_HEADER_LEN}-byte limit"));
    }
    // n <= file_len - 8 <= usize::MAX: these conversions and the slicing below are exact.
    let header_end = 8 + n as usize;
    let header = bytes.get(8..header_end).unwrap_or_default();
    let data_len = bytes.len() - header_end;

    let obj: serde_json::Map<String, Value> =
        serde_json::from_slice(header).map_err(|e| format!("header is not a valid JSON object: {e}"))?;

    let mut out = Header::default();
    for (name, v) in obj {
        if name == "__metadata__" {
            let Value::Object(m) = v else {
                return Err("header field __metadata__ is not an object".into());
            };
            out.metadata = m
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect();
            continue;
        }
        let entry = parse_entry(&name, &v, data_len).map_err(|e| format!("tensor '{name}': {e}"))?;
        out.tensors.push(HeaderEntry {
            name,
            dtype: entry.0,
            shape: entry.1,
            start: header_end + entry.2,
            len: entry.3,
        });
    }
    out.tensors.sort_by_key(|t| (t.start, t.len));
    Ok(out)
}

/// Validates one header entry; returns (dtype, shape, data-relative start, length).
fn parse_entry(
    _name: &str,
    v: &Value,
    data_len: usize,
) -> std::result::Result<(FileDType, Vec<usize>, usize, usize), String> {
    let Value::Object(o) = v else {
        return Err("header entry is not an object".into());
    };
    let dtype_name = o.get("dtype").and_then(Value::as_str).ok_or("missing or non-string \"dtype\"")?;
    let dtype = FileDType::from_safetensors_name(dtype_name).ok_or_else(|| format!("unknown dtype {dtype_name:?}"))?;
    let shape_v = o.get("shape").and_then(Value::as_array).ok_or("missing or non-array \"shape\"")?;
    let mut shape = Vec::with_capacity(shape_v.len());
    for d in shape_v {
        let d = d
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| format!("shape {shape_v:?} has a non-integer or negative dimension"))?;
        shape.push(d);
    }
    let offs = o.get("data_offsets").and_then(Value::as_array).ok_or("missing or non-array \"data_offsets\"")?;
    let (begin, end) = match offs.as_slice() {
        [b, e] => (
            b.as_u64().ok_or("data_offsets are not non-negative integers")?,
            e.as_u64().ok_or("data_offsets are not non-negative integers")?,
        ),
        _ => return Err(format!("data_offsets {offs:?} is not [begin, end]")),
    };
    if begin > end {
        return Err(format!("data_offsets [{begin}, {end}] are reversed"));
    }
    if end > data_len as u64 {
        return Err(format!(
            "data_offsets [{begin}, {end}] exceed the data section ({data_len} bytes; file truncated?)"
        ));
    }
    let nbits = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size_in_bits()))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if !nbits.is_multiple_of(8) {
        return Err(format!("shape {shape:?} of {dtype} does not fill a whole number of bytes"));
    }
    let nbytes = nbits / 8;
    // end <= data_len, so both fit in usize.
    let (begin, end) = (begin as usize, end as usize);
    if end - begin != nbytes {
        return Err(format!(
            "data_offsets [{begin}, {end}] span {} bytes, but shape {shape:?} of {dtype} needs {nbytes}",
            end - begin
        ));
    }
    Ok((dtype, shape, begin, nbytes))
}

/// Memory-maps and validates a safetensors file.
pub(crate) fn load(path: &Path) -> Result<Loaded> {
    let map = map_file(path)?;
    let header = parse(&map).map_err(|d| corrupt(path, d))?;
    let tensors = header
        .tensors
        .into_iter()
        .map(|t| {
            (t.name, Entry { dtype: t.dtype, shape: t.shape, file: 0, data: Data::Map { start: t.start, len: t.len } })
        })
        .collect();
    Ok(Loaded { file: LoadedFile { path: path.to_path_buf(), map, bufs: Vec::new() }, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_minimal() {
        let f =
            file(r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]);
        let h = parse(&f).unwrap();
        assert_eq!(h.tensors.len(), 1);
        assert_eq!(h.tensors[0].shape, vec![2]);
        assert_eq!(h.metadata, vec![("format".to_string(), "pt".to_string())]);
    }

    #[test]
    fn rejects_bad_entries() {
        for (h, want) in [
            (r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, "needs 12"),
            (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, "reversed"),
            (r#"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}"#, "unknown dtype"),
            (r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, "negative"),
            (r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, "exceed"),
            (r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#, "whole number"),
            (r#"{"a":[1]}"#, "not an object"),
            (r#"[1,2]"#, "JSON object"),
            (r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}}"#, "overflows"),
        ] {
            let err = parse(&file(h, &[0; 8])).unwrap_err();
            assert!(err.contains(want), "{h}: {err}");
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut s = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let good = file(
            r#"{"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            &[1; 12],
        );
        for _ in 0..3000 {
            let mut f = good.clone();
            match next() % 3 {
                0 => f.truncate((next() as usize) % (good.len() + 1)),
                1 => {
                    for _ in 0..1 + next() % 4 {
                        let i = (next() as usize) % f.len();
                        f[i] = next() as u8;
                    }
                }
                _ => f = (0..next() % 64).map(|_| next() as u8).collect(),
            }
            let _ = parse(&f);
        }
    }
}
