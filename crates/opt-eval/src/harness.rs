//! lm-evaluation-harness's text and token rules, reproduced exactly: how a
//! `(context, continuation)` pair becomes token ids, HellaSwag's preprocessing and the word count
//! behind `word_perplexity`.
//!
//! Python's notion of whitespace (`str.isspace`, `\s` in `re`) is the Unicode `White_Space` set
//! plus U+001C..U+001F; Rust's `char::is_whitespace` lacks those four, so [`is_py_space`] adds them.

use opt_tokenizer::OptTokenizer;

use crate::Result;

/// One scoring request as token ids: `context` starts with `</s>`; `continuation` holds the ids
/// whose log-probabilities are summed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// Python's `str.isspace()` for one character.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `s.rstrip()`.
pub fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(is_py_space)
}

/// Python's `s.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// The harness's `_encode_pair` for a causal LM, with OPT's `</s>` prepended to every encoding
/// (what HF's OPT tokenizer does with special tokens on):
/// - trailing whitespace of the context moves to the front of the continuation;
/// - `whole = enc(context + continuation)`, `context_ids = enc(context)`;
/// - continuation ids are `whole[len(context_ids)..]`, which is not always
///   `enc(continuation)`: BPE may merge across the boundary.
///
/// An empty context scores the continuation after `</s>` alone (the harness's
/// `prefix_token_id` case).
pub fn encode_pair(tok: &OptTokenizer, context: &str, continuation: &str) -> Result<Request> {
    if context.is_empty() {
        return Ok(Request { context: vec![tok.bos_id()], continuation: tok.encode(continuation, false)? });
    }
    let kept = py_rstrip(context);
    let moved = &context[kept.len()..];
    let continuation = format!("{moved}{continuation}");
    let whole = tok.encode(&format!("{kept}{continuation}"), true)?;
    let ctx = tok.encode(kept, true)?;
    let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
    Ok(Request { context: ctx, continuation: cont })
}

/// `lm_eval/tasks/hellaswag/utils.py::preprocess`: strip, `" [title]"` → `". "`, drop every
/// `[...]` (non-greedy, as `re.sub("\\[.*?\\]", "", text)`), then one pass of `"  "` → `" "`.
pub fn hellaswag_preprocess(text: &str) -> String {
    let text = py_strip(text).replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open + 1..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + 1 + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// The HellaSwag query from the layout's first line, `activity_label: ctx_a ctx_b`.
///
/// The harness builds `activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`, but this layout
/// joined ctx_a and ctx_b without capitalising ctx_b and without marking the boundary. In the
/// ActivityNet items ctx_b is the unfinished, lower-case fragment after the last sentence end
/// (`"... on a roof. he"`), so when the line does not end a sentence and the fragment after the
/// last `". "`/`"! "`/`"? "` (or after `": "`) starts with a lower-case letter, that letter is
/// upper-cased. `capitalize()` would also lower-case the rest of ctx_b; that is lost with the
/// boundary and only matters where ctx_b has capitals beyond its first letter. Then the
/// harness's [`hellaswag_preprocess`].
pub fn hellaswag_query(line: &str) -> String {
    let s = py_strip(line);
    let ends_sentence = s.ends_with(['.', '!', '?', '"', '\'']);
    let mut q = s.to_string();
    if !s.is_empty() && !ends_sentence {
        let start = last_sentence_break(s).or_else(|| s.find(": ").map(|i| i + 2)).unwrap_or(0);
        if let Some(c) = s[start..].chars().next() {
            if c.is_lowercase() {
                q = format!("{}{}{}", &s[..start], c.to_uppercase(), &s[start + c.len_utf8()..]);
            }
        }
    }
    hellaswag_preprocess(&q)
}

/// Byte offset just after the last `". "`, `"! "` or `"? "` in `s`.
fn last_sentence_break(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (1..b.len()).rev().find(|&i| b[i] == b' ' && matches!(b[i - 1], b'.' | b'!' | b'?')).map(|i| i + 1)
}

/// `len(re.split(r"\s+", text))`: the word count behind lm-eval's `word_perplexity`. Like
/// Python's split it counts the empty pieces before leading and after trailing whitespace.
pub fn py_word_count(text: &str) -> usize {
    let mut count = 1;
    let mut in_space = false;
    for c in text.chars() {
        let sp = is_py_space(c);
        if sp && !in_space {
            count += 1;
        }
        in_space = sp;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_matches_the_harness() {
        assert_eq!(hellaswag_preprocess("  a [header] b [title] c  "), "a b. c");
        assert_eq!(hellaswag_preprocess("x [a [your name] y"), "x y");
        assert_eq!(hellaswag_preprocess("open [ only"), "open [ only");
        // One pass of "  " -> " ", as Python's str.replace.
        assert_eq!(hellaswag_preprocess("a   b"), "a  b");
    }

    #[test]
    fn query_capitalises_the_trailing_fragment() {
        assert_eq!(
            hellaswag_query("Roof shingle removal: A man is sitting on a roof. he"),
            "Roof shingle removal: A man is sitting on a roof. He"
        );
        assert_eq!(hellaswag_query("High jump: the boy"), "High jump: The boy");
        assert_eq!(hellaswag_query("Health: Drink water. Every day."), "Health: Drink water. Every day.");
        assert_eq!(hellaswag_query("X: 2 a guy"), "X: 2 a guy");
    }

    #[test]
    fn word_count_is_python_split() {
        assert_eq!(py_word_count("a b  c"), 3);
        assert_eq!(py_word_count(" a\n\nb "), 4);
        assert_eq!(py_word_count(""), 1);
        assert_eq!(py_word_count("a\u{1f}b"), 2);
    }
}
