//! The MoE layer on a GPU (src/model/cuda/moe.rs) against the CPU layer.
//!
//! - The kernels compile with NVRTC wherever the NVRTC library is found (no GPU needed), so a
//!   kernel that does not compile is caught before a GPU is at hand; skipped, saying so, without
//!   NVRTC or without the `cuda` feature.
//! - With a GPU: forward and backward agree with the CPU layer within 1e-5 relative (the norm of
//!   the difference over the norm of the CPU's result) for every output and gradient, with the
//!   same routing (the same per-expert loads and drops); a second run gives the same bits; a
//!   non-finite input is an error naming the token. Skipped, saying so, without a GPU.

mod common;

use semoe::kernels::cuda::{compile_kernels, CudaDevice, Precision, KERNEL_NAMES};
use semoe::kernels::{Cpu, Gelu};
use semoe::model::cuda::{check_moe_config, CudaMoeLayer};
use semoe::model::moe::{DropPolicy, MoeConfig, MoeLayer, MoeParams};

const TOLERANCE: f64 = 1e-5;

#[test]
fn the_kernels_compile_with_nvrtc() {
    let ptx = match compile_kernels() {
        Ok(ptx) => ptx,
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("without CUDA support") || msg.contains("NVRTC library"),
                "an NVRTC that is present failed to compile the kernels: {msg}"
            );
            eprintln!("skipping: {msg}");
            return;
        }
    };
    assert_eq!(
        KERNEL_NAMES.len(),
        25,
        "the kernels of moe_kernels.cu and model_kernels.cu"
    );
    for kernel in KERNEL_NAMES {
        assert!(
            ptx.contains(&format!(".entry {kernel}(")),
            "the PTX has no entry {kernel}"
        );
    }
}

#[test]
fn the_probs_drop_policy_is_refused_with_a_clear_error() {
    let config = MoeConfig {
        drop_policy: DropPolicy::Probs,
        ..MoeConfig::default()
    };
    let err = check_moe_config(&config)
        .expect_err("probs is not on the GPU")
        .to_string();
    assert!(err.contains("position") && err.contains("probs"), "unclear: {err}");
    // Dropless routing drops nothing, so the policy does not matter there.
    check_moe_config(&MoeConfig {
        dropless: true,
        ..config
    })
    .expect("dropless with probs is fine");
}

fn gpu() -> Option<CudaDevice> {
    common::gpu_or_skip()
}

fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    common::assert_norm_close(name, got, want, TOLERANCE);
}

struct Run {
    y: Vec<f32>,
    losses: [f32; 2],
    gx: Vec<f32>,
    grads: MoeParams<f32>,
    loads: Vec<usize>,
    dropped: usize,
}

fn gpu_run(dev: &CudaDevice, config: &MoeConfig, params: &MoeParams<f32>, x: &[f32], gy: &[f32]) -> Run {
    let mut layer = CudaMoeLayer::new(dev, config.clone(), params, Precision::F32).expect("the GPU layer");
    let (xd, gyd) = (layer.upload(x).expect("x"), layer.upload(gy).expect("gy"));
    let (y, cache) = layer.forward(&xd).expect("forward");
    let (losses, loads, dropped) = (
        [cache.l_aux, cache.z_loss],
        cache.stats.expert_tokens.clone(),
        cache.stats.dropped,
    );
    let gx = layer.backward(&xd, cache, &gyd, 1.0).expect("backward");
    Run {
        y: layer.download(&y).expect("y"),
        losses,
        gx: layer.download(&gx).expect("gx"),
        grads: layer.gradients().expect("gradients"),
        loads,
        dropped,
    }
}

fn cpu_run(config: &MoeConfig, params: &MoeParams<f32>, x: &[f32], gy: &[f32]) -> Run {
    let cpu = Cpu::new(1).expect("cpu");
    let layer = MoeLayer::new(config.clone(), params.clone()).expect("layer");
    let (out, cache) = layer.forward(&cpu, x).expect("forward");
    let mut grads = MoeParams::zeros(config);
    let gx = layer.backward(&cpu, x, cache, gy, &mut grads).expect("backward");
    Run {
        y: out.y,
        losses: [out.l_aux, out.z_loss],
        gx,
        grads,
        loads: out.stats.expert_tokens,
        dropped: out.stats.dropped,
    }
}

fn configs() -> Vec<(&'static str, MoeConfig)> {
    let base = MoeConfig {
        d_model: 48,
        d_ff: 80,
        experts: 6,
        k: 2,
        z_coef: 0.01,
        ..MoeConfig::default()
    };
    vec![
        ("top-2, capacity 1.0", base.clone()),
        (
            "top-2, capacity 0.5 (drops)",
            MoeConfig {
                capacity_factor: 0.5,
                ..base.clone()
            },
        ),
        (
            "top-1, tanh GELU",
            MoeConfig {
                k: 1,
                gelu: Gelu::Tanh,
                ..base.clone()
            },
        ),
        (
            "top-3, dropless, not renormalised",
            MoeConfig {
                k: 3,
                dropless: true,
                normalize: false,
                ..base
            },
        ),
    ]
}

#[test]
fn the_gpu_layer_agrees_with_the_cpu_layer() {
    let Some(dev) = gpu() else { return };
    let tokens = 300;
    for (name, config) in configs() {
        let params = MoeParams::<f32>::init(&config, 11).expect("init");
        let x = semoe::bench::randn(tokens * config.d_model, 12);
        let gy = semoe::bench::randn(tokens * config.d_model, 13);
        let (g, c) = (
            gpu_run(&dev, &config, &params, &x, &gy),
            cpu_run(&config, &params, &x, &gy),
        );
        assert_eq!(g.loads, c.loads, "{name}: per-expert loads");
        assert_eq!(g.dropped, c.dropped, "{name}: drops");
        assert_close(&format!("{name}: y"), &g.y, &c.y);
        assert_close(&format!("{name}: l_aux, z_loss"), &g.losses, &c.losses);
        assert_close(&format!("{name}: dL/dx"), &g.gx, &c.gx);
        for ((n, gg), (_, cg)) in g.grads.named().iter().zip(c.grads.named().iter()) {
            assert_close(&format!("{name}: gradient of {n}"), gg, cg);
        }
        eprintln!("{name}: agrees ({} dropped)", g.dropped);
    }
}

#[test]
fn the_gpu_layer_repeats_bit_for_bit() {
    let Some(dev) = gpu() else { return };
    let (_, config) = configs().remove(1);
    let params = MoeParams::<f32>::init(&config, 21).expect("init");
    let x = semoe::bench::randn(500 * config.d_model, 22);
    let gy = semoe::bench::randn(500 * config.d_model, 23);
    let (a, b) = (
        gpu_run(&dev, &config, &params, &x, &gy),
        gpu_run(&dev, &config, &params, &x, &gy),
    );
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.y), bits(&b.y));
    assert_eq!(bits(&a.gx), bits(&b.gx));
    assert_eq!(bits(&a.losses), bits(&b.losses));
    for ((n, ga), (_, gb)) in a.grads.named().iter().zip(b.grads.named().iter()) {
        assert_eq!(bits(ga), bits(gb), "gradient of {n}");
    }
}

#[test]
fn a_non_finite_input_names_the_token() {
    let Some(dev) = gpu() else { return };
    let (_, config) = configs().remove(0);
    let params = MoeParams::<f32>::init(&config, 31).expect("init");
    let layer = CudaMoeLayer::new(&dev, config.clone(), &params, Precision::F32).expect("layer");
    let mut x = vec![0.25f32; 10 * config.d_model];
    x[7 * config.d_model + 3] = f32::NAN;
    let xd = layer.upload(&x).expect("x");
    let err = layer.forward(&xd).err().expect("NaN must be refused").to_string();
    assert!(err.contains("token 7"), "unclear: {err}");
    let short = layer.upload(&x[..config.d_model + 1]).expect("x");
    let err = layer
        .forward(&short)
        .err()
        .expect("a partial row must be refused")
        .to_string();
    assert!(err.contains("d_model"), "unclear: {err}");
}
