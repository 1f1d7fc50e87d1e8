//! `semoe bench`: the measurements behind BENCHMARKS.md (the timing code is `semoe::bench`).

use clap::{Args, Subcommand};
use semoe::bench;
use semoe::kernels::{Cpu, Gelu};
use semoe::model::moe::{DropPolicy, MoeConfig};
use std::path::PathBuf;

use super::print_json;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Forward and forward+backward throughput of one MoE layer.
    MoeLayer(MoeLayerArgs),
    /// Square f32 matrix product rate and the FMA peak.
    Matmul(MatmulArgs),
    /// Training tokens/s of the main job's model: the plain loop against the actor runtime with
    /// 1, 2, ... workers, alternating round by round.
    Runtime(RuntimeArgs),
    /// Seconds from SIGKILLing one of the run's worker processes to the next committed step (the
    /// main job's model over worker processes on this machine).
    Recovery(RecoveryArgs),
    /// Training tokens/s with two MoE blocks' experts in memory (Device and Host budgets of one
    /// block each: 25% with the default 8 layers; the rest on disk) against everything in memory; prefetch against loading on
    /// demand; the SE-MoE cache policy against LRU; the disk's own bandwidth measured alongside.
    Storage(StorageBenchArgs),
    /// The expert cache policies on the routing of a trained model: a checkpoint's gate routes
    /// the training batches that follow it, and that routing is replayed through the tiers'
    /// bookkeeping (no disk, no timing) under LRU, the default (step-order) policy, SE-MoE's and
    /// a grid of its settings, with Belady's MIN as the bound: hit rates, loads and bytes per
    /// memory size.
    CachePolicy(CachePolicyBenchArgs),
    /// Generation bytes/s: the recomputing path against the key/value-cached decoder, alone and in
    /// batches (a checkpoint's model, or the main job's model freshly initialised).
    Generate(GenerateBenchArgs),
    /// Ring-memory inference: a model several times the Device budget (64 experts per block,
    /// initialised) generated from resident, through the ring, and loading on demand.
    Ring(RingBenchArgs),
}

#[derive(Args)]
pub struct RingBenchArgs {
    /// A checkpoint or run directory (default: a 64-expert model initialised with seed 0 and
    /// written under --dir).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Where to write the initialised model's checkpoint (default: the system's temporary
    /// directory; removed afterwards).
    #[arg(long, conflicts_with = "checkpoint")]
    dir: Option<PathBuf>,
    /// Model width of the initialised model.
    #[arg(long, default_value_t = 256, conflicts_with = "checkpoint")]
    d_model: usize,
    /// Expert hidden width.
    #[arg(long, default_value_t = 512, conflicts_with = "checkpoint")]
    d_ff: usize,
    /// Blocks (every one an MoE block).
    #[arg(long, default_value_t = 4, conflicts_with = "checkpoint")]
    layers: usize,
    /// Experts per block.
    #[arg(long, default_value_t = 64, conflicts_with = "checkpoint")]
    experts: usize,
    /// Device budget of the ring (default: a quarter of the checkpoint).
    #[arg(long)]
    device_budget: Option<String>,
    /// Threads loading pieces.
    #[arg(long, default_value_t = 1)]
    io_threads: usize,
    /// How the ring loads pieces, each compared: map (pages of the mapped checkpoint, read in
    /// place), copy (read into the sections' own buffers).
    #[arg(long, value_delimiter = ',', default_value = "map,copy")]
    load: Vec<String>,
    /// Compute threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16", value_parser = positive)]
    batch: Vec<usize>,
    /// Tokens per sequence and round.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    tokens: usize,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = positive)]
    rounds: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct GenerateBenchArgs {
    /// A checkpoint or run directory (default: the main job's model, initialised with seed 0).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Compute threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Bytes per sequence and round of the cached decoder.
    #[arg(long, default_value_t = 2000, value_parser = positive)]
    tokens: usize,
    /// Bytes per round of the recomputing path.
    #[arg(long, default_value_t = 300, value_parser = positive)]
    recompute_tokens: usize,
    /// Batch sizes of the cached decoder.
    #[arg(long, value_delimiter = ',', default_value = "1,16", value_parser = positive)]
    batch: Vec<usize>,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = positive)]
    rounds: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct CachePolicyBenchArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Training steps to route and replay, from the one after the checkpoint's.
    #[arg(long, default_value_t = 200, value_parser = positive)]
    steps: usize,
    /// Sequences per step (default: the run's).
    #[arg(long)]
    batch: Option<usize>,
    /// Routing groups per step (default: the run's).
    #[arg(long)]
    groups: Option<usize>,
    /// Shares of the expert units that Device and Host hold together, in percent (Device holds
    /// one MoE block's experts, Host the rest); shares below one block are left out.
    #[arg(long, value_delimiter = ',', default_value = "25,50,75")]
    memory: Vec<f64>,
    /// Compute threads (for routing the batches).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StorageBenchArgs {
    /// Compute threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Sequences per step (of 64 bytes); 512 gives each expert about 1,000 tokens per step.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Model width.
    #[arg(long, default_value_t = 128)]
    d_model: usize,
    /// Expert hidden width.
    #[arg(long, default_value_t = 512)]
    d_ff: usize,
    /// Layers (every one an MoE block).
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Experts per MoE block.
    #[arg(long, default_value_t = 64)]
    experts: usize,
    /// Untimed steps first (per variant).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed steps per variant and round.
    #[arg(long, default_value_t = 2, value_parser = positive)]
    steps: usize,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = positive)]
    rounds: usize,
    /// Directory of the disk tier (on the disk to measure; default: the system's temporary
    /// directory unless it is memory-backed, then /var/tmp, then the working directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Threads reading and writing the disk tier.
    #[arg(long, default_value_t = 8)]
    io_threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RuntimeArgs {
    /// Compute threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Worker counts to compare (0 = the plain loop without actors).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    workers: Vec<usize>,
    /// Worker-process counts to compare after them (`semoe worker` processes on this machine,
    /// their data over same-host Unix sockets), e.g. `--workers 2 --processes 2`.
    #[arg(long, value_delimiter = ',')]
    processes: Vec<usize>,
    /// Worker-process counts to compare last, with `train.same_host = false` (their data over
    /// QUIC on loopback, as between machines).
    #[arg(long, value_delimiter = ',')]
    quic_processes: Vec<usize>,
    /// In-process worker counts to compare last, their expert rows over collectives
    /// (`--collective`), e.g. `--workers 2 --collective-workers 2`.
    #[arg(long, value_delimiter = ',')]
    collective_workers: Vec<usize>,
    /// Worker-process counts to compare last, their expert rows over collectives
    /// (`--collective`), e.g. `--processes 2 --collective-processes 2`.
    #[arg(long, value_delimiter = ',')]
    collective_processes: Vec<usize>,
    /// The collectives of `--collective-workers` and `--collective-processes`: `sim` (the CPU
    /// stand-in of NCCL) or `nccl` (worker i on GPU i; a build with `--features cuda`) [default:
    /// sim].
    #[arg(long, value_parser = ["sim", "nccl"])]
    collective: Option<String>,
    /// Untimed steps first (per engine).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed steps per engine and round.
    #[arg(long, default_value_t = 10, value_parser = positive)]
    steps: usize,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = positive)]
    rounds: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RecoveryArgs {
    /// Compute threads, divided among the worker processes (each gets threads / processes, at
    /// least one).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Worker processes (one is killed).
    #[arg(long, default_value_t = 3)]
    processes: usize,
    /// Steps before the kill.
    #[arg(long, default_value_t = 15, value_parser = positive_u64)]
    kill_after: u64,
    /// Steps between in-memory copies of the state (the default is `train.snapshot_every`'s).
    #[arg(long, default_value_t = 20)]
    snapshot_every: u64,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = positive)]
    rounds: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct Common {
    /// Compute threads (0 = one per core; 2 when not given). A GPU run refuses it.
    #[arg(long)]
    threads: Option<usize>,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed iterations (the median is reported; at least 1).
    #[arg(long, default_value_t = 10, value_parser = positive)]
    iters: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

impl Common {
    /// The compute threads asked for, or the default of 2.
    fn cpu_threads(&self) -> usize {
        self.threads.unwrap_or(2)
    }
}

#[derive(Args)]
pub struct MoeLayerArgs {
    #[command(flatten)]
    common: Common,
    /// Tokens per forward pass (one group).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Model width.
    #[arg(long, default_value_t = 512)]
    d_model: usize,
    /// Expert hidden width.
    #[arg(long, default_value_t = 2048)]
    d_ff: usize,
    /// Number of experts.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    k: usize,
    /// Capacity factor.
    #[arg(long, default_value_t = 1.0)]
    capacity_factor: f64,
    /// Keep every assignment (no capacity; refused with --capacity-factor, which it would ignore).
    #[arg(long, conflicts_with = "capacity_factor")]
    dropless: bool,
    /// Drop policy: position or probs.
    #[arg(long, default_value = "position", value_parser = parse_policy)]
    drop_policy: DropPolicy,
    /// GELU form: erf or tanh.
    #[arg(long, default_value = "erf")]
    gelu: Gelu,
    /// Where the layer runs: `cpu`, or `cuda` (GPU 0; a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// Precision of the GPU's matrix products: f32, tf32 or bf16 (bfloat16 products of the float32
    /// buffers; `--device cuda` only).
    #[arg(long, default_value = "f32")]
    precision: semoe::kernels::cuda::Precision,
}

#[derive(Args)]
pub struct MatmulArgs {
    #[command(flatten)]
    common: Common,
    /// m = n = k of the product.
    #[arg(long, default_value_t = 1024)]
    size: usize,
}

/// A count that must be at least 1.
pub fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// [`positive`] as a `u64`.
pub fn positive_u64(s: &str) -> Result<u64, String> {
    positive(s).map(|n| n as u64)
}

pub fn parse_policy(s: &str) -> Result<DropPolicy, String> {
    match s {
        "position" => Ok(DropPolicy::Position),
        "probs" => Ok(DropPolicy::Probs),
        other => Err(format!("drop policy must be \"position\" or \"probs\", got {other:?}")),
    }
}

pub fn storage_bench(a: &StorageBenchArgs) -> semoe::Result<()> {
    use semoe::storage::tiers::format_bytes;
    let mut c = semoe::train::TrainConfig::default();
    c.train.threads = a.threads;
    c.train.batch = a.batch;
    if a.batch == 0 || !a.batch.is_multiple_of(c.train.groups) {
        return Err(semoe::Error::config(format!(
            "--batch {} must be a positive multiple of the bench's {} routing groups",
            a.batch, c.train.groups
        )));
    }
    c.train.workers = 1;
    c.model.d_model = a.d_model;
    c.model.d_ff = a.d_ff;
    c.model.n_layer = a.layers;
    c.model.experts = a.experts;
    c.model.moe_every = 1;
    c.model.n_head = 4;
    c.validate()?;
    let unit = semoe::storage::tiers::ExpertSlot::bytes_for(a.d_model, a.d_ff);
    let block = a.experts as u64 * unit;
    // Device + Host hold two blocks' experts either way: one block each, or both in Device, where
    // the next block's experts load while the current block computes. That is 25% of the expert
    // state with the default 8 layers; the labels say what it is for `--layers`.
    let tiered = |policy: &str, prefetch: bool, device_blocks: u64| semoe::train::config::StorageSettings {
        device_budget: (device_blocks * block).to_string(),
        host_budget: ((2 - device_blocks) * block).to_string(),
        cache_policy: policy.into(),
        prefetch,
        io_threads: a.io_threads,
        ..Default::default()
    };
    let share = bench::percent_in_memory(2 * block, block * a.layers as u64);
    let variants = [
        ("all in memory".to_string(), Default::default()),
        (format!("{share}, step-order, prefetch"), tiered("step-order", true, 1)),
        (
            format!("{share}, step-order, on demand"),
            tiered("step-order", false, 1),
        ),
        (format!("{share}, se-moe, prefetch"), tiered("se-moe", true, 1)),
        (format!("{share}, lru, prefetch"), tiered("lru", true, 1)),
        (
            format!("{share} all in Device, prefetch"),
            tiered("step-order", true, 2),
        ),
    ]
    .into_iter()
    .map(|(name, storage)| bench::StorageVariant { name, storage })
    .collect::<Vec<_>>();
    // Every variant's settings checked before the disk is measured (a minute of it), and named by
    // this bench's flag.
    if a.io_threads == 0 || a.io_threads > semoe::config::MAX_IO_THREADS {
        return Err(semoe::Error::config(format!(
            "--io-threads must be between 1 and {}, got {}",
            semoe::config::MAX_IO_THREADS,
            a.io_threads
        )));
    }
    for v in &variants {
        let mut checked = c.clone();
        checked.storage = v.storage.clone();
        checked.validate()?;
    }
    let dir = a.dir.clone().unwrap_or_else(bench::default_disk_dir);
    if let Some(kind) = bench::memory_filesystem(&dir) {
        semoe::say!(
            "notice: {} is on a {kind} (memory): the Disk tier's figures below are the memory's, not a disk's",
            dir.display()
        );
    }
    let r = bench::storage_bench(&c, &variants, &dir, a.warmup, a.steps, a.rounds)?;
    if a.json {
        return print_json(&r);
    }
    let mib = |b: f64| b / (1 << 20) as f64;
    semoe::out!(
        "expert state {} ({} per block), {:.0} tokens per expert per step, {} threads; disk: read {:.0} MiB/s, write {:.0} MiB/s ({})",
        format_bytes(r.expert_state_bytes),
        format_bytes(a.experts as u64 * unit),
        r.tokens_per_expert,
        r.threads,
        mib(r.disk_read_bytes_per_s),
        mib(r.disk_write_bytes_per_s),
        r.disk.method
    );
    if r.disk.parallel_threads > 0 {
        semoe::out!(
            "disk at depth ({} requests in flight, same requests): read {:.0} MiB/s, write {:.0} MiB/s; one in flight: read {:.0} MiB/s, write {:.0} MiB/s; the better of each is the disk's bandwidth",
            r.disk.parallel_threads,
            mib(r.disk.parallel_read_bytes_per_s),
            mib(r.disk.parallel_write_bytes_per_s),
            mib(r.disk.read_bytes_per_s),
            mib(r.disk.write_bytes_per_s)
        );
    }
    if r.disk.tier_threads > 0 {
        semoe::out!(
            "disk tier alone ({} units, {} I/O threads): read {:.0} MiB/s, write {:.0} MiB/s",
            format_bytes(r.disk.tier_request),
            r.disk.tier_threads,
            mib(r.disk.tier_read_bytes_per_s),
            mib(r.disk.tier_write_bytes_per_s)
        );
    }
    let base = r.rows.first().map_or(f64::NAN, |x| x.tokens_per_s);
    for x in &r.rows {
        semoe::out!(
            "{:>24}: {:>7.0} tokens/s ({:>5.1}%), hit rate {:>5.1}%, prefetch accuracy {:>5.1}%, disk {:>7.1} MiB read + {:>7.1} MiB written per step, {:>6.0} MiB/s ({:>5.0} MiB/s per I/O thread while busy; {:>5.1}% of the disk's {:.0} MiB/s for this mix), stall {:.2} s/step{}, CPU {:.2} s/step",
            x.name,
            x.tokens_per_s,
            100.0 * x.tokens_per_s / base,
            100.0 * x.hit_rate,
            100.0 * x.prefetch_accuracy,
            mib(x.read_per_step),
            mib(x.written_per_step),
            mib(x.disk_bytes_per_s),
            mib(x.io_bytes_per_busy_s),
            100.0 * x.of_ceiling,
            mib(x.ceiling_bytes_per_s),
            x.stall_per_step,
            stall_causes(&x.stall_causes_per_step),
            x.cpu_per_step
        );
    }
    Ok(())
}

pub fn cache_policy_bench(a: &CachePolicyBenchArgs) -> semoe::Result<()> {
    use semoe::storage::tiers::replay::UnitSizes;
    // Its errors name the path (a missing or damaged checkpoint, an empty run directory).
    let ckpt = super::generate::checkpoint_to_read(&a.checkpoint)?;
    let (step, dir) = (ckpt.step, ckpt.dir.clone());
    let config = semoe::train::trainer::checkpoint_config(&ckpt)?;
    let model = semoe::train::trainer::model_from(ckpt)?;
    semoe::train::trainer::refuse_a_recorded_pipe(&config)?;
    let corpus = semoe::train::trainer::corpus_for(&config)?;
    let cpu = Cpu::new(a.threads)?;
    let batches = bench::TraceBatches::after_checkpoint(&config, step, a.steps, a.batch, a.groups);
    let trace = bench::record_routing(&model, &cpu, &corpus.train, &batches)?;
    let units = trace.blocks() * trace.experts;
    let mut sizes: Vec<bench::MemorySize> = Vec::new();
    let mut labels = Vec::new();
    for &p in &a.memory {
        if !(p > 0.0 && p <= 100.0) {
            return Err(semoe::Error::config(format!(
                "--memory {p}: a share must be in (0, 100]"
            )));
        }
        match bench::MemorySize::share(p, units, trace.experts) {
            Some(m) if !sizes.contains(&m) => {
                sizes.push(m);
                labels.push(format!("{p}%"));
            }
            Some(_) => {}
            None => semoe::say!(
                "note: {p}% of {units} units is less than one MoE block ({} experts): left out",
                trace.experts
            ),
        }
    }
    let m = &config.model;
    let r = bench::cache_policy_bench(
        &trace,
        &sizes,
        &bench::policy_grid(),
        UnitSizes::for_expert(m.d_model, m.d_ff),
    )?;
    if a.json {
        return print_json(&r);
    }
    semoe::out!(
        "routing of checkpoint {} (step {step}): {} MoE blocks x {} experts, top-{}; {} steps of {} sequences in {} groups from step {} (the one after the checkpoint's); {:.1}% of (step, block, expert) routed to; busiest expert per block {} the uniform share",
        dir.display(),
        r.blocks,
        r.experts,
        m.k,
        r.steps,
        batches.batch,
        batches.groups,
        batches.first_step + 1,
        100.0 * r.touched,
        r.peak_over_uniform
            .iter()
            .map(|x| format!("{x:.2}x"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let sizes_line: Vec<String> = r
        .sizes
        .iter()
        .zip(&labels)
        .map(|(s, l)| format!("{l} = {} Device + {} Host units", s.device, s.host))
        .collect();
    semoe::out!(
        "memory (of {units} units of {}): {}; loading on demand; hit rate = forward and backward acquisitions served from memory; loads = units read (parameters alone, or whole), MiB read/written per step",
        semoe::storage::tiers::format_bytes(r.unit_sizes.unit),
        sizes_line.join(", ")
    );
    let header: Vec<String> = labels.iter().map(|l| format!("{l:>30}")).collect();
    semoe::out!("{:<32} {}", "policy", header.join(" "));
    let steps = r.steps.max(1) as u64;
    let cell = |c: &semoe::storage::tiers::replay::ReplayCounts, bound: bool| {
        if bound {
            format!("{:>6.2}% {:>6} loads {:>13}", 100.0 * c.hit_rate(), c.loads(), "")
        } else {
            format!(
                "{:>6.2}% {:>6} loads {:>5.1}/{:>5.1} MiB",
                100.0 * c.hit_rate(),
                c.loads(),
                mib(c.bytes_read(&r.unit_sizes) / steps),
                mib(c.bytes_written(&r.unit_sizes) / steps)
            )
        }
    };
    let line = |row: &bench::PolicyRow, bound: bool| {
        let cells: Vec<String> = row.counts.iter().map(|c| cell(c, bound)).collect();
        semoe::out!("{:<32} {}", row.name, cells.join(" "));
    };
    line(&r.bound, true);
    let mut rows: Vec<&bench::PolicyRow> = r.rows.iter().collect();
    rows.sort_by(|x, y| y.mean_hit_rate().total_cmp(&x.mean_hit_rate()));
    for row in rows {
        line(row, false);
    }
    if let Some(best) = r.best() {
        semoe::out!(
            "best mean hit rate: {} ({:.2}%)",
            best.name,
            100.0 * best.mean_hit_rate()
        );
    }
    Ok(())
}

/// The stall's causes that took any time, for a line of the storage bench: ` (load 0.41, own
/// write 0.02)`, or nothing.
fn stall_causes(seconds: &[f64; 4]) -> String {
    let parts: Vec<String> = semoe::storage::tiers::STALL_CAUSES
        .iter()
        .zip(seconds)
        .filter(|(_, s)| **s >= 0.005)
        .map(|(name, s)| format!("{name} {s:.2}"))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// How the layer keeps assignments, for its figures' first line.
fn capacity(a: &MoeLayerArgs) -> String {
    if a.dropless {
        "dropless".to_string()
    } else {
        format!("capacity_factor={}", a.capacity_factor)
    }
}

/// `semoe bench moe-layer --device cuda`.
fn moe_layer_on_gpu(a: &MoeLayerArgs, config: &MoeConfig) -> semoe::Result<()> {
    semoe::model::cuda::check_moe_config(config)?;
    let r = bench::moe_layer_cuda_bench(config, a.tokens, a.common.warmup, a.common.iters, a.precision)?;
    if a.common.json {
        return print_json(&r);
    }
    semoe::out!(
        "MoE layer on {}: S={} d_model={} d_ff={} E={} k={} {} ({} of {} assignments kept, {} rows per expert), {}",
        r.device,
        r.tokens,
        a.d_model,
        a.d_ff,
        a.experts,
        a.k,
        capacity(a),
        r.kept,
        r.tokens * a.k,
        r.slots_per_expert,
        r.precision
    );
    semoe::out!(
        "  forward          {:>11.1} tokens/s  {:>8.2} ms",
        r.forward_tokens_per_s,
        r.forward_seconds * 1e3
    );
    semoe::out!(
        "  forward+backward {:>11.1} tokens/s  {:>8.2} ms  {:>8.1} GFLOP/s of expert products",
        r.train_tokens_per_s,
        r.train_seconds * 1e3,
        r.train_gflops
    );
    semoe::out!(
        "  expert products alone {:.1} GFLOP/s = {:.0}% of cuBLAS's plain product at the same size ({:.1} GFLOP/s)",
        r.expert_products_gflops,
        100.0 * r.expert_products_gflops / r.matrix_gflops,
        r.matrix_gflops
    );
    Ok(())
}

/// Run one `semoe bench` command.
pub fn run(command: BenchCommand) -> semoe::Result<()> {
    match command {
        BenchCommand::MoeLayer(a) => {
            let config = MoeConfig {
                d_model: a.d_model,
                d_ff: a.d_ff,
                experts: a.experts,
                k: a.k,
                capacity_factor: a.capacity_factor,
                dropless: a.dropless,
                drop_policy: a.drop_policy,
                gelu: a.gelu,
                ..MoeConfig::default()
            };
            config.validate()?;
            if a.device == "cuda" {
                if let Some(threads) = a.common.threads {
                    return Err(semoe::Error::config(format!(
                        "--threads {threads} sets the CPU's compute threads; --device cuda computes on the GPU"
                    )));
                }
                return moe_layer_on_gpu(&a, &config);
            }
            if a.precision != semoe::kernels::cuda::Precision::F32 {
                let given = format!("{:?}", a.precision).to_lowercase();
                return Err(semoe::Error::config(format!(
                    "--precision {given} applies to the GPU's products (--device cuda); the CPU computes in float32"
                )));
            }
            let cpu = Cpu::new(a.common.cpu_threads())?;
            let peak = bench::fma_peak_gflops(cpu.threads());
            let r = bench::moe_layer_bench(&cpu, &config, a.tokens, a.common.warmup, a.common.iters, peak)?;
            if a.common.json {
                print_json(&r)?;
            } else {
                semoe::out!(
                    "MoE layer: S={} d_model={} d_ff={} E={} k={} {} ({} of {} assignments kept), f32, {} threads",
                    r.tokens,
                    a.d_model,
                    a.d_ff,
                    a.experts,
                    a.k,
                    capacity(&a),
                    r.kept,
                    r.tokens * a.k,
                    r.threads
                );
                semoe::out!(
                    "  forward          {:>9.1} tokens/s  {:>7.1} ms  {:>6.1} GFLOP/s ({:.0}% of peak)",
                    r.forward_tokens_per_s,
                    r.forward_seconds * 1e3,
                    r.forward_gflops,
                    100.0 * r.forward_gflops / r.peak_gflops
                );
                semoe::out!(
                    "  forward+backward {:>9.1} tokens/s  {:>7.1} ms  {:>6.1} GFLOP/s ({:.0}% of peak)",
                    r.train_tokens_per_s,
                    r.train_seconds * 1e3,
                    r.train_gflops,
                    100.0 * r.train_gflops / r.peak_gflops
                );
                semoe::out!(
                    "  expert matmuls alone {:.1} GFLOP/s ({:.0}% of peak); FMA peak of {} threads {:.1} GFLOP/s",
                    r.expert_matmul_gflops,
                    100.0 * r.expert_matmul_gflops / r.peak_gflops,
                    r.threads,
                    r.peak_gflops
                );
            }
        }
        BenchCommand::Runtime(a) => {
            let mut config = semoe::train::TrainConfig::default();
            config.train.threads = a.threads;
            config.validate()?;
            if a.collective.is_some() && a.collective_workers.is_empty() && a.collective_processes.is_empty() {
                return Err(semoe::Error::config(
                    "--collective chooses the collectives of --collective-workers and --collective-processes; \
                     give one of them (e.g. --collective-workers 2)",
                ));
            }
            let r = bench::runtime_bench(
                &config,
                &bench::RuntimeEngines {
                    workers: &a.workers,
                    processes: &a.processes,
                    quic_processes: &a.quic_processes,
                    collective_workers: &a.collective_workers,
                    collective_processes: &a.collective_processes,
                    collective: a.collective.as_deref().unwrap_or("sim").parse()?,
                },
                a.warmup,
                a.steps,
                a.rounds,
            )?;
            if a.json {
                print_json(&r)?;
            } else {
                let base = r.tokens_per_s.first().copied().unwrap_or(f64::NAN);
                let names = r
                    .workers
                    .iter()
                    .map(|&w| {
                        if w == 0 {
                            "plain loop".to_string()
                        } else {
                            format!("runtime, {w} worker(s)")
                        }
                    })
                    .chain(r.processes.iter().map(|p| format!("{p} worker processes")))
                    .chain(r.quic_processes.iter().map(|p| format!("{p} processes, QUIC")))
                    .chain(
                        r.collective_workers
                            .iter()
                            .map(|w| format!("{w} worker(s), {}", r.collective)),
                    )
                    .chain(
                        r.collective_processes
                            .iter()
                            .map(|p| format!("{p} processes, {}", r.collective)),
                    );
                for ((name, tps), threads) in names.zip(&r.tokens_per_s).zip(&r.engine_threads) {
                    semoe::out!(
                        "{name:>22}: {tps:>8.0} tokens/s ({:.1}% of the first), {threads} compute thread(s) in all",
                        100.0 * tps / base
                    );
                }
            }
        }
        BenchCommand::Recovery(a) => {
            let mut config = semoe::train::TrainConfig::default();
            config.train.threads = a.threads;
            config.train.snapshot_every = a.snapshot_every;
            config.validate()?;
            let r = bench::recovery_bench(&config, a.processes, a.kill_after, a.rounds)?;
            if a.json {
                print_json(&r)?;
            } else {
                semoe::out!(
                    "SIGKILL of 1 of {} worker processes after step {}: next step committed {:.2} s later when QUIC's idle timeout \
                     detects it (median of {}: {:?} s), {:.2} s when the coordinator is the worker's parent ({:?} s); \
                     {:?} steps replayed (copy every {} steps); an undisturbed step takes {:.3} s",
                    r.processes,
                    r.kill_after,
                    r.median_seconds,
                    r.seconds.len(),
                    r.seconds.iter().map(|s| (s * 100.0).round() / 100.0).collect::<Vec<_>>(),
                    r.parent_median_seconds,
                    r.parent_seconds.iter().map(|s| (s * 100.0).round() / 100.0).collect::<Vec<_>>(),
                    r.replayed,
                    r.snapshot_every,
                    r.step_seconds
                );
            }
        }
        BenchCommand::Storage(a) => storage_bench(&a)?,
        BenchCommand::CachePolicy(a) => cache_policy_bench(&a)?,
        BenchCommand::Generate(a) => generate_bench(&a)?,
        BenchCommand::Ring(a) => ring_bench(&a)?,
        BenchCommand::Matmul(a) => {
            let cpu = Cpu::new(a.common.cpu_threads())?;
            let peak = bench::fma_peak_gflops(cpu.threads());
            let r = bench::matmul_bench(&cpu, a.size, a.common.warmup, a.common.iters)?;
            if a.common.json {
                print_json(&r)?;
            } else {
                semoe::out!(
                    "matmul {0}x{0}x{0} f32, {1} threads: {2:.1} GFLOP/s ({3:.0}% of the {4:.1} GFLOP/s FMA peak)",
                    r.size,
                    r.threads,
                    r.gflops,
                    100.0 * r.gflops / peak,
                    peak
                );
            }
        }
    }
    Ok(())
}

fn generate_bench(a: &GenerateBenchArgs) -> semoe::Result<()> {
    let model = match &a.checkpoint {
        Some(path) => semoe::train::trainer::model_from(super::generate::checkpoint_to_read(path)?)?,
        None => semoe::model::gpt::Gpt::init(&semoe::model::gpt::GptConfig::default(), 0)?,
    };
    let cpu = Cpu::new(a.threads)?;
    let r = bench::generate_bench(&model, &cpu, a.tokens, a.recompute_tokens, &a.batch, a.rounds)?;
    if a.json {
        return print_json(&r);
    }
    semoe::out!(
        "generation, {} ({} parameters), {} thread(s), median of {} rounds",
        match &a.checkpoint {
            Some(p) => p.display().to_string(),
            None => "the main job's model, initialised".into(),
        },
        model.num_params(),
        r.threads,
        a.rounds
    );
    semoe::out!(
        "  recomputing every window, 1 sequence   {:>10.0} bytes/s",
        r.recompute_bytes_per_s
    );
    for row in &r.cached {
        semoe::out!(
            "  key/value cache, {:>3} sequence(s)      {:>10.0} bytes/s  ({:.1}x the recomputing path)",
            row.batch,
            row.bytes_per_s,
            row.bytes_per_s / r.recompute_bytes_per_s
        );
    }
    Ok(())
}

/// Attention heads of the ring bench's initialised model.
const RING_BENCH_HEADS: usize = 8;

fn ring_bench(a: &RingBenchArgs) -> semoe::Result<()> {
    use semoe::storage::tiers::{format_bytes, parse_bytes};
    // The initialised checkpoint, removed afterwards with the folders made for it.
    let mut scratch: Option<bench::Scratch> = None;
    let checkpoint = match &a.checkpoint {
        Some(path) => path.clone(),
        None => {
            let mut c = semoe::train::TrainConfig::default();
            c.model.d_model = a.d_model;
            c.model.d_ff = a.d_ff;
            c.model.n_layer = a.layers;
            c.model.experts = a.experts;
            c.model.n_head = RING_BENCH_HEADS;
            c.model.moe_every = 1;
            if a.d_model == 0 || !a.d_model.is_multiple_of(RING_BENCH_HEADS) {
                return Err(semoe::Error::config(format!(
                    "--d-model {} must be a positive multiple of the bench's {RING_BENCH_HEADS} attention heads",
                    a.d_model
                )));
            }
            c.validate()?;
            // The model is initialised in memory before it is written: refused where it cannot be.
            let bytes = semoe::config::memory::param_count(&c).saturating_mul(4);
            if let Some(available) = semoe::config::memory::available_bytes() {
                if bytes > available {
                    return Err(semoe::Error::config(format!(
                        "--d-model {} --d-ff {} --layers {} --experts {}: the initialised model takes {} and the \
                         machine has {} available",
                        a.d_model,
                        a.d_ff,
                        a.layers,
                        a.experts,
                        semoe::storage::tiers::format_bytes(bytes),
                        semoe::storage::tiers::format_bytes(available)
                    )));
                }
            }
            let parent = a.dir.clone().unwrap_or_else(std::env::temp_dir);
            let made = scratch.insert(bench::Scratch::for_bench(&parent, "ring")?);
            let dir = made.path().to_path_buf();
            let model = semoe::model::gpt::Gpt::init(&c.model, 0)?;
            semoe::say!(
                "writing an initialised model of {} parameters ({} experts x {} blocks) to {}",
                model.num_params(),
                a.experts,
                a.layers,
                dir.display()
            );
            semoe::storage::state::save_model(&dir, &c, 0, &model)?
        }
    };
    let file_bytes = semoe::infer::ModelFile::open(&checkpoint)?.bytes();
    let budget = match &a.device_budget {
        Some(b) => parse_bytes("--device-budget", b)?,
        None => file_bytes / 4,
    };
    let cpu = Cpu::new(a.threads)?;
    let mut variants = Vec::new();
    for load in &a.load {
        let load: semoe::infer::RingLoad = load.parse()?;
        for prefetch in [
            semoe::infer::Prefetch::Routed,
            semoe::infer::Prefetch::WholeBlock,
            semoe::infer::Prefetch::OnDemand,
        ] {
            variants.push((prefetch, load));
        }
    }
    let r = bench::ring_bench(
        &checkpoint,
        &cpu,
        budget,
        a.io_threads,
        &variants,
        &a.batch,
        a.tokens,
        a.rounds,
    )?;
    // Peak resident memory of generation through the ring, in a process of its own (this one
    // held the whole model for the resident variant).
    let largest = a.batch.iter().copied().max().unwrap_or(1);
    let peak = ring_peak_rss(
        &checkpoint,
        &RingRun {
            budget,
            batch: largest,
            io_threads: a.io_threads,
            threads: a.threads,
            tokens: a.tokens,
            load: a.load.first().map_or("auto", String::as_str),
        },
    )?;
    if a.json {
        return print_json(&serde_json::json!({ "ring": r, "ring_process_peak_rss": peak, "peak_batch": largest }));
    }
    semoe::out!(
        "ring-memory inference: checkpoint {} = {:.1}x the Device budget of {} ({} sections of {}), {} thread(s), \
         {} I/O thread(s), {} tokens per sequence after {} to warm up, median of {} rounds (page cache warm)",
        format_bytes(r.checkpoint_bytes),
        r.checkpoint_bytes as f64 / budget as f64,
        format_bytes(budget),
        r.sections,
        format_bytes(r.section_bytes),
        r.threads,
        a.io_threads,
        r.tokens,
        bench::RING_WARM_UP_TOKENS,
        a.rounds
    );
    for row in &r.rows {
        let resident = r
            .rows
            .iter()
            .find(|x| x.batch == row.batch && x.variant == "resident")
            .map(|x| x.tokens_per_s)
            .unwrap_or(f64::NAN);
        // Against loading on demand: with the same loading, and by plain reads (copies), what a
        // program without the ring does.
        let on_demand = |load: semoe::infer::RingLoad| {
            let name = bench::ring_variant_name(semoe::infer::Prefetch::OnDemand, load);
            r.rows
                .iter()
                .find(|x| x.batch == row.batch && x.variant == name)
                .map(|x| row.tokens_per_s / x.tokens_per_s)
                .map_or_else(|| "    -".to_string(), |x| format!("{x:>5.2}"))
        };
        let same_load = if row.variant.ends_with("copy") {
            semoe::infer::RingLoad::Copy
        } else {
            semoe::infer::RingLoad::Map
        };
        semoe::out!(
            "  batch {:>3}  {:<26} {:>8.1} tokens/s  {:>5.0}% of resident  {}x on demand ({}x on-demand copy)  \
             stall {:>6.3} ms/token  loaded {:>10}/pass{}",
            row.batch,
            row.variant,
            row.tokens_per_s,
            100.0 * row.tokens_per_s / resident,
            on_demand(same_load),
            on_demand(semoe::infer::RingLoad::Copy),
            row.stall_per_token_ms,
            format_bytes(row.loaded_per_pass as u64),
            row.guess_accuracy
                .map(|g| format!("  routing guessed {:.0}% right", 100.0 * g))
                .unwrap_or_default()
        );
    }
    if let Some(peak) = peak {
        semoe::out!(
            "  peak resident memory of `semoe generate --device-budget {} --batch {largest}`: {}",
            format_bytes(budget),
            format_bytes(peak)
        );
    }
    Ok(())
}

/// The ring's settings of the bench, for the process whose peak memory is measured.
struct RingRun<'a> {
    budget: u64,
    batch: usize,
    io_threads: usize,
    threads: usize,
    tokens: usize,
    load: &'a str,
}

/// Run `semoe generate` through the ring in a child process, with the bench's settings (the
/// largest batch, the first loading), and read the peak resident memory it reports.
fn ring_peak_rss(checkpoint: &std::path::Path, run: &RingRun<'_>) -> semoe::Result<Option<u64>> {
    let exe = std::env::current_exe().map_err(|e| semoe::Error::io("finding this executable", "semoe", e))?;
    let out = std::process::Command::new(exe)
        .arg("generate")
        .arg("--checkpoint")
        .arg(checkpoint)
        .args(["--tokens", &run.tokens.to_string(), "--batch", &run.batch.to_string()])
        .args(["--threads", &run.threads.to_string(), "--ring-load", run.load])
        .args([
            "--device-budget",
            &run.budget.to_string(),
            "--io-threads",
            &run.io_threads.to_string(),
        ])
        .output()
        .map_err(|e| semoe::Error::io("running semoe generate", "semoe", e))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(semoe::Error::runtime(format!(
            "semoe generate through the ring (for its peak memory) failed ({}): {}",
            out.status,
            stderr.trim()
        )));
    }
    Ok(stderr
        .lines()
        .find_map(|l| l.split("peak resident memory ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok()))
}
