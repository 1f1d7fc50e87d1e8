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
