//! Token choice from processed scores: argmax, and seeded sampling with the counter-based RNG of
//! `opt_tensor::rng`, so a draw is a pure function of `(seed, sequence, step)` — the same seed
//! gives the same text whatever the batch around it.

use opt_tensor::rng;

/// Index of the largest score (the first one on ties, as `torch.argmax`); NaN never wins.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in row.iter().enumerate() {
        if x > best_v {
            best = i;
            best_v = x;
        }
    }
    best as u32
}

/// A uniform draw in [0, 1) with 53 random bits.
pub fn uniform_f64(seed: u64, index: u64) -> f64 {
    (rng::bits(seed, index) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The seed of candidate `candidate` of a request seeded with `seed`. It does not depend on the
/// prompt's position in the batch, so a prompt sampled alone or in a batch gives the same text.
pub fn sequence_seed(seed: u64, candidate: usize) -> u64 {
    rng::derive(seed, candidate as u64)
}

/// Sample from `softmax(scores)` by inverting the CDF at a uniform draw `u`. `-inf` scores are
/// never chosen. Returns `None` when every score is `-inf` or NaN.
pub fn sample(scores: &[f32], u: f64) -> Option<u32> {
    let m = scores.iter().copied().filter(|x| !x.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return None;
    }
    let w: Vec<f64> = scores.iter().map(|&x| if x.is_nan() { 0.0 } else { ((x - m) as f64).exp() }).collect();
    let total: f64 = w.iter().sum();
    let target = u * total;
    let mut acc = 0f64;
    let mut last = None;
    for (i, &x) in w.iter().enumerate() {
        if x > 0.0 {
            acc += x;
            last = Some(i as u32);
            if acc > target {
                return last;
            }
        }
    }
    // Rounding left `target` at or past the total: the last token with weight.
    last
}

/// A random seed for requests that give none (reported back so the run can be repeated).
pub fn fresh_seed() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_the_distribution_and_skips_removed_tokens() {
        let scores = [0.0f32, f32::NEG_INFINITY, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut counts = [0usize; 4];
        for i in 0..40_000 {
            let t = sample(&scores, uniform_f64(9, i)).expect("a token");
            counts[t as usize] += 1;
        }
        assert_eq!(counts[1] + counts[3], 0);
        let frac = counts[2] as f64 / 40_000.0;
        assert!((frac - 0.75).abs() < 0.01, "{frac}");
        assert_eq!(sample(&[f32::NEG_INFINITY; 3], 0.5), None);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
    }
}
