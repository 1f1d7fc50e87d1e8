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
//! wraps around its in-process transport when the plan has any.

pub mod net;
pub mod scenario;

pub use scenario::{ActorKind, FaultSpec, Layout, PlannedFault, Scenario, ScenarioBuilder, When};

use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    /// The requests `from` sends `to` (a network fault: drop, duplicate, delay, reorder).
    Link {
        /// The sending worker.
        from: usize,
        /// The receiving worker.
        to: usize,
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
}

/// An actor restart, as a worker's supervisor reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct Restart {
    /// The worker that restarted its child.
    pub worker: usize,
    /// What kind of actor: `expert`, `gate`, `ledger` or `communicator`.
    pub actor: &'static str,
    /// The actor as a fault target (`None` for a communicator, which no fault targets).
    pub target: Option<Target>,
    /// When the supervisor saw the failure.
    pub at: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    faults: Vec<Fault>,
    /// Whether each fault (by index) fired at least once (a silence fires once and stays).
    fired: Vec<bool>,
    firings: Vec<Firing>,
    restarts: Vec<Restart>,
}

/// The faults to inject, shared by all actors of a runtime.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    inner: Arc<Mutex<Inner>>,
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
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the lists inconsistent: recover it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `target` fails now (at `step`, `moment`); spends one firing of the fault.
    pub fn fire(&self, target: &Target, step: u64, moment: Moment) -> Option<FaultKind> {
        let mut inner = self.lock();
        let (index, hit) = inner.faults.iter_mut().enumerate().find(|(_, f)| {
            f.times > 0 && &f.target == target && f.step == step && (f.moment == moment || f.moment == Moment::Any)
        })?;
        hit.times -= 1;
        let kind = hit.kind;
        inner.fired[index] = true;
        inner.firings.push(Firing {
            fault: index,
            step,
            moment,
            at: Instant::now(),
        });
        Some(kind)
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
            });
        }
        true
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
            .filter(|f| f.times > 0 && !matches!(f.target, Target::Silence { .. }))
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
}
