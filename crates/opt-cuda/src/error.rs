//! The crate's error type. Trait methods return `opt_tensor::TensorError`; everything device
//! specific becomes its `Device` variant with the message below.

use opt_tensor::TensorError;

/// Errors from starting or driving the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A shared library (driver, cuBLAS, NVRTC) could not be opened.
    #[error(
        "CUDA library {lib} not found ({hint}); searched the dynamic loader's path \
         (LD_LIBRARY_PATH, ldconfig) for {names}"
    )]
    MissingLibrary { lib: &'static str, hint: &'static str, names: String },
    /// The driver loaded but reports no device with this ordinal.
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice { ordinal: usize, count: i32 },
    /// A driver call failed.
    #[error("CUDA driver error in {op}: {msg}")]
    Driver { op: &'static str, msg: String },
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {op}: {msg}")]
    Blas { op: &'static str, msg: String },
    /// NVRTC rejected a kernel source (the log says why).
    #[error("NVRTC failed to compile {file} for {arch}: {msg}\n{log}")]
    Compile { file: String, arch: String, msg: String, log: String },
    /// A kernel launch was refused by a size limit (grid, 32-bit index) before reaching the GPU.
    #[error("{op}: {detail}")]
    Limit { op: &'static str, detail: String },
}

impl From<CudaError> for TensorError {
    fn from(e: CudaError) -> Self {
        TensorError::Device(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Map a cudarc driver error into ours, naming the operation.
pub(crate) fn drv(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::Driver { op, msg: format!("{e:?}") }
}
