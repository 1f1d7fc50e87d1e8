//! The model on a GPU: the MoE layer ([`CudaMoeLayer`]) and the whole model with its optimizer
//! ([`CudaGpt`]), the arithmetic of `model::moe` and `model::pass` with every tensor in device
//! memory, on the kernels and products of `kernels::cuda` (docs/gpu-data-path.md). Without the
//! `cuda` feature a dummy twin with the same API whose constructors fail.

use crate::error::{Error, Result};
use crate::model::moe::{DropPolicy, MoeConfig};

#[cfg(feature = "cuda")]
mod gpt;
#[cfg(feature = "cuda")]
mod moe;
#[cfg(feature = "cuda")]
pub use gpt::CudaGpt;
#[cfg(feature = "cuda")]
pub use moe::{CudaMoeCache, CudaMoeLayer, DeviceBuffer};

#[cfg(not(feature = "cuda"))]
mod dummy;
#[cfg(not(feature = "cuda"))]
pub use dummy::{CudaGpt, CudaMoeCache, CudaMoeLayer, DeviceBuffer};

/// AdamW's first and second moments, one buffer per tensor in `Gpt::tensors` order (as
/// `optimizer::AdamW` keeps them).
pub type Moments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

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
