//! The distributed parity checks as a program, for `mpirun -np N` (or torchrun-style env vars):
//!
//!   dist_check train <tp> <fsdp> <dp>   5 clipped AdamW steps vs the PyTorch losses (|Δ| ≤ 1e-4)
//!   dist_check generate                 tp = world greedy ids/logits vs one process
//!   dist_check checkpoint <dir>         tp = world shards: save, reload, reshard to tp = 1
//!   dist_check die                      rank 1 exits; the job must end with an error, not hang
//!
//! Exits non-zero on any mismatch; scripts/dist_tests.sh runs it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::ExitCode;
use std::time::Duration;

use common::*;
use opt_dist::launch::Launch;
use opt_dist::ParallelPlan;

fn run() -> Result<String, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let launch = Launch::detect(&|k| std::env::var(k).ok()).map_err(|e| e.to_string())?;
    let world = launch.connect(Duration::from_secs(120)).map_err(|e| e.to_string())?;
    let num = |i: usize| -> Result<usize, String> {
        args.get(i).ok_or(format!("argument {i} missing"))?.parse().map_err(|e| format!("argument {i}: {e}"))
    };
    let rank = world.rank();
    match args.first().map(String::as_str) {
        Some("train") => {
            let plan = ParallelPlan { tp: num(1)?, fsdp: num(2)?, dp: num(3)? };
            // `train TP FSDP DP zero3` streams the layers (ZeRO-3).
            let zero3 = args.get(4).map(String::as_str) == Some("zero3");
            let reps = train_with(world, plan, zero3);
            let r = Reference::open();
            let want = r.f32s("adamw_clip_losses");
            let mut worst = 0f32;
            for (rep, w) in reps.iter().zip(&want) {
                worst = worst.max((rep.loss as f32 - w).abs());
            }
            if worst > 1e-4 {
                return Err(format!(
                    "losses {:?} vs {want:?} (max Δ {worst:e})",
                    reps.iter().map(|r| r.loss).collect::<Vec<_>>()
                ));
            }
            let mode = if zero3 { " (ZeRO-3)" } else { "" };
            Ok(format!("{plan:?}{mode}: 5 losses match PyTorch, max |Δ| = {worst:e}"))
        }
        Some("generate") => {
            let (ids, l) = tp_generate(world, 8);
            let single = load();
            if ids != greedy(&single, 8) {
                return Err(format!("greedy ids {ids:?} differ from one process"));
            }
            let d = max_diff(&l, &logits(&single));
            if d > 1e-4 {
                return Err(format!("logits differ by {d:e}"));
            }
            Ok(format!("greedy ids {ids:?} equal one process; logits max |Δ| = {d:e}"))
        }
        Some("checkpoint") => {
            let dir = std::path::PathBuf::from(args.get(1).ok_or("checkpoint needs a folder")?);
            let tp_dir = dir.join("tp");
            let reloaded = checkpoint_roundtrip(world.clone(), &tp_dir);
            let want = logits(&load());
            let d = max_diff(&reloaded, &want);
            if d > 1e-4 {
                return Err(format!("reloaded logits differ by {d:e}"));
            }
            if rank == 0 {
                let one = dir.join("tp1");
                opt_dist::checkpoint::reshard(&tp_dir, &one, 1).map_err(|e| e.to_string())?;
                if logits(&load_tp1(&one)) != want {
                    return Err("resharded tp = 1 logits differ".into());
                }
            }
            world.barrier().map_err(|e| e.to_string())?;
            Ok(format!("tp = {} checkpoint reloads (max |Δ| = {d:e}) and reshards to tp = 1 exactly", world.size()))
        }
        Some("die") => {
            // Rank 1 dies; the others must not hang in their next collective.
            if rank == 1 {
                std::process::exit(7);
            }
            world.all_reduce(&mut [1.0], opt_dist::ReduceOp::Sum).map_err(|e| e.to_string())?;
            Err("a collective with a dead rank returned normally".into())
        }
        _ => Err("usage: dist_check train <tp> <fsdp> <dp> | generate | checkpoint <dir>".into()),
    }
    .map(|m| format!("rank {rank} [{}]: {m}", launch_name(&launch)))
}

fn launch_name(l: &Launch) -> &'static str {
    match l {
        Launch::Single => "single",
        Launch::Mpi { .. } => "mpi",
        Launch::Tcp { .. } => "tcp",
    }
}

fn main() -> ExitCode {
    let out = run();
    #[cfg(feature = "mpi")]
    let _ = opt_dist::mpi::MpiComm::finalize();
    match out {
        Ok(m) => {
            println!("{m}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dist_check: {e}");
            ExitCode::FAILURE
        }
    }
}
