//! CUDA device discovery through cudarc with dynamic loading: the crate builds and runs without
//! CUDA installed, and every entry point checks that the driver library is present before calling it
//! (cudarc panics on a missing library otherwise).

use crate::error::{Error, Result};
use std::sync::Arc;

/// An opened CUDA device (a primary context on one GPU).
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<cudarc::driver::CudaContext>,
    ordinal: usize,
}

pub(crate) fn cuda_error(detail: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda",
        detail: detail.into(),
    }
}

impl CudaDevice {
    /// Open GPU `ordinal`. Fails with a clear error when the CUDA driver library is missing, no GPU is
    /// visible, or the ordinal is out of range.
    pub fn open(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(cuda_error(format!(
                "cannot open GPU {ordinal}: the CUDA driver library (libcuda.so) was not found"
            )));
        }
        let count = Self::count();
        if ordinal >= count {
            return Err(cuda_error(format!("cannot open GPU {ordinal}: {count} GPU(s) visible")));
        }
        let ctx = cudarc::driver::CudaContext::new(ordinal)
            .map_err(|e| cuda_error(format!("cannot open GPU {ordinal}: {e}")))?;
        Ok(CudaDevice { ctx, ordinal })
    }

    /// Number of visible CUDA devices (0 when the driver library is missing).
    pub fn count() -> usize {
        if !driver_present() {
            return 0;
        }
        cudarc::driver::CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .unwrap_or(0)
    }

    /// The device's context (its primary context, shared by every user of this GPU).
    pub(crate) fn context(&self) -> &Arc<cudarc::driver::CudaContext> {
        &self.ctx
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| format!("cuda:{}", self.ordinal))
    }
}

fn driver_present() -> bool {
    // SAFETY: the probe dlopens each candidate name of the CUDA driver library and closes it again,
    // which runs that library's initialisers: sound as long as what is installed under the driver's
    // name is the driver (the trust every CUDA program places in it). No symbol is looked up or
    // called, and a panic inside the probe is caught.
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}
