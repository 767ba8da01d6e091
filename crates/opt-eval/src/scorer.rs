//! Log-likelihoods of many `(context, continuation)` requests, as lm-evaluation-harness's
//! `HFLM._loglikelihood_tokens` computes them, batched through the engine.
//!
//! Per request the harness feeds `(context + continuation)[-(max_length + 1):][:-1]` and sums
//! `log_softmax(logits)[continuation token]` over the last `len(continuation)` positions; the
//! request is "greedy" when every continuation token is the argmax at its position. Here:
//!
//! - **Truncation.** A request longer than `max_length + 1` tokens loses context tokens from the
//!   left (the harness's slice). A continuation longer than the window is an error.
//! - **Shared contexts.** Requests are grouped by their (truncated) context ids. With
//!   `reuse_context`, a batch is whole groups with at most `batch_size` continuations in all (a
//!   bigger group is a batch of its own). It first runs its distinct contexts once — left-padded
//!   to a common length, so the last position of every row is real and [`LogitsMode::Last`]
//!   gives each context's next-token logits — then copies each context's KV-cache row to the rows
//!   of its continuations and runs the continuations (right-padded, in chunks of at most
//!   `batch_size` rows) on top. The first continuation token is scored from the context's last
//!   logits, the others from the continuation pass. Positions come from the attention mask
//!   (`cumsum(mask) - 1`), so padding on either side leaves the real tokens' positions, and
//!   therefore their logits, those of the unpadded sequence.
//! - **Without reuse** every request is one right-padded row `context + continuation[..-1]`
//!   (the harness's own layout); with `batch_size = 1` this is "one at a time".
//! - **Order.** Work is sorted by length, longest first (as the harness's `Collator`), which
//!   keeps padding low and makes the first batch the largest; results come back in request order.
//!
//! Log-softmax rows are computed on the host in f64 from the f32 logits, only for the positions
//! that are scored.

use std::collections::HashMap;

use opt_model::{KvCache, LogitsMode, OptModel};
use opt_tensor::{Backend, Buffer};

use crate::harness::Request;
use crate::{EvalError, Result};

/// How to batch the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreOptions {
    /// Most `(context, continuation)` rows in one forward.
    pub batch_size: usize,
    /// Run each distinct context once and its continuations on its KV cache.
    pub reuse_context: bool,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions { batch_size: 16, reuse_context: true }
    }
}

/// The score of one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    /// Sum of the continuation tokens' log-probabilities.
    pub loglikelihood: f64,
    /// Every continuation token was the argmax (first index on ties, as `torch.argmax`).
    pub is_greedy: bool,
    /// Continuation tokens scored.
    pub tokens: usize,
    /// Context tokens were dropped to fit the model's window.
    pub truncated: bool,
}

/// Most logits (rows × vocabulary, f32) one forward may produce: 2^27 floats = 512 MiB. Batches
/// are cut so that a long-continuation task on a 50k vocabulary cannot exhaust memory.
pub(crate) const LOGITS_BUDGET: usize = 1 << 27;

/// Scores `requests` (see the module docs). `progress` is called with the number of requests
/// finished after each batch.
pub fn loglikelihoods<B: Backend>(
    model: &OptModel<B>,
    requests: &[Request],
    opts: &ScoreOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Scored>> {
    if opts.batch_size == 0 {
        return Err(EvalError::Input("batch size must be at least 1".into()));
    }
    let max_len = model.cfg.max_position_embeddings;
    let mut out: Vec<Option<Scored>> = vec![None; requests.len()];
    // (request index, context after truncation)
    let mut work: Vec<(usize, Vec<u32>)> = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        if r.continuation.is_empty() {
            // Nothing to score: the harness sums an empty slice (0) and `all()` of nothing is true.
            out[i] = Some(Scored { loglikelihood: 0.0, is_greedy: true, tokens: 0, truncated: false });
            continue;
        }
        if r.context.is_empty() {
            return Err(EvalError::Input(format!("request {i}: empty context (it should at least hold </s>)")));
        }
        let n = r.continuation.len();
        if n > max_len {
            return Err(EvalError::Input(format!(
                "request {i}: a continuation of {n} tokens does not fit the model's window of {max_len}"
            )));
        }
        // Input = (context + continuation)[-(max_len + 1):][:-1]: drop context from the left.
        let excess = (r.context.len() + n).saturating_sub(max_len + 1);
        work.push((i, r.context[excess..].to_vec()));
    }
    let done_empty = requests.len() - work.len();
    if done_empty > 0 {
        progress(done_empty);
    }
    let truncated: Vec<bool> = requests.iter().map(|r| r.context.len() + r.continuation.len() > max_len + 1).collect();
    let mut sink = |i: usize, ll: f64, greedy: bool| {
        out[i] = Some(Scored {
            loglikelihood: ll,
            is_greedy: greedy,
            tokens: requests[i].continuation.len(),
            truncated: truncated[i],
        });
    };
    if opts.reuse_context {
        run_shared(model, requests, work, opts.batch_size, &mut sink, progress)?;
    } else {
        run_full(model, requests, work, opts.batch_size, &mut sink, progress)?;
    }
    out.into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| EvalError::Input(format!("request {i} was not scored"))))
        .collect()
}

/// A group of requests sharing one context.
struct Group {
    context: Vec<u32>,
    members: Vec<usize>,
}

/// Context reuse: group, sort, pack into batches, run each batch in two passes.
fn run_shared<B: Backend>(
    model: &OptModel<B>,
    requests: &[Request],
    work: Vec<(usize, Vec<u32>)>,
    batch_size: usize,
    sink: &mut dyn FnMut(usize, f64, bool),
    progress: &mut dyn FnMut(usize),
) -> Result<()> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<Vec<u32>, usize> = HashMap::new();
    for (i, ctx) in work {
        match index.get(&ctx) {
            Some(&g) => groups[g].members.push(i),
            None => {
                index.insert(ctx.clone(), groups.len());
                groups.push(Group { context: ctx, members: vec![i] });
            }
        }
    }
    let cont_len = |i: usize| requests[i].continuation.len();
    let key = |g: &Group| g.context.len() + g.members.iter().map(|&i| cont_len(i)).max().unwrap_or(0);
    // Longest first; ties keep their order (stable sort), so the work is deterministic.
    groups.sort_by_key(|g| std::cmp::Reverse(key(g)));

    // A batch is whole groups (one prefill row each) holding at most `batch_size` continuations
    // in all. A group with more continuations than that is a batch by itself: its context still
    // runs once, and its continuations go through in chunks.
    let mut batch: Vec<&Group> = Vec::new();
    let mut rows = 0;
    for g in &groups {
        if !batch.is_empty() && rows + g.members.len() > batch_size {
            run_shared_batch(model, requests, &batch, batch_size, sink)?;
            progress(rows);
            batch.clear();
            rows = 0;
        }
        batch.push(g);
        rows += g.members.len();
    }
    if !batch.is_empty() {
        run_shared_batch(model, requests, &batch, batch_size, sink)?;
        progress(rows);
    }
    Ok(())
}

/// The prefilled contexts of a batch: their KV cache `[G, Lc]`, next-token logits `[G, V]` and
/// lengths (row `g` is left-padded by `lc - lens[g]`).
struct Prefill<B: Backend> {
    cache: KvCache<B>,
    last: B::Buf,
    lc: usize,
    lens: Vec<usize>,
}

/// One batch with context reuse: prefill the distinct contexts, then the continuations in
/// chunks of at most `batch_size` rows.
fn run_shared_batch<B: Backend>(
    model: &OptModel<B>,
    requests: &[Request],
    groups: &[&Group],
    batch_size: usize,
    sink: &mut dyn FnMut(usize, f64, bool),
) -> Result<()> {
    let be = &model.backend;
    let cfg = &model.cfg;
    let (v, pad) = (cfg.vocab_size, cfg.pad_token_id);

    // Pass 1: contexts, left-padded to Lc. ids/mask are [G, Lc].
    let g_rows = groups.len();
    let lc = groups.iter().map(|g| g.context.len()).max().unwrap_or(0);
    let mut ids = vec![pad; g_rows * lc];
    let mut mask = vec![0u8; g_rows * lc];
    for (r, g) in groups.iter().enumerate() {
        let off = r * lc + lc - g.context.len();
        ids[off..off + g.context.len()].copy_from_slice(&g.context);
        mask[off..(r + 1) * lc].fill(1);
    }
    let mut cache = KvCache::new(be, cfg, g_rows, lc)?;
    let last = model.forward(&ids, g_rows, Some(&mask), Some(&mut cache), LogitsMode::Last)?;
    let pre = Prefill { cache, last, lc, lens: groups.iter().map(|g| g.context.len()).collect() };

    // Pass 2, chunk by chunk: at most `batch_size` rows and the logits budget.
    let rows: Vec<(usize, usize)> =
        groups.iter().enumerate().flat_map(|(gr, g)| g.members.iter().map(move |&i| (gr, i))).collect();
    let mut start = 0;
    while start < rows.len() {
        let mut end = start + 1;
        let mut tc = requests[rows[start].1].continuation.len() - 1;
        while end < rows.len() && end - start < batch_size {
            let t = tc.max(requests[rows[end].1].continuation.len() - 1);
            if (end + 1 - start) * t * v > LOGITS_BUDGET {
                break;
            }
            tc = t;
            end += 1;
        }
        run_continuations(model, requests, &pre, &rows[start..end], tc, sink)?;
        start = end;
    }
    Ok(())
}

/// Continuations `rows` = (prefill row, request) minus their last token, right-padded to `tc`,
/// each on a copy of its context's cache row; then every request's score. ids are `[R, tc]`,
/// the mask `[R, Lc + tc]`.
fn run_continuations<B: Backend>(
    model: &OptModel<B>,
    requests: &[Request],
    pre: &Prefill<B>,
    rows: &[(usize, usize)],
    tc: usize,
    sink: &mut dyn FnMut(usize, f64, bool),
) -> Result<()> {
    let be = &model.backend;
    let cfg = &model.cfg;
    let (c, v, pad, lc) = (cfg.hidden_size, cfg.vocab_size, cfg.pad_token_id, pre.lc);
    let n_rows = rows.len();
    let cont_logits = if tc > 0 {
        let total = lc + tc;
        let mut cache = KvCache::new(be, cfg, n_rows, total)?;
        for (layer, (k_src, v_src)) in pre.cache.k.iter().zip(&pre.cache.v).enumerate() {
            for (r, &(gr, _)) in rows.iter().enumerate() {
                let (src, dst, len) = (gr * lc * c, r * total * c, lc * c);
                be.copy(cache.k[layer].at_mut(dst, len), k_src.at(src, len))?;
                be.copy(cache.v[layer].at_mut(dst, len), v_src.at(src, len))?;
            }
        }
        cache.len = lc;
        let mut ids = vec![pad; n_rows * tc];
        let mut mask = vec![0u8; n_rows * total];
        for (r, &(gr, i)) in rows.iter().enumerate() {
            let body = &requests[i].continuation[..requests[i].continuation.len() - 1];
            ids[r * tc..r * tc + body.len()].copy_from_slice(body);
            let row = &mut mask[r * total..(r + 1) * total];
            row[lc - pre.lens[gr]..lc].fill(1);
            row[lc..lc + body.len()].fill(1);
        }
        Some(model.forward(&ids, n_rows, Some(&mask), Some(&mut cache), LogitsMode::All)?)
    } else {
        None
    };

    for (r, &(gr, i)) in rows.iter().enumerate() {
        let cont = &requests[i].continuation;
        let mut ll = 0f64;
        let mut greedy = true;
        for (j, &target) in cont.iter().enumerate() {
            // The first token is predicted by the context's last position, the others by the
            // continuation pass.
            let (lp, best) = match (j, &cont_logits) {
                (0, _) => score_row(be, &pre.last, gr, v, target)?,
                (_, Some(cl)) => score_row(be, cl, r * tc + j - 1, v, target)?,
                (_, None) => return Err(EvalError::Input("internal: continuation logits missing".into())),
            };
            ll += lp;
            greedy &= best;
        }
        sink(i, ll, greedy);
    }
    Ok(())
}

/// Without reuse: one right-padded row `context + continuation[..-1]` per request.
fn run_full<B: Backend>(
    model: &OptModel<B>,
    requests: &[Request],
    mut work: Vec<(usize, Vec<u32>)>,
    batch_size: usize,
    sink: &mut dyn FnMut(usize, f64, bool),
    progress: &mut dyn FnMut(usize),
) -> Result<()> {
    let len = |(i, ctx): &(usize, Vec<u32>)| ctx.len() + requests[*i].continuation.len() - 1;
    work.sort_by_key(|w| std::cmp::Reverse(len(w)));
    let v = model.cfg.vocab_size;
    let mut start = 0;
    while start < work.len() {
        // Sorted longest first, so the first row fixes the padded length of the batch.
        let t = len(&work[start]);
        let fit = (LOGITS_BUDGET / (t * v).max(1)).max(1);
        let end = (start + batch_size.min(fit)).min(work.len());
        run_full_batch(model, requests, &work[start..end], t, sink)?;
        progress(end - start);
        start = end;
    }
    Ok(())
}

fn run_full_batch<B: Backend>(
    model: &OptModel<B>,
    requests: &[Request],
    rows: &[(usize, Vec<u32>)],
    t: usize,
    sink: &mut dyn FnMut(usize, f64, bool),
) -> Result<()> {
    let be = &model.backend;
    let (v, pad) = (model.cfg.vocab_size, model.cfg.pad_token_id);
    let n = rows.len();
    let mut ids = vec![pad; n * t];
    let mut mask = vec![0u8; n * t];
    for (r, (i, ctx)) in rows.iter().enumerate() {
        let cont = &requests[*i].continuation;
        let seq = ctx.iter().chain(&cont[..cont.len() - 1]);
        for (slot, &id) in ids[r * t..].iter_mut().zip(seq) {
            *slot = id;
        }
        mask[r * t..r * t + ctx.len() + cont.len() - 1].fill(1);
    }
    let logits = model.forward(&ids, n, Some(&mask), None, LogitsMode::All)?;
    for (r, (i, ctx)) in rows.iter().enumerate() {
        let mut ll = 0f64;
        let mut greedy = true;
        for (j, &target) in requests[*i].continuation.iter().enumerate() {
            let (lp, best) = score_row(be, &logits, r * t + ctx.len() - 1 + j, v, target)?;
            ll += lp;
            greedy &= best;
        }
        sink(*i, ll, greedy);
    }
    Ok(())
}

/// `(log_softmax(logits[row])[target], target is the argmax)`, in f64 on the host.
pub(crate) fn score_row<B: Backend>(be: &B, logits: &B::Buf, row: usize, v: usize, target: u32) -> Result<(f64, bool)> {
    let x = be.to_f32(logits.at(row * v, v))?;
    let t = target as usize;
    if t >= v {
        return Err(EvalError::Input(format!("token id {target} is outside the vocabulary of {v}")));
    }
    let (mut best, mut max) = (0usize, f32::NEG_INFINITY);
    for (k, &y) in x.iter().enumerate() {
        if y > max {
            max = y;
            best = k;
        }
    }
    // exp in f32 (each term is within f32 rounding of the f64 one), summed in f64 so the
    // 50k-term sum loses nothing: the log-softmax agrees with an all-f64 one to ~1e-7.
    let sum: f64 = x.iter().map(|&y| f64::from((y - max).exp())).sum();
    Ok((f64::from(x[t] - max) - sum.ln(), best == t))
}
