//! The square f32 matrix product rate.

use super::{median, randn, time_it};
use crate::error::Result;
use crate::kernels::{Backend, Cpu, Mat};
use serde::Serialize;

/// Result of [`matmul_bench`].
#[derive(Debug, Clone, Serialize)]
pub struct MatmulReport {
    /// m = n = k
    pub size: usize,
    /// Threads used.
    pub threads: usize,
    /// Median seconds per product.
    pub seconds: f64,
    /// 2 m n k / seconds / 1e9
    pub gflops: f64,
}

/// Square f32 matmul rate.
pub fn matmul_bench(cpu: &Cpu, size: usize, warmup: usize, iters: usize) -> Result<MatmulReport> {
    super::check_memory(&format!("--size {size}"), 3.0 * 4.0 * (size as f64).powi(2))?;
    let a = randn(size * size, 1);
    let b = randn(size * size, 2);
    let mut c = vec![0.0f32; size * size];
    let times = time_it(warmup, iters, || {
        cpu.matmul(&mut c, Mat::new(&a, size, size)?, Mat::new(&b, size, size)?, false)
    })?;
    let seconds = median(times);
    Ok(MatmulReport {
        size,
        threads: cpu.threads(),
        seconds,
        gflops: 2.0 * (size as f64).powi(3) / seconds / 1e9,
    })
}
