//! The CUDA backend (cudarc, loaded at run time). Without the `cuda` feature this module is a dummy
//! twin with the same API whose constructors report that the build has no CUDA support.
//!
//! What exists: device discovery with clear errors ([`CudaDevice`]) and the MoE layer on one GPU
//! ([`CudaMoeLayer`]: cuBLAS products, NVRTC kernels for routing, dispatch, GELU, combine and their
//! backward; `semoe bench moe-layer --device cuda`). The NCCL all-to-all lives in
//! `net/collective/`. The rest of the model (attention, layer norm, embeddings, cross-entropy,
//! AdamW) still runs on the CPU only: `semoe train` has no GPU path yet (docs/gpu-data-path.md).

use crate::error::{Error, Result};
use crate::model::moe::{DropPolicy, MoeConfig};

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod gpt;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod moe;
#[cfg(feature = "cuda")]
pub use device::CudaDevice;
#[cfg(feature = "cuda")]
pub use gpt::CudaGpt;
#[cfg(feature = "cuda")]
pub use gpu::{compile_kernels, Gpu};
#[cfg(feature = "cuda")]
pub use moe::{CudaMoeCache, CudaMoeLayer, DeviceBuffer};

#[cfg(not(feature = "cuda"))]
mod dummy;
#[cfg(not(feature = "cuda"))]
pub use dummy::{compile_kernels, CudaDevice, CudaGpt, CudaMoeCache, CudaMoeLayer, DeviceBuffer, Gpu};

/// The precision of the GPU's matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Full float32 products (cuBLAS's default math).
    #[default]
    F32,
    /// TF32 tensor-core products (10-bit mantissa inputs, float32 sums): faster, wider tolerance.
    Tf32,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            other => Err(Error::config(format!(
                "precision must be \"f32\" or \"tf32\", got {other:?}"
            ))),
        }
    }
}

/// Whether the GPU layer supports `config`: everything the CPU layer does except the `probs` drop
/// policy (a per-expert sort by gate value, not written for the GPU yet).
pub fn check_moe_config(config: &MoeConfig) -> Result<()> {
    config.validate()?;
    if config.drop_policy == DropPolicy::Probs && !config.dropless {
        return Err(Error::config(
            "the CUDA MoE layer supports the \"position\" drop policy only (\"probs\" runs on the CPU)",
        ));
    }
    Ok(())
}
