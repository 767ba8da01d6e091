//! Distributed parity on one machine: ranks are threads joined by the TCP engine (the same
//! code runs as processes under `mpirun` in scripts/dist_tests.sh). Ground truth is the HF /
//! PyTorch trajectory in fixtures/pre_ln (5 AdamW steps, clip_grad_norm_ 1.0, f32).

mod common;

use common::*;
use opt_dist::ParallelPlan;

fn check_plan(tp: usize, fsdp: usize, dp: usize) {
    check_plan_with(tp, fsdp, dp, false)
}

fn check_plan_with(tp: usize, fsdp: usize, dp: usize, zero3: bool) {
    let plan = ParallelPlan { tp, fsdp, dp };
    let runs = run_threads(plan.world(), move |w| train_with(w, plan, zero3));
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
fn fsdp2_zero3_matches_torch() {
    check_plan_with(1, 2, 1, true);
}

#[test]
fn tp2_fsdp2_zero3_matches_torch() {
    check_plan_with(2, 2, 1, true);
}

#[test]
fn fsdp2_dp2_zero3_matches_torch() {
    check_plan_with(1, 2, 2, true);
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

/// Requests covering every decoding path of `Generator`: a batch of prompts of different lengths
/// (left padding, rows leaving the batch), seeded sampling with n > 1 (rows duplicated from the
/// prefill), best_of ranking and beam search (rows reordered every step).
fn generator_requests() -> Vec<opt_generate::GenerateRequest> {
    use opt_generate::{GenerateRequest, Prompt, SamplingParams};
    let prompts = || vec![Prompt::Ids(vec![2, 5, 9]), Prompt::Ids(vec![2, 7, 11, 13, 40, 41]), Prompt::Ids(vec![])];
    let base = SamplingParams { max_new_tokens: 10, logprobs: Some(2), ..SamplingParams::default() };
    vec![
        GenerateRequest::new(prompts(), SamplingParams { greedy: true, ..base.clone() }),
        GenerateRequest::new(
            prompts(),
            SamplingParams { temperature: Some(0.9), top_k: Some(40), n: 2, seed: Some(7), ..base.clone() },
        ),
        GenerateRequest::new(
            prompts(),
            SamplingParams { top_p: Some(0.9), n: 2, best_of: Some(3), seed: Some(1234), ..base.clone() },
        ),
        GenerateRequest::new(prompts(), SamplingParams { num_beams: 3, n: 2, ..base }),
    ]
}

#[test]
fn tp2_generator_equals_single_process() {
    use opt_generate::Generator;
    let single = load();
    let want: Vec<_> =
        generator_requests().iter().map(|r| Generator::new(&single, None).generate(r).expect("generate")).collect();
    let runs = run_threads(2, |w| {
        let m = opt_dist::tensor_parallel::load_shard_model(
            opt_tensor::CpuBackend::new(),
            &fixture("pre_ln"),
            opt_tensor::DType::F32,
            w,
        )
        .expect("shard");
        generator_requests()
            .iter()
            .map(|r| Generator::new(&m, None).generate(r).expect("tp generate"))
            .collect::<Vec<_>>()
    });
    for (rank, outs) in runs.iter().enumerate() {
        for (k, (got, want)) in outs.iter().zip(&want).enumerate() {
            assert_eq!(got.seed, want.seed, "rank {rank} request {k}");
            for (p, (g, w)) in got.prompts.iter().zip(&want.prompts).enumerate() {
                assert_eq!(g.choices.len(), w.choices.len());
                for (gc, wc) in g.choices.iter().zip(&w.choices) {
                    let at = format!("rank {rank} request {k} prompt {p} choice {}", wc.index);
                    assert_eq!(gc.token_ids, wc.token_ids, "{at}");
                    assert_eq!(gc.finish_reason, wc.finish_reason, "{at}");
                    assert!((gc.cumulative_logprob - wc.cumulative_logprob).abs() < 1e-3, "{at}");
                }
            }
        }
    }
    // Every rank made the same choices with the same bits (the logits are all-gathered).
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn load_shard_model_equals_parallelize() {
    // Streaming a rank's slice from the HF folder gives the parameters `parallelize` slices
    // from the whole model, bit for bit.
    for (a, b) in run_threads(2, |w| {
        let streamed = opt_dist::tensor_parallel::load_shard_model(
            opt_tensor::CpuBackend::new(),
            &fixture("pre_ln"),
            opt_tensor::DType::F32,
            w.clone(),
        )
        .expect("shard");
        let sliced = opt_dist::parallelize(load(), w).expect("parallelize");
        (streamed.params_f32().expect("params"), sliced.params_f32().expect("params"))
    }) {
        assert_eq!(a, b);
    }
}
