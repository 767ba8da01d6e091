//! `opt-rs train`, `opt-rs data prepare` and `opt-rs export` end to end: the built binary on
//! the default configuration (tiny OPT, bundled Shakespeare), shrunk to a few small steps.

use std::path::Path;
use std::process::{Command, Output};

fn opt_rs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_opt-rs")).args(args).output().expect("running opt-rs")
}

fn ok(out: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "opt-rs failed:\n{text}");
    text
}

fn rows(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("logbook.jsonl"))
        .expect("logbook")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON row"))
        .collect()
}

/// The default run, shrunk: 3 steps of 2 × 32 tokens.
const SMALL: &[&str] = &[
    "--set",
    "train.max_steps=3",
    "--set",
    "train.batch_size=2",
    "--set",
    "data.seq_len=32",
    "--set",
    "schedule.warmup_steps=1",
    "--set",
    "run.eval_batches=1",
    "--set",
    "sample.max_new_tokens=4",
    "--set",
    "run.log_every=1",
];

#[test]
fn default_run_shrunk_trains_checkpoints_resumes_and_exports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let run_set = format!("run.dir={}", run.display());
    let mut args = vec!["train", "--set", &run_set];
    args.extend_from_slice(SMALL);
    let text = ok(&opt_rs(&args));
    assert!(text.contains("valid loss") && text.contains("ROMEO:"), "{text}");
    for f in ["config.toml", "logbook.jsonl", "loss.svg", "samples.txt", "checkpoints/step_0000003/model.safetensors"] {
        assert!(run.join(f).exists(), "{f} missing:\n{text}");
    }
    let r = rows(&run);
    let train: Vec<&serde_json::Value> = r.iter().filter(|x| x["kind"] == "train").collect();
    assert_eq!(train.len(), 3);
    assert!(train[0]["loss"].as_f64().unwrap_or(0.0) > 10.0, "a random 50272-way model starts near ln(50272) = 10.8");
    assert_eq!(r.iter().filter(|x| x["kind"] == "eval").count(), 2, "before and after");

    // Running again into the same folder needs --resume or --fresh.
    let again = opt_rs(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));

    // Resume to step 5 with the saved config (the --set flags only change max_steps).
    let text = ok(&opt_rs(&["train", "--resume", "--set", &run_set, "--set", "train.max_steps=5"]));
    assert!(text.contains("resuming from"), "{text}");
    let steps: Vec<u64> =
        rows(&run).iter().filter(|x| x["kind"] == "train").map(|x| x["step"].as_u64().unwrap_or(0)).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5]);
    let saved = std::fs::read_to_string(run.join("config.toml")).expect("config.toml");
    assert!(saved.contains("seq_len = 32"), "the resumed run lost its saved config:\n{saved}");

    // Export an HF folder.
    let hf = dir.path().join("hf");
    let text = ok(&opt_rs(&["export", "--run", &run.display().to_string(), "--out", &hf.display().to_string()]));
    assert!(text.contains("step_0000005"), "{text}");
    for f in ["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"] {
        assert!(hf.join(f).is_file(), "{f} missing in the export");
    }
}

#[test]
fn bad_config_and_data_fail_with_the_key_or_location() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run_set = format!("run.dir={}", dir.path().join("run").display());
    let out = opt_rs(&["train", "--set", &run_set, "--set", "train.max_step=3"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.max_step"), "{err}");

    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, "[optim]\nlr = \"fast\"\n").expect("write");
    let out = opt_rs(&["train", "--config", &cfg.display().to_string(), "--set", &run_set]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("optim.lr"));

    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{oops}\n").expect("write");
    let data_set = format!("data.train={}", data.display());
    let out = opt_rs(&["train", "--set", &run_set, "--set", &data_set]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:2", data.display())), "{err}");

    let printed = ok(&opt_rs(&["train", "--print-config"]));
    assert!(printed.contains("[model]") && printed.contains("peak_gflops"));
}

#[test]
fn data_prepare_writes_a_token_file_training_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("c.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"To be, or not to be: that is the question.\"}\n{\"ids\": [2, 100, 200]}\nbroken\n",
    )
    .expect("write");
    let tok = dir.path().join("c.tok");
    let out = opt_rs(&["data", "prepare", &data.display().to_string(), "--out", &tok.display().to_string()]);
    assert!(!out.status.success(), "a malformed row must fail by default");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{}:3", data.display())));
    let text = ok(&opt_rs(&[
        "data",
        "prepare",
        &data.display().to_string(),
        "--out",
        &tok.display().to_string(),
        "--on-bad-row",
        "skip",
    ]));
    assert!(text.contains("2 documents") && text.contains("1 malformed"), "{text}");
    let run_set = format!("run.dir={}", dir.path().join("run").display());
    let data_set = format!("data.train={}", tok.display());
    let mut args = vec!["train", "--set", &run_set, "--set", &data_set, "--set", "data.valid=\"\""];
    args.extend_from_slice(SMALL);
    ok(&opt_rs(&args));
}
