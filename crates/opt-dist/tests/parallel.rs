//! Distributed parity on one machine: ranks are threads joined by the TCP engine (the same
//! code runs as processes under `mpirun` in scripts/dist_tests.sh). Ground truth is the HF /
//! PyTorch trajectory in fixtures/pre_ln (5 AdamW steps, clip_grad_norm_ 1.0, f32).

mod common;

use common::*;
use opt_dist::ParallelPlan;

fn check_plan(tp: usize, fsdp: usize, dp: usize) {
    let plan = ParallelPlan { tp, fsdp, dp };
    let runs = run_threads(plan.world(), move |w| train(w, plan));
    let r = Reference::open();
    let (want, norms) = (r.f32s("adamw_clip_losses"), r.f32s("adamw_clip_grad_norms"));
    for (rank, reps) in runs.iter().enumerate() {
        for (i, rep) in reps.iter().enumerate() {
            let d = (rep.loss as f32 - want[i]).abs();
            assert!(
                d <= 1e-4,
                "tp={tp} fsdp={fsdp} dp={dp} rank {rank} step {i}: loss {} vs {} (Δ {d:e})",
                rep.loss,
                want[i]
            );
            let dn = (rep.grad_norm as f32 - norms[i]).abs() / norms[i];
            assert!(dn <= 1e-4, "rank {rank} step {i}: grad norm {} vs {}", rep.grad_norm, norms[i]);
        }
    }
}

#[test]
fn single_process_matches_torch() {
    check_plan(1, 1, 1);
}

#[test]
fn tp2_matches_torch() {
    check_plan(2, 1, 1);
}

#[test]
fn fsdp2_matches_torch() {
    check_plan(1, 2, 1);
}

#[test]
fn tp2_fsdp2_matches_torch() {
    check_plan(2, 2, 1);
}

#[test]
fn dp2_matches_torch() {
    check_plan(1, 1, 2);
}

#[test]
fn tp2_greedy_equals_single_process() {
    let single = load();
    let (want_ids, want_logits) = (greedy(&single, 8), logits(&single));
    let r = Reference::open();
    assert_eq!(want_ids, r.ids("greedy_ids")[r.ids("greedy_prompt").len()..].to_vec()[..8].to_vec());
    for (ids, l) in run_threads(2, |w| tp_generate(w, 8)) {
        assert_eq!(ids, want_ids);
        assert!(max_diff(&l, &want_logits) < 1e-4);
    }
}

#[test]
fn tp2_checkpoint_reloads_and_reshards_to_tp1() {
    let dir = tempfile::tempdir().expect("tmp");
    let d2 = dir.path().join("tp2");
    let d = d2.clone();
    let reloaded = run_threads(2, move |w| checkpoint_roundtrip(w, &d));
    let want = logits(&load());
    assert!(max_diff(&reloaded[0], &want) < 1e-4);
    assert_eq!(reloaded[0], reloaded[1]);
    let d1 = dir.path().join("tp1");
    opt_dist::checkpoint::reshard(&d2, &d1, 1).expect("reshard");
    let back = logits(&load_tp1(&d1));
    assert_eq!(back, logits(&load()), "tp2 → tp1 must reproduce the original weights exactly");
    assert!(max_diff(&back, &reloaded[0]) < 1e-4);
}
