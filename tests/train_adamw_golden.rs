//! AdamW, gradient clipping and the learning-rate schedule against `torch.optim.AdamW`,
//! `torch.nn.utils.clip_grad_norm_` and the reference schedule (`tests/golden/adamw/*.json`).

use semoe::train::optimizer::{AdamW, OptimizerConfig, Schedule};
use serde_json::Value;
use std::path::Path;

fn flat(v: &Value, out: &mut Vec<f32>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flat(i, out)),
        Value::Number(n) => out.push(n.as_f64().unwrap_or(f64::NAN) as f32),
        other => panic!("unexpected {other}"),
    }
}

fn shape(v: &Value) -> Vec<usize> {
    match v {
        Value::Array(items) => {
            let mut s = vec![items.len()];
            if let Some(first) = items.first() {
                s.extend(shape(first));
            }
            s
        }
        _ => vec![],
    }
}

/// The golden rule (tests/golden/README.md): `|got - want| <= 1e-5 * (|want| + rms(want))`.
fn close(got: &[f32], want: &[f32]) -> Option<usize> {
    let rms = (want.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / want.len().max(1) as f64).sqrt();
    got.iter()
        .zip(want)
        .position(|(&a, &b)| ((a - b).abs() as f64) > 1e-5 * ((b as f64).abs() + rms))
}

fn check(path: &Path) {
    let case: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    let c = &case["config"];
    let num = |k: &str| c[k].as_f64().expect(k);
    let config = OptimizerConfig {
        lr: num("lr"),
        min_lr: num("min_lr"),
        warmup: num("warmup") as u64,
        beta1: num("beta1"),
        beta2: num("beta2"),
        eps: num("eps"),
        weight_decay: num("weight_decay"),
        clip: num("clip"),
        ..OptimizerConfig::default()
    };
    let total = num("total_steps") as u64;
    let names: Vec<String> = case["params"].as_object().expect("params").keys().cloned().collect();
    let shapes: Vec<Vec<usize>> = names.iter().map(|n| shape(&case["params"][n])).collect();
    let mut params: Vec<Vec<f32>> = names
        .iter()
        .map(|n| {
            let mut v = Vec::new();
            flat(&case["params"][n], &mut v);
            v
        })
        .collect();
    let mut opt = AdamW::new(config.clone(), &shapes).expect("optimizer");
    for (i, lr_want) in case["lr"].as_array().expect("lr").iter().enumerate() {
        let lr = config.lr_at(i as u64, total);
        let lr_want = lr_want.as_f64().expect("lr");
        assert!(
            (lr - lr_want).abs() <= 1e-12 * lr_want.abs().max(1.0),
            "{path:?} step {i}: lr {lr} != {lr_want}"
        );
        let mut grads: Vec<Vec<f32>> = names
            .iter()
            .map(|n| {
                let mut v = Vec::new();
                flat(&case["grads"][i][n], &mut v);
                v
            })
            .collect();
        let mut p: Vec<&mut Vec<f32>> = params.iter_mut().collect();
        let mut g: Vec<&mut Vec<f32>> = grads.iter_mut().collect();
        let norm = opt.step(&mut p, &mut g, lr).expect("step");
        let norm_want = case["grad_norm"][i].as_f64().expect("grad_norm");
        assert!(
            (norm - norm_want).abs() <= 1e-6 * norm_want,
            "{path:?} step {i}: norm {norm} != {norm_want}"
        );
        for (n, got) in names.iter().zip(&params) {
            let mut want = Vec::new();
            flat(&case["params_after"][i][n], &mut want);
            if let Some(j) = close(got, &want) {
                panic!("{path:?} step {i}: {n}[{j}] = {}, torch has {}", got[j], want[j]);
            }
        }
    }
    for (k, (n, m)) in names.iter().zip(&opt.m).enumerate() {
        let mut want = Vec::new();
        flat(&case["m"][n], &mut want);
        assert_eq!(close(m, &want), None, "m of {n}");
        let mut want_v = Vec::new();
        flat(&case["v"][n], &mut want_v);
        assert_eq!(close(&opt.v[k], &want_v), None, "v of {n}");
    }
}

#[test]
fn adamw_matches_torch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/adamw");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("dir") {
        let p = entry.expect("entry").path();
        if p.extension().is_some_and(|x| x == "json") {
            check(&p);
            n += 1;
        }
    }
    assert!(n >= 2);
}

#[test]
fn schedule_warms_up_then_decays_to_min_lr() {
    let c = OptimizerConfig {
        lr: 1.0,
        min_lr: 0.1,
        warmup: 10,
        ..OptimizerConfig::default()
    };
    assert!((c.lr_at(0, 100) - 0.1).abs() < 1e-12);
    assert!((c.lr_at(9, 100) - 1.0).abs() < 1e-12);
    assert!((c.lr_at(10, 100) - 1.0).abs() < 1e-12);
    assert!((c.lr_at(55, 100) - 0.55).abs() < 1e-12);
    assert!((c.lr_at(100, 100) - 0.1).abs() < 1e-12);
    assert!((c.lr_at(500, 100) - 0.1).abs() < 1e-12);
}

#[test]
fn linear_schedule_with_a_cooldown_holds_then_decays_in_a_line() {
    let c = OptimizerConfig {
        lr: 1.0,
        min_lr: 0.0,
        warmup: 10,
        schedule: Schedule::Linear,
        cooldown: 0.5,
        ..OptimizerConfig::default()
    };
    // 90 steps after warmup: held at 1.0 for 45, then a line to 0 over the last 45.
    assert!((c.lr_at(10, 100) - 1.0).abs() < 1e-12);
    assert!((c.lr_at(55, 100) - 1.0).abs() < 1e-12);
    assert!((c.lr_at(64, 100) - 0.8).abs() < 1e-12);
    assert!((c.lr_at(100, 100) - 0.0).abs() < 1e-12);
    let bad = OptimizerConfig { cooldown: 0.0, ..c };
    let err = bad.validate().expect_err("a zero cooldown is rejected");
    assert!(err.to_string().contains("optimizer.cooldown"), "{err}");
}
