//! Scoring a token sequence: the log-probability of every token given the ones before it,
//! with top-K alternatives — what `opt-rs score`, evaluation and the server's `echo` share.

use opt_tensor::{Backend, Buffer, DType};

use crate::model::{LogitsMode, OptModel};
use crate::{ModelError, Result};

/// Per-position scores of one sequence. Position 0 has no score (nothing precedes it).
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceScore {
    pub tokens: Vec<u32>,
    /// `None` at position 0, then `log p(tokens[i] | tokens[..i])`.
    pub token_logprobs: Vec<Option<f32>>,
    /// Top-K `(id, logprob)` alternatives at each scored position, best first.
    pub top_logprobs: Vec<Option<Vec<(u32, f32)>>>,
}

impl SequenceScore {
    /// `exp(-mean log p)` over the scored positions (NaN with fewer than two tokens).
    pub fn perplexity(&self) -> f64 {
        let lps: Vec<f64> = self.token_logprobs.iter().flatten().map(|&x| x as f64).collect();
        if lps.is_empty() {
            return f64::NAN;
        }
        (-lps.iter().sum::<f64>() / lps.len() as f64).exp()
    }
}

/// Score `tokens` (one sequence, at most the model's context) with `top_k` alternatives.
pub fn score_sequence<B: Backend>(model: &OptModel<B>, tokens: &[u32], top_k: usize) -> Result<SequenceScore> {
    if tokens.is_empty() {
        return Err(ModelError::Input("nothing to score: the token sequence is empty".into()));
    }
    let v = model.cfg.vocab_size;
    let t = tokens.len();
    let logits = model.forward(tokens, 1, None, None, LogitsMode::All)?;
    let be = &model.backend;
    let mut lsm = be.zeros(DType::F32, t * v)?;
    be.log_softmax(lsm.vm(), logits.v(), v)?;
    let lsm = be.to_f32(lsm.v())?;
    let mut token_logprobs = vec![None];
    let mut top_logprobs = vec![None];
    for i in 1..t {
        let row = &lsm[(i - 1) * v..i * v];
        token_logprobs.push(Some(row[tokens[i] as usize]));
        top_logprobs.push(Some(top_k_of(row, top_k)));
    }
    Ok(SequenceScore { tokens: tokens.to_vec(), token_logprobs, top_logprobs })
}

/// The `k` largest entries of `row` as `(index, value)`, best first (ties: lower index first).
pub fn top_k_of(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &x) in row.iter().enumerate() {
        if best.len() == k && x <= best[k - 1].1 {
            continue;
        }
        let pos = best.partition_point(|&(_, y)| y >= x);
        best.insert(pos, (i as u32, x));
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let row = [0.1, 0.5, 0.5, -1.0, 0.9];
        assert_eq!(top_k_of(&row, 3), vec![(4, 0.9), (1, 0.5), (2, 0.5)]);
        assert_eq!(top_k_of(&row, 0), vec![]);
        assert_eq!(top_k_of(&row, 10).len(), 5);
    }
}
