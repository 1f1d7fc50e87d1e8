//! Measurements behind `semoe bench`: the MoE layer's throughput, the matmul rate, and the machine's
//! f32 FMA peak that both are compared against. Wall-clock medians over several iterations; no
//! timing ever decides a test.
//!
//! One file per measurement: `peak.rs` (the FMA peak), `matmul.rs`, `moe_layer.rs`, `runtime.rs`
//! (the plain loop against the actor runtime, and against worker processes), `recovery.rs` (a
//! worker process killed: the time to the next committed step), `storage.rs` (tiered expert storage), `cache_policy.rs` (the cache policy
//! replayed on a trained model's routing), `generate.rs` (generation bytes/s), `ring.rs` (ring-memory inference against resident) and `disk.rs`
//! (the disk's own bandwidth, and the disk tier's).

mod cache_policy;
mod disk;
mod generate;
mod matmul;
mod moe_layer;
mod peak;
mod recovery;
mod ring;
mod runtime;
mod storage;

pub use cache_policy::{
    cache_policy_bench, describe, policy_grid, record_routing, CachePolicyReport, MemorySize, PolicyRow, TraceBatches,
};
pub use disk::{default_disk_dir, disk_bandwidth, memory_filesystem, tier_bandwidth, DiskBandwidth};
pub use generate::{generate_bench, GenerateReport, GenerateRow};
pub use matmul::{matmul_bench, MatmulReport};
pub use moe_layer::{moe_layer_bench, moe_layer_cuda_bench, MoeLayerCudaReport, MoeLayerReport};
pub use peak::fma_peak_gflops;
pub use recovery::{recovery_bench, RecoveryReport};
pub use ring::{
    ring_bench, variant_name as ring_variant_name, RingReport, RingRow, WARM_UP_TOKENS as RING_WARM_UP_TOKENS,
};
pub use runtime::{runtime_bench, RuntimeEngines, RuntimeReport};
pub use storage::{percent_in_memory, storage_bench, StorageReport, StorageRow, StorageVariant};

use crate::error::Result;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::time::Instant;

pub use crate::telemetry::report::median_of as median;

/// A directory the benchmark creates, removed with everything in it when dropped: after a failed
/// run as after a good one (an error used to leave the run directories and the 512 MiB bandwidth
/// file behind). The parent directories that did not exist yet (made on the way) are removed too,
/// each only if left empty.
pub struct Scratch {
    path: std::path::PathBuf,
    /// The missing ancestors of `path`, deepest first.
    made: Vec<std::path::PathBuf>,
    /// Its lock while the bench runs ([`crate::storage::scratch::claim`]).
    _owner: std::fs::File,
}

impl Scratch {
    /// `parent/semoe-bench-KIND-PID-RANDOM` for this process, created and claimed
    /// ([`crate::storage::scratch::claim`]). Those of the same kind left by bench processes that
    /// are gone (killed by a signal, which skips the drop: a storage bench leaves gigabytes) are
    /// removed first.
    pub fn for_bench(parent: &std::path::Path, kind: &str) -> Result<Scratch> {
        let prefix = format!("semoe-bench-{kind}-");
        for left in crate::storage::scratch::remove_abandoned(parent, &prefix) {
            crate::say!(
                "notice: removed {}, left by a bench process that is gone",
                left.display()
            );
        }
        // The ancestors missing before the claim makes them (removed with the scratch).
        let made = missing_ancestors(parent);
        let (path, owner) = crate::storage::scratch::claim(parent, &prefix)?;
        Ok(Scratch {
            path,
            made,
            _owner: owner,
        })
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// `dir` and its ancestors that do not exist yet, deepest first.
fn missing_ancestors(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    dir.ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        .map(std::path::Path::to_path_buf)
        .collect()
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        for p in &self.made {
            // Only when empty: never anything the benchmark did not create.
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// Refuse a benchmark whose buffers (`bytes`, estimated from its options, named in `what`) exceed
/// the memory available now: an absurd size would thrash the machine or abort on its allocation.
pub(crate) fn check_memory(what: &str, bytes: f64) -> Result<()> {
    let Some(available) = crate::config::memory::available_bytes() else {
        return Ok(());
    };
    if bytes > available as f64 {
        return Err(crate::Error::config(format!(
            "{what} needs about {:.1} GiB of buffers and the machine has {:.1} GiB available",
            bytes / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

pub(crate) fn time_it(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// Random normal values, deterministic in `seed`.
pub fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}
