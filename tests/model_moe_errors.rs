//! Bad configuration and bad shapes are clear errors that name the problem, never panics.

use semoe::kernels::Cpu;
use semoe::model::moe::{MoeConfig, MoeLayer, MoeParams};
use semoe::Error;

fn small() -> MoeConfig {
    MoeConfig {
        d_model: 8,
        d_ff: 16,
        experts: 4,
        k: 2,
        ..MoeConfig::default()
    }
}

fn message(r: Result<impl std::fmt::Debug, Error>) -> String {
    r.expect_err("must be an error").to_string()
}

#[test]
fn k_larger_than_experts_is_rejected() {
    let c = MoeConfig { k: 5, ..small() };
    let msg = message(MoeParams::<f32>::init(&c, 0));
    assert!(msg.contains("k (experts per token)") && msg.contains("got 5"), "{msg}");
    let msg = message(MoeLayer::new(c, MoeParams::<f32>::zeros(&small())));
    assert!(msg.contains("k (experts per token)"), "{msg}");
}

#[test]
fn non_positive_capacity_factor_is_rejected() {
    for cf in [0.0, -0.5, f64::INFINITY] {
        let c = MoeConfig {
            capacity_factor: cf,
            ..small()
        };
        let msg = message(c.validate());
        assert!(msg.contains("capacity_factor"), "{msg}");
    }
}

#[test]
fn parameter_shapes_are_checked() {
    let c = small();
    let mut p = MoeParams::<f32>::zeros(&c);
    p.w2.pop();
    let msg = message(MoeLayer::new(c, p));
    assert!(msg.contains("w2") && msg.contains("expected 512"), "{msg}");
}

#[test]
fn input_shapes_are_checked() {
    let c = small();
    let cpu = Cpu::new(1).expect("cpu");
    let layer = MoeLayer::new(c.clone(), MoeParams::<f32>::init(&c, 1).expect("init")).expect("layer");
    let msg = message(layer.forward(&cpu, &[0.0; 12]));
    assert!(msg.contains("d_model=8"), "{msg}");

    let x = vec![0.1f32; 5 * 8];
    let (_, cache) = layer.forward(&cpu, &x).expect("forward");
    let mut grads = MoeParams::zeros(&c);
    let msg = message(layer.backward(&cpu, &x, cache.clone(), &[0.0; 8], &mut grads));
    assert!(msg.contains("gy"), "{msg}");
    let mut wrong = MoeParams::<f32>::zeros(&MoeConfig { d_ff: 8, ..c.clone() });
    let msg = message(layer.backward(&cpu, &x, cache, &x, &mut wrong));
    assert!(msg.contains("w1"), "{msg}");
}

#[test]
fn non_finite_input_is_reported() {
    let c = small();
    let cpu = Cpu::new(1).expect("cpu");
    let layer = MoeLayer::new(c.clone(), MoeParams::<f32>::init(&c, 1).expect("init")).expect("layer");
    let mut x = vec![0.1f32; 3 * 8];
    x[9] = f32::NAN;
    let msg = message(layer.forward(&cpu, &x));
    assert!(msg.contains("token 1"), "{msg}");
}

#[test]
fn an_empty_batch_is_fine() {
    let c = small();
    let cpu = Cpu::new(1).expect("cpu");
    let layer = MoeLayer::new(c.clone(), MoeParams::<f32>::init(&c, 1).expect("init")).expect("layer");
    let (out, cache) = layer.forward(&cpu, &[]).expect("forward");
    assert!(out.y.is_empty());
    let mut grads = MoeParams::zeros(&c);
    assert!(layer
        .backward(&cpu, &[], cache, &[], &mut grads)
        .expect("backward")
        .is_empty());
}
