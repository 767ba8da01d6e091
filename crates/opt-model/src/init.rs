//! metaseq initialisation: every weight matrix ~ N(0, std) (std 0.006 in the OPT runs),
//! biases zero, LayerNorm weight 1 and bias 0; the residual output projections (`out_proj`
//! and `fc2`) scaled by 1/sqrt(2·layers). Draws come from the counter-based RNG, so the same
//! seed gives the same model on every backend and thread count.

use opt_tensor::rng;
use rayon::prelude::*;

use crate::config::OptConfig;
use crate::params::ParamLayout;

/// Fill `params` (f32, laid out by `layout`) with metaseq's initialisation.
pub fn metaseq_init(cfg: &OptConfig, layout: &ParamLayout, params: &mut [f32], std: f32, seed: u64) {
    let resid_scale = 1.0 / ((2 * cfg.num_hidden_layers) as f32).sqrt();
    for (i, spec) in layout.specs.iter().enumerate() {
        let dst = &mut params[spec.offset..spec.offset + spec.numel()];
        let name = spec.name.as_str();
        if name.ends_with("layer_norm.weight") {
            dst.fill(1.0);
        } else if name.ends_with(".bias") {
            dst.fill(0.0);
        } else {
            let s =
                if name.ends_with("out_proj.weight") || name.ends_with("fc2.weight") { std * resid_scale } else { std };
            let stream = rng::derive(seed, i as u64);
            // Each draw is a pure function of (stream, index): parallel and still reproducible.
            dst.par_chunks_mut(1 << 14).enumerate().for_each(|(c, chunk)| {
                for (j, x) in chunk.iter_mut().enumerate() {
                    *x = rng::normal(stream, (c * (1 << 14) + j) as u64) * s;
                }
            });
        }
    }
    // The padding token's embedding row is zero, as nn.Embedding(padding_idx=1) leaves it.
    let dp = cfg.word_embed_proj_dim;
    let pad = cfg.pad_token_id as usize;
    params[layout.wte + pad * dp..layout.wte + (pad + 1) * dp].fill(0.0);
}

/// metaseq's initialisation of elements `[a, b)` of tensor-parallel slice `tp_rank` of `tp`
/// (the flat buffer of `ParamLayout::sharded(cfg, tp)`; `tp = 1` is the whole model): exactly
/// the values [`metaseq_init`] gives those elements of the whole model, so each rank of a
/// sharded run initialises its own part without building the whole model. A slice holds rows
/// `[t·r, (t+1)·r)` of a row-split tensor (vocabulary padding rows past the end are zero) and
/// columns `[t·c, (t+1)·c)` of a column-split one, as `opt-dist`'s Megatron split does.
pub fn metaseq_init_range(
    cfg: &OptConfig,
    tp: usize,
    tp_rank: usize,
    (a, b): (usize, usize),
    std: f32,
    seed: u64,
) -> Vec<f32> {
    let resid_scale = 1.0 / ((2 * cfg.num_hidden_layers) as f32).sqrt();
    let full = ParamLayout::new(cfg);
    let local = ParamLayout::sharded(cfg, tp);
    let mut out = vec![0f32; b.saturating_sub(a)];
    let pad = cfg.pad_token_id as usize;
    for (i, (fs, ls)) in full.specs.iter().zip(&local.specs).enumerate() {
        let (x, y) = (ls.offset.max(a), (ls.offset + ls.numel()).min(b));
        if x >= y {
            continue;
        }
        let dst = &mut out[x - a..y - a];
        let name = ls.name.as_str();
        if name.ends_with("layer_norm.weight") {
            dst.fill(1.0);
            continue;
        }
        if name.ends_with(".bias") {
            dst.fill(0.0);
            continue;
        }
        let s = if name.ends_with("out_proj.weight") || name.ends_with("fc2.weight") { std * resid_scale } else { std };
        let stream = rng::derive(seed, i as u64);
        let (fr, fc) = (fs.shape[0], fs.shape.get(1).copied().unwrap_or(1));
        let (lr, lc) = (ls.shape[0], ls.shape.get(1).copied().unwrap_or(1));
        let is_wte = ls.offset == local.wte;
        let first = x - ls.offset;
        // The whole tensor's element index of local element e (None: a padding row).
        let map = move |e: usize| -> Option<usize> {
            let (r, c) = (e / lc, e % lc);
            let (fr_idx, fc_idx) = if lr != fr {
                (tp_rank * lr + r, c)
            } else if lc != fc {
                (r, tp_rank * lc + c)
            } else {
                (r, c)
            };
            if fr_idx >= fr || (is_wte && fr_idx == pad) {
                return None;
            }
            Some(fr_idx * fc + fc_idx)
        };
        dst.par_chunks_mut(1 << 14).enumerate().for_each(|(c, chunk)| {
            for (j, v) in chunk.iter_mut().enumerate() {
                *v = match map(first + c * (1 << 14) + j) {
                    Some(k) => rng::normal(stream, k as u64) * s,
                    None => 0.0,
                };
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_of_the_whole_model_equals_the_whole_init() {
        for preset in ["tiny"] {
            let mut cfg = OptConfig::preset(preset).expect("preset");
            cfg.vocab_size = 1001;
            let layout = ParamLayout::new(&cfg);
            let mut whole = vec![0f32; layout.total()];
            metaseq_init(&cfg, &layout, &mut whole, 0.02, 9);
            let n = whole.len();
            assert_eq!(metaseq_init_range(&cfg, 1, 0, (0, n), 0.02, 9), whole);
            for (a, b) in [(0, 10), (n / 3, n / 2), (n - 7, n), (12345, 12345)] {
                assert_eq!(metaseq_init_range(&cfg, 1, 0, (a, b), 0.02, 9), whole[a..b], "[{a}, {b})");
            }
        }
    }
}
