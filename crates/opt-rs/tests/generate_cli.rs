//! `opt-rs generate` end to end: the built binary on the fixture models.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

fn opt_rs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_opt-rs")).args(args).output().expect("running opt-rs")
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"))).collect()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id")).collect()
}

/// HF's `generate(max_new_tokens=24, min_new_tokens=24)` continuation of the prompt [2, 5, 9]
/// on `model`, from `fixtures/generation/generation.json` (case "acceptance").
fn hf_acceptance(model: &str) -> Vec<u64> {
    let path = fixture("generation/generation.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("generation.json")).expect("JSON");
    let case = doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == "acceptance" && c["model"] == model)
        .expect("acceptance case");
    assert_eq!(case["prompts"][0], serde_json::json!([2, 5, 9]));
    ids(&case["outputs"][0][0])
}

#[test]
fn acceptance_command_ids_in_ids_out() {
    let model = fixture("pre_ln");
    let out = opt_rs(&[
        "generate",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--ids",
        "2,5,9",
        "--max-new-tokens",
        "24",
        "--min-new-tokens",
        "24",
        "--greedy",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1);
    let o = &lines[0];
    assert_eq!(o["finish_reason"], "length");
    let want = hf_acceptance("pre_ln");
    assert_eq!(want.len(), 24);
    assert_eq!(ids(&o["token_ids"]), want);
    // No tokenizer for a 512-token vocabulary: no text field.
    assert!(o.get("text").is_none(), "{o}");
    assert!(o.get("logprobs").is_none());
}

#[test]
fn several_prompts_logprobs_and_echo() {
    let model = fixture("galactica");
    let m = model.to_str().expect("utf-8 path");
    let out = opt_rs(&[
        "generate",
        "--model",
        m,
        "--ids",
        "2,5,9",
        "--ids",
        "2,7",
        "--max-new-tokens",
        "6",
        "--greedy",
        "--json",
        "--logprobs",
        "2",
        "--echo",
    ]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2);
    for (i, o) in lines.iter().enumerate() {
        assert_eq!(o["prompt_index"], i);
        let n = ids(&o["token_ids"]).len();
        assert!((1..=6).contains(&n));
        let lps = o["logprobs"].as_array().expect("logprobs");
        assert_eq!(lps.len(), n);
        assert_eq!(lps[0]["top_logprobs"].as_array().expect("top").len(), 2);
        let plps = o["prompt_logprobs"].as_array().expect("prompt logprobs");
        assert_eq!(plps.len(), ids(&o["prompt_token_ids"]).len());
        assert!(plps[0]["logprob"].is_null());
    }
    // Each prompt alone gives the same ids as in the batch.
    let alone = opt_rs(&["generate", "--model", m, "--ids", "2,7", "--max-new-tokens", "6", "--greedy", "--json"]);
    assert_eq!(json_lines(&alone)[0]["token_ids"], lines[1]["token_ids"]);
}

#[test]
fn seeded_sampling_and_beams_from_the_command_line() {
    let m = fixture("pre_ln");
    let m = m.to_str().expect("utf-8 path");
    let args = [
        "generate",
        "--model",
        m,
        "--ids",
        "2,11,12",
        "--max-new-tokens",
        "8",
        "--json",
        "--seed",
        "42",
        "--top-p",
        "0.9",
        "--n",
        "2",
    ];
    let a = opt_rs(&args);
    let b = opt_rs(&args);
    assert!(a.status.success(), "stderr: {}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout, "same seed, same output");
    let o = &json_lines(&a)[0];
    assert_eq!(o["choices"].as_array().expect("choices").len(), 2);

    let beams = opt_rs(&[
        "generate",
        "--model",
        m,
        "--ids",
        "2,11,12",
        "--max-new-tokens",
        "8",
        "--json",
        "--num-beams",
        "3",
        "--n",
        "2",
        "--length-penalty",
        "-0.5",
        "--early-stopping",
    ]);
    assert!(beams.status.success(), "stderr: {}", String::from_utf8_lossy(&beams.stderr));
    let o = &json_lines(&beams)[0];
    assert!(o["score"].as_f64().is_some());
    assert_eq!(o["choices"].as_array().expect("choices").len(), 2);
}

#[test]
fn bad_options_and_inputs_fail_naming_the_problem() {
    let m = fixture("pre_ln");
    let m = m.to_str().expect("utf-8 path");
    for (flag, value, name) in
        [("--top-p", "1.5", "--top-p"), ("--temperature", "-1", "--temperature"), ("--n", "0", "--n")]
    {
        let out = opt_rs(&["generate", "--model", m, "--ids", "2,5", flag, value]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "{flag} {value}: {err}");
    }
    // Text needs a tokenizer, which a 512-token fixture does not have.
    let out = opt_rs(&["generate", "--model", m, "hello"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenizer"));
    // A prompt longer than the 64 positions: an error, or a warning with --truncate.
    let long: Vec<String> = (0..80).map(|i| (3 + i).to_string()).collect();
    let long = long.join(",");
    let out = opt_rs(&["generate", "--model", m, "--ids", &long, "--greedy", "--max-new-tokens", "4"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("context of 64"));
    let out = opt_rs(&[
        "generate",
        "--model",
        m,
        "--ids",
        &long,
        "--greedy",
        "--max-new-tokens",
        "4",
        "--truncate",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
    assert_eq!(ids(&json_lines(&out)[0]["token_ids"]).len(), 4);
}

#[test]
fn text_streams_to_the_terminal_with_the_bundled_tokenizer() {
    // Random weights with OPT's vocabulary: text in, text out, stop string honoured.
    let out = opt_rs(&["generate", "--random-preset", "tiny", "Hello there", "--greedy", "--max-new-tokens", "12"]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("Hello there"), "{text}");
    let json =
        opt_rs(&["generate", "--random-preset", "tiny", "Hello there", "--greedy", "--max-new-tokens", "12", "--json"]);
    let o = &json_lines(&json)[0];
    let gen = o["text"].as_str().expect("text");
    assert_eq!(text.trim_end_matches('\n'), format!("Hello there{gen}"));
}

/// `opt-rs generate --tp 2` as two processes joined torchrun-style (RANK, WORLD_SIZE,
/// MASTER_ADDR, MASTER_PORT; the TCP rendezvous): rank 0 prints what one process prints, the
/// other rank prints nothing. (scripts/dist_tests.sh runs the same under mpirun.)
#[test]
fn tp2_launch_prints_what_one_process_prints() {
    let model = fixture("pre_ln");
    let m = model.to_str().expect("utf-8 path");
    for extra in [
        &["--greedy"][..],
        &["--temperature", "0.8", "--top-k", "40", "--n", "2", "--seed", "5"][..],
        &["--num-beams", "3"][..],
    ] {
        let mut args =
            vec!["generate", "--model", m, "--ids", "2,5,9", "--ids", "2,7", "--max-new-tokens", "12", "--json"];
        args.extend_from_slice(extra);
        let one = opt_rs(&args);
        assert!(one.status.success(), "stderr: {}", String::from_utf8_lossy(&one.stderr));
        // A free port for the rendezvous (released just before rank 0 binds it).
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        args.extend_from_slice(&["--tp", "2"]);
        let ranks: Vec<_> = (0..2)
            .map(|r| {
                Command::new(env!("CARGO_BIN_EXE_opt-rs"))
                    .args(&args)
                    .env("RANK", r.to_string())
                    .env("WORLD_SIZE", "2")
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn rank")
            })
            .collect();
        let outs: Vec<Output> = ranks.into_iter().map(|c| c.wait_with_output().expect("rank output")).collect();
        for (r, o) in outs.iter().enumerate() {
            assert!(o.status.success(), "{extra:?} rank {r}: {}", String::from_utf8_lossy(&o.stderr));
        }
        // Ids and finish reasons equal; beam scores up to the reductions' summation order.
        let (mut got, mut want) = (json_lines(&outs[0]), json_lines(&one));
        for (g, w) in got.iter_mut().zip(want.iter_mut()) {
            let (gs, ws) =
                (g.as_object_mut().and_then(|o| o.remove("score")), w.as_object_mut().and_then(|o| o.remove("score")));
            let d = gs.zip(ws).map_or(0.0, |(a, b)| (a.as_f64().unwrap_or(f64::NAN) - b.as_f64().unwrap_or(0.0)).abs());
            assert!(d < 1e-4, "{extra:?}: beam score differs by {d}");
        }
        assert_eq!(got, want, "{extra:?}: rank 0 differs from one process");
        assert!(outs[1].stdout.is_empty(), "rank 1 printed {}", String::from_utf8_lossy(&outs[1].stdout));
    }
}

#[test]
fn bad_tp_is_a_clear_error() {
    let model = fixture("pre_ln");
    let m = model.to_str().expect("utf-8 path");
    let err = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // No multi-process launch.
    let o = opt_rs(&["generate", "--model", m, "--ids", "2,5", "--tp", "2"]);
    assert!(!o.status.success());
    assert!(err(&o).contains("--tp 2: needs 2 processes"), "{}", err(&o));
    // 4 attention heads over 3 ranks: refused before connecting (so one rank suffices here).
    let run = |tp: &str, world: &str| {
        Command::new(env!("CARGO_BIN_EXE_opt-rs"))
            .args(["generate", "--model", m, "--ids", "2,5", "--tp", tp])
            .env("RANK", "0")
            .env("WORLD_SIZE", world)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", "1")
            .output()
            .expect("opt-rs")
    };
    let o = run("3", "3");
    assert!(!o.status.success());
    assert!(err(&o).contains("--tp 3: 4 attention heads do not split over tp = 3"), "{}", err(&o));
    let o = run("2", "4");
    assert!(err(&o).contains("--tp 2: 4 processes were launched"), "{}", err(&o));
    let o = run("1", "2");
    assert!(err(&o).contains("pass --tp 2"), "{}", err(&o));
}
