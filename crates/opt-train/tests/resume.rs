//! `--resume` continues bit for bit: 12 uninterrupted steps and 6 + resume to 12 give
//! identical losses and weights, with dropout, shuffling, packing, gradient accumulation,
//! clipping, warmup and the guards all on, in every precision.

mod common;

use common::*;
use opt_tensor::CpuBackend;
use opt_train::trainer::{Observer, StartOptions, StepReport};
use opt_train::{TrainConfig, Trainer};

#[derive(Default)]
struct Losses(Vec<(u64, u64)>);

impl Observer for Losses {
    fn step(&mut self, r: &StepReport) {
        // Bits, so the comparison is exact.
        self.0.push((r.step, r.loss.to_bits()));
    }
}

fn cfg(dir: &std::path::Path, data: &std::path::Path, precision: &str, max_steps: u64, extra: &[&str]) -> TrainConfig {
    let p = format!("train.precision={precision}");
    let m = format!("train.max_steps={max_steps}");
    let mut sets = vec![
        "model.dropout=0.1",
        "model.attention_dropout=0.1",
        "data.packing=true",
        "data.shuffle=true",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.seed=11",
        "optim.clip_norm=1.0",
        "optim.lr=3e-3",
        "schedule.kind=linear",
        "schedule.warmup_steps=3",
        "schedule.end_lr=3e-4",
        "schedule.total_steps=12",
        "guards.enabled=true",
        "guards.warmup_steps=2",
        "fp16.scale_window=4",
        &p,
        &m,
    ];
    sets.extend_from_slice(extra);
    config(dir, data, &sets)
}

fn run(cfg: TrainConfig, resume: bool) -> (Vec<(u64, u64)>, Trainer<CpuBackend>) {
    let mut t = Trainer::new(cfg, CpuBackend::new(), StartOptions { resume, fresh: false }).expect("trainer");
    let mut obs = Losses::default();
    t.run(&mut obs).expect("run");
    (obs.0, t)
}

#[test]
fn six_plus_resume_equals_twelve() {
    for precision in ["f32", "bf16", "fp16"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("train.jsonl");
        write_ids_jsonl(&data, &random_rows(40, 5, 40, 3));
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).expect("mkdir");
        std::fs::create_dir_all(&b).expect("mkdir");

        let (full, ta) = run(cfg(&a, &data, precision, 12, &["run.checkpoint_every=4"]), false);
        let (first, _) = run(cfg(&b, &data, precision, 6, &[]), false);
        let (second, tb) = run(cfg(&b, &data, precision, 12, &[]), true);
        assert_eq!(full.len(), 12, "{precision}");
        assert_eq!((first.len(), second.len()), (6, 6), "{precision}");
        let resumed: Vec<(u64, u64)> = first.into_iter().chain(second).collect();
        let show = |v: &[(u64, u64)]| {
            v.iter().map(|&(s, l)| format!("{s}:{:.6}", f64::from_bits(l))).collect::<Vec<_>>().join(" ")
        };
        assert_eq!(
            full,
            resumed,
            "{precision}: losses differ\n  full    {}\n  resumed {}",
            show(&full),
            show(&resumed)
        );
        let (pa, pb) = (ta.master_params().expect("params"), tb.master_params().expect("params"));
        assert!(pa.iter().zip(&pb).all(|(x, y)| x.to_bits() == y.to_bits()), "{precision}: final weights differ");
        assert_eq!(ta.state(), tb.state(), "{precision}: trainer state differs");
        // Dropout was really on: a second uninterrupted run with another seed differs.
        let c = dir.path().join("c");
        std::fs::create_dir_all(&c).expect("mkdir");
        let (other, _) = run(cfg(&c, &data, precision, 12, &["train.seed=12"]), false);
        assert_ne!(other, full, "{precision}: the seed changes nothing");
        // The loss went down over 12 steps.
        let l = |v: &(u64, u64)| f64::from_bits(v.1);
        assert!(l(&full[11]) < l(&full[0]), "{precision}: loss did not fall: {}", show(&full));
    }
}

#[test]
fn resume_log_and_plot_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("train.jsonl");
    write_ids_jsonl(&data, &random_rows(40, 5, 40, 3));
    run(cfg(dir.path(), &data, "f32", 6, &[]), false);
    run(cfg(dir.path(), &data, "f32", 12, &[]), true);
    let rows = logbook(dir.path());
    let steps: Vec<u64> =
        rows.iter().filter(|r| r["kind"] == "train").map(|r| r["step"].as_u64().expect("step")).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<u64>>());
    assert_eq!(events(dir.path(), "resume").len(), 1);
    for r in rows.iter().filter(|r| r["kind"] == "train") {
        for k in ["loss", "lr", "grad_norm", "tokens_per_s", "mfu"] {
            assert!(r[k].is_number(), "{k} missing in {r}");
        }
        assert!(r["mfu"].as_f64().unwrap_or(-1.0) >= 0.0);
    }
    let svg = std::fs::read_to_string(dir.path().join("run/loss.svg")).expect("loss.svg");
    assert!(svg.contains("<polyline"), "plot has no curve");
    // The saved config is the effective one and loads back.
    let saved = TrainConfig::load(Some(&dir.path().join("run/config.toml")), &[]).expect("saved config");
    assert_eq!(saved.train.max_steps, 12);
}
