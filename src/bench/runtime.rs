//! Training tokens/s of the main job's model: the plain loop against the actor runtime.

use super::median;
use crate::config::ExpertExchange;
use crate::error::Result;
use serde::Serialize;
use std::time::Instant;

/// Training throughput of the main job's model, plain loop against the actor runtime.
#[derive(Clone, Debug, Serialize)]
pub struct RuntimeReport {
    /// Worker counts measured (0 = the plain loop without actors).
    pub workers: Vec<usize>,
    /// Worker-process counts measured after them (the runtime over `semoe worker` processes on
    /// this machine, exchanging data over same-host Unix sockets; each process gets
    /// `threads / processes` compute threads).
    pub processes: Vec<usize>,
    /// Worker-process counts measured after them, over QUIC on loopback (`train.same_host = false`).
    pub quic_processes: Vec<usize>,
    /// In-process worker counts measured after them, their expert rows over collectives.
    pub collective_workers: Vec<usize>,
    /// Worker-process counts measured last, their expert rows over collectives (over the data
    /// plane's same-host sockets).
    pub collective_processes: Vec<usize>,
    /// The collectives of those: `sim` (the CPU stand-in of NCCL) or `nccl`.
    pub collective: ExpertExchange,
    /// Median tokens per second of each, over the rounds.
    pub tokens_per_s: Vec<f64>,
    /// Every round's tokens per second, `[round][engine]`.
    pub rounds: Vec<Vec<f64>>,
    /// Timed steps per round and engine.
    pub steps: usize,
    /// Compute threads asked for (`train.threads`; 0: one per core).
    pub threads: usize,
    /// Compute threads each engine ran with in all: `threads` in one process; over worker
    /// processes `threads / processes` each, at least one, so a count that does not divide
    /// evenly gives more or fewer in all (a ratio between such engines is not at equal threads).
    pub engine_threads: Vec<usize>,
}

/// The engines `runtime_bench` compares, in this order.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeEngines<'a> {
    /// In-process worker counts (0 = the plain loop without actors).
    pub workers: &'a [usize],
    /// Worker-process counts, their data over same-host Unix sockets.
    pub processes: &'a [usize],
    /// Worker-process counts, their data over QUIC on loopback.
    pub quic_processes: &'a [usize],
    /// In-process worker counts, their expert rows over `collective`.
    pub collective_workers: &'a [usize],
    /// Worker-process counts, their expert rows over `collective`.
    pub collective_processes: &'a [usize],
    /// `Sim` or `Nccl`.
    pub collective: ExpertExchange,
}

/// Alternate the engines round by round (so that machine noise hits all alike): each runs `warmup`
/// untimed steps once, then `steps` timed steps per round.
pub fn runtime_bench(
    config: &crate::train::TrainConfig,
    engines: &RuntimeEngines<'_>,
    warmup: usize,
    steps: usize,
    rounds: usize,
) -> Result<RuntimeReport> {
    use crate::train::Trainer;
    // Removed with the run directories in it when the bench ends, also on an error.
    let scratch = super::Scratch::for_bench(&std::env::temp_dir(), "runtime")?;
    let base = scratch.path.clone();
    let RuntimeEngines {
        workers,
        processes,
        quic_processes,
        collective_workers,
        collective_processes,
        collective,
    } = *engines;
    let transport = ExpertExchange::Transport;
    let engines: Vec<(usize, usize, bool, ExpertExchange)> = workers
        .iter()
        .map(|&w| (w, 0, true, transport))
        .chain(processes.iter().map(|&p| (p, p, true, transport)))
        .chain(quic_processes.iter().map(|&p| (p, p, false, transport)))
        .chain(collective_workers.iter().map(|&w| (w, 0, true, collective)))
        .chain(collective_processes.iter().map(|&p| (p, p, true, collective)))
        .collect();
    let mut trainers = Vec::with_capacity(engines.len());
    for &(w, p, same_host, exchange) in &engines {
        let mut c = config.clone();
        c.train.workers = w;
        c.train.processes = p;
        c.train.same_host = same_host;
        c.train.exchange = exchange;
        c.train.steps = (warmup + steps * rounds + 1) as u64;
        let dir = base.join(match (p, same_host, exchange) {
            (0, _, ExpertExchange::Transport) => format!("workers-{w}"),
            (0, _, exchange) => format!("workers-{w}-{exchange}"),
            (_, true, ExpertExchange::Transport) => format!("processes-{p}"),
            (_, true, exchange) => format!("processes-{p}-{exchange}"),
            (_, false, _) => format!("quic-processes-{p}"),
        });
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
    drop(scratch);
    let tokens_per_s = (0..engines.len())
        .map(|i| median(all.iter().map(|r| r[i]).collect()))
        .collect();
    Ok(RuntimeReport {
        workers: workers.to_vec(),
        processes: processes.to_vec(),
        quic_processes: quic_processes.to_vec(),
        collective_workers: collective_workers.to_vec(),
        collective_processes: collective_processes.to_vec(),
        collective,
        tokens_per_s,
        rounds: all,
        steps,
        threads: config.train.threads,
        engine_threads: engines
            .iter()
            // One process (p = 0) is the same sum as one worker process.
            .map(|&(_, p, _, _)| crate::kernels::cpu::threads_each(config.train.threads, p.max(1)) * p.max(1))
            .collect(),
    })
}
