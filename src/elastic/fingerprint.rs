//! The kernel fingerprint: the bits of one small forward and backward pass, computed by every
//! process that joins a run. gemm chooses its AVX2 or AVX-512 code at run time, and the two give
//! different bits for the same product; workers on different CPUs would therefore train
//! different models. The join handshake compares fingerprints and refuses a mismatch, naming both
//! instruction sets.

use crate::config::TrainConfig;
use crate::error::Result;
use crate::kernels::{Backend, Cpu, Mat};
use crate::model::gpt::Gpt;
use sha2::{Digest, Sha256};

/// What a process computes at start and sends when it joins.
#[derive(Clone, Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct KernelFingerprint {
    /// SHA-256 (hex) of the loss and every gradient of the pass, bit for bit.
    pub digest: String,
    /// The instruction sets the matrix kernels can use here (for the message on a mismatch).
    pub isa: String,
}

/// Environment variable that replaces the digest (tests of the refusal use it; never set it in a run).
pub const FINGERPRINT_OVERRIDE: &str = "SEMOE_TEST_KERNEL_FINGERPRINT";

/// Compute this process's fingerprint: a two-layer MoE model large enough for gemm's vector kernels
/// (d_model 64, d_ff 256), one forward and backward pass over a fixed batch, and one product over
/// a long inner dimension, on one thread.
pub fn compute() -> Result<KernelFingerprint> {
    let mut config = TrainConfig::default();
    config.model.d_model = 64;
    config.model.n_layer = 2;
    config.model.n_head = 2;
    config.model.block_size = 32;
    config.model.d_ff = 256;
    config.model.experts = 4;
    config.model.k = 2;
    let model = Gpt::<f32>::init(&config.model, 7)?;
    let mut grads = model.zeros_like()?;
    let seqs = 4;
    let tokens = seqs * config.model.block_size;
    let vocab = config.model.vocab as u32;
    let idx: Vec<u32> = (0..tokens as u32).map(|i| (i * 31 + 7) % vocab).collect();
    let targets: Vec<u32> = (0..tokens as u32).map(|i| (i * 17 + 3) % vocab).collect();
    let cpu = Cpu::new(1)?;
    let out = model.forward_backward(&cpu, &idx, &targets, seqs, 1.0 / tokens as f32, 1.0, &mut grads)?;
    let mut h = Sha256::new();
    h.update(out.ce_sum.to_le_bytes());
    for (name, _, buf) in grads.tensors() {
        h.update(name.as_bytes());
        for v in buf {
            h.update(v.to_bits().to_le_bytes());
        }
    }
    // A product whose inner dimension is longer than gemm's cache-sized depth block (the pass
    // above sums at most 128), as a weight gradient over a large group's tokens is: its bits must
    // not depend on the machine's caches either.
    let (m, k, n) = (96, 1100, 80);
    let value = |i: usize| ((i * 31 + 7) % 97) as f32 / 97.0 - 0.5;
    let a: Vec<f32> = (0..m * k).map(value).collect();
    let b: Vec<f32> = (0..k * n).map(|i| value(i + 13)).collect();
    let mut product = vec![0.0f32; m * n];
    cpu.matmul(&mut product, Mat::new(&a, m, k)?, Mat::new(&b, k, n)?, false)?;
    for v in product {
        h.update(v.to_bits().to_le_bytes());
    }
    let digest = std::env::var(FINGERPRINT_OVERRIDE)
        .unwrap_or_else(|_| h.finalize().iter().map(|b| format!("{b:02x}")).collect());
    Ok(KernelFingerprint { digest, isa: isa() })
}

fn isa() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            "x86-64 AVX-512".into()
        } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            "x86-64 AVX2+FMA".into()
        } else {
            "x86-64 without AVX2".into()
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_is_stable_within_a_process() {
        let a = compute().expect("fingerprint");
        let b = compute().expect("fingerprint");
        assert_eq!(a, b);
        assert_eq!(a.digest.len(), 64, "{a:?}");
    }
}
