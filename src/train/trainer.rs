//! The training loop: sample a batch, run its groups side by side (each on one compute thread, into
//! its own gradient buffers), sum the group gradients in group order (so the result does not depend
//! on which thread ran which group), clip, take an AdamW step, log, evaluate, checkpoint.
//!
//! A run directory holds `config.toml`, `metrics.jsonl` (one JSON object per line), `checkpoints/`
//! and, at the end, the report (`report.md` and SVG plots). `Trainer::resume` continues from the
//! newest checkpoint and ends bitwise identical to an uninterrupted run: the sampler is a pure
//! function of (seed, step, group), and the checkpoint holds the parameters and both Adam moments.

use super::engine::RuntimeEngine;
use crate::config::{ComputeDevice, TrainConfig};
use crate::data::corpus::Corpus;
use crate::data::sampler;
use crate::error::{Error, Result};
use crate::kernels::cuda::{CudaDevice, Gpu, GpuMemory, Precision};
use crate::kernels::{Backend, Cpu};
use crate::model::cuda::CudaGpt;
use crate::model::gpt::{Gpt, GroupOutput};
use crate::optimizer::{self, AdamW};
use crate::storage::checkpoint::{self, Checkpoint};
use crate::storage::run_dir::{self, RunDirLock};
use crate::storage::state;
use crate::train::log::{self, CheckpointRecord, MetricsLog, Record, TrainRecord, ValRecord};
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Steps the final "mean train loss" averages over: the mean of the last this many steps' losses,
/// the same number for bitwise-identical runs however they were interrupted and resumed.
pub const MEAN_LOSS_STEPS: usize = 100;

/// Seconds between progress lines when standard error is not a terminal (CI, nohup, a log file).
const PLAIN_PROGRESS_EVERY_S: f64 = 10.0;

/// What one optimizer step reports.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The step just taken (1-based: the number of steps done).
    pub step: u64,
    /// Mean cross-entropy of the batch (nats per byte).
    pub ce_loss: f64,
    /// Router losses summed over MoE blocks (each the mean over groups).
    pub aux_loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens routed to each expert, per MoE block (summed over groups).
    pub expert_tokens: Vec<Vec<usize>>,
    /// Dropped assignments per MoE block.
    pub dropped: Vec<usize>,
    /// Seconds the step took.
    pub seconds: f64,
}

/// Why [`Trainer::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Every planned step ran.
    Finished,
    /// Every planned step had already run before this invocation: nothing was done or logged.
    AlreadyFinished,
    /// `train.time_limit_s` was reached.
    TimeLimit,
    /// The step set by [`Trainer::stop_at`] was reached.
    StopAt,
    /// A stop was requested through [`Trainer::stop_flag`] (the CLI sets it on SIGINT/SIGTERM);
    /// the value is what was stored in the flag (the CLI stores the signal number).
    Requested(usize),
    /// Every worker process left or was lost, and none joined within `train.join_wait_s`
    /// ([`Error::NoWorkers`]): the run stopped at the state the coordinator kept.
    NoWorkers,
}

/// The result of [`Trainer::run`].
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Steps done in total.
    pub steps: u64,
    /// Steps planned (`train.steps`).
    pub planned_steps: u64,
    /// Steps run by this invocation.
    pub steps_run: u64,
    /// The last validation loss (NaN if none was measured).
    pub val_loss: f64,
    /// The step of that validation loss.
    pub val_step: u64,
    /// The mean training loss (cross-entropy plus router losses) of the last
    /// [`MEAN_LOSS_STEPS`] steps of the run (fewer if the run has fewer); NaN if no step ran.
    pub mean_train_loss: f64,
    /// How many steps that mean is over.
    pub mean_train_loss_steps: usize,
    /// Training tokens per second (excluding evaluation and checkpoints).
    pub tokens_per_s: f64,
    /// Wall-clock seconds of this invocation.
    pub elapsed_s: f64,
    /// The last checkpoint written (empty if none was written by this invocation).
    pub checkpoint: PathBuf,
    /// Why the run returned.
    pub stop: StopReason,
}

/// A training run.
pub struct Trainer {
    config: TrainConfig,
    corpus: Corpus,
    model: Gpt<f32>,
    optimizer: AdamW,
    cpu: Cpu,
    run_dir: PathBuf,
    group_grads: Vec<Gpt<f32>>,
    engine: Option<RuntimeEngine>,
    /// Training seconds before this invocation (from the checkpoint), for the time axis of the log.
    prior_seconds: f64,
    /// SHA-256 of the corpus, recorded in every checkpoint.
    data_digest: String,
    /// Non-zero: stop at the next step boundary (see [`Trainer::stop_flag`]).
    stop: Arc<AtomicUsize>,
    /// Stop (as if interrupted) once this many steps are done (see [`Trainer::stop_at`]).
    stop_at: Option<u64>,
    /// Membership epochs already written to the metrics log.
    membership_logged: usize,
    /// Losses of the last [`MEAN_LOSS_STEPS`] steps (from the log on resume).
    recent_losses: VecDeque<f64>,
    /// The last validation loss of the log (on resume) and its step.
    last_val: Option<(u64, f64)>,
    /// The checkpoint a resumed run started from (a run stopped before its first step has
    /// nothing to save again).
    resumed_from: Option<PathBuf>,
    /// What a user should know about how this run was set up (fallbacks, changed settings).
    notices: Vec<String>,
    /// The model and optimizer on a GPU (`train.device = "cuda"`), and whether `model` and
    /// `optimizer` are behind it (synchronised before evaluations and checkpoints).
    gpu: Option<CudaGpt>,
    gpu_stale: bool,
    /// The exclusive lock on the run directory, held while this trainer lives.
    lock: RunDirLock,
}

/// How [`Trainer::resume_with_options`] treats its inputs.
#[derive(Clone, Debug, Default)]
pub struct ResumeOptions {
    /// Replace `train.steps` (the schedule then spans the new count from the resumed step on).
    pub steps: Option<u64>,
    /// Resume even if the training text differs from the one the checkpoint was trained on.
    pub allow_data_change: bool,
}

/// The configuration `--resume` continues the run in `run_dir` with: its recorded `config.toml`,
/// changed by `adjust` and `options.steps`, validated, with only the settings in
/// [`crate::config::RESUMABLE`] changed (any other change is an error naming each field). Also
/// returns a line for each change, for the user.
pub fn resumed_config(
    run_dir: &Path,
    options: &ResumeOptions,
    adjust: impl FnOnce(&mut TrainConfig),
) -> Result<(TrainConfig, Vec<String>)> {
    let recorded = TrainConfig::from_file(&run_dir.join("config.toml"))?;
    resumed_config_from(recorded, options, adjust)
}

/// [`resumed_config`] of the run whose recorded config is `recorded`.
pub fn resumed_config_from(
    recorded: TrainConfig,
    options: &ResumeOptions,
    adjust: impl FnOnce(&mut TrainConfig),
) -> Result<(TrainConfig, Vec<String>)> {
    let mut config = recorded.clone();
    adjust(&mut config);
    if let Some(steps) = options.steps {
        config.train.steps = steps;
    }
    if let Some(path) = &config.train.data {
        if Some(path) != recorded.train.data.as_ref() {
            config.train.data = Some(data_path_to_record(path)?);
        } else {
            refuse_a_recorded_pipe(&config)?;
        }
    }
    let (changed, refused) = crate::config::resume_differences(&recorded, &config)?;
    if !refused.is_empty() {
        return Err(Error::config(format!(
            "--resume cannot change {}: these settings change the training arithmetic, so the run would no longer \
             be the one its checkpoints belong to; start a new run (another --run-dir) instead",
            refused.join(", ")
        )));
    }
    // A run recorded before tier settings without a Device budget were refused: they did nothing
    // then, and are dropped now (said) rather than refusing the resume. Given on this resume, they
    // are refused by `validate` as on a fresh start.
    let mut inert = Vec::new();
    if config.storage.device_budget.is_empty() && config.train.device != crate::config::ComputeDevice::Cuda {
        let default = crate::config::StorageSettings::default();
        let s = &mut config.storage;
        let r = &recorded.storage;
        if !s.host_budget.is_empty() && s.host_budget == r.host_budget {
            s.host_budget = default.host_budget.clone();
            inert.push("storage.host_budget");
        }
        if s.cache_policy != default.cache_policy && s.cache_policy == r.cache_policy {
            s.cache_policy = default.cache_policy.clone();
            inert.push("storage.cache_policy");
        }
        if s.prefetch != default.prefetch && s.prefetch == r.prefetch {
            s.prefetch = default.prefetch;
            inert.push("storage.prefetch");
        }
        if s.io_threads != default.io_threads && s.io_threads == r.io_threads {
            s.io_threads = default.io_threads;
            inert.push("storage.io_threads");
        }
        if s.drop_page_cache != default.drop_page_cache && s.drop_page_cache == r.drop_page_cache {
            s.drop_page_cache = default.drop_page_cache;
            inert.push("storage.drop_page_cache");
        }
    }
    config.validate()?;
    super::memory::check_fits(&config, super::memory::available_bytes())?;
    let mut notices: Vec<String> = changed.iter().map(|c| format!("resume changes {c}")).collect();
    if !inert.is_empty() {
        notices.push(format!(
            "{} of the run's config did nothing without storage.device_budget (every expert stays in Device \
             memory): dropped",
            inert.join(", ")
        ));
    }
    if config.train.steps != recorded.train.steps {
        notices.push(format!(
            "the learning-rate schedule now spans {} steps instead of {}",
            config.train.steps, recorded.train.steps
        ));
    }
    Ok((config, notices))
}

/// The state a [`Trainer`] starts from: fresh, or loaded from a checkpoint and the metrics log.
struct State {
    model: Gpt<f32>,
    optimizer: AdamW,
    prior_seconds: f64,
    recent_losses: VecDeque<f64>,
    last_val: Option<(u64, f64)>,
    /// The checkpoint it was loaded from (on resume).
    resumed_from: Option<PathBuf>,
    /// SHA-256 of the corpus (computed once: the resume check and every checkpoint use it).
    data_digest: String,
}

/// How often a run checks that its run directory is still there ([`RunDirLock::still_in_place`]):
/// its metrics log goes on writing through an open handle into a removed directory otherwise.
const PLACE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Remove the Disk tier's slot files under `run_dir` (scratch state: the checkpoints hold the run).
fn remove_tier_files(run_dir: &Path) {
    run_dir::remove_tier_scratch(run_dir);
}

impl Drop for Trainer {
    fn drop(&mut self) {
        // Stop the runtime (and its I/O threads) first, then remove the slot files it wrote: a run
        // leaves its checkpoints, log and report, not tens of megabytes of scratch.
        drop(self.engine.take());
        remove_tier_files(&self.run_dir);
    }
}

/// Whether `path` is a pipe: a named one, or one the shell passes as `/dev/fd/N` (`<(command)`),
/// which another process cannot open at all.
pub fn is_pipe(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let in_fd_table = path.starts_with("/dev/fd") || path.starts_with("/proc/self/fd");
    in_fd_table || std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// The training data's path as a run records it: absolute and resolved, so that the run resumes
/// (and its checkpoints evaluate) from any working directory; a pipe's as given (resolving
/// `/dev/fd/N` fails: it names a pipe, not a file).
fn data_path_to_record(path: &Path) -> Result<std::path::PathBuf> {
    let cannot = |e| Error::io("cannot read the training data", path, e);
    if is_pipe(path) {
        return std::path::absolute(path).map_err(cannot);
    }
    std::fs::canonicalize(path).map_err(cannot)
}

/// A run's text recorded from a pipe (`config`'s `train.data`) cannot be read again (a named pipe
/// would block for ever waiting for a writer): refused, asking for the text as a file.
pub fn refuse_a_recorded_pipe(config: &TrainConfig) -> Result<()> {
    let Some(path) = &config.train.data else {
        return Ok(());
    };
    if is_pipe(path) {
        return Err(Error::config(format!(
            "the run's training text was read from the pipe {}, which cannot be read again: give --data FILE \
             holding the same text (its SHA-256 is checked against the checkpoint's)",
            path.display()
        )));
    }
    Ok(())
}

/// The corpus a config trains on: its `train.data`, or the bundled one.
pub fn corpus_for(config: &TrainConfig) -> Result<Corpus> {
    let corpus = match &config.train.data {
        Some(path) => Corpus::from_path(path, config.train.val_fraction, config.model.block_size + 1)?,
        None => Corpus::bundled()?,
    };
    let source = format!("the text {}", corpus.source);
    crate::data::corpus::check_vocab(
        config,
        [corpus.train.as_slice(), corpus.val.as_slice()],
        &source,
        config.train.data.as_deref(),
    )?;
    Ok(corpus)
}

impl Trainer {
    /// Start a fresh run in `run_dir` (created; an existing run there is an error, to never overwrite
    /// a previous run's checkpoints). The run directory is locked for as long as the trainer lives;
    /// a start that fails leaves no directory behind when it created it (one that was there
    /// before, empty or another process's, is left as it is).
    pub fn new(config: TrainConfig, run_dir: &Path) -> Result<Self> {
        let mut created = false;
        let started = Trainer::create(config, run_dir, &mut created);
        if started.is_err() && created {
            run_dir::remove_failed_start(run_dir);
        }
        started
    }

    /// [`Trainer::new`]; `created` is set once this call has made the run directory itself.
    fn create(mut config: TrainConfig, run_dir: &Path, created: &mut bool) -> Result<Self> {
        config.validate()?;
        super::memory::check_fits(&config, super::memory::available_bytes())?;
        // Record the data path absolutely, so the run resumes (and its checkpoints evaluate) from
        // any working directory.
        if let Some(path) = &config.train.data {
            config.train.data = Some(data_path_to_record(path)?);
        }
        // A directory in use says so first (its lock is only taken where semoe already put one).
        let lock = match run_dir.join(run_dir::LOCK_FILE).exists() {
            true => Some(RunDirLock::acquire(run_dir)?),
            false => None,
        };
        run_dir::check_fresh(run_dir)?;
        *created = run_dir::create_dir(run_dir)?;
        // Its entry durable, as the checkpoints saved in it are (best effort: a parent that
        // cannot be opened, or a filesystem that refuses a directory's fsync, still runs).
        if let Some(parent) = crate::storage::checkpoint::parent_dir(run_dir) {
            let _ = crate::storage::checkpoint::sync_dir(parent);
        }
        let lock = match lock {
            Some(lock) => lock,
            None => RunDirLock::acquire(run_dir)?,
        };
        Trainer::start_fresh(config, run_dir, lock)
    }

    fn start_fresh(config: TrainConfig, run_dir: &Path, lock: RunDirLock) -> Result<Self> {
        run_dir::remove_stale_leftovers(run_dir);
        let corpus = corpus_for(&config)?;
        let model = Gpt::init(&config.model, config.train.seed)?;
        let optimizer = new_optimizer(&config, &model)?;
        let config_path = run_dir.join("config.toml");
        checkpoint::write_file_durably(&config_path, config.to_toml()?.as_bytes())?;
        let metrics = run_dir.join(log::METRICS_FILE);
        std::fs::write(&metrics, "").map_err(|e| Error::io("cannot create", &metrics, e))?;
        let state = State {
            model,
            optimizer,
            prior_seconds: 0.0,
            recent_losses: VecDeque::new(),
            last_val: None,
            resumed_from: None,
            data_digest: corpus.digest(),
        };
        let mut notices = Vec::new();
        let o = &config.optimizer;
        if config.train.steps < o.warmup {
            notices.push(format!(
                "the run's {} steps end inside optimizer.warmup ({} steps): the learning rate rises to {:.3e} and \
                 never reaches optimizer.lr ({}) nor decays",
                config.train.steps,
                o.warmup,
                o.lr_at(config.train.steps.saturating_sub(1), config.train.steps),
                o.lr
            ));
        }
        Trainer::assemble(config, corpus, state, run_dir, lock, notices)
    }

    /// Continue the run in `run_dir` from its newest checkpoint, with the run's own `config.toml`.
    /// Metrics logged after that checkpoint (by an interrupted invocation) are dropped, so the log
    /// reads as one run.
    pub fn resume(run_dir: &Path, override_steps: Option<u64>) -> Result<Self> {
        Trainer::resume_with(run_dir, override_steps, |_| {})
    }

    /// [`Trainer::resume`], with the run's configuration adjusted first by `adjust` (for settings
    /// that do not change the result, such as the storage budgets: a checkpoint loads into any).
    pub fn resume_with(
        run_dir: &Path,
        override_steps: Option<u64>,
        adjust: impl FnOnce(&mut TrainConfig),
    ) -> Result<Self> {
        let options = ResumeOptions {
            steps: override_steps,
            ..ResumeOptions::default()
        };
        Trainer::resume_with_options(run_dir, &options, adjust)
    }

    /// Continue the run in `run_dir`, checking what may change:
    ///
    /// - `adjust` may change only the settings in [`crate::config::RESUMABLE`] (threads, workers,
    ///   placement, budgets, time limit, evaluation and checkpoint cadence, steps); any other
    ///   difference is refused with an error naming each field;
    /// - the training text must hash to the digest the checkpoint recorded (unless
    ///   `allow_data_change`);
    /// - a damaged newest checkpoint is never used: the newest intact one is, the damaged ones are
    ///   moved aside to `checkpoints/damaged-step-*` (so the resumed run does not overwrite them),
    ///   and [`Trainer::notices`] says so.
    pub fn resume_with_options(
        run_dir: &Path,
        options: &ResumeOptions,
        adjust: impl FnOnce(&mut TrainConfig),
    ) -> Result<Self> {
        let config_path = run_dir.join("config.toml");
        let mut rebuilt = None;
        if !config_path.is_file() {
            if checkpoint::step_dirs(run_dir)?.is_empty() {
                return Err(Error::config(format!(
                    "{} is not a run directory (it has no config.toml); start a run there without --resume",
                    run_dir.display()
                )));
            }
            rebuilt = Some(rebuild_config(run_dir)?);
        }
        let lock = RunDirLock::acquire(run_dir)?;
        run_dir::remove_stale_leftovers(run_dir);
        checkpoint::restore_replaced(run_dir)?;
        let (config, mut notices) = resumed_config(run_dir, options, adjust)?;
        notices.extend(rebuilt);
        // resumed_config reports every field that differs from the recorded config.
        let config_changed = !notices.is_empty();

        let resolved = checkpoint::newest_intact(run_dir)?;
        let Some(ckpt) = resolved.checkpoint else {
            // Set aside (not removed: kept for inspection), so that the directory can be used
            // again: a fresh start refuses a run with checkpoints it cannot read.
            let mut msg = format!("{} has no intact checkpoint to resume from", run_dir.display());
            for d in &resolved.damaged {
                let aside = checkpoint::set_aside(&d.dir)?;
                msg.push_str(&format!(
                    "; {} is damaged ({}), moved to {}",
                    d.dir.display(),
                    d.reason,
                    aside.display()
                ));
            }
            if !resolved.damaged.is_empty() {
                msg.push_str(
                    "; a fresh start (without --resume) may now use the directory (it replaces config.toml \
                     and metrics.jsonl), or choose another --run-dir",
                );
            }
            return Err(Error::config(msg));
        };
        // The manifest (written and synced with the checkpoint) records the config it was trained
        // with: a config.toml edited by hand, or damaged, must not change the arithmetic either.
        if ckpt.extra.get("config").is_some() {
            let trained = checkpoint_config(&ckpt)?;
            let (_, refused) = crate::config::resume_differences(&trained, &config)?;
            if !refused.is_empty() {
                return Err(Error::config(format!(
                    "{} disagrees with the config checkpoint {} was trained with on {}: resume with the \
                     checkpoint's settings (restore config.toml) or start a new run",
                    config_path.display(),
                    ckpt.dir.display(),
                    refused.join(", ")
                )));
            }
        }
        let corpus = corpus_for(&config)?;
        let digest = corpus.digest();
        match ckpt.extra.get("data_sha256").and_then(|v| v.as_str()) {
            Some(recorded) if recorded == digest => {}
            Some(recorded) if options.allow_data_change => notices.push(format!(
                "the training text differs from the checkpoint's (SHA-256 {recorded}, now {digest}); resuming on it \
                 as asked (the run is no longer reproducible from its config)"
            )),
            Some(recorded) => {
                return Err(Error::config(format!(
                    "the training text ({}) is not the text checkpoint {} was trained on (SHA-256 {recorded}, now \
                     {digest}); resume on the same text, or pass --allow-data-change to continue on this one",
                    corpus.source,
                    ckpt.dir.display()
                )))
            }
            None => notices.push(format!(
                "checkpoint {} records no digest of its training text (written by an older semoe, or by an \
                 embedded runtime given bytes rather than a corpus): the text cannot be checked",
                ckpt.dir.display()
            )),
        }
        let resumed_from = ckpt.dir.clone();
        let (model, optimizer, prior_seconds) = load_state_from(&config, ckpt)?;
        // A finished run resumed changes nothing, its config included.
        let finished = optimizer.step >= config.train.steps;
        // Falling back past checkpoints set aside, the log lines of their steps are kept in a
        // file of their own: if a checkpoint was only unreadable for a while (an I/O error), its
        // log is not lost with the lines the resumed run writes again.
        // (A name of its own: a second fall-back to the same step keeps the first one's lines.)
        let dropped_to = (!resolved.damaged.is_empty())
            .then(|| {
                (1..=1000u32)
                    .map(|n| run_dir.join(run_dir::metrics_side_file(optimizer.step, n)))
                    .find(|p| !p.exists())
            })
            .flatten();
        let history = truncate_metrics(&run_dir.join(log::METRICS_FILE), optimizer.step, dropped_to.as_deref())?;
        // Only now, with their steps' log lines kept aside, are the damaged checkpoints moved out
        // of the way: a resume that stops before (an error, a kill, a Ctrl-C while the state
        // loads) leaves them to be found again, and the next resume keeps the lines then. (Moved
        // first, the next resume saw nothing damaged and dropped the lines for good.)
        for d in &resolved.damaged {
            let aside = checkpoint::set_aside(&d.dir)?;
            notices.push(format!(
                "checkpoint {} is damaged ({}); it was moved to {} and the run resumes from {}",
                d.dir.display(),
                d.reason,
                aside.display(),
                resumed_from.display()
            ));
        }
        if let Some(side) = dropped_to.filter(|_| history.moved) {
            notices.push(format!(
                "the metrics log's lines after step {} were moved to {}",
                optimizer.step,
                side.display()
            ));
        }
        let state = State {
            model,
            optimizer,
            prior_seconds,
            recent_losses: history.recent_losses,
            last_val: history.last_val,
            resumed_from: Some(resumed_from),
            data_digest: digest,
        };
        Trainer::assemble(config.clone(), corpus, state, run_dir, lock, notices).and_then(|t| {
            // The run's config now says what it runs with (the resumable settings just applied).
            if config_changed && !finished {
                checkpoint::write_file_durably(&config_path, config.to_toml()?.as_bytes())?;
            }
            Ok(t)
        })
    }

    fn assemble(
        config: TrainConfig,
        corpus: Corpus,
        state: State,
        run_dir: &Path,
        lock: RunDirLock,
        notices: Vec<String>,
    ) -> Result<Self> {
        let State {
            model,
            optimizer,
            prior_seconds,
            recent_losses,
            last_val,
            resumed_from,
            data_digest,
        } = state;
        // The Disk tier's slot files of an earlier invocation are stale scratch: start clean.
        remove_tier_files(run_dir);
        let cpu = Cpu::new(config.train.threads)?;
        // A finished run (resumed to report it) trains no step: no GPU, runtime or worker
        // process is started for it (a run over worker processes waited for them to join).
        let finished = optimizer.step >= config.train.steps;
        let gpu = match config.train.device {
            ComputeDevice::Cuda if !finished => {
                let device = CudaDevice::open(0)?;
                let budget = config.storage.to_config(None)?.device_budget;
                let mut on_gpu = CudaGpt::new(&Gpu::budgeted(&device, Precision::F32, budget)?, &model)?;
                on_gpu.load_moments(&optimizer.m, &optimizer.v)?;
                Some(on_gpu)
            }
            ComputeDevice::Cuda | ComputeDevice::Cpu => None,
        };
        let (group_grads, engine) = if gpu.is_some() || finished {
            (Vec::new(), None)
        } else if config.train.workers == 0 && !config.train.elastic() {
            let grads = (0..config.train.groups)
                .map(|_| model.zeros_like())
                .collect::<Result<Vec<_>>>()?;
            (grads, None)
        } else {
            let engine = RuntimeEngine::start(&config, &corpus, &model, &optimizer, run_dir)?;
            (Vec::new(), Some(engine))
        };
        let stop = Arc::new(AtomicUsize::new(0));
        let mut engine = engine;
        if let Some(engine) = &mut engine {
            engine.set_stop_flag(Arc::clone(&stop));
        }
        Ok(Trainer {
            config,
            corpus,
            model,
            optimizer,
            cpu,
            run_dir: run_dir.to_path_buf(),
            group_grads,
            engine,
            prior_seconds,
            data_digest,
            stop,
            stop_at: None,
            membership_logged: 0,
            recent_losses,
            last_val,
            resumed_from,
            notices,
            gpu,
            gpu_stale: false,
            lock,
        })
    }

    /// A flag checked at every step boundary: store a non-zero value (for example a signal
    /// number) and [`Trainer::run`] stops after the step in progress, evaluates, checkpoints and
    /// returns [`StopReason::Requested`] with that value.
    pub fn stop_flag(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.stop)
    }

    /// Use `flag` as [`Trainer::stop_flag`]: one flag, set by handlers installed before the
    /// trainer existed (the CLI's, during the time budget's measurement), covers the run too.
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicUsize>) {
        if let Some(engine) = &mut self.engine {
            engine.set_stop_flag(Arc::clone(&flag));
        }
        self.stop = flag;
    }

    /// Make [`Trainer::run`] stop once `step` steps are done, as a stop request would (evaluate,
    /// checkpoint, return [`StopReason::StopAt`]): an interruption at a chosen step, for tests
    /// and for embedders that train in slices.
    pub fn stop_at(&mut self, step: u64) {
        self.stop_at = Some(step);
    }

    /// Messages about how this run was set up that its user should see: settings changed on
    /// resume, a damaged checkpoint passed over, a training text that could not be checked.
    pub fn notices(&self) -> &[String] {
        &self.notices
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Bring `model` and `optimizer` up to the runtime's committed state (a no-op for the plain loop).
    pub fn sync(&mut self) -> Result<()> {
        if let (Some(gpu), true) = (&self.gpu, self.gpu_stale) {
            self.model = gpu.to_model()?;
            let (m, v) = gpu.moments()?;
            self.optimizer = self.optimizer.with_moments(self.optimizer.step, m, v)?;
            self.gpu_stale = false;
        }
        if let Some(engine) = &mut self.engine {
            if engine.stale {
                let (model, optimizer) = engine.state()?;
                self.model = model;
                self.optimizer = optimizer;
                engine.stale = false;
            }
        }
        Ok(())
    }

    /// The model being trained, as of the last committed step.
    pub fn model(&mut self) -> Result<&Gpt<f32>> {
        self.sync()?;
        Ok(&self.model)
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Steps done.
    pub fn steps_done(&self) -> u64 {
        self.optimizer.step
    }

    /// The corpus.
    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    /// One optimizer step.
    pub fn step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let step = self.optimizer.step;
        let step_lr = self.config.optimizer.lr_at(step, self.config.train.steps);
        let diverged = |e: Error| match e {
            Error::NonFinite { context, detail } => Error::Diverged {
                step: step + 1,
                what: format!("the parameters overflowed: {context} computed a non-finite {detail}"),
                lr: step_lr,
            },
            other => other,
        };
        let (outputs, lr, grad_norm) = match &mut self.engine {
            Some(engine) => {
                let outcome = engine.step().map_err(diverged)?;
                self.optimizer.step = outcome.step;
                (outcome.outputs, outcome.lr, outcome.grad_norm)
            }
            None if self.gpu.is_some() => self.gpu_step().map_err(diverged)?,
            None => self.direct_step().map_err(diverged)?,
        };
        let c = &self.config;
        let t = c.model.block_size;
        let groups = c.train.groups;
        let ce_loss = outputs.iter().map(|o| o.ce_sum).sum::<f64>() / (c.train.batch * t) as f64;
        for (what, v) in [("the loss", ce_loss), ("the gradient norm", grad_norm)] {
            if !v.is_finite() {
                return Err(Error::Diverged {
                    step: self.optimizer.step,
                    what: format!("{what} is {v}"),
                    lr,
                });
            }
        }
        let moe_blocks = outputs[0].router_loss.len();
        let aux_loss = (0..moe_blocks)
            .map(|l| outputs.iter().map(|o| o.router_loss[l]).sum::<f64>())
            .sum::<f64>()
            / groups as f64;
        let expert_tokens = (0..moe_blocks)
            .map(|l| {
                let e = c.model.experts;
                (0..e)
                    .map(|i| outputs.iter().map(|o| o.moe_stats[l].expert_tokens[i]).sum())
                    .collect()
            })
            .collect();
        let dropped = (0..moe_blocks)
            .map(|l| outputs.iter().map(|o| o.moe_stats[l].dropped).sum())
            .collect();
        Ok(StepReport {
            step: self.optimizer.step,
            ce_loss,
            aux_loss,
            lr,
            grad_norm,
            expert_tokens,
            dropped,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// One step of the plain loop: groups side by side on the compute pool, gradients summed in
    /// group order, AdamW. Returns the group outputs, the learning rate and the gradient norm.
    fn direct_step(&mut self) -> Result<(Vec<GroupOutput>, f64, f64)> {
        let c = &self.config;
        let (t, groups) = (c.model.block_size, c.train.groups);
        let seqs = c.group_seqs();
        let step = self.optimizer.step;
        let seed = c.train.seed;
        let text = &self.corpus.train;
        let (ce_scale, router_scale) = (c.ce_scale(), c.router_scale());
        let model = &self.model;

        // Groups side by side, each into its own gradient buffers.
        let tasks: Vec<(usize, &mut Gpt<f32>)> = self.group_grads.iter_mut().enumerate().collect();
        let outputs = std::sync::Mutex::new(vec![None; groups]);
        self.cpu.par_for_each(tasks, |backend, (g, grads)| {
            grads.buffers_mut().into_iter().for_each(|b| b.fill(0.0));
            let (idx, targets) = sampler::group_batch(text, seed, step, g, seqs, t);
            let out = model.forward_backward(backend, &idx, &targets, seqs, ce_scale, router_scale, grads)?;
            if let Ok(mut o) = outputs.lock() {
                o[g] = Some(out);
            }
            Ok(())
        })?;
        let outputs: Vec<_> = outputs
            .into_inner()
            .map_err(|_| compute_failure("a group task panicked"))?
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| compute_failure("a group produced no output"))?;

        // Sum the group gradients in group order into group 0's buffers.
        let (first, rest) = self.group_grads.split_at_mut(1);
        let mut total = first[0].buffers_mut();
        for other in rest.iter_mut() {
            for (acc, g) in total.iter_mut().zip(other.buffers_mut()) {
                acc.iter_mut().zip(g.iter()).for_each(|(a, &v)| *a += v);
            }
        }
        let lr = c.optimizer.lr_at(step, c.train.steps);
        let grad_norm = model_grad_norm(&self.model, &total);
        if let Some(what) = c.optimizer.divergence(grad_norm) {
            // Refuse the update: the parameters stay those of the last finite step.
            return Err(Error::Diverged {
                step: step + 1,
                what,
                lr,
            });
        }
        let mut params = self.model.buffers_mut();
        let optimizer = &mut self.optimizer;
        self.cpu
            .install(|| optimizer.apply(&mut params, &mut total, lr, grad_norm))?;

        Ok((outputs, lr, grad_norm))
    }

    /// One step on the GPU: the groups one after another into the device's gradients, their global
    /// norm (one sum per tensor read back), AdamW on the device.
    fn gpu_step(&mut self) -> Result<(Vec<GroupOutput>, f64, f64)> {
        let c = &self.config;
        let (t, groups, seqs) = (c.model.block_size, c.train.groups, c.group_seqs());
        let step = self.optimizer.step;
        let (ce_scale, router_scale) = (c.ce_scale(), c.router_scale());
        let gpu = self
            .gpu
            .as_mut()
            .ok_or_else(|| compute_failure("the GPU model is missing"))?;
        gpu.zero_gradients()?;
        let mut outputs = Vec::with_capacity(groups);
        for g in 0..groups {
            let (idx, targets) = sampler::group_batch(&self.corpus.train, c.train.seed, step, g, seqs, t);
            outputs.push(gpu.forward_backward(&idx, &targets, seqs, ce_scale, router_scale)?);
        }
        let lr = c.optimizer.lr_at(step, c.train.steps);
        let grad_norm = gpu.gradient_norm()?;
        if let Some(what) = c.optimizer.divergence(grad_norm) {
            return Err(Error::Diverged {
                step: step + 1,
                what,
                lr,
            });
        }
        let grad_scale = self.optimizer.clip_scale(grad_norm)?;
        gpu.apply_adamw(&self.optimizer.scalars(lr), grad_scale)?;
        self.optimizer.step = step + 1;
        self.gpu_stale = true;
        Ok((outputs, lr, grad_norm))
    }

    /// The GPU memory the Device budget's pool counted (`None`: not on a GPU, or no budget).
    pub fn gpu_memory(&self) -> Result<Option<GpuMemory>> {
        match &self.gpu {
            Some(gpu) => gpu.memory(),
            None => Ok(None),
        }
    }

    /// Wait until the runtime's expert stores have no disk work in flight or queued (see
    /// `Runtime::storage_idle`; a no-op without in-process tiers).
    pub fn storage_idle(&self) -> Result<()> {
        match &self.engine {
            Some(engine) => engine.storage_idle(),
            None => Ok(()),
        }
    }

    /// Membership figures of a run over worker processes (`None` otherwise).
    pub fn membership(&self) -> Option<crate::elastic::runtime::MembershipStats> {
        self.engine.as_ref().and_then(|e| e.membership())
    }

    /// Each worker's expert-store figures (empty for the plain loop).
    pub fn tier_stats(&self) -> Vec<crate::storage::tiers::TierStats> {
        self.engine.as_ref().map(|e| e.tier_stats()).unwrap_or_default()
    }

    /// Each worker's dense-parameter figures (empty for the plain loop).
    pub fn dense_stats(&self) -> Vec<crate::actors::gather::DenseStats> {
        self.engine.as_ref().map(|e| e.dense_stats()).unwrap_or_default()
    }

    /// Mean cross-entropy (nats per byte) over the evaluation windows of the validation text.
    pub fn evaluate(&mut self) -> Result<f64> {
        self.sync()?;
        let c = &self.config;
        let seqs = (c.train.batch / c.train.groups).max(1);
        text_loss(&self.model, &self.cpu, &self.corpus.val, c.train.eval_windows, seqs)
    }

    /// The run diverged at the step just taken: `what` was not finite.
    fn diverged_now(&self, what: String) -> Error {
        let step = self.optimizer.step;
        let lr = self
            .config
            .optimizer
            .lr_at(step.saturating_sub(1), self.config.train.steps);
        Error::Diverged { step, what, lr }
    }

    /// [`Trainer::evaluate`] inside a run: a validation pass that overflows, or a loss that is not
    /// finite, is the run diverging (the last update wrecked the parameters: saying so, with the
    /// advice, and checkpointing nothing, rather than logging a NaN loss and saving them).
    fn evaluate_in_run(&mut self) -> Result<f64> {
        match self.evaluate() {
            Ok(loss) if loss.is_finite() => Ok(loss),
            Ok(loss) => Err(self.diverged_now(format!("the validation loss is {loss}"))),
            Err(Error::NonFinite { context, detail }) => Err(self.diverged_now(format!(
                "the parameters overflowed: {context} computed a non-finite {detail} in validation"
            ))),
            Err(e) => Err(e),
        }
    }

    /// Refuse to checkpoint parameters the last update made non-finite (on a step without a
    /// validation pass nothing else has looked at them): the run diverged, and a checkpoint of
    /// them would prune a good one.
    fn check_parameters_finite(&mut self) -> Result<()> {
        let bad = self.model()?.tensors().into_iter().find_map(|(name, _, values)| {
            values
                .iter()
                .position(|v| !v.is_finite())
                .map(|i| format!("the update left value {i} of {name} at {}", values[i]))
        });
        match bad {
            Some(what) => Err(self.diverged_now(what)),
            None => Ok(()),
        }
    }

    /// Write a checkpoint of the current state.
    pub fn save_checkpoint(&mut self, training_seconds: f64) -> Result<PathBuf> {
        self.lock.still_in_place()?;
        self.sync()?;
        let dir = write_checkpoint(
            &self.run_dir,
            &self.config,
            &self.model,
            &self.optimizer,
            training_seconds,
            Some(&self.data_digest),
        )?;
        // The new checkpoint is committed: failing to delete old ones (a directory made read-only
        // to keep it, say) costs disk space, not the run.
        if let Err(e) = checkpoint::prune(&self.run_dir, self.config.train.keep_checkpoints) {
            crate::say!("warning: old checkpoints were not all deleted (keep_checkpoints): {e}");
        }
        Ok(dir)
    }

    /// Run to `train.steps` (or the time limit, or a stop through [`Trainer::stop_flag`]),
    /// logging to `metrics.jsonl`, evaluating and checkpointing on the configured cadence, and
    /// evaluating and checkpointing where it stopped. With `progress`, shows a progress bar on a
    /// terminal, or prints a plain progress line every few seconds when standard error is not one.
    pub fn run(&mut self, progress: bool) -> Result<RunSummary> {
        let c = self.config.clone();
        let tokens_per_step = (c.train.batch * c.model.block_size) as f64;
        let started = Instant::now();
        if self.optimizer.step >= c.train.steps {
            // Nothing to do: say so, and append nothing to the log.
            let (val_step, val_loss) = self.last_val.unwrap_or((self.optimizer.step, f64::NAN));
            return Ok(RunSummary {
                steps: self.optimizer.step,
                planned_steps: c.train.steps,
                steps_run: 0,
                val_loss,
                val_step,
                mean_train_loss: mean(&self.recent_losses),
                mean_train_loss_steps: self.recent_losses.len(),
                tokens_per_s: 0.0,
                elapsed_s: 0.0,
                checkpoint: PathBuf::new(),
                stop: StopReason::AlreadyFinished,
            });
        }
        let mut log = MetricsLog::append(&self.run_dir.join(log::METRICS_FILE))?;
        let mut out = Progress::new(progress, c.train.steps, self.optimizer.step)?;
        let mut train_seconds = 0.0f64;
        let mut steps_run = 0u64;
        let (mut val_step, mut val_loss) = self.last_val.unwrap_or((0, f64::NAN));
        // A resumed run's checkpoint holds its first step: stopped before another step, it has
        // nothing to evaluate or save again (it used to replace the checkpoint it had just
        // verified with a copy, and log the step's evaluation twice).
        let (mut last_checkpoint, mut checkpointed_step) = match &self.resumed_from {
            Some(dir) => (dir.clone(), Some(self.optimizer.step)),
            None => (PathBuf::new(), None),
        };
        let mut stop = StopReason::Finished;
        let mut failure = None;
        let mut place_checked = Instant::now();
        let first_step = self.optimizer.step;
        let mut traffic_logged = false;
        while self.optimizer.step < c.train.steps {
            if place_checked.elapsed() >= PLACE_CHECK_EVERY {
                self.lock.still_in_place()?;
                place_checked = Instant::now();
            }
            let requested = self.stop.load(Ordering::SeqCst);
            if requested != 0 {
                stop = StopReason::Requested(requested);
                break;
            }
            if self.stop_at.is_some_and(|s| self.optimizer.step >= s) {
                stop = StopReason::StopAt;
                break;
            }
            if c.train.time_limit_s > 0.0 && started.elapsed().as_secs_f64() >= c.train.time_limit_s {
                stop = StopReason::TimeLimit;
                break;
            }
            let r = match self.step() {
                Ok(r) => r,
                Err(e @ Error::NoWorkers { .. }) => {
                    // (A stop asked while the coordinator waited for a joiner ends the wait.)
                    stop = match self.stop.load(Ordering::SeqCst) {
                        0 => {
                            crate::say!("semoe: {e}");
                            StopReason::NoWorkers
                        }
                        signal => StopReason::Requested(signal),
                    };
                    break;
                }
                // Any other failure once every worker is gone: the state the coordinator kept is
                // checkpointed (below) before the error ends the run.
                Err(e) if self.engine.as_ref().is_some_and(RuntimeEngine::without_workers) => {
                    failure = Some(e);
                    stop = StopReason::NoWorkers;
                    break;
                }
                Err(e) => return Err(e),
            };
            train_seconds += r.seconds;
            steps_run += 1;
            // The figure in nats per byte (what the validation loss is) is the cross-entropy; the
            // log keeps the auxiliary loss beside it.
            let loss = r.ce_loss;
            self.recent_losses.push_back(loss);
            if self.recent_losses.len() > MEAN_LOSS_STEPS {
                self.recent_losses.pop_front();
            }
            let elapsed = self.prior_seconds + started.elapsed().as_secs_f64();
            let tps = tokens_per_step / r.seconds;
            let mean_tps = tokens_per_step * steps_run as f64 / train_seconds.max(1e-9);
            log.write(&Record::Train(TrainRecord {
                step: r.step,
                tokens: (r.step as f64 * tokens_per_step) as u64,
                elapsed_s: elapsed,
                loss: r.ce_loss + r.aux_loss,
                ce_loss: Some(r.ce_loss),
                aux_loss: Some(r.aux_loss),
                lr: Some(r.lr),
                grad_norm: Some(r.grad_norm),
                tokens_per_s: tps,
                expert_tokens: r
                    .expert_tokens
                    .iter()
                    .map(|layer| layer.iter().map(|&n| n as u64).collect())
                    .collect(),
                dropped: r.dropped.iter().map(|&n| n as u64).collect(),
            }))?;
            self.log_membership(&mut log)?;
            let last = r.step == c.train.steps;
            if last {
                self.log_traffic(&mut log, first_step, r.step)?;
                traffic_logged = true;
            }
            if (c.train.eval_every > 0 && r.step % c.train.eval_every == 0) || last {
                val_loss = self.evaluate_in_run()?;
                val_step = r.step;
                self.log_evaluation(&mut log, r.step, elapsed, val_loss)?;
                out.line(format!(
                    "step {:>5}  train loss {:.4} (mean of the last {})  val loss {:.4}  {:.0} tokens/s",
                    r.step,
                    mean(&self.recent_losses),
                    self.recent_losses.len(),
                    val_loss,
                    mean_tps
                ));
            }
            if (c.train.checkpoint_every > 0 && r.step % c.train.checkpoint_every == 0) || last {
                self.check_parameters_finite()?;
                log.sync()?;
                last_checkpoint = self.save_checkpoint(self.prior_seconds + started.elapsed().as_secs_f64())?;
                checkpointed_step = Some(r.step);
                log.write(&Record::Checkpoint(CheckpointRecord {
                    step: r.step,
                    path: last_checkpoint.clone(),
                }))?;
            }
            out.step(r.step, loss, val_loss, tps, mean_tps);
        }
        out.finish();
        // Stopped early (time limit or a requested stop): the bytes of the steps run are recorded
        // as at the end (also where the stop came right after a periodic checkpoint).
        if steps_run > 0 && !traffic_logged {
            self.log_traffic(&mut log, first_step, self.optimizer.step)?;
        }
        // Without workers the state is the one the coordinator kept: the committed one, or an
        // older copy when they were lost (checkpointed unless a checkpoint already holds it).
        let without_workers = self.engine.as_ref().is_some_and(|e| e.without_workers());
        let already_saved = if stop == StopReason::NoWorkers || without_workers {
            self.sync()?;
            checkpointed_step.unwrap_or(first_step) >= self.optimizer.step
        } else {
            checkpointed_step == Some(self.optimizer.step)
        };
        if !already_saved {
            // Stopped early: evaluate and checkpoint where we are, so that no step is lost and
            // --resume continues from here.
            val_loss = self.evaluate_in_run()?;
            val_step = self.optimizer.step;
            let elapsed = self.prior_seconds + started.elapsed().as_secs_f64();
            self.log_evaluation(&mut log, self.optimizer.step, elapsed, val_loss)?;
            self.check_parameters_finite()?;
            log.sync()?;
            last_checkpoint = self.save_checkpoint(elapsed)?;
            log.write(&Record::Checkpoint(CheckpointRecord {
                step: self.optimizer.step,
                path: last_checkpoint.clone(),
            }))?;
        }
        // The run's last lines (its final checkpoint record) are durable once it returns.
        log.sync()?;
        if let Some(e) = failure {
            if !last_checkpoint.as_os_str().is_empty() {
                crate::say!(
                    "semoe: the run failed without workers (the coordinator kept the state of step {}); the newest \
                     checkpoint is {}",
                    self.optimizer.step,
                    last_checkpoint.display()
                );
            }
            return Err(e);
        }
        Ok(RunSummary {
            steps: self.optimizer.step,
            planned_steps: c.train.steps,
            steps_run,
            val_loss,
            val_step,
            mean_train_loss: mean(&self.recent_losses),
            mean_train_loss_steps: self.recent_losses.len(),
            tokens_per_s: if train_seconds > 0.0 {
                tokens_per_step * steps_run as f64 / train_seconds
            } else {
                0.0
            },
            elapsed_s: started.elapsed().as_secs_f64(),
            checkpoint: last_checkpoint,
            stop,
        })
    }

    /// Log the bytes the workers sent each other over the run (the actor runtime only).
    fn log_traffic(&mut self, log: &mut MetricsLog, since: u64, step: u64) -> Result<()> {
        let members = self.membership().is_some();
        let Some(engine) = self.engine.as_mut() else {
            return Ok(());
        };
        let entries = engine.traffic();
        if entries.is_empty() {
            return Ok(());
        }
        log.write(&Record::Traffic(log::TrafficRecord {
            step,
            since,
            members,
            entries,
        }))
    }

    /// Log the membership epochs formed since the last call (a run over worker processes).
    fn log_membership(&mut self, log: &mut MetricsLog) -> Result<()> {
        let Some(engine) = &self.engine else { return Ok(()) };
        let new = engine.epochs_since(self.membership_logged);
        for e in &new {
            log.write(&Record::Membership(log::MembershipRecord {
                step: e.step,
                epoch: e.epoch,
                workers: e.workers,
                why: e.why.clone(),
                handed_over: e.moved.handed_over,
                expert_units_sent: e.moved.expert_units,
                dense_tensors_sent: e.moved.dense_tensors,
                state_bytes_sent: e.moved.bytes,
            }))?;
        }
        self.membership_logged += new.len();
        Ok(())
    }

    /// Log a validation loss and the storage and dense-sharding figures measured with it.
    fn log_evaluation(&self, log: &mut MetricsLog, step: u64, elapsed: f64, val_loss: f64) -> Result<()> {
        crate::telemetry::metrics::record_validation(val_loss);
        log.write(&Record::Val(ValRecord {
            step,
            elapsed_s: Some(elapsed),
            val_loss,
        }))?;
        let tiers = self.tier_stats();
        if !tiers.is_empty() {
            let mut total = crate::storage::tiers::TierStats::default();
            tiers.iter().for_each(|t| total.add(t));
            log.write(&Record::Storage(log::StorageRecord {
                step,
                stats: Box::new(total),
            }))?;
        }
        if self.config.storage.shard_dense {
            log.write(&Record::Dense(log::DenseRecord {
                step,
                workers: self.dense_stats(),
            }))?;
        }
        Ok(())
    }
}

/// The mean of some losses (NaN if there are none).
fn mean(values: &VecDeque<f64>) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// How [`Trainer::run`] shows progress: a bar on a terminal, plain lines every few seconds
/// elsewhere (a log file, CI), or nothing.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines {
        total: u64,
        first_step: u64,
        started: Instant,
        last_line: Option<Instant>,
    },
    Silent,
}

impl Progress {
    fn new(enabled: bool, total: u64, done: u64) -> Result<Self> {
        if !enabled {
            return Ok(Progress::Silent);
        }
        if !std::io::stderr().is_terminal() {
            return Ok(Progress::Lines {
                total,
                first_step: done,
                started: Instant::now(),
                last_line: None,
            });
        }
        let bar = indicatif::ProgressBar::new(total);
        let style = indicatif::ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .map_err(|e| Error::config(format!("progress bar template: {e}")))?;
        bar.set_style(style);
        bar.set_position(done);
        Ok(Progress::Bar(bar))
    }

    /// A line that stays (an evaluation).
    fn line(&self, text: String) {
        match self {
            Progress::Bar(bar) => bar.println(text),
            Progress::Lines { .. } => crate::say!("{text}"),
            Progress::Silent => {}
        }
    }

    /// After each step.
    fn step(&mut self, step: u64, loss: f64, val_loss: f64, tps: f64, mean_tps: f64) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(step);
                bar.set_message(format!("loss {loss:.3}  val {val_loss:.3}  {tps:.0} tok/s"));
            }
            Progress::Lines {
                total,
                first_step,
                started,
                last_line,
            } => {
                let due = last_line.is_none_or(|t| t.elapsed().as_secs_f64() >= PLAIN_PROGRESS_EVERY_S);
                if !due || step == *total {
                    return;
                }
                *last_line = Some(Instant::now());
                let done = step - *first_step;
                let per_step = started.elapsed().as_secs_f64() / done.max(1) as f64;
                let eta = per_step * (*total - step) as f64;
                let val = if val_loss.is_nan() {
                    "-".to_string()
                } else {
                    format!("{val_loss:.4}")
                };
                crate::say!(
                    "step {step:>5}/{total} ({:.0}%)  loss {loss:.4}  val {val}  {mean_tps:.0} tokens/s  ETA {}",
                    100.0 * step as f64 / *total as f64,
                    format_duration(eta)
                );
            }
            Progress::Silent => {}
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Seconds as `1h02m03s`, `2m03s` or `4s`.
pub fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

/// Mean cross-entropy (nats per byte) of `model` on `windows` windows of its context length,
/// evenly spaced over `text`, evaluated `chunk` windows at a time on the compute threads (the sum
/// is taken in window order, so the result does not depend on the thread count).
pub fn text_loss(model: &Gpt<f32>, cpu: &Cpu, text: &[u8], windows: usize, chunk: usize) -> Result<f64> {
    let t = model.config().block_size;
    if text.len() < t + 1 {
        return Err(Error::config(format!(
            "the text to evaluate has {} bytes; the model's context needs at least {}",
            text.len(),
            t + 1
        )));
    }
    if windows == 0 || chunk == 0 {
        return Err(Error::config("evaluation needs at least one window"));
    }
    let starts = sampler::eval_starts(text.len(), t, windows);
    let chunks: Vec<&[usize]> = starts.chunks(chunk).collect();
    let sums = std::sync::Mutex::new(vec![0.0f64; chunks.len()]);
    cpu.par_for_each(chunks.iter().copied().enumerate().collect(), |backend, (i, chunk)| {
        let (idx, targets) = sampler::windows(text, chunk, t);
        let out = model.evaluate(backend, &idx, &targets, chunk.len())?;
        if let Ok(mut s) = sums.lock() {
            s[i] = out.ce_sum;
        }
        Ok(())
    })?;
    let total: f64 = sums
        .into_inner()
        .map_err(|_| compute_failure("an evaluation task panicked"))?
        .iter()
        .sum();
    Ok(total / (starts.len() * t) as f64)
}

/// Write a checkpoint of a training state into `run_dir/checkpoints/` (see
/// [`crate::storage::state::save`]), with the run's config in the manifest.
pub fn write_checkpoint(
    run_dir: &Path,
    config: &TrainConfig,
    model: &Gpt<f32>,
    optimizer: &AdamW,
    training_seconds: f64,
    data_digest: Option<&str>,
) -> Result<PathBuf> {
    state::save(
        run_dir,
        config,
        config.train.seed,
        model,
        optimizer,
        training_seconds,
        data_digest,
    )
}

/// Load a model and optimizer state from a checkpoint directory written by [`Trainer`].
pub fn load_state(config: &TrainConfig, dir: &Path) -> Result<(Gpt<f32>, AdamW, f64)> {
    load_state_from(config, checkpoint::load(dir)?)
}

/// [`load_state`] from a checkpoint already loaded (and verified).
pub fn load_state_from(config: &TrainConfig, ckpt: Checkpoint) -> Result<(Gpt<f32>, AdamW, f64)> {
    state::restore(&config.model, &config.optimizer, ckpt)
}

/// Load only the model (for generation) from a checkpoint directory, with the config saved in it.
pub fn load_model(dir: &Path) -> Result<Gpt<f32>> {
    state::model_from(checkpoint::load_model_only(dir)?)
}

/// The model of a loaded checkpoint, with the config saved in it.
pub fn model_from(ckpt: Checkpoint) -> Result<Gpt<f32>> {
    state::model_from(ckpt)
}

/// Write the `config.toml` of a run directory that lost it (deleted, or not copied with the
/// run) from its newest intact checkpoint's manifest, which records the config the run trained
/// with; the notice that says so. Without such a checkpoint the run cannot be resumed, and the
/// error says why.
pub fn rebuild_config(run_dir: &Path) -> Result<String> {
    let config_path = run_dir.join("config.toml");
    let _lock = RunDirLock::acquire(run_dir)?;
    checkpoint::restore_replaced(run_dir)?;
    let (config, ckpt_dir) = config_of_newest_checkpoint(run_dir)?;
    checkpoint::write_file_durably(&config_path, config.to_toml()?.as_bytes())?;
    Ok(format!(
        "{} was missing: rebuilt from the config checkpoint {} records",
        config_path.display(),
        ckpt_dir.display()
    ))
}

/// The config the newest intact checkpoint of `run_dir` records, and that checkpoint, read and
/// nothing written (what [`rebuild_config`] writes; `--resume --print-config` prints it).
pub fn config_of_newest_checkpoint(run_dir: &Path) -> Result<(TrainConfig, PathBuf)> {
    let resolved = checkpoint::newest_intact(run_dir)?;
    let ckpt = resolved.checkpoint.ok_or_else(|| {
        Error::config(format!(
            "{} has no config.toml and no intact checkpoint to rebuild it from",
            run_dir.display()
        ))
    })?;
    if ckpt.extra.get("config").is_none() {
        return Err(Error::config(format!(
            "{} has no config.toml, and checkpoint {} records no config to rebuild it from",
            run_dir.display(),
            ckpt.dir.display()
        )));
    }
    Ok((checkpoint_config(&ckpt)?, ckpt.dir))
}

/// The training config recorded in a checkpoint's manifest.
pub fn checkpoint_config(ckpt: &Checkpoint) -> Result<TrainConfig> {
    let config: TrainConfig =
        serde_json::from_value(ckpt.extra.get("config").cloned().unwrap_or_default()).map_err(|e| {
            Error::parse(
                format!("checkpoint {} manifest config", ckpt.dir.display()),
                e.to_string(),
            )
        })?;
    config.model.validate()?;
    // The batch's split into groups sets how evaluation and replayed routing chunk their windows
    // (the rest of the train table is the machine's, checked where a run starts).
    let t = &config.train;
    if t.batch == 0 || t.groups == 0 || !t.batch.is_multiple_of(t.groups) {
        return Err(Error::parse(
            format!("checkpoint {} manifest config", ckpt.dir.display()),
            format!(
                "train.batch ({}) must be a positive multiple of train.groups ({})",
                t.batch, t.groups
            ),
        ));
    }
    Ok(config)
}

/// Fresh AdamW state for `model` (see [`crate::optimizer::for_model`]).
pub fn new_optimizer(config: &TrainConfig, model: &Gpt<f32>) -> Result<AdamW> {
    crate::optimizer::for_model(&config.optimizer, model)
}

/// The global gradient norm of a model's gradient buffers (in [`Gpt::tensors`] order), with every
/// dense tensor one part and every expert's slice of an expert tensor one part (see
/// [`optimizer::norm_from_parts`]): the same number the actor runtime assembles from its owners.
pub fn model_grad_norm(model: &Gpt<f32>, grads: &[&mut Vec<f32>]) -> f64 {
    let parts = model.specs().into_iter().zip(grads).flat_map(|(spec, g)| {
        let unit = spec.unit_len().max(1);
        g.chunks(unit).map(optimizer::sum_squares).collect::<Vec<_>>()
    });
    optimizer::norm_from_parts(parts)
}

/// A failure inside the compute pool (not the user's input).
fn compute_failure(detail: &str) -> Error {
    Error::Backend {
        backend: "cpu",
        detail: detail.to_string(),
    }
}

/// What a metrics log says about the steps before a resume.
struct History {
    recent_losses: VecDeque<f64>,
    last_val: Option<(u64, f64)>,
    /// Lines were dropped and written to the file given for them.
    moved: bool,
}

/// Keep only the records of steps <= `step` in a metrics log (after a resume), and read the last
/// [`MEAN_LOSS_STEPS`] training losses and the last validation loss from what is kept. The lines
/// that go are written to `dropped_to` when given (none written when none go). A last line cut
/// short by a crash (no line end, not a record) goes too, to no file: it holds nothing readable.
fn truncate_metrics(path: &Path, step: u64, dropped_to: Option<&Path>) -> Result<History> {
    let mut history = History {
        recent_losses: VecDeque::new(),
        last_val: None,
        moved: false,
    };
    let open = || match std::fs::File::open(path) {
        Ok(f) => {
            let len = f
                .metadata()
                .map_err(|e| Error::io("cannot read the metrics log", path, e))?
                .len();
            Ok(Some((log::LogReader::new(std::io::BufReader::new(f), path), len)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("cannot read the metrics log", path, e)),
    };
    let Some((reader, file_len)) = open()? else {
        return Ok(history);
    };
    // A last line without its line end that is not a record was cut short by a crash.
    let mut ends_in_newline = true;
    if file_len > 0 {
        use std::io::{Read, Seek, SeekFrom};
        let mut last = [0u8; 1];
        std::fs::File::open(path)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(file_len - 1))
                    .and_then(|_| f.read_exact(&mut last))
            })
            .map_err(|e| Error::io("cannot read the metrics log", path, e))?;
        ends_in_newline = last[0] == b'\n';
    }
    // Any line naming a later step goes, whatever its kind; lines without one stay.
    let later = |entry: &log::Entry| entry.step.is_some_and(|s| s > step);
    // A first pass reads the history and whether anything goes, holding no more than a line (a
    // long run's log is gigabytes); a second one rewrites the log only if it must.
    let mut kept_bytes = 0u64;
    let mut dropped = false;
    // The last line read, if it was kept and is not a record: its number and length.
    let mut last_malformed = None;
    for entry in reader {
        let entry = entry?;
        last_malformed = None;
        if later(&entry) {
            dropped = true;
            continue;
        }
        kept_bytes += entry.text.len() as u64 + 1;
        if matches!(entry.parsed, log::Parsed::Malformed(_)) {
            last_malformed = Some((entry.line, entry.text.len() as u64 + 1));
        }
        match entry.parsed {
            // A `null` loss is read as NaN: it does not count, as before the log was typed.
            log::Parsed::Record(Record::Train(r)) if !r.nats_per_byte().is_nan() => {
                history.recent_losses.push_back(r.nats_per_byte());
                if history.recent_losses.len() > MEAN_LOSS_STEPS {
                    history.recent_losses.pop_front();
                }
            }
            log::Parsed::Record(Record::Val(r)) if !r.val_loss.is_nan() => {
                if let Some(s) = entry.step {
                    history.last_val = Some((s, r.val_loss));
                }
            }
            _ => {}
        }
    }
    let torn_line = match last_malformed {
        Some((line, bytes)) if !ends_in_newline => {
            kept_bytes -= bytes;
            Some(line)
        }
        _ => None,
    };
    let keep = |entry: &log::Entry| !later(entry) && Some(entry.line) != torn_line;
    // The log's lines that `select` picks, written durably to `to`.
    let copy_lines = |to: &Path, select: &dyn Fn(&log::Entry) -> bool| -> Result<()> {
        let Some((reader, _)) = open()? else {
            return Err(Error::runtime(format!("{} vanished during a resume", path.display())));
        };
        checkpoint::write_file_durably_with(to, |out| {
            for entry in reader {
                let entry = entry?;
                if select(&entry) {
                    out.write_all(&entry.text)
                        .and_then(|()| out.write_all(b"\n"))
                        .map_err(|e| Error::io("cannot write", to, e))?;
                }
            }
            Ok(())
        })
    };
    if let Some(side) = dropped_to.filter(|_| dropped) {
        copy_lines(side, &later)?;
        history.moved = true;
    }
    // Rewritten only when a line goes (or a last line gets its end, or a torn one goes): a
    // rewrite needs the log's size in free space, which a run stopped by a full disk may not have.
    if dropped || kept_bytes != file_len {
        copy_lines(path, &keep)?;
    }
    Ok(history)
}
