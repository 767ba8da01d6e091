//! `--tp N` for `opt-rs generate` and `opt-rs serve`: tensor-parallel inference over the
//! processes of an `mpirun -np N` (or torchrun-style `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/
//! `MASTER_PORT`) launch, so that a model larger than one process's memory runs.
//!
//! Every rank loads only its slice of the weights (`opt_dist::tensor_parallel::load_shard_model`,
//! one tensor at a time), and every rank makes the same model calls in the same order; the
//! collectives happen inside the model's tensor-parallel hooks (logits are all-gathered, so every
//! rank sees the same bits).
//!
//! - generate: rank 0 reads and tokenizes the prompts, draws the seed if none was given, and
//!   broadcasts the request; every rank then runs the same `Generator` in lockstep (same
//!   logits, same seed, same choices). Only rank 0 prints.
//! - serve: rank 0 runs the HTTP server and the engine, broadcasting each model call before it
//!   runs it (`opt_serve::Server::new_tp_leader`); the other ranks repeat them
//!   (`opt_serve::follow`) until the engine says `Shutdown`.
//!
//! Failures: a rank that fails ends with an error; its peers see a closed connection (TCP) or are
//! stopped by `mpirun`, and every wait for a peer is bounded by [`PEER_TIMEOUT`] (opt-dist's
//! watchdog for MPI), so nothing hangs.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use opt_dist::launch::Launch;
use opt_dist::{Communicator, DistError, ParallelPlan};
use opt_model::{OptConfig, OptModel};
use opt_tensor::{CpuBackend, DType};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Bound on the rendezvous and on every wait for a peer. A serving leader sends a heartbeat
/// well within it while idle.
const PEER_TIMEOUT: Duration = Duration::from_secs(300);

/// This process's place in a tensor-parallel launch.
pub struct TpGroup {
    launch: Launch,
    pub comm: Arc<dyn Communicator>,
}

/// What rank 0 broadcasts before work starts: the value, or why it could not produce it.
#[derive(Serialize, Deserialize)]
enum Shared<T> {
    Ok(T),
    Failed(String),
}

impl TpGroup {
    /// Check `--tp` against the launch and the model, then connect the ranks. `None`: a plain
    /// single process (`--tp 1`, no multi-process launch).
    pub fn join(tp: usize, model_dir: Option<&Path>, preset: Option<&str>) -> Result<Option<TpGroup>> {
        let launch = Launch::detect(&|k| std::env::var(k).ok()).context("reading the launch environment")?;
        let world = match &launch {
            Launch::Single => 1,
            Launch::Mpi { size, .. } | Launch::Tcp { size, .. } => *size,
        };
        if tp == 0 {
            bail!("--tp 0: must be at least 1");
        }
        if tp == 1 && world == 1 {
            return Ok(None);
        }
        if tp == 1 {
            bail!(
                "launched as {world} processes, but --tp is 1: pass --tp {world} to split the model over them \
                 (tensor parallelism is the only multi-process mode of this command)"
            );
        }
        if world == 1 {
            bail!(
                "--tp {tp}: needs {tp} processes, one per slice; launch with `mpirun -np {tp} opt-rs ...` (a build \
                 with --features mpi) or torchrun-style RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"
            );
        }
        if world != tp {
            bail!("--tp {tp}: {world} processes were launched; tensor parallelism needs exactly {tp}");
        }
        // Before connecting: every rank refuses a bad split the same way.
        let cfg = match (model_dir, preset) {
            (Some(dir), _) => {
                OptConfig::from_path(dir).with_context(|| format!("reading the config of {}", dir.display()))?
            }
            (None, Some(p)) => OptConfig::preset(p)?,
            (None, None) => bail!("--model is required"),
        };
        ParallelPlan { tp, fsdp: 1, dp: 1 }.validate(tp, &cfg).map_err(flag_error(tp))?;
        let comm = launch.connect(PEER_TIMEOUT).context("connecting the tensor-parallel ranks")?;
        Ok(Some(TpGroup { launch, comm }))
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn is_leader(&self) -> bool {
        self.rank() == 0
    }

    /// This rank's slice of the model: streamed from `dir`, or (benchmarks) sliced from a
    /// random preset built whole.
    pub fn load(&self, dir: Option<&Path>, preset: Option<&str>, dtype: DType) -> Result<OptModel<CpuBackend>> {
        let be = CpuBackend::new();
        match (dir, preset) {
            (Some(dir), _) => opt_dist::tensor_parallel::load_shard_model(be, dir, dtype, self.comm.clone())
                .map_err(flag_error(self.comm.size()))
                .with_context(|| format!("loading rank {}'s slice of {}", self.rank(), dir.display())),
            (None, Some(p)) => {
                let cfg = OptConfig::preset(p)?;
                let std = cfg.init_std;
                let whole = OptModel::new_random(be, cfg, dtype, std, 0)?;
                Ok(opt_dist::parallelize(whole, self.comm.clone())?)
            }
            (None, None) => bail!("--model is required"),
        }
    }

    /// Rank 0 runs `make` and every rank gets its result (a failure on rank 0 ends every rank,
    /// the others saying that rank 0 failed).
    pub fn share<T: Serialize + DeserializeOwned>(&self, make: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut bytes = Vec::new();
        let mut failed = None;
        if self.is_leader() {
            let shared = match make() {
                Ok(v) => Shared::Ok(v),
                Err(e) => {
                    let msg = crate::describe(&e);
                    failed = Some(e);
                    Shared::Failed(msg)
                }
            };
            bytes = serde_json::to_vec(&shared).context("encoding the request for the other ranks")?;
        }
        self.comm.broadcast_bytes(&mut bytes, 0).context("sharing the request with the other ranks")?;
        if let Some(e) = failed {
            return Err(e);
        }
        match serde_json::from_slice(&bytes).context("decoding rank 0's request")? {
            Shared::Ok(v) => Ok(v),
            Shared::Failed(msg) => bail!("rank 0 failed: {msg}"),
        }
    }

    /// The serving leader's link to the followers. `done` closes once the engine has told them
    /// to stop (see [`TpGroup::finish`]).
    pub fn followers(&self) -> (Box<dyn opt_serve::Followers>, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        (Box::new(CommFollowers { comm: self.comm.clone(), _done: tx }), rx)
    }

    /// Run a serving follower until the leader stops.
    pub fn follow<B: opt_tensor::Backend>(&self, model: OptModel<B>, tok: &opt_tokenizer::OptTokenizer) -> Result<()> {
        let comm = self.comm.clone();
        let rank = self.rank();
        opt_serve::follow(model, tok, || {
            let mut b = Vec::new();
            comm.broadcast_bytes(&mut b, 0).map(|_| b).map_err(|e| e.to_string())
        })
        .with_context(|| format!("rank {rank}"))
    }

    /// End of the command: under MPI, finalize after a success (a failed rank exits without it,
    /// so that it never waits for peers; mpirun then ends the job).
    pub fn finish(self, out: Result<()>) -> Result<()> {
        #[cfg(feature = "mpi")]
        if out.is_ok() && matches!(self.launch, Launch::Mpi { .. }) {
            drop(self.comm);
            opt_dist::mpi::MpiComm::finalize().context("MPI_Finalize")?;
        }
        #[cfg(not(feature = "mpi"))]
        let _ = self.launch;
        out
    }
}

/// The request every rank runs: text prompts tokenized here (as `Generator` would), and a seed
/// drawn when none was given, so that no rank draws its own.
pub fn resolve(
    mut req: opt_generate::GenerateRequest,
    tok: Option<&opt_tokenizer::OptTokenizer>,
) -> Result<opt_generate::GenerateRequest> {
    use opt_generate::Prompt;
    if let Some(t) = tok {
        for p in &mut req.prompts {
            if let Prompt::Text(s) = p {
                *p = Prompt::Ids(t.encode(s, true)?);
            }
        }
    }
    if matches!(req.params.validate()?, opt_generate::params::Mode::Sample { .. }) {
        req.params.seed.get_or_insert_with(opt_generate::sample::fresh_seed);
    }
    Ok(req)
}

/// `parallel.tp: ...` from opt-dist, phrased for this command's `--tp N` flag.
fn flag_error(tp: usize) -> impl Fn(DistError) -> anyhow::Error {
    move |e| match e {
        DistError::Config { key: "tp", detail } => anyhow::anyhow!("--tp {tp}: {detail}"),
        other => other.into(),
    }
}

/// The leader's broadcast over the group's communicator.
struct CommFollowers {
    comm: Arc<dyn Communicator>,
    /// Dropped with the engine, after its `Shutdown` went out.
    _done: mpsc::Sender<()>,
}

impl opt_serve::Followers for CommFollowers {
    fn broadcast(&mut self, msg: &[u8]) -> std::result::Result<(), String> {
        self.comm.broadcast_bytes(&mut msg.to_vec(), 0).map_err(|e| e.to_string())
    }
    fn heartbeat(&self) -> Duration {
        PEER_TIMEOUT / 30
    }
}
