//! Building OpenAI `text_completion` responses — the whole object, or SSE chunks — from the
//! engine's events.
//!
//! Conventions (OpenAI's legacy completions API, as vLLM also serves it):
//! - choice `index` = prompt index · n + i;
//! - `finish_reason` is `length` or `stop` (a stop string or the end-of-sequence token);
//! - `logprobs.tokens` are token texts (`bytes:\xNN…` for a token that is not valid UTF-8 on its
//!   own, `</s>` for the end/begin token); `top_logprobs` maps the top-K alternatives, plus the
//!   chosen token when it is not among them, to their log-probs, best first;
//! - `text_offset` is each token's character offset in prompt text + completion text, even
//!   without `echo` (so with echo they index the returned text);
//! - with `echo`, the prompt comes first in `text` and in `logprobs`, and the first prompt
//!   token's log-prob (and its top_logprobs entry) is null;
//! - `usage.completion_tokens` counts the returned choices' tokens (the EOS included).

use std::sync::Arc;

use opt_generate::{Completion, FinishReason, SamplingParams, TokenLogprob};
use opt_tokenizer::OptTokenizer;
use serde_json::{json, Map, Value};

use crate::engine::Event;

/// Character offsets of a byte stream that arrives token by token (lossy UTF-8, like the text).
#[derive(Clone, Debug, Default)]
struct OffsetTracker {
    chars: usize,
    /// Bytes of an incomplete character.
    pending: Vec<u8>,
}

impl OffsetTracker {
    /// Append a token's bytes; returns the token's character offset (a token that continues an
    /// incomplete character gets that character's offset).
    fn push(&mut self, bytes: &[u8]) -> usize {
        let offset = self.chars;
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    self.chars += s.chars().count();
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    self.chars += String::from_utf8_lossy(&self.pending[start..start + good]).chars().count();
                    match e.error_len() {
                        None => {
                            self.pending.drain(..start + good);
                            break;
                        }
                        // An invalid sequence is one U+FFFD in the text.
                        Some(n) => {
                            self.chars += 1;
                            start += good + n;
                        }
                    }
                }
            }
        }
        offset
    }
}

/// Per prompt: what the response needs to echo it.
#[derive(Clone, Debug, Default)]
struct PromptState {
    ids: Vec<u32>,
    text: String,
    logprobs: Option<Vec<TokenLogprob>>,
}

#[derive(Clone, Debug, Default)]
struct ChoiceState {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
    /// Offsets for streaming (fed the prompt first).
    offsets: OffsetTracker,
}

/// The logprobs object under construction.
#[derive(Default)]
struct LogprobsJson {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
}

impl LogprobsJson {
    fn push(&mut self, tok: &OptTokenizer, rec: &TokenLogprob, offset: usize) {
        self.tokens.push(Value::String(token_display(tok, rec.id)));
        self.text_offset.push(json!(offset));
        match rec.logprob {
            None => {
                self.token_logprobs.push(Value::Null);
                self.top_logprobs.push(Value::Null);
            }
            Some(lp) => {
                self.token_logprobs.push(json!(lp));
                let mut top = Map::new();
                for &(id, x) in &rec.top {
                    top.entry(token_display(tok, id)).or_insert(json!(x));
                }
                top.entry(token_display(tok, rec.id)).or_insert(json!(lp));
                self.top_logprobs.push(Value::Object(top));
            }
        }
    }

    fn into_value(self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// A token as text for `logprobs.tokens`.
pub fn token_display(tok: &OptTokenizer, id: u32) -> String {
    match tok.token_bytes(id) {
        Some(b) => match String::from_utf8(b) {
            Ok(s) => s,
            Err(e) => {
                let mut s = String::from("bytes:");
                for byte in e.as_bytes() {
                    s.push_str(&format!("\\x{byte:02x}"));
                }
                s
            }
        },
        // OPT's embedding rows past the tokenizer's vocabulary have no text.
        None => format!("token_id:{id}"),
    }
}

fn finish_str(f: Option<FinishReason>) -> Value {
    match f {
        None => Value::Null,
        Some(FinishReason::Length) => json!("length"),
        Some(FinishReason::Stop | FinishReason::Eos) => json!("stop"),
    }
}

/// Collects one request's events into a response (or into chunks as they come).
pub(crate) struct Collector {
    id: String,
    created: u64,
    model: String,
    tok: Arc<OptTokenizer>,
    n: usize,
    echo: bool,
    logprobs: bool,
    prompts: Vec<PromptState>,
    choices: Vec<ChoiceState>,
}

impl Collector {
    /// A collector for response `id` (created at unix time `created`) of `model`.
    pub fn new(
        id: String,
        created: u64,
        model: String,
        tok: Arc<OptTokenizer>,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
    ) -> Self {
        let (n, echo, logprobs) = (params.n, params.echo, params.logprobs.is_some());
        let prompts = prompts
            .iter()
            .map(|ids| PromptState {
                text: if echo { tok.decode(ids, true).unwrap_or_default() } else { String::new() },
                ids: ids.clone(),
                logprobs: None,
            })
            .collect::<Vec<_>>();
        let choices = (0..prompts.len() * n).map(|_| ChoiceState::default()).collect();
        Collector { id, created, model, tok, n, echo, logprobs, prompts, choices }
    }

    /// Bytes a token adds to the text (none for `</s>` and `<pad>`, which the text skips).
    fn text_bytes(&self, id: u32) -> Vec<u8> {
        if id == self.tok.eos_id() || id == self.tok.bos_id() || id == self.tok.pad_id() {
            return Vec::new();
        }
        self.tok.token_bytes(id).unwrap_or_default()
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(|p| p.ids.len()).sum()
    }

    pub fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.tokens.len()).sum()
    }

    pub fn usage(&self) -> Value {
        let (p, c) = (self.prompt_tokens(), self.completion_tokens());
        json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    }

    fn chunk(&self, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The last chunk of a stream with `stream_options.include_usage`.
    pub fn usage_chunk(&self) -> Value {
        let mut c = self.chunk(Vec::new());
        c["usage"] = self.usage();
        c
    }

    /// Take one event. With `stream`, returns the chunks to send for it.
    pub fn on_event(&mut self, e: Event, stream: bool) -> Vec<Value> {
        match e {
            Event::Prompt { prompt, logprobs } => self.on_prompt(prompt, logprobs, stream),
            Event::Token { choice, token, text, logprob, finish } => {
                if choice >= self.choices.len() {
                    return Vec::new();
                }
                let bytes = self.text_bytes(token);
                let c = &mut self.choices[choice];
                c.text.push_str(&text);
                c.tokens.push(token);
                c.finish = finish;
                let offset = c.offsets.push(&bytes);
                if let Some(rec) = &logprob {
                    c.logprobs.push(rec.clone());
                }
                if !stream || (text.is_empty() && finish.is_none() && logprob.is_none()) {
                    return Vec::new();
                }
                let lp = logprob.map(|rec| {
                    let mut j = LogprobsJson::default();
                    j.push(&self.tok, &rec, offset);
                    j.into_value()
                });
                vec![self.chunk(vec![json!({
                    "text": text,
                    "index": choice,
                    "logprobs": lp,
                    "finish_reason": finish_str(finish),
                })])]
            }
            Event::Whole { choice, completion } => self.on_whole(choice, completion, stream),
            Event::Done | Event::Error(_) => Vec::new(),
        }
    }

    fn on_prompt(&mut self, prompt: usize, logprobs: Option<Vec<TokenLogprob>>, stream: bool) -> Vec<Value> {
        let Some(p) = self.prompts.get_mut(prompt) else { return Vec::new() };
        p.logprobs = logprobs;
        let p = &self.prompts[prompt];
        let bytes: Vec<Vec<u8>> = p.ids.iter().map(|&id| self.text_bytes(id)).collect();
        let mut out = Vec::new();
        for i in 0..self.n {
            let index = prompt * self.n + i;
            let Some(c) = self.choices.get_mut(index) else { continue };
            let offsets: Vec<usize> = bytes.iter().map(|b| c.offsets.push(b)).collect();
            if stream && self.echo {
                let lp = match (&p.logprobs, self.logprobs) {
                    (Some(lps), true) => {
                        let mut j = LogprobsJson::default();
                        for (rec, &off) in lps.iter().zip(&offsets) {
                            j.push(&self.tok, rec, off);
                        }
                        Some(j.into_value())
                    }
                    _ => None,
                };
                out.push(json!({"text": p.text, "index": index, "logprobs": lp, "finish_reason": null}));
            }
        }
        out.into_iter().map(|c| self.chunk(vec![c])).collect()
    }

    fn on_whole(&mut self, choice: usize, completion: Completion, stream: bool) -> Vec<Value> {
        let Some(c) = self.choices.get_mut(choice) else { return Vec::new() };
        c.text = completion.text.unwrap_or_default();
        c.tokens = completion.token_ids;
        c.logprobs = completion.logprobs.unwrap_or_default();
        c.finish = Some(completion.finish_reason);
        if !stream {
            return Vec::new();
        }
        let lp = self.logprobs.then(|| {
            let c = &self.choices[choice];
            let mut offsets = c.offsets.clone();
            let mut j = LogprobsJson::default();
            for rec in &c.logprobs {
                let off = offsets.push(&self.text_bytes(rec.id));
                j.push(&self.tok, rec, off);
            }
            j.into_value()
        });
        let c = &self.choices[choice];
        vec![self.chunk(vec![json!({
            "text": c.text,
            "index": choice,
            "logprobs": lp,
            "finish_reason": finish_str(c.finish),
        })])]
    }

    /// The whole response (non-streaming).
    pub fn response(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let p = &self.prompts[index / self.n];
                let text = if self.echo { format!("{}{}", p.text, c.text) } else { c.text.clone() };
                let logprobs = self.logprobs.then(|| {
                    let mut offsets = OffsetTracker::default();
                    let mut j = LogprobsJson::default();
                    let echoed = p.logprobs.as_deref().filter(|_| self.echo);
                    match echoed {
                        Some(lps) => {
                            for rec in lps {
                                let off = offsets.push(&self.text_bytes(rec.id));
                                j.push(&self.tok, rec, off);
                            }
                        }
                        None => {
                            for &id in &p.ids {
                                offsets.push(&self.text_bytes(id));
                            }
                        }
                    }
                    for rec in &c.logprobs {
                        let off = offsets.push(&self.text_bytes(rec.id));
                        j.push(&self.tok, rec, off);
                    }
                    j.into_value()
                });
                json!({
                    "text": text,
                    "index": index,
                    "logprobs": logprobs,
                    "finish_reason": finish_str(c.finish.or(Some(FinishReason::Length))),
                })
            })
            .collect();
        let mut r = self.chunk(choices);
        r["usage"] = self.usage();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_count_characters_and_split_characters() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.push(b"ab"), 0);
        // "é" split over two tokens: the second token starts inside it.
        assert_eq!(t.push(b"\xC3"), 2);
        assert_eq!(t.push(b"\xA9x"), 2);
        assert_eq!(t.push(b"\xFFy"), 4);
        assert_eq!(t.push(b"z"), 6);
    }

    #[test]
    fn display_of_special_partial_and_unknown_tokens() {
        let tok = OptTokenizer::bundled().expect("bundled tokenizer");
        assert_eq!(token_display(&tok, 2), "</s>");
        let hello = tok.encode(" Hello", false).expect("encode");
        assert_eq!(token_display(&tok, hello[0]), " Hello");
        assert_eq!(token_display(&tok, 50270), "token_id:50270");
        // A token standing for a lone UTF-8 lead byte (part of a multi-byte character).
        let ids = tok.encode("😀", false).expect("encode");
        assert!(ids.len() > 1);
        assert!(token_display(&tok, ids[0]).starts_with("bytes:\\x"), "{}", token_display(&tok, ids[0]));
    }

    #[test]
    fn echo_response_puts_the_prompt_first() {
        let tok = Arc::new(OptTokenizer::bundled().expect("bundled tokenizer"));
        let prompt = tok.encode("Hi there", true).expect("encode");
        let params = SamplingParams { echo: true, logprobs: Some(1), ..Default::default() };
        let mut c = Collector::new("cmpl-x".into(), 1, "m".into(), tok.clone(), std::slice::from_ref(&prompt), &params);
        let lps: Vec<TokenLogprob> = prompt
            .iter()
            .enumerate()
            .map(|(i, &id)| TokenLogprob { id, logprob: (i > 0).then_some(-1.0), top: vec![(7, -0.5)] })
            .collect();
        c.on_event(Event::Prompt { prompt: 0, logprobs: Some(lps) }, false);
        let world = tok.encode(" world", false).expect("encode")[0];
        let rec = TokenLogprob { id: world, logprob: Some(-2.0), top: vec![(7, -0.5)] };
        c.on_event(
            Event::Token {
                choice: 0,
                token: world,
                text: " world".into(),
                logprob: Some(rec),
                finish: Some(FinishReason::Length),
            },
            false,
        );
        let r = c.response();
        assert_eq!(r["object"], "text_completion");
        assert_eq!(r["choices"][0]["text"], "Hi there world");
        assert_eq!(r["choices"][0]["finish_reason"], "length");
        let lp = &r["choices"][0]["logprobs"];
        assert_eq!(lp["tokens"], json!(["</s>", "Hi", " there", " world"]));
        assert_eq!(lp["token_logprobs"], json!([null, -1.0, -1.0, -2.0]));
        assert_eq!(lp["text_offset"], json!([0, 0, 2, 8]));
        assert_eq!(lp["top_logprobs"][0], Value::Null);
        // The alternative (id 7) first, then the chosen token added.
        assert_eq!(lp["top_logprobs"][3].as_object().map(|m| m.len()), Some(2));
        assert_eq!(lp["top_logprobs"][3][" world"], json!(-2.0));
        assert_eq!(r["usage"], json!({"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}));
    }
}
