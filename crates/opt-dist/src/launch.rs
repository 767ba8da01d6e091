//! Which communicator the launch environment asks for.
//!
//! - `mpirun` (OpenMPI sets `OMPI_COMM_WORLD_RANK/SIZE`): the MPI engine (feature `mpi`);
//! - torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or Slurm's
//!   `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, master from `MASTER_ADDR` or the
//!   first host of `SLURM_JOB_NODELIST` when it is a plain name): the TCP rendezvous;
//! - nothing: a single process.
//!
//! The environment is read once here, at the binary's edge, into a [`Launch`]; nothing below
//! reads environment variables.

use std::sync::Arc;
use std::time::Duration;

use crate::comm::{Communicator, SelfComm};
use crate::tcp::TcpComm;
use crate::{DistError, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Launch {
    Single,
    Mpi { rank: usize, size: usize, local_rank: usize },
    Tcp { rank: usize, size: usize, local_rank: usize, master: String },
}

fn num(get: &dyn Fn(&str) -> Option<String>, key: &str) -> Result<Option<usize>> {
    match get(key) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| DistError::Env(format!("{key}={v:?} is not a number"))),
    }
}

impl Launch {
    /// Read the launch from `get` (e.g. `|k| std::env::var(k).ok()`).
    pub fn detect(get: &dyn Fn(&str) -> Option<String>) -> Result<Launch> {
        if let (Some(rank), Some(size)) = (num(get, "OMPI_COMM_WORLD_RANK")?, num(get, "OMPI_COMM_WORLD_SIZE")?) {
            let local_rank = num(get, "OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0);
            if size <= 1 {
                return Ok(Launch::Single);
            }
            return Ok(Launch::Mpi { rank, size, local_rank });
        }
        let (rank, size, local_rank) = match (num(get, "RANK")?, num(get, "WORLD_SIZE")?) {
            (Some(r), Some(s)) => (r, s, num(get, "LOCAL_RANK")?.unwrap_or(0)),
            _ => match (num(get, "SLURM_PROCID")?, num(get, "SLURM_NTASKS")?) {
                (Some(r), Some(s)) => (r, s, num(get, "SLURM_LOCALID")?.unwrap_or(0)),
                _ => return Ok(Launch::Single),
            },
        };
        if size <= 1 {
            return Ok(Launch::Single);
        }
        let host = get("MASTER_ADDR")
            .or_else(|| {
                get("SLURM_JOB_NODELIST").filter(|l| !l.contains('[') && !l.contains(',')).map(|l| l.trim().to_string())
            })
            .ok_or_else(|| DistError::Env("MASTER_ADDR is not set (needed for a launch without MPI)".into()))?;
        let port = num(get, "MASTER_PORT")?.unwrap_or(29500);
        Ok(Launch::Tcp { rank, size, local_rank, master: format!("{host}:{port}") })
    }

    /// Open the world communicator. `timeout` bounds the rendezvous and every wait for a peer.
    pub fn connect(&self, timeout: Duration) -> Result<Arc<dyn Communicator>> {
        match self {
            Launch::Single => Ok(Arc::new(SelfComm)),
            Launch::Tcp { rank, size, master, .. } => {
                Ok(Arc::new(TcpComm::rendezvous(*rank, *size, master, None, timeout)?))
            }
            #[cfg(feature = "mpi")]
            Launch::Mpi { .. } => Ok(Arc::new(crate::mpi::MpiComm::world(timeout)?)),
            #[cfg(not(feature = "mpi"))]
            Launch::Mpi { .. } => Err(DistError::Env(
                "launched by mpirun, but this binary was built without the `mpi` feature (rebuild with \
                 `--features mpi`, or launch with torchrun-style RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
                    .into(),
            )),
        }
    }
}
