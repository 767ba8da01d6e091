//! Each stability guard and the fp16 loss scaler, provoked: non-finite gradients, a loss
//! spike, repeated spikes (rollback), exhausted rollbacks, fp16 overflow, loss-scale growth
//! and the minimum-scale stop.

mod common;

use common::*;
use opt_train::trainer::{Fault, StepOutcome};
use opt_train::TrainError;

fn pattern() -> Vec<u32> {
    (3..19).collect()
}

fn data_with(dir: &std::path::Path, rows: &[Vec<u32>]) -> std::path::PathBuf {
    let p = dir.join("train.jsonl");
    write_ids_jsonl(&p, rows);
    p
}

#[test]
fn nonfinite_gradient_skips_the_step() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_with(dir.path(), &[train_ids()]);
    let mut t = trainer(config(dir.path(), &data, &["guards.enabled=true", "train.max_steps=8"]));
    t.inject_faults(|s| (s == 3 || s == 4).then_some(Fault::NanGradient));
    let reps = steps(&mut t, 3);
    assert!(reps.iter().all(|r| r.outcome == StepOutcome::Applied));
    let before = t.master_params().expect("params");
    let skipped = steps(&mut t, 2);
    for r in &skipped {
        assert_eq!(r.outcome, StepOutcome::Skipped("nonfinite_skipped"));
        assert!(r.loss.is_finite() && r.grad_norm.is_nan());
    }
    assert_eq!(t.master_params().expect("params"), before, "a skipped step changed the weights");
    assert_eq!(t.state().step, 5);
    assert_eq!(t.state().updates, 3, "AdamW's step counter counts applied updates only");
    let after = steps(&mut t, 1);
    assert_eq!(after[0].outcome, StepOutcome::Applied);
    let ev = events(dir.path(), "nonfinite_skipped");
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[0]["step"], 4);
}

#[test]
fn repeated_nonfinite_rolls_back_with_lower_lr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_with(dir.path(), &[train_ids()]);
    let mut t =
        trainer(config(dir.path(), &data, &["guards.enabled=true", "guards.max_nonfinite=3", "train.max_steps=20"]));
    // Fail steps 6, 7 and 8 once each (the steps after the rollback are clean).
    let mut pending = vec![6u64, 7, 8];
    t.inject_faults(move |s| {
        let hit = pending.first() == Some(&s);
        if hit {
            pending.remove(0);
        }
        hit.then_some(Fault::NanGradient)
    });
    steps(&mut t, 5);
    let ck = t.save_checkpoint().expect("checkpoint");
    let at_ck = t.master_params().expect("params");
    let lr_before = t.lr_at(9);
    let reps = steps(&mut t, 4);
    assert_eq!(reps[0].outcome, StepOutcome::Applied);
    assert_eq!(reps[1].outcome, StepOutcome::Skipped("nonfinite_skipped"));
    assert_eq!(reps[2].outcome, StepOutcome::Skipped("nonfinite_skipped"));
    assert_eq!(reps[3].outcome, StepOutcome::RolledBack { to_step: 5 });
    assert_eq!(t.state().step, 5);
    assert_eq!(t.state().rollbacks, 1);
    assert_eq!(t.state().lr_factor, 0.5);
    assert_eq!(t.master_params().expect("params"), at_ck, "rollback did not restore {}", ck.display());
    assert!((t.lr_at(9) - 0.5 * lr_before).abs() < 1e-15);
    // Training goes on from there.
    assert!(steps(&mut t, 3).iter().all(|r| r.outcome == StepOutcome::Applied));
    let ev = events(dir.path(), "rollback");
    assert_eq!(ev.len(), 1);
    assert!(ev[0]["detail"].as_str().unwrap_or("").contains("rolled back to step 5"), "{}", ev[0]);
}

#[test]
fn loss_spike_skips_the_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rows = vec![pattern(); 30];
    rows.push(random_rows(1, 16, 16, 9).remove(0));
    rows.extend(vec![pattern(); 10]);
    let data = data_with(dir.path(), &rows);
    let mut t = trainer(config(
        dir.path(),
        &data,
        &[
            "guards.enabled=true",
            "guards.warmup_steps=10",
            "guards.spike_ratio=1.5",
            "optim.lr=1e-2",
            "train.max_steps=40",
        ],
    ));
    let reps = steps(&mut t, 30);
    assert!(reps.iter().all(|r| r.outcome == StepOutcome::Applied));
    assert!(reps[29].loss < 0.5 * reps[0].loss, "the pattern was not learned: {} → {}", reps[0].loss, reps[29].loss);
    let before = t.master_params().expect("params");
    let spike = steps(&mut t, 1).remove(0);
    assert_eq!(spike.outcome, StepOutcome::Skipped("spike_skipped"), "loss {} after {}", spike.loss, reps[29].loss);
    assert_eq!(t.master_params().expect("params"), before);
    assert_eq!(steps(&mut t, 1)[0].outcome, StepOutcome::Applied);
    let ev = events(dir.path(), "spike_skipped");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["step"], 31);
}

#[test]
fn repeated_spikes_roll_back_and_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rows = vec![pattern(); 30];
    rows.extend(random_rows(3, 16, 16, 9));
    rows.extend(vec![pattern(); 40]);
    let data = data_with(dir.path(), &rows);
    let mut t = trainer(config(
        dir.path(),
        &data,
        &[
            "guards.enabled=true",
            "guards.warmup_steps=10",
            "guards.spike_ratio=1.5",
            "guards.max_spikes=3",
            "guards.spike_window=50",
            "optim.lr=1e-2",
            "run.checkpoint_every=10",
            "train.max_steps=45",
        ],
    ));
    let summary = t.run(&mut ()).expect("run");
    assert_eq!(t.state().step, 45);
    assert_eq!(t.state().rollbacks, 1);
    assert_eq!(t.state().lr_factor, 0.5);
    assert_eq!(events(dir.path(), "spike_skipped").len(), 2);
    let rb = events(dir.path(), "rollback");
    assert_eq!(rb.len(), 1);
    assert_eq!(rb[0]["step"], 33);
    assert!(rb[0]["detail"].as_str().unwrap_or("").contains("rolled back to step 30"), "{}", rb[0]);
    // After the rollback it trains on the data after the spikes, at half the LR, and the
    // logbook shows steps 31.. again.
    let train_steps: Vec<u64> =
        logbook(dir.path()).iter().filter(|r| r["kind"] == "train").map(|r| r["step"].as_u64().unwrap_or(0)).collect();
    assert_eq!(train_steps.iter().filter(|&&s| s == 31).count(), 1, "skipped steps are not logged as train rows");
    assert!(train_steps.ends_with(&(31..=45).collect::<Vec<u64>>()));
    let lr_rows: Vec<f64> = logbook(dir.path())
        .iter()
        .filter(|r| r["kind"] == "train" && r["step"] == 40)
        .map(|r| r["lr"].as_f64().unwrap_or(0.0))
        .collect();
    assert_eq!(lr_rows, vec![0.5e-2]);
    assert!(summary.last_loss.unwrap_or(f64::NAN) < 1.0);
}

#[test]
fn exhausted_rollbacks_stop_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_with(dir.path(), &[train_ids()]);
    let mut t = trainer(config(
        dir.path(),
        &data,
        &["guards.enabled=true", "guards.max_nonfinite=2", "guards.max_rollbacks=1", "train.max_steps=20"],
    ));
    t.inject_faults(|s| (s >= 2).then_some(Fault::NanGradient));
    let e = t.run(&mut ()).expect_err("must diverge");
    assert!(matches!(e, TrainError::Diverged { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("max_rollbacks") && msg.contains("non-finite"), "{msg}");
    // The first rollback (to the initial weights: no checkpoint yet) happened and was logged.
    let rb = events(dir.path(), "rollback");
    assert_eq!(rb.len(), 1);
    assert!(rb[0]["detail"].as_str().unwrap_or("").contains("initial weights"), "{}", rb[0]);
}

#[test]
fn fp16_overflow_halves_the_scale_and_skips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_with(dir.path(), &[train_ids()]);
    // 2^20 × gradients of O(0.1) overflow f16 (max 65504); halving finds a scale that fits.
    let mut t =
        trainer(config(dir.path(), &data, &["train.precision=fp16", "fp16.init_scale=1048576", "train.max_steps=30"]));
    let reps = steps(&mut t, 30);
    let overflows: Vec<&opt_train::StepReport> =
        reps.iter().filter(|r| r.outcome == StepOutcome::Skipped("overflow")).collect();
    assert!(!overflows.is_empty(), "no overflow at scale 2^20");
    for w in reps.windows(2) {
        if w[0].outcome == StepOutcome::Skipped("overflow") {
            assert_eq!(w[1].loss_scale, w[0].loss_scale.map(|s| s / 2.0));
        }
    }
    let applied: Vec<_> = reps.iter().filter(|r| r.outcome == StepOutcome::Applied).collect();
    assert!(applied.len() >= 10);
    assert!(applied.last().map(|r| r.loss).unwrap_or(f64::NAN) < applied[0].loss, "fp16 training did not learn");
    assert_eq!(events(dir.path(), "overflow").len(), overflows.len());
    // The model computes with fp16 weights; the master copy stays f32.
    assert_eq!(opt_tensor::Buffer::dtype(&t.model().params), opt_tensor::DType::F16);
}

#[test]
fn fp16_scale_grows_after_clean_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_with(dir.path(), &[train_ids()]);
    let mut t =
        trainer(config(dir.path(), &data, &["train.precision=fp16", "fp16.scale_window=2", "train.max_steps=6"]));
    let scales: Vec<f64> = steps(&mut t, 6).iter().map(|r| r.loss_scale.unwrap_or(0.0)).collect();
    assert_eq!(scales, vec![4.0, 4.0, 8.0, 8.0, 16.0, 16.0]);
    assert_eq!(events(dir.path(), "loss_scale_up").len(), 3);
    let rows = logbook(dir.path());
    assert!(
        rows.iter().filter(|r| r["kind"] == "train").all(|r| r["loss_scale"].is_number()),
        "train rows carry loss_scale"
    );
}

#[test]
fn fp16_below_min_scale_stops_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_with(dir.path(), &[train_ids()]);
    let mut t = trainer(config(
        dir.path(),
        &data,
        &["train.precision=fp16", "fp16.init_scale=1048576", "fp16.min_scale=524288", "train.max_steps=5"],
    ));
    let e = t.run(&mut ()).expect_err("must stop");
    assert!(matches!(e, TrainError::LossScaleUnderflow { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("fp16.min_scale") && msg.contains("lower optim.lr"), "{msg}");
}

#[test]
fn bf16_computes_with_rounded_weights_and_f32_master() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = data_with(dir.path(), &[train_ids()]);
    let mut t = trainer(config(dir.path(), &data, &["train.precision=bf16", "train.max_steps=10"]));
    let reps = steps(&mut t, 10);
    assert!(reps[9].loss < reps[0].loss - 1.0, "bf16 did not learn: {} → {}", reps[0].loss, reps[9].loss);
    let master = t.master_params().expect("master");
    let model = t.model().params_f32().expect("model");
    assert_eq!(opt_tensor::Buffer::dtype(&t.model().params), opt_tensor::DType::BF16);
    let mut moved_off_grid = 0;
    for (m, w) in master.iter().zip(&model) {
        assert_eq!(half::bf16::from_f32(*m).to_f32(), *w, "compute weights are not the bf16 rounding of the master");
        moved_off_grid += (m != w) as usize;
    }
    assert!(moved_off_grid > master.len() / 2, "master weights are not kept in f32");
}
