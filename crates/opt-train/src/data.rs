//! Training data: documents from a corpus, turned into fixed-shape batches.
//!
//! A [`Corpus`] is a list of documents with random access: rows of jsonl files (located by a
//! one-time index of line offsets, tokenized only when used), blank-line-separated documents
//! of a text file (the bundled Shakespeare among them), or a pre-tokenized token file
//! ([`crate::tokfile`]). A [`Loader`] walks the documents in a per-epoch order (a permutation
//! drawn from the seed and the epoch number) and cuts them into batches:
//!
//! - packing: the documents, each followed by `</s>`, form one stream cut into blocks of
//!   `seq_len + 1` tokens; a block is `seq_len` inputs and their `seq_len` next tokens
//!   (metaseq's `TokenBlockDataset` with `break_mode = none`);
//! - no packing: one document per row, truncated to `seq_len`, right-padded with `<pad>`, with
//!   HF's `labels = input_ids` targets.
//!
//! The position in the walk is three integers ([`DataPosition`]: epoch, document, token
//! offset), so a checkpoint resumes the exact next token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use opt_tokenizer::OptTokenizer;
use serde::{Deserialize, Serialize};

use crate::config::BadRowPolicy;
use crate::tokfile::TokFile;
use crate::{Result, TrainError};

/// The bundled tiny-shakespeare corpus (embedded so the default run works from any folder).
const SHAKESPEARE: &str = include_str!("../../../assets/corpus/tinyshakespeare.txt");
/// Share of the bundled corpus's documents (taken from the end) held out as `valid`.
const SHAKESPEARE_VALID_FRACTION: f64 = 0.05;

/// Where a document lives.
enum Docs {
    /// In-memory text documents (the bundled corpus, .txt files).
    Text(Vec<Arc<str>>),
    /// Rows of mmapped jsonl files.
    Jsonl { files: Vec<(PathBuf, Mmap)>, rows: Vec<RowLoc> },
    /// A pre-tokenized token file.
    Tokens(TokFile),
}

/// A jsonl row: file index, byte range of the line and its 1-based line number.
#[derive(Clone, Copy)]
struct RowLoc {
    file: u32,
    start: usize,
    end: usize,
    line: u32,
}

/// A document's content before tokenization.
enum Doc {
    Text(String),
    Ids(Vec<u32>),
}

/// Documents with random access.
pub struct Corpus {
    name: String,
    docs: Docs,
    vocab: usize,
    /// `file:line: reason` of every row skipped under `on_bad_row = "skip"`.
    pub skipped: Vec<String>,
}

impl Corpus {
    /// Open a corpus (see `data.train` in the default config for the accepted forms).
    /// Ids must be below `vocab`.
    pub fn open(spec: &str, vocab: usize, policy: BadRowPolicy) -> Result<Corpus> {
        let docs = match spec {
            "builtin:shakespeare/train" | "builtin:shakespeare/valid" => {
                let all = split_text(SHAKESPEARE);
                let n_valid = ((all.len() as f64) * SHAKESPEARE_VALID_FRACTION).ceil() as usize;
                let cut = all.len() - n_valid;
                let part = if spec.ends_with("train") { &all[..cut] } else { &all[cut..] };
                return Corpus::checked(Corpus {
                    name: spec.into(),
                    docs: Docs::Text(part.to_vec()),
                    vocab,
                    skipped: vec![],
                });
            }
            s if s.starts_with("builtin:") => {
                return Err(TrainError::Data {
                    location: s.into(),
                    detail: "unknown builtin corpus (known: builtin:shakespeare/train, builtin:shakespeare/valid)"
                        .into(),
                })
            }
            _ => {
                let path = Path::new(spec);
                if path.is_dir() {
                    let files = jsonl_files(path)?;
                    if files.is_empty() {
                        return Err(TrainError::EmptyCorpus {
                            source_name: spec.into(),
                            hint: " (no .jsonl files in the folder or in its train/NN/ sub-folders)".into(),
                        });
                    }
                    return Corpus::from_jsonl(spec, &files, vocab, policy);
                }
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                match ext {
                    "jsonl" | "json" => return Corpus::from_jsonl(spec, &[path.to_path_buf()], vocab, policy),
                    "txt" => {
                        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
                        Docs::Text(split_text(&text))
                    }
                    "tok" => Docs::Tokens(TokFile::open(path)?),
                    _ if !path.exists() => {
                        return Err(TrainError::io(
                            path,
                            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                        ))
                    }
                    _ => {
                        return Err(TrainError::Data {
                            location: spec.into(),
                            detail: "unknown corpus kind: expected a .jsonl, .txt or .tok file, a folder, or builtin:…"
                                .into(),
                        })
                    }
                }
            }
        };
        Corpus::checked(Corpus { name: spec.into(), docs, vocab, skipped: vec![] })
    }

    /// Index jsonl files: every line is parsed once here so that malformed rows are found (and
    /// reported with file:line) before training starts; the text is tokenized later, when used.
    fn from_jsonl(name: &str, files: &[PathBuf], vocab: usize, policy: BadRowPolicy) -> Result<Corpus> {
        let mut maps = Vec::with_capacity(files.len());
        let mut rows = Vec::new();
        let mut skipped = Vec::new();
        for (fi, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
            // SAFETY: the file is opened read-only and is only read; a concurrent writer could
            // change the bytes under us, which at worst makes a row fail to parse later.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| TrainError::io(path, e))?;
            let mut start = 0usize;
            let mut line = 0u32;
            while start < map.len() {
                line += 1;
                let end = map[start..].iter().position(|&b| b == b'\n').map_or(map.len(), |p| start + p);
                let bytes = &map[start..end];
                if !bytes.iter().all(u8::is_ascii_whitespace) {
                    match parse_row(bytes, vocab) {
                        Ok(_) => rows.push(RowLoc { file: fi as u32, start, end, line }),
                        Err(detail) => {
                            let location = format!("{}:{line}", path.display());
                            match policy {
                                BadRowPolicy::Fail => {
                                    return Err(TrainError::Data {
                                        location,
                                        detail: format!("{detail} (set data.on_bad_row = \"skip\" to skip such rows)"),
                                    })
                                }
                                BadRowPolicy::Skip => skipped.push(format!("{location}: {detail}")),
                            }
                        }
                    }
                }
                start = end + 1;
            }
            maps.push((path.clone(), map));
        }
        Corpus::checked(Corpus { name: name.into(), docs: Docs::Jsonl { files: maps, rows }, vocab, skipped })
    }

    fn checked(c: Corpus) -> Result<Corpus> {
        if c.is_empty() {
            let hint = if c.skipped.is_empty() {
                String::new()
            } else {
                format!(" ({} malformed rows were skipped; first: {})", c.skipped.len(), c.skipped[0])
            };
            return Err(TrainError::EmptyCorpus { source_name: c.name, hint });
        }
        Ok(c)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        match &self.docs {
            Docs::Text(d) => d.len(),
            Docs::Jsonl { rows, .. } => rows.len(),
            Docs::Tokens(t) => t.num_docs(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn doc(&self, i: usize) -> Result<Doc> {
        match &self.docs {
            Docs::Text(d) => Ok(Doc::Text(d[i].to_string())),
            Docs::Jsonl { files, rows } => {
                let r = rows[i];
                let (path, map) = &files[r.file as usize];
                parse_row(&map[r.start..r.end], self.vocab)
                    .map_err(|detail| TrainError::Data { location: format!("{}:{}", path.display(), r.line), detail })
            }
            Docs::Tokens(t) => {
                let ids = t.doc(i)?;
                if let Some(bad) = ids.iter().find(|&&x| x as usize >= self.vocab) {
                    return Err(TrainError::Data {
                        location: format!("{} document {i}", t.path().display()),
                        detail: format!("token id {bad} is outside the vocabulary of {}", self.vocab),
                    });
                }
                Ok(Doc::Ids(ids))
            }
        }
    }

    /// Tokens of document `i`. Text is tokenized without BOS when `bos` is false (packing), with
    /// OPT's leading `</s>` when true (one row per sequence, as HF's tokenizer does). Id rows and
    /// token-file documents are returned verbatim.
    pub fn tokens(&self, i: usize, tok: &OptTokenizer, bos: bool) -> Result<Vec<u32>> {
        match self.doc(i)? {
            Doc::Text(t) => {
                let ids = tok.encode(&t, bos)?;
                if let Some(bad) = ids.iter().find(|&&x| x as usize >= self.vocab) {
                    return Err(TrainError::Data {
                        location: format!("{} document {i}", self.name),
                        detail: format!(
                            "the tokenizer produced id {bad}, outside the model's vocabulary of {}",
                            self.vocab
                        ),
                    });
                }
                Ok(ids)
            }
            Doc::Ids(ids) => Ok(ids),
        }
    }
}

/// Parse one jsonl row: an object with `"text"` (a string) or `"ids"` (token ids below `vocab`).
fn parse_row(bytes: &[u8], vocab: usize) -> std::result::Result<Doc, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("expected a JSON object with \"text\" or \"ids\"")?;
    match (obj.get("text"), obj.get("ids")) {
        (Some(_), Some(_)) => Err("row has both \"text\" and \"ids\"; keep one".into()),
        (Some(serde_json::Value::String(s)), None) => Ok(Doc::Text(s.clone())),
        (Some(other), None) => Err(format!("\"text\" must be a string, got {}", kind(other))),
        (None, Some(serde_json::Value::Array(a))) => {
            let mut ids = Vec::with_capacity(a.len());
            for (j, x) in a.iter().enumerate() {
                match x.as_u64() {
                    Some(id) if (id as usize) < vocab => ids.push(id as u32),
                    Some(id) => return Err(format!("\"ids\"[{j}] = {id} is outside the vocabulary of {vocab}")),
                    None => return Err(format!("\"ids\"[{j}] is not a token id (got {x})")),
                }
            }
            Ok(Doc::Ids(ids))
        }
        (None, Some(other)) => Err(format!("\"ids\" must be an array of token ids, got {}", kind(other))),
        (None, None) => Err("row has neither \"text\" nor \"ids\"".into()),
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Documents of a text file: blank-line-separated blocks (Shakespeare: one speech each).
fn split_text(text: &str) -> Vec<Arc<str>> {
    text.replace("\r\n", "\n")
        .split("\n\n")
        .map(|d| d.trim_matches('\n'))
        .filter(|d| !d.trim().is_empty())
        .map(Arc::from)
        .collect()
}

/// The jsonl files of a folder in metaseq's layout: `DIR/train/NN/*.jsonl` when `DIR/train`
/// exists, otherwise every `.jsonl` under `DIR` (recursively), in path order.
fn jsonl_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let root = if dir.join("train").is_dir() { dir.join("train") } else { dir.to_path_buf() };
    let mut out = Vec::new();
    collect_jsonl(&root, &mut out)?;
    out.sort();
    Ok(out)
}

fn collect_jsonl(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| TrainError::io(dir, e))? {
        let path = entry.map_err(|e| TrainError::io(dir, e))?.path();
        if path.is_dir() {
            collect_jsonl(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "jsonl") {
            out.push(path);
        }
    }
    Ok(())
}

/// The validation split that goes with a training source, when `data.valid` is empty: the
/// `valid/` sibling of a metaseq folder's `train/`.
pub fn default_valid(train: &str) -> Option<String> {
    let p = Path::new(train);
    (p.is_dir() && p.join("train").is_dir() && p.join("valid").is_dir()).then(|| p.join("valid").display().to_string())
}

/// Where the loader is: the next token is token `offset` of document `doc` (an index into
/// the epoch's order) in epoch `epoch`. Without packing `offset` is always 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub doc: u64,
    pub offset: u64,
}

/// A batch of `rows × seq` tokens in the layout `OptModel::forward_backward` takes.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
    pub targets: Vec<i32>,
    pub rows: usize,
    pub seq: usize,
}

impl Batch {
    /// Number of targets that count in the loss.
    pub fn count(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
    /// Real (non-padding) input tokens.
    pub fn tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m != 0).count()
    }
    /// Part `k` of `n` equal runs of rows (a data rank's share of a global batch; `rows` must be
    /// a multiple of `n`, which the config checks).
    pub fn rows_of(&self, k: usize, n: usize) -> Batch {
        let rows = self.rows / n;
        let (a, b) = (k * rows * self.seq, (k + 1) * rows * self.seq);
        Batch {
            ids: self.ids[a..b].to_vec(),
            mask: self.mask[a..b].to_vec(),
            targets: self.targets[a..b].to_vec(),
            rows,
            seq: self.seq,
        }
    }
}

/// Turns a corpus into batches, in a seeded order, from a resumable position.
pub struct Loader {
    corpus: Corpus,
    tok: Arc<OptTokenizer>,
    seq: usize,
    packing: bool,
    shuffle: bool,
    seed: u64,
    eos: u32,
    pad: u32,
    pos: DataPosition,
    /// Order of the documents for `perm_epoch`.
    perm: Vec<u32>,
    perm_epoch: Option<u64>,
    /// Tokens of the document at (epoch, doc), as the stream sees it.
    cache: Option<((u64, u64), Vec<u32>)>,
}

/// Label mixed into the seed for the data order (see `opt_tensor::rng::derive`).
const DATA_ORDER_LABEL: u64 = 0xDA7A;

#[allow(clippy::too_many_arguments)]
impl Loader {
    pub fn new(
        corpus: Corpus,
        tok: Arc<OptTokenizer>,
        seq: usize,
        packing: bool,
        shuffle: bool,
        seed: u64,
        eos: u32,
        pad: u32,
    ) -> Self {
        Loader {
            corpus,
            tok,
            seq,
            packing,
            shuffle,
            seed,
            eos,
            pad,
            pos: DataPosition::default(),
            perm: vec![],
            perm_epoch: None,
            cache: None,
        }
    }

    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// Continue from `pos` (as saved by [`Loader::position`]).
    pub fn seek(&mut self, pos: DataPosition) -> Result<()> {
        if pos.doc as usize > self.corpus.len() {
            return Err(TrainError::Data {
                location: self.corpus.name.clone(),
                detail: format!(
                    "saved data position {pos:?} is past the corpus's {} documents (did the data change?)",
                    self.corpus.len()
                ),
            });
        }
        self.pos = pos;
        Ok(())
    }

    /// The corpus index of the `k`-th document of `epoch`.
    fn doc_index(&mut self, epoch: u64, k: u64) -> usize {
        if !self.shuffle {
            return k as usize;
        }
        if self.perm_epoch != Some(epoch) {
            // Fisher–Yates with the counter-based RNG: the order of an epoch is a pure function
            // of (seed, epoch), so resuming recomputes it instead of storing it.
            let n = self.corpus.len();
            let stream = opt_tensor::rng::derive(opt_tensor::rng::derive(self.seed, DATA_ORDER_LABEL), epoch);
            self.perm = (0..n as u32).collect();
            for i in (1..n).rev() {
                let j = (opt_tensor::rng::bits(stream, i as u64) % (i as u64 + 1)) as usize;
                self.perm.swap(i, j);
            }
            self.perm_epoch = Some(epoch);
        }
        self.perm[k as usize] as usize
    }

    /// Tokens of the current document as the stream sees them (packing: content + `</s>`;
    /// otherwise the row as the model gets it).
    fn current(&mut self) -> Result<&[u32]> {
        let key = (self.pos.epoch, self.pos.doc);
        if self.cache.as_ref().map(|c| c.0) != Some(key) {
            let i = self.doc_index(key.0, key.1);
            let mut t = self.corpus.tokens(i, &self.tok, !self.packing)?;
            if self.packing {
                t.push(self.eos);
            }
            self.cache = Some((key, t));
        }
        Ok(self.cache.as_ref().map(|c| c.1.as_slice()).unwrap_or(&[]))
    }

    fn advance_doc(&mut self) {
        self.pos.doc += 1;
        self.pos.offset = 0;
        if self.pos.doc as usize >= self.corpus.len() {
            self.pos.epoch += 1;
            self.pos.doc = 0;
        }
    }

    /// Packing: the next `seq + 1` tokens of the stream.
    fn next_block(&mut self) -> Result<Vec<u32>> {
        let want = self.seq + 1;
        let mut block = Vec::with_capacity(want);
        // Terminates: every document adds at least its </s>, so each pass over a (non-empty)
        // corpus adds tokens; a corpus shorter than a block is simply repeated.
        while block.len() < want {
            let off = self.pos.offset as usize;
            let cur = self.current()?;
            let take = (want - block.len()).min(cur.len().saturating_sub(off));
            block.extend_from_slice(&cur[off..off + take]);
            let done_doc = off + take >= cur.len();
            if done_doc {
                self.advance_doc();
            } else {
                self.pos.offset += take as u64;
            }
        }
        Ok(block)
    }

    /// No packing: the next row with at least two tokens (one input, one target).
    fn next_row(&mut self) -> Result<Vec<u32>> {
        let start = self.pos;
        loop {
            let mut row = self.current()?.to_vec();
            self.advance_doc();
            if row.len() >= 2 {
                row.truncate(self.seq);
                return Ok(row);
            }
            if self.pos.epoch > start.epoch && self.pos.doc >= start.doc {
                return Err(TrainError::EmptyCorpus {
                    source_name: self.corpus.name.clone(),
                    hint: " (no row has two tokens: an input and a target)".into(),
                });
            }
        }
    }

    /// The next batch of `rows` sequences.
    pub fn next_batch(&mut self, rows: usize) -> Result<Batch> {
        let t = self.seq;
        let mut ids = Vec::with_capacity(rows * t);
        let mut mask = Vec::with_capacity(rows * t);
        let mut targets = Vec::with_capacity(rows * t);
        for _ in 0..rows {
            if self.packing {
                let block = self.next_block()?;
                ids.extend_from_slice(&block[..t]);
                mask.extend(std::iter::repeat_n(1u8, t));
                targets.extend(block[1..].iter().map(|&x| x as i32));
            } else {
                let row = self.next_row()?;
                let n = row.len();
                let mut r_ids = row;
                r_ids.resize(t, self.pad);
                let r_mask: Vec<u8> = (0..t).map(|i| (i < n) as u8).collect();
                targets.extend(opt_model::causal_targets(&r_ids, &r_mask, 1, t));
                ids.extend(r_ids);
                mask.extend(r_mask);
            }
        }
        Ok(Batch { ids, mask, targets, rows, seq: t })
    }
}

/// What [`prepare`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareStats {
    pub documents: usize,
    pub tokens: u64,
    /// `file:line: reason` of skipped malformed rows.
    pub skipped: Vec<String>,
}

/// Tokenize corpora (any form [`Corpus::open`] takes, in order) into one token file at `out`
/// (see [`crate::tokfile`]). Text is tokenized without BOS; id rows are copied verbatim.
pub fn prepare(
    inputs: &[String],
    out: &Path,
    tok: &OptTokenizer,
    vocab: usize,
    policy: BadRowPolicy,
) -> Result<PrepareStats> {
    if inputs.is_empty() {
        return Err(TrainError::Data { location: "data prepare".into(), detail: "no input corpus given".into() });
    }
    let mut w = crate::tokfile::TokFileWriter::create(out, vocab)?;
    let mut skipped = Vec::new();
    for spec in inputs {
        let c = Corpus::open(spec, vocab, policy)?;
        for i in 0..c.len() {
            w.push(&c.tokens(i, tok, false)?)?;
        }
        skipped.extend(c.skipped);
    }
    let (documents, tokens) = w.finish()?;
    Ok(PrepareStats { documents, tokens, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Arc<OptTokenizer> {
        Arc::new(OptTokenizer::bundled().expect("bundled tokenizer"))
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn packing_streams_documents_with_eos() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(dir.path(), "a.jsonl", "{\"ids\": [10, 11, 12]}\n\n{\"ids\": [20, 21]}\n");
        let c = Corpus::open(&p.display().to_string(), 100, BadRowPolicy::Fail).expect("corpus");
        assert_eq!(c.len(), 2);
        let mut l = Loader::new(c, tok(), 3, true, false, 0, 2, 1);
        let b = l.next_batch(2).expect("batch");
        // stream: 10 11 12 </s> 20 21 </s> 10 11 12 </s> ...; blocks of 4
        assert_eq!(b.ids, vec![10, 11, 12, 20, 21, 2]);
        assert_eq!(b.targets, vec![11, 12, 2, 21, 2, 10]);
        assert_eq!(b.count(), 6);
        assert_eq!(l.position(), DataPosition { epoch: 1, doc: 0, offset: 1 });
    }

    #[test]
    fn rows_are_padded_and_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(dir.path(), "a.jsonl", "{\"ids\": [10, 11, 12, 13, 14]}\n{\"ids\": [5]}\n{\"ids\": [20, 21]}\n");
        let c = Corpus::open(&p.display().to_string(), 100, BadRowPolicy::Fail).expect("corpus");
        let mut l = Loader::new(c, tok(), 4, false, false, 0, 2, 1);
        let b = l.next_batch(2).expect("batch");
        assert_eq!(b.ids, vec![10, 11, 12, 13, 20, 21, 1, 1]);
        assert_eq!(b.mask, vec![1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(b.targets, vec![11, 12, 13, -100, 21, -100, -100, -100]);
    }

    #[test]
    fn shuffle_is_a_seeded_permutation_and_resumable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rows: String = (0..50).map(|i| format!("{{\"ids\": [{}, {}]}}\n", 3 + i, 4 + i)).collect();
        let p = write(dir.path(), "a.jsonl", &rows);
        let open = || Corpus::open(&p.display().to_string(), 100, BadRowPolicy::Fail).expect("corpus");
        let mut a = Loader::new(open(), tok(), 5, true, true, 7, 2, 1);
        let mut firsts = Vec::new();
        for _ in 0..10 {
            firsts.push(a.next_batch(3).expect("batch"));
        }
        // An interrupted loader resumed from a saved position continues identically.
        let mut b = Loader::new(open(), tok(), 5, true, true, 7, 2, 1);
        for x in firsts.iter().take(4) {
            assert_eq!(&b.next_batch(3).expect("batch"), x);
        }
        let pos = b.position();
        let mut c = Loader::new(open(), tok(), 5, true, true, 7, 2, 1);
        c.seek(pos).expect("seek");
        for x in firsts.iter().skip(4) {
            assert_eq!(&c.next_batch(3).expect("batch"), x);
        }
        // Another seed gives another order; the first epoch visits every document once.
        let mut d = Loader::new(open(), tok(), 5, true, true, 8, 2, 1);
        assert_ne!(d.next_batch(3).expect("batch"), firsts[0]);
        let mut seen: Vec<u32> = Vec::new();
        let mut e = Loader::new(open(), tok(), 2, false, true, 7, 2, 1);
        for _ in 0..50 {
            seen.push(e.next_batch(1).expect("batch").ids[0]);
        }
        seen.sort();
        assert_eq!(seen, (3..53).collect::<Vec<u32>>());
    }

    #[test]
    fn builtin_shakespeare_splits() {
        let t = Corpus::open("builtin:shakespeare/train", 50272, BadRowPolicy::Fail).expect("train");
        let v = Corpus::open("builtin:shakespeare/valid", 50272, BadRowPolicy::Fail).expect("valid");
        assert!(t.len() > 6000 && v.len() > 300, "{} / {}", t.len(), v.len());
        let tk = tok();
        let first = t.tokens(0, &tk, false).expect("tokens");
        assert_eq!(
            tk.decode(&first, false).expect("decode"),
            "First Citizen:\nBefore we proceed any further, hear me speak."
        );
    }
}
