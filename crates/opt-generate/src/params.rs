//! Request types: what to generate from ([`Prompt`]) and how ([`SamplingParams`]).
//!
//! Field names follow OpenAI's completions API where one exists (`max_tokens`, `stop`, `n`,
//! `best_of`, `logprobs`, `echo`, `seed`, `presence_penalty`, ...) and HF `generate()` otherwise
//! (`top_k`, `typical_p`, `repetition_penalty`, `no_repeat_ngram_size`, `num_beams`,
//! `length_penalty`, `early_stopping`, `min_new_tokens`), so a server can deserialise either
//! style of request straight into [`SamplingParams`].

use serde::{Deserialize, Deserializer, Serialize};

use crate::{GenerateError, Result};

/// One prompt: text (tokenized with `</s>` prepended, as HF's OPT tokenizer does) or token ids
/// (used as given). An empty prompt of either kind starts from `</s>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// Several prompts decoded together (one left-padded batch) with the same parameters.
///
/// `prompt` accepts every shape OpenAI's completions API does: a string, a list of strings, a
/// list of token ids, or a list of lists of ids.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateRequest {
    #[serde(rename = "prompt", deserialize_with = "de_prompts")]
    pub prompts: Vec<Prompt>,
    #[serde(flatten)]
    pub params: SamplingParams,
}

impl GenerateRequest {
    pub fn new(prompts: Vec<Prompt>, params: SamplingParams) -> Self {
        GenerateRequest { prompts, params }
    }
}

fn de_prompts<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<Prompt>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        // Tried in order: a bare string or id list is one prompt; otherwise a list of prompts.
        One(Prompt),
        Many(Vec<Prompt>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

/// HF's `early_stopping` for beam search: `true` stops a prompt as soon as `num_beams` finished
/// hypotheses exist; `false` stops when the best running beam, scored at its current length,
/// cannot beat the worst finished one; `never` scores it at the longest possible length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EarlyStopping {
    #[default]
    False,
    True,
    Never,
}

impl Serialize for EarlyStopping {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            EarlyStopping::False => s.serialize_bool(false),
            EarlyStopping::True => s.serialize_bool(true),
            EarlyStopping::Never => s.serialize_str("never"),
        }
    }
}

impl<'de> Deserialize<'de> for EarlyStopping {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            B(bool),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::B(b) => Ok(if b { EarlyStopping::True } else { EarlyStopping::False }),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for EarlyStopping {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(EarlyStopping::True),
            "false" | "0" | "no" => Ok(EarlyStopping::False),
            "never" => Ok(EarlyStopping::Never),
            other => Err(format!("early_stopping must be true, false or never, got '{other}'")),
        }
    }
}

/// `stop` is a string or a list of strings.
fn de_stop<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        None(()),
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::None(()) => Vec::new(),
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// How to decode. Every field has a default, so `{}` is a valid request: 16 new tokens sampled at
/// temperature 1 (OpenAI's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// New tokens per sequence at most. Generation also stops at the model's context length
    /// (finish reason `length`).
    #[serde(alias = "max_tokens")]
    pub max_new_tokens: usize,
    /// EOS is suppressed until this many new tokens exist (HF `min_new_tokens`).
    #[serde(alias = "min_tokens")]
    pub min_new_tokens: usize,
    /// Argmax decoding (no sampling). `temperature: 0` means the same.
    pub greedy: bool,
    /// Sampling temperature (> 0; 0 = greedy). Unset = 1.
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens (0 or unset = off).
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set with probability ≥ top_p, in (0, 1].
    pub top_p: Option<f32>,
    /// Locally typical sampling mass, in (0, 1] (HF `typical_p`).
    pub typical_p: Option<f32>,
    /// HF repetition penalty (> 0; 1 = off) over prompt and generated tokens.
    pub repetition_penalty: Option<f32>,
    /// OpenAI presence penalty in [-2, 2], over generated tokens.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in [-2, 2], over generated tokens.
    pub frequency_penalty: f32,
    /// Ban any n-gram of this size from occurring twice (prompt included; 0 = off).
    pub no_repeat_ngram_size: usize,
    /// Stop strings (may span tokens); the matched string is not returned.
    #[serde(deserialize_with = "de_stop")]
    pub stop: Vec<String>,
    /// Sequences returned per prompt.
    pub n: usize,
    /// Candidates per prompt, of which the `n` best are returned. With sampling: `best_of`
    /// samples ranked by mean log-probability per token (OpenAI). Without sampling: beam search
    /// with `best_of` beams (metaseq's API).
    pub best_of: Option<usize>,
    /// Beam search with this many beams (1 = off).
    pub num_beams: usize,
    /// Beam score = sum of log-probs / (generated length ** length_penalty) (HF).
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// Return each token's log-probability and this many top alternatives.
    pub logprobs: Option<usize>,
    /// Return the prompt too (text and per-token log-probs).
    pub echo: bool,
    /// RNG seed for sampling; the same seed gives the same output. Unset = random (reported).
    pub seed: Option<u64>,
    /// Left-truncate prompts that do not fit the context instead of failing.
    pub truncate: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 16,
            min_new_tokens: 0,
            greedy: false,
            temperature: None,
            top_k: None,
            top_p: None,
            typical_p: None,
            repetition_penalty: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            no_repeat_ngram_size: 0,
            stop: Vec::new(),
            n: 1,
            best_of: None,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            logprobs: None,
            echo: false,
            seed: None,
            truncate: false,
        }
    }
}

/// How a validated request decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Argmax (one sequence per prompt).
    Greedy,
    /// Sampling `candidates` sequences per prompt, returning the best `n`.
    Sample { candidates: usize },
    /// Beam search with this many beams.
    Beam { beams: usize },
}

impl SamplingParams {
    /// Greedy decoding with `max_new_tokens` new tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingParams { greedy: true, max_new_tokens, ..Default::default() }
    }

    fn sampling_requested(&self) -> bool {
        !self.greedy && self.temperature != Some(0.0)
    }

    /// Check every value and the combinations; returns the decoding mode. Errors name the option.
    pub fn validate(&self) -> Result<Mode> {
        fn opt(option: &'static str, detail: impl Into<String>) -> GenerateError {
            GenerateError::option(option, detail)
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(opt(
                "min_new_tokens",
                format!("{} exceeds max_new_tokens ({})", self.min_new_tokens, self.max_new_tokens),
            ));
        }
        if let Some(t) = self.temperature {
            if !t.is_finite() || t < 0.0 {
                return Err(opt("temperature", format!("must be a finite number ≥ 0, got {t}")));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(opt("top_p", format!("must be in (0, 1], got {p}")));
            }
        }
        if let Some(p) = self.typical_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(opt("typical_p", format!("must be in (0, 1], got {p}")));
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !r.is_finite() || r <= 0.0 {
                return Err(opt("repetition_penalty", format!("must be a finite number > 0, got {r}")));
            }
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return Err(opt(name, format!("must be in [-2, 2], got {v}")));
            }
        }
        if !self.length_penalty.is_finite() {
            return Err(opt("length_penalty", format!("must be finite, got {}", self.length_penalty)));
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return Err(opt("stop", format!("stop string {i} is empty")));
        }
        if self.n == 0 {
            return Err(opt("n", "must be at least 1"));
        }
        if self.num_beams == 0 {
            return Err(opt("num_beams", "must be at least 1 (1 = no beam search)"));
        }
        if let Some(b) = self.best_of {
            if b < self.n {
                return Err(opt("best_of", format!("must be ≥ n ({}), got {b}", self.n)));
            }
        }
        let sampling = self.sampling_requested();
        if self.num_beams > 1 {
            if let Some(b) = self.best_of {
                if b != self.num_beams {
                    return Err(opt(
                        "best_of",
                        format!("conflicts with num_beams ({}); give one of them", self.num_beams),
                    ));
                }
            }
            if self.n > self.num_beams {
                return Err(opt(
                    "n",
                    format!(
                        "beam search returns at most num_beams ({}) sequences, asked for {}",
                        self.num_beams, self.n
                    ),
                ));
            }
            if sampling
                && (self.temperature.is_some()
                    || self.top_k.is_some()
                    || self.top_p.is_some()
                    || self.typical_p.is_some())
            {
                return Err(opt(
                    "num_beams",
                    "beam search is deterministic; temperature/top_k/top_p/typical_p do not apply (drop them or use --greedy)",
                ));
            }
            return Ok(Mode::Beam { beams: self.num_beams });
        }
        if sampling {
            return Ok(Mode::Sample { candidates: self.best_of.unwrap_or(self.n) });
        }
        match self.best_of {
            // metaseq: best_of without sampling is the beam size.
            Some(b) if b > 1 => Ok(Mode::Beam { beams: b }),
            _ if self.n > 1 => Err(opt(
                "n",
                format!(
                    "greedy decoding yields one sequence per prompt, asked for {} (sample, or use num_beams ≥ n)",
                    self.n
                ),
            )),
            _ => Ok(Mode::Greedy),
        }
    }

    /// Options that are set but do nothing in `mode`, for a warning.
    pub fn ignored_options(&self, mode: Mode) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !matches!(mode, Mode::Sample { .. }) {
            if self.temperature.is_some_and(|t| t != 0.0 && t != 1.0) {
                out.push("temperature");
            }
            if self.top_k.is_some_and(|k| k > 0) {
                out.push("top_k");
            }
            if self.top_p.is_some_and(|p| p < 1.0) {
                out.push("top_p");
            }
            if self.typical_p.is_some_and(|p| p < 1.0) {
                out.push("typical_p");
            }
            if self.seed.is_some() {
                out.push("seed");
            }
        }
        if !matches!(mode, Mode::Beam { .. }) {
            if self.length_penalty != 1.0 {
                out.push("length_penalty");
            }
            if self.early_stopping != EarlyStopping::False {
                out.push("early_stopping");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_style_request_deserialises() {
        let r: GenerateRequest = serde_json::from_str(
            r#"{"prompt": "Hello", "max_tokens": 5, "stop": "\n", "temperature": 0.5, "logprobs": 2, "echo": true, "model": "x"}"#,
        )
        .expect("parse");
        assert_eq!(r.prompts, vec![Prompt::Text("Hello".into())]);
        assert_eq!(r.params.max_new_tokens, 5);
        assert_eq!(r.params.stop, vec!["\n".to_string()]);
        assert_eq!(r.params.temperature, Some(0.5));
        assert_eq!(r.params.logprobs, Some(2));
        assert!(r.params.echo);

        let r: GenerateRequest = serde_json::from_str(r#"{"prompt": [2, 100, 7]}"#).expect("ids");
        assert_eq!(r.prompts, vec![Prompt::Ids(vec![2, 100, 7])]);
        let r: GenerateRequest =
            serde_json::from_str(r#"{"prompt": [[2, 100], [2]], "early_stopping": "never"}"#).expect("many ids");
        assert_eq!(r.prompts, vec![Prompt::Ids(vec![2, 100]), Prompt::Ids(vec![2])]);
        assert_eq!(r.params.early_stopping, EarlyStopping::Never);
        let r: GenerateRequest =
            serde_json::from_str(r#"{"prompt": ["a", "b"], "stop": ["x", "yz"], "early_stopping": true}"#)
                .expect("texts");
        assert_eq!(r.prompts.len(), 2);
        assert_eq!(r.params.stop.len(), 2);
        assert_eq!(r.params.early_stopping, EarlyStopping::True);
    }

    #[test]
    fn modes() {
        let p = SamplingParams::default();
        assert_eq!(p.validate().expect("ok"), Mode::Sample { candidates: 1 });
        let p = SamplingParams { temperature: Some(0.0), ..Default::default() };
        assert_eq!(p.validate().expect("ok"), Mode::Greedy);
        let p = SamplingParams { greedy: true, best_of: Some(3), n: 2, ..Default::default() };
        assert_eq!(p.validate().expect("ok"), Mode::Beam { beams: 3 });
        let p = SamplingParams { n: 2, best_of: Some(5), ..Default::default() };
        assert_eq!(p.validate().expect("ok"), Mode::Sample { candidates: 5 });
        let p = SamplingParams { num_beams: 4, greedy: true, ..Default::default() };
        assert_eq!(p.validate().expect("ok"), Mode::Beam { beams: 4 });
    }
}
