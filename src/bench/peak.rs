//! The machine's f32 FMA peak, that the matmul and layer rates are compared against.

use std::time::Instant;

/// Theoretical-style peak: the f32 FMA throughput of `threads` threads running independent
/// fused multiply-adds on the widest vectors the CPU has (AVX-512, else AVX2), in GFLOP/s.
pub fn fma_peak_gflops(threads: usize) -> f64 {
    const ITERS: u64 = 50_000_000;
    let start = Instant::now();
    let lanes: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1)).map(|_| scope.spawn(|| fma_loop(ITERS))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let secs = start.elapsed().as_secs_f64();
    // Each lane-FMA is 2 flops.
    2.0 * lanes as f64 / secs / 1e9
}

/// Runs `iters` rounds of 12 independent vector FMAs; returns the number of lane-FMAs done.
fn fma_loop(iters: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            unsafe fn run(iters: u64) -> f32 {
                let m = _mm512_set1_ps(0.999_999);
                let a = _mm512_set1_ps(1e-7);
                let mut acc = [_mm512_set1_ps(1.0); 12];
                for _ in 0..iters {
                    for v in acc.iter_mut() {
                        *v = _mm512_fmadd_ps(*v, m, a);
                    }
                }
                acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
            }
            // SAFETY: AVX-512F is present (checked above).
            let r = unsafe { run(iters) };
            std::hint::black_box(r);
            return iters * 12 * 16;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn run(iters: u64) -> f32 {
                let m = _mm256_set1_ps(0.999_999);
                let a = _mm256_set1_ps(1e-7);
                let mut acc = [_mm256_set1_ps(1.0); 12];
                for _ in 0..iters {
                    for v in acc.iter_mut() {
                        *v = _mm256_fmadd_ps(*v, m, a);
                    }
                }
                let mut out = [0.0f32; 8];
                let mut sum = 0.0;
                for v in acc {
                    // SAFETY: `out` is 8 f32s, the 32 bytes the unaligned store writes.
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
                    sum += out.iter().sum::<f32>();
                }
                sum
            }
            // SAFETY: AVX2 and FMA are present (checked above).
            let r = unsafe { run(iters) };
            std::hint::black_box(r);
            return iters * 12 * 8;
        }
    }
    let mut acc = [1.0f32; 8];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = v.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    iters * 8
}
