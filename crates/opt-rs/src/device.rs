//! `--device cpu|cuda[:N]`: which backend a command runs on.
//!
//! Commands are written once, generic over `B: Backend`, as a [`Job`]; [`run_on`] opens the
//! backend the device names and runs the job on it. A binary built without the `cuda` feature
//! accepts `--device cuda` and answers with a clear error telling how to build one that has it.

use std::fmt;
use std::str::FromStr;

use anyhow::Result;
use opt_tensor::{Backend, CpuBackend};

/// A compute device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend (the reference; rayon threads).
    #[default]
    Cpu,
    /// CUDA GPU with this ordinal (`cuda:N`).
    Cuda(usize),
    /// `cuda` without an ordinal: GPU 0 in a single process; in a multi-process launch
    /// (`mpirun`, torchrun, srun) the GPU of the rank's local index, one process per device.
    CudaLocal,
}

impl Device {
    /// The concrete device for this process: `cuda` becomes `cuda:LOCAL_RANK` under a
    /// multi-process launch (`get` reads the environment), `cuda:0` otherwise.
    pub fn resolve(self, get: &dyn Fn(&str) -> Option<String>) -> Result<Device> {
        use opt_dist::launch::Launch;
        Ok(match self {
            Device::CudaLocal => match Launch::detect(get)? {
                Launch::Single => Device::Cuda(0),
                Launch::Mpi { local_rank, .. } | Launch::Tcp { local_rank, .. } => Device::Cuda(local_rank),
            },
            d => d,
        })
    }
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::CudaLocal),
            _ => match s.strip_prefix("cuda:").or_else(|| s.strip_prefix("gpu:")) {
                Some(n) => n
                    .parse::<usize>()
                    .map(Device::Cuda)
                    .map_err(|_| format!("bad device ordinal in '{s}' (expected cuda:N with N = 0, 1, ...)")),
                None => Err(format!("unknown device '{s}' (expected cpu, cuda or cuda:N)")),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::CudaLocal => f.write_str("cuda"),
        }
    }
}

/// The `--device` option, to `#[command(flatten)]` into a command's arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where to run: cpu, cuda or cuda:N (cuda needs a binary built with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = clap::value_parser!(Device))]
    pub device: Device,
}

/// Work written once for any backend. (A closure cannot be generic over `B`, hence a trait.)
pub trait Job {
    type Output;
    fn run<B: Backend + 'static>(self, backend: B) -> Result<Self::Output>;
}

/// Open the backend `device` names and run `job` on it.
pub fn run_on<J: Job>(device: Device, job: J) -> Result<J::Output> {
    let device = device.resolve(&|k| std::env::var(k).ok())?;
    match device {
        Device::Cpu => job.run(CpuBackend::new()),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            use anyhow::Context;
            let be = opt_cuda::CudaBackend::new(n).with_context(|| format!("opening --device {device}"))?;
            let info = be.info();
            eprintln!(
                "device            {device}: {} ({}, {} SMs, {:.1} GiB)",
                info.name,
                info.arch,
                info.multiprocessors,
                info.total_memory_bytes as f64 / (1u64 << 30) as f64
            );
            job.run(be)
        }
        Device::CudaLocal => unreachable!("resolved above"),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => anyhow::bail!(
            "--device {device}: this opt-rs was built without CUDA support; \
             rebuild with `cargo build --release --features cuda` (no CUDA toolkit needed to build)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::CudaLocal));
        assert_eq!("CUDA:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert!("cuda:x".parse::<Device>().is_err());
        assert!("tpu".parse::<Device>().is_err());
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }

    /// One process per device: `--device cuda` under mpirun / torchrun picks the local rank's
    /// GPU; an explicit ordinal is kept; a single process uses GPU 0.
    #[test]
    fn cuda_follows_the_local_rank() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let single = env(&[]);
        assert_eq!(Device::CudaLocal.resolve(&single).expect("single"), Device::Cuda(0));
        let mpi =
            env(&[("OMPI_COMM_WORLD_RANK", "5"), ("OMPI_COMM_WORLD_SIZE", "8"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1")]);
        assert_eq!(Device::CudaLocal.resolve(&mpi).expect("mpi"), Device::Cuda(1));
        let tr = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "3"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]);
        assert_eq!(Device::CudaLocal.resolve(&tr).expect("torchrun"), Device::Cuda(3));
        assert_eq!(Device::Cuda(2).resolve(&mpi).expect("explicit"), Device::Cuda(2));
        assert_eq!(Device::Cpu.resolve(&mpi).expect("cpu"), Device::Cpu);
    }

    struct Name;
    impl Job for Name {
        type Output = String;
        fn run<B: Backend + 'static>(self, backend: B) -> Result<String> {
            Ok(backend.name())
        }
    }

    #[test]
    fn runs_on_cpu_and_reports_missing_cuda() {
        assert_eq!(run_on(Device::Cpu, Name).unwrap(), "cpu");
        // Without the feature, or without a GPU: an error, not a panic.
        if let Err(e) = run_on(Device::Cuda(4096), Name) {
            assert!(!format!("{e:#}").is_empty());
        }
    }
}
