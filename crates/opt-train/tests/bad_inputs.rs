//! Every bad input a user can give the trainer fails with a message that says where: config
//! keys by name, data rows by file:line, corpora by path.

mod common;

use common::*;
use opt_tensor::CpuBackend;
use opt_train::trainer::StartOptions;
use opt_train::{TrainConfig, TrainError, Trainer};

fn config_err(file: Option<&str>, sets: &[&str]) -> String {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    match TrainConfig::from_parts(file.map(|t| (t, "run.toml")), &sets) {
        Ok(_) => panic!("config {file:?} {sets:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_errors_name_the_key() {
    // Unknown keys, in a file and in --set, and unknown sections.
    let e = config_err(Some("[train]\nmax_step = 3\n"), &[]);
    assert!(e.contains("train.max_step") && e.contains("unknown field"), "{e}");
    let e = config_err(None, &["optim.learning_rate=1e-3"]);
    assert!(e.contains("optim.learning_rate"), "{e}");
    let e = config_err(Some("[trainer]\nseed = 1\n"), &[]);
    assert!(e.contains("trainer"), "{e}");
    // Bad types.
    let e = config_err(Some("[train]\nmax_steps = \"many\"\n"), &[]);
    assert!(e.contains("train.max_steps") && e.contains("invalid type"), "{e}");
    let e = config_err(None, &["optim.betas=0.9"]);
    assert!(e.contains("optim.betas"), "{e}");
    let e = config_err(None, &["train.batch_size=-4"]);
    assert!(e.contains("train.batch_size"), "{e}");
    // Bad values (right type, wrong value).
    let e = config_err(None, &["train.precision=fp8"]);
    assert!(e.contains("train.precision") && e.contains("fp8"), "{e}");
    let e = config_err(None, &["optim.lr=0"]);
    assert!(e.contains("optim.lr") && e.contains("positive"), "{e}");
    let e = config_err(None, &["optim.betas=[0.9, 1.5]"]);
    assert!(e.contains("optim.betas") && e.contains("beta2"), "{e}");
    let e = config_err(None, &["train.batch_size=6", "train.grad_accum=4"]);
    assert!(e.contains("train.grad_accum"), "{e}");
    let e = config_err(None, &["model.preset=opt-7b"]);
    assert!(e.contains("model.preset") && e.contains("7b"), "{e}");
    let e = config_err(None, &["model.dropout=1.5"]);
    assert!(e.contains("model.dropout"), "{e}");
    let e = config_err(None, &["schedule.kind=exponential"]);
    assert!(e.contains("schedule.kind") && e.contains("exponential"), "{e}");
    let e = config_err(None, &["data.on_bad_row=ignore"]);
    assert!(e.contains("data.on_bad_row"), "{e}");
    // Malformed --set and TOML syntax errors.
    let e = config_err(None, &["train.max_steps"]);
    assert!(e.contains("train.max_steps") && e.contains("section.key=value"), "{e}");
    let e = config_err(None, &["train=3"]);
    assert!(e.contains("train"), "{e}");
    let e = config_err(Some("[train\nmax_steps = 3\n"), &[]);
    assert!(e.contains("run.toml") && e.contains("line 1"), "{e}");
    // seq_len beyond the model's positions is caught when the model is known.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d.jsonl");
    write_ids_jsonl(&data, &[train_ids()]);
    let e = Trainer::new(config(dir.path(), &data, &["data.seq_len=100"]), CpuBackend::new(), StartOptions::default())
        .err()
        .expect("seq_len 100 > 64 positions")
        .to_string();
    assert!(e.contains("data.seq_len") && e.contains("max_position_embeddings"), "{e}");
}

fn start(dir: &std::path::Path, data: &std::path::Path, extra: &[&str]) -> Result<Trainer<CpuBackend>, TrainError> {
    Trainer::new(config(dir, data, extra), CpuBackend::new(), StartOptions::default())
}

#[test]
fn malformed_jsonl_lines_are_reported_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("bad.jsonl");
    let cases = [
        ("{\"ids\": [5, 6, 7]}\n{\"ids\": [5, 6\n", 2, "invalid JSON"),
        ("{\"ids\": [5, 6]}\n\n[1, 2]\n", 3, "JSON object"),
        ("{\"txt\": \"hi\"}\n", 1, "neither"),
        ("{\"ids\": [5, 600]}\n", 1, "outside the vocabulary"),
        ("{\"ids\": [5, -1]}\n", 1, "not a token id"),
        ("{\"text\": 5}\n", 1, "must be a string"),
        ("{\"text\": \"a\", \"ids\": [5]}\n", 1, "both"),
    ];
    for (text, line, what) in cases {
        std::fs::write(&data, text).expect("write");
        let e = start(dir.path(), &data, &[]).err().expect("bad row accepted").to_string();
        let loc = format!("{}:{line}", data.display());
        assert!(e.contains(&loc) && e.contains(what), "expected {loc} / {what}: {e}");
        assert!(e.contains("on_bad_row"), "the message should name the switch: {e}");
    }
    // With on_bad_row = "skip" the good rows train and the bad ones are logged with file:line.
    std::fs::write(&data, "{\"ids\": [5, 6, 7]}\nnot json\n{\"ids\": [8, 9]}\n{\"ids\": 3}\n").expect("write");
    let mut t = start(dir.path(), &data, &["data.on_bad_row=skip", "train.max_steps=2"]).expect("skip mode");
    t.run(&mut ()).expect("run");
    let ev = events(dir.path(), "bad_rows_skipped");
    assert_eq!(ev.len(), 1);
    let detail = ev[0]["detail"].as_str().unwrap_or("");
    assert!(detail.contains("2 malformed rows") && detail.contains(":2:") && detail.contains(":4:"), "{detail}");
}

#[test]
fn empty_corpora_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("empty.jsonl");
    for text in ["", "\n\n  \n"] {
        std::fs::write(&data, text).expect("write");
        let e = start(dir.path(), &data, &[]).err().expect("empty corpus accepted");
        assert!(matches!(e, TrainError::EmptyCorpus { .. }), "{e}");
        assert!(e.to_string().contains("empty.jsonl"), "{e}");
    }
    // Every row malformed and skipped: still empty, and the message says why.
    std::fs::write(&data, "nope\n").expect("write");
    let e = start(dir.path(), &data, &["data.on_bad_row=skip"]).err().expect("empty corpus accepted").to_string();
    assert!(e.contains("empty corpus") && e.contains("skipped"), "{e}");
    // A folder without jsonl files.
    let folder = dir.path().join("corpus");
    std::fs::create_dir_all(folder.join("train/00")).expect("mkdir");
    let e = start(dir.path(), &folder, &[]).err().expect("empty folder accepted").to_string();
    assert!(e.contains("empty corpus") && e.contains("no .jsonl"), "{e}");
    // Rows too short to predict anything (no packing): one token each.
    std::fs::write(&data, "{\"ids\": [5]}\n{\"ids\": []}\n").expect("write");
    let mut t = start(dir.path(), &data, &[]).expect("rows exist");
    let e = t.step(&mut ()).expect_err("no trainable row").to_string();
    assert!(e.contains("two tokens"), "{e}");
    // Missing files and unknown corpus kinds (in a fresh folder: the run above left a logbook).
    let dir = tempfile::tempdir().expect("tempdir");
    let e = start(dir.path(), &dir.path().join("missing.jsonl"), &[]).err().expect("missing file").to_string();
    assert!(e.contains("missing.jsonl"), "{e}");
    let e =
        start(dir.path(), std::path::Path::new("builtin:wikipedia"), &[]).err().expect("unknown builtin").to_string();
    assert!(e.contains("builtin:wikipedia"), "{e}");
}

#[test]
fn metaseq_folder_layout_with_valid_split() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("corpus");
    for (split, shard, n) in [("train", "00", 3), ("train", "01", 2), ("valid", "00", 2)] {
        let d = root.join(split).join(shard);
        std::fs::create_dir_all(&d).expect("mkdir");
        write_ids_jsonl(&d.join("part.jsonl"), &random_rows(n, 5, 10, n as u64));
    }
    let mut t = start(dir.path(), &root, &["run.eval_batches=2", "train.max_steps=2"]).expect("folder corpus");
    let s = t.run(&mut ()).expect("run");
    assert!(s.final_valid.is_some(), "valid/ was not picked up");
    assert!(s.final_valid.as_ref().map(|e| e.tokens).unwrap_or(0) > 0);
}

#[test]
fn a_used_run_folder_needs_resume_or_fresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d.jsonl");
    write_ids_jsonl(&data, &[train_ids()]);
    start(dir.path(), &data, &["train.max_steps=2"]).expect("first").run(&mut ()).expect("run");
    let e = start(dir.path(), &data, &[]).err().expect("reusing a run folder").to_string();
    assert!(e.contains("--resume") && e.contains("--fresh"), "{e}");
    let t =
        Trainer::new(config(dir.path(), &data, &[]), CpuBackend::new(), StartOptions { resume: false, fresh: true })
            .expect("fresh");
    assert_eq!(t.state().step, 0);
    assert!(!dir.path().join("run/checkpoints").exists());
    drop(t);
    // Resuming with a config that describes another model shape is refused.
    let mut t = Trainer::new(
        config(dir.path(), &data, &["train.max_steps=2"]),
        CpuBackend::new(),
        StartOptions { resume: false, fresh: true },
    )
    .expect("again");
    t.run(&mut ()).expect("run");
    let other = format!("model.init_from={}", fixture("galactica").display());
    let e = Trainer::new(
        config(dir.path(), &data, &[&other]),
        CpuBackend::new(),
        StartOptions { resume: true, fresh: false },
    )
    .err()
    .expect("shape change on resume")
    .to_string();
    assert!(e.contains("model shape"), "{e}");
}
