//! How long a lost worker process costs: SIGKILL one of the run's worker processes between steps
//! and time until the next step is committed (the loss is detected, the survivors form a new epoch
//! from the coordinator's in-memory copy and replay the steps since). Each round measures both
//! ways a loss is detected: QUIC's idle timeout (a worker on another machine) and the parent
//! seeing its child end (`semoe train --processes N`).

use super::median;
use crate::config::TrainConfig;
use crate::elastic::cluster::Cluster;
use crate::elastic::runtime::{ElasticOptions, ElasticRuntime};
use crate::error::{Error, Result};
use crate::model::gpt::Gpt;
use crate::train::engine::{check_local_processes, spawn_worker_with, watch_exits};
use serde::Serialize;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Kill-to-commit times of a few rounds.
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryReport {
    /// Worker processes at the start of each round (one is killed).
    pub processes: usize,
    /// Steps between in-memory copies.
    pub snapshot_every: u64,
    /// The step after which the worker is killed.
    pub kill_after: u64,
    /// Seconds from the SIGKILL to the next committed step, per round, detected by QUIC's idle
    /// timeout.
    pub seconds: Vec<f64>,
    /// Their median.
    pub median_seconds: f64,
    /// The same when the coordinator started the worker and sees its process end.
    pub parent_seconds: Vec<f64>,
    /// Their median.
    pub parent_median_seconds: f64,
    /// Steps replayed per round.
    pub replayed: Vec<u64>,
    /// Seconds of one undisturbed step (median of the steps before the kill).
    pub step_seconds: f64,
}

/// Run `rounds` rounds of: start `processes` worker processes (this program's `worker` command),
/// train `kill_after` steps of `config`, SIGKILL the last worker, time the next step.
pub fn recovery_bench(
    config: &TrainConfig,
    processes: usize,
    kill_after: u64,
    rounds: usize,
) -> Result<RecoveryReport> {
    if processes < 2 {
        return Err(Error::config(
            "the recovery bench needs at least 2 worker processes (one is killed)",
        ));
    }
    // As `semoe train --processes` (thousands of processes would each hold the model).
    check_local_processes(processes)?;
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::runtime(format!("cannot start the async runtime: {e}")))?;
    // Removed with its join tickets when the bench ends, also on an error.
    let scratch = super::Scratch::for_bench(&std::env::temp_dir(), "recovery")?;
    let dir = scratch.path.clone();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
    let corpus = crate::data::corpus::Corpus::bundled()?;
    let (mut seconds, mut parent_seconds, mut replayed, mut steps) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let threads = crate::kernels::cpu::threads_each(config.train.threads, processes);
    for (round, as_parent) in (0..rounds.max(1)).flat_map(|r| [(r, false), (r, true)]) {
        let ticket = dir.join(format!("round-{round}-{as_parent}.ticket"));
        let children = Workers(Arc::new(Mutex::new(Vec::new())));
        let result = tokio.block_on(async {
            let cluster = Cluster::start(
                "127.0.0.1:0".parse().map_err(|e| Error::config(format!("{e}")))?,
                &ticket,
                config,
                &corpus.digest(),
            )?;
            for process in 0..processes {
                let scratch = dir.join(format!("round-{round}-{as_parent}-process-{process}"));
                // Their output in a file each, quoted if the round fails (a worker that cannot
                // start would otherwise show only as a join timeout).
                let log = dir.join(format!("round-{round}-{as_parent}-process-{process}.log"));
                let file = std::fs::File::create(&log).map_err(|e| Error::io("cannot create", &log, e))?;
                let child = spawn_worker_with(&ticket, &scratch, threads, None, file.into(), &[])?;
                lock(&children.0).push(child);
            }
            let watch = as_parent.then(|| tokio::spawn(watch_exits(children.0.clone(), cluster.exit_watch())));
            let model = Gpt::init(&config.model, config.train.seed)?;
            let optimizer = crate::optimizer::for_model(&config.optimizer, &model)?;
            let options = ElasticOptions {
                snapshot_every: config.train.snapshot_every,
                min_workers: processes,
                ..ElasticOptions::default()
            };
            let mut rt = ElasticRuntime::start(cluster, config.clone(), model, optimizer, options).await?;
            for _ in 0..kill_after {
                let started = Instant::now();
                rt.step().await?;
                steps.push(started.elapsed().as_secs_f64());
            }
            let killed = {
                let mut all = lock(&children.0);
                let victim = all.last_mut().ok_or_else(|| Error::runtime("no worker"))?;
                let _ = victim.kill();
                Instant::now()
            };
            rt.step().await?;
            let took = killed.elapsed().as_secs_f64();
            let replays = rt.stats().replayed_steps;
            rt.shutdown("the bench is over").await?;
            if let Some(task) = watch {
                task.abort();
            }
            Ok::<_, Error>((took, replays))
        });
        drop(children);
        let (took, replays) = result.map_err(|e| with_worker_logs(e, &dir, round, as_parent, processes))?;
        if as_parent {
            parent_seconds.push(took);
        } else {
            seconds.push(took);
            replayed.push(replays);
        }
    }
    drop(scratch);
    Ok(RecoveryReport {
        processes,
        snapshot_every: config.train.snapshot_every,
        kill_after,
        median_seconds: median(seconds.clone()),
        seconds,
        parent_median_seconds: median(parent_seconds.clone()),
        parent_seconds,
        replayed,
        step_seconds: median(steps),
    })
}

/// `e` with the last lines each worker process of the round wrote.
fn with_worker_logs(e: Error, dir: &std::path::Path, round: usize, as_parent: bool, processes: usize) -> Error {
    let mut said = Vec::new();
    for process in 0..processes {
        let log = dir.join(format!("round-{round}-{as_parent}-process-{process}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if let Some(tail) = lines.get(lines.len().saturating_sub(3)..) {
            if !tail.is_empty() {
                said.push(format!("worker process {process}: {}", tail.join(" / ")));
            }
        }
    }
    if said.is_empty() {
        return e;
    }
    let said = said.join("; ");
    match e {
        Error::Runtime(detail) => Error::Runtime(format!("{detail}; the worker processes said: {said}")),
        other => Error::runtime(format!("{other}; the worker processes said: {said}")),
    }
}

/// The bench's worker processes, killed and reaped however the round ends.
struct Workers(Arc<Mutex<Vec<Child>>>);

impl Drop for Workers {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in lock(&self.0).iter_mut() {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
