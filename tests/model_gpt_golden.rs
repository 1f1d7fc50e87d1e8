//! The whole model against the PyTorch reference (`tools/reference/gpt_reference.py`, float64):
//! logits, losses, routing counts and every parameter gradient, for every file in
//! `tests/golden/gpt/`. Same tolerance rule as the MoE goldens (tests/golden/README.md).

mod common;

use common::within;
use semoe::kernels::{Cpu, Gelu};
use semoe::model::gpt::{Ffn, Gpt, GptConfig};
use semoe::model::layers::LN_EPS;
use semoe::model::moe::DropPolicy;
use serde_json::Value;
use std::path::Path;

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

/// A required key of `v`.
fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("golden file lacks the required key {key:?}"))
}

fn int(v: &Value, key: &str) -> usize {
    field(v, key)
        .as_u64()
        .unwrap_or_else(|| panic!("{key:?} is not an integer")) as usize
}

/// Every `config` key is required (tests/golden/README.md).
fn config_of(c: &Value) -> GptConfig {
    let num = |k: &str| {
        field(c, k)
            .as_f64()
            .unwrap_or_else(|| panic!("config.{k} is not a number"))
    };
    let flag = |k: &str| {
        field(c, k)
            .as_bool()
            .unwrap_or_else(|| panic!("config.{k} is not a bool"))
    };
    let text = |k: &str| {
        field(c, k)
            .as_str()
            .unwrap_or_else(|| panic!("config.{k} is not a string"))
    };
    let config = GptConfig {
        vocab: int(c, "vocab"),
        block_size: int(c, "block_size"),
        d_model: int(c, "d_model"),
        n_layer: int(c, "n_layer"),
        n_head: int(c, "n_head"),
        d_ff: int(c, "d_ff"),
        dense_d_ff: int(c, "dense_d_ff"),
        moe_every: int(c, "moe_every"),
        experts: int(c, "experts"),
        k: int(c, "k"),
        capacity_factor: num("capacity_factor"),
        min_capacity: int(c, "min_capacity"),
        dropless: flag("dropless"),
        drop_policy: match text("drop_policy") {
            "position" => DropPolicy::Position,
            "probs" => DropPolicy::Probs,
            other => panic!("unknown drop_policy {other}"),
        },
        normalize: flag("normalize"),
        aux_coef: num("aux_coef"),
        z_coef: num("z_coef"),
        gelu: text("gelu").parse::<Gelu>().expect("gelu"),
    };
    // Read so that a file without them fails; the model has no other setting for them.
    assert_eq!(num("ln_eps"), LN_EPS, "config.ln_eps: the model's LayerNorm epsilon");
    int(c, "groups");
    config
}

/// Largest `|got - want| / (RTOL * (|want| + rms(want)))`; infinite on a length mismatch or a
/// non-finite value.
fn worst_ratio(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len().max(1) as f64).sqrt();
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if within(g as f64, w, f64::INFINITY) {
                (g as f64 - w).abs() / (RTOL * (w.abs() + rms) + f64::MIN_POSITIVE)
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

/// The names of a `{name: tensor}` object, sorted.
fn keys(v: &Value, what: &str) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not an object"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

fn check(path: &Path) -> Vec<String> {
    let case: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    let mut failures = Vec::new();
    if let Some(name) = case.get("name") {
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        if name.as_str() != Some(&*stem) {
            failures.push(format!("name {name} is not the file's stem {stem:?}"));
        }
    }
    let config = config_of(field(&case, "config"));
    let groups = int(field(&case, "config"), "groups");
    let mut model = Gpt::<f32>::zeros(&config).expect("config");
    let names: Vec<String> = model.tensors().into_iter().map(|(n, _, _)| n).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        keys(field(&case, "params"), "params"),
        sorted,
        "params: one per model tensor"
    );
    assert_eq!(
        keys(field(&case, "grads"), "grads"),
        sorted,
        "grads: one per model tensor"
    );
    for (name, buf) in names.iter().zip(model.buffers_mut()) {
        let want = tensor(&case["params"][name]);
        assert_eq!(want.len(), buf.len(), "{name}");
        *buf = want.iter().map(|&v| v as f32).collect();
    }
    let moe: Vec<usize> = (0..model.blocks.len())
        .filter(|&l| matches!(model.blocks[l].ffn, Ffn::Moe(_)))
        .collect();
    // Optional: derived from moe_every, checked when present.
    if let Some(want) = case.get("moe_layers") {
        let want: Vec<usize> = tensor(want).iter().map(|&v| v as usize).collect();
        if want != moe {
            failures.push(format!("MoE layers {moe:?} != {want:?}"));
        }
    }
    let idx: Vec<u32> = tensor(field(&case, "idx")).iter().map(|&v| v as u32).collect();
    let targets: Vec<u32> = tensor(field(&case, "targets")).iter().map(|&v| v as u32).collect();
    let (b, t) = (case["idx"].as_array().expect("idx").len(), config.block_size);
    assert_eq!(idx.len(), b * t, "idx is [B][T]");
    assert_eq!(targets.len(), b * t, "targets is [B][T]");
    assert_eq!(b % groups, 0, "B is a multiple of the groups");
    let seqs = b / groups;
    let want_aux = tensor(field(&case, "aux"));
    assert_eq!(want_aux.len(), moe.len(), "aux: one per MoE layer");
    let routing = field(&case, "routing");
    let cpu = Cpu::new(2).expect("cpu");
    let mut grads = model.zeros_like().expect("zeros");

    // Logits straight from the forward pass, group by group (the MoE group split matters through
    // routing).
    let mut ce = 0.0;
    let mut router = vec![0.0; moe.len()];
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
        assert_eq!(out.router_loss.len(), moe.len(), "one router loss per MoE layer");
        assert_eq!(out.moe_stats.len(), moe.len(), "one routing record per MoE layer");
        for (l, r) in out.router_loss.iter().enumerate() {
            router[l] += r / groups as f64;
        }
        for (l, stats) in out.moe_stats.iter().enumerate() {
            let want = &routing[l][g];
            let counts: Vec<usize> = tensor(field(want, "expert_counts"))
                .iter()
                .map(|&v| v as usize)
                .collect();
            let capacity = match field(want, "capacity") {
                Value::Null => None,
                c => Some(c.as_u64().expect("capacity is an integer or null") as usize),
            };
            if stats.expert_tokens != counts || stats.dropped != int(want, "dropped") || stats.capacity != capacity {
                failures.push(format!(
                    "routing of MoE layer {l}, group {g} differs: {stats:?} vs counts {counts:?}, dropped {}, capacity {capacity:?}",
                    want["dropped"]
                ));
            }
            // Optional (for debugging): the unweighted terms behind this group's router loss.
            if let Some(parts) = case.get("aux_parts") {
                let part = |k: &str| parts[l][g][k].as_f64().unwrap_or(f64::NAN);
                let weighted = config.aux_coef * part("l_aux") + config.z_coef * part("z_loss");
                if !within(out.router_loss[l], weighted, RTOL * weighted.abs().max(1e-3)) {
                    failures.push(format!(
                        "router loss of MoE layer {l}, group {g}: got {}, aux_parts give {weighted}",
                        out.router_loss[l]
                    ));
                }
            }
        }
    }
    let ratio = worst_ratio(&logits, &tensor(field(&case, "logits")));
    if ratio.is_nan() || ratio > 1.0 {
        failures.push(format!("logits at {ratio:.2}x tolerance"));
    }
    let ce = ce / (b * t) as f64;
    let loss = ce + router.iter().sum::<f64>();
    for (name, got, want) in [
        ("ce_loss", ce, field(&case, "ce_loss").as_f64().expect("ce_loss")),
        ("loss", loss, field(&case, "loss").as_f64().expect("loss")),
    ] {
        if !within(got, want, RTOL * want.abs().max(1e-3)) {
            failures.push(format!("{name}: got {got}, want {want}"));
        }
    }
    for (l, want) in want_aux.iter().enumerate() {
        if !within(router[l], *want, RTOL * want.abs().max(1e-3)) {
            failures.push(format!("aux of MoE layer {l}: got {}, want {want}", router[l]));
        }
    }
    for (name, _, got) in grads.tensors() {
        let ratio = worst_ratio(got, &tensor(&case["grads"][&name]));
        if ratio.is_nan() || ratio > 1.0 {
            failures.push(format!("grad {name} at {ratio:.2}x tolerance"));
        }
    }
    failures
}

#[test]
fn every_gpt_golden_file_matches_the_pytorch_reference() {
    // Exactly the cases of the table in tests/golden/README.md: a missing file fails.
    let cases = common::readme_cases("# GPT-MoE model golden vectors");
    let files = common::golden_files("gpt", &cases);
    let report: Vec<String> = files
        .iter()
        .flat_map(|p| check(p).into_iter().map(move |f| format!("{}: {f}", p.display())))
        .collect();
    assert!(report.is_empty(), "mismatches:\n{}", report.join("\n"));
}
