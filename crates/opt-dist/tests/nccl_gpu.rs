//! The NCCL engine on a real GPU (feature `nccl`; `#[ignore]`d: needs a CUDA GPU and libnccl,
//! run by bench/gpu/run.sh on the GPU machine): a one-rank NCCL communicator initialises, its
//! collectives run on device buffers, and the sharded trainer on the CUDA backend with NCCL as
//! every group's communicator reproduces the PyTorch parity fixture's AdamW steps.
#![cfg(feature = "nccl")]

mod common;

use std::sync::Arc;

use common::*;
use opt_dist::nccl::NcclComm;
use opt_dist::{parallelize, Communicator, Mesh, ParallelPlan, ReduceOp, SelfComm, ShardedTrainer};
use opt_model::OptModel;
use opt_tensor::DType;

fn nccl_world() -> Arc<dyn Communicator> {
    match NcclComm::new(0, Arc::new(SelfComm)) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("NCCL did not initialise on GPU 0: {e}"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU and libnccl"]
fn nccl_one_rank_collectives() {
    let w = nccl_world();
    assert_eq!((w.rank(), w.size()), (0, 1));
    let mut x = vec![1.5f32, -2.0, 3.25];
    w.all_reduce(&mut x, ReduceOp::Sum).expect("all_reduce");
    assert_eq!(x, [1.5, -2.0, 3.25]);
    let mut g = vec![0f32; 3];
    w.all_gather(&x, &mut g).expect("all_gather");
    assert_eq!(g, x);
    let mut r = vec![0f32; 3];
    w.reduce_scatter(&x, &mut r).expect("reduce_scatter");
    assert_eq!(r, x);
    let mut b = vec![7.0f32, 8.0];
    w.broadcast(&mut b, 0).expect("broadcast");
    assert_eq!(b, [7.0, 8.0]);
    assert_eq!(w.describe(), "nccl 0/1");
}

#[test]
#[ignore = "needs a CUDA GPU and libnccl"]
fn nccl_one_rank_train_steps_match_torch() {
    train_steps_match_torch(false);
}

/// The same with the layers streamed (ZeRO-3 on one rank: every layer gathered from the one
/// shard, its gradient reduced into it).
#[test]
#[ignore = "needs a CUDA GPU and libnccl"]
fn nccl_one_rank_zero3_train_steps_match_torch() {
    train_steps_match_torch(true);
}

fn train_steps_match_torch(zero3: bool) {
    let r = Reference::open();
    let be = match opt_cuda::CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => panic!("needs a CUDA GPU: {e}"),
    };
    let model = OptModel::from_folder(be, &fixture("pre_ln"), DType::F32).expect("pre_ln on cuda");
    let plan = ParallelPlan { tp: 1, fsdp: 1, dp: 1 };
    plan.validate(1, &model.cfg).expect("plan");
    let mesh = Mesh::new(nccl_world(), plan).expect("mesh");
    let model = parallelize(model, mesh.tp.clone()).expect("parallelize");
    let mut t = ShardedTrainer::new(model, mesh, r.hp()).expect("trainer");
    if zero3 {
        t = t.streaming_layers().expect("ZeRO-3");
    }
    let ids = r.ids("train_ids");
    let (want, norms) = (r.f32s("adamw_clip_losses"), r.f32s("adamw_clip_grad_norms"));
    for i in 0..5 {
        let rep = t.train_step(&ids, 1).expect("step");
        let d = (rep.loss as f32 - want[i]).abs();
        assert!(d <= 1e-4, "step {i}: loss {} vs torch {} (Δ {d:e})", rep.loss, want[i]);
        let dn = (rep.grad_norm as f32 - norms[i]).abs() / norms[i];
        assert!(dn <= 1e-4, "step {i}: grad norm {} vs torch {}", rep.grad_norm, norms[i]);
        eprintln!("step {i}: loss {:.6} (torch {:.6}), grad norm {:.6}", rep.loss, want[i], rep.grad_norm);
    }
}
