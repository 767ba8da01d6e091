//! Parsing and checking a `/v1/completions` body.
//!
//! The body is read as a `serde_json::Value` and each field is taken out by hand instead of
//! deriving `Deserialize`: serde's messages name a line and column, while a client needs to be
//! told *which field* is wrong (`param` in OpenAI's error JSON). Every check that can be made
//! before tokenizing is made here, so a bad request is refused before it reaches the queue.
//!
//! Fields: OpenAI's completions API (`prompt`, `max_tokens`, `temperature`, `top_p`, `n`,
//! `best_of`, `logprobs`, `echo`, `stop`, `presence_penalty`, `frequency_penalty`, `seed`,
//! `stream`, `stream_options`, `user`, `model`), plus metaseq's/HF's (`top_k`, `min_tokens`,
//! `typical_p`, `repetition_penalty`, `no_repeat_ngram_size`, `num_beams`, `length_penalty`,
//! `early_stopping`). `null` means "not given". Unknown fields are ignored, as most
//! OpenAI-compatible servers do, except `suffix` and `logit_bias`, which are refused when set
//! because silently dropping them would change what the client gets.

use opt_generate::params::Mode;
use opt_generate::{EarlyStopping, GenerateError, SamplingParams};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Upper bounds on request sizes, so one request cannot take the server's memory.
pub const MAX_N: u64 = 128;
/// Top alternatives per position at most (vLLM's default `max_logprobs`; OpenAI allows 5).
pub const MAX_LOGPROBS: u64 = 20;
pub const MAX_STOP: usize = 16;

/// A prompt as sent: text (tokenized with `</s>` prepended, as HF's OPT tokenizer does) or ids
/// (used as given).
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// A checked completions request.
#[derive(Clone, Debug)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompts: Vec<PromptInput>,
    pub params: SamplingParams,
    pub mode: Mode,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk carrying `usage`.
    pub include_usage: bool,
}

/// What the model allows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `max_position_embeddings`.
    pub context: usize,
    pub vocab: usize,
}

/// Parse and check a completions body.
pub fn parse_completion(body: &[u8], limits: Limits) -> Result<CompletionRequest, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_body(format!(
            "We could not parse the JSON body of your request ({e}). The body must be a JSON object."
        ))
    })?;
    let Value::Object(obj) = value else {
        return Err(ApiError::bad_body("the request body must be a JSON object"));
    };
    let f = Fields(&obj);

    let model = f.string("model")?;
    let prompts = parse_prompts(obj.get("prompt").filter(|v| !v.is_null()), limits.vocab)?;

    let ctx = limits.context as u64;
    let mut p = SamplingParams::default();
    if let Some(m) = f.uint("max_tokens", 0, ctx, "an integer ≥ 0 (at most the model's context)")? {
        p.max_new_tokens = m as usize;
    }
    if let Some(m) = f.uint("min_tokens", 0, ctx, "an integer ≥ 0")? {
        p.min_new_tokens = m as usize;
    }
    p.temperature = f.number("temperature", |t| t >= 0.0, "a number ≥ 0")?.map(|t| t as f32);
    p.top_p = f.number("top_p", |x| x > 0.0 && x <= 1.0, "a number in (0, 1]")?.map(|x| x as f32);
    p.typical_p = f.number("typical_p", |x| x > 0.0 && x <= 1.0, "a number in (0, 1]")?.map(|x| x as f32);
    p.repetition_penalty = f.number("repetition_penalty", |x| x > 0.0, "a number > 0")?.map(|x| x as f32);
    // -1 is vLLM's spelling of "off"; 0 is HF's.
    if let Some(k) = f.int("top_k", -1, u32::MAX as i64, "an integer ≥ -1 (-1 or 0 = off)")? {
        p.top_k = (k > 0).then_some(k as usize);
    }
    for (name, slot) in [("presence_penalty", &mut p.presence_penalty), ("frequency_penalty", &mut p.frequency_penalty)]
    {
        if let Some(x) = f.number(name, |x| (-2.0..=2.0).contains(&x), "a number in [-2, 2]")? {
            *slot = x as f32;
        }
    }
    if let Some(n) = f.uint("no_repeat_ngram_size", 0, ctx, "an integer ≥ 0")? {
        p.no_repeat_ngram_size = n as usize;
    }
    if let Some(n) = f.uint("n", 1, MAX_N, &format!("an integer in [1, {MAX_N}]"))? {
        p.n = n as usize;
    }
    p.best_of = f.uint("best_of", 1, MAX_N, &format!("an integer in [1, {MAX_N}]"))?.map(|b| b as usize);
    if let Some(b) = f.uint("num_beams", 1, MAX_N, &format!("an integer in [1, {MAX_N}]"))? {
        p.num_beams = b as usize;
    }
    if let Some(x) = f.number("length_penalty", |_| true, "a finite number")? {
        p.length_penalty = x as f32;
    }
    if let Some(v) = f.get("early_stopping") {
        p.early_stopping = match v {
            Value::Bool(true) => EarlyStopping::True,
            Value::Bool(false) => EarlyStopping::False,
            Value::String(s) if s == "never" => EarlyStopping::Never,
            other => return Err(type_error("early_stopping", "true, false or \"never\"", other)),
        };
    }
    p.logprobs = f
        .uint("logprobs", 0, MAX_LOGPROBS, &format!("an integer in [0, {MAX_LOGPROBS}]"))?
        .map(|k| (k as usize).min(limits.vocab));
    p.echo = f.bool("echo")?.unwrap_or(false);
    p.stop = parse_stop(f.get("stop"))?;
    if let Some(v) = f.get("seed") {
        // Any JSON integer: negative seeds are used by their two's-complement bits.
        p.seed = Some(match v.as_u64().or_else(|| v.as_i64().map(|i| i as u64)) {
            Some(s) => s,
            None => return Err(type_error("seed", "an integer", v)),
        });
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let mut include_usage = false;
    if let Some(v) = f.get("stream_options") {
        let Value::Object(o) = v else {
            return Err(type_error("stream_options", "an object", v));
        };
        if !stream {
            return Err(ApiError::invalid("stream_options", "stream_options is only allowed when stream is true"));
        }
        include_usage = Fields(o)
            .bool("include_usage")
            .map_err(|_| ApiError::invalid("stream_options", "stream_options.include_usage must be a boolean"))?
            .unwrap_or(false);
    }
    f.string("user")?;
    match f.get("suffix") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(_) => {
            return Err(ApiError::invalid("suffix", "suffix is not supported by this model (OPT has no infilling)"))
        }
    }
    match f.get("logit_bias") {
        None => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(_) => return Err(ApiError::invalid("logit_bias", "logit_bias is not supported by this server")),
    }

    let mode = p.validate().map_err(option_error)?;
    Ok(CompletionRequest { model, prompts, params: p, mode, stream, include_usage })
}

/// A library option error as an API error on the request's field name.
pub fn option_error(e: GenerateError) -> ApiError {
    match e {
        GenerateError::Option { option, detail } => {
            let param = match option {
                "max_new_tokens" => "max_tokens",
                "min_new_tokens" => "min_tokens",
                other => other,
            };
            ApiError::invalid(param, format!("{param} {detail}"))
        }
        GenerateError::Prompt { index, detail } => ApiError::invalid("prompt", format!("prompt {index}: {detail}")),
        other => ApiError::bad_body(other.to_string()),
    }
}

/// `prompt`: a string, a list of strings, a list of ids, or a list of id lists (OpenAI's forms).
fn parse_prompts(v: Option<&Value>, vocab: usize) -> Result<Vec<PromptInput>, ApiError> {
    const SHAPES: &str = "a string, a list of strings, a list of token ids or a list of lists of token ids";
    let Some(v) = v else {
        return Err(ApiError::invalid("prompt", "you must provide a prompt"));
    };
    let ids = |items: &[Value], which: &str| -> Result<Vec<u32>, ApiError> {
        if items.is_empty() {
            return Err(ApiError::invalid("prompt", format!("{which} is an empty list of token ids")));
        }
        items
            .iter()
            .map(|x| match x.as_u64() {
                Some(id) if (id as usize) < vocab => Ok(id as u32),
                Some(id) => Err(ApiError::invalid(
                    "prompt",
                    format!("{which}: token id {id} is outside the vocabulary of {vocab}"),
                )),
                None => Err(ApiError::invalid("prompt", format!("{which}: token ids must be integers ≥ 0, got {x}"))),
            })
            .collect()
    };
    match v {
        Value::String(s) => Ok(vec![PromptInput::Text(s.clone())]),
        Value::Array(items) if items.is_empty() => Err(ApiError::invalid("prompt", "prompt is an empty list")),
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::String(s) => Ok(PromptInput::Text(s.clone())),
                    _ => Err(ApiError::invalid(
                        "prompt",
                        format!("prompt {i} is not a string (prompt must be {SHAPES})"),
                    )),
                })
                .collect(),
            Value::Number(_) => Ok(vec![PromptInput::Ids(ids(items, "prompt")?)]),
            Value::Array(_) => items
                .iter()
                .enumerate()
                .map(|(i, x)| match x {
                    Value::Array(inner) => Ok(PromptInput::Ids(ids(inner, &format!("prompt {i}"))?)),
                    _ => Err(ApiError::invalid(
                        "prompt",
                        format!("prompt {i} is not a list of token ids (prompt must be {SHAPES})"),
                    )),
                })
                .collect(),
            _ => Err(ApiError::invalid("prompt", format!("prompt must be {SHAPES}"))),
        },
        other => Err(type_error("prompt", SHAPES, other)),
    }
}

/// `stop`: a string or a list of non-empty strings.
fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| type_error("stop", "a string or a list of strings", x))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(type_error("stop", "a string or a list of strings", other)),
    };
    if list.len() > MAX_STOP {
        return Err(ApiError::invalid("stop", format!("at most {MAX_STOP} stop strings, got {}", list.len())));
    }
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    Ok(list)
}

fn type_error(param: &str, expected: &str, got: &Value) -> ApiError {
    let mut shown = got.to_string();
    if shown.len() > 60 {
        let cut = (0..=60).rev().find(|&i| shown.is_char_boundary(i)).unwrap_or(0);
        shown.truncate(cut);
        shown.push('…');
    }
    ApiError::invalid(param, format!("'{param}' must be {expected}, got {shown}"))
}

/// Typed access to the body's fields; `null` counts as absent.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(type_error(k, "a boolean", other)),
        }
    }

    fn string(&self, k: &str) -> Result<Option<String>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(type_error(k, "a string", other)),
        }
    }

    /// A finite number satisfying `ok`.
    fn number(&self, k: &str, ok: impl Fn(f64) -> bool, expected: &str) -> Result<Option<f64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && ok(x) => Ok(Some(x)),
                Some(x) => Err(ApiError::invalid(k, format!("'{k}' must be {expected}, got {x}"))),
                None => Err(type_error(k, expected, v)),
            },
        }
    }

    /// An integer in `[min, max]` (an integral float such as `16.0` counts).
    fn int(&self, k: &str, min: i64, max: i64, expected: &str) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        let as_int = match v {
            Value::Number(n) => n
                .as_i64()
                .map(|i| i as i128)
                .or_else(|| n.as_u64().map(|u| u as i128))
                .or_else(|| n.as_f64().filter(|x| x.fract() == 0.0 && x.abs() < 1e18).map(|x| x as i128)),
            _ => None,
        };
        match as_int {
            Some(i) if i >= min as i128 && i <= max as i128 => Ok(Some(i as i64)),
            Some(i) => Err(ApiError::invalid(k, format!("'{k}' must be {expected}, got {i}"))),
            None => Err(type_error(k, expected, v)),
        }
    }

    fn uint(&self, k: &str, min: u64, max: u64, expected: &str) -> Result<Option<u64>, ApiError> {
        Ok(self.int(k, min as i64, max.min(i64::MAX as u64) as i64, expected)?.map(|i| i as u64))
    }
}

/// Positions a prompt of `prompt_len` tokens needs for `max_tokens` new ones: the last new token
/// is never fed back, so `prompt + max_tokens - 1` (and at least the prompt).
pub fn check_context(index: usize, prompt_len: usize, max_tokens: usize, context: usize) -> Result<(), ApiError> {
    if prompt_len > context {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "This model's maximum context length is {context} tokens, however prompt {index} has {prompt_len} tokens. Please reduce the length of the prompt."
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let needed = prompt_len + max_tokens.saturating_sub(1);
    if needed > context {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "This model's maximum context length is {context} tokens, however you requested {} tokens ({prompt_len} in prompt {index}, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                prompt_len + max_tokens
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits { context: 256, vocab: 1000 };

    fn err(body: &str) -> ApiError {
        match parse_completion(body.as_bytes(), LIM) {
            Ok(r) => panic!("{body} was accepted: {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn every_prompt_shape_parses() {
        let r = parse_completion(br#"{"prompt": "hi"}"#, LIM).expect("string");
        assert_eq!(r.prompts, vec![PromptInput::Text("hi".into())]);
        let r = parse_completion(br#"{"prompt": ["a", "b"]}"#, LIM).expect("strings");
        assert_eq!(r.prompts.len(), 2);
        let r = parse_completion(br#"{"prompt": [2, 10, 11]}"#, LIM).expect("ids");
        assert_eq!(r.prompts, vec![PromptInput::Ids(vec![2, 10, 11])]);
        let r = parse_completion(br#"{"prompt": [[2, 10], [2]]}"#, LIM).expect("id lists");
        assert_eq!(r.prompts, vec![PromptInput::Ids(vec![2, 10]), PromptInput::Ids(vec![2])]);
        assert_eq!(r.params.max_new_tokens, 16);
        assert_eq!(r.mode, Mode::Sample { candidates: 1 });
    }

    #[test]
    fn fields_map_onto_sampling_params() {
        let r = parse_completion(
            br#"{"prompt": "x", "max_tokens": 7, "min_tokens": 2.0, "temperature": 0, "top_k": -1, "stop": "\n",
                "logprobs": 3, "echo": true, "seed": -1, "presence_penalty": 0.5, "stream": true,
                "stream_options": {"include_usage": true}, "user": "u", "logit_bias": {}, "model": "m", "foo": 1}"#,
            LIM,
        )
        .expect("valid");
        assert_eq!(r.params.max_new_tokens, 7);
        assert_eq!(r.params.min_new_tokens, 2);
        assert_eq!(r.params.top_k, None);
        assert_eq!(r.params.stop, vec!["\n".to_string()]);
        assert_eq!(r.params.logprobs, Some(3));
        assert_eq!(r.params.seed, Some(u64::MAX));
        assert_eq!(r.params.presence_penalty, 0.5);
        assert_eq!(r.mode, Mode::Greedy);
        assert!(r.echo_and_stream());
        assert!(r.include_usage);
        assert_eq!(r.model.as_deref(), Some("m"));
    }

    impl CompletionRequest {
        fn echo_and_stream(&self) -> bool {
            self.params.echo && self.stream
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (r#"{"max_tokens": 5}"#, Some("prompt")),
            (r#"{"prompt": []}"#, Some("prompt")),
            (r#"{"prompt": [[]]}"#, Some("prompt")),
            (r#"{"prompt": [1, "a"]}"#, Some("prompt")),
            (r#"{"prompt": [5000]}"#, Some("prompt")),
            (r#"{"prompt": {"a": 1}}"#, Some("prompt")),
            (r#"{"prompt": "x", "max_tokens": -1}"#, Some("max_tokens")),
            (r#"{"prompt": "x", "max_tokens": "16"}"#, Some("max_tokens")),
            (r#"{"prompt": "x", "max_tokens": 1.5}"#, Some("max_tokens")),
            (r#"{"prompt": "x", "max_tokens": 100000}"#, Some("max_tokens")),
            (r#"{"prompt": "x", "temperature": -0.1}"#, Some("temperature")),
            (r#"{"prompt": "x", "top_p": 0}"#, Some("top_p")),
            (r#"{"prompt": "x", "top_p": 1.5}"#, Some("top_p")),
            (r#"{"prompt": "x", "top_k": -2}"#, Some("top_k")),
            (r#"{"prompt": "x", "n": 0}"#, Some("n")),
            (r#"{"prompt": "x", "n": 3, "best_of": 2}"#, Some("best_of")),
            (r#"{"prompt": "x", "logprobs": 21}"#, Some("logprobs")),
            (r#"{"prompt": "x", "logprobs": true}"#, Some("logprobs")),
            (r#"{"prompt": "x", "echo": "yes"}"#, Some("echo")),
            (r#"{"prompt": "x", "stop": 5}"#, Some("stop")),
            (r#"{"prompt": "x", "stop": [""]}"#, Some("stop")),
            (r#"{"prompt": "x", "presence_penalty": 3}"#, Some("presence_penalty")),
            (r#"{"prompt": "x", "frequency_penalty": -2.5}"#, Some("frequency_penalty")),
            (r#"{"prompt": "x", "seed": "a"}"#, Some("seed")),
            (r#"{"prompt": "x", "stream": 1}"#, Some("stream")),
            (r#"{"prompt": "x", "stream_options": {"include_usage": true}}"#, Some("stream_options")),
            (r#"{"prompt": "x", "user": 3}"#, Some("user")),
            (r#"{"prompt": "x", "model": 3}"#, Some("model")),
            (r#"{"prompt": "x", "min_tokens": 20, "max_tokens": 10}"#, Some("min_tokens")),
            (r#"{"prompt": "x", "temperature": 0, "n": 2}"#, Some("n")),
            (r#"{"prompt": "x", "suffix": "end"}"#, Some("suffix")),
            (r#"{"prompt": "x", "logit_bias": {"50256": -100}}"#, Some("logit_bias")),
            (r#"{"prompt": "x", "early_stopping": 3}"#, Some("early_stopping")),
            ("not json", None),
            ("[1, 2]", None),
        ];
        for (body, param) in cases {
            let e = err(body);
            assert_eq!(e.status.as_u16(), 400, "{body}: {e}");
            assert_eq!(e.param.as_deref(), param, "{body}: {e}");
        }
    }

    #[test]
    fn context_check_counts_the_last_token_free() {
        assert!(check_context(0, 250, 7, 256).is_ok());
        assert_eq!(check_context(0, 250, 8, 256).expect_err("over").param.as_deref(), Some("max_tokens"));
        assert_eq!(check_context(1, 300, 0, 256).expect_err("long").param.as_deref(), Some("prompt"));
        assert!(check_context(0, 256, 0, 256).is_ok());
    }
}
