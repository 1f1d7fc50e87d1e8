//! Chaos runs (`semoe chaos`): train a job on the in-process actor runtime under a
//! [`Scenario`], then the same job undisturbed, and report each fault (when it fired, how it was
//! detected, how long the repair took, the steps replayed) and the verdict: the final parameters
//! and optimizer state bitwise equal, or the error the disturbed run stopped with. The whole run is
//! bounded by the scenario's deadline; on expiry the report says what was being waited for.

use crate::actors::{ExpertPlacement, Runtime};
use crate::chaos::{FaultKind, FaultPlan, Layout, Moment, PlannedFault, Scenario, Target};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::gpt::Gpt;
use crate::optimizer::AdamW;
use crate::storage::checkpoint::{self, Interruption, MODEL_FILE, OPTIMIZER_FILE};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The verdict of a chaos run.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Every tensor of the model and the optimizer state (moments and step) is bitwise equal to
    /// the undisturbed run's.
    BitwiseEqual {
        /// Tensors compared (model, first and second moments, the step).
        tensors: usize,
        /// Values compared.
        values: usize,
    },
    /// The disturbed run finished, but its state differs (a defect of the runtime).
    Differs {
        /// The first difference: a tensor's name or length, or its first differing element.
        first: String,
    },
    /// The disturbed run stopped with this error (for example a silent peer's deadline).
    Stopped {
        /// The step (0-based) that failed (the number of steps, when gathering the final state
        /// failed).
        step: u64,
        /// The error.
        error: String,
        /// Seconds from the failing step's start to its error.
        after_s: f64,
    },
    /// The overall deadline expired.
    DeadlineExpired {
        /// What was being waited for then.
        waiting: String,
    },
}

/// One planned fault and what became of it.
#[derive(Clone, Debug, Serialize)]
pub struct FaultReport {
    /// Its index in the plan.
    pub index: usize,
    /// Its `[[fault]]` entry.
    pub entry: usize,
    /// The actor, in words (`expert 2 of block 1`).
    pub target: String,
    /// `error`, `panic`, `silence`, `drop`, `duplicate`, `delay <time>` or `reorder`.
    pub kind: String,
    /// The planned step.
    pub step: u64,
    /// The planned moment.
    pub moment: String,
    /// How many times it fired.
    pub fired: usize,
    /// Seconds from the start of the disturbed run to its first firing.
    pub fired_at_s: Option<f64>,
    /// How the runtime noticed it.
    pub detection: String,
    /// Seconds from its first firing to the commit of its step (`None`: not committed).
    pub recovery_s: Option<f64>,
    /// Replays of its step.
    pub step_replays: Option<u32>,
}

/// One committed step of a run.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    /// The step (0-based).
    pub step: u64,
    /// Times it was replayed.
    pub replays: u32,
    /// Seconds it took, replays included.
    pub seconds: f64,
}

/// What a chaos run reports (`chaos.json`; [`ChaosReport::markdown`] is `chaos.md`).
#[derive(Clone, Debug, Serialize)]
pub struct ChaosReport {
    /// The scenario's seed.
    pub seed: u64,
    /// The overall deadline, seconds.
    pub deadline_s: f64,
    /// Steps planned.
    pub steps: u64,
    /// In-process workers.
    pub workers: usize,
    /// The collective deadline of the runtime, seconds.
    pub collective_deadline_s: f64,
    /// Every planned fault.
    pub faults: Vec<FaultReport>,
    /// Actor restarts the supervisors reported.
    pub restarts: usize,
    /// The same, per worker.
    pub restarts_per_worker: Vec<usize>,
    /// Steps replayed in all.
    pub replays: u32,
    /// Steps the disturbed run committed.
    pub disturbed_steps: Vec<StepRecord>,
    /// Steps the undisturbed run committed (empty when it was not needed).
    pub undisturbed_steps: Vec<StepRecord>,
    /// Seconds of the disturbed run.
    pub disturbed_s: f64,
    /// Seconds of the undisturbed run.
    pub undisturbed_s: f64,
    /// Bytes the disturbed run's Disk tiers read and wrote (all workers; zero when the storage
    /// budgets keep every expert in memory).
    pub disk_bytes: [u64; 2],
    /// The verdict.
    pub verdict: Verdict,
    /// A run over worker processes (`--processes`): its process faults and epochs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<super::chaos_processes::ProcessReport>,
}

/// The outcome of one run.
pub(super) struct RunResult {
    pub(super) steps: Vec<(StepRecord, Instant)>,
    /// The failing step, its error and how long it ran.
    pub(super) failed: Option<(u64, String, f64)>,
    pub(super) state: Option<Vec<(String, Vec<u32>)>>,
    started: Instant,
    pub(super) seconds: f64,
    /// Bytes read from and written to the Disk tiers.
    disk_bytes: [u64; 2],
    /// What each checkpoint fault did, by the step it fired after.
    notes: Vec<(u64, String)>,
}

impl RunResult {
    /// A run with no disk tiers and no checkpoint notes (a run over processes).
    pub(super) fn new(
        steps: Vec<(StepRecord, Instant)>,
        failed: Option<(u64, String, f64)>,
        state: Option<Vec<(String, Vec<u32>)>>,
        started: Instant,
    ) -> Self {
        RunResult {
            steps,
            failed,
            state,
            started,
            seconds: started.elapsed().as_secs_f64(),
            disk_bytes: [0, 0],
            notes: Vec::new(),
        }
    }
}

/// Where a run is, for the report when the overall deadline expires.
pub(super) type Progress = Arc<Mutex<String>>;

pub(super) fn set(progress: &Progress, what: String) {
    *progress.lock().unwrap_or_else(|e| e.into_inner()) = what;
}

/// The bits of every model tensor, then `m.NAME`, `v.NAME` and `optimizer.step`.
pub fn state_bits(model: &Gpt<f32>, optimizer: &AdamW) -> Vec<(String, Vec<u32>)> {
    let mut out: Vec<(String, Vec<u32>)> = model
        .tensors()
        .into_iter()
        .map(|(n, _, b)| (n, b.iter().map(|v| v.to_bits()).collect()))
        .collect();
    let names: Vec<String> = out.iter().map(|(n, _)| n.clone()).collect();
    for (kind, moments) in [("m", &optimizer.m), ("v", &optimizer.v)] {
        for (n, buf) in names.iter().zip(moments) {
            out.push((format!("{kind}.{n}"), buf.iter().map(|v| v.to_bits()).collect()));
        }
    }
    let step = optimizer.step;
    out.push(("optimizer.step".into(), vec![step as u32, (step >> 32) as u32]));
    out
}

/// Compare two states: the names and lengths of every tensor first, then the values.
pub fn compare(want: &[(String, Vec<u32>)], got: &[(String, Vec<u32>)]) -> Verdict {
    if want.len() != got.len() {
        return Verdict::Differs {
            first: format!("{} tensors against {}", got.len(), want.len()),
        };
    }
    for ((wn, wb), (gn, gb)) in want.iter().zip(got) {
        if wn != gn || wb.len() != gb.len() {
            return Verdict::Differs {
                first: format!(
                    "tensor {gn} ({} values) where {wn} ({} values) was expected",
                    gb.len(),
                    wb.len()
                ),
            };
        }
    }
    let mut values = 0;
    for ((n, a), (_, b)) in want.iter().zip(got) {
        if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
            return Verdict::Differs {
                first: format!(
                    "tensor {n} element {i}: {} against {}",
                    f32::from_bits(b[i]),
                    f32::from_bits(a[i])
                ),
            };
        }
        values += a.len();
    }
    Verdict::BitwiseEqual {
        tensors: want.len(),
        values,
    }
}

fn builder(
    config: &TrainConfig,
    text: &Arc<Vec<u8>>,
    plan: FaultPlan,
    tiers: &Path,
) -> Result<crate::actors::RuntimeBuilder> {
    Ok(Runtime::builder(config.clone())
        .storage(config.storage.to_config(Some(tiers.to_path_buf()))?)
        .workers(config.train.workers)
        .placement(config.train.placement.parse::<ExpertPlacement>()?)
        .deadline(Duration::from_secs_f64(config.train.deadline_s))
        .shared_text(text.clone())
        .chaos(plan))
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn one_run(
    name: &'static str,
    config: &TrainConfig,
    text: &Arc<Vec<u8>>,
    plan: FaultPlan,
    progress: &Progress,
    tiers: &Path,
    checkpoints: Option<&Path>,
) -> Result<RunResult> {
    let started = Instant::now();
    set(progress, format!("the {name} run: starting the runtime"));
    let tiers = tiers.join(name);
    let mut rt = builder(config, text, plan.clone(), &tiers)?.build().await?;
    let mut steps = Vec::new();
    let mut failed = None;
    let mut notes = Vec::new();
    let mut disk_bytes = [0, 0];
    if let Some(dir) = checkpoints {
        // The state before the first step, so that a fault at the first checkpoint has one to
        // fall back on.
        set(progress, format!("the {name} run: the checkpoint before step 0"));
        save_checkpoint(&rt, config, dir, None).await?;
    }
    let mut step = 0;
    while step < config.train.steps {
        set(
            progress,
            format!("the {name} run: step {step} of {}", config.train.steps),
        );
        let t = Instant::now();
        match rt.step().await {
            Ok(outcome) => steps.push((
                StepRecord {
                    step,
                    replays: outcome.replays,
                    seconds: outcome.seconds,
                },
                Instant::now(),
            )),
            Err(e) => {
                failed = Some((step, e.to_string(), t.elapsed().as_secs_f64()));
                break;
            }
        }
        let Some(dir) = checkpoints else {
            step += 1;
            continue;
        };
        set(progress, format!("the {name} run: the checkpoint after step {step}"));
        let t = Instant::now();
        let fault = plan.fire(&Target::Checkpoint, step, Moment::Any);
        let what = match (fault, save_checkpoint(&rt, config, dir, fault).await) {
            (None, Ok(_)) => {
                step += 1;
                continue;
            }
            (None, Err(e)) => {
                failed = Some((
                    step,
                    format!("the checkpoint after step {step}: {e}"),
                    t.elapsed().as_secs_f64(),
                ));
                break;
            }
            (Some(_), Err(e)) => format!("the save failed: {e}"),
            (Some(FaultKind::Corrupt), Ok(saved)) => match flip_a_byte(&saved) {
                Ok(flipped) => flipped,
                Err(e) => {
                    failed = Some((
                        step,
                        format!("cannot corrupt the checkpoint: {e}"),
                        t.elapsed().as_secs_f64(),
                    ));
                    break;
                }
            },
            (Some(_), Ok(saved)) => format!("the save of {} went through", saved.display()),
        };
        // As after a crash there: the runtime stops, and the run resumes from the newest intact
        // checkpoint (what `semoe train --resume` does).
        disk_bytes = add(disk_bytes, tier_bytes(&rt));
        rt.shutdown().await?;
        match resume(config, dir) {
            Ok((model, optimizer, how)) => {
                let from = optimizer.step;
                notes.push((
                    step,
                    format!("{what}; {how}; {} step(s) trained again", step + 1 - from),
                ));
                steps.truncate(from as usize);
                set(progress, format!("the {name} run: resuming from step {from}"));
                rt = builder(config, text, plan.clone(), &tiers)?
                    .state(model, optimizer)
                    .build()
                    .await?;
                step = from;
            }
            Err(e) => {
                notes.push((step, format!("{what}; the run could not resume: {e}")));
                failed = Some((step, e.to_string(), t.elapsed().as_secs_f64()));
                return Ok(RunResult {
                    steps,
                    failed,
                    state: None,
                    started,
                    seconds: started.elapsed().as_secs_f64(),
                    disk_bytes,
                    notes,
                });
            }
        }
    }
    let steps_done = steps.len() as u64;
    disk_bytes = add(disk_bytes, tier_bytes(&rt));
    let state = if failed.is_none() {
        set(progress, format!("the {name} run: gathering the state"));
        let t = Instant::now();
        match rt.state().await {
            Ok((model, optimizer)) => {
                set(progress, format!("the {name} run: shutting down"));
                rt.shutdown().await?;
                Some(state_bits(&model, &optimizer))
            }
            Err(e) => {
                failed = Some((
                    steps_done,
                    format!("gathering the state: {e}"),
                    t.elapsed().as_secs_f64(),
                ));
                rt.abandon().await?;
                None
            }
        }
    } else {
        // A runtime that failed may have a step in flight that never ends: stop it at once.
        set(progress, format!("the {name} run: abandoning the failed runtime"));
        rt.abandon().await?;
        None
    };
    Ok(RunResult {
        steps,
        failed,
        state,
        started,
        seconds: started.elapsed().as_secs_f64(),
        disk_bytes,
        notes,
    })
}

/// Bytes the runtime's Disk tiers read and wrote.
fn tier_bytes(rt: &Runtime) -> [u64; 2] {
    rt.tier_stats()
        .iter()
        .fold([0, 0], |[r, w], t| [r + t.disk_read, w + t.disk_written])
}

fn add(a: [u64; 2], b: [u64; 2]) -> [u64; 2] {
    [a[0] + b[0], a[1] + b[1]]
}

/// Write the runtime's committed state as a checkpoint under `dir`, interrupted halfway through
/// the optimizer file (an injected `EIO`) for [`FaultKind::Interrupt`].
async fn save_checkpoint(rt: &Runtime, config: &TrainConfig, dir: &Path, fault: Option<FaultKind>) -> Result<PathBuf> {
    let (model, optimizer) = rt.state().await?;
    let interruption = (fault == Some(FaultKind::Interrupt)).then(|| Interruption {
        file: OPTIMIZER_FILE,
        error: std::io::Error::from_raw_os_error(libc::EIO),
    });
    crate::storage::state::save_interrupted(
        dir,
        config,
        config.train.seed,
        &model,
        &optimizer,
        0.0,
        None,
        interruption,
    )
}

/// Flip one bit of a byte in the middle of the checkpoint's model file (in the tensor data, past
/// the header), as a disk's silent corruption would; says which.
fn flip_a_byte(checkpoint: &Path) -> Result<String> {
    let path = checkpoint.join(MODEL_FILE);
    let mut bytes = std::fs::read(&path).map_err(|e| Error::io("cannot read the checkpoint to corrupt", &path, e))?;
    let at = bytes.len() / 2;
    let Some(b) = bytes.get_mut(at) else {
        return Err(Error::checkpoint(&path, "the file is empty"));
    };
    *b ^= 0x10;
    std::fs::write(&path, &bytes).map_err(|e| Error::io("cannot write the corrupted checkpoint", &path, e))?;
    Ok(format!(
        "bit 4 of byte {at} of {} flipped after the save",
        path.display()
    ))
}

/// What `--resume` does: the newest checkpoint under `dir` that verifies in full (manifest,
/// lengths, SHA-256), every newer damaged one set aside and named, loaded.
fn resume(config: &TrainConfig, dir: &Path) -> Result<(Gpt<f32>, AdamW, String)> {
    let resolved = checkpoint::newest_intact(dir)?;
    let mut how = Vec::new();
    for d in &resolved.damaged {
        let aside = checkpoint::set_aside(&d.dir)?;
        how.push(format!(
            "{} is damaged ({}) and was moved to {}",
            d.dir.display(),
            d.reason,
            aside.display()
        ));
    }
    let Some(ckpt) = resolved.checkpoint else {
        how.push("no intact checkpoint is left".into());
        return Err(Error::checkpoint(dir, how.join("; ")));
    };
    let from = ckpt.dir.clone();
    let (model, optimizer, _) = super::trainer::load_state_from(config, ckpt)?;
    how.push(format!(
        "resumed from {} (step {}; every file's length and SHA-256 verified)",
        from.display(),
        optimizer.step
    ));
    Ok((model, optimizer, how.join("; ")))
}

fn describe(target: &Target) -> String {
    match target {
        Target::Expert { block, expert } => format!("expert {expert} of block {block}"),
        Target::Gate { worker, block } => format!("gate of block {block} on worker {worker}"),
        Target::Ledger { worker } => format!("ledger of worker {worker}"),
        Target::Silence { worker } => format!("communicator of worker {worker}"),
        Target::Link { from, to } => format!("requests from worker {from} to worker {to}"),
        Target::Disk { worker } => format!("disk tier of worker {worker}"),
        Target::Checkpoint => "the checkpoint after the step".to_string(),
        Target::Communicator { worker } => format!("communicator of worker {worker}"),
    }
}

fn moment_name(m: Moment) -> &'static str {
    match m {
        Moment::Forward => "forward",
        Moment::Backward => "backward",
        Moment::Any => "any",
    }
}

/// Run `config` (the in-process actor runtime, `train.workers >= 1`) under `scenario`, then
/// undisturbed, and compare. Blocking: it runs its own async runtime. An error is returned only
/// when the job cannot start (a bad configuration, a scenario that does not fit the run); what
/// happens in the runs is the report's verdict.
pub fn run(config: &TrainConfig, scenario: &Scenario) -> Result<ChaosReport> {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("semoe-chaos-{}-{n}", std::process::id()));
    let report = run_in(config, scenario, &dir);
    // The stores delete their files when dropped; checkpoints and directories may be left.
    let _ = std::fs::remove_dir_all(&dir);
    report
}

/// The job a chaos run trains: `config` with the scenario's collective deadline, validated.
fn job_of(config: &TrainConfig, scenario: &Scenario) -> Result<TrainConfig> {
    let mut job = config.clone();
    if let Some(d) = scenario.collective_deadline {
        job.train.deadline_s = d.as_secs_f64();
    }
    job.validate()?;
    // A fault found only by a missed collective deadline (a silent communicator, a dropped
    // request, a partition) needs that deadline well inside the scenario's: the job's own
    // (`train.deadline_s`, 30 s by default) is checked here as the scenario's is where it is set.
    let waits_out = scenario.faults.iter().position(|f| {
        f.actor == crate::chaos::ActorKind::Silence || matches!(f.kind, FaultKind::Drop | FaultKind::Partition(_))
    });
    if let Some(entry) = waits_out {
        if job.train.deadline_s >= scenario.deadline.as_secs_f64() {
            return Err(Error::config(format!(
                "chaos scenario: fault[{entry}] is found when a collective misses its deadline, and the job's \
                 (train.deadline_s, {} s) is not below the scenario's deadline ({}): the run could only end with \
                 the scenario's deadline. Set collective_deadline in the scenario (e.g. \"2s\") or a longer deadline",
                job.train.deadline_s,
                humantime::format_duration(scenario.deadline)
            )));
        }
    }
    Ok(job)
}

/// The fault plan of a chaos run on the in-process runtime, refused when the scenario does not fit
/// the job.
fn in_process_plan(config: &TrainConfig, scenario: &Scenario) -> Result<(FaultPlan, Vec<PlannedFault>)> {
    if config.train.elastic() {
        return Err(Error::config(
            "chaos runs use the in-process actor runtime or worker processes this run starts (train.processes): \
             leave train.listen unset",
        ));
    }
    if config.train.workers == 0 {
        return Err(Error::config(
            "chaos runs need the actor runtime: train.workers (--workers) of 1 or more",
        ));
    }
    let layout = Layout::new(&config.model, config.train.workers, config.train.steps);
    let planned = scenario.plan(&layout)?;
    if let Some(entry) = scenario
        .faults
        .iter()
        .position(|f| f.actor == crate::chaos::ActorKind::Disk)
    {
        if config.storage.to_config(None)?.unlimited() {
            return Err(Error::config(format!(
                "chaos scenario: fault[{entry}] is a disk fault, but the job keeps every expert in memory: set \
                 storage.device_budget (and storage.host_budget) so that some experts live in the Disk tier"
            )));
        }
    }
    refuse_disk_faults_without_a_disk(config, scenario, &planned.1)?;
    Ok(planned)
}

/// A disk fault aimed at a worker whose budgets hold all its experts in memory: that worker opens
/// no Disk tier, so the fault could never fire (a scripted one made the run end "not exercised"
/// after its whole length, rather than at once). An entry that draws its worker is refused only
/// when no worker has a Disk tier.
fn refuse_disk_faults_without_a_disk(
    config: &TrainConfig,
    scenario: &Scenario,
    planned: &[PlannedFault],
) -> Result<()> {
    let storage = config.storage.to_config(None)?;
    let owners =
        crate::actors::placement::expert_owners(&config.model, config.train.workers, &config.train.placement.parse()?)?;
    let blocks = (0..config.model.n_layer).filter(|&l| config.model.is_moe(l)).count() as u64;
    let unit = crate::storage::tiers::ExpertSlot::bytes_for(config.model.d_model, config.model.d_ff);
    let units_of = |worker: usize| owners.iter().filter(|&&w| w == worker).count() as u64 * blocks;
    let has_disk = |worker: usize| !storage.keeps_in_memory(unit, units_of(worker));
    let refuse = |entry: usize, which: String, units: u64| {
        Err(Error::config(format!(
            "chaos scenario: fault[{entry}] is a disk fault on {which} {units} expert units ({}) in memory under \
             storage.device_budget and storage.host_budget and opens no Disk tier: the fault could never fire. Lower \
             the budgets (a tier holds whole units of {}, and the two need one unit to spare)",
            crate::storage::tiers::format_bytes(units * unit),
            crate::storage::tiers::format_bytes(unit),
        )))
    };
    for p in planned {
        let Target::Disk { worker } = p.fault.target else {
            continue;
        };
        let Some(spec) = scenario.faults.get(p.entry) else {
            continue;
        };
        // Only a worker the entry names: one drawn from the seed may land on a worker without a
        // Disk tier in some seeds and not others (a soak's), which is no reason to refuse them.
        if spec.worker.is_some() && !has_disk(worker) {
            return refuse(p.entry, format!("worker {worker}, which keeps its"), units_of(worker));
        }
    }
    for (entry, spec) in scenario.faults.iter().enumerate() {
        let drawn = spec.actor == crate::chaos::ActorKind::Disk && spec.worker.is_none();
        if drawn && !(0..config.train.workers).any(has_disk) {
            let most = (0..config.train.workers).map(units_of).max().unwrap_or(0);
            return refuse(
                entry,
                "workers drawn from the seed, and every worker keeps its (at most)".into(),
                most,
            );
        }
    }
    Ok(())
}

/// Everything [`run_in`] refuses before it starts or writes anything, for a caller to check before
/// it makes the run directory: the job (with the scenario's collective deadline), whether it fits
/// in memory, the scenario against the job, and the training text.
pub fn preflight(config: &TrainConfig, scenario: &Scenario) -> Result<()> {
    let job = job_of(config, scenario)?;
    super::memory::check_fits(&job, super::memory::available_bytes())?;
    if job.train.processes > 0 && job.train.listen.is_empty() {
        super::chaos_processes::preflight(&job, scenario)?;
    } else {
        in_process_plan(&job, scenario)?;
    }
    super::trainer::corpus_for(&job).map(|_| ())
}

/// [`run`] in `dir`: the Disk tiers (when the job's storage budgets need them) under `dir/tiers/`,
/// one directory per run (`disturbed`, `undisturbed`), each with a directory per worker; with
/// checkpoint faults, the disturbed run's checkpoints under `dir/checkpoints/` (emptied first).
pub fn run_in(config: &TrainConfig, scenario: &Scenario, dir: &Path) -> Result<ChaosReport> {
    let tiers: PathBuf = dir.join("tiers");
    let job = job_of(config, scenario)?;
    let config = &job;
    if config.train.processes > 0 && config.train.listen.is_empty() {
        return super::chaos_processes::run_in(config, scenario, dir);
    }
    let (plan, planned) = in_process_plan(config, scenario)?;
    let checkpoints = planned
        .iter()
        .any(|p| p.fault.target == Target::Checkpoint)
        .then(|| dir.to_path_buf());
    if let Some(d) = &checkpoints {
        let old = d.join(checkpoint::CHECKPOINTS_DIR);
        if old.exists() {
            std::fs::remove_dir_all(&old)
                .map_err(|e| Error::io("cannot empty the chaos run's checkpoints", &old, e))?;
        }
    }
    let text = super::trainer::corpus_for(config)?.train;
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("semoe-chaos")
        .enable_all()
        .build()
        .map_err(|e| Error::runtime(format!("cannot start the async runtime: {e}")))?;
    let progress: Progress = Arc::new(Mutex::new("nothing yet".into()));
    let begun = Instant::now();
    let deadline = scenario.deadline;
    let disturbed = {
        let (plan, progress, text, tiers) = (plan.clone(), progress.clone(), text.clone(), tiers.clone());
        tokio.block_on(async move {
            tokio::time::timeout(
                deadline,
                one_run(
                    "disturbed",
                    config,
                    &text,
                    plan,
                    &progress,
                    &tiers,
                    checkpoints.as_deref(),
                ),
            )
            .await
        })
    };
    let mut undisturbed = None;
    let verdict = match &disturbed {
        Err(_) => Verdict::DeadlineExpired {
            waiting: progress.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        },
        // The runtime did not start (or could not be stopped): not a verdict, an error.
        Ok(Err(e)) => {
            tokio.shutdown_timeout(Duration::from_millis(100));
            return Err(Error::runtime(format!("the chaos run could not run its job: {e}")));
        }
        Ok(Ok(d)) => match (&d.failed, &d.state) {
            (Some((step, error, after_s)), _) => Verdict::Stopped {
                step: *step,
                error: error.clone(),
                after_s: *after_s,
            },
            (None, Some(got)) => {
                let left = deadline.saturating_sub(begun.elapsed());
                let baseline = tokio.block_on({
                    let (progress, text, tiers) = (progress.clone(), text.clone(), tiers.clone());
                    async move {
                        tokio::time::timeout(
                            left,
                            one_run("undisturbed", config, &text, FaultPlan::none(), &progress, &tiers, None),
                        )
                        .await
                    }
                });
                match baseline {
                    Err(_) => Verdict::DeadlineExpired {
                        waiting: progress.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                    },
                    Ok(Err(e)) => Verdict::Differs {
                        first: format!("the undisturbed run failed: {e}"),
                    },
                    Ok(Ok(u)) => {
                        let v = match (&u.failed, &u.state) {
                            (None, Some(want)) => compare(want, got),
                            (Some((step, error, _)), _) => Verdict::Differs {
                                first: format!("the undisturbed run failed at step {step}: {error}"),
                            },
                            (None, None) => Verdict::Differs {
                                first: "the undisturbed run has no state".into(),
                            },
                        };
                        undisturbed = Some(u);
                        v
                    }
                }
            }
            (None, None) => Verdict::Differs {
                first: "the disturbed run has no state".into(),
            },
        },
    };
    // Tasks of an abandoned or timed-out run may still wait on a deadline: do not wait for them.
    tokio.shutdown_timeout(Duration::from_millis(100));
    let d = disturbed.ok().and_then(|r| r.ok());
    Ok(report(
        scenario,
        config,
        &plan,
        &planned,
        d.as_ref(),
        undisturbed.as_ref(),
        verdict,
    ))
}

fn report(
    scenario: &Scenario,
    config: &TrainConfig,
    plan: &FaultPlan,
    planned: &[PlannedFault],
    disturbed: Option<&RunResult>,
    undisturbed: Option<&RunResult>,
    verdict: Verdict,
) -> ChaosReport {
    let firings = plan.firings();
    let restarts = plan.restarts();
    let collective = Duration::from_secs_f64(config.train.deadline_s);
    let faults = planned
        .iter()
        .enumerate()
        .map(|(index, p)| {
            let f = &p.fault;
            let mine: Vec<_> = firings.iter().filter(|x| x.fault == index).collect();
            let first = mine.first();
            let silence = matches!(f.target, Target::Silence { .. });
            let link = matches!(f.target, Target::Link { .. });
            let disk = matches!(f.target, Target::Disk { .. });
            let kind = match f.kind {
                _ if silence => "silence".to_string(),
                FaultKind::ReadError => "read-error".to_string(),
                FaultKind::WriteError => "write-error".to_string(),
                FaultKind::DiskFull => "full".to_string(),
                FaultKind::ShortRead => "short-read".to_string(),
                FaultKind::Slow(d) => format!("slow {}", humantime::format_duration(d)),
                FaultKind::Interrupt => "interrupt".to_string(),
                FaultKind::Corrupt => "corrupt".to_string(),
                FaultKind::Partition(d) => format!("partition {}", humantime::format_duration(d)),
                FaultKind::Panic => "panic".to_string(),
                FaultKind::Error => "error".to_string(),
                FaultKind::Drop => "drop".to_string(),
                FaultKind::Duplicate => "duplicate".to_string(),
                FaultKind::Reorder => "reorder".to_string(),
                FaultKind::Delay(d) => format!("delay {}", humantime::format_duration(d)),
                FaultKind::Kill => "kill".to_string(),
                FaultKind::Stop(d) => format!("stop {}", humantime::format_duration(d)),
                FaultKind::Leave => "leave".to_string(),
                FaultKind::Join => "join".to_string(),
            };
            let since = |at: Instant| disturbed.map(|d| at.saturating_duration_since(d.started).as_secs_f64());
            let committed = first.and_then(|x| {
                disturbed.and_then(|d| {
                    d.steps
                        .iter()
                        .find(|(s, _)| s.step == x.step)
                        .map(|(s, at)| (s.clone(), *at))
                })
            });
            let detection = match first {
                None => "did not fire: the actor was not asked at that step and moment (an expert that no token \
                         was routed to), or the run stopped before"
                    .to_string(),
                Some(x) if silence => match disturbed.and_then(|d| d.failed.as_ref()) {
                    Some((step, error, after)) => format!(
                        "worker {} stopped answering at step {}; step {step} failed after {after:.3} s (collective \
                         deadline {:.3} s): {error}",
                        match f.target {
                            Target::Silence { worker } => worker,
                            _ => 0,
                        },
                        x.step,
                        collective.as_secs_f64()
                    ),
                    None => format!("the silence began at step {} but the run did not fail", x.step),
                },
                Some(x) if f.target == Target::Checkpoint => disturbed
                    .and_then(|d| d.notes.iter().find(|(s, _)| *s == x.step))
                    .map_or_else(
                        || "fired, but the run stopped before it could resume".to_string(),
                        |(_, note)| note.clone(),
                    ),
                Some(x) if disk => disk_detection(f, x, mine.len(), disturbed.and_then(|d| d.failed.as_ref())),
                Some(x) if link => match (disturbed.and_then(|d| d.failed.as_ref()), &committed) {
                    (Some((step, error, after)), _) if *step == x.step => {
                        format!("step {step} failed after {after:.3} s: {error}")
                    }
                    (_, Some((s, _))) => format!(
                        "no failure: its step committed with {} replays (replies are matched to requests by id)",
                        s.replays
                    ),
                    _ => "the run stopped before its step committed".to_string(),
                },
                Some(x) => match restarts
                    .iter()
                    .find(|r| r.target.as_ref() == Some(&f.target) && r.at >= x.at)
                {
                    Some(r) => format!(
                        "the {} {}; worker {}'s supervisor saw the failure and restarted the {} {:.1} ms later",
                        describe(&f.target),
                        if f.kind == FaultKind::Panic {
                            "panicked in its handler"
                        } else {
                            "returned an error from its handler"
                        },
                        r.worker,
                        r.actor,
                        r.at.saturating_duration_since(x.at).as_secs_f64() * 1e3
                    ),
                    None => format!("the {} failed, but no restart of it was recorded", describe(&f.target)),
                },
            };
            FaultReport {
                index,
                entry: p.entry,
                target: describe(&f.target),
                kind,
                step: f.step,
                moment: moment_name(f.moment).into(),
                fired: mine.len(),
                fired_at_s: first.and_then(|x| since(x.at)),
                detection,
                recovery_s: match (first, &committed) {
                    (Some(x), Some((_, at))) => Some(at.saturating_duration_since(x.at).as_secs_f64()),
                    _ => None,
                },
                step_replays: committed.map(|(s, _)| s.replays),
            }
        })
        .collect();
    let records = |r: Option<&RunResult>| {
        r.map(|r| r.steps.iter().map(|(s, _)| s.clone()).collect())
            .unwrap_or_default()
    };
    let disturbed_steps: Vec<StepRecord> = records(disturbed);
    ChaosReport {
        seed: scenario.seed,
        deadline_s: scenario.deadline.as_secs_f64(),
        steps: config.train.steps,
        workers: config.train.workers,
        collective_deadline_s: collective.as_secs_f64(),
        faults,
        restarts: restarts.len(),
        restarts_per_worker: (0..config.train.workers)
            .map(|w| restarts.iter().filter(|r| r.worker == w).count())
            .collect(),
        replays: disturbed_steps.iter().map(|s| s.replays).sum(),
        disturbed_steps,
        undisturbed_steps: records(undisturbed),
        disturbed_s: disturbed.map_or(0.0, |d| d.seconds),
        disk_bytes: disturbed.map_or([0, 0], |d| d.disk_bytes),
        undisturbed_s: undisturbed.map_or(0.0, |d| d.seconds),
        verdict,
        processes: None,
    }
}

/// How a disk fault showed: the calls it failed, slowed or cut short, and either the error the run
/// stopped with or how the tier carried on.
fn disk_detection(
    f: &crate::chaos::Fault,
    first: &crate::chaos::Firing,
    fired: usize,
    failed: Option<&(u64, String, f64)>,
) -> String {
    let on = format!("{} at step {}", first.detail, first.step);
    let what = match f.kind {
        FaultKind::ReadError | FaultKind::WriteError => {
            format!("{fired} attempt(s) in a row at {on} failed with EIO")
        }
        FaultKind::DiskFull => format!("{fired} attempt(s) at {on} failed with ENOSPC"),
        FaultKind::ShortRead => format!("{fired} pread(s) of {on} returned half of the bytes asked for"),
        FaultKind::Slow(d) => format!(
            "every read and write waited {} more from {on} on",
            humantime::format_duration(d)
        ),
        _ => format!("fired {fired} time(s), the first {on}"),
    };
    // Whether the tier got past it: a short read and a slow disk always do, an EIO when it failed
    // fewer attempts in a row than the I/O thread makes; a full disk never does.
    let attempts = crate::storage::tiers::disk::ATTEMPTS as usize;
    let recovered = match f.kind {
        FaultKind::ShortRead | FaultKind::Slow(_) => true,
        FaultKind::ReadError | FaultKind::WriteError => fired < attempts,
        _ => false,
    };
    match failed {
        _ if recovered => match f.kind {
            FaultKind::ReadError | FaultKind::WriteError => format!(
                "{what}; the I/O thread tried the call again (at most {attempts} attempts) and it went through: its \
                 step went on"
            ),
            FaultKind::ShortRead => format!("{what}; the tier read the rest with further preads: its step went on"),
            _ => format!("{what}; its step went on"),
        },
        Some((step, error, after)) => format!("{what}; step {step} failed after {after:.3} s: {error}"),
        None => format!("{what}; but the run did not stop"),
    }
}

impl ChaosReport {
    /// The verdict in one line.
    pub fn verdict_line(&self) -> String {
        match &self.verdict {
            Verdict::BitwiseEqual { tensors, values } => format!(
                "bitwise equal: {tensors} tensors ({values} values) of the model and optimizer state match the \
                 undisturbed run"
            ),
            Verdict::Differs { first } => format!("DIFFERS from the undisturbed run: {first}"),
            Verdict::Stopped { step, error, after_s } => {
                format!("stopped at step {step} after {after_s:.3} s: {error}")
            }
            Verdict::DeadlineExpired { waiting } => format!(
                "the overall deadline ({:.0} s) expired while waiting for {waiting}",
                self.deadline_s
            ),
        }
    }

    /// The report as Markdown (`chaos.md`).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str("# Chaos run\n\n");
        s.push_str(&format!(
            "Seed {}, {} steps on {} {}, collective deadline {:.3} s, overall deadline {:.0} s.\n\n",
            self.seed,
            self.steps,
            self.workers,
            if self.processes.is_some() {
                "worker processes (the undisturbed run on as many in-process workers)"
            } else {
                "in-process workers"
            },
            self.collective_deadline_s,
            self.deadline_s
        ));
        s.push_str(&format!("**Verdict:** {}\n\n", self.verdict_line()));
        if self.processes.is_some() {
            s.push_str(&format!(
                "The disturbed run took {:.2} s, the undisturbed one {:.2} s.\n\n",
                self.disturbed_s, self.undisturbed_s
            ));
        } else {
            s.push_str(&format!(
                "{} faults planned, {} fired; {} actor restarts; {} steps replayed. The disturbed run took {:.2} s, \
             the undisturbed one {:.2} s.\n\n",
                self.faults.len(),
                self.faults.iter().filter(|f| f.fired > 0).count(),
                self.restarts,
                self.replays,
                self.disturbed_s,
                self.undisturbed_s
            ));
        }
        if self.disk_bytes != [0, 0] {
            s.push_str(&format!(
                "The disturbed run's Disk tiers read {} and wrote {}.\n\n",
                crate::storage::tiers::format_bytes(self.disk_bytes[0]),
                crate::storage::tiers::format_bytes(self.disk_bytes[1])
            ));
        }
        if !self.faults.is_empty() {
            s.push_str(
                "| # | entry | actor | kind | step | moment | fired | at (s) | recovery (s) | replays | detection |\n",
            );
            s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
            for f in &self.faults {
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    f.index,
                    f.entry,
                    f.target,
                    f.kind,
                    f.step,
                    f.moment,
                    f.fired,
                    opt(f.fired_at_s),
                    opt(f.recovery_s),
                    f.step_replays.map_or("-".to_string(), |r| r.to_string()),
                    f.detection.replace('|', "/")
                ));
            }
        }
        if let Some(p) = &self.processes {
            s.push_str(&p.markdown());
        }
        s
    }
}
