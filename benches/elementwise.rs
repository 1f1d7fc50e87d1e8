//! Element-wise kernels on one thread: GELU (both forms) forward and backward over an expert-sized
//! activation (128 rows x 256), the shape the default model runs. Throughput is in elements.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use semoe::bench::randn;
use semoe::kernels::{Backend, Cpu, Gelu};

fn elementwise(c: &mut Criterion) {
    let cpu = Cpu::new(1).expect("cpu");
    let n = 128 * 256;
    let h = randn(n, 5);
    let mut out = vec![0.0f32; n];
    let mut group = c.benchmark_group("elementwise_128x256");
    group.throughput(Throughput::Elements(n as u64));
    for (name, kind) in [("tanh", Gelu::Tanh), ("erf", Gelu::Erf)] {
        group.bench_function(format!("gelu_{name}_forward"), |b| {
            b.iter(|| cpu.gelu_forward(kind, &h, &mut out).expect("gelu forward"))
        });
        group.bench_function(format!("gelu_{name}_backward"), |b| {
            // The gradient is updated in place: a fresh one each time, made outside the clock.
            b.iter_batched_ref(
                || vec![1.0f32; n],
                |dy| cpu.gelu_backward(kind, &h, dy).expect("gelu backward"),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, elementwise);
criterion_main!(benches);
