//! The whole model against the PyTorch reference (`tools/reference/gpt_reference.py`, float64):
//! logits, losses, routing counts and every parameter gradient, for every file in
//! `tests/golden/gpt/`. Same tolerance rule as the MoE goldens (tests/golden/README.md).

use semoe::kernels::{Cpu, Gelu};
use semoe::model::gpt::{Gpt, GptConfig};
use semoe::model::moe::DropPolicy;
use serde_json::Value;
use std::path::{Path, PathBuf};

const RTOL: f64 = 1e-5;

fn flat(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flat(i, out)),
        Value::Number(n) => out.push(n.as_f64().unwrap_or(f64::NAN)),
        other => panic!("unexpected JSON value {other}"),
    }
}

fn tensor(v: &Value) -> Vec<f64> {
    let mut out = Vec::new();
    flat(v, &mut out);
    out
}

fn config_of(c: &Value) -> GptConfig {
    let int = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("config.{k}")) as usize;
    let num = |k: &str| c[k].as_f64().unwrap_or_else(|| panic!("config.{k}"));
    GptConfig {
        vocab: int("vocab"),
        block_size: int("block_size"),
        d_model: int("d_model"),
        n_layer: int("n_layer"),
        n_head: int("n_head"),
        d_ff: int("d_ff"),
        dense_d_ff: int("dense_d_ff"),
        moe_every: int("moe_every"),
        experts: int("experts"),
        k: int("k"),
        capacity_factor: num("capacity_factor"),
        min_capacity: int("min_capacity"),
        dropless: c["dropless"].as_bool().unwrap_or(false),
        drop_policy: if c["drop_policy"] == "probs" {
            DropPolicy::Probs
        } else {
            DropPolicy::Position
        },
        normalize: c["normalize"].as_bool().unwrap_or(true),
        aux_coef: num("aux_coef"),
        z_coef: num("z_coef"),
        gelu: c["gelu"].as_str().unwrap_or("erf").parse::<Gelu>().expect("gelu"),
    }
}

fn worst_ratio(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len().max(1) as f64).sqrt();
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / (RTOL * (w.abs() + rms) + f64::MIN_POSITIVE))
        .fold(0.0, |a, r| if r.is_nan() { f64::INFINITY } else { a.max(r) })
}

fn check(path: &Path) -> Vec<String> {
    let case: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    let config = config_of(&case["config"]);
    let groups = case["config"]["groups"].as_u64().expect("groups") as usize;
    let mut model = Gpt::<f32>::zeros(&config).expect("config");
    let names: Vec<String> = model.tensors().into_iter().map(|(n, _, _)| n).collect();
    for (name, buf) in names.iter().zip(model.buffers_mut()) {
        let want = tensor(&case["params"][name]);
        assert_eq!(want.len(), buf.len(), "{name}");
        *buf = want.iter().map(|&v| v as f32).collect();
    }
    let idx: Vec<u32> = tensor(&case["idx"]).iter().map(|&v| v as u32).collect();
    let targets: Vec<u32> = tensor(&case["targets"]).iter().map(|&v| v as u32).collect();
    let (b, t) = (case["idx"].as_array().expect("idx").len(), config.block_size);
    let seqs = b / groups;
    let cpu = Cpu::new(2).expect("cpu");
    let mut grads = model.zeros_like().expect("zeros");
    let mut failures = Vec::new();

    // Logits straight from the forward pass, over the whole batch at once (no MoE group split
    // matters there only through routing, so compare per group).
    let mut ce = 0.0;
    let mut router = vec![0.0; case["aux"].as_array().map_or(0, |a| a.len())];
    let mut logits = Vec::new();
    for g in 0..groups {
        let span = g * seqs * t..(g + 1) * seqs * t;
        logits.extend(model.logits(&cpu, &idx[span.clone()], seqs).expect("logits"));
        let out = model
            .forward_backward(
                &cpu,
                &idx[span.clone()],
                &targets[span],
                seqs,
                1.0 / (b * t) as f32,
                1.0 / groups as f32,
                &mut grads,
            )
            .expect("forward_backward");
        ce += out.ce_sum;
        for (l, r) in out.router_loss.iter().enumerate() {
            router[l] += r / groups as f64;
        }
        for (l, stats) in out.moe_stats.iter().enumerate() {
            let want = &case["routing"][l][g];
            let counts: Vec<usize> = tensor(&want["expert_counts"]).iter().map(|&v| v as usize).collect();
            if stats.expert_tokens != counts || stats.dropped as u64 != want["dropped"].as_u64().unwrap_or(u64::MAX) {
                failures.push(format!("routing of MoE layer {l}, group {g} differs"));
            }
        }
    }
    let ratio = worst_ratio(&logits, &tensor(&case["logits"]));
    if ratio > 1.0 {
        failures.push(format!("logits at {ratio:.2}x tolerance"));
    }
    let ce = ce / (b * t) as f64;
    let loss = ce + router.iter().sum::<f64>();
    for (name, got, want) in [
        ("ce_loss", ce, case["ce_loss"].as_f64().expect("ce_loss")),
        ("loss", loss, case["loss"].as_f64().expect("loss")),
    ] {
        if (got - want).abs() > RTOL * want.abs().max(1e-3) {
            failures.push(format!("{name}: got {got}, want {want}"));
        }
    }
    for (l, want) in tensor(&case["aux"]).iter().enumerate() {
        if (router[l] - want).abs() > RTOL * want.abs().max(1e-3) {
            failures.push(format!("aux of MoE layer {l}: got {}, want {want}", router[l]));
        }
    }
    for (name, _, got) in grads.tensors() {
        let ratio = worst_ratio(got, &tensor(&case["grads"][&name]));
        if ratio > 1.0 {
            failures.push(format!("grad {name} at {ratio:.2}x tolerance"));
        }
    }
    failures
}

#[test]
fn every_gpt_golden_file_matches_the_pytorch_reference() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gpt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/golden/gpt")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "expected the golden cases");
    let report: Vec<String> = files
        .iter()
        .flat_map(|p| check(p).into_iter().map(move |f| format!("{}: {f}", p.display())))
        .collect();
    assert!(report.is_empty(), "mismatches:\n{}", report.join("\n"));
}
