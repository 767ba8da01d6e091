//! `opt-rs checkpoint reshard`: rewrite a checkpoint at another parallel layout.
//!
//! - a training checkpoint (`RUN/checkpoints/step_N`, one-process or sharded by `[parallel]`):
//!   parameters and AdamW moments move to `--tp M --fsdp K` tensor by tensor
//!   (`opt_dist::train::reshard`); `--tp 1 --fsdp 1` gives the one-process form;
//! - a tensor-parallel model folder (`model-tpXX-of-YY.safetensors`): re-sliced at `--tp M`
//!   (`opt_dist::checkpoint::reshard`; `opt-rs dist reshard` is the same command).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

#[derive(clap::Args)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    cmd: CheckpointCmd,
}

#[derive(clap::Subcommand)]
enum CheckpointCmd {
    /// Rewrite a training checkpoint (params + optimizer state) or a tensor-parallel model
    /// folder at another layout. Resume the result with the same `--set parallel.tp=M
    /// --set parallel.fsdp=K` (after moving it into the run's checkpoints/ folder).
    Reshard(ReshardArgs),
}

#[derive(clap::Args)]
pub struct ReshardArgs {
    /// Checkpoint folder written at the old layout.
    pub src: PathBuf,
    /// New folder to write.
    pub dst: PathBuf,
    /// New tensor-parallel degree.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// New fully-sharded degree (training checkpoints only).
    #[arg(long, default_value_t = 1)]
    pub fsdp: usize,
}

pub fn run(a: CheckpointArgs) -> Result<()> {
    match a.cmd {
        CheckpointCmd::Reshard(r) => reshard(&r),
    }
}

pub fn reshard(a: &ReshardArgs) -> Result<()> {
    let what = format!("resharding {} to tp = {}, fsdp = {}", a.src.display(), a.tp, a.fsdp);
    if is_training_checkpoint(&a.src) {
        opt_dist::train::reshard(&a.src, &a.dst, a.tp, a.fsdp).context(what)?;
    } else {
        if a.fsdp != 1 {
            bail!(
                "{}: --fsdp applies to training checkpoints (with trainer.json); a model folder only splits by --tp",
                a.src.display()
            );
        }
        opt_dist::checkpoint::reshard(&a.src, &a.dst, a.tp).context(what)?;
    }
    println!("wrote {} at tp = {}, fsdp = {}", a.dst.display(), a.tp, a.fsdp);
    Ok(())
}

fn is_training_checkpoint(dir: &Path) -> bool {
    dir.join("trainer.json").is_file()
}
