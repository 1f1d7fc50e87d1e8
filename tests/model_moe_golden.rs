//! Every golden file in `tests/golden/moe/` (written by `tools/reference/gen_moe_golden.py`, PyTorch in
//! float64) is checked here against the f32 layer: outputs, losses, every gradient and the routing.
//! A new case is a `.json` file in the folder and a row in the README's case table (the test
//! requires exactly the files the table lists); no code change is needed.
//!
//! Tolerance (see tests/golden/README.md): elementwise `|got - want| <= 1e-5 * (|want| + rms(want))`,
//! where `rms` is the root-mean-square of the whole expected tensor; scalars
//! `|got - want| <= 1e-5 * max(|want|, 1e-3)`. Routing must match exactly.

mod common;

use common::within;
use semoe::kernels::{Cpu, Gelu};
use semoe::model::moe::{DropPolicy, MoeConfig, MoeLayer, MoeParams};
use serde_json::Value;
use std::path::Path;

const RTOL: f64 = 1e-5;

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flat(i, out)),
        Value::Number(n) => out.push(n.as_f64().unwrap_or(f64::NAN)),
        Value::Bool(b) => out.push(if *b { 1.0 } else { 0.0 }),
        other => panic!("unexpected JSON value {other}"),
    }
}

/// A required key.
fn field<'a>(case: &'a Value, key: &str) -> &'a Value {
    case.get(key)
        .unwrap_or_else(|| panic!("golden file lacks the required key {key:?}"))
}

fn flatten(v: &Value) -> Vec<f64> {
    let mut out = Vec::new();
    flat(v, &mut out);
    out
}

fn tensor(case: &Value, key: &str) -> Vec<f64> {
    flatten(field(case, key))
}

fn f32s(case: &Value, key: &str) -> Vec<f32> {
    tensor(case, key).into_iter().map(|v| v as f32).collect()
}

fn scalar(case: &Value, key: &str) -> f64 {
    field(case, key)
        .as_f64()
        .unwrap_or_else(|| panic!("golden key {key:?} is not a number"))
}

/// Every `config` key is required (tests/golden/README.md).
fn config_of(case: &Value) -> MoeConfig {
    let c = field(case, "config");
    let get = |k: &str| {
        c.get(k)
            .unwrap_or_else(|| panic!("config lacks the required key {k:?}"))
    };
    let int = |k: &str| {
        get(k)
            .as_u64()
            .unwrap_or_else(|| panic!("config.{k} is not an integer")) as usize
    };
    let num = |k: &str| get(k).as_f64().unwrap_or_else(|| panic!("config.{k} is not a number"));
    let flag = |k: &str| get(k).as_bool().unwrap_or_else(|| panic!("config.{k} is not a bool"));
    let text = |k: &str| get(k).as_str().unwrap_or_else(|| panic!("config.{k} is not a string"));
    MoeConfig {
        d_model: int("d_model"),
        d_ff: int("d_ff"),
        experts: int("E"),
        k: int("k"),
        capacity_factor: num("capacity_factor"),
        min_capacity: int("min_capacity"),
        aux_coef: num("aux_coef"),
        gelu: text("gelu").parse::<Gelu>().expect("gelu"),
        drop_policy: match text("drop_policy") {
            "position" => DropPolicy::Position,
            "probs" => DropPolicy::Probs,
            other => panic!("unknown drop_policy {other}"),
        },
        dropless: flag("dropless"),
        z_coef: num("z_coef"),
        normalize: flag("normalize"),
    }
}

/// Largest violation ratio `|got - want| / (RTOL * (|want| + rms))`: <= 1 passes. A length
/// mismatch, or a non-finite value on either side, is infinitely bad.
fn worst_ratio(got: &[f32], want: &[f64]) -> (f64, usize) {
    if got.len() != want.len() {
        return (f64::INFINITY, got.len().min(want.len()));
    }
    let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len().max(1) as f64).sqrt();
    let mut worst = (0.0, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = RTOL * (w.abs() + rms) + f64::MIN_POSITIVE;
        let ratio = if within(g as f64, w, f64::INFINITY) {
            (g as f64 - w).abs() / tol
        } else {
            f64::INFINITY
        };
        if ratio > worst.0 {
            worst = (ratio, i);
        }
    }
    worst
}

fn check_tensor(name: &str, got: &[f32], want: &[f64], failures: &mut Vec<String>) {
    let (ratio, at) = worst_ratio(got, want);
    if ratio.is_nan() || ratio > 1.0 {
        failures.push(format!(
            "{name}: worst element {at} at {ratio:.2}x tolerance (lengths {} and {})",
            got.len(),
            want.len()
        ));
    }
}

fn check_scalar(name: &str, got: f64, want: f64, failures: &mut Vec<String>) {
    if !within(got, want, RTOL * want.abs().max(1e-3)) {
        failures.push(format!("{name}: got {got}, want {want}"));
    }
}

fn check_case(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("read golden file");
    let case: Value = serde_json::from_str(&text).expect("golden file is JSON");
    let mut failures = Vec::new();
    // Identification is optional; a name, when present, is the file's stem.
    if let Some(name) = case.get("name") {
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        if name.as_str() != Some(&*stem) {
            failures.push(format!("name {name} is not the file's stem {stem:?}"));
        }
    }
    let config = config_of(&case);
    let s = field(&case["config"], "S").as_u64().expect("config.S") as usize;
    let params = MoeParams {
        wg: f32s(&case, "wg"),
        w1: f32s(&case, "w1"),
        b1: f32s(&case, "b1"),
        w2: f32s(&case, "w2"),
        b2: f32s(&case, "b2"),
    };
    let layer = MoeLayer::new(config.clone(), params).expect("valid golden config");
    let x = f32s(&case, "x");
    let gy = f32s(&case, "gy");
    assert_eq!(x.len(), s * config.d_model, "x is [S][d_model]");
    assert_eq!(gy.len(), s * config.d_model, "gy is [S][d_model]");
    let cpu = Cpu::new(2).expect("cpu");
    let (out, cache) = layer.forward(&cpu, &x).expect("forward");

    // Routing, exactly.
    let r = &cache.dispatch.routing;
    let idx: Vec<u32> = tensor(&case, "idx").iter().map(|&v| v as u32).collect();
    let keep: Vec<bool> = tensor(&case, "keep").iter().map(|&v| v != 0.0).collect();
    let loc: Vec<i64> = tensor(&case, "loc").iter().map(|&v| v as i64).collect();
    if r.expert != idx {
        failures.push("routing idx differs".into());
    }
    if r.keep != keep {
        failures.push("routing keep differs".into());
    }
    if r.loc != loc {
        failures.push("routing loc differs".into());
    }
    let counts: Vec<usize> = tensor(&case, "expert_counts").iter().map(|&v| v as usize).collect();
    if out.stats.expert_tokens != counts {
        failures.push(format!("expert counts {:?} != {:?}", out.stats.expert_tokens, counts));
    }
    let dropped = field(&case, "dropped").as_u64().expect("dropped is an integer") as usize;
    if out.stats.dropped != dropped {
        failures.push(format!("dropped {} != {dropped}", out.stats.dropped));
    }
    // Required, null when dropless.
    let capacity = match field(&case, "capacity") {
        Value::Null => None,
        c => Some(c.as_u64().expect("capacity is an integer or null") as usize),
    };
    if capacity.is_none() != config.dropless {
        failures.push(format!("capacity {capacity:?} but dropless {}", config.dropless));
    }
    if out.stats.capacity != capacity {
        failures.push(format!("capacity {:?} != {:?}", out.stats.capacity, capacity));
    }
    let g = tensor(&case, "g");
    check_tensor("combine weights g", &cache.dispatch.weights, &g, &mut failures);
    // The k = 2 aliases are optional; when present they are rows 0 and 1 of idx, keep, loc, g.
    for (alias, rows) in [
        ("idx", tensor(&case, "idx")),
        ("keep", tensor(&case, "keep")),
        ("loc", tensor(&case, "loc")),
        ("g", g),
    ] {
        for j in 0..2 {
            let key = format!("{alias}{}", j + 1);
            if let Some(v) = case.get(&key) {
                let row = rows.get(j * s..(j + 1) * s);
                if config.k != 2 || row != Some(&flatten(v)[..]) {
                    failures.push(format!("{key} is not row {j} of {alias} (k = {})", config.k));
                }
            }
        }
    }

    // Losses.
    check_scalar("l_aux", out.l_aux as f64, scalar(&case, "l_aux"), &mut failures);
    check_scalar("z_loss", out.z_loss as f64, scalar(&case, "z_loss"), &mut failures);
    let dot: f64 = out.y.iter().zip(&gy).map(|(&y, &g)| y as f64 * g as f64).sum();
    let loss = dot + config.aux_coef * out.l_aux as f64 + config.z_coef * out.z_loss as f64;
    check_scalar("loss", loss, scalar(&case, "loss"), &mut failures);

    // Output and gradients.
    let mut grads = MoeParams::zeros(&config);
    let y = out.y.clone();
    let grad_x = layer.backward(&cpu, &x, cache, &gy, &mut grads).expect("backward");
    for (name, got) in [
        ("y", &y),
        ("grad_x", &grad_x),
        ("grad_wg", &grads.wg),
        ("grad_w1", &grads.w1),
        ("grad_b1", &grads.b1),
        ("grad_w2", &grads.w2),
        ("grad_b2", &grads.b2),
    ] {
        check_tensor(name, got, &tensor(&case, name), &mut failures);
    }
    failures
}

#[test]
fn every_golden_file_matches_the_pytorch_reference() {
    // Exactly the cases of the table in tests/golden/README.md: a missing file fails.
    let cases = common::readme_cases("## Cases");
    let files = common::golden_files("moe", &cases);
    let mut report = Vec::new();
    for path in &files {
        for failure in check_case(path) {
            report.push(format!(
                "{}: {failure}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ));
        }
    }
    assert!(report.is_empty(), "golden mismatches:\n{}", report.join("\n"));
}
