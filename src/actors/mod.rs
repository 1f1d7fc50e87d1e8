//! The actor runtime: training as a tree of supervised ractor actors exchanging token batches.
//!
//! ```text
//! Coordinator                 step barrier, two-phase commit, replays
//!  +- Worker (one per device) runs the dense layers of its groups; supervises:
//!      +- Gate (per MoE block)  routes its groups' tokens, dispatches and combines
//!      +- Expert (per hosted expert) forward/backward of its rows; owns its gradient and AdamW step
//!      +- Ledger                 committed parameters: owned dense tensors, expert slots
//!      +- Communicator         the transport: fused all-to-all-v, gradient reduction, broadcast
//! ```
//!
//! `docs/runtime-semantics.md` describes the messages, their order, deadlines, supervision and the
//! commit protocol, and what is guaranteed: parameters after step N are bitwise identical for any
//! number of workers, any expert placement, and any schedule of actor failures. [`Runtime`] is the
//! entry point.

pub mod collectives;
pub mod communicator;
pub mod coordinator;
pub mod expert;
pub mod gate;
pub mod gather;
pub mod ledger;
pub mod placement;
pub mod runtime;
pub mod traffic;
pub mod worker;

pub use placement::{ExpertPlacement, Placement};
pub use runtime::{RestartPolicy, Runtime, RuntimeBuilder, StepOutcome};

use crate::chaos::{FaultKind, FaultPlan, Moment, Target};
use crate::error::{Error, Result};
use crate::kernels::Cpu;
use ractor::rpc::CallResult;
use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use std::time::Duration;

/// An actor's human-readable name (used in errors and logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActorName(pub String);

impl std::fmt::Display for ActorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Run `f` on the compute pool and await its result, so that kernels never run on the async
/// runtime's threads. A panic inside `f` becomes an error.
pub(crate) async fn offload<R, F>(cpu: &Cpu, f: F) -> Result<R>
where
    R: Send + 'static,
    F: FnOnce(&Cpu) -> Result<R> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let backend = cpu.clone();
    cpu.spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&backend)))
            .unwrap_or_else(|p| Err(Error::runtime(format!("a compute task panicked: {}", panic_text(&p)))));
        let _ = tx.send(r);
    });
    rx.await
        .map_err(|_| Error::runtime("the compute pool dropped a task"))?
}

/// The message of a caught panic.
pub(crate) fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Fail now if the fault plan says so (at most once per attempt of the step: see
/// [`FaultPlan::fire_in_attempt`]): an injected error makes the handler return it (the actor
/// fails), an injected panic panics in the handler. Either way the supervisor sees a failure.
pub(crate) fn inject(
    plan: &FaultPlan,
    target: &Target,
    step: crate::net::StepId,
    moment: Moment,
    name: &ActorName,
) -> Result<(), ActorProcessingErr> {
    fail_with(plan.fire_in_attempt(target, step, moment), name, step)
}

/// Fail as the fault `kind` (if any) says, in the handler of `name` at `step`.
pub(crate) fn fail_with(
    kind: Option<FaultKind>,
    name: &ActorName,
    step: impl std::fmt::Display,
) -> Result<(), ActorProcessingErr> {
    match kind {
        None => Ok(()),
        Some(FaultKind::Error) => Err(format!("injected error in {name} at step {step}").into()),
        Some(FaultKind::Panic) => panic!("injected panic in {name} at step {step}"),
        // Network faults are the transport's (`chaos::net`), disk faults the Disk tier's, never an
        // actor's.
        Some(_) => Ok(()),
    }
}

/// Ask `actor` and wait at most `deadline` for its answer. A stopped or failing actor, or a missed
/// deadline, becomes an error naming `who` and `what`.
pub(crate) async fn ask<M, R>(
    actor: &ActorRef<M>,
    who: &ActorName,
    what: &str,
    deadline: Duration,
    build: impl FnOnce(RpcReplyPort<Result<R>>) -> M,
) -> Result<R>
where
    M: ractor::Message,
    R: Send + 'static,
{
    match actor.call(build, Some(deadline)).await {
        Ok(CallResult::Success(r)) => r,
        Ok(CallResult::Timeout) => Err(Error::Deadline {
            peer: who.to_string(),
            what: what.to_string(),
            deadline_ms: deadline.as_millis() as u64,
        }),
        Ok(CallResult::SenderError) => Err(Error::ActorFailed {
            actor: who.to_string(),
            detail: format!("stopped before answering {what} (it failed, or was stopped)"),
        }),
        Err(_) => Err(Error::ActorFailed {
            actor: who.to_string(),
            detail: format!("was not running to receive {what}"),
        }),
    }
}
