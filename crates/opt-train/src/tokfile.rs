//! The pre-tokenized corpus format `opt-rs data prepare` writes (extension `.tok`): documents
//! of token ids, memory-mapped for training, so a large corpus is tokenized once.
//!
//! Layout, all integers little-endian:
//!
//! | offset          | size            | content                                             |
//! |-----------------|-----------------|-----------------------------------------------------|
//! | 0               | 8               | magic `OPTRSTOK`                                    |
//! | 8               | 4               | format version, u32 = 1                             |
//! | 12              | 4               | bytes per token, u32: 2 (u16 ids) or 4 (u32 ids)    |
//! | 16              | 8               | D = number of documents, u64                        |
//! | 24              | 8               | N = number of tokens, u64                           |
//! | 32              | 8 · (D + 1)     | document start offsets in tokens, u64; first 0, last N |
//! | 32 + 8 · (D + 1) | N · bytes/token | the tokens of all documents, back to back           |
//!
//! Document `i` is tokens `[offsets[i], offsets[i + 1])`. Documents hold their text's tokens
//! without `</s>`: packing adds the separator, exactly as for jsonl input. Ids are u16 when the
//! vocabulary fits (OPT's 50272 does), halving the file.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{Result, TrainError};

const MAGIC: &[u8; 8] = b"OPTRSTOK";
const VERSION: u32 = 1;
const HEADER: usize = 32;

/// A memory-mapped token file.
pub struct TokFile {
    path: PathBuf,
    map: Mmap,
    docs: usize,
    width: usize,
    tokens_at: usize,
}

impl TokFile {
    pub fn open(path: &Path) -> Result<TokFile> {
        let bad = |detail: String| TrainError::Data { location: path.display().to_string(), detail };
        let file = File::open(path).map_err(|e| TrainError::io(path, e))?;
        // SAFETY: read-only mapping of a file we only read.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| TrainError::io(path, e))?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad("not an opt-rs token file (bad magic; write one with `opt-rs data prepare`)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([map[o], map[o + 1], map[o + 2], map[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&map[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!("token file version {version}, this build reads version {VERSION}")));
        }
        let width = u32_at(12) as usize;
        if width != 2 && width != 4 {
            return Err(bad(format!("bytes per token must be 2 or 4, got {width}")));
        }
        let (docs, tokens) = (u64_at(16) as usize, u64_at(24) as usize);
        let tokens_at = docs
            .checked_add(1)
            .and_then(|d| d.checked_mul(8))
            .and_then(|x| x.checked_add(HEADER))
            .ok_or_else(|| bad("corrupt header".into()))?;
        let need = tokens
            .checked_mul(width)
            .and_then(|x| x.checked_add(tokens_at))
            .ok_or_else(|| bad("corrupt header".into()))?;
        if map.len() != need {
            return Err(bad(format!(
                "file is {} bytes, its header describes {need} (truncated or corrupt)",
                map.len()
            )));
        }
        let t = TokFile { path: path.to_path_buf(), map, docs, width, tokens_at };
        // Offsets must be non-decreasing and end at N; checked once so `doc` cannot go out of range.
        let mut prev = 0u64;
        for i in 0..=docs {
            let o = t.offset(i);
            if o < prev || o as usize > tokens || (i == 0 && o != 0) || (i == docs && o as usize != tokens) {
                return Err(bad(format!("corrupt document offsets at entry {i}")));
            }
            prev = o;
        }
        Ok(t)
    }

    fn offset(&self, i: usize) -> u64 {
        let o = HEADER + 8 * i;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.map[o..o + 8]);
        u64::from_le_bytes(b)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn num_docs(&self) -> usize {
        self.docs
    }

    pub fn num_tokens(&self) -> usize {
        self.offset(self.docs) as usize
    }

    /// Tokens of document `i`.
    pub fn doc(&self, i: usize) -> Result<Vec<u32>> {
        if i >= self.docs {
            return Err(TrainError::Data {
                location: self.path.display().to_string(),
                detail: format!("document {i} out of range ({} documents)", self.docs),
            });
        }
        let (a, b) = (self.offset(i) as usize, self.offset(i + 1) as usize);
        let bytes = &self.map[self.tokens_at + a * self.width..self.tokens_at + b * self.width];
        Ok(match self.width {
            2 => bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
            _ => bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        })
    }
}

/// Writes a token file: documents are streamed to a side file, then header, offsets and tokens
/// are assembled and renamed into place, so a crash never leaves a half-written `.tok`.
pub struct TokFileWriter {
    path: PathBuf,
    tmp_tokens: PathBuf,
    tokens: BufWriter<File>,
    offsets: Vec<u64>,
    width: usize,
    max_id: u32,
}

impl TokFileWriter {
    /// A writer for ids below `vocab` (u16 storage when `vocab <= 65536`).
    pub fn create(path: &Path, vocab: usize) -> Result<TokFileWriter> {
        let tmp_tokens = path.with_extension(format!("tok.part-{}", std::process::id()));
        let f = File::create(&tmp_tokens).map_err(|e| TrainError::io(&tmp_tokens, e))?;
        Ok(TokFileWriter {
            path: path.to_path_buf(),
            tmp_tokens,
            tokens: BufWriter::with_capacity(1 << 20, f),
            offsets: vec![0],
            width: if vocab <= 1 << 16 { 2 } else { 4 },
            max_id: (vocab.saturating_sub(1)).min(u32::MAX as usize) as u32,
        })
    }

    pub fn push(&mut self, doc: &[u32]) -> Result<()> {
        if let Some(bad) = doc.iter().find(|&&x| x > self.max_id) {
            return Err(TrainError::Data {
                location: self.path.display().to_string(),
                detail: format!("token id {bad} is outside the vocabulary of {}", self.max_id as u64 + 1),
            });
        }
        let io = |e| TrainError::io(&self.tmp_tokens, e);
        for &t in doc {
            if self.width == 2 {
                self.tokens.write_all(&(t as u16).to_le_bytes()).map_err(io)?;
            } else {
                self.tokens.write_all(&t.to_le_bytes()).map_err(io)?;
            }
        }
        let last = self.offsets.last().copied().unwrap_or(0);
        self.offsets.push(last + doc.len() as u64);
        Ok(())
    }

    pub fn num_docs(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Assemble the file; returns (documents, tokens).
    pub fn finish(self) -> Result<(usize, u64)> {
        let TokFileWriter { path, tmp_tokens, tokens, offsets, width, .. } = self;
        let io_tmp = |e| TrainError::io(&tmp_tokens, e);
        tokens.into_inner().map_err(|e| io_tmp(e.into_error()))?.sync_all().map_err(io_tmp)?;
        let docs = offsets.len() - 1;
        let n = offsets.last().copied().unwrap_or(0);
        let tmp = path.with_extension(format!("tok.tmp-{}", std::process::id()));
        let io = |e| TrainError::io(&path, e);
        {
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io)?);
            w.write_all(MAGIC).map_err(io)?;
            w.write_all(&VERSION.to_le_bytes()).map_err(io)?;
            w.write_all(&(width as u32).to_le_bytes()).map_err(io)?;
            w.write_all(&(docs as u64).to_le_bytes()).map_err(io)?;
            w.write_all(&n.to_le_bytes()).map_err(io)?;
            for o in &offsets {
                w.write_all(&o.to_le_bytes()).map_err(io)?;
            }
            let mut src = File::open(&tmp_tokens).map_err(io_tmp)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = src.read(&mut buf).map_err(io_tmp)?;
                if k == 0 {
                    break;
                }
                w.write_all(&buf[..k]).map_err(io)?;
            }
            w.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        let _ = std::fs::remove_file(&tmp_tokens);
        Ok((docs, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        for vocab in [50272usize, 100_000] {
            let p = dir.path().join(format!("c{vocab}.tok"));
            let mut w = TokFileWriter::create(&p, vocab).expect("writer");
            w.push(&[5, 6, 7]).expect("push");
            w.push(&[]).expect("push");
            w.push(&[(vocab - 1) as u32]).expect("push");
            assert!(w.push(&[vocab as u32]).is_err());
            assert_eq!(w.finish().expect("finish"), (3, 4));
            let t = TokFile::open(&p).expect("open");
            assert_eq!(t.num_docs(), 3);
            assert_eq!(t.doc(0).expect("doc"), vec![5, 6, 7]);
            assert_eq!(t.doc(1).expect("doc"), Vec::<u32>::new());
            assert_eq!(t.doc(2).expect("doc"), vec![(vocab - 1) as u32]);
            let size = std::fs::metadata(&p).expect("meta").len() as usize;
            assert_eq!(size, HEADER + 8 * 4 + 4 * if vocab <= 65536 { 2 } else { 4 });
        }
        let p = dir.path().join("c50272.tok");
        let bytes = std::fs::read(&p).expect("read");
        std::fs::write(&p, &bytes[..bytes.len() - 1]).expect("write");
        let e = TokFile::open(&p).err().expect("truncated file must fail").to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(&p, b"hello world, not tokens at all").expect("write");
        let e = TokFile::open(&p).err().expect("bad magic must fail").to_string();
        assert!(e.contains("magic"), "{e}");
    }
}
