//! opt-dist: training and serving OPT across processes, applied to `opt-model` from outside
//! (torchtitan style: the model file has no collective calls; see `opt_model::parallel`).
//!
//! - [`comm`]: the [`Communicator`] trait, and the single-process [`comm::SelfComm`];
//! - [`tcp`]: a TCP rendezvous communicator for torchrun/Slurm-style launches without MPI;
//! - `mpi` (feature `mpi`): OpenMPI, for `mpirun -np N`;
//! - `nccl` (feature `nccl`): NCCL through cudarc, its unique id shared over another communicator;
//! - [`launch`]: which of these the environment asks for;
//! - [`plan`]: `[parallel] tp, fsdp, dp`, validation, the rank mesh and the Megatron weight split;
//! - [`tensor_parallel`]: `parallelize`, the hooks the model calls;
//! - [`sharded`]: FSDP/ZeRO (whole-slice or per-layer ZeRO-3) and data-parallel training steps
//!   over the flat parameter buffer;
//! - [`train`]: opt-train's trainer run sharded ([`train::MeshParallel`] implements its
//!   `Parallel` hooks over a [`Mesh`]), and [`train::reshard`] for its sharded checkpoints;
//! - [`checkpoint`]: per-rank tensor-parallel model shards and resharding;
//! - [`perf`]: the analytical step-time model.

pub mod checkpoint;
pub mod comm;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod perf;
pub mod plan;
pub mod sharded;
pub mod tcp;
pub mod tensor_parallel;
pub mod train;

pub use comm::{Communicator, ReduceOp, SelfComm};
pub use plan::{Mesh, ParallelPlan};
pub use sharded::{ShardedTrainer, StepReport, TrainHp};
pub use tensor_parallel::{parallelize, TpHooks};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A `[parallel]` setting that does not fit the world or the model; `key` names it.
    #[error("parallel.{key}: {detail}")]
    Config { key: &'static str, detail: String },
    /// A peer that closed its connection, timed out or sent something unexpected.
    #[error("rank {rank}: {detail}")]
    Peer { rank: usize, detail: String },
    #[error("rendezvous at {addr}: {detail}")]
    Rendezvous { addr: String, detail: String },
    #[error("launch environment: {0}")]
    Env(String),
    #[error("collective {op}: {detail}")]
    Collective { op: &'static str, detail: String },
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error(transparent)]
    Model(#[from] opt_model::ModelError),
    #[error(transparent)]
    Tensor(#[from] opt_tensor::TensorError),
    #[error(transparent)]
    Checkpoint(#[from] opt_checkpoint::CheckpointError),
    #[error(transparent)]
    Train(#[from] opt_train::TrainError),
}

impl From<DistError> for opt_train::TrainError {
    fn from(e: DistError) -> Self {
        match e {
            DistError::Config { key, detail } => {
                opt_train::TrainError::Config { key: format!("parallel.{key}"), detail }
            }
            DistError::Train(t) => t,
            other => opt_train::TrainError::Parallel(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, DistError>;
