//! The CPU backend: the reference implementation of every kernel.

use half::{bf16, f16};

use crate::backend::Buffer;
use crate::DType;

/// A host buffer of one dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum CpuBuf {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Buffer for CpuBuf {
    fn len(&self) -> usize {
        match self {
            CpuBuf::F32(v) => v.len(),
            CpuBuf::BF16(v) => v.len(),
            CpuBuf::F16(v) => v.len(),
        }
    }
    fn dtype(&self) -> DType {
        match self {
            CpuBuf::F32(_) => DType::F32,
            CpuBuf::BF16(_) => DType::BF16,
            CpuBuf::F16(_) => DType::F16,
        }
    }
}

/// The CPU backend. Kernels run on rayon's global pool.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}
