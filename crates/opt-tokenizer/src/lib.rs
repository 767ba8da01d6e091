//! OPT's tokenizer: GPT-2 byte-level BPE with fairseq ids, built on the `tokenizers` crate.
//!
//! The reference is HF transformers' `AutoTokenizer.from_pretrained("facebook/opt-…")`
//! (a `GPT2TokenizerFast`). OPT departs from plain GPT-2 in three ways, all reproduced here:
//!
//! * **Fairseq ids.** The vocabulary is GPT-2's BPE tokens re-indexed in fairseq/RoBERTa
//!   order: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, then the BPE tokens, ending with
//!   `<mask>`=50264 (50265 entries in all). OPT's embedding matrix has 50272 rows; ids
//!   50265..=50271 are padding rows with no token. [`OptTokenizer::decode`] and
//!   [`OptTokenizer::token_text`] turn such ids (and any other id ≥ [`OptTokenizer::vocab_size`])
//!   into `""` instead of failing, so sampling from the full logits row never breaks detokenizing.
//! * **`</s>` is the BOS.** OPT prepends `</s>` (id 2), not `<s>`, to every prompt:
//!   `encode(text, true)` yields `[2, …]`. It is also the EOS; `<pad>` (1) is the padding id.
//! * **No prefix space.** `"Hello"` at the start of a text encodes as `Hello` (31414), not
//!   `ĠHello`; a leading space is a real character of the text.
//!
//! Special tokens in text follow HF's OPT tokenizer exactly: its `all_special_tokens` are
//! `</s>` and `<pad>`, so those two strings appearing in text encode to ids 2 and 1 (`"a</s>b"` →
//! `[102, 2, 428]`), while `<s>`, `<unk>` and `<mask>` in text are ordinary BPE text
//! (`"<s>"` → `[41552, 29, 15698]`). `decode(ids, true)` drops ids 2 and 1 only, as HF's
//! `skip_special_tokens=True` does.
//!
//! Decoding is exact: for any string `s`, `decode(&encode(s, false)?, false)? == s` (there is no
//! `clean_up_tokenization_spaces` step). Decoding a sequence that ends inside a multi-byte UTF-8
//! character yields U+FFFD for the incomplete character; use [`OptTokenizer::token_bytes`] to
//! detokenize a stream byte-exactly.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::{AddedToken, PostProcessorWrapper, Tokenizer};

/// Id of `<s>` (fairseq order). Not what OPT prepends: see [`BOS_ID`].
pub const FAIRSEQ_BOS_ID: u32 = 0;
/// Id of `<pad>`.
pub const PAD_ID: u32 = 1;
/// Id of `</s>`, which OPT uses both as BOS (prepended to prompts) and EOS.
pub const BOS_ID: u32 = 2;
/// Id of `</s>` as end of sequence.
pub const EOS_ID: u32 = 2;
/// Id of `<unk>`.
pub const UNK_ID: u32 = 3;
/// Tokens in OPT's vocabulary (vocab.json).
pub const VOCAB_SIZE: usize = 50265;
/// Rows in OPT's embedding / LM head; ids `VOCAB_SIZE..EMBEDDING_ROWS` are padding rows.
pub const EMBEDDING_ROWS: usize = 50272;

const BOS_TOKEN: &str = "</s>";
const PAD_TOKEN: &str = "<pad>";

const BUNDLED_VOCAB: &str = include_str!("../../../assets/tokenizer/vocab.json");
const BUNDLED_MERGES: &str = include_str!("../../../assets/tokenizer/merges.txt");

/// Errors from loading or running the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The folder has neither `tokenizer.json` nor both `vocab.json` and `merges.txt`.
    #[error(
        "no tokenizer files in {}: expected tokenizer.json, or vocab.json and merges.txt (missing: {})",
        dir.display(),
        missing.join(", ")
    )]
    NotFound {
        /// The folder searched.
        dir: PathBuf,
        /// The files looked for and not found.
        missing: Vec<&'static str>,
    },
    /// A tokenizer file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tokenizer file was read but its content is not valid.
    #[error("malformed tokenizer file {}: {reason}", path.display())]
    Malformed {
        /// The file (for the bundled files, their path in the source tree).
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The vocabulary lacks a token OPT needs (`</s>` or `<pad>`).
    #[error("tokenizer from {} has no {token:?} token", source_name.display())]
    MissingToken {
        /// Where the tokenizer came from.
        source_name: PathBuf,
        /// The token missing.
        token: &'static str,
    },
    /// The `tokenizers` library failed while encoding.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// The `tokenizers` library failed while decoding.
    #[error("decoding failed: {0}")]
    Decode(String),
}

/// A token's `(start, end)` UTF-8 byte span in the encoded text (`&text[start..end]`).
pub type ByteSpan = (usize, usize);

/// Shorthand for this crate's results.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// OPT's tokenizer. Cheap to share across threads (`Send + Sync`); clone it if you need owned copies.
#[derive(Clone)]
pub struct OptTokenizer {
    inner: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    vocab_size: usize,
    /// Where it was loaded from, for messages.
    origin: PathBuf,
}

impl fmt::Debug for OptTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OptTokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl OptTokenizer {
    /// Loads the tokenizer from a model folder: `tokenizer.json` if present, otherwise
    /// `vocab.json` + `merges.txt` (the files HF's `facebook/opt-*` repositories ship).
    ///
    /// With `tokenizer.json`, its normalizer, pre-tokenizer, model and decoder are used as
    /// written; its post-processor is dropped, because this type adds the BOS itself and reports
    /// untrimmed offsets.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_json = dir.join("tokenizer.json");
        if tokenizer_json.is_file() {
            return Self::from_tokenizer_json(&tokenizer_json);
        }
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let mut missing = Vec::new();
        if !vocab_path.is_file() {
            missing.push("vocab.json");
        }
        if !merges_path.is_file() {
            missing.push("merges.txt");
        }
        if !missing.is_empty() {
            let mut all = vec!["tokenizer.json"];
            all.extend(missing);
            return Err(TokenizerError::NotFound { dir: dir.to_path_buf(), missing: all });
        }
        let vocab = read_to_string(&vocab_path)?;
        let merges = read_to_string(&merges_path)?;
        Self::from_vocab_and_merges(&vocab, &vocab_path, &merges, &merges_path, dir)
    }

    /// The tokenizer vendored in this crate (OPT's vocab.json and merges.txt, embedded in the
    /// binary), so no files are needed at run time.
    pub fn bundled() -> Result<Self> {
        let root = Path::new("assets/tokenizer");
        Self::from_vocab_and_merges(
            BUNDLED_VOCAB,
            &root.join("vocab.json"),
            BUNDLED_MERGES,
            &root.join("merges.txt"),
            Path::new("<bundled assets/tokenizer>"),
        )
    }

    /// Loads an HF `tokenizer.json` file.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
        let mut inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| TokenizerError::Malformed { path: path.to_path_buf(), reason: e.to_string() })?;
        inner.with_post_processor(None::<PostProcessorWrapper>);
        Self::finish(inner, path.to_path_buf())
    }

    fn from_vocab_and_merges(
        vocab_text: &str,
        vocab_path: &Path,
        merges_text: &str,
        merges_path: &Path,
        origin: &Path,
    ) -> Result<Self> {
        let vocab = parse_vocab(vocab_text, vocab_path)?;
        let merges = parse_merges(merges_text, merges_path)?;
        let model = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| TokenizerError::Malformed {
            path: merges_path.to_path_buf(),
            reason: format!("does not fit {}: {e}", vocab_path.display()),
        })?;
        let mut inner = Tokenizer::new(model);
        // add_prefix_space = false (OPT), trim_offsets = false, use_regex = true (GPT-2 split).
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, false, true)));
        inner.with_decoder(Some(ByteLevel::new(false, false, true)));
        let origin = origin.to_path_buf();
        for token in [BOS_TOKEN, PAD_TOKEN] {
            if inner.token_to_id(token).is_none() {
                return Err(TokenizerError::MissingToken { source_name: vocab_path.to_path_buf(), token });
            }
        }
        // HF's OPT tokenizer registers exactly these two as special (added) tokens; they keep
        // their vocabulary ids.
        inner.add_special_tokens([AddedToken::from(PAD_TOKEN, true), AddedToken::from(BOS_TOKEN, true)]).map_err(
            |e| TokenizerError::Malformed {
                path: vocab_path.to_path_buf(),
                reason: format!("cannot register </s> and <pad> as special tokens: {e}"),
            },
        )?;
        Self::finish(inner, origin)
    }

    fn finish(inner: Tokenizer, origin: PathBuf) -> Result<Self> {
        let id = |token: &'static str| {
            inner.token_to_id(token).ok_or_else(|| TokenizerError::MissingToken { source_name: origin.clone(), token })
        };
        let bos_id = id(BOS_TOKEN)?;
        let pad_id = id(PAD_TOKEN)?;
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self { inner, bos_id, eos_id: bos_id, pad_id, vocab_size, origin })
    }

    /// Encodes `text` to token ids. With `add_bos`, OPT's BOS `</s>` (id 2) is prepended.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let body = encoding.get_ids();
        let mut ids = Vec::with_capacity(body.len() + usize::from(add_bos));
        if add_bos {
            ids.push(self.bos_id);
        }
        ids.extend_from_slice(body);
        Ok(ids)
    }

    /// Encodes `text` (no BOS) and returns each token's `(start, end)` UTF-8 byte span in `text`.
    ///
    /// Spans include a token's leading space (`" cat"` → `Ġcat` spans the space), so they tile the
    /// text. Byte-level BPE can split one multi-byte character over several tokens; each such token
    /// reports the span of the whole character(s) it touches (as HF's `offset_mapping` does), so
    /// consecutive spans may overlap but every span is a valid `&text[start..end]` slice.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let encoding = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// Decodes ids to text. With `skip_special`, `</s>` and `<pad>` are dropped (HF's
    /// `skip_special_tokens=True`). Ids ≥ [`Self::vocab_size`] (e.g. OPT's padding rows
    /// 50265..50272) decode to nothing rather than failing.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let known: Vec<u32> = ids.iter().copied().filter(|&id| self.is_known(id)).collect();
        self.inner.decode(&known, skip_special).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// The raw BPE token for `id` (e.g. `"Ġcat"` for 4758), or `None` if out of range.
    pub fn token_str(&self, id: u32) -> Option<String> {
        if !self.is_known(id) {
            return None;
        }
        self.inner.id_to_token(id)
    }

    /// The text of the single token `id`, for display: its bytes decoded as UTF-8 lossily (a
    /// token that is part of a multi-byte character shows as U+FFFD). `""` for unknown ids.
    pub fn token_text(&self, id: u32) -> String {
        match self.token_bytes(id) {
            Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            None => String::new(),
        }
    }

    /// The exact bytes token `id` stands for (`Ġcat` → `b" cat"`; `</s>` → `b"</s>"`), or `None`
    /// for unknown ids. Concatenating these for a sequence gives the UTF-8 of its decoding, which
    /// makes byte-exact streaming detokenization possible.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.token_str(id)?;
        // Added tokens (`</s>`, `<pad>`) stand for their literal text.
        if self.inner.get_added_vocabulary().simple_id_to_token(id).is_some() {
            return Some(token.into_bytes());
        }
        Some(
            token
                .chars()
                .flat_map(|c| match unicode_to_byte(c) {
                    Some(b) => vec![b],
                    None => c.to_string().into_bytes(),
                })
                .collect(),
        )
    }

    /// Number of token ids the tokenizer knows (50265 for OPT). OPT's embedding has
    /// [`EMBEDDING_ROWS`] (50272) rows; the extra ids have no token.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id OPT prepends to prompts: `</s>` (2).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// End of sequence: `</s>` (2).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Padding: `<pad>` (1).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of a token string, if it is in the vocabulary (e.g. `"Ġcat"` → 4758).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Where the tokenizer was loaded from (a folder, a file, or the bundled assets).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    fn is_known(&self, id: u32) -> bool {
        usize::try_from(id).is_ok_and(|i| i < self.vocab_size)
    }
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}

fn parse_vocab(text: &str, path: &Path) -> Result<Vocab> {
    let malformed = |reason: String| TokenizerError::Malformed { path: path.to_path_buf(), reason };
    let vocab: Vocab = serde_json::from_str(text)
        .map_err(|e| malformed(format!("expected a JSON object mapping token strings to ids: {e}")))?;
    if vocab.is_empty() {
        return Err(malformed("the vocabulary is empty".into()));
    }
    let mut seen = HashSet::with_capacity(vocab.len());
    for (token, &id) in &vocab {
        if !seen.insert(id) {
            return Err(malformed(format!("id {id} is used twice (one of them by {token:?})")));
        }
    }
    Ok(vocab)
}

fn parse_merges(text: &str, path: &Path) -> Result<Merges> {
    let mut merges = Merges::new();
    for (index, line) in text.lines().enumerate() {
        if (index == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_owned(), b.to_owned()));
            }
            _ => {
                return Err(TokenizerError::Malformed {
                    path: path.to_path_buf(),
                    reason: format!("line {}: expected two tokens separated by one space, got {line:?}", index + 1),
                })
            }
        }
    }
    Ok(merges)
}

/// Inverse of GPT-2's `bytes_to_unicode`: the byte a byte-level BPE character stands for.
fn unicode_to_byte(c: char) -> Option<u8> {
    let cp = u32::from(c);
    // Printable bytes map to themselves.
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(cp) {
        return u8::try_from(cp).ok();
    }
    // The others map, in byte order, to U+0100, U+0101, ….
    let n = cp.checked_sub(0x100)?;
    (0u32..=255).filter(|&b| !printable(b)).nth(usize::try_from(n).ok()?).and_then(|b| u8::try_from(b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let mut seen = [false; 256];
        for cp in 0u32..0x200 {
            if let Some(b) = char::from_u32(cp).and_then(unicode_to_byte) {
                assert!(!seen[usize::from(b)], "byte {b} mapped twice");
                seen[usize::from(b)] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(unicode_to_byte('Ġ'), Some(b' '));
        assert_eq!(unicode_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(unicode_to_byte('ĉ'), Some(b'\t'));
        assert_eq!(unicode_to_byte('a'), Some(b'a'));
        assert_eq!(unicode_to_byte('日'), None);
    }

    #[test]
    fn merges_parser_reports_line() {
        let err = parse_merges("#version: 0.2\na b\nbad\n", Path::new("m/merges.txt")).expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("m/merges.txt") && msg.contains("line 3"), "{msg}");
    }
}
