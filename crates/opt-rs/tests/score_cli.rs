//! `opt-rs score` and `opt-rs tokenize` end to end, against the HF fixtures.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn opt_rs(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_opt-rs")).args(args).current_dir(root()).output().expect("run opt-rs")
}

/// log_softmax of one row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    row.iter().map(|&x| x as f64 - m - s.ln()).collect()
}

#[test]
fn score_json_matches_hf_log_probabilities() {
    // Row 0 of the fixture batch (no padding): HF logits give the expected log-probs.
    let ck = opt_checkpoint::Checkpoint::open(&root().join("fixtures/pre_ln/reference.safetensors")).expect("ref");
    let ids: Vec<i64> = ck
        .tensor("input_ids")
        .expect("ids")
        .bytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8")))
        .collect();
    let logits = ck.tensor("logits").expect("logits").to_f32_vec().expect("f32");
    let (t, v) = (16usize, 512usize);
    let row: Vec<String> = ids[..t].iter().map(|x| x.to_string()).collect();
    let out =
        opt_rs(&["score", "--model", "fixtures/pre_ln", "--ids", &row.join(","), "--top-logprobs", "3", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let lps = j["token_logprobs"].as_array().expect("array");
    assert_eq!(lps.len(), t);
    assert!(lps[0].is_null() && j["top_logprobs"][0].is_null());
    let mut sum = 0.0;
    for i in 1..t {
        let want = log_softmax(&logits[(i - 1) * v..i * v]);
        let got = lps[i].as_f64().expect("number");
        let exp = want[ids[i] as usize];
        assert!((got - exp).abs() < 1e-4, "position {i}: {got} vs {exp}");
        sum += got;
        // Top-3 alternatives are the three largest HF log-probs.
        let top = j["top_logprobs"][i].as_object().expect("object");
        assert_eq!(top.len(), 3);
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
        for id in &order[..3] {
            let lp = top.get(&id.to_string()).and_then(|x| x.as_f64()).expect("top id present");
            assert!((lp - want[*id]).abs() < 1e-4);
        }
    }
    let ppl = j["perplexity"].as_f64().expect("ppl");
    assert!((ppl - (-sum / (t - 1) as f64).exp()).abs() < 1e-6 * ppl);
    assert_eq!(j["tokens"].as_array().expect("tokens").len(), t);
}

#[test]
fn score_table_and_text_input() {
    let out = opt_rs(&["score", "--model", "fixtures/pre_ln", "--ids", "2,100,7"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("perplexity:"), "{s}");
    // The eval fixture has the real vocabulary, so text goes through the bundled tokenizer.
    let out = opt_rs(&["score", "--model", "fixtures/eval_model", "--text", "Hello world", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["tokens"], serde_json::json!([2, 31414, 232]));
}

#[test]
fn score_errors_are_clear() {
    let out = opt_rs(&["score", "--model", "fixtures/does_not_exist", "--ids", "2,3"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("does_not_exist") && e.contains("config.json"), "{e}");
    // A model whose vocabulary is smaller than the tokenizer's: wrong tokenizer.
    let out = opt_rs(&["score", "--model", "fixtures/pre_ln", "--text", "Hello"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("wrong tokenizer"), "{e}");
    let out = opt_rs(&["score", "--model", "fixtures/pre_ln", "--ids", "2,9999"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("9999"));
}

#[test]
fn tokenize_reads_json_lines() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_opt-rs"))
        .args(["tokenize"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(b"\"A photo of a cat\"\n\"Hello world\"\n").expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).expect("utf8").lines().collect();
    assert_eq!(lines, ["[2,250,1345,9,10,4758]", "[2,31414,232]"]);

    let mut child = Command::new(env!("CARGO_BIN_EXE_opt-rs"))
        .args(["tokenize"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(b"not json\n").expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"));
}
