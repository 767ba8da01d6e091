//! `opt-rs eval` end to end: the built binary on the eval fixture model and task excerpts
//! (fixtures/eval/README.md), checked against the HF reference numbers.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name).display().to_string()
}

fn opt_rs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_opt-rs")).args(args).output().expect("running opt-rs")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixture("eval/reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("JSON")
}

#[test]
fn json_results_match_the_reference() {
    let (model, data) = (fixture("eval_model"), fixture("eval"));
    let out = opt_rs(&[
        "eval",
        "--model",
        &model,
        "--data-dir",
        &data,
        "--task",
        "piqa",
        "--task",
        "wikitext",
        "--stride",
        "32",
        "--json",
        "--per-item",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let tasks = v.as_array().expect("a list for two tasks");
    let r = reference();

    let piqa = &tasks[0];
    assert_eq!(piqa["task"], "piqa");
    assert_eq!(piqa["n"], 20);
    assert_eq!(piqa["acc"], r["piqa"]["acc"]);
    assert_eq!(piqa["acc_norm"], r["piqa"]["acc_norm"]);
    assert!(piqa["acc_stderr"].as_f64().unwrap() > 0.0);
    let items = piqa["items"].as_array().expect("items with --per-item");
    for (it, ri) in items.iter().zip(r["piqa"]["items"].as_array().unwrap()) {
        assert_eq!(it["gold"], ri["gold"]);
        assert_eq!(it["pred"], ri["pred"]);
        for (ll, rq) in it["loglikelihoods"].as_array().unwrap().iter().zip(ri["requests"].as_array().unwrap()) {
            assert!((ll.as_f64().unwrap() - rq["loglikelihood"].as_f64().unwrap()).abs() < 1e-3);
        }
    }

    let wk = &tasks[1];
    let run = &r["wikitext"]["runs"][0];
    assert_eq!(run["stride"], 32);
    assert_eq!(wk["tokens"], run["n_tokens"]);
    let ppl = wk["token_perplexity"].as_f64().unwrap();
    assert!((ppl / run["token_perplexity"].as_f64().unwrap() - 1.0).abs() < 1e-5);
}

#[test]
fn table_and_limit() {
    let (model, data) = (fixture("eval_model"), fixture("eval"));
    let schema = fixture("eval/schema_sample.jsonl");
    let out = opt_rs(&[
        "eval",
        "--model",
        &model,
        "--data-dir",
        &data,
        "--task",
        "hellaswag",
        "--task",
        &schema,
        "--limit",
        "3",
        "--batch-size",
        "1",
        "--no-context-reuse",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["task", "metric", "value", "stderr", "n"]);
    assert_eq!(rows.len(), 5);
    assert_eq!(&rows[1][..2], ["hellaswag", "acc"]);
    assert_eq!(rows[1][4], "3");
    assert_eq!(&rows[4][..2], ["schema_sample", "acc_norm"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("hellaswag: 3 items in"));
}

#[test]
fn errors_explain_themselves() {
    let model = fixture("eval_model");
    let out = opt_rs(&["eval", "--model", &model, "--task", "hellaswagg"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown task 'hellaswagg': known tasks are lambada, hellaswag, piqa, arc_easy, wikitext"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}\n{\"query\": \"q\"}\n").unwrap();
    let out = opt_rs(&["eval", "--model", &model, "--task", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2: missing field \"choices\""), "{err}");
}
