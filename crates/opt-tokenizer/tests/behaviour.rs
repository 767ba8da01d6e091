//! Behaviour of the OPT tokenizer beyond the published pairs: unicode, whitespace, code,
//! special tokens, round-trips, offsets, odd ids and loading errors.

use std::fs;
use std::path::Path;
use std::sync::OnceLock;

use opt_tokenizer::{OptTokenizer, TokenizerError, EMBEDDING_ROWS, VOCAB_SIZE};

fn tok() -> &'static OptTokenizer {
    static TOK: OnceLock<OptTokenizer> = OnceLock::new();
    TOK.get_or_init(|| OptTokenizer::bundled().expect("bundled tokenizer loads"))
}

const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/tokenizer");

/// Checks everything that must hold for any text: exact round trip, BOS handling, token bytes
/// tiling the text, offsets being valid slices that cover the text in order.
fn check_invariants(tok: &OptTokenizer, text: &str) {
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text, "round trip {text:?}");
    let mut with_bos = vec![2];
    with_bos.extend(&ids);
    assert_eq!(tok.encode(text, true).unwrap(), with_bos);
    assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));

    let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id).expect("known id")).collect();
    assert_eq!(bytes, text.as_bytes(), "token bytes tile {text:?}");

    let (ids2, offsets) = tok.encode_with_offsets(text).unwrap();
    assert_eq!(ids2, ids);
    assert_eq!(offsets.len(), ids.len());
    let mut prev = (0, 0);
    for (i, &(start, end)) in offsets.iter().enumerate() {
        assert!(start <= end && end <= text.len(), "{text:?} span {i}");
        assert!(text.is_char_boundary(start) && text.is_char_boundary(end));
        assert!(start >= prev.0 && start <= prev.1.max(start), "{text:?} order {i}");
        if i == 0 {
            assert_eq!(start, 0, "{text:?} starts at 0");
        } else {
            // Either the next token, or another piece of the same character(s).
            assert!(start == prev.1 || (start, end) == prev || start < prev.1);
        }
        prev = (start, end);
    }
    if !text.is_empty() {
        assert_eq!(prev.1, text.len(), "{text:?} spans reach the end");
    }
}

fn tokens(text: &str) -> Vec<String> {
    let t = tok();
    t.encode(text, false).unwrap().into_iter().map(|id| t.token_str(id).unwrap()).collect()
}

#[test]
fn basics_and_constants() {
    let t = tok();
    assert_eq!(t.vocab_size(), VOCAB_SIZE);
    assert_eq!(VOCAB_SIZE, 50265);
    assert_eq!(EMBEDDING_ROWS, 50272);
    assert_eq!((t.bos_id(), t.eos_id(), t.pad_id()), (2, 2, 1));
    assert_eq!(t.token_str(0).as_deref(), Some("<s>"));
    assert_eq!(t.token_str(1).as_deref(), Some("<pad>"));
    assert_eq!(t.token_str(2).as_deref(), Some("</s>"));
    assert_eq!(t.token_str(3).as_deref(), Some("<unk>"));
    assert_eq!(t.token_str(50264).as_deref(), Some("<mask>"));
    assert_eq!(t.token_str(4758).as_deref(), Some("Ġcat"));
    assert_eq!(t.token_text(4758), " cat");
    assert_eq!(t.token_bytes(4758).unwrap(), b" cat");
    assert_eq!(t.token_text(2), "</s>");
    assert_eq!(t.token_text(1), "<pad>");
    assert_eq!(t.token_to_id("Ġcat"), Some(4758));
    assert!(format!("{t:?}").contains("vocab_size: 50265"));
}

#[test]
fn no_prefix_space() {
    assert_eq!(tok().encode("Hello", false).unwrap(), [31414]);
    assert_eq!(tok().encode(" Hello", false).unwrap(), [20920]);
    assert_eq!(tokens("Hello world"), ["Hello", "Ġworld"]);
    assert_eq!(tok().encode("", true).unwrap(), [2]);
    assert!(tok().encode("", false).unwrap().is_empty());
}

#[test]
fn special_tokens_in_text_follow_hf_opt() {
    let t = tok();
    // HF's OPT tokenizer: all_special_tokens == ["</s>", "<pad>"].
    assert_eq!(t.encode("</s>", false).unwrap(), [2]);
    assert_eq!(t.encode("a</s>b", false).unwrap(), [102, 2, 428]);
    assert_eq!(t.encode("a </s> b", false).unwrap(), [102, 1437, 2, 741]);
    assert_eq!(t.encode("</s></s>", true).unwrap(), [2, 2, 2]);
    assert_eq!(t.encode("x<pad>y", false).unwrap(), [1178, 1, 219]);
    // <s> and <unk> are not special in HF's OPT tokenizer: plain BPE.
    assert_eq!(t.encode("<s>", false).unwrap(), [41552, 29, 15698]);
    assert_eq!(t.encode("<unk>", false).unwrap(), [41552, 6435, 15698]);
    assert_eq!(t.encode(" <s> hi", false).unwrap(), [28696, 29, 15698, 20280]);
    let (_, offsets) = t.encode_with_offsets("x</s>y").unwrap();
    assert_eq!(offsets, [(0, 1), (1, 5), (5, 6)]);
}

#[test]
fn decode_skip_special_and_out_of_range_ids() {
    let t = tok();
    assert_eq!(t.decode(&[2, 31414, 1, 232, 2], false).unwrap(), "</s>Hello<pad> world</s>");
    assert_eq!(t.decode(&[2, 31414, 1, 232, 2], true).unwrap(), "Hello world");
    // <s>/<unk> are ordinary tokens for HF's OPT tokenizer, kept by skip_special.
    assert_eq!(t.decode(&[0, 3], true).unwrap(), "<s><unk>");
    // OPT's padding rows 50265..50272 and anything beyond decode to nothing.
    for id in [50265, 50271, 99_999, u32::MAX] {
        assert_eq!(t.decode(&[id], false).unwrap(), "");
        assert_eq!(t.token_str(id), None);
        assert_eq!(t.token_bytes(id), None);
        assert_eq!(t.token_text(id), "");
    }
    assert_eq!(t.decode(&[50265, 31414, 50271, 232, u32::MAX], false).unwrap(), "Hello world");
    assert_eq!(t.decode(&[], false).unwrap(), "");
}

#[test]
fn unicode() {
    let t = tok();
    for text in [
        "héllo wörld",
        "Crème brûlée",
        "e\u{301}",
        "日本語のテキスト",
        "中文分词测试。",
        "한국어",
        "Привет, мир!",
        "مرحبا",
        "😀🎉🚀",
        "👨\u{200d}👩\u{200d}👧\u{200d}👦 family",
        "🏳\u{fe0f}\u{200d}🌈",
        "👍🏽",
        "🇺🇸🇯🇵",
        "\u{feff}BOM \u{fffd}",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "\u{10ffff}\u{e000}\u{0}\u{7f}",
    ] {
        check_invariants(t, text);
    }
    // The family emoji is split byte-wise; fragments report the whole character's span.
    let (ids, offsets) = t.encode_with_offsets("👨\u{200d}👩").unwrap();
    assert_eq!(ids, [31193, 11423, 17, 8384, 31193, 15375]);
    assert_eq!(offsets, [(0, 4), (0, 4), (4, 7), (4, 7), (7, 11), (7, 11)]);
    // A lone fragment displays lossily; its bytes are exact.
    assert_eq!(t.token_text(31193), "\u{fffd}");
    assert_eq!(t.token_bytes(31193).unwrap(), [0xF0, 0x9F, 0x91]);
    // Decoding a sequence cut inside a character is lossy, never an error.
    assert_eq!(t.decode(&[31193], false).unwrap(), "\u{fffd}");
    assert_eq!(tokens("héllo"), ["h", "Ã©", "llo"]);
}

#[test]
fn whitespace_runs() {
    let t = tok();
    // GPT-2's split: a run of spaces keeps its last space for the next word; OPT's vocabulary
    // has no "ĠĠ", so the rest are single "Ġ" tokens (expectations checked against HF).
    assert_eq!(tokens("a  b"), ["a", "Ġ", "Ġb"]);
    assert_eq!(tokens("a   b"), ["a", "Ġ", "Ġ", "Ġb"]);
    assert_eq!(tokens("tab\there"), ["tab", "ĉ", "here"]);
    assert_eq!(tokens("line1\nline2"), ["line", "1", "Ċ", "line", "2"]);
    assert_eq!(tokens("para\n\npara"), ["par", "a", "Ċ", "Ċ", "par", "a"]);
    assert_eq!(tokens("trailing  "), ["tra", "iling", "Ġ", "Ġ"]);
    assert_eq!(tokens(" "), ["Ġ"]);
    for text in [
        "  leading",
        "trailing ",
        "\t",
        "\t\t\t",
        "\n\n\n",
        "crlf\r\nline\r\n",
        "mixed \t\n \t",
        "  \n  indented\n    more",
        "\u{a0}nbsp\u{2009}thin\u{3000}ideographic",
        "                                        many spaces",
    ] {
        check_invariants(t, text);
    }
}

#[test]
fn code_snippets() {
    let t = tok();
    for text in [
        "def f(x):\n    return x + 1\n",
        "fn main() {\n\tprintln!(\"hi {}\", 42);\n}\n",
        "for (int i = 0; i < n; ++i) { a[i] *= 2; }",
        "<div class=\"x\">&amp;</div>",
        "SELECT * FROM t WHERE id = 'x';",
        "#include <stdio.h>\n// comment\n/* block */",
        "if x == 1 && y != 2 || z >= 3 { return Err(e)?; }",
        "I'm you're it's we've they'll he'd don't",
    ] {
        check_invariants(t, text);
    }
    assert_eq!(tokens("    if x:"), ["Ġ", "Ġ", "Ġ", "Ġif", "Ġx", ":"]);
    assert_eq!(tokens("don't"), ["don", "'t"]);
}

/// xorshift64*: deterministic, dependency-free pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn round_trip_generated_strings() {
    const PIECES: &[&str] = &[
        "a",
        "b",
        "z",
        "Q",
        "0",
        "7",
        " ",
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        ".",
        ",",
        "'",
        "'s",
        "'ll",
        "!",
        "?",
        "-",
        "_",
        "(",
        ")",
        "{",
        "}",
        "<",
        ">",
        "/",
        "\\",
        "\"",
        "#",
        "é",
        "ü",
        "ñ",
        "ß",
        "Ω",
        "日",
        "本",
        "한",
        "я",
        "ع",
        "😀",
        "👍🏽",
        "👨\u{200d}👩\u{200d}👧",
        "\u{200d}",
        "\u{301}",
        "\u{fe0f}",
        "\u{a0}",
        "\u{3000}",
        "\u{fffd}",
        "𝔘",
        "\u{0}",
        "\u{7f}",
        "</s>",
        "<pad>",
        "<s>",
        "<unk>",
        "<mask>",
        " the",
        " of",
        "ing",
        "Hello",
        " world",
        "1234",
    ];
    let t = tok();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..3000 {
        let n = 1 + rng.below(30);
        let text: String = (0..n).map(|_| PIECES[rng.below(PIECES.len())]).collect();
        check_invariants(t, &text);
    }
    // Arbitrary Unicode scalar values, not just a curated pool.
    for _ in 0..1000 {
        let n = 1 + rng.below(12);
        let text: String = (0..n)
            .filter_map(|_| {
                let plane = rng.below(4);
                let cp = match plane {
                    0 => rng.below(0x80) as u32,
                    1 => rng.below(0x800) as u32,
                    2 => rng.below(0x1_0000) as u32,
                    _ => rng.below(0x11_0000) as u32,
                };
                char::from_u32(cp)
            })
            .collect();
        check_invariants(t, &text);
    }
}

#[test]
fn from_dir_with_vocab_and_merges_matches_bundled() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        fs::copy(Path::new(ASSETS).join(f), dir.path().join(f)).unwrap();
    }
    let loaded = OptTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(loaded.vocab_size(), VOCAB_SIZE);
    assert_eq!(loaded.origin(), dir.path());
    for text in ["A photo of a cat", "a</s>b<pad>", "日本語 👍🏽", "  x\n"] {
        assert_eq!(loaded.encode(text, true).unwrap(), tok().encode(text, true).unwrap());
    }
    // The vendored assets folder itself loads too.
    assert!(OptTokenizer::from_dir(Path::new(ASSETS)).is_ok());
}

/// Writes a tokenizer.json shaped like the one HF transformers saves for OPT (TemplateProcessing
/// post-processor prepending </s>, ByteLevel with trim_offsets=true).
fn write_hf_tokenizer_json(dir: &Path) {
    let vocab: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(Path::new(ASSETS).join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<String> = fs::read_to_string(Path::new(ASSETS).join("merges.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    let added = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": true, "special": true})
    };
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(1, "<pad>"), added(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "</s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}
        },
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
}

#[test]
fn from_dir_prefers_hf_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    write_hf_tokenizer_json(dir.path());
    // Decoy files that would fail: tokenizer.json must win.
    fs::write(dir.path().join("vocab.json"), "not json").unwrap();
    let loaded = OptTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(loaded.origin(), dir.path().join("tokenizer.json"));
    assert_eq!(loaded.vocab_size(), VOCAB_SIZE);
    assert_eq!((loaded.bos_id(), loaded.pad_id()), (2, 1));
    for text in ["A photo of a cat", "a </s> b", " <s> hi", "héllo  wörld\n", "👨\u{200d}👩"] {
        // No doubled BOS from the file's post-processor, and untrimmed offsets as from bundled.
        assert_eq!(loaded.encode(text, true).unwrap(), tok().encode(text, true).unwrap());
        assert_eq!(loaded.encode_with_offsets(text).unwrap(), tok().encode_with_offsets(text).unwrap());
        let ids = loaded.encode(text, false).unwrap();
        assert_eq!(loaded.decode(&ids, false).unwrap(), text);
    }
    assert_eq!(loaded.decode(&[2, 31414, 1], true).unwrap(), "Hello");
    assert_eq!(loaded.token_text(4758), " cat");
}

fn expect_err(dir: &Path) -> TokenizerError {
    OptTokenizer::from_dir(dir).expect_err("loading must fail")
}

#[test]
fn from_dir_missing_files_names_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let err = expect_err(dir.path());
    let msg = err.to_string();
    assert!(matches!(err, TokenizerError::NotFound { .. }));
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("vocab.json") && msg.contains("merges.txt"), "{msg}");

    fs::copy(Path::new(ASSETS).join("vocab.json"), dir.path().join("vocab.json")).unwrap();
    let msg = expect_err(dir.path()).to_string();
    assert!(msg.contains("missing: tokenizer.json, merges.txt"), "{msg}");

    let nowhere = dir.path().join("does-not-exist");
    let msg = expect_err(&nowhere).to_string();
    assert!(msg.contains("does-not-exist"), "{msg}");
}

#[test]
fn malformed_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let merges = dir.path().join("merges.txt");
    let vocab = dir.path().join("vocab.json");
    fs::copy(Path::new(ASSETS).join("merges.txt"), &merges).unwrap();

    for bad in ["{not json", "[1, 2, 3]", "{\"a\": \"zero\"}", "{\"a\": -1}", "{}", "{\"a\": 0, \"b\": 0}"] {
        fs::write(&vocab, bad).unwrap();
        let err = expect_err(dir.path());
        let msg = err.to_string();
        assert!(matches!(err, TokenizerError::Malformed { .. }), "{bad}: {msg}");
        assert!(msg.contains(&vocab.display().to_string()), "{bad}: {msg}");
    }

    // Valid vocab, broken merges.
    fs::copy(Path::new(ASSETS).join("vocab.json"), &vocab).unwrap();
    fs::write(&merges, "#version: 0.2\nĠ t\nthree parts here\n").unwrap();
    let msg = expect_err(dir.path()).to_string();
    assert!(msg.contains(&merges.display().to_string()) && msg.contains("line 3"), "{msg}");
    fs::write(&merges, "#version: 0.2\nnotatoken alsonot\n").unwrap();
    let msg = expect_err(dir.path()).to_string();
    assert!(msg.contains(&merges.display().to_string()), "{msg}");

    // A vocabulary without </s> is not OPT's.
    fs::write(&vocab, "{\"a\": 0, \"b\": 1}").unwrap();
    fs::write(&merges, "#version: 0.2\n").unwrap();
    let msg = expect_err(dir.path()).to_string();
    assert!(msg.contains("</s>") && msg.contains("vocab.json"), "{msg}");

    // Not UTF-8.
    fs::write(&vocab, [0xFFu8, 0xFE, 0x00]).unwrap();
    let msg = expect_err(dir.path()).to_string();
    assert!(msg.contains(&vocab.display().to_string()), "{msg}");

    // Broken tokenizer.json.
    fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let err = expect_err(dir.path());
    let msg = err.to_string();
    assert!(matches!(err, TokenizerError::Malformed { .. }), "{msg}");
    assert!(msg.contains("tokenizer.json"), "{msg}");
}

#[test]
fn tokenizer_is_send_sync_and_clone() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<OptTokenizer>();
    let t = tok().clone();
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || t.encode(&format!("thread {i}"), true).unwrap())
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap()[0], 2);
    }
}
