//! opt-eval against HF transformers, scored the lm-evaluation-harness way by
//! tools/reference/generate_eval.py on the random-weight eval model (fixtures/eval/README.md):
//! per-request log-likelihoods within 1e-3, identical token ids, greedy flags, predictions,
//! acc / acc_norm, and sliding-window perplexity over a WikiText excerpt.

mod common;

use common::*;
use opt_eval::metrics::Items;
use opt_eval::tasks::TaskData;
use opt_eval::{encode_pair, evaluate, load_task, score_pairs, EvalOptions, Task};
use serde_json::Value;

const TOL: f64 = 1e-3;

fn load(name: &str) -> Task {
    load_task(name, Some(&eval_dir()), None).expect("task loads")
}

fn run(task: &Task, opts: &EvalOptions) -> opt_eval::TaskResult {
    evaluate(model(), tok(), task, opts, &mut |_, _| {}).expect("evaluate")
}

/// The requests of a choice task's reference, item by item.
fn ref_requests(item: &Value) -> &Vec<Value> {
    item["requests"].as_array().expect("requests")
}

#[test]
fn token_ids_follow_the_harness_split() {
    let r = reference();
    let mut n = 0;
    let mut check = |req: &Value| {
        let got = encode_pair(tok(), req["context"].as_str().unwrap(), req["continuation"].as_str().unwrap()).unwrap();
        assert_eq!(got.context, ids(&req["context_ids"]), "context ids of {:?}", req["context"]);
        assert_eq!(got.continuation, ids(&req["continuation_ids"]), "continuation ids of {:?}", req["continuation"]);
        n += 1;
    };
    for task in ["lambada", "greedy_probe"] {
        r[task]["items"].as_array().unwrap().iter().for_each(&mut check);
    }
    for task in ["hellaswag", "piqa", "arc_easy", "mc_file", "schema_file"] {
        for item in r[task]["items"].as_array().unwrap() {
            ref_requests(item).iter().for_each(&mut check);
        }
    }
    assert_eq!(n, 20 + 6 + 80 + 40 + 80 + 80 + 12);
}

/// Loads a choice task, checks its request strings are the reference's, evaluates it and
/// compares everything HF computed.
fn check_choice_task(name_or_file: &str, key: &str) {
    let task = if name_or_file.contains('/') {
        load_task(name_or_file, None, None).expect("file task loads")
    } else {
        load(name_or_file)
    };
    let r = &reference()[key];
    let ref_items = r["items"].as_array().unwrap();
    let TaskData::Choice(docs) = &task.data else { panic!("{key}: expected a choice task") };
    assert_eq!(docs.len(), ref_items.len(), "{key}: item count");
    for (d, ri) in docs.iter().zip(ref_items) {
        let reqs = ref_requests(ri);
        assert_eq!(d.requests.len(), reqs.len());
        for ((c, x), rq) in d.requests.iter().zip(reqs) {
            assert_eq!(c, rq["context"].as_str().unwrap(), "{key}: context");
            assert_eq!(x, rq["continuation"].as_str().unwrap(), "{key}: continuation");
        }
        assert_eq!(
            d.norm_lens,
            ids(&ri["norm_lens"]).iter().map(|&x| x as usize).collect::<Vec<_>>(),
            "{key}: norm lens"
        );
        assert_eq!(d.gold as u64, ri["gold"].as_u64().unwrap());
    }

    let res = run(&task, &EvalOptions::default());
    let Items::Choice(items) = &res.items else { panic!("choice items") };
    let mut worst = 0f64;
    for (k, (it, ri)) in items.iter().zip(ref_items).enumerate() {
        for (ll, rq) in it.loglikelihoods.iter().zip(ref_requests(ri)) {
            let d = (ll - f(&rq["loglikelihood"])).abs();
            worst = worst.max(d);
            assert!(d <= TOL, "{key} item {k}: loglikelihood {ll} vs HF {} (|Δ| {d:.2e})", rq["loglikelihood"]);
        }
        assert_eq!(it.pred as u64, ri["pred"].as_u64().unwrap(), "{key} item {k}: pred");
        assert_eq!(it.pred_norm as u64, ri["pred_norm"].as_u64().unwrap(), "{key} item {k}: pred_norm");
    }
    assert_eq!(res.n, ref_items.len());
    assert_eq!(res.metric("acc"), Some(f(&r["acc"])), "{key}: acc");
    assert_eq!(res.metric("acc_norm"), Some(f(&r["acc_norm"])), "{key}: acc_norm");
    eprintln!("{key}: worst |Δ loglikelihood| = {worst:.2e}");
}

#[test]
fn hellaswag_matches_hf() {
    check_choice_task("hellaswag", "hellaswag");
}

#[test]
fn piqa_matches_hf() {
    check_choice_task("piqa", "piqa");
}

#[test]
fn arc_easy_matches_hf() {
    check_choice_task("arc_easy", "arc_easy");
}

#[test]
fn multiple_choice_file_matches_hf() {
    check_choice_task(eval_dir().join("llmfoundry_arc_easy.jsonl").to_str().unwrap(), "mc_file");
}

#[test]
fn schema_file_matches_hf() {
    check_choice_task(eval_dir().join("schema_sample.jsonl").to_str().unwrap(), "schema_file");
}

#[test]
fn lambada_matches_hf() {
    let r = &reference()["lambada"];
    let ref_items = r["items"].as_array().unwrap();
    let res = run(&load("lambada"), &EvalOptions::default());
    let Items::LastWord(items) = &res.items else { panic!("last-word items") };
    assert_eq!(items.len(), ref_items.len());
    for (k, (it, ri)) in items.iter().zip(ref_items).enumerate() {
        assert_eq!(it.target, ri["continuation"].as_str().unwrap());
        let d = (it.loglikelihood - f(&ri["loglikelihood"])).abs();
        assert!(d <= TOL, "lambada item {k}: {} vs HF {} (|Δ| {d:.2e})", it.loglikelihood, ri["loglikelihood"]);
        assert_eq!(it.is_greedy, ri["is_greedy"].as_bool().unwrap(), "lambada item {k}: is_greedy");
    }
    assert_eq!(res.metric("acc"), Some(f(&r["acc"])));
    let ppl = res.metric("perplexity").unwrap();
    assert!((ppl / f(&r["perplexity"]) - 1.0).abs() < 1e-4, "perplexity {ppl} vs HF {}", r["perplexity"]);
    // Four of the twenty texts are longer than the 96-token window and lose context on the left.
    let truncated = ref_items.iter().filter(|i| i["truncated"].as_bool().unwrap()).count();
    assert_eq!(truncated, 4);
    assert_eq!(res.counts.iter().find(|(k, _)| *k == "truncated").map(|c| c.1), Some(truncated));
}

#[test]
fn greedy_continuations_are_detected() {
    let items = reference()["greedy_probe"]["items"].as_array().unwrap();
    let pairs: Vec<(&str, &str)> =
        items.iter().map(|i| (i["context"].as_str().unwrap(), i["continuation"].as_str().unwrap())).collect();
    let scored = score_pairs(model(), tok(), &pairs, &Default::default(), &mut |_, _| {}).unwrap();
    for (s, i) in scored.iter().zip(items) {
        assert!(s.is_greedy, "{:?} should be greedy", i["continuation"]);
        assert!((s.loglikelihood - f(&i["loglikelihood"])).abs() <= TOL);
        assert_eq!(s.tokens, 3);
    }
}

#[test]
fn wikitext_sliding_window_matches_hf() {
    let wk = &reference()["wikitext"];
    let task = load("wikitext");
    assert_eq!(task.len() as u64, wk["rows"].as_u64().unwrap());
    let TaskData::Rolling { text, .. } = &task.data else { panic!("rolling task") };
    assert_eq!(tok().encode(text, true).unwrap().len() as u64, wk["tokens"].as_u64().unwrap());
    for run_ref in wk["runs"].as_array().unwrap() {
        let stride = run_ref["stride"].as_u64().unwrap() as usize;
        for batch_size in [1, 5] {
            let mut opts = EvalOptions { stride: Some(stride), ..Default::default() };
            opts.score.batch_size = batch_size;
            let res = run(&task, &opts);
            let count = |k: &str| res.counts.iter().find(|(n, _)| *n == k).map(|c| c.1 as u64);
            assert_eq!(count("tokens"), run_ref["n_tokens"].as_u64());
            assert_eq!(count("words"), wk["words"].as_u64());
            assert_eq!(count("bytes"), wk["bytes"].as_u64());
            let Items::Rolling(windows) = &res.items else { panic!("windows") };
            let ref_w = run_ref["windows"].as_array().unwrap();
            assert_eq!(windows.len(), ref_w.len(), "stride {stride}: window count");
            for (w, rw) in windows.iter().zip(ref_w) {
                assert_eq!(
                    (w.begin as u64, w.end as u64, w.first_target as u64, w.n as u64),
                    (
                        rw["begin"].as_u64().unwrap(),
                        rw["end"].as_u64().unwrap(),
                        rw["first_target"].as_u64().unwrap(),
                        rw["n"].as_u64().unwrap()
                    )
                );
                // Per-window sums of up to 96 token NLLs of ~13 nats each.
                let d = (w.nll - f(&rw["nll"])).abs();
                assert!(
                    d <= TOL * w.n as f64,
                    "stride {stride} window {}: nll {} vs HF {} (|Δ| {d:.2e})",
                    w.begin,
                    w.nll,
                    rw["nll"]
                );
            }
            for m in ["token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"] {
                let (got, want) = (res.metric(m).unwrap(), f(&run_ref[m]));
                assert!((got / want - 1.0).abs() < 1e-5, "stride {stride} {m}: {got} vs HF {want}");
            }
        }
    }
}
