//! Process faults: what a chaos run over worker processes (`semoe chaos --processes N`) does to
//! the processes themselves: SIGKILL one, SIGSTOP it for a while then SIGCONT (a straggler), make
//! it leave in good order (SIGTERM), or start a new one that joins.
//!
//! Why a plan of its own: the in-process faults of [`super::FaultPlan`] fire inside actors, where
//! a step and a moment are known; a process fault is delivered from outside, by the coordinator
//! that started the processes, so it is planned against the membership instead. The plan is
//! resolved before the run: the scenario names a worker by its index in the epoch when the fault
//! fires, and [`Scenario::process_plan`] follows the membership the scripted faults make (a kill,
//! a leave or a long stop removes a worker, a join adds one at the end) to find which process
//! that is. The chaos run starts its processes one at a time, so process `k` is the `k`-th member
//! and the epoch's worker order (member order, oldest first) is known in advance.
//!
//! A fault at a step boundary (`moment = "boundary"`, the default) is delivered by the coordinator
//! after the step before it committed: a SIGKILL, a SIGTERM or a long stop's SIGSTOP is waited on
//! until the membership shows it, so that the change lands exactly at that step. A fault at a phase (`forward`, `backward`,
//! `commit`) is carried out by the worker itself through the test hook
//! [`crate::elastic::hooks::PAUSE`] (it SIGKILLs or SIGSTOPs itself at that exact point); the
//! coordinator continues a stopped one after its `duration`. No timing depends on a sleep except a
//! stop's own duration.
//!
//! Link faults between the processes are planned against the same membership
//! ([`Scenario::link_plan`]): their `from` and `to` are worker indices of the epoch that first runs
//! their step. The coordinator hands them to the processes with each epoch's setup (only those of
//! steps not yet attempted, so a step replayed after a loss runs without them), and each process
//! fires them in its own transport, as in process (`chaos::net::FaultyTransport`).
//!
//! In code (what `semoe chaos --processes 2` plans for a scenario file with the same entries):
//!
//! ```
//! use semoe::chaos::{FaultKind, FaultSpec, Phase, ProcessLayout, Scenario};
//! use std::time::Duration;
//!
//! # fn main() -> semoe::Result<()> {
//! let scenario = Scenario::builder()
//!     .fault(FaultSpec::process().kind(FaultKind::Join).at(2))
//!     .fault(FaultSpec::process().worker(0).at(3).phase(Phase::Forward))
//!     .fault(FaultSpec::process().kind(FaultKind::Stop(Duration::from_millis(300))).worker(1).at(5))
//!     .build()?;
//! let layout = ProcessLayout { steps: 8, processes: 2, max_members: 4 };
//! let plan = scenario.process_plan(&layout)?;
//! // The join starts process 2; the kill hits process 0 (the oldest); then worker 1 is process 2.
//! assert_eq!(plan.iter().map(|f| f.process).collect::<Vec<_>>(), vec![2, 0, 2]);
//! # Ok(())
//! # }
//! ```

use super::scenario::{draw, ActorKind, FaultSpec, Layout, PlannedFault, Scenario, When};
use super::{FaultKind, FaultPlan};
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// The longest stop that is a straggler: well below the control connection's idle timeout
/// (the QUIC idle timeout, 1.5 s), so the worker is only slow.
pub const STRAGGLER_MAX: Duration = Duration::from_secs(1);

/// The shortest stop that drops the worker: well past the idle timeout, so the coordinator has
/// lost it before it is continued. Stops between [`STRAGGLER_MAX`] and this are refused: either
/// outcome could happen.
pub const DROPPED_MIN: Duration = Duration::from_secs(3);

/// Where in a step a process fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Before the step begins (after the step before it committed): delivered by the coordinator.
    Boundary,
    /// When the worker receives the first expert forward packet of the step.
    Forward,
    /// When the worker receives the first expert backward packet of the step.
    Backward,
    /// When the worker receives the step's commit (after it prepared).
    Commit,
}

impl Phase {
    /// The name in a scenario file (and in the hook).
    pub fn name(self) -> &'static str {
        match self {
            Phase::Boundary => "boundary",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Commit => "commit",
        }
    }

    /// Parse a scenario file's `moment` of a process fault.
    pub fn parse(text: &str) -> Option<Phase> {
        match text {
            "boundary" => Some(Phase::Boundary),
            "forward" => Some(Phase::Forward),
            "backward" => Some(Phase::Backward),
            "commit" => Some(Phase::Commit),
            _ => None,
        }
    }
}

/// What a process plan is made against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessLayout {
    /// Steps of the run.
    pub steps: u64,
    /// Worker processes started before the first step.
    pub processes: usize,
    /// The most workers an epoch takes (one per data group, beyond them one per expert).
    pub max_members: usize,
}

/// One planned process fault.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessFault {
    /// Its `[[fault]]` entry.
    pub entry: usize,
    /// [`FaultKind::Kill`], [`FaultKind::Stop`], [`FaultKind::Leave`] or [`FaultKind::Join`].
    pub kind: FaultKind,
    /// The step (0-based).
    pub step: u64,
    /// Where in the step.
    pub phase: Phase,
    /// The worker's index in the epoch when it fires (`None` for a join).
    pub worker: Option<usize>,
    /// The process it hits: the run's `process`-th process (0-based, in the order they were
    /// started; a join's is the new one).
    pub process: usize,
    /// Workers in the epoch after it, as planned.
    pub members_after: usize,
}

impl ProcessFault {
    /// Whether the worker it hits is no longer a member afterwards.
    pub fn removes(&self) -> bool {
        match self.kind {
            FaultKind::Kill | FaultKind::Leave => true,
            FaultKind::Stop(d) => d >= DROPPED_MIN,
            _ => false,
        }
    }

    /// The kind in words: `kill`, `stop 300ms`, `leave`, `join`.
    pub fn kind_name(&self) -> String {
        match self.kind {
            FaultKind::Kill => "kill".into(),
            FaultKind::Stop(d) => format!("stop {}", humantime::format_duration(d)),
            FaultKind::Leave => "leave".into(),
            FaultKind::Join => "join".into(),
            other => format!("{other:?}"),
        }
    }
}

/// Check a process entry on its own (called by the scenario's entry check).
pub(crate) fn check(spec: &FaultSpec, at: &str) -> Result<()> {
    let bad = |key: &str, why: String| Err(Error::config(format!("chaos scenario: {at}.{key}: {why}")));
    let given = [
        ("block", spec.block.is_some()),
        ("expert", spec.expert.is_some()),
        ("from", spec.from.is_some()),
        ("to", spec.to.is_some()),
    ];
    if let Some((key, _)) = given.iter().find(|(_, set)| *set) {
        return bad(
            key,
            format!("process faults do not take `{key}` (they hit a whole worker process: name it with `worker`)"),
        );
    }
    if spec.moment.is_some() {
        return bad(
            "moment",
            "a process fault's moment is boundary, forward, backward or commit".into(),
        );
    }
    if let When::Random(p) = spec.when {
        if !(p > 0.0 && p <= 1.0) {
            return bad("probability", format!("{p} is not in (0, 1]"));
        }
    }
    if spec.times != 1 {
        return bad(
            "times",
            "a process fault fires once (give another entry for another)".into(),
        );
    }
    match spec.kind {
        FaultKind::Kill => {}
        FaultKind::Stop(d) => {
            if d.is_zero() {
                return bad("duration", "a stop lasts a positive time".into());
            }
            if d > STRAGGLER_MAX && d < DROPPED_MIN {
                return bad(
                    "duration",
                    format!(
                        "{} is too close to the control connection's idle timeout (1.5 s) to say whether the \
                         worker is dropped: give at most {} (a straggler, only slow) or at least {} (dropped)",
                        humantime::format_duration(d),
                        humantime::format_duration(STRAGGLER_MAX),
                        humantime::format_duration(DROPPED_MIN)
                    ),
                );
            }
        }
        FaultKind::Leave | FaultKind::Join if spec.phase.is_some_and(|p| p != Phase::Boundary) => {
            return bad(
                "moment",
                format!(
                    "a {} takes effect at a step boundary: only `boundary`",
                    if spec.kind == FaultKind::Join { "join" } else { "leave" }
                ),
            );
        }
        FaultKind::Leave => {}
        FaultKind::Join if spec.worker.is_some() => {
            return bad(
                "worker",
                "a join starts a new worker process: it names none (it becomes the last worker)".into(),
            );
        }
        FaultKind::Join => {}
        _ => return bad("kind", "a process fault is kill, stop, leave or join".into()),
    }
    Ok(())
}

impl Scenario {
    /// The process faults for a run over worker processes: every scripted one, and every random
    /// one drawn from the seed, in the order they fire, each resolved to the process it hits. A
    /// scripted fault the membership cannot take (a worker the epoch does not have then, a join
    /// past the most workers, a fault that would leave no worker, a second phased fault on one
    /// process) is an error naming its entry and key; a random one is left out. Entries of other
    /// actors are refused: a run over processes takes only process faults (and link faults, which
    /// [`Scenario::link_plan`] plans against this membership).
    pub fn process_plan(&self, layout: &ProcessLayout) -> Result<Vec<ProcessFault>> {
        if layout.steps == 0 {
            return Err(Error::config("a chaos run needs at least one step"));
        }
        if layout.processes == 0 {
            return Err(Error::config("a chaos run over processes needs --processes 1 or more"));
        }
        // (step, phase, entry, rng of the entry): every firing, sorted by when it fires.
        let mut firings: Vec<(u64, Phase, usize)> = Vec::new();
        let mut rngs = Vec::new();
        for (entry, spec) in self.faults.iter().enumerate() {
            let at = format!("fault[{entry}]");
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(entry as u64);
            // Link faults are planned by `link_plan`, against the membership planned here.
            if spec.actor == ActorKind::Link {
                rngs.push(rng);
                continue;
            }
            if spec.actor != ActorKind::Process {
                return Err(Error::config(format!(
                    "chaos scenario: {at}.actor: a chaos run over worker processes (--processes) takes only process \
                     and link faults; {} faults run on in-process workers (--workers, without --processes): the \
                     actors of a worker process are not reachable from the coordinator's fault plan",
                    spec.actor.name()
                )));
            }
            let phase = spec.phase.unwrap_or(Phase::Boundary);
            match spec.when {
                When::At(step) if step >= layout.steps => {
                    return Err(Error::config(format!(
                        "chaos scenario: {at}.step: step {step} is past the run's last step ({})",
                        layout.steps - 1
                    )))
                }
                When::At(step) => firings.push((step, phase, entry)),
                When::Random(p) => {
                    for step in 0..layout.steps {
                        if rng.random_bool(p) {
                            firings.push((step, phase, entry));
                        }
                    }
                }
            }
            rngs.push(rng);
        }
        firings.sort();
        // The processes that are members, in member order (oldest first).
        let mut members: Vec<usize> = (0..layout.processes).collect();
        let mut next = layout.processes;
        let mut phased: Vec<(usize, usize)> = Vec::new();
        let mut plan = Vec::new();
        for (step, phase, entry) in firings {
            let spec = &self.faults[entry];
            let at = format!("fault[{entry}]");
            let scripted = matches!(spec.when, When::At(_));
            let refuse = |key: &str, why: String| Error::config(format!("chaos scenario: {at}.{key}: {why}"));
            if spec.kind == FaultKind::Join {
                if members.len() >= layout.max_members {
                    if scripted {
                        return Err(refuse(
                            "kind",
                            format!(
                                "a join before step {step} would make {} workers, but the job takes at most {} (one \
                                 per data group, beyond them one per expert)",
                                members.len() + 1,
                                layout.max_members
                            ),
                        ));
                    }
                    continue;
                }
                members.push(next);
                plan.push(ProcessFault {
                    entry,
                    kind: spec.kind,
                    step,
                    phase,
                    worker: None,
                    process: next,
                    members_after: members.len(),
                });
                next += 1;
                continue;
            }
            let worker = match spec.worker {
                Some(w) if w >= members.len() => {
                    if scripted {
                        return Err(refuse(
                            "worker",
                            format!(
                                "worker {w} does not exist at step {step}: the epoch then has {} workers (0 to {})",
                                members.len(),
                                members.len().saturating_sub(1)
                            ),
                        ));
                    }
                    continue;
                }
                Some(w) => w,
                None => rngs[entry].random_range(0..members.len()),
            };
            let fault = ProcessFault {
                entry,
                kind: spec.kind,
                step,
                phase,
                worker: Some(worker),
                process: members[worker],
                members_after: members.len(),
            };
            if fault.removes() && members.len() == 1 {
                if scripted {
                    return Err(refuse(
                        "worker",
                        format!(
                            "at step {step} worker {worker} is the only one: without it the run would wait for a \
                             worker to join (add a join before it)"
                        ),
                    ));
                }
                continue;
            }
            if matches!(phase, Phase::Forward | Phase::Backward) && members.len() < 2 {
                if scripted {
                    return Err(refuse(
                        "moment",
                        format!(
                            "a lone worker receives no expert packets: at step {step} the epoch has one worker (use \
                             `boundary` or `commit`)"
                        ),
                    ));
                }
                continue;
            }
            if phase != Phase::Boundary {
                if let Some((_, other)) = phased.iter().find(|(p, _)| *p == fault.process) {
                    if scripted {
                        return Err(refuse(
                            "moment",
                            format!(
                                "fault[{other}] already hits the same worker process at a phase; a process takes \
                                 one phased fault (use `boundary` for this one)"
                            ),
                        ));
                    }
                    continue;
                }
                phased.push((fault.process, entry));
            }
            let mut fault = fault;
            if fault.removes() {
                members.remove(worker);
            }
            fault.members_after = members.len();
            plan.push(fault);
        }
        Ok(plan)
    }

    /// The link faults for a run over worker processes, against the membership `processes` (this
    /// scenario's [`Scenario::process_plan`]) makes: a link fault's `from` and `to` are worker
    /// indices of the epoch that first runs its step (after that step's boundary faults; a worker
    /// a phased fault removes during the step still counts in it). A scripted link fault naming a
    /// worker that epoch does not have, or on an epoch of one worker, is an error naming its entry
    /// and key (a random one is left out); what an entry leaves out is drawn from the seed among
    /// that epoch's workers. A corrupt link fault evicts its sender, a membership change the
    /// process plan cannot foresee, so process faults after a scripted one are refused (a random one
    /// is left out before the last process fault); the epochs after it have one worker fewer, and
    /// the indices above the sender's shift, so link faults at later steps are refused too (random
    /// ones left out). Also returns each planned fault with its entry, in plan order (the plan's
    /// indices).
    pub fn link_plan(
        &self,
        layout: &ProcessLayout,
        processes: &[ProcessFault],
    ) -> Result<(FaultPlan, Vec<PlannedFault>)> {
        // Workers of the epoch that first runs `step`.
        let workers_at = |step: u64| {
            processes
                .iter()
                .rfind(|f| f.step < step || (f.step == step && f.phase == Phase::Boundary))
                .map_or(layout.processes, |f| f.members_after)
        };
        let mut planned: Vec<PlannedFault> = Vec::new();
        for (entry, spec) in self.faults.iter().enumerate() {
            if spec.actor != ActorKind::Link {
                continue;
            }
            let at = format!("fault[{entry}]");
            let refuse = |key: &str, why: String| Error::config(format!("chaos scenario: {at}.{key}: {why}"));
            let scripted = matches!(spec.when, When::At(_));
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(entry as u64);
            let steps: Vec<u64> = match spec.when {
                When::At(step) if step >= layout.steps => {
                    return Err(refuse(
                        "step",
                        format!("step {step} is past the run's last step ({})", layout.steps - 1),
                    ))
                }
                When::At(step) => vec![step],
                When::Random(p) => (0..layout.steps).filter(|_| rng.random_bool(p)).collect(),
            };
            for step in steps {
                let workers = workers_at(step);
                let named = [("from", spec.from), ("to", spec.to)]
                    .into_iter()
                    .find_map(|(key, w)| w.filter(|&w| w >= workers).map(|w| (key, w)));
                if workers < 2 || named.is_some() {
                    if !scripted {
                        continue;
                    }
                    return Err(match named {
                        Some((key, w)) => refuse(
                            key,
                            format!(
                                "worker {w} does not exist at step {step}: the epoch then has {workers} workers (0 to \
                                 {})",
                                workers.saturating_sub(1)
                            ),
                        ),
                        None => refuse(
                            "actor",
                            format!("a link fault needs 2 or more workers: at step {step} the epoch has one"),
                        ),
                    });
                }
                if spec.kind == FaultKind::Corrupt {
                    if let Some(later) = processes
                        .iter()
                        .find(|f| f.step > step || (f.step == step && f.phase != Phase::Boundary))
                    {
                        // A random one is drawn only where no process fault follows (refusing it
                        // would refuse whichever seeds happened to draw an early step).
                        if !scripted {
                            continue;
                        }
                        return Err(refuse(
                            "kind",
                            format!(
                                "a corrupt link fault at step {step} evicts its sender, which the plan of fault[{}] (a \
                                 process fault at step {}) cannot foresee: a run over processes takes no process fault \
                                 after a corrupt one",
                                later.entry, later.step
                            ),
                        ));
                    }
                }
                let shape = Layout {
                    steps: layout.steps,
                    workers,
                    moe_blocks: Vec::new(),
                    experts: 0,
                };
                let fault = draw(spec, step, &shape, &mut rng);
                planned.push(PlannedFault { entry, fault });
            }
        }
        // The first corrupt fault evicts its sender: a link fault at a later step would hit
        // another pair than its indices name (or none). A random corrupt drawn before a scripted
        // fault's step is left out (refusing it would refuse whichever seeds drew an early step).
        let scripted = |p: &PlannedFault| matches!(self.faults[p.entry].when, When::At(_));
        let last_scripted = planned.iter().filter(|p| scripted(p)).map(|p| p.fault.step).max();
        planned.retain(|p| {
            scripted(p) || p.fault.kind != FaultKind::Corrupt || last_scripted.is_none_or(|s| p.fault.step >= s)
        });
        let first_corrupt = planned
            .iter()
            .filter(|p| p.fault.kind == FaultKind::Corrupt)
            .min_by_key(|p| p.fault.step)
            .map(|p| (p.entry, p.fault.step));
        if let Some((corrupt_entry, corrupt_step)) = first_corrupt {
            if let Some(after) = planned.iter().find(|p| p.fault.step > corrupt_step && scripted(p)) {
                return Err(Error::config(format!(
                    "chaos scenario: fault[{}].step: a link fault at step {} follows the corrupt link fault of \
                     fault[{corrupt_entry}] at step {corrupt_step}, which evicts its sender: the workers' indices \
                     after it are not the plan's, so a run over processes takes no link fault after a corrupt one",
                    after.entry, after.fault.step
                )));
            }
            planned.retain(|p| p.fault.step <= corrupt_step);
        }
        let plan = FaultPlan::none();
        for p in &planned {
            plan.push(p.fault.clone());
        }
        Ok((plan, planned))
    }
}
