//! The MoE layer's results do not depend on the number of compute threads: forward outputs and every
//! gradient are bitwise identical with 1 and 2 threads (docs/architecture.md, "The determinism
//! contract").

use semoe::kernels::Cpu;
use semoe::model::moe::{MoeConfig, MoeLayer, MoeParams};

fn run(threads: usize, config: &MoeConfig, tokens: usize) -> Vec<Vec<f32>> {
    let cpu = Cpu::new(threads).expect("cpu");
    let layer = MoeLayer::new(config.clone(), MoeParams::<f32>::init(config, 5).expect("init")).expect("layer");
    let x = semoe::bench::randn(tokens * config.d_model, 6);
    let gy = semoe::bench::randn(tokens * config.d_model, 7);
    let (out, cache) = cpu.install(|| layer.forward(&cpu, &x)).expect("forward");
    let mut grads = MoeParams::zeros(config);
    let gx = cpu
        .install(|| layer.backward(&cpu, &x, cache, &gy, &mut grads))
        .expect("backward");
    vec![
        out.y,
        vec![out.l_aux, out.z_loss],
        gx,
        grads.wg,
        grads.w1,
        grads.b1,
        grads.w2,
        grads.b2,
    ]
}

#[test]
fn one_and_two_threads_agree_bitwise() {
    let config = MoeConfig {
        d_model: 96,
        d_ff: 192,
        experts: 8,
        k: 2,
        z_coef: 0.01,
        ..MoeConfig::default()
    };
    let tokens = 1000;
    let one = run(1, &config, tokens);
    let two = run(2, &config, tokens);
    let names = [
        "y", "losses", "grad_x", "grad_wg", "grad_w1", "grad_b1", "grad_w2", "grad_b2",
    ];
    for ((a, b), name) in one.iter().zip(&two).zip(names) {
        assert!(
            a.iter().map(|v| v.to_bits()).eq(b.iter().map(|v| v.to_bits())),
            "{name} differs between 1 and 2 threads"
        );
    }
    // And a second run with the same thread count is identical too (no hidden state).
    assert_eq!(run(2, &config, tokens), two);
}
