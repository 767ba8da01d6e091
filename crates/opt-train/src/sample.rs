//! A small sampler for the continuations shown at the end of a run: greedy, or temperature
//! with top-k, over the KV cache. Deliberately minimal (the generation crate is the full one).

use opt_model::{KvCache, LogitsMode, OptModel};
use opt_tensor::{rng, Backend};
use opt_tokenizer::OptTokenizer;

use crate::Result;

#[derive(Clone, Copy, Debug)]
pub struct SampleParams {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// Candidates kept before sampling (0 = all).
    pub top_k: usize,
    /// Seed of the draws (counter-based: draw `i` uses `(seed, i)`).
    pub seed: u64,
}

/// Continue `prompt` (tokenized with OPT's leading `</s>`); stops at `</s>`, at
/// `max_new_tokens`, or at the model's context. Returns the new text only.
pub fn continue_text<B: Backend>(
    model: &OptModel<B>,
    tok: &OptTokenizer,
    prompt: &str,
    p: &SampleParams,
) -> Result<String> {
    let ids = tok.encode(prompt, true)?;
    let max_new = p.max_new_tokens.min(model.cfg.max_position_embeddings.saturating_sub(ids.len()));
    if max_new == 0 {
        return Ok(String::new());
    }
    let mut cache = KvCache::for_model(model, 1, ids.len() + max_new)?;
    decode(tok, &ids, max_new, model.cfg.vocab_size, p, |x| {
        let l = model.forward(x, 1, None, Some(&mut cache), LogitsMode::Last)?;
        Ok(model.backend.to_f32(opt_tensor::Buffer::v(&l))?)
    })
}

/// [`continue_text`] with the model's forward supplied (`forward(model, new ids, cache)` →
/// last-position logits), for a model that needs more than `forward` (a streamed one).
pub fn continue_text_with<B: Backend>(
    model: &mut OptModel<B>,
    tok: &OptTokenizer,
    prompt: &str,
    p: &SampleParams,
    mut forward: impl FnMut(&mut OptModel<B>, &[u32], &mut KvCache<B>) -> Result<B::Buf>,
) -> Result<String> {
    let ids = tok.encode(prompt, true)?;
    let max_new = p.max_new_tokens.min(model.cfg.max_position_embeddings.saturating_sub(ids.len()));
    if max_new == 0 {
        return Ok(String::new());
    }
    let mut cache = KvCache::for_model(model, 1, ids.len() + max_new)?;
    let v = model.cfg.vocab_size;
    decode(tok, &ids, max_new, v, p, |x| {
        let l = forward(model, x, &mut cache)?;
        Ok(model.backend.to_f32(opt_tensor::Buffer::v(&l))?)
    })
}

/// The sampling loop over `step(new ids) → last-position logits`.
fn decode(
    tok: &OptTokenizer,
    ids: &[u32],
    max_new: usize,
    v: usize,
    p: &SampleParams,
    mut step: impl FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<String> {
    let mut logits = step(ids)?;
    let mut out = Vec::with_capacity(max_new);
    for i in 0..max_new {
        let next = pick(&logits[..v], p, i as u64);
        if next == tok.eos_id() {
            break;
        }
        out.push(next);
        if i + 1 == max_new {
            break;
        }
        logits = step(&[next])?;
    }
    Ok(tok.decode(&out, true)?)
}

/// Choose a token from one row of logits.
fn pick(row: &[f32], p: &SampleParams, draw: u64) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(row);
    }
    let k = if p.top_k == 0 { row.len() } else { p.top_k };
    let top = opt_model::score::top_k_of(row, k);
    let Some(&(_, best)) = top.first() else { return 0 };
    let weights: Vec<f64> = top.iter().map(|&(_, x)| (((x - best) / p.temperature) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng::uniform(p.seed, draw) as f64 * total;
    for (&(id, _), w) in top.iter().zip(&weights) {
        if u < *w {
            return id;
        }
        u -= w;
    }
    top[top.len() - 1].0
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top1_agree_and_top_k_restricts() {
        let row = [0.1f32, 3.0, 2.9, -1.0];
        let greedy = SampleParams { max_new_tokens: 1, temperature: 0.0, top_k: 0, seed: 1 };
        assert_eq!(pick(&row, &greedy, 0), 1);
        let top1 = SampleParams { temperature: 1.0, top_k: 1, ..greedy };
        for d in 0..20 {
            assert_eq!(pick(&row, &top1, d), 1);
        }
        let top2 = SampleParams { temperature: 1.0, top_k: 2, ..greedy };
        let picks: Vec<u32> = (0..200).map(|d| pick(&row, &top2, d)).collect();
        assert!(picks.iter().all(|&x| x == 1 || x == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
    }
}
