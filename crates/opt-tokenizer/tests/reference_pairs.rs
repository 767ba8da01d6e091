//! Published string → id pairs (tests/data/opt_tokenization_pairs.json) and HF transformers'
//! output for our own cases (tests/data/hf_reference_cases.json, made by gen_hf_reference.py).

use std::sync::OnceLock;

use opt_tokenizer::OptTokenizer;
use serde::Deserialize;

fn tok() -> &'static OptTokenizer {
    static TOK: OnceLock<OptTokenizer> = OnceLock::new();
    TOK.get_or_init(|| OptTokenizer::bundled().expect("bundled tokenizer loads"))
}

#[derive(Deserialize)]
struct PairsFile {
    #[serde(rename = "_about")]
    about: String,
    cases: Vec<PairCase>,
    special_token_case: SpecialCase,
}

#[derive(Deserialize)]
struct PairCase {
    text: String,
    #[serde(default)]
    prefix: Vec<u32>,
    #[serde(default)]
    suffix: Vec<u32>,
    ids: Vec<u32>,
    tokenizer: String,
}

#[derive(Deserialize)]
struct SpecialCase {
    text: String,
    ids: Vec<u32>,
    tokens: Vec<String>,
}

fn pairs() -> PairsFile {
    let text = include_str!("data/opt_tokenization_pairs.json");
    serde_json::from_str(text).expect("opt_tokenization_pairs.json parses")
}

#[test]
fn every_published_pair_matches() {
    let file = pairs();
    assert!(file.about.contains("prefix"), "convention documented in _about");
    assert!(file.cases.len() >= 9);
    let tok = tok();
    for case in &file.cases {
        let ctx = format!("{:?} ({})", case.text, case.tokenizer);
        // The stated prefix/suffix are the special tokens that source's tokenizer added.
        assert!(case.ids.starts_with(&case.prefix), "{ctx}: ids start with prefix");
        assert!(case.ids.ends_with(&case.suffix), "{ctx}: ids end with suffix");
        let body = &case.ids[case.prefix.len()..case.ids.len() - case.suffix.len()];
        assert_eq!(tok.encode(&case.text, false).unwrap(), body, "{ctx}: body ids");

        match (case.prefix.as_slice(), case.suffix.as_slice()) {
            // OPT convention: </s> prepended, which is exactly what add_bos does.
            ([2], []) => assert_eq!(tok.encode(&case.text, true).unwrap(), case.ids, "{ctx}"),
            // No special tokens at all.
            ([], []) => assert_eq!(tok.encode(&case.text, false).unwrap(), case.ids, "{ctx}"),
            // RoBERTa/BART style: <s> body </s>.
            ([0], [2]) => {
                let mut ids = vec![0];
                ids.extend(tok.encode(&case.text, false).unwrap());
                ids.push(tok.eos_id());
                assert_eq!(ids, case.ids, "{ctx}");
            }
            // A custom BOS chosen by the user (a vocabulary word), no suffix.
            ([custom], []) => {
                assert!((*custom as usize) < tok.vocab_size(), "{ctx}: custom bos in vocab");
                let mut ids = vec![*custom];
                ids.extend(tok.encode(&case.text, false).unwrap());
                assert_eq!(ids, case.ids, "{ctx}");
            }
            (p, s) => panic!("{ctx}: unhandled convention prefix={p:?} suffix={s:?}"),
        }
        // The ids decode back to the text (RoBERTa-style framing removed by skip_special).
        assert_eq!(tok.decode(body, false).unwrap(), case.text, "{ctx}: decode");
    }
}

#[test]
fn custom_bos_case_is_the_word_bos() {
    let file = pairs();
    let case = file.cases.iter().find(|c| c.prefix == [31957]).expect("custom bos case present");
    assert_eq!(tok().token_str(case.prefix[0]).as_deref(), Some("bos"));
}

#[test]
fn herlolip_note_full_string() {
    // The note in the pairs file: the full source string with " 418" adds 42928 ('Ġ418').
    let ids = tok().encode("Hello world! cécé herlolip 418", false).unwrap();
    assert_eq!(ids, [31414, 232, 328, 740, 1140, 12695, 69, 46078, 1588, 42928]);
    assert_eq!(tok().token_str(42928).as_deref(), Some("Ġ418"));
}

#[test]
fn special_token_case_pieces() {
    // This case comes from an early, RoBERTa-style OPTTokenizer where <mask> was an added token
    // with lstrip. Today's HF OPT tokenizer has only </s> and <pad> as special tokens, so we check
    // the pieces (as the file's note does) and the vocabulary entries, not the framing.
    let file = pairs();
    let case = file.special_token_case;
    let tok = tok();
    assert_eq!(case.text, "A, <mask> AllenNLP sentence.");
    for (id, token) in case.ids.iter().zip(&case.tokens) {
        assert_eq!(tok.token_str(*id).as_deref(), Some(token.as_str()));
        assert_eq!(tok.token_to_id(token), Some(*id));
    }
    assert_eq!(tok.encode("A,", false).unwrap(), case.ids[1..3]);
    assert_eq!(tok.encode(" AllenNLP sentence.", false).unwrap(), case.ids[4..9]);
    // In today's OPT tokenizer "<mask>" in text is plain BPE (checked against HF transformers).
    assert_eq!(tok.encode("<mask>", false).unwrap(), [41552, 43776, 15698]);
}

#[derive(Deserialize)]
struct HfFile {
    reference: String,
    cases: Vec<HfCase>,
}

#[derive(Deserialize)]
struct HfCase {
    kind: String,
    text: String,
    ids: Vec<u32>,
    byte_offsets: Vec<(usize, usize)>,
}

#[test]
fn matches_hf_transformers_ids_and_offsets() {
    let file: HfFile =
        serde_json::from_str(include_str!("data/hf_reference_cases.json")).expect("hf_reference_cases.json parses");
    assert!(file.reference.contains("transformers"));
    let tok = tok();
    let mut handpicked = 0;
    for case in &file.cases {
        let ctx = format!("{:?} ({})", case.text, case.kind);
        let (ids, offsets) = tok.encode_with_offsets(&case.text).unwrap();
        assert_eq!(ids, case.ids, "{ctx}: ids");
        assert_eq!(offsets, case.byte_offsets, "{ctx}: offsets");
        let mut with_bos = vec![2];
        with_bos.extend(&case.ids);
        assert_eq!(tok.encode(&case.text, true).unwrap(), with_bos, "{ctx}");
        assert_eq!(tok.decode(&ids, false).unwrap(), case.text, "{ctx}: decode");
        handpicked += usize::from(case.kind == "handpicked");
    }
    assert!(handpicked >= 60 && file.cases.len() >= 250);
}
