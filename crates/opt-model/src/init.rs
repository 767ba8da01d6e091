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
