//! Finite-difference checks of the hand-written MoE backward pass, in f64.
//!
//! For every parameter element and every input element, the analytic gradient of
//! `loss = sum(y * gy) + aux_coef * l_aux + z_coef * z_loss` must match the central difference
//! `(L(p + h) - L(p - h)) / 2h` with h = 1e-6. In f64 the difference's own error is about 1e-10, so
//! the tolerance 1e-6 * (|grad| + 1) catches any wrong term while never failing on rounding.

mod common;

use semoe::kernels::{Cpu, Gelu};
use semoe::model::moe::{DropPolicy, MoeConfig, MoeLayer, MoeParams};

const H: f64 = 1e-6;

fn randn(n: usize, seed: u64) -> Vec<f64> {
    semoe::bench::randn(n, seed).into_iter().map(|v| v as f64).collect()
}

/// The loss and the routing it used (to make sure a perturbation did not flip a decision).
fn loss(layer: &MoeLayer<f64>, cpu: &Cpu, x: &[f64], gy: &[f64]) -> (f64, Vec<bool>, Vec<u32>) {
    let (out, cache) = layer.forward(cpu, x).expect("forward");
    let c = layer.config();
    let dot: f64 = out.y.iter().zip(gy).map(|(a, b)| a * b).sum();
    (
        dot + c.aux_coef * out.l_aux + c.z_coef * out.z_loss,
        cache.dispatch.routing.keep,
        cache.dispatch.routing.expert,
    )
}

fn check(config: MoeConfig, tokens: usize, seed: u64) {
    let cpu = Cpu::new(2).expect("cpu");
    let mut params = MoeParams::<f64>::init(&config, seed).expect("init");
    // Non-zero biases so their gradients are exercised away from the origin.
    params.b1 = randn(params.b1.len(), seed + 1).iter().map(|v| 0.1 * v).collect();
    params.b2 = randn(params.b2.len(), seed + 2).iter().map(|v| 0.1 * v).collect();
    // A sharper gate so top-k and capacity decisions are far from ties.
    params.wg.iter_mut().for_each(|w| *w *= 3.0);
    let mut layer = MoeLayer::new(config.clone(), params).expect("layer");
    let x = randn(tokens * config.d_model, seed + 3);
    let gy = randn(tokens * config.d_model, seed + 4);

    let (out, cache) = layer.forward(&cpu, &x).expect("forward");
    assert!(
        out.stats.dropped > 0 || config.dropless,
        "the case should drop something"
    );
    let (keep0, expert0) = (
        cache.dispatch.routing.keep.clone(),
        cache.dispatch.routing.expert.clone(),
    );
    let mut grads = MoeParams::zeros(&config);
    let grad_x = layer.backward(&cpu, &x, cache, &gy, &mut grads).expect("backward");

    let mut failures = Vec::new();
    let mut compare =
        |name: &str, i: usize, analytic: f64, plus: (f64, Vec<bool>, Vec<u32>), minus: (f64, Vec<bool>, Vec<u32>)| {
            assert!(
                plus.1 == keep0 && minus.1 == keep0 && plus.2 == expert0 && minus.2 == expert0,
                "perturbing {name}[{i}] changed the routing; choose another seed"
            );
            let fd = (plus.0 - minus.0) / (2.0 * H);
            // Written so that a NaN on either side fails.
            if !common::within(fd, analytic, 1e-6 * (analytic.abs() + 1.0)) {
                failures.push(format!(
                    "{name}[{i}]: analytic {analytic:.9e}, finite difference {fd:.9e}"
                ));
            }
        };

    let names = ["wg", "w1", "b1", "w2", "b2"];
    for (pi, name) in names.iter().enumerate() {
        let analytic = grads.named()[pi].1.clone();
        assert_eq!(grads.named()[pi].0, *name);
        assert_eq!(layer.params.named()[pi].0, *name);
        assert_eq!(
            analytic.len(),
            layer.params.named()[pi].1.len(),
            "{name}: one gradient per parameter"
        );
        assert!(!analytic.is_empty(), "{name}");
        for (i, &a) in analytic.iter().enumerate() {
            let orig = layer.params.named()[pi].1[i];
            layer.params.named_mut()[pi].1[i] = orig + H;
            let plus = loss(&layer, &cpu, &x, &gy);
            layer.params.named_mut()[pi].1[i] = orig - H;
            let minus = loss(&layer, &cpu, &x, &gy);
            layer.params.named_mut()[pi].1[i] = orig;
            compare(name, i, a, plus, minus);
        }
    }
    assert_eq!(grad_x.len(), x.len(), "one gradient per input element");
    for (i, &a) in grad_x.iter().enumerate() {
        let mut xp = x.clone();
        xp[i] += H;
        let plus = loss(&layer, &cpu, &xp, &gy);
        xp[i] -= 2.0 * H;
        let minus = loss(&layer, &cpu, &xp, &gy);
        compare("x", i, a, plus, minus);
    }
    assert!(
        failures.is_empty(),
        "{} gradient mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn tiny(k: usize) -> MoeConfig {
    MoeConfig {
        d_model: 5,
        d_ff: 7,
        experts: 4,
        k,
        capacity_factor: 0.75,
        min_capacity: 1,
        aux_coef: 0.1,
        z_coef: 0.05,
        ..MoeConfig::default()
    }
}

#[test]
fn top1_with_drops() {
    check(tiny(1), 12, 10);
}

#[test]
fn top2_normalised_with_drops_and_z_loss() {
    check(tiny(2), 12, 20);
}

#[test]
fn top3_unnormalised_tanh_gelu() {
    check(
        MoeConfig {
            normalize: false,
            gelu: Gelu::Tanh,
            ..tiny(3)
        },
        12,
        30,
    );
}

#[test]
fn top2_probs_policy() {
    check(
        MoeConfig {
            drop_policy: DropPolicy::Probs,
            ..tiny(2)
        },
        12,
        40,
    );
}

#[test]
fn top2_dropless() {
    check(
        MoeConfig {
            dropless: true,
            ..tiny(2)
        },
        9,
        50,
    );
}
