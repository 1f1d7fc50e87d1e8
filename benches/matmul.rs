//! f32 matrix products through the CPU backend, in the shapes the MoE layer uses, reported as FLOP/s.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use semoe::bench::randn;
use semoe::kernels::{Backend, Cpu, Mat};

fn matmul(c: &mut Criterion) {
    let cpu = Cpu::new(2).expect("cpu");
    let mut group = c.benchmark_group("matmul_f32_2threads");
    group.sample_size(10);
    // (name, m, k, n, transpose a, transpose b): square, then the expert products of the headline
    // layer (1024 tokens per expert, d_model 512, d_ff 2048) forward and backward.
    let shapes = [
        ("square", 1024, 1024, 1024, false, false),
        ("x@w1", 1024, 512, 2048, false, false),
        ("a@w2", 1024, 2048, 512, false, false),
        ("a^T@gy", 2048, 1024, 512, true, false),
        ("gy@w2^T", 1024, 512, 2048, false, true),
    ];
    for (name, m, k, n, ta, tb) in shapes {
        let a = randn(m * k, 1);
        let b = randn(k * n, 2);
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(BenchmarkId::new(name, format!("{m}x{k}x{n}")), |bench| {
            bench.iter(|| {
                let av = if ta {
                    Mat::new(&a, k, m).map(Mat::t)
                } else {
                    Mat::new(&a, m, k)
                }
                .expect("a");
                let bv = if tb {
                    Mat::new(&b, n, k).map(Mat::t)
                } else {
                    Mat::new(&b, k, n)
                }
                .expect("b");
                cpu.matmul(&mut out, av, bv, false).expect("matmul");
            })
        });
    }
    group.finish();

    // The default model's expert products on one thread (each group's product runs on one
    // thread), for one group's rows of an expert (128) and for two and four groups stacked: what
    // stacking the rows of the groups an expert serves buys.
    let cpu = Cpu::new(1).expect("cpu");
    let mut group = c.benchmark_group("matmul_f32_1thread_default_experts");
    for (name, k, n) in [("x@w1", 128, 256), ("a@w2", 256, 128)] {
        for m in [128, 256, 512] {
            let (a, b) = (randn(m * k, 1), randn(k * n, 2));
            let mut out = vec![0.0f32; m * n];
            group.throughput(Throughput::Elements((2 * m * n * k) as u64));
            group.bench_function(BenchmarkId::new(name, format!("{m}x{k}x{n}")), |bench| {
                bench.iter(|| {
                    let (av, bv) = (Mat::new(&a, m, k).expect("a"), Mat::new(&b, k, n).expect("b"));
                    cpu.matmul(&mut out, av, bv, true).expect("matmul");
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, matmul);
criterion_main!(benches);
