//! Logits processors: each rewrites one row of scores `[V]` in place, exactly as the HF
//! transformers 5.17 class named in its doc does (same comparisons, same tie rules, f32
//! arithmetic), so the tokens kept and their renormalised probabilities agree with HF's.
//! Removed tokens get `-inf` (HF's `filter_value`).
//!
//! [`Processors`] chains them in HF's order for `generate()`: repetition penalty, no-repeat
//! n-gram, min-new-tokens, then (our addition, where vLLM puts them: before temperature) the
//! OpenAI presence/frequency penalties, then the sampling warpers temperature, top-k, top-p,
//! typical-p.

use std::collections::HashMap;

use crate::params::SamplingParams;

/// `TemperatureLogitsWarper`: `scores / t`.
pub fn temperature(scores: &mut [f32], t: f32) {
    for x in scores.iter_mut() {
        *x /= t;
    }
}

/// Descending order that puts NaN last, for selection and sorting.
fn desc(a: &f32, b: &f32) -> std::cmp::Ordering {
    b.partial_cmp(a).unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
}

/// `TopKLogitsWarper(top_k, min_tokens_to_keep=1)`: remove every score strictly below the k-th
/// largest (so all tokens tied with the k-th are kept). `k = 0` is a no-op, as in HF.
pub fn top_k(scores: &mut [f32], k: usize) {
    if k == 0 || k >= scores.len() {
        return;
    }
    let mut tmp = scores.to_vec();
    let (_, kth, _) = tmp.select_nth_unstable_by(k - 1, desc);
    let kth = *kth;
    for x in scores.iter_mut() {
        if *x < kth {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Softmax of `xs` (f32 in, f32 out): `exp(x - max) / Σ`, the sum accumulated in f64.
pub fn softmax(xs: &[f32]) -> Vec<f32> {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return vec![0.0; xs.len()];
    }
    let e: Vec<f32> = xs.iter().map(|&x| (x - m).exp()).collect();
    let s: f64 = e.iter().map(|&x| x as f64).sum();
    let inv = (1.0 / s) as f32;
    e.iter().map(|&x| x * inv).collect()
}

/// Log-softmax in f32 the way torch writes it, `(x - max) - log Σ exp(x - max)`, with the sum
/// accumulated in f64.
pub fn log_softmax(xs: &[f32]) -> Vec<f32> {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return vec![f32::NEG_INFINITY; xs.len()];
    }
    let s: f64 = xs.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let ls = s.ln() as f32;
    xs.iter().map(|&x| (x - m) - ls).collect()
}

/// Running sums in f64, each rounded to f32 — torch's CPU `cumsum` for float tensors.
fn cumsum(xs: &[f32]) -> Vec<f32> {
    let mut acc = 0f64;
    xs.iter()
        .map(|&x| {
            acc += x as f64;
            acc as f32
        })
        .collect()
}

/// Indices that sort `key` ascending (stable; NaN last).
fn argsort_ascending(key: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..key.len()).collect();
    idx.sort_by(|&a, &b| key[a].partial_cmp(&key[b]).unwrap_or_else(|| key[a].is_nan().cmp(&key[b].is_nan())));
    idx
}

/// `TopPLogitsWarper(top_p, min_tokens_to_keep=1)`: sort ascending, remove the tokens whose
/// cumulative probability is ≤ 1 - top_p, always keep the most likely one. `top_p ≥ 1` is a
/// no-op (HF does not add the warper).
pub fn top_p(scores: &mut [f32], p: f32) {
    if p >= 1.0 || scores.is_empty() {
        return;
    }
    let order = argsort_ascending(scores);
    let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
    let cum = cumsum(&softmax(&sorted));
    let threshold = 1.0 - p;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        if rank < last && cum[rank] <= threshold {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// `TypicalLogitsWarper(mass, min_tokens_to_keep=1)`: keep the tokens whose surprisal is closest
/// to the entropy until their probability reaches `mass`. `mass ≥ 1` is a no-op.
pub fn typical_p(scores: &mut [f32], mass: f32) {
    if mass >= 1.0 || scores.is_empty() {
        return;
    }
    let normalized = log_softmax(scores);
    // ent = -nansum(normalized * p): removed tokens give -inf * 0 = NaN, which nansum skips.
    let mut ent = 0f32;
    for &l in &normalized {
        let t = l * l.exp();
        if !t.is_nan() {
            ent += t;
        }
    }
    let ent = -ent;
    let shifted: Vec<f32> = normalized.iter().map(|&l| ((-l) - ent).abs()).collect();
    let order = argsort_ascending(&shifted);
    let sorted_logits: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
    let cum = cumsum(&softmax(&sorted_logits));
    let last_ind = cum.iter().filter(|&&c| c < mass).count().min(order.len() - 1);
    let cutoff = shifted[order[last_ind]];
    for (rank, &i) in order.iter().enumerate() {
        // min_tokens_to_keep = 1: the first sorted token always stays.
        if rank >= 1 && shifted[i] > cutoff {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// `RepetitionPenaltyLogitsProcessor(penalty)`: for every distinct token in `history`, a
/// negative score is multiplied by `penalty`, a non-negative one divided by it.
pub fn repetition_penalty(scores: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = vec![false; scores.len()];
    for &t in history {
        let t = t as usize;
        if t < scores.len() && !seen[t] {
            seen[t] = true;
            let s = scores[t];
            scores[t] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// `NoRepeatNGramLogitsProcessor(n)`: ban every token that would complete an n-gram already in
/// `history` (the prompt included).
pub fn no_repeat_ngram(scores: &mut [f32], history: &[u32], n: usize) {
    let len = history.len();
    if n == 0 || len < n {
        return;
    }
    let prefix = &history[len + 1 - n..];
    for w in history.windows(n) {
        if &w[..n - 1] == prefix {
            if let Some(s) = scores.get_mut(w[n - 1] as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

/// `MinNewTokensLengthLogitsProcessor`: EOS gets `-inf` while fewer than `min_new` tokens exist.
pub fn min_new_tokens(scores: &mut [f32], generated: usize, min_new: usize, eos: u32) {
    if generated < min_new {
        if let Some(s) = scores.get_mut(eos as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// OpenAI's presence and frequency penalties: `score -= count * frequency + (count > 0) * presence`
/// over the generated tokens only.
pub fn presence_frequency(scores: &mut [f32], counts: &HashMap<u32, u32>, presence: f32, frequency: f32) {
    for (&t, &c) in counts {
        if let Some(s) = scores.get_mut(t as usize) {
            *s -= c as f32 * frequency + if c > 0 { presence } else { 0.0 };
        }
    }
}

/// What one sequence has seen, for the history-dependent processors.
pub struct SeqContext<'a> {
    /// Prompt (without padding) followed by the generated tokens.
    pub history: &'a [u32],
    /// Tokens generated so far.
    pub generated: usize,
    /// Occurrences of each generated token.
    pub counts: &'a HashMap<u32, u32>,
}

/// The processors a request enables, in HF's order.
#[derive(Clone, Debug, Default)]
pub struct Processors {
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: usize,
    pub min_new_tokens: usize,
    pub eos: Option<u32>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Sampling warpers (only when sampling).
    pub temperature: Option<f32>,
    pub top_k: usize,
    pub top_p: f32,
    pub typical_p: f32,
}

impl Processors {
    /// The processors of `params`; the warpers only when `sampling`.
    pub fn new(params: &SamplingParams, eos: Option<u32>, sampling: bool) -> Self {
        Processors {
            repetition_penalty: params.repetition_penalty.filter(|&r| r != 1.0),
            no_repeat_ngram_size: params.no_repeat_ngram_size,
            min_new_tokens: params.min_new_tokens,
            eos,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            temperature: if sampling { params.temperature.filter(|&t| t != 1.0) } else { None },
            top_k: if sampling { params.top_k.unwrap_or(0) } else { 0 },
            top_p: if sampling { params.top_p.unwrap_or(1.0) } else { 1.0 },
            typical_p: if sampling { params.typical_p.unwrap_or(1.0) } else { 1.0 },
        }
    }

    /// True when [`Self::apply`] would change nothing (greedy can then take the raw argmax).
    pub fn is_identity(&self) -> bool {
        self.repetition_penalty.is_none()
            && self.no_repeat_ngram_size == 0
            && (self.min_new_tokens == 0 || self.eos.is_none())
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.temperature.is_none()
            && self.top_k == 0
            && self.top_p >= 1.0
            && self.typical_p >= 1.0
    }

    /// Apply every enabled processor to one row of scores (logits, or log-probs in beam search).
    pub fn apply(&self, scores: &mut [f32], ctx: &SeqContext<'_>) {
        if let Some(r) = self.repetition_penalty {
            repetition_penalty(scores, ctx.history, r);
        }
        if self.no_repeat_ngram_size > 0 {
            no_repeat_ngram(scores, ctx.history, self.no_repeat_ngram_size);
        }
        if let Some(eos) = self.eos {
            min_new_tokens(scores, ctx.generated, self.min_new_tokens, eos);
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            presence_frequency(scores, ctx.counts, self.presence_penalty, self.frequency_penalty);
        }
        if let Some(t) = self.temperature {
            temperature(scores, t);
        }
        top_k(scores, self.top_k);
        top_p(scores, self.top_p);
        typical_p(scores, self.typical_p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_keeps_ties_at_the_boundary() {
        let mut s = vec![1.0, 3.0, 2.0, 2.0, 0.5];
        top_k(&mut s, 2);
        assert_eq!(s, vec![f32::NEG_INFINITY, 3.0, 2.0, 2.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn top_p_keeps_at_least_the_best_token() {
        let mut s = vec![0.0, 10.0, 0.0];
        top_p(&mut s, 0.01);
        assert_eq!(s, vec![f32::NEG_INFINITY, 10.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn ngram_bans_the_completion_of_a_seen_trigram() {
        let mut s = vec![0.0; 10];
        // history ... 4 5 6 ... 4 5 → 6 is banned for n = 3
        no_repeat_ngram(&mut s, &[1, 4, 5, 6, 2, 4, 5], 3);
        assert_eq!(s[6], f32::NEG_INFINITY);
        assert_eq!(s.iter().filter(|x| x.is_infinite()).count(), 1);
    }

    #[test]
    fn presence_and_frequency_follow_openai() {
        let mut s = vec![1.0; 4];
        let counts = HashMap::from([(1u32, 3u32), (2, 1)]);
        presence_frequency(&mut s, &counts, 0.5, 0.25);
        assert_eq!(s, vec![1.0, 1.0 - 0.75 - 0.5, 1.0 - 0.25 - 0.5, 1.0]);
    }
}
