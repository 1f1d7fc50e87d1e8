//! How long a lost worker process costs: SIGKILL one of the run's worker processes between steps
//! and time until the next step is committed (QUIC's idle timeout detects the loss, the survivors
//! form a new epoch from the coordinator's in-memory copy and replay the steps since).

use super::median;
use crate::config::TrainConfig;
use crate::elastic::cluster::Cluster;
use crate::elastic::runtime::{ElasticOptions, ElasticRuntime};
use crate::error::{Error, Result};
use crate::model::gpt::Gpt;
use crate::train::engine::spawn_worker;
use serde::Serialize;
use std::process::Child;
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
    /// Seconds from the SIGKILL to the next committed step, per round.
    pub seconds: Vec<f64>,
    /// Their median.
    pub median_seconds: f64,
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
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::runtime(format!("cannot start the async runtime: {e}")))?;
    let dir = std::env::temp_dir().join(format!("semoe-bench-recovery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("cannot create", &dir, e))?;
    let corpus = crate::data::corpus::Corpus::bundled()?;
    let (mut seconds, mut replayed, mut steps) = (Vec::new(), Vec::new(), Vec::new());
    let threads = (config.train.threads / processes).max(1);
    for round in 0..rounds.max(1) {
        let ticket = dir.join(format!("round-{round}.ticket"));
        let mut children = Workers(Vec::new());
        let result = tokio.block_on(async {
            let cluster = Cluster::start(
                "127.0.0.1:0".parse().map_err(|e| Error::config(format!("{e}")))?,
                &ticket,
                config,
                &corpus.digest(),
            )?;
            for _ in 0..processes {
                children.0.push(spawn_worker(&ticket, threads, true)?);
            }
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
            let victim = children.0.last_mut().ok_or_else(|| Error::runtime("no worker"))?;
            let _ = victim.kill();
            let killed = Instant::now();
            rt.step().await?;
            let took = killed.elapsed().as_secs_f64();
            let replays = rt.stats().replayed_steps;
            rt.shutdown("the bench is over").await?;
            Ok::<_, Error>((took, replays))
        });
        drop(children);
        let (took, replays) = result?;
        seconds.push(took);
        replayed.push(replays);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(RecoveryReport {
        processes,
        snapshot_every: config.train.snapshot_every,
        kill_after,
        median_seconds: median(seconds.clone()),
        seconds,
        replayed,
        step_seconds: median(steps),
    })
}

/// The bench's worker processes, killed and reaped however the round ends.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.0 {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
