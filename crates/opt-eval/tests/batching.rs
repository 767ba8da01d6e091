//! Batched scoring with context reuse gives the same numbers as one request at a time, for every
//! fixture task (contexts of different lengths in one batch, truncated requests, continuations
//! of one token, duplicate contexts).

mod common;

use common::*;
use opt_eval::tasks::TaskData;
use opt_eval::{encode_pair, load_task, loglikelihoods, Request, ScoreOptions, Scored};

fn requests_of(task: &str) -> Vec<Request> {
    let t = load_task(task, Some(&eval_dir()), None).expect("task");
    let pairs: Vec<(String, String)> = match t.data {
        TaskData::Choice(docs) => docs.into_iter().flat_map(|d| d.requests).collect(),
        TaskData::LastWord(docs) => docs.into_iter().map(|d| (d.context, d.target)).collect(),
        TaskData::Rolling { .. } => panic!("not a request task"),
    };
    pairs.iter().map(|(c, x)| encode_pair(tok(), c, x).expect("encode")).collect()
}

fn score(reqs: &[Request], batch_size: usize, reuse_context: bool) -> Vec<Scored> {
    let mut seen = 0;
    let out =
        loglikelihoods(model(), reqs, &ScoreOptions { batch_size, reuse_context }, &mut |k| seen += k).expect("score");
    assert_eq!(seen, reqs.len(), "progress covers every request");
    out
}

fn assert_same(a: &[Scored], b: &[Scored], what: &str) {
    assert_eq!(a.len(), b.len());
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        let d = (x.loglikelihood - y.loglikelihood).abs();
        assert!(d <= 1e-4, "{what}: request {k}: {} vs {} (|Δ| {d:.2e})", x.loglikelihood, y.loglikelihood);
        assert_eq!((x.is_greedy, x.tokens, x.truncated), (y.is_greedy, y.tokens, y.truncated), "{what}: request {k}");
    }
}

#[test]
fn batched_equals_one_at_a_time() {
    for task in ["hellaswag", "piqa", "arc_easy", "lambada"] {
        let reqs = requests_of(task);
        let one = score(&reqs, 1, false);
        for (bs, reuse) in [(1, true), (3, true), (16, true), (200, true), (7, false), (200, false)] {
            assert_same(&one, &score(&reqs, bs, reuse), &format!("{task} batch {bs} reuse {reuse}"));
        }
    }
}

#[test]
fn odd_requests_batch_correctly() {
    let ctx = encode_pair(tok(), "The quick brown fox", " jumps").unwrap();
    let mut reqs = vec![
        ctx.clone(),
        // Same context, different continuations (shared prefill), one of a single token.
        Request { context: ctx.context.clone(), continuation: tok().encode(" over the lazy dog", false).unwrap() },
        Request { context: ctx.context.clone(), continuation: tok().encode(".", false).unwrap() },
        // Nothing to score: 0 and greedy, as the harness's empty slice.
        Request { context: ctx.context.clone(), continuation: vec![] },
        // Shorter context in the same batch (left padding in the prefill).
        encode_pair(tok(), "Hi", " there").unwrap(),
    ];
    // A duplicate of the first request, far away in the list.
    reqs.push(reqs[0].clone());
    let one = score(&reqs, 1, false);
    assert_eq!(one[3], Scored { loglikelihood: 0.0, is_greedy: true, tokens: 0, truncated: false });
    assert_eq!(one[0], one[5]);
    for bs in [2, 4, 10] {
        assert_same(&one, &score(&reqs, bs, true), &format!("batch {bs}"));
    }
}

#[test]
fn scorer_rejects_what_it_cannot_score() {
    let window = model().cfg.max_position_embeddings;
    let long = Request { context: vec![2], continuation: vec![100; window + 1] };
    let e = loglikelihoods(model(), &[long], &ScoreOptions::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("does not fit the model's window of 96"), "{e}");
    let ok = encode_pair(tok(), "a", " b").unwrap();
    let e = loglikelihoods(model(), &[ok], &ScoreOptions { batch_size: 0, reuse_context: true }, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch size"), "{e}");
}

#[test]
fn a_continuation_filling_the_window_is_scored_after_one_context_token() {
    // 96 continuation tokens: the harness keeps the last 97 tokens of context + continuation,
    // i.e. exactly one context token.
    let window = model().cfg.max_position_embeddings;
    let cont: Vec<u32> = (0..window as u32).map(|i| 1000 + i).collect();
    let full = Request { context: vec![2, 500, 600], continuation: cont.clone() };
    let cut = Request { context: vec![600], continuation: cont };
    let a = score(std::slice::from_ref(&full), 1, false);
    let b = score(&[cut], 1, false);
    assert!(a[0].truncated && !b[0].truncated);
    assert!((a[0].loglikelihood - b[0].loglikelihood).abs() < 1e-4);
    assert_same(&a, &score(&[full], 4, true), "reuse");
}
