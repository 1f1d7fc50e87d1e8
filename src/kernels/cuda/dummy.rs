//! Stand-in for the CUDA backend when semoe is built without the `cuda` feature.

use crate::error::{Error, Result};

/// A CUDA device. This build has no CUDA support, so [`CudaDevice::open`] always fails.
#[derive(Debug)]
pub struct CudaDevice {
    _private: (),
}

impl CudaDevice {
    /// Always an error: this build of semoe has no CUDA support.
    pub fn open(ordinal: usize) -> Result<Self> {
        Err(Error::Backend {
            backend: "cuda",
            detail: format!(
                "cannot open GPU {ordinal}: semoe was built without CUDA support; rebuild with `--features cuda`"
            ),
        })
    }

    /// Number of visible CUDA devices: none in this build.
    pub fn count() -> usize {
        0
    }

    /// The device's name.
    pub fn name(&self) -> String {
        String::new()
    }
}
