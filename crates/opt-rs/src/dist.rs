//! `opt-rs dist`: distributed tools. `dist model` prints the analytical step-time table for
//! OPT-175B (see `opt_dist::perf`); `dist reshard` is `opt-rs checkpoint reshard`.

use anyhow::Result;

#[derive(clap::Args)]
pub struct DistArgs {
    #[command(subcommand)]
    cmd: DistCmd,
}

#[derive(clap::Subcommand)]
enum DistCmd {
    /// Predicted step time and MFU of OPT-175B on 1024 A100s / H100s for several tp × fsdp.
    Model,
    /// The same as `opt-rs checkpoint reshard`: rewrite a tensor-parallel model folder or a
    /// training checkpoint at another `--tp` (and `--fsdp`); `--tp 1` consolidates.
    Reshard(crate::checkpoint::ReshardArgs),
}

pub fn run(a: DistArgs) -> Result<()> {
    match a.cmd {
        DistCmd::Model => {
            print!("{}", opt_dist::perf::table());
            Ok(())
        }
        DistCmd::Reshard(r) => crate::checkpoint::reshard(&r),
    }
}
