//! opt-tensor: dtypes, the kernel boundary ([`Backend`]) and its CPU implementation.
//!
//! The model crate is written against [`Backend`]; [`cpu::CpuBackend`] is the reference
//! implementation (the `gemm` crate + rayon), and a CUDA backend implements the same trait.

pub mod backend;
pub mod cpu;
pub mod dtype;
pub mod quant;
pub mod rng;

pub use backend::{Activation, AdamW, AttnDims, Backend, Buffer, Dropout, Gemm, View, ViewMut};
pub use cpu::{CpuBackend, CpuBuf};
pub use dtype::DType;
pub use quant::Int8Matrix;

/// Errors from a backend (allocation, device failures, shape mismatches a caller could cause).
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("unsupported dtype {dtype:?} for {op}")]
    DType { op: &'static str, dtype: DType },
    #[error("device error: {0}")]
    Device(String),
    #[error("{op} is not supported on the {backend} backend")]
    Unsupported { op: &'static str, backend: String },
}

pub type Result<T> = std::result::Result<T, TensorError>;
