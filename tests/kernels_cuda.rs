//! The CUDA backend is optional: without the `cuda` feature, or on a machine without a GPU, opening a
//! device is a clear error and nothing panics. With a GPU and the feature, device 0 opens.

use semoe::kernels::cuda::CudaDevice;

#[test]
fn opening_a_device_never_panics() {
    if CudaDevice::count() == 0 {
        let err = CudaDevice::open(0)
            .expect_err("no GPU is visible, so opening must fail")
            .to_string();
        assert!(err.contains("cuda") && err.contains("GPU 0"), "unclear error: {err}");
        eprintln!("skipping the GPU part of this test: no CUDA GPU is visible ({err})");
        return;
    }
    let dev = CudaDevice::open(0).expect("GPU 0 is visible");
    assert!(!dev.name().is_empty());
    let beyond = CudaDevice::count();
    assert!(CudaDevice::open(beyond).is_err(), "ordinal {beyond} is out of range");
}

/// The build without the feature has the same public API as the one with it (code that names
/// these compiles either way), and says why no GPU is visible.
#[test]
fn the_build_without_cuda_has_the_same_api_and_says_why() {
    use semoe::kernels::cuda::Gpu;
    use semoe::model::cuda::{CudaGpt, CudaMoeLayer};
    use semoe::model::moe::{MoeConfig, MoeParams};
    let _on: fn(&std::sync::Arc<Gpu>, MoeConfig, &MoeParams<f32>) -> semoe::Result<CudaMoeLayer> = CudaMoeLayer::on;
    let _parameters: fn(&CudaMoeLayer) -> semoe::Result<MoeParams<f32>> = CudaMoeLayer::parameters;
    let _gpu: fn(&CudaGpt) -> &std::sync::Arc<Gpu> = CudaGpt::gpu;
    if cfg!(not(feature = "cuda")) {
        let err = CudaDevice::visible()
            .expect_err("no GPU without CUDA support")
            .to_string();
        assert!(err.contains("built without CUDA support"), "{err}");
    }
}
