//! The `semoe` command line.

use clap::{Args, Parser, Subcommand};
use semoe::bench;
use semoe::kernels::{Cpu, Gelu};
use semoe::model::moe::{DropPolicy, MoeConfig};
use std::process::ExitCode;

/// mimalloc keeps freed pages mapped, so the large per-step activation buffers do not page-fault
/// afresh on every step.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "semoe",
    version,
    about = "Elastic Mixture-of-Experts training and inference runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure kernels and layers (tokens/s, GFLOP/s, fraction of the machine's peak).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Forward and forward+backward throughput of one MoE layer.
    MoeLayer(MoeLayerArgs),
    /// Square f32 matrix product rate and the FMA peak.
    Matmul(MatmulArgs),
}

#[derive(Args)]
struct Common {
    /// Compute threads (0 = one per core).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 10)]
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

fn parse_policy(s: &str) -> Result<DropPolicy, String> {
    match s {
        "position" => Ok(DropPolicy::Position),
        "probs" => Ok(DropPolicy::Probs),
        other => Err(format!("drop policy must be \"position\" or \"probs\", got {other:?}")),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> semoe::Result<()> {
    match cli.command {
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
                println!(
                    "{}",
                    serde_json::to_string(&r).map_err(|e| semoe::Error::parse("report", e.to_string()))?
                );
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
        Command::Bench(BenchCommand::Matmul(a)) => {
            let cpu = Cpu::new(a.common.threads)?;
            let peak = bench::fma_peak_gflops(cpu.threads());
            let r = bench::matmul_bench(&cpu, a.size, a.common.warmup, a.common.iters)?;
            if a.common.json {
                println!(
                    "{}",
                    serde_json::to_string(&r).map_err(|e| semoe::Error::parse("report", e.to_string()))?
                );
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
    Ok(())
}
