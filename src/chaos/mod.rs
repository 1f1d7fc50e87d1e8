//! Fault plans: make chosen actors fail at chosen moments, to test that the runtime repairs them.
//!
//! A [`FaultPlan`] is shared by every actor of a runtime. Each actor asks it, at its injection
//! points, whether to fail now; a fault fires a given number of times and is then spent. With an
//! empty plan (the default) the checks cost one lock of an empty list.

use std::sync::{Arc, Mutex};

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

/// How the actor fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Its handler returns an error.
    Error,
    /// Its handler panics.
    Panic,
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

/// The faults to inject, shared by all actors of a runtime.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    faults: Arc<Mutex<Vec<Fault>>>,
}

impl FaultPlan {
    /// A plan with no faults.
    pub fn none() -> Self {
        FaultPlan::default()
    }

    /// Add a fault that fires once.
    pub fn with(self, target: Target, step: u64, moment: Moment, kind: FaultKind) -> Self {
        self.lock().push(Fault {
            target,
            step,
            moment,
            kind,
            times: 1,
        });
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Fault>> {
        // A panic while holding this lock cannot leave the list inconsistent: recover it.
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `target` fails now (at `step`, `moment`); spends one firing of the fault.
    pub fn fire(&self, target: &Target, step: u64, moment: Moment) -> Option<FaultKind> {
        let mut faults = self.lock();
        let hit = faults.iter_mut().find(|f| {
            f.times > 0 && &f.target == target && f.step == step && (f.moment == moment || f.moment == Moment::Any)
        })?;
        hit.times -= 1;
        Some(hit.kind)
    }

    /// Whether `worker`'s communicator is planned to stay silent from `step` on (not spent).
    pub fn silent(&self, worker: usize, step: u64) -> bool {
        self.lock()
            .iter()
            .any(|f| f.target == Target::Silence { worker } && step >= f.step)
    }

    /// Faults that have not fired yet.
    pub fn pending(&self) -> usize {
        self.lock()
            .iter()
            .filter(|f| f.times > 0 && !matches!(f.target, Target::Silence { .. }))
            .count()
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
