//! Fit a run into a time budget: measure a few steps and one evaluation of the actual config on
//! this machine, then choose how many steps fit.
//!
//! The number of steps fixes the learning-rate schedule, so it is chosen once, before the run
//! starts, and recorded in the run's `config.toml` as `train.steps`: a resumed run reads it back
//! and stays bitwise identical, whatever machine it resumes on. Two machines of different speed
//! choose different step counts (and so train different models) from the same budget; `--steps`
//! fixes the count instead.

use super::trainer::Trainer;
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Steps run before the timed ones (first-touch page faults, thread start-up, caches).
const WARMUP_STEPS: u64 = 3;
/// Steps timed.
const TIMED_STEPS: u64 = 12;
/// Share of the budget planned for steps, evaluations and checkpoints; the rest is margin for
/// what the measurement cannot see (slower later steps, a busier machine).
const PLANNED_SHARE: f64 = 0.93;

/// What [`calibrate`] measured and chose.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Seconds per training step (the median of the timed steps).
    pub step_seconds: f64,
    /// Seconds per evaluation of the validation windows.
    pub eval_seconds: f64,
    /// Seconds per checkpoint.
    pub checkpoint_seconds: f64,
    /// The steps chosen: as many as fit in the budget, at most the config's `train.steps`, at
    /// least 1.
    pub steps: u64,
    /// The planned seconds of those steps with their evaluations and checkpoints.
    pub planned_seconds: f64,
}

/// Measure `config` on this machine (in a scratch run directory inside `run_dir`, removed
/// afterwards) and choose the steps that fit in `budget_s` seconds of training, evaluation and
/// checkpoints.
///
/// The scratch run goes inside the run directory: the measured checkpoint is written to the run's
/// own disk, at its speed, and never fills a small `/tmp` (or memory, where `/tmp` is one) with a
/// model the size of the run's. A run directory this call creates is removed again when the
/// measurement fails, or stops: a non-zero `stop` (a signal's number, as for
/// [`Trainer::stop_flag`]) ends it before its next step with an error, its scratch removed.
pub fn calibrate(
    config: &TrainConfig,
    budget_s: f64,
    run_dir: &std::path::Path,
    stop: &AtomicUsize,
) -> Result<Calibration> {
    let mut c = config.clone();
    c.train.steps = c.train.steps.max(WARMUP_STEPS + TIMED_STEPS + 1);
    c.train.time_limit_s = 0.0;
    if c.train.elastic() {
        // Measured in-process with as many workers: a scratch run must not start worker processes
        // or take joiners from the real run's address.
        let t = &mut c.train;
        t.workers = t.processes.max(t.min_workers).clamp(1, t.groups.max(1));
        t.listen.clear();
        t.processes = 0;
    }
    let made = !run_dir.exists();
    std::fs::create_dir_all(run_dir).map_err(|e| crate::Error::io("cannot create the run directory", run_dir, e))?;
    let scratch = run_dir.join(format!(
        "{}{}-{}",
        crate::storage::run_dir::CALIBRATION_PREFIX,
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let measured = measure(c, &scratch, stop);
    let _ = std::fs::remove_dir_all(&scratch);
    if measured.is_err() && stop.load(Ordering::SeqCst) == 0 {
        crate::say!(
            "the time budget's measurement (a scratch run in {}) failed:",
            scratch.display()
        );
    }
    if measured.is_err() && made {
        let _ = std::fs::remove_dir(run_dir);
    }
    let (step_seconds, eval_seconds, checkpoint_seconds) = measured?;

    let t = &config.train;
    let per_step = step_seconds
        + if t.eval_every > 0 {
            eval_seconds / t.eval_every as f64
        } else {
            0.0
        }
        + if t.checkpoint_every > 0 {
            checkpoint_seconds / t.checkpoint_every as f64
        } else {
            0.0
        };
    // The final evaluation and checkpoint happen whatever the cadence.
    let fixed = eval_seconds + checkpoint_seconds;
    let room = (budget_s * PLANNED_SHARE - fixed).max(0.0);
    let fit = (room / per_step.max(1e-9)).floor() as u64;
    let steps = fit.clamp(1, t.steps);
    Ok(Calibration {
        step_seconds,
        eval_seconds,
        checkpoint_seconds,
        steps,
        planned_seconds: fixed + steps as f64 * per_step,
    })
}

/// Seconds of one step (median), one evaluation and one checkpoint of `config`.
fn measure(config: TrainConfig, scratch: &std::path::Path, stop: &AtomicUsize) -> Result<(f64, f64, f64)> {
    let stopped = || match stop.load(Ordering::SeqCst) {
        0 => Ok(()),
        signal => Err(Error::runtime(format!(
            "the time budget's measurement was stopped (signal {signal}) before training began"
        ))),
    };
    let mut trainer = Trainer::new(config, scratch)?;
    for _ in 0..WARMUP_STEPS {
        stopped()?;
        trainer.step()?;
    }
    let mut times = Vec::new();
    for _ in 0..TIMED_STEPS {
        stopped()?;
        let started = Instant::now();
        trainer.step()?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let step = times[times.len() / 2];
    stopped()?;
    let started = Instant::now();
    trainer.evaluate()?;
    let eval = started.elapsed().as_secs_f64();
    let started = Instant::now();
    trainer.save_checkpoint(0.0)?;
    let checkpoint = started.elapsed().as_secs_f64();
    Ok((step, eval, checkpoint))
}
