//! Measurements behind `semoe bench`: the MoE layer's throughput, the matmul rate, and the machine's
//! f32 FMA peak that both are compared against. Wall-clock medians over several iterations; no
//! timing ever decides a test.

use crate::error::Result;
use crate::kernels::{Backend, Cpu, Mat};
use crate::model::moe::{MoeConfig, MoeLayer, MoeParams};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;
use std::time::Instant;

pub use crate::telemetry::report::median_of as median;

fn time_it(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
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

/// Theoretical-style peak: the f32 FMA throughput of `threads` threads running independent
/// fused multiply-adds on the widest vectors the CPU has (AVX-512, else AVX2), in GFLOP/s.
pub fn fma_peak_gflops(threads: usize) -> f64 {
    const ITERS: u64 = 50_000_000;
    let start = Instant::now();
    let lanes: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1)).map(|_| scope.spawn(|| fma_loop(ITERS))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let secs = start.elapsed().as_secs_f64();
    // Each lane-FMA is 2 flops.
    2.0 * lanes as f64 / secs / 1e9
}

/// Runs `iters` rounds of 12 independent vector FMAs; returns the number of lane-FMAs done.
fn fma_loop(iters: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        if std::arch::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            unsafe fn run(iters: u64) -> f32 {
                let m = _mm512_set1_ps(0.999_999);
                let a = _mm512_set1_ps(1e-7);
                let mut acc = [_mm512_set1_ps(1.0); 12];
                for _ in 0..iters {
                    for v in acc.iter_mut() {
                        *v = _mm512_fmadd_ps(*v, m, a);
                    }
                }
                acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
            }
            // SAFETY: AVX-512F is present (checked above).
            let r = unsafe { run(iters) };
            std::hint::black_box(r);
            return iters * 12 * 16;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn run(iters: u64) -> f32 {
                let m = _mm256_set1_ps(0.999_999);
                let a = _mm256_set1_ps(1e-7);
                let mut acc = [_mm256_set1_ps(1.0); 12];
                for _ in 0..iters {
                    for v in acc.iter_mut() {
                        *v = _mm256_fmadd_ps(*v, m, a);
                    }
                }
                let mut out = [0.0f32; 8];
                let mut sum = 0.0;
                for v in acc {
                    // SAFETY: `out` is 8 f32s, the 32 bytes the unaligned store writes.
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
                    sum += out.iter().sum::<f32>();
                }
                sum
            }
            // SAFETY: AVX2 and FMA are present (checked above).
            let r = unsafe { run(iters) };
            std::hint::black_box(r);
            return iters * 12 * 8;
        }
    }
    let mut acc = [1.0f32; 8];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = v.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    iters * 8
}

/// Result of [`matmul_bench`].
#[derive(Debug, Clone, Serialize)]
pub struct MatmulReport {
    /// m = n = k
    pub size: usize,
    /// Threads used.
    pub threads: usize,
    /// Median seconds per product.
    pub seconds: f64,
    /// 2 m n k / seconds / 1e9
    pub gflops: f64,
}

/// Square f32 matmul rate.
pub fn matmul_bench(cpu: &Cpu, size: usize, warmup: usize, iters: usize) -> Result<MatmulReport> {
    let a = randn(size * size, 1);
    let b = randn(size * size, 2);
    let mut c = vec![0.0f32; size * size];
    let times = time_it(warmup, iters, || {
        cpu.matmul(&mut c, Mat::new(&a, size, size)?, Mat::new(&b, size, size)?, false)
    })?;
    let seconds = median(times);
    Ok(MatmulReport {
        size,
        threads: cpu.threads(),
        seconds,
        gflops: 2.0 * (size as f64).powi(3) / seconds / 1e9,
    })
}

/// Result of [`moe_layer_bench`].
#[derive(Debug, Clone, Serialize)]
pub struct MoeLayerReport {
    /// The layer configuration.
    pub config: MoeConfig,
    /// Tokens per forward.
    pub tokens: usize,
    /// Threads used.
    pub threads: usize,
    /// Kept assignments (rows through the experts).
    pub kept: usize,
    /// Median seconds of a forward pass.
    pub forward_seconds: f64,
    /// Median seconds of a forward plus backward pass.
    pub train_seconds: f64,
    /// tokens / forward_seconds
    pub forward_tokens_per_s: f64,
    /// tokens / train_seconds
    pub train_tokens_per_s: f64,
    /// Expert-matmul FLOPs of one forward (2 matmuls) and one backward (4 matmuls).
    pub forward_flops: f64,
    /// Forward + backward expert-matmul FLOPs.
    pub train_flops: f64,
    /// Expert FLOPs / forward time: the whole layer's effective rate.
    pub forward_gflops: f64,
    /// Expert FLOPs / train time.
    pub train_gflops: f64,
    /// The six expert matmuls alone (same shapes, same buffers), GFLOP/s.
    pub expert_matmul_gflops: f64,
    /// Measured FMA peak of this many threads, GFLOP/s.
    pub peak_gflops: f64,
}

/// Forward and forward+backward throughput of one MoE layer over `tokens` tokens.
pub fn moe_layer_bench(
    cpu: &Cpu,
    config: &MoeConfig,
    tokens: usize,
    warmup: usize,
    iters: usize,
    peak_gflops: f64,
) -> Result<MoeLayerReport> {
    let layer = MoeLayer::new(config.clone(), MoeParams::<f32>::init(config, 42)?)?;
    let x = randn(tokens * config.d_model, 3);
    let gy = randn(tokens * config.d_model, 4);
    let mut grads = MoeParams::zeros(config);
    let mut kept = 0;
    let forward = time_it(warmup, iters, || {
        let (out, cache) = cpu.install(|| layer.forward(cpu, &x))?;
        kept = cache.dispatch.routing.kept();
        std::hint::black_box(out);
        Ok(())
    })?;
    let train = time_it(warmup, iters, || {
        cpu.install(|| {
            let (_out, cache) = layer.forward(cpu, &x)?;
            let gx = layer.backward(cpu, &x, cache, &gy, &mut grads)?;
            std::hint::black_box(gx);
            Ok(())
        })
    })?;

    let (d, f) = (config.d_model as f64, config.d_ff as f64);
    let forward_flops = 2.0 * 2.0 * kept as f64 * d * f;
    let train_flops = 3.0 * forward_flops;

    // The expert matmuls alone, with the layer's shapes and scheduling (experts side by side, each
    // product single-threaded): per expert 2 forward and 4 backward products.
    let per_expert = kept / config.experts.max(1);
    let (n, dm, df) = (per_expert.max(1), config.d_model, config.d_ff);
    let xe = randn(n * dm, 5);
    let hbuf = randn(n * df, 6);
    let w1 = randn(dm * df, 7);
    let w2 = randn(df * dm, 8);
    let mut outs: Vec<[Vec<f32>; 4]> = (0..config.experts)
        .map(|_| {
            [
                vec![0.0f32; n * df],
                vec![0.0f32; n * dm],
                vec![0.0f32; dm * df],
                vec![0.0f32; df * dm],
            ]
        })
        .collect();
    let mm = time_it(warmup, iters, || {
        let tasks: Vec<&mut [Vec<f32>; 4]> = outs.iter_mut().collect();
        cpu.par_for_each(tasks, |b, [out_f, out_d, gw1, gw2]| {
            b.matmul(out_f, Mat::new(&xe, n, dm)?, Mat::new(&w1, dm, df)?, true)?;
            b.matmul(out_d, Mat::new(&hbuf, n, df)?, Mat::new(&w2, df, dm)?, true)?;
            b.matmul(gw2, Mat::new(&hbuf, n, df)?.t(), Mat::new(&xe, n, dm)?, true)?;
            b.matmul(out_f, Mat::new(&xe, n, dm)?, Mat::new(&w2, df, dm)?.t(), false)?;
            b.matmul(gw1, Mat::new(&xe, n, dm)?.t(), Mat::new(&hbuf, n, df)?, true)?;
            b.matmul(out_d, Mat::new(&hbuf, n, df)?, Mat::new(&w1, dm, df)?.t(), false)
        })
    })?;
    let mm_flops = 6.0 * 2.0 * (n * dm * df) as f64 * config.experts as f64;

    let (fs, ts) = (median(forward), median(train));
    Ok(MoeLayerReport {
        config: config.clone(),
        tokens,
        threads: cpu.threads(),
        kept,
        forward_seconds: fs,
        train_seconds: ts,
        forward_tokens_per_s: tokens as f64 / fs,
        train_tokens_per_s: tokens as f64 / ts,
        forward_flops,
        train_flops,
        forward_gflops: forward_flops / fs / 1e9,
        train_gflops: train_flops / ts / 1e9,
        expert_matmul_gflops: mm_flops / median(mm) / 1e9,
        peak_gflops,
    })
}

/// Training throughput of the main job's model, plain loop against the actor runtime.
#[derive(Clone, Debug, Serialize)]
pub struct RuntimeReport {
    /// Worker counts measured (0 = the plain loop without actors).
    pub workers: Vec<usize>,
    /// Median tokens per second of each, over the rounds.
    pub tokens_per_s: Vec<f64>,
    /// Every round's tokens per second, `[round][engine]`.
    pub rounds: Vec<Vec<f64>>,
    /// Timed steps per round and engine.
    pub steps: usize,
    /// Compute threads.
    pub threads: usize,
}

/// Alternate the engines round by round (so that machine noise hits all alike): each runs `warmup`
/// untimed steps once, then `steps` timed steps per round.
pub fn runtime_bench(
    config: &crate::train::TrainConfig,
    workers: &[usize],
    warmup: usize,
    steps: usize,
    rounds: usize,
) -> Result<RuntimeReport> {
    use crate::train::Trainer;
    let base = std::env::temp_dir().join(format!("semoe-bench-runtime-{}", std::process::id()));
    let mut trainers = Vec::with_capacity(workers.len());
    for &w in workers {
        let mut c = config.clone();
        c.train.workers = w;
        c.train.steps = (warmup + steps * rounds + 1) as u64;
        let dir = base.join(format!("workers-{w}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut t = Trainer::new(c, &dir)?;
        for _ in 0..warmup {
            t.step()?;
        }
        trainers.push(t);
    }
    let tokens = (config.train.batch * config.model.block_size * steps.max(1)) as f64;
    let mut all = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let mut row = Vec::with_capacity(trainers.len());
        for t in trainers.iter_mut() {
            let started = Instant::now();
            for _ in 0..steps.max(1) {
                t.step()?;
            }
            row.push(tokens / started.elapsed().as_secs_f64());
        }
        all.push(row);
    }
    drop(trainers);
    let _ = std::fs::remove_dir_all(&base);
    let tokens_per_s = (0..workers.len())
        .map(|i| median(all.iter().map(|r| r[i]).collect()))
        .collect();
    Ok(RuntimeReport {
        workers: workers.to_vec(),
        tokens_per_s,
        rounds: all,
        steps,
        threads: config.train.threads,
    })
}

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
    /// Disk bytes (read + written) per second of training wall time.
    pub disk_bytes_per_s: f64,
    /// Disk bytes per second of the I/O threads' busy time (reads and writes).
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
    /// Sequential read bandwidth of the disk (`O_DIRECT`, large requests), bytes per second.
    pub disk_read_bytes_per_s: f64,
    /// Sequential write bandwidth of the disk (`O_DIRECT`, large requests), bytes per second.
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

/// A directory the benchmark creates, removed with everything in it when dropped: after a failed
/// run as after a good one (an error used to leave the run directories and the 512 MiB bandwidth
/// file behind). The parent directories that did not exist yet (made on the way) are removed too,
/// each only if left empty.
struct Scratch {
    path: std::path::PathBuf,
    /// The missing ancestors of `path`, deepest first.
    made: Vec<std::path::PathBuf>,
}

impl Scratch {
    /// `parent/name`, to be created by the caller.
    fn new(parent: &std::path::Path, name: &str) -> Scratch {
        let made = parent
            .ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
            .map(std::path::Path::to_path_buf)
            .collect();
        Scratch {
            path: parent.join(name),
            made,
        }
    }
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
    let scratch = Scratch::new(dir, &format!("semoe-bench-storage-{}", std::process::id()));
    let base = scratch.path.clone();
    let mut disk = disk_bandwidth(&base, 512 << 20, 8 << 20)?;
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
    for _ in 0..rounds.max(1) {
        for (i, t) in trainers.iter_mut().enumerate() {
            let started = Instant::now();
            for _ in 0..steps.max(1) {
                t.step()?;
            }
            times[i].push(started.elapsed().as_secs_f64());
        }
    }
    let timed_steps = (steps.max(1) * rounds.max(1)) as f64;
    let ceiling = |read: f64, written: f64| {
        let seconds = read / disk.read_bytes_per_s + written / disk.write_bytes_per_s;
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
        expert_state_bytes = b.unit_bytes * b.units as u64;
        let wall: f64 = times[i].iter().sum();
        let served: Vec<u64> = (0..3).map(|k| b.served_from[k] - a.served_from[k]).collect();
        let all: u64 = served.iter().sum();
        let read = (b.disk_read - a.disk_read) as f64;
        let written = (b.disk_written - a.disk_written) as f64;
        let busy = (b.read_seconds - a.read_seconds) + (b.write_seconds - a.write_seconds);
        let prefetched = b.prefetched - a.prefetched;
        rows.push(StorageRow {
            name: variants[i].name.clone(),
            tokens_per_s: median(times[i].iter().map(|s| tokens / s).collect()),
            rounds: times[i].iter().map(|s| tokens / s).collect(),
            hit_rate: if all == 0 {
                1.0
            } else {
                (served[0] + served[1]) as f64 / all as f64
            },
            prefetch_accuracy: if prefetched == 0 {
                0.0
            } else {
                (b.prefetch_used - a.prefetch_used) as f64 / prefetched as f64
            },
            read_per_step: read / timed_steps,
            written_per_step: written / timed_steps,
            stall_per_step: (b.stall_seconds - a.stall_seconds) / timed_steps,
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
        disk_read_bytes_per_s: disk.read_bytes_per_s,
        disk_write_bytes_per_s: disk.write_bytes_per_s,
        disk,
        rows,
        steps,
        threads: config.train.threads,
    })
}

/// The disk's own bandwidth, measured the way `dd` or `fio` would (one file, large sequential
/// requests, `O_DIRECT` from aligned buffers), and once more with the Disk tier's own requests.
#[derive(Clone, Debug, Serialize)]
pub struct DiskBandwidth {
    /// What was measured, in words.
    pub method: String,
    /// Bytes written, then read.
    pub bytes: u64,
    /// Bytes per request of the sequential figures.
    pub request: u64,
    /// Whether the file system took `O_DIRECT` (else buffered, flushed, page cache dropped).
    pub direct: bool,
    /// Sequential read, bytes per second.
    pub read_bytes_per_s: f64,
    /// Sequential write, bytes per second.
    pub write_bytes_per_s: f64,
    /// Bytes per request of the tier-shaped figures (one unit); 0 when not measured.
    pub tier_request: u64,
    /// Threads issuing them at once (the tier's I/O threads).
    pub tier_threads: usize,
    /// Read through a [`DiskTier`](crate::storage::tiers::disk::DiskTier) slot file, whole units,
    /// bytes per second.
    pub tier_read_bytes_per_s: f64,
    /// Written through a slot file, whole units, bytes per second.
    pub tier_write_bytes_per_s: f64,
}

/// Write `bytes` to a new file under `dir` sequentially in `request`-byte pieces, then read it
/// back, with `O_DIRECT` (what `dd oflag=direct` / `iflag=direct` measure); where the file system
/// refuses `O_DIRECT`, buffered with `fdatasync` and the page cache dropped before reading.
pub fn disk_bandwidth(dir: &std::path::Path, bytes: u64, request: u64) -> Result<DiskBandwidth> {
    use crate::error::Error;
    use crate::storage::tiers::disk::{padded, ALIGN};
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create the benchmark's directory", dir, e))?;
    let path = dir.join("bandwidth");
    let request = padded(request.max(1)) as usize;
    let n = bytes.div_ceil(request as u64).max(1);
    let open = |direct: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true).create(true).truncate(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(&path)
    };
    let fail = |e| Error::io("cannot measure the disk's bandwidth", &path, e);
    let mut raw = vec![0x5au8; request + ALIGN];
    let start = (ALIGN - raw.as_ptr() as usize % ALIGN) % ALIGN;
    let buf = &mut raw[start..start + request];
    let (mut file, mut direct) = match open(true) {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(false).map_err(fail)?, false),
        Err(e) => return Err(fail(e)),
    };
    let write_all = |file: &std::fs::File, buf: &[u8]| -> std::io::Result<f64> {
        let started = Instant::now();
        for i in 0..n {
            file.write_all_at(buf, i * request as u64)?;
        }
        Ok(started.elapsed().as_secs_f64())
    };
    let written = match write_all(&file, buf) {
        Ok(s) => s,
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
            (file, direct) = (open(false).map_err(fail)?, false);
            write_all(&file, buf).map_err(fail)?
        }
        Err(e) => return Err(fail(e)),
    };
    let written = if direct {
        written
    } else {
        let started = Instant::now();
        file.sync_data().map_err(fail)?;
        drop_cached(&file);
        written + started.elapsed().as_secs_f64()
    };
    let started = Instant::now();
    for i in 0..n {
        file.read_exact_at(buf, i * request as u64).map_err(fail)?;
    }
    let read = started.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    let total = n * request as u64;
    Ok(DiskBandwidth {
        method: format!(
            "{} sequential in {} requests, 1 thread, {}, new file in {}",
            crate::storage::tiers::format_bytes(total),
            crate::storage::tiers::format_bytes(request as u64),
            if direct {
                "O_DIRECT"
            } else {
                "buffered (O_DIRECT refused), fdatasync, page cache dropped"
            },
            dir.display()
        ),
        bytes: total,
        request: request as u64,
        direct,
        read_bytes_per_s: total as f64 / read,
        write_bytes_per_s: total as f64 / written,
        tier_request: 0,
        tier_threads: 0,
        tier_read_bytes_per_s: 0.0,
        tier_write_bytes_per_s: 0.0,
    })
}

/// The Disk tier's own path without training: `threads` threads write `bytes` as whole units of
/// `unit` bytes into a slot file (each thread every `threads`-th unit), then read them back.
/// Returns (read, write) bytes per second.
pub fn tier_bandwidth(dir: &std::path::Path, bytes: u64, unit: u64, threads: usize) -> Result<(f64, f64)> {
    use crate::storage::tiers::disk::DiskTier;
    let unit = unit.max(1);
    let threads = threads.max(1);
    let n = bytes.div_ceil(unit).max(threads as u64) as usize;
    let disk = DiskTier::open(&dir.join("tier-bandwidth"), true, (0..n).map(|i| (0, i)), unit, 0)?;
    let data = vec![0xa5u8; unit as usize];
    let run = |write: bool| -> Result<f64> {
        let started = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (disk, data) = (&disk, &data);
                    s.spawn(move || -> Result<()> {
                        for i in (t..n).step_by(threads) {
                            if write {
                                disk.write((0, i), data)?;
                            } else {
                                disk.read_with((0, i), data.len(), |b| Ok(std::hint::black_box(b.len())))?;
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(crate::error::Error::runtime("a disk benchmark thread panicked")))
            })
        })?;
        Ok(started.elapsed().as_secs_f64())
    };
    let result = run(true).and_then(|w| Ok((run(false)?, w)));
    disk.remove();
    let (r, w) = result?;
    let total = (n as u64 * unit) as f64;
    Ok((total / r, total / w))
}

#[cfg(target_os = "linux")]
fn drop_cached(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads the descriptor, which `f` keeps open for the call.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_cached(_: &std::fs::File) {}

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
        let scratch = Scratch::new(&parent.join("made/on/the/way"), "inner");
        std::fs::create_dir_all(scratch.path.join("deep")).unwrap();
        std::fs::write(scratch.path.join("deep/file"), b"x").unwrap();
        drop(scratch);
        assert!(!parent.exists(), "the benchmark's directories outlive it");
        // An existing parent stays.
        std::fs::create_dir_all(&parent).unwrap();
        drop(Scratch::new(&parent, "inner"));
        assert!(parent.exists());
        std::fs::remove_dir(&parent).unwrap();
    }
}
