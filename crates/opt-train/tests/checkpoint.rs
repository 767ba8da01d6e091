//! Checkpoints: atomic writes (a crash mid-write leaves the previous checkpoint intact),
//! keep-last-K, HF export, and pre-tokenized token files.

mod common;

use common::*;
use opt_model::OptModel;
use opt_tensor::{CpuBackend, DType};
use opt_train::checkpoint::{self, Part, Snapshot};
use opt_train::trainer::{Observer, StartOptions, StepReport};
use opt_train::Trainer;

#[test]
fn crash_mid_write_leaves_previous_checkpoint_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d.jsonl");
    write_ids_jsonl(&data, &[train_ids()]);
    let mut t = trainer(config(dir.path(), &data, &["train.max_steps=10"]));
    steps(&mut t, 3);
    let good = t.save_checkpoint().expect("save");
    let good_params = t.master_params().expect("params");
    steps(&mut t, 3);
    let root = dir.path().join("run/checkpoints");
    let params = t.master_params().expect("params");
    let toml = t.config().to_toml().expect("toml");
    for files_written in 1..=4 {
        let mut fetch = |part: Part| Ok(if part == Part::Params { params.clone() } else { vec![0f32; params.len()] });
        let mut snap = Snapshot { state: t.state(), model_cfg: &t.model().cfg, config_toml: &toml, fetch: &mut fetch };
        let e = checkpoint::save_interrupted(&root, &mut snap, files_written).expect_err("simulated crash");
        assert!(e.to_string().contains("simulated crash"), "{e}");
        // The interrupted write is invisible: the newest checkpoint is still the good one.
        let all = checkpoint::list(&root).expect("list");
        assert_eq!(all.len(), 1);
        assert_eq!(checkpoint::latest(&root).expect("latest"), Some(good.clone()));
        let l = checkpoint::load(&good).expect("load");
        assert_eq!(l.state.step, 3);
        assert_eq!(l.params, good_params);
    }
    // A restarted run resumes from the good checkpoint; the next save sweeps the debris.
    drop(t);
    let mut t = Trainer::new(
        config(dir.path(), &data, &["train.max_steps=10"]),
        CpuBackend::new(),
        StartOptions { resume: true, fresh: false },
    )
    .expect("resume");
    assert_eq!(t.state().step, 3);
    assert_eq!(t.master_params().expect("params"), good_params);
    steps(&mut t, 1);
    t.save_checkpoint().expect("save");
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .expect("read_dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary folders left behind");
}

#[test]
fn keeps_the_last_k_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d.jsonl");
    write_ids_jsonl(&data, &[train_ids()]);
    let mut t =
        trainer(config(dir.path(), &data, &["train.max_steps=10", "run.checkpoint_every=2", "run.keep_last=2"]));
    #[derive(Default)]
    struct Count(usize);
    impl Observer for Count {
        fn step(&mut self, _: &StepReport) {
            self.0 += 1;
        }
    }
    let mut c = Count::default();
    t.run(&mut c).expect("run");
    assert_eq!(c.0, 10);
    let steps: Vec<u64> =
        checkpoint::list(&dir.path().join("run/checkpoints")).expect("list").into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![8, 10]);
    assert_eq!(events(dir.path(), "checkpoint").len(), 5);
}

#[test]
fn export_writes_a_loadable_hf_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d.jsonl");
    write_ids_jsonl(&data, &[train_ids()]);
    let mut t = trainer(config(dir.path(), &data, &["train.max_steps=3"]));
    t.run(&mut ()).expect("run");
    let master = t.master_params().expect("params");
    let out = dir.path().join("hf");
    opt_train::export::export_run(&dir.path().join("run"), None, &out, DType::F32).expect("export");
    let m = OptModel::from_folder(CpuBackend::new(), &out, DType::F32).expect("load export");
    assert_eq!(m.params_f32().expect("params"), master);
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The run's own tokenizer loads from the export.
    let tok = opt_tokenizer::OptTokenizer::from_dir(&out).expect("tokenizer");
    assert_eq!(tok.encode("Hello", true).expect("encode"), vec![2, 31414]);
    let bf = dir.path().join("hf16");
    opt_train::export::export_run(&dir.path().join("run"), Some(3), &bf, DType::BF16).expect("bf16 export");
    let e = opt_train::export::export_run(&dir.path().join("run"), Some(7), &bf, DType::F32)
        .expect_err("no step 7")
        .to_string();
    assert!(e.contains("step 7") && e.contains("available: 3"), "{e}");
}

/// A token file from `data prepare` trains exactly like the jsonl it came from.
#[test]
fn prepared_token_file_trains_like_its_jsonl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d.jsonl");
    let rows = random_rows(30, 3, 30, 5);
    let mut text: String = rows.iter().take(20).map(|r| format!("{}\n", serde_json::json!({ "ids": r }))).collect();
    text.push_str("{\"text\": \"Some text rows are tokenized on the fly.\"}\n");
    std::fs::write(&data, &text).expect("write");
    let tok = opt_tokenizer::OptTokenizer::bundled().expect("tokenizer");
    let tokfile = dir.path().join("d.tok");
    let err = opt_train::data::prepare(
        &[data.display().to_string()],
        &tokfile,
        &tok,
        512,
        opt_train::config::BadRowPolicy::Fail,
    )
    .expect_err("text tokens exceed the fixture's 512-token vocabulary");
    assert!(err.to_string().contains("512"), "{err}");
    let text: String = rows.iter().map(|r| format!("{}\n", serde_json::json!({ "ids": r }))).collect();
    std::fs::write(&data, &text).expect("write");
    let stats = opt_train::data::prepare(
        &[data.display().to_string()],
        &tokfile,
        &tok,
        512,
        opt_train::config::BadRowPolicy::Fail,
    )
    .expect("prepare");
    assert_eq!(stats.documents, 30);
    assert_eq!(stats.tokens, rows.iter().map(|r| r.len() as u64).sum::<u64>());
    let mut losses = Vec::new();
    for src in [&data, &tokfile] {
        let run = dir.path().join(src.extension().and_then(|e| e.to_str()).unwrap_or("x"));
        std::fs::create_dir_all(&run).expect("mkdir");
        let mut t = trainer(config(
            &run,
            src,
            &["data.packing=true", "data.shuffle=true", "train.batch_size=2", "train.max_steps=4"],
        ));
        losses.push(steps(&mut t, 4).iter().map(|r| r.loss.to_bits()).collect::<Vec<_>>());
    }
    assert_eq!(losses[0], losses[1]);
}
