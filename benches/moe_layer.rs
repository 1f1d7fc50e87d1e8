//! The MoE layer's forward and forward+backward, headline shape (S=4096, d_model 512, d_ff 2048,
//! E=8, top-2, capacity factor 1.0, 2 threads). Throughput is in tokens.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use semoe::bench::randn;
use semoe::kernels::Cpu;
use semoe::model::moe::{MoeConfig, MoeLayer, MoeParams};

fn moe_layer(c: &mut Criterion) {
    let cpu = Cpu::new(2).expect("cpu");
    let config = MoeConfig::default();
    let tokens = 4096;
    let layer = MoeLayer::new(config.clone(), MoeParams::<f32>::init(&config, 42).expect("init")).expect("layer");
    let x = randn(tokens * config.d_model, 3);
    let gy = randn(tokens * config.d_model, 4);
    let mut grads = MoeParams::zeros(&config);

    let mut group = c.benchmark_group("moe_layer_s4096_d512_f2048_e8_k2");
    group.sample_size(10);
    group.throughput(Throughput::Elements(tokens as u64));
    group.bench_function("forward", |b| {
        b.iter(|| cpu.install(|| layer.forward(&cpu, &x)).expect("forward"))
    });
    group.bench_function("forward_backward", |b| {
        b.iter(|| {
            cpu.install(|| {
                let (_, cache) = layer.forward(&cpu, &x)?;
                layer.backward(&cpu, &x, cache, &gy, &mut grads)
            })
            .expect("train step")
        })
    });
    group.finish();
}

criterion_group!(benches, moe_layer);
criterion_main!(benches);
