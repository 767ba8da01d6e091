//! Sliding-window perplexity of a long token sequence, the method of HF's perplexity guide
//! (`docs/source/en/perplexity.md`):
//!
//! ```text
//! for begin in range(0, seq_len, stride):
//!     end = min(begin + max_length, seq_len)
//!     trg_len = end - prev_end            # only tokens not scored by an earlier window
//!     labels[:, :-trg_len] = -100
//!     ...; prev_end = end; stop once end == seq_len
//! ```
//!
//! Each window is one forward over `ids[begin..end]`; the tokens at positions
//! `max(prev_end, begin + 1)..end` are scored, each with up to `max_length - 1` tokens of context.
//! With `stride < max_length` every token after the first is scored exactly once; with
//! `stride == max_length` (non-overlapping windows) the first token of each later window has no
//! context inside its window and is skipped, as in the guide. The guide
//! weights each window's mean loss by `num_valid - batch_size`, which is the true count only for
//! the first window; here the log-probabilities are summed token by token, so the total is exact.

use opt_model::{LogitsMode, OptModel};
use opt_tensor::Backend;

use crate::scorer::{score_row, LOGITS_BUDGET};
use crate::{EvalError, Result};

/// One window: the forward covers `begin..end`, tokens `first_target..end` are scored.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    pub first_target: usize,
    /// Tokens scored (`end - first_target`).
    pub n: usize,
    /// Negative log-likelihood of those tokens (nats).
    pub nll: f64,
}

/// The result over the whole sequence.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RollingScore {
    /// Sum of the negative log-likelihoods (nats).
    pub nll: f64,
    /// Tokens scored (every token but the first).
    pub tokens: usize,
    pub windows: Vec<Window>,
}

impl RollingScore {
    /// `exp(nll / tokens)`.
    pub fn token_perplexity(&self) -> f64 {
        (self.nll / self.tokens as f64).exp()
    }
}

/// The windows of the guide's loop as `(begin, end, first_target)`. Needs `1 <= stride <=
/// max_length` (a larger stride would skip tokens) and at least two tokens.
pub fn plan_windows(seq_len: usize, max_length: usize, stride: usize) -> Result<Vec<(usize, usize, usize)>> {
    if stride == 0 || stride > max_length {
        return Err(EvalError::Input(format!(
            "stride {stride} must be between 1 and the model's window of {max_length} tokens"
        )));
    }
    if seq_len < 2 {
        return Err(EvalError::Input(format!("a text of {seq_len} token(s) has nothing to score")));
    }
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < seq_len {
        let end = (begin + max_length).min(seq_len);
        out.push((begin, end, prev_end.max(begin + 1)));
        prev_end = end;
        if end == seq_len {
            break;
        }
        begin += stride;
    }
    Ok(out)
}

/// Sliding-window negative log-likelihood of `ids` (which should start with `</s>`) with the
/// model's full window. Up to `batch_size` windows run in one forward (right-padded; only the
/// last window can be shorter). `progress` gets the number of windows finished.
pub fn rolling_nll<B: Backend>(
    model: &OptModel<B>,
    ids: &[u32],
    stride: usize,
    batch_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<RollingScore> {
    let max_len = model.cfg.max_position_embeddings;
    let v = model.cfg.vocab_size;
    let plan = plan_windows(ids.len(), max_len, stride)?;
    let per_batch = batch_size.max(1).min((LOGITS_BUDGET / (max_len * v).max(1)).max(1));
    let be = &model.backend;
    let mut windows = Vec::with_capacity(plan.len());
    for chunk in plan.chunks(per_batch) {
        let t = chunk.iter().map(|&(b, e, _)| e - b).max().unwrap_or(0);
        let n = chunk.len();
        let mut x = vec![model.cfg.pad_token_id; n * t];
        let mut mask = vec![0u8; n * t];
        for (r, &(b, e, _)) in chunk.iter().enumerate() {
            x[r * t..r * t + e - b].copy_from_slice(&ids[b..e]);
            mask[r * t..r * t + e - b].fill(1);
        }
        let logits = model.forward(&x, n, Some(&mask), None, LogitsMode::All)?;
        for (r, &(begin, end, first)) in chunk.iter().enumerate() {
            let mut nll = 0f64;
            for (pos, &target) in ids.iter().enumerate().take(end).skip(first) {
                // Logits at window position p predict the token at p + 1.
                let (lp, _) = score_row(be, &logits, r * t + (pos - 1 - begin), v, target)?;
                nll -= lp;
            }
            windows.push(Window { begin, end, first_target: first, n: end - first, nll });
        }
        progress(windows.len(), plan.len());
    }
    let tokens = windows.iter().map(|w| w.n).sum();
    let nll = windows.iter().map(|w| w.nll).sum();
    Ok(RollingScore { nll, tokens, windows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_guide() {
        // seq 10, window 4, stride 2: [0,4) scores 1..4, [2,6) scores 4..6, [4,8) 6..8, [6,10) 8..10.
        let p = plan_windows(10, 4, 2).unwrap();
        assert_eq!(p, vec![(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]);
        // Non-overlapping windows (stride = window): the first token of each later window has
        // no context inside its window and is not scored, as in the guide.
        let p = plan_windows(10, 4, 4).unwrap();
        assert_eq!(p, vec![(0, 4, 1), (4, 8, 5), (8, 10, 9)]);
        assert_eq!(plan_windows(3, 4, 2).unwrap(), vec![(0, 3, 1)]);
        assert!(plan_windows(10, 4, 5).is_err());
        assert!(plan_windows(10, 4, 0).is_err());
        assert!(plan_windows(1, 4, 2).is_err());
    }
}
