//! The CUDA backend (cudarc, loaded at run time): device discovery ([`CudaDevice`]) and a GPU as
//! the GPU model code uses it ([`Gpu`]: a stream, a cuBLAS handle, the NVRTC-compiled kernels of
//! `moe_kernels.cu` and `model_kernels.cu`). The layers that run on it are in `model::cuda` (the MoE
//! layer and the whole model); the NCCL all-to-all lives in `net/collective/`. Without the `cuda`
//! feature this module is a dummy twin with the same API whose constructors report that the build
//! has no CUDA support.

use crate::error::{Error, Result};

#[cfg(feature = "cuda")]
mod budget;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub(crate) mod gpu;
#[cfg(feature = "cuda")]
pub use device::CudaDevice;
#[cfg(feature = "cuda")]
pub(crate) use device::{cuda_error, guarded_try};
#[cfg(feature = "cuda")]
pub use gpu::{compile_kernels, Gpu};

#[cfg(not(feature = "cuda"))]
mod dummy;
#[cfg(not(feature = "cuda"))]
pub(crate) use dummy::no_cuda;
#[cfg(not(feature = "cuda"))]
pub use dummy::{compile_kernels, CudaDevice, Gpu};

/// The kernels the sources define (each is looked up by name when the module is loaded).
pub const KERNEL_NAMES: [&str; 25] = [
    "moe_gate_topk",
    "moe_route_positions",
    "moe_assign",
    "moe_router_losses",
    "moe_dispatch",
    "moe_bias_gelu_forward",
    "moe_add_expert_bias",
    "moe_combine",
    "moe_combine_backward",
    "moe_expert_column_sums",
    "moe_gelu_backward",
    "moe_gate_backward",
    "gpt_embed_forward",
    "gpt_embed_backward",
    "gpt_layer_norm_forward",
    "gpt_layer_norm_backward",
    "gpt_layer_norm_param_grads",
    "gpt_add_into",
    "gpt_split_heads",
    "gpt_merge_heads",
    "gpt_causal_softmax",
    "gpt_causal_softmax_backward",
    "gpt_cross_entropy",
    "gpt_adamw",
    "gpt_sum_squares",
];

/// GPU memory as the Device tier's budget counts it ([`Gpu::memory`]): the tensors of a
/// [`Gpu::budgeted`] GPU, allocated from a pool that never grows past the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuMemory {
    /// The Device tier's budget as the pool applies it: its largest size (the budget given,
    /// rounded down to the GPU's allocation granule).
    pub budget: u64,
    /// Bytes of tensors allocated now.
    pub in_use: u64,
    /// The most bytes of tensors allocated at once so far.
    pub peak: u64,
    /// The most bytes the pool reserved from the GPU at once (in the driver's granules: at least
    /// `peak`): what the budget bounds.
    pub reserved_peak: u64,
}

/// The precision of the GPU's matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Full float32 products (cuBLAS's default math).
    #[default]
    F32,
    /// TF32 tensor-core products (10-bit mantissa inputs, float32 sums): faster, wider tolerance.
    Tf32,
    /// bfloat16 tensor-core products of the same float32 buffers (inputs rounded to 7-bit
    /// mantissas, float32 sums: cuBLAS's `CUBLAS_COMPUTE_32F_FAST_16BF`; PyTorch's nearest is
    /// `torch.autocast` to bfloat16, whose products also take bfloat16 inputs and float32 sums;
    /// its `set_float32_matmul_precision("medium")` gives TF32 on CUDA): the fastest, the widest
    /// tolerance.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::config(format!(
                "precision must be \"f32\", \"tf32\" or \"bf16\", got {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Precision;

    #[test]
    fn every_precision_parses_by_its_name_and_others_are_refused_naming_them() {
        let names = [
            ("f32", Precision::F32),
            ("tf32", Precision::Tf32),
            ("bf16", Precision::Bf16),
        ];
        for (name, want) in names {
            assert_eq!(name.parse::<Precision>().expect(name), want);
        }
        let err = "fp8".parse::<Precision>().expect_err("fp8").to_string();
        assert!(err.contains("\"f32\", \"tf32\" or \"bf16\", got \"fp8\""), "{err}");
    }
}
