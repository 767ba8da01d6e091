//! Helpers shared by the integration tests: building safetensors files, pickles and torch zips
//! by hand.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

/// A raw safetensors file from a header string and data bytes (no validation, no padding).
pub fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// Iterations for the random-input tests: `default`, or `OPT_CHECKPOINT_FUZZ_ITERS` if set
/// (run e.g. `OPT_CHECKPOINT_FUZZ_ITERS=100000 cargo test -p opt-checkpoint --release` for a
/// longer search).
pub fn fuzz_iters(default: usize) -> usize {
    std::env::var("OPT_CHECKPOINT_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// A deterministic xorshift generator (no dev-dependency needed for "random" tests).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    pub fn f32(&mut self) -> f32 {
        // a spread of magnitudes and signs, including values that need rounding in bf16/f16
        let m = (self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0;
        let e = (self.next() % 9) as i32 - 4;
        m * 10f32.powi(e)
    }
}

/// Emits pickle opcodes (the subset torch.save produces).
#[derive(Default)]
pub struct Pickle(pub Vec<u8>);
impl Pickle {
    pub fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    pub fn op(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(b'c');
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    pub fn int(&mut self, i: i64) -> &mut Self {
        if (0..256).contains(&i) {
            self.0.extend_from_slice(&[b'K', i as u8]);
        } else if (0..65536).contains(&i) {
            self.0.push(b'M');
            self.0.extend_from_slice(&(i as u16).to_le_bytes());
        } else {
            self.0.extend_from_slice(&[0x8a, 8]);
            self.0.extend_from_slice(&i.to_le_bytes());
        }
        self
    }
    pub fn mark(&mut self) -> &mut Self {
        self.op(b'(')
    }
    pub fn tuple(&mut self) -> &mut Self {
        self.op(b't')
    }
    pub fn empty_tuple(&mut self) -> &mut Self {
        self.op(b')')
    }
    pub fn empty_dict(&mut self) -> &mut Self {
        self.op(b'}')
    }
    pub fn reduce(&mut self) -> &mut Self {
        self.op(b'R')
    }
    pub fn setitem(&mut self) -> &mut Self {
        self.op(b's')
    }
    pub fn setitems(&mut self) -> &mut Self {
        self.op(b'u')
    }
    pub fn stop(&mut self) -> Vec<u8> {
        self.0.push(b'.');
        std::mem::take(&mut self.0)
    }
    pub fn ints_tuple(&mut self, xs: &[u64]) -> &mut Self {
        self.mark();
        for &x in xs {
            self.int(x as i64);
        }
        self.tuple()
    }
    /// `_rebuild_tensor_v2(('storage', torch.<storage>, key, 'cpu', numel), offset, size,
    /// stride, False, OrderedDict())`, as torch.save writes it.
    pub fn tensor(
        &mut self,
        storage: &str,
        key: &str,
        numel: u64,
        offset: u64,
        size: &[u64],
        stride: &[u64],
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.mark();
        self.mark().str("storage").global("torch", storage).str(key).str("cpu").int(numel as i64).tuple().op(b'Q');
        self.int(offset as i64);
        self.ints_tuple(size);
        self.ints_tuple(stride);
        self.op(0x89);
        self.global("collections", "OrderedDict").empty_tuple().reduce();
        self.tuple().reduce()
    }
}

/// One zip entry: name, contents, deflate-compressed or stored.
pub struct ZipEntry<'a> {
    pub name: String,
    pub data: &'a [u8],
    pub deflate: bool,
}

pub fn entry<'a>(name: &str, data: &'a [u8]) -> ZipEntry<'a> {
    ZipEntry { name: name.to_string(), data, deflate: false }
}

/// Writes a zip archive (stored entries 64-byte aligned, like torch).
pub fn write_zip(path: &Path, entries: &[ZipEntry<'_>]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    for e in entries {
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(if e.deflate {
                zip::CompressionMethod::Deflated
            } else {
                zip::CompressionMethod::Stored
            })
            .with_alignment(64);
        z.start_file(e.name.as_str(), opts).unwrap();
        z.write_all(e.data).unwrap();
    }
    z.finish().unwrap();
}

/// Writes a torch-style checkpoint: `<prefix>/data.pkl`, `<prefix>/byteorder`,
/// `<prefix>/data/<key>` for each storage.
pub fn write_torch_zip(path: &Path, prefix: &str, pkl: &[u8], storages: &[(&str, &[u8])], deflate: bool) {
    let mut entries = vec![entry(&format!("{prefix}/data.pkl"), pkl), entry(&format!("{prefix}/byteorder"), b"little")];
    for (k, d) in storages {
        let mut e = entry(&format!("{prefix}/data/{k}"), d);
        e.deflate = deflate;
        entries.push(e);
    }
    entries.push(entry(&format!("{prefix}/version"), b"3\n"));
    write_zip(path, &entries);
}

pub fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}
