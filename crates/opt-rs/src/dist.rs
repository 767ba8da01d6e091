//! `opt-rs dist`: distributed tools. `dist model` prints the analytical step-time table for
//! OPT-175B (see `opt_dist::perf`); `dist reshard` rewrites a tensor-parallel checkpoint at
//! another `tp`.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct DistArgs {
    #[command(subcommand)]
    cmd: DistCmd,
}

#[derive(clap::Subcommand)]
enum DistCmd {
    /// Predicted step time and MFU of OPT-175B on 1024 A100s / H100s for several tp × fsdp.
    Model,
    /// Rewrite a tensor-parallel checkpoint folder (model-tpXX-of-YY.safetensors +
    /// parallel.json) at another tensor-parallel degree (`--tp 1` consolidates).
    Reshard {
        /// Folder written at the old layout.
        src: PathBuf,
        /// Folder to write.
        dst: PathBuf,
        /// New tensor-parallel degree.
        #[arg(long)]
        tp: usize,
    },
}

pub fn run(a: DistArgs) -> Result<()> {
    match a.cmd {
        DistCmd::Model => {
            print!("{}", opt_dist::perf::table());
            Ok(())
        }
        DistCmd::Reshard { src, dst, tp } => {
            opt_dist::checkpoint::reshard(&src, &dst, tp)
                .with_context(|| format!("resharding {} to tp = {tp}", src.display()))?;
            println!("wrote {} at tp = {tp}", dst.display());
            Ok(())
        }
    }
}
