//! Stand-in for the CUDA backend when semoe is built without the `cuda` feature: the same API,
//! whose constructors fail with "built without CUDA support".

use super::Precision;
use crate::error::{Error, Result};

pub(crate) fn no_cuda(what: &str) -> Error {
    Error::Backend {
        backend: "cuda",
        detail: format!("{what}: semoe was built without CUDA support; rebuild with `--features cuda`"),
    }
}

/// A CUDA device. This build has no CUDA support, so [`CudaDevice::open`] always fails.
#[derive(Debug)]
pub struct CudaDevice {
    _private: (),
}

impl CudaDevice {
    /// Always an error: this build of semoe has no CUDA support.
    pub fn open(ordinal: usize) -> Result<Self> {
        Err(no_cuda(&format!("cannot open GPU {ordinal}")))
    }

    /// Number of visible CUDA devices: none in this build.
    pub fn count() -> usize {
        0
    }

    /// Always an error saying why none can be seen: this build has no CUDA support.
    pub fn visible() -> Result<usize> {
        Err(no_cuda("cannot count the GPUs"))
    }

    /// The device's name.
    pub fn name(&self) -> String {
        String::new()
    }
}

/// Always an error: this build cannot compile CUDA kernels.
pub fn compile_kernels() -> Result<String> {
    Err(no_cuda("cannot compile the CUDA kernels"))
}

/// A GPU's stream, cuBLAS handle and kernels. This build has no CUDA support: [`Gpu::new`]
/// always fails.
pub struct Gpu {
    _private: (),
}

impl Gpu {
    /// Always an error: this build has no CUDA support.
    pub fn new(_device: &CudaDevice, _precision: Precision) -> Result<std::sync::Arc<Self>> {
        Err(no_cuda("cannot open a GPU"))
    }

    /// Always an error: this build has no CUDA support.
    pub fn budgeted(
        _device: &CudaDevice,
        _precision: Precision,
        _device_budget: Option<u64>,
    ) -> Result<std::sync::Arc<Self>> {
        Err(no_cuda("cannot open a GPU"))
    }

    /// Unreachable in this build.
    pub fn memory(&self) -> Result<Option<super::GpuMemory>> {
        Err(no_cuda("cannot read a GPU's memory"))
    }

    /// The GPU's name.
    pub fn name(&self) -> &str {
        ""
    }

    /// Unreachable in this build.
    pub fn synchronize(&self) -> Result<()> {
        Err(no_cuda("cannot wait for a GPU"))
    }
}
