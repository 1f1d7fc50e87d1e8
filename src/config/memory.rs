//! How much memory a training config needs, estimated before anything is allocated, so that a
//! model or context that cannot fit is refused with the estimate instead of being killed by the
//! kernel's OOM killer halfway through its first step.
//!
//! The estimate counts the big buffers only, from the config alone: parameters, both AdamW
//! moments and the gradient buffers of every group (llm.c style: one buffer per parameter group),
//! the actor runtime's copies of them, and the activations a group keeps for its backward pass
//! (times the groups that run at once). It is meant to be close to the truth but not above it, so
//! that it never refuses a config that would fit; its parameter count is the model's exactly
//! (tested here, with dense blocks of either width).

use crate::config::TrainConfig;
use crate::error::{Error, Result};

/// The estimate, in bytes, by part.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Parameters of the model.
    pub params: u64,
    /// Parameters, AdamW moments and gradient buffers, with the runtime's copies.
    pub state_bytes: u64,
    /// Activations kept for the backward pass by the groups that run at once.
    pub activation_bytes: u64,
}

impl MemoryEstimate {
    /// Everything.
    pub fn total(&self) -> u64 {
        self.state_bytes.saturating_add(self.activation_bytes)
    }
}

/// The number of parameters of the model `config` describes (`u64::MAX` when it does not fit).
pub fn param_count(config: &TrainConfig) -> u64 {
    saturate(params(config))
}

/// [`param_count`] in floating point: sizes from a config may be absurd, and their products must
/// saturate (and be refused as too large), not wrap around into a small estimate. Exact below
/// 2^53 parameters.
fn params(config: &TrainConfig) -> f64 {
    let m = &config.model;
    let (v, t, d) = (m.vocab as f64, m.block_size as f64, m.d_model as f64);
    let moe_layers = m.moe_layers() as f64;
    let dense_layers = m.n_layer as f64 - moe_layers;
    let (e, f, fd) = (m.experts as f64, m.d_ff as f64, m.dense_width() as f64);
    let attention = 2.0 * d + d * 3.0 * d + 3.0 * d + d * d + d + 2.0 * d;
    v * d
        + t * d
        + 2.0 * d
        + d * v
        + m.n_layer as f64 * attention
        + moe_layers * (d * e + e * (d * f + f + f * d + d))
        + dense_layers * (d * fd + fd + fd * d + d)
}

/// `x` as a `u64`, `u64::MAX` when above (Rust's float-to-integer cast saturates).
fn saturate(x: f64) -> u64 {
    x as u64
}

/// Estimate the memory `config` needs to train.
pub fn estimate(config: &TrainConfig) -> MemoryEstimate {
    let m = &config.model;
    let t = &config.train;
    let params = params(config);
    let on_gpu = t.device == crate::config::ComputeDevice::Cuda;
    let groups = t.groups.max(1) as f64;
    // Model + two moments in the trainer, and a gradient buffer per group.
    let mut floats = 3.0 * params + groups * params;
    if t.workers > 0 {
        // The runtime keeps the committed state (model and moments) in its actors, and each
        // worker a working copy of the model.
        floats += 3.0 * params + t.workers as f64 * params;
    }
    let state_bytes = 4.0 * floats;

    let (tt, d, heads) = (m.block_size as f64, m.d_model as f64, m.n_head as f64);
    let tokens = (t.batch as f64 / groups).floor().max(1.0) * tt;
    let moe_layers = m.moe_layers() as f64;
    let dense_layers = m.n_layer as f64 - moe_layers;
    // Expert rows per token: the kept assignments are at most its `k` (rows are laid out for the
    // assignments kept, not for the capacity).
    let slots = m.k as f64;
    // Logits and their softmax; per layer: layer norms, q/k/v, attention output, projections and
    // residuals, and the attention probabilities (a row of `block_size` per head per token); the
    // MoE or dense feed-forward's rows.
    let per_token = 2.0 * m.vocab as f64
        + m.n_layer as f64 * (10.0 * d + heads * tt)
        + moe_layers * (m.experts as f64 + slots * (2.0 * d + 2.0 * m.d_ff as f64))
        + dense_layers * 4.0 * m.dense_width() as f64;
    let threads = if t.threads == 0 {
        crate::kernels::cpu::cores()
    } else {
        t.threads
    };
    let concurrent = groups.min(threads.max(1) as f64);
    if on_gpu {
        // The host keeps the model and its moments, read back from the GPU (the new model and
        // moments while the old ones are still held: five copies at the peak); the training
        // pass's gradients and activations live on the device, but the evaluation runs on the
        // host (its activations counted as a training pass's, an upper bound).
        return MemoryEstimate {
            params: saturate(params),
            state_bytes: saturate(4.0 * 5.0 * params),
            activation_bytes: saturate(4.0 * per_token * tokens * concurrent),
        };
    }
    MemoryEstimate {
        params: saturate(params),
        state_bytes: saturate(state_bytes),
        activation_bytes: saturate(4.0 * per_token * tokens * concurrent),
    }
}

/// Bytes of memory available to a new allocation now (`MemAvailable` of `/proc/meminfo`), if the
/// system says.
pub fn available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of memory and swap the machine has in all (`MemTotal` + `SwapTotal`), if the system says:
/// an allocation larger than that fails whatever is free.
pub fn machine_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some(
        kib("MemTotal:")?
            .saturating_add(kib("SwapTotal:").unwrap_or(0))
            .saturating_mul(1024),
    )
}

/// Refuse a config whose estimate exceeds `available` bytes, naming the settings that size it.
pub fn check_fits(config: &TrainConfig, available: Option<u64>) -> Result<MemoryEstimate> {
    let e = estimate(config);
    if let Some(available) = available {
        if e.total() > available {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            let m = &config.model;
            let t = &config.train;
            return Err(Error::config(format!(
                "this config needs about {:.1} GiB ({:.1} GiB of parameters, optimizer state and gradients for {} \
                 parameters; {:.1} GiB of activations) and the machine has {:.1} GiB available. It is sized by \
                 model.d_model ({}), model.n_layer ({}), model.experts ({}), model.d_ff ({}), model.block_size ({}), \
                 train.batch ({}), train.groups ({}) and train.threads ({}): make the model, the context or the \
                 batch smaller, or use more groups",
                gib(e.total()),
                gib(e.state_bytes),
                e.params,
                gib(e.activation_bytes),
                gib(available),
                m.d_model,
                m.n_layer,
                m.experts,
                m.d_ff,
                m.block_size,
                t.batch,
                t.groups,
                t.threads
            )));
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::Gpt;

    #[test]
    fn the_parameter_count_matches_the_model() {
        // MoE blocks only; dense only, of their own width or (0) the experts' width; alternating.
        for (moe_every, dense_d_ff) in [(1, 0), (0, 96), (0, 0), (2, 0)] {
            let mut c = TrainConfig::default();
            c.model.d_model = 32;
            c.model.n_head = 2;
            c.model.n_layer = 4;
            c.model.moe_every = moe_every;
            c.model.dense_d_ff = dense_d_ff;
            let model = Gpt::<f32>::zeros(&c.model).expect("model");
            assert_eq!(
                param_count(&c),
                model.num_params() as u64,
                "moe_every {moe_every}, dense_d_ff {dense_d_ff}"
            );
        }
    }

    #[test]
    fn a_large_capacity_factor_adds_no_expert_rows() {
        // Rows are laid out for the kept assignments, at most k a token, whatever the capacity.
        let mut c = TrainConfig::default();
        let usual = estimate(&c).activation_bytes;
        c.model.capacity_factor = 1000.0;
        assert_eq!(estimate(&c).activation_bytes, usual);
        check_fits(&c, Some(16 << 30)).expect("a capacity factor of 1000 fits as 1.25 does");
    }

    #[test]
    fn a_config_beyond_the_memory_is_refused_with_the_estimate() {
        let mut c = TrainConfig::default();
        c.model.block_size = 65_536;
        let err = check_fits(&c, Some(24 << 30)).expect_err("too big").to_string();
        assert!(err.contains("GiB") && err.contains("model.block_size (65536)"), "{err}");
        let small = TrainConfig::default();
        let e = check_fits(&small, Some(24 << 30)).expect("the default fits");
        assert!(e.total() < 1 << 30, "{e:?}");
    }

    #[test]
    fn on_the_gpu_the_host_holds_the_state_and_the_evaluation() {
        let mut c = TrainConfig::default();
        c.model.d_model = 1024;
        c.model.n_head = 8;
        let on_cpu = estimate(&c);
        c.train.device = crate::config::ComputeDevice::Cuda;
        let on_gpu = estimate(&c);
        assert_eq!(on_gpu.params, on_cpu.params);
        assert_eq!(
            on_gpu.activation_bytes, on_cpu.activation_bytes,
            "the evaluation runs on the host"
        );
        assert_eq!(
            on_gpu.state_bytes,
            20 * on_gpu.params,
            "model and moments, twice while read back"
        );
        assert!(on_gpu.total() < on_cpu.total());
    }
}
