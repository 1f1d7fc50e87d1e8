//! Fault plans: make chosen actors fail at chosen moments, to test that the runtime repairs them.
//!
//! A [`FaultPlan`] is shared by every actor of a runtime. Each actor asks it, at its injection
//! points, whether to fail now; a fault fires a given number of times and is then spent. With an
//! empty plan (the default) the checks cost one lock of an empty list.
//!
//! The plan also keeps a log of what happened to it: each firing (which fault, at which step and
//! moment, when) and each actor restart the workers' supervisors reported, so that a chaos run can
//! say how every fault was detected and how long the repair took. A [`Scenario`] (a TOML file or
//! [`Scenario::builder`]) describes faults, scripted or drawn from a seed, and turns into a plan.
//! Network faults ([`Target::Link`]) are injected by [`net::FaultyTransport`], which the runtime
//! wraps around its in-process transport when the plan has any (and each worker process of a
//! chaos run over processes around its data plane's transport, with the link faults its epoch's
//! `Setup` carries; [`FaultPlan::observe`] tells the coordinator of each firing). Disk faults ([`Target::Disk`])
//! are injected by the plan itself, as the [`DiskFaults`] hook the runtime gives the workers'
//! Disk tiers when the plan has any; they fire once the workers have begun their step (the plan
//! is told each step's start: [`FaultPlan::begin_step`]).

pub mod net;
pub mod process;
pub mod scenario;

pub use process::{Phase, ProcessFault, ProcessLayout};
pub use scenario::{ActorKind, FaultSpec, Layout, PlannedFault, Scenario, ScenarioBuilder, When};

use crate::storage::tiers::disk::{DiskFaults, DiskOp, InjectedIo};
use crate::storage::tiers::UnitId;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which actor a fault hits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The Expert actor of `expert` in MoE block `block`.
    Expert {
        /// Block index.
        block: usize,
        /// Expert index.
        expert: usize,
    },
    /// The Gate actor of MoE block `block` on `worker`.
    Gate {
        /// Worker index.
        worker: usize,
        /// Block index.
        block: usize,
    },
    /// The Ledger actor of `worker` (when it receives gradients).
    Ledger {
        /// Worker index.
        worker: usize,
    },
    /// The Communicator of `worker` stops answering requests from peers (a hung peer).
    Silence {
        /// Worker index.
        worker: usize,
    },
    /// The requests `from` sends `to` (a network fault: drop, duplicate, delay, reorder, corrupt,
    /// partition).
    Link {
        /// The sending worker (between worker processes: its index in the epoch that first runs
        /// the fault's step).
        from: usize,
        /// The receiving worker (likewise).
        to: usize,
    },
    /// The reads and writes of `worker`'s Disk tier (its slot file).
    Disk {
        /// Worker index.
        worker: usize,
    },
    /// The checkpoint a chaos run writes after the fault's step.
    Checkpoint,
    /// The Communicator actor of `worker` (when it is asked to send an exchange).
    Communicator {
        /// Worker index.
        worker: usize,
    },
}

/// When in a step the fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// During the forward pass.
    Forward,
    /// During the backward pass.
    Backward,
    /// Any time the actor is asked.
    Any,
}

/// How the actor (or, for a [`Target::Link`], the network) fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Its handler returns an error.
    Error,
    /// Its handler panics.
    Panic,
    /// The request is lost.
    Drop,
    /// The request arrives twice.
    Duplicate,
    /// The request arrives this much later.
    Delay(std::time::Duration),
    /// The request arrives after the next one on its link.
    Reorder,
    /// A disk read fails with `EIO` (each firing fails one attempt of one read).
    ReadError,
    /// A disk write fails with `EIO` (each firing fails one attempt of one write).
    WriteError,
    /// A disk write fails with `ENOSPC`: the disk is full.
    DiskFull,
    /// A disk read returns half of the bytes asked for (the tier reads the rest).
    ShortRead,
    /// Every disk read and write waits this long first, from the fault's step to the end of the
    /// run (a slow disk).
    Slow(Duration),
    /// A checkpoint's save fails halfway through its optimizer file (a writer that dies there).
    Interrupt,
    /// A byte of a checkpoint's model file is flipped on disk after the save; for a link, the
    /// request's bytes are damaged on the way (in process, modelled as a request the receiver
    /// cannot decode; between worker processes a byte of its frame is flipped, and the frame's
    /// checksum refuses it).
    Corrupt,
    /// Every packet between the link's two workers, both ways, is lost for this long, from the
    /// first request of the fault's step on the link.
    Partition(Duration),
    /// A worker process is killed (SIGKILL).
    Kill,
    /// A worker process is stopped (SIGSTOP) this long, then continued (SIGCONT).
    Stop(Duration),
    /// A worker process leaves in good order (SIGTERM: it asks to leave at the next boundary).
    Leave,
    /// A new worker process is started and joins at the step boundary.
    Join,
}

impl FaultKind {
    /// Whether it is a fault of the Disk tier.
    pub fn is_disk(self) -> bool {
        matches!(
            self,
            FaultKind::ReadError
                | FaultKind::WriteError
                | FaultKind::DiskFull
                | FaultKind::ShortRead
                | FaultKind::Slow(_)
        )
    }

    /// Whether it is a fault of a worker process.
    pub fn is_process(self) -> bool {
        matches!(
            self,
            FaultKind::Kill | FaultKind::Stop(_) | FaultKind::Leave | FaultKind::Join
        )
    }

    /// The direction of the disk I/O it hits (`None`: both, or not a disk fault).
    fn disk_op(self) -> Option<DiskOp> {
        match self {
            FaultKind::ReadError | FaultKind::ShortRead => Some(DiskOp::Read),
            FaultKind::WriteError | FaultKind::DiskFull => Some(DiskOp::Write),
            _ => None,
        }
    }
}

/// One planned fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The actor.
    pub target: Target,
    /// The training step (0-based: the step being computed).
    pub step: u64,
    /// The moment in the step.
    pub moment: Moment,
    /// Error or panic.
    pub kind: FaultKind,
    /// How many more times it fires.
    pub times: u32,
}

/// One firing of a planned fault.
#[derive(Clone, Debug, PartialEq)]
pub struct Firing {
    /// The fault's index in the plan (the order it was added in).
    pub fault: usize,
    /// The step it fired at.
    pub step: u64,
    /// The moment the actor was asked at (for a silence: [`Moment::Any`], the first request
    /// the silent communicator left unanswered).
    pub moment: Moment,
    /// When.
    pub at: Instant,
    /// What it hit, when the fault's target does not say it all (a disk fault: the read or write
    /// and the expert unit); empty otherwise.
    pub detail: String,
}

/// An actor restart, as a worker's supervisor reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct Restart {
    /// The worker that restarted its child.
    pub worker: usize,
    /// What kind of actor: `expert`, `gate`, `ledger` or `communicator`.
    pub actor: &'static str,
    /// The actor as a fault target.
    pub target: Option<Target>,
    /// When the supervisor saw the failure.
    pub at: Instant,
}

/// What [`FaultPlan::observe`] calls with each firing.
type OnFiring = Arc<dyn Fn(&Firing) + Send + Sync>;

/// Told of each firing as it happens (under the plan's lock: it must only queue the news).
#[derive(Clone, Default)]
struct Observer(Option<OnFiring>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Observer(set)"
        } else {
            "Observer(none)"
        })
    }
}

impl Observer {
    fn tell(&self, firing: &Firing) {
        if let Some(f) = &self.0 {
            f(firing);
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    observer: Observer,
    faults: Vec<Fault>,
    /// Whether each fault (by index) fired at least once (a silence fires once and stays).
    fired: Vec<bool>,
    firings: Vec<Firing>,
    restarts: Vec<Restart>,
    /// For each fault (by index), the expert unit a disk fault first hit: its later firings hit
    /// only that unit's calls, so that `times = 3` fails one read three times in a row (its
    /// retries included) rather than three reads once.
    pinned: Vec<Option<UnitId>>,
    /// For each fault (by index), when a partition began.
    since: Vec<Option<Instant>>,
    /// For each fault (by index), the step attempt an actor's firing last failed
    /// ([`FaultPlan::fire_in_attempt`]).
    attempt: Vec<Option<crate::net::StepId>>,
}

/// The faults to inject, shared by all actors of a runtime.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    inner: Arc<Mutex<Inner>>,
    /// The latest step a worker began, plus one (0: none yet, so that the Disk tier's writes at
    /// start-up, before any step, are never disturbed).
    begun: Arc<AtomicU64>,
}

impl FaultPlan {
    /// A plan with no faults.
    pub fn none() -> Self {
        FaultPlan::default()
    }

    /// Add a fault that fires once.
    pub fn with(self, target: Target, step: u64, moment: Moment, kind: FaultKind) -> Self {
        self.push(Fault {
            target,
            step,
            moment,
            kind,
            times: 1,
        });
        self
    }

    /// Add a fault (it fires `fault.times` times).
    pub fn push(&self, fault: Fault) {
        let mut inner = self.lock();
        inner.faults.push(fault);
        inner.fired.push(false);
        inner.pinned.push(None);
        inner.since.push(None);
        inner.attempt.push(None);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the lists inconsistent: recover it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `target` fails now (at `step`, `moment`); spends one firing of the fault.
    pub fn fire(&self, target: &Target, step: u64, moment: Moment) -> Option<FaultKind> {
        let mut inner = self.lock();
        let index = inner.faults.iter().position(|f| {
            f.times > 0 && &f.target == target && f.step == step && (f.moment == moment || f.moment == Moment::Any)
        })?;
        Some(inner.spend(index, step, moment))
    }

    /// [`FaultPlan::fire`] for an actor's message of attempt `step`: a fault fails each attempt
    /// of its step at most once, and never through a message of an attempt older than the one it
    /// last failed, so that `times = 2` fails the step and its replay, as documented, whatever
    /// other lanes' or workers' messages (or a rolled-back attempt's, arriving late) reach the
    /// restarted actor meanwhile.
    pub fn fire_in_attempt(&self, target: &Target, step: crate::net::StepId, moment: Moment) -> Option<FaultKind> {
        let mut inner = self.lock();
        let index = (0..inner.faults.len()).find(|&i| {
            let f = &inner.faults[i];
            f.times > 0
                && &f.target == target
                && f.step == step.step
                && (f.moment == moment || f.moment == Moment::Any)
                && inner.attempt[i].is_none_or(|last| step > last)
        })?;
        inner.attempt[index] = Some(step);
        Some(inner.spend(index, step.step, moment))
    }
}

impl Inner {
    /// Spend one firing of fault `index`, recording it.
    fn spend(&mut self, index: usize, step: u64, moment: Moment) -> FaultKind {
        let hit = &mut self.faults[index];
        hit.times -= 1;
        let kind = hit.kind;
        self.fired[index] = true;
        let firing = Firing {
            fault: index,
            step,
            moment,
            at: Instant::now(),
            detail: String::new(),
        };
        self.observer.tell(&firing);
        self.firings.push(firing);
        kind
    }
}

impl FaultPlan {
    /// Call `f` with each later firing of a scripted fault or a partition, as it happens (a worker
    /// process tells the coordinator of its link faults so; disk faults and silences are not
    /// told). `f` runs under the plan's lock: it must only queue the news.
    pub fn observe(&self, f: impl Fn(&Firing) + Send + Sync + 'static) {
        self.lock().observer = Observer(Some(Arc::new(f)));
    }

    /// Whether `worker`'s communicator is planned to stay silent from `step` on (not spent). The
    /// first time a silence applies is logged as its firing.
    pub fn silent(&self, worker: usize, step: u64) -> bool {
        let mut inner = self.lock();
        if inner.faults.is_empty() {
            return false;
        }
        let Some(index) = inner
            .faults
            .iter()
            .position(|f| f.target == Target::Silence { worker } && step >= f.step)
        else {
            return false;
        };
        if !inner.fired[index] {
            inner.fired[index] = true;
            inner.firings.push(Firing {
                fault: index,
                step,
                moment: Moment::Any,
                at: Instant::now(),
                detail: String::new(),
            });
        }
        true
    }

    /// A worker begins (an attempt of) `step`: disk faults of that step may fire from now on.
    pub fn begin_step(&self, step: u64) {
        self.begun.fetch_max(step.saturating_add(1), Ordering::Relaxed);
    }

    /// The latest step a worker began (`None` before the first).
    pub fn current_step(&self) -> Option<u64> {
        self.begun.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Whether the plan has Disk tier faults (the stores need the plan as their hook).
    pub fn has_disk_faults(&self) -> bool {
        self.lock()
            .faults
            .iter()
            .any(|f| matches!(f.target, Target::Disk { .. }))
    }

    /// Whether a packet from `from` to `to` is lost to a partition: one between the two workers
    /// (either way) that is under way, or that starts now (`step`: the packet is a request of that
    /// step; the first request of a partition's step, or a later one, starts it).
    pub fn partitioned(&self, from: usize, to: usize, step: Option<u64>) -> bool {
        let mut inner = self.lock();
        let now = Instant::now();
        let found = inner.faults.iter().enumerate().find_map(|(i, f)| {
            let FaultKind::Partition(d) = f.kind else { return None };
            let Target::Link { from: a, to: b } = f.target else {
                return None;
            };
            if !((a, b) == (from, to) || (a, b) == (to, from)) {
                return None;
            }
            match inner.since[i] {
                Some(t) => (now < t + d).then_some((i, false)),
                None => step.is_some_and(|s| s >= f.step).then_some((i, true)),
            }
        });
        let Some((index, starts)) = found else { return false };
        if starts {
            inner.since[index] = Some(now);
            inner.fired[index] = true;
            inner.faults[index].times = 0;
            let step = step.unwrap_or_default();
            let firing = Firing {
                fault: index,
                step,
                moment: Moment::Any,
                at: now,
                detail: format!("the first packet lost: a request from worker {from} to worker {to}"),
            };
            inner.observer.tell(&firing);
            inner.firings.push(firing);
        }
        true
    }

    /// Whether the plan has partitions (every packet is then checked against them).
    pub fn has_partitions(&self) -> bool {
        self.lock()
            .faults
            .iter()
            .any(|f| matches!(f.kind, FaultKind::Partition(_)))
    }

    /// Whether the plan has network faults (the transports need wrapping in [`net::FaultyTransport`]).
    pub fn has_link_faults(&self) -> bool {
        self.lock()
            .faults
            .iter()
            .any(|f| matches!(f.target, Target::Link { .. }))
    }

    /// Faults that have not fired yet (silences not counted: they never run out).
    pub fn pending(&self) -> usize {
        self.lock()
            .faults
            .iter()
            .filter(|f| {
                f.times > 0 && !matches!(f.target, Target::Silence { .. }) && !matches!(f.kind, FaultKind::Slow(_))
            })
            .count()
    }

    /// Record that `worker`'s supervisor restarts a child (`actor` is its kind, `target` the
    /// actor as a fault target when faults can target it).
    pub fn record_restart(&self, worker: usize, actor: &'static str, target: Option<Target>) {
        let mut inner = self.lock();
        inner.restarts.push(Restart {
            worker,
            actor,
            target,
            at: Instant::now(),
        });
    }

    /// The planned faults, in the order they were added (`times` is what is left of each).
    pub fn faults(&self) -> Vec<Fault> {
        self.lock().faults.clone()
    }

    /// Every firing so far, in order.
    pub fn firings(&self) -> Vec<Firing> {
        self.lock().firings.clone()
    }

    /// Every restart the supervisors reported so far, in order.
    pub fn restarts(&self) -> Vec<Restart> {
        self.lock().restarts.clone()
    }
}

/// The plan as the Disk tiers' hook: a disk fault of `worker` fires at the first read or write of
/// its direction (a slow disk: at every one) once a worker has begun its step, and is spent after
/// `times` firings (a slow disk never is).
impl DiskFaults for FaultPlan {
    fn before(&self, worker: usize, op: DiskOp, id: UnitId, len: usize) -> Option<InjectedIo> {
        let begun = self.begun.load(Ordering::Relaxed);
        if begun == 0 {
            return None;
        }
        let step = begun - 1;
        let mut inner = self.lock();
        let applies = |(i, f): &(usize, &Fault)| {
            f.target == Target::Disk { worker }
                && f.step <= step
                && f.kind.is_disk()
                && f.kind.disk_op().is_none_or(|o| o == op)
                && inner.pinned[*i].is_none_or(|unit| unit == id)
        };
        // A spent fault does not apply; a slow disk (never spent) only when no other fault does.
        let index = inner
            .faults
            .iter()
            .enumerate()
            .filter(applies)
            .find(|(_, f)| f.times > 0 && !matches!(f.kind, FaultKind::Slow(_)))
            .or_else(|| {
                inner
                    .faults
                    .iter()
                    .enumerate()
                    .filter(applies)
                    .find(|(_, f)| matches!(f.kind, FaultKind::Slow(_)))
            })
            .map(|(i, _)| i)?;
        let kind = inner.faults[index].kind;
        let slow = matches!(kind, FaultKind::Slow(_));
        // A fault firing more than once stays on its first unit; a slow disk slows every unit.
        if !slow {
            inner.pinned[index] = Some(id);
            inner.faults[index].times -= 1;
        }
        if !slow || !inner.fired[index] {
            let what = match op {
                DiskOp::Read => "a read",
                DiskOp::Write => "a write",
            };
            inner.firings.push(Firing {
                fault: index,
                step,
                moment: Moment::Any,
                at: Instant::now(),
                detail: format!("{what} of {len} bytes of expert {}.{}", id.0, id.1),
            });
        }
        inner.fired[index] = true;
        drop(inner);
        Some(match kind {
            FaultKind::ReadError | FaultKind::WriteError => {
                InjectedIo::Fail(std::io::Error::from_raw_os_error(libc::EIO))
            }
            FaultKind::DiskFull => InjectedIo::Fail(std::io::Error::from_raw_os_error(libc::ENOSPC)),
            FaultKind::ShortRead => InjectedIo::Short(len / 2),
            FaultKind::Slow(d) => InjectedIo::Delay(d),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_fires_once_at_its_moment() {
        let plan = FaultPlan::none().with(
            Target::Expert { block: 0, expert: 1 },
            3,
            Moment::Backward,
            FaultKind::Panic,
        );
        let t = Target::Expert { block: 0, expert: 1 };
        assert_eq!(plan.fire(&t, 3, Moment::Forward), None);
        assert_eq!(plan.fire(&t, 2, Moment::Backward), None);
        assert_eq!(
            plan.fire(&Target::Expert { block: 0, expert: 2 }, 3, Moment::Backward),
            None
        );
        assert_eq!(plan.pending(), 1);
        assert_eq!(plan.fire(&t, 3, Moment::Backward), Some(FaultKind::Panic));
        assert_eq!(plan.fire(&t, 3, Moment::Backward), None);
        assert_eq!(plan.pending(), 0);
    }

    #[test]
    fn an_actor_fault_fails_each_attempt_once_and_never_through_an_older_one() {
        let t = Target::Expert { block: 0, expert: 1 };
        let plan = FaultPlan::none();
        plan.push(Fault {
            target: t.clone(),
            step: 3,
            moment: Moment::Any,
            kind: FaultKind::Error,
            times: 3,
        });
        let attempt = |attempt| crate::net::StepId { step: 3, attempt };
        assert_eq!(
            plan.fire_in_attempt(&t, attempt(0), Moment::Forward),
            Some(FaultKind::Error)
        );
        // Another lane's message of the same attempt reaches the restarted actor: not again.
        assert_eq!(plan.fire_in_attempt(&t, attempt(0), Moment::Backward), None);
        // The replay fails once as well; a late message of the rolled-back attempt does not.
        assert_eq!(
            plan.fire_in_attempt(&t, attempt(1), Moment::Forward),
            Some(FaultKind::Error)
        );
        assert_eq!(plan.fire_in_attempt(&t, attempt(0), Moment::Forward), None);
        assert_eq!(plan.fire_in_attempt(&t, attempt(1), Moment::Forward), None);
        assert_eq!(plan.pending(), 1, "one firing left, for the next attempt");
        assert_eq!(
            plan.fire_in_attempt(&t, attempt(2), Moment::Forward),
            Some(FaultKind::Error)
        );
        assert_eq!(plan.fire_in_attempt(&t, attempt(3), Moment::Forward), None);
        assert_eq!(plan.pending(), 0);
    }

    /// A slow disk slows every read and write of its worker from its step on, whichever unit;
    /// it used to stay on the first unit it met.
    #[test]
    fn a_slow_disk_slows_every_unit() {
        use crate::storage::tiers::disk::{DiskFaults, DiskOp, InjectedIo};
        let delay = std::time::Duration::from_millis(5);
        let plan = FaultPlan::none();
        plan.push(Fault {
            target: Target::Disk { worker: 1 },
            step: 2,
            moment: Moment::Any,
            kind: FaultKind::Slow(delay),
            times: 1,
        });
        assert!(plan.before(1, DiskOp::Read, (0, 0), 64).is_none(), "before any step");
        plan.begin_step(2);
        assert!(
            plan.before(0, DiskOp::Read, (0, 0), 64).is_none(),
            "another worker's disk"
        );
        for (op, id) in [
            (DiskOp::Read, (0, 0)),
            (DiskOp::Write, (0, 1)),
            (DiskOp::Read, (1, 3)),
            (DiskOp::Read, (0, 0)),
        ] {
            assert!(
                matches!(plan.before(1, op, id, 64), Some(InjectedIo::Delay(d)) if d == delay),
                "{op:?} of unit {id:?}"
            );
        }
    }
}
