//! opt-train's real trainer run sharded (`Trainer::new_parallel` + `MeshParallel`), ranks as
//! threads over the TCP engine: per-step losses equal the one-process run's (f32, clipping on),
//! a sharded run resumes bit for bit at its layout, checkpoints reshard between layouts (and to
//! the one-process form) exactly, and bad layouts are errors naming the key.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{fixture, run_threads};
use opt_dist::train::{reshard, MeshParallel};
use opt_dist::{Communicator, Mesh, ParallelPlan};
use opt_model::{LogitsMode, OptModel, ParamLayout};
use opt_tensor::{Backend, Buffer, CpuBackend, DType};
use opt_train::trainer::{Observer, StartOptions, StepReport};
use opt_train::{TrainConfig, TrainError, Trainer};

#[derive(Default)]
struct Steps(Vec<(f64, f64)>);

impl Observer for Steps {
    fn step(&mut self, r: &StepReport) {
        self.0.push((r.loss, r.grad_norm));
    }
}

/// Random id rows (a fixed LCG), `{"ids": [...]}` per line.
fn write_data(path: &Path) {
    let mut x = 12345u64;
    let mut text = String::new();
    for _ in 0..32 {
        let mut row = vec![2u32];
        for _ in 0..16 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            row.push(4 + ((x >> 33) % 500) as u32);
        }
        text.push_str(&format!("{}\n", serde_json::json!({ "ids": row })));
    }
    std::fs::write(path, text).expect("write data");
}

/// The pre_ln fixture trained on packed random rows: batch 4, clipping at 0.5 (below the
/// gradient norms here, so it acts on every step), linear warmup, no dropout.
fn config(run: &Path, data: &Path, plan: ParallelPlan, max_steps: u64, extra: &[String]) -> TrainConfig {
    let mut sets: Vec<String> = vec![
        format!("model.init_from={}", fixture("pre_ln").display()),
        "model.dropout=0.0".into(),
        "model.attention_dropout=0.0".into(),
        format!("data.train={}", data.display()),
        "data.valid=\"\"".into(),
        "data.seq_len=16".into(),
        "data.packing=true".into(),
        "data.shuffle=true".into(),
        "optim.lr=3e-3".into(),
        "optim.clip_norm=0.5".into(),
        "schedule.kind=linear".into(),
        "schedule.warmup_steps=2".into(),
        "schedule.total_steps=6".into(),
        "train.batch_size=4".into(),
        "train.grad_accum=1".into(),
        format!("train.max_steps={max_steps}"),
        "guards.enabled=false".into(),
        format!("run.dir={}", run.display()),
        "run.checkpoint_every=2".into(),
        "run.keep_last=10".into(),
        "run.log_every=1".into(),
        "run.eval_every=0".into(),
        "run.eval_batches=0".into(),
        "sample.prompts=[]".into(),
        format!("parallel.tp={}", plan.tp),
        format!("parallel.fsdp={}", plan.fsdp),
        format!("parallel.dp={}", plan.dp),
    ];
    sets.extend_from_slice(extra);
    TrainConfig::load(None, &sets).unwrap_or_else(|e| panic!("config: {e}"))
}

fn single(cfg: TrainConfig, resume: bool) -> Vec<(f64, f64)> {
    let mut t = Trainer::new(cfg, CpuBackend::new(), StartOptions { resume, fresh: false }).expect("trainer");
    let mut obs = Steps::default();
    t.run(&mut obs).expect("run");
    obs.0
}

fn trainer(world: Arc<dyn Communicator>, cfg: TrainConfig, resume: bool) -> opt_train::Result<Trainer<CpuBackend>> {
    let p = &cfg.parallel;
    let plan = ParallelPlan { tp: p.tp, fsdp: p.fsdp, dp: p.dp };
    let mesh = Mesh::new(world, plan)?;
    let par = Box::new(MeshParallel::new(mesh));
    Trainer::new_parallel(cfg, CpuBackend::new(), StartOptions { resume, fresh: false }, Some(par))
}

/// Every rank's per-step (loss, grad norm).
fn sharded(cfg: TrainConfig, resume: bool) -> Vec<Vec<(f64, f64)>> {
    let n = cfg.parallel.world();
    run_threads(n, move |w| {
        let mut t = trainer(w, cfg.clone(), resume).expect("trainer");
        let mut obs = Steps::default();
        t.run(&mut obs).expect("run");
        obs.0
    })
}

fn max_loss_diff(a: &[(f64, f64)], b: &[(f64, f64)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x.0 - y.0).abs()).fold(0.0, f64::max)
}

fn ck(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step_{step:07}"))
}

#[test]
fn sharded_losses_match_one_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("train.jsonl");
    write_data(&data);
    let one = single(config(&dir.path().join("one"), &data, ParallelPlan::default(), 4, &[]), false);
    assert_eq!(one.len(), 4);
    assert!(one.iter().all(|&(_, n)| n > 0.5), "clipping must act: norms {one:?}");
    for (tp, fsdp, dp) in [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2)] {
        let plan = ParallelPlan { tp, fsdp, dp };
        let run = dir.path().join(format!("tp{tp}fsdp{fsdp}dp{dp}"));
        let ranks = sharded(config(&run, &data, plan, 4, &[]), false);
        for (r, steps) in ranks.iter().enumerate() {
            // Ranks agree bit for bit: they drive identical guards and schedules.
            assert_eq!(steps, &ranks[0], "{plan:?}: rank {r} differs from rank 0");
        }
        let d = max_loss_diff(&ranks[0], &one);
        assert!(d <= 1e-4, "{plan:?}: losses {:?} vs one process {one:?} (max Δ {d:e})", ranks[0]);
        eprintln!("{plan:?}: 4 losses within {d:e} of one process");
        for (a, b) in ranks[0].iter().zip(&one) {
            assert!((a.1 - b.1).abs() <= 1e-4 * b.1, "{plan:?}: grad norm {} vs {}", a.1, b.1);
        }
        // Only rank 0 wrote the logbook: one train row per step.
        let log = std::fs::read_to_string(run.join("logbook.jsonl")).expect("logbook");
        assert_eq!(log.lines().filter(|l| l.contains("\"kind\":\"train\"")).count(), 4, "{plan:?}");
        // Each shard wrote its file; rank 0 the shared ones.
        let c = ck(&run, 4);
        assert!(c.join("parallel.json").is_file() && c.join("trainer.json").is_file());
        let shards = std::fs::read_dir(&c)
            .expect("ls")
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().starts_with("shard-")));
        assert_eq!(shards.count(), tp * fsdp, "{plan:?}");
    }
    // ZeRO-2 (the whole slice kept gathered, layers copied out of it) gives the same losses.
    let zero2 = ["parallel.reshard_after_forward=false".to_string()];
    for (tp, fsdp) in [(1, 2), (2, 2)] {
        let plan = ParallelPlan { tp, fsdp, dp: 1 };
        let ranks = sharded(config(&dir.path().join(format!("zero2-tp{tp}fsdp{fsdp}")), &data, plan, 4, &zero2), false);
        let d = max_loss_diff(&ranks[0], &one);
        assert!(d <= 1e-4, "reshard_after_forward = false, {plan:?}: losses {:?} vs {one:?} (max Δ {d:e})", ranks[0]);
        eprintln!("reshard_after_forward = false, {plan:?}: 4 losses within {d:e} of one process");
    }
    // Gradient accumulation: 2 micro-batches of 2 rows, one row per data rank each.
    let accum = ["train.grad_accum=2".to_string()];
    let one = single(config(&dir.path().join("one-accum"), &data, ParallelPlan::default(), 4, &accum), false);
    let plan = ParallelPlan { tp: 2, fsdp: 2, dp: 1 };
    let ranks = sharded(config(&dir.path().join("accum"), &data, plan, 4, &accum), false);
    let d = max_loss_diff(&ranks[0], &one);
    assert!(d <= 1e-4, "grad_accum = 2, {plan:?}: losses {:?} vs {one:?} (max Δ {d:e})", ranks[0]);
    eprintln!("grad_accum = 2, {plan:?}: 4 losses within {d:e} of one process");
}

/// ZeRO-3 (the default with fsdp > 1): each rank's model holds the non-layer parameters and one
/// layer slot, not its slice; evaluation and the end-of-run samples stream the layers too and
/// agree with ZeRO-2, which keeps the slice gathered (sampling with a fixed seed: greedy
/// picks `</s>` first on this random model).
#[test]
fn zero3_holds_one_layer_and_evaluates_and_samples() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("train.jsonl");
    write_data(&data);
    let plan = ParallelPlan { tp: 2, fsdp: 2, dp: 1 };
    let extra = |zero3: bool| -> Vec<String> {
        vec![
            format!("parallel.reshard_after_forward={zero3}"),
            format!("data.valid={}", data.display()),
            "run.eval_batches=2".into(),
            "run.eval_every=2".into(),
            // Ids below the fixture's 512-token vocabulary: " the", ",", " and", " of".
            "sample.prompts=[\" the, and of\"]".into(),
            "sample.temperature=1.0".into(),
            "sample.top_k=50".into(),
            "sample.max_new_tokens=6".into(),
        ]
    };
    let mut out = Vec::new();
    for zero3 in [true, false] {
        let cfg = config(&dir.path().join(format!("z{zero3}")), &data, plan, 4, &extra(zero3));
        let res = run_threads(4, move |w| {
            let mut t = trainer(w, cfg.clone(), false).expect("trainer");
            let slice = ParamLayout::sharded(&t.model().cfg, 2).total();
            let held = t.model().params.len();
            let streamed = t.model().layout.slot.is_some();
            let s = t.run(&mut Steps::default()).expect("run");
            (slice, held, streamed, s.final_valid.expect("eval").loss, s.samples)
        });
        for (slice, held, streamed, _, _) in &res {
            // Both modes compute on a streamed model (ZeRO-2 copies layers out of its gathered
            // slice instead of gathering them), so the gradient is never held whole.
            assert!(*streamed);
            let layer = ParamLayout::sharded(&res_cfg(), 2).layer_range(0).map(|(a, b)| b - a).unwrap_or(0);
            let layers = res_cfg().num_hidden_layers;
            assert_eq!(*held, slice - (layers - 1) * layer, "the model holds the slice less all layers but one");
        }
        assert!(res.iter().all(|r| r.3 == res[0].3 && r.4 == res[0].4), "ranks agree");
        eprintln!("reshard_after_forward = {zero3}: eval loss {}, samples {:?}", res[0].3, res[0].4);
        out.push((res[0].3, res[0].4.clone()));
    }
    assert!((out[0].0 - out[1].0).abs() <= 1e-5, "eval loss: ZeRO-3 {} vs ZeRO-2 {}", out[0].0, out[1].0);
    assert_eq!(out[0].1, out[1].1, "greedy samples");
    assert!(!out[0].1[0].1.is_empty(), "a continuation was sampled");
}

/// A random start (no `init_from`): each rank draws only its window and what its model holds
/// (`metaseq_init_range`), and the run still follows the one-process run from the same seed.
#[test]
fn random_init_sharded_matches_one_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("train.jsonl");
    write_data(&data);
    let extra = |more: &str| -> Vec<String> {
        vec!["model.init_from=\"\"".into(), "model.preset=tiny".into(), "train.seed=5".into(), more.into()]
    };
    let one =
        single(config(&dir.path().join("one"), &data, ParallelPlan::default(), 3, &extra("run.log_every=1")), false);
    for (tp, fsdp, zero3) in [(2, 2, true), (1, 2, false), (2, 1, true)] {
        let plan = ParallelPlan { tp, fsdp, dp: 1 };
        let run = dir.path().join(format!("r{tp}{fsdp}{zero3}"));
        let ranks =
            sharded(config(&run, &data, plan, 3, &extra(&format!("parallel.reshard_after_forward={zero3}"))), false);
        let d = max_loss_diff(&ranks[0], &one);
        assert!(d <= 1e-4, "{plan:?} zero3={zero3}: losses {:?} vs {one:?} (max Δ {d:e})", ranks[0]);
        eprintln!("random init, {plan:?}, reshard_after_forward = {zero3}: 3 losses within {d:e} of one process");
    }
}

fn res_cfg() -> opt_model::OptConfig {
    opt_model::OptConfig::from_path(&fixture("pre_ln")).expect("config")
}

#[test]
fn sharded_resume_is_bit_exact() {
    // Every precision (fp16 exercises the loss scaler's cross-rank overflow vote), with dropout
    // on (per-data-rank masks) and gradient accumulation.
    // ZeRO-3 (the default) in every precision, ZeRO-2 in f32.
    for (precision, zero3) in [("f32", true), ("bf16", true), ("fp16", true), ("f32", false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("train.jsonl");
        write_data(&data);
        let plan = ParallelPlan { tp: 2, fsdp: 2, dp: 1 };
        let extra = |more: &[&str]| -> Vec<String> {
            let mut v = vec![
                format!("parallel.reshard_after_forward={zero3}"),
                format!("train.precision={precision}"),
                "model.dropout=0.1".into(),
                "train.grad_accum=2".into(),
                "fp16.scale_window=2".into(),
            ];
            v.extend(more.iter().map(|s| s.to_string()));
            v
        };
        let a = dir.path().join("a");
        let full = sharded(config(&a, &data, plan, 6, &extra(&[])), false);
        let b = dir.path().join("b");
        let first = sharded(config(&b, &data, plan, 3, &extra(&["run.checkpoint_every=0"])), false);
        let second = sharded(config(&b, &data, plan, 6, &extra(&[])), true);
        let resumed: Vec<(f64, f64)> = first[0].iter().chain(&second[0]).copied().collect();
        let bits = |v: &[(f64, f64)]| v.iter().map(|x| (x.0.to_bits(), x.1.to_bits())).collect::<Vec<_>>();
        assert_eq!(bits(&full[0]), bits(&resumed), "{precision}\n  full    {:?}\n  resumed {resumed:?}", full[0]);
        assert!(full[0].iter().all(|x| x.0.is_finite()), "{precision}: {:?}", full[0]);
        // The final shards are identical too.
        for t in 0..2 {
            for f in 0..2 {
                let name = format!("shard-tp{t:02}-fsdp{f:03}.safetensors");
                let x = std::fs::read(ck(&a, 6).join(&name)).expect("a");
                let y = std::fs::read(ck(&b, 6).join(&name)).expect("b");
                assert!(x == y, "{precision}: {name} differs");
            }
        }
    }
}

fn logits(model: &OptModel<CpuBackend>, ids: &[u32]) -> Vec<f32> {
    let l = model.forward(ids, 1, None, None, LogitsMode::All).expect("forward");
    model.backend.to_f32(l.v()).expect("logits")
}

#[test]
fn checkpoints_reshard_exactly_and_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("train.jsonl");
    write_data(&data);
    let plan = ParallelPlan { tp: 2, fsdp: 2, dp: 1 };
    let run = dir.path().join("a");
    let full = sharded(config(&run, &data, plan, 4, &[]), false);
    let src = ck(&run, 2);

    // tp2×fsdp2 → tp1 directly, and by way of tp1×fsdp2 and tp2×fsdp1: the same bytes.
    let direct = dir.path().join("direct");
    reshard(&src, &direct, 1, 1).expect("reshard to one process");
    let (hop1, hop2, back) = (dir.path().join("hop1"), dir.path().join("hop2"), dir.path().join("back"));
    reshard(&src, &hop1, 1, 2).expect("to tp1 fsdp2");
    reshard(&hop1, &hop2, 2, 1).expect("to tp2 fsdp1");
    reshard(&hop2, &back, 1, 1).expect("to one process");
    for f in ["model.safetensors", "exp_avg.safetensors", "exp_avg_sq.safetensors", "trainer.json"] {
        let (a, b) = (std::fs::read(direct.join(f)).expect("direct"), std::fs::read(back.join(f)).expect("back"));
        assert!(a == b, "{f} differs between the direct and the multi-hop reshard");
    }
    // A sharded layout, resharded back to itself, is the same files.
    let same = dir.path().join("same");
    reshard(&direct, &same, 2, 2).expect("to tp2 fsdp2");
    for t in 0..2 {
        for f in 0..2 {
            let name = format!("shard-tp{t:02}-fsdp{f:03}.safetensors");
            let (a, b) = (std::fs::read(src.join(&name)).expect("src"), std::fs::read(same.join(&name)).expect("same"));
            assert!(a == b, "{name} differs after tp2×fsdp2 → tp1 → tp2×fsdp2");
        }
    }

    // The one-process checkpoint is an HF folder whose logits equal the tp=2 model's.
    let ids: Vec<u32> = (0..12).map(|i| 2 + 37 * i % 500).collect();
    let one = OptModel::from_folder(CpuBackend::new(), &direct, DType::F32).expect("load tp1");
    // What `opt-rs export` reads from a sharded checkpoint: the same parameters.
    let (ccfg, cons) = opt_dist::train::consolidated_params(&src).expect("consolidate");
    assert_eq!(ccfg, one.cfg);
    assert!(cons == one.params_f32().expect("params"), "consolidated parameters differ from the reshard's");
    let want = logits(&one, &ids);
    let hop2c = hop2.clone();
    let tp_logits = run_threads(2, move |w| {
        let plan = ParallelPlan { tp: 2, fsdp: 1, dp: 1 };
        let mesh = Mesh::new(w, plan).expect("mesh");
        let info = opt_train::parallel::RankInfo {
            rank: mesh.world.rank(),
            world: 2,
            tp: 2,
            tp_rank: mesh.coords.tp,
            fsdp: 1,
            fsdp_rank: 0,
            dp: 1,
            dp_rank: 0,
        };
        let par = MeshParallel::new(mesh);
        let model_cfg = opt_model::OptConfig::from_path(&hop2c).expect("cfg");
        let n = opt_dist::train::slice_layout(&model_cfg, 2).total();
        let l = opt_train::checkpoint::load_shard(&hop2c, &info, n, (0, n)).expect("shard");
        let m = opt_train::parallel::Parallel::<CpuBackend>::model_from_slice(
            &par,
            CpuBackend::new(),
            model_cfg,
            &l.params,
            DType::F32,
            false,
        )
        .expect("model");
        logits(&m, &ids)
    });
    let d = tp_logits[0].iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d <= 1e-5, "tp=2 logits differ from the resharded one-process model by {d:e}");

    // The one-process checkpoint resumes in one process; the tp1×fsdp2 one at its layout.
    // Both continue the tp2×fsdp2 run's steps 3 and 4.
    let r1 = dir.path().join("r1");
    std::fs::create_dir_all(r1.join("checkpoints")).expect("mkdir");
    std::fs::rename(&direct, ck(&r1, 2)).expect("move");
    let cont = single(config(&r1, &data, ParallelPlan::default(), 4, &[]), true);
    let d1 = max_loss_diff(&cont, &full[0][2..]);
    assert!(d1 <= 1e-4, "one-process resume {cont:?} vs sharded {:?} (Δ {d1:e})", &full[0][2..]);
    let r2 = dir.path().join("r2");
    std::fs::create_dir_all(r2.join("checkpoints")).expect("mkdir");
    std::fs::rename(&hop1, ck(&r2, 2)).expect("move");
    let cont2 = sharded(config(&r2, &data, ParallelPlan { tp: 1, fsdp: 2, dp: 1 }, 4, &[]), true);
    let d2 = max_loss_diff(&cont2[0], &full[0][2..]);
    assert!(d2 <= 1e-4, "tp1×fsdp2 resume {:?} vs {:?} (Δ {d2:e})", cont2[0], &full[0][2..]);
    eprintln!("resharded resumes: one process Δ {d1:e}, tp1×fsdp2 Δ {d2:e}; tp=2 logits Δ {d:e}");
}

fn config_key(e: &TrainError) -> Option<&str> {
    match e {
        TrainError::Config { key, .. } => Some(key),
        _ => None,
    }
}

#[test]
fn bad_layouts_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("train.jsonl");
    write_data(&data);
    // tp = 2 in one process.
    let cfg = config(&dir.path().join("x"), &data, ParallelPlan { tp: 2, fsdp: 1, dp: 1 }, 2, &[]);
    let e = Trainer::new(cfg, CpuBackend::new(), StartOptions::default()).err().expect("error");
    assert_eq!(config_key(&e), Some("parallel.tp"), "{e}");
    // tp = 3 does not divide the 4 heads.
    let cfg = config(&dir.path().join("y"), &data, ParallelPlan { tp: 3, fsdp: 1, dp: 1 }, 2, &[]);
    let errs = run_threads(3, move |w| trainer(w, cfg.clone(), false).err().map(|e| e.to_string()));
    for e in errs {
        let e = e.expect("an error on every rank");
        assert!(e.contains("parallel.tp") && e.contains("4 attention heads"), "{e}");
    }
    // A product that is not the world size.
    let cfg = config(&dir.path().join("z"), &data, ParallelPlan { tp: 1, fsdp: 2, dp: 1 }, 2, &[]);
    let errs = run_threads(4, move |w| trainer(w, cfg.clone(), false).err().map(|e| e.to_string()));
    for e in errs {
        let e = e.expect("an error on every rank");
        assert!(e.contains("parallel.") && e.contains("4 ranks"), "{e}");
    }
    // A sharded checkpoint is refused by a one-process resume, with the reshard command.
    let run = dir.path().join("s");
    sharded(config(&run, &data, ParallelPlan { tp: 2, fsdp: 1, dp: 1 }, 2, &[]), false);
    let e = Trainer::new(
        config(&run, &data, ParallelPlan::default(), 4, &[]),
        CpuBackend::new(),
        StartOptions { resume: true, fresh: false },
    )
    .err()
    .expect("error");
    assert!(e.to_string().contains("opt-rs checkpoint reshard"), "{e}");
}

#[test]
fn nonfinite_steps_roll_back_every_rank_together() {
    // NaN gradients on tp rank 0 / fsdp rank 0 only, three steps in a row: the reduced norm is NaN
    // on every rank, every rank skips, then all roll back to the sharded step-2 checkpoint
    // together and finish.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("train.jsonl");
    write_data(&data);
    let plan = ParallelPlan { tp: 2, fsdp: 2, dp: 1 };
    let run = dir.path().join("g");
    let guards: Vec<String> = ["guards.enabled=true", "guards.warmup_steps=0", "guards.max_nonfinite=3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let cfg = config(&run, &data, plan, 6, &guards);
    let ranks = run_threads(4, move |w| {
        let rank = w.rank();
        let mut t = trainer(w, cfg.clone(), false).expect("trainer");
        let mut fired = 0;
        t.inject_faults(move |s| {
            (rank == 0 && s >= 3 && fired < 3).then(|| {
                fired += 1;
                opt_train::trainer::Fault::NanGradient
            })
        });
        let mut obs = Steps::default();
        t.run(&mut obs).expect("run");
        (obs.0.iter().map(|x| (x.0.to_bits(), x.1.to_bits())).collect::<Vec<_>>(), t.state().step, t.state().rollbacks)
    });
    for r in &ranks {
        assert_eq!(r, &ranks[0], "ranks disagree");
    }
    assert_eq!((ranks[0].1, ranks[0].2), (6, 1), "ends at step 6 after one rollback");
    let log = std::fs::read_to_string(run.join("logbook.jsonl")).expect("logbook");
    assert_eq!(log.matches("\"event\":\"nonfinite_skipped\"").count(), 2, "{log}");
    assert_eq!(log.matches("\"event\":\"rollback\"").count(), 1, "{log}");
}
