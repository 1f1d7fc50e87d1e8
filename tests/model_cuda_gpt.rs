//! The whole model on a GPU (src/model/cuda/gpt.rs) against the CPU model: one group's loss,
//! router losses, MoE loads and every parameter's gradient, a model with a dense and an MoE block;
//! 20 training steps against the CPU's plain loop (loss within 1e-4) and against a second GPU run
//! (bit for bit); a run within a Device budget (the same bits, the pool's peak within it) and a
//! model too large for one. Skipped, saying so, without a GPU (the kernels' compilation is checked
//! by model_cuda_moe.rs). What `train.device = "cuda"` refuses is checked everywhere.

mod common;

use semoe::config::ComputeDevice;
use semoe::kernels::cuda::{CudaDevice, Gpu, Precision};
use semoe::kernels::Cpu;
use semoe::model::cuda::CudaGpt;
use semoe::model::gpt::{Gpt, GptConfig};
use semoe::train::Trainer;

/// Relative tolerance of one step's results: f32 through two blocks, with cuBLAS summing in its
/// own order and the GPU's `expf`/`erff` a few ulp from the CPU's.
const TOLERANCE: f64 = 1e-4;

fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    common::assert_norm_close(name, got, want, TOLERANCE);
}

fn config() -> GptConfig {
    GptConfig {
        vocab: 64,
        block_size: 16,
        d_model: 32,
        n_layer: 2,
        n_head: 4,
        d_ff: 48,
        moe_every: 2,
        experts: 4,
        k: 2,
        z_coef: 0.01,
        ..GptConfig::default()
    }
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

#[test]
fn one_group_on_the_gpu_agrees_with_the_cpu_model() {
    let Some(dev) = common::gpu_or_skip() else {
        return;
    };
    let c = config();
    let model = Gpt::<f32>::init(&c, 3).expect("init");
    let (seqs, t) = (3, c.block_size);
    let idx = tokens(seqs * t, c.vocab, 5);
    let targets = tokens(seqs * t, c.vocab, 6);
    let ce_scale = 1.0 / (seqs * t) as f32;

    let cpu = Cpu::new(1).expect("cpu");
    let mut grads = model.zeros_like().expect("zeros");
    let want = model
        .forward_backward(&cpu, &idx, &targets, seqs, ce_scale, 1.0, &mut grads)
        .expect("CPU pass");
    let want_eval = model.evaluate(&cpu, &idx, &targets, seqs).expect("CPU evaluation");

    let gpu = Gpu::new(&dev, Precision::F32).expect("gpu");
    let mut on_gpu = CudaGpt::new(&gpu, &model).expect("the model on the GPU");
    let round_trip = on_gpu.to_model().expect("parameters back");
    assert_eq!(round_trip.tensors().len(), model.tensors().len(), "tensor count");
    for ((name, _, a), (want_name, _, b)) in round_trip.tensors().iter().zip(model.tensors().iter()) {
        assert_eq!(name, want_name, "tensor order");
        assert_eq!(a, b, "{name} changed on its way to the GPU and back");
    }
    let got = on_gpu
        .forward_backward(&idx, &targets, seqs, ce_scale, 1.0)
        .expect("GPU pass");
    let got_grads = on_gpu.gradients().expect("gradients");
    let got_eval = on_gpu.evaluate(&idx, &targets, seqs).expect("GPU evaluation");

    assert_close("cross-entropy", &[got.ce_sum as f32], &[want.ce_sum as f32]);
    assert_close("evaluation", &[got_eval.ce_sum as f32], &[want_eval.ce_sum as f32]);
    let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    assert_close("router losses", &as_f32(&got.router_loss), &as_f32(&want.router_loss));
    assert_eq!(got.moe_stats, want.moe_stats, "MoE loads and drops");
    let want_norm = semoe::train::trainer::model_grad_norm(&model, &grads.buffers_mut());
    let got_norm = on_gpu.gradient_norm().expect("norm");
    assert!(
        ((got_norm - want_norm) / want_norm).abs() <= TOLERANCE,
        "gradient norm: GPU {got_norm}, CPU {want_norm}"
    );
    let (g, w) = (got_grads.tensors(), grads.tensors());
    assert_eq!(g.len(), w.len(), "tensor count");
    for ((name, _, a), (want_name, _, b)) in g.iter().zip(w.iter()) {
        assert_eq!(name, want_name);
        assert_close(&format!("gradient of {name}"), a, b);
    }

    // A second pass accumulates onto the first (the same batch: twice the gradients), and
    // zeroing clears everything.
    on_gpu
        .forward_backward(&idx, &targets, seqs, ce_scale, 1.0)
        .expect("second GPU pass");
    let twice = on_gpu.gradients().expect("gradients");
    let (t, once) = (twice.tensors(), got_grads.tensors());
    assert_eq!(t.len(), once.len(), "tensor count");
    for ((name, _, a), (once_name, _, b)) in t.iter().zip(once.iter()) {
        assert_eq!(name, once_name, "tensor order");
        let doubled: Vec<f32> = b.iter().map(|x| 2.0 * x).collect();
        assert_close(&format!("accumulated gradient of {name}"), a, &doubled);
    }
    on_gpu.zero_gradients().expect("zero");
    let zeros = on_gpu.gradients().expect("gradients");
    assert_eq!(zeros.tensors().len(), g.len(), "tensor count");
    assert!(zeros.tensors().iter().all(|(_, _, b)| b.iter().all(|&v| v == 0.0)));
}

#[test]
fn training_on_the_gpu_refuses_what_it_cannot_do() {
    let mut c = common::small_config(5);
    c.train.device = ComputeDevice::Cuda;
    c.train.workers = 2;
    let err = c.validate().expect_err("two workers on one GPU").to_string();
    assert!(
        err.contains("train.device") && err.contains("workers"),
        "unclear: {err}"
    );
    c.train.workers = 0;
    c.model.drop_policy = semoe::model::moe::DropPolicy::Probs;
    let err = c.validate().expect_err("probs on the GPU").to_string();
    assert!(err.contains("train.device") && err.contains("probs"), "unclear: {err}");
    c.model.drop_policy = semoe::model::moe::DropPolicy::Position;
    c.validate().expect("a GPU run of the small model is valid");
    if CudaDevice::count() == 0 {
        let tmp = common::TempDir::new("cuda-refused");
        let err = Trainer::new(c, &tmp.path().join("run"))
            .err()
            .expect("no GPU here")
            .to_string();
        assert!(err.contains("GPU 0"), "unclear: {err}");
    }
}

#[test]
fn twenty_steps_on_the_gpu_track_the_cpu_loop_and_repeat_bit_for_bit() {
    if common::gpu_or_skip().is_none() {
        return;
    }
    let steps = 20;
    let mut c = common::small_config(steps);
    c.train.workers = 0;
    let run = |device: ComputeDevice| {
        let mut c = c.clone();
        c.train.device = device;
        let tmp = common::TempDir::new("cuda-train");
        let mut t = Trainer::new(c, &tmp.path().join("run")).expect("trainer");
        let mut last = f64::NAN;
        for _ in 0..steps {
            last = t.step().expect("step").ce_loss;
        }
        (last, common::trainer_state_bits(&mut t))
    };
    let (cpu_loss, _) = run(ComputeDevice::Cpu);
    let (gpu_loss, gpu_bits) = run(ComputeDevice::Cuda);
    let (again_loss, again_bits) = run(ComputeDevice::Cuda);
    eprintln!("loss after {steps} steps: CPU {cpu_loss}, GPU {gpu_loss}");
    let rel = (gpu_loss - cpu_loss).abs() / cpu_loss.abs();
    assert!(
        rel <= 1e-4,
        "loss after {steps} steps: GPU {gpu_loss} vs CPU {cpu_loss} ({rel:e} relative)"
    );
    assert_eq!(gpu_loss.to_bits(), again_loss.to_bits(), "a second GPU run's loss");
    common::assert_same(&gpu_bits, &again_bits, "a second GPU run's parameters and moments");
}

#[test]
fn the_device_budget_bounds_the_gpus_memory_and_changes_no_bit() {
    if common::gpu_or_skip().is_none() {
        return;
    }
    let steps = 3;
    let mut c = common::small_config(steps);
    c.train.workers = 0;
    c.train.device = ComputeDevice::Cuda;
    let run = |budget: &str| {
        let mut c = c.clone();
        c.storage.device_budget = budget.into();
        let tmp = common::TempDir::new("cuda-budget");
        let mut t = Trainer::new(c, &tmp.path().join("run")).expect("trainer");
        for _ in 0..steps {
            t.step().expect("step");
        }
        let memory = t.gpu_memory().expect("the pool's counters");
        (memory, common::trainer_state_bits(&mut t))
    };
    let (unbounded, free_bits) = run("");
    assert_eq!(unbounded, None, "no budget, no pool");
    let (bounded, bounded_bits) = run("256MiB");
    let m = bounded.expect("a budget's pool");
    eprintln!(
        "peak {} bytes used, {} reserved, of a {} byte budget",
        m.peak, m.reserved_peak, m.budget
    );
    assert_eq!(m.budget, 256 << 20, "a budget of whole 2 MiB granules is kept as it is");
    assert!(
        m.peak > 0 && m.peak <= m.reserved_peak,
        "peak {} used, {} reserved",
        m.peak,
        m.reserved_peak
    );
    assert!(
        m.reserved_peak <= m.budget,
        "{} reserved of {}",
        m.reserved_peak,
        m.budget
    );
    assert!(m.in_use <= m.peak, "in use {} above the peak {}", m.in_use, m.peak);
    common::assert_same(&free_bits, &bounded_bits, "the same run within a Device budget");

    // A model whose expert matrices alone take 16 MiB cannot fit in 4 MiB: refused while it is
    // copied to the GPU, naming the budget.
    let mut big = c.clone();
    big.model.d_model = 256;
    big.model.n_head = 4;
    big.model.d_ff = 1024;
    big.model.experts = 8;
    big.storage.device_budget = "4MiB".into();
    let tmp = common::TempDir::new("cuda-budget-small");
    let err = Trainer::new(big, &tmp.path().join("run"))
        .err()
        .expect("4 MiB cannot hold the model")
        .to_string();
    assert!(
        err.contains("Device budget") && err.contains("exhausted"),
        "unclear: {err}"
    );
}
