//! Beam search for one prompt, step for step as HF transformers 5.17 `_beam_search` does it
//! (`generation/utils.py`), so that the same log-probs give the same hypotheses and scores.
//!
//! Per step, with K = `num_beams` and `keep` = max(2, 1 + #EOS) · K:
//! 1. every running beam's processed log-probs plus its running score form K·V candidates; the
//!    top `keep` are taken (enough that K of them can go on even if the best K all finish);
//! 2. a candidate "hits a stopping criterion" if it ends in EOS, reaches `max_new` tokens or
//!    contains a stop string;
//! 3. the next running beams are the top K candidates after adding -1e9 to those that hit;
//! 4. candidates that hit *and* rank in the top K become finished hypotheses, scored
//!    `sum_logprobs / generated_len ** length_penalty` — HF 5.17 divides by
//!    `cur_len + 1 - decoder_prompt_len`, the number of generated tokens including the new
//!    one (the prompt does not count) — and compete with the K finished so far;
//! 5. the prompt is done when no running beam can improve on the finished ones (HF's
//!    heuristic, depending on `early_stopping`), when `early_stopping = true` and K hypotheses
//!    are finished, or when every candidate hit a stopping criterion.
//!
//! All arithmetic is f32 with HF's constants (-1e9 penalties), so ties and near-ties resolve
//! the same way. Ties in HF's `torch.topk` have no specified order; here the lower index wins.

use crate::generator::TokenLogprob;
use crate::params::EarlyStopping;

/// HF's "very negative" score for excluded entries.
const NEG: f32 = -1.0e9;

#[derive(Clone, Debug)]
pub struct BeamConfig {
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// New tokens at most (HF `max_length - decoder_prompt_len`).
    pub max_new: usize,
    pub eos: Option<u32>,
}

/// A running beam: its generated tokens and accumulated (processed) log-prob.
#[derive(Clone, Debug)]
pub struct Beam {
    pub tokens: Vec<u32>,
    pub score: f32,
    /// Raw per-token log-probs (only when requested).
    pub logprobs: Vec<TokenLogprob>,
}

/// A slot of the finished list (HF's `sequences` / `beam_scores` / `is_sent_finished`).
#[derive(Clone, Debug)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    /// Length-penalised score (HF `sequences_scores`).
    pub score: f32,
    pub finished: bool,
    pub logprobs: Vec<TokenLogprob>,
}

/// Beam search state of one prompt.
#[derive(Clone, Debug)]
pub struct BeamGroup {
    pub cfg: BeamConfig,
    pub running: Vec<Beam>,
    pub finished: Vec<Hypothesis>,
    heuristic_unsatisfied: bool,
    generated: usize,
    pub done: bool,
}

struct Candidate {
    score: f32,
    beam: usize,
    token: u32,
    hits: bool,
}

/// Indices of `scores` sorted descending (ties: lower index first).
fn order_desc(scores: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx
}

fn pow_f32(len: usize, p: f32) -> f32 {
    (len as f64).powf(p as f64) as f32
}

impl BeamGroup {
    pub fn new(cfg: BeamConfig) -> Self {
        let k = cfg.num_beams;
        // Only the first beam starts live, so the first step does not pick K copies of the same
        // continuation.
        let running = (0..k)
            .map(|i| Beam { tokens: Vec::new(), score: if i == 0 { 0.0 } else { NEG }, logprobs: Vec::new() })
            .collect();
        let finished = (0..k)
            .map(|_| Hypothesis { tokens: Vec::new(), score: NEG, finished: false, logprobs: Vec::new() })
            .collect();
        let done = cfg.max_new == 0;
        BeamGroup { cfg, running, finished, heuristic_unsatisfied: true, generated: 0, done }
    }

    /// Candidates kept per step.
    fn keep(&self) -> usize {
        (2usize).max(1 + usize::from(self.cfg.eos.is_some())) * self.cfg.num_beams
    }

    /// One step. `log_probs[k]` are the processed log-probs of running beam k; `stop_hit` says
    /// whether a token sequence contains a stop string; `logprob_of(k, token)` gives the raw
    /// log-prob record of a token after beam k (when log-probs were requested).
    ///
    /// Returns, for each new running beam, the index of the old beam it extends (the KV-cache
    /// rows to gather).
    pub fn step(
        &mut self,
        log_probs: &[Vec<f32>],
        stop_hit: &dyn Fn(&[u32]) -> bool,
        logprob_of: Option<&dyn Fn(usize, u32) -> TokenLogprob>,
    ) -> Vec<usize> {
        let k = self.cfg.num_beams;
        let keep = self.keep();
        let v = log_probs.first().map_or(0, Vec::len);

        // 1. top `keep` of the K·V accumulated scores. Each beam contributes at most `keep`, so
        //    select per beam first, then merge.
        let mut pool: Vec<(f32, usize)> = Vec::with_capacity(k * keep);
        for (b, row) in log_probs.iter().enumerate().take(k) {
            let base = self.running[b].score;
            let acc: Vec<f32> = row.iter().map(|&x| x + base).collect();
            let mut idx: Vec<usize> = (0..v).collect();
            let cmp = |&i: &usize, &j: &usize| {
                acc[j].partial_cmp(&acc[i]).unwrap_or(std::cmp::Ordering::Equal).then(i.cmp(&j))
            };
            if keep < v {
                idx.select_nth_unstable_by(keep - 1, cmp);
                idx.truncate(keep);
            }
            pool.extend(idx.into_iter().map(|i| (acc[i], b * v + i)));
        }
        pool.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1)));
        pool.truncate(keep);

        // 2. stopping criteria per candidate.
        let at_max = self.generated + 1 >= self.cfg.max_new;
        let cands: Vec<Candidate> = pool
            .iter()
            .map(|&(score, flat)| {
                let (beam, token) = (flat / v, (flat % v) as u32);
                let mut hits = at_max || Some(token) == self.cfg.eos;
                if !hits {
                    let mut toks = self.running[beam].tokens.clone();
                    toks.push(token);
                    hits = stop_hit(&toks);
                }
                Candidate { score, beam, token, hits }
            })
            .collect();
        let extend = |c: &Candidate| -> (Vec<u32>, Vec<TokenLogprob>) {
            let src = &self.running[c.beam];
            let mut toks = src.tokens.clone();
            toks.push(c.token);
            let mut lps = src.logprobs.clone();
            if let Some(f) = logprob_of {
                lps.push(f(c.beam, c.token));
            }
            (toks, lps)
        };

        // 3. next running beams.
        let adj: Vec<f32> = cands.iter().map(|c| c.score + if c.hits { NEG } else { 0.0 }).collect();
        let order = order_desc(&adj);
        let mut sources = Vec::with_capacity(k);
        let mut running = Vec::with_capacity(k);
        for &i in order.iter().take(k) {
            let (tokens, logprobs) = extend(&cands[i]);
            running.push(Beam { tokens, score: adj[i], logprobs });
            sources.push(cands[i].beam);
        }

        // 4. finished hypotheses.
        let denom = pow_f32(self.generated + 1, self.cfg.length_penalty);
        let all_finished = self.finished.iter().all(|h| h.finished);
        let full = all_finished && self.cfg.early_stopping == EarlyStopping::True;
        let mut merged_scores: Vec<f32> = self.finished.iter().map(|h| h.score).collect();
        let mut did = Vec::with_capacity(cands.len());
        for (i, c) in cands.iter().enumerate() {
            let just_finished = c.hits && i < k;
            let mut s = c.score / denom;
            if full {
                s += NEG;
            }
            if !self.heuristic_unsatisfied {
                s += NEG;
            }
            if !just_finished {
                s += NEG;
            }
            merged_scores.push(s);
            did.push(just_finished);
        }
        let order = order_desc(&merged_scores);
        let mut finished = Vec::with_capacity(k);
        for &i in order.iter().take(k) {
            if i < k {
                finished.push(self.finished[i].clone());
            } else {
                let c = &cands[i - k];
                let (tokens, logprobs) = extend(c);
                finished.push(Hypothesis { tokens, score: merged_scores[i], finished: did[i - k], logprobs });
            }
        }
        self.finished = finished;
        self.running = running;
        self.generated += 1;

        // 5. can this prompt still improve?
        let best_len = if self.cfg.early_stopping == EarlyStopping::Never && self.cfg.length_penalty > 0.0 {
            self.cfg.max_new
        } else {
            self.generated
        };
        let best_possible = self.running[0].score / pow_f32(best_len, self.cfg.length_penalty);
        let min_finished = self.finished.iter().map(|h| h.score).fold(f32::INFINITY, f32::min);
        let improvable = self.finished.iter().any(|h| best_possible > if h.finished { min_finished } else { NEG });
        self.heuristic_unsatisfied &= improvable;
        let all_finished = self.finished.iter().all(|h| h.finished);
        let open = !(all_finished && self.cfg.early_stopping == EarlyStopping::True);
        let valid = !cands.iter().all(|c| c.hits);
        self.done = !(self.heuristic_unsatisfied && open && valid);
        sources
    }
}
