//! `--model` given a metaseq checkpoint: score, generate, eval and serve read it directly (with
//! `--config`/`--preset`, as `convert --from metaseq` takes them) and give exactly what the HF
//! folder with the same weights gives.

use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn opt_rs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_opt-rs")).args(args).current_dir(root()).output().expect("run opt-rs")
}

fn stdout_ok(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const IDS: &str = "2,100,7,45,300,12,9,410,33";

#[test]
fn score_reads_every_metaseq_layout_like_the_hf_folder() {
    // The metaseq fixtures hold the HF fixtures' weights bit for bit, so the scores are equal.
    for (ck, hf) in [
        ("fixtures/metaseq/singleton/restored.pt", "pre_ln"),
        ("fixtures/metaseq/singleton", "pre_ln"),
        ("fixtures/metaseq/mp2_fused", "pre_ln"),
        ("fixtures/metaseq/fsdp", "pre_ln"),
        ("fixtures/metaseq/mp4", "post_ln_proj"),
        ("fixtures/metaseq/fused", "post_ln_proj"),
    ] {
        let cfg = format!("fixtures/{hf}/config.json");
        let got = stdout_ok(&opt_rs(&["score", "--model", ck, "--config", &cfg, "--ids", IDS, "--json"]));
        let want = stdout_ok(&opt_rs(&["score", "--model", &format!("fixtures/{hf}"), "--ids", IDS, "--json"]));
        assert_eq!(got, want, "{ck}");
    }
}

#[test]
fn generate_and_eval_read_a_metaseq_checkpoint() {
    let args = |m: &'static str| {
        let mut v = vec!["generate", "--model", m, "--ids", "2,5,9", "--max-new-tokens", "12", "--greedy", "--json"];
        if m.contains("metaseq") {
            v.extend(["--config", "fixtures/pre_ln"]);
        }
        v
    };
    let got = stdout_ok(&opt_rs(&args("fixtures/metaseq/fsdp")));
    assert_eq!(got, stdout_ok(&opt_rs(&args("fixtures/pre_ln"))));

    // eval takes the same --model (the 512-token fixtures fit no text task, so only the
    // loading step is checked: without a config the message says what to add).
    let out =
        opt_rs(&["eval", "--model", "fixtures/metaseq/fsdp", "--task", "wikitext", "--data-dir", "fixtures/eval"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metaseq checkpoint") && err.contains("--config"), "{err}");
}

#[test]
fn serve_loads_a_metaseq_checkpoint() {
    // The 512-token fixtures fit no tokenizer, so serve stops right after loading the model,
    // with the vocabulary message (not a loading error).
    let out = opt_rs(&["serve", "--model", "fixtures/metaseq/mp4", "--preset", "tiny", "--port", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // A preset of the wrong size is caught when the tensors are planned.
    assert!(err.contains("decoder.embed_tokens.weight") && err.contains("wrong config"), "{err}");
    let out = opt_rs(&["serve", "--model", "fixtures/metaseq/mp4", "--config", "fixtures/post_ln_proj", "--port", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reading the metaseq checkpoint") && err.contains("vocabulary is 512"), "{err}");
}

#[test]
fn metaseq_options_are_checked() {
    let out = opt_rs(&["score", "--model", "fixtures/metaseq/fsdp", "--ids", IDS]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a metaseq checkpoint") && err.contains("--preset"), "{err}");
    let out = opt_rs(&["score", "--model", "fixtures/pre_ln", "--preset", "125m", "--ids", IDS]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not one"));
}
