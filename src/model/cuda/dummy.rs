//! Stand-in for the GPU model code when semoe is built without the `cuda` feature: the same API,
//! whose constructors fail with "built without CUDA support".

use crate::error::Result;
use crate::kernels::cuda::{no_cuda, CudaDevice, Gpu, Precision};
use crate::model::moe::{MoeConfig, MoeParams, MoeStats};

/// A float buffer in a GPU's memory (none can exist in this build).
pub struct DeviceBuffer {
    _private: (),
}

impl DeviceBuffer {
    /// Number of elements.
    pub fn len(&self) -> usize {
        0
    }

    /// Whether the buffer has no element.
    pub fn is_empty(&self) -> bool {
        true
    }
}

/// The forward pass's cache (none can exist in this build).
pub struct CudaMoeCache {
    /// The auxiliary load-balancing loss.
    pub l_aux: f32,
    /// The router z-loss.
    pub z_loss: f32,
    /// Per-expert loads and drops.
    pub stats: MoeStats,
}

impl CudaMoeCache {
    /// Rows per expert in the padded expert batch.
    pub fn slots_per_expert(&self) -> usize {
        0
    }
}

/// The MoE layer on a GPU. This build has no CUDA support: [`CudaMoeLayer::new`] always fails.
pub struct CudaMoeLayer {
    config: MoeConfig,
}

impl CudaMoeLayer {
    /// Always an error: this build has no CUDA support.
    pub fn new(
        _device: &CudaDevice,
        _config: MoeConfig,
        _params: &MoeParams<f32>,
        _precision: Precision,
    ) -> Result<Self> {
        Err(no_cuda("cannot build the CUDA MoE layer"))
    }

    /// Always an error: this build has no CUDA support.
    pub fn on(_gpu: &std::sync::Arc<Gpu>, _config: MoeConfig, _params: &MoeParams<f32>) -> Result<Self> {
        Err(no_cuda("cannot build the CUDA MoE layer"))
    }

    /// Always an error: this build has no CUDA support.
    pub fn parameters(&self) -> Result<MoeParams<f32>> {
        Err(no_cuda("cannot copy the parameters from the GPU"))
    }

    /// The layer's configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// Unreachable in this build (no layer exists).
    pub fn upload(&self, _data: &[f32]) -> Result<DeviceBuffer> {
        Err(no_cuda("cannot copy to a GPU"))
    }

    /// Unreachable in this build.
    pub fn download(&self, _buf: &DeviceBuffer) -> Result<Vec<f32>> {
        Err(no_cuda("cannot copy from a GPU"))
    }

    /// Unreachable in this build.
    pub fn synchronize(&self) -> Result<()> {
        Err(no_cuda("cannot wait for a GPU"))
    }

    /// Unreachable in this build.
    pub fn gradients(&self) -> Result<MoeParams<f32>> {
        Err(no_cuda("cannot read gradients from a GPU"))
    }

    /// Unreachable in this build.
    pub fn zero_gradients(&mut self) -> Result<()> {
        Err(no_cuda("cannot zero gradients on a GPU"))
    }

    /// Unreachable in this build.
    pub fn forward(&self, _x: &DeviceBuffer) -> Result<(DeviceBuffer, CudaMoeCache)> {
        Err(no_cuda("cannot run the MoE layer on a GPU"))
    }

    /// Unreachable in this build.
    pub fn backward(
        &mut self,
        _x: &DeviceBuffer,
        _cache: CudaMoeCache,
        _gy: &DeviceBuffer,
        _router_scale: f32,
    ) -> Result<DeviceBuffer> {
        Err(no_cuda("cannot run the MoE layer on a GPU"))
    }

    /// Unreachable in this build.
    pub fn expert_products_seconds(&mut self, _slots: usize, _iters: usize, _rounds: usize) -> Result<f64> {
        Err(no_cuda("cannot time products on a GPU"))
    }

    /// Unreachable in this build.
    pub fn plain_product_seconds(&self, _m: usize, _n: usize, _k: usize, _iters: usize, _rounds: usize) -> Result<f64> {
        Err(no_cuda("cannot time products on a GPU"))
    }
}

/// The model on a GPU. This build has no CUDA support: [`CudaGpt::new`] always fails.
pub struct CudaGpt {
    config: crate::model::gpt::GptConfig,
    /// None exists: [`CudaGpt::new`] always fails.
    never: std::convert::Infallible,
}

impl CudaGpt {
    /// Always an error: this build has no CUDA support.
    pub fn new(_gpu: &std::sync::Arc<Gpu>, _model: &crate::model::gpt::Gpt<f32>) -> Result<Self> {
        Err(no_cuda("cannot put the model on a GPU"))
    }

    /// The GPU it runs on (never called: no `CudaGpt` exists in this build).
    pub fn gpu(&self) -> &std::sync::Arc<Gpu> {
        match self.never {}
    }

    /// The model's configuration.
    pub fn config(&self) -> &crate::model::gpt::GptConfig {
        &self.config
    }

    /// Unreachable in this build.
    pub fn memory(&self) -> Result<Option<crate::kernels::cuda::GpuMemory>> {
        Err(no_cuda("cannot read a GPU's memory"))
    }

    /// Unreachable in this build.
    pub fn to_model(&self) -> Result<crate::model::gpt::Gpt<f32>> {
        Err(no_cuda("cannot read the model from a GPU"))
    }

    /// Unreachable in this build.
    pub fn gradients(&self) -> Result<crate::model::gpt::Gpt<f32>> {
        Err(no_cuda("cannot read gradients from a GPU"))
    }

    /// Unreachable in this build.
    pub fn zero_gradients(&mut self) -> Result<()> {
        Err(no_cuda("cannot zero gradients on a GPU"))
    }

    /// Unreachable in this build.
    pub fn evaluate(&mut self, _idx: &[u32], _targets: &[u32], _seqs: usize) -> Result<crate::model::gpt::GroupOutput> {
        Err(no_cuda("cannot run the model on a GPU"))
    }

    /// Unreachable in this build.
    pub fn forward_backward(
        &mut self,
        _idx: &[u32],
        _targets: &[u32],
        _seqs: usize,
        _ce_scale: f32,
        _router_scale: f32,
    ) -> Result<crate::model::gpt::GroupOutput> {
        Err(no_cuda("cannot run the model on a GPU"))
    }

    /// Unreachable in this build.
    pub fn load_moments(&mut self, _m: &[Vec<f32>], _v: &[Vec<f32>]) -> Result<()> {
        Err(no_cuda("cannot copy optimizer state to a GPU"))
    }

    /// Unreachable in this build.
    pub fn gradient_norm(&mut self) -> Result<f64> {
        Err(no_cuda("cannot read gradients from a GPU"))
    }

    /// Unreachable in this build.
    pub fn moments(&self) -> Result<super::Moments> {
        Err(no_cuda("cannot read optimizer state from a GPU"))
    }

    /// Unreachable in this build.
    pub(crate) fn apply_adamw(&mut self, _scalars: &crate::kernels::AdamwStep, _grad_scale: f32) -> Result<()> {
        Err(no_cuda("cannot update parameters on a GPU"))
    }
}
