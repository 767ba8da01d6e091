//! opt-cuda: the CUDA implementation of opt-tensor's [`Backend`](opt_tensor::Backend).
//!
//! - [`CudaBackend`] owns a context, one stream, a cuBLAS handle and the kernels of
//!   `kernels/*.cu`, compiled by NVRTC for the device's architecture at start-up and cached on
//!   disk ([`compile`]).
//! - The CUDA libraries are opened at run time (cudarc's dynamic loading): building needs no
//!   toolkit, and without a driver or GPU [`CudaBackend::new`] returns an error, never panics.
//! - Every kernel is checked against its CPU twin by `tests/kernels.rs` (on a GPU machine:
//!   `cargo test -p opt-cuda -- --ignored`); `tests/ptx.rs` compiles every kernel for sm_90 with
//!   NVRTC alone, which CI runs without a GPU (`scripts/check_ptx.sh`).

mod backend;
mod blas;
mod check;
pub mod compile;
mod error;

pub use backend::{device_count, CudaBackend, CudaBuf, CudaOptions, DeviceInfo};
pub use error::CudaError;
