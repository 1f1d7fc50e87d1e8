//! Forward and forward+backward throughput of one MoE layer.

use super::{median, randn, time_it};
use crate::error::Result;
use crate::kernels::{Backend, Cpu, Mat};
use crate::model::moe::{MoeConfig, MoeLayer, MoeParams};
use serde::Serialize;

/// Result of [`moe_layer_bench`].
#[derive(Debug, Clone, Serialize)]
pub struct MoeLayerReport {
    /// The layer configuration.
    pub config: MoeConfig,
    /// Tokens per forward.
    pub tokens: usize,
    /// Threads used.
    pub threads: usize,
    /// Kept assignments (rows through the experts).
    pub kept: usize,
    /// Median seconds of a forward pass.
    pub forward_seconds: f64,
    /// Median seconds of a forward plus backward pass.
    pub train_seconds: f64,
    /// tokens / forward_seconds
    pub forward_tokens_per_s: f64,
    /// tokens / train_seconds
    pub train_tokens_per_s: f64,
    /// Expert-matmul FLOPs of one forward (its 2 matmuls).
    pub forward_flops: f64,
    /// Forward + backward expert-matmul FLOPs (2 + 4 matmuls).
    pub train_flops: f64,
    /// Expert FLOPs / forward time: the whole layer's effective rate.
    pub forward_gflops: f64,
    /// Expert FLOPs / train time.
    pub train_gflops: f64,
    /// The six expert matmuls alone (same shapes, same buffers), GFLOP/s.
    pub expert_matmul_gflops: f64,
    /// Measured FMA peak of this many threads, GFLOP/s.
    pub peak_gflops: f64,
}

/// Forward and forward+backward throughput of one MoE layer over `tokens` tokens.
pub fn moe_layer_bench(
    cpu: &Cpu,
    config: &MoeConfig,
    tokens: usize,
    warmup: usize,
    iters: usize,
    peak_gflops: f64,
) -> Result<MoeLayerReport> {
    // The input, its gradient, the output and the input's gradient; the routed rows in and out
    // of the experts (k of each token, times the capacity factor); the parameters and their
    // gradients.
    let (t, d, f) = (tokens as f64, config.d_model as f64, config.d_ff as f64);
    let rows = t * config.k as f64 * config.capacity_factor.max(1.0);
    let params = config.experts as f64 * 2.0 * d * f;
    super::check_memory(
        &format!("--tokens {tokens} at this layer's size"),
        4.0 * (4.0 * t * d + rows * (2.0 * d + 2.0 * f) + 2.0 * params),
    )?;
    let layer = MoeLayer::new(config.clone(), MoeParams::<f32>::init(config, 42)?)?;
    let x = randn(tokens * config.d_model, 3);
    let gy = randn(tokens * config.d_model, 4);
    let mut grads = MoeParams::zeros(config);
    let mut kept = 0;
    let forward = time_it(warmup, iters, || {
        let (out, cache) = cpu.install(|| layer.forward(cpu, &x))?;
        kept = cache.dispatch.routing.kept();
        std::hint::black_box(out);
        Ok(())
    })?;
    let train = time_it(warmup, iters, || {
        cpu.install(|| {
            let (_out, cache) = layer.forward(cpu, &x)?;
            let gx = layer.backward(cpu, &x, cache, &gy, &mut grads)?;
            std::hint::black_box(gx);
            Ok(())
        })
    })?;

    let (d, f) = (config.d_model as f64, config.d_ff as f64);
    let forward_flops = 2.0 * 2.0 * kept as f64 * d * f;
    let train_flops = 3.0 * forward_flops;

    // The expert matmuls alone, with the layer's shapes and scheduling (experts side by side, each
    // product single-threaded): per expert 2 forward and 4 backward products.
    let per_expert = kept / config.experts.max(1);
    let (n, dm, df) = (per_expert.max(1), config.d_model, config.d_ff);
    let xe = randn(n * dm, 5);
    let hbuf = randn(n * df, 6);
    let w1 = randn(dm * df, 7);
    let w2 = randn(df * dm, 8);
    let mut outs: Vec<[Vec<f32>; 4]> = (0..config.experts)
        .map(|_| {
            [
                vec![0.0f32; n * df],
                vec![0.0f32; n * dm],
                vec![0.0f32; dm * df],
                vec![0.0f32; df * dm],
            ]
        })
        .collect();
    let mm = time_it(warmup, iters, || {
        let tasks: Vec<&mut [Vec<f32>; 4]> = outs.iter_mut().collect();
        cpu.par_for_each(tasks, |b, [out_f, out_d, gw1, gw2]| {
            b.matmul(out_f, Mat::new(&xe, n, dm)?, Mat::new(&w1, dm, df)?, true)?;
            b.matmul(out_d, Mat::new(&hbuf, n, df)?, Mat::new(&w2, df, dm)?, true)?;
            b.matmul(gw2, Mat::new(&hbuf, n, df)?.t(), Mat::new(&xe, n, dm)?, true)?;
            b.matmul(out_f, Mat::new(&xe, n, dm)?, Mat::new(&w2, df, dm)?.t(), false)?;
            b.matmul(gw1, Mat::new(&xe, n, dm)?.t(), Mat::new(&hbuf, n, df)?, true)?;
            b.matmul(out_d, Mat::new(&hbuf, n, df)?, Mat::new(&w1, dm, df)?.t(), false)
        })
    })?;
    let mm_flops = 6.0 * 2.0 * (n * dm * df) as f64 * config.experts as f64;

    let (fs, ts) = (median(forward), median(train));
    Ok(MoeLayerReport {
        config: config.clone(),
        tokens,
        threads: cpu.threads(),
        kept,
        forward_seconds: fs,
        train_seconds: ts,
        forward_tokens_per_s: tokens as f64 / fs,
        train_tokens_per_s: tokens as f64 / ts,
        forward_flops,
        train_flops,
        forward_gflops: forward_flops / fs / 1e9,
        train_gflops: train_flops / ts / 1e9,
        expert_matmul_gflops: mm_flops / median(mm) / 1e9,
        peak_gflops,
    })
}

/// Result of [`moe_layer_cuda_bench`]: the MoE layer on one GPU.
#[derive(Debug, Clone, Serialize)]
pub struct MoeLayerCudaReport {
    /// The GPU's name.
    pub device: String,
    /// `f32`, `tf32` or `bf16`.
    pub precision: String,
    /// The layer configuration.
    pub config: MoeConfig,
    /// Tokens per forward.
    pub tokens: usize,
    /// Kept assignments (rows through the experts).
    pub kept: usize,
    /// Rows per expert in the padded expert batch.
    pub slots_per_expert: usize,
    /// Median seconds of a forward pass (inputs already on the GPU, synchronised at the end).
    pub forward_seconds: f64,
    /// Median seconds of a forward plus backward pass.
    pub train_seconds: f64,
    /// tokens / forward_seconds
    pub forward_tokens_per_s: f64,
    /// tokens / train_seconds
    pub train_tokens_per_s: f64,
    /// Expert-matmul FLOPs of the kept rows in forward + backward (6 products): the same count as
    /// the CPU bench and the PyTorch script.
    pub train_flops: f64,
    /// train_flops / train_seconds.
    pub train_gflops: f64,
    /// The six expert products alone, batched over the experts at the layer's padded shapes:
    /// their FLOPs (padding rows included) per second, GFLOP/s.
    pub expert_products_gflops: f64,
    /// A plain cuBLAS product `[E * slots][d_model] @ [d_model][d_ff]` in the same precision,
    /// GFLOP/s: the matrix rate of this GPU at the layer's size.
    pub matrix_gflops: f64,
}

/// Forward and forward+backward throughput of one MoE layer on GPU 0 (`semoe bench moe-layer
/// --device cuda`): the same inputs as [`moe_layer_bench`], uploaded once; every timed iteration
/// ends with a synchronisation.
pub fn moe_layer_cuda_bench(
    config: &MoeConfig,
    tokens: usize,
    warmup: usize,
    iters: usize,
    precision: crate::kernels::cuda::Precision,
) -> Result<MoeLayerCudaReport> {
    use crate::kernels::cuda::CudaDevice;
    use crate::model::cuda::CudaMoeLayer;
    // What the host holds before the upload: the input and its gradient, the parameters.
    let (t, d, f) = (tokens as f64, config.d_model as f64, config.d_ff as f64);
    super::check_memory(
        &format!("--tokens {tokens} at this layer's size"),
        4.0 * (2.0 * t * d + config.experts as f64 * 2.0 * d * f),
    )?;
    let device = CudaDevice::open(0)?;
    let params = MoeParams::<f32>::init(config, 42)?;
    let mut layer = CudaMoeLayer::new(&device, config.clone(), &params, precision)?;
    let x = layer.upload(&randn(tokens * config.d_model, 3))?;
    let gy = layer.upload(&randn(tokens * config.d_model, 4))?;
    let (mut kept, mut slots) = (0, 0);
    let forward = time_it(warmup, iters, || {
        let (y, cache) = layer.forward(&x)?;
        kept = cache.stats.expert_tokens.iter().sum();
        slots = cache.slots_per_expert();
        let _ = (y, cache);
        layer.synchronize()
    })?;
    let train = time_it(warmup, iters, || {
        let (_y, cache) = layer.forward(&x)?;
        let _gx = layer.backward(&x, cache, &gy, 1.0)?;
        layer.synchronize()
    })?;
    let (d, f, e) = (config.d_model, config.d_ff, config.experts);
    let train_flops = 6.0 * 2.0 * kept as f64 * d as f64 * f as f64;
    let padded_flops = 6.0 * 2.0 * (e * slots) as f64 * d as f64 * f as f64;
    let rounds = 5;
    let products = layer.expert_products_seconds(slots, iters, rounds)?;
    let matrix = layer.plain_product_seconds(e * slots, f, d, iters, rounds)?;
    let (fs, ts) = (median(forward), median(train));
    Ok(MoeLayerCudaReport {
        device: device.name(),
        precision: format!("{precision:?}").to_lowercase(),
        config: config.clone(),
        tokens,
        kept,
        slots_per_expert: slots,
        forward_seconds: fs,
        train_seconds: ts,
        forward_tokens_per_s: tokens as f64 / fs,
        train_tokens_per_s: tokens as f64 / ts,
        train_flops,
        train_gflops: train_flops / ts / 1e9,
        expert_products_gflops: padded_flops / products / 1e9,
        matrix_gflops: 2.0 * (e * slots * d * f) as f64 / matrix / 1e9,
    })
}
