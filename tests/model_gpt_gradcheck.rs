//! Finite-difference check of the whole model's hand-written backward pass, in f64: every parameter of
//! a tiny GPT with one dense and one MoE block (with drops, auxiliary and z-losses), two groups.

mod common;

use semoe::kernels::{Cpu, Gelu};
use semoe::model::gpt::{Gpt, GptConfig};

const H: f64 = 1e-6;

fn tiny() -> GptConfig {
    GptConfig {
        vocab: 11,
        block_size: 6,
        d_model: 8,
        n_layer: 2,
        n_head: 2,
        d_ff: 12,
        dense_d_ff: 10,
        moe_every: 2,
        experts: 4,
        k: 2,
        capacity_factor: 0.75,
        min_capacity: 1,
        aux_coef: 0.1,
        z_coef: 0.05,
        gelu: Gelu::Erf,
        ..GptConfig::default()
    }
}

/// Two groups of two sequences of 5 tokens.
fn batch() -> (Vec<u32>, Vec<u32>) {
    let idx: Vec<u32> = (0..20u32).map(|i| (i * 7 + 3) % 11).collect();
    let targets: Vec<u32> = (0..20u32).map(|i| (i * 5 + 1) % 11).collect();
    (idx, targets)
}

/// The loss, and the assignments (kept, dropped) of the MoE block over both groups.
fn loss_and_grads(model: &Gpt<f64>, cpu: &Cpu, grads: Option<&mut Gpt<f64>>) -> (f64, usize, usize) {
    let (idx, targets) = batch();
    let mut scratch;
    let grads = match grads {
        Some(g) => g,
        None => {
            scratch = model.zeros_like().expect("zeros");
            &mut scratch
        }
    };
    let (groups, seqs_per_group, t) = (2, 2, 5);
    let (mut total, mut kept, mut dropped) = (0.0, 0, 0);
    for g in 0..groups {
        let span = g * seqs_per_group * t..(g + 1) * seqs_per_group * t;
        let out = model
            .forward_backward(
                cpu,
                &idx[span.clone()],
                &targets[span],
                seqs_per_group,
                1.0 / 20.0,
                0.5,
                grads,
            )
            .expect("forward_backward");
        total += out.ce_sum / 20.0 + 0.5 * out.router_loss.iter().sum::<f64>();
        for stats in &out.moe_stats {
            kept += stats.expert_tokens.iter().sum::<usize>();
            dropped += stats.dropped;
        }
    }
    (total, kept, dropped)
}

#[test]
fn every_gradient_matches_finite_differences() {
    let cpu = Cpu::new(2).expect("cpu");
    let mut model = Gpt::<f64>::init(&tiny(), 3).expect("init");
    // Perturb the defaults so that biases and layer-norm parameters are not at special points, and
    // sharpen the gates so that routing decisions are far from ties.
    for (i, buf) in model.buffers_mut().into_iter().enumerate() {
        for (j, v) in buf.iter_mut().enumerate() {
            *v += 0.05 * (((i * 31 + j * 17) % 13) as f64 / 13.0 - 0.5);
        }
    }
    for b in &mut model.blocks {
        if let semoe::model::gpt::Ffn::Moe(layer) = &mut b.ffn {
            layer.params.wg.iter_mut().for_each(|w| *w *= 40.0);
        }
    }
    let mut grads = model.zeros_like().expect("zeros");
    let (_, kept, dropped) = loss_and_grads(&model, &cpu, Some(&mut grads));
    // 20 tokens, top-2, one MoE block: 40 assignments, some over capacity (cf 0.75).
    assert_eq!(kept + dropped, 40, "assignments of the MoE block");
    assert!(
        dropped > 0 && kept > 0,
        "the check needs drops: {dropped} of 40 dropped"
    );
    let analytic: Vec<(String, Vec<f64>)> = grads.tensors().into_iter().map(|(n, _, b)| (n, b.clone())).collect();

    let mut failures = Vec::new();
    let mut checked = 0;
    for (ti, (name, grad)) in analytic.iter().enumerate() {
        for (i, &a) in grad.iter().enumerate() {
            let orig = model.buffers_mut()[ti][i];
            model.buffers_mut()[ti][i] = orig + H;
            let (plus, _, plus_dropped) = loss_and_grads(&model, &cpu, None);
            model.buffers_mut()[ti][i] = orig - H;
            let (minus, _, minus_dropped) = loss_and_grads(&model, &cpu, None);
            model.buffers_mut()[ti][i] = orig;
            let fd = (plus - minus) / (2.0 * H);
            checked += 1;
            // A perturbation must not move the routing across a drop (the difference would then
            // measure a jump, not the gradient).
            assert_eq!(
                (plus_dropped, minus_dropped),
                (dropped, dropped),
                "{name}[{i}] changed the drops"
            );
            // Written so that a NaN on either side fails.
            if !common::within(fd, a, 1e-6 * (a.abs() + 1.0)) {
                failures.push(format!("{name}[{i}]: analytic {a:.9e}, finite difference {fd:.9e}"));
            }
        }
    }
    assert!(checked > 1000, "checked {checked} elements");
    assert!(
        failures.is_empty(),
        "{} of {checked} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
