//! The `semoe` command line.

// The library's lint header (src/lib.rs), for the binary.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use semoe::bench;
use semoe::infer::{generate, SampleOptions};
use semoe::kernels::{Cpu, Gelu};
use semoe::model::moe::{DropPolicy, MoeConfig};
use semoe::storage::checkpoint;
use semoe::storage::run_dir;
use semoe::train::trainer::{ResumeOptions, StopReason};
use semoe::train::{TrainConfig, Trainer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

/// mimalloc, told at start (see [`keep_freed_pages`]) to keep freed pages mapped, so that the large
/// per-step activation buffers do not page-fault afresh on every step.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v3, the version libmimalloc-sys builds by default):
/// the option after `mi_option_eager_commit_delay` (14), which the crate does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never give freed memory back to the OS. By default mimalloc returns freed pages after a delay;
/// a training step frees and re-allocates its activations, and the refaults (about 100 thousand
/// in 20 s of the default run, each a fresh zeroed page) cost about 6% of the tokens/s.
fn keep_freed_pages() {
    // SAFETY: sets one of mimalloc's global options; mimalloc reads them at every decision, and
    // setting them is allowed at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(
    name = "semoe",
    version,
    about = "Elastic Mixture-of-Experts training and inference runtime",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a GPT-style MoE language model (by default on the bundled Shakespeare corpus), then
    /// write a report and print a sample.
    Train(Box<TrainArgs>),
    /// Generate text from a checkpoint, streaming it as it is sampled.
    Generate(GenerateArgs),
    /// The loss (nats/byte) of a checkpoint on a text: its run's validation text, or any file.
    Eval(EvalArgs),
    /// List the runs under a directory (default `runs/`): steps, validation loss, time, status.
    Runs(RunsArgs),
    /// Measure kernels and layers (tokens/s, GFLOP/s, fraction of the machine's peak).
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// Options of `semoe train`. Flags override the config file; the config file overrides defaults.
#[derive(Args)]
#[command(allow_negative_numbers = true, after_help = TRAIN_AFTER_HELP)]
struct TrainArgs {
    /// TOML config file with [model], [optimizer] and [train] tables (see `--print-config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory for config, metrics, checkpoints and report (default: a new
    /// runs/run-YYYYMMDD-HHMMSS, UTC). One process at a time: a directory in use is refused.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir from its newest intact checkpoint, with the run's own config.
    /// Settings that do not change the bits may be given again (threads, workers, placement,
    /// storage, time limit, eval and checkpoint cadence, steps); others are refused.
    #[arg(long, requires = "run_dir")]
    resume: bool,
    /// With --resume: continue even if the training text differs from the checkpoint's.
    #[arg(long, requires = "resume")]
    allow_data_change: bool,
    /// Train on this UTF-8 text file or directory instead of the bundled corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Optimizer steps (the learning-rate schedule spans them).
    #[arg(long)]
    steps: Option<u64>,
    /// Stop after this many seconds even if the steps are not done (0: no limit).
    #[arg(long)]
    time_limit: Option<f64>,
    /// Compute threads (0: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// In-process workers of the actor runtime (experts and groups spread over them); 0 runs the
    /// plain loop without actors. Every count gives the same parameters, bit for bit.
    #[arg(long)]
    workers: Option<usize>,
    /// Where experts live: round-robin, blocked, or a comma-separated worker per expert.
    #[arg(long)]
    placement: Option<String>,
    /// Serve the runtime's metrics as Prometheus text on HOST:PORT (path /metrics).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<String>,
    /// Bytes of expert state each worker keeps in the Device tier (the compute working set; e.g.
    /// 64MiB). It must hold one MoE block's experts. Unset: everything stays in memory.
    #[arg(long, value_name = "SIZE")]
    device_budget: Option<String>,
    /// Bytes of expert state each worker caches in the Host tier (e.g. 128MiB); what fits in
    /// neither budget lives in the Disk tier under the run directory.
    #[arg(long, value_name = "SIZE")]
    host_budget: Option<String>,
    /// Cache policy of the tiers: se-moe (decayed hit counters) or lru.
    #[arg(long, value_name = "POLICY")]
    cache_policy: Option<String>,
    /// Load experts only when used, without prefetching them from the routing.
    #[arg(long)]
    no_prefetch: bool,
    /// Shard the dense parameters across workers (ZeRO-3 style): each keeps the tensors it owns
    /// and gathers the others' one leg ahead while it computes (needs --workers 2 or more to matter).
    #[arg(long)]
    shard_dense: bool,
    /// Seed of initialisation and sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Sequences per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Groups per step (MoE routing and capacity are per group).
    #[arg(long)]
    groups: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Context length in bytes.
    #[arg(long)]
    block_size: Option<usize>,
    /// Residual width.
    #[arg(long)]
    d_model: Option<usize>,
    /// Transformer blocks.
    #[arg(long)]
    layers: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    heads: Option<usize>,
    /// Hidden width of each expert.
    #[arg(long)]
    d_ff: Option<usize>,
    /// Experts per MoE block.
    #[arg(long)]
    experts: Option<usize>,
    /// Experts per token.
    #[arg(long)]
    k: Option<usize>,
    /// A dense model with the same active parameters: every block a dense FFN of width k * d_ff.
    #[arg(long)]
    dense: bool,
    /// Evaluate every this many steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Checkpoint every this many steps.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Bytes to sample after training (0: none).
    #[arg(long, default_value_t = 400)]
    sample_tokens: usize,
    /// Prompt of the sample after training.
    #[arg(long, default_value = "ROMEO.\n")]
    sample_prompt: String,
    /// No progress bar or progress lines (evaluations and the summary are still printed).
    #[arg(long)]
    quiet: bool,
    /// Print the resolved config as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// Options of `semoe generate`.
#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct GenerateArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue (`\n` newline, `\t` tab, `\\` backslash).
    #[arg(long, default_value = "")]
    prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 500)]
    tokens: usize,
    /// Softmax temperature (0: always the most likely byte).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely bytes (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// Options of `semoe eval`.
#[derive(Args)]
struct EvalArgs {
    /// A checkpoint directory, or a run directory (its newest intact checkpoint is used).
    #[arg(long)]
    checkpoint: PathBuf,
    /// A UTF-8 text file or directory to evaluate on, whole (default: the validation split of the
    /// checkpoint's own training data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Windows of the model's context length, evenly spaced over the text (default: as many as
    /// fit without overlap, at most 4,096; with the run's own validation text, its eval_windows).
    #[arg(long)]
    windows: Option<usize>,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// Options of `semoe runs`.
#[derive(Args)]
struct RunsArgs {
    /// The directory holding the runs.
    #[arg(long, default_value = "runs")]
    dir: PathBuf,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Forward and forward+backward throughput of one MoE layer.
    MoeLayer(MoeLayerArgs),
    /// Square f32 matrix product rate and the FMA peak.
    Matmul(MatmulArgs),
    /// Training tokens/s of the main job's model: the plain loop against the actor runtime with
    /// 1, 2, ... workers, alternating round by round.
    Runtime(RuntimeArgs),
    /// Training tokens/s with 25% of the expert state in memory (Device and Host budgets of one
    /// MoE block each, the rest on disk) against everything in memory; prefetch against loading on
    /// demand; the SE-MoE cache policy against LRU; the disk's own bandwidth measured alongside.
    Storage(StorageBenchArgs),
}

#[derive(Args)]
struct StorageBenchArgs {
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
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Directory of the disk tier (on the disk to measure).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Threads reading and writing the disk tier.
    #[arg(long, default_value_t = 4)]
    io_threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RuntimeArgs {
    /// Compute threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Worker counts to compare (0 = the plain loop without actors).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    workers: Vec<usize>,
    /// Untimed steps first (per engine).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed steps per engine and round.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct Common {
    /// Compute threads (0 = one per core).
    #[arg(long, default_value_t = 2)]
    threads: usize,
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

#[derive(Args)]
struct MoeLayerArgs {
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
    /// Keep every assignment (no capacity).
    #[arg(long)]
    dropless: bool,
    /// Drop policy: position or probs.
    #[arg(long, default_value = "position", value_parser = parse_policy)]
    drop_policy: DropPolicy,
    /// GELU form: erf or tanh.
    #[arg(long, default_value = "erf")]
    gelu: Gelu,
}

#[derive(Args)]
struct MatmulArgs {
    #[command(flatten)]
    common: Common,
    /// m = n = k of the product.
    #[arg(long, default_value_t = 1024)]
    size: usize,
}

/// A count that must be at least 1.
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_policy(s: &str) -> Result<DropPolicy, String> {
    match s {
        "position" => Ok(DropPolicy::Position),
        "probs" => Ok(DropPolicy::Probs),
        other => Err(format!("drop policy must be \"position\" or \"probs\", got {other:?}")),
    }
}

fn main() -> ExitCode {
    keep_freed_pages();
    let matches = with_config_defaults(Cli::command()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(report: &impl serde::Serialize) -> semoe::Result<()> {
    let line = serde_json::to_string(report).map_err(|e| semoe::Error::parse("report", e.to_string()))?;
    println!("{line}");
    Ok(())
}

/// File-only settings of `semoe train`, listed under its `--help`.
const TRAIN_AFTER_HELP: &str = "Settings without a flag are set in the --config file (--print-config prints them \
all): model.vocab, dense_d_ff, moe_every, capacity_factor, min_capacity, dropless, drop_policy, normalize, aux_coef, \
z_coef, gelu; optimizer.min_lr, warmup, schedule, cooldown, beta1, beta2, eps, weight_decay, clip; \
train.eval_windows, keep_checkpoints, val_fraction, deadline_s; storage.cache_threshold, cache_beta, \
cache_decay_every, drop_page_cache, io_threads.\n\nCtrl-C (or SIGTERM) stops at the next step boundary, evaluates, \
checkpoints and writes the report; a second Ctrl-C stops at once. --resume continues bitwise.";

/// `semoe train --help` shows the default of every flag whose default comes from the config
/// (clap cannot show them itself: the flags are optional so that the config file can set them).
fn with_config_defaults(cmd: clap::Command) -> clap::Command {
    let d = TrainConfig::default();
    let defaults: Vec<(&str, String)> = vec![
        ("steps", d.train.steps.to_string()),
        ("time_limit", d.train.time_limit_s.to_string()),
        ("threads", d.train.threads.to_string()),
        ("workers", d.train.workers.to_string()),
        ("placement", d.train.placement.clone()),
        ("cache_policy", d.storage.cache_policy.clone()),
        ("seed", d.train.seed.to_string()),
        ("batch", d.train.batch.to_string()),
        ("groups", d.train.groups.to_string()),
        ("lr", d.optimizer.lr.to_string()),
        ("block_size", d.model.block_size.to_string()),
        ("d_model", d.model.d_model.to_string()),
        ("layers", d.model.n_layer.to_string()),
        ("heads", d.model.n_head.to_string()),
        ("d_ff", d.model.d_ff.to_string()),
        ("experts", d.model.experts.to_string()),
        ("k", d.model.k.to_string()),
        ("eval_every", d.train.eval_every.to_string()),
        ("checkpoint_every", d.train.checkpoint_every.to_string()),
    ];
    cmd.mut_subcommand("train", |mut train| {
        for (id, value) in defaults {
            train = train.mut_arg(id, |arg| {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                arg.help(format!("{help} [default: {value}]"))
            });
        }
        train
    })
}

/// A prompt as typed on a command line, with `\n` (newline), `\t` (tab), `\r` and `\\`
/// (backslash) understood; any other escape is an error naming it.
fn unescape(s: &str) -> semoe::Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                return Err(semoe::Error::config(format!(
                    "the prompt has an unknown escape \\{other} (known: \\n, \\t, \\r, \\\\)"
                )))
            }
            None => {
                return Err(semoe::Error::config(
                    "the prompt ends with a lone backslash (write \\\\ for one)",
                ))
            }
        }
    }
    Ok(out)
}

fn storage_bench(a: &StorageBenchArgs) -> semoe::Result<()> {
    use semoe::storage::tiers::format_bytes;
    let mut c = semoe::train::TrainConfig::default();
    c.train.threads = a.threads;
    c.train.batch = a.batch;
    c.train.workers = 1;
    c.model.d_model = a.d_model;
    c.model.d_ff = a.d_ff;
    c.model.n_layer = a.layers;
    c.model.experts = a.experts;
    c.model.moe_every = 1;
    c.model.n_head = 4;
    c.validate()?;
    let (d, f) = (a.d_model as u64, a.d_ff as u64);
    let unit = 32 + 12 * (2 * d * f + d + f);
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
        (format!("{share}, se-moe, prefetch"), tiered("se-moe", true, 1)),
        (format!("{share}, se-moe, on demand"), tiered("se-moe", false, 1)),
        (format!("{share}, lru, prefetch"), tiered("lru", true, 1)),
        (format!("{share} all in Device, prefetch"), tiered("se-moe", true, 2)),
    ]
    .into_iter()
    .map(|(name, storage)| bench::StorageVariant { name, storage })
    .collect::<Vec<_>>();
    let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let r = bench::storage_bench(&c, &variants, &dir, a.warmup, a.steps, a.rounds)?;
    if a.json {
        return print_json(&r);
    }
    let mib = |b: f64| b / (1 << 20) as f64;
    println!(
        "expert state {} ({} per block), {:.0} tokens per expert per step, {} threads; disk: read {:.0} MiB/s, write {:.0} MiB/s ({})",
        format_bytes(r.expert_state_bytes),
        format_bytes(a.experts as u64 * unit),
        r.tokens_per_expert,
        r.threads,
        mib(r.disk_read_bytes_per_s),
        mib(r.disk_write_bytes_per_s),
        r.disk.method
    );
    if r.disk.tier_threads > 0 {
        println!(
            "disk tier alone ({} units, {} I/O threads): read {:.0} MiB/s, write {:.0} MiB/s",
            format_bytes(r.disk.tier_request),
            r.disk.tier_threads,
            mib(r.disk.tier_read_bytes_per_s),
            mib(r.disk.tier_write_bytes_per_s)
        );
    }
    let base = r.rows.first().map_or(f64::NAN, |x| x.tokens_per_s);
    for x in &r.rows {
        println!(
            "{:>24}: {:>7.0} tokens/s ({:>5.1}%), hit rate {:>5.1}%, prefetch accuracy {:>5.1}%, disk {:>7.1} MiB read + {:>7.1} MiB written per step, {:>6.0} MiB/s ({:>5.0} MiB/s while busy; {:>5.1}% of the disk's {:.0} MiB/s for this mix), stall {:.2} s/step",
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
            x.stall_per_step
        );
    }
    Ok(())
}

/// Apply the flags of `semoe train` to a config (a new run's, or the recorded one on `--resume`,
/// where [`Trainer::resume_with_options`] refuses the changes that would change the bits).
fn apply_flags(a: &TrainArgs, c: &mut TrainConfig) {
    macro_rules! set {
        ($field:expr, $flag:expr) => {
            if let Some(v) = $flag.clone() {
                $field = v;
            }
        };
    }
    let t = &mut c.train;
    if let Some(v) = &a.data {
        t.data = Some(v.clone());
    }
    set!(t.steps, a.steps);
    set!(t.time_limit_s, a.time_limit);
    set!(t.threads, a.threads);
    set!(t.workers, a.workers);
    set!(t.placement, a.placement);
    set!(t.seed, a.seed);
    set!(t.batch, a.batch);
    set!(t.groups, a.groups);
    set!(t.eval_every, a.eval_every);
    set!(t.checkpoint_every, a.checkpoint_every);
    let st = &mut c.storage;
    set!(st.device_budget, a.device_budget);
    set!(st.host_budget, a.host_budget);
    set!(st.cache_policy, a.cache_policy);
    if a.no_prefetch {
        st.prefetch = false;
    }
    if a.shard_dense {
        st.shard_dense = true;
    }
    set!(c.optimizer.lr, a.lr);
    let m = &mut c.model;
    set!(m.block_size, a.block_size);
    set!(m.d_model, a.d_model);
    set!(m.n_layer, a.layers);
    set!(m.n_head, a.heads);
    set!(m.d_ff, a.d_ff);
    set!(m.experts, a.experts);
    set!(m.k, a.k);
    if a.dense {
        m.moe_every = 0;
        m.dense_d_ff = m.k * m.d_ff;
    }
}

fn resolve_config(a: &TrainArgs) -> semoe::Result<TrainConfig> {
    let mut c = match &a.config {
        Some(path) => TrainConfig::from_file(path)?,
        None => TrainConfig::default(),
    };
    apply_flags(a, &mut c);
    c.validate()?;
    Ok(c)
}

/// Write to standard output; a closed pipe (`semoe generate | head`) ends the output quietly.
fn write_out(out: &mut impl Write, bytes: &[u8]) -> semoe::Result<bool> {
    match out.write_all(bytes).and_then(|_| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(semoe::Error::io("cannot write the sample", "stdout", e)),
    }
}

/// A sentinel error that stops generation when the reader of standard output has gone.
const READER_GONE: &str = "standard output was closed";

fn stream_sample(
    model: &semoe::model::gpt::Gpt<f32>,
    prompt: &str,
    opts: &SampleOptions,
    threads: usize,
) -> semoe::Result<()> {
    let cpu = Cpu::new(threads)?;
    let mut out = std::io::stdout().lock();
    if !write_out(&mut out, prompt.as_bytes())? {
        return Ok(());
    }
    let result = generate(model, &cpu, prompt.as_bytes(), opts, |b| {
        if write_out(&mut out, &[b])? {
            Ok(())
        } else {
            Err(semoe::Error::runtime(READER_GONE))
        }
    });
    match result {
        Ok(_) => write_out(&mut out, b"\n").map(|_| ()),
        Err(semoe::Error::Runtime(msg)) if msg == READER_GONE => Ok(()),
        Err(e) => Err(e),
    }
}

/// Stop at the next step boundary on the first SIGINT or SIGTERM; exit at once on the second.
fn install_stop_signals(stop: &Arc<AtomicUsize>) -> semoe::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let twice = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        let fail = |e: std::io::Error| semoe::Error::runtime(format!("cannot handle signal {signal}: {e}"));
        // Registered first, so it sees the flag as the previous signal left it: the second
        // signal exits with 128 + its number, the first only sets the flags below.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, Arc::clone(&twice)).map_err(fail)?;
        signal_hook::flag::register(signal, Arc::clone(&twice)).map_err(fail)?;
        signal_hook::flag::register_usize(signal, Arc::clone(stop), signal as usize).map_err(fail)?;
    }
    Ok(())
}

fn signal_name(signal: usize) -> &'static str {
    match signal as i32 {
        signal_hook::consts::SIGINT => "Ctrl-C (SIGINT)",
        signal_hook::consts::SIGTERM => "SIGTERM",
        _ => "a stop request",
    }
}

fn print_notices(trainer: &Trainer) {
    for notice in trainer.notices() {
        eprintln!("warning: {notice}");
    }
}

fn train(a: &TrainArgs) -> semoe::Result<ExitCode> {
    let mut trainer = if a.resume {
        let dir = a.run_dir.clone().unwrap_or_default();
        let file = a.config.as_deref().map(TrainConfig::from_file).transpose()?;
        let adjust = |c: &mut TrainConfig| {
            if let Some(file) = file {
                *c = file;
            }
            apply_flags(a, c);
        };
        let options = ResumeOptions {
            steps: None,
            allow_data_change: a.allow_data_change,
        };
        if a.print_config {
            let (config, _) = semoe::train::trainer::resumed_config(&dir, &options, adjust)?;
            print!("{}", config.to_toml()?);
            return Ok(ExitCode::SUCCESS);
        }
        Trainer::resume_with_options(&dir, &options, adjust)?
    } else {
        let config = resolve_config(a)?;
        if a.print_config {
            print!("{}", config.to_toml()?);
            return Ok(ExitCode::SUCCESS);
        }
        let dir = match &a.run_dir {
            Some(dir) => dir.clone(),
            None => run_dir::create_unique(Path::new("runs"), &run_dir::default_name(std::time::SystemTime::now()))?,
        };
        Trainer::new(config, &dir)?
    };
    print_notices(&trainer);
    let dir = trainer.run_dir().to_path_buf();
    let c = trainer.config().clone();
    if trainer.steps_done() >= c.train.steps {
        let summary = trainer.run(false)?;
        eprintln!(
            "{} is already finished: {} of {} steps, validation loss {:.4} at step {}; pass --steps N (more than {}) \
             with --resume to train further",
            dir.display(),
            summary.steps,
            summary.planned_steps,
            summary.val_loss,
            summary.val_step,
            summary.steps
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(addr) = &a.metrics_addr {
        trainer.serve_metrics(addr)?;
        eprintln!("metrics: http://{addr}/metrics");
    }
    let model = trainer.model()?;
    eprintln!(
        "semoe train: {} parameters ({} active per token), {} blocks ({} MoE, {} experts, top-{}), d_model {}, context {}",
        model.num_params(),
        model.active_params(),
        c.model.n_layer,
        (0..c.model.n_layer).filter(|&l| c.model.is_moe(l)).count(),
        c.model.experts,
        c.model.k,
        c.model.d_model,
        c.model.block_size
    );
    eprintln!(
        "data: {} ({} training bytes, {} validation bytes); {} steps of {} sequences in {} groups; {} threads; {}",
        trainer.corpus().source,
        trainer.corpus().train.len(),
        trainer.corpus().val.len(),
        c.train.steps,
        c.train.batch,
        c.train.groups,
        c.train.threads,
        if c.train.workers == 0 {
            "plain loop (no actors)".to_string()
        } else {
            format!(
                "actor runtime with {} worker(s), {} experts",
                c.train.workers, c.train.placement
            )
        }
    );
    eprintln!("run directory: {}", dir.display());
    install_stop_signals(&trainer.stop_flag())?;
    let summary = trainer.run(!a.quiet)?;
    let resume_hint = format!("semoe train --resume --run-dir {}", dir.display());
    match summary.stop {
        StopReason::TimeLimit => eprintln!(
            "time limit of {} s reached: ran {} of the {} planned steps (this invocation: {}); continue with: {resume_hint}",
            c.train.time_limit_s, summary.steps, summary.planned_steps, summary.steps_run
        ),
        StopReason::Requested(signal) => eprintln!(
            "stopped by {} after step {} of {}; checkpoint written; continue with: {resume_hint}",
            signal_name(signal),
            summary.steps,
            summary.planned_steps
        ),
        StopReason::Finished | StopReason::AlreadyFinished | StopReason::StopAt => {}
    }
    eprintln!(
        "done: {} of {} steps; validation loss {:.4} nats/byte at step {}; mean train loss of the last {} steps {:.4}; \
         {:.0} tokens/s, {:.1} s; checkpoint {}",
        summary.steps,
        summary.planned_steps,
        summary.val_loss,
        summary.val_step,
        summary.mean_train_loss_steps,
        summary.mean_train_loss,
        summary.tokens_per_s,
        summary.elapsed_s,
        summary.checkpoint.display()
    );
    match semoe::telemetry::write_report(&dir) {
        Ok(_) => eprintln!("report: {}", dir.join("report.md").display()),
        Err(e) => eprintln!("warning: no report: {e}"),
    }
    if let StopReason::Requested(signal) = summary.stop {
        return Ok(ExitCode::from((128 + signal).min(255) as u8));
    }
    if a.sample_tokens > 0 {
        eprintln!("sample (temperature 0.8, top-k 40):");
        let opts = SampleOptions {
            max_tokens: a.sample_tokens,
            ..SampleOptions::default()
        };
        stream_sample(trainer.model()?, &unescape(&a.sample_prompt)?, &opts, 1)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The checkpoint to read for `generate` and `eval`: `path` itself if it is a checkpoint
/// directory (which must verify), else the newest intact checkpoint of the run directory `path`,
/// with a warning for each newer one that is damaged.
fn checkpoint_to_read(path: &Path) -> semoe::Result<checkpoint::Checkpoint> {
    if path.join(checkpoint::MANIFEST_FILE).exists() {
        return checkpoint::load(path);
    }
    let resolved = checkpoint::newest_intact(path)?;
    for d in &resolved.damaged {
        eprintln!(
            "warning: checkpoint {} is damaged ({}); using an older one",
            d.dir.display(),
            d.reason
        );
    }
    resolved.checkpoint.ok_or_else(|| {
        semoe::Error::config(format!(
            "{} is neither a checkpoint nor a run directory with an intact one",
            path.display()
        ))
    })
}

fn generate_cmd(a: &GenerateArgs) -> semoe::Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        return Err(semoe::Error::config(format!(
            "--temperature must be a non-negative number (0: always the most likely byte), got {}",
            a.temperature
        )));
    }
    let prompt = unescape(&a.prompt)?;
    let ckpt = checkpoint_to_read(&a.checkpoint)?;
    let model = semoe::train::trainer::model_from(ckpt)?;
    let opts = SampleOptions {
        max_tokens: a.tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        seed: a.seed,
    };
    stream_sample(&model, &prompt, &opts, a.threads)
}

fn eval_cmd(a: &EvalArgs) -> semoe::Result<()> {
    let ckpt = checkpoint_to_read(&a.checkpoint)?;
    let step = ckpt.step;
    let dir = ckpt.dir.clone();
    let config = semoe::train::trainer::checkpoint_config(&ckpt)?;
    let model = semoe::train::trainer::model_from(ckpt)?;
    let t = config.model.block_size;
    let (text, source, windows) = match &a.data {
        Some(path) => {
            let text = semoe::train::data::read_text(path)?;
            let fit = (text.len().saturating_sub(1) / t).clamp(1, 4096);
            (text, path.display().to_string(), a.windows.unwrap_or(fit))
        }
        None => {
            let corpus = semoe::train::trainer::corpus_for(&config)?;
            (
                corpus.val,
                format!("the validation split of {}", corpus.source),
                a.windows.unwrap_or(config.train.eval_windows),
            )
        }
    };
    let cpu = Cpu::new(a.threads)?;
    let seqs = (config.train.batch / config.train.groups).max(1);
    let loss = semoe::train::trainer::text_loss(&model, &cpu, &text, windows, seqs)?;
    println!(
        "{loss:.4} nats/byte ({:.4} bits/byte) on {source} ({} bytes, {windows} windows of {t}); checkpoint {} (step {step})",
        loss / std::f64::consts::LN_2,
        text.len(),
        dir.display()
    );
    Ok(())
}

fn runs_cmd(a: &RunsArgs) -> semoe::Result<()> {
    let runs = semoe::telemetry::runs::list(&a.dir)?;
    if runs.is_empty() {
        println!("no runs under {}", a.dir.display());
        return Ok(());
    }
    println!("{:<32} {:>13} {:>9} {:>10}  status", "run", "steps", "val loss", "time");
    for r in runs {
        let val = r.val_loss.map_or("-".to_string(), |(_, v)| format!("{v:.4}"));
        let time = r
            .training_seconds
            .map_or("-".to_string(), semoe::train::trainer::format_duration);
        println!(
            "{:<32} {:>13} {:>9} {:>10}  {}",
            r.name,
            format!("{}/{}", r.checkpoint_step.unwrap_or(0), r.planned_steps),
            val,
            time,
            r.status
        );
    }
    Ok(())
}

fn run(cli: Cli) -> semoe::Result<ExitCode> {
    match cli.command {
        Command::Train(a) => return train(&a),
        Command::Generate(a) => generate_cmd(&a)?,
        Command::Eval(a) => eval_cmd(&a)?,
        Command::Runs(a) => runs_cmd(&a)?,
        Command::Bench(BenchCommand::MoeLayer(a)) => {
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
            let cpu = Cpu::new(a.common.threads)?;
            let peak = bench::fma_peak_gflops(cpu.threads());
            let r = bench::moe_layer_bench(&cpu, &config, a.tokens, a.common.warmup, a.common.iters, peak)?;
            if a.common.json {
                print_json(&r)?;
            } else {
                println!(
                    "MoE layer: S={} d_model={} d_ff={} E={} k={} capacity_factor={} ({} of {} assignments kept), f32, {} threads",
                    r.tokens, a.d_model, a.d_ff, a.experts, a.k, a.capacity_factor, r.kept, r.tokens * a.k, r.threads
                );
                println!(
                    "  forward          {:>9.1} tokens/s  {:>7.1} ms  {:>6.1} GFLOP/s ({:.0}% of peak)",
                    r.forward_tokens_per_s,
                    r.forward_seconds * 1e3,
                    r.forward_gflops,
                    100.0 * r.forward_gflops / r.peak_gflops
                );
                println!(
                    "  forward+backward {:>9.1} tokens/s  {:>7.1} ms  {:>6.1} GFLOP/s ({:.0}% of peak)",
                    r.train_tokens_per_s,
                    r.train_seconds * 1e3,
                    r.train_gflops,
                    100.0 * r.train_gflops / r.peak_gflops
                );
                println!(
                    "  expert matmuls alone {:.1} GFLOP/s ({:.0}% of peak); FMA peak of {} threads {:.1} GFLOP/s",
                    r.expert_matmul_gflops,
                    100.0 * r.expert_matmul_gflops / r.peak_gflops,
                    r.threads,
                    r.peak_gflops
                );
            }
        }
        Command::Bench(BenchCommand::Runtime(a)) => {
            let mut config = semoe::train::TrainConfig::default();
            config.train.threads = a.threads;
            config.validate()?;
            let r = bench::runtime_bench(&config, &a.workers, a.warmup, a.steps, a.rounds)?;
            if a.json {
                print_json(&r)?;
            } else {
                let base = r.tokens_per_s.first().copied().unwrap_or(f64::NAN);
                for (w, tps) in r.workers.iter().zip(&r.tokens_per_s) {
                    let name = if *w == 0 {
                        "plain loop".to_string()
                    } else {
                        format!("runtime, {w} worker(s)")
                    };
                    println!(
                        "{name:>22}: {tps:>8.0} tokens/s ({:.1}% of the first)",
                        100.0 * tps / base
                    );
                }
            }
        }
        Command::Bench(BenchCommand::Storage(a)) => storage_bench(&a)?,
        Command::Bench(BenchCommand::Matmul(a)) => {
            let cpu = Cpu::new(a.common.threads)?;
            let peak = bench::fma_peak_gflops(cpu.threads());
            let r = bench::matmul_bench(&cpu, a.size, a.common.warmup, a.common.iters)?;
            if a.common.json {
                print_json(&r)?;
            } else {
                println!(
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
    Ok(ExitCode::SUCCESS)
}
