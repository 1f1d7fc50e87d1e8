//! Training tokens/s with part of the expert state on disk, against all of it in memory.

use super::disk::{disk_bandwidth, parallel_bandwidth, tier_bandwidth, DiskBandwidth};
use super::{median, Scratch};
use crate::error::Result;
use serde::Serialize;
use std::time::Instant;

/// Requests in flight for the disk's figures at depth: as many as the Disk tier's default I/O
/// threads keep in flight.
const PARALLEL_THREADS: usize = 8;

/// One storage configuration of [`storage_bench`].
#[derive(Clone, Debug)]
pub struct StorageVariant {
    /// Its name in the report.
    pub name: String,
    /// The storage settings.
    pub storage: crate::config::StorageSettings,
}

/// Figures of one [`StorageVariant`] over the timed steps.
#[derive(Clone, Debug, Serialize)]
pub struct StorageRow {
    /// The variant.
    pub name: String,
    /// Median tokens per second over the rounds.
    pub tokens_per_s: f64,
    /// Every round's tokens per second.
    pub rounds: Vec<f64>,
    /// Share of expert acquisitions served from memory.
    pub hit_rate: f64,
    /// Share of prefetched experts that were used.
    pub prefetch_accuracy: f64,
    /// Bytes read from disk per step.
    pub read_per_step: f64,
    /// Bytes written to disk per step.
    pub written_per_step: f64,
    /// Seconds per step acquirers waited for experts not in memory.
    pub stall_per_step: f64,
    /// `stall_per_step` by cause, in the order of
    /// [`STALL_CAUSES`](crate::storage::tiers::STALL_CAUSES).
    pub stall_causes_per_step: [f64; 4],
    /// Seconds of CPU (user and system, every thread of the process) per step: what the tier's
    /// copies and system calls add to the compute shows as the difference from all in memory.
    pub cpu_per_step: f64,
    /// Disk bytes (read + written) per second of training wall time.
    pub disk_bytes_per_s: f64,
    /// Disk bytes per second of the I/O threads' summed busy time (reads and writes): the rate of
    /// one I/O thread while it works, not the disk's (several threads work at once).
    pub io_bytes_per_busy_s: f64,
    /// The disk's bandwidth for this row's mix of reads and writes: bytes moved per step over the
    /// seconds the sequential figures need for them (0 without disk traffic).
    pub ceiling_bytes_per_s: f64,
    /// `disk_bytes_per_s / ceiling_bytes_per_s`: the share of the disk's bandwidth achieved.
    pub of_ceiling: f64,
    /// The most bytes held in Device and Host.
    pub peak: [u64; 2],
    /// Budgets of Device and Host.
    pub budget: [u64; 2],
}

/// The storage benchmark: tokens/s of the same training under several storage configurations,
/// alternating round by round, with the disk's own read bandwidth measured in the same directory.
#[derive(Clone, Debug, Serialize)]
pub struct StorageReport {
    /// Sequences per step.
    pub batch: usize,
    /// Mean tokens each expert receives per step (top-k assignments over experts).
    pub tokens_per_expert: f64,
    /// Bytes of all expert state (parameters and moments).
    pub expert_state_bytes: u64,
    /// Read bandwidth of the disk (`O_DIRECT`, large requests; the better of one in flight and
    /// several), bytes per second.
    pub disk_read_bytes_per_s: f64,
    /// Write bandwidth of the disk, measured the same way, bytes per second.
    pub disk_write_bytes_per_s: f64,
    /// How the disk was measured, with the tier-shaped figures.
    pub disk: DiskBandwidth,
    /// One row per variant.
    pub rows: Vec<StorageRow>,
    /// Timed steps per round.
    pub steps: usize,
    /// Compute threads.
    pub threads: usize,
}

/// The share of expert state of `total` bytes that memory budgets of `in_memory` bytes (Device and
/// Host together) hold, for a label: `25%`, `67%`, `100%` (more budget than state is all of it).
pub fn percent_in_memory(in_memory: u64, total: u64) -> String {
    if total == 0 {
        return "100%".into();
    }
    format!("{:.0}%", 100.0 * in_memory.min(total) as f64 / total as f64)
}

/// Run `config` under each variant (all in the run directories under `dir`), alternating. Nothing
/// is left under `dir` afterwards, also when it fails.
pub fn storage_bench(
    config: &crate::train::TrainConfig,
    variants: &[StorageVariant],
    dir: &std::path::Path,
    warmup: usize,
    steps: usize,
    rounds: usize,
) -> Result<StorageReport> {
    use crate::storage::tiers::TierStats;
    use crate::train::Trainer;
    // Declared first, so dropped last: after the trainers, whose stores remove their own files.
    let scratch = Scratch::for_bench(dir, "storage")?;
    let base = scratch.path.clone();
    let mut disk = disk_bandwidth(&base, 512 << 20, 8 << 20)?;
    if let Some((r, w)) = parallel_bandwidth(&base, 512 << 20, 8 << 20, PARALLEL_THREADS)? {
        disk.parallel_threads = PARALLEL_THREADS;
        disk.parallel_read_bytes_per_s = r;
        disk.parallel_write_bytes_per_s = w;
    }
    let mut trainers = Vec::with_capacity(variants.len());
    for (i, v) in variants.iter().enumerate() {
        let mut c = config.clone();
        c.storage = v.storage.clone();
        c.train.steps = (warmup + steps * rounds + 1) as u64;
        let run = base.join(format!("variant-{i}"));
        let _ = std::fs::remove_dir_all(&run);
        let mut t = Trainer::new(c, &run)?;
        for _ in 0..warmup {
            t.step()?;
        }
        // The warm-up's write-backs end here, not inside a measurement.
        t.storage_idle()?;
        trainers.push(t);
    }
    let total = |t: &Trainer| {
        let mut s = TierStats::default();
        t.tier_stats().iter().for_each(|w| s.add(w));
        s
    };
    let start: Vec<TierStats> = trainers.iter().map(total).collect();
    // The tier's path alone, with its request size (one unit) and its I/O threads.
    let unit = start.iter().map(|s| s.unit_bytes).max().unwrap_or(0);
    let io_threads = variants
        .iter()
        .filter(|v| !v.storage.device_budget.is_empty() || !v.storage.host_budget.is_empty())
        .map(|v| v.storage.io_threads)
        .max();
    if let (Some(threads), true) = (io_threads, unit > 0) {
        let (r, w) = tier_bandwidth(&base, 512 << 20, unit, threads)?;
        disk.tier_request = unit;
        disk.tier_threads = threads.max(1);
        disk.tier_read_bytes_per_s = r;
        disk.tier_write_bytes_per_s = w;
    }
    let tokens = (config.train.batch * config.model.block_size * steps.max(1)) as f64;
    let mut times = vec![Vec::new(); variants.len()];
    let mut cpu = vec![0.0; variants.len()];
    for _ in 0..rounds.max(1) {
        for (i, t) in trainers.iter_mut().enumerate() {
            let (started, cpu_started) = (Instant::now(), process_cpu_seconds());
            for _ in 0..steps.max(1) {
                t.step()?;
            }
            // A commit leaves write-backs and deferred gradients running: they are this
            // variant's work, timed here rather than slowing the next variant.
            t.storage_idle()?;
            times[i].push(started.elapsed().as_secs_f64());
            cpu[i] += process_cpu_seconds() - cpu_started;
        }
    }
    let timed_steps = (steps.max(1) * rounds.max(1)) as f64;
    let ceiling = |read: f64, written: f64| {
        let seconds = read / disk.best_read() + written / disk.best_write();
        if seconds > 0.0 {
            (read + written) / seconds
        } else {
            0.0
        }
    };
    let mut rows = Vec::with_capacity(variants.len());
    let mut expert_state_bytes = 0;
    for (i, t) in trainers.iter().enumerate() {
        let (a, b) = (&start[i], total(t));
        // The in-memory variant has no store (zero): the tiered variants' size.
        expert_state_bytes = expert_state_bytes.max(b.unit_bytes * b.units as u64);
        let wall: f64 = times[i].iter().sum();
        let d = b.since(a);
        let read = d.disk_read as f64;
        let written = d.disk_written as f64;
        let busy = d.read_seconds + d.write_seconds;
        rows.push(StorageRow {
            name: variants[i].name.clone(),
            tokens_per_s: median(times[i].iter().map(|s| tokens / s).collect()),
            rounds: times[i].iter().map(|s| tokens / s).collect(),
            hit_rate: d.hit_rate(),
            prefetch_accuracy: d.prefetch_accuracy(),
            read_per_step: read / timed_steps,
            written_per_step: written / timed_steps,
            stall_per_step: d.stall_seconds / timed_steps,
            stall_causes_per_step: d.stall_causes.map(|s| s / timed_steps),
            cpu_per_step: cpu[i] / timed_steps,
            disk_bytes_per_s: (read + written) / wall,
            io_bytes_per_busy_s: if busy > 0.0 { (read + written) / busy } else { 0.0 },
            ceiling_bytes_per_s: ceiling(read, written),
            of_ceiling: if read + written > 0.0 {
                (read + written) / wall / ceiling(read, written)
            } else {
                0.0
            },
            peak: b.peak,
            budget: b.budget,
        });
    }
    drop(trainers);
    drop(scratch);
    let m = &config.model;
    Ok(StorageReport {
        batch: config.train.batch,
        tokens_per_expert: (config.train.batch * m.block_size * m.k) as f64 / m.experts as f64,
        expert_state_bytes,
        disk_read_bytes_per_s: disk.best_read(),
        disk_write_bytes_per_s: disk.best_write(),
        disk,
        rows,
        steps,
        threads: config.train.threads,
    })
}

/// User and system CPU seconds of the whole process so far (0 where the system cannot say).
fn process_cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain integers, for which all zeros is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `getrusage` fills the struct it is given and reads nothing else.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_in_memory_follows_the_layer_count() {
        let block = 1000;
        assert_eq!(percent_in_memory(2 * block, 8 * block), "25%");
        assert_eq!(percent_in_memory(2 * block, 3 * block), "67%");
        assert_eq!(percent_in_memory(2 * block, 2 * block), "100%");
        assert_eq!(percent_in_memory(2 * block, block), "100%");
        assert_eq!(percent_in_memory(0, 0), "100%");
    }

    #[test]
    fn a_scratch_directory_goes_with_its_guard_and_its_new_parents_too() {
        let parent = std::env::temp_dir().join(format!("semoe-bench-scratch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let scratch = Scratch::for_bench(&parent.join("made/on/the/way"), "inner").unwrap();
        std::fs::create_dir_all(scratch.path.join("deep")).unwrap();
        std::fs::write(scratch.path.join("deep/file"), b"x").unwrap();
        drop(scratch);
        assert!(!parent.exists(), "the benchmark's directories outlive it");
        // An existing parent stays.
        std::fs::create_dir_all(&parent).unwrap();
        drop(Scratch::for_bench(&parent, "inner").unwrap());
        assert!(parent.exists());
        std::fs::remove_dir(&parent).unwrap();
    }

    #[test]
    fn a_bench_removes_what_a_bench_killed_before_left() {
        let parent = std::env::temp_dir().join(format!("semoe-bench-leftovers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        // One whose process ended (its lock went with it), one whose process runs.
        let (left, lock) = crate::storage::scratch::claim(&parent, "semoe-bench-probe-").unwrap();
        drop(lock);
        let (running, held) = crate::storage::scratch::claim(&parent, "semoe-bench-probe-").unwrap();
        let scratch = Scratch::for_bench(&parent, "probe").unwrap();
        let name = scratch.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!("semoe-bench-probe-{}-", std::process::id())),
            "{name}"
        );
        assert!(scratch.path().is_dir());
        assert!(!left.exists(), "what the ended bench left stays");
        assert!(running.exists(), "a running bench's went");
        drop(scratch);
        drop(held);
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
