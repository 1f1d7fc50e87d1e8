//! Every golden file in `tests/golden/moe/` (written by `tools/reference/gen_moe_golden.py`, PyTorch in
//! float64) is checked here against the f32 layer: outputs, losses, every gradient and the routing.
//! Dropping a new `.json` file into the folder adds a case; no code change is needed.
//!
//! Tolerance (see tests/golden/README.md): elementwise `|got - want| <= 1e-5 * (|want| + rms(want))`,
//! where `rms` is the root-mean-square of the whole expected tensor; scalars
//! `|got - want| <= 1e-5 * max(|want|, 1e-3)`. Routing must match exactly.

use semoe::kernels::{Cpu, Gelu};
use semoe::model::moe::{DropPolicy, MoeConfig, MoeLayer, MoeParams};
use serde_json::Value;
use std::path::{Path, PathBuf};

const RTOL: f64 = 1e-5;

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flat(i, out)),
        Value::Number(n) => out.push(n.as_f64().unwrap_or(f64::NAN)),
        Value::Bool(b) => out.push(if *b { 1.0 } else { 0.0 }),
        other => panic!("unexpected JSON value {other}"),
    }
}

fn tensor(case: &Value, key: &str) -> Vec<f64> {
    let v = case.get(key).unwrap_or_else(|| panic!("golden file lacks {key:?}"));
    let mut out = Vec::new();
    flat(v, &mut out);
    out
}

fn f32s(case: &Value, key: &str) -> Vec<f32> {
    tensor(case, key).into_iter().map(|v| v as f32).collect()
}

fn scalar(case: &Value, key: &str) -> f64 {
    case.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("golden file lacks scalar {key:?}"))
}

fn config_of(case: &Value) -> MoeConfig {
    let c = &case["config"];
    let int = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("config.{k} missing")) as usize;
    let num = |k: &str| c[k].as_f64().unwrap_or_else(|| panic!("config.{k} missing"));
    MoeConfig {
        d_model: int("d_model"),
        d_ff: int("d_ff"),
        experts: int("E"),
        k: int("k"),
        capacity_factor: num("capacity_factor"),
        min_capacity: int("min_capacity"),
        aux_coef: num("aux_coef"),
        gelu: c["gelu"].as_str().unwrap_or("erf").parse::<Gelu>().expect("gelu"),
        drop_policy: match c.get("drop_policy").and_then(Value::as_str).unwrap_or("position") {
            "position" => DropPolicy::Position,
            "probs" => DropPolicy::Probs,
            other => panic!("unknown drop_policy {other}"),
        },
        dropless: c.get("dropless").and_then(Value::as_bool).unwrap_or(false),
        z_coef: c.get("z_coef").and_then(Value::as_f64).unwrap_or(0.0),
        normalize: c.get("normalize").and_then(Value::as_bool).unwrap_or(true),
    }
}

/// Largest violation ratio `|got - want| / (RTOL * (|want| + rms))`: <= 1 passes.
fn worst_ratio(got: &[f32], want: &[f64]) -> (f64, usize) {
    assert_eq!(got.len(), want.len(), "length");
    let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len().max(1) as f64).sqrt();
    let mut worst = (0.0, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ratio = (g as f64 - w).abs() / (RTOL * (w.abs() + rms) + f64::MIN_POSITIVE);
        if ratio > worst.0 || ratio.is_nan() {
            worst = (ratio, i);
        }
    }
    worst
}

fn check_scalar(name: &str, got: f64, want: f64, failures: &mut Vec<String>) {
    if (got - want).abs() > RTOL * want.abs().max(1e-3) {
        failures.push(format!("{name}: got {got}, want {want}"));
    }
}

fn check_case(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("read golden file");
    let case: Value = serde_json::from_str(&text).expect("golden file is JSON");
    let config = config_of(&case);
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
    let cpu = Cpu::new(2).expect("cpu");
    let (out, cache) = layer.forward(&cpu, &x).expect("forward");
    let mut failures = Vec::new();

    // Routing, exactly.
    let s = x.len() / config.d_model;
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
    if out.stats.dropped != scalar(&case, "dropped") as usize {
        failures.push(format!("dropped {} != {}", out.stats.dropped, scalar(&case, "dropped")));
    }
    let capacity = case["capacity"].as_u64().map(|c| c as usize);
    if out.stats.capacity != capacity {
        failures.push(format!("capacity {:?} != {:?}", out.stats.capacity, capacity));
    }
    let (ratio, at) = worst_ratio(&cache.dispatch.weights, &tensor(&case, "g"));
    if ratio > 1.0 {
        failures.push(format!(
            "combine weights g: worst element {at} at {ratio:.2}x tolerance"
        ));
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
        let (ratio, at) = worst_ratio(got, &tensor(&case, name));
        if ratio.is_nan() || ratio > 1.0 {
            failures.push(format!("{name}: worst element {at} at {ratio:.2}x tolerance"));
        }
    }
    assert_eq!(s * config.d_model, x.len());
    failures
}

fn golden_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/moe");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/golden/moe exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_golden_file_matches_the_pytorch_reference() {
    let files = golden_files();
    assert!(files.len() >= 10, "expected the golden cases, found {}", files.len());
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
