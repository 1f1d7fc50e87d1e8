//! AdamW, gradient clipping and the learning-rate schedule against `torch.optim.AdamW`,
//! `torch.nn.utils.clip_grad_norm_` and the reference schedule (`tests/golden/adamw/*.json`).

mod common;

use common::within;
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

fn f32s(v: &Value) -> Vec<f32> {
    let mut out = Vec::new();
    flat(v, &mut out);
    out
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

/// A required key of `v`.
fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("golden file lacks the required key {key:?}"))
}

fn num(v: &Value, key: &str) -> f64 {
    field(v, key)
        .as_f64()
        .unwrap_or_else(|| panic!("{key:?} is not a number"))
}

fn list<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    field(v, key)
        .as_array()
        .unwrap_or_else(|| panic!("{key:?} is not a list"))
}

/// The names of a `{name: tensor}` object, in file order.
fn keys(v: &Value, what: &str) -> Vec<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("{what} is not an object"))
        .keys()
        .cloned()
        .collect()
}

/// The first element whose bits differ, or a length mismatch.
fn first_difference(got: &[f32], want: &[f32]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits())
}

/// The golden tensor rule (tests/golden/README.md): the first element outside
/// `|got - want| <= 1e-5 * (|want| + rms(want))`, or not finite, or a length mismatch.
fn first_outside(got: &[f32], want: &[f32]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    let rms = (want.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / want.len().max(1) as f64).sqrt();
    got.iter()
        .zip(want)
        .position(|(&a, &b)| !within(a as f64, b as f64, 1e-5 * ((b as f64).abs() + rms)))
}

/// The largest distance in units in the last place (for the record: torch and this
/// implementation round a few operations differently).
fn max_ulps(got: &[f32], want: &[f32]) -> u32 {
    got.iter()
        .zip(want)
        .map(|(a, b)| (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32)
        .max()
        .unwrap_or(0)
}

/// The optimizer configuration of a golden `config`: the schedule keys are optional (cosine
/// decay over all the steps after warmup when absent).
fn optimizer_config(c: &Value) -> OptimizerConfig {
    OptimizerConfig {
        lr: num(c, "lr"),
        min_lr: num(c, "min_lr"),
        warmup: field(c, "warmup").as_u64().expect("config.warmup is an integer"),
        schedule: match c
            .get("schedule")
            .map(|s| s.as_str().expect("config.schedule is a string"))
        {
            None | Some("cosine") => Schedule::Cosine,
            Some("linear") => Schedule::Linear,
            Some(other) => panic!("unknown schedule {other:?}"),
        },
        cooldown: c
            .get("cooldown")
            .map_or(1.0, |v| v.as_f64().expect("config.cooldown is a number")),
        beta1: num(c, "beta1"),
        beta2: num(c, "beta2"),
        eps: num(c, "eps"),
        weight_decay: num(c, "weight_decay"),
        clip: num(c, "clip"),
    }
}

/// `[[step, lr], ...]` against `lr_at`, to 1e-12 relative (float64; plus 1e-15 of the peak, for
/// values that end at zero).
fn check_schedule(what: &str, config: &OptimizerConfig, total: u64, schedule: &[Value]) {
    assert!(!schedule.is_empty(), "{what}: an empty schedule");
    for pair in schedule {
        let step = pair[0].as_u64().unwrap_or_else(|| panic!("{what}: bad entry {pair}"));
        let want = pair[1].as_f64().unwrap_or_else(|| panic!("{what}: bad entry {pair}"));
        let got = config.lr_at(step, total);
        assert!(
            within(got, want, 1e-12 * want.abs() + 1e-15 * config.lr),
            "{what} step {step}: lr {got} != {want}"
        );
    }
}

fn check(path: &Path) {
    let case: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    let c = field(&case, "config");
    let config = optimizer_config(c);
    let total = field(c, "total_steps")
        .as_u64()
        .expect("config.total_steps is an integer");
    let names = keys(field(&case, "params"), "params");
    let shapes: Vec<Vec<usize>> = names.iter().map(|n| shape(&case["params"][n])).collect();
    // Optional: the decay flags, which must be what AdamW::new derives (two or more dimensions).
    if let Some(decay) = case.get("decay") {
        for (n, s) in names.iter().zip(&shapes) {
            assert_eq!(decay[n].as_bool(), Some(s.len() >= 2), "{path:?}: decay of {n}");
        }
    }
    let mut params: Vec<Vec<f32>> = names.iter().map(|n| f32s(&case["params"][n])).collect();
    let mut opt = AdamW::new(config.clone(), &shapes).expect("optimizer");
    let (lrs, grads_in) = (list(&case, "lr"), list(&case, "grads"));
    let (norms, coefs, after) = (
        list(&case, "grad_norm"),
        list(&case, "clip_coef"),
        list(&case, "params_after"),
    );
    let steps = lrs.len();
    assert!(steps > 0, "{path:?}: no steps");
    for (key, l) in [
        ("grads", grads_in),
        ("grad_norm", norms),
        ("clip_coef", coefs),
        ("params_after", after),
    ] {
        assert_eq!(l.len(), steps, "{path:?}: {key} has one entry per step");
    }
    let mut worst_ulps = 0;
    let after_f64 = case
        .get("params_after_f64")
        .map(|v| v.as_array().expect("params_after_f64 is a list"));
    for i in 0..steps {
        let lr = config.lr_at(i as u64, total);
        let lr_want = lrs[i].as_f64().expect("lr");
        assert!(
            within(lr, lr_want, 1e-12 * lr_want.abs() + 1e-15 * config.lr),
            "{path:?} step {i}: lr {lr} != {lr_want}"
        );
        assert_eq!(keys(&grads_in[i], "grads"), names, "{path:?} step {i}: gradient names");
        let mut grads: Vec<Vec<f32>> = names.iter().map(|n| f32s(&grads_in[i][n])).collect();
        let raw = grads.clone();
        let mut p: Vec<&mut Vec<f32>> = params.iter_mut().collect();
        let mut g: Vec<&mut Vec<f32>> = grads.iter_mut().collect();
        let norm = opt.step(&mut p, &mut g, lr).expect("step");
        let norm_want = norms[i].as_f64().expect("grad_norm");
        assert!(
            within(norm, norm_want, 1e-6 * norm_want),
            "{path:?} step {i}: norm {norm} != {norm_want}"
        );
        // The step clips the gradients in place: each is the raw one times torch's factor (to 1e-6
        // relative: the factor is computed in float64 here, in float32 by torch), and untouched
        // when torch did not clip.
        let coef_want = coefs[i].as_f64().expect("clip_coef");
        assert!(
            coef_want > 0.0 && coef_want <= 1.0,
            "{path:?} step {i}: clip_coef {coef_want}"
        );
        for ((n, got), raw) in names.iter().zip(&grads).zip(&raw) {
            if coef_want == 1.0 {
                assert_eq!(first_difference(got, raw), None, "{path:?} step {i}: {n} was clipped");
                continue;
            }
            for (j, (&g, &r)) in got.iter().zip(raw).enumerate() {
                let want = r as f64 * coef_want;
                assert!(
                    within(g as f64, want, 1e-6 * want.abs()),
                    "{path:?} step {i}: clipped gradient {n}[{j}] = {g}, want {want} (clip_coef {coef_want})"
                );
            }
        }
        assert_eq!(
            keys(&after[i], "params_after"),
            names,
            "{path:?} step {i}: parameter names"
        );
        for (n, got) in names.iter().zip(&params) {
            let want = f32s(&after[i][n]);
            worst_ulps = worst_ulps.max(max_ulps(got, &want));
            if let Some(j) = first_outside(got, &want) {
                panic!(
                    "{path:?} step {i}: {n}[{j}] = {:?}, torch has {:?}",
                    got.get(j),
                    want.get(j)
                );
            }
            // Optional: the float64 computation, which torch's float32 follows to about 2e-6.
            if let Some(f64s) = after_f64 {
                let mut exact = Vec::new();
                flat(&f64s[i][n], &mut exact);
                let rms = (exact.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / exact.len().max(1) as f64).sqrt();
                assert_eq!(exact.len(), got.len(), "{path:?} step {i}: params_after_f64 {n}");
                for (j, (&a, &b)) in got.iter().zip(&exact).enumerate() {
                    assert!(
                        within(a as f64, b as f64, 1e-5 * ((b as f64).abs() + rms)),
                        "{path:?} step {i}: {n}[{j}] = {a}, float64 has {b}"
                    );
                }
            }
        }
    }
    assert_eq!(opt.step, steps as u64, "{path:?}: steps taken");
    assert_eq!(keys(field(&case, "m"), "m"), names, "{path:?}: names of m");
    assert_eq!(keys(field(&case, "v"), "v"), names, "{path:?}: names of v");
    for (k, n) in names.iter().enumerate() {
        for (what, got, want) in [("m", &opt.m[k], &case["m"][n]), ("v", &opt.v[k], &case["v"][n])] {
            let want = f32s(want);
            worst_ulps = worst_ulps.max(max_ulps(got, &want));
            if let Some(j) = first_outside(got, &want) {
                panic!(
                    "{path:?}: {what} of {n}[{j}] = {:?}, torch has {:?}",
                    got.get(j),
                    want.get(j)
                );
            }
        }
    }
    eprintln!("{path:?}: params_after, m and v within {worst_ulps} ulps of torch");
    // Optional: the schedule beyond the recorded steps (warmup, decay, the clamp to min_lr).
    if let Some(schedule) = case.get("lr_schedule") {
        let schedule = schedule.as_array().expect("lr_schedule is a list");
        check_schedule(&format!("{path:?} lr_schedule"), &config, total, schedule);
    }
}

#[test]
fn adamw_matches_torch() {
    // Exactly the cases of the table in tests/golden/README.md: a missing file fails.
    let cases = common::readme_cases("# AdamW golden vectors");
    for path in common::golden_files("adamw", &cases) {
        check(&path);
    }
}

/// `tests/golden/schedule/*.json` (pure float64 Python, `tools/reference/gen_schedule_golden.py`):
/// cosine and linear decay, with and without a cooldown shorter than the run.
#[test]
fn schedules_match_the_reference() {
    let cases = common::readme_cases("# Learning-rate schedule golden vectors");
    for path in common::golden_files("schedule", &cases) {
        let case: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let c = field(&case, "config");
        let config = OptimizerConfig {
            lr: num(c, "lr"),
            min_lr: num(c, "min_lr"),
            warmup: field(c, "warmup").as_u64().expect("config.warmup is an integer"),
            schedule: match field(c, "schedule").as_str() {
                Some("cosine") => Schedule::Cosine,
                Some("linear") => Schedule::Linear,
                other => panic!("unknown schedule {other:?}"),
            },
            cooldown: num(c, "cooldown"),
            ..OptimizerConfig::default()
        };
        config.validate().expect("a valid schedule");
        let total = field(c, "total_steps")
            .as_u64()
            .expect("config.total_steps is an integer");
        check_schedule(&format!("{path:?}"), &config, total, list(&case, "lr_schedule"));
    }
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

/// A model's decay flags, from its config: matrices decay (embeddings, the LM head, the router,
/// each expert's matrices, dense layers); biases, layer norms and the stacks of per-expert biases
/// (two-dimensional, unlike a plain bias) do not.
#[test]
fn a_models_matrices_decay_and_its_biases_and_norms_do_not() {
    let config = semoe::model::gpt::GptConfig {
        dense_d_ff: 32,
        moe_every: 2,
        ..Default::default()
    };
    let specs = config.tensor_specs();
    assert!(specs.len() > 10, "{} tensors", specs.len());
    let mut seen = (0, 0);
    for spec in &specs {
        let name = spec.name.as_str();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        // Layer norms (`ln1.weight`, `ln_f.bias`, ...) and biases (`attn.bo`, `mlp.b1`, `moe.b2`).
        let want = !(name.contains(".ln") || name.starts_with("ln") || leaf.starts_with('b'));
        assert_eq!(spec.decay, want, "{name} {:?}", spec.shape);
        if spec.expert && matches!(leaf, "b1" | "b2") {
            assert_eq!(spec.shape.len(), 2, "{name}: a stack of per-expert biases");
            assert!(!spec.decay, "{name}: a stack of biases is not decayed");
            seen.0 += 1;
        }
        if spec.expert && matches!(leaf, "w1" | "w2") {
            assert!(spec.decay, "{name}: an expert's matrix decays");
            seen.1 += 1;
        }
    }
    assert!(seen.0 > 0 && seen.1 > 0, "no expert tensors among {specs:?}");
}
