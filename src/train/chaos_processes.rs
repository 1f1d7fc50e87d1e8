//! Chaos runs over worker processes (`semoe chaos --processes N`): the job trains on `semoe worker`
//! processes this run starts, while the scenario's process faults ([`crate::chaos::process`]) kill
//! them, stop them for a while, make them leave or start new ones, and its link faults disturb the
//! requests between them (carried to the processes in each epoch's `Setup`, fired in each
//! sender's transport, told back to the coordinator as they fire); then the same job runs
//! undisturbed on in-process workers (training is bitwise the same for any number of workers), and
//! the final states are compared.
//!
//! Why the coordinator delivers the faults: it started the processes and knows every step
//! boundary, so a fault at a boundary lands exactly there (the SIGKILL or SIGTERM is waited on until
//! the membership shows it, then the step starts), and a fault at a phase is given to its process at
//! spawn as the test hook [`crate::elastic::hooks::PAUSE`], which the worker carries out at that
//! exact point. The processes are started one at a time, so the `k`-th is member `k` and the plan's
//! worker indices name known processes. Every wait is bounded, the whole run keeps the scenario's
//! deadline, and every process is continued, killed if need be, and reaped however the run ends.

use super::chaos::{compare, one_run, set, ChaosReport, Progress, RunResult, StepRecord, Verdict};
use crate::chaos::PlannedFault;
use crate::chaos::{FaultKind, FaultPlan, Phase, ProcessFault, ProcessLayout, Scenario};
use crate::config::TrainConfig;
use crate::elastic::cluster::{Cluster, ExitWatch, LinkFiring, Status};
use crate::elastic::hooks;
use crate::elastic::protocol::LinkFault;
use crate::elastic::runtime::{ElasticOptions, ElasticRuntime, MembershipStats};
use crate::error::{Error, Result};
use crate::model::gpt::Gpt;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a boundary fault waits for the membership to show it (a SIGKILL seen by the exit
/// watch, a SIGTERM's leave notice, a new process admitted).
const SHOW_WAIT: Duration = Duration::from_secs(30);

/// How often the watcher looks at the hooks' files and the members.
const POLL: Duration = Duration::from_millis(5);

/// One process fault and what became of it.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessFaultReport {
    /// Its index in the plan.
    pub index: usize,
    /// Its `[[fault]]` entry.
    pub entry: usize,
    /// `kill`, `stop 300ms`, `leave` or `join`.
    pub kind: String,
    /// The worker's index in the epoch when it fired (`None`: a join).
    pub worker: Option<usize>,
    /// The process (0-based, in the order the run started them).
    pub process: usize,
    /// Its process id.
    pub pid: Option<u32>,
    /// Its member number.
    pub member: Option<u64>,
    /// The planned step.
    pub step: u64,
    /// `boundary`, `forward`, `backward` or `commit`.
    pub moment: String,
    /// Seconds from the start of the disturbed run to the injection (`None`: it did not fire).
    pub injected_at_s: Option<f64>,
    /// How the runtime noticed it, and how long that took.
    pub detection: String,
    /// Seconds from the injection to the membership showing it (lost, leaving, admitted).
    pub detected_after_s: Option<f64>,
    /// Seconds from the injection to the commit of its step.
    pub recovery_s: Option<f64>,
    /// Seconds the new epochs of its step took to form (from noticing to ready).
    pub reform_s: Vec<f64>,
    /// Steps replayed in its step (from the coordinator's in-memory copy).
    pub steps_replayed: u64,
    /// Bytes of committed state sent to workers as its step's epochs formed.
    pub state_bytes: u64,
    /// The membership epoch before its step and after it.
    pub epochs: [u64; 2],
    /// Workers in the epoch after its step.
    pub members_after: usize,
    /// How the process ended (`exit status: 0`, `signal: 9 (SIGKILL)`; `None`: it ran to the end).
    pub exit: Option<String>,
}

/// One link fault between worker processes and what became of it.
#[derive(Clone, Debug, Serialize)]
pub struct LinkFaultReport {
    /// Its index in the link plan.
    pub index: usize,
    /// Its `[[fault]]` entry.
    pub entry: usize,
    /// `drop`, `duplicate`, `delay 10ms`, `reorder`, `corrupt` or `partition 2s`.
    pub kind: String,
    /// The sending worker (its index in the epoch that first runs the step).
    pub from: usize,
    /// The receiving worker.
    pub to: usize,
    /// The step whose requests it hits.
    pub step: u64,
    /// How many times it fired, as the worker processes told the coordinator.
    pub fired: usize,
    /// Each firing: `(member that told it, epoch, step, seconds from the start of the disturbed
    /// run)`.
    pub firings: Vec<(u64, u64, u64, f64)>,
    /// What it did and how the runtime noticed.
    pub detection: String,
}

/// One membership epoch of the disturbed run.
#[derive(Clone, Debug, Serialize)]
pub struct EpochRecord {
    /// The epoch number.
    pub epoch: u64,
    /// Steps committed when it formed.
    pub step: u64,
    /// Its workers.
    pub workers: usize,
    /// Why it formed.
    pub why: String,
    /// Whether the kept workers kept their state and only what changed owner was sent (a join or
    /// leave), rather than every worker's whole share (the first epoch, a loss).
    pub handed_over: bool,
    /// Bytes of state sent to its workers.
    pub state_bytes_sent: u64,
}

/// What a chaos run over processes adds to the report.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    /// Worker processes started before the first step.
    pub processes: usize,
    /// Steps between the coordinator's in-memory copies (what a loss replays from).
    pub snapshot_every: u64,
    /// Every planned process fault.
    pub faults: Vec<ProcessFaultReport>,
    /// Every planned link fault (carried to the worker processes in their epochs' `Setup`).
    pub link_faults: Vec<LinkFaultReport>,
    /// The last epoch.
    pub epochs: u64,
    /// Workers that joined after the first epoch.
    pub joins: u64,
    /// Workers that left in good order.
    pub leaves: u64,
    /// Workers lost.
    pub crashes: u64,
    /// Steps replayed in all.
    pub replayed_steps: u64,
    /// Bytes of state sent to workers as epochs formed.
    pub state_bytes: u64,
    /// The epochs, in order.
    pub history: Vec<EpochRecord>,
    /// How each process ended: `(process, pid, status)`.
    pub exits: Vec<(usize, u32, String)>,
}

/// What the watcher and the driver know of one fault.
#[derive(Clone, Debug)]
struct Track {
    fault: ProcessFault,
    /// The hit process's pid, once known.
    pid: Option<u32>,
    /// A phased fault's hook file: the worker writes it at the point.
    hook: Option<PathBuf>,
    injected: Option<Instant>,
    detected: Option<(Instant, String)>,
    member: Option<u64>,
    /// When a stopped process was continued.
    continued: Option<Instant>,
}

/// The disturbed run's record of one fault's step.
#[derive(Clone, Debug, Default)]
struct StepDelta {
    epochs: [u64; 2],
    replayed: u64,
    state_bytes: u64,
    reform: Vec<f64>,
    members: usize,
}

/// The worker processes: continued, killed if need be, and reaped when dropped.
struct Children(Arc<Mutex<Vec<Child>>>);

impl Children {
    /// Continue every process (a stopped one could not exit), give them `grace` to end, kill the
    /// rest; each one's exit status by pid.
    fn finish(&self, grace: Duration) -> Vec<(u32, String)> {
        let mut all = lock(&self.0);
        for c in all.iter_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                signal(c.id(), libc::SIGCONT);
            }
        }
        let deadline = Instant::now() + grace;
        let mut out = Vec::new();
        for c in all.iter_mut() {
            let status = loop {
                match c.try_wait() {
                    Ok(Some(s)) => break s.to_string(),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                    _ => {
                        let _ = c.kill();
                        break match c.wait() {
                            Ok(s) => format!("{s} (killed at the end of the chaos run)"),
                            Err(e) => format!("cannot be reaped: {e}"),
                        };
                    }
                }
            };
            out.push((c.id(), status));
        }
        out
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.finish(Duration::from_secs(5));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn signal(pid: u32, signal: i32) -> bool {
    // SAFETY: kill(2) on a worker process this run started and has not reaped: the callers hold
    // its `Child` and saw it running (`signal_child`), so the pid cannot have been reused.
    unsafe { libc::kill(pid as i32, signal) == 0 }
}

/// Whether process `pid` is stopped (state `T` in `/proc/PID/stat`; where that cannot be read,
/// it is taken as stopped).
fn is_stopped(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "T"),
        Err(_) => true,
    }
}

/// Send `sig` to the child `pid` if it is still running (one that ended, and was reaped, is left
/// alone: its pid may belong to another process by now).
fn signal_child(children: &Mutex<Vec<Child>>, pid: u32, sig: i32) -> bool {
    let mut all = lock(children);
    match all.iter_mut().find(|c| c.id() == pid).map(|c| c.try_wait()) {
        Some(Ok(None)) => signal(pid, sig),
        _ => false,
    }
}

/// The lowest index not in `taken`.
fn lowest_free(taken: &[usize]) -> usize {
    (0..).find(|i| !taken.contains(i)).unwrap_or(taken.len())
}

/// The run's processes, and what it needs to start more.
struct Fleet {
    children: Arc<Mutex<Vec<Child>>>,
    /// Pid of each process, by its number.
    pids: Vec<u32>,
    /// The GPU each process was given (over NCCL), by its number.
    gpus: Vec<usize>,
    /// Whether the run exchanges over NCCL (the processes are given their GPU).
    nccl: bool,
    ticket: PathBuf,
    logs: PathBuf,
    threads: usize,
    tracks: Arc<Mutex<Vec<Track>>>,
    watch: ExitWatch,
}

impl Fleet {
    /// Process `number`'s Disk tier: a killed process cannot remove it, so the run does
    /// ([`Fleet::remove_scratch`]) once every process is reaped.
    fn scratch(&self, number: usize) -> PathBuf {
        self.logs.join(format!("process-{number}.tiers"))
    }

    fn remove_scratch(&self) {
        for number in 0..self.pids.len() {
            let _ = std::fs::remove_dir_all(self.scratch(number));
        }
    }

    /// Start process number `pids.len()` (with the hook of its phased fault, if any) and wait
    /// until it is a member.
    async fn spawn(&mut self) -> Result<u32> {
        let number = self.pids.len();
        let mut env = Vec::new();
        {
            let mut tracks = lock(&self.tracks);
            if let Some(t) = tracks
                .iter_mut()
                .find(|t| t.fault.process == number && t.fault.phase != Phase::Boundary)
            {
                let file = self.logs.join(format!("process-{number}.hook"));
                let action = if t.fault.kind == FaultKind::Kill {
                    "kill"
                } else {
                    "stop"
                };
                env.push((
                    hooks::PAUSE.to_string(),
                    format!(
                        "member=any,step={},phase={},file={},action={action}",
                        t.fault.step,
                        t.fault.phase.name(),
                        file.display()
                    ),
                ));
                t.hook = Some(file);
            }
        }
        let log = self.logs.join(format!("process-{number}.log"));
        let file = std::fs::File::create(&log).map_err(|e| Error::io("cannot create the worker log", &log, e))?;
        let scratch = self.scratch(number);
        // Over NCCL, the lowest GPU no running process holds (the first ones on GPU i, as `semoe
        // train --processes` starts them; a joiner on the GPU of a process that ended): two ranks
        // of one communicator cannot share a device, and a joiner's number may pass the devices.
        let gpu = {
            let mut children = lock(&self.children);
            let running: Vec<usize> = self
                .pids
                .iter()
                .zip(&self.gpus)
                .filter(|(pid, _)| {
                    children
                        .iter_mut()
                        .find(|c| c.id() == **pid)
                        .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
                })
                .map(|(_, &gpu)| gpu)
                .collect();
            lowest_free(&running)
        };
        let child = crate::train::engine::spawn_worker_with(
            &self.ticket,
            &scratch,
            self.threads,
            self.nccl.then_some(gpu),
            Stdio::from(file),
            &env,
        )?;
        let pid = child.id();
        lock(&self.children).push(child);
        self.pids.push(pid);
        self.gpus.push(gpu);
        for t in lock(&self.tracks).iter_mut() {
            if t.fault.process == number && t.fault.phase != Phase::Boundary {
                t.pid = Some(pid);
            }
        }
        let since = Instant::now();
        loop {
            if self.watch.member_of(pid).is_some() {
                return Ok(pid);
            }
            let ended = lock(&self.children)
                .iter_mut()
                .find(|c| c.id() == pid)
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = ended {
                return Err(Error::runtime(format!(
                    "worker process {number} (pid {pid}) ended ({status}) before it joined; its log: {}",
                    log.display()
                )));
            }
            if since.elapsed() > SHOW_WAIT {
                return Err(Error::runtime(format!(
                    "worker process {number} (pid {pid}) did not join within {} s; its log: {}",
                    SHOW_WAIT.as_secs(),
                    log.display()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Wait until process `pid`'s membership satisfies `shown`; the status then.
    async fn until(&self, pid: u32, what: &str, shown: impl Fn(&Status) -> bool) -> Result<Status> {
        let since = Instant::now();
        loop {
            if let Some((_, status)) = self.watch.member_of(pid) {
                if shown(&status) {
                    return Ok(status);
                }
            }
            if since.elapsed() > SHOW_WAIT {
                return Err(Error::runtime(format!(
                    "the membership did not show {what} of process {pid} within {} s",
                    SHOW_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Deliver the boundary fault `index`.
    async fn deliver(&mut self, index: usize) -> Result<()> {
        let fault = lock(&self.tracks)[index].fault.clone();
        if fault.kind == FaultKind::Join {
            let started = Instant::now();
            {
                let mut tracks = lock(&self.tracks);
                tracks[index].injected = Some(started);
            }
            let pid = self.spawn().await?;
            let member = self.watch.member_of(pid).map(|(id, _)| id);
            let mut tracks = lock(&self.tracks);
            let t = &mut tracks[index];
            t.pid = Some(pid);
            t.member = member;
            t.detected = Some((
                Instant::now(),
                format!(
                    "started before step {}; admitted as member {} (its handshake: token, versions, config, corpus, \
                     kernels)",
                    fault.step,
                    member.map_or("?".into(), |m| m.to_string())
                ),
            ));
            return Ok(());
        }
        let pid = *self.pids.get(fault.process).ok_or_else(|| {
            Error::runtime(format!(
                "the plan names process {}, which was never started",
                fault.process
            ))
        })?;
        let how = match fault.kind {
            FaultKind::Kill => libc::SIGKILL,
            FaultKind::Stop(_) => libc::SIGSTOP,
            _ => libc::SIGTERM,
        };
        let at = Instant::now();
        {
            let mut tracks = lock(&self.tracks);
            let t = &mut tracks[index];
            t.pid = Some(pid);
            t.member = self.watch.member_of(pid).map(|(id, _)| id);
            t.injected = Some(at);
        }
        if !signal_child(&self.children, pid, how) {
            return Err(Error::runtime(format!(
                "cannot signal worker process {} (pid {pid}): it had already ended",
                fault.process
            )));
        }
        // The change lands at this boundary: wait until the membership shows it (a long stop too:
        // its step must run in the epoch without it, as the link faults' plan counts it).
        match fault.kind {
            FaultKind::Kill => {
                self.until(pid, "the loss", |s| matches!(s, Status::Gone(_))).await?;
            }
            FaultKind::Stop(_) if fault.removes() => {
                self.until(pid, "the loss", |s| matches!(s, Status::Gone(_))).await?;
            }
            FaultKind::Leave => {
                self.until(pid, "the leave", |s| matches!(s, Status::Leaving | Status::Gone(_)))
                    .await?;
                let mut tracks = lock(&self.tracks);
                tracks[index].detected = Some((
                    Instant::now(),
                    "SIGTERM: the worker sent its leave notice; its state moves to the others at the step boundary"
                        .into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Watch the faults: a phased fault is injected when its hook file appears; a stopped process is
/// continued once its duration has passed; a kill or stop is detected when its member is gone.
async fn watcher(tracks: Arc<Mutex<Vec<Track>>>, watch: ExitWatch, children: Arc<Mutex<Vec<Child>>>) {
    loop {
        tokio::time::sleep(POLL).await;
        let now = Instant::now();
        for t in lock(&tracks).iter_mut() {
            let Some(pid) = t.pid else { continue };
            if t.injected.is_none() {
                // A stop counts from the moment the process is stopped (it writes the file first).
                let stopped = !matches!(t.fault.kind, FaultKind::Stop(_)) || is_stopped(pid);
                if stopped && t.hook.as_ref().is_some_and(|f| f.exists()) {
                    t.injected = Some(now);
                    t.member = watch.member_of(pid).map(|(id, _)| id);
                }
                continue;
            }
            let Some(injected) = t.injected else { continue };
            // A stopped process is lost only while it is stopped: a later end is not this fault's.
            let watching = match t.fault.kind {
                FaultKind::Kill => true,
                FaultKind::Stop(_) => t.continued.is_none(),
                _ => false,
            };
            if t.detected.is_none() && watching {
                if let Some((id, Status::Gone(why))) = watch.member_of(pid) {
                    t.member = Some(id);
                    t.detected = Some((now, why));
                }
            }
            if let (FaultKind::Stop(d), None) = (t.fault.kind, t.continued) {
                if now.saturating_duration_since(injected) >= d {
                    signal_child(&children, pid, libc::SIGCONT);
                    t.continued = Some(now);
                }
            }
        }
    }
}

/// What the disturbed run leaves.
struct ProcessRun {
    run: RunResult,
    stats: MembershipStats,
    deltas: Vec<Option<StepDelta>>,
    started: Instant,
}

async fn disturbed(
    config: &TrainConfig,
    fleet: &mut Fleet,
    progress: &Progress,
    started: Instant,
    ticket_cluster: Cluster,
    link_faults: Vec<LinkFault>,
) -> Result<ProcessRun> {
    let processes = config.train.processes;
    set(progress, "the disturbed run: starting the worker processes".into());
    for _ in 0..processes {
        fleet.spawn().await?;
    }
    let model = Gpt::init(&config.model, config.train.seed)?;
    let optimizer = crate::optimizer::for_model(&config.optimizer, &model)?;
    let options = ElasticOptions {
        snapshot_every: config.train.snapshot_every,
        min_workers: processes,
        wait: Duration::from_secs(60),
        link_faults,
    };
    set(progress, "the disturbed run: forming the first epoch".into());
    let mut rt = ElasticRuntime::start(ticket_cluster, config.clone(), model, optimizer, options).await?;
    let faults: Vec<ProcessFault> = lock(&fleet.tracks).iter().map(|t| t.fault.clone()).collect();
    let mut deltas: Vec<Option<StepDelta>> = vec![None; faults.len()];
    let mut steps = Vec::new();
    let mut failed = None;
    'steps: for step in 0..config.train.steps {
        for (i, f) in faults.iter().enumerate() {
            if f.step == step && f.phase == Phase::Boundary {
                set(
                    progress,
                    format!("the disturbed run: fault {i} ({}) before step {step}", f.kind_name()),
                );
                let t = Instant::now();
                // A fault the membership never showed stops the run, naming it (a verdict, not a
                // hang: every wait for it is bounded).
                if let Err(e) = fleet.deliver(i).await {
                    failed = Some((
                        step,
                        format!("process fault {i} ({}) before step {step}: {e}", f.kind_name()),
                        t.elapsed().as_secs_f64(),
                    ));
                    break 'steps;
                }
            }
        }
        set(
            progress,
            format!("the disturbed run: step {step} of {}", config.train.steps),
        );
        let before = rt.stats().clone();
        let t = Instant::now();
        match rt.step().await {
            Ok(o) => steps.push((
                StepRecord {
                    step,
                    replays: o.replays,
                    seconds: o.seconds,
                },
                Instant::now(),
            )),
            Err(e) => failed = Some((step, e.to_string(), t.elapsed().as_secs_f64())),
        }
        let after = rt.stats();
        for (i, f) in faults.iter().enumerate() {
            if f.step == step {
                deltas[i] = Some(StepDelta {
                    epochs: [before.epoch, after.epoch],
                    replayed: after.replayed_steps - before.replayed_steps,
                    state_bytes: after.state_bytes - before.state_bytes,
                    reform: after.recoveries_since(before.recoveries).to_vec(),
                    members: after.members,
                });
            }
        }
        if failed.is_some() {
            break;
        }
    }
    let state = if failed.is_none() {
        set(progress, "the disturbed run: gathering the state".into());
        let t = Instant::now();
        match rt.state().await {
            Ok((model, optimizer)) => Some(super::chaos::state_bits(&model, &optimizer)),
            Err(e) => {
                failed = Some((
                    config.train.steps,
                    format!("gathering the state: {e}"),
                    t.elapsed().as_secs_f64(),
                ));
                None
            }
        }
    } else {
        None
    };
    let stats = rt.stats().clone();
    set(progress, "the disturbed run: dismissing the workers".into());
    rt.shutdown("the chaos run is over").await?;
    Ok(ProcessRun {
        run: RunResult::new(steps, failed, state, started),
        stats,
        deltas,
        started,
    })
}

/// [`super::chaos::run_in`] for a job over worker processes (`train.processes > 0`).
/// What [`run_in`] refuses before it starts anything (see `chaos::preflight`).
pub(super) fn preflight(config: &TrainConfig, scenario: &Scenario) -> Result<()> {
    plans(config, scenario).map(|_| ())
}

/// The process faults and the link faults of a chaos run over processes, refused when the
/// scenario does not fit the job.
fn plans(config: &TrainConfig, scenario: &Scenario) -> Result<(Vec<ProcessFault>, FaultPlan, Vec<PlannedFault>)> {
    let t = &config.train;
    if t.identity.is_some() {
        return Err(Error::config(
            "a chaos run over processes makes its own job identity: leave train.identity unset",
        ));
    }
    let layout = ProcessLayout {
        steps: t.steps,
        processes: t.processes,
        // As the runtime: one worker per data group, beyond the groups one per expert.
        max_members: t.groups.max(config.model.experts).max(1),
    };
    if t.processes > layout.max_members {
        return Err(Error::config(format!(
            "a chaos run over {} processes: the job takes at most {} workers (one per data group, beyond them one \
             per expert)",
            t.processes, layout.max_members
        )));
    }
    let plan = scenario.process_plan(&layout)?;
    let (links, link_planned) = scenario.link_plan(&layout, &plan)?;
    let collective = Duration::from_secs_f64(t.deadline_s);
    for f in &plan {
        if let FaultKind::Stop(d) = f.kind {
            if !f.removes() && d >= collective {
                return Err(Error::config(format!(
                    "chaos scenario: fault[{}].duration: a straggler's stop ({}) must end before the collective \
                     deadline ({}: collective_deadline of the scenario, else train.deadline_s), or its step fails",
                    f.entry,
                    humantime::format_duration(d),
                    humantime::format_duration(collective)
                )));
            }
        }
    }
    Ok((plan, links, link_planned))
}

pub(super) fn run_in(config: &TrainConfig, scenario: &Scenario, dir: &Path) -> Result<ChaosReport> {
    let t = &config.train;
    let (plan, links, link_planned) = plans(config, scenario)?;
    let link_faults: Vec<LinkFault> = links
        .faults()
        .iter()
        .enumerate()
        .filter_map(|(i, f)| LinkFault::from_fault(i, f))
        .collect();
    let corpus = super::trainer::corpus_for(config)?;
    let digest = corpus.digest();
    let text = corpus.train;
    let logs = dir.join("workers");
    // The fault hook names its file in a variable of `,`- and `;`-separated text fields.
    if logs.to_str().is_none_or(|l| l.contains([',', ';'])) {
        return Err(Error::config(format!(
            "the chaos run's directory {} holds a ',' or ';', or is not UTF-8, which the worker processes' \
             fault hook cannot carry: choose another --run-dir",
            dir.display()
        )));
    }
    if logs.exists() {
        std::fs::remove_dir_all(&logs).map_err(|e| Error::io("cannot empty the workers' logs", &logs, e))?;
    }
    std::fs::create_dir_all(&logs).map_err(|e| Error::io("cannot create the workers' logs", &logs, e))?;
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("semoe-chaos")
        .enable_all()
        .build()
        .map_err(|e| Error::runtime(format!("cannot start the async runtime: {e}")))?;
    let progress: Progress = Arc::new(Mutex::new("nothing yet".into()));
    let begun = Instant::now();
    let deadline = scenario.deadline;
    let children = Children(Arc::new(Mutex::new(Vec::new())));
    let tracks = Arc::new(Mutex::new(
        plan.iter()
            .map(|f| Track {
                fault: f.clone(),
                pid: None,
                hook: None,
                injected: None,
                detected: None,
                member: None,
                continued: None,
            })
            .collect::<Vec<_>>(),
    ));
    let ticket = dir.join(super::engine::TICKET_FILE);
    let cluster = {
        let _guard = tokio.enter();
        Cluster::start(
            "127.0.0.1:0"
                .parse()
                .map_err(|e| Error::config(format!("127.0.0.1:0: {e}")))?,
            &ticket,
            config,
            &digest,
        )?
    };
    let watch = cluster.exit_watch();
    let mut fleet = Fleet {
        children: children.0.clone(),
        pids: Vec::new(),
        gpus: Vec::new(),
        nccl: t.exchange == crate::config::ExpertExchange::Nccl,
        ticket,
        logs,
        threads: crate::kernels::cpu::threads_each(t.threads, t.processes),
        tracks: tracks.clone(),
        watch: watch.clone(),
    };
    let exits_task = tokio.spawn(super::engine::watch_exits(children.0.clone(), watch.clone()));
    let watcher_task = tokio.spawn(watcher(tracks.clone(), watch, children.0.clone()));
    let disturbed = tokio.block_on(async {
        tokio::time::timeout(
            deadline,
            disturbed(config, &mut fleet, &progress, begun, cluster, link_faults),
        )
        .await
    });
    exits_task.abort();
    watcher_task.abort();
    // Continued, ended and reaped before anything else runs: none outlives the disturbed run.
    let exits = children.finish(Duration::from_secs(10));
    fleet.remove_scratch();
    let mut undisturbed = None;
    let verdict = match &disturbed {
        Err(_) => Verdict::DeadlineExpired {
            waiting: lock(&progress).clone(),
        },
        Ok(Err(e)) => {
            tokio.shutdown_timeout(Duration::from_millis(100));
            return Err(Error::runtime(format!(
                "the chaos run could not run its job over processes: {e} (worker logs: {})",
                fleet.logs.display()
            )));
        }
        Ok(Ok(d)) => match (&d.run.failed, &d.run.state) {
            (Some((step, error, after_s)), _) => Verdict::Stopped {
                step: *step,
                error: error.clone(),
                after_s: *after_s,
            },
            (None, None) => Verdict::Differs {
                first: "the disturbed run has no state".into(),
            },
            (None, Some(got)) => {
                // The same job undisturbed on in-process workers (as many as the processes).
                let mut job = config.clone();
                job.train.workers = job.train.processes;
                job.train.processes = 0;
                job.train.min_workers = 0;
                let left = deadline.saturating_sub(begun.elapsed());
                let tiers = dir.join("tiers");
                let baseline = tokio.block_on({
                    let (progress, text) = (progress.clone(), text.clone());
                    async move {
                        tokio::time::timeout(
                            left,
                            one_run("undisturbed", &job, &text, FaultPlan::none(), &progress, &tiers, None),
                        )
                        .await
                    }
                });
                match baseline {
                    Err(_) => Verdict::DeadlineExpired {
                        waiting: lock(&progress).clone(),
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
        },
    };
    tokio.shutdown_timeout(Duration::from_millis(100));
    let d = disturbed.ok().and_then(|r| r.ok());
    let tracks = lock(&tracks).clone();
    let links = link_reports(&link_planned, &fleet.watch.link_firings(), begun);
    Ok(report(
        scenario,
        config,
        &fleet.pids,
        &tracks,
        links,
        d.as_ref(),
        undisturbed.as_ref(),
        &exits,
        verdict,
    ))
}

/// What became of each planned link fault, from the firings the workers told (`started`: the
/// start of the disturbed run).
fn link_reports(planned: &[PlannedFault], firings: &[LinkFiring], started: Instant) -> Vec<LinkFaultReport> {
    planned
        .iter()
        .enumerate()
        .map(|(index, p)| {
            let (from, to) = match p.fault.target {
                crate::chaos::Target::Link { from, to } => (from, to),
                _ => (usize::MAX, usize::MAX),
            };
            let mine: Vec<&LinkFiring> = firings.iter().filter(|f| f.index as usize == index).collect();
            let kind = match p.fault.kind {
                FaultKind::Delay(d) => format!("delay {}", humantime::format_duration(d)),
                FaultKind::Partition(d) => format!("partition {}", humantime::format_duration(d)),
                FaultKind::Drop => "drop".into(),
                FaultKind::Duplicate => "duplicate".into(),
                FaultKind::Reorder => "reorder".into(),
                FaultKind::Corrupt => "corrupt".into(),
                other => format!("{other:?}"),
            };
            let what = match p.fault.kind {
                FaultKind::Drop => {
                    "the request was lost in the sender's transport; nothing answers it, so its requester misses \
                     the collective deadline (a deadline is not replayed: the run stops naming the worker)"
                }
                FaultKind::Duplicate => {
                    "the request went twice; the receiving Communicator served it once and dropped the copy"
                }
                FaultKind::Delay(_) => "the request left late; its reply is matched by id",
                FaultKind::Reorder => {
                    "the request went after the next packet on its link; nothing depends on arrival order"
                }
                FaultKind::Corrupt => {
                    "a byte of the request's frame was flipped after its checksum; the receiver's CRC-32 check \
                     refused it before decoding, and the coordinator evicted the sender (a new epoch, replayed \
                     from the in-memory copy)"
                }
                FaultKind::Partition(_) => {
                    "every packet between the two workers was lost for its duration (each end from its first \
                     request of the step); the requests across it miss their collective deadline"
                }
                _ => "not a link fault",
            };
            let detection = if mine.is_empty() {
                "did not fire: no request of its step went from `from` to `to` (the run stopped before, or the \
                 epoch had no such link)"
                    .to_string()
            } else {
                what.to_string()
            };
            LinkFaultReport {
                index,
                entry: p.entry,
                kind,
                from,
                to,
                step: p.fault.step,
                fired: mine.len(),
                firings: mine
                    .iter()
                    .map(|f| {
                        (
                            f.member,
                            f.epoch,
                            f.step,
                            f.at.saturating_duration_since(started).as_secs_f64(),
                        )
                    })
                    .collect(),
                detection,
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn report(
    scenario: &Scenario,
    config: &TrainConfig,
    pids: &[u32],
    tracks: &[Track],
    link_faults: Vec<LinkFaultReport>,
    disturbed: Option<&ProcessRun>,
    undisturbed: Option<&RunResult>,
    exits: &[(u32, String)],
    verdict: Verdict,
) -> ChaosReport {
    let exit_of = |pid: u32| exits.iter().find(|(p, _)| *p == pid).map(|(_, s)| s.clone());
    let since = |at: Instant| disturbed.map(|d| at.saturating_duration_since(d.started).as_secs_f64());
    let faults = tracks
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let f = &t.fault;
            let delta = disturbed.and_then(|d| d.deltas.get(index).cloned().flatten());
            let committed =
                disturbed.and_then(|d| d.run.steps.iter().find(|(s, _)| s.step == f.step).map(|(_, at)| *at));
            let exit = t.pid.and_then(exit_of);
            let after = |at: Instant| t.injected.map(|i| at.saturating_duration_since(i).as_secs_f64());
            let detected_after_s = t.detected.as_ref().and_then(|(at, _)| after(*at));
            let ms = |s: Option<f64>| s.map_or("?".to_string(), |s| format!("{:.0} ms", s * 1e3));
            let point = match f.phase {
                Phase::Boundary => format!("before step {}", f.step),
                p => format!("at the {} of step {} (the worker's own hook)", p.name(), f.step),
            };
            let exited = exit
                .as_deref()
                .map_or(String::new(), |e| format!("; the process ended: {e}"));
            let detection = match (f.kind, t.injected, &t.detected) {
                (_, None, _) => "did not fire: its point was not reached (the run stopped before, or the process \
                                 was gone)"
                    .to_string(),
                (FaultKind::Join, Some(_), Some((_, how))) => {
                    format!("{how} after {}", ms(detected_after_s))
                }
                (FaultKind::Leave, Some(_), Some((_, how))) => format!(
                    "{how} ({} after the SIGTERM); it was dismissed once its state moved{exited}",
                    ms(detected_after_s)
                ),
                (FaultKind::Kill, Some(_), Some((_, why))) => format!(
                    "SIGKILL {point}; {} after it the coordinator marked the member gone ({why}: the process exit \
                     watch){exited}",
                    ms(detected_after_s)
                ),
                (FaultKind::Stop(d), Some(_), Some((_, why))) => format!(
                    "SIGSTOP {point} for {}; {} after it the coordinator dropped the member ({why}); it never \
                     committed again{}",
                    humantime::format_duration(d),
                    ms(detected_after_s),
                    if exited.is_empty() {
                        String::new()
                    } else {
                        format!("; continued, it found it was no longer a member{exited}")
                    }
                ),
                (FaultKind::Stop(d), Some(_), None) => format!(
                    "SIGSTOP {point} for {}, then SIGCONT: a straggler, never lost (no new epoch); its step was only \
                     slower",
                    humantime::format_duration(d)
                ),
                (_, Some(_), _) => format!("injected {point}, but the membership never showed it{exited}"),
            };
            ProcessFaultReport {
                index,
                entry: f.entry,
                kind: f.kind_name(),
                worker: f.worker,
                process: f.process,
                pid: t.pid.or_else(|| pids.get(f.process).copied()),
                member: t.member,
                step: f.step,
                moment: f.phase.name().to_string(),
                injected_at_s: t.injected.and_then(since),
                detection,
                detected_after_s,
                recovery_s: match (t.injected, committed) {
                    (Some(i), Some(c)) => Some(c.saturating_duration_since(i).as_secs_f64()),
                    _ => None,
                },
                reform_s: delta.as_ref().map(|d| d.reform.clone()).unwrap_or_default(),
                steps_replayed: delta.as_ref().map_or(0, |d| d.replayed),
                state_bytes: delta.as_ref().map_or(0, |d| d.state_bytes),
                epochs: delta.as_ref().map_or([0, 0], |d| d.epochs),
                members_after: delta.as_ref().map_or(f.members_after, |d| d.members),
                exit,
            }
        })
        .collect();
    let stats = disturbed.map(|d| d.stats.clone()).unwrap_or_default();
    let records = |r: Option<&RunResult>| {
        r.map(|r| r.steps.iter().map(|(s, _)| s.clone()).collect())
            .unwrap_or_default()
    };
    let processes = ProcessReport {
        processes: config.train.processes,
        snapshot_every: config.train.snapshot_every,
        faults,
        link_faults,
        epochs: stats.epoch,
        joins: stats.joins,
        leaves: stats.leaves,
        crashes: stats.crashes,
        replayed_steps: stats.replayed_steps,
        state_bytes: stats.state_bytes,
        history: stats
            .history
            .iter()
            .map(|e| EpochRecord {
                epoch: e.epoch,
                step: e.step,
                workers: e.workers,
                why: e.why.clone(),
                handed_over: e.moved.handed_over,
                state_bytes_sent: e.moved.bytes,
            })
            .collect(),
        exits: pids
            .iter()
            .enumerate()
            .map(|(n, pid)| (n, *pid, exit_of(*pid).unwrap_or_default()))
            .collect(),
    };
    ChaosReport {
        seed: scenario.seed,
        deadline_s: scenario.deadline.as_secs_f64(),
        steps: config.train.steps,
        workers: config.train.processes,
        collective_deadline_s: config.train.deadline_s,
        faults: Vec::new(),
        restarts: 0,
        restarts_per_worker: Vec::new(),
        replays: stats.replayed_steps as u32,
        disturbed_steps: records(disturbed.map(|d| &d.run)),
        undisturbed_steps: records(undisturbed),
        disturbed_s: disturbed.map_or(0.0, |d| d.run.seconds),
        undisturbed_s: undisturbed.map_or(0.0, |u| u.seconds),
        disk_bytes: [0, 0],
        verdict,
        processes: Some(processes),
    }
}

impl ProcessReport {
    /// The process section of `chaos.md`.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "## Worker processes\n\n{} processes at the start; {} epochs: {} joined, {} left, {} lost; {} steps \
             replayed (an in-memory copy every {} steps); {} of state moved.\n\n",
            self.processes,
            self.epochs,
            self.joins,
            self.leaves,
            self.crashes,
            self.replayed_steps,
            self.snapshot_every,
            crate::storage::tiers::format_bytes(self.state_bytes)
        ));
        if !self.faults.is_empty() {
            s.push_str(
                "| # | entry | kind | worker | process (pid) | step | moment | at (s) | recovery (s) | replayed | \
                 state moved | epochs | detection |\n",
            );
            s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
            for f in &self.faults {
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} -> {} | {} |\n",
                    f.index,
                    f.entry,
                    f.kind,
                    f.worker.map_or("new".to_string(), |w| w.to_string()),
                    f.process,
                    f.pid.map_or("-".to_string(), |p| p.to_string()),
                    f.step,
                    f.moment,
                    opt(f.injected_at_s),
                    opt(f.recovery_s),
                    f.steps_replayed,
                    crate::storage::tiers::format_bytes(f.state_bytes),
                    f.epochs[0],
                    f.epochs[1],
                    f.detection.replace('|', "/")
                ));
            }
            s.push('\n');
        }
        if !self.link_faults.is_empty() {
            s.push_str(
                "| # | entry | link fault | from -> to | step | fired | what it did |\n|---|---|---|---|---|---|---|\n",
            );
            for f in &self.link_faults {
                s.push_str(&format!(
                    "| {} | {} | {} | {} -> {} | {} | {} | {} |\n",
                    f.index,
                    f.entry,
                    f.kind,
                    f.from,
                    f.to,
                    f.step,
                    f.fired,
                    f.detection.replace('|', "/")
                ));
            }
            s.push('\n');
        }
        s.push_str("| epoch | at step | workers | why | state sent |\n|---|---|---|---|---|\n");
        for e in &self.history {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} ({}) |\n",
                e.epoch,
                e.step,
                e.workers,
                e.why.replace('|', "/"),
                crate::storage::tiers::format_bytes(e.state_bytes_sent),
                if e.handed_over { "handed over" } else { "whole shares" }
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::lowest_free;

    #[test]
    fn a_joiner_takes_the_gpu_of_a_process_that_ended() {
        assert_eq!(lowest_free(&[]), 0);
        assert_eq!(lowest_free(&[0, 1]), 2);
        // Process 0 (GPU 0) was killed; process 1 still runs on GPU 1: process 2 gets GPU 0.
        assert_eq!(lowest_free(&[1]), 0);
        assert_eq!(lowest_free(&[2, 0]), 1);
    }
}
