//! The CUDA backend (cudarc, loaded at run time). Without the `cuda` feature this module is a dummy
//! twin with the same API whose constructor reports that the build has no CUDA support.
//!
//! The device kernels themselves (cuBLAS matmuls, NVRTC element-wise kernels, NCCL all-to-all) come
//! with the GPU work; what exists now is device discovery with clear errors, so that callers can
//! already select a device and fail cleanly where none is usable.

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub use device::CudaDevice;

#[cfg(not(feature = "cuda"))]
mod dummy;
#[cfg(not(feature = "cuda"))]
pub use dummy::CudaDevice;
